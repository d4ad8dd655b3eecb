"""The embedding comparisons: L2 normalisation, relative L2, cosine, and parity of two feature sets.

A base module: the export self-checks, the quantizer's objective, ``parity``, the metrics and the
index all normalise and compare embeddings with these functions, and with no other copy.

Parity: does a candidate model compute the reference's features?

Per candidate: cosine similarity (min/mean), relative L2 error (max/mean), max abs error,
elementwise tolerance failures with Polygraphy's semantics (an element fails when it exceeds
both ``atol`` and ``rtol * |reference|``), NaN/Inf count, and retrieval agreement: whether each
image's nearest neighbours among the other images are the same under both models.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

# Default gates by candidate precision. FP32 is held to elementwise agreement; FP16 and INT8
# are judged on the embedding (direction and length), which is what retrieval uses.
DEFAULT_TOLERANCES = {
    "fp32": {"min_cosine": 0.99999, "max_rel_l2": 1e-4, "atol": 1e-4, "rtol": 1e-3},
    "fp16": {"min_cosine": 0.999, "max_rel_l2": 0.05, "atol": None, "rtol": None},
    # bf16 inference (OpenVINO on the CPU): 8 mantissa bits against FP16's 11, about 8x FP16's error
    "bf16": {"min_cosine": 0.995, "max_rel_l2": 0.1, "atol": None, "rtol": None},
    "int8": {"min_cosine": 0.98, "max_rel_l2": 0.2, "atol": None, "rtol": None},
}


@dataclass
class Tolerances:
    min_cosine: float | None = None
    max_rel_l2: float | None = None
    atol: float | None = None
    rtol: float | None = None
    min_top1_agreement: float | None = None

    @classmethod
    def for_precision(cls, precision: str, **overrides) -> "Tolerances":
        base = dict(DEFAULT_TOLERANCES.get(precision, DEFAULT_TOLERANCES["int8"]))
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)


@dataclass
class ParityResult:
    candidate: str
    backend: str
    precision: str
    num_images: int
    min_cosine: float
    mean_cosine: float
    max_rel_l2: float
    mean_rel_l2: float
    max_abs_error: float
    elementwise_failures: int | None
    nonfinite: int
    top1_agreement: float
    top5_agreement: float
    tolerances: dict
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        out = asdict(self)
        out["passed"] = self.passed
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in out.items()}


def l2_normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """``x`` scaled to unit L2 norm along ``axis``, in its own float dtype; a zero vector stays zero."""
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float64)
    norms = np.linalg.norm(x, axis=axis, keepdims=True)
    return x / np.maximum(norms, np.finfo(x.dtype).tiny)


def _row_norms(x: np.ndarray) -> np.ndarray:
    return np.linalg.norm(x.astype(np.float64), axis=1)


def relative_l2(candidate: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per-row ||candidate - reference|| / ||reference||, in float64."""
    candidate = np.asarray(candidate, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    return np.linalg.norm(candidate - reference, axis=1) / np.maximum(_row_norms(reference), 1e-12)


def neighbour_agreement(ref: np.ndarray, cand: np.ndarray, k: int = 5) -> tuple[float, float]:
    """(top-1 agreement, mean top-k overlap) of each image's nearest other images, by cosine."""
    n = ref.shape[0]
    if n < 2:
        return 1.0, 1.0
    k = min(k, n - 1)

    def ranks(x):
        x = l2_normalize(x.astype(np.float64), axis=1)
        sim = x @ x.T
        np.fill_diagonal(sim, -np.inf)
        return np.argsort(-sim, axis=1, kind="stable")[:, :k]

    if not (np.isfinite(ref).all() and np.isfinite(cand).all()):
        return 0.0, 0.0
    r, c = ranks(ref), ranks(cand)
    top1 = float(np.mean(r[:, 0] == c[:, 0]))
    topk = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(r, c)]))
    return top1, topk


def compare(reference: np.ndarray, candidate: np.ndarray, tol: Tolerances, name: str = "candidate",
            backend: str = "?", precision: str = "fp32") -> ParityResult:
    """Compare two [N, D] feature matrices of the same images."""
    if reference.shape != candidate.shape:
        return ParityResult(name, backend, precision, reference.shape[0], float("nan"), float("nan"),
                            float("inf"), float("inf"), float("inf"), None, 0, 0.0, 0.0, asdict(tol),
                            failures=[f"output shape {candidate.shape} differs from the reference's {reference.shape}"])
    ref = reference.astype(np.float64)
    cand = candidate.astype(np.float64)
    nonfinite = int((~np.isfinite(candidate)).sum())
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        diff = cand - ref
        ref_norm = _row_norms(ref)
        rel_l2 = relative_l2(cand, ref)
        cosine = np.sum(ref * cand, axis=1) / np.maximum(ref_norm * _row_norms(cand), 1e-12)
        absdiff = np.abs(diff)
        elementwise = None
        if tol.atol is not None and tol.rtol is not None:
            reldiff = absdiff / np.abs(ref)
            elementwise = int(np.sum((absdiff > tol.atol) & (reldiff > tol.rtol) | ~np.isfinite(absdiff)))
    top1, top5 = neighbour_agreement(reference, candidate)

    def stat(fn, values):
        values = values[np.isfinite(values)]
        return float(fn(values)) if values.size else float("nan")

    finite_rows = np.isfinite(rel_l2) & np.isfinite(cosine)
    min_cos = float(np.min(cosine)) if finite_rows.all() else float("nan")
    max_rel = float(np.max(rel_l2)) if finite_rows.all() else float("inf")
    result = ParityResult(
        candidate=name, backend=backend, precision=precision, num_images=int(ref.shape[0]),
        min_cosine=min_cos, mean_cosine=stat(np.mean, cosine),
        max_rel_l2=max_rel, mean_rel_l2=stat(np.mean, rel_l2),
        max_abs_error=float(np.max(absdiff)) if np.isfinite(absdiff).all() else float("inf"),
        elementwise_failures=elementwise, nonfinite=nonfinite, top1_agreement=top1, top5_agreement=top5,
        tolerances=asdict(tol),
    )
    f = result.failures
    if nonfinite:
        f.append(f"{nonfinite} NaN/Inf values in the output")
    if tol.min_cosine is not None and not (min_cos >= tol.min_cosine):
        f.append(f"min cosine {min_cos:.6g} < {tol.min_cosine:g}")
    if tol.max_rel_l2 is not None and not (max_rel <= tol.max_rel_l2):
        f.append(f"max relative L2 {max_rel:.3g} > {tol.max_rel_l2:g}")
    if elementwise:
        f.append(f"{elementwise} of {absdiff.size} elements exceed atol={tol.atol:g} and rtol={tol.rtol:g}")
    if tol.min_top1_agreement is not None and top1 < tol.min_top1_agreement:
        f.append(f"top-1 neighbour agreement {top1:.0%} < {tol.min_top1_agreement:.0%}")
    return result


def data_config_differences(ref_dc, cand_dc) -> list[str]:
    """Human-readable differences between two data configs (a likely cause of a parity failure)."""
    out = []
    a, b = ref_dc.to_dict(), cand_dc.to_dict()
    for key in ("height", "width", "channel_order", "pixel_scale", "mean", "std", "interpolation",
                "normalized_inside"):
        if a.get(key) != b.get(key):
            out.append(f"{key}: reference {a.get(key)} vs candidate {b.get(key)}")
    return out


# A model fed the wrong convention (normalised twice, 0..255 into a 0..1 graph) often maps every
# crop to nearly the same direction: the features still look like numbers, every comparison runs,
# and a tracker can no longer tell people apart. Different crops of trained ReID models score
# mean pairwise cosine of about 0.3-0.8; a collapsed model scores >= 0.99 on every pair.
COLLAPSE_COSINE = 0.99


@dataclass
class CollapseStats:
    """Pairwise cosine similarity of the features of different images (upper triangle only)."""

    num_images: int
    min_pair_cosine: float
    mean_pair_cosine: float
    collapsed: bool
    threshold: float = COLLAPSE_COSINE

    def to_dict(self) -> dict:
        return asdict(self)

    def warning(self, name: str) -> str:
        return (f"warning: {name}: collapsed embeddings: every pair of the {self.num_images} different images "
                f"scores cosine >= {self.min_pair_cosine:.3f} (mean {self.mean_pair_cosine:.3f}); the model "
                "cannot tell them apart. Is the input normalised twice or in the wrong pixel scale? Check the "
                "data config (reid-export annotate --detect finds a foreign model's convention)")


def collapse_stats(features: np.ndarray, threshold: float = COLLAPSE_COSINE) -> CollapseStats | None:
    """Whether ``features`` (one row per *different* image) are nearly constant in direction.

    Collapsed means the *least* similar pair of images still scores cosine >= ``threshold``:
    one distinct pair is enough to clear a model, so a few near-duplicate crops in a folder
    never raise it, and a model that separates anything at all is not flagged. Needs at least 3
    images (with 2 the single pair says too little); returns None below that. Rows that are all
    zero or not finite count as collapsed with everything (they carry no direction).
    """
    feats = np.asarray(features, dtype=np.float64).reshape(len(features), -1)
    n = feats.shape[0]
    if n < 3:
        return None
    finite = np.isfinite(feats).all(axis=1)
    norms = np.linalg.norm(np.where(finite[:, None], feats, 0.0), axis=1)
    good = finite & (norms > 0)
    unit = np.zeros_like(feats)
    unit[good] = feats[good] / norms[good, None]
    sims = unit @ unit.T
    bad = ~good
    sims[bad, :] = 1.0  # a row without a direction cannot be told from any other
    sims[:, bad] = 1.0
    iu = np.triu_indices(n, k=1)
    pairs = sims[iu]
    low, mean = float(pairs.min()), float(pairs.mean())
    return CollapseStats(n, low, mean, bool(low >= threshold), threshold)
