"""Random weights that behave like trained ones numerically: the one way the tests and the speed benchmarks
make a model without a checkpoint.

A freshly built network has unit norm scales and zero running statistics: its activations grow layer after
layer, its features hardly differ between images, and float rounding is exaggerated. ``randomize_bn`` gives
it non-trivial norm affine parameters (small gains on the last norm of residual branches, as trained
ResNets have) and BatchNorm running statistics measured on image-like inputs.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

# the last norm of a non-local block's residual: trained ones add little, so it starts small
NON_LOCAL_GAIN = 0.2


def _last_of_branch(name: str, parent: nn.Module | None) -> bool:
    """Whether the norm called ``name`` closes a residual branch (Bottleneck bn3, BasicBlock bn2, non-local W.1)."""
    from .resnet import BasicBlock

    return name.endswith((".bn3", ".W.1")) or (name.endswith(".bn2") and isinstance(parent, BasicBlock))


def randomize_bn(model: nn.Module, seed: int = 0, size: tuple[int, int] = (256, 128), *,
                 inputs: Iterable[torch.Tensor] | None = None, affine: bool = True,
                 branch_gain: float | None = None) -> nn.Module:
    """Give a built model (``modeling.build_model``) the numerics of a trained one, in place; returns it in
    eval mode.

    ``affine``: BatchNorm/InstanceNorm scales drawn in [0.5, 1), biases ~ 0.1 N(0, 1) (a ``torch.Generator``
    seeded with ``seed``); the last norm of every non-local block is then scaled by 0.2, or, with
    ``branch_gain``, the last norm of every residual branch (and non-local block) by ``branch_gain``.
    The BatchNorm running statistics are then reset and measured (cumulative average) in train mode through
    the backbone, the pooling and the BNNeck on ``inputs``: batches in the units the model takes (0..255 for
    fast-reid models, normalised by the model itself), by default one batch of 4 uniform random images of
    ``size`` drawn from the same generator.
    """
    gen = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, m in model.named_modules():
            if affine and isinstance(m, (nn.BatchNorm2d, nn.InstanceNorm2d)) and m.affine:
                m.weight.copy_(0.5 + 0.5 * torch.rand(m.weight.shape, generator=gen))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
                if branch_gain is not None and _last_of_branch(name, modules.get(name.rsplit(".", 1)[0])):
                    m.weight.mul_(branch_gain)
                elif branch_gain is None and ".NL_" in name and name.endswith(".W.1"):
                    m.weight.mul_(NON_LOCAL_GAIN)
            if isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None  # cumulative average over the batches below
        if inputs is None:
            inputs = [torch.rand(4, 3, *size, generator=gen) * 255]
        model.train()
        for x in inputs:  # the eval path up to the BNNeck, in train mode (the classifier needs no classes)
            x = torch.as_tensor(x, dtype=torch.float32)
            model.heads.bottleneck(model.heads.pool_layer(model.backbone((x - model.pixel_mean) / model.pixel_std)))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = 0.1
    return model.eval()
