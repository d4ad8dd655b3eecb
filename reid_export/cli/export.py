"""``reid-export onnx | annotate | quantize``: FP32 ONNX from a checkpoint, a data config for a
foreign ONNX, and FP16 / INT8 (Q/DQ) variants."""

from __future__ import annotations

from pathlib import Path

import click

from ..data_config import INTERPOLATIONS, DataConfig
from ..errors import ReidExportError, UsageError
from ..embeddings import REDUCED_PRECISION_TOLERANCES as _GATE  # the help texts show the gate's defaults
from .common import OptsCommand, echo_library_line, flag_aliases, get_opts, positive_int, to_flags
from .main import cli


_log = echo_library_line  # the library's lines, its parameter names shown as flags


def _parse_batch(ctx, param, value):
    if value is None or str(value).lower() == "dynamic":
        return None
    try:
        batch = int(value)
    except ValueError:
        raise click.BadParameter(f"must be 'dynamic' or a positive integer, got {value!r}") from None
    if batch < 1:
        raise click.BadParameter(f"must be 'dynamic' or a positive integer, got {value!r}")
    return batch


def _parse_triple(ctx, param, value):
    if value is None:
        return None
    parts = [p for p in value.replace(" ", "").split(",") if p]
    try:
        numbers = tuple(float(p) for p in parts)
    except ValueError:
        raise click.BadParameter(f"expects three numbers like 0.485,0.456,0.406, got {value!r}") from None
    if len(numbers) != 3:
        raise click.BadParameter(f"expects three comma-separated numbers, got {len(numbers)}")
    return numbers


@cli.command(name="onnx", cls=OptsCommand)
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="ONNX file to write.")
@click.option("--config", type=click.Path(path_type=Path), help="fast-reid YAML config (for checkpoints without one).")
@click.option("--opset", default=18, show_default=True, type=int, help="ONNX opset (13 or newer).")
@click.option("--batch", default="dynamic", show_default=True, callback=_parse_batch,
              help="'dynamic' or a fixed batch size N.")
@click.option("--simplify/--no-simplify", default=True, show_default=True,
              help="Simplify with onnxslim (re-verified against torch).")
@click.option("--exporter", type=click.Choice(["dynamo", "torchscript"]), default="dynamo", show_default=True,
              help="torch.export-based exporter (needs onnxscript) or the legacy TorchScript one.")
@click.option("--parity-images", multiple=True, type=click.Path(path_type=Path),
              help="Real crops (files or folders) for the self-check; default: generated images.")
@click.option("--allow-partial", is_flag=True, help="Load a checkpoint whose keys only partly match the config.")
def onnx_command(model, output, config, opset, batch, simplify, exporter, parity_images, allow_partial):
    """Export a checkpoint to ONNX: float32 [batch, 3, H, W] 0..255 RGB in, [batch, D] features out.

    The data config, the checkpoint's sha256 and the tool version go into the model's metadata.
    The export is checked (onnx.checker, shape inference) and run through ONNX Runtime against
    torch at two batch sizes; it fails when the max relative L2 exceeds 1e-4. It is also checked end
    to end from image pixels: the ONNX fed through the data config written with it against the
    checkpoint's model fed the way it was trained (its own config, before --opts); --opts that make
    the data config wrong (e.g. MODEL.PIXEL_MEAN) fail it (relative L2 above 1e-3). Nothing is
    written when a check fails.

    \b
    Example:
      reid-export onnx model_final.pth --config configs/Market1501/bagtricks_R50.yml -o model.onnx
    """
    from ..export.onnx_export import export_checkpoint
    from ..runtime import expand_image_paths

    images = expand_image_paths(parity_images) if parity_images else None
    report = export_checkpoint(model, output, config=config, opts=get_opts(), opset=opset, batch=batch,
                               simplify=simplify, exporter=exporter, parity_images=images,
                               allow_partial=allow_partial, log=_log)
    if not report.written:
        raise ReidExportError(report.refusal or f"{report.output}: not written")
    _log(report.table().splitlines()[-1])


@flag_aliases(images="detect_dir")
@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="Annotated ONNX file (or .xml IR) to write.")
@click.option("--input-size", nargs=2, type=int, default=None,
              help="Input height and width (default: the model's, when fixed).")
@click.option("--mean", callback=_parse_triple, help="Per-channel mean, e.g. 0.485,0.456,0.406.")
@click.option("--std", callback=_parse_triple, help="Per-channel std, e.g. 0.229,0.224,0.225.")
@click.option("--pixel-scale", type=click.Choice(["255", "1"]),
              help="Value of a white pixel at the input: 255 (0..255) or 1 (0..1).")
@click.option("--channel-order", type=click.Choice(["rgb", "bgr"]))
@click.option("--interpolation", type=click.Choice(list(INTERPOLATIONS)),
              help="Resize interpolation the model was trained with (torchreid: pil-bilinear, fast-reid demo: cubic).")
@click.option("--normalized-inside", is_flag=True,
              help="The model subtracts mean / divides by std itself (fast-reid exports).")
@click.option("--detect", "detect_dir", type=click.Path(path_type=Path), default=None,
              help="Find the convention instead of stating it: try RGB/BGR, 0..1/0..255, ImageNet mean/std outside "
                   "or none, then four resizes, on these crops (a Market-1501 layout or a folder of PPPP_cC... "
                   "named crops: best mAP wins; crops without identities: only collapsed conventions are ruled out).")
@click.option("--max-queries", default=100, show_default=True, type=int, callback=positive_int,
              help="--detect: queries (whole identities, with their gallery images) to score each trial on.")
@click.option("--report", "report_path", type=click.Path(path_type=Path), default=None,
              help="--detect: write the trials as JSON here.")
@click.option("--progress/--no-progress", default=True, help="--detect: show progress bars.")
@click.option("--model-name", default="", help="Name recorded in the data config (default: the file name).")
def annotate(model, output, input_size, mean, std, pixel_scale, channel_order, interpolation, normalized_inside,
             detect_dir, max_queries, report_path, progress, model_name):
    """Write a data config into an ONNX model (or OpenVINO .xml IR) that came from elsewhere.

    State the convention (--mean, --std, --pixel-scale, --channel-order, --interpolation,
    [--normalized-inside]), or let --detect CROPS find it by retrieval on labelled crops.

    \b
    Example (a torchreid export, input (pixels/255 - mean) / std, torchreid's Pillow bilinear resize):
      reid-export annotate osnet.onnx -o osnet.reid.onnx --input-size 256 128 \\
          --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225 --pixel-scale 1 \\
          --channel-order rgb --interpolation pil-bilinear
      # an Open Model Zoo IR (BGR, 0..255, normalised inside)
      reid-export annotate person-reidentification-retail-0288.xml -o omz-0288.xml --mean 0,0,0 \\
          --std 1,1,1 --pixel-scale 255 --channel-order bgr --interpolation linear --normalized-inside
      # or find it: the conventions tried on labelled crops, the best mAP wins
      reid-export annotate osnet.onnx -o osnet.reid.onnx --detect Market-1501/ --report detect.json
    """
    stated = {"--mean": mean, "--std": std, "--pixel-scale": pixel_scale, "--channel-order": channel_order,
              "--interpolation": interpolation}
    if detect_dir is not None:
        given = [k for k, v in stated.items() if v is not None] + (["--normalized-inside"] if normalized_inside else [])
        if given:
            raise UsageError(f"--detect finds the convention itself; drop {' '.join(given)} (or drop --detect)")
        _annotate_detected(model, output, input_size, detect_dir, max_queries, report_path, model_name, progress)
        return
    missing = [k for k, v in stated.items() if v is None]
    if missing:
        raise UsageError(f"annotate needs {' '.join(missing)} (the model's preprocessing), or --detect CROPS to "
                         "find it on labelled crops")
    if report_path is not None:
        raise UsageError("--report goes with --detect")
    from ..export.annotate import annotate_file
    from ..export.metadata import input_info, load_onnx

    is_ir = model.suffix.lower() == ".xml"  # an OpenVINO IR (e.g. Open Model Zoo): rt_info instead of metadata
    if input_size is None:
        if is_ir:
            from ..runtime.openvino_backend import read_model, static_shape

            shape = static_shape(read_model(model))
        else:
            _, shape, _ = input_info(load_onnx(model))
        if len(shape) == 4 and all(isinstance(v, int) and v > 0 for v in shape[2:]):
            input_size = (shape[2], shape[3])
        else:
            raise UsageError(f"{model}: the model input {shape} has no fixed height/width; pass --input-size H W")
    if input_size[0] < 1 or input_size[1] < 1:
        raise UsageError(f"--input-size must be two positive integers, got {input_size[0]} {input_size[1]}")
    config = DataConfig(height=input_size[0], width=input_size[1], channel_order=channel_order,
                        pixel_scale=float(pixel_scale), mean=mean, std=std, interpolation=interpolation,
                        normalized_inside=normalized_inside, model_name=model_name)
    if is_ir:
        from ..runtime.openvino_convert import annotate_ir

        report = annotate_ir(model, output, config, log=_log)
    else:
        report = annotate_file(model, output, config, log=_log)
    c = report.data_config
    _log(f"wrote {report.output}: input {c.height}x{c.width} {c.channel_order} 0..{c.pixel_scale:g}, "
         f"mean {list(c.mean)}, std {list(c.std)} ({'inside the model' if c.normalized_inside else 'applied before it'}), "
         f"{c.interpolation} resize, {c.feat_dim}-d features ({report.precision})")


def _annotate_detected(model, output, input_size, images, max_queries, report_path, model_name, progress) -> None:
    from ..fileio import atomic_write_json, check_output_path
    from ..verify.detect import detect_and_annotate

    if report_path is not None:
        check_output_path(report_path)
    report = detect_and_annotate(model, output, images, input_size=tuple(input_size) if input_size else None,
                                 max_queries=max_queries, model_name=model_name, progress=progress, log=_log)
    click.echo(to_flags(report.table()))
    for line in report.lines():
        click.echo(to_flags(line))
    if report_path is not None:
        atomic_write_json(report_path, report.to_dict())
    if not report.passed:
        raise ReidExportError(report.refusal + "; nothing written")
    c = report.written_config
    _log(f"wrote {report.output}: detected input {c.height}x{c.width} {c.channel_order} 0..{c.pixel_scale:g}, "
         f"mean {list(c.mean)}, std {list(c.std)} ({'none outside' if c.normalized_inside else 'applied before it'}), "
         f"{c.interpolation} resize, {c.feat_dim}-d features")


@flag_aliases(calib_dirs="calib_dir", val_dirs="val_dir", batch_size="calib_batch")
@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="ONNX file to write.")
@click.option("--precision", type=click.Choice(["fp16", "int8"]), required=True)
@click.option("--target", type=click.Choice(["tensorrt", "cpu"]), default="tensorrt", show_default=True,
              help="int8: tensorrt = S8S8 symmetric, float bias, ReLUs kept; cpu = U8S8 for ONNX Runtime's CPU provider.")
@click.option("--calib-dir", multiple=True, type=click.Path(path_type=Path),
              help="Folder (or image files) of real crops to calibrate on; repeatable.")
@click.option("--calib-size", default=512, show_default=True, type=int, callback=positive_int,
              help="Images drawn from the calibration folders (all of them when fewer).")
@click.option("--val-dir", multiple=True, type=click.Path(path_type=Path),
              help="Real crops for the accuracy gate (default: images of --calib-dir held out from calibration).")
@click.option("--val-size", default=128, show_default=True, type=int, callback=positive_int,
              help="Held-out images the accuracy gate is measured on.")
@click.option("--method", type=click.Choice(["auto", "minmax", "entropy", "percentile", "mse"]), default="auto",
              show_default=True, help="Activation ranges: auto tries entropy, mse, percentile 99.9/99.99/99.999 "
                                      "and minmax and keeps the one closest to FP32 on the held-out images.")
@click.option("--percentile", type=float, default=None,
              help="For --method percentile (default 99.99); with auto, one more candidate.")
@click.option("--min-cosine", type=float, default=None, help=f"Gate: lowest cosine to FP32 on a held-out image ({_GATE['min_cosine']:g}; the gate parity and "
                   "eval apply to FP16/bf16/INT8 too).")
@click.option("--min-mean-cosine", type=float, default=None, help=f"Gate: mean cosine to FP32 ({_GATE['min_mean_cosine']:g}).")
@click.option("--max-pair-error", type=float, default=None,
              help="Gate: RMS change of the cosine similarity of every two held-out images, over the spread of "
                   f"the FP32 similarities ({_GATE['max_pair_error']:g}).")
@click.option("--min-top1", type=float, default=None,
              help="Gate: share of held-out images whose nearest other image stays the same (default: not gated).")
@click.option("--min-top5", type=float, default=None, help="Gate: mean overlap of the 5 nearest (default: not gated).")
@click.option("--max-float", type=int, default=None,
              help="Most nodes kept in float to meet the gate (default: a quarter of the quantizable ones; 0: none).")
@click.option("--equalize/--no-equalize", default=True, show_default=True,
              help="int8: also try every method on the graph with activation ranges equalised per channel "
                   "(rescaled across convolutions, FP32 output unchanged) and keep whichever is closer to FP32.")
@click.option("--bias-correction/--no-bias-correction", default=True, show_default=True,
              help="int8: also try the best candidate with each convolution's bias corrected for the mean shift "
                   "its weight rounding causes, and keep it when closer to FP32.")
@click.option("--allow-below-gate", is_flag=True,
              help="Write the INT8 model even when it misses the gate (marked below-gate in its metadata).")
@click.option("--exclude", multiple=True, help="Node name or op type to keep in float; repeatable.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed that draws the calibration images.")
@click.option("--num-bins", default=2048, show_default=True, type=int, help="Histogram bins.")
@click.option("--calib-batch", default=8, show_default=True, type=int, callback=positive_int,
              help="Calibration batch size (a static-batch model uses its own).")
@click.option("--reduce-range/--no-reduce-range", default=None,
              help="int8 cpu: 7-bit weights. Default: full 8-bit weights when this CPU has an int8 dot product "
                   "(AVX512-VNNI, AVX-VNNI, AMX, Arm64), 7-bit otherwise (AVX2 without VNNI saturates U8S8 "
                   "products of full-range weights). Recorded in the metadata; bench/doctor warn on a CPU "
                   "without VNNI.")
@click.option("--threads", type=int, default=None, callback=positive_int, help="ONNX Runtime intra-op threads.")
@click.option("--report", "report_path", type=click.Path(path_type=Path), help="Write what was tried and chosen as JSON (also when the gate refuses the model).")
@click.option("--progress/--no-progress", default=True, show_default=True)
def quantize(model, output, precision, target, calib_dir, calib_size, val_dir, val_size, method, percentile,
             min_cosine, min_mean_cosine, max_pair_error, min_top1, min_top5, max_float, equalize, bias_correction,
             allow_below_gate, exclude, seed, num_bins,
             calib_batch, reduce_range, threads, report_path, progress):
    """Make an FP16 or INT8 (Q/DQ) variant of an FP32 ONNX model.

    INT8 is calibrated on real crops, then measured against the FP32 model on held-out crops; the
    calibration method closest to FP32 is kept and, if needed, the layers that add the most error
    stay in float until the accuracy gate holds. Below the gate nothing is written (exit 1).

    \b
    Examples:
      reid-export quantize model.onnx -o model.fp16.onnx --precision fp16
      reid-export quantize model.onnx -o model.int8.onnx --precision int8 \\
          --calib-dir data/market1501/bounding_box_train
      reid-export quantize model.onnx -o model.int8-cpu.onnx --precision int8 --target cpu --calib-dir crops/
    """
    from ..api import QuantizeOptions, Tolerances
    from ..api import quantize as quantize_file
    from ..fileio import atomic_write_json, check_output_path

    ctx = click.get_current_context()
    int8_only = ("target", "method", "percentile", "calib_size", "num_bins", "reduce_range", "seed", "val_dir",
                 "val_size", "min_cosine", "min_mean_cosine", "max_pair_error", "min_top1", "min_top5", "max_float",
                 "equalize", "bias_correction", "allow_below_gate")
    if precision == "fp16":
        ignored = [f"--{name.replace('_', '-')}" for name in int8_only
                   if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE]
        if ignored:
            _log(f"note: ignored for fp16 (int8 options): {', '.join(ignored)}")
    if report_path is not None:
        check_output_path(report_path)
    gate = Tolerances.reduced_precision(min_cosine=min_cosine, min_mean_cosine=min_mean_cosine,
                                        max_pair_error=max_pair_error, min_top1_agreement=min_top1,
                                        min_top5_agreement=min_top5)
    options = QuantizeOptions(precision, target=target, calib_dirs=calib_dir, calib_size=calib_size, method=method,
                              percentile=percentile, exclude=exclude, seed=seed, num_bins=num_bins,
                              batch_size=calib_batch, reduce_range=reduce_range, threads=threads, progress=progress,
                              val_dirs=val_dir, val_size=val_size, gate=gate, max_float=max_float,
                              allow_below_gate=allow_below_gate, equalize=equalize, bias_correction=bias_correction)
    report = quantize_file(model, output, options=options, log=_log)
    if report_path is not None:  # also for a refused model: what was tried
        atomic_write_json(report_path, report.to_dict())
    if not report.written:  # refused: one line (what was tried is in --report)
        raise ReidExportError(report.refusal or f"{report.output}: not written")
    _log(report.table())
