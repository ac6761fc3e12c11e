"""First-order optimisers with an explicit, checkpointable state.

An optimiser is a small frozen dataclass holding its hyper-parameters only. Its
state lives in a separate object that the caller threads through the updates::

    opt = Adam(lr=1e-2)
    state = opt.init(params)
    for step in ...:
        loss, grads = ptoc.loss_and_grad(network, params, X, y)
        params, state = opt.update(params, grads, state)

:meth:`update` is pure: it returns new parameters and a new state and never
modifies its arguments. It works on a :class:`ptoc.Params` (every key: ``K, b,
[K_in, b_in,] W, mu``) or on any mapping of NumPy arrays, and returns the same
kind of container it was given. State arrays have the dtype of the parameters.

Checkpointing. :meth:`state_dict` turns a state into a flat ``dict`` of NumPy
arrays and scalars (keys such as ``"step"``, ``"m.K"``, ``"v.W"``), which
:func:`numpy.savez` can store; :meth:`load_state` accepts that dict back, also in
the form :func:`numpy.load` returns it (0-d arrays in place of scalars), and
rebuilds the state exactly, so that a resumed run continues bit for bit.
Hyper-parameters are not part of the state; :meth:`config` and
:func:`make_optimizer` store and rebuild them.

Room for second-order methods: :meth:`update` takes an optional ``closure``, a
callable ``closure(params) -> (loss, grads)`` evaluating the objective and its
gradient at other parameters (L-BFGS needs it for its line search). SGD and Adam
ignore it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar, TypeVar

import numpy as np

from .model import Params

__all__ = [
    "OPTIMISERS",
    "SGD",
    "Adam",
    "AdamState",
    "Closure",
    "Optimizer",
    "SGDState",
    "make_optimizer",
]

P = TypeVar("P", bound=Mapping)

#: ``closure(params) -> (loss, grads)``: the objective and its gradient at ``params``.
Closure = Callable[[Any], tuple[float, Any]]


# --- validation -----------------------------------------------------------------------------

def _real(name: str, value: object) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a real number, got {value!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return v


def _positive(name: str, value: object) -> float:
    v = _real(name, value)
    if v <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return v


def _unit_interval(name: str, value: object) -> float:
    v = _real(name, value)
    if not 0.0 <= v < 1.0:
        raise ValueError(f"{name} must satisfy 0 <= {name} < 1, got {value!r}")
    return v


# --- helpers on mappings of arrays -------------------------------------------------------------

def _check_pair(params: Mapping, grads: Mapping) -> None:
    if set(params) != set(grads):
        raise ValueError(
            f"grads has keys {sorted(grads)} but params has keys {sorted(params)}"
        )
    for k in params:
        p, g = np.shape(params[k]), np.shape(grads[k])
        if p != g:
            raise ValueError(f"grads[{k!r}] has shape {g}, expected {p} (the shape of params)")


def _rebuild(like: Mapping, values: dict[str, np.ndarray]):
    """A container of the same kind as ``like`` (Params or dict) holding ``values``."""
    if isinstance(like, Params):
        return Params.from_dict(values)
    return values


def _zeros_like(params: Mapping) -> dict[str, np.ndarray]:
    return {k: np.zeros_like(np.asarray(v)) for k, v in params.items()}


def _check_state_arrays(name: str, arrays: Mapping, params: Mapping) -> None:
    if set(arrays) != set(params):
        raise ValueError(
            f"optimiser state {name!r} has keys {sorted(arrays)} but params has "
            f"keys {sorted(params)}; was the state made for other parameters?"
        )
    for k in params:
        if np.shape(arrays[k]) != np.shape(params[k]):
            raise ValueError(
                f"optimiser state {name}[{k!r}] has shape {np.shape(arrays[k])}, "
                f"expected {np.shape(params[k])}"
            )


def _scalar(d: Mapping, key: str) -> Any:
    if key not in d:
        raise ValueError(f"optimiser state dict has no {key!r} entry")
    value = np.asarray(d[key])
    if value.shape != ():
        raise ValueError(f"optimiser state dict entry {key!r} must be a scalar")
    return value.item()


def _group(d: Mapping, prefix: str) -> dict[str, np.ndarray]:
    head = prefix + "."
    return {k[len(head):]: np.array(v, copy=True) for k, v in d.items() if k.startswith(head)}


def _check_name(d: Mapping, name: str) -> None:
    got = _scalar(d, "optimizer")
    if got != name:
        raise ValueError(f"this is the state of a {got!r} optimiser, not of {name!r}")


# --- the optimisers ---------------------------------------------------------------------------

class Optimizer:
    """Common interface of the optimisers (see the module docstring).

    Subclasses are frozen dataclasses of hyper-parameters and implement
    :meth:`init`, :meth:`update`, :meth:`state_dict` and :meth:`load_state`.
    """

    name: ClassVar[str] = ""

    def init(self, params: Mapping) -> Any:  # pragma: no cover - interface
        raise NotImplementedError

    def update(self, params: P, grads: Mapping, state: Any,
               closure: Closure | None = None) -> tuple[P, Any]:  # pragma: no cover
        raise NotImplementedError

    def state_dict(self, state: Any) -> dict[str, Any]:  # pragma: no cover - interface
        raise NotImplementedError

    def load_state(self, d: Mapping[str, Any]) -> Any:  # pragma: no cover - interface
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """Name and hyper-parameters as a JSON-serialisable dict (see :func:`make_optimizer`)."""
        out: dict[str, Any] = {"name": self.name}
        out.update({f.name: getattr(self, f.name) for f in fields(self)})  # type: ignore[arg-type]
        return out


@dataclass(frozen=True)
class SGDState:
    """State of :class:`SGD`: the number of updates made and the velocity (or None)."""

    step: int
    velocity: dict[str, np.ndarray] | None


@dataclass(frozen=True)
class SGD(Optimizer):
    r"""Stochastic gradient descent, optionally with (Nesterov) momentum.

    With gradient ``g_t`` of step ``t = 1, 2, ...``, velocity ``v_0 = 0`` and momentum
    ``mu``::

        v_t         = mu v_{t-1} + g_t
        theta_t     = theta_{t-1} - lr v_t                  (heavy ball)
        theta_t     = theta_{t-1} - lr (g_t + mu v_t)       (nesterov=True)

    With ``momentum=0`` this is plain ``theta_t = theta_{t-1} - lr g_t`` and no
    velocity is stored. (These are the equations of PyTorch's ``SGD`` without
    dampening or weight decay; ptoc's regulariser is part of the objective.)

    Parameters
    ----------
    lr : float
        Learning rate, finite and > 0.
    momentum : float
        ``0 <= momentum < 1``.
    nesterov : bool
        Nesterov's variant (needs ``momentum > 0``).

    Raises
    ------
    ValueError
        For a hyper-parameter out of range; the message names it.
    """

    lr: float = 1e-2
    momentum: float = 0.0
    nesterov: bool = False

    name: ClassVar[str] = "sgd"

    def __post_init__(self) -> None:
        object.__setattr__(self, "lr", _positive("lr", self.lr))
        object.__setattr__(self, "momentum", _unit_interval("momentum", self.momentum))
        if not isinstance(self.nesterov, (bool, np.bool_)):
            raise ValueError(f"nesterov must be True or False, got {self.nesterov!r}")
        object.__setattr__(self, "nesterov", bool(self.nesterov))
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov=True needs momentum > 0")

    def init(self, params: Mapping) -> SGDState:
        """Initial state: step 0 and a zero velocity (None without momentum)."""
        return SGDState(0, _zeros_like(params) if self.momentum > 0 else None)

    def update(self, params: P, grads: Mapping, state: SGDState,
               closure: Closure | None = None) -> tuple[P, SGDState]:
        """One SGD step; returns ``(new_params, new_state)``, leaving the inputs untouched.

        Parameters
        ----------
        params : Params or mapping of arrays
            Current parameters ``theta_{t-1}``.
        grads : mapping of arrays
            Gradient ``g_t`` at ``params``, same keys and shapes.
        state : SGDState
            From :meth:`init` or the previous :meth:`update`.
        closure : callable, optional
            Ignored (accepted for interface compatibility with line-search methods).
        """
        _check_pair(params, grads)
        lr, mu = self.lr, self.momentum
        new: dict[str, np.ndarray] = {}
        if mu == 0:
            for k, p in params.items():
                p = np.asarray(p)
                new[k] = p - lr * np.asarray(grads[k], dtype=p.dtype)
            return _rebuild(params, new), SGDState(state.step + 1, None)
        if state.velocity is None:
            raise ValueError("the SGD state has no velocity; make it with init() of an "
                             "optimiser with momentum > 0")
        _check_state_arrays("velocity", state.velocity, params)
        velocity: dict[str, np.ndarray] = {}
        for k, p in params.items():
            p = np.asarray(p)
            g = np.asarray(grads[k], dtype=p.dtype)
            v = mu * state.velocity[k] + g
            velocity[k] = v
            new[k] = p - lr * (g + mu * v) if self.nesterov else p - lr * v
        return _rebuild(params, new), SGDState(state.step + 1, velocity)

    def state_dict(self, state: SGDState) -> dict[str, Any]:
        """Flat dict: ``optimizer`` (``"sgd"``), ``step`` and ``velocity.<key>`` arrays (copies)."""
        d: dict[str, Any] = {"optimizer": self.name, "step": np.int64(state.step)}
        if state.velocity is not None:
            d.update({f"velocity.{k}": v.copy() for k, v in state.velocity.items()})
        return d

    def load_state(self, d: Mapping[str, Any]) -> SGDState:
        """Inverse of :meth:`state_dict` (also accepts what ``np.load`` returns)."""
        _check_name(d, self.name)
        velocity = _group(d, "velocity") or None
        if self.momentum > 0 and velocity is None:
            raise ValueError("the saved SGD state has no velocity but momentum > 0")
        return SGDState(int(_scalar(d, "step")), velocity)


@dataclass(frozen=True)
class AdamState:
    """State of :class:`Adam`: step count ``t`` and the moment estimates ``m``, ``v``."""

    step: int
    m: dict[str, np.ndarray]
    v: dict[str, np.ndarray]


@dataclass(frozen=True)
class Adam(Optimizer):
    r"""Adam (Kingma & Ba 2015).

    With gradient ``g_t`` of step ``t = 1, 2, ...`` and ``m_0 = v_0 = 0``
    (element-wise operations)::

        m_t     = beta1 m_{t-1} + (1 - beta1) g_t
        v_t     = beta2 v_{t-1} + (1 - beta2) g_t^2
        m_hat   = m_t / (1 - beta1^t),    v_hat = v_t / (1 - beta2^t)
        theta_t = theta_{t-1} - lr m_hat / (sqrt(v_hat) + eps)

    Parameters
    ----------
    lr : float
        Learning rate, finite and > 0.
    beta1, beta2 : float
        Decay rates of the moment estimates, ``0 <= beta < 1``.
    eps : float
        Denominator offset, finite and > 0.

    Raises
    ------
    ValueError
        For a hyper-parameter out of range; the message names it.
    """

    lr: float = 1e-2
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    name: ClassVar[str] = "adam"

    def __post_init__(self) -> None:
        object.__setattr__(self, "lr", _positive("lr", self.lr))
        object.__setattr__(self, "beta1", _unit_interval("beta1", self.beta1))
        object.__setattr__(self, "beta2", _unit_interval("beta2", self.beta2))
        object.__setattr__(self, "eps", _positive("eps", self.eps))

    def init(self, params: Mapping) -> AdamState:
        """Initial state: ``t = 0``, ``m = v = 0``."""
        return AdamState(0, _zeros_like(params), _zeros_like(params))

    def update(self, params: P, grads: Mapping, state: AdamState,
               closure: Closure | None = None) -> tuple[P, AdamState]:
        """One Adam step; returns ``(new_params, new_state)``, leaving the inputs untouched.

        Parameters
        ----------
        params : Params or mapping of arrays
            Current parameters ``theta_{t-1}``.
        grads : mapping of arrays
            Gradient ``g_t`` at ``params``, same keys and shapes.
        state : AdamState
            From :meth:`init` or the previous :meth:`update`.
        closure : callable, optional
            Ignored (accepted for interface compatibility with line-search methods).
        """
        _check_pair(params, grads)
        _check_state_arrays("m", state.m, params)
        _check_state_arrays("v", state.v, params)
        b1, b2 = self.beta1, self.beta2
        t = state.step + 1
        c1 = 1.0 - b1**t
        c2 = 1.0 - b2**t
        new, m_new, v_new = {}, {}, {}
        for k, p in params.items():
            p = np.asarray(p)
            g = np.asarray(grads[k], dtype=p.dtype)
            m = b1 * state.m[k] + (1.0 - b1) * g
            v = b2 * state.v[k] + (1.0 - b2) * (g * g)
            m_hat = m / c1
            v_hat = v / c2
            new[k] = p - self.lr * m_hat / (np.sqrt(v_hat) + self.eps)
            m_new[k], v_new[k] = m, v
        return _rebuild(params, new), AdamState(t, m_new, v_new)

    def state_dict(self, state: AdamState) -> dict[str, Any]:
        """Flat dict: ``optimizer`` (``"adam"``), ``step``, ``m.<key>`` and ``v.<key>`` (copies)."""
        d: dict[str, Any] = {"optimizer": self.name, "step": np.int64(state.step)}
        d.update({f"m.{k}": a.copy() for k, a in state.m.items()})
        d.update({f"v.{k}": a.copy() for k, a in state.v.items()})
        return d

    def load_state(self, d: Mapping[str, Any]) -> AdamState:
        """Inverse of :meth:`state_dict` (also accepts what ``np.load`` returns)."""
        _check_name(d, self.name)
        m, v = _group(d, "m"), _group(d, "v")
        if set(m) != set(v):
            raise ValueError("the saved Adam state has different keys for m and v")
        return AdamState(int(_scalar(d, "step")), m, v)


#: Optimisers by name, for the command line and for :func:`make_optimizer`.
OPTIMISERS: dict[str, type[Optimizer]] = {"sgd": SGD, "adam": Adam}


def make_optimizer(name: str, **hyper: Any) -> Optimizer:
    """Build an optimiser by name: ``make_optimizer("adam", lr=1e-3)``.

    ``make_optimizer(**opt.config())`` rebuilds ``opt``.

    Raises
    ------
    ValueError
        For an unknown name (the message lists the valid ones) or an unknown or
        out-of-range hyper-parameter.
    """
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in OPTIMISERS:
        valid = ", ".join(repr(k) for k in OPTIMISERS)
        raise ValueError(f"unknown optimizer {name!r}; valid optimizers are {valid}")
    cls = OPTIMISERS[key]
    allowed = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(hyper) - allowed)
    if unknown:
        raise ValueError(f"{key} has no option(s) {unknown}; its options are {sorted(allowed)}")
    return cls(**hyper)
