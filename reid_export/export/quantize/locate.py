"""Find where a reduced-precision ONNX graph departs from its FP32 original.

Both graphs are run by ONNX Runtime with every intermediate tensor marked as an output. Tensors
are matched by name (the FP16 converter and the Q/DQ quantizer keep the original tensor names
and only insert Cast / QuantizeLinear / DequantizeLinear nodes around them), then compared in
the FP32 graph's topological order. A node whose output error is much larger than the error of
its inputs is where precision is lost: a candidate for ``quantize --exclude``.

One exception to "same name, same value": for ``--target cpu`` the quantizer removes a ReLU
(uint8 ranges start at 0) and its convolution takes over the ReLU's output name, so that tensor
is the value *before* the ReLU. There the comparison uses what the next layer consumes, the
tensor's QuantizeLinear -> DequantizeLinear output, which the uint8 range clamps at 0. A node
whose inputs were not compared takes the error of its nearest compared ancestors as its input
error, so a folded ReLU does not make its consumer look like the place where the error began.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...errors import ReidExportError

_SKIP_OPS = {"Constant", "Shape", "Gather", "Unsqueeze", "Concat", "Cast", "QuantizeLinear", "DequantizeLinear"}


@dataclass
class LayerError:
    node: str
    op_type: str
    tensor: str
    rel_error: float
    input_rel_error: float
    growth: float

    @property
    def added(self) -> float:
        """The error this node adds on top of its inputs' (what keeping it in float would remove)."""
        return self.rel_error - self.input_rel_error if np.isfinite(self.rel_error) else float("inf")

    def to_dict(self) -> dict:
        return {**self.__dict__, "added": self.added}


def _load(model):
    """A ModelProto from a path, bytes or a ModelProto (not copied: callers must not mutate it)."""
    import onnx

    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, (bytes, bytearray)):
        return onnx.load_from_string(bytes(model))
    return onnx.load(str(model), load_external_data=False)


def _run_all(model, batch: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
    import onnx
    import onnxruntime as ort

    copy = onnx.ModelProto()
    copy.CopyFrom(_load(model))
    existing = {o.name for o in copy.graph.output}
    for name in names:
        if name not in existing:
            copy.graph.output.append(onnx.ValueInfoProto(name=name))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every tensor
    options.log_severity_level = 3
    session = ort.InferenceSession(copy.SerializeToString(), options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    outputs = [o.name for o in session.get_outputs()]
    values = session.run(outputs, {input_name: batch})
    return {n: v for n, v in zip(outputs, values) if isinstance(v, np.ndarray) and v.dtype.kind == "f"}


def _match_tensors(ref_model, cand_model, nodes) -> dict[str, str]:
    """Reference tensor name -> the candidate tensor that holds the same value."""
    cand_producer = {o: n for n in cand_model.graph.node for o in n.output}
    cand_users: dict[str, list] = {}
    for n in cand_model.graph.node:
        for i in n.input:
            cand_users.setdefault(i, []).append(n)
    matches = {}
    for node in nodes:
        for name in node.output:
            producer = cand_producer.get(name)
            if producer is None:
                continue
            if producer.op_type == node.op_type:
                matches[name] = name
                continue
            # the quantizer folded this node (a ReLU) into the activation range: compare what the next
            # layer consumes, the clamped QuantizeLinear -> DequantizeLinear value
            dq = next((d.output[0] for q in cand_users.get(name, []) if q.op_type == "QuantizeLinear"
                       for d in cand_users.get(q.output[0], []) if d.op_type == "DequantizeLinear"), None)
            if dq is not None:
                matches[name] = dq
    return matches


def locate(fp32_path, candidate_path, batch: np.ndarray, top: int = 10,
           threshold: float = 1e-2) -> dict:
    """Per-layer relative error of ``candidate`` against ``fp32`` on one preprocessed batch.

    ``fp32_path`` / ``candidate_path``: ONNX files, serialized models or ``ModelProto``s.
    Returns ``{"layers": [...all compared...], "first_over_threshold": [...], "largest_growth": [...]}``;
    each layer has its ``added`` error (its output's relative error minus its inputs'), the error
    that node itself introduces, by which ``quantize`` ranks the nodes it keeps in float.
    """
    def label(model):
        return str(model) if isinstance(model, (str, Path)) else "the FP32 model" if model is fp32_path else "the candidate"

    ref_model, cand_model = _load(fp32_path), _load(candidate_path)
    fp32_name, cand_name_ = label(fp32_path), label(candidate_path)
    nodes = [n for n in ref_model.graph.node if n.op_type not in _SKIP_OPS]
    matches = _match_tensors(ref_model, cand_model, nodes)
    if not matches:
        raise ReidExportError(
            f"{cand_name_}: shares no tensor names with {fp32_name}; `locate` needs a variant made from that FP32 ONNX"
        )
    ref_vals = _run_all(ref_model, batch, list(matches))
    cand_vals = _run_all(cand_model, batch, list(dict.fromkeys(matches.values())))
    rel: dict[str, float] = {}
    for name, cand_name in matches.items():
        if name in ref_vals and cand_name in cand_vals and ref_vals[name].shape == cand_vals[cand_name].shape:
            r = ref_vals[name].astype(np.float64)
            c = cand_vals[cand_name].astype(np.float64)
            with np.errstate(invalid="ignore", over="ignore"):
                rel[name] = float(np.linalg.norm(c - r) / max(np.linalg.norm(r), 1e-12))
    layers = []
    known: dict[str, float] = {}  # every reference tensor's error, compared or inherited from its inputs
    for node in ref_model.graph.node:
        in_errs = [known[i] for i in node.input if i in known]
        in_err = max(in_errs) if in_errs else 0.0
        for o in node.output:
            known[o] = rel.get(o, in_err)
        if node.op_type in _SKIP_OPS:
            continue
        out = next((o for o in node.output if o in rel), None)
        if out is None:
            continue
        err = rel[out]
        growth = err / max(in_err, 1e-7) if np.isfinite(err) else float("inf")
        layers.append(LayerError(node.name or out, node.op_type, out, err, in_err, growth))
    if not layers:
        raise ReidExportError(f"{cand_name_}: no comparable intermediate tensors with {fp32_name}")
    over = [l for l in layers if not (l.rel_error <= threshold)]
    first = over[:top]
    growth = sorted((l for l in layers if l.rel_error > 1e-6), key=lambda l: -l.growth)[:top]
    return {
        "fp32": fp32_name,
        "candidate": cand_name_,
        "threshold": threshold,
        "compared": len(layers),
        "final_rel_error": layers[-1].rel_error,
        "first_over_threshold": [l.to_dict() for l in first],
        "largest_growth": [l.to_dict() for l in growth],
        "layers": [l.to_dict() for l in layers],
    }
