"""``eval`` as a library call: models on a Market-1501-layout dataset, with deltas, gates and a verdict.

:func:`run_evaluation` encodes and scores every model (and, per deployment, the model through that
deployment's preprocessing), computes the deltas against the first model and the cost of each
deployment, applies the gates and returns an :class:`EvalReport`. The CLI prints ``report.table()``
and exits with ``report.exit_code``; the demo and the benchmarks read the same object.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..data.market import MarketDataset
from ..embeddings import CollapseStats, ParityResult, Tolerances, compare
from ..report import format_table, report_header
from ..runtime import Encoder, model_name, open_encoder
from ..runtime.encoder import configs_for
from .retrieval import METRIC_KEYS, EvalOptions, EvalResult, check_queries_have_matches, evaluate_encoder
from .parity import use_deployment
from .thresholds import threshold_shifts


# Default gates against the first model (points). On 200 queries an INT8 variant's mAP scatters by
# about +-1.5 points and Rank-1 by more (benchmarks/RESULTS-archive.md, issue 15), so the defaults sit just above
# that: a variant that really lost accuracy, or a model fed the wrong convention (tens of points),
# fails; the noise of a small eval set does not.
DEFAULT_MAX_MAP_DROP = 2.0
DEFAULT_MAX_R1_DROP = 3.0


@dataclass
class EvalGates:
    """What fails an evaluation. On by default: with two or more models the first is the reference
    and every other one fails when its mAP or Rank-1 is more than ``max_map_drop`` /
    ``max_r1_drop`` points below it; a deployment fails when it costs a model more than
    ``max_deployment_*`` points against the model's own preprocessing; a model whose embeddings
    collapsed (:mod:`reid_export.verify.collapse`) fails with ``fail_collapsed``. None turns a
    gate off; :meth:`off` turns them all off (report only). ``exempt`` names models that are in
    the report for contrast only (the demo's untrained net) and are never gated."""

    max_map_drop: float | None = DEFAULT_MAX_MAP_DROP      # points below the first model
    max_r1_drop: float | None = DEFAULT_MAX_R1_DROP
    max_deployment_map_drop: float | None = 1.0            # points a deployment's preprocessing may cost
    max_deployment_r1_drop: float | None = 2.0
    fail_collapsed: bool = True
    exempt: tuple = ()
    # an FP16/bf16/INT8 row against the first model (when that one is of another precision): the one
    # reduced-precision gate quantize and parity apply, on the features of the eval's own images
    fidelity: Tolerances | None = field(default_factory=Tolerances.reduced_precision)

    @classmethod
    def off(cls) -> "EvalGates":
        return cls(None, None, None, None, False, fidelity=None)

    @property
    def active(self) -> bool:
        """Whether any gate can fail a model (False after :meth:`off`: report only)."""
        return self.fail_collapsed or self.fidelity is not None or any(v is not None for v in (
            self.max_map_drop, self.max_r1_drop, self.max_deployment_map_drop, self.max_deployment_r1_drop))

    def is_exempt(self, model: str) -> bool:
        own = str(model).rpartition("@")[0] if "@" in str(model) else str(model)  # a deployment row: its model
        return any(Path(m) == Path(e) for e in self.exempt for m in (str(model), own))

    def describe(self) -> str:
        parts = []
        if self.max_map_drop is not None:
            parts.append(f"mAP drop <= {self.max_map_drop:g}")
        if self.max_r1_drop is not None:
            parts.append(f"Rank-1 drop <= {self.max_r1_drop:g}")
        text = (" and ".join(parts) + " points against the first model") if parts else "no drop gate"
        if self.fidelity is not None and self.fidelity.max_pair_error is not None:
            text += f", FP16/bf16/INT8 pairwise-similarity error <= {self.fidelity.max_pair_error:g}"
        return text + (", collapsed embeddings fail" if self.fail_collapsed else "")


@dataclass
class EvalRow:
    """One row of an evaluation: a model, or a model through a deployment's preprocessing, with its
    scores (``result``: metrics in percent or the error, and the arrays behind them), what it is
    measured against and its verdict (``status``: ok, FAIL, ERROR, contrast or not gated)."""

    model: str                                 # the model's name, ``name@deployment`` for a deployment row
    backend: str
    precision: str
    deployment: str | None
    result: EvalResult
    delta_map: float | None = None             # points against the first model
    delta_rank1: float | None = None
    delta_map_ci95: tuple[float, float] | None = None    # paired bootstrap over the queries
    delta_rank1_ci95: tuple[float, float] | None = None
    cost_map: float | None = None              # a deployment row: points its preprocessing costs the model
    cost_rank1: float | None = None
    fidelity: ParityResult | None = None       # an FP16/bf16/INT8 row: its features against the first model's
    status: str = "ok"

    @property
    def ok(self) -> bool:
        return self.result.ok

    @property
    def error(self) -> str | None:
        return self.result.error

    @property
    def metrics(self) -> dict:
        """Rank-1/5/10, mAP, mINP, TPR@FPR (percent) and the extras (``thresholds``, ``collapse``, ...)."""
        return self.result.metrics

    @property
    def mAP(self) -> float | None:  # noqa: N802 (the metric's name)
        return self.result.metrics.get("mAP")

    @property
    def rank1(self) -> float | None:
        return self.result.metrics.get("Rank-1")

    @property
    def collapse(self) -> CollapseStats | None:
        found = self.result.metrics.get("collapse")
        return CollapseStats(**found) if found else None

    def to_dict(self) -> dict:
        """The row of the ``eval`` JSON (``models``): metrics (or ``error``), names, deltas, costs, verdict."""
        out = self.result.row()
        out.update({"model": self.model, "backend": self.backend, "precision": self.precision,
                    "deployment": self.deployment})
        if self.cost_map is not None:
            out.update({"cost_mAP": self.cost_map, "cost_Rank-1": self.cost_rank1})
        if self.fidelity is not None:
            f = self.fidelity
            out["fidelity"] = {**{k: _finite(v) for k, v in f.measures().items()}, "passed": f.passed,
                               "failures": f.failures}
        if self.delta_map is not None:
            out.update({"delta_mAP": self.delta_map, "delta_Rank-1": self.delta_rank1})
        if self.delta_map_ci95 is not None:
            out.update({"delta_mAP_ci95": list(self.delta_map_ci95), "delta_Rank-1_ci95": list(self.delta_rank1_ci95)})
        out["status"] = self.status
        return {k: _finite(v) for k, v in out.items()}


@dataclass
class EvalReport:
    dataset: MarketDataset
    options: EvalOptions
    gates: EvalGates
    rows: list[EvalRow]                        # per model (and deployment): scores, deltas, verdict
    deployments: list[str] = field(default_factory=list)
    distractors: bool = False
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def exit_code(self) -> int:
        return 0 if self.passed else 1

    def table(self) -> str:
        base = self.rows[0]
        tpr_keys = [k for k in base.metrics if k.startswith("TPR@")] if base.ok else []
        rows = []
        for row in self.rows:
            name = [Path(row.model).name, row.backend, row.precision]
            if not row.ok:
                rows.append(name + ["-"] * (len(METRIC_KEYS) + len(tpr_keys[-1:]) + 2) + [row.status])
            else:
                ci = row.delta_map_ci95
                rows.append(name + [row.metrics[k] for k in METRIC_KEYS] + [row.metrics.get(k) for k in tpr_keys[-1:]]
                            + [row.delta_map, f"[{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else "-", row.status])
        o, ds = self.options, self.dataset
        lines = [f"dataset: {ds.root} ({len(ds.query)} queries, {len(ds.gallery)} gallery); metric {o.metric}"
                 f"{', flip' if o.flip_test else ''}{', AQE' if o.aqe else ''}{', re-rank' if o.rerank else ''}"
                 f"; gates: {self.gates.describe()}",
                 format_table(["model", "backend", "prec", *METRIC_KEYS, *tpr_keys[-1:], "d mAP", "d mAP 95% CI",
                               "status"], rows, floatfmt=".2f")]
        if self.distractors and base.ok:
            lines.append(f"gallery + {base.metrics['num_distractors']} distractors = {base.metrics['num_gallery']} "
                         f"items, streamed exact evaluation; peak RSS "
                         f"{max(r.metrics.get('peak_rss_mib', 0) for r in self.rows):.0f} MiB")
        if self.deployments:
            g = self.gates
            lines.append("\ncost of each deployment's preprocessing against the model's own (points; gates mAP "
                         f"{_gate_text(g.max_deployment_map_drop)}, Rank-1 {_gate_text(g.max_deployment_r1_drop)}):")
            lines.append(format_table(
                ["model", "deployment", "Rank-1", "mAP", "cost Rank-1", "cost mAP", "result"],
                [[Path(r.model).name.rpartition("@")[0], r.deployment, r.rank1, r.mAP, r.cost_rank1, r.cost_map,
                  _deployment_verdict(r, g)]
                 for r in self.rows if r.deployment and r.cost_map is not None], floatfmt=".2f"))
        lines += self.fidelity_lines()
        lines += self.threshold_lines()
        lines += [f"FAIL {line}" for line in self.failures]
        return "\n".join(lines)

    def collapse_warnings(self) -> list[str]:
        """One warning line per model (or deployment row) whose embeddings collapsed (the CLI prints them
        once the report is written; the gate's FAIL line is in the table)."""
        return [row.collapse.warning(row.model) for row in self.rows if row.collapse and row.collapse.collapsed]

    def fidelity_lines(self) -> list[str]:
        """Each reduced-precision row's features against the first model's on the same images."""
        rows = [[Path(r.model).name, r.precision, f.num_images, _finite(f.pair_error), f.min_cosine, f.mean_cosine,
                 f"{f.top1_agreement:.1%}", "PASS" if f.passed else ("FAIL" if self.gates.fidelity else "not gated")]
                for r in self.rows if (f := r.fidelity) is not None]
        if not rows:
            return []
        return [f"\nfidelity to {Path(self.rows[0].model).name} on the eval's own images (the reduced-precision "
                "gate of quantize and parity):",
                format_table(["model", "prec", "images", "pair error", "min cos", "mean cos", "top-1", "result"], rows,
                             floatfmt=".4f")]

    def threshold_lines(self) -> list[str]:
        """The compact thresholds table: per model (and deployment) the cosine distance at each FMR,
        the true-match rate there and the shift against the first model."""
        rows, notes, fmrs = [], [], None
        for row in self.rows:
            th = row.metrics.get("thresholds")
            if not th:
                continue
            fmrs = fmrs or [p["fmr"] for p in th["points"]]
            cells = []
            for p in th["points"]:
                if p["distance"] is None:
                    cells.append("-")
                    if p["note"] not in notes:
                        notes.append(p["note"])
                    continue
                shift = p.get("shift")
                cells.append(f"{p['distance']:.4f} ({p['tmr']:.1f}%)" + (f" {shift:+.4f}" if shift is not None else ""))
            model = Path(row.model).name
            rows.append([model.rpartition("@")[0] if row.deployment else model, row.precision,
                         row.deployment or "-", *cells])
        if not rows:
            return []
        first = Path(self.rows[0].model).name
        return ["\ntracker thresholds: the cosine distance (1 - cos of L2-normalised features) below which a pair "
                f"matches at each false-match rate, (the share of same-identity pairs it accepts) and its shift "
                f"against {first}:",
                format_table(["model", "prec", "deployment", *[f"FMR {f:.0e}" for f in fmrs]], rows)] + notes

    def to_dict(self) -> dict:
        doc = report_header("eval")
        g = self.gates
        gates = {"max_map_drop": g.max_map_drop, "max_r1_drop": g.max_r1_drop, "fail_collapsed": g.fail_collapsed,
                 "exempt": [str(e) for e in g.exempt],
                 "fidelity": None if g.fidelity is None else g.fidelity.to_dict()}
        if self.deployments:
            gates.update(max_deployment_map_drop=g.max_deployment_map_drop,
                         max_deployment_r1_drop=g.max_deployment_r1_drop)
        doc.update({"dataset": str(self.dataset.root), "num_query": len(self.dataset.query),
                    "num_gallery": len(self.dataset.gallery), "options": self.options.__dict__, "gates": gates,
                    "deployments": self.deployments,
                    "models": [row.to_dict() for row in self.rows],
                    "failures": self.failures, "passed": self.passed})
        return doc

    def write_plots(self, folder: Path) -> None:
        """``roc.png`` (every model) and the first model's best and worst rank lists."""
        if self.rows[0].result.distmat is None:
            return  # the first model failed, or a streamed evaluation (no matrix held)
        from . import metrics
        from .retrieval import per_query_ap
        from .plots import rank_list_image, rank_list_rows, roc_plot, write_png

        folder.mkdir(parents=True, exist_ok=True)
        curves = {}
        for i, row in enumerate(self.rows):
            scored = row.result
            if scored.distmat is None:
                continue
            q, g = scored.query, scored.gallery
            curves[f"{i + 1}. {Path(row.model).name} ({row.backend}, {row.precision})"] = metrics.roc_curve(
                scored.distmat, q.pids, g.pids, q.camids, g.camids)
        base = self.rows[0].result
        roc_plot(curves, folder / "roc.png", title=f"ROC on {dataset_name(self.dataset.root)}: "
                                                      f"{len(base.query.pids)} queries")
        ap = per_query_ap(base.distmat, base.query, base.gallery)
        valid = np.where(np.isfinite(ap))[0]
        order = valid[np.argsort(ap[valid], kind="stable")]
        for tag, idx in (("worst", order[:5]), ("best", order[::-1][:5])):
            if len(idx):
                rows = rank_list_rows(base.distmat, base.query, base.gallery, idx, topk=10, ap=ap)
                write_png(folder / f"ranklist_{tag}.png", rank_list_image(rows))


def dataset_name(root) -> str:
    """The name a reader knows the dataset by: the folder's, or its parent's where the folder has Market-1501's
    generic name (a synthetic set from ``reid-export synth`` says so)."""
    root = Path(root)
    if root.name.startswith("Market-1501") and (root.parent / "synth.json").exists():
        return f"synthetic crops ({root.parent.name}, reid-export synth)"
    if root.name.startswith("Market-1501") or root.name in ("", "."):
        return f"{root.resolve().parent.name}/{root.name}"
    return root.name


def _gate_text(value) -> str:
    return "off" if value is None else f"{value:g}"


def _over(value: float, gate: float | None) -> bool:
    return gate is not None and value > gate


def _deployment_verdict(row: EvalRow, gates: EvalGates) -> str:
    """PASS / FAIL of a deployment row's cost, or "not gated" when both its gates are off."""
    if gates.max_deployment_map_drop is None and gates.max_deployment_r1_drop is None:
        return "not gated"
    failed = _over(row.cost_map, gates.max_deployment_map_drop) or _over(row.cost_rank1, gates.max_deployment_r1_drop)
    return "FAIL" if failed else "PASS"


def _finite(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


def run_evaluation(models: Sequence["str | Path | Encoder"], dataset_root: str | Path, options: EvalOptions | None = None,
                   gates: EvalGates | None = None, *, config: str | Path | None = None,
                   deployments: Sequence[str] = (), distractors: Sequence[str | Path] = (),
                   chunk_elements: int = 1 << 25, device: str = "cpu", progress: bool = True,
                   skip_bad_images: bool = False, warn: Callable[[str], None] = lambda line: None) -> EvalReport:
    """Rank-1/5/10, mAP, mINP and TPR@FPR of ``models`` on ``dataset_root`` (Market-1501 protocol).

    Deltas are against the first model; ``gates`` turn them into failures. With ``deployments`` each
    model is also run through those preprocessings and their cost is gated. With ``distractors`` the
    gallery grows by those images (pid 0) and the evaluation is streamed over gallery chunks.
    ``warn`` gets the skipped-images lines."""
    options = options or EvalOptions()
    gates = gates or EvalGates()
    dataset = MarketDataset(dataset_root)
    check_queries_have_matches(dataset)
    on_error = "skip" if skip_bad_images else "raise"
    deployments = list(dict.fromkeys(deployments))
    rows, skip_notes = [], []
    for model, model_config in zip(models, configs_for(models, config)):
        with open_encoder(model, config=model_config, device=device) as enc:
            own = None
            for deployment in (None, *deployments):
                use_deployment(enc, deployment)
                if distractors:
                    from .streamed import evaluate_encoder_streamed

                    result = evaluate_encoder_streamed(enc, dataset, distractors, options, progress, on_error=on_error,
                                                       chunk_elements=chunk_elements)
                else:
                    result = evaluate_encoder(enc, dataset, options, progress, on_error=on_error)
                row = EvalRow(model_name(model) + (f"@{deployment}" if deployment else ""), enc.backend,
                              enc.precision, deployment, result)
                if deployment is None:
                    own = row
                elif row.ok and own.ok:
                    row.cost_map, row.cost_rank1 = own.mAP - row.mAP, own.rank1 - row.rank1
                rows.append(row)
                summary = result.row().get("skipped")
                if summary and summary not in skip_notes:  # the same files fail for every model
                    skip_notes.append(summary)
                    warn(summary)
    report = EvalReport(dataset, options, gates, rows, deployments, bool(distractors))
    _fidelity(rows, gates)
    report.failures = _gate(rows, gates)
    if rows[0].ok:
        for row in rows[1:]:
            threshold_shifts(row.metrics, rows[0].metrics)
    _delta_intervals(rows)
    return report


BOOTSTRAP_RESAMPLES = 2000


def per_query_scores(distmat: np.ndarray, query, gallery) -> tuple[np.ndarray, np.ndarray]:
    """(AP, Rank-1 hit) of each query, in percent, NaN where the query has no valid match; the
    Market-1501 protocol (gallery items of the query's identity from its own camera left out)."""
    from .retrieval import per_query_ap

    ap = per_query_ap(distmat, query, gallery) * 100.0
    hit = np.full(len(ap), np.nan)
    for i in np.where(np.isfinite(ap))[0]:
        keep = ~((gallery.pids == query.pids[i]) & (gallery.camids == query.camids[i]))
        row = distmat[i][keep]
        hit[i] = 100.0 * float(gallery.pids[keep][int(np.argmin(row))] == query.pids[i])
    return ap, hit


def paired_interval(base: np.ndarray, other: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES,
                    seed: int = 0) -> tuple[float, float]:
    """95% interval of mean(other - base) over queries, by the paired bootstrap (queries resampled)."""
    valid = np.isfinite(base) & np.isfinite(other)
    diff = (other - base)[valid]
    if diff.size < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, diff.size, (resamples, diff.size))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def _delta_intervals(rows: list[EvalRow]) -> None:
    """For every model against the first: the 95% bootstrap interval of d mAP and d Rank-1 over the
    queries (how far the same two models could differ on another draw of as many queries)."""
    base = rows[0].result
    if len(rows) < 2 or not base.ok or base.distmat is None:
        return
    base_ap, base_hit = per_query_scores(base.distmat, base.query, base.gallery)
    for row in rows[1:]:
        sc = row.result
        if not sc.ok or row.deployment or sc.distmat is None:
            continue
        ap, hit = per_query_scores(sc.distmat, sc.query, sc.gallery)
        row.delta_map_ci95 = tuple(round(v, 3) for v in paired_interval(base_ap, ap))
        row.delta_rank1_ci95 = tuple(round(v, 3) for v in paired_interval(base_hit, hit))


REDUCED_PRECISIONS = ("fp16", "bf16", "int8")
FIDELITY_MAX_IMAGES = 2000


def _fidelity(rows: list[EvalRow], gates: EvalGates) -> None:
    """For each FP16/bf16/INT8 row (not a deployment) of a model whose first model is of another
    precision: its features against the first model's on the same query and gallery images (at most
    ``FIDELITY_MAX_IMAGES``, evenly spaced), judged by the reduced-precision gate."""
    first = rows[0]
    if not first.ok or first.result.features is None:
        return
    base = np.concatenate(first.result.features)
    tol = gates.fidelity or Tolerances.reduced_precision()
    for row in rows[1:]:
        if (not row.ok or row.deployment or row.precision not in REDUCED_PRECISIONS
                or row.precision == first.precision or row.result.features is None):
            continue
        feats = np.concatenate(row.result.features)
        if feats.shape != base.shape:
            continue
        keep = (np.linspace(0, len(base) - 1, FIDELITY_MAX_IMAGES).round().astype(int)
                if len(base) > FIDELITY_MAX_IMAGES else slice(None))
        row.fidelity = compare(base[keep], feats[keep], tol, row.model, row.backend, row.precision)


def _gate(rows: list[EvalRow], gates: EvalGates) -> list[str]:
    """Deltas against the first model (stored in each row), each row's ``status`` and every gate
    that fails. Deployment rows are gated on their cost against the model's own preprocessing, the
    other rows on their drop against the first model; a collapsed model fails either way."""
    base, failed = rows[0], []
    for i, row in enumerate(rows):
        mine = []
        exempt = gates.is_exempt(row.model)
        if not row.ok:
            mine.append(f"{row.model}: {row.error}")
        else:
            if base.ok:
                row.delta_map, row.delta_rank1 = row.mAP - base.mAP, row.rank1 - base.rank1
            if exempt:
                pass
            elif row.deployment:
                if row.cost_map is not None:
                    own_name = Path(row.model.rpartition("@")[0]).name
                    if _over(row.cost_map, gates.max_deployment_map_drop):
                        mine.append(f"{row.model}: the {row.deployment} preprocessing costs {row.cost_map:.2f} "
                                    f"mAP points against {own_name}'s own (gate {gates.max_deployment_map_drop})")
                    if _over(row.cost_rank1, gates.max_deployment_r1_drop):
                        mine.append(f"{row.model}: the {row.deployment} preprocessing costs "
                                    f"{row.cost_rank1:.2f} Rank-1 points against {own_name}'s own "
                                    f"(gate {gates.max_deployment_r1_drop})")
            elif i > 0 and base.ok:
                if _over(-row.delta_map, gates.max_map_drop):
                    mine.append(f"{row.model}: mAP {row.mAP:.2f} is {-row.delta_map:.2f} points below "
                                f"{base.model} (gate {gates.max_map_drop:g}; `gates.max_map_drop` sets it)")
                if _over(-row.delta_rank1, gates.max_r1_drop):
                    mine.append(f"{row.model}: Rank-1 {row.rank1:.2f} is {-row.delta_rank1:.2f} points "
                                f"below {base.model} (gate {gates.max_r1_drop:g}; `gates.max_r1_drop` sets it)")
            fidelity = row.fidelity
            if gates.fidelity is not None and not exempt and fidelity is not None and not fidelity.passed:
                mine.append(f"{row.model}: its {row.precision} features moved from {base.model}'s on "
                            f"{fidelity.num_images} images of the dataset: {'; '.join(fidelity.failures)} (the "
                            "reduced-precision gate of quantize and parity; `gates=EvalGates.off()` reports without "
                            "failing)")
            collapse = row.collapse
            if gates.fail_collapsed and not exempt and collapse is not None and collapse.collapsed:
                mine.append(f"{row.model}: collapsed embeddings (every pair of {collapse.num_images} different "
                            f"images at cosine >= {collapse.min_pair_cosine:.3f}); normalised twice? wrong pixel "
                            "scale? check the data config (reid-export annotate --detect)")
        row.status = ("ERROR" if not row.ok else "FAIL" if mine else "contrast" if exempt
                      else "ok" if gates.active else "not gated")
        failed += mine
    return failed
