"""Commands whose issues are not done yet: each says so and exits 2."""

from __future__ import annotations

import click

from ..errors import ReidExportError
from .main import cli

PLANNED = {
    "onnx": "Export a checkpoint to ONNX (FP32, dynamic batch, data config inside).",
    "annotate": "Write a data config into an ONNX model that came from elsewhere.",
    "quantize": "Make FP16 or INT8 (Q/DQ) variants of an ONNX model.",
    "trt": "Build a TensorRT engine from an ONNX model.",
    "parity": "Compare candidate models' embeddings against a reference.",
    "eval": "Rank-1/mAP/mINP of models on a Market-1501-layout dataset.",
    "bench": "Latency and throughput per backend and batch size.",
    "synth": "Generate a synthetic Market-1501-layout dataset.",
    "demo": "Run the whole pipeline on an embedded default.",
}


def _make_stub(name: str, summary: str) -> None:
    @cli.command(name=name, help=f"{summary} (not yet available)",
                 context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
    def _stub():
        raise ReidExportError(f"'{name}' is not yet available in this version", exit_code=2)


for _name, _summary in PLANNED.items():
    if _name not in cli.commands:
        _make_stub(_name, _summary)
