"""Issue 25: does learned rounding (AMD Quark's ONNX AdaRound / AdaQuant) reduce the INT8 error of
thin OSNet models below what our gated search reaches?

One run = one model, one flavour (``cpu``: U8S8, uint8 asymmetric activations, int8 symmetric
per-channel weights; ``tensorrt``: S8S8, symmetric activations, int8 symmetric per-channel weights),
Quark algorithms in turn (``none``: Quark's calibration only; ``adaround``; ``adaquant``; one calibration,
saved by the first and restored by the others). Calibration and
held-out images are exactly those ``reid-export quantize`` uses with its defaults
(:func:`reid_export.export.quantize.select_split`, 512 calibration crops, 128 held-out crops of
whole held-out identities, seed 0), preprocessed by the package's own :func:`reid_export.preprocess.preprocess`
with the model's embedded data config; the Q/DQ graph is measured with the quantizer's own
:class:`reid_export.export.quantize.search.Objective` (pair error, cosines, top-1/top-5 agreement).

Quark runs on a copy of the model in a temporary folder (never the input file), in its own venv (with
reid-export installed there too, or the checkout on ``PYTHONPATH`` as here):

    PYTHONPATH=. work/venv/bin/python benchmarks/learned_rounding.py MODEL.onnx --flavour cpu \
        --algos none,adaround,adaquant --iterations 200 --data-size 64

``--ours REPORT.json ...`` records our own search from ``reid-export quantize --report`` files;
``--measure-graph G.onnx`` only scores a saved graph (e.g. Quark's partial model mid-run).

The preprocessed arrays are cached (``--cache``) so that every run sees the same bytes at no cost.
Each run appends one record to ``--json`` (replacing an earlier record with the same key).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

import common

CALIB_DIR = str(common.DATA / "cuhk03-labeled" / "Market-1501-v15.09.15" / "bounding_box_train")


def split_arrays(model_path: str, cache: Path, calib_dir: str = CALIB_DIR):
    """(calibration inputs, held-out inputs, data config) with quantize's defaults, cached by model digest."""
    from reid_export.export.metadata import load_onnx
    from reid_export.export.quantize import DEFAULT_CALIB_SIZE, DEFAULT_VAL_SIZE, select_split
    from reid_export.export.metadata import require_data_config
    from reid_export.preprocess import preprocess

    model = load_onnx(model_path)
    data_config = require_data_config(model, model_path)
    key = hashlib.sha256(Path(model_path).read_bytes()).hexdigest()[:16]
    path = cache / f"split-{key}.npz"
    if path.exists():
        data = np.load(path)
        return data["calib"], data["val"], data_config
    split = select_split([calib_dir], DEFAULT_CALIB_SIZE, [], DEFAULT_VAL_SIZE, 0, print)
    calib_paths, val_paths = split.calibration, split.held_out
    calib, val = preprocess(calib_paths, data_config), preprocess(val_paths, data_config)
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, calib=calib, val=val)
    return calib, val, data_config


class Reader:
    """Quark's calibration data reader: one image per item (the graphs have a dynamic batch)."""

    def __init__(self, name: str, inputs: np.ndarray):
        self.name, self.inputs, self.i = name, inputs, 0

    def get_next(self):
        if self.i >= len(self.inputs):
            return None
        self.i += 1
        return {self.name: self.inputs[self.i - 1:self.i]}

    def rewind(self):
        self.i = 0

    def reset(self):
        self.i = 0

    def __len__(self):
        return len(self.inputs)


def quark_config(flavour: str, algo: str, iterations: int, lr: float | None, batch_size: int, data_size: int,
                 ranges: Path | None = None):
    from quark.onnx import AdaQuantConfig, AdaRoundConfig, QConfig
    from quark.onnx.quantization.config.spec import (CalibMethod, Int8Spec, QLayerConfig, QuantGranularity,
                                                     UInt8Spec)

    weight = Int8Spec(symmetric=True, calibration_method=CalibMethod.MinMax, quant_granularity=QuantGranularity.Channel)
    if flavour == "tensorrt":
        activation = Int8Spec(symmetric=True, calibration_method=CalibMethod.Percentile)
    else:
        activation = UInt8Spec(symmetric=False, calibration_method=CalibMethod.Percentile)
    algos = []
    common = dict(num_iterations=iterations, batch_size=batch_size, data_size=data_size, early_stop=True)
    if algo == "adaround":  # Quark's documented defaults: lr 0.1, 1000 iterations
        algos = [AdaRoundConfig(learning_rate=lr or 0.1, **common)]
    elif algo == "adaquant":  # documented defaults: lr 1e-5, 3000 iterations
        algos = [AdaQuantConfig(learning_rate=lr or 1e-5, **common)]
    # Percentile calibration (Quark's default method for Int8/UInt8 specs) at Quark's default 99.999; the range
    # symmetric only where the activations are (Quark's calibrator default is symmetric even for uint8, which
    # would leave half of a ReLU output's 256 levels unused); histograms kept in memory (faster than its disk cache)
    extra = {"ForceQuantizeNoInputCheck": False, "CalibTensorRangeSymmetric": flavour == "tensorrt",
             "CalibOptimizeMem": False}
    if ranges is not None:  # calibrate once per model and flavour: saved by the first run, restored by the others
        extra["SaveAndRestore"] = str(ranges)
    if flavour == "tensorrt":
        extra.update({"QuantizeBias": False})
    return QConfig(global_config=QLayerConfig(activation=activation, weight=weight), algo_config=algos,
                   extra_options=extra)


def run_quark(model_path: str, calib: np.ndarray, flavour: str, algo: str, iterations: int, lr: float | None,
              batch_size: int, data_size: int, workdir: Path, ranges: Path | None = None) -> Path:
    import onnx
    from quark.onnx import ModelQuantizer

    src = workdir / "fp32.onnx"
    if not src.exists():
        shutil.copyfile(model_path, src)  # Quark works on a copy, never on the input file
    name = onnx.load(str(src), load_external_data=False).graph.input[0].name
    out = workdir / f"quark-{flavour}-{algo}.onnx"
    quantizer = ModelQuantizer(quark_config(flavour, algo, iterations, lr, batch_size, data_size, ranges))
    here = os.getcwd()
    os.chdir(workdir)  # Quark writes its quantized_info.csv into the working directory
    try:
        quantizer.quantize_model(str(src), str(out), Reader(name, calib))
    finally:
        os.chdir(here)
    return out


def ours_record(report_path: str) -> dict:
    """The record of our own gated search from a ``reid-export quantize --report`` file (same crops, same measure)."""
    report = json.loads(Path(report_path).read_text())
    search = report["search"]
    return {"key": f"ours/{Path(report_path).name}", "model": Path(report.get("output", "?")).name, "algo": "ours",
            "flavour": report["target"], "chosen": search["chosen"], "fallback_float": len(search["fallback_float"]),
            "held_out_images": search["held_out_images"],
            "objective": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in search["objective"].items()},
            "wall_s": round(report["seconds"], 1), "seconds": search["seconds"], "date": report["date"],
            "machine": report.get("machine"), "report": Path(report_path).name,
            "held_out_retrieval": search.get("held_out_retrieval")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?")
    ap.add_argument("--ours", nargs="*", default=[],
                    help="reid-export quantize --report files to record beside Quark's runs (then no model needed)")
    ap.add_argument("--flavour", choices=("cpu", "tensorrt"), default="cpu")
    ap.add_argument("--algos", default="none,adaround,adaquant",
                    help="comma-separated, run in this order on one calibration (none first calibrates)")
    ap.add_argument("--iterations", type=int, default=1000)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--data-size", type=int, default=512, help="calibration crops the finetune samples from")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", default="/work/scratch-reduce/cache")
    ap.add_argument("--keep", default=None, help="folder to copy the Q/DQ graphs into")
    ap.add_argument("--json", default=str(common.REPO / "benchmarks" / "learned_rounding.json"))
    ap.add_argument("--measure-graph", default=None,
                    help="only score this Q/DQ graph (e.g. the partial model Quark's SaveAndRestore keeps mid-run)")
    ap.add_argument("--note", default="", help="what --measure-graph is (recorded)")
    args = ap.parse_args(argv)
    algos = args.algos.split(",")
    path = Path(args.json)
    if args.ours:
        records = json.loads(path.read_text()) if path.exists() else []
        for report in args.ours:
            record = ours_record(report)
            records = [r for r in records if r.get("key") != record["key"]] + [record]
            print("RESULT", json.dumps(record), flush=True)
        common.write_json(path, records, indent=1)
    if not args.model:
        return 0

    import onnx
    import quark
    import torch

    torch.set_num_threads(args.threads)
    from reid_export.export.quantize.search import Objective

    command = common.command_line(__file__, argv)
    calib, val, data_config = split_arrays(args.model, Path(args.cache))
    objective = Objective(open(args.model, "rb").read(), val, data_config, args.threads)
    if args.measure_graph:
        measures = objective.measure(Path(args.measure_graph).read_bytes())
        record = {**common.header(command),
                  "key": f"{Path(args.model).stem}/{args.flavour}/{algos[0]}/{args.iterations}/partial",
                  "model": Path(args.model).name, "flavour": args.flavour, "algo": algos[0],
                  "iterations": args.iterations, "data_size": args.data_size, "note": args.note,
                  "graph": Path(args.measure_graph).name, "held_out_images": len(val),
                  "objective": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in measures.items()}}
        records = json.loads(path.read_text()) if path.exists() else []
        common.write_json(path, [r for r in records if r.get("key") != record["key"]] + [record], indent=1)
        print("RESULT", json.dumps(record), flush=True)
        return 0
    digest = hashlib.sha256(Path(args.model).read_bytes()).hexdigest()
    ranges = Path(args.cache) / f"ranges-{digest[:16]}-{args.flavour}.json"
    calib_seconds = None
    for algo in algos:
        start = time.time()
        with tempfile.TemporaryDirectory(prefix="quark-", dir=args.cache) as tmp:
            own = None
            if ranges.exists():  # a private copy: the finetune also saves its progress into this file
                own = Path(tmp) / "ranges.json"
                shutil.copyfile(ranges, own)
            out = run_quark(args.model, calib, args.flavour, algo, args.iterations, args.lr, args.batch_size,
                            min(args.data_size, len(calib)), Path(tmp), own or ranges)
            seconds = time.time() - start
            data = out.read_bytes()
            if args.keep:
                Path(args.keep).mkdir(parents=True, exist_ok=True)
                shutil.copyfile(out, Path(args.keep) / f"{Path(args.model).stem}.{out.name}")
        if own is None:
            calib_seconds = seconds
        measures = objective.measure(data)
        ops: dict[str, int] = {}
        for node in onnx.load_from_string(data).graph.node:
            ops[node.op_type] = ops.get(node.op_type, 0) + 1
        record = {
            **common.header(command),
            "key": f"{Path(args.model).stem}/{args.flavour}/{algo}/{args.iterations if algo != 'none' else 0}/{args.lr}",
            "model": Path(args.model).name, "model_sha256": digest,
            "flavour": args.flavour, "algo": algo, "iterations": args.iterations if algo != "none" else 0,
            "lr": args.lr, "batch_size": args.batch_size, "data_size": min(args.data_size, len(calib)),
            "calibration_images": len(calib), "held_out_images": len(val),
            "activation_calibration": "Quark Percentile",
            "objective": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in measures.items()},
            "wall_s": round(seconds, 1), "calibration_restored": own is not None,
            "calibration_s": None if calib_seconds is None else round(calib_seconds, 1), "threads": args.threads,
            "qdq_ops": {k: ops[k] for k in ("QuantizeLinear", "DequantizeLinear") if k in ops},
            "quark": getattr(quark, "__version__", "?"), "torch": torch.__version__,
        }
        records = json.loads(path.read_text()) if path.exists() else []
        records = [r for r in records if r.get("key") != record["key"]] + [record]
        common.write_json(path, records, indent=1)
        print("RESULT", json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
