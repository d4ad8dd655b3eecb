"""OSNet: torchreid's key layout and forward, exactly; torchreid checkpoints as they are; the fast-reid
OSNet config trains and exports.

torchreid's own features (``../shared/golden/torchreid/osnet_x0_25_market1501``) are the authority:
the forward from ``inputs.npy``, ``reid-export extract`` from the image files with the shipped config
(Pillow bilinear resize) and the exported ONNX all reproduce them within relative L2 1e-5; each
check is also shown to fail on a broken candidate (the wrong stem pool, OpenCV's resize).
"""

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from conftest import CONFIGS, REPO, assert_clean_error, run_cli, run_main

from reid_export.checkpoint import extract_state_dict, load_model_from_checkpoint
from reid_export.config import load_config
from reid_export.modeling import build_model
from reid_export.modeling.osnet import (OSNET_WIDTHS, SHIPPED_TORCHREID_CONFIGS, describe_osnet_state,
                                        is_torchreid_layout, torchreid_to_reid_export)
from reid_export.runtime.encoder import open_encoder

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

SHARED = REPO.parent / "shared"
GOLDEN = Path(os.environ.get("REID_GOLDEN", SHARED / "golden")) / "torchreid" / "osnet_x0_25_market1501"
GOLDEN_IMAGES = GOLDEN.parent.parent / "fastreid" / "images"
MODELS = Path(os.environ.get("REID_MODELS", SHARED / "models"))
CHECKPOINT = MODELS / "torchreid_osnet_x0_25_market1501.pt"
TORCHREID = CONFIGS / "torchreid"
TOLERANCE = 1e-5


def rel_l2(ours: np.ndarray, theirs: np.ndarray) -> np.ndarray:
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    return np.linalg.norm(ours - theirs, axis=1) / np.linalg.norm(theirs, axis=1)


def golden() -> dict:
    if not (GOLDEN / "features.npy").exists() or not CHECKPOINT.exists():
        pytest.skip(f"torchreid golden data {GOLDEN} or {CHECKPOINT} not present "
                    "(set REID_GOLDEN / REID_MODELS to the folders holding them)")
    meta = json.loads((GOLDEN / "inputs.json").read_text())
    return {"inputs": np.load(GOLDEN / "inputs.npy"), "features": np.load(GOLDEN / "features.npy"),
            "images": [GOLDEN_IMAGES / n for n in meta["images"]]}


def torchreid_state(model: torch.nn.Module, num_classes: int = 7) -> dict:
    """A model's weights in torchreid's layout: no prefixes, ``fc.*``, a ``classifier`` of its own."""
    out = {}
    for key, value in model.state_dict().items():
        if key == "heads.weight":
            continue
        key = key[len("backbone."):] if key.startswith("backbone.") else key[len("heads."):]
        out[key] = value.clone()
    dim = model.heads.out_dim
    out["classifier.weight"] = torch.randn(num_classes, dim)
    out["classifier.bias"] = torch.zeros(num_classes)
    return out


def randomize_norms(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial BN/IN affine parameters and running statistics, so that a wrong layer shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.BatchNorm1d, torch.nn.InstanceNorm2d)) and m.affine:
                m.weight.copy_(0.5 + 0.5 * torch.rand(m.weight.shape, generator=gen))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
            if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.BatchNorm1d)):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))
    return model.eval()


# --- key layout ------------------------------------------------------------------------------

def test_key_layout_is_torchreid_s_on_the_real_checkpoint():
    """All 567 tensors of torchreid's osnet_x0_25 state dict, names and shapes, minus the classifier."""
    if not CHECKPOINT.exists():
        pytest.skip(f"{CHECKPOINT} not present (set REID_MODELS)")
    theirs = torch.load(CHECKPOINT, map_location="cpu", weights_only=True)
    assert len(theirs) == 567 and is_torchreid_layout(theirs)
    ours = build_model(load_config(TORCHREID / "osnet_x0_25.yml")).state_dict()
    mapped = torchreid_to_reid_export(theirs)
    assert set(mapped) == set(ours) - {"heads.weight"}
    assert all(mapped[k].shape == ours[k].shape for k in mapped)
    assert {k for k in theirs if k not in {"classifier.weight", "classifier.bias"}} == \
        {k.split(".", 1)[1] for k in mapped}


@pytest.mark.parametrize("width", list(OSNET_WIDTHS))
def test_fastreid_layout_and_sizes(width):
    """fast-reid's osnet.py names (the same as torchreid's without fc) and the published model sizes."""
    cfg = load_config(CONFIGS / "CUHK03" / "bagtricks_osnet_x0_25_cpu.yml",
                      ["MODEL.BACKBONE.DEPTH", width, "MODEL.BACKBONE.FEAT_DIM", OSNET_WIDTHS[width][3]])
    model = build_model(cfg)
    keys = model.backbone.state_dict()
    c = OSNET_WIDTHS[width]
    mid = c[1] // 4
    expected = {
        "conv1.conv.weight": (c[0], 3, 7, 7), "conv1.bn.running_mean": (c[0],),
        "conv2.0.conv1.conv.weight": (mid, c[0], 1, 1),
        "conv2.0.conv2a.conv1.weight": (mid, mid, 1, 1), "conv2.0.conv2a.conv2.weight": (mid, 1, 3, 3),
        "conv2.0.conv2d.3.bn.weight": (mid,), "conv2.0.gate.fc1.weight": (mid // 16, mid, 1, 1),
        "conv2.0.gate.fc2.bias": (mid,), "conv2.0.conv3.conv.weight": (c[1], mid, 1, 1),
        "conv2.0.downsample.conv.weight": (c[1], c[0], 1, 1), "conv2.2.0.conv.weight": (c[1], c[1], 1, 1),
        "conv3.2.0.bn.running_var": (c[2],), "conv4.1.conv3.bn.weight": (c[3],),
        "conv5.conv.weight": (c[3], c[3], 1, 1),
    }
    for key, shape in expected.items():
        assert tuple(keys[key].shape) == shape, key
    assert "conv2.1.downsample.conv.weight" not in keys and "conv4.2.0.conv.weight" not in keys
    assert not any(".IN." in k for k in keys)
    # weights per OSBlock: conv1 2 + 10 LightConv3x3 x 3 + gate 2 + conv3 2 (+ downsample 2 in the first
    # block of a stage) = 36 (38); 6 blocks + 2 transitions x 2 + stem 2 + conv5 2 = 230 at every width
    assert len([k for k in keys if k.endswith(".weight")]) == 230
    # torchreid's model zoo: 2.2M / 1.3M / 0.6M / 0.2M parameters (with fc 512, without classifier)
    torchreid = build_model(load_config(TORCHREID / "osnet_x0_25.yml", ["MODEL.BACKBONE.DEPTH", width]))
    params = sum(p.numel() for n, p in torchreid.named_parameters() if n != "heads.weight") / 1e6
    assert abs(params - {"x1_0": 2.2, "x0_75": 1.3, "x0_5": 0.6, "x0_25": 0.2}[width]) < 0.1, params


def test_ibn_and_ain_layouts():
    ibn = build_model(load_config(TORCHREID / "osnet_ibn_x1_0.yml")).state_dict()
    assert "backbone.conv1.bn.weight" in ibn and "backbone.conv1.bn.running_mean" not in ibn  # IN stem
    assert "backbone.conv2.1.IN.weight" in ibn and "backbone.conv3.0.IN.weight" not in ibn
    ain = build_model(load_config(TORCHREID / "osnet_ain_x1_0.yml")).state_dict()
    assert "backbone.pool2.0.conv.weight" in ain and "backbone.pool3.0.bn.running_mean" in ain
    assert "backbone.conv2.2.0.conv.weight" not in ain
    assert "backbone.conv2.0.conv2.3.layers.3.conv2.weight" in ain  # four streams of 1..4 layers
    # OSBlockINin (IN inside the residual, no BN after conv3) vs OSBlock, in osnet_ain_x1_0's pattern
    for stage, pattern in (("conv2", (True, True)), ("conv3", (False, True)), ("conv4", (True, False))):
        for i, with_in in enumerate(pattern):
            assert (f"backbone.{stage}.{i}.IN.weight" in ain) == with_in
            assert (f"backbone.{stage}.{i}.conv3.bn.weight" in ain) == (not with_in)


@pytest.mark.parametrize("arch", SHIPPED_TORCHREID_CONFIGS)
def test_shipped_configs_load_torchreid_layouts_and_are_recognised(arch, tmp_path):
    """Each shipped config: a torchreid-layout file ({"state_dict"}, module. prefixes, any classifier)
    loads, gives the model's features, and its key shapes name this config."""
    cfg_path = TORCHREID / f"{arch}.yml"
    model = randomize_norms(build_model(load_config(cfg_path)), seed=1)
    state = {"module." + k: v for k, v in torchreid_state(model, num_classes=3).items()}
    path = tmp_path / f"{arch}.pth"
    torch.save({"state_dict": state, "epoch": 3}, path)
    info = describe_osnet_state(extract_state_dict(torch.load(path, weights_only=True)))
    assert info["arch"] == arch and info["config"] == f"configs/torchreid/{arch}.yml"
    loaded, _, data_config = load_model_from_checkpoint(path, cfg_path)
    assert data_config.interpolation == "pil-bilinear" and data_config.feat_dim == 512
    x = torch.rand(2, 3, 128, 64) * 255
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_mismatching_config_names_the_probable_config(tmp_path):
    model = build_model(load_config(TORCHREID / "osnet_x0_5.yml"))
    path = tmp_path / "osnet_x0_5_market.pth"
    torch.save(torchreid_state(model), path)
    result = run_cli("extract", path, "--config", TORCHREID / "osnet_x1_0.yml", str(path), "-o", tmp_path / "f.npy")
    assert_clean_error(result, str(path), "osnet_x0_5", "configs/torchreid/osnet_x0_5.yml")
    assert not (tmp_path / "f.npy").exists()
    # a ResNet config for an OSNet file says the same
    result = run_cli("extract", path, "--config", CONFIGS / "CUHK03" / "bagtricks_R18_cpu.yml", str(path),
                     "-o", tmp_path / "f.npy")
    assert_clean_error(result, "configs/torchreid/osnet_x0_5.yml")


def test_config_goes_to_the_checkpoints_of_a_multi_model_command():
    from reid_export.runtime.encoder import configs_for

    assert configs_for(["a.pt", "a.onnx", "a.fp16.onnx@openvino", "b.pth"], "c.yml") == ["c.yml", None, None, "c.yml"]
    assert configs_for(["a.onnx", "b.engine"], "c.yml") == ["c.yml", "c.yml"]  # the ONNX backend refuses it
    assert configs_for(["a.pt", "a.onnx"], None) == [None, None]


def test_bad_depth_is_one_line(tmp_path):
    cfg = tmp_path / "bad.yml"
    cfg.write_text(f"_BASE_: {TORCHREID / 'osnet_x0_25.yml'}\nMODEL:\n  BACKBONE:\n    DEPTH: x2_0\n")
    result = run_cli("onnx", CHECKPOINT, "-o", tmp_path / "m.onnx", "--config", cfg)
    assert_clean_error(result, "x2_0", "x0_25")


# --- torchreid's own features ------------------------------------------------------------------

@pytest.fixture(scope="module")
def torchreid_model():
    g = golden()
    model, cfg, data_config = load_model_from_checkpoint(CHECKPOINT, TORCHREID / "osnet_x0_25.yml")
    return g, model, data_config


def test_forward_reproduces_torchreid_from_its_inputs(torchreid_model):
    g, model, _ = torchreid_model
    x = torch.from_numpy(g["inputs"])
    with torch.no_grad():
        ours = model.heads(model.backbone(x)).numpy()  # inputs.npy is already normalised
    worst = rel_l2(ours, g["features"]).max()
    assert worst <= TOLERANCE, worst
    # the whole model takes RGB 0..255 and normalises inside: the same features
    mean = np.array([0.485, 0.456, 0.406], np.float32).reshape(1, 3, 1, 1)
    std = np.array([0.229, 0.224, 0.225], np.float32).reshape(1, 3, 1, 1)
    rgb255 = torch.from_numpy((g["inputs"] * std + mean) * 255)
    with torch.no_grad():
        assert rel_l2(model(rgb255).numpy(), g["features"]).max() <= TOLERANCE
    # a broken candidate: fast-reid's ResNet stem pool (no padding) instead of OSNet's
    model.backbone.maxpool.padding = 0
    try:
        with torch.no_grad():
            broken = model.heads(model.backbone(x)).numpy()
    finally:
        model.backbone.maxpool.padding = 1
    assert rel_l2(broken, g["features"]).min() > 100 * TOLERANCE


def test_extract_reproduces_torchreid_end_to_end(torchreid_model, tmp_path):
    """Image files -> reid-export extract with the shipped config (pil-bilinear) -> torchreid's features."""
    g, _, _ = torchreid_model
    out = tmp_path / "f.npy"
    result = run_cli("extract", CHECKPOINT, "--config", TORCHREID / "osnet_x0_25.yml", *g["images"], "-o", out,
                     "--no-progress")
    assert result.code == 0, result
    worst = rel_l2(np.load(out), g["features"]).max()
    assert worst <= TOLERANCE, worst
    # OpenCV's bilinear resize is a different preprocessing: far outside the tolerance
    result = run_cli("extract", CHECKPOINT, "--config", TORCHREID / "osnet_x0_25.yml", *g["images"], "-o", out,
                     "--no-progress", "--opts", "INPUT.INTERPOLATION", "linear")
    assert result.code == 0, result
    assert rel_l2(np.load(out), g["features"]).max() > 100 * TOLERANCE


@pytest.fixture(scope="module")
def torchreid_onnx(torchreid_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("torchreid-onnx") / "osnet_x0_25.onnx"
    result = run_cli("onnx", CHECKPOINT, "--config", TORCHREID / "osnet_x0_25.yml", "-o", path)
    assert result.code == 0, result
    return path


def test_onnx_export_reproduces_torchreid(torchreid_model, torchreid_onnx):
    g, _, _ = torchreid_model
    path = torchreid_onnx
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    stored = json.loads(props["reid_export.data_config"])
    assert stored["interpolation"] == "pil-bilinear" and stored["normalized_inside"] is True
    assert stored["feat_dim"] == 512 and stored["pixel_scale"] == 255.0
    with open_encoder(path) as enc:
        assert enc.backend == "onnxruntime" and enc.data_config.interpolation == "pil-bilinear"
        onnx_feats = enc.encode_files(g["images"], batch_size=4, progress=False)
    assert rel_l2(onnx_feats, g["features"]).max() <= TOLERANCE
    # parity against the checkpoint passes, and says so
    result = run_cli("parity", CHECKPOINT, path, "--config", TORCHREID / "osnet_x0_25.yml",
                     "--images", GOLDEN_IMAGES, "--no-progress")
    assert result.code == 0, result


def test_eval_takes_the_checkpoint_and_its_onnx_with_one_config(torchreid_onnx, tmp_path):
    """--config configures the checkpoint; the ONNX beside it keeps its own data config."""
    from conftest import data_dir

    root = data_dir("market1501-mini")
    report = tmp_path / "eval.json"
    result = run_cli("eval", CHECKPOINT, torchreid_onnx, "--config", TORCHREID / "osnet_x0_25.yml",
                     "--dataset-root", root, "--report", report, "--no-progress", "--max-map-drop", "0.01")
    assert result.code == 0, result
    rows = json.loads(report.read_text())
    assert "torchreid_osnet_x0_25_market1501" in json.dumps(rows) and "osnet_x0_25.onnx" in json.dumps(rows)
    # an ONNX alone still refuses a config it would not use
    result = run_cli("eval", torchreid_onnx, "--config", TORCHREID / "osnet_x0_25.yml", "--dataset-root", root,
                     "--no-progress")
    assert_clean_error(result, "--config/opts apply to checkpoints")  # eval has no --opts: the bare name


# --- training ----------------------------------------------------------------------------------

def test_fastreid_osnet_config_trains_a_few_iterations_and_exports(tmp_path):
    from test_train import make_market, tiny_opts
    from reid_train.cli import main as train_main

    root = tmp_path / "datasets"
    make_market(root / "toy")
    out = tmp_path / "run"
    cfg = CONFIGS / "CUHK03" / "bagtricks_osnet_x0_25_cpu.yml"
    result = run_main(train_main, ["--config", cfg, "--output-dir", out, "--no-progress",
                                   "--opts", *tiny_opts(root, "SOLVER.MAX_EPOCH", "2", "TEST.EVAL_PERIOD", "2")])
    assert result.code == 0, result.err
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert len(history) == 2 and all(np.isfinite(h["loss"]) for h in history)
    ckpt = out / "model_final.pth"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["model"]
    assert "backbone.conv2.0.conv2a.conv1.weight" in state and "heads.bottleneck.0.weight" in state
    # the trained weights moved (it trained), and the checkpoint exports without --config
    init = build_model(load_config(cfg, tiny_opts(root)))
    assert not torch.equal(state["backbone.conv1.conv.weight"], init.state_dict()["backbone.conv1.conv.weight"])
    onnx_path = tmp_path / "osnet.onnx"
    result = run_cli("onnx", ckpt, "-o", onnx_path)
    assert result.code == 0, result
    result = run_cli("parity", ckpt, onnx_path, "--images", root / "toy" / "query", "--no-progress")
    assert result.code == 0, result
