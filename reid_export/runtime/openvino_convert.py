"""ONNX -> OpenVINO IR (``.xml`` + ``.bin``) with the data config kept, and ``annotate`` for IRs from elsewhere.

``convert_file`` reads the ONNX with OpenVINO's converter (``openvino.convert_model``; FP32, FP16
and Q/DQ INT8 graphs as they are), writes the data config and the provenance into the IR's
``rt_info`` (section ``reid_export``), optionally compresses the weights to FP16, and proves the
written IR before it is put in place: OpenVINO (CPU plugin, f32 inference precision) against ONNX
Runtime on the same ONNX, at two batch sizes, with the parity gate of the IR's precision
(``reid_export.embeddings``: FP32 cosine >= 0.99999 and relative L2 <= 1e-4 per image, as the ONNX export's
check; FP16 / INT8 on the embedding). A failing check writes nothing.

The IR is two files; both are written into a temporary folder beside the output and renamed
into place only after the check (the ``.bin`` first, then the ``.xml`` that names it).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .. import __version__
from ..console import say
from ..data_config import DataConfig
from ..errors import ReidExportError, UsageError
from ..fileio import check_input_file, check_output_path, sha256_file
from .openvino_backend import (RT_SECTION, _first_line, get_core, import_openvino, open_model, read_model,
                                        read_data_config, static_shape)
from ..export.annotate import AnnotateReport
from ..preprocess import ImageLike, preprocess

PARITY_BATCHES = (1, 3)


def _check_ir_output(output: str | Path) -> Path:
    output = check_output_path(output)
    if output.suffix.lower() != ".xml":
        raise UsageError(f"{output}: an OpenVINO IR is written as NAME.xml (+ NAME.bin); give a name ending in .xml")
    check_output_path(output.with_suffix(".bin"))
    return output


def set_rt(model, key: str, value) -> None:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    model.set_rt_info(text, [RT_SECTION, key])


def save_ir(model, output: Path, compress_to_fp16: bool = False,
            check: Callable[[Path], None] | None = None) -> Path:
    """Save ``model`` as ``output`` (.xml/.bin) via a temporary folder; ``check(tmp_xml)`` runs on the
    saved files before they are renamed into place (an exception there leaves the old files)."""
    ov = import_openvino()
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.stem}.", suffix=".ir-tmp", dir=output.parent))
    try:
        tmp_xml = tmp / output.name
        try:
            ov.save_model(model, str(tmp_xml), compress_to_fp16=compress_to_fp16)
        except Exception as exc:  # noqa: BLE001 - disk full, permissions, ...
            raise ReidExportError(f"{output}: OpenVINO could not write the IR ({_first_line(exc)})") from None
        if check is not None:
            check(tmp_xml)
        os.replace(tmp_xml.with_suffix(".bin"), output.with_suffix(".bin"))
        os.replace(tmp_xml, output)
    except OSError as exc:
        raise ReidExportError(f"{output}: could not be written ({exc.strerror or exc})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output


@dataclass
class ConvertReport:
    output: Path
    precision: str
    compressed_fp16: bool
    batch: str
    parity: list = field(default_factory=list)  # ParityResult per batch size
    seconds: float = 0.0
    size_mb: float = 0.0

    def lines(self) -> list[str]:
        out = []
        for batch, res in self.parity:
            out.append(f"parity openvino: OpenVINO (CPU, f32) vs ONNX Runtime on {res.num_images} images at batch "
                       f"{batch}: min cosine {res.min_cosine:.6f}, max relative L2 {res.max_rel_l2:.2e} "
                       f"({res.precision} gate: {'pass' if res.passed else 'FAIL ' + '; '.join(res.failures)})")
        return out


def convert_file(model_path: str | Path, output: str | Path, fp16: bool = False, batch: int | None = None,
                 parity_images: Sequence[ImageLike] | None = None, threads: int | None = None,
                 min_cosine: float | None = None, max_rel_l2: float | None = None,
                 log: Callable[[str], None] = say) -> ConvertReport:
    """Convert an ONNX model (with a reid-export data config) to an IR at ``output``; written only when
    the IR passes its parity check against ONNX Runtime."""
    from .onnx_backend import open_onnx
    from ..embeddings import compare
    from ..export.onnx_export import generated_images

    start = time.time()
    ov = import_openvino()
    model_path = check_input_file(model_path, "ONNX model")
    if model_path.suffix.lower() != ".onnx":
        raise UsageError(f"{model_path}: reid-export openvino converts ONNX models (.onnx); an .xml is already an "
                         "OpenVINO IR (give it a data config with reid-export annotate)")
    output = _check_ir_output(output)
    if batch is not None and batch < 1:
        raise UsageError(f"`batch` must be 'dynamic' or a positive integer, got {batch}")
    reference = open_onnx(model_path, threads=threads)  # refuses an ONNX without a data config, with the fix
    data_config: DataConfig = reference.data_config
    source_precision = reference.precision
    precision = "fp16" if fp16 and source_precision == "fp32" else source_precision
    log(f"converting {model_path} ({source_precision}, input {data_config.height}x{data_config.width}) to OpenVINO "
        f"{ov.__version__.split('-')[0]} IR{', FP16 weights' if fp16 else ''}, batch "
        f"{'dynamic' if batch is None else batch}")
    model = _convert(ov, model_path, batch, data_config)

    # the self-check's inputs and reference, computed once
    sizes = PARITY_BATCHES if batch is None else (batch, batch)
    images = list(parity_images) if parity_images else generated_images(max(sizes) * 2, data_config.input_size)
    source = f"{len(images)} {'given' if parity_images else 'generated'} images"
    inputs = preprocess(images, data_config)
    expected = np.concatenate([reference(inputs[i:i + sizes[0]]) for i in range(0, len(inputs), sizes[0])])
    reference.close()
    tol = _parity_tolerance(precision, min_cosine, max_rel_l2, bool(parity_images))
    report = ConvertReport(output=output, precision=precision, compressed_fp16=fp16,
                           batch="dynamic" if batch is None else str(batch))

    def check(tmp_xml: Path) -> None:
        saved = read_model(tmp_xml)
        encoder = open_model(saved, tmp_xml, device="openvino:f32", threads=threads, data_config=data_config,
                             precision=precision)
        try:
            for bs in dict.fromkeys(sizes):
                got = np.concatenate([encoder(inputs[i:i + bs]) for i in range(0, len(inputs), bs)])
                res = compare(expected, got, tol, str(output), "openvino", precision)
                report.parity.append((bs, res))
        finally:
            encoder.close()
        for line in report.lines():
            log(line + f" ({source})")
        failed = [res for _, res in report.parity if not res.passed]
        if failed:
            raise ReidExportError(f"{output}: the OpenVINO IR disagrees with ONNX Runtime ({'; '.join(failed[0].failures)}"
                                  f", {precision} gate); not written")

    _set_ir_metadata(model, model_path, data_config, precision, {
        "openvino": ov.__version__, "compress_to_fp16": fp16, "batch": report.batch,
        "source_precision": source_precision, "parity_images": source, "parity_gate": precision})
    save_ir(model, output, compress_to_fp16=fp16, check=check)
    report.seconds = time.time() - start
    report.size_mb = (output.stat().st_size + output.with_suffix(".bin").stat().st_size) / 1e6
    return report


def _convert(ov, model_path: Path, batch: int | None, data_config: DataConfig):
    """The ONNX read by OpenVINO, its input reshaped to [batch or dynamic, 3, H, W]."""
    try:
        model = ov.convert_model(str(model_path))
    except Exception as exc:  # noqa: BLE001
        raise ReidExportError(f"{model_path}: OpenVINO cannot convert it ({_first_line(exc)})") from None
    name = model.inputs[0].get_any_name()
    dims = [-1 if batch is None else batch, 3, data_config.height, data_config.width]
    try:
        model.reshape({name: ov.PartialShape(dims)})
    except Exception as exc:  # noqa: BLE001
        raise ReidExportError(f"{model_path}: OpenVINO cannot give the model input the shape {dims} "
                              f"({_first_line(exc)}); use `batch` N with the ONNX's own batch size") from None
    return model


def _parity_tolerance(precision: str, min_cosine: float | None, max_rel_l2: float | None, given_images: bool):
    """The IR's gate against ONNX Runtime."""
    from ..embeddings import Tolerances

    tol = Tolerances.for_precision(precision, min_cosine=min_cosine, max_rel_l2=max_rel_l2)
    # FP32: the ONNX export's criterion (cosine and relative L2 per image), not parity's elementwise
    # atol/rtol: OpenVINO's and ONNX Runtime's kernels sum in other orders, and on BoT-R50 a few
    # near-zero features of 10240 differ by > 1e-4 absolute and > 1e-3 relative at relative L2 5e-5
    tol.atol = tol.rtol = None
    if not given_images:  # generated images are not crops of people: how their similarities move says nothing
        tol.max_pair_error = None
    return tol


def _set_ir_metadata(model, model_path: Path, data_config: DataConfig, precision: str, export: dict) -> None:
    """What reid-export records in the IR's rt_info: data config, precision, version, source, how it was made."""
    set_rt(model, "data_config", data_config.to_json())
    set_rt(model, "precision", precision)
    set_rt(model, "version", __version__)
    set_rt(model, "source", model_path.name)
    set_rt(model, "source_sha256", sha256_file(model_path))
    set_rt(model, "export", export)
    model.set_friendly_name(data_config.model_name or model_path.stem)


def annotate_ir(model_path: str | Path, output: str | Path, data_config: DataConfig,
                log: Callable[[str], None] = say) -> AnnotateReport:
    """Write ``data_config`` into an IR from elsewhere (e.g. an Open Model Zoo model) as ``output``.

    The model is compiled and run once at the stated size before anything is written; the feature
    dimension is recorded from what it returns. The graph and its weights are saved unchanged.
    """
    from .openvino_backend import graph_precision
    from ..export.annotate import check_units

    output = _check_ir_output(output)
    model = read_model(model_path)
    check_units(data_config)
    shape = static_shape(model)
    if len(shape) != 4:
        raise ReidExportError(f"{model_path}: the model input has shape {shape}; expected [N, 3, H, W] images")
    if shape[1] is not None and shape[1] != 3:
        raise ReidExportError(f"{model_path}: the model input has {shape[1]} channels; expected 3 (an image)")
    for axis, want in ((2, data_config.height), (3, data_config.width)):
        if shape[axis] is not None and shape[axis] != want:
            raise UsageError(f"`data_config.input_size` {data_config.height} {data_config.width} does not match "
                             f"the model input {shape}; use `data_config.input_size` {shape[2]} {shape[3]}")
    previous = read_data_config(model, model_path)
    precision = graph_precision(model)
    # run it once (on a copy: compiling does not change the model that is saved)
    encoder = open_model(read_model(model_path), Path(model_path), device="openvino:f32", data_config=data_config,
                         precision=precision)
    try:
        out = encoder(np.zeros((1, 3, data_config.height, data_config.width), dtype=np.float32))
    finally:
        encoder.close()
    data_config.feat_dim = int(out.shape[1])
    if not data_config.model_name:
        data_config.model_name = Path(model_path).stem
    set_rt(model, "data_config", data_config.to_json())
    set_rt(model, "precision", precision)
    set_rt(model, "version", __version__)
    set_rt(model, "annotated", "true")
    set_rt(model, "source", Path(model_path).name)
    set_rt(model, "source_sha256", sha256_file(model_path))
    save_ir(model, output, compress_to_fp16=False)  # FP16 weights of an FP16 IR stay FP16
    if previous is not None:
        log(f"note: replaced the data config that {model_path} already had")
    return AnnotateReport(output, data_config, previous is not None, precision)


def core_info() -> dict:
    """OpenVINO version, devices and the CPU plugin's capabilities (for ``doctor``)."""
    ov = import_openvino()
    core = get_core()
    info = {"version": ov.__version__, "devices": list(core.available_devices)}
    try:
        info["cpu_capabilities"] = [str(c) for c in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")]
        info["cpu_name"] = str(core.get_property("CPU", "FULL_DEVICE_NAME"))
    except Exception:  # noqa: BLE001 - informational
        pass
    return info
