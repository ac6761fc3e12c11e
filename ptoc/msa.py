r"""Method of successive approximations: MSA, E-MSA and discrete-weight training.

Training by the discrete Pontryagin maximum principle instead of by gradients: Li &
Hao, "An optimal control approach to deep learning and applications to discrete-weight
neural networks", ICML 2018 (the discrete-time MSA, and binary and ternary weights),
and Li, Chen, Tai & E, "Maximum principle based algorithms for deep learning", JMLR 18
(2018) (the extended Hamiltonian of E-MSA). The derivations, ptoc's scaling of ``rho``,
the gradient of the extended Hamiltonian and the closed-form discrete maximisers are
on :doc:`/theory/msa`; this module implements them. One step on a batch of ``S``
samples, for every method here:

1. the serial sweeps: states ``x_0 .. x_N``, co-states ``p_n = -lambda_n`` and ``dJ/dtheta``;
2. every layer ``n``, independently of the others (all layers as one stack, each with
   its own backtracking Armijo line search), increases its own objective in
   ``theta_n``, with the neighbouring layers' regulariser terms held fixed: the layer
   Hamiltonian ``sum_s H_n`` (:class:`MSA`), the extended Hamiltonian ``F_n``
   (:class:`EMSA`), or, for discrete weights, the entrywise maximiser of the linearised
   Hamiltonian (:class:`DiscreteMSA`);
3. the parameters without a layer Hamiltonian (the opening's and the classifier's)
   take one step of a gradient optimiser on their part of ``dJ/dtheta``.

Every method reads the model through :class:`ptoc.propagator.Model`: for any model
``F_n`` is built from one-layer propagators at trial weights (:class:`_ModelProblem`);
for a ResNet it is evaluated in a batched NumPy form with the exact second derivative
of ``sigma`` (:func:`_extended`, checked against central finite differences and against
the contract's form in the tests).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from ._checks import check_integer, check_real, scalar_entry
from ._options import OptionEnum
from .activations import dsigma, second_derivative, sigma
from .discrete import binary_maximiser, ternary_maximiser
from .hamiltonian import layer_arguments
from .kernels import Target
from .methods import (
    StepOutcome,
    TrainingDivergedError,
    TrainingMethod,
    check_finite_step,
    check_gradient_optimizer,
    group_state,
)
from .model import Params, ResNet
from .objective import assemble_gradient, classifier_loss, layer_regulariser_terms, regulariser
from .optim import Adam, Optimizer, lbfgs_two_loop, make_optimizer
from .parallel.driver import parallel_gradient
from .parallel.serial import Serial
from .propagator import Model, Propagator, ResNetModel, as_model
from .sweeps import adjoint, forward, loss_and_grad

__all__ = [
    "EMSA",
    "MSA",
    "DiscreteMSA",
    "DiscreteState",
    "EMSAState",
    "InnerSolver",
    "DiscreteInit",
    "RhoRule",
    "RhoSchedule",
    "WeightSet",
    "extended_hamiltonian",
    "make_msa_method",
]

#: Default sparsity penalty of ternary weights (units of the layer's mean ``|M|``).
DEFAULT_LAM = 1.0

#: What ``load_state`` calls its input in error messages.
_STATE_DICT = "method state dict"


# --- options ---------------------------------------------------------------------------------

class InnerSolver(OptionEnum, what="inner"):
    """How each layer increases its extended Hamiltonian.

    ``GRADIENT``: gradient ascent with a backtracking Armijo line search.
    ``LBFGS``: L-BFGS (two-loop recursion per layer) with the same line search.
    """

    GRADIENT = "gradient"
    LBFGS = "lbfgs"


class WeightSet(OptionEnum, what="kind"):
    """The discrete values of the residual weights (before the per-layer scale)."""

    TERNARY = "ternary"
    BINARY = "binary"


class RhoRule(OptionEnum, what="rho_rule"):
    """How :class:`DiscreteMSA` measures ``M``, ``rho_k`` and ``lam``.

    ``NORMALISED`` (ptoc's ternary ResNet): ``M`` is divided by the layer's mean
    ``|M|``; ``rho_k`` follows the :class:`RhoSchedule` and ``lam`` is in the same units.
    ``DISAGREEMENT`` (Li & Hao's code): ``M`` as it is; ``rho_k`` of layer ``n`` is the
    scheduled ``rho`` times the largest ``|M_ij|`` over the entries whose current weight
    differs from ``sign(M_ij)`` (0 when there is none), and ``lam`` is absolute.
    """

    NORMALISED = "normalised"
    DISAGREEMENT = "disagreement"


class DiscreteInit(OptionEnum, what="init_levels"):
    """Initial discrete weights of :class:`DiscreteMSA`: ``QUANTISE`` the float weights
    it is given (thresholded at ``init_threshold`` times the layer's mean ``|K|``), or
    ``RANDOM``: every entry uniformly from the weight set (Li & Hao), seeded."""

    QUANTISE = "quantise"
    RANDOM = "random"


class RhoSchedule(OptionEnum, what="rho_schedule"):
    """Penalty ``rho_k`` of the discrete update at step ``k = 0, 1, ...``.

    ``CONSTANT``: ``rho``. ``LINEAR``: ``rho (1 + rho_growth k)``.
    ``GEOMETRIC``: ``rho (1 + rho_growth)^k``.
    """

    CONSTANT = "constant"
    LINEAR = "linear"
    GEOMETRIC = "geometric"

    def value_at(self, rho: float, growth: float, k: int) -> float:
        """``rho_k``."""
        if self is RhoSchedule.CONSTANT:
            return rho
        if self is RhoSchedule.LINEAR:
            return rho * (1.0 + growth * k)
        return rho * (1.0 + growth) ** k


# --- the per-layer extended Hamiltonian, vectorised over a stack of layers ---------------------

class _ModelProblem:
    """``F_n`` and its gradient for every layer of any :class:`ptoc.propagator.Model`,
    through the contract: layer ``n`` at a trial ``theta`` is the one-layer propagator
    ``model.layers(theta, span=(n, n+1))`` (its ``step`` is ``Phi_n(x; theta)``, its
    ``adjoint_step`` gives ``grad_x H_n`` and, accumulated, ``d(lam . Phi_n)/d theta``), and
    ``R_n`` comes from ``model.regulariser_terms``. The co-state term's gradient needs
    the mixed derivative ``d/dtheta [(Phi_n'(x; theta) Q) . p_{n+1}]``, which the contract
    does not provide: it is the derivative of the accumulated parameter gradient in
    the direction ``Q`` of ``x``, taken by Richardson-extrapolated central differences
    (an error of about ``eps^4``; the line search accepts a step by exact values of
    ``F_n``, so the ascent stays exact)."""

    def __init__(self, model, params, states, costates, rho: float, target: Target):
        self.model, self.params, self.rho, self.target = model, params, float(rho), target
        self.keys = model.layer_keys
        self.shapes = [params[k].shape[1:] for k in self.keys]
        self.sizes = [int(np.prod(sh)) for sh in self.shapes]
        self.states, self.costates = states, costates
        self.S = states.shape[1]

    def flatten(self, arrays: list[np.ndarray]) -> np.ndarray:
        return np.concatenate([a.reshape(a.shape[0], -1) for a in arrays], axis=1)

    def unflatten(self, theta: np.ndarray) -> list[np.ndarray]:
        out, start = [], 0
        for shape, size in zip(self.shapes, self.sizes, strict=True):
            out.append(theta[:, start:start + size].reshape((-1,) + shape))
            start += size
        return out

    def _layer(self, n: int, theta: list[np.ndarray]) -> Propagator:
        return self.model.layers({k: t[None] for k, t in zip(self.keys, theta, strict=True)},
                                 target=self.target, span=(n, n + 1))

    def _param_grad(self, n, theta, x, lam) -> list[np.ndarray]:
        prop = self._layer(n, theta)
        g = prop.zero_gradient()
        prop.adjoint_step(0, x, lam, g)
        return [a[0] for a in g]

    def _one(self, n: int, theta: list[np.ndarray], want_grad: bool):
        x, xn = self.states[n], self.states[n + 1]
        p, pn = self.costates[n], self.costates[n + 1]
        prop, rho, S = self._layer(n, theta), self.rho, self.S
        phi = prop.step(0, x)
        value = float(np.vdot(pn, phi))
        lam = pn
        if rho:
            r = xn - phi
            Q = p - prop.adjoint_step(0, x, pn)
            value -= rho / (2.0 * S) * float(np.vdot(r, r)) + 0.5 * rho * S * float(np.vdot(Q, Q))
            lam = pn + (rho / S) * r
        # R_n with the neighbours at their current values
        N, arrays = self.model.n_layers, [self.params[k] for k in self.keys]
        prev = [(t - a[n - 1] if n > 0 else np.zeros_like(t))[None] for t, a in
                zip(theta, arrays, strict=True)]
        nxt = [(a[n + 1] - t if n < N - 1 else np.zeros_like(t))[None] for t, a in
               zip(theta, arrays, strict=True)]
        tik, pp, pnx, reg = self.model.regulariser_terms([t[None] for t in theta], prev, nxt,
                                                         want_grad)
        value -= float(tik[0] + pp[0] + pnx[0])
        if not want_grad:
            return value, None
        grads = self._param_grad(n, theta, x, lam)
        if rho:
            scale = float(np.max(np.abs(x))) or 1.0
            size = float(np.max(np.abs(Q))) or 1.0
            eps = 1e-4 * scale / size

            def central(e):
                plus = self._param_grad(n, theta, x + e * Q, pn)
                minus = self._param_grad(n, theta, x - e * Q, pn)
                return [(a - b_) / (2.0 * e) for a, b_ in zip(plus, minus, strict=True)]

            d1, d2 = central(eps), central(eps / 2)
            for g, a1, a2 in zip(grads, d1, d2, strict=True):
                g += (rho * S) * ((4.0 * a2 - a1) / 3.0)
        return value, [g - r_[0] for g, r_ in zip(grads, reg, strict=True)]

    def evaluate(self, theta: np.ndarray, idx: np.ndarray | None = None,
                 grad: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """``F`` (L,) and, with ``grad``, ``dF/dtheta`` of layers ``idx`` (default all)."""
        layers = np.arange(theta.shape[0]) if idx is None else np.asarray(idx)
        arrays = self.unflatten(theta)
        values = np.empty(len(layers))
        grads = [] if grad else None
        for row, n in enumerate(layers):
            v, g = self._one(int(n), [a[row] for a in arrays], grad)
            values[row] = v
            if grad:
                grads.append(self.flatten([a[None] for a in g])[0])
        return values, (np.stack(grads) if grad else None)


class _Problem(_ModelProblem):
    """A ResNet's ``F_n``: all requested layers at once in the batched NumPy form of
    :func:`_extended`, with the exact second derivative of ``sigma``."""

    def evaluate(self, theta: np.ndarray, idx: np.ndarray | None = None,
                 grad: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """``F`` (L,) and, with ``grad``, ``dF/dtheta`` (L, d*d+d) of layers ``idx``."""
        layers = np.arange(theta.shape[0]) if idx is None else np.asarray(idx)
        value, gK, gb = _extended(self.model.network, self.params, self.states, self.costates,
                                  self.rho, layers, *self.unflatten(theta), grad)
        return value, (self.flatten([gK, gb]) if grad else None)


def _extended(network: ResNet, params: Params, states: np.ndarray, costates: np.ndarray,
              rho: float, n: np.ndarray, K: np.ndarray, b: np.ndarray, want_grad: bool):
    """Extended Hamiltonian ``F_n`` (see the module docstring) of the layers ``n`` at the
    trial weights ``K, b`` (one row a layer), the neighbours at their ``params``."""
    h, act, S, N = network.h, network.activation, states.shape[1], network.depth
    X, Xn, P, Pn = states[n], states[n + 1], costates[n], costates[n + 1]
    A = X @ K.transpose(0, 2, 1) + b[:, None, :]
    sig = sigma(A, act)
    phi = X + h * sig
    value = np.einsum("lsi,lsi->l", Pn, phi)
    # R_n: Tikhonov plus time smoothness towards the (fixed) neighbours, whose differences
    # are zero on the side where a layer has none
    has_prev, has_next = n > 0, n < N - 1
    prev, nxt = np.maximum(n - 1, 0), np.minimum(n + 1, N - 1)
    diffs_prev = [np.where(has_prev.reshape((-1,) + (1,) * (t.ndim - 1)), t - a[prev], 0.0)
                  for t, a in ((K, params.K), (b, params.b))]
    diffs_next = [np.where(has_next.reshape((-1,) + (1,) * (t.ndim - 1)), a[nxt] - t, 0.0)
                  for t, a in ((K, params.K), (b, params.b))]
    tik, prev_pair, next_pair, reg = layer_regulariser_terms(network, [K, b], diffs_prev,
                                                             diffs_next, want_grad)
    value = value - (tik + prev_pair + next_pair)
    sq = np.einsum
    ds = dsigma(A, act) if (want_grad or rho) else None
    if rho:
        r = Xn - phi
        U = ds * Pn
        Q = P - Pn - h * (U @ K)
        value = value - rho / (2.0 * S) * sq("lsi,lsi->l", r, r) \
            - 0.5 * rho * S * sq("lsi,lsi->l", Q, Q)
    if not want_grad:
        return value, None, None
    G = h * ds * Pn
    if rho:
        V = (Q @ K.transpose(0, 2, 1)) * second_derivative(A, act) * Pn
        G = G + (rho * h / S) * ds * r + (rho * S * h) * V
    gK = sq("lsi,lsj->lij", G, X)
    if rho:
        gK = gK + (rho * S * h) * sq("lsi,lsj->lij", U, Q)
    gb = G.sum(axis=1)
    return value, gK - reg[0], gb - reg[1]


def extended_hamiltonian(network: ResNet, params: Params | Mapping, n: int, x, x_next, p,
                         p_next, K=None, b=None, *, rho: float = 0.0):
    """E-MSA objective ``F_n(theta)`` of layer ``n`` and its gradient in ``theta = (K, b)``.

    ``F_n = sum_s H_n(x_s, p_{n+1,s}, theta) - rho/(2S) sum_s ||x_{n+1,s} - Phi_n(x_s; theta)||^2
    - (rho S/2) sum_s ||p_{n,s} - grad_x H_n(x_s, p_{n+1,s}, theta)||^2`` (module docstring;
    Li, Chen, Tai & E 2018, extended Hamiltonian, with per-sample co-states ``S p``).
    At ``rho = 0`` it is
    :func:`ptoc.hamiltonian`. Theory: :doc:`/theory/msa`.

    Parameters
    ----------
    network, params
        The network and its current parameters (the neighbours enter ``R_n``).
    n : int
        Layer index.
    x, x_next : arrays (S, d)
        States ``x_n``, ``x_{n+1}``.
    p, p_next : arrays (S, d)
        Co-states ``p_n = -lambda_n``, ``p_{n+1}``.
    K, b : arrays, optional
        Where to evaluate; default layer ``n``'s current weights.
    rho : float
        Penalty weight, ``>= 0``.

    Returns
    -------
    (value, grad_K, grad_b) : float, ndarray (d, d), ndarray (d,)
    """
    prm, K, b = layer_arguments(network, params, n, K, b)
    rho = check_real("rho", rho, low=0.0)
    arrays = [np.asarray(a, dtype=network.dtype) for a in (x, x_next, p, p_next)]
    shape = arrays[0].shape
    if len(shape) != 2 or shape[1] != network.width or shape[0] == 0:
        raise ValueError(f"x must have shape (S, {network.width}) with S >= 1, got {shape}")
    for name, a in zip(("x_next", "p", "p_next"), arrays[1:], strict=True):
        if a.shape != shape:
            raise ValueError(f"{name} has shape {a.shape}, expected {shape} (the shape of x)")
    N = network.depth
    states = np.zeros((N + 1,) + shape, network.dtype)
    costates = np.zeros_like(states)
    states[n], states[n + 1] = arrays[0], arrays[1]
    costates[n], costates[n + 1] = arrays[2], arrays[3]
    value, gK, gb = _extended(network, prm, states, costates, rho, np.array([n]), K[None],
                              b[None], True)
    return float(value[0]), gK[0], gb[0]


# --- inner maximisation (all layers at once, each with its own line search) --------------------

@dataclass(frozen=True)
class _LineSearch:
    lr: float
    backtrack: float
    max_backtracks: int
    c1: float


def _search(prob: _Problem, theta: np.ndarray, F: np.ndarray, direction: np.ndarray,
            slope: np.ndarray, t0: np.ndarray, active: np.ndarray, ls: _LineSearch):
    """Backtracking Armijo search ``F(theta + t d) >= F + c1 t slope`` per active layer.

    Returns the new ``theta``, ``F``, the accepted steps (0 where none) and the number of
    layer evaluations.
    """
    theta_new, F_new = theta.copy(), F.copy()
    t = t0.copy()
    step = np.zeros_like(F)
    pending = active.copy()
    evaluations = 0
    for _ in range(ls.max_backtracks + 1):
        idx = np.flatnonzero(pending)
        if idx.size == 0:
            break
        trial = theta[idx] + t[idx, None] * direction[idx]
        Ft, _ = prob.evaluate(trial, idx, grad=False)
        evaluations += idx.size
        ok = np.isfinite(Ft) & (Ft >= F[idx] + ls.c1 * t[idx] * slope[idx])
        acc = idx[ok]
        theta_new[acc], F_new[acc], step[acc] = trial[ok], Ft[ok], t[acc]
        pending[acc] = False
        t[idx[~ok]] *= ls.backtrack
    return theta_new, F_new, step, evaluations


def _ascend(prob: _Problem, theta: np.ndarray, steps: int, ls: _LineSearch, memory: bool):
    """``steps`` ascent steps on every layer's ``F``, each with its own line search:
    L-BFGS directions with ``memory``, steepest ascent (the gradient) without."""
    # L-BFGS minimises f = -F: gradient -G, direction -H(-G) = H G
    F, G = prob.evaluate(theta)
    F0 = F.copy()
    L = F.size
    active = np.ones(L, bool)
    has_pair = np.zeros(L, bool)
    gamma = np.ones(L, theta.dtype)
    pairs: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    evaluations = L
    for it in range(steps):
        if pairs:  # H G per layer (ptoc.optim's two-loop recursion, one problem a layer)
            S_, Y_, R_ = (np.stack(v) for v in zip(*pairs, strict=True))
            direction = lbfgs_two_loop(G, S_, Y_, rho=R_, gamma=gamma).astype(G.dtype,
                                                                             copy=False)
        else:
            direction = G.copy()
        slope = np.einsum("li,li->l", G, direction)
        bad = ~has_pair | ~np.isfinite(slope) | (slope <= 0)
        if bad.any():  # steepest ascent and a fresh memory for those layers
            direction[bad] = G[bad]
            slope[bad] = np.einsum("li,li->l", G[bad], G[bad])
            for _, _, r in pairs:
                r[bad] = 0.0
            has_pair[bad] = False
            gamma[bad] = 1.0
        active &= slope > 0
        if not active.any():
            break
        t0 = np.where(has_pair, 1.0, ls.lr)
        theta_new, F, step, ev = _search(prob, theta, F, direction, slope, t0, active, ls)
        evaluations += ev
        active &= step > 0
        if it + 1 == steps or not active.any():
            theta = theta_new
            break
        idx = np.flatnonzero(active)
        G_new = G.copy()
        F[idx], G_new[idx] = prob.evaluate(theta_new[idx], idx)
        evaluations += idx.size
        if not memory:
            theta, G = theta_new, G_new
            continue
        s = theta_new - theta
        y = G - G_new  # gradient difference of f = -F
        sy = np.einsum("li,li->l", s, y)
        yy = np.einsum("li,li->l", y, y)
        ok = active & np.isfinite(sy) & (sy > 1e-12 * np.sqrt(
            np.einsum("li,li->l", s, s) * yy))
        r = np.where(ok, 1.0 / np.where(ok, sy, 1.0), 0.0)
        pairs.append((s, y, r))
        gamma = np.where(ok, sy / np.where(ok, yy, 1.0), gamma)
        has_pair |= ok
        theta, G = theta_new, G_new
    return theta, F - F0, evaluations


# --- shared pieces ---------------------------------------------------------------------------

def _sweeps(model: Model, params, X: np.ndarray, y: np.ndarray, target: Target):
    """``J``, all states, all co-states ``p = -lambda`` and the full gradient of ``J``: the
    compiled serial sweeps for a ResNet, the serial sweep of the model's propagator
    (:func:`ptoc.parallel.parallel_gradient` with :class:`ptoc.Serial`) otherwise."""
    if not isinstance(model, ResNetModel):
        result = parallel_gradient(model, params, X, y, Serial(), target=target)
        check_finite_step(float(result.loss), result.grads)
        return float(result.loss), result.states, -result.adjoints, result.grads
    network = model.network
    fwd = forward(network, params, X, target=target)
    value, lam_N, dW, dmu = classifier_loss(params, fwd.final_state, y)
    value = float(value) + regulariser(network, params)
    check_finite_step(value, {})  # before the adjoint sweep
    adj = adjoint(network, params, fwd, lam_N, target=target, keep_adjoints=True)
    grads, _ = assemble_gradient(network, params, X, adj.grad_K, adj.grad_b,
                                 adj.initial_adjoint, fwd.opening_derivative, dW, dmu)
    check_finite_step(value, grads)
    return value, fwd.states, -adj.adjoints, grads


def _problem(model: Model, params, states, costates, rho: float, target: Target):
    """The layers' inner problems: the batched NumPy form for a ResNet, the contract's
    layer by layer for any other model."""
    if isinstance(model, ResNetModel):
        return _Problem(model, params, states, costates, rho, target)
    return _ModelProblem(model, params, states, costates, rho, target)


def _layer_dots(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``sum_ij a[n, ...] b[n, ...]`` for every layer ``n``."""
    return np.einsum("ni,ni->n", a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1))


def _check_finite(params: Mapping[str, np.ndarray]) -> None:
    for k, v in params.items():
        if not np.all(np.isfinite(v)):
            raise TrainingDivergedError(f"non-finite parameters {k!r} after the update")


def _head(p: Mapping[str, np.ndarray], model: Model) -> dict[str, np.ndarray]:
    """The parameters without a layer Hamiltonian: the opening's and the terminal
    objective's (a ResNet's ``K_in, b_in, W, mu``)."""
    return {k: p[k] for k in (*model.opening_keys, *model.terminal_keys) if k in p}


def _weight_mask(model: Model, shape: tuple[int, ...]) -> np.ndarray:
    """The model's ``weight_mask()`` (a layered network's unpadded entries), or all True."""
    mask = getattr(model, "weight_mask", None)
    return np.ones(shape, dtype=bool) if mask is None else mask()


def _nonzero_fraction(model: Model, levels: np.ndarray) -> float:
    """Nonzero discrete weights over the entries inside the model's weight mask."""
    return float(np.count_nonzero(levels) / np.count_nonzero(_weight_mask(model, levels.shape)))


def _array(d: Mapping[str, Any], key: str, shape: tuple[int, ...], dtype) -> np.ndarray:
    if key not in d:
        raise ValueError(f"method state dict has no {key!r} entry")
    v = np.array(d[key], dtype=dtype, copy=True)
    if v.shape != shape:
        raise ValueError(f"method state dict entry {key!r} has shape {v.shape}, "
                         f"expected {shape}")
    return v


# --- E-MSA and MSA ---------------------------------------------------------------------------

@dataclass(frozen=True)
class EMSAState:
    """State of :class:`EMSA`: steps taken and the head optimiser's state."""

    step: int
    head: Any


@dataclass
class EMSA(TrainingMethod):
    """Error-controlled method of successive approximations (Li, Chen, Tai & E 2018;
    Li & Hao 2018), as a :class:`ptoc.methods.TrainingMethod`.

    Each step: forward sweep, backward sweep, then every residual layer increases its
    extended Hamiltonian ``F_n`` (module docstring) by
    ``inner_steps`` line-searched iterations, independently of the other layers; the
    head takes one ``head_optimizer`` step. Theory: :doc:`/theory/msa`.

    Parameters
    ----------
    rho : float
        Penalty weight ``rho >= 0`` (batch-size independent; see the module docstring).
        ``0`` is the plain MSA.
    inner : InnerSolver or str
        ``"gradient"`` (default) or ``"lbfgs"``.
    inner_steps : int
        Inner iterations per layer and step (>= 1).
    lr : float
        First trial step of the line search (of every L-BFGS step before the layer has
        a curvature pair); > 0.
    backtrack : float
        Step reduction factor of the line search, ``0 < backtrack < 1``.
    max_backtracks : int
        Reductions before a layer gives up for this step (>= 0).
    c1 : float
        Armijo constant, ``0 < c1 < 1``.
    head_optimizer : SGD or Adam
        Optimiser of ``W, mu`` (and ``K_in, b_in``); default ``Adam(lr=1e-2)``.
    target : Target or str
        Kernel target of the sweeps.
    """

    name: ClassVar[str] = "emsa"

    rho: float = 1.0
    inner: InnerSolver | str = InnerSolver.GRADIENT
    inner_steps: int = 3
    lr: float = 1.0
    backtrack: float = 0.5
    max_backtracks: int = 8
    c1: float = 1e-4
    head_optimizer: Optimizer = field(default_factory=lambda: Adam(lr=1e-2))
    target: Target | str = Target.CPU

    def __post_init__(self) -> None:
        self.rho = check_real("rho", self.rho, low=0.0)
        self.inner = InnerSolver.parse(self.inner)
        self.inner_steps = check_integer("inner_steps", self.inner_steps, 1)
        self.lr = check_real("lr", self.lr, low=0.0, low_open=True)
        self.backtrack = check_real("backtrack", self.backtrack, low=0.0, high=1.0,
                                    low_open=True, high_open=True)
        self.max_backtracks = check_integer("max_backtracks", self.max_backtracks, 0)
        self.c1 = check_real("c1", self.c1, low=0.0, high=1.0, low_open=True, high_open=True)
        self.head_optimizer = check_gradient_optimizer("head_optimizer", self.head_optimizer)
        try:
            self.target = Target.parse(self.target)
        except ValueError as exc:
            raise ValueError(f"target: {exc}") from None

    def init(self, network: ResNet | Model, params) -> EMSAState:
        model = as_model(network)
        return EMSAState(0, self.head_optimizer.init(_head(model.check_params(params), model)))

    def step(self, network: ResNet | Model, params, state: EMSAState, X: np.ndarray,
             y: np.ndarray) -> StepOutcome:
        model = as_model(network)
        p = model.check_params(params)
        X, y = model.check_inputs(X, y)
        value, states, costates, grads = _sweeps(model, p, X, y, self.target)
        prob = _problem(model, p, states, costates, self.rho, self.target)
        ls = _LineSearch(self.lr, self.backtrack, self.max_backtracks, self.c1)
        with np.errstate(over="ignore", invalid="ignore"):
            theta, gain, evaluations = _ascend(
                prob, prob.flatten([p[k] for k in model.layer_keys]), self.inner_steps, ls,
                memory=self.inner is InnerSolver.LBFGS)
        layers = prob.unflatten(theta)
        head, head_state = self.head_optimizer.update(_head(p, model), _head(grads, model),
                                                      state.head)
        new = {k: np.ascontiguousarray(a, model.dtype)
               for k, a in zip(model.layer_keys, layers, strict=True)}
        new.update(head)
        new = model.pack(new)
        _check_finite(new)
        info = {"hamiltonian_gain": float(np.sum(gain)),
                "layers_moved": int(np.count_nonzero(gain > 0)),
                "layer_evaluations": int(evaluations)}
        return StepOutcome(value, new, EMSAState(state.step + 1, head_state), info)

    def state_dict(self, state: EMSAState) -> dict[str, Any]:
        d: dict[str, Any] = {"method": self.name, "step": np.int64(state.step)}
        d.update({f"head.{k}": v for k, v in self.head_optimizer.state_dict(state.head).items()})
        return d

    def load_state(self, d: Mapping[str, Any], network: ResNet, params: Params) -> EMSAState:
        self.check_state_name(d)
        return EMSAState(int(scalar_entry(d, "step", _STATE_DICT)),
                         self.head_optimizer.load_state(group_state(d, "head")))



@dataclass
class MSA(EMSA):
    """The basic method of successive approximations (Li & Hao 2018): :class:`EMSA`
    with ``rho = 0``, i.e. each layer increases ``sum_s H_n`` itself
    (:doc:`/theory/msa`). Takes the same options as :class:`EMSA` except ``rho``.

    Theory: :doc:`/theory/msa`.
    """

    name: ClassVar[str] = "msa"

    rho: float = field(default=0.0, init=False)


# --- discrete weights ------------------------------------------------------------------------

#: Default ``rho_0`` of the discrete update, by weight set (units of the layer's mean ``|M|``).
DEFAULT_RHO = {WeightSet.TERNARY: 1.0, WeightSet.BINARY: 0.5}

@dataclass(frozen=True)
class DiscreteState:
    """State of :class:`DiscreteMSA`.

    Attributes
    ----------
    step : int
        Steps taken (``k`` of ``rho_k``).
    levels : ndarray (N, d, d)
        The discrete weights ``W_n`` (values in ``{-1, 0, 1}`` or ``{-1, 1}``).
    log_scale : ndarray (N,)
        ``s_n``, with ``a_n = exp(s_n)``.
    moving_average : ndarray (N, d, d)
        ``M_n``, the moving average of ``d(sum_s H_n)/dW_n``.
    optimizer : object
        State of the optimiser of ``s, b`` and the head.
    """

    step: int
    levels: np.ndarray
    log_scale: np.ndarray
    moving_average: np.ndarray
    optimizer: Any

    @property
    def scale(self) -> np.ndarray:
        """``a_n = exp(s_n)``."""
        return np.exp(self.log_scale)

    def weights(self) -> np.ndarray:
        """``K_n = a_n W_n`` (N, d, d)."""
        return self.scale.reshape((-1,) + (1,) * (self.levels.ndim - 1)) * self.levels


@dataclass
class DiscreteMSA(TrainingMethod):
    """Discrete-weight MSA (Li & Hao 2018): ``K_n = a_n W_n``, ``W_n`` ternary or binary.

    See the module docstring for the update. :attr:`name` is ``"ternary"`` or
    ``"binary"`` (the ``kind``). The method's state holds ``W_n``, ``a_n`` and ``M_n``; the
    discrete layer array (the model's first, ``K`` of a ResNet, ``W`` of a
    :class:`ptoc.layered.LayeredNetwork`) of the ``params`` handed to :meth:`step` is
    ignored and replaced by ``a_n W_n`` from the state (:meth:`init` quantises the float
    ``K`` it is given, or draws random levels; :meth:`discrete_params` gives those
    parameters before the first step). A model with a ``weight_mask()`` (a layered
    network's padding) keeps the entries outside the mask at 0.
    Theory: :doc:`/theory/msa` (discrete weights).

    Two configurations are provided: the defaults, ptoc's ternary ResNet (residual
    increments ``a_n W_n`` with a learnt scale, normalised ``M``, ``rho`` growing,
    weights quantised from a float initialisation), and :meth:`li_hao`, the recipe of
    Li & Hao's own code (every layer ternary without scale, their ``rho_k`` rule,
    absolute ``lam``, the moving-average schedule, random ternary initialisation).

    Parameters
    ----------
    kind : WeightSet or str
        ``"ternary"`` (default) or ``"binary"``.
    lam : float, optional
        Sparsity penalty ``>= 0``, in the units of ``rho_rule``; default 1 for ternary
        weights, and it must be 0 (the default) for binary weights.
    rho : float, optional
        Proximity penalty ``rho_0 >= 0``; default 1 for ternary and 0.5 for binary
        weights (tuned on ``benchmarks/bench_discrete.py``, normalised rule). With
        ``c = Mhat + 2 rho_k W``: a ternary ``+1`` becomes 0 when ``Mhat <= lam - rho_k``
        and ``-1`` when ``Mhat < -lam - 3 rho_k``; a 0 becomes ``+-1`` when
        ``|Mhat| > lam + rho_k``. Binary weights under the ``"disagreement"`` rule flip
        where ``|M| > rho_k`` (Li & Hao's rule: the maximiser with penalty ``rho_k / 2``).
    rho_rule : RhoRule or str
        ``"normalised"`` (default) or ``"disagreement"`` (:class:`RhoRule`).
    rho_schedule : RhoSchedule or str
        ``"constant"``, ``"linear"`` (default) or ``"geometric"``.
    rho_growth : float
        Growth rate of ``rho_k`` per step (>= 0; unused for ``"constant"``). The default
        ``"linear"`` with 0.01 doubles ``rho`` after 100 steps and multiplies it by 11
        after 1000, so the weights settle (fewer flips) as training goes on; without
        growth the digits benchmark's loss kept jumping late in training.
    beta : float
        Moving-average factor of ``M``, ``0 <= beta < 1`` (default 0.99: on the digits
        benchmark 0.9 let too many weights flip per step).
    beta_decay : float
        ``0 < beta_decay <= 1``: after every ``steps_per_epoch`` steps ``1 - beta`` is
        multiplied by it, ``beta_k = 1 - (1 - beta) beta_decay^floor(k / steps_per_epoch)``
        (Li & Hao: 0.95 per epoch). Default 1 (constant ``beta``).
    steps_per_epoch : int, optional
        Steps of one epoch (``n_train // batch_size`` for the training loop's batches);
        needed when ``beta_decay < 1``.
    scale : bool
        Learn a per-layer scale ``a_n = exp(s_n)`` (default True); False keeps
        ``a_n = 1`` (Li & Hao: the batch normalisation after each layer sets the scale).
    init_levels : DiscreteInit or str
        ``"quantise"`` (default) or ``"random"``.
    init_threshold : float
        Quantising initialisation: entries with ``|K| <= init_threshold mean|K_n|`` start
        at 0.
    seed : int
        Seed of the random initialisation.
    optimizer : SGD or Adam
        Optimiser of the log-scales (when learnt), the other layer arrays (biases, batch
        normalisation's ``gamma, beta``) and the head; default ``Adam(lr=1e-2)``.
    target : Target or str
        Kernel target of the sweeps.
    """

    kind: WeightSet | str = WeightSet.TERNARY
    lam: float | None = None
    rho: float | None = None
    rho_rule: RhoRule | str = RhoRule.NORMALISED
    rho_schedule: RhoSchedule | str = RhoSchedule.LINEAR
    rho_growth: float = 0.01
    beta: float = 0.99
    beta_decay: float = 1.0
    steps_per_epoch: int | None = None
    scale: bool = True
    init_levels: DiscreteInit | str = DiscreteInit.QUANTISE
    init_threshold: float = 0.7
    seed: int = 0
    optimizer: Optimizer = field(default_factory=lambda: Adam(lr=1e-2))
    target: Target | str = Target.CPU

    def __post_init__(self) -> None:
        self.kind = WeightSet.parse(self.kind)
        if self.lam is None:
            self.lam = 0.0 if self.kind is WeightSet.BINARY else DEFAULT_LAM
        self.lam = check_real("lam", self.lam, low=0.0)
        if self.kind is WeightSet.BINARY and self.lam != 0:
            raise ValueError(f"lam must be 0 for binary weights (|w| = 1 always), got "
                             f"{self.lam!r}")
        if self.rho is None:
            self.rho = DEFAULT_RHO[self.kind]
        self.rho = check_real("rho", self.rho, low=0.0)
        self.rho_rule = RhoRule.parse(self.rho_rule)
        self.rho_schedule = RhoSchedule.parse(self.rho_schedule)
        self.rho_growth = check_real("rho_growth", self.rho_growth, low=0.0)
        self.beta = check_real("beta", self.beta, low=0.0, high=1.0, high_open=True)
        self.beta_decay = check_real("beta_decay", self.beta_decay, low=0.0, high=1.0,
                                     low_open=True)
        if self.steps_per_epoch is not None:
            self.steps_per_epoch = check_integer("steps_per_epoch", self.steps_per_epoch, 1)
        elif self.beta_decay != 1.0:
            raise ValueError(f"beta_decay={self.beta_decay} needs steps_per_epoch (the steps "
                             "after which 1 - beta is multiplied by it)")
        if not isinstance(self.scale, (bool, np.bool_)):
            raise ValueError(f"scale must be True or False, got {self.scale!r}")
        self.scale = bool(self.scale)
        self.init_levels = DiscreteInit.parse(self.init_levels)
        self.init_threshold = check_real("init_threshold", self.init_threshold, low=0.0)
        self.seed = check_integer("seed", self.seed, 0)
        self.optimizer = check_gradient_optimizer("optimizer", self.optimizer)
        try:
            self.target = Target.parse(self.target)
        except ValueError as exc:
            raise ValueError(f"target: {exc}") from None

    @classmethod
    def li_hao(cls, steps_per_epoch: int, *, kind: WeightSet | str = WeightSet.TERNARY,
               seed: int = 0, **options: Any) -> DiscreteMSA:
        """Li & Hao's recipe, as their code (``discrete-MSA``: ``layers.py``, ``train.py``,
        ``mnist_fc_ternary.ipynb``) runs it on MNIST.

        Every discrete layer array without scale (``scale=False``), drawn uniformly from
        the weight set (``init_levels="random"``); ``M`` the moving average of ``dH/dW`` with
        ``beta = 0.999`` whose ``1 - beta`` is multiplied by 0.95 after every epoch of
        ``steps_per_epoch`` steps; ``rho_k = 0.25 max |M|`` over the sign-disagreeing
        entries of the layer (``rho_rule="disagreement"``, constant); ``lam = 1e-7``
        absolute for ternary weights; Adam with learning rate 1e-3 on the other layer
        arrays (batch normalisation's ``gamma, beta``). ``options`` override any of these.

        Parameters
        ----------
        steps_per_epoch : int
            Steps of one epoch (``n_train // batch_size``; Li & Hao: 55,000 / 100 = 550).
        kind : WeightSet or str
            ``"ternary"`` (default) or ``"binary"``.
        seed : int
            Seed of the random initial levels.
        """
        kind = WeightSet.parse(kind)
        recipe: dict[str, Any] = dict(
            kind=kind, lam=1e-7 if kind is WeightSet.TERNARY else 0.0, rho=0.25,
            rho_rule=RhoRule.DISAGREEMENT, rho_schedule=RhoSchedule.CONSTANT, beta=0.999,
            beta_decay=0.95, steps_per_epoch=steps_per_epoch, scale=False,
            init_levels=DiscreteInit.RANDOM, seed=seed, optimizer=Adam(lr=1e-3))
        recipe.update(options)
        return cls(**recipe)

    @property
    def name(self) -> str:  # type: ignore[override]
        """``"ternary"`` or ``"binary"``."""
        return self.kind.value

    def rho_at(self, k: int) -> float:
        """The scheduled ``rho`` of step ``k`` (``rho_k`` under the normalised rule)."""
        return self.rho_schedule.value_at(self.rho, self.rho_growth, k)

    def beta_at(self, k: int) -> float:
        """``beta_k``, the moving-average factor of step ``k``."""
        if self.steps_per_epoch is None:
            return self.beta
        return 1.0 - (1.0 - self.beta) * self.beta_decay ** (k // self.steps_per_epoch)

    def _trainable(self, model: Model, params, log_scale: np.ndarray) -> dict[str, np.ndarray]:
        """What the optimiser updates: the scales (when learnt), the other layer arrays
        (biases, batch normalisation) and the head. The first layer array is the
        discrete one."""
        out = {"log_scale": log_scale} if self.scale else {}
        out.update({k: params[k] for k in model.layer_keys[1:]})
        out.update(_head(params, model))
        return out

    def quantise(self, K: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Initial ``(W, s)`` from float weights ``K`` (N, ...) (module docstring)."""
        K = np.asarray(K)
        entries = tuple(range(1, K.ndim))
        if self.kind is WeightSet.BINARY:
            levels = np.where(K >= 0, 1.0, -1.0).astype(K.dtype)
        else:
            thr = self.init_threshold * np.mean(np.abs(K), axis=entries, keepdims=True)
            levels = np.where(np.abs(K) > thr, np.sign(K), 0.0).astype(K.dtype)
        nnz = _layer_dots(levels, levels)
        fit = _layer_dots(K, levels) / np.maximum(nnz, 1.0)
        if np.any(fit <= 0):  # an all-zero layer: any positive scale will do
            fit = np.where(fit > 0, fit, np.maximum(np.mean(np.abs(K)), 1e-3))
        return levels, np.log(fit).astype(K.dtype)

    def init(self, network: ResNet | Model, params) -> DiscreteState:
        model = as_model(network)
        p = model.check_params(params)
        K = p[model.layer_keys[0]]
        mask = _weight_mask(model, K.shape)
        if self.init_levels is DiscreteInit.RANDOM:
            rng = np.random.default_rng(self.seed)
            values = [-1.0, 1.0] if self.kind is WeightSet.BINARY else [-1.0, 0.0, 1.0]
            levels = np.where(mask, rng.choice(values, size=K.shape), 0.0).astype(K.dtype)
            log_scale = np.zeros(K.shape[:1], K.dtype)
        else:
            levels, log_scale = self.quantise(K)
            levels = np.where(mask, levels, 0.0).astype(K.dtype)
        if not self.scale:
            log_scale = np.zeros_like(log_scale)
        opt = self.optimizer.init(self._trainable(model, p, log_scale))
        return DiscreteState(0, levels, log_scale, np.zeros_like(K), opt)

    def discrete_params(self, network: ResNet | Model, params, state: DiscreteState):
        """``params`` with ``K_n = a_n W_n`` from ``state`` (``K``: the model's first
        layer array)."""
        model = as_model(network)
        p = {k: np.array(v, copy=True) for k, v in model.check_params(params).items()}
        p[model.layer_keys[0]] = np.ascontiguousarray(state.weights(), dtype=model.dtype)
        return model.pack(p)

    def step(self, network: ResNet | Model, params, state: DiscreteState, X: np.ndarray,
             y: np.ndarray) -> StepOutcome:
        model = as_model(network)
        key = model.layer_keys[0]
        p = self.discrete_params(model, params, state)
        X, y = model.check_inputs(X, y)
        if isinstance(model, ResNetModel):
            value, grads = loss_and_grad(model.network, p, X, y, target=self.target)
        else:
            value, _, _, grads = _sweeps(model, p, X, y, self.target)
        value = float(value)
        check_finite_step(value, grads)
        a = state.scale
        per_layer = (-1,) + (1,) * (state.levels.ndim - 1)
        entries = tuple(range(1, state.levels.ndim))
        # d(sum_s H_n)/dW_n = -a_n dJ/dK_n (sum_s H_n includes -R_n)
        beta_k = self.beta_at(state.step)
        M = beta_k * state.moving_average - (1.0 - beta_k) * a.reshape(per_layer) * grads[key]
        if self.rho_rule is RhoRule.NORMALISED:
            size = np.mean(np.abs(M), axis=entries, keepdims=True)
            M_hat = M / np.where(size > 0, size, 1.0)
            rho_k = np.full(size.shape, self.rho_at(state.step))
        else:
            M_hat, size = M, np.max(np.abs(M), axis=entries, keepdims=True)
            disagree = state.levels != np.sign(M)
            largest = np.max(np.where(disagree, np.abs(M), 0.0), axis=entries, keepdims=True)
            rho_k = self.rho_at(state.step) * largest
        if self.kind is WeightSet.BINARY:
            penalty = rho_k if self.rho_rule is RhoRule.NORMALISED else 0.5 * rho_k
            levels = binary_maximiser(M_hat, state.levels, penalty)
        else:
            levels = ternary_maximiser(M_hat, state.levels, rho_k, self.lam)
        levels = np.where(size > 0, levels, state.levels)
        levels = np.where(_weight_mask(model, levels.shape), levels, 0.0).astype(model.dtype)
        g = self._trainable(model, grads, a * _layer_dots(grads[key], state.levels))
        new, opt = self.optimizer.update(self._trainable(model, p, state.log_scale), g,
                                         state.optimizer)
        new_state = DiscreteState(state.step + 1, levels,
                                  new["log_scale"] if self.scale else state.log_scale, M, opt)
        out = {key: np.ascontiguousarray(new_state.weights(), model.dtype)}
        out.update({k: v for k, v in new.items() if k != "log_scale"})
        out = model.pack(out)
        _check_finite(out)
        info = {"rho_k": float(np.mean(rho_k)), "beta_k": beta_k,
                "flipped": int(np.count_nonzero(levels != state.levels)),
                "nonzero_fraction": _nonzero_fraction(model, levels)}
        return StepOutcome(value, out, new_state, info)

    def metrics(self, network: ResNet, params: Params, state: DiscreteState) -> dict[str, float]:
        """``{"nonzero_fraction": ...}``: the fraction of nonzero discrete weights (of the
        entries inside the model's weight mask, when it has one)."""
        return {"nonzero_fraction": _nonzero_fraction(as_model(network), state.levels)}

    def state_dict(self, state: DiscreteState) -> dict[str, Any]:
        d: dict[str, Any] = {"method": self.name, "step": np.int64(state.step),
                             "levels": state.levels.copy(),
                             "log_scale": state.log_scale.copy(),
                             "moving_average": state.moving_average.copy()}
        d.update({f"optimizer.{k}": v
                  for k, v in self.optimizer.state_dict(state.optimizer).items()})
        return d

    def load_state(self, d: Mapping[str, Any], network: ResNet,
                   params: Params) -> DiscreteState:
        self.check_state_name(d)
        model = as_model(network)
        shape = model.check_params(params)[model.layer_keys[0]].shape
        levels = _array(d, "levels", shape, model.dtype)
        allowed = (-1.0, 1.0) if self.kind is WeightSet.BINARY else (-1.0, 0.0, 1.0)
        mask = _weight_mask(model, shape)
        if not np.all(np.isin(levels[mask], allowed)):
            raise ValueError(f"method state 'levels' holds values outside {allowed}")
        if np.any(levels[~mask] != 0):
            raise ValueError("method state 'levels' holds nonzero values outside the model's "
                             "weight mask")
        return DiscreteState(int(scalar_entry(d, "step", _STATE_DICT)), levels,
                             _array(d, "log_scale", shape[:1], model.dtype),
                             _array(d, "moving_average", shape, model.dtype),
                             self.optimizer.load_state(group_state(d, "optimizer")))


# --- by name ---------------------------------------------------------------------------------

_FACTORIES: dict[str, Callable[..., TrainingMethod]] = {
    "msa": MSA,
    "emsa": EMSA,
    "ternary": lambda **kw: DiscreteMSA(kind=WeightSet.TERNARY, **kw),
    "binary": lambda **kw: DiscreteMSA(kind=WeightSet.BINARY, **kw),
}


def make_msa_method(name: str, **options: Any) -> TrainingMethod:
    """``"msa"``, ``"emsa"``, ``"ternary"`` or ``"binary"`` with its options, e.g.
    ``make_msa_method("emsa", rho=10.0)``. Optimiser options may be given as configs
    (``head_optimizer={"name": "adam", "lr": 1e-3}``), as :meth:`config` writes them.

    Raises
    ------
    ValueError
        For an unknown name (listing the valid ones) or a bad option (naming it).
    """
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in _FACTORIES:
        valid = ", ".join(repr(k) for k in _FACTORIES)
        raise ValueError(f"unknown method {name!r}; valid methods are {valid}")
    options = dict(options)
    options.pop("name", None)
    if key in ("ternary", "binary"):
        options.pop("kind", None)
    for opt in ("head_optimizer", "optimizer"):
        if isinstance(options.get(opt), Mapping):
            cfg = dict(options[opt])
            options[opt] = make_optimizer(cfg.pop("name"), **cfg)
    try:
        return _FACTORIES[key](**options)
    except TypeError as exc:
        raise ValueError(f"{key}: {exc}") from None
