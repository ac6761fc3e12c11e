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
  the chunk sums in chunk order.

The per-entry maths is written once, in :mod:`ptoc._conv_maths`, and registered as
jitable here, so these kernels call that very code (in the simulator, the plain
Python functions). The sums run in another order than the NumPy reference's; the two
agree to round-off (``tests/test_conv_cuda.py`` checks 1e-12 in float64).
"""

from __future__ import annotations

from .. import _config, _conv_maths
from . import cuda as _dense
from .cuda import _back, _dummy, _grid2, _is_device, _serialized, _to_device, cuda

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
    _layer_kernel[blocks, threads](dx, dK, db, h, act, bool(residual), dout, ddsig, store)
    _back(dout, out)
    if store:
        _back(ddsig, dsig)
    return out


@_serialized
def adjoint(x, lam, K, b, h, act, out, gK, gb, dsig=None):
    """See :func:`ptoc.kernels.conv_reference.adjoint`. ``dsig`` is taken for the common
    signature but not read: the device recomputes ``sigma'(a)`` entry by entry (with the
    function :func:`layer` stores it with, so the same values) instead of copying it."""
    h = x.dtype.type(h)
    S, C_in, H, W = x.shape
    C_out = K.shape[0]
    dx, dlam, dK, db = map(_to_device, (x, lam, K, b))
    g = cuda.device_array(lam.shape, lam.dtype)
    blocks, threads = _grid2(H * W, S * C_out)
    _g_kernel[blocks, threads](dx, dlam, dK, db, act, g)
    if out is not None:
        dout = _device_output(out, out.shape, out.dtype)
        blocks, threads = _grid2(H * W, S * C_in)
        _transpose_kernel[blocks, threads](dlam, dK, g, h, dout)
        _back(dout, out)
    if gK is not None:
        chunk = _config.CHUNK
        n_chunks = _n_chunks(S, chunk)
        part_K = cuda.device_array((n_chunks,) + tuple(K.shape), lam.dtype)
        part_b = cuda.device_array((n_chunks, C_out), lam.dtype)
        n_entries = C_out * C_in * 9
        blocks, threads = _grid2(n_entries, n_chunks)
        _partials_kernel[blocks, threads](g, dx, chunk, part_K, part_b)
        dgK, dgb = _to_device(gK), _to_device(gb)
        blocks, threads = _grid2(n_entries, 1)
        _add_partials_kernel[blocks, threads](part_K, part_b, h, dgK, dgb)
        _back(dgK, gK)
        _back(dgb, gb)
    return out


@_serialized
def hamiltonian(x, p, K, b, h, act):
    """See :func:`ptoc.kernels.conv_reference.hamiltonian`."""
    h = x.dtype.type(h)
    chunk = _config.CHUNK
    n_chunks = _n_chunks(x.shape[0], chunk)
    part = cuda.device_array(n_chunks, dtype=x.dtype)
    threads = max(1, min(_config.CUDA_THREADS ** 2, n_chunks))
    _hamiltonian_kernel[(n_chunks + threads - 1) // threads, threads](
        *map(_to_device, (x, p, K, b)), h, act, chunk, part)
    total = 0.0
    for value in part.copy_to_host():
        total += float(value)
    return total


def hamiltonian_grad(x, p, K, b, h, act, gK, gb):
    """See :func:`ptoc.kernels.conv_reference.hamiltonian_grad`."""
    adjoint(x, p, K, b, h, act, None, gK, gb)
