"""The one preprocessing function: image file -> float32 NCHW batch, per the model's data config.

fast-reid's convention (its demo predictor): OpenCV decode (BGR uint8) -> RGB -> resize the
uint8 image to (H, W) with bicubic interpolation -> float32 0..255, mean/std inside the model.
The ``pil-*`` interpolations resize with Pillow's ``Image.resize`` instead (what torchvision's
``T.Resize`` does on a PIL image: torchreid's and fast-reid's evaluation transforms), which
antialiases when shrinking; OpenCV's modes do not.
Extraction, calibration, evaluation and benchmarks all call :func:`preprocess`; nothing else
turns pixels into model input.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence, Union

import cv2
import numpy as np

from .data_config import DataConfig
from .errors import ReidExportError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
_CV2_INTERP = {
    "cubic": cv2.INTER_CUBIC,
    "linear": cv2.INTER_LINEAR,
    "nearest": cv2.INTER_NEAREST,
    "area": cv2.INTER_AREA,
    "lanczos": cv2.INTER_LANCZOS4,
}

_PIL_FILTERS = {  # names of PIL.Image.Resampling members
    "pil-bilinear": "BILINEAR",
    "pil-bicubic": "BICUBIC",
    "pil-nearest": "NEAREST",
    "pil-lanczos": "LANCZOS",
    "pil-box": "BOX",
    "pil-hamming": "HAMMING",
}

ImageLike = Union[str, os.PathLike, np.ndarray]
ON_ERROR = ("raise", "skip")


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def list_images(folder: str | os.PathLike) -> list[Path]:
    """The image files directly in ``folder`` (any of IMAGE_SUFFIXES, any case), sorted by name.

    The one image walker: ``extract dir/``, ``eval``'s dataset splits, calibration and the trainer all list
    folders with it, so every command reads the same files from the same folder.
    """
    folder = Path(folder)
    return sorted((p for p in folder.iterdir() if p.is_file() and is_image_file(p)), key=lambda p: p.name)


def expand_image_paths(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Files as given, folders expanded to their images sorted by name (not recursive)."""
    out: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = list_images(path)
            if not found:
                raise ReidExportError(
                    f"{path}: folder holds no images ({', '.join(IMAGE_SUFFIXES)}); point at a folder of image crops"
                )
            out.extend(found)
        elif path.exists():
            out.append(path)
        else:
            raise ReidExportError(f"{path}: image or folder not found; check the path")
    if not out:
        raise ReidExportError("no images given; pass image files or folders")
    return out


def display_path(path: str | os.PathLike) -> str:
    """A path for messages: bytes that are not UTF-8 (a name from another system) shown as \\xNN."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


class UnreadableImage(ReidExportError):
    """An image file that cannot be read or decoded; ``path`` and ``reason`` feed the skip report."""

    def __init__(self, path: str | os.PathLike, reason: str, fix: str = "remove it from the input"):
        self.path, self.reason, self.fix = path, reason, fix
        super().__init__(f"{display_path(path)}: {reason}; {fix}")


def read_image(path: str | os.PathLike) -> np.ndarray:
    """RGB uint8 HxWx3. Grayscale, RGBA and 16-bit images are converted; a bad file is an error."""
    path = Path(path)
    if path.is_dir():
        raise UnreadableImage(path, "is a directory, expected an image file", "give image files or folders of them")
    try:
        data = np.fromfile(str(path), dtype=np.uint8)  # works for any file name, unlike cv2.imread
    except OSError as exc:
        raise UnreadableImage(path, f"cannot read image ({exc.strerror or exc})", "check the file") from None
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if image is None:
        raise UnreadableImage(path, "not a decodable image (corrupt or not an image)")
    try:
        return to_rgb_uint8(image, source=display_path(path))
    except ReidExportError as exc:
        raise UnreadableImage(path, str(exc).split(": ", 1)[-1]) from None


def read_images(images: Sequence[ImageLike], on_error: str = "raise"
                ) -> tuple[list[np.ndarray], list[int], list[UnreadableImage]]:
    """Decode ``images`` (paths or RGB arrays): (arrays, indices of the images kept, errors).

    ``on_error="raise"`` stops at the first unreadable image; ``"skip"`` leaves it out and
    records why (the one mechanism behind every command's ``--skip-bad-images``).
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    arrays, kept, errors = [], [], []
    for index, image in enumerate(images):
        if isinstance(image, np.ndarray):
            arrays.append(image)
            kept.append(index)
            continue
        try:
            arrays.append(read_image(image))
        except UnreadableImage as exc:
            if on_error == "raise":
                raise
            errors.append(exc)
            continue
        kept.append(index)
    return arrays, kept, errors


def skipped_summary(errors: Sequence[UnreadableImage]) -> str:
    """``skipped 2 unreadable images: first crops/bad.jpg (not a decodable image ...)``."""
    first = errors[0]
    noun = "image" if len(errors) == 1 else "images"
    return f"skipped {len(errors)} unreadable {noun}: first {display_path(first.path)} ({first.reason})"


def to_rgb_uint8(image: np.ndarray, source: str = "image") -> np.ndarray:
    """An OpenCV-decoded array (BGR/BGRA/gray, 8 or 16 bit) as RGB uint8."""
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise ReidExportError(f"{source}: unsupported pixel type {image.dtype}")
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.ndim == 3 and image.shape[2] == 1:
        return cv2.cvtColor(image[:, :, 0], cv2.COLOR_GRAY2RGB)
    if image.ndim == 3 and image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    if image.ndim == 3 and image.shape[2] == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    raise ReidExportError(f"{source}: unsupported image shape {image.shape}")


def _pil_image():
    try:
        from PIL import Image
    except ImportError:
        raise ReidExportError("the pil-* interpolations need Pillow: pip install pillow "
                              "(or use an OpenCV interpolation: cubic, linear, ...)") from None
    return Image


def resize_rgb(rgb: np.ndarray, height: int, width: int, interpolation: str) -> np.ndarray:
    """Resize an RGB uint8 image to (height, width) with OpenCV or, for ``pil-*``, Pillow."""
    if interpolation in _PIL_FILTERS:
        image = _pil_image()
        resample = getattr(image.Resampling, _PIL_FILTERS[interpolation])
        return np.asarray(image.fromarray(np.ascontiguousarray(rgb)).resize((width, height), resample=resample))
    return cv2.resize(rgb, (width, height), interpolation=_CV2_INTERP[interpolation])


def preprocess_image(image: ImageLike, data_config: DataConfig) -> np.ndarray:
    """One image (a path, or an RGB uint8 HxWx3 array) -> float32 [3, H, W]."""
    rgb = read_image(image) if not isinstance(image, np.ndarray) else image
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ReidExportError(f"arrays given to preprocess must be RGB uint8 HxWx3, got {rgb.dtype} {rgb.shape}")
    height, width = data_config.input_size
    if rgb.shape[:2] != (height, width):
        rgb = resize_rgb(rgb, height, width, data_config.interpolation)
    if data_config.channel_order == "bgr":
        rgb = rgb[:, :, ::-1]
    x = rgb.astype(np.float32)
    if data_config.pixel_scale != 255.0:
        x *= np.float32(data_config.pixel_scale / 255.0)
    if not data_config.normalized_inside:
        x -= np.asarray(data_config.mean, dtype=np.float32)
        x /= np.asarray(data_config.std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def preprocess(images: Sequence[ImageLike], data_config: DataConfig) -> np.ndarray:
    """A batch of images -> float32 [N, 3, H, W] for a model with this data config."""
    if len(images) == 0:
        raise ReidExportError("preprocess got no images")
    return np.stack([preprocess_image(image, data_config) for image in images])
