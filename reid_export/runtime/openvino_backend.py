"""OpenVINO backend: ``.xml`` IR files, and ``.onnx`` files with ``--device openvino``, on the CPU plugin.

``--device`` for this backend: ``cpu`` or ``openvino`` (f32 inference precision), ``openvino:bf16``
(bf16 inference precision: only where the CPU has AVX512_BF16 or AMX-BF16; elsewhere a clear
error, never a silent fallback), ``openvino:f32``. A single model can carry the choice in its
name, ``model.onnx@openvino`` or ``model.xml@openvino:bf16`` (see ``encoder.open_encoder``), so
one ``parity``/``eval``/``bench`` run can put routes side by side.

FP32, FP16 (compressed weights) and Q/DQ INT8 graphs run as they are: OpenVINO turns the Q/DQ
pairs into its own int8 kernels. The inference precision is always set explicitly (``f32`` by
default): OpenVINO's CPU plugin otherwise picks bf16 by itself on AMX CPUs, which would break
FP32 parity without saying so. The batch dimension is made dynamic when the model allows it
(the OMZ IRs ship with batch 1 and reshape); otherwise a static batch is split / padded.

The data config: for an IR, ``rt_info`` ``reid_export/data_config`` (written by
``reid-export openvino`` and ``reid-export annotate model.xml``); for an ONNX, its
``metadata_props`` (OpenVINO exposes them under ``rt_info`` ``framework``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..cpuinfo import has_bf16, isa_flags, read_cpu_flags
from ..data_config import DataConfig
from ..errors import ReidExportError, require_module
from ..fileio import check_input_file
from .encoder import Encoder

INSTALL = "pip install 'reid-export[openvino]' (or: pip install openvino)"
INFERENCE_PRECISIONS = ("f32", "bf16")
RT_SECTION = "reid_export"
RT_FRAMEWORK = "framework"  # where OpenVINO's ONNX reader puts metadata_props
KEY_DATA_CONFIG = "reid_export.data_config"
KEY_PRECISION = "reid_export.precision"
ENV_THREADS = "REID_OV_THREADS"


def import_openvino():
    """The ``openvino`` module, or one line that says how to install it."""
    return require_module("openvino", "OpenVINO", INSTALL)


_CORE = None


def get_core():
    """One ``openvino.Core`` per process (creating it loads the plugins)."""
    global _CORE
    if _CORE is None:
        _CORE = import_openvino().Core()
    return _CORE


def is_openvino_device(device: str) -> bool:
    return str(device).partition(":")[0].lower() in ("openvino", "ov")


def inference_precision_for(device: str, path: str | Path = "model") -> str:
    """``f32`` or ``bf16`` from ``--device`` (cpu, openvino, openvino:f32, openvino:bf16)."""
    kind, _, option = str(device).lower().partition(":")
    if kind == "cpu" and not option:
        return "f32"
    if kind in ("openvino", "ov"):
        option = option or "f32"
        if option in ("fp32", "f32"):
            return "f32"
        if option in ("bf16",):
            return "bf16"
    raise ReidExportError(f"{path}: `device` {device!r}: OpenVINO models run on cpu, openvino, openvino:f32 "
                          "or openvino:bf16", exit_code=2)


def check_bf16_supported(path: str | Path, core=None, flags: set[str] | None = None) -> None:
    """bf16 inference only on a CPU with bf16 arithmetic; anything else is one clear error."""
    flags = read_cpu_flags() if flags is None else flags
    capabilities = []
    if core is not None:
        try:
            capabilities = [str(c) for c in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")]
        except Exception:  # noqa: BLE001 - an old plugin without the property: judge by the flags
            capabilities = ["BF16"]
    if not has_bf16(flags) or (core is not None and "BF16" not in capabilities):
        shown = " ".join(isa_flags(flags)) or "none of avx2/avx512f/avx512_bf16/amx_bf16"
        raise ReidExportError(
            f"{path}: bf16 inference needs a CPU with AVX512_BF16 or AMX-BF16 and this one has neither "
            f"(flags: {shown}); OpenVINO would emulate it slower than f32: use `device` openvino (f32)", exit_code=2)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    # OpenVINO's messages start with "Exception from src/...cpp:123:"; the reason is on a later line
    useful = [line for line in lines if not line.startswith(("Exception from", "Check '"))]
    return (useful or lines or [type(exc).__name__])[0][:300]


def read_model(path: str | Path):
    """An ``openvino.Model`` from an ``.xml`` IR (with its ``.bin``) or an ``.onnx``; one clear error otherwise."""
    path = check_input_file(path, "OpenVINO IR" if Path(path).suffix.lower() == ".xml" else "ONNX model")
    core = get_core()
    if path.suffix.lower() == ".xml":
        weights = path.with_suffix(".bin")
        if not weights.exists():
            raise ReidExportError(f"{path}: its weights file {weights.name} is not beside it; an OpenVINO IR is "
                                  "two files (.xml and .bin): copy both")
    try:
        return core.read_model(str(path))
    except Exception as exc:  # noqa: BLE001 - OpenVINO raises RuntimeError / its own types
        what = "an OpenVINO IR" if path.suffix.lower() == ".xml" else "an ONNX model OpenVINO can read"
        raise ReidExportError(f"{path}: not {what} ({_first_line(exc)}); check the file or re-convert it") from None


def _rt(model, *keys: str):
    try:
        if model.has_rt_info(list(keys)):
            return str(model.get_rt_info(list(keys)).astype(str))
    except Exception:  # noqa: BLE001 - a malformed rt_info entry counts as absent
        return None
    return None


def read_rt(model, key: str) -> str | None:
    """``reid_export.<key>`` from the model's ``rt_info``: our section first, then ONNX metadata."""
    return _rt(model, RT_SECTION, key) or _rt(model, RT_FRAMEWORK, f"{RT_SECTION}.{key}")


def read_data_config(model, path: str | Path) -> DataConfig | None:
    text = read_rt(model, "data_config")
    return None if text is None else DataConfig.from_json(text, f"{path} (embedded data config)")


def annotate_hint(path: str | Path, shape=None) -> str:
    """The ``reid-export annotate`` command that gives an IR (or ONNX) a data config."""
    path = Path(path)
    size = "H W"
    if shape is not None and len(shape) == 4 and all(isinstance(v, int) and v > 0 for v in shape[2:]):
        size = f"{shape[2]} {shape[3]}"
    out = path.with_name(path.stem + ".annotated" + path.suffix)
    hint = (f"reid-export annotate {path} -o {out} --input-size {size} --mean R,G,B --std R,G,B "
            "--pixel-scale 255|1 --channel-order rgb|bgr --interpolation cubic|linear [--normalized-inside]")
    hint += f" (or find them: reid-export annotate {path} -o {out} --detect LABELLED_CROPS/)"
    if path.suffix.lower() == ".xml":
        hint += (" (Open Model Zoo person-reidentification IRs take BGR 0..255 and normalise inside: --mean 0,0,0 "
                 "--std 1,1,1 --pixel-scale 255 --channel-order bgr --interpolation linear --normalized-inside)")
    return hint


def static_shape(model) -> list:
    """The image input's shape: ints, None for a dynamic dimension."""
    shape = model.inputs[0].get_partial_shape()
    return [int(d.get_length()) if d.is_static else None for d in shape]


def require_data_config(model, path: str | Path) -> DataConfig:
    config = read_data_config(model, path)
    if config is None:
        kind = "OpenVINO IR" if Path(path).suffix.lower() == ".xml" else "ONNX"
        raise ReidExportError(f"{path}: this {kind} carries no reid-export data config (input size, channel order, "
                              f"mean/std, ...); add one with: {annotate_hint(path, static_shape(model))}")
    return config


def graph_precision(model) -> str:
    """int8 when the graph quantizes (FakeQuantize, from Q/DQ), fp16 with float16 weights, else fp32."""
    f16 = import_openvino().Type.f16
    types = set()
    fp16 = False
    for op in model.get_ops():
        name = op.get_type_name()
        types.add(name)
        if name == "Constant" and op.get_output_element_type(0) == f16:
            fp16 = True
    if types & {"FakeQuantize", "FakeConvert"}:
        return "int8"
    return "fp16" if fp16 else "fp32"


def make_batch_dynamic(model, path: str | Path) -> bool:
    """Reshape a static-batch model to a dynamic batch; False when the graph does not allow it."""
    ov = import_openvino()
    shape = model.inputs[0].get_partial_shape()
    if shape.rank.is_dynamic or len(shape) != 4 or shape[0].is_dynamic:
        return shape.rank.is_static and len(shape) == 4 and shape[0].is_dynamic
    dims = [-1] + [int(d.get_length()) if d.is_static else -1 for d in list(shape)[1:]]
    try:
        model.reshape({model.inputs[0].get_any_name(): ov.PartialShape(dims)})
    except Exception:  # noqa: BLE001 - a Reshape with a baked batch: keep the static batch
        return False
    return True


def compile_model(model, path: str | Path, inference_precision: str = "f32", threads: int | None = None,
                  hint: str = "LATENCY"):
    """Compile for the CPU plugin with an explicit inference precision and thread count."""
    core = get_core()
    if inference_precision not in INFERENCE_PRECISIONS:
        raise ReidExportError(f"{path}: inference precision must be one of {', '.join(INFERENCE_PRECISIONS)}, "
                              f"got {inference_precision!r}", exit_code=2)
    if inference_precision == "bf16":
        check_bf16_supported(path, core)
    config = {"INFERENCE_PRECISION_HINT": inference_precision, "PERFORMANCE_HINT": hint}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    try:
        return core.compile_model(model, "CPU", config)
    except Exception as exc:  # noqa: BLE001
        raise ReidExportError(f"{path}: OpenVINO cannot compile it for the CPU ({_first_line(exc)})") from None


class OpenVinoEncoder(Encoder):
    backend = "openvino"

    def __init__(self, compiled, data_config: DataConfig, path: str | Path, precision: str, inference_precision: str,
                 static_batch: int | None, threads: int | None = None, source_format: str = "ir"):
        self.compiled = compiled
        self.request = compiled.create_infer_request()
        self.data_config = data_config
        self.path = Path(path)
        self.graph_precision = precision
        self.inference_precision = inference_precision
        # what parity's default gates and the tables show: bf16 arithmetic for float graphs
        self.precision = "bf16" if inference_precision == "bf16" and precision in ("fp32", "fp16") else precision
        self.device = "openvino:cpu" + (":bf16" if inference_precision == "bf16" else "")
        self.static_batch = static_batch
        self.threads = threads
        self.source_format = source_format
        f16 = import_openvino().Type.f16
        self.input_dtype = np.float16 if compiled.inputs[0].get_element_type() == f16 else np.float32

    @property
    def max_batch(self) -> int | None:
        return self.static_batch

    def forward(self, batch: np.ndarray) -> np.ndarray:
        n = batch.shape[0]
        if self.static_batch and n < self.static_batch:
            pad = np.repeat(batch[-1:], self.static_batch - n, axis=0)
            batch = np.concatenate([batch, pad])
        batch = np.ascontiguousarray(batch, dtype=self.input_dtype)
        try:
            self.request.infer({0: batch})
            out = self.request.get_output_tensor(0).data
        except Exception as exc:  # noqa: BLE001
            raise ReidExportError(f"{self.path}: OpenVINO cannot run the model on a {list(batch.shape)} batch "
                                  f"({_first_line(exc)})") from None
        return np.array(out[:n], dtype=np.float32).reshape(n, -1)

    def describe(self) -> dict:
        info = super().describe()
        info.update({"graph_precision": self.graph_precision, "inference_precision": self.inference_precision,
                     "static_batch": self.static_batch, "threads": self.threads, "format": self.source_format})
        try:
            info["openvino"] = import_openvino().__version__
            value = self.compiled.get_property("INFERENCE_PRECISION_HINT")
            info["compiled_inference_precision"] = value.to_string() if hasattr(value, "to_string") else str(value)
            info["compiled_threads"] = int(self.compiled.get_property("INFERENCE_NUM_THREADS"))
        except Exception:  # noqa: BLE001 - informational only
            pass
        return info

    def close(self) -> None:
        self.request = None
        self.compiled = None


def open_model(model, path: Path, device: str = "cpu", threads: int | None = None,
               data_config: DataConfig | None = None, precision: str | None = None) -> OpenVinoEncoder:
    """An Encoder over an already read ``openvino.Model`` (used by the converter's self-check too)."""
    inference = inference_precision_for(device, path)
    if threads is None and os.environ.get(ENV_THREADS, "").isdigit():
        threads = int(os.environ[ENV_THREADS])
    if len(model.inputs) != 1 or len(model.outputs) < 1:
        raise ReidExportError(f"{path}: expected one image input, got {len(model.inputs)} inputs")
    shape = static_shape(model)
    if len(shape) != 4:
        raise ReidExportError(f"{path}: the model input has shape {shape}; expected [N, 3, H, W]")
    if data_config is None:
        data_config = require_data_config(model, path)
    expected = (3, data_config.height, data_config.width)
    for got, want in zip(shape[1:], expected):
        if got is not None and got != want:
            raise ReidExportError(f"{path}: the model input is {shape} but its data config says "
                                  f"[N, {', '.join(map(str, expected))}]; fix the data config with reid-export annotate")
    if precision is None:
        precision = read_rt(model, "precision") or graph_precision(model)
    dynamic = make_batch_dynamic(model, path)
    static_batch = None if dynamic else (shape[0] or 1)
    compiled = compile_model(model, path, inference, threads)
    return OpenVinoEncoder(compiled, data_config, path, precision, inference, static_batch, threads,
                           "onnx" if path.suffix.lower() == ".onnx" else "ir")


def open_openvino(path: Path, config=None, opts=(), device: str = "cpu", threads: int | None = None,
                  data_config: DataConfig | None = None, half: bool = False, **_ignored) -> OpenVinoEncoder:
    """Open an ``.xml`` IR or an ``.onnx`` with OpenVINO's CPU plugin (``threads``: default ``$REID_OV_THREADS``,
    else OpenVINO's choice, all cores)."""
    path = Path(path)
    if config is not None or list(opts):
        raise ReidExportError(f"{path}: `config`/`opts` apply to checkpoints; an OpenVINO model carries its data "
                              "config (change it with reid-export annotate)", exit_code=2)
    if half:
        raise ReidExportError(f"{path}: `half` (MODEL@fp16) applies to checkpoints; for OpenVINO use "
                              "reid-export openvino --fp16 (FP16 weights) or `device` openvino:bf16", exit_code=2)
    inference_precision_for(device, path)  # a wrong --device fails before the model is read
    model = read_model(path)
    return open_model(model, path, device=device, threads=threads, data_config=data_config)


def ir_summary(path: str | Path) -> dict:
    """What an IR says about itself (for ``doctor``-like reports and tests)."""
    model = read_model(path)
    dc = read_data_config(model, path)
    return {"inputs": [str(i) for i in model.inputs], "outputs": [str(o) for o in model.outputs],
            "precision": read_rt(model, "precision") or graph_precision(model),
            "data_config": dc.to_dict() if dc else None,
            "rt_info": json.loads(read_rt(model, "export") or "null")}
