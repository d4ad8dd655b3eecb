#!/usr/bin/env python3
"""GPU throughput of BoT-R50 (256x128) on the routes torch offers, side by side, in one short run.

    python benchmarks/gpu_bench.py --out work/bench-gpu/     # or: bash benchmarks/gpu_bench.sh

Routes (each skipped with its reason where it cannot run):

  encoder fp32          reid-export's torch backend as ``bench`` runs it: host float32 in, host features out
  fp32 / fp16           eager torch, input already on the GPU, output left there
  fp16 cl               + channels_last memory format
  fp16 cl graph         + the whole forward captured once per batch size as a CUDA graph and replayed
  fp16 cl fold graph    + BatchNorm folded into the preceding convolutions before capture
  compile <mode>        torch.compile (inductor, freezing) of the fp16 channels_last model, at
                        --compile-batches only; ``max-autotune`` is not offered (it compiled for more
                        than 7 minutes for R50 on an H100)
  ort cuda fp32         ONNX Runtime's CUDA provider on the exported ONNX, when onnxruntime has it

Timing reuses reid_export.bench: per batch size every route warms up, then the routes take
turns in --rounds slices; each call is timed with CUDA events and synchronised. The compiled
route runs in a second phase (after the others are written), so a compile that overruns
the time budget costs only its own row. TensorRT is not measured by this script.

Writes OUT/gpu_bench.json and OUT/gpu_table.md and prints the table last. torch.compile's
logs go to stderr: run it with ``> log 2>&1`` (gpu_bench.sh does) to keep them off the screen.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import common
from common import REPO
from reid_export.bench.core import BenchSettings, CpuTimer, CudaEventTimer, Subject, run_benchmark
from reid_export.bench.report import add_speedups, environment
from reid_export.bench.subjects import InputCache, encoder_subject
from reid_export.fileio import atomic_write_text
from reid_export.report import format_table

ROUTES = ("encoder-fp32", "fp32", "fp16", "fp16-cl", "fp16-cl-graph", "fp16-cl-fold-graph", "compile", "ort-cuda")
TARGET_IPS = 25_000          # issue 7: batch 256 on an H100, fastest route
# Published dense (no sparsity) FP16/BF16 Tensor Core peaks, TFLOP/s, from NVIDIA's data sheets, by a
# substring of the device name torch reports. A ceiling from the vendor, not from our own figures.
PEAK_DENSE_FP16_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("A100", 312.0), ("L4", 121.0))


def peak_tflops(gpu_name: str | None) -> tuple[str, float] | None:
    """(matched name, published dense FP16 peak) for a known GPU, else None."""
    for key, tflops in PEAK_DENSE_FP16_TFLOPS:
        if gpu_name and key in gpu_name:
            return key, tflops
    return None


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="A checkpoint to load (default: random BoT-R50 weights; "
                        "speed does not depend on the values).")
    parser.add_argument("--config", type=Path, default=REPO / "configs/Market1501/bagtricks_R50.yml",
                        help="fast-reid config of the model (default: BoT-R50).")
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="Input size (default: the config's).")
    parser.add_argument("--batch-sizes", default="1,64,256", help="Comma-separated batch sizes.")
    parser.add_argument("--routes", default=",".join(ROUTES), help=f"Comma-separated subset of {','.join(ROUTES)}.")
    parser.add_argument("--compile-mode", default="reduce-overhead", choices=("default", "reduce-overhead"))
    parser.add_argument("--compile-batches", default="256", help="Batch sizes to compile for (each compiles once).")
    parser.add_argument("--no-freezing", action="store_true", help="Compile without inductor freezing.")
    parser.add_argument("--warmup", type=float, default=0.5, help="Seconds of warmup per route and batch size.")
    parser.add_argument("--duration", type=float, default=1.5, help="Timed seconds per route and batch size.")
    parser.add_argument("--rounds", type=int, default=3, help="Alternating slices per batch size.")
    parser.add_argument("--budget", type=float, default=270.0,
                        help="Seconds after which the compile phase is skipped (the run must fit in 5 minutes).")
    parser.add_argument("--device", default="cuda", help="cuda[:N], or cpu to check the script itself.")
    parser.add_argument("--out", type=Path, default=REPO / "work" / "bench-gpu",
                        help="Folder for the JSON and the table (work/ is git-ignored).")
    args = parser.parse_args(argv)
    args.batch_sizes = _int_list(parser, "--batch-sizes", args.batch_sizes)
    args.compile_batches = _int_list(parser, "--compile-batches", args.compile_batches)
    args.routes = [r.strip() for r in args.routes.split(",") if r.strip()]
    unknown = [r for r in args.routes if r not in ROUTES]
    if unknown:
        parser.error(f"--routes: unknown {', '.join(unknown)}; choose from {', '.join(ROUTES)}")
    return args


def _int_list(parser, name, text) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        parser.error(f"{name}: expected comma-separated integers, got {text!r}")
    if not values or any(v < 1 for v in values):
        parser.error(f"{name}: expected positive integers, got {text!r}")
    return values


def log(message: str) -> None:
    print(f"[gpu_bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the model


def load_model(args):
    """(model fp32 eval on CPU, cfg, data config, checkpoint path or None)."""
    from reid_export.checkpoint import load_model_from_checkpoint
    from reid_export.config import load_config
    from reid_export.data_config import data_config_from_cfg
    from reid_export.modeling import build_model

    opts = ["INPUT.SIZE_TEST", f"[{args.size[0]}, {args.size[1]}]"] if args.size else []
    if args.checkpoint:
        model, cfg, data_config = load_model_from_checkpoint(args.checkpoint, args.config if args.size else None,
                                                             opts)
        return model.eval(), cfg, data_config, args.checkpoint
    cfg = load_config(args.config, opts)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    return model, cfg, data_config_from_cfg(cfg, model.feat_dim, Path(args.config).stem), None


def gflop_per_image(model, input_size) -> float | None:
    """Forward FLOPs (2 per multiply-add) of one image, counted by torch on the CPU."""
    try:
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(torch.zeros(1, 3, *input_size))
        return counter.get_total_flops() / 1e9
    except Exception as exc:  # noqa: BLE001 - a nice-to-have figure
        log(f"FLOP count failed: {exc}")
        return None


def fold_batchnorm(model: torch.nn.Module) -> int:
    """Fold every BatchNorm2d into the Conv2d that feeds it (ResNet naming: convN/bnN, downsample 0/1).

    Returns the number of folded pairs; the BatchNorm modules become Identity. Eval mode only.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = 0
    for parent in model.modules():
        children = dict(parent.named_children())
        pairs = []
        for name, child in children.items():
            if isinstance(child, torch.nn.Conv2d):
                if name.startswith("conv") and isinstance(children.get("bn" + name[4:]), torch.nn.BatchNorm2d):
                    pairs.append((name, "bn" + name[4:]))
                elif name.isdigit() and isinstance(children.get(str(int(name) + 1)), torch.nn.BatchNorm2d):
                    pairs.append((name, str(int(name) + 1)))
        for conv_name, bn_name in pairs:
            fused = fuse_conv_bn_eval(children[conv_name], children[bn_name])
            setattr(parent, conv_name, fused)
            setattr(parent, bn_name, torch.nn.Identity())
            folded += 1
    return folded


# --------------------------------------------------------------------------- routes


class Skip(Exception):
    """A route that cannot run here; the message says why."""


def _device_input(data_config, dtype, channels_last, device, inputs: InputCache):
    def make_input(batch_size: int):
        x = torch.from_numpy(inputs.tensors(data_config, batch_size)).to(device=device, dtype=dtype)
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x
    return make_input


def _eager(model, name, precision, data_config, device, inputs, timer, channels_last=False, **info):
    dtype = torch.float16 if precision == "fp16" else torch.float32

    @torch.inference_mode()
    def run(x):
        return model(x)

    return Subject(name=name, run=run, make_input=_device_input(data_config, dtype, channels_last, device, inputs),
                   backend="torch", precision=precision, device=str(device), timer=timer,
                   info={"io": "device-resident", "channels_last": channels_last, **info})


def _graphed(model, name, data_config, device, inputs, timer, **info):
    """fp16 channels_last model replayed from a CUDA graph captured per batch size."""
    base_input = _device_input(data_config, torch.float16, True, device, inputs)

    def make_input(batch_size: int):
        static = base_input(batch_size)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(3):
                model(static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.no_grad():
            static_out = model(static)
        torch.cuda.synchronize()
        return graph, static, static_out  # keep the static tensors alive with the graph

    def run(state):
        state[0].replay()

    return Subject(name=name, run=run, make_input=make_input, backend="torch", precision="fp16", device=str(device),
                   timer=timer, info={"io": "device-resident", "channels_last": True, "cuda_graph": True, **info})


def build_routes(args, model, cfg, data_config, device, checkpoint, inputs, notes) -> tuple[list[Subject], list[str]]:
    """The eager/graph/ORT subjects of phase 1; ``notes`` collects the reasons for skipped routes."""
    import copy

    from reid_export.runtime.torch_backend import TorchEncoder

    cuda = device.type == "cuda"
    timer = CudaEventTimer if cuda else CpuTimer
    subjects, skipped = [], []

    def skip(route, reason):
        skipped.append(route)
        notes.append(f"{route}: skipped ({reason})")
        log(notes[-1])

    for route in args.routes:
        if route == "compile":
            continue  # phase 2
        try:
            if route == "encoder-fp32":
                enc = TorchEncoder(copy.deepcopy(model), data_config, checkpoint or Path("bot-r50.pth"),
                                   device=str(device))
                subject = encoder_subject(enc, "encoder fp32", inputs, None, timer())
                subject.info["io"] = "host float32 in, host features out"
                subjects.append(subject)
            elif route == "fp32":
                subjects.append(_eager(copy.deepcopy(model).to(device), "fp32", "fp32", data_config, device, inputs,
                                       timer()))
            elif route in ("fp16", "fp16-cl"):
                if not cuda:
                    raise Skip("needs CUDA")
                channels_last = route == "fp16-cl"
                m = copy.deepcopy(model).to(device).half()
                if channels_last:
                    m = m.to(memory_format=torch.channels_last)
                subjects.append(_eager(m, route.replace("-", " "), "fp16", data_config, device, inputs, timer(),
                                       channels_last=channels_last))
            elif route in ("fp16-cl-graph", "fp16-cl-fold-graph"):
                if not cuda:
                    raise Skip("needs CUDA")
                m = copy.deepcopy(model)
                folded = fold_batchnorm(m) if "fold" in route else 0
                m = m.to(device).half().to(memory_format=torch.channels_last)
                subjects.append(_graphed(m, route.replace("-", " "), data_config, device, inputs, timer(),
                                         bn_folded=folded))
            elif route == "ort-cuda":
                if not cuda:
                    raise Skip("needs CUDA")
                subjects.append(_ort_subject(model, cfg, data_config, device, checkpoint, inputs, timer()))
        except Skip as exc:
            skip(route, str(exc))
        except Exception as exc:  # noqa: BLE001 - one route failing must not lose the others
            skip(route, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
    return subjects, skipped


def _ort_subject(model, cfg, data_config, device, checkpoint, inputs, timer) -> Subject:
    """ONNX Runtime CUDA provider on the FP32 ONNX export (host I/O, as ``reid-export bench`` runs it)."""
    import tempfile

    try:
        import onnxruntime
    except ImportError:
        raise Skip("onnxruntime is not installed") from None
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        raise Skip(f"onnxruntime {onnxruntime.__version__} has no CUDAExecutionProvider "
                   "(pip install 'reid-export[gpu]')")
    from reid_export.checkpoint import save_checkpoint
    from reid_export.runtime import open_encoder

    work = Path(tempfile.mkdtemp(prefix="gpu_bench_ort_"))  # ~100 MB each: not under --out
    if checkpoint is None:
        checkpoint = save_checkpoint(work / "bot-r50-random.pth", model, cfg, data_config)
    onnx_path = work / (Path(checkpoint).stem + ".onnx")
    log(f"exporting {checkpoint} to {onnx_path} for ONNX Runtime")
    done = common.run_step("onnx", checkpoint, "-o", onnx_path, capture=True, say=None)
    if done.returncode != 0:
        raise Skip(f"ONNX export failed: {(done.stderr.strip().splitlines() or ['?'])[-1][:200]}")
    enc = open_encoder(onnx_path, device=str(device))
    subject = encoder_subject(enc, "ort cuda fp32", inputs, None, timer)
    subject.info["io"] = "host float32 in, host features out"
    return subject


def compile_route(args, model, data_config, device, inputs, notes, started: float) -> Subject | None:
    """torch.compile of the fp16 channels_last model, compiled now at each --compile-batches size."""
    import copy

    if device.type != "cuda":
        notes.append("compile: skipped (needs CUDA)")
        return None
    import torch._inductor.config as inductor_config

    inductor_config.freezing = not args.no_freezing
    m = copy.deepcopy(model).to(device).half().to(memory_format=torch.channels_last)
    compiled = torch.compile(m, mode=None if args.compile_mode == "default" else args.compile_mode, dynamic=False)
    make_input = _device_input(data_config, torch.float16, True, device, inputs)
    compile_s = {}
    batches = []
    for batch_size in args.compile_batches:
        if time.monotonic() - started > args.budget:
            notes.append(f"compile: batch {batch_size} skipped (time budget {args.budget:.0f} s spent)")
            continue
        t0 = time.monotonic()
        try:
            with torch.inference_mode():
                for _ in range(3):  # reduce-overhead records its CUDA graph after warm-up calls
                    compiled(make_input(batch_size))
            torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001
            notes.append(f"compile: failed at batch {batch_size} ({type(exc).__name__}: {str(exc)[:200]})")
            log(notes[-1])
            return None
        compile_s[batch_size] = time.monotonic() - t0
        batches.append(batch_size)
        log(f"compiled for batch {batch_size} in {compile_s[batch_size]:.0f} s")
    if not batches:
        return None

    @torch.inference_mode()
    def run(x):
        return compiled(x)

    return Subject(name=f"compile {args.compile_mode}", run=run, make_input=make_input, backend="torch",
                   precision="fp16", device=str(device), timer=CudaEventTimer(), batch_sizes=batches,
                   info={"io": "device-resident", "channels_last": True, "compile_mode": args.compile_mode,
                         "freezing": not args.no_freezing, "compile_s": compile_s})


# --------------------------------------------------------------------------- the table


def short_table(results: list[dict], gflop: float | None) -> str:
    """route | batch | img/s | median ms | p99 ms | TFLOP/s | GPU MB, grouped by batch size."""
    rows = []
    for res in sorted(results, key=lambda r: (r["batch_size"], -(r.get("throughput_ips") or 0))):
        if res.get("error"):
            rows.append([res["name"], res["batch_size"], "ERROR", "-", "-", "-", "-"])
            continue
        tflops = res["throughput_ips"] * gflop / 1000.0 if gflop else None
        rows.append([res["name"], res["batch_size"], round(res["throughput_ips"]), res["median_ms"], res["p99_ms"],
                     tflops, res.get("gpu_peak_mib")])
    return format_table(["route", "batch", "img/s", "median ms", "p99 ms", "TFLOP/s", "GPU MB"], rows,
                        floatfmt=".3g")


def verdict(results: list[dict], batch_size: int = 256, gflop: float | None = None,
            gpu_name: str | None = None) -> str:
    best = max((r for r in results if r["batch_size"] == batch_size and not r.get("error")),
               key=lambda r: r["throughput_ips"], default=None)
    if best is None:
        return f"no route ran at batch {batch_size}"
    met = "meets" if best["throughput_ips"] >= TARGET_IPS else "misses"
    peak = peak_tflops(gpu_name)
    limit = (f"; the {peak[0]}'s published dense FP16 peak ({peak[1]:g} TFLOP/s) bounds it at about "
             f"{peak[1] * 1000 / gflop:.0f} img/s at {gflop:.2f} GFLOP/img" if gflop and peak else "")
    return (f"fastest at batch {batch_size}: {best['name']}, {best['throughput_ips']:.0f} img/s; {met} the "
            f"{TARGET_IPS} img/s target{limit}")


def write_outputs(args, doc: dict) -> str:
    results = doc["results"]
    add_speedups(results)
    gpu = doc["environment"].get("gpu") or doc["environment"]["cpu"]
    lines = [f"BoT model {doc['model']['name']} {doc['model']['input_size'][0]}x{doc['model']['input_size'][1]}, "
             f"{doc['model']['gflop_per_image'] or float('nan'):.2f} GFLOP/img, on {gpu} "
             f"(torch {torch.__version__}); warmup {args.warmup:g} s, {args.duration:g} s timed per route and batch "
             f"in {args.rounds} alternating rounds; "
             + ("CUDA-event timing, synchronised per call" if doc["environment"].get("gpu") else "perf_counter timing"),
             "", short_table(results, doc["model"]["gflop_per_image"]), ""]
    lines += [f"note: {n}" for n in doc["notes"]]
    if 256 in args.batch_sizes:
        lines.append(verdict(results, gflop=doc["model"]["gflop_per_image"], gpu_name=doc["environment"].get("gpu")))
    lines.append("TensorRT: not measured by this script.")
    text = "\n".join(lines) + "\n"
    common.write_json(args.out / "gpu_bench.json", doc, command=common.command_line(__file__, doc["argv"]))
    atomic_write_text(args.out / "gpu_table.md", text)
    return text


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print(f"gpu_bench: --device {args.device} but torch {torch.__version__} sees no CUDA device",
                  file=sys.stderr)
            return 2
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # fastest convolution algorithms for each shape, chosen in warm-up
    model, cfg, data_config, checkpoint = load_model(args)
    gflop = gflop_per_image(model, data_config.input_size)
    log(f"model {data_config.model_name} {data_config.height}x{data_config.width}: "
        f"{gflop if gflop is not None else float('nan'):.2f} GFLOP/img")
    inputs = InputCache()
    notes: list[str] = []
    settings = BenchSettings(batch_sizes=args.batch_sizes, warmup_s=args.warmup, duration_s=args.duration,
                             rounds=args.rounds)
    env = environment(torch.get_num_threads(), str(device))
    env.update({"cudnn_benchmark": torch.backends.cudnn.benchmark,
                "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32})
    if device.type == "cuda" and torch.backends.cudnn.allow_tf32:
        notes.append("fp32 routes: convolutions run in TF32 on the tensor cores (PyTorch's cuDNN default)")
    doc = {"argv": sys.argv[1:] if argv is None else list(argv),
           "environment": env, "settings": settings.describe(), "notes": notes,
           "model": {"name": data_config.model_name, "input_size": list(data_config.input_size),
                     "checkpoint": str(checkpoint) if checkpoint else None, "weights": "checkpoint" if checkpoint
                     else "random (speed does not depend on the values)", "gflop_per_image": gflop},
           "results": []}

    subjects, _ = build_routes(args, model, cfg, data_config, device, checkpoint, inputs, notes)
    if subjects:
        log(f"phase 1: {', '.join(s.name for s in subjects)} at batch {args.batch_sizes}")
        doc["results"] = run_benchmark(subjects, settings, progress=False)
        write_outputs(args, doc)
    if "compile" in args.routes:
        log(f"phase 2: torch.compile ({args.compile_mode}) at batch {args.compile_batches}")
        compiled = compile_route(args, model, data_config, device, inputs, notes, started)
        if compiled is not None:
            # timed beside the best eager route again, so its figure comes from the same conditions
            partner = next((s for s in subjects if s.name == "fp16 cl graph"), None)
            batch_sizes = [b for b in args.batch_sizes if b in compiled.batch_sizes] or compiled.batch_sizes
            phase2 = BenchSettings(batch_sizes=batch_sizes, warmup_s=args.warmup, duration_s=args.duration,
                                   rounds=args.rounds)
            extra = run_benchmark([s for s in (partner, compiled) if s is not None], phase2, progress=False)
            for res in extra:
                if res["name"] != compiled.name:
                    res["name"] += " (phase 2)"
            doc["results"].extend(extra)
    doc["elapsed_s"] = time.monotonic() - started
    text = write_outputs(args, doc)
    log(f"done in {doc['elapsed_s']:.0f} s; wrote {args.out / 'gpu_bench.json'}")
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
