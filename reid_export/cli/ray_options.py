"""``--engine ray`` and its options, shared by ``extract`` and ``index``."""

from __future__ import annotations

import functools

import click

from .common import positive_int


def ray_engine_options(func):
    @click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
                  help="ray: encode as Ray Data batches on Ray workers, in resumable shards beside the output "
                       "(pip install 'reid-export[ray]').")
    @click.option("--ray-address", help="Ray cluster to join (e.g. ray://head:10001 or auto); default: a local Ray.")
    @click.option("--workers", default=1, show_default=True, type=int, callback=positive_int,
                  help="Ray workers; each opens the model once.")
    @click.option("--threads-per-worker", type=int, callback=positive_int,
                  help="CPU threads (and Ray CPUs) per worker; default: this process's torch thread count, so the "
                       "features are the same bits as a local run.")
    @click.option("--gpus-per-worker", default=0.0, show_default=True, type=float,
                  help="GPUs per Ray worker (with --device cuda).")
    @click.option("--shard-size", default=1024, show_default=True, type=int, callback=positive_int,
                  help="Files per shard (a multiple of --batch-size); a rerun skips finished shards.")
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        return func(*args, **kwargs)

    return wrapper


def ray_options(ray_address, workers, threads_per_worker, gpus_per_worker, shard_size, **encoding):
    """The :class:`~reid_export.runtime.ray_extract.RayOptions` of the ``--engine ray`` flags and the command's
    encoding options (``config``, ``opts``, ``device``, ``allow_partial``, ``batch_size``, ``flip_test``,
    ``on_error``, ``progress``)."""
    from ..runtime.ray_extract import RayOptions

    return RayOptions(address=ray_address, num_workers=workers, cpus_per_worker=threads_per_worker,
                      gpus_per_worker=gpus_per_worker, shard_size=shard_size, **encoding)
