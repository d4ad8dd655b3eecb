"""Evaluation of large galleries without a [Q, G] matrix: extract outputs, distractor folders.

``eval --query-features Q.npy --gallery-features G.npy`` and ``eval MODEL --distractors DIR``
come here.  Pids and cameras come from the file names (Market-1501 ``PPPP_cC...``); junk
(pid -1) is dropped; distractor images count as pid 0, camera from the name when it has one.
The metrics are :func:`metrics.evaluate_rank_streamed`'s (the same numbers as the full-matrix
path) with memory bounded by ``chunk_elements``.
"""

from __future__ import annotations

import resource
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from ..data.market import parse_name
from ..errors import ReidExportError, UsageError
from ..preprocess import expand_image_paths
from . import metrics
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
                                      "are unknown; rename the files, or pass them as --distractors (images) or "
                                      "--distractor-features (extract outputs)")
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
    source = metrics.FeatureDistances(qf, gallery, metric)
    res = metrics.evaluate_rank_streamed(source, q_pids, g_pids, q_cams, g_cams, max_rank=10,
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
        raise UsageError("--rerank/--aqe are not available with --distractors or feature files yet; "
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
