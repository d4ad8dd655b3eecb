"""The PK identity sampler: batches of P identities x K images (fast-reid's NaiveIdentitySampler).

fast-reid draws from one infinite stream seeded once; here each epoch's batches are a pure
function of (seed, epoch), so a resumed run draws exactly the batches the uninterrupted run
would have drawn, and every sample also carries its own augmentation seed
(seed, epoch, batch, position), so augmentation does not depend on which worker decodes it.

Within a pass, every identity's images are shuffled (identities with fewer than K images are
filled up by drawing with replacement) and dealt K at a time; each batch takes P identities
that still have K undealt images, without replacement. Passes repeat until the epoch has its
``len(dataset) // batch_size`` batches (fast-reid's iterations per epoch).

Under torchrun, :class:`DistributedBatchSampler` gives rank ``r`` of ``N`` the ``r``-th of ``N`` equal
slices of every global batch: each rank draws the same global batches from the same seed (no
communication), the slices hold whole identities (a PK batch is laid out identity by identity),
and each sample keeps the augmentation seed of its position in the global batch, so the N
processes together see exactly the images, and the augmented pixels, of one process.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import numpy as np

from reid_export.errors import ReidExportError


class PKBatchSampler:
    """Yields lists of ``(index, augmentation seed)``; set ``.epoch`` before iterating."""

    def __init__(self, labels: Sequence[int], batch_size: int, num_instances: int, seed: int):
        if num_instances < 1 or batch_size < num_instances or batch_size % num_instances:
            raise ReidExportError(
                f"SOLVER.IMS_PER_BATCH ({batch_size}) must be a positive multiple of "
                f"DATALOADER.NUM_INSTANCE ({num_instances})"
            )
        self.batch_size = batch_size
        self.num_instances = num_instances
        self.num_pids = batch_size // num_instances
        self.seed = int(seed)
        self.epoch = 0
        index = defaultdict(list)
        for i, label in enumerate(labels):
            index[int(label)].append(i)
        self.index = {pid: np.asarray(idx, dtype=np.int64) for pid, idx in sorted(index.items())}
        self.pids = np.asarray(list(self.index), dtype=np.int64)
        if len(self.pids) < self.num_pids:
            raise ReidExportError(
                f"the training set has {len(self.pids)} identities, fewer than the {self.num_pids} a batch "
                f"needs (SOLVER.IMS_PER_BATCH / DATALOADER.NUM_INSTANCE); lower SOLVER.IMS_PER_BATCH"
            )
        self.num_batches = max(len(labels) // batch_size, 1)

    def __len__(self) -> int:
        return self.num_batches

    def batches(self, epoch: int) -> list[list[int]]:
        """The index batches of ``epoch`` (deterministic)."""
        rng = np.random.default_rng([self.seed, int(epoch), 0x5EED])
        out: list[list[int]] = []
        while len(out) < self.num_batches:
            groups = {}
            for pid, idx in self.index.items():
                if len(idx) < self.num_instances:
                    idx = rng.choice(idx, size=self.num_instances, replace=True)
                idx = rng.permutation(idx)
                groups[pid] = [idx[i:i + self.num_instances].tolist()
                               for i in range(0, len(idx) - self.num_instances + 1, self.num_instances)]
            available = [pid for pid in self.pids.tolist() if groups[pid]]
            while len(available) >= self.num_pids and len(out) < self.num_batches:
                chosen = rng.choice(len(available), size=self.num_pids, replace=False)
                batch = []
                for j in sorted(chosen.tolist()):
                    batch.extend(groups[available[j]].pop())
                # keep the draw order deterministic: pids drop out only after the batch is made
                available = [pid for pid in available if groups[pid]]
                out.append(batch)
        return out

    def __iter__(self):
        epoch = self.epoch
        for b, batch in enumerate(self.batches(epoch)):
            yield [(index, (self.seed, epoch, b, pos)) for pos, index in enumerate(batch)]


class RandomBatchSampler(PKBatchSampler):
    """fast-reid's TrainingSampler: a random permutation per epoch, no identity balancing."""

    def __init__(self, labels: Sequence[int], batch_size: int, seed: int):
        if batch_size < 1:
            raise ReidExportError(f"SOLVER.IMS_PER_BATCH must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.seed = int(seed)
        self.epoch = 0
        self.num_items = len(labels)
        self.num_batches = max(len(labels) // batch_size, 1)

    def batches(self, epoch: int) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, int(epoch), 0x5EED])
        order: list[int] = []
        while len(order) < self.num_batches * self.batch_size:
            order += rng.permutation(self.num_items).tolist()
        return [order[b * self.batch_size:(b + 1) * self.batch_size] for b in range(self.num_batches)]


class DistributedBatchSampler:
    """Rank ``rank``'s slice of every global batch of ``base`` (``base.epoch`` is set through ``.epoch``)."""

    def __init__(self, base: PKBatchSampler, world_size: int, rank: int):
        if base.batch_size % world_size:
            raise ReidExportError(f"the world size ({world_size}) must divide SOLVER.IMS_PER_BATCH ({base.batch_size})")
        per_rank = base.batch_size // world_size
        k = getattr(base, "num_instances", None)
        if k and per_rank % k:
            raise ReidExportError(
                f"the world size ({world_size}) must divide the {base.batch_size // k} identities of a batch "
                f"(SOLVER.IMS_PER_BATCH / DATALOADER.NUM_INSTANCE) so that each process gets whole identities")
        self.base, self.world_size, self.rank, self.per_rank = base, int(world_size), int(rank), per_rank
        self.batch_size = base.batch_size

    @property
    def epoch(self) -> int:
        return self.base.epoch

    @epoch.setter
    def epoch(self, value: int) -> None:
        self.base.epoch = value

    def __len__(self) -> int:
        return len(self.base)

    def __iter__(self):
        lo, hi = self.rank * self.per_rank, (self.rank + 1) * self.per_rank
        for batch in self.base:
            yield batch[lo:hi]


IDENTITY_SAMPLERS = ("NaiveIdentitySampler", "BalancedIdentitySampler")


def build_batch_sampler(cfg, labels: Sequence[int], seed: int, log=None, world_size: int = 1, rank: int = 0):
    """The sampler DATALOADER.SAMPLER_TRAIN names; with ``world_size > 1`` this rank's slice of it."""
    base = _build_global_sampler(cfg, labels, seed, log)
    if world_size > 1:
        return DistributedBatchSampler(base, world_size, rank)
    return base


def _build_global_sampler(cfg, labels: Sequence[int], seed: int, log=None) -> PKBatchSampler:
    name = cfg.DATALOADER.SAMPLER_TRAIN
    batch_size = int(cfg.SOLVER.IMS_PER_BATCH)
    if name in IDENTITY_SAMPLERS:
        if name == "BalancedIdentitySampler" and log is not None:
            log.warning("DATALOADER.SAMPLER_TRAIN BalancedIdentitySampler: using the NaiveIdentitySampler "
                        "PK strategy (camera balancing is not implemented)")
        return PKBatchSampler(labels, batch_size, int(cfg.DATALOADER.NUM_INSTANCE), seed)
    if name == "TrainingSampler":
        return RandomBatchSampler(labels, batch_size, seed)
    raise ReidExportError(
        f"DATALOADER.SAMPLER_TRAIN {name!r} is not supported; use NaiveIdentitySampler (PK batches, "
        "needed by the triplet loss) or TrainingSampler"
    )
