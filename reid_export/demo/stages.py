"""A small make-like stage runner for the demo: fingerprints, manifests, reuse, one-line failures.

A stage has a name, a dict of *inputs* (parameters and the fingerprints of the files it reads)
and a list of *outputs* (paths inside the work folder). Running a stage writes its outputs (each
one atomically: the tools it calls write to a temporary file and rename) and then, last, its
manifest ``stages/<name>.json``::

    {"stage": ..., "inputs": {...}, "inputs_digest": sha256 of the inputs,
     "outputs": {path: fingerprint}, "result": {...}, "seconds": ..., "cpu_seconds": ..., ...}

A stage is *done* when its manifest exists, its ``inputs_digest`` equals the digest of the
current inputs, and every output still exists with the fingerprint recorded. Then the stage is
reused; otherwise (or with ``force``) its manifest is removed and the stage runs again. A checking
stage (parity, eval, bench) whose result says ``"passed": false`` keeps its outputs but gets no
manifest: the pipeline goes on, and the next run checks again. A stage
reads its upstream stages' outputs through their fingerprints, so a stage that ran again with a
different result makes its dependants run again, and one whose files were edited or deleted runs
again itself.

Fingerprints: a file is its sha256 (cached per process by path, size and mtime); a folder is the
sha256 of its files' relative paths and fingerprints, so content decides, not modification times.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from ..cpuinfo import load_average
from ..errors import ReidExportError
from ..fileio import atomic_write_json, sha256_file

MANIFEST_DIR = "stages"
_HASH_CACHE: dict[tuple[str, int, int], str] = {}


def file_fingerprint(path: str | Path) -> str:
    """``sha256:<hex>`` of a file's bytes (cached while its size and mtime stay the same)."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASH_CACHE:
        _HASH_CACHE[key] = "sha256:" + sha256_file(path)
    return _HASH_CACHE[key]


def folder_fingerprint(path: str | Path) -> str:
    """``tree:<hex>:<count>`` over the relative path and content fingerprint of every file below ``path``
    (content, not modification times: a dataset generated again with the same bytes is the same)."""
    root = Path(path)
    digest = hashlib.sha256()
    count = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            digest.update(f"{os.path.relpath(full, root)}\0{file_fingerprint(full)}\n".encode())
            count += 1
    return f"tree:{digest.hexdigest()}:{count}"


def fingerprint(path: str | Path) -> str | None:
    """The fingerprint of a file or folder, or None when it does not exist."""
    path = Path(path)
    if path.is_dir():
        return folder_fingerprint(path)
    if path.is_file():
        return file_fingerprint(path)
    return None


def digest_of(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def one_line(text: str, limit: int = 400) -> str:
    """The text of an error on one line (joined, squeezed, cut at ``limit`` characters)."""
    line = " ".join(part.strip() for part in str(text).splitlines() if part.strip())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def describe_exception(exc: BaseException) -> str:
    """What went wrong, for one line: our own errors say it already, others get their type."""
    import click

    if isinstance(exc, ReidExportError):
        return one_line(str(exc))
    if isinstance(exc, click.ClickException):
        return one_line(exc.format_message())
    return one_line(f"{type(exc).__name__}: {exc}")


class StageFailed(ReidExportError):
    """A stage raised: names the stage and the reason, on one line."""

    def __init__(self, stage: str, reason: str, log: Path | None = None):
        where = f" (log: {log})" if log is not None and log.is_file() and log.stat().st_size else ""
        super().__init__(f"demo stage '{stage}' failed: {reason}{where}", exit_code=1)
        self.stage = stage
        self.reason = reason


@dataclass
class Stage:
    """One step of the pipeline.

    ``inputs()`` is called just before the reuse check (so it sees upstream outputs as they are
    now); ``run(stage_dir_log)`` does the work and returns a JSON-able result; ``summary(result)``
    turns a result into the text after "done" on the stage's console line.
    """

    name: str
    title: str | Callable[[], str]
    outputs: list[str]
    inputs: Callable[[], dict]
    run: Callable[["StageRun"], dict]
    summary: Callable[[dict], str] = lambda result: ""


@dataclass
class StageRun:
    """What a running stage gets: the work folder and its own log file."""

    workdir: Path
    log_path: Path
    progress: bool
    force: bool = False

    def log(self, line: str) -> None:
        with open(self.log_path, "a", encoding="utf-8") as handle:
            handle.write(line.rstrip("\n") + "\n")


@dataclass
class StageRecord:
    name: str
    status: str            # "ran" or "reused"
    manifest: dict = field(default_factory=dict)

    @property
    def result(self) -> dict:
        return self.manifest.get("result", {})


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class StageRunner:
    """Runs stages in order in ``workdir``, reusing finished ones; prints a line per stage."""

    def __init__(self, workdir: Path, total: int, force: bool = False, progress: bool = True,
                 echo: Callable[[str], None] = print):
        self.workdir = workdir
        self.total = total
        self.force = force
        self.progress = progress
        self.echo = echo
        self.records: dict[str, StageRecord] = {}
        (workdir / MANIFEST_DIR).mkdir(parents=True, exist_ok=True)
        (workdir / "logs").mkdir(parents=True, exist_ok=True)

    def manifest_path(self, name: str) -> Path:
        return self.workdir / MANIFEST_DIR / f"{name}.json"

    def load_manifest(self, name: str) -> dict | None:
        try:
            return json.loads(self.manifest_path(name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def is_done(self, stage: Stage, inputs_digest: str) -> dict | None:
        """The manifest when the stage is finished and current, else None."""
        manifest = self.load_manifest(stage.name)
        if not manifest or manifest.get("inputs_digest") != inputs_digest:
            return None
        recorded = manifest.get("outputs") or {}
        if set(recorded) != set(stage.outputs):
            return None
        for rel, fp in recorded.items():
            if fp is None or fingerprint(self.workdir / rel) != fp:
                return None
        return manifest

    def run(self, index: int, stage: Stage) -> StageRecord:
        tag = f"[{index}/{self.total}] {stage.name}"
        try:
            inputs = stage.inputs()
        except Exception as exc:  # a missing upstream output, an unreadable file
            raise StageFailed(stage.name, describe_exception(exc)) from exc
        inputs_digest = digest_of(inputs)
        manifest = None if self.force else self.is_done(stage, inputs_digest)
        if manifest is not None:
            summary = stage.summary(manifest.get("result", {}))
            self.echo(f"{tag}: reused ({manifest.get('seconds', 0):.1f} s when it ran)"
                      + (f"  {summary}" if summary else ""))
            record = StageRecord(stage.name, "reused", manifest)
            self.records[stage.name] = record
            return record

        self.manifest_path(stage.name).unlink(missing_ok=True)
        log_path = self.workdir / "logs" / f"{stage.name}.log"
        log_path.write_text("", encoding="utf-8")
        try:
            title = stage.title() if callable(stage.title) else stage.title
        except Exception:  # noqa: BLE001 - only a description; the stage itself reports real problems
            title = stage.name
        self.echo(f"{tag}: {title} ...")
        start, cpu_start, load_start = time.perf_counter(), _cpu_seconds(), load_average()
        try:
            result = stage.run(StageRun(self.workdir, log_path, self.progress, self.force)) or {}
            missing = [rel for rel in stage.outputs if not (self.workdir / rel).exists()]
            if missing:
                raise ReidExportError(f"finished without writing {', '.join(missing)}")
            outputs = {rel: fingerprint(self.workdir / rel) for rel in stage.outputs}
        except KeyboardInterrupt:
            raise
        except StageFailed:
            raise
        except BaseException as exc:  # noqa: BLE001 - every failure becomes one line naming the stage
            raise StageFailed(stage.name, describe_exception(exc), log_path) from exc
        seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu_start
        manifest = {
            "stage": stage.name, "title": title, "inputs": inputs, "inputs_digest": inputs_digest,
            "outputs": outputs, "result": result, "seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2),
            "load_average_start": load_start, "load_average_end": load_average(),
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        checked_ok = result.get("passed", True) is not False
        if checked_ok:
            atomic_write_json(self.manifest_path(stage.name), manifest)
        summary = stage.summary(result)
        self.echo(f"{tag}: {'done' if checked_ok else 'CHECK FAILED'} in {seconds:.1f} s (CPU {cpu:.0f} s)"
                  + (f"  {summary}" if summary else ""))
        record = StageRecord(stage.name, "ran" if checked_ok else "check failed", manifest)
        self.records[stage.name] = record
        return record
