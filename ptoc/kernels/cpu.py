"""Numba CPU kernels: the maths of :mod:`ptoc._maths`, parallel over the batch.

Same signatures as :mod:`ptoc.kernels.reference`.

Layout: feature-major tiles
---------------------------
States arrive one sample per row, ``(S, d)``. A *work item* is a run of ``W``
consecutive samples; it is copied, transposed, into a scratch tile of shape
``(d, W)`` (one row per feature, one column per sample), and every inner loop then
runs along a tile row, that is over samples. Those loops have the same length for
every width ``d``, so LLVM vectorises them with full AVX-512/AVX2 vectors whether
``d`` is 4 or 64 (a loop over features of a row-major state would leave most of a
vector empty for small ``d``). The transposes run in 8 x 8 blocks held in vector
registers (:mod:`ptoc.kernels._transpose`), a fraction of a cycle per entry, against
``d`` multiply-adds per entry in each product; at d = 16, S = 32 a layer step's two
transposes out and one in take about 0.1 us of its 0.7 us.

Widths 8 and 16 are the exception for one-thread sweeps: a sample's state is then one
or two vectors of 8 entries, and the sweeps run on the sample-major rows themselves.
The forward sweep (with a batch of whole vectors, :func:`_forward_rows`): the
pre-activation of 8 samples in registers from ``K^T``, the activation in one loop over
the batch's entries, and the states and ``sigma'`` written where they are kept, with no
tile and no transpose; at width 8, batch 16 it takes 28 us where the tiles take 37 (256
layers, storing ``sigma'``). The adjoint sweep with ``sigma'`` stored
(:func:`_adjoint_rows`): ``lambda`` updated by 8 samples at a time in registers, and the
gradient partials from the rows of ``h g`` read through a transposed view; the whole
gradient (both sweeps) at widths 8 and 16, batches 16 to 1024, takes 5 to 25% less time
than with the tile adjoint (``benchmarks/README.md``). Every entry is the same
arithmetic in the same order as in the tiles, so the same bits (tests compare the two).

``prange`` runs over work items. Samples never interact in the forward sweep or in
the adjoint recursion, so a work item keeps its tile in scratch across all layers:
the forward sweep is one parallel loop in total, and the adjoint sweep one parallel
loop per block of layers (see below). Sweeps smaller than
``_config.CPU_PARALLEL_MIN_WORK`` multiply-adds per product run one-thread variants of
these kernels instead (``*_one_thread``: the same helpers on the same work items, so
the same bits), which is all that a small job compiles.

The loops over one work item's tiles, all layers included, are *tile helpers*
(``_tile_jit``), compiled without Numba's reference counting: they take a view per
layer and per tile row, and counting references on each view costs two atomic
operations, which dominated a layer step at small shapes. The parallel kernels
allocate the scratch tiles and hand each work item (or slot) to such a helper.

Sums and their order
--------------------
The activation and its derivative are :func:`ptoc._maths.activation`, called per
entry (a step that keeps no ``sigma'`` uses only its value, :func:`_activate_value_t`,
which gives the same states bit for bit). The sums are the ones :mod:`ptoc._maths`
writes per entry (``preactivation``, ``adjoint_entry``, ``gradient_partial_entry``,
``bias_partial_entry``, which the CUDA kernels call), rewritten as loops over tile
rows, because calling the per-entry functions here costs 8x to 22x in speed (see
:mod:`ptoc._maths`):

* Pre-activation ``a[i] = b[i] + sum_j K[i, j] x[j]`` and the adjoint product
  ``sum_i K[i, j] g[i]`` (:func:`_preact_t`, :func:`_adjoint_lam_t`): the terms are
  added in ascending order, as in ``preactivation`` and ``adjoint_entry``, to an
  accumulator held in a register, in blocks of 4 outputs by 16 samples
  (:mod:`ptoc.kernels._product`, LLVM IR written out, since loops over tile rows
  compiled to several times the cycles of their arithmetic at small shapes).
* Weight gradient ``h sum_s g[s, i] x[s, j]`` (:func:`_partial_t`): summed per chunk
  of ``chunk`` samples, as in ``gradient_partial_entry``, each entry over the chunk's
  samples in order (a product of the tile ``h g`` and the chunk's sample rows of ``x``,
  in register blocks as above). The bias gradient's chunk sum adds the samples in
  eight lanes (sample ``t`` of the chunk in lane ``t % 8``, each lane in order, the
  lanes combined in a fixed tree: :func:`_lane_sum_scaled`), a reassociation of
  ``bias_partial_entry`` written out, so that the sample-major rows can reproduce it
  (LLVM's own vectorised reduction, which the ``reassoc`` flag allowed before, is not
  an order anything else can follow). The chunk partials are then added in chunk
  order, so every result is bitwise independent of the number of threads (the
  work-item width ``W`` and the layer blocks depend on the shapes and ``chunk`` only,
  and change no result).
* With ``PTOC_FASTMATH=0`` nothing is reassociated or contracted, and every result
  equals the element functions of :mod:`ptoc._maths` bit for bit (slowly); the tests
  check this against the CUDA kernels, which call them.

Work items and chunks
---------------------
``W = chunk * group`` with ``group = _config.CPU_LANES // chunk`` halved until there
are at least ``_config.CPU_MIN_ITEMS`` work items (see :func:`_group`): long tile rows
amortise the per-row overhead of the inner loops, but small batches still need
several work items to use every thread. A work item holds whole chunks, and the
gradient partial of each of its chunks is computed separately.

Kernels with no gradient sum (the state steps and sweeps, and the adjoint steps of the
level kernels) may split a chunk: :func:`_state_width` halves ``W`` further, down to
``_config.CPU_MIN_LANES``, while a call would have fewer than ``CPU_MIN_ITEMS`` work
items (a serial sweep of a batch of 32 then runs on two threads). Every sample is
computed by the same instructions whatever its work item, so this changes no bit of
a result (a property the tests check).

The adjoint sweep stores one ``(d, d)`` gradient partial per chunk and layer, so it
processes the layers in blocks of ``L`` layers whose partials fit in
``_config.CPU_PARTIAL_BYTES`` (:func:`_layer_block`); after each block a second
parallel loop adds the partials of its layers, in chunk order, to ``gK`` and ``gb``.
When the batch is a single work item (every chunk in one), that item adds each
chunk's partial to ``gK`` and ``gb`` as soon as it has it, in the same order, and the
sweep is one block with no stored partials (at width 8, batch 32 the second loop
took a fifth of the adjoint sweep).
"""

from __future__ import annotations

import functools

import numba
import numpy as np
from numba import prange
from numba.extending import register_jitable

from .. import _config, _maths
from .._workspace import Workspace
from . import _bits, _cache, _product, _transpose
from . import rows as _rowops
from ._transpose import transpose8, transpose8_times

for _f in _maths.CPU_FUNCTIONS:  # activation and tanh; the sums are the tile loops below
    register_jitable(_f)

#: ``numba.njit`` for this module: its kernels inline ``_maths`` and ``_transpose`` and take
#: their flags from ``_config``, so their disk cache is keyed on those files too
#: (:mod:`ptoc.kernels._cache`).
_jit = functools.partial(_cache.njit, depends_on=(_maths, _config, _product, _transpose, _bits,
                                                  _rowops),
                         fastmath=_config.CPU_FASTMATH, error_model="numpy")
#: ``_jit`` for the tile helpers, the loops over one work item's tiles that the parallel
#: kernels call: compiled without Numba's reference counting (``_nrt=False``). They only
#: take views of arrays that their caller holds (rows of tiles, slices, layers), and with
#: reference counting each view costs an atomic increment and decrement (perf, d = 4,
#: S = 16: the ``lock incq``/``lock decq`` of ``NRT_incref``/``NRT_decref`` were the
#: hottest instructions of a helper called on its own, ``profile_layer_step.py``). Inside
#: the sweeps LLVM had already removed most of them: there the gain is about 5% (d = 16,
#: S = 32, one thread). They must not allocate.
_tile_jit = functools.partial(_jit, _nrt=False)
#: ``_jit`` for the thin tile helpers (a loop and a call or two): inlined into their callers
#: by Numba, so that they add no compiled function of their own. Numba compiles every
#: function into a library of its own and, for each caller, optimises and generates the
#: machine code of everything the caller calls once more; every level of calls repeats
#: the work of the levels below it. Inlining these levels took about 1 s off compiling the
#: adjoint sweep and 0.5 s off the forward sweep (``benchmarks/bench_cold_start.py``),
#: with no change in speed. The large loops (the products, the activation, the gradient
#: partial) stay separate functions: inlined at every call site, they tripled the time.
_thin_jit = functools.partial(_jit, inline="always", _nrt=False)
#: ``_tile_jit`` without fast-math flags, for tile helpers whose loops have no sum to
#: vectorise and must keep the order of every expression (``reassoc`` may turn
#: ``o + (u - p)`` into ``(o + u) - p``, which rounds differently).
_strict_tile_jit = functools.partial(_cache.njit, depends_on=(_maths, _config, _product,
                                                              _transpose, _bits),
                                     fastmath=False, error_model="numpy", _nrt=False)
_activation = _maths.activation
POINT_APPLY, POINT_RESIDUAL = _maths.POINT_APPLY, _maths.POINT_RESIDUAL
POINT_RESIDUAL_G, POINT_TAU = _maths.POINT_RESIDUAL_G, _maths.POINT_TAU
_TANH = _maths.TANH
_RELU = _maths.RELU
_SMOOTHRELU = _maths.SMOOTHRELU

#: Scratch tile rows are ``W + _PAD`` long (eight spare entries, a cache line of float64),
#: so that the rows of the tiles a work item uses together do not all sit at the same
#: offset modulo 4 KiB (measured: up to 20% faster for d = 4 and 8, neutral for d = 64).
_PAD = 8

#: Row length of the scratch tiles of work items of up to ``_TS - _PAD`` samples (every
#: work item unless ``chunk`` or ``CPU_LANES`` exceeds 128). A compile-time constant, so
#: that LLVM sees that the rows of a tile never overlap.
_TS = 128 + _PAD


@_jit()
def _row_len(W):
    """Row length of the scratch tiles of work items of ``W`` samples: ``_TS`` if they fit."""
    return _TS if W + _PAD <= _TS else W + _PAD


# Indexing note: loops index with ``range`` variables counted from 0 and take row
# views (``rows[lo + t]``, ``g[i][t0:t1]``) for offsets, because Numba adds a
# negative-index correction to indices it cannot prove non-negative, and that
# correction stops LLVM from vectorising the loop.


# --- tile helpers (one work item, one layer) ----------------------------------------------

@_tile_jit()
def _load_t(rows, lo, m, tile):
    """Transpose in: ``tile[j, t] = rows[lo + t, j]`` for the ``m`` samples of a work item.

    In 8 x 8 blocks in registers (:func:`ptoc.kernels._transpose.transpose8`) where the
    rows have unit stride, the last ``m % 8`` samples and ``d % 8`` features entry by entry.
    """
    d = rows.shape[1]
    m8 = m - m % 8 if rows.strides[1] == rows.itemsize else 0
    d8 = d - d % 8
    for t0 in range(0, m8, 8):
        for j0 in range(0, d8, 8):
            transpose8(rows, lo + t0, j0, tile, j0, t0)
    for t in range(m8):
        r = rows[lo + t]
        for j in range(d8, d):
            tile[j, t] = r[j]
    for t in range(m8, m):
        r = rows[lo + t]
        for j in range(d):
            tile[j, t] = r[j]


@_tile_jit()
def _load_times_t(rows, lo, m, tile, lam):
    """``tile[j, t] = rows[lo + t, j] * lam[j, t]``: :func:`_load_t` of a stored
    ``sigma'`` with the adjoint's ``g = sigma' * lambda`` formed on the way in
    (:func:`ptoc.kernels._transpose.transpose8_times`; the same one multiplication per
    entry as :func:`_times_t` after :func:`_load_t`)."""
    d = rows.shape[1]
    m8 = m - m % 8 if rows.strides[1] == rows.itemsize else 0
    d8 = d - d % 8
    for t0 in range(0, m8, 8):
        for j0 in range(0, d8, 8):
            transpose8_times(rows, lo + t0, j0, tile, j0, t0, lam)
    for t in range(m8):
        r = rows[lo + t]
        for j in range(d8, d):
            tile[j, t] = r[j] * lam[j, t]
    for t in range(m8, m):
        r = rows[lo + t]
        for j in range(d):
            tile[j, t] = r[j] * lam[j, t]


@_tile_jit()
def _store_t(tile, rows, lo, m):
    """Transpose out: ``rows[lo + t, j] = tile[j, t]`` (8 x 8 blocks as in :func:`_load_t`)."""
    d = rows.shape[1]
    m8 = m - m % 8 if rows.strides[1] == rows.itemsize else 0
    d8 = d - d % 8
    for j0 in range(0, d8, 8):
        for t0 in range(0, m8, 8):
            transpose8(tile, j0, t0, rows, lo + t0, j0)
    for t in range(m8):
        r = rows[lo + t]
        for j in range(d8, d):
            r[j] = tile[j, t]
    for t in range(m8, m):
        r = rows[lo + t]
        for j in range(d):
            r[j] = tile[j, t]


@_tile_jit()
def _preact_t(K, b, x, a, m):
    """``a[i, t] = b[i] + sum_j K[i, j] x[j, t]`` for ``t < m``: the sum of
    ``_maths.preactivation``, in blocks of 4 rows by 16, 8 or 1 samples held in
    registers (:mod:`ptoc.kernels._product`)."""
    R = K.shape[0]
    R4 = R - R % 4
    m16 = m - m % 16
    m8 = m - m % 8
    for t in range(0, m16, 16):
        for r in range(0, R4, 4):
            _product.bias_4x16(K, x, a, r, t, b, 0.0)
        for r in range(R4, R):
            _product.bias_1x16(K, x, a, r, t, b, 0.0)
    for t in range(m16, m8, 8):
        for r in range(0, R4, 4):
            _product.bias_4x8(K, x, a, r, t, b, 0.0)
        for r in range(R4, R):
            _product.bias_1x8(K, x, a, r, t, b, 0.0)
    for t in range(m8, m):
        for r in range(0, R4, 4):
            _product.bias_4x1(K, x, a, r, t, b, 0.0)
        for r in range(R4, R):
            _product.bias_1x1(K, x, a, r, t, b, 0.0)


@_jit(inline="always")
def _activate_code(a, x, h, m, code, slope):
    # ``code`` and ``slope`` are constants at each call site below, so the branches of
    # ``_maths.activation`` fold away (and, without ``slope``, the slope's arithmetic and
    # store) and the loop vectorises.
    for i in range(a.shape[0]):
        ai = a[i]
        xi = x[i]
        for t in range(m):
            sig, dsg = _activation(ai[t], code)
            xi[t] = xi[t] + h * sig
            if slope:
                ai[t] = dsg


@_jit(inline="always")
def _activate_any(a, x, h, act, m, slope):
    # one loop per activation code, each with its code as a constant
    if act == _TANH:
        _activate_code(a, x, h, m, _TANH, slope)
    elif act == _RELU:
        _activate_code(a, x, h, m, _RELU, slope)
    else:
        _activate_code(a, x, h, m, _SMOOTHRELU, slope)


@_tile_jit()
def _activate_t(a, x, h, act, m):
    """The residual step on a tile: ``x <- x + h sigma(a)`` and ``a <- sigma'(a)``."""
    _activate_any(a, x, h, act, m, True)


@_tile_jit()
def _activate_value_t(a, x, h, act, m):
    """``x <- x + h sigma(a)`` on a tile: the step of a sweep that keeps no ``sigma'``
    (the forward solves of MGRIT and parareal, a forward sweep that stores no
    derivatives). The same ``x`` as :func:`_activate_t`, bit for bit, without computing
    and storing ``sigma'`` where ``m`` is a multiple of 8: measured 8% less time for the
    loop at d = 16, S = 32 (its cost is the number of vector operations per entry).
    Otherwise ``a`` gets ``sigma'`` as in :func:`_activate_t`, which this then is: LLVM
    compiles the last ``m % 8`` entries of a row apart from the vectors (in pairs or one
    by one), and there the two loops were measured to round differently (contracted
    differently), while their whole vectors agree."""
    if m % 8 != 0:
        _activate_t(a, x, h, act, m)
    else:
        _activate_any(a, x, h, act, m, False)


@_jit(inline="always")
def _dsigma_code(a, m, code):
    for i in range(a.shape[0]):
        ai = a[i]
        for t in range(m):
            ai[t] = _activation(ai[t], code)[1]


@_tile_jit()
def _dsigma_t(a, act, m):
    """``a <- sigma'(a)`` on a tile (one loop per activation code, as above)."""
    if act == _TANH:
        _dsigma_code(a, m, _TANH)
    elif act == _RELU:
        _dsigma_code(a, m, _RELU)
    else:
        _dsigma_code(a, m, _SMOOTHRELU)


#: Whether the bias partials sum over samples in eight interleaved lanes
#: (:func:`_lane_sum_scaled`); without ``reassoc`` in the kernels' fast-math flags they
#: add the samples one after the other, as ``_maths.bias_partial_entry`` does.
_LANE_SUMS = _config.CPU_FASTMATH is True or (
    isinstance(_config.CPU_FASTMATH, (set, frozenset)) and "reassoc" in _config.CPU_FASTMATH)


@_thin_jit()
def _lane_sum_scaled(x, h):
    """``x <- h x`` on a row of samples, and the sum of the scaled entries (as stored) in
    a fixed order: entry ``t`` goes to lane ``t % 8``, each lane adds its entries in
    order, in float64, and the lanes are added as
    ``((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7))``.

    The lanes are one vector (:func:`ptoc.kernels._product.lane_sum_scaled`, whose
    arithmetic keeps its order inside fast-math kernels, so this is inlined into the
    tile loops: a call per tile row cost up to a tenth of the adjoint sweep at d = 8,
    S = 256 on two threads). The sample-major rows compute the same sums feature by
    feature (:func:`_scale_and_bias_rows`), so the two layouts give the same bits."""
    return _product.lane_sum_scaled(x, h)


@_strict_tile_jit()
def _sum_scaled_in_order(x, h):
    """:func:`_lane_sum_scaled` with the entries added one after the other, as
    ``_maths.bias_partial_entry`` adds them (without ``_LANE_SUMS``)."""
    acc = 0.0 * h
    for t in range(x.shape[0]):
        x[t] = h * x[t]
        acc = acc + x[t]
    return acc


@_thin_jit()
def _scale_and_bias_t(g, h, pb, t0, t1):
    """``g[:, t0:t1] *= h`` and the bias partial ``pb[i] = sum_t h g[i, t]``, each row's
    sum in the order of :func:`_lane_sum_scaled` (see the module docstring), or in
    sample order without ``_LANE_SUMS``. The choice is made here, in a function compiled
    with the kernels' flags (part of the key of Numba's disk cache), not in the two
    strict functions, whose cached code would otherwise serve either setting."""
    for i in range(g.shape[0]):
        if _LANE_SUMS:
            pb[i] = _lane_sum_scaled(g[i][t0:t1], h)
        else:
            pb[i] = _sum_scaled_in_order(g[i][t0:t1], h)


@_tile_jit()
def _partial_t(g, rows, lo, h, pK, pb, t0, t1):
    """One chunk's gradient partial from tile columns ``t0:t1``; scales ``g`` by ``h`` there.

    ``pb[i] = sum_t h g[i, t]`` and ``pK[i, j] = sum_t (h g[i, t]) x[j, t]``, the sums of
    ``_maths.bias_partial_entry`` and ``gradient_partial_entry`` over the chunk's
    samples. ``x`` is read from the sample rows ``rows[lo + t]`` (the state the tile was
    loaded from): ``pK`` is then the product of ``h g`` and those rows, in blocks of 8
    or 4 rows ``i`` by 16, 8, 4 or 1 columns ``j`` held in registers
    (:mod:`ptoc.kernels._product`), each entry summed over the samples in order, as
    ``gradient_partial_entry`` sums them.
    """
    _scale_and_bias_t(g, h, pb, t0, t1)
    _partial_blocks_zero(g[:, t0:t1], rows[lo + t0:lo + t1], pK, pb, h)


@_thin_jit()
def _partial_blocks_zero(gm, xr, pK, pb, h):
    """``pK = gm @ xr`` in register blocks (rows ``i`` in blocks of 8, 4 and 1; columns
    ``j`` in blocks of 16, 8, 4 and 1). The blocks of 4 or more columns load whole vectors
    of a sample row, so they need its entries adjacent; otherwise every column goes one
    at a time (the same sums). ``pb`` and ``h`` are the blocks' unused arguments."""
    d = gm.shape[0]
    d4 = d - d % 4
    d8 = d - d % 8
    unit = xr.strides[1] == xr.itemsize
    c4 = d4 if unit else 0
    c8 = d8 if unit else 0
    c16 = d - d % 16 if unit else 0
    for j in range(0, c16, 16):
        for i in range(0, d4, 4):
            _product.zero_4x16(gm, xr, pK, i, j, pb, h)
        for i in range(d4, d):
            _product.zero_1x16(gm, xr, pK, i, j, pb, h)
    for j in range(c16, c8, 8):
        # eight rows at a time: eight accumulators, enough to hide the latency of the
        # multiply-adds (four, with one vector of columns, wait on each other)
        for i in range(0, d8, 8):
            _product.zero_8x8(gm, xr, pK, i, j, pb, h)
        for i in range(d8, d4, 4):
            _product.zero_4x8(gm, xr, pK, i, j, pb, h)
        for i in range(d4, d):
            _product.zero_1x8(gm, xr, pK, i, j, pb, h)
    for j in range(c8, c4, 4):
        for i in range(0, d4, 4):
            _product.zero_4x4(gm, xr, pK, i, j, pb, h)
        for i in range(d4, d):
            _product.zero_1x4(gm, xr, pK, i, j, pb, h)
    for j in range(c4, d):
        for i in range(0, d4, 4):
            _product.zero_4x1(gm, xr, pK, i, j, pb, h)
        for i in range(d4, d):
            _product.zero_1x1(gm, xr, pK, i, j, pb, h)


@_tile_jit()
def _add_partial_into(pK_flat, pb, gK_flat, gb):
    """``gK += pK``, ``gb += pb`` (one layer, one chunk), the ``(d, d)`` arrays as flat
    rows of ``d^2`` (:func:`_adjoint_block` makes those views): one loop instead of one
    per row, each of which checks its arrays for overlap (measured on its own: 9.5 ns
    against 15 at d = 8, 23 against 29 at d = 16)."""
    for i in range(pb.shape[0]):
        gb[i] += pb[i]
    for i in range(pK_flat.shape[0]):
        gK_flat[i] += pK_flat[i]


@_thin_jit()
def _adjoint_g_t(K, b, act, x, lam, g, m):
    """``g <- sigma'(a) * lam`` on a tile, ``a = K x + b``, with ``sigma'(a)`` computed
    from the state tile ``x``: the first half of one adjoint step that recomputes it,
    shared by the adjoint sweep without stored derivatives and the gradient kernels.
    With ``sigma'`` stored, :func:`_load_times_t` forms ``g`` as it loads it (the same
    multiplication)."""
    _preact_t(K, b, x, g, m)
    _dsigma_t(g, act, m)
    _times_t(g, lam, m)


@_thin_jit()
def _times_t(g, lam, m):
    """``g <- g * lam`` on a tile (``g = sigma'(a) * lambda`` once ``g`` holds ``sigma'``)."""
    for i in range(g.shape[0]):
        gi = g[i]
        li = lam[i]
        for t in range(m):
            gi[t] = gi[t] * li[t]


@_tile_jit()
def _adjoint_lam_t(Kt, h, g, lam, m):
    """``lam[j, t] <- lam[j, t] + h sum_i K[i, j] g[i, t]`` for ``t < m``, with ``Kt`` the
    view ``K.T`` (no copy: the blocks load its entries one by one, whatever the strides).

    The second half of one adjoint step: the sum of ``_maths.adjoint_entry``, its terms
    in ascending ``i``, added to ``lam`` after the sum is complete, in blocks of 4 rows
    by 16, 8 or 1 samples held in registers (:mod:`ptoc.kernels._product`). Reading
    ``K`` through the view costs nothing over a transposed copy, and the sweeps once
    spent a tenth of an adjoint layer at d = 8 to 16 on making those copies in NumPy.
    """
    R = Kt.shape[0]
    R4 = R - R % 4
    m16 = m - m % 16
    m8 = m - m % 8
    unused = lam[0]  # the blocks' bias argument, which this mode does not read
    for t in range(0, m16, 16):
        for r in range(0, R4, 4):
            _product.add_4x16(Kt, g, lam, r, t, unused, h)
        for r in range(R4, R):
            _product.add_1x16(Kt, g, lam, r, t, unused, h)
    for t in range(m16, m8, 8):
        for r in range(0, R4, 4):
            _product.add_4x8(Kt, g, lam, r, t, unused, h)
        for r in range(R4, R):
            _product.add_1x8(Kt, g, lam, r, t, unused, h)
    for t in range(m8, m):
        for r in range(0, R4, 4):
            _product.add_4x1(Kt, g, lam, r, t, unused, h)
        for r in range(R4, R):
            _product.add_1x1(Kt, g, lam, r, t, unused, h)


# --- widths 8 and 16: the forward sweep on sample-major rows -------------------------------

@_tile_jit()
def _preact_rows(K, b, xin, KT, a, m):
    """``a[s, i] = b[i] + sum_j K[i, j] xin[s, j]`` for the ``m`` samples of sample-major
    rows of width ``d`` = 8 or 16, with ``K^T`` formed in ``KT`` (d x d scratch): blocks
    of 8 samples by all ``d`` features in registers
    (:data:`ptoc.kernels._product.BIAS_COLS`), each entry the chain of
    :func:`_preact_t`, in the same order."""
    d = K.shape[0]
    for i0 in range(0, d, 8):
        for j0 in range(0, d, 8):
            transpose8(K, i0, j0, KT, j0, i0)
    m8 = m - m % 8
    if d == 8:
        for s in range(0, m8, 8):
            _product.bias_cols_8x8(xin, KT, a, s, 0, b, 0.0)
        for s in range(m8, m):
            _product.bias_cols_1x8(xin, KT, a, s, 0, b, 0.0)
    else:
        for s in range(0, m8, 8):
            _product.bias_cols_8x16(xin, KT, a, s, 0, b, 0.0)
        for s in range(m8, m):
            _product.bias_cols_1x16(xin, KT, a, s, 0, b, 0.0)


@_jit(inline="always")
def _activate_rows_code(a, xin, xout, h, code, slope):
    # the loop of _activate_code over flat rows, ``xout = xin + h sigma(a)``: the tile
    # version updates its tile in place, and one loop for both would make LLVM check at
    # run time whether they overlap (and, in place, take its scalar path)
    for t in range(a.shape[0]):
        sig, dsg = _activation(a[t], code)
        xout[t] = xin[t] + h * sig
        if slope:
            a[t] = dsg


@_jit(inline="always")
def _activate_rows_any(a, xin, xout, h, act, slope):
    # as _activate_any: one loop per activation code, each with its code as a constant
    if act == _TANH:
        _activate_rows_code(a, xin, xout, h, _TANH, slope)
    elif act == _RELU:
        _activate_rows_code(a, xin, xout, h, _RELU, slope)
    else:
        _activate_rows_code(a, xin, xout, h, _SMOOTHRELU, slope)


@_tile_jit()
def _activate_rows_t(a, xin, xout, h, act):
    """``xout = xin + h sigma(a)`` and ``a <- sigma'(a)`` over flat sample-major rows: the
    same per-entry arithmetic as :func:`_activate_t` on whole vectors."""
    _activate_rows_any(a, xin, xout, h, act, True)


@_tile_jit()
def _activate_rows_value_t(a, xin, xout, h, act):
    """``xout = xin + h sigma(a)`` over flat sample-major rows: :func:`_activate_value_t`
    on whole vectors (a function of its own, so that the level kernels, which keep no
    ``sigma'``, compile no loop that stores it)."""
    _activate_rows_any(a, xin, xout, h, act, False)


@_tile_jit()
def _forward_rows(x0, K, b, h, act, outs, dsig, store, KT, a, x0f, outsf, dsigf, af):
    """The layers of :func:`_forward` at width 8 or 16 on the sample-major rows themselves:
    ``outs[n]`` (and ``dsig[n]``, which receives the pre-activation first) are written
    where they are kept, with no tiles and no transposes (``x0f``, ``outsf``, ``dsigf``,
    ``af``: the same arrays flat)."""
    S = x0.shape[0]
    for n in range(K.shape[0]):
        xin = x0 if n == 0 else outs[n - 1]
        xinf = x0f if n == 0 else outsf[n - 1]
        if store:
            _preact_rows(K[n], b[n], xin, KT, dsig[n], S)
            _activate_rows_t(dsigf[n], xinf, outsf[n], h, act)
        else:
            _preact_rows(K[n], b[n], xin, KT, a, S)
            _activate_rows_value_t(af, xinf, outsf[n], h, act)


@_jit()
def _forward_rows_one_thread(x0, K, b, h, act, outs, dsig, store):
    """:func:`_forward_one_thread` for width 8 or 16 and ``S % 8 == 0``, C-ordered arrays and
    unit-stride rows of ``K`` and ``b`` (:func:`_rows_path`): the same bits, without
    the transposes of the tiles (:func:`_forward_rows`)."""
    S, d = x0.shape
    KT = np.empty((d, d), x0.dtype)
    a = np.empty((S, d), x0.dtype)
    _forward_rows(x0, K, b, h, act, outs, dsig, store, KT, a, x0.reshape(S * d),
                  outs.reshape((outs.shape[0], S * d)),
                  dsig.reshape((dsig.shape[0], dsig.shape[1] * dsig.shape[2])),
                  a.reshape(S * d))


# --- sweeps (the compiled kernels) -----------------------------------------------------------

@_tile_jit()
def _forward_item(x0, K, b, h, act, outs, dsig, store, lo, m, x, a):
    """All layers of :func:`_forward` for the work item of samples ``lo .. lo+m-1``, its
    state in tile ``x`` throughout (``a`` is scratch). A tile helper, so that the layer
    and row views it takes per layer cost no reference counting."""
    _load_t(x0, lo, m, x)
    for n in range(K.shape[0]):
        _preact_t(K[n], b[n], x, a, m)
        if store:
            _activate_t(a, x, h, act, m)
            _store_t(x, outs[n], lo, m)
            _store_t(a, dsig[n], lo, m)
        else:
            _activate_value_t(a, x, h, act, m)
            _store_t(x, outs[n], lo, m)


@_jit(parallel=True)
def _forward(x0, K, b, h, act, outs, dsig, store, W):
    """``outs[n] = x_{n+1}`` for ``n < N`` from ``x_0 = x0``; ``dsig[n] = sigma'(a_n)`` if store.

    ``K`` (N, d, d), ``b`` (N, d), ``outs`` and ``dsig`` (N, S, d); ``W`` samples per
    work item.
    """
    S, d = x0.shape
    n_items = (S + W - 1) // W
    x_tiles = np.empty((n_items, d, _row_len(W)), x0.dtype)
    a_tiles = np.empty((n_items, d, _row_len(W)), x0.dtype)
    for w in prange(n_items):
        lo = w * W
        _forward_item(x0, K, b, h, act, outs, dsig, store, lo, min(S, lo + W) - lo,
                      x_tiles[w], a_tiles[w])


@_jit()
def _forward_one_thread(x0, K, b, h, act, outs, dsig, store, W):
    """:func:`_forward` on the calling thread (the work items in turn): for sweeps too
    small to gain from threads (:func:`_threaded`), and no parallel loop to compile."""
    S, d = x0.shape
    n_items = (S + W - 1) // W
    x = np.empty((d, _row_len(W)), x0.dtype)
    a = np.empty((d, _row_len(W)), x0.dtype)
    for w in range(n_items):
        lo = w * W
        _forward_item(x0, K, b, h, act, outs, dsig, store, lo, min(S, lo + W) - lo, x, a)


@_tile_jit()
def _adjoint_item(xs, lam_N, K, b, h, act, dsig, have_dsig, n0, n1, lam, x, g, part_K,
                  part_K_flat, part_b, want_grad, lams, keep, lam_out, want_out, chunk, group,
                  w, gK_flat, gb, direct):
    """Layers ``n1-1`` down to ``n0`` of :func:`_adjoint_block` for work item ``w``, its
    ``lambda`` in tile ``lam`` (a tile helper: no reference counting of its views).

    With ``direct`` (the caller's only work item holds every chunk) each chunk's partial
    goes through ``part_K[c, 0]``, ``part_b[c, 0]`` straight into ``gK[n]``, ``gb[n]``,
    chunk after chunk: the additions of :func:`_add_partials`, in its order. (Adding each
    finished sum as its register block is stored was 4% faster at d = 8, S = 16 but took
    1.3 s more to compile.)"""
    N = K.shape[0]
    S = lam_N.shape[0]
    W = chunk * group
    n_chunks = (S + chunk - 1) // chunk
    lo = w * W
    m = min(S, lo + W) - lo
    if n1 == N:
        _load_t(lam_N, lo, m, lam)
    for n in range(n1 - 1, n0 - 1, -1):
        # g = sigma'(a_n) * lambda_{n+1}, with a_n recomputed unless sigma' was stored (the
        # gradient partial reads x_n from its rows, not from the tile)
        if have_dsig:
            _load_times_t(dsig[n], lo, m, g, lam)
        else:
            _load_t(xs[n], lo, m, x)
            _adjoint_g_t(K[n], b[n], act, x, lam, g, m)
        if want_out:
            # lambda_n = lambda_{n+1} + h sum_i K[i, :] g[i]
            _adjoint_lam_t(K[n].T, h, g, lam, m)
            if keep:
                _store_t(lam, lams[n], lo, m)
        if want_grad:
            # one partial per chunk of this work item (scales g by h)
            for c in range(w * group, min(n_chunks, (w + 1) * group)):
                t0 = c * chunk - lo
                t1 = min(S, (c + 1) * chunk) - lo
                slot = 0 if direct else n - n0
                _partial_t(g, xs[n], lo, h, part_K[c, slot], part_b[c, slot], t0, t1)
                if direct:
                    _add_partial_into(part_K_flat[c, 0], part_b[c, 0], gK_flat[n], gb[n])
    if n0 == 0 and want_out:
        _store_t(lam, lam_out, lo, m)


@_jit(inline="always")
def _flat_partials(part_K, gK):
    """``part_K`` (chunks, layers, d, d) and ``gK`` (N, d, d), C-ordered, with each
    ``(d, d)`` matrix as a flat row (views, for :func:`_add_partial_into`)."""
    return (part_K.reshape((part_K.shape[0], part_K.shape[1], part_K.shape[2] * part_K.shape[3])),
            gK.reshape((gK.shape[0], gK.shape[1] * gK.shape[2])))


@_jit(parallel=True)
def _adjoint_block(xs, lam_N, K, b, h, act, dsig, have_dsig, n0, n1, lam_tiles, x_tiles,
                   g_tiles, part_K, part_b, want_grad, lams, keep, lam_out, want_out,
                   chunk, group, gK, gb, direct):
    """Layers ``n1-1`` down to ``n0`` of the adjoint sweep for every work item.

    The tile ``lam_tiles[w]`` holds ``lambda`` of work item ``w`` between blocks; it is
    loaded from ``lam_N`` in the first block and stored to ``lam_out`` in the last.
    Chunk ``c`` writes its gradient partial of layer ``n`` to ``part_K[c, n - n0]`` and
    ``part_b[c, n - n0]``.
    """
    n_items = lam_tiles.shape[0]
    part_K_flat, gK_flat = _flat_partials(part_K, gK)
    for w in prange(n_items):
        # np.int64: Numba types a prange index over a shape as unsigned in the parallel
        # body and as signed elsewhere, and would compile the helper for both
        _adjoint_item(xs, lam_N, K, b, h, act, dsig, have_dsig, n0, n1, lam_tiles[w],
                      x_tiles[w], g_tiles[w], part_K, part_K_flat, part_b, want_grad, lams,
                      keep, lam_out, want_out, chunk, group, np.int64(w), gK_flat, gb, direct)


@_jit()
def _adjoint_block_one_thread(xs, lam_N, K, b, h, act, dsig, have_dsig, n0, n1, lam_tiles,
                              x_tiles, g_tiles, part_K, part_b, want_grad, lams, keep, lam_out,
                              want_out, chunk, group, gK, gb, direct):
    """:func:`_adjoint_block` on the calling thread (see :func:`_forward_one_thread`)."""
    part_K_flat, gK_flat = _flat_partials(part_K, gK)
    for w in range(lam_tiles.shape[0]):
        _adjoint_item(xs, lam_N, K, b, h, act, dsig, have_dsig, n0, n1, lam_tiles[w],
                      x_tiles[w], g_tiles[w], part_K, part_K_flat, part_b, want_grad, lams,
                      keep, lam_out, want_out, chunk, group, w, gK_flat, gb, direct)


@_jit(parallel=True)
def _add_partials(part_K, part_b, gK, gb, n0, n1):
    """``gK[n] += part_K[0, n - n0]``, then ``part_K[1, n - n0]``, ...: chunks in order.

    The same for ``gb`` with ``part_b``, for layers ``n0 <= n < n1``; the rows
    ``(n, i)`` run in parallel (a block may hold a single layer).
    """
    n_chunks, _, d, _ = part_K.shape
    for q in prange((n1 - n0) * d):
        _add_partial_row(part_K, part_b, gK, gb, n0, q // d, q % d)


@_jit()
def _add_partials_one_thread(part_K, part_b, gK, gb, n0, n1):
    """:func:`_add_partials` on the calling thread (see :func:`_forward_one_thread`)."""
    d = part_K.shape[2]
    for q in range((n1 - n0) * d):
        _add_partial_row(part_K, part_b, gK, gb, n0, q // d, q % d)


@_thin_jit()
def _add_partial_row(part_K, part_b, gK, gb, n0, l, i):
    """Row ``i`` of layer ``n0 + l`` of :func:`_add_partials` (indexed entry by entry: a
    view per row would cost more than the row's additions at small widths)."""
    n = n0 + l
    for c in range(part_K.shape[0]):
        gb[n, i] += part_b[c, l, i]
        for j in range(part_K.shape[3]):
            gK[n, i, j] += part_K[c, l, i, j]


@_jit(parallel=True)
def _hamiltonian(x, p, K, b, h, act, chunk):
    """``sum_s p_s . (x_s + h sigma(a_s))``: one partial per chunk, partials added in order."""
    S, d = x.shape
    n_chunks = (S + chunk - 1) // chunk
    x_tiles = np.empty((n_chunks, d, _row_len(chunk)), x.dtype)
    a_tiles = np.empty((n_chunks, d, _row_len(chunk)), x.dtype)
    part = np.zeros(n_chunks, dtype=x.dtype)
    for c in prange(n_chunks):
        lo = c * chunk
        m = min(S, lo + chunk) - lo
        phi = x_tiles[c]
        a = a_tiles[c]
        _load_t(x, lo, m, phi)
        _preact_t(K, b, phi, a, m)
        _activate_value_t(a, phi, h, act, m)
        # samples in order, features in order within a sample
        acc = 0.0 * h
        for t in range(m):
            pt = p[lo + t]
            for i in range(d):
                acc += pt[i] * phi[i, t]
        part[c] = acc
    total = 0.0 * h
    for c in range(n_chunks):
        total += part[c]
    return total



# --- level kernels: many steps of one MGRIT/parareal level in one call ---------------------
#
# Same contract as in kernels.reference: ``u`` (n, S, d) holds consecutive positions of one
# level and the step producing position ``k`` has weights ``K[k]``, ``b[k]``, size ``dt[k]``
# (and linearisation state ``X[k]`` for the adjoint). The runs (or points) are independent
# and run in parallel, each work item of samples keeping its tile across a run's steps; the
# arithmetic of each step is that of the sweeps above, bit for bit.

@_jit(inline="always")
def _flat(a):
    """A C-contiguous ``(n, S, d)`` array as ``n`` flat rows of ``S * d`` (a view, made by
    the parallel kernels: the tile helpers run without reference counting and cannot
    make one). A loop over the ``m * d`` entries of ``m`` consecutive samples is then
    one loop: over the ``m`` rows of ``d`` one by one it took 2.5 times as long at
    d = 16 (each short row loop checks its arrays for overlap and handles a remainder)."""
    return a.reshape((a.shape[0], a.shape[1] * a.shape[2]))


@_jit(inline="always")
def _rows_of(tile):
    """The memory of a scratch tile ``(d, row_len)`` seen as ``row_len`` rows of ``d``
    (a view, made by the parallel kernels as :func:`_flat`)."""
    return tile.reshape((tile.shape[1], tile.shape[0]))


@_thin_jit()
def _store_add_t(tile, g_flat, has_g, rows, rows_flat, lo, m):
    """``tile[j, t] += g[lo + t, j]`` if ``has_g``, then transpose out,
    ``rows[lo + t, j] = tile[j, t]``: the end of a level step (``rows_flat`` and
    ``g_flat``: the step's rows, and those of ``g``, as flat arrays, :func:`_flat`). With
    ``g`` the sum is formed in the rows (one addition per entry, in one flat loop) and
    read back into the tile: two block transposes cost less than one pass of strided
    scalar updates."""
    _store_t(tile, rows, lo, m)
    if has_g:
        d = rows.shape[1]
        n = m * d
        r = rows_flat[lo * d:lo * d + n]
        gr = g_flat[lo * d:lo * d + n]
        for i in range(n):
            r[i] = r[i] + gr[i]
        _load_t(rows, lo, m, tile)


@_jit()
def _slot_tasks(p, n_slots, n_tasks):
    """Tasks ``lo .. hi-1`` of slot ``p`` when ``n_tasks`` are shared by ``n_slots`` slots in
    contiguous, nearly equal ranges."""
    return p * n_tasks // n_slots, (p + 1) * n_tasks // n_slots


@_tile_jit()
def _state_runs_slot(u, uf, gf, has_g, K, b, dt, act, starts, ends, W, x, a, q0, q1):
    """Tasks ``q0 .. q1-1`` of :func:`_state_runs` on one slot's tiles ``x``, ``a``
    (``uf``, ``gf``: ``u`` and ``g`` as flat rows, :func:`_flat`)."""
    S = u.shape[1]
    n_items = (S + W - 1) // W
    for q in range(q0, q1):
        r = q // n_items
        lo = (q % n_items) * W
        m = min(S, lo + W) - lo
        _load_t(u[starts[r] - 1], lo, m, x)
        for k in range(starts[r], ends[r] + 1):
            _preact_t(K[k], b[k], x, a, m)
            _activate_value_t(a, x, dt[k], act, m)
            _store_add_t(x, gf[k], has_g, u[k], uf[k], lo, m)


@_jit(parallel=True)
def _state_runs(u, g, has_g, K, b, dt, act, starts, ends, W, tiles):
    """Runs of state steps. Task ``q`` is run ``q // n_items`` on work item ``q % n_items``;
    the tasks are shared by the slots of ``tiles`` (one scratch pair per slot, reused
    by the slot's tasks), so the call allocates nothing."""
    n, S, d = u.shape
    n_items = (S + W - 1) // W
    n_tasks = len(starts) * n_items
    n_slots = tiles.shape[0]
    for p in prange(n_slots):
        q0, q1 = _slot_tasks(np.int64(p), n_slots, n_tasks)
        _state_runs_slot(u, _flat(u), _flat(g), has_g, K, b, dt, act, starts, ends, W,
                         tiles[p, 0], tiles[p, 1], q0, q1)


@_strict_tile_jit()
def _point_end_t(x, phi, phi_flat, uf, gf, out, outf, r, rows, k, mode, lo, m):
    """The end of a point step, with ``phi`` on the tile ``x``:

    * ``POINT_APPLY``: ``out[r] = phi``;
    * ``POINT_RESIDUAL``: ``out[rows[r]] = phi - u[k]``;
    * ``POINT_RESIDUAL_G``: ``out[rows[r]] = g[k] + (phi - u[k])``;
    * ``POINT_TAU``: ``out[rows[r]] = out[rows[r]] + (u[k] - phi)``.

    The last three give MGRIT's FAS right-hand side
    ``(g_k + (Phi(u_{k-1}) - u_k)) + (v_k - Phi_c(v_{k-1}))`` in two point calls, one per
    level (:meth:`ptoc.propagator.LevelSteps.points_residual` and ``points_tau``),
    formed while the step's value is in the cache, instead of storing both step values
    and summing them in a pass of their own over six arrays. ``phi`` is transposed out
    once, into scratch rows (``phi``, and ``phi_flat`` the same memory flat: that of a
    tile that is free by then), and the sum is one flat loop over the rows of the work
    item's samples, where ``u``, ``g`` and ``out`` are stored (``uf``, ``gf``, ``outf``:
    :func:`_flat`). Transposing those into tiles instead, as before, cost two or three
    transposes and passes more per point: a point of the restriction at d = 16, S = 32
    on one thread took 0.78 to 0.81 us that way against 0.58 per step of a relaxation
    run, and takes 0.65 to 0.74 this way against 0.54 to 0.56 (``profile_mgrit.py``;
    the rest is the transpose in of the state it starts from).
    Each entry is the same sum in the same order either way (compiled without fast-math
    flags, so that LLVM cannot reassociate it); the modes are
    :data:`ptoc._maths.POINT_APPLY` and the next three.
    """
    if mode == POINT_APPLY:
        _store_t(x, out[r], lo, m)
        return
    d = x.shape[0]
    n = m * d
    _store_t(x, phi, 0, m)
    _point_sum(phi_flat[:n], outf[rows[r]][lo * d:lo * d + n], uf[k][lo * d:lo * d + n],
               gf[k][lo * d:lo * d + n] if mode == POINT_RESIDUAL_G else phi_flat[:n], mode)


@_strict_tile_jit()
def _point_sum(p, dst, uk, gk, mode):
    """The FAS sums of a point step's value ``p`` into ``dst`` (flat, one work item's
    entries), for the modes of :func:`_point_end_t` other than ``POINT_APPLY``; compiled
    without fast-math flags, so that each entry is the sum as written, in its order."""
    n = p.shape[0]
    if mode == POINT_TAU:
        for i in range(n):
            dst[i] = dst[i] + (uk[i] - p[i])
    elif mode == POINT_RESIDUAL_G:
        for i in range(n):
            dst[i] = gk[i] + (p[i] - uk[i])
    else:
        for i in range(n):
            dst[i] = p[i] - uk[i]


@_tile_jit()
def _state_points_slot(u, uf, K, b, dt, act, positions, out, outf, rows, gf, mode, W, x, a,
                       a_rows, a_flat, q0, q1):
    """Tasks ``q0 .. q1-1`` of :func:`_state_points` on one slot's tiles ``x``, ``a``
    (``uf``, ``outf``, ``gf``: flat rows, :func:`_flat`; ``a_rows``, ``a_flat``: the
    memory of ``a`` as rows of ``d`` and flat, :func:`_rows_of`)."""
    S = u.shape[1]
    n_items = (S + W - 1) // W
    for q in range(q0, q1):
        r = q // n_items
        lo = (q % n_items) * W
        m = min(S, lo + W) - lo
        k = positions[r]
        _load_t(u[k - 1], lo, m, x)
        _preact_t(K[k], b[k], x, a, m)
        _activate_value_t(a, x, dt[k], act, m)
        _point_end_t(x, a_rows, a_flat, uf, gf, out, outf, r, rows, k, mode, lo, m)


@_jit(parallel=True)
def _state_points(u, K, b, dt, act, positions, out, rows, g, mode, W, tiles):
    n, S, d = u.shape
    n_items = (S + W - 1) // W
    n_tasks = len(positions) * n_items
    n_slots = tiles.shape[0]
    for p in prange(n_slots):
        q0, q1 = _slot_tasks(np.int64(p), n_slots, n_tasks)
        a_rows = _rows_of(tiles[p, 1])
        _state_points_slot(u, _flat(u), K, b, dt, act, positions, out, _flat(out), rows,
                           _flat(g), mode, W, tiles[p, 0], tiles[p, 1], a_rows,
                           a_rows.reshape(a_rows.size), q0, q1)


# --- widths 8 and 16: the state level kernels on sample-major rows -------------------------

@_tile_jit()
def _state_runs_rows(u, uf, gf, has_g, K, b, dt, act, starts, ends, KT, a, af, r0, r1):
    """Runs ``r0 .. r1-1`` of :func:`_state_runs` at width 8 or 16 with a batch of whole
    vectors, on the grid's sample-major rows (:func:`_forward_rows`): each step reads
    ``u[k-1]`` and writes ``u[k]`` where it is kept, then adds ``g[k]`` in a pass of its
    own, as :func:`_store_add_t` does; the same bits as the tiles."""
    S = u.shape[1]
    for r in range(r0, r1):
        for k in range(starts[r], ends[r] + 1):
            _preact_rows(K[k], b[k], u[k - 1], KT, a, S)
            _activate_rows_value_t(af, uf[k - 1], uf[k], dt[k], act)
            if has_g:
                dst = uf[k]
                gk = gf[k]
                for i in range(dst.shape[0]):
                    dst[i] = dst[i] + gk[i]


@_jit(inline="always")
def _state_runs_rows_g(u, uf, gf, has_g, K, b, dt, act, starts, ends, KT, a, af, r0, r1):
    """:func:`_state_runs_rows` with ``has_g`` a constant at each call: two call sites,
    one for each value. The same bits; in the fused level passes, which run one interval
    per call, 7 to 10% less time than one call with ``has_g`` a variable
    (``runs_then_residuals``, d = 16, S = 32, N = 1024, m = 4; copies of the same
    kernel compiled side by side, so not a matter of where the code lies)."""
    if has_g:
        _state_runs_rows(u, uf, gf, True, K, b, dt, act, starts, ends, KT, a, af, r0, r1)
    else:
        _state_runs_rows(u, uf, gf, False, K, b, dt, act, starts, ends, KT, a, af, r0, r1)


@_jit()
def _state_runs_rows_one_thread(u, g, has_g, K, b, dt, act, starts, ends):
    n, S, d = u.shape
    KT = np.empty((d, d), u.dtype)
    a = np.empty((S, d), u.dtype)
    _state_runs_rows_g(u, _flat(u), _flat(g), has_g, K, b, dt, act, starts, ends, KT, a,
                     a.reshape(S * d), 0, len(starts))


@_jit(parallel=True)
def _state_runs_rows_parallel(u, g, has_g, K, b, dt, act, starts, ends, n_slots):
    """:func:`_state_runs_rows_one_thread` with the runs shared by ``n_slots`` slots in
    contiguous ranges, each with its own scratch (a run is done whole by one thread:
    the same bits). For two or more threads and enough work (:func:`_row_slots`)."""
    n, S, d = u.shape
    KTs = np.empty((n_slots, d, d), u.dtype)
    As = np.empty((n_slots, S, d), u.dtype)
    uf, gf = _flat(u), _flat(g)
    for p in prange(n_slots):
        r0, r1 = _slot_tasks(np.int64(p), n_slots, len(starts))
        _state_runs_rows(u, uf, gf, has_g, K, b, dt, act, starts, ends, KTs[p], As[p],
                         As[p].reshape(S * d), r0, r1)


@_tile_jit()
def _state_points_rows(u, uf, K, b, dt, act, positions, outf, rows, gf, mode, KT, a, af, phi,
                       r0, r1):
    """Points ``r0 .. r1-1`` of :func:`_state_points` on sample-major rows (as
    :func:`_state_runs_rows`): the step's value goes straight into ``out[r]``
    (``POINT_APPLY``) or into ``phi``, and from there into the sums of
    :func:`_point_sum`, the same as the tiles' :func:`_point_end_t`."""
    S = u.shape[1]
    for r in range(r0, r1):
        k = positions[r]
        _preact_rows(K[k], b[k], u[k - 1], KT, a, S)
        if mode == POINT_APPLY:
            _activate_rows_value_t(af, uf[k - 1], outf[r], dt[k], act)
        else:
            _activate_rows_value_t(af, uf[k - 1], phi, dt[k], act)
            _point_sum(phi, outf[rows[r]], uf[k],
                       gf[k] if mode == POINT_RESIDUAL_G else phi, mode)


@_jit()
def _state_points_rows_one_thread(u, K, b, dt, act, positions, out, rows, g, mode):
    n, S, d = u.shape
    KT = np.empty((d, d), u.dtype)
    a = np.empty((S, d), u.dtype)
    phi = np.empty(S * d, u.dtype)
    _state_points_rows(u, _flat(u), K, b, dt, act, positions, _flat(out), rows, _flat(g), mode,
                       KT, a, a.reshape(S * d), phi, 0, len(positions))


@_jit(parallel=True)
def _state_points_rows_parallel(u, K, b, dt, act, positions, out, rows, g, mode, n_slots):
    """:func:`_state_points_rows_one_thread` with the points shared by ``n_slots`` slots
    (as :func:`_state_runs_rows_parallel`)."""
    n, S, d = u.shape
    KTs = np.empty((n_slots, d, d), u.dtype)
    As = np.empty((n_slots, S, d), u.dtype)
    phis = np.empty((n_slots, S * d), u.dtype)
    uf, outf, gf = _flat(u), _flat(out), _flat(g)
    for p in prange(n_slots):
        r0, r1 = _slot_tasks(np.int64(p), n_slots, len(positions))
        _state_points_rows(u, uf, K, b, dt, act, positions, outf, rows, gf, mode, KTs[p],
                           As[p], As[p].reshape(S * d), phis[p], r0, r1)


# --- widths 8 and 16: MGRIT's fused level passes on sample-major rows ------------------------
#
# Two passes over a level that does not talk to other ranks, each the work of several
# level kernels done interval by interval, while an interval's rows are in the cache
# (:meth:`ptoc.propagator.LevelSteps.runs_then_residuals` and ``correct_then_runs`` say
# what they compute; composed of the other level operations, they give the same bits).

@_thin_jit()
def _keep_and_c_input(u, uf, before, bf, positions, r, k):
    """``before[r] = u[k]``, then the value a C-relaxation step at ``k = positions[r]``
    starts from, as rows and flat: ``u[k-1]``, or ``before[r-1]`` where ``k-1`` is the
    point before (relaxed already, its old value kept there)."""
    keep, src = bf[r], uf[k]
    for t in range(keep.shape[0]):
        keep[t] = src[t]
    if r > 0 and positions[r - 1] == k - 1:
        return before[r - 1], bf[r - 1]
    return u[k - 1], uf[k - 1]


@_thin_jit()
def _add_row(dst, src, add):
    """``dst += src`` on flat rows where ``add`` (a right-hand side ``g``, added in a pass of
    its own as :func:`_store_add_t` adds it)."""
    if add:
        for i in range(dst.shape[0]):
            dst[i] = dst[i] + src[i]


@_jit()
def _state_runs_residuals_rows_one_thread(u, g, has_g, K, b, dt, act, starts, ends, positions,
                                          out, rows, inject, mode):
    """The runs of :func:`_state_runs_rows`, each followed by the points of
    :func:`_state_points_rows` (``mode``: ``POINT_RESIDUAL`` or ``POINT_RESIDUAL_G``)
    up to the position after its end, and the copy ``inject[rows[r]] = u[k]`` of each
    point ``k = positions[r]`` (ascending, none inside a run)."""
    n, S, d = u.shape
    KT = np.empty((d, d), u.dtype)
    a = np.empty((S, d), u.dtype)
    af = a.reshape(S * d)
    phi = np.empty(S * d, u.dtype)
    uf, gf, outf, injf = _flat(u), _flat(g), _flat(out), _flat(inject)
    p = 0
    for r in range(len(starts) + 1):
        if r < len(starts):
            _state_runs_rows_g(u, uf, gf, has_g, K, b, dt, act, starts, ends, KT, a, af, r, r + 1)
        while p < len(positions) and (r == len(starts) or positions[p] <= ends[r] + 1):
            _state_points_rows(u, uf, K, b, dt, act, positions, outf, rows, gf, mode, KT, a,
                               af, phi, p, p + 1)
            src, dst = uf[positions[p]], injf[rows[p]]
            for t in range(dst.shape[0]):
                dst[t] = src[t]
            p += 1


@_jit()
def _state_correct_runs_rows_one_thread(u, g, has_g, K, b, dt, act, positions, uc, v, rows,
                                        starts, ends, before, measure):
    """At each point ``k = positions[r]`` (ascending, none inside a run), in order: the
    correction ``u[k] += uc[rows[r]] - v[rows[r]]`` (:func:`ptoc.kernels.rows.correct_row`),
    the runs that start up to ``k + 1`` (:func:`_state_runs_rows`: the run after ``k``
    reads the corrected value) and, with ``measure``, ``before[r] = u[k]`` and the
    C-relaxation step ``u[k] = Phi_k(u[k-1]) (+ g[k])`` from the value ``u[k-1]`` had
    before any C-relaxation (``before[r-1]`` where ``k-1`` is the point before), whose
    change ``|u[k] - before[r]|^2`` (:func:`ptoc.kernels.rows.sumsq_row`) goes into the
    returned sum, the points' sums added in order. The runs left after the last point
    come last."""
    n, S, d = u.shape
    KT = np.empty((d, d), u.dtype)
    a = np.empty((S, d), u.dtype)
    af = a.reshape(S * d)
    uf, gf, ucf, vf, bf = _flat(u), _flat(g), _flat(uc), _flat(v), _flat(before)
    part = np.zeros(len(positions))
    q = 0
    for r in range(len(positions)):
        k = positions[r]
        _rowops.correct_row(uf[k], ucf[rows[r]], vf[rows[r]])
        while q < len(starts) and starts[q] <= k + 1:
            _state_runs_rows_g(u, uf, gf, has_g, K, b, dt, act, starts, ends, KT, a, af, q, q + 1)
            q += 1
        if measure:
            xin, xinf = _keep_and_c_input(u, uf, before, bf, positions, r, k)
            _preact_rows(K[k], b[k], xin, KT, a, S)
            _activate_rows_value_t(af, xinf, uf[k], dt[k], act)
            _add_row(uf[k], gf[k], has_g)
            part[r] = _rowops.sumsq_row(uf[k], bf[r])
    while q < len(starts):
        _state_runs_rows_g(u, uf, gf, has_g, K, b, dt, act, starts, ends, KT, a, af, q, q + 1)
        q += 1
    return _rowops.sum_in_order(part)


# --- widths 8 and 16: the adjoint level kernels on sample-major rows ------------------------

@_thin_jit()
def _add_scaled_rows(g, Kk, lout, h):
    """``lout += h g K_k`` on sample-major rows of width 8 or 16, 8 samples at a time in
    registers (:data:`ptoc.kernels._product.ADD_SCALED`, ``M`` the rows of ``g``, ``src``
    ``K_k``), the chain of :func:`_adjoint_lam_t` per entry."""
    S, d = lout.shape
    S8 = S - S % 8
    if d == 8:
        for s in range(0, S8, 8):
            _product.add_8x8(g, Kk, lout, s, 0, lout[0], h)
        for s in range(S8, S):
            _product.add_1x8(g, Kk, lout, s, 0, lout[0], h)
    else:
        for s in range(0, S8, 8):
            _product.add_8x16(g, Kk, lout, s, 0, lout[0], h)
        for s in range(S8, S):
            _product.add_1x16(g, Kk, lout, s, 0, lout[0], h)


@_tile_jit()
def _adjoint_rows_step(Dk, Kk, h, lin, lout, g, linf, loutf, gf):
    """``lout = lin + h (D_k * lin) K_k`` on sample-major rows of width 8 or 16 (``*f``: the
    same rows flat): ``g = D_k * lin`` in one pass, ``lout`` a copy of ``lin``, then the
    update of 8 samples at a time in registers
    (:data:`ptoc.kernels._product.ADD_SCALED`, ``M`` the rows of ``g``, ``src`` ``K_k``):
    the multiplications and the chain of :func:`_adjoint_tile_step`, the same bits."""
    for i in range(gf.shape[0]):
        gf[i] = Dk[i] * linf[i]
        loutf[i] = linf[i]
    _add_scaled_rows(g, Kk, lout, h)


@_strict_tile_jit()
def _scale_and_bias_rows(g, h, pb, lanes, width):
    """:func:`_scale_and_bias_t` on the sample-major rows ``g`` (m, d) of one chunk:
    ``g <- h g`` and ``pb[i] = sum_t g[t, i]``, sample ``t`` in lane ``t % width`` of
    ``lanes`` (8, d), float64 as the tiles' lane sums are. With ``width`` 8 the lanes
    are combined in the order of :func:`_lane_sum_scaled`, and eight consecutive samples
    are one block of ``8 d`` entries added to the lanes in one loop; with ``width`` 1
    (``_LANE_SUMS`` off, passed by the caller for the reason given in
    :func:`_scale_and_bias_t`) each feature's sum is in sample order. The same bits as
    the tiles. With the lanes on, the rows paths (widths 8 and 16) call
    :func:`ptoc.kernels._product.scale_and_bias_8` and ``_16`` instead, the same sums
    in registers (:func:`_rows_partials`)."""
    m, d = g.shape
    gf = g.reshape(m * d)
    lf = lanes.reshape(8 * d)
    for q in range(8 * d):
        lf[q] = 0.0 * h
    if width == 1:
        for t in range(m):
            row = gf[t * d:(t + 1) * d]
            for i in range(d):
                row[i] = h * row[i]
                lf[i] = lf[i] + row[i]
        for i in range(d):
            pb[i] = lanes[0, i]
        return
    m8 = m - m % 8
    for t in range(0, m8, 8):
        block = gf[t * d:(t + 8) * d]
        for q in range(8 * d):
            block[q] = h * block[q]
            lf[q] = lf[q] + block[q]
    rest = gf[m8 * d:m * d]
    for q in range(rest.shape[0]):
        rest[q] = h * rest[q]
        lf[q] = lf[q] + rest[q]
    for i in range(d):
        pb[i] = (((lanes[0, i] + lanes[1, i]) + (lanes[2, i] + lanes[3, i]))
                 + ((lanes[4, i] + lanes[5, i]) + (lanes[6, i] + lanes[7, i])))


@_tile_jit()
def _adjoint_rows_update(Df, Kk, h, lam, lamf, g, gf):
    """``g = D * lam``, then ``lam <- lam + h g K`` in place: :func:`_adjoint_rows_step`
    with ``lout`` the same rows as ``lin`` (whose copy would make LLVM find the rows
    overlapping at run time and take its scalar loop: 128 against 57 ns per layer at
    d = 8, S = 16)."""
    for i in range(gf.shape[0]):
        gf[i] = Df[i] * lamf[i]
    _add_scaled_rows(g, Kk, lam, h)


@_tile_jit()
def _adjoint_rows(xs, lam_N, K, h, dsig, want_grad, lams, keep, lam_out, want_out, chunk,
                  gK_flat, gb, lam, lamf, g, gf, pK, pKf, pb, lanes):
    """The adjoint sweep of :func:`_adjoint_block` (every layer, ``sigma'`` stored) at
    width 8 or 16 on the sample-major rows, one thread: per layer ``g = sigma' * lambda``
    and ``lambda += h g K`` (:func:`_adjoint_rows_step`, in place), then per chunk
    the partials of :func:`_partial_t` (``h g``, the bias sum of
    :func:`_scale_and_bias_rows`, and ``pK`` from the transposed view of the chunk's
    rows of ``h g``, which the register blocks read entry by entry) added to ``gK[n]``
    and ``gb[n]`` in chunk order, as the tiles' direct mode does: the same bits, with
    no tile and no transpose. ``lam``, ``g``, ``pK``, ``pb``, ``lanes``: scratch
    (``*f``: flat views)."""
    N = K.shape[0]
    S, d = lam_N.shape
    lam_Nf = lam_N.reshape(S * d)
    for t in range(lamf.shape[0]):
        lamf[t] = lam_Nf[t]
    for n in range(N - 1, -1, -1):
        Df = dsig[n].reshape(S * d)
        if want_out:
            _adjoint_rows_update(Df, K[n], h, lam, lamf, g, gf)
            if keep:
                kept = lams[n].reshape(S * d)
                for t in range(kept.shape[0]):
                    kept[t] = lamf[t]
        else:
            for t in range(gf.shape[0]):
                gf[t] = Df[t] * lamf[t]
        if want_grad:
            _rows_partials(g, gf, xs[n], h, chunk, pK, pKf, pb, lanes, gK_flat[n], gb[n])
    if want_out:
        out = lam_out.reshape(S * d)
        for t in range(out.shape[0]):
            out[t] = lamf[t]


@_thin_jit()
def _rows_partials(g, gf, x, h, chunk, pK, pKf, pb, lanes, gK_n, gb_n):
    """One layer's gradient from ``g = sigma' * lambda`` on sample-major rows (S, d)
    (``gf``: the same, flat): per chunk of samples, ``g <- h g``, the bias sum of
    :func:`_scale_and_bias_rows` into ``pb`` (at widths 8 and 16 with the lanes on,
    :func:`ptoc.kernels._product.scale_and_bias_8` and ``_16``, its arithmetic in
    registers and inlined here), ``pK = (h g)^T x`` from the transposed view of the
    chunk's rows (:func:`_partial_blocks_zero`), both added to the layer's ``gK_n``
    (flat) and ``gb_n`` in chunk order: the partials of :func:`_partial_t` and their
    sum, as the tiles form them (the same bits). ``pK``, ``pKf``, ``pb``, ``lanes``:
    scratch."""
    S, d = g.shape
    for c in range((S + chunk - 1) // chunk):
        t0 = c * chunk
        t1 = min(S, t0 + chunk)
        if _LANE_SUMS and d == 8:
            _product.scale_and_bias_8(gf[t0 * d:t1 * d], h, pb)
        elif _LANE_SUMS and d == 16:
            _product.scale_and_bias_16(gf[t0 * d:t1 * d], h, pb)
        else:
            _scale_and_bias_rows(g[t0:t1], h, pb, lanes, 8 if _LANE_SUMS else 1)
        _partial_blocks_zero(g[t0:t1].T, x[t0:t1], pK, pb, h)
        _add_partial_into(pKf, pb, gK_n, gb_n)


@_jit(inline="always")
def _lines(n_bytes):
    """Whole 64-byte lines (float64 entries) holding ``n_bytes``, plus one free line."""
    return (n_bytes + 63) // 64 * 8 + 8


@_jit()
def _adjoint_rows_one_thread(xs, lam_N, K, h, dsig, want_grad, lams, keep, lam_out, want_out,
                             chunk, gK, gb):
    """:func:`_adjoint_rows` with its scratch in one allocation, each array starting on
    a 64-byte line, with a free line after it. At d = 8, S = 16 (256 layers) the sweep
    takes 37 to 39 us, or up to 62 in some periods, the same code in the same process
    (most likely the host's other hardware thread; ``benchmarks/README.md``)."""
    S, d = lam_N.shape
    item = lam_N.itemsize
    n_state, n_pK, n_pb = _lines(S * d * item), _lines(d * d * item), _lines(d * item)
    buf = np.empty(8 + 2 * n_state + n_pK + n_pb + _lines(8 * d * 8), np.float64)
    at = (-(buf.ctypes.data // 8)) % 8
    lamf = buf[at:at + n_state].view(lam_N.dtype)[:S * d]
    at += n_state
    gf = buf[at:at + n_state].view(lam_N.dtype)[:S * d]
    at += n_state
    pKf = buf[at:at + n_pK].view(lam_N.dtype)[:d * d]
    at += n_pK
    pb = buf[at:at + n_pb].view(lam_N.dtype)[:d]
    at += n_pb
    lanes = buf[at:at + 8 * d].reshape((8, d))
    _adjoint_rows(xs, lam_N, K, h, dsig, want_grad, lams, keep, lam_out, want_out, chunk,
                  gK.reshape((gK.shape[0], gK.shape[1] * gK.shape[2])), gb,
                  lamf.reshape((S, d)), lamf, gf.reshape((S, d)), gf, pKf.reshape((d, d)),
                  pKf, pb, lanes)


@_jit()
def _layer_gradients_rows_one_thread(xs, lams, reverse, K, b, h, act, chunk, gK, gb):
    """:func:`_layer_grad_block` and :func:`_add_partials` for every layer at width 8 or
    16 on the sample-major rows, one thread: per layer ``n``, ``g = sigma'(K_n x_n + b_n)
    * lambda_{n+1}`` (:func:`_preact_rows`, then the tiles' own :func:`_dsigma_t` and
    :func:`_times_t` over the ``S d`` entries as one row) and the partials of
    :func:`_rows_partials` added into ``gK[n]``, ``gb[n]``: the same bits as the tiles,
    with no tile, no transpose of the states and no allocation per layer. ``lams[n]``
    is ``lambda_{n+1}``, or, with ``reverse``, ``lams[N - 1 - n]`` (the adjoint solve's
    positions, in which the caller's view runs backwards)."""
    N = K.shape[0]
    S, d = xs.shape[1], xs.shape[2]
    KT = np.empty((d, d), xs.dtype)
    g = np.empty((S, d), xs.dtype)
    g_row = g.reshape((1, S * d))
    pK = np.empty((d, d), xs.dtype)
    pb = np.empty(d, xs.dtype)
    lanes = np.empty((8, d), np.float64)
    lam_rows = _flat(lams)
    gK_flat = gK.reshape((N, d * d))
    for n in range(N):
        ln = N - 1 - n if reverse else n
        _preact_rows(K[n], b[n], xs[n], KT, g, S)
        _dsigma_t(g_row, act, S * d)
        _times_t(g_row, lam_rows[ln:ln + 1], S * d)
        _rows_partials(g, g_row[0], xs[n], h, chunk, pK, pK.reshape(d * d), pb, lanes,
                       gK_flat[n], gb[n])


@_jit()
def _level_derivatives_rows(X, K, b, act, out):
    """:func:`_level_derivatives` at width 8 or 16 on the sample-major rows, one thread:
    ``out[k] = sigma'(X[k] K[k]^T + b[k])`` by :func:`_preact_rows` and the tiles' own
    :func:`_dsigma_t` over the ``S d`` entries as one row (the same bits)."""
    n, S, d = X.shape
    KT = np.empty((d, d), X.dtype)
    rows = _flat(out)
    for k in range(1, n):
        _preact_rows(K[k], b[k], X[k], KT, out[k], S)
        _dsigma_t(rows[k:k + 1], act, S * d)


@_tile_jit()
def _adjoint_runs_rows(lam, lamf, gf, has_g, Df, K, dt, starts, ends, g, gflat, r0, r1):
    """Runs ``r0 .. r1-1`` of :func:`_adjoint_runs` on the grid's sample-major rows
    (``Df``: the stored ``sigma'`` as flat rows; ``g``, ``gflat``: scratch), then ``g[k]``
    added in a pass of its own, as :func:`_store_add_t` does: the same bits."""
    for r in range(r0, r1):
        for k in range(starts[r], ends[r] + 1):
            _adjoint_rows_step(Df[k], K[k], dt[k], lam[k - 1], lam[k], g, lamf[k - 1],
                               lamf[k], gflat)
            if has_g:
                dst = lamf[k]
                gk = gf[k]
                for i in range(dst.shape[0]):
                    dst[i] = dst[i] + gk[i]


@_jit(inline="always")
def _adjoint_runs_rows_g(lam, lamf, gf, has_g, Df, K, dt, starts, ends, g, gflat, r0, r1):
    """:func:`_adjoint_runs_rows` with ``has_g`` a constant at each call, as
    :func:`_state_runs_rows_g`."""
    if has_g:
        _adjoint_runs_rows(lam, lamf, gf, True, Df, K, dt, starts, ends, g, gflat, r0, r1)
    else:
        _adjoint_runs_rows(lam, lamf, gf, False, Df, K, dt, starts, ends, g, gflat, r0, r1)


@_jit()
def _adjoint_runs_rows_one_thread(lam, g, has_g, D, K, dt, starts, ends):
    n, S, d = lam.shape
    scratch = np.empty((S, d), lam.dtype)
    _adjoint_runs_rows_g(lam, _flat(lam), _flat(g), has_g, _flat(D), K, dt, starts, ends, scratch,
                       scratch.reshape(S * d), 0, len(starts))


@_jit(parallel=True)
def _adjoint_runs_rows_parallel(lam, g, has_g, D, K, dt, starts, ends, n_slots):
    """:func:`_adjoint_runs_rows_one_thread` with the runs shared by ``n_slots`` slots
    (as :func:`_state_runs_rows_parallel`)."""
    n, S, d = lam.shape
    scratch = np.empty((n_slots, S, d), lam.dtype)
    lamf, gf, Df = _flat(lam), _flat(g), _flat(D)
    for p in prange(n_slots):
        r0, r1 = _slot_tasks(np.int64(p), n_slots, len(starts))
        _adjoint_runs_rows_g(lam, lamf, gf, has_g, Df, K, dt, starts, ends, scratch[p],
                             scratch[p].reshape(S * d), r0, r1)


@_tile_jit()
def _adjoint_points_rows(lam, lamf, Df, K, dt, positions, out, outf, rows, gf, mode, g, gflat,
                         phi, phif, r0, r1):
    """Points ``r0 .. r1-1`` of :func:`_adjoint_points` on sample-major rows: the step's
    value goes into ``out[r]`` (``POINT_APPLY``) or into ``phi``, and from there into the
    sums of :func:`_point_sum`, as the tiles' :func:`_point_end_t`."""
    for r in range(r0, r1):
        k = positions[r]
        if mode == POINT_APPLY:
            _adjoint_rows_step(Df[k], K[k], dt[k], lam[k - 1], out[r], g, lamf[k - 1], outf[r],
                               gflat)
        else:
            _adjoint_rows_step(Df[k], K[k], dt[k], lam[k - 1], phi, g, lamf[k - 1], phif, gflat)
            _point_sum(phif, outf[rows[r]], lamf[k], gf[k] if mode == POINT_RESIDUAL_G else phif,
                       mode)


@_jit()
def _adjoint_runs_residuals_rows_one_thread(lam, g, has_g, D, K, dt, starts, ends, positions,
                                            out, rows, inject, mode):
    """:func:`_state_runs_residuals_rows_one_thread` for adjoint steps
    (:func:`_adjoint_runs_rows`, :func:`_adjoint_points_rows`)."""
    n, S, d = lam.shape
    scratch = np.empty((2, S, d), lam.dtype)
    lamf, gf, Df, outf, injf = _flat(lam), _flat(g), _flat(D), _flat(out), _flat(inject)
    p = 0
    for r in range(len(starts) + 1):
        if r < len(starts):
            _adjoint_runs_rows_g(lam, lamf, gf, has_g, Df, K, dt, starts, ends, scratch[0],
                               scratch[0].reshape(S * d), r, r + 1)
        while p < len(positions) and (r == len(starts) or positions[p] <= ends[r] + 1):
            _adjoint_points_rows(lam, lamf, Df, K, dt, positions, out, outf, rows, gf, mode,
                                 scratch[0], scratch[0].reshape(S * d), scratch[1],
                                 scratch[1].reshape(S * d), p, p + 1)
            src, dst = lamf[positions[p]], injf[rows[p]]
            for t in range(dst.shape[0]):
                dst[t] = src[t]
            p += 1


@_jit()
def _adjoint_correct_runs_rows_one_thread(lam, g, has_g, D, K, dt, positions, uc, v, rows,
                                          starts, ends, before, measure):
    """:func:`_state_correct_runs_rows_one_thread` for adjoint steps
    (:func:`_adjoint_runs_rows`, :func:`_adjoint_rows_step`)."""
    n, S, d = lam.shape
    scratch = np.empty((S, d), lam.dtype)
    sf = scratch.reshape(S * d)
    lamf, gf, Df, ucf, vf, bf = _flat(lam), _flat(g), _flat(D), _flat(uc), _flat(v), \
        _flat(before)
    part = np.zeros(len(positions))
    q = 0
    for r in range(len(positions)):
        k = positions[r]
        _rowops.correct_row(lamf[k], ucf[rows[r]], vf[rows[r]])
        while q < len(starts) and starts[q] <= k + 1:
            _adjoint_runs_rows_g(lam, lamf, gf, has_g, Df, K, dt, starts, ends, scratch, sf, q,
                               q + 1)
            q += 1
        if measure:
            lin, linf = _keep_and_c_input(lam, lamf, before, bf, positions, r, k)
            _adjoint_rows_step(Df[k], K[k], dt[k], lin, lam[k], scratch, linf, lamf[k], sf)
            _add_row(lamf[k], gf[k], has_g)
            part[r] = _rowops.sumsq_row(lamf[k], bf[r])
    while q < len(starts):
        _adjoint_runs_rows_g(lam, lamf, gf, has_g, Df, K, dt, starts, ends, scratch, sf, q, q + 1)
        q += 1
    return _rowops.sum_in_order(part)


@_jit()
def _adjoint_points_rows_one_thread(lam, D, K, dt, positions, out, rows, g, mode):
    n, S, d = lam.shape
    scratch = np.empty((2, S, d), lam.dtype)
    _adjoint_points_rows(lam, _flat(lam), _flat(D), K, dt, positions, out, _flat(out), rows,
                         _flat(g), mode, scratch[0], scratch[0].reshape(S * d), scratch[1],
                         scratch[1].reshape(S * d), 0, len(positions))


@_jit(parallel=True)
def _adjoint_points_rows_parallel(lam, D, K, dt, positions, out, rows, g, mode, n_slots):
    """:func:`_adjoint_points_rows_one_thread` with the points shared by ``n_slots`` slots
    (as :func:`_state_runs_rows_parallel`)."""
    n, S, d = lam.shape
    scratch = np.empty((n_slots, 2, S, d), lam.dtype)
    lamf, Df, outf, gf = _flat(lam), _flat(D), _flat(out), _flat(g)
    for p in prange(n_slots):
        r0, r1 = _slot_tasks(np.int64(p), n_slots, len(positions))
        _adjoint_points_rows(lam, lamf, Df, K, dt, positions, out, outf, rows, gf, mode,
                             scratch[p, 0], scratch[p, 0].reshape(S * d), scratch[p, 1],
                             scratch[p, 1].reshape(S * d), r0, r1)


@_tile_jit()
def _derivatives_slot(X, K, b, act, out, W, x, a, q0, q1):
    """Tasks ``q0 .. q1-1`` of :func:`_level_derivatives` on one slot's tiles ``x``, ``a``."""
    S = X.shape[1]
    n_items = (S + W - 1) // W
    for q in range(q0, q1):
        k = 1 + q // n_items
        lo = (q % n_items) * W
        m = min(S, lo + W) - lo
        _load_t(X[k], lo, m, x)
        _preact_t(K[k], b[k], x, a, m)
        _dsigma_t(a, act, m)
        _store_t(a, out[k], lo, m)


@_jit()
def _level_derivatives(X, K, b, act, out, W, x, a):
    """``out[k] = sigma'(X[k] K[k]^T + b[k])`` for ``k = 1 .. n-1`` (row 0 is unused): the
    ``sigma'`` that :func:`_adjoint_g_t` recomputes, with the same loops, so the same bits.

    On one thread: it runs once per adjoint solve (one product per step, against the
    solve's tens of steps per layer), and a parallel loop would add about 1.5 s to the
    first compilation of the level kernels."""
    n, S, d = X.shape
    _derivatives_slot(X, K, b, act, out, W, x, a, 0, (n - 1) * ((S + W - 1) // W))


@_thin_jit()
def _adjoint_tile_step(D, K, dt, k, lam, g, lo, m):
    """``lam <- lam + dt[k] (D[k] * lam) K[k]`` on a tile, with ``D[k]`` the
    step's ``sigma'(a)`` (:func:`_level_derivatives`): the step of the adjoint sweep
    (:func:`_adjoint_block`) with a stored derivative."""
    _load_times_t(D[k], lo, m, g, lam)
    _adjoint_lam_t(K[k].T, dt[k], g, lam, m)


@_tile_jit()
def _adjoint_runs_slot(lam, lamf, gf, has_g, D, K, dt, starts, ends, W, tiles, q0, q1):
    """Tasks ``q0 .. q1-1`` of :func:`_adjoint_runs` on one slot's two tiles (``lamf``,
    ``gf``: flat rows, :func:`_flat`)."""
    S = lam.shape[1]
    n_items = (S + W - 1) // W
    lt = tiles[0]
    gg = tiles[1]
    for q in range(q0, q1):
        r = q // n_items
        lo = (q % n_items) * W
        m = min(S, lo + W) - lo
        _load_t(lam[starts[r] - 1], lo, m, lt)
        for k in range(starts[r], ends[r] + 1):
            _adjoint_tile_step(D, K, dt, k, lt, gg, lo, m)
            _store_add_t(lt, gf[k], has_g, lam[k], lamf[k], lo, m)


@_jit(parallel=True)
def _adjoint_runs(lam, g, has_g, D, K, dt, starts, ends, W, tiles):
    n, S, d = lam.shape
    n_items = (S + W - 1) // W
    n_tasks = len(starts) * n_items
    n_slots = tiles.shape[0]
    for p in prange(n_slots):
        q0, q1 = _slot_tasks(np.int64(p), n_slots, n_tasks)
        _adjoint_runs_slot(lam, _flat(lam), _flat(g), has_g, D, K, dt, starts, ends, W,
                           tiles[p], q0, q1)


@_tile_jit()
def _adjoint_points_slot(lam, lamf, D, K, dt, positions, out, outf, rows, gf, mode, W, tiles,
                         g_rows, g_flat, q0, q1):
    """Tasks ``q0 .. q1-1`` of :func:`_adjoint_points` on one slot's two tiles (``lamf``,
    ``outf``, ``gf``: flat rows, :func:`_flat`; ``g_rows``, ``g_flat``: the memory of the
    second tile as rows of ``d`` and flat, :func:`_rows_of`)."""
    S = lam.shape[1]
    n_items = (S + W - 1) // W
    lt = tiles[0]
    gg = tiles[1]
    for q in range(q0, q1):
        r = q // n_items
        lo = (q % n_items) * W
        m = min(S, lo + W) - lo
        k = positions[r]
        _load_t(lam[k - 1], lo, m, lt)
        _adjoint_tile_step(D, K, dt, k, lt, gg, lo, m)
        _point_end_t(lt, g_rows, g_flat, lamf, gf, out, outf, r, rows, k, mode, lo, m)


@_jit(parallel=True)
def _adjoint_points(lam, D, K, dt, positions, out, rows, g, mode, W, tiles):
    n, S, d = lam.shape
    n_items = (S + W - 1) // W
    n_tasks = len(positions) * n_items
    n_slots = tiles.shape[0]
    for p in prange(n_slots):
        q0, q1 = _slot_tasks(np.int64(p), n_slots, n_tasks)
        g_rows = _rows_of(tiles[p, 1])
        _adjoint_points_slot(lam, _flat(lam), D, K, dt, positions, out, _flat(out), rows,
                             _flat(g), mode, W, tiles[p], g_rows, g_rows.reshape(g_rows.size),
                             q0, q1)


@_jit(parallel=True)
def _layer_grad_block(xs, lams, K, b, h, act, n0, n1, part_K, part_b, chunk, group):
    """Gradient partials of layers ``n0..n1-1``: one per chunk and layer, in parallel over
    (layer, work item); the arithmetic of the adjoint sweep's partials."""
    S, d = xs.shape[1], xs.shape[2]
    W = chunk * group
    n_items = (S + W - 1) // W
    n_chunks = (S + chunk - 1) // chunk
    for q in prange((n1 - n0) * n_items):
        n = n0 + q // n_items
        w = q % n_items
        lo = w * W
        m = min(S, lo + W) - lo
        x = np.empty((d, _row_len(W)), xs.dtype)
        g = np.empty((d, _row_len(W)), xs.dtype)
        lt = np.empty((d, _row_len(W)), xs.dtype)
        _load_t(xs[n], lo, m, x)
        _load_t(lams[n], lo, m, lt)
        _adjoint_g_t(K[n], b[n], act, x, lt, g, m)
        for c in range(w * group, min(n_chunks, (w + 1) * group)):
            _partial_t(g, xs[n], lo, h, part_K[c, n - n0], part_b[c, n - n0], c * chunk - lo,
                       min(S, (c + 1) * chunk) - lo)


# --- functions with the common signature of kernels.reference --------------------------------

def _dummy(x: np.ndarray, ndim: int) -> np.ndarray:
    """A one-entry array of ``x``'s dtype and ``ndim`` dimensions, passed where a kernel
    argument is switched off (it is never read or written). One per dtype and ``ndim``,
    made once: making them took a fifth of a microsecond each, per call."""
    return _dummy_of(x.dtype, ndim)


@functools.cache
def _dummy_of(dtype: np.dtype, ndim: int) -> np.ndarray:
    return np.zeros((1,) * ndim, dtype=dtype)


def _group(S: int, chunk: int) -> int:
    """Chunks per work item: ``CPU_LANES // chunk``, halved while there would be fewer
    than ``CPU_MIN_ITEMS`` work items (a function of the shapes only, never of the
    thread count, so results do not depend on it)."""
    return _group_for(S, chunk, _config.CPU_LANES, _config.CPU_MIN_ITEMS)


@functools.lru_cache(maxsize=1024)
def _group_for(S: int, chunk: int, lanes: int, min_items: int) -> int:
    """:func:`_group` for the settings in force (remembered: a kernel call asks for the
    same few shapes over and over, and the loop took a third of a microsecond)."""
    group = max(1, lanes // chunk)
    while group > 1 and -(-S // (group * chunk)) < min_items:
        group //= 2
    return group


def _layer_block(S: int, d: int, N: int, chunk: int, itemsize: int) -> int:
    """Layers per block of the adjoint sweep, so that the gradient partials of a block
    (one ``(d, d)`` and one ``(d,)`` array per chunk and layer) fit in
    ``CPU_PARTIAL_BYTES``."""
    n_chunks = -(-S // chunk)
    per_layer = n_chunks * (d * d + d) * itemsize
    return max(1, min(N, _config.CPU_PARTIAL_BYTES // per_layer))


def _adjoint_call(xs, lam, K, b, h, act, dsig, gK, gb, lams, out, chunk):
    """The adjoint sweep over layers ``N-1 .. 0`` (``xs[n] = x_n``, ``lam = lambda_N``), in
    blocks of layers (see the module docstring); ``None`` for ``dsig``, ``gK``/``gb``,
    ``lams`` or ``out`` switches that part off. Writes ``lambda_0`` to ``out``.

    The loop over blocks runs here, in Python (one or a few blocks per sweep), and
    calls the two parallel kernels of a block: a compiled loop around them would be
    one more function whose compilation optimises and generates the machine code of
    everything it calls once again (about 1 s of a first run's compilation).
    """
    S, d = lam.shape
    N = K.shape[0]
    dt = lam.dtype
    want_grad, keep, want_out = gK is not None, lams is not None, out is not None
    group = _group(S, chunk)
    W = chunk * group
    n_items = -(-S // W)
    # the kernels view gK as flat rows: one that is not C-ordered is summed into a
    # C-ordered copy of itself (the same additions) and written back at the end
    gK_arg, gb_arg = (_c(gK), gb) if want_grad else (_dummy(lam, 3), _dummy(lam, 2))
    lams_arg = lams if keep else _dummy(lam, 3)
    out_arg = out if want_out else _dummy(lam, 2)
    if keep:
        lams[N] = lam
    if N == 0 and want_out:
        out[...] = lam
    h = dt.type(h)
    if (N > 0 and not _threaded(n_items, S * d * d * N)
            and _adjoint_rows_path(xs, lam, K, dsig, lams, out)):
        # decided before the tiles' scratch is made: at d = 8, S = 16 the fixed cost of
        # a sweep is a few microseconds of its 50
        _adjoint_rows_one_thread(xs, lam, K, h, dsig, want_grad, lams_arg, keep, out_arg,
                                 want_out, chunk, gK_arg, gb_arg)
        if want_grad:
            _copy_back(gK_arg, gK)
        return
    n_chunks = -(-S // chunk)
    # one work item holds every chunk: it adds its partials to the gradient itself, in
    # chunk order, and the sweep needs neither a partial per layer nor blocks of layers
    direct = want_grad and n_items == 1
    L = max(N, 1) if direct else min(_layer_block(S, d, N, chunk, lam.itemsize), max(N, 1))
    tiles = np.empty((3, n_items, d, _row_len.py_func(W)), dt)
    part_K = np.empty((n_chunks if want_grad else 1, 1 if direct else L, d, d), dt)
    part_b = np.empty((n_chunks if want_grad else 1, 1 if direct else L, d), dt)
    dsig_arg = _dummy(lam, 3) if dsig is None else dsig
    n1 = N
    while n1 > 0:
        n0 = max(0, n1 - L)
        threaded = _threaded(n_items, S * d * d * (n1 - n0))
        block = _adjoint_block if threaded else _adjoint_block_one_thread
        block(xs, lam, K, b, h, act, dsig_arg, dsig is not None, n0, n1, tiles[0],
              tiles[1], tiles[2], part_K, part_b, want_grad, lams_arg, keep, out_arg,
              want_out, chunk, group, gK_arg, gb_arg, direct)
        if want_grad and not direct:
            add = _add_partials if threaded else _add_partials_one_thread
            add(part_K, part_b, gK_arg, gb_arg, n0, n1)
        n1 = n0
    if want_grad:
        _copy_back(gK_arg, gK)


def _adjoint_rows_path(xs, lam, K, dsig, lams, out) -> bool:
    """Whether a one-thread adjoint sweep runs on the sample-major rows
    (:func:`_adjoint_rows_one_thread`): width 8 or 16, ``sigma'`` stored, every array it
    views as flat rows C-ordered, and unit-stride rows of ``K``. The same bits as the
    tiles (a test compares them), whatever the batch.

    At width 8, batch 16 (256 layers, with the gradient) the tiles' adjoint sweep took
    43 to 54 us per process, most of it in transposes and loops over tile rows of 16
    entries."""
    return (lam.shape[1] in (8, 16) and _rows_enabled and dsig is not None
            and xs.flags.c_contiguous and lam.flags.c_contiguous
            and dsig.flags.c_contiguous and K.strides[2] == K.itemsize
            and (lams is None or lams.flags.c_contiguous)
            and (out is None or out.flags.c_contiguous))


def _num_threads() -> int:
    """``numba.get_num_threads()``, the thread count of the calling thread.

    That function takes two locks on every call to make sure the threads are started
    (0.52 us a call on the development machine, about a tenth of a level kernel call's
    fixed cost). Once they are, it reads the count with Numba's own C getter, which
    takes 0.08 us; where that getter is missing (another Numba version), or answers
    nothing valid, it falls back to the public function."""
    getter = _fast_thread_count
    if getter is not None:
        n = getter()
        if n > 0:
            return n
    return _started_thread_count()


def _started_thread_count() -> int:
    global _fast_thread_count
    n = numba.get_num_threads()  # starts the threads if needed
    parallel = getattr(getattr(numba.np, "ufunc", None), "parallel", None)
    if getattr(parallel, "_is_initialized", False):
        _fast_thread_count = getattr(parallel, "_get_num_threads", None)
    return n


_fast_thread_count = None


def _threaded(n_items: int, work: int) -> bool:
    """Whether a sweep kernel of ``n_items`` work items and ``work`` multiply-adds per
    product (``S d^2`` times the layers) runs its parallel variant: with two or more
    threads and items, and at least ``_config.CPU_PARALLEL_MIN_WORK`` multiply-adds.

    Below that a sweep takes a few microseconds, about what starting and joining the
    threads costs, and the one-thread variant (the same helpers on the same work items,
    so the same bits) is as fast; it is also the only variant a small job compiles
    (the parallel loop is most of a first run's compile time).
    """
    return (n_items > 1 and _num_threads() > 1
            and work >= _config.CPU_PARALLEL_MIN_WORK)


def _sweep_forward(x0, K, b, h, act, outs, dsig, store, W):
    S, d = x0.shape
    if _threaded(-(-S // W), S * d * d * K.shape[0]):
        _forward(x0, K, b, h, act, outs, dsig, store, W)
    elif _rows_path(x0, K, b, outs, dsig, store):
        _forward_rows_one_thread(x0, K, b, h, act, outs, dsig, store)
    else:
        _forward_one_thread(x0, K, b, h, act, outs, dsig, store, W)


def _rows_path(x0, K, b, outs, dsig, store) -> bool:
    """Whether a one-thread forward sweep runs on the sample-major rows
    (:func:`_forward_rows_one_thread`): width 8 or 16, a batch of whole vectors (so that the
    tile version computes every entry in a full vector too, which the two share), the
    states (and ``sigma'``) C-ordered, and unit-stride rows of ``K`` and ``b``.

    At width 8 and batch 16 a layer of the tile version spends 39 of its 144 ns on
    transposes, and its activation loop over tile rows of 16 entries takes 78 ns where
    one loop over the 128 entries takes 63."""
    return (x0.shape[1] in (8, 16) and x0.shape[0] % 8 == 0 and _rows_enabled
            and x0.flags.c_contiguous and outs.flags.c_contiguous
            and (not store or dsig.flags.c_contiguous)
            and K.strides[2] == K.itemsize and b.strides[1] == b.itemsize)


#: The tests switch :func:`_rows_path` off to compare it with the tiles.
_rows_enabled = True


def step(x, K, b, h, act, out, dsig, chunk):
    store = dsig is not None
    _sweep_forward(x, K[None], b[None], x.dtype.type(h), act, out[None],
                   dsig[None] if store else _dummy(x, 3), store,
                   _state_width(x.shape[0], chunk, 1))
    return out


def adjoint_step(x, lam, K, b, h, act, out, gK, gb, dsig, chunk):
    want_grad = gK is not None
    _adjoint_call(x[None], lam, K[None], b[None], h, act, None if dsig is None else dsig[None],
                  gK[None] if want_grad else None, gb[None] if want_grad else None, None, out,
                  chunk)
    return out


def param_grad(x, lam, K, b, h, act, gK, gb, dsig, chunk):
    _adjoint_call(x[None], lam, K[None], b[None], h, act, None if dsig is None else dsig[None],
                  gK[None], gb[None], None, None, chunk)


def hamiltonian(x, p, K, b, h, act, chunk):
    return float(_hamiltonian(x, p, K, b, x.dtype.type(h), act, chunk))


def forward_sweep(states, K, b, h, act, dsig, chunk):
    store = dsig is not None
    _sweep_forward(states[0], K, b, states.dtype.type(h), act, states[1:],
                   dsig if store else _dummy(states, 3), store,
                   _state_width(states.shape[1], chunk, 1))


def adjoint_sweep(states, lam_N, K, b, h, act, dsig, gK, gb, lams, chunk):
    out = np.empty_like(lam_N)
    _adjoint_call(states, lam_N, K, b, h, act, dsig, gK, gb, lams, out, chunk)
    return out


def _width(S: int, chunk: int) -> int:
    return chunk * _group(S, chunk)


def _state_width(S: int, chunk: int, n_runs: int, threads: int | None = None) -> int:
    """Work-item width of a kernel without gradient sums running ``n_runs`` independent
    runs (or points) on ``S`` samples: :func:`_width`, halved while there would be
    fewer than ``CPU_MIN_ITEMS`` work items, but not below ``CPU_MIN_LANES``, and not
    at all on one thread, where more work items only shorten the vector loops (measured:
    the serial state sweep at d = 16, S = 32, N = 1024 on one thread, 2.4 us per layer
    with items of 16 samples, 1.2 us with one item of 32).

    Unlike :func:`_group` this may read the thread count: these kernels sum nothing
    across samples, and every sample takes the same arithmetic whatever its work item,
    so the width changes no bit (as the widths that depend on ``n_runs`` already do);
    ``tests/test_kernels.py`` and ``tests/test_parallel.py`` check results on one and
    two threads and between the serial sweeps and the level kernels. ``threads``: the
    Numba thread count if the caller has it (None: read it)."""
    return _state_width_for(S, chunk, n_runs, _num_threads() if threads is None else threads,
                            _config.CPU_LANES, _config.CPU_MIN_ITEMS, _config.CPU_MIN_LANES)


@functools.lru_cache(maxsize=1024)
def _state_width_for(S: int, chunk: int, n_runs: int, threads: int, lanes: int,
                     min_items: int, min_lanes: int) -> int:
    """:func:`_state_width` for the settings in force (remembered, as :func:`_group_for`)."""
    if threads == 1:
        return chunk * max(1, lanes // chunk)
    W = chunk * _group_for(S, chunk, lanes, min_items)
    while W > min_lanes and n_runs * -(-S // W) < min_items:
        W = max(min_lanes, W // 2)
    return W


def _idx(a) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.int64)


#: Scratch tiles of the level kernels, reused across calls (per calling thread).
_level_tiles = Workspace(capacity=8)


def _tiles(u: np.ndarray, n_tasks: int, W: int, n_tiles: int,
           threads: int | None = None) -> np.ndarray:
    """Scratch of a level kernel: ``n_tiles`` tiles for each of its slots, as many slots as
    tasks but at most ``CPU_SLOTS_PER_THREAD`` per Numba thread (a slot runs its tasks
    one after the other; how tasks are shared out changes no result, see the module
    docstring). From a workspace: a relaxation allocates nothing. ``threads`` as in
    :func:`_state_width`."""
    threads = _num_threads() if threads is None else threads
    n_slots = max(1, min(n_tasks, _config.CPU_SLOTS_PER_THREAD * threads))
    return _level_tiles.get("level-tiles", (n_slots, n_tiles, u.shape[2], _row_len.py_func(W)),
                            u.dtype)


def _tasks(u: np.ndarray, n_runs: int, W: int) -> int:
    return n_runs * -(-u.shape[1] // W)


def _c(a: np.ndarray) -> np.ndarray:
    """``a``, or a C-ordered copy: the level kernels view their grids as flat rows
    (:func:`_flat`); the grids of MGRIT and parareal are C-ordered, so this copies
    nothing there."""
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)


def _copy_back(result: np.ndarray, target: np.ndarray) -> None:
    """Write a kernel's result back where it was computed on a C-ordered copy."""
    if result is not target:
        target[...] = result


def _level_rows(u, K, b) -> bool:
    """Whether a state level kernel runs on the grid's sample-major rows
    (:func:`_state_runs_rows`, :func:`_state_points_rows`): what :func:`_rows_path` asks
    of a sweep (width 8 or 16, a batch of whole vectors, unit-stride rows of the stacked
    weights; the grids are C-ordered, or copied so), on any number of threads
    (:func:`_row_slots`). A run of this kind then runs no tile level kernel, and its
    first compilation builds none (:data:`ptoc.kernels._cache._ROWS_KERNELS`)."""
    return (_rows_enabled and u.shape[2] in (8, 16) and u.shape[1] % 8 == 0
            and K.strides[2] == K.itemsize and b.strides[1] == b.itemsize)


def _row_slots(u, threads: int, n_tasks: int, starts=None, ends=None) -> int:
    """Slots of a rows level kernel over ``n_tasks`` points (one step each) or, with
    ``starts``/``ends``, the runs ``starts[r]..ends[r]``: one (the one-thread variant) on
    one thread, or for work too small to gain from threads (:func:`_threaded`'s bound,
    ``S d^2`` multiply-adds per step), else up to ``CPU_SLOTS_PER_THREAD`` per thread (a
    task, a whole run or point, is never split, so the slots change no result). The
    steps of the runs are counted only on more than one thread: a level kernel call of
    one step costs about 1.6 us, and the count 2 to 5 us of NumPy calls."""
    if threads == 1 or n_tasks < 2:
        return 1
    n_steps = n_tasks if starts is None else int(np.sum(ends - starts + 1))
    S, d = u.shape[1], u.shape[2]
    if S * d * d * n_steps < _config.CPU_PARALLEL_MIN_WORK:
        return 1
    return min(n_tasks, _config.CPU_SLOTS_PER_THREAD * threads)


def _call_rows(one_thread, parallel, args, slots: int) -> None:
    """A rows level kernel on ``slots`` slots (:func:`_row_slots`): its one-thread
    variant for one, else its parallel variant."""
    if slots == 1:
        one_thread(*args)
    else:
        parallel(*args, slots)


def _derivatives_rows(X, K, b, out) -> bool:
    """Whether :func:`level_derivatives` runs on the sample-major rows
    (:func:`_level_derivatives_rows`, one thread, whatever the thread count: it runs once
    per adjoint solve and level): :func:`_level_rows` for its arrays, ``X`` and ``out``
    C-ordered. The tiles took 0.94 to 1.0 ms for 1024 steps at d = 16, S = 32 on one
    thread."""
    return (_level_rows(X, K, b) and X.flags.c_contiguous
            and out.flags.c_contiguous)


def _gradients_rows(xs, lams, K, b, gK, gb) -> bool:
    """Whether :func:`layer_gradients` runs on the sample-major rows
    (:func:`_layer_gradients_rows_one_thread`, whatever the thread count): width 8 or 16,
    a batch of whole vectors, the states C-ordered, the adjoints C-ordered in either
    direction along the layers (the solvers pass a backward view), unit-stride rows of
    ``K`` and ``b``, and C-ordered gradients. The tile kernel, parallel over layers,
    allocates its tiles per work item; it took 1.9 to 2.3 ms for 1024 layers at
    d = 16, S = 32 on one thread."""
    item = xs.itemsize
    S, d = xs.shape[1], xs.shape[2]
    return (_level_rows(xs, K, b) and xs.flags.c_contiguous
            and lams.shape == xs.shape and lams.dtype == xs.dtype
            and abs(lams.strides[0]) == S * d * item and lams.strides[1] == d * item
            and lams.strides[2] == item
            and gK.flags.c_contiguous and gb.flags.c_contiguous)


def _adjoint_level_rows(lam, K, D) -> bool:
    """:func:`_level_rows` for an adjoint level kernel (no bias; ``K`` itself is read by
    rows, and the stored ``sigma'`` flat)."""
    return (_rows_enabled and lam.shape[2] in (8, 16) and lam.shape[1] % 8 == 0
            and K.strides[2] == K.itemsize and D.flags.c_contiguous)


def state_runs(u, g, K, b, dt, act, starts, ends, chunk):
    has_g = g is not None
    threads = _num_threads()
    if _level_rows(u, K, b):
        uc = _c(u)
        starts, ends = _idx(starts), _idx(ends)
        args = (uc, _c(g) if has_g else uc, has_g, K, b, np.asarray(dt, u.dtype), act, starts,
                ends)
        slots = _row_slots(u, threads, len(starts), starts, ends)
        _call_rows(_state_runs_rows_one_thread, _state_runs_rows_parallel, args, slots)
        _copy_back(uc, u)
        return
    W = _state_width(u.shape[1], chunk, len(starts), threads)
    uc = _c(u)
    _state_runs(uc, _c(g) if has_g else uc, has_g, K, b, np.asarray(dt, u.dtype), act,
                _idx(starts), _idx(ends), W, _tiles(u, _tasks(u, len(starts), W), W, 2, threads))
    _copy_back(uc, u)


def _fused_rows(u, K, b, *others) -> bool:
    """Whether MGRIT's fused level passes run here: on one thread (they go interval by
    interval; on more threads the caller composes them from the parallel level kernels),
    where the level kernels run on rows (:func:`_level_rows`) and every grid is
    C-ordered."""
    return (_num_threads() == 1 and _level_rows(u, K, b) and u.flags.c_contiguous
            and all(x is None or x.flags.c_contiguous for x in others))


def state_runs_residuals(u, g, K, b, dt, act, starts, ends, positions, out, rows, inject,
                         chunk) -> bool:
    """:meth:`ptoc.propagator.LevelSteps.runs_then_residuals` in one pass, where
    :func:`_fused_rows` allows (returns True); else returns False, having done nothing."""
    if not _fused_rows(u, K, b, g, out, inject):
        return False
    _state_runs_residuals_rows_one_thread(
        u, u if g is None else g, g is not None, K, b, np.asarray(dt, u.dtype), act,
        _idx(starts), _idx(ends), _idx(positions), out, _idx(rows), inject,
        POINT_RESIDUAL if g is None else POINT_RESIDUAL_G)
    return True


def state_correct_runs(u, g, K, b, dt, act, positions, uc, v, rows, starts, ends, before,
                       chunk) -> float | None:
    """:meth:`ptoc.propagator.LevelSteps.correct_then_runs` in one pass, where
    :func:`_fused_rows` allows (returns the sum of squared changes, 0.0 without
    ``before``); else returns None, having done nothing."""
    if not _fused_rows(u, K, b, g, uc, v, before):
        return None
    measure = before is not None
    return float(_state_correct_runs_rows_one_thread(
        u, u if g is None else g, g is not None, K, b, np.asarray(dt, u.dtype), act,
        _idx(positions), uc, v, _idx(rows), _idx(starts), _idx(ends),
        before if measure else u, measure))


def state_points(u, K, b, dt, act, positions, out, chunk):
    state_points_into(u, K, b, dt, act, positions, out, None, None, POINT_APPLY, chunk)


def state_points_into(u, K, b, dt, act, positions, out, rows, g, mode, chunk):
    """:func:`state_points` with the end of each step chosen by ``mode``
    (:func:`_point_end_t`): ``out[rows[r]]`` receives ``phi - u[k]``, ``g[k] + (phi -
    u[k])`` or ``out[rows[r]] + (u[k] - phi)``."""
    positions = _idx(positions)
    threads = _num_threads()
    uc, outc = _c(u), _c(out)
    if _level_rows(u, K, b):
        args = (uc, K, b, np.asarray(dt, u.dtype), act, positions, outc,
                positions if rows is None else _idx(rows), uc if g is None else _c(g), mode)
        slots = _row_slots(u, threads, len(positions))
        _call_rows(_state_points_rows_one_thread, _state_points_rows_parallel, args, slots)
        _copy_back(outc, out)
        return
    W = _state_width(u.shape[1], chunk, len(positions), threads)
    _state_points(uc, K, b, np.asarray(dt, u.dtype), act, positions, outc,
                  positions if rows is None else _idx(rows), uc if g is None else _c(g), mode,
                  W, _tiles(u, _tasks(u, len(positions), W), W, 2, threads))
    _copy_back(outc, out)


def level_derivatives(X, K, b, act, out, chunk):
    if out is None:
        out = np.empty_like(X)
    if X.shape[0] > 1 and _derivatives_rows(X, K, b, out):
        _level_derivatives_rows(X, K, b, act, out)
        return out
    W = _width(X.shape[1], chunk)
    if X.shape[0] > 1:
        tiles = _tiles(X, 1, W, 2)
        _level_derivatives(X, K, b, act, out, W, tiles[0, 0], tiles[0, 1])
    return out


def adjoint_runs(lam, g, D, K, dt, starts, ends, chunk):
    has_g = g is not None
    threads = _num_threads()
    if _adjoint_level_rows(lam, K, D):
        lc = _c(lam)
        starts, ends = _idx(starts), _idx(ends)
        args = (lc, _c(g) if has_g else lc, has_g, D, K, np.asarray(dt, lam.dtype), starts,
                ends)
        slots = _row_slots(lam, threads, len(starts), starts, ends)
        _call_rows(_adjoint_runs_rows_one_thread, _adjoint_runs_rows_parallel, args, slots)
        _copy_back(lc, lam)
        return
    W = _state_width(lam.shape[1], chunk, len(starts), threads)
    lc = _c(lam)
    _adjoint_runs(lc, _c(g) if has_g else lc, has_g, D, K, np.asarray(dt, lam.dtype),
                  _idx(starts), _idx(ends), W,
                  _tiles(lam, _tasks(lam, len(starts), W), W, 2, threads))
    _copy_back(lc, lam)


def _adjoint_fused_rows(lam, K, D, *others) -> bool:
    """:func:`_fused_rows` for an adjoint level (:func:`_adjoint_level_rows`)."""
    return (_num_threads() == 1 and _adjoint_level_rows(lam, K, D) and lam.flags.c_contiguous
            and all(x is None or x.flags.c_contiguous for x in others))


def adjoint_runs_residuals(lam, g, D, K, dt, starts, ends, positions, out, rows, inject,
                           chunk) -> bool:
    """:func:`state_runs_residuals` for an adjoint level."""
    if not _adjoint_fused_rows(lam, K, D, g, out, inject):
        return False
    _adjoint_runs_residuals_rows_one_thread(
        lam, lam if g is None else g, g is not None, D, K, np.asarray(dt, lam.dtype),
        _idx(starts), _idx(ends), _idx(positions), out, _idx(rows), inject,
        POINT_RESIDUAL if g is None else POINT_RESIDUAL_G)
    return True


def adjoint_correct_runs(lam, g, D, K, dt, positions, uc, v, rows, starts, ends, before,
                         chunk) -> float | None:
    """:func:`state_correct_runs` for an adjoint level."""
    if not _adjoint_fused_rows(lam, K, D, g, uc, v, before):
        return None
    measure = before is not None
    return float(_adjoint_correct_runs_rows_one_thread(
        lam, lam if g is None else g, g is not None, D, K, np.asarray(dt, lam.dtype),
        _idx(positions), uc, v, _idx(rows), _idx(starts), _idx(ends),
        before if measure else lam, measure))


def adjoint_points(lam, D, K, dt, positions, out, chunk):
    adjoint_points_into(lam, D, K, dt, positions, out, None, None, POINT_APPLY, chunk)


def adjoint_points_into(lam, D, K, dt, positions, out, rows, g, mode, chunk):
    """:func:`adjoint_points` with the end of each step chosen by ``mode``, as in
    :func:`state_points_into`."""
    positions = _idx(positions)
    threads = _num_threads()
    lc, outc = _c(lam), _c(out)
    if _adjoint_level_rows(lam, K, D):
        args = (lc, D, K, np.asarray(dt, lam.dtype), positions, outc,
                positions if rows is None else _idx(rows), lc if g is None else _c(g), mode)
        slots = _row_slots(lam, threads, len(positions))
        _call_rows(_adjoint_points_rows_one_thread, _adjoint_points_rows_parallel, args, slots)
        _copy_back(outc, out)
        return
    W = _state_width(lam.shape[1], chunk, len(positions), threads)
    _adjoint_points(lc, D, K, np.asarray(dt, lam.dtype), positions, outc,
                    positions if rows is None else _idx(rows), lc if g is None else _c(g), mode,
                    W, _tiles(lam, _tasks(lam, len(positions), W), W, 2, threads))
    _copy_back(outc, out)


def layer_gradients(xs, lams, K, b, h, act, gK, gb, chunk):
    """Every layer's gradient from the states and adjoints, in blocks of layers (the loop
    over blocks in Python, as in :func:`_adjoint_call`); at width 8 or 16, on the
    sample-major rows on one thread (:func:`_layer_gradients_rows_one_thread`, the same
    bits)."""
    N = K.shape[0]
    S, d = xs.shape[1], xs.shape[2]
    if N and _gradients_rows(xs, lams, K, b, gK, gb):
        reverse = lams.strides[0] < 0
        _layer_gradients_rows_one_thread(xs, lams[::-1] if reverse else lams, reverse, K, b,
                                         xs.dtype.type(h), act, chunk, gK, gb)
        return
    L = min(_layer_block(S, d, N, chunk, xs.itemsize), max(N, 1))
    n_chunks = -(-S // chunk)
    part_K = np.empty((n_chunks, L, d, d), xs.dtype)
    part_b = np.empty((n_chunks, L, d), xs.dtype)
    group = _group(S, chunk)
    h = xs.dtype.type(h)
    n0 = 0
    while n0 < N:
        n1 = min(N, n0 + L)
        _layer_grad_block(xs, lams, K, b, h, act, n0, n1, part_K, part_b, chunk, group)
        _add_partials(part_K, part_b, gK, gb, n0, n1)
        n0 = n1
