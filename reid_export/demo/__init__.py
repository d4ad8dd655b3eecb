"""``reid-export demo``: the whole toolchain on one small example, with a report.

synthetic data (or ``--data``) -> reid-train (BoT) -> the untrained twin -> ONNX FP32 -> FP16 ->
INT8 (tensorrt S8S8, cpu U8S8) -> parity -> eval -> bench -> ``report.md``, each stage reused on a
re-run while its inputs and outputs are unchanged (see :mod:`reid_export.demo.stages`).
"""

from .pipeline import PRESETS, VARIANTS, Demo, Preset
from .run import DemoResult, run_demo
from .stages import StageFailed

__all__ = ["PRESETS", "VARIANTS", "Demo", "DemoResult", "Preset", "StageFailed", "run_demo"]
