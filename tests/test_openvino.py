"""OpenVINO backend and ``reid-export openvino``: the IR reproduces ONNX Runtime within the FP32 parity
gate (and a wrong IR fails it), the data config travels in rt_info, an IR without one gets the annotate
hint, bf16 on a CPU without bf16 hardware is a clear error, and a missing openvino is one line."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from conftest import CONFIGS, DATA, assert_clean_error, randomize_bn, run_cli

openvino = pytest.importorskip("openvino", reason="OpenVINO is not installed (pip install 'reid-export[openvino]')")

from reid_export.checkpoint import save_checkpoint  # noqa: E402
from reid_export.config import load_config  # noqa: E402
from reid_export.cpuinfo import ENV_FLAGS, precision_routes, routes_line  # noqa: E402
from reid_export.data_config import data_config_from_cfg  # noqa: E402
from reid_export.errors import ReidExportError  # noqa: E402
from reid_export.export.onnx_export import generated_images  # noqa: E402
from reid_export.modeling import build_model  # noqa: E402
from reid_export.runtime import open_encoder, preprocess  # noqa: E402
from reid_export.runtime import openvino_backend  # noqa: E402
from reid_export.embeddings import Tolerances, compare  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]
SIZE = (64, 32)
OMZ = DATA.parent / "models"


def _checkpoint(folder, name, seed):
    cfg = load_config(CONFIGS / "Market1501/bagtricks_R18.yml", ["INPUT.SIZE_TEST", f"[{SIZE[0]}, {SIZE[1]}]"])
    torch.manual_seed(seed)
    model = randomize_bn(build_model(cfg), seed=seed, size=SIZE)
    return save_checkpoint(folder / name, model, cfg, data_config_from_cfg(cfg, model.feat_dim, name))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """FP32 ONNX of two different small R18s (64x32) and the IR converted from the first."""
    d = tmp_path_factory.mktemp("openvino")
    out = {}
    for name, seed in (("a", 0), ("b", 1)):
        ckpt = _checkpoint(d, f"{name}.pth", seed)
        res = run_cli("onnx", ckpt, "-o", d / f"{name}.onnx", "--no-simplify")
        assert res.code == 0, res
        out[name] = d / f"{name}.onnx"
    res = run_cli("openvino", out["a"], "-o", d / "a.xml", "--threads", "1")
    assert res.code == 0, res
    out["a.xml"] = d / "a.xml"
    out["convert_log"] = res.err
    out["dir"] = d
    return out


@pytest.fixture(scope="module")
def inputs():
    from reid_export.data_config import DataConfig

    dc = DataConfig(height=SIZE[0], width=SIZE[1])
    return preprocess(generated_images(6, SIZE, seed=3), dc)


def test_openvino_reproduces_onnxruntime_within_the_fp32_gate(models, inputs):
    ort = open_encoder(models["a"])
    reference = ort(inputs)
    gate = Tolerances.for_precision("fp32")
    for spec in (f"{models['a']}@openvino", models["a.xml"]):  # the ONNX as it is, and the converted IR
        enc = open_encoder(spec, threads=1)
        assert enc.backend == "openvino" and enc.precision == "fp32"
        assert enc.describe()["compiled_inference_precision"] == "f32"  # never bf16 behind our back
        for batch in (1, 4):  # dynamic batch
            got = np.concatenate([enc(inputs[i:i + batch]) for i in range(0, len(inputs), batch)])
            res = compare(reference, got, gate, str(spec), "openvino", "fp32")
            assert res.passed, res.failures
            assert res.max_rel_l2 < 1e-5
    # the same gate fails a different network converted the same way: the check can fail
    other = open_encoder(f"{models['b']}@openvino", threads=1)
    res = compare(reference, other(inputs), gate, "b", "openvino", "fp32")
    assert not res.passed and any("min cosine" in f for f in res.failures)


def test_convert_keeps_the_data_config_and_reports_parity(models):
    assert "parity openvino" in models["convert_log"] and "fp32 gate: pass" in models["convert_log"]
    ir = openvino_backend.read_model(models["a.xml"])
    dc = openvino_backend.read_data_config(ir, models["a.xml"])
    assert dc is not None and dc.input_size == SIZE and dc.feat_dim == 512 and dc.normalized_inside
    assert openvino_backend.read_rt(ir, "precision") == "fp32"
    export = json.loads(openvino_backend.read_rt(ir, "export"))
    assert export["compress_to_fp16"] is False and export["batch"] == "dynamic"


def test_parity_cli_puts_onnxruntime_and_openvino_side_by_side(models, image_dir, tmp_path):
    report = tmp_path / "parity.json"
    res = run_cli("parity", models["a"], f"{models['a']}@openvino", models["a.xml"], "--images", image_dir,
                  "--report", report, "--no-progress")
    assert res.code == 0, res
    doc = json.loads(report.read_text())
    assert [c["backend"] for c in doc["candidates"]] == ["openvino", "openvino"]
    assert all(c["passed"] and c["precision"] == "fp32" for c in doc["candidates"])
    # a broken candidate (another network's IR) fails the same command
    res = run_cli("openvino", models["b"], "-o", tmp_path / "b.xml", "--threads", "1")
    assert res.code == 0, res
    res = run_cli("parity", models["a"], tmp_path / "b.xml", "--images", image_dir, "--no-progress")
    assert res.code == 1 and "FAIL" in res.out


def test_convert_writes_nothing_when_the_ir_disagrees(models, tmp_path, monkeypatch):
    from reid_export.runtime import openvino_convert as openvino_export

    # make the written IR compute another network's features: the self-check must refuse it
    real_read = openvino_export.read_model
    monkeypatch.setattr(openvino_export, "read_model",
                        lambda path: real_read(models["b"]) if str(path).endswith(".xml") else real_read(path))
    out = tmp_path / "bad.xml"
    res = run_cli("openvino", models["a"], "-o", out, "--threads", "1")
    # the progress lines (what is converted, the parity figures), then the one error line
    assert res.code == 1 and "Traceback" not in res.err
    last = res.err.strip().splitlines()[-1]
    assert "disagrees with ONNX Runtime" in last and "not written" in last and "min cosine" in last
    assert "fp32 gate: FAIL" in res.err
    assert not out.exists() and not out.with_suffix(".bin").exists()
    assert list(tmp_path.iterdir()) == []  # no temporary folder left behind


def test_fp16_weights(models, tmp_path, inputs):
    out = tmp_path / "a.fp16.xml"
    res = run_cli("openvino", models["a"], "-o", out, "--fp16", "--threads", "1")
    assert res.code == 0, res
    assert "fp16 gate: pass" in res.err
    fp32_bin = models["a.xml"].with_suffix(".bin").stat().st_size
    assert out.with_suffix(".bin").stat().st_size < 0.6 * fp32_bin
    enc = open_encoder(out, threads=1)
    assert enc.precision == "fp16"


def test_int8_qdq_graph_runs_as_it_is(models, image_dir, tmp_path):
    int8 = tmp_path / "a.int8.onnx"
    # a fully quantized graph; its accuracy against FP32 is not the point here (the quantizer's own gate
    # refuses a random 4-image calibration), running the same Q/DQ graph in both runtimes is
    res = run_cli("quantize", models["a"], "-o", int8, "--precision", "int8", "--calib-dir", image_dir,
                  "--method", "minmax", "--max-float", "0", "--allow-below-gate", "--threads", "1", "--no-progress")
    assert res.code == 0, res
    res = run_cli("openvino", int8, "-o", tmp_path / "a.int8.xml", "--threads", "1")
    assert res.code == 0, res
    assert "int8 gate: pass" in res.err  # OpenVINO's int8 kernels vs ONNX Runtime's on the same graph
    ir = openvino_backend.read_model(tmp_path / "a.int8.xml")
    assert openvino_backend.graph_precision(ir) == "int8"  # Q/DQ became OpenVINO FakeQuantize
    enc = open_encoder(tmp_path / "a.int8.xml", threads=1)
    assert enc.precision == "int8"
    images = sorted(image_dir.iterdir())
    ort = open_encoder(int8).encode_files(images, progress=False)
    res = compare(ort, enc.encode_files(images, progress=False), Tolerances.for_precision("int8"))
    assert res.passed, res.failures


def test_ir_without_data_config_gets_the_annotate_hint(models, image_dir, tmp_path):
    bare = tmp_path / "bare.xml"
    # an IR from elsewhere: converted by OpenVINO's own tools from an ONNX without our metadata
    openvino.save_model(openvino.convert_model(str(_strip_metadata(models["a"], tmp_path))), str(bare),
                        compress_to_fp16=False)
    res = run_cli("extract", bare, image_dir, "-o", tmp_path / "f.npy", "--no-progress")
    assert_clean_error(res, str(bare), "carries no reid-export data config", "reid-export annotate",
                       "--input-size 64 32", "--channel-order bgr")
    assert not (tmp_path / "f.npy").exists()
    # annotating it (as the hint says) makes it usable, and gives the same features as the converted IR
    fixed = tmp_path / "bare.annotated.xml"
    res = run_cli("annotate", bare, "-o", fixed, "--mean", "123.675,116.28,103.53", "--std", "58.395,57.12,57.375",
                  "--pixel-scale", "255", "--channel-order", "rgb", "--interpolation", "cubic", "--normalized-inside")
    assert res.code == 0, res
    assert "512-d features (fp32)" in res.err
    for name in (fixed, models["a.xml"]):
        res = run_cli("extract", name, image_dir, "-o", tmp_path / f"{name.stem}.npy", "--no-progress")
        assert res.code == 0, res
    a, b = np.load(tmp_path / "bare.annotated.npy"), np.load(tmp_path / "a.npy")
    assert np.allclose(a, b, atol=1e-4)


def _strip_metadata(onnx_path, folder):
    import onnx

    model = onnx.load(str(onnx_path))
    del model.metadata_props[:]
    out = folder / "bare.onnx"
    onnx.save(model, str(out))
    return out


def test_bf16_on_a_cpu_without_bf16_is_a_clear_error(models, image_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_FLAGS, "avx2 fma avx512f avx512_vnni")  # a VNNI CPU without AVX512_BF16 / AMX
    with pytest.raises(ReidExportError, match="AVX512_BF16 or AMX-BF16"):
        open_encoder(f"{models['a.xml']}@openvino:bf16")
    res = run_cli("extract", models["a.xml"], image_dir, "-o", tmp_path / "f.npy", "--device", "openvino:bf16",
                  "--no-progress")
    assert_clean_error(res, "bf16 inference needs a CPU with AVX512_BF16 or AMX-BF16", "--device openvino (f32)")
    # f32 on the same (faked) CPU is fine
    assert open_encoder(models["a.xml"], device="openvino").inference_precision == "f32"
    assert "bf16: none" in routes_line()


def test_bf16_where_the_cpu_has_it(models, inputs):
    from reid_export.cpuinfo import has_bf16

    core_caps = openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    if not has_bf16() or "BF16" not in core_caps:
        pytest.skip("this CPU has no bf16 hardware (AVX512_BF16 / AMX-BF16)")
    enc = open_encoder(f"{models['a.xml']}@openvino:bf16", threads=1)
    assert enc.precision == "bf16" and enc.describe()["compiled_inference_precision"] == "bf16"
    ref = open_encoder(models["a"])(inputs)
    res = compare(ref, enc(inputs), Tolerances.for_precision("bf16"), "bf16", "openvino", "bf16")
    assert res.passed, res.failures
    assert res.max_rel_l2 > 1e-5  # it did compute in bf16, not f32


def test_precision_routes_follow_the_flags():
    assert precision_routes({"avx2", "fma"})["int8"].startswith("no VNNI")
    assert "VNNI" in precision_routes({"avx2", "avx512f", "avx512_vnni"})["int8"]
    assert precision_routes({"avx512f", "avx512_bf16"})["bf16"].startswith("AVX512_BF16")
    routes = precision_routes({"avx512f", "amx_tile", "amx_int8", "amx_bf16"})
    assert routes["int8"].startswith("AMX") and routes["bf16"].startswith("AMX")


def test_bench_records_isa_and_openvino_routes(models, tmp_path):
    report = tmp_path / "bench.json"
    res = run_cli("bench", models["a"], f"{models['a']}@openvino", models["a.xml"], "--batch-sizes", "2",
                  "--threads", "1", "--iterations", "2", "--warmup", "0", "--rounds", "1", "--no-progress",
                  "--report", report)
    assert res.code == 0, res
    assert "CPU ISA:" in res.out and "hardware for fp32" in res.out
    doc = json.loads(report.read_text())
    env = doc["environment"]
    assert set(env["precision_routes"]) == {"fp32", "int8", "bf16"} and isinstance(env["cpu_flags"], list)
    assert env["versions"]["openvino"] == openvino.__version__
    backends = [r["backend"] for r in doc["results"]]
    assert backends == ["onnxruntime", "openvino", "openvino"]
    assert [r.get("compiled_inference_precision") for r in doc["results"][1:]] == ["f32", "f32"]


def test_bad_inputs_are_one_line(models, image_dir, tmp_path):
    # an .xml without its .bin
    lone = tmp_path / "lone.xml"
    lone.write_bytes(models["a.xml"].read_bytes())
    res = run_cli("extract", lone, image_dir, "-o", tmp_path / "f.npy")
    assert_clean_error(res, "lone.bin", "copy both")
    # not an IR at all
    junk = tmp_path / "junk.xml"
    junk.write_text("<not-an-ir/>")
    junk.with_suffix(".bin").write_bytes(b"\0")
    res = run_cli("extract", junk, image_dir, "-o", tmp_path / "f.npy")
    assert_clean_error(res, "junk.xml", "not an OpenVINO IR")
    # --device openvino on a checkpoint, a wrong option, a non-.xml output
    res = run_cli("extract", models["dir"] / "a.pth", image_dir, "-o", tmp_path / "f.npy", "--device", "openvino")
    assert_clean_error(res, "runs OpenVINO IR (.xml) and ONNX (.onnx) models")
    res = run_cli("extract", models["a.xml"], image_dir, "-o", tmp_path / "f.npy", "--device", "openvino:int4")
    assert_clean_error(res, "openvino:bf16")
    res = run_cli("openvino", models["a"], "-o", tmp_path / "a.onnx2")
    assert_clean_error(res, "ending in .xml")


def test_missing_openvino_is_one_line(models, image_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino -> ImportError
    monkeypatch.setattr(openvino_backend, "_CORE", None)
    res = run_cli("extract", models["a.xml"], image_dir, "-o", tmp_path / "f.npy", "--no-progress")
    assert_clean_error(res, "OpenVINO is not installed", "pip install 'reid-export[openvino]'")
    res = run_cli("openvino", models["a"], "-o", tmp_path / "x.xml")
    assert_clean_error(res, "OpenVINO is not installed")
    assert not (tmp_path / "x.xml").exists()


def test_static_batch_ir_is_made_dynamic_or_padded(models, tmp_path, inputs):
    static = tmp_path / "b1.xml"
    res = run_cli("openvino", models["a"], "-o", static, "--batch", "1", "--threads", "1")
    assert res.code == 0, res
    ir = openvino_backend.read_model(static)
    assert openvino_backend.static_shape(ir)[0] == 1
    enc = open_encoder(static, threads=1)
    assert enc.max_batch is None  # reshaped to a dynamic batch on open
    ref = open_encoder(models["a"])(inputs)
    assert compare(ref, enc(inputs), Tolerances.for_precision("fp32")).passed


@pytest.fixture
def omz_models(tmp_path):
    fp32 = OMZ / "person-reidentification-retail-0288.FP32.xml"
    if not fp32.exists():
        pytest.skip(f"the Open Model Zoo IR {fp32} is not present (shared models)")
    out = {}
    for prec in ("FP32", "FP16"):
        dst = tmp_path / f"omz.{prec}.xml"
        res = run_cli("annotate", OMZ / f"person-reidentification-retail-0288.{prec}.xml", "-o", dst,
                      "--mean", "0,0,0", "--std", "1,1,1", "--pixel-scale", "255", "--channel-order", "bgr",
                      "--interpolation", "linear", "--normalized-inside")
        assert res.code == 0, res
        assert "256-d features" in res.err
        out[prec] = dst
    return out


def test_omz_ir_annotated_fp16_matches_fp32(omz_models, parity_images, tmp_path):
    ir = openvino_backend.read_model(omz_models["FP16"])
    assert openvino_backend.graph_precision(ir) == "fp16"  # the FP16 weights were kept, not re-expanded
    res = run_cli("parity", omz_models["FP32"], omz_models["FP16"], "--images", parity_images[0].parent, "--no-progress")
    assert res.code == 0, res
    # the same IR fed RGB instead of its BGR fails parity: the data config matters and the gate sees it
    wrong = tmp_path / "omz.rgb.xml"
    res = run_cli("annotate", omz_models["FP32"], "-o", wrong, "--mean", "0,0,0", "--std", "1,1,1",
                  "--pixel-scale", "255", "--channel-order", "rgb", "--interpolation", "linear", "--normalized-inside")
    assert res.code == 0 and "replaced the data config" in res.err
    res = run_cli("parity", omz_models["FP32"], wrong, "--images", parity_images[0].parent, "--no-progress")
    assert res.code == 1 and "channel_order" in res.out


def test_doctor_reports_openvino_and_the_cpu_isa():
    res = run_cli("doctor", "--json")
    assert res.code == 0, res
    rows = {r["component"]: r for r in json.loads(res.out)}
    assert rows["openvino"]["status"] == openvino.__version__ and "CPU plugin" in rows["openvino"]["detail"]
    assert "openvino (.xml" in rows["backends"]["status"] and "cpu isa" in rows
