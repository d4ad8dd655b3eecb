"""reid-export onnx and the ONNX Runtime backend: the shipped configs, the fast-reid export pitfalls,
static batches, metadata, and bad inputs."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import CONFIGS, assert_clean_error, run_cli
from reid_export.checkpoint import save_checkpoint
from reid_export.config import load_config
from reid_export.data_config import DataConfig, data_config_from_cfg
from reid_export.export.metadata import KEY_DATA_CONFIG, KEY_SOURCE_SHA256, KEY_VERSION, get_metadata
from reid_export.export.onnx_export import export_checkpoint, export_module, generated_images
from reid_export.embeddings import relative_l2
from reid_export.fileio import sha256_file
from reid_export.modeling import build_model
from reid_export.modeling.random_weights import randomize_bn
from reid_export.runtime import open_encoder, preprocess

pytestmark = pytest.mark.slow  # a development run skips it: pytest -m "not slow"


def trained_like(model: nn.Module, size=(256, 128), seed: int = 0, branch_gain: float = 0.15) -> nn.Module:
    """Random weights with the numerics of a trained ReID network.

    Norm layers get non-trivial affine parameters; the last norm of every residual branch (and of
    every non-local block) a small gain, as trained ResNets have; BatchNorm statistics are measured
    on image-like inputs. A plain random ResNet amplifies float rounding block after block (torch
    FP32 itself then differs from FP64 by ~3e-5 on IBN nets), which would turn a 1e-5 parity bound
    into a test of the random weights instead of the export.
    """
    config = DataConfig(height=size[0], width=size[1])  # fast-reid's: 0..255 RGB, mean/std inside
    x = torch.from_numpy(preprocess(generated_images(4, size, seed=seed + 100), config))
    return randomize_bn(model, seed, size, inputs=[x], branch_gain=branch_gain)


def make_checkpoint(folder, cfg_name, opts=(), name="model.pth", ours=False):
    """A fast-reid-layout checkpoint (config passed separately) or one of ours (config embedded)."""
    cfg = load_config(CONFIGS / cfg_name, list(opts))
    torch.manual_seed(0)
    model = trained_like(build_model(cfg), size=tuple(cfg.INPUT.SIZE_TEST))
    path = folder / name
    if ours:
        save_checkpoint(path, model, cfg, data_config_from_cfg(cfg, model.feat_dim, path.stem))
    else:
        torch.save({"model": model.state_dict(), "optimizer": {}, "scheduler": {}, "iteration": 1}, path)
    return path, model, cfg


SHIPPED = {
    "BoT-R50": "Market1501/bagtricks_R50.yml",
    "BoT-R50-ibn": "Market1501/bagtricks_R50-ibn.yml",
    "AGW-R50": "Market1501/AGW_R50.yml",
    "SBS-R50-ibn": "Market1501/sbs_R50-ibn.yml",  # 384x128, GeM-P, non-local, IBN
}


@pytest.fixture(scope="module", params=list(SHIPPED), ids=list(SHIPPED))
def shipped_export(request, tmp_path_factory):
    """Each shipped config exported once (dynamic batch, default options) through the CLI."""
    folder = tmp_path_factory.mktemp(request.param)
    cfg_path = CONFIGS / SHIPPED[request.param]
    ckpt, model, cfg = make_checkpoint(folder, SHIPPED[request.param])
    out = folder / "model.onnx"
    result = run_cli("onnx", ckpt, "--config", cfg_path, "-o", out)
    assert result.code == 0, result
    return out, ckpt, model, cfg, result


def _real_batch(parity_images, size):
    """The 5 real crops plus 3 of them mirrored: 8 real images, for batches of 1, 3 and 8."""
    from reid_export.preprocess import read_image

    images = [read_image(p) for p in parity_images]
    images += [np.ascontiguousarray(im[:, ::-1]) for im in images[:3]]
    return images


@pytest.mark.slow
def test_shipped_configs_match_torch_at_batch_1_3_8(shipped_export, parity_images):
    out, _, model, cfg, result = shipped_export
    assert "max relative L2" in result.err and "simplified" in result.err
    encoder = open_encoder(out)
    assert encoder.backend == "onnxruntime" and encoder.max_batch is None
    inputs = preprocess(_real_batch(parity_images, cfg.INPUT.SIZE_TEST), encoder.data_config)
    with torch.no_grad():
        reference = model(torch.from_numpy(inputs)).numpy()
    # Batch 8 (all), batch 3 (the first three), batch 1 (the first two, one at a time).
    for bs, count in ((8, 8), (3, 3), (1, 2)):
        feats = np.concatenate([encoder.session.run(None, {"images": inputs[i:i + bs]})[0]
                                for i in range(0, count, bs)])
        rel = relative_l2(feats, reference[:count])
        assert rel.max() <= 1e-5, (bs, rel)
    # The features tell people apart (this is not a degenerate model that passes any parity test).
    normed = reference / np.linalg.norm(reference, axis=1, keepdims=True)
    assert (normed[:5] @ normed[:5].T)[np.triu_indices(5, 1)].mean() < 0.9


@pytest.mark.slow
def test_exported_graph_signature_and_metadata(shipped_export):
    out, ckpt, model, cfg, _ = shipped_export
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto, full_check=True)
    assert [i.name for i in proto.graph.input] == ["images"] and [o.name for o in proto.graph.output] == ["features"]
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert isinstance(dims[0], str) and dims[1:] == [3, *cfg.INPUT.SIZE_TEST]
    meta = get_metadata(proto)
    config = json.loads(meta[KEY_DATA_CONFIG])
    assert (config["height"], config["width"], config["feat_dim"]) == (*cfg.INPUT.SIZE_TEST, model.feat_dim)
    assert config["normalized_inside"] is True and config["pixel_scale"] == 255.0
    assert meta[KEY_SOURCE_SHA256] == sha256_file(ckpt) and meta[KEY_VERSION]
    assert json.loads(meta["reid_export.export"])["exporter"] == "dynamo"
    assert next(o.version for o in proto.opset_import if o.domain == "") >= 17
    assert not any(n.metadata_props for n in proto.graph.node)  # no stack traces with local paths


@pytest.mark.slow
def test_ceil_mode_maxpool_and_extract_cli(shipped_export, parity_images, tmp_path):
    out, ckpt, _, cfg, _ = shipped_export
    proto = onnx.load(str(out), load_external_data=False)
    pools = [n for n in proto.graph.node if n.op_type == "MaxPool"]
    assert pools and any(a.name == "ceil_mode" and a.i == 1 for a in pools[0].attribute)
    feats = tmp_path / "f.npy"
    result = run_cli("extract", out, *parity_images, "-o", feats, "--no-progress")
    assert result.code == 0, result
    meta = json.loads(feats.with_suffix(".json").read_text())
    assert meta["backend"] == "onnxruntime" and meta["precision"] == "fp32"
    assert np.load(feats).shape[0] == len(parity_images)


# --- the fast-reid export pitfalls, isolated ---------------------------------------------------

class FastReidNonLocal(nn.Module):
    """fast-reid's Non_local forward as written there: ``view(batch_size, ...)`` from ``x.size(0)``."""

    def __init__(self, c=16):
        super().__init__()
        self.g = nn.Conv2d(c, 1, 1)
        self.theta = nn.Conv2d(c, 1, 1)
        self.phi = nn.Conv2d(c, 1, 1)
        self.W = nn.Conv2d(1, c, 1)

    def forward(self, x):
        batch_size = x.size(0)
        g_x = self.g(x).view(batch_size, 1, -1).permute(0, 2, 1)
        theta_x = self.theta(x).view(batch_size, 1, -1).permute(0, 2, 1)
        phi_x = self.phi(x).view(batch_size, 1, -1)
        f = torch.matmul(theta_x, phi_x)
        y = torch.matmul(f / f.size(-1), g_x).permute(0, 2, 1).contiguous()
        return self.W(y.view(batch_size, 1, *x.size()[2:])) + x


class PitfallNet(nn.Module):
    """ceil_mode max-pool, IBN-style InstanceNorm (eval), fast-reid's non-local view(batch), GeM."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, 2, 1)
        self.pool = nn.MaxPool2d(3, 2, ceil_mode=True)  # fast-reid's stem pool: ceil mode, no padding
        self.inorm = nn.InstanceNorm2d(8, affine=True)
        self.nl = FastReidNonLocal(16)

    def forward(self, x):
        x = self.pool(F.relu(self.conv(x / 255.0)))
        a, b = torch.split(x, [8, 8], dim=1)
        x = self.nl(torch.cat([self.inorm(a), b], 1))
        return F.adaptive_avg_pool2d(x.clamp(min=1e-6).pow(3), 1).pow(1 / 3).flatten(1)


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_fastreid_pitfalls_export_with_dynamic_batch(exporter):
    torch.manual_seed(0)
    net = PitfallNet().eval()
    with torch.no_grad():
        net.inorm.weight.uniform_(0.5, 1.5)
    proto = export_module(net, (37, 21), batch=None, opset=18, exporter=exporter)  # odd sizes: ceil_mode matters
    from reid_export.export.ort import make_session

    session = make_session(proto.SerializeToString())
    for bs in (1, 3, 8):
        x = torch.rand(bs, 3, 37, 21) * 255
        with torch.no_grad():
            expected = net(x).numpy()
        got = session.run(None, {"images": x.numpy()})[0]
        assert got.shape == expected.shape and relative_l2(got, expected).max() < 1e-5, (exporter, bs)


# --- static batch, torchscript, our checkpoints, the self-check --------------------------------

@pytest.fixture(scope="module")
def r18_small(tmp_path_factory):
    folder = tmp_path_factory.mktemp("r18")
    return make_checkpoint(folder, "Market1501/bagtricks_R18.yml", ["INPUT.SIZE_TEST", "[128, 64]"], ours=True)


def test_static_batch_is_split_and_padded(r18_small, tmp_path, parity_images):
    ckpt, model, _ = r18_small
    out = tmp_path / "b2.onnx"
    result = run_cli("onnx", ckpt, "-o", out, "--batch", "2", "--exporter", "torchscript", "--opset", "17",
                     "--parity-images", parity_images[0].parent)
    assert result.code == 0, result
    assert "batch 2 and 3" in result.err and "5 given images" in result.err
    encoder = open_encoder(out, threads=1)
    assert encoder.max_batch == 2
    inputs = preprocess(parity_images, encoder.data_config)
    with torch.no_grad():
        reference = model(torch.from_numpy(inputs)).numpy()
    assert relative_l2(encoder(inputs), reference).max() < 1e-5  # 5 images: 2 + 2 + 1 (padded)
    assert relative_l2(encoder(inputs[:1]), reference[:1]).max() < 1e-5
    meta = json.loads(get_metadata(onnx.load(str(out)))["reid_export.export"])
    assert meta["batch"] == "2" and meta["exporter"] == "torchscript" and meta["opset"] == 17


@pytest.fixture(scope="module")
def r18_onnx(r18_small, tmp_path_factory):
    """Our checkpoint (config embedded) exported without --config and without simplification."""
    ckpt, _, _ = r18_small
    out = tmp_path_factory.mktemp("r18onnx") / "ours.onnx"
    result = run_cli("onnx", ckpt, "-o", out, "--no-simplify")
    assert result.code == 0, result
    return out, result


def test_our_checkpoint_exports_without_config(r18_onnx):
    out, result = r18_onnx
    assert "simplified" not in result.err.splitlines()[-1]
    assert open_encoder(out).data_config.input_size == (128, 64)


def test_failed_self_check_writes_nothing(r18_small, tmp_path):
    ckpt, _, _ = r18_small
    out = tmp_path / "never.onnx"
    report = export_checkpoint(ckpt, out, tolerance=0.0, simplify=False, exporter="torchscript", log=lambda line: None)
    assert not report.passed and not report.written and "disagrees with torch" in report.refusal
    assert list(tmp_path.iterdir()) == []
    doc = report.to_dict()
    assert doc["passed"] is False and doc["checks"][0]["passed"] is False and "FAIL" in report.table()


# --- bad inputs --------------------------------------------------------------------------------

def _bad_onnx(tmp_path, *args, needles=(), code=None):
    out = tmp_path / "out" / "m.onnx"
    out.parent.mkdir(exist_ok=True)
    result = run_cli("onnx", *args, "-o", out)
    assert_clean_error(result, *needles)
    if code is not None:
        assert result.code == code
    assert list(out.parent.iterdir()) == []


def test_bad_export_options(tmp_path, r18_small):
    ckpt, _, _ = r18_small
    _bad_onnx(tmp_path, tmp_path / "missing.pth", needles=["missing.pth", "not found"])
    _bad_onnx(tmp_path, ckpt, "--batch", "zero", needles=["--batch"], code=2)
    _bad_onnx(tmp_path, ckpt, "--opset", "9", needles=["--opset"], code=2)
    out = tmp_path / "m.onnx"
    result = run_cli("onnx", ckpt, "-o", out, "--opts", "MODEL.BACKBONE.DEPHT", "18x")
    assert_clean_error(result, "MODEL.BACKBONE.DEPTH")
    assert result.code == 2 and not out.exists()


def test_backend_errors(tmp_path, r18_onnx, parity_images):
    good, _ = r18_onnx
    not_onnx = tmp_path / "notes.onnx"
    not_onnx.write_text("this is not a model")
    result = run_cli("extract", not_onnx, *parity_images, "-o", tmp_path / "f.npy")
    assert_clean_error(result, "notes.onnx", "not an ONNX model")
    bare = onnx.load(str(good))
    del bare.metadata_props[:]
    plain = tmp_path / "plain.onnx"
    onnx.save(bare, str(plain))
    result = run_cli("extract", plain, *parity_images, "-o", tmp_path / "f.npy")
    assert_clean_error(result, "plain.onnx", "no reid-export data config", "add one with: reid-export annotate ",
                       "--input-size 128 64")
    result = run_cli("extract", good, *parity_images, "-o", tmp_path / "f.npy", "--device", "cuda")
    assert_clean_error(result, "--device cuda")
    result = run_cli("extract", good, *parity_images, "-o", tmp_path / "f.npy", "--config", CONFIGS / "Base-AGW.yml")
    assert_clean_error(result, "--config")
    assert not (tmp_path / "f.npy").exists()


def test_self_check_runs_from_pixels_through_the_written_data_config(r18_small, r18_onnx, tmp_path):
    """The export self-check is end to end: a normal export passes it; an export whose --opts change the
    graph's normalisation (so the data config written with it no longer describes what the graph
    computes) fails with one line and writes nothing; another input size is a legitimate export."""
    ckpt, _, _ = r18_small
    _, result = r18_onnx
    assert "parity pixels: ONNX through its written data config vs the checkpoint as trained" in result.err

    out = tmp_path / "zero_mean.onnx"
    broken = run_cli("onnx", ckpt, "-o", out, "--no-simplify", "--exporter", "torchscript",
                     "--opts", "MODEL.PIXEL_MEAN", "[0,0,0]", "MODEL.PIXEL_STD", "[1,1,1]")
    assert broken.code == 1 and "Traceback" not in broken.err
    last = broken.err.strip().splitlines()[-1]  # progress lines come before it
    for needle in ("zero_mean.onnx", "does not reproduce the checkpoint as trained", "MODEL.PIXEL_MEAN", "not written"):
        assert needle in last, last
    assert not out.exists() and list(tmp_path.iterdir()) == []

    out = tmp_path / "taller.onnx"
    resized = run_cli("onnx", ckpt, "-o", out, "--no-simplify", "--exporter", "torchscript",
                      "--opts", "INPUT.SIZE_TEST", "[160, 64]")
    assert resized.code == 0, resized
    assert "parity pixels" in resized.err
    assert open_encoder(out).data_config.input_size == (160, 64)
