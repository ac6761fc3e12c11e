"""One residual layer, batched, on three targets with one signature.

Public wrappers (this module) validate their inputs and pick the target; the
private kernels in :mod:`~ptoc.kernels.reference` (NumPy), :mod:`~ptoc.kernels.cpu`
(Numba ``njit``/``prange``) and :mod:`~ptoc.kernels.cuda` (Numba CUDA) take arrays
and scalars only and share the signature documented in
:mod:`ptoc.kernels.reference`. Optional targets are imported on first use. The
compiled row operations of MGRIT's grid transfers are :mod:`~ptoc.kernels.rows`, and
the disk cache of the compiled CPU kernels is :mod:`~ptoc.kernels._cache`.

Equations (theory: :doc:`/theory/resnet`, :doc:`/theory/adjoint` and
:doc:`/theory/maximum_principle`), for states ``x`` (S, d), one sample per row,
weights ``K`` (d, d), bias ``b`` (d,), step ``h`` and ``a = x K^T + b``:

* :func:`layer_step`: ``x_{n+1} = x + h sigma(a)``;
* :func:`layer_adjoint_step`: ``lambda_n = lambda_{n+1} + h (sigma'(a) * lambda_{n+1}) K``
  (row form of ``lambda_{n+1} + h K^T (sigma'(a) . lambda_{n+1})``), optionally
  accumulating the parameter gradient;
* :func:`layer_param_grad`: ``dJ/dK_n += h sum_s g_s x_s^T``, ``dJ/db_n += h sum_s g_s``,
  ``g = sigma'(a) * lambda_{n+1}``;
* :func:`layer_hamiltonian`: ``sum_s p_s . (x_s + h sigma(a_s))``, the data part of the
  layer Hamiltonian with co-state ``p = -lambda`` (Li & Hao 2018);
* :func:`layer_hamiltonian_grad`: its gradient in ``(K, b)``, which is
  :func:`layer_param_grad` with ``p`` in place of ``lambda``.
"""

from __future__ import annotations

import contextlib
import importlib
from types import ModuleType

import numpy as np

from .. import _config
from .._options import OptionEnum
from ..activations import Activation

__all__ = [
    "Target",
    "backend",
    "layer_step",
    "layer_adjoint_step",
    "layer_param_grad",
    "layer_hamiltonian",
    "layer_hamiltonian_grad",
]


class Target(OptionEnum, what="target"):
    """Where the layer kernels run.

    ``NUMPY``: the vectorised NumPy reference (readable, the one to teach from).
    ``CPU``: Numba ``njit`` kernels, parallel over the batch (the default).
    ``CUDA``: Numba CUDA kernels (needs ``pip install 'ptoc[cuda]'`` and a GPU, or
    ``NUMBA_ENABLE_CUDASIM=1`` set before numba is imported for the CPU simulator).
    """

    NUMPY = "numpy"
    CPU = "cpu"
    CUDA = "cuda"


_MODULES = {Target.NUMPY: "reference", Target.CPU: "cpu", Target.CUDA: "cuda"}
_loaded: dict[Target, ModuleType] = {}


def backend(target: Target | str) -> ModuleType:
    """The kernel module of ``target``, imported on first use.

    Raises
    ------
    ValueError
        For an unknown target name.
    ImportError
        When an optional target cannot be used, with the reason and the fix.
    """
    target = Target.parse(target)
    module = _loaded.get(target)
    if module is None:
        try:
            module = importlib.import_module(f"{__name__}.{_MODULES[target]}")
        except ImportError as exc:
            if target is Target.CUDA:
                raise ImportError(
                    "target 'cuda' needs numba-cuda: pip install 'ptoc[cuda]' "
                    f"(import failed: {exc})"
                ) from exc
            raise
        check = getattr(module, "check_available", None)
        if check is not None:
            check()
        _loaded[target] = module
    return module


# --- validation ------------------------------------------------------------------------------

def _array(name: str, value: object, ndim: int) -> np.ndarray:
    arr = np.asarray(value)
    if arr.ndim != ndim:
        raise ValueError(f"{name} must be a {ndim}-D array, got shape {arr.shape}")
    if arr.dtype not in (np.float64, np.float32):
        if arr.dtype.kind in "iub":
            arr = arr.astype(np.float64)
        else:
            raise ValueError(f"{name} must hold real floats, got dtype {arr.dtype}")
    return arr


def _check_layer(x, K, b, h, activation, others=()):
    """Validate one layer's arguments; return contiguous arrays of one dtype."""
    x = _array("x", x, 2)
    K = _array("K", K, 2)
    b = _array("b", b, 1)
    S, d = x.shape
    if S == 0:
        raise ValueError("the batch is empty: x has 0 rows")
    if K.shape != (d, d):
        raise ValueError(f"K has shape {K.shape}, expected ({d}, {d}) for states of width {d}")
    if b.shape != (d,):
        raise ValueError(f"b has shape {b.shape}, expected ({d},)")
    try:
        h = float(h)
    except (TypeError, ValueError):
        raise ValueError(f"h must be a real number, got {h!r}") from None
    if not np.isfinite(h):
        raise ValueError(f"h must be finite, got {h}")
    act = Activation.parse(activation)
    dtype = np.result_type(x.dtype, K.dtype, b.dtype)
    checked = []
    for name, arr in (("x", x), ("K", K), ("b", b)) + tuple(
        (name, _array(name, v, 2)) for name, v in others
    ):
        if arr.shape[-2:] != x.shape and name not in ("K", "b"):
            raise ValueError(f"{name} has shape {arr.shape}, expected {x.shape} (same as x)")
        arr = np.ascontiguousarray(arr, dtype=dtype)
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{name} contains non-finite values (NaN or inf)")
        checked.append(arr)
    return checked, h, act


def _grad_buffer(name: str, value, shape, dtype) -> np.ndarray:
    if value is None:
        return np.zeros(shape, dtype)
    if not isinstance(value, np.ndarray) or value.shape != shape or value.dtype != dtype:
        got = value.shape if isinstance(value, np.ndarray) else type(value).__name__
        raise ValueError(f"{name} must be a {dtype} array of shape {shape}, got {got}")
    if not value.flags.c_contiguous or not value.flags.writeable:
        raise ValueError(f"{name} must be a writeable C-contiguous array")
    return value


# --- public per-layer API ----------------------------------------------------------------------

def layer_step(x, K, b, h, activation="tanh", *, target: Target | str = Target.CPU,
               return_derivative: bool = False):
    """One residual layer, ``x + h sigma(x K^T + b)``, for a batch ``x`` of shape (S, d).

    A forward-Euler step (Günther et al. 2020). Theory: :doc:`/theory/resnet`.

    Parameters
    ----------
    x : array (S, d)
        States ``x_n``, one sample per row.
    K : array (d, d)
        Layer weights ``K_n``.
    b : array (d,)
        Layer bias ``b_n``.
    h : float
        Step size.
    activation : Activation or str
        ``"tanh"``, ``"relu"`` or ``"smoothrelu"``.
    target : Target or str
        ``"numpy"``, ``"cpu"`` (default) or ``"cuda"``.
    return_derivative : bool
        Also return ``sigma'(a)`` (S, d), which the adjoint step can reuse.

    Returns
    -------
    x_next : ndarray (S, d)
        ``x_{n+1}``; with ``return_derivative``, the pair ``(x_next, sigma'(a))``.
    """
    (x, K, b), h, act = _check_layer(x, K, b, h, activation)
    kern = backend(target)
    out = np.empty_like(x)
    dsig = np.empty_like(x) if return_derivative else None
    kern.step(x, K, b, h, act.code, out, dsig, _config.CHUNK)
    return (out, dsig) if return_derivative else out


def layer_adjoint_step(x, lam_next, K, b, h, activation="tanh", *,
                       target: Target | str = Target.CPU, grad_K=None, grad_b=None,
                       accumulate_grad: bool = False):
    """Adjoint of one layer: ``lambda_n = lambda_{n+1} + h K^T (sigma'(a) * lambda_{n+1})``.

    The discrete adjoint of :func:`layer_step` (Günther et al. 2020). With
    ``accumulate_grad=True`` (or given ``grad_K``/``grad_b`` buffers) the data part of
    the parameter gradient, ``h sum_s g_s x_s^T`` and ``h sum_s g_s``, is added to
    ``grad_K`` (d, d) and ``grad_b`` (d,) in place, XBraid-style. Theory:
    :doc:`/theory/adjoint`.

    Returns
    -------
    lam : ndarray (S, d)
        ``lambda_n``; with gradient accumulation, ``(lambda_n, grad_K, grad_b)``.
    """
    (x, K, b, lam), h, act = _check_layer(x, K, b, h, activation, (("lam_next", lam_next),))
    want = accumulate_grad or grad_K is not None or grad_b is not None
    kern = backend(target)
    out = np.empty_like(x)
    if not want:
        kern.adjoint_step(x, lam, K, b, h, act.code, out, None, None, None, _config.CHUNK)
        return out
    d = x.shape[1]
    gK = _grad_buffer("grad_K", grad_K, (d, d), x.dtype)
    gb = _grad_buffer("grad_b", grad_b, (d,), x.dtype)
    kern.adjoint_step(x, lam, K, b, h, act.code, out, gK, gb, None, _config.CHUNK)
    return out, gK, gb


def layer_param_grad(x, lam_next, K, b, h, activation="tanh", *,
                     target: Target | str = Target.CPU, grad_K=None, grad_b=None):
    """Data part of ``dJ/dK_n``, ``dJ/db_n``: ``h sum_s g_s x_s^T`` and ``h sum_s g_s``.

    ``g = sigma'(x K^T + b) * lambda_{n+1}`` (theory: :doc:`/theory/adjoint`). The
    result is added to ``grad_K``/``grad_b`` when given (accumulation), else to zeros.

    Returns
    -------
    (grad_K, grad_b) : ndarrays (d, d) and (d,)
    """
    (x, K, b, lam), h, act = _check_layer(x, K, b, h, activation, (("lam_next", lam_next),))
    d = x.shape[1]
    gK = _grad_buffer("grad_K", grad_K, (d, d), x.dtype)
    gb = _grad_buffer("grad_b", grad_b, (d,), x.dtype)
    backend(target).param_grad(x, lam, K, b, h, act.code, gK, gb, None, _config.CHUNK)
    return gK, gb


def layer_hamiltonian(x, p_next, K, b, h, activation="tanh", *,
                      target: Target | str = Target.CPU) -> float:
    """Data part of the layer Hamiltonian, ``sum_s p_s . (x_s + h sigma(K x_s + b))``.

    Li & Hao 2018; theory: :doc:`/theory/maximum_principle`. With co-state
    ``p_{n+1} = -lambda_{n+1}``, ``sum_s H_n = sum_s p_s . Phi_n(x_s; theta) - R_n(theta)``;
    the regulariser part ``R_n`` is added by :func:`ptoc.hamiltonian`.
    """
    (x, K, b, p), h, act = _check_layer(x, K, b, h, activation, (("p_next", p_next),))
    return backend(target).hamiltonian(x, p, K, b, h, act.code, _config.CHUNK)


def layer_hamiltonian_grad(x, p_next, K, b, h, activation="tanh", *,
                           target: Target | str = Target.CPU):
    """Gradient in ``(K, b)`` of :func:`layer_hamiltonian`.

    ``d/dK sum_s p_s . Phi(x_s) = h sum_s (sigma'(a_s) * p_s) x_s^T``: the parameter
    gradient formula with ``p`` in place of ``lambda``, hence
    ``grad_theta sum_s H_n = -dJ/dtheta_n`` when ``p = -lambda`` (gradient descent is
    Hamiltonian ascent).

    Returns
    -------
    (grad_K, grad_b) : ndarrays (d, d) and (d,)
    """
    return layer_param_grad(x, p_next, K, b, h, activation, target=target)


_blas_controller = None


def single_threaded_blas(target: Target | str | ModuleType):
    """A context that holds BLAS to one thread while the Numba CPU target owns the cores.

    ``target``: a target, or a kernel module (the CPU target's is ``ptoc.kernels.cpu``);
    for any target but ``"cpu"`` the context does nothing. The openings and the
    classifiers use NumPy matrix products. A multi-threaded OpenBLAS keeps its worker
    threads spinning for a while after each product, and on a machine with few cores
    they then compete with the Numba kernel threads (measured: 5x slower gradients of
    the dense ResNet at d=64, S=1024). Enter it in the thread that starts a whole solve
    or gradient (the limit is process-wide), not in the threads of simulated ranks.
    Needs :mod:`threadpoolctl`; without it this does nothing.
    """
    global _blas_controller
    if isinstance(target, ModuleType):
        is_cpu = target.__name__.rsplit(".", 1)[-1] == "cpu"
    else:
        is_cpu = Target.parse(target) is Target.CPU
    if not is_cpu:
        return contextlib.nullcontext()
    if _blas_controller is None:
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:  # pragma: no cover - threadpoolctl is a dependency
            _blas_controller = False
        else:
            _blas_controller = ThreadpoolController()
    if _blas_controller is False:  # pragma: no cover
        return contextlib.nullcontext()
    return _blas_controller.limit(limits=1, user_api="blas")
