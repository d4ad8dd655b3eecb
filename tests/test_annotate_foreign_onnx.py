"""An ONNX from elsewhere (torchreid style: opset 11, fixed batch 1, (pixels/255 - mean)/std outside the
model, no metadata): refused until annotated, then annotated, quantized per-channel and extracted."""

from __future__ import annotations

import json
import warnings

import cv2
import numpy as np
import onnx
import pytest
import torch
from torch import nn

from conftest import assert_clean_error, run_cli
from reid_export.export.metadata import KEY_DATA_CONFIG, get_metadata
from reid_export.embeddings import relative_l2
from reid_export.export.quantize.qdq_check import check_tensorrt_qdq

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class TorchreidStyleNet(nn.Module):
    """A small conv net whose input is already normalised, ending like torchreid's (fc -> BN -> ReLU)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 64, 3, 1, 1), nn.BatchNorm2d(64), nn.ReLU())
        self.fc = nn.Sequential(nn.Linear(64, 48), nn.BatchNorm1d(48), nn.ReLU())

    def forward(self, x):
        return self.fc(self.features(x).mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
    folder = tmp_path_factory.mktemp("foreign")
    torch.manual_seed(0)
    net = TorchreidStyleNet()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        net.train()
        net(torch.randn(16, 3, 64, 32))
    net.eval()
    path = folder / "osnet_like.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(1, 3, 64, 32),), str(path), dynamo=False, opset_version=11,
                          input_names=["input"], output_names=["output"])
    return folder, path, net


def _annotate(model, out, *extra):
    return run_cli("annotate", model, "-o", out, "--mean", ",".join(map(str, MEAN)), "--std",
                   ",".join(map(str, STD)), "--pixel-scale", "1", "--channel-order", "rgb",
                   "--interpolation", "linear", *extra)


def test_foreign_onnx_is_refused_with_the_annotate_command(foreign, parity_images, tmp_path):
    _, path, _ = foreign
    result = run_cli("extract", path, *parity_images, "-o", tmp_path / "f.npy")
    assert_clean_error(result, "no reid-export data config", "reid-export annotate", "--input-size 64 32")
    result = run_cli("quantize", path, "-o", tmp_path / "q.onnx", "--precision", "fp16")
    assert_clean_error(result, "reid-export annotate")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_annotate_quantize_extract(foreign, parity_images, tmp_path):
    _, path, net = foreign
    annotated = tmp_path / "annotated.onnx"
    result = _annotate(path, annotated)  # input size taken from the model's fixed input
    assert result.code == 0, result
    assert "input 64x32" in result.err and "48-d features" in result.err
    config = json.loads(get_metadata(onnx.load(str(annotated)))[KEY_DATA_CONFIG])
    assert config["pixel_scale"] == 1.0 and config["normalized_inside"] is False and config["feat_dim"] == 48

    # extract = torchreid's own preprocessing (RGB, bilinear resize, /255, (x - mean) / std) + the net.
    feats = tmp_path / "f.npy"
    assert run_cli("extract", annotated, *parity_images, "-o", feats, "--no-progress").code == 0
    batch = []
    for p in parity_images:
        rgb = cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB)
        rgb = cv2.resize(rgb, (32, 64), interpolation=cv2.INTER_LINEAR).astype(np.float32) / 255.0
        batch.append(((rgb - MEAN) / STD).transpose(2, 0, 1))
    with torch.no_grad():
        expected = net(torch.tensor(np.stack(batch), dtype=torch.float32)).numpy()
    assert relative_l2(np.load(feats), expected).max() < 1e-5  # batch 1 model: the 5 images were split

    # int8 per-channel needs opset 13: upgraded, and said so.
    q = tmp_path / "int8.onnx"
    # (the accuracy gate on 2 held-out crops of a random net is not the point: tests/test_quantize_int8_search.py)
    result = run_cli("quantize", annotated, "-o", q, "--precision", "int8", "--calib-dir",
                     parity_images[0].parent, "--no-progress", "--max-float", "0", "--allow-below-gate")
    assert result.code == 0, result
    assert "upgraded the model from opset 11 to 13" in result.err
    assert "fewer than --calib-size 512 plus the held-out ones; using 3" in result.err
    model = onnx.load(str(q))
    assert next(o.version for o in model.opset_import if o.domain == "") == 13
    report = check_tensorrt_qdq(model)
    assert report.ok and report.per_channel_weights >= 3, report.problems
    meta = get_metadata(model)
    assert json.loads(meta["reid_export.quantization"])["opset_upgraded_from"] == 11
    assert json.loads(meta[KEY_DATA_CONFIG]) == config  # the data config travels on
    feats8 = tmp_path / "f8.npy"
    assert run_cli("extract", q, *parity_images, "-o", feats8, "--no-progress").code == 0
    a, b = np.load(feats), np.load(feats8)
    cosine = np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosine.min() > 0.99, cosine


def test_annotate_bad_inputs(foreign, tmp_path):
    _, path, _ = foreign
    out = tmp_path / "a.onnx"
    result = _annotate(path, out, "--input-size", "128", "64")
    assert_clean_error(result, "--input-size 128 64", "--input-size 64 32")
    result = run_cli("annotate", path, "-o", out, "--mean", "123.7,116.3,103.5", "--std", "58.4,57.1,57.4",
                     "--pixel-scale", "1", "--channel-order", "rgb", "--interpolation", "linear")
    assert_clean_error(result, "--pixel-scale is 1")
    result = _annotate(path, out, "--mean", "0.5,0.5")
    assert_clean_error(result, "--mean")
    not_onnx = tmp_path / "x.onnx"
    not_onnx.write_bytes(b"\x00\x01garbage" * 20)
    assert_clean_error(_annotate(not_onnx, out), "x.onnx", "not an ONNX model")
    assert not out.exists()


def test_annotate_replaces_and_says_so(foreign, tmp_path):
    _, path, _ = foreign
    first, second = tmp_path / "a.onnx", tmp_path / "b.onnx"
    assert _annotate(path, first).code == 0
    result = _annotate(first, second, "--normalized-inside")
    assert result.code == 0 and "replaced the data config" in result.err
    assert json.loads(get_metadata(onnx.load(str(second)))[KEY_DATA_CONFIG])["normalized_inside"] is True
