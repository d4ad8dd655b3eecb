"""Shared fixtures: real data location, generated images, in-process CLI runs."""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from reid_export.modeling import random_weights

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
DATA = Path(os.environ.get("REID_DATA", REPO.parent / "shared" / "data"))
randomize_bn = random_weights.randomize_bn  # random weights with a trained model's numerics, one way for every test


def data_dir(name: str) -> Path:
    """A folder of the shared real data, or skip the test with the reason."""
    path = DATA / name
    if not path.exists():
        pytest.skip(f"real data {path} not present (set REID_DATA to the folder holding {name}/)")
    return path


@pytest.fixture
def parity_images() -> list[Path]:
    folder = data_dir("parity-images")
    return sorted(folder.glob("*.jpg"))


def load_benchmark(name: str):
    """``benchmarks/NAME.py`` as a module (the benchmark scripts are not a package), with benchmarks/ on
    ``sys.path`` as when the script runs (its ``import common`` and imports of other scripts work)."""
    import importlib.util
    import sys

    folder = str(REPO / "benchmarks")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # as an import does (a dataclass in it looks its module up there)
    spec.loader.exec_module(module)
    return module


def write_image(path: Path, seed: int = 0, size=(160, 64)) -> Path:
    rng = np.random.default_rng(seed)
    h, w = size
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    img = cv2.GaussianBlur(img, (5, 5), 0)  # something a JPEG encoder keeps
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), img)
    return path


@pytest.fixture
def image_dir(tmp_path) -> Path:
    folder = tmp_path / "images"
    for i in range(4):
        write_image(folder / f"{i:04d}_c1s1_000000_00.jpg", seed=i)
    return folder


class CliResult:
    def __init__(self, code: int, out: str, err: str):
        self.code, self.out, self.err = code, out, err

    def __repr__(self):
        return f"CliResult(code={self.code}, err={self.err!r})"


def run_main(main, args) -> CliResult:
    """Call a click ``main(argv)`` in-process; exit code, stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return CliResult(code, out.getvalue(), err.getvalue())


def run_cli(*args) -> CliResult:
    """Run ``reid-export ARGS`` in-process; exit code, stdout and stderr."""
    from reid_export.cli.main import main

    return run_main(main, args)


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a module (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``):
    tiny models run faster so on a busy 2-core machine, and runs with the same thread count are
    bit-comparable."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def assert_clean_error(result: CliResult, *needles: str) -> None:
    """Non-zero exit, exactly one line on stderr, no traceback, mentioning every needle."""
    assert result.code != 0, result
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert len(lines) == 1, result.err
    assert "Traceback" not in result.err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


# --- outcomes of this session's tests, for the failure-table rows proven by another test -----------

TEST_OUTCOMES: dict[str, str] = {}


def pytest_runtest_logreport(report):
    """Record each test's outcome by node id (a failed or skipped setup counts as the outcome)."""
    if report.when == "call":
        TEST_OUTCOMES[report.nodeid] = report.outcome
    elif report.outcome != "passed":  # a setup that failed or skipped: the test itself never ran
        TEST_OUTCOMES.setdefault(report.nodeid, report.outcome)


def pytest_collection_modifyitems(session, config, items):
    """Run the failure-table rows that another test proves (``covered_by``) after every other test."""
    def covered(item):
        case = getattr(getattr(item, "callspec", None), "params", {}).get("case")
        return getattr(case, "covered_by", None) is not None

    items[:] = [it for it in items if not covered(it)] + [it for it in items if covered(it)]


def command_lines(text: str) -> list[str]:
    """Every ``reid-export ...`` command a generated file shows: lines of code blocks, and `inline` code
    with arguments (a bare `reid-export eval` in a sentence names a command, it shows no command line)."""
    import re

    found = []
    for line in text.splitlines():
        stripped = line.strip().lstrip("$ ").strip()
        if stripped.startswith("reid-export "):
            found.append(stripped)
        found += [m for m in re.findall(r"`(reid-export [^`]+)`", line) if len(m.split()) > 2]
    return list(dict.fromkeys(found))


def parse_command_line(line: str):
    """Parse a shown ``reid-export SUB ARGS`` with the real CLI (every option must exist, every required
    argument be there); returns the click context. Raises click's UsageError otherwise."""
    import shlex

    import click

    from reid_export.cli.main import cli

    argv = shlex.split(line)
    assert argv[0] == "reid-export", line
    command = cli.get_command(click.Context(cli), argv[1])
    assert command is not None, f"no command {argv[1]!r}: {line}"
    return command.make_context(argv[1], argv[2:])


class SmallReidNet(torch.nn.Module):
    """A small ReID-shaped network for the hand-off and gate tests: two strided convolutions with
    BatchNorm, a 4x1 pooled map, a 48-d embedding. ``mean``/``std`` given: the per-channel
    normalisation is inside the graph (fast-reid style, 0..255 input); None: the input arrives
    normalised (torchreid style)."""

    def __init__(self, mean=None, std=None):
        super().__init__()
        self.normalise = mean is not None
        if self.normalise:
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 3, 2, 1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
            torch.nn.Conv2d(16, 32, 3, 2, 1), torch.nn.BatchNorm2d(32), torch.nn.ReLU())
        self.fc = torch.nn.Linear(32 * 4, 48)

    def forward(self, x):
        if self.normalise:
            x = (x - self.mean) / self.std
        f = torch.nn.functional.adaptive_avg_pool2d(self.features(x), (4, 1))
        return self.fc(f.flatten(1))


def export_small_onnx(net: torch.nn.Module, path: Path, calibration: torch.Tensor, size=(64, 32)) -> Path:
    """Set ``net``'s BatchNorm statistics from ``calibration`` (a batch in the units its input takes),
    then export it to ``path`` (opset 13, TorchScript exporter, input ``input`` [N, 3, H, W] with a
    dynamic batch and the fixed ``size`` (H, W), output ``output``)."""
    import warnings

    with torch.no_grad():
        net.train()
        net(calibration)
    net.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(1, 3, *size),), str(path), dynamo=False, opset_version=13,
                          input_names=["input"], output_names=["output"], dynamic_axes={"input": {0: "N"}})
    return path


def negative_pair_distances(encoder, root: Path, deployment: str) -> np.ndarray:
    """Sorted cosine distances of every different-identity query x gallery pair of the Market-layout
    ``root``, the features computed by ``encoder`` through ``deployment``'s preprocessing: the
    hand-written reference for the tracker thresholds the hand-offs write."""
    from reid_export.data.market import MarketDataset
    from reid_export.deploy_preprocess import get_deployment
    from reid_export.verify.metrics import compute_distance

    ds = MarketDataset(root)
    encoder.preprocessing = get_deployment(deployment).preprocess
    qf = encoder.encode_files([it.path for it in ds.query], progress=False)
    gf = encoder.encode_files([it.path for it in ds.gallery], progress=False)
    dist = compute_distance(qf, gf)
    q_pid, g_pid = np.array([it.pid for it in ds.query]), np.array([it.pid for it in ds.gallery])
    return np.sort(dist[q_pid[:, None] != g_pid[None]])


def inject_nan(src: Path, dst: Path, dim: int, positions=(1, 5)) -> Path:
    """``src`` (an ONNX model with ``dim``-d features) with its features multiplied by a constant that holds
    NaN at ``positions``: a model whose output is NaN there, for the checks that must catch it."""
    import onnx
    from onnx import helper, numpy_helper

    from reid_export.export.metadata import save_onnx

    proto = onnx.load(str(src))
    out = proto.graph.output[0].name
    scale = np.ones((1, dim), np.float32)
    scale[0, list(positions)] = np.nan
    proto.graph.initializer.append(numpy_helper.from_array(scale, "nan_scale"))
    for node in proto.graph.node:
        node.output[:] = [o if o != out else "pre_nan" for o in node.output]
    proto.graph.node.append(helper.make_node("Mul", ["pre_nan", "nan_scale"], [out], name="inject_nan"))
    save_onnx(proto, dst)
    return Path(dst)
