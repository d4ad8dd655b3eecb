#!/usr/bin/env python3
"""The OpenVINO figures of benchmarks/RESULTS.md with one command: ONNX Runtime FP32 and INT8-cpu
against OpenVINO FP32, bf16 and INT8 (from each Q/DQ flavour, as it is), batch 1 and 16, for BoT-R50
256x128 and OSNet-x0.5, with the accuracy beside each route; and Intel's own ReID IR (Open Model Zoo
person-reidentification-retail-0288, FP32 and FP16).

    python benchmarks/openvino_bench.py                  # everything under work/ov-bench/
    python benchmarks/openvino_bench.py --part omz       # only the OMZ IRs (eval + parity)

Every step is a ``reid-export`` command, printed before it runs; models already made in --work are
reused (--force remakes them):

1. BoT-R50 (configs/Market1501/bagtricks_R50.yml): random weights with BatchNorm statistics from 64
   real crops (as benchmarks/cpu_bench.py); reid-export onnx, quantize int8 --target cpu and
   --target tensorrt (calibrated on --calib-dir), reid-export openvino (FP32 IR, parity-checked).
   Accuracy column: reid-export parity of every route against ORT FP32 on --parity-images (no
   trained R50 exists here; random weights exaggerate INT8's error, see RESULTS.md).
2. OSNet-x0.5 (../shared/models/osnet_x0_5_msmt17_combineall.onnx): reid-export annotate (ImageNet
   mean/std, 0..1, bilinear, RGB), the same quantize/openvino steps; accuracy: reid-export eval on
   --dataset-root (CUHK03 labeled), plus parity against ORT FP32.
3. reid-export bench of each model's six routes side by side (alternating rounds, same threads):
   ORT FP32, ORT INT8-cpu, OV FP32 (IR), OV bf16 (IR@openvino:bf16), OV INT8 from the TensorRT-
   flavour Q/DQ ONNX (@openvino), OV INT8 from the CPU-flavour Q/DQ ONNX (@openvino).
4. OMZ 0288: annotate both IRs (BGR, 0..255, normalised inside), reid-export eval of FP32, FP16 and
   FP32@openvino:bf16, reid-export parity FP16 (and bf16) vs FP32 on the query crops.
5. a summary (work/ov-bench/openvino_table.md): CPU model, ISA flags and precision routes, the load
   average before/after, the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import common
from common import DATA, MODELS, REPO

CUHK03 = DATA / "cuhk03-labeled" / "Market-1501-v15.09.15"
OMZ = "person-reidentification-retail-0288"
ROUTES = ("ORT FP32", "ORT INT8-cpu", "OV FP32", "OV bf16", "OV INT8 (trt Q/DQ)", "OV INT8 (cpu Q/DQ)")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=REPO / "work" / "ov-bench")
    parser.add_argument("--config", type=Path, default=REPO / "configs/Market1501/bagtricks_R50.yml")
    parser.add_argument("--osnet", type=Path, default=MODELS / "osnet_x0_5_msmt17_combineall.onnx")
    parser.add_argument("--calib-dir", type=Path, default=CUHK03 / "bounding_box_train")
    parser.add_argument("--calib-size", type=int, default=256)
    parser.add_argument("--dataset-root", type=Path, default=CUHK03)
    parser.add_argument("--parity-images", type=Path, default=DATA / "parity-images")
    parser.add_argument("--batch-sizes", default="1,16")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--duration", type=float, default=10.0, help="Timed seconds per route and batch size.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--part", choices=("all", "r50", "osnet", "omz"), default="all")
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--dry-run", action="store_true")
    return parser.parse_args(argv)


def say(message: str) -> None:
    print(message, flush=True)


def run(args, *cli_args, output: Path | None = None, ok_codes=(0,)) -> None:
    """One ``reid-export`` command, skipped when ``output`` exists (and --force is not given)."""
    if output is not None and output.exists() and not args.force:
        say(f"# exists, reused: {output}  ({common.shown(*cli_args)})")
        return
    common.run_step(*cli_args, ok_codes=ok_codes, say=say, dry_run=args.dry_run)


def variants(args, fp32: Path, quantize_options: tuple = ()) -> dict[str, str]:
    """The two Q/DQ flavours and the FP32 IR of ``fp32``; route label -> model spec."""
    stem = str(fp32)[: -len(".onnx")]
    int8 = {"cpu": Path(stem + ".int8-cpu.onnx"), "tensorrt": Path(stem + ".int8-trt.onnx")}
    for target, path in int8.items():
        run(args, "quantize", fp32, "-o", path, "--precision", "int8", "--target", target, "--calib-dir",
            args.calib_dir, "--calib-size", args.calib_size, "--threads", args.threads, "--no-progress",
            *quantize_options, output=path)
    ir = Path(stem + ".xml")
    run(args, "openvino", fp32, "-o", ir, "--threads", args.threads, "--parity-images", args.parity_images, output=ir)
    return {"ORT FP32": str(fp32), "ORT INT8-cpu": str(int8["cpu"]), "OV FP32": str(ir),
            "OV bf16": f"{ir}@openvino:bf16", "OV INT8 (trt Q/DQ)": f"{int8['tensorrt']}@openvino",
            "OV INT8 (cpu Q/DQ)": f"{int8['cpu']}@openvino"}


def bench(args, routes: dict[str, str], name: str) -> dict | None:
    report = args.work / f"{name}_bench.json"
    cmd = ["bench", *routes.values(), "--batch-sizes", args.batch_sizes, "--threads", args.threads,
           "--warmup", args.warmup, "--duration", args.duration, "--rounds", args.rounds, "--report", report,
           "--no-progress"]
    run(args, *cmd, ok_codes=(0, 1))
    if args.dry_run:
        return None
    doc = json.loads(report.read_text())
    doc["settings"]["command"] = common.shown(*cmd)
    return doc


def parity(args, routes: dict[str, str], name: str, images: Path) -> dict | None:
    report = args.work / f"{name}_parity.json"
    candidates = [spec for label, spec in routes.items() if label != "ORT FP32"]
    run(args, "parity", routes["ORT FP32"], *candidates, "--images", images, "--report", report, "--no-progress",
        ok_codes=(0, 1))  # 1: a route failed its gate; the summary says which
    return None if args.dry_run else json.loads(report.read_text())


def evaluate(args, specs: list[str], name: str) -> dict | None:
    report = args.work / f"{name}_eval.json"
    run(args, "eval", *specs, "--dataset-root", args.dataset_root, "--report", report, "--no-progress",
        ok_codes=(0, 1))
    return None if args.dry_run else json.loads(report.read_text())


def _arithmetic(res: dict) -> str:
    """What the route computes in: int8 graphs keep their float parts in the inference precision."""
    compiled = res.get("compiled_inference_precision")
    if res["precision"] == "int8":
        return f"int8 + {compiled or 'fp32'} rest"
    return compiled or res["precision"]


def route_table(title: str, routes: dict[str, str], bench_doc: dict, parity_doc: dict | None,
                eval_doc: dict | None) -> list[str]:
    from reid_export.report import format_table

    by_spec = {}
    for res in bench_doc["results"]:
        by_spec[(res["name"], res["batch_size"])] = res
    base = {b: by_spec.get((Path(routes["ORT FP32"]).name, b)) for b in bench_doc["settings"]["batch_sizes"]}
    cosine = {c["candidate"]: c for c in (parity_doc or {}).get("candidates", [])}
    accuracy = {m["model"]: m for m in (eval_doc or {}).get("models", [])}
    rows = []
    for batch in bench_doc["settings"]["batch_sizes"]:
        for label, spec in routes.items():
            res = by_spec.get((Path(spec).name, batch))
            if res is None or res.get("error"):
                rows.append([label, batch, "ERROR", "-", "-", "-", "-", "-"])
                continue
            ref = base[batch]
            ratio = res["throughput_ips"] / ref["throughput_ips"] if ref and not ref.get("error") else None
            par = cosine.get(spec)
            acc = accuracy.get(spec)
            rows.append([label, batch, res["throughput_ips"], res["median_ms"],
                         f"{ratio:.2f}x" if ratio else "-",
                         "1 (reference)" if label == "ORT FP32" else (f"{par['min_cosine']:.5f}" if par else "-"),
                         f"{acc['Rank-1']:.2f} / {acc['mAP']:.2f}" if acc and "mAP" in acc else "-",
                         _arithmetic(res)])
    return [f"### {title}", "", format_table(["route", "batch", "img/s", "median ms", "vs ORT FP32",
                                              "min cos vs ORT FP32", "Rank-1 / mAP", "arithmetic"], rows,
                                             floatfmt=".4g"), ""]


def main(argv=None) -> int:
    args = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    from reid_export.cpuinfo import routes_line

    load_before = common.load_average()
    say(f"# load average before: {common.format_load(load_before)}")
    say(f"# {routes_line()}")
    lines: list[str] = []
    envs = []
    if args.part in ("all", "r50"):
        ckpt = args.work / "bot-r50.pth"
        if not ckpt.exists() or args.force:
            say(f"$ python benchmarks/openvino_bench.py  # makes {ckpt}")
            if not args.dry_run:
                path, source = common.random_checkpoint(args.config, ckpt, calib_dir=args.calib_dir,
                                                        name="bot-r50-random")
                say(f"# wrote {path}: random weights, BatchNorm statistics from {source}")
        fp32 = args.work / "bot-r50.onnx"
        run(args, "onnx", ckpt, "-o", fp32, output=fp32)
        routes = variants(args, fp32)
        doc = bench(args, routes, "r50")
        par = parity(args, routes, "r50", args.parity_images)
        if doc:
            envs.append(doc)
            lines += route_table("BoT-R50 256x128 (random weights; accuracy = parity on the parity crops)", routes,
                                 doc, par, None)
    if args.part in ("all", "osnet"):
        fp32 = args.work / "osnet_x0_5.onnx"
        run(args, "annotate", args.osnet, "-o", fp32, "--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225",
            "--pixel-scale", "1", "--channel-order", "rgb", "--interpolation", "linear", output=fp32)
        # The quantizer's accuracy gate refuses every INT8 OSNet it can make from these crops (min cosine
        # 0.11 with its defaults, 85 of 85 nodes tried in float): written anyway, fully quantized, so that
        # the speed of the INT8 routes can be measured, with their (bad) accuracy beside them.
        routes = variants(args, fp32, ("--method", "entropy", "--max-float", "0", "--allow-below-gate"))
        doc = bench(args, routes, "osnet")
        par = parity(args, routes, "osnet", args.parity_images)
        ev = evaluate(args, list(routes.values()), "osnet")
        if doc:
            envs.append(doc)
            lines += route_table("OSNet-x0.5 MSMT17 256x128 (accuracy = eval on CUHK03 labeled)", routes, doc, par, ev)
    if args.part in ("all", "omz"):
        omz = {}
        for prec in ("FP32", "FP16"):
            out = args.work / "omz" / f"omz-0288.{prec}.xml"
            if not args.dry_run:
                out.parent.mkdir(exist_ok=True)
            run(args, "annotate", MODELS / f"{OMZ}.{prec}.xml", "-o", out, "--mean", "0,0,0", "--std", "1,1,1",
                "--pixel-scale", "255", "--channel-order", "bgr", "--interpolation", "linear", "--normalized-inside",
                "--model-name", OMZ, output=out)
            omz[prec] = str(out)
        specs = [omz["FP32"], omz["FP16"], f"{omz['FP32']}@openvino:bf16"]
        ev = evaluate(args, specs, "omz")
        par = parity(args, {"ORT FP32": omz["FP32"], "FP16": omz["FP16"], "bf16": specs[2]}, "omz",
                     args.dataset_root / "query")
        if ev and par:
            from reid_export.report import format_table

            cos = {c["candidate"]: c for c in par["candidates"]}
            rows = [[Path(m["model"]).name + ("" if m["model"] in omz.values() else ""), m["precision"],
                     m["Rank-1"], m["mAP"], m["mINP"],
                     f"{cos[m['model']]['min_cosine']:.6f}" if m["model"] in cos else "1 (reference)",
                     f"{cos[m['model']]['max_rel_l2']:.3g}" if m["model"] in cos else "-",
                     ("pass" if cos[m["model"]]["passed"] else "FAIL") if m["model"] in cos else "-"]
                    for m in ev["models"]]
            lines += [f"### {OMZ} (OpenVINO IR from Open Model Zoo) on {ev['dataset']}", "",
                      format_table(["model", "prec", "Rank-1", "mAP", "mINP", "min cos vs FP32 (200 queries)",
                                    "max rel L2", "parity gate"], rows, floatfmt=".2f"), ""]
    if args.dry_run:
        return 0
    load_after = common.load_average()
    if envs:
        env = envs[0]["environment"]
    else:
        from reid_export.bench.report import environment

        env = environment(args.threads, "cpu")
    head = [f"CPU {env.get('cpu', '?')}, {env.get('cpu_count', '?')} cores, {args.threads} threads; "
            f"onnxruntime {env.get('versions', {}).get('onnxruntime')}, openvino {env.get('versions', {}).get('openvino')}",
            routes_line(),
            f"load average (1/5/15 min) before {common.format_load(load_before)}, after "
            f"{common.format_load(load_after)}", ""]
    for doc in envs:
        head.append(f"command: {doc['settings']['command']}")
    text = "\n".join(head + [""] + lines) + "\n"
    from reid_export.fileio import atomic_write_text

    atomic_write_text(args.work / "openvino_table.md", text)
    say(f"# load average after: {common.format_load(load_after)}")
    say("")
    say(text.rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
