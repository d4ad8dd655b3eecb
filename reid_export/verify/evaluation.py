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
from ..embeddings import CollapseStats, Tolerances, compare
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
class EvalReport:
    dataset: MarketDataset
    options: EvalOptions
    gates: EvalGates
    results: list[dict]                        # per model (and deployment): its row (metrics, or "error")
    scored: list[EvalResult] = field(default_factory=list)  # the same, with the arrays behind them
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
        results, base = self.results, self.results[0]
        tpr_keys = [k for k in base if k.startswith("TPR@")] if "error" not in base else []
        rows = []
        for res in results:
            name = [Path(res["model"]).name, res["backend"], res["precision"]]
            status = res.get("status", "ok")
            if "error" in res:
                rows.append(name + ["-"] * (len(METRIC_KEYS) + len(tpr_keys[-1:]) + 2) + [status])
            else:
                ci = res.get("delta_mAP_ci95")
                rows.append(name + [res[k] for k in METRIC_KEYS] + [res.get(k) for k in tpr_keys[-1:]]
                            + [res.get("delta_mAP"), f"[{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else "-", status])
        o, ds = self.options, self.dataset
        lines = [f"dataset: {ds.root} ({len(ds.query)} queries, {len(ds.gallery)} gallery); metric {o.metric}"
                 f"{', flip' if o.flip_test else ''}{', AQE' if o.aqe else ''}{', re-rank' if o.rerank else ''}"
                 f"; gates: {self.gates.describe()}",
                 format_table(["model", "backend", "prec", *METRIC_KEYS, *tpr_keys[-1:], "d mAP", "d mAP 95% CI",
                               "status"], rows, floatfmt=".2f")]
        if self.distractors and "error" not in base:
            lines.append(f"gallery + {base['num_distractors']} distractors = {base['num_gallery']} items, streamed "
                         f"exact evaluation; peak RSS {max(r.get('peak_rss_mib', 0) for r in results):.0f} MiB")
        if self.deployments:
            g = self.gates
            lines.append("\ncost of each deployment's preprocessing against the model's own (points; gates mAP "
                         f"{_gate_text(g.max_deployment_map_drop)}, Rank-1 {_gate_text(g.max_deployment_r1_drop)}):")
            lines.append(format_table(
                ["model", "deployment", "Rank-1", "mAP", "cost Rank-1", "cost mAP", "result"],
                [[Path(r["model"]).name.rpartition("@")[0], r["deployment"], r["Rank-1"], r["mAP"], r["cost_Rank-1"],
                  r["cost_mAP"], _deployment_verdict(r, g)]
                 for r in results if r.get("deployment") and "cost_mAP" in r], floatfmt=".2f"))
        lines += self.fidelity_lines()
        lines += self.threshold_lines()
        lines += [f"FAIL {line}" for line in self.failures]
        return "\n".join(lines)

    def collapse_warnings(self) -> list[str]:
        """One warning line per model (or deployment row) whose embeddings collapsed (the CLI prints them
        once the report is written; the gate's FAIL line is in the table)."""
        return [CollapseStats(**r["collapse"]).warning(r["model"]) for r in self.results
                if r.get("collapse") and r["collapse"]["collapsed"]]

    def fidelity_lines(self) -> list[str]:
        """Each reduced-precision row's features against the first model's on the same images."""
        rows = [[Path(r["model"]).name, r["precision"], f["images"], f["pair_error"], f["min_cosine"], f["mean_cosine"],
                 f"{f['top1_agreement']:.1%}", "PASS" if f["passed"] else ("FAIL" if self.gates.fidelity else "not gated")]
                for r in self.results if (f := r.get("fidelity"))]
        if not rows:
            return []
        return [f"\nfidelity to {Path(self.results[0]['model']).name} on the eval's own images (the reduced-precision "
                "gate of quantize and parity):",
                format_table(["model", "prec", "images", "pair error", "min cos", "mean cos", "top-1", "result"], rows,
                             floatfmt=".4f")]

    def threshold_lines(self) -> list[str]:
        """The compact thresholds table: per model (and deployment) the cosine distance at each FMR,
        the true-match rate there and the shift against the first model."""
        rows, notes, fmrs = [], [], None
        for res in self.results:
            th = res.get("thresholds")
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
            model = Path(res["model"]).name
            rows.append([model.rpartition("@")[0] if res.get("deployment") else model, res["precision"],
                         res.get("deployment") or "-", *cells])
        if not rows:
            return []
        first = Path(self.results[0]["model"]).name
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
                    "models": [{k: _finite(v) for k, v in r.items()} for r in self.results],
                    "failures": self.failures, "passed": self.passed})
        return doc

    def write_plots(self, folder: Path) -> None:
        """``roc.png`` (every model) and the first model's best and worst rank lists."""
        if not self.scored or self.scored[0].distmat is None:
            return  # the first model failed, or a streamed evaluation (no matrix held)
        from . import metrics
        from .retrieval import per_query_ap
        from .plots import rank_list_image, rank_list_rows, roc_plot, write_png

        folder.mkdir(parents=True, exist_ok=True)
        curves = {}
        for i, (res, scored) in enumerate(zip(self.results, self.scored)):
            if scored.distmat is None:
                continue
            q, g = scored.query, scored.gallery
            curves[f"{i + 1}. {Path(res['model']).name} ({res['backend']}, {res['precision']})"] = metrics.roc_curve(
                scored.distmat, q.pids, g.pids, q.camids, g.camids)
        roc_plot(curves, folder / "roc.png", title=f"ROC on {dataset_name(self.dataset.root)}: "
                                                      f"{len(self.scored[0].query.pids)} queries")
        base = self.scored[0]
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


def _deployment_verdict(row: dict, gates: EvalGates) -> str:
    """PASS / FAIL of a deployment row's cost, or "not gated" when both its gates are off."""
    if gates.max_deployment_map_drop is None and gates.max_deployment_r1_drop is None:
        return "not gated"
    failed = (_over(row["cost_mAP"], gates.max_deployment_map_drop)
              or _over(row["cost_Rank-1"], gates.max_deployment_r1_drop))
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
    results, scored, skip_notes = [], [], []
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
                scored.append(result)
                res = result.row()
                res.update({"model": model_name(model) + (f"@{deployment}" if deployment else ""), "backend": enc.backend,
                            "precision": enc.precision, "deployment": deployment})
                if deployment is None:
                    own = res
                elif "error" not in res and "error" not in own:
                    res["cost_mAP"] = own["mAP"] - res["mAP"]
                    res["cost_Rank-1"] = own["Rank-1"] - res["Rank-1"]
                results.append(res)
                if res.get("skipped") and res["skipped"] not in skip_notes:  # the same files fail for every model
                    skip_notes.append(res["skipped"])
                    warn(res["skipped"])
    report = EvalReport(dataset, options, gates, results, scored, deployments, bool(distractors))
    _fidelity(results, scored, gates)
    report.failures = _gate(results, gates)
    if "error" not in results[0]:
        for res in results[1:]:
            threshold_shifts(res, results[0])
    _delta_intervals(results, scored)
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


def _delta_intervals(results: list[dict], scored: list) -> None:
    """For every model against the first: the 95% bootstrap interval of d mAP and d Rank-1 over the
    queries (how far the same two models could differ on another draw of as many queries)."""
    if len(results) < 2 or "error" in results[0] or not scored or getattr(scored[0], "distmat", None) is None:
        return
    base = scored[0]
    base_ap, base_hit = per_query_scores(base.distmat, base.query, base.gallery)
    for res, sc in zip(results[1:], scored[1:]):
        if "error" in res or res.get("deployment") or getattr(sc, "distmat", None) is None:
            continue
        ap, hit = per_query_scores(sc.distmat, sc.query, sc.gallery)
        res["delta_mAP_ci95"] = [round(v, 3) for v in paired_interval(base_ap, ap)]
        res["delta_Rank-1_ci95"] = [round(v, 3) for v in paired_interval(base_hit, hit)]


REDUCED_PRECISIONS = ("fp16", "bf16", "int8")
FIDELITY_MAX_IMAGES = 2000


def _fidelity(results: list[dict], scored: list, gates: EvalGates) -> None:
    """For each FP16/bf16/INT8 row (not a deployment) of a model whose first model is of another
    precision: its features against the first model's on the same query and gallery images (at most
    ``FIDELITY_MAX_IMAGES``, evenly spaced), judged by the reduced-precision gate."""
    if not scored or "error" in results[0] or getattr(scored[0], "features", None) is None:
        return
    base = np.concatenate(scored[0].features)
    tol = gates.fidelity or Tolerances.reduced_precision()
    for res, sc in zip(results[1:], scored[1:]):
        if ("error" in res or res.get("deployment") or res["precision"] not in REDUCED_PRECISIONS
                or res["precision"] == results[0]["precision"] or getattr(sc, "features", None) is None):
            continue
        feats = np.concatenate(sc.features)
        if feats.shape != base.shape:
            continue
        rows = (np.linspace(0, len(base) - 1, FIDELITY_MAX_IMAGES).round().astype(int)
                if len(base) > FIDELITY_MAX_IMAGES else slice(None))
        measured = compare(base[rows], feats[rows], tol)
        res["fidelity"] = {**{k: _finite(v) for k, v in measured.measures().items()}, "passed": measured.passed,
                           "failures": measured.failures}


def _gate(results: list[dict], gates: EvalGates) -> list[str]:
    """Deltas against the first model (stored in each result), each row's ``status`` and every gate
    that fails. Deployment rows are gated on their cost against the model's own preprocessing, the
    other rows on their drop against the first model; a collapsed model fails either way."""
    base, failed = results[0], []
    for i, res in enumerate(results):
        mine = []
        exempt = gates.is_exempt(res["model"])
        if "error" in res:
            mine.append(f"{res['model']}: {res['error']}")
        else:
            if "error" not in base:
                res["delta_mAP"] = res["mAP"] - base["mAP"]
                res["delta_Rank-1"] = res["Rank-1"] - base["Rank-1"]
            if exempt:
                pass
            elif res.get("deployment"):
                if "cost_mAP" in res:
                    own_name = Path(res["model"].rpartition("@")[0]).name
                    if _over(res["cost_mAP"], gates.max_deployment_map_drop):
                        mine.append(f"{res['model']}: the {res['deployment']} preprocessing costs {res['cost_mAP']:.2f} "
                                    f"mAP points against {own_name}'s own (gate {gates.max_deployment_map_drop})")
                    if _over(res["cost_Rank-1"], gates.max_deployment_r1_drop):
                        mine.append(f"{res['model']}: the {res['deployment']} preprocessing costs "
                                    f"{res['cost_Rank-1']:.2f} Rank-1 points against {own_name}'s own "
                                    f"(gate {gates.max_deployment_r1_drop})")
            elif i > 0 and "error" not in base:
                if _over(-res["delta_mAP"], gates.max_map_drop):
                    mine.append(f"{res['model']}: mAP {res['mAP']:.2f} is {-res['delta_mAP']:.2f} points below "
                                f"{base['model']} (gate {gates.max_map_drop:g}; `gates.max_map_drop` sets it)")
                if _over(-res["delta_Rank-1"], gates.max_r1_drop):
                    mine.append(f"{res['model']}: Rank-1 {res['Rank-1']:.2f} is {-res['delta_Rank-1']:.2f} points "
                                f"below {base['model']} (gate {gates.max_r1_drop:g}; `gates.max_r1_drop` sets it)")
            fidelity = res.get("fidelity")
            if gates.fidelity is not None and not exempt and fidelity and not fidelity["passed"]:
                mine.append(f"{res['model']}: its {res['precision']} features moved from {base['model']}'s on "
                            f"{fidelity['images']} images of the dataset: {'; '.join(fidelity['failures'])} (the "
                            "reduced-precision gate of quantize and parity; `gates=None` reports without failing)")
            collapse = res.get("collapse")
            if gates.fail_collapsed and not exempt and collapse and collapse["collapsed"]:
                mine.append(f"{res['model']}: collapsed embeddings (every pair of {collapse['num_images']} different "
                            f"images at cosine >= {collapse['min_pair_cosine']:.3f}); normalised twice? wrong pixel "
                            "scale? check the data config (reid-export annotate --detect)")
        res["status"] = ("ERROR" if "error" in res else "FAIL" if mine else "contrast" if exempt
                         else "ok" if gates.active else "not gated")
        failed += mine
    return failed
