"""Post-processing of retrieval: k-reciprocal re-ranking and average query expansion.

k-reciprocal re-ranking follows Zhong et al., "Re-ranking Person Re-identification with
k-reciprocal Encoding" (CVPR 2017), the variant fast-reid and most ReID code bases use: the
original distance is scaled per column by its maximum, k-reciprocal sets are expanded with the
2/3 rule, encoded as Gaussian-weighted vectors, smoothed over the k2 nearest neighbours, and the
Jaccard distance of those vectors is mixed with the original distance by ``lambda``.
"""

from __future__ import annotations

import numpy as np


def _pairwise(a: np.ndarray, b: np.ndarray, metric: str) -> np.ndarray:
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    if metric == "cosine":
        a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
        b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
        return 1.0 - a @ b.T
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.maximum(sq, 0.0)


def k_reciprocal_rerank(qf: np.ndarray, gf: np.ndarray, k1: int = 20, k2: int = 6, lambda_value: float = 0.3,
                        metric: str = "euclidean") -> np.ndarray:
    """Re-ranked query x gallery distance matrix [Q, G]."""
    num_q = qf.shape[0]
    feats = np.concatenate([qf, gf])
    n = feats.shape[0]
    original = _pairwise(feats, feats, metric)
    original = original / np.maximum(original.max(axis=0, keepdims=True), 1e-12)
    original = original.T  # row i: distances scaled by the maxima seen from each other item
    initial_rank = np.argsort(original, axis=1, kind="stable")
    V = np.zeros((n, n), dtype=np.float64)
    half = int(np.around(k1 / 2.0))

    def reciprocal(i: int, k: int) -> np.ndarray:
        forward = initial_rank[i, :k + 1]
        backward = initial_rank[forward, :k + 1]
        return forward[np.any(backward == i, axis=1)]

    for i in range(n):
        k_rec = reciprocal(i, k1)
        expansion = k_rec
        for j in k_rec:
            cand = reciprocal(j, half)
            if len(np.intersect1d(cand, k_rec)) > 2.0 / 3.0 * len(cand):
                expansion = np.append(expansion, cand)
        expansion = np.unique(expansion)
        weight = np.exp(-original[i, expansion])
        V[i, expansion] = weight / weight.sum()
    if k2 != 1:
        V = np.stack([V[initial_rank[i, :k2]].mean(axis=0) for i in range(n)])
    # Jaccard distance between query encodings and all encodings, via the shared non-zeros.
    jaccard = np.zeros((num_q, n), dtype=np.float64)
    for i in range(num_q):
        overlap = np.minimum(V[i][None, :], V).sum(axis=1)
        jaccard[i] = 1.0 - overlap / (2.0 - overlap)
    final = jaccard * (1.0 - lambda_value) + original[:num_q] * lambda_value
    return final[:, num_q:]


def average_query_expansion(qf: np.ndarray, gf: np.ndarray, qe_times: int = 1, qe_k: int = 5,
                            alpha: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """alpha-weighted query expansion (fast-reid's AQE) over queries and gallery together.

    Each feature is replaced by the mean of its ``qe_k`` most similar features (itself included),
    weighted by cosine similarity to the power ``alpha``.
    """
    num_q = qf.shape[0]
    feats = np.concatenate([qf, gf]).astype(np.float64)
    k = min(qe_k, feats.shape[0])
    for _ in range(qe_times):
        normed = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
        sims = normed @ normed.T
        top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        weights = np.power(np.take_along_axis(sims, top, axis=1), alpha)[:, :, None]
        feats = (feats[top] * weights).mean(axis=1)
    return feats[:num_q].astype(np.float32), feats[num_q:].astype(np.float32)
