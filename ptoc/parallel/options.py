"""Solver strategies and their result record: ``Serial()``, ``Parareal(...)``, ``MGRIT(...)``.

A strategy is a frozen dataclass of options; it is passed to :func:`ptoc.forward`,
:func:`ptoc.adjoint` and :func:`ptoc.loss_and_grad` as ``solver=``. Options are enums
or numbers, never integer codes. Every solve returns a :class:`SolveResult`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .._checks import check_positive_float
from .._options import OptionEnum


class CoarseWeights(OptionEnum, what="coarse-weight rule"):
    """Weights of a coarse step covering layers ``s..e-1`` (``DESIGN.md`` section 4).

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


def _pos_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


@dataclass(frozen=True)
class Serial:
    """The serial sweep: layer after layer (the reference every parallel solver must match).

    The state and adjoint sweeps of ``DESIGN.md`` sections 1-2; one-level MGRIT is this
    sweep (section 4). Theory: :doc:`/theory/resnet`, :doc:`/theory/adjoint`.
    """

    name = "serial"


@dataclass(frozen=True)
class Parareal:
    """Parareal across ``chunks`` contiguous chunks of layers (``DESIGN.md`` section 4).

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
        ``||F_j(U_j) - U_{j+1}||`` is at most ``tol`` (absolute).
    """

    chunks: int | None = None
    coarse: CoarseWeights | str | Any = CoarseWeights.INJECT
    max_iterations: int | None = None
    tol: float = 1e-12
    name = "parareal"

    def __post_init__(self) -> None:
        if self.chunks is not None:
            _pos_int("Parareal chunks", self.chunks)
        if isinstance(self.coarse, (str, CoarseWeights)):
            object.__setattr__(self, "coarse", CoarseWeights.parse(self.coarse))
        elif not (hasattr(self.coarse, "step") or callable(self.coarse)):
            raise ValueError("Parareal coarse must be 'inject', 'average', a Propagator with "
                             "one layer per chunk, or a function coarse(j, x), got "
                             f"{self.coarse!r}")
        if self.max_iterations is not None:
            _pos_int("Parareal max_iterations", self.max_iterations, 0)
        object.__setattr__(self, "tol", check_positive_float("Parareal tol", self.tol))


@dataclass(frozen=True)
class MGRIT:
    """Multigrid reduction in time across layers (Falgout et al. 2014; Günther et al. 2020).

    Nonlinear FAS multigrid on the layer grid: C-points every ``coarsening`` steps,
    F- or FCF-relaxation, injection restriction, interpolation by F-relaxing the
    corrected C-points, V- or F-cycles recursively down to a coarsest grid solved by
    a serial sweep. The coarse step on level ``l`` from layer ``s`` to ``e`` is
    ``x -> x + (e - s) h sigma(K x + b)`` with the weights of layer ``s`` (``INJECT``)
    or the mean over ``s..e-1`` (``AVERAGE``). Conventions follow PyMGRIT 1.0.6: on
    the finest level only the first iteration starts with an F-relaxation (later ones
    start from the previous interpolation), and the residual is measured at the
    finest C-points, ``r_i = Phi(u_{i-1}) - u_i``, in the 2-norm over all of them.
    ``DESIGN.md`` section 4; two-level convergence theory: Dobrev, Kolev, Petersson &
    Schroder 2017. Theory: :doc:`/theory/mgrit`.

    Parameters
    ----------
    coarsening : int
        Coarsening factor ``m >= 2``.
    max_levels : int
        Largest number of levels (1 gives the serial sweep).
    min_coarse_steps : int
        Do not coarsen below this many steps on the coarsest grid.
    relaxation : Relaxation, str or sequence
        ``"F"`` or ``"FCF"``, or one per level (the coarsest level needs none).
    cycle : Cycle or str
        ``"V"`` or ``"F"``.
    tol : float
        Absolute tolerance on the residual norm.
    rtol : float, optional
        Relative tolerance (to the first residual); stop when either is met.
    max_iterations : int
    coarse_weights : CoarseWeights or str
    nested_iteration : bool
        Start from the coarse solutions interpolated to the fine grid (with two levels
        and F-relaxation this makes the iterates those of parareal).
    divergence_factor : float
        Stop with an error when the residual exceeds this multiple of the first one.
    """

    coarsening: int = 4
    max_levels: int = 10
    min_coarse_steps: int = 2
    relaxation: Relaxation | str | Sequence[Relaxation | str] = Relaxation.FCF
    cycle: Cycle | str = Cycle.V
    tol: float = 1e-10
    rtol: float | None = None
    max_iterations: int = 50
    coarse_weights: CoarseWeights | str = CoarseWeights.INJECT
    nested_iteration: bool = False
    divergence_factor: float = 1e6
    name = "mgrit"

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "coarsening", _pos_int("MGRIT coarsening factor m", self.coarsening, 2))
        set_(self, "max_levels", _pos_int("MGRIT max_levels", self.max_levels))
        set_(self, "min_coarse_steps", _pos_int("MGRIT min_coarse_steps", self.min_coarse_steps))
        if isinstance(self.relaxation, (str, Relaxation)):
            set_(self, "relaxation", Relaxation.parse(self.relaxation))
        else:
            relax = tuple(Relaxation.parse(r) for r in self.relaxation)
            if not relax:
                raise ValueError("MGRIT relaxation must name at least one level")
            set_(self, "relaxation", relax)
        set_(self, "cycle", Cycle.parse(self.cycle))
        set_(self, "tol", check_positive_float("MGRIT tol", self.tol))
        if self.rtol is not None:
            set_(self, "rtol", check_positive_float("MGRIT rtol", self.rtol))
        set_(self, "max_iterations", _pos_int("MGRIT max_iterations", self.max_iterations))
        set_(self, "coarse_weights", CoarseWeights.parse(self.coarse_weights))
        set_(self, "nested_iteration", bool(self.nested_iteration))
        set_(self, "divergence_factor", check_positive_float("MGRIT divergence_factor",
                                                   self.divergence_factor))

    def relaxation_on(self, level: int) -> Relaxation:
        """Relaxation used on ``level`` (the last entry repeats for deeper levels)."""
        if isinstance(self.relaxation, Relaxation):
            return self.relaxation
        return self.relaxation[min(level, len(self.relaxation) - 1)]


Solver = Serial | Parareal | MGRIT


def check_solver(solver: Any) -> Solver:
    """Return ``solver`` if it is a strategy object, else a clear ``TypeError``."""
    if solver is None:
        return Serial()
    if isinstance(solver, (Serial, Parareal, MGRIT)):
        return solver
    if isinstance(solver, type) and solver in (Serial, Parareal, MGRIT):
        raise TypeError(f"pass an instance, e.g. solver=ptoc.{solver.__name__}(), "
                        "not the class")
    raise TypeError("solver must be ptoc.Serial(), ptoc.Parareal(...) or ptoc.MGRIT(...), "
                    f"got {solver!r}")


@dataclass
class SolveResult:
    """Record of one layer-parallel solve (state or adjoint sweep).

    The layer-step counts are the cost model of ``DESIGN.md`` sections 4-5 (one unit
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


class DivergenceError(RuntimeError):
    """A layer-parallel solve diverged (non-finite or growing residual)."""
