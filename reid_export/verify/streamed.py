"""Evaluation of large galleries without a [Q, G] matrix: extract outputs, distractor folders.

``eval --query-features Q.npy --gallery-features G.npy`` and ``eval MODEL --distractors DIR``
come here.  Pids and cameras come from the file names (Market-1501 ``PPPP_cC...``); junk
(pid -1) is dropped; distractor images count as pid 0, camera from the name when it has one.
The metrics are :func:`evaluate_rank_streamed`'s (the same numbers as the full-matrix path of
:mod:`.metrics`) with memory bounded by ``chunk_elements``: the streamed metrics and their distance
sources (:class:`MatrixDistances`, :class:`FeatureDistances`) live here with the I/O.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..data.market import parse_name
from ..errors import ReidExportError, UsageError
from ..preprocess import expand_image_paths
from ..embeddings import l2_normalize
from .metrics import QueryGroups, check_no_nan, in_percent
from .retrieval import EvalResult, SplitArrays, collapse_dict
from .npy_rows import NpyRows
from .thresholds import cosine_thresholds


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux: KiB from getrusage)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class ConcatRows:
    """Several [N_i, D] arrays (memmaps, :class:`NpyRows`) read as one, without a copy."""

    def __init__(self, arrays: Sequence[np.ndarray]):
        self.arrays = list(arrays)
        dims = {a.shape[1] for a in self.arrays}
        if len(dims) != 1:
            raise ReidExportError(f"gallery feature files have different dimensions {sorted(dims)}")
        self.starts = np.cumsum([0] + [a.shape[0] for a in self.arrays])
        self.shape = (int(self.starts[-1]), dims.pop())
        self.dtype = np.result_type(*[a.dtype for a in self.arrays])

    def __getitem__(self, index) -> np.ndarray:
        if isinstance(index, slice):
            index = np.arange(*index.indices(self.shape[0]))
        index = np.asarray(index)
        out = np.empty((index.size, self.shape[1]), dtype=self.dtype)
        which = np.searchsorted(self.starts, index, side="right") - 1
        for j in np.unique(which):
            sel = which == j
            local = index[sel] - self.starts[j]
            if local.size and np.all(np.diff(local) == 1):
                out[sel] = self.arrays[j][local[0]:local[-1] + 1]
            else:
                out[sel] = self.arrays[j][local]
        return out


class RowSubset:
    """Rows ``rows`` (ascending) of an [N, D] array or :class:`NpyRows` (nothing is copied up front)."""

    def __init__(self, array, rows: np.ndarray):
        self.array, self.rows = array, np.asarray(rows)
        self.shape = (int(self.rows.size), array.shape[1])
        self.dtype = array.dtype

    def __getitem__(self, index) -> np.ndarray:
        return np.asarray(self.array[self.rows[index]])


def labels_from_names(files: Sequence[str], what: str, distractor: bool = False):
    """(pids, camids, keep mask) from Market-style names; distractors: pid 0, camera from the name or -1."""
    pids = np.empty(len(files), dtype=np.int64)
    cams = np.empty(len(files), dtype=np.int64)
    for i, f in enumerate(files):
        parsed = parse_name(Path(f).name)
        if parsed is None:
            if not distractor:
                raise ReidExportError(f"{what}: {f} is not named PPPP_cC... (Market-1501): its person and camera "
                                      "are unknown; rename the files, or pass them as `distractors` (images) or "
                                      "`distractor_features` (extract outputs)")
            pids[i], cams[i] = 0, -1
        else:
            pids[i], cams[i] = (0, parsed[1]) if distractor else parsed
    return pids, cams, pids != -1


def evaluate_streamed(qf, q_pids, q_cams, gallery, g_pids, g_cams, metric: str = "cosine",
                      chunk_elements: int = 1 << 25, progress: bool = True) -> dict:
    """Rank-1/5/10, mAP, mINP (percent) plus ``seconds`` and ``peak_rss_mib``."""
    if not (np.isfinite(qf).all()):
        raise ReidExportError("the query features hold NaN/Inf values; their results would be meaningless")
    start = time.perf_counter()
    source = FeatureDistances(qf, gallery, metric)
    res = evaluate_rank_streamed(source, q_pids, g_pids, q_cams, g_cams, max_rank=10,
                                         chunk_elements=chunk_elements, progress=progress)
    cmc = res["cmc"]
    out = {f"Rank-{k}": float(cmc[min(k, cmc.size) - 1] * 100.0) for k in (1, 5, 10)}
    out.update({"mAP": res["mAP"] * 100.0, "mINP": res["mINP"] * 100.0,
                "num_valid_queries": res["num_valid_queries"], "num_query": int(qf.shape[0]),
                "num_gallery": int(gallery.shape[0]), "seconds": round(time.perf_counter() - start, 3),
                "peak_rss_mib": round(peak_rss_mib(), 1), "chunk_elements": chunk_elements, "streamed": True,
                "kept_near_positives": res["kept_near_positives"]})
    return out


def evaluate_feature_files(query_npy: Path, gallery_npys: Sequence[Path], metric: str = "cosine",
                           chunk_elements: int = 1 << 25, progress: bool = True,
                           distractor_npys: Sequence[Path] = ()) -> dict:
    """``eval --query-features Q.npy --gallery-features G.npy [--distractor-features D.npy]`` (extract
    outputs, memory-mapped; distractor rows are pid 0 whatever their names)."""
    from ..index import load_feature_set

    qf, qmeta = load_feature_set(query_npy)
    q_pids, q_cams, q_keep = labels_from_names(qmeta.pop("files"), str(query_npy))
    qf = np.asarray(qf)[q_keep]
    arrays, pids, cams = [], [], []
    for npy, is_distractor in [(p, False) for p in gallery_npys] + [(p, True) for p in distractor_npys]:
        gf, gmeta = load_feature_set(npy)
        if gmeta.get("data_config") != qmeta.get("data_config") or gmeta.get("model") != qmeta.get("model"):
            raise ReidExportError(f"{npy}: made by another model or data config than {query_npy} (see the .json "
                                  "files); extract both with the same model")
        # the names become two int64 arrays; the list of strings (~100 bytes a name) goes now
        p, c, keep = labels_from_names(gmeta.pop("files"), str(npy), distractor=is_distractor)
        del gmeta
        # read by file reads, not through the map: touched pages of a map stay in the process's RSS
        gf = NpyRows.of(gf)
        if not keep.all():
            gf = RowSubset(gf, np.flatnonzero(keep))  # junk (pid -1) left out
        arrays.append(gf)
        pids.append(p[keep])
        cams.append(c[keep])
    gallery = arrays[0] if len(arrays) == 1 else ConcatRows(arrays)
    res = evaluate_streamed(qf, q_pids[q_keep], q_cams[q_keep], gallery, np.concatenate(pids),
                            np.concatenate(cams), metric, chunk_elements, progress)
    res.update({"query_features": str(query_npy), "gallery_features": [str(p) for p in gallery_npys],
                "distractor_features": [str(p) for p in distractor_npys],
                "model": qmeta.get("model"), "backend": qmeta.get("backend"), "precision": qmeta.get("precision")})
    return res


def evaluate_encoder_streamed(encoder, dataset, distractors: Sequence[Path], options, progress: bool = True,
                              on_error: str = "raise", chunk_elements: int = 1 << 25) -> EvalResult:
    """``eval MODEL --dataset-root D --distractors DIR...``: query and gallery of D plus distractor images."""
    if options.rerank or options.aqe:
        raise UsageError("`options.rerank`/`options.aqe` are not available with `distractors` or feature files yet; "
                         "evaluate without them")
    query, gallery = SplitArrays.of(dataset.query), SplitArrays.of(dataset.gallery)
    d_paths = [str(p) for p in expand_image_paths(distractors)] if distractors else []
    feats, skipped = {}, []
    for name, paths in (("query", query.paths), ("gallery", gallery.paths), ("distractors", d_paths)):
        if not paths:
            continue
        enc = encoder.encode_paths(paths, options.batch_size, options.flip_test, progress,
                                   desc=f"{name} ({encoder.backend})", on_error=on_error)
        skipped += enc.skipped
        if enc.skipped:
            if name == "query":
                query = query.subset(enc.kept)
            elif name == "gallery":
                gallery = gallery.subset(enc.kept)
            else:
                d_paths = [d_paths[i] for i in enc.kept]
        feats[name] = enc.features
    d_pids, d_cams, _ = labels_from_names(d_paths, "distractors", distractor=True)
    parts = [feats["gallery"]] + ([feats["distractors"]] if d_paths else [])
    g = ConcatRows(parts) if len(parts) > 1 else parts[0]
    res = evaluate_streamed(feats["query"], query.pids, query.camids, g,
                            np.concatenate([gallery.pids, d_pids]), np.concatenate([gallery.camids, d_cams]),
                            options.metric, chunk_elements, progress)
    res["num_distractors"] = len(d_paths)
    # tracker thresholds and the collapse check on the dataset's own query x gallery pairs (the
    # distractors have no identity to pair with)
    res["thresholds"] = cosine_thresholds(feats["query"], feats["gallery"], query, gallery)
    res["collapse"] = collapse_dict(np.concatenate([feats["query"], feats["gallery"]]))
    return EvalResult(metrics=res, skipped=skipped)


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
    """:func:`~reid_export.verify.metrics.evaluate_rank` over a distance ``source`` read in gallery chunks.

    ``source``: :class:`MatrixDistances` or :class:`FeatureDistances` (or anything with
    ``shape``, ``select_queries``, ``block`` and ``pairs``).  Temporary memory is about
    ``chunk_elements`` x (dtype size + 3) bytes at most (a [valid queries, chunk] block, and the
    items of it that rank before a positive, handled in bands of ``chunk_elements / KEPT_FRACTION``)
    plus the items near a positive held until all of their query's positives are read (12 bytes
    each; none once the blocks holding the positives are done), whatever the gallery size; the
    result has the same keys and values as ``evaluate_rank`` (AP may differ in the last bit: the sum
    runs over another padding), plus ``kept_near_positives`` and, with ``return_ranks``, ``ranks``:
    the 1-based rank of every positive of each valid query, ascending, padded with 0 ([valid
    queries, most positives]).
    """
    from tqdm import tqdm

    num_q, num_g = source.shape
    groups, valid = _streamed_queries(source, q_pids, g_pids, q_camids, g_camids, max_rank)
    src = source.select_queries(valid)
    positives = _Positives.of(src, groups, valid)
    state = _Pass(positives, num_g, chunk_elements)
    bar = tqdm(total=num_g, desc=desc, unit="img", unit_scale=True, disable=not progress, leave=False)
    for start in range(0, num_g, state.step):
        stop = min(num_g, start + state.step)
        state.absorb(src.block(start, stop), start, stop, groups)
        bar.update(stop - start)
    bar.close()
    ranks = state.ranks()
    return _metrics_of_ranks(ranks, positives.n_pos, min(max_rank, num_g), valid, state.n_unsure, return_ranks)


def _streamed_queries(source, q_pids, g_pids, q_camids, g_camids, max_rank: int):
    """The pid/camera groups and the valid queries (those with a positive), after checking the inputs."""
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
    groups = QueryGroups(q_pids, g_pids, q_camids, g_camids)
    valid = np.flatnonzero(groups.n_pos > 0)
    if valid.size == 0:
        raise ReidExportError("no query has a matching gallery image from another camera: "
                              "check the dataset's pids/camera ids")
    return groups, valid


@dataclass
class _Positives:
    """Every valid query's positives (row = valid-query index; gallery index ascending within a row):
    their estimated distances and error bounds, the sorted estimates per row and the distance beyond
    which an item follows every positive."""

    n_pos: np.ndarray
    p_max: int
    q_pid: np.ndarray
    prow: np.ndarray
    pcol: np.ndarray
    slot: np.ndarray         # a positive's place within its row
    est: np.ndarray
    eps_pair: np.ndarray
    eps_row: np.ndarray
    ext: np.ndarray          # sorted estimates per row in [:, 1:n_pos + 1]; -inf before, +inf after
    bound: np.ndarray
    by_col: np.ndarray
    pcol_sorted: np.ndarray

    @classmethod
    def of(cls, src, groups: QueryGroups, valid: np.ndarray) -> "_Positives":
        nv = valid.size
        n_pos = groups.n_pos[valid]
        p_max = int(n_pos.max())
        q_cam = groups.q_cam[valid]
        sp_rows, sp_cols = groups.same_pid_pairs(valid)
        is_pos = groups.g_cam[sp_cols] != q_cam[sp_rows]
        prow, pcol = sp_rows[is_pos], sp_cols[is_pos]
        est, eps_pair = src.pairs(prow, pcol)
        eps_row = np.zeros(nv)
        with np.errstate(invalid="ignore"):  # NaN features: the block check names them
            np.maximum.at(eps_row, prow, eps_pair)
        pstart = np.concatenate([[0], np.cumsum(n_pos)])
        slot = np.arange(prow.size) - pstart[prow]
        ext = np.full((nv, p_max + 2), np.inf)
        ext[:, 0] = -np.inf
        tmp = np.full((nv, p_max), np.inf)
        tmp[prow, slot] = est
        ext[:, 1:p_max + 1] = np.sort(tmp, axis=1)
        bound = ext[np.arange(nv), n_pos] + eps_row
        by_col = np.argsort(pcol, kind="stable")
        return cls(n_pos, p_max, groups.q_pid[valid], prow, pcol, slot, est, eps_pair, eps_row, ext, bound, by_col,
                   pcol[by_col])


class _Pass:
    """The one pass over the gallery blocks: per valid query the histogram "how many positives come
    before each item" of the items surely placed, the exact positive distances as the blocks give them
    (per [row, slot], padding +inf and num_g), and the items near a positive, placed as soon as all of
    their row's positives are known (at the end otherwise), so few are held whatever the gallery size."""

    def __init__(self, pos: _Positives, num_g: int, chunk_elements: int):
        nv, p_max = pos.n_pos.size, pos.p_max
        self.pos, self.num_g = pos, num_g
        self.exact = np.full(pos.prow.size, np.nan)
        self.ex_d = np.full((nv, p_max), np.inf)
        self.ex_i = np.full((nv, p_max), num_g, dtype=np.int64)
        self.known = np.zeros(nv, dtype=np.int64)
        self.hist = np.zeros(nv * (p_max + 1), dtype=np.int64)
        self.unsure_rows, self.unsure_cols, self.unsure_d = [], [], []
        self.n_unsure = 0
        self.step = max(1, min(num_g, chunk_elements // max(nv, 1)))
        # kept items of a block are handled in bands of rows of about this many distances
        self.kept_elements = max(1, chunk_elements // KEPT_FRACTION)
        self.sub = max(1, (1 << 22) // (p_max + 1))
        self.col_dtype = np.int32 if num_g < np.iinfo(np.int32).max else np.int64

    def absorb(self, dist: np.ndarray, start: int, stop: int, groups: QueryGroups) -> None:
        """Take the block of distances to gallery items ``start:stop``."""
        pos = self.pos
        nv = pos.n_pos.size
        check_no_nan(dist)
        lo, hi = np.searchsorted(pos.pcol_sorted, [start, stop])
        k = pos.by_col[lo:hi]
        self.exact[k] = dist[pos.prow[k], pos.pcol[k] - start]
        self.ex_d[pos.prow[k], pos.slot[k]] = self.exact[k]
        self.ex_i[pos.prow[k], pos.slot[k]] = pos.pcol[k]
        self.known += np.bincount(pos.prow[k], minlength=nv)
        ready = self.known == pos.n_pos
        # Rounded up, so no item <= bound is left out (one more kept item is harmless).
        limit = np.nextafter(pos.bound.astype(dist.dtype), np.array(np.inf, dtype=dist.dtype))
        # The kept items in bands of rows: a band's temporaries (mask, indices, float64 copies:
        # ~100 bytes per kept item) stay bounded when most of the block is kept (positives that
        # rank deep keep their rows whole).
        band = max(1, self.kept_elements // (stop - start))
        for r0 in range(0, nv, band):
            r1 = min(nv, r0 + band)
            rows, cols = np.nonzero(dist[r0:r1] <= limit[r0:r1, None])
            rows += r0
            gcols = cols + start
            del cols
            keep = groups.g_pid[gcols] != pos.q_pid[rows]
            self._bucket(rows[keep], gcols[keep], dist, start, ready)

    def _bucket(self, rows, gcols, dist, start: int, ready) -> None:
        """Count the items surely placed; place or hold the ones within ``eps`` of a positive estimate."""
        pos, p_max = self.pos, self.pos.p_max
        dk = dist[rows, gcols - start]
        d = dk.astype(np.float64)
        # Bucket: the number of estimates below d (padding is +inf), in bounded sub-batches.
        b = np.empty(rows.size, dtype=np.int64)
        for s0 in range(0, rows.size, self.sub):
            r, dd = rows[s0:s0 + self.sub], d[s0:s0 + self.sub]
            b[s0:s0 + self.sub] = (pos.ext[r, 1:p_max + 1] < dd[:, None]).sum(axis=1)
        e = pos.eps_row[rows]
        sure = ((d - pos.ext[rows, b]) > e) & ((pos.ext[rows, b + 1] - d) > e)
        self.hist += np.bincount(rows[sure] * (p_max + 1) + b[sure], minlength=self.hist.size)
        unsure = ~sure
        self.n_unsure += int(unsure.sum())
        now = unsure & ready[rows]
        _place_near_positives(self.hist, p_max, self.ex_d, self.ex_i, rows[now], gcols[now], d[now])
        later = unsure & ~now
        # compact: row as int32, distance in the block's dtype (float64 again when used)
        self.unsure_rows.append(rows[later].astype(np.int32))
        self.unsure_cols.append(gcols[later].astype(self.col_dtype))
        self.unsure_d.append(dk[later])

    def ranks(self) -> np.ndarray:
        """After the last block: check every estimate, place the items held back, and return the 1-based
        rank of every positive of each row, ascending, padded with 0."""
        pos, p_max, nv = self.pos, self.pos.p_max, self.pos.n_pos.size
        worst = np.abs(self.exact - pos.est) - (pos.eps_pair / 2.0)
        if not (worst <= 0).all():
            i = int(np.argmax(worst))
            raise ReidExportError(f"streamed evaluation: a positive distance {self.exact[i]!r} is farther from its "
                                  f"estimate {pos.est[i]!r} than the bound {pos.eps_pair[i] / 2!r}; the features "
                                  "may hold NaN/Inf or huge values")
        ur = np.concatenate(self.unsure_rows).astype(np.intp)
        if ur.size:  # every positive is exact now
            uc, ud = np.concatenate(self.unsure_cols).astype(np.int64), np.concatenate(self.unsure_d)
            self.unsure_cols, self.unsure_d = [], []
            _place_near_positives(self.hist, p_max, self.ex_d, self.ex_i, ur, uc, ud)
        hist = self.hist.reshape(nv, p_max + 1)
        ranks = np.cumsum(hist[:, :p_max], axis=1) + np.arange(1, p_max + 1)[None, :]
        ranks[np.arange(p_max)[None, :] >= pos.n_pos[:, None]] = 0
        return ranks


def _metrics_of_ranks(ranks: np.ndarray, n_pos: np.ndarray, length: int, valid: np.ndarray, n_unsure: int,
                      return_ranks: bool) -> dict:
    """CMC, mAP, mINP (as ``evaluate_rank`` gives them) from the ranks of every positive."""
    nv, p_max = ranks.shape
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
    return in_percent(evaluate_rank_streamed(source, q_pids, g_pids, q_camids, g_camids, max_rank=10, **kwargs))
