"""The options shared by the solver strategies, their base class and their record.

A strategy (:class:`~ptoc.parallel.Serial`, :class:`~ptoc.parallel.Parareal`,
:class:`~ptoc.parallel.MGRIT`, each beside its algorithm) is a frozen dataclass of
options deriving from :class:`SweepSolver`; it is passed to :func:`ptoc.forward`,
:func:`ptoc.adjoint` and :func:`ptoc.loss_and_grad` as ``solver=``. Options are enums
or numbers, never integer codes. Every solve returns a :class:`SolveResult`.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from .._options import OptionEnum
from .comm import CollectiveError


class CoarseWeights(OptionEnum, what="coarse-weight rule"):
    """Weights of a coarse step covering layers ``s..e-1`` (:doc:`/theory/mgrit`).

    ``INJECT``: those of layer ``s`` (the fine layer at the coarse step's start time).
    ``AVERAGE``: the mean over layers ``s..e-1``.
    """

    INJECT = "inject"
    AVERAGE = "average"


class Relaxation(OptionEnum, what="relaxation"):
    """MGRIT relaxation on a level: ``F`` (F-relaxation only) or ``FCF`` (F, then C, then F)."""

    F = "F"
    FCF = "FCF"

    @property
    def cf_sweeps(self) -> int:
        """Number of CF sweeps after the F-relaxation."""
        return {Relaxation.F: 0, Relaxation.FCF: 1}[self]


class Cycle(OptionEnum, what="cycle"):
    """MGRIT cycle: ``V`` or ``F`` (an F-cycle revisits each coarse level with a V-cycle)."""

    V = "V"
    F = "F"


class SweepSolver(abc.ABC):
    """A strategy that solves one sweep (state or adjoint) on a communicator's ranks.

    :class:`~ptoc.parallel.Serial`, :class:`~ptoc.parallel.Parareal` and
    :class:`~ptoc.parallel.MGRIT` derive from it; each runs its own algorithm in
    :meth:`solve_sweep`, so the drivers never ask which one they hold.
    """

    name: ClassVar[str]

    def simulated_ranks(self) -> int | None:
        """The number of simulated ranks to run on when no communicator is given
        (None: one rank)."""
        return None

    def check_layout(self, n_layers: int, n_ranks: int) -> None:
        """Raise ``ValueError`` (identically on every rank, before any step) when the
        solver cannot run ``n_layers`` layers on ``n_ranks`` ranks."""
        if n_ranks > n_layers:
            raise ValueError(f"{n_ranks} ranks for {n_layers} layers: every rank needs at "
                             "least one layer")

    def check_propagator(self, prop: Any) -> None:
        """Raise ``TypeError`` when ``prop`` lacks an optional ability this solver needs
        (the default needs none)."""
        return None

    @abc.abstractmethod
    def solve_sweep(self, comm: Any, problem: Any, u0: np.ndarray | None,
                    shape: tuple[int, ...], dtype: Any,
                    guess: dict[int, np.ndarray] | None) -> SweepOutcome:
        """Solve the sweep ``problem`` (a :class:`~ptoc.parallel.problem.SweepProblem`)
        as the program of one rank of ``comm``, from ``u0`` (on the rank owning
        position 0) and the optional warm start ``guess`` (this rank's positions)."""


@dataclass
class SweepOutcome:
    """What :meth:`SweepSolver.solve_sweep` returns on one rank."""

    local: Any  # ptoc.parallel.problem.Block: this rank's positions, ghost included
    converged: bool
    iterations: int
    residuals: list[float]
    levels: int | None = None


@dataclass
class SolveResult:
    """Record of one layer-parallel solve (state or adjoint sweep).

    The layer-step counts are the cost model of :doc:`/architecture` (one unit
    per fine or coarse layer step, communication free). Theory:
    :doc:`/theory/parareal`, :doc:`/theory/mgrit`.

    Attributes
    ----------
    method : str
        ``"serial"``, ``"parareal"`` or ``"mgrit"``.
    sweep : str
        ``"forward"`` (states) or ``"adjoint"``.
    residuals : list of float
        Residual norms, one per iterate, oldest first (empty for the serial sweep).
        Parareal: ``iterations + 1`` values, ``residuals[k]`` that of the iterate after
        ``k`` corrections (``residuals[0]``: the coarse prediction, iteration 0 of Lions,
        Maday & Turinici). MGRIT: ``iterations`` values, ``residuals[k - 1]`` that after
        ``k`` cycles (the initial guess is not measured: that would cost a sweep of
        steps). Either way ``residuals[-1]`` is the residual of the returned solution.
    iterations : int
    converged : bool
    steps_total : int
        Layer steps done by all ranks together (a coarse step counts as one).
    steps_critical_path : int
        Layer steps on the critical path: what a machine with one processor per rank
        would execute one after another (free communication).
    ranks : int
    levels : int, optional
        MGRIT levels used.
    wall_time : float
        Seconds.
    """

    method: str
    sweep: str
    residuals: list[float] = field(default_factory=list)
    iterations: int = 0
    converged: bool = True
    steps_total: int = 0
    steps_critical_path: int = 0
    ranks: int = 1
    levels: int | None = None
    wall_time: float = 0.0

    @property
    def residual_iterations(self) -> list[int]:
        """The iteration of each entry of :attr:`residuals`: ``0 .. iterations`` for
        parareal (entry 0 is the coarse prediction), ``1 .. iterations`` for MGRIT."""
        first = 0 if self.method == "parareal" else 1
        return list(range(first, first + len(self.residuals)))

    def summary(self) -> str:
        """One line: method, iterations, last residual, steps."""
        res = f", residual {self.residuals[-1]:.3e}" if self.residuals else ""
        lv = f", {self.levels} levels" if self.levels else ""
        return (f"{self.method} {self.sweep} sweep on {self.ranks} rank(s){lv}: "
                f"{self.iterations} iterations{res}, "
                f"{'converged' if self.converged else 'NOT converged'}; layer steps "
                f"{self.steps_total} total, {self.steps_critical_path} on the critical path")


class DivergenceError(CollectiveError, RuntimeError):
    """A layer-parallel solve diverged (non-finite or growing residual).

    Raised on every rank at once, after the residual is summed over the ranks: an
    MPI program ends normally with it (:class:`~ptoc.parallel.comm.CollectiveError`)."""
