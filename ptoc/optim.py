"""Optimisers with an explicit, checkpointable state: SGD, Adam and L-BFGS.

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
gradient at other parameters, and an optional ``loss``, the objective at
``params`` that came with ``grads``, and an optional ``objective``, a callable
``objective(params) -> loss`` evaluating the objective alone. :class:`LBFGS` requires
the closure (for its line search) and, given ``loss``, does not evaluate the closure
at ``params`` again; with ``value_only_trials=True`` its line search calls
``objective`` instead (Günther et al.'s reference code). SGD and Adam ignore all three.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar, TypeVar

import numpy as np

from ._checks import check_integer, check_real, scalar_entry
from .model import Params

__all__ = [
    "LBFGS",
    "OPTIMISERS",
    "SGD",
    "Adam",
    "AdamState",
    "Closure",
    "LBFGSState",
    "Objective",
    "Optimizer",
    "SGDState",
    "lbfgs_two_loop",
    "make_optimizer",
]

P = TypeVar("P", bound=Mapping)

#: ``closure(params) -> (loss, grads)``: the objective and its gradient at ``params``.
Closure = Callable[[Any], tuple[float, Any]]

#: ``objective(params) -> loss``: the objective alone at ``params``.
Objective = Callable[[Any], float]

#: What ``load_state`` calls its input in error messages.
_STATE_DICT = "optimiser state dict"


# --- validation -----------------------------------------------------------------------------

def _positive(name: str, value: object) -> float:
    v = check_real(name, value)
    if v <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return v


def _unit_interval(name: str, value: object) -> float:
    v = check_real(name, value)
    if not 0.0 <= v < 1.0:
        raise ValueError(f"{name} must satisfy 0 <= {name} < 1, got {value!r}")
    return v


def _open_unit_interval(name: str, value: object) -> float:
    v = check_real(name, value)
    if not 0.0 < v < 1.0:
        raise ValueError(f"{name} must satisfy 0 < {name} < 1, got {value!r}")
    return v


def _nonnegative(name: str, value: object) -> float:
    v = check_real(name, value)
    if v < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
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


def _group(d: Mapping, prefix: str) -> dict[str, np.ndarray]:
    head = prefix + "."
    return {k[len(head):]: np.array(v, copy=True) for k, v in d.items() if k.startswith(head)}


def _check_name(d: Mapping, name: str) -> None:
    got = scalar_entry(d, "optimizer", _STATE_DICT)
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

    def update(self, params: P, grads: Mapping, state: Any, closure: Closure | None = None,
               loss: float | None = None, objective: Objective | None = None
               ) -> tuple[P, Any]:  # pragma: no cover
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
               closure: Closure | None = None, loss: float | None = None,
               objective: Objective | None = None) -> tuple[P, SGDState]:
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
        loss, objective : optional
            Ignored (likewise).
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
        return SGDState(int(scalar_entry(d, "step", _STATE_DICT)), velocity)


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
               closure: Closure | None = None, loss: float | None = None,
               objective: Objective | None = None) -> tuple[P, AdamState]:
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
        loss, objective : optional
            Ignored (likewise).
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
        return AdamState(int(scalar_entry(d, "step", _STATE_DICT)), m, v)


# --- L-BFGS -----------------------------------------------------------------------------------

def lbfgs_two_loop(grad: np.ndarray, s: np.ndarray, y: np.ndarray, *,
                   rho: np.ndarray | None = None,
                   gamma: np.ndarray | float | None = None) -> np.ndarray:
    r"""The L-BFGS inverse-Hessian approximation applied to a vector: ``H grad``.

    The two-loop recursion (Nocedal & Wright, *Numerical Optimization*, 2nd ed.,
    Algorithm 7.4) with the pairs ``(s_i, y_i)``, ``i = 0 .. m-1`` (oldest first),
    ``rho_i = 1 / (y_i' s_i)`` and the initial matrix ``H_0 = gamma I``,
    ``gamma = s_{m-1}' y_{m-1} / y_{m-1}' y_{m-1}`` (Nocedal & Wright eq. (7.20))::

        q = grad
        for i = m-1, ..., 0:   alpha_i = rho_i s_i' q;   q = q - alpha_i y_i
        r = gamma q
        for i = 0, ..., m-1:   beta = rho_i y_i' r;      r = r + (alpha_i - beta) s_i
        return r

    which equals ``H_m grad`` for the matrices of the BFGS inverse update
    ``H_{i+1} = (I - rho_i s_i y_i') H_i (I - rho_i y_i s_i') + rho_i s_i s_i'``
    (Nocedal & Wright eq. (7.19)), in ``O(m n)`` operations and without forming them.
    With no pairs (``m = 0``) it returns ``grad`` (``H = I``).

    Several independent problems are solved at once when ``grad`` has leading axes
    (one problem per row, as MSA's layer-wise maximisations): the inner products run
    along the last axis only. ``rho`` and ``gamma`` may then be given per problem; a
    pair with ``rho_i = 0`` has no effect on that problem (no valid curvature there).

    Parameters
    ----------
    grad : ndarray, shape (..., n)
        The vector(s) to multiply (gradients).
    s, y : ndarray, shape (m, ..., n)
        Parameter and gradient differences, oldest first; every pair used needs
        ``s_i' y_i > 0`` (the caller's curvature test guarantees it).
    rho : ndarray, shape (m, ...), optional
        ``1 / (y_i' s_i)`` (0 to ignore a pair); computed when not given.
    gamma : float or ndarray, shape (...), optional
        The initial scaling; computed from the newest pair when not given.

    Returns
    -------
    ndarray, shape (..., n)
        ``H grad``, computed in (at least) float64.
    """
    dtype = np.result_type(grad, s, y, np.float64)
    q = np.array(grad, dtype=dtype, copy=True)
    s = np.asarray(s, dtype=dtype)
    y = np.asarray(y, dtype=dtype)
    m = s.shape[0]
    if m == 0:
        return q

    def dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        # BLAS for one vector; row by row for a stack of problems
        return a @ b if a.ndim == 1 else np.einsum("...i,...i->...", a, b)

    rho = 1.0 / dot(y, s) if rho is None else np.asarray(rho, dtype=dtype)
    alpha = np.empty((m,) + grad.shape[:-1], dtype=dtype)
    for i in range(m - 1, -1, -1):
        alpha[i] = rho[i] * dot(s[i], q)
        q -= alpha[i][..., None] * y[i]
    if gamma is None:
        gamma = dot(s[-1], y[-1]) / dot(y[-1], y[-1])
    r = np.asarray(gamma, dtype=dtype)[..., None] * q
    for i in range(m):
        beta = rho[i] * dot(y[i], r)
        r += (alpha[i] - beta)[..., None] * s[i]
    return r


class _Layout:
    """Fixed flattening of a mapping of arrays: keys in the mapping's order."""

    def __init__(self, params: Mapping):
        self.keys = list(params)
        arrays = [np.asarray(params[k]) for k in self.keys]
        self.shapes = [a.shape for a in arrays]
        self.dtypes = [a.dtype for a in arrays]
        self.sizes = [a.size for a in arrays]
        self.n = int(sum(self.sizes))
        dtype = np.result_type(*arrays) if arrays else np.dtype(np.float64)
        self.dtype = dtype if np.issubdtype(dtype, np.floating) else np.dtype(np.float64)

    def flatten(self, tree: Mapping) -> np.ndarray:
        if not self.keys:
            return np.zeros(0, dtype=self.dtype)
        return np.concatenate([np.asarray(tree[k], dtype=self.dtype).ravel() for k in self.keys])

    def unflatten(self, vector: np.ndarray) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        start = 0
        for k, shape, dt, size in zip(self.keys, self.shapes, self.dtypes, self.sizes, strict=True):
            out[k] = np.array(vector[start:start + size], dtype=dt).reshape(shape)
            start += size
        return out


@dataclass(frozen=True)
class LBFGSState:
    """State of :class:`LBFGS`.

    Attributes
    ----------
    step : int
        Number of :meth:`LBFGS.update` calls made (accepted or not).
    s, y : ndarray, shape (n_pairs, n)
        The stored pairs ``s_i = x_{i+1} - x_i`` and ``y_i = g_{i+1} - g_i``, oldest
        first, ``n_pairs <= memory``; ``n`` is the total number of parameters,
        flattened in the key order of the parameter mapping. Dtype of the parameters.
    grad : ndarray, shape (n,), or None
        Gradient from the closure at the parameters the last update returned
        (None before the first update, and with ``value_only_trials``, whose line
        search computes no gradient).
    loss : float or None
        Loss from the closure at those parameters (None before the first update).
    closure_calls : int
        Total number of closure evaluations (with ``value_only_trials``: of objective
        evaluations).
    failed_line_searches : int
        Number of updates whose line search accepted no step.
    start : ndarray, shape (n,), or None
        With ``value_only_trials``: the point the last update started from, whose
        curvature pair the next update completes (None otherwise and before the first
        update).
    start_grad : ndarray, shape (n,), or None
        The gradient at :attr:`start`.
    """

    step: int
    s: np.ndarray
    y: np.ndarray
    grad: np.ndarray | None
    loss: float | None
    closure_calls: int
    failed_line_searches: int
    start: np.ndarray | None = None
    start_grad: np.ndarray | None = None

    @property
    def n_pairs(self) -> int:
        """Number of stored ``(s, y)`` pairs."""
        return int(self.s.shape[0])


@dataclass(frozen=True)
class LBFGS(Optimizer):
    r"""Limited-memory BFGS with a backtracking Armijo line search.

    The optimiser Günther et al. (2020, "Layer-parallel training of deep residual
    neural networks", SIAM J. Math. Data Sci. 2(1)) use for ResNet training. All
    parameter arrays are flattened, in the key order of the mapping, into one vector
    ``x`` with gradient ``g``. One :meth:`update`:

    1. Evaluates ``f(x)`` with the closure (see "The loss at x" below).
    2. Direction ``d = -H g`` by the two-loop recursion over the stored pairs
       (:func:`lbfgs_two_loop`, Nocedal & Wright Algorithm 7.4, ``H_0 = gamma I`` with
       ``gamma = s'y / y'y`` of the newest pair). With no stored pairs (the first
       step, or after a reset) ``d = -g / max(1, ||g||)``, a steepest-descent step
       of length at most 1 (so the first trial step has length at most ``lr``). If
       ``d`` is not a descent direction (``g'd >= 0``, or not finite) the memory is
       cleared and that scaled steepest-descent direction is used instead.
    3. Backtracking line search (Nocedal & Wright Algorithm 3.1): the trial steps
       ``t = lr, lr backtrack, lr backtrack^2, ...`` (at most ``max_backtracks``
       reductions, so ``max_backtracks + 1`` trials) until the Armijo
       (sufficient-decrease) condition::

           f(x + t d) <= f(x) + c1 t g'd

       holds. A trial whose loss or gradient is not finite is rejected. If no trial
       is accepted, the parameters are returned unchanged, the memory is cleared
       and ``failed_line_searches`` is incremented; the update never returns
       non-finite parameters.
    4. With the accepted point ``x+ = x + t d`` and the closure's gradient ``g+``
       there, the pair ``s = x+ - x``, ``y = g+ - g`` is stored if
       ``s'y > curvature_eps ||s|| ||y||`` (which keeps ``H`` positive definite;
       the Armijo search alone does not guarantee ``s'y > 0``) and skipped
       otherwise; only the newest ``memory`` pairs are kept.

    Value-only trials (``value_only_trials=True``), as in Günther et al.'s reference
    code (``src/main.cpp`` of ``steffi7574/LayerParallelLearning``): the line search
    evaluates only the objective at its trial points, with the ``objective`` callable
    (for layer-parallel training: a state sweep, no adjoint sweep), and no gradient at
    the accepted point. The curvature pair of an update is then completed by the
    *next* update, from the gradient it is given: ``s = x_k - x_{k-1}``,
    ``y = g_k - g_{k-1}`` with the start point and gradient of the previous update
    kept in the state (:attr:`LBFGSState.start`, :attr:`~LBFGSState.start_grad`),
    under the same curvature test. A step then costs one gradient (the caller's, at
    its start) and one objective evaluation per trial. Without a previous update the
    pair is skipped; so is a pair of a failed line search (``s = 0``).

    The loss at x. The closure is evaluated afresh at the current parameters at the
    start of every update (one closure call more than the trials), instead of
    reusing the loss from the previous update's accepted point kept in the state.
    In mini-batch training the closure is bound to the current batch, so the
    previous value belongs to another objective; evaluating afresh is correct for
    both full-batch and mini-batch training. The gradient used for ``d``, the Armijo
    condition and ``y`` is the ``grads`` argument, which must be the gradient of the
    closure's objective at ``params``.

    Parameters
    ----------
    memory : int
        Number of ``(s, y)`` pairs kept, ``>= 1``.
    lr : float
        First trial step length ``t``, finite and > 0 (1 is the natural step of a
        quasi-Newton method).
    c1 : float
        Armijo constant, ``0 < c1 < 1``.
    backtrack : float
        Step reduction factor of the line search, ``0 < backtrack < 1``.
    max_backtracks : int
        Maximum number of step reductions per update, ``>= 0``.
    curvature_eps : float
        Relative curvature threshold for storing a pair, ``>= 0``.
    value_only_trials : bool
        Evaluate only the objective at the trial points and form each curvature pair
        at the next update (see above); default False (the closure's loss and
        gradient at every trial, the pair at the accepted point).

    Raises
    ------
    ValueError
        For a hyper-parameter out of range; the message names it.

    Notes
    -----
    Computations on the flat vectors (the two-loop recursion, ``g'd``) are done in
    float64; the trial points, the stored pairs and the returned parameters have the
    dtypes of the parameters. Everything is deterministic, and :meth:`state_dict` /
    :meth:`load_state` round-trip the state exactly, so a resumed run continues bit
    for bit. A state loaded into an optimiser with a smaller ``memory`` uses the
    newest ``memory`` pairs.
    """

    memory: int = 10
    lr: float = 1.0
    c1: float = 1e-4
    backtrack: float = 0.5
    max_backtracks: int = 20
    curvature_eps: float = 1e-10
    value_only_trials: bool = False

    name: ClassVar[str] = "lbfgs"

    def __post_init__(self) -> None:
        object.__setattr__(self, "memory", check_integer("memory", self.memory, 1))
        object.__setattr__(self, "lr", _positive("lr", self.lr))
        object.__setattr__(self, "c1", _open_unit_interval("c1", self.c1))
        object.__setattr__(self, "backtrack", _open_unit_interval("backtrack", self.backtrack))
        object.__setattr__(self, "max_backtracks",
                           check_integer("max_backtracks", self.max_backtracks, 0))
        object.__setattr__(self, "curvature_eps",
                           _nonnegative("curvature_eps", self.curvature_eps))
        if not isinstance(self.value_only_trials, (bool, np.bool_)):
            raise ValueError(f"value_only_trials must be True or False, got "
                             f"{self.value_only_trials!r}")
        object.__setattr__(self, "value_only_trials", bool(self.value_only_trials))

    def init(self, params: Mapping) -> LBFGSState:
        """Initial state: step 0, no pairs, no gradient or loss yet, zero counters."""
        layout = _Layout(params)
        empty = np.zeros((0, layout.n), dtype=layout.dtype)
        return LBFGSState(0, empty, empty.copy(), None, None, 0, 0)

    def _check_state(self, state: LBFGSState, n: int) -> None:
        s, y = np.asarray(state.s), np.asarray(state.y)
        if s.ndim != 2 or s.shape != y.shape:
            raise ValueError(f"the L-BFGS state has pairs of shapes s {s.shape} and y {y.shape}; "
                             "expected two arrays of the same shape (n_pairs, n)")
        if s.shape[1] != n:
            raise ValueError(f"the L-BFGS state was made for {s.shape[1]} parameters but "
                             f"params has {n}; was the state made for other parameters?")

    @staticmethod
    def _evaluate(closure: Closure, params: Mapping, candidate: dict[str, np.ndarray],
                  layout: _Layout) -> tuple[float, np.ndarray]:
        loss, grads = closure(_rebuild(params, candidate))
        _check_pair(params, grads)
        return float(loss), layout.flatten(grads)

    def update(self, params: P, grads: Mapping, state: LBFGSState,
               closure: Closure | None = None, loss: float | None = None,
               objective: Objective | None = None) -> tuple[P, LBFGSState]:
        """One L-BFGS step with a line search; returns ``(new_params, new_state)``.

        The inputs are not modified.

        Parameters
        ----------
        params : Params or mapping of arrays
            Current parameters ``x``.
        grads : mapping of arrays
            Gradient ``g`` of the closure's objective at ``params``, same keys and shapes.
        state : LBFGSState
            From :meth:`init` or the previous :meth:`update`.
        closure : callable
            ``closure(params) -> (loss, grads)``: the objective and its gradient at
            other parameters (given as the same kind of container as ``params``).
            Required.
        loss : float, optional
            The objective at ``params``, computed with ``grads``. When given, the
            closure is not called at ``params`` again (one gradient evaluation fewer
            per step; for an inexact, stateful gradient such as
            :class:`ptoc.simultaneous.SimultaneousGradient` it also keeps the loss and
            the gradient of the line search's start from the same solve).
        objective : callable, optional
            ``objective(params) -> loss``: the objective alone, which the line search
            evaluates at its trial points when ``value_only_trials`` is set (without
            it, the loss that ``closure`` returns); ignored otherwise.

        Returns
        -------
        new_params : same type as ``params``
            The accepted point, or a copy of ``params`` if the line search failed.
        new_state : LBFGSState

        Raises
        ------
        ValueError
            If ``closure`` is missing, if ``objective`` is given but not callable, if
            ``grads`` (or a closure's gradient) does not match ``params``, if the state
            was made for other parameters, or if the loss at ``params`` or ``grads`` is
            not finite.
        """
        if closure is None:
            raise ValueError("LBFGS needs closure=...: a callable closure(params) -> "
                             "(loss, grads) evaluating the objective for its line search")
        if not callable(closure):
            raise ValueError(f"closure must be callable, got {type(closure).__name__}")
        if objective is not None and not callable(objective):
            raise ValueError(f"objective must be callable, got {type(objective).__name__}")
        _check_pair(params, grads)
        layout = _Layout(params)
        self._check_state(state, layout.n)
        x = layout.flatten(params)
        g = layout.flatten(grads)
        if not np.all(np.isfinite(g)):
            raise ValueError("LBFGS got non-finite grads")
        s_mem = np.asarray(state.s, dtype=layout.dtype)[-self.memory:]
        y_mem = np.asarray(state.y, dtype=layout.dtype)[-self.memory:]
        if self.value_only_trials and state.start is not None:
            # complete the pair of the previous update with the gradient at its end
            s_mem, y_mem = self._remember(s_mem, y_mem, x - state.start, g - state.start_grad)

        if loss is None:
            f0, _ = self._evaluate(closure, params, layout.unflatten(x), layout)
            calls = 1
        else:
            f0, calls = float(loss), 0
        if not math.isfinite(f0):
            raise ValueError(f"the closure returned a non-finite loss ({f0}) at the current "
                             "parameters")
        start = (x, g) if self.value_only_trials else (None, None)

        def finish(new_x: np.ndarray, s_new: np.ndarray, y_new: np.ndarray,
                   grad: np.ndarray | None, loss: float, failed: int) -> tuple[Any, LBFGSState]:
            new_state = LBFGSState(state.step + 1, s_new, y_new, grad, loss,
                                   state.closure_calls + calls,
                                   state.failed_line_searches + failed, *start)
            return _rebuild(params, layout.unflatten(new_x)), new_state

        empty = np.zeros((0, layout.n), dtype=layout.dtype)
        g64 = g.astype(np.float64)
        if not np.any(g64):  # stationary point: nothing to do
            return finish(x, s_mem, y_mem, g, f0, 0)

        d = None
        if s_mem.shape[0]:
            d = -lbfgs_two_loop(g64, s_mem, y_mem)
            gd = float(g64 @ d)
            if not (math.isfinite(gd) and gd < 0 and np.all(np.isfinite(d))):
                d, s_mem, y_mem = None, empty, empty.copy()
        if d is None:
            d = -g64 / max(1.0, float(np.linalg.norm(g64)))
            gd = float(g64 @ d)

        x64 = x.astype(np.float64)
        t = self.lr
        g_t: np.ndarray | None = None
        for _ in range(self.max_backtracks + 1):
            candidate = layout.unflatten(x64 + t * d)
            if self.value_only_trials:
                f_t = self._value(closure, objective, params, candidate)
                trial_ok = math.isfinite(f_t)
            else:
                f_t, g_t = self._evaluate(closure, params, candidate, layout)
                trial_ok = math.isfinite(f_t) and bool(np.all(np.isfinite(g_t)))
            calls += 1
            if trial_ok and f_t <= f0 + self.c1 * t * gd:
                break
            t *= self.backtrack
        else:
            # no acceptable step: keep the parameters, forget the curvature pairs
            return finish(x, empty, empty.copy(), g, f0, 1)

        x_new = layout.flatten(candidate)  # the point actually taken (after rounding)
        if g_t is not None:
            s_mem, y_mem = self._remember(s_mem, y_mem, x_new - x, g_t - g)
        return finish(x_new, s_mem, y_mem, g_t, f_t, 0)

    @staticmethod
    def _value(closure: Closure, objective: Objective | None, params: Mapping,
               candidate: dict[str, np.ndarray]) -> float:
        """The objective alone at a trial point (``objective``, else the closure's loss)."""
        point = _rebuild(params, candidate)
        return float(objective(point) if objective is not None else closure(point)[0])

    def _remember(self, s_mem: np.ndarray, y_mem: np.ndarray, s_vec: np.ndarray,
                  y_vec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The memory with the pair ``(s_vec, y_vec)`` appended if it passes the curvature
        test ``s'y > curvature_eps ||s|| ||y||`` (which keeps ``H`` positive definite),
        keeping the newest ``memory`` pairs; unchanged otherwise."""
        s64, y64 = s_vec.astype(np.float64), y_vec.astype(np.float64)
        sy = float(s64 @ y64)
        if sy > self.curvature_eps * float(np.linalg.norm(s64)) * float(np.linalg.norm(y64)):
            s_mem = np.concatenate([s_mem, s_vec[None, :]])[-self.memory:]
            y_mem = np.concatenate([y_mem, y_vec[None, :]])[-self.memory:]
        return s_mem, y_mem

    def state_dict(self, state: LBFGSState) -> dict[str, Any]:
        """Flat dict (copies): ``optimizer`` (``"lbfgs"``), ``step``, ``s``, ``y``,
        ``closure_calls``, ``failed_line_searches``, and ``grad``, ``loss``, ``start`` and
        ``start_grad`` once set."""
        d: dict[str, Any] = {
            "optimizer": self.name,
            "step": np.int64(state.step),
            "s": np.array(state.s, copy=True),
            "y": np.array(state.y, copy=True),
            "closure_calls": np.int64(state.closure_calls),
            "failed_line_searches": np.int64(state.failed_line_searches),
        }
        if state.grad is not None:
            d["grad"] = np.array(state.grad, copy=True)
        if state.loss is not None:
            d["loss"] = np.float64(state.loss)
        if state.start is not None:
            d["start"] = np.array(state.start, copy=True)
            d["start_grad"] = np.array(state.start_grad, copy=True)
        return d

    def load_state(self, d: Mapping[str, Any]) -> LBFGSState:
        """Inverse of :meth:`state_dict` (also accepts what ``np.load`` returns)."""
        _check_name(d, self.name)
        for key in ("s", "y"):
            if key not in d:
                raise ValueError(f"optimiser state dict has no {key!r} entry")
        s, y = np.array(d["s"], copy=True), np.array(d["y"], copy=True)
        if s.ndim != 2 or s.shape != y.shape:
            raise ValueError(f"the saved L-BFGS pairs have shapes s {s.shape} and y {y.shape}; "
                             "expected two arrays of the same shape (n_pairs, n)")
        grad = np.array(d["grad"], copy=True) if "grad" in d else None
        if grad is not None and grad.shape != (s.shape[1],):
            raise ValueError(f"the saved L-BFGS gradient has shape {grad.shape}, "
                             f"expected ({s.shape[1]},)")
        loss = float(scalar_entry(d, "loss", _STATE_DICT)) if "loss" in d else None
        if ("start" in d) != ("start_grad" in d):
            raise ValueError("the saved L-BFGS state has only one of 'start' and "
                             "'start_grad'; it needs both or neither")
        start = start_grad = None
        if "start" in d:
            start, start_grad = np.array(d["start"], copy=True), np.array(d["start_grad"],
                                                                             copy=True)
            for name, a in (("start", start), ("start_grad", start_grad)):
                if a.shape != (s.shape[1],):
                    raise ValueError(f"the saved L-BFGS {name} has shape {a.shape}, "
                                     f"expected ({s.shape[1]},)")
        return LBFGSState(int(scalar_entry(d, "step", _STATE_DICT)), s, y, grad, loss,
                          int(scalar_entry(d, "closure_calls", _STATE_DICT)),
                          int(scalar_entry(d, "failed_line_searches", _STATE_DICT)),
                          start, start_grad)


#: Optimisers by name, for the command line and for :func:`make_optimizer`.
OPTIMISERS: dict[str, type[Optimizer]] = {"sgd": SGD, "adam": Adam, "lbfgs": LBFGS}


def make_optimizer(name: str, **hyper: Any) -> Optimizer:
    """Build an optimiser by name: ``make_optimizer("adam", lr=1e-3)``, ``make_optimizer("lbfgs")``.

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
