"""benchmarks/int8_must_show.py without the heavy runs: the user's command lines it runs, the paired deltas,
the default outcome it reports, which graph it measures, and the RESULTS table it writes from the JSON."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
from conftest import load_benchmark


@pytest.fixture(scope="module")
def ms():
    return load_benchmark("int8_must_show")


def test_quantize_commands_are_the_defaults(ms, tmp_path):
    kinds = ms.quantize_kinds()
    assert kinds == ["int8-tensorrt-default", "int8-tensorrt-allow", "int8-cpu-default", "int8-cpu-allow", "fp16"]
    out = tmp_path / "m.int8-cpu-allow.onnx"
    cmd = ms.quantize_command(tmp_path / "m.onnx", out, "int8-cpu-allow", tmp_path / "train", 2)
    assert cmd[:4] == [sys.executable, "-m", "reid_export", "quantize"]
    args = cmd[4:]
    assert args[args.index("--target") + 1] == "cpu" and args[args.index("--precision") + 1] == "int8"
    assert "--allow-below-gate" in args and args[args.index("--report") + 1] == str(out.with_suffix(".json"))
    # nothing else than the defaults: no method, gate, fallback or calibration-size option
    assert not [a for a in args if a.startswith("--") and a not in
                ("--precision", "--target", "--allow-below-gate", "--calib-dir", "--threads", "--report")]
    default = ms.quantize_command(tmp_path / "m.onnx", out, "int8-tensorrt-default", tmp_path / "train", 1)
    assert "--allow-below-gate" not in default and default[default.index("--target") + 1] == "tensorrt"
    fp16 = ms.quantize_command(tmp_path / "m.onnx", out, "fp16", tmp_path / "train", 1)
    assert fp16[fp16.index("--precision") + 1] == "fp16" and "--calib-dir" in fp16 and "--target" not in fp16


def test_paired_delta(ms):
    ref = np.array([100.0, 0.0, 100.0, 0.0, np.nan])
    cand = np.array([100.0, 100.0, 0.0, 100.0, 0.0])
    d = ms.paired_delta(ref, cand)
    diff = np.array([0.0, 100.0, -100.0, 100.0])
    assert d["n"] == 4 and d["changed"] == 3
    assert d["delta"] == pytest.approx(25.0)
    assert d["half_width"] == pytest.approx(2 * np.std(diff, ddof=1) / 2)
    same = ms.paired_delta(ref, ref)
    assert same["delta"] == 0 and same["half_width"] == 0 and same["changed"] == 0


def test_retrieval_scores_market_protocol(ms):
    from reid_export.verify.retrieval import SplitArrays

    q = SplitArrays(["q0", "q1"], np.array([1, 2]), np.array([0, 0]))
    g = SplitArrays(["g0", "g1", "g2"], np.array([1, 2, 1]), np.array([1, 1, 0]))
    qf = np.array([[1.0, 0.0], [1.0, 0.0]], np.float32)
    gf = np.array([[0.9, 0.1], [0.8, 0.2], [1.0, 0.0]], np.float32)  # g2: same id, same camera as q0: ignored
    ap, hit = ms.retrieval_scores(qf, gf, q, g)
    assert hit[0] == 100.0 and ap[0] == pytest.approx(100.0)
    assert hit[1] == 0.0  # q1's match g1 ranks behind g2 and g0 (other people: not ignored for q1)
    assert ap[1] == pytest.approx(100.0 / 3)


def _run(gate_passed, rc=None, written=None, **extra):
    run = {"gate_passed": gate_passed, "written": written, "returncode": rc, "candidate": "mse, equalised, bias-corrected, 3 nodes in float",
           "method": "mse, equalised, bias-corrected, 3 nodes in float", "variant": "equalised", "bias_corrected": True, "fallback_float": 3, "kept_float": 20,
           "seconds": 600.0, "held_out_retrieval": None}
    run.update(extra)
    return run


def test_outcome_observed_and_inferred(ms):
    runs = {"int8-tensorrt-default": _run(False, rc=1, written=False), "int8-tensorrt-allow": _run(False, rc=0, written=True),
            "int8-cpu-allow": _run(True, rc=0, written=True)}
    assert ms.outcome(runs, "tensorrt") == "refused (exit 1, 600 s)"
    assert ms.outcome(runs, "cpu").startswith("passed (not run")
    assert ms.outcome({}, "cpu") == "not run"
    assert ms.candidate_text(runs["int8-cpu-allow"]) == "mse, equalised, bias-corr., 3 fallback / 20 float"


def test_model_graphs_prefers_the_default_output(ms, tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    for kind in ("int8-tensorrt-default", "int8-tensorrt-allow", "int8-cpu-allow", "fp16"):
        (runs / f"m.{kind}.onnx").write_bytes(b"x")
    (tmp_path / "modelopt" / "m-max").mkdir(parents=True)
    (tmp_path / "modelopt" / "m-max" / "out.reid.onnx").write_bytes(b"x")
    graphs = {g["label"]: g for g in ms.model_graphs("m", tmp_path / "m.onnx", tmp_path)}
    assert list(graphs) == ["fp32", "ours tensorrt", "ours cpu", "fp16", "modelopt max"]
    assert graphs["ours tensorrt"]["run"] == "int8-tensorrt-default"  # written by default: the gate passed
    assert graphs["ours cpu"]["run"] == "int8-cpu-allow"


def test_run_summary_reads_the_report(ms):
    report = {"written": False, "gate_passed": False, "method": "mse", "seconds": 12.0,
              "kept_float": ["a", "b"], "fallback_float": ["b"],
              "parity_vs_fp32": {"pair_error": 0.2, "min_cosine": 0.9, "mean_cosine": 0.98, "top1_agreement": 0.8},
              "search": {"chosen": "mse, equalised", "variant": "equalised", "bias_corrected": True,
                         "held_out_retrieval": {"queries": 5}}, "notes": []}
    s = ms.run_summary(report, {"returncode": 1, "seconds": 13.5, "command": "c"})
    assert s["returncode"] == 1 and s["pair_error"] == 0.2 and s["fallback_float"] == 1 and s["kept_float"] == 2
    assert s["held_out_retrieval"] == {"queries": 5} and s["seconds"] == 13.5


def test_markdown_table_from_synthetic_json(ms):
    def delta(x):
        return {"delta": x, "sd": 1.0, "half_width": 0.5, "n": 10, "changed": 1}

    sets = {"cuhk03": {"Rank-1": 40.0, "mAP": 41.0, "queries": 10}}
    retrieval = {"delta_Rank-1": -1.0, "delta_Rank-1_ci95": [-3.0, 1.0], "delta_mAP": 0.5,
                 "delta_mAP_ci95": [-0.2, 1.2]}
    data = {"sets": {"cuhk03": {}}, "models": {"m": {
        "runs": {"int8-tensorrt-default": _run(False, rc=1, written=False),
                 "int8-tensorrt-allow": _run(False, rc=0, written=True, held_out_retrieval=retrieval),
                 "fp16": _run(True, rc=0, written=True)},
        "modelopt": {"entropy": {"seconds": 99.0}},
        "graphs": [
            {"label": "fp32", "sets": sets},
            {"label": "ours tensorrt", "run": "int8-tensorrt-allow",
             "held_out": {"pair_error": 0.123, "min_cosine": 0.9, "mean_cosine": 0.98, "top1": 0.8},
             "sets": {"cuhk03": {"dRank-1": delta(-1.0), "dmAP": delta(0.25)}}},
            {"label": "fp16", "run": "fp16", "held_out": {"pair_error": 0.01, "min_cosine": 1.0, "mean_cosine": 1.0,
                                                         "top1": 1.0},
             "sets": {"cuhk03": {"dRank-1": delta(0.0), "dmAP": delta(0.0)}}},
            {"label": "modelopt entropy", "held_out": {"pair_error": 0.5, "min_cosine": 0.8, "mean_cosine": 0.9,
                                                      "top1": 0.6},
             "sets": {"cuhk03": {"dRank-1": delta(-5.0), "dmAP": delta(-4.0)}}}]}}}
    text = ms.markdown_table(json.loads(json.dumps(data)))
    lines = text.splitlines()
    assert len(lines) == 2 + 4
    assert all(line.count("|") == lines[0].count("|") for line in lines)
    trt = lines[3]
    assert "INT8 tensorrt (below gate)" in trt and "refused (exit 1, 600 s)" in trt and "0.123" in trt
    assert "-1.00 ± 0.50 / +0.25 ± 0.50" in trt and "-1.00 [-3.0, +1.0] / +0.50 [-0.2, +1.2]" in trt
    assert "| 600 |" in trt
    assert "passed (exit 0)" in lines[4]
    assert "ModelOpt entropy (its default)" in lines[5] and "| 99 |" in lines[5]
    assert "R1 40.00 / mAP 41.00 (10 q)" in lines[2]
    assert math.isclose(float(trt.split("|")[5]), 0.123)


def test_same_search(ms):
    def report(pair, chosen="mse"):
        return {"search": {"chosen": chosen, "tried": [{"label": "mse", "objective": {"pair_error": pair}},
                                                       {"label": "entropy", "objective": {"pair_error": 5.0}}]}}
    assert ms.same_search(report(0.2), report(0.2))
    assert not ms.same_search(report(0.2), report(0.21))
    assert not ms.same_search(report(0.2), report(0.2, chosen="entropy"))
