"""TensorRT backend: ``.engine`` / ``.plan`` files with their ``.json`` sidecar.

The engine is deserialized only after its sidecar matches the running TensorRT version and GPU
compute capability. Each call sets the input shape, copies the batch to the device, runs
``execute_async_v3`` on a stream and copies the features back; batches above the profile's
maximum are split by the Encoder, batches below its minimum are padded and the padding dropped.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ReidExportError
from ..fileio import check_input_file
from .encoder import Encoder


class TensorRTEncoder(Encoder):
    backend = "tensorrt"

    def __init__(self, path: Path, device: str = "cuda"):
        from ..trt import import_tensorrt
        from ..trt.cuda import DeviceIO, device_info
        from ..trt.sidecar import check_compatible, read_sidecar

        self.path = check_input_file(path, "TensorRT engine")
        info = read_sidecar(self.path)
        kind, _, index = device.partition(":")
        if kind not in ("cuda", "tensorrt", "trt"):
            raise ReidExportError(f"{path}: TensorRT engines run on `device` cuda[:N], not {device!r}", exit_code=2)
        self.device_id = int(index or 0)
        self.device = f"cuda:{self.device_id}"
        trt = import_tensorrt()
        _, capability = device_info(self.device_id)
        check_compatible(info, self.path, trt.__version__, capability)
        self.info = info
        self.data_config = info["data_config"]
        self.precision = info["precision"]
        self._io = DeviceIO(self.device_id)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self._engine is None:
            raise ReidExportError(f"{path}: TensorRT could not deserialize the engine (corrupt file, or built by "
                                  "another TensorRT); rebuild it with `reid-export trt`")
        self._context = self._engine.create_execution_context()
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        inputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise ReidExportError(f"{path}: expected one input and one output tensor, got {inputs} / {outputs}")
        self._input, self._output = inputs[0], outputs[0]
        self._in_dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(self._input)))
        self._out_dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(self._output)))
        lo, _, hi = self._engine.get_tensor_profile_shape(self._input, 0)
        self._min_batch, self._max_batch = int(lo[0]), int(hi[0])

    @property
    def max_batch(self) -> int:
        return self._max_batch

    def forward(self, batch: np.ndarray) -> np.ndarray:
        n = batch.shape[0]
        if n < self._min_batch:  # below the profile's minimum: pad, run, drop the padding
            pad = np.repeat(batch[-1:], self._min_batch - n, axis=0)
            batch = np.concatenate([batch, pad])
        batch = batch.astype(self._in_dtype, copy=False)
        if not self._context.set_input_shape(self._input, tuple(batch.shape)):
            raise ReidExportError(f"{self.path}: the engine rejects input shape {tuple(batch.shape)}")
        self._context.set_tensor_address(self._input, self._io.to_device(self._input, batch))
        out_shape = tuple(self._context.get_tensor_shape(self._output))
        nbytes = int(np.prod(out_shape)) * self._out_dtype.itemsize
        self._context.set_tensor_address(self._output, self._io.buffer(self._output, nbytes))
        if not self._context.execute_async_v3(self._io.stream_handle):
            raise ReidExportError(f"{self.path}: TensorRT execution failed")
        out = self._io.from_device(self._output, out_shape, self._out_dtype)
        return out[:n].astype(np.float32)

    def close(self) -> None:
        self._context = None
        self._engine = None
        self._io.close()


def open_tensorrt(path: Path, config=None, opts=(), device: str = "cuda", **_ignored) -> TensorRTEncoder:
    if device == "cpu":
        device = "cuda"  # an engine only runs on a GPU; the default device of other backends is cpu
    return TensorRTEncoder(Path(path), device=device)
