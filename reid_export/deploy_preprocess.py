"""The preprocessing of a deployment target, built on the one preprocessing function.

A server or tracker preprocesses crops its own way, not the way the model was trained and
verified. These variants reproduce what such a deployment feeds the model, so ``eval`` and
``parity`` (``--deployment NAME``) can measure what it costs in Rank-1/mAP and in embedding
error before anyone ships:

- ``deepstream``: DeepStream's nvtracker ReID with NVIDIA's sample preprocessing: ``keepAspc: 1``
  (the crop scaled by one factor to fit the input, bilinear, black padding on the right/bottom,
  the image at the top left) and one scalar for the three channels, ``y = netScaleFactor * (x -
  offsets)`` with ``offsets`` the model's mean and ``netScaleFactor = 1 / mean(std)`` (NVIDIA's
  0.01735207 = 1/57.63 for fast-reid's/ImageNet's std, 1.3% off on the red channel).
- ``deepstream-folded``: the same letterbox and resize with the model's exact per-channel
  normalisation: what ``reid-export deepstream``'s folded ONNX computes with ``offsets: [0, 0, 0]``
  and ``netScaleFactor: 1.0``.
- ``deepstream-stretch``: ``keepAspc: 0`` (the crop stretched to the input size, bilinear) with
  NVIDIA's scalar.
- ``bilinear``: a plain bilinear resize (OpenCV ``INTER_LINEAR``) instead of the model's own
  interpolation, the model's own normalisation (a client that resizes that way).
- ``boxmot``: BoxMOT 25's ReID input (``boxmot/reid/core/crops.py``): the BGR crop resized with
  ``cv2.resize`` ``INTER_LINEAR``, BGR->RGB, ``/255``, ImageNet mean/std, in float32, mapped to the
  model's input by the per-channel affine that ``reid-export boxmot`` folds into its graph: what
  BoxMOT computes with that hand-off.
- ``boxmot-unfolded``: the same BoxMOT tensor fed to the model as it is: what BoxMOT computes with a
  model that expects another input (e.g. a plain ``reid-export onnx`` export, which normalises again).

Each variant changes only the geometry (letterbox or resize mode) or the normalisation and hands
the rest (colour order, pixel scale, mean/std, layout) to
:func:`reid_export.preprocess.preprocess_image`. DeepStream scales on the GPU (VPI or
NvBufSurfTransform); OpenCV's bilinear stands in for it here, so the figures measure the
letterbox and the normalisation, not the last rounding of the GPU scaler.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import cv2
import numpy as np

from .data_config import IMAGENET_MEAN, IMAGENET_STD, DataConfig
from .errors import ReidExportError
from .preprocess import ImageLike, preprocess_image, read_image

# NVIDIA's sample tracker configs give fast-reid-style ReID models this netScaleFactor (1/57.63).
NVIDIA_SAMPLE_NET_SCALE_FACTOR = 0.01735207


@dataclass(frozen=True)
class Deployment:
    name: str
    description: str
    letterbox: bool  # DeepStream keepAspc: 1
    resize: str  # the deployment's interpolation (a DataConfig interpolation name)
    scalar_normalisation: bool  # one netScaleFactor for all channels
    feeder: str | None = None  # a client that normalises its own way (FEEDERS); None: the model's own

    def preprocess(self, images: Sequence[ImageLike], data_config: DataConfig) -> np.ndarray:
        """A batch as this deployment feeds the model: float32 [N, 3, H, W] in the model's input units."""
        if len(images) == 0:
            raise ReidExportError("preprocess got no images")
        return np.stack([self.preprocess_image(image, data_config) for image in images])

    def _fed(self, image: ImageLike, data_config: DataConfig) -> np.ndarray:
        rgb = read_image(image) if not isinstance(image, np.ndarray) else image
        feeder = FEEDERS[self.feeder.removesuffix("-unfolded")]
        fed = feeder_tensor(rgb, feeder, data_config.input_size)
        if self.feeder.endswith("-unfolded"):
            return fed
        return apply_affine(fed, input_affine(data_config, feeder))

    def preprocess_image(self, image: ImageLike, data_config: DataConfig) -> np.ndarray:
        if self.feeder is not None:
            return self._fed(image, data_config)
        rgb = read_image(image) if not isinstance(image, np.ndarray) else image
        own = replace(data_config, interpolation=self.resize)
        if self.letterbox:
            if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
                raise ReidExportError(f"arrays given to preprocess must be RGB uint8 HxWx3, got {rgb.dtype} {rgb.shape}")
            rgb = letterbox(rgb, *data_config.input_size)  # already (H, W): the shared function does not resize
        if not self.scalar_normalisation:
            return preprocess_image(rgb, own)
        scalar = mean_std(data_config)
        approx = replace(own, std=(scalar,) * 3, normalized_inside=False)
        y = preprocess_image(rgb, approx)  # (x - mean) / mean(std): what DeepStream hands the network
        if data_config.normalized_inside:
            # the model normalises itself: give it the input whose normalisation is y (as if its
            # graph had no normalisation and DeepStream did it with the sample values)
            std = np.asarray(data_config.std, dtype=np.float32)[:, None, None]
            mean = np.asarray(data_config.mean, dtype=np.float32)[:, None, None]
            y = y * std + mean
        return np.ascontiguousarray(y, dtype=np.float32)


# --------------------------------------------------------------------------- clients that normalise themselves

# BoxMOT 25 (boxmot/reid/core/crops.py prepare_crop_batch, reid/backends/base_backend.py): cv2.resize
# INTER_LINEAR of the BGR uint8 crop, BGR->RGB, float32 / 255, minus ImageNet mean, over ImageNet std
# (no option turns it off). As a data config: what that client hands a model.
BOXMOT_INPUT = DataConfig(height=256, width=128, channel_order="rgb", pixel_scale=1.0, mean=IMAGENET_MEAN,
                          std=IMAGENET_STD, interpolation="linear", normalized_inside=False,
                          model_name="boxmot-input")
FEEDERS: dict[str, DataConfig] = {"boxmot": BOXMOT_INPUT}


@dataclass(frozen=True)
class Affine:
    """``model_input[:, m] = scale[m] * fed[:, src[m]] + bias[m]`` per channel m of the model's input."""
    scale: tuple[float, float, float]
    bias: tuple[float, float, float]
    swap: bool  # the model's channel m is the feeder's channel 2 - m (RGB <-> BGR)

    @property
    def identity(self) -> bool:
        return not self.swap and all(abs(a - 1.0) < 1e-12 for a in self.scale) and not any(self.bias)


def input_affine(model: DataConfig, feeder: DataConfig) -> Affine:
    """The per-channel map from what ``feeder`` hands over (its channel order, pixel scale and, when it
    normalises outside, its mean/std) to the input ``model``'s data config asks for (its channel order,
    pixel scale and, when its normalisation is outside the model, its mean/std)."""
    swap = feeder.channel_order != model.channel_order
    scale, bias = [], []
    for m in range(3):
        c = 2 - m if swap else m
        k = model.pixel_scale / feeder.pixel_scale  # feeder units -> model pixel units
        a, b = (feeder.std[c] * k, feeder.mean[c] * k) if not feeder.normalized_inside else (k, 0.0)
        if not model.normalized_inside:
            a, b = a / model.std[m], (b - model.mean[m]) / model.std[m]
        scale.append(float(a))
        bias.append(float(b))
    return Affine(tuple(scale), tuple(bias), swap)


def apply_affine(x: np.ndarray, affine: Affine) -> np.ndarray:
    """What a graph with the folded affine computes at its input (float32: a Gather, a Mul, an Add)."""
    if affine.identity:
        return x
    if affine.swap:
        x = x[..., ::-1, :, :] if x.ndim == 3 else x[:, ::-1]
    y = x * np.asarray(affine.scale, np.float32).reshape(3, 1, 1)
    y = y + np.asarray(affine.bias, np.float32).reshape(3, 1, 1)
    return np.ascontiguousarray(y, dtype=np.float32)


def feeder_tensor(rgb: np.ndarray, feeder: DataConfig, size: tuple[int, int]) -> np.ndarray:
    """The float32 CHW tensor ``feeder`` builds from an RGB uint8 crop at the model's input ``size``:
    the one preprocessing function with the feeder's convention (BoxMOT: OpenCV linear resize, RGB,
    /255, ImageNet mean/std outside; its own op order differs from ours by float rounding only)."""
    return preprocess_image(rgb, replace(feeder, height=size[0], width=size[1]))


def mean_std(data_config: DataConfig) -> float:
    """The one std NVIDIA's approximation uses: the mean of the three, in the model's input units."""
    return float(np.mean(data_config.std))


def net_scale_factor(data_config: DataConfig) -> float:
    """DeepStream's netScaleFactor for the scalar approximation (input 0..255): 1 / mean(std) in
    pixel units; 0.0173520736 for fast-reid's std, which NVIDIA's samples round to 0.01735207."""
    return 1.0 / (mean_std(data_config) * 255.0 / data_config.pixel_scale)


def letterbox(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """DeepStream's ``keepAspc: 1``: scale by one factor to fit (height, width), bilinear, the
    image at the top left, black (0) padding on the right or bottom."""
    src_h, src_w = rgb.shape[:2]
    scale = min(width / src_w, height / src_h)
    new_w = max(1, min(width, int(round(src_w * scale))))
    new_h = max(1, min(height, int(round(src_h * scale))))
    resized = rgb if (new_h, new_w) == (src_h, src_w) else cv2.resize(rgb, (new_w, new_h),
                                                                       interpolation=cv2.INTER_LINEAR)
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    canvas[:new_h, :new_w] = resized
    return canvas


DEPLOYMENTS: dict[str, Deployment] = {d.name: d for d in (
    Deployment("deepstream", "DeepStream ReID, NVIDIA's sample preprocessing: keepAspc 1 letterbox (bilinear), "
               "offsets = mean, netScaleFactor = 1/mean(std)", letterbox=True, resize="linear",
               scalar_normalisation=True),
    Deployment("deepstream-folded", "DeepStream ReID with reid-export deepstream's folded ONNX: keepAspc 1 "
               "letterbox (bilinear), exact per-channel normalisation", letterbox=True, resize="linear",
               scalar_normalisation=False),
    Deployment("deepstream-stretch", "DeepStream ReID, keepAspc 0 (stretched, bilinear), netScaleFactor = "
               "1/mean(std)", letterbox=False, resize="linear", scalar_normalisation=True),
    Deployment("bilinear", "a plain bilinear resize (OpenCV INTER_LINEAR), the model's own normalisation",
               letterbox=False, resize="linear", scalar_normalisation=False),
    Deployment("boxmot", "BoxMOT ReID with reid-export boxmot's hand-off: cv2 INTER_LINEAR resize, /255, ImageNet "
               "mean/std outside, mapped back inside the graph", letterbox=False, resize="linear",
               scalar_normalisation=False, feeder="boxmot"),
    Deployment("boxmot-unfolded", "BoxMOT ReID with the model as it is (no hand-off): BoxMOT's ImageNet-normalised "
               "input fed straight in (a model that normalises inside normalises twice)", letterbox=False,
               resize="linear", scalar_normalisation=False, feeder="boxmot-unfolded"),
)}


def get_deployment(name: str) -> Deployment:
    try:
        return DEPLOYMENTS[name]
    except KeyError:
        raise ReidExportError(f"unknown deployment {name!r}; choose one of {', '.join(DEPLOYMENTS)}",
                              exit_code=2) from None
