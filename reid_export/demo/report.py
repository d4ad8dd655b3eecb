"""report.md for a demo run: tables from the stage manifests and the parity/eval/bench JSON reports,
links to the PNGs and the JSON files beside it. Every section tolerates a missing input (a stage
that failed or was not reached) and says so instead."""

from __future__ import annotations

import json
import math
import os
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from .. import __version__
from ..cpuinfo import load_average
from .pipeline import DEMO_MAX_PAIR_ERROR, UNTRAINED_VARIANT, VARIANTS, Demo, command_line
from .stages import StageRecord


def _num(value: Any, fmt: str = ".2f") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, (int, float)):
        return format(value, fmt)
    return str(value)


def _signed(value: Any, fmt: str = "+.2f") -> str:
    return _num(value, fmt)


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[int] = ()) -> str:
    """A GitHub-flavoured Markdown table; columns listed in ``right`` are right-aligned."""
    cells = [[str(c).replace("|", "\\|") for c in row] for row in rows]
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join(("---:" if i in right else ":---") for i in range(len(headers))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _load_avg(values) -> str:
    return " / ".join(f"{v:.2f}" for v in values) if values else "n/a"


class ReportContext:
    """Labels for the models, loaded JSON reports, and the records of this run."""

    def __init__(self, demo: Demo, records: dict[str, StageRecord], failed: dict[str, str], started: dict):
        self.demo = demo
        self.records = records
        self.failed = failed          # stage -> reason (raised, or check failed)
        self.started = started        # date, load average, cpu at the start of the run
        self.labels: dict[str, tuple[str, str]] = {}
        for key, label, rel in [*VARIANTS, UNTRAINED_VARIANT]:
            self.labels[str(demo.path(rel).resolve())] = (key, label)
        self.parity = _load(demo.path("parity.json"))
        self.eval = _load(demo.path("eval.json"))
        self.bench = _load(demo.path("bench.json"))
        self.data = _load(demo.path("data.json"))

    def label(self, model_path: str) -> str:
        return self.labels.get(str(Path(model_path).resolve()), (None, Path(model_path).name))[1]

    def key(self, model_path: str) -> str | None:
        return self.labels.get(str(Path(model_path).resolve()), (None, None))[0]

    def result(self, stage: str) -> dict:
        rec = self.records.get(stage)
        return rec.result if rec is not None else {}

    def missing(self, stage: str) -> str:
        if stage in self.failed:
            return f"_Not available: the `{stage}` stage failed ({self.failed[stage]})._"
        return f"_Not available: the `{stage}` stage did not run._"

    def link(self, rel: str, text: str | None = None) -> str:
        return f"[{text or rel}]({rel})"

    def image(self, rel: str, alt: str) -> str:
        return f"![{alt}]({rel})" if self.demo.path(rel).is_file() else f"_{rel} not written._"

    def eval_rows(self) -> dict[str, dict]:
        """Eval results by variant key."""
        if not self.eval:
            return {}
        return {self.key(m["model"]) or m["model"]: m for m in self.eval.get("models", [])}


# --------------------------------------------------------------------------- sections

def _header(ctx: ReportContext) -> list[str]:
    demo, s = ctx.demo, ctx.started
    finished = datetime.now(timezone.utc).isoformat(timespec="seconds")
    data_text = (f"the Market-1501-layout folder `{demo.data}`" if demo.data is not None else
                 f"synthetic data ({demo.preset.identities} identities, {demo.preset.cameras} cameras)")
    return [
        "# reid-export demo report", "",
        f"A BoT model (`{Path(demo.preset.config).name}`) trained from scratch on {data_text}, exported to "
        "ONNX FP32, FP16 and INT8 (TensorRT S8S8 and CPU U8S8 flavours), and every variant checked "
        "against the checkpoint (embedding parity), evaluated (Market-1501 protocol) and timed.", "",
        f"- preset `{demo.preset.name}`; reid-export {__version__}; Python {platform.python_version()}",
        f"- machine: {s.get('cpu', 'unknown CPU')}, {os.cpu_count()} cores, torch threads {s.get('threads')}",
        f"- started {s.get('date')}, report written {finished}",
        f"- load average (1/5/15 min) at the start {_load_avg(s.get('load_average'))}, at the end "
        f"{_load_avg(load_average())} "
        "(other processes slow every stage down; the stage table below gives wall and CPU time)",
        "",
    ]


def _summary(ctx: ReportContext) -> list[str]:
    lines = ["## Summary", ""]
    rows = ctx.eval_rows()
    trained, untrained = rows.get("checkpoint"), rows.get("untrained")
    if trained and untrained and "mAP" in trained and "mAP" in untrained:
        gain = trained["mAP"] - untrained["mAP"]
        verdict = "clearly better" if gain >= 10 else ("better" if gain > 0 else "NOT better")
        lines.append(f"- **Training**: the trained model is {verdict} than the same network untrained: mAP "
                     f"{trained['mAP']:.1f} vs {untrained['mAP']:.1f} ({gain:+.1f} points), Rank-1 "
                     f"{trained['Rank-1']:.1f} vs {untrained['Rank-1']:.1f}.")
    variant_rows = [(k, rows[k]) for k, _, _ in VARIANTS[1:] if k in rows and "mAP" in rows[k]]
    if trained and variant_rows:
        worst = max(variant_rows, key=lambda kv: abs(kv[1].get("delta_mAP") or 0.0))
        lines.append(f"- **Accuracy after export**: the largest mAP change against the checkpoint is "
                     f"{_signed(worst[1].get('delta_mAP'))} points ({dict((k, l) for k, l, _ in VARIANTS)[worst[0]]}); "
                     "FP32/FP16/INT8 side by side below.")
    if ctx.parity:
        cands = ctx.parity.get("candidates", [])
        passed = sum(1 for c in cands if c.get("passed"))
        lines.append(f"- **Parity**: {passed}/{len(cands)} variants within their precision's tolerance of the "
                     f"checkpoint on {len(ctx.parity.get('images', []))} query images. FP16 and INT8 are held to the "
                     f"demo's pairwise-error limit {DEMO_MAX_PAIR_ERROR:g} in quantize, parity and eval: the default, "
                     "0.03 (benchmarks/RESULTS.md), refuses this minutes-trained model's INT8.")
    if ctx.bench:
        results = [r for r in ctx.bench.get("results", []) if not r.get("error")]
        if results:
            batch = max(r["batch_size"] for r in results)
            at = {ctx.key(r["model"]): r for r in results if r["batch_size"] == batch}
            best = max(at.items(), key=lambda kv: kv[1]["throughput_ips"])
            text = (f"- **Speed** (CPU, batch {batch}): fastest is {ctx.label(best[1]['model'])} at "
                    f"{best[1]['throughput_ips']:.0f} images/s")
            if "fp32" in at and best[0] != "fp32":
                text += f", {best[1]['throughput_ips'] / at['fp32']['throughput_ips']:.1f}x ONNX FP32"
            if "checkpoint" in at and best[0] != "checkpoint":
                text += f", {best[1]['throughput_ips'] / at['checkpoint']['throughput_ips']:.1f}x torch"
            lines.append(text + ".")
    for stage, reason in ctx.failed.items():
        lines.append(f"- **FAILED** `{stage}`: {reason}")
    if len(lines) == 2:
        lines.append("_No results yet._")
    return lines + [""]


def _data(ctx: ReportContext) -> list[str]:
    lines = ["## Data", ""]
    info = ctx.data
    if not info:
        return lines + [ctx.missing("data"), ""]
    root = info["root"]
    if info.get("source") == "synth":
        lines.append(f"Synthetic Market-1501 layout made by `reid-export synth` in `{root}` "
                     f"({ctx.link('data/synth.json')}): procedural pedestrians whose identity is in their "
                     "clothes, seen by cameras that differ in light, colour, blur and occluders.")
    else:
        lines.append(f"The Market-1501-layout folder `{root}`.")
    lines += ["", md_table(
        ["split", "images", "identities", "note"],
        [["train (bounding_box_train)", info["train"]["images"], info["train"]["identities"],
          "training and INT8 calibration"],
         ["query", info["query"]["images"], info["query"]["identities"], "parity images, eval queries"],
         ["gallery (bounding_box_test)", info["gallery"]["images"], info["gallery"]["identities"],
          f"+ {info['gallery']['distractors']} distractors"]],
        right=(1, 2)), ""]
    return lines


def _training(ctx: ReportContext) -> list[str]:
    lines = ["## Training", ""]
    res = ctx.result("train")
    if not res:
        return lines + [ctx.missing("train"), ""]
    cfg_text = ctx.demo.path("train/config.yaml")
    cfg = None
    if cfg_text.is_file():
        from ..config import load_config

        cfg = load_config(cfg_text)
    if cfg is not None:
        s = cfg.SOLVER
        lines.append(
            f"`reid-train` with `{ctx.demo.preset.config}`: ResNet-{str(cfg.MODEL.BACKBONE.DEPTH).rstrip('x')} "
            f"(last stride {cfg.MODEL.BACKBONE.LAST_STRIDE}, from scratch), BNNeck, input "
            f"{cfg.INPUT.SIZE_TRAIN[0]}x{cfg.INPUT.SIZE_TRAIN[1]}, {s.OPT} lr {s.BASE_LR:g} (warmup "
            f"{s.WARMUP_ITERS} iterations, x{s.GAMMA:g} from epoch {', '.join(map(str, s.STEPS))}), "
            f"{s.MAX_EPOCH} epochs, batch {s.IMS_PER_BATCH} "
            f"({s.IMS_PER_BATCH // cfg.DATALOADER.NUM_INSTANCE} identities x {cfg.DATALOADER.NUM_INSTANCE}), "
            f"cross-entropy (label smoothing {cfg.MODEL.LOSSES.CE.EPSILON:g}) + triplet (margin "
            f"{cfg.MODEL.LOSSES.TRI.MARGIN:g}).")
        lines.append("")
    lines.append(md_table(
        ["epochs", "iterations", "images/epoch", "loss first -> last", "img/s (median)", "training time"],
        [[res["epochs"], res["iterations"], res["images_per_epoch"],
          f"{res['loss_first']:.3f} -> {res['loss_last']:.3f}", _num(res["img_per_s_median"], ".1f"),
          f"{res['train_seconds']:.0f} s" + (" (resumed)" if res.get("resumed") else "")]],
        right=(0, 1, 2, 4)))
    lines += ["", "Loss by epoch: " + ", ".join(f"{v:.2f}" for v in res["loss_by_epoch"]) + "", ""]
    rows = ctx.eval_rows()
    trained, untrained = rows.get("checkpoint"), rows.get("untrained")
    if trained and untrained and "mAP" in trained and "mAP" in untrained:
        keys = ["Rank-1", "Rank-5", "Rank-10", "mAP", "mINP"]
        lines += ["Trained vs untrained (the same network with the training run's initial weights), by "
                  "`reid-export eval` on the test split:", "",
                  md_table(["model", *keys],
                           [["untrained (random init)", *[_num(untrained[k]) for k in keys]],
                            ["trained (checkpoint)", *[_num(trained[k]) for k in keys]],
                            ["**gain**", *[f"**{trained[k] - untrained[k]:+.2f}**" for k in keys]]],
                           right=range(1, 6)), ""]
    else:
        lines += [ctx.missing("eval"), ""]
    lines += [f"Files: {ctx.link('train/history.jsonl')} (one line per epoch), {ctx.link('train/log.txt')}, "
              f"{ctx.link('train/config.yaml')}; checkpoint `train/model_final.pth`.", ""]
    return lines


def _models(ctx: ReportContext) -> list[str]:
    lines = ["## Exported models", ""]
    rows = []
    onnx = ctx.result("onnx")
    ckpt = ctx.demo.path(VARIANTS[0][2])
    if ckpt.is_file():
        rows.append([VARIANTS[0][1], f"`{VARIANTS[0][2]}`", _num(ckpt.stat().st_size / 1e6, ".1f"),
                     "reid-train checkpoint (weights, optimizer state, config, data config)", "-", "-"])
    if onnx:
        rows.append([VARIANTS[1][1], f"`{VARIANTS[1][2]}`", _num(onnx["size_mb"], ".1f"),
                     f"opset {onnx['opset']}, batch {onnx['batch']}, {onnx['nodes']} nodes",
                     f"max rel L2 vs torch {_num(onnx['max_rel_l2_vs_torch'], '.1e')}", _num(onnx["seconds"], ".0f")])
    for key, label, rel in VARIANTS[2:]:
        res = ctx.result(key)
        if not res:
            continue
        if res["precision"] == "fp16":
            how = f"FP16 graph, FP32 I/O; {res['kept_float']} nodes kept FP32 (head)"
        else:
            how = (f"{res['target']}, {res['method']} calibration on {res['calibration_images']} train images; "
                   f"{res['kept_float']} nodes float")
        vs = res.get("vs_fp32") or {}
        rows.append([label, f"`{rel}`", _num(res["size_mb"], ".1f"), how,
                     f"min cosine {_num(vs.get('min_cosine'), '.5f')}, max rel L2 {_num(vs.get('max_rel_l2'), '.1e')}",
                     _num(res["seconds"], ".0f")])
    if not rows:
        return lines + [ctx.missing("onnx"), ""]
    lines += [md_table(["variant", "file", "MB", "how", "agreement when made", "s"], rows, right=(2, 5)), "",
              "(The agreement column is the exporter's own check when the file was written: against torch for "
              "FP32, against the FP32 ONNX on calibration images for FP16/INT8.)", ""]
    return lines


def _parity(ctx: ReportContext) -> list[str]:
    lines = ["## Parity (each variant vs the checkpoint)", ""]
    doc = ctx.parity
    if not doc:
        return lines + [ctx.missing("parity"), ""]
    rows = []
    for c in doc.get("candidates", []):
        tol = c.get("tolerances", {})
        rows.append([ctx.label(c["candidate"]), c["precision"], _num(c["min_cosine"], ".6f"),
                     _num(c["mean_cosine"], ".6f"), _num(c["max_rel_l2"], ".2e"), f"{c['top1_agreement']:.0%}",
                     f"cos >= {tol.get('min_cosine')}, L2 <= {tol.get('max_rel_l2')}",
                     "PASS" if c["passed"] else "**FAIL**"])
    lines += [f"Embeddings of {len(doc.get('images', []))} query images, each model with its own preprocessing "
              f"from its data config; tolerances by precision. Report: {ctx.link('parity.json')}.", "",
              md_table(["variant", "prec", "min cosine", "mean cosine", "max rel L2", "same top-1", "tolerance",
                        "result"], rows, right=(2, 3, 4, 5)), ""]
    for c in doc.get("candidates", []):
        if not c["passed"]:
            lines.append(f"- {ctx.label(c['candidate'])}: {'; '.join(c.get('failures', []))}")
    return lines + [""]


def _accuracy(ctx: ReportContext) -> list[str]:
    lines = ["## Accuracy across backends", ""]
    doc = ctx.eval
    if not doc:
        return lines + [ctx.missing("eval"), ""]
    keys = ["Rank-1", "Rank-5", "mAP", "mINP"]
    tpr = [k for k in (doc["models"][0] if doc.get("models") else {}) if k.startswith("TPR@")][-1:]
    rows = []
    for m in doc.get("models", []):
        if "error" in m:
            rows.append([ctx.label(m["model"]), m.get("backend"), m.get("precision"), *["-"] * (len(keys) + len(tpr)),
                         "-", "-", f"ERROR: {m['error']}"])
            continue
        rows.append([ctx.label(m["model"]), m["backend"], m["precision"], *[_num(m[k]) for k in keys],
                     *[_num(m.get(k)) for k in tpr], _signed(m.get("delta_mAP")), _signed(m.get("delta_Rank-1")), "ok"])
    opts = doc.get("options", {})
    lines += [f"Market-1501 protocol on `{Path(doc['dataset']).name}` ({doc['num_query']} queries, "
              f"{doc['num_gallery']} gallery images), {opts.get('metric', 'cosine')} distance"
              f"{', flip test' if opts.get('flip_test') else ''}; deltas in points against the checkpoint (first "
              f"row). Report: {ctx.link('eval.json')}.", "",
              md_table(["model", "backend", "prec", *keys, *tpr, "d mAP", "d Rank-1", "status"], rows,
                       right=range(3, 3 + len(keys) + len(tpr) + 2)), ""]
    if ctx.demo.plots:
        lines += ["ROC over all query-gallery pairs (one curve per model, the untrained one included):", "",
                  ctx.image("plots/roc.png", "ROC curves"), "",
                  "Rank lists of the checkpoint: query on the left, then the top 10 (green border: same person, "
                  "red: another). Best queries:", "",
                  ctx.image("plots/ranklist_best.png", "best rank lists"), "", "Worst queries:", "",
                  ctx.image("plots/ranklist_worst.png", "worst rank lists"), ""]
    else:
        lines += ["_No plots: matplotlib is not installed (`pip install matplotlib`)._", ""]
    return lines


def _speed(ctx: ReportContext) -> list[str]:
    lines = ["## Speed", ""]
    doc = ctx.bench
    if not doc:
        return lines + [ctx.missing("bench"), ""]
    env, s = doc.get("environment", {}), doc.get("settings", {})
    flags = ", ".join(env.get("cpu_flags") or []) or "no AVX2/AVX-512/VNNI flags"
    lines.append(f"`reid-export bench` on {env.get('cpu', '?')} ({flags}), {s.get('threads')} threads, "
                 f"{s.get('device', 'cpu')}; models take turns "
                 f"({s.get('rounds')} rounds), {s.get('duration_s', s.get('duration'))} s timed per model and batch "
                 f"size; inputs generated once, untimed. Load average before {_load_avg(env.get('load_average_before'))}"
                 f", after {_load_avg(env.get('load_average_after'))} on {env.get('cpu_count', '?')} cores: a short run, "
                 "and where the load exceeds the core count other processes distort even the ratios; for figures "
                 "to quote, rerun the bench on a quiet machine (the command is under Reproduce). Reports: "
                 f"{ctx.link('bench.json')}, {ctx.link('bench.csv')}.")
    rows = []
    for r in sorted(doc.get("results", []), key=lambda r: r["batch_size"]):
        if r.get("error"):
            rows.append([ctx.label(r["model"]), r["batch_size"], "-", "-", "-", "-", f"ERROR: {r['error']}"])
            continue
        rows.append([ctx.label(r["model"]), r["batch_size"], _num(r["median_ms"], ".2f"), _num(r["p90_ms"], ".2f"),
                     _num(r["throughput_ips"], ".1f"), f"{r['speedup_vs_first']:.2f}x" if r.get("speedup_vs_first")
                     else "-", r.get("iterations", "")])
    lines += ["", md_table(["model", "batch", "median ms", "p90 ms", "img/s", "vs torch", "calls"], rows,
                           right=(1, 2, 3, 4, 5, 6)), ""]
    if ctx.demo.plots:
        lines += ["Throughput and median latency against batch size:", "", ctx.image("bench.png", "bench plot"), ""]
    lines += ["ONNX Runtime's CPU provider computes FP16 graphs in FP32 (FP16 pays off on a GPU), and the "
              "TensorRT-flavour INT8 graph keeps Q/DQ around every convolution for TensorRT, so on this CPU the "
              "U8S8 `int8-cpu` graph is the fast one.", ""]
    return lines


def _stages(ctx: ReportContext, order: Sequence[str]) -> list[str]:
    rows, total_wall, total_cpu = [], 0.0, 0.0
    for i, name in enumerate(order, 1):
        rec = ctx.records.get(name)
        if rec is None:
            rows.append([i, name, "failed" if name in ctx.failed else "not reached", "-", "-", "-", "-"])
            continue
        m = rec.manifest
        total_wall += m.get("seconds", 0.0)
        total_cpu += m.get("cpu_seconds", 0.0)
        rows.append([i, name, rec.status, _num(m.get("seconds"), ".1f"), _num(m.get("cpu_seconds"), ".0f"),
                     _load_avg((m.get("load_average_start") or [])[:1]), m.get("finished", "-")])
    return ["## Stages", "",
            "Each stage's outputs are fingerprinted in `stages/<stage>.json` with the fingerprints of its inputs; "
            "a re-run reuses a stage whose inputs and outputs are unchanged (`--force` redoes all). Times are "
            "those of the run that made the outputs; each stage's log is `logs/<stage>.log`.", "",
            md_table(["#", "stage", "this run", "wall s", "CPU s", "load (1 min) at start", "finished (UTC)"], rows,
                     right=(0, 3, 4, 5)),
            "", f"Total: {total_wall:.0f} s wall, {total_cpu:.0f} s CPU.", ""]


def _files(ctx: ReportContext) -> list[str]:
    entries = [("parity.json", "embedding parity per variant"), ("eval.json", "Rank-k/mAP/mINP/TPR per model"),
               ("bench.json", "latency percentiles, throughput, environment"), ("bench.csv", "the bench table"),
               ("demo.json", "this run: stages, timings, key figures"), ("data.json", "the dataset used"),
               ("train/history.jsonl", "training statistics per epoch")]
    lines = ["## Files", ""]
    for rel, what in entries:
        if ctx.demo.path(rel).is_file():
            lines.append(f"- {ctx.link(rel)}: {what}")
    lines.append("- `models/`: the ONNX variants and the untrained checkpoint; `train/`: the trainer's output")
    return lines + [""]


def _reproduce(ctx: ReportContext, order: Sequence[str]) -> list[str]:
    lines = ["## Reproduce", "",
             "The command behind each stage (paths inside this folder relative to it, others as given; the demo runs them in-process):", "",
             "```bash"]
    for name in order:
        command = ctx.result(name).get("command")
        if command:
            lines.append(f"{command[0]} {command_line(command[1:], ctx.demo.workdir)}")
    lines += ["```", ""]
    return lines


def render(ctx: ReportContext, order: Sequence[str]) -> str:
    parts = [_header, _summary, _data, _training, _models, _parity, _accuracy, _speed]
    lines: list[str] = []
    for part in parts:
        try:
            lines += part(ctx)
        except Exception as exc:  # noqa: BLE001 - a broken section must not hide the others
            lines += [f"_({part.__name__.strip('_')} section could not be written: {type(exc).__name__}: {exc})_", ""]
    lines += _stages(ctx, order) + _files(ctx) + _reproduce(ctx, order)
    return "\n".join(lines).rstrip() + "\n"
