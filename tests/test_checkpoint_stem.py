"""Checkpoints that reid-train wrote before 0.2.0 were trained with a padded stem max-pool.

fast-reid's ResNet stem pool has no padding, and a fast-reid file gets that stem. A reid-train
checkpoint records its stem in its embedded config (``MODEL.BACKBONE.STEM_POOL_PADDING``); one
whose config has no such key predates the fix, was trained with padding 1, and is loaded as it was
trained (its features never change silently) with one note saying so.
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch

from conftest import CONFIGS, randomize_bn, run_cli, write_image
from reid_export.checkpoint import embedded_config, load_model_from_checkpoint, resolve_stem, save_checkpoint
from reid_export.config import get_cfg, load_config
from reid_export.data_config import data_config_from_cfg
from reid_export.errors import ReidExportNote
from reid_export.modeling import build_model
from reid_export.preprocess import preprocess, read_images

R18 = CONFIGS / "Market1501" / "bagtricks_R18.yml"
SIZE = ["INPUT.SIZE_TEST", "[128, 64]"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model(padding: int):
    cfg = load_config(R18, [*SIZE, "MODEL.BACKBONE.STEM_POOL_PADDING", str(padding)])
    torch.manual_seed(0)
    model = randomize_bn(build_model(cfg), size=(128, 64))
    assert model.backbone.maxpool.padding == padding
    return model, cfg


def _old_checkpoint(tmp_path):
    """What reid-train 0.1.0 wrote: its embedded config has no STEM_POOL_PADDING key."""
    model, cfg = _model(1)
    text = cfg.dump()
    old_text = re.sub(r"^\s*STEM_POOL_PADDING: .*\n", "", text, flags=re.M)
    assert old_text != text and "STEM_POOL_PADDING" not in old_text
    path = tmp_path / "model_best.pth"
    torch.save({"model": model.state_dict(), "cfg": old_text, "epoch": 3, "reid_export_version": "0.1.0",
                "data_config": data_config_from_cfg(cfg, feat_dim=model.feat_dim).to_dict()}, path)
    return model, path


@pytest.fixture
def images(tmp_path):
    return [write_image(tmp_path / "img" / f"{i:04d}_c1s1_000000_00.jpg", seed=i) for i in range(3)]


def _features(model, images, cfg=None, data_config=None):
    arrays, _, _ = read_images(images)
    dc = data_config or data_config_from_cfg(cfg, feat_dim=model.feat_dim)
    with torch.no_grad():
        return model.eval()(torch.from_numpy(preprocess(arrays, dc))).numpy()


@pytest.mark.slow
def test_old_reid_train_checkpoint_loads_as_trained_with_a_note(tmp_path, images):
    original, path = _old_checkpoint(tmp_path)
    with pytest.warns(ReidExportNote, match=r"reid-train 0\.1\.0.*padding=1.*features unchanged"):
        loaded, cfg, dc = load_model_from_checkpoint(path)
    assert loaded.backbone.maxpool.padding == 1 and cfg.MODEL.BACKBONE.STEM_POOL_PADDING == 1
    assert np.array_equal(_features(loaded, images, data_config=dc), _features(original, images, data_config=dc))
    # A --config given beside it does not change the stem the weights were trained with...
    with pytest.warns(ReidExportNote):
        with_cfg, _, _ = load_model_from_checkpoint(path, R18, SIZE)
    assert with_cfg.backbone.maxpool.padding == 1
    # ...an explicit value does (the user asked for it), and then the features differ.
    with warnings.catch_warnings():
        warnings.simplefilter("error", ReidExportNote)
        forced, _, _ = load_model_from_checkpoint(path, R18, [*SIZE, "MODEL.BACKBONE.STEM_POOL_PADDING", "0"])
    assert forced.backbone.maxpool.padding == 0
    assert not np.allclose(_features(forced, images, data_config=dc), _features(original, images, data_config=dc))


def test_old_checkpoint_through_extract_prints_one_note(tmp_path, images):
    original, path = _old_checkpoint(tmp_path)
    out = tmp_path / "f.npy"
    result = run_cli("extract", path, *images, "-o", out, "--no-progress")
    assert result.code == 0, result
    notes = [line for line in result.err.splitlines() if "note:" in line]
    assert len(notes) == 1 and "padding=1" in notes[0] and str(path) in notes[0], result.err
    expected = _features(original, images, cfg=load_config(R18, SIZE))
    np.testing.assert_allclose(np.load(out), expected, rtol=1e-5, atol=1e-5)


def test_new_checkpoints_record_fastreids_stem(tmp_path, images):
    cfg = load_config(R18, SIZE)
    assert cfg.MODEL.BACKBONE.STEM_POOL_PADDING is None  # not set: decided by the checkpoint
    assert resolve_stem(cfg, {}, "new run") == 0  # what reid-train does before building a new model
    torch.manual_seed(0)
    model = randomize_bn(build_model(cfg), size=(128, 64))
    path = save_checkpoint(tmp_path / "new.pth", model, cfg, data_config_from_cfg(cfg, feat_dim=model.feat_dim))
    stored = torch.load(path, weights_only=True)
    assert "STEM_POOL_PADDING" not in stored["cfg"]  # fast-reid's merge_from_file would reject the key
    assert stored["reid_export_cfg"]["MODEL"]["BACKBONE"]["STEM_POOL_PADDING"] == 0
    assert embedded_config(stored).MODEL.BACKBONE.STEM_POOL_PADDING == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", ReidExportNote)  # no note for a current checkpoint
        loaded, _, dc = load_model_from_checkpoint(path)
    assert loaded.backbone.maxpool.padding == 0
    assert np.array_equal(_features(loaded, images, data_config=dc), _features(model, images, data_config=dc))


@pytest.mark.slow
def test_checkpoint_saved_from_an_unresolved_config_records_the_models_stem(tmp_path):
    """save_checkpoint writes the stem the model has, even when the config left the key unset."""
    cfg = load_config(R18, SIZE)
    assert cfg.MODEL.BACKBONE.STEM_POOL_PADDING is None
    model = build_model(cfg)
    path = save_checkpoint(tmp_path / "m.pth", model, cfg, data_config_from_cfg(cfg, feat_dim=model.feat_dim))
    assert embedded_config(torch.load(path, weights_only=True)).MODEL.BACKBONE.STEM_POOL_PADDING == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", ReidExportNote)
        loaded, _, _ = load_model_from_checkpoint(path)
    assert loaded.backbone.maxpool.padding == 0
    padded, _ = _model(1)  # and a padded model keeps its padding through a save
    path = save_checkpoint(tmp_path / "p.pth", padded, cfg, data_config_from_cfg(cfg, feat_dim=padded.feat_dim))
    assert load_model_from_checkpoint(path)[0].backbone.maxpool.padding == 1


def test_fastreid_file_gets_fastreids_stem(tmp_path):
    model, _ = _model(0)
    path = tmp_path / "model_final.pth"
    torch.save({"model": model.state_dict(), "iteration": 10}, path)  # fast-reid's layout: no cfg
    with warnings.catch_warnings():
        warnings.simplefilter("error", ReidExportNote)
        loaded, cfg, _ = load_model_from_checkpoint(path, R18, SIZE)
    assert loaded.backbone.maxpool.padding == 0 and cfg.MODEL.BACKBONE.STEM_POOL_PADDING == 0


def test_resume_of_an_old_run_keeps_its_stem(tmp_path):
    """reid-train --resume and --eval-only resolve the stem from the checkpoint in the same way."""
    _, path = _old_checkpoint(tmp_path)
    state = torch.load(path, weights_only=True)
    cfg = get_cfg()
    with pytest.warns(ReidExportNote):
        assert resolve_stem(cfg, state, str(path)) == 1
    current = dict(state, cfg=load_config(R18, ["MODEL.BACKBONE.STEM_POOL_PADDING", "0"]).dump(),
                   reid_export_version="0.2.0")
    assert resolve_stem(get_cfg(), current, "current") == 0
