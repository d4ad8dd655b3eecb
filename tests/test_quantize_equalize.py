"""Activation equalisation (reid_export.export.quantize.equalize) and the Adds that INT8 keeps float.

The graphs are built here with torch and exported to ONNX: a Conv -> ReLU -> Conv chain, OSNet's
gated sum of streams with a residual, and graphs that must not be touched (a Concat, a sigmoid
between two convs, a graph output inside the region). Always run: no data needed.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from reid_export.export.quantize.calibration import channel_statistics as channel_ranges
from reid_export.export.quantize.equalize import apply, equalize, find_regions, region_scales
from reid_export.export.quantize.qdq import float_sum_nodes, prepare


def _export(net: nn.Module, tmp_path, name="m.onnx", shape=(1, 8, 16, 8)) -> onnx.ModelProto:
    path = tmp_path / name
    torch.onnx.export(net.eval(), torch.rand(*shape), str(path), input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "n"}, "y": {0: "n"}}, opset_version=17, dynamo=False)
    return onnx.shape_inference.infer_shapes(onnx.load(str(path)))


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


class _Chain(nn.Module):  # conv -> relu -> maxpool -> dense conv, and a depthwise pair
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(8, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 16, 1)
        self.c = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        with torch.no_grad():  # channels 100x apart: what per-tensor activation ranges handle badly
            self.a.weight.mul_(torch.logspace(-2, 0, 16).view(16, 1, 1, 1))

    def forward(self, x):
        return self.c(self.b(nn.functional.max_pool2d(torch.relu(self.a(x)), 2)))


class _Gated(nn.Module):  # two streams, one shared gate, sum, 1x1 expand, residual
    def __init__(self):
        super().__init__()
        self.s1, self.s2 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
        self.fc1, self.fc2 = nn.Conv2d(8, 2, 1), nn.Conv2d(2, 8, 1)
        self.expand = nn.Conv2d(8, 8, 1)

    def gate(self, x):
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))))

    def forward(self, x):
        y = self.gate(torch.relu(self.s1(x))) + self.gate(torch.relu(self.s2(x)))
        return torch.relu(self.expand(y) + x)


def _x(n=6, shape=(8, 16, 8), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)


def test_chain_regions_and_exact_fp32(tmp_path):
    model = _export(_Chain(), tmp_path)
    regions = find_regions(model)
    by_producer = {tuple(r.producers): r for r in regions}
    a_region = next(r for p, r in by_producer.items() if any("/a/" in n for n in p))
    assert len(a_region.tensors) == 3  # conv output, relu output, pooled output share one scaling
    assert not a_region.depthwise_only and a_region.channels == 16
    b_region = next(r for p, r in by_producer.items() if any("/b/" in n for n in p))
    assert b_region.depthwise_only  # the 1x1 feeds a depthwise conv only
    x = _x()
    stats = channel_ranges(model, [t for r in regions for t in r.tensors], [(x, len(x))])
    steps = {t: float(stats[t]["max"].max()) / 127 for r in regions for t in r.tensors}
    scaled = region_scales(regions, stats, model, steps)
    assert scaled, "the 100x channel spread must be rescaled"
    out = apply(model, scaled)
    ref, got = _run(model, x), _run(out, x)
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
    # the channel spread of the conv output shrinks; the original is untouched
    relu = next(t for t in a_region.tensors if "Relu" in t)
    after = channel_ranges(out, [relu], [(x, len(x))])[relu]["max"]
    before = stats[relu]["max"]
    spread = lambda a: a.max() / max(np.median(a), 1e-12)  # noqa: E731
    assert spread(after) < 0.5 * spread(before)
    assert np.array_equal(_run(model, x), ref)


def test_gated_sum_is_one_region_with_the_shared_gate(tmp_path):
    model = _export(_Gated(), tmp_path)
    regions = find_regions(model)
    producers = {n for r in regions for n in r.producers}
    joint = [r for r in regions if any("s1" in n for n in r.producers)]
    assert joint and any("s2" in n for n in joint[0].producers)  # the sum ties both streams to one scaling
    assert any("fc1" in n for n in joint[0].consumers) and any("expand" in n for n in joint[0].consumers)
    # the residual stream reaches the graph input and output: never rescaled
    assert not any("expand" in n for n in producers)
    x = _x(shape=(8, 16, 8))
    model_eq, summary = equalize(model, [(x, len(x))], steps={t: 0.01 for r in regions for t in r.tensors})
    assert summary["equalised"] >= 1
    ref, got = _run(model, x), _run(model_eq, x)
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
    # the shared gate weights were copied, not rescaled twice
    assert len(model_eq.graph.initializer) > len(model.graph.initializer)


class _Blocked(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1), nn.Conv2d(16, 8, 1)
        self.d, self.e = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1)

    def forward(self, x):
        y = self.c(torch.cat([torch.relu(self.a(x)), self.b(x)], 1))   # Concat: not equalisable
        return self.e(torch.sigmoid(self.d(y)))                      # Sigmoid between convs: not either


def test_unsafe_regions_are_left_alone(tmp_path):
    model = _export(_Blocked(), tmp_path)
    regions = find_regions(model)
    producers = {n for r in regions for n in r.producers}
    consumers = {n for r in regions for n in r.consumers}
    names = {k: next(n.name for n in model.graph.node if f"/{k}/" in n.name) for k in "abcde"}
    assert not producers & {names["a"], names["b"], names["d"]}   # into a Concat, into a Sigmoid
    assert names["c"] not in consumers and names["e"] not in consumers
    assert [r.producers for r in regions] == [[names["c"]]] and regions[0].consumers == [names["d"]]


def test_float_sums_are_the_non_residual_adds(tmp_path):
    model = _export(_Gated(), tmp_path)
    adds = [n for n in model.graph.node if n.op_type == "Add"]
    sums = set(float_sum_nodes(model))
    producer = {o: n.op_type for n in model.graph.node for o in n.output}
    assert len(adds) == 2 and len(sums) == 1
    for node in adds:  # the gated sum (Mul + Mul) stays float; the residual (Conv + x) is quantized
        from_conv = any(producer.get(i) == "Conv" for i in node.input)
        assert (node.name in sums) != from_conv
    prepared = prepare(model, "tensorrt")
    assert prepared.float_sums == list(sums) and not sums & set(prepared.quantizable_nodes())
    assert any("stay float" in line for line in prepared.notes)


@pytest.mark.parametrize("broken", ["no compensation", "no producer"])
def test_a_wrong_rescaling_changes_fp32(tmp_path, broken):
    """The check that guards the quantizer: a region rescaled on one side only changes the output."""
    model = _export(_Chain(), tmp_path)
    regions = find_regions(model)
    x = _x()
    stats = channel_ranges(model, [t for r in regions for t in r.tensors], [(x, len(x))])
    scaled = region_scales(regions, stats, model, {t: 0.01 for r in regions for t in r.tensors})
    region = scaled[0]
    if broken == "no compensation":
        region.consumers = []
    else:
        region.producers = []
    ref, got = _run(model, x), _run(apply(model, [region]), x)
    assert np.abs(got - ref).max() > 1e-3 * np.abs(ref).max()


def test_bias_correction_removes_the_mean_shift_of_weight_rounding(tmp_path):
    """A conv whose weights sit between grid steps: rounding shifts every output channel by
    sum(dW * E[x]); the corrected bias cancels it on average, and only for quantized nodes."""
    from onnx import numpy_helper

    from reid_export.export.quantize.qdq import conv_input_means, correct_biases

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(8, 16, 1, bias=False), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1))
    with torch.no_grad():
        net[0].weight.mul_(3.0)
    model = _export(net, tmp_path)
    x = np.abs(_x(16)) + 0.5  # positive inputs with a large mean: where the shift shows
    means = conv_input_means(model, [(x, len(x))])
    assert set(means) == {n.input[0] for n in model.graph.node if n.op_type == "Conv"}
    relu_out = next(n.output[0] for n in model.graph.node if n.op_type == "Relu")
    assert np.allclose(means["x"], x.mean(axis=(0, 2, 3)), rtol=1e-6)

    def rounded(m):  # the same graph with int8-rounded weights (what the quantizer computes with)
        out = onnx.ModelProto()
        out.CopyFrom(m)
        for init in out.graph.initializer:
            w = numpy_helper.to_array(init)
            if w.ndim == 4:
                step = np.abs(w).reshape(len(w), -1).max(axis=1).reshape(-1, 1, 1, 1) / 127
                init.CopyFrom(numpy_helper.from_array((np.round(w / step) * step).astype(np.float32), init.name))
        return out

    ref = _run(model, x)
    plain_shift = np.abs((_run(rounded(model), x) - ref).mean(axis=(0, 2, 3))).max()
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    assert correct_biases(fixed, means, set()) == 2  # the bias-less first conv gets a bias
    fixed_shift = np.abs((_run(rounded(fixed), x) - ref).mean(axis=(0, 2, 3))).max()
    assert plain_shift > 1e-4 and fixed_shift < 0.2 * plain_shift, (plain_shift, fixed_shift)
    # a node kept in float keeps its bias
    untouched = onnx.ModelProto()
    untouched.CopyFrom(model)
    names = [n.name for n in model.graph.node if n.op_type == "Conv"]
    assert correct_biases(untouched, means, set(names)) == 0
    assert np.array_equal(_run(untouched, x), ref) and relu_out in means
