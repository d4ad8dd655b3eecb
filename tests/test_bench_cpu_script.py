"""benchmarks/cpu_bench.py without running models: its commands and its summary of a bench report."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import load_benchmark


@pytest.fixture(scope="module")
def cpu_bench():
    return load_benchmark("cpu_bench")


def test_dry_run_prints_every_command(cpu_bench, tmp_path, capsys):
    ckpt = tmp_path / "bot.pth"
    assert cpu_bench.main(["--dry-run", "--work", str(tmp_path), "--checkpoint", str(ckpt), "--threads", "2",
                           "--accuracy-checkpoint", str(tmp_path / "trained.pth")]) == 0
    out = capsys.readouterr().out
    commands = [line[2:] for line in out.splitlines() if line.startswith("$ ")]
    assert commands[0] == f"reid-export onnx {ckpt} -o {tmp_path}/bot-r50.onnx"
    assert any("--precision int8 --target cpu" in c for c in commands)
    assert any("--precision int8 --target tensorrt" in c for c in commands)
    bench = next(c for c in commands if c.startswith("reid-export bench "))
    assert "--batch-sizes 1,16 --threads 2" in bench
    order = [str(ckpt)] + [f"{tmp_path}/bot-r50{s}" for s in (".onnx", ".fp16.onnx", ".int8-trt.onnx",
                                                               ".int8-cpu.onnx")]
    assert bench.split()[2:7] == order
    # a trained --checkpoint: the timed models are compared with it on real crops, after the timing
    parity = next(c for c in commands if c.startswith("reid-export parity "))
    assert commands.index(parity) == commands.index(bench) + 1 and parity.split()[2:7] == order
    evaluate = next(c for c in commands if c.startswith("reid-export eval "))
    assert f"{tmp_path.name}-trained-acc.int8-cpu.onnx" in evaluate  # named after the run folder too
    assert commands[-1].startswith("reid-export parity ") and f"{tmp_path.name}-trained-acc.int8-cpu.onnx" in \
        commands[-1]
    assert not list(tmp_path.iterdir())  # a dry run writes nothing


def test_dry_run_with_random_weights_skips_parity(cpu_bench, tmp_path, capsys):
    assert cpu_bench.main(["--dry-run", "--work", str(tmp_path), "--part", "speed"]) == 0
    out = capsys.readouterr().out
    assert not any(line.startswith("$ reid-export parity") for line in out.splitlines())
    assert "parity of the timed models skipped: random weights" in out


def _res(path, batch, ips, first_ips):
    return {"name": Path(path).name, "model": str(path), "batch_size": batch, "throughput_ips": ips,
            "median_ms": batch / ips * 1000, "p90_ms": 1.0, "p99_ms": 2.0, "speedup_vs_first": ips / first_ips}


def test_summary_ratios_and_targets(cpu_bench, tmp_path):
    paths = {label: tmp_path / f"m{suffix}" for label, suffix in cpu_bench.ORDER}
    ips = {"torch eager fp32": (10, 20), "ORT fp32": (16, 25), "ORT fp16": (9, 12), "ORT int8 (tensorrt)": (15, 40),
           "ORT int8 (cpu)": (30, 90)}
    results = [_res(paths[label], batch, ips[label][i], ips["torch eager fp32"][i])
               for i, batch in enumerate((1, 16)) for label in ips]
    bench = {"date": "2026-01-01", "results": results,
             "settings": {"batch_sizes": [1, 16], "command": "reid-export bench ..."},
             "environment": {"cpu": "Test CPU", "cpu_flags": ["avx2"], "cpu_count": 2, "threads": 2,
                             "versions": {"torch": "t", "onnxruntime": "o"}, "load_average_before": [0.1, 0.2, 0.3],
                             "load_average_after": [0.5, 0.4, 0.3]}}
    accuracy = {"model_note": "trained", "dataset": "cuhk03",
                "models": [{"model": "a.pth", "Rank-1": 50.0, "mAP": 40.0, "mINP": 20.0, "delta_mAP": 0.0},
                           {"model": "a.int8-cpu.onnx", "Rank-1": 49.0, "mAP": 39.5, "mINP": 19.0,
                            "delta_mAP": -0.5}]}
    bench["parity"] = {"images": ["/data/parity/a.jpg", "/data/parity/b.jpg"], "candidates": [
        {"candidate": str(paths["ORT fp32"]), "precision": "fp32", "min_cosine": 1.0, "max_rel_l2": 1e-6,
         "top1_agreement": 1.0, "passed": True},
        {"candidate": str(paths["ORT int8 (cpu)"]), "precision": "int8", "min_cosine": 0.9, "max_rel_l2": 0.4,
         "top1_agreement": 0.5, "passed": False}]}
    text = cpu_bench.summarize(None, bench, accuracy, paths)
    assert "parity vs the checkpoint (torch FP32) on 2 images in /data/parity:" in text
    assert [line.split("|")[-2].strip() for line in text.splitlines() if line.startswith("| ORT")][-2:] == \
        ["pass", "FAIL"]
    assert "batch 1: ORT FP32 / torch eager = 1.60x (target >= 1.5x: met)" in text
    assert "batch 16: ORT FP32 / torch eager = 1.25x (target >= 1.5x: missed)" in text
    assert "batch 16: INT8-cpu / ORT FP32 = 3.60x (target >= 3.5x at batch 16: met)" in text
    assert "load average (1/5/15 min) before 0.10 / 0.20 / 0.30, after 0.50 / 0.40 / 0.30" in text
    assert "| ORT int8 (cpu)" in text and "a.int8-cpu.onnx" in text and "-0.50" in text
