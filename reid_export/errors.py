"""User-facing errors.

Every problem a user can fix (a wrong path, a bad file, a config that does not match a
checkpoint) is raised as :class:`ReidExportError` with one line that names the file or option
and says what to do.  The CLI prints that line to stderr and exits with ``exit_code`` (1 for a
failed operation, 2 for a usage error); a traceback is only shown with ``--debug``.
"""


class ReidExportError(Exception):
    """An error with a one-line, actionable message for the user."""

    exit_code = 1

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(ReidExportError):
    """Bad option values or combinations (exit code 2)."""

    exit_code = 2


def require_module(name: str, what: str, install: str):
    """Import an optional dependency (an extra), or raise one line that names it and how to install it."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        raise ReidExportError(f"{what} is not installed; install it with: {install}") from None


def options_or_fields(cls, options, fields: dict, call: str):
    """The options object of a call that takes ``options=`` or the options' fields as keywords:
    ``options``, else ``cls(**fields)``; both at once is a programming error (``TypeError``)."""
    if options is None:
        return cls(**fields)
    if fields:
        raise TypeError(f"{call}: give either options= or its fields as keywords, not both")
    return options


class ReidExportNote(UserWarning):
    """Something the user should know that is not an error (the CLI prints it as one ``note:`` line)."""
