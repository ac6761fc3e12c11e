"""Simultaneous layer-parallel training (Günther, Ruthotto, Schroder, Cyr & Gauger 2020).

Exact training solves the state sweep and the adjoint sweep to the end at every
optimisation step. Günther et al. ("simultaneous" or one-shot layer-parallel
training) observe that this is wasteful far from a minimum: each step may run only a
few MGRIT iterations for the states and a few for the adjoints, *warm-started from the
layer-space solution of the previous step*, and update the parameters with the
resulting inexact gradient. As the parameters settle, consecutive problems differ
less, the warm starts get better, and the inexact gradient approaches the exact one.

:class:`SimultaneousGradient` is that gradient as a ``grad_fn`` for
:func:`ptoc.training.train` (:doc:`/theory/simultaneous`)::

    grad = SimultaneousGradient(net, MGRIT(max_iterations=2), comm=4)
    result = train(net, params, data, optimizer=LBFGS(), batch_size=None, grad_fn=grad)
    grad.records[-1]  # residuals, iterations, critical-path steps of the last step

Warm starts are kept for the batch of the previous call: a call on the same samples
(full-batch training, and the line-search evaluations of L-BFGS within one step)
starts MGRIT from the previous states and adjoints; a call on other samples starts
cold (MGRIT's zero initial guess), so simultaneous training is meant for full
batches, as in Günther et al.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from .kernels import Target
from .methods import GradientFunction
from .model import Params, ResNet
from .parallel.comm import is_root
from .parallel.driver import parallel_gradient
from .parallel.mgrit import MGRIT
from .parallel.serial import Serial
from .propagator import Model, as_model
from .sweeps import loss_and_grad

__all__ = ["SimultaneousGradient", "StepRecord"]


@dataclass
class StepRecord:
    """What one inexact gradient cost and how good it was.

    One call of :class:`SimultaneousGradient` (Günther et al. 2020). Theory:
    :doc:`/theory/simultaneous`.

    Attributes
    ----------
    loss : float
        The loss at the (inexact) states.
    forward_residuals, adjoint_residuals : list of float
        MGRIT residual norms after each iteration of the two sweeps.
    warm : bool
        Whether MGRIT started from the previous call's solution.
    steps_critical_path : int
        Layer steps on the critical path of the two sweeps (what a machine with one
        rank per layer range waits for); the layer gradients, ``N/P`` more steps per
        rank after the adjoint sweep, are not included.
    steps_total : int
        Layer steps on all ranks together.
    grad_error : float or None
        ``||g - g_exact|| / ||g_exact||`` (all parameters as one vector) when the exact
        gradient was computed for this call (``exact_every``), else None.
    """

    loss: float
    forward_residuals: list[float]
    adjoint_residuals: list[float]
    warm: bool
    steps_critical_path: int
    steps_total: int
    grad_error: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"loss": self.loss, "forward_residuals": list(self.forward_residuals),
                "adjoint_residuals": list(self.adjoint_residuals), "warm": self.warm,
                "steps_critical_path": self.steps_critical_path,
                "steps_total": self.steps_total, "grad_error": self.grad_error}


def _default_solver() -> MGRIT:
    # two iterations per sweep and step (Günther et al.), stopping earlier only when the
    # residual is at round-off
    return MGRIT(max_iterations=2, tol=1e-13)


@dataclass
class SimultaneousGradient(GradientFunction):
    """``grad_fn(params, X, y) -> (loss, grads)`` from a few warm-started MGRIT iterations.

    Simultaneous (one-shot) layer-parallel training of Günther et al. 2020: each call
    runs ``solver.max_iterations`` MGRIT iterations on the state sweep and on the
    adjoint sweep, warm-started from the previous call's solution on the same batch,
    and returns the resulting inexact gradient. Theory:
    :doc:`/theory/simultaneous`.

    Parameters
    ----------
    network : ResNet or Model
        The network, or any :class:`ptoc.propagator.Model` (the gradient reads it
        through that contract only).
    solver : MGRIT
        The solver of both sweeps; its ``max_iterations`` is the number of MGRIT
        iterations per sweep and optimisation step (default 2, with ``tol=1e-13``).
        Non-convergence within that budget is the point and is not an error; a
        diverging residual still raises :class:`ptoc.parallel.DivergenceError`.
    comm : None, int or Communicator
        Where the sweeps run (see :func:`ptoc.parallel.parallel_gradient`): one
        rank, that many simulated ranks, or e.g. :class:`ptoc.MPIRanks`.
    target : Target or str
        Kernel target.
    exact_every : int
        Also compute the exact (serial) gradient every this many calls and record its
        distance to the inexact one in :attr:`StepRecord.grad_error`; 0 (default) never.

    Attributes
    ----------
    records : list of StepRecord
        One per call, in order.
    deterministic : bool
        False: the warm start makes a call depend on the calls before it, so
        :class:`ptoc.methods.GradientMethod` calls again at the start of every step
        (a second evaluation at the same point is a better one).
    """

    deterministic: ClassVar[bool] = False

    network: ResNet
    solver: MGRIT = field(default_factory=_default_solver)
    comm: Any = None
    target: Target | str = Target.CPU
    exact_every: int = 0
    records: list[StepRecord] = field(default_factory=list, init=False, repr=False)
    _warm: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = field(
        default=None, init=False, repr=False)
    _model: Model | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._model = as_model(self.network)
        if not isinstance(self.solver, MGRIT):
            raise TypeError("simultaneous training runs MGRIT: solver must be ptoc.MGRIT(...), "
                            f"got {self.solver!r}")
        if isinstance(self.exact_every, bool) or not isinstance(self.exact_every, int) \
                or self.exact_every < 0:
            raise ValueError(f"exact_every must be a non-negative integer, got "
                             f"{self.exact_every!r}")
        self.target = Target.parse(self.target)

    @property
    def writes_files(self) -> bool:
        """False on MPI ranks other than 0
        (:attr:`ptoc.methods.TrainingMethod.writes_files`)."""
        return is_root(self.comm)

    def reset(self) -> None:
        """Forget the warm start and the records."""
        self._warm = None
        self.records.clear()

    def config(self) -> dict[str, Any]:
        """Description for checkpoints and model files: the solver, ranks and target."""
        comm = self.comm if self.comm is None or isinstance(self.comm, int) \
            else f"{type(self.comm).__name__}({getattr(self.comm, 'size', '?')})"
        return {"name": "simultaneous", "solver": repr(self.solver), "comm": comm,
                "target": self.target.value}

    def state_dict(self) -> dict[str, Any]:
        """The warm start (batch, layer-space states and adjoints) as a flat dict of
        copies; empty before the first call. Part of a training checkpoint, so that a
        resumed run starts MGRIT from the same guess as an uninterrupted one."""
        if self._warm is None:
            return {}
        X0, y0, states, adjoints = self._warm
        return {"X": X0.copy(), "y": y0.copy(), "states": states.copy(),
                "adjoints": adjoints.copy()}

    def load_state(self, d) -> None:
        """Inverse of :meth:`state_dict` (the records are not part of it)."""
        if not d:
            self._warm = None
            return
        missing = {"X", "y", "states", "adjoints"} - set(d)
        if missing:
            raise ValueError(f"the saved warm start lacks {sorted(missing)}")
        self._warm = tuple(np.array(d[k], copy=True) for k in ("X", "y", "states", "adjoints"))

    def _exact(self, params, X, y):
        """The exact gradient: the serial sweeps (compiled, for a ResNet)."""
        if isinstance(self.network, ResNet):
            return loss_and_grad(self.network, params, X, y, target=self.target)
        result = parallel_gradient(self._model, params, X, y, Serial(), target=self.target,
                                   keep_states=False)
        return result.loss, result.grads

    def _guess(self, X: np.ndarray, y: np.ndarray):
        if self._warm is None:
            return None, None
        X0, y0, states, adjoints = self._warm
        if X0.shape == X.shape and np.array_equal(X0, X) and np.array_equal(y0, y):
            return states, adjoints
        return None, None

    def __call__(self, params: Params, X: np.ndarray, y: np.ndarray) -> tuple[float, Params]:
        params = self._model.check_params(params)
        states, adjoints = self._guess(X, y)
        result = parallel_gradient(self.network, params, X, y, self.solver, comm=self.comm,
                                   target=self.target, initial_states=states,
                                   initial_adjoints=adjoints, keep_states=True)
        self._warm = (np.array(X, copy=True), np.array(y, copy=True), result.states,
                      result.adjoints)
        error = None
        if self.exact_every and len(self.records) % self.exact_every == 0:
            _, exact = self._exact(params, X, y)
            num = math.sqrt(sum(float(np.sum((result.grads[k] - exact[k]) ** 2))
                                for k in exact))
            den = math.sqrt(sum(float(np.sum(exact[k] ** 2)) for k in exact))
            error = num / den if den > 0 else num
        fwd, adj = result.forward, result.adjoint
        self.records.append(StepRecord(
            loss=float(result.loss), forward_residuals=list(fwd.residuals),
            adjoint_residuals=list(adj.residuals), warm=states is not None,
            steps_critical_path=fwd.steps_critical_path + adj.steps_critical_path,
            steps_total=fwd.steps_total + adj.steps_total, grad_error=error))
        return float(result.loss), result.grads
