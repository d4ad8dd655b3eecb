"""reid-export quantize: FP16 (FP32 head) and INT8 Q/DQ for TensorRT and the ONNX Runtime CPU provider,
calibrated on real CUHK03 crops; the calibration statistics; the TensorRT Q/DQ check; bad inputs."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from conftest import assert_clean_error, data_dir, run_cli
from reid_export.data_config import DataConfig
from reid_export.export.quantize.calibration import (Calibration, TensorStats, collect, entropy_threshold, percentile_threshold,
                                          tensors_to_calibrate)
from reid_export.export.metadata import KEY_PRECISION, base_metadata, get_metadata, save_onnx, set_metadata
from reid_export.export.quantize.qdq_check import check_ort_cpu_fusion, check_tensorrt_qdq
from reid_export.export.quantize import QDQ_OP_TYPES
from reid_export.export.quantize.calibration import CalibrationImages
from reid_export.runtime import expand_image_paths, open_encoder
from test_onnx_export import make_checkpoint

pytestmark = pytest.mark.slow  # a development run skips it: pytest -m "not slow"

# An R18 BoT with GeM-P pooling (the head FP16 must keep in FP32), at 128x64 to keep CPU time small.
OPTS = ["INPUT.SIZE_TEST", "[128, 64]", "MODEL.HEADS.POOL_LAYER", "GeneralizedMeanPoolingP"]


@pytest.fixture(scope="module")
def calib_dir():
    return data_dir("cuhk03-labeled") / "Market-1501-v15.09.15" / "bounding_box_train"


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    folder = tmp_path_factory.mktemp("q")
    ckpt, _, _ = make_checkpoint(folder, "Market1501/bagtricks_R18.yml", OPTS, ours=True)
    out = folder / "r18.onnx"
    result = run_cli("onnx", ckpt, "-o", out)
    assert result.code == 0, result
    return out


def _quantize(fp32, out, *args):
    return run_cli("quantize", fp32, "-o", out, "--no-progress", *args)


def _features(model, images):
    with open_encoder(model) as encoder:
        return encoder.encode_files(images, progress=False)


def _cosines(a, b):
    return np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def _consumed_through_dq(model, node_name):
    made_by = {o: n for n in model.graph.node for o in n.output}
    node = next(n for n in model.graph.node if n.name == node_name)
    return any(made_by.get(i) is not None and made_by[i].op_type == "DequantizeLinear" for i in node.input)


def test_fp16_keeps_the_head_in_fp32(fp32, tmp_path, parity_images):
    out = tmp_path / "fp16.onnx"
    result = _quantize(fp32, out, "--precision", "fp16", "--target", "cpu")
    assert result.code == 0, result
    assert "ignored for fp16 (int8 options): --target" in result.err
    model = onnx.load(str(out))
    inits = {i.name: i for i in model.graph.initializer}
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in inits.values())
    for value in list(model.graph.input) + list(model.graph.output):
        assert value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    kept = json.loads(get_metadata(model)["reid_export.fp16"])["kept_fp32"]
    nodes = {n.name: n for n in model.graph.node}
    kept_ops = {nodes[name].op_type for name in kept}
    assert {"Pow", "ReduceMean", "BatchNormalization", "Sub", "Div"} <= kept_ops, kept_ops  # GeM, BNNeck, input norm
    for name in kept:  # their weights stay float32
        for tensor in nodes[name].input:
            if tensor in inits:
                assert inits[tensor].data_type != onnx.TensorProto.FLOAT16, (name, tensor)
    assert get_metadata(model)[KEY_PRECISION] == "fp16"
    cos = _cosines(_features(fp32, parity_images), _features(out, parity_images))
    assert cos.min() > 0.9995, cos


def test_fp16_warns_about_weights_out_of_range(tmp_path):
    weight = np.full((4, 3, 1, 1), 0.01, np.float32)
    weight[0, 0] = 1e5
    graph = helper.make_graph(
        [helper.make_node("Conv", ["images", "w"], ["c"], name="conv"),
         helper.make_node("Relu", ["c"], ["r"], name="relu"),
         helper.make_node("GlobalAveragePool", ["r"], ["p"], name="gap"),
         helper.make_node("Flatten", ["p"], ["features"], name="flatten")],
        "tiny", [helper.make_tensor_value_info("images", onnx.TensorProto.FLOAT, ["n", 3, 8, 4])],
        [helper.make_tensor_value_info("features", onnx.TensorProto.FLOAT, ["n", 4])],
        [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    set_metadata(model, base_metadata(DataConfig(height=8, width=4), "fp32"))
    src = tmp_path / "tiny.onnx"
    save_onnx(model, src)
    result = _quantize(src, tmp_path / "tiny16.onnx", "--precision", "fp16")
    assert result.code == 0, result
    assert "exceed the FP16 range" in result.err and "w" in result.err


@pytest.fixture(scope="module")
def int8_models(fp32, calib_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("int8")
    outs = {}
    # 24 CUHK03 crops keep this cheap; evaluated on Market-1501 crops (another domain), so the
    # CPU target, whose uint8 grid entropy would fit tightly to so few images, uses percentile.
    # One method each and 16 held-out crops for the accuracy gate (tests/test_quantize_int8_search.py tests the
    # search and the gate); the CPU flavour asks for 7-bit weights explicitly (the default follows the CPU).
    for target, method in (("tensorrt", "entropy"), ("cpu", "percentile")):
        out = folder / f"{target}.onnx"
        result = _quantize(fp32, out, "--precision", "int8", "--target", target, "--calib-dir", calib_dir,
                           "--calib-size", "24", "--val-size", "16", "--method", method, "--seed", "3",
                           "--max-pair-error", "0.2",  # the graph's rules are the subject, not the default gate
                           *(["--reduce-range"] if target == "cpu" else []))
        assert result.code == 0, result
        outs[target] = (out, result)
    return outs


def test_int8_tensorrt_follows_tensorrt_rules(int8_models, fp32, parity_images):
    out, result = int8_models["tensorrt"]
    assert "24 of the 2426 images" in result.err and "TensorRT Q/DQ check passes" in result.err
    model = onnx.load(str(out))
    report = check_tensorrt_qdq(model)
    assert report.ok, report.problems
    assert report.per_channel_weights > 0 and report.per_tensor_weights == 0
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear":
            zero = inits[node.input[2]]
            assert zero.dtype == np.int8 and not zero.any()
        if node.op_type == "DequantizeLinear":
            assert inits.get(node.input[0], np.zeros(1, np.int8)).dtype != np.int32  # no quantized bias
    relus = lambda m: sum(n.op_type == "Relu" for n in m.graph.node)  # noqa: E731
    assert relus(model) == relus(onnx.load(str(fp32)))  # ReLUs kept
    for node in model.graph.node:  # the GeM head and the BNNeck stay float
        if node.op_type in ("Pow", "ReduceMean", "BatchNormalization"):
            assert not _consumed_through_dq(model, node.name), node.name
    meta = get_metadata(model)
    info = json.loads(meta["reid_export.quantization"])
    search = info["search"]
    assert info["target"] == "tensorrt" and search["method"] == "entropy" and search["num_bins"] == 2048
    assert search["calibration"]["images"] == 24 and search["calibration"]["seed"] == 3
    assert json.loads(meta["reid_export.data_config"])["height"] == 128
    assert meta[KEY_PRECISION] == "int8"
    cos = _cosines(_features(fp32, parity_images), _features(out, parity_images))
    assert cos.min() > 0.98, cos


def test_int8_cpu_is_u8s8(int8_models, fp32, parity_images):
    out, result = int8_models["cpu"]
    model = onnx.load(str(out))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    zeros = [inits[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert zeros and all(z.dtype == np.uint8 for z in zeros)
    weights = [inits[n.input[0]] for n in model.graph.node
               if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].ndim == 4]
    assert weights and all(w.dtype == np.int8 and np.abs(w).max() <= 64 for w in weights)  # 7-bit (reduce_range)
    problems = " ".join(check_tensorrt_qdq(model).problems)
    assert "uint8" in problems and "int32 bias" in problems  # the check tells the targets apart
    assert json.loads(get_metadata(model)["reid_export.quantization"])["activations"].startswith("uint8")
    cos = _cosines(_features(fp32, parity_images), _features(out, parity_images))
    assert cos.min() > 0.98, cos


def test_int8_cpu_fuses_fully_in_onnx_runtime(int8_models):
    """Every quantized Conv of the CPU target becomes a QLinearConv in ONNX Runtime's CPU graph; the
    TensorRT flavour (float Conv outputs, ReLUs kept) does not, and the check says so."""
    out, result = int8_models["cpu"]
    model = onnx.load(str(out))
    fusion = check_ort_cpu_fusion(model)
    convs = sum(n.op_type == "Conv" for n in model.graph.node)
    assert fusion.ok and fusion.quantized_convs == convs == fusion.qlinear_convs > 0, fusion
    assert fusion.optimized_ops.get("Conv", 0) == 0 and fusion.optimized_ops.get("QLinearAdd", 0) > 0
    assert f"ONNX Runtime CPU fusion: {convs} of {convs} quantized convolutions run as QLinearConv" in result.err
    recorded = json.loads(get_metadata(model)["reid_export.quantization"])["ort_cpu_fusion"]
    assert recorded["qlinear_convs"] == recorded["quantized_convs"] == convs

    trt_model = onnx.load(str(int8_models["tensorrt"][0]))
    trt_fusion = check_ort_cpu_fusion(trt_model)
    assert trt_fusion.quantized_convs == convs and not trt_fusion.ok, trt_fusion
    assert "slower than FP32" in trt_fusion.summary()
    assert "ONNX Runtime CPU fusion" not in int8_models["tensorrt"][1].err  # checked for the cpu target only


def test_exclude_node_and_op_type(fp32, tmp_path, parity_images):
    model = onnx.load(str(fp32))
    first_conv = next(n.name for n in model.graph.node if n.op_type == "Conv")
    out = tmp_path / "ex.onnx"
    # 3 calibration crops and 2 held out: what --exclude does to the graph is the subject, not the gate
    # (tests/test_quantize_int8_search.py), so no fallback nodes and the model is written whatever the gate says
    result = _quantize(fp32, out, "--precision", "int8", "--calib-dir", parity_images[0].parent, "--method",
                       "minmax", "--exclude", first_conv, "--exclude", "Add", "--max-float", "0", "--allow-below-gate")
    assert result.code == 0, result
    q = onnx.load(str(out))
    assert not _consumed_through_dq(q, first_conv)
    # An excluded Add computes in float: the residual branch it alone reads is no longer quantized
    # (the identity branch may still come through the DequantizeLinear its other readers share).
    made_by = {o: n for n in q.graph.node for o in n.output}
    for add in (n for n in q.graph.node if n.op_type == "Add"):
        assert any(made_by[i].op_type != "DequantizeLinear" for i in add.input if i in made_by), add.name
    assert any(_consumed_through_dq(q, n.name) for n in q.graph.node if n.op_type == "Conv")


# --- calibration statistics --------------------------------------------------------------------

def test_histogram_grows_like_one_histogram_of_everything():
    rng = np.random.default_rng(0)
    chunks = [rng.normal(0, s, 5000).astype(np.float32) for s in (0.5, 1.0, 4.0, 2.0)]
    stats = TensorStats(num_bins=256)
    for chunk in chunks:
        stats.update(chunk)
    everything = np.abs(np.concatenate(chunks))
    expected, _ = np.histogram(everything, bins=256, range=(0, stats.width * 256))
    assert stats.hist.sum() == everything.size
    assert np.abs(stats.hist - expected).sum() <= 8  # equal up to float rounding at bin edges
    assert stats.lo == pytest.approx(float(np.concatenate(chunks).min()))
    assert stats.width * 256 >= everything.max()


def test_entropy_and_percentile_thresholds():
    rng = np.random.default_rng(1)
    values = np.concatenate([rng.laplace(0, 1, 200_000), [60.0, -55.0]]).astype(np.float32)  # rare outliers
    stats = TensorStats(num_bins=2048)
    stats.update(values)
    entropy = entropy_threshold(stats.hist, stats.width, 128)
    assert 5.0 < entropy < 30.0  # clips the outliers, keeps the body (min/max would be 60)
    p = percentile_threshold(stats.hist, stats.width, 99.9)
    assert abs(p - np.percentile(np.abs(values), 99.9)) <= 2 * stats.width
    relu = np.maximum(values, 0)
    relu_stats = TensorStats(num_bins=2048)
    relu_stats.update(relu)
    # Half of a ReLU output is exactly 0: that spike must not drag the threshold down.
    assert entropy_threshold(relu_stats.hist, relu_stats.width, 128) > 0.5 * entropy


def test_methods_give_different_ranges(fp32, parity_images):
    model = onnx.shape_inference.infer_shapes(onnx.load(str(fp32)))
    config = DataConfig.from_json(get_metadata(model)["reid_export.data_config"])
    tensors = tensors_to_calibrate(model, QDQ_OP_TYPES)
    calibration = collect(model, tensors, CalibrationImages(parity_images, config).batches(2, False), histograms=True)
    assert isinstance(calibration, Calibration) and calibration.images == len(parity_images)
    minmax, entropy = calibration.ranges("minmax"), calibration.ranges("entropy")
    percentile = calibration.ranges("percentile", 99.0)
    width = lambda r: {k: hi - lo for k, (lo, hi) in r.items()}  # noqa: E731
    wm, we, wp = width(minmax), width(entropy), width(percentile)
    assert all(we[k] <= wm[k] + 1e-6 and wp[k] <= wm[k] + 1e-6 for k in wm)
    assert sum(we[k] < 0.99 * wm[k] for k in wm) > len(wm) // 4  # entropy really clips, unlike stock ORT's
    assert sum(wp[k] < 0.99 * wm[k] for k in wm) > len(wm) // 4


# --- bad inputs: one line, non-zero exit where it is an error, no output left -------------------

def _bad(tmp_path, model, *args, needles=(), code=None):
    out = tmp_path / "out" / "q.onnx"
    out.parent.mkdir(exist_ok=True)
    result = run_cli("quantize", model, "-o", out, "--no-progress", *args)
    assert_clean_error(result, *needles)
    if code is not None:
        assert result.code == code, result
    assert list(out.parent.iterdir()) == []


def test_bad_inputs(fp32, tmp_path, parity_images, int8_models):
    not_onnx = tmp_path / "model.onnx"
    not_onnx.write_text("name: not-a-model\n")
    _bad(tmp_path, not_onnx, "--precision", "fp16", needles=["model.onnx", "not an ONNX model"])
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    _bad(tmp_path, fp32, "--precision", "int8", "--calib-dir", empty, needles=["empty", "holds no images"])
    _bad(tmp_path, fp32, "--precision", "int8", "--calib-dir", parity_images[0].parent, "--exclude", "NoSuchNode",
         needles=["--exclude NoSuchNode", "op types here"], code=2)
    _bad(tmp_path, fp32, "--precision", "int8", needles=["--calib-dir"], code=2)
    _bad(tmp_path, fp32, "--precision", "int8", "--calib-dir", empty, "--method", "entropy", "--percentile", "99.9",
         needles=["--percentile"], code=2)
    _bad(tmp_path, int8_models["tensorrt"][0], "--precision", "fp16", needles=["already int8"])
    _bad(tmp_path, fp32, "--precision", "int8", "--calib-dir", tmp_path / "nowhere", needles=["nowhere", "not found"])


def test_calib_size_larger_than_folder_uses_what_there_is(fp32, tmp_path, parity_images):
    # 5 crops: 2 held out for the accuracy gate (a quarter, at least 2), the other 3 calibrate; the
    # gate itself is tests/test_quantize_int8_search.py's subject, so this run may write below it
    out = tmp_path / "q.onnx"
    result = _quantize(fp32, out, "--precision", "int8", "--calib-dir", parity_images[0].parent, "--calib-size",
                       "100", "--method", "percentile", "--percentile", "99.9", "--allow-below-gate")
    assert result.code == 0, result
    assert "holds 5 images, fewer than --calib-size 100 plus the held-out ones; using 3" in result.err
    assert "accuracy gate: measured on 2 other images" in result.err
    info = json.loads(get_metadata(onnx.load(str(out)))["reid_export.quantization"])["search"]
    assert info["calibration"] == {**info["calibration"], "images": 3, "requested": 100}
    assert info["held_out"]["images"] == 2
    assert info["percentile"] == 99.9 and len(expand_image_paths([parity_images[0].parent])) == 5
