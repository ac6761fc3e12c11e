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
from dataclasses import dataclass, field

import numpy as np

from . import _config
from ._checks import check_inputs
from .kernels import Target, backend
from .model import Params, ResNet
from .objective import classifier_loss, opening_forward


class Propagator(abc.ABC):
    """Abstract layer-by-layer model: the contract every solver relies on.

    Subclasses set ``n_layers`` and implement the abstract methods. States are NumPy
    arrays of any fixed shape (for ResNets: (S, d), one sample per row).

    ``step`` is the state equation ``x_{n+1} = Phi_n(x_n)`` and ``adjoint_step`` the
    adjoint equation ``lambda_n = Phi_n'(x_n)^T lambda_{n+1}`` with the gradient
    accumulation: what the layer-parallel solvers (Günther et al. 2020) call
    (``DESIGN.md`` sections 2 and 6, in the spirit of XBraid's adjoint interface).
    Theory: :doc:`/theory/adjoint`, :doc:`/theory/parareal`, :doc:`/theory/mgrit`.
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

    # --- coarse grids (needed by parareal with built-in coarse steps, and by MGRIT) ------
    def layer_parameters(self, n: int) -> tuple[np.ndarray, ...]:
        """The parameters of layer ``n`` as a tuple of arrays (averaged elementwise to
        form :class:`~ptoc.parallel.CoarseWeights` ``AVERAGE`` coarse weights)."""
        raise NotImplementedError(
            f"{type(self).__name__} has no coarse grid: parareal with built-in coarse steps "
            "and MGRIT need layer_parameters, coarse_step and coarse_adjoint_step "
            "(or give Parareal a coarse Propagator)")

    def coarse_step(self, params: tuple[np.ndarray, ...], n_layers: int,
                    x: np.ndarray) -> np.ndarray:
        """One step standing for ``n_layers`` layers, with layer parameters ``params``."""
        raise NotImplementedError(f"{type(self).__name__} defines no coarse_step")

    def coarse_adjoint_step(self, params: tuple[np.ndarray, ...], n_layers: int,
                            x: np.ndarray, lam: np.ndarray) -> np.ndarray:
        """Transposed Jacobian of :meth:`coarse_step` at ``x``, applied to ``lam``."""
        raise NotImplementedError(f"{type(self).__name__} defines no coarse_adjoint_step")

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


class LayerSlice(Propagator):
    """The layers ``start..stop-1`` of a propagator, holding (views of) those layers only.

    Layer indices stay global (``step(n, x)`` for ``start <= n < stop``); asking for any
    other layer raises, which is how a rank proves it touches only what it owns.
    Parameters and gradients are the owned slices (leading axis ``stop - start``).
    """

    def __init__(self, prop: ResNetPropagator, start: int, stop: int):
        local = Params(K=prop.params.K[start:stop], b=prop.params.b[start:stop],
                       K_in=None, b_in=None, W=prop.params.W, mu=prop.params.mu)
        self._setup(prop, local, start, stop)

    def _setup(self, prop: ResNetPropagator, local: Params, start: int, stop: int) -> None:
        self.network = prop.network
        self.start, self.stop = int(start), int(stop)
        self.n_layers = prop.network.depth
        self._inner = ResNetPropagator.__new__(ResNetPropagator)
        self._inner.__dict__.update(prop.__dict__)
        self._inner.params = local
        self._inner.n_layers = stop - start

    @classmethod
    def from_local(cls, network: ResNet, params: Params | Mapping, start: int, stop: int, *,
                   target: Target | str = Target.CPU) -> LayerSlice:
        """The slice built from parameters that hold the layers ``start..stop-1`` only.

        ``params.K`` and ``params.b`` have ``stop - start`` rows (row ``n - start`` is
        layer ``n``), as one rank of a layer-parallel run holds them; the full
        parameter set never exists in this process. Checked by
        ``network.check_params(params, layers=(start, stop))``.
        """
        if not 0 <= start < stop <= network.depth:
            raise ValueError(f"layers {start}..{stop - 1} are not a non-empty range of the "
                             f"network's {network.depth} layers")
        local = network.check_params(params, layers=(start, stop))
        template = ResNetPropagator.__new__(ResNetPropagator)
        template._configure(network, local, None, target)
        self = cls.__new__(cls)
        self._setup(template, Params(K=local.K, b=local.b, K_in=None, b_in=None, W=local.W,
                                     mu=local.mu), start, stop)
        return self

    def _local(self, n: int) -> int:
        if not self.start <= n < self.stop:
            raise IndexError(f"layer {n} is not held here (this slice holds layers "
                             f"{self.start}..{self.stop - 1})")
        return n - self.start

    def step(self, n, x):
        return self._inner.step(self._local(n), x)

    def adjoint_step(self, n, x, lam, grad=None):
        return self._inner.adjoint_step(self._local(n), x, lam, grad)

    def layer_gradient(self, n, x, lam_next, grad):
        self._inner.layer_gradient(self._local(n), x, lam_next, grad)

    def layer_gradients(self, first, xs, lams_next, grad):
        self._local(first)
        self._local(first + len(xs) - 1)
        self._inner.layer_gradients(first - self.start, xs, lams_next, grad)

    def stacked_parameters(self, layers):
        layers = np.asarray(layers, dtype=np.int64)
        if len(layers) and (layers.min() < self.start or layers.max() >= self.stop):
            bad = layers[(layers < self.start) | (layers >= self.stop)][0]
            raise IndexError(f"layer {bad} is not held here (this slice holds layers "
                             f"{self.start}..{self.stop - 1})")
        return self._inner.stacked_parameters(layers - self.start)

    def objective(self, x):
        return self._inner.objective(x)

    def objective_gradient(self, x):
        return self._inner.objective_gradient(x)

    def parameters(self):
        return self._inner.parameters()

    def layer_parameters(self, n):
        return self._inner.layer_parameters(self._local(n))

    def coarse_step(self, params, n_layers, x):
        return self._inner.coarse_step(params, n_layers, x)

    def coarse_adjoint_step(self, params, n_layers, x, lam):
        return self._inner.coarse_adjoint_step(params, n_layers, x, lam)

    def level_kernels(self):
        return self._inner.level_kernels()


class ResNetPropagator(Propagator):
    """The residual layers of a :class:`ResNet` as a :class:`Propagator`.

    ``step`` is ``x + h sigma(K_n x + b_n)``, the objective is the batch-mean softmax
    cross-entropy of the classifier for ``labels``, and ``parameters()`` is
    ``[K, b]`` (live views of ``params``). Kernels run on ``target``. ``adjoint_step``
    is ``lambda + h K_n^T (sigma'(a_n) * lambda)`` with the gradient of ``DESIGN.md``
    section 2. Theory: :doc:`/theory/resnet`, :doc:`/theory/adjoint`.

    Parameters
    ----------
    network : ResNet
    params : Params or dict
    labels : array of int (S,), optional
        Needed only for :meth:`objective` and :meth:`objective_gradient`.
    target : Target or str
    """

    def __init__(self, network: ResNet, params: Params | Mapping, labels=None, *,
                 target: Target | str = Target.CPU):
        self._configure(network, network.check_params(params), labels, target)

    def _configure(self, network: ResNet, params: Params, labels, target) -> None:
        self.network = network
        self.params = params
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        self.target = Target.parse(target)
        self._kern = backend(self.target)
        self.n_layers = network.depth
        self._act = network.activation.code
        self._h = network.h

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

    def layer_gradients(self, first, xs, lams_next, grad):
        """Add the gradients of layers ``first .. first+L-1`` to ``grad`` in one call:
        ``xs[l]`` is ``x_{first+l}`` and ``lams_next[l]`` is ``lambda_{first+l+1}``."""
        L = len(xs)
        K, b = self.params.K[first:first + L], self.params.b[first:first + L]
        gK, gb = grad[0][first:first + L], grad[1][first:first + L]
        if hasattr(self._kern, "layer_gradients"):
            self._kern.layer_gradients(xs, lams_next, K, b, self._h, self._act, gK, gb,
                                       _config.CHUNK)
        else:
            for n in range(L):
                self._kern.param_grad(xs[n], lams_next[n], K[n], b[n], self._h, self._act,
                                      gK[n], gb[n], None, _config.CHUNK)

    def stacked_parameters(self, layers):
        """``(K[layers], b[layers])`` as stacked arrays: views when ``layers`` is a range
        with step 1 or -1, else fancy-indexing copies (read them, never write)."""
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

    def layer_gradient(self, n, x, lam_next, grad):
        """Add ``d(lam_next . Phi_n(x))/d theta_n`` to ``grad`` (no adjoint output)."""
        self._kern.param_grad(x, lam_next, self.params.K[n], self.params.b[n], self._h,
                              self._act, grad[0][n], grad[1][n], None, _config.CHUNK)

    def level_kernels(self):
        """``(kernel module, activation code, h, chunk)`` when the target has compiled
        level kernels (used by the layer-parallel solvers), else None."""
        if hasattr(self._kern, "state_runs"):
            return self._kern, self._act, self._h, _config.CHUNK
        return None

    def coarse_step(self, params, n_layers, x):
        """``x + n_layers h sigma(K x + b)`` with ``(K, b) = params`` (``DESIGN.md`` sec. 4)."""
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
        else:
            grad = [g[start:stop] for g in grad]
        lam = np.ascontiguousarray(lam)
        return np.asarray(self._kern.adjoint_sweep(
            np.ascontiguousarray(states), lam, self.params.K[start:stop],
            self.params.b[start:stop], self._h, self._act, None, grad[0], grad[1], None,
            _config.CHUNK))


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
       ``prop.tangent_step`` when the propagator has one, else from Richardson-
       extrapolated central differences of ``step`` (accuracy about ``eps^4``);
    2. **layer gradient**: the ``grad`` accumulated by ``adjoint_step`` against finite
       differences of ``<mu, Phi_n(x_n; theta)>`` along a random parameter direction;
    3. **objective gradient**: ``objective_gradient`` against finite differences of
       ``objective``;
    4. **whole chain**: the gradient of ``objective(propagate(x0))`` in all layer
       parameters and in ``x0``, from ``adjoint_propagate``, against finite differences;
    5. **range methods**: ``propagate`` and ``adjoint_propagate`` equal the loop over
       ``step`` and ``adjoint_step``.

    Check 1 is the dot-product identity of ``DESIGN.md`` section 2 (the adjoint is the
    transpose of the linearised step). Theory: :doc:`/theory/adjoint`.

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
        if hasattr(prop, "tangent_step"):
            jdx = prop.tangent_step(n, x, dx)
        else:
            jdx = np.empty_like(x)
            flat = jdx.reshape(-1)

            def comp(t, dx=dx, x=x, n=n):
                return prop.step(n, x + t * scale * dx)

            d1 = (comp(eps) - comp(-eps)) / (2 * eps * scale)
            d2 = (comp(eps / 2) - comp(-eps / 2)) / (eps * scale)
            flat[:] = ((4 * d2 - d1) / 3).reshape(-1)
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
    if raise_on_failure:
        report.raise_if_failed()
    return report
