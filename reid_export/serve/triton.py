"""A Triton Inference Server model repository for reid-export models.

Layout (Triton's): ``REPO/NAME/config.pbtxt``, ``REPO/NAME/1/model.onnx`` (or ``model.plan``, or
one plan per GPU architecture named by ``cc_model_filenames``), and beside each config the data
config (``data_config.json``) and a ``README.md`` that tells a client how to preprocess; a
``REPO/README.md`` lists the models. ``config.pbtxt`` gives ``max_batch_size`` and the input/output
``dims`` without the batch dimension, ``dynamic_batching``, ``instance_group`` and, for ONNX on GPU,
the TensorRT execution accelerator. Each model folder is written to a temporary folder and
renamed into place when complete.

:func:`parse_config` checks a ``config.pbtxt`` against Triton's own ``ModelConfig`` protobuf
(``tritonclient``, the ``triton`` extra).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .. import __version__
from ..data_config import DataConfig
from ..errors import ReidExportError

ONNX_PLATFORM = "onnxruntime_onnx"
PLAN_PLATFORM = "tensorrt_plan"
OPENVINO_BACKEND = "openvino"  # Triton's OpenVINO backend: an IR (model.xml + model.bin), CPU instances
ACCELERATOR_PRECISION = {"fp32": "FP32", "fp16": "FP16", "int8": "INT8"}
_NAME_OK = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass
class RepoOptions:
    max_batch_size: int | None = None  # None: 32 for ONNX, the engine profile's max for plans
    preferred_batch_sizes: Sequence[int] = ()
    max_queue_delay_us: int = 100
    instances: int = 1
    kind: str = "gpu"  # ONNX: gpu or cpu; plans: gpu
    gpus: Sequence[int] = ()
    tensorrt_accelerator: str | None = None  # fp32 | fp16 | int8 for ONNX on GPU
    workspace_bytes: int = 1 << 30
    version: int = 1
    force: bool = False


@dataclass
class ModelEntry:
    name: str
    platform: str
    precision: str
    data_config: DataConfig
    input_name: str
    output_name: str
    feature_dim: int
    sources: dict[str, Path]  # file name in the version folder -> source file
    cc_model_filenames: dict[str, str] = field(default_factory=dict)
    max_batch_size: int = 0
    profile_max_batch: int | None = None
    profile_opt_batch: int | None = None
    fixed_batch: int | None = None  # an ONNX whose batch dimension is fixed
    tensorrt_version: str | None = None  # plans: the TensorRT they were built with
    compute_capabilities: list[str] = field(default_factory=list)  # plans: the GPU architectures
    notes: list[str] = field(default_factory=list)


def model_name(path: Path) -> str:
    stem = path.name.split(".")[0] if path.suffix.lower() in (".engine", ".plan") else path.stem
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", stem.replace(".", "_"))
    return name or "model"


def _onnx_entry(path: Path, name: str) -> ModelEntry:
    import onnx

    from ..export.metadata import input_info, load_onnx, model_precision, output_info, require_data_config

    model = load_onnx(path)
    data_config = require_data_config(model, path)
    in_name, in_shape, in_type = input_info(model)
    out_name, out_shape, out_type = output_info(model)
    for what, tname, elem in (("input", in_name, in_type), ("output", out_name, out_type)):
        if elem != onnx.TensorProto.FLOAT:
            raise ReidExportError(f"{path}: the {what} {tname} is not float32; Triton configs here expect float32 "
                                  "I/O (reid-export's FP16/INT8 ONNX keep it)")
    feat = out_shape[-1] if out_shape and isinstance(out_shape[-1], int) and out_shape[-1] > 0 else data_config.feat_dim
    if not feat:
        raise ReidExportError(f"{path}: the output size is unknown (output shape {out_shape}, no feat_dim in the data "
                              "config); re-annotate the model with reid-export annotate")
    entry = ModelEntry(name, ONNX_PLATFORM, model_precision(model), data_config, in_name, out_name, int(feat),
                       {"model.onnx": path})
    batch = in_shape[0] if in_shape else None
    if isinstance(batch, int) and batch > 0:
        entry.fixed_batch = batch
        entry.notes.append(f"{path.name}: fixed batch {batch}; max_batch_size 0 (no dynamic batching); export with "
                           "a dynamic batch to batch requests")
    return entry


def _ir_entry(path: Path, name: str) -> ModelEntry:
    """An OpenVINO IR for Triton's openvino backend (CPU); it must carry a data config (annotate it)."""
    from ..runtime.openvino_backend import graph_precision, read_model, require_data_config, static_shape

    model = read_model(path)
    data_config = require_data_config(model, path)
    if len(model.inputs) != 1:
        raise ReidExportError(f"{path}: {len(model.inputs)} inputs; a ReID model here has one image input")
    shape = static_shape(model)
    out_shape = model.outputs[0].get_partial_shape()
    last = out_shape[out_shape.rank.get_length() - 1] if out_shape.rank.is_static else None
    feat = int(last.get_length()) if last is not None and last.is_static else data_config.feat_dim
    if not feat:
        raise ReidExportError(f"{path}: the output size is unknown; re-annotate the model with reid-export annotate")
    entry = ModelEntry(name, OPENVINO_BACKEND, graph_precision(model), data_config,
                       model.inputs[0].get_any_name(), model.outputs[0].get_any_name(), int(feat),
                       {"model.xml": path, "model.bin": path.with_suffix(".bin")})
    if shape and shape[0] is not None:
        entry.fixed_batch = int(shape[0])
        entry.notes.append(f"{path.name}: fixed batch {shape[0]}; max_batch_size 0 (no dynamic batching)")
    entry.notes.append(f"{path.name}: served by Triton's openvino backend on CPU instances (KIND_CPU)")
    return entry


def _plan_entries(paths: list[Path]) -> list[ModelEntry]:
    """Plans built from the same ONNX for different GPU architectures become one model."""
    from ..trt.sidecar import read_sidecar

    groups: dict[str, list[tuple[Path, dict]]] = {}
    for path in paths:
        if not path.is_file():
            raise ReidExportError(f"{path}: engine file not found; check the path")
        info = read_sidecar(path)
        groups.setdefault(info.get("onnx_sha256") or str(path), []).append((path, info))
    entries = []
    for items in groups.values():
        first_path, first = items[0]
        ccs: dict[str, Path] = {}
        for path, info in items:
            cc = str(info["compute_capability"])
            if cc in ccs:
                raise ReidExportError(f"{path}: built for compute capability {cc} like {ccs[cc]}; give one plan per "
                                      "GPU architecture")
            if info["precision"] != first["precision"] or info["data_config"].to_dict() != first["data_config"].to_dict():
                raise ReidExportError(f"{path}: same source ONNX as {first_path} but another precision or data "
                                      "config; serve it under its own name")
            ccs[cc] = path
        dc = first["data_config"]
        profile = first["profiles"][0]
        static = bool(first.get("static_batch"))
        max_b = int(profile["max"][0])
        entry = ModelEntry(model_name(first_path), PLAN_PLATFORM, first["precision"], dc,
                           first.get("input_name", "input"), first.get("output_name", "output"),
                           int(dc.feat_dim or 0), {})
        if not entry.feature_dim:
            raise ReidExportError(f"{first_path}: its sidecar's data config has no feat_dim; rebuild with reid-export trt")
        entry.tensorrt_version = str(first["tensorrt_version"])
        entry.compute_capabilities = sorted(ccs)
        entry.profile_max_batch = 0 if static else max_b
        entry.profile_opt_batch = int(profile["opt"][0])
        if len(ccs) == 1:
            entry.sources["model.plan"] = first_path
        else:
            for cc, path in sorted(ccs.items()):
                fname = f"model_sm{cc.replace('.', '')}.plan"
                entry.sources[fname] = path
                entry.cc_model_filenames[cc] = fname
        entries.append(entry)
    return entries


def collect(models: Sequence[str | Path], names: Sequence[str] = ()) -> list[ModelEntry]:
    onnx_paths, plan_paths, ir_paths = [], [], []
    for item in models:
        path = Path(item)
        suffix = path.suffix.lower()
        if suffix == ".onnx":
            onnx_paths.append(path)
        elif suffix in (".engine", ".plan"):
            plan_paths.append(path)
        elif suffix == ".xml":
            ir_paths.append(path)
        else:
            raise ReidExportError(f"{path}: Triton serves ONNX (.onnx), TensorRT plans (.engine/.plan) and OpenVINO IR "
                                  f"(.xml) here; export a checkpoint first with `reid-export onnx {path} -o model.onnx`",
                                  exit_code=2)
    entries = [_onnx_entry(p, model_name(p)) for p in onnx_paths] + (_plan_entries(plan_paths) if plan_paths else [])
    entries += [_ir_entry(p, model_name(p)) for p in ir_paths]
    if names:
        if len(names) != len(entries):
            raise ReidExportError(f"`names` given {len(names)} times for {len(entries)} models (plans of one ONNX for "
                                  "several GPUs are one model); give one per model or none", exit_code=2)
        for entry, name in zip(entries, names):
            entry.name = name
    seen = set()
    for entry in entries:
        if not _NAME_OK.match(entry.name):
            raise ReidExportError(f"model name {entry.name!r}: use letters, digits, '_', '-', '.'", exit_code=2)
        if entry.name in seen:
            raise ReidExportError(f"two models would be named {entry.name!r}; name them with `names`", exit_code=2)
        seen.add(entry.name)
    return entries


def resolve_batching(entry: ModelEntry, opts: RepoOptions) -> None:
    if entry.fixed_batch:
        if opts.max_batch_size not in (None, 0):
            raise ReidExportError(f"{entry.name}: the ONNX has a fixed batch of {entry.fixed_batch}; "
                                  "`options.max_batch_size` needs a dynamic batch (re-export it)", exit_code=2)
        entry.max_batch_size = 0
        return
    if entry.platform == PLAN_PLATFORM:
        limit = entry.profile_max_batch or 0
        if limit == 0:
            entry.max_batch_size = 0
            return
        if opts.max_batch_size is not None and opts.max_batch_size > limit:
            raise ReidExportError(f"{entry.name}: `options.max_batch_size` {opts.max_batch_size} exceeds the engine's "
                                  f"profile maximum {limit}; rebuild with reid-export trt --max-batch {opts.max_batch_size}",
                                  exit_code=2)
        entry.max_batch_size = opts.max_batch_size if opts.max_batch_size is not None else limit
    else:
        entry.max_batch_size = 32 if opts.max_batch_size is None else opts.max_batch_size
    for size in opts.preferred_batch_sizes:
        if entry.max_batch_size and size > entry.max_batch_size:
            raise ReidExportError(f"{entry.name}: `options.preferred_batch_sizes` {size} exceeds "
                                  f"`options.max_batch_size` {entry.max_batch_size}", exit_code=2)


def _list(values) -> str:
    return "[ " + ", ".join(str(v) for v in values) + " ]"


def config_text(entry: ModelEntry, opts: RepoOptions) -> str:
    """``config.pbtxt`` in protobuf text format."""
    kind = "gpu" if entry.platform == PLAN_PLATFORM else "cpu" if entry.platform == OPENVINO_BACKEND else opts.kind
    if entry.platform == PLAN_PLATFORM and opts.kind == "cpu":
        raise ReidExportError(f"{entry.name}: a TensorRT plan runs on a GPU; `options.kind` cpu applies to ONNX models",
                              exit_code=2)
    if entry.platform == OPENVINO_BACKEND and opts.tensorrt_accelerator is not None:
        raise ReidExportError(f"{entry.name}: an OpenVINO IR is served by Triton's openvino backend on the CPU; "
                              "`options.tensorrt_accelerator` applies to ONNX models", exit_code=2)
    accel = opts.tensorrt_accelerator if entry.platform == ONNX_PLATFORM else None
    if accel is not None:
        if kind != "gpu":
            raise ReidExportError("`options.tensorrt_accelerator` runs on a GPU; drop `options.kind` cpu", exit_code=2)
        if accel == "int8" and entry.precision != "int8":
            raise ReidExportError(f"{entry.name}: `options.tensorrt_accelerator` int8 needs a Q/DQ (INT8) ONNX; this one is "
                                  f"{entry.precision} (make one with reid-export quantize --precision int8)", exit_code=2)
    dims_in = [3, entry.data_config.height, entry.data_config.width]
    dims_out = [entry.feature_dim]
    if entry.max_batch_size == 0 and entry.fixed_batch:
        dims_in = [entry.fixed_batch, *dims_in]
        dims_out = [entry.fixed_batch, *dims_out]
    serving = (f'backend: "{entry.platform}"' if entry.platform == OPENVINO_BACKEND
               else f'platform: "{entry.platform}"')
    lines = [f'name: "{entry.name}"', serving, f"max_batch_size: {entry.max_batch_size}"]
    if entry.platform == OPENVINO_BACKEND:
        lines.append('default_model_filename: "model.xml"')
    if entry.cc_model_filenames:
        first = sorted(entry.cc_model_filenames)[0]
        lines.append(f'default_model_filename: "{entry.cc_model_filenames[first]}"')
        for cc, fname in sorted(entry.cc_model_filenames.items()):
            lines.append(f'cc_model_filenames {{ key: "{cc}" value: "{fname}" }}')
    elif entry.platform == PLAN_PLATFORM:
        lines.append('default_model_filename: "model.plan"')
    lines += ["input [", "  {", f'    name: "{entry.input_name}"', "    data_type: TYPE_FP32",
              f"    dims: {_list(dims_in)}", "  }", "]",
              "output [", "  {", f'    name: "{entry.output_name}"', "    data_type: TYPE_FP32",
              f"    dims: {_list(dims_out)}", "  }", "]"]
    lines += ["instance_group [", "  {", f"    count: {opts.instances}", f"    kind: KIND_{kind.upper()}"]
    if kind == "gpu" and opts.gpus:
        lines.append(f"    gpus: {_list(opts.gpus)}")
    lines += ["  }", "]"]
    if entry.max_batch_size > 0:
        preferred = list(opts.preferred_batch_sizes)
        if not preferred and entry.profile_opt_batch and entry.profile_opt_batch <= entry.max_batch_size:
            preferred = [entry.profile_opt_batch]
        lines.append("dynamic_batching {")
        if preferred:
            lines.append(f"  preferred_batch_size: {_list(preferred)}")
        lines += [f"  max_queue_delay_microseconds: {opts.max_queue_delay_us}", "}"]
    if accel is not None:
        lines += ["optimization {", "  execution_accelerators {", "    gpu_execution_accelerator: [", "      {",
                  '        name: "tensorrt"',
                  f'        parameters {{ key: "precision_mode" value: "{ACCELERATOR_PRECISION[accel]}" }}',
                  f'        parameters {{ key: "max_workspace_size_bytes" value: "{opts.workspace_bytes}" }}',
                  "      }", "    ]", "  }", "}"]
    return "\n".join(lines) + "\n"


def parse_config(text: str, source: str = "config.pbtxt"):
    """``text`` parsed into Triton's ``ModelConfig`` protobuf (tritonclient), or one clear error."""
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        raise ReidExportError("checking config.pbtxt needs tritonclient: pip install 'reid-export[triton]' "
                              "(or pip install 'tritonclient[grpc]')") from None
    try:
        return text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as exc:
        raise ReidExportError(f"{source}: not a valid Triton model config ({exc})") from None


def client_readme(entry: ModelEntry) -> str:
    dc = entry.data_config
    order = dc.channel_order.upper()
    steps = [f"1. Decode the crop to {order} uint8 (OpenCV decodes BGR: convert to RGB first when the model takes RGB)."
             if order == "RGB" else "1. Decode the crop to BGR uint8 (OpenCV's own order).",
             f"2. Resize the uint8 image to {dc.height}x{dc.width} (height x width) with `{dc.interpolation}` "
             "interpolation" + (" (OpenCV cv2.resize)." if not dc.interpolation.startswith("pil-") else " (Pillow Image.resize)."),
             "3. Convert to float32" + (" 0..255." if dc.pixel_scale == 255.0 else " and divide by 255 (0..1).")]
    if dc.normalized_inside:
        steps.append("4. Do not normalise: the model subtracts the mean and divides by the std itself "
                     f"(mean {list(dc.mean)}, std {list(dc.std)}).")
    else:
        steps.append(f"4. Subtract mean {list(dc.mean)} and divide by std {list(dc.std)}, per channel in {order} order.")
    steps.append(f"5. Lay it out as [3, {dc.height}, {dc.width}] (CHW) and stack crops into [N, 3, {dc.height}, "
                 f"{dc.width}]" + (f", N <= {entry.max_batch_size}." if entry.max_batch_size else "."))
    steps.append(f"6. Send it as input `{entry.input_name}` (TYPE_FP32); output `{entry.output_name}` is [N, "
                 f"{entry.feature_dim}] raw features: L2-normalise them before cosine matching.")
    files = ", ".join(f"`{entry_name}`" for entry_name in sorted(entry.sources))
    local = sorted(entry.sources)[0] if entry.sources else sorted(entry.cc_model_filenames.values())[0]
    if "model.xml" in entry.sources:
        local = "model.xml"
    return "\n".join([
        f"# {entry.name}", "",
        f"Written by reid-export {__version__}: platform `{entry.platform}`, precision {entry.precision}, "
        f"version folder `1/` ({files}). The preprocessing below is the model's data config "
        "(`data_config.json` beside this file); the parity and accuracy figures of the model hold only for it.", "",
        *([f"TensorRT plans: built with TensorRT {entry.tensorrt_version} for compute capability "
           f"{', '.join(entry.compute_capabilities)}; the server's "
           "TensorRT must be that version (engines are not portable across versions or architectures).", ""]
          if entry.platform == PLAN_PLATFORM else []),
        "## Client preprocessing", "", *steps, "",
        f"`reid-export extract 1/{local} crops/ -o features.npy` (run in this folder; `crops/` a folder of "
        "crops) computes the same features locally, to compare with what the server returns.", ""])


def repository_readme(repo: Path) -> str:
    rows = []
    for cfg in sorted(repo.glob("*/data_config.json")):
        try:
            dc = DataConfig.from_json(cfg.read_text(encoding="utf-8"), str(cfg))
        except (ReidExportError, OSError):
            continue
        rows.append(f"| [{cfg.parent.name}]({cfg.parent.name}/README.md) | {dc.height}x{dc.width} | "
                    f"{dc.channel_order.upper()} | {dc.interpolation} | {dc.pixel_scale:g} | "
                    f"{'inside the model' if dc.normalized_inside else 'client: mean ' + str(list(dc.mean)) + ' std ' + str(list(dc.std))} |")
    return "\n".join([
        "# Triton model repository (reid-export)", "",
        "Start the server with `tritonserver --model-repository <this folder>`. Each model's README says how a "
        "client preprocesses a crop; its `data_config.json` says the same for programs.", "",
        "| model | input (HxW) | channels | resize | pixel scale | normalisation |", "|---|---|---|---|---|---|",
        *rows, ""])


def write_repository(entries: list[ModelEntry], repo: str | Path, opts: RepoOptions, validate: bool = True) -> list[Path]:
    """Write each model folder (temporary folder, then renamed into place) and the repository README."""
    from ..fileio import atomic_write_text

    repo = Path(repo)
    if repo.exists() and not repo.is_dir():
        raise ReidExportError(f"{repo}: is a file; give a folder for -o")
    texts = {}
    for entry in entries:
        resolve_batching(entry, opts)
        texts[entry.name] = config_text(entry, opts)
        if validate:
            parse_config(texts[entry.name], f"{entry.name}/config.pbtxt")
        target = repo / entry.name
        if target.exists() and not opts.force:
            raise ReidExportError(f"{target}: already exists; pass `options.force` to replace it", exit_code=2)
    repo.mkdir(parents=True, exist_ok=True)
    if not os.access(repo, os.W_OK):
        raise ReidExportError(f"{repo}: not writable; choose another -o folder")
    written = []
    for entry in entries:
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=repo))
        try:
            version = tmp / str(opts.version)
            version.mkdir()
            for fname, source in entry.sources.items():
                shutil.copyfile(source, version / fname)
            (tmp / "config.pbtxt").write_text(texts[entry.name], encoding="utf-8")
            (tmp / "data_config.json").write_text(json.dumps(entry.data_config.to_dict(), indent=2, sort_keys=True)
                                                  + "\n", encoding="utf-8")
            (tmp / "README.md").write_text(client_readme(entry), encoding="utf-8")
            os.chmod(tmp, 0o755)
            target = repo / entry.name
            if target.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{entry.name}.old.", dir=repo))
                os.replace(target, old / entry.name)
                os.replace(tmp, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, target)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ReidExportError(f"{repo / entry.name}: could not be written ({exc.strerror or exc})") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        written.append(repo / entry.name)
    atomic_write_text(repo / "README.md", repository_readme(repo))
    return written


@dataclass
class TritonReport:
    """What ``triton`` wrote: one model folder per entry, each ``config.pbtxt`` checked with Triton's own
    ModelConfig protobuf where tritonclient is installed (``validated``). A config Triton would reject, or
    a folder that cannot be written, raises with one line instead: nothing is half-written."""

    repo: Path
    entries: list[ModelEntry]
    written: list[Path]
    validated: bool

    @property
    def passed(self) -> bool:
        return len(self.written) == len(self.entries)

    def to_dict(self) -> dict:
        from ..report import report_header

        return {**report_header("triton"), "passed": self.passed, "repository": str(self.repo),
                "configs_checked_with_triton_protobuf": self.validated,
                "models": [{"name": e.name, "platform": e.platform, "precision": e.precision,
                            "max_batch_size": e.max_batch_size, "files": sorted(e.sources),
                            "gpu_archs": list(e.cc_model_filenames), "folder": str(self.repo / e.name),
                            "notes": list(e.notes)} for e in self.entries]}

    def table(self) -> str:
        from ..report import format_table

        rows = [[e.name, e.platform, e.precision, e.max_batch_size, ", ".join(sorted(e.sources)),
                 ", ".join(e.cc_model_filenames) or "-"] for e in self.entries]
        lines = [format_table(["model", "platform", "precision", "max batch", "files", "GPU archs"], rows)]
        lines += [f"note: {note}" for e in self.entries for note in e.notes]
        if self.validated:
            lines.append(f"{len(self.written)} config.pbtxt checked with Triton's ModelConfig protobuf; "
                         f"repository {self.repo}")
        else:
            lines.append(f"repository {self.repo} written; configs NOT checked (pip install 'reid-export[triton]' "
                         "for Triton's protobuf)")
        return "\n".join(lines)


def build_repository(models: Sequence[str | Path], repo: str | Path, options: RepoOptions | None = None,
                     names: Sequence[str] = ()) -> TritonReport:
    """A Triton model repository for ``models`` (.onnx, .engine/.plan, OpenVINO .xml) in ``repo``: each
    config checked with Triton's ModelConfig protobuf when tritonclient is installed."""
    options = options or RepoOptions()
    entries = collect(models, names)
    try:
        import tritonclient.grpc.model_config_pb2  # noqa: F401
        validated = True
    except ImportError:
        validated = False
    written = write_repository(entries, repo, options, validate=validated)
    return TritonReport(Path(repo), entries, written, validated)
