"""reid-train building blocks: each loss against hand-computed values, the lr schedule, the PK
sampler, augmentation, ImageNet weight mapping, dataset lookup."""

import math

import numpy as np
import pytest
import torch

from conftest import CONFIGS
from reid_export.config import load_config
from reid_export.errors import ReidExportError
from reid_export.modeling import build_model
from reid_train import losses
from reid_train.datasets import resolve_dataset
from reid_train.pretrain import load_pretrained_backbone
from reid_train.sampler import PKBatchSampler
from reid_train.solver import LRSchedule, build_optimizer
from reid_train.transforms import TrainTransform, random_erasing

# ---------------------------------------------------------------- cross entropy


def test_cross_entropy_label_smoothing_by_hand():
    # logits [0, ln 2, ln 5] -> softmax [1/8, 2/8, 5/8]; target class 1; eps 0.1, K = 3:
    # fast-reid's soft target is [0.05, 0.9, 0.05] (eps / (K - 1) off the target).
    logits = torch.tensor([[0.0, math.log(2), math.log(5)]])
    expected = -(0.05 * math.log(1 / 8) + 0.9 * math.log(2 / 8) + 0.05 * math.log(5 / 8))
    got = losses.cross_entropy_loss(logits, torch.tensor([1]), eps=0.1)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # eps 0 is the plain cross entropy
    assert losses.cross_entropy_loss(logits, torch.tensor([1]), eps=0.0).item() == pytest.approx(math.log(4), rel=1e-6)


def test_cross_entropy_averages_over_the_batch_and_adaptive_eps():
    logits = torch.tensor([[0.0, math.log(2), math.log(5)], [math.log(3), 0.0, 0.0]])
    # second row: softmax [3/5, 1/5, 1/5], target 0
    row1 = -(0.05 * math.log(1 / 8) + 0.9 * math.log(2 / 8) + 0.05 * math.log(5 / 8))
    row2 = -(0.9 * math.log(3 / 5) + 0.05 * math.log(1 / 5) + 0.05 * math.log(1 / 5))
    got = losses.cross_entropy_loss(logits, torch.tensor([1, 0]), eps=0.1)
    assert got.item() == pytest.approx((row1 + row2) / 2, rel=1e-6)
    # eps < 0: adaptive, eps = alpha * p_target = 0.2 * 3/5 = 0.12 for row 2
    got = losses.cross_entropy_loss(logits[1:], torch.tensor([0]), eps=-1, alpha=0.2)
    expected = -(0.88 * math.log(3 / 5) + 0.06 * math.log(1 / 5) * 2)
    assert got.item() == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------- triplet

# Four 2-D points: ids 0,0,1,1.  a=(0,0) b=(3,4) c=(6,8) d=(0,1)
POINTS = torch.tensor([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0], [0.0, 1.0]])
IDS = torch.tensor([0, 0, 1, 1])
# distances: ab 5, ac 10, ad 1, bc 5, bd sqrt(18), cd sqrt(85)
# hardest positive / negative per anchor:
#   a: ap 5 (b), an min(10, 1) = 1     b: ap 5, an min(5, sqrt18) = sqrt18
#   c: ap sqrt85, an min(10, 5) = 5    d: ap sqrt85, an min(1, sqrt18) = 1
AP = [5.0, 5.0, math.sqrt(85), math.sqrt(85)]
AN = [1.0, math.sqrt(18), 5.0, 1.0]


def test_triplet_batch_hard_margin_by_hand():
    expected = sum(max(0.0, ap - an + 0.3) for ap, an in zip(AP, AN)) / 4
    got = losses.triplet_loss(POINTS, IDS, margin=0.3, norm_feat=False, hard_mining=True)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_triplet_soft_margin_when_margin_is_zero():
    expected = sum(math.log1p(math.exp(ap - an)) for ap, an in zip(AP, AN)) / 4
    got = losses.triplet_loss(POINTS, IDS, margin=0.0, norm_feat=False, hard_mining=True)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_triplet_norm_feat_uses_unit_vectors():
    # a=(1,0), b=(0,1) id 0; c=(-1,0) id 1: on the unit circle |a-b| = sqrt2, |a-c| = 2, |b-c| = sqrt2
    x = torch.tensor([[2.0, 0.0], [0.0, 5.0], [-3.0, 0.0]])
    ids = torch.tensor([0, 0, 1])
    ap = [math.sqrt(2), math.sqrt(2), 1e-6]     # c's only positive is itself (sqrt of the 1e-12 clamp)
    an = [2.0, math.sqrt(2), math.sqrt(2)]
    expected = sum(max(0.0, p - n + 0.3) for p, n in zip(ap, an)) / 3
    got = losses.triplet_loss(x, ids, margin=0.3, norm_feat=True, hard_mining=True)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_euclidean_dist_and_soft_mining():
    d = losses.euclidean_dist(POINTS, POINTS)
    assert d[0, 1].item() == pytest.approx(5.0) and d[1, 3].item() == pytest.approx(math.sqrt(18), rel=1e-6)
    # soft mining for anchor a: positives {a: ~0, b: 5} weighted by softmax(d) over positives
    ap, an = losses.weighted_example_mining(d, IDS[:, None] == IDS[None], IDS[:, None] != IDS[None])
    w = math.exp(5) / (math.exp(0) + math.exp(5))
    assert ap[0].item() == pytest.approx(5 * w, rel=1e-4)
    wn = np.exp([-10.0, -1.0]) / np.exp([-10.0, -1.0]).sum()
    assert an[0].item() == pytest.approx(10 * wn[0] + 1 * wn[1], rel=1e-4)


def test_compute_losses_applies_scales_and_names():
    cfg = load_config(CONFIGS / "Base-bagtricks.yml", ["MODEL.LOSSES.CE.SCALE", "2.0", "MODEL.LOSSES.TRI.SCALE", "0.5"])
    logits = torch.tensor([[0.0, math.log(2), math.log(5)]] * 4)
    out = losses.compute_losses(cfg, {"logits": logits, "features": POINTS}, IDS)
    assert set(out) == {"loss_cls", "loss_triplet"}
    ce = losses.cross_entropy_loss(logits, IDS, 0.1)
    tri = losses.triplet_loss(POINTS, IDS, 0.3, False, True)
    assert out["loss_cls"].item() == pytest.approx(2 * ce.item())
    assert out["loss_triplet"].item() == pytest.approx(0.5 * tri.item())
    cfg.MODEL.LOSSES.NAME = ("CrossEntropyLoss", "CircleLoss")
    with pytest.raises(ReidExportError, match="CircleLoss"):
        losses.compute_losses(cfg, {"logits": logits, "features": POINTS}, IDS)


# ---------------------------------------------------------------- lr schedule


def _cfg(*opts):
    return load_config(CONFIGS / "CUHK03/bagtricks_R18_cpu.yml", list(opts))


def test_warmup_then_multistep_counts_epochs_after_warmup():
    # 10 iterations/epoch, warmup 25 iterations (ends inside epoch 2), STEPS [2], factor 0.1
    sched = LRSchedule(_cfg("SOLVER.WARMUP_ITERS", "25", "SOLVER.STEPS", "[2]", "SOLVER.BASE_LR", "1.0"), 10)
    assert sched.lr(1.0, 0, 0) == pytest.approx(0.1)
    assert sched.lr(1.0, 10, 1) == pytest.approx(0.1 * (1 - 10 / 25) + 10 / 25)
    assert sched.lr(1.0, 24, 2) == pytest.approx(0.1 * (1 - 24 / 25) + 24 / 25)
    assert sched.lr(1.0, 25, 2) == 1.0
    # main scheduler steps after epochs 2, 3, ... (first end of epoch with next_iter > 25 is 30)
    assert [sched.main_steps(e) for e in range(6)] == [0, 0, 0, 1, 2, 3]
    assert sched.lr(1.0, 40, 4) == pytest.approx(0.1)   # 2 main steps >= STEPS[0]
    assert sched.lr(1.0, 30, 3) == 1.0


def test_cosine_with_delay_epochs():
    cfg = _cfg("SOLVER.SCHED", "CosineAnnealingLR", "SOLVER.WARMUP_ITERS", "0", "SOLVER.DELAY_EPOCHS", "2",
               "SOLVER.MAX_EPOCH", "6", "SOLVER.ETA_MIN_LR", "0.0")
    sched = LRSchedule(cfg, 10)
    # T = 6 - 2 = 4; steps after epochs 3, 4, ... (e + 1 > 2)
    lrs = [sched.lr(1.0, 10 * e, e) for e in range(6)]
    expected = [1, 1, 1] + [(1 + math.cos(math.pi * n / 4)) / 2 for n in (1, 2, 3)]
    assert lrs == pytest.approx(expected)


def test_optimizer_groups_follow_fastreid():
    cfg = _cfg("MODEL.HEADS.NUM_CLASSES", "5", "SOLVER.WEIGHT_DECAY", "0.1", "SOLVER.WEIGHT_DECAY_NORM", "0.2",
               "SOLVER.WEIGHT_DECAY_BIAS", "0.3", "SOLVER.BIAS_LR_FACTOR", "2.0", "SOLVER.HEADS_LR_FACTOR", "10.0",
               "SOLVER.BASE_LR", "0.01")
    model = build_model(cfg)
    opt = build_optimizer(cfg, model)
    by_name = {n: (g["lr"], g["weight_decay"]) for g in opt.param_groups for n in g["names"]}
    assert by_name["backbone.conv1.weight"] == (0.01, 0.1)
    assert by_name["backbone.bn1.weight"] == (0.01, 0.2)
    assert by_name["backbone.bn1.bias"] == (0.02, 0.3)
    assert by_name["heads.weight"] == (pytest.approx(0.1), 0.1)
    assert by_name["heads.bottleneck.0.weight"] == (pytest.approx(0.1), 0.2)
    assert "heads.bottleneck.0.bias" not in by_name  # BNNeck bias is frozen


# ---------------------------------------------------------------- sampler and augmentation


def test_pk_sampler_batches():
    labels = [i // 5 for i in range(40)] + [8, 8]  # 8 ids x 5 images, one id with only 2
    sampler = PKBatchSampler(labels, batch_size=16, num_instances=4, seed=3)
    assert len(sampler) == 42 // 16
    for epoch in range(3):
        batches = sampler.batches(epoch)
        assert len(batches) == 2
        for batch in batches:
            ids = [labels[i] for i in batch]
            assert len(batch) == 16 and len(set(ids)) == 4
            assert all(ids.count(pid) == 4 for pid in set(ids))
    assert sampler.batches(1) == PKBatchSampler(labels, 16, 4, seed=3).batches(1)
    assert sampler.batches(1) != sampler.batches(2)
    with pytest.raises(ReidExportError, match="multiple"):
        PKBatchSampler(labels, 15, 4, 0)


def test_train_transform_shapes_and_determinism(tmp_path):
    import cv2

    path = tmp_path / "0001_c1s1_000000_00.jpg"
    cv2.imwrite(str(path), np.random.default_rng(0).integers(0, 255, (100, 40, 3), dtype=np.uint8))
    cfg = _cfg("INPUT.SIZE_TRAIN", "[128, 64]", "INPUT.CJ.ENABLED", "True", "INPUT.CJ.PROB", "1.0", "INPUT.REA.PROB", "1.0")
    t = TrainTransform(cfg)
    a = t(path, np.random.default_rng([1, 2, 3]))
    b = t(path, np.random.default_rng([1, 2, 3]))
    assert a.shape == (3, 128, 64) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert a.min() >= 0 and a.max() <= 255


def test_random_erasing_fills_a_box():
    x = np.zeros((3, 40, 20), np.float32)
    out = random_erasing(x, np.random.default_rng(0), [1.0, 2.0, 3.0])
    filled = out[0] == 1.0
    assert 0.02 * 800 * 0.5 <= filled.sum() <= 0.33 * 800 * 1.5
    rows, cols = np.nonzero(filled)
    assert filled[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()  # one rectangle
    assert (out[2][filled] == 3.0).all() and x.sum() == 0  # input untouched


# ---------------------------------------------------------------- ImageNet weights, dataset lookup


@pytest.mark.slow
def test_pretrained_torchvision_and_ibn_layouts(tmp_path):
    cfg = _cfg()
    source = build_model(cfg).backbone
    tv = {k: v.clone() for k, v in source.state_dict().items()}
    tv["fc.weight"], tv["fc.bias"] = torch.zeros(1000, 512), torch.zeros(1000)
    torch.save(tv, tmp_path / "resnet18_tv.pth")
    target = build_model(cfg).backbone
    report = load_pretrained_backbone(target, tmp_path / "resnet18_tv.pth")
    assert report["loaded"] == len(tv) - 2 and not report["missing"]
    for key, value in source.state_dict().items():
        torch.testing.assert_close(target.state_dict()[key], value)
    # IBN-Net style: {"state_dict": {"module.layer1.0.bn1.IN.weight": ...}}
    cfg_ibn = _cfg("MODEL.BACKBONE.WITH_IBN", "True")
    src_ibn = build_model(cfg_ibn).backbone
    wrapped = {"state_dict": {f"module.{k}": v for k, v in src_ibn.state_dict().items()}}
    torch.save(wrapped, tmp_path / "r18_ibn_a.pth")
    dst_ibn = build_model(cfg_ibn).backbone
    assert not load_pretrained_backbone(dst_ibn, tmp_path / "r18_ibn_a.pth")["missing"]
    torch.testing.assert_close(dst_ibn.layer1[0].bn1.IN.weight, src_ibn.layer1[0].bn1.IN.weight)
    # wrong depth: one clear error
    torch.save({"conv9.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ReidExportError, match="matches the backbone"):
        load_pretrained_backbone(target, tmp_path / "other.pth")


def test_dataset_names_map_to_folders(tmp_path):
    (tmp_path / "cuhk03-labeled" / "Market-1501-v15.09.15" / "bounding_box_train").mkdir(parents=True)
    (tmp_path / "mine" / "bounding_box_train").mkdir(parents=True)
    assert resolve_dataset("CUHK03", tmp_path) == tmp_path / "cuhk03-labeled"
    assert resolve_dataset("cuhk03-labeled", tmp_path) == tmp_path / "cuhk03-labeled"
    assert resolve_dataset("mine", tmp_path) == tmp_path / "mine"
    assert resolve_dataset(str(tmp_path / "mine"), tmp_path / "elsewhere") == tmp_path / "mine"
    with pytest.raises(ReidExportError, match="DATASETS.ROOT"):
        resolve_dataset("Market1501", tmp_path)


@pytest.mark.slow
def test_freeze_layers_keeps_the_backbone_fixed_then_releases_it():
    from reid_train.engine import LayerFreezer

    cfg = _cfg("MODEL.HEADS.NUM_CLASSES", "4", "MODEL.FREEZE_LAYERS", "['backbone']", "SOLVER.FREEZE_ITERS", "1",
               "SOLVER.BASE_LR", "0.01")
    torch.manual_seed(0)
    model = build_model(cfg).train()
    opt = build_optimizer(cfg, model)
    freezer = LayerFreezer(cfg, model, opt)
    x, y = torch.rand(8, 3, 32, 16) * 255, torch.arange(8) // 2

    def step(iteration):
        freezer.update(iteration)
        out = model(x, y)
        loss = losses.compute_losses(cfg, out, y)
        opt.zero_grad(set_to_none=True)
        sum(loss.values()).backward()
        opt.step()

    conv, head = model.backbone.conv1.weight.detach().clone(), model.heads.weight.detach().clone()
    bn_mean = model.backbone.bn1.running_mean.clone()
    step(0)
    assert not model.backbone.training and model.heads.training
    torch.testing.assert_close(model.backbone.conv1.weight, conv, rtol=0, atol=0)
    torch.testing.assert_close(model.backbone.bn1.running_mean, bn_mean, rtol=0, atol=0)
    assert not torch.equal(model.heads.weight, head)
    model.train()
    step(1)
    assert model.backbone.conv1.weight.requires_grad and not torch.equal(model.backbone.conv1.weight, conv)
