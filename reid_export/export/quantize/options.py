"""What ``quantize`` is asked to do: one dataclass, checked once before any work."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ...embeddings import Tolerances
from ...errors import UsageError
from .calibration import DEFAULT_NUM_BINS, METHODS
from .qdq import TARGETS

PRECISIONS = ("fp16", "int8")
DEFAULT_CALIB_SIZE = 512
DEFAULT_VAL_SIZE = 128
DEFAULT_METHOD = "auto"
DEFAULT_MAX_FLOAT_FRACTION = 0.25  # nodes kept in float at most, by default: a quarter of the quantizable ones


@dataclass
class QuantizeOptions:
    """``precision`` ``fp16`` or ``int8``; for INT8, ``target`` (``tensorrt`` S8S8 / ``cpu`` U8S8), the
    calibration folders and sizes, the calibration ``method`` (``auto`` tries them all), the ``gate``
    (default: :meth:`~reid_export.embeddings.Tolerances.reduced_precision`, shared with ``parity`` and
    ``eval``), ``max_float`` nodes at most kept in float to meet it (None: a quarter of the quantizable
    nodes; 0: none), and whether to also try the activation-equalised graph (``equalize``) and the
    weight-rounding bias correction (``bias_correction``). ``allow_below_gate`` writes a model that
    misses the gate, marked so in its metadata."""

    precision: str
    target: str = "tensorrt"
    calib_dirs: Sequence[str | Path] = ()
    calib_size: int = DEFAULT_CALIB_SIZE
    val_dirs: Sequence[str | Path] = ()
    val_size: int = DEFAULT_VAL_SIZE
    method: str = DEFAULT_METHOD
    percentile: float | None = None
    exclude: Sequence[str] = ()
    seed: int = 0
    num_bins: int = DEFAULT_NUM_BINS
    batch_size: int = 8
    reduce_range: bool | None = None
    threads: int | None = None
    progress: bool = True
    gate: Tolerances | None = None
    max_float: int | None = None
    allow_below_gate: bool = False
    equalize: bool = True
    bias_correction: bool = True

    @property
    def resolved_gate(self) -> Tolerances:
        return self.gate if self.gate is not None else Tolerances.reduced_precision()

    def check(self) -> "QuantizeOptions":
        """Raise :class:`UsageError` for options that cannot go together; returns ``self``."""
        int8 = self.precision == "int8"
        if self.precision not in PRECISIONS:
            raise UsageError(f"`precision` must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.percentile is not None and self.method not in ("percentile", "auto"):
            raise UsageError("`percentile` applies to `method` percentile (or auto, as one more candidate)")
        if self.percentile is not None and not 50.0 < self.percentile <= 100.0:
            raise UsageError(f"`percentile` must be in (50, 100], got {self.percentile}")
        if int8 and self.target not in TARGETS:
            raise UsageError(f"`target` must be one of {', '.join(TARGETS)}, got {self.target!r}")
        if int8 and self.method not in METHODS + ("auto",):
            raise UsageError(f"`method` must be auto or one of {', '.join(METHODS)}, got {self.method!r}")
        if int8 and self.reduce_range and self.target != "cpu":
            raise UsageError("`reduce_range` applies to `target` cpu (TensorRT takes full 8-bit weights)")
        if int8 and not self.calib_dirs:
            raise UsageError("`precision` int8 needs real calibration images: `calib_dirs` DIR (for example the "
                             "training crops, bounding_box_train/)")
        if self.max_float is not None and self.max_float < 0:
            raise UsageError(f"`max_float` must be >= 0, got {self.max_float}")
        return self


__all__ = ["PRECISIONS", "DEFAULT_CALIB_SIZE", "DEFAULT_VAL_SIZE", "DEFAULT_METHOD", "QuantizeOptions"]
