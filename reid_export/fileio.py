"""Atomic output files: write to a temporary file beside the target, then rename.

A killed process, a full disk or an exception never leaves a half-written model, engine,
feature matrix or report under the requested name; an existing file stays as it was.
The final file gets the mode a plain ``open(path, "w")`` would give it (an existing file's mode,
else 0666 less the umask), not ``mkstemp``'s private 0600: a serving container or another user
must be able to read a model or a report.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import IO, Iterator

from .errors import ReidExportError


def check_output_path(path: str | Path) -> Path:
    """Fail early, with the fix, when ``path`` cannot be written."""
    path = Path(path).expanduser()
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise ReidExportError(f"{path}: is a directory; give a file name for the output")
    if not parent.exists():
        raise ReidExportError(f"{path}: output folder {parent} does not exist; create it first")
    if not parent.is_dir():
        raise ReidExportError(f"{path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK):
        raise ReidExportError(f"{path}: output folder {parent} is not writable; choose another -o path")
    # os.access trusts the mode bits, which do not stop root, and knows nothing of read-only mounts
    # of some file systems, ACLs or quotas: create (and remove) a file to be sure, before any work.
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=parent)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise ReidExportError(f"{path}: output folder {parent} is not writable "
                                  f"({exc.strerror}); choose another -o path") from None
        raise _write_error(path, exc) from None
    os.close(fd)
    _remove(probe)
    return path


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _final_mode(path: Path) -> int:
    """The permission bits ``open(path, "w")`` would leave: kept for an existing file, else 0666 & ~umask."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return 0o666 & ~_current_umask()


def _mkstemp_for(path: Path) -> tuple[int, str]:
    """A temporary file beside ``path`` that already has ``path``'s final mode."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _final_mode(path))
    except BaseException:
        os.close(fd)
        _remove(tmp)
        raise
    return fd, tmp


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """``with atomic_open(p) as f: f.write(...)``: ``p`` appears complete or not at all."""
    path = check_output_path(path)
    tmp = None
    try:
        fd, tmp = _mkstemp_for(path)
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        _remove(tmp)
        raise _write_error(path, exc) from None
    except BaseException:
        _remove(tmp)
        raise


def _write_error(path: Path, exc: OSError) -> ReidExportError:
    if exc.errno == errno.ENOSPC:
        return ReidExportError(f"{path}: no space left on the device; free space and run again")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return ReidExportError(f"{path}: permission denied; choose another -o path")
    return ReidExportError(f"{path}: could not be written ({exc.strerror or exc})")


def atomic_write_files(files: dict[str | Path, bytes]) -> list[Path]:
    """Write several files that belong together (features and their file list): every one is
    written and synced to a temporary file first, and only then are they renamed into place, so
    a full disk or an error leaves all the old files as they were."""
    pending: list[tuple[str, Path]] = []
    try:
        for target, data in files.items():
            path = check_output_path(target)
            try:
                fd, tmp = _mkstemp_for(path)
                pending.append((tmp, path))
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
            except OSError as exc:
                raise _write_error(path, exc) from None
        for tmp, path in pending:
            try:
                os.replace(tmp, path)
            except OSError as exc:
                raise _write_error(path, exc) from None
    except BaseException:
        for tmp, _ in pending:
            _remove(tmp)
        raise
    return [path for _, path in pending]


def _remove(tmp: str | None) -> None:
    if tmp is not None:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_open(path, "wb") as handle:
        handle.write(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj):
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def check_input_file(path: str | Path, what: str = "file") -> Path:
    """A readable, non-empty regular file, or one clear error."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ReidExportError(f"{path}: {what} not found; check the path")
    if path.is_dir():
        raise ReidExportError(f"{path}: is a directory, expected a {what}")
    if path.stat().st_size == 0:
        raise ReidExportError(f"{path}: {what} is empty (0 bytes); re-create or re-download it")
    if not os.access(path, os.R_OK):
        raise ReidExportError(f"{path}: {what} is not readable; check its permissions")
    return path
