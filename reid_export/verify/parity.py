"""``parity`` as a library call: run a reference and candidates on the same images, compare, gate.

:func:`run_parity` returns a :class:`ParityReport` that carries every candidate's
:class:`~reid_export.embeddings.ParityResult` (its numbers, its tolerances and why it failed), the
optional per-layer ``locate`` results, and the verdict. The CLI prints ``report.table()`` and
exits with ``report.exit_code``; scripts read the same object.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

from ..deploy_preprocess import get_deployment
from ..embeddings import CollapseStats, ParityResult, Tolerances, compare, data_config_differences, gate_for
from ..errors import ReidExportError, UsageError
from ..export.quantize.locate import locate as locate_layers
from ..preprocess import expand_image_paths, preprocess, read_images, skipped_summary
from ..report import format_table, report_header
from ..runtime import model_name, open_encoder
from ..runtime.encoder import Encoder, configs_for
from .collapse import collapse_of


@dataclass
class ParityReport:
    reference: dict
    images: list[str]
    candidates: list[ParityResult]
    skipped_images: list[str] = field(default_factory=list)
    deployment: str | None = None
    locate: dict = field(default_factory=dict)
    collapse: dict = field(default_factory=dict)  # model -> CollapseStats.to_dict() (None below 3 images)

    def collapsed(self) -> list[str]:
        """The models (reference or candidates) whose embeddings collapsed on these images."""
        return [model for model, c in self.collapse.items() if c and c["collapsed"]]

    def collapse_warnings(self) -> list[str]:
        """One warning line per collapsed model (the CLI prints them once the report is written)."""
        return [CollapseStats(**self.collapse[m]).warning(m) for m in self.collapsed()]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.candidates)

    @property
    def exit_code(self) -> int:
        return 0 if self.passed else 1

    def failure_lines(self) -> list[str]:
        lines = []
        for r in self.candidates:
            if not r.passed:
                lines.append(f"FAIL {r.candidate}: " + "; ".join(r.failures))
                lines += [f"     data config differs: {note}" for note in r.notes]
        return lines

    def table(self) -> str:
        """The report for people: the header line, one row per candidate, failures, located layers."""
        rows = [[Path(r.candidate).name, r.backend, r.precision, r.min_cosine, r.mean_cosine, r.pair_error,
                 r.max_rel_l2, r.max_abs_error, r.elementwise_failures, r.nonfinite, f"{r.top1_agreement:.0%}",
                 f"{r.top5_agreement:.0%}", "PASS" if r.passed else "FAIL"] for r in self.candidates]
        ref = self.reference
        lines = [f"reference: {ref['model']} ({ref['backend']}, {ref['precision']}); {len(self.images)} images"
                 + (f"; candidates through the {self.deployment} deployment's preprocessing" if self.deployment else ""),
                 format_table(["candidate", "backend", "prec", "min cos", "mean cos", "pair err", "max rel L2",
                               "max abs", "elem fail",
                               "NaN/Inf", "top-1", "top-5", "result"], rows, floatfmt=".6g")]
        lines += self.failure_lines()
        for cand, loc in self.locate.items():
            lines.append(f"\nlocate {Path(cand).name}: {loc['compared']} tensors compared, final rel error "
                         f"{loc['final_rel_error']:.3g}; layers where the error grows most:")
            lines.append(format_table(["node", "op", "rel error", "input rel error", "growth"],
                                      [[l["node"], l["op_type"], l["rel_error"], l["input_rel_error"], l["growth"]]
                                       for l in loc["largest_growth"]], floatfmt=".3g"))
        return "\n".join(lines)

    def to_dict(self) -> dict:
        doc = report_header("parity")
        doc.update({"reference": self.reference, "images": self.images, "skipped_images": self.skipped_images,
                    "deployment": self.deployment, "candidates": [r.to_dict() for r in self.candidates],
                    "locate": self.locate, "collapse": self.collapse, "collapsed": self.collapsed(),
                    "passed": self.passed})
        return doc


def use_deployment(encoder: Encoder, name: str | None) -> Encoder:
    """Feed ``encoder`` through deployment ``name``'s preprocessing (``reid_export.deploy_preprocess``)."""
    if name:
        encoder.preprocessing = get_deployment(name).preprocess
    return encoder


def run_parity(reference: "str | Path | Encoder", candidates: Sequence["str | Path | Encoder"],
               images: Sequence[str | Path], *,
               config: str | Path | None = None, batch_size: int = 16,
               gate: "Tolerances | Mapping[str, Tolerances] | None" = None, locate: bool = False,
               deployment: str | None = None,
               device: str = "cpu", progress: bool = True, skip_bad_images: bool = False,
               warn: Callable[[str], None] = lambda line: None) -> ParityReport:
    """Embeddings of ``candidates`` against ``reference`` on the same decoded images, each model
    preprocessing them with its own data config (or, with ``deployment``, the candidates through that
    deployment's preprocessing). ``gate``: one :class:`Tolerances` for every candidate, or one per
    precision (``Tolerances.by_precision(max_pair_error=0.02)``); by default each candidate is held to
    its precision's gate (:meth:`Tolerances.for_precision`). ``warn`` gets the skipped-images line."""
    if not candidates:
        raise UsageError("parity needs at least one candidate model")
    paths = expand_image_paths(images)
    # decoded once, preprocessed per model
    arrays, kept, skipped = read_images(paths, "skip" if skip_bad_images else "raise")
    if skipped:
        if not arrays:
            raise ReidExportError(f"none of the {len(paths)} images could be read; {skipped_summary(skipped)}")
        warn(skipped_summary(skipped))
        paths = [paths[i] for i in kept]
    encoders: list[Encoder] = []
    try:
        model_configs = configs_for([reference, *candidates], config)  # --config: for the checkpoints
        ref_enc = open_encoder(reference, config=model_configs[0], device=device)
        encoders.append(ref_enc)
        ref_feats = ref_enc.encode_files(arrays, batch_size, progress=progress, desc=f"reference ({ref_enc.backend})")
        collapse = {model_name(reference): _collapse(ref_feats)}
        results = []
        for cand, cand_config in zip(candidates, model_configs[1:]):
            enc = use_deployment(open_encoder(cand, config=cand_config, device=device), deployment)
            encoders.append(enc)
            feats = enc.encode_files(arrays, batch_size, progress=progress, desc=f"{enc.path.name} ({enc.backend})")
            tol = gate_for(gate, enc.precision)
            res = compare(ref_feats, feats, tol, model_name(cand) + (f"@{deployment}" if deployment else ""),
                          enc.backend, enc.precision)
            if res.candidate not in collapse:  # the reference again: checked once
                collapse[res.candidate] = _collapse(feats)
            if not res.passed:
                res.notes.extend(data_config_differences(ref_enc.data_config, enc.data_config))
            results.append(res)
        located = _locate(ref_enc, encoders[1:], arrays) if locate else {}
        return ParityReport(reference={"model": model_name(reference), "backend": ref_enc.backend,
                                       "precision": ref_enc.precision},
                            images=[str(p) for p in paths], candidates=results,
                            skipped_images=[str(e.path) for e in skipped], deployment=deployment, locate=located,
                            collapse=collapse)
    finally:
        for enc in encoders:
            enc.close()


def _collapse(features) -> dict | None:
    """The collapse check of one model's features on the parity images (two models fed the same wrong
    convention agree with each other and still tell nobody apart)."""
    stats = collapse_of(features)
    return stats.to_dict() if stats else None


def _locate(ref_enc: Encoder, candidates: list[Encoder], arrays) -> dict:
    """Per-layer error growth of each FP16/INT8 ONNX candidate against the FP32 ONNX among the models."""
    fp32 = ref_enc if ref_enc.path.suffix == ".onnx" and ref_enc.precision == "fp32" else next(
        (e for e in candidates if e.path.suffix == ".onnx" and e.precision == "fp32"), None)
    targets = [e for e in candidates if e.path.suffix == ".onnx" and e.precision != "fp32"]
    if fp32 is None or not targets:
        raise UsageError("`locate` needs an FP32 ONNX (as reference or candidate) and FP16/INT8 ONNX "
                         "candidates made from it")
    batch = preprocess(arrays[: min(len(arrays), 8)], fp32.data_config)
    return {str(enc.path): locate_layers(fp32.path, enc.path, batch) for enc in targets}
