#!/usr/bin/env python3
"""CPU training benchmark: BoT-R18 or OSNet on the CUHK03 crops (Market-1501 layout), before vs after.

    python benchmarks/train_cuhk03_cpu.py [--data ../shared/data] [--output-dir logs/cuhk03/bagtricks_R18_cpu]
                                         [--config configs/CUHK03/bagtricks_R18_cpu.yml] [--resume] [--opts K V ...]

1. ``reid-train --eval-only`` with the config's seed: Rank-1/mAP/mINP of the untrained model (the
   exact initial weights of the training run);
2. ``reid-train`` (``--resume`` continues an interrupted run): trains and evaluates;
3. writes ``OUTPUT_DIR/benchmark.json`` and prints the rows for benchmarks/RESULTS.md: before/after
   metrics, training img/s (per epoch, wall clock including data loading, median over epochs),
   total time, mAP against minutes of training (each evaluation), date, CPU model, core count, and the load average (other processes on the machine
   slow the run down; it is recorded so that the img/s can be judged).

The checkpoints (model_final.pth, model_best.pth) stay in OUTPUT_DIR, out of git.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import time
from pathlib import Path

import common
from common import DATA, REPO


def reid_train(args: list[str]) -> None:
    common.run_step(*args, tool="reid-train", ok_codes=(0,))


def mAP_curve(epochs: list[dict], evals: list[Path], name: str) -> list[dict]:  # noqa: N802
    """mAP against minutes of training (sum of the epochs' wall clock up to each evaluation)."""
    elapsed, minutes = 0.0, {}
    for h in epochs:
        elapsed += h["seconds"]
        minutes[h["epoch"]] = elapsed / 60
    curve = []
    for path in evals:
        m = json.loads(path.read_text())
        r = m["results"][name]
        curve.append({"epoch": m["epoch"] + 1, "train_minutes": round(minutes.get(m["epoch"], float("nan")), 2),
                      "Rank-1": r["Rank-1"], "mAP": r["mAP"]})
    return curve


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(DATA),
                        help="DATASETS.ROOT: the folder holding cuhk03-labeled/")
    parser.add_argument("--config", default=str(REPO / "configs" / "CUHK03" / "bagtricks_R18_cpu.yml"))
    parser.add_argument("--output-dir", default=str(REPO / "logs" / "cuhk03" / "bagtricks_R18_cpu"))
    parser.add_argument("--resume", action="store_true", help="continue an interrupted training run")
    parser.add_argument("--skip-before", action="store_true", help="reuse the untrained evaluation already there")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="extra config overrides (last)")
    args = parser.parse_args(argv)

    out = Path(args.output_dir)
    opts = ["DATASETS.ROOT", args.data, *args.opts]
    started = dt.datetime.now(dt.timezone.utc)
    load_start = common.load_average()

    before_dir = out / "untrained"
    if not (args.skip_before and (before_dir / "metrics_eval.json").is_file()):
        reid_train(["--config", args.config, "--output-dir", str(before_dir), "--eval-only", "--no-progress",
                    "--opts", *opts])
    before = json.loads((before_dir / "metrics_eval.json").read_text())

    t0 = time.time()
    reid_train(["--config", args.config, "--output-dir", str(out), "--no-progress",
                *(["--resume"] if args.resume else []), "--opts", *opts])
    wall = time.time() - t0
    load_end = common.load_average()

    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines() if line.strip()]
    by_epoch = {h["epoch"]: h for h in history}  # a resumed run may repeat an epoch: keep the last
    epochs = [by_epoch[e] for e in sorted(by_epoch)]
    evals = sorted(out.glob("metrics_[0-9]*.json"))
    final = json.loads(evals[-1].read_text())
    best = max((json.loads(p.read_text()) for p in evals),
               key=lambda m: next(iter(m["results"].values()))["metric"])
    name = next(iter(final["results"]))
    pick = ("Rank-1", "Rank-5", "Rank-10", "mAP", "mINP")
    env = common.environment()
    summary = {
        "date_utc": started.strftime("%Y-%m-%d %H:%M"),
        # kept as before: a dict, in place of the report header's host name
        "machine": {"cpu": env["cpu"], "cores": env["cpu_count"], "python": env["python"],
                    "torch": env["versions"]["torch"], "loadavg_start": load_start, "loadavg_end": load_end},
        "config": os.path.relpath(args.config, REPO), "opts": opts, "output_dir": str(out),
        "before": {k: before["results"][name][k] for k in pick},
        "after_final": {k: final["results"][name][k] for k in pick} | {"epoch": final["epoch"] + 1},
        "after_best": {k: best["results"][name][k] for k in pick} | {"epoch": best["epoch"] + 1},
        "train": {
            "epochs": len(epochs), "images_per_epoch": epochs[0]["images"] if epochs else 0,
            "img_per_s_median": statistics.median(h["img_per_s"] for h in epochs),
            "img_per_s_best_epoch": max(h["img_per_s"] for h in epochs),
            "compute_img_per_s_median": statistics.median(h["compute_img_per_s"] for h in epochs),
            "train_seconds_sum": round(sum(h["seconds"] for h in epochs), 1),
            "wall_seconds_this_call": round(wall, 1),
            "loss_first_epoch": epochs[0]["loss"], "loss_last_epoch": epochs[-1]["loss"],
        },
        "checkpoints": [str(out / "model_final.pth"), str(out / "model_best.pth")],
        "curve": mAP_curve(epochs, evals, name),
    }
    common.write_json(out / "benchmark.json", summary, command=common.command_line(__file__, argv))

    b, f, bb, t = summary["before"], summary["after_final"], summary["after_best"], summary["train"]
    print(f"\nCUHK03 ({name}), {summary['date_utc']} UTC, {summary['machine']['cpu']}, {os.cpu_count()} cores")
    print("| model | Rank-1 | Rank-5 | mAP | mINP |")
    print("|---|---|---|---|---|")
    print(f"| untrained (seed {before['seed']}) | {b['Rank-1']:.2f} | {b['Rank-5']:.2f} | {b['mAP']:.2f} | {b['mINP']:.2f} |")
    print(f"| after {f['epoch']} epochs (final) | {f['Rank-1']:.2f} | {f['Rank-5']:.2f} | {f['mAP']:.2f} | {f['mINP']:.2f} |")
    print(f"| best (epoch {bb['epoch']}) | {bb['Rank-1']:.2f} | {bb['Rank-5']:.2f} | {bb['mAP']:.2f} | {bb['mINP']:.2f} |")
    print(f"training: {t['epochs']} epochs x {t['images_per_epoch']} images, median {t['img_per_s_median']:.1f} img/s "
          f"(best epoch {t['img_per_s_best_epoch']:.1f}, compute only {t['compute_img_per_s_median']:.1f}), "
          f"{t['train_seconds_sum'] / 60:.1f} min of training; load average {common.format_load(load_start)} -> "
          f"{common.format_load(load_end)}")
    print("mAP against minutes of training: " + ", ".join(
        f"epoch {c['epoch']} {c['train_minutes']:.1f} min mAP {c['mAP']:.2f}" for c in summary["curve"]))
    print(f"mAP gain: {f['mAP'] - b['mAP']:+.2f} points (final), summary in {out / 'benchmark.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
