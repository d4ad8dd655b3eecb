"""Market-1501-protocol evaluation of any Encoder: features -> distances -> Rank-k/mAP/mINP/ROC."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ..data.market import MarketDataset, ReidItem
from ..errors import ReidExportError
from . import metrics
from .rerank import average_query_expansion, k_reciprocal_rerank

METRIC_KEYS = ("Rank-1", "Rank-5", "Rank-10", "mAP", "mINP")
FPRS = (1e-4, 1e-3, 1e-2)


@dataclass
class EvalOptions:
    flip_test: bool = False
    metric: str = "cosine"
    rerank: bool = False
    k1: int = 20
    k2: int = 6
    lambda_value: float = 0.3
    aqe: bool = False
    qe_times: int = 1
    qe_k: int = 5
    alpha: float = 3.0
    batch_size: int = 32


@dataclass
class SplitArrays:
    paths: list[str]
    pids: np.ndarray
    camids: np.ndarray

    @classmethod
    def of(cls, items: list[ReidItem]) -> "SplitArrays":
        return cls([it.path for it in items], np.array([it.pid for it in items]),
                   np.array([it.camid for it in items]))


def distances(qf: np.ndarray, gf: np.ndarray, opts: EvalOptions) -> np.ndarray:
    """Query x gallery distances after the optional AQE and re-ranking."""
    if not (np.isfinite(qf).all() and np.isfinite(gf).all()):
        bad = int((~np.isfinite(qf)).sum() + (~np.isfinite(gf)).sum())
        raise ReidExportError(f"the model output {bad} NaN/Inf feature values; its results would be meaningless")
    if opts.aqe:
        qf, gf = average_query_expansion(qf, gf, opts.qe_times, opts.qe_k, opts.alpha)
    if opts.rerank:
        return k_reciprocal_rerank(qf, gf, opts.k1, opts.k2, opts.lambda_value, opts.metric)
    return metrics.compute_distance(qf, gf, opts.metric)


def score(distmat: np.ndarray, query: SplitArrays, gallery: SplitArrays) -> dict:
    """Rank-1/5/10, mAP, mINP and TPR@FPR (percent) of a distance matrix."""
    result = metrics.rank_metrics(distmat, query.pids, gallery.pids, query.camids, gallery.camids)
    result.update(metrics.roc_tpr_at_fpr(distmat, query.pids, gallery.pids, query.camids, gallery.camids, FPRS))
    return result


def per_query_ap(distmat: np.ndarray, query: SplitArrays, gallery: SplitArrays) -> np.ndarray:
    """AP of each query (NaN where the query has no valid match), for choosing rank lists to show."""
    res = metrics.evaluate_rank(distmat, query.pids, gallery.pids, query.camids, gallery.camids)
    out = np.full(distmat.shape[0], np.nan)
    out[res["valid_queries"]] = res["all_AP"]
    return out


def evaluate_encoder(encoder, dataset: MarketDataset, opts: EvalOptions, progress: bool = True) -> dict:
    """Encode query and gallery with ``encoder`` and score them; returns metrics plus the raw arrays."""
    query, gallery = SplitArrays.of(dataset.query), SplitArrays.of(dataset.gallery)
    qf = encoder.encode_files(query.paths, opts.batch_size, opts.flip_test, progress, desc=f"query ({encoder.backend})")
    gf = encoder.encode_files(gallery.paths, opts.batch_size, opts.flip_test, progress,
                              desc=f"gallery ({encoder.backend})")
    nonfinite = int((~np.isfinite(qf)).sum() + (~np.isfinite(gf)).sum())
    if nonfinite:
        return {"error": f"{nonfinite} NaN/Inf values in the features", "nonfinite": nonfinite}
    distmat = distances(qf, gf, opts)
    result = score(distmat, query, gallery)
    result["_distmat"] = distmat
    result["_query"] = query
    result["_gallery"] = gallery
    return result


def options_dict(opts: EvalOptions) -> dict:
    return asdict(opts)
