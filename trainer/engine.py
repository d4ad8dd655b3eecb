"""The training loop: data, model, optimizer, schedule, checkpoints, resume, evaluation, logs.

Output folder (OUTPUT_DIR, or ``--output-dir``):

* ``config.yaml``: the full config of the run (NUM_CLASSES filled in from the data), fast-reid's keys
  only, so that fast-reid's ``get_cfg().merge_from_file`` takes it unchanged;
  ``config.reid-export.yaml`` beside it holds our keys (seed, dataset root, interpolation, stem
  padding), and ``load_config("config.yaml")`` merges it;
* ``log.txt``: everything printed, appended across resumed runs;
* ``model_{epoch:04d}.pth`` every CHECKPOINT_PERIOD epochs (0-based epoch, as fast-reid names
  them), ``model_final.pth`` at the end, ``model_best.pth`` at the best ``(Rank-1 + mAP) / 2``;
  each holds ``model`` (fast-reid's key names: its ``Checkpointer`` loads it), reid-train's own
  training state (``optimizer``, ``scheduler``, ``epoch``, ``iteration``: fast-reid cannot resume
  from it), the embedded config (``cfg``, fast-reid's keys; ``reid_export_cfg``, ours) and data
  config, the seed and sampler position, the torch RNG state and the best score, written atomically; ``last_checkpoint`` names the newest one (as fast-reid's);
* ``metrics_{epoch:04d}.json`` per evaluation (``metrics_eval.json`` for ``--eval-only``);
* ``history.jsonl``: one line of training statistics per epoch (losses, lr, img/s, seconds).

Resuming loads the newest checkpoint and continues with the next epoch: the batches and the
augmentation of an epoch depend only on (seed, epoch), the lr only on (iteration, epoch), so the
result equals an uninterrupted run; a kill loses at most the epochs since the last checkpoint.

Under ``torchrun`` (:mod:`reid_train.distributed`) every process trains its slice of each global batch
in DistributedDataParallel; rank 0 alone logs, evaluates (alone, on the whole query/gallery) and
writes the output folder, while the other ranks wait for it. The sampler, the augmentation seeds and
the schedule depend on the global batch only, so ``--resume`` continues a run with the same world
size (or, with global mining and syncBN, another one) as if it had never stopped.
"""

from __future__ import annotations

import inspect
import json
import logging
import re
import secrets
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from reid_export.checkpoint import (embedded_config, extract_state_dict, load_weights, read_checkpoint,
                                    resolve_interpolation, resolve_stem, save_checkpoint)
from reid_export.config import CfgNode, write_config
from reid_export.console import to_flags
from reid_export.data_config import data_config_from_cfg
from reid_export.errors import ReidExportError
from reid_export.fileio import atomic_write_json, atomic_write_text
from reid_export.modeling import build_model

from .datasets import TrainSet, collate, load_train_items, worker_init
from .distributed import (SINGLE, DistContext, all_reduce_mean, barrier, broadcast_object, check_divisible,
                          convert_sync_batchnorm, init_distributed, shutdown)
from .evaluator import evaluate, format_results
from .losses import check_loss_names, compute_losses
from .pretrain import load_pretrained_backbone
from .sampler import build_batch_sampler
from .solver import LRSchedule, build_optimizer
from .transforms import TrainTransform

log = logging.getLogger("reid-train")
_CKPT_RE = re.compile(r"^model_(\d{4,})\.pth$")


class _TqdmHandler(logging.Handler):
    def emit(self, record):
        try:
            tqdm.write(to_flags(self.format(record)), file=sys.stderr)  # `resume` -> --resume under reid-train
        except Exception:  # noqa: BLE001 - logging must never break training
            self.handleError(record)


def setup_logging(output_dir: Path, ctx: DistContext = SINGLE) -> logging.Logger:
    log.setLevel(logging.INFO)
    log.propagate = False
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    if not ctx.is_main:  # rank 0 alone logs; the others say only what stops them
        console = _TqdmHandler()
        console.setLevel(logging.ERROR)
        console.setFormatter(logging.Formatter(f"[reid-train rank {ctx.rank}] %(message)s"))
        log.addHandler(console)
        return log
    file_handler = logging.FileHandler(output_dir / "log.txt", encoding="utf-8")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    console = _TqdmHandler()
    console.setFormatter(logging.Formatter("[reid-train] %(message)s"))
    log.addHandler(file_handler)
    log.addHandler(console)
    return log


def close_logging() -> None:
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()


def pick_device(cfg, ctx: DistContext = SINGLE) -> str:
    device = str(cfg.MODEL.DEVICE)
    if device.startswith("cuda"):
        if torch.cuda.is_available():
            return f"cuda:{ctx.local_rank}" if ctx.launched else device
        log.warning("MODEL.DEVICE is %s but CUDA is not available here; training on the CPU "
                    "(set MODEL.DEVICE cpu to silence this)", device)
        return "cpu"
    if device != "cpu":
        raise ReidExportError(f"MODEL.DEVICE must be cpu or cuda[:N], got {device!r}")
    return "cpu"


def find_last_checkpoint(output_dir: Path) -> Path | None:
    """The checkpoint named in ``last_checkpoint``, else model_final.pth, else the highest model_NNNN.pth."""
    marker = output_dir / "last_checkpoint"
    if marker.is_file():
        candidate = output_dir / marker.read_text(encoding="utf-8").strip()
        if candidate.is_file():
            return candidate
    if (output_dir / "model_final.pth").is_file():
        return output_dir / "model_final.pth"
    numbered = sorted((int(m.group(1)), p) for p in output_dir.glob("model_*.pth") if (m := _CKPT_RE.match(p.name)))
    return numbered[-1][1] if numbered else None


def remove_partial_checkpoints(output_dir: Path) -> list[Path]:
    """Delete the hidden ``.NAME.pth.XXXX.tmp`` files a run killed during a checkpoint write left behind.

    They are never loaded (checkpoints are renamed into place only when complete); this only frees the
    disk space. Called on ``--resume``, when no other run should be writing into ``output_dir``.
    """
    removed = []
    for tmp in sorted(output_dir.glob(".*.pth.*.tmp")):
        try:
            tmp.unlink()
            removed.append(tmp)
        except OSError:
            pass
    return removed


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


class LayerFreezer:
    """MODEL.FREEZE_LAYERS for the first SOLVER.FREEZE_ITERS iterations (fast-reid's LayerFreeze):
    their norm layers in eval mode and their parameters not updated."""

    def __init__(self, cfg, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.iters = int(cfg.SOLVER.FREEZE_ITERS)
        self.names = list(cfg.MODEL.FREEZE_LAYERS) if self.iters > 0 else []
        children = dict(model.named_children())
        for name in self.names:
            if name not in children:
                log.warning("MODEL.FREEZE_LAYERS: %r is not a part of the model (%s); it is not frozen",
                            name, ", ".join(children))
        self.modules = [children[n] for n in self.names if n in children]
        self.params = [p for g in optimizer.param_groups if g.get("freeze") for p in g["params"]]
        self.frozen = False

    def update(self, iteration: int) -> None:
        want = bool(self.names) and iteration < self.iters
        if want and not self.frozen:
            for p in self.params:
                p.requires_grad_(False)
            self.frozen = True
            log.info("freezing %s for the first %d iterations", ", ".join(self.names), self.iters)
        elif not want and self.frozen:
            for p in self.params:
                p.requires_grad_(True)
            self.frozen = False
            log.info("unfreezing %s at iteration %d", ", ".join(self.names), iteration)
        self.apply_mode()

    def apply_mode(self) -> None:
        if self.frozen:
            for m in self.modules:
                m.eval()


def _init_weights(cfg, model) -> str:
    """MODEL.WEIGHTS (fine-tuning), else the ImageNet backbone of PRETRAIN_PATH, else from scratch."""
    if cfg.MODEL.WEIGHTS:
        state = extract_state_dict(read_checkpoint(cfg.MODEL.WEIGHTS), cfg.MODEL.WEIGHTS)
        load_weights(model, state, cfg.MODEL.WEIGHTS)
        log.info("initialised from MODEL.WEIGHTS %s", cfg.MODEL.WEIGHTS)
        return f"weights:{cfg.MODEL.WEIGHTS}"
    bb = cfg.MODEL.BACKBONE
    if bb.PRETRAIN and bb.PRETRAIN_PATH:
        load_pretrained_backbone(model.backbone, bb.PRETRAIN_PATH)
        return f"imagenet:{bb.PRETRAIN_PATH}"
    if bb.PRETRAIN:
        log.warning("MODEL.BACKBONE.PRETRAIN is True but PRETRAIN_PATH is empty and nothing can be downloaded "
                    "here: training starts FROM SCRATCH (random weights). Set MODEL.BACKBONE.PRETRAIN_PATH to a "
                    "local ImageNet ResNet file (torchvision or IBN-Net layout) for the usual accuracy")
    elif bb.PRETRAIN_PATH:
        log.warning("MODEL.BACKBONE.PRETRAIN_PATH is set but PRETRAIN is False: not loaded; training from scratch")
    else:
        log.info("training from scratch (MODEL.BACKBONE.PRETRAIN False)")
    return "scratch"


def _warn_unsupported(cfg) -> None:
    if cfg.TEST.PRECISE_BN.ENABLED:
        log.warning("TEST.PRECISE_BN is not implemented by reid-train; ignored")
    if cfg.KD.MODEL_CONFIG or cfg.KD.EMA.ENABLED:
        log.warning("KD settings are not implemented by reid-train; ignored")


def run(cfg: CfgNode, *, resume: bool = False, eval_only: bool = False, progress: bool = True,
        model_name: str = "", on_epoch_end: Callable[[int], None] | None = None) -> dict:
    """Train (or only evaluate) as the config says; returns a summary dict."""
    output_dir = Path(cfg.OUTPUT_DIR).expanduser()
    output_dir.mkdir(parents=True, exist_ok=True)
    cuda = str(cfg.MODEL.DEVICE).startswith("cuda") and torch.cuda.is_available()
    ctx = init_distributed("cuda" if cuda else "cpu")
    setup_logging(output_dir, ctx)
    try:
        return _run(cfg, output_dir, resume, eval_only, progress and ctx.is_main, model_name, on_epoch_end, ctx)
    finally:
        close_logging()
        shutdown(ctx)


def _run(cfg, output_dir, resume, eval_only, progress, model_name, on_epoch_end, ctx=SINGLE) -> dict:
    """The run along its seams: restore (:func:`_restore`, :func:`_resolve_seed`), build (:func:`_build`),
    then per epoch :func:`_train_epoch` and :func:`_evaluate_and_save`."""
    log.info("reid-train, %s: %s", ctx.describe(), " ".join(sys.argv[1:]) or "(library call)")
    device = pick_device(cfg, ctx)
    check_loss_names(cfg)
    _warn_unsupported(cfg)
    if device.startswith("cuda"):
        torch.backends.cudnn.benchmark = bool(cfg.CUDNN_BENCHMARK)

    ckpt_path, state = _restore(output_dir, resume, ctx)
    seed = _resolve_seed(cfg, state, ctx)
    log.info("seed %d, device %s, output %s", seed, device, output_dir)

    if eval_only:
        if not ctx.is_main:  # rank 0 evaluates alone
            barrier(ctx)
            return {"output_dir": str(output_dir), "results": None, "seed": seed, "rank": ctx.rank}
        try:
            return _eval_only(cfg, output_dir, state, ckpt_path, device, seed, progress, model_name)
        finally:
            barrier(ctx)

    run = _build(cfg, output_dir, state, ckpt_path, device, seed, model_name, ctx)
    if run.start_epoch >= run.max_epoch:
        log.info("nothing to do: the checkpoint already finished all %d epochs (raise SOLVER.MAX_EPOCH to go on)",
                 run.max_epoch)
    try:
        for epoch in range(run.start_epoch, run.max_epoch):
            stats = _train_epoch(run, epoch, progress)
            _evaluate_and_save(run, epoch, stats, progress)
            barrier(ctx)  # the other ranks wait while rank 0 evaluates and writes
            if on_epoch_end is not None:
                on_epoch_end(epoch)
    except KeyboardInterrupt:
        last = find_last_checkpoint(output_dir)
        log.warning("interrupted; the last checkpoint is %s: continue with `resume`",
                    last.name if last else "(none yet)")
        raise
    return {"output_dir": str(output_dir), "history": run.history, "results": run.last_results,
            "best_metric": run.best, "seed": seed, "iterations_per_epoch": run.iters_per_epoch,
            "world_size": ctx.world_size, "rank": ctx.rank}


# ---------------------------------------------------------------------------------------------- restore
def _restore(output_dir: Path, resume: bool, ctx: DistContext) -> tuple[Path | None, dict | None]:
    """With ``resume``: the newest checkpoint and its contents (None, None when there is none, or without
    ``resume``); partial checkpoint writes of an interrupted run are removed first."""
    state = None
    ckpt_path = find_last_checkpoint(output_dir) if resume else None
    if resume and ctx.is_main:
        for tmp in remove_partial_checkpoints(output_dir):
            log.info("removed %s, a partial checkpoint from an interrupted write", tmp.name)
    if resume and ckpt_path is None:
        log.warning("`resume`: no checkpoint in %s; starting from the beginning", output_dir)
    if ckpt_path is not None:
        state = read_checkpoint(ckpt_path)
        if not isinstance(state.get("epoch"), int):
            raise ReidExportError(f"{ckpt_path}: not a reid-train checkpoint (no epoch); cannot resume from it")
        log.info("resuming from %s (epoch %d done)", ckpt_path, state["epoch"] + 1)
    return ckpt_path, state


def _resolve_seed(cfg, state: dict | None, ctx: DistContext) -> int:
    """The checkpoint's seed when resuming, else SEED, else a drawn one (rank 0's on every rank); set into cfg."""
    if state is not None and isinstance(state.get("seed"), int):
        seed = state["seed"]
        if int(cfg.SEED) >= 0 and int(cfg.SEED) != seed:
            log.warning("SEED %d differs from the checkpoint's %d; keeping the checkpoint's", cfg.SEED, seed)
    else:
        seed = int(cfg.SEED) if int(cfg.SEED) >= 0 else secrets.randbelow(2**31)
    seed = broadcast_object(ctx, seed)  # a drawn seed is rank 0's on every rank
    cfg.SEED = seed
    return seed


# ------------------------------------------------------------------------------------------------ build
@dataclass
class _Training:
    """One training run between its steps: made by :func:`_build`, advanced by :func:`_train_epoch`
    (``iteration``, ``history``), judged and saved by :func:`_evaluate_and_save` (``best``, ``last_results``)."""

    cfg: CfgNode
    ctx: DistContext
    device: str
    output_dir: Path
    seed: int
    model: torch.nn.Module
    net: torch.nn.Module  # the model, or its DistributedDataParallel wrapper
    optimizer: torch.optim.Optimizer
    schedule: LRSchedule
    scaler: object  # torch.amp.GradScaler with AMP, else None
    freezer: LayerFreezer
    sampler: object
    loader: DataLoader
    data_config: object
    amp: bool
    channels_last: bool
    iters_per_epoch: int
    max_epoch: int
    start_epoch: int = 0
    iteration: int = 0
    best: float | None = None
    history: list = field(default_factory=list)
    last_results: dict | None = None


def _build(cfg, output_dir: Path, state: dict | None, ckpt_path: Path | None, device: str, seed: int,
           model_name: str, ctx: DistContext) -> _Training:
    """Data, model (syncBN, device, memory format), optimizer, sampler, schedule and AMP scaler, the
    checkpoint's training state when resuming, the layer freezer, the DDP wrap and the data loader."""
    items = _training_items(cfg, state, ckpt_path)
    torch.manual_seed(seed)
    model = build_model(cfg)
    init = _init_weights(cfg, model) if state is None else "resumed"
    synced = _sync_batchnorm(cfg, model, device, ctx)
    model.to(device)
    amp = bool(cfg.SOLVER.AMP.ENABLED) and device.startswith("cuda")
    channels_last = cfg.SOLVER.AMP.get("CHANNELS_LAST")
    channels_last = amp if channels_last is None else bool(channels_last)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg, model)
    transform = TrainTransform(cfg)
    mining = "global" if bool(cfg.MODEL.LOSSES.TRI.get("GLOBAL_MINING", False)) else "per-rank"
    if ctx.distributed:
        sampler_name = cfg.DATALOADER.SAMPLER_TRAIN
        check_divisible(ctx, int(cfg.SOLVER.IMS_PER_BATCH),
                        int(cfg.DATALOADER.NUM_INSTANCE) if sampler_name != "TrainingSampler" else None)
        log.info("DistributedDataParallel over %d processes (%s): %d images of each global batch per process, "
                 "triplet mining %s, synchronised BN in %s", ctx.world_size, ctx.backend,
                 int(cfg.SOLVER.IMS_PER_BATCH) // ctx.world_size, mining,
                 ", ".join(synced) or "nothing (MODEL.BACKBONE.NORM / MODEL.HEADS.NORM: BN; statistics per process)")
    sampler = build_batch_sampler(cfg, [it.pid for it in items], seed, log, ctx.world_size, ctx.rank)
    iters_per_epoch = len(sampler)
    schedule = LRSchedule(cfg, iters_per_epoch)
    if cfg.SOLVER.AMP.ENABLED and not amp:
        log.info("SOLVER.AMP.ENABLED: mixed precision needs CUDA; training in FP32 on the CPU")
    scaler = torch.amp.GradScaler("cuda", enabled=amp) if amp else None
    run = _Training(cfg=cfg, ctx=ctx, device=device, output_dir=output_dir, seed=seed, model=model, net=model,
                    optimizer=optimizer, schedule=schedule, scaler=scaler, freezer=None, sampler=sampler, loader=None,
                    data_config=None, amp=amp, channels_last=channels_last, iters_per_epoch=iters_per_epoch,
                    max_epoch=int(cfg.SOLVER.MAX_EPOCH))
    if state is not None:
        _load_training_state(run, state, ckpt_path, mining)
    run.freezer = LayerFreezer(cfg, model, optimizer)
    if ctx.distributed:
        run.net = _wrap_ddp(cfg, model, run.freezer, device, ctx)

    run.data_config = data_config_from_cfg(cfg, feat_dim=model.feat_dim, model_name=model_name or output_dir.name)
    if ctx.is_main:
        write_config(output_dir / "config.yaml", cfg)
    num_workers = int(cfg.DATALOADER.NUM_WORKERS)
    run.loader = DataLoader(TrainSet(items, transform), batch_sampler=sampler, num_workers=num_workers,
                            collate_fn=collate, worker_init_fn=worker_init if num_workers else None,
                            persistent_workers=num_workers > 0, pin_memory=device.startswith("cuda"))
    norm = "IBN" if cfg.MODEL.BACKBONE.WITH_IBN else ("syncBN" if synced else "BN")
    log.info("model %s-%s, %d iterations/epoch of %d images, epochs %d..%d, init %s, AMP %s",
             cfg.MODEL.BACKBONE.DEPTH, norm, iters_per_epoch,
             cfg.SOLVER.IMS_PER_BATCH, run.start_epoch + 1, run.max_epoch, init, "on" if amp else "off")
    return run


def _training_items(cfg, state: dict | None, ckpt_path: Path | None) -> list:
    """The training images (NUM_CLASSES set from them), the stem and interpolation the weights were
    trained with, and a warning where the config differs from the checkpoint's."""
    items, sources = load_train_items(cfg)
    num_classes = 1 + max(it.pid for it in items)
    cfg.MODEL.HEADS.NUM_CLASSES = num_classes
    log.info("training set: %d images, %d identities from %s", len(items), num_classes, ", ".join(sources))
    # The stem the weights were trained with: fast-reid's for a new run (recorded in the checkpoints'
    # config), the checkpoint's own when resuming one written before 0.2.0.
    resolve_stem(cfg, state if state is not None else {}, str(ckpt_path))
    resolve_interpolation(cfg, state if state is not None else {}, str(ckpt_path))
    if state is not None and isinstance(state.get("cfg"), str):
        old = _flatten(embedded_config(state, source=str(ckpt_path)).to_dict())
        new = _flatten(cfg.to_dict())
        differs = sorted(k for k in new if k in old and old[k] != new[k] and k != "SEED")
        if differs:
            log.warning("the config differs from the checkpoint's in: %s", ", ".join(differs))
    return items


def _sync_batchnorm(cfg, model, device: str, ctx: DistContext) -> list[str]:
    """Under DDP, synchronise the BatchNorms of the parts whose NORM is syncBN; what was converted."""
    synced = []
    if ctx.distributed:
        for part, norm in (("backbone", cfg.MODEL.BACKBONE.NORM), ("heads", cfg.MODEL.HEADS.NORM)):
            if norm == "syncBN":
                n = convert_sync_batchnorm(getattr(model, part), use_torch=device.startswith("cuda"))
                synced.append(f"{part} ({n} layers)")
    return synced


def _load_training_state(run: _Training, state: dict, ckpt_path: Path | None, mining: str) -> None:
    """A resumed run continues where the checkpoint stopped: weights, optimizer, epoch and iteration, best
    score, torch RNG, AMP scaler; warns where the run will not equal an uninterrupted one."""
    cfg, ctx, model = run.cfg, run.ctx, run.model
    load_weights(model, extract_state_dict(state, str(ckpt_path)), str(ckpt_path))
    if "optimizer" in state:
        run.optimizer.load_state_dict(state["optimizer"])
    run.start_epoch = state["epoch"] + 1
    run.iteration = int(state.get("iteration", run.start_epoch * run.iters_per_epoch))
    run.best = state.get("best_metric")
    saved_ipe = (state.get("scheduler") or {}).get("iters_per_epoch")
    if saved_ipe not in (None, run.iters_per_epoch):
        log.warning("iterations per epoch changed (%s -> %d): the training data or batch size differ from "
                    "the checkpoint's; the run will not match an uninterrupted one", saved_ipe, run.iters_per_epoch)
    rng = state.get("rng") or {}
    if isinstance(rng.get("torch"), torch.Tensor):
        torch.set_rng_state(rng["torch"])
    if run.scaler is not None and isinstance(state.get("grad_scaler"), dict):
        run.scaler.load_state_dict(state["grad_scaler"])
    saved_world = int(state.get("world_size", 1))
    if saved_world != ctx.world_size:
        same = mining == "global" and (not _has_bn(model) or
                                       cfg.MODEL.BACKBONE.NORM == cfg.MODEL.HEADS.NORM == "syncBN")
        log.warning("resuming a run of world size %d with world size %d: %s", saved_world, ctx.world_size,
                    "the global batches are the same, and with global mining and syncBN so is the computation"
                    if same else "the global batches are the same, but per-rank triplet mining and BatchNorm "
                    "statistics see other slices, so the run will not equal an uninterrupted one "
                    "(set MODEL.LOSSES.TRI.GLOBAL_MINING True and NORM syncBN for that)")


def _wrap_ddp(cfg, model, freezer: LayerFreezer, device: str, ctx: DistContext) -> torch.nn.Module:
    # buffers are not broadcast from rank 0 before every forward (fast-reid's broadcast_buffers=False);
    # newer torch names that forward_sync_buffers
    buffers = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
               inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters
               else {"broadcast_buffers": False})
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[ctx.local_rank] if device.startswith("cuda") else None, **buffers,
        # frozen layers (FREEZE_ITERS) and a classifier without CrossEntropyLoss take no gradient
        find_unused_parameters=bool(freezer.names) or "CrossEntropyLoss" not in cfg.MODEL.LOSSES.NAME)


# ------------------------------------------------------------------------------------------------ epoch
def _train_epoch(run: _Training, epoch: int, progress: bool) -> dict:
    """One epoch over the loader; appends its statistics to ``run.history`` (and, on rank 0, history.jsonl)."""
    run.sampler.epoch = epoch
    run.net.train()
    run.freezer.apply_mode()
    sums: dict[str, float] = {}
    images_seen, t_start, t_compute = 0, time.time(), 0.0
    bar = tqdm(total=run.iters_per_epoch, desc=f"epoch {epoch + 1}/{run.max_epoch}", unit="it",
               disable=not progress, leave=False, file=sys.stderr, dynamic_ncols=True)
    window = []
    for images, pids, _ in run.loader:
        t0 = time.time()
        shown, lr = _train_step(run, images, pids, epoch)
        n = images.shape[0] * run.ctx.world_size
        images_seen += n
        for key, value in shown.items():
            sums[key] = sums.get(key, 0.0) + value.detach().item() * n
        now = time.time()
        t_compute += now - t0
        window = (window + [(now, n)])[-20:]
        rate = (sum(k for _, k in window[1:]) / (window[-1][0] - window[0][0])
                if len(window) > 1 else n / max(now - t_start, 1e-9))
        bar.set_postfix_str(f"loss={shown['loss'].detach().item():.3f} lr={lr:.2e} {rate:.1f} img/s", refresh=False)
        bar.update(1)
    bar.close()
    seconds = time.time() - t_start
    stats = {k: v / max(images_seen, 1) for k, v in sums.items()}
    stats.update({"epoch": epoch, "iteration": run.iteration, "lr": lr, "images": images_seen,
                  "seconds": round(seconds, 2), "img_per_s": images_seen / max(seconds, 1e-9),
                  "compute_img_per_s": images_seen / max(t_compute, 1e-9)})
    run.history.append(stats)
    if run.ctx.is_main:
        with open(run.output_dir / "history.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(stats) + "\n")
    terms = " ".join(f"{k}={v:.4f}" for k, v in stats.items() if k.startswith("loss"))
    log.info("epoch %d/%d: %s lr=%.2e %.1f img/s (%.1f s)", epoch + 1, run.max_epoch, terms, lr,
             stats["img_per_s"], seconds)
    return stats


def _train_step(run: _Training, images, pids, epoch: int) -> tuple[dict, float]:
    """One iteration: forward, losses, backward, optimizer step; (the losses to log, the learning rate)."""
    cfg, ctx, device, optimizer = run.cfg, run.ctx, run.device, run.optimizer
    run.freezer.update(run.iteration)
    lr = run.schedule.apply(optimizer, run.iteration, epoch)
    images = images.to(device, non_blocking=True)
    if run.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    pids = pids.to(device, non_blocking=True)
    with torch.autocast("cuda", dtype=torch.float16) if run.amp else nullcontext():
        outputs = run.net(images, pids)
    losses = compute_losses(cfg, outputs, pids, ctx)
    loss = sum(losses.values())
    # the values to log: the mean over the ranks of each rank's share is the loss (losses.py)
    shown = dict(losses, loss=loss)
    if ctx.distributed:
        reduced = all_reduce_mean(ctx, torch.stack([v.detach().float() for v in shown.values()]))
        shown = dict(zip(shown, reduced))
    if not torch.isfinite(shown["loss"]):
        raise ReidExportError(
            f"the loss became {float(shown['loss'])} at epoch {epoch + 1}, iteration {run.iteration}; lower "
            "SOLVER.BASE_LR or enable SOLVER.CLIP_GRADIENTS, and resume from the last checkpoint"
        )
    clip = cfg.SOLVER.CLIP_GRADIENTS
    optimizer.zero_grad(set_to_none=True)
    if run.scaler is not None:
        run.scaler.scale(loss).backward()
        if clip.ENABLED:
            run.scaler.unscale_(optimizer)
            _clip(run.model, clip)
        run.scaler.step(optimizer)
        run.scaler.update()
    else:
        loss.backward()
        if clip.ENABLED:
            _clip(run.model, clip)
        optimizer.step()
    run.iteration += 1
    return shown, lr


# ------------------------------------------------------------------------------------ evaluate and save
def _evaluate_and_save(run: _Training, epoch: int, stats: dict, progress: bool) -> None:
    """Rank 0 evaluates after every TEST.EVAL_PERIOD epochs and the last (metrics_NNNN.json), then the
    checkpoints: model_final.pth at the end, model_NNNN.pth every CHECKPOINT_PERIOD, model_best.pth."""
    cfg, ctx = run.cfg, run.ctx
    eval_period = int(cfg.TEST.EVAL_PERIOD)
    ckpt_period = max(int(cfg.SOLVER.CHECKPOINT_PERIOD), 1)
    final = epoch == run.max_epoch - 1
    improved = False
    if ctx.is_main and (final or (eval_period > 0 and (epoch + 1) % eval_period == 0)):
        results = evaluate(run.model, cfg, run.data_config, run.device, progress)
        run.freezer.apply_mode()
        run.last_results = results
        log.info("evaluation after epoch %d:\n%s", epoch + 1, format_results(results))
        score = next(iter(results.values()))["metric"] if results else None
        improved = score is not None and (run.best is None or score > run.best)
        if improved:
            run.best = score
        atomic_write_json(run.output_dir / f"metrics_{epoch:04d}.json",
                          {"epoch": epoch, "iteration": run.iteration, "train": stats, "results": results,
                           "best_metric": run.best})
    if final:
        path = _save(run, "model_final", epoch)
        log.info("saved %s", path)
    elif (epoch + 1) % ckpt_period == 0:
        path = _save(run, f"model_{epoch:04d}", epoch)
        log.info("saved %s", path)
    if improved:
        _save(run, "model_best", epoch, mark_last=False)
        log.info("saved model_best.pth ((Rank-1 + mAP) / 2 = %.2f)", run.best)


def _save(run: _Training, name: str, epoch: int, mark_last: bool = True) -> Path:
    """Rank 0 writes ``NAME.pth`` (and names it in ``last_checkpoint`` with ``mark_last``)."""
    output_dir = run.output_dir
    if not run.ctx.is_main:
        return output_dir / f"{name}.pth"
    path = save_checkpoint(
        output_dir / f"{name}.pth", run.model, run.cfg, run.data_config,
        optimizer=run.optimizer.state_dict(), scheduler=run.schedule.state_dict(run.iteration, epoch + 1),
        epoch=epoch, iteration=run.iteration, seed=run.seed,
        sampler={"name": run.cfg.DATALOADER.SAMPLER_TRAIN, "seed": run.seed, "next_epoch": epoch + 1},
        rng={"torch": torch.get_rng_state()}, best_metric=run.best,
        grad_scaler=run.scaler.state_dict() if run.scaler is not None else None, world_size=run.ctx.world_size,
    )
    if mark_last:
        atomic_write_text(output_dir / "last_checkpoint", f"{name}.pth")
    return path


def _has_bn(model) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _clip(model, clip) -> None:
    params = [p for p in model.parameters() if p.grad is not None]
    if clip.CLIP_TYPE == "norm":
        torch.nn.utils.clip_grad_norm_(params, float(clip.CLIP_VALUE), float(clip.NORM_TYPE))
    elif clip.CLIP_TYPE == "value":
        torch.nn.utils.clip_grad_value_(params, float(clip.CLIP_VALUE))
    else:
        raise ReidExportError(f"SOLVER.CLIP_GRADIENTS.CLIP_TYPE {clip.CLIP_TYPE!r} is not supported; use norm or value")


def _eval_only(cfg, output_dir, state, ckpt_path, device, seed, progress, model_name) -> dict:
    """Evaluate MODEL.WEIGHTS, else (with --resume) the last checkpoint, else the freshly initialised model."""
    torch.manual_seed(seed)
    if cfg.MODEL.WEIGHTS:
        source = cfg.MODEL.WEIGHTS
        obj = read_checkpoint(source)
        if isinstance(obj.get("cfg"), str) and int(cfg.MODEL.HEADS.NUM_CLASSES) == 0:
            cfg.MODEL.HEADS.NUM_CLASSES = int(embedded_config(obj, source=source).MODEL.HEADS.NUM_CLASSES)
        resolve_stem(cfg, obj, source)
        resolve_interpolation(cfg, obj, source)
        model = build_model(cfg)
        load_weights(model, extract_state_dict(obj, source), source)
    elif state is not None:
        source = str(ckpt_path)
        resolve_stem(cfg, state, source)
        resolve_interpolation(cfg, state, source)
        model = build_model(cfg)
        load_weights(model, extract_state_dict(state, source), source)
    else:
        resolve_stem(cfg, {}, "untrained")
        resolve_interpolation(cfg, {}, "untrained")
        model = build_model(cfg)
        source = "untrained:" + _init_weights(cfg, model)
        log.warning("`eval_only` without MODEL.WEIGHTS or a checkpoint: evaluating the untrained model (%s)", source)
    model.to(device)
    data_config = data_config_from_cfg(cfg, feat_dim=model.feat_dim, model_name=model_name or output_dir.name)
    results = evaluate(model, cfg, data_config, device, progress)
    log.info("evaluation of %s:\n%s", source, format_results(results))
    atomic_write_json(output_dir / "metrics_eval.json", {"model": source, "seed": seed, "results": results})
    return {"output_dir": str(output_dir), "results": results, "model": source, "seed": seed}
