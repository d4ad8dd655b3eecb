"""Heads: fast-reid's EmbeddingHead (pooling, optional 1x1 embedding conv, BNNeck, classifier weight)
and torchreid's OSNet head (global average pool -> ``fc``: Linear, BatchNorm1d, ReLU)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ReidExportError
from .layers import build_pooling, get_norm

CLS_LAYERS = ("Linear", "CircleSoftmax", "ArcSoftmax", "CosSoftmax")


def _kaiming_init(m: nn.Module) -> None:
    if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out")
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class EmbeddingHead(nn.Module):
    """Eval: returns the post-neck feature [B, D]. Train: features and classifier logits."""

    def __init__(self, feat_dim: int, embedding_dim: int = 0, num_classes: int = 0,
                 neck_feat: str = "before", pool_type: str = "GlobalAvgPool", cls_type: str = "Linear",
                 scale: float = 1.0, margin: float = 0.0, with_bnneck: bool = True, norm_type: str = "BN"):
        super().__init__()
        if cls_type not in CLS_LAYERS:
            raise ReidExportError(
                f"MODEL.HEADS.CLS_LAYER {cls_type!r} is not supported; use one of {', '.join(CLS_LAYERS)}"
            )
        if neck_feat not in ("before", "after"):
            raise ReidExportError(f"MODEL.HEADS.NECK_FEAT must be before or after, got {neck_feat!r}")
        self.pool_layer = build_pooling(pool_type)
        self.neck_feat = neck_feat
        self.cls_type = cls_type
        self.scale = float(scale)
        self.margin = float(margin)
        neck: list[nn.Module] = []
        if embedding_dim > 0:
            neck.append(nn.Conv2d(feat_dim, embedding_dim, 1, 1, bias=False))
            feat_dim = embedding_dim
        if with_bnneck:
            neck.append(get_norm(norm_type, feat_dim, bias_freeze=True))
        self.bottleneck = nn.Sequential(*neck)
        self.bottleneck.apply(_kaiming_init)
        self.out_dim = feat_dim
        self.weight = nn.Parameter(torch.normal(0, 0.01, (max(num_classes, 0), feat_dim)))

    def forward(self, features: torch.Tensor, targets: torch.Tensor | None = None):
        pool_feat = self.pool_layer(features)
        neck_feat = self.bottleneck(pool_feat).flatten(1)
        if not self.training:
            return neck_feat
        return {
            "logits": self.logits(neck_feat, targets),
            "features": pool_feat.flatten(1) if self.neck_feat == "before" else neck_feat,
        }

    def logits(self, neck_feat: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
        """Classifier logits with the margin of CircleSoftmax / ArcSoftmax / CosSoftmax applied."""
        if self.weight.shape[0] == 0:
            raise ReidExportError("MODEL.HEADS.NUM_CLASSES is 0: training needs the number of identities")
        if self.cls_type == "Linear":
            return F.linear(neck_feat, self.weight)
        cos = F.linear(F.normalize(neck_feat), F.normalize(self.weight))
        if targets is None:
            return cos * self.scale
        one_hot = F.one_hot(targets, cos.shape[1]).bool()
        s, m = self.scale, self.margin
        if self.cls_type == "CircleSoftmax":
            alpha_p = torch.clamp_min(-cos.detach() + 1 + m, 0.0)
            alpha_n = torch.clamp_min(cos.detach() + m, 0.0)
            logits_p = alpha_p * (cos - (1 - m))
            logits_n = alpha_n * (cos - m)
            return torch.where(one_hot, logits_p, logits_n) * s
        if self.cls_type == "CosSoftmax":
            return torch.where(one_hot, cos - m, cos) * s
        # ArcSoftmax: cos(theta + m) on the target, with the usual easy-margin guard.
        theta = torch.acos(cos.clamp(-1 + 1e-7, 1 - 1e-7))
        target = torch.cos(theta + m)
        target = torch.where(theta + m < math.pi, target, cos - math.sin(math.pi - m) * m)
        return torch.where(one_hot, target, cos) * s


class TorchreidHead(nn.Module):
    """torchreid's eval output: global average pool -> ``fc`` (Linear, BatchNorm1d, ReLU), not normalised.

    Keys ``heads.fc.0.*`` (Linear), ``heads.fc.1.*`` (BatchNorm1d), the names of torchreid's
    ``fc.0``/``fc.1``. ``fc_dim`` 0 means no ``fc`` (torchreid's ``fc_dims=None``): the pooled map.
    In training it returns logits from ``heads.weight`` (no bias; torchreid's ``classifier`` is
    not loaded, it belongs to the training identities) and the ``fc`` feature for the triplet loss.
    """

    def __init__(self, feat_dim: int, fc_dim: int = 512, num_classes: int = 0, pool_type: str = "GlobalAvgPool"):
        super().__init__()
        self.pool_layer = build_pooling(pool_type)
        if fc_dim > 0:
            self.fc = nn.Sequential(nn.Linear(feat_dim, fc_dim), nn.BatchNorm1d(fc_dim), nn.ReLU(inplace=True))
            nn.init.normal_(self.fc[0].weight, 0, 0.01)
            nn.init.zeros_(self.fc[0].bias)
            feat_dim = fc_dim
        else:
            self.fc = None
        self.out_dim = feat_dim
        self.weight = nn.Parameter(torch.normal(0, 0.01, (max(num_classes, 0), feat_dim)))

    def forward(self, features: torch.Tensor, targets: torch.Tensor | None = None):
        v = self.pool_layer(features).flatten(1)
        if self.fc is not None:
            v = self.fc(v)
        if not self.training:
            return v
        if self.weight.shape[0] == 0:
            raise ReidExportError("MODEL.HEADS.NUM_CLASSES is 0: training needs the number of identities")
        return {"logits": F.linear(v, self.weight), "features": v}


HEADS = ("EmbeddingHead", "TorchreidHead")


def build_heads(cfg, feat_dim: int) -> nn.Module:
    h = cfg.MODEL.HEADS
    if h.NAME == "TorchreidHead":
        if h.CLS_LAYER != "Linear":
            raise ReidExportError(f"MODEL.HEADS.CLS_LAYER {h.CLS_LAYER!r}: TorchreidHead has a Linear classifier; "
                                  "set CLS_LAYER: Linear")
        return TorchreidHead(feat_dim, fc_dim=int(h.EMBEDDING_DIM), num_classes=int(h.NUM_CLASSES),
                             pool_type=h.POOL_LAYER)
    if h.NAME != "EmbeddingHead":
        raise ReidExportError(f"MODEL.HEADS.NAME {h.NAME!r} is not supported; use one of {', '.join(HEADS)}")
    return EmbeddingHead(
        feat_dim=feat_dim,
        embedding_dim=int(h.EMBEDDING_DIM),
        num_classes=int(h.NUM_CLASSES),
        neck_feat=h.NECK_FEAT,
        pool_type=h.POOL_LAYER,
        cls_type=h.CLS_LAYER,
        scale=h.SCALE,
        margin=h.MARGIN,
        with_bnneck=bool(h.WITH_BNNECK),
        norm_type=h.NORM,
    )
