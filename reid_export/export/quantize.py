"""FP16 and INT8 (Q/DQ) variants of an FP32 ONNX model; precision lives in the graph.

FP16: onnxconverter-common's converter turns the graph to float16 with float32 inputs/outputs.
The input normalisation and the head (pooling incl. GeM's clip/pow/mean, the BNNeck, the
flatten) stay in float32: GeM cubes activations (FP16 overflows above ~40) and the feature is the
product. Weights outside the FP16 range are reported.

INT8: static calibration on real images read with the one preprocessing function, statistics from
:mod:`.calibrate`, Q/DQ insertion by ONNX Runtime's ``QDQQuantizer``:

- ``--target tensorrt``: S8S8, symmetric (zero point 0), per-channel weights, float bias, ReLUs
  kept, Q/DQ on the inputs of Conv/Gemm/MatMul/Add/MaxPool only: what TensorRT's explicit
  quantization accepts; checked by :func:`.qdq_check.check_tensorrt_qdq` before writing.
- ``--target cpu``: U8S8 (uint8 asymmetric activations, int8 symmetric per-channel weights, int32
  bias), ReLUs folded into the activation ranges: what ONNX Runtime's CPU provider fuses into
  QLinearConv & co. Weights use 7 bits (``reduce_range``) by default: x86 CPUs without VNNI
  multiply U8S8 with a saturating 16-bit intermediate (``vpmaddubsw``), which wrecks accuracy
  with full-range weights (measured here on an AVX2 EPYC: relative L2 0.18 vs 0.004).

The head stays in float in both. Models below opset 13 are upgraded first (per-channel
DequantizeLinear needs the ``axis`` attribute of opset 13).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnx

from .. import __version__
from ..data_config import DataConfig
from ..errors import ReidExportError, UsageError
from ..fileio import check_output_path, sha256_file
from ..runtime.preprocess import expand_image_paths, preprocess
from .calibrate import DEFAULT_NUM_BINS, DEFAULT_PERCENTILE, METHODS, collect, tensors_to_calibrate
from .graph import ensure_node_names, head_nodes, input_prefix_nodes, opset_of, resolve_excludes, upgrade_opset
from .metadata import (KEY_FP16, KEY_QUANTIZATION, KEY_SOURCE, KEY_SOURCE_SHA256, base_metadata, get_metadata,
                       input_info, load_onnx, model_precision, require_data_config, save_onnx, set_metadata)
from .qdq_check import FusionReport, QDQReport, check_ort_cpu_fusion, check_tensorrt_qdq

PRECISIONS = ("fp16", "int8")
TARGETS = ("tensorrt", "cpu")
DEFAULT_CALIB_SIZE = 512
DEFAULT_METHOD = "entropy"
QDQ_OP_TYPES = ["Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "MaxPool", "AveragePool", "GlobalAveragePool"]
CPU_EXTRA_OP_TYPES = ["Relu", "Clip"]
MIN_QDQ_OPSET = 13
FP16_MAX = 65504.0
FP16_MIN_NORMAL = 6.103515625e-05
FP16_MIN_SUBNORMAL = 5.960464477539063e-08


@dataclass
class QuantizeReport:
    output: Path
    precision: str
    target: str | None = None
    method: str | None = None
    calibration_images: int = 0
    notes: list[str] = field(default_factory=list)
    kept_float: list[str] = field(default_factory=list)
    parity: dict = field(default_factory=dict)
    qdq: QDQReport | None = None
    fusion: FusionReport | None = None
    size_mb: float = 0.0
    seconds: float = 0.0


@contextlib.contextmanager
def _quiet_ort_quantization():
    """ONNX Runtime's quantization tools log on the root logger and print; keep our output clean."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _load_fp32(model_path: str | Path) -> tuple[onnx.ModelProto, DataConfig]:
    model = load_onnx(model_path)
    data_config = require_data_config(model, model_path)
    precision = model_precision(model)
    if precision != "fp32":
        raise ReidExportError(f"{model_path}: the model is already {precision}; quantize the FP32 model")
    ensure_node_names(model)
    return model, data_config


def select_calibration_images(dirs: Sequence[str | Path], size: int, seed: int,
                              log: Callable[[str], None]) -> list[Path]:
    """``size`` images drawn (by ``seed``) from the folders/files given, or all there are, said so."""
    if size < 1:
        raise UsageError(f"--calib-size must be >= 1, got {size}")
    paths = list(dict.fromkeys(expand_image_paths(dirs)))
    where = ", ".join(str(d) for d in dirs)
    if len(paths) < size:
        log(f"calibration: {where} holds {len(paths)} images, fewer than --calib-size {size}; using all {len(paths)}")
        return paths
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(paths), size=size, replace=False).tolist())
    log(f"calibration: {size} of the {len(paths)} images in {where} (seed {seed})")
    return [paths[i] for i in chosen]


def _file_list_digest(paths: Sequence[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(str(path.name).encode("utf-8") + b"\n")
    return digest.hexdigest()


def _features(model_bytes: bytes, inputs: np.ndarray, data_config: DataConfig, name: str) -> np.ndarray:
    from ..runtime.onnx_backend import OnnxEncoder, make_session

    encoder = OnnxEncoder(make_session(model_bytes), data_config, name)
    return encoder(inputs)


def compare_features(reference: np.ndarray, candidate: np.ndarray) -> dict:
    """The verifier's embedding comparison, without gates (quantize reports; ``verify parity`` judges)."""
    from ..verify.parity import Tolerances, compare

    result = compare(reference, candidate, Tolerances())
    return {"images": result.num_images, "min_cosine": result.min_cosine, "mean_cosine": result.mean_cosine,
            "max_rel_l2": result.max_rel_l2, "finite": result.nonfinite == 0}


def _parity_line(precision: str, parity: dict, source: str) -> str:
    return (f"{precision} vs fp32 (ONNX Runtime CPU) on {parity['images']} {source}: min cosine "
            f"{parity['min_cosine']:.5f}, max relative L2 {parity['max_rel_l2']:.2e}")


def fp16_weight_warnings(model: onnx.ModelProto, keep_nodes: set[str]) -> list[str]:
    """Float weights of converted nodes that FP16 cannot hold (clamped) or holds imprecisely (subnormal)."""
    from onnx import numpy_helper

    kept_inputs = {name for node in model.graph.node if node.name in keep_nodes for name in node.input}
    over, tiny, subnormal, worst = 0, 0, 0, 0.0
    tensors_over: list[str] = []
    for init in model.graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT or init.name in kept_inputs:
            continue
        values = np.abs(numpy_helper.to_array(init))
        n_over = int(np.sum(values > FP16_MAX))
        if n_over:
            over += n_over
            worst = max(worst, float(values.max()))
            tensors_over.append(init.name)
        nonzero = values[values > 0]
        tiny += int(np.sum(nonzero < FP16_MIN_SUBNORMAL))
        subnormal += int(np.sum((nonzero >= FP16_MIN_SUBNORMAL) & (nonzero < FP16_MIN_NORMAL)))
    lines = []
    if over:
        lines.append(f"warning: {over} weight values exceed the FP16 range (max |w| {worst:.3g} > 65504) in "
                        f"{', '.join(tensors_over[:4])}; they are clamped to 65504 (exclude those nodes with --exclude)")
    if tiny:
        lines.append(f"warning: {tiny} nonzero weight values are below FP16's smallest subnormal (5.96e-08); "
                        "they become +-5.96e-08")
    if subnormal:
        lines.append(f"note: {subnormal} weight values are FP16 subnormals (|w| < 6.1e-05) and lose precision")
    return lines


def _split_head(model: onnx.ModelProto, head: set[str], blocked: set[str]) -> tuple[set[str], list[str]]:
    """Grow ``head`` until no blocked node produces a tensor the head (or the output) reads from the body.

    Returns the head and the boundary tensors (body outputs that the FP32 part reads).
    """
    outputs = [out.name for out in model.graph.output]
    while True:
        body = [node for node in model.graph.node if node.name not in head]
        produced = {name for node in body for name in node.output}
        wanted = [name for node in model.graph.node if node.name in head for name in node.input] + outputs
        boundary = [name for name in dict.fromkeys(wanted) if name in produced]
        movers = {node.name for node in body if node.name in blocked and set(node.output) & set(boundary)}
        if not movers:
            return head, boundary
        head |= movers


def convert_fp16(model: onnx.ModelProto, exclude: Sequence[str] = (),
                 log: Callable[[str], None] = print) -> tuple[onnx.ModelProto, list[str]]:
    """The FP16 graph (FP32 I/O) and the names of the nodes kept in FP32.

    The head (see :func:`.graph.head_nodes`) is cut off, the rest is converted by
    onnxconverter-common with FP32 inputs/outputs (its input normalisation and any ``--exclude``
    nodes blocked), and the FP32 head is put back on the FP32 boundary tensors. (The converter
    cannot itself block a node that produces a graph output together with ``keep_io_types``.)
    """
    from onnxconverter_common import float16

    exclude_nodes, exclude_ops = resolve_excludes(model, exclude)
    blocked = set(input_prefix_nodes(model)) | set(exclude_nodes)
    blocked |= {node.name for node in model.graph.node if node.op_type in exclude_ops}
    head, boundary = _split_head(model, set(head_nodes(model)), blocked)
    keep = [node.name for node in model.graph.node if node.name in head or node.name in blocked]
    for line in fp16_weight_warnings(model, set(keep)):
        log(line)

    inferred = onnx.shape_inference.infer_shapes(model)
    infos = {v.name: v for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    missing = [name for name in boundary if name not in infos]
    if missing:
        raise ReidExportError(f"FP16 conversion: no type is known for {', '.join(missing[:3])} (shape inference "
                              "failed there); exclude fewer nodes or re-export the model")
    body_nodes = [node for node in model.graph.node if node.name not in head]
    head_list = [node for node in model.graph.node if node.name in head]
    body_uses = {name for node in body_nodes for name in node.input}
    head_uses = {name for node in head_list for name in node.input}
    body_graph = onnx.helper.make_graph(
        body_nodes, model.graph.name, list(model.graph.input), [infos[name] for name in boundary],
        [init for init in model.graph.initializer if init.name in body_uses])
    body = onnx.helper.make_model(body_graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    op_block = list(dict.fromkeys(list(float16.DEFAULT_OP_BLOCK_LIST) + list(exclude_ops)))
    with _quiet_ort_quantization(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            converted = float16.convert_float_to_float16(
                body, min_positive_val=FP16_MIN_SUBNORMAL, max_finite_val=FP16_MAX, keep_io_types=True,
                op_block_list=op_block, node_block_list=sorted(blocked - head))
        except Exception as exc:
            raise ReidExportError(f"FP16 conversion failed ({type(exc).__name__}: {str(exc)[:200]}); "
                                  "try --exclude on the node it names") from None

    # Put the FP32 head back, on the FP32 boundary tensors the converter left as outputs.
    converted_inits = {init.name: init for init in converted.graph.initializer}
    renames: dict[str, str] = {}
    extra_inits = []
    for init in model.graph.initializer:
        if init.name not in head_uses:
            continue
        if init.name in converted_inits:
            if converted_inits[init.name].data_type != init.data_type:
                copy = onnx.TensorProto()
                copy.CopyFrom(init)
                copy.name = init.name + "_fp32"
                renames[init.name] = copy.name
                extra_inits.append(copy)
        else:
            extra_inits.append(init)
    for node in head_list:
        for i, name in enumerate(node.input):
            node.input[i] = renames.get(name, name)
    graph = converted.graph
    graph.node.extend(head_list)
    graph.initializer.extend(extra_inits)
    del graph.output[:]
    graph.output.extend(model.graph.output)
    # The converter can leave two value_infos (fp32 and fp16) for a tensor; infer them afresh.
    del graph.value_info[:]
    del converted.metadata_props[:]
    converted.metadata_props.extend(model.metadata_props)
    return onnx.shape_inference.infer_shapes(converted), keep


def _calibration_batches(paths: Sequence[Path], data_config: DataConfig, batch: int, static: bool):
    for start in range(0, len(paths), batch):
        chunk = preprocess(paths[start:start + batch], data_config)
        valid = len(chunk)
        if static and valid < batch:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - valid, axis=0)])
        yield chunk, valid


def quantize_int8(model: onnx.ModelProto, data_config: DataConfig, calib_paths: Sequence[Path],
                  target: str = "tensorrt", method: str = DEFAULT_METHOD, percentile: float = DEFAULT_PERCENTILE,
                  exclude: Sequence[str] = (), num_bins: int = DEFAULT_NUM_BINS, batch_size: int = 8,
                  reduce_range: bool | None = None, threads: int | None = None, progress: bool = True,
                  log: Callable[[str], None] = print) -> tuple[onnx.ModelProto, dict]:
    """The Q/DQ model for ``target`` and a record of how it was made."""
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer
    from tqdm import tqdm

    if target not in TARGETS:
        raise UsageError(f"--target must be one of {', '.join(TARGETS)}, got {target!r}")
    if method not in METHODS:
        raise UsageError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if reduce_range is None:
        reduce_range = target == "cpu"
    elif reduce_range and target != "cpu":
        raise UsageError("--reduce-range applies to --target cpu (TensorRT takes full 8-bit weights)")
    info: dict = {"target": target, "method": method}
    model, old_opset = upgrade_opset(model, MIN_QDQ_OPSET)
    if old_opset is not None:
        log(f"upgraded the model from opset {old_opset} to {MIN_QDQ_OPSET} (per-channel quantization needs "
            f"opset >= {MIN_QDQ_OPSET})")
        info["opset_upgraded_from"] = old_opset
    exclude_nodes, exclude_ops = resolve_excludes(model, exclude)
    head = head_nodes(model)
    ops = [op for op in QDQ_OP_TYPES + (CPU_EXTRA_OP_TYPES if target == "cpu" else []) if op not in exclude_ops]
    excluded = list(dict.fromkeys(head + exclude_nodes))
    model = onnx.shape_inference.infer_shapes(model)
    tensors = tensors_to_calibrate(model, ops, excluded)
    if not tensors:
        raise ReidExportError("nothing to quantize: no Conv/Gemm/MatMul/Add/pool node is left after --exclude")

    _, shape, _ = input_info(model)
    static = isinstance(shape[0], int) and shape[0] > 0
    batch = shape[0] if static else batch_size
    bar = tqdm(total=len(calib_paths), desc=f"calibrate {len(calib_paths)} images ({len(tensors)} tensors)", unit="img",
               disable=not progress, leave=False)
    try:
        calibration = collect(model, tensors, _calibration_batches(calib_paths, data_config, batch, static),
                              histograms=method != "minmax", num_bins=num_bins, threads=threads, progress=bar)
    finally:
        bar.close()
    tensors_range = calibration.tensors_data(method, percentile, unsigned_activations=target == "cpu")

    if target == "tensorrt":
        activation, weight = QuantType.QInt8, QuantType.QInt8
        extra = {"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False,
                 "QDQKeepRemovableActivations": True,
                 "OpTypesToExcludeOutputQuantization": ["Conv", "ConvTranspose", "Gemm", "MatMul", "Add"]}
    else:
        activation, weight = QuantType.QUInt8, QuantType.QInt8
        extra = {"ActivationSymmetric": False, "WeightSymmetric": True, "QuantizeBias": True}
    with _quiet_ort_quantization():
        quantizer = QDQQuantizer(model, True, reduce_range, weight, activation, tensors_range, [], excluded, ops,
                                 extra)
        quantizer.quantize_model()
        quantizer.model.topological_sort()
        quantized = quantizer.model.model
    info.update({
        "activations": "int8 symmetric per-tensor" if target == "tensorrt" else "uint8 asymmetric per-tensor",
        "weights": "int8 symmetric per-channel" + (" (7-bit, reduce_range)" if reduce_range else ""),
        "bias": "float" if target == "tensorrt" else "int32",
        "op_types": ops, "kept_float": excluded, "tensors_calibrated": len(tensors),
        "num_bins": num_bins if method != "minmax" else None,
        "percentile": percentile if method == "percentile" else None,
    })
    return quantized, info


def quantize_file(model_path: str | Path, output: str | Path, precision: str, target: str = "tensorrt",
                  calib_dirs: Sequence[str | Path] = (), calib_size: int = DEFAULT_CALIB_SIZE,
                  method: str = DEFAULT_METHOD, percentile: float | None = None, exclude: Sequence[str] = (),
                  seed: int = 0, num_bins: int = DEFAULT_NUM_BINS, batch_size: int = 8, reduce_range: bool | None = None,
                  threads: int | None = None, progress: bool = True,
                  log: Callable[[str], None] = print) -> QuantizeReport:
    """Make the FP16 or INT8 variant of an FP32 ONNX model; ``output`` is written only on success."""
    from .onnx_export import generated_images

    start = time.time()
    if precision not in PRECISIONS:
        raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if percentile is not None and method != "percentile":
        raise UsageError("--percentile applies to --method percentile")
    if percentile is not None and not 50.0 < percentile <= 100.0:
        raise UsageError(f"--percentile must be in (50, 100], got {percentile}")
    if precision == "int8" and target not in TARGETS:
        raise UsageError(f"--target must be one of {', '.join(TARGETS)}, got {target!r}")
    if precision == "int8" and method not in METHODS:
        raise UsageError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if precision == "int8" and reduce_range and target != "cpu":
        raise UsageError("--reduce-range applies to --target cpu (TensorRT takes full 8-bit weights)")
    if precision == "int8" and not calib_dirs:
        raise UsageError("--precision int8 needs real calibration images: --calib-dir DIR (for example the "
                         "training crops, bounding_box_train/)")
    output = check_output_path(output)
    model, data_config = _load_fp32(model_path)
    resolve_excludes(model, exclude)  # an unknown --exclude fails before any work is done
    source_bytes = model.SerializeToString()
    report = QuantizeReport(output=output, precision=precision)
    # Notes (images used, opset upgrade, FP16 weight range) are printed once the model is written:
    # a run that fails (a corrupt calibration image, say) prints its one error line and nothing else.
    notes: list[str] = []
    note = notes.append

    calib_paths: list[Path] = []
    if calib_dirs:  # fp16 needs no calibration: its images only measure the agreement with FP32
        calib_paths = select_calibration_images(calib_dirs, calib_size if precision == "int8" else 16, seed,
                                                note if precision == "int8" else (lambda line: None))

    if precision == "fp16":
        converted, keep = convert_fp16(model, exclude, note)
        report.kept_float = keep
        extra_meta = {KEY_FP16: {"kept_fp32": keep, "converter": _converter_version(), "io": "float32"}}
    else:
        converted, info = quantize_int8(model, data_config, calib_paths, target, method,
                                        percentile if percentile is not None else DEFAULT_PERCENTILE, exclude,
                                        num_bins, batch_size, reduce_range, threads, progress, note)
        report.target, report.method = target, method
        report.calibration_images = len(calib_paths)
        report.kept_float = info["kept_float"]
        info["calibration"] = {"sources": [str(d) for d in calib_dirs], "images": len(calib_paths),
                               "requested": calib_size, "seed": seed, "files_sha256": _file_list_digest(calib_paths)}
        extra_meta = {KEY_QUANTIZATION: info}
        if target == "tensorrt":
            report.qdq = check_tensorrt_qdq(converted)
            if not report.qdq.ok:
                raise ReidExportError(f"{output}: the Q/DQ graph breaks TensorRT's rules ({'; '.join(report.qdq.problems[:3])}); "
                                      "not written")
    try:
        onnx.checker.check_model(converted)
    except Exception as exc:
        raise ReidExportError(f"{output}: the {precision} graph fails onnx.checker "
                              f"({str(exc).splitlines()[0][:200]}); not written") from None
    converted_bytes = converted.SerializeToString()  # serialised once: fusion check and parity both run it
    if precision == "int8" and target == "cpu":
        import onnxruntime

        report.fusion = check_ort_cpu_fusion(converted, threads or 1, serialized=converted_bytes)
        extra_meta[KEY_QUANTIZATION]["ort_cpu_fusion"] = {
            "quantized_convs": report.fusion.quantized_convs, "qlinear_convs": report.fusion.qlinear_convs,
            "onnxruntime": onnxruntime.__version__}

    # How far the variant is from the FP32 model, on real images when there are some.
    if calib_paths:
        sample = calib_paths[:: max(1, len(calib_paths) // 16)][:16]
        inputs = preprocess(sample, data_config)
        what = "calibration images" if precision == "int8" else "images from --calib-dir"
    else:
        inputs, what = preprocess(generated_images(8, data_config.input_size), data_config), "generated images"
    reference = _features(source_bytes, inputs, data_config, str(model_path))
    candidate = _features(converted_bytes, inputs, data_config, str(output))
    report.parity = compare_features(reference, candidate)
    if not report.parity["finite"]:
        raise ReidExportError(f"{output}: the {precision} model gives non-finite features; not written "
                              "(exclude the overflowing nodes with --exclude)")
    note(_parity_line(precision, report.parity, what))

    metadata = base_metadata(data_config, precision)
    props = get_metadata(model)
    metadata.update({KEY_SOURCE: Path(model_path).name, KEY_SOURCE_SHA256: sha256_file(model_path),
                     "reid_export.fp32_source": props.get(KEY_SOURCE), "reid_export.parity_vs_fp32": report.parity})
    metadata.update(extra_meta)
    converted.doc_string = f"reid-export {__version__}: {Path(model_path).name} -> {precision}"
    set_metadata(converted, metadata)
    save_onnx(converted, output)
    for line in notes:
        log(line)
    report.size_mb = output.stat().st_size / 1e6
    report.seconds = time.time() - start
    return report


def _converter_version() -> str:
    try:
        import onnxconverter_common

        return f"onnxconverter-common {onnxconverter_common.__version__}"
    except Exception:
        return "onnxconverter-common"


__all__ = ["quantize_file", "quantize_int8", "convert_fp16", "select_calibration_images", "opset_of"]
