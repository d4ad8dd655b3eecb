"""``reid-export extract``: embeddings of image files with any model."""

from __future__ import annotations

import io
import json
from pathlib import Path

import click
import numpy as np

from .. import __version__
from ..errors import ReidExportError
from ..fileio import atomic_write_files, check_output_path
from ..runtime import expand_image_paths, open_encoder
from ..embeddings import l2_normalize
from ..report import REPORT_SCHEMA_VERSION
from ..verify.collapse import collapse_of
from .common import OptsCommand, flag_aliases, get_opts, positive_int, skip_bad_images_option, to_flags
from .ray_options import ray_engine_options, ray_options
from .main import cli


@flag_aliases(num_workers="workers", cpus_per_worker="threads_per_worker", on_error="skip_bad_images")  # library parameter names the command spells otherwise
@cli.command(cls=OptsCommand)
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="Feature matrix to write (.npy, float32 [N, D]); a .json with the file list goes beside it.")
@click.option("--config", type=click.Path(path_type=Path), help="fast-reid YAML config (for checkpoints without one).")
@click.option("--flip-test", is_flag=True, help="Average the features of each image and its mirror (fast-reid).")
@click.option("--normalize", is_flag=True, help="L2-normalise each feature.")
@click.option("--batch-size", default=32, show_default=True, type=int, callback=positive_int)
@click.option("--device", default="cpu", show_default=True,
              help="cpu or cuda[:N]; ONNX models also tensorrt[:N] (ONNX Runtime's TensorRT provider); "
                   "openvino[:bf16] runs ONNX and .xml IR with OpenVINO's CPU plugin.")
@click.option("--allow-partial", is_flag=True, help="Load a checkpoint whose keys only partly match the config.")
@click.option("--progress/--no-progress", default=True, show_default=True)
@ray_engine_options
@skip_bad_images_option
def extract(model, images, output, config, flip_test, normalize, batch_size, device, allow_partial, progress,
            skip_bad_images, engine, ray_address, workers, threads_per_worker, gpus_per_worker, shard_size):
    """Write the embeddings of IMAGES (files or folders) computed by MODEL.

    Folders expand to their images sorted by name; rows follow the order given (with
    --skip-bad-images, of the images that could be read; the .json lists them).

    \b
    Example:
      reid-export extract model_final.pth crops/ -o feats.npy --flip-test
    """
    output = check_output_path(output)
    if output.suffix != ".npy":
        raise ReidExportError(f"{output}: the output must end in .npy", exit_code=2)
    sidecar = check_output_path(output.with_suffix(".json"))
    paths = expand_image_paths(images)
    if engine == "ray":
        from ..runtime.ray_extract import run_extract_on_ray

        options = ray_options(ray_address, workers, threads_per_worker, gpus_per_worker, shard_size, config=config,
                              opts=get_opts(), device=device, allow_partial=allow_partial, batch_size=batch_size,
                              flip_test=flip_test, progress=progress, on_error="skip" if skip_bad_images else "raise")
        feats, paths, skipped, info = run_extract_on_ray(model, paths, output, options)
    else:
        encoder = open_encoder(model, config=config, opts=get_opts(), device=device, allow_partial=allow_partial)
        with encoder:
            encoded = encoder.encode_paths(paths, batch_size=batch_size, flip_test=flip_test, progress=progress,
                                           desc="extract", on_error="skip" if skip_bad_images else "raise")
        info = {"backend": encoder.backend, "precision": encoder.precision,
                "data_config": encoder.data_config.to_dict()}
        feats, skipped = encoded.features, [{"file": str(e.path), "reason": e.reason} for e in encoded.skipped]
        paths = [paths[i] for i in encoded.kept]
        if skipped:
            click.echo(to_flags(encoded.summary()), err=True)
    collapse = collapse_of(feats)
    if normalize:
        feats = l2_normalize(feats)
    feats = feats.astype(np.float32)
    buffer = io.BytesIO()
    np.save(buffer, feats)
    meta = {
        "schema_version": REPORT_SCHEMA_VERSION,
        "tool": f"reid-export {__version__}",
        "model": str(model),
        "backend": info["backend"],
        "precision": info["precision"],
        "flip_test": flip_test,
        "normalized": normalize,
        "shape": list(feats.shape),
        "data_config": info["data_config"],
        "files": [str(p) for p in paths],
        "collapse": collapse.to_dict() if collapse else None,  # verify.collapse: None below 3 images
    }
    if skip_bad_images:
        meta["skipped"] = skipped
    # Both files or neither: the features without their file list would be unusable.
    atomic_write_files({output: buffer.getvalue(), sidecar: (json.dumps(meta, indent=2) + "\n").encode("utf-8")})
    if engine == "ray":  # the shards were only there to resume a killed run
        from ..runtime.ray_extract import remove_shards

        remove_shards(output)
    click.echo(f"wrote {output} [{feats.shape[0]} x {feats.shape[1]}] and {sidecar.name}", err=True)
    if collapse and collapse.collapsed:  # after the files: a failed write stays one line
        click.echo(to_flags(collapse.warning(str(model))), err=True)
