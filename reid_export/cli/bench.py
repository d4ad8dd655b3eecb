"""``reid-export bench``: latency and throughput of models side by side, per batch size."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import ReidExportError
from ..fileio import atomic_write_json
from .common import echo_library_line, flag_aliases, positive_int, to_flags
from .main import cli
from .verify import _check_outputs


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


@flag_aliases(images="image_inputs")
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
    from ..bench.run import run_bench

    _check_outputs(report, csv_path, plot)
    if plot is not None and plot.suffix.lower() != ".png":
        raise ReidExportError(f"{plot}: the plot is written as PNG; give a name ending in .png", exit_code=2)
    result = run_bench(models, batch_sizes, device=device, threads=threads, warmup=warmup, duration=duration,
                       iterations=iterations, rounds=rounds, include_preprocess=include_preprocess,
                       images=image_inputs, config=config, progress=progress,
                       log=echo_library_line)
    click.echo(to_flags(result.table()))
    for note in result.notes:
        click.echo(to_flags(note), err=True)
    if report:
        atomic_write_json(report, result.to_dict())
    if csv_path:
        result.write_csv(csv_path)
    if plot:
        result.write_plot(plot)
    return result.exit_code
