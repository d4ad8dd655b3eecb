"""extract --engine ray on a folder of a few thousand crops: same bits as a local extract, and a
killed run resumes.

1. ``reid-export extract`` in one process, torch on ``--threads`` threads (the reference);
2. ``reid-export extract --engine ray --workers W --threads-per-worker T``, killed (SIGKILL to its
   process group, Ray's processes included) once a third of the shards are written;
3. the same command again: it must report the shards it reused, finish the rest, and write a
   feature matrix and file list equal to (1) bit for bit.

The model is a BoT-R18 (random weights with a trained model's numerics, ``common.random_checkpoint``; 128x64 input)
unless ``--model`` names one. Prints a table and writes JSON.

    python benchmarks/ray_extract_bench.py ../shared/data/cuhk03-labeled/Market-1501-v15.09.15/bounding_box_train \\
        --workdir /tmp/ray_bench -o benchmarks/ray_extract_bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import common
from common import REPO
from reid_export.report import format_table


def make_model(path: Path) -> Path:
    return common.random_checkpoint(REPO / "configs/Market1501/bagtricks_R18.yml", path,
                                    opts=["INPUT.SIZE_TEST", "[128, 64]"], name="r18")[0]


def cli(args, env, **kw):
    """``reid-export ARGS`` started in its own process group (so that the kill reaches Ray's processes)."""
    return subprocess.Popen(common.cli_command(*args), env=env, start_new_session=True, **kw)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("images", type=Path)
    ap.add_argument("--model", type=Path)
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the local run and of each worker")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--shard-size", type=int, default=256)
    ap.add_argument("-o", "--output", type=Path)
    args = ap.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    model = args.model or make_model(args.workdir / "bot_r18_128x64.pth")
    env = common.cli_env(OMP_NUM_THREADS=str(args.threads))
    n_files = len([p for p in args.images.iterdir() if p.suffix.lower() in (".jpg", ".png", ".jpeg", ".bmp")])
    n_shards = (n_files + args.shard_size - 1) // args.shard_size
    extract_opts = ["--batch-size", args.batch_size, "--no-progress"]
    local, ray_out = args.workdir / "local.npy", args.workdir / "ray.npy"
    for p in (local, ray_out, local.with_suffix(".json"), ray_out.with_suffix(".json")):
        p.unlink(missing_ok=True)
    import shutil

    shutil.rmtree(args.workdir / "ray.npy.shards", ignore_errors=True)

    load = {"start": common.load_average()}
    t0 = time.perf_counter()
    assert cli(["extract", model, args.images, "-o", local, *extract_opts], env).wait() == 0
    local_s = time.perf_counter() - t0

    ray_args = ["extract", model, args.images, "-o", ray_out, "--engine", "ray", "--workers", args.workers,
                "--threads-per-worker", args.threads, "--shard-size", args.shard_size, *extract_opts]
    shards = args.workdir / "ray.npy.shards"
    t0 = time.perf_counter()
    proc = cli(ray_args, env, stderr=subprocess.PIPE)
    while proc.poll() is None and len(list(shards.glob("shard-*.json"))) < max(1, n_shards // 3):
        time.sleep(0.2)
    killed_after = time.perf_counter() - t0
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(2)  # let the killed run's last worker die
    done_at_kill = len(list(shards.glob("shard-*.json")))
    load["kill"] = common.load_average()
    t0 = time.perf_counter()
    resumed = cli(ray_args, env, stderr=subprocess.PIPE)
    _, err = resumed.communicate()
    resume_s = time.perf_counter() - t0
    err = err.decode()
    assert resumed.returncode == 0, err[-2000:]
    m = re.search(r"resumed: (\d+) of (\d+) shards", err)
    reused = int(m.group(1)) if m else 0
    load["end"] = common.load_average()

    a, b = np.load(local), np.load(ray_out)
    ja, jb = (json.loads(p.with_suffix(".json").read_text()) for p in (local, ray_out))
    same_order = ja["files"] == jb["files"]
    same_bits = bool(a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b))
    rows = [["local extract (1 process)", f"{args.threads} thread(s)", local_s, n_files / local_s, "-", "-"],
            ["ray, killed", f"{args.workers} workers x {args.threads}", killed_after, "-", done_at_kill, "-"],
            ["ray, rerun (resume)", f"{args.workers} workers x {args.threads}", resume_s,
             (n_files - reused * args.shard_size) / resume_s, reused, f"order {same_order}, bits {same_bits}"]]
    print(format_table(["run", "workers", "wall s", "img/s", "shards done", "equal to local"], rows, floatfmt=".4g"))
    print(f"{n_files} images, {n_shards} shards of {args.shard_size}; features {a.shape}; load {load}")
    doc = {"images": str(args.images), "num_images": n_files, "model": str(model), "workers": args.workers,
           "threads": args.threads, "batch_size": args.batch_size, "shard_size": args.shard_size,
           "local_s": local_s, "ray_killed_after_s": killed_after, "shards_at_kill": done_at_kill,
           "ray_resume_s": resume_s, "shards_reused": reused, "shards": n_shards, "same_order": same_order,
           "same_bits": same_bits, "loadavg": load, "passed": bool(same_order and same_bits and reused >= 1)}
    if args.output:
        common.write_json(args.output, doc, command=common.command_line(__file__, argv))
    print("PASS" if doc["passed"] else "FAIL")
    return 0 if doc["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
