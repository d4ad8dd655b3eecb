"""Shared CLI plumbing of ``reid-export``: the common options (one-line errors and ``--opts`` live in
:mod:`reid_export.console`, which ``reid-train`` shares)."""

from __future__ import annotations

import functools

import click

from ..console import PROG, OptsCommand, echo_library_line, flag_aliases, get_opts, run_cli, to_flags  # noqa: F401 - the commands import them from here
from ..preprocess import UnreadableImage


def positive_int(ctx, param, value):
    if value is not None and value < 1:
        raise click.BadParameter(f"must be >= 1, got {value}")
    return value


def skip_bad_images_option(func):
    """``--skip-bad-images`` for a command that reads image files (passed to it as ``skip_bad_images``).

    Without the flag the first unreadable image stops the command, and its one-line error also
    names the flag; with it the command leaves such images out and says how many it skipped.
    """

    @click.option("--skip-bad-images", is_flag=True,
                  help="Leave out images that cannot be read (corrupt, empty, not an image), say how many, "
                       "and go on; default: stop at the first one.")
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except UnreadableImage as exc:
            if kwargs.get("skip_bad_images"):
                raise
            raise UnreadableImage(exc.path, exc.reason, f"{exc.fix}, or pass --skip-bad-images to leave "
                                                        "unreadable images out") from None

    return wrapper


__all__ = ["PROG", "OptsCommand", "echo_library_line", "flag_aliases", "get_opts", "positive_int", "run_cli",
           "skip_bad_images_option", "to_flags"]
