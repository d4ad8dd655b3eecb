"""What gets installed: every package folder, the trainer under a name that cannot collide."""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO


def _setup_cfg() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    return cfg


def test_the_package_list_holds_every_folder():
    """setup.cfg names its packages (trainer/ is mapped to reid_train): a new subpackage must be listed."""
    cfg = _setup_cfg()
    listed = {p.strip() for p in cfg["options"]["packages"].split() if p.strip()}
    folders = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "reid_export").rglob("__init__.py")}
    assert listed == folders | {"reid_train"}
    assert "reid_train = trainer" in cfg["options"]["package_dir"]
    assert "reid-train = reid_train.cli:main" in cfg["options.entry_points"]["console_scripts"]


def test_trainer_installs_as_reid_train(tmp_path):
    """Outside the checkout, ``import trainer`` finds nothing of ours, ``reid_train`` is the trainer, and
    the ``reid-train`` command works (the installed package, not the folder beside the tests)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = lambda *args: subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True)  # noqa: E731
    found = run(sys.executable, "-c", "import importlib.util, sys; "
                "spec = importlib.util.find_spec('trainer'); "
                "sys.exit(0 if spec is None or 'reid' not in str(spec.origin) else 1)")
    assert found.returncode == 0, "an installed top-level 'trainer' package is ours: " + found.stderr
    ours = run(sys.executable, "-c", "import reid_train.cli, reid_train.engine; print(reid_train.__file__)")
    assert ours.returncode == 0, ours.stderr
    exe = shutil.which("reid-train")
    if exe is None:
        pytest.skip("reid-train is not on PATH (the package is not installed): pip install -e .")
    helped = run(exe, "--help")
    assert helped.returncode == 0 and "--config" in helped.stdout, helped.stderr
