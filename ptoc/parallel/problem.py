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

from .._workspace import Workspace as Scratch
from .comm import Communicator
from .layout import layer_owner, position_owner, step_layers
from .options import CoarseWeights

#: Buffers of the layer-parallel solvers, reused across solves (per thread).
scratch = Scratch(capacity=64)

TAG_WEIGHTS = 1


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
        self.layer_of_step = step_layers(self.n_steps, backward)
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
    def fine_step(self, i: int, u: np.ndarray) -> np.ndarray:
        """Step ``i`` (position ``i`` to ``i + 1``) with the fine layer."""
        n = int(self.layer_of_step[i])
        self.comm.count(1)
        if self.backward:
            return self.prop.adjoint_step(n, self.state(n), u)
        return self.prop.step(n, u)

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
            ns = self._rule_layers(s, e)
            if len(ns) == 1:
                theta = tuple(np.array(a) for a in self._layer_parameters(s))
            else:
                total = [np.array(a, dtype=np.result_type(a, np.float32))
                         for a in self._layer_parameters(s)]
                for n in ns[1:]:
                    for t, a in zip(total, self._layer_parameters(n), strict=True):
                        t += a
                theta = tuple(t / len(ns) for t in total)
            self.weights[(s, e)] = theta
        return theta

    def coarse_weight_stack(self, starts: np.ndarray, ends: np.ndarray):
        """The coarse weights of the ranges ``starts[j]..ends[j]-1`` stacked, as
        :meth:`coarse_weights` gives them one by one (the same bits), in a few array
        operations; None unless this rank owns all those layers and the propagator
        has ``stacked_parameters``."""
        stacked = getattr(self.prop, "stacked_parameters", None)
        if stacked is None or not len(starts) or not self._local(int(starts.min()),
                                                                  int(ends.max())):
            return None
        first = stacked(starts)
        if self.coarse_rule is CoarseWeights.INJECT:
            return first
        total = [np.array(a, dtype=np.result_type(a, np.float32)) for a in first]
        lengths = ends - starts
        for offset in range(1, int(lengths.max())):
            rows = np.flatnonzero(lengths > offset)
            for t, a in zip(total, stacked(starts[rows] + offset), strict=True):
                t[rows] += a
        return [t / lengths.reshape((-1,) + (1,) * (t.ndim - 1)) for t in total]


# --- the steps of one level, batched ---------------------------------------------------------

class LevelSteps:
    """The steps that produce one rank's positions ``base+1 .. hi-1`` of one level.

    Arrays passed in hold those positions at local indices ``0 .. hi-base-1`` (index 0 is
    position ``base``). Two batched operations, so that a whole relaxation is one call:

    * :meth:`runs`: ``u[j] = Phi_j(u[j-1]) (+ g[j])`` for ``j = s..e`` of each run, in order;
    * :meth:`points`: ``Phi_j(u[j-1])`` for a list of ``j``, from the current values.

    This generic version calls the propagator once per step; :class:`ResNetLevelSteps`
    does a whole call in compiled code.
    """

    def __init__(self, problem: SweepProblem, level: int, points: np.ndarray, base: int):
        self.problem = problem
        self.level = level
        self.points = points
        self.base = base

    def _one(self, j: int, u: np.ndarray) -> np.ndarray:
        k = self.base + j
        if self.level == 0:
            return self.problem.fine_step(k - 1, u)
        return self.problem.coarse_step(int(self.points[k - 1]), int(self.points[k]), u)

    def runs(self, u, g, starts, ends) -> None:
        for s, e in zip(starts, ends, strict=True):
            for j in range(s, e + 1):
                new = self._one(j, u[j - 1])
                u[j] = new if g is None else new + g[j]

    def points_apply(self, u, positions) -> np.ndarray:
        return np.stack([self._one(j, u[j - 1]) for j in positions]) if len(positions) else \
            np.empty((0,) + u.shape[1:], u.dtype)


class ResNetLevelSteps(LevelSteps):
    """:class:`LevelSteps` of a :class:`ptoc.ResNetPropagator`, on compiled level kernels.

    Every step of a level has the same form, ``x + dt sigma(K x + b)`` (fine: one layer,
    ``dt = h``; coarse: the coarse weights, ``dt = (e - s) h``), so the level's weights
    are stacked into arrays once per solve and the kernels run whole relaxations.
    """

    def __init__(self, problem: SweepProblem, level: int, points: np.ndarray, base: int,
                 hi: int, kern, act: int, h: float, chunk: int):
        super().__init__(problem, level, points, base)
        prop = problem.prop
        n_loc = hi - base
        # layer ranges [s, e) of the steps producing local positions 1 .. n_loc-1
        k = np.arange(base + 1, hi)
        p0, p1 = points[k - 1], points[k]
        if problem.backward:
            s_, e_ = problem.n_steps - p1, problem.n_steps - p0
        else:
            s_, e_ = p0, p1
        K0, b0 = prop.layer_parameters(problem.first_layer)
        d = K0.shape[0]
        tag = f"{'adj' if problem.backward else 'fwd'}{level}"
        self.K = scratch.get("K" + tag, (n_loc, d, d), K0.dtype)
        self.b = scratch.get("b" + tag, (n_loc, d), K0.dtype)
        self.dt = scratch.get("dt" + tag, (n_loc,), K0.dtype)
        self.dt[0] = 0.0
        self.dt[1:] = (e_ - s_) * h
        stack = prop.stacked_parameters(s_) if level == 0 else \
            problem.coarse_weight_stack(s_, e_)
        if stack is not None:
            self.K[1:], self.b[1:] = stack
        else:
            for j, rng in enumerate(zip(s_.tolist(), e_.tolist(), strict=True), start=1):
                self.K[j], self.b[j] = problem.coarse_weights(*rng)
        self.X = None
        if problem.backward:
            states = problem.states
            shape = problem.state(int(s_[0]) if len(s_) else problem.first_layer).shape
            self.X = scratch.get("X" + tag, (n_loc,) + shape, K0.dtype)
            if isinstance(states, Block):
                self.X[1:] = states.rows(s_)
            else:
                for j, layer in enumerate(s_.tolist(), start=1):
                    self.X[j] = problem.state(layer)
            self.KT = scratch.get("KT" + tag, self.K.shape, K0.dtype)
            self.KT[...] = np.swapaxes(self.K, 1, 2)
        self.kern, self.act, self.chunk = kern, act, chunk

    def runs(self, u, g, starts, ends) -> None:
        starts = np.asarray(starts, dtype=np.int64)
        ends = np.asarray(ends, dtype=np.int64)
        if len(starts) == 0:
            return
        self.problem.comm.count(int(np.sum(ends - starts + 1)))
        if self.X is None:
            self.kern.state_runs(u, g, self.K, self.b, self.dt, self.act, starts, ends,
                                 self.chunk)
        else:
            self.kern.adjoint_runs(u, g, self.X, self.K, self.KT, self.b, self.dt, self.act,
                                   starts, ends, self.chunk)

    def points_apply(self, u, positions) -> np.ndarray:
        positions = np.asarray(positions, dtype=np.int64)
        out = np.empty((len(positions),) + u.shape[1:], u.dtype)
        if len(positions) == 0:
            return out
        self.problem.comm.count(len(positions))
        if self.X is None:
            self.kern.state_points(u, self.K, self.b, self.dt, self.act, positions, out,
                                   self.chunk)
        else:
            self.kern.adjoint_points(u, self.X, self.K, self.KT, self.b, self.dt, self.act,
                                     positions, out, self.chunk)
        return out


def level_steps(problem: SweepProblem, level: int, points: np.ndarray, base: int,
                hi: int) -> LevelSteps:
    """The fastest :class:`LevelSteps` the propagator supports."""
    fast = getattr(problem.prop, "level_kernels", None)
    spec = fast() if fast is not None else None
    if spec is None:
        return LevelSteps(problem, level, points, base)
    kern, act, h, chunk = spec
    return ResNetLevelSteps(problem, level, points, base, hi, kern, act, h, chunk)
