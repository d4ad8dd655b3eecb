"""Optimizer and learning-rate schedule with fast-reid's (v1.x) semantics.

Optimizer parameter groups (``get_default_optimizer_params``): every trainable parameter gets
BASE_LR and WEIGHT_DECAY; parameters of norm layers get WEIGHT_DECAY_NORM; parameters named
``bias`` get WEIGHT_DECAY_BIAS and ``BASE_LR * BIAS_LR_FACTOR``; parameters under ``heads``
have their lr multiplied by HEADS_LR_FACTOR. Groups with equal settings are merged.

Schedule (fast-reid's two stacked schedulers, written as one closed form):

* iteration ``i < WARMUP_ITERS``: ``lr = base * warmup(i)``, linear ``f + (1 - f) * i / W``
  (or constant / exp), stepped per iteration;
* the main scheduler is stepped once at the end of every epoch ``e`` (0-based) once the
  warmup is over (``(e + 1) * iters_per_epoch > WARMUP_ITERS``) and ``e + 1 > DELAY_EPOCHS``;
  after ``n`` such steps MultiStepLR gives ``base * GAMMA ** #(STEPS <= n)``, and
  CosineAnnealingLR ``eta_min + (base - eta_min) * (1 + cos(pi * n / T)) / 2`` with
  ``T = MAX_EPOCH - max(ceil(WARMUP_ITERS / iters_per_epoch), DELAY_EPOCHS)``.

So, as in fast-reid, STEPS count epochs of the main scheduler, which starts when the warmup has
ended: with a warmup of two epochs, ``STEPS: [40]`` decays the lr after epoch 42. The schedule
is a pure function of (iteration, epoch), so resuming needs no scheduler state beyond them.
"""

from __future__ import annotations

import bisect
import math
import re

import torch
from torch import nn

from reid_export.errors import ReidExportError

_NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm,
               nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LayerNorm, nn.LocalResponseNorm)
SCHEDULERS = ("MultiStepLR", "CosineAnnealingLR")


def freeze_patterns(cfg) -> list[re.Pattern]:
    if int(cfg.SOLVER.FREEZE_ITERS) <= 0:
        return []
    return [re.compile(name) for name in cfg.MODEL.FREEZE_LAYERS]


def param_groups(cfg, model: nn.Module) -> list[dict]:
    s = cfg.SOLVER
    base_lr = float(s.BASE_LR)
    patterns = freeze_patterns(cfg)
    groups: dict[tuple, dict] = {}
    seen = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            lr, wd = base_lr, float(s.WEIGHT_DECAY)
            if isinstance(module, _NORM_TYPES):
                wd = float(s.WEIGHT_DECAY_NORM)
            if param_name == "bias":
                lr = base_lr * float(s.BIAS_LR_FACTOR)
                wd = float(s.WEIGHT_DECAY_BIAS)
            if module_name.split(".")[0] == "heads":
                lr *= float(s.HEADS_LR_FACTOR)
            full = f"{module_name}.{param_name}" if module_name else param_name
            frozen = any(p.match(full) for p in patterns)
            key = (lr, wd, frozen)
            group = groups.setdefault(key, {"params": [], "names": [], "lr": lr, "initial_lr": lr,
                                            "weight_decay": wd, "freeze": frozen})
            group["params"].append(param)
            group["names"].append(full)
    return list(groups.values())


def build_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    groups = param_groups(cfg, model)
    name = cfg.SOLVER.OPT
    if name == "SGD":
        return torch.optim.SGD(groups, lr=float(cfg.SOLVER.BASE_LR), momentum=float(cfg.SOLVER.MOMENTUM),
                               nesterov=bool(cfg.SOLVER.NESTEROV) and float(cfg.SOLVER.MOMENTUM) > 0)
    if name in ("Adam", "AdamW"):
        return getattr(torch.optim, name)(groups, lr=float(cfg.SOLVER.BASE_LR))
    raise ReidExportError(f"SOLVER.OPT {name!r} is not supported; use Adam, AdamW or SGD")


def warmup_factor(method: str, iteration: int, warmup_iters: int, factor: float) -> float:
    if iteration >= warmup_iters:
        return 1.0
    if method == "constant":
        return factor
    if method == "linear":
        alpha = iteration / warmup_iters
        return factor * (1 - alpha) + alpha
    if method == "exp":
        return factor ** (1 - iteration / warmup_iters)
    raise ReidExportError(f"SOLVER.WARMUP_METHOD {method!r} is not supported; use linear, constant or exp")


class LRSchedule:
    """``lr(group, iteration, epoch)`` for fast-reid's warmup + per-epoch main scheduler."""

    def __init__(self, cfg, iters_per_epoch: int):
        s = cfg.SOLVER
        if s.SCHED not in SCHEDULERS:
            raise ReidExportError(f"SOLVER.SCHED {s.SCHED!r} is not supported; use one of {', '.join(SCHEDULERS)}")
        self.sched = s.SCHED
        self.iters_per_epoch = int(iters_per_epoch)
        self.warmup_iters = int(s.WARMUP_ITERS)
        self.warmup_factor = float(s.WARMUP_FACTOR)
        self.warmup_method = s.WARMUP_METHOD
        self.delay_epochs = int(s.DELAY_EPOCHS)
        self.steps = sorted(int(x) for x in s.STEPS)
        self.gamma = float(s.GAMMA)
        self.eta_min = float(s.ETA_MIN_LR)
        warm_epochs = math.ceil(self.warmup_iters / self.iters_per_epoch) if self.warmup_iters > 0 else 0
        self.t_max = int(s.MAX_EPOCH) - max(warm_epochs, self.delay_epochs)
        warmup_factor(self.warmup_method, 0, max(self.warmup_iters, 1), self.warmup_factor)  # validate

    def main_steps(self, epoch: int) -> int:
        """How many times fast-reid has stepped the main scheduler before ``epoch`` (0-based) starts."""
        count = 0
        for done in range(epoch):
            if (done + 1) * self.iters_per_epoch > self.warmup_iters and done + 1 > self.delay_epochs:
                count += 1
        return count

    def lr(self, base_lr: float, iteration: int, epoch: int) -> float:
        n = self.main_steps(epoch)
        if self.sched == "MultiStepLR":
            main = base_lr * self.gamma ** bisect.bisect_right(self.steps, n)
        elif n == 0:
            main = base_lr
        else:
            t_max = max(self.t_max, 1)
            main = self.eta_min + (base_lr - self.eta_min) * (1 + math.cos(math.pi * min(n, t_max) / t_max)) / 2
        if self.warmup_iters > 0:
            main *= warmup_factor(self.warmup_method, iteration, self.warmup_iters, self.warmup_factor)
        return main

    def apply(self, optimizer: torch.optim.Optimizer, iteration: int, epoch: int) -> float:
        """Set every group's lr for this iteration; returns the lr of the first (largest) group."""
        lrs = []
        for group in optimizer.param_groups:
            group["lr"] = self.lr(group["initial_lr"], iteration, epoch)
            lrs.append((len(group["params"]), group["lr"]))
        return max(lrs)[1] if lrs else 0.0

    def state_dict(self, iteration: int, epoch: int) -> dict:
        return {"name": self.sched, "iteration": iteration, "epoch": epoch,
                "iters_per_epoch": self.iters_per_epoch, "last_epoch": self.main_steps(epoch)}
