"""Check a Q/DQ graph against TensorRT's explicit-quantization rules.

TensorRT builds an INT8 engine from a Q/DQ ONNX only when the quantization is expressed the way
it supports: INT8 (signed) Q/DQ with zero point 0 (symmetric), constant positive scales,
per-tensor scales for activations, per-tensor or per-channel scales for weights with the axis on
the output channels, and biases left in float (no DequantizeLinear of an INT32 bias). ONNX
Runtime's CPU-oriented defaults (uint8 activations with a zero point, quantized bias) break
these rules, so every ``--target tensorrt`` model is checked before it is written.

The ``--target cpu`` counterpart, :func:`check_ort_cpu_fusion`, asks ONNX Runtime itself: it
optimizes the graph the way the CPU provider does and counts how many of the quantized
convolutions became QLinearConv. A DequantizeLinear -> Conv pair that is left unfused runs in
float after a dequantization, slower than the FP32 model.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

_Q_OPS = ("QuantizeLinear", "DequantizeLinear")
# Which input is the weight and which axis holds its output channels, per consumer op.
_WEIGHT_INPUT = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}


@dataclass
class QDQReport:
    problems: list[str] = field(default_factory=list)
    quantize_nodes: int = 0
    dequantize_nodes: int = 0
    per_channel_weights: int = 0
    per_tensor_weights: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        state = "passes" if self.ok else f"breaks {len(self.problems)} rule(s)"
        return (f"TensorRT Q/DQ check {state}: {self.quantize_nodes} Q / {self.dequantize_nodes} DQ nodes, "
                f"{self.per_channel_weights} per-channel and {self.per_tensor_weights} per-tensor weights")


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    values = {init.name: init for init in model.graph.initializer}
    out = {name: value for name, value in values.items()}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output:
            for attr in node.attribute:
                if attr.name == "value":
                    out[node.output[0]] = attr.t
    return out


def _attr(node: onnx.NodeProto, name: str, default=None):
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def _weight_axis(consumer: onnx.NodeProto, rank: int) -> int:
    if consumer.op_type == "ConvTranspose":
        return 1
    if consumer.op_type == "Gemm":
        return 0 if _attr(consumer, "transB", 0) else 1
    if consumer.op_type == "MatMul":
        return rank - 1
    return 0


def check_tensorrt_qdq(model: onnx.ModelProto) -> QDQReport:
    """Every rule TensorRT's explicit quantization imposes on Q/DQ nodes, as a list of problems."""
    report = QDQReport()
    constants = _constants(model)
    arrays: dict[str, np.ndarray] = {}

    def const(name: str) -> np.ndarray | None:
        if name not in constants:
            return None
        if name not in arrays:
            arrays[name] = numpy_helper.to_array(constants[name])
        return arrays[name]

    users: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)

    for node in model.graph.node:
        if node.op_type not in _Q_OPS:
            continue
        where = f"{node.op_type} {node.name or node.output[0]}"
        if node.op_type == "QuantizeLinear":
            report.quantize_nodes += 1
        else:
            report.dequantize_nodes += 1
        if node.domain not in ("", "ai.onnx"):
            report.problems.append(f"{where}: domain {node.domain} (TensorRT reads the standard ONNX op)")
        scale = const(node.input[1]) if len(node.input) > 1 else None
        if scale is None:
            report.problems.append(f"{where}: the scale is not a constant")
            continue
        if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
            report.problems.append(f"{where}: scales must be finite and > 0")
        if len(node.input) < 3 or not node.input[2]:
            # No zero point: the quantized type defaults to uint8, which TensorRT does not take.
            if node.op_type == "QuantizeLinear" and _attr(node, "output_dtype", 0) != onnx.TensorProto.INT8:
                report.problems.append(f"{where}: no zero point, so the type is uint8; TensorRT needs int8")
            zero = None
        else:
            zero = const(node.input[2])
            if zero is None:
                report.problems.append(f"{where}: the zero point is not a constant")
            elif zero.dtype != np.int8:
                report.problems.append(f"{where}: {zero.dtype} quantization; TensorRT's explicit quantization is int8")
            elif np.any(zero != 0):
                report.problems.append(f"{where}: zero point {zero.ravel()[:4].tolist()}; TensorRT needs 0 "
                                       "(symmetric quantization)")
        if node.op_type == "DequantizeLinear":
            data = const(node.input[0])
            if data is not None and data.dtype == np.int32:
                report.problems.append(f"{where}: dequantizes an int32 bias; leave biases in float for TensorRT")
                continue
            if data is not None:  # a weight: int8 constant -> DQ -> Conv/Gemm/MatMul
                consumers = [c for c in users.get(node.output[0], []) if c.op_type in _WEIGHT_INPUT]
                per_channel = scale.size > 1
                if per_channel:
                    report.per_channel_weights += 1
                    if opset < 13:
                        report.problems.append(f"{where}: per-channel scales need opset >= 13 (model is {opset})")
                    axis = _attr(node, "axis", 1)
                    if axis < 0:
                        axis += data.ndim
                    for consumer in consumers:
                        want = _weight_axis(consumer, data.ndim)
                        if axis != want:
                            report.problems.append(f"{where}: per-channel axis {axis} for the weight of "
                                                   f"{consumer.op_type} {consumer.name}; must be {want} "
                                                   "(output channels)")
                        elif scale.size != data.shape[axis]:
                            report.problems.append(f"{where}: {scale.size} scales for {data.shape[axis]} channels")
                else:
                    report.per_tensor_weights += 1
                continue
        if scale.size > 1:
            report.problems.append(f"{where}: per-channel scales on an activation; TensorRT needs per-tensor")
    return report


@dataclass
class FusionReport:
    """What ONNX Runtime's CPU provider makes of a Q/DQ graph."""
    quantized_convs: int              # Conv nodes whose data input comes through a DequantizeLinear
    qlinear_convs: int                # QLinearConv nodes in the optimized graph
    optimized_ops: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.qlinear_convs >= self.quantized_convs

    def summary(self) -> str:
        ops = self.optimized_ops
        head = (f"ONNX Runtime CPU fusion: {self.qlinear_convs} of {self.quantized_convs} quantized convolutions run "
                f"as QLinearConv")
        extra = ", ".join(f"{ops[op]} {op}" for op in ("QLinearAdd", "QLinearGlobalAveragePool", "QLinearMatMul")
                          if ops.get(op))
        left = ops.get("DequantizeLinear", 0)
        return (head + (f", {extra}" if extra else "") + f"; {left} DequantizeLinear left"
                + ("" if self.ok else f"; the other {self.quantized_convs - self.qlinear_convs} dequantize and run "
                   "in float, slower than FP32 on ONNX Runtime's CPU provider"))


def check_ort_cpu_fusion(model: onnx.ModelProto, threads: int = 1, serialized: bytes | None = None) -> FusionReport:
    """Optimize ``model`` as ONNX Runtime's CPU provider does (ORT_ENABLE_ALL) and count the fusion.

    ``serialized``: the model's bytes when the caller has them already (saves serialising it again).
    """
    import onnxruntime as ort

    made_by = {o: n for n in model.graph.node for o in n.output}
    quantized = sum(1 for n in model.graph.node if n.op_type == "Conv" and n.input
                    and made_by.get(n.input[0]) is not None and made_by[n.input[0]].op_type == "DequantizeLinear")
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        options.intra_op_num_threads = threads
        options.log_severity_level = 3  # "the optimized model may be hardware specific": it is only read here
        ort.InferenceSession(serialized if serialized is not None else model.SerializeToString(), options,
                             providers=["CPUExecutionProvider"])
        optimized = onnx.load(options.optimized_model_filepath, load_external_data=False)
    ops = Counter(node.op_type for node in optimized.graph.node)
    return FusionReport(quantized, ops.get("QLinearConv", 0), dict(ops.most_common()))
