"""An independent, functional transcription of fast-reid's inference path, for tests.

It does not use reid_export at all: it reads a fast-reid state dict and applies fast-reid's
documented computation with torch.nn.functional, and preprocesses images exactly as fast-reid's
demo predictor does (cv2.imread -> [:, :, ::-1] -> cv2.resize INTER_CUBIC -> float32 CHW).

A transcription is not the authority on what fast-reid computes: an earlier version padded the
stem max-pool as the design notes then said, and agreed with a model that did the same. It is kept
only because ``tests/test_golden.py`` checks it against features computed by fast-reid's own code
(``../shared/golden``); it serves the tests that run where that folder is absent.
"""

from __future__ import annotations

import re

import cv2
import numpy as np
import torch
import torch.nn.functional as F

MEAN = torch.tensor([0.485 * 255, 0.456 * 255, 0.406 * 255]).view(1, 3, 1, 1)
STD = torch.tensor([0.229 * 255, 0.224 * 255, 0.225 * 255]).view(1, 3, 1, 1)


def demo_preprocess(path, size_test) -> torch.Tensor:
    original = cv2.imread(str(path))          # BGR uint8
    original = original[:, :, ::-1]           # RGB
    image = cv2.resize(np.ascontiguousarray(original), tuple(size_test[::-1]), interpolation=cv2.INTER_CUBIC)
    return torch.as_tensor(image.astype("float32").transpose(2, 0, 1))[None]


def _bn(x, sd, p):
    return F.batch_norm(x, sd[p + "running_mean"], sd[p + "running_var"], sd[p + "weight"], sd[p + "bias"],
                        training=False, momentum=0.0, eps=1e-5)


def _norm1(x, sd, p):
    if p + "IN.weight" in sd:  # IBN-a
        half = sd[p + "IN.weight"].numel()
        a = F.instance_norm(x[:, :half].contiguous(), weight=sd[p + "IN.weight"], bias=sd[p + "IN.bias"], eps=1e-5)
        b = _bn(x[:, half:].contiguous(), sd, p + "BN.")
        return torch.cat([a, b], 1)
    return _bn(x, sd, p)


def _block(x, sd, p, stride):
    bottleneck = p + "conv3.weight" in sd
    residual = x
    if bottleneck:
        out = F.relu(_norm1(F.conv2d(x, sd[p + "conv1.weight"]), sd, p + "bn1."))
        out = F.relu(_bn(F.conv2d(out, sd[p + "conv2.weight"], stride=stride, padding=1), sd, p + "bn2."))
        out = _bn(F.conv2d(out, sd[p + "conv3.weight"]), sd, p + "bn3.")
    else:
        out = F.relu(_norm1(F.conv2d(x, sd[p + "conv1.weight"], stride=stride, padding=1), sd, p + "bn1."))
        out = _bn(F.conv2d(out, sd[p + "conv2.weight"], padding=1), sd, p + "bn2.")
    if p + "downsample.0.weight" in sd:
        residual = _bn(F.conv2d(x, sd[p + "downsample.0.weight"], stride=stride), sd, p + "downsample.1.")
    return F.relu(out + residual)


def _non_local(x, sd, p):
    b = x.size(0)
    inter = sd[p + "g.weight"].shape[0]
    g_x = F.conv2d(x, sd[p + "g.weight"], sd[p + "g.bias"]).view(b, inter, -1).permute(0, 2, 1)
    theta = F.conv2d(x, sd[p + "theta.weight"], sd[p + "theta.bias"]).view(b, inter, -1).permute(0, 2, 1)
    phi = F.conv2d(x, sd[p + "phi.weight"], sd[p + "phi.bias"]).view(b, inter, -1)
    f = torch.matmul(theta, phi)
    y = torch.matmul(f / f.size(-1), g_x).permute(0, 2, 1).contiguous().view(b, inter, *x.size()[2:])
    w_y = _bn(F.conv2d(y, sd[p + "W.0.weight"], sd[p + "W.0.bias"]), sd, p + "W.1.")
    return w_y + x


def forward(sd: dict, images: torch.Tensor, last_stride: int = 1) -> torch.Tensor:
    """Eval-mode Baseline output for a fast-reid state dict (BNNeck after pooling)."""
    dtype = images.dtype
    sd = {k[len("module."):] if k.startswith("module.") else k: v.to(dtype) if v.is_floating_point() else v
          for k, v in sd.items()}
    x = (images - MEAN.to(dtype)) / STD.to(dtype)
    x = F.conv2d(x, sd["backbone.conv1.weight"], stride=2, padding=3)
    x = F.relu(_bn(x, sd, "backbone.bn1."))
    x = F.max_pool2d(x, 3, 2, padding=0, ceil_mode=True)  # fast-reid: no padding
    for stage in range(1, 5):
        n_blocks = 1 + max(int(m.group(1)) for k in sd
                           if (m := re.match(rf"backbone\.layer{stage}\.(\d+)\.", k)))
        n_nl = len({int(m.group(1)) for k in sd if (m := re.match(rf"backbone\.NL_{stage}\.(\d+)\.", k))})
        nl_idx = sorted(n_blocks - (i + 1) for i in range(n_nl))
        stride = {1: 1, 2: 2, 3: 2, 4: last_stride}[stage]
        counter = 0
        for i in range(n_blocks):
            x = _block(x, sd, f"backbone.layer{stage}.{i}.", stride if i == 0 else 1)
            if counter < len(nl_idx) and i == nl_idx[counter]:
                x = _non_local(x, sd, f"backbone.NL_{stage}.{counter}.")
                counter += 1
    if "heads.pool_layer.p" in sd:
        p = sd["heads.pool_layer.p"]
        pooled = F.adaptive_avg_pool2d(x.clamp(min=1e-6).pow(p), 1).pow(1.0 / p)
    else:
        pooled = F.adaptive_avg_pool2d(x, 1)
    return _bn(pooled, sd, "heads.bottleneck.0.")[..., 0, 0]


def forward_gem3(sd: dict, images: torch.Tensor) -> torch.Tensor:
    """Same as :func:`forward` but with fixed-p (=3) GeM pooling (AGW)."""
    sd = dict(sd)
    sd["heads.pool_layer.p"] = torch.tensor([3.0])
    return forward(sd, images)
