"""fast-reid's two resizes on one model: Pillow bicubic (its evaluation transform, ``T.Resize(size,
interpolation=3)``, and its training transform) against OpenCV cubic (its demo predictor).

For each checkpoint (with ``--config`` for fast-reid files that lack one), on a Market-1501-layout
root: the features of query + gallery under each interpolation (``INPUT.INTERPOLATION`` through
``--opts``, the model otherwise as loaded), their relative L2 per image (median, max), and Rank-1/mAP
under each (cosine, no flip). Prints a table and writes JSON.

    python benchmarks/fastreid_interpolation.py ../shared/data/cuhk03-labeled/Market-1501-v15.09.15 \\
        --model /tmp/r18_cubic/model_final.pth --model golden/bot_R18/model_final.fp16.pth:golden/bot_R18/config.yaml \\
        -o fastreid_interpolation.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import common
from reid_export.checkpoint import load_model_from_checkpoint
from reid_export.data.market import load_split
from reid_export.preprocess import preprocess
from reid_export.verify.metrics import compute_distance, rank_metrics

MODES = ("cubic", "pil-bicubic")


def features(model, data_config, paths, batch=64) -> np.ndarray:
    out = []
    with torch.no_grad():
        for i in tqdm(range(0, len(paths), batch), desc=f"{data_config.interpolation}", leave=False):
            x = torch.from_numpy(preprocess(paths[i:i + batch], data_config))
            out.append(model(x).numpy())
    return np.concatenate(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("root", type=Path, help="Market-1501-layout folder (query/, bounding_box_test/)")
    ap.add_argument("--model", action="append", required=True,
                    help="CHECKPOINT or CHECKPOINT:CONFIG (repeatable)")
    ap.add_argument("-o", "--output", type=Path, required=True, help="JSON report")
    args = ap.parse_args(argv)
    query, gallery = load_split(args.root, "query"), load_split(args.root, "gallery")
    paths = [it.path for it in query] + [it.path for it in gallery]
    q = (np.array([it.pid for it in query]), np.array([it.camid for it in query]))
    g = (np.array([it.pid for it in gallery]), np.array([it.camid for it in gallery]))
    rows = []
    for spec in args.model:
        ckpt, _, config = spec.partition(":")
        feats = {}
        row = {"model": ckpt, "config": config or None}
        for mode in MODES:
            model, _, dc = load_model_from_checkpoint(ckpt, config or None, ["INPUT.INTERPOLATION", mode])
            start = time.time()
            f = features(model.eval(), dc, paths)
            feats[mode] = f
            dist = compute_distance(f[:len(query)], f[len(query):])
            m = rank_metrics(dist, q[0], g[0], q[1], g[1])
            row[mode] = {"Rank-1": m["Rank-1"], "mAP": m["mAP"], "seconds": round(time.time() - start, 1)}
            row["input"] = f"{dc.height}x{dc.width}"
        a, b = feats["cubic"], feats["pil-bicubic"]
        rel = np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)
        row["rel_l2_median"], row["rel_l2_max"] = float(np.median(rel)), float(rel.max())
        row["d_mAP_pil_minus_cubic"] = row["pil-bicubic"]["mAP"] - row["cubic"]["mAP"]
        rows.append(row)
    print(f"{'model':48s} {'input':>7s} {'relL2 med':>9s} {'max':>7s} {'mAP cubic':>9s} {'mAP pil':>8s} "
          f"{'R1 cubic':>8s} {'R1 pil':>7s}")
    for r in rows:
        print(f"{Path(r['model']).parent.name + '/' + Path(r['model']).name:48.48s} {r['input']:>7s} "
              f"{r['rel_l2_median']:9.4f} {r['rel_l2_max']:7.4f} {r['cubic']['mAP']:9.2f} "
              f"{r['pil-bicubic']['mAP']:8.2f} {r['cubic']['Rank-1']:8.2f} {r['pil-bicubic']['Rank-1']:7.2f}")
    report = {"root": str(args.root), "num_query": len(query), "num_gallery": len(gallery), "rows": rows}
    common.write_json(args.output, report, command=common.command_line(__file__, argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
