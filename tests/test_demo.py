"""reid-export demo: the whole pipeline at a tiny size (8 identities, 1 epoch, 32x16 input), in-process.

One run is shared by the tests (module fixture): report.md and the JSON reports exist and hold
their sections, a second run reuses every stage, changing one stage's inputs re-runs only what
depends on it, and a broken stage stops the run with one line naming it. The stage runner's
reuse rules are also tested on their own with trivial stages (no models)."""

from __future__ import annotations

import json
import re
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import command_lines, parse_command_line, assert_clean_error, run_cli
from reid_export.demo import PRESETS, Preset, run_demo
from reid_export.demo.stages import Stage, StageFailed, StageRunner
from reid_export.errors import ReidExportError

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

STAGES = ["data", "train", "untrained", "onnx", "fp16", "int8-tensorrt", "int8-cpu", "parity", "eval", "bench"]

# Seconds, not minutes: 4 train + 4 test identities, 2 cameras, 64x32 images, 32x16 input, one
# epoch of 2 iterations, 16 calibration images, a 0.1 s bench at batch 1 and 2.
TINY = Preset(
    "tiny", "bot_R18_demo.yml",
    opts=("INPUT.SIZE_TRAIN", "[32, 16]", "INPUT.SIZE_TEST", "[32, 16]", "INPUT.PADDING.SIZE", "2",
          "SOLVER.MAX_EPOCH", "1", "SOLVER.IMS_PER_BATCH", "8", "DATALOADER.NUM_INSTANCE", "2",
          "SOLVER.WARMUP_ITERS", "1", "SOLVER.STEPS", "[1]", "TEST.IMS_PER_BATCH", "32"),
    identities=8, cameras=2, images_per_id_per_camera=2, synth_size=(64, 32), distractors=2, junk=1,
    calib_size=16, bench_batch_sizes=(1, 2), bench_warmup=0.02, bench_duration=0.1, bench_rounds=1,
)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo") / "work"
    lines: list[str] = []
    result = run_demo(workdir, preset=TINY, progress=False, echo=lines.append)
    return workdir, result, lines


def _manifests(workdir: Path) -> dict[str, int]:
    return {p.stem: p.stat().st_mtime_ns for p in (workdir / "stages").glob("*.json")}


def test_first_run_writes_report_and_json_reports(tiny_run):
    workdir, result, lines = tiny_run
    assert result.statuses == {name: "ran" for name in STAGES}
    for i, name in enumerate(STAGES, 1):  # one line per stage when it starts and one with its time
        assert any(re.match(rf"\[{i}/10\] {re.escape(name)}: done in \d+\.\d s", line) for line in lines), lines
    assert lines[-1] == f"report: {result.report}" or lines[-1].endswith("report.md")

    report = (workdir / "report.md").read_text()
    for section in ("# reid-export demo report", "## Summary", "## Data", "## Training", "## Exported models",
                    "## Parity (each variant vs the checkpoint)", "## Accuracy across backends", "## Speed",
                    "## Stages", "## Reproduce"):
        assert section in report, section
    for label in ("torch FP32 (checkpoint)", "ONNX FP32", "ONNX FP16", "ONNX INT8 tensorrt (S8S8)",
                  "ONNX INT8 cpu (U8S8)", "untrained (random init)"):
        assert label in report, label
    assert "Trained vs untrained" in report and "**gain**" in report
    # every link and image in the report points at a file beside it
    targets = re.findall(r"\]\(([^)]+)\)", report)
    for png in ("plots/roc.png", "plots/ranklist_best.png", "plots/ranklist_worst.png", "bench.png"):
        assert png in targets, png
    for target in targets:
        assert (workdir / target).is_file(), target
        if target.endswith(".png"):
            assert (workdir / target).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for stage in STAGES:
        assert re.search(rf"\| \d+ \| {re.escape(stage)} \| ran \| \d+\.\d \|", report), stage
    assert "reid-export quantize models/model.onnx -o models/model.int8-cpu.onnx --precision int8 --target cpu" \
        in report

    parity = json.loads((workdir / "parity.json").read_text())
    assert [Path(c["candidate"]).name for c in parity["candidates"]] == \
        ["model.onnx", "model.fp16.onnx", "model.int8-trt.onnx", "model.int8-cpu.onnx"]
    assert parity["candidates"][0]["max_rel_l2"] < 1e-4
    evaluation = json.loads((workdir / "eval.json").read_text())
    assert [Path(m["model"]).name for m in evaluation["models"]] == \
        ["model_final.pth", "model.onnx", "model.fp16.onnx", "model.int8-trt.onnx", "model.int8-cpu.onnx",
         "untrained.pth"]
    assert all("mAP" in m and "delta_mAP" in m for m in evaluation["models"])
    assert evaluation["num_query"] == 8
    bench = json.loads((workdir / "bench.json").read_text())
    assert {(Path(r["model"]).name, r["batch_size"]) for r in bench["results"]} == \
        {(n, b) for n in ("model_final.pth", "model.onnx", "model.fp16.onnx", "model.int8-trt.onnx",
                          "model.int8-cpu.onnx") for b in (1, 2)}
    assert bench["passed"] and bench["environment"]["load_average_before"]
    demo = json.loads((workdir / "demo.json").read_text())
    assert [s["name"] for s in demo["stages"]] == STAGES and not demo["failed"]
    train = demo["stages"][1]["result"]
    assert train["epochs"] == 1 and train["iterations"] == 2
    untrained = torch.load(workdir / "models/untrained.pth", weights_only=True)
    trained = torch.load(workdir / "train/model_final.pth", weights_only=True)
    assert untrained["data_config"]["height"] == trained["data_config"]["height"] == 32
    assert not torch.equal(untrained["model"]["backbone.conv1.weight"], trained["model"]["backbone.conv1.weight"])
    leftovers = [p for p in workdir.rglob("*") if p.name.endswith(".tmp") or ".synth-" in p.name]
    assert not leftovers, leftovers


def test_every_command_the_report_shows_parses(tiny_run):
    """The Reproduce section's reid-export commands are real: every option exists, every argument is there."""
    workdir, _, _ = tiny_run
    shown = command_lines((workdir / "report.md").read_text())  # the first run's report: every stage ran
    assert len(shown) == len(STAGES) - 2, shown  # all but the trainer's (reid-train) and the untrained model's (none)
    assert any(line.startswith("reid-export onnx ") for line in shown)
    for line in shown:
        parse_command_line(line)


def test_second_run_reuses_every_stage(tiny_run):
    workdir, _, _ = tiny_run
    before = _manifests(workdir)
    lines: list[str] = []
    start = time.perf_counter()
    result = run_demo(workdir, preset=TINY, progress=False, echo=lines.append)
    assert time.perf_counter() - start < 20
    assert result.statuses == {name: "reused" for name in STAGES}
    assert sum("reused" in line for line in lines) == len(STAGES)
    assert _manifests(workdir) == before
    report = (workdir / "report.md").read_text()
    assert "| 1 | data | reused |" in report and "## Reproduce" in report


def test_changed_settings_rerun_only_the_stages_that_depend_on_them(tiny_run):
    workdir, _, _ = tiny_run
    changed = replace(TINY, bench_duration=0.05)
    result = run_demo(workdir, preset=changed, progress=False, echo=lambda line: None)
    assert result.statuses == {**{name: "reused" for name in STAGES}, "bench": "ran"}
    assert json.loads((workdir / "bench.json").read_text())["settings"]["duration_s"] == 0.05


def test_edited_output_is_made_again(tiny_run):
    workdir, _, _ = tiny_run
    changed = replace(TINY, bench_duration=0.05)
    (workdir / "data.json").write_text((workdir / "data.json").read_text() + " ")
    result = run_demo(workdir, preset=changed, progress=False, echo=lambda line: None)
    # data.json was rewritten with the same content: the stages after it see the same inputs
    assert result.statuses == {**{name: "reused" for name in STAGES}, "data": "ran"}


def test_broken_stage_fails_with_one_line_naming_it(tiny_run, monkeypatch):
    workdir, _, _ = tiny_run

    def broken(*args, **kwargs):
        raise RuntimeError("calibration exploded\nwith a second line")

    monkeypatch.setitem(PRESETS, "quick", TINY)
    monkeypatch.setattr("reid_export.export.quantize.quantize_file", broken)
    (workdir / "stages" / "int8-cpu.json").unlink()  # as if the stage had never finished
    res = run_cli("demo", "--quick", "--workdir", workdir, "--no-progress")
    assert_clean_error(res, "demo stage 'int8-cpu' failed", "RuntimeError: calibration exploded with a second line")
    assert res.code == 1
    assert "[6/10] int8-tensorrt: reused" in res.out and "[8/10]" not in res.out
    report = (workdir / "report.md").read_text()
    assert "**FAILED** `int8-cpu`" in report and "| 8 | parity | not reached |" in report
    assert not (workdir / "stages" / "int8-cpu.json").exists()


def test_data_folder_without_market_layout_fails_in_the_data_stage(tmp_path):
    (tmp_path / "empty").mkdir()
    res = run_cli("demo", "--workdir", tmp_path / "w", "--data", tmp_path / "empty")
    assert_clean_error(res, "demo stage 'data' failed", "no Market-1501 layout")
    res = run_cli("demo", "--workdir", tmp_path / "w2", "--data", tmp_path / "missing")
    assert_clean_error(res, "--data", "no such folder")
    assert res.code == 2


def test_refuses_a_workdir_that_holds_other_files(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    res = run_cli("demo", "--workdir", tmp_path)
    assert_clean_error(res, "--workdir", "not empty")
    assert res.code == 2 and [p.name for p in tmp_path.iterdir()] == ["mine.txt"]


def test_help_lists_the_options_and_stages():
    res = run_cli("demo", "--help")
    assert res.code == 0
    for word in ("--workdir", "--data", "--quick", "--force", "int8-tensorrt", "report.md"):
        assert word in res.out, word


# --------------------------------------------------------------------------- the stage runner alone

def _copy_stage(src: Path, runs: list[str], passed: bool = True) -> Stage:
    def run(r):
        runs.append("copy")
        (r.workdir / "out.txt").write_text(src.read_text().upper())
        return {"passed": passed, "failures": [] if passed else ["numbers differ"]}

    return Stage("copy", "copy upper-cased", ["out.txt"], lambda: {"src": src.read_text(), "k": 1}, run)


def test_runner_reuses_until_inputs_or_outputs_change(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("a")
    work = tmp_path / "w"
    runs: list[str] = []

    def status(force=False):
        return StageRunner(work, 1, force=force, echo=lambda line: None).run(1, _copy_stage(src, runs)).status

    assert status() == "ran"
    assert status() == "reused"
    src.write_text("b")                            # input changed
    assert status() == "ran" and (work / "out.txt").read_text() == "B"
    (work / "out.txt").write_text("edited")        # output edited
    assert status() == "ran"
    (work / "out.txt").unlink()                    # output deleted
    assert status() == "ran"
    assert status(force=True) == "ran"
    assert status() == "reused" and len(runs) == 5


def test_runner_failed_check_keeps_outputs_but_no_manifest(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("a")
    runner = StageRunner(tmp_path / "w", 1, echo=lambda line: None)
    record = runner.run(1, _copy_stage(src, [], passed=False))
    assert record.status == "check failed" and record.result["failures"] == ["numbers differ"]
    assert (tmp_path / "w/out.txt").is_file() and not (tmp_path / "w/stages/copy.json").exists()


def test_runner_turns_any_exception_into_one_line_naming_the_stage(tmp_path):
    def run(r):
        r.log("step 1")
        raise ValueError("bad\nvalue")

    runner = StageRunner(tmp_path, 3, echo=lambda line: None)
    with pytest.raises(StageFailed) as info:
        runner.run(2, Stage("explode", "explode", ["x"], lambda: {}, run))
    message = str(info.value)
    assert "\n" not in message and message.startswith("demo stage 'explode' failed: ValueError: bad value")
    assert "logs/explode.log" in message and isinstance(info.value, ReidExportError)
    with pytest.raises(StageFailed, match="finished without writing x"):
        runner.run(2, Stage("lazy", "lazy", ["x"], lambda: {}, lambda r: {}))
