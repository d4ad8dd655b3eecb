"""``quantize_file``: the FP16 or INT8 (Q/DQ) variant of an FP32 ONNX model, written only when it is good.

Load and check the FP32 model, run the step (:func:`.fp16.fp16_variant` or :func:`.int8.quantize_int8`),
check the graph (TensorRT's Q/DQ rules, ONNX Runtime's CPU fusion, ``onnx.checker``, finite features),
write it with its metadata (the data config, the source, the comparison with FP32 and, for INT8, the
search record), and time it against FP32 on this CPU. A model below the gate is not written
(``report.passed`` False, ``report.refusal`` says why in one line) unless ``allow_below_gate``; bad
input raises :class:`~reid_export.errors.ReidExportError` with one line.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import onnx

from ... import __version__
from ...console import say
from ...data_config import DataConfig
from ...errors import ReidExportError, options_or_fields
from ...fileio import check_output_path, sha256_file
from ...preprocess import preprocess
from ..graph import ensure_node_names, resolve_excludes
from ..metadata import (KEY_FP16, KEY_QUANTIZATION, KEY_SOURCE, KEY_SOURCE_SHA256, base_metadata, get_metadata,
                        load_onnx, model_precision, require_data_config, save_onnx, set_metadata)
from .fp16 import converter_version, fp16_variant
from .int8 import quantize_int8
from .options import QuantizeOptions
from .qdq_check import check_ort_cpu_fusion, check_tensorrt_qdq
from .report import QuantizeReport

FP16_RECOVERY = ("`precision` fp16 recovers (it keeps the gate on every model measured: pairwise error 0.003-0.011, "
                 "benchmarks/RESULTS.md)")


def load_fp32(model_path: str | Path) -> tuple[onnx.ModelProto, DataConfig]:
    """The FP32 model to quantize and its data config (one clear error for anything else)."""
    model = load_onnx(model_path)
    data_config = require_data_config(model, model_path)
    precision = model_precision(model)
    if precision != "fp32":
        raise ReidExportError(f"{model_path}: the model is already {precision}; quantize the FP32 model")
    ensure_node_names(model)
    return model, data_config


def quantize_file(model_path: str | Path, output: str | Path, precision: str | None = None, *,
                  options: QuantizeOptions | None = None, log: Callable[[str], None] = say,
                  score_retrieval: Callable | None = None, **fields) -> QuantizeReport:
    """Make the FP16 or INT8 variant of an FP32 ONNX model; ``output`` is written only when it passes.

    Give ``options`` (:class:`QuantizeOptions`) or its fields as keywords (``precision``, ``target``,
    ``calib_dirs``, ``gate``, ``max_float``, ...). ``score_retrieval(reference, candidate, pids, camids,
    is_query) -> dict``: when the calibration folders' names let whole identities be held out
    (:func:`.images.select_split`), FP32 and the chosen INT8 graph are scored on them with it
    (``reid_export.verify.heldout.score_held_out``; ``reid_export.api.quantize`` passes it) and the result
    is reported beside the fidelity."""
    from ..metadata import refuse_openvino_ir

    if options is None or precision is not None:  # precision is QuantizeOptions' first field
        fields["precision"] = precision
    options = options_or_fields(QuantizeOptions, options, fields, "quantize_file")
    refuse_openvino_ir(model_path, "quantize")
    start = time.time()
    options.check()
    output = check_output_path(output)
    model, data_config = load_fp32(model_path)
    resolve_excludes(model, options.exclude)  # an unknown --exclude fails before any work is done
    report = QuantizeReport(output=output, precision=options.precision)
    # Notes (images used, opset upgrade, FP16 weight range, what was tried) are printed once the verdict
    # is in: a run that fails (a corrupt calibration image, say) prints its one error line and nothing else.
    note = report.notes.append
    if options.precision == "fp16":
        converted, extra_meta = _fp16(model, data_config, options, report, note)
    else:
        converted, extra_meta = _int8(model, data_config, options, report, note, score_retrieval)
    if report.refusal is not None:  # not written: the refusal is the one line to say (the notes stay in the report)
        report.seconds = time.time() - start
        return report
    converted_bytes = _check(converted, options, report)
    metadata = base_metadata(data_config, options.precision)
    metadata.update({KEY_SOURCE: Path(model_path).name, KEY_SOURCE_SHA256: sha256_file(model_path),
                     "reid_export.fp32_source": get_metadata(model).get(KEY_SOURCE),
                     "reid_export.parity_vs_fp32": report.parity})
    metadata.update(extra_meta)
    if report.fusion is not None:
        import onnxruntime

        metadata[KEY_QUANTIZATION]["ort_cpu_fusion"] = {
            "quantized_convs": report.fusion.quantized_convs, "qlinear_convs": report.fusion.qlinear_convs,
            "onnxruntime": onnxruntime.__version__}
    converted.doc_string = f"reid-export {__version__}: {Path(model_path).name} -> {options.precision}"
    set_metadata(converted, metadata)
    report.speed = _speed_note(model.SerializeToString(), converted_bytes, data_config, options.threads,
                               options.precision, report.target, output, note)
    save_onnx(converted, output)
    report.written = True
    for line in report.notes:
        log(line)
    report.size_mb = output.stat().st_size / 1e6
    report.seconds = time.time() - start
    return report


def _fp16(model, data_config, options: QuantizeOptions, report: QuantizeReport, note):
    result = fp16_variant(model, data_config, options, note)
    report.kept_float, report.parity, report.gate_passed = result.kept_fp32, result.parity, result.gate_passed
    p = result.parity
    note(f"fp16 vs fp32 (ONNX Runtime CPU) on {p['images']} {result.images}: pair error {p['pair_error']:.4f}, "
         f"min cosine {p['min_cosine']:.5f}, mean cosine {p['mean_cosine']:.5f}, max relative L2 {p['max_rel_l2']:.2e}")
    if result.gate_passed is False and not options.allow_below_gate:
        report.refusal = (f"{report.output}: not written: the FP16 model misses the accuracy gate "
                          f"({'; '.join(result.failures)} on {result.count} images of `calib_dirs`); `exclude` the "
                          "layers `reid-export parity --locate` names, or `allow_below_gate` to write it anyway")
    return result.model, {KEY_FP16: {"kept_fp32": result.kept_fp32, "converter": converter_version(),
                                     "io": "float32"}}


def _int8(model, data_config, options: QuantizeOptions, report: QuantizeReport, note, score_retrieval):
    result = quantize_int8(model, data_config, options, note, score_retrieval)
    record = result.record
    report.target, report.method, report.search = options.target, record.chosen, record
    report.calibration_images, report.held_out_images = record.calibration["images"], record.held_out["images"]
    report.kept_float, report.parity, report.gate_passed = record.kept_float, dict(record.objective), record.passed
    if not record.passed:
        if not options.allow_below_gate:
            report.refusal = (f"{report.output}: not written: the INT8 model misses the accuracy gate "
                              f"({result.refusal_detail}); {FP16_RECOVERY}, or a larger `max_float`, `exclude` the "
                              "layers `reid-export parity --locate` names, other `calib_dirs` crops, or "
                              "`allow_below_gate` to write it anyway")
        else:
            note(f"warning: BELOW THE ACCURACY GATE ({result.refusal_detail}); written because of "
                 "`allow_below_gate` and marked so in its metadata")
    return result.model, {KEY_QUANTIZATION: {**result.form, "below_gate": not record.passed,
                                             "search": record.to_dict()}}


def _check(converted: onnx.ModelProto, options: QuantizeOptions, report: QuantizeReport) -> bytes:
    """TensorRT's Q/DQ rules, ONNX Runtime's CPU fusion, ``onnx.checker``, finite features: the
    serialised graph, or one error line (nothing written)."""
    output, precision = report.output, options.precision
    if precision == "int8" and options.target == "tensorrt":
        report.qdq = check_tensorrt_qdq(converted)
        if not report.qdq.ok:
            raise ReidExportError(f"{output}: the Q/DQ graph breaks TensorRT's rules "
                                  f"({'; '.join(report.qdq.problems[:3])}); not written")
    converted_bytes = converted.SerializeToString()  # serialised once: fusion check and checker
    if precision == "int8" and options.target == "cpu":
        report.fusion = check_ort_cpu_fusion(converted, options.threads or 1, serialized=converted_bytes)
    try:
        onnx.checker.check_model(converted)
    except Exception as exc:
        raise ReidExportError(f"{output}: the {precision} graph fails onnx.checker "
                              f"({str(exc).splitlines()[0][:200]}); not written") from None
    if not report.parity.get("finite", True):
        raise ReidExportError(f"{output}: the {precision} model gives non-finite features; not written "
                              "(exclude the overflowing nodes with `exclude`)")
    return converted_bytes


def _speed_note(source: bytes, converted: bytes, data_config: DataConfig, threads, precision: str, target, output,
                note) -> dict:
    """Time the new graph against FP32 here (ONNX Runtime CPU, a quick figure) and, when it is slower,
    name the faster route for this CPU (:func:`reid_export.cpuinfo.slower_route_note`)."""
    from ...cpuinfo import isa_flags, slower_route_note
    from ..onnx_export import generated_images
    from ..ort import relative_throughput

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
    return {"ratios": {str(b): round(r, 3) for b, r in ratios.items()}, "threads": threads, "cpu_flags": isa_flags(),
            "runtime": "onnxruntime cpu"}


__all__ = ["quantize_file", "load_fp32", "FP16_RECOVERY"]
