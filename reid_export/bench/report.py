"""Benchmark results for people and machines: the table, CSV, JSON environment, PNG plot."""

from __future__ import annotations

import csv
import importlib
import io
import os
import platform
from pathlib import Path
from typing import Sequence

from ..cpuinfo import isa_flags, precision_routes
from ..fileio import atomic_write_bytes, atomic_write_text
from ..report import format_table

TABLE_HEADERS = ["model", "backend", "prec", "batch", "iters", "min", "mean", "median", "p90", "p95", "p99",
                 "max", "img/s", "vs 1st", "RSS MiB"]
CSV_FIELDS = ["name", "model", "backend", "precision", "device", "batch_size", "iterations", "images", "min_ms",
              "mean_ms", "median_ms", "p90_ms", "p95_ms", "p99_ms", "max_ms", "std_ms", "throughput_ips",
              "speedup_vs_first", "rss_peak_mib", "rss_open_mib", "gpu_peak_mib", "gpu_used_mib", "timer", "error"]


def add_speedups(results: list[dict]) -> list[dict]:
    """``speedup_vs_first``: throughput over the first subject's at the same batch size."""
    first: dict[int, float] = {}
    order: list[str] = []
    for res in results:
        if res["name"] not in order:
            order.append(res["name"])
    for res in results:
        if res["name"] == order[0] and res.get("throughput_ips"):
            first[res["batch_size"]] = res["throughput_ips"]
    for res in results:
        base = first.get(res["batch_size"])
        res["speedup_vs_first"] = res["throughput_ips"] / base if base and res.get("throughput_ips") else None
    return results


def table_rows(results: Sequence[dict], gpu: bool = False) -> tuple[list[str], list[list]]:
    headers = list(TABLE_HEADERS) + (["GPU MiB"] if gpu else [])
    rows = []
    for res in sorted(results, key=lambda r: r["batch_size"]):
        if res.get("error"):
            row = [res["name"], res["backend"], res["precision"], res["batch_size"]] + ["-"] * 11
            row[4] = "ERROR"
        else:
            row = [res["name"], res["backend"], res["precision"], res["batch_size"], res["iterations"],
                   res["min_ms"], res["mean_ms"], res["median_ms"], res["p90_ms"], res["p95_ms"], res["p99_ms"],
                   res["max_ms"], res["throughput_ips"], _ratio(res.get("speedup_vs_first")), res.get("rss_peak_mib")]
        if gpu:
            row.append(_gpu_memory(res))
        rows.append(row)
    return headers, rows


def _gpu_memory(res: dict):
    """torch's allocator peak for torch models; other runtimes allocate outside it, so for them the
    device's used memory (every process) is shown, marked as such."""
    if res.get("backend") == "torch" or res.get("gpu_used_mib") is None:
        return res.get("gpu_peak_mib")
    return f"{res['gpu_used_mib']:.0f} (device)"


def _ratio(value):
    return None if value is None else f"{value:.2f}x"


def render_table(results: Sequence[dict], gpu: bool = False) -> str:
    """The on-screen table: latencies in ms, throughput in images/s, per model and batch size."""
    headers, rows = table_rows(results, gpu)
    text = format_table(headers, rows, floatfmt=".4g")
    errors = [f"ERROR {r['name']} at batch {r['batch_size']}: {r['error']}" for r in results if r.get("error")]
    return "\n".join([text, *errors])


def write_csv(path: str | Path, results: Sequence[dict]) -> Path:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for res in results:
        writer.writerow({k: ("" if res.get(k) is None else res.get(k)) for k in CSV_FIELDS})
    return atomic_write_text(path, buffer.getvalue())


def _version(module: str) -> str | None:
    try:
        mod = importlib.import_module(module)
    except Exception:  # noqa: BLE001 - an optional library may fail to import in many ways
        return None
    return str(getattr(mod, "__version__", "installed"))


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.lower().startswith(("model name", "hardware", "processor\t: arm")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(threads: int | None, device: str) -> dict:
    """Versions, threads, CPU model and flags, GPU name: what a figure depends on."""
    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        # the flags that decide which precisions this CPU has hardware for (AVX2, AVX-512, VNNI, AMX, BF16)
        "cpu_flags": isa_flags(),
        "precision_routes": precision_routes(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "versions": {name: _version(name) for name in ("numpy", "torch", "onnxruntime", "cv2", "tensorrt",
                                                       "openvino")},
        "device": device,
        "gpu": None,
    }
    try:
        import torch

        env["torch_threads"] = torch.get_num_threads()
        if device.startswith("cuda") and torch.cuda.is_available():
            index = torch.device(device).index or 0
            env["gpu"] = torch.cuda.get_device_name(index)
            env["cuda"] = torch.version.cuda
            env["cudnn"] = torch.backends.cudnn.version()
    except ImportError:
        pass
    if env["versions"]["onnxruntime"]:
        import onnxruntime

        env["onnxruntime_providers"] = onnxruntime.get_available_providers()
    return env


def write_plot(path: str | Path, results: Sequence[dict], title: str = "reid-export bench") -> Path:
    """Throughput and median latency against batch size, one line per model (PNG, atomic)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    names: list[str] = []
    for res in results:
        if res["name"] not in names:
            names.append(res["name"])
    fig, (ax_tp, ax_lat) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    for name in names:
        points = sorted((r["batch_size"], r["throughput_ips"], r["median_ms"]) for r in results
                        if r["name"] == name and not r.get("error") and "throughput_ips" in r)
        if not points:
            continue
        batches = [p[0] for p in points]
        ax_tp.plot(batches, [p[1] for p in points], marker="o", label=name, linewidth=1.6)
        ax_lat.plot(batches, [p[2] for p in points], marker="o", label=name, linewidth=1.6)
    batch_sizes = sorted({r["batch_size"] for r in results})
    for ax, ylabel in ((ax_tp, "throughput (images/s)"), (ax_lat, "median latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(batch_sizes)
        ax.set_xticklabels([str(b) for b in batch_sizes])
        ax.set_xlabel("batch size")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax_lat.set_yscale("log")
    ax_lat.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax_lat.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax_tp.legend(loc="best", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return atomic_write_bytes(path, buffer.getvalue())
