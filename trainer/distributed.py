"""Training on several processes with ``torchrun`` (DistributedDataParallel), as fast-reid does.

``torchrun --nproc-per-node N [--nnodes M --rdzv-backend c10d --rdzv-endpoint HOST:PORT] --no-python
reid-train --config ...`` starts N x M copies of ``reid-train``; each finds its place in the
environment variables torchrun sets (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``)
and joins the default process group: NCCL on CUDA (one GPU per process, ``cuda:LOCAL_RANK``), gloo
on the CPU. Without those variables ``reid-train`` runs in one process exactly as before.

What makes N processes compute what one process computes (the tests compare the weights):

* the sampler draws the same global P x K batch from one seed on every rank and gives rank ``r``
  its ``r``-th slice of whole identities (:class:`reid_train.sampler.DistributedBatchSampler`); each
  image's augmentation is seeded by its position in the *global* batch;
* every rank's loss is its share of the global loss, defined so that the mean over the ranks is
  the single-process loss; DistributedDataParallel averages the gradients over the ranks, so the
  update is the single-process one. With ``MODEL.LOSSES.TRI.GLOBAL_MINING`` the triplet loss mines
  each local anchor's hardest positive/negative over the global batch (:func:`gather_with_grad`, a
  gather whose backward returns every rank's gradient to the features' owner) and cross entropy is
  divided by the global count; without it each rank mines within its own slice, as fast-reid does
  (its cross-rank gather is commented out);
* ``syncBN`` (MODEL.BACKBONE.NORM / MODEL.HEADS.NORM) normalises over the global batch: torch's
  ``SyncBatchNorm`` on CUDA, and on the CPU, where torch's refuses (it needs a GPU), the small
  gloo-capable :class:`GlooSyncBatchNorm` below (a gather of each rank's count, mean and
  variance that carries gradients).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from reid_export.errors import ReidExportError

ENV_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK")


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: one process (``world_size`` 1, no process group) or a torchrun rank."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    backend: str = ""
    launched: bool = False  # started by torchrun (a process group exists)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.launched and self.world_size > 1

    def describe(self) -> str:
        if not self.launched:
            return "world size 1, one process (no torchrun)"
        return f"world size {self.world_size}, backend {self.backend}, rank {self.rank} (local {self.local_rank})"


SINGLE = DistContext()


def launched_by_torchrun() -> bool:
    return all(k in os.environ for k in ENV_VARS)


def init_distributed(device: str, timeout_minutes: float = 30.0) -> DistContext:
    """Join the process group torchrun prepared (gloo on the CPU, NCCL on CUDA); SINGLE without torchrun."""
    if not launched_by_torchrun():
        return SINGLE
    try:
        world_size, rank, local_rank = (int(os.environ[k]) for k in ENV_VARS)
    except ValueError:
        raise ReidExportError(f"torchrun's {', '.join(ENV_VARS)} must be integers, got "
                              + ", ".join(repr(os.environ[k]) for k in ENV_VARS)) from None
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if dist.is_initialized():
        return DistContext(dist.get_world_size(), dist.get_rank(), local_rank, dist.get_backend(), True)
    if backend == "nccl":
        if local_rank >= torch.cuda.device_count():
            raise ReidExportError(
                f"torchrun started local rank {local_rank} but this node has {torch.cuda.device_count()} GPU(s): "
                "--nproc-per-node must not exceed the GPUs (one GPU per process), or set MODEL.DEVICE cpu")
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    return DistContext(world_size, rank, local_rank, backend, True)


def shutdown(ctx: DistContext) -> None:
    if ctx.launched and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def broadcast_object(ctx: DistContext, obj):
    """Rank 0's ``obj`` on every rank."""
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_mean(ctx: DistContext, values: torch.Tensor) -> torch.Tensor:
    """The mean over the ranks of a (detached) tensor; the tensor itself in one process."""
    if not ctx.distributed:
        return values
    out = values.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / ctx.world_size


def all_reduce_sum(ctx: DistContext, values: torch.Tensor) -> torch.Tensor:
    if not ctx.distributed:
        return values
    out = values.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward sums every rank's gradient of the gathered tensor and
    returns this rank's slice (gloo has no reduce_scatter: an all_reduce then a slice)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        world, rank = dist.get_world_size(), dist.get_rank()
        ctx.rank, ctx.rows = rank, tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_with_grad(ctx: DistContext, tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's ``tensor`` concatenated in rank order (equal shapes); gradients flow back to each owner."""
    if not ctx.distributed:
        return tensor
    return _GatherWithGrad.apply(tensor)


def gather(ctx: DistContext, tensor: torch.Tensor) -> torch.Tensor:
    """The same without gradients (labels)."""
    if not ctx.distributed:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(ctx.world_size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


# --- synchronised batch norm on the CPU -------------------------------------------------------------

def sync_batch_norm(x: torch.Tensor, bn: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    """Training-mode batch norm over the samples of every rank; updates ``bn``'s running statistics with
    the global ones. Each rank's count, mean and (biased) variance are gathered with gradients (one
    collective) and combined as Chan et al.'s parallel variance, in float32: summing x and x^2 instead
    loses too many digits to the cancellation in E[x^2] - E[x]^2."""
    dims = [0] + list(range(2, x.dim()))
    c = x.shape[1]
    xf = x.float()
    local_var, local_mean = torch.var_mean(xf, dim=dims, unbiased=False)
    count = torch.full((1,), float(x.numel() // c), dtype=torch.float32, device=x.device)
    parts = _GatherWithGrad.apply(torch.cat([count, local_mean, local_var]).unsqueeze(0))  # [world, 1 + 2C]
    counts, means, variances = parts[:, :1], parts[:, 1:1 + c], parts[:, 1 + c:]
    n = counts.sum()
    mean = (counts * means).sum(0) / n
    var = (counts * (variances + (means - mean) ** 2)).sum(0) / n
    if bn.training and bn.track_running_stats:
        with torch.no_grad():
            if bn.num_batches_tracked is not None:
                bn.num_batches_tracked.add_(1)
            momentum = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
            unbiased = var * (n / (n - 1).clamp(min=1))
            bn.running_mean.mul_(1 - momentum).add_(mean.to(bn.running_mean.dtype), alpha=momentum)
            bn.running_var.mul_(1 - momentum).add_(unbiased.to(bn.running_var.dtype), alpha=momentum)
    shape = [1, c] + [1] * (x.dim() - 2)
    y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + bn.eps)
    if bn.affine:
        y = y * bn.weight.view(shape) + bn.bias.view(shape)
    return y.to(x.dtype)


class GlooSyncBatchNorm(nn.Module):
    """Mixin for a BatchNorm class: synchronised over the process group in training, itself otherwise.

    Made by :func:`convert_sync_batchnorm` as a subclass of the layer's own class, so parameter names,
    frozen flags and ``isinstance`` checks (weight decay of norm layers) are unchanged.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D401
        if self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return sync_batch_norm(x, self)
        return super().forward(x)


_SYNC_CLASSES: dict[type, type] = {}


def _sync_class(cls: type) -> type:
    if cls not in _SYNC_CLASSES:
        _SYNC_CLASSES[cls] = type(f"Sync{cls.__name__}", (GlooSyncBatchNorm, cls), {})
    return _SYNC_CLASSES[cls]


def convert_sync_batchnorm(module: nn.Module, use_torch: bool) -> int:
    """Make every BatchNorm layer under ``module`` synchronised, in place; returns how many.

    ``use_torch`` (CUDA): torch's ``nn.SyncBatchNorm``; else (CPU, gloo) :class:`GlooSyncBatchNorm`."""
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)) and not isinstance(
                child, GlooSyncBatchNorm):
            if use_torch:
                setattr(module, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
            else:
                child.__class__ = _sync_class(type(child))
            count += 1
        else:
            count += convert_sync_batchnorm(child, use_torch)
    return count


def check_divisible(ctx: DistContext, batch_size: int, num_instances: int | None) -> None:
    """Each rank gets whole identities: the world size divides the batch and its identities."""
    if ctx.world_size <= 1:
        return
    if batch_size % ctx.world_size:
        raise ReidExportError(
            f"SOLVER.IMS_PER_BATCH ({batch_size}) is the global batch; the world size ({ctx.world_size} processes) "
            "must divide it: change IMS_PER_BATCH or --nproc-per-node/--nnodes")
    if num_instances:
        pids = batch_size // num_instances
        if pids % ctx.world_size:
            raise ReidExportError(
                f"a batch of {pids} identities (SOLVER.IMS_PER_BATCH {batch_size} / DATALOADER.NUM_INSTANCE "
                f"{num_instances}) cannot be split into whole identities over {ctx.world_size} processes: "
                "the world size must divide the number of identities per batch")
