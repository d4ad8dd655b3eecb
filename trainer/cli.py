"""``reid-train`` entry point."""

from __future__ import annotations

import sys


def main(args=None) -> None:
    print("reid-train: error: training is not yet available in this version", file=sys.stderr)
    sys.exit(2)
