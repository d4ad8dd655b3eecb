"""``reid-export quantize``: the FP16 or INT8 (Q/DQ) variant of an FP32 ONNX model, written only when it is good.

- FP16: :mod:`.fp16` (float16 graph, float32 I/O, head in float32).
- INT8: one calibration pass (:func:`.int8.calibrate`) on real crops for the FP32 graph and one
  for its activation-equalised copy (:mod:`.equalize`), then the accuracy-guarded search of
  :mod:`.int8_search`: every calibration method is tried on both graphs and measured against the
  FP32 graph on held-out crops (not the calibration images), the best is kept (and tried with its
  weight-rounding bias corrected), and nodes that add the most error stay in float until the gate
  holds. Below the gate nothing is written (exit 1) unless
  ``allow_below_gate``; then the model is marked below-gate in its metadata.
  Targets: :mod:`.int8` (TensorRT S8S8, checked by :func:`.qdq_check.check_tensorrt_qdq`; CPU U8S8,
  fusion counted by :func:`.qdq_check.check_ort_cpu_fusion`).
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnx

from .. import __version__
from ..data_config import DataConfig
from ..embeddings import PAIR_ERROR_MIN_IMAGES
from ..errors import ReidExportError, UsageError
from ..fileio import check_output_path, sha256_file
from ..preprocess import expand_image_paths, preprocess
from ..report import report_header
from .calibrate import DEFAULT_NUM_BINS, DEFAULT_PERCENTILE, METHODS
from .fp16 import FP16_MAX, FP16_MIN_NORMAL, FP16_MIN_SUBNORMAL, convert_fp16, converter_version, quiet_ort_tools
from .graph import ensure_node_names, opset_of, resolve_excludes
from .int8 import (MIN_QDQ_OPSET, QDQ_OP_TYPES, TARGETS, calibrate, calibration_batches, conv_input_means, describe,
                   prepare, weight_range_for_cpu)
from .int8_search import Gate, Objective, Variant, parse_methods, search
from .metadata import (KEY_FP16, KEY_QUANTIZATION, KEY_SOURCE, KEY_SOURCE_SHA256, base_metadata, get_metadata,
                       load_onnx, model_precision, require_data_config, save_onnx, set_metadata)
from .qdq_check import FusionReport, QDQReport, check_ort_cpu_fusion, check_tensorrt_qdq

PRECISIONS = ("fp16", "int8")
DEFAULT_CALIB_SIZE = 512
DEFAULT_VAL_SIZE = 128
DEFAULT_METHOD = "auto"
LOCATE_IMAGES = 8
FP16_CHECK_IMAGES = 32  # real crops the FP16 variant is gated on (from --calib-dir)
_calibration_batches = calibration_batches  # the name tests and benchmarks use
_quiet_ort_quantization = quiet_ort_tools


@dataclass
class QuantizeReport:
    output: Path
    precision: str
    target: str | None = None
    method: str | None = None
    calibration_images: int = 0
    held_out_images: int = 0
    notes: list[str] = field(default_factory=list)
    kept_float: list[str] = field(default_factory=list)
    fallback_float: list[str] = field(default_factory=list)
    parity: dict = field(default_factory=dict)
    search: dict = field(default_factory=dict)
    gate_passed: bool | None = None
    qdq: QDQReport | None = None
    fusion: FusionReport | None = None
    written: bool = False
    size_mb: float = 0.0
    seconds: float = 0.0
    speed: dict = field(default_factory=dict)  # throughput over FP32's on this CPU (ONNX Runtime), by batch size

    def to_dict(self) -> dict:
        return {**report_header("quantize"), "output": str(self.output), "written": self.written, "precision": self.precision,
                "target": self.target, "method": self.method, "calibration_images": self.calibration_images,
                "held_out_images": self.held_out_images, "kept_float": self.kept_float,
                "fallback_float": self.fallback_float, "parity_vs_fp32": self.parity, "search": self.search,
                "gate_passed": self.gate_passed, "qdq_check": None if self.qdq is None else self.qdq.summary(),
                "ort_cpu_fusion": None if self.fusion is None else self.fusion.summary(),
                "size_mb": round(self.size_mb, 3), "seconds": round(self.seconds, 1),
                "speed_vs_fp32": self.speed, "notes": self.notes}

    @property
    def passed(self) -> bool:
        """Written and, where a gate applied, passing it (False for a model written below the gate)."""
        return self.written and self.gate_passed is not False


class GateRefused(ReidExportError):
    """The INT8 model missed the accuracy gate and was not written; ``report`` says what was tried."""

    def __init__(self, message: str, report: QuantizeReport):
        super().__init__(message)
        self.report = report


def _load_fp32(model_path: str | Path) -> tuple[onnx.ModelProto, DataConfig]:
    model = load_onnx(model_path)
    data_config = require_data_config(model, model_path)
    precision = model_precision(model)
    if precision != "fp32":
        raise ReidExportError(f"{model_path}: the model is already {precision}; quantize the FP32 model")
    ensure_node_names(model)
    return model, data_config


def select_calibration_images(dirs: Sequence[str | Path], size: int, seed: int,
                              log: Callable[[str], None]) -> list[Path]:
    """``size`` images drawn (by ``seed``) from the folders/files given, or all there are, said so."""
    if size < 1:
        raise UsageError(f"--calib-size must be >= 1, got {size}")
    paths = list(dict.fromkeys(expand_image_paths(dirs)))
    where = ", ".join(str(d) for d in dirs)
    if len(paths) < size:
        log(f"calibration: {where} holds {len(paths)} images, fewer than --calib-size {size}; using all {len(paths)}")
        return paths
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(paths), size=size, replace=False).tolist())
    log(f"calibration: {size} of the {len(paths)} images in {where} (seed {seed})")
    return [paths[i] for i in chosen]


@dataclass
class HeldOut:
    """Whole identities held out of calibration (Market-1501 names): the images and their labels, and
    which are queries (per identity and camera the first image; every query keeps a match from
    another camera)."""

    paths: list[Path]
    pids: np.ndarray
    camids: np.ndarray
    is_query: np.ndarray

    @property
    def identities(self) -> int:
        return int(len(np.unique(self.pids)))


HELD_OUT_IMAGES = 384  # images of held-out identities (~40 people of a Market-style training folder)


def select_images(calib_dirs: Sequence[str | Path], calib_size: int, val_dirs: Sequence[str | Path], val_size: int,
                  seed: int, log: Callable[[str], None]) -> tuple[list[Path], list[Path]]:
    """(calibration images, held-out images): never the same file in both (see :func:`select_split`)."""
    calib, val, _ = select_split(calib_dirs, calib_size, val_dirs, val_size, seed, log)
    return calib, val


def select_split(calib_dirs: Sequence[str | Path], calib_size: int, val_dirs: Sequence[str | Path], val_size: int,
                 seed: int, log: Callable[[str], None]) -> tuple[list[Path], list[Path], HeldOut | None]:
    """(calibration images, held-out images for the gate, held-out identities or None).

    Without ``val_dirs`` the held-out images come from the calibration folders. When every file
    there carries a Market-1501 name and enough people were seen by two cameras, whole identities
    are held out (drawn by ``seed`` until about ``HELD_OUT_IMAGES`` images, leaving ``calib_size``
    for calibration): the gate's ``val_size`` images are drawn from them, and all of their images
    form a small retrieval test (:class:`HeldOut`). Otherwise ``val_size`` images (a quarter when
    the folders hold fewer than ``calib_size + val_size``, at least 2) are drawn first by ``seed``;
    the calibration images are drawn from the rest.
    """
    if calib_size < 1 or val_size < 2:
        raise UsageError(f"--calib-size must be >= 1 and --val-size >= 2, got {calib_size} and {val_size}")
    paths = list(dict.fromkeys(expand_image_paths(calib_dirs)))
    where = ", ".join(str(d) for d in calib_dirs)
    rng = np.random.default_rng(seed)
    order = [paths[i] for i in rng.permutation(len(paths))]
    held_out = None
    if val_dirs:
        val_all = [p for p in dict.fromkeys(expand_image_paths(val_dirs)) if p not in set(paths)]
        vwhere = ", ".join(str(d) for d in val_dirs)
        if len(val_all) < 2:
            raise UsageError(f"--val-dir {vwhere}: holds {len(val_all)} images that are not calibration images; "
                             "the accuracy gate needs at least 2")
        val = sorted(val_all[i] for i in np.random.default_rng(seed).permutation(len(val_all))[:val_size])
        calib = sorted(order[:calib_size])
        vnote = f"{len(val)} of the {len(val_all)} images in {vwhere}"
    else:
        held_out = _held_out_identities(paths, calib_size, val_size, seed)
        if held_out is not None:
            pool = set(held_out.paths)
            picked = np.random.default_rng(seed).permutation(len(held_out.paths))[:val_size]
            val = sorted(held_out.paths[i] for i in picked)
            calib = sorted([p for p in order if p not in pool][:calib_size])
            vnote = (f"{len(val)} images of {held_out.identities} people held out of calibration (all "
                     f"{len(held_out.paths)} of their images also score Rank-1/mAP)")
        else:
            n_val = val_size if len(paths) >= calib_size + val_size else max(2, len(paths) // 4)
            if len(paths) - n_val < 1:
                raise UsageError(f"--calib-dir {where}: holds {len(paths)} images; calibration and the held-out "
                                 "accuracy check need at least 3 (or give --val-dir)")
            val = sorted(order[:n_val])
            calib = sorted(order[n_val:n_val + calib_size])
            vnote = f"{len(val)} other images from the same folders"
    if len(calib) < calib_size:
        log(f"calibration: {where} holds {len(paths)} images, fewer than --calib-size {calib_size} plus the held-out "
            f"ones; using {len(calib)}")
    else:
        log(f"calibration: {len(calib)} of the {len(paths)} images in {where} (seed {seed})")
    log(f"accuracy gate: measured on {vnote}, held out from calibration")
    return calib, val, held_out


def _held_out_identities(paths: list[Path], calib_size: int, val_size: int, seed: int) -> HeldOut | None:
    """Whole identities (Market-1501 names, seen by two or more cameras) drawn by ``seed`` until about
    ``HELD_OUT_IMAGES`` images (at least ``val_size``; no more than leaves ``calib_size`` to calibrate
    on); None when the names are not Market's or too few people qualify."""
    from ..data.market import parse_name

    by_id: dict[int, dict[int, list[Path]]] = {}
    for path in paths:
        parsed = parse_name(path.name)
        if parsed is None:
            return None
        if parsed[0] > 0:  # junk (-1) and distractors (0) are never held out as people
            by_id.setdefault(parsed[0], {}).setdefault(parsed[1], []).append(path)
    eligible = sorted(pid for pid, cams in by_id.items() if len(cams) >= 2)
    budget = min(max(HELD_OUT_IMAGES, val_size), len(paths) - calib_size)
    chosen, count = [], 0
    for i in np.random.default_rng(seed).permutation(len(eligible)):
        if count >= budget:
            break
        size = sum(len(v) for v in by_id[eligible[i]].values())
        if count + size > budget and count >= val_size:
            continue
        chosen.append(eligible[i])
        count += size
    if len(chosen) < 2 or count < val_size:
        return None
    rows = []
    for pid in sorted(chosen):
        cams = by_id[pid]
        picked = {c: sorted(ps)[0] for c, ps in cams.items() if len(ps) >= 2}
        if not picked:
            c = max(sorted(cams), key=lambda c: len(cams[c]))
            picked = {c: sorted(cams[c])[0]}
        queries = set(picked.values())
        rows += [(p, pid, c, p in queries) for c, ps in sorted(cams.items()) for p in sorted(ps)]
    return HeldOut([r[0] for r in rows], np.array([r[1] for r in rows]), np.array([r[2] for r in rows]),
                   np.array([r[3] for r in rows], bool))


def _file_list_digest(paths: Sequence[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(str(path.name).encode("utf-8") + b"\n")
    return digest.hexdigest()


def _features(model_bytes: bytes, inputs: np.ndarray, data_config: DataConfig, name: str) -> np.ndarray:
    from .ort import OrtRunner, make_session

    return OrtRunner(make_session(model_bytes), name)(inputs)


def compare_features(reference: np.ndarray, candidate: np.ndarray, gate=None):
    """The verifier's embedding comparison (:func:`reid_export.embeddings.compare`) under ``gate``
    (default: none), as a :class:`~reid_export.embeddings.ParityResult`."""
    from ..embeddings import Tolerances, compare

    return compare(reference, candidate, gate or Tolerances())


def _objective_text(o: dict) -> str:
    return (f"pair error {o['pair_error']:.3f}, min cosine {o['min_cosine']:.4f}, mean cosine {o['mean_cosine']:.4f}, "
            f"top-1 {o['top1_agreement']:.0%}, top-5 {o['top5_agreement']:.0%}")


def _parity_line(precision: str, parity: dict, source: str) -> str:
    return (f"{precision} vs fp32 (ONNX Runtime CPU) on {parity['images']} {source}: pair error "
            f"{parity['pair_error']:.4f}, min cosine {parity['min_cosine']:.5f}, mean cosine {parity['mean_cosine']:.5f}, "
            f"max relative L2 {parity['max_rel_l2']:.2e}")


def _check_options(precision, target, method, percentile, reduce_range, calib_dirs):
    if precision not in PRECISIONS:
        raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if percentile is not None and method not in ("percentile", "auto"):
        raise UsageError("--percentile applies to --method percentile (or auto, as one more candidate)")
    if percentile is not None and not 50.0 < percentile <= 100.0:
        raise UsageError(f"--percentile must be in (50, 100], got {percentile}")
    if precision == "int8" and target not in TARGETS:
        raise UsageError(f"--target must be one of {', '.join(TARGETS)}, got {target!r}")
    if precision == "int8" and method not in METHODS + ("auto",):
        raise UsageError(f"--method must be auto or one of {', '.join(METHODS)}, got {method!r}")
    if precision == "int8" and reduce_range and target != "cpu":
        raise UsageError("--reduce-range applies to --target cpu (TensorRT takes full 8-bit weights)")
    if precision == "int8" and not calib_dirs:
        raise UsageError("--precision int8 needs real calibration images: --calib-dir DIR (for example the "
                         "training crops, bounding_box_train/)")


def quantize_file(model_path: str | Path, output: str | Path, precision: str, target: str = "tensorrt",
                  calib_dirs: Sequence[str | Path] = (), calib_size: int = DEFAULT_CALIB_SIZE,
                  method: str = DEFAULT_METHOD, percentile: float | None = None, exclude: Sequence[str] = (),
                  seed: int = 0, num_bins: int = DEFAULT_NUM_BINS, batch_size: int = 8, reduce_range: bool | None = None,
                  threads: int | None = None, progress: bool = True, log: Callable[[str], None] = print,
                  val_dirs: Sequence[str | Path] = (), val_size: int = DEFAULT_VAL_SIZE, gate: Gate | None = None,
                  max_fallback: int | None = None, allow_below_gate: bool = False,
                  equalize: bool = True, bias_correction: bool = True,
                  score_retrieval: Callable | None = None) -> QuantizeReport:
    """Make the FP16 or INT8 variant of an FP32 ONNX model; ``output`` is written only on success.

    INT8: ``method`` ``auto`` tries every calibration method; ``gate`` (default :class:`Gate`) is
    what the result must keep of the FP32 embeddings on the held-out images; ``max_fallback``
    nodes at most stay in float to meet it (default a quarter of the quantizable nodes; 0: none).
    Below the gate a :class:`ReidExportError` says what was tried, unless ``allow_below_gate``.
    ``equalize``: also try every method on the activation-equalised graph (:mod:`.equalize`);
    ``bias_correction``: also try the best candidate with its weight-rounding bias corrected.
    ``score_retrieval(reference, candidate, pids, camids, is_query) -> dict``: when the calibration
    folders' names let whole identities be held out (:func:`select_split`), FP32 and the chosen INT8
    graph are scored on them with it (``reid_export.verify.heldout.score_held_out``; the API and
    the CLI pass it) and the result is reported beside the fidelity.
    """
    from .metadata import refuse_openvino_ir
    from .onnx_export import generated_images

    refuse_openvino_ir(model_path, "quantize")

    start = time.time()
    _check_options(precision, target, method, percentile, reduce_range, calib_dirs)
    output = check_output_path(output)
    model, data_config = _load_fp32(model_path)
    resolve_excludes(model, exclude)  # an unknown --exclude fails before any work is done
    source_bytes = model.SerializeToString()
    report = QuantizeReport(output=output, precision=precision)
    # Notes (images used, opset upgrade, FP16 weight range) are printed once the model is written:
    # a run that fails (a corrupt calibration image, say) prints its one error line and nothing else.
    notes: list[str] = report.notes
    note = notes.append

    if precision == "fp16":
        converted, keep = convert_fp16(model, exclude, note)
        report.kept_float = keep
        extra_meta = {KEY_FP16: {"kept_fp32": keep, "converter": converter_version(), "io": "float32"}}
        sample = (select_calibration_images(calib_dirs, FP16_CHECK_IMAGES, seed, lambda line: None)
                  if calib_dirs else [])
        if sample:
            inputs, what = preprocess(sample, data_config), "images from --calib-dir"
        else:
            inputs, what = preprocess(generated_images(8, data_config.input_size), data_config), "generated images"
        converted_bytes = converted.SerializeToString()
        reference = _features(source_bytes, inputs, data_config, str(model_path))
        fp16_gate = gate or Gate()
        checked = compare_features(reference, _features(converted_bytes, inputs, data_config, str(output)), fp16_gate)
        report.parity = checked.measures()
        note(_parity_line(precision, report.parity, what))
        if sample:  # generated images are not people: only real crops can judge the similarities
            report.gate_passed = checked.passed
            if not checked.passed and not allow_below_gate:
                raise GateRefused(f"{output}: not written: the FP16 model misses the accuracy gate "
                                  f"({'; '.join(checked.failures)} on {len(sample)} images of --calib-dir); "
                                  "--exclude the layers `reid-export parity --locate` names, or --allow-below-gate "
                                  "to write it anyway", report)
    else:
        try:
            converted, info = _quantize_int8(model, data_config, report, target, calib_dirs, calib_size, val_dirs,
                                             val_size, method, percentile, exclude, seed, num_bins, batch_size,
                                             reduce_range, threads, progress, gate or Gate(), max_fallback,
                                             allow_below_gate, note, equalize, bias_correction, score_retrieval)
        except GateRefused:
            report.seconds = time.time() - start
            raise
        extra_meta = {KEY_QUANTIZATION: info}
        if target == "tensorrt":
            report.qdq = check_tensorrt_qdq(converted)
            if not report.qdq.ok:
                raise ReidExportError(f"{output}: the Q/DQ graph breaks TensorRT's rules "
                                      f"({'; '.join(report.qdq.problems[:3])}); not written")
        converted_bytes = converted.SerializeToString()  # serialised once: fusion check and checker
        if target == "cpu":
            import onnxruntime

            report.fusion = check_ort_cpu_fusion(converted, threads or 1, serialized=converted_bytes)
            info["ort_cpu_fusion"] = {"quantized_convs": report.fusion.quantized_convs,
                                      "qlinear_convs": report.fusion.qlinear_convs, "onnxruntime": onnxruntime.__version__}
    try:
        onnx.checker.check_model(converted)
    except Exception as exc:
        raise ReidExportError(f"{output}: the {precision} graph fails onnx.checker "
                              f"({str(exc).splitlines()[0][:200]}); not written") from None
    if not report.parity.get("finite", True):
        raise ReidExportError(f"{output}: the {precision} model gives non-finite features; not written "
                              "(exclude the overflowing nodes with --exclude)")

    metadata = base_metadata(data_config, precision)
    props = get_metadata(model)
    metadata.update({KEY_SOURCE: Path(model_path).name, KEY_SOURCE_SHA256: sha256_file(model_path),
                     "reid_export.fp32_source": props.get(KEY_SOURCE), "reid_export.parity_vs_fp32": report.parity})
    metadata.update(extra_meta)
    converted.doc_string = f"reid-export {__version__}: {Path(model_path).name} -> {precision}"
    set_metadata(converted, metadata)
    report.speed = _speed_note(source_bytes, converted_bytes, data_config, threads, precision, report.target, output,
                               note)
    save_onnx(converted, output)
    report.written = True
    for line in notes:
        log(line)
    report.size_mb = output.stat().st_size / 1e6
    report.seconds = time.time() - start
    return report


def _quantize_int8(model, data_config, report, target, calib_dirs, calib_size, val_dirs, val_size, method, percentile,
                   exclude, seed, num_bins, batch_size, reduce_range, threads, progress, gate: Gate, max_fallback,
                   allow_below_gate, note, equalize: bool = True, bias_correction: bool = True,
                   score_retrieval: Callable | None = None) -> tuple[onnx.ModelProto, dict]:
    candidates = parse_methods(method, percentile)
    calib_paths, val_paths, held_out = select_split(calib_dirs, calib_size, val_dirs, val_size, seed, note)
    if len(val_paths) < PAIR_ERROR_MIN_IMAGES:
        note(f"accuracy gate: {len(val_paths)} held-out images are too few to measure the pairwise-similarity error "
             f"(needs {PAIR_ERROR_MIN_IMAGES}); only the cosines are gated (more crops, or --val-dir)")
    prepared = prepare(model, target, exclude)
    for line in prepared.notes:
        note(line)
    if target == "cpu":
        if reduce_range is None:
            reduce_range, why = weight_range_for_cpu()
            note(f"int8 cpu: {why} (--reduce-range / --no-reduce-range to choose)")
    else:
        reduce_range = False
    quantizable = prepared.quantizable_nodes()
    if max_fallback is None:
        max_fallback = math.ceil(len(quantizable) * 0.25)
    phase = time.time()
    calibration = calibrate(prepared, data_config, calib_paths, num_bins, batch_size, threads, progress)
    calib_seconds = time.time() - phase
    phase = time.time()
    val_inputs = preprocess(val_paths, data_config)
    objective = Objective(prepared.model, val_inputs, data_config, threads)
    means_paths = list(calib_paths[:EQUALIZE_IMAGES])

    def means_of(prep):
        def run():
            batches = calibration_batches(means_paths, data_config, prep.static_batch or batch_size,
                                          prep.static_batch is not None)
            return conv_input_means(prep.model, batches, threads, prep.head)
        return run if bias_correction else None

    variants = [Variant("plain", prepared, calibration, means_of(prepared))]
    eq_summary: dict = {"tried": False}
    if equalize:
        eq_variant, eq_summary = _equalised_variant(prepared, calibration, objective, data_config, calib_paths,
                                                    num_bins, batch_size, threads, progress)
        if eq_variant is not None:
            eq_variant.input_means = means_of(eq_variant.prepared)
            variants.append(eq_variant)
        note(f"int8: activation equalisation: {eq_summary['what']}")
    calib_seconds += eq_summary.get("seconds", 0.0)
    search_start = time.time()
    locate_inputs = val_inputs[:prepared.static_batch or LOCATE_IMAGES]
    if prepared.static_batch and len(locate_inputs) < prepared.static_batch:  # a static batch takes exactly its size
        locate_inputs = np.concatenate([locate_inputs, np.repeat(locate_inputs[-1:], prepared.static_batch
                                                                 - len(locate_inputs), axis=0)])
    result = search(variants, calibration, objective, gate, candidates, bool(reduce_range), max_fallback,
                    locate_inputs, progress, note, bias_correction)
    search_seconds = time.time() - search_start
    chosen, first = result.chosen, result.first_choice
    report.target, report.method = target, chosen.label
    report.calibration_images, report.held_out_images = len(calib_paths), len(val_paths)
    report.fallback_float = list(result.keep_float)
    report.kept_float = list(dict.fromkeys(prepared.head + prepared.user_excluded + prepared.float_sums
                                           + result.keep_float))
    report.parity = dict(chosen.objective)
    report.gate_passed = chosen.passed
    retrieval = None
    if held_out is not None and score_retrieval is not None:
        inputs = preprocess(held_out.paths, data_config)
        retrieval = score_retrieval(objective.features(prepared.model, inputs, prepared.static_batch),
                                    objective.features(result.model, inputs, prepared.static_batch),
                                    held_out.pids, held_out.camids, held_out.is_query)
        note(f"int8 {_describe_retrieval(retrieval)}")
    tried = " / ".join(dict.fromkeys(t.label for t in result.trials if not t.keep_float))  # labels hold commas
    report.search = {
        "gate": gate.to_dict(), "held_out_images": len(val_paths), "tried": [t.to_dict() for t in result.trials],
        "first_choice": first.label, "chosen": chosen.label, "objective_before_fallback": first.objective,
        "objective": chosen.objective, "passed": chosen.passed, "fallback_float": result.keep_float,
        "fallback_ranking": result.ranking, "max_fallback": max_fallback, "variant": chosen.variant,
        "bias_corrected": chosen.bias_corrected,
        "equalization": {k: v for k, v in eq_summary.items() if k != "what"},
        "seconds": {"calibration": round(calib_seconds, 1), "search": round(search_seconds, 1)},
        "held_out_retrieval": retrieval,
    }
    for t in result.trials:
        note(f"  tried {t.label}: {_objective_text(t.objective)}{'' if t.passed else ' (below the gate)'}")
    if result.keep_float:
        note(f"kept in float to meet the gate: {len(result.keep_float)} nodes ({', '.join(result.keep_float[:6])}"
             f"{', ...' if len(result.keep_float) > 6 else ''}); objective {_objective_text(first.objective)} -> "
             f"{_objective_text(chosen.objective)}")
    if not chosen.passed:
        what = (f"best {chosen.label}: {'; '.join(chosen.failures)} on {len(val_paths)} held-out images; tried {tried}"
                + (f" and up to {max((len(t.keep_float) for t in result.trials), default=0)} of {max_fallback} "
                   "allowed nodes in float" if max_fallback
                   else ", no fallback to float (--max-float 0)"))
        if not allow_below_gate:
            report.written = False
            raise GateRefused(
                f"{report.output}: not written: the INT8 model misses the accuracy gate ({what}); --precision fp16 "
                "recovers (it keeps the gate on every model measured: pairwise error 0.003-0.011, benchmarks/"
                "RESULTS.md), or a larger --max-float, --exclude the layers `reid-export parity --locate` names, "
                "other --calib-dir crops, or --allow-below-gate to write it anyway", report)
        note(f"warning: BELOW THE ACCURACY GATE ({what}); written because of --allow-below-gate and marked so "
             "in its metadata")
    else:
        note(f"accuracy gate passes with {chosen.label}: {_objective_text(chosen.objective)} on {len(val_paths)} "
             "held-out images")
    info = describe(prepared, bool(reduce_range))
    info.update({
        "method": chosen.method, "method_requested": method, "candidate": chosen.label,
        "equalised": chosen.variant == "equalised", "bias_corrected": chosen.bias_corrected,
        "equalization": {k: v for k, v in eq_summary.items() if k not in ("what", "seconds")},
        "float_sums": list(prepared.float_sums),
        "percentile": chosen.percentile if chosen.method == "percentile" else None,
        "num_bins": num_bins if chosen.method != "minmax" else None,
        "kept_float": report.kept_float, "fallback_float": result.keep_float,
        "gate": {**gate.to_dict(), "passed": chosen.passed, "below_gate": not chosen.passed},
        "objective": chosen.objective, "objective_before_fallback": first.objective,
        "tried": [{"label": t.label, "variant": t.variant, "bias_corrected": t.bias_corrected,
                   "kept_float": len(t.keep_float), "passed": t.passed,
                   "pair_error": t.objective["pair_error"], "mean_cosine": t.objective["mean_cosine"],
                   "min_cosine": t.objective["min_cosine"],
                   "top1": t.objective["top1_agreement"], "top5": t.objective["top5_agreement"]}
                  for t in result.trials],
        "calibration": {"sources": [str(d) for d in calib_dirs], "images": len(calib_paths), "requested": calib_size,
                        "seed": seed, "files_sha256": _file_list_digest(calib_paths)},
        "held_out": {"sources": [str(d) for d in (val_dirs or calib_dirs)], "images": len(val_paths),
                     "files_sha256": _file_list_digest(val_paths),
                     "identities": None if held_out is None else held_out.identities},
        "held_out_retrieval": retrieval,
    })
    return result.model, info


def _speed_note(source: bytes, converted: bytes, data_config: DataConfig, threads, precision: str, target, output,
                note) -> dict:
    """Time the new graph against FP32 here (ONNX Runtime CPU, a quick figure) and, when it is slower,
    name the faster route for this CPU (:func:`reid_export.cpuinfo.slower_route_note`)."""
    from ..cpuinfo import isa_flags, slower_route_note
    from .onnx_export import generated_images
    from .ort import relative_throughput

    try:
        inputs = preprocess(generated_images(2, data_config.input_size), data_config)
        ratios = relative_throughput(source, converted, inputs, threads)
    except Exception as exc:  # noqa: BLE001 - the speed note must never stop a good model from being written
        note(f"speed on this CPU: not measured ({type(exc).__name__})")
        return {}
    shown = ", ".join(f"{r:.2f}x at batch {b}" for b, r in ratios.items())
    note(f"speed on this CPU (ONNX Runtime, {threads or 'default'} threads, a quick figure; reid-export bench "
         f"measures): {shown} of FP32's throughput")
    slower = slower_route_note(output.name, precision, "onnxruntime", target, ratios)
    if slower:
        note(slower)
    return {"ratios": {str(b): round(r, 3) for b, r in ratios.items()}, "threads": threads, "cpu_isa": isa_flags(),
            "runtime": "onnxruntime cpu"}


def _describe_retrieval(result: dict) -> str:
    lo, hi = result["delta_mAP_ci95"]
    return (f"on held-out identities ({result['identities']} people never calibrated on; {result['queries']} queries, "
            f"{result['gallery']} gallery): fp32 Rank-1 {result['reference']['Rank-1']:.2f} / mAP "
            f"{result['reference']['mAP']:.2f}; d Rank-1 {result['delta_Rank-1']:+.2f}, d mAP "
            f"{result['delta_mAP']:+.2f} [95% CI {lo:+.2f}, {hi:+.2f}] (reported, not gated: a few hundred images)")


EQUALIZE_IMAGES = 128
EQUALIZE_MAX_REL_L2 = 1e-4


def _equalised_variant(prepared, calibration, objective: Objective, data_config: DataConfig, calib_paths, num_bins,
                       batch_size, threads, progress):
    """The activation-equalised graph and its calibration (None when nothing equalises), and a summary.

    The per-channel statistics come from the first ``EQUALIZE_IMAGES`` calibration images; the
    quantization step of each tensor in the plain graph (MSE-optimal range) weighs activation
    against weight rounding. The equalised FP32 graph must give the FP32 features on the held-out
    images (relative L2 <= ``EQUALIZE_MAX_REL_L2``) or it is not used."""
    import dataclasses

    from tqdm import tqdm

    from ..embeddings import Tolerances, compare
    from .equalize import equalize as equalize_model

    start = time.time()
    unsigned = prepared.target == "cpu"
    steps = {}
    for name, (lo, hi) in calibration.ranges("mse", DEFAULT_PERCENTILE, unsigned).items():
        steps[name] = (hi - lo) / 255.0 if unsigned else max(abs(lo), abs(hi)) / 127.0
    paths = list(calib_paths[:EQUALIZE_IMAGES])
    batch = prepared.static_batch or batch_size
    bar = tqdm(total=len(paths), desc="equalise: per-channel ranges", unit="img", disable=not progress, leave=False)
    try:
        model, summary = equalize_model(prepared.model, calibration_batches(paths, data_config, batch,
                                                                            prepared.static_batch is not None),
                                        steps, prepared.head, threads, bar)
    finally:
        bar.close()
    summary.update(tried=True, images=len(paths))
    if not summary.get("equalised"):
        summary.update(what=f"nothing to equalise ({summary['regions']} regions found)",
                       seconds=round(time.time() - start, 1))
        return None, summary
    check = compare(objective.reference, objective.features(model), Tolerances())
    summary["fp32_max_rel_l2"] = float(check.max_rel_l2)
    if not np.isfinite(check.max_rel_l2) or check.max_rel_l2 > EQUALIZE_MAX_REL_L2:
        summary.update(what=f"not used: the equalised FP32 graph differs from the original (relative L2 "
                            f"{check.max_rel_l2:.2e} > {EQUALIZE_MAX_REL_L2:g})", seconds=round(time.time() - start, 1))
        return None, summary
    eq_prepared = dataclasses.replace(prepared, model=model)
    eq_calibration = calibrate(eq_prepared, data_config, calib_paths, num_bins, batch_size, threads, progress)
    summary.update(seconds=round(time.time() - start, 1),
                   what=(f"{summary['equalised']} of {summary['regions']} channel regions rescaled "
                         f"({summary['tensors']} tensors, FP32 relative L2 {check.max_rel_l2:.1e}); every method "
                         "is tried on both graphs"))
    return Variant("equalised", eq_prepared, eq_calibration), summary


__all__ = ["quantize_file", "GateRefused", "QuantizeReport", "convert_fp16", "select_calibration_images", "select_images", "opset_of", "QDQ_OP_TYPES",
           "MIN_QDQ_OPSET", "FP16_MAX", "FP16_MIN_NORMAL", "FP16_MIN_SUBNORMAL", "Gate"]
