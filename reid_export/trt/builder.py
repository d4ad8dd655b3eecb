"""Build a TensorRT engine from an ONNX model, with its sidecar, atomically.

Precision lives in the ONNX graph: ``--fp16`` and ``--int8`` pick or make the graph (the project's
FP16 conversion; a Q/DQ graph from ``reid-export quantize --target tensorrt``, or that
calibration run here with ``--calib-dir``), the graph is checked against TensorRT's
explicit-quantization rules, and the builder stays thin.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..console import say
from ..errors import ReidExportError
from ..fileio import atomic_write_bytes, check_output_path, sha256_file
from . import build_plan, compute_profile, import_tensorrt, parse_size
from .cuda import device_info
from .sidecar import make_sidecar, sidecar_path, write_sidecar


@dataclass
class BuildOptions:
    fp16: bool = False
    int8: bool = False
    calib_dirs: list[str] = field(default_factory=list)
    calib_size: int = 512
    min_batch: int = 1
    opt_batch: int = 32
    max_batch: int = 128
    workspace: str = "4GiB"
    timing_cache: str | None = None
    builder_optimization_level: int | None = None
    device_id: int = 0


def _parser_errors(parser) -> list[str]:
    messages = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        where = ""
        try:
            node = err.node_name() or ""
            op = err.node_operator() or ""
            where = f" [node {node} ({op})]" if node or op else ""
        except AttributeError:  # older parsers expose only desc()
            pass
        messages.append(f"{err.desc()}{where}")
    return messages


def prepare_graph(onnx_path: Path, plan: dict, options: BuildOptions, workdir: Path, log=say) -> Path:
    """The ONNX file to build from: the input, or its FP16 / Q/DQ INT8 conversion in ``workdir``."""
    from ..export import quantize as q

    if plan["convert"] == "fp16":
        out = workdir / (onnx_path.stem + ".fp16.onnx")
        _require_written(q.quantize_file(onnx_path, out, precision="fp16", log=log))
        return out
    if plan["convert"] == "int8":
        if not options.calib_dirs:
            raise ReidExportError(
                f"{onnx_path}: `int8` needs a Q/DQ ONNX (reid-export quantize {onnx_path} -o model.int8.onnx "
                "--precision int8 --target tensorrt --calib-dir DIR) or `calib_dirs` DIR to calibrate here",
                exit_code=2)
        out = workdir / (onnx_path.stem + ".int8.onnx")
        _require_written(q.quantize_file(onnx_path, out, precision="int8", target="tensorrt",
                                         calib_dirs=options.calib_dirs, calib_size=options.calib_size, log=log))
        return out
    return onnx_path


def _require_written(report) -> None:
    """An FP16/INT8 conversion the accuracy gate refused stops the build with its one line."""
    if not report.passed:
        raise ReidExportError(report.refusal or f"{report.output}: not written")


def build_engine(onnx_path: str | Path, output: str | Path, options: BuildOptions, log=say) -> dict:
    """Build ``output`` (engine) and ``output.json`` (sidecar) from ``onnx_path``; returns the sidecar."""
    from ..export.metadata import (graph_precision, input_info, load_onnx, output_info, refuse_openvino_ir,
                                   require_data_config)

    refuse_openvino_ir(onnx_path, "trt")
    from ..export.quantize.qdq_check import check_tensorrt_qdq

    onnx_path, output = Path(onnx_path), check_output_path(output)
    check_output_path(sidecar_path(output))
    model = load_onnx(onnx_path)
    data_config = require_data_config(model, onnx_path)
    input_name, input_shape, _ = input_info(model)
    output_name = output_info(model)[0]
    profile = compute_profile(input_shape, options.min_batch, options.opt_batch, options.max_batch,
                              data_config.input_size)
    workspace = parse_size(options.workspace)
    trt = import_tensorrt()
    gpu_name, capability = device_info(options.device_id)
    plan = build_plan(trt.__version__, graph_precision(model), options.fp16, options.int8)
    for note in profile["ignored"]:
        log(f"note: {note} ignored")
    log(f"TensorRT {trt.__version__} on {gpu_name} (sm {capability}); precision {plan['precision']}, "
        f"{'strongly typed' if plan['strongly_typed'] else 'weakly typed, flags ' + '+'.join(plan['flags'])}")

    with tempfile.TemporaryDirectory(prefix="reid-trt-") as tmp:
        graph_path = prepare_graph(onnx_path, plan, options, Path(tmp), log)
        if plan["precision"] == "int8":
            problems = check_tensorrt_qdq(load_onnx(graph_path)).problems
            if problems:
                raise ReidExportError(f"{graph_path.name}: Q/DQ graph TensorRT would reject: {problems[0]}"
                                      + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        flags = 0
        if plan["strongly_typed"] and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
            flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)  # TensorRT 10; 11 is always strong
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(graph_path)):
            errors = _parser_errors(parser)
            raise ReidExportError(f"{graph_path}: TensorRT's ONNX parser failed: " + " | ".join(errors or ["no message"]))
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
        if options.builder_optimization_level is not None:
            config.builder_optimization_level = int(options.builder_optimization_level)
        for flag in plan["flags"]:
            if not hasattr(trt.BuilderFlag, flag):
                raise ReidExportError(f"TensorRT {trt.__version__} has no BuilderFlag.{flag}; "
                                      "use a graph that carries the precision (reid-export quantize)")
            config.set_flag(getattr(trt.BuilderFlag, flag))
        trt_profile = builder.create_optimization_profile()
        trt_profile.set_shape(input_name, profile["min"], profile["opt"], profile["max"])
        config.add_optimization_profile(trt_profile)
        cache = None
        if options.timing_cache:
            cache_path = Path(options.timing_cache)
            data = cache_path.read_bytes() if cache_path.exists() else b""
            cache = config.create_timing_cache(data)
            config.set_timing_cache(cache, ignore_mismatch=False)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise ReidExportError(f"{onnx_path}: TensorRT could not build an engine (see the TensorRT messages above)")
        engine_bytes = bytes(serialized)
        if cache is not None:
            atomic_write_bytes(options.timing_cache, bytes(config.get_timing_cache().serialize()))

    build_options = asdict(options)
    build_options.update({"plan": plan, "workspace_bytes": workspace})
    info = make_sidecar(data_config, plan["precision"], trt.__version__, gpu_name, capability, profile, str(onnx_path),
                        sha256_file(onnx_path), build_options, input_name, output_name)
    atomic_write_bytes(output, engine_bytes)
    try:
        write_sidecar(output, info)
    except BaseException:
        output.unlink(missing_ok=True)
        raise
    return info
