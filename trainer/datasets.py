"""Where the datasets are, and the training set as a torch Dataset.

The root is DATASETS.ROOT, else the environment variable ``REID_DATASETS`` (``FASTREID_DATASETS``
is read too), else ``datasets`` (fast-reid's default). A name in DATASETS.NAMES / DATASETS.TESTS
is looked up as the first of these folders under the root that holds a Market-1501 layout
(``bounding_box_train/``, ``query/``, ``bounding_box_test/``, directly or in
``Market-1501-v15.09.15/``):

=============  =============================================================================
name           folders tried under the root (then the name itself)
=============  =============================================================================
Market1501     ``Market-1501-v15.09.15``, ``market1501``, ``Market1501``
CUHK03         ``cuhk03-labeled``, ``cuhk03-detected``, ``cuhk03``, ``CUHK03``
DukeMTMC       ``DukeMTMC-reID``, ``dukemtmc``, ``DukeMTMC``
=============  =============================================================================

Any other name is a folder under the root (e.g. ``cuhk03-labeled``) or an absolute path. So the
real CUHK03 crops in ``../shared/data/cuhk03-labeled`` are ``DATASETS.ROOT ../shared/data`` with
either ``CUHK03`` or ``cuhk03-labeled``. fast-reid's own CUHK03 reader (the .mat release with
its 767/700 split) is not supported: the data must be in the Market-1501 layout.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from reid_export.data.market import MARKET_DIR, ReidItem, load_split
from reid_export.errors import ReidExportError

KNOWN_FOLDERS = {
    "Market1501": ("Market-1501-v15.09.15", "market1501", "Market1501"),
    "CUHK03": ("cuhk03-labeled", "cuhk03-detected", "cuhk03", "CUHK03"),
    "DukeMTMC": ("DukeMTMC-reID", "dukemtmc", "DukeMTMC"),
}


def datasets_root(cfg) -> Path:
    root = cfg.DATASETS.ROOT or os.environ.get("REID_DATASETS") or os.environ.get("FASTREID_DATASETS") or "datasets"
    return Path(root).expanduser()


def _has_split(folder: Path, split_dir: str) -> bool:
    return (folder / split_dir).is_dir() or (folder / MARKET_DIR / split_dir).is_dir()


def resolve_dataset(name: str, root: Path, split_dir: str = "bounding_box_train") -> Path:
    """The folder of dataset ``name`` holding ``split_dir`` (see the module doc for the mapping)."""
    candidates = []
    if Path(name).expanduser().is_absolute():
        candidates.append(Path(name).expanduser())
    else:
        candidates += [root / folder for folder in KNOWN_FOLDERS.get(name, ())]
        candidates.append(root / name)
    for folder in candidates:
        if _has_split(folder, split_dir):
            return folder
    tried = ", ".join(str(c) for c in candidates)
    raise ReidExportError(
        f"dataset {name!r}: no Market-1501-layout folder with {split_dir}/ found (tried {tried}); "
        "set DATASETS.ROOT (or REID_DATASETS) to the folder that holds it"
    )


def load_train_items(cfg) -> tuple[list[ReidItem], list[str]]:
    """Training items of every DATASETS.NAMES entry, pids relabelled to one 0..K-1 range."""
    root = datasets_root(cfg)
    items: list[ReidItem] = []
    sources = []
    names = list(cfg.DATASETS.NAMES)
    if not names:
        raise ReidExportError("DATASETS.NAMES is empty; name the training dataset(s)")
    for name in names:
        folder = resolve_dataset(name, root, "bounding_box_train")
        part = load_split(folder, "train", relabel=True)
        offset = 1 + max((it.pid for it in items), default=-1)
        items += [ReidItem(it.path, it.pid + offset, it.camid) for it in part]
        sources.append(str(folder))
    return items, sources


class TrainSet(Dataset):
    """``dataset[(index, seed)] -> (image [3, H, W] float32, pid, camid)``; the seed drives augmentation."""

    def __init__(self, items: list[ReidItem], transform):
        self.items = items
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key):
        index, seed = key
        item = self.items[index]
        rng = np.random.default_rng(list(seed))
        return self.transform(item.path, rng), item.pid, item.camid

    @property
    def num_classes(self) -> int:
        return 1 + max(it.pid for it in self.items)


def collate(batch):
    images, pids, camids = zip(*batch)
    return (torch.from_numpy(np.stack(images)), torch.as_tensor(pids, dtype=torch.long),
            torch.as_tensor(camids, dtype=torch.long))


def worker_init(_worker_id: int) -> None:
    """Workers only decode and augment: one thread each, so they do not fight the training threads."""
    import cv2

    cv2.setNumThreads(1)
    torch.set_num_threads(1)
