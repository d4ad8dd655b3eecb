"""Reliability: every bad input gets one clear line, nothing is half-written, training survives kill -9.

The cases are the table in ``failure_table.py`` (also the "What happens when ..." section of
docs/errors.md). Each runs the real command in-process on small inputs built once per module: an R18
checkpoint at 64x32, a tiny conv net exported with the project's exporter and annotated, a few
generated images (corrupt, 1x1, grayscale, RGBA, a non-UTF-8 name) and tiny Market layouts.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from conftest import CONFIGS, REPO, CliResult, inject_nan, randomize_bn, run_cli, run_main, write_image
from failure_table import CASES, ERRORS_DOC, Case, doc_section, render

R18_CFG = CONFIGS / "Market1501" / "bagtricks_R18.yml"


class TinyNet(torch.nn.Module):
    """[N, 3, 64, 32] -> [N, 8]: a conv, a ReLU, average pooling."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2)

    def forward(self, x):
        return torch.relu(self.conv(x / 255.0)).mean(dim=(2, 3))


def _market(root: Path, query, gallery) -> Path:
    for sub, names in (("query", query), ("bounding_box_test", gallery)):
        for i, name in enumerate(names):
            write_image(root / sub / name, seed=hash(name) % 1000 + i, size=(64, 32))
    return root


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> SimpleNamespace:
    """Every input of the table, built once."""
    from reid_export.checkpoint import save_checkpoint
    from reid_export.config import load_config
    from reid_export.data_config import DataConfig, data_config_from_cfg
    from reid_export.export.annotate import annotate_file
    from reid_export.export.metadata import KEY_DATA_CONFIG, save_onnx, set_metadata
    from reid_export.export.onnx_export import export_module
    from reid_export.modeling import build_model
    from reid_export.trt.sidecar import make_sidecar, write_sidecar
    from test_train import CPU_CONFIG, make_market

    root = tmp_path_factory.mktemp("failures")
    a = SimpleNamespace(root=root)

    # checkpoints
    cfg = load_config(R18_CFG, ["INPUT.SIZE_TEST", "[64, 32]"])
    torch.manual_seed(0)
    model = randomize_bn(build_model(cfg), size=(64, 32))
    a.r18 = root / "r18.pth"
    save_checkpoint(a.r18, model, cfg, data_config_from_cfg(cfg, model.feat_dim, "r18"))
    data = a.r18.read_bytes()
    a.truncated_pth = root / "truncated.pth"
    a.truncated_pth.write_bytes(data[: len(data) // 2])
    a.empty_pth = root / "empty.pth"
    a.empty_pth.touch()
    a.dir_pth = root / "dir.pth"
    a.dir_pth.mkdir()
    a.pickle_marker = root / "pickle-code-ran"
    a.pickle_pth = root / "code.pth"
    torch.save({"model": _Evil(str(a.pickle_marker))}, a.pickle_pth)
    a.r50_cfg = CONFIGS / "Market1501" / "bagtricks_R50.yml"
    # a torchreid OSNet-x0.5 file: torchreid's key names (no backbone./heads. prefix), plain state dict
    osnet = build_model(load_config(CONFIGS / "torchreid" / "osnet_x0_5.yml"))
    a.torchreid_pt = root / "osnet_x0_5.pt"
    torch.save({k.split(".", 1)[1]: v for k, v in osnet.state_dict().items()}, a.torchreid_pt)
    a.typo_yml = root / "typo.yml"
    a.typo_yml.write_text(f"_BASE_: {R18_CFG}\nMODEL:\n  BACKBONE:\n    DEPHT: 18x\n")

    # images
    a.img = root / "img"
    for i in range(3):
        write_image(a.img / f"{i:04d}_c1s1_000000_00.jpg", seed=i, size=(64, 32))
    a.mixed = root / "mixed"
    for p in a.img.iterdir():
        (a.mixed / p.name).parent.mkdir(exist_ok=True)
        (a.mixed / p.name).write_bytes(p.read_bytes())
    good = (a.img / "0001_c1s1_000000_00.jpg").read_bytes()
    (a.mixed / "0002_c1s1_000000_01.jpg").write_bytes(good[: len(good) // 3])  # a cut-off JPEG
    a.no_images = root / "no_images"
    a.no_images.mkdir()
    (a.no_images / "README.txt").write_text("crops go here\n")
    a.empty_dir = root / "empty_dir"
    a.empty_dir.mkdir()
    a.one_pixel = root / "one_pixel"
    a.one_pixel.mkdir()
    cv2.imwrite(str(a.one_pixel / "dot.png"), np.full((1, 1, 3), 200, np.uint8))
    a.modes = root / "modes"
    a.modes.mkdir()
    color = cv2.imread(str(a.img / "0000_c1s1_000000_00.jpg"))
    cv2.imwrite(str(a.modes / "gray.png"), cv2.cvtColor(color, cv2.COLOR_BGR2GRAY))
    cv2.imwrite(str(a.modes / "rgba.png"), cv2.cvtColor(color, cv2.COLOR_BGR2BGRA))
    a.latin1 = root / "latin1"
    a.latin1.mkdir()
    with open(os.path.join(os.fsencode(a.latin1), b"caf\xe9.jpg"), "wb") as f:
        f.write(good)
    (a.latin1 / "plain.jpg").write_bytes(good)
    a.latin1_bad = root / "latin1_bad"
    a.latin1_bad.mkdir()
    with open(os.path.join(os.fsencode(a.latin1_bad), b"na\xefve.jpg"), "wb") as f:
        f.write(b"\xff\xd8 not really a JPEG")

    # ONNX models: a tiny conv net through the project's exporter, then annotate
    a.bare_onnx = root / "bare.onnx"
    save_onnx(export_module(TinyNet().eval(), (64, 32), exporter="torchscript"), a.bare_onnx)
    dc = DataConfig(height=64, width=32, pixel_scale=255.0, normalized_inside=True, interpolation="linear")
    a.tiny_onnx = root / "tiny.onnx"
    annotate_file(a.bare_onnx, a.tiny_onnx, dc, log=lambda m: None)
    a.nan_onnx = root / "nan.onnx"
    inject_nan(a.tiny_onnx, a.nan_onnx, dim=8)
    wrong = onnx.load(str(a.tiny_onnx))
    set_metadata(wrong, {KEY_DATA_CONFIG: DataConfig(height=128, width=64, feat_dim=8).to_json()})
    a.wrong_dc_onnx = root / "wrong_dc.onnx"
    save_onnx(wrong, a.wrong_dc_onnx)
    a.not_onnx = root / "text.onnx"
    a.not_onnx.write_text("this is not a model\n")
    rank3 = helper.make_model(helper.make_graph(
        [helper.make_node("ReduceMean", ["x"], ["y"], keepdims=0)], "rank3",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])]), opset_imports=[helper.make_opsetid("", 17)])
    a.rank3_onnx = root / "rank3.onnx"
    save_onnx(rank3, a.rank3_onnx)

    # a TensorRT engine from another TensorRT version (the bytes are never deserialised)
    a.engine = root / "old.engine"
    a.engine.write_bytes(b"\x00" * 64)
    write_sidecar(a.engine, make_sidecar(
        dc, "fp32", "8.6.1", "Tesla T4", "7.5", {"min": [1, 3, 64, 32], "opt": [8, 3, 64, 32], "max": [32, 3, 64, 32]},
        str(a.tiny_onnx), "0" * 64, {}, "images", "features"))

    # datasets
    a.market = _market(root / "market", ["0001_c1s1_000001_00.jpg", "0002_c1s1_000001_00.jpg"],
                       ["0001_c2s1_000002_00.jpg", "0002_c2s1_000002_00.jpg", "0000_c3s1_000003_00.jpg"])
    a.market_bad = _market(root / "market_bad", ["0001_c1s1_000001_00.jpg", "0002_c1s1_000001_00.jpg"],
                           ["0001_c2s1_000002_00.jpg", "0002_c2s1_000002_00.jpg"])
    (a.market_bad / "bounding_box_test" / "0002_c2s1_000003_00.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut off")
    a.market_noquery = _market(root / "market_noquery", [], ["0001_c2s1_000002_00.jpg"])
    a.market_nomatch = _market(root / "market_nomatch", ["0001_c1s1_000001_00.jpg"],
                               ["0001_c1s1_000002_00.jpg", "0002_c2s1_000002_00.jpg"])
    a.datasets = root / "datasets"
    make_market(a.datasets / "toy", train_ids=4, per_id=4, test_ids=2)
    a.train_cfg = CPU_CONFIG
    a.read_only = root / "read_only"
    a.read_only.mkdir()
    return a


class _Evil:
    """Unpickling this calls os.mkdir(marker): proof that code ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


# --------------------------------------------------------------------------- running one case

_HIDDEN_BY_DEFAULT = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)


@contextlib.contextmanager
def shown_warnings():
    """The warnings a real run would print on stderr (lines beside the one error line): pytest
    records them instead, so they are collected here and checked by the caller."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        shown: list[str] = []
        yield shown
    shown.extend(f"{w.category.__name__}: {w.message}" for w in caught
                 if not issubclass(w.category, _HIDDEN_BY_DEFAULT))


def run_train(*args) -> CliResult:
    """``reid-train ARGS`` in-process; its log lines ([reid-train] ...) are progress, not errors."""
    from reid_train.cli import main

    result = run_main(main, args)
    lines = [line for line in result.err.splitlines() if not line.startswith("[reid-train]")]
    return CliResult(result.code, result.out, "\n".join(lines))


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _read_only_folder(folder: Path) -> tuple[Path, str]:
    """A folder this process cannot write to, and how it was made. chmod does not stop root (as in CI):
    then a folder on sysfs, where creating files is refused to everyone."""
    folder.mkdir()
    folder.chmod(0o500)
    try:
        (folder / ".probe").touch()
    except PermissionError:
        return folder, "chmod 0o500"
    (folder / ".probe").unlink()
    folder.chmod(0o700)
    sysfs = Path("/sys")
    try:
        fd = os.open(sysfs / ".reid-export-probe", os.O_CREAT | os.O_WRONLY, 0o600)
    except OSError:
        return sysfs, "running as root: /sys (sysfs refuses new files)"
    os.close(fd)
    os.unlink(sysfs / ".reid-export-probe")
    pytest.skip("running as root and no read-only folder at hand (chmod does not stop root)")


def _skip_reason(case: Case) -> str | None:
    if case.skip_if == "cuda" and torch.cuda.is_available():
        return "CUDA is available here"
    if case.skip_if == "ort_cuda":
        import onnxruntime

        if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            return "onnxruntime has the CUDA provider here"
    return None


def _params():
    for case in CASES:
        marks = []
        if case.xfail:
            marks.append(pytest.mark.xfail(strict=True, reason=case.xfail))
        yield pytest.param(case, id=case.id, marks=marks)


@pytest.mark.parametrize("case", _params())
def test_failure_case(case: Case, artifacts, tmp_path, monkeypatch, capfd):
    if case.covered_by:
        # Proven by another test of this session, which runs before this row (conftest orders them):
        # the row passes only if that test passed.
        from conftest import TEST_OUTCOMES

        outcome = TEST_OUTCOMES.get(case.covered_by)
        if outcome is None:
            pytest.skip(f"{case.covered_by} was not run in this session (deselected); it proves this row")
        assert outcome == "passed", f"{case.covered_by} {outcome}: this row is not proven"
        return
    reason = _skip_reason(case)
    if reason:
        pytest.skip(reason)
    out = tmp_path / "out"
    out.mkdir()
    for name, data in case.existing.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)
    before = _files(out)
    a = artifacts
    if case.setup == "read_only":
        folder, how = _read_only_folder(tmp_path / "ro")
        a = SimpleNamespace(**{**vars(artifacts), "read_only": folder})
        print(f"read-only folder: {how}")
    elif case.setup in ("disk_full", "disk_full_second_file"):
        real_fsync, calls = os.fsync, []

        def full_disk(fd):
            calls.append(fd)
            if case.setup == "disk_full" or len(calls) == 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_fsync(fd)

        monkeypatch.setattr(os, "fsync", full_disk)
    args = case.args(a, out)
    with shown_warnings() as shown:
        if case.command == "reid-train":
            result = run_train(*args)
        else:  # extract's progress bar off; it goes before the arguments, since --opts must come last
            result = run_cli(case.command, *(["--no-progress"] if case.command == "extract" else []), *args)
    monkeypatch.undo()
    assert not shown, shown

    printed_behind_python = capfd.readouterr().err  # by a library's C++ code, straight to file descriptor 2
    assert not printed_behind_python.strip(), printed_behind_python
    assert "Traceback" not in result.err and "internal error" not in result.err, result.err
    assert result.code == case.code, (result.code, result.err, result.out)
    if case.code != 0 and not case.stdout_words:
        lines = [line for line in result.err.splitlines() if line.strip()]
        assert len(lines) == 1, result.err
        for word in case.words:
            assert word in lines[0], (word, lines[0])
    for word in case.stdout_words:
        assert word in result.out, (word, result.out)
    after = _files(out)
    expected = set(before) | set(case.writes)
    assert set(after) - set(case.allowed) == expected, f"files in the output folder: {sorted(after)}"
    for name, data in before.items():
        assert after[name] == data, f"{name} changed"
    if case.check:
        case.check(a, out, result)


def test_debug_shows_the_traceback(artifacts, tmp_path):
    plain = run_cli("extract", artifacts.truncated_pth, artifacts.img, "-o", tmp_path / "f.npy")
    debug = run_cli("--debug", "extract", artifacts.truncated_pth, artifacts.img, "-o", tmp_path / "f.npy")
    assert "Traceback" not in plain.err and "Traceback" in debug.err
    assert plain.err.strip().splitlines()[0] in debug.err  # the same one-line message at the end


def test_enough_cases_and_the_errors_page_shows_them():
    assert len(CASES) >= 25 and len({c.id for c in CASES}) == len(CASES)
    commands = {c.command for c in CASES}
    assert {"extract", "onnx", "annotate", "quantize", "trt", "parity", "eval", "bench", "reid-train"} <= commands
    section = doc_section(ERRORS_DOC.read_text(encoding="utf-8"))
    assert section is not None, "docs/errors.md lacks the failure-table markers"
    assert section == render(), "docs/errors.md's table is stale: run python3 tests/failure_table.py --write"


# --------------------------------------------------------------------------- fuzzing

def _structural_regions(checkpoint: Path) -> list[tuple[int, int]]:
    """Byte ranges of a torch zip checkpoint that are not tensor data: entry headers, data.pkl (the
    pickle, with the embedded config), the small records and the central directory."""
    import zipfile

    regions = []
    with zipfile.ZipFile(checkpoint) as archive:
        for info in archive.infolist():
            header = 30 + len(info.filename.encode()) + len(info.extra)
            body = 0 if "/data/" in info.filename else info.compress_size
            regions.append((info.header_offset, info.header_offset + header + body))
    data = checkpoint.read_bytes()
    regions.append((data.find(b"PK\x01\x02"), len(data)))
    return regions


def _flipped(data: bytes, rng: random.Random, regions: list[tuple[int, int]]) -> bytes:
    """1-3 random bytes XOR-ed with a random nonzero value; 70% of them inside ``regions`` (when given),
    drawn in proportion to their sizes."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        if regions and rng.random() < 0.7:
            lo, hi = rng.choices(regions, weights=[hi - lo for lo, hi in regions])[0]
            pos = rng.randrange(lo, hi)
        else:
            pos = rng.randrange(len(buf))
        buf[pos] ^= rng.randrange(1, 256)
    return bytes(buf)


@pytest.mark.slow
def test_fuzzed_models_fail_cleanly(artifacts, tmp_path, capfd):
    """30 damaged copies each of a small ONNX and of a checkpoint through extract: exit 0 with
    features, or 1/2 with one line naming the file; never an internal error, a traceback, or
    anything printed on stderr behind Python's back (ONNX Runtime's own log)."""
    rng = random.Random(8)
    outcomes = {}
    for source, regions in ((artifacts.tiny_onnx, []), (artifacts.r18, _structural_regions(artifacts.r18))):
        data = source.read_bytes()
        for i in range(30):
            fuzzed = tmp_path / f"fuzzed{source.suffix}"
            fuzzed.write_bytes(_flipped(data, rng, regions))
            out = tmp_path / "out" / "f.npy"
            out.parent.mkdir(exist_ok=True)
            for old in out.parent.iterdir():
                old.unlink()
            with shown_warnings() as shown:
                result = run_cli("extract", "--no-progress", fuzzed, artifacts.img, "-o", out)
            fd_err = capfd.readouterr().err
            assert not shown, (source.name, i, shown)
            where = f"{source.name} flip set {i}: {result}"
            assert result.code in (0, 1, 2), where
            assert "Traceback" not in result.err and "internal error" not in result.err, where
            assert not fd_err.strip(), (where, fd_err)
            if result.code:
                lines = [line for line in result.err.splitlines() if line.strip()]
                assert len(lines) == 1 and "fuzzed" in lines[0], where
                assert list(out.parent.iterdir()) == [], where
            else:
                assert np.load(out).shape == (3, 8 if source.suffix == ".onnx" else 512), where
            outcomes[(source.suffix, result.code)] = outcomes.get((source.suffix, result.code), 0) + 1
    print("fuzz outcomes (suffix, exit code): count", outcomes)
    assert outcomes.get((".onnx", 1)) and outcomes.get((".pth", 1)), outcomes  # the flips did damage


# --------------------------------------------------------------------------- kill -9 during a save

_SLOW_SAVE = r'''
import os, sys, time

marker, target = sys.argv[1], sys.argv[2]
real_fsync = os.fsync


def fsync(fd):
    name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
    if name.startswith("." + target + ".") and name.endswith(".tmp"):
        os.ftruncate(fd, os.fstat(fd).st_size // 2)  # half of the checkpoint is on disk ...
        with open(marker, "w") as f:
            f.write(name)
        time.sleep(600)                               # ... when the kill comes
    return real_fsync(fd)


os.fsync = fsync
from reid_train.cli import main

main(sys.argv[3:])
'''


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the file being written in /proc/self/fd")
def test_kill_9_while_writing_a_checkpoint(artifacts, tmp_path):
    """reid-train killed (SIGKILL) while model_0001.pth is half written: the half is a hidden temp
    file, last_checkpoint still names model_0000.pth, and --resume from there removes the partial file and
    reaches the same final state as an uninterrupted run (tests/test_train.py covers a kill at a random point)."""
    from test_train import CPU_CONFIG, _assert_same_run, resume_opts

    # same thread count in every run (the killed one runs with OMP_NUM_THREADS=1): bit-comparable sums
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _kill_while_saving_then_resume(artifacts, tmp_path, CPU_CONFIG, _assert_same_run, resume_opts)
    finally:
        torch.set_num_threads(threads)


def _kill_while_saving_then_resume(artifacts, tmp_path, CPU_CONFIG, _assert_same_run, resume_opts):
    reference = tmp_path / "reference"
    assert run_train("--config", CPU_CONFIG, "--output-dir", reference, "--no-progress",
                     "--opts", *resume_opts(artifacts.datasets, 3)).code == 0
    run, marker = tmp_path / "run", tmp_path / "writing"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", _SLOW_SAVE, str(marker), "model_0001.pth", "--config",
                                 str(CPU_CONFIG), "--output-dir", str(run), "--no-progress",
                                 "--opts", *resume_opts(artifacts.datasets, 3)],
                                cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.time() + 120
        while not (marker.exists() and marker.read_text()):
            assert proc.poll() is None, (tmp_path / "stderr.txt").read_text()
            assert time.time() < deadline, "model_0001.pth was not written within 2 minutes"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    partial = run / marker.read_text()
    assert partial.is_file() and 0 < partial.stat().st_size < (run / "model_0000.pth").stat().st_size
    assert not (run / "model_0001.pth").exists()
    assert (run / "last_checkpoint").read_text() == "model_0000.pth"

    result = run_train("--config", CPU_CONFIG, "--output-dir", run, "--resume", "--no-progress",
                       "--opts", *resume_opts(artifacts.datasets, 3))
    assert result.code == 0, result.err
    log = (run / "log.txt").read_text()
    assert f"resuming from {run / 'model_0000.pth'}" in log
    # the partial file was never loaded, and --resume cleaned it up
    assert f"removed {partial.name}, a partial checkpoint" in log and not partial.exists()
    assert not list(run.glob(".*.tmp"))
    _assert_same_run(torch.load(reference / "model_final.pth", weights_only=True),
                     torch.load(run / "model_final.pth", weights_only=True))
