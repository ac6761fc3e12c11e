"""Numba CUDA kernels: the maths of :mod:`ptoc._maths` with one thread per array entry.

Same signatures as :mod:`ptoc.kernels.reference`; arguments may be host NumPy
arrays (copied to and from the device) or CUDA device arrays (left on the device).

Mapping of loops to threads (2-D grids, ``ptoc._config.CUDA_THREADS`` squared
threads per block, the feature index fastest so that a warp reads one sample row):

* step: thread ``(s, i)`` computes ``preactivation`` and ``activation`` for one entry;
* adjoint: thread ``(s, i)`` forms ``g[s, i] = sigma'(a) lambda[s, i]``; then thread
  ``(s, j)`` evaluates ``adjoint_entry``;
* gradient: thread ``(c, i*d + j)`` evaluates ``gradient_partial_entry`` over chunk ``c``
  of ``chunk`` samples, and thread ``(i, j)`` adds the chunk partials in chunk order,
  exactly the sums of the CPU target, so the result is independent of the launch
  configuration;
* Hamiltonian: thread ``c`` sums chunk ``c``; the host adds the chunk sums in order.

The element functions of :mod:`ptoc._maths` (all of them, ``_maths.CUDA_FUNCTIONS``)
are registered with numba-cuda's ``register_jitable``, so these kernels call that very
code; the CPU target calls ``activation`` from it and writes the sums as tile loops
that add the same terms in the same order (see :mod:`ptoc._maths`).
"""

from __future__ import annotations

import functools
import threading

import numpy as np

try:
    from numba import cuda
except ImportError as exc:  # pragma: no cover - exercised only without numba-cuda
    raise ImportError(f"numba.cuda is unavailable: {exc}") from exc

from .. import _config, _maths

try:  # numba-cuda's registry; the simulator calls the plain Python functions directly
    from numba.cuda.extending import register_jitable as _register
except ImportError:  # pragma: no cover - older numba with the built-in CUDA target
    from numba.extending import register_jitable as _register

for _f in _maths.CUDA_FUNCTIONS:
    _register(_f)

_activation = _maths.activation
_preactivation = _maths.preactivation
_adjoint_entry = _maths.adjoint_entry
_gradient_partial_entry = _maths.gradient_partial_entry
_bias_partial_entry = _maths.bias_partial_entry


def _is_device(a) -> bool:
    """True for a CUDA device array (real or simulated)."""
    return a is not None and cuda.devicearray.is_cuda_ndarray(a)


#: One launch sequence at a time: simulated ranks are threads, and the CUDA simulator
#: (like a single device) does not take concurrent launches from several host threads.
_LOCK = threading.RLock()


def _serialized(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _LOCK:
            return fn(*args, **kwargs)
    return wrapper


def check_available() -> None:
    """Raise ``ImportError`` with the fix when no CUDA device (or simulator) is usable."""
    if not cuda.is_available():
        raise ImportError(
            "target 'cuda' found no usable CUDA GPU. Install a driver and numba-cuda "
            "(pip install 'ptoc[cuda]'), or set NUMBA_ENABLE_CUDASIM=1 before numba is "
            "imported to run the kernels on the CPU simulator."
        )


# --- kernels ---------------------------------------------------------------------------------

@cuda.jit
def _step_kernel(x, K, b, h, act, out, dsig, store):
    i, s = cuda.grid(2)
    if s < x.shape[0] and i < x.shape[1]:
        sig, dsg = _activation(_preactivation(x, K, b, s, i), act)
        out[s, i] = x[s, i] + h * sig
        if store:
            dsig[s, i] = dsg


@cuda.jit
def _g_kernel(x, lam, K, b, act, dsig, have_dsig, g):
    i, s = cuda.grid(2)
    if s < x.shape[0] and i < x.shape[1]:
        if have_dsig:
            ds = dsig[s, i]
        else:
            ds = _activation(_preactivation(x, K, b, s, i), act)[1]
        g[s, i] = ds * lam[s, i]


@cuda.jit
def _adjoint_kernel(lam, K, g, h, out):
    j, s = cuda.grid(2)
    if s < lam.shape[0] and j < lam.shape[1]:
        out[s, j] = _adjoint_entry(lam, K, g, s, h, s, j)


@cuda.jit
def _partials_kernel(g, x, h, chunk, part_K, part_b):
    ij, c = cuda.grid(2)
    S, d = x.shape
    if c < part_K.shape[0] and ij < d * d:
        i = ij // d
        j = ij - i * d
        lo = c * chunk
        hi = min(S, lo + chunk)
        part_K[c, i, j] = _gradient_partial_entry(g, x, h, i, j, lo, hi)
        if j == 0:
            part_b[c, i] = _bias_partial_entry(g, h, i, lo, hi)


@cuda.jit
def _add_partials_kernel(part_K, part_b, gK, gb):
    j, i = cuda.grid(2)
    d = gK.shape[0]
    if i < d and j < d:
        acc = gK[i, j]
        for c in range(part_K.shape[0]):
            acc += part_K[c, i, j]
        gK[i, j] = acc
        if j == 0:
            accb = gb[i]
            for c in range(part_b.shape[0]):
                accb += part_b[c, i]
            gb[i] = accb


@cuda.jit
def _hamiltonian_kernel(x, p, K, b, h, act, chunk, part):
    c = cuda.grid(1)
    S, d = x.shape
    if c < part.shape[0]:
        acc = 0.0 * h
        for s in range(c * chunk, min(S, (c + 1) * chunk)):
            for i in range(d):
                sig = _activation(_preactivation(x, K, b, s, i), act)[0]
                acc += p[s, i] * (x[s, i] + h * sig)
        part[c] = acc


# --- launch helpers ----------------------------------------------------------------------------

def _grid2(n_fast: int, n_slow: int):
    """Blocks and threads of a 2-D launch covering ``n_fast x n_slow`` entries.

    The fast axis gets ``min(n_fast, CUDA_THREADS)`` threads and the slow axis fills
    the block up to ``CUDA_THREADS**2`` threads.
    """
    t = _config.CUDA_THREADS
    tx = max(1, min(n_fast, t))
    ty = max(1, min(n_slow, (t * t) // tx))
    return ((n_fast + tx - 1) // tx, (n_slow + ty - 1) // ty), (tx, ty)


def _to_device(a):
    if a is None or _is_device(a):
        return a
    return cuda.to_device(np.ascontiguousarray(a))


@functools.cache
def _dummy(dtype, ndim):
    """A 1-element device array standing in for an absent optional output."""
    return cuda.to_device(np.zeros((1,) * ndim, dtype=dtype))


def _back(device_array, host):
    """Copy a device result back into ``host`` when the caller passed a host array."""
    if host is not None and not _is_device(host):
        device_array.copy_to_host(host)


def _step_dev(x, K, b, h, act, out, dsig):
    store = dsig is not None
    S, d = x.shape
    blocks, threads = _grid2(d, S)
    _step_kernel[blocks, threads](x, K, b, h, act, out, dsig if store else _dummy(x.dtype, 2),
                                  store)


class _Workspace:
    """Device scratch of the adjoint: ``g`` (S, d) and the chunk partials, allocated once."""

    def __init__(self, S: int, d: int, dtype, chunk: int):
        self.n_chunks = (S + chunk - 1) // chunk
        self.g = cuda.device_array((S, d), dtype=dtype)
        self.part_K = cuda.device_array((self.n_chunks, d, d), dtype=dtype)
        self.part_b = cuda.device_array((self.n_chunks, d), dtype=dtype)
        self.dummy = _dummy(dtype, 2)


def _adjoint_dev(x, lam, K, b, h, act, out, gK, gb, dsig, chunk, work):
    S, d = x.shape
    have = dsig is not None
    blocks, threads = _grid2(d, S)
    _g_kernel[blocks, threads](x, lam, K, b, act, dsig if have else work.dummy, have, work.g)
    if out is not None:
        _adjoint_kernel[blocks, threads](lam, K, work.g, h, out)
    if gK is not None:
        blocks, threads = _grid2(d * d, work.n_chunks)
        _partials_kernel[blocks, threads](work.g, x, h, chunk, work.part_K, work.part_b)
        blocks, threads = _grid2(d, d)
        _add_partials_kernel[blocks, threads](work.part_K, work.part_b, gK, gb)


# --- functions with the common signature of kernels.reference ------------------------------------

@_serialized
def step(x, K, b, h, act, out, dsig, chunk):
    h = x.dtype.type(h)
    dx, dK, db = _to_device(x), _to_device(K), _to_device(b)
    dout = _to_device(out) if _is_device(out) else cuda.device_array(x.shape, x.dtype)
    ddsig = None
    if dsig is not None:
        ddsig = dsig if _is_device(dsig) else cuda.device_array(x.shape, x.dtype)
    _step_dev(dx, dK, db, h, act, dout, ddsig)
    _back(dout, out)
    if dsig is not None:
        _back(ddsig, dsig)
    return out


@_serialized
def adjoint_step(x, lam, K, b, h, act, out, gK, gb, dsig, chunk):
    h = x.dtype.type(h)
    dx, dlam, dK, db, ddsig = map(_to_device, (x, lam, K, b, dsig))
    dout = out if _is_device(out) else cuda.device_array(x.shape, x.dtype)
    dgK, dgb = _to_device(gK), _to_device(gb)
    _adjoint_dev(dx, dlam, dK, db, h, act, dout, dgK, dgb, ddsig, chunk,
                 _Workspace(*x.shape, x.dtype, chunk))
    _back(dout, out)
    if gK is not None:
        _back(dgK, gK)
        _back(dgb, gb)
    return out


@_serialized
def param_grad(x, lam, K, b, h, act, gK, gb, dsig, chunk):
    h = x.dtype.type(h)
    dx, dlam, dK, db, ddsig, dgK, dgb = map(_to_device, (x, lam, K, b, dsig, gK, gb))
    _adjoint_dev(dx, dlam, dK, db, h, act, None, dgK, dgb, ddsig, chunk,
                 _Workspace(*x.shape, x.dtype, chunk))
    _back(dgK, gK)
    _back(dgb, gb)


@_serialized
def hamiltonian(x, p, K, b, h, act, chunk):
    h = x.dtype.type(h)
    S = x.shape[0]
    n_chunks = (S + chunk - 1) // chunk
    part = cuda.device_array(n_chunks, dtype=x.dtype)
    threads = min(128, n_chunks)
    _hamiltonian_kernel[(n_chunks + threads - 1) // threads, threads](
        *map(_to_device, (x, p, K, b)), h, act, chunk, part)
    total = 0.0 * h
    for v in part.copy_to_host():
        total += v
    return float(total)


@_serialized
def forward_sweep(states, K, b, h, act, dsig, chunk):
    h = states.dtype.type(h)
    dstates, dK, db = map(_to_device, (states, K, b))
    ddsig = None
    if dsig is not None:
        ddsig = dsig if _is_device(dsig) else cuda.device_array(dsig.shape, dsig.dtype)
    for n in range(K.shape[0]):
        _step_dev(dstates[n], dK[n], db[n], h, act, dstates[n + 1],
                  None if ddsig is None else ddsig[n])
    _back(dstates, states)
    if dsig is not None:
        _back(ddsig, dsig)


@_serialized
def adjoint_sweep(states, lam_N, K, b, h, act, dsig, gK, gb, lams, chunk):
    h = states.dtype.type(h)
    dstates, dK, db, ddsig, dgK, dgb = map(_to_device, (states, K, b, dsig, gK, gb))
    lam = cuda.device_array(lam_N.shape, lam_N.dtype)
    lam.copy_to_device(lam_N)
    nxt = cuda.device_array_like(lam)
    dlams = None
    if lams is not None:
        dlams = lams if _is_device(lams) else cuda.device_array(lams.shape, lams.dtype)
        dlams[-1].copy_to_device(lam)
    work = _Workspace(*lam_N.shape, lam_N.dtype, chunk)
    for n in range(K.shape[0] - 1, -1, -1):
        _adjoint_dev(dstates[n], lam, dK[n], db[n], h, act, nxt, dgK[n], dgb[n],
                     None if ddsig is None else ddsig[n], chunk, work)
        lam, nxt = nxt, lam
        if dlams is not None:
            dlams[n].copy_to_device(lam)
    _back(dgK, gK)
    _back(dgb, gb)
    if lams is not None:
        _back(dlams, lams)
    if _is_device(lam_N):
        return lam
    return lam.copy_to_host()
