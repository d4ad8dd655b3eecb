"""PyTorch backend: a checkpoint (+ config) run eagerly on CPU or CUDA."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..checkpoint import load_model_from_checkpoint
from ..errors import ReidExportError
from .encoder import Encoder


def resolve_torch_device(device: str) -> torch.device:
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ReidExportError(
                f"`device` {device}: CUDA is not available here (torch {torch.__version__}); use `device` cpu",
                exit_code=2,
            )
        return torch.device(device)
    if device != "cpu":
        raise ReidExportError(f"`device` must be cpu or cuda[:N], got {device!r}", exit_code=2)
    return torch.device("cpu")


class TorchEncoder(Encoder):
    backend = "torch"

    def __init__(self, model: torch.nn.Module, data_config, path: Path, device: str = "cpu",
                 half: bool = False, cfg=None):
        self.path = Path(path)
        self.device = device
        self._device = resolve_torch_device(device)
        self.model = model.to(self._device).eval()
        self.half = half
        if half:
            if self._device.type != "cuda":
                raise ReidExportError("`half` (MODEL@fp16) needs `device` cuda "
                                      "(CPU half convolutions are slow and incomplete)",
                                      exit_code=2)
            self.model = self.model.half()
        self.precision = "fp16" if half else "fp32"
        self.data_config = data_config
        self.cfg = cfg

    @torch.inference_mode()
    def forward(self, batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(batch).to(self._device, non_blocking=True)
        if self.half:
            x = x.half()
        return self.model(x).float().cpu().numpy()


def open_torch(path: Path, config=None, opts=(), device: str = "cpu", allow_partial: bool = False,
               half: bool = False, **_ignored) -> TorchEncoder:
    model, cfg, data_config = load_model_from_checkpoint(path, config, opts, allow_partial=allow_partial)
    return TorchEncoder(model, data_config, path, device=device, half=half, cfg=cfg)
