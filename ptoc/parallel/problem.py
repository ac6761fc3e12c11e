"""A sweep (state or adjoint) as a time-stepping problem seen by one rank.

Solvers step in solver time (see :mod:`ptoc.parallel.layout`): step ``i`` maps
position ``i`` to ``i + 1``. :class:`SweepProblem` turns that into propagator
calls, for the fine layers and for coarse steps standing for several layers:

* state sweep: step ``i`` is layer ``i``, ``x_{i+1} = Phi_i(x_i)``; a coarse step over
  layers ``s..e-1`` is ``prop.coarse_step(theta, e - s, x)``;
* adjoint sweep: step ``i`` is layer ``n = N - 1 - i``,
  ``lambda_n = Phi_n'(x_n)^T lambda_{n+1}``; a coarse step over layers ``s..e-1`` is the
  transposed Jacobian of the coarse state step at ``x_s``,
  ``prop.coarse_adjoint_step(theta, e - s, x_s, lambda)``.

The coarse weights ``theta`` of a step over layers ``s..e-1`` are those of layer ``s``
or their mean over ``s..e-1`` (:class:`~ptoc.parallel.options.CoarseWeights`). A rank
holds the parameters of its own layers only; :meth:`SweepProblem.gather_coarse_weights`
fetches, once per solve, those of other ranks' layers that its coarse steps need.
"""

from __future__ import annotations

import numpy as np

from .._workspace import Workspace
from ..propagator import LevelPlan, LevelSteps
from .comm import Communicator
from .layout import layer_owner, position_owner
from .options import CoarseWeights

#: Buffers of the layer-parallel solvers, reused across solves (per thread).
scratch = Workspace(capacity=64)

TAG_WEIGHTS = 1


def coarse_weights(layers: list[tuple[np.ndarray, ...]]) -> tuple[np.ndarray, ...]:
    """The weights of a coarse step from the parameters of the layers its rule reads
    (:class:`~ptoc.parallel.options.CoarseWeights`): a copy of the one layer's
    (``INJECT``, or a step over one layer), or their mean, summed in layer order in at
    least float32 whatever the partition (``AVERAGE``). The one definition used by the
    parareal and MGRIT coarse grids and by PGCL's coarse steps."""
    if len(layers) == 1:
        return tuple(np.array(a) for a in layers[0])
    total = [np.array(a, dtype=np.result_type(a, np.float32)) for a in layers[0]]
    for params in layers[1:]:
        for t, a in zip(total, params, strict=True):
            t += a
    return tuple(t / len(layers) for t in total)


class Block:
    """Consecutive positions ``base .. base + len(values) - 1`` of one sweep on one rank.

    ``block[k]`` is the value at position ``k``; ``values`` is one array (positions
    along its first axis), so that whole ranges move as slices.
    """

    def __init__(self, base: int, values: np.ndarray):
        self.base = int(base)
        self.values = values

    def __getitem__(self, k: int) -> np.ndarray:
        j = k - self.base
        if not 0 <= j < len(self.values):
            raise KeyError(f"position {k} is not in this block ({self.base}.."
                           f"{self.base + len(self.values) - 1})")
        return self.values[j]

    def __len__(self) -> int:
        return len(self.values)

    def rows(self, positions) -> np.ndarray:
        """The values at several positions, stacked (a copy)."""
        return self.values[np.asarray(positions, dtype=np.int64) - self.base]


class SweepProblem:
    """One sweep on one rank.

    Parameters
    ----------
    comm : Communicator
    prop : Propagator
        The fine propagator (only its owned layers are used).
    bounds : array
        Layer partition (:func:`~ptoc.parallel.layout.partition`).
    backward : bool
        True for the adjoint sweep.
    states : Block or dict of int to array, optional
        Adjoint sweep: the states ``x_n`` this rank needs (inputs of its layers).
    """

    def __init__(self, comm: Communicator, prop, bounds: np.ndarray, backward: bool,
                 states: Block | dict[int, np.ndarray] | None = None):
        self.comm = comm
        self.prop = prop
        self.bounds = bounds
        self.backward = backward
        self.n_steps = int(bounds[-1])
        self.owner = position_owner(bounds, backward)
        self.first_layer = int(bounds[comm.rank])
        self.end_layer = int(bounds[comm.rank + 1])
        self.states = states or {}
        self.weights: dict[tuple[int, int], tuple[np.ndarray, ...]] = {}
        self.coarse_rule = CoarseWeights.INJECT
        self._foreign: dict[int, tuple[np.ndarray, ...]] = {}

    # --- layers covered by steps -----------------------------------------------------------
    def layers(self, p: int, q: int) -> tuple[int, int]:
        """Forward layers ``[s, e)`` covered by the solver-time steps from position p to q."""
        if self.backward:
            return self.n_steps - q, self.n_steps - p
        return p, q

    def state(self, n: int) -> np.ndarray:
        try:
            return self.states[n]
        except KeyError:
            raise RuntimeError(f"rank {self.comm.rank} holds no state x_{n}") from None

    # --- steps -------------------------------------------------------------------------------
    def coarse_step(self, p: int, q: int, u: np.ndarray) -> np.ndarray:
        """One coarse step from position ``p`` to ``q`` (standing for ``q - p`` layers)."""
        s, e = self.layers(p, q)
        theta = self.coarse_weights(s, e)
        self.comm.count(1)
        if self.backward:
            return self.prop.coarse_adjoint_step(theta, e - s, self.state(s), u)
        return self.prop.coarse_step(theta, e - s, u)

    # --- coarse weights ------------------------------------------------------------------------
    def gather_coarse_weights(self, needs: list[list[tuple[int, int]]],
                              rule: CoarseWeights) -> None:
        """Fetch the parameters of other ranks' layers that coarse steps over the layer
        ranges ``needs[rank]`` use (collective), and set the rule of :meth:`coarse_weights`.

        ``needs[r]`` lists the layer ranges ``(s, e)`` whose coarse weights rank ``r``
        needs; every rank knows every rank's needs, so each sends the parameters of its
        own layers that others need (one message per pair of ranks, at most) and
        receives the ones it lacks. On one rank nothing moves.
        """
        self.coarse_rule = rule
        comm = self.comm
        if comm.size == 1:
            return
        owner = layer_owner(self.bounds)

        def wanted(r: int, q: int) -> list[int]:
            """Layers owned by rank q that rank r needs."""
            return sorted({n for s, e in needs[r] for n in self._rule_layers(s, e)
                           if owner[n] == q})

        for r in range(comm.size):
            if r != comm.rank:
                mine = wanted(r, comm.rank)
                if mine:
                    comm.send({n: tuple(np.array(a) for a in self.prop.layer_parameters(n))
                               for n in mine}, r, TAG_WEIGHTS)
        for q in range(comm.size):
            if q != comm.rank and wanted(comm.rank, q):
                self._foreign.update(comm.recv(q, TAG_WEIGHTS))

    def _rule_layers(self, s: int, e: int) -> range:
        """The layers whose parameters the coarse weights of layers ``s..e-1`` use."""
        return range(s, e) if self.coarse_rule is CoarseWeights.AVERAGE else range(s, s + 1)

    def _local(self, s: int, e: int) -> bool:
        return self.first_layer <= s and e <= self.end_layer

    def _layer_parameters(self, n: int) -> tuple[np.ndarray, ...]:
        if self.first_layer <= n < self.end_layer:
            return tuple(self.prop.layer_parameters(n))
        return self._foreign[n]

    def coarse_weights(self, s: int, e: int) -> tuple[np.ndarray, ...]:
        """Coarse weights of a step over layers ``s..e-1``: those of layer ``s``
        (``INJECT``) or their mean over ``s..e-1`` (``AVERAGE``, summed in layer order,
        whatever the partition). Needs :meth:`gather_coarse_weights` first when another
        rank owns one of those layers."""
        theta = self.weights.get((s, e))
        if theta is None:
            theta = coarse_weights([self._layer_parameters(n) for n in self._rule_layers(s, e)])
            self.weights[(s, e)] = theta
        return theta

    def coarse_weight_stack(self, starts: np.ndarray, ends: np.ndarray
                            ) -> tuple[np.ndarray, ...]:
        """The coarse weights of the ranges ``starts[j]..ends[j]-1``, stacked along a new
        leading axis, with the same bits as :meth:`coarse_weights` gives them one by one:
        in a few array operations (``prop.stacked_parameters``) when this rank owns all
        those layers, else range by range."""
        if not self._local(int(starts.min()), int(ends.max())):
            rows = [self.coarse_weights(int(s), int(e)) for s, e in zip(starts, ends,
                                                                        strict=True)]
            return tuple(np.stack(col) for col in zip(*rows, strict=True))
        first = self.prop.stacked_parameters(starts)
        if self.coarse_rule is CoarseWeights.INJECT:
            return tuple(first)
        total = [np.array(a, dtype=np.result_type(a, np.float32)) for a in first]
        lengths = ends - starts
        for offset in range(1, int(lengths.max())):
            rows = np.flatnonzero(lengths > offset)
            for t, a in zip(total, self.prop.stacked_parameters(starts[rows] + offset),
                            strict=True):
                t[rows] += a
        return tuple(t / lengths.reshape((-1,) + (1,) * (t.ndim - 1)) for t in total)

    # --- the steps of one level, batched -------------------------------------------------------
    def level_plan(self, level: int, points: np.ndarray, base: int, hi: int) -> LevelPlan:
        """The :class:`~ptoc.propagator.LevelPlan` of the steps that produce this rank's
        positions ``base+1 .. hi-1`` of a level whose positions are the fine positions
        ``points``: the layer ranges, the coarse weights and (adjoint sweep) the states."""
        k = np.arange(base + 1, hi)
        s_, e_ = self.layers(points[k - 1], points[k])
        s_ = np.asarray(s_, dtype=np.int64)
        e_ = np.asarray(e_, dtype=np.int64)
        weights = None
        if level > 0 and len(s_):
            weights = self.coarse_weight_stack(s_, e_)
        elif level > 0:
            weights = ()
        states = None
        if self.backward:
            if isinstance(self.states, Block) and len(s_):
                states = self.states.rows(s_)
            else:
                shape = self.state(self.first_layer).shape
                states = np.empty((len(s_),) + shape, self.state(self.first_layer).dtype)
                for j, layer in enumerate(s_.tolist()):
                    states[j] = self.state(layer)
        return LevelPlan(level=level, backward=self.backward, layers=s_, spans=e_ - s_,
                         weights=weights, states=states)

    def level_steps(self, level: int, points: np.ndarray, base: int, hi: int
                    ) -> CountedSteps:
        """The propagator's batched steps for this rank's part of a level, counted."""
        plan = self.level_plan(level, points, base, hi)
        return CountedSteps(self.prop.level_steps(plan), self.comm)


class CountedSteps:
    """:class:`~ptoc.propagator.LevelSteps` that count every step they run (one unit per
    fine or coarse step) on the communicator, for the critical-path record."""

    def __init__(self, steps: LevelSteps, comm: Communicator):
        self.steps = steps
        self.comm = comm

    def runs(self, u: np.ndarray, g: np.ndarray | None, starts, ends,
             n_steps: int | None = None) -> None:
        """``n_steps``: the number of steps of the runs, if the caller knows it."""
        starts = np.asarray(starts, dtype=np.int64)
        ends = np.asarray(ends, dtype=np.int64)
        if len(starts):
            self.comm.count(int(np.sum(ends - starts + 1)) if n_steps is None else n_steps)
            self.steps.runs(u, g, starts, ends)

    def points_apply(self, u: np.ndarray, positions) -> np.ndarray:
        positions = np.asarray(positions, dtype=np.int64)
        if len(positions):
            self.comm.count(len(positions))
        return self.steps.points_apply(u, positions)

    def points_residual(self, u: np.ndarray, g: np.ndarray | None, positions,
                        out: np.ndarray, rows) -> None:
        if len(positions):
            self.comm.count(len(positions))
            self.steps.points_residual(u, g, positions, out, rows)

    def runs_then_residuals(self, u, g, starts, ends, positions, out, rows, inject,
                            n_steps: int | None = None) -> None:
        """``n_steps``: the number of steps of the runs, if the caller knows it."""
        starts = np.asarray(starts, dtype=np.int64)
        ends = np.asarray(ends, dtype=np.int64)
        n = int(np.sum(ends - starts + 1)) if n_steps is None else n_steps
        if n + len(positions):
            self.comm.count(n + len(positions))
            self.steps.runs_then_residuals(u, g, starts, ends, positions, out, rows, inject)

    def correct_then_runs(self, u, g, positions, uc, v, rows, starts, ends, before=None,
                          n_steps: int | None = None) -> float:
        """``n_steps``: the number of steps of the runs, if the caller knows it."""
        starts = np.asarray(starts, dtype=np.int64)
        ends = np.asarray(ends, dtype=np.int64)
        n = int(np.sum(ends - starts + 1)) if n_steps is None else n_steps
        if before is not None:
            n += len(positions)
        if n:
            self.comm.count(n)
        if n or len(positions):
            return self.steps.correct_then_runs(u, g, positions, uc, v, rows, starts, ends,
                                                before)
        return 0.0

    def points_tau(self, u: np.ndarray, positions, out: np.ndarray, rows) -> None:
        if len(positions):
            self.comm.count(len(positions))
            self.steps.points_tau(u, positions, out, rows)
