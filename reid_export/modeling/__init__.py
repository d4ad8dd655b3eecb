"""fast-reid-compatible models (Baseline with ResNet/IBN/NL backbones, GeM, BNNeck)."""

from .baseline import Baseline, build_model

__all__ = ["Baseline", "build_model"]
