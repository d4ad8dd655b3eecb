"""DeepStream hand-off: deployment preprocessing (letterbox, NVIDIA's scalar), the folded ONNX and its
tracker ReID section, and eval/parity --deployment with its gate."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
import torch
import yaml
from onnx import TensorProto, helper, numpy_helper

from conftest import SmallReidNet, assert_clean_error, export_small_onnx, run_cli
from reid_export.data_config import DataConfig
from reid_export.errors import ReidExportError
from reid_export.export.metadata import base_metadata, read_data_config, set_metadata
from reid_export.preprocess import preprocess
from reid_export.serve import deepstream as ds
from reid_export.deploy_preprocess import (DEPLOYMENTS, NVIDIA_SAMPLE_NET_SCALE_FACTOR, letterbox,
                                                 net_scale_factor)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGENET = DataConfig(height=64, width=32, pixel_scale=1.0, mean=MEAN, std=STD, interpolation="linear",
                      normalized_inside=False)


def _rgb(h, w, seed=0):
    rng = np.random.default_rng(seed)
    return cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (5, 5), 0)


# --------------------------------------------------------------------------- deployment preprocessing

def test_letterbox_keeps_aspect_and_pads_bottom_right_with_black():
    tall = _rgb(200, 20)  # 10:1 into 64x32: scale min(32/20, 64/200) = 0.32 -> 64 x 6
    out = letterbox(tall, 64, 32)
    assert out.shape == (64, 32, 3)
    assert not out[:, 6:].any()  # padding on the right
    np.testing.assert_array_equal(out[:, :6], cv2.resize(tall, (6, 64), interpolation=cv2.INTER_LINEAR))
    wide = _rgb(20, 100, 1)  # scale min(32/100, 64/20) = 0.32 -> 6 x 32
    out = letterbox(wide, 64, 32)
    assert not out[6:].any() and out[:6].any()  # padding at the bottom
    same_aspect = _rgb(128, 64, 2)  # 2:1 like the input: a plain bilinear resize, no padding
    np.testing.assert_array_equal(letterbox(same_aspect, 64, 32),
                                  cv2.resize(same_aspect, (32, 64), interpolation=cv2.INTER_LINEAR))


def test_nvidia_scalar_is_their_sample_value_and_applies_y_equals_scale_times_x_minus_offsets():
    assert net_scale_factor(IMAGENET) == pytest.approx(NVIDIA_SAMPLE_NET_SCALE_FACTOR, abs=5e-9)
    fastreid = DataConfig(height=64, width=32, interpolation="linear")  # 0..255, mean/std inside the model
    assert net_scale_factor(fastreid) == pytest.approx(NVIDIA_SAMPLE_NET_SCALE_FACTOR, abs=5e-9)
    img = _rgb(64, 32)  # no resize: only the normalisation differs
    x = img.astype(np.float64).transpose(2, 0, 1)
    offsets = np.array(fastreid.mean)[:, None, None]
    want = NVIDIA_SAMPLE_NET_SCALE_FACTOR * (x - offsets)  # DeepStream's y = netScaleFactor * (x - offsets)
    got = DEPLOYMENTS["deepstream-stretch"].preprocess([img], IMAGENET)[0]  # normalised outside: fed directly
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    # a model normalising inside is fed the input whose own normalisation gives DeepStream's y
    fed = DEPLOYMENTS["deepstream-stretch"].preprocess([img], fastreid)[0].astype(np.float64)
    std = np.array(fastreid.std)[:, None, None]
    np.testing.assert_allclose((fed - offsets) / std, want, rtol=1e-5, atol=1e-4)
    # and the exact variant is the model's own preprocessing
    np.testing.assert_array_equal(DEPLOYMENTS["deepstream-folded"].preprocess([img], IMAGENET),
                                  preprocess([img], IMAGENET))
    # about 1.3% off on the red channel
    assert abs(STD[0] / np.mean(STD) - 1) == pytest.approx(0.013, abs=0.001)


def test_bilinear_deployment_is_the_shared_preprocessing_with_a_linear_resize():
    img = _rgb(150, 61)
    cubic = DataConfig(height=64, width=32, interpolation="cubic")
    got = DEPLOYMENTS["bilinear"].preprocess([img], cubic)[0]
    want = cv2.resize(img, (32, 64), interpolation=cv2.INTER_LINEAR).astype(np.float32).transpose(2, 0, 1)
    np.testing.assert_array_equal(got, want)
    assert not np.array_equal(got, preprocess([img], cubic)[0])  # the model's own (cubic) differs


# --------------------------------------------------------------------------- folded ONNX + ReID section

@pytest.fixture(scope="module")
def small_onnx(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ds")
    torch.manual_seed(0)
    raw = export_small_onnx(SmallReidNet(), folder / "raw.onnx", torch.randn(8, 3, 64, 32))  # torchreid style
    path = folder / "small.onnx"
    res = run_cli("annotate", raw, "-o", path, "--input-size", "64", "32", "--mean", ",".join(map(str, MEAN)),
                  "--std", ",".join(map(str, STD)), "--pixel-scale", "1", "--channel-order", "rgb",
                  "--interpolation", "linear")
    assert res.code == 0, res
    return path


def _ort(path_or_model, x):
    import onnxruntime as ort

    data = path_or_model.SerializeToString() if isinstance(path_or_model, onnx.ModelProto) else str(path_or_model)
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.astype(np.float32)})[0]


def test_deepstream_writes_an_exact_folded_onnx_and_its_reid_section(small_onnx, tmp_path, image_dir):
    out = tmp_path / "ds"
    res = run_cli("deepstream", small_onnx, "-o", out, "--images", image_dir, "--network-mode", "fp16", "--keep-aspect")
    assert res.code == 0, res
    assert "PASS" in res.out
    folded, cfg = out / "small.deepstream.onnx", out / "small.tracker-reid.yml"
    reid = yaml.safe_load(cfg.read_text())["ReID"]
    assert reid["offsets"] == [0.0, 0.0, 0.0] and reid["netScaleFactor"] == 1.0
    assert reid["inferDims"] == [3, 64, 32] and reid["inputOrder"] == 0 and reid["colorFormat"] == 0
    assert reid["reidFeatureSize"] == 48 and reid["addFeatureNormalization"] == 1 and reid["networkMode"] == 2
    assert reid["keepAspc"] == 1 and reid["reidType"] == 1
    assert (cfg.parent / reid["onnxFile"]).resolve() == folded.resolve()
    assert reid["modelEngineFile"].startswith("small.deepstream.onnx_b100_gpu0_fp16")
    for key in ("batchSize", "workspaceSize", "reidHistorySize"):
        assert isinstance(reid[key], int) and reid[key] > 0
    # independent of reid-export's preprocessing: the folded graph on raw 0..255 RGB equals the
    # original on (x/255 - mean)/std, computed here by hand
    imgs = np.stack([_rgb(64, 32, s) for s in range(3)]).astype(np.float32).transpose(0, 3, 1, 2)
    normalised = (imgs / 255.0 - np.array(MEAN, np.float32)[:, None, None]) / np.array(STD, np.float32)[:, None, None]
    np.testing.assert_allclose(_ort(folded, imgs), _ort(small_onnx, normalised), rtol=1e-4, atol=1e-5)
    dc = read_data_config(onnx.load(str(folded)))
    assert dc.normalized_inside and dc.pixel_scale == 255.0 and dc.channel_order == "rgb"
    # its own data config reproduces the original in parity (what extract/eval use)
    res = run_cli("parity", small_onnx, folded, "--images", image_dir, "--no-progress")
    assert res.code == 0, res


def test_bgr_color_format_swaps_channels_inside_the_graph(small_onnx, tmp_path):
    out = tmp_path / "bgr"
    res = run_cli("deepstream", small_onnx, "-o", out, "--color-format", "bgr", "--reid-type", "both")
    assert res.code == 0, res
    reid = yaml.safe_load((out / "small.tracker-reid.yml").read_text())["ReID"]
    assert reid["colorFormat"] == 1 and reid["keepAspc"] == 0 and reid["reidType"] == 3
    rgb = np.stack([_rgb(64, 32, 7)]).astype(np.float32).transpose(0, 3, 1, 2)
    bgr = rgb[:, ::-1].copy()
    normalised = (rgb / 255.0 - np.array(MEAN, np.float32)[:, None, None]) / np.array(STD, np.float32)[:, None, None]
    np.testing.assert_allclose(_ort(out / "small.deepstream.onnx", bgr), _ort(small_onnx, normalised),
                               rtol=1e-4, atol=1e-5)


def test_a_wrong_fold_fails_the_self_check_and_writes_nothing(small_onnx, tmp_path, monkeypatch):
    real = ds.fold_normalisation

    def nvidia_scalar_fold(model, data_config, color_order):
        folded = real(model, data_config, color_order)
        for init in folded.model.graph.initializer:  # the per-channel scale replaced by NVIDIA's one scalar
            if init.name.endswith("__scale"):
                init.CopyFrom(numpy_helper.from_array(
                    np.full((1, 3, 1, 1), NVIDIA_SAMPLE_NET_SCALE_FACTOR, np.float32), init.name))
        return folded

    monkeypatch.setattr(ds, "fold_normalisation", nvidia_scalar_fold)
    out = tmp_path / "broken"
    res = run_cli("deepstream", small_onnx, "-o", out)
    assert_clean_error(res, "does not reproduce", "nothing written")
    assert not out.exists() or not any(out.iterdir())


def test_deepstream_bad_inputs(small_onnx, tmp_path):
    ckpt = tmp_path / "model.pth"
    ckpt.write_bytes(b"x")
    assert_clean_error(run_cli("deepstream", ckpt, "-o", tmp_path / "o"), "takes an ONNX", "reid-export onnx")
    raw = tmp_path / "raw.onnx"
    model = onnx.load(str(small_onnx))
    del model.metadata_props[:]
    onnx.save(model, str(raw))
    assert_clean_error(run_cli("deepstream", raw, "-o", tmp_path / "o"), "annotate")
    assert_clean_error(run_cli("deepstream", tmp_path / "missing.onnx", "-o", tmp_path / "o"), "missing.onnx")
    (tmp_path / "file").write_text("x")
    assert_clean_error(run_cli("deepstream", small_onnx, "-o", tmp_path / "file"), "is a file")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_clean_error(run_cli("deepstream", small_onnx, "-o", tmp_path / "o", "--images", empty), "no images")


# --------------------------------------------------------------------------- eval/parity --deployment

def _corner_model(path: Path) -> Path:
    """Features = the bottom-right 16x8 patch of a 64x32 0..255 input (+1): a letterbox's black
    padding wipes them out for crops taller than 2:1, the model's own stretch keeps them."""
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 64, 32])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 384])
    inits = [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in
             (("starts", [48, 24]), ("ends", [64, 32]), ("axes", [2, 3]))]
    inits.append(numpy_helper.from_array(np.array(1.0, np.float32), "one"))
    nodes = [helper.make_node("Slice", ["input", "starts", "ends", "axes"], ["patch"], name="patch"),
             helper.make_node("Flatten", ["patch"], ["flat"], axis=1, name="flat"),
             helper.make_node("Add", ["flat", "one"], ["output"], name="plus_one")]
    model = helper.make_model(helper.make_graph(nodes, "corner", [x], [y], inits),
                              opset_imports=[helper.make_opsetid("", 13)])
    set_metadata(model, base_metadata(DataConfig(height=64, width=32, interpolation="linear", feat_dim=384), "fp32"))
    onnx.save(model, str(path))
    return path


def _colour_dataset(root: Path, size: tuple[int, int]) -> Path:
    """4 identities, one colour each (with noise): query camera 1, three gallery images from camera 2."""
    base = root / "Market-1501-v15.09.15"
    rng = np.random.default_rng(0)
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]
    for pid, colour in enumerate(colours, start=1):
        for split, cam, count in (("query", 1, 1), ("bounding_box_test", 2, 3)):
            for i in range(count):
                img = np.clip(np.array(colour)[None, None] + rng.normal(0, 8, (*size, 3)), 0, 255).astype(np.uint8)
                path = base / split / f"{pid:04d}_c{cam}s1_{i:06d}_00.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(path), img[:, :, ::-1])
    return base


def test_eval_deployment_cost_gate_fails_a_letterbox_that_loses_the_features(tmp_path):
    model = _corner_model(tmp_path / "corner.onnx")
    tall = _colour_dataset(tmp_path / "tall", (200, 40))  # 5:1 crops: the letterbox pads the right side
    res = run_cli("eval", model, "--dataset-root", tall, "--deployment", "deepstream-folded", "--deployment",
                  "bilinear", "--no-progress", "--report", tmp_path / "eval.json")
    assert res.code == 1, res
    assert "FAIL" in res.out and "deepstream-folded preprocessing costs" in res.out
    import json

    doc = json.loads((tmp_path / "eval.json").read_text())
    rows = {m["deployment"]: m for m in doc["models"]}
    assert rows[None]["mAP"] == pytest.approx(100.0)
    assert rows["deepstream-folded"]["cost_mAP"] > 1.0
    assert rows["bilinear"]["cost_mAP"] == pytest.approx(0.0)  # the model's own resize is bilinear too
    assert doc["passed"] is False and doc["deployments"] == ["deepstream-folded", "bilinear"]
    # the padding left nothing of the features: every crop gets the same embedding, and even a loose
    # cost gate fails the collapsed deployment; --no-gate reports it and passes
    res = run_cli("eval", model, "--dataset-root", tall, "--deployment", "deepstream-folded", "--no-progress",
                  "--max-deployment-map-drop", "100", "--max-deployment-r1-drop", "100")
    assert res.code == 1 and "corner.onnx@deepstream-folded: collapsed embeddings" in res.out, res
    assert "preprocessing costs" not in res.out
    res = run_cli("eval", model, "--dataset-root", tall, "--deployment", "deepstream-folded", "--no-progress",
                  "--no-gate")
    assert res.code == 0, res
    # on 2:1 crops the letterbox is a plain resize: no cost, the default gate passes
    square = _colour_dataset(tmp_path / "twotoone", (128, 64))
    res = run_cli("eval", model, "--dataset-root", square, "--deployment", "deepstream-folded", "--no-progress")
    assert res.code == 0, res
    assert "PASS" in res.out


def test_parity_deployment_compares_the_candidate_fed_as_deployed(tmp_path):
    model = _corner_model(tmp_path / "corner.onnx")
    tall = _colour_dataset(tmp_path / "tall", (200, 40)) / "query"
    res = run_cli("parity", model, model, "--images", tall, "--deployment", "deepstream-folded", "--no-progress",
                  "--report", tmp_path / "p.json")
    assert res.code == 1, res
    assert "@deepstream-folded" in res.out
    same = _colour_dataset(tmp_path / "twotoone", (128, 64)) / "query"
    res = run_cli("parity", model, model, "--images", same, "--deployment", "deepstream-folded", "--no-progress")
    assert res.code == 0, res


def test_unknown_deployment_is_a_usage_error(tmp_path):
    model = _corner_model(tmp_path / "corner.onnx")
    res = run_cli("eval", model, "--dataset-root", tmp_path, "--deployment", "nope")
    assert res.code == 2 and "nope" in res.err


def test_fold_refuses_non_float_input():
    x = helper.make_tensor_value_info("input", TensorProto.UINT8, ["N", 3, 64, 32])
    y = helper.make_tensor_value_info("output", TensorProto.UINT8, ["N", 3, 64, 32])
    model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["input"], ["output"])], "g", [x], [y]))
    with pytest.raises(ReidExportError, match="not float32"):
        ds.fold_normalisation(model, IMAGENET, "rgb")


def test_bad_options_are_one_line_before_the_model_is_read(tmp_path):
    """DeepStreamOptions.check() runs first: a bad value is one line (exit 2), the model is not even opened."""
    out = tmp_path / "out"
    assert_clean_error(run_cli("deepstream", tmp_path / "missing.onnx", "-o", out, "--threshold-fmr", "2"),
                       "--threshold-fmr", "between 0 and 1")
    assert_clean_error(run_cli("deepstream", tmp_path / "missing.onnx", "-o", out, "--max-rel-l2", "0"),
                       "--max-rel-l2", "> 0")
    assert not out.exists()
