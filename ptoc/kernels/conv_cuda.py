"""Numba CUDA kernels of one convolutional residual layer: one thread per array entry.

The functions of :mod:`ptoc.kernels.conv_reference`, with the same signatures and
equations (theory: :doc:`/theory/conv`), on the CUDA target. As in the dense
:mod:`ptoc.kernels.cuda` (whose helpers this module shares), arguments may be host NumPy
arrays (copied to the device, and the results copied back into them) or CUDA device
arrays (left on the device), and one launch sequence runs at a time.

Mapping of loops to threads
---------------------------
2-D grids, ``ptoc._config.CUDA_THREADS`` squared threads per block, the pixel index
``q = y W + z`` along the fast axis so that a warp reads neighbouring pixels of one
channel:

* layer: thread ``(q, s C_out + i)`` computes ``a[s, i, y, z]`` with
  :func:`~ptoc._conv_maths.conv_entry` (a sum over the input channels and the 3 x 3
  taps) and ``sigma(a)``, ``sigma'(a)`` with :func:`ptoc._maths.activation`;
* adjoint: thread ``(q, s C_out + i)`` forms ``g = sigma'(a) * lambda`` for one entry;
  then thread ``(q, s C_in + j)`` computes ``lambda + h conv^T(g, K)`` for one input
  entry with :func:`~ptoc._conv_maths.conv_transpose_entry`;
* gradient: thread ``(m, c)``, ``m`` the flat index of ``(i, j, u, v)`` in ``K``, sums
  one kernel-gradient entry over chunk ``c`` of ``chunk = ptoc._config.CHUNK`` samples
  and their pixels (:func:`~ptoc._conv_maths.kernel_gradient_partial_entry`; the
  threads with ``j = u = v = 0`` the bias entry too); then thread ``m`` adds the chunk
  partials in chunk order, times ``h``, to ``gK`` (and ``gb``). Every entry is a sum in
  a fixed order, whatever thread computes it, so the results do not depend on the
  launch configuration;
* Hamiltonian: thread ``c`` sums ``p (x + h sigma(a))`` over chunk ``c``; the host adds
  the chunk sums in chunk order;
* level kernels (the steps of one MGRIT or parareal level, :func:`state_runs` and the
  like): one launch per step index ``t`` of all runs (or points) of a call together,
  thread ``(q, (r S + s) C + i)`` computing entry ``(s, i, y, z)`` of position
  ``starts[r] + t`` of run ``r``, with the entry arithmetic of the layer kernel (or of
  the adjoint's two kernels), then ``+ g`` where the run has a right-hand side.

Where the data lives: as in :mod:`ptoc.kernels.cuda`, every copy between host and
device is counted (:func:`ptoc.kernels.cuda.counting_transfers`) and the level
kernels launch only with device arrays (:func:`ptoc.kernels.cuda._launch`). A level
function given host arrays copies each input to the device once, runs all its steps
there and copies its result back once; given device arrays (the stacked weights that
:class:`ptoc.conv.ConvCudaLevelSteps` keeps there for a solve), it copies nothing of
them.

The per-entry maths is written once, in :mod:`ptoc._conv_maths`, and registered as
jitable here, so these kernels call that very code (in the simulator, the plain
Python functions). The sums run in another order than the NumPy reference's; the two
agree to round-off (``tests/test_conv_cuda.py`` checks 1e-12 in float64).
"""

from __future__ import annotations

import numpy as np

from .. import _config, _conv_maths
from . import cuda as _dense
from .cuda import (
    _back,
    _download,
    _dummy,
    _grid2,
    _is_device,
    _launch,
    _serialized,
    _to_device,
    cuda,
    to_device,
)

for _f in _conv_maths.CUDA_FUNCTIONS:
    _dense._register(_f)

_activation = _dense._activation
_conv_entry = _conv_maths.conv_entry
_conv_transpose_entry = _conv_maths.conv_transpose_entry
_kernel_gradient_partial_entry = _conv_maths.kernel_gradient_partial_entry
_bias_gradient_partial_entry = _conv_maths.bias_gradient_partial_entry

check_available = _dense.check_available


# --- kernels ---------------------------------------------------------------------------------

@cuda.jit
def _layer_kernel(x, K, b, h, act, residual, out, dsig, store):
    q, si = cuda.grid(2)
    H, W = x.shape[2], x.shape[3]
    C_out = K.shape[0]
    if si < x.shape[0] * C_out and q < H * W:
        s = si // C_out
        i = si - s * C_out
        y = q // W
        z = q - y * W
        value, slope = _activation(_conv_entry(x, K, b, s, i, y, z), act)
        if residual:
            out[s, i, y, z] = x[s, i, y, z] + h * value
        else:
            out[s, i, y, z] = h * value
        if store:
            dsig[s, i, y, z] = slope


@cuda.jit
def _g_kernel(x, lam, K, b, act, g):
    q, si = cuda.grid(2)
    H, W = x.shape[2], x.shape[3]
    C_out = K.shape[0]
    if si < x.shape[0] * C_out and q < H * W:
        s = si // C_out
        i = si - s * C_out
        y = q // W
        z = q - y * W
        g[s, i, y, z] = _activation(_conv_entry(x, K, b, s, i, y, z), act)[1] * lam[s, i, y, z]


@cuda.jit
def _g_stored_kernel(dsig, lam, g):
    """``g = sigma'(a) * lam`` entry by entry from a stored ``sigma'(a)``."""
    q, si = cuda.grid(2)
    H, W = lam.shape[2], lam.shape[3]
    C = lam.shape[1]
    if si < lam.shape[0] * C and q < H * W:
        s = si // C
        i = si - s * C
        y = q // W
        z = q - y * W
        g[s, i, y, z] = dsig[s, i, y, z] * lam[s, i, y, z]


@cuda.jit
def _transpose_kernel(lam, K, g, h, out):
    q, sj = cuda.grid(2)
    H, W = out.shape[2], out.shape[3]
    C_in = K.shape[1]
    if sj < out.shape[0] * C_in and q < H * W:
        s = sj // C_in
        j = sj - s * C_in
        y = q // W
        z = q - y * W
        out[s, j, y, z] = lam[s, j, y, z] + h * _conv_transpose_entry(g, K, s, j, y, z)


@cuda.jit
def _partials_kernel(g, x, chunk, part_K, part_b):
    m, c = cuda.grid(2)
    n_chunks, C_out, C_in = part_K.shape[0], part_K.shape[1], part_K.shape[2]
    if c < n_chunks and m < C_out * C_in * 9:
        i = m // (C_in * 9)
        r = m - i * (C_in * 9)
        j = r // 9
        u = (r - j * 9) // 3
        v = r - j * 9 - u * 3
        lo = c * chunk
        hi = min(x.shape[0], lo + chunk)
        part_K[c, i, j, u, v] = _kernel_gradient_partial_entry(g, x, i, j, u, v, lo, hi)
        if r == 0:
            part_b[c, i] = _bias_gradient_partial_entry(g, i, lo, hi)


@cuda.jit
def _add_partials_kernel(part_K, part_b, h, gK, gb):
    m, _ = cuda.grid(2)
    n_chunks, C_out, C_in = part_K.shape[0], part_K.shape[1], part_K.shape[2]
    if m < C_out * C_in * 9:
        i = m // (C_in * 9)
        r = m - i * (C_in * 9)
        j = r // 9
        u = (r - j * 9) // 3
        v = r - j * 9 - u * 3
        acc = 0.0
        for c in range(n_chunks):
            acc += part_K[c, i, j, u, v]
        gK[i, j, u, v] += h * acc
        if r == 0:
            accb = 0.0
            for c in range(n_chunks):
                accb += part_b[c, i]
            gb[i] += h * accb


@cuda.jit
def _hamiltonian_kernel(x, p, K, b, h, act, chunk, part):
    c = cuda.grid(1)
    S, C, H, W = x.shape[0], x.shape[1], x.shape[2], x.shape[3]
    if c < part.shape[0]:
        acc = 0.0
        for s in range(c * chunk, min(S, (c + 1) * chunk)):
            for i in range(C):
                for y in range(H):
                    for z in range(W):
                        value = _activation(_conv_entry(x, K, b, s, i, y, z), act)[0]
                        acc += p[s, i, y, z] * (x[s, i, y, z] + h * value)
        part[c] = acc


# --- level kernels: step ``t`` of every run (or point) of a call ---------------------------------
#
# Thread ``(q, row)``, ``row = (r S + s) C + i``, computes entry ``(s, i, y, z)`` of position
# ``k = first[r] + t`` of run ``r`` when ``k <= last[r]`` (points are runs of one step,
# ``first = last``). The result goes to ``u[k]`` (runs) or ``out[r]`` (points, ``into_out``).
# Each entry is computed as ``_layer_kernel`` (or ``_g_kernel`` then ``_transpose_kernel``)
# computes it for one step of size ``dt[k]``, then ``+ g[k]`` when ``has_g``: the order of
# the generic level steps, which add ``g`` to the step's result.


def _level_entry(q, row, shape, first, last, t):
    """``(r, k, s, i, y, z)`` of thread ``(q, row)`` of a level launch over values of
    ``shape`` (positions, S, C, H, W); ``k = 0`` when the thread has no entry (every
    position a step produces is at least 1)."""
    S, C, H, W = shape[1], shape[2], shape[3], shape[4]
    r = row // (S * C)
    si = row - r * (S * C)
    s = si // C
    i = si - s * C
    y = q // W
    z = q - y * W
    k = 0
    if r < first.shape[0] and q < H * W:
        k = first[r] + t
        if k > last[r]:
            k = 0
    return r, k, s, i, y, z


_dense._register(_level_entry)

@cuda.jit
def _state_level_kernel(u, g, has_g, K, b, dt, act, first, last, t, out, into_out):
    q, row = cuda.grid(2)
    r, k, s, i, y, z = _level_entry(q, row, u.shape, first, last, t)
    if k > 0:
        x = u[k - 1]
        value = _activation(_conv_entry(x, K[k], b[k], s, i, y, z), act)[0]
        v = x[s, i, y, z] + dt[k] * value
        if has_g:
            v = v + g[k, s, i, y, z]
        if into_out:
            out[r, s, i, y, z] = v
        else:
            u[k, s, i, y, z] = v


@cuda.jit
def _adjoint_level_g_kernel(lam, X, K, b, act, first, last, t, gg):
    q, row = cuda.grid(2)
    r, k, s, i, y, z = _level_entry(q, row, lam.shape, first, last, t)
    if k > 0:
        slope = _activation(_conv_entry(X[k], K[k], b[k], s, i, y, z), act)[1]
        gg[r, s, i, y, z] = slope * lam[k - 1, s, i, y, z]


@cuda.jit
def _adjoint_level_stored_g_kernel(lam, D, first, last, t, gg):
    q, row = cuda.grid(2)
    r, k, s, i, y, z = _level_entry(q, row, lam.shape, first, last, t)
    if k > 0:
        gg[r, s, i, y, z] = D[k, s, i, y, z] * lam[k - 1, s, i, y, z]


@cuda.jit
def _adjoint_level_kernel(lam, g, has_g, K, dt, first, last, t, gg, out, into_out):
    q, row = cuda.grid(2)
    r, k, s, j, y, z = _level_entry(q, row, lam.shape, first, last, t)
    if k > 0:
        v = lam[k - 1, s, j, y, z] + dt[k] * _conv_transpose_entry(gg[r], K[k], s, j, y, z)
        if has_g:
            v = v + g[k, s, j, y, z]
        if into_out:
            out[r, s, j, y, z] = v
        else:
            lam[k, s, j, y, z] = v


# --- launch helpers ----------------------------------------------------------------------------

def _n_chunks(S: int, chunk: int) -> int:
    return (S + chunk - 1) // chunk


def _device_output(host_or_device, shape, dtype):
    """The device array a kernel writes an output into: the caller's own when it is on
    the device, else a new one (copied back by :func:`ptoc.kernels.cuda._back`)."""
    if _is_device(host_or_device):
        return host_or_device
    return cuda.device_array(shape, dtype)


# --- functions with the common signature of kernels.conv_reference ------------------------------

@_serialized
def layer(x, K, b, h, act, residual, out, dsig):
    """See :func:`ptoc.kernels.conv_reference.layer`."""
    h = x.dtype.type(h)
    S, _, H, W = x.shape
    C_out = K.shape[0]
    dx, dK, db = map(_to_device, (x, K, b))
    dout = _device_output(out, out.shape, out.dtype)
    store = dsig is not None
    ddsig = _device_output(dsig, dsig.shape, dsig.dtype) if store else _dummy(x.dtype, 4)
    blocks, threads = _grid2(H * W, S * C_out)
    _launch(_layer_kernel, blocks, threads, dx, dK, db, h, act, bool(residual), dout, ddsig,
            store)
    _back(dout, out)
    if store:
        _back(ddsig, dsig)
    return out


def _adjoint_dev(x, lam, K, b, h, act, out, gK, gb, dsig=None):
    """The adjoint of one layer on device arrays: ``g = sigma'(a) * lam`` (from ``dsig``
    when given, else with ``a`` recomputed), then ``out = lam + h conv^T(g, K)`` (when
    ``out`` is given) and the gradient added into ``gK``, ``gb`` (when given)."""
    S, C_in, H, W = x.shape
    C_out = K.shape[0]
    g = cuda.device_array(lam.shape, lam.dtype)
    blocks, threads = _grid2(H * W, S * C_out)
    if dsig is None:
        _launch(_g_kernel, blocks, threads, x, lam, K, b, act, g)
    else:
        _launch(_g_stored_kernel, blocks, threads, dsig, lam, g)
    if out is not None:
        blocks, threads = _grid2(H * W, S * C_in)
        _launch(_transpose_kernel, blocks, threads, lam, K, g, h, out)
    if gK is not None:
        chunk = _config.CHUNK
        n_chunks = _n_chunks(S, chunk)
        part_K = cuda.device_array((n_chunks,) + tuple(K.shape), lam.dtype)
        part_b = cuda.device_array((n_chunks, C_out), lam.dtype)
        n_entries = C_out * C_in * 9
        blocks, threads = _grid2(n_entries, n_chunks)
        _launch(_partials_kernel, blocks, threads, g, x, chunk, part_K, part_b)
        blocks, threads = _grid2(n_entries, 1)
        _launch(_add_partials_kernel, blocks, threads, part_K, part_b, h, gK, gb)


@_serialized
def adjoint(x, lam, K, b, h, act, out, gK, gb, dsig=None):
    """See :func:`ptoc.kernels.conv_reference.adjoint`."""
    h = x.dtype.type(h)
    dx, dlam, dK, db, dgK, dgb, ddsig = map(_to_device, (x, lam, K, b, gK, gb, dsig))
    dout = None if out is None else _device_output(out, out.shape, out.dtype)
    _adjoint_dev(dx, dlam, dK, db, h, act, dout, dgK, dgb, ddsig)
    if out is not None:
        _back(dout, out)
    if gK is not None:
        _back(dgK, gK)
        _back(dgb, gb)
    return out


@_serialized
def layer_gradients(xs, lams, K, b, h, act, gK, gb):
    """The gradients of ``L`` layers added into ``gK`` (L, C, C, 3, 3) and ``gb`` (L, C):
    layer ``n`` at the state ``xs[n]`` and the adjoint ``lams[n]`` (that of the layer's
    output), as :func:`adjoint` computes it (the same bits). Host arrays are copied to the
    device once each and ``gK``, ``gb`` back once, whatever ``L``."""
    if not len(xs):
        return
    h = xs.dtype.type(h)
    dxs, dlams, dK, db, dgK, dgb = map(_to_device, (xs, lams, K, b, gK, gb))
    for n in range(len(xs)):
        _adjoint_dev(dxs[n], dlams[n], dK[n], db[n], h, act, None, dgK[n], dgb[n])
    _back(dgK, gK)
    _back(dgb, gb)


@_serialized
def hamiltonian(x, p, K, b, h, act):
    """See :func:`ptoc.kernels.conv_reference.hamiltonian`."""
    h = x.dtype.type(h)
    chunk = _config.CHUNK
    n_chunks = _n_chunks(x.shape[0], chunk)
    part = cuda.device_array(n_chunks, dtype=x.dtype)
    threads = max(1, min(_config.CUDA_THREADS ** 2, n_chunks))
    _launch(_hamiltonian_kernel, (n_chunks + threads - 1) // threads, threads,
            *map(_to_device, (x, p, K, b)), h, act, chunk, part)
    total = 0.0
    for value in _download(part):
        total += float(value)
    return total


def hamiltonian_grad(x, p, K, b, h, act, gK, gb):
    """See :func:`ptoc.kernels.conv_reference.hamiltonian_grad`."""
    adjoint(x, p, K, b, h, act, None, gK, gb)


# --- the steps of one MGRIT level: many steps in one call ---------------------------------------
#
# The contract of the level kernels of kernels.conv_cpu (``u``, ``g``, ``X`` of shape
# (positions, S, C, H, W); ``K``, ``b``, ``dt`` indexed by the step, row 0 unused). Each
# call copies its host arrays to the device once (the device arrays it is given, none),
# launches the kernels of all its steps there, and copies ``u`` (or ``out``) back once.

def _runs_on_device(first, last):
    """``(runs, longest run, device array (2, runs) of the first and last positions)``."""
    first = np.asarray(first, dtype=np.int64)
    last = np.asarray(last, dtype=np.int64)
    if not len(first):
        return 0, 0, None
    return len(first), int(np.max(last - first)) + 1, to_device(np.stack([first, last]))


def _level_output(out, u):
    """The device array the level kernels write into: a new one for a host ``out``, the
    caller's own for a device ``out``, else ``u`` itself (runs)."""
    if out is None:
        return u
    return out if _is_device(out) else cuda.device_array(out.shape, out.dtype)


def _back_level(dout, out, du, u):
    """Copy the level's result back: ``out`` when given, else ``u`` (when on the host)."""
    if out is not None:
        _back(dout, out)
    elif not _is_device(u):
        _download(du, u)


def _state_level(u, g, K, b, dt, act, first, last, out):
    n_runs, n_steps, idx = _runs_on_device(first, last)
    if not n_runs:
        return
    du, dg = to_device(u), to_device(g)
    dK, db, ddt = to_device(K), to_device(b), to_device(dt, dtype=u.dtype)
    dout = _level_output(out, du)
    _, S, C, H, W = u.shape
    blocks, threads = _grid2(H * W, n_runs * S * C)
    for t in range(n_steps):
        _launch(_state_level_kernel, blocks, threads, du, du if dg is None else dg,
                dg is not None, dK, db, ddt, act, idx[0], idx[1], t, dout, out is not None)
    _back(dout, u if out is None else out)


def _adjoint_level(u, g, X, K, b, dt, act, first, last, out, D=None):
    n_runs, n_steps, idx = _runs_on_device(first, last)
    if not n_runs:
        return
    du, dg = to_device(u), to_device(g)
    dK, ddt = to_device(K), to_device(dt, dtype=u.dtype)
    dout = _level_output(out, du)
    _, S, C, H, W = u.shape
    gg = cuda.device_array((n_runs, S, C, H, W), u.dtype)
    blocks, threads = _grid2(H * W, n_runs * S * C)
    if D is None:
        dX, db = to_device(X), to_device(b)
    else:
        dD = to_device(D)
    for t in range(n_steps):
        if D is None:
            _launch(_adjoint_level_g_kernel, blocks, threads, du, dX, dK, db, act, idx[0],
                    idx[1], t, gg)
        else:
            _launch(_adjoint_level_stored_g_kernel, blocks, threads, du, dD, idx[0], idx[1],
                    t, gg)
        _launch(_adjoint_level_kernel, blocks, threads, du, du if dg is None else dg,
                dg is not None, dK, ddt, idx[0], idx[1], t, gg, dout, out is not None)
    _back(dout, u if out is None else out)


@_serialized
def state_runs(u, g, K, b, dt, act, starts, ends):
    """See :func:`ptoc.kernels.conv_cpu.state_runs`: ``u[j] = u[j-1] + dt[j]
    sigma(conv(u[j-1], K[j]) + b[j]) (+ g[j])`` for ``j = s..e`` of each run."""
    _state_level(u, g, K, b, dt, act, starts, ends, None)


@_serialized
def level_derivatives(X, K, b, dt, act, out):
    """See :func:`ptoc.kernels.conv_cpu.level_derivatives`; ``out=None``: a new device
    array (``X``, ``K``, ``b`` should be on the device: one launch per step)."""
    dX, dK, db = map(_to_device, (X, K, b))
    dout = cuda.device_array(X.shape, X.dtype) if out is None else _device_output(
        out, out.shape, out.dtype)
    scratch = cuda.device_array(X.shape[1:], X.dtype)
    for j in range(1, X.shape[0]):
        layer(dX[j], dK[j], db[j], 0.0, act, True, scratch, dout[j])
    if out is not None:
        _back(dout, out)
    return dout if out is None else out


@_serialized
def adjoint_runs(u, g, X, K, b, dt, act, starts, ends, D=None):
    """See :func:`ptoc.kernels.conv_cpu.adjoint_runs`: ``u[j] = u[j-1] + dt[j]
    conv^T(sigma'(a_j) * u[j-1], K[j]) (+ g[j])``, ``a_j = conv(X[j], K[j]) + b[j]``
    (``sigma'(a_j)`` read from ``D`` when given)."""
    _adjoint_level(u, g, X, K, b, dt, act, starts, ends, None, D)


@_serialized
def state_points(u, K, b, dt, act, positions, out):
    """See :func:`ptoc.kernels.conv_cpu.state_points`: ``out[k]`` = step ``positions[k]``
    of :func:`state_runs` applied to ``u[positions[k] - 1]``."""
    _state_level(u, None, K, b, dt, act, positions, positions, out)


@_serialized
def adjoint_points(u, X, K, b, dt, act, positions, out, D=None):
    """See :func:`ptoc.kernels.conv_cpu.adjoint_points`: ``out[k]`` = step
    ``positions[k]`` of :func:`adjoint_runs` applied to ``u[positions[k] - 1]``."""
    _adjoint_level(u, None, X, K, b, dt, act, positions, positions, out, D)
