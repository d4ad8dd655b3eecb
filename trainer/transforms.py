"""Training augmentation, in fast-reid's order, on top of the project's one preprocessing.

Every image is decoded with :func:`reid_export.preprocess.read_image` and resized (the
uint8 image, INPUT.INTERPOLATION) by :func:`reid_export.preprocess.preprocess_image` with
a data config of INPUT.SIZE_TRAIN, exactly as at test time; the augmentations then work on that
float32 0..255 CHW array:

1. pad (INPUT.PADDING: SIZE pixels, MODE constant/edge/reflect/symmetric) + random crop back
   to SIZE_TRAIN;
2. horizontal flip with INPUT.FLIP.PROB;
3. colour jitter (INPUT.CJ) with PROB: brightness, contrast, saturation, hue in random order,
   rounded to integers after each step as on PIL images;
4. random erasing (INPUT.REA) with PROB: torchvision's RandomErasing (area 2-33 %, aspect
   0.3-3.3, 10 tries), filled with INPUT.REA.VALUE.

fast-reid resizes with PIL (bicubic) at train time; here the resize is the test-time one, so
train and test pixels agree. Randomness comes from the generator passed in (seeded per sample).
"""

from __future__ import annotations

import dataclasses
import logging
import math

import cv2
import numpy as np

from reid_export.data_config import data_config_from_cfg
from reid_export.errors import ReidExportError
from reid_export.preprocess import preprocess_image, read_image

_PAD_MODES = {"constant": cv2.BORDER_CONSTANT, "edge": cv2.BORDER_REPLICATE,
              "reflect": cv2.BORDER_REFLECT_101, "symmetric": cv2.BORDER_REFLECT}
_UNSUPPORTED = ("CROP", "AUTOAUG", "AUGMIX", "AFFINE", "RPT")
log = logging.getLogger("reid-train")


def _gray(x: np.ndarray) -> np.ndarray:
    """ITU-R 601-2 luma of an RGB CHW image, as PIL's convert("L")."""
    return 0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]


def _blend(x: np.ndarray, other, factor: float) -> np.ndarray:
    return np.clip(np.rint(other + factor * (x - other)), 0, 255)


def adjust_hue(x: np.ndarray, shift: float) -> np.ndarray:
    """Rotate the hue of an RGB CHW 0..255 image by ``shift`` turns (-0.5..0.5)."""
    hwc = np.ascontiguousarray(x.transpose(1, 2, 0) / 255.0, dtype=np.float32)
    hsv = cv2.cvtColor(hwc, cv2.COLOR_RGB2HSV)  # H in degrees
    hsv[..., 0] = (hsv[..., 0] + shift * 360.0) % 360.0
    rgb = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    return np.clip(np.rint(rgb * 255.0), 0, 255).transpose(2, 0, 1)


def color_jitter(x: np.ndarray, rng: np.random.Generator, brightness: float, contrast: float,
                 saturation: float, hue: float) -> np.ndarray:
    ops = []
    if brightness > 0:
        f = rng.uniform(max(0.0, 1 - brightness), 1 + brightness)
        ops.append(lambda im, f=f: _blend(im, 0.0, f))
    if contrast > 0:
        f = rng.uniform(max(0.0, 1 - contrast), 1 + contrast)
        ops.append(lambda im, f=f: _blend(im, float(np.rint(_gray(im).mean())), f))
    if saturation > 0:
        f = rng.uniform(max(0.0, 1 - saturation), 1 + saturation)
        ops.append(lambda im, f=f: _blend(im, _gray(im)[None], f))
    if hue > 0:
        h = rng.uniform(-min(hue, 0.5), min(hue, 0.5))
        ops.append(lambda im, h=h: adjust_hue(im, h))
    for i in rng.permutation(len(ops)):
        x = ops[i](x)
    return x.astype(np.float32)


def random_erasing(x: np.ndarray, rng: np.random.Generator, value, scale=(0.02, 0.33),
                   ratio=(0.3, 3.3)) -> np.ndarray:
    """torchvision's RandomErasing (the probability is checked by the caller)."""
    _, height, width = x.shape
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        erase_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        h = int(round(math.sqrt(erase_area * aspect)))
        w = int(round(math.sqrt(erase_area / aspect)))
        if not (h < height and w < width):
            continue
        i = int(rng.integers(0, height - h + 1))
        j = int(rng.integers(0, width - w + 1))
        x = x.copy()
        x[:, i:i + h, j:j + w] = np.asarray(value, dtype=np.float32).reshape(-1, 1, 1)
        return x
    return x


class TrainTransform:
    """``transform(path, rng) -> float32 [3, H, W]`` (0..255, RGB), picklable for worker processes."""

    def __init__(self, cfg):
        inp = cfg.INPUT
        if len(inp.SIZE_TRAIN) != 2:
            raise ReidExportError(f"INPUT.SIZE_TRAIN must be [height, width], got {list(inp.SIZE_TRAIN)}")
        height, width = (int(v) for v in inp.SIZE_TRAIN)
        self.data_config = dataclasses.replace(data_config_from_cfg(cfg), height=height, width=width)
        if not self.data_config.normalized_inside or self.data_config.pixel_scale != 255.0:
            raise ReidExportError("reid-train expects the model to normalise its 0..255 input (fast-reid layout)")
        self.pad = int(inp.PADDING.SIZE) if inp.PADDING.ENABLED else 0
        if self.pad and inp.PADDING.MODE not in _PAD_MODES:
            raise ReidExportError(f"INPUT.PADDING.MODE {inp.PADDING.MODE!r} is not supported; "
                                  f"use one of {', '.join(_PAD_MODES)}")
        self.pad_mode = _PAD_MODES.get(inp.PADDING.MODE, cv2.BORDER_CONSTANT)
        self.flip = float(inp.FLIP.PROB) if inp.FLIP.ENABLED else 0.0
        self.cj = float(inp.CJ.PROB) if inp.CJ.ENABLED else 0.0
        self.cj_args = (float(inp.CJ.BRIGHTNESS), float(inp.CJ.CONTRAST), float(inp.CJ.SATURATION),
                        float(inp.CJ.HUE))
        self.rea = float(inp.REA.PROB) if inp.REA.ENABLED else 0.0
        self.rea_value = [float(v) for v in inp.REA.VALUE]
        if len(self.rea_value) not in (1, 3):
            raise ReidExportError(f"INPUT.REA.VALUE needs 1 or 3 values, got {inp.REA.VALUE}")
        for key in _UNSUPPORTED:
            if inp[key].ENABLED:
                log.warning("INPUT.%s.ENABLED is not implemented by reid-train; it is ignored", key)

    def __call__(self, image, rng: np.random.Generator) -> np.ndarray:
        rgb = read_image(image) if not isinstance(image, np.ndarray) else image
        x = preprocess_image(rgb, self.data_config)  # [3, H, W] float32 0..255
        _, height, width = x.shape
        if self.pad:
            p = self.pad
            padded = cv2.copyMakeBorder(np.ascontiguousarray(x.transpose(1, 2, 0)), p, p, p, p, self.pad_mode,
                                        value=(0, 0, 0))
            i = int(rng.integers(0, padded.shape[0] - height + 1))
            j = int(rng.integers(0, padded.shape[1] - width + 1))
            x = padded[i:i + height, j:j + width].transpose(2, 0, 1)
        if self.flip and rng.random() < self.flip:
            x = x[:, :, ::-1]
        if self.cj and rng.random() < self.cj:
            x = color_jitter(x, rng, *self.cj_args)
        if self.rea and rng.random() < self.rea:
            x = random_erasing(x, rng, self.rea_value)
        return np.ascontiguousarray(x, dtype=np.float32)
