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

* level kernels (the batched steps of the layer-parallel solvers): one launch per step
  index ``t`` of all runs (or points) of a call together, thread ``(r*S + s, i)``
  computing entry ``(s, i)`` of position ``starts[r] + t`` of run ``r``; the adjoint
  steps form ``g = D * lambda`` for every run in one launch (``D``, the steps'
  ``sigma'``, comes from ``level_derivatives``, thread ``((k-1)*S + s, i)`` per entry,
  once per solve) and then ``adjoint_entry`` in another.

Where the data lives. Every copy between host and device goes through
:func:`to_device` or :func:`_download`, which count it (:func:`transfer_counts`,
:func:`counting_transfers`), and a kernel is never launched with a host array (Numba
would copy it unseen; :func:`_launch` refuses). A function given host arrays copies
each input to the device once, runs all its steps there and copies its results back
once; given device arrays, it leaves them there. So a level kernel call moves its
arrays once each way whatever the number of steps, and the level steps of the dense
ResNet (:class:`ptoc.propagator.ResNetLevelSteps`) keep a level's weights (and the
adjoint's states) on the device for a whole solve, so that a relaxation moves only
the level's values ``u`` (and the right-hand side ``g``) and its index array.

The element functions of :mod:`ptoc._maths` (all of them, ``_maths.CUDA_FUNCTIONS``)
are registered with numba-cuda's ``register_jitable``, so these kernels call that very
code; the CPU target calls ``activation`` from it and writes the sums as tile loops
that add the same terms in the same order (see :mod:`ptoc._maths`).
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

try:
    from numba import cuda
except ImportError as exc:  # pragma: no cover - exercised only without numba-cuda
    raise ImportError(f"numba.cuda is unavailable: {exc}") from exc

from .. import _config, _maths
from . import reference

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


# --- copies between host and device, all counted ----------------------------------------------

@dataclass
class TransferCounts:
    """Numbers of copies between host and device.

    Attributes
    ----------
    to_device : int
        Host-to-device copies.
    to_host : int
        Device-to-host copies.
    """

    to_device: int = 0
    to_host: int = 0

    @property
    def total(self) -> int:
        """All copies, both ways."""
        return self.to_device + self.to_host


#: The copies made since the module was imported (guarded by ``_LOCK``).
_counts = TransferCounts()


def transfer_counts() -> TransferCounts:
    """The copies between host and device made so far in this process (a snapshot)."""
    with _LOCK:
        return TransferCounts(_counts.to_device, _counts.to_host)


@contextlib.contextmanager
def counting_transfers() -> Iterator[TransferCounts]:
    """Count the copies made inside a ``with`` block (from every thread).

    Yields a :class:`TransferCounts` that holds the numbers once the block ends::

        with counting_transfers() as moved:
            ptoc.loss_and_grad(net, p, X, y, target="cuda", solver=ptoc.MGRIT())
        moved.total
    """
    start = transfer_counts()
    moved = TransferCounts()
    try:
        yield moved
    finally:
        end = transfer_counts()
        moved.to_device = end.to_device - start.to_device
        moved.to_host = end.to_host - start.to_host


def to_device(host, dtype=None, into=None):
    """Copy a host array to the device (counted) and return the device array.

    ``dtype`` converts it first (on the host); ``into``, a device array of the same
    shape, receives the copy instead of a new array. A device array is returned as it
    is (no copy), and None stays None.
    """
    with _LOCK:  # the simulator swaps this module's ``cuda`` while a kernel runs
        if host is None or _is_device(host):
            return host
        host = np.ascontiguousarray(host, dtype=dtype)
        _counts.to_device += 1
        if into is None:
            return cuda.to_device(host)
        into.copy_to_device(host)
        return into


def _download(device_array, into=None) -> np.ndarray:
    """Copy a device array to the host (counted), into ``into`` when given."""
    with _LOCK:
        _counts.to_host += 1
        if into is None:
            return device_array.copy_to_host()
        if into.flags.c_contiguous:
            device_array.copy_to_host(into)
        else:  # e.g. a view with a negative stride
            into[...] = device_array.copy_to_host()
        return into


def _launch(kernel, blocks, threads, *args) -> None:
    """Launch ``kernel``; every array argument must already be on the device, since
    Numba would copy a host array both ways without the counter seeing it."""
    for a in args:
        if isinstance(a, np.ndarray):
            raise TypeError(f"internal error: host array of shape {a.shape} passed to CUDA "
                            f"kernel {getattr(kernel, '__name__', kernel)}; copy it with "
                            "to_device first")
    kernel[blocks, threads](*args)


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


# --- level kernels: step ``t`` of every run (or point) of a call ---------------------------------
#
# Thread ``(i, r*S + s)`` computes entry ``(s, i)`` of position ``k = first[r] + t`` of run
# ``r``, when ``k <= last[r]`` (points are runs of one step, ``first = last``). The result
# goes to ``u[k]`` (runs) or to ``out[r]`` (points, ``into_out``). The arithmetic of each
# entry is that of ``_step_kernel`` and of ``_g_kernel`` and ``_adjoint_kernel``, then
# ``+ g[k]`` when ``has_g``: the order of the CPU level kernels.

def _level_entry(i, row, shape, first, last, t):
    """``(r, k, s)`` of thread ``(i, row)`` of a level launch over values of ``shape``
    (positions, S, d): run ``r``, position ``k = first[r] + t``, sample ``s``; ``k = 0``
    when the thread has no entry (every position a step produces is at least 1)."""
    S = shape[1]
    r = row // S
    s = row - r * S
    k = 0
    if r < first.shape[0] and i < shape[2]:
        k = first[r] + t
        if k > last[r]:
            k = 0
    return r, k, s


_register(_level_entry)


@cuda.jit
def _state_level_kernel(u, g, has_g, K, b, dt, act, first, last, t, out, into_out):
    i, row = cuda.grid(2)
    r, k, s = _level_entry(i, row, u.shape, first, last, t)
    if k > 0:
        x = u[k - 1]
        v = x[s, i] + dt[k] * _activation(_preactivation(x, K[k], b[k], s, i), act)[0]
        if has_g:
            v = v + g[k, s, i]
        if into_out:
            out[r, s, i] = v
        else:
            u[k, s, i] = v


@cuda.jit
def _derivatives_kernel(X, K, b, act, out):
    i, row = cuda.grid(2)
    S = X.shape[1]
    k = 1 + row // S
    s = row - (k - 1) * S
    if k < X.shape[0] and i < X.shape[2]:
        out[k, s, i] = _activation(_preactivation(X[k], K[k], b[k], s, i), act)[1]


@cuda.jit
def _adjoint_level_g_kernel(lam, D, first, last, t, gg):
    i, row = cuda.grid(2)
    r, k, s = _level_entry(i, row, lam.shape, first, last, t)
    if k > 0:
        gg[r, s, i] = D[k, s, i] * lam[k - 1, s, i]


@cuda.jit
def _adjoint_level_kernel(lam, g, has_g, K, dt, first, last, t, gg, out, into_out):
    j, row = cuda.grid(2)
    r, k, s = _level_entry(j, row, lam.shape, first, last, t)
    if k > 0:
        v = _adjoint_entry(lam[k - 1], K[k], gg[r], s, dt[k], s, j)
        if has_g:
            v = v + g[k, s, j]
        if into_out:
            out[r, s, j] = v
        else:
            lam[k, s, j] = v


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


_to_device = to_device


@functools.cache
def _dummy(dtype, ndim):
    """A 1-element device array standing in for an absent optional argument (never read
    or written, so it is allocated without a copy)."""
    return cuda.device_array((1,) * ndim, dtype=dtype)


def _back(device_array, host):
    """Copy a device result back into ``host`` when the caller passed a host array."""
    if host is not None and not _is_device(host):
        _download(device_array, host)


def _step_dev(x, K, b, h, act, out, dsig):
    store = dsig is not None
    S, d = x.shape
    blocks, threads = _grid2(d, S)
    _launch(_step_kernel, blocks, threads, x, K, b, h, act, out,
            dsig if store else _dummy(x.dtype, 2), store)


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
    _launch(_g_kernel, blocks, threads, x, lam, K, b, act, dsig if have else work.dummy, have,
            work.g)
    if out is not None:
        _launch(_adjoint_kernel, blocks, threads, lam, K, work.g, h, out)
    if gK is not None:
        blocks, threads = _grid2(d * d, work.n_chunks)
        _launch(_partials_kernel, blocks, threads, work.g, x, h, chunk, work.part_K,
                work.part_b)
        blocks, threads = _grid2(d, d)
        _launch(_add_partials_kernel, blocks, threads, work.part_K, work.part_b, gK, gb)


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
    threads = min(_config.CUDA_LINEAR_THREADS, n_chunks)
    _launch(_hamiltonian_kernel, (n_chunks + threads - 1) // threads, threads,
            *map(_to_device, (x, p, K, b)), h, act, chunk, part)
    total = 0.0 * h
    for v in _download(part):
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
    if _is_device(lam_N):
        lam.copy_to_device(lam_N)  # on the device
    else:
        to_device(lam_N, into=lam)
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
    return _download(lam)


# --- level kernels: many steps of one MGRIT/parareal level in one call ---------------------------
#
# Same contract as in kernels.reference and kernels.cpu (the adjoint's thread reads a column
# of ``K``). Each call copies its host arrays to the device once, launches the kernels of
# all its steps there, and copies ``u`` (or ``out``) back once.

def _index_pair(first, last) -> tuple[int, int, object]:
    """``(runs, longest run, device array (2, runs) of first and last positions)``."""
    first = np.asarray(first, dtype=np.int64)
    last = np.asarray(last, dtype=np.int64)
    if not len(first):
        return 0, 0, None
    return len(first), int(np.max(last - first)) + 1, to_device(np.stack([first, last]))


def _state_level(u, g, K, b, dt, act, first, last, out):
    n_runs, n_steps, idx = _index_pair(first, last)
    if not n_runs:
        return
    du = to_device(u)
    dg = to_device(g)
    dK, db, ddt = to_device(K), to_device(b), to_device(dt, dtype=u.dtype)
    into_out = out is not None
    dout = cuda.device_array(out.shape, out.dtype) if into_out else du
    _, S, d = u.shape
    blocks, threads = _grid2(d, n_runs * S)
    for t in range(n_steps):
        _launch(_state_level_kernel, blocks, threads, du, du if dg is None else dg,
                dg is not None, dK, db, ddt, act, idx[0], idx[1], t, dout, into_out)
    _back(dout, out if into_out else u)


def _adjoint_level(lam, g, D, K, dt, first, last, out):
    n_runs, n_steps, idx = _index_pair(first, last)
    if not n_runs:
        return
    dlam = to_device(lam)
    dg = to_device(g)
    dD, dK, ddt = to_device(D), to_device(K), to_device(dt, dtype=lam.dtype)
    into_out = out is not None
    dout = cuda.device_array(out.shape, out.dtype) if into_out else dlam
    _, S, d = lam.shape
    gg = cuda.device_array((n_runs, S, d), lam.dtype)
    blocks, threads = _grid2(d, n_runs * S)
    for t in range(n_steps):
        _launch(_adjoint_level_g_kernel, blocks, threads, dlam, dD, idx[0], idx[1], t, gg)
        _launch(_adjoint_level_kernel, blocks, threads, dlam, dlam if dg is None else dg,
                dg is not None, dK, ddt, idx[0], idx[1], t, gg, dout, into_out)
    _back(dout, out if into_out else lam)


@_serialized
def state_runs(u, g, K, b, dt, act, starts, ends, chunk):
    _state_level(u, g, K, b, dt, act, starts, ends, None)


@_serialized
def state_points(u, K, b, dt, act, positions, out, chunk):
    _state_level(u, None, K, b, dt, act, positions, positions, out)


def state_points_into(u, K, b, dt, act, positions, out, rows, g, mode, chunk):
    """:func:`state_points`, then the end that ``mode`` chooses, on the host
    (:func:`ptoc.kernels.reference.point_ends`)."""
    phi = np.empty((len(positions),) + u.shape[1:], u.dtype)
    state_points(u, K, b, dt, act, positions, phi, chunk)
    reference.point_ends(phi, u, g, positions, out, rows, mode)


@_serialized
def level_derivatives(X, K, b, act, out, chunk):
    """``out[k] = sigma'(X[k] K[k]^T + b[k])``, ``k >= 1``; ``out=None``: a new device array."""
    n, S, d = X.shape
    dX, dK, db = to_device(X), to_device(K), to_device(b)
    dout = cuda.device_array(X.shape, X.dtype) if out is None else to_device(out)
    if n > 1:
        blocks, threads = _grid2(d, (n - 1) * S)
        _launch(_derivatives_kernel, blocks, threads, dX, dK, db, act, dout)
    _back(dout, out)
    return dout if out is None else out


@_serialized
def adjoint_runs(lam, g, D, K, dt, starts, ends, chunk):
    _adjoint_level(lam, g, D, K, dt, starts, ends, None)


@_serialized
def adjoint_points(lam, D, K, dt, positions, out, chunk):
    _adjoint_level(lam, None, D, K, dt, positions, positions, out)


def adjoint_points_into(lam, D, K, dt, positions, out, rows, g, mode, chunk):
    """:func:`adjoint_points`, then the end that ``mode`` chooses, on the host."""
    phi = np.empty((len(positions),) + lam.shape[1:], lam.dtype)
    adjoint_points(lam, D, K, dt, positions, phi, chunk)
    reference.point_ends(phi, lam, g, positions, out, rows, mode)


@_serialized
def layer_gradients(xs, lams, K, b, h, act, gK, gb, chunk):
    if not len(xs):
        return
    h = xs.dtype.type(h)
    dxs, dlams, dK, db, dgK, dgb = map(to_device, (xs, lams, K, b, gK, gb))
    work = _Workspace(*xs.shape[1:], xs.dtype, chunk)
    for n in range(K.shape[0]):
        _adjoint_dev(dxs[n], dlams[n], dK[n], db[n], h, act, None, dgK[n], dgb[n], None, chunk,
                     work)
    _back(dgK, gK)
    _back(dgb, gb)
