"""Checkpoint -> ONNX: input ``images`` float32 [batch, 3, H, W] 0..255 RGB, output ``features`` [batch, D].

Normalisation stays inside the graph; the data config, the tool version and the checkpoint's
sha256 go into ``metadata_props``. Every export is checked (``onnx.checker`` with full shape
inference, the output shape) and proven against torch with ONNX Runtime at two batch sizes; an
optional onnxslim pass is proven the same way, and a simplification that fails either check is
dropped (the verified unsimplified graph is written, with a warning). The graph that is written is
then checked end to end from image pixels: fed through the data config written with it, it must
give the features of the checkpoint's model fed the way it was trained (its own config before
``--opts``, at the export's input size and resize); a data config that does not describe what the
graph computes fails the export.

The exporter is torch's ``torch.export``-based one (``dynamo=True``, needs onnxscript) by default:
it is the maintained path since PyTorch 2.9 (the TorchScript exporter is deprecated), and with a
symbolic batch dimension it refuses, at export time, any code that would bake the batch size into
the graph (fast-reid's ``view(batch, ...)`` pitfall) instead of silently tracing a constant.
``exporter="torchscript"`` stays available for older setups.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np
import onnx
import torch

from .. import __version__
from ..console import say
from ..data_config import DataConfig
from ..errors import ReidExportError, UsageError
from ..fileio import check_output_path, sha256_file
from ..preprocess import ImageLike, preprocess
from ..embeddings import relative_l2
from .metadata import (KEY_EXPORT, KEY_SOURCE, KEY_SOURCE_SHA256, base_metadata, output_info, save_onnx,
                       set_metadata)

EXPORTERS = ("dynamo", "torchscript")
DEFAULT_OPSET = 18
MIN_OPSET = 13
INPUT_NAME = "images"
OUTPUT_NAME = "features"
PARITY_TOLERANCE = 1e-4
PIXELS_TOLERANCE = 1e-3  # end to end: the same pixels, two preprocessing routes (float order differs)


def max_opset() -> int:
    return int(onnx.defs.onnx_opset_version())


def generated_images(count: int, size: tuple[int, int], seed: int = 0) -> list[np.ndarray]:
    """Smooth random RGB uint8 images (upsampled noise) of roughly person-crop proportions.

    Smoothness matters: uniform per-pixel noise drives a CNN far from the statistics it was
    trained on and exaggerates rounding differences between frameworks.
    """
    rng = np.random.default_rng(seed)
    height, width = size
    images = []
    for _ in range(count):
        small = rng.integers(0, 256, (max(height // 8, 2), max(width // 8, 2), 3), dtype=np.uint8)
        big = cv2.resize(small, (width + width // 4, height + height // 4), interpolation=cv2.INTER_CUBIC)
        images.append(np.ascontiguousarray(big))
    return images


@contextlib.contextmanager
def _quiet_torch_export():
    """Silence the exporter's progress prints, deprecation warnings and 'torchvision not installed' logs."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._export",
                                                      "torch.fx.experimental.symbolic_shapes",
                                                      "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _strip_value_metadata(model: onnx.ModelProto) -> None:
    """Drop the exporter's per-node/per-value annotations (stack traces with local paths, fx names)."""
    for node in model.graph.node:
        del node.metadata_props[:]
    for value in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        del value.metadata_props[:]
    for init in model.graph.initializer:
        del init.metadata_props[:]


def export_module(model: torch.nn.Module, input_size: tuple[int, int], batch: int | None = None,
                  opset: int = DEFAULT_OPSET, exporter: str = "dynamo") -> onnx.ModelProto:
    """Export an eval-mode module taking [N, 3, H, W] to an ONNX ModelProto (``batch=None``: dynamic)."""
    if exporter not in EXPORTERS:
        raise UsageError(f"`exporter` must be one of {', '.join(EXPORTERS)}, got {exporter!r}")
    if not MIN_OPSET <= opset <= max_opset():
        raise UsageError(f"`opset` must be between {MIN_OPSET} and {max_opset()} (onnx {onnx.__version__}), "
                         f"got {opset}")
    model = model.eval()
    height, width = input_size
    # A dynamic export traces with batch 2: torch.export specialises sizes 0 and 1.
    example = torch.rand(batch or 2, 3, height, width, generator=torch.Generator().manual_seed(0)) * 255
    try:
        with _quiet_torch_export(), torch.no_grad():
            if exporter == "dynamo":
                if importlib.util.find_spec("onnxscript") is None:
                    raise ReidExportError("the dynamo exporter needs onnxscript: pip install onnxscript "
                                          "(or use `exporter` torchscript)")
                dynamic = ({0: torch.export.Dim("batch", min=1, max=65536)},) if batch is None else None
                program = torch.onnx.export(model, (example,), dynamo=True, input_names=[INPUT_NAME],
                                            output_names=[OUTPUT_NAME], opset_version=opset,
                                            dynamic_shapes=dynamic, optimize=True, external_data=False,
                                            verbose=False, report=False)
                proto = program.model_proto
            else:
                buffer = io.BytesIO()
                axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if batch is None else None
                torch.onnx.export(model, (example,), buffer, dynamo=False, input_names=[INPUT_NAME],
                                  output_names=[OUTPUT_NAME], opset_version=opset, dynamic_axes=axes,
                                  do_constant_folding=True)
                proto = onnx.load_from_string(buffer.getvalue())
    except ReidExportError:
        raise
    except Exception as exc:
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise ReidExportError(f"ONNX export ({exporter}) failed: {first[:300]} "
                              "(rerun with --debug for the details)") from exc
    _strip_value_metadata(proto)
    return proto


def check_model(model: onnx.ModelProto, batch: int | None, feat_dim: int | None,
                input_size: tuple[int, int]) -> None:
    """onnx.checker, strict shape inference with type checks, and the input/output signature."""
    try:
        onnx.checker.check_model(model)
        inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except Exception as exc:
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise ReidExportError(f"the exported graph fails onnx.checker / shape inference: {first[:300]}") from exc
    inp = model.graph.input[0].type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in inp.shape.dim]
    if len(dims) != 4 or list(dims[1:]) != [3, *input_size] or inp.elem_type != onnx.TensorProto.FLOAT:
        raise ReidExportError(f"the exported input has shape {dims}; expected [batch, 3, {input_size[0]}, "
                              f"{input_size[1]}] float32")
    if (batch is None) != isinstance(dims[0], str) or (batch is not None and dims[0] != batch):
        raise ReidExportError(f"the exported input batch dimension is {dims[0]!r}; expected "
                              f"{batch or 'a symbolic (dynamic) batch'}")
    _, out_shape, out_type = output_info(inferred)
    if out_type != onnx.TensorProto.FLOAT or len(out_shape) != 2:
        raise ReidExportError(f"the exported output has shape {out_shape}; expected [batch, D] float32")
    if feat_dim is not None and isinstance(out_shape[1], int) and out_shape[1] != feat_dim:
        raise ReidExportError(f"the exported output has {out_shape[1]} features; the model has {feat_dim}")


@dataclass
class ParityCheck:
    name: str
    batch_sizes: tuple[int, ...]
    num_images: int
    max_rel_l2: float
    per_batch: dict = field(default_factory=dict)

    limit: float = float("nan")

    @property
    def passed(self) -> bool:
        return bool(self.max_rel_l2 <= self.limit)

    def to_dict(self) -> dict:
        return {"name": self.name, "batch_sizes": list(self.batch_sizes), "images": self.num_images,
                "max_rel_l2": self.max_rel_l2, "limit": self.limit, "passed": self.passed,
                "per_batch": {str(k): v for k, v in self.per_batch.items()}}

    def line(self) -> str:
        sizes = " and ".join(map(str, self.batch_sizes))
        return (f"parity {self.name}: ONNX Runtime vs torch on {self.num_images} images at batch {sizes}: "
                f"max relative L2 {self.max_rel_l2:.2e}")


def parity_batch_sizes(batch: int | None) -> tuple[int, int]:
    return (1, 3) if batch is None else (batch, batch + 1)


def onnx_vs_torch(model_bytes: bytes, reference: np.ndarray, inputs: np.ndarray, data_config: DataConfig,
                  batch_sizes: Sequence[int], name: str = "") -> ParityCheck:
    """Run ``inputs`` through ONNX Runtime (CPU) at each batch size; compare with ``reference``."""
    from .ort import OrtRunner, make_session

    encoder = OrtRunner(make_session(model_bytes), name or "model.onnx")
    worst = 0.0
    per_batch = {}
    for bs in batch_sizes:
        out = np.concatenate([encoder(inputs[i:i + bs]) for i in range(0, len(inputs), bs)])
        if out.shape != reference.shape:
            raise ReidExportError(f"ONNX Runtime gives features of shape {out.shape}, torch {reference.shape}")
        if not np.isfinite(out).all():
            raise ReidExportError(f"ONNX Runtime gives non-finite features at batch {bs}")
        rel = float(relative_l2(out, reference).max())
        per_batch[bs] = rel
        worst = max(worst, rel)
    return ParityCheck(name, tuple(batch_sizes), len(inputs), worst, per_batch)


def trained_reference(model: torch.nn.Module, checkpoint, config, images, data_config: DataConfig) -> np.ndarray:
    """Features of ``images`` from the checkpoint's model as trained: its own stored preprocessing and
    the pixel mean/std it was trained with (``--opts`` may have changed both), at the export's input
    size and resize (a legitimate export choice: the model is fully convolutional)."""
    from dataclasses import replace

    from ..checkpoint import trained_preprocessing

    trained, mean, std = trained_preprocessing(checkpoint, config)
    trained = replace(trained, height=data_config.height, width=data_config.width,
                      interpolation=data_config.interpolation, extra=dict(trained.extra))
    inputs = preprocess(images, trained)
    saved = {}
    for name, value in (("pixel_mean", mean), ("pixel_std", std)):
        buffer = getattr(model, name, None)
        if isinstance(buffer, torch.Tensor) and buffer.numel() == 3:
            saved[name] = buffer.clone()
            buffer.copy_(torch.tensor(value, dtype=buffer.dtype).view_as(buffer))
    try:
        with torch.no_grad():
            return model(torch.from_numpy(inputs)).numpy()
    finally:
        for name, value in saved.items():
            getattr(model, name).copy_(value)


@dataclass
class PixelsCheck:
    """End to end from image pixels: the written ONNX fed through the data config written with it,
    against the checkpoint's model fed the way it was trained. Fails when the data config does not
    describe what the graph computes (e.g. ``--opts MODEL.PIXEL_MEAN [0,0,0]``)."""

    source: str
    data_config: DataConfig
    reference: np.ndarray | None = None
    max_rel_l2: float = float("nan")
    min_cosine: float = float("nan")
    name: str = "pixels"
    limit: float = PIXELS_TOLERANCE

    def run(self, model_bytes: bytes, inputs: np.ndarray, output) -> str | None:
        """Measure; the one-line refusal when the data config does not reproduce the checkpoint, else None."""
        from ..embeddings import compare, Tolerances
        from .ort import OrtRunner, make_session

        out = OrtRunner(make_session(model_bytes), "model.onnx")(inputs)
        result = compare(self.reference, out, Tolerances(), "export")
        self.max_rel_l2, self.min_cosine = result.max_rel_l2, result.min_cosine
        if self.passed:
            return None
        c = self.data_config
        return (f"{output}: the data config written with it ({c.channel_order} 0..{c.pixel_scale:g}, mean "
                f"{[round(v, 3) for v in c.mean]}, std {[round(v, 3) for v in c.std]}, "
                f"{'inside' if c.normalized_inside else 'outside'} the graph) does not reproduce the checkpoint as "
                f"trained from image pixels (max relative L2 {self.max_rel_l2:.3g}, min cosine {self.min_cosine:.3f}); "
                "drop the `opts` that change MODEL.PIXEL_MEAN / MODEL.PIXEL_STD; not written")

    @property
    def passed(self) -> bool:
        return bool(self.max_rel_l2 <= self.limit)

    def to_dict(self) -> dict:
        return {"name": self.name, "images": self.source, "max_rel_l2": self.max_rel_l2,
                "min_cosine": self.min_cosine, "limit": self.limit, "passed": self.passed}

    def line(self) -> str:
        return (f"parity {self.name}: ONNX through its written data config vs the checkpoint as trained, from the "
                f"pixels of {self.source}: max relative L2 {self.max_rel_l2:.2e}")


@dataclass
class ExportReport:
    """``passed``: every check held and the file was written. A graph that fails its check against torch
    (or from image pixels) is not written: ``refusal`` says why in one line, ``checks`` what was measured."""

    output: Path
    opset: int
    batch: str
    exporter: str
    simplified: bool
    nodes: int
    size_mb: float
    checks: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    seconds: float = 0.0
    written: bool = False
    refusal: str | None = None

    @property
    def passed(self) -> bool:
        return self.written

    def to_dict(self) -> dict:
        from ..report import report_header

        return {**report_header("onnx"), "output": str(self.output), "written": self.written, "passed": self.passed,
                "refusal": self.refusal, "opset": self.opset, "batch": self.batch, "exporter": self.exporter,
                "simplified": self.simplified, "nodes": self.nodes, "size_mb": round(self.size_mb, 3),
                "checks": [c.to_dict() for c in self.checks], "notes": list(self.notes),
                "seconds": round(self.seconds, 1)}

    def table(self) -> str:
        from ..report import format_size, format_table

        rows = [[c.name, f"{c.max_rel_l2:.2e}", f"{c.limit:.0e}", "pass" if c.passed else "FAIL"] for c in self.checks]
        lines = [format_table(["check", "max rel L2", "limit", "result"], rows)]
        if self.written:
            lines.append(f"wrote {self.output} (opset {self.opset}, batch {self.batch}, {self.nodes} nodes, "
                         f"{format_size(self.size_mb)}"
                         f"{', simplified' if self.simplified else ''}) in {self.seconds:.0f} s")
        else:
            lines.append(self.refusal or f"{self.output}: not written")
        return "\n".join(lines)


def _simplify(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnxslim

    with _quiet_torch_export():
        return onnxslim.slim(model)


def export_checkpoint(checkpoint: str | Path, output: str | Path, config: str | Path | None = None,
                      opts: Sequence[str] = (), opset: int = DEFAULT_OPSET, batch: int | None = None,
                      simplify: bool = True, exporter: str = "dynamo",
                      parity_images: Sequence[ImageLike] | None = None, tolerance: float = PARITY_TOLERANCE,
                      allow_partial: bool = False, log: Callable[[str], None] = say) -> ExportReport:
    """Export a checkpoint to ``output``, written only when every check passes (else ``report.refusal``)."""
    from ..checkpoint import load_model_from_checkpoint

    from .metadata import refuse_openvino_ir

    refuse_openvino_ir(checkpoint, "onnx")
    start = time.time()
    output = check_output_path(output)
    if batch is not None and batch < 1:
        raise UsageError(f"`batch` must be 'dynamic' or a positive integer, got {batch}")
    if not MIN_OPSET <= opset <= max_opset():
        raise UsageError(f"`opset` must be between {MIN_OPSET} and {max_opset()} (onnx {onnx.__version__}), "
                         f"got {opset}")
    model, _, data_config = load_model_from_checkpoint(checkpoint, config, opts, allow_partial=allow_partial)
    if not data_config.model_name:
        data_config.model_name = Path(checkpoint).stem
    log(f"exporting {checkpoint} ({data_config.model_name}, input {data_config.height}x{data_config.width}, "
        f"{model.feat_dim}-d features) with the {exporter} exporter at opset {opset}, "
        f"batch {'dynamic' if batch is None else batch}")
    proto = export_module(model, data_config.input_size, batch, opset, exporter)
    check_model(proto, batch, model.feat_dim, data_config.input_size)

    # Inputs for the self-check: the given crops, else generated ones; torch computes the reference once.
    sizes = parity_batch_sizes(batch)
    images = list(parity_images) if parity_images else generated_images(max(sizes), data_config.input_size)
    source = f"{len(images)} {'given' if parity_images else 'generated'} images"
    inputs = preprocess(images, data_config)
    with torch.no_grad():
        reference = model(torch.from_numpy(inputs)).numpy()

    pixels_check = PixelsCheck(source, data_config)
    if list(opts):  # --opts may change what the graph computes from pixels: the reference is the model as trained
        pixels_check.reference = trained_reference(model, checkpoint, config, images, data_config)
    else:
        pixels_check.reference = reference

    metadata = base_metadata(data_config, "fp32")
    metadata.update({KEY_SOURCE: Path(checkpoint).name, KEY_SOURCE_SHA256: sha256_file(checkpoint)})
    report = ExportReport(output=output, opset=opset, batch="dynamic" if batch is None else str(batch),
                          exporter=exporter, simplified=False, nodes=len(proto.graph.node), size_mb=0.0)
    check = onnx_vs_torch(proto.SerializeToString(), reference, inputs, data_config, sizes, "export")
    check.limit = tolerance
    report.checks.append(check)
    log(check.line() + f" ({source})")
    if not check.passed:
        report.refusal = (f"{output}: the exported graph disagrees with torch (max relative L2 "
                          f"{check.max_rel_l2:.2e} > {tolerance:.0e}); not written")
        report.seconds = time.time() - start
        return report

    final = _simplified(proto, report, batch, model.feat_dim, reference, inputs, data_config, sizes, tolerance,
                        log) if simplify else proto
    refusal = pixels_check.run(final.SerializeToString(), inputs, output)
    report.checks.append(pixels_check)
    log(pixels_check.line())
    if refusal is not None:
        report.refusal, report.seconds = refusal, time.time() - start
        return report

    _write(final, output, report, metadata, checkpoint, source, pixels_check, data_config)
    report.written = True
    report.nodes = len(final.graph.node)
    report.size_mb = output.stat().st_size / 1e6
    report.seconds = time.time() - start
    return report


def _simplified(proto, report: ExportReport, batch, feat_dim: int, reference, inputs, data_config, sizes,
                tolerance: float, log) -> onnx.ModelProto:
    """onnxslim's graph when it passes the same checks as the export (``report.simplified``), else ``proto``
    with a note in ``report.notes`` saying why."""
    final = proto
    try:
        slim = _simplify(proto)
        check_model(slim, batch, feat_dim, data_config.input_size)
        slim_check = onnx_vs_torch(slim.SerializeToString(), reference, inputs, data_config, sizes, "simplified")
        slim_check.limit = tolerance
    except ReidExportError as exc:
        report.notes.append(f"warning: the simplified graph failed its checks ({exc}); "
                            "writing the unsimplified graph")
    except Exception as exc:  # onnxslim can fail in many ways on unusual graphs
        report.notes.append(f"warning: onnxslim failed ({type(exc).__name__}: {str(exc)[:200]}); "
                            "writing the unsimplified graph")
    else:
        report.checks.append(slim_check)
        log(slim_check.line() + f" ({len(proto.graph.node)} -> {len(slim.graph.node)} nodes)")
        if not slim_check.passed:
            report.notes.append(f"warning: the simplified graph disagrees with torch (max relative L2 "
                                f"{slim_check.max_rel_l2:.2e}); writing the unsimplified graph")
        else:
            final = slim
            report.simplified = True
    for note in report.notes:
        log(note)
    return final


def _write(final: onnx.ModelProto, output: Path, report: ExportReport, metadata: dict, checkpoint, source: str,
           pixels_check, data_config) -> None:
    """The checked graph with its name, doc string and metadata (data config, source, how it was exported)."""
    final.graph.name = data_config.model_name or "reid"
    final.doc_string = f"reid-export {__version__}: {Path(checkpoint).name} -> ONNX (fp32)"
    metadata[KEY_EXPORT] = {
        "exporter": report.exporter, "opset": report.opset, "batch": report.batch, "simplified": report.simplified,
        "torch": torch.__version__.split("+")[0], "onnx": onnx.__version__,
        "parity_max_rel_l2": max(c.max_rel_l2 for c in report.checks if isinstance(c, ParityCheck)),
        "parity_images": source, "pixels_max_rel_l2": pixels_check.max_rel_l2,
    }
    set_metadata(final, metadata)
    save_onnx(final, output)
