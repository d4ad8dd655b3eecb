"""The CPU's instruction-set flags, and which precision routes it has hardware for.

Read from ``/proc/cpuinfo`` (Linux; other systems report no flags). ``bench`` records them beside
its figures and the OpenVINO backend checks them before it accepts bf16 inference. Tests fake
the flags with ``REID_CPU_FLAGS`` (space- or comma-separated; an empty value means "none").
"""

from __future__ import annotations

import os

# the flags that decide CPU FP32 / INT8 / BF16 speed, in the order they are shown
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8",
             "amx_bf16", "neon", "asimddp", "bf16")
ENV_FLAGS = "REID_CPU_FLAGS"


def read_cpu_flags(path: str = "/proc/cpuinfo") -> set[str]:
    """Every flag the first CPU lists (``$REID_CPU_FLAGS`` instead, when set)."""
    fake = os.environ.get(ENV_FLAGS)
    if fake is not None:
        return set(fake.replace(",", " ").split())
    try:
        with open(path) as handle:
            for line in handle:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def isa_flags(flags: set[str] | None = None) -> list[str]:
    """The performance-relevant subset of the CPU flags, in a fixed order."""
    flags = read_cpu_flags() if flags is None else flags
    return [f for f in ISA_FLAGS if f in flags]


def has_bf16(flags: set[str] | None = None) -> bool:
    """Native bf16 arithmetic: AVX512_BF16 or AMX-BF16 on x86, the BF16 extension on Arm."""
    flags = read_cpu_flags() if flags is None else flags
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def precision_routes(flags: set[str] | None = None) -> dict[str, str]:
    """For fp32, int8 and bf16: the hardware this CPU has for it, or what is missing."""
    flags = read_cpu_flags() if flags is None else flags
    if "avx512f" in flags:
        fp32 = "AVX-512 FMA"
    elif "avx2" in flags:
        fp32 = "AVX2 FMA"
    elif "neon" in flags or "asimd" in flags:
        fp32 = "NEON"
    else:
        fp32 = "no AVX2/AVX-512 (scalar/SSE kernels)"
    if "amx_int8" in flags:
        int8 = "AMX-INT8 (tiles)"
    elif "avx512_vnni" in flags:
        int8 = "AVX-512 VNNI (vpdpbusd)"
    elif "avx_vnni" in flags:
        int8 = "AVX-VNNI (vpdpbusd, 256-bit)"
    elif "asimddp" in flags:
        int8 = "Arm dot product (sdot)"
    elif "avx2" in flags:
        int8 = "no VNNI: AVX2 vpmaddubsw + vpmaddwd (about FP32's speed x2 at best)"
    else:
        int8 = "no int8 dot-product instructions"
    if "amx_bf16" in flags:
        bf16 = "AMX-BF16 (tiles)"
    elif "avx512_bf16" in flags:
        bf16 = "AVX512_BF16 (vdpbf16ps; no AMX)"
    elif "bf16" in flags:
        bf16 = "Arm BF16"
    else:
        bf16 = "none (no AVX512_BF16 or AMX-BF16): bf16 inference not available"
    return {"fp32": fp32, "int8": int8, "bf16": bf16}


def routes_line(flags: set[str] | None = None) -> str:
    """One line for people: the ISA flags and the hardware behind each precision."""
    flags = read_cpu_flags() if flags is None else flags
    routes = precision_routes(flags)
    shown = " ".join(isa_flags(flags)) or "none of " + "/".join(ISA_FLAGS[:6])
    return f"CPU ISA: {shown}; hardware for fp32: {routes['fp32']}; int8: {routes['int8']}; bf16: {routes['bf16']}"


def slower_route_note(name: str, precision: str, backend: str, target: str | None, ratios: dict,
                      flags: set[str] | None = None) -> str | None:
    """When a reduced-precision model runs slower than the FP32 one on this CPU (``ratios``: batch size ->
    its throughput over FP32's, measured side by side): one line naming the faster route for this
    machine; None when it is not slower at any batch size measured."""
    ratios = {int(b): r for b, r in ratios.items() if r is not None}
    if not ratios or min(ratios.values()) >= 1.0:
        return None
    flags = read_cpu_flags() if flags is None else flags
    has_int8 = bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8", "asimddp"})
    speeds = ", ".join(f"{r:.2f}x at batch {b}" for b, r in sorted(ratios.items()))
    if precision == "int8" and backend == "onnxruntime" and target == "tensorrt":
        route = ("it is the TensorRT flavour (S8S8 Q/DQ, which ONNX Runtime's CPU provider mostly leaves unfused): "
                 "for this CPU make the CPU flavour (reid-export quantize --target cpu: U8S8, fused QLinearConv) or "
                 "run this file with OpenVINO (reid-export openvino: real INT8); keep this one for TensorRT")
    elif precision == "int8" and backend == "onnxruntime":
        route = ("run it with OpenVINO (reid-export openvino: real INT8)" if has_int8 else
                 "this CPU has no int8 dot product (no VNNI/AMX), where FP32 is often as fast: serve the FP32 model")
    elif precision == "int8":
        route = ("this CPU has no int8 dot product (no VNNI/AMX): serve the FP32 model" if not has_int8 else
                 "compare with the CPU flavour on ONNX Runtime (reid-export quantize --target cpu)")
    elif precision == "fp16" and backend == "onnxruntime":
        route = ("ONNX Runtime's CPU provider computes FP16 graphs in float32 with casts around them: serve the FP32 "
                 "model" + (", or OpenVINO bf16 (reid-export openvino, then bench --device openvino:bf16)"
                            if has_bf16(flags) else " on this CPU (it has no bf16 arithmetic)"))
    else:
        route = "serve the FP32 model on this CPU"
    shown = " ".join(isa_flags(flags)) or "no AVX2/AVX-512 flags"
    what = f"{precision}{' ' + target + ' flavour' if target else ''} on {backend}"
    return f"note: {name} ({what}) runs at {speeds} of the FP32 model's throughput on this CPU ({shown}): {route}"


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages, rounded to 0.01 (None where the system has none): how busy the
    machine was when a figure was measured."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None
