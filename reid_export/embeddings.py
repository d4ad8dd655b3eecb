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
from typing import Mapping

import numpy as np

from .errors import UsageError

# One definition of "good enough" for a reduced-precision variant (FP16, bf16, INT8), shared by
# ``quantize`` (its search and refusal), ``parity`` and ``eval`` (its reduced-precision rows).
# Retrieval ranks by the cosine similarity of pairs of images, so the gate is on how much those
# similarities move: the pairwise-similarity error (RMS change over all pairs, relative to the
# spread of the reference's similarities). The limit comes from the evidence in
# benchmarks/RESULTS.md ("INT8 fidelity gate: the evidence"): at or below it, no measured variant
# of any model moved Rank-1 or mAP by more than 0.5 points on a test set of ~2,000 queries. The
# cosine floors catch one broken image (a NaN-prone or saturated crop) that the pairwise mean hides.
PAIR_ERROR_LIMIT = 0.03
REDUCED_PRECISION_TOLERANCES = {"min_cosine": 0.90, "min_mean_cosine": 0.98, "max_pair_error": PAIR_ERROR_LIMIT,
                                "max_rel_l2": None, "atol": None, "rtol": None}
# Default gates by candidate precision. FP32 is held to elementwise agreement; FP16, bf16 and INT8
# to the one reduced-precision gate above, on the embedding's direction, which is what retrieval uses.
DEFAULT_TOLERANCES = {
    "fp32": {"min_cosine": 0.99999, "max_rel_l2": 1e-4, "atol": 1e-4, "rtol": 1e-3},
    "fp16": dict(REDUCED_PRECISION_TOLERANCES),
    "bf16": dict(REDUCED_PRECISION_TOLERANCES),
    "int8": dict(REDUCED_PRECISION_TOLERANCES),
}
# The pairwise-similarity error is measured on at most this many images (evenly spaced rows), so
# that a Market-size eval does not build a 22k x 22k matrix; 2,000 images are ~2M pairs.
PAIR_ERROR_MAX_IMAGES = 2000
# Below this many images (120 pairs) the spread of the reference's similarities is too poorly known
# for the relative error to mean anything: it is reported as NaN and not gated (the cosines are).
PAIR_ERROR_MIN_IMAGES = 16


@dataclass
class Tolerances:
    """What a candidate's features must keep of the reference's on the same images (None: not checked):
    the one way a gate on features is stated, by ``parity`` (``gate=``), ``quantize``
    (``QuantizeOptions.gate``) and ``eval`` (``EvalGates.fidelity``).

    ``max_pair_error``: :func:`pair_similarity_error`'s relative value; ``min_top1_agreement`` /
    ``min_top5_agreement``: neighbour agreement (:func:`neighbour_agreement`); ``atol``/``rtol``:
    elementwise, with Polygraphy's semantics (both must be exceeded), so they go together.

    Build one with :meth:`for_precision` (a precision's default gate with overrides),
    :meth:`reduced_precision` (the FP16/bf16/INT8 gate) or :meth:`by_precision` (every precision's
    default, the same overrides applied to all: what ``parity`` applies when ``gate`` is not given)."""

    min_cosine: float | None = None
    max_rel_l2: float | None = None
    atol: float | None = None
    rtol: float | None = None
    min_top1_agreement: float | None = None
    min_mean_cosine: float | None = None
    max_pair_error: float | None = None
    min_top5_agreement: float | None = None

    def __post_init__(self):
        if (self.atol is None) != (self.rtol is None):
            raise UsageError("`atol` and `rtol` go together; give both")

    @classmethod
    def for_precision(cls, precision: str, **overrides) -> "Tolerances":
        base = dict(DEFAULT_TOLERANCES.get(precision, DEFAULT_TOLERANCES["int8"]))
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)

    @classmethod
    def reduced_precision(cls, **overrides) -> "Tolerances":
        """The one gate of every FP16/bf16/INT8 variant (``quantize``, ``parity``, ``eval``)."""
        return cls.for_precision("int8", **overrides)

    @classmethod
    def by_precision(cls, **overrides) -> dict[str, "Tolerances"]:
        """``{precision: gate}`` for fp32, fp16, bf16 and int8: each one's default with ``overrides``."""
        return {precision: cls.for_precision(precision, **overrides) for precision in DEFAULT_TOLERANCES}

    def to_dict(self) -> dict:
        return asdict(self)

    def failures(self, measured: dict) -> list[str]:
        """Why ``measured`` (:func:`compare`'s numbers: ``min_cosine``, ``mean_cosine``, ``max_rel_l2``,
        ``pair_error``, ``top1_agreement``, ``top5_agreement``, ``nonfinite``, ``elementwise_failures``,
        ``num_elements``) misses these tolerances; empty when it passes. A missing or NaN value fails
        every check that applies to it."""
        out = []
        nonfinite = measured.get("nonfinite") or 0
        if nonfinite:
            out.append(f"{nonfinite} NaN/Inf values in the output")

        def low(key, limit, label, fmt):
            value = measured.get(key)
            if limit is not None and not (value is not None and value >= limit):
                out.append(f"{label} {_shown(value, fmt)} < {fmt.format(limit)}")

        def high(key, limit, label, fmt):
            value = measured.get(key)
            if key == "pair_error" and value is not None and np.isnan(value):
                return  # not measurable on so few images (PAIR_ERROR_MIN_IMAGES); NaN features fail as inf
            if limit is not None and not (value is not None and value <= limit):
                out.append(f"{label} {_shown(value, fmt)} > {fmt.format(limit)}")

        low("min_cosine", self.min_cosine, "min cosine", "{:.6g}")
        low("mean_cosine", self.min_mean_cosine, "mean cosine", "{:.6g}")
        high("max_rel_l2", self.max_rel_l2, "max relative L2", "{:.3g}")
        high("pair_error", self.max_pair_error, "pairwise similarity error", "{:.3f}")
        low("top1_agreement", self.min_top1_agreement, "top-1 neighbour agreement", "{:.1%}")
        low("top5_agreement", self.min_top5_agreement, "top-5 neighbour agreement", "{:.1%}")
        elementwise = measured.get("elementwise_failures")
        if elementwise:
            out.append(f"{elementwise} of {measured.get('num_elements', '?')} elements exceed atol={self.atol:g} "
                       f"and rtol={self.rtol:g}")
        return out


def gate_for(gate: "Tolerances | Mapping[str, Tolerances] | None", precision: str) -> Tolerances:
    """The gate a candidate of ``precision`` is held to: ``gate`` itself when it is one
    :class:`Tolerances`, its entry for the precision when it is a mapping (as
    :meth:`Tolerances.by_precision` builds), and the precision's default when it is None or has none."""
    if isinstance(gate, Tolerances):
        return gate
    if gate is not None and precision in gate:
        return gate[precision]
    return Tolerances.for_precision(precision)


def _shown(value, fmt: str) -> str:
    return "nan" if value is None or not np.isfinite(value) else fmt.format(value)


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
    pair_error: float = float("nan")   # pair_similarity_error: relative, and the RMS change itself
    pair_rmse: float = float("nan")

    @property
    def passed(self) -> bool:
        return not self.failures

    def measures(self) -> dict:
        """The numbers :meth:`Tolerances.failures` judges (and the quantizer's search ranks by)."""
        return {"images": self.num_images, "pair_error": self.pair_error, "pair_rmse": self.pair_rmse,
                "min_cosine": self.min_cosine, "mean_cosine": self.mean_cosine, "max_rel_l2": self.max_rel_l2,
                "mean_rel_l2": self.mean_rel_l2, "top1_agreement": self.top1_agreement,
                "top5_agreement": self.top5_agreement, "finite": self.nonfinite == 0}

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


def pair_similarity_error(reference: np.ndarray, candidate: np.ndarray,
                          max_images: int = PAIR_ERROR_MAX_IMAGES) -> tuple[float, float]:
    """(RMS change of the cosine similarity over all pairs of images, that over the standard deviation
    of the reference's similarities): how far retrieval's scores move. At most ``max_images`` rows
    (evenly spaced) are used. (inf, inf) when the candidate has NaN/Inf; (nan, nan) below
    ``PAIR_ERROR_MIN_IMAGES`` images or when the reference has NaN/Inf."""
    n = len(reference)
    if not np.isfinite(candidate).all():
        return float("inf"), float("inf")
    if n < PAIR_ERROR_MIN_IMAGES or not np.isfinite(reference).all():
        return float("nan"), float("nan")
    rows = np.linspace(0, n - 1, max_images).round().astype(int) if n > max_images else slice(None)
    iu = None

    def sims(x):
        nonlocal iu
        x = l2_normalize(np.asarray(x, dtype=np.float64)[rows], axis=1)
        iu = iu or np.triu_indices(len(x), 1)
        return (x @ x.T)[iu]

    ref, cand = sims(reference), sims(candidate)
    rmse = float(np.sqrt(np.mean((cand - ref) ** 2)))
    return rmse, rmse / max(float(np.std(ref)), 1e-12)


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
    result.pair_rmse, result.pair_error = pair_similarity_error(reference, candidate)
    result.failures.extend(tol.failures({
        "min_cosine": min_cos, "mean_cosine": result.mean_cosine, "max_rel_l2": max_rel,
        "pair_error": result.pair_error, "top1_agreement": top1, "top5_agreement": top5, "nonfinite": nonfinite,
        "elementwise_failures": elementwise, "num_elements": int(absdiff.size)}))
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
