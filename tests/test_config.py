import pytest
import yaml

from conftest import CONFIGS
from reid_export.config import get_cfg, load_config, load_config_text
from reid_export.errors import ReidExportError, UsageError

SHIPPED = sorted(CONFIGS.rglob("*.yml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_shipped_configs_load(path):
    """Every shipped config loads and names a network this project builds (ResNet depths ``NNx``,
    OSNet widths ``x1_0`` ... ``x0_25``, with an ``ain_`` prefix for OSNet-AIN)."""
    from reid_export.modeling.osnet import OSNET_WIDTHS
    from reid_export.modeling.resnet import ARCHS

    cfg = load_config(path)
    bb = cfg.MODEL.BACKBONE
    assert cfg.MODEL.META_ARCHITECTURE == "Baseline"
    if bb.NAME == "build_resnet_backbone":
        assert bb.DEPTH in ARCHS, bb.DEPTH
    else:
        assert bb.NAME == "build_osnet_backbone" and bb.DEPTH.removeprefix("ain_") in OSNET_WIDTHS, bb.DEPTH


def test_base_inheritance_and_override():
    cfg = load_config(CONFIGS / "Market1501" / "sbs_R50-ibn.yml")
    # from Base-bagtricks (grand-parent), overridden by Base-SBS (parent), then the leaf
    assert cfg.MODEL.HEADS.WITH_BNNECK is True
    assert cfg.MODEL.HEADS.POOL_LAYER == "GeneralizedMeanPoolingP"
    assert cfg.INPUT.SIZE_TEST == [384, 128]
    assert cfg.MODEL.BACKBONE.WITH_IBN is True and cfg.MODEL.BACKBONE.WITH_NL is True
    assert cfg.MODEL.LOSSES.NAME == ("CrossEntropyLoss", "TripletLoss")  # literal tuple string parsed
    assert cfg.DATASETS.NAMES == ("Market1501",)


def test_base_path_is_relative_to_the_file(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "base.yml").write_text("MODEL:\n  BACKBONE:\n    DEPTH: 18x\n")
    (tmp_path / "sub" / "leaf.yml").write_text("_BASE_: ../base.yml\nINPUT:\n  SIZE_TEST: [128, 64]\n")
    cfg = load_config(tmp_path / "sub" / "leaf.yml")
    assert cfg.MODEL.BACKBONE.DEPTH == "18x" and cfg.INPUT.SIZE_TEST == [128, 64]


def test_full_fastreid_dump_is_accepted(tmp_path):
    # fast-reid writes config.yaml with every key; ours adds three keys that fast-reid lacks.
    dump = get_cfg().to_dict()
    del dump["INPUT"]["INTERPOLATION"], dump["DATASETS"]["ROOT"], dump["SEED"]
    dump["MODEL"]["BACKBONE"]["WITH_IBN"] = True
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(dump))
    cfg = load_config(tmp_path / "config.yaml")
    assert cfg.MODEL.BACKBONE.WITH_IBN is True
    assert cfg.KD.EMA.MOMENTUM == 0.999


def test_dump_roundtrip():
    cfg = load_config(CONFIGS / "Market1501" / "AGW_R50.yml")
    again = load_config_text(cfg.dump())
    assert again == cfg


def test_typo_key_suggests_close_key(tmp_path):
    (tmp_path / "bad.yml").write_text("MODEL:\n  BACKBONE:\n    WITH_IBM: True\n")
    with pytest.raises(ReidExportError, match=r"unknown config key MODEL\.BACKBONE\.WITH_IBM.*did you mean MODEL\.BACKBONE\.WITH_IBN"):
        load_config(tmp_path / "bad.yml")


def test_wrong_value_type(tmp_path):
    (tmp_path / "bad.yml").write_text("SOLVER:\n  BASE_LR: fast\n")
    with pytest.raises(ReidExportError, match=r"SOLVER\.BASE_LR expects a float"):
        load_config(tmp_path / "bad.yml")


def test_opts_override_and_errors():
    cfg = load_config(CONFIGS / "Market1501" / "bagtricks_R50.yml",
                      ["MODEL.BACKBONE.DEPTH", "101x", "INPUT.SIZE_TEST", "[384,128]", "MODEL.BACKBONE.WITH_IBN", "True"])
    assert cfg.MODEL.BACKBONE.DEPTH == "101x" and cfg.INPUT.SIZE_TEST == [384, 128]
    assert cfg.MODEL.BACKBONE.WITH_IBN is True
    with pytest.raises(UsageError, match="odd count"):
        load_config(CONFIGS / "Base-bagtricks.yml", ["MODEL.BACKBONE.DEPTH"])
    with pytest.raises(UsageError, match="did you mean MODEL.BACKBONE.DEPTH"):
        load_config(CONFIGS / "Base-bagtricks.yml", ["MODEL.BACKBONE.DEPHT", "50x"])
    with pytest.raises(UsageError, match="SOLVER.IMS_PER_BATCH expects a int"):
        load_config(CONFIGS / "Base-bagtricks.yml", ["SOLVER.IMS_PER_BATCH", "many"])


def test_legacy_values_and_keys(tmp_path):
    (tmp_path / "old.yml").write_text(
        "MODEL:\n  BACKBONE:\n    DEPTH: 50\n  HEADS:\n    POOL_LAYER: gempool\n    REDUCTION_DIM: 512\n"
        "INPUT:\n  DO_FLIP: True\n")
    with pytest.warns(UserWarning, match="older fast-reid"):
        cfg = load_config(tmp_path / "old.yml")
    assert cfg.MODEL.BACKBONE.DEPTH == "50x"
    assert cfg.MODEL.HEADS.POOL_LAYER == "GeneralizedMeanPooling"


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ReidExportError, match="config file not found"):
        load_config(tmp_path / "nope.yml")
    (tmp_path / "broken.yml").write_text("MODEL: [unclosed\n")
    with pytest.raises(ReidExportError, match="not valid YAML"):
        load_config(tmp_path / "broken.yml")
    (tmp_path / "leaf.yml").write_text("_BASE_: missing-base.yml\n")
    with pytest.raises(ReidExportError, match="_BASE_ file .* not found"):
        load_config(tmp_path / "leaf.yml")
    (tmp_path / "loop.yml").write_text("_BASE_: loop.yml\n")
    with pytest.raises(ReidExportError, match="includes itself"):
        load_config(tmp_path / "loop.yml")


def test_sidecar_holds_our_keys_and_load_config_merges_it(tmp_path):
    """write_config: config.yaml with fast-reid's keys only, config.reid-export.yaml with ours; load_config
    of config.yaml gives the whole config back; the sidecar takes nothing but our keys."""
    from reid_export.config import OWN_KEYS, sidecar_path, write_config

    cfg = load_config(CONFIGS / "CUHK03" / "bagtricks_R18_cpu.yml",
                      ["INPUT.INTERPOLATION", "pil-bicubic", "DATASETS.ROOT", "/data", "SEED", "3"])
    path = write_config(tmp_path / "config.yaml", cfg)
    text = path.read_text()
    assert not any(key.split(".")[-1] + ":" in text for key in OWN_KEYS)
    assert sidecar_path(path).name == "config.reid-export.yaml"
    assert load_config(path) == cfg
    assert load_config(path, ["SEED", "4"]).SEED == 4  # --opts still come last
    without = tmp_path / "alone" / "config.yaml"
    without.parent.mkdir()
    without.write_text(text)
    assert load_config(without).SEED == -1  # the sidecar is what restores them
    side = sidecar_path(path)
    side.write_text(side.read_text() + "SOLVER:\n  BASE_LR: 0.1\n")
    with pytest.raises(ReidExportError, match="config.reid-export.yaml: holds SOLVER.BASE_LR"):
        load_config(path)
