"""``reid-export trt``: build a TensorRT engine (and its sidecar) from an ONNX model."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import ReidExportError
from ..fileio import check_input_file, check_output_path
from .common import echo_library_line, positive_int
from .main import cli


@cli.command()
@click.argument("onnx_model", metavar="MODEL.onnx", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="Engine to write (.engine/.plan); MODEL.engine.json is written beside it.")
@click.option("--fp16", is_flag=True, help="FP16 engine (TensorRT 11: the ONNX is converted to FP16 first).")
@click.option("--int8", is_flag=True, help="INT8 engine from a Q/DQ ONNX, or calibrated here with --calib-dir.")
@click.option("--calib-dir", "calib_dirs", multiple=True, type=click.Path(path_type=Path),
              help="Image folders for INT8 calibration (repeatable).")
@click.option("--calib-size", default=512, show_default=True, type=int, callback=positive_int)
@click.option("--min-batch", default=1, show_default=True, type=int)
@click.option("--opt-batch", default=32, show_default=True, type=int)
@click.option("--max-batch", default=128, show_default=True, type=int)
@click.option("--workspace", default="4GiB", show_default=True, help="Builder workspace limit, e.g. 4GiB.")
@click.option("--timing-cache", type=click.Path(path_type=Path), help="Timing cache file to load and save.")
@click.option("--builder-optimization-level", type=click.IntRange(0, 5), help="0 (fast build) .. 5 (slow, thorough).")
@click.option("--device-id", default=0, show_default=True, type=int)
def trt(onnx_model, output, fp16, int8, calib_dirs, calib_size, min_batch, opt_batch, max_batch, workspace,
        timing_cache, builder_optimization_level, device_id):
    """Build a TensorRT engine from MODEL.onnx (written for TensorRT 10 and 11).

    Precision comes from the ONNX graph: an FP16 graph or a Q/DQ INT8 graph builds as it is;
    --fp16 on an FP32 graph converts it (TensorRT 11) or sets the FP16 flag (TensorRT 10);
    --int8 needs a Q/DQ graph (reid-export quantize --target tensorrt) or --calib-dir.
    The batch profile is min/opt/max for a dynamic-batch ONNX; a static one gives a static engine.

    \b
    Example:
      reid-export trt model.onnx -o model.fp16.engine --fp16 --max-batch 256 --timing-cache trt.cache
    """
    from ..trt import compute_profile, import_tensorrt, parse_size
    from ..trt.builder import BuildOptions, build_engine

    check_input_file(onnx_model, "ONNX model")
    check_output_path(output)
    if output.suffix not in (".engine", ".plan"):
        raise ReidExportError(f"{output}: name the engine *.engine or *.plan (the backend is chosen by suffix)",
                              exit_code=2)
    if calib_dirs and not int8:
        raise ReidExportError("--calib-dir is for --int8", exit_code=2)
    parse_size(workspace)  # option errors before anything slow
    compute_profile(["batch", 3, 1, 1], min_batch, opt_batch, max_batch, (1, 1))
    import_tensorrt()  # exit 2 with the install command when TensorRT is missing
    options = BuildOptions(fp16=fp16, int8=int8, calib_dirs=[str(d) for d in calib_dirs], calib_size=calib_size,
                           min_batch=min_batch, opt_batch=opt_batch, max_batch=max_batch, workspace=workspace,
                           timing_cache=str(timing_cache) if timing_cache else None,
                           builder_optimization_level=builder_optimization_level, device_id=device_id)
    info = build_engine(onnx_model, output, options, log=echo_library_line)
    profile = info["profiles"][0]
    click.echo(f"wrote {output} ({info['precision']}, TensorRT {info['tensorrt_version']}, {info['gpu_name']}, "
               f"batch {profile['min'][0]}/{profile['opt'][0]}/{profile['max'][0]}) and {output.name}.json")
