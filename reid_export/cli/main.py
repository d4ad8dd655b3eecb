"""``reid-export``: the command-line entry point."""

from __future__ import annotations

import click

from .. import __version__
from .common import run_cli


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="reid-export")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
def cli(debug: bool) -> None:
    """Export, verify and benchmark person re-identification models.

    \b
    Models: fast-reid-style checkpoints (.pth), ONNX (.onnx), TensorRT engines (.engine/.plan).
    Every command reads the model's data config (input size, mean/std, ...) from the model.
    """


def _register() -> None:
    from . import doctor, extract, stubs  # noqa: F401  (commands register themselves on import)


_register()


def main(args=None) -> None:
    run_cli(cli, args)


if __name__ == "__main__":
    main()
