#!/usr/bin/env python3
"""The INT8 "must show" table of issue 25: the quantizer's *defaults*, both flavours, on five models.

For each model (an FP32 ONNX with its data config) the script runs the CLI as a user would and caches
every artifact, log and feature file under ``--work`` (a rerun recomputes nothing that is there):

``quantize``  ``reid-export quantize MODEL -o OUT --precision int8 --target {tensorrt,cpu} --calib-dir CAL
              --threads T --report R.json`` (default everything else): the default outcome (exit code,
              written or refused); then the same command plus ``--allow-below-gate`` (the same search,
              ``allow_below_gate`` is read only after it: the best candidate is written, marked
              below-gate); and ``--precision fp16`` with the same ``--calib-dir`` (FP16 is gated on real
              crops). Each run's exit code, wall seconds and load average go to ``NAME.KIND.facts.json``.
``modelopt``  NVIDIA ModelOpt's ONNX INT8 (``--quantize_mode int8``, ``--calibration_method entropy`` (its
              default) and ``max``) on a copy of the model, calibrated on the 512 crops our quantizer
              calibrates on: ``benchmarks/modelopt_compare.py``'s code path (``run_modelopt``).
``measure``   every graph against the FP32 model: label-free fidelity on the quantizer's held-out crops
              (pair error, min/mean cosine, top-1 agreement: ``modelopt_compare.held_out_metrics``), and
              Rank-1/mAP on each test set (cosine, no flip, as ``eval``) with the paired per-query
              differences (mean and 2 sd/sqrt(n)). ModelOpt's graphs run with ONNX Runtime's graph
              optimisation off (its CPU optimiser breaks them: see RESULTS.md), ours with the defaults.
``table``     the markdown table of RESULTS.md from the JSON (no number is typed by hand).

Two models are made here: ``train-mobilenet`` (a MobileNetV3-small-like gated net defined below: depthwise
convolutions, squeeze-excitation gates with hard-sigmoid, hard-swish; CE + triplet on CUHK03
bounding_box_train, then exported and annotated with ``reid-export annotate``) and the BoT-R18 (``reid-train``,
then ``reid-export onnx``; see RESULTS.md for the command).

    python benchmarks/int8_must_show.py quantize --model osnet05=S/osnet05.onnx --work W --calib-dir CAL
    python benchmarks/int8_must_show.py modelopt --model osnet05=S/osnet05.onnx --work W --calib-dir CAL \\
        --modelopt-python /work/scratch-modelopt/venv/bin/python
    python benchmarks/int8_must_show.py measure --model osnet05=S/osnet05.onnx --work W --calib-dir CAL \\
        --set cuhk03=CUHK_ROOT --set market-mini=MARKET_ROOT -o benchmarks/int8_must_show.json
    python benchmarks/int8_must_show.py table benchmarks/int8_must_show.json
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

import common

TARGETS = ("tensorrt", "cpu")
MODELOPT_METHODS = ("entropy", "max")


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def parse_models(specs: list[str]) -> dict[str, Path]:
    out = {}
    for spec in specs:
        name, _, path = spec.partition("=")
        if not path:
            raise SystemExit(f"--model NAME=PATH, got {spec!r}")
        out[name] = Path(path)
    return out


# ----------------------------------------------------------------------------------------------- quantize

def quantize_kinds(targets=TARGETS) -> list[str]:
    """The CLI runs per model: each target's default run and its --allow-below-gate run, then FP16."""
    return [f"int8-{t}-{m}" for t in targets for m in ("default", "allow")] + ["fp16"]


def quantize_command(model: Path, out: Path, kind: str, calib_dir: Path, threads: int) -> list[str]:
    """The user's command line for one run (``kind`` from :func:`quantize_kinds`)."""
    cmd = common.cli_command("quantize", model, "-o", out)
    if kind == "fp16":
        cmd += ["--precision", "fp16"]
    else:
        _, target, mode = kind.split("-")
        cmd += ["--precision", "int8", "--target", target]
        if mode == "allow":
            cmd += ["--allow-below-gate"]
    cmd += ["--calib-dir", str(calib_dir), "--threads", str(threads), "--report", str(out.with_suffix(".json"))]
    return cmd


def run_logged(cmd: list[str], facts_path: Path) -> dict:
    """Run ``cmd`` (``quantize_command``'s: ``python -m reid_export ARGS``) with its output to ``*.log``; exit code,
    wall seconds and load average to ``facts_path``."""
    load0 = common.load_average()
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    step = common.run_step(*cmd[3:], log_file=Path(str(facts_path).replace(".facts.json", ".log")), say=None)
    facts = {"command": " ".join(["python3"] + cmd[1:]), "returncode": step.returncode,
             "seconds": round(step.seconds, 1), "started_utc": started, "load_average_start": load0,
             "load_average_end": common.load_average()}
    common.write_json(facts_path, facts, command=facts["command"], indent=1)
    return facts


def cmd_quantize(args) -> int:
    runs = args.work / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    for name, model in parse_models(args.model).items():
        for kind in quantize_kinds(args.targets.split(",")):
            if args.kinds and kind not in args.kinds.split(","):
                continue
            out = runs / f"{name}.{kind}.onnx"
            facts_path = runs / f"{name}.{kind}.facts.json"
            if facts_path.is_file():
                log(f"{name} {kind}: cached ({json.loads(facts_path.read_text())['returncode']=})")
                continue
            if (runs / f"{name}.{kind}.log").is_file() and not args.rerun:
                log(f"{name} {kind}: a log but no facts: running in another process or interrupted (--rerun)")
                continue
            log(f"{name} {kind}: running")
            facts = run_logged(quantize_command(model, out, kind, args.calib_dir, args.threads), facts_path)
            log(f"{name} {kind}: exit {facts['returncode']} in {facts['seconds']} s")
    return 0


# ----------------------------------------------------------------------------------------------- modelopt

def cmd_modelopt(args) -> int:
    from modelopt_compare import run_modelopt

    from reid_export.export.metadata import load_onnx, require_data_config
    from reid_export.export.quantize import (
        DEFAULT_CALIB_SIZE,
        DEFAULT_VAL_SIZE,
        select_images,
    )
    from reid_export.preprocess import preprocess

    calib_paths, _ = select_images([args.calib_dir], DEFAULT_CALIB_SIZE, [], DEFAULT_VAL_SIZE, 0, lambda line: None)
    for name, model in parse_models(args.model).items():
        dc = require_data_config(load_onnx(model), model)
        calib = args.work / "modelopt" / f"calib_{name}.npy"
        calib.parent.mkdir(parents=True, exist_ok=True)
        for method in args.methods.split(","):
            folder = args.work / "modelopt" / f"{name}-{method}"
            if (folder / "facts.json").is_file():
                log(f"{name} modelopt {method}: cached")
                continue
            if not calib.is_file():
                np.save(calib, preprocess(calib_paths, dc).astype(np.float32))
            facts = run_modelopt(args.modelopt_python, model, method, calib, folder, args.threads, True)
            facts["load_average_end"] = common.load_average()
            common.write_json(folder / "facts.json", facts, command=facts.get("command"), indent=1)
            log(f"{name} modelopt {method}: {facts}")
        if calib.is_file():
            calib.unlink()  # 200 MB; ModelOpt's runs are cached in their folders
    return 0


# --------------------------------------------------------------------------- a MobileNetV3-small-like ReID net

def build_mobilenet(num_classes: int, feat_dim: int = 512):
    """A MobileNetV3-small-like network (depthwise separable inverted residuals, squeeze-excitation gates
    with hard-sigmoid, hard-swish) with a BNNeck head: eval output = the BatchNorm'd ``feat_dim`` embedding."""
    import torch
    from torch import nn

    def conv_bn(cin, cout, k, s, groups=1, act=None):
        layers = [nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
        return layers + ([act()] if act else [])

    class SE(nn.Module):
        def __init__(self, c, r=4):
            super().__init__()
            mid = max(8, c // r)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc1, self.fc2 = nn.Conv2d(c, mid, 1), nn.Conv2d(mid, c, 1)
            self.relu, self.gate = nn.ReLU(inplace=True), nn.Hardsigmoid()

        def forward(self, x):
            return x * self.gate(self.fc2(self.relu(self.fc1(self.pool(x)))))

    class Block(nn.Module):
        def __init__(self, cin, exp, cout, k, s, se, act):
            super().__init__()
            layers = [] if exp == cin else conv_bn(cin, exp, 1, 1, act=act)
            layers += conv_bn(exp, exp, k, s, groups=exp, act=act)
            if se:
                layers.append(SE(exp))
            layers += conv_bn(exp, cout, 1, 1)
            self.body = nn.Sequential(*layers)
            self.residual = s == 1 and cin == cout

        def forward(self, x):
            y = self.body(x)
            return x + y if self.residual else y

    # MobileNetV3-small's table (in, expansion, out, kernel, stride, SE, activation); the last stride 1 as ReID nets keep
    # a larger final map
    RE, HS = nn.ReLU, nn.Hardswish
    spec = [(16, 16, 16, 3, 2, True, RE), (16, 72, 24, 3, 2, False, RE), (24, 88, 24, 3, 1, False, RE),
            (24, 96, 40, 5, 2, True, HS), (40, 240, 40, 5, 1, True, HS), (40, 240, 40, 5, 1, True, HS),
            (40, 120, 48, 5, 1, True, HS), (48, 144, 48, 5, 1, True, HS), (48, 288, 96, 5, 1, True, HS),
            (96, 576, 96, 5, 1, True, HS), (96, 576, 96, 5, 1, True, HS)]

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(*conv_bn(3, 16, 3, 2, act=HS))
            self.blocks = nn.Sequential(*[Block(*s) for s in spec])
            self.last = nn.Sequential(*conv_bn(96, 576, 1, 1, act=HS))
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.embed = nn.Linear(576, feat_dim)
            self.act = nn.Hardswish()
            self.neck = nn.BatchNorm1d(feat_dim)
            self.neck.bias.requires_grad_(False)
            self.classifier = nn.Linear(feat_dim, num_classes, bias=False)

        def forward(self, x):
            f = self.act(self.embed(torch.flatten(self.pool(self.last(self.blocks(self.stem(x)))), 1)))
            b = self.neck(f)
            return b if not self.training else (f, self.classifier(b))

    return Net()


MOBILENET_CONFIG = dict(height=128, width=64, channel_order="rgb", pixel_scale=1.0, mean=(0.485, 0.456, 0.406),
                        std=(0.229, 0.224, 0.225), interpolation="linear", normalized_inside=False)


def batch_hard_triplet(feat, pids, margin: float = 0.3):
    import torch

    f = torch.nn.functional.normalize(feat, dim=1)
    dist = 2 - 2 * f @ f.t()
    same = pids[:, None] == pids[None, :]
    hardest_pos = (dist * same).max(1).values
    hardest_neg = (dist + 4 * same).min(1).values
    return torch.relu(hardest_pos - hardest_neg + margin).mean()


def pk_batches(pids: np.ndarray, p: int, k: int, rng) -> list[np.ndarray]:
    """One epoch of P identities x K images batches (images drawn with replacement for identities with < K)."""
    by_id = {pid: np.where(pids == pid)[0] for pid in np.unique(pids)}
    ids = rng.permutation(list(by_id))
    out = []
    for i in range(0, len(ids) - p + 1, p):
        idx = [rng.choice(by_id[pid], k, replace=len(by_id[pid]) < k) for pid in ids[i:i + p]]
        out.append(np.concatenate(idx))
    return out


def cmd_train_mobilenet(args) -> int:
    import torch
    from tqdm import tqdm

    from reid_export.data.market import MarketDataset
    from reid_export.data_config import DataConfig
    from reid_export.preprocess import preprocess

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    out = args.work / "mobilenet"
    out.mkdir(parents=True, exist_ok=True)
    dc = DataConfig(**MOBILENET_CONFIG)
    ds = MarketDataset(args.root)
    items = ds.train
    paths = [it.path for it in items]
    raw_pids = np.array([it.pid for it in items])
    labels = np.searchsorted(np.unique(raw_pids), raw_pids)
    cache = out / "train_inputs.npy"
    if not cache.is_file():
        np.save(cache, preprocess(paths, dc).astype(np.float16))  # the inference preprocessing, normalised
    x_all = torch.from_numpy(np.load(cache).astype(np.float32))
    model = build_mobilenet(int(labels.max()) + 1)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=5e-4)
    ce = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    history, start = [], time.time()
    per_epoch = math.ceil(len(paths) / 32)
    dropped = False
    for epoch in range(args.epochs):
        # lr / 10 for the last quarter of the epochs or of the time budget, whichever comes first
        if not dropped and (epoch >= int(args.epochs * 0.75) or time.time() - start > args.max_minutes * 45):
            for g in opt.param_groups:
                g["lr"] = args.lr / 10
            dropped = True
            history.append({"lr_drop_before_epoch": epoch + 1})
        model.train()
        losses = []
        batches: list[np.ndarray] = []
        while len(batches) < per_epoch:
            batches += pk_batches(labels, 8, 4, rng)
        for idx in tqdm(batches[:per_epoch], desc=f"epoch {epoch + 1}/{args.epochs}", leave=False):
            x = x_all[idx]
            flip = torch.from_numpy(rng.random(len(idx)) < 0.5)
            x[flip] = x[flip].flip(-1)
            # random shift by up to 4 px (wrapping), a cheap stand-in for pad-and-crop
            dy, dx = rng.integers(-4, 5, 2)
            x = torch.roll(x, (int(dy), int(dx)), (2, 3))
            y = torch.from_numpy(labels[idx])
            feat, logits = model(x)
            loss = ce(logits, y) + batch_hard_triplet(feat, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss))
        history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)), "seconds": round(time.time() - start, 1)})
        log(f"mobilenet epoch {epoch + 1}: loss {history[-1]['loss']:.3f} ({history[-1]['seconds']} s)")
        if time.time() - start > args.max_minutes * 60:
            log(f"stopping after {args.max_minutes} min")
            break
    model.eval()
    torch.save(model.state_dict(), out / "mobilenet.pt")
    raw = out / "mobilenet.raw.onnx"
    torch.onnx.export(model, torch.zeros(1, 3, dc.height, dc.width), str(raw), input_names=["input"],
                      output_names=["features"], dynamic_axes={"input": {0: "batch"}, "features": {0: "batch"}},
                      opset_version=17, dynamo=False)
    with torch.no_grad():
        probe = x_all[:8]
        ref = model(probe).numpy()
    import onnxruntime

    got = onnxruntime.InferenceSession(str(raw), providers=["CPUExecutionProvider"]).run(None, {"input": probe.numpy()})[0]
    rel = float(np.max(np.linalg.norm(got - ref, axis=1) / np.linalg.norm(ref, axis=1)))
    annotate = common.run_step("annotate", raw, "-o", out / "mobilenet.onnx", "--input-size", dc.height, dc.width,
                               "--mean", ",".join(map(str, dc.mean)), "--std", ",".join(map(str, dc.std)),
                               "--pixel-scale", 1, "--channel-order", "rgb", "--interpolation", dc.interpolation,
                               ok_codes=(0,), say=log)
    common.write_json(out / "train.json", {
        "history": history, "epochs_run": len(history), "images": len(paths), "identities": int(labels.max()) + 1,
        "train_seconds": round(time.time() - start, 1), "onnx_vs_torch_max_rel_l2": rel, "threads": args.threads,
        "lr": args.lr, "batch": "8 ids x 4", "loss": "CE (label smoothing 0.1) + batch-hard triplet (margin 0.3)",
        "annotate": annotate.command, "load_average_end": common.load_average()},
        command=common.command_line(__file__, args.argv), indent=1)
    return 0


# ----------------------------------------------------------------------------------------------- measure

def paired_delta(ref: np.ndarray, cand: np.ndarray) -> dict:
    """Mean per-query difference cand - ref (points) and its 2 sd/sqrt(n) half-width, over valid queries."""
    valid = np.isfinite(ref) & np.isfinite(cand)
    diff = (np.asarray(cand, float) - np.asarray(ref, float))[valid]
    n = int(diff.size)
    sd = float(np.std(diff, ddof=1)) if n > 1 else float("nan")
    return {"delta": float(diff.mean()) if n else float("nan"), "sd": sd,
            "half_width": 2 * sd / math.sqrt(n) if n > 1 else float("nan"), "n": n,
            "changed": int(np.count_nonzero(diff))}


def retrieval_scores(qf: np.ndarray, gf: np.ndarray, query, gallery) -> tuple[np.ndarray, np.ndarray]:
    """(AP, Rank-1 hit) per query in percent: cosine distance, no flip, as ``reid-export eval``."""
    from reid_export.verify import metrics
    from reid_export.verify.evaluation import per_query_scores

    return per_query_scores(metrics.compute_distance(qf, gf), query, gallery)


def run_summary(report: dict | None, facts: dict | None) -> dict:
    """What one quantize run says: exit code, written, gate, the chosen candidate and its measures."""
    out: dict = {}
    if facts:
        out.update({k: facts.get(k) for k in ("command", "returncode", "seconds", "load_average_start",
                                              "load_average_end", "started_utc")})
    if report:
        search = report.get("search") or {}
        parity = report.get("parity_vs_fp32") or {}
        out.update({"written": report.get("written"), "gate_passed": report.get("gate_passed"),
                    "report_seconds": report.get("seconds"), "method": report.get("method"),
                    "candidate": search.get("chosen"), "variant": search.get("variant"),
                    "bias_corrected": search.get("bias_corrected"),
                    # the report's search record holds fallback_float since the quantize package (schema 3)
                    "fallback_float": len(report.get("fallback_float") or search.get("fallback_float") or []),
                    "kept_float": len(report.get("kept_float") or []),
                    "pair_error": parity.get("pair_error"), "min_cosine": parity.get("min_cosine"),
                    "mean_cosine": parity.get("mean_cosine"), "top1": parity.get("top1_agreement"),
                    "held_out_images": report.get("held_out_images"),
                    "calibration_images": report.get("calibration_images"),
                    "held_out_retrieval": search.get("held_out_retrieval"),
                    "gate": search.get("gate"),
                    "refusal": report.get("refusal") or next((n for n in report.get("notes", [])
                                                              if "not written" in n), None)})
    return out


def same_search(a: dict, b: dict) -> bool:
    """Whether two quantize reports tried the same candidates with the same measures and chose the same one
    (a default run and its --allow-below-gate twin)."""
    def trials(r):
        return [(t.get("label"), json.dumps(t.get("objective"), sort_keys=True)) for t in r["search"]["tried"]]
    return trials(a) == trials(b) and a["search"]["chosen"] == b["search"]["chosen"]


def load_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def refusal_line(log_path: Path) -> str | None:
    """The CLI's one-line refusal (its last line naming 'not written'), from the run's log."""
    if not log_path.is_file():
        return None
    lines = [ln for ln in log_path.read_text().splitlines() if "not written" in ln]
    return lines[-1].strip() if lines else None


def model_graphs(name: str, model: Path, work: Path) -> list[dict]:
    """The graphs to measure: FP32, ours per target (the default run's output when it was written, else the
    --allow-below-gate run's), FP16, ModelOpt's."""
    runs = work / "runs"
    graphs = [{"label": "fp32", "path": model}]
    for target in TARGETS:
        for mode in ("default", "allow"):
            path = runs / f"{name}.int8-{target}-{mode}.onnx"
            if path.is_file():
                graphs.append({"label": f"ours {target}", "path": path, "run": f"int8-{target}-{mode}"})
                break
    if (runs / f"{name}.fp16.onnx").is_file():
        graphs.append({"label": "fp16", "path": runs / f"{name}.fp16.onnx", "run": "fp16"})
    for method in MODELOPT_METHODS:
        path = work / "modelopt" / f"{name}-{method}" / "out.reid.onnx"
        if path.is_file():
            graphs.append({"label": f"modelopt {method}", "path": path})
    return graphs


def cmd_measure(args) -> int:
    import onnxruntime
    from modelopt_compare import Runner, held_out_metrics
    from tqdm import tqdm

    from reid_export.data.market import MarketDataset
    from reid_export.export.metadata import load_onnx, require_data_config
    from reid_export.export.quantize import (
        DEFAULT_CALIB_SIZE,
        DEFAULT_VAL_SIZE,
        select_split,
    )
    from reid_export.preprocess import preprocess
    from reid_export.verify.retrieval import SplitArrays

    split = select_split([args.calib_dir], DEFAULT_CALIB_SIZE, [], DEFAULT_VAL_SIZE, 0, lambda line: None)
    calib_paths, val_paths, held = split.calibration, split.held_out, split.identities
    sets = dict(s.split("=", 1) for s in args.set)
    used = {Path(p).name for p in calib_paths} | {Path(p).name for p in (held.paths if held else val_paths)}
    data = {"cores": os.cpu_count(), "onnxruntime": onnxruntime.__version__, "threads": args.threads,
            "calib_dir": str(args.calib_dir), "held_out_images": len(val_paths), "calibration_images": len(calib_paths),
            "sets": {}, "models": {}}
    loaded = {}
    for sname, root in sets.items():
        ds = MarketDataset(root)
        q, g = SplitArrays.of(ds.query), SplitArrays.of(ds.gallery)
        overlap = sorted(({Path(p).name for p in q.paths} | {Path(p).name for p in g.paths}) & used)
        data["sets"][sname] = {"root": str(root), "queries": len(q.paths), "gallery": len(g.paths),
                               "images_quantize_used": len(overlap)}
        loaded[sname] = (q, g)
    feats_dir = args.work / "feats"
    feats_dir.mkdir(parents=True, exist_ok=True)
    for name, model in parse_models(args.model).items():
        dc = require_data_config(load_onnx(model), model)
        inputs = {"held_out": preprocess(val_paths, dc)}
        for sname, (q, g) in loaded.items():
            inputs[sname] = preprocess(list(q.paths) + list(g.paths), dc)
        entry = {"path": str(model), "sha256": sha256(model), "data_config": dc.to_dict() if hasattr(dc, "to_dict")
                 else None, "runs": {}, "graphs": [], "modelopt": {}}
        for kind in quantize_kinds():
            base = args.work / "runs" / f"{name}.{kind}"
            facts, report = load_json(Path(f"{base}.facts.json")), load_json(Path(f"{base}.json"))
            if facts or report:
                entry["runs"][kind] = run_summary(report, facts)
                entry["runs"][kind]["refusal_line"] = refusal_line(Path(f"{base}.log"))
        for target in TARGETS:
            reports = [load_json(args.work / "runs" / f"{name}.int8-{target}-{mode}.json") for mode in ("default", "allow")]
            if all(reports):
                entry["runs"][f"int8-{target}-allow"]["same_search_as_default"] = same_search(*reports)
        for method in MODELOPT_METHODS:
            facts = load_json(args.work / "modelopt" / f"{name}-{method}" / "facts.json")
            if facts:
                entry["modelopt"][method] = facts
        ref = {}
        for graph in tqdm(model_graphs(name, model, args.work), desc=name):
            path = Path(graph["path"])
            level = "none" if graph["label"].startswith("modelopt") else "all"
            digest = sha256(path)[:16]
            row = {"label": graph["label"], "path": str(path), "sha256": digest, "run": graph.get("run"),
                   "ort_optimization": level, "sets": {}}
            runner = None
            feats = {}
            for key, x in inputs.items():
                cache = feats_dir / f"{name}-{digest}-{level}-{key}.npy"
                if not cache.is_file():
                    runner = runner or Runner(path, args.threads, level)
                    t = time.time()
                    np.save(cache, runner(x))
                    log(f"{name} {graph['label']} {key}: {len(x)} images in {time.time() - t:.0f} s")
                feats[key] = np.load(cache)
            if graph["label"] == "fp32":
                ref = feats
            else:
                row["held_out"] = held_out_metrics(ref["held_out"], feats["held_out"])
            for sname, (q, g) in loaded.items():
                nq = len(q.paths)
                ap, hit = retrieval_scores(feats[sname][:nq], feats[sname][nq:], q, g)
                if graph["label"] == "fp32":
                    ref[sname + "_scores"] = (ap, hit)
                m = {"Rank-1": float(np.nanmean(hit)), "mAP": float(np.nanmean(ap)), "queries": int(np.isfinite(ap).sum())}
                if graph["label"] != "fp32":
                    rap, rhit = ref[sname + "_scores"]
                    m["dRank-1"], m["dmAP"] = paired_delta(rhit, hit), paired_delta(rap, ap)
                row["sets"][sname] = m
            entry["graphs"].append(row)
        data["models"][name] = entry
    data["load_average_end"] = common.load_average()
    common.write_json(args.output, data, command=common.command_line(__file__, args.argv), indent=1)
    print(markdown_table(data))
    return 0


# ----------------------------------------------------------------------------------------------- table

def _f(x, fmt: str = ".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _delta(d: dict | None) -> str:
    if not d:
        return "-"
    return f"{d['delta']:+.2f} ± {d['half_width']:.2f}"


def outcome(runs: dict, target: str) -> str:
    """The default run's outcome: 'refused (exit 1)' / 'passed (exit 0)'; inferred from the --allow-below-gate
    run's gate result (the same search) when the default run was not made."""
    d, a = runs.get(f"int8-{target}-default"), runs.get(f"int8-{target}-allow")
    if d and d.get("returncode") is not None:
        written = d.get("written")
        took = f", {d['seconds']:.0f} s" if d.get("seconds") is not None else ""
        return f"{'passed' if written else 'refused'} (exit {d['returncode']}{took})"
    if a and a.get("gate_passed") is not None:
        return f"{'passed' if a['gate_passed'] else 'refused'} (not run; gate result of the allow run)"
    return "not run"


def candidate_text(run: dict | None) -> str:
    if not run or not run.get("candidate"):
        return "-"
    parts = [run["candidate"].split(",")[0], "equalised" if run.get("variant") == "equalised" else "plain",
             "bias-corr." if run.get("bias_corrected") else "no bias-corr.",
             f"{run.get('fallback_float', 0)} fallback / {run.get('kept_float', 0)} float"]
    return ", ".join(parts)


def markdown_table(data: dict) -> str:
    sets = list(data.get("sets", {}))
    head = ["model", "graph", "default outcome", ("chosen candidate (method, equalised, bias-corr., nodes in float: "
             "fallback / all)"), "pair err", "min / mean cos", "top-1"]
    head += [f"{s}: d R1 / d mAP" for s in sets]
    head += ["held-out ids: d R1 / d mAP (95%)", "time (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in data.get("models", {}).items():
        runs = m.get("runs", {})
        for g in m.get("graphs", []):
            label = g["label"]
            h = g.get("held_out") or {}
            run = runs.get(g["run"]) if g.get("run") else None
            if label == "fp32":
                cells = [name, "FP32", "-", "-", "0", "1 / 1", "1"]
                cells += [f"R1 {g['sets'][s]['Rank-1']:.2f} / mAP {g['sets'][s]['mAP']:.2f} ({g['sets'][s]['queries']} q)"
                          for s in sets]
                cells += ["-", "-"]
                lines.append("| " + " | ".join(cells) + " |")
                continue
            if label.startswith("ours"):
                target = label.split()[1]
                graph = f"INT8 {target}" + (" (below gate)" if run and run.get("gate_passed") is False else "")
                result = outcome(runs, target)
                cand = candidate_text(run)
            elif label == "fp16":
                graph, cand = "FP16 (`--precision fp16`)", "-"
                result = ("-" if not run else f"{'passed' if run.get('written') else 'refused'} "
                          f"(exit {run.get('returncode')})")
            else:
                method = label.split()[1]
                facts = m.get("modelopt", {}).get(method, {})
                graph = f"ModelOpt {method}" + (" (its default)" if method == "entropy" else "")
                result, cand = "no gate", "ModelOpt's placement, FP16 float parts"
                run = {"seconds": facts.get("seconds")}
            cells = [name, graph, result, cand,
                     _f(h.get("pair_error")), f"{_f(h.get('min_cosine'))} / {_f(h.get('mean_cosine'), '.4f')}",
                     _f(h.get("top1"))]
            for s in sets:
                e = g["sets"].get(s)
                cells.append(f"{_delta(e.get('dRank-1'))} / {_delta(e.get('dmAP'))}" if e else "-")
            r = (run or {}).get("held_out_retrieval")
            cells.append(f"{r['delta_Rank-1']:+.2f} [{r['delta_Rank-1_ci95'][0]:+.1f}, {r['delta_Rank-1_ci95'][1]:+.1f}] / "
                         f"{r['delta_mAP']:+.2f} [{r['delta_mAP_ci95'][0]:+.1f}, {r['delta_mAP_ci95'][1]:+.1f}]"
                         if r else "-")
            seconds = (run or {}).get("seconds")
            cells.append(_f(seconds, ".0f"))
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- main

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="stage", required=True)

    def common(p, models=True):
        if models:
            p.add_argument("--model", action="append", required=True, metavar="NAME=PATH")
        p.add_argument("--work", type=Path, required=True)
        p.add_argument("--threads", type=int, default=1)
        return p

    p = common(sub.add_parser("quantize"))
    p.add_argument("--calib-dir", type=Path, required=True)
    p.add_argument("--targets", default=",".join(TARGETS))
    p.add_argument("--kinds", default="", help="only these runs (int8-tensorrt-default,...,fp16)")
    p.add_argument("--rerun", action="store_true", help="also start runs that left a log but no facts")
    p.set_defaults(func=cmd_quantize)
    p = common(sub.add_parser("modelopt"))
    p.add_argument("--calib-dir", type=Path, required=True)
    p.add_argument("--modelopt-python", required=True)
    p.add_argument("--methods", default=",".join(MODELOPT_METHODS))
    p.set_defaults(func=cmd_modelopt)
    p = common(sub.add_parser("train-mobilenet"), models=False)
    p.add_argument("--root", type=Path, required=True, help="Market-layout root with bounding_box_train")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--max-minutes", type=float, default=15.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.set_defaults(func=cmd_train_mobilenet)
    p = common(sub.add_parser("measure"))
    p.add_argument("--calib-dir", type=Path, required=True)
    p.add_argument("--set", action="append", required=True, metavar="NAME=ROOT")
    p.add_argument("-o", "--output", type=Path, required=True)
    p.set_defaults(func=cmd_measure)
    p = sub.add_parser("table")
    p.add_argument("json", type=Path)
    p.set_defaults(func=lambda a: print(markdown_table(json.loads(a.json.read_text()))) or 0)
    args = parser.parse_args(argv)
    args.argv = argv
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
