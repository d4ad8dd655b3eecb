"""Latency statistics: percentiles of per-iteration latencies and throughput.

Percentiles use the "linear" method (Hyndman & Fan type 7, numpy's default): on the sorted
samples x[0..n-1], the q-th percentile sits at rank h = (n - 1) * q / 100 and is
x[floor(h)] + (h - floor(h)) * (x[floor(h) + 1] - x[floor(h)]). So p50 of an even count is the
mean of the two middle samples, p0 is the minimum and p100 the maximum. (trtexec takes the
nearest sample instead; with hundreds of iterations the two differ by well under a sample step.)

Throughput is images divided by the summed latency of the timed iterations: iterations run one
after another, so this is the rate a single caller gets, excluding untimed work between calls.
"""

from __future__ import annotations

import math
from typing import Sequence

PERCENTILES = (50, 90, 95, 99)
LATENCY_KEYS = ("min_ms", "mean_ms", "median_ms", "p90_ms", "p95_ms", "p99_ms", "max_ms")


def percentile(samples: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ``samples``, linear interpolation between order statistics."""
    if not samples:
        raise ValueError("percentile of no samples")
    if not 0.0 <= q <= 100.0 or math.isnan(q):
        raise ValueError(f"percentile must be within 0..100, got {q}")
    ordered = sorted(float(s) for s in samples)
    rank = (len(ordered) - 1) * q / 100.0
    lower = math.floor(rank)
    upper = min(lower + 1, len(ordered) - 1)
    frac = rank - lower
    return ordered[lower] + frac * (ordered[upper] - ordered[lower])


def summarize(latencies_ms: Sequence[float], batch_size: int) -> dict:
    """trtexec-style figures of per-iteration latencies (ms) for batches of ``batch_size`` images."""
    if not latencies_ms:
        raise ValueError("no timed iterations to summarize")
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    values = [float(v) for v in latencies_ms]
    total_ms = math.fsum(values)
    n = len(values)
    mean = total_ms / n
    variance = math.fsum((v - mean) ** 2 for v in values) / n
    out = {
        "iterations": n,
        "images": n * batch_size,
        "total_ms": total_ms,
        "min_ms": min(values),
        "mean_ms": mean,
        "median_ms": percentile(values, 50),
        "p90_ms": percentile(values, 90),
        "p95_ms": percentile(values, 95),
        "p99_ms": percentile(values, 99),
        "max_ms": max(values),
        "std_ms": math.sqrt(variance),
        "throughput_ips": (n * batch_size) / (total_ms / 1000.0) if total_ms > 0 else float("inf"),
    }
    return out


# Below this many timed calls p99 is an interpolation between the slowest two or three calls.
MIN_TAIL_SAMPLES = 100


def few_samples_note(results: Sequence[dict], minimum: int = MIN_TAIL_SAMPLES) -> str | None:
    """One line naming the results whose tail percentiles rest on fewer than ``minimum`` calls."""
    thin = [r for r in results if not r.get("error") and r.get("iterations", minimum) < minimum]
    if not thin:
        return None
    fewest = min(thin, key=lambda r: r["iterations"])
    return (f"note: {len(thin)} of {len(results)} results have fewer than {minimum} timed calls (fewest: "
            f"{fewest['iterations']}, {fewest.get('name', '?')} at batch {fewest.get('batch_size', '?')}); their "
            f"p95/p99 are interpolated between the slowest few calls. For tail latency give a longer `duration` "
            f"or `iterations` {minimum}")
