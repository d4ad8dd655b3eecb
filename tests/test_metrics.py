"""Tests for reid_export.verify.metrics (Market-1501 protocol, fast-reid values)."""

from __future__ import annotations

import numpy as np
import pytest

from reid_export.errors import ReidExportError
from reid_export.verify.metrics import (
    compute_distance,
    evaluate_rank,
    rank_metrics,
    roc_curve,
    roc_tpr_at_fpr,
)


# ----------------------------------------------------------------------------------------
# Reference: the textbook definition, one query at a time, stable argsort per row.
# ----------------------------------------------------------------------------------------
def reference_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50):
    num_q, num_g = distmat.shape
    length = min(max_rank, num_g)
    all_cmc, all_ap, all_inp = [], [], []
    for i in range(num_q):
        order = np.argsort(distmat[i], kind="stable")
        removed = (g_pids[order] == q_pids[i]) & (g_camids[order] == q_camids[i])
        matches = (g_pids[order][~removed] == q_pids[i]).astype(np.float64)
        if not matches.any():
            continue
        hits = np.cumsum(matches)
        positions = np.flatnonzero(matches)  # 0-based rank of each match
        all_ap.append(np.mean(hits[positions] / (positions + 1.0)))
        all_inp.append(hits[positions[-1]] / (positions[-1] + 1.0))
        cmc = (hits > 0).astype(np.float64)
        # A list shorter than the CMC length stays at 1 (it already had a match).
        cmc = np.concatenate([cmc, np.ones(max(0, length - cmc.size))])[:length]
        all_cmc.append(cmc)
    return np.mean(all_cmc, axis=0), float(np.mean(all_ap)), float(np.mean(all_inp)), len(all_ap)


def random_case(rng, num_q, num_g, num_pids, num_cams, integer=False, dtype=np.float64):
    if integer:
        distmat = rng.integers(0, 4, size=(num_q, num_g)).astype(dtype)  # many exact ties
    else:
        distmat = rng.random((num_q, num_g)).astype(dtype)
    q_pids = rng.integers(0, num_pids, num_q)
    g_pids = rng.integers(0, num_pids, num_g)
    q_camids = rng.integers(0, num_cams, num_q)
    g_camids = rng.integers(0, num_cams, num_g)
    return distmat, q_pids, g_pids, q_camids, g_camids


# ----------------------------------------------------------------------------------------
# Hand-computed cases
# ----------------------------------------------------------------------------------------
# Gallery shared by the hand cases: (pid, camid)
G_PIDS = np.array([1, 0, 1, 2, 1, 3])
G_CAMS = np.array([0, 1, 1, 0, 2, 1])


def test_removal_and_distractor_by_hand():
    # Query pid 1, camera 0.  Distances 0.1 .. 0.6 in gallery order.
    # g0 (pid 1, cam 0) is removed: same pid AND same camera.
    # Remaining order: g1 (pid 0: a distractor, a non-match), g2 (match), g3, g4 (match), g5.
    # Matches at ranks 2 and 4:
    #   AP  = (1/2 + 2/4) / 2 = 0.5
    #   INP = 2 / 4 = 0.5
    #   CMC = [0, 1, 1, 1, 1, 1]  (length min(50, G=6) = 6)
    dist = np.array([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6]])
    res = evaluate_rank(dist, np.array([1]), G_PIDS, np.array([0]), G_CAMS)
    assert res["num_valid_queries"] == 1
    np.testing.assert_allclose(res["cmc"], [0, 1, 1, 1, 1, 1])
    assert res["mAP"] == pytest.approx(0.5)
    assert res["mINP"] == pytest.approx(0.5)
    np.testing.assert_allclose(res["all_AP"], [0.5])
    np.testing.assert_allclose(res["all_INP"], [0.5])


def test_ties_are_broken_by_gallery_index():
    # Query pid 1, camera 0.  Gallery (pid, cam, dist):
    #   g0 (2, 1, 1.0)  g1 (1, 1, 1.0) match  g2 (3, 1, 1.0)  g3 (1, 2, 0.5) match  g4 (4, 1, 2.0)
    # Stable order: g3 (0.5), then the tie at 1.0 in index order g0, g1, g2, then g4.
    # Matches at ranks 1 and 3:
    #   AP  = (1/1 + 2/3) / 2 = 5/6
    #   INP = 2 / 3
    #   CMC = [1, 1, 1, 1, 1]
    dist = np.array([[1.0, 1.0, 1.0, 0.5, 2.0]])
    g_pids = np.array([2, 1, 3, 1, 4])
    g_cams = np.array([1, 1, 1, 2, 1])
    res = evaluate_rank(dist, np.array([1]), g_pids, np.array([0]), g_cams)
    np.testing.assert_allclose(res["cmc"], [1, 1, 1, 1, 1])
    assert res["mAP"] == pytest.approx(5 / 6)
    assert res["mINP"] == pytest.approx(2 / 3)


def test_tie_between_match_and_earlier_non_match():
    # Query pid 1, cam 0.  g0 (pid 2) and g1 (pid 1, cam 1) both at 0.0: g0 comes first.
    # Match at rank 2: AP = 1/2, INP = 1/2, CMC = [0, 1].
    dist = np.array([[0.0, 0.0]])
    res = evaluate_rank(dist, np.array([1]), np.array([2, 1]), np.array([0]), np.array([1, 1]))
    np.testing.assert_allclose(res["cmc"], [0, 1])
    assert res["mAP"] == pytest.approx(0.5)
    assert res["mINP"] == pytest.approx(0.5)


def test_queries_without_valid_match_are_skipped():
    dist = np.array([
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],  # q0: pid 1 cam 0 -> as above: AP 0.5, INP 0.5, rank 2
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],  # q1: pid 5 -> not in the gallery: skipped
        [0.6, 0.5, 0.4, 0.3, 0.2, 0.1],  # q2: pid 3 cam 1 -> only g5 (pid 3, cam 1): removed
        [0.9, 0.8, 0.7, 0.1, 0.6, 0.5],  # q3: pid 2 cam 1 -> g3 (pid 2, cam 0) first: AP 1
    ])
    q_pids = np.array([1, 5, 3, 2])
    q_cams = np.array([0, 0, 1, 1])
    res = evaluate_rank(dist, q_pids, G_PIDS, q_cams, G_CAMS)
    # Valid queries: q0 and q3.
    #   mAP  = (0.5 + 1) / 2 = 0.75 ;  mINP = (0.5 + 1) / 2 = 0.75
    #   CMC  = mean([0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]) = [0.5, 1, 1, 1, 1, 1]
    assert res["num_valid_queries"] == 2
    np.testing.assert_allclose(res["all_AP"], [0.5, 1.0])
    np.testing.assert_allclose(res["all_INP"], [0.5, 1.0])
    assert res["mAP"] == pytest.approx(0.75)
    assert res["mINP"] == pytest.approx(0.75)
    np.testing.assert_allclose(res["cmc"], [0.5, 1, 1, 1, 1, 1])

    m = rank_metrics(dist, q_pids, G_PIDS, q_cams, G_CAMS)
    # G = 6 < 10, so Rank-10 is the CMC at the last position.
    assert m == pytest.approx({"Rank-1": 50.0, "Rank-5": 100.0, "Rank-10": 100.0,
                               "mAP": 75.0, "mINP": 75.0, "num_valid_queries": 2})


def test_no_valid_query_raises():
    dist = np.zeros((1, 2))
    # The only gallery item of pid 1 is from the query's own camera.
    with pytest.raises(ReidExportError, match="no query has a matching gallery image"):
        evaluate_rank(dist, np.array([1]), np.array([1, 2]), np.array([0]), np.array([0, 1]))


def test_bad_inputs_raise():
    with pytest.raises(ReidExportError, match="g_pids"):
        evaluate_rank(np.zeros((1, 3)), [1], [1, 2], [0], [1, 1, 1])
    with pytest.raises(ReidExportError, match="NaN"):
        evaluate_rank(np.array([[np.nan, 0.0]]), [1], [1, 2], [0], [1, 1])


# ----------------------------------------------------------------------------------------
# Against the reference on random matrices
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "num_q, num_g, num_pids, num_cams, integer",
    [
        (5, 3, 2, 2, False),      # G < max_rank, tiny
        (20, 30, 5, 3, False),    # G < max_rank
        (20, 30, 5, 3, True),     # ties everywhere
        (40, 300, 10, 2, True),   # ties, ~15-30 positives per query
        (60, 500, 40, 6, False),  # Market-like: a few positives per query
        (15, 400, 2, 4, False),   # ~150 positives per query: the per-row binary search path
        (15, 400, 2, 4, True),    # same with ties
    ],
)
def test_matches_reference(num_q, num_g, num_pids, num_cams, integer):
    rng = np.random.default_rng(num_q * 1000 + num_g + integer)
    case = random_case(rng, num_q, num_g, num_pids, num_cams, integer)
    cmc, m_ap, m_inp, n_valid = reference_rank(*case)
    res = evaluate_rank(*case)
    assert res["num_valid_queries"] == n_valid
    assert res["cmc"].shape == cmc.shape
    np.testing.assert_allclose(res["cmc"], cmc, rtol=0, atol=1e-10)
    assert abs(res["mAP"] - m_ap) < 1e-10
    assert abs(res["mINP"] - m_inp) < 1e-10


@pytest.mark.parametrize("path", [{}, {"_linear_max": 0}, {"workers": 2}], ids=["default", "buckets", "threads"])
@pytest.mark.parametrize("integer", [False, True])
def test_both_bucket_paths_threads_and_float32_agree(integer, path):
    rng = np.random.default_rng(7 + integer)
    case = random_case(rng, 50, 200, 8, 3, integer, dtype=np.float32)
    cmc, m_ap, m_inp, _ = reference_rank(*case, max_rank=20)
    res = evaluate_rank(*case, max_rank=20, **path)
    np.testing.assert_allclose(res["cmc"], cmc, rtol=0, atol=1e-10)
    assert abs(res["mAP"] - m_ap) < 1e-10
    assert abs(res["mINP"] - m_inp) < 1e-10


def test_many_chunks_keep_query_order(monkeypatch):
    from reid_export.verify import metrics

    monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", 100)  # one or two queries per chunk
    rng = np.random.default_rng(3)
    case = random_case(rng, 30, 60, 6, 3, integer=True)
    res = evaluate_rank(*case)
    monkeypatch.undo()
    ref = evaluate_rank(*case)
    # Chunk padding may change the summation order of AP: equal to round-off only.
    np.testing.assert_allclose(res["all_AP"], ref["all_AP"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(res["all_INP"], ref["all_INP"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(res["cmc"], ref["cmc"], rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------
# compute_distance
# ----------------------------------------------------------------------------------------
def test_cosine_distance():
    q = np.array([[1.0, 2.0, 3.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    g = np.array([[2.0, 4.0, 6.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]])
    d = compute_distance(q, g, "cosine")
    assert d.shape == (3, 3) and d.dtype == np.float64
    assert d[0, 0] == pytest.approx(0.0, abs=1e-12)  # same direction, different scale
    assert d[1, 1] == pytest.approx(1.0)  # orthogonal
    assert d[1, 2] == pytest.approx(2.0)  # opposite
    np.testing.assert_allclose(d[2], [1.0, 1.0, 1.0])  # a zero vector: no NaN
    f32 = compute_distance(q.astype(np.float32), q.astype(np.float32))
    assert f32.dtype == np.float32
    assert f32[0, 0] == pytest.approx(0.0, abs=1e-6)


def test_euclidean_distance_is_squared_and_non_negative():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(7, 16))
    g = np.concatenate([q[:3], rng.normal(size=(5, 16))])
    d = compute_distance(q, g, "euclidean")
    direct = ((q[:, None, :] - g[None, :, :]) ** 2).sum(-1)
    np.testing.assert_allclose(d, direct, rtol=1e-10, atol=1e-10)
    assert (d >= 0).all()
    np.testing.assert_allclose(np.diag(d[:3, :3]), 0.0, atol=1e-10)


def test_compute_distance_errors():
    with pytest.raises(ReidExportError, match="unknown distance metric"):
        compute_distance(np.ones((1, 2)), np.ones((1, 2)), "manhattan")
    with pytest.raises(ReidExportError, match="same dimension"):
        compute_distance(np.ones((1, 2)), np.ones((1, 3)))


# ----------------------------------------------------------------------------------------
# ROC
# ----------------------------------------------------------------------------------------
def test_roc_by_hand():
    # Query pid 1, cam 0.  Gallery (pid, cam, dist):
    #   g0 (1, 1, 0.1) pos   g1 (2, 1, 0.2) neg   g2 (1, 2, 0.3) pos   g3 (3, 1, 0.4) neg
    #   g4 (1, 0, 0.0) removed (same pid, same camera)   g5 (4, 1, 0.5) neg   g6 (0, 1, 0.6) neg
    # Positives {0.1, 0.3}; negatives {0.2, 0.4, 0.5, 0.6}, N = 4.
    dist = np.array([[0.1, 0.2, 0.3, 0.4, 0.0, 0.5, 0.6]])
    args = (dist, np.array([1]), np.array([1, 2, 1, 3, 1, 4, 0]), np.array([0]),
            np.array([1, 1, 2, 1, 0, 1, 1]))
    # FPR <= 0.1: 0.1 * 4 -> 0 negatives allowed; must reject 0.2 -> accept {0.1}: TPR 1/2.
    # FPR <= 0.3: 1.2 -> 1 allowed; must reject 0.4 -> accept {0.1, 0.3}: TPR 2/2.
    # FPR <= 0.5: 2 allowed; must reject 0.5 -> TPR 2/2.
    res = roc_tpr_at_fpr(*args, fprs=(0.1, 0.3, 0.5))
    assert res == pytest.approx({"TPR@FPR=1e-01": 50.0, "TPR@FPR=3e-01": 100.0,
                                 "TPR@FPR=5e-01": 100.0})
    fpr, tpr = roc_curve(*args)
    # Points: start; before/at u=0.1 (no negative below); before/at u=0.3 (one negative
    # below: 0.2); end.
    np.testing.assert_allclose(fpr, [0, 0, 0, 0.25, 0.25, 1])
    np.testing.assert_allclose(tpr, [0, 0, 0.5, 0.5, 1, 1])


def test_roc_tie_gives_diagonal_step():
    # One positive and one negative at the same distance: (0, 0) -> (1, 1) in one step.
    dist = np.array([[0.2, 0.2]])
    args = (dist, np.array([1]), np.array([1, 2]), np.array([0]), np.array([1, 1]))
    fpr, tpr = roc_curve(*args)
    np.testing.assert_allclose(fpr, [0, 0, 1, 1])
    np.testing.assert_allclose(tpr, [0, 0, 1, 1])
    # FPR <= 0.5 with one negative: none may be accepted, so the tied positive is rejected.
    assert roc_tpr_at_fpr(*args, fprs=(0.5,)) == {"TPR@FPR=5e-01": 0.0}


def brute_force_tpr_at_fpr(distmat, q_pids, g_pids, q_camids, g_camids, f):
    removed = (q_pids[:, None] == g_pids[None, :]) & (q_camids[:, None] == g_camids[None, :])
    positive = (q_pids[:, None] == g_pids[None, :]) & ~removed
    negative = q_pids[:, None] != g_pids[None, :]
    pos, neg = distmat[positive], distmat[negative]
    best = 0.0
    for tau in np.concatenate([[-np.inf], np.unique(distmat)]):  # accept d <= tau
        if (neg <= tau).sum() <= f * neg.size:
            best = max(best, (pos <= tau).mean())
    return best * 100.0


@pytest.mark.parametrize("integer", [False, True])
def test_roc_tpr_at_fpr_against_brute_force_and_curve(integer):
    rng = np.random.default_rng(11 + integer)
    case = random_case(rng, 12, 40, 5, 3, integer)
    fprs = (1e-3, 0.05, 0.2, 0.5)
    res = roc_tpr_at_fpr(*case, fprs=fprs)
    fpr, tpr = roc_curve(*case)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    for f in fprs:
        key = f"TPR@FPR={f:.0e}"
        assert res[key] == pytest.approx(brute_force_tpr_at_fpr(*case, f))
        assert res[key] == pytest.approx(tpr[fpr <= f].max() * 100.0)
