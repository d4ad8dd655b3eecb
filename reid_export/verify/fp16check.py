"""FP16 honesty: run a torch model with true FP16 activations and find overflow, per layer.

ONNX Runtime's CPU provider computes FP16 graphs in FP32, so it cannot show an activation that
exceeds FP16's range (65504): GeM's x**p and large un-normalised features are the usual cases.
This check runs the model in half precision (on CPU, where torch supports it, or CUDA) next to
the FP32 model, and reports every layer's largest magnitude, its headroom to the FP16 limit and
any Inf/NaN it produced.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from ..errors import ReidExportError
from ..modeling.layers import GeneralizedMeanPooling

FP16_MAX = 65504.0


def _leaf_like(module: torch.nn.Module) -> bool:
    """Modules whose outputs we record: leaves plus composite blocks users can exclude."""
    return len(list(module.children())) == 0 or module.__class__.__name__ in (
        "IBN", "NonLocal", "Bottleneck", "BasicBlock", "GeneralizedMeanPooling", "GeneralizedMeanPoolingP")


def _record(model: torch.nn.Module, x: torch.Tensor) -> tuple[dict, torch.Tensor]:
    stats: dict[str, dict] = {}
    hooks = []

    def hook(name):
        def fn(module, inputs, output):
            if not isinstance(output, torch.Tensor) or not output.is_floating_point():
                return
            out = output.detach().float()
            finite = torch.isfinite(out)
            entry = stats.setdefault(name, {"type": module.__class__.__name__, "max_abs": 0.0, "nonfinite": 0})
            entry["max_abs"] = max(entry["max_abs"], float(out[finite].abs().max()) if finite.any() else float("inf"))
            entry["nonfinite"] += int((~finite).sum())
            if isinstance(module, GeneralizedMeanPooling):
                # the intermediate x**p never leaves the module: measure it from the input
                p = float(module.p) if not isinstance(module.p, torch.Tensor) else float(module.p.detach().float().max())
                inp = inputs[0].detach().float().clamp(min=module.eps)
                entry["pow_max"] = max(entry.get("pow_max", 0.0), float(inp.max()) ** p)
        return fn

    for name, module in model.named_modules():
        if name and _leaf_like(module):
            hooks.append(module.register_forward_hook(hook(name)))
    try:
        with torch.inference_mode():
            out = model(x)
    finally:
        for h in hooks:
            h.remove()
    return stats, out


def fp16_activation_check(model: torch.nn.Module, batches, device: str = "cpu") -> dict:
    """Per-layer FP32 vs FP16 activation report over ``batches`` (float32 NCHW numpy arrays)."""
    dev = torch.device(device)
    fp32 = copy.deepcopy(model).float().eval().to(dev)
    fp16 = copy.deepcopy(model).half().eval().to(dev)
    layers: dict[str, dict] = {}
    rel_errors, fp16_nonfinite = [], 0
    for batch in batches:
        x = torch.from_numpy(np.ascontiguousarray(batch)).to(dev)
        try:
            s32, o32 = _record(fp32, x)
            s16, o16 = _record(fp16, x.half())
        except RuntimeError as exc:
            raise ReidExportError(f"half-precision run failed on {device} ({exc}); try `device` cuda") from None
        for name, e32 in s32.items():
            e16 = s16.get(name, {})
            row = layers.setdefault(name, {"layer": name, "type": e32["type"], "fp32_max_abs": 0.0,
                                           "fp16_max_abs": 0.0, "fp16_nonfinite": 0})
            row["fp32_max_abs"] = max(row["fp32_max_abs"], e32["max_abs"])
            row["fp16_max_abs"] = max(row["fp16_max_abs"], e16.get("max_abs", 0.0))
            row["fp16_nonfinite"] += e16.get("nonfinite", 0)
            if "pow_max" in e32:
                row["fp32_pow_max"] = max(row.get("fp32_pow_max", 0.0), e32["pow_max"])
        o16f = o16.float()
        fp16_nonfinite += int((~torch.isfinite(o16f)).sum())
        rel = (o16f - o32).norm(dim=1) / o32.norm(dim=1).clamp_min(1e-12)
        rel_errors.extend(rel.cpu().tolist())
    rows = list(layers.values())
    for row in rows:
        peak = max(row["fp32_max_abs"], row.get("fp32_pow_max", 0.0))
        row["headroom"] = FP16_MAX / peak if peak > 0 else float("inf")
        row["overflow"] = bool(row["fp16_nonfinite"] > 0 or peak > FP16_MAX)
    overflow = [r["layer"] for r in rows if r["overflow"]]
    finite_rel = [r for r in rel_errors if np.isfinite(r)]
    return {
        "device": device,
        "layers": rows,
        "overflow_layers": overflow,
        "output_nonfinite": fp16_nonfinite,
        "max_rel_l2": max(finite_rel) if len(finite_rel) == len(rel_errors) and finite_rel else float("inf"),
        "min_headroom": min((r["headroom"] for r in rows), default=float("inf")),
        "passed": not overflow and fp16_nonfinite == 0,
    }
