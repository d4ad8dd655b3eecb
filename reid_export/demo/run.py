"""``run_demo``: the whole pipeline in a work folder, stage by stage, then report.md."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from ..cpuinfo import load_average
from ..errors import ReidExportError
from ..fileio import atomic_write_json, atomic_write_text
from .pipeline import PRESETS, Demo, Preset, check_workdir, shown
from .report import ReportContext, render
from .stages import StageFailed, StageRecord, StageRunner, one_line


@dataclass
class DemoResult:
    workdir: Path
    report: Path
    records: dict[str, StageRecord] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)   # stage -> reason (checks that did not pass)

    @property
    def statuses(self) -> dict[str, str]:
        return {name: rec.status for name, rec in self.records.items()}


def _cpu_name() -> str:
    try:
        from ..bench.report import cpu_model

        return cpu_model()
    except Exception:  # noqa: BLE001 - only for the report header
        return "unknown CPU"


def run_demo(workdir: str | Path = "reid-demo", *, data: str | Path | None = None, quick: bool = False,
             preset: Preset | None = None, force: bool = False, progress: bool = True,
             echo: Callable[[str], None] = print) -> DemoResult:
    """Run (or resume) the demo in ``workdir``; returns the stage records.

    Raises :class:`~reid_export.errors.ReidExportError` with one line naming the stage when a stage
    fails (report.md is still written with what was done), or when a check (parity, eval, bench)
    did not pass, after every stage has run and the report is written.
    """
    # Passive OpenMP waiting: on a shared 2-core machine spinning threads lose most of their time
    # (as reid-train does). Effective only when torch is not imported yet; an explicit value wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    workdir = Path(workdir).expanduser()
    check_workdir(workdir)
    preset = preset or PRESETS["quick" if quick else "full"]
    preset.config_path()  # a missing config fails before anything is written
    data_path = Path(data).expanduser() if data is not None else None
    if data_path is not None and not data_path.is_dir():
        raise ReidExportError(f"`data` {data_path}: no such folder; give a Market-1501-layout folder "
                              "(bounding_box_train/, query/, bounding_box_test/)", exit_code=2)
    workdir.mkdir(parents=True, exist_ok=True)
    workdir = workdir.resolve()

    import torch

    demo = Demo(workdir, preset, data_path, progress)
    stages = demo.build_stages()
    order = [s.name for s in stages]
    load = load_average()
    started = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "load_average": load,
               "cpu": _cpu_name(), "threads": torch.get_num_threads()}
    echo(f"reid-export demo ({preset.name}) in {workdir}: {os.cpu_count()} cores, load average "
         + (" / ".join(f"{v:.2f}" for v in load) if load else "n/a"))
    runner = StageRunner(workdir, len(stages), force=force, progress=progress, echo=echo)
    result = DemoResult(workdir, workdir / "report.md", runner.records)
    error: StageFailed | None = None
    try:
        for i, stage in enumerate(stages, 1):
            record = runner.run(i, stage)
            if record.status == "check failed":
                result.failed[stage.name] = "; ".join(record.result.get("failures") or ["check failed"])
    except StageFailed as exc:
        error = exc
        result.failed[exc.stage] = exc.reason
    finally:
        _write_report(demo, result, order, started, echo)
    if error is not None:
        raise error
    _echo_summary(demo, result, echo)
    if result.failed:
        name, reason = next(iter(result.failed.items()))
        more = f" (and {len(result.failed) - 1} more)" if len(result.failed) > 1 else ""
        raise ReidExportError(one_line(f"demo stage '{name}' failed: {reason}{more}; see "
                                       f"{shown(result.report, Path.cwd())}"), exit_code=1)
    return result


def _write_report(demo: Demo, result: DemoResult, order, started, echo) -> None:
    ctx = ReportContext(demo, result.records, result.failed, started)
    try:
        atomic_write_json(demo.path("demo.json"), {
            "preset": demo.preset.name, "config": demo.preset.config, "data": str(demo.data) if demo.data else None,
            "started": started, "stages": [
                {"name": name, "status": result.records[name].status if name in result.records else
                 ("failed" if name in result.failed else "not reached"),
                 "seconds": result.records[name].manifest.get("seconds") if name in result.records else None,
                 "cpu_seconds": result.records[name].manifest.get("cpu_seconds") if name in result.records else None,
                 "result": result.records[name].result if name in result.records else None}
                for name in order],
            "failed": result.failed,
        })
        atomic_write_text(result.report, render(ctx, order))
    except Exception as exc:  # noqa: BLE001 - the report must not mask the stage's own error
        echo(f"warning: report.md could not be written: {type(exc).__name__}: {exc}")


def _echo_summary(demo: Demo, result: DemoResult, echo) -> None:
    ctx = ReportContext(demo, result.records, result.failed, {})
    rows = ctx.eval_rows()
    trained, untrained = rows.get("checkpoint"), rows.get("untrained")
    if trained and untrained and "mAP" in trained and "mAP" in untrained:
        echo(f"trained vs untrained: mAP {trained['mAP']:.1f} vs {untrained['mAP']:.1f}, Rank-1 "
             f"{trained['Rank-1']:.1f} vs {untrained['Rank-1']:.1f}")
    echo(f"report: {shown(result.report, Path.cwd())}")
