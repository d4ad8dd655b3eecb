"""Reports are data: a plain-text table for people, JSON for machines."""

from __future__ import annotations

import platform
from datetime import datetime, timezone
from typing import Any, Sequence

from . import __version__

# The layout of the JSON reports (parity, eval, fp16-check, bench, quantize): raised when a key is
# renamed or removed, so that a machine reading them can tell.
REPORT_SCHEMA_VERSION = 3  # 2: gates use the Tolerances keys (min_mean_cosine, max_pair_error, min_top1_agreement...);
# 3: quantize's "search" is one record (SearchRecord, also in the model's metadata) and its report has "passed"/"refusal";
# the onnx report; bench memory keys in MiB say so (rss_peak_mib, rss_open_mib, gpu_peak_mib, gpu_used_mib); one
# "cpu_flags" list in the environment (no separate "cpu_isa")


def report_header(command: str) -> dict:
    """The keys every JSON report starts with: schema version, tool, command, date, machine."""
    return {"schema_version": REPORT_SCHEMA_VERSION, "tool": f"reid-export {__version__}", "command": command,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": platform.node(), "python": platform.python_version()}


def format_size(megabytes: float) -> str:
    """A file size as the commands print it: MB from 1 MB up, kB below."""
    return f"{megabytes:.1f} MB" if megabytes >= 1 else f"{megabytes * 1000:.0f} kB"


def _cell(value: Any, floatfmt: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return format(value, floatfmt)
    return str(value)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], floatfmt: str = ".4g",
                 align_right_numbers: bool = True) -> str:
    """A fixed-width text table (GitHub-markdown compatible)."""
    cells = [[_cell(v, floatfmt) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, value in enumerate(row):
            widths[i] = max(widths[i], len(value))

    def is_num(row_idx: int, col: int) -> bool:
        value = rows[row_idx][col]
        return align_right_numbers and isinstance(value, (int, float)) and not isinstance(value, bool)

    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    for r, row in enumerate(cells):
        parts = [v.rjust(w) if is_num(r, c) else v.ljust(w) for c, (v, w) in enumerate(zip(row, widths))]
        lines.append("| " + " | ".join(parts) + " |")
    return "\n".join(lines)
