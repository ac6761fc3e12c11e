"""One convolutional residual layer, batched, on the NumPy, Numba CPU and CUDA targets.

The public, validating wrappers of the kernels of :mod:`ptoc.kernels.conv_reference`
(NumPy, the one to read), :mod:`ptoc.kernels.conv_cpu` (Numba, parallel over the
batch) and :mod:`ptoc.kernels.conv_cuda` (Numba CUDA, one thread per entry), which
share one signature; :func:`conv_backend` picks the module of a target.
Theory and equations: :doc:`/theory/conv` and :mod:`ptoc.kernels.conv_reference`.

For states ``x`` (S, C, H, W), a kernel ``K`` (C, C, 3, 3), a bias ``b`` (C,), a step ``h``
and ``a = conv(x, K) + b`` (cross-correlation, stride 1, zero padding 1):

* :func:`conv_layer_step`: ``x + h sigma(a)``;
* :func:`conv_layer_adjoint_step`: ``lambda_{n+1} + h conv^T(sigma'(a) * lambda_{n+1}, K)``,
  optionally accumulating ``dJ/dK_n`` and ``dJ/db_n``;
* :func:`conv_layer_hamiltonian`: ``sum_s <p_s, x_s + h sigma(a_s)>``;
* :func:`conv_layer_hamiltonian_grad`: its gradient in ``(K, b)``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import numpy as np

from ..activations import Activation
from . import Target, backend

__all__ = ["conv_backend", "conv_layer_step", "conv_layer_adjoint_step",
           "conv_layer_hamiltonian", "conv_layer_hamiltonian_grad"]

_MODULES = {Target.NUMPY: "conv_reference", Target.CPU: "conv_cpu", Target.CUDA: "conv_cuda"}


def conv_backend(target: Target | str) -> ModuleType:
    """The convolution kernel module of ``target`` (``"numpy"``, ``"cpu"`` or ``"cuda"``),
    imported on first use.

    ``"cuda"`` first loads the dense CUDA target (:func:`ptoc.kernels.backend`), whose
    helpers the convolution kernels share, so that it fails as the dense target does.

    Raises
    ------
    ValueError
        For an unknown target name.
    ImportError
        For ``"cuda"`` without numba-cuda, or without a usable GPU and without the CUDA
        simulator, with the reason and the fix.
    """
    target = Target.parse(target)
    if target is Target.CUDA:
        backend(target)
    return importlib.import_module(f"{__package__}.{_MODULES[target]}")


def _array(name: str, value, ndim: int) -> np.ndarray:
    arr = np.asarray(value)
    if arr.ndim != ndim:
        raise ValueError(f"{name} must be a {ndim}-D array, got shape {arr.shape}")
    if arr.dtype.kind not in "fiub":
        raise ValueError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    return arr


def _check_layer(x, K, b, h, activation, others=()):
    """Validate one layer's arguments; contiguous arrays of one float dtype, ``h``, the
    activation code."""
    x, K, b = _array("x", x, 4), _array("K", K, 4), _array("b", b, 1)
    S, C = x.shape[:2]
    if S == 0:
        raise ValueError("the batch is empty: x has 0 samples")
    if K.shape != (C, C, 3, 3):
        raise ValueError(f"K has shape {K.shape}, expected ({C}, {C}, 3, 3) for states with "
                         f"{C} channels")
    if b.shape != (C,):
        raise ValueError(f"b has shape {b.shape}, expected ({C},)")
    try:
        h = float(h)
    except (TypeError, ValueError):
        raise ValueError(f"h must be a real number, got {h!r}") from None
    if not np.isfinite(h):
        raise ValueError(f"h must be finite, got {h}")
    code = Activation.parse(activation).code
    arrays = [("x", x), ("K", K), ("b", b)] + [(n, _array(n, v, 4)) for n, v in others]
    dtype = np.result_type(*(a for _, a in arrays), np.float32)
    checked = []
    for name, arr in arrays:
        if name not in ("K", "b") and arr.shape != x.shape:
            raise ValueError(f"{name} has shape {arr.shape}, expected {x.shape} (same as x)")
        arr = np.ascontiguousarray(arr, dtype=dtype)
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{name} contains non-finite values (NaN or inf)")
        checked.append(arr)
    return checked, h, code


def conv_layer_step(x, K, b, h, activation="tanh", *, target: Target | str = "cpu"
                    ) -> np.ndarray:
    """``x + h sigma(conv(x, K) + b)`` for states ``x`` (S, C, H, W)."""
    kern = conv_backend(target)
    (x, K, b), h, act = _check_layer(x, K, b, h, activation)
    return kern.layer(x, K, b, h, act, True, np.empty_like(x), None)


def conv_layer_adjoint_step(x, lam, K, b, h, activation="tanh", *,
                            target: Target | str = "cpu"):
    """``(lambda_n, dJ/dK_n, dJ/db_n)`` from ``lam = lambda_{n+1}`` (S, C, H, W): the adjoint
    step and the parameter gradient of the layer at ``x``."""
    kern = conv_backend(target)
    (x, K, b, lam), h, act = _check_layer(x, K, b, h, activation, (("lam", lam),))
    gK, gb = np.zeros_like(K), np.zeros_like(b)
    out = kern.adjoint(x, lam, K, b, h, act, np.empty_like(lam), gK, gb)
    return out, gK, gb


def conv_layer_hamiltonian(x, p, K, b, h, activation="tanh", *,
                           target: Target | str = "cpu") -> float:
    """The data part of the layer Hamiltonian, ``sum_s <p_s, x_s + h sigma(a_s)>``."""
    kern = conv_backend(target)
    (x, K, b, p), h, act = _check_layer(x, K, b, h, activation, (("p", p),))
    return kern.hamiltonian(x, p, K, b, h, act)


def conv_layer_hamiltonian_grad(x, p, K, b, h, activation="tanh", *,
                                target: Target | str = "cpu"):
    """``(dH/dK, dH/db)`` of :func:`conv_layer_hamiltonian`."""
    kern = conv_backend(target)
    (x, K, b, p), h, act = _check_layer(x, K, b, h, activation, (("p", p),))
    gK, gb = np.zeros_like(K), np.zeros_like(b)
    kern.hamiltonian_grad(x, p, K, b, h, act, gK, gb)
    return gK, gb
