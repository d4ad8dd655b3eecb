"""The BoT losses, with fast-reid's (v1.x) exact semantics.

* ``cross_entropy_loss``: label smoothing as fast-reid writes it: the target class gets
  ``1 - eps`` and every other class ``eps / (K - 1)`` (not the ``(1 - eps) * onehot + eps / K``
  of the Inception paper; the two differ by ``eps / K`` on the target). ``eps < 0`` selects
  fast-reid's adaptive smoothing ``eps = ALPHA * p_target``. The sum over the batch is divided by
  the number of non-zero per-sample losses, as fast-reid does.
* ``triplet_loss``: batch-hard (or softmax-weighted) mining on Euclidean distances
  (``sqrt(clamp(|x|^2 + |y|^2 - 2 x.y, 1e-12))``), features L2-normalised first when NORM_FEAT;
  ``margin_ranking_loss`` with MARGIN, or the soft margin ``softplus(d_ap - d_an)`` when MARGIN is 0.
* Each loss is multiplied by its SCALE; the total is their sum.

Under torchrun (``ctx``, :mod:`reid_train.distributed`) every rank returns its share of the loss, such
that the mean over the ranks is the loss (DistributedDataParallel averages the gradients): by
default each rank's own batch slice, mined within the slice (fast-reid's behaviour); with
``MODEL.LOSSES.TRI.GLOBAL_MINING`` the triplet loss of the rank's anchors mined over the features
of the whole global batch (gathered with gradients), and cross entropy summed over the rank's
samples and divided by the global count times the world size, so that N processes compute
the single-process loss and gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from reid_export.errors import ReidExportError

SUPPORTED_LOSSES = ("CrossEntropyLoss", "TripletLoss")


def cross_entropy_loss(logits: torch.Tensor, targets: torch.Tensor, eps: float, alpha: float = 0.2,
                       count_all=None) -> torch.Tensor:
    """``count_all``: a function of the local count of non-zero losses that returns the divisor
    (the global count, scaled; see :func:`compute_losses`); by default the local count."""
    num_classes = logits.shape[1]
    log_probs = F.log_softmax(logits, dim=1)
    with torch.no_grad():
        if eps >= 0:
            smooth = torch.full((logits.shape[0], 1), float(eps), dtype=log_probs.dtype, device=logits.device)
        else:  # adaptive label smoothing
            probs = F.softmax(logits, dim=1)
            smooth = alpha * probs.gather(1, targets.view(-1, 1))
        soft = smooth.expand(-1, num_classes) / max(num_classes - 1, 1)
        soft = soft.scatter(1, targets.view(-1, 1), 1 - smooth)
    loss = (-soft * log_probs).sum(dim=1)
    with torch.no_grad():
        local = (loss != 0).sum()
        count = max(float(count_all(local)) if count_all is not None else int(local), 1)
    return loss.sum() / count


def normalize(x: torch.Tensor) -> torch.Tensor:
    """fast-reid's ``normalize``: ``x / (|x| + 1e-12)``."""
    return x / (x.norm(p=2, dim=-1, keepdim=True) + 1e-12)


def euclidean_dist(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    xx = x.pow(2).sum(1, keepdim=True)
    yy = y.pow(2).sum(1, keepdim=True).t()
    dist = xx + yy - 2 * (x @ y.t())
    return dist.clamp(min=1e-12).sqrt()


def hard_example_mining(dist: torch.Tensor, is_pos: torch.Tensor, is_neg: torch.Tensor):
    """Per anchor: the farthest positive and the closest negative."""
    dist_ap = torch.where(is_pos, dist, torch.full_like(dist, float("-inf"))).max(dim=1).values
    dist_an = torch.where(is_neg, dist, torch.full_like(dist, float("inf"))).min(dim=1).values
    return dist_ap, dist_an


def _softmax_weights(dist: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    max_v = (dist * mask).max(dim=1, keepdim=True).values
    diff = dist - max_v
    z = (diff.exp() * mask).sum(dim=1, keepdim=True) + 1e-6
    return diff.exp() * mask / z


def weighted_example_mining(dist: torch.Tensor, is_pos: torch.Tensor, is_neg: torch.Tensor):
    """fast-reid's soft mining (HARD_MINING False): softmax-weighted positive/negative distances."""
    is_pos, is_neg = is_pos.float(), is_neg.float()
    dist_ap, dist_an = dist * is_pos, dist * is_neg
    dist_ap = (dist_ap * _softmax_weights(dist_ap, is_pos)).sum(dim=1)
    dist_an = (dist_an * _softmax_weights(-dist_an, is_neg)).sum(dim=1)
    return dist_ap, dist_an


def triplet_loss(embedding: torch.Tensor, targets: torch.Tensor, margin: float, norm_feat: bool,
                 hard_mining: bool, gallery: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Batch-hard/soft triplet of the anchors ``embedding``; positives and negatives are mined among
    ``gallery`` = (features, labels) (the global batch under torchrun), by default the anchors themselves."""
    if norm_feat:
        embedding = normalize(embedding)
    if gallery is None:
        others, other_targets = embedding, targets
    else:
        others, other_targets = gallery
        if norm_feat:
            others = normalize(others)
    dist = euclidean_dist(embedding, others)
    same = targets.view(-1, 1) == other_targets.view(1, -1)
    if bool(same.all()):
        return embedding.sum() * 0.0  # one identity in the batch: no negatives, nothing to rank
    mine = hard_example_mining if hard_mining else weighted_example_mining
    dist_ap, dist_an = mine(dist, same, ~same)
    y = torch.ones_like(dist_an)
    if margin > 0:
        return F.margin_ranking_loss(dist_an, dist_ap, y, margin=margin)
    loss = F.soft_margin_loss(dist_an - dist_ap, y)
    if torch.isinf(loss):
        loss = F.margin_ranking_loss(dist_an, dist_ap, y, margin=0.3)
    return loss


def check_loss_names(cfg) -> tuple[str, ...]:
    names = tuple(cfg.MODEL.LOSSES.NAME)
    unknown = [n for n in names if n not in SUPPORTED_LOSSES]
    if unknown:
        raise ReidExportError(
            f"MODEL.LOSSES.NAME: {', '.join(map(repr, unknown))} not supported by reid-train; "
            f"use {' and/or '.join(SUPPORTED_LOSSES)} (CircleSoftmax/ArcSoftmax/CosSoftmax are "
            "MODEL.HEADS.CLS_LAYER choices)"
        )
    if not names:
        raise ReidExportError("MODEL.LOSSES.NAME is empty; use (\"CrossEntropyLoss\", \"TripletLoss\")")
    return names


def compute_losses(cfg, outputs: dict, targets: torch.Tensor, ctx=None) -> dict[str, torch.Tensor]:
    """fast-reid's ``Baseline.losses``: ``loss_cls`` and/or ``loss_triplet``, each times its SCALE.

    ``ctx`` (a :class:`reid_train.distributed.DistContext`): under torchrun, this rank's share (module doc)."""
    names = check_loss_names(cfg)
    losses = {}
    L = cfg.MODEL.LOSSES
    global_mining = ctx is not None and ctx.distributed and bool(L.TRI.get("GLOBAL_MINING", False))
    if global_mining:
        from .distributed import all_reduce_sum, gather, gather_with_grad
    if "CrossEntropyLoss" in names:
        count_all = None
        if global_mining:
            def count_all(local):
                return all_reduce_sum(ctx, local.float()) / ctx.world_size
        losses["loss_cls"] = cross_entropy_loss(outputs["logits"].float(), targets, L.CE.EPSILON,
                                                L.CE.ALPHA, count_all) * L.CE.SCALE
    if "TripletLoss" in names:
        features = outputs["features"].float()
        gallery = (gather_with_grad(ctx, features), gather(ctx, targets)) if global_mining else None
        losses["loss_triplet"] = triplet_loss(features, targets, L.TRI.MARGIN, bool(L.TRI.NORM_FEAT),
                                              bool(L.TRI.HARD_MINING), gallery) * L.TRI.SCALE
    return losses
