"""Peak RSS of ``reid-export eval --query-features Q.npy --gallery-features G.npy`` against gallery size
and chunk size, each run in a fresh process (the figure is that process's max RSS, getrusage).

The feature files come from benchmarks/feature_files.py (extract-style .npy + .json with Market
names). ``--code DIR`` runs another checkout's package (PYTHONPATH=DIR), e.g. the code before a
change, extracted with ``git archive <commit> reid_export | tar -x -C DIR``.

    python benchmarks/feature_files.py --workdir /tmp/feats --gallery-size 65000 --gallery-size 519732 \\
        --query-noise 2.5
    python benchmarks/streamed_eval_memory.py --workdir /tmp/feats --sizes 65000,519732 \\
        --chunks 8388608,33554432 --queries Q,Q_noise2.5 -o benchmarks/streamed_eval_memory.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import common
from common import REPO
from reid_export.report import format_table


def run_one(work: Path, queries: str, size: int, chunk: int, code: Path) -> dict:
    report = work / f"mem_{queries}_{size}_{chunk}.json"
    load = common.load_average()
    # run from the checkout: ``-m`` puts the working folder first on sys.path, before PYTHONPATH
    step = common.run_step("eval", "--query-features", work / f"{queries}.npy", "--gallery-features",
                           work / f"G_{size}.npy", "--chunk-elements", chunk, "--no-progress", "--report", report,
                           capture=True, cwd=code, code=code, say=None)
    if step.returncode != 0:
        raise SystemExit(f"{step.command} failed:\n{step.stderr}")
    res = json.loads(report.read_text())["models"][0]
    report.unlink()
    return {"queries": queries, "gallery": size, "chunk_elements": chunk, "code": str(code),
            "peak_rss_mib": res["peak_rss_mib"], "wall_s": round(step.seconds, 2), "loadavg_before": load,
            **{k: res[k] for k in ("Rank-1", "Rank-5", "Rank-10", "mAP", "mINP")},
            "kept_near_positives": res.get("kept_near_positives"), "command": step.command}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--sizes", default="519732", help="gallery sizes, comma-separated (G_<size>.npy)")
    ap.add_argument("--chunks", default=str(1 << 25), help="--chunk-elements values, comma-separated")
    ap.add_argument("--queries", default="Q", help="query files (<name>.npy), comma-separated")
    ap.add_argument("--code", type=Path, default=REPO, help="checkout whose reid_export runs")
    ap.add_argument("--label", default="", help="name of this code in the table (e.g. before, after)")
    ap.add_argument("-o", "--output", type=Path, help="append the runs to this JSON")
    args = ap.parse_args(argv)
    args.workdir, args.code = args.workdir.resolve(), args.code.resolve()
    runs = []
    for queries in args.queries.split(","):
        for size in [int(s) for s in args.sizes.split(",")]:
            for chunk in [int(c) for c in args.chunks.split(",")]:
                run = run_one(args.workdir, queries, size, chunk, args.code)
                run["label"] = args.label
                runs.append(run)
                print(f"{args.label} {queries} {size} {chunk}: {run['peak_rss_mib']:.0f} MiB, {run['wall_s']} s, "
                      f"mAP {run['mAP']:.2f}", flush=True)
    print(format_table(["code", "queries", "gallery", "chunk", "peak RSS MiB", "wall s", "Rank-1", "mAP", "mINP"],
                       [[r["label"], r["queries"], r["gallery"], r["chunk_elements"], r["peak_rss_mib"], r["wall_s"],
                         r["Rank-1"], r["mAP"], r["mINP"]] for r in runs], floatfmt=".2f"))
    if args.output:
        earlier = json.loads(args.output.read_text())["runs"] if args.output.exists() else []
        doc = {"runs": earlier + runs}  # the header is this run's
        common.write_json(args.output, doc, command=common.command_line(__file__, argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
