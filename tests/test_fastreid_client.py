"""fast-reid's own code (PyPI ``fastreid`` 1.4.0) takes what reid-train writes, unchanged.

fast-reid runs in a separate Python (``tests/fastreid_side.py``) that has the package: by default
``.venv-fastreid/`` in the repository, which ``.ci/run`` makes (``--system-site-packages``: the same
torch; fastreid with ``--no-deps``, since it pins torch 1.13.1, plus yacs, termcolor, tabulate), or
the interpreter named by ``REID_FASTREID_PYTHON``. Without one the tests skip and say so.

For a ResNet BoT and an OSNet BoT trained for one epoch on generated data:
``get_cfg().merge_from_file(config.yaml)``, ``build_model``, ``Checkpointer(model).load(model_final.pth)``
on the files as written, then fast-reid's eval-mode features of the very pixels ``extract`` used
agree with ``extract``'s within 1e-5 relative L2. And the failure side: a config holding one of our
keys is refused by fast-reid (so the check can fail), and fast-reid's own optimizer cannot resume
from reid-train's training state (the README says so). That the package computes what fast-reid's
code computed is checked on ../shared/golden (its features reproduced within 1e-5).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import CONFIGS, REPO, run_cli
from test_train import make_market, reid_train, tiny_opts

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

SIDE = Path(__file__).resolve().parent / "fastreid_side.py"
TOLERANCE = 1e-5
MODELS = {
    "resnet": (CONFIGS / "CUHK03" / "bagtricks_R18_cpu.yml", ()),
    "osnet": (CONFIGS / "CUHK03" / "bagtricks_osnet_x0_25_cpu.yml", ()),
}


def fastreid_python() -> str:
    """An interpreter that imports fast-reid's package, or skip with the reason."""
    named = os.environ.get("REID_FASTREID_PYTHON")
    candidates = [named] if named else [str(REPO / ".venv-fastreid" / "bin" / "python"), sys.executable]
    for python in candidates:
        if python and Path(python).exists():
            probe = subprocess.run(
                [python, "-c", "import fastreid.config, fastreid.modeling, fastreid.utils.checkpoint"],
                capture_output=True, text=True)
            if probe.returncode == 0:
                return python
    pytest.skip("fast-reid's package is not installed: .ci/run makes .venv-fastreid with it (python3 -m venv "
                "--system-site-packages .venv-fastreid; .venv-fastreid/bin/pip install --no-deps fastreid==1.4.0 "
                "yacs termcolor tabulate), or set REID_FASTREID_PYTHON")


def fastreid(jobs: dict[str, list], folder: Path) -> dict[str, dict]:
    """Run named jobs (``{name: [command, arg, ...]}``) through ``fastreid_side.py`` under fast-reid's
    Python, in one process; their JSON answers by name."""
    names = list(jobs)
    (folder / "jobs.json").write_text(json.dumps([[str(a) for a in jobs[n]] for n in names]))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH="")  # fast-reid alone: reid-export not on the path
    done = subprocess.run([fastreid_python(), str(SIDE), str(folder / "jobs.json")], capture_output=True, text=True,
                          env=env, cwd=str(folder), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(zip(names, json.loads(done.stdout)))


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("datasets")
    make_market(root / "toy", train_ids=4, per_id=4, test_ids=3)
    return root


@pytest.fixture(scope="module", params=sorted(MODELS))
def case(request, toy_root, tmp_path_factory):
    """reid-train's output after one epoch (config.yaml, its sidecar, model_final.pth), extract's features
    of the toy queries, and fast-reid's answers about those files."""
    from reid_export.config import sidecar_path
    from reid_export.data_config import DataConfig
    from reid_export.preprocess import preprocess

    fastreid_python()
    config, extra = MODELS[request.param]
    run_dir = tmp_path_factory.mktemp(f"run-{request.param}")
    code, err = reid_train("--config", config, "--output-dir", run_dir, "--no-progress", "--opts",
                           *tiny_opts(toy_root, "SOLVER.MAX_EPOCH", "1", "TEST.EVAL_PERIOD", "0", *extra))
    assert code == 0, err
    work = tmp_path_factory.mktemp(f"fastreid-{request.param}")
    images = sorted((toy_root / "toy" / "query").glob("*.jpg"))
    result = run_cli("extract", run_dir / "model_final.pth", *images, "-o", work / "ours.npy", "--no-progress")
    assert result.code == 0, result
    # identical pixels: the data config extract used, through the one preprocessing function
    dc = DataConfig.from_dict(json.loads((work / "ours.json").read_text())["data_config"])
    np.save(work / "inputs.npy", preprocess(images, dc))
    # the checkpoint's embedded config as a file, and config.yaml with one of our keys put back in
    ckpt = torch.load(run_dir / "model_final.pth", weights_only=True)
    (work / "embedded.yaml").write_text(ckpt["cfg"])
    data = yaml.safe_load((run_dir / "config.yaml").read_text())
    data["INPUT"]["INTERPOLATION"] = yaml.safe_load(sidecar_path(run_dir / "config.yaml").read_text())["INPUT"][
        "INTERPOLATION"]
    (work / "with_ours.yaml").write_text(yaml.safe_dump(data))
    answers = fastreid({
        "merge": ["merge", run_dir / "config.yaml"],
        "merge_embedded": ["merge", work / "embedded.yaml"],
        "merge_with_ours": ["merge", work / "with_ours.yaml"],
        "features": ["features", run_dir / "config.yaml", run_dir / "model_final.pth", work / "inputs.npy",
                     work / "theirs.npy"],
        "resume": ["resume", run_dir / "config.yaml", run_dir / "model_final.pth"],
    }, work)
    return {"run": run_dir, "work": work, "ckpt": ckpt, "answers": answers}


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float((np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)).max())


def test_fastreid_loads_reid_train_output_and_computes_extracts_features(case):
    """Checkpointer(model).load on model_final.pth as written: no missing or unexpected key, extract's features."""
    answer = case["answers"]["features"]
    assert answer["missing"] == [] and answer["unexpected"] == [], answer
    theirs = np.load(case["work"] / "theirs.npy")
    ours = np.load(case["work"] / "ours.npy")
    assert theirs.shape == ours.shape and np.std(ours, axis=0).mean() > 1e-3
    assert rel_l2(ours, theirs) <= TOLERANCE, rel_l2(ours, theirs)


def test_config_round_trip_through_fastreid(case):
    """fast-reid merges config.yaml and the embedded config unchanged; its own dump loads here, with our
    sidecar, to the same config."""
    from reid_export.checkpoint import embedded_config
    from reid_export.config import OWN_KEYS, load_config, sidecar_path

    answers, run_dir = case["answers"], case["run"]
    assert answers["merge"]["ok"] and answers["merge_embedded"]["ok"], answers
    ours = load_config(run_dir / "config.yaml")
    assert ours.SEED == 7 and ours.DATASETS.ROOT  # restored from config.reid-export.yaml
    assert not any(key.split(".")[-1] + ":" in case["ckpt"]["cfg"] for key in OWN_KEYS)
    assert embedded_config(case["ckpt"]) == ours  # "cfg" + "reid_export_cfg"
    dumped = case["work"] / "fastreid-dump" / "config.yaml"
    dumped.parent.mkdir()
    dumped.write_text(answers["merge"]["dump"])  # every key fast-reid 1.4.0 has
    shutil.copy(sidecar_path(run_dir / "config.yaml"), sidecar_path(dumped))
    assert load_config(dumped) == ours


def test_fastreid_rejects_a_config_with_our_keys(case):
    """The check can fail: config.yaml with one of our keys merged back in is refused, as before."""
    answer = case["answers"]["merge_with_ours"]
    assert not answer["ok"] and "INPUT.INTERPOLATION" in answer["error"], answer


def test_fastreid_cannot_resume_reid_trains_optimizer(case):
    """What the README says: fast-reid takes the weights (MODEL.WEIGHTS, fine-tuning) but not the training
    state; its Checkpointer, given its own optimizer, refuses reid-train's (other parameter groups)."""
    answer = case["answers"]["resume"]
    assert not answer["ok"] and "parameter group" in answer["error"], answer


def test_fastreid_package_reproduces_the_golden_features(tmp_path):
    """The PyPI package stands for fast-reid's code: fed the golden pixels (OpenCV cubic, as the golden
    features were made), its merge_from_file, build_model and Checkpointer reproduce ../shared/golden."""
    from reid_export.data_config import DataConfig
    from reid_export.preprocess import preprocess

    golden = Path(os.environ.get("REID_GOLDEN", REPO.parent / "shared" / "golden")) / "fastreid"
    names = ["bot_R18", "agw_R50-ibn"]
    if not all((golden / n / "features.npy").is_file() for n in names):
        pytest.skip(f"golden data {golden} not present (set REID_GOLDEN to the folder holding fastreid/)")
    fastreid_python()
    jobs = {}
    for name in names:
        order = json.loads((golden / name / "inputs.json").read_text())["images"]
        pixels = preprocess([golden / "images" / n for n in order], DataConfig(interpolation="cubic"))
        np.save(tmp_path / f"{name}.npy", pixels)
        jobs[name] = ["features", golden / name / "config.yaml", golden / name / "model_final.fp16.pth",
                      tmp_path / f"{name}.npy", tmp_path / f"{name}.out.npy"]
    answers = fastreid(jobs, tmp_path)
    for name in names:
        assert answers[name]["missing"] == [] and answers[name]["unexpected"] == [], answers[name]
        theirs = np.load(tmp_path / f"{name}.out.npy")
        assert rel_l2(theirs, np.load(golden / name / "features.npy")) <= TOLERANCE, name
