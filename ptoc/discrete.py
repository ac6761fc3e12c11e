"""Closed-form Hamiltonian maximisers over discrete weights (Li & Hao 2018, discrete weights).

In the method of successive approximations with discrete weights, layer ``n`` has
weights ``K_n = a_n W_n`` with a per-layer scale ``a_n > 0`` and ``W_n`` in a discrete
set: binary ``{-1, +1}`` or ternary ``{-1, 0, +1}``. Its Hamiltonian is linearised in
``W`` around the current weights, ``M = d(sum_s H_n)/dW`` (in practice a moving
average over batches), and each entry is then chosen independently
(:doc:`/theory/msa`, discrete weights) to maximise

.. math::

    f(w) = M_{ij} w - \\lambda |w| - \\rho (w - W_{ij})^2 ,

where ``rho >= 0`` keeps the new weights near the current ones (the error control of
E-MSA) and ``lambda >= 0`` rewards zeros (ternary sparsity; for binary weights
``|w| = 1`` and the term is a constant). With ``c = M_ij + 2 rho W_ij``:

* ``f(1) - f(-1) = 2 c``, so the best nonzero value is ``sign(c)``;
* ``f(sign c) - f(0) = |c| - lambda - rho``, so a ternary entry is nonzero exactly when
  ``|c| > lambda + rho``.

Ties (a set of measure zero) are broken towards the sparser value, then towards
``+1``: ``0`` when ``|c| = lambda + rho``, ``+1`` when ``c = 0`` for binary weights.
"""

from __future__ import annotations

import numpy as np

__all__ = ["binary_maximiser", "discrete_objective", "ternary_maximiser"]


def _check(M, W, rho, lam) -> tuple[np.ndarray, ...]:
    M = np.asarray(M, dtype=float)
    W = np.asarray(W, dtype=float)
    if M.shape != W.shape:
        raise ValueError(f"M has shape {M.shape} but the current weights W have {W.shape}")
    if not (np.all(np.isfinite(M)) and np.all(np.isfinite(W))):
        raise ValueError("M and W must be finite")
    out = [M, W]
    for name, value in (("rho", rho), ("lam", lam)):
        v = np.asarray(value, dtype=float)
        try:
            np.broadcast_shapes(v.shape, M.shape)
        except ValueError:
            raise ValueError(f"{name} has shape {v.shape}, which does not broadcast to the "
                             f"shape of M, {M.shape}") from None
        if not np.all(np.isfinite(v)) or np.any(v < 0):
            raise ValueError(f"{name} must be finite numbers >= 0, got {value!r}")
        out.append(v)
    return tuple(out)


def discrete_objective(w, M, W, rho: float, lam: float = 0.0) -> np.ndarray:
    """``M w - lam |w| - rho (w - W)^2``, entry by entry: what the maximisers maximise."""
    w = np.asarray(w, dtype=float)
    return M * w - lam * np.abs(w) - rho * (w - W) ** 2


def ternary_maximiser(M, W, rho: float = 0.0, lam: float = 0.0) -> np.ndarray:
    """Entry-wise maximiser of :func:`discrete_objective` over ``{-1, 0, +1}``.

    The closed form of the penalised Hamiltonian maximisation of Li & Hao 2018
    (discrete weights), derived in the module docstring.
    Theory: :doc:`/theory/msa`.

    Parameters
    ----------
    M : array
        Linearised Hamiltonian ``d(sum_s H_n)/dW`` (or its moving average).
    W : array
        Current weights (the same shape; any real values, usually in ``{-1, 0, 1}``).
    rho : float or array
        Proximity penalty (E-MSA), ``>= 0``; an array broadcasting to ``M`` (e.g. one
        value per layer, shape (N, 1, 1)) gives each entry its own.
    lam : float or array
        L1 penalty that makes weights zero, ``>= 0`` (broadcast like ``rho``).

    Returns
    -------
    ndarray of float
        ``sign(c)`` where ``|c| > lam + rho``, else 0, with ``c = M + 2 rho W``.
    """
    M, W, rho, lam = _check(M, W, rho, lam)
    c = M + 2.0 * rho * W
    return np.where(np.abs(c) > lam + rho, np.where(c >= 0.0, 1.0, -1.0), 0.0)


def binary_maximiser(M, W, rho: float = 0.0) -> np.ndarray:
    """Entry-wise maximiser of :func:`discrete_objective` over ``{-1, +1}``:
    ``sign(M + 2 rho W)``, ``+1`` on ties.

    Li & Hao 2018 (discrete weights). Theory: :doc:`/theory/msa`.
    """
    M, W, rho, _ = _check(M, W, rho, 0.0)
    return np.where(M + 2.0 * rho * W >= 0.0, 1.0, -1.0)
