import numpy as np
import pytest

from reid_export.verify.rerank import average_query_expansion, k_reciprocal_rerank


def test_k_reciprocal_rerank_hand_checked():
    """1 query (x=0), gallery x=1 and x=3, squared euclidean, k1=1, k2=1, lambda=0.3.

    D = [[0,1,9],[1,0,4],[9,4,0]]; column maxima 9,4,9; scaled and transposed:
    O = [[0,1/9,1],[1/4,0,1],[1,4/9,0]]. Ranks: [0,1,2], [1,0,2], [2,1,0].
    k-reciprocal sets (k1=1): R(0) = {0,1}, R(1) = {0,1}, R(2) = {2} (1's top-2 lacks 2).
    V0 = softmax-like exp(-O) over R: [1, e^-1/9]/(1+e^-1/9) = [0.527749, 0.472251, 0]
    V1 = [e^-1/4, 1]/(1+e^-1/4) = [0.437823, 0.562177, 0];  V2 = [0, 0, 1]
    Jaccard(q, g1) = 1 - (0.437823+0.472251)/(2-0.910074) = 0.165012; Jaccard(q, g2) = 1
    final = 0.7*J + 0.3*O[0] -> g1: 0.7*0.165012 + 0.3/9 = 0.148842, g2: 0.7 + 0.3 = 1.0
    """
    q = np.array([[0.0]])
    g = np.array([[1.0], [3.0]])
    dist = k_reciprocal_rerank(q, g, k1=1, k2=1, lambda_value=0.3, metric="euclidean")
    assert dist.shape == (1, 2)
    assert dist[0, 0] == pytest.approx(0.148842, abs=2e-6)
    assert dist[0, 1] == pytest.approx(1.0, abs=1e-12)


def test_rerank_lambda_one_is_scaled_original_order():
    rng = np.random.default_rng(0)
    q, g = rng.normal(size=(4, 8)), rng.normal(size=(12, 8))
    dist = k_reciprocal_rerank(q, g, k1=4, k2=2, lambda_value=1.0)
    orig = ((q[:, None] - g[None]) ** 2).sum(-1)
    assert (np.argsort(dist, axis=1) == np.argsort(orig, axis=1)).all()


def _clustered(rng, ids, per_id, dim=32, noise=0.8):
    centers = rng.normal(size=(ids, dim))
    pids = np.repeat(np.arange(ids), per_id)
    return centers[pids] + noise * rng.normal(size=(len(pids), dim)), pids


def test_rerank_and_aqe_help_on_clustered_features():
    from reid_export.verify.metrics import compute_distance, rank_metrics

    rng = np.random.default_rng(3)
    feats, pids = _clustered(rng, ids=30, per_id=6, noise=1.0)
    camids = np.tile(np.arange(6), 30)
    is_q = camids == 0
    qf, gf = feats[is_q], feats[~is_q]
    args = (pids[is_q], pids[~is_q], camids[is_q], camids[~is_q])
    base = rank_metrics(compute_distance(qf, gf, "cosine"), *args)
    rr = rank_metrics(k_reciprocal_rerank(qf, gf, k1=6, k2=3, lambda_value=0.3, metric="cosine"), *args)
    aq, ag = average_query_expansion(qf, gf, qe_k=3)
    aqe = rank_metrics(compute_distance(aq, ag, "cosine"), *args)
    assert rr["mAP"] > base["mAP"]
    assert aqe["mAP"] > base["mAP"]


def test_aqe_definition_small():
    # two identical features and one orthogonal: with k=2 each vector averages itself and its neighbour
    qf = np.array([[1.0, 0.0]])
    gf = np.array([[1.0, 0.0], [0.0, 1.0]])
    aq, ag = average_query_expansion(qf, gf, qe_k=2, alpha=3.0)
    # query: neighbours are itself and gf[0] (sim 1 each): mean([1,0]*1, [1,0]*1) = [1,0]
    assert np.allclose(aq[0], [1.0, 0.0])
    # gf[1]: itself (sim 1) and one of the others with sim 0 -> weight 0: mean([0,1], [0,0]) = [0,0.5]
    assert np.allclose(ag[1], [0.0, 0.5])
