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
from ..export.ort import OrtRunner, make_session
from .encoder import Encoder


class OnnxEncoder(Encoder):
    backend = "onnxruntime"

    def __init__(self, session, data_config: DataConfig, path: str | Path, device: str = "cpu",
                 precision: str = "fp32"):
        self.session = session
        self.runner = OrtRunner(session, path)
        self.data_config = data_config
        self.path = Path(path)
        self.device = device
        self.precision = precision
        self.input_name, self.output_name = self.runner.input_name, self.runner.output_name
        self.static_batch = self.runner.static_batch
        shape = self.runner.input_shape
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
        return self.runner.run(batch)

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
        raise ReidExportError(f"{path}: `config`/`opts` apply to checkpoints; an ONNX model carries its data "
                              "config (change it with reid-export annotate)", exit_code=2)
    if half:
        raise ReidExportError(f"{path}: `half` (MODEL@fp16) applies to checkpoints; make an FP16 ONNX with "
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
