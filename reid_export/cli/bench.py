"""``reid-export bench``: latency and throughput of models side by side, per batch size."""

from __future__ import annotations

import os
from pathlib import Path

import click

from ..errors import ReidExportError
from ..fileio import atomic_write_json
from ..runtime import expand_image_paths
from .common import positive_int
from .main import cli
from .verify import _check_outputs, _report_header


def parse_batch_sizes(ctx, param, value) -> list[int]:
    sizes: list[int] = []
    for item in str(value).replace(" ", "").split(","):
        if not item:
            continue
        try:
            size = int(item)
        except ValueError:
            raise click.BadParameter(f"expected comma-separated integers like 1,8,32, got {value!r}") from None
        if size < 1:
            raise click.BadParameter(f"batch sizes must be >= 1, got {size}")
        if size not in sizes:
            sizes.append(size)
    if not sizes:
        raise click.BadParameter(f"expected comma-separated integers like 1,8,32, got {value!r}")
    return sizes


@cli.command()
@click.argument("models", nargs=-1, required=True)
@click.option("--batch-sizes", default="1,8,32", show_default=True, callback=parse_batch_sizes,
              help="Comma-separated batch sizes.")
@click.option("--device", default="cpu", show_default=True,
              help="cpu or cuda[:N] (tensorrt[:N] for ONNX models; openvino[:bf16] for ONNX/IR, or per model: "
                   "model.onnx@openvino, model.xml@openvino:bf16).")
@click.option("--threads", type=int, callback=positive_int,
              help="CPU threads for every model (torch.set_num_threads, ONNX Runtime intra-op); "
                   "default: torch's default (the physical cores).")
@click.option("--warmup", default=1.0, show_default=True, type=float,
              help="Seconds of untimed calls per model and batch size (at least one call).")
@click.option("--duration", type=float, help="Timed seconds per model and batch size  [default: 3]")
@click.option("--iterations", type=int, callback=positive_int,
              help="Timed calls per model and batch size, instead of --duration.")
@click.option("--rounds", default=5, show_default=True, type=int, callback=positive_int,
              help="Alternating slices: models take turns this many times per batch size.")
@click.option("--include-preprocess", is_flag=True,
              help="Time decode + resize from the --images files too, not only the model.")
@click.option("--images", "image_inputs", multiple=True, type=click.Path(path_type=Path),
              help="Image files or folders for --include-preprocess (repeatable).")
@click.option("--config", type=click.Path(path_type=Path), help="fast-reid config for checkpoints that lack one.")
@click.option("--report", type=click.Path(path_type=Path), help="Write the results as JSON.")
@click.option("--csv", "csv_path", type=click.Path(path_type=Path), help="Write the results as CSV.")
@click.option("--plot", type=click.Path(path_type=Path),
              help="Write a PNG of throughput and median latency against batch size.")
@click.option("--progress/--no-progress", default=True)
def bench(models, batch_sizes, device, threads, warmup, duration, iterations, rounds, include_preprocess,
          image_inputs, config, report, csv_path, plot, progress):
    """Latency (min/mean/median/p90/p95/p99/max, ms) and throughput (images/s) of MODELS.

    Each model runs every batch size; inputs are generated once per batch size outside the
    timed region (unless --include-preprocess). Models take turns in --rounds slices (A B A B
    ...) with the same thread count, so drift of the machine is shared. Append @fp16 to a
    checkpoint to run it in torch half precision (CUDA). On CUDA each call is timed with
    events after synchronisation. Percentiles: linear interpolation (numpy's default); a
    note says when a result has under 100 timed calls (its p95/p99 then rest on the slowest
    few). Exit 1 when a model fails at some batch size (the others are still reported).

    \b
    Example:
      reid-export bench model.pth model.onnx model.int8.onnx --batch-sizes 1,16 --threads 2 \\
          --report bench.json --csv bench.csv --plot bench.png
    """
    import torch

    from ..bench.core import BenchSettings, run_benchmark
    from ..bench.report import add_speedups, environment, render_table, write_csv, write_plot
    from ..bench.subjects import open_subjects
    from ..bench.stats import few_samples_note

    if duration is not None and iterations is not None:
        raise ReidExportError("--duration and --iterations exclude each other; give one", exit_code=2)
    if image_inputs and not include_preprocess:
        raise ReidExportError("--images is only used with --include-preprocess; add it or drop --images",
                              exit_code=2)
    settings = BenchSettings(batch_sizes=batch_sizes, warmup_s=warmup,
                             duration_s=3.0 if duration is None and iterations is None else duration,
                             iterations=iterations, rounds=rounds)
    settings.validate()
    _check_outputs(report, csv_path, plot)
    if plot is not None and plot.suffix.lower() != ".png":
        raise ReidExportError(f"{plot}: the plot is written as PNG; give a name ending in .png", exit_code=2)
    images = expand_image_paths(image_inputs) if include_preprocess and image_inputs else None

    previous_threads = torch.get_num_threads()
    threads = threads or previous_threads
    torch.set_num_threads(threads)
    load_before = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    encoders = []
    try:
        subjects, encoders = open_subjects(models, device=device, threads=threads, config=config, images=images,
                                           include_preprocess=include_preprocess)
        env = environment(threads, device)
        from ..export.int8 import model_weight_range_warning

        for model_path in dict.fromkeys(str(s.model) for s in subjects):  # full-range U8S8 on a CPU without VNNI
            warning = model_weight_range_warning(model_path) if device == "cpu" else None
            if warning:
                click.echo(warning, err=True)
        click.echo(f"bench: {len(subjects)} model(s) on {device}"
                   f"{' (' + env['gpu'] + ')' if env.get('gpu') else ''}, {threads} thread(s), CPU {env['cpu']}"
                   + (f", load average {load_before[0]:.2f}" if load_before else ""), err=True)
        results = run_benchmark(subjects, settings, progress=progress)
    finally:
        torch.set_num_threads(previous_threads)
        for encoder in encoders:
            encoder.close()
    env["load_average_before"] = load_before
    env["load_average_after"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    add_speedups(results)
    timing = (f"{iterations} iterations" if iterations is not None else f"{settings.duration_s:g} s") + \
        f" per model and batch size in {settings.slices()} alternating rounds, warmup {warmup:g} s"
    click.echo(f"latency in ms per call; {timing}; inputs "
               + ("decoded from files (timed)" if include_preprocess else "generated once, untimed"))
    click.echo(render_table(results, gpu=device.startswith("cuda")))
    from ..cpuinfo import routes_line

    click.echo(routes_line())
    click.echo("img/s = images / timed seconds; vs 1st = throughput over the first model's at the same batch; "
               "RSS MB = process peak RSS during that model's slices")
    thin = few_samples_note(results)
    if thin:
        click.echo(thin, err=True)
    if report:
        doc = _report_header("bench")
        doc.update({"settings": {**settings.describe(), "device": device, "threads": threads,
                                 "include_preprocess": include_preprocess,
                                 "images": [str(p) for p in images] if images else None,
                                 "percentile_method": "linear (Hyndman-Fan type 7, numpy default)",
                                 "throughput": "images / sum of timed per-call latencies"},
                    "environment": env,
                    "models": [{"name": s.name, "model": s.model, "backend": s.backend, "precision": s.precision,
                                "device": s.device, **s.info} for s in subjects],
                    "results": results, "notes": [thin] if thin else [],
                    "passed": not any(r.get("error") for r in results)})
        atomic_write_json(report, doc)
    if csv_path:
        write_csv(csv_path, results)
    if plot:
        write_plot(plot, results, title=f"reid-export bench on {env.get('gpu') or env['cpu']} "
                                         f"({device}, {threads} threads)")
    failed = [r for r in results if r.get("error")]
    return 1 if failed else 0
