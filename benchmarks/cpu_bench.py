#!/usr/bin/env python3
"""The CPU figures of benchmarks/RESULTS.md with one command: BoT-R50 256x128 in torch eager FP32,
ONNX Runtime FP32, FP16, INT8 (TensorRT flavour) and INT8 (CPU flavour), batch 1 and 16.

    python benchmarks/cpu_bench.py                      # everything under work/bench-cpu/
    python benchmarks/cpu_bench.py --accuracy-checkpoint logs/cuhk03/bagtricks_R18_cpu/model_best.pth

Every step is a ``reid-export`` command, printed before it runs, so each figure can be redone by
hand; models already made in --work are reused (--force remakes them):

1. a BoT-R50 checkpoint: --checkpoint, or random weights with BatchNorm statistics measured on
   64 real crops (speed does not depend on the weight values; accuracy does, see 4.)
2. reid-export onnx, then quantize to fp16, int8 --target tensorrt and int8 --target cpu,
   calibrated on --calib-dir (CUHK03 bounding_box_train by default)
3. reid-export bench of the five, side by side (alternating rounds, same thread count); with a
   trained --checkpoint, then reid-export parity of the four ONNX models against it on the real
   parity crops (after the timing, so it cannot disturb it). With random weights it is skipped:
   an untrained R50's features are noise-like, and INT8 moves them far (min cosine about 0.7 on
   the parity crops, measured), which says nothing about a trained model
4. with --accuracy-checkpoint (a trained model): the same exports of it, reid-export eval of the
   checkpoint, FP32 and FP16 ONNX and both INT8 flavours on --dataset-root, and reid-export parity
   of the four ONNX models against the checkpoint on --parity-images
5. a summary (work/bench-cpu/cpu_table.md): the table, the ratios the issue asks for, the load average

The machine should be quiet: the summary records the load average before and after the run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import common
from common import DATA, REPO

CUHK03 = DATA / "cuhk03-labeled" / "Market-1501-v15.09.15"
PARITY_IMAGES = DATA / "parity-images"
ORDER = [("torch eager fp32", ".pth"), ("ORT fp32", ".onnx"), ("ORT fp16", ".fp16.onnx"),
         ("ORT int8 (tensorrt)", ".int8-trt.onnx"), ("ORT int8 (cpu)", ".int8-cpu.onnx")]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=REPO / "work" / "bench-cpu",
                        help="Folder for models and reports (work/ is git-ignored).")
    parser.add_argument("--checkpoint", type=Path, help="BoT-R50 checkpoint to time (default: random weights).")
    parser.add_argument("--config", type=Path, default=REPO / "configs/Market1501/bagtricks_R50.yml")
    parser.add_argument("--calib-dir", type=Path, default=CUHK03 / "bounding_box_train")
    parser.add_argument("--calib-size", type=int, default=512)
    parser.add_argument("--batch-sizes", default="1,16")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--duration", type=float, default=30.0,
                        help="Timed seconds per model and batch size (30 gives >= 18 calls of torch at batch 16).")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--accuracy-checkpoint", type=Path, help="A trained checkpoint for the INT8 accuracy rows.")
    parser.add_argument("--dataset-root", type=Path, default=CUHK03, help="Market-1501-layout data for eval.")
    parser.add_argument("--parity-images", type=Path, default=PARITY_IMAGES,
                        help="Images for the parity check of the timed models.")
    parser.add_argument("--part", choices=("all", "speed", "accuracy"), default="all",
                        help="speed: steps 1-3 and 5; accuracy: step 4 (with --accuracy-checkpoint).")
    parser.add_argument("--force", action="store_true", help="Remake models that exist in --work.")
    parser.add_argument("--dry-run", action="store_true", help="Print the commands without running them.")
    return parser.parse_args(argv)


def say(message: str) -> None:
    print(message, flush=True)


def reid_export(args, *cli_args, output: Path | None = None, source: Path | None = None, ok_codes=(0,)) -> None:
    """Run one ``reid-export`` command (skipped when ``output`` exists, is newer than ``source``, and
    --force is not given)."""
    if output is not None and _fresh(output, source) and not args.force:
        say(f"# exists, reused: {output}  ({common.shown(*cli_args)})")
        return
    common.run_step(*cli_args, ok_codes=ok_codes, say=say, dry_run=args.dry_run)


def _fresh(output: Path, source: Path | None) -> bool:
    if not output.exists():
        return False
    return source is None or not source.exists() or output.stat().st_mtime >= source.stat().st_mtime


def make_random_checkpoint(config: Path, output: Path, calib_dir: Path) -> Path:
    """BoT weights drawn at random, BatchNorm running statistics measured on 64 real crops."""
    path, source = common.random_checkpoint(config, output, calib_dir=calib_dir, name="bot-r50-random")
    say(f"# wrote {path}: random weights, BatchNorm statistics from {source}")
    return path


def export_variants(args, checkpoint: Path, stem: Path) -> dict[str, Path]:
    """ONNX FP32, FP16, INT8 (tensorrt) and INT8 (cpu) of ``checkpoint``, named ``stem`` + suffix."""
    paths = {label: Path(str(stem) + suffix) for label, suffix in ORDER}
    paths["torch eager fp32"] = checkpoint
    fp32 = paths["ORT fp32"]
    reid_export(args, "onnx", checkpoint, "-o", fp32, output=fp32, source=checkpoint)
    reid_export(args, "quantize", fp32, "-o", paths["ORT fp16"], "--precision", "fp16", output=paths["ORT fp16"],
                source=fp32)
    for label, target in (("ORT int8 (tensorrt)", "tensorrt"), ("ORT int8 (cpu)", "cpu")):
        reid_export(args, "quantize", fp32, "-o", paths[label], "--precision", "int8", "--target", target,
                    "--calib-dir", args.calib_dir, "--calib-size", args.calib_size, "--threads", args.threads,
                    "--no-progress", output=paths[label], source=fp32)
    return paths


def run_parity(args, paths: dict[str, Path], report: Path) -> dict | None:
    """reid-export parity of the four ONNX variants against the checkpoint on --parity-images."""
    reid_export(args, "parity", paths["torch eager fp32"], *[paths[label] for label, _ in ORDER[1:]],
                "--images", args.parity_images, "--report", report,
                "--no-progress", ok_codes=(0, 1))  # 1: a candidate failed its gate; the summary says which
    return None if args.dry_run else json.loads(report.read_text())


def summarize(args, bench: dict | None, accuracy: dict | None, paths: dict[str, Path] | None) -> str:
    from reid_export.report import format_table

    lines: list[str] = []
    if bench:
        lines += _speed_lines(bench, paths)
    if accuracy:
        lines += ["", f"accuracy ({accuracy['model_note']}) on {accuracy['dataset']}:",
                  format_table(["model", "backend", "prec", "Rank-1", "mAP", "mINP", "d mAP"],
                               [[Path(m["model"]).name, m.get("backend"), m.get("precision"), m.get("Rank-1"),
                                 m.get("mAP"), m.get("mINP"), m.get("delta_mAP")] for m in accuracy["models"]],
                               floatfmt=".2f")]
        if accuracy.get("parity"):
            lines += _parity_lines(accuracy["parity"], {})
    return "\n".join(lines).lstrip("\n") + "\n"


def _speed_lines(bench: dict, paths: dict[str, Path]) -> list[str]:
    from reid_export.report import format_table

    label_of = {str(p): label for label, p in paths.items()}
    results = bench["results"]
    by = {(label_of.get(r["model"], r["name"]), r["batch_size"]): r for r in results}
    env = bench["environment"]
    rows = []
    for res in sorted(results, key=lambda r: r["batch_size"]):
        label = label_of.get(res["model"], res["name"])
        if res.get("error"):
            rows.append([label, res["batch_size"], "ERROR", "-", "-", "-", "-"])
            continue
        rows.append([label, res["batch_size"], res["throughput_ips"], res["median_ms"], res["p90_ms"],
                     res["p99_ms"], f"{res['speedup_vs_first']:.2f}x" if res.get("speedup_vs_first") else "-"])
    lines = [f"CPU {env['cpu']} ({', '.join(env['cpu_flags']) or 'no AVX2/AVX-512/VNNI flags'}), {env['cpu_count']} "
             f"cores, {env['threads']} threads; torch {env['versions']['torch']}, onnxruntime "
             f"{env['versions']['onnxruntime']}; {bench['date']}",
             f"load average (1/5/15 min) before {common.format_load(env.get('load_average_before'))}, after "
             f"{common.format_load(env.get('load_average_after'))}",
             f"command: {bench['settings'].get('command', '')}".rstrip(": "), "",
             format_table(["model", "batch", "img/s", "median ms", "p90 ms", "p99 ms", "vs torch"], rows,
                          floatfmt=".4g"), ""]

    def ratio(a, b, batch):
        ra, rb = by.get((a, batch)), by.get((b, batch))
        if not ra or not rb or ra.get("error") or rb.get("error"):
            return None
        return ra["throughput_ips"] / rb["throughput_ips"]

    for batch in bench["settings"]["batch_sizes"]:
        r = ratio("ORT fp32", "torch eager fp32", batch)
        if r is not None:
            lines.append(f"batch {batch}: ORT FP32 / torch eager = {r:.2f}x (target >= 1.5x: "
                         f"{'met' if r >= 1.5 else 'missed'})")
        r = ratio("ORT int8 (cpu)", "ORT fp32", batch)
        if r is not None:
            lines.append(f"batch {batch}: INT8-cpu / ORT FP32 = {r:.2f}x"
                         + (f" (target >= 3.5x at batch 16: {'met' if r >= 3.5 else 'missed'})" if batch == 16 else ""))
    if bench.get("parity"):
        lines += _parity_lines(bench["parity"], label_of)
    return lines


def _parity_lines(parity: dict, label_of: dict[str, str]) -> list[str]:
    from reid_export.report import format_table

    images = parity["images"]
    return ["", f"parity vs the checkpoint (torch FP32) on {len(images)} images in "
                f"{Path(images[0]).parent if images else '?'}:",
            format_table(["model", "precision", "min cos", "max rel L2", "top-1 agree", "gate"],
                         [[label_of.get(c["candidate"], Path(c["candidate"]).name), c["precision"], c["min_cosine"],
                           c["max_rel_l2"], c["top1_agreement"], "pass" if c["passed"] else "FAIL"]
                          for c in parity["candidates"]], floatfmt=".4g")]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.part == "accuracy" and not args.accuracy_checkpoint:
        raise SystemExit("cpu_bench: --part accuracy needs --accuracy-checkpoint (a trained model)")
    args.work.mkdir(parents=True, exist_ok=True)
    say(f"# load average before: {common.format_load(common.load_average())}")
    bench = paths = None
    if args.part in ("all", "speed"):
        checkpoint = args.checkpoint
        if checkpoint is None:
            checkpoint = args.work / "bot-r50.pth"
            if not checkpoint.exists() or args.force:
                say(f"$ python benchmarks/cpu_bench.py  # makes {checkpoint}")
                if not args.dry_run:
                    make_random_checkpoint(args.config, checkpoint, args.calib_dir)
        paths = export_variants(args, checkpoint, args.work / "bot-r50")
        report = args.work / "cpu_bench.json"
        bench_cmd = ["bench", *[paths[label] for label, _ in ORDER], "--batch-sizes", args.batch_sizes,
                     "--threads", args.threads, "--warmup", args.warmup, "--duration", args.duration,
                     "--rounds", args.rounds, "--report", report, "--csv", args.work / "cpu_bench.csv",
                     "--plot", args.work / "cpu_bench.png", "--no-progress"]
        reid_export(args, *bench_cmd, ok_codes=(0, 1))  # 1: a model failed at some batch size; still summarised
        if not args.dry_run:
            bench = json.loads(report.read_text())
            bench["settings"]["command"] = common.shown(*bench_cmd)
        if args.checkpoint is None:
            say("# parity of the timed models skipped: random weights say nothing about precision loss "
                "(give --checkpoint, a trained BoT-R50)")
        else:
            parity = run_parity(args, paths, args.work / "cpu_parity.json")
            if bench is not None:
                bench["parity"] = parity
    accuracy = None
    if args.accuracy_checkpoint and args.part in ("all", "accuracy"):
        # named after the run folder too: logs/cuhk03/<run>/model_best.pth of two runs must not collide
        tag = f"{args.accuracy_checkpoint.parent.name}-{args.accuracy_checkpoint.stem}"
        acc = export_variants(args, args.accuracy_checkpoint, args.work / f"{tag}-acc")
        acc_report = args.work / f"cpu_accuracy-{tag}.json"
        reid_export(args, "eval", acc["torch eager fp32"], acc["ORT fp32"], acc["ORT fp16"],
                    acc["ORT int8 (tensorrt)"], acc["ORT int8 (cpu)"], "--dataset-root", args.dataset_root,
                    "--report", acc_report, "--no-progress",
                    ok_codes=(0, 1))  # 1: a variant dropped past eval's default gate; the report says which
        parity = run_parity(args, acc, args.work / f"cpu_parity-{tag}.json")
        if not args.dry_run:
            accuracy = json.loads(acc_report.read_text())
            accuracy["model_note"] = f"trained checkpoint {args.accuracy_checkpoint}"
            accuracy["parity"] = parity
    if args.dry_run:
        return 0
    text = summarize(args, bench, accuracy, paths)
    from reid_export.fileio import atomic_write_text

    atomic_write_text(args.work / ("cpu_table.md" if bench else acc_report.with_suffix(".md").name), text)
    say(f"# load average after: {common.format_load(common.load_average())}")
    say("")
    say(text.rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
