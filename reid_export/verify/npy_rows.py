"""Rows of a memory-mapped ``.npy`` read with file reads instead of through the map.

A memory map keeps every page a pass has touched mapped into the process: over one streamed
evaluation the process's resident set grows to the whole gallery file (1 GB for 519,732 x 512
float32) and stays there, though each chunk is needed once. :class:`NpyRows` reads the rows a
chunk needs into a fresh array with ordinary reads; the file's pages then sit in the OS page
cache, which is not the process's memory (the kernel drops it under pressure), and the
process's memory is the chunk only. The values are the same bytes as the map's.
"""

from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np

from ..errors import ReidExportError


class NpyRows:
    """The rows of an [N, D] C-order array stored at ``offset`` of ``path`` (a ``.npy``'s data),
    read on demand: ``rows[a:b]`` and ``rows[index_array]`` return new arrays."""

    def __init__(self, path, offset: int, shape, dtype):
        self.path, self.offset = Path(path), int(offset)
        self.shape = (int(shape[0]), int(shape[1]))
        self.dtype = np.dtype(dtype)
        self.row_bytes = self.shape[1] * self.dtype.itemsize
        self._file = None

    @classmethod
    def of(cls, array):
        """``array`` as :class:`NpyRows` when it is a whole 2-D C-order memory map (``np.load(..., mmap_mode="r")``,
        ``np.memmap``); anything else (arrays, views of a map, other row sources) as it is."""
        # mode "c" (copy-on-write) may hold changes the file does not: keep reading those through the map
        if (isinstance(array, np.memmap) and isinstance(array.base, mmap.mmap) and array.ndim == 2
                and array.flags.c_contiguous and getattr(array, "filename", None) and array.mode != "c"):
            return cls(array.filename, array.offset, array.shape, array.dtype)
        return array

    def __len__(self) -> int:
        return self.shape[0]

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_file"] = None
        return state

    def _read_into(self, start: int, out: np.ndarray) -> None:
        if self._file is None:
            self._file = open(self.path, "rb", buffering=0)  # noqa: SIM115 (kept open across chunks)
        view = memoryview(out.reshape(-1).view(np.uint8))
        pos, done = self.offset + start * self.row_bytes, 0
        self._file.seek(pos)
        while done < len(view):
            n = self._file.readinto(view[done:])
            if not n:
                raise ReidExportError(f"{self.path}: the file ends before row {start + out.shape[0]} of "
                                      f"{self.shape[0]}; it was truncated, re-extract it")
            done += n

    def _rows(self, start: int, stop: int) -> np.ndarray:
        out = np.empty((stop - start, self.shape[1]), dtype=self.dtype)
        if stop > start:
            self._read_into(start, out)
        return out

    def __getitem__(self, index) -> np.ndarray:
        n = self.shape[0]
        if isinstance(index, (int, np.integer)):
            i = int(index) + n if index < 0 else int(index)
            if not 0 <= i < n:
                raise IndexError(f"row {index} out of range for {n} rows")
            return self._rows(i, i + 1)[0]
        if isinstance(index, slice):
            start, stop, step = index.indices(n)
            if step == 1:
                return self._rows(start, max(start, stop))
            index = np.arange(start, stop, step)
        index = np.asarray(index)
        if index.dtype == bool:
            index = np.flatnonzero(index)
        index = index.astype(np.int64, copy=False).reshape(-1)
        index = np.where(index < 0, index + n, index)
        if index.size and (index.min() < 0 or index.max() >= n):
            raise IndexError(f"row index out of range for {n} rows")
        if index.size == 0:
            return np.empty((0, self.shape[1]), dtype=self.dtype)
        uniq, inv = np.unique(index, return_inverse=True)
        out = np.empty((uniq.size, self.shape[1]), dtype=self.dtype)
        # one read per run of consecutive rows
        breaks = np.concatenate([[0], np.flatnonzero(np.diff(uniq) != 1) + 1, [uniq.size]])
        for a, b in zip(breaks[:-1].tolist(), breaks[1:].tolist()):
            self._read_into(int(uniq[a]), out[a:b])
        if uniq.size == index.size and (index.size < 2 or bool((np.diff(index) > 0).all())):
            return out
        return out[inv.reshape(-1)]

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
