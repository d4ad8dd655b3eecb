"""``eval`` on extract outputs and with distractors: the streamed path's option checks and its report."""

from __future__ import annotations

import click

from ..errors import ReidExportError
from ..fileio import atomic_write_json
from ..report import format_table

KEYS = ("Rank-1", "Rank-5", "Rank-10", "mAP", "mINP")


def check_eval_inputs(models, dataset_root, distractors, query_features, gallery_features, plots, rerank, aqe,
                      distractor_features=()):
    """One clear line for a combination the eval command cannot run."""
    streamed = bool(distractors) or query_features is not None
    if query_features is not None or gallery_features or distractor_features:
        if query_features is None or not gallery_features:
            raise ReidExportError("--query-features and --gallery-features go together", exit_code=2)
        if models or dataset_root is not None or distractors:
            raise ReidExportError("--query-features/--gallery-features evaluate extract outputs: leave out MODELS, "
                                  "--dataset-root and --distractors (pass distractor features as another "
                                  "--gallery-features)", exit_code=2)
    else:
        if not models:
            raise ReidExportError("give MODELS and --dataset-root, or --query-features Q.npy --gallery-features "
                                  "G.npy", exit_code=2)
        if dataset_root is None:
            raise ReidExportError("--dataset-root is required with MODELS", exit_code=2)
    if streamed and plots is not None:
        raise ReidExportError("--plots needs the full distance matrix; leave it out with --distractors or "
                              "feature files", exit_code=2)
    if streamed and (rerank or aqe):
        raise ReidExportError("--rerank/--aqe are not available with --distractors or feature files yet",
                              exit_code=2)


def eval_feature_files(query_features, gallery_features, distractor_features, metric, chunk_elements, progress,
                       report, header) -> int:
    from ..verify.streamed import evaluate_feature_files

    res = evaluate_feature_files(query_features, gallery_features, metric, chunk_elements, progress,
                                 distractor_npys=distractor_features)
    click.echo(f"queries {query_features} ({res['num_query']}), gallery {', '.join(map(str, gallery_features))} "
               f"({res['num_gallery']} items); metric {metric}; streamed exact evaluation")
    click.echo(format_table(["model", *KEYS, "valid queries", "seconds", "peak RSS MiB"],
                            [[res.get("model") or "-", *[res[k] for k in KEYS], res["num_valid_queries"],
                              res["seconds"], res["peak_rss_mib"]]], floatfmt=".2f"))
    if report:
        doc = dict(header)
        doc.update({"models": [res], "passed": True})
        atomic_write_json(report, doc)
    return 0
