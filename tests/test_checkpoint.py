import pickle

import pytest
import torch

from conftest import CONFIGS, randomize_bn
from reid_export.checkpoint import (extract_state_dict, load_model_from_checkpoint, load_weights,
                                    read_checkpoint, save_checkpoint)
from reid_export.config import load_config
from reid_export.data_config import data_config_from_cfg
from reid_export.errors import ReidExportError, ReidExportNote
from reid_export.modeling import build_model

R18 = CONFIGS / "Market1501" / "bagtricks_R18.yml"


def _r18(*opts):
    cfg = load_config(R18, list(opts))
    torch.manual_seed(0)
    return randomize_bn(build_model(cfg)), cfg


def _features(model, x):
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.slow
def test_fastreid_layout_roundtrip(tmp_path):
    model, cfg = _r18("MODEL.HEADS.NUM_CLASSES", "11")
    path = tmp_path / "model_final.pth"
    torch.save({"model": model.state_dict(), "optimizer": {}, "scheduler": {}, "epoch": 119}, path)
    loaded, _, dc = load_model_from_checkpoint(path, R18)
    x = torch.rand(3, 3, 256, 128) * 255
    assert torch.equal(_features(model, x), _features(loaded, x))
    assert dc.feat_dim == 512 and dc.input_size == (256, 128) and dc.normalized_inside


@pytest.mark.slow
def test_legacy_keys_module_prefix_and_stray_mean(tmp_path):
    model, _ = _r18()
    legacy = {}
    for key, value in model.state_dict().items():
        key = key.replace("heads.bottleneck.0.", "heads.bnneck.")
        key = key.replace("heads.weight", "heads.classifier.weight")
        legacy["module." + key] = value
    legacy["module.pixel_mean"] = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1)
    legacy["pixel_std"] = torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1)
    path = tmp_path / "legacy.pth"
    torch.save({"model": legacy, "iteration": 5}, path)
    loaded, _, _ = load_model_from_checkpoint(path, R18)
    x = torch.rand(2, 3, 256, 128) * 255
    assert torch.equal(_features(model, x), _features(loaded, x))


@pytest.mark.slow
def test_classifier_absent_or_other_size_is_fine(tmp_path):
    model, _ = _r18("MODEL.HEADS.NUM_CLASSES", "751")
    sd = model.state_dict()
    other, _ = _r18("MODEL.HEADS.NUM_CLASSES", "3")
    report = load_weights(other, sd)
    assert report["classifier_skipped"]
    del sd["heads.weight"]
    assert load_weights(other, sd)["classifier_skipped"]


@pytest.mark.parametrize("trained,loaded_as,hint", [
    ("Market1501/bagtricks_R50.yml", "Market1501/bagtricks_R50-ibn.yml", "MODEL.BACKBONE.WITH_IBN"),
    ("Market1501/AGW_R50.yml", "Market1501/bagtricks_R50.yml", "MODEL.BACKBONE.WITH_NL"),
    ("Market1501/bagtricks_R18.yml", "Market1501/bagtricks_R50.yml", "MODEL.BACKBONE.DEPTH"),
])
def test_checkpoint_of_another_config_lists_keys_and_option(tmp_path, trained, loaded_as, hint):
    cfg = load_config(CONFIGS / trained)
    path = tmp_path / "other.pth"
    torch.save({"model": build_model(cfg).state_dict(), "epoch": 1}, path)
    with pytest.raises(ReidExportError) as info:
        load_model_from_checkpoint(path, CONFIGS / loaded_as)
    message = str(info.value)
    assert "does not match the config" in message and hint in message
    assert "backbone." in message  # the keys themselves are listed
    assert "\n" not in message


def test_allow_partial_loads_what_matches(tmp_path):
    cfg = load_config(CONFIGS / "Market1501/bagtricks_R50.yml")
    path = tmp_path / "r50.pth"
    torch.manual_seed(0)
    source = build_model(cfg)
    torch.save({"model": source.state_dict()}, path)
    model, _, _ = load_model_from_checkpoint(path, CONFIGS / "Market1501/bagtricks_R50-ibn.yml", allow_partial=True)
    loaded, given = model.state_dict(), source.state_dict()
    # every tensor present in both with the same shape was taken from the file...
    shared = [k for k in loaded if k in given and loaded[k].shape == given[k].shape and k != "heads.weight"]
    assert len(shared) > 200
    assert all(torch.equal(loaded[k], given[k]) for k in shared)
    # ...and the IBN parts the R50 file lacks keep the IBN model's own initialisation
    ibn_only = [k for k in loaded if ".IN." in k or ".BN." in k]
    assert ibn_only and not any(k in given for k in ibn_only)


@pytest.mark.slow
def test_our_checkpoint_embeds_config(tmp_path):
    model, cfg = _r18()
    path = tmp_path / "ours.pth"
    save_checkpoint(path, model, cfg, data_config_from_cfg(cfg, model.feat_dim, "r18"), epoch=3)
    obj = read_checkpoint(path)
    assert {"model", "cfg", "data_config", "epoch"} <= set(obj)
    loaded, cfg2, dc = load_model_from_checkpoint(path)  # no --config needed
    # the same config, with the stem the model was built with recorded (the key was left unset)
    assert cfg.MODEL.BACKBONE.STEM_POOL_PADDING is None and cfg2.MODEL.BACKBONE.STEM_POOL_PADDING == 0
    cfg.MODEL.BACKBONE.STEM_POOL_PADDING = 0
    cfg.INPUT.INTERPOLATION = "cubic"  # and the resize of its data config
    assert cfg2 == cfg and dc.model_name == "r18"
    x = torch.rand(1, 3, 256, 128) * 255
    assert torch.equal(_features(model, x), _features(loaded, x))


@pytest.mark.slow
@pytest.mark.parametrize("opts", [[], ["INPUT.SIZE_TEST", "[128, 64]"]])
def test_our_keys_travel_beside_the_config_and_older_checkpoints_load_as_before(tmp_path, opts):
    """New checkpoints keep our keys out of ``cfg`` (fast-reid's merge_from_file refuses them) and in
    ``reid_export_cfg``; a checkpoint of the earlier layout (our keys inside ``cfg``) gives the same
    model, config and preprocessing, with or without --opts (the data config then comes from the config)."""
    from reid_export.config import OWN_KEYS

    model, cfg = _r18("INPUT.INTERPOLATION", "pil-lanczos", "SEED", "5", "DATASETS.ROOT", "/data")
    new = tmp_path / "new.pth"
    save_checkpoint(new, model, cfg, data_config_from_cfg(cfg, model.feat_dim, "r18"), epoch=3)
    obj = read_checkpoint(new)
    assert not any(key.split(".")[-1] + ":" in obj["cfg"] for key in OWN_KEYS)
    assert obj["reid_export_cfg"] == {"INPUT": {"INTERPOLATION": "pil-lanczos"}, "SEED": 5,
                                      "DATASETS": {"ROOT": "/data"}, "MODEL": {"BACKBONE": {"STEM_POOL_PADDING": 0}}}
    old = tmp_path / "old.pth"
    full = cfg.clone()
    full.MODEL.BACKBONE.STEM_POOL_PADDING = 0
    legacy = {k: v for k, v in obj.items() if k != "reid_export_cfg"}
    torch.save(dict(legacy, cfg=full.dump(), reid_export_version="0.2.0"), old)
    x = torch.rand(2, 3, 256, 128) * 255
    results = [load_model_from_checkpoint(p, opts=opts) for p in (new, old)]
    for loaded, cfg2, dc in results:
        assert cfg2.INPUT.INTERPOLATION == dc.interpolation == "pil-lanczos"
        assert cfg2.SEED == 5 and cfg2.DATASETS.ROOT == "/data" and cfg2.MODEL.BACKBONE.STEM_POOL_PADDING == 0
        assert torch.equal(_features(model, x), _features(loaded, x))
    assert results[0][1] == results[1][1]
    assert dict(results[0][2].to_dict(), model_name="") == dict(results[1][2].to_dict(), model_name="")
    # and without reid_export_cfg the new file's keys are lost: the check above can fail
    torch.save(legacy, tmp_path / "stripped.pth")
    with pytest.warns(ReidExportNote):  # and it looks like a file from before the stem was recorded
        stripped = load_model_from_checkpoint(tmp_path / "stripped.pth", opts=opts)[1]
    assert stripped.SEED != 5 and stripped.DATASETS.ROOT != "/data"


@pytest.mark.slow
def test_interpolation_left_unset_follows_the_checkpoint(tmp_path):
    """INPUT.INTERPOLATION unset: a fast-reid file gets fast-reid's evaluation resize (Pillow bicubic), a new
    reid-train model OpenCV cubic (recorded in its checkpoint), and an explicit value wins over both."""
    from reid_export.checkpoint import resolve_interpolation
    from reid_export.config import get_cfg

    model, cfg = _r18()
    assert cfg.INPUT.INTERPOLATION is None
    fastreid_file = tmp_path / "model_final.pth"
    torch.save({"model": model.state_dict(), "iteration": 9}, fastreid_file)
    assert load_model_from_checkpoint(fastreid_file, R18)[2].interpolation == "pil-bicubic"
    assert load_model_from_checkpoint(fastreid_file, R18, ["INPUT.INTERPOLATION", "cubic"])[2].interpolation == "cubic"
    assert resolve_interpolation(get_cfg(), {}, "new run") == "cubic"  # what reid-train does for a new run
    ours = tmp_path / "ours.pth"
    resolve_interpolation(cfg, {}, "new run")
    save_checkpoint(ours, model, cfg, data_config_from_cfg(cfg, model.feat_dim, "r18"))
    assert read_checkpoint(ours)["reid_export_cfg"]["INPUT"]["INTERPOLATION"] == "cubic"
    assert load_model_from_checkpoint(ours)[2].interpolation == "cubic"
    assert load_model_from_checkpoint(ours, R18)[2].interpolation == "cubic"  # the config leaves it to the file
    explicit = load_model_from_checkpoint(ours, opts=["INPUT.INTERPOLATION", "pil-bicubic"])[2]
    assert explicit.interpolation == "pil-bicubic"


@pytest.mark.slow
def test_checkpoint_without_config_asks_for_one(tmp_path):
    model, _ = _r18()
    path = tmp_path / "bare.pth"
    torch.save({"model": model.state_dict()}, path)
    with pytest.raises(ReidExportError, match="pass `config`"):
        load_model_from_checkpoint(path)


class _Exploit:
    def __reduce__(self):
        import os
        return (os.system, ("touch PWNED_BY_PICKLE",))


def test_pickle_with_code_is_refused_and_not_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pth"
    torch.save({"model": {"x": torch.zeros(1)}, "payload": _Exploit()}, path)
    with pytest.raises(ReidExportError, match="refused to load"):
        read_checkpoint(path)
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps(_Exploit()))
    with pytest.raises(ReidExportError):
        read_checkpoint(raw)
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()


@pytest.mark.slow
def test_bad_files(tmp_path):
    with pytest.raises(ReidExportError, match="not found"):
        read_checkpoint(tmp_path / "missing.pth")
    with pytest.raises(ReidExportError, match="is a directory"):
        read_checkpoint(tmp_path)
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(ReidExportError, match="empty"):
        read_checkpoint(tmp_path / "empty.pth")
    model, _ = _r18()
    good = tmp_path / "good.pth"
    torch.save({"model": model.state_dict()}, good)
    data = good.read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(ReidExportError, match="corrupt or truncated"):
        read_checkpoint(tmp_path / "truncated.pth")
    (tmp_path / "text.pth").write_text("hello")
    with pytest.raises(ReidExportError, match="corrupt or truncated"):
        read_checkpoint(tmp_path / "text.pth")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(ReidExportError, match="expected a dict"):
        read_checkpoint(tmp_path / "list.pth")
    with pytest.raises(ReidExportError, match="holds no weights"):
        extract_state_dict({"epoch": 3})
