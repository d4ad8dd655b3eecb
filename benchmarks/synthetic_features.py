"""Generated 512-d ReID features with a known structure, Market-1501+500k sized.

751 identities (Market-1501's test split) seen by 6 cameras: each identity has a unit-length
centre, a per-camera offset and per-image noise, so same-person features are close but not
equal and a camera changes them. Queries (3368, one to six per identity, cameras drawn) and
the identity part of the gallery (15,913 items with 2,793 pid-0 distractors, as Market's test
gallery without junk) follow that model; the extra distractors (pid 0) come from 20,000
look-alike identities drawn around the real centres plus unrelated faces, so they do compete
with the true matches. Everything is drawn from one seed in fixed blocks, so a row's value does
not depend on how the gallery is read.
"""

from __future__ import annotations

import numpy as np

DIM = 512
NUM_IDS = 751
NUM_CAMS = 6
NUM_QUERY = 3368
MARKET_GALLERY = 15_913
MARKET_DISTRACTORS = 2_793
FULL_GALLERY = 519_732
BLOCK = 8192


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


class SyntheticReid:
    def __init__(self, seed: int = 0, dim: int = DIM, noise: float = 1.6, cam_shift: float = 0.5):
        rng = np.random.default_rng(seed)
        self.seed, self.dim, self.noise, self.cam_shift = seed, dim, noise, cam_shift
        self.centres = _unit(rng.standard_normal((NUM_IDS, dim)))
        self.cam = _unit(rng.standard_normal((NUM_CAMS, dim))) * cam_shift
        self.lookalike_of = rng.integers(0, NUM_IDS, 20_000)
        self.lookalikes = _unit(self.centres[self.lookalike_of] + 1.2 * _unit(rng.standard_normal((20_000, dim))))
        # Queries: identity and camera.
        self.q_pids = np.sort(rng.integers(0, NUM_IDS, NUM_QUERY)) + 1
        self.q_cams = rng.integers(0, NUM_CAMS, NUM_QUERY)
        # Identity gallery: the rest of the 15,913 are distractors (pid 0).
        n_id = MARKET_GALLERY - MARKET_DISTRACTORS
        self.g_pids_id = np.concatenate([np.arange(1, NUM_IDS + 1), rng.integers(1, NUM_IDS + 1, n_id - NUM_IDS)])
        self.g_cams_id = rng.integers(0, NUM_CAMS, n_id)

    def _features(self, pids: np.ndarray, cams: np.ndarray, rng) -> np.ndarray:
        base = self.centres[pids - 1] + self.cam[cams]
        return _unit(base + self.noise * rng.standard_normal((pids.size, self.dim)) / np.sqrt(self.dim))

    def query(self):
        rng = np.random.default_rng([self.seed, 1])
        return self._features(self.q_pids, self.q_cams, rng), self.q_pids, self.q_cams

    def gallery_labels(self, size: int):
        n_id = self.g_pids_id.size
        pids = np.zeros(size, dtype=np.int64)
        cams = np.random.default_rng([self.seed, 2]).integers(0, NUM_CAMS, size)
        pids[:min(size, n_id)] = self.g_pids_id[:size]
        cams[:min(size, n_id)] = self.g_cams_id[:size]
        return pids, cams

    def gallery_block(self, b: int, size: int) -> np.ndarray:
        """Rows [b * BLOCK, min(size, (b + 1) * BLOCK)) of a gallery of ``size`` items."""
        pids, cams = self.gallery_labels(size)
        lo, hi = b * BLOCK, min(size, (b + 1) * BLOCK)
        rng = np.random.default_rng([self.seed, 3, b])
        p, c = pids[lo:hi], cams[lo:hi]
        out = np.empty((hi - lo, self.dim), dtype=np.float32)
        ident = p > 0
        if ident.any():
            out[ident] = self._features(p[ident], c[ident], rng)
        n = int((~ident).sum())
        if n:
            # Distractors: a look-alike of someone (70%) or an unrelated person (30%), seen by a camera.
            look = rng.random(n) < 0.7
            base = np.where(look[:, None], self.lookalikes[rng.integers(0, 20_000, n)],
                            _unit(rng.standard_normal((n, self.dim))))
            base = base + self.cam[c[~ident]]
            out[~ident] = _unit(base + self.noise * rng.standard_normal((n, self.dim)) / np.sqrt(self.dim))
        return out

    def gallery(self, size: int, out: np.ndarray | None = None) -> np.ndarray:
        out = np.empty((size, self.dim), dtype=np.float32) if out is None else out
        for b in range((size + BLOCK - 1) // BLOCK):
            out[b * BLOCK:(b + 1) * BLOCK] = self.gallery_block(b, size)
        return out
