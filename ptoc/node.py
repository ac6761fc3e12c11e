"""Parareal neural ODE (Lorin): the continuous-depth network solved parallel in time.

Reference: E. Lorin, "Derivation and analysis of parallel-in-time neural ordinary
differential equations" (the *parareal neural ODE*), Ann. Math. Artif. Intell. 88
(2020) 1035-1059, doi:10.1007/s10472-020-09702-6. The model, the Runge-Kutta schemes,
the parareal iteration with an order-raising fine solver and the adjoint of the stages
are derived on :doc:`/theory/node`; this module implements them.

* The residual layers of a :class:`ptoc.ResNet` are read as ``x' = sigma(K(t) x + b(t))``
  on ``[0, T]`` with weights constant on each *piece* ``[n h, (n+1) h)``; the opening, the
  classifier and the regulariser are the ResNet's, so ``J = Phi(x_T) + R``.
* Every piece takes ``substeps`` steps of a Runge-Kutta :class:`Scheme`: explicit
  (Euler, Heun, RK4; Euler with one substep is the ResNet layer) or implicit (backward
  Euler, midpoint, trapezoidal, SDIRK2, SDIRK3, Gauss-2; stages by Newton's method with
  the exact Jacobian, every linear system counted in a :class:`SolveCount`). The gradient is the
  exact reverse-mode adjoint of the stages (vectorised NumPy over the batch, no Numba).
* Parareal: the pieces are split into ``P`` chunks, the coarse propagator is forward
  Euler (per piece or per chunk, :class:`NODECoarse`), the fine propagator of iteration
  ``k`` runs the ``k``-th scheme of the *schedule*::

      U_{j+1}^k = F_j^{(k)}(U_j^{k-1}) + (G_j(U_j^k) - G_j(U_j^{k-1})).

  This is ptoc's one parareal loop, :class:`ptoc.parallel.parareal.PararealSolve` (that
  of :class:`ptoc.Parareal`), run on the neural ODE as a propagator
  (:class:`RKPropagator`: layer ``n`` is piece ``n``), one chunk per rank; the fine
  propagator of each iteration and the stopping rule are its two hooks
  (:class:`NODEParareal`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import numpy as np

from . import _config
from ._checks import check_inputs, check_integer, check_positive_float, check_positive_int
from ._options import OptionEnum
from .activations import Activation, dsigma, sigma
from .methods import GradientFunction
from .model import Params, ResNet
from .objective import assemble_gradient, classifier_loss, opening_forward, regulariser
from .parallel.comm import Communicator, SimulatedRanks
from .parallel.layout import partition
from .parallel.options import DivergenceError, SweepOutcome, SweepSolver, check_tol
from .parallel.parareal import Parareal, PararealIterate, PararealRule, PararealSolve
from .parallel.problem import SweepProblem
from .propagator import LevelPlan, LevelSteps, Propagator

__all__ = [
    "NEWTON_MAX_ITERATIONS",
    "NEWTON_TOL",
    "NODECoarse",
    "NODEDivergenceError",
    "NODEParareal",
    "NODESolution",
    "NODEStepRecord",
    "NeuralODEGradient",
    "NewtonConvergenceError",
    "RKLevelSteps",
    "RKPropagator",
    "Scheme",
    "SolveCount",
    "node_forward",
    "node_loss",
    "node_loss_and_grad",
    "node_solve",
]


# ----------------------------------------------------------------------------------------
# Options
# ----------------------------------------------------------------------------------------


class Scheme(OptionEnum, what="ODE scheme"):
    """Runge-Kutta scheme of the fine or coarse solver (Lorin 2020, parareal neural ODE;
    the step is :class:`RKPropagator`'s, the coefficients ``_TABLEAUS``).

    Explicit:

    ``EULER``
        Forward Euler, order 1, one right-hand-side evaluation per step.
    ``HEUN``
        Heun's method (explicit trapezoidal rule), order 2, two evaluations.
    ``RK4``
        The classical fourth-order Runge-Kutta method, four evaluations.

    Implicit (stages by Newton's method with the exact Jacobian, ``_solve_group``):

    ``BACKWARD_EULER``
        Backward Euler, order 1: one implicit stage, a ``d x d`` system per sample and
        Newton iteration.
    ``MIDPOINT``
        The implicit midpoint rule (one-stage Gauss), order 2: one ``d x d`` system.
    ``TRAPEZOIDAL``
        The trapezoidal rule (Crank-Nicolson), order 2: an explicit first stage, then
        one implicit ``d x d`` stage.
    ``SDIRK2``
        Two-stage singly diagonally implicit Runge-Kutta, order 2 and L-stable
        (``gamma = 1 - 1/sqrt 2``): two ``d x d`` stages in turn.
    ``SDIRK3``
        Two-stage SDIRK of order 3 (``gamma = (3 + sqrt 3)/6``, A-stable): two
        ``d x d`` stages in turn.
    ``GAUSS2``
        Two-stage Gauss-Legendre, order 4: both stages coupled, a ``2d x 2d`` system.
    """

    EULER = "euler"
    HEUN = "heun"
    RK4 = "rk4"
    BACKWARD_EULER = "backward-euler"
    MIDPOINT = "midpoint"
    TRAPEZOIDAL = "trapezoidal"
    SDIRK2 = "sdirk2"
    SDIRK3 = "sdirk3"
    GAUSS2 = "gauss2"

    @property
    def stages(self) -> int:
        """Stages per step (right-hand-side evaluations of an explicit step)."""
        return len(_TABLEAUS[self].w)

    @property
    def order(self) -> int:
        """Classical order of accuracy."""
        return _TABLEAUS[self].order

    @property
    def implicit(self) -> bool:
        """Whether a step solves nonlinear equations (Newton's method)."""
        return any(_TABLEAUS[self].solves(g) for g in _TABLEAUS[self].groups)


@dataclass(frozen=True)
class _Tableau:
    """Butcher coefficients of a scheme: ``A`` (``s x s``, full rows), weights ``w``.

    ``groups`` are the stage groups solved in turn: every stage on its own when ``A`` is
    lower triangular (explicit and diagonally implicit schemes), all stages together
    otherwise (Gauss). A group solves equations unless it is one stage with
    ``A_ii = 0`` (an explicit stage).
    """

    A: tuple[tuple[float, ...], ...]
    w: tuple[float, ...]
    order: int

    @property
    def groups(self) -> tuple[tuple[int, ...], ...]:
        s = len(self.w)
        if all(self.A[i][j] == 0 for i in range(s) for j in range(i + 1, s)):
            return tuple((i,) for i in range(s))
        return (tuple(range(s)),)

    def solves(self, group: tuple[int, ...]) -> bool:
        return len(group) > 1 or self.A[group[0]][group[0]] != 0


_SQ3 = 3.0 ** 0.5
_G2 = 1.0 - 0.5 ** 0.5            # SDIRK2's diagonal
_G3 = (3.0 + _SQ3) / 6.0          # SDIRK3's diagonal
_TABLEAUS: dict[Scheme, _Tableau] = {
    Scheme.EULER: _Tableau(((0.0,),), (1.0,), 1),
    Scheme.HEUN: _Tableau(((0.0, 0.0), (1.0, 0.0)), (0.5, 0.5), 2),
    Scheme.RK4: _Tableau(((0.0, 0.0, 0.0, 0.0), (0.5, 0.0, 0.0, 0.0), (0.0, 0.5, 0.0, 0.0),
                          (0.0, 0.0, 1.0, 0.0)),
                         (1.0 / 6.0, 1.0 / 3.0, 1.0 / 3.0, 1.0 / 6.0), 4),
    Scheme.BACKWARD_EULER: _Tableau(((1.0,),), (1.0,), 1),
    Scheme.MIDPOINT: _Tableau(((0.5,),), (1.0,), 2),
    Scheme.TRAPEZOIDAL: _Tableau(((0.0, 0.0), (0.5, 0.5)), (0.5, 0.5), 2),
    Scheme.SDIRK2: _Tableau(((_G2, 0.0), (1.0 - _G2, _G2)), (1.0 - _G2, _G2), 2),
    Scheme.SDIRK3: _Tableau(((_G3, 0.0), (1.0 - 2.0 * _G3, _G3)), (0.5, 0.5), 3),
    Scheme.GAUSS2: _Tableau(((0.25, 0.25 - _SQ3 / 6.0), (0.25 + _SQ3 / 6.0, 0.25)),
                            (0.5, 0.5), 4),
}

#: Newton's method for the implicit stages: stop after the first update ``delta`` with
#: ``max |delta| <= NEWTON_TOL (1 + max |k|)`` over the group's slopes ``k`` (all samples);
#: quadratic convergence then leaves the stages at round-off. More than
#: ``NEWTON_MAX_ITERATIONS`` updates, a singular Jacobian or a non-finite update raise
#: :class:`NewtonConvergenceError`.
NEWTON_TOL = 1e-10
NEWTON_MAX_ITERATIONS = 25


@dataclass
class SolveCount:
    """Work of the steps of a solve (Lorin's cost: time steps and linear systems).

    Attributes
    ----------
    steps : int
        Time steps of any scheme.
    newton_iterations : int
        Newton updates of implicit stage groups (one per group and update; all samples
        are updated together).
    linear_systems : int
        Linear systems solved: one per sample and Newton update (the Jacobian is block
        diagonal over the samples).
    linear_cost : int
        ``sum n^3`` over those systems, ``n`` their size (``d`` for a one-stage group,
        ``2d`` for Gauss-2): the flop count of dense LU factorisations, up to ``2/3``.
    """

    steps: int = 0
    newton_iterations: int = 0
    linear_systems: int = 0
    linear_cost: int = 0

    def __add__(self, other: SolveCount) -> SolveCount:
        return SolveCount(*(a + b for a, b in zip(self.astuple(), other.astuple(),
                                                   strict=True)))

    def __sub__(self, other: SolveCount) -> SolveCount:
        return SolveCount(*(a - b for a, b in zip(self.astuple(), other.astuple(),
                                                   strict=True)))

    def astuple(self) -> tuple[int, int, int, int]:
        return (self.steps, self.newton_iterations, self.linear_systems, self.linear_cost)

    def copy(self) -> SolveCount:
        return SolveCount(*self.astuple())

    def to_dict(self) -> dict[str, int]:
        """Plain-dict form (JSON-ready)."""
        return asdict(self)


class NODECoarse(OptionEnum, what="coarse propagator"):
    """Coarse propagator ``G_j`` of the parareal neural ODE (Lorin; :doc:`/theory/node`).

    Both are forward Euler:

    ``PIECE``
        One Euler step of size ``h`` per piece of the chunk, with that piece's weights:
        ``x <- x + h sigma(K_n x + b_n)``, ``n = p_j .. p_{j+1}-1`` (the ResNet's layers).
    ``CHUNK``
        One Euler step for the whole chunk with the weights of its first piece:
        ``x <- x + (p_{j+1} - p_j) h sigma(K_{p_j} x + b_{p_j})``.
    """

    PIECE = "piece"
    CHUNK = "chunk"


class NODEDivergenceError(DivergenceError):
    """The parareal neural ODE diverged: a non-finite or unboundedly growing iterate.

    A subclass of :class:`ptoc.parallel.DivergenceError`; the message names the
    iteration (0 is the initial coarse sweep).
    """


def _schedule_entry(entry: Any) -> tuple[Scheme, int | None]:
    """A schedule entry: a scheme, or a ``(scheme, substeps)`` pair."""
    if isinstance(entry, (str, Scheme)):
        return Scheme.parse(entry), None
    if isinstance(entry, Sequence) and len(entry) == 2:
        return (Scheme.parse(entry[0]),
                check_positive_int(f"the substeps of NODEParareal schedule entry {entry!r}",
                                   entry[1]))
    raise ValueError(f"a NODEParareal schedule entry must be a scheme or a (scheme, "
                     f"substeps) pair, got {entry!r}")


@dataclass(frozen=True)
class NODEParareal(SweepSolver):
    """The parareal neural ODE solve (Lorin 2020; the iteration is the module docstring's,
    the theory :doc:`/theory/node`): options and strategy.

    The fine propagator ``F_j^{(k)}`` of iteration ``k >= 1`` uses the scheme (and number
    of steps per piece) ``schedule[min(k, len(schedule)) - 1]``: the schedule's entries in
    order, then its last entry for all later iterations; the coarse one is
    :meth:`coarse_function`.
    :func:`node_solve` runs it on one simulated rank per chunk (threads of one process);
    as a :class:`~ptoc.parallel.SweepSolver` it also solves the state sweep of an
    :class:`RKPropagator` through :func:`ptoc.parallel.solve_states` (the residuals of its
    :class:`~ptoc.parallel.SolveResult` are then the updates ``max |U^k - U^{k-1}|``).

    Parameters
    ----------
    chunks : int or sequence of int
        The number of chunks ``P`` (``1 <= P <= N``; sizes as ``numpy.array_split``: the
        first ``N mod P`` chunks get one piece more), or the number of pieces of every
        chunk (positive, summing to ``N``; uneven chunks allowed).
    schedule : Scheme, str or sequence of them or of ``(scheme, substeps)`` pairs
        Fine scheme of each iteration, e.g. ``("euler", "heun", "rk4")`` (Lorin's
        order-raising schedule) or ``("rk4",)`` (a fixed fine solver, the default). A
        pair also sets that iteration's steps per piece, e.g.
        ``(("backward-euler", 1), ("midpoint", 2), ("gauss2", 4))``, so that each
        scheme's step follows its own accuracy target (:attr:`fine_substeps`); a bare
        scheme takes the solve's ``substeps``, and a pair in last place sets them.
        With ``coarse="piece"`` and one substep, Euler is the coarse propagator itself:
        an Euler iteration returns the coarse sweep again and corrects nothing.
    max_iterations : int, optional
        Most parareal iterations (0: the coarse sweep only). Default
        ``len(schedule) - 1 + P``, after which the iterate equals the serial solve with
        the schedule's last scheme exactly.
    tol : float
        Stop when ``max |U^k - U^{k-1}|`` (max-norm over all boundaries, samples and
        features) is at most ``tol``; tested only at iterations that use the schedule's
        last scheme. The solve also stops, exactly converged, once the last ``P``
        iterations used the same scheme (then every boundary is exact).
    coarse : NODECoarse or str
        ``"piece"`` (one coarse step per piece, default) or ``"chunk"`` (one per chunk).
    coarse_scheme : Scheme or str
        Scheme of the coarse step: ``"euler"`` (forward Euler, default, Lorin's) or any
        other, e.g. ``"backward-euler"`` for a stiff or implicit setting.
    divergence_factor : float
        Raise :class:`NODEDivergenceError` when a boundary update exceeds this multiple
        of the first non-zero one (an iterate growing without bound). A non-finite
        iterate always raises it.

    Raises
    ------
    ValueError
        For a bad chunk count or size, an empty schedule, an unknown scheme or a bad
        ``(scheme, substeps)`` pair, a negative ``max_iterations``, or a ``tol`` or
        ``divergence_factor`` that is not positive and finite. ``P > N`` is detected
        when the network is known.

    Attributes
    ----------
    fine_substeps : tuple of (int or None)
        Steps per piece of each schedule entry (None: the solve's ``substeps``).
    """

    chunks: int | tuple[int, ...]
    schedule: tuple[Scheme, ...] = (Scheme.RK4,)
    max_iterations: int | None = None
    tol: float = 1e-10
    coarse: NODECoarse = NODECoarse.PIECE
    divergence_factor: float = 1e6
    coarse_scheme: Scheme = Scheme.EULER
    fine_substeps: tuple[int | None, ...] = field(init=False, default=())

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if isinstance(self.chunks, Sequence) and not isinstance(self.chunks, str):
            sizes = tuple(check_positive_int("every chunk size in NODEParareal chunks", c)
                          for c in self.chunks)
            if not sizes:
                raise ValueError("NODEParareal chunks must be a positive integer or a "
                                 "non-empty sequence of chunk sizes, got ()")
            set_(self, "chunks", sizes)
        else:
            set_(self, "chunks", check_positive_int("NODEParareal chunks", self.chunks))
        schedule = self.schedule
        if isinstance(schedule, (str, Scheme)):
            schedule = (schedule,)
        try:
            schedule = tuple(schedule)
        except TypeError:
            raise ValueError(f"NODEParareal schedule must be a sequence of schemes, got "
                             f"{self.schedule!r}") from None
        if not schedule:
            raise ValueError("NODEParareal schedule is empty: give at least one fine scheme, "
                             "e.g. ('rk4',) or ('euler', 'heun', 'rk4')")
        entries = [_schedule_entry(e) for e in schedule]
        set_(self, "schedule", tuple(s for s, _ in entries))
        set_(self, "fine_substeps", tuple(m for _, m in entries))
        set_(self, "coarse_scheme", Scheme.parse(self.coarse_scheme))
        if self.max_iterations is not None:
            set_(self, "max_iterations",
                 check_integer("NODEParareal max_iterations", self.max_iterations, 0))
        set_(self, "tol", check_tol("NODEParareal tol", self.tol))
        set_(self, "coarse", NODECoarse.parse(self.coarse))
        set_(self, "divergence_factor",
             check_positive_float("NODEParareal divergence_factor", self.divergence_factor))

    @property
    def final_scheme(self) -> Scheme:
        """The schedule's last scheme: the one whose solution parareal converges to."""
        return self.schedule[-1]

    def scheme_at(self, k: int) -> Scheme:
        """Fine scheme of iteration ``k >= 1``."""
        return self.schedule[min(k, len(self.schedule)) - 1]

    def entry_at(self, k: int, substeps: int) -> tuple[Scheme, int]:
        """Fine scheme and steps per piece of iteration ``k >= 1`` (``substeps``: the
        solve's, for an entry that does not set them)."""
        i = min(k, len(self.schedule)) - 1
        m = self.fine_substeps[i]
        return self.schedule[i], substeps if m is None else m

    def chunk_bounds(self, n_pieces: int) -> np.ndarray:
        """Piece bounds ``p_0 = 0 < p_1 < ... < p_P = N`` of the chunks.

        Raises ``ValueError`` when there are more chunks than pieces or the chunk sizes
        do not sum to ``n_pieces``.
        """
        if isinstance(self.chunks, tuple):
            if sum(self.chunks) != n_pieces:
                raise ValueError(f"NODEParareal chunk sizes {self.chunks} sum to "
                                 f"{sum(self.chunks)}, but the network has N={n_pieces} pieces")
            return np.concatenate([[0], np.cumsum(self.chunks)]).astype(np.int64)
        if self.chunks > n_pieces:
            raise ValueError(f"NODEParareal chunks P={self.chunks} exceeds the N={n_pieces} "
                             "pieces of the network: every chunk needs at least one piece")
        return partition(n_pieces, self.chunks)

    def iterations_for(self, n_chunks: int) -> int:
        """The iteration budget: ``max_iterations``, or ``len(schedule) - 1 + P``."""
        if self.max_iterations is not None:
            return self.max_iterations
        return len(self.schedule) - 1 + n_chunks

    @property
    def n_chunks(self) -> int:
        """The number of chunks ``P``."""
        return len(self.chunks) if isinstance(self.chunks, tuple) else self.chunks

    def coarse_function(self, prop: RKPropagator) -> Callable[[int, np.ndarray], np.ndarray]:
        """``G(j, x)``: the coarse propagator ``G_j`` of chunk ``j`` for ``prop``'s network.

        One step of ``coarse_scheme`` (forward Euler by default) per step
        (:meth:`RKPropagator.with_scheme` with one substep): ``coarse="piece"`` runs the
        chunk's pieces, with Euler ``x <- x + h sigma(K_n x + b_n)``; ``coarse="chunk"``
        takes one step of length ``(p_{j+1} - p_j) h`` with the weights of piece ``p_j``,
        with Euler ``x + (p_{j+1} - p_j) h sigma(K_{p_j} x + b_{p_j})`` (the Euler
        propagator's coarse step with ``"inject"`` weights). As ``coarse=`` of
        :class:`ptoc.Parareal` it makes that solver's coarse propagator this one. The
        coarse propagator's work is counted in ``G.prop.count``.
        """
        coarse_prop = prop.with_scheme(self.coarse_scheme, 1)
        bounds = self.chunk_bounds(prop.n_layers)

        def G(j: int, x: np.ndarray) -> np.ndarray:
            lo, hi = int(bounds[j]), int(bounds[j + 1])
            if self.coarse is NODECoarse.CHUNK:
                return coarse_prop.coarse_step(coarse_prop.layer_parameters(lo), hi - lo, x)
            return coarse_prop.propagate(x, lo, hi)

        G.prop = coarse_prop  # type: ignore[attr-defined]
        return G

    # --- the SweepSolver strategy ----------------------------------------------------------
    name = "node-parareal"

    def simulated_ranks(self) -> int | None:
        return self.n_chunks if self.n_chunks > 1 else None

    def check_layout(self, n_layers: int, n_ranks: int) -> None:
        bounds = self.chunk_bounds(n_layers)
        P = len(bounds) - 1
        if P != n_ranks:
            raise ValueError(f"NODEParareal with {P} chunks runs one chunk per rank, but the "
                             f"communicator has {n_ranks} rank(s)")
        if not np.array_equal(bounds, partition(n_layers, n_ranks)):
            raise ValueError(f"NODEParareal chunk sizes {tuple(np.diff(bounds).tolist())} "
                             "differ from the ranks' layers (ptoc.parallel.partition); "
                             "node_solve runs any chunk sizes")
        super().check_layout(n_layers, n_ranks)

    def check_propagator(self, prop: Any) -> None:
        _check_rk(prop, self)

    def solve_sweep(self, comm: Any, problem: Any, u0: np.ndarray | None,
                    shape: tuple[int, ...], dtype: Any,
                    guess: dict[int, np.ndarray] | None = None) -> SweepOutcome:
        return _parareal_sweep(self, comm, problem, u0, shape, dtype).outcome()


# ----------------------------------------------------------------------------------------
# One step: forward, tangent-linear and adjoint
# ----------------------------------------------------------------------------------------


class NewtonConvergenceError(RuntimeError):
    """Newton's method did not solve the stages of an implicit step (more than
    :data:`NEWTON_MAX_ITERATIONS` updates, a singular Jacobian or a non-finite update);
    the message names the scheme, the step size and, from a solve, the piece."""


def _stage_base(x: np.ndarray, tau: float, row: tuple[float, ...], ks: list,
                group: tuple[int, ...]) -> np.ndarray:
    """``x + tau sum_j A_ij k_j`` over the stages ``j`` solved before ``group``."""
    terms = [(aij, ks[j]) for j, aij in enumerate(row) if aij and j not in group]
    if not terms:
        return x
    inc = terms[0][0] * terms[0][1]
    for aij, kj in terms[1:]:
        inc = inc + aij * kj
    return x + tau * inc


def _group_jacobian(As: list, group: tuple[int, ...], tab: _Tableau, K: np.ndarray,
                    tau: float, act: Activation) -> np.ndarray:
    """Per-sample Jacobian of the stage equations ``k_i - sigma(K X_i + b) = 0`` of a group
    in its slopes, ``(S, g d, g d)``: block ``(i, j)`` is
    ``delta_ij I - tau A_ij diag(sigma'(a_i)) K``."""
    g, (S, d) = len(group), As[group[0]].shape
    J = np.zeros((S, g * d, g * d), dtype=As[group[0]].dtype)
    for p, i in enumerate(group):
        DK = dsigma(As[i], act)[:, :, None] * K[None]
        for q, j in enumerate(group):
            if tab.A[i][j]:
                J[:, p * d:(p + 1) * d, q * d:(q + 1) * d] -= (tau * tab.A[i][j]) * DK
        J[:, p * d:(p + 1) * d, p * d:(p + 1) * d] += np.eye(d)
    return J


def _linear_solve(J: np.ndarray, r: np.ndarray, what: str) -> np.ndarray:
    """``J^{-1} r`` per sample for ``J`` (S, n, n) and ``r`` (S, n)."""
    try:
        return np.linalg.solve(J, r[..., None])[..., 0]
    except np.linalg.LinAlgError:
        raise NewtonConvergenceError(f"{what}: singular stage Jacobian") from None


def _solve_group(x: np.ndarray, K: np.ndarray, b: np.ndarray, tau: float, scheme: Scheme,
                 act: Activation, group: tuple[int, ...], Xs: list, As: list, ks: list,
                 count: SolveCount | None) -> None:
    """Fill the stages of ``group`` into ``Xs``, ``As``, ``ks`` (the earlier ones known).

    Explicit stage: ``X_i = x + tau sum_{j<i} A_ij k_j``, ``k_i = sigma(K X_i + b)``.
    Implicit group: Newton's method on ``k_i - sigma(K X_i + b) = 0`` for the group's
    slopes, with ``X_i = x + tau sum_j A_ij k_j``, from the explicit slope
    ``sigma(K X_i^0 + b)`` (``X_i^0`` without the group's own terms), with the exact
    Jacobian (:func:`_group_jacobian`) and :data:`NEWTON_TOL`,
    :data:`NEWTON_MAX_ITERATIONS`; each update solves one system per sample.
    """
    tab = _TABLEAUS[scheme]
    base = [_stage_base(x, tau, tab.A[i], ks, group) for i in group]
    if not tab.solves(group):
        i = group[0]
        Xs[i] = base[0]
        As[i] = Xs[i] @ K.T + b
        ks[i] = sigma(As[i], act)
        return
    d = x.shape[1]
    slopes = [sigma(Xb @ K.T + b, act) for Xb in base]

    def stage_inputs() -> None:
        for p, i in enumerate(group):
            Xi = base[p]
            for q, j in enumerate(group):
                if tab.A[i][j]:
                    Xi = Xi + (tau * tab.A[i][j]) * slopes[q]
            Xs[i] = Xi
            As[i] = Xi @ K.T + b

    what = f"Newton's method for the {scheme.value} stages (step {tau:g})"
    size = scale = float("nan")
    for it in range(1, NEWTON_MAX_ITERATIONS + 2):
        stage_inputs()
        if it > NEWTON_MAX_ITERATIONS:
            raise NewtonConvergenceError(
                f"{what} did not converge in NEWTON_MAX_ITERATIONS={NEWTON_MAX_ITERATIONS} "
                f"updates: the last was {size:.3e}, above NEWTON_TOL={NEWTON_TOL:g} "
                f"times {scale:.3e}")
        r = np.concatenate([slopes[p] - sigma(As[i], act) for p, i in enumerate(group)],
                           axis=1)
        delta = _linear_solve(_group_jacobian(As, group, tab, K, tau, act), -r, what)
        if count is not None:
            count.newton_iterations += 1
            count.linear_systems += x.shape[0]
            count.linear_cost += x.shape[0] * (len(group) * d) ** 3
        slopes = [slopes[p] + delta[:, p * d:(p + 1) * d] for p in range(len(group))]
        size = float(np.max(np.abs(delta)))
        scale = 1.0 + max(float(np.max(np.abs(k))) for k in slopes)
        if not np.isfinite(size) or not np.isfinite(scale):
            raise NewtonConvergenceError(f"{what}: non-finite update at iteration {it}")
        if size <= NEWTON_TOL * scale:
            break
    stage_inputs()
    for p, i in enumerate(group):
        ks[i] = slopes[p]


def _stages(x: np.ndarray, K: np.ndarray, b: np.ndarray, tau: float, scheme: Scheme,
            act: Activation, count: SolveCount | None = None,
            ) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """Stage inputs ``X_i``, pre-activations ``a_i`` and slopes ``k_i`` of one step, group
    by group (:func:`_solve_group`); Newton's work is added to ``count``."""
    s = len(_TABLEAUS[scheme].w)
    Xs: list = [None] * s
    As: list = [None] * s
    ks: list = [None] * s
    for group in _TABLEAUS[scheme].groups:
        _solve_group(x, K, b, tau, scheme, act, group, Xs, As, ks, count)
    return Xs, As, ks


def _combine(x: np.ndarray, tau: float, weights: tuple[float, ...],
             ks: list[np.ndarray]) -> np.ndarray:
    """``x + tau sum_i w_i k_i``."""
    inc = weights[0] * ks[0]
    for w, k in zip(weights[1:], ks[1:], strict=True):
        inc = inc + w * k
    return x + tau * inc


def _step(x: np.ndarray, K: np.ndarray, b: np.ndarray, tau: float, scheme: Scheme,
          act: Activation, count: SolveCount | None = None) -> np.ndarray:
    ks = _stages(x, K, b, tau, scheme, act, count)[2]
    return _combine(x, tau, _TABLEAUS[scheme].w, ks)


def _step_tangent(x: np.ndarray, K: np.ndarray, b: np.ndarray, tau: float, scheme: Scheme,
                  act: Activation, dx: np.ndarray) -> np.ndarray:
    """Tangent of one step in the state, ``dx_+ = (d x_+ / d x) dx``, group by group::

        dk_i - tau sum_{j in G} A_ij sigma'(a_i) * (K dk_j)
            = sigma'(a_i) * (K (dx + tau sum_{j before G} A_ij dk_j)),   i in G,
        dx_+ = dx + tau sum_i w_i dk_i

    (for an explicit stage the left side is ``dk_i``; for an implicit group a solve with
    the Jacobian of the converged stages).
    """
    tab = _TABLEAUS[scheme]
    As = _stages(x, K, b, tau, scheme, act)[1]
    d = x.shape[1]
    dks: list = [None] * len(tab.w)
    for group in tab.groups:
        rhs = [dsigma(As[i], act) * (_stage_base(dx, tau, tab.A[i], dks, group) @ K.T)
               for i in group]
        if tab.solves(group):
            sol = _linear_solve(_group_jacobian(As, group, tab, K, tau, act),
                                np.concatenate(rhs, axis=1), f"the {scheme.value} tangent")
            rhs = [sol[:, p * d:(p + 1) * d] for p in range(len(group))]
        for p, i in enumerate(group):
            dks[i] = rhs[p]
    return _combine(dx, tau, tab.w, dks)


def _step_adjoint(x: np.ndarray, lam: np.ndarray, K: np.ndarray, b: np.ndarray, tau: float,
                  scheme: Scheme, act: Activation, gK: np.ndarray,
                  gb: np.ndarray, count: SolveCount | None = None,
                  stages: tuple[list, list] | None = None) -> np.ndarray:
    """Exact reverse-mode adjoint of one step: adds to ``gK``, ``gb`` and returns ``lambda``.
    ``stages``: the step's stage inputs and pre-activations ``(X_i, a_i)`` as the forward
    step computed them (:func:`_fine_trajectory`), or None to compute them again from
    ``x`` (for an implicit scheme, Newton's method once more: the same numbers). Its work
    goes into ``count``: the Newton updates of that recomputation, and one transposed
    linear system per sample and implicit group.

    From ``bar k_i = tau w_i lambda_+`` (``lambda_+`` the sensitivity to ``x_+``;
    :doc:`/theory/adjoint`), group by group from the last: an implicit group first solves
    the transposed stage system ``J_G^T mu_G = bar k_G`` at the converged stages
    (an explicit stage has ``mu_i = bar k_i``); then for ``i`` in the group::

        bar a_i = sigma'(a_i) * mu_i,   dJ/dK += sum_s bar a_i X_i^T,   dJ/db += sum_s bar a_i,
        bar X_i = K^T bar a_i,   lambda += bar X_i,   bar k_j += tau A_ij bar X_i (j before G),

    starting from ``lambda = lambda_+``: the transpose of the tangent map.
    """
    tab = _TABLEAUS[scheme]
    Xs, As = _stages(x, K, b, tau, scheme, act, count)[:2] if stages is None else stages
    d = x.shape[1]
    if count is not None:
        count.steps += 1
    kbar: list = [(tau * wi) * lam if wi else None for wi in tab.w]
    lam_in = lam
    for group in reversed(tab.groups):
        if all(kbar[i] is None for i in group):
            continue
        mu = [np.zeros_like(lam) if kbar[i] is None else kbar[i] for i in group]
        if tab.solves(group):
            JT = _group_jacobian(As, group, tab, K, tau, act).swapaxes(1, 2)
            sol = _linear_solve(JT, np.concatenate(mu, axis=1), f"the {scheme.value} adjoint")
            if count is not None:
                count.linear_systems += x.shape[0]
                count.linear_cost += x.shape[0] * (len(group) * d) ** 3
            mu = [sol[:, p * d:(p + 1) * d] for p in range(len(group))]
        for p in range(len(group) - 1, -1, -1):
            i = group[p]
            abar = dsigma(As[i], act) * mu[p]
            gK += abar.T @ Xs[i]
            gb += abar.sum(axis=0)
            Xbar = abar @ K
            lam_in = lam_in + Xbar
            for j, aij in enumerate(tab.A[i]):
                if aij and j not in group:
                    contrib = (tau * aij) * Xbar
                    kbar[j] = contrib if kbar[j] is None else kbar[j] + contrib
    return lam_in


# ----------------------------------------------------------------------------------------
# Chunk solves
# ----------------------------------------------------------------------------------------


def _fine_trajectory(x0: np.ndarray, K: np.ndarray, b: np.ndarray, h: float, m: int,
                     scheme: Scheme, act: Activation,
                     count: SolveCount | None = None, first: int = 0,
                     stages: list | None = None) -> np.ndarray:
    """All substep states of ``scheme`` over pieces ``K, b`` from ``x0``: (L m + 1, S, d).

    The steps and Newton's work are added to ``count``; a :class:`NewtonConvergenceError`
    names the piece (``first`` is the number of the piece of ``K[0]``) and the substep.
    ``stages``: a list that receives each substep's stage inputs and pre-activations
    ``(X_i, a_i)``, in order, for :func:`_adjoint_trajectory` (the steps are the same bits
    either way, :func:`_step`).
    """
    L = K.shape[0]
    out = np.empty((L * m + 1,) + x0.shape, x0.dtype)
    out[0] = x0
    tau = h / m
    w = _TABLEAUS[scheme].w
    x = x0
    r = 0
    for n in range(L):
        for q in range(m):
            try:
                Xs, As, ks = _stages(x, K[n], b[n], tau, scheme, act, count)
                x = _combine(x, tau, w, ks)
                if stages is not None:
                    stages.append((Xs, As))
            except NewtonConvergenceError as exc:
                raise NewtonConvergenceError(f"piece {first + n}, substep {q + 1} of {m}: "
                                             f"{exc}") \
                    from None
            r += 1
            out[r] = x
    if count is not None:
        count.steps += L * m
    return out


def _adjoint_trajectory(traj: np.ndarray, lam: np.ndarray, K: np.ndarray, b: np.ndarray,
                        h: float, m: int, scheme: Scheme, act: Activation, gK: np.ndarray,
                        gb: np.ndarray, count: SolveCount | None = None,
                        stages: list | None = None) -> np.ndarray:
    """Adjoint of :func:`_fine_trajectory` from ``lambda`` at its end; returns it at its start
    (its work added to ``count``, :func:`_step_adjoint`). ``stages``: those the
    trajectory kept, one entry per substep, or None to compute them again."""
    tau = h / m
    for n in range(K.shape[0] - 1, -1, -1):
        for q in range(m - 1, -1, -1):
            r = n * m + q
            lam = _step_adjoint(traj[r], lam, K[n], b[n], tau, scheme, act, gK[n],
                                gb[n], count, None if stages is None else stages[r])
    return lam


def _keeps_stages(scheme: Scheme, n_substeps: int, shape: tuple[int, ...],
                  itemsize: int) -> bool:
    """Whether a gradient keeps the stages of ``n_substeps`` substeps of states of
    ``shape`` from its forward sweep: for an implicit scheme (whose stages the adjoint
    would otherwise compute again by Newton's method, as many updates as the forward
    sweep took), when their ``2 s`` arrays per substep fit in
    ``_config.STORED_DERIVATIVE_BYTES``. An explicit scheme's stages cost one product
    each to recompute, about what reading them back would: they are not kept."""
    if not scheme.implicit:
        return False
    per_substep = 2 * scheme.stages * int(np.prod(shape)) * itemsize
    return n_substeps * per_substep <= _config.STORED_DERIVATIVE_BYTES


# ----------------------------------------------------------------------------------------
# The neural ODE as a propagator
# ----------------------------------------------------------------------------------------


class RKPropagator(Propagator):
    """The neural ODE as a :class:`ptoc.Propagator`: layer ``n`` is piece ``n``, solved by
    ``m = substeps`` steps of a Runge-Kutta scheme (explicit, or implicit with its stages
    by Newton's method, :func:`_solve_group`).

    Lorin 2020, parareal neural ODE (module docstring); :doc:`/theory/node`. On piece
    ``n`` (weights ``K_n, b_n``, length ``h = T/N``) :meth:`step` runs ``m`` steps of
    size ``tau = h/m`` of :class:`Scheme` ``s``::

        X_i = x + tau sum_j A_ij k_j,   k_i = sigma(K_n X_i + b_n),
        x_+ = x + tau sum_i w_i k_i,

    so that with Euler and one substep it is the ResNet layer
    ``x_{n+1} = x_n + h sigma(K_n x_n + b_n)``. :meth:`adjoint_step` is the exact
    reverse-mode adjoint of those substeps (recomputed from ``x``; ``_step_adjoint``
    writes it out stage by stage); :meth:`tangent_step` is its transpose.
    :meth:`objective` is the classifier's batch-mean cross-entropy ``Phi(x_N)``
    (:doc:`/theory/resnet`; without the regulariser), which needs ``labels``.

    The coarse grid (:meth:`coarse_step`): a step standing for ``L`` pieces with weights
    ``(K, b)`` is ``m`` steps of the scheme of size ``L h / m``, so that over one piece
    with its own weights it is :meth:`step`. With Euler and one substep it is the
    forward-Euler step ``x + L h sigma(K x + b)``: with ``"inject"`` weights, the
    per-chunk coarse propagator of the parareal neural ODE (:class:`NODECoarse`
    ``CHUNK``). :meth:`level_steps` returns :class:`RKLevelSteps`, which keep the
    substep states of a fine sweep.

    Parameters
    ----------
    network : ResNet
    params : Params or dict
        Read live: ``parameters()`` returns ``[K, b]`` of ``params``.
    labels : array of int (S,), optional
        Needed only for :meth:`objective` and :meth:`objective_gradient`.
    scheme : Scheme or str
        Default RK4.
    substeps : int
        Steps per piece ``m``.
    check : bool
        Validate ``params``; False only for a :class:`Params` validated already.

    Attributes
    ----------
    count : SolveCount
        Work of the state steps run so far (:meth:`step`, :meth:`propagate`,
        :meth:`coarse_step` and the level steps' runs): steps, Newton updates, linear
        systems. Adjoint and tangent steps recompute the stages and are not counted.
    keep_stages : bool
        Whether the fine runs of :class:`RKLevelSteps` keep the stages of their substeps
        with their states (:attr:`RKLevelSteps.stages`), for a gradient; default False.
        :meth:`with_scheme` passes it on.

    Examples
    --------
    >>> import numpy as np, ptoc
    >>> from ptoc.node import RKPropagator
    >>> net = ptoc.ResNet(width=3, depth=4, n_in=2, n_classes=2)
    >>> prop = RKPropagator(net, net.init_params(0), np.array([0, 1]), scheme="heun")
    >>> ptoc.check_propagator(prop, np.ones((2, 3))).passed
    True
    """

    def __init__(self, network: ResNet, params: Params | Mapping[str, np.ndarray],
                 labels: np.ndarray | None = None, *, scheme: Scheme | str = Scheme.RK4,
                 substeps: int = 1, check: bool = True):
        if not isinstance(network, ResNet):
            raise TypeError(f"network must be a ptoc.ResNet, got {type(network).__name__}")
        self.network = network
        self.params = network.check_params(params) if check else params
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        self.scheme = Scheme.parse(scheme)
        self.substeps = check_positive_int("substeps", substeps)
        self.n_layers = network.depth
        self.h = network.h
        self.activation = network.activation
        self.count = SolveCount()
        self.keep_stages = False

    def with_scheme(self, scheme: Scheme | str, substeps: int | None = None) -> RKPropagator:
        """The same network and parameters (shared, live) with another scheme or number
        of substeps."""
        other = RKPropagator(self.network, self.params, self.labels, scheme=scheme,
                             substeps=self.substeps if substeps is None else substeps,
                             check=False)
        other.keep_stages = self.keep_stages
        return other

    def _trajectory(self, x: np.ndarray, K: np.ndarray, b: np.ndarray,
                    dt: float, counted: bool = False, first: int = 0,
                    stages: list | None = None) -> np.ndarray:
        """The ``m + 1`` substep states over one piece of length ``dt`` with weights
        ``K`` (L=1, d, d) and ``b`` (1, d) (numbered ``first``); ``counted``: add the
        work to :attr:`count` (the state steps; adjoint and tangent steps recompute the
        stages and are not counted); ``stages`` as in :func:`_fine_trajectory`."""
        return _fine_trajectory(x, K, b, dt, self.substeps, self.scheme, self.activation,
                                self.count if counted else None, first, stages)

    def _piece_adjoint(self, x: np.ndarray, lam: np.ndarray, K: np.ndarray, b: np.ndarray,
                       dt: float, gK: np.ndarray, gb: np.ndarray) -> np.ndarray:
        """The adjoint of the ``m`` substeps over one piece from ``x``: the substeps run
        again, keeping the stages of an implicit scheme for the adjoint (one Newton
        solve per stage group and substep, not two)."""
        stages = [] if self.scheme.implicit else None
        traj = self._trajectory(x, K, b, dt, stages=stages)
        return _adjoint_trajectory(traj, lam, K, b, dt, self.substeps, self.scheme,
                                   self.activation, gK, gb, stages=stages)

    def step(self, n: int, x: np.ndarray) -> np.ndarray:
        p = self.params
        return self._trajectory(x, p.K[n:n + 1], p.b[n:n + 1], self.h, True, n)[-1].copy()

    def propagate(self, x: np.ndarray, start: int = 0, stop: int | None = None,
                  states: np.ndarray | None = None) -> np.ndarray:
        """Pieces ``start..stop-1`` in one :func:`_fine_trajectory` (the same bits as
        :meth:`step` one piece at a time)."""
        stop = self.n_layers if stop is None else stop
        traj = _fine_trajectory(x, self.params.K[start:stop], self.params.b[start:stop],
                                self.h, self.substeps, self.scheme, self.activation,
                                self.count, start)
        if states is not None:
            states[...] = traj[::self.substeps]
        return traj[-1].copy()

    def adjoint_step(self, n: int, x: np.ndarray, lam: np.ndarray,
                     grad: list[np.ndarray] | None = None) -> np.ndarray:
        p = self.params
        K, b = p.K[n:n + 1], p.b[n:n + 1]
        if grad is None:
            gK, gb = np.zeros_like(K), np.zeros_like(b)
        else:
            gK, gb = grad[0][n:n + 1], grad[1][n:n + 1]
        return self._piece_adjoint(x, lam, K, b, self.h, gK, gb)

    def tangent_step(self, n: int, x: np.ndarray, dx: np.ndarray) -> np.ndarray:
        """``Phi_n'(x) dx``: the tangent of every substep in the state."""
        p = self.params
        traj = self._trajectory(x, p.K[n:n + 1], p.b[n:n + 1], self.h)
        tau = self.h / self.substeps
        for q in range(self.substeps):
            dx = _step_tangent(traj[q], p.K[n], p.b[n], tau, self.scheme, self.activation, dx)
        return dx

    def _labels(self) -> np.ndarray:
        if self.labels is None:
            raise ValueError("this RKPropagator has no labels: pass labels= to use the "
                             "objective")
        return self.labels

    def objective(self, x: np.ndarray) -> float:
        return classifier_loss(self.params, x, self._labels())[0]

    def objective_gradient(self, x: np.ndarray) -> np.ndarray:
        return classifier_loss(self.params, x, self._labels())[1]

    def parameters(self) -> list[np.ndarray]:
        return [self.params.K, self.params.b]

    def layer_parameters(self, n: int) -> tuple[np.ndarray, ...]:
        return (self.params.K[n], self.params.b[n])

    def coarse_step(self, params: tuple[np.ndarray, ...], n_layers: int,
                    x: np.ndarray) -> np.ndarray:
        """``m`` steps of the scheme of size ``n_layers h / m`` with ``(K, b) = params``;
        Euler with one substep: ``x + n_layers h sigma(K x + b)``."""
        K, b = (np.asarray(a)[None] for a in params)
        return self._trajectory(x, K, b, n_layers * self.h, True)[-1].copy()

    def coarse_adjoint_step(self, params: tuple[np.ndarray, ...], n_layers: int,
                            x: np.ndarray, lam: np.ndarray) -> np.ndarray:
        """The transposed Jacobian of :meth:`coarse_step` at ``x``, applied to ``lam``."""
        K, b = (np.asarray(a)[None] for a in params)
        return self._piece_adjoint(x, lam, K, b, n_layers * self.h, np.zeros_like(K),
                                   np.zeros_like(b))

    def level_steps(self, plan: LevelPlan) -> RKLevelSteps:
        return RKLevelSteps(self, plan)


class RKLevelSteps(LevelSteps):
    """:class:`~ptoc.propagator.LevelSteps` of an :class:`RKPropagator`.

    A run of fine state steps over consecutive pieces (what parareal's fine sweep of a
    chunk is) is one :func:`_fine_trajectory` call, and its substep states are kept in
    :attr:`trajectory`: chunk ``j``'s fine trajectory ``F_j(U_j)`` of the parareal
    neural ODE (Lorin 2020; :doc:`/theory/node`), from which the gradient is formed.
    Every other step (adjoint, coarse, or with an added ``g``) is the generic one.

    Attributes
    ----------
    trajectory : ndarray or None
        The substep states of the latest such run, ``(L m + 1, S, d)``.
    stages : list or None
        The stage inputs and pre-activations ``(X_i, a_i)`` of each substep of that run,
        when the propagator's ``keep_stages`` is set (else None).
    """

    def __init__(self, prop: RKPropagator, plan: LevelPlan):
        super().__init__(prop, plan)
        self.trajectory: np.ndarray | None = None
        self.stages: list | None = None

    def runs(self, u: np.ndarray, g: np.ndarray | None, starts, ends) -> None:
        plan, prop = self.plan, self.prop
        if not plan.fine or plan.backward or g is not None:
            super().runs(u, g, starts, ends)
            return
        m = prop.substeps
        for s, e in zip(starts, ends, strict=True):
            s, e = int(s), int(e)
            if e < s:
                continue
            layers = plan.layers[s - 1:e]
            first = int(layers[0])
            if not np.array_equal(layers, np.arange(first, first + len(layers))):
                super().runs(u, g, [s], [e])
                self.trajectory = self.stages = None
                continue
            stop = first + len(layers)
            stages = [] if prop.keep_stages else None
            traj = _fine_trajectory(u[s - 1], prop.params.K[first:stop],
                                    prop.params.b[first:stop], prop.h, m, prop.scheme,
                                    prop.activation, prop.count, first, stages)
            u[s:e + 1] = traj[m::m]
            self.trajectory, self.stages = traj, stages


# ----------------------------------------------------------------------------------------
# Parareal on the solver core
# ----------------------------------------------------------------------------------------


def _diverged(k: int, what: str) -> NODEDivergenceError:
    where = "the initial coarse sweep (iteration 0)" if k == 0 else f"iteration {k}"
    return NODEDivergenceError(f"parareal neural ODE diverged at {where}: {what}")


class _NODERule(PararealRule):
    """The parareal neural ODE's test of iterate ``U^k`` (:class:`NODEParareal`).

    Before the fine sweep from ``U^k`` (so that this sweep is known to be the final one,
    with the schedule's last scheme, when the solve stops): ``U^k`` must be finite; for
    ``k >= 1`` the update ``c_k = max |U^k - U^{k-1}|`` (all boundaries, samples and
    features) must not exceed ``divergence_factor`` times the first non-zero one, and
    ``U^k`` is converged when iteration ``k`` used the schedule's last entry (scheme and
    steps per piece) and ``c_k <= tol`` or the last ``P`` iterations used it (then
    ``U^k`` is exact).

    Records, identical on every rank: :attr:`changes` (``c_1, c_2, ...``, also the
    solve's residuals), :attr:`schemes`, :attr:`entries` (scheme and steps per piece of
    every iteration) and, when kept, :attr:`iterates` ``U^0, U^1, ...``.
    """

    tests_fine_sweep = False

    def __init__(self, par: NODEParareal, n_chunks: int, substeps: int, keep_iterates: bool):
        self.par = par
        self.n_chunks = n_chunks
        self.substeps = substeps
        self.changes: list[float] = []
        self.residuals = self.changes
        self.schemes: list[Scheme] = []
        self.entries: list[tuple[Scheme, int]] = []
        self.iterates: list[np.ndarray] | None = [] if keep_iterates else None
        self._previous: np.ndarray | None = None
        self._run = 0  # consecutive iterations (up to now) with the current scheme

    def check(self, comm: Communicator, it: PararealIterate) -> bool:
        par, k = self.par, it.k
        mine = 0.0 if k == 0 else float(np.max(np.abs(it.boundary - self._previous)))
        kept = None
        if self.iterates is not None:
            kept = (it.start, it.boundary) if comm.rank == 0 else (None, it.boundary)
        parts = comm.allgather((mine, bool(np.all(np.isfinite(it.boundary))), kept))
        self._previous = it.boundary
        if not all(finite for _, finite, _ in parts):
            raise _diverged(k, "non-finite boundary values (NaN or inf)")
        converged = False
        if k > 0:
            e = par.entry_at(k, self.substeps)
            self._run = self._run + 1 if self.entries and self.entries[-1] == e else 1
            self.entries.append(e)
            self.schemes.append(e[0])
            change = max(c for c, _, _ in parts)
            first = next((c for c in self.changes if c > 0), 0.0)
            if first > 0 and change > par.divergence_factor * first:
                raise _diverged(k, f"the boundary update {change:.3e} exceeds "
                                   f"divergence_factor={par.divergence_factor:g} times the "
                                   f"first non-zero one ({first:.3e})")
            self.changes.append(change)
            final = par.entry_at(len(par.schedule), self.substeps)
            converged = e == final and (change <= par.tol or self._run >= self.n_chunks)
        if self.iterates is not None:  # U^k = (x_0, U_1^k, ..., U_P^k)
            self.iterates.append(np.stack([parts[0][2][0]] + [p[2][1] for p in parts]))
        return converged


@dataclass
class _NODESweep:
    """One rank's parareal neural ODE sweep: the core's solve, the rule's record and the
    work of this rank per iterate ``k = 0..K``: ``fine[k]`` of the fine sweep from ``U^k``
    (``fine[K]`` the final sweep), ``coarse[k]`` of the coarse steps that formed ``U^k``."""

    solve: PararealSolve
    rule: _NODERule
    converged: bool
    iterations: int
    fine: list[SolveCount]
    coarse: list[SolveCount]

    def outcome(self) -> SweepOutcome:
        return SweepOutcome(self.solve.local_solution(), self.converged, self.iterations,
                            list(self.rule.changes))


def _check_rk(prop: Any, par: NODEParareal) -> RKPropagator:
    if not isinstance(prop, RKPropagator):
        raise TypeError("NODEParareal solves a neural ODE given as a ptoc.node.RKPropagator "
                        f"(node_solve builds one), got {type(prop).__name__}")
    if prop.scheme is not par.final_scheme:
        raise ValueError(f"the propagator's scheme {prop.scheme.value!r} is not the "
                         f"schedule's last scheme {par.final_scheme.value!r}, whose solution "
                         "parareal converges to")
    return prop


def _parareal_sweep(par: NODEParareal, comm: Communicator, problem: SweepProblem,
                    u0: np.ndarray | None, shape: tuple[int, ...], dtype: Any,
                    keep_iterates: bool = False) -> _NODESweep:
    """The parareal neural ODE on this rank: :class:`ptoc.parallel.parareal.PararealSolve`
    with the schedule's fine propagators, the Euler coarse propagator and
    :class:`_NODERule`."""
    if problem.backward:
        raise TypeError("NODEParareal solves the state sweep of a neural ODE; its gradient "
                        "is the exact adjoint of the fine trajectories (node_loss_and_grad), "
                        "not a parareal adjoint sweep")
    prop = _check_rk(problem.prop, par)
    max_it = par.iterations_for(comm.size)
    m = prop.substeps
    # this rank's fine propagators, one per schedule entry, counting into one SolveCount
    fine_count = SolveCount()
    fine_props: dict[tuple[Scheme, int], RKPropagator] = {}
    for k in range(1, len(par.schedule) + 1):
        entry = par.entry_at(k, m)
        if entry not in fine_props:
            fine_props[entry] = prop.with_scheme(*entry)
            fine_props[entry].count = fine_count
    final = par.entry_at(len(par.schedule), m)
    G = par.coarse_function(prop)
    fine_snaps: list[SolveCount] = []
    coarse_snaps: list[SolveCount] = []

    def fine(k: int, last: bool) -> RKPropagator:
        """F^{(k+1)}, the fine propagator of the sweep from U^k; the last one is F^{final}.
        Called once per iterate, after the coarse steps that formed U^k and before the
        sweep from it: the work counts are split there."""
        fine_snaps.append(fine_count.copy())
        coarse_snaps.append(G.prop.count.copy())
        return fine_props[final if last else par.entry_at(k + 1, m)]

    options = Parareal(chunks=comm.size, coarse=G, max_iterations=max_it, tol=par.tol)
    rule = _NODERule(par, comm.size, m, keep_iterates)
    solve = PararealSolve(comm, problem, options, u0, shape, dtype, options.coarse, fine=fine,
                          rule=rule)
    with np.errstate(over="ignore", invalid="ignore"):
        converged, iterations = solve.solve()
    fine_snaps.append(fine_count.copy())
    fine_work = [b - a for a, b in zip(fine_snaps[:-1], fine_snaps[1:], strict=True)]
    coarse_work = [b - a for a, b in zip([SolveCount()] + coarse_snaps[:-1], coarse_snaps,
                                         strict=True)]
    return _NODESweep(solve, rule, converged, iterations, fine_work, coarse_work)


# ----------------------------------------------------------------------------------------
# The solve and its record
# ----------------------------------------------------------------------------------------


@dataclass
class NODESolution:
    """A neural-ODE solve (serial or parareal) and its cost and convergence record
    (Lorin 2020; ``U_j`` are the boundary values of the module docstring's iteration).

    Attributes
    ----------
    scheme : Scheme
        Scheme of the returned trajectories (the schedule's last one for parareal).
    substeps : int
        Steps per piece ``m``.
    bounds : ndarray (P+1,)
        Piece bounds of the chunks (``[0, N]`` for a serial solve).
    trajectories : list of ndarray
        Chunk ``j``'s fine trajectory ``F_j(U_j)`` from the final boundary value ``U_j``,
        all substep states, shape ((p_{j+1} - p_j) m + 1, S, d). The gradient is the
        adjoint of these trajectories.
    boundaries : ndarray (P+1, S, d)
        Final parareal iterate ``U^K`` (serial: the states at the chunk bounds).
    iterations : int
        Parareal iterations done (0 for a serial solve).
    converged : bool
        Serial: True. Parareal: the boundary update fell to ``tol`` or the iterate is
        exact (the last ``P`` iterations used the same scheme).
    changes : list of float
        ``max |U^k - U^{k-1}|`` after each iteration ``k = 1..K``.
    schemes : list of Scheme
        Fine scheme of each iteration.
    fine_substeps : list of int
        Fine steps per piece of each iteration.
    fine_steps, fine_steps_critical : list of int
        Fine (sub)steps of each iteration over all chunks, and the most of any one chunk
        (the critical path when every chunk has its own processor). A chunk whose input
        and scheme have not changed since its last fine solve is not solved again.
    rhs_evaluations, rhs_evaluations_critical : list of int
        Right-hand-side evaluations ``sigma(K X + b)`` of the fine solves, the same way.
        (For an implicit scheme this counts stages; its cost is in :attr:`fine_solves`.)
    coarse_steps : list of int
        Coarse steps of the initial coarse sweep (entry 0) and of each iteration.
    final_fine_steps, final_fine_steps_critical : int
        Fine steps of the final sweep that produces :attr:`trajectories` (serial: all).
    final_rhs_evaluations, final_rhs_evaluations_critical : int
    fine_solves : list of SolveCount
        Steps, Newton updates and linear systems of each iteration's fine sweeps, over
        all chunks (zero for explicit schemes but the steps).
    coarse_solves : list of SolveCount
        The same of the coarse steps that formed each iterate ``U^0 .. U^K``.
    final_solves : SolveCount
        The same of the final sweep (serial: of the whole solve).
    adjoint_solves : SolveCount
        The same of the adjoint sweep that :func:`node_loss_and_grad` runs on the
        trajectories (its steps, the transposed stage systems, and the Newton updates
        that recompute implicit stages where they were not kept); empty after a solve
        alone.
    stages : list or None
        Per chunk, the stage inputs and pre-activations ``(X_i, a_i)`` of every substep
        of its trajectory, kept by :func:`node_loss_and_grad` for an implicit scheme
        while they fit in ``ptoc._config.STORED_DERIVATIVE_BYTES``, so that its adjoint
        does not run Newton's method again (the same gradient, bit for bit); None
        otherwise.
    iterates : list of ndarray or None
        ``U^0, U^1, ..., U^K`` when requested (``keep_iterates=True``).
    """

    scheme: Scheme
    substeps: int
    bounds: np.ndarray
    trajectories: list[np.ndarray]
    boundaries: np.ndarray
    iterations: int = 0
    converged: bool = True
    changes: list[float] = field(default_factory=list)
    schemes: list[Scheme] = field(default_factory=list)
    fine_substeps: list[int] = field(default_factory=list)
    fine_steps: list[int] = field(default_factory=list)
    fine_steps_critical: list[int] = field(default_factory=list)
    coarse_steps: list[int] = field(default_factory=list)
    final_fine_steps: int = 0
    final_fine_steps_critical: int = 0
    iterates: list[np.ndarray] | None = None
    fine_solves: list[SolveCount] = field(default_factory=list)
    coarse_solves: list[SolveCount] = field(default_factory=list)
    final_solves: SolveCount = field(default_factory=SolveCount)
    adjoint_solves: SolveCount = field(default_factory=SolveCount)
    stages: list | None = field(default=None, repr=False, compare=False)

    #: The counts of :meth:`to_dict` (all but the arrays).
    _RECORD: ClassVar[tuple[str, ...]] = (
        "substeps", "iterations", "converged", "changes", "fine_substeps", "fine_steps",
        "fine_steps_critical",
        "rhs_evaluations", "rhs_evaluations_critical", "coarse_steps", "final_fine_steps",
        "final_fine_steps_critical", "final_rhs_evaluations", "final_rhs_evaluations_critical")

    @property
    def rhs_evaluations(self) -> list[int]:
        """Right-hand-side evaluations of each iteration's fine solves (steps x stages)."""
        return [f * s.stages for f, s in zip(self.fine_steps, self.schemes, strict=True)]

    @property
    def rhs_evaluations_critical(self) -> list[int]:
        """The same on the critical path."""
        return [f * s.stages for f, s in zip(self.fine_steps_critical, self.schemes,
                                              strict=True)]

    @property
    def final_rhs_evaluations(self) -> int:
        """Right-hand-side evaluations of the final sweep."""
        return self.final_fine_steps * self.scheme.stages

    @property
    def final_rhs_evaluations_critical(self) -> int:
        """The same on the critical path."""
        return self.final_fine_steps_critical * self.scheme.stages

    @property
    def final_state(self) -> np.ndarray:
        """``x_T`` (S, d): the end of the last chunk's trajectory."""
        return self.trajectories[-1][-1]

    @property
    def states(self) -> np.ndarray:
        """All substep states, (N m + 1, S, d); chunk ``j`` starts at its ``U_j``.

        Row ``n m + q`` is the state after ``q`` substeps of piece ``n``. After a
        parareal solve that has not converged, the end of chunk ``j - 1``'s trajectory
        (not stored here) differs from ``U_j``.
        """
        if len(self.trajectories) == 1:
            return self.trajectories[0]
        parts = [t[:-1] for t in self.trajectories[:-1]] + [self.trajectories[-1]]
        return np.concatenate(parts, axis=0)

    @property
    def forward_solves(self) -> SolveCount:
        """The work of the whole forward solve: every iteration's coarse and fine steps
        and the final sweep (Newton updates and linear systems included)."""
        return sum(self.coarse_solves + self.fine_solves, SolveCount()) + self.final_solves

    @property
    def total_fine_steps(self) -> int:
        """Fine steps of all iterations and the final sweep, over all chunks."""
        return int(sum(self.fine_steps) + self.final_fine_steps)

    @property
    def critical_fine_steps(self) -> int:
        """Fine steps on the critical path (per iteration the largest chunk), summed."""
        return int(sum(self.fine_steps_critical) + self.final_fine_steps_critical)

    @property
    def total_rhs_evaluations(self) -> int:
        """Right-hand-side evaluations of all fine solves."""
        return int(sum(self.rhs_evaluations) + self.final_rhs_evaluations)

    @property
    def critical_rhs_evaluations(self) -> int:
        """Right-hand-side evaluations on the critical path."""
        return int(sum(self.rhs_evaluations_critical) + self.final_rhs_evaluations_critical)

    def to_dict(self) -> dict[str, Any]:
        """The record without the arrays (JSON-ready)."""
        out = {key: (lambda v: list(v) if isinstance(v, list) else v)(getattr(self, key))
               for key in self._RECORD}
        return {"scheme": self.scheme.value, "chunks": [int(v) for v in np.diff(self.bounds)],
                "schemes": [s.value for s in self.schemes], **out,
                "fine_solves": [c.to_dict() for c in self.fine_solves],
                "coarse_solves": [c.to_dict() for c in self.coarse_solves],
                "final_solves": self.final_solves.to_dict()}


@dataclass
class _Options:
    scheme: Scheme
    substeps: int
    parareal: NODEParareal | None
    bounds: np.ndarray


def _resolve(network: ResNet, scheme: Scheme | str | None, substeps: int | None,
             parareal: NODEParareal | None) -> _Options:
    """Check the solve options against ``network`` (before any heavy work).

    The steps per piece: ``substeps``, else those of the parareal schedule's last entry
    when it sets them, else 1; both given and different is an error.
    """
    if not isinstance(network, ResNet):
        raise TypeError(f"network must be a ptoc.ResNet, got {type(network).__name__}")
    m = check_positive_int("substeps", substeps, allow_none=True)
    if parareal is not None and not isinstance(parareal, NODEParareal):
        raise TypeError(f"parareal must be None or a ptoc.node.NODEParareal, got "
                        f"{type(parareal).__name__}")
    s = None if scheme is None else Scheme.parse(scheme)
    if parareal is None:
        return _Options(s or Scheme.RK4, m or 1, None, np.array([0, network.depth], np.int64))
    if s is not None and s is not parareal.final_scheme:
        raise ValueError(f"scheme {s.value!r} conflicts with the parareal schedule, whose last "
                         f"scheme is {parareal.final_scheme.value!r}; leave scheme=None or "
                         "end the schedule with it")
    last = parareal.fine_substeps[-1]
    if m is not None and last is not None and m != last:
        raise ValueError(f"substeps={m} conflicts with the parareal schedule, whose last entry "
                         f"sets {last} steps per piece; leave substeps=None or make them equal")
    return _Options(parareal.final_scheme, m or last or 1, parareal,
                    parareal.chunk_bounds(network.depth))


def _check_x0(network: ResNet, x0: Any) -> np.ndarray:
    x0 = np.asarray(x0)
    if x0.ndim != 2 or x0.shape[1] != network.width or x0.shape[0] == 0:
        raise ValueError(f"x0 must have shape (S, {network.width}) with S >= 1, got {x0.shape}")
    if x0.dtype.kind not in "fiu":
        raise ValueError(f"x0 must hold real numbers, got dtype {x0.dtype}")
    x0 = np.ascontiguousarray(x0, dtype=network.dtype)
    if not np.all(np.isfinite(x0)):
        raise ValueError("x0 contains non-finite values (NaN or inf)")
    return x0


def _serial(network: ResNet, params: Params, x0: np.ndarray, opts: _Options,
            keep_stages: bool = False) -> NODESolution:
    m, s = opts.substeps, opts.scheme
    count = SolveCount()
    stages = [] if keep_stages else None
    traj = _fine_trajectory(x0, params.K, params.b, network.h, m, s, network.activation,
                            count, stages=stages)
    return NODESolution(s, m, opts.bounds, [traj], traj[[0, -1]].copy(),
                        final_fine_steps=count.steps, final_fine_steps_critical=count.steps,
                        final_solves=count, stages=None if stages is None else [stages])


#: Seconds a simulated rank of :func:`node_solve` may wait for a message (no real limit).
_RANK_WAIT = 1e9


def _parareal(network: ResNet, params: Params, x0: np.ndarray, opts: _Options,
              keep_iterates: bool, keep_stages: bool = False) -> NODESolution:
    """The parareal neural ODE: :func:`_parareal_sweep` on one simulated rank per chunk
    (threads of this process), its records assembled into a :class:`NODESolution`."""
    par = opts.parareal
    assert par is not None
    bounds, m = opts.bounds, opts.substeps
    prop = RKPropagator(network, params, scheme=par.final_scheme, substeps=m, check=False)
    prop.keep_stages = keep_stages

    def program(comm: Communicator) -> _NODESweep:
        problem = SweepProblem(comm, prop, bounds, backward=False)
        return _parareal_sweep(par, comm, problem, x0 if comm.rank == 0 else None, x0.shape,
                               x0.dtype, keep_iterates)

    # a rank waits for its neighbour's boundary as long as that one's fine sweeps take (a
    # rank that fails releases the others at once)
    sweeps = SimulatedRanks(len(bounds) - 1, timeout=_RANK_WAIT).run(program)
    rule, K = sweeps[0].rule, sweeps[0].iterations
    # per chunk (rows) and iterate (columns): the work of the fine sweep from U^k, and of
    # the coarse steps spent to form U^k
    fine = [s.fine for s in sweeps]
    coarse = [s.coarse for s in sweeps]
    trajectories = [s.solve.last_sweep.steps.trajectory for s in sweeps]
    stages = [s.solve.last_sweep.steps.stages for s in sweeps] if keep_stages else None
    for j, traj in enumerate(trajectories):
        if not np.all(np.isfinite(traj[-1])):
            raise _diverged(K, f"non-finite states in the final fine sweep of chunk {j}")
    fine_total = [sum((f[k] for f in fine), SolveCount()) for k in range(K + 1)]
    fine_critical = [max(f[k].steps for f in fine) for k in range(K + 1)]
    return NODESolution(
        par.final_scheme, m, bounds, trajectories,
        np.stack([x0] + [s.solve.boundary for s in sweeps]), iterations=K,
        converged=sweeps[0].converged, changes=list(rule.changes), schemes=list(rule.schemes),
        fine_substeps=[e[1] for e in rule.entries],
        fine_steps=[c.steps for c in fine_total[:K]],
        fine_steps_critical=fine_critical[:K],
        coarse_steps=[sum(c[k].steps for c in coarse) for k in range(K + 1)],
        final_fine_steps=fine_total[K].steps,
        final_fine_steps_critical=fine_critical[K], iterates=rule.iterates,
        fine_solves=fine_total[:K], final_solves=fine_total[K],
        coarse_solves=[sum((c[k] for c in coarse), SolveCount()) for k in range(K + 1)],
        stages=stages)


def _solve(network: ResNet, params: Params, x0: np.ndarray, opts: _Options,
           keep_iterates: bool = False, keep_stages: bool = False) -> NODESolution:
    """The serial or parareal solve; ``keep_stages``: keep the final trajectories' stages
    for a gradient where :func:`_keeps_stages` allows (the scheme of those trajectories,
    all their substeps)."""
    final = opts.scheme if opts.parareal is None else opts.parareal.final_scheme
    keep_stages = keep_stages and _keeps_stages(final, network.depth * opts.substeps,
                                                x0.shape, x0.itemsize)
    if opts.parareal is None:
        return _serial(network, params, x0, opts, keep_stages)
    return _parareal(network, params, x0, opts, keep_iterates, keep_stages)


def node_solve(network: ResNet, params: Params | Mapping[str, np.ndarray], x0: np.ndarray, *,
               scheme: Scheme | str | None = None, substeps: int | None = None,
               parareal: NODEParareal | None = None,
               keep_iterates: bool = False) -> NODESolution:
    """Solve ``x' = sigma(K(t) x + b(t))`` on ``[0, T]`` from ``x(0) = x0``.

    The weights are piecewise constant, ``K(t) = K_n``, ``b(t) = b_n`` on
    ``[n h, (n+1) h)``, ``h = T/N`` (Lorin 2020, parareal neural ODE;
    :doc:`/theory/node`). Serially, every piece takes ``substeps`` steps of ``scheme``; with
    ``parareal`` the pieces are split into chunks and solved by the parareal iteration of
    the module docstring with the coarse Euler propagator and the fine schedule of
    :class:`NODEParareal`.

    Parameters
    ----------
    network : ResNet
    params : Params or dict
    x0 : ndarray (S, d)
        Initial states (the output of the opening layer).
    scheme : Scheme or str, optional
        Fine scheme; default ``"rk4"`` serially and the schedule's last scheme with
        ``parareal`` (a different value is an error there).
    substeps : int, optional
        Steps per piece (``tau = h / substeps``); default 1, or with ``parareal`` those of
        the schedule's last entry when it is a ``(scheme, substeps)`` pair.
    parareal : NODEParareal, optional
        Solve by parareal across chunks (None: serial).
    keep_iterates : bool
        Keep every parareal iterate ``U^k`` in :attr:`NODESolution.iterates`.

    Returns
    -------
    NODESolution

    Raises
    ------
    ValueError
        Bad scheme, substeps, chunks or shapes (before any solving).
    NODEDivergenceError
        A non-finite or unboundedly growing parareal iterate (names the iteration).
    """
    opts = _resolve(network, scheme, substeps, parareal)
    p = network.check_params(params)
    x0 = _check_x0(network, x0)
    return _solve(network, p, x0, opts, keep_iterates)


def node_forward(network: ResNet, params: Params | Mapping[str, np.ndarray], X: np.ndarray, *,
                 scheme: Scheme | str | None = None, substeps: int | None = None,
                 parareal: NODEParareal | None = None,
                 keep_iterates: bool = False) -> NODESolution:
    """Opening layer ``x_0 = sigma(K_in y + b_in)`` (or ``y``), then :func:`node_solve`.

    :doc:`/theory/resnet` and :doc:`/theory/node`; Lorin 2020, parareal neural ODE.
    ``X`` is (S, n_in).
    """
    opts = _resolve(network, scheme, substeps, parareal)
    p = network.check_params(params)
    X, _ = check_inputs(network, X)
    x0, _ = opening_forward(network, p, X)
    return _solve(network, p, x0, opts, keep_iterates)


def node_loss(network: ResNet, params: Params | Mapping[str, np.ndarray], X: np.ndarray,
              labels: np.ndarray, *, scheme: Scheme | str | None = None,
              substeps: int | None = None,
              parareal: NODEParareal | None = None) -> float:
    """Objective ``J = Phi(x_T) + R`` of the neural ODE (no gradient).

    ``Phi`` is the ResNet's batch-mean softmax cross-entropy of ``z = W x_T + mu`` and
    ``R`` its regulariser (:doc:`/theory/resnet`); ``x_T`` is the end of the
    trajectories of :func:`node_forward` (Lorin 2020, parareal neural ODE).
    """
    opts = _resolve(network, scheme, substeps, parareal)
    p = network.check_params(params)
    X, y = check_inputs(network, X, labels)
    return _objective(network, p, X, y, opts)[0]


def _objective(network: ResNet, p: Params, X: np.ndarray, y: np.ndarray,
               opts: _Options) -> tuple[float, NODESolution]:
    """``J = Phi(x_T) + R`` and the solve, for checked arguments."""
    x0, _ = opening_forward(network, p, X)
    sol = _solve(network, p, x0, opts)
    value, *_ = classifier_loss(p, sol.final_state, y)
    return float(value + regulariser(network, p)), sol


def node_loss_and_grad(network: ResNet, params: Params | Mapping[str, np.ndarray],
                       X: np.ndarray, labels: np.ndarray, *,
                       scheme: Scheme | str | None = None, substeps: int | None = None,
                       parareal: NODEParareal | None = None):
    """Objective ``J = Phi(x_T) + R`` of the neural ODE and its exact discrete gradient.

    Forward: opening layer, then the serial or parareal solve of :func:`node_solve`
    (Lorin 2020, parareal neural ODE; :doc:`/theory/node`). Backward: from
    ``lambda_T = dPhi/dx_T`` (:doc:`/theory/adjoint`), the exact reverse-mode adjoint of
    every Runge-Kutta step of the trajectories (``_step_adjoint``), chunk by chunk
    from the last, which gives ``dJ/dK_n`` and ``dJ/db_n``; then the opening-layer,
    classifier and regulariser gradients (``ptoc.objective.assemble_gradient``). With
    ``parareal`` the adjoint runs on the trajectories of the final parareal iterate with
    the schedule's last scheme (exactly the serial gradient once parareal has converged
    exactly). Euler with one substep gives :func:`ptoc.loss_and_grad` to round-off.

    Parameters
    ----------
    network : ResNet
    params : Params or dict of arrays
    X : ndarray (S, n_in)
    labels : ndarray of int (S,)
    scheme : Scheme or str, optional
        Default ``"rk4"`` (serial) or the schedule's last scheme (parareal).
    substeps : int, optional
        Steps per piece (as :func:`node_solve`).
    parareal : NODEParareal, optional

    Returns
    -------
    loss : float
        ``J(theta)``.
    grads : Params or dict
        ``dJ/dtheta``, a dict when ``params`` is one (as :func:`ptoc.loss_and_grad`).
    info : NODESolution
        The forward solve and its record.

    Examples
    --------
    >>> import numpy as np, ptoc
    >>> from ptoc.node import NODEParareal, node_loss_and_grad
    >>> net = ptoc.ResNet(width=4, depth=8, n_in=2, n_classes=3)
    >>> X, y = np.random.default_rng(0).standard_normal((6, 2)), np.arange(6) % 3
    >>> loss, grads, info = node_loss_and_grad(net, net.init_params(0), X, y,
    ...     parareal=NODEParareal(4, schedule=("euler", "heun", "rk4")))
    >>> info.converged, [s.value for s in info.schemes][:3]
    (True, ['euler', 'heun', 'rk4'])
    """
    opts = _resolve(network, scheme, substeps, parareal)
    as_dict = not isinstance(params, Params)
    p = network.check_params(params)
    X, y = check_inputs(network, X, labels)
    x0, dsig_in = opening_forward(network, p, X)
    sol = _solve(network, p, x0, opts, keep_stages=True)
    loss, lam, dW, dmu = classifier_loss(p, sol.final_state, y)
    gK = np.zeros_like(p.K)
    gb = np.zeros_like(p.b)
    bounds, act = sol.bounds, network.activation
    for j in range(len(bounds) - 2, -1, -1):
        lo, hi = bounds[j], bounds[j + 1]
        lam = _adjoint_trajectory(sol.trajectories[j], lam, p.K[lo:hi], p.b[lo:hi], network.h,
                                  sol.substeps, sol.scheme, act, gK[lo:hi], gb[lo:hi],
                                  sol.adjoint_solves,
                                  None if sol.stages is None else sol.stages[j])
    grads, reg = assemble_gradient(network, p, X, gK, gb, lam, dsig_in, dW, dmu)
    total = loss + reg
    return total, (grads.to_dict(copy=False) if as_dict else grads), sol


# ----------------------------------------------------------------------------------------
# grad_fn for ptoc.training.train
# ----------------------------------------------------------------------------------------


@dataclass
class NODEStepRecord:
    """What one :class:`NeuralODEGradient` call cost.

    Attributes
    ----------
    loss : float
        ``J`` at the call's parameters.
    iterations : int
        Parareal iterations (0 serially).
    converged : bool
    changes : list of float
        Boundary updates per parareal iteration.
    fine_steps, fine_steps_critical : int
        Fine steps of the forward solve (iterations and final sweep), over all chunks
        and on the critical path.
    rhs_evaluations, rhs_evaluations_critical : int
        The same in right-hand-side evaluations.
    forward_solves, adjoint_solves : SolveCount
        Steps, Newton updates and linear systems of the forward solve (all of it:
        coarse, fine and final steps, :attr:`NODESolution.forward_solves`) and of the
        adjoint sweep (:attr:`NODESolution.adjoint_solves`): for an implicit scheme the
        linear systems are most of a step's cost (Lorin 2020).
    """

    loss: float
    iterations: int
    converged: bool
    changes: list[float]
    fine_steps: int
    fine_steps_critical: int
    rhs_evaluations: int
    rhs_evaluations_critical: int
    forward_solves: SolveCount = field(default_factory=SolveCount)
    adjoint_solves: SolveCount = field(default_factory=SolveCount)

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (JSON-ready)."""
        return asdict(self)


@dataclass
class NeuralODEGradient(GradientFunction):
    """``grad_fn(params, X, y) -> (loss, grads)`` of the (parareal) neural ODE.

    For :func:`ptoc.train`: every call is :func:`node_loss_and_grad` (Lorin
    2020, parareal neural ODE; :doc:`/theory/node`) with these options, and appends
    a :class:`NODEStepRecord` to :attr:`records`::

        grad = NeuralODEGradient(net, parareal=NODEParareal(4, schedule=("euler", "rk4")))
        result = train(net, params, data, grad_fn=grad)

    Theory: :doc:`/theory/node`.

    Parameters
    ----------
    network : ResNet
    scheme : Scheme or str, optional
    substeps : int, optional
        As :func:`node_solve`.
    parareal : NODEParareal, optional

    Attributes
    ----------
    records : list of NODEStepRecord
        One per call, in order.
    deterministic : bool
        True: a call is a pure function of (parameters, batch), so
        :class:`ptoc.methods.GradientMethod` may reuse the line search's evaluation
        at the accepted point instead of calling again (then no record is added).
    """

    deterministic: ClassVar[bool] = True

    network: ResNet
    scheme: Scheme | str | None = None
    substeps: int | None = None
    parareal: NODEParareal | None = None
    records: list[NODEStepRecord] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        opts = _resolve(self.network, self.scheme, self.substeps, self.parareal)
        self.scheme = opts.scheme
        self.substeps = opts.substeps

    def reset(self) -> None:
        """Forget the records."""
        self.records.clear()

    def config(self) -> dict[str, Any]:
        """Description for checkpoints and model files."""
        return {"name": "node", "scheme": Scheme.parse(self.scheme).value,
                "substeps": self.substeps, "parareal": repr(self.parareal)}

    def evaluator(self):
        """:meth:`evaluate`: the training loop reports the neural ODE's own ``J`` and
        accuracy (:meth:`ptoc.methods.GradientFunction.evaluator`)."""
        return self.evaluate

    def evaluate(self, params: Params | Mapping[str, np.ndarray], X: np.ndarray,
                 y: np.ndarray) -> tuple[float, float]:
        """``(J, accuracy)`` of the neural ODE being trained, from a serial solve with the
        final fine scheme (what :func:`ptoc.training.train` reports per epoch)."""
        p = self.network.check_params(params)
        X, y = check_inputs(self.network, X, y)
        value, sol = _objective(self.network, p, X, y,
                                _resolve(self.network, self.scheme, self.substeps, None))
        scores = sol.final_state @ p.W.T + p.mu
        return value, float(np.mean(np.argmax(scores, axis=1) == y))

    def __call__(self, params: Params | Mapping[str, np.ndarray], X: np.ndarray,
                 y: np.ndarray) -> tuple[float, Params | dict[str, np.ndarray]]:
        loss, grads, sol = node_loss_and_grad(self.network, params, X, y, scheme=self.scheme,
                                              substeps=self.substeps, parareal=self.parareal)
        self.records.append(NODEStepRecord(
            loss=float(loss), iterations=sol.iterations, converged=sol.converged,
            changes=list(sol.changes), fine_steps=sol.total_fine_steps,
            fine_steps_critical=sol.critical_fine_steps,
            rhs_evaluations=sol.total_rhs_evaluations,
            rhs_evaluations_critical=sol.critical_rhs_evaluations,
            forward_solves=sol.forward_solves, adjoint_solves=sol.adjoint_solves))
        return float(loss), grads
