"""The options shared by the solver strategies, their base class and their record.

A strategy (:class:`~ptoc.parallel.Serial`, :class:`~ptoc.parallel.Parareal`,
:class:`~ptoc.parallel.MGRIT`, each beside its algorithm) is a frozen dataclass of
options deriving from :class:`SweepSolver`; it is passed to :func:`ptoc.forward`,
:func:`ptoc.adjoint` and :func:`ptoc.loss_and_grad` as ``solver=``. Options are enums
or numbers, never integer codes. Every solve returns a :class:`SolveResult`.
"""

from __future__ import annotations

import abc
import math
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


#: The stagnation test of the iterative solvers (:func:`has_stagnated`). A solve has
#: stagnated when (1) its best residual of the last ``STAGNATION_WINDOW`` iterations is not
#: below ``STAGNATION_FACTOR`` times its best residual before them: it did not halve in 8
#: iterations (an average contraction worse than 0.917 per iteration, where MGRIT
#: typically contracts by 0.1 to 0.5), and (2) its best residual is at most
#: ``STAGNATION_DROP`` times its largest one. Condition (2) tells the floor that rounding
#: sets (the residual fell by many orders of magnitude, then stopped) from the plateau
#: a solve may cross before it converges: MGRIT on ``T = 1e6``, ``N = 1024`` stays near
#: its first residual for a dozen iterations, then falls by 17 orders of magnitude.
#: A warm-started solve that starts at its floor is not caught; it runs to
#: ``max_iterations`` as before.
STAGNATION_WINDOW = 8
STAGNATION_FACTOR = 0.5
STAGNATION_DROP = 1e-6


def check_tol(name: str, tol: Any) -> float:
    """``float(tol)`` when it is a finite number ``>= 0``; ``ValueError`` naming ``name``
    otherwise. ``0`` means no tolerance: the solver runs its ``max_iterations``."""
    value = float(tol) if isinstance(tol, (int, float, np.integer, np.floating)) \
        and not isinstance(tol, (bool, np.bool_)) else math.nan
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0 (0: run exactly "
                         f"max_iterations), got {tol!r}")
    return value


def has_stagnated(residuals: list[float]) -> bool:
    """Whether the residual history ``residuals`` (oldest first) has stagnated.

    True when there are more than :data:`STAGNATION_WINDOW` residuals, the smallest of
    the last ``STAGNATION_WINDOW`` exceeds :data:`STAGNATION_FACTOR` times the smallest
    of the earlier ones, and the smallest of all is at most :data:`STAGNATION_DROP` times
    the largest. The best values are compared, not the last ones, so a residual that
    jitters at its rounding floor is caught as well. The solvers stop when it holds, and
    :attr:`SolveResult.stagnated` applies it to the record: one rule for both.
    """
    if len(residuals) <= STAGNATION_WINDOW:
        return False
    before = min(residuals[:-STAGNATION_WINDOW])
    best = min(before, min(residuals[-STAGNATION_WINDOW:]))
    return (min(residuals[-STAGNATION_WINDOW:]) > STAGNATION_FACTOR * before
            and best <= STAGNATION_DROP * max(residuals))


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
    def stagnated(self) -> bool:
        """True when the solve stopped short of the tolerance because its residual
        stopped decreasing (:func:`has_stagnated`): more iterations would not help; the
        tolerance is below what the arithmetic resolves for states of this size."""
        return not self.converged and has_stagnated(self.residuals)

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
        status = "converged" if self.converged else "NOT converged"
        if self.stagnated:
            status += (f" (stagnated at {min(self.residuals):.3e} after {self.iterations} "
                       f"iterations: no halving in the last {STAGNATION_WINDOW}, more "
                       "iterations will not help; the tolerance is most likely below the "
                       "rounding error of these states: raise it)")
        return (f"{self.method} {self.sweep} sweep on {self.ranks} rank(s){lv}: "
                f"{self.iterations} iterations{res}, {status}; layer steps "
                f"{self.steps_total} total, {self.steps_critical_path} on the critical path")


class DivergenceError(CollectiveError, RuntimeError):
    """A layer-parallel solve diverged (non-finite or growing residual).

    Raised on every rank at once, after the residual is summed over the ranks: an
    MPI program ends normally with it (:class:`~ptoc.parallel.comm.CollectiveError`)."""
