"""``reid-export doctor``: what this machine can run."""

from __future__ import annotations

import importlib
import json
import platform
import sys

import click

from .. import __version__
from ..report import format_table
from .common import to_flags
from .main import cli

TRT_INSTALL = "pip install 'reid-export[trt]' (TensorRT 10/11 wheels from NVIDIA's index)"
OPENVINO_INSTALL = "pip install 'reid-export[openvino]' (Intel OpenVINO, CPU plugin)"


def _version(module: str) -> str | None:
    try:
        mod = importlib.import_module(module)
    except Exception:  # an import can fail in many ways (missing libs, bad CUDA)
        return None
    return str(getattr(mod, "__version__", "installed"))


def collect() -> list[dict]:
    rows = [
        {"component": "python", "status": platform.python_version(), "detail": sys.executable},
        {"component": "reid-export", "status": __version__, "detail": ""},
    ]
    for module, name in (("numpy", "numpy"), ("cv2", "opencv"), ("onnx", "onnx"), ("onnxslim", "onnxslim")):
        version = _version(module)
        rows.append({"component": name, "status": version or "not installed", "detail": ""})
    torch_v = _version("torch")
    detail = ""
    if torch_v:
        import torch

        if torch.cuda.is_available():
            detail = f"CUDA {torch.version.cuda}: {torch.cuda.get_device_name(0)}"
        else:
            detail = "CUDA not available (CPU only)"
    rows.append({"component": "torch", "status": torch_v or "not installed", "detail": detail})
    ort_v = _version("onnxruntime")
    providers = ""
    if ort_v:
        import onnxruntime

        providers = ", ".join(onnxruntime.get_available_providers())
    rows.append({"component": "onnxruntime", "status": ort_v or "not installed", "detail": providers})
    trt_v = _version("tensorrt")
    rows.append({"component": "tensorrt", "status": trt_v or "not installed",
                 "detail": "" if trt_v else TRT_INSTALL})
    ov_v = _version("openvino")
    ov_detail = OPENVINO_INSTALL
    if ov_v:
        from ..cpuinfo import precision_routes
        from ..runtime.openvino_convert import core_info

        try:
            info = core_info()
            ov_detail = (f"devices {', '.join(info['devices'])}; CPU plugin: "
                         f"{', '.join(info.get('cpu_capabilities', []))}; bf16 hardware: {precision_routes()['bf16']}")
        except Exception as exc:  # noqa: BLE001 - a broken install still gets a row
            ov_detail = f"installed but the CPU plugin does not load ({type(exc).__name__}: {str(exc)[:120]})"
    rows.append({"component": "openvino", "status": ov_v or "not installed", "detail": ov_detail})
    cuda_py = _version("cuda.bindings") or _version("cuda")
    rows.append({"component": "cuda-python", "status": cuda_py or "not installed", "detail": ""})
    backends = ["torch (.pth)" if torch_v else None, "onnxruntime (.onnx)" if ort_v else None,
                "tensorrt (.engine)" if trt_v else None,
                "openvino (.xml; .onnx with --device openvino)" if ov_v else None]
    from ..cpuinfo import isa_flags

    rows.append({"component": "cpu isa", "status": " ".join(isa_flags()) or "-", "detail": ""})
    from ..export.quantize.qdq import full_range_warning, weight_range_for_cpu

    reduce_range, why = weight_range_for_cpu()
    rows.append({"component": "int8 cpu weights", "status": "7-bit (reduce_range)" if reduce_range else "full 8-bit",
                 "detail": why + ("" if full_range_warning() is None else "; warning: full-range --target cpu models "
                                  "made elsewhere saturate here")})
    rows.append({"component": "backends", "status": ", ".join(b for b in backends if b), "detail": ""})
    return rows


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def doctor(as_json):
    """Show versions, available backends and providers, CUDA and TensorRT presence."""
    rows = collect()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        click.echo(to_flags(format_table(["component", "status", "detail"],
                                         [[r["component"], r["status"], r["detail"]] for r in rows])))
