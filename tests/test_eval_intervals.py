"""The paired bootstrap interval of d mAP / d Rank-1 that `eval` reports against the first model."""

from __future__ import annotations

import numpy as np

from reid_export.verify import metrics
from reid_export.verify.retrieval import SplitArrays
from reid_export.verify.evaluation import paired_interval, per_query_scores


def _split(pids, cams):
    return SplitArrays([f"{i}.jpg" for i in range(len(pids))], np.asarray(pids), np.asarray(cams))


def _data(seed=0, nq=60, ng=240, ids=30):
    rng = np.random.default_rng(seed)
    qp, gp = rng.integers(0, ids, nq), np.concatenate([np.arange(ids), rng.integers(0, ids, ng - ids)])
    qc, gc = np.zeros(nq, int), rng.integers(0, 3, ng)
    gc[:ids] = 1  # every identity has a gallery image from another camera
    centres = rng.standard_normal((ids, 16))
    qf, gf = centres[qp] + rng.standard_normal((nq, 16)), centres[gp] + rng.standard_normal((ng, 16))
    return qf, gf, _split(qp, qc), _split(gp, gc)


def test_per_query_scores_average_to_the_reported_metrics():
    qf, gf, q, g = _data()
    dist = metrics.compute_distance(qf, gf, "euclidean")
    ap, hit = per_query_scores(dist, q, g)
    ref = metrics.rank_metrics(dist, q.pids, g.pids, q.camids, g.camids)
    assert np.isclose(np.nanmean(ap), ref["mAP"]) and np.isclose(np.nanmean(hit), ref["Rank-1"])
    assert 0 < ref["Rank-1"] < 100  # neither trivial nor hopeless


def test_interval_is_zero_for_the_same_model_and_excludes_zero_for_a_broken_one():
    qf, gf, q, g = _data()
    dist = metrics.compute_distance(qf, gf, "euclidean")
    ap, hit = per_query_scores(dist, q, g)
    assert paired_interval(ap, ap) == (0.0, 0.0)
    rng = np.random.default_rng(1)
    noisy = metrics.compute_distance(qf + 3.0 * rng.standard_normal(qf.shape), gf, "euclidean")
    ap2, _ = per_query_scores(noisy, q, g)
    lo, hi = paired_interval(ap, ap2)
    delta = np.nanmean(ap2) - np.nanmean(ap)
    assert lo <= delta <= hi and hi < 0, (lo, delta, hi)  # a real drop: the interval stays below zero
    tiny = metrics.compute_distance(qf + 1e-3 * rng.standard_normal(qf.shape), gf, "euclidean")
    ap3, _ = per_query_scores(tiny, q, g)
    lo3, hi3 = paired_interval(ap, ap3)
    assert lo3 <= 0 <= hi3 and hi3 - lo3 < hi - lo
