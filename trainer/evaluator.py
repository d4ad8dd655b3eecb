"""Evaluation during training: the runtime's torch Encoder (the one preprocessing) + the project's metrics.

Query and gallery of each DATASETS.TESTS dataset are encoded with
:class:`reid_export.runtime.torch_backend.TorchEncoder` (decode, resize, batch exactly as
``reid-export extract``/``eval`` do; flip test with TEST.FLIP.ENABLED), distances with
TEST.METRIC, and Rank-1/5/10, mAP, mINP from :mod:`reid_export.verify.metrics`. ``metric`` is
fast-reid's model-selection score ``(Rank-1 + mAP) / 2``.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from reid_export.data.market import MarketDataset
from reid_export.runtime.torch_backend import TorchEncoder
from reid_export.verify.metrics import compute_distance, rank_metrics

from .datasets import datasets_root, resolve_dataset

log = logging.getLogger("reid-train")


def evaluate(model: torch.nn.Module, cfg, data_config, device: str, progress: bool = True) -> dict:
    """{dataset name: metrics} for every DATASETS.TESTS entry; the model is left in train mode."""
    was_training = model.training
    if cfg.TEST.AQE.ENABLED or cfg.TEST.RERANK.ENABLED:
        log.warning("TEST.AQE / TEST.RERANK are not applied during training evaluation; "
                    "use `reid-export eval` on the checkpoint for them")
    encoder = TorchEncoder(model, data_config, path=f"<training model {data_config.model_name}>", device=device)
    results = {}
    try:
        root = datasets_root(cfg)
        for name in cfg.DATASETS.TESTS:
            start = time.time()
            dataset = MarketDataset(resolve_dataset(name, root, "query"))
            batch = int(cfg.TEST.IMS_PER_BATCH)
            flip = bool(cfg.TEST.FLIP.ENABLED)
            qf = encoder.encode_files([it.path for it in dataset.query], batch, flip, progress, desc=f"{name} query")
            gf = encoder.encode_files([it.path for it in dataset.gallery], batch, flip, progress,
                                      desc=f"{name} gallery")
            distmat = compute_distance(qf, gf, metric=cfg.TEST.METRIC)
            res = rank_metrics(distmat,
                               np.array([it.pid for it in dataset.query]), np.array([it.pid for it in dataset.gallery]),
                               np.array([it.camid for it in dataset.query]),
                               np.array([it.camid for it in dataset.gallery]))
            res = {k: float(v) if isinstance(v, (float, np.floating)) else v for k, v in res.items()}
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
