"""Building blocks with fast-reid's parameter names: norms, IBN-a, non-local, pooling.

Everything here exports to ONNX with a dynamic batch: no shape is read from the batch axis
except through ``-1`` in reshapes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ReidExportError


class BatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose weight and/or bias can be frozen (BNNeck freezes the bias)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1,
                 weight_freeze: bool = False, bias_freeze: bool = False):
        super().__init__(num_features, eps=eps, momentum=momentum)
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)
        self.weight.requires_grad_(not weight_freeze)
        self.bias.requires_grad_(not bias_freeze)


def get_norm(norm: str, channels: int, **kwargs) -> nn.Module:
    if norm in ("BN", "syncBN"):
        # syncBN is BN at inference and in one process; under torchrun reid-train synchronises these
        # layers over the processes (trainer/distributed.py: convert_sync_batchnorm).
        return BatchNorm(channels, **kwargs)
    raise ReidExportError(
        f"normalization {norm!r} is not supported (MODEL.BACKBONE.NORM / MODEL.HEADS.NORM); use BN"
    )


class IBN(nn.Module):
    """IBN-a: InstanceNorm on the first half of the channels, BatchNorm on the rest."""

    def __init__(self, planes: int, bn_norm: str = "BN"):
        super().__init__()
        self.half = planes // 2
        self.IN = nn.InstanceNorm2d(self.half, affine=True)
        self.BN = get_norm(bn_norm, planes - self.half)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, second = torch.split(x, [self.half, x.shape[1] - self.half], dim=1)
        return torch.cat((self.IN(first), self.BN(second)), dim=1)


class NonLocal(nn.Module):
    """Embedded-Gaussian-free (dot-product) non-local block as in fast-reid's ``Non_local``.

    fast-reid computes ``inter_channels = reduc_ratio // reduc_ratio`` (= 1); checkpoints carry
    those shapes, so the same is done here.
    """

    def __init__(self, in_channels: int, bn_norm: str = "BN", reduc_ratio: int = 2):
        super().__init__()
        self.in_channels = in_channels
        self.inter_channels = reduc_ratio // reduc_ratio
        self.g = nn.Conv2d(in_channels, self.inter_channels, kernel_size=1)
        self.W = nn.Sequential(
            nn.Conv2d(self.inter_channels, in_channels, kernel_size=1),
            get_norm(bn_norm, in_channels),
        )
        nn.init.zeros_(self.W[1].weight)
        nn.init.zeros_(self.W[1].bias)
        self.theta = nn.Conv2d(in_channels, self.inter_channels, kernel_size=1)
        self.phi = nn.Conv2d(in_channels, self.inter_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[2], x.shape[3]
        g_x = self.g(x).flatten(2).transpose(1, 2)            # B, HW, C'
        theta_x = self.theta(x).flatten(2).transpose(1, 2)    # B, HW, C'
        phi_x = self.phi(x).flatten(2)                         # B, C', HW
        f = torch.matmul(theta_x, phi_x)                       # B, HW, HW
        f_div_c = f / f.shape[-1]
        y = torch.matmul(f_div_c, g_x)                         # B, HW, C'
        y = y.transpose(1, 2).reshape(-1, self.inter_channels, height, width)
        return self.W(y) + x


class GlobalAvgPool(nn.AdaptiveAvgPool2d):
    def __init__(self, output_size=1):
        super().__init__(output_size)


class GlobalMaxPool(nn.AdaptiveMaxPool2d):
    def __init__(self, output_size=1):
        super().__init__(output_size)


class AdaptiveAvgMaxPool(nn.Module):
    def __init__(self):
        super().__init__()
        self.gap = GlobalAvgPool()
        self.gmp = GlobalMaxPool()

    def forward(self, x):
        return self.gap(x) + self.gmp(x)


class GeneralizedMeanPooling(nn.Module):
    """GeM: ``mean(clamp(x, eps) ** p) ** (1/p)`` over H, W (fixed p=3)."""

    def __init__(self, norm: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = float(norm)
        self.eps = eps

    def forward(self, x):
        x = x.clamp(min=self.eps).pow(self.p)
        return F.adaptive_avg_pool2d(x, 1).pow(1.0 / self.p)


class GeneralizedMeanPoolingP(GeneralizedMeanPooling):
    """GeM with a learnable p (``heads.pool_layer.p``)."""

    def __init__(self, norm: float = 3.0, eps: float = 1e-6):
        super().__init__(norm, eps)
        self.p = nn.Parameter(torch.ones(1) * norm)


class Identity(nn.Identity):
    pass


POOLINGS = {
    "GlobalAvgPool": GlobalAvgPool,
    "FastGlobalAvgPool": GlobalAvgPool,
    "GlobalMaxPool": GlobalMaxPool,
    "AdaptiveAvgMaxPool": AdaptiveAvgMaxPool,
    "GeneralizedMeanPooling": GeneralizedMeanPooling,
    "GeneralizedMeanPoolingP": GeneralizedMeanPoolingP,
    "Identity": Identity,
}


def build_pooling(name: str) -> nn.Module:
    try:
        return POOLINGS[name]()
    except KeyError:
        raise ReidExportError(
            f"MODEL.HEADS.POOL_LAYER {name!r} is not supported; use one of {', '.join(POOLINGS)}"
        ) from None
