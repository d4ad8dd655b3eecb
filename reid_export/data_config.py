"""The data config that travels with a model (timm's pretrained_cfg, for ReID).

It says how pixels become the model's input: the input size, channel order, pixel scale,
mean/std, the resize interpolation (OpenCV ``cubic``/``linear``/... or Pillow ``pil-bilinear``/
``pil-bicubic``/...), and whether the normalisation is inside the graph. It is
stored in our checkpoints, in ONNX ``metadata_props`` and beside TensorRT engines; every backend
reads it, so a user never types preprocessing twice.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields

from .errors import ReidExportError

FASTREID_MEAN = (123.675, 116.28, 103.53)
FASTREID_STD = (58.395, 57.12, 57.375)
# ImageNet mean/std in 0..1 units, RGB: what torchreid and BoxMOT subtract and divide by outside the model
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENCV_INTERPOLATIONS = ("cubic", "linear", "nearest", "area", "lanczos")
# Pillow's Image.resize filters (antialiased when shrinking: the filter support grows with the
# scale): torchreid's test transform is pil-bilinear, fast-reid's evaluation transform pil-bicubic.
PIL_INTERPOLATIONS = ("pil-bilinear", "pil-bicubic", "pil-nearest", "pil-lanczos", "pil-box", "pil-hamming")
INTERPOLATIONS = OPENCV_INTERPOLATIONS + PIL_INTERPOLATIONS
# INPUT.INTERPOLATION left unset: reid-train trains (and evaluates) with OpenCV cubic, fast-reid's
# demo/deployment resize; a fast-reid checkpoint is evaluated with Pillow bicubic, the resize fast-reid
# trained it with and evaluates it with (measured: benchmarks/RESULTS.md, "fast-reid's two resizes").
TRAIN_INTERPOLATION = "cubic"
FASTREID_INTERPOLATION = "pil-bicubic"
SCHEMA_VERSION = 1


@dataclass
class DataConfig:
    """How to turn an image file into the model's float32 NCHW input.

    ``pixel_scale`` is the value of a white pixel at the input (255: 0..255 input, 1: 0..1).
    ``mean``/``std`` are in the units of that scaled input, RGB/BGR as ``channel_order``.
    With ``normalized_inside`` the model subtracts mean and divides by std itself and the
    preprocessing stops after scaling; without it, the preprocessing normalises.
    """

    height: int = 256
    width: int = 128
    channel_order: str = "rgb"
    pixel_scale: float = 255.0
    mean: tuple[float, float, float] = FASTREID_MEAN
    std: tuple[float, float, float] = FASTREID_STD
    interpolation: str = "cubic"
    normalized_inside: bool = True
    feat_dim: int | None = None
    model_name: str = ""
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        problems = []
        if not (isinstance(self.height, int) and isinstance(self.width, int)) or self.height < 1 or self.width < 1:
            problems.append(f"input size must be two positive integers, got {self.height}x{self.width}")
        if self.channel_order not in ("rgb", "bgr"):
            problems.append(f"channel_order must be rgb or bgr, got {self.channel_order!r}")
        if self.pixel_scale not in (1.0, 255.0):
            problems.append(f"pixel_scale must be 255 or 1, got {self.pixel_scale}")
        if self.interpolation not in INTERPOLATIONS:
            problems.append(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if len(value) != 3:
                problems.append(f"{name} needs 3 values, got {len(value)}")
        if len(self.std) == 3 and any(float(s) <= 0 for s in self.std):
            problems.append(f"std values must be > 0, got {list(self.std)}")
        if problems:
            raise ReidExportError("invalid data config: " + "; ".join(problems))
        self.mean = tuple(float(m) for m in self.mean)
        self.std = tuple(float(s) for s in self.std)
        self.pixel_scale = float(self.pixel_scale)

    @property
    def input_size(self) -> tuple[int, int]:
        return (self.height, self.width)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["mean"] = list(self.mean)
        out["std"] = list(self.std)
        out["schema"] = SCHEMA_VERSION
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict, source: str = "data config") -> "DataConfig":
        if not isinstance(data, dict):
            raise ReidExportError(f"{source}: data config must be a JSON object")
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        missing = {"height", "width"} - kwargs.keys()
        if missing:
            raise ReidExportError(f"{source}: data config lacks {', '.join(sorted(missing))}")
        try:
            return cls(**kwargs)
        except ReidExportError as exc:
            raise ReidExportError(f"{source}: {exc}") from None
        except (TypeError, ValueError) as exc:
            raise ReidExportError(f"{source}: malformed data config ({exc})") from None

    @classmethod
    def from_json(cls, text: str, source: str = "data config") -> "DataConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            raise ReidExportError(f"{source}: data config is not valid JSON") from None
        return cls.from_dict(data, source)


def data_config_from_cfg(cfg, feat_dim: int | None = None, model_name: str = "") -> DataConfig:
    """The data config of a model built from a fast-reid config (normalisation inside the model)."""
    height, width = (int(v) for v in cfg.INPUT.SIZE_TEST)
    return DataConfig(
        height=height,
        width=width,
        channel_order="rgb",
        pixel_scale=255.0,
        mean=tuple(cfg.MODEL.PIXEL_MEAN),
        std=tuple(cfg.MODEL.PIXEL_STD),
        interpolation=cfg.INPUT.get("INTERPOLATION") or TRAIN_INTERPOLATION,
        normalized_inside=True,
        feat_dim=feat_dim,
        model_name=model_name,
    )
