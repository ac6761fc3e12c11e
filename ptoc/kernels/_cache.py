"""Numba's disk cache for kernels that compile code from other files, never stale.

The staleness problem
---------------------
``numba.njit(cache=True)`` saves a function's machine code on disk and reuses it in
later processes. It finds the saved code by the function's signature, its bytecode,
the CPU, and a hash of the source file *that defines the function*; nothing else.
The kernels of :mod:`ptoc.kernels.cpu` compile code from two more files: they inline
the element functions of :mod:`ptoc._maths` (registered as jitable functions) and
take their compiler flags (fast-math) from :mod:`ptoc._config` and the environment.
An edit to ``_maths.py`` or ``_config.py`` alone, or another ``PTOC_FASTMATH``,
leaves ``cpu.py`` and the bytecode of its functions as they were, so Numba would
keep loading machine code compiled from the old maths or with the other flags.

The rule
--------
Compile such kernels with :func:`njit`, naming the files they compile from besides
their own in ``depends_on``. It compiles exactly like :func:`numba.njit` and, when
``ptoc._config.CACHE`` is on, caches with one more part in the key of every cache
entry: :func:`digest` of those files and of the compile options. Any change to them
gives another key, so the kernel is compiled afresh; a change back finds the earlier
entry again (switching ``PTOC_FASTMATH`` back and forth recompiles nothing).

Nothing is deleted, at import or ever: the entries stay where Numba keeps its cache
(``__pycache__`` next to the module, or ``NUMBA_CACHE_DIR``), and Numba drops a
function's old entries when the file that defines it changes. Delete that directory
to reclaim the space of entries for older digests.

A kernel module that compiles from its own file only (:mod:`ptoc.kernels.rows`)
needs none of this and passes ``cache=True`` to :func:`numba.njit` itself.
"""

from __future__ import annotations

import functools
import hashlib
import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import numba

from .. import _config

try:  # Numba's per-function disk cache, the class that numba.njit(cache=True) uses
    from numba.core.caching import FunctionCache
except ImportError:  # pragma: no cover - only if Numba moves its internals
    FunctionCache = None

Source = ModuleType | str | os.PathLike


@functools.cache
def _file_digest(path: Path) -> bytes:
    return hashlib.sha256(path.read_bytes()).digest()


def _canonical(value: object) -> object:
    """``value`` with sets sorted, so that its ``repr`` does not depend on set order."""
    if isinstance(value, (set, frozenset)):
        return tuple(sorted(value))
    return value


def digest(depends_on: Iterable[Source], options: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the contents of the files ``depends_on`` and of ``options``.

    Parameters
    ----------
    depends_on : iterable of module or path
        The files a kernel compiles from besides the one that defines it; a module
        stands for its ``__file__``.
    options : mapping
        The keyword arguments given to :func:`numba.njit`.

    Returns
    -------
    str
        64 hexadecimal digits; equal digests mean equal files and equal options.
    """
    h = hashlib.sha256()
    for source in depends_on:
        path = Path(source.__file__ if isinstance(source, ModuleType) else source)
        h.update(_file_digest(path.resolve()))
    h.update(repr(sorted((k, _canonical(v)) for k, v in options.items())).encode())
    return h.hexdigest()


if FunctionCache is not None:

    class _KeyedCache(FunctionCache):
        """Numba's disk cache of one function, with ``extra_key`` in every index key."""

        def __init__(self, py_func: Callable, extra_key: str):
            self._extra_key = extra_key
            super().__init__(py_func)

        def _index_key(self, sig, codegen):
            return (*super()._index_key(sig, codegen), self._extra_key)


def _enable(dispatcher: Any, extra_key: str) -> None:
    """Give ``dispatcher`` a disk cache keyed also on ``extra_key``.

    This does what ``Dispatcher.enable_caching`` (``cache=True``) does, with
    :class:`_KeyedCache` in place of Numba's ``FunctionCache``. If Numba's internals
    are not as expected, the kernel is left uncached (compiled in every process) with
    a warning: slower, never stale.
    """
    if FunctionCache is None or not hasattr(FunctionCache, "_index_key") \
            or not hasattr(dispatcher, "_cache"):
        warnings.warn("ptoc: this Numba's cache internals are not the expected ones; "
                      "compiled kernels are not cached on disk", RuntimeWarning, stacklevel=3)
        return
    try:
        dispatcher._cache = _KeyedCache(dispatcher.py_func, extra_key)
    except RuntimeError:  # Numba found no writable cache directory: compile every time
        pass


def njit(depends_on: Iterable[Source] = (), **options: Any) -> Callable[[Callable], Any]:
    """:func:`numba.njit` with a disk cache that also covers ``depends_on`` and ``options``.

    Parameters
    ----------
    depends_on : iterable of module or path
        The files the decorated function compiles code from besides its own file, such
        as the modules of the jitable functions it calls.
    **options
        Keyword arguments of :func:`numba.njit` (``parallel``, ``fastmath``, ...), but not
        ``cache``: the function is cached when ``ptoc._config.CACHE`` is on.

    Returns
    -------
    decorator
        Turns a Python function into a Numba dispatcher.

    Examples
    --------
    In a kernel module that inlines :mod:`ptoc._maths`::

        @njit(depends_on=(_maths, _config), parallel=True, fastmath=True)
        def kernel(x): ...
    """
    if "cache" in options:
        raise TypeError("ptoc.kernels._cache.njit caches by itself (ptoc._config.CACHE); "
                        "do not pass cache=")
    depends_on = tuple(depends_on)

    def decorate(fn: Callable) -> Any:
        dispatcher = numba.njit(**options)(fn)
        if _config.CACHE:
            try:
                key = digest(depends_on, options)
            except OSError:  # a source that is not a readable file (a zip install)
                return dispatcher  # uncached: slower, never stale
            _enable(dispatcher, key)
        return dispatcher

    return decorate
