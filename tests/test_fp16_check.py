"""fp16-check: true half-precision activations expose overflow that ONNX Runtime on CPU hides."""

import pytest
import json

import torch

from conftest import CONFIGS, randomize_bn, run_cli
from reid_export.checkpoint import save_checkpoint
from reid_export.config import load_config
from reid_export.data_config import data_config_from_cfg
from reid_export.modeling import build_model

pytestmark = pytest.mark.slow  # a development run skips it: pytest -m "not slow"


def _gem_ckpt(path, scale=1.0):
    cfg = load_config(CONFIGS / "Market1501/bagtricks_R18.yml",
                      ["INPUT.SIZE_TEST", "[128, 64]", "MODEL.HEADS.POOL_LAYER", "GeneralizedMeanPooling"])
    torch.manual_seed(0)
    model = randomize_bn(build_model(cfg), size=(128, 64))
    with torch.no_grad():  # large final activations: GeM's x**3 leaves FP16's range
        model.backbone.layer4[-1].bn2.weight.mul_(scale)
        model.backbone.layer4[-1].bn2.bias.mul_(scale)
    save_checkpoint(path, model, cfg, data_config_from_cfg(cfg, model.feat_dim, path.stem))
    return path


def test_fp16_check_passes_normal_model_and_finds_gem_overflow(tmp_path, image_dir):
    ok = _gem_ckpt(tmp_path / "ok.pth")
    report = tmp_path / "fp16.json"
    res = run_cli("fp16-check", ok, "--images", image_dir, "--report", report)
    assert res.code == 0, res
    doc = json.loads(report.read_text())
    assert doc["passed"] and doc["overflow_layers"] == [] and doc["min_headroom"] > 1
    gem = next(l for l in doc["layers"] if l["layer"] == "heads.pool_layer")
    assert gem["fp32_pow_max"] > gem["fp32_max_abs"]  # x**3 of the largest input, measured

    hot = _gem_ckpt(tmp_path / "hot.pth", scale=60.0)
    res = run_cli("fp16-check", hot, "--images", image_dir, "--report", report)
    assert res.code == 1
    assert "FP16 overflow" in res.out
    doc = json.loads(report.read_text())
    assert "heads.pool_layer" in doc["overflow_layers"]
    gem = next(l for l in doc["layers"] if l["layer"] == "heads.pool_layer")
    assert gem["fp32_pow_max"] > 65504 and gem["fp16_nonfinite"] > 0
