"""benchmarks/common.py: the one way the benchmark scripts run a CLI step, read the machine and its load, write
a JSON report with its header and make a random-weight checkpoint; and the scripts use it, not their own."""

from __future__ import annotations

import json
import os
import re
import sys

import numpy as np
import pytest
import torch

from conftest import CONFIGS, REPO, load_benchmark

SCRIPTS = sorted(p for p in (REPO / "benchmarks").glob("*.py") if p.name != "common.py")


@pytest.fixture(scope="module")
def common():
    return load_benchmark("common")


def test_run_step_says_runs_and_returns_the_outcome(common, tmp_path):
    said = []
    step = common.run_step("--version", capture=True, say=said.append)
    assert step.returncode == 0 and step.command == "reid-export --version"
    assert "reid-export" in step.stdout and step.seconds > 0
    assert said[0] == "$ reid-export --version" and re.fullmatch(r"# \d+ s", said[1])
    log = tmp_path / "step.log"
    assert common.run_step("--version", log_file=log, say=None).returncode == 0
    assert "reid-export" in log.read_text()


def test_a_failed_step_stops_the_script_with_one_line_naming_it(common):
    with pytest.raises(SystemExit) as stop:
        common.run_step("no-such-command", "a b", capture=True, say=None, ok_codes=(0, 1))
    assert str(stop.value) == "reid-export no-such-command 'a b': failed with exit code 2"
    step = common.run_step("no-such-command", capture=True, say=None)  # no ok_codes: the caller decides
    assert step.returncode == 2 and "no-such-command" in step.stderr


def test_dry_run_only_says_the_command(common, tmp_path):
    said = []
    step = common.run_step("onnx", tmp_path / "m.pth", "-o", tmp_path / "m.onnx", say=said.append, dry_run=True)
    assert step.returncode is None and said == [f"$ reid-export onnx {tmp_path}/m.pth -o {tmp_path}/m.onnx"]
    assert not list(tmp_path.iterdir())


def test_steps_run_this_checkout_with_this_python(common):
    assert common.cli_command("eval", 3) == [sys.executable, "-m", "reid_export", "eval", "3"]
    assert common.cli_command("--help", tool="reid-train")[2] == "reid_train.cli"
    env = common.cli_env(OMP_NUM_THREADS="1")
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(REPO) and env["OMP_NUM_THREADS"] == "1"


def test_write_json_puts_the_header_first(common, tmp_path, monkeypatch):
    monkeypatch.setenv("REID_CPU_FLAGS", "sse4_2 avx2 fma avx512_vnni")
    path = common.write_json(tmp_path / "r.json", {"rows": [np.float32(0.5), np.int64(3)], "arr": np.arange(2),
                                                   "where": tmp_path, "machine": "kept"},
                             command="python benchmarks/x.py --a 1")
    doc = json.loads(path.read_text())
    keys = list(doc)
    assert keys[:4] == ["schema_version", "tool", "command", "date"] and keys[-3:] == ["rows", "arr", "where"]
    assert doc["command"] == "python benchmarks/x.py --a 1" and doc["tool"].startswith("reid-export ")
    assert doc["cpu_flags"] == ["avx2", "fma", "avx512_vnni"]  # the package's parser: performance flags, its order
    for key in ("cpu", "cpu_count", "load_average", "python", "versions"):
        assert key in doc, key
    assert doc["rows"] == [0.5, 3] and isinstance(doc["rows"][1], int) and doc["arr"] == [0, 1]
    assert doc["where"] == str(tmp_path) and doc["machine"] == "kept"  # a payload key replaces the header's
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # atomic: no temporary file left


def test_write_json_writes_a_list_of_records_as_is(common, tmp_path):
    records = [{**common.header("c"), "key": "a"}]
    doc = json.loads(common.write_json(tmp_path / "r.json", records, indent=1).read_text())
    assert isinstance(doc, list) and doc[0]["key"] == "a" and doc[0]["command"] == "c"
    with pytest.raises(TypeError):
        common.write_json(tmp_path / "bad.json", {"x": object()})
    assert not (tmp_path / "bad.json").exists()


def test_load_average_and_command_line(common):
    load = common.load_average()
    assert len(load) == 3 and all(isinstance(v, float) for v in load)
    assert common.format_load([0.5, 1, 12.345]) == "0.50 / 1.00 / 12.35" and common.format_load(None) == "?"
    assert common.command_line(REPO / "benchmarks" / "x.py", ["--a", "b c"]) == "python benchmarks/x.py --a 'b c'"


def test_random_checkpoint_measures_statistics_on_the_crops(common, tmp_path):
    from reid_export.checkpoint import load_model_from_checkpoint

    opts = ["INPUT.SIZE_TEST", "[64, 32]"]
    path, source = common.random_checkpoint(CONFIGS / "Market1501/bagtricks_R18.yml", tmp_path / "r.pth", opts=opts,
                                            calib_dir=tmp_path / "none")
    assert source == "64 random images (no real crops found)"
    model, _, data_config = load_model_from_checkpoint(path)
    assert data_config.input_size == (64, 32)
    bn1 = model.backbone.bn1
    assert float(bn1.running_var.min()) > 0 and not torch.allclose(bn1.running_mean, torch.zeros_like(bn1.running_mean))
    assert torch.equal(bn1.weight, torch.ones_like(bn1.weight))  # the norm parameters as built
    other, source = common.random_checkpoint(CONFIGS / "Market1501/bagtricks_R18.yml", tmp_path / "o.pth", opts=opts)
    assert source == "one random batch"
    assert not torch.equal(load_model_from_checkpoint(other)[0].backbone.bn1.weight, bn1.weight)


# the plumbing a script must take from common.py, not write again
OWN_PLUMBING = {
    "sys.path.insert": r"sys\.path\.insert",
    "a load-average reader": r"getloadavg\(|/proc/loadavg",
    "a /proc/cpuinfo parser": "/proc/cpuinfo|lscpu",
    "its own CLI call": r"\"-m\", \"reid_(export|train)",
}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_take_the_plumbing_from_common(script):
    text = script.read_text()
    found = [what for what, pattern in OWN_PLUMBING.items() if re.search(pattern, text)]
    assert not found, f"{script.name} has {', '.join(found)}: use benchmarks/common.py"


def test_the_plumbing_check_sees_a_script_of_its_own(tmp_path):
    text = 'import os, sys\nsys.path.insert(0, "..")\nload = os.getloadavg()\ncmd = [sys.executable, "-m", "reid_export"]\n'
    found = [what for what, pattern in OWN_PLUMBING.items() if re.search(pattern, text)]
    assert found == ["sys.path.insert", "a load-average reader", "its own CLI call"]
