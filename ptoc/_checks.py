"""Input checks shared by the public functions; all run before any compiled code."""

from __future__ import annotations

import math

import numpy as np

from .model import ResNet


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


def check_positive_float(name: str, value) -> float:
    """``float(value)`` when it is a positive finite number; ``ValueError`` naming ``name``."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive number, got {value!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return v


def check_positive_int(name: str, value, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)
