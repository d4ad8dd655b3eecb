"""benchmarks/openvino_bench.py without running models: its commands and its route table."""

from __future__ import annotations


import pytest

from conftest import load_benchmark


@pytest.fixture(scope="module")
def ov_bench():
    return load_benchmark("openvino_bench")


def test_dry_run_prints_every_route(ov_bench, tmp_path, capsys):
    assert ov_bench.main(["--dry-run", "--work", str(tmp_path), "--threads", "2"]) == 0
    commands = [line[2:] for line in capsys.readouterr().out.splitlines() if line.startswith("$ ")]
    benches = [c for c in commands if c.startswith("reid-export bench ")]
    assert len(benches) == 2  # BoT-R50 and OSNet, each with its six routes side by side
    r50 = benches[0].split()[2:8]
    assert r50 == [f"{tmp_path}/bot-r50.onnx", f"{tmp_path}/bot-r50.int8-cpu.onnx", f"{tmp_path}/bot-r50.xml",
                   f"{tmp_path}/bot-r50.xml@openvino:bf16", f"{tmp_path}/bot-r50.int8-trt.onnx@openvino",
                   f"{tmp_path}/bot-r50.int8-cpu.onnx@openvino"]
    assert "--batch-sizes 1,16 --threads 2" in benches[0]
    assert any(c.startswith("reid-export openvino ") and c.endswith(".xml --threads 2 --parity-images "
                                                                     f"{ov_bench.DATA / 'parity-images'}")
               for c in commands)
    # the OSNet INT8 models are written below the quantizer's gate only to be timed; the R50's are not
    quantize = [c for c in commands if c.startswith("reid-export quantize ")]
    assert [("--allow-below-gate" in c) for c in quantize] == [False, False, True, True]
    # the OMZ IRs get their data config (BGR, 0..255, inside) and are evaluated in FP32, FP16 and bf16
    assert sum("--channel-order bgr" in c and c.startswith("reid-export annotate ") for c in commands) == 2
    evaluate = [c for c in commands if c.startswith("reid-export eval ")][-1]
    assert "omz-0288.FP16.xml" in evaluate and "omz-0288.FP32.xml@openvino:bf16" in evaluate
    assert not list(tmp_path.iterdir())  # a dry run writes nothing


def _res(name, batch, ips, **extra):
    return {"name": name, "batch_size": batch, "throughput_ips": ips, "median_ms": batch / ips * 1000,
            "precision": extra.pop("precision", "fp32"), **extra}


def test_route_table_puts_accuracy_beside_speed(ov_bench):
    routes = {"ORT FP32": "w/m.onnx", "OV bf16": "w/m.xml@openvino:bf16", "OV INT8 (cpu Q/DQ)": "w/m.int8.onnx@openvino"}
    bench = {"settings": {"batch_sizes": [16]},
             "results": [_res("m.onnx", 16, 10.0),
                         _res("m.xml@openvino:bf16", 16, 25.0, compiled_inference_precision="bf16"),
                         _res("m.int8.onnx@openvino", 16, 35.0, precision="int8", compiled_inference_precision="f32")]}
    parity = {"candidates": [{"candidate": "w/m.xml@openvino:bf16", "min_cosine": 0.99912},
                             {"candidate": "w/m.int8.onnx@openvino", "min_cosine": 0.5}]}
    evaluation = {"models": [{"model": "w/m.onnx", "Rank-1": 40.0, "mAP": 30.0},
                             {"model": "w/m.int8.onnx@openvino", "Rank-1": 2.0, "mAP": 3.0}]}
    text = "\n".join(ov_bench.route_table("T", routes, bench, parity, evaluation))
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in text.splitlines() if line.startswith("| ") and "route" not in line}
    assert rows["OV bf16"][3:] == ["2.50x", "0.99912", "-", "bf16"]
    assert rows["OV INT8 (cpu Q/DQ)"][3:] == ["3.50x", "0.50000", "2.00 / 3.00", "int8 + f32 rest"]
    assert rows["ORT FP32"][3:] == ["1.00x", "1 (reference)", "40.00 / 30.00", "fp32"]
