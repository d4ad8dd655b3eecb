"""One INT8 (Q/DQ) graph from an FP32 graph and activation ranges, for one target.

The activation statistics come from :mod:`.calibration` (collected once); this module turns one
set of ranges into a Q/DQ graph with ONNX Runtime's ``QDQQuantizer``, so that the search in
:mod:`.search` can build many candidates (methods, nodes kept in float) from one pass over
the calibration images.

- ``tensorrt``: S8S8, symmetric (zero point 0), per-channel weights, float bias, ReLUs kept, Q/DQ
  on the inputs of Conv/Gemm/MatMul/Add/pools only: what TensorRT's explicit quantization accepts
  (checked by :func:`.qdq_check.check_tensorrt_qdq` before anything is written).
- ``cpu``: U8S8 (uint8 asymmetric activations, int8 symmetric per-channel weights, int32 bias),
  ReLUs folded into the activation ranges: what ONNX Runtime's CPU provider fuses into
  QLinearConv & co.

Both targets quantize an ``Add`` only where one of its inputs comes straight from a Conv/Gemm/MatMul
(a residual connection, which TensorRT fuses into the convolution and ONNX Runtime runs as
QLinearAdd). A sum of other tensors (OSNet's sum of gated streams: four ``Mul`` outputs) stays
float: nothing fuses there, and rounding each stream before the sum cost OSNet-x0.5 a tenth of its
INT8 error (pairwise similarity error 0.302 -> 0.285, benchmarks/RESULTS-archive.md).

Weight range (``reduce_range``, CPU target): x86 CPUs without VNNI multiply U8S8 with
``vpmaddubsw``, whose 16-bit intermediate saturates with full 8-bit weights; 7-bit weights avoid
that at a cost in accuracy. Full-range weights are right for CPUs with an int8 dot product:
x86 with AVX512-VNNI, AVX-VNNI or AMX-INT8, and Arm64 (ONNX Runtime's U8S8 kernels there do not
saturate). :func:`weight_range_for_cpu` decides from the CPU flags, the model's metadata records
the choice and ``bench``/``doctor`` warn when a full-range model runs on a CPU without VNNI.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx

from ...errors import ReidExportError, UsageError
from ..ort import quiet_ort_tools
from ..graph import head_nodes, resolve_excludes, unshare_initializers, upgrade_opset

TARGETS = ("tensorrt", "cpu")
QDQ_OP_TYPES = ["Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "MaxPool", "AveragePool", "GlobalAveragePool"]
CPU_EXTRA_OP_TYPES = ["Relu", "Clip"]
MIN_QDQ_OPSET = 13
# CPU flags under which ONNX Runtime's U8S8 kernels take full 8-bit weights without saturating
DOT_PRODUCT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp")
FULL_RANGE_CPUS = ("x86-64 with AVX512-VNNI, AVX-VNNI or AMX-INT8 (Intel Cascade Lake / Ice Lake / Alder Lake "
                   "and newer, AMD Zen 4 and newer), or Arm64")


def weight_range_for_cpu(flags: set[str] | None = None) -> tuple[bool, str]:
    """(reduce_range, why) for a CPU-target model quantized on this machine (or for ``flags``)."""
    import platform

    from ...cpuinfo import read_cpu_flags

    flags = read_cpu_flags() if flags is None else flags
    dot = sorted(flags & set(DOT_PRODUCT_FLAGS))
    if dot or (not flags and platform.machine().lower() in ("aarch64", "arm64")):
        return False, f"full 8-bit weights: this CPU has an int8 dot product ({', '.join(dot) or 'Arm64'})"
    return True, "7-bit weights: this CPU has no VNNI/AMX int8 dot product (full-range U8S8 would saturate)"


def full_range_warning(flags: set[str] | None = None) -> str | None:
    """The warning for running a full-range U8S8 model here, or None when this CPU suits it."""
    import platform

    from ...cpuinfo import read_cpu_flags

    flags = read_cpu_flags() if flags is None else flags
    if flags & set(DOT_PRODUCT_FLAGS) or (not flags and platform.machine().lower() in ("aarch64", "arm64")):
        return None
    return ("this CPU has no VNNI/AMX int8 dot product, and the model has full 8-bit U8S8 weights (made for "
            f"{FULL_RANGE_CPUS}): ONNX Runtime's AVX2 kernels saturate there and the features lose accuracy; "
            "re-quantize with `reduce_range=True` for this CPU")


@dataclass
class Prepared:
    """The FP32 model made ready for Q/DQ insertion, and what every candidate shares."""

    model: onnx.ModelProto                 # opset >= 13, shapes inferred, node names unique
    target: str
    op_types: list[str]
    head: list[str]
    user_excluded: list[str]
    tensors: list[str]
    static_batch: int | None
    notes: list[str] = field(default_factory=list)
    opset_upgraded_from: int | None = None
    float_sums: list[str] = field(default_factory=list)   # Add nodes kept float by policy (no Conv/Gemm input)

    def quantizable_nodes(self) -> list[str]:
        """Nodes the quantizer would give Q/DQ inputs (before any fallback)."""
        skip = set(self.head) | set(self.user_excluded) | set(self.float_sums)
        ops = set(self.op_types)
        return [n.name for n in self.model.graph.node if n.op_type in ops and n.name not in skip]


def prepare(model: onnx.ModelProto, target: str, exclude: Sequence[str] = ()) -> Prepared:
    from .calibration import tensors_to_calibrate
    from ..metadata import input_info

    if target not in TARGETS:
        raise UsageError(f"`target` must be one of {', '.join(TARGETS)}, got {target!r}")
    model, old_opset = upgrade_opset(model, MIN_QDQ_OPSET)
    notes = []
    if old_opset is not None:
        notes.append(f"upgraded the model from opset {old_opset} to {MIN_QDQ_OPSET} (per-channel quantization needs "
                     f"opset >= {MIN_QDQ_OPSET})")
    exclude_nodes, exclude_ops = resolve_excludes(model, exclude)
    exclude_nodes = exclude_nodes + [n.name for n in model.graph.node if n.op_type in exclude_ops]
    head = head_nodes(model)
    ops = [op for op in QDQ_OP_TYPES + (CPU_EXTRA_OP_TYPES if target == "cpu" else []) if op not in exclude_ops]
    model = onnx.shape_inference.infer_shapes(model)
    sums = [name for name in float_sum_nodes(model) if name not in head and name not in exclude_nodes]
    excluded = list(dict.fromkeys(head + exclude_nodes + sums))
    tensors = tensors_to_calibrate(model, ops, excluded)
    if not tensors:
        raise ReidExportError("nothing to quantize: no Conv/Gemm/MatMul/Add/pool node is left after `exclude`")
    _, shape, _ = input_info(model)
    static = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
    if sums:
        notes.append(f"int8: {len(sums)} Add node(s) with no Conv/Gemm/MatMul input (sums of gated or pooled "
                     "tensors) stay float; residual Adds are quantized")
    return Prepared(model, target, ops, head, list(dict.fromkeys(exclude_nodes)), tensors, static, notes, old_opset,
                    sums)


LINEAR_PRODUCERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def float_sum_nodes(model: onnx.ModelProto) -> list[str]:
    """``Add`` nodes none of whose inputs is produced by a Conv/ConvTranspose/Gemm/MatMul."""
    producer = {o: n.op_type for n in model.graph.node for o in n.output}
    return [n.name for n in model.graph.node
            if n.op_type == "Add" and not any(producer.get(x) in LINEAR_PRODUCERS for x in n.input)]


def _qdq_quantizer(model, reduce_range, weight, activation, tensors_range, excluded, ops, extra):
    """ONNX Runtime's ``QDQQuantizer`` by keyword: its positional signature changed across releases
    (1.17 still took ``mode`` and ``static``)."""
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer

    kwargs = dict(model=model, per_channel=True, reduce_range=reduce_range, weight_qType=weight,
                  activation_qType=activation, tensors_range=tensors_range, nodes_to_quantize=[],
                  nodes_to_exclude=excluded, op_types_to_quantize=ops, extra_options=extra)
    params = inspect.signature(QDQQuantizer.__init__).parameters
    if "mode" in params:
        from onnxruntime.quantization.quant_utils import QuantizationMode

        kwargs.update(mode=QuantizationMode.QLinearOps, static=True)
    return QDQQuantizer(**kwargs)


def build_qdq(prepared: Prepared, ranges: dict[str, tuple[float, float]], reduce_range: bool,
              fallback_float: Sequence[str] = (), input_means: dict[str, np.ndarray] | None = None) -> onnx.ModelProto:
    """The Q/DQ graph for ``prepared.target`` with these activation ranges; ``fallback_float`` nodes stay float.

    ``input_means``: per-channel means of the Conv inputs; when given, the bias of every quantized
    Conv is corrected for the mean output shift its weight rounding causes (:func:`correct_biases`)."""
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorsData

    if reduce_range and prepared.target != "cpu":
        raise UsageError("`reduce_range` applies to `target` cpu (TensorRT takes full 8-bit weights)")
    tensors_range = TensorsData(CalibrationMethod.MinMax,
                                {name: (np.array(lo, dtype=np.float32), np.array(hi, dtype=np.float32))
                                 for name, (lo, hi) in ranges.items()})
    if prepared.target == "tensorrt":
        activation, weight = QuantType.QInt8, QuantType.QInt8
        extra = {"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False,
                 "QDQKeepRemovableActivations": True,
                 "OpTypesToExcludeOutputQuantization": ["Conv", "ConvTranspose", "Gemm", "MatMul", "Add"]}
    else:
        activation, weight = QuantType.QUInt8, QuantType.QInt8
        extra = {"ActivationSymmetric": False, "WeightSymmetric": True, "QuantizeBias": True}
    model = onnx.ModelProto()
    model.CopyFrom(prepared.model)  # the quantizer edits its model in place
    excluded = list(dict.fromkeys(prepared.head + prepared.user_excluded + prepared.float_sums + list(fallback_float)))
    unshare_initializers(model, excluded, "float")  # a node kept in float keeps float weights
    if input_means is not None and "Conv" in prepared.op_types:
        correct_biases(model, input_means, set(excluded), weight_levels(prepared.target, reduce_range))
    with quiet_ort_tools():
        quantizer = _qdq_quantizer(model, reduce_range, weight, activation, tensors_range, excluded,
                                   prepared.op_types, extra)
        quantizer.quantize_model()
        quantizer.model.topological_sort()
        return quantizer.model.model


def weight_levels(target: str, reduce_range: bool) -> int:
    """Steps per side of the symmetric weight grid ONNX Runtime's quantizer uses (127; 64 with reduce_range)."""
    return 64 if (reduce_range and target == "cpu") else 127


def correct_biases(model: onnx.ModelProto, input_means: dict[str, np.ndarray], float_nodes: set[str],
                   levels: int = 127) -> int:
    """Bias correction for weight rounding (Nagel et al. 2019, section 4.2), in place; returns how many Convs.

    Rounding a convolution's weights to the per-output-channel int8 grid shifts each output
    channel by ``sum(dW * E[x])`` on average: a systematic error that the next layers carry. With
    ``E[x]`` per input channel measured on calibration images, each quantized Conv's bias (added
    when it has none) is lowered by that shift; the rounding is the quantizer's own (symmetric,
    ``levels`` steps per side of the row's largest |w|). Conv nodes in ``float_nodes`` keep their
    weights and so their bias; a bias shared by several Convs is copied first (each sees other
    inputs)."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    targets = [n.name for n in model.graph.node if n.op_type == "Conv" and n.name not in float_nodes
               and len(n.input) >= 2 and n.input[1] in inits and n.input[0] in input_means]
    unshare_initializers(model, targets, "bc", inputs=(2,))  # each Conv sees other inputs: its own bias
    inits = {i.name: i for i in model.graph.initializer}
    wanted = set(targets)
    done = 0
    for node in model.graph.node:
        if node.name not in wanted:
            continue
        w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
        groups = next((int(a.i) for a in node.attribute if a.name == "group"), 1)
        mean = np.asarray(input_means[node.input[0]], dtype=np.float64)
        if w.ndim < 3 or mean.shape != (w.shape[1] * groups,):
            continue
        step = np.abs(w).reshape(w.shape[0], -1).max(axis=1) / levels
        step = np.where(step > 0, step, 1.0).reshape((-1,) + (1,) * (w.ndim - 1))
        dw = np.clip(np.round(w / step), -levels, levels) * step - w
        per_out = w.shape[0] // groups
        shift = np.einsum("goc,gc->go", dw.reshape(w.shape[0], w.shape[1], -1).sum(axis=2)
                          .reshape(groups, per_out, w.shape[1]), mean.reshape(groups, w.shape[1])).reshape(-1)
        if len(node.input) > 2 and node.input[2] and node.input[2] in inits:
            bias = numpy_helper.to_array(inits[node.input[2]]).astype(np.float64)
            name = node.input[2]
        else:
            bias, name = np.zeros(w.shape[0]), f"{node.name}__bias_corrected"
        tensor = numpy_helper.from_array((bias - shift).astype(np.float32), name)
        if name in inits:
            inits[name].CopyFrom(tensor)
        else:
            model.graph.initializer.append(tensor)
            inits[name] = tensor
            if len(node.input) > 2:
                node.input[2] = name
            else:
                node.input.append(name)
        done += 1
    return done


def conv_input_means(model: onnx.ModelProto, batches, threads: int | None = None, skip_nodes: Sequence[str] = (),
                     progress=None) -> dict[str, np.ndarray]:
    """Per-channel mean of every Conv input (graph input included) over ``batches`` of (inputs, valid)."""
    from .calibration import channel_statistics

    skip = set(skip_nodes)
    wanted = list(dict.fromkeys(n.input[0] for n in model.graph.node if n.op_type == "Conv" and n.name not in skip))
    return {name: stats["mean"] for name, stats in channel_statistics(model, wanted, batches, threads, progress).items()}


def describe(prepared: Prepared, reduce_range: bool) -> dict:
    cpu = prepared.target == "cpu"
    info = {
        "target": prepared.target,
        "activations": "uint8 asymmetric per-tensor" if cpu else "int8 symmetric per-tensor",
        "weights": "int8 symmetric per-channel" + (" (7-bit, reduce_range)" if reduce_range else ""),
        "bias": "int32" if cpu else "float",
        "op_types": prepared.op_types, "tensors_calibrated": len(prepared.tensors),
        "float_sums": len(prepared.float_sums),
        "reduce_range": bool(reduce_range),
    }
    if cpu:
        info["weights_for"] = ("any x86-64 CPU (AVX2 or newer) and Arm64" if reduce_range else FULL_RANGE_CPUS
                               + "; on x86 without VNNI the U8S8 products saturate: re-quantize with `reduce_range=True`")
    if prepared.opset_upgraded_from is not None:
        info["opset_upgraded_from"] = prepared.opset_upgraded_from
    return info


__all__ = ["TARGETS", "QDQ_OP_TYPES", "Prepared", "prepare", "float_sum_nodes", "build_qdq",
           "weight_range_for_cpu", "full_range_warning", "describe", "correct_biases", "conv_input_means"]


def quantization_metadata(path: str | Path) -> dict:
    """The ``reid_export.quantization`` metadata of an ONNX file this toolchain quantized ({} for any other
    file, or one that cannot be read: not ours to judge, the backend reports unreadable models itself)."""
    import json

    path = Path(path)
    if path.suffix != ".onnx" or not path.is_file():
        return {}
    try:
        model = onnx.load(str(path), load_external_data=False)
        props = {p.key: p.value for p in model.metadata_props}
        return json.loads(props.get("reid_export.quantization", "{}"))
    except Exception:  # noqa: BLE001
        return {}


def quantization_target(path: str | Path) -> str | None:
    """``tensorrt`` / ``cpu`` for an INT8 ONNX this toolchain wrote (from its metadata), else None."""
    return quantization_metadata(path).get("target")


def model_weight_range_warning(path: str | Path, flags: set[str] | None = None) -> str | None:
    """For an ONNX file quantized by ``--target cpu`` with full 8-bit weights: the warning when this
    CPU lacks the int8 dot product it was made for (None for every other model)."""
    info = quantization_metadata(path)
    if info.get("target") != "cpu" or info.get("reduce_range", True):
        return None
    warning = full_range_warning(flags)
    return f"warning: {Path(path).name}: {warning}" if warning else None
