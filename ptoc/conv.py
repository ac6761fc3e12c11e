r"""Convolutional residual networks: the ResNet's control problem with 3 x 3 convolutions.

A :class:`ConvResNet` keeps ``C`` channels of ``H x W`` pixels as its state, ``x_n`` of
shape ``(S, C, H, W)`` for a batch of ``S`` images, and is the discrete control problem

.. math::

    x_0 = \sigma(\operatorname{conv}(Y, K_{in}) + b_{in}), \qquad
    x_{n+1} = x_n + h\, \sigma(\operatorname{conv}(x_n, K_n) + b_n), \quad
    n = 0, \dots, N - 1, \quad h = T / N,

    z = W \operatorname{vec}(x_N) + \mu, \qquad
    J = \tfrac1S \textstyle\sum_s \operatorname{CE}(\operatorname{softmax}(z_s), c_s)
        + R(\theta),

with ``K_n`` (C, C, 3, 3), ``b_n`` (C,), ``K_in`` (C, C_img, 3, 3), ``b_in`` (C,), ``W``
(n_classes, C H W) and ``mu`` (n_classes,). ``conv`` is PyTorch's ``conv2d`` with stride
1 and zero padding 1 (a cross-correlation; the kernels and the adjoint are
:mod:`ptoc.kernels.conv_reference`), ``vec`` flattens a state in C order (channel,
row, column), and ``R`` is the ResNet's regulariser (:mod:`ptoc.objective`) with
``theta_n = (K_n, b_n)``: ``gamma/2 sum_n h (|K_n|^2 + |b_n|^2) + gamma_t/2 sum_n h
|(theta_{n+1} - theta_n)/h|^2 + gamma_c/2 (|W|^2 + |mu|^2 + |K_in|^2 + |b_in|^2)``.

The network is a :class:`ptoc.propagator.Model` whose layers are a
:class:`ConvResNetPropagator`, coarse grid included (a coarse step standing for ``L``
layers is one step of size ``L h`` with the given weights, as the ResNet's), so the
layer-parallel gradient (Serial, Parareal, MGRIT), simultaneous training, PGCL and the
methods of successive approximations train it through that contract, and
``ptoc.loss_and_grad``, ``ptoc.forward``, ``ptoc.adjoint``, ``ptoc.predict``,
``ptoc.accuracy`` and ``ptoc.loss`` accept it. Theory: :doc:`/theory/conv`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from . import _config
from ._checks import check_inputs as _check_flat_inputs
from ._checks import check_positive_int
from .activations import Activation
from .kernels import Target
from .kernels.conv import conv_backend
from .model import Params, _check_dtype, _check_final_time, _check_magnitude, check_param_arrays
from .objective import (
    classifier_loss,
    head_regulariser,
    layer_regulariser_terms,
    logits,
    range_regulariser,
)
from .propagator import LevelPlan, LevelSteps, Model, ParamsPropagator

__all__ = ["ConvResNet", "ConvResNetPropagator", "ConvLevelSteps", "ConvCudaLevelSteps"]


@dataclass(frozen=True)
class ConvResNet(Model):
    """A residual network of 3 x 3 convolutions as a discrete control problem (module doc).

    Parameters
    ----------
    channels : int
        ``C``, the channels of every state.
    depth : int
        ``N``, the number of residual layers.
    T : float
        Final time; the step is ``h = T / N`` (the limits of :class:`ptoc.ResNet`).
    activation : Activation or str
        ``"tanh"``, ``"relu"`` or ``"smoothrelu"``.
    image_shape : (int, int, int)
        ``(C_img, H, W)`` of the input images; every state has ``H x W`` pixels.
    n_classes : int
        Number of classes (at least 2).
    gamma, gamma_t, gamma_c : float
        Weights of the Tikhonov, time-smoothness and classifier/opening regularisers.
    dtype : numpy dtype
        ``float64`` (default) or ``float32``.

    Inputs ``X`` are images ``(S, C_img, H, W)`` or the same flattened in C order,
    ``(S, C_img H W)`` (as :func:`ptoc.data.mnist` gives them), which are reshaped.

    Examples
    --------
    >>> import ptoc
    >>> net = ptoc.ConvResNet(channels=4, depth=8, image_shape=(1, 28, 28))
    >>> sorted(net.init_params(0).to_dict())
    ['K', 'K_in', 'W', 'b', 'b_in', 'mu']
    """

    channels: int
    depth: int
    T: float = 1.0
    activation: Activation = Activation.TANH
    image_shape: tuple[int, int, int] = (1, 28, 28)
    n_classes: int = 10
    gamma: float = 1e-4
    gamma_t: float = 1e-4
    gamma_c: float = 1e-4
    dtype: np.dtype = field(default=np.dtype(np.float64))

    layer_keys = ("K", "b")
    opening_keys = ("K_in", "b_in")
    terminal_keys = ("W", "mu")

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "channels", check_positive_int("channels", self.channels))
        set_(self, "depth", check_positive_int("depth", self.depth))
        set_(self, "n_classes", check_positive_int("n_classes", self.n_classes))
        if self.n_classes < 2:
            raise ValueError(f"n_classes must be >= 2, got {self.n_classes}")
        try:
            shape = tuple(self.image_shape)
        except TypeError:
            shape = ()
        if len(shape) != 3:
            raise ValueError("image_shape must be (channels, height, width), got "
                             f"{self.image_shape!r}")
        set_(self, "image_shape", tuple(check_positive_int(f"image_shape[{i}]", v)
                                        for i, v in enumerate(shape)))
        dt = _check_dtype(self.dtype)
        set_(self, "dtype", dt)
        set_(self, "T", _check_final_time(self.T, self.depth, dt))
        set_(self, "activation", Activation.parse(self.activation))
        for name in ("gamma", "gamma_t", "gamma_c"):
            set_(self, name, _check_magnitude(name, getattr(self, name), dt))

    # --- the network ------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        """``N``, the number of residual layers (the :class:`Model` contract's name)."""
        return self.depth

    @property
    def h(self) -> float:
        """Layer step ``h = T / N``."""
        return self.T / self.depth

    @property
    def n_in(self) -> int:
        """Input features of a flattened image, ``C_img H W``."""
        return int(np.prod(self.image_shape))

    @property
    def state_features(self) -> int:
        """Entries of one sample's state, ``C H W`` (the classifier's input)."""
        return self.channels * self.image_shape[1] * self.image_shape[2]

    def describe(self) -> str:
        """One-line summary, e.g. ``ConvResNet(C=4, N=8, T=1, tanh, 1x28x28->10)``."""
        c, hh, ww = self.image_shape
        return (f"ConvResNet(C={self.channels}, N={self.depth}, T={self.T:g}, "
                f"{self.activation.value}, {c}x{hh}x{ww}->{self.n_classes})")

    def param_shapes(self, layers: tuple[int, int] | None = None) -> dict[str, tuple[int, ...]]:
        """Shapes of the parameter arrays; with ``layers=(start, stop)`` ``K`` and ``b`` hold
        the layers ``start..stop-1`` only."""
        C, N = self.channels, self.depth if layers is None else layers[1] - layers[0]
        return {"K": (N, C, C, 3, 3), "b": (N, C), "K_in": (C, self.image_shape[0], 3, 3),
                "b_in": (C,), "W": (self.n_classes, self.state_features),
                "mu": (self.n_classes,)}

    def accuracy(self, params, X, y, *, target: Target | str = Target.CPU) -> float:
        """Fraction of ``X`` classified as ``y`` (:func:`ptoc.accuracy`); the training loop
        reports it per epoch."""
        p = self.check_params(params)
        X, y = self.check_inputs(X, y)
        xN = self.final_state(p, X, target=target)
        return float(np.mean(np.argmax(logits(p, xN.reshape(len(xN), -1)), axis=1) == y))

    def init_params(self, seed: int | np.random.Generator | None = 0,
                    scale: float = 1.0) -> Params:
        """Random parameters: Gaussian weights of variance ``scale^2 / fan_in``, zero biases.

        ``K_n ~ N(0, scale^2 / (9 C))``, ``K_in ~ N(0, scale^2 / (9 C_img))``, ``W ~ N(0,
        scale^2 / (C H W))``; ``b_n = b_in = mu = 0``. Drawn in that order from
        ``np.random.default_rng(seed)``.
        """
        if not (seed is None or isinstance(seed, np.random.Generator)):
            if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) \
                    or seed < 0:
                raise ValueError("seed must be None, an integer >= 0 or a "
                                 f"numpy.random.Generator, got {seed!r}")
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        scale = _check_magnitude("scale", scale, self.dtype)
        shapes = self.param_shapes()

        def gauss(key: str, fan_in: int) -> np.ndarray:
            return (rng.standard_normal(shapes[key]) * (scale / np.sqrt(fan_in))).astype(
                self.dtype)

        K = gauss("K", 9 * self.channels)
        K_in = gauss("K_in", 9 * self.image_shape[0])
        W = gauss("W", self.state_features)
        return Params(K=K, b=np.zeros(shapes["b"], self.dtype), K_in=K_in,
                      b_in=np.zeros(shapes["b_in"], self.dtype), W=W,
                      mu=np.zeros(shapes["mu"], self.dtype))

    def check_params(self, params: Params | Mapping, layers: tuple[int, int] | None = None
                     ) -> Params:
        """``params`` validated against this network, as :class:`ptoc.Params` of its dtype.

        Raises ``ValueError`` naming the key for a missing or unexpected key, a wrong
        shape, a non-real dtype or a non-finite entry.
        """
        if not isinstance(params, Mapping):
            raise TypeError(f"params must be a ptoc.Params or a dict of arrays, got "
                            f"{type(params).__name__}")
        return check_param_arrays(params, self.param_shapes(layers), self.dtype,
                                  self.describe(), layers)

    def images(self, X) -> np.ndarray:
        """``X`` as images ``(S, C_img, H, W)``: flattened rows ``(S, C_img H W)`` are reshaped
        (C order), images are checked for their shape (no other validation)."""
        X = np.asarray(X)
        if X.ndim == 4:
            if X.shape[1:] != self.image_shape:
                raise ValueError(f"X has images of shape {X.shape[1:]}, but the network expects "
                                 f"image_shape={self.image_shape}")
            return X
        if X.ndim == 2 and X.shape[1] == self.n_in:
            return X.reshape((X.shape[0],) + self.image_shape)
        raise ValueError(f"X must be images (S, {', '.join(map(str, self.image_shape))}) or "
                         f"flattened images (S, {self.n_in}), got shape {X.shape}")

    # --- the Model contract -------------------------------------------------------------------
    def check_inputs(self, X, labels=None):
        """``(images (S, C_img, H, W), labels int64)`` validated (shape, finite values,
        labels in ``[0, n_classes)``); flattened images are reshaped."""
        X = self.images(X)
        flat, y = _check_flat_inputs(self, X.reshape(X.shape[0], -1), labels)
        return flat.reshape(X.shape), y

    def layers(self, params, *, target: Target | str = Target.CPU,
               span: tuple[int, int] | None = None) -> ConvResNetPropagator:
        return ConvResNetPropagator(self, self.pack(params), target=target, layers=span,
                                    check=False)

    def propagator(self, params, labels=None, *, target: Target | str = Target.CPU
                   ) -> ConvResNetPropagator:
        """All layers over ``params`` (validated) with the classifier's objective for
        ``labels`` (for :func:`ptoc.check_propagator`)."""
        return ConvResNetPropagator(self, params, labels, target=target)

    def state_shape(self, X) -> tuple[int, ...]:
        return (np.shape(X)[0], self.channels) + self.image_shape[1:]

    def opening(self, params, X, *, target: Target | str = Target.CPU):
        """``(x_0, (Y, sigma'(a_in)))`` with ``x_0 = sigma(conv(Y, K_in) + b_in)`` for the
        images ``Y`` of ``X`` (on the Numba CPU kernels unless ``target`` says otherwise:
        the layer-parallel driver calls it without a target)."""
        kern = conv_backend(target)
        Y = np.ascontiguousarray(self.images(X), dtype=self.dtype)
        x0 = np.empty((Y.shape[0],) + self.state_shape(Y)[1:], self.dtype)
        dsig = np.empty_like(x0)
        kern.layer(Y, np.ascontiguousarray(params["K_in"], dtype=self.dtype),
                   np.ascontiguousarray(params["b_in"], dtype=self.dtype), 1.0,
                   self.activation.code, False, x0, dsig)
        return x0, (Y, dsig)

    def opening_gradient(self, params, X, lam0, cache):
        """``dJ/dK_in = kernel_gradient(Y, sigma'(a_in) * lambda_0)`` and ``dJ/db_in`` = the
        sum of ``sigma'(a_in) * lambda_0`` over samples and pixels: the gradient part of
        the layer adjoint with step 1 (:func:`ptoc.kernels.conv_reference.adjoint`), on
        the Numba CPU kernels, from the ``sigma'(a_in)`` that :meth:`opening` kept."""
        Y, dsig = cache
        gK = np.zeros(params["K_in"].shape, self.dtype)
        gb = np.zeros(params["b_in"].shape, self.dtype)
        conv_backend(Target.CPU).adjoint(
            Y, np.ascontiguousarray(lam0, dtype=self.dtype), np.ascontiguousarray(
                params["K_in"], dtype=self.dtype), np.ascontiguousarray(
                params["b_in"], dtype=self.dtype), 1.0, self.activation.code, None, gK, gb,
            dsig)
        return {"K_in": gK, "b_in": gb}

    def terminal(self, params, x_last, labels):
        """The ResNet's classifier on ``vec(x_N)``: ``(Phi, lambda_N, {W, mu})``."""
        S = x_last.shape[0]
        loss, lam, dW, dmu = classifier_loss(self.pack(params), x_last.reshape(S, -1),
                                             np.asarray(labels, np.int64))
        return loss, lam.reshape(x_last.shape), {"W": dW, "mu": dmu}

    def layer_regulariser(self, arrays, left, right, grads=None):
        return range_regulariser(self, list(arrays), left, right, want_grad=grads is not None,
                                 add_to=grads)[0]

    def regulariser_terms(self, thetas, prev_diffs, next_diffs, want_grad=True):
        return layer_regulariser_terms(self, thetas, prev_diffs, next_diffs, want_grad)

    def head_regulariser(self, params, grads=None):
        return head_regulariser(self, params, grads)

    def pack(self, arrays) -> Params:
        if isinstance(arrays, Params):
            return arrays
        return Params(**{k: arrays.get(k) for k in ("K", "b", "K_in", "b_in", "W", "mu")})

    def hamiltonian_gradient(self, params, n, x, p_next, *, target=Target.CPU):
        """``grad_theta sum_s H_n``: the kernels' layer-Hamiltonian gradient minus the
        regulariser's gradient of layer ``n`` (Li & Hao's maximum principle)."""
        kern = conv_backend(target)
        K, b = params["K"], params["b"]
        gK, gb = np.zeros_like(K[n]), np.zeros_like(b[n])
        kern.hamiltonian_grad(np.ascontiguousarray(x), np.ascontiguousarray(p_next), K[n], b[n],
                              self.h, self.activation.code, gK, gb)
        left = (K[n - 1], b[n - 1]) if n > 0 else None
        right = (K[n + 1], b[n + 1]) if n < self.depth - 1 else None
        reg = [np.zeros((1,) + gK.shape, gK.dtype), np.zeros((1,) + gb.shape, gb.dtype)]
        self.layer_regulariser([K[n:n + 1], b[n:n + 1]], left, right, reg)
        return [gK - reg[0][0], gb - reg[1][0]]

    # --- evaluation ---------------------------------------------------------------------------
    def final_state(self, params, X, *, target: Target | str = Target.CPU) -> np.ndarray:
        """``x_N`` for inputs ``X`` (validated)."""
        p = self.check_params(params)
        X, _ = self.check_inputs(X)
        prop = ConvResNetPropagator(self, p, target=target, check=False)
        return prop.propagate(self.opening(p, X, target=target)[0])


class ConvResNetPropagator(ParamsPropagator):
    """The residual layers of a :class:`ConvResNet` as a :class:`~ptoc.Propagator`.

    ``step`` is ``x + h sigma(conv(x, K_n) + b_n)`` on states (S, C, H, W);
    ``adjoint_step`` is ``lambda + h conv^T(sigma'(a) * lambda, K_n)`` and accumulates
    ``dJ/dK_n``, ``dJ/db_n`` (:mod:`ptoc.kernels.conv_reference`); ``parameters()`` is
    ``[K, b]`` (live arrays); the objective is the classifier's batch-mean
    cross-entropy on ``vec(x_N)`` for ``labels``. A coarse step standing for ``L``
    layers is one step of size ``L h`` with the weights given (as the ResNet's).

    Parameters
    ----------
    network : ConvResNet
    params : Params or dict
    labels : array of int (S,), optional
        Needed only for :meth:`objective` and :meth:`objective_gradient`.
    target : Target or str
        ``"numpy"``, ``"cpu"`` or ``"cuda"``.
    layers : (int, int), optional
        ``K`` and ``b`` hold the layers ``start..stop-1`` only; the propagator then has
        ``stop - start`` layers indexed from 0.
    check : bool
        Validate ``params``; False only for parameters validated already.

    Notes
    -----
    The serial gradient on one rank (:func:`ptoc.parallel.parallel_gradient` with
    ``Serial()``) runs the contract's :meth:`gradient_forward` and
    :meth:`gradient_backward`, which this class overrides: the first keeps
    ``sigma'(a_n)`` of every layer while computing the states, the second computes each
    ``lambda_n`` and the gradient of layer ``n`` together from it, with no convolution
    recomputed: one convolution per layer forward, a transposed convolution and a
    kernel gradient per layer backward. The stored ``sigma'`` is as large as the states;
    it is kept for as many layers as fit ``ptoc._config.STORED_DERIVATIVE_BYTES`` (the
    others are recomputed), on every target. :meth:`level_steps` runs a whole relaxation
    of an MGRIT level as one compiled call on the ``"cpu"`` target
    (:class:`ConvLevelSteps`), and on the device on ``"cuda"``.
    """

    has_coarse_grid = True
    kernel_backend = staticmethod(conv_backend)

    def initial_state(self, X) -> np.ndarray:
        """``x_0``, the opening applied to the inputs ``X`` (validated)."""
        X, _ = self.network.check_inputs(X)
        return self.network.opening(self.params, X, target=self.target)[0]

    def _step(self, K, b, dt, x):
        x = np.ascontiguousarray(x)
        return self._kern.layer(x, np.ascontiguousarray(K), np.ascontiguousarray(b), dt,
                                self._act, True, np.empty_like(x), None)

    def _adjoint(self, K, b, dt, x, lam, gK=None, gb=None):
        lam = np.ascontiguousarray(lam)
        return self._kern.adjoint(np.ascontiguousarray(x), lam, np.ascontiguousarray(K),
                                  np.ascontiguousarray(b), dt, self._act, np.empty_like(lam),
                                  gK, gb)

    def step(self, n, x):
        return self._step(self.params.K[n], self.params.b[n], self._h, x)

    def adjoint_step(self, n, x, lam, grad=None):
        gK, gb = (None, None) if grad is None else (grad[0][n], grad[1][n])
        return self._adjoint(self.params.K[n], self.params.b[n], self._h, x, lam, gK, gb)

    def layer_gradient(self, n, x, lam_next, grad):
        self._kern.adjoint(np.ascontiguousarray(x), np.ascontiguousarray(lam_next),
                           self.params.K[n], self.params.b[n], self._h, self._act, None,
                           grad[0][n], grad[1][n])

    def layer_gradients(self, first, xs, lams_next, grad):
        """On ``"cuda"`` one call of :func:`ptoc.kernels.conv_cuda.layer_gradients` (the
        arrays copied to the device once, not once per layer; the same bits as
        :meth:`layer_gradient`); on the other targets the default loop."""
        if self.target is not Target.CUDA:
            super().layer_gradients(first, xs, lams_next, grad)
            return
        L = len(xs)
        self._kern.layer_gradients(np.ascontiguousarray(xs), np.ascontiguousarray(lams_next),
                                   self.params.K[first:first + L],
                                   self.params.b[first:first + L], self._h, self._act,
                                   grad[0][first:first + L], grad[1][first:first + L])

    def _labels(self) -> np.ndarray:
        if self.labels is None:
            raise ValueError("this ConvResNetPropagator has no labels: pass labels= to use "
                             "the objective")
        return self.labels

    def objective(self, x):
        return self.network.terminal(self.params, x, self._labels())[0]

    def objective_gradient(self, x):
        return self.network.terminal(self.params, x, self._labels())[1]

    def parameters(self):
        return [self.params.K, self.params.b]

    def layer_parameters(self, n):
        return (self.params.K[n], self.params.b[n])

    def coarse_step(self, params, n_layers, x):
        """``x + n_layers h sigma(conv(x, K) + b)`` with ``(K, b) = params``."""
        return self._step(params[0], params[1], n_layers * self._h, x)

    def coarse_adjoint_step(self, params, n_layers, x, lam):
        """``lam + n_layers h conv^T(sigma'(a) * lam, K)``."""
        return self._adjoint(params[0], params[1], n_layers * self._h, x, lam)

    def level_steps(self, plan: LevelPlan) -> LevelSteps:
        """:class:`ConvLevelSteps` on the ``"cpu"`` target, :class:`ConvCudaLevelSteps` on
        ``"cuda"``, else (``"numpy"``) the generic steps."""
        if self.target is Target.CPU:
            return ConvLevelSteps(self, plan)
        if self.target is Target.CUDA:
            return ConvCudaLevelSteps(self, plan)
        return LevelSteps(self, plan)

    # --- the serial gradient: sigma' kept by the state sweep ---------------------------------
    def stored_derivative_layers(self, state: np.ndarray) -> int:
        """How many layers keep ``sigma'(a_n)`` in :meth:`gradient_forward` for states
        like ``state``: as many as fit ``ptoc._config.STORED_DERIVATIVE_BYTES``."""
        return int(min(self.n_layers, _config.STORED_DERIVATIVE_BYTES // max(state.nbytes, 1)))

    def gradient_forward(self, x0: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """``(states, dsig)``: the states ``x_0 .. x_N`` (N+1, S, C, H, W) from ``x0``, and
        ``sigma'(a_n)`` of the first :meth:`stored_derivative_layers` layers (or None),
        for :meth:`gradient_backward`."""
        x0 = np.ascontiguousarray(x0)
        N = self.n_layers
        states = np.empty((N + 1,) + x0.shape, x0.dtype)
        states[0] = x0
        kept = self.stored_derivative_layers(x0)
        dsig = np.empty((kept,) + x0.shape, x0.dtype) if kept else None
        K, b = self.params.K, self.params.b
        for n in range(N):
            self._kern.layer(states[n], K[n], b[n], self._h, self._act, True, states[n + 1],
                             dsig[n] if n < kept else None)
        return states, dsig

    def gradient_backward(self, states: np.ndarray, dsig: np.ndarray | None,
                          lam_N: np.ndarray, grad: list[np.ndarray]) -> np.ndarray:
        """All adjoints ``lambda_0 .. lambda_N`` (layer order) from ``lam_N``, adding the
        data part of every layer's gradient into ``grad`` in the same pass; ``dsig`` as
        :meth:`gradient_forward` returns it. Each step equals :meth:`adjoint_step` with
        ``grad``, bit for bit."""
        N = self.n_layers
        lam_N = np.ascontiguousarray(lam_N)
        lams = np.empty((N + 1,) + lam_N.shape, lam_N.dtype)
        lams[N] = lam_N
        kept = 0 if dsig is None else len(dsig)
        K, b = self.params.K, self.params.b
        for n in range(N - 1, -1, -1):
            if n < kept:
                self._kern.adjoint(states[n], lams[n + 1], K[n], b[n], self._h, self._act,
                                   lams[n], grad[0][n], grad[1][n], dsig[n])
            else:
                self._kern.adjoint(states[n], lams[n + 1], K[n], b[n], self._h, self._act,
                                   lams[n], grad[0][n], grad[1][n])
        return lams


class ConvLevelSteps(LevelSteps):
    """:class:`~ptoc.propagator.LevelSteps` of a :class:`ConvResNetPropagator` on the
    compiled level kernels of :mod:`ptoc.kernels.conv_cpu`.

    Every step of a level is ``x + dt sigma(conv(x, K) + b)`` (fine: layer ``n``'s
    ``K_n, b_n`` and ``dt = h``; coarse: the plan's coarse weights and ``dt = span h``)
    or its adjoint at the plan's states, so the level's weights are stacked once and
    :meth:`runs` and :meth:`points_apply` are one compiled call each, parallel over the
    samples (each sample's chain of steps is independent of the others). Each step does
    the per-sample arithmetic of the batched kernels: the results equal the generic
    :class:`~ptoc.propagator.LevelSteps` bit for bit, whatever the number of threads.
    The kernels index steps from 1, so row 0 of each stacked array is unused. An adjoint
    level computes ``sigma'`` of each of its steps once, for the solve (``D``).
    """

    def __init__(self, prop: ConvResNetPropagator, plan: LevelPlan):
        super().__init__(prop, plan)
        n = plan.n_steps
        C = prop.network.channels
        stack = None
        if n:
            stack = prop.stacked_parameters(plan.layers) if plan.fine else plan.weights
        # the weights keep their dtype (coarse weights may be wider than the network's)
        K_dtype, b_dtype = ((prop.network.dtype,) * 2 if stack is None
                            else (stack[0].dtype, stack[1].dtype))
        self.K = np.zeros((n + 1, C, C, 3, 3), K_dtype)
        self.b = np.zeros((n + 1, C), b_dtype)
        self.dt = np.zeros(n + 1)  # float64, as the step size of the batched kernels
        self.dt[1:] = plan.spans * prop._h
        if stack is not None:
            self.K[1:], self.b[1:] = stack
        self.X = self.D = None
        if plan.backward:
            self.X = np.empty((n + 1,) + plan.states.shape[1:], plan.states.dtype)
            self.X[1:] = plan.states
        self.kern, self.act = prop._kern, prop._act
        self._place(prop)
        if plan.backward:
            # sigma' of every step, once: the states do not change during an adjoint
            # solve, so each adjoint step then runs one convolution (the transpose), not two
            self.D = self.kern.level_derivatives(self.X, self.K, self.b, self.dt, self.act,
                                                 None)

    def _place(self, prop: ConvResNetPropagator) -> None:
        """Where the level's arrays live during the solve: here, in host memory."""

    def runs(self, u, g, starts, ends) -> None:
        starts = np.asarray(starts, dtype=np.int64)
        ends = np.asarray(ends, dtype=np.int64)
        if len(starts) == 0:
            return
        if self.X is None:
            self.kern.state_runs(u, g, self.K, self.b, self.dt, self.act, starts, ends)
        else:
            self.kern.adjoint_runs(u, g, self.X, self.K, self.b, self.dt, self.act, starts,
                                   ends, self.D)

    def points_apply(self, u, positions) -> np.ndarray:
        positions = np.asarray(positions, dtype=np.int64)
        out = np.empty((len(positions),) + u.shape[1:], u.dtype)
        if len(positions) == 0:
            return out
        if self.X is None:
            self.kern.state_points(u, self.K, self.b, self.dt, self.act, positions, out)
        else:
            self.kern.adjoint_points(u, self.X, self.K, self.b, self.dt, self.act, positions,
                                     out, self.D)
        return out


class ConvCudaLevelSteps(ConvLevelSteps):
    """:class:`ConvLevelSteps` on the CUDA level kernels of :mod:`ptoc.kernels.conv_cuda`,
    with the level's data kept on the device.

    The stacked weights ``K``, ``b``, the step sizes ``dt`` (in the network's dtype, the
    step size the one-step CUDA kernels use) and, for an adjoint level, the states ``X``
    are copied to the device here, once, and stay there for the object's lifetime (a
    solve); so :meth:`runs` and :meth:`points_apply` move only the level's values ``u``
    (and the right-hand side ``g``) and the step indices, once each way per call, whatever
    the number of steps (:func:`ptoc.kernels.cuda.counting_transfers` counts them). Each
    step does the entry arithmetic of the one-step kernels, so the results equal the
    generic :class:`~ptoc.propagator.LevelSteps` on ``"cuda"`` bit for bit.
    """

    def _place(self, prop: ConvResNetPropagator) -> None:
        """On the device (``sigma'`` of an adjoint level is then computed there, from the
        device copy of its states: no transfer)."""
        to_device = self.kern.to_device
        self.dt = to_device(self.dt, dtype=prop.network.dtype)
        self.K, self.b, self.X = (to_device(a) for a in (self.K, self.b, self.X))
