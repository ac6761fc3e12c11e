"""The per-thread workspace: reusable buffers for arrays that never leave their caller."""

from __future__ import annotations

import threading

import numpy as np
import numpy.typing as npt


class Workspace(threading.local):
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
            still kept, else a new one (the least recently used buffer is dropped when
            ``capacity`` are kept).
        """
        key = (name, shape, np.dtype(dtype))
        buf = self.buffers.pop(key, None)
        if buf is None:
            buf = np.empty(shape, dtype)
            while len(self.buffers) >= self.capacity:
                self.buffers.pop(next(iter(self.buffers)))
        self.buffers[key] = buf  # most recently used last
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
