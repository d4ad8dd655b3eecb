"""ImageNet initialisation of the backbone from a local file (no hub downloads here).

Accepted layouts, all mapped onto ``backbone.*``:

* torchvision ResNet (``conv1.weight``, ``bn1.*``, ``layer{1..4}.{i}.conv{1,2,3}/bn{1,2,3}/downsample.{0,1}``,
  ``fc.*`` dropped) -- the names are already fast-reid's;
* IBN-Net's ResNet-IBN-a releases (``layer1.0.bn1.IN.*`` / ``.bn1.BN.*``; ``fc.*`` dropped);
* either wrapped in ``{"state_dict": ...}`` or ``{"model": ...}`` and/or with ``module.`` prefixes;
* a fast-reid/reid-train checkpoint (``backbone.*`` keys): its backbone is taken, its head ignored.

Loading is ``torch.load(weights_only=True)`` (via :func:`reid_export.checkpoint.read_checkpoint`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from reid_export.checkpoint import read_checkpoint
from reid_export.errors import ReidExportError

log = logging.getLogger("reid-train")

_DROP_PREFIXES = ("fc.", "classifier.")


def backbone_state_from_file(path: str | Path) -> dict[str, torch.Tensor]:
    obj = read_checkpoint(path)
    for key in ("state_dict", "model"):
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    state = {}
    has_backbone_prefix = any(k.replace("module.", "", 1).startswith("backbone.") for k in obj)
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            continue
        while key.startswith("module."):
            key = key[len("module."):]
        if has_backbone_prefix:
            if not key.startswith("backbone."):
                continue  # the head of a ReID checkpoint
            key = key[len("backbone."):]
        if key.startswith(_DROP_PREFIXES):
            continue
        state[key] = value
    return state


def load_pretrained_backbone(backbone: nn.Module, path: str | Path) -> dict:
    """Copy the matching ImageNet weights into ``backbone``; report what did not match."""
    state = backbone_state_from_file(path)
    own = backbone.state_dict()
    loaded = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    mismatched = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
                  if k in own and v.shape != own[k].shape]
    unexpected = sorted(k for k in state if k not in own)
    missing = sorted(k for k in own if k not in loaded and not k.endswith("num_batches_tracked"))
    if not loaded:
        raise ReidExportError(
            f"{path}: no weight in this file matches the backbone (expected torchvision/IBN-Net ResNet keys "
            f"such as conv1.weight, layer1.0.conv1.weight); check MODEL.BACKBONE.PRETRAIN_PATH and DEPTH"
        )
    if mismatched and len(mismatched) * 4 > len(loaded):
        raise ReidExportError(
            f"{path}: {len(mismatched)} backbone weights have other shapes (e.g. {mismatched[0]}); the file is "
            "probably of another depth: check MODEL.BACKBONE.DEPTH / WITH_IBN"
        )
    backbone.load_state_dict(loaded, strict=False)
    report = {"loaded": len(loaded), "missing": missing, "unexpected": unexpected, "mismatched": mismatched}
    log.info("loaded %d ImageNet tensors into the backbone from %s", len(loaded), path)
    if missing:
        log.warning("backbone weights not in %s (left random): %s%s", path, ", ".join(missing[:8]),
                    f", ... ({len(missing)} in all)" if len(missing) > 8 else "")
    if unexpected:
        log.warning("weights in %s not used by the backbone: %s%s", path, ", ".join(unexpected[:8]),
                    f", ... ({len(unexpected)} in all)" if len(unexpected) > 8 else "")
    if mismatched:
        log.warning("weights of another shape, skipped: %s", ", ".join(mismatched[:4]))
    return report
