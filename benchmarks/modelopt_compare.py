"""NVIDIA ModelOpt's ONNX INT8 (its TensorRT quantizer) beside ours, on the same models and crops (issue 25).

For each FP32 model (with its data config):

- ModelOpt: ``python -m modelopt.onnx.quantization --quantize_mode int8 --calibration_method M`` for
  each method (max, entropy), run by a separate Python (``--modelopt-python``, a venv holding
  nvidia-modelopt; this script never imports modelopt) on a *copy* of the model in its own folder
  (ModelOpt may rewrite its input; the copy's sha256 before and after is recorded), CPU execution
  provider, ONNX Runtime sessions limited to ``--threads`` (ModelOpt has no thread option: the
  launcher subclasses ``onnxruntime.SessionOptions``), calibrated on the same 512 crops our
  quantizer calibrates on (``quantize.select_images`` with its defaults, seed 0), saved as .npy.
  Its output has FP16 float parts and no metadata: our data config is copied into it (file
  ``*.reid.onnx``) so that our tools can run it; ONNX Runtime's CPU provider runs its FP16 parts by
  casting (so fidelity here is of the graph as written, with FP16 rounding included).
- ours: ``python -m reid_export quantize MODEL -o OUT --precision int8 --calib-dir ROOT/bounding_box_train
  [--target cpu] --threads 1 --report R.json`` (defaults: gated search, both flavours).
- ``--candidate MODEL:LABEL=PATH``: any further graph (a placement experiment, say) in the same table.

ONNX Runtime (1.32.0, CPU provider) computes wrong features for ModelOpt's Q/DQ graphs (with FP16
and with FP32 float parts) and for ours converted to FP16 float parts when its graph optimisations
are on (basic or all: pair error 2.7-4.4, features unrelated to FP32; with ``ORT_DISABLE_ALL`` they
are right; our own FP32-float-part graphs are unaffected), so those graphs are scored with graph
optimisation off; every held-out row also gives the other level.

Measured against the FP32 graph (ONNX Runtime CPU, ``--threads`` threads): on the quantizer's 128
held-out crops (same selection) the pairwise similarity error, min/mean cosine, max/mean relative L2,
top-1/top-5 neighbour agreement; Rank-1/mAP and their deltas on ``ROOT`` (query/bounding_box_test)
and on each ``--split`` (a retrieval split of bounding_box_train without the 640 crops quantize used,
``benchmarks/retrieval_split.py``). Also, per graph, the Q/DQ placement: how many activation and
weight DequantizeLinear outputs each consumer op type takes.

    python benchmarks/modelopt_compare.py --model osnet05=work/osnet05.onnx --model osnet025=work/osnet025.onnx \\
        --root ../shared/data/cuhk03-labeled/Market-1501-v15.09.15 --split work/trainsplit \\
        --modelopt-python work/venv/bin/python --work work/modelopt --json work/modelopt.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

import common

LAUNCHER = r"""
import runpy, sys
import onnxruntime as ort
_threads = int(sys.argv[1])
class _Limited(ort.SessionOptions):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        if _threads > 0:
            self.intra_op_num_threads = _threads
            self.inter_op_num_threads = 1
ort.SessionOptions = _Limited
sys.argv = ["modelopt.onnx.quantization"] + sys.argv[2:]
runpy.run_module("modelopt.onnx.quantization", run_name="__main__", alter_sys=True)
"""


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run_modelopt(python: str, model: Path, method: str, calib: Path, folder: Path, threads: int, reuse: bool) -> dict:
    """ModelOpt on a copy of ``model`` in ``folder``; returns the run's facts (output with our metadata)."""
    folder.mkdir(parents=True, exist_ok=True)
    out, final = folder / "out.onnx", folder / "out.reid.onnx"
    facts_file = folder / "facts.json"
    if reuse and final.is_file() and facts_file.is_file():
        return json.loads(facts_file.read_text())
    copy = folder / "in.onnx"
    shutil.copyfile(model, copy)
    before = sha256(copy)
    calib_method, _, float_parts = method.partition("/")  # "max/fp32": --high_precision_dtype fp32
    cmd = [python, "-c", LAUNCHER, str(threads), "--onnx_path", copy.name, "--quantize_mode", "int8",
           "--calibration_method", calib_method, "--calibration_data_path", str(calib), "--calibration_eps", "cpu",
           "--output_path", out.name] + (["--high_precision_dtype", float_parts] if float_parts else [])
    start = time.time()
    proc = subprocess.run(cmd, cwd=folder, capture_output=True, text=True)
    seconds = time.time() - start
    (folder / "log.txt").write_text(proc.stdout + proc.stderr)
    facts = {"command": "python -m modelopt.onnx.quantization " + " ".join(cmd[4:]), "returncode": proc.returncode,
             "seconds": round(seconds, 1), "threads": threads, "input_rewritten": sha256(copy) != before,
             "output": str(final)}
    if proc.returncode != 0 or not out.is_file():
        facts["error"] = (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]
    return finish_modelopt(folder, model, method, facts)


def finish_modelopt(folder: Path, model: Path, method: str, facts: dict) -> dict:
    """ModelOpt's ``folder/out.onnx`` with the source's metadata (``out.reid.onnx``) and ``facts.json``."""
    import onnx

    from reid_export.export.metadata import get_metadata, set_metadata

    out, final, facts_file = folder / "out.onnx", folder / "out.reid.onnx", folder / "facts.json"
    if "error" in facts:
        common.write_json(facts_file, facts, command=facts["command"], indent=1)
        return facts
    quantized = onnx.load(str(out))
    props = get_metadata(onnx.load(str(model), load_external_data=False))
    entries = {k: (json.loads(v) if v[:1] in "{[" else v) for k, v in props.items()}
    entries["reid_export.precision"] = "int8"
    entries["reid_export.modelopt"] = {"method": method, "note": "quantized by nvidia-modelopt; metadata copied"}
    set_metadata(quantized, entries)
    onnx.save(quantized, str(final))
    common.write_json(facts_file, facts, command=facts["command"], indent=1)
    return facts


def run_ours(model: Path, out: Path, target: str, calib_dir: Path, threads: int, reuse: bool) -> dict:
    report = out.with_suffix(".json")
    if reuse and out.is_file() and report.is_file():
        data = json.loads(report.read_text())
        return {"seconds": data.get("seconds"), "output": str(out), "reused": True,
                "chosen": data.get("search", {}).get("chosen"), "written": data.get("written")}
    args = ["quantize", model, "-o", out, "--precision", "int8", "--calib-dir", calib_dir,
            *(["--target", "cpu"] if target == "cpu" else []), "--threads", threads, "--report", report]
    step = common.run_step(*args, capture=True, say=None)
    out.with_suffix(".log").write_text(step.stdout + step.stderr)
    facts = {"command": " ".join(["python"] + common.cli_command(*args)[1:]), "returncode": step.returncode,
             "seconds": round(step.seconds, 1), "output": str(out)}
    if step.returncode != 0:
        facts["error"] = (step.stderr.strip().splitlines() or ["no output"])[-1][:300]
    return facts


def qdq_placement(path: Path) -> dict:
    """Consumers of DequantizeLinear outputs by op type: {op: {"activation": n, "weight": n}}; float dtype."""
    import onnx

    model = onnx.load(str(path))
    inits = {i.name for i in model.graph.initializer} - {i.name for i in model.graph.input}
    producer = {o: n for n in model.graph.node for o in n.output}
    counts: dict[str, Counter] = {}
    for node in model.graph.node:
        for name in node.input:
            dq = producer.get(name)
            if dq is None or dq.op_type != "DequantizeLinear" or node.op_type in ("QuantizeLinear",):
                continue
            src = dq.input[0]
            if src in producer and producer[src].op_type == "QuantizeLinear":
                src = producer[src].input[0]   # a Q -> DQ pair: what it quantizes
            weight = src in inits or (src in producer and producer[src].op_type == "Constant")
            counts.setdefault(node.op_type, Counter())["weight" if weight else "activation"] += 1
    scale_types = Counter(onnx.TensorProto.DataType.Name(i.data_type) for i in model.graph.initializer
                          if any(n.op_type == "DequantizeLinear" and len(n.input) > 1 and n.input[1] == i.name
                                 for n in model.graph.node))
    return {"consumers": {k: dict(v) for k, v in sorted(counts.items())}, "dq_scale_dtypes": dict(scale_types),
            "q_nodes": sum(n.op_type == "QuantizeLinear" for n in model.graph.node),
            "dq_nodes": sum(n.op_type == "DequantizeLinear" for n in model.graph.node)}


def fp16_qdq(path: Path) -> bool:
    """Whether a graph has DequantizeLinear nodes with FP16 scales (FP16 float parts)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    scales = {n.input[1] for n in model.graph.node if n.op_type == "DequantizeLinear" and len(n.input) > 1}
    return any(i.name in scales and i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer)


class Runner:
    def __init__(self, path: Path, threads: int, optimization: str = "all", batch: int = 32):
        from reid_export.export.ort import OrtRunner, make_session

        self.run = OrtRunner(make_session(str(path), threads=threads, optimization=optimization), path)
        self.batch = batch

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.concatenate([self.run(x[i:i + self.batch]) for i in range(0, len(x), self.batch)])


def held_out_metrics(ref: np.ndarray, cand: np.ndarray) -> dict:
    from reid_export.embeddings import Tolerances, compare, relative_l2
    from reid_export.embeddings import pair_similarity_error

    res = compare(ref, cand, Tolerances())
    _, pair = pair_similarity_error(ref, cand)
    rel = relative_l2(cand, ref)
    return {"pair_error": pair, "min_cosine": res.min_cosine, "mean_cosine": res.mean_cosine,
            "max_rel_l2": float(np.max(rel)), "mean_rel_l2": float(np.mean(rel)),
            "top1": res.top1_agreement, "top5": res.top5_agreement}


class EvalSet:
    """A Market-layout query/gallery split, preprocessed once for one data config."""

    def __init__(self, root: Path, data_config):
        from reid_export.data.market import MarketDataset
        from reid_export.preprocess import preprocess
        from reid_export.verify.retrieval import SplitArrays

        ds = MarketDataset(root)
        self.query, self.gallery = SplitArrays.of(ds.query), SplitArrays.of(ds.gallery)
        self.qx = preprocess(self.query.paths, data_config)
        self.gx = preprocess(self.gallery.paths, data_config)

    def score(self, runner: Runner) -> dict:
        from reid_export.verify.retrieval import EvalOptions, distances, score

        dist = distances(runner(self.qx), runner(self.gx), EvalOptions())
        m = score(dist, self.query, self.gallery)
        return {"Rank-1": m["Rank-1"], "mAP": m["mAP"]}


def table(rows: list[dict], splits: list[str]) -> str:
    head = ["model", "graph", "ORT opt", "pair err", "pair err (other opt)", "min cos", "mean cos", "max rL2", "mean rL2", "top-1", "top-5"]
    for s in splits:
        head += [f"{s} R1", f"{s} mAP", f"{s} dR1", f"{s} dmAP"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        h = r.get("held_out")
        cells = [r["model"], r["graph"], r["ort_optimization"]]
        if h:
            other = r["held_out_by_ort_optimization"]["none" if r["ort_optimization"] == "all" else "all"]
            cells += [f"{h['pair_error']:.3f}", f"{other['pair_error']:.3f}", f"{h['min_cosine']:.4f}", f"{h['mean_cosine']:.4f}",
                      f"{h['max_rel_l2']:.3f}", f"{h['mean_rel_l2']:.3f}", f"{h['top1']:.3f}", f"{h['top5']:.3f}"]
        else:
            cells += ["-"] * 8
        for s in splits:
            e = r.get("eval", {}).get(s)
            cells += ([f"{e['Rank-1']:.2f}", f"{e['mAP']:.2f}", f"{e['dRank-1']:+.2f}", f"{e['dmAP']:+.2f}"] if e
                      else ["-"] * 4)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, metavar="NAME=PATH",
                        help="FP32 ONNX with a data config (repeatable)")
    parser.add_argument("--root", type=Path, required=True, help="Market-layout root (bounding_box_train calibrates)")
    parser.add_argument("--split", type=Path, action="append", default=[],
                        help="further query/gallery roots (retrieval_split.py output)")
    parser.add_argument("--modelopt-python", default=None, help="python of a venv with nvidia-modelopt (none: skip)")
    parser.add_argument("--methods", default="max,entropy")
    parser.add_argument("--targets", default="tensorrt,cpu")
    parser.add_argument("--candidate", action="append", default=[], metavar="MODEL:LABEL=PATH")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reuse", action="store_true", help="keep outputs already in --work")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--no-eval", action="append", default=[], metavar="LABEL",
                        help="graphs (label substring) measured on the held-out crops only (saves CPU time)")
    parser.add_argument("--eval-max-pair-error", type=float, default=1.0,
                        help="graphs above this held-out pair error (collapsed) are not evaluated on the test sets")
    args = parser.parse_args(argv)

    import onnx
    import onnxruntime

    from reid_export.export.metadata import load_onnx, require_data_config
    from reid_export.export.quantize import DEFAULT_CALIB_SIZE, DEFAULT_VAL_SIZE, select_images
    from reid_export.preprocess import preprocess

    calib_dir = args.root / "bounding_box_train"
    calib_paths, val_paths = select_images([calib_dir], DEFAULT_CALIB_SIZE, [], DEFAULT_VAL_SIZE, 0, lambda line: None)
    splits = {"cuhk03": args.root} | {p.name: p for p in args.split}
    args.work.mkdir(parents=True, exist_ok=True)
    extra: dict[str, list[tuple[str, Path]]] = {}
    for spec in args.candidate:
        head, path = spec.split("=", 1)
        name, label = head.split(":", 1)
        extra.setdefault(name, []).append((label, Path(path)))
    rows, runs, placement = [], {}, {}
    cache_file = args.work / "eval_cache.json"
    cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    for spec in args.model:
        name, path = spec.split("=", 1)
        path = Path(path)
        dc = require_data_config(load_onnx(path), path)
        graphs: list[tuple[str, Path]] = [("fp32", path)]
        if args.modelopt_python:
            calib = args.work / f"calib_{name}.npy"
            if not (args.reuse and calib.is_file()):
                np.save(calib, preprocess(calib_paths, dc).astype(np.float32))
            for method in args.methods.split(","):
                facts = run_modelopt(args.modelopt_python, path, method, calib, args.work / f"modelopt-{name}-{method.replace('/', '-')}",
                                     args.threads, args.reuse)
                runs[f"{name} modelopt {method}"] = facts
                log(f"{name} modelopt {method}: {facts}")
                if "error" not in facts:
                    graphs.append((f"modelopt {method}", Path(facts["output"])))
        for target in args.targets.split(","):
            out = args.work / f"{name}.int8-{target}.onnx"
            facts = run_ours(path, out, target, calib_dir, args.threads, args.reuse)
            runs[f"{name} ours {target}"] = facts
            log(f"{name} ours {target}: {facts}")
            if out.is_file():
                graphs.append((f"ours {target}", out))
        graphs += extra.get(name, [])
        val = preprocess(val_paths, dc)
        sets = {s: EvalSet(root, dc) for s, root in splits.items()}
        ref_val, ref_eval = None, {}
        for label, gpath in graphs:
            start = time.time()
            # ModelOpt's graphs (FP16 or FP32 float parts) and ours with FP16 float parts: ONNX Runtime's CPU
            # graph optimisations break them (see the module doc), so they are scored with none; ours with
            # ONNX Runtime's defaults, as our tools run them
            level = "none" if label.startswith("modelopt") or fp16_qdq(gpath) else "all"
            row = {"model": name, "graph": label, "path": str(gpath), "ort_optimization": level}
            if label == "fp32":
                runner = Runner(gpath, args.threads, level)
                ref_val = runner(val)
            else:
                row["held_out_by_ort_optimization"] = {}
                for lv in ("all", "none"):
                    runner = Runner(gpath, args.threads, lv)
                    row["held_out_by_ort_optimization"][lv] = held_out_metrics(ref_val, runner(val))
                runner = Runner(gpath, args.threads, level)
                row["held_out"] = row["held_out_by_ort_optimization"][level]
                placement[f"{name} {label}"] = qdq_placement(gpath)
            row["eval"] = {}
            skip = (any(x in label for x in args.no_eval) or
                    ("held_out" in row and not row["held_out"]["pair_error"] <= args.eval_max_pair_error))
            digest = sha256(gpath)[:16]
            for s, es in ({} if skip else sets).items():
                key = f"{name}|{label}|{s}|{digest}"  # a graph scored once (--reuse keeps it between runs)
                if not (args.reuse and key in cache):
                    cache[key] = es.score(runner)
                    cache_file.write_text(json.dumps(cache, indent=1))
                m = dict(cache[key])
                if label == "fp32":
                    ref_eval[s] = m
                m.update({"dRank-1": m["Rank-1"] - ref_eval[s]["Rank-1"], "dmAP": m["mAP"] - ref_eval[s]["mAP"]})
                row["eval"][s] = m
            row["seconds"] = round(time.time() - start, 1)
            rows.append(row)
            log(f"{name} {label}: {row.get('held_out')} {row['eval']} ({row['seconds']} s)")
    text = table(rows, list(splits))
    print(text)
    report = {"cores": os.cpu_count(), "onnx": onnx.__version__,
              "onnxruntime": onnxruntime.__version__, "threads": args.threads,
              "held_out_images": len(val_paths), "calibration_images": len(calib_paths),
              "splits": {s: str(p) for s, p in splits.items()}, "runs": runs, "rows": rows, "placement": placement,
              "table": text}
    if args.json:
        common.write_json(args.json, report, command=common.command_line(__file__, argv), indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
