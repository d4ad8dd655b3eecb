"""The accuracy-guarded INT8 search of ``reid-export quantize``: methods compared on held-out crops,
the gate that refuses a broken model, the fallback to float, the weight range for the CPU's arithmetic.

The model is a small OSNet-like network built here with torch (depthwise 3x3 convolutions,
channel gates GAP -> 1x1 -> ReLU -> 1x1 -> sigmoid -> Mul, residual adds, a BNNeck-style
BatchNorm on the pooled feature). A few channels of every BatchNorm are scaled up 8x: rare large
activations, as trained networks have, which entropy calibration clips away and which OSNet's
gates depend on. Images are generated (smooth random crops), so these tests always run.
"""

from __future__ import annotations

import json

import cv2
import numpy as np
import onnx
import pytest
import torch
from torch import nn

from conftest import assert_clean_error, run_cli
from reid_export.data_config import DataConfig
from reid_export.export.quantize.calibration import TensorStats, mse_threshold
from reid_export.export.quantize.qdq import full_range_warning, model_weight_range_warning, weight_range_for_cpu
from reid_export.export.metadata import base_metadata, get_metadata, save_onnx, set_metadata
from reid_export.export.quantize import select_images


class _Gate(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, c // 4, 1), nn.Conv2d(c // 4, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))))


class _Lite(nn.Module):  # OSNet's LightConv3x3: 1x1 linear, depthwise 3x3, BN, ReLU
    def __init__(self, c):
        super().__init__()
        self.pw = nn.Conv2d(c, c, 1, bias=False)
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(self.bn(self.dw(self.pw(x))))


class _Block(nn.Module):  # two streams of different depth, one shared gate, 1x1 expand, residual
    def __init__(self, c, m):
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(c, m, 1, bias=False), nn.BatchNorm2d(m), nn.ReLU())
        self.a, self.b, self.gate = _Lite(m), nn.Sequential(_Lite(m), _Lite(m)), _Gate(m)
        self.expand = nn.Sequential(nn.Conv2d(m, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        y = self.reduce(x)
        return torch.relu(self.expand(self.gate(self.a(y)) + self.gate(self.b(y))) + x)


class _OSNetLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.blocks = nn.Sequential(_Block(32, 16), _Block(32, 16))
        self.neck = nn.BatchNorm1d(32)

    def forward(self, x):
        return self.neck(self.blocks(self.stem((x / 255.0 - 0.45) / 0.225)).mean((2, 3)))


def _crop(rng) -> np.ndarray:
    small = rng.integers(0, 256, (int(rng.integers(4, 12)), int(rng.integers(2, 6)), 3), dtype=np.uint8)
    return cv2.resize(small, (32, 64), interpolation=cv2.INTER_CUBIC)


@pytest.fixture(scope="module")
def osnet_like(tmp_path_factory):
    """(fp32 ONNX, folder of 48 crops) for the OSNet-like net at 64x32."""
    folder = tmp_path_factory.mktemp("osnet_like")
    torch.manual_seed(0)
    net = _OSNetLike().eval()
    g = torch.Generator().manual_seed(0)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(n, generator=g) * 0.5 + 0.5)
            w = torch.rand(n, generator=g) * 0.5 + 0.75
            w[: max(1, n // 16)] *= 8.0  # a few channels with large activations
            m.weight.data.copy_(w)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.2)
    rng = np.random.default_rng(0)
    with torch.no_grad():  # the BNNeck's statistics from real forward passes, so the feature is centred
        batch = torch.tensor(np.stack([_crop(rng) for _ in range(64)])).permute(0, 3, 1, 2).float()
        net.neck.train()
        net.neck.momentum = None
        net(batch)
        net.neck.eval()
    path = folder / "osnet_like.onnx"
    torch.onnx.export(net, torch.rand(1, 3, 64, 32) * 255, str(path), input_names=["images"],
                      output_names=["features"], dynamic_axes={"images": {0: "n"}, "features": {0: "n"}},
                      opset_version=17, dynamo=False)
    model = onnx.load(str(path))
    set_metadata(model, base_metadata(DataConfig(height=64, width=32), "fp32"))
    save_onnx(model, path)
    images = folder / "crops"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(48):
        cv2.imwrite(str(images / f"{i:04d}_c1s1_000000_00.png"), _crop(rng))
    return path, images


# 48 crops: 16 held out for the gate, 32 to calibrate on
SMALL = ["--calib-size", "32", "--val-size", "16", "--no-progress"]
# These tests exercise the search and the gate's mechanics on a small random OSNet-like net, at the
# limit the gate had before the evidence of benchmarks/RESULTS.md ("INT8 fidelity gate: the evidence")
# set the default (PAIR_ERROR_LIMIT); the default itself refuses this net's INT8 (test_int8_distill.py).
GATE: list[str] = ["--max-pair-error", "0.2"]


def _quantize(src, out, *args):
    return run_cli("quantize", src, "-o", out, "--precision", "int8", *args)


def _quantization(path) -> dict:
    return json.loads(get_metadata(onnx.load(str(path)))["reid_export.quantization"])


def _info(path) -> dict:
    """The search record in the model's metadata (the same ``SearchRecord.to_dict()`` as the report's)."""
    return _quantization(path)["search"]


@pytest.mark.slow
def test_entropy_fails_the_gate_that_the_chosen_method_passes(osnet_like, tmp_path):
    src, crops = osnet_like
    out = tmp_path / "entropy.onnx"
    result = _quantize(src, out, "--calib-dir", crops, "--method", "entropy", "--no-equalize", "--max-float", "0",
                       *SMALL, *GATE)
    assert result.code == 1, result
    assert_clean_error(result, "not written", "misses the accuracy gate", "best entropy", "pairwise similarity error")
    assert not out.exists() and list(tmp_path.iterdir()) == []

    out = tmp_path / "auto.onnx"
    result = _quantize(src, out, "--calib-dir", crops, "--max-float", "0", *SMALL, *GATE,
                       "--report", tmp_path / "auto.json")
    assert result.code == 0, result
    info = _info(out)
    tried = {t["label"]: t for t in info["tried"]}
    methods = {"entropy", "mse", "percentile 99.9", "percentile 99.99", "percentile 99.999", "minmax"}
    # every method on the graph as given and on the activation-equalised graph
    assert {t for t in tried if not t.endswith(", bias-corrected")} == methods | {f"{m}, equalised" for m in methods}
    corrected = [t for t in tried if t.endswith(", bias-corrected")]  # the best candidate, bias-corrected
    assert len(corrected) == 1 and tried[corrected[0]]["bias_corrected"]
    assert {t["variant"] for t in info["tried"]} == {"plain", "equalised"}
    assert info["equalization"]["equalised"] > 0 and info["equalization"]["fp32_max_rel_l2"] < 1e-4
    assert not tried["entropy"]["passed"] and tried[info["chosen"]]["passed"]
    assert info["chosen"] != "entropy" and info["passed"] and not _quantization(out)["below_gate"]
    objective = {label: t["objective"] for label, t in tried.items()}
    assert objective[info["chosen"]]["mean_cosine"] > objective["entropy"]["mean_cosine"] + 0.01
    assert objective[info["chosen"]]["pair_error"] < 0.5 * objective["entropy"]["pair_error"]
    assert info["method_requested"] == "auto" and info["fallback_float"] == []
    assert info["held_out"]["images"] == 16 and info["calibration"]["images"] == 32
    assert "<- chosen" in result.err and "accuracy gate passed" in result.err
    report = json.loads((tmp_path / "auto.json").read_text())
    assert report["written"] and report["passed"] and report["search"] == info  # one record, written once
    assert len(report["search"]["tried"]) == 13 and report["search"]["variant"] in ("plain", "equalised")
    assert report["schema_version"] >= 1 and report["command"] == "quantize"


@pytest.mark.slow
def test_fallback_keeps_the_worst_layers_in_float_until_the_gate_holds(osnet_like, tmp_path):
    src, crops = osnet_like
    out = tmp_path / "fallback.onnx"
    result = _quantize(src, out, "--calib-dir", crops, "--method", "entropy", "--no-equalize", *SMALL, *GATE)
    assert result.code == 0, result
    info = _info(out)
    kept = info["fallback_float"]
    assert kept and info["passed"], info
    assert info["objective"]["pair_error"] < info["objective_before_fallback"]["pair_error"]
    assert set(kept) <= set(info["kept_float"])
    model = onnx.load(str(out))
    made_by = {o: n for n in model.graph.node for o in n.output}
    for node in model.graph.node:  # the nodes kept in float read no DequantizeLinear output
        if node.name in kept:
            assert not any(made_by.get(i) is not None and made_by[i].op_type == "DequantizeLinear"
                           for i in node.input), node.name
    # fewer nodes than the whole quantizable set; the report names them
    assert len(kept) < sum(n.op_type in ("Conv", "Add") for n in model.graph.node)
    assert "kept in float to meet the gate" in result.err


@pytest.mark.slow
def test_impossible_gate_refuses_and_the_override_marks_the_model(osnet_like, tmp_path):
    src, crops = osnet_like
    folder = tmp_path / "out"
    folder.mkdir()
    out = folder / "q.onnx"
    impossible = ["--min-mean-cosine", "1.001", "--max-float", "2"]  # no model has cosine above 1
    result = _quantize(src, out, "--calib-dir", crops, "--method", "mse", "--target", "cpu", *SMALL, *impossible)
    assert result.code == 1, result
    assert_clean_error(result, "q.onnx: not written", "mean cosine", "< 1.001", "tried mse",
                       "2 of 2 allowed nodes in float", "--allow-below-gate")
    assert list(folder.iterdir()) == []

    # --report still says what was tried (the model is not written)
    report_path = tmp_path / "refused.json"
    result = _quantize(src, out, "--calib-dir", crops, "--method", "mse", "--target", "cpu", *SMALL, *impossible,
                       "--report", report_path)
    assert result.code == 1 and list(folder.iterdir()) == []
    doc = json.loads(report_path.read_text())
    assert doc["written"] is False and doc["gate_passed"] is False and doc["search"]["tried"]
    assert doc["seconds"] > 0
    assert not doc["search"]["passed"] and doc["search"]["gate"]["min_mean_cosine"] == 1.001

    result = _quantize(src, out, "--calib-dir", crops, "--method", "mse", *SMALL, *impossible, "--allow-below-gate")
    assert result.code == 0, result
    assert "BELOW THE ACCURACY GATE" in result.err
    info = _info(out)
    assert _quantization(out)["below_gate"] and not info["passed"] and info["gate"]["min_mean_cosine"] == 1.001


def test_held_out_images_are_never_calibration_images(osnet_like):
    _, crops = osnet_like
    lines = []
    calib, val = select_images([crops], 32, [], 16, 0, lines.append)
    assert len(calib) == 32 and len(val) == 16 and not set(calib) & set(val)
    calib, val = select_images([crops], 512, [], 128, 0, lines.append)  # too few: a quarter held out
    assert len(val) == 12 and len(calib) == 36 and not set(calib) & set(val)
    assert "fewer than `calib_size` 512" in lines[-2] and "12 other images" in lines[-1]


def _market_names(folder, people=30, cams=2, per_cam=5):
    folder.mkdir()
    for pid in range(1, people + 1):
        for cam in range(1, cams + 1):
            for i in range(per_cam):
                (folder / f"{pid:04d}_c{cam}s1_{i:06d}_00.jpg").write_bytes(b"")
    (folder / "0000_c1s1_000000_00.jpg").write_bytes(b"")  # a distractor: calibration only, never a person
    return folder


def test_market_named_calibration_folders_hold_out_whole_identities(tmp_path):
    from reid_export.data.market import parse_name
    from reid_export.export.quantize import select_split

    folder = _market_names(tmp_path / "train")
    lines = []
    split = select_split([folder], 100, [], 20, 0, lines.append)
    calib, val, held = split.calibration, split.held_out, split.identities
    assert held is not None and len(calib) == 100 and len(val) == 20
    people = {parse_name(p.name)[0] for p in held.paths}
    assert set(val) <= set(held.paths) and not {parse_name(p.name)[0] for p in calib} & people
    assert len(held.paths) == 10 * len(people) and 0 not in people  # whole identities, each with all its images
    assert 150 <= len(held.paths) <= 301 - 100  # up to HELD_OUT_IMAGES, leaving --calib-size to calibrate on
    for pid in people:  # every person has a query, and each query a match from the other camera
        mine = held.pids == pid
        assert held.is_query[mine].any()
        for q in np.where(mine & held.is_query)[0]:
            assert (mine & ~held.is_query & (held.camids != held.camids[q])).any()
    assert f"{len(people)} people held out of calibration" in lines[-1]
    assert select_split([folder], 100, [], 20, 0, lambda line: None).identities.paths == held.paths  # the seed decides
    # names that are not Market's, or too little left to calibrate on: images held out as before
    plain = tmp_path / "plain"
    plain.mkdir()
    for i in range(60):
        (plain / f"crop{i}.jpg").write_bytes(b"")
    assert select_split([plain], 30, [], 16, 0, lambda line: None).identities is None
    assert select_split([folder], 300, [], 20, 0, lambda line: None).identities is None


def test_held_out_retrieval_scores_against_an_independent_count():
    """score_held_out: identical features give a zero difference; features that confuse two people give
    the Rank-1 counted by hand, and the paired interval brackets the difference."""
    from reid_export.verify.heldout import score_held_out

    rng = np.random.default_rng(0)
    pids = np.repeat(np.arange(1, 11), 4)
    camids = np.tile([1, 1, 2, 2], 10)
    is_query = np.tile([True, False, True, False], 10)
    centres = rng.normal(size=(10, 32))
    ref = centres[pids - 1] + 0.05 * rng.normal(size=(40, 32))
    same = score_held_out(ref, ref.copy(), pids, camids, is_query)
    assert same["reference"]["Rank-1"] == 100.0 and same["reference"]["mAP"] == pytest.approx(100.0)
    assert same["delta_mAP"] == 0.0 and same["delta_mAP_ci95"] == [0.0, 0.0]
    assert same["identities"] == 10 and same["queries"] == 20 and same["gallery"] == 20
    confused = ref.copy()
    confused[(pids == 1) & ~is_query] = centres[1]  # person 1's gallery images now look like person 2
    res = score_held_out(ref, confused, pids, camids, is_query)
    # person 1's two queries lose their match (Rank-1 0); person 2's queries may rank person 1 first
    dist = 1 - (confused / np.linalg.norm(confused, axis=1, keepdims=True)) @ (
        confused / np.linalg.norm(confused, axis=1, keepdims=True)).T
    hits = []
    for q in np.where(is_query)[0]:
        valid = ~is_query & ~((pids == pids[q]) & (camids == camids[q]))
        g = np.where(valid)[0]
        hits.append(100.0 * (pids[g[np.argmin(dist[q, g])]] == pids[q]))
    assert res["candidate"]["Rank-1"] == pytest.approx(np.mean(hits)) and res["delta_Rank-1"] < 0
    lo, hi = res["delta_mAP_ci95"]
    assert lo <= res["delta_mAP"] <= hi and res["delta_mAP"] < 0


def test_mse_threshold_is_the_least_squares_clip():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.laplace(0, 1, 100_000), [40.0, -35.0, 30.0]]).astype(np.float32)
    stats = TensorStats(num_bins=2048)
    stats.update(values)
    found = mse_threshold(stats.hist, stats.width, 127)

    def mse(t):
        step = t / 127
        return np.mean((np.clip(np.round(values / step), -127, 127) * step - values) ** 2)

    grid = np.linspace(1, 40, 400)
    best = grid[np.argmin([mse(t) for t in grid])]
    assert mse(found) <= 1.02 * mse(best), (found, best)
    assert found < 40.0  # clips the largest outlier


@pytest.mark.slow
def test_weight_range_follows_the_cpu(osnet_like, tmp_path, monkeypatch):
    assert weight_range_for_cpu({"avx2", "fma"})[0] is True
    assert weight_range_for_cpu({"avx2", "avx512_vnni"})[0] is False
    assert full_range_warning({"avx2"}) and full_range_warning({"avx_vnni"}) is None
    src, crops = osnet_like
    outs = {}
    for flags in ("avx2 fma", "avx2 avx512f avx512_vnni"):
        monkeypatch.setenv("REID_CPU_FLAGS", flags)
        out = tmp_path / f"{flags.split()[-1]}.onnx"
        result = _quantize(src, out, "--calib-dir", crops, "--target", "cpu", "--method", "percentile",
                           "--max-float", "0", "--allow-below-gate", *SMALL)
        assert result.code == 0, result
        outs[flags] = out
    seven, full = _quantization(outs["avx2 fma"]), _quantization(outs["avx2 avx512f avx512_vnni"])
    assert seven["reduce_range"] and not full["reduce_range"]
    assert "VNNI" in full["weights_for"] and "any x86-64" in seven["weights_for"]

    def max_weight(path):
        model = onnx.load(str(path))
        inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
        return max(int(np.abs(inits[n.input[0]].astype(np.int32)).max()) for n in model.graph.node
                   if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].ndim == 4)

    assert max_weight(outs["avx2 fma"]) <= 64 < max_weight(outs["avx2 avx512f avx512_vnni"])
    monkeypatch.setenv("REID_CPU_FLAGS", "avx2 fma")
    assert "no VNNI" in model_weight_range_warning(outs["avx2 avx512f avx512_vnni"])
    assert model_weight_range_warning(outs["avx2 fma"]) is None
    result = run_cli("bench", outs["avx2 avx512f avx512_vnni"], "--batch-sizes", "1", "--iterations", "2",
                     "--warmup", "0", "--no-progress")
    assert result.code == 0, result
    assert "no VNNI/AMX int8 dot product" in result.err
    monkeypatch.setenv("REID_CPU_FLAGS", "avx2 avx512_vnni")
    assert model_weight_range_warning(outs["avx2 avx512f avx512_vnni"]) is None


@pytest.mark.slow
def test_equalisation_is_tried_and_kept_where_it_helps(osnet_like, tmp_path):
    """On the OSNet-like net (a few channels 8x larger) entropy calibration fails the gate on the
    graph as given and passes on the equalised graph; --no-equalize tries the plain graph only."""
    src, crops = osnet_like
    out = tmp_path / "eq.onnx"
    result = _quantize(src, out, "--calib-dir", crops, "--method", "entropy", "--max-float", "0", *SMALL, *GATE)
    assert result.code == 0, result
    info = _info(out)
    tried = {t["label"]: t for t in info["tried"]}
    assert {"entropy", "entropy, equalised"} <= set(tried) <= {"entropy", "entropy, equalised",
                                                               "entropy, equalised, bias-corrected"}
    assert not tried["entropy"]["passed"] and tried["entropy, equalised"]["passed"]
    assert info["chosen"].startswith("entropy, equalised") and info["variant"] == "equalised"
    assert tried[info["chosen"]]["objective"]["pair_error"] < 0.5 * tried["entropy"]["objective"]["pair_error"]
    eq = info["equalization"]
    assert eq["tried"] and eq["equalised"] > 0 and eq["fp32_max_rel_l2"] < 1e-4
    assert "activation equalisation" in result.err
    # the written graph computes the FP32 model's features up to INT8 rounding, not something else
    assert info["objective"]["mean_cosine"] >= 0.98

    out = tmp_path / "plain.onnx"
    result = _quantize(src, out, "--calib-dir", crops, "--method", "entropy", "--max-float", "0", "--no-equalize",
                       *SMALL, *GATE)
    assert result.code == 1 and not out.exists(), result
    assert_clean_error(result, "not written", "best entropy")


@pytest.mark.slow
def test_an_equalised_graph_that_changes_fp32_is_not_used(osnet_like, tmp_path, monkeypatch):
    """The quantizer's own check: if the rescaling went wrong (here: the consumers are not
    compensated), the equalised graph's FP32 features differ and only the plain graph is searched."""
    import reid_export.export.quantize.equalize as equalize_module

    real_apply = equalize_module.apply

    def broken_apply(model, regions):
        for region in regions:
            region.consumers = []
        return real_apply(model, regions)

    monkeypatch.setattr(equalize_module, "apply", broken_apply)
    src, crops = osnet_like
    out = tmp_path / "q.onnx"
    result = _quantize(src, out, "--calib-dir", crops, "--method", "mse", "--max-float", "0", *SMALL, *GATE)
    assert result.code == 0, result  # mse passes on the plain graph (test above)
    assert "not used: the equalised FP32 graph differs from the original" in result.err
    info = _info(out)
    assert {t["variant"] for t in info["tried"]} == {"plain"} and info["variant"] == "plain"
    assert info["equalization"]["fp32_max_rel_l2"] > 1e-4


@pytest.mark.slow
def test_the_default_gate_refuses_spread_error_and_names_the_recovery_that_passes(osnet_like, tmp_path):
    """The OSNet-like net's INT8 error is spread over its depthwise, gated blocks: with the defaults
    (every method on both graphs, bias correction, a quarter of the nodes in float) no candidate
    reaches the default gate; nothing is written, and the one line names --precision fp16 first.
    That recovery then passes the same gate (its check on real crops) and is written."""
    from reid_export.embeddings import PAIR_ERROR_LIMIT

    src, crops = osnet_like
    out = tmp_path / "out" / "q.onnx"
    out.parent.mkdir()
    result = _quantize(src, out, "--calib-dir", crops, *SMALL, "--report", tmp_path / "refused.json")
    assert result.code == 1, result
    assert_clean_error(result, "not written", "misses the accuracy gate", f"> {PAIR_ERROR_LIMIT:.3f}",
                       "--precision fp16 recovers")
    assert list(out.parent.iterdir()) == []
    doc = json.loads((tmp_path / "refused.json").read_text())
    assert doc["gate_passed"] is False and doc["search"]["gate"]["max_pair_error"] == PAIR_ERROR_LIMIT
    assert doc["search"]["fallback_float"] or any(t["fallback_nodes"] for t in doc["search"]["tried"])  # it tried
    fp16 = tmp_path / "out" / "q.fp16.onnx"
    result = run_cli("quantize", src, "-o", fp16, "--precision", "fp16", "--calib-dir", crops)
    assert result.code == 0 and "accuracy gate passed" in result.err, result
    line = next(line for line in result.err.splitlines() if line.startswith("fp16 vs fp32"))
    assert float(line.split("pair error ")[1].split(",")[0]) <= PAIR_ERROR_LIMIT


def test_the_fp16_variant_is_held_to_the_same_gate(osnet_like, tmp_path):
    """FP16 is judged on real crops by the same gate: an unreachable limit refuses it (nothing written,
    the report says why); generated images (no --calib-dir) only report, they are not people."""
    from reid_export import api

    src, crops = osnet_like
    out = tmp_path / "q.fp16.onnx"
    refused = api.quantize(src, out, "fp16", calib_dirs=[crops], gate=api.Tolerances.reduced_precision(max_pair_error=0.0),
                           log=lambda line: None)
    assert not out.exists() and refused.gate_passed is False and not refused.passed and not refused.written
    assert "FP16 model misses the accuracy gate" in refused.refusal and "pair error" in refused.table()
    report = api.quantize(src, out, "fp16", gate=api.Tolerances.reduced_precision(max_pair_error=0.0), log=lambda line: None)
    assert report.written and report.gate_passed is None and report.passed


@pytest.mark.slow
def test_quantize_scores_held_out_identities_as_an_independent_extract_does(osnet_like, tmp_path):
    """Calibration crops with Market-1501 names: quantize holds whole people out, gates on some of their
    images and scores FP32 against the written INT8 graph on all of them. The figures equal what
    ``score_held_out`` gives on features computed independently by ``extract``'s encoders."""
    from reid_export.export.quantize import select_split
    from reid_export.runtime import open_encoder
    from reid_export.verify.heldout import score_held_out

    src, _ = osnet_like
    folder = tmp_path / "train"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for pid in range(1, 31):
        for cam in (1, 2):
            for i in range(3):
                cv2.imwrite(str(folder / f"{pid:04d}_c{cam}s1_{i:06d}_00.png"), _crop(rng))
    out, report = tmp_path / "q.onnx", tmp_path / "q.json"
    result = _quantize(src, out, "--calib-dir", folder, "--method", "mse", "--no-equalize", "--max-float", "0",
                       "--allow-below-gate", "--report", report, *SMALL)
    assert result.code == 0, result
    assert "people never calibrated on" in result.err
    retrieval = json.loads(report.read_text())["search"]["held_out_retrieval"]
    held = select_split([folder], 32, [], 16, 0, lambda line: None).identities
    assert held is not None and retrieval["identities"] == held.identities
    with open_encoder(src) as fp32, open_encoder(out) as int8:
        ref = fp32.encode_files(held.paths, progress=False)
        cand = int8.encode_files(held.paths, progress=False)
    expected = score_held_out(ref, cand, held.pids, held.camids, held.is_query)
    assert not np.allclose(ref, cand)  # the INT8 graph computes other features: the figures say which
    for key in ("queries", "gallery"):
        assert retrieval[key] == expected[key]
    for key in ("delta_Rank-1", "delta_mAP"):
        assert retrieval[key] == pytest.approx(expected[key], abs=1e-6)
