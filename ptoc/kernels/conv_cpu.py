"""Numba CPU kernels of one convolutional residual layer, parallel over the batch.

The functions of :mod:`ptoc.kernels.conv_reference`, with the same signatures and
equations (theory: :doc:`/theory/conv`), compiled. ``prange`` runs over the samples:
one thread computes a whole sample.

Layout: flat padded images
--------------------------
A sample's input channels are copied into a scratch row each, the image with one zero
row and column on every side, flattened: with ``P = W + 2``, pixel ``(y, z)`` of the
padded image is entry ``y P + z`` (and two more zeros at the end). The output pixel
``(y, z)`` is then computed at ``q = y P + z``, and tap ``(u, v)`` of the convolution
reads the input at ``q + u P + v``: one fixed offset per tap. So each pair of channels
``(i, j)`` is a single loop over ``q = 0 .. H P - 1`` that adds the 9 taps
(:func:`_add_taps`), with no branch for the padding and no per-row overhead, and it
vectorises; the ``2 H`` entries with ``z >= W`` are computed and never read. The
transposed convolution is the same loop over ``g`` padded the same way, with the kernel
flipped in space, and the kernel gradient is 9 dot products of the padded ``g`` with
the input shifted by the taps, one loop over ``q`` (:func:`_tap_products`).

Sums and their order
--------------------
The activation is :func:`ptoc._maths.activation`, the same per-entry code as the dense
kernels. Each output entry sums its terms in one fixed order, whatever the thread, so
the states and adjoints are independent of the number of threads. The gradient is
summed per sample into partials, which are added per chunk of ``_config.CHUNK``
samples in sample order, and the chunk sums then in chunk order (as the dense kernels
of :mod:`ptoc.kernels.cpu` do), so it too is independent of the number of threads. The
sums run in another order than the NumPy reference's; the two agree to round-off
(``tests/test_conv.py`` checks 1e-12). The scratch rows come from a workspace: a call
allocates nothing but its result once the shapes have been seen.
"""

from __future__ import annotations

import functools

import numpy as np
from numba import prange

from .. import _config, _maths
from .._workspace import Workspace
from . import _bits, _cache
from . import cpu as _dense_cpu  # noqa: F401 - registers ptoc._maths.activation as jitable

_jit = functools.partial(_cache.njit, depends_on=(_maths, _config, _bits),
                         fastmath=_config.CPU_FASTMATH, error_model="numpy")
_activation = _maths.activation
_TANH = _maths.TANH

#: Scratch of the kernels (padded inputs, padded ``g``, rows, partials), per calling thread.
_scratch = Workspace(capacity=12)


def padded_length(H: int, W: int) -> int:
    """Entries of one flat padded channel: ``(H + 2) (W + 2)`` and 2 zeros that the taps
    of the last computed entries (``q + 2 P + 2``) may read."""
    return (H + 2) * (W + 2) + 2


@_jit()
def _pad(x, xp, P):
    """``xp[j]`` = channel ``j`` of ``x`` (C, H, W) flattened with a zero border."""
    for j in range(x.shape[0]):
        row = xp[j]
        row[:] = 0.0
        for y in range(x.shape[1]):
            base = (y + 1) * P + 1
            for z in range(x.shape[2]):
                row[base + z] = x[j, y, z]


@_jit()
def _add_taps(acc, src, w, flip, P, L):
    """``acc[q] += sum_{u,v} w[u, v] src[q + u P + v]`` for ``q < L``; with ``flip`` the
    weight of offset ``u P + v`` is ``w[2 - u, 2 - v]`` (the transposed convolution)."""
    if flip:
        w00, w01, w02 = w[2, 2], w[2, 1], w[2, 0]
        w10, w11, w12 = w[1, 2], w[1, 1], w[1, 0]
        w20, w21, w22 = w[0, 2], w[0, 1], w[0, 0]
    else:
        w00, w01, w02 = w[0, 0], w[0, 1], w[0, 2]
        w10, w11, w12 = w[1, 0], w[1, 1], w[1, 2]
        w20, w21, w22 = w[2, 0], w[2, 1], w[2, 2]
    # one slice per kernel row taken beforehand, so that every index below is the loop
    # counter plus a constant (a runtime offset would make Numba test its sign)
    s0, s1, s2 = src[0:], src[P:], src[2 * P:]
    for q in range(L):
        acc[q] += (w00 * s0[q] + w01 * s0[q + 1] + w02 * s0[q + 2]
                   + w10 * s1[q] + w11 * s1[q + 1] + w12 * s1[q + 2]
                   + w20 * s2[q] + w21 * s2[q + 1] + w22 * s2[q + 2])


@_jit()
def _tap_products(g, src, P, L, out):
    """``out[u, v] = sum_{q < L} g[q] src[q + u P + v]``: the 9 taps' dot products."""
    s0, s1, s2 = src[0:], src[P:], src[2 * P:]
    c00 = c01 = c02 = c10 = c11 = c12 = c20 = c21 = c22 = 0.0
    for q in range(L):
        gq = g[q]
        c00 += gq * s0[q]
        c01 += gq * s0[q + 1]
        c02 += gq * s0[q + 2]
        c10 += gq * s1[q]
        c11 += gq * s1[q + 1]
        c12 += gq * s1[q + 2]
        c20 += gq * s2[q]
        c21 += gq * s2[q + 1]
        c22 += gq * s2[q + 2]
    out[0, 0], out[0, 1], out[0, 2] = c00, c01, c02
    out[1, 0], out[1, 1], out[1, 2] = c10, c11, c12
    out[2, 0], out[2, 1], out[2, 2] = c20, c21, c22


@_jit()
def _conv_row(xp, K, b, i, P, L, acc):
    """``acc[q] = b[i] + sum_j conv(x_j, K[i, j])[q]`` (output channel ``i``, flat)."""
    acc[:L] = b[i]
    for j in range(K.shape[1]):
        _add_taps(acc, xp[j], K[i, j], False, P, L)


@_jit()
def _activate_channel(acc, x, h, act, residual, o, dsig, store, P):
    """``o[y, z] = (x[y, z] if residual else 0) + h sigma(acc[y P + z])`` for one channel
    (``x``, ``o``, ``dsig`` (H, W)), ``sigma'`` into ``dsig`` when ``store``.

    The tanh branch passes the constant code, so that the activation inlines into a loop
    that vectorises; with the code known only at run time the loop stays scalar
    (measured: about 5x slower at 4 channels of 28 x 28)."""
    H, W = o.shape
    for y in range(H):
        a = acc[y * P:y * P + W]
        xy, oy, dy = x[y], o[y], dsig[y]
        if act == _TANH:
            for z in range(W):
                value, slope = _activation(a[z], _TANH)
                oy[z] = (xy[z] if residual else 0.0) + h * value
                if store:
                    dy[z] = slope
        else:
            for z in range(W):
                value, slope = _activation(a[z], act)
                oy[z] = (xy[z] if residual else 0.0) + h * value
                if store:
                    dy[z] = slope


@_jit()
def _slope_times(acc, lam, act, row, P):
    """``row[(y + 1) P + z + 1] = sigma'(acc[y P + z]) lam[y, z]`` for one channel (``lam``
    (H, W)): ``g`` in the padded layout; the tanh branch as in :func:`_activate_channel`."""
    H, W = lam.shape
    for y in range(H):
        a = acc[y * P:y * P + W]
        g = row[(y + 1) * P + 1:(y + 1) * P + 1 + W]
        ly = lam[y]
        if act == _TANH:
            for z in range(W):
                g[z] = _activation(a[z], _TANH)[1] * ly[z]
        else:
            for z in range(W):
                g[z] = _activation(a[z], act)[1] * ly[z]


@_jit()
def _layer_sample(x, K, b, h, act, residual, o, dsig, store, xp, acc):
    """One sample: ``o = (x if residual else 0) + h sigma(conv(x, K) + b)`` for ``x``
    (C_in, H, W), ``sigma'`` into ``dsig`` (C_out, H, W) when ``store``; ``xp`` (C_in,
    padded) and ``acc`` (H P) are scratch. ``o`` may not overlap ``x``."""
    H, W = x.shape[1], x.shape[2]
    P = W + 2
    L = H * P
    _pad(x, xp, P)
    for i in range(K.shape[0]):
        _conv_row(xp, K, b, i, P, L, acc)
        _activate_channel(acc, x[i if residual else 0], h, act, residual, o[i], dsig[i],
                          store, P)


@_jit()
def _adjoint_sample(x, lam, K, b, h, act, dsig, have_dsig, o, want_out, part, want_grad,
                    xs, gs, acc):
    """One sample, with ``g = sigma'(a) * lam``: ``o = lam + h conv^T(g, K)`` when
    ``want_out``; when ``want_grad`` the partials ``part``: the kernel gradient
    ``sum_{y,z} g[i, y, z] xs[j, y + u, z + v]`` (``C_out C_in 9`` entries, C order) and
    then ``sum_{y,z} g[i, y, z]`` (``C_out`` entries), not yet multiplied by ``h``.
    ``sigma'(a)`` is read from ``dsig`` when ``have_dsig`` (no convolution), else
    recomputed from ``x``. ``xs`` (C_in, padded), ``gs`` (C_out, padded) and ``acc``
    (H P) are scratch; ``o`` may not overlap ``lam``."""
    H, W = x.shape[1], x.shape[2]
    P = W + 2
    L = H * P
    C_out, C_in = K.shape[0], K.shape[1]
    if want_grad or not have_dsig:
        _pad(x, xs, P)
    for i in range(C_out):
        row = gs[i]
        row[:] = 0.0
        if have_dsig:
            for y in range(H):
                base = (y + 1) * P + 1
                for z in range(W):
                    row[base + z] = dsig[i, y, z] * lam[i, y, z]
        else:
            _conv_row(xs, K, b, i, P, L, acc)
            _slope_times(acc, lam[i], act, row, P)
    if want_out:
        for j in range(C_in):
            acc[:L] = 0.0
            for i in range(C_out):
                _add_taps(acc, gs[i], K[i, j], True, P, L)
            for y in range(H):
                for z in range(W):
                    o[j, y, z] = lam[j, y, z] + h * acc[y * P + z]
    if want_grad:
        kgrad = part[:C_out * C_in * 9].reshape((C_out, C_in, 3, 3))
        for i in range(C_out):
            g = gs[i][P + 1:P + 1 + L]
            for j in range(C_in):
                _tap_products(g, xs[j], P, L, kgrad[i, j])
            total = 0.0
            for q in range(L):
                total += g[q]
            part[C_out * C_in * 9 + i] = total


@_jit(parallel=True)
def _layer(x, K, b, h, act, residual, out, dsig, store, xp, rows):
    """:func:`_layer_sample` for every sample of ``x`` (S, C_in, H, W), in parallel."""
    for s in prange(x.shape[0]):
        _layer_sample(x[s], K, b, h, act, residual, out[s], dsig[s], store, xp[s], rows[s])


@_jit(parallel=True)
def _adjoint(x, lam, K, b, h, act, dsig, have_dsig, out, want_out, part, want_grad, xp, gp,
             rows):
    """:func:`_adjoint_sample` for every sample, in parallel; ``part`` (S, partials; one
    unused entry each without the gradient)."""
    for s in prange(x.shape[0]):
        _adjoint_sample(x[s], lam[s], K, b, h, act, dsig[s], have_dsig, out[s], want_out,
                        part[s], want_grad, xp[s], gp[s], rows[s])


# --- the steps of one MGRIT level: every sample's chain of steps in one call -----------------

@_jit(parallel=True)
def _state_runs(u, g, has_g, K, b, dt, act, starts, ends, xp, rows):
    """``u[j] = u[j-1] + dt[j] sigma(conv(u[j-1], K[j]) + b[j]) (+ g[j])`` for ``j = s..e``
    of each run ``(s, e)``, in order; each sample's chain in parallel with the others."""
    for s in prange(u.shape[1]):
        for r in range(len(starts)):
            for j in range(starts[r], ends[r] + 1):
                o = u[j, s]
                _layer_sample(u[j - 1, s], K[j], b[j], dt[j], act, True, o, o, False, xp[s],
                              rows[s])
                if has_g:
                    o += g[j, s]


@_jit(parallel=True)
def _adjoint_runs(u, g, has_g, X, D, has_D, K, b, dt, act, starts, ends, part, xp, gp, rows):
    """``u[j] = u[j-1] + dt[j] conv^T(sigma'(a_j) * u[j-1], K[j]) (+ g[j])`` with ``a_j =
    conv(X[j], K[j]) + b[j]``, for ``j = s..e`` of each run, per sample in parallel;
    ``sigma'(a_j)`` read from ``D[j]`` if ``has_D``, else recomputed (the same bits)."""
    for s in prange(u.shape[1]):
        for r in range(len(starts)):
            for j in range(starts[r], ends[r] + 1):
                o = u[j, s]
                _adjoint_sample(X[j, s], u[j - 1, s], K[j], b[j], dt[j], act, D[j, s], has_D,
                                o, True, part, False, xp[s], gp[s], rows[s])
                if has_g:
                    o += g[j, s]


@_jit(parallel=True)
def _state_points(u, K, b, dt, act, positions, out, xp, rows):
    """``out[k] = step_j(u[j - 1])`` for ``j = positions[k]``, per sample in parallel."""
    for s in prange(u.shape[1]):
        for k in range(len(positions)):
            j = positions[k]
            o = out[k, s]
            _layer_sample(u[j - 1, s], K[j], b[j], dt[j], act, True, o, o, False, xp[s],
                          rows[s])


@_jit(parallel=True)
def _adjoint_points(u, X, D, has_D, K, b, dt, act, positions, out, part, xp, gp, rows):
    """``out[k]`` = the adjoint step ``j = positions[k]`` at ``X[j]`` applied to
    ``u[j - 1]``, per sample in parallel (``sigma'`` from ``D`` as in :func:`_adjoint_runs`)."""
    for s in prange(u.shape[1]):
        for k in range(len(positions)):
            j = positions[k]
            o = out[k, s]
            _adjoint_sample(X[j, s], u[j - 1, s], K[j], b[j], dt[j], act, D[j, s], has_D, o,
                            True, part, False, xp[s], gp[s], rows[s])


@_jit()
def _sum_partials(part, chunk, chunk_sums, total):
    """``total = sum_s part[s]``: the samples of each chunk of ``chunk`` added in order into
    ``chunk_sums``, then the chunk sums in chunk order. Serial: it is ``S C^2 9`` additions,
    far less than the start of a parallel region costs when a core is busy (measured:
    several milliseconds per call on a loaded 2-core machine); the order of the sums is
    that of the chunked reduction, so the result is the same as with a parallel loop over
    the chunks."""
    S = part.shape[0]
    for c in range(chunk_sums.shape[0]):
        row = chunk_sums[c]
        row[:] = 0.0
        for s in range(c * chunk, min(S, (c + 1) * chunk)):
            for m in range(row.shape[0]):
                row[m] += part[s, m]
    total[:] = 0.0
    for c in range(chunk_sums.shape[0]):
        for m in range(total.shape[0]):
            total[m] += chunk_sums[c, m]


def _padded_scratch(name, S, C, H, W, dtype):
    return _scratch.get(name, (S, C, padded_length(H, W)), dtype)


def layer(x, K, b, h, act, residual, out, dsig):
    """See :func:`ptoc.kernels.conv_reference.layer`."""
    S, C_in, H, W = x.shape
    store = dsig is not None
    xp = _padded_scratch("xp", S, C_in, H, W, x.dtype)
    rows = _scratch.get("rows", (S, H * (W + 2)), x.dtype)
    _layer(x, K, b, h, act, residual, out, dsig if store else out, store, xp, rows)
    return out


def adjoint(x, lam, K, b, h, act, out, gK, gb, dsig=None):
    """See :func:`ptoc.kernels.conv_reference.adjoint`; with ``dsig`` (``sigma'(a)`` of
    this layer at ``x``, as :func:`layer` stores it) the convolution is not recomputed
    (same bits)."""
    S, C_in, H, W = x.shape
    C_out = K.shape[0]
    want_grad = gK is not None
    n_grad = K.size + C_out
    dtype = lam.dtype
    part = _scratch.get("part", (S, n_grad if want_grad else 1), dtype)
    xp = _padded_scratch("xp", S, C_in, H, W, dtype)
    gp = _padded_scratch("gp", S, C_out, H, W, dtype)
    rows = _scratch.get("rows", (S, H * (W + 2)), dtype)
    _adjoint(x, lam, K, b, h, act, lam if dsig is None else dsig, dsig is not None,
             out if out is not None else lam, out is not None, part, want_grad, xp, gp, rows)
    if want_grad:
        chunk = _config.CHUNK
        chunk_sums = _scratch.get("chunk_sums", (-(-S // chunk), n_grad), dtype)
        total = _scratch.get("total", (n_grad,), dtype)
        _sum_partials(part, chunk, chunk_sums, total)
        gK += h * total[:K.size].reshape(K.shape)
        gb += h * total[K.size:]
    return out


def _level_scratch(u):
    """Scratch of the level kernels for values ``u`` (positions, S, C, H, W): padded
    inputs, padded ``g``, rows, and the (unused) partials of a step without gradient."""
    S, C, H, W = u.shape[1:]
    return (_padded_scratch("xp", S, C, H, W, u.dtype),
            _padded_scratch("gp", S, C, H, W, u.dtype),
            _scratch.get("rows", (S, H * (W + 2)), u.dtype),
            _scratch.get("no_partials", (1,), u.dtype))


def state_runs(u, g, K, b, dt, act, starts, ends):
    """``u[j] = u[j-1] + dt[j] sigma(conv(u[j-1], K[j]) + b[j]) (+ g[j])`` for ``j = s..e``
    of each run ``(s, e)`` of ``starts``, ``ends``; ``u``, ``g`` (positions, S, C, H, W),
    ``K``, ``b``, ``dt`` indexed by the step ``j`` (row 0 unused)."""
    xp, _, rows, _ = _level_scratch(u)
    _state_runs(u, u if g is None else g, g is not None, K, b, dt, act, starts, ends, xp, rows)


def level_derivatives(X, K, b, dt, act, out):
    """``out[j] = sigma'(conv(X[j], K[j]) + b[j])`` for ``j >= 1`` (row 0 unused), as
    :func:`layer` stores it: the ``D`` of :func:`adjoint_runs`, once per adjoint solve
    (``out=None``: a new array)."""
    if out is None:
        out = np.empty_like(X)
    scratch = _scratch.get("level_step", X.shape[1:], X.dtype)
    for j in range(1, X.shape[0]):
        layer(X[j], K[j], b[j], dt[j], act, True, scratch, out[j])
    return out


def adjoint_runs(u, g, X, K, b, dt, act, starts, ends, D=None):
    """The adjoint steps of :func:`state_runs` (no gradient): ``u[j] = u[j-1] + dt[j]
    conv^T(sigma'(a_j) * u[j-1], K[j]) (+ g[j])``, ``a_j = conv(X[j], K[j]) + b[j]``;
    with ``D`` (:func:`level_derivatives`) ``sigma'(a_j)`` is read, not recomputed (one
    convolution per step less, the same bits)."""
    xp, gp, rows, part = _level_scratch(u)
    _adjoint_runs(u, u if g is None else g, g is not None, X, X if D is None else D,
                  D is not None, K, b, dt, act, starts, ends, part, xp, gp, rows)


def state_points(u, K, b, dt, act, positions, out):
    """``out[k]`` = step ``positions[k]`` of :func:`state_runs` applied to
    ``u[positions[k] - 1]``."""
    xp, _, rows, _ = _level_scratch(u)
    _state_points(u, K, b, dt, act, positions, out, xp, rows)


def adjoint_points(u, X, K, b, dt, act, positions, out, D=None):
    """``out[k]`` = step ``positions[k]`` of :func:`adjoint_runs` applied to
    ``u[positions[k] - 1]``."""
    xp, gp, rows, part = _level_scratch(u)
    _adjoint_points(u, X, X if D is None else D, D is not None, K, b, dt, act, positions, out,
                    part, xp, gp, rows)


def hamiltonian(x, p, K, b, h, act):
    """See :func:`ptoc.kernels.conv_reference.hamiltonian`."""
    return float(np.vdot(p, layer(x, K, b, h, act, True, np.empty_like(x), None)))


def hamiltonian_grad(x, p, K, b, h, act, gK, gb):
    """See :func:`ptoc.kernels.conv_reference.hamiltonian_grad`."""
    adjoint(x, p, K, b, h, act, None, gK, gb)
