"""Reusable per-thread scratch buffers."""

from __future__ import annotations

import threading

import numpy as np


class Scratch(threading.local):
    """Per-thread buffers reused across calls, for arrays that never leave their caller.

    Allocating big arrays afresh on every call costs page faults that, for mid-sized
    problems, take longer than the kernels (the serial sweeps' states and derivatives,
    MGRIT's grids). ``get(name, shape, dtype)`` returns a buffer of that shape, the
    same one as last time when possible; its content is undefined. The ``capacity``
    most recent buffers are kept; :meth:`clear` frees them.
    """

    def __init__(self, capacity: int = 8) -> None:
        self.capacity = capacity
        self.buffers: dict[tuple, np.ndarray] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        key = (name, shape, np.dtype(dtype))
        buf = self.buffers.pop(key, None)
        if buf is None:
            buf = np.empty(shape, dtype)
            while len(self.buffers) >= self.capacity:
                self.buffers.pop(next(iter(self.buffers)))
        self.buffers[key] = buf  # most recently used last
        return buf


    def zeros(self, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        """Like :meth:`get`, filled with zeros."""
        buf = self.get(name, shape, dtype)
        buf.fill(0)
        return buf

    def clear(self) -> None:
        self.buffers.clear()
