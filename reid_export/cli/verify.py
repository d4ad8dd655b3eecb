"""``reid-export parity``, ``eval`` and ``fp16-check``: prove an exported model is as good as the original."""

from __future__ import annotations

import math
import platform
from datetime import datetime, timezone
from pathlib import Path

import click
import numpy as np

from .. import __version__
from ..errors import ReidExportError
from ..fileio import atomic_write_json, check_output_path
from ..report import format_table
from ..runtime import expand_image_paths, open_encoder, preprocess, read_images, skipped_summary
from ..runtime.encoder import configs_for
from .common import positive_int, skip_bad_images_option
from .main import cli


def _report_header(command: str) -> dict:
    return {"tool": f"reid-export {__version__}", "command": command,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": platform.node(), "python": platform.python_version()}


def _finite(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _check_outputs(*paths):
    for path in paths:
        if path is not None:
            check_output_path(path)


def _deployment_names():
    from ..serve.deploy_preprocess import DEPLOYMENTS

    return list(DEPLOYMENTS)


def _use_deployment(encoder, name):
    """Run ``encoder`` through deployment ``name``'s preprocessing (reid_export.serve.deploy_preprocess)."""
    from ..serve.deploy_preprocess import get_deployment

    encoder.preprocessing = get_deployment(name).preprocess
    return encoder


# --------------------------------------------------------------------------- parity

@cli.command()
@click.argument("reference", type=click.Path(path_type=Path))
@click.argument("candidates", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--images", "image_inputs", multiple=True, required=True, type=click.Path(path_type=Path),
              help="Image files or folders (repeatable).")
@click.option("--config", type=click.Path(path_type=Path), help="fast-reid config for checkpoints that lack one.")
@click.option("--batch-size", default=16, show_default=True, type=int, callback=positive_int)
@click.option("--min-cosine", type=float, help="Fail below this per-image cosine (default by precision).")
@click.option("--max-rel-l2", type=float, help="Fail above this per-image relative L2 error.")
@click.option("--atol", type=float, help="Elementwise absolute tolerance (with --rtol; Polygraphy semantics).")
@click.option("--rtol", type=float, help="Elementwise relative tolerance (with --atol).")
@click.option("--min-top1-agreement", type=float, help="Fail when fewer images keep their nearest neighbour (0..1).")
@click.option("--locate", is_flag=True, help="For ONNX FP16/INT8 candidates: list the layers where the error grows.")
@click.option("--deployment", type=click.Choice(_deployment_names()),
              help="Feed the candidates a deployment's preprocessing (deepstream: keepAspc letterbox + NVIDIA's "
                   "scalar normalisation; deepstream-folded; deepstream-stretch; bilinear); the reference keeps its own.")
@click.option("--report", type=click.Path(path_type=Path), help="Write the results as JSON.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--progress/--no-progress", default=True)
@skip_bad_images_option
def parity(reference, candidates, image_inputs, config, batch_size, min_cosine, max_rel_l2, atol, rtol,
           min_top1_agreement, locate, deployment, report, device, progress, skip_bad_images):
    """Compare the embeddings of CANDIDATES against REFERENCE on the same images.

    Each model preprocesses the same decoded images with its own data config. Default
    tolerances follow the candidate's precision: FP32 strict (cosine >= 0.99999, relative L2
    <= 1e-4, elementwise atol 1e-4 / rtol 1e-3); FP16 cosine >= 0.999, L2 <= 0.05; INT8 cosine
    >= 0.98, L2 <= 0.2. Exit 0 only when every candidate passes.

    \b
    Example:
      reid-export parity model.pth model.onnx model.fp16.onnx model.int8.onnx --images crops/ --locate
    """
    from ..embeddings import Tolerances, compare, data_config_differences

    if (atol is None) != (rtol is None):
        raise ReidExportError("--atol and --rtol go together; give both", exit_code=2)
    _check_outputs(report)
    paths = expand_image_paths(image_inputs)
    # decoded once, preprocessed per model
    images, kept, skipped = read_images(paths, "skip" if skip_bad_images else "raise")
    if skipped:
        if not images:
            raise ReidExportError(f"none of the {len(paths)} images could be read; {skipped_summary(skipped)}")
        click.echo(skipped_summary(skipped), err=True)
        paths = [paths[i] for i in kept]
    model_configs = configs_for([reference, *candidates], config)  # --config: for the checkpoints
    ref_enc = open_encoder(reference, config=model_configs[0], device=device)
    ref_feats = ref_enc.encode_files(images, batch_size, progress=progress, desc=f"reference ({ref_enc.backend})")
    results, locates, encoders = [], {}, []
    for cand_path, cand_config in zip(candidates, model_configs[1:]):
        enc = open_encoder(cand_path, config=cand_config, device=device)
        encoders.append(enc)
        if deployment:
            _use_deployment(enc, deployment)
        feats = enc.encode_files(images, batch_size, progress=progress, desc=f"{cand_path.name} ({enc.backend})")
        tol = Tolerances.for_precision(enc.precision, min_cosine=min_cosine, max_rel_l2=max_rel_l2, atol=atol,
                                       rtol=rtol, min_top1_agreement=min_top1_agreement)
        res = compare(ref_feats, feats, tol, str(cand_path) + (f"@{deployment}" if deployment else ""),
                      enc.backend, enc.precision)
        if not res.passed:
            res.notes.extend(data_config_differences(ref_enc.data_config, enc.data_config))
        results.append(res)
    if locate:
        from ..export.locate import locate as locate_layers

        fp32_onnx = reference if reference.suffix == ".onnx" and ref_enc.precision == "fp32" else next(
            (e.path for e in encoders if e.path.suffix == ".onnx" and e.precision == "fp32"), None)
        targets = [e for e in encoders if e.path.suffix == ".onnx" and e.precision != "fp32"]
        if fp32_onnx is None or not targets:
            raise ReidExportError("--locate needs an FP32 ONNX (as reference or candidate) and FP16/INT8 ONNX "
                                  "candidates made from it", exit_code=2)
        fp32_enc = ref_enc if fp32_onnx == reference else next(e for e in encoders if e.path == fp32_onnx)
        batch = preprocess(images[: min(len(images), 8)], fp32_enc.data_config)
        for enc in targets:
            locates[str(enc.path)] = locate_layers(fp32_onnx, enc.path, batch)

    rows = [[Path(r.candidate).name, r.backend, r.precision, r.min_cosine, r.max_rel_l2, r.max_abs_error,
             r.elementwise_failures, r.nonfinite, f"{r.top1_agreement:.0%}", f"{r.top5_agreement:.0%}",
             "PASS" if r.passed else "FAIL"] for r in results]
    click.echo(f"reference: {reference} ({ref_enc.backend}, {ref_enc.precision}); {len(paths)} images"
               + (f"; candidates through the {deployment} deployment's preprocessing" if deployment else ""))
    click.echo(format_table(["candidate", "backend", "prec", "min cos", "max rel L2", "max abs", "elem fail",
                             "NaN/Inf", "top-1", "top-5", "result"], rows, floatfmt=".6g"))
    for r in results:
        if not r.passed:
            click.echo(f"FAIL {r.candidate}: " + "; ".join(r.failures))
            for note in r.notes:
                click.echo(f"     data config differs: {note}")
    for cand, loc in locates.items():
        click.echo(f"\nlocate {Path(cand).name}: {loc['compared']} tensors compared, final rel error "
                   f"{loc['final_rel_error']:.3g}; layers where the error grows most:")
        click.echo(format_table(["node", "op", "rel error", "input rel error", "growth"],
                                [[l["node"], l["op_type"], l["rel_error"], l["input_rel_error"], l["growth"]]
                                 for l in loc["largest_growth"]], floatfmt=".3g"))
    if report:
        doc = _report_header("parity")
        doc.update({"reference": {"model": str(reference), "backend": ref_enc.backend, "precision": ref_enc.precision},
                    "images": [str(p) for p in paths], "skipped_images": [str(e.path) for e in skipped],
                    "deployment": deployment,
                    "candidates": [r.to_dict() for r in results],
                    "locate": locates, "passed": all(r.passed for r in results)})
        atomic_write_json(report, doc)
    for enc in [ref_enc, *encoders]:
        enc.close()
    return 0 if all(r.passed for r in results) else 1


# --------------------------------------------------------------------------- eval

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
              help="Streamed evaluation: query x gallery distances held at once (memory ~ 5 bytes each).")
@click.option("--config", type=click.Path(path_type=Path), help="fast-reid config for checkpoints that lack one.")
@click.option("--flip-test", is_flag=True, help="Average features of each image and its mirror.")
@click.option("--rerank", is_flag=True, help="k-reciprocal re-ranking (Zhong et al. 2017).")
@click.option("--k1", default=20, show_default=True, type=int)
@click.option("--k2", default=6, show_default=True, type=int)
@click.option("--lambda", "lambda_value", default=0.3, show_default=True, type=float)
@click.option("--aqe", is_flag=True, help="Average query expansion (alpha 3, k 5).")
@click.option("--metric", type=click.Choice(["cosine", "euclidean"]), default="cosine", show_default=True)
@click.option("--max-map-drop", type=float, help="Fail when a model's mAP is this many points below the first model's.")
@click.option("--max-r1-drop", type=float, help="Fail when a model's Rank-1 is this many points below the first's.")
@click.option("--deployment", "deployments", multiple=True, type=click.Choice(_deployment_names()),
              help="Also run each model through a deployment's preprocessing (repeatable): deepstream (keepAspc "
                   "letterbox + NVIDIA's scalar normalisation), deepstream-folded (letterbox, exact), "
                   "deepstream-stretch, bilinear; its cost is against the model's own preprocessing.")
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
             rerank, k1, k2, lambda_value, aqe, metric, max_map_drop, max_r1_drop, deployments,
             max_deployment_map_drop, max_deployment_r1_drop, report, plots, batch_size, device, progress,
             skip_bad_images):
    """Rank-1/5/10, mAP, mINP and TPR@FPR of MODELS on a Market-1501-layout dataset.

    The Market-1501 protocol: junk (-1) dropped, distractors (0000) kept in the gallery, gallery
    images of the query's identity from the query's camera ignored. Deltas are against the first
    model; --max-map-drop / --max-r1-drop turn them into gates (exit 1 when exceeded).

    \b
    Example:
      reid-export eval model.pth model.onnx model.int8.onnx --dataset-root Market-1501 \\
          --max-map-drop 0.5 --report eval.json --plots plots/
    """
    from ..data.market import MarketDataset
    from ..verify.evaluate import METRIC_KEYS, EvalOptions, check_queries_have_matches, evaluate_encoder

    _check_outputs(report)
    from .large_eval import check_eval_inputs, eval_feature_files

    check_eval_inputs(models, dataset_root, distractors, query_features, gallery_features, plots, rerank, aqe,
                      distractor_features)
    if query_features is not None:
        return eval_feature_files(query_features, gallery_features, distractor_features, metric, chunk_elements,
                                  progress, report, _report_header("eval"))
    dataset = MarketDataset(dataset_root)
    check_queries_have_matches(dataset)
    if plots is not None:
        plots.mkdir(parents=True, exist_ok=True)
    opts = EvalOptions(flip_test=flip_test, metric=metric, rerank=rerank, k1=k1, k2=k2, lambda_value=lambda_value,
                       aqe=aqe, batch_size=batch_size)
    results, skip_notes = [], []
    for model, model_config in zip(models, configs_for(models, config)):
        enc = open_encoder(model, config=model_config, device=device)
        own = None
        with enc:
            for deployment in (None, *dict.fromkeys(deployments)):
                if deployment:
                    _use_deployment(enc, deployment)
                if distractors:  # streamed over gallery chunks
                    from ..verify.streamed import evaluate_encoder_streamed

                    res = evaluate_encoder_streamed(enc, dataset, distractors, opts, progress,
                                                    on_error="skip" if skip_bad_images else "raise",
                                                    chunk_elements=chunk_elements)
                else:
                    res = evaluate_encoder(enc, dataset, opts, progress,
                                           on_error="skip" if skip_bad_images else "raise")
                res.update({"model": str(model) + (f"@{deployment}" if deployment else ""), "backend": enc.backend,
                            "precision": enc.precision, "deployment": deployment})
                if deployment is None:
                    own = res
                elif "error" not in res and "error" not in own:
                    res["cost_mAP"] = own["mAP"] - res["mAP"]
                    res["cost_Rank-1"] = own["Rank-1"] - res["Rank-1"]
                results.append(res)
                if res.get("skipped") and res["skipped"] not in skip_notes:  # the same files fail for every model
                    skip_notes.append(res["skipped"])
                    click.echo(res["skipped"], err=True)
    base = results[0]
    failed = []
    for res in results:
        if res.get("deployment") and "cost_mAP" in res:
            own_name = res["model"].rpartition("@")[0]
            if res["cost_mAP"] > max_deployment_map_drop:
                failed.append(f"{res['model']}: the {res['deployment']} preprocessing costs {res['cost_mAP']:.2f} mAP "
                              f"points against {Path(own_name).name}'s own (gate {max_deployment_map_drop})")
            if res["cost_Rank-1"] > max_deployment_r1_drop:
                failed.append(f"{res['model']}: the {res['deployment']} preprocessing costs {res['cost_Rank-1']:.2f} "
                              f"Rank-1 points against {Path(own_name).name}'s own (gate {max_deployment_r1_drop})")
    for res in results:
        if "error" in res:
            failed.append(f"{res['model']}: {res['error']}")
            continue
        if "error" not in base:
            res["delta_mAP"] = res["mAP"] - base["mAP"]
            res["delta_Rank-1"] = res["Rank-1"] - base["Rank-1"]
            if max_map_drop is not None and -res["delta_mAP"] > max_map_drop:
                failed.append(f"{res['model']}: mAP {res['mAP']:.2f} is {-res['delta_mAP']:.2f} points below "
                              f"{base['model']} (gate {max_map_drop})")
            if max_r1_drop is not None and -res["delta_Rank-1"] > max_r1_drop:
                failed.append(f"{res['model']}: Rank-1 {res['Rank-1']:.2f} is {-res['delta_Rank-1']:.2f} points "
                              f"below {base['model']} (gate {max_r1_drop})")
    tpr_keys = [k for k in results[0] if k.startswith("TPR@")] if "error" not in base else []
    rows = []
    for res in results:
        if "error" in res:
            rows.append([Path(res["model"]).name, res["backend"], res["precision"]]
                        + ["-"] * (len(METRIC_KEYS) + len(tpr_keys[-1:]) + 1) + ["ERROR"])
            continue
        rows.append([Path(res["model"]).name, res["backend"], res["precision"]]
                    + [res[k] for k in METRIC_KEYS]
                    + [res.get(k) for k in tpr_keys[-1:]]
                    + [res.get("delta_mAP"), "ok"])
    click.echo(f"dataset: {dataset.root} ({len(dataset.query)} queries, {len(dataset.gallery)} gallery); "
               f"metric {metric}{', flip' if flip_test else ''}{', AQE' if aqe else ''}{', re-rank' if rerank else ''}")
    click.echo(format_table(["model", "backend", "prec", *METRIC_KEYS, *tpr_keys[-1:], "d mAP", "status"], rows,
                            floatfmt=".2f"))
    if distractors and "error" not in base:
        click.echo(f"gallery + {base['num_distractors']} distractors = {base['num_gallery']} items, streamed exact "
                   f"evaluation; peak RSS {max(r.get('peak_rss_mib', 0) for r in results):.0f} MiB")
    if deployments:
        click.echo("\ncost of each deployment's preprocessing against the model's own (points; gates mAP "
                   f"{max_deployment_map_drop:g}, Rank-1 {max_deployment_r1_drop:g}):")
        click.echo(format_table(["model", "deployment", "Rank-1", "mAP", "cost Rank-1", "cost mAP", "result"],
                                [[Path(r["model"]).name.rpartition("@")[0], r["deployment"], r["Rank-1"], r["mAP"],
                                  r["cost_Rank-1"], r["cost_mAP"],
                                  "FAIL" if (r["cost_mAP"] > max_deployment_map_drop
                                             or r["cost_Rank-1"] > max_deployment_r1_drop) else "PASS"]
                                 for r in results if r.get("deployment") and "cost_mAP" in r], floatfmt=".2f"))
    for line in failed:
        click.echo(f"FAIL {line}")
    if plots is not None and "error" not in base:
        _write_plots(plots, results, dataset)
    if report:
        doc = _report_header("eval")
        doc.update({"dataset": str(dataset.root), "num_query": len(dataset.query), "num_gallery": len(dataset.gallery),
                    "options": opts.__dict__, "gates": {"max_map_drop": max_map_drop, "max_r1_drop": max_r1_drop,
                                                        **({"max_deployment_map_drop": max_deployment_map_drop,
                                                            "max_deployment_r1_drop": max_deployment_r1_drop}
                                                           if deployments else {})},
                    "deployments": list(dict.fromkeys(deployments)),
                    "models": [{k: _finite(v) for k, v in r.items() if not k.startswith("_")} for r in results],
                    "failures": failed, "passed": not failed})
        atomic_write_json(report, doc)
    return 0 if not failed else 1


def _write_plots(folder: Path, results: list[dict], dataset) -> None:
    from ..verify import metrics
    from ..verify.evaluate import per_query_ap
    from ..verify.plots import rank_list_image, rank_list_rows, roc_plot, write_png

    curves = {}
    for i, res in enumerate(results):
        if "error" in res:
            continue
        q, g = res["_query"], res["_gallery"]
        curves[f"{i + 1}. {Path(res['model']).name} ({res['backend']}, {res['precision']})"] = metrics.roc_curve(
            res["_distmat"], q.pids, g.pids, q.camids, g.camids)
    roc_plot(curves, folder / "roc.png", title=f"ROC on {Path(dataset.root).name}")
    base = results[0]
    ap = per_query_ap(base["_distmat"], base["_query"], base["_gallery"])
    valid = np.where(np.isfinite(ap))[0]
    order = valid[np.argsort(ap[valid], kind="stable")]
    for tag, idx in (("worst", order[:5]), ("best", order[::-1][:5])):
        if len(idx):
            rows = rank_list_rows(base["_distmat"], base["_query"], base["_gallery"], idx, topk=10, ap=ap)
            write_png(folder / f"ranklist_{tag}.png", rank_list_image(rows))


# --------------------------------------------------------------------------- fp16-check

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
        doc = _report_header("fp16-check")
        doc.update({"model": str(model), "images": [str(p) for p in paths],
                    **{k: (_finite(v) if not isinstance(v, list) else v) for k, v in res.items()}})
        doc["layers"] = [{k: _finite(v) for k, v in r.items()} for r in res["layers"]]
        atomic_write_json(report, doc)
    return 0 if res["passed"] else 1
