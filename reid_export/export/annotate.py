"""Give an ONNX model from elsewhere (torchreid, a vendor) the data config every command reads.

The model is run once on a batch of the stated size before anything is written, so a wrong
``--input-size`` fails here rather than at the first real batch, and the feature dimension is
recorded from what the model actually returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..console import say
from ..data_config import DataConfig
from ..errors import ReidExportError, UsageError
from ..fileio import check_output_path, sha256_file
from .graph import ensure_node_names
from .metadata import (KEY_ANNOTATED, KEY_SOURCE, KEY_SOURCE_SHA256, base_metadata, input_info,
                       model_precision, load_onnx, read_data_config, save_onnx, set_metadata)


def check_units(config: DataConfig) -> None:
    """Catch mean/std given in the other pixel scale (0..255 values with --pixel-scale 1, or vice versa)."""
    if config.normalized_inside:
        return  # the model normalises itself: mean/std are recorded for reference only
    values = list(config.mean) + list(config.std)
    if config.pixel_scale == 1.0 and max(abs(v) for v in values) > 2.0:
        raise UsageError(f"`data_config.mean` {','.join(f'{v:g}' for v in config.mean)} / `data_config.std` "
                         "look like 0..255 values but `data_config.pixel_scale` is 1 (input 0..1); divide them by 255 or use "
                         "`data_config.pixel_scale` 255")
    if (config.pixel_scale == 255.0 and max(abs(v) for v in config.mean) <= 1.0 and max(config.std) <= 1.0
            and any(config.mean)):
        raise UsageError(f"`data_config.mean` {','.join(f'{v:g}' for v in config.mean)} / `data_config.std` "
                         "look like 0..1 values but `data_config.pixel_scale` is 255 (input 0..255); multiply them by 255 or use "
                         "`data_config.pixel_scale` 1")


@dataclass
class AnnotateReport:
    output: Path
    data_config: DataConfig
    replaced: bool
    precision: str


def annotate_file(model_path: str | Path, output: str | Path, data_config: DataConfig,
                  log: Callable[[str], None] = say) -> AnnotateReport:
    from .ort import make_session

    output = check_output_path(output)
    model = load_onnx(model_path)
    check_units(data_config)
    _, shape, _ = input_info(model)
    if len(shape) != 4:
        raise ReidExportError(f"{model_path}: the model input has shape {shape}; expected [N, 3, H, W] images")
    if isinstance(shape[1], int) and shape[1] != 3:
        raise ReidExportError(f"{model_path}: the model input has {shape[1]} channels; expected 3 (an image)")
    for axis, want in ((2, data_config.height), (3, data_config.width)):
        if isinstance(shape[axis], int) and shape[axis] > 0 and shape[axis] != want:
            raise UsageError(f"`data_config.input_size` {data_config.height} {data_config.width} does not match "
                             f"the model input {shape}; use `data_config.input_size` {shape[2]} {shape[3]}")
    previous = read_data_config(model, str(model_path))
    ensure_node_names(model)

    # Run it once: proves the input size works and measures the feature dimension.
    batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else 1
    session = make_session(model.SerializeToString())
    inp = session.get_inputs()[0]
    dtype = np.float16 if inp.type == "tensor(float16)" else np.float32
    dummy = np.zeros((batch, 3, data_config.height, data_config.width), dtype=dtype)
    try:
        out = session.run(None, {inp.name: dummy})[0]
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ReidExportError(f"{model_path}: the model does not run on a [{batch}, 3, {data_config.height}, "
                              f"{data_config.width}] input ({first[:200]}); check `data_config.input_size`") from None
    features = out.reshape(out.shape[0], -1)
    data_config.feat_dim = int(features.shape[1])
    if not data_config.model_name:
        data_config.model_name = Path(model_path).stem
    precision = model_precision(model)
    entries = base_metadata(data_config, precision)
    entries.update({KEY_ANNOTATED: "true", KEY_SOURCE: Path(model_path).name,
                    KEY_SOURCE_SHA256: sha256_file(model_path)})
    set_metadata(model, entries)
    save_onnx(model, output)
    if previous is not None:
        log(f"note: replaced the data config that {model_path} already had")
    return AnnotateReport(output, data_config, previous is not None, precision)
