"""fast-reid's Baseline meta-architecture: normalisation, backbone, embedding head."""

from __future__ import annotations

import torch
from torch import nn

from .heads import build_heads
from .osnet import build_osnet_backbone
from .resnet import build_resnet_backbone

BACKBONES = {"build_resnet_backbone": build_resnet_backbone, "build_osnet_backbone": build_osnet_backbone}


class Baseline(nn.Module):
    """Input: float32 [B, 3, H, W], RGB, 0..255. Eval output: the head's feature [B, D] (post-BNNeck
    for EmbeddingHead, post-``fc`` for TorchreidHead).

    The mean/std are non-persistent buffers (as in fast-reid), so they are not in the state dict,
    and normalisation creates a new tensor instead of changing the caller's batch in place.
    """

    def __init__(self, backbone: nn.Module, heads: nn.Module, pixel_mean, pixel_std):
        super().__init__()
        self.backbone = backbone
        self.heads = heads
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(1, -1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(1, -1, 1, 1), False)

    @property
    def feat_dim(self) -> int:
        return self.heads.out_dim

    def forward(self, images: torch.Tensor, targets: torch.Tensor | None = None):
        x = (images - self.pixel_mean) / self.pixel_std
        return self.heads(self.backbone(x), targets)


def build_model(cfg) -> Baseline:
    """A Baseline from a fast-reid config (random weights; load a checkpoint separately)."""
    from ..errors import ReidExportError

    if cfg.MODEL.META_ARCHITECTURE != "Baseline":
        raise ReidExportError(
            f"MODEL.META_ARCHITECTURE {cfg.MODEL.META_ARCHITECTURE!r} is not supported; reid-export builds "
            "Baseline (BoT/AGW/SBS); export other architectures to ONNX elsewhere and use `reid-export annotate`"
        )
    name = cfg.MODEL.BACKBONE.NAME
    if name not in BACKBONES:
        raise ReidExportError(
            f"MODEL.BACKBONE.NAME {name!r} is not supported; use one of {', '.join(BACKBONES)}"
        )
    backbone = BACKBONES[name](cfg)
    heads = build_heads(cfg, backbone.feat_dim)
    return Baseline(backbone, heads, cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD)
