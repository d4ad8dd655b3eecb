"""Post-processing of retrieval: k-reciprocal re-ranking and average query expansion.

k-reciprocal re-ranking follows Zhong et al., "Re-ranking Person Re-identification with
k-reciprocal Encoding" (CVPR 2017), the variant fast-reid and most ReID code bases use: the
original distance is scaled per column by its maximum, k-reciprocal sets are expanded with the
2/3 rule, encoded as Gaussian-weighted vectors, smoothed over the k2 nearest neighbours, and the
Jaccard distance of those vectors is mixed with the original distance by ``lambda``.
"""

from __future__ import annotations

import numpy as np

from ..embeddings import l2_normalize


def _pairwise(a: np.ndarray, b: np.ndarray, metric: str) -> np.ndarray:
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    if metric == "cosine":
        a, b = l2_normalize(a, axis=1), l2_normalize(b, axis=1)
        return 1.0 - a @ b.T
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.maximum(sq, 0.0)


def expanded_reciprocal_neighbours(ranks: np.ndarray, i: int, k1: int) -> np.ndarray:
    """Item ``i``'s k-reciprocal neighbours (within each other's ``k1`` nearest, ``ranks[i]`` in order,
    the item itself first), expanded by the half-size sets of its members that share more than 2/3 with
    them (Zhong et al. 2017); sorted, unique. ``ranks`` needs ``k1 + 1`` columns: a full argsort or kNN lists."""
    def reciprocal(j: int, k: int) -> np.ndarray:
        forward = ranks[j, :k + 1]
        backward = ranks[forward, :k + 1]
        return forward[np.any(backward == j, axis=1)]

    k_rec = reciprocal(i, k1)
    expansion = k_rec
    half = int(np.around(k1 / 2.0))
    for j in k_rec:
        cand = reciprocal(j, half)
        if len(np.intersect1d(cand, k_rec)) > 2.0 / 3.0 * len(cand):
            expansion = np.append(expansion, cand)
    return np.unique(expansion)


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
    for i in range(n):
        expansion = expanded_reciprocal_neighbours(initial_rank, i, k1)
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
        normed = l2_normalize(feats, axis=1)
        sims = normed @ normed.T
        top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        weights = np.power(np.take_along_axis(sims, top, axis=1), alpha)[:, :, None]
        feats = (feats[top] * weights).mean(axis=1)
    return feats[:num_q].astype(np.float32), feats[num_q:].astype(np.float32)


# ----------------------------------------------------------------------------------------
# The same two methods from k-nearest-neighbour lists, for galleries too large for N x N
# ----------------------------------------------------------------------------------------
#
# Re-ranking only ever looks at the first k1 + 1 neighbours of an item (its k-reciprocal set
# and their half-size sets) and the first k2 (the smoothing); its encodings V are sparse, so
# the Jaccard distance differs from 1 only between items whose encodings share support.  AQE
# needs the first qe_k neighbours.  Below: kNN lists from faiss (exact inner product / L2, in
# float32), re-ordered by the float64 distances the dense code uses, and the rest on sparse
# rows.  On small sets the results equal the dense functions above (tests); memory is
# O(N * k) plus one block of the final distances at a time.


def _pair_dist(a: np.ndarray, b: np.ndarray, metric: str) -> np.ndarray:
    """float64 distances of row pairs (a[i], b[i]), as ``_pairwise`` defines them."""
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    if metric == "cosine":
        a, b = l2_normalize(a, axis=1), l2_normalize(b, axis=1)
        return 1.0 - np.einsum("ij,ij->i", a, b)
    return np.maximum(np.einsum("ij,ij->i", a, a) + np.einsum("ij,ij->i", b, b) - 2.0 * np.einsum("ij,ij->i", a, b),
                      0.0)


def knn_lists(feats: np.ndarray, k: int, metric: str = "euclidean", margin: int = 8, chunk: int = 4096):
    """The k nearest items of every row of ``feats`` (itself included): ids [N, k] ordered by the
    float64 distance (ties by index, as a stable argsort), and those distances.

    Candidates come from faiss (exact search; ``reid-export[index]``) or, without it, numpy; the
    ``margin`` extra candidates absorb float32 near-ties before the float64 re-sort."""
    n = feats.shape[0]
    want = min(n, k + margin)
    x = np.ascontiguousarray(feats, dtype=np.float32)
    if metric == "cosine":
        x = np.ascontiguousarray(l2_normalize(x, axis=1))
    try:
        import faiss

        index = faiss.IndexFlatIP(x.shape[1]) if metric == "cosine" else faiss.IndexFlatL2(x.shape[1])
        index.add(x)
        _, cand = index.search(x, want)
    except ImportError:
        cand = np.empty((n, want), dtype=np.int64)
        sq = np.einsum("ij,ij->i", x, x)
        for s in range(0, n, chunk):
            sims = x[s:s + chunk] @ x.T
            d = -sims if metric == "cosine" else sq[s:s + chunk, None] + sq[None, :] - 2 * sims
            cand[s:s + chunk] = np.argpartition(d, want - 1, axis=1)[:, :want]
    rows = np.repeat(np.arange(n), want)
    d64 = _pair_dist(feats[rows], feats[cand.reshape(-1)], metric).reshape(n, want)
    order = np.lexsort((cand, d64), axis=1)[:, :min(k, n)]
    return np.take_along_axis(cand, order, 1), np.take_along_axis(d64, order, 1)


def _row_max(feats: np.ndarray, metric: str, chunk: int = 2048) -> np.ndarray:
    """max_j d(i, j) over all items, float64 (the per-row scale of the dense code)."""
    out = np.empty(feats.shape[0])
    for s in range(0, feats.shape[0], chunk):
        out[s:s + chunk] = _pairwise(feats[s:s + chunk], feats, metric).max(axis=1)
    return out


class KnnRerank:
    """k-reciprocal re-ranking from kNN lists; ``block``/``pairs``/``dense`` give the final distances."""

    def __init__(self, qf, gf, k1: int = 20, k2: int = 6, lambda_value: float = 0.3, metric: str = "euclidean",
                 row_max: np.ndarray | None = None):
        self.num_q = qf.shape[0]
        self.feats = np.concatenate([qf, gf])
        self.metric, self.lam = metric, lambda_value
        n = self.feats.shape[0]
        self.shape = (self.num_q, n - self.num_q)
        self.scale = np.maximum(_row_max(self.feats, metric) if row_max is None else row_max, 1e-12)
        ids, _ = knn_lists(self.feats, k1 + 1, metric)
        rows = []
        for i in range(n):
            expansion = expanded_reciprocal_neighbours(ids, i, k1)
            weight = np.exp(-self._original(np.full(expansion.size, i), expansion))
            rows.append((expansion, weight / weight.sum()))
        if k2 != 1:
            smoothed = []
            for i in range(n):
                acc: dict[int, float] = {}
                for r in ids[i, :k2]:  # rows added in this order, as the dense mean does
                    for c, v in zip(*rows[r]):
                        acc[c] = acc.get(c, 0.0) + v
                cols = np.fromiter(acc.keys(), dtype=np.int64, count=len(acc))
                vals = np.fromiter(acc.values(), dtype=np.float64, count=len(acc))
                order = np.argsort(cols)
                # Sum first, then divide (np.mean over the k2 rows): zeros where a row lacks the column.
                smoothed.append((cols[order], vals[order] / k2))
            rows = smoothed
        self.V = rows
        # Inverted index: for each column, the items whose encoding holds it.
        inv: dict[int, list[int]] = {}
        for i, (cols, _) in enumerate(rows):
            for c in cols:
                inv.setdefault(int(c), []).append(i)
        self.inv = {c: np.array(v) for c, v in inv.items()}
        # Sparse Jaccard overlaps of each query with gallery items sharing support: CSR by query.
        self.ov_ptr, self.ov_col, self.ov_val = [0], [], []
        for i in range(self.num_q):
            cols, vals = rows[i]
            acc = {}
            for c, v in zip(cols, vals):
                for j in self.inv[int(c)]:
                    jv = rows[j][1][np.searchsorted(rows[j][0], c)]
                    acc[int(j)] = acc.get(int(j), 0.0) + min(v, jv)
            g = np.array(sorted(j for j in acc if j >= self.num_q), dtype=np.int64)
            self.ov_col.append(g - self.num_q)
            self.ov_val.append(np.array([acc[j] for j in g]))
            self.ov_ptr.append(self.ov_ptr[-1] + g.size)
        self.ov_col = np.concatenate(self.ov_col) if self.ov_col else np.zeros(0, np.int64)
        self.ov_val = np.concatenate(self.ov_val) if self.ov_val else np.zeros(0)
        self.ov_ptr = np.array(self.ov_ptr)
        self._rows = np.arange(self.num_q)

    def _original(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        return _pair_dist(self.feats[i], self.feats[j], self.metric) / self.scale[i]

    # -- a distance source for verify.streamed.evaluate_rank_streamed
    def select_queries(self, rows):
        out = object.__new__(KnnRerank)
        out.__dict__.update(self.__dict__)
        out._rows = self._rows[np.asarray(rows)]
        out.shape = (len(rows), self.shape[1])
        return out

    def _jaccard(self, q_rows: np.ndarray, g_cols: np.ndarray) -> np.ndarray:
        """Jaccard distance of (query row, gallery index) pairs (1 without shared support)."""
        out = np.ones(q_rows.size)
        for n, (qi, gj) in enumerate(zip(q_rows, g_cols)):
            lo, hi = self.ov_ptr[qi], self.ov_ptr[qi + 1]
            k = lo + np.searchsorted(self.ov_col[lo:hi], gj)
            if k < hi and self.ov_col[k] == gj:
                ov = self.ov_val[k]
                out[n] = 1.0 - ov / (2.0 - ov)
        return out

    def block(self, start: int, stop: int) -> np.ndarray:
        q = self._rows
        orig = _pairwise(self.feats[q], self.feats[self.num_q + start:self.num_q + stop], self.metric) \
            / self.scale[q][:, None]
        jac = np.ones_like(orig)
        for r, qi in enumerate(q):
            lo, hi = self.ov_ptr[qi], self.ov_ptr[qi + 1]
            cols, ov = self.ov_col[lo:hi], self.ov_val[lo:hi]
            sel = (cols >= start) & (cols < stop)
            jac[r, cols[sel] - start] = 1.0 - ov[sel] / (2.0 - ov[sel])
        return jac * (1.0 - self.lam) + orig * self.lam

    def pairs(self, rows, cols):
        q = self._rows[np.asarray(rows)]
        orig = self._original(q, self.num_q + np.asarray(cols))
        est = self._jaccard(q, np.asarray(cols)) * (1.0 - self.lam) + orig * self.lam
        # float64 dot products in another order than the block's matrix product: a few ulps of the operands.
        return est, np.full(est.shape, 1e-9)

    def dense(self) -> np.ndarray:
        return self.block(0, self.shape[1])


def average_query_expansion_knn(qf: np.ndarray, gf: np.ndarray, qe_times: int = 1, qe_k: int = 5,
                                alpha: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """:func:`average_query_expansion` from the qe_k nearest neighbours (faiss), without N x N similarities."""
    num_q = qf.shape[0]
    feats = np.concatenate([qf, gf]).astype(np.float64)
    k = min(qe_k, feats.shape[0])
    for _ in range(qe_times):
        top, dist = knn_lists(feats, k, "cosine")
        sims = 1.0 - dist
        normed = l2_normalize(feats, axis=1)
        # The dense code's similarity is a matrix product; recompute the chosen ones the same way.
        sims = np.einsum("ij,ikj->ik", normed, normed[top])
        weights = np.power(sims, alpha)[:, :, None]
        feats = (feats[top] * weights).mean(axis=1)
    return feats[:num_q].astype(np.float32), feats[num_q:].astype(np.float32)
