"""NumPy reference kernels: the equations of one layer, vectorised and readable.

This is the target to teach from and to check the compiled targets against. Every
function has the same signature in :mod:`ptoc.kernels.cpu` and
:mod:`ptoc.kernels.cuda`; the public, validating wrappers are in :mod:`ptoc.kernels`.

Conventions (theory: :doc:`/theory/resnet`, :doc:`/theory/adjoint`,
:doc:`/theory/maximum_principle`). A batch of states is ``x`` with shape
``(S, d)``, one sample per row. Layer ``n`` has weights ``K`` (d, d) and bias ``b``
(d,); its pre-activation is ``a = x K^T + b`` and its step is

    Phi_n(x) = x + h sigma(a).                                            (forward)

Given ``lam = lambda_{n+1}`` (S, d), the adjoint step and the parameter gradient are

    g        = sigma'(a) * lam
    lambda_n = lam + h g K                  (row form of lam + h K^T g)    (adjoint)
    dJ/dK_n += h g^T x,     dJ/db_n += h sum_s g_s                        (gradient)

and with the co-state ``p = -lambda`` the data part of the layer Hamiltonian is
``sum_s p_s . Phi_n(x_s)``, whose gradient in ``(K, b)`` is the gradient formula
above with ``p`` in place of ``lam`` (Li & Hao 2018).

``act`` is the integer activation code of :mod:`ptoc._maths`; ``chunk`` is accepted
for a common signature and ignored here (NumPy sums in its own order).
"""

from __future__ import annotations

import numpy as np

from .. import _maths
from ..activations import Activation, dsigma, sigma

_BY_CODE = {a.code: a for a in Activation}


def _activation(act: int) -> Activation:
    return _BY_CODE[act]


def step(x, K, b, h, act, out, dsig, chunk):
    """``out = x + h sigma(x K^T + b)``; if ``dsig`` is not None, store ``sigma'(a)`` in it."""
    a = x @ K.T + b
    activation = _activation(act)
    out[...] = x + h * sigma(a, activation)
    if dsig is not None:
        dsig[...] = dsigma(a, activation)
    return out


def _g(x, lam, K, b, act, dsig):
    """``g = sigma'(a) * lam``, using the stored derivative when given."""
    d = dsig if dsig is not None else dsigma(x @ K.T + b, _activation(act))
    return d * lam


def adjoint_step(x, lam, K, b, h, act, out, gK, gb, dsig, chunk):
    """``out = lam + h (sigma'(a) * lam) K``; if ``gK`` is given, accumulate the gradient.

    ``gK += h g^T x`` and ``gb += h sum_s g_s`` with ``g = sigma'(a) * lam``.
    """
    g = _g(x, lam, K, b, act, dsig)
    if gK is not None:
        gK += h * (g.T @ x)
        gb += h * g.sum(axis=0)
    out[...] = lam + h * (g @ K)
    return out


def param_grad(x, lam, K, b, h, act, gK, gb, dsig, chunk):
    """Accumulate ``gK += h g^T x``, ``gb += h sum_s g_s`` with ``g = sigma'(a) * lam``."""
    g = _g(x, lam, K, b, act, dsig)
    gK += h * (g.T @ x)
    gb += h * g.sum(axis=0)


def hamiltonian(x, p, K, b, h, act, chunk):
    """Data part of the layer Hamiltonian, ``sum_s p_s . (x_s + h sigma(K x_s + b))``."""
    phi = x + h * sigma(x @ K.T + b, _activation(act))
    return float(np.sum(p * phi))


def forward_sweep(states, K, b, h, act, dsig, chunk):
    """Fill ``states[n + 1] = Phi_n(states[n])`` for ``n = 0..N-1`` (``states[0]`` given).

    ``K`` (N, d, d), ``b`` (N, d), ``states`` (N+1, S, d); ``dsig`` (N, S, d) or None.
    """
    for n in range(K.shape[0]):
        step(states[n], K[n], b[n], h, act, states[n + 1],
             None if dsig is None else dsig[n], chunk)


def adjoint_sweep(states, lam_N, K, b, h, act, dsig, gK, gb, lams, chunk):
    """Backward sweep ``lambda_n = Phi_n'(x_n)^T lambda_{n+1}`` from ``lambda_N = lam_N``.

    Accumulates the data part of the gradient into ``gK`` (N, d, d) and ``gb`` (N, d);
    if ``lams`` (N+1, S, d) is given, every ``lambda_n`` is stored in it. Returns
    ``lambda_0``.
    """
    lam = lam_N.copy()
    if lams is not None:
        lams[-1] = lam
    for n in range(K.shape[0] - 1, -1, -1):
        lam = adjoint_step(states[n], lam, K[n], b[n], h, act, np.empty_like(lam), gK[n], gb[n],
                           None if dsig is None else dsig[n], chunk)
        if lams is not None:
            lams[n] = lam
    return lam


# --- level kernels: many steps of one MGRIT/parareal level in one call ---------------------
#
# ``u`` (n, S, d) holds consecutive positions of one level; the step producing position
# ``k`` from ``k - 1`` has weights ``K[k]``, ``b[k]``, size ``dt[k]`` and, for the adjoint,
# the derivative ``D[k] = sigma'(X[k] K[k]^T + b[k])`` at its linearisation state ``X[k]``
# (:func:`level_derivatives`, once per solve: the states do not change during an adjoint
# solve). ``g`` (or None) is a right-hand side added after the step.

def state_runs(u, g, K, b, dt, act, starts, ends, chunk):
    """In place, for each run ``r``: ``u[k] = u[k-1] + dt[k] sigma(u[k-1] K[k]^T + b[k]) (+ g[k])``
    for ``k = starts[r] .. ends[r]`` in order (the runs are independent)."""
    for s, e in zip(starts, ends, strict=True):
        for k in range(s, e + 1):
            step(u[k - 1], K[k], b[k], dt[k], act, u[k], None, chunk)
            if g is not None:
                u[k] += g[k]


def state_points(u, K, b, dt, act, positions, out, chunk):
    """``out[r] = u[k-1] + dt[k] sigma(u[k-1] K[k]^T + b[k])`` with ``k = positions[r]``."""
    for r, k in enumerate(positions):
        step(u[k - 1], K[k], b[k], dt[k], act, out[r], None, chunk)


def point_ends(phi, u, g, positions, out, rows, mode) -> None:
    """What a point step does with its values ``phi[r]`` of positions ``k = positions[r]``
    (``mode``: :data:`ptoc._maths.POINT_APPLY` and the next three): ``out[:] = phi``;
    ``out[rows] = phi - u[k]``; ``out[rows] = g[k] + (phi - u[k])``;
    ``out[rows] = out[rows] + (u[k] - phi)``."""
    if mode == _maths.POINT_APPLY:
        out[: len(phi)] = phi
        return
    positions = np.asarray(positions, dtype=np.int64)
    rows = np.asarray(rows, dtype=np.int64)
    if mode == _maths.POINT_TAU:
        out[rows] = out[rows] + (u[positions] - phi)
        return
    res = phi - u[positions]
    out[rows] = g[positions] + res if mode == _maths.POINT_RESIDUAL_G else res


def state_points_into(u, K, b, dt, act, positions, out, rows, g, mode, chunk):
    """:func:`state_points` with the end of each step chosen by ``mode``
    (:func:`point_ends`): MGRIT forms its FAS right-hand side this way."""
    phi = np.empty((len(positions),) + u.shape[1:], u.dtype)
    state_points(u, K, b, dt, act, positions, phi, chunk)
    point_ends(phi, u, g, positions, out, rows, mode)


def level_derivatives(X, K, b, act, out, chunk):
    """``out[k] = sigma'(X[k] K[k]^T + b[k])`` for ``k = 1 .. n-1`` (row 0 is not touched)."""
    if out is None:
        out = np.empty_like(X)
    activation = _activation(act)
    for k in range(1, X.shape[0]):
        out[k] = dsigma(X[k] @ K[k].T + b[k], activation)
    return out


def _adjoint_level_step(lam, D, K, dt, k, out):
    """``out = lam + dt[k] (D[k] * lam) K[k]``: the adjoint step producing position ``k``."""
    out[...] = lam + dt[k] * ((D[k] * lam) @ K[k])


def adjoint_runs(lam, g, D, K, dt, starts, ends, chunk):
    """In place, for each run: ``lam[k] = lam[k-1] + dt[k] (D[k] * lam[k-1]) K[k] (+ g[k])``
    for ``k = starts[r] .. ends[r]`` in order."""
    for s, e in zip(starts, ends, strict=True):
        for k in range(s, e + 1):
            _adjoint_level_step(lam[k - 1], D, K, dt, k, lam[k])
            if g is not None:
                lam[k] += g[k]


def adjoint_points(lam, D, K, dt, positions, out, chunk):
    """``out[r]`` = the adjoint step producing position ``k = positions[r]`` from ``lam[k-1]``."""
    for r, k in enumerate(positions):
        _adjoint_level_step(lam[k - 1], D, K, dt, k, out[r])


def adjoint_points_into(lam, D, K, dt, positions, out, rows, g, mode, chunk):
    """:func:`adjoint_points` with the end of each step chosen by ``mode``
    (:func:`point_ends`)."""
    phi = np.empty((len(positions),) + lam.shape[1:], lam.dtype)
    adjoint_points(lam, D, K, dt, positions, phi, chunk)
    point_ends(phi, lam, g, positions, out, rows, mode)


def layer_gradients(xs, lams, K, b, h, act, gK, gb, chunk):
    """For every layer ``n`` of a block: ``gK[n] += h g_n^T xs[n]``, ``gb[n] += h sum_s g_n``
    with ``g_n = sigma'(xs[n] K[n]^T + b[n]) * lams[n]`` (``lams[n]`` is ``lambda_{n+1}``)."""
    for n in range(K.shape[0]):
        param_grad(xs[n], lams[n], K[n], b[n], h, act, gK[n], gb[n], None, chunk)
