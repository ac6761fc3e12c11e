"""Numba CPU kernels: the maths of :mod:`ptoc._maths`, parallel over the batch.

Same signatures as :mod:`ptoc.kernels.reference`.

Mapping of loops to threads. The batch is cut into consecutive chunks of ``chunk``
samples and ``prange`` runs over the chunks. Inside a chunk, each sample row is
processed with the loops of :mod:`ptoc._maths` interchanged so that the innermost
loop runs along a contiguous row (an ``axpy``): the pre-activation
``a[s, :] = b + sum_j x[s, j] K[:, j]`` uses ``K^T`` rows, the adjoint
``sum_i g[i] K[i, :]`` uses ``K`` rows, and the weight gradient is a rank-1 update
per sample. Each output entry still receives the same terms in the same order as
the element functions (``preactivation``, ``adjoint_entry``,
``gradient_partial_entry``), so with ``PTOC_FASTMATH=0`` the results equal those
functions bit for bit. The gradient of a chunk goes to a private partial sum and
the partials are added in chunk order, so results do not depend on the number of
threads. A sweep over many layers is one compiled call.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange
from numba.extending import register_jitable

from .. import _config, _maths

for _f in _maths.ELEMENT_FUNCTIONS:
    register_jitable(_f)

_opts = {"cache": _config.CACHE, "fastmath": _config.CPU_FASTMATH, "error_model": "numpy"}
_activation = _maths.activation


@njit(**_opts)
def _step_row(x, KT, b, h, act, out, dsig, store, s, a):
    """Row ``s`` of ``out = x + h sigma(x K^T + b)``; ``a`` is scratch of length d."""
    d = x.shape[1]
    for i in range(d):
        a[i] = b[i]
    for j in range(d):
        xj = x[s, j]
        for i in range(d):
            a[i] += KT[j, i] * xj
    for i in range(d):
        sig, dsg = _activation(a[i], act)
        out[s, i] = x[s, i] + h * sig
        if store:
            dsig[s, i] = dsg


@njit(parallel=True, **_opts)
def _step(x, K, b, h, act, out, dsig, store, chunk):
    S, d = x.shape
    KT = np.ascontiguousarray(K.T)
    n_chunks = (S + chunk - 1) // chunk
    for c in prange(n_chunks):
        a = np.empty(d, dtype=x.dtype)
        for s in range(c * chunk, min(S, (c + 1) * chunk)):
            _step_row(x, KT, b, h, act, out, dsig, store, s, a)


@njit(parallel=True, **_opts)
def _adjoint(x, lam, K, b, h, act, dsig, have_dsig, out, want_out, part_K, part_b, want_grad,
             chunk):
    """Adjoint rows into ``out`` and per-chunk gradient partials into ``part_K``, ``part_b``."""
    S, d = x.shape
    n_chunks = (S + chunk - 1) // chunk
    KT = np.ascontiguousarray(K.T)
    for c in prange(n_chunks):
        lo = c * chunk
        hi = min(S, lo + chunk)
        g = np.empty(d, dtype=x.dtype)
        a = np.empty(d, dtype=x.dtype)
        acc = np.empty(d, dtype=x.dtype)
        if want_grad:
            pK = part_K[c]
            pb = part_b[c]
            pK[:, :] = 0.0
            pb[:] = 0.0
        for s in range(lo, hi):
            # g = sigma'(a_s) * lam_s, with a_s recomputed unless sigma' was stored
            if have_dsig:
                for i in range(d):
                    g[i] = dsig[s, i] * lam[s, i]
            else:
                for i in range(d):
                    a[i] = b[i]
                for j in range(d):
                    xj = x[s, j]
                    for i in range(d):
                        a[i] += KT[j, i] * xj
                for i in range(d):
                    g[i] = _activation(a[i], act)[1] * lam[s, i]
            if want_out:
                # out_s = lam_s + h sum_i g_i K[i, :]
                for j in range(d):
                    acc[j] = 0.0
                for i in range(d):
                    gi = g[i]
                    for j in range(d):
                        acc[j] += K[i, j] * gi
                for j in range(d):
                    out[s, j] = lam[s, j] + h * acc[j]
            if want_grad:
                # rank-1 update: the sample-ordered sums of gradient_partial_entry
                for i in range(d):
                    hg = h * g[i]
                    pb[i] += hg
                    for j in range(d):
                        pK[i, j] += hg * x[s, j]


@njit(parallel=True, **_opts)
def _add_partials(part_K, part_b, gK, gb):
    """``gK += sum_c part_K[c]``, ``gb += sum_c part_b[c]``, chunks added in order."""
    n_chunks, d = part_b.shape
    for i in prange(d):
        for c in range(n_chunks):
            gb[i] += part_b[c, i]
            for j in range(d):
                gK[i, j] += part_K[c, i, j]


@njit(**_opts)
def _adjoint_accumulate(x, lam, K, b, h, act, dsig, have_dsig, out, want_out, gK, gb, part_K,
                        part_b, want_grad, chunk):
    _adjoint(x, lam, K, b, h, act, dsig, have_dsig, out, want_out, part_K, part_b, want_grad,
             chunk)
    if want_grad:
        _add_partials(part_K, part_b, gK, gb)


@njit(parallel=True, **_opts)
def _hamiltonian(x, p, K, b, h, act, chunk):
    """``sum_s p_s . (x_s + h sigma(a_s))`` with chunk partials added in order."""
    S, d = x.shape
    KT = np.ascontiguousarray(K.T)
    n_chunks = (S + chunk - 1) // chunk
    part = np.zeros(n_chunks, dtype=x.dtype)
    for c in prange(n_chunks):
        a = np.empty(d, dtype=x.dtype)
        acc = 0.0 * h
        for s in range(c * chunk, min(S, (c + 1) * chunk)):
            for i in range(d):
                a[i] = b[i]
            for j in range(d):
                xj = x[s, j]
                for i in range(d):
                    a[i] += KT[j, i] * xj
            for i in range(d):
                acc += p[s, i] * (x[s, i] + h * _activation(a[i], act)[0])
        part[c] = acc
    total = 0.0 * h
    for c in range(n_chunks):
        total += part[c]
    return total


@njit(**_opts)
def _forward_sweep(states, K, b, h, act, dsig, store, chunk):
    for n in range(K.shape[0]):
        _step(states[n], K[n], b[n], h, act, states[n + 1], dsig[n if store else 0], store,
              chunk)


@njit(**_opts)
def _adjoint_sweep(states, lam_N, K, b, h, act, dsig, have_dsig, gK, gb, lams, keep, chunk):
    N = K.shape[0]
    S, d = lam_N.shape
    n_chunks = (S + chunk - 1) // chunk
    part_K = np.empty((n_chunks, d, d), dtype=lam_N.dtype)
    part_b = np.empty((n_chunks, d), dtype=lam_N.dtype)
    lam = lam_N.copy()
    nxt = np.empty_like(lam)
    if keep:
        lams[N] = lam
    for n in range(N - 1, -1, -1):
        _adjoint_accumulate(states[n], lam, K[n], b[n], h, act, dsig[n if have_dsig else 0],
                            have_dsig, nxt, True, gK[n], gb[n], part_K, part_b, True, chunk)
        lam, nxt = nxt, lam
        if keep:
            lams[n] = lam
    return lam


# Functions with the common signature of kernels.reference ----------------------------------

def _dummy(x: np.ndarray, ndim: int) -> np.ndarray:
    return np.zeros((1,) * ndim, dtype=x.dtype)


def _partials(x: np.ndarray, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    n_chunks = (x.shape[0] + chunk - 1) // chunk
    d = x.shape[1]
    return np.empty((n_chunks, d, d), x.dtype), np.empty((n_chunks, d), x.dtype)


def step(x, K, b, h, act, out, dsig, chunk):
    store = dsig is not None
    _step(x, K, b, x.dtype.type(h), act, out, dsig if store else _dummy(x, 2), store, chunk)
    return out


def adjoint_step(x, lam, K, b, h, act, out, gK, gb, dsig, chunk):
    want_grad = gK is not None
    have = dsig is not None
    pK, pb = _partials(x, chunk) if want_grad else (_dummy(x, 3), _dummy(x, 2))
    _adjoint_accumulate(x, lam, K, b, x.dtype.type(h), act, dsig if have else _dummy(x, 2), have,
                        out, True, gK if want_grad else _dummy(x, 2),
                        gb if want_grad else _dummy(x, 1), pK, pb, want_grad, chunk)
    return out


def param_grad(x, lam, K, b, h, act, gK, gb, dsig, chunk):
    have = dsig is not None
    pK, pb = _partials(x, chunk)
    _adjoint_accumulate(x, lam, K, b, x.dtype.type(h), act, dsig if have else _dummy(x, 2), have,
                        _dummy(x, 2), False, gK, gb, pK, pb, True, chunk)


def hamiltonian(x, p, K, b, h, act, chunk):
    return float(_hamiltonian(x, p, K, b, x.dtype.type(h), act, chunk))


def forward_sweep(states, K, b, h, act, dsig, chunk):
    store = dsig is not None
    _forward_sweep(states, K, b, states.dtype.type(h), act,
                   dsig if store else _dummy(states, 3), store, chunk)


def adjoint_sweep(states, lam_N, K, b, h, act, dsig, gK, gb, lams, chunk):
    have = dsig is not None
    keep = lams is not None
    return _adjoint_sweep(states, lam_N, K, b, states.dtype.type(h), act,
                          dsig if have else _dummy(states, 3), have, gK, gb,
                          lams if keep else _dummy(states, 3), keep, chunk)
