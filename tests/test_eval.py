"""reid-export eval on the real Market-1501 crops: report keys, gates, NaN models, pictures."""

import json

import cv2
import numpy as np
import pytest
import torch

from conftest import CONFIGS, assert_clean_error, data_dir, randomize_bn, run_cli
from reid_export.checkpoint import save_checkpoint
from reid_export.config import load_config
from reid_export.data_config import data_config_from_cfg
from reid_export.modeling import build_model

pytestmark = pytest.mark.slow  # a development run skips it: pytest -m "not slow"

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
            "nan": _ckpt(folder / "nan.pth", mutate=_nan), "other": _ckpt(folder / "other.pth", seed=1)}


def test_eval_report_gates_and_plots(models, tmp_path):
    root = data_dir("market1501-mini")
    report, plots = tmp_path / "eval.json", tmp_path / "plots"
    # --no-gate: a report only (the constant model fails the default gates: test_eval_gates.py)
    res = run_cli("eval", models["good"], models["const"], "--dataset-root", root, "--report", report,
                  "--plots", plots, "--no-progress", "--no-gate")
    assert res.code == 0, res
    doc = json.loads(report.read_text())
    assert doc["num_query"] == 3 and doc["num_gallery"] == 54
    first, second = doc["models"]
    for m in doc["models"]:
        assert {"model", "backend", "precision", "Rank-1", "Rank-5", "Rank-10", "mAP", "mINP"} <= set(m)
        assert m["backend"] == "torch" and m["precision"] == "fp32"
        assert any(k.startswith("TPR@FPR") for k in m)
    # each model's figures and the delta, against Rank-1/mAP computed independently in this test
    (r1_good, map_good), (r1_const, map_const) = _expected(models["good"], root), _expected(models["const"], root)
    assert first["mAP"] == pytest.approx(map_good, abs=1e-3) and second["mAP"] == pytest.approx(map_const, abs=1e-3)
    assert second["delta_mAP"] == pytest.approx(map_const - map_good, abs=1e-3)
    assert second["delta_Rank-1"] == pytest.approx(r1_const - r1_good, abs=1e-3)
    for name in ("roc.png", "ranklist_worst.png", "ranklist_best.png"):
        img = cv2.imread(str(plots / name))
        assert img is not None and img.shape[0] > 100 and img.shape[1] > 300, name
    # two working models: a mAP gate below their difference fails and says which model and by how
    # much; one above it passes
    assert run_cli("eval", models["good"], models["other"], "--dataset-root", root, "--report", report,
                   "--no-progress", "--no-gate").code == 0
    delta = json.loads(report.read_text())["models"][1]["delta_mAP"]
    assert abs(delta) > 1.0, "fixture: the two models must rank differently"
    better, worse = (models["good"], models["other"]) if delta < 0 else (models["other"], models["good"])
    drop = abs(delta)
    gated = run_cli("eval", better, worse, "--dataset-root", root, "--max-map-drop",
                    f"{drop / 2:.3f}", "--max-r1-drop", "100", "--report", report, "--no-progress")
    assert gated.code == 1
    assert "FAIL" in gated.out and worse.name in gated.out and "mAP" in gated.out
    assert json.loads(report.read_text())["passed"] is False
    assert run_cli("eval", better, worse, "--dataset-root", root, "--max-map-drop",
                   f"{drop + 1:.3f}", "--max-r1-drop", "100", "--no-progress").code == 0


def test_eval_nan_model_fails_with_count(models, tmp_path):
    root = data_dir("market1501-mini")
    report = tmp_path / "eval.json"
    res = run_cli("eval", models["good"], models["nan"], "--dataset-root", root, "--report", report, "--no-progress")
    assert res.code == 1
    assert "nan.pth" in res.out and "NaN/Inf values" in res.out
    doc = json.loads(report.read_text())
    assert doc["models"][1]["nonfinite"] > 0 and not doc["passed"]


def _expected(checkpoint, root, flip=False, metric="cosine", aqe=None, rerank=None):
    """Rank-1 and mAP computed here: the model run by hand (the mirror taken in numpy), distances in
    numpy, AQE/re-ranking from verify.rerank (tested against their definitions in test_rerank.py),
    the textbook CMC/mAP of test_metrics.py."""
    import numpy as np

    from reid_export.checkpoint import load_model_from_checkpoint
    from reid_export.data.market import MarketDataset
    from reid_export.preprocess import preprocess
    from reid_export.verify.rerank import average_query_expansion, k_reciprocal_rerank
    from test_metrics import reference_rank

    model, _, dc = load_model_from_checkpoint(checkpoint)
    ds = MarketDataset(root)

    def feats(items):
        x = preprocess([it.path for it in items], dc)
        with torch.no_grad():
            f = model(torch.from_numpy(x)).numpy().astype(np.float64)
            if flip:
                f = (f + model(torch.from_numpy(np.ascontiguousarray(x[..., ::-1]))).numpy()) / 2.0
        return f

    qf, gf = feats(ds.query), feats(ds.gallery)
    if aqe:
        qf, gf = average_query_expansion(qf, gf, **aqe)
    if rerank:
        dist = k_reciprocal_rerank(qf, gf, metric=metric, **rerank)
    elif metric == "cosine":
        qn = qf / np.linalg.norm(qf, axis=1, keepdims=True)
        gn = gf / np.linalg.norm(gf, axis=1, keepdims=True)
        dist = 1.0 - qn @ gn.T
    else:
        dist = ((qf[:, None, :] - gf[None, :, :]) ** 2).sum(-1)
    pid = lambda items: np.array([it.pid for it in items])  # noqa: E731
    cam = lambda items: np.array([it.camid for it in items])  # noqa: E731
    dist = np.round(dist, 6)  # equal features tie exactly, then rank by gallery order (the documented rule)
    cmc, mAP, _, _ = reference_rank(dist, pid(ds.query), pid(ds.gallery), cam(ds.query), cam(ds.gallery))
    return 100.0 * cmc[0], 100.0 * mAP


@pytest.mark.parametrize("extra,expect", [
    ([], {}),
    (["--metric", "euclidean", "--flip-test"], {"flip": True, "metric": "euclidean"}),
    (["--aqe"], {"aqe": {"qe_times": 1, "qe_k": 5, "alpha": 3.0}}),
    (["--rerank", "--k1", "5", "--k2", "2"], {"rerank": {"k1": 5, "k2": 2, "lambda_value": 0.3}}),
])
def test_eval_options_compute_what_they_name(models, tmp_path, extra, expect):
    root = data_dir("market1501-mini")
    report = tmp_path / "eval.json"
    res = run_cli("eval", models["good"], "--dataset-root", root, "--no-progress", "--report", report, *extra)
    assert res.code == 0, (extra, res)
    got = json.loads(report.read_text())["models"][0]
    rank1, mAP = _expected(models["good"], root, **expect)
    assert got["Rank-1"] == pytest.approx(rank1, abs=1e-3) and got["mAP"] == pytest.approx(mAP, abs=1e-3), \
        (extra, got["Rank-1"], got["mAP"], rank1, mAP)


def test_eval_options_change_the_result(models):
    """The fixture model and data are such that each option moves mAP: the test above can tell them apart."""
    root = data_dir("market1501-mini")
    plain = _expected(models["good"], root)[1]
    for expect in ({"flip": True, "metric": "euclidean"}, {"aqe": {"qe_times": 1, "qe_k": 5, "alpha": 3.0}},
                   {"rerank": {"k1": 5, "k2": 2, "lambda_value": 0.3}}):
        assert abs(_expected(models["good"], root, **expect)[1] - plain) > 0.01, expect


def test_eval_bad_dataset(models, tmp_path):
    (tmp_path / "bounding_box_test").mkdir()
    assert_clean_error(run_cli("eval", models["good"], "--dataset-root", tmp_path), "query")
    assert_clean_error(run_cli("eval", models["good"], "--dataset-root", tmp_path / "nowhere"), "nowhere")


def test_plots_say_what_they_show(tmp_path):
    """The ROC is titled by the dataset's own name (a synthetic set says so, the generic Market folder name
    gets its parent), its lower panel is the change against the reference at each false-positive rate,
    and the rank list's legend line fits the picture."""
    from reid_export.verify.evaluation import dataset_name
    from reid_export.verify.plots import _tpr_at, rank_list_image

    fpr, tpr = np.array([0.0, 0.01, 0.1, 1.0]), np.array([0.2, 0.5, 0.8, 1.0])
    assert _tpr_at(fpr, tpr, np.array([1e-5, 0.01, 0.05, 0.1, 1.0])).tolist() == [0.2, 0.5, 0.5, 0.8, 1.0]
    synth = tmp_path / "demo-data" / "Market-1501-v15.09.15"
    synth.mkdir(parents=True)
    (synth.parent / "synth.json").write_text("{}")
    assert dataset_name(synth).startswith("synthetic crops (demo-data")
    (synth.parent / "synth.json").unlink()
    assert dataset_name(synth) == "demo-data/Market-1501-v15.09.15"
    assert dataset_name(tmp_path / "cuhk03-labeled") == "cuhk03-labeled"
    crop = tmp_path / "c.jpg"
    cv2.imwrite(str(crop), np.full((128, 64, 3), 128, np.uint8))
    rows = [{"query": str(crop), "query_label": ["q0 id1", "AP 100%"], "gallery": [str(crop)] * 3,
             "matches": [True, False, True], "distances": [0.1, 0.2, 0.3]}]
    img = rank_list_image(rows, topk=3)
    plain = rank_list_image(rows, topk=3, legend=None)
    assert img.shape[0] == plain.shape[0] + 18 and img.shape[1] == plain.shape[1]
    assert (img[:18] < 128).any()  # the legend is drawn
