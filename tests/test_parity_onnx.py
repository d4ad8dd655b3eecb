"""parity with ONNX candidates: the FP32 export passes; a foreign checkpoint, wrong mean/std in the
data config and NaN outputs each fail and say why; --locate names layers; the report is JSON."""

import json

import numpy as np
import pytest
import torch

from conftest import CONFIGS, inject_nan, randomize_bn, run_cli
from reid_export.checkpoint import save_checkpoint
from reid_export.config import load_config
from reid_export.data_config import DataConfig, data_config_from_cfg
from reid_export.export.annotate import annotate_file
from reid_export.export.metadata import save_onnx
from reid_export.export.onnx_export import export_module
from reid_export.modeling import build_model

pytestmark = pytest.mark.slow  # a development run skips it: pytest -m "not slow"

R18 = CONFIGS / "Market1501" / "bagtricks_R18.yml"  # a shipped config, at its own 256x128


def _trained_like(seed):
    cfg = load_config(R18)
    torch.manual_seed(seed)
    return randomize_bn(build_model(cfg), seed=seed), cfg


class _NoNormalization(torch.nn.Module):
    """The same network without its internal mean/std: input must be normalised outside."""

    def __init__(self, model):
        super().__init__()
        self.backbone, self.heads = model.backbone, model.heads

    def forward(self, x):
        return self.heads(self.backbone(x))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("parity_onnx")
    model, cfg = _trained_like(0)
    dc = data_config_from_cfg(cfg, model.feat_dim, "r18")
    save_checkpoint(d / "ref.pth", model, cfg, dc)
    other, _ = _trained_like(1)
    save_checkpoint(d / "other.pth", other, cfg, dc)
    for name in ("ref", "other"):
        res = run_cli("onnx", d / f"{name}.pth", "-o", d / f"{name}.onnx")
        assert res.code == 0, res
    # External normalisation (torchreid style): correct and wrong mean/std in the data config
    bare = d / "bare.onnx"
    save_onnx(export_module(_NoNormalization(model).eval(), (256, 128)), bare)
    ext = dict(height=256, width=128, pixel_scale=255.0, normalized_inside=False, feat_dim=512)
    annotate_file(bare, d / "external_ok.onnx", DataConfig(mean=dc.mean, std=dc.std, **ext), log=lambda m: None)
    # a classic slip: the BGR-ordered mean/std given to an RGB model
    annotate_file(bare, d / "external_wrong.onnx", DataConfig(mean=dc.mean[::-1], std=dc.std[::-1], **ext),
                  log=lambda m: None)
    # NaN output: the features multiplied by a constant holding NaN in two places
    inject_nan(d / "ref.onnx", d / "nan.onnx", dim=512, positions=(3, 100))
    return d


def test_fp32_onnx_passes_and_report_is_json(models, parity_images, tmp_path):
    report = tmp_path / "parity.json"
    res = run_cli("parity", models / "ref.pth", models / "ref.onnx", models / "external_ok.onnx",
                  "--images", parity_images[0].parent, "--report", report, "--no-progress")
    assert res.code == 0, res.out
    doc = json.loads(report.read_text())
    assert doc["passed"] and len(doc["candidates"]) == 2
    for cand in doc["candidates"]:
        assert cand["backend"] == "onnxruntime" and cand["precision"] == "fp32"
        assert cand["max_rel_l2"] < 1e-4 and cand["min_cosine"] > 0.99999 and cand["elementwise_failures"] == 0


@pytest.mark.parametrize("candidate,why", [
    ("other.onnx", "min cosine"),
    ("external_wrong.onnx", "data config differs: mean"),
    ("nan.onnx", "10 NaN/Inf values in the output"),  # 2 per image x 5 images: counted per output element
])
def test_broken_candidates_fail_and_say_why(models, parity_images, tmp_path, candidate, why):
    report = tmp_path / "parity.json"
    res = run_cli("parity", models / "ref.pth", models / candidate, "--images", parity_images[0].parent,
                  "--report", report, "--no-progress")
    assert res.code == 1, res.out
    assert f"FAIL {models / candidate}" in res.out
    assert why in res.out
    doc = json.loads(report.read_text())  # valid JSON even with NaN in the outputs
    assert doc["passed"] is False and doc["candidates"][0]["passed"] is False


def test_locate_lists_layers_for_fp16_and_int8(models, parity_images, tmp_path):
    fp32 = models / "ref.onnx"
    fp16, int8 = tmp_path / "ref.fp16.onnx", tmp_path / "ref.int8.onnx"
    assert run_cli("quantize", fp32, "-o", fp16, "--precision", "fp16").code == 0
    res = run_cli("quantize", fp32, "-o", int8, "--precision", "int8", "--calib-dir", parity_images[0].parent,
                  "--calib-size", "5", "--max-float", "0", "--allow-below-gate")  # the gate: test_quantize_int8_search.py
    assert res.code == 0, res
    report = tmp_path / "parity.json"
    res = run_cli("parity", fp32, fp16, int8, "--images", parity_images[0].parent, "--locate",
                  "--report", report, "--no-progress", "--min-cosine", "0", "--max-rel-l2", "10")
    assert res.code == 0, res.out
    assert "locate ref.fp16.onnx" in res.out and "locate ref.int8.onnx" in res.out
    doc = json.loads(report.read_text())
    # the output error locate reports is the one ONNX Runtime gives for the two graphs, computed here
    import onnxruntime as ort

    from reid_export.runtime import open_encoder, preprocess

    with open_encoder(fp32) as enc:
        batch = preprocess(sorted(parity_images)[:8], enc.data_config)
    outputs = {}
    for path in (fp32, fp16, int8):
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        outputs[path] = sess.run(None, {sess.get_inputs()[0].name: batch})[0].astype(np.float64)
    for cand in (fp16, int8):
        loc = doc["locate"][str(cand)]
        assert loc["compared"] > 10 and loc["largest_growth"]
        expected = np.linalg.norm(outputs[cand] - outputs[fp32]) / np.linalg.norm(outputs[fp32])
        # (within 25%: with every intermediate tensor exposed ONNX Runtime fuses less, so it rounds differently)
        assert loc["final_rel_error"] == pytest.approx(expected, rel=0.25), (cand, loc["final_rel_error"], expected)
        growth = [layer["growth"] for layer in loc["largest_growth"]]
        assert growth == sorted(growth, reverse=True)
    # INT8 loses more than FP16, and the error is visible at the output
    assert doc["locate"][str(int8)]["final_rel_error"] > doc["locate"][str(fp16)]["final_rel_error"]


def test_locate_compares_what_follows_a_folded_relu(models, parity_images, tmp_path):
    """--target cpu folds each ReLU into a uint8 range and its Conv takes over the ReLU's output name
    (holding the value before the ReLU). locate compares the clamped DequantizeLinear output there;
    comparing by name alone put every ReLU at the top with a relative error near 1."""
    import onnx as onnx_lib

    from reid_export.export.metadata import read_data_config
    from reid_export.preprocess import preprocess
    from reid_export.export.quantize.locate import locate

    fp32, int8 = models / "ref.onnx", tmp_path / "ref.int8-cpu.onnx"
    res = run_cli("quantize", fp32, "-o", int8, "--precision", "int8", "--target", "cpu", "--calib-dir",
                  parity_images[0].parent, "--calib-size", "5", "--no-progress", "--max-float", "0",
                  "--allow-below-gate")  # 2 held-out crops of a small net: the gate is test_quantize_int8_search.py's subject
    assert res.code == 0, res
    cand = onnx_lib.load(str(int8))
    producers = {o: n.op_type for n in cand.graph.node for o in n.output}
    relus = [n.output[0] for n in onnx_lib.load(str(fp32)).graph.node if n.op_type == "Relu"]
    assert relus and all(producers.get(r) != "Relu" for r in relus)  # every ReLU was folded away
    batch = preprocess(parity_images[:4], read_data_config(onnx_lib.load(str(fp32))))
    loc = locate(fp32, int8, batch)
    by_tensor = {layer["tensor"]: layer for layer in loc["layers"]}
    compared = [by_tensor[r] for r in relus if r in by_tensor]
    assert len(compared) == len(relus)
    assert max(layer["rel_error"] for layer in compared) < 0.3, compared  # not the pre-ReLU values (rel error ~1)
    assert loc["final_rel_error"] < 0.3
    # no ReLU looks like the origin of the error because its Conv input (renamed away) was not compared
    assert all(layer["input_rel_error"] > 0 for layer in compared[1:])
