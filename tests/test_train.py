"""reid-train end to end on generated "people" (coloured rectangles in a Market-1501 layout):
the loss falls, the checkpoint extracts without --config, resume == uninterrupted, errors are one line."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from conftest import CONFIGS, REPO, assert_clean_error, data_dir, run_cli, run_main

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

CPU_CONFIG = CONFIGS / "CUHK03" / "bagtricks_R18_cpu.yml"


def _person(rng, top, bottom, h=64, w=32):
    img = np.full((h, w, 3), int(rng.integers(90, 160)), np.int16) + rng.integers(-20, 21, (h, w, 3))
    img = img.clip(0, 255).astype(np.uint8)
    x0, x1 = int(rng.integers(4, 9)), w - int(rng.integers(4, 9))
    y0, ym, y1 = int(rng.integers(2, 6)), h // 2 + int(rng.integers(-3, 4)), h - int(rng.integers(1, 4))

    def jitter(c):
        return tuple(int(v) for v in np.clip(np.asarray(c) + rng.integers(-25, 26, 3), 0, 255))

    cv2.rectangle(img, (x0 + 4, y0), (x1 - 4, y0 + 8), jitter((60, 80, 120)), -1)  # head
    cv2.rectangle(img, (x0, y0 + 9), (x1, ym), jitter(top), -1)                    # shirt
    cv2.rectangle(img, (x0 + 2, ym + 1), (x1 - 2, y1), jitter(bottom), -1)          # trousers
    return img


def make_market(root: Path, train_ids=8, per_id=6, test_ids=6, seed=0) -> Path:
    """A Market-1501 layout whose identities are shirt/trouser colour pairs, 2 cameras."""
    rng = np.random.default_rng(seed)
    colors = rng.integers(0, 256, (1000, 2, 3))
    for sub in ("bounding_box_train", "query", "bounding_box_test"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for pid in range(1, train_ids + 1):
        for k in range(per_id):
            cv2.imwrite(str(root / "bounding_box_train" / f"{pid:04d}_c{k % 2 + 1}s1_{k:06d}_00.jpg"),
                        _person(rng, *colors[pid]))
    for pid in range(500, 500 + test_ids):
        cv2.imwrite(str(root / "query" / f"{pid:04d}_c1s1_000000_00.jpg"), _person(rng, *colors[pid]))
        for k in range(3):
            cv2.imwrite(str(root / "bounding_box_test" / f"{pid:04d}_c2s1_{k:06d}_00.jpg"), _person(rng, *colors[pid]))
    return root


def tiny_opts(root: Path, *extra) -> list[str]:
    """The CPU config shrunk to seconds: 32x16, batch 16 (4 ids x 4), 3 iterations per epoch."""
    return ["DATASETS.ROOT", str(root), "DATASETS.NAMES", '("toy",)', "DATASETS.TESTS", '("toy",)',
            "INPUT.SIZE_TRAIN", "[32, 16]", "INPUT.SIZE_TEST", "[32, 16]", "INPUT.PADDING.SIZE", "2",
            "SOLVER.IMS_PER_BATCH", "16", "SOLVER.WARMUP_ITERS", "2", "SOLVER.STEPS", "[2]",
            "DATALOADER.NUM_WORKERS", "0", "SOLVER.CHECKPOINT_PERIOD", "1", "TEST.IMS_PER_BATCH", "16",
            "SEED", "7", *extra]


def reid_train(*args) -> tuple[int, str]:
    """Run ``reid-train ARGS`` in-process; (exit code, stderr)."""
    from reid_train.cli import main

    result = run_main(main, args)
    return result.code, result.err


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("datasets")
    make_market(root / "toy")
    return root


@pytest.fixture(scope="module")
def trained(toy_root, tmp_path_factory):
    """4 epochs on the toy data, evaluated after epochs 2 and 4."""
    out = tmp_path_factory.mktemp("run")
    code, err = reid_train("--config", CPU_CONFIG, "--output-dir", out, "--no-progress",
                           "--opts", *tiny_opts(toy_root, "SOLVER.MAX_EPOCH", "4", "TEST.EVAL_PERIOD", "2"))
    assert code == 0, err
    return out


def test_tiny_run_loss_falls_and_writes_its_outputs(trained):
    train = [json.loads(line) for line in (trained / "history.jsonl").read_text().splitlines()]
    assert [t["epoch"] for t in train] == [0, 1, 2, 3]
    assert train[-1]["loss"] < 0.8 * train[0]["loss"], [t["loss"] for t in train]
    assert train[-1]["loss_cls"] < train[0]["loss_cls"]
    for name in ("model_0000.pth", "model_0002.pth", "model_final.pth", "model_best.pth", "config.yaml", "log.txt"):
        assert (trained / name).is_file(), name
    assert (trained / "last_checkpoint").read_text() == "model_final.pth"
    assert not list(trained.glob(".*tmp")), "temporary files left behind"
    ckpt = torch.load(trained / "model_final.pth", weights_only=True)
    assert {"model", "optimizer", "scheduler", "epoch", "cfg", "data_config"} <= set(ckpt)
    assert ckpt["epoch"] == 3 and ckpt["iteration"] == 12
    assert ckpt["model"]["heads.weight"].shape == (8, 512)
    results = json.loads((trained / "metrics_0003.json").read_text())["results"]["toy"]
    assert {"Rank-1", "mAP", "mINP"} <= set(results) and results["num_query"] == 6
    log = (trained / "log.txt").read_text()
    assert "img/s" in log and "training from scratch" in log
    assert (trained / "metrics_0001.json").is_file() and not (trained / "metrics_0002.json").exists()


def test_checkpoint_extracts_without_config(trained, toy_root, tmp_path):
    out = tmp_path / "f.npy"
    result = run_cli("extract", trained / "model_best.pth", toy_root / "toy" / "query", "-o", out, "--no-progress")
    assert result.code == 0, result
    feats = np.load(out)
    assert feats.shape == (6, 512) and np.isfinite(feats).all()
    meta = json.loads(out.with_suffix(".json").read_text())
    assert (meta["data_config"]["height"], meta["data_config"]["width"]) == (32, 16)
    assert meta["data_config"]["model_name"] == "bagtricks_R18_cpu"
    assert np.std(feats, axis=0).mean() > 1e-3  # not one constant vector


@pytest.fixture(scope="module")
def reference(toy_root, tmp_path_factory):
    """An uninterrupted 3-epoch run with every augmentation on (the resume tests' reference)."""
    out = tmp_path_factory.mktemp("reference")
    code, err = reid_train("--config", CPU_CONFIG, "--output-dir", out, "--no-progress",
                           "--opts", *resume_opts(toy_root, "3"))
    assert code == 0, err
    return torch.load(out / "model_final.pth", weights_only=True)


def resume_opts(root, max_epoch):
    return tiny_opts(root, "SOLVER.MAX_EPOCH", str(max_epoch), "TEST.EVAL_PERIOD", "0", "INPUT.CJ.ENABLED", "True",
                     "INPUT.REA.PROB", "0.8")


def _assert_same_run(a: dict, b: dict):
    assert a["epoch"] == b["epoch"] and a["iteration"] == b["iteration"]
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=0, atol=1e-6, msg=key)
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    for idx in sa:
        torch.testing.assert_close(sb[idx]["exp_avg_sq"], sa[idx]["exp_avg_sq"], rtol=0, atol=1e-9)
    assert [g["lr"] for g in a["optimizer"]["param_groups"]] == [g["lr"] for g in b["optimizer"]["param_groups"]]


def test_resume_after_a_crash_equals_the_uninterrupted_run(toy_root, reference, tmp_path):
    from reid_export.config import load_config
    from reid_train.engine import run

    class Crash(Exception):
        pass

    def crash_after_first_epoch(epoch):
        if epoch == 0:
            raise Crash

    cfg = load_config(CPU_CONFIG, resume_opts(toy_root, 3))
    cfg.OUTPUT_DIR = str(tmp_path)
    with pytest.raises(Crash):
        run(cfg, progress=False, on_epoch_end=crash_after_first_epoch)
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000.pth"
    code, err = reid_train("--config", CPU_CONFIG, "--output-dir", tmp_path, "--resume", "--no-progress",
                           "--opts", *resume_opts(toy_root, 3))
    assert code == 0, err
    assert "resuming from" in (tmp_path / "log.txt").read_text()
    _assert_same_run(reference, torch.load(tmp_path / "model_final.pth", weights_only=True))


def test_resume_after_kill_9_equals_the_uninterrupted_run(toy_root, reference, tmp_path):
    """A real SIGKILL as soon as the first checkpoint exists, then --resume to the same end."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    # MAX_EPOCH 50 so that the kill always lands mid-run; the schedule (MultiStep) does not depend on it.
    proc = subprocess.Popen([sys.executable, "-m", "reid_train.cli", "--config", str(CPU_CONFIG), "--output-dir",
                             str(tmp_path), "--no-progress", "--opts", *resume_opts(toy_root, 50)],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (tmp_path / "last_checkpoint").exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline, "no checkpoint within 2 minutes"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    last = (tmp_path / "last_checkpoint").read_text()
    assert last in ("model_0000.pth", "model_0001.pth"), last
    torch.load(tmp_path / last, weights_only=True)  # complete, loadable
    code, err = reid_train("--config", CPU_CONFIG, "--output-dir", tmp_path, "--resume", "--no-progress",
                           "--opts", *resume_opts(toy_root, 3))
    assert code == 0, err
    _assert_same_run(reference, torch.load(tmp_path / "model_final.pth", weights_only=True))


def test_eval_only_untrained_and_trained(trained, toy_root, tmp_path):
    code, err = reid_train("--config", CPU_CONFIG, "--output-dir", tmp_path / "u", "--eval-only", "--no-progress",
                           "--opts", *tiny_opts(toy_root))
    assert code == 0, err
    untrained = json.loads((tmp_path / "u" / "metrics_eval.json").read_text())
    assert untrained["model"].startswith("untrained")
    code, err = reid_train("--config", CPU_CONFIG, "--output-dir", tmp_path / "t", "--eval-only", "--no-progress",
                           "--opts", *tiny_opts(toy_root, "MODEL.WEIGHTS", str(trained / "model_final.pth")))
    assert code == 0, err
    after = json.loads((tmp_path / "t" / "metrics_eval.json").read_text())["results"]["toy"]
    final = json.loads((trained / "metrics_0003.json").read_text())["results"]["toy"]
    # Both are the trainer's own numbers; the authority is computed here: `reid-export extract` features
    # of the saved checkpoint, cosine distances in numpy, the textbook CMC/mAP of test_metrics.py.
    from reid_export.data.market import MarketDataset
    from test_metrics import reference_rank

    ds = MarketDataset(toy_root / "toy")
    feats = {}
    for split, items in (("query", ds.query), ("gallery", ds.gallery)):
        out = tmp_path / f"{split}.npy"
        res = run_cli("extract", trained / "model_final.pth", *[it.path for it in items], "-o", out, "--no-progress")
        assert res.code == 0, res
        f = np.load(out).astype(np.float64)
        feats[split] = f / np.linalg.norm(f, axis=1, keepdims=True)
    dist = np.round(1.0 - feats["query"] @ feats["gallery"].T, 6)
    cmc, mAP, _, _ = reference_rank(dist, *(np.array([getattr(it, a) for it in items])
                                            for a, items in (("pid", ds.query), ("pid", ds.gallery),
                                                             ("camid", ds.query), ("camid", ds.gallery))))
    for got in (after, final):
        assert got["mAP"] == pytest.approx(100 * mAP, abs=1e-3) and got["Rank-1"] == pytest.approx(100 * cmc[0], abs=1e-3)


def test_errors_are_one_line(toy_root, tmp_path):
    code, err = reid_train("--config", CPU_CONFIG, "--output-dir", tmp_path, "--no-progress",
                           "--opts", *tiny_opts(tmp_path / "nowhere"))
    assert_clean_error(_Result(code, err), "dataset 'toy'", "DATASETS.ROOT")
    code, err = reid_train("--config", CPU_CONFIG, "--opts", "SOLVER.MAX_EPOCHS", "3")
    assert code == 2 and "did you mean SOLVER.MAX_EPOCH" in err
    code, err = reid_train("--config", CPU_CONFIG, "--output-dir", tmp_path, "--no-progress",
                           "--opts", *tiny_opts(toy_root, "SOLVER.IMS_PER_BATCH", "15"))
    assert_clean_error(_Result(code, err), "NUM_INSTANCE")


class _Result:
    def __init__(self, code, err):
        self.code, self.err = code, "\n".join(line for line in err.splitlines() if not line.startswith("[reid-train]"))


def test_real_cuhk03_is_found_by_name():
    root = data_dir("cuhk03-labeled").parent
    from reid_export.config import load_config
    from reid_train.datasets import load_train_items

    cfg = load_config(CPU_CONFIG, ["DATASETS.ROOT", str(root)])
    items, sources = load_train_items(cfg)
    assert len(items) == 2426 and len({it.pid for it in items}) == 250
    assert sources == [str(root / "cuhk03-labeled")]


def test_training_evaluation_stops_on_nan_features(toy_root):
    """The trainer evaluates through verify.retrieval, with its NaN guard: one clear error, no metrics."""
    from reid_export.config import load_config
    from reid_export.data_config import data_config_from_cfg
    from reid_export.errors import ReidExportError
    from reid_export.modeling import build_model
    from reid_train.evaluator import evaluate

    cfg = load_config(CPU_CONFIG, tiny_opts(toy_root))
    model = build_model(cfg)
    with torch.no_grad():
        model.heads.bottleneck[0].running_var[:2] = float("nan")
    with pytest.raises(ReidExportError, match=r"evaluation on toy: .*NaN/Inf.*diverged"):
        evaluate(model, cfg, data_config_from_cfg(cfg, feat_dim=model.feat_dim), "cpu", progress=False)
    assert model.training  # left in train mode as it came
