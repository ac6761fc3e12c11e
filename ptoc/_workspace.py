"""The per-thread workspace: reusable buffers for arrays that never leave their caller."""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import TypeVar

import numpy as np
import numpy.typing as npt

from . import _config

#: Bytes a kept buffer is charged on top of its data (the array object and its key), so
#: that the bound on bytes also bounds the number of kept buffers, empty ones included.
BUFFER_OVERHEAD_BYTES = 128

T = TypeVar("T")


class Workspace(threading.local):
    """Per-thread buffers reused across calls, for arrays that never leave their caller.

    Allocating big arrays afresh on every call costs page faults that, for mid-sized
    problems, take longer than the kernels (the serial sweeps' states and derivatives,
    MGRIT's grids). ``get(name, shape, dtype)`` returns a buffer of that shape, the
    same one as last time when possible; its content is undefined.

    What is kept is bounded twice: at most ``capacity`` buffers, and at most
    ``max_bytes`` bytes in all (each buffer counts its ``nbytes`` plus
    :data:`BUFFER_OVERHEAD_BYTES`). The least recently used buffers are dropped first;
    a buffer larger than ``max_bytes`` on its own is returned but not kept. Dropping a
    buffer never disturbs a caller that still holds it: it only stops being reused.
    :meth:`clear` frees them all.

    Parameters
    ----------
    capacity : int
        Most buffers kept.
    max_bytes : int, optional
        Most bytes kept; None (default) reads :data:`ptoc._config.WORKSPACE_BYTES` at
        every call, so that changing that setting takes effect at once, in every thread.
    """

    def __init__(self, capacity: int = 8, max_bytes: int | None = None) -> None:
        self.capacity = capacity
        self.max_bytes = max_bytes
        self.buffers: dict[tuple, np.ndarray] = {}
        self._held = 0  # the sum of _charge over self.buffers, kept up to date

    @property
    def byte_limit(self) -> int:
        """The bound on :attr:`held_bytes` in force now."""
        return _config.WORKSPACE_BYTES if self.max_bytes is None else self.max_bytes

    @property
    def held_bytes(self) -> int:
        """Bytes the kept buffers of the calling thread are charged (data and overhead)."""
        return self._held

    def get(self, name: str, shape: tuple[int, ...], dtype: npt.DTypeLike) -> np.ndarray:
        """A buffer of ``shape`` and ``dtype`` for ``name``, with undefined content.

        Parameters
        ----------
        name : str
            What the buffer holds; buffers of different names are never shared.
        shape : tuple of int
            Its shape.
        dtype : data-type
            Its element type.

        Returns
        -------
        ndarray
            The buffer last returned for the same ``(name, shape, dtype)`` if it is
            still kept, else a new one. It is kept (as the most recently used) when it
            fits the bounds after the least recently used buffers are dropped.
        """
        key = (name, tuple(shape), np.dtype(dtype))
        buffers = self.buffers
        buf = buffers.get(key)
        if (buf is not None and self._held <= self.byte_limit
                and len(buffers) <= self.capacity):
            # a kept buffer, within bounds that have not been lowered since: only its
            # place in the order changes (what the general path below does then too)
            del buffers[key]
            buffers[key] = buf
            return buf
        buf = buffers.pop(key, None)
        if buf is None:
            buf = np.empty(shape, dtype)
        else:
            self._held -= _charge(buf)
        limit, cost = self.byte_limit, _charge(buf)
        if cost > limit:
            return buf  # too big to keep: the caller's own array
        while self.buffers and (len(self.buffers) >= self.capacity
                                or self._held + cost > limit):
            self._held -= _charge(self.buffers.pop(next(iter(self.buffers))))
        self.buffers[key] = buf  # most recently used last
        self._held += cost
        return buf

    def zeros(self, name: str, shape: tuple[int, ...],
              dtype: npt.DTypeLike) -> np.ndarray:
        """Like :meth:`get`, filled with zeros."""
        buf = self.get(name, shape, dtype)
        buf.fill(0)
        return buf

    def clear(self) -> None:
        """Drop every buffer of the calling thread."""
        self.buffers.clear()
        self._held = 0


def _charge(buf: np.ndarray) -> int:
    return buf.nbytes + BUFFER_OVERHEAD_BYTES


def array_bytes(obj: object, _depth: int = 0) -> int:
    """Bytes of the NumPy arrays reachable from ``obj`` through tuples, lists, dicts and
    the attributes of plain objects (four levels deep at most)."""
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if _depth >= 4:
        return 0
    if isinstance(obj, (tuple, list)):
        items = obj
    elif isinstance(obj, dict):
        items = obj.values()
    elif hasattr(obj, "__dict__"):
        items = vars(obj).values()
    else:
        return 0
    return sum(array_bytes(o, _depth + 1) for o in items)


def bounded_cache(max_bytes: int) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Like :func:`functools.lru_cache`, bounded in bytes instead of entries.

    Keeps the results of a function of hashable arguments, least recently used first
    out, so that the arrays they hold (:func:`array_bytes`, plus
    :data:`BUFFER_OVERHEAD_BYTES` an entry) come to at most ``max_bytes``; a result
    larger than that on its own is returned and not kept. Thread-safe. The wrapper's
    ``cache_bytes()`` gives the bytes kept and ``cache_clear()`` drops them all.
    """

    def decorate(fn: Callable[..., T]) -> Callable[..., T]:
        entries: OrderedDict[tuple, tuple[T, int]] = OrderedDict()
        lock = threading.Lock()

        @functools.wraps(fn)
        def cached(*args: object) -> T:
            with lock:
                hit = entries.get(args)
                if hit is not None:
                    entries.move_to_end(args)
                    return hit[0]
            value = fn(*args)
            cost = array_bytes(value) + BUFFER_OVERHEAD_BYTES
            if cost <= max_bytes:
                with lock:
                    entries[args] = (value, cost)
                    held = sum(c for _, c in entries.values())
                    while held > max_bytes:
                        held -= entries.popitem(last=False)[1][1]
            return value

        cached.cache_bytes = lambda: sum(c for _, c in entries.values())  # type: ignore[attr-defined]
        cached.cache_clear = entries.clear  # type: ignore[attr-defined]
        return cached

    return decorate
