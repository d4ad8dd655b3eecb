"""The little CUDA the TensorRT runner needs: device info, device buffers, a stream.

Two routes, no pycuda: torch's CUDA tensors when torch has CUDA, else NVIDIA's cuda-python
(``cuda.bindings.runtime``, or ``cuda.cudart`` in older releases).
"""

from __future__ import annotations

import numpy as np

from ..errors import ReidExportError


def _cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError:
            return None
    return cudart


def _torch_cuda():
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def _check(result, what: str):
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise ReidExportError(f"CUDA error in {what}: {err}")
    return rest[0] if len(rest) == 1 else rest


def device_info(device_id: int = 0) -> tuple[str, str]:
    """(GPU name, compute capability "major.minor") of ``device_id``."""
    torch = _torch_cuda()
    if torch is not None:
        if device_id >= torch.cuda.device_count():
            raise ReidExportError(f"`device_id` {device_id}: only {torch.cuda.device_count()} CUDA device(s) here",
                                  exit_code=2)
        major, minor = torch.cuda.get_device_capability(device_id)
        return torch.cuda.get_device_name(device_id), f"{major}.{minor}"
    cudart = _cudart()
    if cudart is None:
        raise ReidExportError("no CUDA here: TensorRT needs a GPU with torch CUDA or cuda-python "
                              "(pip install 'reid-export[trt]')", exit_code=2)
    props = _check(cudart.cudaGetDeviceProperties(device_id), "cudaGetDeviceProperties")
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return name.rstrip("\x00"), f"{props.major}.{props.minor}"


class DeviceIO:
    """Device buffers for one input and one output, reused while shapes allow, and a stream."""

    def __init__(self, device_id: int = 0):
        self.device_id = device_id
        self.torch = _torch_cuda()
        self.cudart = None if self.torch is not None else _cudart()
        if self.torch is None and self.cudart is None:
            raise ReidExportError("no CUDA here: the TensorRT runner needs torch with CUDA or cuda-python", exit_code=2)
        self._buffers: dict[str, tuple[object, int]] = {}
        if self.torch is not None:
            self.torch.cuda.set_device(device_id)
            self.stream = self.torch.cuda.Stream(device=device_id)
            self.stream_handle = self.stream.cuda_stream
        else:
            _check(self.cudart.cudaSetDevice(device_id), "cudaSetDevice")
            self.stream = _check(self.cudart.cudaStreamCreate(), "cudaStreamCreate")
            self.stream_handle = int(self.stream)

    def buffer(self, name: str, nbytes: int) -> int:
        """A device pointer with at least ``nbytes`` for ``name``."""
        held = self._buffers.get(name)
        if held is not None and held[1] >= nbytes:
            return self._ptr(held[0])
        if held is not None:
            self._free(held[0])
        if self.torch is not None:
            mem = self.torch.empty(nbytes, dtype=self.torch.uint8, device=f"cuda:{self.device_id}")
        else:
            mem = _check(self.cudart.cudaMalloc(nbytes), "cudaMalloc")
        self._buffers[name] = (mem, nbytes)
        return self._ptr(mem)

    def _ptr(self, mem) -> int:
        return int(mem.data_ptr()) if self.torch is not None else int(mem)

    def _free(self, mem) -> None:
        if self.torch is None:
            self.cudart.cudaFree(mem)

    def to_device(self, name: str, array: np.ndarray) -> int:
        array = np.ascontiguousarray(array)
        ptr = self.buffer(name, array.nbytes)
        if self.torch is not None:
            dst = self._buffers[name][0][: array.nbytes]
            with self.torch.cuda.stream(self.stream):
                dst.copy_(self.torch.from_numpy(array.view(np.uint8).reshape(-1)), non_blocking=False)
        else:
            kind = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
            _check(self.cudart.cudaMemcpyAsync(ptr, array.ctypes.data, array.nbytes, kind, self.stream),
                   "cudaMemcpyAsync")
        return ptr

    def from_device(self, name: str, shape: tuple, dtype) -> np.ndarray:
        out = np.empty(shape, dtype=dtype)
        if self.torch is not None:
            src = self._buffers[name][0][: out.nbytes]
            self.stream.synchronize()
            out.view(np.uint8).reshape(-1)[:] = src.cpu().numpy()
        else:
            kind = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
            _check(self.cudart.cudaMemcpyAsync(out.ctypes.data, self._buffers[name][0], out.nbytes, kind,
                                               self.stream), "cudaMemcpyAsync")
            _check(self.cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        return out

    def synchronize(self) -> None:
        if self.torch is not None:
            self.stream.synchronize()
        else:
            _check(self.cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    def close(self) -> None:
        for mem, _ in self._buffers.values():
            self._free(mem)
        self._buffers.clear()
        if self.torch is None and self.cudart is not None:
            self.cudart.cudaStreamDestroy(self.stream)
