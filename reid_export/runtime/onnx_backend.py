"""ONNX Runtime backend: ``.onnx`` files (FP32, FP16 and INT8 Q/DQ graphs) on CPU, CUDA or TensorRT.

The execution providers follow ``--device``: ``cpu``; ``cuda[:N]`` (CUDA, CPU fallback);
``tensorrt[:N]`` / ``trt[:N]`` (TensorRT, CUDA, CPU fallback), the GPU ones only when the
installed onnxruntime has them (``pip install 'reid-export[gpu]'``). A model exported with a
static batch takes batches of exactly that size: larger batches are split (by the Encoder) and a
smaller last batch is padded and the padding dropped.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..data_config import DataConfig
from ..errors import ReidExportError
from .encoder import Encoder


def providers_for(device: str, trt_cache_dir: str | Path | None = None) -> list:
    """ONNX Runtime providers (with options) for ``--device``; an unavailable one is an error.

    With the TensorRT execution provider, engines (and timing data) are cached in
    ``trt_cache_dir`` so that only the first session of a model pays for the engine build.
    """
    import onnxruntime as ort

    available = ort.get_available_providers()
    kind, _, index = device.partition(":")
    if index and not index.isdigit():
        raise ReidExportError(f"--device {device}: the device index must be a number", exit_code=2)
    device_id = int(index or 0)
    if kind == "cpu" and not index:
        return ["CPUExecutionProvider"]
    wanted = {"cuda": ["CUDAExecutionProvider"],
              "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider"],
              "trt": ["TensorrtExecutionProvider", "CUDAExecutionProvider"]}.get(kind)
    if wanted is None:
        raise ReidExportError(f"--device must be cpu, cuda[:N] or tensorrt[:N] for ONNX models, got {device!r}",
                              exit_code=2)
    if wanted[0] not in available:
        raise ReidExportError(
            f"--device {device}: onnxruntime {ort.__version__} here has no {wanted[0]} "
            f"(available: {', '.join(available)}); install onnxruntime-gpu (pip install 'reid-export[gpu]') "
            "or use --device cpu", exit_code=2)
    providers = []
    for name in wanted:
        if name not in available:
            continue
        options = {"device_id": device_id}
        if name == "TensorrtExecutionProvider" and trt_cache_dir is not None:
            options.update({"trt_engine_cache_enable": True, "trt_engine_cache_path": str(trt_cache_dir),
                            "trt_timing_cache_enable": True, "trt_timing_cache_path": str(trt_cache_dir)})
        providers.append((name, options))
    return providers + ["CPUExecutionProvider"]


def trt_cache_dir_for(model: str | Path | bytes, device: str) -> Path | None:
    """``MODEL.trt-cache/`` beside a model file run with the TensorRT provider (None otherwise)."""
    if isinstance(model, bytes) or device.partition(":")[0] not in ("tensorrt", "trt"):
        return None
    return Path(model).with_suffix(".trt-cache")


def make_session(model: str | Path | bytes, device: str = "cpu", threads: int | None = None,
                 optimization: str = "all"):
    """An ``onnxruntime.InferenceSession`` for a file path or serialized model bytes."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    # fatal only: the errors come back as exceptions, which the caller turns into one line; at
    # level 3 ONNX Runtime would also print them on stderr itself
    options.log_severity_level = 4
    if threads:
        options.intra_op_num_threads = int(threads)
    options.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }[optimization]
    source = model if isinstance(model, bytes) else str(model)
    try:
        cache = trt_cache_dir_for(model, device)
        providers = providers_for(device, cache)
        if cache is not None:
            cache.mkdir(exist_ok=True)
        return ort.InferenceSession(source, sess_options=options, providers=providers)
    except ReidExportError:
        raise
    except Exception as exc:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
        where = model if not isinstance(model, bytes) else "model"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ReidExportError(f"{where}: ONNX Runtime cannot load it ({first[:300]})") from None


class OnnxEncoder(Encoder):
    backend = "onnxruntime"

    def __init__(self, session, data_config: DataConfig, path: str | Path, device: str = "cpu",
                 precision: str = "fp32"):
        self.session = session
        self.data_config = data_config
        self.path = Path(path)
        self.device = device
        self.precision = precision
        inp = session.get_inputs()[0]
        self.input_name = inp.name
        self.output_name = session.get_outputs()[0].name
        self.input_dtype = np.float16 if inp.type == "tensor(float16)" else np.float32
        shape = list(inp.shape)
        if len(shape) != 4:
            raise ReidExportError(f"{path}: the model input {inp.name} has shape {shape}; expected [N, 3, H, W]")
        self.static_batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
        expected = (3, data_config.height, data_config.width)
        for axis, (got, want) in enumerate(zip(shape[1:], expected), start=1):
            if isinstance(got, int) and got > 0 and got != want:
                raise ReidExportError(
                    f"{path}: the model input is {shape} but its data config says "
                    f"[N, {', '.join(map(str, expected))}]; fix the data config with reid-export annotate")

    @property
    def max_batch(self) -> int | None:
        return self.static_batch

    def forward(self, batch: np.ndarray) -> np.ndarray:
        n = batch.shape[0]
        if self.static_batch and n < self.static_batch:
            pad = np.repeat(batch[-1:], self.static_batch - n, axis=0)
            batch = np.concatenate([batch, pad])
        feed = {self.input_name: batch.astype(self.input_dtype, copy=False)}
        try:
            out = self.session.run([self.output_name], feed)[0]
        except Exception as exc:  # onnxruntime's own types (Fail, RuntimeException, ...): the graph cannot run
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ReidExportError(f"{self.path}: ONNX Runtime cannot run the model on a {list(batch.shape)} "
                                  f"batch ({first[:300]})") from None
        return np.asarray(out[:n], dtype=np.float32).reshape(n, -1)

    def describe(self) -> dict:
        info = super().describe()
        info["providers"] = self.session.get_providers()
        info["static_batch"] = self.static_batch
        return info

    def close(self) -> None:
        self.session = None


def open_onnx(path: Path, config=None, opts=(), device: str = "cpu", threads: int | None = None,
              data_config: DataConfig | None = None, optimization: str = "all", half: bool = False,
              **_ignored) -> OnnxEncoder:
    """Open an ``.onnx`` model as an Encoder; its data config comes from the model itself.

    ``data_config`` overrides (or supplies) it for a model from elsewhere; ``threads`` sets
    ONNX Runtime's intra-op thread count (default: env ``REID_ORT_THREADS``, else all cores).
    """
    from ..export.metadata import KEY_PRECISION, load_onnx, model_precision, require_data_config
    from ..fileio import check_input_file

    path = Path(path)
    if config is not None or list(opts):
        raise ReidExportError(f"{path}: --config/--opts apply to checkpoints; an ONNX model carries its data "
                              "config (change it with reid-export annotate)", exit_code=2)
    if half:
        raise ReidExportError(f"{path}: --half applies to checkpoints; make an FP16 ONNX with "
                              "reid-export quantize --precision fp16", exit_code=2)
    check_input_file(path, "ONNX model")
    if threads is None and os.environ.get("REID_ORT_THREADS", "").isdigit():
        threads = int(os.environ["REID_ORT_THREADS"])
    try:
        session = make_session(path, device=device, threads=threads, optimization=optimization)
    except ReidExportError:
        load_onnx(path)  # says "not an ONNX model" when that is the reason
        raise
    try:  # names and metadata are UTF-8 strings in a valid model; a damaged file may hold other bytes
        props = dict(session.get_modelmeta().custom_metadata_map)
        if data_config is None:
            data_config = require_data_config(props, path, list(session.get_inputs()[0].shape))
        precision = props.get(KEY_PRECISION) or model_precision(load_onnx(path))
        return OnnxEncoder(session, data_config, path, device=device, precision=precision)
    except UnicodeDecodeError:
        raise ReidExportError(f"{path}: names or metadata in the model are not valid UTF-8 (a damaged file?); "
                              "re-export or re-download it") from None
