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
import json
import sys
from pathlib import Path

import common
from common import DATA, REPO

DEPLOYMENTS = ("deepstream", "deepstream-stretch", "bilinear", "deepstream-folded")


def reid_export(*args) -> int:
    return common.run_step(*args).returncode


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--dataset-root", type=Path, default=DATA / "cuhk03-labeled")
    parser.add_argument("--workdir", type=Path, default=REPO / "work" / "deployment-cost")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    doc = {"loadavg_before": common.load_average(), "dataset": str(args.dataset_root), "models": []}
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
            crops = DATA / "parity-images"
            if crops.exists() and reid_export("parity", model, onnx, "--images", crops, "--no-progress") != 0:
                print(f"{onnx}: does not compute {model}'s features; not measuring it", file=sys.stderr)
                return 1
        if reid_export("deepstream", onnx, "-o", out) != 0:
            print(f"{model}: the deepstream self-check failed", file=sys.stderr)
            return 1
        folded = out / f"{onnx.stem}.deepstream.onnx"
        eval_opts = ["--dataset-root", args.dataset_root, "--batch-size", args.batch_size, "--no-progress"]
        deps = [a for d in DEPLOYMENTS for a in ("--deployment", d)]
        rc_own = reid_export("eval", onnx, *deps, *eval_opts, "--report", out / "eval.json")
        rc_folded = reid_export("eval", folded, "--deployment", "deepstream-folded", *eval_opts,
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
    doc["loadavg_after"] = common.load_average()
    doc = json.loads(common.write_json(args.workdir / "deployment_cost.json", doc,
                                       command=common.command_line(__file__, argv)).read_text())
    print(f"\n{doc['date']}, load {common.format_load(doc['loadavg_before'])} -> "
          f"{common.format_load(doc['loadavg_after'])}, flags {' '.join(doc['cpu_flags'])}")
    print("| model | file | preprocessing | Rank-1 | mAP | mINP | cost Rank-1 | cost mAP |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for name, r in rows:
        cost = lambda k: "-" if r.get(k) is None else f"{r[k]:.2f}"  # noqa: E731
        print(f"| {name} | {Path(r['model'].rpartition('@')[0] or r['model']).name} | {r['deployment'] or 'own'} | "
              f"{r['Rank-1']:.2f} | {r['mAP']:.2f} | {r['mINP']:.2f} | {cost('cost_Rank-1')} | {cost('cost_mAP')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
