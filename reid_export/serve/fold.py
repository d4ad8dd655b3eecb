"""Fold a client's input convention into an ONNX graph: a channel swap, a Mul and an Add before its first node.

A tracker or server preprocesses crops its own way (DeepStream: 0..255 in its colour order; BoxMOT:
RGB, /255, ImageNet mean/std). :func:`reid_export.deploy_preprocess.input_affine` gives the
per-channel map from that input to the one the model's data config asks for; :func:`prepend_affine`
puts it in front of the graph. Nothing else in the graph changes: in a Q/DQ INT8 graph the affine
sits before the first QuantizeLinear, whose scale and zero point (and every other Q/DQ parameter)
stay as calibrated, so the quantized network sees the very values it was calibrated on.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..deploy_preprocess import Affine
from ..errors import ReidExportError


def unique_name(graph: onnx.GraphProto, base: str) -> str:
    taken = {i.name for i in graph.initializer} | {v.name for v in graph.input} | {v.name for v in graph.output}
    taken |= {o for n in graph.node for o in n.output} | {n.name for n in graph.node}
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    return name


def check_image_input(model: onnx.ModelProto, client: str) -> tuple[str, list]:
    """The float32 [N, 3, H, W] input's name and shape, or one clear error."""
    from ..export.metadata import input_info

    name, shape, elem_type = input_info(model)
    if elem_type != onnx.TensorProto.FLOAT:
        raise ReidExportError(f"the ONNX input {name} is not float32; {client} feeds float32 "
                              "(FP16 and INT8 ONNX from reid-export keep float32 inputs)")
    if len(shape) != 4:
        raise ReidExportError(f"the ONNX input {name} has shape {shape}; expected [N, 3, H, W]")
    return name, shape


def prepend_affine(model: onnx.ModelProto, affine: Affine, tag: str, client: str = "the client") -> onnx.ModelProto:
    """A copy of ``model`` that computes ``affine`` (swap, Mul, Add in float32) on its input first."""
    name, _ = check_image_input(model, client)
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    if affine.identity:
        return folded
    graph = folded.graph
    for out in graph.output:
        if out.name == name:
            raise ReidExportError(f"the ONNX input {name} is also an output; cannot fold a normalisation into it")
    inner = unique_name(graph, f"{name}__model_input")
    for node in graph.node:
        for i, value in enumerate(node.input):
            if value == name:
                node.input[i] = inner
    nodes, current = [], name
    if affine.swap:
        idx = unique_name(graph, f"{name}__channel_swap")
        graph.initializer.append(numpy_helper.from_array(np.array([2, 1, 0], dtype=np.int64), idx))
        swapped = unique_name(graph, f"{name}__swapped")
        nodes.append(helper.make_node("Gather", [current, idx], [swapped], axis=1,
                                      name=unique_name(graph, f"{tag}_channel_swap")))
        current = swapped
    s_name, b_name = unique_name(graph, f"{name}__scale"), unique_name(graph, f"{name}__offset")
    graph.initializer.append(numpy_helper.from_array(np.array(affine.scale, np.float32).reshape(1, 3, 1, 1), s_name))
    graph.initializer.append(numpy_helper.from_array(np.array(affine.bias, np.float32).reshape(1, 3, 1, 1), b_name))
    scaled = unique_name(graph, f"{name}__scaled")
    nodes.append(helper.make_node("Mul", [current, s_name], [scaled], name=unique_name(graph, f"{tag}_scale")))
    nodes.append(helper.make_node("Add", [scaled, b_name], [inner], name=unique_name(graph, f"{tag}_offset")))
    old = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + old)
    return folded


def fix_spatial_dims(model: onnx.ModelProto, height: int, width: int) -> None:
    """Give a symbolic H/W of the image input the data config's size (clients read it from the graph)."""
    initializers = {i.name for i in model.graph.initializer}
    value = next(v for v in model.graph.input if v.name not in initializers)
    dims = value.type.tensor_type.shape.dim
    for axis, want in ((2, height), (3, width)):
        if dims[axis].HasField("dim_value"):
            if dims[axis].dim_value != want:
                raise ReidExportError(f"the ONNX input {value.name} has size {dims[axis].dim_value} on axis {axis}, "
                                      f"its data config says {want}")
        else:
            dims[axis].dim_value = want
