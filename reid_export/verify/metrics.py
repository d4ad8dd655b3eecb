"""Retrieval metrics for the Market-1501 protocol (CMC, mAP, mINP) and a pairwise ROC.

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
from reid_export.verify.npy_rows import NpyRows

__all__ = [
    "FeatureDistances",
    "MatrixDistances",
    "compute_distance",
    "evaluate_rank",
    "evaluate_rank_streamed",
    "fmr_thresholds",
    "rank_metrics",
    "rank_metrics_streamed",
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


def _check_no_nan(dist):
    # A sum is cheap and turns any NaN into NaN; only then look closer (inf - inf also gives NaN).
    if not np.isfinite(dist.sum()) and np.isnan(dist).any():
        raise ReidExportError("distance matrix contains NaN: check the features")


class _Groups:
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
    _check_no_nan(dist)
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

    groups = _Groups(q_pids, g_pids, q_camids, g_camids)
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
    res = evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=10)
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
        _check_no_nan(dist)
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
    groups = _Groups(q_pids, g_pids, q_camids, g_camids)
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


# ----------------------------------------------------------------------------------------
# Streamed evaluation: galleries of any size, memory bounded by a chunk of gallery columns
# ----------------------------------------------------------------------------------------
#
# ``evaluate_rank_streamed`` gives the numbers of ``evaluate_rank`` without a [Q, G] matrix.
# It needs, per valid query, the distances of its positives before it can count the gallery
# items ranked before them; those come from ``source.pairs`` (cheap: a few per query) as an
# *estimate* with an error bound ``eps`` (0 when the source is a matrix), so one pass over the
# gallery suffices:
#
# * every gallery item of another pid whose distance is more than ``eps`` away from every
#   positive estimate is counted at once in the bucket "number of positives before it";
# * the few within ``eps`` of an estimate are kept and placed at the end against the *exact*
#   positive distances, which are read from the same blocks of distances the pass computed
#   (so positives and the items they are compared with are the same floats); ties by gallery
#   index, as in ``evaluate_rank``;
# * at the end every exact positive distance must lie within ``eps / 2`` of its estimate (or
#   equal it, for a matrix), which makes the counts of the first kind exact; a violation raises.
#
# Items farther than the last positive (plus ``eps``) never change a rank and are not kept.


class MatrixDistances:
    """A full distance matrix as a streamed source (tests, and the equality check itself)."""

    def __init__(self, distmat):
        self.distmat = np.asarray(distmat)
        if self.distmat.ndim != 2:
            raise ReidExportError(f"distance matrix must be 2-D [Q, G]; got shape {self.distmat.shape}")
        self.shape = self.distmat.shape

    def select_queries(self, rows):
        return MatrixDistances(self.distmat[rows])

    def block(self, start: int, stop: int) -> np.ndarray:
        return self.distmat[:, start:stop]

    def pairs(self, rows, cols):
        """(distance estimates, error bound) of the pairs (query row, gallery index)."""
        d = self.distmat[rows, cols].astype(np.float64)
        return d, np.zeros_like(d)


def _normalize_rows(x: np.ndarray) -> np.ndarray:
    # As compute_distance does it, so a chunk of rows gets the same values as the whole.
    return l2_normalize(x, axis=1)


class FeatureDistances:
    """Query x gallery distances computed block by block from features (``compute_distance``'s
    definitions).  ``gallery`` is anything 2-D that slices into arrays: an ndarray, a
    ``np.load(..., mmap_mode="r")`` memmap, or a generator object with ``shape``/``dtype`` and
    ``__getitem__`` for slices and index arrays.  A whole-file memmap is read with file reads
    (:class:`npy_rows.NpyRows`), not through the map: the pages a pass touches would otherwise stay
    in the process's resident memory, the whole gallery file by the end of the pass."""

    # pairs() works on this many (pair x dimension) float64 values at a time (8 MiB per array)
    PAIR_ELEMENTS = 1 << 20

    def __init__(self, qf, gallery, metric: str = "cosine"):
        if metric not in ("cosine", "euclidean"):
            raise UsageError(f"unknown distance metric {metric!r}; use 'cosine' or 'euclidean'")
        qf = np.asarray(qf)
        if qf.ndim != 2 or len(gallery.shape) != 2 or qf.shape[1] != gallery.shape[1]:
            raise ReidExportError(f"features must be 2-D with the same dimension; got query {qf.shape} "
                                  f"and gallery {tuple(gallery.shape)}")
        self.dtype = np.float32 if (qf.dtype == np.float32 and np.dtype(gallery.dtype) == np.float32) \
            else np.float64
        self.metric = metric
        self.gallery = NpyRows.of(gallery)
        q = qf.astype(self.dtype, copy=False)
        self.q = _normalize_rows(q) if metric == "cosine" else q
        self.q_sq = np.einsum("ij,ij->i", self.q, self.q)
        self.shape = (qf.shape[0], gallery.shape[0])

    def select_queries(self, rows):
        out = object.__new__(FeatureDistances)
        out.__dict__.update(self.__dict__)
        out.q, out.q_sq = self.q[rows], self.q_sq[rows]
        out.shape = (len(rows), self.shape[1])
        return out

    def _gallery(self, index) -> np.ndarray:
        g = np.asarray(self.gallery[index]).astype(self.dtype, copy=False)
        return _normalize_rows(g) if self.metric == "cosine" else g

    def block(self, start: int, stop: int) -> np.ndarray:
        g = self._gallery(slice(start, stop))
        if self.metric == "cosine":
            dist = self.q @ g.T
            return np.subtract(1.0, dist, out=dist)
        g_sq = np.einsum("ij,ij->i", g, g)[None, :]
        dist = self.q_sq[:, None] + g_sq - 2.0 * (self.q @ g.T)
        np.maximum(dist, 0, out=dist)
        return dist

    def pairs(self, rows, cols):
        """(float64 estimates, error bounds) of the distances of the pairs (query row, gallery index),
        in batches of pairs so that the float64 copies stay small whatever the number of pairs."""
        rows, cols = np.asarray(rows).reshape(-1), np.asarray(cols).reshape(-1)
        step = max(1, self.PAIR_ELEMENTS // max(1, self.q.shape[1]))
        if rows.size <= step:
            return self._pairs(rows, cols)
        parts = [self._pairs(rows[s0:s0 + step], cols[s0:s0 + step]) for s0 in range(0, rows.size, step)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def _pairs(self, rows, cols):
        uniq, inv = np.unique(cols, return_inverse=True)
        g = self._gallery(uniq)[inv.reshape(-1)].astype(np.float64)
        q = self.q[rows].astype(np.float64)
        dot = np.einsum("ij,ij->i", q, g)
        absdot = np.einsum("ij,ij->i", np.abs(q), np.abs(g))
        # A dot product of length D in floating point is off by at most about D * u * sum|q_i g_i|
        # (u the unit roundoff, any summation order), each squared norm by D * u * itself, and the
        # final additions by a few u of their operands; the bound doubles that.
        u = np.finfo(self.dtype).eps / 2.0
        dim = self.q.shape[1] + 2
        if self.metric == "cosine":
            return 1.0 - dot, 2.0 * dim * u * (absdot + 1.0)
        q_sq = self.q_sq[rows].astype(np.float64)
        g_sq = np.einsum("ij,ij->i", g, g)
        est = np.maximum(q_sq + g_sq - 2.0 * dot, 0.0)
        return est, 2.0 * dim * u * (q_sq + g_sq + 2.0 * absdot)


def _place_near_positives(hist, p_max, ex_d, ex_i, rows, cols, d):
    """Count items (row, gallery index, distance) that lie near a positive into the flat histogram
    ``hist`` [rows x (p_max + 1)] by the exact positives ``ex_d``/``ex_i`` of their rows: the bin is
    the number of positives before the item in the order (distance, gallery index)."""
    for s0 in range(0, rows.size, 1 << 16):
        r, c = rows[s0:s0 + (1 << 16)], cols[s0:s0 + (1 << 16)]
        dd = d[s0:s0 + (1 << 16)].astype(np.float64)[:, None]
        t, ti = ex_d[r], ex_i[r]
        before = ((t < dd) | ((t == dd) & (ti < c[:, None]))).sum(axis=1)
        np.add.at(hist, r * (p_max + 1) + before, 1)


# The kept items of a [queries, chunk] block are processed in bands of chunk_elements / KEPT_FRACTION
# distances: their temporaries (~100 bytes per kept item at worst) then stay below ~3 bytes per
# chunk element even when every item of the block is kept.
KEPT_FRACTION = 32


def evaluate_rank_streamed(source, q_pids, g_pids, q_camids, g_camids, max_rank: int = 50, *,
                           chunk_elements: int = 1 << 25, progress: bool = False,
                           desc: str = "eval (streamed)", return_ranks: bool = False) -> dict:
    """:func:`evaluate_rank` over a distance ``source`` read in gallery chunks.

    ``source``: :class:`MatrixDistances` or :class:`FeatureDistances` (or anything with
    ``shape``, ``select_queries``, ``block`` and ``pairs``).  Temporary memory is about
    ``chunk_elements`` x (dtype size + 3) bytes at most (a [valid queries, chunk] block, and the
    items of it that rank before a positive, handled in bands of ``chunk_elements / KEPT_FRACTION``)
    plus the items near a positive held until all of their query's positives are read (12 bytes
    each; none once the blocks holding the positives are done), whatever the gallery size; the
    result has the same keys and values as :func:`evaluate_rank` (AP may differ in the last bit: the sum runs over another padding),
    plus ``kept_near_positives`` and, with ``return_ranks``, ``ranks``: the 1-based rank of every
    positive of each valid query, ascending, padded with 0 ([valid queries, most positives]).
    """
    from tqdm import tqdm

    num_q, num_g = source.shape
    q_pids, g_pids, q_camids, g_camids = (np.asarray(a).reshape(-1) for a in (q_pids, g_pids, q_camids, g_camids))
    for name, arr, n in (("q_pids", q_pids, num_q), ("g_pids", g_pids, num_g),
                         ("q_camids", q_camids, num_q), ("g_camids", g_camids, num_g)):
        if arr.shape[0] != n:
            raise ReidExportError(f"{name} has {arr.shape[0]} entries but the distances {source.shape} need {n}")
    if num_q == 0 or num_g == 0:
        raise ReidExportError(f"empty distances {source.shape}: no queries or no gallery")
    if max_rank < 1:
        raise UsageError(f"max_rank must be >= 1; got {max_rank}")
    length = min(max_rank, num_g)
    groups = _Groups(q_pids, g_pids, q_camids, g_camids)
    valid = np.flatnonzero(groups.n_pos > 0)
    if valid.size == 0:
        raise ReidExportError("no query has a matching gallery image from another camera: "
                              "check the dataset's pids/camera ids")
    nv = valid.size
    src = source.select_queries(valid)
    n_pos = groups.n_pos[valid]
    p_max = int(n_pos.max())
    q_pid, q_cam = groups.q_pid[valid], groups.q_cam[valid]

    # The positives, row-major (row = valid-query index), gallery index ascending within a row.
    sp_rows, sp_cols = groups.same_pid_pairs(valid)
    is_pos = groups.g_cam[sp_cols] != q_cam[sp_rows]
    prow, pcol = sp_rows[is_pos], sp_cols[is_pos]
    est, eps_pair = src.pairs(prow, pcol)
    eps_row = np.zeros(nv)
    with np.errstate(invalid="ignore"):  # NaN features: the block check below names them
        np.maximum.at(eps_row, prow, eps_pair)
    pstart = np.concatenate([[0], np.cumsum(n_pos)])
    slot = np.arange(prow.size) - pstart[prow]
    # Sorted estimates per row in [:, 1:n_pos + 1]; -inf before, +inf after.
    ext = np.full((nv, p_max + 2), np.inf)
    ext[:, 0] = -np.inf
    tmp = np.full((nv, p_max), np.inf)
    tmp[prow, slot] = est
    ext[:, 1:p_max + 1] = np.sort(tmp, axis=1)
    bound = ext[np.arange(nv), n_pos] + eps_row  # beyond this, an item follows every positive
    by_col = np.argsort(pcol, kind="stable")
    pcol_sorted = pcol[by_col]

    exact = np.full(prow.size, np.nan)
    # The exact positive distances as the blocks give them, per [row, slot] (padding +inf and
    # num_g), and how many of each row's are known: an item near a positive is placed as soon as
    # all of its row's are known (at the end otherwise), so few are held whatever the gallery size.
    ex_d = np.full((nv, p_max), np.inf)
    ex_i = np.full((nv, p_max), num_g, dtype=np.int64)
    known = np.zeros(nv, dtype=np.int64)
    hist = np.zeros(nv * (p_max + 1), dtype=np.int64)
    unsure_rows, unsure_cols, unsure_d = [], [], []
    n_unsure = 0
    step = max(1, min(num_g, chunk_elements // max(nv, 1)))
    # kept items of a block are handled in bands of rows of about this many distances
    kept_elements = max(1, chunk_elements // KEPT_FRACTION)
    sub = max(1, (1 << 22) // (p_max + 1))
    col_dtype = np.int32 if num_g < np.iinfo(np.int32).max else np.int64
    bar = tqdm(total=num_g, desc=desc, unit="img", unit_scale=True, disable=not progress, leave=False)
    for start in range(0, num_g, step):
        stop = min(num_g, start + step)
        dist = src.block(start, stop)
        _check_no_nan(dist)
        lo, hi = np.searchsorted(pcol_sorted, [start, stop])
        k = by_col[lo:hi]
        exact[k] = dist[prow[k], pcol[k] - start]
        ex_d[prow[k], slot[k]] = exact[k]
        ex_i[prow[k], slot[k]] = pcol[k]
        known += np.bincount(prow[k], minlength=nv)
        ready = known == n_pos
        # Rounded up, so no item <= bound is left out (one more kept item is harmless).
        limit = np.nextafter(bound.astype(dist.dtype), np.array(np.inf, dtype=dist.dtype))
        # The kept items in bands of rows: a band's temporaries (mask, indices, float64 copies:
        # ~100 bytes per kept item) stay bounded when most of the block is kept (positives that
        # rank deep keep their rows whole).
        band = max(1, kept_elements // (stop - start))
        for r0 in range(0, nv, band):
            r1 = min(nv, r0 + band)
            rows, cols = np.nonzero(dist[r0:r1] <= limit[r0:r1, None])
            rows += r0
            gcols = cols + start
            del cols
            keep = groups.g_pid[gcols] != q_pid[rows]
            rows, gcols = rows[keep], gcols[keep]
            del keep
            dk = dist[rows, gcols - start]
            d = dk.astype(np.float64)
            # Bucket: the number of estimates below d (padding is +inf), in bounded sub-batches.
            b = np.empty(rows.size, dtype=np.int64)
            for s0 in range(0, rows.size, sub):
                r, dd = rows[s0:s0 + sub], d[s0:s0 + sub]
                b[s0:s0 + sub] = (ext[r, 1:p_max + 1] < dd[:, None]).sum(axis=1)
            e = eps_row[rows]
            sure = ((d - ext[rows, b]) > e) & ((ext[rows, b + 1] - d) > e)
            hist += np.bincount(rows[sure] * (p_max + 1) + b[sure], minlength=hist.size)
            unsure = ~sure
            n_unsure += int(unsure.sum())
            now = unsure & ready[rows]
            _place_near_positives(hist, p_max, ex_d, ex_i, rows[now], gcols[now], d[now])
            later = unsure & ~now
            # compact: row as int32, distance in the block's dtype (float64 again when used)
            unsure_rows.append(rows[later].astype(np.int32))
            unsure_cols.append(gcols[later].astype(col_dtype))
            unsure_d.append(dk[later])
            del rows, gcols, dk, d, b, e, sure, unsure, now, later
        del dist
        bar.update(stop - start)
    bar.close()

    worst = np.abs(exact - est) - (eps_pair / 2.0)
    if not (worst <= 0).all():
        i = int(np.argmax(worst))
        raise ReidExportError(f"streamed evaluation: a positive distance {exact[i]!r} is farther from its "
                              f"estimate {est[i]!r} than the bound {eps_pair[i] / 2!r}; the features "
                              "may hold NaN/Inf or huge values")
    # The items held back: every positive is exact now.
    ur = np.concatenate(unsure_rows).astype(np.intp)
    if ur.size:
        uc, ud = np.concatenate(unsure_cols).astype(np.int64), np.concatenate(unsure_d)
        del unsure_cols, unsure_d
        _place_near_positives(hist, p_max, ex_d, ex_i, ur, uc, ud)
    hist = hist.reshape(nv, p_max + 1)

    ranks = np.cumsum(hist[:, :p_max], axis=1) + np.arange(1, p_max + 1)[None, :]
    ranks[np.arange(p_max)[None, :] >= n_pos[:, None]] = 0
    hits = np.arange(1, p_max + 1, dtype=np.float64)[None, :]
    prec = np.divide(hits, ranks, out=np.zeros(ranks.shape), where=ranks > 0)
    ap = prec.sum(axis=1) / n_pos
    inp = n_pos / ranks[np.arange(nv), n_pos - 1]
    first_rank = ranks[:, 0]
    counts = np.bincount(np.minimum(first_rank, length + 1) - 1, minlength=length + 1)[:length]
    out = {} if not return_ranks else {"ranks": ranks}
    return out | {
        "cmc": np.cumsum(counts) / float(nv),
        "mAP": float(ap.mean()),
        "mINP": float(inp.mean()),
        "all_AP": ap,
        "all_INP": inp,
        "num_valid_queries": int(nv),
        "valid_queries": valid,
        "kept_near_positives": n_unsure,
    }


def rank_metrics_streamed(source, q_pids, g_pids, q_camids, g_camids, **kwargs) -> dict:
    """:func:`rank_metrics` (percent) from :func:`evaluate_rank_streamed`."""
    res = evaluate_rank_streamed(source, q_pids, g_pids, q_camids, g_camids, max_rank=10, **kwargs)
    cmc = res["cmc"]
    out = {f"Rank-{k}": float(cmc[min(k, cmc.size) - 1] * 100.0) for k in (1, 5, 10)}
    out["mAP"] = res["mAP"] * 100.0
    out["mINP"] = res["mINP"] * 100.0
    out["num_valid_queries"] = res["num_valid_queries"]
    return out
