"""Row operations of MGRIT's grid transfers, compiled so that no temporaries are made.

Used by :mod:`ptoc.parallel.mgrit` (theory: :doc:`/theory/mgrit`). Each array holds
one state per row (``a[i]`` is an (S, d) state); index arrays pick rows. These are
memory-bound loops; doing them in NumPy with fancy indexing made several full copies
per call, which cost MGRIT more than its relaxations at small widths. Each function
states the NumPy expression it computes.

They compile from this file alone (they inline nothing from :mod:`ptoc._maths`), and
are cached on disk as every kernel is (:mod:`ptoc.kernels._cache`: keyed on the Numba
settings that change the machine code, old files pruned).
"""

from __future__ import annotations

import functools

import numpy as np
from numba import prange

from . import _cache

_njit = functools.partial(_cache.njit, error_model="numpy")


@_njit(parallel=True)
def _correct(u, c, uc, v, cc):
    for r in prange(len(c)):
        dst, a, b = u[c[r]].ravel(), uc[cc[r]].ravel(), v[cc[r]].ravel()
        for t in range(dst.size):
            dst[t] = dst[t] + (a[t] - b[t])


def correct(u, c, uc, v, cc) -> None:
    """``u[c] += uc[cc] - v[cc]``: the coarse-grid correction at the C-points."""
    _correct(u, c, uc, v, cc)


@_njit(parallel=True)
def _copy_rows(dst, di, src, si):
    for r in prange(len(di)):
        d, s = dst[di[r]].ravel(), src[si[r]].ravel()
        for t in range(d.size):
            d[t] = s[t]


def copy_rows(dst, di, src, si) -> None:
    """``dst[di] = src[si]``."""
    _copy_rows(dst, di, src, si)


@_njit(parallel=True)
def _sumsq_diff(a, ai, b, bi):
    part = np.zeros(len(ai))
    for r in prange(len(ai)):
        x, y = a[ai[r]].ravel(), b[bi[r]].ravel()
        # eight interleaved sums (entry t to sum t mod 8): eight independent chains of
        # additions instead of one, whose latency bounded the loop (4x faster at 512
        # entries); the last size mod 8 entries go to the first sum
        n8 = x.size - x.size % 8
        s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = 0.0
        for t in range(0, n8, 8):
            e0, e1 = x[t] - y[t], x[t + 1] - y[t + 1]
            e2, e3 = x[t + 2] - y[t + 2], x[t + 3] - y[t + 3]
            e4, e5 = x[t + 4] - y[t + 4], x[t + 5] - y[t + 5]
            e6, e7 = x[t + 6] - y[t + 6], x[t + 7] - y[t + 7]
            s0 += e0 * e0
            s1 += e1 * e1
            s2 += e2 * e2
            s3 += e3 * e3
            s4 += e4 * e4
            s5 += e5 * e5
            s6 += e6 * e6
            s7 += e7 * e7
        for t in range(n8, x.size):
            e = x[t] - y[t]
            s0 += e * e
        part[r] = ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))
    total = 0.0
    for r in range(len(ai)):  # rows added in order: reproducible
        total += part[r]
    return total


def sumsq_diff(a, ai, b, bi) -> float:
    """``sum((a[ai] - b[bi])**2)``: each row in eight interleaved sums (entry ``t`` of the
    flattened row to sum ``t mod 8``, the last ``size mod 8`` entries to the first)
    combined pairwise, then the rows added in order; the same bits on any number of
    threads."""
    if len(ai) == 0:
        return 0.0
    return float(_sumsq_diff(a, ai, b, bi))
