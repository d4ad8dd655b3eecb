"""Retrieval metrics for the Market-1501 protocol (CMC, mAP, mINP) and a pairwise ROC, from a full
distance matrix (the same metrics streamed over gallery chunks, for galleries of any size: :mod:`.streamed`).

The values equal fast-reid's ``evaluate_rank`` (``fastreid/evaluation/rank.py``):

* for each query the gallery is ordered by ascending distance;
* gallery items with the query's pid AND the query's camera are removed;
* a query whose remaining gallery holds no item of its pid is skipped;
* CMC is 1 from the rank of the first match on; AP is the mean, over the matches, of the
  precision at each match; INP is ``number of matches / rank of the last match`` (1-based);
* CMC, AP and INP are averaged over the valid queries.

Ties: the order is a *stable* sort by distance, so among equal distances the gallery item
with the smaller index comes first (``np.argsort(row, kind="stable")``).  fast-reid uses the
default (unstable) argsort, so where distances tie exactly its numbers may differ from
ours; with real float features exact ties are rare.

``evaluate_rank`` never sorts a full row.  For every query it takes the distances of its
positives (usually a handful), sorts only those, and counts how many valid gallery items
come before each positive (one vectorised comparison per positive; a per-row binary search
when a query has many positives); the rank of the s-th positive (0-based) is
``s + 1 + (valid non-matching items before it)``.  Items tied with a positive are placed by
gallery index.  Queries are processed in chunks to bound memory.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from reid_export.embeddings import l2_normalize
from reid_export.errors import ReidExportError, UsageError

__all__ = [
    "QueryGroups",
    "check_no_nan",
    "compute_distance",
    "evaluate_rank",
    "fmr_thresholds",
    "in_percent",
    "rank_metrics",
    "roc_curve",
    "roc_tpr_at_fpr",
]

# Elements (queries x gallery) handled at once; bounds temporary memory to a few tens of MB.
_CHUNK_ELEMENTS = 1 << 20
# Up to this many positives per query the buckets are computed with one vectorised
# comparison per positive; beyond it a per-row binary search is cheaper.
_LINEAR_MAX_POSITIVES = 48


def compute_distance(qf, gf, metric: str = "cosine") -> np.ndarray:
    """Distance matrix [Q, G] between query and gallery features.

    ``cosine``: ``1 - cos(q, g)`` after L2-normalising both sides (a zero vector stays zero,
    so its distance to everything is 1).  ``euclidean``: the *squared* Euclidean distance, as
    fast-reid computes it, clipped at 0.  float32 inputs give float32, anything else float64.
    """
    qf = np.asarray(qf)
    gf = np.asarray(gf)
    if qf.ndim != 2 or gf.ndim != 2 or qf.shape[1] != gf.shape[1]:
        raise ReidExportError(
            f"features must be 2-D with the same dimension; got query {qf.shape} and "
            f"gallery {gf.shape}"
        )
    dtype = np.float32 if (qf.dtype == np.float32 and gf.dtype == np.float32) else np.float64
    q = qf.astype(dtype, copy=False)
    g = gf.astype(dtype, copy=False)
    if metric == "cosine":
        q, g = l2_normalize(q, axis=1), l2_normalize(g, axis=1)
        dist = 1.0 - q @ g.T
    elif metric == "euclidean":
        q_sq = np.einsum("ij,ij->i", q, q)[:, None]
        g_sq = np.einsum("ij,ij->i", g, g)[None, :]
        dist = q_sq + g_sq - 2.0 * (q @ g.T)
        np.maximum(dist, 0, out=dist)
    else:
        raise UsageError(f"unknown distance metric {metric!r}; use 'cosine' or 'euclidean'")
    return dist.astype(dtype, copy=False)


def _check_inputs(distmat, q_pids, g_pids, q_camids, g_camids):
    distmat = np.asarray(distmat)
    if distmat.ndim != 2:
        raise ReidExportError(f"distance matrix must be 2-D [Q, G]; got shape {distmat.shape}")
    if not np.issubdtype(distmat.dtype, np.floating):
        distmat = distmat.astype(np.float64)
    num_q, num_g = distmat.shape
    arrays = []
    for name, arr, n in (
        ("q_pids", q_pids, num_q),
        ("g_pids", g_pids, num_g),
        ("q_camids", q_camids, num_q),
        ("g_camids", g_camids, num_g),
    ):
        arr = np.asarray(arr).reshape(-1)
        if arr.shape[0] != n:
            raise ReidExportError(
                f"{name} has {arr.shape[0]} entries but the distance matrix {distmat.shape} "
                f"needs {n}"
            )
        arrays.append(arr)
    if num_q == 0 or num_g == 0:
        raise ReidExportError(f"empty distance matrix {distmat.shape}: no queries or no gallery")
    return (distmat, *arrays)


def check_no_nan(dist):
    # A sum is cheap and turns any NaN into NaN; only then look closer (inf - inf also gives NaN).
    if not np.isfinite(dist.sum()) and np.isnan(dist).any():
        raise ReidExportError("distance matrix contains NaN: check the features")


class QueryGroups:
    """Query/gallery pids and camids as small integer codes, gallery indices grouped by pid."""

    def __init__(self, q_pids, g_pids, q_camids, g_camids):
        nq = q_pids.shape[0]
        _, pid_code = np.unique(np.concatenate([q_pids, g_pids]), return_inverse=True)
        _, cam_code = np.unique(np.concatenate([q_camids, g_camids]), return_inverse=True)
        pid_code = pid_code.reshape(-1).astype(np.int64)
        cam_code = cam_code.reshape(-1).astype(np.int64)
        self.q_pid, self.g_pid = pid_code[:nq], pid_code[nq:]
        self.q_cam, self.g_cam = cam_code[:nq], cam_code[nq:]
        n_codes = int(pid_code.max()) + 1
        n_cams = int(cam_code.max()) + 1
        # CSR: the gallery indices of pid code c are g_order[g_start[c]:g_start[c + 1]],
        # in ascending gallery order.
        self.g_order = np.argsort(self.g_pid, kind="stable")
        counts = np.bincount(self.g_pid, minlength=n_codes)
        self.g_start = np.concatenate([[0], np.cumsum(counts)])
        self.same_pid = counts[self.q_pid]
        key_g = self.g_pid * n_cams + self.g_cam
        key_q = self.q_pid * n_cams + self.q_cam
        same_cam = np.bincount(key_g, minlength=n_codes * n_cams)[key_q]
        # Gallery items of the query's pid from another camera: the matches.
        self.n_pos = self.same_pid - same_cam

    def same_pid_pairs(self, sel):
        """(row, gallery index) of every gallery item sharing the pid of query sel[row]."""
        m = self.same_pid[sel]
        rows = np.repeat(np.arange(sel.size), m)
        first = np.repeat(np.cumsum(m) - m, m)
        cols = self.g_order[np.repeat(self.g_start[self.q_pid[sel]], m)
                            + np.arange(rows.size) - first]
        return rows, cols


def _positive_ranks(dist, sel, groups, linear_max):
    """1-based ranks of the positives of queries ``sel`` among their valid gallery items.

    ``dist`` is ``distmat[sel]``; returns ``ranks`` [n, P] (P = most positives of any query
    in the chunk), ascending per row, padded with 0.
    """
    n, num_g = dist.shape
    n_pos = groups.n_pos[sel]
    p_max = int(n_pos.max())
    sp_rows, sp_cols = groups.same_pid_pairs(sel)
    is_pos = groups.g_cam[sp_cols] != groups.q_cam[sel][sp_rows]
    rows, cols = sp_rows[is_pos], sp_cols[is_pos]

    # Positive distances and gallery indices, padded with (+inf, num_g), sorted by the
    # stable key (distance, gallery index).
    slot = np.arange(rows.size) - (np.cumsum(n_pos) - n_pos)[rows]
    thr = np.full((n, p_max), np.inf, dtype=dist.dtype)
    pidx = np.full((n, p_max), num_g, dtype=np.int64)
    thr[rows, slot] = dist[rows, cols]
    pidx[rows, slot] = cols
    order = np.argsort(thr, axis=1, kind="stable")
    thr = np.take_along_axis(thr, order, axis=1)
    pidx = np.take_along_axis(pidx, order, axis=1)

    # bucket[r, k]: number of positives with distance <= dist[r, k].
    if p_max <= linear_max:
        bucket = np.zeros((n, num_g), dtype=np.int8 if p_max < 126 else np.int16)
        cmp = np.empty((n, num_g), dtype=bool)
        cmp_int = cmp.view(np.int8)
        for j in range(p_max):
            np.greater_equal(dist, thr[:, j : j + 1], out=cmp)
            np.add(bucket, cmp_int, out=bucket, casting="unsafe")
        del cmp
    else:
        bucket = np.empty((n, num_g), dtype=np.intp)
        for r in range(n):
            bucket[r] = np.searchsorted(thr[r], dist[r], side="right")
    # Items of the query's pid are positives or removed, not "other" items: park them in an
    # extra bin that is never counted.
    bucket[sp_rows, sp_cols] = p_max + 1

    # table[r, b] is the largest positive distance <= an item in bucket b (-inf for b = 0;
    # NaN for the parked bin, so it never matches).  An item equal to it is tied with a
    # positive and must be placed by gallery index instead.
    table = np.empty((n, p_max + 2), dtype=dist.dtype)
    table[:, 0] = -np.inf
    table[:, 1:-1] = thr
    table[:, -1] = np.nan
    hist = np.empty((n, p_max + 2), dtype=np.int64)
    for r in range(n):
        b = bucket[r]
        hist[r] = np.bincount(b, minlength=p_max + 2)
        tied = np.take(table[r], b) == dist[r]
        if tied.any():
            tk = np.flatnonzero(tied)
            d = dist[r, tk][:, None]
            exact = ((thr[r] < d) | ((thr[r] == d) & (pidx[r] < tk[:, None]))).sum(axis=1)
            np.subtract.at(hist[r], b[tk], 1)
            np.add.at(hist[r], exact, 1)

    # Non-matching valid items before the positive in slot s: those with bucket <= s.
    ranks = np.cumsum(hist[:, :p_max], axis=1) + np.arange(1, p_max + 1)[None, :]
    ranks[np.arange(p_max)[None, :] >= n_pos[:, None]] = 0
    return ranks


def _query_stats(distmat, sel, groups, linear_max):
    """(rank of first match, AP, INP) for the valid queries ``sel``."""
    dist = distmat[sel]
    check_no_nan(dist)
    ranks = _positive_ranks(dist, sel, groups, linear_max)
    n_pos = groups.n_pos[sel]
    hits = np.arange(1, ranks.shape[1] + 1, dtype=np.float64)[None, :]
    prec = np.divide(hits, ranks, out=np.zeros(ranks.shape), where=ranks > 0)
    ap = prec.sum(axis=1) / n_pos
    inp = n_pos / ranks[np.arange(sel.size), n_pos - 1]
    return ranks[:, 0], ap, inp


def evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank: int = 50, *,
                  workers: int = 1,
                  _linear_max: int = _LINEAR_MAX_POSITIVES) -> dict:
    """CMC, mAP and mINP under the Market-1501 protocol (values as in fast-reid).

    Returns ``cmc`` (float64 [min(max_rank, G)], fractions; with fewer valid gallery items
    than its length, a query's CMC stays at 1 after its first match), ``mAP`` and ``mINP``
    (fractions), ``all_AP`` and ``all_INP`` (one per valid query, in query order) and
    ``num_valid_queries``.  Ties are broken by gallery index (stable sort).  With
    ``workers`` > 1, query chunks run in that many threads (numpy releases the GIL).  Raises
    :class:`ReidExportError` when no query has a valid match.
    """
    distmat, q_pids, g_pids, q_camids, g_camids = _check_inputs(
        distmat, q_pids, g_pids, q_camids, g_camids
    )
    num_q, num_g = distmat.shape
    if max_rank < 1:
        raise UsageError(f"max_rank must be >= 1; got {max_rank}")
    length = min(max_rank, num_g)

    groups = QueryGroups(q_pids, g_pids, q_camids, g_camids)
    valid = np.flatnonzero(groups.n_pos > 0)
    if valid.size == 0:
        raise ReidExportError(
            "no query has a matching gallery image from another camera: "
            "check the dataset's pids/camera ids"
        )
    # Queries with similar numbers of positives share a chunk, so little padding is needed.
    valid = valid[np.argsort(groups.n_pos[valid], kind="stable")]
    step = max(1, _CHUNK_ELEMENTS // num_g)
    chunks = [valid[i : i + step] for i in range(0, valid.size, step)]
    if workers > 1 and len(chunks) > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            parts = list(pool.map(lambda c: _query_stats(distmat, c, groups, _linear_max),
                                  chunks))
    else:
        parts = [_query_stats(distmat, c, groups, _linear_max) for c in chunks]

    back = np.argsort(valid, kind="stable")  # back to query order
    first_rank = np.concatenate([p[0] for p in parts])[back]
    ap = np.concatenate([p[1] for p in parts])[back]
    inp = np.concatenate([p[2] for p in parts])[back]
    hits = np.bincount(np.minimum(first_rank, length + 1) - 1, minlength=length + 1)[:length]
    cmc = np.cumsum(hits) / float(valid.size)
    return {
        "cmc": cmc,
        "mAP": float(ap.mean()),
        "mINP": float(inp.mean()),
        "all_AP": ap,
        "all_INP": inp,
        "num_valid_queries": int(valid.size),
        "valid_queries": np.sort(valid),  # query indices that all_AP / all_INP refer to
    }


def rank_metrics(distmat, q_pids, g_pids, q_camids, g_camids) -> dict:
    """Rank-1/5/10, mAP and mINP in percent, plus ``num_valid_queries``.

    With fewer than k gallery items, Rank-k is the CMC at the last gallery position.
    """
    return in_percent(evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=10))


def in_percent(res: dict) -> dict:
    """Rank-1/5/10, mAP, mINP in percent (and ``num_valid_queries``) from ``evaluate_rank``'s result (or
    the streamed one's): with fewer than k gallery items, Rank-k is the CMC at the last position."""
    cmc = res["cmc"]
    out = {f"Rank-{k}": float(cmc[min(k, cmc.size) - 1] * 100.0) for k in (1, 5, 10)}
    out["mAP"] = res["mAP"] * 100.0
    out["mINP"] = res["mINP"] * 100.0
    out["num_valid_queries"] = res["num_valid_queries"]
    return out


def _pair_chunks(distmat, q_pids, g_pids, q_camids, g_camids):
    """Yield (positive distances, negative distances) of the valid pairs, chunk by chunk."""
    distmat, q_pids, g_pids, q_camids, g_camids = _check_inputs(
        distmat, q_pids, g_pids, q_camids, g_camids
    )
    num_q, num_g = distmat.shape
    chunk = max(1, _CHUNK_ELEMENTS // num_g)
    for start in range(0, num_q, chunk):
        dist = distmat[start : start + chunk]
        check_no_nan(dist)
        same_pid = q_pids[start : start + chunk, None] == g_pids[None, :]
        same_cam = q_camids[start : start + chunk, None] == g_camids[None, :]
        yield dist[same_pid & ~same_cam], dist[~same_pid]


def roc_curve(distmat, q_pids, g_pids, q_camids, g_camids):
    """Verification ROC over all valid (query, gallery) pairs; score = -distance.

    Pairs with the same pid and the same camera are left out (as in ranking); a pair is
    positive when the pids are equal.  Returns ``(fpr, tpr)``, both non-decreasing from
    (0, 0) to (1, 1): for every distinct positive distance u, the operating points
    "accept d < u" and "accept d <= u" (exact step curve, ties give a diagonal step).
    """
    pos = [p for p, _ in _pair_chunks(distmat, q_pids, g_pids, q_camids, g_camids)]
    pos = np.sort(np.concatenate(pos))
    n_pos = pos.size
    if n_pos == 0:
        raise ReidExportError(
            "no query has a matching gallery image from another camera: "
            "check the dataset's pids/camera ids"
        )
    u, pos_le = np.unique(pos, return_counts=True)
    pos_le = np.cumsum(pos_le)
    pos_lt = np.concatenate([[0], pos_le[:-1]])
    neg_lt = np.zeros(u.size, dtype=np.int64)
    neg_le = np.zeros(u.size, dtype=np.int64)
    n_neg = 0
    # Second pass: count negatives below / at each distinct positive distance.
    for _, neg in _pair_chunks(distmat, q_pids, g_pids, q_camids, g_camids):
        n_neg += neg.size
        neg = np.sort(neg)
        neg_lt += np.searchsorted(neg, u, side="left")
        neg_le += np.searchsorted(neg, u, side="right")
    denom_neg = float(max(n_neg, 1))
    fpr = np.empty(2 * u.size + 2)
    tpr = np.empty(2 * u.size + 2)
    fpr[0] = tpr[0] = 0.0
    fpr[1:-1:2] = neg_lt / denom_neg
    tpr[1:-1:2] = pos_lt / n_pos
    fpr[2:-1:2] = neg_le / denom_neg
    tpr[2:-1:2] = pos_le / n_pos
    fpr[-1] = tpr[-1] = 1.0
    return fpr, tpr


def _allowed(f: float, n_neg: int) -> int:
    """Most negatives that may be accepted at FPR <= f (guarding float round-off)."""
    return int(np.floor(f * n_neg * (1 + 1e-12)))


def _pairs_and_smallest_negatives(distmat, q_pids, g_pids, q_camids, g_camids, keep_for):
    """(positive distances, sorted smallest negative distances, number of negatives) of the valid
    pairs; only as many negatives are kept as the largest ``_allowed(f) + 1`` of ``keep_for`` needs."""
    distmat, q_pids, g_pids, q_camids, g_camids = _check_inputs(
        distmat, q_pids, g_pids, q_camids, g_camids
    )
    groups = QueryGroups(q_pids, g_pids, q_camids, g_camids)
    n_neg = int((distmat.shape[1] - groups.same_pid).sum())
    # Only the smallest negative distances matter: keep that many from each chunk.
    keep = min(n_neg, max(_allowed(f, n_neg) + 1 for f in keep_for))
    pos_parts = []
    pool = np.empty(0, dtype=distmat.dtype)  # the `keep` smallest negatives seen so far
    for pos, neg in _pair_chunks(distmat, q_pids, g_pids, q_camids, g_camids):
        pos_parts.append(pos)
        if keep == 0:
            continue
        if pool.size >= keep:
            neg = neg[neg < pool.max()]  # the rest cannot enter the pool
        pool = np.concatenate([pool, neg])
        if pool.size > keep:
            pool = np.partition(pool, keep - 1)[:keep]
    pos = np.concatenate(pos_parts)
    if pos.size == 0:
        raise ReidExportError(
            "no query has a matching gallery image from another camera: "
            "check the dataset's pids/camera ids"
        )
    return pos, np.sort(pool), n_neg


def roc_tpr_at_fpr(distmat, q_pids, g_pids, q_camids, g_camids,
                   fprs=(1e-4, 1e-3, 1e-2)) -> dict:
    """TPR (percent) at each target FPR, keys like ``"TPR@FPR=1e-04"``.

    TPR@FPR=f is the highest TPR of any distance threshold whose FPR is <= f (the best point
    of :func:`roc_curve` with fpr <= f).  fast-reid instead reports the ROC point whose FPR
    is nearest to f, so its numbers can differ slightly.  :func:`fmr_thresholds` gives the
    distance of that operating point as well.
    """
    fprs = tuple(float(f) for f in fprs)
    pos, neg, n_neg = _pairs_and_smallest_negatives(distmat, q_pids, g_pids, q_camids, g_camids, fprs)
    out = {}
    for f in fprs:
        allowed = _allowed(f, n_neg)  # negatives that may be accepted
        if allowed >= n_neg:
            tpr = 1.0
        else:
            v = neg[allowed]  # the (allowed+1)-th smallest negative distance: reject it
            tpr = float(np.mean(pos < v))
        out[f"TPR@FPR={f:.0e}"] = tpr * 100.0
    return out


def fmr_thresholds(distmat, q_pids, g_pids, q_camids, g_camids, fmrs=(1e-1, 1e-2, 1e-3)) -> dict:
    """The distance threshold of each false-match rate, for trackers that gate on a distance.

    Pairs as in ranking (and :func:`roc_curve`): every (query, gallery) pair except those with the
    same pid AND the same camera; positive = same pid, negative = different pids. For a target
    FMR ``f`` the threshold ``t`` is the ``(floor(f * N) + 1)``-th smallest negative distance
    (N negatives): accepting the pairs with distance ``< t`` accepts at most ``f * N`` negatives,
    and ``t`` is the largest threshold that does. ``tmr`` is the percentage of positive pairs
    below ``t`` (the TPR@FPR of :func:`roc_tpr_at_fpr`).

    An FMR below ``1 / N`` cannot be told apart from 0 on this set (the threshold would only be
    "below the closest negative pair"): its ``distance`` and ``tmr`` are None and ``note`` says
    how many negative pairs it needs.

    Returns ``{"num_positive_pairs", "num_negative_pairs", "points": [{"fmr", "distance", "tmr",
    "accepted_negatives", "note"}]}`` (one point per ``fmrs``, in order).
    """
    fmrs = tuple(float(f) for f in fmrs)
    pos, neg, n_neg = _pairs_and_smallest_negatives(distmat, q_pids, g_pids, q_camids, g_camids, fmrs)
    points = []
    for f in fmrs:
        allowed = _allowed(f, n_neg)
        point = {"fmr": f, "distance": None, "tmr": None, "accepted_negatives": None, "note": None}
        if allowed < 1 or allowed >= n_neg:
            need = int(np.ceil(1.0 / f - 1e-9)) if f > 0 else None
            point["note"] = (f"FMR {f:g} is below what {n_neg} negative pairs resolve (needs >= {need})"
                             if allowed < 1 else f"FMR {f:g} accepts every negative pair")
        else:
            t = neg[allowed]
            point.update(distance=float(t), tmr=float(np.mean(pos < t)) * 100.0,
                         accepted_negatives=int(np.sum(neg < t)))
        points.append(point)
    return {"num_positive_pairs": int(pos.size), "num_negative_pairs": n_neg, "points": points}
