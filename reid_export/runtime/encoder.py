"""One Encoder interface over every backend, chosen from the model file's suffix.

``open_encoder(path, ...)`` returns an :class:`Encoder`: ``encoder.data_config`` says how to
preprocess, ``encoder(batch)`` maps a float32 [N, 3, H, W] batch to float32 [N, D] features, and
``encoder.encode_files(paths)`` does decode + preprocess + batching + optional flip test.
Backends register themselves by suffix (``.pth/.pt`` torch, ``.onnx`` ONNX Runtime,
``.engine/.plan`` TensorRT, ``.xml`` OpenVINO; ``.onnx`` with ``--device openvino`` OpenVINO too)
and are imported only when a file of theirs is opened.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from tqdm import tqdm

from ..data_config import DataConfig
from ..errors import ReidExportError
from ..preprocess import ON_ERROR, ImageLike, UnreadableImage, preprocess, read_images, skipped_summary


@dataclass
class EncodedFiles:
    """What :meth:`Encoder.encode_paths` returns: features of the images that were read, which ones they are,
    and why the others were left out (nothing is left out with ``on_error="raise"``)."""

    features: np.ndarray
    kept: list[int]  # indices, in the order given, of the images whose rows ``features`` holds
    skipped: list[UnreadableImage] = field(default_factory=list)

    def summary(self) -> str:
        """One line for the user, empty when nothing was skipped."""
        return skipped_summary(self.skipped) if self.skipped else ""


class Encoder(ABC):
    """A model that turns preprocessed image batches into embeddings."""

    backend: str = "?"
    precision: str = "fp32"
    path: Path
    data_config: DataConfig
    device: str = "cpu"
    # A deployment's preprocessing (reid_export.deploy_preprocess), same signature as
    # ``preprocess``; None: the model's own. ``encode_files`` uses it for every batch.
    preprocessing: Callable[[Sequence[ImageLike], DataConfig], np.ndarray] | None = None

    @abstractmethod
    def forward(self, batch: np.ndarray) -> np.ndarray:
        """float32 [N, 3, H, W] -> float32 [N, D]; N within what the backend accepts."""

    @property
    def max_batch(self) -> int | None:
        """Largest batch the backend takes in one call (None: any)."""
        return None

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        expected = (3, *self.data_config.input_size)
        if batch.ndim != 4 or tuple(batch.shape[1:]) != expected:
            raise ReidExportError(
                f"{self.path}: input batch has shape {tuple(batch.shape)}, the model expects [N, {', '.join(map(str, expected))}]"
            )
        if batch.shape[0] == 0:
            raise ReidExportError(f"{self.path}: empty batch")
        limit = self.max_batch
        if limit is None or batch.shape[0] <= limit:
            return np.asarray(self.forward(batch), dtype=np.float32)
        return np.concatenate([np.asarray(self.forward(batch[i:i + limit]), dtype=np.float32)
                               for i in range(0, batch.shape[0], limit)])

    def encode_batch(self, batch: np.ndarray, flip_test: bool = False) -> np.ndarray:
        """Features of a preprocessed batch; with ``flip_test`` the mean of it and its mirror (fast-reid)."""
        feats = self(batch)
        if flip_test:
            feats = (feats + self(batch[..., ::-1])) / 2.0
        return feats

    def encode_files(self, images: Sequence[ImageLike], batch_size: int = 32, flip_test: bool = False,
                     progress: bool = True, desc: str | None = None) -> np.ndarray:
        """Decode, preprocess and encode ``images`` in order: float32 [len(images), D]; an image that
        cannot be read stops it with one line."""
        return self.encode_paths(images, batch_size, flip_test, progress, desc).features

    def encode_paths(self, images: Sequence[ImageLike], batch_size: int = 32, flip_test: bool = False,
                     progress: bool = True, desc: str | None = None, on_error: str = "raise") -> EncodedFiles:
        """Decode, preprocess and encode ``images`` in order, as an :class:`EncodedFiles`.

        With ``on_error="skip"`` an image that cannot be read is left out instead of stopping the
        run: the result holds the features of the images kept, their indices in ``images`` and why
        the others were skipped (``.summary()`` says it in one line).
        """
        if batch_size < 1:
            raise ReidExportError(f"batch size must be >= 1, got {batch_size}", exit_code=2)
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        if len(images) == 0:
            raise ReidExportError("no images to encode")
        starts = range(0, len(images), batch_size)
        out, kept, skipped = [], [], []
        bar = tqdm(total=len(images), desc=desc or f"encode ({self.backend})", unit="img",
                   disable=not progress, leave=False)

        def prepare(start: int):
            arrays, chunk_kept, errors = read_images(images[start:start + batch_size], on_error)
            batch = (self.preprocessing or preprocess)(arrays, self.data_config) if arrays else None
            return batch, [start + i for i in chunk_kept], errors

        # Decode the next batch on a worker thread while the model runs on this one.
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(prepare, starts[0])
            for i in range(len(starts)):
                batch, chunk_kept, errors = pending.result()
                if i + 1 < len(starts):
                    pending = pool.submit(prepare, starts[i + 1])
                if batch is not None:
                    out.append(self.encode_batch(batch, flip_test))
                kept.extend(chunk_kept)
                skipped.extend(errors)
                bar.update(len(chunk_kept) + len(errors))
        bar.close()
        if not out:
            raise ReidExportError(f"none of the {len(images)} images could be read; "
                                  f"{skipped_summary(skipped)}")
        return EncodedFiles(np.concatenate(out), kept, skipped)

    def describe(self) -> dict:
        return {"model": str(self.path), "backend": self.backend, "precision": self.precision,
                "device": self.device, "data_config": self.data_config.to_dict()}

    def close(self) -> None:
        """Release backend resources (sessions, engines)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class BorrowedEncoder(Encoder):
    """A caller's open :class:`Encoder` handed to a call (``parity``, ``evaluate``, ``bench``): the call
    uses it, may set its own preprocessing on this view, and leaves it open (``close`` does nothing)."""

    def __init__(self, inner: Encoder):
        self.inner = inner
        self.backend, self.precision, self.path = inner.backend, inner.precision, Path(inner.path)
        self.data_config, self.device, self.preprocessing = inner.data_config, inner.device, inner.preprocessing

    def forward(self, batch: np.ndarray) -> np.ndarray:
        return self.inner.forward(batch)

    @property
    def max_batch(self) -> int | None:
        return self.inner.max_batch

    def describe(self) -> dict:
        return self.inner.describe()

    def close(self) -> None:
        """The caller's encoder stays open."""


def model_name(model: "str | Path | Encoder") -> str:
    """How a model given as a path, a ``path@device`` spec or an open :class:`Encoder` is named in reports."""
    return str(model.path) if isinstance(model, Encoder) else str(model)


# suffix -> "module:function" of a factory(path, **options) -> Encoder
_REGISTRY: dict[str, str] = {}


def register_backend(suffixes: Sequence[str], factory: str) -> None:
    for suffix in suffixes:
        _REGISTRY[suffix.lower()] = factory


register_backend([".pth", ".pt", ".pkl"], "reid_export.runtime.torch_backend:open_torch")
register_backend([".onnx"], "reid_export.runtime.onnx_backend:open_onnx")
register_backend([".engine", ".plan"], "reid_export.runtime.trt_backend:open_tensorrt")
register_backend([".xml"], "reid_export.runtime.openvino_backend:open_openvino")
# ``--device openvino[:f32|bf16]`` runs these with OpenVINO whatever their suffix's own backend is
OPENVINO_FACTORY = "reid_export.runtime.openvino_backend:open_openvino"
OPENVINO_SUFFIXES = (".onnx", ".xml")


def split_model_spec(path: str | Path) -> tuple[Path, str | None]:
    """``model.onnx@openvino`` / ``model.xml@openvino:bf16`` -> (the file, that device); else (path, None).

    A per-model device, so one parity/eval/bench run can compare ONNX Runtime and OpenVINO
    routes of the same file side by side. A file whose real name holds ``@`` is taken as it is.
    """
    text = str(path)
    if "@" in text and not Path(text).exists():
        base, _, variant = text.rpartition("@")
        if base and variant.lower().partition(":")[0] in ("openvino", "ov"):
            return Path(base), variant.lower()
    return Path(path), None


CHECKPOINT_SUFFIXES = (".pth", ".pt", ".pkl")


def configs_for(paths: Sequence[str | Path], config):
    """The ``--config`` of each model of a multi-model command (parity, eval, bench).

    It configures the checkpoints among them (a torchreid state dict holds no config); an ONNX model
    or engine beside them carries its own data config and gets None. With no checkpoint among them
    every model gets it, so a backend that takes no config says so.
    """
    paths = list(paths)
    is_ckpt = [not isinstance(p, Encoder) and split_model_spec(p)[0].suffix.lower() in CHECKPOINT_SUFFIXES
               for p in paths]
    if config is None or not any(is_ckpt):
        return [config] * len(paths)
    return [config if c else None for c in is_ckpt]


def backend_for(path: str | Path, device: str = "cpu") -> Callable[..., Encoder]:
    suffix = Path(path).suffix.lower()
    if str(device).lower().partition(":")[0] in ("openvino", "ov"):
        if suffix not in OPENVINO_SUFFIXES:
            raise ReidExportError(f"{path}: `device` {device} runs OpenVINO IR (.xml) and ONNX (.onnx) models, "
                                  f"not {suffix or 'files without a suffix'}", exit_code=2)
        spec = OPENVINO_FACTORY
    elif suffix not in _REGISTRY:
        raise ReidExportError(
            f"{path}: unknown model type {suffix or '(no suffix)'}; expected one of {', '.join(sorted(_REGISTRY))}"
        )
    else:
        spec = _REGISTRY[suffix]
    module_name, func = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("reid_export"):
            raise ReidExportError(f"{path}: the {suffix} backend is not available in this version") from None
        raise
    return getattr(module, func)


def open_encoder(path: "str | Path | Encoder", config: str | Path | None = None, opts: Sequence[str] = (),
                 device: str = "cpu", **options) -> Encoder:
    """Open any model file as an :class:`Encoder` (backend chosen from the suffix, or OpenVINO for
    ``--device openvino`` / a ``model.onnx@openvino`` spec). An open :class:`Encoder` is used as it is
    (a :class:`BorrowedEncoder`: closing it leaves the caller's open)."""
    if isinstance(path, Encoder):
        return BorrowedEncoder(path)
    path, spec_device = split_model_spec(path)
    device = spec_device or device
    return backend_for(path, device)(path, config=config, opts=opts, device=device, **options)
