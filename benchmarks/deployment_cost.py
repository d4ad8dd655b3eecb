#!/usr/bin/env python3
"""What a deployment's preprocessing costs a model in Rank-1/mAP (issue 19).

    python benchmarks/deployment_cost.py MODEL [MODEL ...] [--dataset-root ../shared/data/cuhk03-labeled]
                                        [--workdir work/deployment-cost]

For each MODEL (an annotated ONNX, or a checkpoint that is exported to ONNX first):
1. ``reid-export deepstream MODEL -o WORKDIR/NAME/``: the folded ONNX (exact normalisation,
   offsets 0, netScaleFactor 1) and its tracker ReID section, with the self-check;
2. ``reid-export eval MODEL --deployment deepstream --deployment deepstream-stretch
   --deployment bilinear --deployment deepstream-folded``: the model's own preprocessing against
   DeepStream's keepAspc letterbox + NVIDIA's scalar normalisation, the stretched variant, a plain
   bilinear resize, and the letterbox with the exact normalisation;
3. ``reid-export eval FOLDED --deployment deepstream-folded``: the folded file itself, fed as
   DeepStream feeds it (letterbox, 0..255), to show it scores what step 2 simulated.

Prints the rows for benchmarks/RESULTS.md and writes WORKDIR/deployment_cost.json. The eval
deployment gates are the defaults (1 mAP point, 2 Rank-1 points); a failing gate is recorded,
not hidden. The load average is recorded before and after: the machine is shared.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEPLOYMENTS = ("deepstream", "deepstream-stretch", "bilinear", "deepstream-folded")


def reid_export(*args: str) -> int:
    cmd = [sys.executable, "-m", "reid_export.cli.main", *map(str, args)]
    print("$ reid-export " + " ".join(map(str, args)), flush=True)
    return subprocess.run(cmd, cwd=REPO).returncode


def loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return "unknown"


def cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if f in have]
    except OSError:
        pass
    return []


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--dataset-root", type=Path, default=REPO.parent / "shared" / "data" / "cuhk03-labeled")
    parser.add_argument("--workdir", type=Path, default=REPO / "work" / "deployment-cost")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    doc = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": platform.node(),
           "cpu_count": os.cpu_count(), "cpu_flags": cpu_flags(), "loadavg_before": loadavg(),
           "dataset": str(args.dataset_root), "models": []}
    rows = []
    for model in args.models:
        name = model.name.split(".")[0]
        out = args.workdir / name
        out.mkdir(parents=True, exist_ok=True)
        onnx = model
        if model.suffix.lower() in (".pth", ".pt"):
            onnx = out / f"{name}.onnx"
            if reid_export("onnx", model, "-o", onnx) != 0:
                return 1
            crops = REPO.parent / "shared" / "data" / "parity-images"
            if crops.exists() and reid_export("parity", model, onnx, "--images", crops, "--no-progress") != 0:
                print(f"{onnx}: does not compute {model}'s features; not measuring it", file=sys.stderr)
                return 1
        if reid_export("deepstream", onnx, "-o", out) != 0:
            print(f"{model}: the deepstream self-check failed", file=sys.stderr)
            return 1
        folded = out / f"{onnx.stem}.deepstream.onnx"
        common = ["--dataset-root", args.dataset_root, "--batch-size", args.batch_size, "--no-progress"]
        deps = [a for d in DEPLOYMENTS for a in ("--deployment", d)]
        rc_own = reid_export("eval", onnx, *deps, *common, "--report", out / "eval.json")
        rc_folded = reid_export("eval", folded, "--deployment", "deepstream-folded", *common,
                                "--report", out / "eval_folded.json")
        evals = [json.loads((out / "eval.json").read_text()), json.loads((out / "eval_folded.json").read_text())]
        entry = {"model": str(model), "onnx": str(onnx), "folded": str(folded), "eval_exit": rc_own,
                 "eval_folded_exit": rc_folded, "rows": []}
        for doc_eval in evals:
            for res in doc_eval["models"]:
                row = {k: res.get(k) for k in ("model", "deployment", "Rank-1", "mAP", "mINP", "cost_Rank-1", "cost_mAP")}
                entry["rows"].append(row)
                rows.append((name, row))
        entry["failures"] = evals[0]["failures"] + evals[1]["failures"]
        doc["models"].append(entry)
    doc["loadavg_after"] = loadavg()
    (args.workdir / "deployment_cost.json").write_text(json.dumps(doc, indent=2))
    print(f"\n{doc['date']}, load {doc['loadavg_before']} -> {doc['loadavg_after']}, flags {' '.join(doc['cpu_flags'])}")
    print("| model | file | preprocessing | Rank-1 | mAP | mINP | cost Rank-1 | cost mAP |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for name, r in rows:
        cost = lambda k: "-" if r.get(k) is None else f"{r[k]:.2f}"  # noqa: E731
        print(f"| {name} | {Path(r['model'].rpartition('@')[0] or r['model']).name} | {r['deployment'] or 'own'} | "
              f"{r['Rank-1']:.2f} | {r['mAP']:.2f} | {r['mINP']:.2f} | {cost('cost_Rank-1')} | {cost('cost_mAP')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
