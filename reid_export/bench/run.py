"""``bench`` as a library call: models side by side, per batch size, with the machine recorded.

:func:`run_bench` opens the models through the one Encoder interface, times them in alternating
slices with the same thread count (:mod:`reid_export.bench.core`) and returns a
:class:`BenchReport`: results per model and batch size, the environment (CPU, ISA flags, load
before and after), notes and warnings, and the verdict (a model that failed at some batch size
fails the run). The CLI prints ``report.table()``; the demo and ``benchmarks/`` read the object.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from ..cpuinfo import load_average, routes_line
from ..errors import UsageError
from ..runtime import Encoder
from ..preprocess import expand_image_paths
from ..report import report_header
from .core import BenchSettings, run_benchmark
from .report import add_speedups, environment, render_table, write_csv, write_plot
from .stats import few_samples_note
from .subjects import open_subjects


@dataclass
class BenchReport:
    settings: BenchSettings
    device: str
    threads: int
    include_preprocess: bool
    images: list[Path] | None
    environment: dict
    models: list[dict]
    results: list[dict]
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not any(r.get("error") for r in self.results)

    @property
    def exit_code(self) -> int:
        return 0 if self.passed else 1

    def table(self) -> str:
        s = self.settings
        timing = (f"{s.iterations} iterations" if s.iterations is not None else f"{s.duration_s:g} s") + \
            f" per model and batch size in {s.slices()} alternating rounds, warmup {s.warmup_s:g} s"
        return "\n".join([
            f"latency in ms per call; {timing}; inputs "
            + ("decoded from files (timed)" if self.include_preprocess else "generated once, untimed"),
            render_table(self.results, gpu=self.device.startswith("cuda")),
            routes_line(),
            "img/s = images / timed seconds; vs 1st = throughput over the first model's at the same batch; "
            "RSS MiB = process peak RSS during that model's slices"])

    def to_dict(self) -> dict:
        doc = report_header("bench")
        doc.update({"settings": {**self.settings.describe(), "device": self.device, "threads": self.threads,
                                 "include_preprocess": self.include_preprocess,
                                 "images": [str(p) for p in self.images] if self.images else None,
                                 "percentile_method": "linear (Hyndman-Fan type 7, numpy default)",
                                 "throughput": "images / sum of timed per-call latencies"},
                    "environment": self.environment, "models": self.models, "results": self.results,
                    "notes": self.notes, "warnings": self.warnings, "passed": self.passed})
        return doc

    def write_csv(self, path: str | Path) -> Path:
        return write_csv(path, self.results)

    def write_plot(self, path: str | Path) -> Path:
        env = self.environment
        return write_plot(path, self.results, title=f"reid-export bench on {env.get('gpu') or env['cpu']} "
                                                    f"({self.device}, {self.threads} threads)")


def run_bench(models: Sequence["str | Path | Encoder"], batch_sizes: Sequence[int] = (1, 8, 32), *, device: str = "cpu",
              threads: int | None = None, warmup: float = 1.0, duration: float | None = None,
              iterations: int | None = None, rounds: int = 5, include_preprocess: bool = False,
              images: Sequence[str | Path] = (), config: str | Path | None = None, progress: bool = True,
              log: Callable[[str], None] = lambda line: None) -> BenchReport:
    """Latency and throughput of ``models`` at each batch size (see the ``bench`` command).

    ``log`` gets the lines said before the timing starts (what runs where, weight-range warnings)."""
    import torch

    if duration is not None and iterations is not None:
        raise UsageError("`duration` and `iterations` exclude each other; give one")
    if images and not include_preprocess:
        raise UsageError("`images` is only used with `include_preprocess`; add it or drop `images`")
    settings = BenchSettings(batch_sizes=list(batch_sizes), warmup_s=warmup,
                             duration_s=3.0 if duration is None and iterations is None else duration,
                             iterations=iterations, rounds=rounds)
    settings.validate()
    paths = expand_image_paths(images) if include_preprocess and images else None

    previous_threads = torch.get_num_threads()
    threads = threads or previous_threads
    torch.set_num_threads(threads)
    load_before = load_average()
    encoders, warnings = [], []
    try:
        subjects, encoders = open_subjects(models, device=device, threads=threads, config=config, images=paths,
                                           include_preprocess=include_preprocess)
        env = environment(threads, device)
        from ..export.quantize.qdq import model_weight_range_warning

        for model_path in dict.fromkeys(str(s.model) for s in subjects):  # full-range U8S8 on a CPU without VNNI
            warning = model_weight_range_warning(model_path) if device == "cpu" else None
            if warning:
                warnings.append(warning)
                log(warning)
        log(f"bench: {len(subjects)} model(s) on {device}{' (' + env['gpu'] + ')' if env.get('gpu') else ''}, "
            f"{threads} thread(s), CPU {env['cpu']}" + (f", load average {load_before[0]:.2f}" if load_before else ""))
        results = run_benchmark(subjects, settings, progress=progress)
    finally:
        torch.set_num_threads(previous_threads)
        for encoder in encoders:
            encoder.close()
    env["load_average_before"] = load_before
    env["load_average_after"] = load_average()
    add_speedups(results)
    thin = few_samples_note(results)
    routes = _slower_routes(subjects, results) if device == "cpu" else []
    return BenchReport(settings=settings, device=device, threads=threads, include_preprocess=include_preprocess,
                       images=paths, environment=env,
                       models=[{"name": s.name, "model": s.model, "backend": s.backend, "precision": s.precision,
                                "device": s.device, **s.info} for s in subjects],
                       results=results, notes=([thin] if thin else []) + routes, warnings=warnings)


def _slower_routes(subjects, results: list[dict]) -> list[str]:
    """For each FP16/bf16/INT8 subject slower than the first FP32 subject at some batch size: the line
    naming the faster route on this CPU (:func:`reid_export.cpuinfo.slower_route_note`)."""
    from ..cpuinfo import slower_route_note
    from ..export.quantize.qdq import quantization_target

    base = next((s for s in subjects if s.precision == "fp32"), None)
    if base is None:
        return []
    fp32 = {r["batch_size"]: r.get("throughput_ips") for r in results if r["name"] == base.name}
    notes = []
    for subject in subjects:
        if subject.precision == "fp32":
            continue
        ratios = {r["batch_size"]: r["throughput_ips"] / fp32[r["batch_size"]] for r in results
                  if r["name"] == subject.name and r.get("throughput_ips") and fp32.get(r["batch_size"])}
        note = slower_route_note(subject.name, subject.precision, subject.backend,
                                 quantization_target(subject.model), ratios)
        if note:
            notes.append(note)
    return notes
