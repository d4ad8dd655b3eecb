"""Market-size eval speed (3368 x 15,913): our metrics against fast-reid's Cython ``evaluate_cy``.

Same generated features (benchmarks/synthetic_features.py), one cosine distance matrix, and in
the same run, alternating, several repetitions each: fast-reid's ``rank_cy.evaluate_cy`` (built
from the fastreid 1.4.0 source on PyPI; see benchmarks/RESULTS.md for the build), our
``evaluate_rank`` on the full matrix, and ``evaluate_rank_streamed`` on that matrix and on the
features (the features variant also computes the distances). The metrics must agree.

    python benchmarks/market_eval_speed.py --fastreid-cy /tmp/rank_cylib -o benchmarks/market_eval_speed.json
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import numpy as np

import common
from reid_export.report import format_table
from reid_export.verify.metrics import compute_distance, evaluate_rank
from reid_export.verify.streamed import FeatureDistances, MatrixDistances, evaluate_rank_streamed
from synthetic_features import MARKET_GALLERY, SyntheticReid


def load_rank_cy(folder: Path):
    """fast-reid's built ``rank_cy`` extension from ``folder`` (rank_cy*.so / .pyd), loaded by its file."""
    built = sorted(folder.glob("rank_cy*.so")) + sorted(folder.glob("rank_cy*.pyd"))
    if not built:
        raise SystemExit(f"{folder}: no rank_cy*.so (build fast-reid's evaluation/rank_cylib first)")
    spec = importlib.util.spec_from_file_location("rank_cy", built[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fastreid-cy", type=Path, required=True,
                    help="folder holding fast-reid's built rank_cy extension (rank_cy*.so)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("-o", "--output", type=Path)
    args = ap.parse_args(argv)
    rank_cy = load_rank_cy(args.fastreid_cy)

    synth = SyntheticReid()
    qf, q_pids, q_cams = synth.query()
    gf = synth.gallery(MARKET_GALLERY)
    g_pids, g_cams = synth.gallery_labels(MARKET_GALLERY)
    distmat = compute_distance(qf, gf)  # float32, what evaluate_cy takes

    def ours():
        r = evaluate_rank(distmat, q_pids, g_pids, q_cams, g_cams)
        return r["cmc"], r["mAP"], r["mINP"]

    def streamed_matrix():
        r = evaluate_rank_streamed(MatrixDistances(distmat), q_pids, g_pids, q_cams, g_cams)
        return r["cmc"], r["mAP"], r["mINP"]

    def streamed_features():
        r = evaluate_rank_streamed(FeatureDistances(qf, gf), q_pids, g_pids, q_cams, g_cams)
        return r["cmc"], r["mAP"], r["mINP"]

    def fastreid():
        cmc, all_ap, all_inp = rank_cy.evaluate_cy(distmat, q_pids, g_pids, q_cams, g_cams, 50, False)
        return np.asarray(cmc), float(np.mean(all_ap)), float(np.mean(all_inp))

    runs = {"fast-reid evaluate_cy (Cython)": fastreid, "evaluate_rank (full matrix)": ours,
            "evaluate_rank_streamed (matrix)": streamed_matrix,
            "evaluate_rank_streamed (features, incl. distances)": streamed_features}
    times = {k: [] for k in runs}
    values = {}
    load = [common.load_average()]
    for _ in range(args.repeats):
        for name, fn in runs.items():  # alternating, so a busy moment hits every one
            t0 = time.perf_counter()
            values[name] = fn()
            times[name].append(time.perf_counter() - t0)
    load.append(common.load_average())
    ref = values["fast-reid evaluate_cy (Cython)"]
    rows, doc_runs = [], {}
    base = float(np.median(times["fast-reid evaluate_cy (Cython)"]))
    for name in runs:
        cmc, m_ap, m_inp = values[name]
        cmc, m_ap, m_inp = np.asarray(cmc, dtype=np.float64), float(m_ap), float(m_inp)
        med = float(np.median(times[name]))
        # fast-reid works in float32 (CMC/AP accumulate in float32): agreement to 1e-5.
        same = bool(np.allclose(cmc[:50], ref[0][:50], atol=1e-5) and abs(m_ap - ref[1]) < 1e-5
                    and abs(m_inp - ref[2]) < 1e-5)
        rows.append([name, med, min(times[name]), base / med, float(cmc[0]) * 100, m_ap * 100, m_inp * 100, same])
        doc_runs[name] = {"median_s": med, "min_s": min(times[name]), "times_s": times[name],
                          "speedup_vs_cython": base / med, "Rank-1": float(cmc[0]) * 100, "mAP": m_ap * 100,
                          "mINP": m_inp * 100, "same_metrics_as_cython": same}
    print(format_table(["eval", "median s", "min s", "x Cython", "Rank-1", "mAP", "mINP", "same metrics"], rows,
                       floatfmt=".4g"))
    print(f"{distmat.shape[0]} x {distmat.shape[1]}, {args.repeats} repeats each; load "
          f"{common.format_load(load[0])} -> {common.format_load(load[1])}")
    doc = {"shape": list(distmat.shape), "repeats": args.repeats, "loadavg": load, "runs": doc_runs}
    if args.output:
        common.write_json(args.output, doc, command=common.command_line(__file__, argv))
    ok = doc_runs["evaluate_rank (full matrix)"]["speedup_vs_cython"] >= 2.0 and all(
        r["same_metrics_as_cython"] for r in doc_runs.values())
    print("PASS" if ok else "FAIL", "(evaluate_rank >= 2x evaluate_cy, same metrics)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
