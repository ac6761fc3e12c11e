"""The serial sweep as a strategy: layer after layer, passed from rank to rank.

On several ranks the sweep is a pipeline: each rank waits for the value before its
first position, runs its steps, and passes its last value on. It is the reference
every parallel solver must match; one-level MGRIT is this sweep.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .comm import Communicator
from .options import SweepOutcome, SweepSolver
from .problem import Block, SweepProblem

TAG_SERIAL = 6


@dataclass(frozen=True)
class Serial(SweepSolver):
    """The serial sweep: layer after layer (the reference every parallel solver must match).

    The state and adjoint sweeps of :doc:`/theory/resnet` and :doc:`/theory/adjoint`;
    one-level MGRIT is this sweep (:doc:`/theory/mgrit`).
    """

    name = "serial"

    def solve_sweep(self, comm: Communicator, problem: SweepProblem, u0, shape, dtype,
                    guess=None) -> SweepOutcome:
        return SweepOutcome(serial_pipeline(comm, problem, u0, shape, dtype), converged=True,
                            iterations=1, residuals=[])


def serial_pipeline(comm: Communicator, problem: SweepProblem, u0, shape, dtype) -> Block:
    """Run the sweep as a pipeline through the ranks; returns this rank's positions (the
    value before its first step included)."""
    mine = np.flatnonzero(problem.owner == comm.rank)
    lo, hi = int(mine[0]), int(mine[-1]) + 1
    base = lo if lo == 0 else lo - 1
    u = np.empty((hi - base,) + tuple(shape), dtype)
    u[0] = u0 if lo == 0 else comm.recv(int(problem.owner[base]), TAG_SERIAL)
    if len(u) > 1:
        problem.level_steps(0, np.arange(problem.n_steps + 1), base, hi).runs(
            u, None, [1], [len(u) - 1])
    if hi < len(problem.owner):
        comm.send(u[-1], int(problem.owner[hi]), TAG_SERIAL)
    return Block(base, u)
