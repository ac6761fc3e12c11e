r"""Layered networks whose widths change: dense layers, batch normalisation, ReLU or tanh.

Li & Hao's maximum principle holds for any discrete-time control system
``x_{n+1} = f_n(x_n, theta_n)``, not only for ResNets: their MNIST network is
784 -> 2048 -> 2048 -> 2048 -> 10, each layer a dense matrix product followed by batch
normalisation and (except the last) a ReLU. With batch normalisation the samples of a
batch are coupled (the layer normalises each feature by the batch's mean and
variance), so the state of the control system is the whole batch ``x_n`` (S, d_n).

Layer ``n`` maps ``x`` (S, d_n) to

.. math::

    z = x W_n^T, \qquad \hat z = (z - \mu) / s, \quad
    \mu = \tfrac1S \textstyle\sum_s z_s, \quad s = \sqrt{\tfrac1S \textstyle\sum_s
    (z_s - \mu)^2 + \epsilon}, \qquad a = \gamma_n \odot \hat z + \beta_n,
    \qquad x_{n+1} = \sigma(a)

(statistics per feature; without batch normalisation ``a = z + b_n``; the last layer
has no ``sigma`` unless asked). Its exact adjoint in ptoc's convention (``lambda =
dJ/dx``, co-state ``p = -lambda``), with ``g = sigma'(a) * lambda_{n+1}``:

.. math::

    \frac{\partial J}{\partial\gamma_n} = \textstyle\sum_s g_s \odot \hat z_s, \quad
    \frac{\partial J}{\partial\beta_n} = \textstyle\sum_s g_s, \quad
    \zeta = \frac{1}{s}\Big(\gamma_n g - \overline{\gamma_n g}
    - \hat z \odot \overline{\gamma_n g \odot \hat z}\Big),

    \frac{\partial J}{\partial W_n} = \zeta^T x, \qquad \lambda_n = \zeta W_n,

where the bars are batch means. Prediction uses batch normalisation in evaluation
mode, ``hat z = (z - m) / sqrt(v + eps)`` with population statistics ``m, v``
(:meth:`LayeredNetwork.population_statistics`). Theory: :doc:`/theory/msa`.

**Padding.** ptoc's :class:`~ptoc.propagator.Propagator` contract stacks the layer
parameters along a leading layer axis and keeps one state shape. A layered network
therefore pads: a state is (S, D) with ``D = max(widths)``, holding ``x_n`` in its
first ``d_n`` columns and zeros after; ``W`` is (N, D, D) with layer ``n`` in its
``d_{n+1} x d_n`` top-left block (:meth:`LayeredNetwork.weight_mask`) and zeros
elsewhere; ``gamma, beta`` (or ``b``) are (N, D). The products use the blocks only, so
padding costs memory, not arithmetic.

The network is a :class:`ptoc.propagator.Model`: the serial sweeps,
:func:`ptoc.parallel.parallel_gradient` with :class:`ptoc.Serial`, gradient training and
the methods of successive approximations (:mod:`ptoc.msa`, including Li & Hao's
discrete weights, :meth:`ptoc.msa.DiscreteMSA.li_hao`) train it. It has no coarse
grid (a layer cannot stand for several layers of other widths), so MGRIT and parareal
with built-in coarse steps refuse it before any step runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ._checks import check_integer, check_real
from .activations import Activation
from .kernels import Target
from .objective import cross_entropy
from .propagator import Model, Propagator

__all__ = ["BatchStatistics", "LayeredNetwork", "LayeredPropagator"]


@dataclass(frozen=True)
class BatchStatistics:
    """Per-layer feature means and variances for batch normalisation in evaluation
    mode: ``mean`` and ``var`` are (N, D), padded like ``gamma``."""

    mean: np.ndarray
    var: np.ndarray


class LayeredNetwork(Model):
    """A dense network of any widths with optional batch normalisation (module docstring).

    Parameters
    ----------
    widths : sequence of int
        ``(d_0, d_1, ..., d_N)``: input features, hidden widths, classes (``N >= 1``
        layers, every width ``>= 1``, at least 2 classes).
    activation : Activation or str
        ``"relu"`` (default) or ``"tanh"`` (any :class:`ptoc.Activation`).
    batch_norm : bool
        Batch normalisation after every product (default True); without it each layer
        has a bias ``b``.
    last_activation : bool
        Apply ``sigma`` after the last layer too (default False: its output, the
        class scores, is linear in the normalised product).
    bn_eps : float
        ``epsilon`` of the batch normalisation (default 1e-4, Li & Hao's).

    Attributes
    ----------
    layer_keys : tuple of str
        ``("W", "gamma", "beta")`` with batch normalisation, else ``("W", "b")``.
    width : int
        ``D = max(widths)``, the padded state width.
    """

    opening_keys = ()
    terminal_keys = ()

    def __init__(self, widths, *, activation: Activation | str = Activation.RELU,
                 batch_norm: bool = True, last_activation: bool = False,
                 bn_eps: float = 1e-4):
        try:
            widths = tuple(widths)
        except TypeError:
            raise ValueError(f"widths must be a sequence of ints, got {widths!r}") from None
        if len(widths) < 2:
            raise ValueError(f"widths must hold at least 2 entries (inputs and classes), got "
                             f"{widths!r}")
        self.widths = tuple(check_integer(f"widths[{i}]", w, 1) for i, w in enumerate(widths))
        if self.widths[-1] < 2:
            raise ValueError(f"widths[-1] (the number of classes) must be >= 2, got "
                             f"{self.widths[-1]}")
        self.activation = Activation.parse(activation)
        self.batch_norm = bool(batch_norm)
        self.last_activation = bool(last_activation)
        self.bn_eps = check_real("bn_eps", bn_eps, low=0.0, low_open=True)
        self.n_layers = len(self.widths) - 1
        self.width = max(self.widths)
        self.dtype = np.dtype(np.float64)
        self.layer_keys = ("W", "gamma", "beta") if self.batch_norm else ("W", "b")

    def __repr__(self) -> str:
        return (f"LayeredNetwork(widths={self.widths}, activation={self.activation.value!r}, "
                f"batch_norm={self.batch_norm}, last_activation={self.last_activation})")

    @property
    def n_in(self) -> int:
        return self.widths[0]

    @property
    def n_classes(self) -> int:
        return self.widths[-1]

    # --- parameters ---------------------------------------------------------------------------
    def weight_mask(self) -> np.ndarray:
        """(N, D, D) bool: True on each layer's ``d_{n+1} x d_n`` block of ``W``."""
        mask = np.zeros((self.n_layers, self.width, self.width), dtype=bool)
        for n in range(self.n_layers):
            mask[n, :self.widths[n + 1], :self.widths[n]] = True
        return mask

    def feature_mask(self) -> np.ndarray:
        """(N, D) bool: True on each layer's ``d_{n+1}`` output features."""
        return self.weight_mask().any(axis=2)

    def n_weights(self) -> int:
        """The number of real (unpadded) weight entries, ``sum_n d_{n+1} d_n``."""
        return sum(a * b for a, b in zip(self.widths[:-1], self.widths[1:], strict=True))

    def _shapes(self) -> dict[str, tuple[int, ...]]:
        N, D = self.n_layers, self.width
        return {k: (N, D, D) if k == "W" else (N, D) for k in self.layer_keys}

    def init_params(self, seed: int = 0, *, weights: str = "normal",
                    bn: str = "unit") -> dict[str, np.ndarray]:
        """Initial parameters.

        Parameters
        ----------
        seed : int
            Seed of ``np.random.default_rng``; ``W`` is drawn first, layer by layer,
            then ``gamma`` and ``beta``.
        weights : {"normal", "ternary"}
            ``"normal"``: entries ``N(0, 2 / d_n)`` (He's scaling); ``"ternary"``: each
            entry uniformly from ``{-1, 0, 1}`` (Li & Hao's random initialisation).
        bn : {"unit", "truncated_normal"}
            ``"unit"``: ``gamma = 1``, ``beta = 0`` (and ``b = 0``); ``"truncated_normal"``:
            ``gamma`` and ``beta`` standard normal redrawn outside ``[-2, 2]`` (Li & Hao's
            TensorFlow initialiser).
        """
        seed = check_integer("seed", seed, 0)
        if weights not in ("normal", "ternary"):
            raise ValueError(f"weights must be 'normal' or 'ternary', got {weights!r}")
        if bn not in ("unit", "truncated_normal"):
            raise ValueError(f"bn must be 'unit' or 'truncated_normal', got {bn!r}")
        rng = np.random.default_rng(seed)
        shapes = self._shapes()
        W = np.zeros(shapes["W"])
        for n in range(self.n_layers):
            i, o = self.widths[n], self.widths[n + 1]
            W[n, :o, :i] = (rng.standard_normal((o, i)) * np.sqrt(2.0 / i) if weights == "normal"
                            else rng.integers(-1, 2, (o, i)).astype(float))
        out = {"W": W}
        mask = self.feature_mask()
        for k in self.layer_keys[1:]:
            if bn == "unit" or k == "b":
                out[k] = np.where(mask, 1.0 if k == "gamma" else 0.0, 0.0)
            else:
                out[k] = np.where(mask, _truncated_normal(rng, shapes[k]), 0.0)
        return out

    def check_params(self, params: Mapping) -> dict[str, np.ndarray]:
        if not isinstance(params, Mapping) or set(params) != set(self.layer_keys):
            keys = sorted(params) if isinstance(params, Mapping) else type(params).__name__
            raise ValueError(f"params has keys {keys}, expected {list(self.layer_keys)}")
        out = {}
        masks = {"W": self.weight_mask()}
        for k, shape in self._shapes().items():
            a = np.ascontiguousarray(params[k], dtype=self.dtype)
            if a.shape != shape:
                raise ValueError(f"params[{k!r}] has shape {a.shape}, expected {shape} (padded "
                                 f"to the widest layer, {self.width})")
            if not np.all(np.isfinite(a)):
                raise ValueError(f"params[{k!r}] contains non-finite values (NaN or inf)")
            mask = masks["W"] if k == "W" else masks.setdefault("f", self.feature_mask())
            if np.any(a[~mask] != 0):
                raise ValueError(f"params[{k!r}] has nonzero entries in its padding (outside "
                                 "each layer's block of widths)")
            out[k] = a
        return out

    # --- the Model contract ---------------------------------------------------------------------
    def layers(self, params, *, target: Target | str = Target.CPU,
               span: tuple[int, int] | None = None) -> LayeredPropagator:
        return LayeredPropagator(self, [params[k] for k in self.layer_keys],
                                 first=0 if span is None else int(span[0]))

    def propagator(self, params, labels=None) -> LayeredPropagator:
        """All layers over ``params`` as a :class:`LayeredPropagator` whose objective is
        the cross-entropy for ``labels`` (for :func:`ptoc.check_propagator`)."""
        p = self.check_params(params)
        return LayeredPropagator(self, [p[k] for k in self.layer_keys], labels=labels)

    def check_inputs(self, X, labels=None):
        """``(X, labels)`` validated for training: batch normalisation in training mode
        needs a batch of at least 2 samples."""
        return self._inputs(X, labels, training=True)

    def _inputs(self, X, labels, training: bool):
        X = np.asarray(X, dtype=self.dtype)
        if X.ndim != 2 or X.shape[1] != self.n_in or X.shape[0] == 0:
            raise ValueError(f"X must have shape (S, {self.n_in}) with S >= 1, got {X.shape}")
        if training and self.batch_norm and X.shape[0] < 2:
            raise ValueError("batch normalisation in training mode needs a batch of at least 2 "
                             f"samples, got {X.shape[0]}")
        if not np.all(np.isfinite(X)):
            raise ValueError("X contains non-finite values (NaN or inf)")
        if labels is not None:
            labels = np.asarray(labels)
            if labels.shape != (X.shape[0],) or not np.issubdtype(labels.dtype, np.integer) \
                    or labels.min() < 0 or labels.max() >= self.n_classes:
                raise ValueError(f"labels must be {X.shape[0]} integers in 0..{self.n_classes - 1}"
                                 f", got shape {labels.shape} and dtype {labels.dtype}")
            labels = labels.astype(np.int64)
        return np.ascontiguousarray(X), labels

    def state_shape(self, X) -> tuple[int, ...]:
        return (np.shape(X)[0], self.width)

    def opening(self, params, X):
        """``x_0``: the inputs padded with zero columns to ``D``."""
        x0 = np.zeros((np.shape(X)[0], self.width), dtype=self.dtype)
        x0[:, :self.n_in] = X
        return x0, None

    def terminal(self, params, x_last, labels):
        loss, dz = cross_entropy(x_last[:, :self.n_classes], np.asarray(labels, np.int64))
        lam = np.zeros_like(x_last)
        lam[:, :self.n_classes] = dz
        return loss, lam, {}

    # --- evaluation -------------------------------------------------------------------------------
    def scores(self, params, X, statistics: BatchStatistics | None = None) -> np.ndarray:
        """Class scores (S, C): batch normalisation in evaluation mode with
        ``statistics``, or, without them, in training mode over ``X`` as one batch."""
        p = self.check_params(params)
        X, _ = self._inputs(X, None, training=statistics is None)
        prop = LayeredPropagator(self, [p[k] for k in self.layer_keys], statistics=statistics)
        return prop.propagate(self.opening(p, X)[0])[:, :self.n_classes]

    def accuracy(self, params, X, y, statistics: BatchStatistics | None = None) -> float:
        """Fraction of ``X`` classified as ``y`` (see :meth:`scores`)."""
        X, y = self._inputs(X, y, training=statistics is None)
        return float(np.mean(np.argmax(self.scores(params, X, statistics), axis=1) == y))

    def loss(self, params, X, y, statistics: BatchStatistics | None = None) -> float:
        """Batch-mean cross-entropy (see :meth:`scores`)."""
        X, y = self._inputs(X, y, training=statistics is None)
        return cross_entropy(self.scores(params, X, statistics), y)[0]

    def population_statistics(self, params, X, batch_size: int = 100) -> BatchStatistics:
        """Feature means and variances of every layer for evaluation mode: the averages,
        over the batches ``X[0:B], X[B:2B], ...`` (a last partial batch of at least 2
        samples included), of the training-mode batch statistics at ``params``."""
        p = self.check_params(params)
        X, _ = self.check_inputs(X)
        B = check_integer("batch_size", batch_size, 2)
        prop = LayeredPropagator(self, [p[k] for k in self.layer_keys])
        means, variances = [], []
        for start in range(0, X.shape[0], B):
            batch = X[start:start + B]
            if batch.shape[0] < 2:
                continue
            x = self.opening(p, batch)[0]
            m, v = np.zeros((self.n_layers, self.width)), np.zeros((self.n_layers, self.width))
            for n in range(self.n_layers):
                z = prop._product(n, x)
                m[n, :z.shape[1]], v[n, :z.shape[1]] = z.mean(axis=0), z.var(axis=0)
                x = prop.step(n, x)
            means.append(m)
            variances.append(v)
        return BatchStatistics(np.mean(means, axis=0), np.mean(variances, axis=0))


def _truncated_normal(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Standard normal entries, each redrawn until it lies in ``[-2, 2]``."""
    out = rng.standard_normal(shape)
    bad = np.abs(out) > 2.0
    while np.any(bad):
        out[bad] = rng.standard_normal(int(bad.sum()))
        bad = np.abs(out) > 2.0
    return out


class LayeredPropagator(Propagator):
    """The layers of a :class:`LayeredNetwork` as a :class:`~ptoc.propagator.Propagator`.

    ``arrays`` are the live layer arrays (``W, gamma, beta`` or ``W, b``) of layers
    ``first .. first + L - 1`` (row ``k`` is layer ``first + k``). States are padded
    (S, D) batches. The objective is the batch-mean cross-entropy of the first ``C``
    columns for ``labels``. With ``statistics`` the batch normalisation runs in
    evaluation mode (for prediction; the adjoint is the training mode's only).
    """

    def __init__(self, network: LayeredNetwork, arrays: list[np.ndarray], *, first: int = 0,
                 labels=None, statistics: BatchStatistics | None = None):
        self.network = network
        self.arrays = list(arrays)
        self.first = int(first)
        self.n_layers = int(self.arrays[0].shape[0])
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        self.statistics = statistics

    def _dims(self, n: int) -> tuple[int, int]:
        w = self.network.widths
        return w[self.first + n], w[self.first + n + 1]

    def _product(self, n: int, x: np.ndarray) -> np.ndarray:
        i, o = self._dims(n)
        return x[:, :i] @ self.arrays[0][n, :o, :i].T

    def _activated(self, n: int) -> bool:
        return self.first + n < self.network.n_layers - 1 or self.network.last_activation

    def _forward(self, n: int, x: np.ndarray):
        """``(a, zhat, s)`` of layer ``n`` at ``x`` (``zhat, s`` None without batch norm)."""
        net, o = self.network, self._dims(n)[1]
        z = self._product(n, x)
        if not net.batch_norm:
            return z + self.arrays[1][n, :o], None, None
        if self.statistics is None:
            mean, var = z.mean(axis=0), z.var(axis=0)
        else:
            mean, var = self.statistics.mean[self.first + n, :o], \
                self.statistics.var[self.first + n, :o]
        s = np.sqrt(var + net.bn_eps)
        zhat = (z - mean) / s
        return self.arrays[1][n, :o] * zhat + self.arrays[2][n, :o], zhat, s

    def step(self, n, x):
        a = self._forward(n, x)[0]
        out = np.zeros_like(x)
        out[:, :a.shape[1]] = self.network.activation(a) if self._activated(n) else a
        return out

    def adjoint_step(self, n, x, lam, grad=None):
        if self.statistics is not None:
            raise ValueError("the adjoint is that of batch normalisation in training mode: "
                             "this propagator evaluates with population statistics")
        i, o = self._dims(n)
        a, zhat, s = self._forward(n, x)
        g = lam[:, :o]
        if self._activated(n):
            g = g * self.network.activation.derivative(a)
        if zhat is None:
            dz = g
            if grad is not None:
                grad[1][n, :o] += g.sum(axis=0)
        else:
            if grad is not None:
                grad[1][n, :o] += np.einsum("si,si->i", g, zhat)
                grad[2][n, :o] += g.sum(axis=0)
            gz = g * self.arrays[1][n, :o]
            dz = (gz - gz.mean(axis=0) - zhat * np.mean(gz * zhat, axis=0)) / s
        W = self.arrays[0][n, :o, :i]
        if grad is not None:
            grad[0][n, :o, :i] += dz.T @ x[:, :i]
        out = np.zeros_like(lam)
        out[:, :i] = dz @ W
        return out

    def _labels(self) -> np.ndarray:
        if self.labels is None:
            raise ValueError("this LayeredPropagator has no labels: build it with "
                             "LayeredNetwork.propagator(params, labels) to use the objective")
        return self.labels

    def objective(self, x):
        return cross_entropy(x[:, :self.network.n_classes], self._labels())[0]

    def objective_gradient(self, x):
        lam = np.zeros_like(x)
        lam[:, :self.network.n_classes] = cross_entropy(x[:, :self.network.n_classes],
                                                        self._labels())[1]
        return lam

    def parameters(self):
        return self.arrays

    def _no_coarse_grid(self) -> str:
        return ("a LayeredNetwork has no coarse grid: its widths change from layer to layer, "
                "so no step can stand for several layers (MGRIT and parareal with built-in "
                "coarse steps); use ptoc.Serial")
