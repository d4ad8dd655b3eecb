"""eval's default gates, the tracker thresholds and the collapsed-embedding check.

* thresholds: the distance at each false-match rate, by hand on a tiny matrix and against its
  definition on random ones; ``eval`` reports them (and says when the eval set is too small);
  ``deepstream --threshold-dataset`` writes 1 - that distance where the tracker reads it;
* gates: with two or more models the first is the reference; a real model fed a consistent but
  wrong convention fails by default, an identical copy passes, ``--no-gate`` reports only;
* collapse: a graph that normalises inside, annotated as normalised outside (normalised twice),
  maps every crop to one direction: ``extract``, ``parity`` and ``eval`` say so; a good model not.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import yaml

from conftest import (DATA, SmallReidNet, assert_clean_error, data_dir, export_small_onnx, negative_pair_distances,
                      run_cli)
from reid_export.verify.metrics import fmr_thresholds, roc_tpr_at_fpr

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHARED_MODEL = DATA.parent / "models" / "osnet_x0_5_msmt17_combineall.onnx"  # beside the shared data
IMAGENET = ("0.485,0.456,0.406", "0.229,0.224,0.225")


# --------------------------------------------------------------------------- thresholds, by hand

def _hand_case():
    # Query pid 1, cam 0.  Gallery (pid, cam, dist):
    #   g0 (1, 1, 0.1) pos   g1 (2, 1, 0.2) neg   g2 (1, 2, 0.3) pos   g3 (3, 1, 0.4) neg
    #   g4 (1, 0, 0.0) left out (same pid, same camera)   g5 (4, 1, 0.5) neg   g6 (0, 1, 0.6) neg
    dist = np.array([[0.1, 0.2, 0.3, 0.4, 0.0, 0.5, 0.6]])
    return (dist, np.array([1]), np.array([1, 2, 1, 3, 1, 4, 0]), np.array([0]), np.array([1, 1, 2, 1, 0, 1, 1]))


def test_fmr_thresholds_by_hand():
    res = fmr_thresholds(*_hand_case(), fmrs=(0.25, 0.5, 0.1))
    assert res["num_positive_pairs"] == 2 and res["num_negative_pairs"] == 4  # g4 is not a pair
    quarter, half, tenth = res["points"]
    # FMR 0.25 of 4 negatives: one may be accepted (0.2); the next, 0.4, is the threshold; both positives below
    assert quarter["distance"] == pytest.approx(0.4) and quarter["tmr"] == pytest.approx(100.0)
    assert quarter["accepted_negatives"] == 1 and quarter["note"] is None
    # FMR 0.5: two accepted (0.2, 0.4): the threshold is 0.5
    assert half["distance"] == pytest.approx(0.5) and half["accepted_negatives"] == 2
    # FMR 0.1 of 4 negatives accepts less than one pair: not resolvable, and it says what it needs
    assert tenth["distance"] is None and tenth["tmr"] is None
    assert "below what 4 negative pairs resolve" in tenth["note"] and ">= 10" in tenth["note"]


@pytest.mark.parametrize("seed", [0, 1])
def test_fmr_thresholds_against_their_definition(seed):
    rng = np.random.default_rng(seed)
    nq, ng = 15, 60
    q_pids, g_pids = rng.integers(1, 8, nq), rng.integers(1, 8, ng)
    q_cams, g_cams = rng.integers(0, 3, nq), rng.integers(0, 3, ng)
    dist = rng.random((nq, ng))
    removed = (q_pids[:, None] == g_pids[None]) & (q_cams[:, None] == g_cams[None])
    pos = dist[(q_pids[:, None] == g_pids[None]) & ~removed]
    neg = dist[q_pids[:, None] != g_pids[None]]
    fmrs = (0.2, 0.05, 0.01)
    res = fmr_thresholds(dist, q_pids, g_pids, q_cams, g_cams, fmrs)
    tpr = roc_tpr_at_fpr(dist, q_pids, g_pids, q_cams, g_cams, fmrs)
    for f, point in zip(fmrs, res["points"]):
        t = point["distance"]
        assert np.mean(neg < t) <= f < np.mean(neg <= t)  # the largest threshold whose FMR is <= f
        assert point["tmr"] == pytest.approx(np.mean(pos < t) * 100.0) == pytest.approx(tpr[f"TPR@FPR={f:.0e}"])


# --------------------------------------------------------------------------- models

@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """``good.onnx`` (annotated as it is: 0..255, normalised inside) and ``twice.onnx`` (the same graph
    annotated 0..1 with ImageNet mean/std applied before it: normalised twice)."""
    folder = tmp_path_factory.mktemp("gates")
    torch.manual_seed(0)
    # fast-reid style: RGB 0..255 in, the per-channel normalisation inside the graph
    net = SmallReidNet(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375])
    raw = export_small_onnx(net, folder / "raw.onnx", torch.rand(8, 3, 64, 32) * 255)
    common = ["--input-size", "64", "32", "--channel-order", "rgb", "--interpolation", "linear"]
    good, twice = folder / "good.onnx", folder / "twice.onnx"
    assert run_cli("annotate", raw, "-o", good, "--mean", "123.675,116.28,103.53", "--std", "58.395,57.12,57.375",
                   "--pixel-scale", "255", "--normalized-inside", *common).code == 0
    assert run_cli("annotate", raw, "-o", twice, "--mean", IMAGENET[0], "--std", IMAGENET[1],
                   "--pixel-scale", "1", *common).code == 0
    return {"good": good, "twice": twice, "folder": folder}


# --------------------------------------------------------------------------- collapse

def test_extract_warns_about_collapsed_embeddings_and_records_it(small, tmp_path):
    images = data_dir("parity-images")
    res = run_cli("extract", small["twice"], images, "-o", tmp_path / "twice.npy", "--no-progress")
    assert res.code == 0, res
    warning = [line for line in res.err.splitlines() if "collapsed embeddings" in line]
    assert len(warning) == 1 and "twice.onnx" in warning[0] and "normalised twice" in warning[0]
    assert "annotate --detect" in warning[0]
    meta = json.loads((tmp_path / "twice.json").read_text())
    assert meta["collapse"]["collapsed"] is True and meta["collapse"]["min_pair_cosine"] >= 0.99
    # the same graph annotated as it is tells the crops apart: no warning, recorded as not collapsed
    res = run_cli("extract", small["good"], images, "-o", tmp_path / "good.npy", "--no-progress")
    assert res.code == 0 and "collapsed" not in res.err, res
    meta = json.loads((tmp_path / "good.json").read_text())
    assert meta["collapse"]["collapsed"] is False and meta["collapse"]["min_pair_cosine"] < 0.9


def test_parity_warns_about_each_collapsed_model(small, tmp_path):
    images = data_dir("parity-images")
    report = tmp_path / "parity.json"
    # twice against itself passes parity (the same features) and is still useless: the warning says so
    res = run_cli("parity", small["twice"], small["twice"], small["good"], "--images", images, "--report", report,
                  "--no-progress")
    doc = json.loads(report.read_text())
    assert doc["collapsed"] == [str(small["twice"])]
    assert doc["candidates"][0]["passed"] is True
    assert doc["collapse"][str(small["good"])]["collapsed"] is False
    assert res.err.count("collapsed embeddings") == 1 and "twice.onnx" in res.err


def test_eval_fails_a_collapsed_model_even_alone(small, tmp_path):
    root = data_dir("market1501-mini")
    report = tmp_path / "eval.json"
    res = run_cli("eval", small["twice"], "--dataset-root", root, "--no-progress", "--report", report)
    assert res.code == 1, res
    assert "FAIL" in res.out and "collapsed embeddings" in res.out and "collapsed embeddings" in res.err
    doc = json.loads(report.read_text())
    assert doc["models"][0]["status"] == "FAIL" and doc["models"][0]["collapse"]["collapsed"] is True
    res = run_cli("eval", small["good"], "--dataset-root", root, "--no-progress", "--report", report)
    assert res.code == 0 and "collapsed" not in res.err, res
    assert json.loads(report.read_text())["models"][0]["collapse"]["collapsed"] is False


def test_the_hand_offs_functions_agree_with_eval(small, tmp_path):
    from reid_export import api

    images = sorted(data_dir("parity-images").glob("*.jpg"))
    assert api.check_collapse(small["twice"], images).collapsed
    assert not api.check_collapse(small["good"], images).collapsed
    assert api.check_collapse(small["good"], images[:2]) is None  # two images say too little
    # reference_threshold is the distance eval reports for the same model, set and FMR
    root = data_dir("market1501-mini")
    thr = api.reference_threshold(small["good"], root, 0.1)
    ev = api.evaluate([small["good"]], root, progress=False)
    point = next(p for p in ev.rows[0].metrics["thresholds"]["points"] if p["fmr"] == 0.1)
    assert thr.distance == pytest.approx(point["distance"]) and thr.tmr == pytest.approx(point["tmr"])
    assert thr.similarity == pytest.approx(1.0 - thr.distance) and thr.num_negative_pairs == 131
    with pytest.raises(api.ReidExportError, match="needs >= 1000"):
        api.reference_threshold(small["good"], root, 1e-3)


# --------------------------------------------------------------------------- default gates, real model

@pytest.fixture(scope="module")
def osnet(tmp_path_factory):
    """The real OSNet-x0.5 (MSMT17) annotated right (RGB, ImageNet mean/std outside, 0..1), a byte copy
    of it, and annotated with a consistent but wrong convention (0..255, no normalisation)."""
    if not SHARED_MODEL.exists():
        pytest.skip(f"{SHARED_MODEL} is missing (shared models)")
    folder = tmp_path_factory.mktemp("osnet")
    common = ["--input-size", "256", "128", "--channel-order", "rgb", "--interpolation", "linear"]
    right, wrong = folder / "osnet05.onnx", folder / "osnet05-wrong.onnx"
    assert run_cli("annotate", SHARED_MODEL, "-o", right, "--mean", IMAGENET[0], "--std", IMAGENET[1],
                   "--pixel-scale", "1", *common).code == 0
    assert run_cli("annotate", SHARED_MODEL, "-o", wrong, "--mean", "0,0,0", "--std", "1,1,1",
                   "--pixel-scale", "255", *common).code == 0
    copy = folder / "osnet05-copy.onnx"
    shutil.copy(right, copy)
    return {"right": right, "copy": copy, "wrong": wrong}


@pytest.mark.slow
def test_eval_gates_a_drop_by_default_and_no_gate_reports_only(osnet, tmp_path):
    root = data_dir("market1501-mini")
    report = tmp_path / "eval.json"
    res = run_cli("eval", osnet["right"], osnet["copy"], osnet["wrong"], "--dataset-root", root, "--no-progress",
                  "--report", report)
    assert res.code == 1, res
    doc = json.loads(report.read_text())
    right, copy, wrong = doc["models"]
    assert doc["gates"]["max_map_drop"] == 2.0 and doc["gates"]["max_r1_drop"] == 3.0 and not doc["passed"]
    assert [right["status"], copy["status"], wrong["status"]] == ["ok", "ok", "FAIL"]
    assert copy["delta_mAP"] == 0.0 and wrong["delta_mAP"] < -2.0
    assert any(line.startswith(f"FAIL {osnet['wrong']}: mAP") for line in res.out.splitlines())
    assert not any(str(osnet["copy"]) in f for f in doc["failures"])
    assert wrong["collapse"]["collapsed"] is False  # a drop, not a collapse: the drop gate caught it
    # the thresholds: per model, the identical copy shifts by 0, the wrong convention moves them;
    # 131 negative pairs cannot resolve FMR 1e-3
    th = {m["model"]: {p["fmr"]: p for p in m["thresholds"]["points"]} for m in doc["models"]}
    assert th[str(osnet["copy"])][0.1]["shift"] == 0.0 and th[str(osnet["copy"])][0.1]["distance"] > 0
    assert abs(th[str(osnet["wrong"])][0.1]["shift"]) > 0.05
    assert th[str(osnet["right"])][0.001]["distance"] is None and "needs >= 1000" in th[str(osnet["right"])][0.001]["note"]
    assert "FMR 1e-01" in res.out and "needs >= 1000" in res.out


def test_no_gate_and_contrast_turn_the_gates_off(small, tmp_path):
    root = data_dir("market1501-mini")
    report = tmp_path / "eval.json"
    # the collapsed model fails by default (its drop and its collapse) ...
    res = run_cli("eval", small["good"], small["twice"], "--dataset-root", root, "--no-progress", "--report", report)
    assert res.code == 1 and json.loads(report.read_text())["models"][1]["status"] == "FAIL", res
    # ... --no-gate reports the same numbers and passes
    res = run_cli("eval", small["good"], small["twice"], "--dataset-root", root, "--no-progress", "--no-gate",
                  "--deployment", "bilinear", "--report", report)
    assert res.code == 0, res
    doc = json.loads(report.read_text())
    assert doc["passed"] and doc["gates"]["max_map_drop"] is None and not doc["gates"]["fail_collapsed"]
    twice = next(m for m in doc["models"] if m["model"] == str(small["twice"]))
    assert twice["collapse"]["collapsed"] is True and twice["status"] == "not gated"
    assert any(m.get("deployment") == "bilinear" for m in doc["models"])
    # nothing reads as a pass that was not gated: the rows and the deployment costs say so
    assert "ok" not in {m["status"] for m in doc["models"]} and "PASS" not in res.out and "not gated" in res.out
    # a contrast model is shown, never gated; a contrast that is not among the models is a usage error
    res = run_cli("eval", small["good"], small["twice"], "--dataset-root", root, "--no-progress",
                  "--contrast", small["twice"])
    assert res.code == 0 and "contrast" in res.out, res
    assert_clean_error(run_cli("eval", small["good"], "--dataset-root", root, "--contrast", small["twice"]),
                       "--contrast", "not one of the MODELS")


# --------------------------------------------------------------------------- deepstream threshold

def test_deepstream_writes_the_measured_threshold_where_the_tracker_reads_it(small, tmp_path):
    from reid_export.runtime import open_encoder

    root = data_dir("market1501-mini")
    out = tmp_path / "ds"
    res = run_cli("deepstream", small["good"], "-o", out, "--threshold-dataset", root, "--threshold-fmr", "0.1",
                  "--reid-type", "both")
    assert res.code == 0, res
    config = yaml.safe_load((out / "good.tracker-reid.yml").read_text())
    written = config["DataAssociator"]["minMatchingScore4ReidSimilarity"]
    assert config["TrajectoryManagement"]["minMatchingScore4ReidSimilarity"] == written
    # the same threshold computed here: features through the stretch the tracker applies (bilinear),
    # cosine distances, the 14th smallest of the 131 negative pairs (floor(0.1 * 131) = 13 accepted)
    with open_encoder(small["good"]) as enc:
        neg = negative_pair_distances(enc, root, "bilinear")
    assert neg.size == 131
    assert written == pytest.approx(1.0 - neg[13], abs=1e-4)
    # reidType 1 (NvDeepSORT) gets only the DataAssociator key
    res = run_cli("deepstream", small["good"], "-o", tmp_path / "ds1", "--threshold-dataset", root,
                  "--threshold-fmr", "0.1")
    assert res.code == 0, res
    assert set(yaml.safe_load((tmp_path / "ds1" / "good.tracker-reid.yml").read_text())) == {"ReID", "DataAssociator"}
    # an FMR the set cannot resolve: one line, nothing written
    res = run_cli("deepstream", small["good"], "-o", tmp_path / "ds2", "--threshold-dataset", root,
                  "--threshold-fmr", "0.001")
    assert_clean_error(res, "131 negative pairs", "needs >= 1000")
    assert not (tmp_path / "ds2").exists() or not any((tmp_path / "ds2").iterdir())


def test_eval_gates_reduced_precision_rows_by_the_one_fidelity_gate(small, tmp_path):
    """An FP16/INT8 row is judged against the first model's features on the eval's own images by the
    gate quantize and parity apply: a faithful FP16 graph passes it, the same graph with one weight
    tensor perturbed (still labelled FP16) fails it with a line that names the measure; --no-gate
    reports it without failing."""
    import onnx
    from onnx import numpy_helper

    from reid_export.embeddings import PAIR_ERROR_LIMIT

    root = data_dir("market1501-mini")
    fp16 = tmp_path / "good.fp16.onnx"
    res = run_cli("quantize", small["good"], "-o", fp16, "--precision", "fp16", "--calib-dir",
                  data_dir("parity-images"), "--no-progress")
    assert res.code == 0, res
    model = onnx.load(str(fp16))
    conv_weights = {n.input[1] for n in model.graph.node if n.op_type == "Conv"}
    init = next(i for i in model.graph.initializer if i.name in conv_weights and len(i.dims) == 4 and i.dims[0] >= 8)
    w = numpy_helper.to_array(init)
    rng = np.random.default_rng(0)
    init.CopyFrom(numpy_helper.from_array((w + 0.5 * w.std() * rng.standard_normal(w.shape)).astype(w.dtype),
                                          init.name))
    broken = tmp_path / "broken.fp16.onnx"
    onnx.save(model, str(broken))
    report = tmp_path / "eval.json"
    res = run_cli("eval", small["good"], fp16, broken, "--dataset-root", root, "--no-progress", "--report", report,
                  "--max-map-drop", "100", "--max-r1-drop", "100")  # only the fidelity gate can fail here
    assert res.code == 1, res
    doc = json.loads(report.read_text())
    _, good, bad = doc["models"]
    assert doc["gates"]["fidelity"]["max_pair_error"] == PAIR_ERROR_LIMIT
    assert good["fidelity"]["passed"] and good["fidelity"]["pair_error"] < PAIR_ERROR_LIMIT / 10, good["fidelity"]
    assert good["status"] == "ok" and good["fidelity"]["images"] > 50  # query + gallery (junk left out)
    assert not bad["fidelity"]["passed"] and bad["fidelity"]["pair_error"] > PAIR_ERROR_LIMIT
    assert bad["status"] == "FAIL" and "fidelity to good.onnx" in res.out
    fail = [line for line in res.out.splitlines() if line.startswith(f"FAIL {broken}")]
    assert len(fail) == 1 and "pairwise similarity error" in fail[0] and "fp16 features moved" in fail[0]
    res = run_cli("eval", small["good"], broken, "--dataset-root", root, "--no-progress", "--no-gate")
    assert res.code == 0 and "not gated" in res.out, res
