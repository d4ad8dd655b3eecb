"""The Python API: what a user scripts, each call returning a typed result with its gates and verdict.

.. code-block:: python

    from reid_export import api

    api.export_onnx("model_final.pth", "model.onnx", config="configs/Market1501/bagtricks_R50.yml")
    api.quantize("model.onnx", "model.int8.onnx", "int8", calib_dirs=["bounding_box_train/"])
    report = api.parity("model_final.pth", ["model.onnx", "model.int8.onnx"], ["crops/"])
    print(report.table()); assert report.passed
    ev = api.evaluate(["model.onnx", "model.int8.onnx"], "Market-1501-v15.09.15",
                      gates=api.EvalGates(max_map_drop=0.5))
    bench = api.bench(["model.onnx", "model.int8.onnx"], batch_sizes=[1, 16], threads=2)
    found = api.annotate_detected("vendor.onnx", "vendor.reid.onnx", "Market-1501-v15.09.15")  # --detect

Every result has ``passed`` (the gates' verdict), ``to_dict()`` (the JSON the CLI writes, with a
``schema_version``) and, for the verifiers, ``table()`` (what the CLI prints). The CLI commands are
thin wrappers around these calls: they parse options, call, print and set the exit code. A failed
gate is not an exception (the report says why); bad input is a :class:`ReidExportError` with one
line that names the file and the fix.
"""

from __future__ import annotations

from .bench.run import BenchReport
from .bench.run import run_bench as bench
from .embeddings import ParityResult, Tolerances
from .errors import ReidExportError, UsageError
from .export.onnx_export import ExportReport
from .export.onnx_export import export_checkpoint as export_onnx
from .export.quantize import QuantizeOptions, QuantizeReport
from .runtime import Encoder, open_encoder
from .serve.boxmot import BoxmotOptions, BoxmotResult
from .serve.boxmot import build as boxmot
from .serve.deepstream import DeepStreamOptions, DeepStreamResult
from .serve.deepstream import build as deepstream
from .serve.triton import RepoOptions, TritonReport
from .serve.triton import build_repository as triton
from .verify.detect import DetectReport
from .verify.detect import detect_and_annotate as annotate_detected
from .verify.retrieval import EvalOptions
from .verify.evaluation import DEFAULT_MAX_MAP_DROP, DEFAULT_MAX_R1_DROP, EvalGates, EvalReport, EvalRow
from .verify.evaluation import run_evaluation as evaluate
from .verify.parity import ParityReport
from .verify.collapse import check_collapse
from .verify.parity import run_parity as parity
from .verify.thresholds import TrackerThreshold, reference_threshold

def quantize(model, output, precision: str | None = None, **options) -> QuantizeReport:
    """:func:`reid_export.export.quantize.quantize_file` (same arguments: ``options=QuantizeOptions(...)`` or
    its fields as keywords), with held-out identities scored by
    :func:`reid_export.verify.heldout.score_held_out` unless ``score_retrieval`` is given (None: off). A model
    the gate refuses is not written: ``report.passed`` is False and ``report.refusal`` says why."""
    from .export.quantize import quantize_file
    from .verify.heldout import score_held_out

    options.setdefault("score_retrieval", score_held_out)
    return quantize_file(model, output, precision, **options)


__all__ = ["DEFAULT_MAX_MAP_DROP", "DEFAULT_MAX_R1_DROP", "BenchReport", "BoxmotOptions", "BoxmotResult",
           "DeepStreamOptions", "DeepStreamResult", "DetectReport", "Encoder", "EvalGates",
           "EvalOptions", "EvalReport", "EvalRow", "ExportReport", "ParityReport", "ParityResult", "QuantizeOptions", "RepoOptions", "TritonReport",
           "QuantizeReport",
           "ReidExportError", "Tolerances", "TrackerThreshold", "UsageError", "annotate_detected", "bench",
           "boxmot", "check_collapse", "deepstream", "evaluate", "export_onnx", "open_encoder", "parity", "quantize", "reference_threshold", "triton"]
