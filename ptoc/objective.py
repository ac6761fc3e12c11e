"""Opening layer, classifier loss and regulariser, with their gradients.

The pieces of ``J(theta) = Phi(x_N) + R(theta)`` (:doc:`/theory/resnet`) that are not
residual layers, and the assembly of the gradient from what the sweeps produce. Each
is one small dense operation, so it is written in NumPy for every target.

* Opening layer: ``x_0 = sigma(Y K_in^T + b_in)`` (or ``x_0 = Y``).
* Classifier: ``z_s = W x_{N,s} + mu`` and ``Phi = (1/S) sum_s CE(softmax(z_s), c_s)``,
  with ``CE = log sum_k exp(z_{s,k}) - z_{s,c_s}``, evaluated after subtracting
  ``max_k z_{s,k}``.
* Terminal adjoint (:doc:`/theory/adjoint`): ``lambda_{N,s} = dPhi/dx_{N,s} =
  W^T (softmax(z_s) - e_{c_s}) / S``.
* Regulariser ``R = gamma/2 sum_n h(|K_n|^2 + |b_n|^2)
  + gamma_t/2 sum_{n=0}^{N-2} h |(theta_{n+1} - theta_n)/h|^2
  + gamma_c/2 (|W|^2 + |mu|^2 + |K_in|^2 + |b_in|^2)`` with ``theta_n = (K_n, b_n)``.
"""

from __future__ import annotations

import numpy as np

from ._workspace import Workspace
from .activations import dsigma, sigma
from .model import Params, ResNet


def opening_forward(network: ResNet, params: Params, Y: np.ndarray):
    """``(x_0, sigma'(a_in))`` for inputs ``Y`` (S, d_in); the derivative is None for identity."""
    if not network.has_opening_weights:
        return np.array(Y, dtype=network.dtype, order="C", copy=True), None
    a = Y @ params.K_in.T + params.b_in
    return np.ascontiguousarray(sigma(a, network.activation)), dsigma(a, network.activation)


def opening_backward(params: Params, Y: np.ndarray, lam0: np.ndarray, dsig_in, grads: Params):
    """Add ``dJ/dK_in = sum_s (sigma'(a_in,s) * lambda_{0,s}) y_s^T`` and ``dJ/db_in`` to grads."""
    if dsig_in is None:
        return
    g = dsig_in * lam0
    grads.K_in += g.T @ Y
    grads.b_in += g.sum(axis=0)


def logits(params: Params, xN: np.ndarray) -> np.ndarray:
    """Classifier scores ``z = x_N W^T + mu`` (S, C)."""
    return xN @ params.W.T + params.mu


def cross_entropy(z: np.ndarray, labels: np.ndarray):
    """Batch-mean cross-entropy of softmax(z) and its gradient ``dPhi/dz`` (S, C).

    Uses ``z - max_k z`` so that ``exp`` never overflows.
    """
    S = z.shape[0]
    shifted = z - z.max(axis=1, keepdims=True)
    expz = np.exp(shifted)
    total = expz.sum(axis=1)
    rows = np.arange(S)
    loss = float(np.mean(np.log(total) - shifted[rows, labels]))
    dz = expz / total[:, None]
    dz[rows, labels] -= 1.0
    dz /= S
    return loss, dz


def classifier_loss(params: Params, xN: np.ndarray, labels: np.ndarray):
    """``(Phi(x_N), lambda_N, dPhi/dW, dPhi/dmu)`` for the softmax classifier."""
    loss, dz = cross_entropy(logits(params, xN), labels)
    lamN = np.ascontiguousarray(dz @ params.W, dtype=xN.dtype)
    return loss, lamN, dz.T @ xN, dz.sum(axis=0)


#: Temporaries of the regulariser, reused (per thread).
regulariser_workspace = Workspace(capacity=4)


def _squares(a: np.ndarray) -> np.ndarray:
    """``|a_l|^2`` of every row ``l`` (all entries of a layer)."""
    flat = a.reshape(a.shape[0], -1)
    return np.einsum("li,li->l", flat, flat)


def layer_regulariser_terms(network: ResNet, thetas: list[np.ndarray],
                            prev_diffs: list[np.ndarray], next_diffs: list[np.ndarray],
                            want_grad: bool = True, add_to: list[np.ndarray] | None = None):
    """The terms of ``R`` that involve each of ``L`` layers, and ``dR/dtheta`` there.

    The one implementation of the layer regulariser: every other function here, the
    models of :mod:`ptoc.propagator` (so the layer-parallel driver and PGCL) and MSA
    call it. ``thetas`` are the layer's arrays (leading axis ``L``, any shape after it,
    e.g. ``[K, b]``); ``prev_diffs`` and ``next_diffs`` (the same shapes) are
    ``theta_l - theta_prev`` and ``theta_next - theta_l``, zero where the layer has no
    neighbour on that side (not read when ``gamma_t = 0``). With ``c = gamma_t / h``:

    * ``tikhonov_l = gamma h / 2 |theta_l|^2``;
    * ``prev_pair_l = c / 2 |theta_l - theta_prev|^2``, ``next_pair_l = c / 2
      |theta_next - theta_l|^2``;
    * ``grad_l = gamma h theta_l + (c (theta_l - theta_prev) - c (theta_next - theta_l))``,
      which is ``dR/dtheta_l`` when the neighbours are the network's layers.

    ``R`` is the sum of the Tikhonov terms and of every ``next_pair`` (each pair once);
    ``R_n`` of the maximum principle (layer ``n``'s terms, the neighbours fixed) is
    ``tikhonov + prev_pair + next_pair``. Theory: :doc:`/theory/resnet`,
    :doc:`/theory/maximum_principle`.

    The gradient is added into ``add_to`` (arrays shaped as ``thetas``, e.g. the data
    part of the gradient) when given, else into zeros: one code path, so every caller
    gets the same bits.

    Returns
    -------
    tikhonov, prev_pair, next_pair : ndarray (L,)
    grads : list of ndarray (``add_to`` or new arrays), or None without ``want_grad``
    """
    h = network.h
    tik_c, c = network.gamma * h, network.gamma_t / h
    zero = np.zeros(thetas[0].shape[0])
    tikhonov = 0.5 * tik_c * sum(_squares(t) for t in thetas) if tik_c else zero
    prev_pair = 0.5 * c * sum(_squares(d) for d in prev_diffs) if c else zero
    next_pair = 0.5 * c * sum(_squares(d) for d in next_diffs) if c else zero
    if not want_grad:
        return tikhonov, prev_pair, next_pair, None
    grads = [np.zeros_like(t) for t in thetas] if add_to is None else add_to
    for i, (g, t) in enumerate(zip(grads, thetas, strict=True)):
        # g += c (theta - theta_prev) - c (theta_next - theta) + gamma h theta, through one
        # reused buffer (fresh pages for big temporaries cost more than the arithmetic);
        # a weight that is zero adds nothing
        tmp = regulariser_workspace.get("regulariser", t.shape, t.dtype)
        if c:
            np.multiply(prev_diffs[i], c, out=tmp)
            g += tmp
            np.multiply(next_diffs[i], c, out=tmp)
            g -= tmp
        if tik_c:
            np.multiply(t, tik_c, out=tmp)
            g += tmp
    return tikhonov, prev_pair, next_pair, grads


def range_regulariser(network: ResNet, thetas: list[np.ndarray], left: tuple | None = None,
                      right: tuple | None = None, want_grad: bool = True,
                      add_to: list[np.ndarray] | None = None):
    """``R``'s share and gradient of the consecutive layers ``first..first+L-1``.

    ``thetas`` hold those layers (e.g. ``[K, b]``, leading axis ``L``); ``left`` and
    ``right`` are the arrays of the layers just before and after them, one per entry
    of ``thetas`` (None at the network's ends). The share is the Tikhonov terms of
    these layers and the time-derivative terms of the pairs ``(n, n+1)`` whose first
    layer is one of them, so that the shares of a partition of the layers add up to
    ``R``'s layer part; the gradient is ``dR/dtheta_n`` of these layers. A rank of a
    layer-parallel run calls it with its own layers and its neighbours' boundary
    layers; the serial sweep with all layers. Written with
    :func:`layer_regulariser_terms`; the gradient is added into ``add_to`` when given.

    Returns
    -------
    value : float
    grads : list of ndarray, or None without ``want_grad``
    """
    if not network.gamma and not network.gamma_t:  # no layer regulariser at all
        if not want_grad:
            return 0.0, None
        return 0.0, ([np.zeros_like(t) for t in thetas] if add_to is None else add_to)
    prev_diffs, next_diffs = [], []
    for i, t in enumerate(thetas if network.gamma_t else ()):  # no time term: no differences
        L = t.shape[0]
        # D[l] = theta_l - theta_{l-1} (a reused buffer, read before this call returns)
        D = regulariser_workspace.get(f"differences{i}", (L + 1,) + t.shape[1:], t.dtype)
        np.subtract(t[1:], t[:-1], out=D[1:L])
        if left is None:
            D[0] = 0.0
        else:
            np.subtract(t[0], left[i], out=D[0])
        if right is None:
            D[L] = 0.0
        else:
            np.subtract(right[i], t[L - 1], out=D[L])
        prev_diffs.append(D[:L])
        next_diffs.append(D[1:])
    tik, _, pairs, grads = layer_regulariser_terms(network, thetas, prev_diffs, next_diffs,
                                                   want_grad, add_to)
    return float(np.sum(tik) + np.sum(pairs)), grads


def head_regulariser(network: ResNet, params: Params, grads: Params | None = None) -> float:
    """``gamma_c/2 (|W|^2 + |mu|^2 + |K_in|^2 + |b_in|^2)``, adding its gradient to
    ``grads`` when given (the keys ``grads`` holds, in that order)."""
    gc = network.gamma_c
    if not gc:
        return 0.0
    keys = [k for k in ("W", "mu", "K_in", "b_in") if params.get(k) is not None]
    if grads is not None:
        for k in keys:
            if grads.get(k) is not None:
                grads[k][...] += gc * params[k]
    return 0.5 * gc * sum(float(np.vdot(params[k], params[k])) for k in keys)


def regulariser(network: ResNet, params: Params) -> float:
    """Value of ``R(theta)`` (see the module docstring)."""
    value, _ = range_regulariser(network, [params.K, params.b], want_grad=False)
    return value + head_regulariser(network, params)


def add_regulariser_grad(network: ResNet, params: Params, grads: Params) -> float:
    """Add ``dR/dtheta`` to ``grads`` in place; returns ``R(theta)`` (the value of
    :func:`regulariser`, computed on the way)."""
    value, _ = range_regulariser(network, [params.K, params.b], add_to=[grads.K, grads.b])
    return value + head_regulariser(network, params, grads)


def layer_regulariser(network: ResNet, params: Params, n: int, K: np.ndarray, b: np.ndarray):
    """``R_n(theta)`` and its gradient: the terms of ``R`` that involve layer ``n``.

    ``theta = (K, b)`` replaces ``theta_n``; the neighbours ``theta_{n-1}``, ``theta_{n+1}``
    stay at their values in ``params`` (:doc:`/theory/maximum_principle`):
    ``R_n = gamma/2 h (|K|^2 + |b|^2) + gamma_t/(2h) (|theta - theta_{n-1}|^2 +
    |theta_{n+1} - theta|^2)`` (neighbour terms present where the neighbour exists).
    ``dR_n/dtheta`` at ``theta = theta_n`` equals ``dR/dtheta_n``. Written with
    :func:`layer_regulariser_terms`.

    Returns
    -------
    (value, grad_K, grad_b)
    """
    N = network.depth
    theta = [np.asarray(K)[None], np.asarray(b)[None]]
    pairs = list(zip(theta, (params.K, params.b), strict=True))
    prev = [t - p[n - 1] if n > 0 else np.zeros_like(t) for t, p in pairs]
    nxt = [p[n + 1] - t if n < N - 1 else np.zeros_like(t) for t, p in pairs]
    tik, pp, pn, (gK, gb) = layer_regulariser_terms(network, theta, prev, nxt)
    return float(tik[0] + pp[0] + pn[0]), gK[0], gb[0]


def assemble_gradient(network: ResNet, params: Params, X: np.ndarray, grad_K: np.ndarray,
                      grad_b: np.ndarray, lam0: np.ndarray, dsig_in, dW: np.ndarray,
                      dmu: np.ndarray) -> tuple[Params, float]:
    """``dJ/dtheta`` from what the two sweeps produce: the data part of the layer gradients
    (``grad_K``, ``grad_b``, used in place), ``lambda_0`` with ``sigma'(a_in)`` for the
    opening layer (:func:`opening_backward`), and the classifier's ``dPhi/dW``,
    ``dPhi/dmu``; then the regulariser's gradient is added (:func:`add_regulariser_grad`).
    Returns the gradient and the regulariser's value ``R(theta)``.
    The one gradient assembly of the serial sweeps, MSA and the neural ODE; the
    layer-parallel driver assembles the same pieces on the ranks that hold them.
    """
    dtype = network.dtype
    grads = Params(K=grad_K, b=grad_b,
                   K_in=None if params.K_in is None else np.zeros_like(params.K_in),
                   b_in=None if params.b_in is None else np.zeros_like(params.b_in),
                   W=np.ascontiguousarray(dW, dtype=dtype), mu=np.asarray(dmu, dtype=dtype))
    opening_backward(params, X, lam0, dsig_in, grads)
    return grads, add_regulariser_grad(network, params, grads)
