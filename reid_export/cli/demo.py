"""``reid-export demo``: synth -> train -> export -> parity -> eval -> bench -> report.md."""

from __future__ import annotations

from pathlib import Path

import click

from .main import cli


@cli.command()
@click.option("--workdir", default=Path("reid-demo"), show_default=True, type=click.Path(path_type=Path),
              help="Folder for the data, models, JSON reports and report.md; a re-run reuses its finished stages.")
@click.option("--data", type=click.Path(path_type=Path),
              help="Use this Market-1501-layout folder (bounding_box_train/, query/, bounding_box_test/) "
                   "instead of generating synthetic data.")
@click.option("--quick", is_flag=True, help="A much smaller run (fewer identities, fewer epochs, shorter bench).")
@click.option("--force", is_flag=True, help="Redo every stage, even those whose outputs are current.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="tqdm progress bars inside stages.")
def demo(workdir, data, quick, force, progress):
    """Run the whole toolchain on a small example and write WORKDIR/report.md.

    \b
    Stages (one line each, with its time; a re-run reuses every stage whose inputs and
    outputs are unchanged, unless --force):
      data           synthetic Market-1501-layout data (reid-export synth), or check --data
      train          BoT ResNet-18 at 64x32 from scratch (reid-train, configs/demo/)
      untrained      the same network with the training run's initial weights
      onnx           FP32 ONNX, dynamic batch, checked against torch
      fp16           FP16 ONNX
      int8-tensorrt  INT8 Q/DQ (S8S8) calibrated on the train split
      int8-cpu       INT8 Q/DQ (U8S8) calibrated on the train split
      parity         every variant's embeddings vs the checkpoint's      -> parity.json
      eval           Rank-1/mAP of all backends and the untrained net    -> eval.json, plots/
      bench          latency/throughput at batch 1 and 8                 -> bench.json, bench.png
    then report.md: training summary, parity, accuracy with deltas, speed, plots, stage times.

    A failing stage stops the run with one line naming it (report.md shows what was done);
    a failed check (parity tolerance, eval or bench error) lets the rest run, then exits 1.

    \b
    Examples:
      reid-export demo                        # ./reid-demo, a few minutes on 2 CPU cores
      reid-export demo --quick --workdir /tmp/d
      reid-export demo --data datasets/Market-1501-v15.09.15 --workdir market-demo
    """
    from ..demo import run_demo

    run_demo(workdir, data=data, quick=quick, force=force, progress=progress, echo=click.echo)
