"""reid-export extract end to end, on generated images and the real parity crops."""

import json

import cv2
import numpy as np
import pytest
import torch

import fastreid_reference as ref
from conftest import CONFIGS, assert_clean_error, randomize_bn, run_cli, write_image
from reid_export.checkpoint import save_checkpoint
from reid_export.config import load_config
from reid_export.data_config import data_config_from_cfg
from reid_export.modeling import build_model

pytestmark = pytest.mark.slow  # a development run skips it: pytest -m "not slow"


def _fastreid_checkpoint(tmp_path, cfg_name, name="model_final.pth"):
    cfg = load_config(CONFIGS / cfg_name)
    torch.manual_seed(0)
    model = randomize_bn(build_model(cfg), size=tuple(cfg.INPUT.SIZE_TEST))
    path = tmp_path / name
    torch.save({"model": model.state_dict(), "optimizer": {}, "scheduler": {}, "epoch": 119}, path)
    return path, model, cfg


@pytest.fixture(scope="module")
def bot_r50(tmp_path_factory):
    return _fastreid_checkpoint(tmp_path_factory.mktemp("bot"), "Market1501/bagtricks_R50.yml")


def test_extract_equals_fastreid_computation(bot_r50, parity_images, tmp_path):
    """The extract CLI output for a fast-reid BoT-R50 checkpoint = fast-reid's demo path, transcribed."""
    ckpt, model, cfg = bot_r50
    out = tmp_path / "feats.npy"
    result = run_cli("extract", ckpt, *parity_images, "-o", out, "--config",  # the demo path's resize
                     CONFIGS / "Market1501/bagtricks_R50.yml", "--no-progress", "--opts", "INPUT.INTERPOLATION", "cubic")
    assert result.code == 0, result
    feats = np.load(out)
    with torch.no_grad():
        expected = torch.cat([ref.forward(model.state_dict(), ref.demo_preprocess(p, cfg.INPUT.SIZE_TEST))
                              for p in parity_images]).numpy()
    assert feats.shape == (5, 2048) and feats.dtype == np.float32
    rel = np.linalg.norm(feats - expected, axis=1) / np.linalg.norm(expected, axis=1)
    assert rel.max() < 1e-5, rel
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["files"] == [str(p) for p in parity_images]
    assert meta["data_config"]["height"] == 256 and meta["backend"] == "torch"


@pytest.fixture(scope="module")
def bot_r18(tmp_path_factory):
    return _fastreid_checkpoint(tmp_path_factory.mktemp("bot18"), "Market1501/bagtricks_R18.yml")


@pytest.mark.parametrize("flip", [False, True])
def test_batch_size_does_not_change_features(bot_r18, parity_images, tmp_path, flip):
    ckpt, model, _ = bot_r18
    cfg_path = CONFIGS / "Market1501/bagtricks_R18.yml"
    outs = []
    for bs in (1, 5):
        out = tmp_path / f"f{bs}.npy"
        args = ["extract", ckpt, parity_images[0].parent, "-o", out, "--config", cfg_path,
                "--batch-size", bs, "--no-progress"] + (["--flip-test"] if flip else []) + [
                "--opts", "INPUT.INTERPOLATION", "cubic"]  # the demo path's resize, as ref.demo_preprocess
        assert run_cli(*args).code == 0
        outs.append(np.load(out))
    diff = np.abs(outs[0] - outs[1]).max() / np.abs(outs[0]).max()
    assert diff < 1e-5, diff
    if flip:
        plain = tmp_path / "plain.npy"
        assert run_cli("extract", ckpt, parity_images[0].parent, "-o", plain, "--config", cfg_path,
                       "--no-progress", "--opts", "INPUT.INTERPOLATION", "cubic").code == 0
        assert np.abs(np.load(plain) - outs[0]).max() > 1e-3  # the flip actually did something
        # and it is fast-reid's definition: mean of raw features of image and mirror
        x = ref.demo_preprocess(parity_images[0], (256, 128))
        with torch.no_grad():
            manual = (model(x) + model(x.flip(dims=[3]))) / 2
        assert np.allclose(outs[1][0], manual[0].numpy(), rtol=1e-4, atol=1e-4)


def test_extract_normalize_and_order(tmp_path, image_dir):
    ckpt, _, _ = _fastreid_checkpoint(tmp_path, "Market1501/bagtricks_R18.yml")
    files = sorted(image_dir.iterdir())
    out = tmp_path / "n.npy"
    cfg = CONFIGS / "Market1501/bagtricks_R18.yml"
    assert run_cli("extract", ckpt, files[2], files[0], "-o", out, "--config", cfg, "--normalize",
                   "--no-progress").code == 0
    feats = np.load(out)
    assert np.allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)
    single = tmp_path / "s.npy"
    assert run_cli("extract", ckpt, files[0], "-o", single, "--config", cfg, "--normalize", "--no-progress").code == 0
    assert np.allclose(feats[1], np.load(single)[0], atol=1e-5)  # rows follow the order given


def test_extract_our_checkpoint_needs_no_config(tmp_path, image_dir):
    cfg = load_config(CONFIGS / "Market1501/bagtricks_R18.yml", ["INPUT.SIZE_TEST", "[128, 64]"])
    model = randomize_bn(build_model(cfg), size=(128, 64))
    path = tmp_path / "ours.pth"
    save_checkpoint(path, model, cfg, data_config_from_cfg(cfg, model.feat_dim, "r18"))
    out = tmp_path / "f.npy"
    result = run_cli("extract", path, image_dir, "-o", out, "--no-progress")
    assert result.code == 0, result
    assert np.load(out).shape == (4, 512)
    assert json.loads(out.with_suffix(".json").read_text())["data_config"]["height"] == 128


def test_extract_with_opts(tmp_path, image_dir):
    ckpt, _, _ = _fastreid_checkpoint(tmp_path, "Market1501/bagtricks_R18.yml")
    out = tmp_path / "f.npy"
    result = run_cli("extract", ckpt, image_dir, "-o", out, "--config", CONFIGS / "Market1501/bagtricks_R18.yml",
                     "--no-progress", "--opts", "INPUT.SIZE_TEST", "[128,64]")
    assert result.code == 0, result
    assert json.loads(out.with_suffix(".json").read_text())["data_config"]["width"] == 64


# --- bad inputs: one clear line, non-zero exit, no traceback, no output file -----------------

@pytest.fixture
def r18_ckpt(tmp_path):
    return _fastreid_checkpoint(tmp_path, "Market1501/bagtricks_R18.yml")[0]


R18_CFG = CONFIGS / "Market1501/bagtricks_R18.yml"


def _bad(tmp_path, model, *inputs, extra=(), needles=()):
    out = tmp_path / "out" / "f.npy"
    out.parent.mkdir(exist_ok=True)
    result = run_cli("extract", model, *inputs, "-o", out, "--no-progress", *extra)
    assert_clean_error(result, *needles)
    assert not out.exists() and not out.with_suffix(".json").exists()
    assert list(out.parent.iterdir()) == []  # no temp files left either


def test_missing_model(tmp_path, image_dir):
    _bad(tmp_path, tmp_path / "nope.pth", image_dir, extra=["--config", R18_CFG], needles=["nope.pth", "not found"])


def test_corrupt_checkpoint(tmp_path, image_dir):
    bad = tmp_path / "corrupt.pth"
    bad.write_bytes(b"\x80\x02garbage" * 10)
    _bad(tmp_path, bad, image_dir, extra=["--config", R18_CFG], needles=["corrupt.pth", "corrupt or truncated"])


def test_non_image_in_list(tmp_path, r18_ckpt, image_dir):
    notes = tmp_path / "notes.jpg"
    notes.write_text("not an image")
    _bad(tmp_path, r18_ckpt, *sorted(image_dir.iterdir()), notes, extra=["--config", R18_CFG],
         needles=["notes.jpg", "not a decodable image"])


def test_empty_directory(tmp_path, r18_ckpt):
    empty = tmp_path / "empty"
    empty.mkdir()
    _bad(tmp_path, r18_ckpt, empty, extra=["--config", R18_CFG], needles=["empty", "holds no images"])


def test_wrong_config(tmp_path, r18_ckpt, image_dir):
    _bad(tmp_path, r18_ckpt, image_dir, extra=["--config", CONFIGS / "Market1501/bagtricks_R50.yml"],
         needles=["does not match the config", "MODEL.BACKBONE.DEPTH"])


def test_bad_batch_size_is_usage_error(tmp_path, r18_ckpt, image_dir):
    out = tmp_path / "f.npy"
    result = run_cli("extract", r18_ckpt, image_dir, "-o", out, "--config", R18_CFG, "--batch-size", "0")
    assert_clean_error(result, "--batch-size")
    assert result.code == 2 and not out.exists()


def test_output_in_missing_folder(tmp_path, r18_ckpt, image_dir):
    result = run_cli("extract", r18_ckpt, image_dir, "-o", tmp_path / "no" / "f.npy", "--config", R18_CFG)
    assert_clean_error(result, "does not exist")


def test_existing_output_left_unchanged_on_failure(tmp_path, image_dir):
    out = tmp_path / "f.npy"
    np.save(out, np.zeros(3))
    before = out.read_bytes()
    result = run_cli("extract", tmp_path / "missing.pth", image_dir, "-o", out, "--config", R18_CFG)
    assert_clean_error(result, "missing.pth")
    assert out.read_bytes() == before


def test_grayscale_and_rgba_images_are_converted(tmp_path, r18_ckpt):
    folder = tmp_path / "mixed"
    color = write_image(folder / "a_color.png", seed=3)
    img = cv2.imread(str(color))
    cv2.imwrite(str(folder / "b_gray.png"), cv2.cvtColor(img, cv2.COLOR_BGR2GRAY))
    cv2.imwrite(str(folder / "c_rgba.png"), cv2.cvtColor(img, cv2.COLOR_BGR2BGRA))
    out = tmp_path / "f.npy"
    assert run_cli("extract", r18_ckpt, folder, "-o", out, "--config", R18_CFG, "--no-progress").code == 0
    feats = np.load(out)
    assert np.allclose(feats[0], feats[2], atol=1e-5)  # alpha dropped, same pixels
    assert np.isfinite(feats).all() and not np.allclose(feats[0], feats[1])
