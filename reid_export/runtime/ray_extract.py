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
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import ReidExportError, UsageError, require_module
from ..fileio import atomic_write_files, atomic_write_json

INSTALL = "pip install 'reid-export[ray]'"
PLAN = "plan.json"


def require_ray():
    """The ``ray`` module with Ray Data, or one line that says how to install it."""
    require_module("ray.data", "Ray (with Ray Data)", INSTALL)
    return require_module("ray", "Ray", INSTALL)


def shards_dir(output: Path) -> Path:
    return output.with_name(output.name + ".shards")


def _plan(model, paths, batch_size, shard_size, flip_test, device, config, opts, allow_partial, on_error) -> dict:
    digest = hashlib.sha256("\n".join(str(p) for p in paths).encode("utf-8", "surrogateescape")).hexdigest()
    model = Path(model)
    st = model.stat()
    return {"model": str(model.resolve()), "model_size": st.st_size, "model_mtime_ns": st.st_mtime_ns,
            "config": str(config) if config else None, "opts": list(opts), "allow_partial": bool(allow_partial),
            "files_sha256": digest, "num_files": len(paths), "batch_size": batch_size, "shard_size": shard_size,
            "flip_test": bool(flip_test), "device": device, "on_error": on_error}


class _ShardWorker:
    """One per Ray worker: opens the model once, then encodes and writes whole shards."""

    def __init__(self, model, config, opts, device, allow_partial, paths, folder, batch_size, shard_size,
                 flip_test, on_error, threads):
        import torch

        from .encoder import open_encoder

        if threads:
            torch.set_num_threads(threads)
        self.encoder = open_encoder(model, config=config, opts=opts, device=device, allow_partial=allow_partial)
        self.paths, self.folder = paths, Path(folder)
        self.batch_size, self.shard_size, self.flip_test, self.on_error = batch_size, shard_size, flip_test, on_error

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


def extract_on_ray(model, paths: Sequence[Path], output: Path, *, config=None, opts=(), device: str = "cpu",
                   allow_partial: bool = False, batch_size: int = 32, flip_test: bool = False,
                   shard_size: int = 1024, num_workers: int = 1, cpus_per_worker: float = 1.0,
                   gpus_per_worker: float = 0.0, address: str | None = None, progress: bool = True,
                   on_error: str = "raise", max_shards: int | None = None) -> dict:
    """Encode ``paths`` on Ray into shards beside ``output``; returns the merged result:
    ``features`` [N, D], ``kept`` (indices into ``paths``), ``skipped`` (dicts), ``backend``,
    ``precision``, ``data_config``, ``shards`` and ``shards_reused``.  ``max_shards`` stops after
    that many new shards (for tests of the resume)."""
    from tqdm import tqdm

    if shard_size < 1 or shard_size % batch_size:
        raise UsageError(f"`shard_size` {shard_size} must be a positive multiple of `batch_size` {batch_size} "
                         "(so the model sees the same batches as a single-process run)")
    if num_workers < 1:
        raise UsageError(f"`num_workers` must be >= 1, got {num_workers}")
    ray = require_ray()
    paths = [str(p) for p in paths]
    folder = shards_dir(Path(output))
    folder.mkdir(parents=True, exist_ok=True)
    plan = _plan(model, paths, batch_size, shard_size, flip_test, device, config, opts, allow_partial, on_error)
    plan["threads_per_worker"] = max(1, int(cpus_per_worker))  # the thread count changes the float rounding
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
    n_shards = (len(paths) + shard_size - 1) // shard_size
    done = {s for s in range(n_shards) if _shard_complete(folder, s)}
    todo = [s for s in range(n_shards) if s not in done]
    if max_shards is not None:
        todo = todo[:max_shards]
    if todo:
        if not ray.is_initialized():
            kwargs = {"address": address} if address else {"num_cpus": max(1, os.cpu_count() or 1)}
            ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False, **kwargs)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.execution_options.preserve_order = True
        threads = max(1, int(cpus_per_worker))
        ds = ray.data.from_items([{"shard": s} for s in todo], override_num_blocks=len(todo))
        ds = ds.map_batches(
            _ShardWorker, batch_size=1, concurrency=num_workers, num_cpus=cpus_per_worker,
            num_gpus=gpus_per_worker or None,
            fn_constructor_kwargs={"model": str(model), "config": config, "opts": list(opts), "device": device,
                                   "allow_partial": allow_partial, "paths": paths, "folder": str(folder),
                                   "batch_size": batch_size, "shard_size": shard_size, "flip_test": flip_test,
                                   "on_error": on_error, "threads": threads})
        bar = tqdm(total=len(paths), initial=sum(min(shard_size, len(paths) - s * shard_size) for s in done),
                   desc="extract (ray)", unit="img", disable=not progress, leave=False)
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
    missing = [s for s in range(n_shards) if not _shard_complete(folder, s)]
    result = {"shards": n_shards, "shards_reused": len(done), "missing": missing, "folder": folder}
    if missing:
        return result
    return result | merge_shards(folder, n_shards)


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


__all__ = ["extract_on_ray", "merge_shards", "require_ray", "shards_dir"]


def run_extract_on_ray(model, paths, output, *, config, opts, device, allow_partial, batch_size, flip_test, progress,
                       skip_bad_images, ray_address, workers, threads_per_worker, gpus_per_worker, shard_size):
    """What the CLI's ``--engine ray`` runs: (features, kept paths, skipped dicts, model info)."""
    import click
    import torch

    threads = threads_per_worker or torch.get_num_threads()
    res = extract_on_ray(model, paths, Path(output), config=config, opts=opts, device=device,
                         allow_partial=allow_partial, batch_size=batch_size, flip_test=flip_test,
                         shard_size=shard_size, num_workers=workers, cpus_per_worker=threads,
                         gpus_per_worker=gpus_per_worker, address=ray_address, progress=progress,
                         on_error="skip" if skip_bad_images else "raise")
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
