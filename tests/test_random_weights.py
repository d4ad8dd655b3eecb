"""reid_export.modeling.random_weights.randomize_bn: the one way tests and benchmarks give random weights the
numerics of a trained model (BatchNorm statistics measured, non-trivial norm parameters)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import CONFIGS
from reid_export.config import load_config
from reid_export.modeling import build_model
from reid_export.modeling.random_weights import randomize_bn
from reid_export.modeling.resnet import BasicBlock

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def r18():
    torch.manual_seed(0)
    return build_model(load_config(CONFIGS / "Market1501/bagtricks_R18.yml", ["INPUT.SIZE_TEST", "[64, 32]"]))


def test_statistics_are_those_of_the_given_inputs():
    """The first BatchNorm's running mean/variance equal the batch statistics of the first convolution's output,
    computed here without the model's BatchNorm (the cumulative average of one batch is that batch's)."""
    model = r18()
    x = torch.rand(6, 3, 64, 32, generator=torch.Generator().manual_seed(5)) * 255
    randomize_bn(model, inputs=[x])
    conv = model.backbone.conv1
    with torch.no_grad():
        y = F.conv2d((x - model.pixel_mean) / model.pixel_std, conv.weight, conv.bias, conv.stride, conv.padding)
    bn = model.backbone.bn1
    torch.testing.assert_close(bn.running_mean, y.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(bn.running_var, y.var(dim=(0, 2, 3), unbiased=True), rtol=1e-4, atol=1e-4)
    assert not model.training and bn.momentum == 0.1


def test_the_model_tells_images_apart_and_the_seed_decides():
    a, b = randomize_bn(r18(), seed=1, size=(64, 32)), randomize_bn(r18(), seed=1, size=(64, 32))
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    c = randomize_bn(r18(), seed=2, size=(64, 32))
    assert not torch.equal(a.backbone.bn1.weight, c.backbone.bn1.weight)
    images = torch.rand(4, 3, 64, 32, generator=torch.Generator().manual_seed(9)) * 255
    with torch.no_grad():
        features = F.normalize(a(images), dim=1)
    cosine = features @ features.T
    assert float(cosine[~torch.eye(4, dtype=torch.bool)].max()) < 0.999  # not one feature for every image
    assert torch.isfinite(features).all()


def test_affine_and_branch_gains():
    built = r18()
    weights = {k: v.clone() for k, v in built.state_dict().items() if k.endswith(".weight") and "bn" in k}
    randomize_bn(built, affine=False)  # statistics only: the norm parameters as built
    assert all(torch.equal(built.state_dict()[k], v) for k, v in weights.items())
    plain, gained = randomize_bn(r18()), randomize_bn(r18(), branch_gain=0.1)
    block = plain.backbone.layer1[0]
    assert isinstance(block, BasicBlock)
    assert 0.5 <= float(block.bn2.weight.detach().min()) and float(block.bn2.weight.detach().max()) < 1.0
    torch.testing.assert_close(gained.backbone.layer1[0].bn2.weight, block.bn2.weight * 0.1)  # last of the branch
    torch.testing.assert_close(gained.backbone.layer1[0].bn1.weight, block.bn1.weight)  # not the last: as drawn


@pytest.mark.slow
def test_non_local_blocks_start_small():
    """AGW's non-local blocks: the last norm of each (W.1) is drawn as the others, then scaled by 0.2."""
    torch.manual_seed(0)
    model = randomize_bn(build_model(load_config(CONFIGS / "Market1501/AGW_R50.yml")), size=(64, 32))
    gains = [m.weight.detach() for name, m in model.named_modules() if ".NL_" in name and name.endswith(".W.1")]
    assert gains and all(0.1 <= float(g.min()) and float(g.max()) < 0.2 for g in gains)
