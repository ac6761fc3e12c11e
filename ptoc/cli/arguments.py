"""Argument types and the parser and help-formatter classes shared by the subcommands.

Each argument type raises :class:`argparse.ArgumentTypeError` with a message that names
the value; argparse adds the option's name in front of it.
"""

from __future__ import annotations

import argparse
import math

__all__ = [
    "PROG",
    "Formatter",
    "Parser",
    "nonnegative_float",
    "nonnegative_int",
    "positive_float",
    "positive_int",
    "real",
    "unit_float",
]

#: The program name in usage lines and error messages.
PROG = "ptoc"


def _int_at_least(text: str, minimum: int, what: str) -> int:
    """``int(text)`` when it is at least ``minimum``; else the error ``must be <what>``."""
    try:
        value = int(text)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """``int(text)`` when it is at least 1."""
    return _int_at_least(text, 1, "a positive integer")


def nonnegative_int(text: str) -> int:
    """``int(text)`` when it is at least 0."""
    return _int_at_least(text, 0, "an integer >= 0")


def real(text: str) -> float:
    """``float(text)`` when it is finite."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite number ``> 0``."""
    value = real(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def nonnegative_float(text: str) -> float:
    """A finite number ``>= 0``."""
    value = real(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


def unit_float(text: str) -> float:
    """A number in ``[0, 1)``."""
    value = real(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must satisfy 0 <= value < 1, got {text!r}")
    return value


class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show ``(default: ...)`` except for flags and options whose default is None."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line, without the usage block."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")
