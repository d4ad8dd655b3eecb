"""Activation range equalisation: per-channel rescaling of an FP32 graph that leaves its output unchanged.

INT8 activations are quantized per tensor: one step for every channel. In OSNet-like networks the
channels of one tensor differ widely in range (on OSNet-x0.5 the median channel max is a third to
a tenth of the tensor's calibrated range, the smaller channels less still), so the small channels
get a few levels each. Weights are quantized per output channel. So where a tensor's channels can be rescaled
without changing what the network computes, a channel ``c`` divided by ``s_c`` in every tensor
of a *region* and compensated at the region's borders costs nothing in the FP32 graph and evens
out the per-tensor range:

- a **region** is a set of tensors that must share one channel scaling: it is closed under the
  ops that commute with a positive per-channel scale (``Relu``, ``LeakyRelu``, max/average pools,
  ``Mul``/``Div`` by a tensor outside the region, such as a channel gate) and under ``Add``/``Sub``
  (every input of a sum joins the region of its output);
- its borders must all be convolutions with constant weights: the producers' output channels are
  divided by ``s_c`` (weights and bias; free under per-output-channel weight quantization), the
  consumers' input channels are multiplied by ``s_c`` (free when every consumer is depthwise; for
  a dense consumer it moves range into its weights, so the scale is damped there);
- a region that reaches anything else (a graph input or output, ``Concat``, ``Reshape``, a
  ``Sigmoid``, a Gemm, an add of a constant) is left alone.

The scale of channel ``c`` balances the two rounding noises it changes (:func:`region_scales`):
dividing the channel by ``s_c`` scales the activation noise it sends through the consumers by
``s_c`` and the consumers' weight noise on it by ``1 / s_c``; ``s_c**4`` = weight noise / activation
noise minimises their sum. Depthwise consumers carry their channel's scale in their own
per-channel weight step, so there only the activation side counts and the channel is raised up to
the region's largest. No channel grows past the region's largest (the per-tensor step must not
grow), none is amplified more than ``MAX_AMPLIFICATION`` times, and none is divided down so far that
a consumer's weight column outgrows its row's largest weight (the weight step must not grow either);
dead channels (never nonzero) stay at 1. This is
the idea of cross-layer equalisation (Nagel et al. 2019, "Data-Free Quantization Through Weight
Equalization and Bias Correction"), with the scale chosen from measured activation ranges, for
per-channel weights and per-tensor activations.

The statistics are per-channel max |x| and mean x^2 over a few calibration images
(:func:`.calibration.channel_statistics`); the caller recalibrates the equalised graph (its tensors' ranges
changed), checks that its FP32 output is unchanged, and measures both graphs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from .calibration import DEFAULT_PERCENTILE, channel_statistics
from ..graph import unshare_initializers

if TYPE_CHECKING:
    from .calibration import CalibrationImages
    from .qdq import Prepared
    from .search import Objective

# ops f with f(x / s) == f(x) / s for a positive per-channel s (channel axis 1 kept)
HOMOGENEOUS_UNARY = ("Relu", "LeakyRelu", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool",
                     "Identity", "Dropout")
SUMS = ("Add", "Sub", "Sum")
SPATIAL_REDUCTIONS = ("ReduceMean", "ReduceMax", "ReduceSum")  # homogeneous too, when they keep axes 0 and 1
MAX_AMPLIFICATION = 8.0


@dataclass
class Region:
    """Tensors that share one channel scaling, and the convolutions at its borders."""

    tensors: list[str]
    producers: list[str]          # Conv nodes whose output channels are divided by s
    consumers: list[str]          # Conv nodes whose input channels are multiplied by s
    channels: int
    depthwise_only: bool
    scale: np.ndarray | None = field(default=None, repr=False)


def _shapes(model: onnx.ModelProto) -> dict[str, list]:
    out = {}
    for v in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape"):
            out[v.name] = [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
    return out


class _GraphIndex:
    """What the region search asks of the graph: producers, readers, shapes, which nodes act per channel."""

    def __init__(self, model: onnx.ModelProto, skip_nodes: Iterable[str]):
        graph = model.graph
        self.model = model
        self.init_of = {i.name: i for i in graph.initializer}
        self.inits = set(self.init_of)
        self.outputs = {o.name for o in graph.output}
        self.inputs = {i.name for i in graph.input} - self.inits
        self.producer = {o: n for n in graph.node for o in n.output}
        self.readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
        for node in graph.node:
            for i, name in enumerate(node.input):
                self.readers.setdefault(name, []).append((node, i))
        self.nodes = {n.name: n for n in graph.node}
        self.shapes = _shapes(model)
        self.skip = set(skip_nodes)

    def channelwise(self, node) -> bool:
        if node.op_type in HOMOGENEOUS_UNARY:
            return True
        if node.op_type not in SPATIAL_REDUCTIONS:
            return False
        axes = next((list(a.ints) for a in node.attribute if a.name == "axes"), None)
        if axes is None and len(node.input) > 1 and node.input[1] in self.inits:
            axes = [int(v) for v in numpy_helper.to_array(self.init_of[node.input[1]]).ravel()]
        rank = len(self.shapes.get(node.input[0]) or [])
        return bool(axes) and rank > 2 and all(2 <= (a % rank) for a in axes)

    def conv_ok(self, node) -> bool:
        return (node.op_type == "Conv" and node.name not in self.skip and len(node.input) >= 2
                and node.input[1] in self.inits
                and (len(node.input) < 3 or not node.input[2] or node.input[2] in self.inits))


class _Growth:
    """One candidate region grown from a Conv's output: its tensors, the Convs that produce and consume
    them, the other factors of the Mul/Div inside it; ``valid`` False once something breaks it."""

    def __init__(self, start: str):
        self.tensors, self.queue = {start}, [start]
        self.producers: set[str] = set()
        self.consumers: set[str] = set()
        self.others: set[str] = set()
        self.valid = True

    def add(self, names) -> None:
        for x in names:
            if x not in self.tensors:
                self.tensors.add(x)
                self.queue.append(x)


def find_regions(model: onnx.ModelProto, skip_nodes: Iterable[str] = ()) -> list[Region]:
    """The equalisable regions of ``model`` (shapes inferred); ``skip_nodes`` (the head) are never touched."""
    g = _GraphIndex(model, skip_nodes)
    claimed: set[str] = set()
    forbidden: set[str] = set()   # the other factor of a Mul/Div inside an accepted region
    regions: list[Region] = []
    for start in model.graph.node:
        if not g.conv_ok(start) or start.output[0] in claimed:
            continue
        grown = _grow(g, start.output[0], claimed, forbidden)
        region = _accept(g, grown) if grown.valid else None
        if region is not None:
            claimed |= grown.tensors
            forbidden |= grown.others
            regions.append(region)
    return regions


def _grow(g: _GraphIndex, start: str, claimed: set[str], forbidden: set[str]) -> _Growth:
    """Grow a region over every tensor scaled together with ``start``: up through what produced each
    tensor, down through what reads it, until Convs bound it on both sides (or it cannot be one)."""
    grown = _Growth(start)
    while grown.queue and grown.valid:
        t = grown.queue.pop()
        if t in g.outputs or t in g.inputs or t in g.inits or t in claimed or t in forbidden:
            grown.valid = False
            break
        _grow_up(g, grown, t)
        if grown.valid:
            _grow_down(g, grown, t)
    return grown


def _grow_up(g: _GraphIndex, grown: _Growth, t: str) -> None:
    """The node that made ``t``: a Conv bounds the region, a per-channel node, sum or Mul/Div extends it."""
    node = g.producer.get(t)
    if node is None:
        grown.valid = False
        return
    if node.op_type == "Conv" and node.output[0] == t:
        if not g.conv_ok(node):
            grown.valid = False
        grown.producers.add(node.name)
        return
    if g.channelwise(node) and node.output[0] == t:
        new = [node.input[0]]
    elif node.op_type in SUMS:
        new = list(node.input)
    elif node.op_type in ("Mul", "Div"):
        region_in = [x for x in node.input if x in grown.tensors]
        if len(region_in) != 1 or (node.op_type == "Div" and node.input[0] not in grown.tensors):
            # entered from the output: the full-size input carries the scale, the other is a factor
            full = [x for x in node.input if g.shapes.get(x) == g.shapes.get(t)]
            if len(full) != 1 or (node.op_type == "Div" and full[0] != node.input[0]):
                grown.valid = False
                return
            region_in = full
        grown.others.update(x for x in node.input if x not in region_in)
        new = region_in
    else:
        grown.valid = False
        return
    grown.add(new)


def _grow_down(g: _GraphIndex, grown: _Growth, t: str) -> None:
    """The nodes that read ``t``: a Conv (as its data input) bounds the region, the others extend it."""
    for reader, index in g.readers.get(t, []):
        if reader.op_type == "Conv" and index == 0:
            if not g.conv_ok(reader):
                grown.valid = False
            grown.consumers.add(reader.name)
            continue
        if g.channelwise(reader) and index == 0:
            new = [reader.output[0]]
        elif reader.op_type in SUMS:
            new = list(reader.input) + [reader.output[0]]
        elif reader.op_type == "Mul" or (reader.op_type == "Div" and index == 0):
            other = [x for i, x in enumerate(reader.input) if i != index]
            if any(x in grown.tensors for x in other):
                grown.valid = False
                return
            grown.others.update(other)
            new = [reader.output[0]]
        else:
            grown.valid = False
            return
        grown.add(new)


def _accept(g: _GraphIndex, grown: _Growth) -> Region | None:
    """The region, when Convs bound it on both sides (not the same ones), no factor of a Mul/Div inside it
    is itself scaled, and all its tensors have one known channel count; else None."""
    if (not grown.producers or not grown.consumers or grown.producers & grown.consumers
            or grown.others & grown.tensors):
        return None
    channels = {(g.shapes.get(t) or [None, None])[1] if len(g.shapes.get(t) or []) > 1 else None
                for t in grown.tensors}
    if len(channels) != 1 or None in channels:
        return None
    depthwise = all(_conv_groups(g.nodes[c]) > 1 and _weight_shape(g.model, g.nodes[c])[1] == 1
                    for c in grown.consumers)
    return Region(sorted(grown.tensors), sorted(grown.producers), sorted(grown.consumers), channels.pop(), depthwise)


def _conv_groups(node: onnx.NodeProto) -> int:
    for a in node.attribute:
        if a.name == "group":
            return int(a.i)
    return 1


def _weight_shape(model: onnx.ModelProto, node: onnx.NodeProto) -> tuple:
    for init in model.graph.initializer:
        if init.name == node.input[1]:
            return tuple(init.dims)
    return ()


def region_scales(regions: Sequence[Region], stats: dict[str, dict], model: onnx.ModelProto,
                  steps: dict[str, float], max_amplification: float = MAX_AMPLIFICATION) -> list[Region]:
    """Set each region's ``scale``; regions without statistics, or where no channel gains, drop.

    ``stats[t]``: per-channel ``max`` and ``meansq`` of |x| (:func:`.calibration.channel_statistics`); ``steps[t]``:
    the quantization step the plain graph gives tensor ``t`` (its calibrated range over the
    levels). Dividing channel ``c`` by ``s_c`` multiplies the activation rounding noise it sends
    through each consumer by ``s_c`` and the rounding noise of the consumer's weights for that
    channel by ``1 / s_c``, as long as the per-tensor activation step and the per-row weight steps
    stay put (``s_c`` between the bounds below). With ``A_c`` = step^2 * sum of the consumer weights^2 of channel ``c`` and ``W_c`` =
    E[x_c^2] * sum over rows of the row's weight step^2, the sum ``A_c s^2 + W_c / s^2`` is
    smallest at ``s^4 = W_c / A_c``; a depthwise consumer's weights scale with their own channel
    (``W_c`` does not move), so there ``s`` goes as low as allowed. Bounds: no channel is made
    larger than the region's largest (``s_c >= max_c / max``) nor amplified by more than
    ``max_amplification``; no consumer weight column grows past its row's largest weight (``s_c``
    at most the smallest row max / column max, 1 with a depthwise consumer).
    """
    nodes = {n.name: n for n in model.graph.node}
    inits = {i.name: i for i in model.graph.initializer}
    out = []
    for region in regions:
        region_tensors = set(region.tensors)
        maxes = [stats[t]["max"] for t in region.tensors if t in stats and stats[t]["max"].shape == (region.channels,)]
        if not maxes:
            continue
        a = np.max(maxes, axis=0)
        if not np.isfinite(a).all() or a.max() <= 0:
            continue
        act_noise = np.zeros(region.channels)
        weight_noise = np.zeros(region.channels)
        ceiling = np.full(region.channels, np.inf)     # largest s that keeps every weight row's step
        usable = True
        for name in region.consumers:
            node = nodes[name]
            x = node.input[0]
            if x not in region_tensors or x not in stats or steps.get(x) is None:
                usable = False
                break
            w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
            groups = _conv_groups(node)
            per_in, per_out = w.shape[1], w.shape[0] // groups
            view = w.reshape((groups, per_out, per_in, -1))                         # g, o, c_local, k
            # activation noise through this consumer: step^2 * sum_{o,k} w^2, per input channel
            act_noise += steps[x] ** 2 * (view ** 2).sum(axis=(1, 3)).reshape(-1)
            if per_in > 1:                                                          # dense: rows share a step
                row_max = np.abs(view).max(axis=(2, 3))                              # g, o
                k = view.shape[3]
                weight_noise += (stats[x]["meansq"].reshape(groups, per_in)
                                 * (k * ((row_max / 127.0) ** 2).sum(axis=1))[:, None]).reshape(-1)
                col_max = np.abs(view).max(axis=3)                                   # g, o, c_local
                with np.errstate(divide="ignore"):
                    room = np.where(col_max > 0, row_max[:, :, None] / col_max, np.inf).min(axis=1)
                ceiling = np.minimum(ceiling, room.reshape(-1))
            else:
                ceiling = np.minimum(ceiling, 1.0)
        if not usable:
            continue
        with np.errstate(divide="ignore", invalid="ignore"):
            s = np.where(act_noise > 0, (weight_noise / act_noise) ** 0.25, 1.0)
        floor = np.maximum(a / a.max(), 1.0 / max_amplification)
        s = np.clip(np.nan_to_num(s, nan=1.0), floor, np.maximum(np.minimum(ceiling, max_amplification), 1.0))
        s[a <= 0] = 1.0
        if np.allclose(s, 1.0, rtol=0, atol=1e-3):
            continue
        region.scale = s.astype(np.float64)
        out.append(region)
    return out


def apply(model: onnx.ModelProto, regions: Sequence[Region]) -> onnx.ModelProto:
    """A copy of ``model`` with each region's channels divided by its scale (the FP32 output is unchanged)."""
    model_out = onnx.ModelProto()
    model_out.CopyFrom(model)
    graph = model_out.graph
    nodes = {n.name: n for n in graph.node}
    touched = {name for r in regions for name in r.producers + r.consumers}
    unshare_initializers(model_out, touched, "eq")
    inits = {i.name: i for i in graph.initializer}
    arrays = {}

    def array(name):
        if name not in arrays:
            arrays[name] = numpy_helper.to_array(inits[name]).astype(np.float64)
        return arrays[name]

    for region in regions:
        s = region.scale
        for name in region.producers:
            node = nodes[name]
            w = array(node.input[1])
            w /= s.reshape((-1,) + (1,) * (w.ndim - 1))
            if len(node.input) > 2 and node.input[2]:
                array(node.input[2])[...] /= s
        for name in region.consumers:
            node = nodes[name]
            w = array(node.input[1])
            groups = _conv_groups(node)
            per_group_in, per_group_out = w.shape[1], w.shape[0] // groups
            view = w.reshape((groups, per_group_out, per_group_in) + w.shape[2:])
            view *= s.reshape(groups, 1, per_group_in, *([1] * (w.ndim - 2)))
    for name, a in arrays.items():
        dtype = numpy_helper.to_array(inits[name]).dtype
        inits[name].CopyFrom(numpy_helper.from_array(a.astype(dtype), name))
    return model_out


def equalize(model: onnx.ModelProto, batches, steps: dict[str, float], skip_nodes: Iterable[str] = (),
             threads: int | None = None, progress=None) -> tuple[onnx.ModelProto, dict]:
    """(the equalised model, a summary); the model is ``model`` itself when nothing can be equalised.

    ``steps``: the quantization step of each calibrated tensor in the plain graph."""
    regions = find_regions(model, skip_nodes)
    summary = {"regions": len(regions), "equalised": 0, "tensors": 0, "channels": 0}
    if not regions:
        return model, summary
    stats = channel_statistics(model, [t for r in regions for t in r.tensors], batches, threads, progress)
    regions = region_scales(regions, stats, model, steps)
    summary.update(equalised=len(regions), tensors=sum(len(r.tensors) for r in regions),
                   channels=sum(r.channels for r in regions),
                   depthwise_only=sum(r.depthwise_only for r in regions),
                   max_amplification=round(float(max((1 / r.scale.min() for r in regions), default=1.0)), 2))
    if not regions:
        return model, summary
    return apply(model, regions), summary


EQUALIZE_IMAGES = 128
EQUALIZE_MAX_REL_L2 = 1e-4


def equalised_variant(prepared: "Prepared", calibration, objective: "Objective", images: "CalibrationImages",
                      num_bins: int, batch_size: int, threads: int | None, progress: bool):
    """The activation-equalised graph and its calibration (None when nothing equalises), and a summary.

    The per-channel statistics come from the first ``EQUALIZE_IMAGES`` calibration images; the
    quantization step of each tensor in the plain graph (MSE-optimal range) weighs activation
    against weight rounding. The equalised FP32 graph must give the FP32 features on the held-out
    images (relative L2 <= ``EQUALIZE_MAX_REL_L2``) or it is not used."""
    import dataclasses

    from tqdm import tqdm

    from ...embeddings import Tolerances, compare
    from .calibration import calibrate
    from .search import Variant

    start = time.time()
    unsigned = prepared.target == "cpu"
    steps = {}
    for name, (lo, hi) in calibration.ranges("mse", DEFAULT_PERCENTILE, unsigned).items():
        steps[name] = (hi - lo) / 255.0 if unsigned else max(abs(lo), abs(hi)) / 127.0
    count = min(EQUALIZE_IMAGES, len(images))
    batch = prepared.static_batch or batch_size
    bar = tqdm(total=count, desc="equalise: per-channel ranges", unit="img", disable=not progress, leave=False)
    try:
        model, summary = equalize(prepared.model, images.batches(batch, prepared.static_batch is not None, count),
                                  steps, prepared.head, threads, bar)
    finally:
        bar.close()
    summary.update(tried=True, images=count)
    if not summary.get("equalised"):
        summary.update(what=f"nothing to equalise ({summary['regions']} regions found)",
                       seconds=round(time.time() - start, 1))
        return None, summary
    check = compare(objective.reference, objective.features(model), Tolerances())
    summary["fp32_max_rel_l2"] = float(check.max_rel_l2)
    if not np.isfinite(check.max_rel_l2) or check.max_rel_l2 > EQUALIZE_MAX_REL_L2:
        summary.update(what=f"not used: the equalised FP32 graph differs from the original (relative L2 "
                            f"{check.max_rel_l2:.2e} > {EQUALIZE_MAX_REL_L2:g})", seconds=round(time.time() - start, 1))
        return None, summary
    eq_prepared = dataclasses.replace(prepared, model=model)
    eq_calibration = calibrate(eq_prepared, images, num_bins, batch_size, threads, progress)
    summary.update(seconds=round(time.time() - start, 1),
                   what=(f"{summary['equalised']} of {summary['regions']} channel regions rescaled "
                         f"({summary['tensors']} tensors, FP32 relative L2 {check.max_rel_l2:.1e}); every method "
                         "is tried on both graphs"))
    return Variant("equalised", eq_prepared, eq_calibration), summary


__all__ = ["Region", "find_regions", "region_scales", "apply", "equalize", "equalised_variant", "MAX_AMPLIFICATION",
           "EQUALIZE_IMAGES"]
