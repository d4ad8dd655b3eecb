"""The command line's entry points: every way of starting reid-export offers every command."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO, run_cli
from reid_export.cli.main import COMMAND_MODULES, cli

COMMANDS = {"annotate", "bench", "demo", "doctor", "eval", "extract", "fp16-check", "onnx", "openvino", "parity",
            "quantize", "synth", "trt", "triton", "deepstream", "boxmot", "index", "search"}


def test_every_command_is_registered():
    assert set(cli.commands) == COMMANDS
    assert "stubs" not in COMMAND_MODULES  # no "not yet available" placeholders are left


@pytest.mark.parametrize("module", ["reid_export", "reid_export.cli.main"])
def test_python_dash_m_lists_every_command(module):
    # `python -m reid_export.cli.main` once printed a help without commands: the file ran as __main__ while
    # the commands registered on the imported module's group
    done = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    listed = {line.split()[0] for line in done.stdout.split("Commands:", 1)[1].splitlines() if line.strip()}
    assert listed == COMMANDS


def test_unknown_command_is_a_usage_error():
    result = run_cli("exprot")
    assert result.code == 2 and "exprot" in result.err
