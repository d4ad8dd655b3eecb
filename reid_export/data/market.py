"""Datasets in the Market-1501 layout.

A dataset root holds ``query/``, ``bounding_box_test/`` (the gallery) and, optionally,
``bounding_box_train/``; it may also sit one level down in ``Market-1501-v15.09.15/``.
Image names are ``PPPP_cCsS_FFFFFF_BB.jpg``: ``PPPP`` is the person id (``-1`` for junk,
``0000`` for distractors), ``C`` the camera (1-based in the name, 0-based here).

Junk images (pid -1) are dropped from every split; distractors (pid 0) are kept.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from reid_export.errors import ReidExportError, UsageError
from reid_export.preprocess import IMAGE_SUFFIXES, list_images

__all__ = [
    "MARKET_DIR",
    "SPLITS",
    "MarketDataset",
    "ReidItem",
    "find_market_root",
    "list_images",
    "load_split",
    "parse_name",
]

MARKET_DIR = "Market-1501-v15.09.15"
SPLITS = {"query": "query", "gallery": "bounding_box_test", "train": "bounding_box_train"}
_NAME_RE = re.compile(r"^(-?\d+)_c(\d+)")
_FIX = "point `dataset_root` at the folder that holds them"


@dataclass(frozen=True)
class ReidItem:
    """One image: its path, person id and 0-based camera id."""

    path: str
    pid: int
    camid: int


def parse_name(name: str) -> tuple[int, int] | None:
    """``(pid, 0-based camid)`` from a Market-style file name, or None if it does not match."""
    m = _NAME_RE.match(name)
    if m is None or int(m.group(2)) < 1:
        return None
    return int(m.group(1)), int(m.group(2)) - 1


def _holds_layout(folder: Path) -> bool:
    return (folder / "query").is_dir() and (folder / SPLITS["gallery"]).is_dir()


def find_market_root(root) -> Path:
    """The folder that holds ``query/`` and ``bounding_box_test/``: ``root`` itself or
    ``root/Market-1501-v15.09.15``.  Raises :class:`ReidExportError` when neither does."""
    root = Path(root).expanduser()
    for candidate in (root, root / MARKET_DIR):
        if _holds_layout(candidate):
            return candidate
    if not root.is_dir():
        raise ReidExportError(f"{root}: no such folder; point `dataset_root` at a folder in "
                              f"the Market-1501 layout (query/ and bounding_box_test/)")
    # Half a layout: name exactly what is missing.
    for candidate in (root, root / MARKET_DIR):
        present = [f for f in ("query", SPLITS["gallery"]) if (candidate / f).is_dir()]
        if len(present) == 1:
            missing = "query" if present[0] != "query" else SPLITS["gallery"]
            raise ReidExportError(
                f"{candidate / missing}: folder missing (a Market-1501 layout needs query/ and "
                f"bounding_box_test/ side by side); {_FIX}"
            )
    raise ReidExportError(
        f"{root}: no Market-1501 layout found (expected query/ and bounding_box_test/ in it or "
        f"in {root / MARKET_DIR}); {_FIX}"
    )


def _split_dir(root, split: str) -> Path:
    if split not in SPLITS:
        raise UsageError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    name = SPLITS[split]
    root = Path(root).expanduser()
    for base in (root, root / MARKET_DIR):
        if (base / name).is_dir():
            return base / name
    base = root / MARKET_DIR if (root / MARKET_DIR).is_dir() else root
    raise ReidExportError(
        f"{base / name}: {split} folder not found (Market-1501 layout: query/, "
        f"bounding_box_test/, bounding_box_train/); {_FIX}"
    )


def load_split(root, split: str, relabel: bool = False) -> list[ReidItem]:
    """Items of one split (``query``, ``gallery`` or ``train``) in file-name order.

    ``root`` is either form accepted by :func:`find_market_root`.  Junk (pid -1) is dropped,
    distractors (pid 0) are kept; files whose names do not parse are skipped with one
    warning.  ``relabel`` maps the pids to 0..K-1 in sorted pid order.  A missing split
    folder, or one without usable images, raises :class:`ReidExportError`.
    """
    folder = _split_dir(root, split)
    images = list_images(folder)
    if not images:
        raise ReidExportError(f"{folder}: no images ({' '.join(IMAGE_SUFFIXES)}) in the {split} folder")
    items: list[ReidItem] = []
    bad: list[str] = []
    for path in images:
        parsed = parse_name(path.name)
        if parsed is None:
            bad.append(path.name)
            continue
        pid, camid = parsed
        if pid == -1:
            continue
        items.append(ReidItem(str(path), pid, camid))
    if bad:
        warnings.warn(
            f"{folder}: skipped {len(bad)} file(s) whose names are not PPPP_cC... "
            f"(e.g. {bad[0]!r})",
            stacklevel=2,
        )
    if not items:
        raise ReidExportError(
            f"{folder}: none of its {len(images)} images is usable (all junk pid -1 or "
            f"unparsable names)"
        )
    if relabel:
        mapping = {pid: i for i, pid in enumerate(sorted({it.pid for it in items}))}
        items = [ReidItem(it.path, mapping[it.pid], it.camid) for it in items]
    return items


class MarketDataset:
    """A Market-1501-layout dataset: ``query`` and ``gallery`` are read on construction,
    ``train`` (pids relabelled to 0..K-1) on first access, since a test-only copy may lack
    ``bounding_box_train/``."""

    def __init__(self, root):
        self.root: Path = find_market_root(root)
        self.query: list[ReidItem] = load_split(self.root, "query")
        self.gallery: list[ReidItem] = load_split(self.root, "gallery")

    @cached_property
    def train(self) -> list[ReidItem]:
        """Training items with pids relabelled to 0..K-1 (raises if the folder is missing)."""
        return load_split(self.root, "train", relabel=True)

    @property
    def num_train_pids(self) -> int:
        """Number of identities in ``train``."""
        return len({it.pid for it in self.train})

    def __repr__(self) -> str:
        return (f"MarketDataset({str(self.root)!r}: {len(self.query)} query, "
                f"{len(self.gallery)} gallery)")
