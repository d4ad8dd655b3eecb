"""A faiss index of 500k gallery vectors: build time, recall@10 against exact, query throughput.

Generated 512-d features (benchmarks/synthetic_features.py: Market-like identities plus
look-alike distractors), indexed with ``reid_export.index.build_index`` (the code behind
``reid-export index``), queried with the 3368 generated queries. Exact top-10 comes from the
``flat`` index (exact inner product); each approximate kind is measured at several search
settings. Throughput is for one batch of all queries on this machine's threads.

    python benchmarks/index_bench.py --kinds flat,ivf,hnsw -o benchmarks/index_bench.json
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import common
from reid_export.index import GalleryIndex, IndexParams, build_index, recall_at_k
from reid_export.report import format_table
from reid_export.verify.streamed import peak_rss_mib
from synthetic_features import SyntheticReid

SWEEP = {"flat": [None], "ivf": [16, 32, 64, 128, 256], "ivfpq": [16, 32, 64], "hnsw": [32, 64, 128, 256]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=500_000)
    ap.add_argument("--kinds", default="flat,ivf")
    ap.add_argument("--nlist", type=int, default=1024)
    ap.add_argument("--hnsw-m", type=int, default=32)
    ap.add_argument("--queries", type=int, default=3368)
    ap.add_argument("--noise", type=float, default=1.6, help="per-image noise of the generated features")
    ap.add_argument("-o", "--output", type=Path)
    args = ap.parse_args(argv)
    kinds = args.kinds.split(",")
    if kinds[0] != "flat":
        kinds.insert(0, "flat")  # the exact reference
    synth = SyntheticReid(noise=args.noise)
    qf = synth.query()[0][:args.queries]
    t0 = time.perf_counter()
    data = synth.gallery(args.size)
    gen_s = time.perf_counter() - t0
    files = [f"g{i:07d}.jpg" for i in range(args.size)]
    work = Path(tempfile.mkdtemp(prefix="index_bench_"))
    rows, doc_runs, exact_ids = [], [], None
    try:
        for kind in kinds:
            params = IndexParams(kind=kind, nlist=args.nlist, hnsw_m=args.hnsw_m)
            load0 = common.load_average()
            manifest = build_index(work / kind, data, files, params, data_config=None, recall_sample=0,
                                   progress=True)
            gindex = GalleryIndex.open(work / kind)
            gindex.shards()
            for setting in SWEEP[kind]:
                gindex.set_search_params(nprobe=setting, ef_search=setting)
                t0 = time.perf_counter()
                _, ids = gindex.search(qf, 10, gpu=False)
                search_s = time.perf_counter() - t0
                if kind == "flat":
                    exact_ids = ids
                recall = recall_at_k(ids, exact_ids, 10)
                nn_found = float(np.mean([exact_ids[i, 0] in ids[i] for i in range(ids.shape[0])]))
                name = {"ivf": "nprobe", "ivfpq": "nprobe", "hnsw": "efSearch"}.get(kind, "-")
                run = {"kind": kind, "setting": f"{name}={setting}" if setting else "exact",
                       "build_s": manifest["build_s"], "recall@10": recall, "1-recall@10": nn_found, "queries_per_s": qf.shape[0] / search_s,
                       "search_s": search_s, "loadavg": [load0, common.load_average()]}
                doc_runs.append(run)
                rows.append([kind, run["setting"], run["build_s"], recall, nn_found, run["queries_per_s"]])
                print(rows[-1], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(format_table(["kind", "search setting", "build s", "recall@10 vs exact", "exact NN in top-10",
                        "queries/s"], rows, floatfmt=".4g"))
    print(f"{args.size} x {data.shape[1]} vectors, {qf.shape[0]} queries; generation {gen_s:.1f} s; "
          f"peak RSS {peak_rss_mib():.0f} MiB; load now {common.format_load(common.load_average())}")
    doc = {"size": args.size, "noise": args.noise, "dim": int(data.shape[1]), "queries": int(qf.shape[0]), "nlist": args.nlist,
           "hnsw_m": args.hnsw_m, "peak_rss_mib": peak_rss_mib(), "runs": doc_runs}
    if args.output:
        common.write_json(args.output, doc, command=common.command_line(__file__, argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
