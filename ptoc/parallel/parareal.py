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
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._checks import check_integer, check_positive_float
from ..propagator import Propagator
from .comm import Communicator
from .layout import sum_of_squares as _sum_of_squares
from .options import CoarseWeights, DivergenceError, SweepOutcome, SweepSolver
from .problem import Block, SweepProblem

TAG_U = 5


class PararealSolve:
    """Parareal iterations for one sweep on one rank (chunk = this rank's steps).

    Parameters
    ----------
    comm : Communicator
    problem : SweepProblem
    options : Parareal
    u0 : array or None
        Value of position 0 on the rank that owns it.
    coarse : Propagator, optional
        User-chosen coarse network (step ``j`` is ``G_j``); None for built-in coarse steps.
    """

    def __init__(self, comm: Communicator, problem: SweepProblem, options: Parareal,
                 u0: np.ndarray | None, shape: tuple[int, ...], dtype, coarse=None):
        self.comm = comm
        self.problem = problem
        self.opt = options
        self.coarse = coarse
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
        self.steps = problem.level_steps(0, np.arange(problem.n_steps + 1), self.base, self.hi)
        if coarse is None:
            needs = [[] for _ in range(comm.size)]
            for r in range(comm.size):
                pos = np.flatnonzero(owner == r)
                start = int(pos[0]) if pos[0] == 0 else int(pos[0]) - 1
                needs[r].append(problem.layers(start, int(pos[-1])))
            problem.gather_coarse_weights(needs, options.coarse)
        self.residuals: list[float] = []

    def _G(self, U: np.ndarray) -> np.ndarray:
        """The coarse propagator of this chunk."""
        end = self.hi - 1
        if self.coarse is None:
            return self.problem.coarse_step(self.base, end, U)
        self.comm.count(1)
        j = self.comm.rank
        if self.problem.backward:
            s, _ = self.problem.layers(self.base, end)
            return self.coarse.adjoint_step(j, self.problem.state(s), U)
        return self.coarse.step(j, U)

    def _F(self, U: np.ndarray) -> np.ndarray:
        """Run the chunk's fine steps from ``U``; the trajectory stays in ``self.u``."""
        self.u[0] = U
        if len(self.u) > 1:
            self.steps.runs(self.u, None, [1], [len(self.u) - 1])
        return self.u[-1].copy()

    def solve(self) -> tuple[bool, int]:
        """Iterate; returns ``(converged, iterations)``. Raises :class:`DivergenceError`."""
        comm, opt = self.comm, self.opt
        max_it = opt.max_iterations if opt.max_iterations is not None else comm.size
        U = self.u0 if self.first else comm.recv(self.prev, TAG_U)
        G_old = self._G(U)
        U_next = G_old
        if self.next is not None:
            comm.send(U_next, self.next, TAG_U)
        swept_from = None
        F_end = None
        k = 0
        while True:
            if swept_from is None or not np.array_equal(U, swept_from):
                F_end = self._F(U)
                swept_from = U
            r = F_end - U_next
            res = math.sqrt(comm.sum(_sum_of_squares(r)))
            self.residuals.append(res)
            if not math.isfinite(res):
                raise DivergenceError(f"parareal diverged: residual {res} at iteration {k}")
            if res <= opt.tol:
                return True, k
            if k == max_it:
                return False, k
            U_new = U if self.first else comm.recv(self.prev, TAG_U)
            G_new = G_old if np.array_equal(U_new, U) else self._G(U_new)
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
        ``||F_j(U_j) - U_{j+1}||`` is at most ``tol`` (absolute).
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
        object.__setattr__(self, "tol", check_positive_float("Parareal tol", self.tol))

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
