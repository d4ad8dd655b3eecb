"""Extraction on Ray: the encoder over many files as Ray Data batches, written as resumable shards.

The file list is cut into shards of ``shard_size`` files (a multiple of the batch size, so every
model call sees the same batches as a single-process ``extract`` and the features are the same
bits).  Each Ray worker opens the model once and, per shard, decodes, encodes and writes
``shard-NNNNN.npy`` + ``.json`` atomically into ``<output>.shards/``.  A rerun with the same
inputs and settings skips the shards already written (a killed run resumes); the shards are then
merged in order into one feature matrix.  Ray starts locally unless ``address`` names a cluster.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import ReidExportError, UsageError, options_or_fields, require_module
from ..fileio import atomic_write_files, atomic_write_json
from ..preprocess import ON_ERROR

INSTALL = "pip install 'reid-export[ray]'"
PLAN = "plan.json"


def require_ray():
    """The ``ray`` module with Ray Data, or one line that says how to install it."""
    require_module("ray.data", "Ray (with Ray Data)", INSTALL)
    return require_module("ray", "Ray", INSTALL)


def shards_dir(output: Path) -> Path:
    return output.with_name(output.name + ".shards")


@dataclass
class RayOptions:
    """How :func:`extract_on_ray` runs, checked once by :meth:`check` before any work.

    The model as :func:`~reid_export.runtime.open_encoder` opens it (``config``, ``opts``, ``device``,
    ``allow_partial``); the batches (``batch_size``, ``flip_test``, ``on_error``: ``raise`` or ``skip``
    unreadable images); ``shard_size`` files per shard (a multiple of ``batch_size``, so every model call
    sees the batches of a single-process run); the Ray workers: ``num_workers``, ``cpus_per_worker`` (also
    each worker's torch threads; None: this process's torch thread count, so the features are the same
    bits as a local run), ``gpus_per_worker``, ``address`` of a cluster (None: a local Ray)."""

    config: str | Path | None = None
    opts: Sequence[str] = ()
    device: str = "cpu"
    allow_partial: bool = False
    batch_size: int = 32
    flip_test: bool = False
    on_error: str = "raise"
    shard_size: int = 1024
    num_workers: int = 1
    cpus_per_worker: float | None = None
    gpus_per_worker: float = 0.0
    address: str | None = None
    progress: bool = True

    def check(self) -> "RayOptions":
        """Raise a one-line :class:`UsageError` for a value that cannot work; returns ``self``."""
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise UsageError(f"`batch_size` must be an integer >= 1, got {self.batch_size!r}")
        if self.shard_size < 1 or self.shard_size % self.batch_size:
            raise UsageError(f"`shard_size` {self.shard_size} must be a positive multiple of `batch_size` "
                             f"{self.batch_size} (so the model sees the same batches as a single-process run)")
        if self.num_workers < 1:
            raise UsageError(f"`num_workers` must be >= 1, got {self.num_workers}")
        if self.cpus_per_worker is not None and not self.cpus_per_worker > 0:
            raise UsageError(f"`cpus_per_worker` must be > 0, got {self.cpus_per_worker!r}")
        if not self.gpus_per_worker >= 0:
            raise UsageError(f"`gpus_per_worker` must be >= 0, got {self.gpus_per_worker!r}")
        if self.on_error not in ON_ERROR:
            raise UsageError(f"`on_error` must be one of {', '.join(ON_ERROR)}, got {self.on_error!r}")
        return self

    @property
    def cpus(self) -> float:
        """Ray CPUs per worker: ``cpus_per_worker``, else this process's torch thread count."""
        if self.cpus_per_worker is not None:
            return self.cpus_per_worker
        import torch

        return torch.get_num_threads()

    @property
    def threads(self) -> int:
        """torch threads per worker (the thread count changes the float rounding)."""
        return max(1, int(self.cpus))

    def plan(self, model, paths: Sequence[str]) -> dict:
        """What a shard folder was made with: a rerun resumes it only when this is the same."""
        digest = hashlib.sha256("\n".join(str(p) for p in paths).encode("utf-8", "surrogateescape")).hexdigest()
        model = Path(model)
        st = model.stat()
        return {"model": str(model.resolve()), "model_size": st.st_size, "model_mtime_ns": st.st_mtime_ns,
                "config": str(self.config) if self.config else None, "opts": list(self.opts),
                "allow_partial": bool(self.allow_partial), "files_sha256": digest, "num_files": len(paths),
                "batch_size": self.batch_size, "shard_size": self.shard_size, "flip_test": bool(self.flip_test),
                "device": self.device, "on_error": self.on_error, "threads_per_worker": self.threads}


class _ShardWorker:
    """One per Ray worker: opens the model once, then encodes and writes whole shards."""

    def __init__(self, model: str, options: RayOptions, paths: list[str], folder: str):
        import torch

        from .encoder import open_encoder

        torch.set_num_threads(options.threads)
        self.encoder = open_encoder(model, config=options.config, opts=list(options.opts), device=options.device,
                                    allow_partial=options.allow_partial)
        self.paths, self.folder = paths, Path(folder)
        self.batch_size, self.shard_size = options.batch_size, options.shard_size
        self.flip_test, self.on_error = options.flip_test, options.on_error

    def __call__(self, batch: dict) -> dict:
        out_shard, out_rows = [], []
        for shard in batch["shard"]:
            shard = int(shard)
            start = shard * self.shard_size
            files = self.paths[start:start + self.shard_size]
            try:
                res = self.encoder.encode_paths(files, self.batch_size, self.flip_test, progress=False,
                                                on_error=self.on_error)
            except ReidExportError as exc:
                if self.on_error == "skip" and str(exc).startswith("none of the"):
                    res = None  # a shard of unreadable files only
                else:
                    raise
            if res is None:
                feats, kept, skipped = np.zeros((0, 0), np.float32), [], [
                    {"file": str(f), "reason": "unreadable"} for f in files]
            else:
                feats, kept = res.features, [start + i for i in res.kept]
                skipped = [{"file": str(e.path), "reason": e.reason} for e in res.skipped]
            buf = io.BytesIO()
            np.save(buf, np.ascontiguousarray(feats, dtype=np.float32))
            meta = {"shard": shard, "kept": kept, "skipped": skipped, "backend": self.encoder.backend,
                    "precision": self.encoder.precision, "data_config": self.encoder.data_config.to_dict()}
            atomic_write_files({self.folder / f"shard-{shard:05d}.npy": buf.getvalue(),
                                self.folder / f"shard-{shard:05d}.json": json.dumps(meta).encode()})
            out_shard.append(shard)
            out_rows.append(len(kept))
        return {"shard": np.array(out_shard), "rows": np.array(out_rows)}


def extract_on_ray(model, paths: Sequence[Path], output: Path, options: RayOptions | None = None, *,
                   max_shards: int | None = None, **fields) -> dict:
    """Encode ``paths`` on Ray into shards beside ``output``; returns the merged result:
    ``features`` [N, D], ``kept`` (indices into ``paths``), ``skipped`` (dicts), ``backend``,
    ``precision``, ``data_config``, ``shards`` and ``shards_reused``.  Give ``options``
    (:class:`RayOptions`) or its fields as keywords. ``max_shards`` stops after that many new shards
    (for tests of the resume)."""
    options = options_or_fields(RayOptions, options, fields, "extract_on_ray")
    options.check()
    ray = require_ray()
    paths = [str(p) for p in paths]
    folder = shards_dir(Path(output))
    folder.mkdir(parents=True, exist_ok=True)
    _check_plan(folder, options.plan(model, paths))
    shard_size = options.shard_size
    n_shards = (len(paths) + shard_size - 1) // shard_size
    done = {s for s in range(n_shards) if _shard_complete(folder, s)}
    todo = [s for s in range(n_shards) if s not in done]
    if max_shards is not None:
        todo = todo[:max_shards]
    if todo:
        _run_shards(ray, model, paths, folder, todo, done, options)
    missing = [s for s in range(n_shards) if not _shard_complete(folder, s)]
    result = {"shards": n_shards, "shards_reused": len(done), "missing": missing, "folder": folder}
    if missing:
        return result
    merged = merge_shards(folder, n_shards)
    given = {str(Path(p).absolute()): p for p in paths}  # the workers saw absolute paths: report them as given
    for entry in merged["skipped"]:
        entry["file"] = given.get(entry["file"], entry["file"])
    return result | merged


def _check_plan(folder: Path, plan: dict) -> None:
    """Write the run's plan into a new shard folder; refuse a folder that holds another run's shards."""
    plan_path = folder / PLAN
    if plan_path.exists():
        try:
            old = json.loads(plan_path.read_text())
        except ValueError:
            old = None
        if old != plan:
            raise ReidExportError(f"{folder}: holds shards of another run (model, files or settings differ); "
                                  "remove that folder to start over, or rerun with the same arguments to resume")
    else:
        atomic_write_json(plan_path, plan)


def _run_shards(ray, model, paths: list[str], folder: Path, todo: list[int], done: set[int],
                options: RayOptions) -> None:
    """Encode and write the shards ``todo`` on Ray workers (one :class:`_ShardWorker` each), in order."""
    from tqdm import tqdm

    shard_size = options.shard_size
    if not ray.is_initialized():
        kwargs = {"address": options.address} if options.address else {"num_cpus": max(1, os.cpu_count() or 1)}
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False, **kwargs)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = True
    ds = ray.data.from_items([{"shard": s} for s in todo], override_num_blocks=len(todo))
    ds = ds.map_batches(
        _ShardWorker, batch_size=1, concurrency=options.num_workers, num_cpus=options.cpus,
        num_gpus=options.gpus_per_worker or None,
        # absolute: a Ray worker resolves a relative path from the folder Ray was started in, not the caller's
        fn_constructor_kwargs={"model": str(Path(model).absolute()),
                               "options": replace(options, config=options.config and str(Path(options.config).absolute())),
                               "paths": [str(Path(p).absolute()) for p in paths], "folder": str(folder.absolute())})
    bar = tqdm(total=len(paths), initial=sum(min(shard_size, len(paths) - s * shard_size) for s in done),
               desc="extract (ray)", unit="img", disable=not options.progress, leave=False)
    try:
        for row in ds.iter_rows():
            s = int(row["shard"])
            bar.update(min(shard_size, len(paths) - s * shard_size))
    except Exception as exc:  # a worker's ReidExportError arrives wrapped by Ray
        cause = _user_error(exc)
        if cause is not None:
            raise cause from None
        raise
    finally:
        bar.close()


def _user_error(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, ReidExportError):
            return exc
        for attr in ("cause", "__cause__"):
            inner = getattr(exc, attr, None)
            if isinstance(inner, BaseException):
                exc = inner
                break
        else:
            text = str(exc)
            for marker in ("UnreadableImage: ", "ReidExportError: "):
                if marker in text:
                    return ReidExportError(text.rsplit(marker, 1)[1].strip().splitlines()[0])
            return None
    return None


def _shard_complete(folder: Path, shard: int) -> bool:
    return (folder / f"shard-{shard:05d}.npy").exists() and (folder / f"shard-{shard:05d}.json").exists()


def merge_shards(folder: Path, n_shards: int) -> dict:
    feats, kept, skipped, meta = [], [], [], None
    for s in range(n_shards):
        try:
            m = json.loads((folder / f"shard-{s:05d}.json").read_text())
            f = np.load(folder / f"shard-{s:05d}.npy", allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise ReidExportError(f"{folder}: shard {s} is unreadable ({exc}); delete it and rerun to redo it") from None
        if f.shape[0] != len(m["kept"]):
            raise ReidExportError(f"{folder}: shard {s} has {f.shape[0]} rows for {len(m['kept'])} files; "
                                  "delete it and rerun")
        if f.shape[0]:
            feats.append(f)
        kept.extend(m["kept"])
        skipped.extend(m["skipped"])
        meta = meta or (m if f.shape[0] else None)
    if not feats:
        raise ReidExportError(f"none of the images could be read ({len(skipped)} skipped)")
    return {"features": np.concatenate(feats), "kept": kept, "skipped": skipped, "backend": meta["backend"],
            "precision": meta["precision"], "data_config": meta["data_config"]}


__all__ = ["RayOptions", "extract_on_ray", "merge_shards", "require_ray", "shards_dir"]


def run_extract_on_ray(model, paths, output, options: RayOptions):
    """What the CLI's ``--engine ray`` runs: (features, kept paths, skipped dicts, model info)."""
    import click

    res = extract_on_ray(model, paths, Path(output), options)
    if res["missing"]:
        raise ReidExportError(f"{res['folder']}: {len(res['missing'])} of {res['shards']} shards are missing after "
                              "the run; rerun the same command to finish them")
    if res["shards_reused"]:
        click.echo(f"resumed: {res['shards_reused']} of {res['shards']} shards were already in {res['folder']}",
                   err=True)
    kept = [paths[i] for i in res["kept"]]
    if res["skipped"]:
        click.echo(f"skipped {len(res['skipped'])} unreadable images (listed in the .json)", err=True)
    info = {"backend": res["backend"], "precision": res["precision"], "data_config": res["data_config"],
            "engine": "ray", "shards": res["shards"], "shards_reused": res["shards_reused"]}
    return res["features"], kept, res["skipped"], info


def remove_shards(output) -> None:
    import shutil

    shutil.rmtree(shards_dir(Path(output)), ignore_errors=True)
