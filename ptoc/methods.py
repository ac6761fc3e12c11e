"""Training methods: what one optimisation step on a batch does.

:func:`ptoc.training.train` owns the loop (batches, evaluation, history, divergence
checks, checkpoints, progress); a :class:`TrainingMethod` owns the step. A method is
a small object of options with an explicit state that the loop threads through::

    state = method.init(network, params)
    for each batch (X, y):
        outcome = method.step(network, params, state, X, y)
        params, state = outcome.params, outcome.state

The methods (theory: :doc:`/theory/msa`, :doc:`/theory/simultaneous`,
:doc:`/theory/pgcl`, :doc:`/theory/node`):

* :class:`GradientMethod`: an optimiser (:mod:`ptoc.optim`) on a gradient. The
  gradient comes from ``grad_fn(params, X, y) -> (loss, grads)``: the exact serial
  adjoint by default; :class:`ptoc.simultaneous.SimultaneousGradient` (a few
  warm-started MGRIT iterations, Günther et al.) or a parareal neural ODE gradient
  plug in here.
* Hamiltonian methods (MSA, E-MSA, discrete weights; Li & Hao) and predict-globally-
  correct-locally (Parpas & Muir) subclass :class:`TrainingMethod` directly.

Checkpoints. :meth:`TrainingMethod.state_dict` turns a state into a flat dict of
NumPy arrays and scalars that :func:`numpy.savez` stores; :meth:`load_state` takes
that dict back (also as :func:`numpy.load` returns it) and rebuilds the state
exactly, so a resumed run continues bit for bit. A method whose ``grad_fn`` or
helper keeps memory between steps (a warm start) must put it in the state dict.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from enum import Enum
from typing import Any, ClassVar

import numpy as np

from . import sweeps
from ._checks import scalar_entry
from .kernels import Target
from .model import Params, ResNet
from .optim import SGD, Adam, Optimizer
from .parallel.driver import parallel_gradient
from .parallel.serial import Serial
from .propagator import Model, as_model
from .sweeps import loss_and_grad

__all__ = [
    "GradientFunction",
    "GradientMethod",
    "StepOutcome",
    "TrainingDivergedError",
    "TrainingMethod",
    "check_finite_step",
    "group_state",
    "model_loss",
]


class TrainingDivergedError(RuntimeError):
    """Raised by a method's :meth:`~TrainingMethod.step` when something it computed is
    not finite; :func:`ptoc.training.train` stops, keeps the last good parameters and
    reports the message."""


def model_loss(network: ResNet | Model, params: Mapping[str, np.ndarray], X: np.ndarray,
               y: np.ndarray, *, target: Target | str = Target.CPU) -> float:
    """The objective ``J = Phi(x_N) + R`` of any model, read through the
    :class:`ptoc.propagator.Model` contract (one forward sweep, no gradient).

    ``X`` and ``y`` must be validated already (the model's ``check_inputs``).
    """
    model = as_model(network)
    x0 = model.opening(params, X)[0]
    xN = model.layers(params, target=target).propagate(x0)
    return float(model.terminal(params, xN, y)[0]) + float(model.regulariser(params))

def check_finite_step(value: float, grads: Mapping[str, np.ndarray]) -> None:
    """Raise :class:`TrainingDivergedError` naming a non-finite loss or the first key of
    ``grads`` with a non-finite entry (what every method checks before it updates)."""
    if not np.isfinite(value):
        raise TrainingDivergedError(f"non-finite loss ({value})")
    for k, g in grads.items():
        if not np.all(np.isfinite(g)):
            raise TrainingDivergedError(f"non-finite gradient of {k!r}")


@dataclass
class StepOutcome:
    """What one :meth:`TrainingMethod.step` returns.

    Attributes
    ----------
    loss : float
        The objective ``J`` on the batch at the parameters *before* the step.
    params : Params
        The parameters after the step.
    state : object
        The method's state after the step.
    info : dict
        Optional per-step numbers (e.g. residuals, layer steps), for logging.
    """

    loss: float
    params: Params
    state: Any
    info: dict[str, Any] = field(default_factory=dict)


def check_gradient_optimizer(name: str, value: Any) -> Optimizer:
    """``value`` when it is an optimiser that takes one gradient step per update
    (:class:`~ptoc.optim.SGD` or :class:`~ptoc.optim.Adam`), as the methods whose parts
    update apart need (L-BFGS needs the global objective); else ``ValueError``."""
    if not isinstance(value, (SGD, Adam)):
        raise ValueError(f"{name} must be ptoc.optim.SGD or ptoc.optim.Adam (a one-gradient "
                         f"step; L-BFGS needs the global objective), got "
                         f"{type(value).__name__}")
    return value


class TrainingMethod:
    """Interface of a training method (see the module docstring).

    Subclasses implement :meth:`init`, :meth:`step`, :meth:`state_dict`,
    :meth:`load_state` and :meth:`config`; :meth:`metrics` is optional.
    """

    #: Short name, as used by ``ptoc train --method``.
    name: ClassVar[str] = ""

    def init(self, network: ResNet, params: Params) -> Any:  # pragma: no cover - interface
        """The state before the first step."""
        raise NotImplementedError

    def step(self, network: ResNet, params: Params, state: Any, X: np.ndarray,
             y: np.ndarray) -> StepOutcome:  # pragma: no cover - interface
        """One optimisation step on the batch ``(X, y)``.

        Must not modify ``params`` or ``state`` in place. Raises
        :class:`TrainingDivergedError` when a computed quantity is not finite.
        """
        raise NotImplementedError

    def state_dict(self, state: Any) -> dict[str, Any]:  # pragma: no cover - interface
        """Flat dict of arrays and scalars (copies) describing ``state``."""
        raise NotImplementedError

    def load_state(self, d: Mapping[str, Any], network: ResNet,
                   params: Params) -> Any:  # pragma: no cover - interface
        """Inverse of :meth:`state_dict`."""
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """JSON-serialisable description (name and options), stored with checkpoints.

        The default, for a method that is a dataclass: its name and every option it
        takes (``init`` fields), an option enum by its value, an optimiser by its own
        :meth:`~ptoc.optim.Optimizer.config`.
        """
        if not is_dataclass(self):  # pragma: no cover - interface
            raise NotImplementedError(f"{type(self).__name__} must implement config()")
        out: dict[str, Any] = {"name": self.name}
        for f in fields(self):
            if f.init:
                v = getattr(self, f.name)
                out[f.name] = (v.value if isinstance(v, Enum) else
                               v.config() if isinstance(v, Optimizer) else v)
        return out

    def check_state_name(self, d: Mapping[str, Any], required: bool = True) -> None:
        """Raise ``ValueError`` unless the state dict ``d`` (from :meth:`state_dict`) is of
        this method: its ``"method"`` entry is :attr:`name` (absent allowed when not
        ``required``)."""
        if not required and "method" not in d:
            return
        name = scalar_entry(d, "method", "method state dict")
        if name != self.name:
            raise ValueError(f"this is the state of method {name!r}, not of {self.name!r}")

    def evaluator(self) -> Callable[[Params, np.ndarray, np.ndarray],
                                    tuple[float, float]] | None:
        """``evaluate(params, X, y) -> (J, accuracy)`` of the model this method trains, when
        it is not the ResNet of :doc:`/theory/resnet` (e.g. a neural ODE); None (the
        default) means the ResNet's own :func:`ptoc.loss` and :func:`ptoc.accuracy`."""
        return None

    def metrics(self, network: ResNet, params: Params, state: Any) -> dict[str, float]:
        """Extra per-epoch numbers for the history (e.g. the fraction of nonzero
        weights); none by default."""
        return {}

    @property
    def writes_files(self) -> bool:
        """Whether this process writes the run's checkpoint, model, history and plot
        (and shows progress). Every rank of an MPI run computes the same result; only
        rank 0 writes it. True by default."""
        return True


def group_state(d: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """Entries of a flat state dict under ``prefix + "."``, with the prefix removed."""
    start = prefix + "."
    return {k[len(start):]: v for k, v in d.items() if k.startswith(start)}


def _same_arrays(a: Mapping, b: Mapping) -> bool:
    """Same keys, and arrays of the same dtype, shape and values (NaN never matches)."""
    if list(a) != list(b):
        return False
    for k in a:
        u, v = np.asarray(a[k]), np.asarray(b[k])
        if u.dtype != v.dtype or not np.array_equal(u, v):
            return False
    return True


@dataclass(frozen=True)
class _Evaluation:
    """A deterministic gradient evaluation ``(loss, grads)`` at ``params`` on the batch
    ``(X, y)`` of ``network`` (copies), kept by :class:`GradientMethod` for reuse."""

    network: ResNet
    params: dict[str, np.ndarray]
    X: np.ndarray
    y: np.ndarray
    loss: float
    grads: Params

    @classmethod
    def find(cls, evaluations, network, params, X, y) -> _Evaluation | None:
        """The newest of ``evaluations`` (``(params, loss, grads)`` triples) made at exactly
        ``params``, as an :class:`_Evaluation`; None if there is none."""
        for p, loss, grads in reversed(evaluations):
            if _same_arrays(p, params):  # grads: Params, as _gradient returns them
                return cls(network, {k: np.array(v, copy=True) for k, v in params.items()},
                           np.array(X, copy=True), np.array(y, copy=True), loss,
                           grads.copy())
        return None

    def matches(self, network, params, X, y) -> bool:
        """Whether this evaluation was made for these arguments (compared by value)."""
        X, y = np.asarray(X), np.asarray(y)
        return (network == self.network and X.dtype == self.X.dtype
                and y.dtype == self.y.dtype and np.array_equal(X, self.X)
                and np.array_equal(y, self.y) and _same_arrays(params, self.params))


class GradientFunction:
    """The contract of a gradient that :class:`GradientMethod` steps on.

    A gradient function is called as ``fn(params, X, y) -> (loss, grads)`` and declares
    what the training loop may rely on; the defaults suit a plain function:

    * :attr:`deterministic` (False): the result is a pure function of (parameters,
      batch), so the line search's evaluation at the accepted point may be reused;
    * :attr:`writes_files` (True): this process writes the run's files (False on MPI
      ranks other than 0);
    * :meth:`state_dict` / :meth:`load_state`: memory between calls (a warm start) that
      belongs in a training checkpoint (default: none);
    * :meth:`config`: a JSON-serialisable description (default ``"custom"``);
    * :meth:`evaluator`: a function ``(params, X, y) -> (J, accuracy)`` the loop should
      report with instead of the network's own sweep, or None (default);
    * :meth:`value`: the objective alone, for a line search whose trials need no
      gradient (``LBFGS(value_only_trials=True)``); default: the loss of a full call.

    :class:`ptoc.simultaneous.SimultaneousGradient` and
    :class:`ptoc.node.NeuralODEGradient` derive from it; any other callable is wrapped
    by :meth:`of`, which reads the optional attributes above from it once.
    """

    deterministic: bool = False

    def __call__(self, params: Params, X: np.ndarray,
                 y: np.ndarray) -> tuple[float, Params | Mapping[str, np.ndarray]]:
        raise NotImplementedError(f"{type(self).__name__} does not define __call__")

    @property
    def writes_files(self) -> bool:
        return True

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state(self, d: Mapping[str, Any]) -> None:
        return None

    def config(self) -> Any:
        return "custom"

    def evaluator(self) -> Callable[..., tuple[float, float]] | None:
        return None

    def value(self, params: Params, X: np.ndarray, y: np.ndarray) -> float:
        """The objective at ``params`` on the batch, without the gradient (default: the
        loss of a full call, its gradient discarded)."""
        return float(self(params, X, y)[0])

    @staticmethod
    def of(fn: Any) -> GradientFunction:
        """``fn`` itself if it is a :class:`GradientFunction`, else ``fn`` wrapped."""
        if isinstance(fn, GradientFunction):
            return fn
        if not callable(fn):
            raise TypeError("grad_fn must be callable: grad_fn(params, X, y) -> (loss, grads)")
        return _CallableGradient(fn)


class _CallableGradient(GradientFunction):
    """A user's callable as a :class:`GradientFunction`: the optional abilities are
    those of the callable's attributes of the same names, where it has them."""

    def __init__(self, fn: Callable[..., Any]):
        self.fn = fn

    def __call__(self, params, X, y):
        return self.fn(params, X, y)

    @property
    def deterministic(self) -> bool:  # type: ignore[override]
        return getattr(self.fn, "deterministic", False) is True

    @property
    def writes_files(self) -> bool:
        return bool(getattr(self.fn, "writes_files", True))

    def state_dict(self) -> dict[str, Any]:
        saver = getattr(self.fn, "state_dict", None)
        return dict(saver()) if callable(saver) else {}

    def load_state(self, d: Mapping[str, Any]) -> None:
        loader = getattr(self.fn, "load_state", None)
        if callable(loader):
            loader(d)

    def config(self) -> Any:
        describe = getattr(self.fn, "config", None)
        return describe() if callable(describe) else "custom"

    def evaluator(self):
        evaluate = getattr(self.fn, "evaluate", None)
        return evaluate if callable(evaluate) else None

    def value(self, params, X, y) -> float:
        value = getattr(self.fn, "value", None)
        return float(value(params, X, y)) if callable(value) else super().value(params, X, y)


@dataclass
class GradientMethod(TrainingMethod):
    """``params <- optimizer.update(params, grad_fn(params, X, y))``.

    The gradient is the exact discrete adjoint by default (a ResNet's compiled sweeps;
    for any other :class:`ptoc.propagator.Model`, the serial sweep of its propagator,
    :func:`ptoc.parallel.parallel_gradient` with :class:`ptoc.Serial`), or an inexact
    layer-parallel one: simultaneous training (Günther et al. 2020) or the parareal
    neural ODE (Lorin 2020). Theory:
    :doc:`/theory/adjoint`, :doc:`/theory/simultaneous`, :doc:`/theory/node`.

    Parameters
    ----------
    optimizer : Optimizer
        :class:`ptoc.optim.SGD`, :class:`~ptoc.optim.Adam` or
        :class:`~ptoc.optim.LBFGS` (whose line search evaluates ``grad_fn`` again on
        the same batch).
    grad_fn : callable, optional
        ``grad_fn(params, X, y) -> (loss, grads)``; default the exact serial adjoint
        :func:`ptoc.loss_and_grad` on ``target``. If it has ``state_dict()`` and
        ``load_state(d)`` methods (as :class:`ptoc.simultaneous.SimultaneousGradient`
        does for its warm start), its memory is part of the checkpoint.
    target : Target or str
        Kernel target of the default ``grad_fn``.

    Notes
    -----
    One gradient per step. With ``LBFGS(value_only_trials=True)`` the line search
    evaluates only the objective at its trial points (:meth:`GradientFunction.value`:
    for :class:`ptoc.simultaneous.SimultaneousGradient` a warm-started state sweep, for
    the exact gradient :func:`ptoc.loss`), so a step costs one gradient evaluation, at
    its start, and one objective evaluation per trial, as in Günther et al.'s reference
    code. :attr:`StepOutcome.info` counts both (``gradient_evaluations``,
    ``objective_evaluations``).

    Reusing the line search's last evaluation. :class:`~ptoc.optim.LBFGS` evaluates
    the gradient at the point it accepts (for its curvature pair), and the next step
    starts from that point. When the gradient is *deterministic* (same parameters and
    batch, same bits, and no memory the result depends on) and the next batch is the
    same (full-batch training), that evaluation is reused instead of repeated: one
    gradient evaluation fewer per step, with results identical bit for bit. It holds
    for the default exact gradient and for a ``grad_fn`` with the attribute
    ``deterministic = True`` (as :class:`ptoc.node.NeuralODEGradient` has); a
    ``grad_fn`` without it (e.g. :class:`ptoc.simultaneous.SimultaneousGradient`,
    whose warm start makes a second evaluation at the same point a better one) is
    evaluated afresh at the start of every step. The reused evaluation is matched by
    value (network, parameters, batch) and is a cache, not part of the state: a
    resumed run evaluates once afresh and continues bit for bit.
    """

    name: ClassVar[str] = "gradient"

    optimizer: Optimizer = field(default_factory=lambda: Adam(lr=3e-3))
    grad_fn: Callable[[Params, np.ndarray, np.ndarray], tuple[float, Any]] | None = None
    target: Target | str = Target.CPU
    #: the last evaluation of a deterministic gradient at the parameters a step returned
    _reuse: _Evaluation | None = field(default=None, init=False, repr=False, compare=False)
    #: grad_fn as a GradientFunction (None: the exact gradient)
    _fn: GradientFunction | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def deterministic(self) -> bool:
        """Whether the gradient is a pure function of (parameters, batch): the default
        exact gradient, or a ``grad_fn`` that declares it
        (:attr:`GradientFunction.deterministic`)."""
        return self._fn is None or self._fn.deterministic is True

    @property
    def writes_files(self) -> bool:
        """False on the MPI ranks other than 0 of a ``grad_fn`` that says so (as
        :class:`ptoc.simultaneous.SimultaneousGradient` does)."""
        return self._fn is None or bool(self._fn.writes_files)

    def __post_init__(self) -> None:
        if not isinstance(self.optimizer, Optimizer):
            raise TypeError(f"optimizer must be a ptoc.optim optimiser (SGD, Adam, LBFGS), "
                            f"got {type(self.optimizer).__name__}")
        self._fn = None if self.grad_fn is None else GradientFunction.of(self.grad_fn)
        self.target = Target.parse(self.target)

    def _objective(self, network: ResNet | Model, params: Params, X: np.ndarray,
                   y: np.ndarray) -> float:
        """The objective alone (a line-search trial of ``LBFGS(value_only_trials=True)``)."""
        if self._fn is None:
            if not isinstance(network, ResNet):
                return model_loss(network, params, X, y, target=self.target)
            return sweeps.loss(network, params, X, y, target=self.target)
        return self._fn.value(params, X, y)

    def _gradient(self, network: ResNet | Model, params: Params, X: np.ndarray,
                  y: np.ndarray) -> tuple[float, Params]:
        if self._fn is None:
            if not isinstance(network, ResNet):
                result = parallel_gradient(network, params, X, y, Serial(), target=self.target,
                                           keep_states=False)
                return result.loss, result.grads
            return loss_and_grad(network, params, X, y, target=self.target)
        value, grads = self._fn(params, X, y)
        if isinstance(network, ResNet) and not isinstance(grads, Params) \
                and isinstance(grads, Mapping):
            grads = Params.from_dict(grads)
        return value, grads

    def init(self, network: ResNet, params: Params) -> Any:
        return self.optimizer.init(params)

    def evaluator(self):
        """The ``grad_fn``'s evaluator (:meth:`GradientFunction.evaluator`; a neural ODE's),
        else None."""
        return None if self._fn is None else self._fn.evaluator()

    def step(self, network: ResNet, params: Params, state: Any, X: np.ndarray,
             y: np.ndarray) -> StepOutcome:
        reuse, self._reuse = self._reuse, None
        counts = {"gradient_evaluations": 0, "objective_evaluations": 0}
        if reuse is not None and reuse.matches(network, params, X, y):
            value, grads = reuse.loss, reuse.grads
        else:
            value, grads = self._gradient(network, params, X, y)
            counts["gradient_evaluations"] += 1
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise TypeError(f"grad_fn must return (loss, grads) with a real loss, "
                            f"got {type(value).__name__}") from None
        check_finite_step(value, grads)

        remember = self.deterministic
        evaluations = [(params, value, grads)]

        def closure(p):
            out = self._gradient(network, p, X, y)
            counts["gradient_evaluations"] += 1
            if remember:
                evaluations.append((p, *out))
            return out

        def objective(p):
            counts["objective_evaluations"] += 1
            return self._objective(network, p, X, y)

        new_params, new_state = self.optimizer.update(params, grads, state, closure=closure,
                                                      loss=value, objective=objective)
        if remember:
            self._reuse = _Evaluation.find(evaluations, network, new_params, X, y)
        return StepOutcome(value, new_params, new_state, info=counts)

    def state_dict(self, state: Any) -> dict[str, Any]:
        d = {f"optimizer.{k}": v for k, v in self.optimizer.state_dict(state).items()}
        if self._fn is not None:
            d.update({f"grad_fn.{k}": v for k, v in self._fn.state_dict().items()})
        return d

    def load_state(self, d: Mapping[str, Any], network: ResNet, params: Params) -> Any:
        if self._fn is not None:
            self._fn.load_state(group_state(d, "grad_fn"))
        return self.optimizer.load_state(group_state(d, "optimizer"))

    def config(self) -> dict[str, Any]:
        # a user's function cannot describe itself: it is "custom", and resuming trusts
        # the caller to pass the same one
        grad = "exact" if self._fn is None else self._fn.config()
        return {"name": self.name, "optimizer": self.optimizer.config(), "gradient": grad}
