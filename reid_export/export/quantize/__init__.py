"""``quantize``: the FP16 or INT8 (Q/DQ) variant of an FP32 ONNX model, written only when it keeps the
FP32 model's embeddings within the one reduced-precision gate.

One module per step:

- :mod:`.options` — :class:`QuantizeOptions`, what was asked, checked once;
- :mod:`.images` — which crops calibrate and which judge (whole identities held out when the names
  carry them);
- :mod:`.fp16` — the FP16 graph (float32 I/O, head in float32) and its check on real crops;
- :mod:`.calibration` — the calibration images decoded once, activation statistics collected in
  one pass, the ranges of every method (entropy, MSE, percentile, min/max);
- :mod:`.qdq` — one Q/DQ graph from a set of ranges, per target (TensorRT S8S8, CPU U8S8), with the
  weight-rounding bias correction;
- :mod:`.equalize` — the activation-equalised copy of the graph;
- :mod:`.search` — the accuracy-guarded search over candidates, with the fallback to float;
- :mod:`.locate` — which node adds the error (also ``parity --locate``);
- :mod:`.qdq_check` — TensorRT's Q/DQ rules, ONNX Runtime's CPU fusion;
- :mod:`.int8` — the INT8 step: images -> calibration -> search -> :class:`SearchRecord`;
- :mod:`.report` — :class:`QuantizeReport` and :class:`SearchRecord` (``to_dict()`` once, for the
  JSON report and the model's metadata alike);
- :mod:`.run` — :func:`quantize_file`: load, step, checks, metadata, write.
"""

from .fp16 import FP16_CHECK_IMAGES, FP16_MAX, FP16_MIN_NORMAL, FP16_MIN_SUBNORMAL, convert_fp16
from .images import HELD_OUT_IMAGES, HeldOut, ImageSplit, select_calibration_images, select_images, select_split
from .options import DEFAULT_CALIB_SIZE, DEFAULT_METHOD, DEFAULT_VAL_SIZE, PRECISIONS, QuantizeOptions
from .qdq import MIN_QDQ_OPSET, QDQ_OP_TYPES, TARGETS
from .report import QuantizeReport, SearchRecord
from .run import load_fp32, quantize_file

__all__ = ["quantize_file", "QuantizeOptions", "QuantizeReport", "SearchRecord", "load_fp32",
           "select_split", "select_images", "select_calibration_images", "ImageSplit", "HeldOut", "HELD_OUT_IMAGES",
           "convert_fp16", "FP16_CHECK_IMAGES", "FP16_MAX", "FP16_MIN_NORMAL", "FP16_MIN_SUBNORMAL", "PRECISIONS",
           "DEFAULT_CALIB_SIZE", "DEFAULT_VAL_SIZE", "DEFAULT_METHOD", "TARGETS", "QDQ_OP_TYPES", "MIN_QDQ_OPSET"]
