"""Input checks shared by the public functions; all run before any compiled code.

Each check returns the value in the form the caller keeps (a ``float``, an ``int``,
a C-contiguous array) or raises ``ValueError`` with a message that names the argument
and shows the value it got.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .model import ResNet

__all__ = [
    "check_inputs",
    "check_integer",
    "check_positive_float",
    "check_positive_int",
    "check_real",
    "scalar_entry",
]


def check_inputs(network: ResNet, X, labels=None):
    """Validate a batch ``X`` (S, n_in) and optional integer ``labels`` (S,).

    Returns ``X`` as a C-contiguous array of the network's dtype and ``labels`` as
    an int64 array. Raises ``ValueError`` naming the problem: wrong dimensions, an
    empty batch, a ``d_in`` mismatch, non-finite inputs, non-integer labels, labels
    out of ``[0, n_classes)`` or a length mismatch.
    """
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"X must be a 2-D array (batch, n_in), got shape {X.shape}")
    if X.shape[0] == 0:
        raise ValueError("the batch is empty: X has 0 rows")
    if X.shape[1] != network.n_in:
        raise ValueError(
            f"X has {X.shape[1]} features per sample but the network expects "
            f"n_in={network.n_in}"
        )
    if X.dtype.kind not in "fiub":
        raise ValueError(f"X must hold real numbers, got dtype {X.dtype}")
    X = np.ascontiguousarray(X, dtype=network.dtype)
    if not np.all(np.isfinite(X)):
        raise ValueError("X contains non-finite values (NaN or inf)")
    if labels is None:
        return X, None
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be a 1-D array of class indices, got shape {y.shape}")
    if y.shape[0] != X.shape[0]:
        raise ValueError(f"labels has {y.shape[0]} entries but X has {X.shape[0]} rows")
    if y.dtype.kind == "f":
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise ValueError("labels must be integer class indices, got non-integer values")
    elif y.dtype.kind not in "iu":
        raise ValueError(f"labels must be integer class indices, got dtype {y.dtype}")
    y = y.astype(np.int64)
    if y.min() < 0 or y.max() >= network.n_classes:
        bad = y[(y < 0) | (y >= network.n_classes)][0]
        raise ValueError(
            f"label {bad} is out of range: labels must lie in [0, {network.n_classes})"
        )
    return X, y


def check_positive_float(name: str, value: Any) -> float:
    """``float(value)`` when it is a positive finite number; ``ValueError`` naming ``name``."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive number, got {value!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return v


def check_positive_int(name: str, value: Any, allow_none: bool = False) -> int | None:
    """``int(value)`` when it is an integer ``>= 1`` (not a bool); ``ValueError`` naming
    ``name`` otherwise. With ``allow_none``, ``None`` passes through."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_real(name: str, value: Any, *, low: float | None = None, high: float | None = None,
               low_open: bool = False, high_open: bool = False) -> float:
    """``float(value)`` when it is a finite real number within the given bounds.

    Parameters
    ----------
    name : str
        The argument's name, for the error message.
    value : object
        What was given; bools (Python or NumPy) are refused.
    low, high : float, optional
        Bounds; ``None`` for none.
    low_open, high_open : bool
        Whether the bound itself is excluded.

    Returns
    -------
    float

    Raises
    ------
    ValueError
        ``<name> must be a real number`` for anything ``float()`` refuses, otherwise
        ``<name> must be finite``, followed by the bounds when there are any (``must be
        finite with 0.0 < lr``).
    """
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a real number, got {value!r}") from None
    bad = not math.isfinite(v)
    if low is not None:
        bad = bad or v < low or (low_open and v == low)
    if high is not None:
        bad = bad or v > high or (high_open and v == high)
    if bad:
        if low is None and high is None:
            raise ValueError(f"{name} must be finite, got {value!r}")
        lo = "" if low is None else f"{low} {'<' if low_open else '<='} "
        hi = "" if high is None else f" {'<' if high_open else '<='} {high}"
        raise ValueError(f"{name} must be finite with {lo}{name}{hi}, got {value!r}")
    return v


def check_integer(name: str, value: Any, minimum: int) -> int:
    """``int(value)`` when it is an integer (Python or NumPy, not a bool) ``>= minimum``.

    Raises
    ------
    ValueError
        ``<name> must be an integer >= <minimum>, got <value>``.
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) \
            or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def scalar_entry(d: Mapping[str, Any], key: str, what: str) -> Any:
    """The Python scalar stored under ``key`` in the state dict ``d``.

    Used when restoring a state from a checkpoint, where every entry is an array.

    Parameters
    ----------
    d : mapping
        The state dict.
    key : str
        The entry to read; it must hold a 0-d array or a scalar.
    what : str
        What ``d`` is (``"optimiser state dict"``), for the error message.

    Returns
    -------
    object
        The entry as a Python scalar (``ndarray.item()``).

    Raises
    ------
    ValueError
        When the entry is missing or is not a scalar.
    """
    if key not in d:
        raise ValueError(f"{what} has no {key!r} entry")
    value = np.asarray(d[key])
    if value.shape != ():
        raise ValueError(f"{what} entry {key!r} must be a scalar")
    return value.item()
