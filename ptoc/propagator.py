"""The propagator contract between layer-parallel solvers and a model, and its checker.

Solvers (serial, parareal, MGRIT) never touch network internals: they see a
:class:`Propagator`, in the spirit of XBraid's adjoint interface. A propagator
knows ``n_layers`` and provides

* ``step(n, x)``: ``x_{n+1} = Phi_n(x_n)`` for a batch of states;
* ``adjoint_step(n, x, lam, grad=None)``: ``lambda_n = Phi_n'(x_n)^T lambda_{n+1}``, and,
  when ``grad`` is given, adds ``d(lambda_{n+1} . Phi_n(x_n; theta))/d theta_n`` into it
  (gradient accumulation, like XBraid's ``step_diff``);
* ``objective(x_N)`` and ``objective_gradient(x_N)`` (``lambda_N = dPhi/dx_N``);
* ``parameters()``: the layer parameters as arrays whose leading axis is the layer,
  and ``zero_gradient()`` of the same structure.

``propagate`` and ``adjoint_propagate`` run a range of layers; their default
implementations loop over ``step``/``adjoint_step`` and a model may override them with
a faster sweep (:class:`ResNetPropagator` uses one compiled call per range).

:func:`check_propagator` validates a user-written propagator: the adjoint against
the linearised step by the dot-product test, the parameter gradient and the whole
chain against finite differences, and the range methods against the single steps.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from . import _config, _maths
from ._checks import check_inputs
from ._workspace import Workspace
from .hamiltonian import hamiltonian_grad
from .kernels import Target, backend
from .kernels.reference import point_ends
from .model import Params, ResNet
from .objective import (
    classifier_loss,
    head_regulariser,
    layer_regulariser_terms,
    opening_backward,
    opening_forward,
    range_regulariser,
)


class Propagator(abc.ABC):
    """Abstract layer-by-layer model: the contract every solver and method relies on.

    Subclasses set ``n_layers`` and implement the abstract methods. States are NumPy
    arrays of any fixed shape (for ResNets: (S, d), one sample per row).

    **Required** (abstract):

    * :meth:`step`: the state equation ``x_{n+1} = Phi_n(x_n)``;
    * :meth:`adjoint_step`: the adjoint equation ``lambda_n = Phi_n'(x_n)^T lambda_{n+1}``
      with the gradient accumulation (XBraid's ``step_diff``);
    * :meth:`objective` and :meth:`objective_gradient`: ``Phi(x_N)`` and ``lambda_N``;
    * :meth:`parameters`: the layer parameters, leading axis = layer.

    **Provided, may be overridden for speed**: :meth:`zero_gradient`, :meth:`propagate`,
    :meth:`adjoint_propagate`, :meth:`layer_gradient`, :meth:`layer_gradients`,
    :meth:`level_steps`, and the serial gradient's two sweeps :meth:`gradient_forward`
    and :meth:`gradient_backward` (all written with the required methods only).

    **Optional**:

    * the coarse grid, needed by MGRIT and by parareal with built-in coarse steps:
      :meth:`layer_parameters`, :meth:`coarse_step`, :meth:`coarse_adjoint_step` (and
      :meth:`stacked_parameters`, which has a default). A subclass that overrides all
      three has :attr:`has_coarse_grid`; the solvers refuse to coarsen one that has not,
      before any step runs.
    * :meth:`tangent_step`, the linearised step; by default it returns None and
      :func:`check_propagator` linearises by finite differences instead.

    The gradient accumulation is what the layer-parallel solvers of Günther et al.
    (2020) need, in the spirit of XBraid's adjoint interface. Theory:
    :doc:`/theory/adjoint`, :doc:`/theory/parareal`, :doc:`/theory/mgrit`; the whole
    contract: :doc:`/architecture`.
    """

    n_layers: int

    @abc.abstractmethod
    def step(self, n: int, x: np.ndarray) -> np.ndarray:
        """Return ``x_{n+1} = Phi_n(x)`` as a new array."""

    @abc.abstractmethod
    def adjoint_step(self, n: int, x: np.ndarray, lam: np.ndarray,
                     grad: list[np.ndarray] | None = None) -> np.ndarray:
        """Return ``Phi_n'(x)^T lam``; if ``grad`` is given, add ``d(lam . Phi_n)/d theta_n``.

        ``grad`` has the structure of :meth:`parameters`; only its entries ``[n]`` of
        each array may change.
        """

    @abc.abstractmethod
    def objective(self, x: np.ndarray) -> float:
        """Terminal objective ``Phi(x_N)``."""

    @abc.abstractmethod
    def objective_gradient(self, x: np.ndarray) -> np.ndarray:
        """``dPhi/dx_N``, the terminal adjoint ``lambda_N``."""

    @abc.abstractmethod
    def parameters(self) -> list[np.ndarray]:
        """Layer parameters (live arrays, leading axis = layer)."""

    def zero_gradient(self) -> list[np.ndarray]:
        """Zeros with the structure of :meth:`parameters`."""
        return [np.zeros_like(p) for p in self.parameters()]

    # --- optional: the linearised step ------------------------------------------------------
    def tangent_step(self, n: int, x: np.ndarray, dx: np.ndarray) -> np.ndarray | None:
        """The linearised step ``Phi_n'(x) dx``, or None when the model does not provide
        it (the default): :func:`check_propagator` then uses finite differences."""
        return None

    # --- layer gradients (defaults from adjoint_step) ---------------------------------------
    def layer_gradient(self, n: int, x: np.ndarray, lam_next: np.ndarray,
                       grad: list[np.ndarray]) -> None:
        """Add ``d(lam_next . Phi_n(x))/d theta_n`` to ``grad`` (the adjoint output is
        not needed; the default computes it with :meth:`adjoint_step` and drops it)."""
        self.adjoint_step(n, x, lam_next, grad)

    def layer_gradients(self, first: int, xs: np.ndarray, lams_next: np.ndarray,
                        grad: list[np.ndarray]) -> None:
        """Add the gradients of layers ``first .. first+L-1`` to ``grad`` (structured as
        :meth:`parameters`): ``xs[l]`` is ``x_{first+l}`` and ``lams_next[l]`` is
        ``lambda_{first+l+1}``. The default loops over :meth:`layer_gradient`."""
        for k in range(len(xs)):
            self.layer_gradient(first + k, xs[k], lams_next[k], grad)

    # --- the serial gradient: one state sweep, one backward pass ---------------------------
    def gradient_forward(self, x0: np.ndarray) -> tuple[np.ndarray, Any]:
        """``(states, cache)``: the states ``x_0 .. x_N`` (stacked, leading axis ``N + 1``)
        from ``x0``, and whatever the model keeps for :meth:`gradient_backward` (the
        default keeps nothing: None). A model overrides the pair to keep, e.g.,
        ``sigma'(a_n)`` of the state sweep, so that the backward pass need not recompute
        the pre-activations."""
        states = np.empty((self.n_layers + 1,) + np.shape(x0), np.asarray(x0).dtype)
        self.propagate(np.asarray(x0), 0, self.n_layers, states)
        return states, None

    def gradient_backward(self, states: np.ndarray, cache: Any, lam_N: np.ndarray,
                          grad: list[np.ndarray]) -> np.ndarray:
        """All adjoints ``lambda_0 .. lambda_N`` (stacked, layer order) from ``lam_N``, the
        data part of every layer's gradient added into ``grad`` in the same pass;
        ``states`` and ``cache`` as :meth:`gradient_forward` returned them. The default
        is :meth:`adjoint_step` with ``grad``, layer by layer; an override must give the
        same numbers (:func:`check_propagator` compares them)."""
        N = self.n_layers
        lams = np.empty((N + 1,) + np.shape(lam_N), np.asarray(lam_N).dtype)
        lams[N] = lam_N
        for n in range(N - 1, -1, -1):
            lams[n] = self.adjoint_step(n, states[n], lams[n + 1], grad)
        return lams

    # --- optional: the coarse grid ----------------------------------------------------------
    def layer_parameters(self, n: int) -> tuple[np.ndarray, ...]:
        """The parameters of layer ``n`` as a tuple of arrays (averaged elementwise to
        form :class:`~ptoc.parallel.CoarseWeights` ``AVERAGE`` coarse weights)."""
        raise NotImplementedError(self._no_coarse_grid())

    def stacked_parameters(self, layers: np.ndarray) -> tuple[np.ndarray, ...]:
        """The parameters of ``layers`` stacked along a new leading axis (read them,
        never write). The default stacks :meth:`layer_parameters`."""
        layers = np.asarray(layers, dtype=np.int64)
        rows = [self.layer_parameters(int(n)) for n in layers]
        if not rows:
            raise ValueError("stacked_parameters needs at least one layer")
        return tuple(np.stack(col) for col in zip(*rows, strict=True))

    def coarse_step(self, params: tuple[np.ndarray, ...], n_layers: int,
                    x: np.ndarray) -> np.ndarray:
        """One step standing for ``n_layers`` layers, with layer parameters ``params``.

        With one layer and that layer's parameters it must equal :meth:`step`
        (checked by :func:`check_propagator`).
        """
        raise NotImplementedError(self._no_coarse_grid())

    def coarse_adjoint_step(self, params: tuple[np.ndarray, ...], n_layers: int,
                            x: np.ndarray, lam: np.ndarray) -> np.ndarray:
        """Transposed Jacobian of :meth:`coarse_step` at ``x``, applied to ``lam``."""
        raise NotImplementedError(self._no_coarse_grid())

    @property
    def has_coarse_grid(self) -> bool:
        """True when the class provides :meth:`layer_parameters`, :meth:`coarse_step` and
        :meth:`coarse_adjoint_step` (overrides all three)."""
        return not self._missing_coarse_methods()

    def _missing_coarse_methods(self) -> list[str]:
        base = Propagator
        return [name for name in ("layer_parameters", "coarse_step", "coarse_adjoint_step")
                if getattr(type(self), name) is getattr(base, name)]

    def _no_coarse_grid(self) -> str:
        return (f"{type(self).__name__} has no coarse grid: MGRIT and parareal with built-in "
                "coarse steps need layer_parameters, coarse_step and coarse_adjoint_step "
                f"(missing: {', '.join(self._missing_coarse_methods())}); or give Parareal "
                "a coarse Propagator")

    # --- batched steps of one level ---------------------------------------------------------
    def level_steps(self, plan: LevelPlan) -> LevelSteps:
        """The steps of one level of a sweep, batched (see :class:`LevelSteps`).

        The default calls :meth:`step`, :meth:`adjoint_step`, :meth:`coarse_step` or
        :meth:`coarse_adjoint_step` once per step; a model may return a subclass that
        runs whole relaxations in compiled code (:class:`ResNetPropagator` does).
        """
        return LevelSteps(self, plan)

    # --- ranges of layers -------------------------------------------------------------------
    def propagate(self, x: np.ndarray, start: int = 0, stop: int | None = None,
                  states: np.ndarray | None = None) -> np.ndarray:
        """Apply layers ``start..stop-1`` to ``x`` and return ``x_stop``.

        If ``states`` (shape ``(stop-start+1,) + x.shape``) is given, every state
        ``x_start..x_stop`` is written into it.
        """
        stop = self.n_layers if stop is None else stop
        if states is not None:
            states[0] = x
        for n in range(start, stop):
            x = self.step(n, x)
            if states is not None:
                states[n - start + 1] = x
        return x

    def adjoint_propagate(self, states: np.ndarray, lam: np.ndarray, start: int = 0,
                          stop: int | None = None,
                          grad: list[np.ndarray] | None = None) -> np.ndarray:
        """Run the adjoint from ``lambda_stop = lam`` back to ``lambda_start``.

        ``states[k]`` is ``x_{start+k}`` for ``k = 0..stop-start``; gradients of layers
        ``start..stop-1`` are accumulated into ``grad`` when given.
        """
        stop = self.n_layers if stop is None else stop
        for n in range(stop - 1, start - 1, -1):
            lam = self.adjoint_step(n, states[n - start], lam, grad)
        return lam


# --- the steps of one level, batched --------------------------------------------------------------

@dataclass(frozen=True)
class LevelPlan:
    """The steps of one level of a sweep on one rank, as a model sees them.

    A solver holds the level's values at local indices ``0..n`` (index 0 is the value
    before this rank's first step); step ``j = 1..n`` maps index ``j - 1`` to ``j`` and
    is described by row ``j - 1`` of the arrays below.

    Attributes
    ----------
    level : int
        0 for the fine grid; a model may key reusable buffers on it.
    backward : bool
        True for the adjoint sweep: step ``j`` is ``Phi'(x)^T`` at ``states[j - 1]``.
    layers : ndarray of int (n,)
        The first layer ``s`` that step ``j`` stands for (on the fine grid, its layer).
    spans : ndarray of int (n,)
        The number of layers ``e - s`` it stands for (1 on the fine grid).
    weights : tuple of ndarray, optional
        Coarse levels: the coarse weights of every step, stacked (leading axis ``n``),
        structured as :meth:`Propagator.layer_parameters`. None on the fine grid.
    states : ndarray, optional
        Adjoint sweep: ``x_s`` for every step, stacked (leading axis ``n``).
    """

    level: int
    backward: bool
    layers: np.ndarray
    spans: np.ndarray
    weights: tuple[np.ndarray, ...] | None = None
    states: np.ndarray | None = None

    @property
    def fine(self) -> bool:
        """True on the fine grid (every step is one layer with its own parameters)."""
        return self.weights is None

    @property
    def n_steps(self) -> int:
        return len(self.layers)

    def shifted(self, offset: int) -> LevelPlan:
        """The same plan with layer ``n`` renamed ``n - offset`` (for :class:`LayerSlice`)."""
        return replace(self, layers=self.layers - offset)


class LevelSteps:
    """The steps of one :class:`LevelPlan`, as two batched operations.

    Arrays ``u`` (and ``g``) hold the level's values at local indices ``0..n``:

    * :meth:`runs`: ``u[j] = step_j(u[j-1]) (+ g[j])`` for ``j = s..e`` of each run
      ``(s, e)``, in order (F- and C-relaxation, coarsest-grid sweep);
    * :meth:`points_apply`: ``step_j(u[j-1])`` for a list of ``j``, from the current
      values (residuals, restriction);
    * :meth:`points_residual` and :meth:`points_tau`: the two halves of MGRIT's FAS
      right-hand side, each a :meth:`points_apply` followed by a sum into a coarse array
      (here in NumPy; a compiled level may form the sums while each step's value is in
      the cache, with the same sums).

    This generic version calls the propagator once per step.
    """

    def __init__(self, prop: Propagator, plan: LevelPlan):
        self.prop = prop
        self.plan = plan

    def step(self, j: int, v: np.ndarray) -> np.ndarray:
        """Step ``j`` (1-based) applied to ``v``."""
        plan, prop, r = self.plan, self.prop, j - 1
        if plan.fine:
            n = int(plan.layers[r])
            if plan.backward:
                return prop.adjoint_step(n, plan.states[r], v)
            return prop.step(n, v)
        theta = tuple(w[r] for w in plan.weights)
        span = int(plan.spans[r])
        if plan.backward:
            return prop.coarse_adjoint_step(theta, span, plan.states[r], v)
        return prop.coarse_step(theta, span, v)

    def runs(self, u: np.ndarray, g: np.ndarray | None, starts, ends) -> None:
        for s, e in zip(starts, ends, strict=True):
            for j in range(int(s), int(e) + 1):
                new = self.step(j, u[j - 1])
                u[j] = new if g is None else new + g[j]

    def points_apply(self, u: np.ndarray, positions) -> np.ndarray:
        if not len(positions):
            return np.empty((0,) + u.shape[1:], u.dtype)
        return np.stack([self.step(int(j), u[int(j) - 1]) for j in positions])

    def points_residual(self, u: np.ndarray, g: np.ndarray | None, positions,
                        out: np.ndarray, rows) -> None:
        """``out[rows[r]] = g[j] + (step_j(u[j-1]) - u[j])`` for ``j = positions[r]``
        (without ``g`` if it is None): the residual of ``A(u) = g`` at those positions,
        written to the rows of a coarse array (the fine half of the FAS right-hand side,
        :doc:`/theory/mgrit`)."""
        if len(positions):
            mode = _maths.POINT_RESIDUAL if g is None else _maths.POINT_RESIDUAL_G
            point_ends(self.points_apply(u, positions), u, g, positions, out, rows, mode)

    def runs_then_residuals(self, u: np.ndarray, g: np.ndarray | None, starts, ends,
                            positions, out: np.ndarray, rows, inject: np.ndarray) -> None:
        """An F-relaxation followed by the fine half of MGRIT's restriction
        (:doc:`/theory/mgrit`): :meth:`runs`, then ``inject[rows[r]] = u[j]`` and
        :meth:`points_residual` at ``j = positions[r]``. ``positions`` ascend and none lies
        inside a run.

        This version does the three one after the other; a compiled level may do each
        position right after the run that ends before it, while that run's last value is
        in the cache, with the same bits (a position's residual reads ``u[j-1]``, which no
        later run writes, and ``u[j]``, which no run writes).
        """
        self.runs(u, g, starts, ends)
        if len(positions):
            from .kernels import rows as rowops

            rowops.copy_rows(inject, np.asarray(rows, dtype=np.int64), u,
                             np.asarray(positions, dtype=np.int64))
            self.points_residual(u, g, positions, out, rows)

    def correct_then_runs(self, u: np.ndarray, g: np.ndarray | None, positions, uc: np.ndarray,
                          v: np.ndarray, rows, starts, ends,
                          before: np.ndarray | None = None) -> float:
        """MGRIT's coarse-grid correction followed by an F-relaxation and, with ``before``,
        the next C-relaxation and its change (:doc:`/theory/mgrit`).

        ``u[j] += uc[rows[r]] - v[rows[r]]`` at ``j = positions[r]`` (ascending, none
        inside a run), then :meth:`runs`; with ``before``: ``before[r] = u[j]``, then
        ``u[j] = step_j(u[j-1]) (+ g[j])`` at every position, each from the values
        before this C-relaxation (a position right after another reads that one's old
        value), and the return value is ``sum_r |u[j] - before[r]|^2`` (each row's sum
        by :func:`ptoc.kernels.rows.sumsq_row`, the rows added in order); 0.0 without.

        This version does them one after the other (the C-relaxation: the positions that
        follow a position one at a time, last first, then the others as one batch of
        :meth:`runs`); a compiled level may do them interval by interval, with the same
        bits.
        """
        from .kernels import rows as rowops

        positions = np.asarray(positions, dtype=np.int64)
        rows = np.asarray(rows, dtype=np.int64)
        if len(positions):
            rowops.correct(u, positions, uc, v, rows)
        self.runs(u, g, starts, ends)
        if before is None or not len(positions):
            return 0.0
        order = np.arange(len(positions), dtype=np.int64)
        rowops.copy_rows(before, order, u, positions)
        follows = np.concatenate(([False], np.diff(positions) == 1))
        for j in positions[follows][::-1]:  # one at a time: batched runs may run in parallel
            self.runs(u, g, j[None], j[None])
        rest = positions[~follows]
        self.runs(u, g, rest, rest)
        return rowops.sumsq_diff(u, positions, before, order)

    def points_tau(self, u: np.ndarray, positions, out: np.ndarray, rows) -> None:
        """``out[rows[r]] += u[j] - step_j(u[j-1])`` for ``j = positions[r]``: on a coarse
        level with ``u`` the restricted values, the coarse half of the FAS right-hand
        side (added after :meth:`points_residual` of the finer level)."""
        if len(positions):
            point_ends(self.points_apply(u, positions), u, None, positions, out, rows,
                       _maths.POINT_TAU)


# --- a rank's layers ------------------------------------------------------------------------------

class LayerSlice(Propagator):
    """The layers ``start..start+L-1`` of an ``n_total``-layer model, holding those only.

    ``local`` is a propagator of the ``L`` layers with indices from 0 (its layer ``k`` is
    layer ``start + k`` of the model). The slice keeps the model's layer indices
    (``step(n, x)`` for ``start <= n < stop``); asking for any other layer raises, which
    is how a rank proves it touches only what it owns. Parameters and gradients are
    the local ones (leading axis ``L``).
    """

    def __init__(self, local: Propagator, start: int, n_total: int):
        if not isinstance(local, Propagator):
            raise TypeError(f"local must be a ptoc.Propagator, got {type(local).__name__}")
        self.local = local
        self.start = int(start)
        self.stop = self.start + int(local.n_layers)
        if not 0 <= self.start < self.stop <= n_total:
            raise ValueError(f"layers {self.start}..{self.stop - 1} are not a non-empty range "
                             f"of the model's {n_total} layers")
        self.n_layers = int(n_total)

    def _local(self, n: int) -> int:
        if not self.start <= n < self.stop:
            raise IndexError(f"layer {n} is not held here (this slice holds layers "
                             f"{self.start}..{self.stop - 1})")
        return n - self.start

    def _check_layers(self, layers: np.ndarray) -> None:
        if len(layers) and (layers.min() < self.start or layers.max() >= self.stop):
            bad = layers[(layers < self.start) | (layers >= self.stop)][0]
            self._local(int(bad))

    @property
    def has_coarse_grid(self) -> bool:
        return self.local.has_coarse_grid

    def step(self, n, x):
        return self.local.step(self._local(n), x)

    def adjoint_step(self, n, x, lam, grad=None):
        return self.local.adjoint_step(self._local(n), x, lam, grad)

    def tangent_step(self, n, x, dx):
        return self.local.tangent_step(self._local(n), x, dx)

    def layer_gradient(self, n, x, lam_next, grad):
        self.local.layer_gradient(self._local(n), x, lam_next, grad)

    def layer_gradients(self, first, xs, lams_next, grad):
        self._local(first)
        self._local(first + len(xs) - 1)
        self.local.layer_gradients(first - self.start, xs, lams_next, grad)

    def _whole(self, what: str) -> None:
        if self.start != 0 or self.stop != self.n_layers:
            raise ValueError(f"{what} runs over all layers; this slice holds layers "
                             f"{self.start}..{self.stop - 1} of {self.n_layers}")

    def gradient_forward(self, x0):
        self._whole("gradient_forward")
        return self.local.gradient_forward(x0)

    def gradient_backward(self, states, cache, lam_N, grad):
        self._whole("gradient_backward")
        return self.local.gradient_backward(states, cache, lam_N, grad)

    def stacked_parameters(self, layers):
        layers = np.asarray(layers, dtype=np.int64)
        self._check_layers(layers)
        return self.local.stacked_parameters(layers - self.start)

    def level_steps(self, plan):
        if plan.fine:
            self._check_layers(plan.layers)
        return self.local.level_steps(plan.shifted(self.start))

    def objective(self, x):
        return self.local.objective(x)

    def objective_gradient(self, x):
        return self.local.objective_gradient(x)

    def parameters(self):
        return self.local.parameters()

    def layer_parameters(self, n):
        return self.local.layer_parameters(self._local(n))

    def coarse_step(self, params, n_layers, x):
        return self.local.coarse_step(params, n_layers, x)

    def coarse_adjoint_step(self, params, n_layers, x, lam):
        return self.local.coarse_adjoint_step(params, n_layers, x, lam)


# --- the dense ResNet -----------------------------------------------------------------------------

#: Targets whose kernel modules have the batched level and layer-gradient kernels.
_BATCHED_TARGETS = (Target.NUMPY, Target.CPU, Target.CUDA)

#: Buffers of the ResNet level steps, reused across solves (per thread).
level_workspace = Workspace(capacity=64)


class ParamsPropagator(Propagator):
    """What the propagators of the networks with :class:`Params` share (the dense
    :class:`ResNetPropagator` and the convolutional ``ConvResNetPropagator``): the
    network, its parameters (all layers, or only layers ``layers = (a, b)`` with the
    head), the labels, the kernels of ``target`` (from :attr:`kernel_backend`), and
    :meth:`layer_slice`."""

    #: The kernel module of a target (a subclass names its own).
    kernel_backend: Callable[[Target], Any] = staticmethod(backend)

    def __init__(self, network: Any, params: Params | Mapping, labels=None, *,
                 target: Target | str = Target.CPU, layers: tuple[int, int] | None = None,
                 check: bool = True):
        self.network = network
        self.params = network.check_params(params, layers=layers) if check else params
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        self.target = Target.parse(target)
        self._kern = type(self).kernel_backend(self.target)
        self.n_layers = network.depth if layers is None else int(layers[1] - layers[0])
        self._act = network.activation.code
        self._h = network.h

    def layer_slice(self, start: int, stop: int) -> LayerSlice:
        """Layers ``start..stop-1`` as a :class:`LayerSlice` holding views of their
        parameters only (and the head, for the objective)."""
        if not 0 <= start < stop <= self.n_layers:
            raise ValueError(f"layers {start}..{stop - 1} are not a non-empty range of the "
                             f"network's {self.n_layers} layers")
        p = self.params
        local = Params(K=p.K[start:stop], b=p.b[start:stop], K_in=p.K_in, b_in=p.b_in, W=p.W,
                       mu=p.mu)
        inner = type(self)(self.network, local, self.labels, target=self.target,
                           layers=(start, stop), check=False)
        return LayerSlice(inner, start, self.n_layers)


class ResNetPropagator(ParamsPropagator):
    """The residual layers of a :class:`ResNet` as a :class:`Propagator`.

    ``step`` is ``x + h sigma(K_n x + b_n)``, the objective is the batch-mean softmax
    cross-entropy of the classifier for ``labels``, and ``parameters()`` is
    ``[K, b]`` (live views of ``params``). Kernels run on ``target``. ``adjoint_step``
    is ``lambda + h K_n^T (sigma'(a_n) * lambda)`` with the parameter gradient of
    :doc:`/theory/adjoint`. Theory: :doc:`/theory/resnet`, :doc:`/theory/adjoint`.

    Parameters
    ----------
    network : ResNet
    params : Params or dict
    labels : array of int (S,), optional
        Needed only for :meth:`objective` and :meth:`objective_gradient`.
    target : Target or str
    layers : (int, int), optional
        ``params.K`` and ``params.b`` hold the layers ``start..stop-1`` only (row ``k`` is
        layer ``start + k``); the propagator then has ``stop - start`` layers, indexed
        from 0 (wrap it in a :class:`LayerSlice` to use the network's indices).
    check : bool
        Validate ``params`` (:meth:`ResNet.check_params`); False only for a
        :class:`Params` that has been validated already.
    """

    has_coarse_grid = True

    def initial_state(self, X) -> np.ndarray:
        """``x_0`` = the opening layer applied to inputs ``X`` (S, n_in)."""
        X, _ = check_inputs(self.network, X)
        return opening_forward(self.network, self.params, X)[0]

    def step(self, n, x):
        out = np.empty_like(x)
        self._kern.step(x, self.params.K[n], self.params.b[n], self._h, self._act, out, None,
                        _config.CHUNK)
        return out

    def adjoint_step(self, n, x, lam, grad=None):
        out = np.empty_like(lam)
        gK = gb = None
        if grad is not None:
            gK, gb = grad[0][n], grad[1][n]
        self._kern.adjoint_step(x, lam, self.params.K[n], self.params.b[n], self._h, self._act,
                                out, gK, gb, None, _config.CHUNK)
        return out

    def tangent_step(self, n, x, dx, dK=None, db=None):
        """Linearised step ``Phi_n'(x) dx + h sigma'(a) * (x dK^T + db)`` (NumPy)."""
        K, b = self.params.K[n], self.params.b[n]
        a = x @ K.T + b
        da = dx @ K.T
        if dK is not None:
            da = da + x @ dK.T
        if db is not None:
            da = da + db
        return dx + self._h * self.network.activation.derivative(a) * da

    def _labels(self):
        if self.labels is None:
            raise ValueError("this ResNetPropagator has no labels: pass labels= to use the "
                             "objective")
        return self.labels

    def objective(self, x):
        return classifier_loss(self.params, x, self._labels())[0]

    def objective_gradient(self, x):
        return classifier_loss(self.params, x, self._labels())[1]

    def parameters(self):
        return [self.params.K, self.params.b]

    def layer_parameters(self, n):
        return (self.params.K[n], self.params.b[n])

    def layer_gradient(self, n, x, lam_next, grad):
        self._kern.param_grad(x, lam_next, self.params.K[n], self.params.b[n], self._h,
                              self._act, grad[0][n], grad[1][n], None, _config.CHUNK)

    def layer_gradients(self, first, xs, lams_next, grad):
        L = len(xs)
        K, b = self.params.K[first:first + L], self.params.b[first:first + L]
        gK, gb = grad[0][first:first + L], grad[1][first:first + L]
        if self.target in _BATCHED_TARGETS:
            self._kern.layer_gradients(xs, lams_next, K, b, self._h, self._act, gK, gb,
                                       _config.CHUNK)
        else:
            for k in range(L):
                self._kern.param_grad(xs[k], lams_next[k], K[k], b[k], self._h, self._act,
                                      gK[k], gb[k], None, _config.CHUNK)

    def stacked_parameters(self, layers):
        """``(K[layers], b[layers])``: views when ``layers`` is a range with step 1 or -1,
        else fancy-indexing copies (read them, never write)."""
        layers = np.asarray(layers, dtype=np.int64)
        K, b = self.params.K, self.params.b
        if len(layers) > 1:
            step = int(layers[1] - layers[0])
            if step in (1, -1) and np.array_equal(np.diff(layers), np.full(len(layers) - 1,
                                                                            step)):
                first, last = int(layers[0]), int(layers[-1])
                if step == 1:
                    return K[first:last + 1], b[first:last + 1]
                stop = last - 1 if last > 0 else None
                return K[first:stop:-1], b[first:stop:-1]
        return K[layers], b[layers]

    def coarse_step(self, params, n_layers, x):
        """``x + n_layers h sigma(K x + b)`` with ``(K, b) = params`` (:doc:`/theory/mgrit`)."""
        K, b = params
        out = np.empty_like(x)
        self._kern.step(x, np.ascontiguousarray(K), np.ascontiguousarray(b),
                        n_layers * self._h, self._act, out, None, _config.CHUNK)
        return out

    def coarse_adjoint_step(self, params, n_layers, x, lam):
        """``lam + n_layers h K^T (sigma'(K x + b) * lam)``."""
        K, b = params
        out = np.empty_like(lam)
        self._kern.adjoint_step(x, lam, np.ascontiguousarray(K), np.ascontiguousarray(b),
                                n_layers * self._h, self._act, out, None, None, None,
                                _config.CHUNK)
        return out

    def level_steps(self, plan):
        if self.target in _BATCHED_TARGETS:
            return ResNetLevelSteps(self, plan)
        return LevelSteps(self, plan)

    def propagate(self, x, start=0, stop=None, states=None):
        stop = self.n_layers if stop is None else stop
        buf = states if states is not None else np.empty((stop - start + 1,) + x.shape, x.dtype)
        buf[0] = x
        self._kern.forward_sweep(buf, self.params.K[start:stop], self.params.b[start:stop],
                                 self._h, self._act, None, _config.CHUNK)
        return buf[-1].copy() if states is None else buf[-1]

    def adjoint_propagate(self, states, lam, start=0, stop=None, grad=None):
        stop = self.n_layers if stop is None else stop
        if grad is None:
            grad = self.zero_gradient()
        grad = [g[start:stop] for g in grad]
        lam = np.ascontiguousarray(lam)
        return np.asarray(self._kern.adjoint_sweep(
            np.ascontiguousarray(states), lam, self.params.K[start:stop],
            self.params.b[start:stop], self._h, self._act, None, grad[0], grad[1], None,
            _config.CHUNK))


class ResNetLevelSteps(LevelSteps):
    """:class:`LevelSteps` of a :class:`ResNetPropagator`, on compiled level kernels.

    Every step of a level has the same form, ``x + dt sigma(K x + b)`` (fine: one layer,
    ``dt = h``; coarse: the coarse weights, ``dt = (e - s) h``), so the level's weights
    are stacked into arrays once per solve and the kernels run whole relaxations. The
    kernels index steps from 1, so row 0 of each stacked array is unused. On the CUDA
    target the stacked arrays are copied to the device here, once, and stay there for
    the object's lifetime (a solve), so that a relaxation moves only the level's
    values (see :mod:`ptoc.kernels.cuda`).
    """

    def __init__(self, prop: ResNetPropagator, plan: LevelPlan):
        super().__init__(prop, plan)
        n_loc = plan.n_steps + 1
        d = prop.network.width
        dtype = prop.network.dtype
        tag = f"{'adj' if plan.backward else 'fwd'}{plan.level}"
        self.K = level_workspace.get("K" + tag, (n_loc, d, d), dtype)
        self.b = level_workspace.get("b" + tag, (n_loc, d), dtype)
        self.dt = level_workspace.get("dt" + tag, (n_loc,), dtype)
        self.dt[0] = 0.0
        self.dt[1:] = plan.spans * prop._h
        if plan.n_steps:
            stack = prop.stacked_parameters(plan.layers) if plan.fine else plan.weights
            self.K[1:], self.b[1:] = stack
        self.D = None
        on_device = prop.target is Target.CUDA
        self.kern, self.act = prop._kern, prop._act
        if on_device:
            self.K, self.b, self.dt = (self.kern.to_device(a) for a in (self.K, self.b, self.dt))
        if plan.backward:
            # The states of an adjoint solve do not change during it: sigma' of every step
            # is computed here, once, and the adjoint steps of the whole solve read it
            # (the same numbers as recomputing it in each step, one product less per step).
            X = level_workspace.get("X" + tag, (n_loc,) + plan.states.shape[1:], dtype)
            X[1:] = plan.states
            if on_device:
                self.D = self.kern.level_derivatives(self.kern.to_device(X), self.K, self.b,
                                                     self.act, None, _config.CHUNK)
            else:
                self.D = self.kern.level_derivatives(
                    X, self.K, self.b, self.act, level_workspace.get("D" + tag, X.shape, dtype),
                    _config.CHUNK)

    def runs(self, u, g, starts, ends) -> None:
        starts = np.asarray(starts, dtype=np.int64)
        ends = np.asarray(ends, dtype=np.int64)
        if len(starts) == 0:
            return
        if self.D is None:
            self.kern.state_runs(u, g, self.K, self.b, self.dt, self.act, starts, ends,
                                 _config.CHUNK)
        else:
            self.kern.adjoint_runs(u, g, self.D, self.K, self.dt, starts, ends,
                                   _config.CHUNK)

    def points_apply(self, u, positions) -> np.ndarray:
        positions = np.asarray(positions, dtype=np.int64)
        out = np.empty((len(positions),) + u.shape[1:], u.dtype)
        self._points(u, positions, out, None, None, _maths.POINT_APPLY)
        return out

    def runs_then_residuals(self, u, g, starts, ends, positions, out, rows, inject) -> None:
        """:meth:`LevelSteps.runs_then_residuals` in one compiled pass where the target
        has one for these arrays (the CPU's ``state_runs_residuals`` and
        ``adjoint_runs_residuals``), else composed."""
        if self.D is None:
            fused = getattr(self.kern, "state_runs_residuals", None)
            args = (self.K, self.b, self.dt, self.act)
        else:
            fused = getattr(self.kern, "adjoint_runs_residuals", None)
            args = (self.D, self.K, self.dt)
        if fused is None or not len(starts) or not fused(
                u, g, *args, starts, ends, positions, out, rows, inject, _config.CHUNK):
            super().runs_then_residuals(u, g, starts, ends, positions, out, rows, inject)

    def correct_then_runs(self, u, g, positions, uc, v, rows, starts, ends,
                          before=None) -> float:
        """:meth:`LevelSteps.correct_then_runs` in one compiled pass where the target has
        one for these arrays (the CPU's ``state_correct_runs`` and
        ``adjoint_correct_runs``), else composed."""
        if self.D is None:
            fused = getattr(self.kern, "state_correct_runs", None)
            args = (self.K, self.b, self.dt, self.act)
        else:
            fused = getattr(self.kern, "adjoint_correct_runs", None)
            args = (self.D, self.K, self.dt)
        if fused is not None and len(positions):
            sq = fused(u, g, *args, positions, uc, v, rows, starts, ends, before, _config.CHUNK)
            if sq is not None:
                return sq
        return super().correct_then_runs(u, g, positions, uc, v, rows, starts, ends, before)

    def points_residual(self, u, g, positions, out, rows) -> None:
        self._points(u, positions, out, rows, g,
                     _maths.POINT_RESIDUAL if g is None else _maths.POINT_RESIDUAL_G)

    def points_tau(self, u, positions, out, rows) -> None:
        self._points(u, positions, out, rows, None, _maths.POINT_TAU)

    def _points(self, u, positions, out, rows, g, mode) -> None:
        """One point kernel call; ``mode`` says what each step's value goes into
        (:data:`ptoc._maths.POINT_APPLY`, ...)."""
        positions = np.asarray(positions, dtype=np.int64)
        if len(positions) == 0:
            return
        if self.D is None:
            self.kern.state_points_into(u, self.K, self.b, self.dt, self.act, positions, out,
                                        rows, g, mode, _config.CHUNK)
        else:
            self.kern.adjoint_points_into(u, self.D, self.K, self.dt, positions, out,
                                          rows, g, mode, _config.CHUNK)


# --- models: a propagator with an opening and a terminal objective -------------------------------

class Model(abc.ABC):
    """A layered model as the layer-parallel gradient and the training methods see it.

    ``J(theta) = Phi(F(x_0)) + R(theta)`` with ``x_0`` = the *opening* of the inputs ``X``,
    ``F`` = the ``n_layers`` layers (a :class:`Propagator`) and ``Phi`` = the *terminal*
    objective of the last state and the labels. Parameters are a mapping of arrays: the
    per-layer arrays named by :attr:`layer_keys` (leading axis = layer, in the order of
    the propagator's ``parameters()``), those of the opening (:attr:`opening_keys`,
    owned by the first rank) and those of the terminal objective
    (:attr:`terminal_keys`, owned by the last rank). A method that works through this
    contract works on every model: :class:`ResNetModel` (what a :class:`ptoc.ResNet`
    is seen as) and :class:`PropagatorModel` (a propagator written by hand, its
    inputs being the initial states).
    """

    n_layers: int
    dtype: np.dtype
    layer_keys: tuple[str, ...]
    opening_keys: tuple[str, ...] = ()
    terminal_keys: tuple[str, ...] = ()

    @abc.abstractmethod
    def check_params(self, params: Mapping) -> Mapping:
        """The parameters validated (keys, shapes, finite values), as the model keeps them."""

    @abc.abstractmethod
    def layers(self, params: Mapping, *, target: Target | str = Target.CPU,
               span: tuple[int, int] | None = None) -> Propagator:
        """The layers over ``params``' layer arrays as a :class:`Propagator`. With
        ``span=(a, b)`` those arrays hold the layers ``a..b-1`` only and the propagator
        has ``b - a`` layers, indexed from 0 (wrap it in a :class:`LayerSlice`)."""

    @abc.abstractmethod
    def terminal(self, params: Mapping, x_last: np.ndarray, labels
                 ) -> tuple[float, np.ndarray, dict[str, np.ndarray]]:
        """``(Phi, lambda_N, dPhi/d(terminal parameters))`` at the last state."""

    def state_shape(self, X: np.ndarray) -> tuple[int, ...]:
        """The shape of a state for inputs ``X`` (default: that of ``X``)."""
        return tuple(np.shape(X))

    def opening(self, params: Mapping, X: np.ndarray) -> tuple[np.ndarray, Any]:
        """``(x_0, cache)``: the initial state for inputs ``X`` and what
        :meth:`opening_gradient` needs (default: ``x_0 = X``)."""
        return np.array(X, dtype=self.dtype, order="C", copy=True), None

    def opening_gradient(self, params: Mapping, X: np.ndarray, lam0: np.ndarray,
                         cache: Any) -> dict[str, np.ndarray]:
        """``dJ/d(opening parameters)`` from ``lambda_0`` (default: none)."""
        return {}

    def layer_regulariser(self, arrays: list[np.ndarray], left: tuple | None,
                          right: tuple | None, grads: list[np.ndarray] | None = None) -> float:
        """The regulariser's share of consecutive layers (``arrays`` as the
        propagator's ``parameters()``, ``left``/``right`` the layers beside them, None at
        the ends), adding its gradient there into ``grads`` when given (default: no
        regulariser)."""
        return 0.0

    def regulariser_terms(self, thetas: list[np.ndarray], prev_diffs: list[np.ndarray],
                          next_diffs: list[np.ndarray], want_grad: bool = True):
        """The regulariser's terms of each of a stack of layers with fixed neighbours,
        as :func:`ptoc.objective.layer_regulariser_terms` gives them (``R_n`` of the
        maximum principle is their sum; default: no regulariser)."""
        zero = np.zeros(thetas[0].shape[0])
        return zero, zero, zero, ([np.zeros_like(t) for t in thetas] if want_grad else None)

    def head_regulariser(self, params: Mapping, grads: Mapping | None = None) -> float:
        """The regulariser of the opening and terminal parameters, adding its gradient
        to ``grads`` when given (default: none)."""
        return 0.0

    def pack(self, arrays: dict[str, np.ndarray]) -> Mapping:
        """Parameters (or a gradient) in the container the model's parameters come in
        (default: the dict)."""
        return arrays

    def check_inputs(self, X, labels=None) -> tuple[np.ndarray, Any]:
        """The inputs (and labels) validated; default: ``X`` as an array of the model's
        dtype (the labels are not used)."""
        X = np.ascontiguousarray(X, dtype=self.dtype)
        if X.ndim < 1 or X.shape[0] == 0 or not np.all(np.isfinite(X)):
            raise ValueError("X must be a non-empty array of finite values, one sample per row")
        return X, labels

    def regulariser(self, params: Mapping) -> float:
        """``R(theta)``: the layer part over all layers and the head part."""
        value = self.layer_regulariser([params[k] for k in self.layer_keys], None, None)
        return value + self.head_regulariser(params)

    def hamiltonian_gradient(self, params: Mapping, n: int, x: np.ndarray, p_next: np.ndarray,
                             *, target: Target | str = Target.CPU) -> list[np.ndarray]:
        """``grad_theta sum_s H_n(x_s, p_{n+1,s}, theta_n)`` of layer ``n`` (``params``' layer
        arrays hold all layers), structured as one layer of the propagator's
        ``parameters()``: by default ``-(dJ/dtheta_n)``, the data part from the
        propagator's :meth:`Propagator.layer_gradient` at ``lambda_{n+1} = -p_{n+1}`` and
        the regulariser's (the maximum principle's identity, Li & Hao)."""
        arrays = [params[k] for k in self.layer_keys]
        prop = self.layers(params, target=target)
        grad = prop.zero_gradient()
        prop.layer_gradient(n, x, -p_next, grad)
        N = self.n_layers
        left = tuple(a[n - 1] for a in arrays) if n > 0 else None
        right = tuple(a[n + 1] for a in arrays) if n < N - 1 else None
        layer = [g[n:n + 1] for g in grad]
        self.layer_regulariser([a[n:n + 1] for a in arrays], left, right, layer)
        return [-g[0] for g in layer]


class ResNetModel(Model):
    """A :class:`ptoc.ResNet` as a :class:`Model`: the opening layer, the residual layers
    (:class:`ResNetPropagator`), the softmax classifier and the regulariser of
    :mod:`ptoc.objective`. Parameters are :class:`ptoc.Params`."""

    layer_keys = ("K", "b")
    terminal_keys = ("W", "mu")

    def __init__(self, network: ResNet):
        self.network = network
        self.n_layers = network.depth
        self.dtype = network.dtype
        self.opening_keys = ("K_in", "b_in") if network.has_opening_weights else ()

    def check_params(self, params):
        return self.network.check_params(params)

    def check_inputs(self, X, labels=None):
        return check_inputs(self.network, X, labels)

    def layers(self, params, *, target=Target.CPU, span=None):
        return ResNetPropagator(self.network, self.pack(params), target=target, layers=span,
                                check=False)

    def state_shape(self, X):
        return (np.shape(X)[0], self.network.width)

    def opening(self, params, X):
        return opening_forward(self.network, self.pack(params), X)

    def opening_gradient(self, params, X, lam0, cache):
        if not self.opening_keys:
            return {}
        grads = Params(K=None, b=None, K_in=np.zeros_like(params["K_in"]),
                       b_in=np.zeros_like(params["b_in"]), W=None, mu=None)
        opening_backward(self.pack(params), X, lam0, cache, grads)
        return {"K_in": grads.K_in, "b_in": grads.b_in}

    def terminal(self, params, x_last, labels):
        loss, lam, dW, dmu = classifier_loss(self.pack(params), x_last, labels)
        return loss, lam, {"W": dW, "mu": dmu}

    def hamiltonian_gradient(self, params, n, x, p_next, *, target=Target.CPU):
        """:func:`ptoc.hamiltonian_grad`: the data part on the kernels' layer Hamiltonian."""
        gK, gb = hamiltonian_grad(self.network, self.pack(params), n, x, p_next, target=target)
        return [gK, gb]

    def layer_regulariser(self, arrays, left, right, grads=None):
        return range_regulariser(self.network, list(arrays), left, right,
                                 want_grad=grads is not None, add_to=grads)[0]

    def regulariser_terms(self, thetas, prev_diffs, next_diffs, want_grad=True):
        return layer_regulariser_terms(self.network, thetas, prev_diffs, next_diffs, want_grad)

    def head_regulariser(self, params, grads=None):
        return head_regulariser(self.network, params, grads)

    def pack(self, arrays):
        if isinstance(arrays, Params):
            return arrays
        return Params(**{k: arrays.get(k) for k in ("K", "b", "K_in", "b_in", "W", "mu")})


class PropagatorModel(Model):
    """A hand-written :class:`Propagator` as a :class:`Model`: the inputs are the initial
    states, the objective is the propagator's own, and there is no regulariser.

    ``factory(arrays)`` builds the propagator of the layers that ``arrays`` hold (one
    array per entry of ``parameters()``, leading axis = layer, indexed from 0), using
    those arrays as its live parameters; ``names`` are the keys of those arrays in a
    parameter mapping. The labels are not used (the objective is the propagator's).
    """

    def __init__(self, factory: Callable[[list[np.ndarray]], Propagator],
                 params: Mapping[str, np.ndarray]):
        self.factory = factory
        self.layer_keys = tuple(params)
        arrays = [np.asarray(params[k]) for k in self.layer_keys]
        if not arrays:
            raise ValueError("a PropagatorModel needs at least one parameter array")
        self.n_layers = int(arrays[0].shape[0])
        self.dtype = np.result_type(*arrays)
        self._shapes = {k: a.shape for k, a in zip(self.layer_keys, arrays, strict=True)}
        prop = factory(arrays)
        if not isinstance(prop, Propagator) or prop.n_layers != self.n_layers:
            raise ValueError("factory(arrays) must return a ptoc.Propagator of "
                             f"{self.n_layers} layers")

    def check_params(self, params):
        if set(params) != set(self.layer_keys):
            raise ValueError(f"params has keys {sorted(params)}, expected {list(self.layer_keys)}")
        out = {}
        for k in self.layer_keys:
            a = np.ascontiguousarray(params[k], dtype=self.dtype)
            if a.shape != self._shapes[k]:
                raise ValueError(f"params[{k!r}] has shape {a.shape}, expected {self._shapes[k]}")
            if not np.all(np.isfinite(a)):
                raise ValueError(f"params[{k!r}] contains non-finite values (NaN or inf)")
            out[k] = a
        return out

    def layers(self, params, *, target=Target.CPU, span=None):
        return self.factory([params[k] for k in self.layer_keys])

    def terminal(self, params, x_last, labels):
        prop = self.factory([params[k] for k in self.layer_keys])
        return prop.objective(x_last), prop.objective_gradient(x_last), {}


def as_model(network: ResNet | Model) -> Model:
    """``network`` as a :class:`Model` (a :class:`ptoc.ResNet` is wrapped)."""
    if isinstance(network, Model):
        return network
    if isinstance(network, ResNet):
        return ResNetModel(network)
    raise TypeError(f"network must be a ptoc.ResNet or a ptoc.propagator.Model, got "
                    f"{type(network).__name__}")


# --- the checker ---------------------------------------------------------------------------------

@dataclass
class Check:
    """One check of :func:`check_propagator`: a relative error against a tolerance."""

    name: str
    error: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return bool(np.isfinite(self.error) and self.error <= self.tolerance)


@dataclass
class PropagatorReport:
    """Result of :func:`check_propagator`; ``passed`` is True when every check passed."""

    checks: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def __str__(self) -> str:
        width = max(len(c.name) for c in self.checks) if self.checks else 10
        lines = [f"{'check':<{width}}  {'rel. error':>10}  {'tolerance':>9}  verdict"]
        for c in self.checks:
            lines.append(f"{c.name:<{width}}  {c.error:10.2e}  {c.tolerance:9.1e}  "
                         f"{'ok' if c.passed else 'FAILED'}")
        lines.append("all checks passed" if self.passed
                     else f"{len(self.failures)} check(s) FAILED")
        return "\n".join(lines)

    def raise_if_failed(self) -> None:
        if not self.passed:
            raise AssertionError(f"propagator check failed:\n{self}")


def _richardson(f: Callable[[float], float], eps: float) -> float:
    """Directional derivative of ``f`` at 0 by central differences with Richardson
    extrapolation (error ``O(eps^4)``)."""
    d1 = (f(eps) - f(-eps)) / (2 * eps)
    d2 = (f(eps / 2) - f(-eps / 2)) / eps
    return (4 * d2 - d1) / 3


def _linearised(f: Callable[[np.ndarray], np.ndarray], x: np.ndarray, dx: np.ndarray,
                h: float) -> np.ndarray:
    """``f'(x) dx`` by Richardson-extrapolated central differences with step ``h``."""
    d1 = (f(x + h * dx) - f(x - h * dx)) / (2 * h)
    d2 = (f(x + 0.5 * h * dx) - f(x - 0.5 * h * dx)) / h
    return np.asarray((4 * d2 - d1) / 3).reshape(x.shape)


def _max_rel(a: np.ndarray, b: np.ndarray) -> float:
    """Largest entrywise difference relative to the largest entry of ``b``."""
    return float(np.max(np.abs(a - b), initial=0.0)) / max(float(np.max(np.abs(b), initial=0.0)),
                                                           np.finfo(float).tiny)


def _check_level_steps(prop: Propagator, states: np.ndarray, lamN: np.ndarray,
                       layers: list[int], weights) -> list[Check]:
    """``prop.level_steps`` on the fine grid against one step at a time, both sweeps."""
    N = int(prop.n_layers)
    checks = []
    forward = LevelPlan(level=0, backward=False, layers=np.arange(N, dtype=np.int64),
                        spans=np.ones(N, dtype=np.int64))
    u = np.empty_like(states)
    u[0] = states[0]
    prop.level_steps(forward).runs(u, None, np.array([1]), np.array([N]))
    checks.append(Check("level steps (state sweep) = loop over step", _max_rel(u, states),
                        1e-12))
    picked = np.asarray(layers, dtype=np.int64) + 1
    points = prop.level_steps(forward).points_apply(states, picked)
    checks.append(Check("level points (state sweep) = step", _max_rel(points, states[picked]),
                        1e-12))
    # the FAS halves, at values that are not the solution, into rows in reverse order
    v = states * 1.25 + 0.5
    g = 0.5 * states
    phi = np.stack([prop.step(int(j) - 1, v[int(j) - 1]) for j in picked])
    rows = np.arange(len(picked), dtype=np.int64)[::-1].copy()
    out = np.zeros((len(picked),) + states.shape[1:])
    prop.level_steps(forward).points_residual(v, g, picked, out, rows)
    checks.append(Check("level points residual (state sweep) = g + step - u",
                        _max_rel(out[rows], g[picked] + (phi - v[picked])), 1e-12))
    out = v[: len(picked)].copy()
    prop.level_steps(forward).points_tau(v, picked, out, rows)
    checks.append(Check("level points tau (state sweep) = out + u - step",
                        _max_rel(out[rows], v[rows] + (v[picked] - phi)), 1e-12))
    checks.extend(_check_fused_level_steps(prop, prop.level_steps(forward), v, g))
    order = np.arange(N - 1, -1, -1, dtype=np.int64)  # adjoint step j is layer N - j
    backward = LevelPlan(level=0, backward=True, layers=order, spans=np.ones(N, np.int64),
                         states=states[order])
    lams = np.empty((N + 1,) + lamN.shape, dtype=np.result_type(lamN, np.float64))
    lams[0] = lamN
    prop.level_steps(backward).runs(lams, None, np.array([1]), np.array([N]))
    loop = [lamN]
    for n in range(N - 1, -1, -1):
        loop.append(prop.adjoint_step(n, states[n], loop[-1]))
    checks.append(Check("level steps (adjoint sweep) = loop over adjoint_step",
                        _max_rel(lams, np.stack(loop)), 1e-12))
    return checks


def _check_fused_level_steps(prop: Propagator, steps: LevelSteps, v: np.ndarray,
                             g: np.ndarray) -> list[Check]:
    """``runs_then_residuals`` and ``correct_then_runs`` on a grid whose C-points are the
    even positions (runs of one F-point between them), against one step at a time."""
    N = len(v) - 1
    c = np.arange(2, N + 1, 2, dtype=np.int64)
    if not len(c):
        return []
    f = np.arange(1, N + 1, 2, dtype=np.int64)
    rows = np.arange(1, len(c) + 1, dtype=np.int64)
    coarse = (len(c) + 1,) + v.shape[1:]

    def step(j, x):  # position j from position j - 1
        return prop.step(int(j) - 1, x)

    u, out, inject = v.copy(), np.zeros(coarse), np.zeros(coarse)
    steps.runs_then_residuals(u, g, f, f, c, out, rows, inject)
    ref = v.copy()
    for j in f:
        ref[j] = step(j, ref[j - 1]) + g[j]
    residual = np.stack([g[j] + (step(j, ref[j - 1]) - ref[j]) for j in c])
    checks = [Check("level F-relaxation with the restriction's residuals = step by step",
                    max(_max_rel(u, ref), _max_rel(out[1:], residual),
                        _max_rel(inject[1:], ref[c])), 1e-12)]
    uc, vc = np.zeros(coarse), np.zeros(coarse)
    uc[1:], vc[1:] = 0.75 * v[c], 1.25 * v[c]
    u, before = v.copy(), np.zeros((len(c),) + v.shape[1:])
    sq = steps.correct_then_runs(u, g, c, uc, vc, rows, f, f, before)
    ref = v.copy()
    ref[c] = ref[c] + (uc[1:] - vc[1:])
    for j in f:
        ref[j] = step(j, ref[j - 1]) + g[j]
    old = ref.copy()
    for j in c:
        ref[j] = step(j, old[j - 1]) + g[j]
    sq_ref = float(np.sum((ref[c] - old[c]) ** 2))
    checks.append(Check("level correction, F- and C-relaxation = step by step",
                        max(_max_rel(u, ref), _max_rel(before, old[c]),
                            abs(sq - sq_ref) / max(sq_ref, np.finfo(float).tiny)), 1e-12))
    return checks


def _check_coarse_grid(prop: Propagator, states: np.ndarray, layers: list[int],
                       rng: np.random.Generator, eps: float, scale: float,
                       adjoint_tol: float) -> list[Check]:
    """The optional coarse-grid methods: consistency with the fine step, the adjoint of
    the coarse step by the dot-product test, the stacked parameters, coarse level steps."""
    checks = []
    for n in layers:
        x = states[n]
        theta = tuple(np.array(a) for a in prop.layer_parameters(n))
        checks.append(Check(f"coarse step over 1 layer = step, layer {n}",
                            _max_rel(prop.coarse_step(theta, 1, x), prop.step(n, x)), 1e-12))
        dx = rng.standard_normal(x.shape)
        mu = rng.standard_normal(x.shape)
        jdx = _linearised(lambda y, theta=theta: prop.coarse_step(theta, 2, y), x, dx,
                          eps * scale)
        lhs = float(np.vdot(mu, jdx))
        rhs = float(np.vdot(prop.coarse_adjoint_step(theta, 2, x, mu), dx))
        norm = float(np.linalg.norm(mu) * np.linalg.norm(jdx))
        checks.append(Check(f"coarse dot-product test (2 layers), layer {n}",
                            _rel(lhs, rhs, norm), adjoint_tol))
    picked = np.asarray(layers, dtype=np.int64)
    stacked = prop.stacked_parameters(picked)
    expected = [np.stack(col) for col in zip(*(prop.layer_parameters(int(n)) for n in picked),
                                             strict=True)]
    checks.append(Check("stacked_parameters = layer_parameters",
                        max(_max_rel(np.asarray(a), e) for a, e in zip(stacked, expected,
                                                                       strict=True)), 0.0))
    weights = tuple(np.array(w) for w in stacked)
    spans = np.arange(1, len(picked) + 1, dtype=np.int64)
    coarse = LevelPlan(level=1, backward=False, layers=picked, spans=spans, weights=weights)
    u = np.empty((len(picked) + 1,) + states.shape[1:])
    u[0] = states[0]
    prop.level_steps(coarse).runs(u, None, np.array([1]), np.array([len(picked)]))
    loop = [states[0]]
    for j in range(len(picked)):
        loop.append(prop.coarse_step(tuple(w[j] for w in weights), int(spans[j]), loop[-1]))
    checks.append(Check("coarse level steps = loop over coarse_step",
                        _max_rel(u, np.stack(loop)), 1e-12))
    return checks


def _rel(a: float, b: float, scale: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), scale, np.finfo(float).tiny)


def check_propagator(prop: Propagator, x0: np.ndarray, *, n_layers_checked: int = 3,
                     seed: int = 0, eps: float = 1e-5, adjoint_tol: float = 1e-8,
                     gradient_tol: float = 1e-6, raise_on_failure: bool = False
                     ) -> PropagatorReport:
    """Check a user-written :class:`Propagator` against the truth.

    Checks, each as a relative error against a tolerance:

    1. **dot-product test** on sampled layers ``n``: ``<mu, Phi_n'(x_n) dx> =
       <Phi_n'(x_n)^T mu, dx>`` for random ``dx``, ``mu``, with the linearised step from
       ``prop.tangent_step`` when it returns one (not None), else from Richardson-
       extrapolated central differences of ``step`` (accuracy about ``eps^4``);
    2. **layer gradient**: the ``grad`` accumulated by ``adjoint_step`` against finite
       differences of ``<mu, Phi_n(x_n; theta)>`` along a random parameter direction;
    3. **objective gradient**: ``objective_gradient`` against finite differences of
       ``objective``;
    4. **whole chain**: the gradient of ``objective(propagate(x0))`` in all layer
       parameters and in ``x0``, from ``adjoint_propagate``, against finite differences;
    5. **range methods**: ``propagate``, ``adjoint_propagate`` and the serial gradient's
       ``gradient_forward`` and ``gradient_backward`` equal the loop over ``step`` and
       ``adjoint_step``;
    6. **level steps**: :meth:`Propagator.level_steps` on the fine grid (runs and single
       points, state and adjoint sweeps, the two halves of the FAS right-hand side,
       ``points_residual`` and ``points_tau``, and the fused operations
       ``runs_then_residuals`` and ``correct_then_runs``) equals one step at a time;
    7. **coarse grid**, when the propagator has one (:attr:`Propagator.has_coarse_grid`):
       a coarse step over one layer with that layer's parameters equals ``step``; the
       dot-product test for ``coarse_adjoint_step`` against ``coarse_step``;
       ``stacked_parameters`` equals the stacked ``layer_parameters``; coarse level steps
       equal the loop over ``coarse_step``. A propagator that overrides some of the
       coarse methods but not all fails a check naming the missing ones.

    Check 1 is the dot-product identity (the adjoint is the transpose of the linearised
    step). Theory: :doc:`/theory/adjoint`.

    Parameters
    ----------
    prop : Propagator
    x0 : ndarray
        Initial state at which to check.
    n_layers_checked : int
        Number of layers sampled for checks 1 and 2 (always including the first
        and the last layer).
    seed : int
        Seed of the random directions.
    eps : float
        Finite-difference step, relative to the size of the perturbed quantity. For
        piecewise-smooth activations (ReLU, SmoothReLU) a step that carries a
        pre-activation across a kink gives an ``O(eps)`` error; keep pre-activations
        off the kinks (e.g. nonzero biases: with zero biases and a ReLU opening, whole
        rows sit exactly at ``a = 0``) or lower ``eps``.
    adjoint_tol, gradient_tol : float
        Tolerances of the dot-product test and of the finite-difference checks.
    raise_on_failure : bool
        Raise ``AssertionError`` with the report when a check fails.

    Returns
    -------
    PropagatorReport
    """
    if not isinstance(prop, Propagator):
        raise TypeError(f"prop must be a ptoc.Propagator, got {type(prop).__name__}")
    N = int(prop.n_layers)
    if N < 1:
        raise ValueError(f"prop.n_layers must be >= 1, got {N}")
    x0 = np.array(x0, dtype=np.float64)
    rng = np.random.default_rng(seed)
    report = PropagatorReport()
    states = np.empty((N + 1,) + x0.shape)
    states[0] = x0
    for n in range(N):
        states[n + 1] = prop.step(n, states[n])
    layers = sorted({0, N - 1} | set(rng.choice(N, size=min(N, n_layers_checked),
                                                 replace=False).tolist()))
    params = prop.parameters()
    scale = max(1.0, float(np.max(np.abs(x0))))

    for n in layers:
        x = states[n]
        dx = rng.standard_normal(x.shape)
        mu = rng.standard_normal(states[n + 1].shape)
        jdx = prop.tangent_step(n, x, dx)
        if jdx is None:
            jdx = _linearised(lambda y, n=n: prop.step(n, y), x, dx, eps * scale)
        lhs = float(np.vdot(mu, jdx))
        rhs = float(np.vdot(prop.adjoint_step(n, x, mu), dx))
        norm = float(np.linalg.norm(mu) * np.linalg.norm(jdx))
        report.checks.append(Check(f"dot-product test, layer {n}", _rel(lhs, rhs, norm),
                                   adjoint_tol))

        grad = prop.zero_gradient()
        prop.adjoint_step(n, x, mu, grad)
        directions = [rng.standard_normal(p[n].shape) for p in params]
        pscale = [max(1.0, float(np.max(np.abs(p[n])))) for p in params]
        saved = [p[n].copy() for p in params]

        def layer_value(t, n=n, x=x, mu=mu, directions=directions, saved=saved, pscale=pscale):
            for p, s, v, c in zip(params, saved, directions, pscale, strict=True):
                p[n] = s + t * c * v
            try:
                return float(np.vdot(mu, prop.step(n, x)))
            finally:
                for p, s in zip(params, saved, strict=True):
                    p[n] = s

        # the direction is scaled by pscale, so the predicted derivative is too
        fd = _richardson(layer_value, eps)
        predicted = sum(float(np.vdot(g[n], v)) * c
                        for g, v, c in zip(grad, directions, pscale, strict=True))
        report.checks.append(Check(f"layer gradient, layer {n}", _rel(fd, predicted, 1e-12),
                                   gradient_tol))

    xN = states[N]
    v = rng.standard_normal(xN.shape)
    lamN = prop.objective_gradient(xN)
    fd = _richardson(lambda t: prop.objective(xN + t * scale * v), eps) / scale
    report.checks.append(Check("objective gradient", _rel(fd, float(np.vdot(lamN, v)), 1e-12),
                               gradient_tol))

    grad = prop.zero_gradient()
    lam0 = prop.adjoint_propagate(states, lamN, 0, N, grad)
    directions = [rng.standard_normal(p.shape) for p in params]
    pscale = [max(1.0, float(np.max(np.abs(p)))) for p in params]
    saved = [p.copy() for p in params]

    def chain_value(t):
        for p, s, d, c in zip(params, saved, directions, pscale, strict=True):
            p[...] = s + t * c * d
        try:
            return prop.objective(prop.propagate(x0, 0, N))
        finally:
            for p, s in zip(params, saved, strict=True):
                p[...] = s

    fd = _richardson(chain_value, eps)
    predicted = sum(float(np.vdot(g, d)) * c
                    for g, d, c in zip(grad, directions, pscale, strict=True))
    report.checks.append(Check("whole-chain gradient in the parameters",
                               _rel(fd, predicted, 1e-12), gradient_tol))
    dx0 = rng.standard_normal(x0.shape)
    fd = _richardson(lambda t: prop.objective(prop.propagate(x0 + t * scale * dx0, 0, N)),
                     eps) / scale
    report.checks.append(Check("whole-chain gradient in x0",
                               _rel(fd, float(np.vdot(lam0, dx0)), 1e-12), gradient_tol))

    ranged = prop.propagate(x0, 0, N)
    report.checks.append(Check("propagate = loop over step",
                               float(np.max(np.abs(ranged - xN)) / scale), 1e-12))
    lam_loop = lamN
    grad_loop = prop.zero_gradient()
    for n in range(N - 1, -1, -1):
        lam_loop = prop.adjoint_step(n, states[n], lam_loop, grad_loop)
    lscale = max(float(np.max(np.abs(lam_loop))), np.finfo(float).tiny)
    report.checks.append(Check("adjoint_propagate = loop over adjoint_step",
                               float(np.max(np.abs(lam0 - lam_loop)) / lscale), 1e-12))
    gerr = max(float(np.max(np.abs(g - h))) / max(float(np.max(np.abs(h))), 1e-300)
               for g, h in zip(grad, grad_loop, strict=True))
    report.checks.append(Check("range gradient = loop gradient", gerr, 1e-12))
    fstates, cache = prop.gradient_forward(x0)
    report.checks.append(Check("gradient_forward = loop over step",
                               float(np.max(np.abs(fstates[N] - xN)) / scale), 1e-12))
    grad_fused = prop.zero_gradient()
    lams = prop.gradient_backward(fstates, cache, lamN, grad_fused)
    report.checks.append(Check("gradient_backward = loop over adjoint_step",
                               float(np.max(np.abs(lams[0] - lam_loop)) / lscale), 1e-12))
    gerr = max(float(np.max(np.abs(g - h))) / max(float(np.max(np.abs(h))), 1e-300)
               for g, h in zip(grad_fused, grad_loop, strict=True))
    report.checks.append(Check("gradient_backward's gradient = loop gradient", gerr, 1e-12))
    del cache
    report.checks.extend(_check_level_steps(prop, states, lamN, layers, None))
    if prop.has_coarse_grid:
        report.checks.extend(_check_coarse_grid(prop, states, layers, rng, eps, scale,
                                                adjoint_tol))
    else:
        missing = prop._missing_coarse_methods()
        if len(missing) < 3:  # some coarse methods but not all: a half-declared ability
            report.checks.append(Check(f"coarse grid incomplete (missing {', '.join(missing)})",
                                       np.inf, 0.0))
    if raise_on_failure:
        report.raise_if_failed()
    return report
