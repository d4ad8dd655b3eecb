"""ONNX files: safe loading, atomic saving, and the reid-export entries in ``metadata_props``.

The data config travels inside the model as one JSON entry (``reid_export.data_config``), next
to the tool version, the source checkpoint's sha256, the precision and, for INT8 models, how they
were calibrated. A model without a data config (an ONNX from elsewhere) is refused by every
command with a message that shows the ``reid-export annotate`` command that adds one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import onnx

from .. import __version__
from ..data_config import DataConfig
from ..errors import ReidExportError
from ..fileio import atomic_write_bytes, check_input_file

PREFIX = "reid_export."
KEY_DATA_CONFIG = PREFIX + "data_config"
KEY_VERSION = PREFIX + "version"
KEY_SOURCE = PREFIX + "source"
KEY_SOURCE_SHA256 = PREFIX + "source_sha256"
KEY_PRECISION = PREFIX + "precision"
KEY_EXPORT = PREFIX + "export"
KEY_QUANTIZATION = PREFIX + "quantization"
KEY_FP16 = PREFIX + "fp16"
KEY_ANNOTATED = PREFIX + "annotated"

_PROTOBUF_LIMIT = 2 ** 31 - 1


def load_onnx(path: str | Path, what: str = "ONNX model") -> onnx.ModelProto:
    """A parsed ONNX model with its weights, or one clear error (missing, empty, not ONNX)."""
    path = check_input_file(path, what)
    try:
        model = onnx.load(str(path), load_external_data=True)
    except Exception:  # protobuf DecodeError, missing external data, ...: all mean "not a usable ONNX"
        raise ReidExportError(f"{path}: not an ONNX model (the file does not parse as ONNX); "
                              "check the path or re-export it") from None
    if not model.graph.node or not model.opset_import or model.ir_version <= 0:
        raise ReidExportError(f"{path}: not an ONNX model (no graph inside); check the path or re-export it")
    return model


def save_onnx(model: onnx.ModelProto, path: str | Path) -> Path:
    """Write ``model`` to ``path`` atomically (a temp file renamed into place)."""
    data = model.SerializeToString()
    if len(data) >= _PROTOBUF_LIMIT:
        raise ReidExportError(f"{path}: the model is larger than 2 GB, which a single ONNX file cannot hold")
    return atomic_write_bytes(path, data)


def get_metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {prop.key: prop.value for prop in model.metadata_props}


def set_metadata(model: onnx.ModelProto, entries: dict[str, Any]) -> None:
    """Set (replace) metadata entries; dicts/lists are stored as JSON, ``None`` removes a key."""
    current = get_metadata(model)
    for key, value in entries.items():
        if value is None:
            current.pop(key, None)
        elif isinstance(value, (dict, list, tuple)):
            current[key] = json.dumps(value, sort_keys=True, default=str)
        else:
            current[key] = str(value)
    del model.metadata_props[:]
    for key, value in current.items():
        model.metadata_props.add(key=key, value=value)


def get_json(model: onnx.ModelProto, key: str) -> Any:
    text = get_metadata(model).get(key)
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def read_data_config(model: onnx.ModelProto | dict, source: str = "model") -> DataConfig | None:
    """The embedded data config (from a model or its metadata dict), None when there is none."""
    props = model if isinstance(model, dict) else get_metadata(model)
    text = props.get(KEY_DATA_CONFIG)
    if text is None:
        return None
    return DataConfig.from_json(text, f"{source} (embedded data config)")


def input_info(model: onnx.ModelProto) -> tuple[str, list, int]:
    """(name, shape with ints or symbolic names/None, element type) of the image input."""
    initializers = {init.name for init in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if not inputs:
        raise ReidExportError("the ONNX model has no graph input")
    value = inputs[0]
    tensor = value.type.tensor_type
    shape = []
    for dim in tensor.shape.dim:
        if dim.HasField("dim_value"):
            shape.append(int(dim.dim_value))
        else:
            shape.append(dim.dim_param or None)
    return value.name, shape, tensor.elem_type


def output_info(model: onnx.ModelProto) -> tuple[str, list, int]:
    value = model.graph.output[0]
    tensor = value.type.tensor_type
    shape = [int(d.dim_value) if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim]
    return value.name, shape, tensor.elem_type


def annotate_command(path: str | Path, input_shape=None) -> str:
    """The ``reid-export annotate`` command line that gives ``path`` a data config."""
    size = "H W"
    if input_shape is not None and len(input_shape) == 4 and all(isinstance(v, int) and v > 0
                                                                 for v in input_shape[2:]):
        size = f"{input_shape[2]} {input_shape[3]}"
    path = Path(path)
    out = path.with_name(path.stem + ".annotated.onnx")
    return (f"reid-export annotate {path} -o {out} --input-size {size} --mean R,G,B --std R,G,B "
            "--pixel-scale 255|1 --channel-order rgb|bgr --interpolation cubic|linear [--normalized-inside] "
            f"(or find them: reid-export annotate {path} -o {out} --detect LABELLED_CROPS/)")


def require_data_config(model: onnx.ModelProto | dict, path: str | Path, input_shape=None) -> DataConfig:
    """The embedded data config, or an error that shows how to add one."""
    config = read_data_config(model, str(path))
    if config is None:
        if input_shape is None and isinstance(model, onnx.ModelProto):
            try:
                input_shape = input_info(model)[1]
            except ReidExportError:
                input_shape = None
        raise ReidExportError(
            f"{path}: this ONNX carries no reid-export data config (input size, mean/std, ...); "
            f"add one with: {annotate_command(path, input_shape)}"
        )
    return config


def graph_precision(model: onnx.ModelProto) -> str:
    """int8 when the graph has Q/DQ nodes, fp16 when it computes in float16, else fp32."""
    ops = {node.op_type for node in model.graph.node}
    if ops & {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul"}:
        return "int8"
    if any(init.data_type == onnx.TensorProto.FLOAT16 for init in model.graph.initializer):
        return "fp16"
    return "fp32"


def model_precision(model: onnx.ModelProto) -> str:
    return get_metadata(model).get(KEY_PRECISION) or graph_precision(model)


def base_metadata(data_config: DataConfig, precision: str) -> dict[str, Any]:
    return {KEY_DATA_CONFIG: data_config.to_json(), KEY_VERSION: __version__, KEY_PRECISION: precision}


IR_DEAD_ENDS = {
    "onnx": ("an OpenVINO IR is already an exported model: `reid-export onnx` exports PyTorch checkpoints and there is "
             "no IR -> ONNX route; use the IR as it is (annotate, extract, parity, eval, bench and triton take .xml) "
             "or export the checkpoint it came from"),
    "quantize": ("an OpenVINO IR cannot be quantized here (quantize rewrites ONNX graphs); quantize the ONNX it came "
                 "from (reid-export quantize model.onnx ...; reid-export openvino converts the result), or quantize "
                 "the IR with OpenVINO's NNCF (nncf.quantize); for FP16 use reid-export openvino --fp16 on the ONNX "
                 "or run the IR with --device openvino:bf16"),
    "deepstream": ("DeepStream's nvinfer takes ONNX (or a TensorRT engine), not an OpenVINO IR; give the ONNX it "
                   "came from (reid-export deepstream model.onnx ...)"),
    "trt": ("TensorRT builds engines from ONNX, not from an OpenVINO IR; build from the ONNX it came from "
            "(reid-export trt model.onnx ...)"),
}


def refuse_openvino_ir(path: str | Path, command: str) -> None:
    """One line, and what to do instead, when ``path`` is an OpenVINO IR and ``command`` has no IR route."""
    if Path(path).suffix.lower() == ".xml":
        raise ReidExportError(f"{path}: {IR_DEAD_ENDS[command]}", exit_code=2)
