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
    Models: fast-reid-style checkpoints (.pth), ONNX (.onnx), TensorRT engines (.engine/.plan),
    OpenVINO IR (.xml; .onnx with --device openvino).
    Every command reads the model's data config (input size, mean/std, ...) from the model.
    """


# Command modules, each registering its commands on ``cli`` when imported.
COMMAND_MODULES = ("doctor", "extract", "export", "verify", "trt", "bench", "synth", "demo", "openvino", "serve", "index")


def _register() -> None:
    import importlib

    for name in COMMAND_MODULES:
        importlib.import_module(f"{__package__}.{name}")


_register()


def main(args=None) -> None:
    run_cli(cli, args)


if __name__ == "__main__":
    # ``python -m reid_export.cli.main``: this file runs as __main__, but the command modules register
    # on the ``cli`` of the imported reid_export.cli.main, so run that one.
    from reid_export.cli.main import main as _main

    _main()
