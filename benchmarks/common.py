"""What the benchmark scripts share: one way to run a CLI step, to read the machine and its load, to write a
JSON report with its header, and to make a model with random weights.

A script in benchmarks/ runs as ``python benchmarks/NAME.py`` (its folder is first on ``sys.path``, so
``import common`` works; the tests load it the same way) and uses the installed ``reid_export``:

    import common

    step = common.run_step("eval", model, "--dataset-root", root, "--report", out, ok_codes=(0, 1))
    load_before = common.load_average()
    ...
    common.write_json(path, {"rows": rows, "load_before": load_before}, command=common.command_line(__file__, argv))
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("REID_DATA", REPO.parent / "shared" / "data"))
MODELS = Path(os.environ.get("REID_MODELS", REPO.parent / "shared" / "models"))

# the command a user types -> the module ``python -m`` runs
TOOLS = {"reid-export": "reid_export", "reid-train": "reid_train.cli"}


# ----------------------------------------------------------------------------------------------- CLI steps

def cli_command(*args, tool: str = "reid-export") -> list[str]:
    """``python -m reid_export ARGS`` (or ``reid_train.cli`` for ``tool="reid-train"``), with this Python."""
    return [sys.executable, "-m", TOOLS[tool], *map(str, args)]


def shown(*args, tool: str = "reid-export") -> str:
    """The command line as a user types it: ``reid-export ARGS``, quoted for a shell."""
    return " ".join([tool, *(shlex.quote(str(a)) for a in args)])


def cli_env(code: Path = REPO, **extra: str) -> dict[str, str]:
    """The environment of a step: ``code`` (this checkout by default) first on ``PYTHONPATH``, so the step runs
    the same package as the script beside it; ``extra`` variables set too."""
    path = os.pathsep.join(p for p in (str(code), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path, **extra)


@dataclass
class Step:
    """One CLI step that ran: the command line shown, its exit code (None in a dry run), its wall seconds, and
    its output when captured."""

    command: str
    returncode: int | None
    seconds: float
    stdout: str = ""
    stderr: str = ""


def run_step(*args, tool: str = "reid-export", ok_codes: Iterable[int] | None = None, capture: bool = False,
             log_file: Path | None = None, cwd: Path | None = None, code: Path = REPO, env: dict | None = None,
             say: Callable[[str], None] | None = print, dry_run: bool = False) -> Step:
    """Run ``reid-export ARGS`` (``python -m reid_export`` of ``code``, this checkout by default) in ``cwd``
    (default: the current folder, so relative paths mean what they meant to the script) and wait for it.

    ``say`` gets ``$ reid-export ARGS`` before the run and its wall time after (None: silent). ``capture``: stdout
    and stderr kept in the Step; ``log_file``: both written there instead. ``ok_codes``: any other exit code
    stops the script with a one-line message naming the command (None: the caller reads ``returncode``).
    ``dry_run``: only say the command. ``env``: extra variables (``PYTHONPATH`` is set from ``code``).
    """
    line = shown(*args, tool=tool)
    if say:
        say(f"$ {line}")
    if dry_run:
        return Step(line, None, 0.0)
    kwargs: dict = {"cwd": None if cwd is None else str(cwd), "env": cli_env(code, **(env or {}))}
    start = time.monotonic()
    if log_file is not None:
        with open(log_file, "w") as out:
            done = subprocess.run(cli_command(*args, tool=tool), stdout=out, stderr=subprocess.STDOUT, **kwargs)
    else:
        done = subprocess.run(cli_command(*args, tool=tool), capture_output=capture, text=True, **kwargs)
    step = Step(line, done.returncode, time.monotonic() - start, done.stdout or "", done.stderr or "")
    if say:
        say(f"# {step.seconds:.0f} s")
    if ok_codes is not None and step.returncode not in tuple(ok_codes):
        raise SystemExit(f"{line}: failed with exit code {step.returncode}")
    return step


def command_line(script: str | Path, argv: list[str] | None = None) -> str:
    """``python benchmarks/NAME.py ARGS`` for a report: ``script`` is the caller's ``__file__``, ``argv`` its
    arguments (default: this process's)."""
    path = Path(script).resolve()
    shown_path = path.relative_to(REPO) if path.is_relative_to(REPO) else path
    args = sys.argv[1:] if argv is None else argv
    return " ".join(["python", str(shown_path), *(shlex.quote(str(a)) for a in args)])


# ----------------------------------------------------------------------------------------------- the machine

def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where the system has none): ``reid_export.cpuinfo``'s."""
    from reid_export.cpuinfo import load_average as package_load_average

    return package_load_average()


def format_load(values) -> str:
    """``0.52 / 0.40 / 0.31`` (``?`` when unknown)."""
    return " / ".join(f"{v:.2f}" for v in values) if values else "?"


def environment(threads: int | None = None, device: str = "cpu") -> dict:
    """The machine a figure was measured on: the package's record of it (``reid_export.bench.report.environment``:
    CPU model, the CPU flags that decide the precisions' speed, core and thread counts, versions), with the
    host name and the load average now."""
    from reid_export.bench.report import environment as package_environment

    return {"machine": platform.node(), **package_environment(threads, device), "load_average": load_average()}


# ----------------------------------------------------------------------------------------------- reports

def header(command: str) -> dict:
    """The keys every benchmark report starts with: the package's report header (schema version, tool,
    command, date) and the environment."""
    from reid_export.report import report_header

    return {**report_header(command), **environment()}


def _default(obj):
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):  # numpy arrays, torch tensors
        return obj.tolist()
    return float(obj)  # anything else a number can be made of; the rest fails with TypeError


def write_json(path: str | Path, payload: dict | list, command: str | None = None, indent: int = 2) -> Path:
    """Write ``payload`` as JSON at ``path`` atomically (a reader never sees half a file). A dict gets the
    report header first (``command`` default: this process's command line); a payload key of the same name
    replaces the header's. A list (records that carry their own header, see ``header``) is written as is."""
    from reid_export.fileio import atomic_write_text

    if isinstance(payload, dict):
        payload = {**header(command or command_line(sys.argv[0])), **payload}
    return atomic_write_text(path, json.dumps(payload, indent=indent, default=_default) + "\n")


# ----------------------------------------------------------------------------------------------- test weights

def random_checkpoint(config: Path, output: Path, *, opts: Iterable[str] = (), calib_dir: Path | None = None,
                      name: str | None = None) -> tuple[Path, str]:
    """A checkpoint of ``config``'s model (``opts``: overrides) with random weights (torch seed 0) and the
    numerics of a trained one (``reid_export.modeling.random_weights.randomize_bn``); returns (path, what the
    BatchNorm statistics were measured on).

    With ``calib_dir``: the norm parameters as built, the statistics measured on its first 64 crops (64 random
    images where it holds none), in batches of 16; without: random norm parameters, statistics of one random
    batch. Speed does not depend on the values; accuracy does (these weights have none).
    """
    import numpy as np
    import torch

    from reid_export.checkpoint import save_checkpoint
    from reid_export.config import load_config
    from reid_export.data_config import data_config_from_cfg
    from reid_export.modeling import build_model
    from reid_export.modeling.random_weights import randomize_bn
    from reid_export.preprocess import expand_image_paths, preprocess

    cfg = load_config(config, list(opts))
    torch.manual_seed(0)
    model = build_model(cfg)
    data_config = data_config_from_cfg(cfg, model.feat_dim, name or Path(config).stem)
    if calib_dir is None:
        randomize_bn(model, size=data_config.input_size)
        source = "one random batch"
    else:
        images = expand_image_paths([calib_dir])[:64] if Path(calib_dir).exists() else []
        source = f"{len(images)} crops of {calib_dir}"
        if not images:
            rng = np.random.default_rng(0)
            images = [rng.integers(0, 256, (*data_config.input_size, 3), dtype=np.uint8) for _ in range(64)]
            source = "64 random images (no real crops found)"
        batches = (torch.from_numpy(preprocess(images[i:i + 16], data_config)) for i in range(0, len(images), 16))
        randomize_bn(model, inputs=batches, affine=False)
    save_checkpoint(output, model, cfg, data_config, note=f"random weights, BatchNorm statistics from {source}")
    return Path(output), source


if __name__ == "__main__":  # the shell scripts' record of the machine: python3 benchmarks/common.py
    print(json.dumps(environment()))
