"""Activation statistics for static INT8 calibration, collected batch by batch.

ONNX Runtime's ``quantize_static`` builds its calibrator without a ``num_bins``, so its Entropy
method histograms every tensor into 128 bins and lands on (nearly) the min/max range; its
histogram calibrators also hold every intermediate output of the whole calibration set in memory
and search the KL threshold with Python loops. So the statistics are collected here: one ONNX
Runtime session over the model with every tensor to calibrate added as an output, fed one batch
at a time; per tensor the min, the max and a histogram of the nonzero ``|x|`` with ``num_bins`` bins
(2048 by default, as TensorRT's entropy calibrator; exact zeros, half of every ReLU output, are
left out as pytorch-quantization's ``skip_zeros`` does, or their spike drags the KL search to tiny
thresholds). The ranges computed from them go to ONNX Runtime's
``QDQQuantizer`` as ``TensorsData``.

Methods:
- ``minmax``: the observed [min, max].
- ``entropy``: the threshold T that minimises KL(P || Q) between the clipped histogram and its
  8-bit quantisation (TensorRT's legacy entropy calibration), range [-T, T] clipped to [min, max].
- ``percentile``: T = the P-th percentile of ``|x|``, range as above.
- ``mse``: per tensor, the T that minimises the expected squared error of quantizing the
  histogram (rounding error step^2/12 inside [-T, T] plus the clipping error beyond it), for the
  grid the target uses (127 steps per side for symmetric int8, 255 for a non-negative uint8
  tensor). Where entropy matches the shape of the distribution, this weighs what the next layer
  sees: the error of the values themselves, large rare values included.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np
import onnx

from ...errors import ReidExportError

if TYPE_CHECKING:
    from ...data_config import DataConfig
    from .qdq import Prepared

METHODS = ("minmax", "entropy", "percentile", "mse")
DEFAULT_NUM_BINS = 2048
DEFAULT_PERCENTILE = 99.99
_FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)


def tensors_to_calibrate(model: onnx.ModelProto, op_types: Iterable[str], exclude_nodes: Iterable[str] = ()) -> list[str]:
    """Float activations (not weights) read or written by the nodes that will be quantized.

    ``model`` must carry inferred shapes/types (``onnx.shape_inference.infer_shapes``).
    """
    op_types = set(op_types)
    excluded = set(exclude_nodes)
    types = {}
    for value in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        if value.type.HasField("tensor_type"):
            types[value.name] = value.type.tensor_type.elem_type
    initializers = {init.name for init in model.graph.initializer}
    names: list[str] = []
    seen: set[str] = set()
    for node in model.graph.node:
        if node.op_type not in op_types or node.name in excluded:
            continue
        for name in list(node.input) + list(node.output):
            if name and name not in seen and name not in initializers and types.get(name) in _FLOAT_TYPES:
                seen.add(name)
                names.append(name)
    return names


@dataclass
class TensorStats:
    """min/max and a histogram of the nonzero |x| over [0, width * bins), doubling its width when outgrown."""

    num_bins: int
    histogram: bool = True
    lo: float = math.inf
    hi: float = -math.inf
    width: float | None = None
    hist: np.ndarray | None = None
    count: int = 0

    def update(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float32).ravel()
        if values.size == 0:
            return
        finite = values[np.isfinite(values)] if not np.isfinite(values).all() else values
        if finite.size == 0:
            return
        lo, hi = float(finite.min()), float(finite.max())
        self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)
        self.count += finite.size
        if not self.histogram:
            return
        # Exact zeros (half of every ReLU output) are left out: any symmetric grid holds them
        # exactly, and their spike in the first bin drags the KL search to tiny thresholds.
        finite = finite[finite != 0]
        if finite.size == 0:
            return
        amax = max(-lo, hi)
        if self.width is None:
            self.width = amax / self.num_bins
            self.hist = np.zeros(self.num_bins, dtype=np.int64)
        while amax > self.width * self.num_bins:
            merged = self.hist.reshape(-1, 2).sum(axis=1)
            self.hist = np.zeros(self.num_bins, dtype=np.int64)
            self.hist[: merged.size] = merged
            self.width *= 2.0
        counts, _ = np.histogram(np.abs(finite), bins=self.num_bins, range=(0.0, self.width * self.num_bins))
        self.hist += counts

    @property
    def amax(self) -> float:
        return max(-self.lo, self.hi, 0.0) if self.count else 0.0


def entropy_threshold(hist: np.ndarray, width: float, num_quantized_bins: int = 128,
                      max_candidates: int = 512) -> float:
    """The |x| threshold minimising KL(P || Q) (TensorRT/MXNet entropy calibration), vectorised."""
    hist = np.asarray(hist, dtype=np.float64)
    nonzero_bins = np.nonzero(hist)[0]
    if nonzero_bins.size == 0:
        return 0.0
    last = int(nonzero_bins[-1]) + 1
    nq = num_quantized_bins
    if last <= nq:
        return last * width
    stride = max(1, (last - nq) // max_candidates)
    candidates = list(range(nq, last + 1, stride))
    if candidates[-1] != last:
        candidates.append(last)
    suffix = np.concatenate([np.cumsum(hist[::-1])[::-1], [0.0]])  # suffix[i] = sum(hist[i:])
    best_kl, best_i = math.inf, last
    for i in candidates:
        p = hist[:i].copy()
        p[i - 1] += suffix[i]
        nonzero = p != 0
        edges = (np.arange(nq + 1) * i) // nq
        sums = np.add.reduceat(hist[:i], edges[:-1])
        counts = np.add.reduceat(nonzero.astype(np.float64), edges[:-1])
        average = np.where(counts > 0, sums / np.maximum(counts, 1.0), 0.0)
        q = np.where(nonzero, np.repeat(average, np.diff(edges)), 0.0)
        p_total, q_total = p.sum(), q.sum()
        if p_total <= 0 or q_total <= 0:
            continue
        p /= p_total
        q /= q_total
        mask = p > 0
        # Where P has mass and Q none (the outliers' bin), smooth Q as MXNet/TensorRT do.
        q_masked = np.maximum(q[mask], 1e-10)
        kl = float(np.sum(p[mask] * np.log(p[mask] / q_masked)))
        if kl < best_kl:
            best_kl, best_i = kl, i
    return best_i * width


def percentile_threshold(hist: np.ndarray, width: float, percentile: float) -> float:
    """The |x| value below which ``percentile`` % of the values lie (upper edge of its bin)."""
    total = hist.sum()
    if total <= 0:
        return 0.0
    cdf = np.cumsum(hist) / total
    index = int(np.searchsorted(cdf, percentile / 100.0))
    return (min(index, hist.size - 1) + 1) * width


def mse_threshold(hist: np.ndarray, width: float, steps: float = 127.0, max_candidates: int = 1024) -> float:
    """The |x| threshold T minimising the expected squared quantization error of the histogram.

    ``steps``: quantization steps between 0 and T (127 for symmetric int8, 255 for uint8 over
    [0, T]); inside [0, T] each value costs step^2 / 12 (uniform rounding error), beyond T it is
    clipped and costs (|x| - T)^2, with |x| at its bin's centre.
    """
    hist = np.asarray(hist, dtype=np.float64)
    nonzero_bins = np.nonzero(hist)[0]
    if nonzero_bins.size == 0:
        return 0.0
    last = int(nonzero_bins[-1]) + 1
    centres = (np.arange(last) + 0.5) * width
    h = hist[:last]
    # suffix sums over the clipped bins j >= i: sum h, sum h c, sum h c^2
    s0 = np.concatenate([np.cumsum(h[::-1])[::-1], [0.0]])
    s1 = np.concatenate([np.cumsum((h * centres)[::-1])[::-1], [0.0]])
    s2 = np.concatenate([np.cumsum((h * centres ** 2)[::-1])[::-1], [0.0]])
    stride = max(1, last // max_candidates)
    edges = np.unique(np.concatenate([np.arange(1, last + 1, stride), [last]]))
    thresholds = edges * width
    inside = s0[0] - s0[edges]
    clip = s2[edges] - 2.0 * thresholds * s1[edges] + thresholds ** 2 * s0[edges]
    mse = inside * (thresholds / steps) ** 2 / 12.0 + np.maximum(clip, 0.0)
    return float(thresholds[int(np.argmin(mse))])


def threshold_to_range(stats: TensorStats, threshold: float) -> tuple[float, float]:
    lo = max(stats.lo, -threshold)
    hi = min(stats.hi, threshold)
    if stats.lo >= 0:
        lo = 0.0 if stats.lo <= threshold else stats.lo
    return lo, max(hi, lo)


@dataclass
class Calibration:
    """Per-tensor statistics and the ranges one method derives from them."""

    stats: dict[str, TensorStats] = field(default_factory=dict)
    images: int = 0

    def ranges(self, method: str, percentile: float = DEFAULT_PERCENTILE,
               unsigned_activations: bool = False) -> dict[str, tuple[float, float]]:
        if method not in METHODS:
            raise ReidExportError(f"unknown calibration method {method!r}; use one of {', '.join(METHODS)}")
        out = {}
        for name, stats in self.stats.items():
            if stats.count == 0:
                continue
            if method == "minmax" or stats.hist is None:
                out[name] = (stats.lo, stats.hi)
                continue
            # 8 bits cover [0, T] of a non-negative tensor in uint8 (256 levels), else 128 per side.
            unsigned = unsigned_activations and stats.lo >= 0
            if method == "entropy":
                threshold = entropy_threshold(stats.hist, stats.width, 256 if unsigned else 128)
            elif method == "mse":
                # uint8 over a signed tensor spreads 255 steps over [-T, T] (asymmetric, about 127.5 per side)
                steps = 255.0 if unsigned else (127.5 if unsigned_activations else 127.0)
                threshold = mse_threshold(stats.hist, stats.width, steps)
            else:
                threshold = percentile_threshold(stats.hist, stats.width, percentile)
            out[name] = threshold_to_range(stats, min(threshold, stats.amax))
        return out

    def tensors_data(self, method: str, percentile: float = DEFAULT_PERCENTILE, unsigned_activations: bool = False):
        """ONNX Runtime's ``TensorsData`` (what its quantizers read) for one method."""
        from onnxruntime.quantization.calibrate import CalibrationMethod, TensorsData

        ranges = self.ranges(method, percentile, unsigned_activations)
        return TensorsData(CalibrationMethod.MinMax,
                           {name: (np.array(lo, dtype=np.float32), np.array(hi, dtype=np.float32))
                            for name, (lo, hi) in ranges.items()})


def augmented_model(model: onnx.ModelProto, tensors: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose outputs also include ``tensors``."""
    augmented = onnx.ModelProto()
    augmented.CopyFrom(model)
    existing = {out.name for out in augmented.graph.output}
    types = {v.name: v.type.tensor_type.elem_type for v in augmented.graph.value_info}
    for name in tensors:
        if name not in existing:
            augmented.graph.output.append(
                onnx.helper.make_tensor_value_info(name, types.get(name, onnx.TensorProto.FLOAT), None))
    return augmented


def collect(model: onnx.ModelProto, tensors: list[str], batches: Iterable[tuple[np.ndarray, int]],
            histograms: bool, num_bins: int = DEFAULT_NUM_BINS, threads: int | None = None,
            progress=None) -> Calibration:
    """Run ``batches`` ((input, number of real images) pairs) and collect statistics of ``tensors``."""
    from ..ort import make_session

    if num_bins < 128 or num_bins % 2:
        raise ReidExportError(f"`num_bins` must be an even number >= 128, got {num_bins}")
    session = make_session(augmented_model(model, tensors).SerializeToString(), threads=threads,
                           optimization="basic")
    input_name = session.get_inputs()[0].name
    wanted = [name for name in tensors]
    result = Calibration({name: TensorStats(num_bins, histograms) for name in wanted})
    for batch, valid in batches:
        outputs = session.run(wanted, {input_name: batch})
        for name, value in zip(wanted, outputs):
            if value.ndim >= 1 and value.shape[0] == batch.shape[0] and valid < batch.shape[0]:
                value = value[:valid]  # drop the padding of a static-batch model's last batch
            result.stats[name].update(value)
        result.images += valid
        if progress is not None:
            progress.update(valid)
    return result


def channel_statistics(model: onnx.ModelProto, tensors, batches, threads: int | None = None,
                       progress=None) -> dict[str, dict[str, np.ndarray]]:
    """Per channel (axis 1) of each of ``tensors`` (the graph input may be one) over ``batches`` of
    (inputs, valid count): ``max`` of |x|, ``mean`` and ``meansq`` (mean of x^2)."""
    from ..ort import make_session

    tensors = list(dict.fromkeys(tensors))
    graph_inputs = {i.name for i in model.graph.input}
    session = make_session(augmented_model(model, [t for t in tensors if t not in graph_inputs]).SerializeToString(),
                           threads=threads)
    names = [o.name for o in session.get_outputs()]
    input_name = session.get_inputs()[0].name
    acc: dict[str, list] = {}
    for chunk, valid in batches:
        values = dict(zip(names, session.run(None, {input_name: chunk})))
        values[input_name] = chunk
        for name in tensors:
            value = values.get(name)
            if value is None or value.ndim < 2:
                continue
            v = np.asarray(value[:valid]).reshape(valid, value.shape[1], -1)
            wide = v.astype(np.float64)  # sums in float64; the max in the tensor's own type
            stats = (np.abs(v).max(axis=(0, 2)), wide.sum(axis=(0, 2)), (wide ** 2).sum(axis=(0, 2)),
                     v.shape[0] * v.shape[2])
            if name in acc:
                old = acc[name]
                acc[name] = [np.maximum(old[0], stats[0]), old[1] + stats[1], old[2] + stats[2], old[3] + stats[3]]
            else:
                acc[name] = list(stats)
        if progress is not None:
            progress.update(valid)
    return {name: {"max": m, "mean": total / max(n, 1), "meansq": sq / max(n, 1)} for name, (m, total, sq, n) in acc.items()}


MAX_CACHED_BYTES = 1 << 30  # calibration images kept preprocessed in memory up to this size (else re-read)


class CalibrationImages:
    """The calibration images, decoded and preprocessed with the model's data config once.

    Every pass (calibration of the plain and of the equalised graph, the per-channel statistics of
    the equalisation, the Conv input means of the bias correction) reads its batches from here; the
    preprocessed arrays are kept while they fit ``MAX_CACHED_BYTES`` (512 crops of 256x128 take
    200 MB), otherwise each pass decodes the files again."""

    def __init__(self, paths: Sequence[Path], data_config: "DataConfig", max_cached_bytes: int = MAX_CACHED_BYTES):
        self.paths = list(paths)
        self.data_config = data_config
        self.max_cached_bytes = max_cached_bytes
        self._array: np.ndarray | None = None
        self._filled = 0
        self._uncached = False

    def __len__(self) -> int:
        return len(self.paths)

    def _rows(self, start: int, stop: int) -> np.ndarray:
        from ...preprocess import preprocess

        if self._array is not None and stop <= self._filled:
            return self._array[start:stop]
        if self._uncached or (self._array is not None and start != self._filled):
            return preprocess(self.paths[start:stop], self.data_config)
        chunk = preprocess(self.paths[start:stop], self.data_config)
        if self._array is None:
            if chunk.nbytes / max(len(chunk), 1) * len(self.paths) > self.max_cached_bytes:
                self._uncached = True
                return chunk
            self._array = np.empty((len(self.paths),) + chunk.shape[1:], chunk.dtype)
        self._array[start:stop] = chunk
        self._filled = stop
        return chunk

    def batches(self, batch: int, static: bool, limit: int | None = None):
        """(inputs, number of real images) per ``batch`` of the first ``limit`` images (all by default);
        a ``static`` model's last batch is padded with copies of its last image."""
        count = len(self.paths) if limit is None else min(limit, len(self.paths))
        for start in range(0, count, batch):
            chunk = self._rows(start, min(start + batch, count))
            valid = len(chunk)
            if static and valid < batch:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - valid, axis=0)])
            yield chunk, valid


def calibrate(prepared: "Prepared", images: CalibrationImages, num_bins: int = DEFAULT_NUM_BINS,
              batch_size: int = 8, threads: int | None = None, progress: bool = True) -> Calibration:
    """One pass over the calibration images: statistics (min/max, |x| histograms) of every tensor."""
    from tqdm import tqdm

    batch = prepared.static_batch or batch_size
    bar = tqdm(total=len(images), desc=f"calibrate: {len(images)} images, {len(prepared.tensors)} tensors",
               unit="img", disable=not progress, leave=False)
    try:
        return collect(prepared.model, prepared.tensors, images.batches(batch, prepared.static_batch is not None),
                       histograms=True, num_bins=num_bins, threads=threads, progress=bar)
    finally:
        bar.close()
