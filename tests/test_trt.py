"""TensorRT: everything around the engine that runs without TensorRT, and the engine where it exists.

No TensorRT wheel can be installed on the machines of this project (NVIDIA's index is out of
reach), so tests that build or run an engine skip with that reason; the option parsing,
profiles, build plans for TensorRT 10 and 11, sidecars and their checks, and the messages run here.
"""

import importlib.util
import json

import numpy as np
import pytest

from conftest import assert_clean_error, run_cli
from reid_export.data_config import DataConfig
from reid_export.errors import ReidExportError, UsageError
from reid_export.trt import build_plan, compute_profile, parse_size
from reid_export.trt.sidecar import check_compatible, make_sidecar, read_sidecar, sidecar_path, write_sidecar

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None
needs_trt = pytest.mark.skipif(not HAVE_TRT, reason="TensorRT is not installed (not installable here: "
                                                    "its wheels come from NVIDIA's index); needs a GPU too")


@pytest.mark.parametrize("text,size", [("4GiB", 4 * 2 ** 30), ("512MiB", 512 * 2 ** 20), ("1G", 10 ** 9),
                                       ("1073741824", 2 ** 30), ("1.5GiB", int(1.5 * 2 ** 30))])
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["lots", "4XB", "0", "-1GiB"])
def test_parse_size_refuses(bad):
    with pytest.raises(UsageError, match="`workspace`"):
        parse_size(bad)


def test_profile_dynamic_static_and_errors():
    p = compute_profile(["batch", 3, 256, 128], 1, 32, 128, (256, 128))
    assert p["min"] == [1, 3, 256, 128] and p["opt"] == [32, 3, 256, 128] and p["max"] == [128, 3, 256, 128]
    assert not p["static"] and p["ignored"] == []
    s = compute_profile([8, 3, 256, 128], 1, 32, 128, (256, 128))
    assert s["static"] and s["min"] == s["opt"] == s["max"] == [8, 3, 256, 128] and s["ignored"]
    # symbolic H/W take the data config's size
    assert compute_profile([None, 3, "h", "w"], 2, 4, 8, (384, 128))["max"] == [8, 3, 384, 128]
    with pytest.raises(UsageError, match="min <= opt <= max"):
        compute_profile(["batch", 3, 256, 128], 8, 4, 16, (256, 128))
    with pytest.raises(UsageError, match="`min_batch` must be >= 1"):
        compute_profile(["batch", 3, 256, 128], 0, 4, 16, (256, 128))
    with pytest.raises(ReidExportError, match="data config says 384x128"):
        compute_profile(["batch", 3, 256, 128], 1, 4, 16, (384, 128))
    with pytest.raises(ReidExportError, match="4-D"):
        compute_profile(["batch", 2048], 1, 4, 16, (256, 128))


@pytest.mark.parametrize("version,graph,fp16,int8,expected", [
    # TensorRT 11: strongly typed always, no precision flags; the graph carries the precision
    ("11.4.1", "fp32", False, False, {"convert": None, "strongly_typed": True, "flags": [], "precision": "fp32"}),
    ("11.4.1", "fp32", True, False, {"convert": "fp16", "strongly_typed": True, "flags": [], "precision": "fp16"}),
    ("11.4.1", "fp16", True, False, {"convert": None, "strongly_typed": True, "flags": [], "precision": "fp16"}),
    ("11.4.1", "fp16", False, False, {"convert": None, "strongly_typed": True, "flags": [], "precision": "fp16"}),
    ("11.4.1", "fp32", False, True, {"convert": "int8", "strongly_typed": True, "flags": [], "precision": "int8"}),
    ("11.4.1", "int8", False, True, {"convert": None, "strongly_typed": True, "flags": [], "precision": "int8"}),
    ("11.4.1", "int8", False, False, {"convert": None, "strongly_typed": True, "flags": [], "precision": "int8"}),
    # TensorRT 10: an FP32 graph may use the FP16 flag; Q/DQ graphs build weakly typed with INT8 (+FP16)
    ("10.13.0", "fp32", True, False, {"convert": None, "strongly_typed": False, "flags": ["FP16"], "precision": "fp16"}),
    ("10.13.0", "fp16", True, False, {"convert": None, "strongly_typed": True, "flags": [], "precision": "fp16"}),
    ("10.13.0", "int8", True, True, {"convert": None, "strongly_typed": False, "flags": ["INT8", "FP16"],
                                     "precision": "int8"}),
    ("10.13.0", "fp32", False, True, {"convert": "int8", "strongly_typed": False, "flags": ["INT8"],
                                      "precision": "int8"}),
    ("10.13.0", "int8", False, False, {"convert": None, "strongly_typed": False, "flags": ["INT8"],
                                       "precision": "int8"}),
])
def test_build_plan(version, graph, fp16, int8, expected):
    assert build_plan(version, graph, fp16, int8) == expected


def test_build_plan_refusals():
    with pytest.raises(UsageError, match="Q/DQ"):
        build_plan("11.0.0", "fp32", True, True)
    with pytest.raises(UsageError, match="pass `int8`"):
        build_plan("10.1.0", "int8", True, False)


def _sidecar(tmp_path, **over):
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"not really an engine")
    profile = compute_profile(["batch", 3, 256, 128], 1, 32, 128, (256, 128))
    info = make_sidecar(DataConfig(feat_dim=2048), "fp16", over.get("trt", "10.13.0"), "NVIDIA H100 80GB HBM3",
                        over.get("cc", "9.0"), profile, "model.onnx", "ab" * 32, {"fp16": True}, "images", "features")
    write_sidecar(engine, info)
    return engine


def test_sidecar_roundtrip_and_checks(tmp_path):
    engine = _sidecar(tmp_path)
    assert sidecar_path(engine).name == "model.engine.json"
    info = read_sidecar(engine)
    assert info["data_config"].feat_dim == 2048 and info["profiles"][0]["max"] == [128, 3, 256, 128]
    check_compatible(info, engine, "10.13.0", "9.0")  # same: fine
    with pytest.raises(ReidExportError, match="built with TensorRT 10.13.0, this is TensorRT 11.0.0.*rebuild"):
        check_compatible(info, engine, "11.0.0", "9.0")
    with pytest.raises(ReidExportError, match="compute capability 9.0.*this GPU is 8.9"):
        check_compatible(info, engine, "10.13.0", "8.9")


def test_sidecar_missing_or_broken(tmp_path):
    engine = tmp_path / "lonely.engine"
    engine.write_bytes(b"x")
    with pytest.raises(ReidExportError, match="no lonely.engine.json beside it"):
        read_sidecar(engine)
    sidecar_path(engine).write_text("{not json")
    with pytest.raises(ReidExportError, match="not valid JSON"):
        read_sidecar(engine)
    sidecar_path(engine).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ReidExportError, match="not a reid-export engine sidecar"):
        read_sidecar(engine)


@pytest.mark.skipif(HAVE_TRT, reason="checks the message shown when TensorRT is absent")
def test_trt_command_without_tensorrt(tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(b"placeholder")
    res = run_cli("trt", model, "-o", tmp_path / "m.engine", "--fp16")
    assert_clean_error(res, "TensorRT is not installed", "pip install 'reid-export[trt]'")
    assert res.code == 2
    assert not (tmp_path / "m.engine").exists() and not (tmp_path / "m.engine.json").exists()


@pytest.mark.skipif(HAVE_TRT, reason="checks the message shown when TensorRT is absent")
def test_engine_with_sidecar_but_no_tensorrt(tmp_path):
    from conftest import write_image

    engine = _sidecar(tmp_path)
    write_image(tmp_path / "imgs" / "a.jpg")
    res = run_cli("extract", engine, tmp_path / "imgs", "-o", tmp_path / "f.npy")
    assert_clean_error(res, "TensorRT is not installed")
    assert res.code == 2


def test_trt_option_errors(tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(b"placeholder")
    out = tmp_path / "m.engine"
    assert_clean_error(run_cli("trt", model, "-o", out, "--min-batch", "8", "--opt-batch", "4"), "min <= opt <= max")
    assert_clean_error(run_cli("trt", model, "-o", out, "--workspace", "lots"), "--workspace")
    assert_clean_error(run_cli("trt", model, "-o", tmp_path / "m.bin"), "*.engine or *.plan")
    assert_clean_error(run_cli("trt", model, "-o", out, "--calib-dir", tmp_path), "--calib-dir is for --int8")
    assert_clean_error(run_cli("trt", tmp_path / "none.onnx", "-o", out), "none.onnx", "not found")
    assert not out.exists()


@needs_trt
def test_build_and_run_engine_matches_onnxruntime(tmp_path):  # pragma: no cover - needs TensorRT + GPU
    import torch

    if not torch.cuda.is_available():
        pytest.skip("TensorRT is installed but there is no CUDA GPU")
    from conftest import CONFIGS, randomize_bn
    from reid_export.checkpoint import save_checkpoint
    from reid_export.config import load_config
    from reid_export.data_config import data_config_from_cfg
    from reid_export.modeling import build_model
    from reid_export.runtime import open_encoder

    cfg = load_config(CONFIGS / "Market1501/bagtricks_R18.yml", ["INPUT.SIZE_TEST", "[128, 64]"])
    model = randomize_bn(build_model(cfg), size=(128, 64))
    save_checkpoint(tmp_path / "r18.pth", model, cfg, data_config_from_cfg(cfg, model.feat_dim, "r18"))
    onnx_path, engine = tmp_path / "r18.onnx", tmp_path / "r18.engine"
    assert run_cli("onnx", tmp_path / "r18.pth", "-o", onnx_path).code == 0
    res = run_cli("trt", onnx_path, "-o", engine, "--min-batch", "2", "--max-batch", "8")
    assert res.code == 0, res
    info = json.loads((tmp_path / "r18.engine.json").read_text())
    assert info["profiles"][0]["max"][0] == 8 and info["data_config"]["height"] == 128
    x = (np.random.default_rng(0).random((11, 3, 128, 64)) * 255).astype(np.float32)  # split and padded
    ref = open_encoder(onnx_path)(x)
    got = open_encoder(engine, device="cuda")(x)
    assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-3


def test_onnxruntime_tensorrt_provider_caches_engines(monkeypatch, tmp_path):
    """ONNX Runtime's TensorRT execution provider as a second route: options only (no GPU here)."""
    import onnxruntime as ort

    from reid_export.export.ort import providers_for, trt_cache_dir_for

    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    cache = trt_cache_dir_for(tmp_path / "model.onnx", "tensorrt:1")
    assert cache == tmp_path / "model.trt-cache"
    providers = providers_for("tensorrt:1", cache)
    name, options = providers[0]
    assert name == "TensorrtExecutionProvider" and options["device_id"] == 1
    assert options["trt_engine_cache_enable"] and options["trt_engine_cache_path"] == str(cache)
    assert providers[1] == ("CUDAExecutionProvider", {"device_id": 1}) and providers[-1] == "CPUExecutionProvider"
    assert trt_cache_dir_for(tmp_path / "model.onnx", "cuda") is None
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(ReidExportError, match="no TensorrtExecutionProvider.*reid-export\\[gpu\\]"):
        providers_for("tensorrt")
