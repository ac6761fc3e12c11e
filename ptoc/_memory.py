"""Keeping freed memory for the next arrays: large fresh arrays without page faults.

Every call of ``ptoc.forward``, ``ptoc.adjoint`` or an MGRIT solve returns new arrays
of all states (or adjoints). With glibc's default settings a freed block of several
megabytes is handed back to the operating system (an ``mmap`` block is unmapped; the
free top of the heap is trimmed once it exceeds a threshold that glibc adapts, up to
twice the block size), and the next call's arrays fault every page in afresh. On
virtual machines a page fault can cost most of a microsecond: on the 2-core
development machine (a Firecracker VM), ``ptoc.forward`` at width 16, batch 32,
1024 layers (two 4 MiB arrays, states and ``sigma'``) took 2.8 us per layer this way,
against 0.7 us once freed memory was kept for reuse (about 1000 page faults per call
before, none after; ``loss_and_grad``, serial or with MGRIT, faulted no page per call
at that shape either way).

:func:`keep_freed_memory` raises glibc's two thresholds so that blocks up to a size
come from the heap and up to ``max_bytes`` of freed heap stay mapped for reuse. It is
a setting of the whole process, so the library never makes it by itself; the
``ptoc`` command line does, for its own process (``PTOC_KEEP_FREED_BYTES``,
:mod:`ptoc._config`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

from ._checks import check_integer

#: ``mallopt`` parameters (glibc ``malloc.h``).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: The largest ``M_MMAP_THRESHOLD`` glibc accepts on 64-bit systems (32 MiB); larger
#: blocks are always mapped afresh.
MMAP_THRESHOLD_MAX = 32 << 20


def keep_freed_memory(max_bytes: int = 256 << 20) -> bool:
    """Keep up to ``max_bytes`` of freed memory mapped for the next allocations (glibc).

    Sets glibc's ``M_MMAP_THRESHOLD`` to ``min(max_bytes, 32 MiB)`` (blocks below it come
    from the heap, whose freed memory is reused) and ``M_TRIM_THRESHOLD`` to
    ``max_bytes`` (the free top of the heap is handed back to the system only beyond
    it). Repeated calls that allocate and drop arrays of the same sizes then reuse
    memory whose pages are already mapped. The cost: the process may hold up to
    ``max_bytes`` of memory it does not use. Blocks of 32 MiB or more are mapped afresh
    whatever the setting.

    Parameters
    ----------
    max_bytes : int
        Most bytes of freed heap kept mapped (positive).

    Returns
    -------
    bool
        True if glibc took both settings; False where the C library is not glibc
        (macOS, musl, Windows), where nothing is changed.

    Raises
    ------
    ValueError
        If ``max_bytes`` is not a positive integer.
    """
    max_bytes = check_integer("max_bytes", max_bytes, minimum=1)
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    path = ctypes.util.find_library("c")
    if path is None:
        return False
    mallopt = ctypes.CDLL(path).mallopt
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    limit = min(max_bytes, 2**31 - 1)  # mallopt takes an int: at most 2 GiB - 1
    ok_mmap = mallopt(M_MMAP_THRESHOLD, min(limit, MMAP_THRESHOLD_MAX))
    ok_trim = mallopt(M_TRIM_THRESHOLD, limit)
    return bool(ok_mmap and ok_trim)
