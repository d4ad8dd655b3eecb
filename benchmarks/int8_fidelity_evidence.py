"""The evidence behind the INT8 fidelity gate (issue 25): label-free measures against retrieval change.

For each FP32 ONNX model (with a data config), builds many INT8 candidates with the library's own
functions (``qdq.prepare``/``calibration.calibrate``/``qdq.build_qdq``, ``equalize.equalised_variant``,
``Calibration.ranges``): both targets (TensorRT S8S8, CPU U8S8), every calibration method, plain and
equalised graphs, with and without bias correction, calibration on 16 images (worse) and nodes kept
in float (better), plus FP16 (``quantize.convert_fp16``). Calibration and held-out images are the
quantizer's defaults (``quantize.select_images([ROOT/bounding_box_train], 512, [], 128, seed=0)``).

Every candidate's features (ONNX Runtime, CPU, one thread) are cached as .npy under ``--work``:
the 128 held-out crops, the CUHK03 test set (query + bounding_box_test) and a retrieval split of
bounding_box_train without the 640 calibration/held-out crops (``benchmarks/retrieval_split.py``).

``analyse`` computes, per candidate: the label-free measures on the 128 held-out crops (pair error,
pair RMSE, cosines, relative L2, top-1/top-5 neighbour agreement, Spearman of the pairwise
similarities, ...), Rank-1/mAP of FP32 and the candidate on both test sets (``verify.metrics``,
cosine), the paired per-query differences (mean = shift, sd) and the bound on the change a test set
of 2,000 queries can show; then, per measure, the loosest threshold under which every candidate's
bound stays <= 0.5 (Rank-1 and mAP, both sets, all models). Writes the JSON and the plot.

    S=/work/scratch-evidence; ROOT=../shared/data/cuhk03-labeled/Market-1501-v15.09.15
    python benchmarks/retrieval_split.py $ROOT -o $S/cuhk03-trainsplit
    python benchmarks/int8_fidelity_evidence.py run --model osnet025=$S/osnet025.onnx --dataset $ROOT \\
        --split $S/cuhk03-trainsplit --work $S/evidence
    python benchmarks/int8_fidelity_evidence.py export-fixed16 MODEL.pt --config configs/torchreid/osnet_x0_25.yml \\
        -o $S/osnet025-fixed16.onnx     # opset 11, batch 16, BatchNorm not folded
    python benchmarks/int8_fidelity_evidence.py analyse --work $S/evidence -o benchmarks/int8_fidelity_evidence.json \\
        --plot benchmarks/int8_fidelity_evidence.png --gate-threshold 0.03 --second-measure near_pair_error

``run --candidates KEY,...`` builds a subset (keys from ``candidate_plan``, with or without the ``trt-``/``cpu-``
prefix); features already cached are not recomputed, calibrations are cached per model and target.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import pickle
import sys
import time
from pathlib import Path

import numpy as np

import common

SETS = ("test", "split")  # CUHK03 test (query + bounding_box_test); retrieval split of bounding_box_train
TARGET_N = 2000           # the size of test set users evaluate on
MAX_MOVE = 0.5            # points of Rank-1 / mAP a passing graph may move at TARGET_N queries

# (key, target, variant, method, percentile, bias_corrected, calibration images, nodes kept float)
# The order spreads the fidelity range early, so a run cut short still spans it.
def candidate_plan(target: str) -> list[dict]:
    t = "trt" if target == "tensorrt" else "cpu"
    rows = [
        ("eq-mse-bc", "equalised", "mse", None, True, 512, 0),
        ("plain-minmax", "plain", "minmax", None, False, 512, 0),
        ("plain-mse", "plain", "mse", None, False, 512, 0),
        ("plain-entropy", "plain", "entropy", None, False, 512, 0),
        ("eq-mse-bc-float16", "equalised", "mse", None, True, 512, 16),
        ("plain-p99.99", "plain", "percentile", 99.99, False, 512, 0),
        ("eq-p99.999", "equalised", "percentile", 99.999, False, 512, 0),
        ("plain-mse-calib16", "plain", "mse", None, False, 16, 0),
        ("eq-mse", "equalised", "mse", None, False, 512, 0),
        ("plain-p99.9", "plain", "percentile", 99.9, False, 512, 0),
        ("eq-mse-bc-float4", "equalised", "mse", None, True, 512, 4),
        ("plain-mse-bc", "plain", "mse", None, True, 512, 0),
        ("plain-p99.999", "plain", "percentile", 99.999, False, 512, 0),
        ("eq-entropy", "equalised", "entropy", None, False, 512, 0),
        ("eq-p99.99", "equalised", "percentile", 99.99, False, 512, 0),
        ("eq-minmax", "equalised", "minmax", None, False, 512, 0),
        # a quarter (the quantizer's --max-float default) / half of the quantizable nodes in float, worst first
        ("eq-mse-bc-float25pct", "equalised", "mse", None, True, 512, 0.25),
        ("eq-mse-bc-float50pct", "equalised", "mse", None, True, 512, 0.5),
        ("eq-mse-bc-float75pct", "equalised", "mse", None, True, 512, 0.75),
        ("eq-mse-bc-float90pct", "equalised", "mse", None, True, 512, 0.9),
        ("eq-mse-bc-float97pct", "equalised", "mse", None, True, 512, 0.97),
    ]
    return [dict(key=f"{t}-{k}", target=target, variant=v, method=m, percentile=p, bias_corrected=bc, calib=c,
                 float_nodes=f) for k, v, m, p, bc, c, f in rows]


def log(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------- run

def image_lists(dataset: Path, split: Path):
    """(segments {name: (start, stop)}, paths, pids, camids, calibration paths) in feature order."""
    from reid_export.data.market import load_split
    from reid_export.export.quantize import DEFAULT_CALIB_SIZE, DEFAULT_VAL_SIZE, select_images

    train = dataset / "bounding_box_train"
    calib, val = select_images([train], DEFAULT_CALIB_SIZE, [], DEFAULT_VAL_SIZE, 0, lambda line: None)
    parts = [("heldout", [(str(p), -1, -1) for p in val])]
    for name, root in (("test", dataset), ("split", split)):
        for part in ("query", "gallery"):
            parts.append((f"{name}_{part}", [(i.path, i.pid, i.camid) for i in load_split(root, part)]))
    used = {Path(p).resolve() for p in calib + val}
    split_files = {Path(p).resolve() for name, items in parts if name.startswith("split") for p, _, _ in items}
    overlap = used & split_files
    if overlap:
        raise SystemExit(f"{split}: holds {len(overlap)} of the quantizer's calibration/held-out images; rebuild it "
                         "with benchmarks/retrieval_split.py and the same --calib-size/--val-size/--seed")
    segments, paths, pids, camids = {}, [], [], []
    for name, items in parts:
        segments[name] = (len(paths), len(paths) + len(items))
        for p, pid, cam in items:
            paths.append(p)
            pids.append(pid)
            camids.append(cam)
    return segments, paths, np.array(pids), np.array(camids), calib, val, len(used)


def preprocessed(paths, data_config, work: Path) -> np.ndarray:
    """All images through the one preprocessing function, cached as a memory-mapped .npy per data config."""
    from reid_export.preprocess import preprocess

    key = hashlib.sha256(json.dumps([data_config.to_dict(), paths], sort_keys=True, default=str).encode()).hexdigest()
    path = work / f"inputs-{key[:12]}.npy"
    if path.exists():
        return np.load(path, mmap_mode="r")
    h, w = data_config.input_size
    tmp = path.with_suffix(".tmp.npy")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(paths), 3, h, w))
    start = time.time()
    for i in range(0, len(paths), 64):
        out[i:i + 64] = preprocess(paths[i:i + 64], data_config)
    out.flush()
    del out
    os.replace(tmp, path)
    log(f"preprocessed {len(paths)} images in {time.time() - start:.0f} s -> {path}")
    return np.load(path, mmap_mode="r")


def extract(model_bytes: bytes, inputs: np.ndarray, threads: int = 1) -> np.ndarray:
    from reid_export.export.ort import OrtRunner, make_session

    runner = OrtRunner(make_session(model_bytes, threads=threads), "candidate")
    step = runner.static_batch or 32
    return np.concatenate([runner(np.ascontiguousarray(inputs[i:i + step])) for i in range(0, len(inputs), step)])


def run(args) -> int:
    import onnx

    from reid_export.cpuinfo import isa_flags
    from reid_export.export import quantize as q
    from reid_export.export.quantize.calibration import (DEFAULT_NUM_BINS, DEFAULT_PERCENTILE, CalibrationImages,
                                                         calibrate)
    from reid_export.export.quantize.equalize import EQUALIZE_IMAGES, equalised_variant
    from reid_export.export.quantize.int8 import LOCATE_IMAGES
    from reid_export.export.quantize.locate import locate
    from reid_export.export.quantize.qdq import build_qdq, conv_input_means, prepare, weight_range_for_cpu
    from reid_export.export.quantize.search import Objective

    only = set(args.candidates.split(",")) if args.candidates else None
    targets = args.targets.split(",")
    for spec in args.model:
        name, _, path = spec.partition("=")
        if not path:
            raise SystemExit(f"--model {spec}: give NAME=PATH")
        out = args.work / name
        out.mkdir(parents=True, exist_ok=True)
        model, data_config = q.load_fp32(path)
        segments, paths, pids, camids, calib_paths, val_paths, n_used = image_lists(args.dataset, args.split)
        inputs = preprocessed(paths, data_config, args.work)
        info_path = out / "info.json"
        info = {"name": name, "model": str(path), "data_config": data_config.to_dict(), "segments": segments,
                "paths": paths, "pids": pids.tolist(), "camids": camids.tolist(), "excluded_from_split": n_used,
                "cpu_flags": isa_flags(), "threads": args.threads}
        if info_path.exists():
            info = {**json.loads(info_path.read_text()), **info}
        info.setdefault("candidates", {})

        def save_info():
            info_path.write_text(json.dumps(info, indent=0))

        def record(key, model_bytes, meta):
            feat_path = out / f"feat-{key}.npy"
            start = time.time()
            load = (common.load_average() or [float("nan")])[0]
            feats = extract(model_bytes, inputs, args.threads)
            secs = time.time() - start
            np.save(feat_path, feats)
            meta.update(extract_seconds=round(secs, 1), load_before=round(load, 2), images=len(paths))
            info["candidates"][key] = meta
            save_info()
            log(f"{name} {key}: features of {len(paths)} images in {secs:.0f} s (1 thread, load {load:.1f})")

        if not (out / "feat-fp32.npy").exists():
            record("fp32", model.SerializeToString(), {"kind": "fp32"})
        if (only is None or "fp16" in only) and not (out / "feat-fp16.npy").exists():
            fp16, keep = q.convert_fp16(model, [], lambda line: None)
            record("fp16", fp16.SerializeToString(), {"kind": "fp16", "kept_fp32": len(keep)})
        val_inputs = np.ascontiguousarray(inputs[segments["heldout"][0]:segments["heldout"][1]])
        for target in targets:
            plan = [c for c in candidate_plan(target) if (only is None or c["key"] in only or
                                                          c["key"].split("-", 1)[1] in only)]
            plan = [c for c in plan if not (out / f"feat-{c['key']}.npy").exists()]
            if not plan:
                continue
            start = time.time()
            prepared = prepare(model, target, [])
            reduce_range = weight_range_for_cpu()[0] if target == "cpu" else False
            cache = out / f"calibration-{target}.pkl"  # calibrations and the equalised graph: reruns skip them
            cached = pickle.loads(cache.read_bytes()) if cache.exists() else {}
            if "plain" not in cached:
                cached["plain"] = calibrate(prepared, CalibrationImages(calib_paths, data_config), DEFAULT_NUM_BINS,
                                            8, args.threads, False)
                cache.write_bytes(pickle.dumps(cached))
                log(f"{name} {target}: calibrated on {len(calib_paths)} images in {time.time() - start:.0f} s")
            calibration = cached["plain"]
            variants = {"plain": (prepared, calibration)}
            if any(c["variant"] == "equalised" for c in plan):
                if "equalised" not in cached:
                    start = time.time()
                    objective = Objective(prepared.model, val_inputs, data_config, args.threads)
                    eq, summary = equalised_variant(prepared, calibration, objective,
                                                    CalibrationImages(calib_paths, data_config), DEFAULT_NUM_BINS, 8,
                                                    args.threads, False)
                    log(f"{name} {target}: equalised: {summary['what']} ({time.time() - start:.0f} s)")
                    cached["equalised"] = (None if eq is None else
                                           (eq.prepared.model.SerializeToString(), eq.calibration))
                    cache.write_bytes(pickle.dumps(cached))
                if cached["equalised"] is not None:
                    eq_bytes, eq_calibration = cached["equalised"]
                    variants["equalised"] = (dataclasses.replace(prepared, model=onnx.load_from_string(eq_bytes)),
                                             eq_calibration)
            means_cache: dict = {}
            calib16 = {}

            def means(variant):
                if variant not in means_cache:
                    prep = variants[variant][0]
                    batches = CalibrationImages(calib_paths, data_config).batches(
                        prep.static_batch or 8, prep.static_batch is not None, EQUALIZE_IMAGES)
                    means_cache[variant] = conv_input_means(prep.model, batches, args.threads, prep.head)
                return means_cache[variant]

            ranking_cache: dict = {}
            for c in plan:
                if c["variant"] not in variants:
                    log(f"{name} {c['key']}: skipped (no equalised graph)")
                    continue
                start = time.time()
                prep, calib = variants[c["variant"]]
                if c["calib"] != len(calib_paths):
                    if c["variant"] not in calib16:
                        calib16[c["variant"]] = calibrate(prep, CalibrationImages(calib_paths[:c["calib"]], data_config),
                                                          DEFAULT_NUM_BINS, 8, args.threads, False)
                    calib = calib16[c["variant"]]
                ranges = calib.ranges(c["method"], c["percentile"] or DEFAULT_PERCENTILE, target == "cpu")
                m = means(c["variant"]) if c["bias_corrected"] else None
                keep: list[str] = []
                if c["float_nodes"]:
                    rkey = (c["variant"], c["method"], c["bias_corrected"])
                    if rkey not in ranking_cache:  # the quantizer's own ranking: locate on 8 held-out crops
                        base = build_qdq(prep, ranges, reduce_range, [], m)
                        found = locate(prep.model, base, val_inputs[:prep.static_batch or LOCATE_IMAGES], top=10)
                        pool = set(prep.quantizable_nodes())
                        ranked = [l["node"] for l in sorted(found["layers"], key=lambda l: -l["added"])
                                  if l["node"] in pool and l["added"] > 0]
                        # then the nodes locate gives no added error, in graph order (large fractions need them)
                        ranking_cache[rkey] = ranked + [n for n in prep.quantizable_nodes() if n not in set(ranked)]
                    count = c["float_nodes"]
                    if count < 1:  # a fraction of the quantizable nodes
                        count = math.ceil(len(prep.quantizable_nodes()) * count)
                    keep = ranking_cache[rkey][:count]
                qdq = build_qdq(prep, ranges, reduce_range, keep, m)
                build = time.time() - start
                record(c["key"], qdq.SerializeToString(),
                       {**c, "kind": "int8", "reduce_range": bool(reduce_range), "kept_float": keep,
                        "build_seconds": round(build, 1), "opset_upgraded_from": prep.opset_upgraded_from})
    return 0


# ------------------------------------------------------------------------------------------- analyse

def pair_sims(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x @ x.T


def label_free(ref: np.ndarray, cand: np.ndarray) -> dict:
    """The quantizer's objective (``Objective.measure``) plus rank measures of the pairwise similarities."""
    from scipy.stats import spearmanr

    from reid_export.embeddings import Tolerances, compare
    from reid_export.embeddings import pair_similarity_error

    r = compare(ref, cand, Tolerances())
    rmse, rel = pair_similarity_error(ref, cand)
    sr, sc = pair_sims(ref), pair_sims(cand)
    n = len(ref)
    iu = np.triu_indices(n, 1)
    rho = float(spearmanr(sr[iu], sc[iu]).statistic)
    off = ~np.eye(n, dtype=bool)
    # each image's ranking of the others, as retrieval sees it
    rows = [spearmanr(sr[i, off[i]], sc[i, off[i]]).statistic for i in range(n)]
    # the error on the pairs that decide rankings: each image's 10 nearest (FP32) neighbours
    a = np.where(off, sr, -np.inf)
    near = np.argsort(-a, axis=1)[:, :10]
    d = (sc - sr)[np.arange(n)[:, None], near]
    near_err = float(np.sqrt(np.mean(d ** 2)) / max(float(np.std(sr[iu])), 1e-12))
    ranks_c = np.argsort(-np.where(off, sc, -np.inf), axis=1)[:, :10]
    top10 = float(np.mean([len(set(x) & set(y)) / 10 for x, y in zip(near, ranks_c)]))
    return {"pair_error": rel, "pair_rmse": rmse, "min_cosine": r.min_cosine, "mean_cosine": r.mean_cosine,
            "max_rel_l2": r.max_rel_l2, "mean_rel_l2": r.mean_rel_l2, "top1_agreement": r.top1_agreement,
            "top5_agreement": r.top5_agreement, "top10_agreement": top10, "spearman": rho,
            "row_spearman": float(np.mean(rows)), "near_pair_error": near_err}


def per_query(feats: np.ndarray, info: dict, name: str) -> dict:
    """Per valid query: AP and Rank-1 hit (fractions), the Market-1501 protocol with cosine distance."""
    from reid_export.verify.metrics import compute_distance, evaluate_rank

    pids, cams = np.array(info["pids"]), np.array(info["camids"])
    (q0, q1), (g0, g1) = info["segments"][f"{name}_query"], info["segments"][f"{name}_gallery"]
    dist = compute_distance(feats[q0:q1], feats[g0:g1], "cosine")
    qp, gp, qc, gc = pids[q0:q1], pids[g0:g1], cams[q0:q1], cams[g0:g1]
    res = evaluate_rank(dist, qp, gp, qc, gc, max_rank=10)
    valid = res["valid_queries"]
    # Rank-1 per query: the nearest gallery item that the protocol keeps (not same pid and camera), stable ties
    keep = ~((qp[:, None] == gp[None, :]) & (qc[:, None] == gc[None, :]))
    nearest = np.argmin(np.where(keep, dist, np.inf), axis=1)
    hit = (gp[nearest] == qp)[valid].astype(np.float64)
    assert abs(hit.mean() - res["cmc"][0]) < 1e-9, "per-query Rank-1 disagrees with evaluate_rank's CMC"
    return {"ap": np.asarray(res["all_AP"], dtype=np.float64), "r1": hit, "queries": valid}


def bound(shift: float, sd: float, n_obs: int, n: int = TARGET_N) -> dict:
    """How far a test set of ``n`` queries can move the metric: |shift| + 2 sd/sqrt(n) (shift as measured) and,
    with the shift's own uncertainty from ``n_obs`` queries, |shift| + 2 sd sqrt(1/n_obs + 1/n)."""
    return {"point": abs(shift) + 2 * sd / math.sqrt(n), "conservative": abs(shift) + 2 * sd * math.sqrt(1 / n_obs + 1 / n)}


def resample(diff: np.ndarray, n: int, rng, draws: int = 2000) -> dict:
    """Spread of the mean difference over random query subsets of size ``n`` (without replacement; n = all:
    bootstrap with replacement)."""
    if n >= len(diff):
        idx = rng.integers(0, len(diff), size=(draws, len(diff)))
    else:
        idx = np.argsort(rng.random((draws, len(diff))), axis=1)[:, :n]
    means = diff[idx].mean(axis=1) * 100
    return {"n": int(min(n, len(diff))), "sd": float(means.std()), "p95_abs": float(np.percentile(np.abs(means), 95)),
            "max_abs": float(np.abs(means).max())}


MEASURES = {  # name: (direction: +1 lower is closer to FP32, -1 higher is closer)
    "pair_error": 1, "pair_rmse": 1, "near_pair_error": 1, "max_rel_l2": 1, "mean_rel_l2": 1,
    "min_cosine": -1, "mean_cosine": -1, "top1_agreement": -1, "top5_agreement": -1, "top10_agreement": -1,
    "spearman": -1, "row_spearman": -1}


def analyse(args) -> int:
    rng = np.random.default_rng(0)
    rows = []
    models = {}
    for info_path in sorted(args.work.glob("*/info.json")):
        info = json.loads(info_path.read_text())
        out = info_path.parent
        if not (out / "feat-fp32.npy").exists():
            continue
        fp32 = np.load(out / "feat-fp32.npy")
        h0, h1 = info["segments"]["heldout"]
        base = {s: per_query(fp32, info, s) for s in SETS}
        models[info["name"]] = {"model": info["model"], "data_config": info["data_config"], "threads": info["threads"],
                                "cpu_flags": info.get("cpu_flags"),
                                "fp32": {s: {"queries": int(len(base[s]["ap"])), "Rank-1": base[s]["r1"].mean() * 100,
                                             "mAP": base[s]["ap"].mean() * 100} for s in SETS},
                                "fp32_extract_seconds": info["candidates"].get("fp32", {}).get("extract_seconds")}
        for key, meta in info["candidates"].items():
            if key == "fp32" or not (out / f"feat-{key}.npy").exists():
                continue
            feats = np.load(out / f"feat-{key}.npy")
            row = {"model": info["name"], "candidate": key, "kind": meta["kind"],
                   "target": meta.get("target"), "variant": meta.get("variant"), "method": meta.get("method"),
                   "percentile": meta.get("percentile"), "bias_corrected": meta.get("bias_corrected"),
                   "calibration_images": meta.get("calib"), "float_nodes": len(meta.get("kept_float", [])),
                   "extract_seconds": meta.get("extract_seconds"), "load": meta.get("load_before"),
                   "finite": bool(np.isfinite(feats).all())}
            row.update({k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v)
                        for k, v in label_free(fp32[h0:h1], feats[h0:h1]).items()})
            for s in SETS:
                if not row["finite"]:
                    row[s] = None
                    continue
                pq = per_query(feats, info, s)
                assert np.array_equal(pq["queries"], base[s]["queries"])
                d_ap, d_r1 = pq["ap"] - base[s]["ap"], pq["r1"] - base[s]["r1"]
                n = len(d_ap)
                entry = {"queries": n, "Rank-1": pq["r1"].mean() * 100, "mAP": pq["ap"].mean() * 100}
                for label, d in (("R1", d_r1), ("mAP", d_ap)):
                    shift, sd = float(d.mean() * 100), float(d.std(ddof=1) * 100)
                    entry[f"d_{label}"] = shift
                    entry[f"sd_{label}"] = sd
                    entry[f"se_{label}"] = sd / math.sqrt(n)
                    entry[f"noise2000_{label}"] = 2 * sd / math.sqrt(TARGET_N)
                    entry[f"bound2000_{label}"] = bound(shift, sd, n)
                    entry[f"resample_{label}"] = {"n200": resample(d, 200, rng), "all": resample(d, n, rng)}
                entry["queries_r1_changed"] = int(np.count_nonzero(d_r1))
                row[s] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in entry.items()}
            if row["finite"]:  # both sets together (684 valid queries): a less noisy estimate of the shift
                both = [per_query(feats, info, s) for s in SETS]
                entry = {"queries": int(sum(len(b["ap"]) for b in both))}
                for label, field in (("R1", "r1"), ("mAP", "ap")):
                    d = np.concatenate([b[field] - base[s][field] for b, s in zip(both, SETS)])
                    shift, sd = float(d.mean() * 100), float(d.std(ddof=1) * 100)
                    entry.update({f"d_{label}": round(shift, 4), f"sd_{label}": round(sd, 4),
                                  f"bound2000_{label}": bound(shift, sd, len(d))})
                row["pooled"] = entry
            rows.append(row)
    thresholds = {kind: {m: loosest_threshold(rows, m, sign, kind) for m, sign in MEASURES.items()}
                  for kind in BOUND_KINDS}
    # the same for one metric at a time (Rank-1 moves in whole queries and binds first)
    by_metric = {metric: {kind: {m: loosest_threshold(rows, m, sign, kind, (metric,)) for m, sign in MEASURES.items()}
                          for kind in BOUND_KINDS} for metric in ("R1", "mAP")}
    predictive = {m: rank_correlation(rows, m, sign) for m, sign in MEASURES.items()}
    doc = {"issue": 25, "target_queries": TARGET_N, "max_move": MAX_MOVE,
           "how_checked": (f"a candidate's bound at n={TARGET_N} is |shift| + 2 sd/sqrt({TARGET_N}), shift = mean "
                           "per-query difference (candidate - FP32) on a test set, sd = its per-query standard "
                           "deviation; 'conservative' adds the shift's own uncertainty: |shift| + 2 sd sqrt(1/n + "
                           f"1/{TARGET_N}). A threshold is safe when every candidate it admits has bound <= {MAX_MOVE} "
                           "for Rank-1 and mAP on both test sets and every model"),
           "bound_kinds": BOUND_KINDS, "load_now": common.load_average(), "models": models,
           "predictive": predictive, "thresholds": thresholds, "thresholds_by_metric": by_metric, "rows": rows}
    common.write_json(args.output, doc, command=common.command_line(__file__, args.argv), indent=1)
    log(f"wrote {args.output}: {len(rows)} candidates of {len(models)} models")
    print_table(rows, thresholds, predictive)
    for metric, kinds in by_metric.items():
        print(f"\n{metric} alone, loosest safe threshold per bound kind (" + ", ".join(BOUND_KINDS) + ")")
        for m in MEASURES:
            print(f"  {m:16} " + " | ".join(f"{kinds[k][m]['direction']} {kinds[k][m]['threshold_last_safe']} "
                                            f"({kinds[k][m]['admitted']}/{kinds[k][m]['of']})" for k in BOUND_KINDS))
    if args.markdown:
        args.markdown.write_text(markdown(rows, models, args.gate_measure, args.gate_threshold,
                                          args.second_measure, args.second_threshold))
        log(f"wrote {args.markdown}")
    if args.plot:
        plot(rows, thresholds["pooled"], args.plot, args.gate_measure, args.gate_threshold, args.second_measure)
    return 0


BOUND_KINDS = {
    "point": f"max over both sets and Rank-1/mAP of |shift| + 2 sd/sqrt({TARGET_N}), shift and sd per set",
    "pooled": "the same with shift and sd from both sets' queries together (684)",
    "noise": f"2 sd/sqrt({TARGET_N}) only (what any test set of {TARGET_N} adds, shift assumed 0)",
    "conservative": f"|shift| + 2 sd sqrt(1/n + 1/{TARGET_N}) per set (the shift's own uncertainty included)",
}


def worst_bound(row: dict, kind: str = "point", metrics=("R1", "mAP")) -> float:
    if any(row.get(s) is None for s in SETS):
        return math.inf
    if kind == "pooled":
        return max(row["pooled"][f"bound2000_{m}"]["point"] for m in metrics)
    if kind == "noise":
        return max(row[s][f"noise2000_{m}"] for s in SETS for m in metrics)
    return max(row[s][f"bound2000_{m}"][kind] for s in SETS for m in metrics)


def rank_correlation(rows, measure, sign) -> dict:
    """How well a measure orders the INT8 candidates by their worst bound (Spearman, per model and all)."""
    from scipy.stats import spearmanr

    out = {}
    groups = {"all": rows, **{m: [r for r in rows if r["model"] == m] for m in sorted({r["model"] for r in rows})}}
    for g, rs in groups.items():
        rs = [r for r in rs if r["kind"] == "int8" and r["finite"] and r.get(measure) is not None]
        if len(rs) < 4:
            continue
        out[g] = {kind: round(float(spearmanr([sign * r[measure] for r in rs],
                                              [worst_bound(r, kind) for r in rs]).statistic), 3)
                  for kind in ("point", "noise")}
    return out


def loosest_threshold(rows, measure, sign, kind="point", metrics=("R1", "mAP")) -> dict:
    """The loosest threshold on ``measure`` under which every admitted INT8 candidate's bound <= MAX_MOVE:
    candidates sorted from closest to FP32; the threshold stops just before the first unsafe one."""
    cands = sorted((r for r in rows if r["kind"] == "int8" and r.get(measure) is not None
                    and math.isfinite(r[measure])), key=lambda r: sign * r[measure])
    admitted = []
    for r in cands:
        if worst_bound(r, kind, metrics) > MAX_MOVE:
            first_bad = r
            break
        admitted.append(r)
    else:
        first_bad = None
    return {"direction": "<=" if sign > 0 else ">=",
            "threshold_last_safe": admitted[-1][measure] if admitted else None,
            "first_unsafe_value": first_bad[measure] if first_bad else None,
            "first_unsafe": f"{first_bad['model']} {first_bad['candidate']}" if first_bad else None,
            "admitted": len(admitted), "of": len(cands)}


def print_table(rows, thresholds, predictive) -> None:
    head = (f"{'model':17} {'candidate':26} {'pairE':>6} {'nearE':>6} {'top1':>5} {'rho':>6} {'minCos':>6} | "
            + " | ".join(f"{s}: dR1 dmAP sdR1 sdAP b2000" for s in SETS))
    print(head)
    for r in sorted(rows, key=lambda r: (r["model"], r["pair_error"])):
        cells = []
        for s in SETS:
            e = r.get(s)
            cells.append("(not finite)" if e is None else
                         f"{e['d_R1']:+5.2f} {e['d_mAP']:+5.2f} {e['sd_R1']:5.1f} {e['sd_mAP']:5.1f} "
                         f"{max(e['bound2000_R1']['point'], e['bound2000_mAP']['point']):5.2f}")
        print(f"{r['model']:17} {r['candidate']:26} {r['pair_error']:6.3f} {r['near_pair_error']:6.3f} "
              f"{r['top1_agreement']:5.2f} {r['spearman']:6.4f} {r['min_cosine']:6.3f} | " + " | ".join(cells))
    for kind, by_measure in thresholds.items():
        print(f"\nloosest safe threshold, bound '{kind}': {BOUND_KINDS[kind]}")
        for m, t in by_measure.items():
            print(f"  {m:16} {t['direction']} {t['threshold_last_safe']}  (admits {t['admitted']}/{t['of']}; first "
                  f"unsafe {t['first_unsafe']} at {t['first_unsafe_value']}); Spearman with the worst bound "
                  f"{predictive.get(m, {}).get('all', {}).get(kind if kind in ('point', 'noise') else 'point')}")


def current_gate(row: dict) -> bool:
    """The quantizer's default gate today (Tolerances.reduced_precision): min cosine >= 0.90, mean >= 0.98, pair error <= 0.20."""
    return row["finite"] and row["min_cosine"] >= 0.90 and row["mean_cosine"] >= 0.98 and row["pair_error"] <= 0.20


def passes(row: dict, measure: str, threshold: float | None, second: str | None = None,
           second_threshold: float | None = None) -> bool:
    ok = row["finite"] and threshold is not None and MEASURES[measure] * row[measure] <= MEASURES[measure] * threshold
    if ok and second and second_threshold is not None:
        ok = MEASURES[second] * row[second] <= MEASURES[second] * second_threshold
    return bool(ok)


def markdown(rows, models, measure, threshold, second, second_threshold) -> str:
    """The RESULTS.md table: one line per candidate, models in turn, closest to FP32 first."""
    out = ["| model | candidate | pair err | near-pair err | top-1 | top-5 | Spearman | min / mean cos | "
           "test 199 q: d R1 / d mAP (sd R1 / sd AP) | split 485 q: d R1 / d mAP (sd R1 / sd AP) | "
           "both 684 q: d R1 / d mAP | bound @2000: pooled / noise / per set | gate now | proposed |",
           "|---|---|---:|---:|---:|---:|---:|---|---|---|---|---|---|---|"]
    for name, m in models.items():
        f = m["fp32"]
        out.append(f"| {name} | FP32 | 0 | 0 | 1 | 1 | 1 | 1 / 1 | R1 {f['test']['Rank-1']:.2f} / mAP "
                   f"{f['test']['mAP']:.2f} | R1 {f['split']['Rank-1']:.2f} / mAP {f['split']['mAP']:.2f} | | | | |")
        for r in sorted((r for r in rows if r["model"] == name), key=lambda r: r["pair_error"]):
            def cell(e):
                return (f"{e['d_R1']:+.2f} / {e['d_mAP']:+.2f} ({e['sd_R1']:.1f} / {e['sd_mAP']:.1f})" if e else "n/a")
            p = r.get("pooled")
            label = r["candidate"] + (f" ({r['float_nodes']} float)" if r.get("float_nodes") else "")
            out.append(
                f"| {name} | {label} | {r['pair_error']:.3f} | {r['near_pair_error']:.3f} | "
                f"{r['top1_agreement']:.3f} | {r['top5_agreement']:.3f} | {r['spearman']:.4f} | "
                f"{r['min_cosine']:.3f} / {r['mean_cosine']:.4f} | {cell(r.get('test'))} | {cell(r.get('split'))} | "
                + (f"{p['d_R1']:+.2f} / {p['d_mAP']:+.2f}" if p else "n/a") + " | "
                + (f"{worst_bound(r, 'pooled'):.2f} / {worst_bound(r, 'noise'):.2f} / {worst_bound(r, 'point'):.2f}"
                   if r["finite"] else "inf")
                + f" | {'pass' if current_gate(r) else 'fail'} | "
                + f"{'pass' if passes(r, measure, threshold, second, second_threshold) else 'fail'} |")
    return "\n".join(out) + "\n"


def plot(rows, thresholds, path: Path, measure: str, threshold: float | None, second: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = dict(zip(sorted({r["model"] for r in rows}), "osD^vP*X"))
    colours = {"test": "tab:blue", "split": "tab:orange"}
    names = {"test": "CUHK03 test (199 q)", "split": "CUHK03 train split (485 q)"}
    fig, axes = plt.subplots(2, 2, figsize=(13, 9.5))
    for col, m in enumerate((measure, second)):
        for row_i, metric in enumerate(("mAP", "R1")):
            ax = axes[row_i, col]
            for r in rows:
                if r.get(m) is None or not r["finite"]:
                    continue
                for s in SETS:
                    e = r[s]
                    x = r[m]
                    ax.scatter(x, abs(e[f"d_{metric}"]), marker=markers[r["model"]], s=38 if r["kind"] == "int8" else 90,
                               facecolors=colours[s] if r["kind"] == "int8" else "none", edgecolors=colours[s],
                               alpha=0.8)
                    ax.plot([x, x], [abs(e[f"d_{metric}"]), e[f"bound2000_{metric}"]["point"]], color=colours[s],
                            lw=0.8, alpha=0.45)
                    ax.scatter(x, e[f"bound2000_{metric}"]["point"], marker="_", s=40, color=colours[s], alpha=0.7)
            ax.axhline(MAX_MOVE, color="k", ls=":", lw=1)
            t = threshold if m == measure else thresholds[m]["threshold_last_safe"]
            if t is not None:
                ax.axvline(t, color="red", ls="--", lw=1.2)
            if MEASURES[m] > 0:
                ax.set_xscale("log")
            ax.set_yscale("symlog", linthresh=1.0, linscale=1.5)
            ticks = [0, 0.25, 0.5, 1, 2, 5, 10, 20, 50]
            ax.set_yticks(ticks)
            ax.set_yticklabels([f"{t:g}" for t in ticks])
            ax.set_ylim(-0.05, None)
            ax.set_xlabel(f"{m} on the 128 held-out crops (vs FP32)" + (" [log]" if MEASURES[m] > 0 else ""))
            ax.set_ylabel(f"|d {'Rank-1' if metric == 'R1' else 'mAP'}| (points); line up to the bound at n=2000")
            ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], ls="", marker=mk, color="gray", label=mo) for mo, mk in markers.items()]
    handles += [plt.Line2D([], [], ls="", marker="s", color=c, label=names[s]) for s, c in colours.items()]
    handles += [plt.Line2D([], [], ls="", marker="o", mfc="none", color="gray", label="FP16 (hollow, large)"),
                plt.Line2D([], [], color="red", ls="--", label="threshold (left: recommended; right: loosest safe, pooled bound)"),
                plt.Line2D([], [], color="k", ls=":", label=f"{MAX_MOVE} points")]
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=9)
    fig.suptitle("INT8 candidates: retrieval change against label-free fidelity (issue 25); "
                 f"thin lines reach |shift| + 2 sd/sqrt({TARGET_N})", fontsize=11)
    fig.tight_layout(rect=(0, 0.07, 1, 0.97))
    fig.savefig(path, dpi=110)
    log(f"wrote {path}")


# -------------------------------------------------------------------------------------- export-fixed16

def export_fixed16(args) -> int:
    """The users' second form: opset 11, fixed batch 16, BatchNorm kept (TorchScript exporter, TrainingMode.PRESERVE
    on an eval-mode model: no Conv+BN fusion), the data config written as ``reid-export onnx`` writes it."""
    import io

    import onnx
    import onnxruntime as ort
    import torch

    from reid_export.checkpoint import load_model_from_checkpoint
    from reid_export.export.metadata import base_metadata, save_onnx, set_metadata

    model, _, dc = load_model_from_checkpoint(args.checkpoint, args.config)
    x = torch.rand(args.batch, 3, *dc.input_size, generator=torch.Generator().manual_seed(0)) * 255
    buf = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(model, (x,), buf, dynamo=False, input_names=["input"], output_names=["output"],
                          opset_version=args.opset, training=torch.onnx.TrainingMode.PRESERVE)
        ref = model(x).numpy()
    proto = onnx.load_from_string(buf.getvalue())
    bn = sum(n.op_type == "BatchNormalization" for n in proto.graph.node)
    set_metadata(proto, base_metadata(dc, "fp32"))
    save_onnx(proto, args.output)
    sess = ort.InferenceSession(str(args.output), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": x.numpy()})[0]
    rel = float(np.max(np.linalg.norm(got - ref, axis=1) / np.linalg.norm(ref, axis=1)))
    log(f"wrote {args.output}: opset {args.opset}, batch {args.batch}, {bn} BatchNormalization nodes, "
        f"{len(proto.graph.node)} nodes; ONNX Runtime vs torch max relative L2 {rel:.1e}")
    return 0 if rel < 1e-4 else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="build the candidates and cache their features")
    p.add_argument("--model", action="append", required=True, help="NAME=PATH of an FP32 ONNX with a data config")
    p.add_argument("--dataset", type=Path, required=True, help="Market-layout root with bounding_box_train/")
    p.add_argument("--split", type=Path, required=True, help="benchmarks/retrieval_split.py output for the dataset")
    p.add_argument("--work", type=Path, required=True, help="cache folder (features, inputs)")
    p.add_argument("--targets", default="tensorrt,cpu")
    p.add_argument("--candidates", default=None, help="comma list of keys (e.g. fp16,trt-plain-mse or plain-mse)")
    p.add_argument("--threads", type=int, default=1)
    a = sub.add_parser("analyse", help="measures, retrieval differences, thresholds, JSON and plot")
    a.add_argument("--work", type=Path, required=True)
    a.add_argument("-o", "--output", type=Path, required=True)
    a.add_argument("--plot", type=Path)
    a.add_argument("--gate-measure", default="pair_error")
    a.add_argument("--gate-threshold", type=float, default=None, help="the recommended threshold (drawn)")
    a.add_argument("--second-measure", default="top1_agreement")
    a.add_argument("--second-threshold", type=float, default=None, help="a second gate threshold (drawn, tabled)")
    a.add_argument("--markdown", type=Path, help="write the RESULTS.md table here")
    e = sub.add_parser("export-fixed16", help="opset-11, batch-16, BatchNorm-unfolded export of a checkpoint")
    e.add_argument("checkpoint", type=Path)
    e.add_argument("--config", type=Path, required=True)
    e.add_argument("-o", "--output", type=Path, required=True)
    e.add_argument("--opset", type=int, default=11)
    e.add_argument("--batch", type=int, default=16)
    args = parser.parse_args(argv)
    args.argv = argv
    if args.command == "run":
        for path in (args.dataset / "bounding_box_train", args.split / "query"):
            if not path.is_dir():
                print(f"{path}: not a folder (--dataset needs bounding_box_train/, --split a retrieval_split.py "
                      "output)", file=sys.stderr)
                return 2
        return run(args)
    if args.command == "analyse":
        if not list(args.work.glob("*/feat-fp32.npy")):
            print(f"{args.work}: no cached features (*/feat-fp32.npy); give the --work folder of a `run`",
                  file=sys.stderr)
            return 2
        return analyse(args)
    return export_fixed16(args)


if __name__ == "__main__":
    sys.exit(main())
