"""Layer-parallel solvers: parareal and MGRIT for the state and adjoint sweeps.

Strategies (:class:`Serial`, :class:`Parareal`, :class:`MGRIT`) are passed as ``solver=``
to :func:`ptoc.forward`, :func:`ptoc.adjoint` and :func:`ptoc.loss_and_grad`; ranks come
from ``comm=`` (:class:`SimulatedRanks` in one process, :class:`MPIRanks` under
``mpiexec``); a rank that fails, or ranks given different problems, end the run on
every rank (:mod:`ptoc.parallel.comm`, *Failures*). Theory: :doc:`/theory/parareal`,
:doc:`/theory/mgrit`.
"""

from .comm import (
    CollectiveError,
    Communicator,
    MPIRanks,
    RankFailedError,
    RanksDisagreeError,
    SimulatedRanks,
    SingleRank,
    StepCount,
)
from .driver import (
    GradientResult,
    local_gradient,
    owned_layers,
    parallel_adjoint,
    parallel_forward,
    parallel_gradient,
    solve_adjoints,
    solve_states,
)
from .layout import mgrit_levels, partition
from .mgrit import MGRIT
from .options import CoarseWeights, Cycle, DivergenceError, Relaxation, SolveResult, SweepSolver
from .parareal import Parareal
from .serial import Serial
from .solvers import check_solver

__all__ = [
    "MGRIT",
    "CoarseWeights",
    "CollectiveError",
    "Communicator",
    "Cycle",
    "DivergenceError",
    "GradientResult",
    "MPIRanks",
    "Parareal",
    "RankFailedError",
    "RanksDisagreeError",
    "Relaxation",
    "Serial",
    "SimulatedRanks",
    "SingleRank",
    "SolveResult",
    "SweepSolver",
    "StepCount",
    "check_solver",
    "local_gradient",
    "mgrit_levels",
    "owned_layers",
    "parallel_adjoint",
    "parallel_forward",
    "parallel_gradient",
    "partition",
    "solve_adjoints",
    "solve_states",
]
