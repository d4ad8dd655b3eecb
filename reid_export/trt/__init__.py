"""TensorRT: engine building (``reid-export trt``), engine sidecars, and the pure helpers around them.

TensorRT is optional and imported lazily. The code follows the documented Python APIs of
TensorRT 10 and 11: in 11 every network is strongly typed and the precision comes from the ONNX
graph (FP16 graph, Q/DQ INT8 graph); in 10 the same graphs work, and an FP32 graph may instead
be built with the FP16 builder flag.
"""

from __future__ import annotations

import re

from ..errors import ReidExportError, UsageError

TRT_INSTALL_HINT = ("pip install 'reid-export[trt]' (TensorRT 10/11 wheels: "
                    "pip install tensorrt --extra-index-url https://pypi.nvidia.com)")


def import_tensorrt():
    """The ``tensorrt`` module, or exit 2 with what is missing and how to install it."""
    try:
        import tensorrt  # noqa: F401
    except ImportError as exc:
        missing = getattr(exc, "name", None) or "tensorrt"
        raise ReidExportError(f"TensorRT is not installed (cannot import {missing}); install it with "
                              f"{TRT_INSTALL_HINT}", exit_code=2) from None
    except OSError as exc:  # the wheel is there but its CUDA libraries are not
        raise ReidExportError(f"TensorRT is installed but cannot load its libraries ({exc}); "
                              "check the CUDA driver and LD_LIBRARY_PATH", exit_code=2) from None
    return tensorrt


def trt_major(version: str) -> int:
    match = re.match(r"(\d+)", version or "")
    return int(match.group(1)) if match else 0


_SIZE_UNITS = {"": 1, "b": 1, "k": 10 ** 3, "kb": 10 ** 3, "kib": 2 ** 10, "m": 10 ** 6, "mb": 10 ** 6,
               "mib": 2 ** 20, "g": 10 ** 9, "gb": 10 ** 9, "gib": 2 ** 30, "t": 10 ** 12, "tb": 10 ** 12,
               "tib": 2 ** 40}


def parse_size(text: str | int) -> int:
    """``"4GiB"`` -> 4294967296; plain integers are bytes."""
    if isinstance(text, int):
        value = text
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
        if not match or match.group(2).lower() not in _SIZE_UNITS:
            raise UsageError(f"`workspace`: cannot read {text!r} as a size; write e.g. 4GiB, 512MiB or 1073741824")
        value = int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])
    if value <= 0:
        raise UsageError(f"`workspace` must be positive, got {text!r}")
    return value


def compute_profile(input_shape: list, min_batch: int, opt_batch: int, max_batch: int,
                    input_size: tuple[int, int]) -> dict:
    """The optimization profile for the image input.

    ``input_shape`` is the ONNX input shape (ints or symbolic names/None). A dynamic batch takes
    ``min <= opt <= max`` from the options; a static batch N gives a static engine (N, N, N) and
    the options are reported as ignored. Height and width come from the graph, or from the data
    config where the graph leaves them symbolic.
    """
    if len(input_shape) != 4:
        raise ReidExportError(f"the ONNX image input must be 4-D [batch, 3, H, W], got {input_shape}")
    channels = input_shape[1] if isinstance(input_shape[1], int) else 3
    height = input_shape[2] if isinstance(input_shape[2], int) and input_shape[2] > 0 else input_size[0]
    width = input_shape[3] if isinstance(input_shape[3], int) and input_shape[3] > 0 else input_size[1]
    if (height, width) != tuple(input_size):
        raise ReidExportError(f"the ONNX input is {height}x{width} but its data config says "
                              f"{input_size[0]}x{input_size[1]}; re-annotate the model")
    batch = input_shape[0]
    if isinstance(batch, int) and batch > 0:
        return {"static": True, "min": [batch, channels, height, width], "opt": [batch, channels, height, width],
                "max": [batch, channels, height, width],
                "ignored": [] if (min_batch, opt_batch, max_batch) == (batch,) * 3 else
                ["`min_batch`/`opt_batch`/`max_batch` (the ONNX has a static batch)"]}
    for name, value in (("`min_batch`", min_batch), ("`opt_batch`", opt_batch), ("`max_batch`", max_batch)):
        if value < 1:
            raise UsageError(f"{name} must be >= 1, got {value}")
    if not min_batch <= opt_batch <= max_batch:
        raise UsageError(f"batch sizes must satisfy min <= opt <= max, got {min_batch}, {opt_batch}, {max_batch}")
    return {"static": False, "min": [min_batch, channels, height, width], "opt": [opt_batch, channels, height, width],
            "max": [max_batch, channels, height, width], "ignored": []}


def build_plan(trt_version: str, graph_precision: str, fp16: bool, int8: bool) -> dict:
    """How to build for this TensorRT and graph: which graph conversion, network typing and flags.

    Returns ``{"convert": None|"fp16"|"int8", "strongly_typed": bool, "flags": [...], "precision": str}``.
    """
    major = trt_major(trt_version)
    if fp16 and int8 and major >= 11:
        raise UsageError("`fp16` with `int8`: on TensorRT 11 precision comes from the graph; quantize to a Q/DQ "
                         "graph (which keeps unquantized layers as in the graph) and pass `int8` alone")
    plan = {"convert": None, "strongly_typed": True, "flags": [], "precision": graph_precision}
    if int8:
        if graph_precision != "int8":
            plan["convert"] = "int8"
        plan["precision"] = "int8"
        if major < 11:
            # TensorRT 10 builds explicit-quantization (Q/DQ) networks weakly typed with the INT8
            # flag; FP16 lets the layers left unquantized run in half precision.
            plan["strongly_typed"] = False
            plan["flags"] = ["INT8"] + (["FP16"] if fp16 else [])
        return plan
    if fp16:
        plan["precision"] = "fp16"
        if graph_precision == "int8":
            raise UsageError("`fp16` on a Q/DQ (INT8) ONNX: pass `int8` for it")
        if graph_precision == "fp32":
            if major >= 11:
                plan["convert"] = "fp16"  # no FP16 flag any more: the graph must say FP16
            else:
                plan["strongly_typed"] = False
                plan["flags"] = ["FP16"]
        return plan
    if graph_precision == "int8" and major < 11:
        plan["strongly_typed"] = False
        plan["flags"] = ["INT8"]
    return plan
