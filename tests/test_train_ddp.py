"""reid-train under torchrun (gloo, 2 processes on the CPU) against one process.

* the ranks' slices of every global batch are the single-process batch: the same identities, the
  same images and the same augmented pixels, whole identities per rank; clear errors otherwise;
* with global triplet mining and syncBN, 2 processes end the first epoch (3 iterations) with the
  weights of 1 process (atol 1e-5);
* a 2-process run killed (SIGKILL) after a checkpoint and resumed ends with the weights of the
  uninterrupted 2-process run.

The optimizer here is SGD at a small lr: Adam's first steps move every weight by about +-lr whatever
the size of its gradient, so on a from-scratch toy where most gradient elements are ~1e-9 it turns
float rounding into lr-sized differences (the same happens in one process when BatchNorm is
computed by a different but equal formula; benchmarks/RESULTS.md, issue 26).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import CONFIGS, REPO
from test_train import make_market, reid_train, tiny_opts

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

CPU_CONFIG = CONFIGS / "CUHK03" / "bagtricks_R18_cpu.yml"
EXACT = ("MODEL.BACKBONE.NORM", "syncBN", "MODEL.HEADS.NORM", "syncBN", "MODEL.LOSSES.TRI.GLOBAL_MINING", "True",
         "SOLVER.OPT", "SGD", "SOLVER.BASE_LR", "0.001", "SOLVER.MOMENTUM", "0.9", "TEST.EVAL_PERIOD", "0",
         "INPUT.CJ.ENABLED", "True", "INPUT.REA.PROB", "0.8")


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("datasets")
    make_market(root / "toy")
    return root


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def torchrun_cmd(nproc: int, out: Path, opts: list[str], *flags: str) -> list[str]:
    # --standalone: a c10d rendezvous on a free localhost port (tests may run side by side)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            "-m", "reid_train.cli", "--config", str(CPU_CONFIG), "--output-dir", str(out), "--no-progress",
            *flags, "--opts", *opts]


def run_torchrun(nproc: int, out: Path, opts: list[str], *flags: str) -> str:
    proc = subprocess.run(torchrun_cmd(nproc, out, opts, *flags), cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stderr


def run_single(out: Path, opts: list[str], *flags: str) -> str:
    """reid-train in this process (no torchrun variables here: one process); its stderr."""
    code, err = reid_train("--config", CPU_CONFIG, "--output-dir", out, "--no-progress", *flags, "--opts", *opts)
    assert code == 0, err
    return err


def _weights(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def _assert_close(a: dict, b: dict, atol: float) -> float:
    assert a["epoch"] == b["epoch"] and a["iteration"] == b["iteration"]
    assert set(a["model"]) == set(b["model"])
    worst = 0.0
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=0, atol=atol, msg=key)
        if value.is_floating_point():
            worst = max(worst, float((b["model"][key] - value).abs().max()))
    return worst


# --- the sampler: one global batch, sliced ---------------------------------------------------------

def _cfg(root: Path, *extra):
    from reid_export.config import load_config
    return load_config(CPU_CONFIG, tiny_opts(root, *extra))


def test_rank_slices_make_up_the_single_process_batch(toy_root):
    from reid_train.datasets import TrainSet, load_train_items
    from reid_train.sampler import DistributedBatchSampler, build_batch_sampler
    from reid_train.transforms import TrainTransform

    cfg = _cfg(toy_root, "INPUT.CJ.ENABLED", "True", "INPUT.REA.PROB", "0.8")
    items, _ = load_train_items(cfg)
    labels = [it.pid for it in items]
    single = build_batch_sampler(cfg, labels, 7)
    ranks = [build_batch_sampler(cfg, labels, 7, world_size=2, rank=r) for r in range(2)]
    assert all(isinstance(s, DistributedBatchSampler) and len(s) == len(single) for s in ranks)
    data = TrainSet(items, TrainTransform(cfg))
    for epoch in (0, 3):
        for s in (single, *ranks):
            s.epoch = epoch
        for whole, part0, part1 in zip(single, *ranks):
            assert part0 + part1 == whole  # same images, same augmentation seeds, same order
            pids = [[labels[i] for i, _ in part] for part in (part0, part1)]
            assert not set(pids[0]) & set(pids[1])  # whole identities per rank
            assert all(pids[r].count(p) == 4 for r in range(2) for p in pids[r])
        # the augmented pixels of a rank's sample are those of the same global sample in one process
        index, seed = part1[-1]
        np.testing.assert_array_equal(data[(index, seed)][0], data[whole[-1]][0])


def test_world_size_must_split_the_batch_into_whole_identities(toy_root):
    from reid_export.errors import ReidExportError
    from reid_train.distributed import DistContext, check_divisible
    from reid_train.sampler import build_batch_sampler

    cfg = _cfg(toy_root)
    labels = [p for p in range(8) for _ in range(6)]
    with pytest.raises(ReidExportError, match="world size .3. must divide SOLVER.IMS_PER_BATCH .16."):
        build_batch_sampler(cfg, labels, 0, world_size=3, rank=0)
    cfg.SOLVER.IMS_PER_BATCH = 12  # 3 identities of 4 images: not splittable over 2 processes
    with pytest.raises(ReidExportError, match="whole identities"):
        build_batch_sampler(cfg, labels, 0, world_size=2, rank=0)
    with pytest.raises(ReidExportError, match="3 identities.*2 processes"):
        check_divisible(DistContext(2, 0, 0, "gloo", True), 12, 4)
    check_divisible(DistContext(2, 0, 0, "gloo", True), 16, 4)


# --- 2 processes against 1 -------------------------------------------------------------------------

def test_two_processes_equal_one_with_global_mining_and_syncbn(toy_root, tmp_path):
    opts = tiny_opts(toy_root, "SOLVER.MAX_EPOCH", "1", *EXACT)
    run_single(tmp_path / "one", opts)
    err = run_torchrun(2, tmp_path / "two", opts)
    log = (tmp_path / "two" / "log.txt").read_text().splitlines()
    assert "world size 2, backend gloo" in log[0], log[0]
    assert "triplet mining global" in "\n".join(log) and "synchronised BN in backbone" in "\n".join(log)
    assert "rank 1" not in err  # rank 0 alone logs
    one, two = _weights(tmp_path / "one" / "model_final.pth"), _weights(tmp_path / "two" / "model_final.pth")
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert one["iteration"] == 3
    _assert_close(one, two, atol=1e-5)


def test_killed_two_process_run_resumes_to_the_uninterrupted_result(toy_root, tmp_path):
    opts = tiny_opts(toy_root, "SOLVER.MAX_EPOCH", "3", *EXACT)
    run_torchrun(2, tmp_path / "whole", opts)
    out = tmp_path / "killed"
    proc = subprocess.Popen(torchrun_cmd(2, out, opts), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.time() + 240
        while not (out / "model_0000.pth").exists():
            assert proc.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both ranks, mid-run
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert not (out / "model_final.pth").exists(), "killed too late to test anything"
    err = run_torchrun(2, out, opts, "--resume")
    assert "resuming from" in err
    _assert_close(_weights(tmp_path / "whole" / "model_final.pth"), _weights(out / "model_final.pth"), atol=1e-6)


def test_resume_with_another_world_size_continues_the_computation(toy_root, tmp_path):
    """Global mining + syncBN: 1 iteration on 2 processes, then 2 more in one process == 3 in one process
    (a global batch of 32 = 8 identities x 4 images makes an epoch of the toy set one iteration)."""
    opts = tiny_opts(toy_root, *EXACT, "SOLVER.IMS_PER_BATCH", "32")
    run_single(tmp_path / "one", [*opts, "SOLVER.MAX_EPOCH", "3"])
    run_torchrun(2, tmp_path / "mixed", [*opts, "SOLVER.MAX_EPOCH", "1"])
    assert _weights(tmp_path / "mixed" / "model_final.pth")["iteration"] == 1
    err = run_single(tmp_path / "mixed", [*opts, "SOLVER.MAX_EPOCH", "3"], "--resume")
    assert "world size 2 with world size 1" in err and "so is the computation" in err
    one, mixed = _weights(tmp_path / "one" / "model_final.pth"), _weights(tmp_path / "mixed" / "model_final.pth")
    assert one["iteration"] == mixed["iteration"] == 3
    _assert_close(one, mixed, atol=1e-5)
