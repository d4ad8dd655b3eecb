"""``reid-export parity``, ``eval`` and ``fp16-check``: prove an exported model is as good as the original."""

from __future__ import annotations

import math
from pathlib import Path

import click

from ..embeddings import REDUCED_PRECISION_TOLERANCES as _GATE  # help texts show the gate's defaults
from ..errors import ReidExportError, UsageError
from ..fileio import atomic_write_json, check_output_path
from ..report import format_table, report_header
from ..runtime import expand_image_paths, open_encoder, preprocess
from .common import echo_library_line, flag_aliases, positive_int, skip_bad_images_option, to_flags
from .main import cli


def _finite(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _check_outputs(*paths):
    for path in paths:
        if path is not None:
            check_output_path(path)


def _deployment_names():
    from ..deploy_preprocess import DEPLOYMENTS

    return list(DEPLOYMENTS)


# --------------------------------------------------------------------------- parity

@flag_aliases(images="image_inputs")
@cli.command()
@click.argument("reference", type=click.Path(path_type=Path))
@click.argument("candidates", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--images", "image_inputs", multiple=True, required=True, type=click.Path(path_type=Path),
              help="Image files or folders (repeatable).")
@click.option("--config", type=click.Path(path_type=Path), help="fast-reid config for checkpoints that lack one.")
@click.option("--batch-size", default=16, show_default=True, type=int, callback=positive_int)
@click.option("--min-cosine", type=float, help="Fail below this per-image cosine (default by precision).")
@click.option("--min-mean-cosine", type=float, help="Fail below this mean cosine (FP16/bf16/INT8 default "
                                                    f"{_GATE['min_mean_cosine']:g}).")
@click.option("--max-pair-error", type=float,
              help="Fail above this pairwise-similarity error: the RMS change of the cosine similarity of every two "
                   "images over the spread of the reference's (FP16/bf16/INT8 default "
                   f"{_GATE['max_pair_error']:g}, the gate quantize and eval apply).")
@click.option("--max-rel-l2", type=float, help="Fail above this per-image relative L2 error.")
@click.option("--atol", type=float, help="Elementwise absolute tolerance (with --rtol; Polygraphy semantics).")
@click.option("--rtol", type=float, help="Elementwise relative tolerance (with --atol).")
@click.option("--min-top1-agreement", type=float, help="Fail when fewer images keep their nearest neighbour (0..1).")
@click.option("--locate", is_flag=True, help="For ONNX FP16/INT8 candidates: list the layers where the error grows.")
@click.option("--deployment", type=click.Choice(_deployment_names()),
              help="Feed the candidates a deployment's preprocessing (deepstream: keepAspc letterbox + NVIDIA's "
                   "scalar normalisation; deepstream-folded; deepstream-stretch; bilinear; boxmot: BoxMOT's cv2 "
                   "bilinear resize and ImageNet input through reid-export boxmot's fold; boxmot-unfolded: that input "
                   "fed to the model as it is); the reference keeps its own.")
@click.option("--report", type=click.Path(path_type=Path), help="Write the results as JSON.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--progress/--no-progress", default=True)
@skip_bad_images_option
def parity(reference, candidates, image_inputs, config, batch_size, min_cosine, min_mean_cosine, max_pair_error,
           max_rel_l2, atol, rtol,
           min_top1_agreement, locate, deployment, report, device, progress, skip_bad_images):
    """Compare the embeddings of CANDIDATES against REFERENCE on the same images.

    Each model preprocesses the same decoded images with its own data config. Default
    tolerances follow the candidate's precision: FP32 strict (cosine >= 0.99999, relative L2
    <= 1e-4, elementwise atol 1e-4 / rtol 1e-3); FP16, bf16 and INT8 the one reduced-precision
    gate that quantize and eval apply too (pairwise-similarity error, min and mean cosine; see
    --max-pair-error). The pairwise error needs a few dozen images to mean much. Exit 0 only
    when every candidate passes.

    \b
    Example:
      reid-export parity model.pth model.onnx model.fp16.onnx model.int8.onnx --images crops/ --locate
    """
    from ..embeddings import Tolerances
    from ..verify.parity import run_parity

    _check_outputs(report)
    gate = Tolerances.by_precision(min_cosine=min_cosine, min_mean_cosine=min_mean_cosine, max_pair_error=max_pair_error,
                                   max_rel_l2=max_rel_l2, atol=atol, rtol=rtol, min_top1_agreement=min_top1_agreement)
    result = run_parity(reference, candidates, image_inputs, config=config, batch_size=batch_size, gate=gate,
                        locate=locate, deployment=deployment, device=device,
                        progress=progress, skip_bad_images=skip_bad_images, warn=echo_library_line)
    click.echo(to_flags(result.table()))
    if report:
        atomic_write_json(report, result.to_dict())
    for line in result.collapse_warnings():
        click.echo(to_flags(line), err=True)
    return result.exit_code


# --------------------------------------------------------------------------- eval

@flag_aliases(**{"gates=EvalGates.off()": "no_gate"})
@cli.command(name="eval")
@click.argument("models", nargs=-1, type=click.Path(path_type=Path))
@click.option("--dataset-root", type=click.Path(path_type=Path),
              help="Market-1501-layout folder (query/, bounding_box_test/), or the folder holding Market-1501-v15.09.15/.")
@click.option("--distractors", multiple=True, type=click.Path(path_type=Path),
              help="Extra gallery images or folders, counted as distractors (pid 0); the evaluation is streamed "
                   "over gallery chunks (exact, bounded memory). Repeatable.")
@click.option("--query-features", type=click.Path(path_type=Path),
              help="Evaluate extract outputs instead of models: the queries' .npy (its .json names the files).")
@click.option("--gallery-features", multiple=True, type=click.Path(path_type=Path),
              help="With --query-features: the gallery's .npy (repeatable: gallery, distractors...).")
@click.option("--distractor-features", multiple=True, type=click.Path(path_type=Path),
              help="With --query-features: distractors' .npy (pid 0 whatever the names). Repeatable.")
@click.option("--chunk-elements", default=1 << 25, show_default=True, type=int, callback=positive_int,
              help="Streamed evaluation: query x gallery distances held at once (memory ~ 4.5 bytes each, "
                   "whatever the gallery size).")
@click.option("--config", type=click.Path(path_type=Path), help="fast-reid config for checkpoints that lack one.")
@click.option("--flip-test", is_flag=True, help="Average features of each image and its mirror.")
@click.option("--rerank", is_flag=True, help="k-reciprocal re-ranking (Zhong et al. 2017).")
@click.option("--k1", default=20, show_default=True, type=int)
@click.option("--k2", default=6, show_default=True, type=int)
@click.option("--lambda", "lambda_value", default=0.3, show_default=True, type=float)
@click.option("--aqe", is_flag=True, help="Average query expansion (alpha 3, k 5).")
@click.option("--metric", type=click.Choice(["cosine", "euclidean"]), default="cosine", show_default=True)
@click.option("--max-map-drop", default=2.0, show_default=True, type=float,
              help="With two or more models: fail when a model's mAP is more than this many points below the first "
                   "model's (on 200 queries an INT8 variant's mAP scatters by about +-1.5).")
@click.option("--max-r1-drop", default=3.0, show_default=True, type=float,
              help="With two or more models: fail when a model's Rank-1 is more than this many points below the first's.")
@click.option("--max-pair-error", type=float, default=None,
              help="FP16/bf16/INT8 rows: fail when the pairwise-similarity error of their features against the first "
                   f"model's, on the dataset's images, exceeds this (default {_GATE['max_pair_error']:g}: the gate "
                   "quantize and parity apply).")
@click.option("--no-gate", is_flag=True,
              help="Report only: no drop, deployment, fidelity or collapsed-embedding gate fails the command.")
@click.option("--contrast", multiple=True, type=click.Path(path_type=Path),
              help="One of MODELS that is in the table for comparison only (e.g. an untrained net): never gated. "
                   "Repeatable.")
@click.option("--deployment", "deployments", multiple=True, type=click.Choice(_deployment_names()),
              help="Also run each model through a deployment's preprocessing (repeatable): deepstream (keepAspc "
                   "letterbox + NVIDIA's scalar normalisation), deepstream-folded (letterbox, exact), "
                   "deepstream-stretch, bilinear, boxmot (BoxMOT's cv2 bilinear resize + ImageNet input through "
                   "reid-export boxmot's fold), boxmot-unfolded (BoxMOT's input fed as it is: a model that normalises "
                   "inside normalises twice); its cost is against the model's own preprocessing.")
@click.option("--max-deployment-map-drop", default=1.0, show_default=True, type=float,
              help="With --deployment: fail when a deployment costs a model more mAP points than this.")
@click.option("--max-deployment-r1-drop", default=2.0, show_default=True, type=float,
              help="With --deployment: fail when a deployment costs a model more Rank-1 points than this.")
@click.option("--report", type=click.Path(path_type=Path), help="Write the results as JSON.")
@click.option("--plots", type=click.Path(path_type=Path), help="Folder for ROC and rank-list PNGs.")
@click.option("--batch-size", default=32, show_default=True, type=int, callback=positive_int)
@click.option("--device", default="cpu", show_default=True)
@click.option("--progress/--no-progress", default=True)
@skip_bad_images_option
def evaluate(models, dataset_root, distractors, query_features, gallery_features, distractor_features,
             chunk_elements, config, flip_test,
             rerank, k1, k2, lambda_value, aqe, metric, max_map_drop, max_r1_drop, max_pair_error, no_gate, contrast,
             deployments,
             max_deployment_map_drop, max_deployment_r1_drop, report, plots, batch_size, device, progress,
             skip_bad_images):
    """Rank-1/5/10, mAP, mINP and TPR@FPR of MODELS on a Market-1501-layout dataset.

    The Market-1501 protocol: junk (-1) dropped, distractors (0000) kept in the gallery, gallery
    images of the query's identity from the query's camera ignored. The first model is the
    reference: every other model fails (exit 1, FAIL in the table) when its mAP drops more than
    --max-map-drop (2) or its Rank-1 more than --max-r1-drop (3) points below it. A model whose
    embeddings collapsed (every pair of different images at cosine >= 0.99: normalised twice, wrong
    pixel scale) fails too. --no-gate reports without failing.

    For trackers, the table also gives each model's cosine distance at false-match rates 1e-1,
    1e-2 and 1e-3 (a DeepSORT-style threshold: max_cos_dist, appearance_thresh), the true-match rate
    there and its shift against the first model.

    \b
    Example:
      reid-export eval model.pth model.onnx model.int8.onnx --dataset-root Market-1501 \\
          --max-map-drop 0.5 --report eval.json --plots plots/
    """
    from ..verify.retrieval import EvalOptions
    from ..embeddings import Tolerances
    from ..verify.evaluation import EvalGates, run_evaluation
    from .large_eval import check_eval_inputs, eval_feature_files

    _check_outputs(report)
    check_eval_inputs(models, dataset_root, distractors, query_features, gallery_features, plots, rerank, aqe)
    if query_features is not None:
        return eval_feature_files(query_features, gallery_features, distractor_features, metric, chunk_elements,
                                  progress, report, report_header("eval"))
    if plots is not None:
        plots.mkdir(parents=True, exist_ok=True)
    options = EvalOptions(flip_test=flip_test, metric=metric, rerank=rerank, k1=k1, k2=k2, lambda_value=lambda_value,
                       aqe=aqe, batch_size=batch_size)
    unknown = [str(c) for c in contrast if all(Path(c) != Path(m) for m in models)]
    if unknown:
        raise UsageError(f"--contrast {unknown[0]}: not one of the MODELS; name a model given to eval")
    gates = EvalGates.off() if no_gate else EvalGates(
        max_map_drop=max_map_drop, max_r1_drop=max_r1_drop, max_deployment_map_drop=max_deployment_map_drop,
        max_deployment_r1_drop=max_deployment_r1_drop, exempt=tuple(str(c) for c in contrast),
        fidelity=Tolerances.reduced_precision(max_pair_error=max_pair_error))
    result = run_evaluation(models, dataset_root, options, gates, config=config, deployments=deployments,
                            distractors=distractors, chunk_elements=chunk_elements, device=device, progress=progress,
                            skip_bad_images=skip_bad_images, warn=echo_library_line)
    click.echo(to_flags(result.table()))
    if plots is not None:
        result.write_plots(plots)
    if report:
        atomic_write_json(report, result.to_dict())
    for line in result.collapse_warnings():
        click.echo(to_flags(line), err=True)
    return result.exit_code


# --------------------------------------------------------------------------- fp16-check

@flag_aliases(images="image_inputs")
@cli.command(name="fp16-check")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--images", "image_inputs", multiple=True, required=True, type=click.Path(path_type=Path))
@click.option("--config", type=click.Path(path_type=Path))
@click.option("--device", default="cpu", show_default=True, help="cpu (torch half on CPU) or cuda.")
@click.option("--batch-size", default=8, show_default=True, type=int, callback=positive_int)
@click.option("--report", type=click.Path(path_type=Path))
@click.option("--all-layers", is_flag=True, help="Print every layer, not only the tightest ones.")
def fp16_check(model, image_inputs, config, device, batch_size, report, all_layers):
    """Run a checkpoint with true FP16 activations and report overflow per layer.

    ONNX Runtime on CPU computes FP16 graphs in FP32 and hides activation overflow (GeM's x^p,
    large features). This runs the torch model in half precision beside FP32 and lists each
    layer's largest magnitude and its headroom to 65504. Exit 1 when any layer overflows.
    """
    from ..runtime.torch_backend import TorchEncoder
    from ..verify.fp16check import fp16_activation_check

    _check_outputs(report)
    enc = open_encoder(model, config=config, device="cpu")
    if not isinstance(enc, TorchEncoder):
        raise ReidExportError(f"{model}: fp16-check runs torch checkpoints (.pth); export FP16 ONNX after it passes",
                              exit_code=2)
    if device.startswith("cuda"):
        from ..runtime.torch_backend import resolve_torch_device

        resolve_torch_device(device)
    paths = expand_image_paths(image_inputs)
    batches = [preprocess(paths[i:i + batch_size], enc.data_config) for i in range(0, len(paths), batch_size)]
    res = fp16_activation_check(enc.model, batches, device)
    rows = sorted(res["layers"], key=lambda r: r["headroom"])
    shown = rows if all_layers else rows[:12]
    click.echo(f"{model}: {len(paths)} images, FP16 activations on {device}; output max rel L2 vs FP32 "
               f"{res['max_rel_l2']:.3g}, min headroom {res['min_headroom']:.3g}x")
    click.echo(format_table(["layer", "type", "fp32 max |x|", "GeM x^p max", "fp16 max |x|", "Inf/NaN", "headroom"],
                            [[r["layer"], r["type"], r["fp32_max_abs"], r.get("fp32_pow_max"), r["fp16_max_abs"],
                              r["fp16_nonfinite"], r["headroom"]] for r in shown], floatfmt=".4g"))
    if res["overflow_layers"]:
        click.echo(f"FAIL FP16 overflow in {len(res['overflow_layers'])} layers, first: {res['overflow_layers'][0]}; "
                   "keep those layers in FP32 (quantize --precision fp16 --exclude ...)")
    else:
        click.echo("PASS no FP16 overflow")
    if report:
        doc = report_header("fp16-check")
        doc.update({"model": str(model), "images": [str(p) for p in paths],
                    **{k: (_finite(v) if not isinstance(v, list) else v) for k, v in res.items()}})
        doc["layers"] = [{k: _finite(v) for k, v in r.items()} for r in res["layers"]]
        atomic_write_json(report, doc)
    return 0 if res["passed"] else 1
