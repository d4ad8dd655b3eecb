"""benchmarks/gpu_bench.py on the CPU: arguments, BN folding, the table, a run with CUDA routes skipped."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import CONFIGS, load_benchmark, randomize_bn
from reid_export.config import load_config
from reid_export.modeling import build_model


@pytest.fixture(scope="module")
def gpu_bench():
    return load_benchmark("gpu_bench")


def test_defaults_are_the_issue_run(gpu_bench):
    args = gpu_bench.parse_args([])
    assert args.batch_sizes == [1, 64, 256]
    assert args.routes == list(gpu_bench.ROUTES)
    assert args.compile_mode == "reduce-overhead" and args.compile_batches == [256]
    assert args.device == "cuda" and args.budget < 300


@pytest.mark.parametrize("argv", [["--routes", "fp16,warp-speed"], ["--batch-sizes", "1,x"],
                                  ["--batch-sizes", "0"], ["--compile-mode", "max-autotune"]])
def test_bad_arguments_exit_2(gpu_bench, argv, capsys):
    with pytest.raises(SystemExit) as exc:
        gpu_bench.parse_args(argv)
    assert exc.value.code == 2


@pytest.mark.slow
def test_fold_batchnorm_keeps_the_output(gpu_bench):
    cfg = load_config(CONFIGS / "Market1501/bagtricks_R18.yml", ["INPUT.SIZE_TEST", "[64, 32]"])
    torch.manual_seed(0)
    model = randomize_bn(build_model(cfg), size=(64, 32))
    x = torch.rand(2, 3, 64, 32) * 255
    with torch.no_grad():
        before = model(x)
        folded = gpu_bench.fold_batchnorm(model)
        after = model(x)
    assert folded == 1 + 8 * 2 + 3  # stem, two per BasicBlock, three downsample branches
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.backbone.modules())
    assert torch.allclose(before, after, rtol=1e-4, atol=1e-4 * before.abs().max().item())


def _fake(name, batch, ips, error=None):
    res = {"name": name, "batch_size": batch, "error": error, "gpu_peak_mib": 512.0}
    if not error:
        res.update({"throughput_ips": ips, "median_ms": batch / ips * 1000, "p99_ms": batch / ips * 1100})
    return res


def test_short_table_and_verdict(gpu_bench):
    results = [_fake("fp32", 256, 9000.0), _fake("fp16 cl graph", 256, 26000.0), _fake("fp16", 256, 0, "OOM"),
               _fake("fp32", 1, 400.0)]
    table = gpu_bench.short_table(results, gflop=8.1)
    lines = table.splitlines()
    assert lines[0].startswith("| route") and len(lines) == 2 + 4
    assert "fp32" in lines[2] and "400" in lines[2]          # batch 1 first
    assert "fp16 cl graph" in lines[3] and "26000" in lines[3] and "211" in lines[3]  # 26k img/s x 8.1 GFLOP
    assert "ERROR" in lines[5]
    assert "meets" in gpu_bench.verdict(results) and "fp16 cl graph" in gpu_bench.verdict(results)
    # the ceiling is the vendor's published peak for the GPU found (989.4 TFLOP/s for an H100 SXM), not a
    # figure derived from a target: 989.4e12 / 8.1e9 = 122148 img/s; an unknown GPU gets no ceiling
    assert "bounds it at about 122148 img/s at 8.10 GFLOP/img" in gpu_bench.verdict(
        results, gflop=8.1, gpu_name="NVIDIA H100 80GB HBM3")
    assert "about 93333 img/s" in gpu_bench.verdict(results, gflop=8.1, gpu_name="NVIDIA H100 PCIe")
    assert "bounds" not in gpu_bench.verdict(results, gflop=8.1, gpu_name="Some Future GPU")
    assert "misses" in gpu_bench.verdict([_fake("fp32", 256, 9000.0)])
    assert "no route" in gpu_bench.verdict([_fake("fp32", 1, 400.0)])


@pytest.mark.slow
def test_cpu_run_skips_cuda_routes_and_prints_the_table(gpu_bench, tmp_path, capsys):
    code = gpu_bench.main(["--device", "cpu", "--config", str(CONFIGS / "Market1501/bagtricks_R18.yml"),
                           "--size", "64", "32", "--batch-sizes", "1,2", "--warmup", "0", "--duration", "0.05",
                           "--rounds", "1", "--routes", "encoder-fp32,fp32,fp16-cl-graph,compile",
                           "--out", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    assert out.rstrip().endswith("TensorRT: not measured by this script.")
    assert "encoder fp32" in out and "fp16-cl-graph: skipped (needs CUDA)" in out
    doc = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert {(r["name"], r["batch_size"]) for r in doc["results"]} == {("encoder fp32", 1), ("fp32", 1),
                                                                      ("encoder fp32", 2), ("fp32", 2)}
    assert doc["model"]["gflop_per_image"] > 0
    assert (tmp_path / "gpu_table.md").read_text() == out
