"""Command-line plumbing shared by ``reid-export`` and ``reid-train``: one-line errors, notes, ``--opts``.

A base module (it needs only click and the error types), so that the trainer's CLI uses it without
importing ``reid_export.cli``.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
import warnings

import click

from .errors import ReidExportError, ReidExportNote

PROG = "reid-export"
LOGGER = logging.getLogger("reid_export")


def say(line: str) -> None:
    """What the library says as it works (the default ``log=`` of its calls): an INFO record on the
    ``reid_export`` logger. The CLI shows them on stderr (:func:`run_cli`); a script sees them once it
    configures logging (``logging.basicConfig(level=logging.INFO)``) or passes its own ``log=``."""
    LOGGER.info(line)


class _EchoHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        click.echo(record.getMessage(), err=True)


def show_library_log() -> None:
    """Send the ``reid_export`` logger's INFO records to stderr as plain lines (once)."""
    if not any(isinstance(h, _EchoHandler) for h in LOGGER.handlers):
        LOGGER.addHandler(_EchoHandler())
    LOGGER.setLevel(logging.INFO)


def _debug_requested(args) -> bool:
    return "--debug" in (args or []) or os.environ.get("REID_EXPORT_DEBUG", "") not in ("", "0")


def run_cli(group: click.Group, args=None, prog_name: str = PROG) -> None:
    """Run a click group; every failure becomes one line on stderr and a non-zero exit."""
    args = list(sys.argv[1:] if args is None else args)
    debug = _debug_requested(args)
    show_library_log()
    try:
        with warnings.catch_warnings():
            _show_notes_as_lines(prog_name)
            code = group.main(args=args, prog_name=prog_name, standalone_mode=False)
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except click.exceptions.Abort:
        click.echo(f"{prog_name}: aborted", err=True)
        code = 130
    except click.ClickException as exc:
        if debug:
            traceback.print_exc()
        hint = ""
        if isinstance(exc, click.UsageError) and exc.ctx is not None:
            hint = f" (see {exc.ctx.command_path} --help)"
        click.echo(f"{prog_name}: error: {exc.format_message()}{hint}", err=True)
        code = exc.exit_code
    except ReidExportError as exc:
        if debug:
            traceback.print_exc()
        click.echo(f"{prog_name}: error: {exc}", err=True)
        code = exc.exit_code
    except KeyboardInterrupt:
        click.echo(f"{prog_name}: interrupted", err=True)
        code = 130
    except Exception as exc:  # an internal error: still one line unless --debug
        if debug:
            traceback.print_exc()
        click.echo(f"{prog_name}: internal error: {type(exc).__name__}: {exc} "
                   "(rerun with --debug for the traceback, and please report it)", err=True)
        code = 1
    sys.exit(code if isinstance(code, int) else 0)


def _show_notes_as_lines(prog_name: str) -> None:
    """Print :class:`ReidExportNote` warnings as ``prog: note: ...`` lines, each once."""
    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, ReidExportNote):
            click.echo(f"{prog_name}: note: {message}", err=True)
        else:
            default(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    warnings.simplefilter("default", ReidExportNote)


class OptsCommand(click.Command):
    """A command whose trailing ``--opts KEY VALUE ...`` (fast-reid style) is kept in ctx.meta."""

    def parse_args(self, ctx, args):
        if "--opts" in args:
            idx = args.index("--opts")
            ctx.meta["opts"] = list(args[idx + 1:])
            args = args[:idx]
        else:
            ctx.meta["opts"] = []
        return super().parse_args(ctx, args)

    def format_options(self, ctx, formatter):
        super().format_options(ctx, formatter)
        with formatter.section("Config overrides"):
            formatter.write_text("--opts KEY VALUE [KEY VALUE ...]  fast-reid config overrides, e.g. "
                                 "--opts MODEL.BACKBONE.WITH_IBN True (must come last)")


def get_opts() -> list[str]:
    return list(click.get_current_context().meta.get("opts", []))
