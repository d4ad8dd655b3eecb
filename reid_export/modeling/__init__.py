"""fast-reid-compatible models (Baseline with ResNet/IBN/NL or OSNet backbones, GeM, BNNeck, torchreid head)."""

from .baseline import Baseline, build_model

__all__ = ["Baseline", "build_model"]
