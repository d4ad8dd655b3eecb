"""FP16 variant of an FP32 ONNX model: float16 graph, float32 inputs/outputs, the head in float32.

onnxconverter-common's converter turns the graph to float16 with float32 inputs/outputs. The
input normalisation and the head (pooling incl. GeM's clip/pow/mean, the BNNeck, the flatten)
stay in float32: GeM cubes activations (FP16 overflows above ~40) and the feature is the
product. Weights outside the FP16 range are reported.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import onnx

from ...console import say
from ...errors import ReidExportError
from ..graph import head_nodes, input_prefix_nodes, resolve_excludes
from ..ort import quiet_ort_tools

FP16_MAX = 65504.0
FP16_MIN_NORMAL = 6.103515625e-05
FP16_MIN_SUBNORMAL = 5.960464477539063e-08


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
                        f"{', '.join(tensors_over[:4])}; they are clamped to 65504 (exclude those nodes with `exclude`)")
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
                 log: Callable[[str], None] = say) -> tuple[onnx.ModelProto, list[str]]:
    """The FP16 graph (FP32 I/O) and the names of the nodes kept in FP32.

    The head (see :func:`..graph.head_nodes`) is cut off, the rest is converted by
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
    with quiet_ort_tools(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            converted = float16.convert_float_to_float16(
                body, min_positive_val=FP16_MIN_SUBNORMAL, max_finite_val=FP16_MAX, keep_io_types=True,
                op_block_list=op_block, node_block_list=sorted(blocked - head))
        except Exception as exc:
            raise ReidExportError(f"FP16 conversion failed ({type(exc).__name__}: {str(exc)[:200]}); "
                                  "try `exclude` on the node it names") from None

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


def converter_version() -> str:
    try:
        import onnxconverter_common

        return f"onnxconverter-common {onnxconverter_common.__version__}"
    except Exception:
        return "onnxconverter-common"


FP16_CHECK_IMAGES = 32  # real crops the FP16 variant is gated on (drawn from the calibration folders)


@dataclass
class Fp16Result:
    """The FP16 graph, its comparison with FP32 and, on real crops, the gate's verdict (None: not gated)."""

    model: onnx.ModelProto
    kept_fp32: list[str]
    parity: dict
    failures: list[str]
    gate_passed: bool | None
    images: str        # what it was measured on
    count: int


def fp16_variant(model: onnx.ModelProto, data_config, options, note: Callable[[str], None]) -> Fp16Result:
    """The FP16 step of ``quantize``: convert, then measure against FP32 under the reduced-precision gate
    on ``FP16_CHECK_IMAGES`` crops of ``options.calib_dirs`` (gated), or on generated images when none
    are given (not gated: generated images are not people, only real crops can judge the similarities)."""
    from ...embeddings import compare
    from ...preprocess import preprocess
    from ..onnx_export import generated_images
    from ..ort import OrtRunner, make_session
    from .images import select_calibration_images

    converted, keep = convert_fp16(model, options.exclude, note)
    sample = (select_calibration_images(options.calib_dirs, FP16_CHECK_IMAGES, options.seed, lambda line: None)
              if options.calib_dirs else [])
    if sample:
        inputs, what = preprocess(sample, data_config), "images from `calib_dirs`"
    else:
        inputs, what = preprocess(generated_images(8, data_config.input_size), data_config), "generated images"
    threads = options.threads
    reference = OrtRunner(make_session(model.SerializeToString(), threads=threads), "fp32")(inputs)
    candidate = OrtRunner(make_session(converted.SerializeToString(), threads=threads), "fp16")(inputs)
    checked = compare(reference, candidate, options.resolved_gate)
    return Fp16Result(converted, keep, checked.measures(), list(checked.failures),
                      checked.passed if sample else None, what, len(inputs))
