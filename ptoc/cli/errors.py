"""The error type of the ``ptoc`` command line."""

from __future__ import annotations

__all__ = ["CLIError"]


class CLIError(Exception):
    """A user error: :func:`ptoc.cli.main` prints it as ``ptoc: error: ...`` and exits with 2.

    Raised by the subcommands for bad options or combinations that argparse cannot
    check on its own, and for a missing optional dependency, so that the user sees one
    line and never a traceback.
    """
