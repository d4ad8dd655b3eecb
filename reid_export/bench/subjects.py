"""Benchmark subjects made from model files through the one Encoder interface."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import ReidExportError
from ..runtime import model_name, open_encoder, preprocess
from ..runtime.encoder import Encoder
from .core import CpuTimer, CudaEventTimer, Subject
from .memory import rss_mib

VARIANTS = {"fp16": True, "half": True, "fp32": False}


def parse_model_spec(spec: str | Path) -> tuple[Path, bool]:
    """``model.pth`` or ``model.pth@fp16`` (a checkpoint run in torch half precision) -> (path, half)."""
    text = str(spec)
    path = Path(text)
    if "@" in text and not path.exists():
        base, _, variant = text.rpartition("@")
        if variant.lower() in VARIANTS and base:
            return Path(base), VARIANTS[variant.lower()]
    return path, False


class InputCache:
    """Model inputs generated once per (data config, batch size), shared by models that agree.

    Tensor inputs are random RGB uint8 crops put through :func:`preprocess`, so each model gets
    exactly the value range and layout its data config asks for.
    """

    def __init__(self, seed: int = 0):
        self.seed = seed
        self._cache: dict[tuple, np.ndarray] = {}

    def tensors(self, data_config, batch_size: int) -> np.ndarray:
        key = (data_config.to_json(), batch_size)
        if key not in self._cache:
            self._cache = {k: v for k, v in self._cache.items() if k[1] == batch_size}  # drop other sizes
            rng = np.random.default_rng(self.seed)
            height, width = data_config.input_size
            crops = [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(batch_size)]
            self._cache[key] = preprocess(crops, data_config)
        return self._cache[key]


def _label(path: "Path | Encoder", half: bool) -> str:
    return Path(model_name(path)).name + ("@fp16" if half else "")


def open_subjects(specs: Sequence[str | Path], device: str = "cpu", threads: int | None = None,
                  config: str | Path | None = None, images: Sequence[Path] | None = None,
                  include_preprocess: bool = False,
                  inputs: InputCache | None = None) -> tuple[list[Subject], list[Encoder]]:
    """Open every model first (so a bad one fails before any timing), one subject each."""
    if include_preprocess and not images:
        raise ReidExportError("`include_preprocess` times decoding real files: give them with `images`", exit_code=2)
    inputs = inputs or InputCache()
    parsed = [(s, False) if isinstance(s, Encoder) else parse_model_spec(s) for s in specs]  # an open encoder as it is
    labels = [_label(p, h) for p, h in parsed]
    if len(set(labels)) < len(labels):  # same file name in two folders: show the paths
        labels = [model_name(p) + ("@fp16" if h else "") for p, h in parsed]
    if len(set(labels)) < len(labels):
        dup = next(label for label in labels if labels.count(label) > 1)
        raise ReidExportError(f"{dup}: given twice; each model is benchmarked once per run", exit_code=2)
    use_cuda_timer = False
    if device.startswith("cuda"):
        try:
            import torch

            use_cuda_timer = torch.cuda.is_available()
        except ImportError:
            pass
    subjects, encoders = [], []
    try:
        from ..runtime.encoder import configs_for

        for (path, half), label, model_config in zip(parsed, labels, configs_for([p for p, _ in parsed], config)):
            before = rss_mib()
            encoder = _open(path, model_config, device, threads, half)
            encoders.append(encoder)
            after = rss_mib()
            subjects.append(encoder_subject(encoder, label, inputs, images if include_preprocess else None,
                                            CudaEventTimer() if use_cuda_timer else CpuTimer(),
                                            None if before is None or after is None else after - before))
    except BaseException:
        for encoder in encoders:
            encoder.close()
        raise
    return subjects, encoders


def _open(path: Path, config, device: str, threads: int | None, half: bool) -> Encoder:
    options = {"threads": threads}
    if half:
        options["half"] = True
    try:
        return open_encoder(path, config=config, device=device, **options)
    except ReidExportError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure to open is the user's file problem, said in one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ReidExportError(f"{path}: cannot be opened as a model ({type(exc).__name__}: {first[:300]})") from None


def encoder_subject(encoder: Encoder, label: str, inputs: InputCache, images: Sequence[Path] | None, timer,
                    rss_open: float | None = None) -> Subject:
    """A subject that times ``encoder(batch)`` (host arrays in and out), or decode + encode with ``images``."""
    data_config = encoder.data_config
    info = {"rss_open_mib": rss_open, "input": "files (decode + resize timed)" if images else "preprocessed tensor",
            "input_size": list(data_config.input_size)}
    if encoder.backend == "openvino":  # which arithmetic OpenVINO compiled it for (f32 / bf16)
        described = encoder.describe()
        info.update({k: described.get(k) for k in ("graph_precision", "inference_precision",
                                                    "compiled_inference_precision", "compiled_threads")})
    if images:
        def make_input(batch_size: int, _images=list(images)):
            return [_images[i % len(_images)] for i in range(batch_size)]

        def run(paths, _enc=encoder, _dc=data_config):
            return _enc(preprocess(paths, _dc))
    else:
        def make_input(batch_size: int, _dc=data_config):
            return inputs.tensors(_dc, batch_size)

        run = encoder
    return Subject(name=label, run=run, make_input=make_input, backend=encoder.backend,
                   precision=encoder.precision, device=encoder.device, model=str(encoder.path), timer=timer,
                   info=info)
