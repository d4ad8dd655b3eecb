"""benchmarks/learned_rounding.py: the reader it hands Quark, the flavour -> Quark config mapping, and (with AMD
Quark installed: ``pip install --no-deps amd-quark``) a real Quark run on a tiny Conv model that must leave the
input file untouched and give a Q/DQ graph close to FP32."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import load_benchmark


@pytest.fixture(scope="module")
def lr():
    return load_benchmark("learned_rounding")


def test_reader_yields_one_image_per_item_and_rewinds(lr):
    x = np.arange(3 * 2 * 4 * 4, dtype=np.float32).reshape(3, 2, 4, 4)
    reader = lr.Reader("images", x)
    items = [reader.get_next() for _ in range(4)]
    assert [None if i is None else i["images"].shape for i in items] == [(1, 2, 4, 4)] * 3 + [None]
    assert np.array_equal(items[2]["images"], x[2:3])
    reader.rewind()
    assert np.array_equal(reader.get_next()["images"], x[:1]) and len(reader) == 3


def _tiny_conv(path):
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(8, 3, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(size=(8,)).astype(np.float32), "b1"),
             numpy_helper.from_array(rng.normal(size=(4, 8, 1, 1)).astype(np.float32), "w2")]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["y"], name="conv2")]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


@pytest.mark.parametrize("flavour", ["cpu", "tensorrt"])
def test_quark_config_follows_the_flavour(lr, flavour):
    pytest.importorskip("quark.onnx", reason="AMD Quark is not installed (pip install --no-deps amd-quark)")
    config = lr.quark_config(flavour, "adaround", 7, None, 1, 16)
    act, weight = config.global_config.activation, config.global_config.weight
    assert weight.symmetric and weight.quant_granularity.name == "Channel"
    assert act.symmetric is (flavour == "tensorrt") and act.data_type.__name__ == ("Int8" if flavour == "tensorrt"
                                                                                   else "UInt8")
    extra = config.extra_options.get("extra_options", config.extra_options)  # QConfig keeps its **kwargs as given
    assert extra["CalibTensorRangeSymmetric"] is (flavour == "tensorrt")
    (algo,) = config.algo_config
    assert algo.name == "adaround" and algo.num_iterations == 7 and algo.learning_rate == 0.1
    assert lr.quark_config(flavour, "none", 7, None, 1, 16).algo_config in (None, [])


def test_quark_run_on_a_copy_gives_a_close_qdq_graph(lr, tmp_path):
    pytest.importorskip("quark.onnx", reason="AMD Quark is not installed (pip install --no-deps amd-quark)")
    import onnxruntime as ort

    src = tmp_path / "tiny.onnx"
    _tiny_conv(src)
    before = hashlib.sha256(src.read_bytes()).hexdigest()
    rng = np.random.default_rng(1)
    calib = rng.normal(size=(16, 3, 8, 8)).astype(np.float32)
    work = tmp_path / "work"
    work.mkdir()
    out = lr.run_quark(str(src), calib, "cpu", "adaround", 5, None, 1, 8, work)
    assert not (tmp_path / "quantized_info.csv").exists() and (work / "quantized_info.csv").exists()
    assert hashlib.sha256(src.read_bytes()).hexdigest() == before       # the input file is never written
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert ops.count("QuantizeLinear") >= 2 and ops.count("DequantizeLinear") >= 4
    x = rng.normal(size=(4, 3, 8, 8)).astype(np.float32)
    ref = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert 0 < rel < 0.1                                                # quantized, and still the same function
