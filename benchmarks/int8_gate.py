"""INT8 with the defaults of ``reid-export quantize`` on a real model: accuracy, nodes kept in float, speed.

For one FP32 ONNX model that carries a data config (``reid-export annotate`` first for a model
from elsewhere) and a Market-1501-layout dataset root, runs with the defaults only:

1. ``quantize --precision int8`` for both targets (TensorRT S8S8 and CPU U8S8), calibrated on
   ``ROOT/bounding_box_train`` (the gate's held-out crops come from there too), with ``--report``;
2. ``quantize --precision fp16`` and ``parity`` of it against the FP32 model on ``ROOT/query``;
3. ``eval`` of FP32, FP16 and both INT8 graphs on ROOT (Rank-1/mAP, drops against FP32), and on
   each ``--also-eval`` root (a second test set, e.g. from ``benchmarks/retrieval_split.py``);
4. ``bench`` of ORT FP32 and both INT8 graphs side by side at ``--batch`` (default 16).

Each step is the CLI a user would type (printed before it runs); the JSON report collects the
quantize reports, the eval and bench JSON, the CPU flags and the load average before/after.

    python benchmarks/int8_gate.py work/osnet05.onnx ../shared/data/cuhk03-labeled/Market-1501-v15.09.15 \\
        -o work/int8_gate_osnet05
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import common


def run(args: list, log) -> tuple[int, float]:
    """``reid-export ARGS``: (exit code, wall seconds)."""
    step = common.run_step(*args, say=log)
    return step.returncode, step.seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="FP32 ONNX with a data config")
    parser.add_argument("dataset", type=Path, help="Market-1501-layout root (query/, bounding_box_test/, "
                                                   "bounding_box_train/)")
    parser.add_argument("-o", "--out-dir", type=Path, required=True)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--duration", type=float, default=20.0, help="bench seconds per model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-bench", action="store_true")
    parser.add_argument("--also-eval", type=Path, action="append", default=[],
                        help="another Market-layout root to evaluate the same models on (repeatable)")
    args = parser.parse_args(argv)
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    train = args.dataset / "bounding_box_train"
    doc = {"model": str(args.model), "dataset": str(args.dataset), "load_before": common.load_average(), "steps": {}}
    stem = args.model.stem
    models = {"fp32": args.model}
    for target in ("tensorrt", "cpu"):
        q = out / f"{stem}.int8-{target}.onnx"
        code, secs = run(["quantize", args.model, "-o", q, "--precision", "int8", "--target", target,
                          "--calib-dir", train, "--no-progress", "--report", out / f"quantize-{target}.json"], log)
        doc["steps"][f"quantize-{target}"] = {"exit": code, "seconds": round(secs, 1)}
        if code == 0:
            models[f"int8-{target}"] = q
            doc["steps"][f"quantize-{target}"]["report"] = json.loads((out / f"quantize-{target}.json").read_text())
    fp16 = out / f"{stem}.fp16.onnx"
    code, secs = run(["quantize", args.model, "-o", fp16, "--precision", "fp16", "--no-progress"], log)
    doc["steps"]["quantize-fp16"] = {"exit": code, "seconds": round(secs, 1)}
    if code == 0:
        code, secs = run(["parity", args.model, fp16, "--images", args.dataset / "query", "--no-progress",
                          "--report", out / "parity-fp16.json"], log)
        doc["steps"]["parity-fp16"] = {"exit": code, "report": json.loads((out / "parity-fp16.json").read_text())}
    evaluated = list(models.values()) + ([fp16] if doc["steps"]["quantize-fp16"]["exit"] == 0 else [])
    for index, root in enumerate([args.dataset] + list(args.also_eval)):
        step, report = ("eval", out / "eval.json") if index == 0 else (f"eval-{index}", out / f"eval-{index}.json")
        code, secs = run(["eval", *evaluated, "--dataset-root", root, "--no-progress", "--report", report], log)
        doc["steps"][step] = {"exit": code, "seconds": round(secs, 1), "dataset": str(root),
                              "report": json.loads(report.read_text()) if report.exists() else None}
    if not args.skip_bench:
        code, secs = run(["bench", *models.values(), "--batch-sizes", str(args.batch), "--threads",
                          str(args.threads), "--duration", str(args.duration), "--no-progress",
                          "--report", out / "bench.json"], log)
        doc["steps"]["bench"] = {"exit": code, "report": json.loads((out / "bench.json").read_text())
                                 if (out / "bench.json").exists() else None}
    doc["load_after"] = common.load_average()
    common.write_json(out / "report.json", doc, command=common.command_line(__file__, argv), indent=1)
    log(f"wrote {out / 'report.json'}")
    return 0 if all(step.get("exit") == 0 for step in doc["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
