"""Distance thresholds for trackers: the cosine distance at a chosen false-match rate.

DeepSORT-family trackers associate a detection with a track when the cosine distance of their
embeddings is below a threshold (BoxMOT's StrongSORT ``max_cos_dist``, BoT-SORT's
``appearance_thresh``; DeepStream's NvDeepSORT takes the similarity ``1 - distance`` as
``minMatchingScore4ReidSimilarity``). An FP16/INT8 variant or another preprocessing moves the
distance distributions, so a threshold tuned for one model does not carry over to another at
the same false-match rate. ``eval`` reports, per model and deployment, the distance at a few
FMRs (:data:`DEFAULT_FMRS`) and its shift against the first model; :func:`reference_threshold`
gives one model's distance at one FMR for the hand-offs to write into a tracker's config.

Distance: ``1 - cos`` of the L2-normalised features (what the trackers compute), whatever metric,
re-ranking or query expansion the evaluation uses for its ranking metrics. Pairs: the eval set's
query x gallery pairs under the Market-1501 protocol (junk dropped, same identity AND same camera
left out; positive = same identity); see :func:`reid_export.verify.metrics.fmr_thresholds`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import ReidExportError
from . import metrics

DEFAULT_FMRS = (1e-1, 1e-2, 1e-3)


def cosine_thresholds(qf: np.ndarray, gf: np.ndarray, query, gallery, fmrs=DEFAULT_FMRS,
                      distmat: np.ndarray | None = None) -> dict:
    """:func:`metrics.fmr_thresholds` on the cosine distances of query x gallery features
    (``distmat`` when the caller already holds exactly those)."""
    if distmat is None:
        distmat = metrics.compute_distance(qf, gf, "cosine")
    return metrics.fmr_thresholds(distmat, query.pids, gallery.pids, query.camids, gallery.camids, fmrs)


def threshold_shifts(row: dict, reference: dict) -> None:
    """Add to each of ``row["thresholds"]``'s points the shift of its distance against the same FMR
    of ``reference`` (another row), where both are resolved."""
    ref = {p["fmr"]: p["distance"] for p in reference.get("thresholds", {}).get("points", [])}
    for point in row.get("thresholds", {}).get("points", []):
        base = ref.get(point["fmr"])
        point["shift"] = (point["distance"] - base) if point["distance"] is not None and base is not None else None


@dataclass
class TrackerThreshold:
    """One model's cosine-distance threshold at one false-match rate on one eval set."""

    model: str
    dataset: str
    fmr: float
    distance: float               # accept a pair whose cosine distance is below this
    tmr: float                    # percent of same-identity pairs accepted
    num_positive_pairs: int
    num_negative_pairs: int
    deployment: str | None = None  # the preprocessing the features were computed with (None: the model's own)

    @property
    def similarity(self) -> float:
        """``1 - distance``: the cosine similarity a pair must exceed (DeepStream's score)."""
        return 1.0 - self.distance

    def to_dict(self) -> dict:
        return {**asdict(self), "similarity": self.similarity}

    def describe(self) -> str:
        return (f"cosine distance {self.distance:.4f} (similarity {self.similarity:.4f}) at FMR {self.fmr:g}, "
                f"TMR {self.tmr:.1f}% on {self.dataset} ({self.num_negative_pairs} negative, "
                f"{self.num_positive_pairs} positive pairs)"
                + (f", {self.deployment} preprocessing" if self.deployment else ""))


def reference_threshold(model, dataset_root, fmr: float = 1e-2, *, deployment: str | None = None,
                        config=None, device: str = "cpu", batch_size: int = 32, flip_test: bool = False,
                        progress: bool = False) -> TrackerThreshold:
    """The cosine distance at false-match rate ``fmr`` of ``model`` (a path, or an open Encoder) on
    the Market-1501-layout ``dataset_root``, its features computed through ``deployment``'s
    preprocessing (``reid_export.deploy_preprocess``; None: the model's own).

    For the hand-offs (``deepstream``, ``boxmot``): the reference model's threshold is the one to
    write into the tracker's config. Raises :class:`ReidExportError` when the eval set has too few
    different-identity pairs to resolve ``fmr`` (fewer than ``1 / fmr``)."""
    from ..data.market import MarketDataset
    from ..runtime import open_encoder
    from .retrieval import SplitArrays, check_queries_have_matches
    from .parity import use_deployment

    if not 0.0 < fmr < 1.0:
        raise ReidExportError(f"the false-match rate must be between 0 and 1, got {fmr:g}", exit_code=2)
    dataset = MarketDataset(dataset_root)
    check_queries_have_matches(dataset)
    query, gallery = SplitArrays.of(dataset.query), SplitArrays.of(dataset.gallery)
    own = isinstance(model, (str, Path))
    enc = open_encoder(model, config=config, device=device) if own else model
    saved = enc.preprocessing
    try:
        use_deployment(enc, deployment)
        qf = enc.encode_files(query.paths, batch_size, flip_test, progress, desc="threshold: query")
        gf = enc.encode_files(gallery.paths, batch_size, flip_test, progress, desc="threshold: gallery")
    finally:
        enc.preprocessing = saved
        if own:
            enc.close()
    if not (np.isfinite(qf).all() and np.isfinite(gf).all()):
        raise ReidExportError(f"{model}: the model output NaN/Inf features on {dataset.root}; no threshold")
    res = cosine_thresholds(qf, gf, query, gallery, (fmr,))
    point = res["points"][0]
    if point["distance"] is None:
        raise ReidExportError(f"{dataset.root}: {point['note']}; give a larger eval set or a larger false-match "
                              "rate", exit_code=2)
    return TrackerThreshold(str(model if own else getattr(model, "path", model)), str(dataset.root), fmr,
                            point["distance"], point["tmr"], res["num_positive_pairs"], res["num_negative_pairs"],
                            deployment)
