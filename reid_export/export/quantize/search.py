"""Accuracy-guarded INT8: measure every candidate against FP32, keep the best, fall back where it hurts.

After one calibration pass per graph (:func:`.calibration.calibrate`; two graphs by default: the FP32
model as given and its activation-equalised copy, :mod:`.equalize`) the search

1. builds a Q/DQ graph for each calibration method asked for on each graph (by default entropy,
   MSE-optimal ranges, percentile at three levels and min/max: all from the same histograms, so a
   candidate costs one graph build and one run over the held-out images), and measures each
   against the FP32 graph on held-out real crops (never the calibration images) with the
   verifier's own embedding comparison (:func:`reid_export.embeddings.compare`): min and mean
   cosine, and whether each image keeps its nearest neighbour (top-1) and its five nearest (top-5)
   among the others;
2. keeps the candidate the objective prefers: the one that passes the gate, then the smallest
   change of the pairwise similarities between held-out images (what retrieval ranks by), then
   the highest mean and min cosine; then tries that candidate with the weight-rounding bias
   corrected (:func:`.qdq.correct_biases`) and keeps whichever is closer;
3. when even that one fails the gate, ranks the quantized nodes by the error each adds on top of
   its inputs' (:func:`reid_export.export.quantize.locate.locate`, the ``parity --locate`` machinery, on a
   few held-out images), keeps the worst in float (1, then 2, 4, ... more per round, re-ranked
   after each; a round that does not help is undone), and when the gate holds, bisects the last
   round's nodes for the fewest that still pass; when it never holds, the trial closest to FP32
   is the result;
4. reports every trial; the caller refuses to write a model below the gate.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import onnx

from ...data_config import DataConfig
from ...embeddings import Tolerances
from ...errors import UsageError
from .qdq import Prepared, build_qdq

# (method, percentile) pairs tried by --method auto, in this order (ties keep the earlier one)
AUTO_CANDIDATES: list[tuple[str, float | None]] = [
    ("entropy", None), ("mse", None), ("percentile", 99.9), ("percentile", 99.99), ("percentile", 99.999),
    ("minmax", None)]


@dataclass
class Variant:
    """One FP32 graph to quantize and its calibration: the model as given ("plain") or rescaled by
    :mod:`.equalize` ("equalised")."""

    name: str
    prepared: Prepared
    calibration: object
    input_means: Callable[[], dict] | None = None   # per-channel Conv input means, for bias correction
    _means: dict | None = field(default=None, repr=False)

    def means(self) -> dict | None:
        if self._means is None and self.input_means is not None:
            self._means = self.input_means()
        return self._means


@dataclass
class Trial:
    label: str
    method: str
    percentile: float | None
    fallback_float: list[str]
    objective: dict
    failures: list[str]
    seconds: float
    variant: str = "plain"
    bias_corrected: bool = False

    @property
    def passed(self) -> bool:
        return not self.failures

    def score(self) -> tuple:
        o = self.objective
        finite = lambda v: v if v is not None and np.isfinite(v) else -np.inf  # noqa: E731
        # passes the gate, then the smallest pairwise similarity error, then the highest mean / min cosine
        return (self.passed, -_or_inf(o.get("pair_error")), finite(o.get("mean_cosine")), finite(o.get("min_cosine")))

    def to_dict(self) -> dict:
        return {"label": self.label, "method": self.method, "percentile": self.percentile, "variant": self.variant,
                "bias_corrected": self.bias_corrected,
                "fallback_nodes": len(self.fallback_float), "objective": self.objective, "passed": self.passed,
                "failures": self.failures, "seconds": round(self.seconds, 2)}


def _or_inf(value) -> float:
    return value if value is not None and np.isfinite(value) else np.inf


def candidate_label(method: str, percentile: float | None, variant: str = "plain", corrected: bool = False) -> str:
    label = f"percentile {percentile:g}" if method == "percentile" else method
    label = label if variant == "plain" else f"{label}, {variant}"
    return f"{label}, bias-corrected" if corrected else label


class Objective:
    """The FP32 graph's features of the held-out images, computed once; each candidate is measured against them."""

    def __init__(self, fp32_model: onnx.ModelProto | bytes, inputs: np.ndarray, data_config: DataConfig,
                 threads: int | None = None, batch_size: int = 16):
        if len(inputs) < 2:
            raise UsageError("the accuracy gate needs at least 2 held-out images (`val_size`, `val_dirs`)")
        self.inputs = inputs
        self.data_config = data_config
        self.threads = threads
        self.batch_size = batch_size
        self.reference = self.features(fp32_model)

    def features(self, model: onnx.ModelProto | bytes, inputs: np.ndarray | None = None,
                 static_batch: int | None = None) -> np.ndarray:
        """``model``'s features of the held-out images (or of ``inputs``); a ``static_batch`` graph is fed
        whole batches, the last one padded with copies of the last image (their rows dropped)."""
        from ..ort import OrtRunner, make_session

        inputs = self.inputs if inputs is None else inputs
        n, step = len(inputs), static_batch or self.batch_size
        if static_batch and n % static_batch:
            inputs = np.concatenate([inputs, np.repeat(inputs[-1:], static_batch - n % static_batch, axis=0)])
        data = model if isinstance(model, bytes) else model.SerializeToString()
        encoder = OrtRunner(make_session(data, threads=self.threads), "candidate")
        return np.concatenate([encoder(inputs[i:i + step]) for i in range(0, len(inputs), step)])[:n]

    def measure(self, model: onnx.ModelProto | bytes) -> dict:
        from ...embeddings import compare

        result = compare(self.reference, self.features(model), Tolerances())
        return {**result.measures(), "nonfinite": result.nonfinite}


@dataclass
class SearchResult:
    model: onnx.ModelProto
    chosen: Trial
    first_choice: Trial
    trials: list[Trial]
    fallback_float: list[str]
    ranking: list[dict] = field(default_factory=list)
    ranges: dict = field(default_factory=dict)
    prepared: Prepared | None = None

    @property
    def passed(self) -> bool:
        return self.chosen.passed


def search(variants: Sequence[Variant] | Prepared, calibration, objective: Objective, gate: Tolerances,
           candidates: Sequence[tuple[str, float | None]], reduce_range: bool, max_float: int,
           locate_inputs: np.ndarray, progress: bool = True, bias_correction: bool = True) -> SearchResult:
    """Try ``candidates`` on every variant, keep the best by the objective, then the same with the
    weight-rounding bias corrected (kept when closer), then keep nodes in float until ``gate``
    holds. ``variants`` may be one :class:`Prepared` (with its ``calibration``)."""
    from tqdm import tqdm

    if isinstance(variants, Prepared):
        variants = [Variant("plain", variants, calibration)]
    by_name = {v.name: v for v in variants}
    trials: list[Trial] = []
    built: dict[int, onnx.ModelProto] = {}
    ranges_of: dict[tuple[str, str], dict] = {}

    def trial(method, percentile, keep, label=None, variant="plain", corrected=False) -> Trial:
        start = time.time()
        v = by_name[variant]
        key = (variant, candidate_label(method, percentile))
        if key not in ranges_of:
            ranges_of[key] = v.calibration.ranges(method, percentile if percentile is not None else 99.99,
                                                  v.prepared.target == "cpu")
        model = build_qdq(v.prepared, ranges_of[key], reduce_range, keep, v.means() if corrected else None)
        measured = objective.measure(model)
        t = Trial(label or candidate_label(method, percentile, variant, corrected), method, percentile, list(keep),
                  measured, gate.failures(measured), time.time() - start, variant, corrected)
        # keep the graphs the result can still be: the best so far and those that pass (the bisection
        # may end on a passing trial with fewer float nodes); the others are dropped (memory)
        best_so_far = max(trials, key=Trial.score) if trials else None
        trials.append(t)
        if best_so_far is None or t.score() > best_so_far.score() or t.passed:
            built[id(t)] = model
            for old in [o for o in trials[:-1] if id(o) in built and not o.passed and o.score() < t.score()]:
                del built[id(old)]
        return t

    plan = [(v.name, m, p) for v in variants for m, p in candidates]
    bar = tqdm(plan, desc=f"search: {len(plan)} candidates on {len(objective.inputs)} held-out images", unit="trial",
               disable=not progress, leave=False)
    try:
        for variant, method, percentile in bar:
            t = trial(method, percentile, [], variant=variant)
            bar.set_postfix_str(f"{t.label}: pair error {t.objective['pair_error']:.3f}")
    finally:
        bar.close()
    first = max(trials, key=Trial.score)  # max keeps the first of equal scores
    if bias_correction and by_name[first.variant].input_means is not None:
        corrected = trial(first.method, first.percentile, [], variant=first.variant, corrected=True)
        if corrected.score() > first.score():
            first = corrected
    best = first
    ranking: list[dict] = []
    keep: list[str] = []
    if not best.passed and max_float > 0:
        best, keep, ranking = _fall_back(by_name[best.variant].prepared, best, trial, built, gate, max_float,
                                         locate_inputs, progress)
        if not best.passed:  # the gate is missed anyway: report (and write, if asked) the closest trial
            best = max(trials, key=Trial.score)
            keep = list(best.fallback_float)
    return SearchResult(built[id(best)], best, first, trials, keep, ranking,
                        ranges_of[(best.variant, candidate_label(best.method, best.percentile))],
                        by_name[best.variant].prepared)


def _fall_back(prepared, start: Trial, trial, built, gate: Tolerances, max_float: int, locate_inputs, progress):
    """Keep the nodes that add the most error in float (1, 2, 4, ... per round) until the gate holds.

    A round that does not bring the objective closer to FP32 is undone (its nodes are not tried
    again); the search stops when the gate holds, ``max_float`` nodes are in float, twice that
    many have been tried, or no quantized node adds error.
    """
    from tqdm import tqdm

    from .locate import locate

    pool = set(prepared.quantizable_nodes())
    current, keep, step, round_ = start, [], 1, 0
    tried: set[str] = set()
    ranking: list[dict] = []
    bar = tqdm(total=max_float, desc="fall back: nodes kept in float", unit="node", disable=not progress,
               leave=False)
    try:
        while not current.passed and len(keep) < max_float and len(tried) < 2 * max_float:
            found = locate(prepared.model, built[id(current)], locate_inputs, top=10)
            ranked = sorted((l for l in found["layers"] if l["node"] in pool and l["node"] not in keep
                             and l["node"] not in tried and l["added"] > 0), key=lambda l: -l["added"])
            if not ranked:
                break
            batch = [l["node"] for l in ranked[:min(step, max_float - len(keep))]]
            tried.update(batch)
            round_ += 1
            candidate = trial(start.method, start.percentile, keep + batch,
                              f"{start.label}, {len(keep) + len(batch)} nodes in float", start.variant,
                              start.bias_corrected)
            accepted = candidate.score() > current.score()
            ranking.extend({"node": l["node"], "op_type": l["op_type"], "added_rel_error": round(l["added"], 5),
                            "round": round_, "kept": accepted} for l in ranked[:len(batch)])
            step *= 2
            if not accepted:
                continue
            previous, keep, current = keep, keep + batch, candidate
            bar.update(len(batch))
            bar.set_postfix_str(f"pair error {current.objective['pair_error']:.3f}")
            if current.passed and len(batch) > 1:
                current, keep = _bisect(start, trial, previous, batch, current)
    finally:
        bar.close()
    return current, keep, ranking


def _bisect(start: Trial, trial, previous: list[str], batch: list[str], passing: Trial):
    """The shortest prefix of ``batch`` (ranked worst first) that still passes, by bisection."""
    lo, hi, best = 0, len(batch), passing  # prefix of length hi passes; of length lo (the previous round) fails
    while hi - lo > 1:
        mid = (lo + hi) // 2
        keep = previous + batch[:mid]
        t = trial(start.method, start.percentile, keep, f"{start.label}, {len(keep)} nodes in float", start.variant,
                  start.bias_corrected)
        if t.passed:
            hi, best = mid, t
        else:
            lo = mid
    return best, previous + batch[:hi]


def parse_methods(method: str, percentile: float | None) -> list[tuple[str, float | None]]:
    """``--method`` (auto or one method) and ``--percentile`` -> the candidates to try."""
    from .calibration import DEFAULT_PERCENTILE, METHODS

    if method == "auto":
        if percentile is not None:
            return [c for c in AUTO_CANDIDATES if c[0] != "percentile"] + [("percentile", percentile)]
        return list(AUTO_CANDIDATES)
    if method not in METHODS:
        raise UsageError(f"`method` must be auto or one of {', '.join(METHODS)}, got {method!r}")
    return [(method, (percentile if percentile is not None else DEFAULT_PERCENTILE) if method == "percentile"
             else None)]


__all__ = ["Trial", "Variant", "Objective", "SearchResult", "search", "parse_methods", "AUTO_CANDIDATES"]
