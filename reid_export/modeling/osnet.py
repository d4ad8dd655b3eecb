"""OSNet (Omni-Scale Network, Zhou et al., ICCV 2019) with torchreid's and fast-reid's parameter names.

Widths x1_0 / x0_75 / x0_5 / x0_25, the IBN variant (instance norm in the stem and the first stage,
after each residual sum) and the AIN variant of torchreid's ``osnet_ain`` (instance norm inside the
residual branch of chosen blocks, separate ``pool2``/``pool3`` transitions). The module attribute
names are the state-dict keys of torchreid's ``osnet.py``/``osnet_ain.py`` and of fast-reid's
``backbones/osnet.py`` (``conv1.conv``, ``conv2.0.conv2a.conv1``, ``conv2.2.0`` transition,
``conv5``, ...), so their checkpoints load as they are. The backbone returns the ``conv5`` map;
the head (fast-reid's EmbeddingHead, or the torchreid ``fc`` head) pools it.

torchreid checkpoints have no ``backbone.``/``heads.`` prefixes: :func:`torchreid_to_reid_export`
maps them, and :func:`describe_osnet_state` names the architecture a state dict holds (from its key
shapes), for the "which config is this checkpoint" hint.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from ..errors import ReidExportError
from .layers import get_norm

# Channels of the stem and the three stages (torchreid's osnet_x*, fast-reid's build_osnet_backbone).
OSNET_WIDTHS = {
    "x1_0": (64, 256, 384, 512),
    "x0_75": (48, 192, 288, 384),
    "x0_5": (32, 128, 192, 256),
    "x0_25": (16, 64, 96, 128),
}
BLOCKS_PER_STAGE = 2
# osnet_ain_x1_0: which blocks of each stage put instance norm inside the residual branch.
AIN_PATTERN = ((True, True), (False, True), (True, False))


def _norm(bn_norm: str, channels: int) -> nn.Module:
    return get_norm(bn_norm, channels)


class ConvLayer(nn.Module):
    """k x k conv -> BN (or affine InstanceNorm in the IBN/AIN stem) -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0,
                 bn_norm: str = "BN", instance_norm: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.InstanceNorm2d(cout, affine=True) if instance_norm else _norm(bn_norm, cout)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)))


class Conv1x1(nn.Module):
    """1x1 conv -> BN -> ReLU."""

    def __init__(self, cin: int, cout: int, bn_norm: str = "BN"):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn = _norm(bn_norm, cout)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)))


class Conv1x1Linear(nn.Module):
    """1x1 conv -> BN (no activation); ``with_bn=False`` for the AIN block's last conv."""

    def __init__(self, cin: int, cout: int, bn_norm: str = "BN", with_bn: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn = _norm(bn_norm, cout) if with_bn else None

    def forward(self, x):
        x = self.conv(x)
        return self.bn(x) if self.bn is not None else x


class LightConv3x3(nn.Module):
    """Pointwise 1x1 (linear) then depthwise 3x3, BN, ReLU."""

    def __init__(self, cin: int, cout: int, bn_norm: str = "BN"):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 1, bias=False)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False, groups=cout)
        self.bn = _norm(bn_norm, cout)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.bn(self.conv2(self.conv1(x))))


class LightConvStream(nn.Module):
    """``depth`` LightConv3x3 in a row (the AIN block names them ``layers``)."""

    def __init__(self, channels: int, depth: int, bn_norm: str = "BN"):
        super().__init__()
        self.layers = nn.Sequential(*(LightConv3x3(channels, channels, bn_norm) for _ in range(depth)))

    def forward(self, x):
        return self.layers(x)


class ChannelGate(nn.Module):
    """Squeeze-excitation style gate shared by the four streams of a block: x * sigmoid(fc2(relu(fc1(gap(x)))))."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.global_avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1, bias=True)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1, bias=True)
        self.gate_activation = nn.Sigmoid()

    def forward(self, x):
        g = self.gate_activation(self.fc2(self.relu(self.fc1(self.global_avgpool(x)))))
        return x * g


class OSBlock(nn.Module):
    """Omni-scale block of osnet.py: four streams of 1-4 LightConv3x3, unified gate, residual.

    ``instance_norm``: the IBN variant's affine InstanceNorm applied after the residual sum.
    """

    def __init__(self, cin: int, cout: int, bn_norm: str = "BN", instance_norm: bool = False,
                 bottleneck_reduction: int = 4):
        super().__init__()
        mid = cout // bottleneck_reduction
        self.conv1 = Conv1x1(cin, mid, bn_norm)
        self.conv2a = LightConv3x3(mid, mid, bn_norm)
        self.conv2b = nn.Sequential(*(LightConv3x3(mid, mid, bn_norm) for _ in range(2)))
        self.conv2c = nn.Sequential(*(LightConv3x3(mid, mid, bn_norm) for _ in range(3)))
        self.conv2d = nn.Sequential(*(LightConv3x3(mid, mid, bn_norm) for _ in range(4)))
        self.gate = ChannelGate(mid)
        self.conv3 = Conv1x1Linear(mid, cout, bn_norm)
        self.downsample = Conv1x1Linear(cin, cout, bn_norm) if cin != cout else None
        self.IN = nn.InstanceNorm2d(cout, affine=True) if instance_norm else None

    def forward(self, x):
        x1 = self.conv1(x)
        x2 = (self.gate(self.conv2a(x1)) + self.gate(self.conv2b(x1))
              + self.gate(self.conv2c(x1)) + self.gate(self.conv2d(x1)))
        identity = self.downsample(x) if self.downsample is not None else x
        out = self.conv3(x2) + identity
        if self.IN is not None:
            out = self.IN(out)
        return F.relu(out)


class OSBlockAIN(nn.Module):
    """Omni-scale block of osnet_ain.py: streams in ``conv2`` (a ModuleList), optional IN inside the residual.

    With ``instance_norm`` (torchreid's ``OSBlockINin``) the last 1x1 conv has no BN and an
    affine InstanceNorm follows it, before the sum with the identity.
    """

    def __init__(self, cin: int, cout: int, bn_norm: str = "BN", instance_norm: bool = False,
                 reduction: int = 4, streams: int = 4):
        super().__init__()
        mid = cout // reduction
        self.conv1 = Conv1x1(cin, mid, bn_norm)
        self.conv2 = nn.ModuleList(LightConvStream(mid, t, bn_norm) for t in range(1, streams + 1))
        self.gate = ChannelGate(mid)
        self.conv3 = Conv1x1Linear(mid, cout, bn_norm, with_bn=not instance_norm)
        self.downsample = Conv1x1Linear(cin, cout, bn_norm) if cin != cout else None
        self.IN = nn.InstanceNorm2d(cout, affine=True) if instance_norm else None

    def forward(self, x):
        x1 = self.conv1(x)
        x2 = None
        for stream in self.conv2:
            gated = self.gate(stream(x1))
            x2 = gated if x2 is None else x2 + gated
        x3 = self.conv3(x2)
        if self.IN is not None:
            x3 = self.IN(x3)
        identity = self.downsample(x) if self.downsample is not None else x
        return F.relu(x3 + identity)


def _transition(channels: int, bn_norm: str) -> nn.Sequential:
    return nn.Sequential(Conv1x1(channels, channels, bn_norm), nn.AvgPool2d(2, stride=2))


class OSNet(nn.Module):
    """The convolutional part of OSNet: input normalised [B, 3, H, W] -> conv5 map [B, C, H/16, W/16].

    ``variant``: ``"osnet"`` (osnet.py; ``ibn`` adds instance norm to the stem and stage 1) or
    ``"ain"`` (osnet_ain.py: IN stem, AIN blocks, ``pool2``/``pool3`` as separate modules).
    """

    def __init__(self, width: str = "x1_0", ibn: bool = False, variant: str = "osnet", bn_norm: str = "BN"):
        super().__init__()
        if width not in OSNET_WIDTHS:
            raise ReidExportError(
                f"MODEL.BACKBONE.DEPTH {width!r} is not an OSNet width; use one of {', '.join(OSNET_WIDTHS)}"
            )
        if variant not in ("osnet", "ain"):
            raise ReidExportError(f"OSNet variant must be osnet or ain, got {variant!r}")
        c = OSNET_WIDTHS[width]
        self.width, self.ibn, self.variant = width, bool(ibn), variant
        self.feat_dim = c[3]
        stem_in = bool(ibn) or variant == "ain"
        self.conv1 = ConvLayer(3, c[0], 7, stride=2, padding=3, bn_norm=bn_norm, instance_norm=stem_in)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        if variant == "osnet":
            self.conv2 = self._stage(c[0], c[1], bn_norm, instance_norm=bool(ibn), transition=True)
            self.conv3 = self._stage(c[1], c[2], bn_norm, instance_norm=False, transition=True)
            self.conv4 = self._stage(c[2], c[3], bn_norm, instance_norm=False, transition=False)
        else:
            self.conv2 = self._ain_stage(c[0], c[1], bn_norm, AIN_PATTERN[0])
            self.pool2 = _transition(c[1], bn_norm)
            self.conv3 = self._ain_stage(c[1], c[2], bn_norm, AIN_PATTERN[1])
            self.pool3 = _transition(c[2], bn_norm)
            self.conv4 = self._ain_stage(c[2], c[3], bn_norm, AIN_PATTERN[2])
        self.conv5 = Conv1x1(c[3], c[3], bn_norm)
        self._init_params()

    @staticmethod
    def _stage(cin: int, cout: int, bn_norm: str, instance_norm: bool, transition: bool) -> nn.Sequential:
        blocks: list[nn.Module] = [OSBlock(cin, cout, bn_norm, instance_norm)]
        blocks += [OSBlock(cout, cout, bn_norm, instance_norm) for _ in range(BLOCKS_PER_STAGE - 1)]
        if transition:
            blocks.append(_transition(cout, bn_norm))
        return nn.Sequential(*blocks)

    @staticmethod
    def _ain_stage(cin: int, cout: int, bn_norm: str, pattern) -> nn.Sequential:
        return nn.Sequential(*(OSBlockAIN(cin if i == 0 else cout, cout, bn_norm, instance_norm=flag)
                               for i, flag in enumerate(pattern)))

    def _init_params(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.InstanceNorm2d)) and m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.maxpool(self.conv1(x))
        x = self.conv2(x)
        if self.variant == "ain":
            x = self.pool2(x)
        x = self.conv3(x)
        if self.variant == "ain":
            x = self.pool3(x)
        return self.conv5(self.conv4(x))


def osnet_options(cfg) -> tuple[str, bool, str]:
    """(width, ibn, variant) from MODEL.BACKBONE: DEPTH ``x0_25`` / ``ain_x1_0``, WITH_IBN."""
    bb = cfg.MODEL.BACKBONE
    depth = str(bb.DEPTH)
    variant = "osnet"
    if depth.startswith("ain_"):
        variant, depth = "ain", depth[len("ain_"):]
    if depth not in OSNET_WIDTHS:
        choices = ", ".join(list(OSNET_WIDTHS) + [f"ain_{w}" for w in OSNET_WIDTHS])
        raise ReidExportError(
            f"MODEL.BACKBONE.DEPTH {bb.DEPTH!r} is not an OSNet depth for build_osnet_backbone; use one of {choices}"
        )
    if variant == "ain" and bb.WITH_IBN:
        raise ReidExportError("MODEL.BACKBONE.WITH_IBN does not apply to the AIN variant (DEPTH ain_*); "
                              "set WITH_IBN: False")
    if bb.WITH_NL or bb.WITH_SE:
        raise ReidExportError("MODEL.BACKBONE.WITH_NL / WITH_SE are ResNet options; OSNet has neither, set them False")
    return depth, bool(bb.WITH_IBN), variant


def build_osnet_backbone(cfg) -> OSNet:
    """fast-reid's ``build_osnet_backbone``: DEPTH x1_0/x0_75/x0_5/x0_25 (or ain_x1_0 ...), WITH_IBN."""
    width, ibn, variant = osnet_options(cfg)
    return OSNet(width, ibn=ibn, variant=variant, bn_norm=cfg.MODEL.BACKBONE.NORM)


# ---------------------------------------------------------------------------------------------
# torchreid checkpoints

_TORCHREID_STEM = "conv1.conv.weight"
SHIPPED_TORCHREID_CONFIGS = ("osnet_x1_0", "osnet_x0_75", "osnet_x0_5", "osnet_x0_25", "osnet_ibn_x1_0",
                             "osnet_ain_x1_0")
TORCHREID_DROPPED = ("classifier.",)


def is_torchreid_layout(state: dict) -> bool:
    """A torchreid OSNet state dict: stem ``conv1.conv.weight`` and no ``backbone.`` prefix."""
    return _TORCHREID_STEM in state and not any(k.startswith(("backbone.", "heads.")) for k in state)


def torchreid_to_reid_export(state: dict) -> dict:
    """torchreid key names -> ours: ``fc.*`` -> ``heads.fc.*``, the rest -> ``backbone.*``.

    ``classifier.*`` (the identity classifier of the training set, any size) is dropped: the
    eval-mode output stops at ``fc``.
    """
    out = {}
    for key, value in state.items():
        if key.startswith(TORCHREID_DROPPED):
            continue
        out[("heads." + key) if key.startswith("fc.") else ("backbone." + key)] = value
    return out


def describe_osnet_state(state: dict) -> dict | None:
    """What OSNet a state dict (our key names) holds, from its key shapes; None if it is no OSNet.

    Returns ``{"arch": "osnet_x0_25", "width": ..., "ibn": ..., "variant": ..., "fc_dim": 512 or 0,
    "config": "configs/torchreid/osnet_x0_25.yml" or None}``.
    """
    stem = state.get("backbone." + _TORCHREID_STEM)
    if stem is None or stem.ndim != 4:
        return None
    width = next((w for w, c in OSNET_WIDTHS.items() if c[0] == stem.shape[0]), None)
    if width is None:
        return None
    variant = "ain" if any(k.startswith("backbone.pool2.") for k in state) else "osnet"
    stem_in = "backbone.conv1.bn.weight" in state and "backbone.conv1.bn.running_mean" not in state
    ibn = stem_in and variant == "osnet"
    fc = state.get("heads.fc.0.weight")
    fc_dim = int(fc.shape[0]) if fc is not None and fc.ndim == 2 else 0
    arch = f"osnet_{'ain_' if variant == 'ain' else ''}{'ibn_' if ibn else ''}{width}"
    config = f"configs/torchreid/{arch}.yml" if arch in SHIPPED_TORCHREID_CONFIGS and fc_dim == 512 else None
    return {"arch": arch, "width": width, "ibn": ibn, "variant": variant, "fc_dim": fc_dim, "config": config}


def osnet_hint(state: dict) -> str:
    """``the checkpoint looks like osnet_x0_25 (fc 512): try --config configs/torchreid/osnet_x0_25.yml``."""
    info = describe_osnet_state(state)
    if info is None:
        return ""
    head = f"fc {info['fc_dim']}" if info["fc_dim"] else "no fc; fast-reid heads"
    text = f"the checkpoint looks like {info['arch']} ({head})"
    if info["config"]:
        return f"{text}: try `config` {info['config']}"
    depth = ("ain_" if info["variant"] == "ain" else "") + info["width"]
    return (f"{text}: use MODEL.BACKBONE.NAME build_osnet_backbone, DEPTH {depth}, "
            f"WITH_IBN {info['ibn']}")
