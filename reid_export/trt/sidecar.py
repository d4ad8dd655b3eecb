"""``model.engine.json``: what an engine needs beside it to be used and trusted.

A TensorRT engine is tied to the TensorRT version and GPU architecture it was built for, and it
carries no preprocessing information. The sidecar records the data config, precision, TensorRT
version, GPU name and compute capability, the optimization profile, the ONNX's sha256 and the
build options; the runner refuses an engine whose sidecar does not match the running system.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from .. import __version__
from ..data_config import DataConfig
from ..errors import ReidExportError
from ..fileio import atomic_write_json

FORMAT = "reid-export-engine/1"


def sidecar_path(engine_path: str | Path) -> Path:
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + ".json")


def make_sidecar(data_config: DataConfig, precision: str, trt_version: str, gpu_name: str,
                 compute_capability: str, profile: dict, onnx_path: str, onnx_sha256: str,
                 build_options: dict, input_name: str, output_name: str) -> dict:
    return {
        "format": FORMAT,
        "tool": f"reid-export {__version__}",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "data_config": data_config.to_dict(),
        "precision": precision,
        "tensorrt_version": trt_version,
        "gpu_name": gpu_name,
        "compute_capability": compute_capability,
        "profiles": [{"input": input_name, "min": profile["min"], "opt": profile["opt"], "max": profile["max"]}],
        "static_batch": bool(profile.get("static")),
        "input_name": input_name,
        "output_name": output_name,
        "onnx": str(onnx_path),
        "onnx_sha256": onnx_sha256,
        "build_options": build_options,
    }


def write_sidecar(engine_path: str | Path, info: dict) -> Path:
    return atomic_write_json(sidecar_path(engine_path), info)


def read_sidecar(engine_path: str | Path) -> dict:
    """The sidecar of ``engine_path``, validated, or one clear error."""
    path = sidecar_path(engine_path)
    if not path.exists():
        raise ReidExportError(f"{engine_path}: no {path.name} beside it (data config, TensorRT version); "
                              "build engines with `reid-export trt`, which writes it")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ReidExportError(f"{path}: not valid JSON; rebuild the engine with `reid-export trt`") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise ReidExportError(f"{path}: not a reid-export engine sidecar (format {FORMAT} expected)")
    for key in ("data_config", "tensorrt_version", "compute_capability", "profiles", "precision"):
        if key not in info:
            raise ReidExportError(f"{path}: lacks {key!r}; rebuild the engine with `reid-export trt`")
    info["data_config"] = DataConfig.from_dict(info["data_config"], str(path))
    return info


def check_compatible(info: dict, engine_path: str | Path, trt_version: str, compute_capability: str) -> None:
    """Refuse an engine built for another TensorRT version or GPU architecture, naming both."""
    built = info["tensorrt_version"]
    if built != trt_version:
        raise ReidExportError(
            f"{engine_path}: built with TensorRT {built}, this is TensorRT {trt_version}; engines are not portable "
            f"across versions: rebuild it here with `reid-export trt {info.get('onnx', 'MODEL.onnx')} -o {engine_path}`"
        )
    if info["compute_capability"] != compute_capability:
        raise ReidExportError(
            f"{engine_path}: built for compute capability {info['compute_capability']} ({info.get('gpu_name', '?')}), "
            f"this GPU is {compute_capability}; rebuild the engine on this GPU with `reid-export trt`"
        )
