"""Command-line plumbing shared by ``reid-export`` and ``reid-train``: one-line errors, notes, ``--opts``.

A base module (it needs only click and the error types), so that the trainer's CLI uses it without
importing ``reid_export.cli``.

Library messages name the parameters of the Python call in backticks (``"`atol` and `rtol` go
together"``); :func:`run_cli` shows each such name as the invoked command's flag (``--atol``), in
errors, ``note:`` lines and the library's log lines (:func:`flag_names`, :func:`to_flags`).
"""

from __future__ import annotations

import logging
import os
import re
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


# library name -> flag of the command being run (set by run_cli); empty outside the CLI
_FLAGS: dict[str, str] = {}
# `name`, `options.name`, `name=False`: a parameter (or an attribute of one), optionally with a value
_BACKTICKED = re.compile(r"`([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*(?:=(?:True|False|None|[A-Za-z_][A-Za-z0-9_.]*\(\)))?)`")


def flag_aliases(**aliases: str):
    """Decorator for a click command (put it above ``@cli.command``): library parameter names that differ
    from the command's own parameter names, e.g. ``@flag_aliases(num_workers="workers")`` shows the
    library's ``num_workers`` as the command's ``--workers``; a name with a value (``"gates=EvalGates.off()"``) is
    given as a dict: ``@flag_aliases(**{"gates=EvalGates.off()": "no_gate"})``."""

    def decorate(command: click.Command) -> click.Command:
        command.flag_aliases = {**getattr(command, "flag_aliases", {}), **aliases}
        return command

    return decorate


def invoked_commands(group: click.Command, args) -> list[click.Command]:
    """The commands ``args`` invoke: ``group``, then the subcommand named in them, and so on down."""
    chain, command, args = [group], group, list(args)
    while isinstance(command, click.Group):
        takes_value = {opt for p in command.params if isinstance(p, click.Option) and not p.is_flag
                       and not p.count for opt in p.opts + p.secondary_opts}
        found, skip = None, False
        for i, arg in enumerate(args):
            if skip:
                skip = False
            elif arg == "--":
                break
            elif arg.startswith("-"):
                skip = arg in takes_value
            else:
                found = command.commands.get(arg)
                args = args[i + 1:]
                break
        if found is None:
            break
        chain.append(found)
        command = found
    return chain


def flag_names(commands) -> dict[str, str]:
    """Library parameter name -> how the command line spells it: an option's longest ``--`` flag, an
    argument's metavar (``MODEL``), and the commands' :func:`flag_aliases`."""
    names: dict[str, str] = {}
    for command in commands:
        for param in command.params:
            if isinstance(param, click.Option):
                flags = [o for o in param.opts if o.startswith("--")]
                if flags and param.name:
                    names[param.name] = max(flags, key=len)
                    if param.is_flag:  # `name=True` is the flag, `name=False` its --no- form
                        names[f"{param.name}=True"] = names[param.name]
                        offs = [o for o in param.secondary_opts if o.startswith("--")]
                        if offs:
                            names[f"{param.name}=False"] = max(offs, key=len)
            elif isinstance(param, click.Argument) and param.name:
                names[param.name] = param.human_readable_name
        if isinstance(command, OptsCommand):
            names["opts"] = "--opts"
    for command in commands:
        for library_name, param_name in getattr(command, "flag_aliases", {}).items():
            if param_name in names:
                names[library_name] = names[param_name]
    return names


def flag_for(name: str, names: dict[str, str]) -> str | None:
    """The flag of a library name: the name itself, else its last dotted part (``options.calib_size``,
    ``data_config.input_size``); None when the command has neither. ``name=False`` is a boolean's
    ``--no-`` flag, ``name=True`` its flag, ``name=None`` (or another value, ``gates=EvalGates.off()``) only what
    an alias says."""
    return names.get(name) or names.get(name.rpartition(".")[2])


def to_flags(text: str, names: dict[str, str] | None = None) -> str:
    """``text`` with every backticked parameter name as its flag (``names``, default: the running
    command's); a name the command does not know loses its backticks."""
    names = _FLAGS if names is None else names
    if not names:  # not under the CLI: the library's own words
        return str(text)
    return _BACKTICKED.sub(lambda m: flag_for(m.group(1), names) or m.group(1), str(text))


def echo_library_line(line: str) -> None:
    """Show a line the library said (its ``log=``) on stderr, its parameter names as flags."""
    click.echo(to_flags(line), err=True)


class _EchoHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        echo_library_line(record.getMessage())


def show_library_log() -> None:
    """Send the ``reid_export`` logger's INFO records to stderr as plain lines (once)."""
    if not any(isinstance(h, _EchoHandler) for h in LOGGER.handlers):
        LOGGER.addHandler(_EchoHandler())
    LOGGER.setLevel(logging.INFO)


def _debug_requested(args) -> bool:
    return "--debug" in (args or []) or os.environ.get("REID_EXPORT_DEBUG", "") not in ("", "0")


def run_cli(group: click.Group, args=None, prog_name: str = PROG) -> None:
    """Run a click group; every failure becomes one line on stderr and a non-zero exit. While it runs,
    the library's backticked parameter names show as the invoked command's flags (:func:`to_flags`)."""
    args = list(sys.argv[1:] if args is None else args)
    show_library_log()
    _FLAGS.clear()
    _FLAGS.update(flag_names(invoked_commands(group, args)))
    try:
        code = _run(group, args, prog_name)
    finally:
        _FLAGS.clear()
    sys.exit(code if isinstance(code, int) else 0)


def _run(group: click.Group, args: list[str], prog_name: str):
    debug = _debug_requested(args)
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
        click.echo(f"{prog_name}: error: {to_flags(exc)}", err=True)
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
    return code


def _show_notes_as_lines(prog_name: str) -> None:
    """Print :class:`ReidExportNote` warnings as ``prog: note: ...`` lines, each once."""
    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, ReidExportNote):
            click.echo(f"{prog_name}: note: {to_flags(message)}", err=True)
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
