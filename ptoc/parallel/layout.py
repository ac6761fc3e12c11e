"""Where layers live: the partition over ranks and the MGRIT level hierarchy.

Rank ``r`` owns the contiguous layers ``a_r .. a_{r+1}-1`` (``numpy.array_split``
sizes: the first ``N mod P`` ranks get one layer more) and the states they produce,
``x_{a_r+1} .. x_{a_{r+1}}``; rank 0 also owns ``x_0``. Only the owner of a layer
uses its parameters.

Solvers run in *solver time*: positions ``0..N`` with step ``i`` mapping position
``i`` to ``i + 1``. For the state sweep step ``i`` is layer ``i``; for the adjoint
sweep, which runs backward, step ``i`` is layer ``N - 1 - i`` and position ``i``
holds ``lambda_{N-i}``. A position is owned by the owner of the step that produces
it (position 0 by the owner of step 0), so every step is computed where its layer
lives.
"""

from __future__ import annotations

import numpy as np


def partition(n_layers: int, n_ranks: int) -> np.ndarray:
    """Layer bounds ``a_0 = 0 < a_1 < ... < a_P = N`` of ``n_ranks`` contiguous blocks."""
    if n_ranks > n_layers:
        raise ValueError(f"cannot spread {n_layers} layers over {n_ranks} ranks or chunks: "
                         "each needs at least one layer (use at most as many as layers)")
    sizes = np.full(n_ranks, n_layers // n_ranks)
    sizes[: n_layers % n_ranks] += 1
    return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


def layer_owner(bounds: np.ndarray) -> np.ndarray:
    """Owner rank of every layer ``0..N-1``."""
    return np.repeat(np.arange(len(bounds) - 1), np.diff(bounds))


def step_layers(n_layers: int, backward: bool) -> np.ndarray:
    """Layer of every solver-time step ``0..N-1``."""
    steps = np.arange(n_layers)
    return n_layers - 1 - steps if backward else steps


def position_owner(bounds: np.ndarray, backward: bool) -> np.ndarray:
    """Owner rank of every solver-time position ``0..N`` (see the module docstring)."""
    N = int(bounds[-1])
    owner_of_step = layer_owner(bounds)[step_layers(N, backward)]
    return np.concatenate([[owner_of_step[0]], owner_of_step])


def mgrit_levels(n_steps: int, coarsening: int, max_levels: int,
                 min_coarse_steps: int) -> list[np.ndarray]:
    """Points (fine positions) of every MGRIT level, finest first.

    Level ``l+1`` keeps every ``m``-th point of level ``l`` and its last point (so a
    last coarse step may be shorter when ``m`` does not divide the number of steps).
    Coarsening stops at ``max_levels`` levels, or before a level would have fewer
    than ``min_coarse_steps`` steps, or when it would no longer shrink the grid.
    Falgout et al. 2014. Theory: :doc:`/theory/mgrit`.
    """
    levels = [np.arange(n_steps + 1, dtype=np.int64)]
    while len(levels) < max_levels:
        fine = levels[-1]
        idx = np.arange(0, len(fine), coarsening)
        if idx[-1] != len(fine) - 1:
            idx = np.append(idx, len(fine) - 1)
        coarse = fine[idx]
        if len(coarse) - 1 < min_coarse_steps or len(coarse) == len(fine):
            break
        levels.append(coarse)
    return levels


def sum_of_squares(r: np.ndarray) -> float:
    """``sum r^2`` without BLAS: a multi-threaded BLAS call leaves worker threads spinning
    that then compete with the compiled kernels' threads for the cores (measured: MGRIT
    3x slower on two cores)."""
    return float(np.sum(np.square(r)))
