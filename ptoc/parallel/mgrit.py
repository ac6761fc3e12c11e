"""MGRIT for one sweep, as the program of one rank (SPMD).

Falgout, Friedhoff, Kolev, MacLachlan & Schroder, *Parallel time integration with
multigrid* (SIAM J. Sci. Comput. 2014), in the nonlinear FAS form used for ResNets
by Günther et al. 2020; iteration structure as in PyMGRIT 1.0.6.

On level ``l`` the unknowns are ``u_k`` at positions ``k = 0..n_l`` with
``A_l(u)_0 = u_0`` and ``A_l(u)_k = u_k - Phi^l_{k-1}(u_{k-1})``; level 0 solves
``A_0(u) = (x_0, 0, ..., 0)`` and coarse levels ``A_l(u) = g_l``. Every ``m``-th
position (and the last) is a C-point; the others are F-points.

* F-relaxation: ``u_k = Phi(u_{k-1}) + g_k`` along each run of F-points, from its
  C-point (runs are independent, hence parallel);
* C-relaxation: the same update at each C-point, from the F-point before it;
* restriction (FAS, injection): ``v = u`` at the C-points and
  ``g_c,k = (g_k + Phi(u_{k-1}) - u_k) + v_k - Phi_c(v_{k-1})``;
* correction: ``u_k += u_c,k - v_k`` at the C-points, then F-relaxation
  (interpolation);
* coarsest level: one sequential sweep ``u_k = Phi(u_{k-1}) + g_k``.

The functions that compute (``_f_relax``, ``_c_relax``, ``_restrict``, ``_correct``,
``_residual``) only read and write this rank's arrays; the values they need from a
neighbour are exchanged before they run (``_exchange_*``), except in F-relaxation,
where a run of F-points split between ranks is continued by the right-hand rank
once the left-hand rank has finished its part (the pipeline is inherent to the
method).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .._checks import check_integer, check_positive_float
from .._workspace import bounded_cache
from .comm import Communicator
from .layout import mgrit_levels
from .options import (
    CoarseWeights,
    Cycle,
    DivergenceError,
    Relaxation,
    SweepOutcome,
    SweepSolver,
    check_tol,
    has_stagnated,
)
from .problem import Block, SweepProblem, scratch

# message tags: TAG_* + 16 * level
TAG_F, TAG_C, TAG_V = 2, 3, 4


@dataclass
class _Level:
    """Grid of one level as seen by one rank."""

    points: np.ndarray  # fine positions of the level's positions
    is_c: np.ndarray  # C-point flags (coarsest level: only position 0)
    owner: np.ndarray  # owner rank of every position
    lo: int  # this rank's positions are lo..hi-1
    hi: int
    base: int  # position stored at local index 0 (lo - 1 when there is a ghost)
    prev: int | None  # owner of position lo - 1
    next: int | None  # owner of position hi
    coarse_of: np.ndarray | None  # position on the next level of each C-point, else -1

    @property
    def empty(self) -> bool:
        return self.lo == self.hi

    @property
    def n(self) -> int:
        return len(self.points) - 1

    def loc(self, k: int) -> int:
        return k - self.base

    def f_runs(self) -> list[tuple[int, int]]:
        """Maximal runs ``(s, e)`` (inclusive) of this rank's F-points, in order."""
        runs, start = [], None
        for k in range(self.lo, self.hi):
            f = k > 0 and not self.is_c[k]
            if f and start is None:
                start = k
            if not f and start is not None:
                runs.append((start, k - 1))
                start = None
        if start is not None:
            runs.append((start, self.hi - 1))
        return runs

    def c_points(self) -> list[int]:
        return [k for k in range(self.lo, self.hi) if k > 0 and self.is_c[k]]


def _make_level(points: np.ndarray, next_points: np.ndarray | None, fine_owner: np.ndarray,
                rank: int) -> _Level:
    owner = fine_owner[points]
    if next_points is None:
        is_c = np.zeros(len(points), dtype=bool)
        is_c[0] = True
        coarse_of = None
    else:
        is_c = np.isin(points, next_points)
        coarse_of = np.full(len(points), -1, dtype=np.int64)
        coarse_of[is_c] = np.arange(len(next_points))
    mine = np.flatnonzero(owner == rank)
    if mine.size == 0:
        return _Level(points, is_c, owner, 0, 0, 0, None, None, coarse_of)
    lo, hi = int(mine[0]), int(mine[-1]) + 1
    prev = int(owner[lo - 1]) if lo > 0 else None
    nxt = int(owner[hi]) if hi < len(points) else None
    base = lo - 1 if lo > 0 else lo
    return _Level(points, is_c, owner, lo, hi, base, prev, nxt, coarse_of)


class _RelaxPlan:
    """Index sets of one level's relaxations on this rank, computed once."""

    def __init__(self, lv: _Level):
        self.send_last = not lv.empty and lv.next is not None and not lv.is_c[lv.hi]
        self.recv_first = not lv.empty and lv.prev is not None and not lv.is_c[lv.lo]
        self.send_at_start = self.send_last and lv.is_c[lv.hi - 1]
        runs = [] if lv.empty else [(lv.loc(s), lv.loc(e)) for s, e in lv.f_runs()]
        # a run that starts at this rank's first position waits for the rank before
        self.waiting = runs[:1] if runs and self.recv_first and runs[0][0] == lv.loc(lv.lo) \
            else []
        free = runs[len(self.waiting):]
        self.free_starts = np.array([r[0] for r in free], dtype=np.int64)
        self.free_ends = np.array([r[1] for r in free], dtype=np.int64)
        self.free_steps = int(np.sum(self.free_ends - self.free_starts + 1))
        self.free_sends = bool(free) and self.send_last and free[-1][1] == lv.loc(lv.hi - 1)
        self.last = lv.loc(lv.hi - 1) if not lv.empty else -1
        # C-points, split so that a C-relaxation in place reads only old values: a C-point
        # right after another C-point (a last interval of length one) goes first
        c = [] if lv.empty else [lv.loc(k) for k in lv.c_points()]
        cset = set(c)
        self.c_first = np.array([j for j in c if j - 1 in cset][::-1], dtype=np.int64)
        self.c_rest = np.array([j for j in c if j - 1 not in cset], dtype=np.int64)


#: Most bytes of index arrays kept for grids already seen (:func:`_structure`).
STRUCTURE_CACHE_BYTES = 64 << 20


@bounded_cache(STRUCTURE_CACHE_BYTES)
def _structure(n_steps: int, owner: tuple[int, ...], rank: int, size: int, coarsening: int,
               max_levels: int, min_coarse_steps: int, backward: bool):
    """Everything about the grids that does not depend on the numbers: the levels as seen
    by ``rank``, the coarse weights every rank needs, the relaxation plans and the index
    arrays of the C-points (cached: training solves the same shapes again and again)."""
    owner_arr = np.asarray(owner)
    points = mgrit_levels(n_steps, coarsening, max_levels, min_coarse_steps)
    levels = [_make_level(p, points[i + 1] if i + 1 < len(points) else None, owner_arr, rank)
              for i, p in enumerate(points)]
    needs: list[list[tuple[int, int]]] = [[] for _ in range(size)]
    for lv in levels[1:]:
        p = lv.points
        if backward:
            s_, e_ = n_steps - p[1:], n_steps - p[:-1]
        else:
            s_, e_ = p[:-1], p[1:]
        for r, s, e in zip(lv.owner[1:].tolist(), s_.tolist(), e_.tolist(), strict=True):
            needs[r].append((s, e))
    plans = [_RelaxPlan(lv) for lv in levels]
    c_local = [np.array([lv.loc(k) for k in lv.c_points()], dtype=np.int64) for lv in levels]
    cc_local = [
        np.array([levels[i + 1].loc(int(lv.coarse_of[k])) for k in lv.c_points()],
                 dtype=np.int64) if i + 1 < len(levels) else np.empty(0, np.int64)
        for i, lv in enumerate(levels)]
    return levels, needs, plans, c_local, cc_local


_ROW_OPERATIONS = None


def _rows():
    """The compiled row operations, imported on first use (importing ptoc loads no numba)
    and kept: an import statement in a solve's inner calls took about 1 us each."""
    global _ROW_OPERATIONS
    if _ROW_OPERATIONS is None:
        from ..kernels import rows as module

        _ROW_OPERATIONS = module
    return _ROW_OPERATIONS


class MGRITSolve:
    """MGRIT iterations for one sweep on one rank.

    Parameters
    ----------
    comm : Communicator
    problem : SweepProblem
    options : MGRIT
    u0 : array or None
        Value of position 0 (the initial state or the terminal adjoint) on the rank
        that owns it.
    shape, dtype
        Shape and dtype of one state.
    guess : dict of int to array, optional
        Warm start: values of this rank's fine positions.
    """

    def __init__(self, comm: Communicator, problem: SweepProblem, options: MGRIT,
                 u0: np.ndarray | None, shape: tuple[int, ...], dtype,
                 guess: dict[int, np.ndarray] | None = None):
        self.comm = comm
        self.problem = problem
        self.opt = options
        self.levels, needs, self._plan, self._c_local, self._cc_local = _structure(
            problem.n_steps, tuple(problem.owner.tolist()), comm.rank, comm.size,
            options.coarsening, options.max_levels, options.min_coarse_steps,
            problem.backward)
        if len(self.levels) > 1:
            problem.gather_coarse_weights(needs, options.coarse_weights)
        self.steps = [None if lv.empty else problem.level_steps(i, lv.points, lv.base, lv.hi)
                      for i, lv in enumerate(self.levels)]

        side = "adj" if problem.backward else "fwd"

        def grid(name: str, i: int, zero: bool) -> np.ndarray:
            lv = self.levels[i]
            get = scratch.zeros if zero else scratch.get
            return get(f"mgrit-{name}{i}-{side}", (lv.hi - lv.base,) + tuple(shape), dtype)

        # The coarse grids live in reused buffers. The finest grid is a new array, which
        # leaves this object as it is (local_solution): a reused one had to be set to zero
        # and copied out at the end, two passes over the largest grid per solve (0.2 to
        # 0.3 ms of an 11 ms solve at d = 16, S = 32, N = 1024). Its values start at zero
        # (the initial guess at the C-points; the F-points are relaxed before they are
        # read), pages the system hands out zeroed. A coarse grid is written in full by
        # the restriction before it is read (u, v and g at every coarse position; row 0 is
        # the first position or a ghost, set or received before use), except in nested
        # iteration, which starts from the coarse problems with g = 0.
        n = len(self.levels)
        nested = options.nested_iteration and n > 1
        lv0 = self.levels[0]
        self.u = [np.zeros((lv0.hi - lv0.base,) + tuple(shape), dtype)] + [
            grid("u", i, nested) for i in range(1, n)]
        self.v = [None] + [grid("v", i, False) for i in range(1, n)]
        self.g = [None] + [grid("g", i, nested) for i in range(1, n)]
        # the finest C-points' values before a C-relaxation, row r for the r-th C-point
        self._c_before = scratch.get(f"mgrit-c-before-{side}",
                                     (len(self._c_local[0]),) + tuple(shape), dtype)
        self._c_rows = np.arange(len(self._c_local[0]), dtype=np.int64)
        # levels this rank holds alone (no neighbour on it): there a relaxation and the
        # grid transfer next to it are one level-steps call, which a compiled level does
        # interval by interval (runs_then_residuals, correct_then_runs)
        self._alone = [not lv.empty and lv.prev is None and lv.next is None
                       for lv in self.levels]
        # the rows of a coarse grid that its cycle reads before writing: its first row
        # (position 0 or the ghost) and its C-points (an F-relaxation comes first and
        # writes the F-points; on the coarsest level the serial sweep writes them all)
        self._starts = [None] + [
            np.concatenate(([0], self._c_local[i])).astype(np.int64)
            if not self.levels[i].empty else np.empty(0, np.int64) for i in range(1, n)]
        for lv, u in zip(self.levels, self.u, strict=True):
            if not lv.empty and lv.lo == 0:
                u[0] = u0
        if guess is not None:
            lv = self.levels[0]
            for k in range(max(lv.lo, 1), lv.hi):
                self.u[0][lv.loc(k)] = guess[k]
        self.residuals: list[float] = []

    # --- exchanges (no arithmetic) -------------------------------------------------------------
    def _exchange_c_ghost(self, level: int, arr: np.ndarray) -> None:
        """Refresh the ghost ``arr[lo - 1]`` where this rank's first position is a C-point."""
        lv = self.levels[level]
        if lv.empty:
            return
        if lv.next is not None and lv.is_c[lv.hi]:
            self.comm.send(arr[lv.loc(lv.hi - 1)], lv.next, TAG_C + 16 * level)
        if lv.prev is not None and lv.is_c[lv.lo]:
            arr[0] = self.comm.recv(lv.prev, TAG_C + 16 * level)

    def _exchange_ghost(self, level: int, arr: np.ndarray) -> None:
        """Refresh the ghost ``arr[lo - 1]`` on every rank that has one."""
        lv = self.levels[level]
        if lv.empty:
            return
        if lv.next is not None:
            self.comm.send(arr[lv.loc(lv.hi - 1)], lv.next, TAG_V + 16 * level)
        if lv.prev is not None:
            arr[0] = self.comm.recv(lv.prev, TAG_V + 16 * level)

    # --- relaxation and grid transfer ----------------------------------------------------------
    def _f_relax(self, level: int) -> None:
        """``u_k = Phi(u_{k-1}) + g_k`` along the runs of F-points (on the coarsest level:
        along all positions, which is the serial coarse solve).

        A run that starts at this rank's first position continues a run of the rank
        before; it waits for that rank's last value and is done last, the other runs
        (independent of any neighbour) first, in one batched call.
        """
        lv, u, g, plan = self.levels[level], self.u[level], self.g[level], self._plan[level]
        if lv.empty:
            return
        steps = self.steps[level]
        tag = TAG_F + 16 * level
        if plan.send_at_start:
            self.comm.send(u[plan.last], lv.next, tag)
        if len(plan.free_starts):
            steps.runs(u, g, plan.free_starts, plan.free_ends, plan.free_steps)
            if plan.free_sends:
                self.comm.send(u[plan.last], lv.next, tag)
        if plan.waiting:
            (s, e), = plan.waiting
            u[0] = self.comm.recv(lv.prev, tag)
            steps.runs(u, g, [s], [e])
            if plan.send_last and e == plan.last:
                self.comm.send(u[plan.last], lv.next, tag)

    def _c_relax(self, level: int) -> None:
        """``u_k = Phi(u_{k-1}) + g_k`` at the C-points, all from the values before the sweep
        (in place: C-points that follow a C-point first, one at a time and the last
        first, then the others in parallel)."""
        u, g, plan = self.u[level], self.g[level], self._plan[level]
        self._exchange_c_ghost(level, u)
        steps = self.steps[level]
        for c in plan.c_first:
            steps.runs(u, g, c[None], c[None], 1)
        if len(plan.c_rest):
            steps.runs(u, g, plan.c_rest, plan.c_rest, len(plan.c_rest))

    def _c_relax_with_residual(self) -> float:
        """C-relaxation on the finest level that also returns the residual of the iterate
        before it, ``sqrt(sum_k |Phi(u_{k-1}) - u_k|^2)`` over the C-points (collective):
        with ``g = 0`` there, the change of each C-point is its residual. The old values
        are kept in ``self._c_before`` so the sweep can be undone."""
        c, rows = self._c_local[0], self._c_rows
        _rows().copy_rows(self._c_before, rows, self.u[0], c)
        self._c_relax(0)
        sq = _rows().sumsq_diff(self.u[0], c, self._c_before, rows)
        return math.sqrt(self.comm.sum(sq))

    def _correct_relax_with_residual(self) -> float:
        """The end of a cycle on the finest level (correction, F-relaxation) and the
        C-relaxation of :meth:`_c_relax_with_residual`, in one level-steps call, on a
        rank that holds the level alone; the same values and residual."""
        plan = self._plan[0]
        sq = self.steps[0].correct_then_runs(
            self.u[0], self.g[0], self._c_local[0], self.u[1], self.v[1], self._cc_local[0],
            plan.free_starts, plan.free_ends, self._c_before, n_steps=plan.free_steps)
        return math.sqrt(self.comm.sum(sq))

    def _undo_c_relax(self) -> None:
        _rows().copy_rows(self.u[0], self._c_local[0], self._c_before, self._c_rows)

    def _restrict(self, level: int, fine_half_done: bool = False) -> None:
        """Inject ``u`` at the C-points into ``v`` and form the FAS right-hand side
        ``g_c = (g + Phi(u_{k-1}) - u_k) + (v_k - Phi_c(v_{k-1}))``; ``fine_half_done``:
        the injection and the first half were done with the F-relaxation
        (:meth:`_f_relax_and_restrict`)."""
        fine, coarse = self.levels[level], self.levels[level + 1]
        u, g = self.u[level], self.g[level]
        v, gc = self.v[level + 1], self.g[level + 1]
        self._exchange_c_ghost(level, u)
        c, cc = self._c_local[level], self._cc_local[level]
        if not fine_half_done:
            _rows().copy_rows(v, cc, u, c)
        if not fine.empty and fine.lo == 0 and not coarse.empty:
            v[coarse.loc(0)] = u[fine.loc(0)]
        self._exchange_ghost(level + 1, v)
        if len(c):
            # gc = (g + (Phi(u_{k-1}) - u_k)), then gc += v_k - Phi_c(v_{k-1})
            if not fine_half_done:
                self.steps[level].points_residual(u, g, c, gc, cc)
            self.steps[level + 1].points_tau(v, cc, gc, cc)
        # u = v where the coarse cycle reads u before writing it (not the whole grid: the
        # F-points are relaxed before they are read, and copying them was a pass over
        # the coarse grid per cycle for nothing)
        start = self._starts[level + 1]
        _rows().copy_rows(self.u[level + 1], start, v, start)

    def _f_relax_and_restrict(self, level: int) -> None:
        """:meth:`_f_relax` then :meth:`_restrict`; on a level this rank holds alone, the
        F-relaxation, the injection and the fine half of the right-hand side are one
        level-steps call (``runs_then_residuals``), the same values."""
        if not self._alone[level]:
            self._f_relax(level)
            self._restrict(level)
            return
        plan = self._plan[level]
        self.steps[level].runs_then_residuals(
            self.u[level], self.g[level], plan.free_starts, plan.free_ends,
            self._c_local[level], self.g[level + 1], self._cc_local[level], self.v[level + 1],
            n_steps=plan.free_steps)
        self._restrict(level, fine_half_done=True)

    def _correct_and_f_relax(self, level: int) -> None:
        """:meth:`_correct` then :meth:`_f_relax`; one level-steps call
        (``correct_then_runs``) on a level this rank holds alone."""
        if not self._alone[level]:
            self._correct(level)
            self._f_relax(level)
            return
        plan = self._plan[level]
        self.steps[level].correct_then_runs(
            self.u[level], self.g[level], self._c_local[level], self.u[level + 1],
            self.v[level + 1], self._cc_local[level], plan.free_starts, plan.free_ends,
            n_steps=plan.free_steps)

    def _correct(self, level: int) -> None:
        """``u_k += u_c - v`` at this rank's C-points."""
        c, cc = self._c_local[level], self._cc_local[level]
        if len(c):
            _rows().correct(self.u[level], c, self.u[level + 1], self.v[level + 1], cc)

    def _residual(self) -> float:
        """``sqrt(sum_k |Phi(u_{k-1}) - u_k|^2)`` over the finest C-points (collective)."""
        u = self.u[0]
        self._exchange_c_ghost(0, u)
        c = self._c_local[0]
        sq = 0.0
        if len(c):
            phi = self.steps[0].points_apply(u, c)
            sq = _rows().sumsq_diff(phi, np.arange(len(c)), u, c)
        return math.sqrt(self.comm.sum(sq))

    # --- cycles --------------------------------------------------------------------------------
    def _cycle(self, level: int, iteration: int, first_f: bool, cycle: Cycle,
               c_done: bool = False, defer_end: bool = False) -> None:
        """One V- (or F-) cycle from ``level``; ``c_done``: the first C-relaxation of this
        level was already done (by :meth:`_c_relax_with_residual`); ``defer_end``: stop
        before the correction and the last F-relaxation of this level, which the caller
        does (:meth:`_correct_relax_with_residual`)."""
        if level == len(self.levels) - 1:
            self._f_relax(level)  # coarsest level: the serial sweep
            return
        f_first = first_f and (level > 0 or iteration == 0)
        sweeps = self.opt.relaxation_on(level).cf_sweeps
        # the F-relaxation right before the restriction, if any, goes with it
        if sweeps == 0:
            if f_first:
                self._f_relax_and_restrict(level)
            else:
                self._restrict(level)
        else:
            if f_first:
                self._f_relax(level)
            for sweep in range(sweeps):
                if not (c_done and sweep == 0):
                    self._c_relax(level)
                if sweep < sweeps - 1:
                    self._f_relax(level)
            self._f_relax_and_restrict(level)
        self._cycle(level + 1, iteration, True, cycle)
        if defer_end:
            return
        self._correct_and_f_relax(level)
        if level > 0 and cycle is Cycle.F:
            self._cycle(level, iteration, False, Cycle.V)

    def _nested_iteration(self) -> None:
        """Initial guess from the coarse problems (``g = 0``), coarsest first."""
        last = len(self.levels) - 1
        self._f_relax(last)
        for level in range(last - 1, -1, -1):

            _rows().copy_rows(self.u[level], self._c_local[level], self.u[level + 1],
                            self._cc_local[level])
            if level > 0:
                self._cycle(level, 0, True, Cycle.V)

    def solve(self) -> tuple[bool, int]:
        """Iterate until the residual meets a tolerance, stagnates
        (:func:`~ptoc.parallel.options.has_stagnated`: the record then says so) or
        ``max_iterations`` is reached; returns ``(converged, iterations)``.

        Raises
        ------
        DivergenceError
            On every rank alike, when the residual is not finite or grows beyond
            ``divergence_factor`` times the first one.
        """
        opt = self.opt
        if opt.nested_iteration and len(self.levels) > 1:
            self._nested_iteration()
        # With C-relaxation on the finest level, each iteration after the first starts
        # with exactly the steps the residual needs: measure it there (PyMGRIT's
        # residual, without spending steps on it) and undo that sweep when stopping.
        reuse = len(self.levels) > 1 and self.opt.relaxation_on(0).cf_sweeps > 0
        # and where this rank holds the finest level alone, the end of each cycle (the
        # correction and the F-relaxation) goes into the same level-steps call
        fuse = reuse and self._alone[0]
        self._cycle(0, 0, True, opt.cycle, defer_end=fuse)
        for it in range(1, opt.max_iterations + 1):
            if fuse:
                r = self._correct_relax_with_residual()
            else:
                r = self._c_relax_with_residual() if reuse else self._residual()
            self.residuals.append(r)
            if not math.isfinite(r):
                raise DivergenceError(f"MGRIT diverged: residual {r} at iteration {it}")
            if r > opt.divergence_factor * max(self.residuals[0], np.finfo(float).tiny):
                raise DivergenceError(
                    f"MGRIT diverged: residual {r:.3e} at iteration {it} is more than "
                    f"{opt.divergence_factor:g} times the first one ({self.residuals[0]:.3e})")
            converged = r <= opt.tol or (opt.rtol is not None and r <= opt.rtol * self.residuals[0])
            stagnated = opt.tol > 0 and has_stagnated(self.residuals)
            if converged or it == opt.max_iterations or stagnated:
                if reuse:
                    self._undo_c_relax()
                return converged, it
            self._cycle(0, it, True, opt.cycle, c_done=reuse, defer_end=fuse)
        raise AssertionError("unreachable")

    def local_solution(self) -> Block:
        """This rank's finest-level values, ghost ``lo - 1`` included (the finest grid
        itself: it is made for this solve, and the solve is over)."""
        return Block(self.levels[0].base, self.u[0])


_FLOAT64_EPS = float(np.finfo(np.float64).eps)


def warn_unreachable_tol(tol: float, u0: np.ndarray, solver: str) -> None:
    """Warn (``RuntimeWarning``) when ``tol`` lies below one rounding error of a typical
    entry of the first state ``u0``: ``tol < eps * rms(u0)``, ``eps`` the machine epsilon
    of ``u0``'s dtype.

    The residual compares a recomputed state with a stored one; below the rounding error
    of their entries its value is noise, so it may stagnate above ``tol`` (measured:
    float32, ``d = 4``, ``N = 64``: stuck at 1.5e-8 against 6e-8 for ``eps * rms``). The
    rule is a warning, not a refusal: a residual can still fall below it, by luck of the
    rounding; the stagnation test ends a solve that does not.
    """
    u0 = np.asarray(u0)
    if u0.size == 0 or u0.dtype.kind != "f":
        return
    eps = float(np.finfo(u0.dtype).eps)
    floor = eps * float(np.sqrt(np.mean(np.square(u0, dtype=np.float64))))
    if tol < floor:
        warnings.warn(
            f"{solver} tol={tol:.3g} is below the rounding error of the states in "
            f"{u0.dtype} (machine epsilon {eps:.3g} x RMS state entry "
            f"{floor / eps:.3g} = {floor:.3g}): the residual will likely stagnate above it; "
            f"use tol >= {floor:.3g}{' or float64' if eps > _FLOAT64_EPS else ''}",
            RuntimeWarning, stacklevel=3)


@dataclass(frozen=True)
class MGRIT(SweepSolver):
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
    Two-level convergence theory: Dobrev, Kolev, Petersson &
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
        Absolute tolerance on the residual norm, ``>= 0``; ``0`` runs exactly
        ``max_iterations`` iterations (unless the residual is exactly 0), with neither
        the warning nor the stagnation stop below. A positive ``tol`` below one rounding
        error of a typical entry of the first state (``eps`` of the dtype times the RMS
        entry of ``u0``) gives a ``RuntimeWarning`` (:func:`warn_unreachable_tol`); a solve whose
        residual stops decreasing stops there, as stagnated
        (:func:`~ptoc.parallel.options.has_stagnated`, :attr:`SolveResult.stagnated`).
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
        set_(self, "coarsening", check_integer("MGRIT coarsening factor m", self.coarsening, 2))
        set_(self, "max_levels", check_integer("MGRIT max_levels", self.max_levels, 1))
        set_(self, "min_coarse_steps",
             check_integer("MGRIT min_coarse_steps", self.min_coarse_steps, 1))
        if isinstance(self.relaxation, (str, Relaxation)):
            set_(self, "relaxation", Relaxation.parse(self.relaxation))
        else:
            relax = tuple(Relaxation.parse(r) for r in self.relaxation)
            if not relax:
                raise ValueError("MGRIT relaxation must name at least one level")
            set_(self, "relaxation", relax)
        set_(self, "cycle", Cycle.parse(self.cycle))
        set_(self, "tol", check_tol("MGRIT tol", self.tol))
        if self.rtol is not None:
            set_(self, "rtol", check_positive_float("MGRIT rtol", self.rtol))
        set_(self, "max_iterations", check_integer("MGRIT max_iterations", self.max_iterations, 1))
        set_(self, "coarse_weights", CoarseWeights.parse(self.coarse_weights))
        set_(self, "nested_iteration", bool(self.nested_iteration))
        set_(self, "divergence_factor", check_positive_float("MGRIT divergence_factor",
                                                   self.divergence_factor))

    def relaxation_on(self, level: int) -> Relaxation:
        """Relaxation used on ``level`` (the last entry repeats for deeper levels)."""
        if isinstance(self.relaxation, Relaxation):
            return self.relaxation
        return self.relaxation[min(level, len(self.relaxation) - 1)]

    def check_layout(self, n_layers: int, n_ranks: int) -> None:
        if self.max_levels > 1:
            levels = mgrit_levels(n_layers, self.coarsening, self.max_levels,
                                  self.min_coarse_steps)
            if len(levels) == 1:
                raise ValueError(
                    f"MGRIT cannot coarsen {n_layers} layers with coarsening factor "
                    f"{self.coarsening} and min_coarse_steps={self.min_coarse_steps}: the "
                    "coarse grid would be too small; use a smaller coarsening factor or "
                    "min_coarse_steps, or max_levels=1 for the serial sweep")
        super().check_layout(n_layers, n_ranks)

    def check_propagator(self, prop) -> None:
        if self.max_levels > 1 and not prop.has_coarse_grid:
            raise TypeError(f"MGRIT with {self.max_levels} levels coarsens the layers, but "
                            f"{prop._no_coarse_grid()}")

    def solve_sweep(self, comm, problem, u0, shape, dtype, guess=None) -> SweepOutcome:
        if u0 is not None and self.tol > 0:
            warn_unreachable_tol(self.tol, u0, "MGRIT")
        run = MGRITSolve(comm, problem, self, u0, shape, dtype, guess)
        converged, iterations = run.solve()
        return SweepOutcome(run.local_solution(), converged, iterations, run.residuals,
                            levels=len(run.levels))
