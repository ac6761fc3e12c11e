"""Numba CPU kernels of one convolutional residual layer, parallel over the batch.

The functions of :mod:`ptoc.kernels.conv_reference`, with the same signatures and
equations (theory: :doc:`/theory/conv`), compiled. ``prange`` runs over the samples:
one thread computes a whole sample, its pre-activation held in a buffer of one
sample's size. The convolution loops over the 9 taps ``(u, v)`` and, for each, over
the pixels whose shifted neighbour lies inside the image, so that no branch tests the
padding and the innermost loop (along an image row, over a slice taken beforehand so
that every index counts from 0, see :mod:`ptoc.kernels.cpu`) vectorises.

The activation is :func:`ptoc._maths.activation`, the same per-entry code as the dense
kernels. The kernel gradient is summed per sample into ``(S, C_out, C_in, 3, 3)``
partials which the wrapper adds over the samples with NumPy, in the same order for any
number of threads, so every result is independent of the number of threads. The sums
run in another order than the NumPy reference's; the two agree to round-off
(``tests/test_conv.py`` checks 1e-12).
"""

from __future__ import annotations

import functools

import numpy as np
from numba import prange

from .. import _config, _maths
from . import _cache
from . import cpu as _dense_cpu  # noqa: F401 - registers ptoc._maths.activation as jitable

_jit = functools.partial(_cache.njit, depends_on=(_maths, _config),
                         fastmath=_config.CPU_FASTMATH, error_model="numpy")
_activation = _maths.activation


@_jit()
def _conv_sample(x, K, b, a):
    """``a = conv(x, K) + b`` for one sample: ``x`` (C_in, H, W), ``a`` (C_out, H, W).

    Tap ``(u, v)`` adds ``K[i, j, u, v] x[j, y + u - 1, z + v - 1]`` to ``a[i, y, z]`` for
    the rows ``y`` and columns ``z`` where that pixel lies inside the image.
    """
    H, W = x.shape[1], x.shape[2]
    for i in range(K.shape[0]):
        ai = a[i]
        for y in range(H):
            for z in range(W):
                ai[y, z] = b[i]
        for j in range(K.shape[1]):
            xj = x[j]
            for u in range(3):
                for v in range(3):
                    w = K[i, j, u, v]
                    z0, z1 = max(0, 1 - v), min(W, W + 1 - v)
                    for y in range(max(0, 1 - u), min(H, H + 1 - u)):
                        src = xj[y + u - 1, z0 + v - 1:z1 + v - 1]
                        dst = ai[y, z0:z1]
                        for t in range(z1 - z0):
                            dst[t] += w * src[t]


@_jit()
def _conv_transpose_sample(g, K, out):
    """``out += conv^T(g, K)`` for one sample: each tap sends ``K[i, j, u, v] g[i, y, z]``
    back to the pixel ``(y + u - 1, z + v - 1)`` it read."""
    H, W = g.shape[1], g.shape[2]
    for j in range(K.shape[1]):
        oj = out[j]
        for i in range(K.shape[0]):
            gi = g[i]
            for u in range(3):
                for v in range(3):
                    w = K[i, j, u, v]
                    z0, z1 = max(0, 1 - v), min(W, W + 1 - v)
                    for y in range(max(0, 1 - u), min(H, H + 1 - u)):
                        src = gi[y, z0:z1]
                        dst = oj[y + u - 1, z0 + v - 1:z1 + v - 1]
                        for t in range(z1 - z0):
                            dst[t] += w * src[t]


@_jit()
def _kernel_gradient_sample(x, g, part):
    """``part[i, j, u, v] = sum_{y,z} g[i, y, z] x[j, y + u - 1, z + v - 1]`` for one sample
    (pixels outside the image are zero)."""
    H, W = x.shape[1], x.shape[2]
    for i in range(g.shape[0]):
        gi = g[i]
        for j in range(x.shape[0]):
            xj = x[j]
            for u in range(3):
                for v in range(3):
                    acc = 0.0
                    z0, z1 = max(0, 1 - v), min(W, W + 1 - v)
                    for y in range(max(0, 1 - u), min(H, H + 1 - u)):
                        grow = gi[y, z0:z1]
                        xrow = xj[y + u - 1, z0 + v - 1:z1 + v - 1]
                        for t in range(z1 - z0):
                            acc += grow[t] * xrow[t]
                    part[i, j, u, v] = acc


@_jit(parallel=True)
def _layer(x, K, b, h, act, residual, out, dsig, store):
    """``out = (x if residual else 0) + h sigma(conv(x, K) + b)``, ``sigma'`` into ``dsig``
    when ``store``."""
    for s in prange(x.shape[0]):
        a = np.empty_like(out[s])
        _conv_sample(x[s], K, b, a)
        o = out[s]
        for i in range(a.shape[0]):
            for y in range(a.shape[1]):
                for z in range(a.shape[2]):
                    value, slope = _activation(a[i, y, z], act)
                    o[i, y, z] = (x[s, i, y, z] if residual else 0.0) + h * value
                    if store:
                        dsig[s, i, y, z] = slope


@_jit(parallel=True)
def _adjoint(x, lam, K, b, h, act, out, want_out, part_K, part_b, want_grad):
    """With ``g = sigma'(a) * lam``: ``out = lam + h conv^T(g, K)`` when ``want_out``; the
    per-sample partials ``part_K[s]`` (:func:`_kernel_gradient_sample`) and ``part_b[s, i] =
    sum_{y,z} g[i, y, z]`` when ``want_grad`` (not yet multiplied by ``h``)."""
    for s in prange(x.shape[0]):
        g = np.empty_like(lam[s])
        _conv_sample(x[s], K, b, g)
        for i in range(g.shape[0]):
            for y in range(g.shape[1]):
                for z in range(g.shape[2]):
                    g[i, y, z] = _activation(g[i, y, z], act)[1] * lam[s, i, y, z]
        if want_out:
            o = out[s]
            o[...] = 0.0
            _conv_transpose_sample(g, K, o)
            for j in range(o.shape[0]):
                for y in range(o.shape[1]):
                    for z in range(o.shape[2]):
                        o[j, y, z] = lam[s, j, y, z] + h * o[j, y, z]
        if want_grad:
            _kernel_gradient_sample(x[s], g, part_K[s])
            for i in range(g.shape[0]):
                acc = 0.0
                for y in range(g.shape[1]):
                    for z in range(g.shape[2]):
                        acc += g[i, y, z]
                part_b[s, i] = acc


def layer(x, K, b, h, act, residual, out, dsig):
    """See :func:`ptoc.kernels.conv_reference.layer`."""
    store = dsig is not None
    _layer(x, K, b, h, act, residual, out, dsig if store else out, store)
    return out


def adjoint(x, lam, K, b, h, act, out, gK, gb):
    """See :func:`ptoc.kernels.conv_reference.adjoint`."""
    want_grad = gK is not None
    S = x.shape[0]
    part_K = np.empty((S,) + K.shape if want_grad else (1, 1, 1, 1, 1), dtype=lam.dtype)
    part_b = np.empty((S, K.shape[0]) if want_grad else (1, 1), dtype=lam.dtype)
    _adjoint(x, lam, K, b, h, act, out if out is not None else lam, out is not None, part_K,
             part_b, want_grad)
    if want_grad:
        gK += h * part_K.sum(axis=0)
        gb += h * part_b.sum(axis=0)
    return out


def hamiltonian(x, p, K, b, h, act):
    """See :func:`ptoc.kernels.conv_reference.hamiltonian`."""
    return float(np.vdot(p, layer(x, K, b, h, act, True, np.empty_like(x), None)))


def hamiltonian_grad(x, p, K, b, h, act, gK, gb):
    """See :func:`ptoc.kernels.conv_reference.hamiltonian_grad`."""
    adjoint(x, p, K, b, h, act, None, gK, gb)
