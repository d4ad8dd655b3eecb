"""The benchmark loop: warm up, then time models in alternating slices, per batch size.

A :class:`Subject` is anything that can be timed: a name, ``make_input(batch_size)`` (called
once per batch size, outside the timed region) and ``run(input)`` (one timed call). The CLI
makes subjects from model files through the Encoder interface; ``benchmarks/gpu_bench.py``
makes them from hand-tuned torch routes (FP16, channels_last, CUDA graphs, torch.compile).

Fairness: for each batch size every subject is warmed up, then the timed iterations are split
into ``rounds`` slices and the subjects take turns (A B A B ...), so a slow drift of the
machine (another process, thermal state) is shared instead of landing on one model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from tqdm import tqdm

from ..errors import ReidExportError
from .memory import GpuMemory, peak_rss_mib, reset_peak_rss
from .stats import summarize


class CpuTimer:
    """Wall-clock latency of one call (``time.perf_counter``, or any clock returning seconds)."""

    kind = "perf_counter"

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock

    def sync(self) -> None:
        pass

    def time(self, fn: Callable[[Any], Any], arg: Any) -> float:
        start = self.clock()
        fn(arg)
        return (self.clock() - start) * 1000.0


class CudaEventTimer:
    """Latency of one call measured with CUDA events on the current stream, synchronised.

    The call is bracketed by two recorded events and the end event is waited for, so the
    figure covers the host's kernel launches and the device's work up to the last kernel.
    """

    kind = "cuda_events"

    def __init__(self):
        import torch

        self._torch = torch
        self._start = torch.cuda.Event(enable_timing=True)
        self._end = torch.cuda.Event(enable_timing=True)

    def sync(self) -> None:
        self._torch.cuda.synchronize()

    def time(self, fn: Callable[[Any], Any], arg: Any) -> float:
        self._start.record()
        fn(arg)
        self._end.record()
        self._end.synchronize()
        return float(self._start.elapsed_time(self._end))


@dataclass
class Subject:
    """One thing to time. ``run`` must finish its work before returning, or the timer must sync."""

    name: str
    run: Callable[[Any], Any]
    make_input: Callable[[int], Any]
    backend: str = "?"
    precision: str = "fp32"
    device: str = "cpu"
    model: str = ""
    timer: Any = field(default_factory=CpuTimer)
    info: dict = field(default_factory=dict)
    batch_sizes: Sequence[int] | None = None  # run only these (None: every batch size of the run)

    def runs_at(self, batch_size: int) -> bool:
        return self.batch_sizes is None or batch_size in self.batch_sizes


@dataclass
class BenchSettings:
    batch_sizes: Sequence[int] = (1, 8, 32)
    warmup_s: float = 1.0
    duration_s: float | None = 3.0      # timed seconds per subject and batch size, over all rounds
    iterations: int | None = None       # or a fixed number of timed iterations (overrides duration)
    rounds: int = 5                     # alternating slices per batch size

    def validate(self) -> None:
        if not self.batch_sizes or any(int(b) < 1 for b in self.batch_sizes):
            raise ReidExportError(f"batch sizes must be >= 1, got {list(self.batch_sizes)}", exit_code=2)
        if self.warmup_s < 0:
            raise ReidExportError(f"`warmup` must be >= 0 seconds, got {self.warmup_s}", exit_code=2)
        if self.iterations is None and (self.duration_s is None or self.duration_s <= 0):
            raise ReidExportError(f"`duration` must be > 0 seconds, got {self.duration_s}", exit_code=2)
        if self.iterations is not None and self.iterations < 1:
            raise ReidExportError(f"`iterations` must be >= 1, got {self.iterations}", exit_code=2)
        if self.rounds < 1:
            raise ReidExportError(f"`rounds` must be >= 1, got {self.rounds}", exit_code=2)

    def slices(self) -> int:
        return min(self.rounds, self.iterations) if self.iterations is not None else self.rounds

    def describe(self) -> dict:
        return {"batch_sizes": list(self.batch_sizes), "warmup_s": self.warmup_s,
                "duration_s": None if self.iterations is not None else self.duration_s,
                "iterations": self.iterations, "rounds": self.slices()}


def split_iterations(total: int, rounds: int) -> list[int]:
    """``total`` iterations over ``rounds`` slices, as even as possible, earlier slices first."""
    base, extra = divmod(total, rounds)
    return [base + (1 if i < extra else 0) for i in range(rounds)]


def _run_for(subject: Subject, arg: Any, seconds: float | None, count: int | None,
             guard_factor: float = 5.0) -> list[float]:
    """Latencies (ms) of calls until ``count`` calls or ``seconds`` of measured time (>= 1 call).

    In duration mode a wall-clock guard (``guard_factor`` x the slice, + 2 s) stops a slice whose
    untimed overhead is far larger than its measured time.
    """
    timer = subject.timer
    timer.sync()
    latencies: list[float] = []
    if count is not None:
        for _ in range(count):
            latencies.append(timer.time(subject.run, arg))
        return latencies
    budget_ms = (seconds or 0.0) * 1000.0
    spent = 0.0
    wall_stop = time.monotonic() + guard_factor * (seconds or 0.0) + 2.0
    while True:
        latency = timer.time(subject.run, arg)
        latencies.append(latency)
        spent += latency
        if spent >= budget_ms or time.monotonic() > wall_stop:
            return latencies


def _failure(subject: Subject, batch_size: int, exc: BaseException) -> str:
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, ReidExportError):
        return message
    return f"{type(exc).__name__}: {message[:300]}"


def run_benchmark(subjects: Sequence[Subject], settings: BenchSettings, progress: bool = False,
                  measure_memory: bool = True) -> list[dict]:
    """Time every subject at every batch size; one result dict per (subject, batch size).

    A subject that fails at a batch size (out of memory, a static-batch model, ...) gets a
    result with ``error`` set for that batch size and the run goes on with the others.
    """
    settings.validate()
    if not subjects:
        raise ReidExportError("nothing to benchmark: give at least one model", exit_code=2)
    rounds = settings.slices()
    per_round = split_iterations(settings.iterations, rounds) if settings.iterations is not None else None
    slice_s = settings.duration_s / rounds if settings.iterations is None else None
    can_reset_rss = measure_memory and reset_peak_rss()
    gpu = GpuMemory(measure_memory and any(s.device.startswith("cuda") for s in subjects))
    results: list[dict] = []
    total_steps = sum(s.runs_at(b) for b in settings.batch_sizes for s in subjects) * (rounds + 1)
    bar = tqdm(total=total_steps, desc="bench", unit="slice", disable=not progress, leave=False)
    try:
        for batch_size in settings.batch_sizes:
            cells = []
            for subject in (s for s in subjects if s.runs_at(batch_size)):
                cell = {"subject": subject, "latencies": [], "error": None, "rss_peak_mib": None,
                        "gpu_peak_mib": None, "gpu_used_mib": None, "warmup_iterations": 0, "warmup_ms": 0.0}
                bar.set_postfix_str(f"batch {batch_size} warmup {subject.name}")
                try:
                    cell["input"] = subject.make_input(batch_size)
                    warm = _run_for(subject, cell["input"], settings.warmup_s, None if settings.warmup_s > 0 else 1)
                    cell["warmup_iterations"], cell["warmup_ms"] = len(warm), sum(warm)
                except Exception as exc:  # noqa: BLE001 - recorded per cell, the run goes on
                    cell["error"] = _failure(subject, batch_size, exc)
                    cell["input"] = None
                cells.append(cell)
                bar.update(1)
            for round_index in range(rounds):
                for cell in cells:
                    subject = cell["subject"]
                    bar.set_postfix_str(f"batch {batch_size} round {round_index + 1}/{rounds} {subject.name}")
                    if cell["error"] is None:
                        if can_reset_rss:
                            reset_peak_rss()
                        gpu.reset()
                        try:
                            count = per_round[round_index] if per_round is not None else None
                            cell["latencies"].extend(_run_for(subject, cell["input"], slice_s, count))
                        except Exception as exc:  # noqa: BLE001
                            cell["error"] = _failure(subject, batch_size, exc)
                        else:
                            if can_reset_rss:
                                cell["rss_peak_mib"] = max(cell["rss_peak_mib"] or 0.0, peak_rss_mib())
                            peak = gpu.peak_allocated_mib()
                            if peak is not None:
                                cell["gpu_peak_mib"] = max(cell["gpu_peak_mib"] or 0.0, peak)
                                cell["gpu_used_mib"] = max(cell["gpu_used_mib"] or 0.0, gpu.device_used_mib())
                    bar.update(1)
            for cell in cells:
                results.append(_result(cell, batch_size))
                cell["input"] = None  # free this batch size's inputs before the next one
    finally:
        bar.close()
    return results


def _result(cell: dict, batch_size: int) -> dict:
    subject: Subject = cell["subject"]
    out = {"name": subject.name, "model": subject.model, "backend": subject.backend,
           "precision": subject.precision, "device": subject.device, "batch_size": batch_size,
           "timer": getattr(subject.timer, "kind", type(subject.timer).__name__)}
    if cell["latencies"] and cell["error"] is None:
        out.update(summarize(cell["latencies"], batch_size))
    out.update({"warmup_iterations": cell["warmup_iterations"], "warmup_ms": cell["warmup_ms"],
                "rss_peak_mib": cell["rss_peak_mib"], "gpu_peak_mib": cell["gpu_peak_mib"],
                "gpu_used_mib": cell["gpu_used_mib"], "error": cell["error"]})
    out.update(subject.info)
    return out
