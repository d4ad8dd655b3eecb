"""reid-export bench: statistics on known samples, the alternating loop with a fake clock, the CLI."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from conftest import CONFIGS, assert_clean_error, randomize_bn, run_cli
from reid_export.bench.core import BenchSettings, CpuTimer, Subject, run_benchmark, split_iterations
from reid_export.bench.report import add_speedups, render_table
from reid_export.bench.stats import percentile, summarize
from reid_export.checkpoint import save_checkpoint
from reid_export.config import load_config
from reid_export.data_config import data_config_from_cfg
from reid_export.errors import ReidExportError
from reid_export.modeling import build_model

# --------------------------------------------------------------------------- statistics


def test_percentile_on_hand_computed_samples():
    samples = [4.0, 1.0, 3.0, 2.0]  # unsorted on purpose; sorted: 1 2 3 4, rank h = 3 * q / 100
    assert percentile(samples, 0) == 1.0
    assert percentile(samples, 100) == 4.0
    assert percentile(samples, 50) == pytest.approx(2.5)   # h = 1.5
    assert percentile(samples, 90) == pytest.approx(3.7)   # h = 2.7 -> 3 + 0.7 * (4 - 3)
    assert percentile(samples, 25) == pytest.approx(1.75)  # h = 0.75
    assert percentile([7.0], 99) == 7.0
    ten = list(range(1, 11))                              # h = 9 * q / 100
    assert percentile(ten, 95) == pytest.approx(9.55)     # h = 8.55 -> 9 + 0.55
    assert percentile(ten, 99) == pytest.approx(9.91)     # h = 8.91 -> 9 + 0.91
    assert percentile(ten, 50) == pytest.approx(5.5)


def test_percentile_matches_numpy_linear():
    rng = np.random.default_rng(3)
    for n in (1, 2, 5, 17, 100, 1001):
        samples = rng.exponential(3.0, n).tolist()
        for q in (0, 1, 50, 90, 95, 99, 99.9, 100):
            assert percentile(samples, q) == pytest.approx(float(np.percentile(samples, q, method="linear")))


@pytest.mark.parametrize("q", [-1, 100.5, float("nan")])
def test_percentile_rejects_bad_q(q):
    with pytest.raises(ValueError):
        percentile([1.0, 2.0], q)


def test_percentile_of_nothing_is_an_error():
    with pytest.raises(ValueError):
        percentile([], 50)


def test_summarize_known_samples():
    res = summarize([10.0, 40.0, 20.0, 30.0], batch_size=4)
    assert res["iterations"] == 4 and res["images"] == 16
    assert res["min_ms"] == 10.0 and res["max_ms"] == 40.0
    assert res["mean_ms"] == pytest.approx(25.0)
    assert res["median_ms"] == pytest.approx(25.0)
    assert res["p90_ms"] == pytest.approx(37.0)           # h = 2.7
    assert res["p95_ms"] == pytest.approx(38.5)           # h = 2.85
    assert res["p99_ms"] == pytest.approx(39.7)           # h = 2.97
    assert res["std_ms"] == pytest.approx(np.std([10, 20, 30, 40]))
    assert res["throughput_ips"] == pytest.approx(16 / 0.1)  # 16 images in 100 ms


def test_few_samples_note():
    from reid_export.bench.stats import few_samples_note

    many = {"name": "a", "batch_size": 1, "iterations": 300}
    assert few_samples_note([many]) is None
    assert few_samples_note([{"name": "x", "batch_size": 4, "error": "boom"}]) is None
    note = few_samples_note([many, {"name": "b", "batch_size": 16, "iterations": 5},
                             {"name": "c", "batch_size": 16, "iterations": 9}])
    assert note.startswith("note: 2 of 3 results") and "fewest: 5, b at batch 16" in note


def test_split_iterations():
    assert split_iterations(10, 3) == [4, 3, 3]
    assert split_iterations(3, 3) == [1, 1, 1]
    assert sum(split_iterations(1001, 7)) == 1001


# --------------------------------------------------------------------------- the loop, with a fake clock


class FakeTimer:
    """Returns scripted latencies instead of measuring; logs every call in a shared list."""

    kind = "fake"

    def __init__(self, name, latencies, log):
        self.name, self.latencies, self.log, self.i = name, latencies, log, 0

    def sync(self):
        pass

    def time(self, fn, arg):
        fn(arg)
        self.log.append(self.name)
        value = self.latencies[self.i % len(self.latencies)]
        self.i += 1
        return value


def _fake_subject(name, latencies, log, fail_at=None):
    def run(arg):
        if fail_at is not None and arg == fail_at:
            raise RuntimeError("CUDA out of memory (pretend)")

    return Subject(name=name, run=run, make_input=lambda bs: bs, backend="fake", timer=FakeTimer(name, latencies, log))


def test_models_alternate_and_statistics_come_from_the_timer():
    log = []
    a = _fake_subject("A", [1.0, 2.0, 3.0, 4.0], log)
    b = _fake_subject("B", [10.0], log)
    settings = BenchSettings(batch_sizes=(1, 4), warmup_s=0, iterations=4, rounds=4)
    results = run_benchmark([a, b], settings)
    # per batch size: one warmup call each, then A B A B A B A B
    assert log[:10] == ["A", "B"] + ["A", "B"] * 4
    assert len(log) == 2 * 10
    by = {(r["name"], r["batch_size"]): r for r in results}
    a1 = by[("A", 1)]
    # warmup consumed latency 1.0; timed: 2, 3, 4, 1
    assert a1["iterations"] == 4 and a1["min_ms"] == 1.0 and a1["max_ms"] == 4.0
    assert a1["median_ms"] == pytest.approx(2.5)
    assert a1["throughput_ips"] == pytest.approx(4 / 0.010)
    b4 = by[("B", 4)]
    assert b4["p99_ms"] == 10.0 and b4["throughput_ips"] == pytest.approx(16 / 0.040)
    add_speedups(results)
    assert by[("B", 1)]["speedup_vs_first"] == pytest.approx(0.25)
    table = render_table(results)
    assert "| A " in table and "| B " in table and "400" in table


def test_duration_mode_runs_until_measured_time_per_slice():
    log = []
    a = _fake_subject("A", [10.0], log)
    settings = BenchSettings(batch_sizes=(2,), warmup_s=0.025, duration_s=0.1, rounds=5)
    (res,) = run_benchmark([a], settings)
    assert res["warmup_iterations"] == 3          # 10 ms each until >= 25 ms
    assert res["iterations"] == 10                # 5 slices of 20 ms
    assert res["throughput_ips"] == pytest.approx(200.0)


def test_failure_at_one_batch_size_is_recorded_and_others_go_on():
    log = []
    ok = _fake_subject("ok", [1.0], log)
    bad = _fake_subject("bad", [1.0], log, fail_at=8)
    results = run_benchmark([ok, bad], BenchSettings(batch_sizes=(1, 8), warmup_s=0, iterations=2, rounds=2))
    by = {(r["name"], r["batch_size"]): r for r in results}
    assert by[("bad", 8)]["error"] == "RuntimeError: CUDA out of memory (pretend)"
    assert by[("bad", 1)]["error"] is None and by[("ok", 8)]["iterations"] == 2
    assert "ERROR bad at batch 8" in render_table(results)


def test_real_clock_is_used_by_default():
    subject = Subject(name="sleep", run=lambda _: None, make_input=lambda bs: None)
    assert isinstance(subject.timer, CpuTimer)
    ticks = iter([1.0, 1.25])
    assert CpuTimer(clock=lambda: next(ticks)).time(lambda _: None, None) == pytest.approx(250.0)


@pytest.mark.parametrize("kwargs", [dict(batch_sizes=()), dict(batch_sizes=(0,)), dict(warmup_s=-1),
                                    dict(duration_s=0), dict(iterations=0), dict(rounds=0)])
def test_bad_settings(kwargs):
    with pytest.raises(ReidExportError):
        BenchSettings(**kwargs).validate()


# --------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def r18_pair(tmp_path_factory):
    """Two small checkpoints (R18 at 64x32) that carry their config."""
    folder = tmp_path_factory.mktemp("bench")
    cfg = load_config(CONFIGS / "Market1501/bagtricks_R18.yml", ["INPUT.SIZE_TEST", "[64, 32]"])
    torch.manual_seed(0)
    model = randomize_bn(build_model(cfg), size=(64, 32))
    paths = []
    for name in ("a.pth", "b.pth"):
        paths.append(save_checkpoint(folder / name, model, cfg, data_config_from_cfg(cfg, model.feat_dim, "r18")))
    return paths


FAST = ("--iterations", "2", "--warmup", "0", "--rounds", "2", "--no-progress")


@pytest.mark.slow
def test_bench_cli_writes_table_json_csv_plot(r18_pair, tmp_path):
    threads_before = torch.get_num_threads()
    report, table_csv, plot = tmp_path / "bench.json", tmp_path / "bench.csv", tmp_path / "bench.png"
    result = run_cli("bench", *r18_pair, "--batch-sizes", "1,2", "--threads", "1", *FAST,
                     "--report", report, "--csv", table_csv, "--plot", plot)
    assert result.code == 0, result
    assert "a.pth" in result.out and "b.pth" in result.out and "img/s" in result.out
    assert torch.get_num_threads() == threads_before  # the thread count is restored
    doc = json.loads(report.read_text())
    assert doc["passed"] is True
    assert doc["settings"]["threads"] == 1 and doc["settings"]["iterations"] == 2
    assert doc["settings"]["batch_sizes"] == [1, 2]
    env = doc["environment"]
    for key in ("cpu", "cpu_flags", "versions", "threads", "load_average_before", "load_average_after", "gpu"):
        assert key in env
    assert env["versions"]["torch"] == torch.__version__
    assert len(doc["results"]) == 4
    for res in doc["results"]:
        assert res["iterations"] == 2 and res["images"] == 2 * res["batch_size"]
        assert res["min_ms"] <= res["median_ms"] <= res["p90_ms"] <= res["p99_ms"] <= res["max_ms"]
        assert res["throughput_ips"] > 0 and res["backend"] == "torch" and res["precision"] == "fp32"
    rows = list(csv.DictReader(table_csv.open()))
    assert [(r["name"], r["batch_size"]) for r in rows] == [("a.pth", "1"), ("b.pth", "1"), ("a.pth", "2"),
                                                            ("b.pth", "2")]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # 2 timed calls per result: the tail percentiles are flagged as thin, on stderr and in the JSON
    assert "4 of 4 results have fewer than 100 timed calls (fewest: 2" in result.err and "--iterations 100" in result.err
    assert doc["notes"] and "`iterations` 100" in doc["notes"][0]  # the report keeps the library's words


@pytest.mark.slow
def test_bench_include_preprocess_times_real_files(r18_pair, image_dir, tmp_path, monkeypatch):
    """Decoding is inside the timed call: a decoder made 40 ms slower per image shows in every
    latency figure with --include-preprocess (batch 3: >= 120 ms); without it nothing is decoded."""
    import importlib
    import time

    pre = importlib.import_module("reid_export.preprocess")  # the module, not the function

    decoded = []
    real_read = pre.read_image

    def slow_read(path):
        decoded.append(path)
        time.sleep(0.04)
        return real_read(path)

    monkeypatch.setattr(pre, "read_image", slow_read)
    report = tmp_path / "bench.json"
    result = run_cli("bench", r18_pair[0], "--batch-sizes", "3", "--include-preprocess", "--images", image_dir,
                     *FAST, "--report", report)
    assert result.code == 0, result
    doc = json.loads(report.read_text())
    assert doc["settings"]["include_preprocess"] is True and len(doc["settings"]["images"]) == 4
    assert doc["models"][0]["input"].startswith("files")
    timed = doc["results"][0]
    assert timed["min_ms"] >= 3 * 40, timed  # every timed call decoded its 3 files
    assert len(decoded) >= 3 * timed["iterations"]
    decoded.clear()
    plain = tmp_path / "plain.json"
    result = run_cli("bench", r18_pair[0], "--batch-sizes", "3", *FAST, "--report", plain)
    assert result.code == 0, result
    assert not decoded  # tensors prepared untimed: no file is decoded at all


@pytest.mark.slow
def test_bench_onnx_beside_torch(r18_pair, tmp_path):
    onnx_path = tmp_path / "a.onnx"
    exported = run_cli("onnx", r18_pair[0], "-o", onnx_path, "--exporter", "torchscript", "--no-simplify")
    assert exported.code == 0, exported
    report = tmp_path / "bench.json"
    result = run_cli("bench", r18_pair[0], onnx_path, "--batch-sizes", "2", "--threads", "1", *FAST,
                     "--report", report)
    assert result.code == 0, result
    backends = [r["backend"] for r in json.loads(report.read_text())["results"]]
    assert backends == ["torch", "onnxruntime"]


# --------------------------------------------------------------------------- clear failures


def test_missing_model_fails_before_timing(r18_pair, tmp_path):
    report = tmp_path / "bench.json"
    result = run_cli("bench", r18_pair[0], tmp_path / "missing.pth", *FAST, "--report", report)
    assert_clean_error(result, "missing.pth")
    assert not report.exists()


def test_corrupt_checkpoint_fails_clearly(tmp_path):
    bad = tmp_path / "broken.pth"
    bad.write_bytes(b"this is not a checkpoint")
    assert_clean_error(run_cli("bench", bad, *FAST), "broken.pth")


def test_corrupt_onnx_fails_clearly(tmp_path):
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"\x08\x07garbage")
    assert_clean_error(run_cli("bench", bad, *FAST), "broken.onnx")


def test_unknown_model_type_fails_clearly(tmp_path):
    other = tmp_path / "model.xyz"
    other.write_bytes(b"x")
    assert_clean_error(run_cli("bench", other, *FAST), "model.xyz", "unknown model type")


def test_half_on_cpu_is_a_usage_error(r18_pair):
    if torch.cuda.is_available():
        pytest.skip("CUDA present: @fp16 is valid here")
    result = run_cli("bench", f"{r18_pair[0]}@fp16", *FAST)
    assert_clean_error(result, "cuda")
    assert result.code == 2


@pytest.mark.parametrize("args, needle", [
    (("--duration", "1", "--iterations", "3"), "--duration"),
    (("--include-preprocess",), "--images"),
    (("--batch-sizes", "1,x"), "batch-sizes"),
    (("--batch-sizes", "0"), "batch-sizes"),
    (("--threads", "0"), "threads"),
    (("--warmup", "-1"), "--warmup"),
    (("--plot", "bench.jpg"), "PNG"),
])
def test_usage_errors(r18_pair, tmp_path, args, needle):
    args = tuple(str(tmp_path / a) if a.endswith(".jpg") else a for a in args)
    result = run_cli("bench", r18_pair[0], "--no-progress", *args)
    assert_clean_error(result, needle)
    assert result.code == 2


def test_same_model_twice_is_refused(r18_pair):
    assert_clean_error(run_cli("bench", r18_pair[0], r18_pair[0], *FAST), "given twice")


def test_gpu_column_uses_the_allocator_for_torch_and_the_device_for_others():
    base = {"precision": "fp16", "batch_size": 64, "iterations": 3, "min_ms": 1.0, "mean_ms": 1.0, "median_ms": 1.0,
            "p90_ms": 1.0, "p95_ms": 1.0, "p99_ms": 1.0, "max_ms": 1.0, "throughput_ips": 64000.0,
            "speedup_vs_first": 1.0, "rss_peak_mib": 10.0, "gpu_peak_mib": 0.0, "gpu_used_mib": 1900.0}
    table = render_table([{**base, "name": "t", "backend": "torch", "gpu_peak_mib": 812.0},
                          {**base, "name": "o", "backend": "onnxruntime"}], gpu=True)
    assert "GPU MiB" in table.splitlines()[0]
    assert table.splitlines()[2].rstrip(" |").endswith("812")
    assert "1900 (device)" in table.splitlines()[3]


def test_a_reduced_precision_model_slower_than_fp32_is_told_the_faster_route():
    """bench and quantize name the faster route for this CPU when an FP16/INT8 model runs slower than
    FP32; nothing is said when it is not slower, and the advice follows the CPU's flags."""
    from types import SimpleNamespace

    from reid_export.bench.run import _slower_routes
    from reid_export.cpuinfo import slower_route_note

    vnni = {"avx2", "avx512f", "avx512_vnni"}
    trt = slower_route_note("m.int8.onnx", "int8", "onnxruntime", "tensorrt", {1: 0.42, 16: 0.25}, vnni)
    assert "0.42x at batch 1, 0.25x at batch 16" in trt and "--target cpu" in trt and "reid-export openvino" in trt
    assert "avx512_vnni" in trt
    assert slower_route_note("m.int8.onnx", "int8", "onnxruntime", "tensorrt", {1: 1.3, 16: 1.1}, vnni) is None
    no_vnni = slower_route_note("m.int8-cpu.onnx", "int8", "onnxruntime", "cpu", {16: 0.8}, {"avx2"})
    assert "no int8 dot product" in no_vnni and "FP32" in no_vnni
    fp16 = slower_route_note("m.fp16.onnx", "fp16", "onnxruntime", None, {1: 0.6}, {"avx2", "avx512_bf16"})
    assert "float32 with casts" in fp16 and "bf16" in fp16
    # bench: measured against the first FP32 subject, per batch size
    subjects = [SimpleNamespace(name="fp32", precision="fp32", backend="onnxruntime", model="a.onnx"),
                SimpleNamespace(name="int8", precision="int8", backend="onnxruntime", model="missing.onnx"),
                SimpleNamespace(name="fast", precision="int8", backend="onnxruntime", model="missing.onnx")]
    results = [{"name": n, "batch_size": b, "throughput_ips": t} for n, b, t in
               (("fp32", 1, 100.0), ("fp32", 16, 200.0), ("int8", 1, 50.0), ("int8", 16, 250.0),
                ("fast", 1, 150.0), ("fast", 16, 300.0))]
    notes = _slower_routes(subjects, results)
    assert len(notes) == 1 and notes[0].startswith("note: int8 (int8 on onnxruntime)") and "0.50x at batch 1" in notes[0]
    assert _slower_routes(subjects[1:], results) == []  # no FP32 model in the run: nothing to compare with
