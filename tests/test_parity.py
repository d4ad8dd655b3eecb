"""reid-export parity: passes a faithful candidate, fails broken ones and says why."""

import json

import numpy as np
import pytest
import torch

from conftest import CONFIGS, assert_clean_error, randomize_bn, run_cli
from reid_export.checkpoint import save_checkpoint
from reid_export.config import load_config
from reid_export.data_config import data_config_from_cfg
from reid_export.modeling import build_model
from reid_export.embeddings import Tolerances, compare, neighbour_agreement

R18 = CONFIGS / "Market1501" / "bagtricks_R18.yml"


def _ckpt(path, seed=0, size=(128, 64)):
    cfg = load_config(R18, ["INPUT.SIZE_TEST", str(list(size))])
    torch.manual_seed(seed)
    model = randomize_bn(build_model(cfg), seed=seed, size=size)
    save_checkpoint(path, model, cfg, data_config_from_cfg(cfg, model.feat_dim, f"r18-seed{seed}"))
    return path


def test_compare_metrics_on_known_vectors():
    ref = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]], np.float32)
    same = compare(ref, ref.copy(), Tolerances.for_precision("fp32"))
    assert same.passed and same.min_cosine == pytest.approx(1.0) and same.max_rel_l2 == 0.0
    scaled = compare(ref, ref * 1.1, Tolerances.for_precision("fp16"))
    # same direction, 10% longer: cosine 1, relative L2 exactly 0.1
    assert scaled.min_cosine == pytest.approx(1.0) and scaled.max_rel_l2 == pytest.approx(0.1, rel=1e-6)
    # FP16/bf16/INT8 share one gate on the direction (what retrieval ranks by): a longer vector passes it,
    # and the relative L2 still gates when asked
    assert scaled.passed and Tolerances.for_precision("fp16") == Tolerances.for_precision("int8")
    strict = compare(ref, ref * 1.1, Tolerances.for_precision("fp16", max_rel_l2=0.05))
    assert not strict.passed and "max relative L2 0.1 > 0.05" in strict.failures[0]
    rotated = ref.copy()
    rotated[0] = [0.0, 1.0]  # 90 degrees: cosine 0
    res = compare(ref, rotated, Tolerances.for_precision("int8"))
    assert res.min_cosine == pytest.approx(0.0, abs=1e-9) and not res.passed
    # elementwise (Polygraphy): fails only where BOTH abs and rel tolerances are exceeded
    near = ref + np.array([[1e-3, 0], [0, 0], [0, 0]], np.float32)
    # [0,0]: abs 1e-3 > 1e-4 but rel 1e-3 <= 1e-2 -> passes
    assert compare(ref, near, Tolerances(atol=1e-4, rtol=1e-2)).elementwise_failures == 0
    # with rtol 1e-4 both are exceeded -> one failure
    assert compare(ref, near, Tolerances(atol=1e-4, rtol=1e-4)).elementwise_failures == 1
    # a reference zero: rel error is infinite, so only atol decides
    near0 = ref + np.array([[0, 1e-3], [0, 0], [0, 0]], np.float32)
    assert compare(ref, near0, Tolerances(atol=1e-4, rtol=1.0)).elementwise_failures == 1
    assert compare(ref, near0, Tolerances(atol=1e-2, rtol=1e-9)).elementwise_failures == 0


def test_pair_error_gates_what_retrieval_ranks_by():
    """Per-image cosines can stay high while the similarities between images (what retrieval ranks by)
    move: the reduced-precision gate fails on the pairwise error, and passes a candidate whose noise is
    small; an independent computation of the error gives the same number."""
    from reid_export.embeddings import PAIR_ERROR_LIMIT, pair_similarity_error

    rng = np.random.default_rng(0)
    ref = rng.normal(size=(200, 64)) + 3.0 * rng.normal(size=(1, 64))  # a shared direction: similarities 0.6-0.95
    tol = Tolerances.reduced_precision()
    small = compare(ref, ref + 0.005 * rng.normal(size=ref.shape), tol)
    assert small.passed and small.pair_error < PAIR_ERROR_LIMIT / 2
    noisy = ref + 0.6 * rng.normal(size=ref.shape)
    res = compare(ref, noisy, tol)
    assert res.mean_cosine > 0.98 and res.min_cosine > 0.90  # the cosine checks alone would pass it
    assert not res.passed and any("pairwise similarity error" in f for f in res.failures)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    i, j = np.triu_indices(len(ref), 1)
    a, b = (unit(ref) @ unit(ref).T)[i, j], (unit(noisy) @ unit(noisy).T)[i, j]
    rmse = np.sqrt(np.mean((a - b) ** 2))
    assert res.pair_rmse == pytest.approx(rmse) and res.pair_error == pytest.approx(rmse / a.std())
    assert pair_similarity_error(ref, noisy, max_images=50)[1] == pytest.approx(res.pair_error, rel=0.3)


def test_nan_candidate_fails_with_count():
    ref = np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32)
    bad = ref.copy()
    bad[1, 3] = np.nan
    bad[2, 0] = np.inf
    res = compare(ref, bad, Tolerances.for_precision("fp32"))
    assert not res.passed and res.nonfinite == 2
    assert "2 NaN/Inf values" in res.failures[0]
    assert json.loads(json.dumps(res.to_dict()))["passed"] is False  # valid JSON, no NaN literals


def test_neighbour_agreement():
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(6, 16))
    assert neighbour_agreement(ref, ref + 1e-6) == (1.0, 1.0)
    top1, top5 = neighbour_agreement(ref, rng.normal(size=(6, 16)))
    assert top1 < 1.0


def _nudged(path, src, scale=1.01):
    """The checkpoint ``src`` with one BatchNorm scale of the last block 1% larger: a near miss."""
    obj = torch.load(src, weights_only=True)
    key = "backbone.layer4.1.bn2.weight"
    obj["model"][key] = obj["model"][key] * scale
    torch.save(obj, path)
    return path


@pytest.mark.slow
def test_parity_cli_passes_the_onnx_export_and_fails_near_misses(tmp_path, image_dir):
    a = _ckpt(tmp_path / "a.pth", seed=0)
    exported = tmp_path / "a.onnx"  # another backend computing the same function: not a copy of the file
    assert run_cli("onnx", a, "-o", exported, "--exporter", "torchscript", "--no-simplify").code == 0
    nudged = _nudged(tmp_path / "nudged.pth", a)
    other = _ckpt(tmp_path / "other.pth", seed=1)
    report = tmp_path / "parity.json"
    ok = run_cli("parity", a, exported, "--images", image_dir, "--report", report, "--no-progress")
    assert ok.code == 0, ok
    doc = json.loads(report.read_text())
    cand = doc["candidates"][0]
    assert doc["passed"] and cand["backend"] == "onnxruntime" and 0.0 <= cand["max_rel_l2"] < 1e-5
    bad = run_cli("parity", a, exported, nudged, other, "--images", image_dir, "--report", report, "--no-progress")
    assert bad.code == 1
    assert "FAIL" in bad.out and "other.pth" in bad.out and "nudged.pth" in bad.out and "min cosine" in bad.out
    doc = json.loads(report.read_text())
    assert [c["passed"] for c in doc["candidates"]] == [True, False, False]
    # the near miss fails the FP32 gate on its relative L2 (1e-4) although its cosine is still high
    near = doc["candidates"][1]
    assert near["max_rel_l2"] > 1e-4 and near["min_cosine"] > 0.99, near


@pytest.mark.slow
def test_parity_cli_bad_inputs(tmp_path, image_dir):
    a = _ckpt(tmp_path / "a.pth")
    assert_clean_error(run_cli("parity", a, tmp_path / "missing.onnx", "--images", image_dir, "--no-progress"),
                       "missing.onnx")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_clean_error(run_cli("parity", a, a, "--images", empty), "holds no images")
    assert_clean_error(run_cli("parity", a, a, "--images", image_dir, "--atol", "1e-3"), "--atol and --rtol")


def test_collapse_stats_flags_nearly_constant_features_only():
    from reid_export.embeddings import collapse_stats

    rng = np.random.default_rng(0)
    distinct = rng.normal(size=(8, 64)).astype(np.float32)
    stats = collapse_stats(distinct)
    assert not stats.collapsed and stats.min_pair_cosine < 0.5
    # one shared direction plus a little noise: what a twice-normalised input gives
    common = rng.normal(size=(1, 64))
    collapsed = common + 0.01 * rng.normal(size=(8, 64))
    stats = collapse_stats(collapsed)
    assert stats.collapsed and stats.min_pair_cosine >= 0.99
    assert "collapsed embeddings" in stats.warning("m.onnx")
    # a folder of near-duplicates plus one distinct crop is not collapsed
    mixed = np.vstack([collapsed[:5], distinct[:1]])
    assert not collapse_stats(mixed).collapsed
    # zero rows carry no direction
    assert collapse_stats(np.zeros((4, 8))).collapsed
    assert collapse_stats(distinct[:2]) is None


def test_a_gate_is_one_tolerances_or_one_per_precision():
    """The one way to state a gate on features: a Tolerances for every candidate, or one per precision."""
    from reid_export.embeddings import DEFAULT_TOLERANCES, Tolerances, gate_for
    from reid_export.errors import UsageError

    by = Tolerances.by_precision(max_pair_error=0.02)
    assert set(by) == set(DEFAULT_TOLERANCES)
    assert gate_for(by, "int8").max_pair_error == 0.02 and gate_for(by, "fp16").min_cosine == 0.90
    assert gate_for(by, "fp32").atol == 1e-4 and gate_for(by, "fp32").max_pair_error == 0.02
    assert gate_for(None, "fp16") == Tolerances.reduced_precision()
    assert gate_for({"int8": Tolerances()}, "fp32") == Tolerances.for_precision("fp32")  # none given: the default
    one = Tolerances(min_cosine=0.5)
    assert gate_for(one, "fp32") is one and gate_for(one, "int8") is one
    with pytest.raises(UsageError, match="`atol` and `rtol` go together"):
        Tolerances(atol=1e-3)
    with pytest.raises(UsageError, match="`atol` and `rtol` go together"):
        Tolerances.by_precision(rtol=1e-2)  # the reduced-precision gates have no atol to pair it with
