"""One model's retrieval scores: Market-1501-protocol evaluation of any Encoder, features -> distances ->
Rank-k/mAP/mINP/ROC, the cosine-distance thresholds at a few false-match rates (for trackers) and the
collapse check. Several models side by side, with deltas and gates: :mod:`.evaluation`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from ..data.market import MarketDataset, ReidItem
from ..errors import ReidExportError
from ..preprocess import skipped_summary
from . import metrics
from .collapse import collapse_of
from .rerank import average_query_expansion, k_reciprocal_rerank
from .thresholds import cosine_thresholds

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

    def subset(self, indices: list[int]) -> "SplitArrays":
        return SplitArrays([self.paths[i] for i in indices], self.pids[indices], self.camids[indices])

    @classmethod
    def of(cls, items: list[ReidItem]) -> "SplitArrays":
        return cls([it.path for it in items], np.array([it.pid for it in items]),
                   np.array([it.camid for it in items]))


@dataclass
class EvalResult:
    """One model scored on one dataset: its metrics (percent), or why it could not be scored.

    ``distmat``, ``query``, ``gallery`` and ``features`` are the arrays behind the metrics (for the
    ROC and rank-list pictures); a streamed evaluation, which never holds the matrix, leaves them None.
    """

    metrics: dict = field(default_factory=dict)
    error: str | None = None
    nonfinite: int = 0
    skipped: list = field(default_factory=list)       # the UnreadableImage of each image left out
    distmat: np.ndarray | None = None
    query: SplitArrays | None = None
    gallery: SplitArrays | None = None
    features: tuple | None = None                     # (query, gallery) features, not copied

    @property
    def ok(self) -> bool:
        return self.error is None

    def row(self) -> dict:
        """The JSON-able part: metrics, or the error and the NaN/Inf count; the skipped images."""
        out = dict(self.metrics) if self.ok else {"error": self.error, "nonfinite": self.nonfinite}
        if self.skipped:
            out["skipped"] = skipped_summary(self.skipped)
            out["skipped_images"] = [str(e.path) for e in self.skipped]
        return out


def distances(qf: np.ndarray, gf: np.ndarray, options: EvalOptions) -> np.ndarray:
    """Query x gallery distances after the optional AQE and re-ranking."""
    if not (np.isfinite(qf).all() and np.isfinite(gf).all()):
        bad = int((~np.isfinite(qf)).sum() + (~np.isfinite(gf)).sum())
        raise ReidExportError(f"the model output {bad} NaN/Inf feature values; its results would be meaningless")
    if options.aqe:
        qf, gf = average_query_expansion(qf, gf, options.qe_times, options.qe_k, options.alpha)
    if options.rerank:
        return k_reciprocal_rerank(qf, gf, options.k1, options.k2, options.lambda_value, options.metric)
    return metrics.compute_distance(qf, gf, options.metric)


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


def check_queries_have_matches(dataset: MarketDataset) -> None:
    """Fail before any model runs when no query has a valid match (same person, another camera)."""
    gallery = {(it.pid, it.camid) for it in dataset.gallery}
    cams_by_pid: dict[int, set[int]] = {}
    for pid, camid in gallery:
        cams_by_pid.setdefault(pid, set()).add(camid)
    if not any(cams_by_pid.get(q.pid, set()) - {q.camid} for q in dataset.query):
        raise ReidExportError(
            f"{dataset.root}: none of the {len(dataset.query)} queries has a gallery image of the same person "
            "from another camera (the Market-1501 protocol ignores same-camera matches); check the pids and "
            "camera ids in the file names (PPPP_cC...)")


def evaluate_encoder(encoder, dataset: MarketDataset, options: EvalOptions, progress: bool = True,
                     on_error: str = "raise") -> EvalResult:
    """Encode query and gallery with ``encoder`` and score them (metrics plus the arrays behind them).

    With ``on_error="skip"`` unreadable images are left out of their split (``result.skipped``) and
    the rest is scored. A model that outputs NaN/Inf gets ``result.error``, not metrics.
    """
    query, gallery = SplitArrays.of(dataset.query), SplitArrays.of(dataset.gallery)
    qe = encoder.encode_paths(query.paths, options.batch_size, options.flip_test, progress,
                              desc=f"query ({encoder.backend})", on_error=on_error)
    ge = encoder.encode_paths(gallery.paths, options.batch_size, options.flip_test, progress,
                              desc=f"gallery ({encoder.backend})", on_error=on_error)
    query, gallery = query.subset(qe.kept), gallery.subset(ge.kept)
    qf, gf, skipped = qe.features, ge.features, qe.skipped + ge.skipped
    nonfinite = int((~np.isfinite(qf)).sum() + (~np.isfinite(gf)).sum())
    if nonfinite:
        return EvalResult(error=f"{nonfinite} NaN/Inf values in the features", nonfinite=nonfinite, skipped=skipped)
    distmat = distances(qf, gf, options)
    scores = score(distmat, query, gallery)
    plain_cosine = options.metric == "cosine" and not (options.rerank or options.aqe)
    scores["thresholds"] = cosine_thresholds(qf, gf, query, gallery, distmat=distmat if plain_cosine else None)
    scores["collapse"] = collapse_dict(np.concatenate([qf, gf]))
    return EvalResult(metrics=scores, skipped=skipped, distmat=distmat, query=query,
                      gallery=gallery, features=(qf, gf))


def collapse_dict(features: np.ndarray) -> dict | None:
    """The collapse check of an evaluation's features (query and gallery), as JSON."""
    stats = collapse_of(features)
    return stats.to_dict() if stats else None


def options_dict(options: EvalOptions) -> dict:
    return asdict(options)
