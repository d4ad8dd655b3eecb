import pytest
import torch

import fastreid_reference as ref
from conftest import CONFIGS, randomize_bn
from reid_export.config import load_config
from reid_export.modeling import build_model


def _model(cfg_name, *opts):
    cfg = load_config(CONFIGS / cfg_name, list(opts))
    torch.manual_seed(0)
    return randomize_bn(build_model(cfg), size=tuple(cfg.INPUT.SIZE_TEST)).eval(), cfg


@pytest.mark.slow
def test_bot_r50_keys_are_fastreids():
    model, _ = _model("Market1501/bagtricks_R50.yml")
    keys = set(model.state_dict())
    for key in ["backbone.conv1.weight", "backbone.bn1.running_var", "backbone.layer1.0.conv3.weight",
                "backbone.layer1.0.downsample.0.weight", "backbone.layer1.0.downsample.1.running_mean",
                "backbone.layer3.5.bn2.weight", "backbone.layer4.2.bn3.num_batches_tracked",
                "heads.bottleneck.0.weight", "heads.bottleneck.0.bias", "heads.weight"]:
        assert key in keys, key
    assert not any(k.startswith("backbone.layer3.6.") for k in keys)
    assert not any("pixel_mean" in k for k in keys)  # non-persistent, as in fast-reid
    mp = model.backbone.maxpool
    assert (mp.kernel_size, mp.stride, mp.padding, mp.ceil_mode) == (3, 2, 0, True)  # fast-reid's stem pool
    assert model.backbone.layer4[0].conv2.stride == (1, 1)  # LAST_STRIDE 1
    assert model.heads.bottleneck[0].bias.requires_grad is False  # BNNeck bias frozen


@pytest.mark.slow
@pytest.mark.parametrize("padding,expected", [(0, (64, 32)), (1, (65, 33))])
def test_stem_pool_map_size(padding, expected):
    """fast-reid's unpadded ceil-mode pool gives 64x32 at 256x128; the pre-0.2.0 padded one 65x33."""
    model, _ = _model("Market1501/bagtricks_R18.yml", "MODEL.BACKBONE.STEM_POOL_PADDING", str(padding))
    bb = model.backbone
    with torch.no_grad():
        x = bb.maxpool(bb.relu(bb.bn1(bb.conv1(torch.rand(1, 3, 256, 128)))))
    assert tuple(x.shape[2:]) == expected


def test_stem_pool_padding_refuses_other_values():
    from reid_export.errors import ReidExportError

    with pytest.raises(ReidExportError, match="STEM_POOL_PADDING 2"):
        _model("Market1501/bagtricks_R18.yml", "MODEL.BACKBONE.STEM_POOL_PADDING", "2")


@pytest.mark.slow
def test_ibn_in_stages_1_to_3_only():
    model, _ = _model("Market1501/bagtricks_R50-ibn.yml")
    keys = set(model.state_dict())
    assert "backbone.layer1.0.bn1.IN.weight" in keys and "backbone.layer3.5.bn1.BN.running_mean" in keys
    assert "backbone.layer1.0.bn1.IN.running_mean" not in keys  # InstanceNorm without running stats
    assert not any(k.startswith("backbone.layer4.") and ".IN." in k for k in keys)
    assert model.backbone.layer1[0].bn1.IN.weight.shape == (32,)


@pytest.mark.slow
def test_nonlocal_positions_50x_and_101x():
    model, _ = _model("Market1501/AGW_R50.yml")
    keys = set(model.state_dict())
    assert {"backbone.NL_2.1.W.1.weight", "backbone.NL_3.2.phi.bias"} <= keys
    assert not any(k.startswith(("backbone.NL_1.", "backbone.NL_4.", "backbone.NL_2.2.")) for k in keys)
    assert model.backbone.nl_positions == {1: [], 2: [2, 3], 3: [3, 4, 5], 4: []}
    assert model.backbone.NL_2[0].g.weight.shape == (1, 512, 1, 1)  # fast-reid's inter_channels = 1
    cfg = load_config(CONFIGS / "Market1501/AGW_R50.yml", ["MODEL.BACKBONE.DEPTH", "101x"])
    big = build_model(cfg)
    assert big.backbone.nl_positions[3] == list(range(14, 23)) and len(big.backbone.NL_3) == 9


@pytest.mark.slow
def test_normalization_is_not_in_place():
    model, _ = _model("Market1501/bagtricks_R18.yml")
    x = torch.rand(2, 3, 256, 128) * 255
    before = x.clone()
    model(x)
    assert torch.equal(x, before)


@pytest.mark.parametrize("cfg_name,size,feat", [
    ("Market1501/bagtricks_R18.yml", (256, 128), 512),
    ("Market1501/bagtricks_R50.yml", (256, 128), 2048),
    ("Market1501/bagtricks_R50-ibn.yml", (256, 128), 2048),
    ("Market1501/AGW_R50.yml", (256, 128), 2048),
    ("Market1501/sbs_R50-ibn.yml", (384, 128), 2048),
    ("Market1501/bagtricks_R101-ibn.yml", (256, 128), 2048),
])
@pytest.mark.slow
def test_matches_independent_fastreid_transcription(cfg_name, size, feat):
    model, cfg = _model(cfg_name)
    if cfg.MODEL.HEADS.POOL_LAYER == "GeneralizedMeanPoolingP":
        with torch.no_grad():
            model.heads.pool_layer.p.fill_(3.7)
    assert tuple(cfg.INPUT.SIZE_TEST) == size
    # float64 on both sides: any difference left is a difference in the computation, not rounding.
    model = model.double()
    x = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 255
    with torch.no_grad():
        ours = model(x)
        sd = model.state_dict()
        theirs = ref.forward_gem3(sd, x) if cfg.MODEL.HEADS.POOL_LAYER == "GeneralizedMeanPooling" else ref.forward(sd, x)
    assert ours.shape == (2, feat)
    rel = (ours - theirs).norm() / theirs.norm()
    assert rel < 1e-10, rel


@pytest.mark.slow
def test_embedding_dim_and_no_bnneck():
    model, _ = _model("Market1501/bagtricks_R18.yml", "MODEL.HEADS.EMBEDDING_DIM", "256")
    assert model.heads.bottleneck[0].weight.shape == (256, 512, 1, 1)
    assert model(torch.rand(1, 3, 256, 128) * 255).shape == (1, 256)
    model, _ = _model("Market1501/bagtricks_R18.yml", "MODEL.HEADS.WITH_BNNECK", "False")
    assert len(model.heads.bottleneck) == 0


@pytest.mark.slow
def test_training_outputs_and_margin_classifiers():
    for cls in ("Linear", "CircleSoftmax", "ArcSoftmax", "CosSoftmax"):
        model, _ = _model("Market1501/bagtricks_R18.yml", "MODEL.HEADS.NUM_CLASSES", "7",
                          "MODEL.HEADS.CLS_LAYER", cls, "MODEL.HEADS.SCALE", "16", "MODEL.HEADS.MARGIN", "0.3")
        model.train()
        out = model(torch.rand(4, 3, 128, 64) * 255, torch.tensor([0, 1, 2, 6]))
        assert out["logits"].shape == (4, 7) and out["features"].shape == (4, 512)
        assert torch.isfinite(out["logits"]).all()
