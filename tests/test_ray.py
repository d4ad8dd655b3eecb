"""extract --engine ray: Ray Data workers write shards that merge into the same bits as a local run,
and a killed run resumes from the shards it finished."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import CONFIGS, REPO, assert_clean_error, randomize_bn, run_cli, write_image

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'reid-export[ray]')")

from reid_export.checkpoint import save_checkpoint  # noqa: E402
from reid_export.config import load_config  # noqa: E402
from reid_export.data_config import data_config_from_cfg  # noqa: E402
from reid_export.modeling import build_model  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    cfg = load_config(CONFIGS / "Market1501/bagtricks_R18.yml", ["INPUT.SIZE_TEST", "[64, 32]"])
    torch.manual_seed(0)
    model = randomize_bn(build_model(cfg), size=(64, 32)).eval()
    ckpt = save_checkpoint(root / "tiny.pth", model, cfg, data_config_from_cfg(cfg, model.feat_dim, "r18"))
    for i in range(60):
        write_image(root / "crops" / f"{i // 6 + 1:04d}_c{i % 3 + 1}s1_{i:06d}_00.jpg", seed=i, size=(96, 48))
    # The reference: single-process extract, one torch thread.
    r = run_cli("extract", ckpt, root / "crops", "-o", root / "local.npy", "--batch-size", "4", "--no-progress")
    assert r.code == 0, r.err
    yield ckpt, root
    if ray.is_initialized():
        ray.shutdown()


def same_output(a, b):
    fa, fb = np.load(a), np.load(b)
    ja, jb = json.loads(a.with_suffix(".json").read_text()), json.loads(b.with_suffix(".json").read_text())
    assert ja["files"] == jb["files"]  # the order
    assert fa.dtype == fb.dtype and fa.shape == fb.shape
    return np.array_equal(fa, fb)  # the bits


def test_killed_ray_run_resumes_and_equals_local_extract(tiny, tmp_path):
    ckpt, root = tiny
    out = tmp_path / "ray.npy"
    args = ["extract", str(ckpt), str(root / "crops"), "-o", str(out), "--batch-size", "4", "--engine", "ray",
            "--shard-size", "8", "--workers", "1", "--threads-per-worker", "1", "--no-progress"]
    shards = tmp_path / "ray.npy.shards"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "reid_export.cli.main", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and len(list(shards.glob("shard-*.json"))) < 2:
            time.sleep(0.2)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert len(list(shards.glob("shard-*.json"))) >= 2, "no shard written in time"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the run and its Ray processes, mid-way
        proc.wait()
    done = len(list(shards.glob("shard-*.json")))
    assert not out.exists() and 2 <= done < 8
    r = run_cli(*args[:-3], "--workers", "2", "--threads-per-worker", "1", "--no-progress")
    assert r.code == 0, r.err
    # A Ray worker of the killed run may still finish the shard it was writing (atomically) as it dies.
    reused = re.search(r"resumed: (\d+) of 8 shards", r.err)
    assert reused and done <= int(reused.group(1)) < 8, r.err
    assert same_output(root / "local.npy", out)
    assert not shards.exists()  # removed once the output is complete


def test_ray_output_differs_when_the_bits_would(tiny, tmp_path):
    # The comparison above can fail: one bit of one feature changed is a different output. (A run with
    # two threads per worker rounds differently on some CPUs and not on others, e.g. with AMX: the
    # bit flip below does not depend on the CPU.)
    ckpt, root = tiny
    out = tmp_path / "two.npy"
    r = run_cli("extract", ckpt, root / "crops", "-o", out, "--batch-size", "4", "--engine", "ray", "--shard-size",
                "32", "--threads-per-worker", "2", "--no-progress")
    assert r.code == 0, r.err
    np.testing.assert_allclose(np.load(out), np.load(root / "local.npy"), rtol=1e-3, atol=1e-3)
    flipped = tmp_path / "flipped.npy"
    feats = np.load(root / "local.npy")
    feats.view(np.uint32)[len(feats) // 2, 0] ^= 1  # the last mantissa bit of one element
    np.save(flipped, feats)
    flipped.with_suffix(".json").write_text((root / "local.json").read_text())
    assert same_output(root / "local.npy", root / "local.npy")
    assert not same_output(root / "local.npy", flipped)


def test_ray_options_errors(tiny, tmp_path, monkeypatch):
    ckpt, root = tiny
    assert_clean_error(run_cli("extract", ckpt, root / "crops", "-o", tmp_path / "x.npy", "--engine", "ray",
                               "--batch-size", "4", "--shard-size", "10"), "multiple of --batch-size")
    shards = tmp_path / "y.npy.shards"
    shards.mkdir()
    (shards / "plan.json").write_text(json.dumps({"model": "other"}))
    assert_clean_error(run_cli("extract", ckpt, root / "crops", "-o", tmp_path / "y.npy", "--engine", "ray",
                               "--batch-size", "4", "--shard-size", "8"), "another run", "remove that folder")
    for name in ("ray", "ray.data"):  # any import of Ray now raises ImportError
        monkeypatch.setitem(sys.modules, name, None)
    assert_clean_error(run_cli("extract", ckpt, root / "crops", "-o", tmp_path / "z.npy", "--engine", "ray",
                               "--batch-size", "4", "--shard-size", "8"), "pip install 'reid-export[ray]'")


def test_relative_paths_from_two_folders_in_one_process(tiny, tmp_path, monkeypatch):
    """Ray's workers keep the folder Ray started in: the files and the model reach them as absolute
    paths, so a second call from another folder with relative paths encodes the same files; an
    unreadable file is reported as it was given."""
    from reid_export.runtime.ray_extract import RayOptions, extract_on_ray

    ckpt, root = tiny
    local = np.load(root / "local.npy")
    crops = sorted((root / "crops").iterdir())
    results = []
    for name, files in (("first", crops[:8]), ("second", crops[8:16])):  # names the other folder does not hold
        here = tmp_path / name
        (here / "crops").mkdir(parents=True)
        for f in files:
            (here / "crops" / f.name).write_bytes(f.read_bytes())
        (here / "crops" / "broken.jpg").write_bytes(b"not a jpeg")
        os.symlink(ckpt, here / "model.pth")
        monkeypatch.chdir(here)
        given = [f"crops/{f.name}" for f in files] + ["crops/broken.jpg"]
        results.append(extract_on_ray("model.pth", given, here / "out.npy",
                                      RayOptions(batch_size=4, shard_size=4, cpus_per_worker=1, on_error="skip",
                                                 progress=False)))
    for res, rows in zip(results, (slice(0, 8), slice(8, 16))):
        assert res["kept"] == list(range(8)) and [s["file"] for s in res["skipped"]] == ["crops/broken.jpg"]
        np.testing.assert_array_equal(res["features"], local[rows])
