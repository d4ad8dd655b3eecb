"""What ``quantize`` did: the report (JSON for machines, a table for people) and the INT8 search record,
written once and stored both in the report and in the model's metadata."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ...report import format_size, format_table, report_header
from .qdq_check import FusionReport, QDQReport


@dataclass
class SearchRecord:
    """The INT8 search: the gate, every candidate tried, the one chosen and why, and on which images."""

    gate: dict
    passed: bool
    method_requested: str
    method: str                      # the chosen candidate's calibration method
    percentile: float | None
    num_bins: int | None
    chosen: str                      # the chosen candidate's label
    first_choice: str                # the best candidate before nodes were kept in float
    variant: str                     # plain / equalised
    bias_corrected: bool
    objective: dict
    objective_before_fallback: dict
    tried: list[dict]
    kept_float: list[str]            # every node left in float: head, --exclude, float sums, fallback
    fallback_float: list[str]        # the nodes the search kept in float to meet the gate
    fallback_ranking: list[dict]
    max_float: int
    equalization: dict
    calibration: dict
    held_out: dict
    held_out_retrieval: dict | None
    seconds: dict

    def to_dict(self) -> dict:
        return {"gate": self.gate, "passed": self.passed, "method_requested": self.method_requested,
                "method": self.method, "percentile": self.percentile, "num_bins": self.num_bins,
                "chosen": self.chosen, "first_choice": self.first_choice, "variant": self.variant,
                "bias_corrected": self.bias_corrected, "objective": self.objective,
                "objective_before_fallback": self.objective_before_fallback, "tried": self.tried,
                "kept_float": self.kept_float, "fallback_float": self.fallback_float,
                "fallback_ranking": self.fallback_ranking, "max_float": self.max_float,
                "equalization": self.equalization, "calibration": self.calibration, "held_out": self.held_out,
                "held_out_retrieval": self.held_out_retrieval, "seconds": self.seconds}

    def table(self) -> str:
        """Every candidate tried, the chosen one marked."""
        rows = [[t["label"], t["fallback_nodes"], t["objective"]["pair_error"], t["objective"]["min_cosine"],
                 t["objective"]["mean_cosine"], f"{t['objective']['top1_agreement']:.1%}",
                 f"{t['objective']['top5_agreement']:.1%}", "pass" if t["passed"] else "below", ""]
                for t in self.tried]
        labels = [t["label"] for t in self.tried]
        if self.chosen in labels:
            rows[len(labels) - 1 - labels[::-1].index(self.chosen)][-1] = "<- chosen"
        return format_table(["candidate", "float nodes", "pair error", "min cos", "mean cos", "top-1", "top-5",
                             "gate", ""], rows, floatfmt=".4f")


@dataclass
class QuantizeReport:
    """``passed``: written and, where a gate applied, passing it. A refused model is not written: its
    report says why (``refusal``, one line) and what was tried (``search``)."""

    output: Path
    precision: str
    target: str | None = None
    method: str | None = None
    calibration_images: int = 0
    held_out_images: int = 0
    notes: list[str] = field(default_factory=list)
    kept_float: list[str] = field(default_factory=list)
    parity: dict = field(default_factory=dict)
    search: SearchRecord | None = None
    gate_passed: bool | None = None   # None: no gate applied (FP16 checked on generated images only)
    refusal: str | None = None
    qdq: QDQReport | None = None
    fusion: FusionReport | None = None
    written: bool = False
    size_mb: float = 0.0
    seconds: float = 0.0
    speed: dict = field(default_factory=dict)  # throughput over FP32's on this CPU (ONNX Runtime), by batch size

    @property
    def passed(self) -> bool:
        return self.written and self.gate_passed is not False

    def to_dict(self) -> dict:
        return {**report_header("quantize"), "output": str(self.output), "written": self.written,
                "passed": self.passed, "refusal": self.refusal, "precision": self.precision, "target": self.target,
                "method": self.method, "calibration_images": self.calibration_images,
                "held_out_images": self.held_out_images, "kept_float": self.kept_float,
                "parity_vs_fp32": self.parity, "search": None if self.search is None else self.search.to_dict(),
                "gate_passed": self.gate_passed, "qdq_check": None if self.qdq is None else self.qdq.summary(),
                "ort_cpu_fusion": None if self.fusion is None else self.fusion.summary(),
                "size_mb": round(self.size_mb, 3), "seconds": round(self.seconds, 1),
                "speed_vs_fp32": self.speed, "notes": self.notes}

    def table(self, verdict: bool = True) -> str:
        """The candidates tried (INT8) or the FP16 check, the graph checks, then (``verdict``) the verdict
        line: what the CLI prints (it prints a refusal as its error line instead)."""
        lines = []
        if self.search is not None:
            lines.append(self.search.table())
        elif self.parity:
            p = self.parity
            lines.append(format_table(["precision", "images", "pair error", "min cos", "mean cos", "max rel L2", "gate"],
                                      [[self.precision, p.get("images"), p.get("pair_error"), p.get("min_cosine"),
                                        p.get("mean_cosine"), p.get("max_rel_l2"),
                                        {None: "not gated", True: "pass", False: "below"}[self.gate_passed]]],
                                      floatfmt=".4f"))
        for check in (self.qdq, self.fusion):
            if check is not None:
                lines.append(check.summary())
        if verdict:
            lines.append(self.verdict())
        return "\n".join(lines)

    def verdict(self) -> str:
        if not self.written:
            return self.refusal or f"{self.output}: not written"
        what = self.precision if self.precision == "fp16" else (f"int8 {self.target}: {self.method}; calibrated on "
                                                                f"{self.calibration_images} images")
        gate = "" if self.gate_passed is None else (
            "; accuracy gate passed" if self.gate_passed else "; BELOW THE ACCURACY GATE")
        floats = f"kept in float: {len(self.kept_float)} nodes"
        if self.search is not None:  # the head, --exclude and float sums, and the search's own fallback
            floats += f" ({len(self.search.fallback_float)} of them by the search's fallback)"
        return f"wrote {self.output} ({what}; {floats}{gate}; {format_size(self.size_mb)}) in {self.seconds:.0f} s"


__all__ = ["QuantizeReport", "SearchRecord"]
