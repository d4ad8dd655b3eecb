"""ResNet 18x/34x/50x/101x with IBN-a and non-local blocks, state-dict keys as fast-reid's."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import ReidExportError
from .layers import IBN, NonLocal, get_norm


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, bn_norm="BN", with_ibn=False, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = IBN(planes, bn_norm) if with_ibn else get_norm(bn_norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = get_norm(bn_norm, planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, bn_norm="BN", with_ibn=False, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = IBN(planes, bn_norm) if with_ibn else get_norm(bn_norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = get_norm(bn_norm, planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = get_norm(bn_norm, planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


ARCHS = {
    # depth: (block, blocks per stage, non-local blocks per stage)
    "18x": (BasicBlock, [2, 2, 2, 2], [0, 0, 0, 0]),
    "34x": (BasicBlock, [3, 4, 6, 3], [0, 0, 0, 0]),
    "50x": (Bottleneck, [3, 4, 6, 3], [0, 2, 3, 0]),
    "101x": (Bottleneck, [3, 4, 23, 3], [0, 2, 9, 0]),
}


STEM_POOL_PADDINGS = (0, 1)


class ResNet(nn.Module):
    """fast-reid's ResNet: IBN-a in stages 1-3, non-local blocks after the last blocks of a stage.

    The stem max-pool is fast-reid's ``MaxPool2d(3, stride=2, ceil_mode=True)`` with no padding
    (a 256x128 input gives a 64x32 map after it; torchvision's ResNet pads by 1 and gives 64x32
    only through floor mode). ``stem_pool_padding=1`` rebuilds the stem that reid-train used
    before 0.2.0, for checkpoints trained with it (see ``checkpoint.resolve_stem``).
    """

    def __init__(self, depth="50x", last_stride=1, bn_norm="BN", with_ibn=False, with_nl=False,
                 stem_pool_padding=0):
        super().__init__()
        if stem_pool_padding not in STEM_POOL_PADDINGS:
            raise ReidExportError(f"MODEL.BACKBONE.STEM_POOL_PADDING {stem_pool_padding!r} is not supported; "
                                  "use 0 (fast-reid) or 1 (reid-train before 0.2.0)")
        self.stem_pool_padding = int(stem_pool_padding)
        if depth not in ARCHS:
            raise ReidExportError(
                f"MODEL.BACKBONE.DEPTH {depth!r} is not supported; use one of {', '.join(ARCHS)}"
            )
        block, layers, non_layers = ARCHS[depth]
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = get_norm(bn_norm, 64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=self.stem_pool_padding, ceil_mode=True)
        self.layer1 = self._make_layer(block, 64, layers[0], 1, bn_norm, with_ibn)
        self.layer2 = self._make_layer(block, 128, layers[1], 2, bn_norm, with_ibn)
        self.layer3 = self._make_layer(block, 256, layers[2], 2, bn_norm, with_ibn)
        self.layer4 = self._make_layer(block, 512, layers[3], last_stride, bn_norm, False)
        self.feat_dim = 512 * block.expansion
        self._random_init()

        # Non-local blocks follow the last n blocks of a stage: {stage: sorted block indices}.
        self.nl_positions: dict[int, list[int]] = {}
        if with_nl:
            for stage, (count, n_nl) in enumerate(zip(layers, non_layers), start=1):
                channels = 64 * 2 ** (stage - 1) * block.expansion
                setattr(self, f"NL_{stage}", nn.ModuleList(NonLocal(channels, bn_norm) for _ in range(n_nl)))
                self.nl_positions[stage] = sorted(count - (i + 1) for i in range(n_nl))

    def _make_layer(self, block, planes, blocks, stride, bn_norm, with_ibn):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride=stride, bias=False),
                get_norm(bn_norm, planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, bn_norm, with_ibn, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, bn_norm, with_ibn) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def _random_init(self):
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0, math.sqrt(2.0 / n))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for stage in range(1, 5):
            layer = getattr(self, f"layer{stage}")
            positions = self.nl_positions.get(stage, [])
            nl_blocks = getattr(self, f"NL_{stage}", None)
            for i, block in enumerate(layer):
                x = block(x)
                if i in positions:
                    x = nl_blocks[positions.index(i)](x)
        return x


def build_resnet_backbone(cfg) -> ResNet:
    bb = cfg.MODEL.BACKBONE
    if bb.NAME != "build_resnet_backbone":
        raise ReidExportError(
            f"MODEL.BACKBONE.NAME {bb.NAME!r} is not supported; reid-export builds build_resnet_backbone "
            "(for other networks export ONNX elsewhere and use `reid-export annotate`)"
        )
    if bb.WITH_SE:
        raise ReidExportError("MODEL.BACKBONE.WITH_SE is not supported; set it to False")
    padding = bb.get("STEM_POOL_PADDING")
    return ResNet(bb.DEPTH, int(bb.LAST_STRIDE), bb.NORM, bool(bb.WITH_IBN), bool(bb.WITH_NL),
                  stem_pool_padding=0 if padding is None else padding)
