"""Small ONNX graph helpers shared by FP16 conversion, INT8 quantization and their checks."""

from __future__ import annotations

import difflib
from collections import Counter

import onnx
from onnx import version_converter

from ..errors import ReidExportError, UsageError

# Where a walk back from the output stops: the end of the backbone (or an embedding layer).
_BACKBONE_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul", "Relu", "Clip", "Add", "Concat",
                 "InstanceNormalization", "MaxPool", "Sigmoid", "QuantizeLinear", "DequantizeLinear"}
_WEIGHTED_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
# What may follow a final embedding layer on the way to the output (torchreid: fc -> BN -> ReLU).
_TAIL_PASSTHROUGH = {"Relu", "Clip", "BatchNormalization", "Flatten", "Reshape", "Identity", "Squeeze",
                     "Unsqueeze", "LeakyRelu", "Sigmoid"}
# What may sit between the image input and the first convolution (the 0..255 normalisation).
_PREFIX_OPS = {"Sub", "Div", "Mul", "Add", "Cast", "Identity"}


def ensure_node_names(model: onnx.ModelProto) -> int:
    """Give every node a unique name (tools address nodes by name); returns how many were renamed."""
    seen: set[str] = set()
    renamed = 0
    for index, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            base = f"{node.op_type}_{index}"
            name = base
            while name in seen:
                name += "_"
            node.name = name
            renamed += 1
        seen.add(node.name)
    return renamed


def opset_of(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return 0


def upgrade_opset(model: onnx.ModelProto, minimum: int) -> tuple[onnx.ModelProto, int | None]:
    """The model at opset ``minimum`` when it is below (returns the old opset), else unchanged (None)."""
    current = opset_of(model)
    if current >= minimum:
        return model, None
    try:
        upgraded = version_converter.convert_version(model, minimum)
    except Exception as exc:  # the converter raises RuntimeError/ValueError/onnx errors
        raise ReidExportError(
            f"could not upgrade the model from opset {current} to {minimum} ({str(exc).splitlines()[0][:200]}); "
            f"re-export it at opset >= {minimum}"
        ) from None
    for entry in upgraded.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = minimum
    return upgraded, current


def producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in model.graph.node for out in node.output if out}


def consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    table: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            if name:
                table.setdefault(name, []).append(node)
    return table


def unshare_initializers(model: onnx.ModelProto, nodes, tag: str, inputs=None) -> int:
    """Give each node in ``nodes`` its own copy of every initializer it shares with another node
    (``inputs``: only at these input positions); in place, returns how many copies were made.

    OSNet applies one channel gate to all its streams: four Conv nodes read the same weight and
    bias initializers. Whatever treats one of them on its own (keeps it in float, rescales or
    corrects it) must not change the others."""
    nodes = set(nodes)
    inits = {init.name: init for init in model.graph.initializer}
    readers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            if name in inits:
                readers[name] = readers.get(name, 0) + 1
    copies = 0
    for node in model.graph.node:
        if node.name not in nodes:
            continue
        for i, name in enumerate(node.input):
            if (inputs is None or i in inputs) and name in inits and readers.get(name, 0) > 1:
                copy = onnx.TensorProto()
                copy.CopyFrom(inits[name])
                copy.name = f"{name}__{tag}_{node.name}"
                model.graph.initializer.append(copy)
                node.input[i] = copy.name
                readers[name] -= 1
                copies += 1
    return copies


def head_nodes(model: onnx.ModelProto) -> list[str]:
    """Nodes after the backbone: pooling (GeM's clip/pow/mean), the BNNeck and the flatten.

    Found by walking back from the graph outputs and stopping at the last convolution, matmul,
    activation or residual add. These run in FP32 in the FP16 and INT8 variants: GeM's cube
    overflows FP16 above ~40, and the feature itself should not be rounded to 8 bits. When the
    output comes straight from an embedding layer (torchreid: fc -> BatchNorm -> ReLU), that
    chain up to and including the last fully-connected/conv layer is the head.
    """
    made_by = producers(model)
    initializers = {init.name for init in model.graph.initializer}
    found: list[str] = []
    seen: set[str] = set()
    stack = [out.name for out in model.graph.output]
    while stack:
        tensor = stack.pop()
        node = made_by.get(tensor)
        if node is None or node.name in seen or node.op_type in _BACKBONE_OPS:
            continue
        seen.add(node.name)
        found.append(node.name)
        stack.extend(name for name in node.input if name and name not in initializers)
    if found or len(model.graph.output) != 1:
        return found
    chain: list[str] = []
    tensor = model.graph.output[0].name
    while tensor in made_by:
        node = made_by[tensor]
        if node.op_type in _WEIGHTED_OPS:
            return chain + [node.name]
        if node.op_type not in _TAIL_PASSTHROUGH:
            break
        chain.append(node.name)
        tensor = next((name for name in node.input if name and name not in initializers), "")
    return []


def input_prefix_nodes(model: onnx.ModelProto) -> list[str]:
    """Elementwise nodes between the image input and the first convolution (the normalisation)."""
    uses = consumers(model)
    initializers = {init.name for init in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in initializers]
    found: list[str] = []
    stack = list(inputs[:1])
    seen: set[str] = set()
    while stack:
        tensor = stack.pop()
        for node in uses.get(tensor, []):
            if node.name in seen or node.op_type not in _PREFIX_OPS:
                continue
            seen.add(node.name)
            found.append(node.name)
            stack.extend(node.output)
    return found


def resolve_excludes(model: onnx.ModelProto, items) -> tuple[list[str], list[str]]:
    """``--exclude`` values -> (node names, op types); an unknown value is a usage error."""
    names = [node.name for node in model.graph.node]
    name_set = set(names)
    op_types = Counter(node.op_type for node in model.graph.node)
    nodes: list[str] = []
    ops: list[str] = []
    for item in items or ():
        if item in name_set:
            nodes.append(item)
        elif item in op_types:
            ops.append(item)
        else:
            close = difflib.get_close_matches(item, list(name_set) + list(op_types), n=3, cutoff=0.6)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise UsageError(
                f"`exclude` {item}: no node or op type of that name in the model{hint}; "
                f"op types here: {', '.join(sorted(op_types))}"
            )
    return nodes, ops
