"""Layer-parallel solvers: parareal and MGRIT for the state and adjoint sweeps.

Strategies (:class:`Serial`, :class:`Parareal`, :class:`MGRIT`) are passed as ``solver=``
to :func:`ptoc.forward`, :func:`ptoc.adjoint` and :func:`ptoc.loss_and_grad`; ranks come
from ``comm=`` (:class:`SimulatedRanks` in one process, :class:`MPIRanks` under
``mpiexec``). Theory: :doc:`/theory/parareal`, :doc:`/theory/mgrit`.
"""

from .comm import Communicator, MPIRanks, RankFailedError, SimulatedRanks, SingleRank, StepCount
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
from .options import (
    MGRIT,
    CoarseWeights,
    Cycle,
    DivergenceError,
    Parareal,
    Relaxation,
    Serial,
    SolveResult,
    check_solver,
)

__all__ = [
    "MGRIT",
    "CoarseWeights",
    "Communicator",
    "Cycle",
    "DivergenceError",
    "GradientResult",
    "MPIRanks",
    "Parareal",
    "RankFailedError",
    "Relaxation",
    "Serial",
    "SimulatedRanks",
    "SingleRank",
    "SolveResult",
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
