"""``reid-export openvino``: an ONNX model to an OpenVINO IR, data config kept, parity-checked."""

from __future__ import annotations

from pathlib import Path

import click

from ..report import format_size
from .common import echo_library_line, positive_int
from .export import _parse_batch
from .main import cli


_log = echo_library_line


@cli.command(name="openvino")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="IR to write: NAME.xml (NAME.bin is written beside it).")
@click.option("--fp16", is_flag=True, help="Compress the weights to FP16 (half the size; the CPU plugin computes "
                                           "in f32 or bf16 either way).")
@click.option("--batch", default="dynamic", show_default=True, callback=_parse_batch,
              help="'dynamic' or a fixed batch size N.")
@click.option("--parity-images", multiple=True, type=click.Path(path_type=Path),
              help="Real crops (files or folders) for the self-check; default: generated images.")
@click.option("--min-cosine", type=float, help="Self-check gate (default by precision, as in parity).")
@click.option("--max-rel-l2", type=float, help="Self-check gate (default by precision, as in parity).")
@click.option("--threads", type=int, default=None, callback=positive_int,
              help="CPU threads for the self-check (OpenVINO and ONNX Runtime).")
def openvino_command(model, output, fp16, batch, parity_images, min_cosine, max_rel_l2, threads):
    """Convert an ONNX model (FP32, FP16 or Q/DQ INT8, with a data config) to an OpenVINO IR.

    The data config and the provenance go into the IR's rt_info. Before the IR is put in place
    it is run by OpenVINO (CPU, f32) against ONNX Runtime on the same ONNX at batch 1 and 3
    (N for --batch N) and must pass the parity gate of its precision (FP32: cosine >= 0.99999 and
    relative L2 <= 1e-4 per image, as the ONNX export; FP16: cosine >= 0.999, L2 <= 0.05; INT8:
    cosine >= 0.98, L2 <= 0.2); otherwise nothing is written. Needs the [openvino] extra.

    \b
    Examples:
      reid-export openvino model.onnx -o model.xml
      reid-export openvino model.onnx -o model.fp16.xml --fp16
      reid-export openvino model.int8.onnx -o model.int8.xml      # Q/DQ INT8 as it is
      reid-export eval model.xml model.xml@openvino:bf16 --dataset-root Market-1501
    """
    from ..runtime.openvino_convert import convert_file
    from ..runtime import expand_image_paths

    images = expand_image_paths(parity_images) if parity_images else None
    report = convert_file(model, output, fp16=fp16, batch=batch, parity_images=images, threads=threads,
                          min_cosine=min_cosine, max_rel_l2=max_rel_l2, log=_log)
    size = format_size(report.size_mb)
    _log(f"wrote {report.output} and {report.output.with_suffix('.bin').name} ({report.precision}, batch "
         f"{report.batch}, {size}) in {report.seconds:.0f} s")
