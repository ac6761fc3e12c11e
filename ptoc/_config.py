"""Tunables of the compiled kernels, in one place.

Every number that changes how fast a kernel runs, but never what it computes
beyond round-off, lives here. They are read once, when a kernel module is first
imported, so set the environment variables before importing :mod:`ptoc`.

Environment variables
---------------------
PTOC_FASTMATH
    ``1`` (default) lets LLVM contract ``a*b + c`` into fused multiply-adds and
    reassociate sums so that loops vectorise; ``0`` keeps strict IEEE order. Either
    way a kernel is deterministic: the same inputs give the same bits on every run
    and for every number of threads.
PTOC_CHUNK
    Samples per work item of the batch-parallel kernels (default 32). The parameter
    gradient is summed per chunk and the chunk sums are added in chunk order, so
    the result does not depend on the number of threads.
PTOC_CACHE
    ``1`` (default) caches compiled CPU kernels on disk, keyed also on
    :mod:`ptoc._maths`, this file and the compile options (see
    :mod:`ptoc.kernels._cache`), so a cached kernel is never stale and every
    ``PTOC_FASTMATH`` setting has its own entries.
PTOC_WARM_UP
    ``1`` (default): the first kernel of a group (the serial sweeps, or MGRIT's level
    kernels) that a process compiles is compiled together with those of the group's
    small warm-up workloads, in helper processes at once (see
    :mod:`ptoc.kernels._cache`); ``0`` compiles only what is asked for.
PTOC_WORKSPACE_BYTES
    Most bytes of reusable buffers that each of ptoc's workspaces keeps per thread
    after a call returns (default 268435456, 256 MiB; see :mod:`ptoc._workspace`).
    It can also be changed at run time: ``ptoc._config.WORKSPACE_BYTES = ...``.
PTOC_KEEP_FREED_BYTES
    Most bytes of freed memory that the ``ptoc`` command line lets its process keep
    mapped for later arrays (default 268435456, 256 MiB; ``0`` leaves the C library's
    settings alone). See :func:`ptoc.keep_freed_memory`: the library itself never
    changes this process-wide setting.
PTOC_STORED_DERIVATIVE_BYTES
    Most bytes of ``sigma'(a_n)`` that the convolutional ResNet's serial gradient keeps
    from its state sweep for its backward pass (default 2147483648, 2 GiB); layers past
    the bound recompute it (the same numbers, one more convolution each). The same bound
    applies to the implicit stages a neural ODE's gradient keeps from its forward sweep
    (all or none; without them the adjoint runs Newton's method again).
PTOC_CUDA_THREADS
    Threads per block along each axis of the 2-D CUDA launches (default 16, so
    16 x 16 = 256 threads per block).
"""

from __future__ import annotations

import os


def _env_int(name: str, default: int, minimum: int = 1) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None
    if value < minimum:
        raise ValueError(f"environment variable {name}={value} must be >= {minimum}")
    return value


def _env_flag(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    if raw.lower() in {"1", "true", "yes", "on"}:
        return True
    if raw.lower() in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"environment variable {name}={raw!r} is not a boolean (use 0 or 1)")


#: LLVM fast-math flags for the Numba CPU kernels (see module docstring). Only flags
#: that keep NaN and infinity semantics: a diverging run must still produce NaN.
CPU_FASTMATH: set[str] | bool = (
    {"contract", "reassoc", "nsz"} if _env_flag("PTOC_FASTMATH", True) else False
)

#: Samples per chunk of the gradient sums (CPU and CUDA) and per work item of the CUDA
#: and Hamiltonian kernels. The results depend on it (through the order of the sums),
#: so it is passed to every kernel as a runtime argument, never read inside one.
CHUNK: int = _env_int("PTOC_CHUNK", 32)

#: Target samples per work item of the CPU sweeps (``ptoc.kernels.cpu``). A work item
#: is ``chunk * group`` consecutive samples with ``group = CPU_LANES // chunk`` (at
#: least 1), halved while the batch would give fewer than ``CPU_MIN_ITEMS`` work
#: items. The rule reads only the batch size and ``chunk``, never the thread count,
#: so it cannot change a result; it changes only speed (longer inner loops over
#: samples against enough work items to keep every thread busy).
CPU_LANES: int = 128
CPU_MIN_ITEMS: int = 4

#: Narrowest work item of the CPU kernels without gradient sums (state steps and
#: sweeps, adjoint steps of the level kernels), which may split a chunk to reach
#: ``CPU_MIN_ITEMS`` work items on two or more threads (one thread never splits);
#: below 16 samples the vector loops lose more than a second thread gains (measured:
#: d = 16, S = 32, 2 threads).
CPU_MIN_LANES: int = 16

#: Smallest sweep, in multiply-adds per product (batch x width^2 x layers), that the CPU
#: sweep kernels run on several threads; a smaller one runs on the calling thread, with
#: the same work items and so the same bits. A job of only such sweeps never compiles
#: the parallel kernels, which are most of a first run's compile time (``ptoc train``
#: on Peaks: its steps, width 8, depth 32, batch 50, and its evaluation, one layer of
#: 5000 samples per call, stay below). Threads gain little there (two threads against
#: one, ``loss_and_grad``: 5% at width 8, depth 32, batch 50; 10% at batch 100).
CPU_PARALLEL_MIN_WORK: int = 1 << 19

#: Scratch slots per Numba thread of the CPU level kernels (the batched steps of the
#: layer-parallel solvers): a call's tasks (one run or point on one work item each) are
#: shared out in contiguous ranges over at most this many slots per thread, each with
#: its own scratch tiles, so a relaxation of hundreds of runs reuses a few tiles.
#: Changes no result (every sample is computed by the same instructions in any slot).
CPU_SLOTS_PER_THREAD: int = 4

#: Bytes of gradient partials (one ``(d, d)`` matrix per chunk and layer) that the CPU
#: adjoint sweep keeps before adding them up: it processes ``CPU_PARTIAL_BYTES //
#: (n_chunks * (d*d + d) * itemsize)`` layers (at least one) per parallel loop.
CPU_PARTIAL_BYTES: int = 1 << 20

#: Cache compiled CPU kernels on disk. Numba keys its cache on a function's own source
#: file only; :mod:`ptoc.kernels._cache` adds the files the kernels inline or read (this
#: one included) and the compiler flags to the key, so caching is right for any flags.
CACHE: bool = _env_flag("PTOC_CACHE", True)

#: Compile the warm-up workloads' kernels with the first of their group a process needs.
WARM_UP: bool = _env_flag("PTOC_WARM_UP", True)

#: Most bytes of buffers each :class:`ptoc._workspace.Workspace` keeps per thread (there
#: are four: the serial sweeps', the layer-parallel grids', the level steps' and the
#: regulariser's). A buffer over the bound is allocated for its call and freed after it;
#: a smaller bound costs page faults (speed), never a different result. Read at every
#: request, so it may be changed at run time; ``0`` keeps nothing.
WORKSPACE_BYTES: int = _env_int("PTOC_WORKSPACE_BYTES", 256 << 20, minimum=0)

#: Most bytes of freed memory the ``ptoc`` command line keeps mapped for later arrays
#: (:func:`ptoc.keep_freed_memory`, called by :func:`ptoc.cli.main`); ``0``: not called.
KEEP_FREED_BYTES: int = _env_int("PTOC_KEEP_FREED_BYTES", 256 << 20, minimum=0)

#: Most bytes of ``sigma'(a_n)`` kept by a serial gradient's state sweep for the backward
#: pass (:meth:`ptoc.conv.ConvResNetPropagator.gradient_forward`): as many layers as fit,
#: the others recompute their convolution; and of the stages of an implicit neural-ODE
#: scheme kept by its gradient (:func:`ptoc.node.node_loss_and_grad`: all of them or
#: none). Read at every call; ``0`` keeps none.
STORED_DERIVATIVE_BYTES: int = _env_int("PTOC_STORED_DERIVATIVE_BYTES", 2 << 30, minimum=0)

#: Threads per block along each axis of the 2-D CUDA grids (the level kernels of the
#: layer-parallel solvers included: their slow axis runs over runs and samples).
CUDA_THREADS: int = _env_int("PTOC_CUDA_THREADS", 16)

#: Threads per block of the 1-D CUDA grids (the Hamiltonian's chunk sums).
CUDA_LINEAR_THREADS: int = 128
