"""reid_export.api: typed results that carry their gates and verdicts; the CLI prints the same objects."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import CONFIGS, randomize_bn, run_cli, write_image
from reid_export import api
from reid_export.checkpoint import save_checkpoint
from reid_export.config import load_config
from reid_export.data_config import data_config_from_cfg
from reid_export.modeling import build_model
from reid_export.report import REPORT_SCHEMA_VERSION

pytestmark = pytest.mark.usefixtures("one_torch_thread")
R18 = CONFIGS / "Market1501" / "bagtricks_R18.yml"


def _ckpt(path, seed=0, nudge=None):
    cfg = load_config(R18, ["INPUT.SIZE_TEST", "[64, 32]"])
    torch.manual_seed(seed)
    model = randomize_bn(build_model(cfg), seed=seed, size=(64, 32))
    if nudge:
        with torch.no_grad():
            model.backbone.layer4[1].bn2.weight.mul_(nudge)
    save_checkpoint(path, model, cfg, data_config_from_cfg(cfg, model.feat_dim, path.stem))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("api")
    root = d / "market"
    for split, cams in (("query", (1,)), ("bounding_box_test", (2, 3))):
        for pid in (1, 2, 3):
            for cam in cams:
                write_image(root / split / f"{pid:04d}_c{cam}s1_000{pid}{cam}0_00.jpg", seed=pid * 10 + cam)
    return {"a": _ckpt(d / "a.pth"), "near": _ckpt(d / "near.pth", nudge=1.02), "other": _ckpt(d / "other.pth", 1),
            "root": root, "images": root / "query"}


@pytest.mark.slow
def test_parity_returns_a_typed_report_with_its_verdict(setup):
    ok = api.parity(setup["a"], [setup["a"]], [setup["images"]], progress=False)
    assert isinstance(ok, api.ParityReport) and ok.passed and ok.exit_code == 0
    assert isinstance(ok.candidates[0], api.ParityResult) and ok.candidates[0].max_rel_l2 == 0.0
    bad = api.parity(setup["a"], [setup["near"], setup["other"]], [setup["images"]], progress=False)
    assert not bad.passed and bad.exit_code == 1  # a failed gate is a result, not an exception
    assert [c.passed for c in bad.candidates] == [False, False]
    assert all(c.failures for c in bad.candidates) and "FAIL" in bad.table()
    doc = bad.to_dict()
    assert doc["schema_version"] == REPORT_SCHEMA_VERSION and doc["command"] == "parity" and doc["passed"] is False
    json.dumps(doc)  # JSON-able as it is
    # a looser gate, through the API, passes the near miss
    loose_gate = api.Tolerances.by_precision(min_cosine=0.9, max_rel_l2=0.5, atol=10.0, rtol=10.0)
    loose = api.parity(setup["a"], [setup["near"]], [setup["images"]], gate=loose_gate, progress=False)
    assert loose.passed and loose.candidates[0].tolerances["min_cosine"] == 0.9
    # one Tolerances is the rule for every candidate, whatever its precision
    strict = api.Tolerances(min_cosine=1.001)  # no cosine reaches it
    assert not api.parity(setup["a"], [setup["a"]], [setup["images"]], gate=strict, progress=False).passed


def test_the_cli_prints_and_writes_what_the_api_returns(setup, tmp_path):
    report = tmp_path / "p.json"
    res = run_cli("parity", setup["a"], setup["near"], "--images", setup["images"], "--report", report,
                  "--no-progress")
    assert res.code == 1
    direct = api.parity(setup["a"], [setup["near"]], [setup["images"]], progress=False)
    assert direct.table() in res.out
    written = json.loads(report.read_text())
    assert written["candidates"] == json.loads(json.dumps(direct.to_dict()))["candidates"]


@pytest.mark.slow
def test_evaluate_returns_gates_and_failures(setup):
    ev = api.evaluate([setup["a"], setup["other"]], setup["root"], gates=api.EvalGates.off(), progress=False)
    assert isinstance(ev, api.EvalReport) and ev.passed and len(ev.rows) == 2
    assert all(isinstance(row, api.EvalRow) for row in ev.rows)
    assert ev.rows[0].ok and ev.rows[0].result.distmat.shape == (3, 6) and ev.rows[0].delta_map == 0.0
    assert ev.rows[1].delta_map < -api.DEFAULT_MAX_MAP_DROP, "fixture: the other model must rank worse"
    assert ev.rows[1].delta_map == ev.rows[1].mAP - ev.rows[0].mAP and ev.rows[1].status == "not gated"
    # the default gates: the second model is more than 2 mAP points below the first
    gated = api.evaluate([setup["a"], setup["other"]], setup["root"], progress=False)
    assert not gated.passed and gated.exit_code == 1 and "mAP" in gated.failures[0]
    assert [row.status for row in gated.rows] == ["ok", "FAIL"]
    doc = gated.to_dict()
    assert doc["schema_version"] == REPORT_SCHEMA_VERSION and doc["failures"] == gated.failures
    assert all(not k.startswith("_") for m in doc["models"] for k in m)
    assert [m["status"] for m in doc["models"]] == ["ok", "FAIL"] and doc["models"][1]["delta_mAP"] == gated.rows[1].delta_map
    assert doc["models"][1]["mAP"] == gated.rows[1].mAP and doc["models"][1]["model"] == gated.rows[1].model


def test_bench_returns_results_and_environment(setup):
    rep = api.bench([setup["a"]], [1, 2], iterations=2, warmup=0, rounds=1, threads=1, progress=False)
    assert isinstance(rep, api.BenchReport) and rep.passed
    assert [r["batch_size"] for r in rep.results] == [1, 2] and all(r["throughput_ips"] > 0 for r in rep.results)
    assert rep.environment["cpu"] and rep.to_dict()["schema_version"] == REPORT_SCHEMA_VERSION


def test_bad_input_is_one_error_not_a_report(setup, tmp_path):
    with pytest.raises(api.ReidExportError, match="missing.onnx"):
        api.parity(setup["a"], [tmp_path / "missing.onnx"], [setup["images"]], progress=False)
    with pytest.raises(api.UsageError, match="`atol` and `rtol` go together"):  # the parameters, not the flags
        api.parity(setup["a"], [setup["a"]], [setup["images"]], gate=api.Tolerances.by_precision(atol=1e-3))
    with pytest.raises(api.ReidExportError, match="nowhere"):
        api.evaluate([setup["a"]], tmp_path / "nowhere", progress=False)


def test_encode_paths_has_one_return_type(setup, tmp_path):
    """encode_files always gives the array; encode_paths always an EncodedFiles, skipping or not."""
    bad = tmp_path / "0009_c1s1_000000_00.jpg"
    bad.write_bytes(b"not a jpeg")
    files = sorted(setup["images"].iterdir())
    with api.open_encoder(setup["a"]) as enc:
        arr = enc.encode_files(files, progress=False)
        all_ = enc.encode_paths(files, progress=False)
        some = enc.encode_paths([*files, bad], progress=False, on_error="skip")
    assert isinstance(arr, np.ndarray) and np.array_equal(all_.features, arr) and all_.kept == [0, 1, 2]
    assert some.kept == [0, 1, 2] and len(some.skipped) == 1 and np.array_equal(some.features, arr)


@pytest.mark.slow
def test_quantize_takes_options_and_returns_a_refusal_as_a_report(setup, tmp_path):
    """A refused quantization is a report (``passed`` False, the one-line ``refusal``, what was tried), not an
    exception, and nothing is written; the same options with ``allow_below_gate`` write it marked below
    the gate; FP16 of the same model passes. ``options=`` and keyword fields are the same call."""
    fp32 = tmp_path / "a.onnx"
    exported = api.export_onnx(setup["a"], fp32, log=lambda line: None)
    assert isinstance(exported, api.ExportReport) and exported.passed and fp32.exists()
    doc = exported.to_dict()
    assert doc["schema_version"] == REPORT_SCHEMA_VERSION and doc["passed"] and all(c["passed"] for c in doc["checks"])
    assert "wrote" in exported.table() and "pixels" in exported.table()
    crops = setup["root"] / "bounding_box_test"
    impossible = api.Tolerances.reduced_precision(min_mean_cosine=1.001)  # no model has a cosine above 1
    options = api.QuantizeOptions("int8", calib_dirs=[crops], calib_size=4, val_size=2, method="minmax",
                                  max_float=0, equalize=False, gate=impossible, progress=False)
    out = tmp_path / "q" / "a.int8.onnx"
    out.parent.mkdir()
    refused = api.quantize(fp32, out, options=options, log=lambda line: None)
    assert isinstance(refused, api.QuantizeReport) and not refused.passed and not refused.written
    assert list(out.parent.iterdir()) == []
    assert "not written" in refused.refusal and "mean cosine" in refused.refusal
    doc = refused.to_dict()
    assert doc["schema_version"] == REPORT_SCHEMA_VERSION and doc["passed"] is False and doc["refusal"]
    assert [t["label"] for t in doc["search"]["tried"]] == ["minmax", "minmax, bias-corrected"]
    assert "minmax, bias-corrected" in refused.table()
    json.dumps(doc)

    options.allow_below_gate = True
    below = api.quantize(fp32, out, options=options, log=lambda line: None)
    assert below.written and not below.passed and "BELOW THE ACCURACY GATE" in below.table()

    fp16 = api.quantize(fp32, tmp_path / "a.fp16.onnx", "fp16", log=lambda line: None)
    assert fp16.passed and fp16.to_dict()["passed"] and "wrote" in fp16.table()
    with pytest.raises(TypeError):
        api.quantize(fp32, out, "int8", options=options)


@pytest.mark.slow
def test_the_library_logs_through_the_reid_export_logger(setup, tmp_path, caplog):
    """Without ``log=`` the calls say what they do as INFO records of the ``reid_export`` logger (no print)."""
    import logging

    with caplog.at_level(logging.INFO, logger="reid_export"):
        api.export_onnx(setup["a"], tmp_path / "a.onnx")
    assert any(r.name == "reid_export" and "parity export" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_calls_take_open_encoders_as_they_take_paths(setup):
    """parity, evaluate and bench accept an open Encoder wherever they accept a model path: the same
    figures as with the path, the encoder named by its file, and left open for the caller."""
    ref, other = api.open_encoder(setup["a"]), api.open_encoder(setup["other"])
    try:
        by_path = api.parity(setup["a"], [setup["other"]], [setup["images"]], progress=False)
        by_encoder = api.parity(ref, [other], [setup["images"]], progress=False)
        assert by_encoder.candidates[0].min_cosine == by_path.candidates[0].min_cosine
        assert by_encoder.reference["model"] == str(setup["a"]) and by_encoder.passed == by_path.passed
        ev = api.evaluate([ref, setup["other"]], setup["root"], gates=api.EvalGates.off(), progress=False)
        ev_path = api.evaluate([setup["a"], setup["other"]], setup["root"], gates=api.EvalGates.off(), progress=False)
        assert [r.mAP for r in ev.rows] == [r.mAP for r in ev_path.rows]
        assert ev.rows[0].model == str(setup["a"])
        rep = api.bench([ref], [1], iterations=2, warmup=0, rounds=1, threads=1, progress=False)
        assert rep.passed and rep.results[0]["model"] == str(setup["a"]) and rep.models[0]["name"] == "a.pth"
        assert ref(np.zeros((1, 3, 64, 32), np.float32)).shape[0] == 1  # still open
    finally:
        ref.close()
        other.close()


@pytest.mark.slow
def test_hand_offs_return_reports(setup, tmp_path):
    """The tracker hand-offs keep the API's word too: passed, to_dict() with the schema, table()."""
    fp32 = tmp_path / "a.onnx"
    api.export_onnx(setup["a"], fp32, log=lambda line: None)
    ds = api.deepstream(fp32, tmp_path / "ds", api.DeepStreamOptions(name="tracker", network_mode="fp16"))
    assert isinstance(ds, api.DeepStreamResult) and ds.passed and ds.onnx_path == tmp_path / "ds" / "tracker.deepstream.onnx"
    assert ds.section["networkMode"] == 2  # the options object's fp16, not the ONNX's fp32
    doc = ds.to_dict()
    assert doc["schema_version"] == REPORT_SCHEMA_VERSION and doc["passed"] and doc["self_check"]["passed"]
    assert "NVIDIA scalar" in ds.table() and "wrote" in ds.table()
    bm = api.boxmot(fp32, tmp_path / "bm", openvino=False)  # the options' fields as keywords
    assert isinstance(bm, api.BoxmotResult) and bm.passed and bm.onnx_path.exists()
    assert bm.to_dict()["command"] == "boxmot" and json.dumps(bm.to_dict())
    assert "verify:" in bm.table() and f"reid-export parity {fp32}" in bm.table()


def test_collapse_and_threshold_take_paths_and_encoders(setup):
    """check_collapse and reference_threshold give the same answer for a path and for the open encoder."""
    images = sorted(p for p in (setup["root"] / "bounding_box_test").iterdir())
    with api.open_encoder(setup["a"]) as enc:
        by_path = api.check_collapse(setup["a"], images)
        by_encoder = api.check_collapse(enc, images)
        assert by_path is not None and by_path.to_dict() == by_encoder.to_dict()
        t_path = api.reference_threshold(setup["a"], setup["root"], 0.5)
        t_enc = api.reference_threshold(enc, setup["root"], 0.5)
        assert isinstance(t_enc, api.TrackerThreshold) and t_enc.distance == t_path.distance


@pytest.mark.slow
def test_triton_repository_is_a_report(setup, tmp_path):
    """api.triton writes the repository and returns its report (passed, to_dict with the schema, table)."""
    fp32 = tmp_path / "a.onnx"
    api.export_onnx(setup["a"], fp32, log=lambda line: None)
    rep = api.triton([fp32], tmp_path / "repo", api.RepoOptions(kind="cpu"))
    assert isinstance(rep, api.TritonReport) and rep.passed and (tmp_path / "repo" / "a" / "config.pbtxt").exists()
    doc = rep.to_dict()
    assert doc["schema_version"] == REPORT_SCHEMA_VERSION and doc["models"][0]["name"] == "a"
    assert "repository" in rep.table() and "onnxruntime_onnx" in rep.table()


@pytest.mark.parametrize("make, words", [
    (lambda: api.DeepStreamOptions(network_mode="fp8"), ("`network_mode`", "fp32, int8, fp16")),
    (lambda: api.DeepStreamOptions(reid_type="sort"), ("`reid_type`", "deepsort")),
    (lambda: api.DeepStreamOptions(color_order="yuv"), ("rgb or bgr", "'yuv'")),
    (lambda: api.DeepStreamOptions(batch_size=0), ("`batch_size`", ">= 1", "0")),
    (lambda: api.DeepStreamOptions(workspace_mb=2.5), ("`workspace_mb`", "integer")),
    (lambda: api.DeepStreamOptions(name="a/b"), ("`name`", "plain file stem")),
    (lambda: api.DeepStreamOptions(max_rel_l2=0.0), ("`max_rel_l2`", "> 0")),
    (lambda: api.DeepStreamOptions(threshold_fmr=1.5), ("`threshold_fmr`", "between 0 and 1", "1.5")),
    (lambda: api.BoxmotOptions(architecture="bot_r50", openvino=False), ("`architecture`", "'bot_r50'", "25.0.0")),
    (lambda: api.BoxmotOptions(name="", openvino=False), ("`name`", "plain file stem")),
    (lambda: api.BoxmotOptions(max_rel_l2=-1.0, openvino=False), ("`max_rel_l2`", "> 0", "-1")),
    (lambda: api.BoxmotOptions(threshold_fmr=0.0, openvino=False), ("`threshold_fmr`", "between 0 and 1")),
    (lambda: _ray_options(shard_size=10, batch_size=4), ("`shard_size` 10", "multiple of `batch_size` 4")),
    (lambda: _ray_options(batch_size=0), ("`batch_size`", ">= 1")),
    (lambda: _ray_options(num_workers=0), ("`num_workers`", ">= 1")),
    (lambda: _ray_options(cpus_per_worker=0), ("`cpus_per_worker`", "> 0")),
    (lambda: _ray_options(gpus_per_worker=-1), ("`gpus_per_worker`", ">= 0")),
    (lambda: _ray_options(on_error="ignore"), ("`on_error`", "raise, skip", "'ignore'")),
], ids=lambda v: v[0] if isinstance(v, tuple) else None)
def test_options_refuse_bad_values_in_one_line(make, words):
    """The options objects of the hand-offs and of extract on Ray check every value in one place
    (``check()``, run first by the call) and say what is wrong in one line."""
    options = make()
    with pytest.raises(api.ReidExportError) as info:
        options.check()
    message = str(info.value)
    assert "\n" not in message and all(w in message for w in words), message
    assert " --" not in message  # the library names its parameters; the CLI shows them as flags


def _ray_options(**fields):
    from reid_export.runtime.ray_extract import RayOptions

    return RayOptions(**fields)


def test_good_options_pass_their_check():
    assert api.DeepStreamOptions(network_mode="int8", reid_type="both", color_order="bgr", name="x",
                                 max_rel_l2=1e-3, threshold_fmr=0.1).check().reid_type == "both"
    assert api.BoxmotOptions(architecture="osnet_x0_25", openvino=False, name="osnet").check().name == "osnet"
    assert _ray_options(shard_size=64, batch_size=32, cpus_per_worker=2, on_error="skip").check().threads == 2


def test_hand_offs_check_their_options_before_any_work(setup, tmp_path):
    """A bad value is refused before the model is read or a file written; options and keywords do not mix."""
    out = tmp_path / "never"
    with pytest.raises(api.ReidExportError, match="`reid_type`"):
        api.deepstream(tmp_path / "missing.onnx", out, api.DeepStreamOptions(reid_type="sort"))
    with pytest.raises(api.ReidExportError, match="threshold_fmr"):
        api.boxmot(setup["a"], out, threshold_fmr=2.0, openvino=False)
    assert not out.exists()
    with pytest.raises(TypeError, match="not both"):
        api.deepstream(tmp_path / "m.onnx", out, api.DeepStreamOptions(), name="x")
    with pytest.raises(TypeError, match="not both"):
        api.boxmot(setup["a"], out, api.BoxmotOptions(openvino=False), name="x")
    from reid_export.runtime.ray_extract import extract_on_ray

    with pytest.raises(TypeError, match="not both"):
        extract_on_ray(setup["a"], [], tmp_path / "f.npy", _ray_options(), batch_size=4)
    with pytest.raises(api.ReidExportError, match="multiple of `batch_size`"):
        extract_on_ray(setup["a"], [], tmp_path / "f.npy", shard_size=6, batch_size=4)
    assert not (tmp_path / "f.npy.shards").exists()
