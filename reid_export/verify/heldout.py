"""Retrieval on identities the quantizer never saw: FP32 against a reduced-precision graph, paired.

``reid-export quantize`` holds whole identities out of calibration when the calibration folders carry
Market-1501 names (``0001_c1...``): the usual case, users calibrate on their training folder. Beside
the label-free fidelity of the gate it then scores both graphs' Rank-1 and mAP on those identities
(the Market-1501 protocol; per identity and camera the first image a query, the rest the gallery)
with the paired bootstrap interval of the difference, as ``eval`` does.
"""

from __future__ import annotations

import numpy as np

from . import metrics
from .retrieval import SplitArrays
from .evaluation import paired_interval, per_query_scores


def score_held_out(reference: np.ndarray, candidate: np.ndarray, pids: np.ndarray, camids: np.ndarray,
                   is_query: np.ndarray) -> dict:
    """Rank-1/mAP of ``reference`` and ``candidate`` features of the same images (``is_query`` marks the
    queries, the rest is the gallery) and the candidate's paired differences with 95% intervals."""
    pids, camids, is_query = np.asarray(pids), np.asarray(camids), np.asarray(is_query, bool)
    q, g = np.where(is_query)[0], np.where(~is_query)[0]
    query = SplitArrays([str(i) for i in q], pids[q], camids[q])
    gallery = SplitArrays([str(i) for i in g], pids[g], camids[g])
    scores = []
    for feats in (reference, candidate):
        feats = np.asarray(feats, dtype=np.float32)
        scores.append(per_query_scores(metrics.compute_distance(feats[q], feats[g]), query, gallery))
    (ref_ap, ref_hit), (cand_ap, cand_hit) = scores
    valid = np.isfinite(ref_ap)

    def mean(x):
        return float(np.mean(x[valid])) if valid.any() else float("nan")

    out = {"identities": int(len(np.unique(pids))), "queries": int(valid.sum()), "gallery": int(len(g)),
           "reference": {"Rank-1": mean(ref_hit), "mAP": mean(ref_ap)},
           "candidate": {"Rank-1": mean(cand_hit), "mAP": mean(cand_ap)}}
    out["delta_Rank-1"] = out["candidate"]["Rank-1"] - out["reference"]["Rank-1"]
    out["delta_mAP"] = out["candidate"]["mAP"] - out["reference"]["mAP"]
    out["delta_Rank-1_ci95"] = list(paired_interval(ref_hit, cand_hit))
    out["delta_mAP_ci95"] = list(paired_interval(ref_ap, cand_ap))
    return out

