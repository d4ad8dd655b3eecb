"""Write generated features as ``extract`` outputs: Q.npy/Q.json and G_<size>.npy/G_<size>.json.

The features are benchmarks/synthetic_features.py's; the ``.json`` beside each ``.npy`` lists
Market-1501-style file names (``PPPP_cCs1_NNNNNN_00.jpg`` under a dataset path, pid 0000 for the
distractors), as ``reid-export extract`` writes them, so that

    reid-export eval --query-features Q.npy --gallery-features G_519732.npy

parses persons and cameras from the names. The gallery is written block by block into a
memory-mapped ``.npy`` (never whole in memory).

    python benchmarks/feature_files.py --workdir /tmp/feats --gallery-size 519732
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from synthetic_features import BLOCK, FULL_GALLERY, SyntheticReid


def market_names(pids: np.ndarray, cams: np.ndarray, folder: str) -> list[str]:
    return [f"{folder}/{p:04d}_c{c + 1}s1_{i:06d}_00.jpg" for i, (p, c) in enumerate(zip(pids.tolist(), cams.tolist()))]


def write_json(path: Path, files: list[str], rows: int, dim: int) -> None:
    meta = {"model": "synthetic", "backend": "synthetic", "precision": "fp32", "normalized": True,
            "shape": [rows, dim], "data_config": None, "files": files}
    path.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def write_query(work: Path, synth: SyntheticReid, noise: float = 0.0) -> Path:
    """Q.npy; with ``noise`` > 0 Q_noise<noise>.npy: every query moved by that much extra isotropic noise
    (unit length again), so that many positives rank deep and the streamed pass keeps many items."""
    qf, q_pids, q_cams = synth.query()
    path = work / ("Q.npy" if noise <= 0 else f"Q_noise{noise:g}.npy")
    if noise > 0:
        rng = np.random.default_rng([synth.seed, 7])
        qf = qf + noise * rng.standard_normal(qf.shape).astype(np.float32) / np.sqrt(synth.dim)
        qf = (qf / np.linalg.norm(qf, axis=1, keepdims=True)).astype(np.float32)
    if not path.exists():
        np.save(path, qf)
        write_json(path.with_suffix(".json"), market_names(q_pids, q_cams, "/data/Market-1501/query"), *qf.shape)
    return path


def write_gallery(work: Path, synth: SyntheticReid, size: int) -> Path:
    path = work / f"G_{size}.npy"
    if path.exists() and path.with_suffix(".json").exists():
        return path
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(size, synth.dim))
    for b in range((size + BLOCK - 1) // BLOCK):
        mm[b * BLOCK:(b + 1) * BLOCK] = synth.gallery_block(b, size)
    mm.flush()
    del mm
    g_pids, g_cams = synth.gallery_labels(size)
    write_json(path.with_suffix(".json"), market_names(g_pids, g_cams, "/data/Market-1501/bounding_box_test"),
               size, synth.dim)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--gallery-size", type=int, action="append",
                    help=f"gallery rows (repeatable; default {FULL_GALLERY})")
    ap.add_argument("--query-noise", type=float, default=0.0,
                    help="also write Q_noise<X>.npy: harder queries (extra noise of that norm)")
    args = ap.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    synth = SyntheticReid()
    print(write_query(args.workdir, synth))
    if args.query_noise > 0:
        print(write_query(args.workdir, synth, args.query_noise))
    for size in args.gallery_size or [FULL_GALLERY]:
        print(write_gallery(args.workdir, synth, size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
