#!/usr/bin/env python3
"""Is the INT8-cpu speed-up limited by our graph or by the CPU? The check behind RESULTS.md's note.

    python benchmarks/int8_cpu_forms.py            # after benchmarks/cpu_bench.py made work/bench-cpu/

1. prints the operator counts of ONNX Runtime's optimized graph (ORT_ENABLE_ALL, CPU provider) for
   the FP32 model and for our ``--target cpu`` INT8 model: fully fused means QLinearConv/QLinearAdd
   and no DequantizeLinear -> Conv -> QuantizeLinear chains left;
2. quantizes the same FP32 model with ONNX Runtime's own ``quantize_static`` in the forms it offers
   (QDQ per-channel with and without reduce_range, QDQ per-tensor, QOperator per-channel; U8S8,
   MinMax, --calib-size real crops read with the one preprocessing function);
3. times them all side by side with ``reid-export bench`` (alternating rounds, same thread count).

If every form runs at the same speed as ours, the ratio to FP32 is what this CPU's int8 kernels
give (on AVX2 without VNNI about 2x), not a defect of our export.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import common
from common import DATA, REPO

WORK = REPO / "work" / "bench-cpu"

FORMS = {  # name: quantize_static keyword arguments
    "ort-qdq-perchannel-rr": {"quant_format": "QDQ", "per_channel": True, "reduce_range": True},
    "ort-qdq-perchannel": {"quant_format": "QDQ", "per_channel": True, "reduce_range": False},
    "ort-qdq-pertensor": {"quant_format": "QDQ", "per_channel": False, "reduce_range": False},
    "ort-qoperator-perchannel": {"quant_format": "QOperator", "per_channel": True, "reduce_range": False},
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fp32", type=Path, default=WORK / "bot-r50.onnx", help="The FP32 ONNX model.")
    parser.add_argument("--ours", type=Path, default=WORK / "bot-r50.int8-cpu.onnx",
                        help="Our reid-export quantize --target cpu model of it.")
    parser.add_argument("--work", type=Path, default=WORK / "int8-forms")
    parser.add_argument("--calib-dir", type=Path,
                        default=DATA / "cuhk03-labeled" / "Market-1501-v15.09.15" / "bounding_box_train")
    parser.add_argument("--calib-size", type=int, default=64)
    parser.add_argument("--batch-sizes", default="16")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--duration", type=float, default=20.0)
    return parser.parse_args(argv)


def quantize_forms(args) -> dict[str, Path]:
    import numpy as np
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    from reid_export.export.metadata import input_info, load_onnx, read_data_config, save_onnx, set_metadata
    from reid_export.export.ort import quiet_ort_tools
    from reid_export.export.quantize import select_calibration_images
    from reid_export.preprocess import preprocess

    fp32 = load_onnx(args.fp32)
    data_config = read_data_config(fp32, str(args.fp32))
    input_name = input_info(fp32)[0]
    images = select_calibration_images([args.calib_dir], args.calib_size, seed=0, log=print)
    batches = [preprocess(images[i:i + 8], data_config) for i in range(0, len(images), 8)]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.pending = iter(batches)

        def get_next(self):
            batch = next(self.pending, None)
            return None if batch is None else {input_name: np.ascontiguousarray(batch, dtype=np.float32)}

    args.work.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, form in FORMS.items():
        path = args.work / f"{name}.onnx"
        if not path.exists() or path.stat().st_mtime < args.fp32.stat().st_mtime:
            print(f"# quantize_static -> {path.name} ({form})", flush=True)
            tmp = args.work / f".{name}.tmp.onnx"
            with quiet_ort_tools():
                quantize_static(str(args.fp32), str(tmp), Reader(),
                                quant_format=getattr(QuantFormat, form["quant_format"]),
                                per_channel=form["per_channel"], reduce_range=form["reduce_range"],
                                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                calibrate_method=CalibrationMethod.MinMax)
            model = onnx.load(str(tmp))
            set_metadata(model, {"reid_export.precision": "int8"})  # the bench table's precision column
            save_onnx(model, path)
            tmp.unlink()
        out[name] = path
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    for path, what in ((args.fp32, "--fp32"), (args.ours, "--ours")):
        if not path.is_file():
            raise SystemExit(f"int8_cpu_forms: {path} ({what}) does not exist; run python benchmarks/cpu_bench.py "
                             "first, or give the path")
    import onnx

    from reid_export.export.quantize.qdq_check import check_ort_cpu_fusion

    print("ONNX Runtime's optimized graph (CPU provider, ORT_ENABLE_ALL), operator counts:")
    for path in (args.fp32, args.ours):
        fusion = check_ort_cpu_fusion(onnx.load(str(path)), args.threads)
        print(f"  {path.name}: " + ", ".join(f"{op} {n}" for op, n in fusion.optimized_ops.items()))
        if fusion.quantized_convs:
            print(f"  {fusion.summary()}")
    forms = quantize_forms(args)
    models = [args.fp32, args.ours, *forms.values()]
    return common.run_step("bench", *models, "--batch-sizes", args.batch_sizes, "--threads", args.threads,
                           "--warmup", 2, "--duration", args.duration, "--rounds", 5,
                           "--report", args.work / "int8_forms_bench.json", "--no-progress").returncode


if __name__ == "__main__":
    sys.exit(main())
