"""Parareal for one sweep, as the program of one rank (SPMD); one chunk per rank.

Lions, Maday & Turinici (C. R. Acad. Sci. Paris 2001); for neural networks, Günther
et al. 2020 and Lorin 2020. Chunk ``j`` holds the steps from position ``s_j`` to
``s_{j+1}``; ``F_j`` runs them exactly and ``G_j`` is one coarse step. With
``U_0 = u_0`` fixed::

    iteration 0:  U_{j+1} = G_j(U_j)                          (a sequential coarse sweep)
    iteration k:  U_{j+1}^k = F_j(U_j^{k-1}) + (G_j(U_j^k) - G_j(U_j^{k-1}))

The fine sweeps of an iteration run in parallel; the update is a pipeline through
the ranks. ``F_j`` runs again only when ``U_j`` changed, so converged chunks cost
nothing. Written as ``F + (G_new - G_old)``, a converged ``U_j`` gives
``U_{j+1} = F_j(U_j)`` exactly: after ``k`` iterations the first ``k`` boundaries are
exact, after ``P`` all are, bit for bit with the serial sweep.

The residual after iteration ``k`` is ``sqrt(sum_j |F_j(U_j^k) - U_{j+1}^k|^2)``, the same
quantity MGRIT measures at its C-points; the solution returned is the fine
trajectory ``F_j(U_j^k)`` of every chunk.

:class:`PararealSolve` is the one parareal loop of ptoc. Two small hooks let a method
change what it does without a second loop:

* ``fine(k, last)``: the fine propagator of the sweep from iterate ``k``, so that
  ``F_j = F_j^{(k+1)}`` may change per iteration (the parareal neural ODE of Lorin 2020
  raises its Runge-Kutta order over the iterations, :mod:`ptoc.node`);
* ``rule``: a :class:`PararealRule`, the convergence and divergence test of every
  iterate (and the record it keeps). The default, :class:`ResidualRule`, is the residual
  test above; a rule may instead test ``U^k`` before the fine sweep from it
  (:attr:`PararealRule.tests_fine_sweep`), as the neural ODE's test of the update
  ``max |U^k - U^{k-1}|`` does.

Without them (:class:`Parareal`) every iteration uses the problem's propagator and
the residual test.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from .._checks import check_integer
from ..propagator import LevelPlan, Propagator
from .comm import Communicator
from .layout import sum_of_squares as _sum_of_squares
from .options import CoarseWeights, DivergenceError, SweepOutcome, SweepSolver, check_tol
from .problem import Block, CountedSteps, SweepProblem

TAG_U = 5


@dataclass(frozen=True)
class PararealIterate:
    """One rank's view of parareal iterate ``k``, as a :class:`PararealRule` sees it.

    With ``U_0^k = u_0``, ``U_{j+1}^0 = G_j(U_j^0)`` and
    ``U_{j+1}^k = F_j(U_j^{k-1}) + (G_j(U_j^k) - G_j(U_j^{k-1}))`` (module docstring),
    rank ``j`` holds chunk ``j``'s input and output boundary values.

    Attributes
    ----------
    k : int
        The iteration: 0 is the coarse prediction.
    start : ndarray
        ``U_j^k``, the value this rank's chunk starts from.
    boundary : ndarray
        ``U_{j+1}^k``, the value at this rank's chunk end.
    fine_end : ndarray or None
        ``F_j(U_j^k)``, the end of the fine sweep from this iterate, for a rule that tests
        after it (:attr:`PararealRule.tests_fine_sweep`); None for a rule that tests
        before it.
    """

    k: int
    start: np.ndarray
    boundary: np.ndarray
    fine_end: np.ndarray | None


class PararealRule(abc.ABC):
    """When parareal stops: the test of every iterate ``U^k``, and a record of it.

    :meth:`PararealSolve.solve` calls :meth:`check` once per iterate ``k = 0, 1, ...``
    on every rank (a collective: the same ``k`` everywhere, so a rule may use the
    communicator's reductions). It returns True when ``U^k`` is converged (the solve
    stops and returns the fine trajectories ``F_j(U_j^k)``) and False to go on (up to
    the iteration budget); it raises :class:`~ptoc.parallel.DivergenceError`, on every
    rank alike, when the iteration diverged.

    Attributes
    ----------
    tests_fine_sweep : bool
        True (the default): :meth:`check` runs after the fine sweep from ``U^k`` and
        sees its end, ``it.fine_end = F_j(U_j^k)``. False: it runs before that sweep
        (``it.fine_end`` is None), so that the sweep from ``U^k`` is known to be the last
        one, the returned trajectory, when it is made (see :class:`PararealSolve`).
    residuals : list of float
        The convergence history the rule keeps, reported as the solve's residuals.
    """

    tests_fine_sweep: ClassVar[bool] = True
    residuals: list[float]

    @abc.abstractmethod
    def check(self, comm: Communicator, it: PararealIterate) -> bool:
        """Whether iterate ``it.k`` is converged; raise ``DivergenceError`` when diverged."""


class ResidualRule(PararealRule):
    """Parareal's stopping test: the norm of the chunk-boundary residuals.

    After the fine sweep from ``U^k``: ``r_k = sqrt(sum_j |F_j(U_j^k) - U_{j+1}^k|^2)``
    (summed over the ranks in rank order), appended to :attr:`residuals`; converged when
    ``r_k <= tol``; a non-finite ``r_k`` raises :class:`~ptoc.parallel.DivergenceError`.

    Parameters
    ----------
    tol : float
        Absolute tolerance.
    """

    def __init__(self, tol: float):
        self.tol = tol
        self.residuals: list[float] = []

    def check(self, comm: Communicator, it: PararealIterate) -> bool:
        res = math.sqrt(comm.sum(_sum_of_squares(it.fine_end - it.boundary)))
        self.residuals.append(res)
        if not math.isfinite(res):
            raise DivergenceError(f"parareal diverged: residual {res} at iteration {it.k}")
        return res <= self.tol


def _coarse_value(value: Any, U: np.ndarray, j: int, method: str) -> np.ndarray:
    """What the user's coarse propagator returned for chunk ``j``, checked: an array of
    ``U``'s shape (cast to its dtype). Refused by name otherwise (``None`` from a function
    that forgot its ``return``, a wrong shape), before it meets any arithmetic."""
    what = "coarse function coarse(j, x)" if method == "step" else f"coarse.{method}(j, ...)"
    if value is None or isinstance(value, (str, bytes)):
        raise ValueError(f"Parareal coarse: the {what} returned {value!r} for chunk {j}; it "
                         f"must return the state after the chunk, an array of shape {U.shape}")
    arr = np.asarray(value)
    if arr.shape != U.shape or arr.dtype.kind not in "fiu":
        raise ValueError(f"Parareal coarse: the {what} returned an array of shape {arr.shape} "
                         f"and dtype {arr.dtype} for chunk {j}; expected real numbers of shape "
                         f"{U.shape}")
    return arr.astype(U.dtype, copy=False)


#: ``fine(k, last)``: the propagator whose layers are the fine steps of the sweep from
#: iterate ``k`` (see :class:`PararealSolve`).
FinePropagator = Callable[[int, bool], Propagator]


class PararealSolve:
    """Parareal iterations for one sweep on one rank (chunk = this rank's steps).

    The loop, from the coarse prediction ``U^0`` (``k = 0``): the fine sweep from
    ``U^k`` (run again only when ``U_j^k`` or the fine propagator changed since this
    rank's last sweep, otherwise reused), the test of ``U^k`` by ``rule`` (before or after
    that sweep, :attr:`PararealRule.tests_fine_sweep`), then, unless it stopped or
    ``k`` reached the iteration budget, the update
    ``U_{j+1}^{k+1} = F_j(U_j^k) + (G_j(U_j^{k+1}) - G_j(U_j^k))`` (``G_j`` only when
    ``U_j`` changed). The trajectory left in :meth:`local_solution` is that of the last
    sweep, ``F_j(U_j^K)``.

    Parameters
    ----------
    comm : Communicator
    problem : SweepProblem
    options : Parareal
        ``max_iterations`` (default: the number of ranks) and, for the default rule,
        ``tol``.
    u0 : array or None
        Value of position 0 on the rank that owns it.
    shape, dtype
        Of one state.
    coarse : Propagator, optional
        User-chosen coarse network (step ``j`` is ``G_j``); None for built-in coarse steps.
    fine : callable, optional
        ``fine(k, last) -> Propagator``: the fine propagator of the sweep from iterate
        ``k``, whose layers are those of ``problem`` (the same layer numbers); ``last``
        is True when that sweep is known to give the returned trajectory (``k`` is the
        iteration budget, or a rule that tests before the sweep stopped at ``k``).
        Called once per iterate on every rank; a propagator other than the previous
        one gets new level steps and a new sweep. None: ``problem.prop`` every time.
    rule : PararealRule, optional
        The test of every iterate; default :class:`ResidualRule` with ``options.tol``.

    Attributes
    ----------
    residuals : list of float
        The rule's record (:attr:`PararealRule.residuals`).
    fine_work : list of int
        Fine steps this rank ran in the sweep from each iterate ``0..K`` (0 when it
        reused its previous sweep).
    coarse_work : list of int
        Coarse steps ``G_j`` this rank ran to form each iterate ``0..K`` (0 when
        ``U_j`` had not changed; the first rank's ``U_0`` never does).
    start, boundary : ndarray
        ``U_j^k`` and ``U_{j+1}^k`` of the latest iterate.
    last_sweep : CountedSteps
        The level steps of the latest fine sweep, the one whose trajectory
        :meth:`local_solution` holds (a model's level steps may keep more of it, e.g.
        :class:`ptoc.node.RKLevelSteps` its Runge-Kutta substeps).
    """

    def __init__(self, comm: Communicator, problem: SweepProblem, options: Parareal,
                 u0: np.ndarray | None, shape: tuple[int, ...], dtype, coarse=None, *,
                 fine: FinePropagator | None = None, rule: PararealRule | None = None):
        self.comm = comm
        self.problem = problem
        self.opt = options
        self.coarse = coarse
        self.fine = fine
        self.rule = rule if rule is not None else ResidualRule(options.tol)
        owner = problem.owner
        mine = np.flatnonzero(owner == comm.rank)
        self.lo, self.hi = int(mine[0]), int(mine[-1]) + 1
        self.first = self.lo == 0
        self.base = self.lo if self.first else self.lo - 1
        self.prev = None if self.first else int(owner[self.base])
        self.next = int(owner[self.hi]) if self.hi < len(owner) else None
        self.u = np.zeros((self.hi - self.base,) + tuple(shape), dtype)
        if self.first:
            self.u[0] = u0
        self.u0 = u0
        self.steps: CountedSteps | None = None
        if fine is None:
            self.steps = problem.level_steps(0, np.arange(problem.n_steps + 1), self.base,
                                             self.hi)
        self._plan: LevelPlan | None = None
        self._fine_prop: Propagator | None = None
        self._fine_level_steps: CountedSteps | None = None
        if coarse is None:
            needs = [[] for _ in range(comm.size)]
            for r in range(comm.size):
                pos = np.flatnonzero(owner == r)
                start = int(pos[0]) if pos[0] == 0 else int(pos[0]) - 1
                needs[r].append(problem.layers(start, int(pos[-1])))
            problem.gather_coarse_weights(needs, options.coarse)
        self.residuals: list[float] = self.rule.residuals
        self.fine_work: list[int] = []
        self.coarse_work: list[int] = []
        self.start: np.ndarray | None = None
        self.boundary: np.ndarray | None = None
        self.last_sweep: CountedSteps | None = None
        self._swept_from: np.ndarray | None = None
        self._F_end: np.ndarray | None = None

    def _G(self, U: np.ndarray) -> np.ndarray:
        """The coarse propagator of this chunk."""
        end = self.hi - 1
        if self.coarse is None:
            return self.problem.coarse_step(self.base, end, U)
        self.comm.count(1)
        j = self.comm.rank
        if self.problem.backward:
            s, _ = self.problem.layers(self.base, end)
            return _coarse_value(self.coarse.adjoint_step(j, self.problem.state(s), U), U, j,
                                 "adjoint_step")
        return _coarse_value(self.coarse.step(j, U), U, j, "step")

    def _fine_steps(self, k: int, last: bool) -> CountedSteps:
        """The level steps of the fine sweep from iterate ``k``: new ones whenever the
        fine propagator changes (level steps of one level may share buffers, as the
        ResNet's do, so only the current propagator's are kept)."""
        if self.fine is None:
            return self.steps
        prop = self.fine(k, last)
        if prop is not self._fine_prop:
            if self._plan is None:
                self._plan = self.problem.level_plan(0, np.arange(self.problem.n_steps + 1),
                                                     self.base, self.hi)
            self._fine_prop = prop
            self._fine_level_steps = CountedSteps(prop.level_steps(self._plan), self.comm)
        return self._fine_level_steps

    def _F(self, U: np.ndarray, steps: CountedSteps) -> np.ndarray:
        """Run the chunk's fine steps from ``U``; the trajectory stays in ``self.u``."""
        self.u[0] = U
        if len(self.u) > 1:
            steps.runs(self.u, None, [1], [len(self.u) - 1])
        return self.u[-1].copy()

    def _sweep(self, U: np.ndarray, k: int, last: bool) -> np.ndarray:
        """``F_j(U)`` with the fine propagator of iterate ``k``, reusing the last sweep
        when it had the same input and propagator."""
        steps = self._fine_steps(k, last)
        if steps is not self.last_sweep or not np.array_equal(U, self._swept_from):
            self._F_end = self._F(U, steps)
            self._swept_from = U
            self.last_sweep = steps
            self.fine_work.append(len(self.u) - 1)
        else:
            self.fine_work.append(0)
        return self._F_end

    def solve(self) -> tuple[bool, int]:
        """Iterate; returns ``(converged, iterations)``. Raises :class:`DivergenceError`."""
        comm, opt, rule = self.comm, self.opt, self.rule
        max_it = opt.max_iterations if opt.max_iterations is not None else comm.size
        U = self.u0 if self.first else comm.recv(self.prev, TAG_U)
        G_old = self._G(U)
        self.coarse_work.append(1)
        U_next = G_old
        if self.next is not None:
            comm.send(U_next, self.next, TAG_U)
        k = 0
        while True:
            self.start, self.boundary = U, U_next
            if rule.tests_fine_sweep:
                F_end = self._sweep(U, k, k == max_it)
                converged = rule.check(comm, PararealIterate(k, U, U_next, F_end))
            else:
                converged = rule.check(comm, PararealIterate(k, U, U_next, None))
                F_end = self._sweep(U, k, converged or k == max_it)
            if converged:
                return True, k
            if k == max_it:
                return False, k
            U_new = U if self.first else comm.recv(self.prev, TAG_U)
            if np.array_equal(U_new, U):
                G_new = G_old
                self.coarse_work.append(0)
            else:
                G_new = self._G(U_new)
                self.coarse_work.append(1)
            U_next = F_end + (G_new - G_old)
            if self.next is not None:
                comm.send(U_next, self.next, TAG_U)
            U, G_old = U_new, G_new
            k += 1

    def local_solution(self) -> Block:
        """This rank's fine trajectory, the chunk start ``base`` included."""
        return Block(self.base, self.u)


@dataclass(frozen=True)
class Parareal(SweepSolver):
    """Parareal across ``chunks`` contiguous chunks of layers (:doc:`/theory/parareal`).

    Fine propagator ``F_j``: the exact layers of chunk ``j``. Coarse propagator ``G_j``:
    one step of size (chunk length) x h with the chunk's first-layer weights
    (``coarse="inject"``), its averaged weights (``"average"``), or a user-chosen coarse
    network: a :class:`ptoc.Propagator` with ``n_layers == chunks`` whose ``step(j, x)``
    is ``G_j`` (and whose ``adjoint_step`` serves the adjoint sweep). Update
    (Lions, Maday & Turinici 2001; Gander & Vandewalle 2007)::

        U_{j+1}^{k} = F_j(U_j^{k-1}) + G_j(U_j^{k}) - G_j(U_j^{k-1}),

    written in this order so that a converged boundary gives ``F_j`` exactly. After
    ``k`` iterations the first ``k`` chunk boundaries are exact; after ``chunks``
    iterations all are, bit for bit with the serial sweep. Theory:
    :doc:`/theory/parareal`.

    Parameters
    ----------
    chunks : int, optional
        Number of chunks ``P`` (uneven chunks allowed, ``P <= N``). Default: the number of
        ranks of the communicator.
    coarse : CoarseWeights, str, Propagator or callable
        Coarse propagator (see above); a plain function ``coarse(j, x) -> x`` serves the
        state sweep only (the adjoint sweep needs a Propagator's ``adjoint_step``).
    max_iterations : int, optional
        Default ``chunks`` (exactness). 0 gives the coarse sweep followed by one fine sweep
        of every chunk.
    tol : float
        Stop when the norm of the chunk-boundary residuals
        ``||F_j(U_j) - U_{j+1}||`` is at most ``tol`` (absolute, ``>= 0``; ``0`` runs
        exactly ``max_iterations`` iterations unless a residual is exactly 0).
    """

    chunks: int | None = None
    coarse: CoarseWeights | str | Any = CoarseWeights.INJECT
    max_iterations: int | None = None
    tol: float = 1e-12
    name = "parareal"

    def __post_init__(self) -> None:
        if self.chunks is not None:
            object.__setattr__(self, "chunks", check_integer("Parareal chunks", self.chunks, 1))
        if isinstance(self.coarse, (str, CoarseWeights)):
            object.__setattr__(self, "coarse", CoarseWeights.parse(self.coarse))
        elif not isinstance(self.coarse, (Propagator, CoarseFunction)):
            if not callable(self.coarse):
                raise ValueError("Parareal coarse must be 'inject', 'average', a Propagator "
                                 "with one layer per chunk, or a function coarse(j, x), got "
                                 f"{self.coarse!r}")
            object.__setattr__(self, "coarse", CoarseFunction(self.coarse))
        if self.max_iterations is not None:
            object.__setattr__(self, "max_iterations",
                               check_integer("Parareal max_iterations", self.max_iterations, 0))
        object.__setattr__(self, "tol", check_tol("Parareal tol", self.tol))

    def simulated_ranks(self) -> int | None:
        return self.chunks if self.chunks not in (None, 1) else None

    def check_layout(self, n_layers: int, n_ranks: int) -> None:
        P = self.chunks if self.chunks is not None else n_ranks
        if P != n_ranks:
            raise ValueError(f"Parareal(chunks={P}) runs one chunk per rank, but the "
                             f"communicator has {n_ranks} rank(s)")
        if P > n_layers:
            raise ValueError(f"Parareal(chunks={P}) needs at most {n_layers} chunks (one per "
                             "layer at least)")
        if isinstance(self.coarse, Propagator) and self.coarse.n_layers != P:
            raise ValueError(f"the coarse propagator has {self.coarse.n_layers} layers; "
                             f"parareal with {P} chunks needs one per chunk")
        super().check_layout(n_layers, n_ranks)

    def check_propagator(self, prop) -> None:
        if isinstance(self.coarse, CoarseWeights) and not prop.has_coarse_grid:
            raise TypeError(f"Parareal(coarse={self.coarse.value!r}) builds coarse steps from "
                            f"the fine propagator, but {prop._no_coarse_grid()}")

    def solve_sweep(self, comm, problem, u0, shape, dtype, guess=None) -> SweepOutcome:
        coarse = None if isinstance(self.coarse, CoarseWeights) else self.coarse
        run = PararealSolve(comm, problem, self, u0, shape, dtype, coarse)
        converged, iterations = run.solve()
        return SweepOutcome(run.local_solution(), converged, iterations, run.residuals)


class CoarseFunction:
    """A plain function ``coarse(j, x)`` as parareal's coarse propagator ``G_j`` of the
    state sweep (it has no adjoint, so the adjoint sweep refuses it)."""

    def __init__(self, function):
        self.function = function

    def step(self, j: int, x: np.ndarray) -> np.ndarray:
        return self.function(j, x)

    def adjoint_step(self, j: int, x: np.ndarray, lam: np.ndarray) -> np.ndarray:
        raise TypeError("the adjoint sweep needs the coarse propagator's adjoint: give "
                        "Parareal a Propagator (step and adjoint_step), not a function")

    def __repr__(self) -> str:
        return f"CoarseFunction({self.function!r})"
