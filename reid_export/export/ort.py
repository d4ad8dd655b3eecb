"""ONNX Runtime sessions: execution providers for ``--device``, and a runner that takes any batch.

The export layer's self-checks (export, quantize, annotate, calibration) and the runtime's ONNX
backend build their sessions here, so both run a graph exactly the same way. A graph exported with a
static batch takes batches of exactly that size: larger batches are split and a smaller last one is
padded, the padding dropped.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import numpy as np

from ..errors import ReidExportError


def providers_for(device: str, trt_cache_dir: str | Path | None = None) -> list:
    """ONNX Runtime providers (with options) for ``--device``; an unavailable one is an error.

    With the TensorRT execution provider, engines (and timing data) are cached in
    ``trt_cache_dir`` so that only the first session of a model pays for the engine build.
    """
    import onnxruntime as ort

    available = ort.get_available_providers()
    kind, _, index = device.partition(":")
    if index and not index.isdigit():
        raise ReidExportError(f"`device` {device}: the device index must be a number", exit_code=2)
    device_id = int(index or 0)
    if kind == "cpu" and not index:
        return ["CPUExecutionProvider"]
    wanted = {"cuda": ["CUDAExecutionProvider"],
              "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider"],
              "trt": ["TensorrtExecutionProvider", "CUDAExecutionProvider"]}.get(kind)
    if wanted is None:
        raise ReidExportError(f"`device` must be cpu, cuda[:N] or tensorrt[:N] for ONNX models, got {device!r}",
                              exit_code=2)
    if wanted[0] not in available:
        raise ReidExportError(
            f"`device` {device}: onnxruntime {ort.__version__} here has no {wanted[0]} "
            f"(available: {', '.join(available)}); install onnxruntime-gpu (pip install 'reid-export[gpu]') "
            "or use `device` cpu", exit_code=2)
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


class OrtRunner:
    """``runner(batch) -> float32 [N, D]`` for an ONNX Runtime session, whatever its batch dimension."""

    def __init__(self, session, name: str | Path = "model.onnx"):
        self.session = session
        self.name = str(name)
        inp = session.get_inputs()[0]
        self.input_name = inp.name
        self.input_shape = list(inp.shape)
        self.output_name = session.get_outputs()[0].name
        self.input_dtype = np.float16 if inp.type == "tensor(float16)" else np.float32
        if len(self.input_shape) != 4:
            raise ReidExportError(f"{name}: the model input {inp.name} has shape {self.input_shape}; "
                                  "expected [N, 3, H, W]")
        first = self.input_shape[0]
        self.static_batch = first if isinstance(first, int) and first > 0 else None

    def run(self, batch: np.ndarray) -> np.ndarray:
        """One call: at most ``static_batch`` rows (padded up to it)."""
        n = batch.shape[0]
        if self.static_batch and n < self.static_batch:
            pad = np.repeat(batch[-1:], self.static_batch - n, axis=0)
            batch = np.concatenate([batch, pad])
        feed = {self.input_name: batch.astype(self.input_dtype, copy=False)}
        try:
            out = self.session.run([self.output_name], feed)[0]
        except Exception as exc:  # onnxruntime's own types (Fail, RuntimeException, ...): the graph cannot run
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ReidExportError(f"{self.name}: ONNX Runtime cannot run the model on a {list(batch.shape)} "
                                  f"batch ({first[:300]})") from None
        return np.asarray(out[:n], dtype=np.float32).reshape(n, -1)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        step = self.static_batch or batch.shape[0]
        return np.concatenate([self.run(batch[i:i + step]) for i in range(0, batch.shape[0], step)])


def relative_throughput(reference: bytes, candidate: bytes, inputs: np.ndarray, threads: int | None = None,
                        batch_sizes=(1, 16), seconds: float = 0.5) -> dict[int, float]:
    """Batch size -> the candidate's throughput over the reference's on ONNX Runtime's CPU provider:
    both sessions timed in turns (one warm-up call each, then calls until ``seconds``, median call
    time). A quick figure for the quantizer's note, not a benchmark (``reid-export bench`` is)."""
    import time

    runners = [OrtRunner(make_session(model, threads=threads), name)
               for model, name in ((reference, "reference"), (candidate, "candidate"))]
    out = {}
    for batch_size in batch_sizes:
        batch = np.resize(inputs, (batch_size, *inputs.shape[1:])).astype(np.float32)
        medians = []
        for runner in runners:
            runner(batch)
            times, start = [], time.perf_counter()
            while len(times) < 3 or (time.perf_counter() - start < seconds and len(times) < 50):
                t0 = time.perf_counter()
                runner(batch)
                times.append(time.perf_counter() - t0)
            medians.append(float(np.median(times)))
        out[batch_size] = medians[0] / medians[1]
    return out


@contextlib.contextmanager
def quiet_ort_tools():
    """ONNX Runtime's quantization tools (and the FP16 converter) log on the root logger; keep our output clean."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)
