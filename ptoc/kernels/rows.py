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

#: Without fast-math flags, and saying so: Numba compiles a function that sets no
#: ``fastmath`` of its own with the flags of the compiled caller that first calls it, and
#: keeps that code for every later call (the kernels of :mod:`ptoc.kernels.cpu` call
#: :func:`correct_row` and the sums below, and are compiled with fast-math flags).
_njit = functools.partial(_cache.njit, error_model="numpy", fastmath=False)


@_njit()
def correct_row(dst, a, b):
    """``dst += a - b`` on flat rows, as written: ``dst + (a - b)`` (compiled without
    fast-math flags, wherever it is called)."""
    for t in range(dst.size):
        dst[t] = dst[t] + (a[t] - b[t])


@_njit(parallel=True)
def _correct(u, c, uc, v, cc):
    for r in prange(len(c)):
        correct_row(u[c[r]].ravel(), uc[cc[r]].ravel(), v[cc[r]].ravel())


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


@_njit(fastmath={"reassoc"})
def sumsq_row(x, y):
    """``sum((x - y)**2)`` of two flat rows. Compiled with the one fast-math flag
    ``reassoc``, so that LLVM may split the sum into vector lanes and add those at the
    end, in an order it fixes when it compiles this function: 24 ns for 512 entries
    against 130 for the sum in written order (scalar: each addition waits for the one
    before), or for eight interleaved scalar sums. The order is that of this compiled
    function wherever it is called (:func:`sumsq_diff`, and the compiled level passes of
    :mod:`ptoc.kernels.cpu` that form the same sums while the rows are in the cache), on
    any number of threads; the products are not contracted into fused multiply-adds."""
    s = 0.0
    for t in range(x.size):
        e = x[t] - y[t]
        s += e * e
    return s


@_njit()
def sum_in_order(part):
    """``part[0] + part[1] + ...``, from the first (compiled without fast-math flags,
    wherever it is called): the rows' sums added in an order that does not depend on
    the threads."""
    total = 0.0
    for r in range(len(part)):
        total += part[r]
    return total


@_njit(parallel=True)
def _sumsq_diff(a, ai, b, bi):
    part = np.zeros(len(ai))
    for r in prange(len(ai)):
        part[r] = sumsq_row(a[ai[r]].ravel(), b[bi[r]].ravel())
    return sum_in_order(part)


def sumsq_diff(a, ai, b, bi) -> float:
    """``sum((a[ai] - b[bi])**2)``: each row's sum by :func:`sumsq_row`, then the rows
    added in order; the same bits on any number of threads."""
    if len(ai) == 0:
        return 0.0
    return float(_sumsq_diff(a, ai, b, bi))
