"""Activation functions: the public enum and the vectorised NumPy forms.

The compiled kernels use the scalar definitions in :mod:`ptoc._maths`; the NumPy
forms here are the readable reference and are tested against them.
"""

from __future__ import annotations

import numpy as np

from . import _maths
from ._options import OptionEnum


class Activation(OptionEnum, what="activation"):
    """Activation ``sigma`` of the residual layers (:doc:`/theory/resnet`).

    ``TANH``
        ``tanh(a)``.
    ``RELU``
        ``max(a, 0)``; its derivative at 0 is taken as 0.
    ``SMOOTHRELU``
        ReLU with a quadratic blend on ``|a| < eta``, ``eta = 0.1``:
        ``a^2/(4 eta) + a/2 + eta/4`` there, ``max(a, 0)`` elsewhere (Günther et al.
        2020, used for the Peaks experiments).
    """

    TANH = "tanh"
    RELU = "relu"
    SMOOTHRELU = "smoothrelu"

    @property
    def code(self) -> int:
        """The integer code the compiled kernels take (private)."""
        return _CODES[self]

    def __call__(self, a: np.ndarray) -> np.ndarray:
        """``sigma(a)``, elementwise (NumPy reference)."""
        return sigma(a, self)

    def derivative(self, a: np.ndarray) -> np.ndarray:
        """``sigma'(a)``, elementwise (NumPy reference)."""
        return dsigma(a, self)


_CODES = {
    Activation.TANH: _maths.TANH,
    Activation.RELU: _maths.RELU,
    Activation.SMOOTHRELU: _maths.SMOOTHRELU,
}

SMOOTHRELU_ETA = _maths.SMOOTHRELU_ETA


def sigma(a: np.ndarray, activation: Activation) -> np.ndarray:
    """Vectorised activation ``sigma(a)``: the value of :func:`ptoc._maths.activation`."""
    a = np.asarray(a)
    if activation is Activation.TANH:
        return np.tanh(a)
    relu = np.where(a <= 0, np.zeros_like(a), a)  # NaN stays NaN
    if activation is Activation.RELU:
        return relu
    eta = a.dtype.type(SMOOTHRELU_ETA) if a.dtype.kind == "f" else SMOOTHRELU_ETA
    blend = a * a / (4 * eta) + a / 2 + eta / 4
    return np.where(np.abs(a) < eta, blend, relu)


def dsigma(a: np.ndarray, activation: Activation) -> np.ndarray:
    """Vectorised derivative ``sigma'(a)``: the slope of :func:`ptoc._maths.activation`."""
    a = np.asarray(a)
    if activation is Activation.TANH:
        t = np.tanh(a)
        return 1 - t * t
    step = np.where(a > 0, 1, np.where(a <= 0, 0, a)).astype(a.dtype)  # NaN stays NaN
    if activation is Activation.RELU:
        return step
    eta = a.dtype.type(SMOOTHRELU_ETA) if a.dtype.kind == "f" else SMOOTHRELU_ETA
    return np.where(np.abs(a) < eta, a / (2 * eta) + a.dtype.type(0.5), step)


def second_derivative(a: np.ndarray, activation: Activation) -> np.ndarray:
    """Vectorised second derivative ``sigma''(a)`` (NumPy only; no compiled form).

    ``tanh``: ``-2 tanh(a) (1 - tanh(a)^2)``; ReLU: 0 (almost everywhere);
    SmoothReLU: ``1/(2 eta)`` on ``|a| < eta``, 0 elsewhere. NaN stays NaN. Used by the
    co-state penalty of E-MSA (:mod:`ptoc.msa`).
    """
    a = np.asarray(a)
    activation = Activation.parse(activation)
    if activation is Activation.TANH:
        t = np.tanh(a)
        return -2 * t * (1 - t * t)
    zero = np.where(np.isnan(a), a, np.zeros_like(a))
    if activation is Activation.RELU:
        return zero
    eta = a.dtype.type(SMOOTHRELU_ETA) if a.dtype.kind == "f" else SMOOTHRELU_ETA
    return np.where(np.abs(a) < eta, 1 / (2 * eta) + zero, zero)
