"""``reid-export triton``, ``deepstream`` and ``boxmot``: hand a verified model to a server or a tracker."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import ReidExportError
from .common import OptsCommand, echo_library_line, flag_aliases, get_opts, positive_int, to_flags
from .main import cli


def _int_list(ctx, param, value):
    if not value:
        return ()
    try:
        out = tuple(int(v) for v in str(value).split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None
    if any(v < 0 for v in out):
        raise click.BadParameter(f"must be >= 0, got {value!r}")
    return out


def threshold_options(what: str):
    """``--threshold-dataset`` / ``--threshold-fmr`` of a tracker hand-off; ``what`` says how the
    crops are resized and where the measured threshold is written."""
    def wrap(f):
        f = click.option("--threshold-fmr", default=1e-2, show_default=True, type=float,
                         help="With --threshold-dataset: the false-match rate (share of different-identity "
                              "pairs accepted).")(f)
        return click.option("--threshold-dataset", type=click.Path(path_type=Path),
                            help="A Market-1501-layout folder with identities: measure the model's cosine distance "
                                 f"at --threshold-fmr on it {what}.")(f)
    return wrap


@flag_aliases(preferred_batch_sizes="preferred")
@cli.command()
@click.argument("models", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", "repo", required=True, type=click.Path(path_type=Path),
              help="Model repository folder (created; other models in it are kept).")
@click.option("--name", "names", multiple=True, help="Model name in the repository, once per model (default: file stem).")
@click.option("--max-batch-size", type=int, help="Triton max_batch_size (default 32 for ONNX, the engine profile's "
                                                 "maximum for plans; 0: no batching).")
@click.option("--preferred-batch-size", "preferred", callback=_int_list,
              help="dynamic_batching preferred sizes, comma-separated (default: none for ONNX, the profile's opt for plans).")
@click.option("--max-queue-delay-us", default=100, show_default=True, type=int,
              help="dynamic_batching max_queue_delay_microseconds.")
@click.option("--instances", default=1, show_default=True, type=int, callback=positive_int,
              help="instance_group count.")
@click.option("--kind", type=click.Choice(["gpu", "cpu"]), default="gpu", show_default=True,
              help="instance_group kind for ONNX models (plans always run on a GPU, OpenVINO IR on the CPU).")
@click.option("--gpus", callback=_int_list, help="GPU ids for the instance group, comma-separated (default: all).")
@click.option("--tensorrt-accelerator", type=click.Choice(["fp32", "fp16", "int8"]),
              help="ONNX on GPU: run it through ONNX Runtime's TensorRT accelerator at this precision.")
@click.option("--force", is_flag=True, help="Replace model folders that already exist.")
def triton(models, repo, names, max_batch_size, preferred, max_queue_delay_us, instances, kind, gpus,
           tensorrt_accelerator, force):
    """Write a Triton Inference Server model repository for MODELS (.onnx, .engine/.plan, OpenVINO .xml IR).

    Each model gets REPO/NAME/config.pbtxt (max_batch_size, input/output dims, dynamic batching,
    instance group, optionally ONNX Runtime's TensorRT accelerator), its file in REPO/NAME/1/, its
    data config and a README that tells a client how to preprocess. TensorRT plans built from one
    ONNX for several GPU architectures become one model with cc_model_filenames. Every config is
    checked with Triton's ModelConfig protobuf where tritonclient is installed (the triton extra).
    An OpenVINO IR (annotated with a data config) is served by Triton's openvino backend on CPU
    instances (model.xml and model.bin in REPO/NAME/1/).

    \b
    Examples:
      reid-export triton model.onnx model.fp16.onnx -o repo/ --tensorrt-accelerator fp16
      reid-export triton model.sm86.engine model.sm90.engine -o repo/ --name reid_trt
      reid-export triton omz-0288.xml -o repo/
    """
    from ..serve.triton import RepoOptions, build_repository

    if max_batch_size is not None and max_batch_size < 0:
        raise ReidExportError("--max-batch-size must be >= 0", exit_code=2)
    if max_queue_delay_us < 0:
        raise ReidExportError("--max-queue-delay-us must be >= 0", exit_code=2)
    options = RepoOptions(max_batch_size=max_batch_size, preferred_batch_sizes=preferred,
                          max_queue_delay_us=max_queue_delay_us, instances=instances, kind=kind, gpus=gpus,
                          tensorrt_accelerator=tensorrt_accelerator, force=force)
    click.echo(to_flags(build_repository(models, repo, options, names).table()))
    return 0


@flag_aliases(images="image_inputs", color_order="color_format")
@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Folder for NAME.deepstream.onnx and NAME.tracker-reid.yml (created).")
@click.option("--images", "image_inputs", multiple=True, type=click.Path(path_type=Path),
              help="Crops for the self-check (default: 8 generated images of varied aspect ratios).")
@click.option("--color-format", type=click.Choice(["rgb", "bgr"]),
              help="The order the tracker feeds (colorFormat; default: the model's own order).")
@click.option("--network-mode", type=click.Choice(["fp32", "fp16", "int8"]),
              help="TensorRT precision DeepStream builds (default: the ONNX's precision).")
@click.option("--reid-type", type=click.Choice(["deepsort", "reassoc", "both"]), default="deepsort",
              show_default=True, help="reidType: NvDeepSORT association (1), re-association (2), both (3).")
@click.option("--batch-size", default=100, show_default=True, type=int, callback=positive_int)
@click.option("--workspace-mb", default=1000, show_default=True, type=int, callback=positive_int)
@click.option("--history-size", default=100, show_default=True, type=int, callback=positive_int,
              help="reidHistorySize: features kept per target.")
@click.option("--keep-aspect/--stretch", default=False, show_default=True,
              help="keepAspc 1 (letterbox) or 0 (stretch, default: what fast-reid/torchreid models see in their own "
                   "preprocessing). Measure the letterbox's cost with eval --deployment deepstream-folded first: on "
                   "CUHK03 it costs a stretch-trained OSNet about 22 mAP points (benchmarks/RESULTS.md).")
@click.option("--name", help="Output file stem (default: the model's).")
@click.option("--max-rel-l2", type=float, help="Self-check tolerance (default: FP32 parity, 1e-4).")
@threshold_options("(crops resized as the tracker will) and write minMatchingScore4ReidSimilarity (1 - distance) "
                   "into the config")
@click.option("--progress/--no-progress", default=False)
def deepstream(model, out_dir, image_inputs, color_format, network_mode, reid_type, batch_size, workspace_mb,
               history_size, keep_aspect, name, max_rel_l2, threshold_dataset, threshold_fmr, progress):
    """An ONNX for DeepStream's tracker ReID and the nvtracker ReID: section for it.

    The model's exact per-channel normalisation (and pixel scale, and a channel swap for
    --color-format) is folded into the graph, so offsets [0, 0, 0] and netScaleFactor 1.0 are exact
    instead of NVIDIA's one-scalar approximation. A self-check runs the original on its own
    preprocessing and the folded model on DeepStream-style input (0..255, the tracker's colour
    order) and writes nothing unless they agree (exit 1). With --threshold-dataset the model's
    cosine distance at --threshold-fmr is measured there and written as the tracker's
    minMatchingScore4ReidSimilarity (DataAssociator; TrajectoryManagement for re-association).

    \b
    Example:
      reid-export deepstream model.onnx -o deepstream/ --network-mode fp16
      reid-export deepstream model.onnx -o deepstream/ --threshold-dataset Market-1501 --threshold-fmr 0.01
      reid-export eval model.onnx --dataset-root Market-1501 --deployment deepstream --deployment deepstream-folded
    """
    from ..serve.deepstream import DeepStreamOptions, build

    options = DeepStreamOptions(images=image_inputs, color_order=color_format, network_mode=network_mode,
                                reid_type=reid_type, batch_size=batch_size, workspace_mb=workspace_mb,
                                history_size=history_size, keep_aspect=keep_aspect, name=name, progress=progress,
                                max_rel_l2=max_rel_l2, threshold_dataset=threshold_dataset, threshold_fmr=threshold_fmr)
    res = build(model, out_dir, options)
    click.echo(to_flags(res.table()))
    if res.collapse is not None and res.collapse.collapsed:
        click.echo(to_flags(res.collapse.warning(str(model))), err=True)
    return 0


@flag_aliases(images="image_inputs")
@cli.command(cls=OptsCommand)
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Folder for NAME.onnx, NAME_openvino_model/ and their .metadata.json sidecars (created).")
@click.option("--config", type=click.Path(path_type=Path), help="fast-reid/torchreid YAML config for a checkpoint "
                                                                 "that lacks one (e.g. configs/torchreid/osnet_x0_25.yml).")
@click.option("--images", "image_inputs", multiple=True, type=click.Path(path_type=Path),
              help="Crops for the self-check (default: 8 generated images of varied aspect ratios).")
@click.option("--name", help="Output file stem (default: the model's). BoxMOT reads the architecture from the "
                             "sidecar, else from a backbone name in the file name.")
@click.option("--boxmot-arch", "architecture", help="BoxMOT backbone name to write into the sidecars (default: "
                                                    "found for OSNet models; none for architectures BoxMOT lacks).")
@click.option("--openvino/--no-openvino", default=True, show_default=True,
              help="Also write NAME_openvino_model/ (needs the [openvino] extra).")
@click.option("--exporter", type=click.Choice(["dynamo", "torchscript"]), default="dynamo", show_default=True,
              help="torch.onnx exporter for a checkpoint (as in reid-export onnx).")
@click.option("--max-rel-l2", type=float, help="Self-check tolerance (default: FP32 parity, 1e-4).")
@threshold_options("(BoxMOT's bilinear resize) and write it as StrongSORT's max_cos_dist and BoT-SORT's "
                   "appearance_thresh in strongsort/botsort.reid-export.yaml")
@click.option("--progress/--no-progress", default=False)
def boxmot(model, out_dir, config, image_inputs, name, architecture, openvino, exporter, max_rel_l2,
           threshold_dataset, threshold_fmr, progress):
    """An ONNX and an OpenVINO IR that BoxMOT's ReID backends load as they are.

    BoxMOT (StrongSORT, BoT-SORT, DeepOCSORT, ...) normalises every crop itself: cv2 INTER_LINEAR
    resize, BGR->RGB, /255, ImageNet mean/std. The map from that input back to what MODEL needs
    (pixel scale, per-channel mean/std, channel swap) is folded into the graph (Q/DQ scales of INT8
    graphs untouched, FP16 graphs keep float32 I/O); the files get BoxMOT's names and
    .metadata.json sidecars (architecture, input size: BoxMOT's OpenVINO backend reads it only
    there). MODEL is a checkpoint (with --config where it lacks one) or an ONNX with a data config.
    The folded model on BoxMOT-style input must reproduce MODEL on its own preprocessing (FP32
    tolerance) and the IR the folded ONNX, or nothing is written (exit 1).

    \b
    Example:
      reid-export boxmot osnet_x0_25_market1501.pt --config configs/torchreid/osnet_x0_25.yml -o boxmot/
      reid-export eval osnet_x0_25_market1501.pt --config configs/torchreid/osnet_x0_25.yml \\
          --dataset-root Market-1501 --deployment boxmot
    """
    from ..serve.boxmot import BoxmotOptions, build

    options = BoxmotOptions(config=config, opts=get_opts(), images=image_inputs, name=name, architecture=architecture,
                            openvino=openvino, max_rel_l2=max_rel_l2, progress=progress, exporter=exporter,
                            threshold_dataset=threshold_dataset, threshold_fmr=threshold_fmr)
    res = build(model, out_dir, options, log=echo_library_line)
    click.echo(to_flags(res.table()))
    if res.collapse is not None and res.collapse.collapsed:
        click.echo(to_flags(res.collapse.warning(str(model))), err=True)
    return 0
