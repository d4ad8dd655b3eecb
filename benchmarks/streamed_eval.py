"""Exact Market-protocol eval of 3368 queries against a 519,732-item gallery in bounded memory.

Generates the features (benchmarks/synthetic_features.py) into a ``.npy`` file, as ``extract``
would write it, opens it memory-mapped, and runs ``evaluate_rank_streamed`` (the code behind
``reid-export eval --query-features Q.npy --gallery-features G.npy``). Then it checks the
result against the full-matrix ``evaluate_rank`` on a subsample: a random set of queries
against the *whole* gallery (the per-query AP/INP and first-match ranks must be equal; the
full matrix of that subsample is what fits in memory). Prints a table and writes JSON.

    python benchmarks/streamed_eval.py --workdir /tmp/streamed -o benchmarks/streamed_eval.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import common
from reid_export.bench.memory import peak_rss_mib, reset_peak_rss, rss_mib
from reid_export.report import format_table
from reid_export.verify.metrics import compute_distance, evaluate_rank
from reid_export.verify.streamed import FeatureDistances, evaluate_rank_streamed
from synthetic_features import FULL_GALLERY, SyntheticReid


def summary(res: dict) -> dict:
    cmc = res["cmc"]
    return {"Rank-1": cmc[0] * 100, "Rank-5": cmc[4] * 100, "Rank-10": cmc[9] * 100, "mAP": res["mAP"] * 100,
            "mINP": res["mINP"] * 100, "valid": res["num_valid_queries"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gallery-size", type=int, default=FULL_GALLERY)
    ap.add_argument("--chunk-elements", type=int, default=1 << 25)
    ap.add_argument("--check-queries", type=int, default=200, help="queries in the full-matrix check")
    ap.add_argument("--workdir", type=Path, help="where G.npy goes (default: a temporary folder)")
    ap.add_argument("-o", "--output", type=Path)
    args = ap.parse_args(argv)

    work = args.workdir or Path(tempfile.mkdtemp(prefix="streamed_eval_"))
    work.mkdir(parents=True, exist_ok=True)
    synth = SyntheticReid()
    qf, q_pids, q_cams = synth.query()
    g_pids, g_cams = synth.gallery_labels(args.gallery_size)
    g_path = work / f"gallery_{args.gallery_size}.npy"
    t0 = time.perf_counter()
    if not g_path.exists():
        mm = np.lib.format.open_memmap(g_path, mode="w+", dtype=np.float32, shape=(args.gallery_size, synth.dim))
        synth.gallery(args.gallery_size, out=mm)
        mm.flush()
        del mm
    gen_s = time.perf_counter() - t0

    gallery = np.load(g_path, mmap_mode="r")
    load_before = common.load_average()
    reset_peak_rss()
    rss0 = rss_mib()
    t0 = time.perf_counter()
    c0 = time.process_time()
    res = evaluate_rank_streamed(FeatureDistances(qf, gallery, "cosine"), q_pids, g_pids, q_cams, g_cams,
                                 chunk_elements=args.chunk_elements, progress=True, return_ranks=True)
    eval_s = time.perf_counter() - t0
    cpu_s = time.process_time() - c0
    peak = peak_rss_mib()
    load_after = common.load_average()

    # The check: a subsample of queries against the whole gallery, as one full matrix.
    rng = np.random.default_rng(1)
    sub = np.sort(rng.choice(qf.shape[0], args.check_queries, replace=False))
    t0 = time.perf_counter()
    distmat = compute_distance(qf[sub], np.asarray(gallery))
    full = evaluate_rank(distmat, q_pids[sub], g_pids, q_cams[sub], g_cams)
    full_s = time.perf_counter() - t0
    pos = np.searchsorted(res["valid_queries"], sub[full["valid_queries"]])
    # Every positive's rank, from a stable argsort of each full row (the textbook definition).
    same_ranks = True
    for i, q in enumerate(sub):
        order = np.argsort(distmat[i], kind="stable")
        removed = (g_pids[order] == q_pids[q]) & (g_cams[order] == q_cams[q])
        ranks = np.flatnonzero(g_pids[order][~removed] == q_pids[q]) + 1
        j = np.searchsorted(res["valid_queries"], q)
        same_ranks &= bool(np.array_equal(res["ranks"][j][:ranks.size], ranks))
    del distmat
    same_inp = np.array_equal(res["all_INP"][pos], full["all_INP"])
    max_ap_diff = float(np.abs(res["all_AP"][pos] - full["all_AP"]).max())
    same_ap = max_ap_diff <= 1e-12
    rows = [["streamed, all queries", f"{qf.shape[0]} x {args.gallery_size}", *summary(res).values(),
             eval_s, cpu_s, peak]]
    rows.append([f"full matrix, {args.check_queries} queries", f"{args.check_queries} x {args.gallery_size}",
                 *summary(full).values(), full_s, None, None])
    print(format_table(["run", "size", "Rank-1", "Rank-5", "Rank-10", "mAP", "mINP", "valid queries", "wall s",
                        "CPU s", "peak RSS MiB"], rows, floatfmt=".2f"))
    print(f"subsample check: every positive's rank equal {same_ranks}, per-query INP equal {same_inp}, AP equal "
          f"{same_ap} (max |AP diff| {max_ap_diff:.3g}); "
          f"items kept near positives {res['kept_near_positives']}; load {common.format_load(load_before)} -> "
          f"{common.format_load(load_after)}")
    doc = {"num_query": int(qf.shape[0]), "num_gallery": args.gallery_size, "dim": synth.dim,
           "chunk_elements": args.chunk_elements, "generate_s": gen_s, "eval_s": eval_s, "eval_cpu_s": cpu_s,
           "rss_before_mib": rss0, "peak_rss_mib": peak, "loadavg_before": load_before, "loadavg_after": load_after,
           "streamed": summary(res), "kept_near_positives": res["kept_near_positives"],
           "check": {"queries": args.check_queries, "full_matrix": summary(full), "full_s": full_s,
                     "positive_ranks_equal": same_ranks, "per_query_AP_equal_1e-12": same_ap, "per_query_INP_equal": same_inp, "max_ap_diff": max_ap_diff},
           "passed": bool(same_ranks and same_ap and same_inp and eval_s <= 120 and peak <= 3 * 1024)}
    if args.output:
        common.write_json(args.output, doc, command=common.command_line(__file__, argv))
    print("PASS" if doc["passed"] else "FAIL", "(<= 120 s, <= 3 GiB peak RSS, equal on the subsample)")
    return 0 if doc["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
