"""Argument types and the parser and help-formatter classes shared by the subcommands.

Each argument type raises :class:`argparse.ArgumentTypeError` with a message that names
the value; argparse adds the option's name in front of it.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import math
from collections.abc import Mapping, Sequence
from typing import Any

from .errors import CLIError

__all__ = [
    "PROG",
    "Formatter",
    "Parser",
    "describe",
    "nonnegative_float",
    "nonnegative_int",
    "positive_float",
    "positive_int",
    "real",
    "refuse_unread_options",
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


def refuse_unread_options(args: argparse.Namespace, method: str,
                          reads: Mapping[str, Sequence[str]],
                          defaults: Mapping[str, Any], *, choice: str = "--method") -> None:
    """Options given that the chosen ``--method`` (or another ``choice``, e.g. ``--model``)
    does not read are an error, not silently ignored.

    Parameters
    ----------
    args : argparse.Namespace
        The parsed options.
    method : str
        The chosen value of ``choice``.
    reads : mapping of str to sequence of str
        For each value, the names (``dest``) of the value-specific options it reads.
    defaults : mapping of str to object
        Every value-specific option's default; an option whose value differs from it
        was given.
    choice : str
        The option that picks the value (default ``--method``).

    Raises
    ------
    CLIError
        ``argument --<option>: only applies to <choice> <those that read it>, not <method>``.
    """
    for name, default in defaults.items():
        if name not in reads[method] and getattr(args, name) != default:
            users = [m for m, opts in reads.items() if name in opts]
            flag = "--" + name.replace("_", "-")
            raise CLIError(f"argument {flag}: only applies to {choice} "
                           + " or ".join(users) + f", not {method}")


def describe(obj: Any) -> str:
    """``Name(field=value, ...)`` of a dataclass for a header line, with option enums as
    their values (``relaxation=FCF``, not the enum's repr) and nested dataclasses alike;
    other objects as their ``repr``."""
    if isinstance(obj, enum.Enum):
        return str(obj.value)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = ", ".join(f"{f.name}={describe(getattr(obj, f.name))}"
                           for f in dataclasses.fields(obj) if f.repr)
        return f"{type(obj).__name__}({fields})"
    if isinstance(obj, float):
        return f"{obj:g}"
    return repr(obj)


class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show ``(default: ...)`` except for flags, options whose default is None, and options
    whose help already says its default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or "(default" in (action.help
                                                                                or ""):
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line, without the usage block."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")
