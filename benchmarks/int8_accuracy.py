"""How much ranking accuracy do the FP16 and INT8 variants of a trained model lose?

Exports a checkpoint to ONNX (FP32), makes the FP16 variant and the INT8 variants for both
targets (TensorRT S8S8 and the ONNX Runtime CPU U8S8) with each calibration method asked for,
calibrating on the dataset's ``bounding_box_train`` crops, and evaluates every model on its
query/gallery split (Market-1501 protocol, cosine distance) with ONNX Runtime on the CPU.
Prints a table (Rank-1, mAP, mINP, the drops against the FP32 ONNX model, the lowest cosine between a
variant's embedding and FP32's, and how often a query's nearest gallery image stays the same) and
writes the JSON report.

    python benchmarks/int8_accuracy.py logs/cuhk03/bagtricks_R18_cpu/model_best.pth \\
        ../shared/data/cuhk03-labeled -o benchmarks/int8_cuhk03 --methods entropy,percentile,minmax
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

import common
from reid_export.data.market import MarketDataset
from reid_export.embeddings import Tolerances, compare
from reid_export.export.onnx_export import export_checkpoint
from reid_export.export.quantize import quantize_file
from reid_export.fileio import sha256_file
from reid_export.report import format_table
from reid_export.runtime import open_encoder
from reid_export.verify.retrieval import EvalOptions, evaluate_encoder


def evaluate(model: Path, dataset: MarketDataset, config=None, opts=(), batch_size: int = 64) -> dict:
    """The verifier's evaluation (cosine, no flip/AQE/re-ranking), plus what agreement() needs."""
    start = time.time()
    with open_encoder(model, config=config, opts=opts) as encoder:
        result = evaluate_encoder(encoder, dataset, EvalOptions(batch_size=batch_size), progress=False)
    if not result.ok:
        raise SystemExit(f"{model}: {result.error}")
    metrics = dict(result.metrics, seconds=round(time.time() - start, 1))
    metrics["_top1"] = result.distmat.argmin(axis=1)
    metrics["_features"] = result.features
    return metrics


def agreement(metrics: dict, base: dict) -> dict:
    """How close a variant's embeddings and rankings are to the FP32 ONNX model's."""
    result = compare(np.concatenate(base["_features"]), np.concatenate(metrics["_features"]), Tolerances())
    return {"min_cosine": result.min_cosine, "mean_cosine": result.mean_cosine,
            "top1_agreement": float(np.mean(metrics["_top1"] == base["_top1"]) * 100.0)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("dataset", type=Path, help="Market-1501-layout root (query/, bounding_box_test/, "
                                                   "bounding_box_train/)")
    parser.add_argument("-o", "--out-dir", type=Path, default=Path("int8_accuracy"))
    parser.add_argument("--config", type=Path, default=None, help="fast-reid config (checkpoints without one)")
    parser.add_argument("--methods", default="auto,entropy,mse,percentile,minmax")
    parser.add_argument("--targets", default="tensorrt,cpu")
    parser.add_argument("--calib-size", type=int, default=512)
    parser.add_argument("--percentile", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="report path (default OUT_DIR/report.json)")
    parser.add_argument("--opts", nargs="*", default=[], help="config overrides, fast-reid style")
    args = parser.parse_args(argv)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    dataset = MarketDataset(args.dataset)
    calib_dir = dataset.root / "bounding_box_train"
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    log(f"dataset {dataset}; calibration on {calib_dir}")

    fp32 = args.out_dir / "model.onnx"
    export_checkpoint(args.checkpoint, fp32, config=args.config, opts=args.opts, log=log)
    variants = [("torch", "fp32", None, None, args.checkpoint), ("onnx", "fp32", None, None, fp32)]
    fp16 = args.out_dir / "model.fp16.onnx"
    quantize_file(fp32, fp16, "fp16", log=log)
    variants.append(("onnx", "fp16", None, None, fp16))
    for target in args.targets.split(","):
        for method in args.methods.split(","):
            out = args.out_dir / f"model.int8.{target}.{method}.onnx"
            start = time.time()
            quantize_file(fp32, out, "int8", target=target, calib_dirs=[calib_dir], calib_size=args.calib_size,
                          method=method, percentile=args.percentile if method == "percentile" else None,
                          seed=args.seed, progress=False, log=log,
                          # one method's own accuracy: no fallback to float, written whatever the gate says
                          # ("auto" is quantize's default search, gated and with its fallback)
                          max_float=None if method == "auto" else 0, allow_below_gate=method != "auto")
            log(f"{out.name}: quantized in {time.time() - start:.0f} s")
            variants.append(("onnx", "int8", target, method, out))

    rows, results, evaluated = [], [], []
    for backend, precision, target, method, path in variants:
        kwargs = {"config": args.config, "opts": args.opts} if backend == "torch" else {}
        metrics = evaluate(path, dataset, **kwargs)
        evaluated.append(metrics)
        entry = {"model": path.name, "backend": backend, "precision": precision, "target": target, "method": method,
                 **{k: metrics[k] for k in ("Rank-1", "Rank-5", "mAP", "mINP", "num_valid_queries", "seconds")}}
        results.append(entry)
        log(f"{path.name}: Rank-1 {metrics['Rank-1']:.2f} mAP {metrics['mAP']:.2f} ({metrics['seconds']} s)")
    base = evaluated[1]  # the FP32 ONNX model
    for entry, metrics in zip(results, evaluated):
        entry["dRank-1"] = entry["Rank-1"] - base["Rank-1"]
        entry["dmAP"] = entry["mAP"] - base["mAP"]
        entry.update(agreement(metrics, base))
        rows.append([entry["backend"], entry["precision"], entry["target"] or "-", entry["method"] or "-",
                     entry["Rank-1"], entry["mAP"], entry["mINP"], entry["dRank-1"], entry["dmAP"],
                     f"{entry['min_cosine']:.4f}", entry["top1_agreement"]])
    table = format_table(["backend", "precision", "target", "calibration", "Rank-1", "mAP", "mINP",
                          "dRank-1", "dmAP", "min cos", "top-1 same %"], rows, floatfmt=".2f")
    print(table)
    report = {
        "checkpoint": str(args.checkpoint), "checkpoint_sha256": sha256_file(args.checkpoint),
        "dataset": str(dataset.root), "num_query": len(dataset.query), "num_gallery": len(dataset.gallery),
        "calibration": {"folder": str(calib_dir), "size": args.calib_size, "seed": args.seed},
        "metric": "cosine", "results": results, "table": table,
    }
    common.write_json(args.json or args.out_dir / "report.json", report, command=common.command_line(__file__, argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
