"""Which crops calibrate and which judge: the calibration images, the held-out images of the gate and,
when the names carry identities, whole held-out people scored for retrieval.

Calibration and the accuracy gate never share a file. When every calibration file carries a
Market-1501 name (the usual case: users calibrate on their training folder), whole identities are
held out, so the gate's images and the retrieval check (:class:`HeldOut`) show people the
calibration never saw.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ...errors import UsageError
from ...preprocess import expand_image_paths

HELD_OUT_IMAGES = 384  # images of held-out identities (~40 people of a Market-style training folder)


@dataclass
class HeldOut:
    """Whole identities held out of calibration (Market-1501 names): the images and their labels, and
    which are queries (per identity and camera the first image; every query keeps a match from
    another camera)."""

    paths: list[Path]
    pids: np.ndarray
    camids: np.ndarray
    is_query: np.ndarray

    @property
    def identities(self) -> int:
        return int(len(np.unique(self.pids)))


@dataclass
class ImageSplit:
    """The outcome of :func:`select_split`: the calibration images, the gate's held-out images, and the
    held-out identities (None when the names carry none)."""

    calibration: list[Path]
    held_out: list[Path]
    identities: HeldOut | None
    available: int  # images in the calibration folders

    def record(self, calib_dirs, val_dirs, requested: int, seed: int) -> tuple[dict, dict]:
        """The ``calibration`` and ``held_out`` entries of the search record."""
        return ({"sources": [str(d) for d in calib_dirs], "images": len(self.calibration), "requested": requested,
                 "seed": seed, "files_sha256": file_list_digest(self.calibration)},
                {"sources": [str(d) for d in (val_dirs or calib_dirs)], "images": len(self.held_out),
                 "files_sha256": file_list_digest(self.held_out),
                 "identities": None if self.identities is None else self.identities.identities})


def select_calibration_images(dirs: Sequence[str | Path], size: int, seed: int,
                              log: Callable[[str], None]) -> list[Path]:
    """``size`` images drawn (by ``seed``) from the folders/files given, or all there are, said so."""
    if size < 1:
        raise UsageError(f"`calib_size` must be >= 1, got {size}")
    paths = list(dict.fromkeys(expand_image_paths(dirs)))
    where = ", ".join(str(d) for d in dirs)
    if len(paths) < size:
        log(f"calibration: {where} holds {len(paths)} images, fewer than `calib_size` {size}; using all {len(paths)}")
        return paths
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(paths), size=size, replace=False).tolist())
    log(f"calibration: {size} of the {len(paths)} images in {where} (seed {seed})")
    return [paths[i] for i in chosen]


def select_images(calib_dirs: Sequence[str | Path], calib_size: int, val_dirs: Sequence[str | Path], val_size: int,
                  seed: int, log: Callable[[str], None]) -> tuple[list[Path], list[Path]]:
    """(calibration images, held-out images): never the same file in both (see :func:`select_split`)."""
    split = select_split(calib_dirs, calib_size, val_dirs, val_size, seed, log)
    return split.calibration, split.held_out


def select_split(calib_dirs: Sequence[str | Path], calib_size: int, val_dirs: Sequence[str | Path], val_size: int,
                 seed: int, log: Callable[[str], None]) -> ImageSplit:
    """The calibration images, the held-out images of the gate, and the held-out identities (or None).

    Without ``val_dirs`` the held-out images come from the calibration folders. When every file
    there carries a Market-1501 name and enough people were seen by two cameras, whole identities
    are held out (drawn by ``seed`` until about ``HELD_OUT_IMAGES`` images, leaving ``calib_size``
    for calibration): the gate's ``val_size`` images are drawn from them, and all of their images
    form a small retrieval test (:class:`HeldOut`). Otherwise ``val_size`` images (a quarter when
    the folders hold fewer than ``calib_size + val_size``, at least 2) are drawn first by ``seed``;
    the calibration images are drawn from the rest.
    """
    if calib_size < 1 or val_size < 2:
        raise UsageError(f"`calib_size` must be >= 1 and `val_size` >= 2, got {calib_size} and {val_size}")
    paths = list(dict.fromkeys(expand_image_paths(calib_dirs)))
    where = ", ".join(str(d) for d in calib_dirs)
    rng = np.random.default_rng(seed)
    order = [paths[i] for i in rng.permutation(len(paths))]
    held_out = None
    if val_dirs:
        val_all = [p for p in dict.fromkeys(expand_image_paths(val_dirs)) if p not in set(paths)]
        vwhere = ", ".join(str(d) for d in val_dirs)
        if len(val_all) < 2:
            raise UsageError(f"`val_dirs` {vwhere}: holds {len(val_all)} images that are not calibration images; "
                             "the accuracy gate needs at least 2")
        val = sorted(val_all[i] for i in np.random.default_rng(seed).permutation(len(val_all))[:val_size])
        calib = sorted(order[:calib_size])
        vnote = f"{len(val)} of the {len(val_all)} images in {vwhere}"
    else:
        held_out = _held_out_identities(paths, calib_size, val_size, seed)
        if held_out is not None:
            pool = set(held_out.paths)
            picked = np.random.default_rng(seed).permutation(len(held_out.paths))[:val_size]
            val = sorted(held_out.paths[i] for i in picked)
            calib = sorted([p for p in order if p not in pool][:calib_size])
            vnote = (f"{len(val)} images of {held_out.identities} people held out of calibration (all "
                     f"{len(held_out.paths)} of their images also score Rank-1/mAP)")
        else:
            n_val = val_size if len(paths) >= calib_size + val_size else max(2, len(paths) // 4)
            if len(paths) - n_val < 1:
                raise UsageError(f"`calib_dirs` {where}: holds {len(paths)} images; calibration and the held-out "
                                 "accuracy check need at least 3 (or give `val_dirs`)")
            val = sorted(order[:n_val])
            calib = sorted(order[n_val:n_val + calib_size])
            vnote = f"{len(val)} other images from the same folders"
    if len(calib) < calib_size:
        log(f"calibration: {where} holds {len(paths)} images, fewer than `calib_size` {calib_size} plus the held-out "
            f"ones; using {len(calib)}")
    else:
        log(f"calibration: {len(calib)} of the {len(paths)} images in {where} (seed {seed})")
    log(f"accuracy gate: measured on {vnote}, held out from calibration")
    return ImageSplit(calib, val, held_out, len(paths))


def _held_out_identities(paths: list[Path], calib_size: int, val_size: int, seed: int) -> HeldOut | None:
    """Whole identities (Market-1501 names, seen by two or more cameras) drawn by ``seed`` until about
    ``HELD_OUT_IMAGES`` images (at least ``val_size``; no more than leaves ``calib_size`` to calibrate
    on); None when the names are not Market's or too few people qualify."""
    from ...data.market import parse_name

    by_id: dict[int, dict[int, list[Path]]] = {}
    for path in paths:
        parsed = parse_name(path.name)
        if parsed is None:
            return None
        if parsed[0] > 0:  # junk (-1) and distractors (0) are never held out as people
            by_id.setdefault(parsed[0], {}).setdefault(parsed[1], []).append(path)
    eligible = sorted(pid for pid, cams in by_id.items() if len(cams) >= 2)
    budget = min(max(HELD_OUT_IMAGES, val_size), len(paths) - calib_size)
    chosen, count = [], 0
    for i in np.random.default_rng(seed).permutation(len(eligible)):
        if count >= budget:
            break
        size = sum(len(v) for v in by_id[eligible[i]].values())
        if count + size > budget and count >= val_size:
            continue
        chosen.append(eligible[i])
        count += size
    if len(chosen) < 2 or count < val_size:
        return None
    rows = []
    for pid in sorted(chosen):
        cams = by_id[pid]
        picked = {c: sorted(ps)[0] for c, ps in cams.items() if len(ps) >= 2}
        if not picked:
            c = max(sorted(cams), key=lambda c: len(cams[c]))
            picked = {c: sorted(cams[c])[0]}
        queries = set(picked.values())
        rows += [(p, pid, c, p in queries) for c, ps in sorted(cams.items()) for p in sorted(ps)]
    return HeldOut([r[0] for r in rows], np.array([r[1] for r in rows]), np.array([r[2] for r in rows]),
                   np.array([r[3] for r in rows], bool))


def file_list_digest(paths: Sequence[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(str(path.name).encode("utf-8") + b"\n")
    return digest.hexdigest()
