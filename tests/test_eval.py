"""reid-export eval on the real Market-1501 crops: report keys, gates, NaN models, pictures."""

import json

import cv2
import pytest
import torch

from conftest import CONFIGS, assert_clean_error, data_dir, randomize_bn, run_cli
from reid_export.checkpoint import save_checkpoint
from reid_export.config import load_config
from reid_export.data_config import data_config_from_cfg
from reid_export.modeling import build_model

R18 = CONFIGS / "Market1501" / "bagtricks_R18.yml"


def _ckpt(path, seed=0, mutate=None):
    cfg = load_config(R18, ["INPUT.SIZE_TEST", "[128, 64]"])
    torch.manual_seed(seed)
    model = randomize_bn(build_model(cfg), seed=seed, size=(128, 64))
    if mutate:
        mutate(model)
    save_checkpoint(path, model, cfg, data_config_from_cfg(cfg, model.feat_dim, path.stem))
    return path


def _constant(model):
    with torch.no_grad():  # BNNeck scale 0: every image gets the same feature (its bias)
        model.heads.bottleneck[0].weight.zero_()
        model.heads.bottleneck[0].bias.copy_(torch.linspace(-1, 1, model.feat_dim))


def _nan(model):
    with torch.no_grad():
        model.heads.bottleneck[0].running_var[:3] = float("nan")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval")
    return {"good": _ckpt(folder / "good.pth"), "const": _ckpt(folder / "const.pth", mutate=_constant),
            "nan": _ckpt(folder / "nan.pth", mutate=_nan)}


def test_eval_report_gates_and_plots(models, tmp_path):
    root = data_dir("market1501-mini")
    report, plots = tmp_path / "eval.json", tmp_path / "plots"
    res = run_cli("eval", models["good"], models["const"], "--dataset-root", root, "--report", report,
                  "--plots", plots, "--no-progress")
    assert res.code == 0, res
    doc = json.loads(report.read_text())
    assert doc["num_query"] == 3 and doc["num_gallery"] == 54
    first, second = doc["models"]
    for m in doc["models"]:
        assert {"model", "backend", "precision", "Rank-1", "Rank-5", "Rank-10", "mAP", "mINP"} <= set(m)
        assert m["backend"] == "torch" and m["precision"] == "fp32"
        assert any(k.startswith("TPR@FPR") for k in m)
    assert second["delta_mAP"] == pytest.approx(second["mAP"] - first["mAP"])
    assert abs(second["delta_mAP"]) > 1.0, "fixture: the two models must rank differently"
    better, worse = (models["good"], models["const"]) if second["delta_mAP"] < 0 else (models["const"], models["good"])
    drop = abs(second["delta_mAP"])
    for name in ("roc.png", "ranklist_worst.png", "ranklist_best.png"):
        img = cv2.imread(str(plots / name))
        assert img is not None and img.shape[0] > 100 and img.shape[1] > 300, name
    # the same run with a gate below the drop fails and says which model and by how much
    gated = run_cli("eval", better, worse, "--dataset-root", root, "--max-map-drop",
                    f"{drop / 2:.3f}", "--report", report, "--no-progress")
    assert gated.code == 1
    assert "FAIL" in gated.out and worse.name in gated.out and "mAP" in gated.out
    assert json.loads(report.read_text())["passed"] is False
    # and a gate above it passes
    assert run_cli("eval", better, worse, "--dataset-root", root, "--max-map-drop",
                   f"{drop + 1:.3f}", "--no-progress").code == 0


def test_eval_nan_model_fails_with_count(models, tmp_path):
    root = data_dir("market1501-mini")
    report = tmp_path / "eval.json"
    res = run_cli("eval", models["good"], models["nan"], "--dataset-root", root, "--report", report, "--no-progress")
    assert res.code == 1
    assert "nan.pth" in res.out and "NaN/Inf values" in res.out
    doc = json.loads(report.read_text())
    assert doc["models"][1]["nonfinite"] > 0 and not doc["passed"]


def test_eval_rerank_and_aqe_run(models):
    root = data_dir("market1501-mini")
    for extra in (["--rerank", "--k1", "5", "--k2", "2"], ["--aqe"], ["--metric", "euclidean", "--flip-test"]):
        res = run_cli("eval", models["good"], "--dataset-root", root, "--no-progress", *extra)
        assert res.code == 0, (extra, res)


def test_eval_bad_dataset(models, tmp_path):
    (tmp_path / "bounding_box_test").mkdir()
    assert_clean_error(run_cli("eval", models["good"], "--dataset-root", tmp_path), "query")
    assert_clean_error(run_cli("eval", models["good"], "--dataset-root", tmp_path / "nowhere"), "nowhere")
