"""The INT8 step of ``quantize``: images -> calibration -> candidates -> search -> record.

1. :func:`.images.select_split`: the calibration images and the held-out ones the gate judges on
   (whole identities when the names carry them);
2. :func:`.qdq.prepare` the graph for the target; :func:`.calibration.calibrate` it once on the
   calibration images (decoded once, :class:`.calibration.CalibrationImages`), and its
   activation-equalised copy (:func:`.equalize.equalised_variant`);
3. :func:`.search.search` every calibration method on both graphs against FP32 on the held-out
   images, with the bias correction and the fallback to float;
4. the held-out identities scored for retrieval (when a scorer is given), and the
   :class:`.report.SearchRecord` that goes both into the report and into the model's metadata.

The caller (:func:`.run.quantize_file`) decides what a result below the gate means (refused, or
written and marked with ``allow_below_gate``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx

from ...data_config import DataConfig
from ...embeddings import PAIR_ERROR_MIN_IMAGES
from ...preprocess import preprocess
from .calibration import CalibrationImages, calibrate
from .equalize import EQUALIZE_IMAGES, equalised_variant
from .images import HeldOut, select_split
from .options import DEFAULT_MAX_FLOAT_FRACTION, QuantizeOptions
from .qdq import Prepared, conv_input_means, describe, prepare, weight_range_for_cpu
from .report import SearchRecord
from .search import Objective, SearchResult, Variant, parse_methods, search

LOCATE_IMAGES = 8  # held-out images the fallback ranks nodes on


@dataclass
class Int8Result:
    """The graph the search ended with, its record, and what the metadata says of its form."""

    model: onnx.ModelProto
    record: SearchRecord
    form: dict               # :func:`.qdq.describe`: target, activation/weight types, op types, weight range
    refusal_detail: str      # what the refusal line says was tried, when the gate is missed

    @property
    def passed(self) -> bool:
        return self.record.passed


def quantize_int8(model: onnx.ModelProto, data_config: DataConfig, options: QuantizeOptions,
                  note: Callable[[str], None], score_retrieval: Callable | None = None) -> Int8Result:
    split = select_split(options.calib_dirs, options.calib_size, options.val_dirs, options.val_size, options.seed,
                         note)
    if len(split.held_out) < PAIR_ERROR_MIN_IMAGES:
        note(f"accuracy gate: {len(split.held_out)} held-out images are too few to measure the pairwise-similarity "
             f"error (needs {PAIR_ERROR_MIN_IMAGES}); only the cosines are gated (more crops, or `val_dirs`)")
    prepared = prepare(model, options.target, options.exclude)
    for line in prepared.notes:
        note(line)
    reduce_range = _weight_range(options, note)
    max_float = (options.max_float if options.max_float is not None
                 else math.ceil(len(prepared.quantizable_nodes()) * DEFAULT_MAX_FLOAT_FRACTION))
    images = CalibrationImages(split.calibration, data_config)

    phase = time.time()
    calibration = calibrate(prepared, images, options.num_bins, options.batch_size, options.threads, options.progress)
    # the held-out identities' images are decoded once: the gate's images are among them
    held_inputs = (preprocess(split.identities.paths, data_config)
                   if split.identities is not None and score_retrieval is not None else None)
    if held_inputs is not None:
        row = {path: i for i, path in enumerate(split.identities.paths)}
        val_inputs = held_inputs[[row[path] for path in split.held_out]]
    else:
        val_inputs = preprocess(split.held_out, data_config)
    objective = Objective(prepared.model, val_inputs, data_config, options.threads)
    variants, equalization = _variants(prepared, calibration, objective, images, options, note)
    calib_seconds = time.time() - phase

    phase = time.time()
    result = search(variants, calibration, objective, options.resolved_gate,
                    parse_methods(options.method, options.percentile), reduce_range, max_float,
                    _locate_inputs(objective.inputs, prepared.static_batch), options.progress,
                    options.bias_correction)
    search_seconds = time.time() - phase

    retrieval = None
    if held_inputs is not None:
        retrieval = _score_held_out(split.identities, held_inputs, prepared, result, objective, score_retrieval)
        note(f"int8 {_describe_retrieval(retrieval)}")
    calibration_record, held_out_record = split.record(options.calib_dirs, options.val_dirs, options.calib_size,
                                                       options.seed)
    chosen, first = result.chosen, result.first_choice
    record = SearchRecord(
        gate=options.resolved_gate.to_dict(), passed=chosen.passed, method_requested=options.method,
        method=chosen.method, percentile=chosen.percentile if chosen.method == "percentile" else None,
        num_bins=options.num_bins if chosen.method != "minmax" else None, chosen=chosen.label,
        first_choice=first.label, variant=chosen.variant, bias_corrected=chosen.bias_corrected,
        objective=chosen.objective, objective_before_fallback=first.objective,
        tried=[t.to_dict() for t in result.trials],
        kept_float=list(dict.fromkeys(prepared.head + prepared.user_excluded + prepared.float_sums
                                      + result.fallback_float)),
        fallback_float=list(result.fallback_float), fallback_ranking=result.ranking, max_float=max_float,
        equalization={k: v for k, v in equalization.items() if k != "what"},
        calibration=calibration_record, held_out=held_out_record, held_out_retrieval=retrieval,
        seconds={"calibration": round(calib_seconds, 1), "search": round(search_seconds, 1)})
    _say_what_was_tried(result, record, len(split.held_out), note)
    return Int8Result(result.model, record, describe(prepared, bool(reduce_range)),
                      _refusal_detail(result, record, len(split.held_out)))


def _weight_range(options: QuantizeOptions, note) -> bool:
    if options.target != "cpu":
        return False
    if options.reduce_range is None:
        reduce_range, why = weight_range_for_cpu()
        note(f"int8 cpu: {why} (`reduce_range=True` / `reduce_range=False` to choose)")
        return reduce_range
    return bool(options.reduce_range)


def _variants(prepared: Prepared, calibration, objective: Objective, images: CalibrationImages,
              options: QuantizeOptions, note) -> tuple[list[Variant], dict]:
    """The plain graph and (unless ``equalize`` is off or nothing equalises) its equalised copy, each
    with the Conv input means its bias correction needs (measured on first use)."""

    def means_of(prep: Prepared):
        if not options.bias_correction:
            return None

        def run():
            batches = images.batches(prep.static_batch or options.batch_size, prep.static_batch is not None,
                                     EQUALIZE_IMAGES)
            return conv_input_means(prep.model, batches, options.threads, prep.head)
        return run

    variants = [Variant("plain", prepared, calibration, means_of(prepared))]
    summary: dict = {"tried": False}
    if options.equalize:
        eq_variant, summary = equalised_variant(prepared, calibration, objective, images, options.num_bins,
                                                options.batch_size, options.threads, options.progress)
        if eq_variant is not None:
            eq_variant.input_means = means_of(eq_variant.prepared)
            variants.append(eq_variant)
        note(f"int8: activation equalisation: {summary['what']}")
    return variants, summary


def _locate_inputs(inputs: np.ndarray, static_batch: int | None) -> np.ndarray:
    """The held-out images the fallback ranks nodes on (a static batch takes exactly its size)."""
    chosen = inputs[:static_batch or LOCATE_IMAGES]
    if static_batch and len(chosen) < static_batch:
        chosen = np.concatenate([chosen, np.repeat(chosen[-1:], static_batch - len(chosen), axis=0)])
    return chosen


def _score_held_out(held: HeldOut, inputs: np.ndarray, prepared: Prepared, result: SearchResult, objective: Objective,
                    score_retrieval: Callable) -> dict:
    return score_retrieval(objective.features(prepared.model, inputs, prepared.static_batch),
                           objective.features(result.model, inputs, prepared.static_batch),
                           held.pids, held.camids, held.is_query)


def objective_text(o: dict) -> str:
    return (f"pair error {o['pair_error']:.3f}, min cosine {o['min_cosine']:.4f}, mean cosine {o['mean_cosine']:.4f}, "
            f"top-1 {o['top1_agreement']:.0%}, top-5 {o['top5_agreement']:.0%}")


def _say_what_was_tried(result: SearchResult, record: SearchRecord, held_out: int, note) -> None:
    for t in result.trials:
        note(f"  tried {t.label}: {objective_text(t.objective)}{'' if t.passed else ' (below the gate)'}")
    if result.fallback_float:
        note(f"kept in float to meet the gate: {len(result.fallback_float)} nodes ({', '.join(result.fallback_float[:6])}"
             f"{', ...' if len(result.fallback_float) > 6 else ''}); objective "
             f"{objective_text(record.objective_before_fallback)} -> {objective_text(record.objective)}")
    if record.passed:
        note(f"accuracy gate passes with {record.chosen}: {objective_text(record.objective)} on {held_out} "
             "held-out images")


def _refusal_detail(result: SearchResult, record: SearchRecord, held_out: int) -> str:
    if record.passed:
        return ""
    tried = " / ".join(dict.fromkeys(t.label for t in result.trials if not t.fallback_float))  # labels hold commas
    most = max((len(t.fallback_float) for t in result.trials), default=0)
    return (f"best {record.chosen}: {'; '.join(result.chosen.failures)} on {held_out} held-out images; tried {tried}"
            + (f" and up to {most} of {record.max_float} allowed nodes in float" if record.max_float
               else ", no fallback to float (--max-float 0)"))


def _describe_retrieval(result: dict) -> str:
    lo, hi = result["delta_mAP_ci95"]
    return (f"on held-out identities ({result['identities']} people never calibrated on; {result['queries']} queries, "
            f"{result['gallery']} gallery): fp32 Rank-1 {result['reference']['Rank-1']:.2f} / mAP "
            f"{result['reference']['mAP']:.2f}; d Rank-1 {result['delta_Rank-1']:+.2f}, d mAP "
            f"{result['delta_mAP']:+.2f} [95% CI {lo:+.2f}, {hi:+.2f}] (reported, not gated: a few hundred images)")


__all__ = ["Int8Result", "quantize_int8", "LOCATE_IMAGES", "objective_text"]
