"""Evaluation during training: the same path as ``reid-export eval`` (:mod:`reid_export.verify.retrieval`).

Query and gallery of each DATASETS.TESTS dataset are encoded with
:class:`reid_export.runtime.torch_backend.TorchEncoder` (decode, resize, batch exactly as
``reid-export extract``/``eval`` do) and scored by :func:`reid_export.verify.retrieval.evaluate_encoder`
with TEST.FLIP, TEST.METRIC, TEST.AQE and TEST.RERANK applied as fast-reid's evaluator applies them;
a model that outputs NaN/Inf stops the run with one line. ``metric`` is fast-reid's model-selection
score ``(Rank-1 + mAP) / 2``.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from reid_export.data.market import MarketDataset
from reid_export.errors import ReidExportError
from reid_export.runtime.torch_backend import TorchEncoder
from reid_export.verify.retrieval import EvalOptions, evaluate_encoder

from .datasets import datasets_root, resolve_dataset

log = logging.getLogger("reid-train")


def eval_options(cfg) -> EvalOptions:
    """The evaluation a fast-reid config asks for (TEST.*)."""
    test = cfg.TEST
    return EvalOptions(flip_test=bool(test.FLIP.ENABLED), metric=str(test.METRIC), batch_size=int(test.IMS_PER_BATCH),
                       aqe=bool(test.AQE.ENABLED), qe_times=int(test.AQE.QE_TIME), qe_k=int(test.AQE.QE_K),
                       alpha=float(test.AQE.ALPHA), rerank=bool(test.RERANK.ENABLED), k1=int(test.RERANK.K1),
                       k2=int(test.RERANK.K2), lambda_value=float(test.RERANK.LAMBDA))


def evaluate(model: torch.nn.Module, cfg, data_config, device: str, progress: bool = True) -> dict:
    """{dataset name: metrics} for every DATASETS.TESTS entry; the model is left in train mode."""
    was_training = model.training
    encoder = TorchEncoder(model, data_config, path=f"<training model {data_config.model_name}>", device=device)
    opts = eval_options(cfg)
    results = {}
    try:
        root = datasets_root(cfg)
        for name in cfg.DATASETS.TESTS:
            start = time.time()
            dataset = MarketDataset(resolve_dataset(name, root, "query"))
            scored = evaluate_encoder(encoder, dataset, opts, progress)
            if not scored.ok:
                raise ReidExportError(f"evaluation on {name}: {scored.error} (the model diverged); lower "
                                      "SOLVER.BASE_LR or enable SOLVER.CLIP_GRADIENTS and resume from the last checkpoint")
            res = {k: float(v) if isinstance(v, (float, np.floating)) else v for k, v in scored.metrics.items()}
            res["metric"] = (res["Rank-1"] + res["mAP"]) / 2
            res["num_query"], res["num_gallery"] = len(dataset.query), len(dataset.gallery)
            res["seconds"] = round(time.time() - start, 2)
            res["root"] = str(dataset.root)
            results[name] = res
    finally:
        model.train(was_training)
    return results


def format_results(results: dict) -> str:
    lines = [f"{'dataset':<16} {'Rank-1':>7} {'Rank-5':>7} {'Rank-10':>7} {'mAP':>7} {'mINP':>7}"]
    for name, r in results.items():
        lines.append(f"{name:<16} {r['Rank-1']:7.2f} {r['Rank-5']:7.2f} {r['Rank-10']:7.2f} "
                     f"{r['mAP']:7.2f} {r['mINP']:7.2f}")
    return "\n".join(lines)
