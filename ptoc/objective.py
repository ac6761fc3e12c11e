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


def layer_regulariser_terms(network: ResNet, K: np.ndarray, b: np.ndarray,
                            K_prev: np.ndarray, b_prev: np.ndarray, has_prev: np.ndarray,
                            K_next: np.ndarray, b_next: np.ndarray, has_next: np.ndarray,
                            want_grad: bool = True):
    """The terms of ``R`` that involve each of ``L`` layers, and ``dR/dtheta`` there.

    The one implementation of the layer regulariser: every other function here, the
    layer-parallel driver, PGCL and MSA call it. Row ``l`` of ``K`` (L, d, d), ``b``
    (L, d) is a layer ``theta = (K_l, b_l)``; its neighbours ``theta_prev``,
    ``theta_next`` are the rows of ``K_prev, b_prev`` and ``K_next, b_next``, counted
    where ``has_prev``, ``has_next`` (L,) are 1 (0 at the network's ends). With
    ``c = gamma_t / h``:

    * ``tikhonov_l = gamma h / 2 (|K_l|^2 + |b_l|^2)``;
    * ``prev_pair_l = c / 2 |theta_l - theta_prev|^2`` (times ``has_prev``);
    * ``next_pair_l = c / 2 |theta_next - theta_l|^2`` (times ``has_next``);
    * ``grad_l = gamma h theta_l + c (theta_l - theta_prev) - c (theta_next - theta_l)``
      (each difference term times its mask), which is ``dR/dtheta_l`` when the
      neighbours are the network's layers.

    ``R`` is the sum of the Tikhonov terms and of every ``next_pair`` (each pair once);
    ``R_n`` of the maximum principle (layer ``n``'s terms, the neighbours fixed) is
    ``tikhonov + prev_pair + next_pair``. Theory: :doc:`/theory/resnet`,
    :doc:`/theory/maximum_principle`.

    Returns
    -------
    tikhonov, prev_pair, next_pair : ndarray (L,)
    grad_K, grad_b : ndarray, or None without ``want_grad``
    """
    h = network.h
    tik_c, c = network.gamma * h, network.gamma_t / h
    tikhonov = 0.5 * tik_c * (np.einsum("lij,lij->l", K, K) + np.einsum("li,li->l", b, b))
    dKp, dbp = K - K_prev, b - b_prev
    dKn, dbn = K_next - K, b_next - b
    prev_pair = 0.5 * c * has_prev * (np.einsum("lij,lij->l", dKp, dKp)
                                      + np.einsum("li,li->l", dbp, dbp))
    next_pair = 0.5 * c * has_next * (np.einsum("lij,lij->l", dKn, dKn)
                                      + np.einsum("li,li->l", dbn, dbn))
    if not want_grad:
        return tikhonov, prev_pair, next_pair, None, None
    mp, mn = has_prev[:, None], has_next[:, None]
    gK = tik_c * K + (c * mp[:, :, None] * dKp - c * mn[:, :, None] * dKn)
    gb = tik_c * b + (c * mp * dbp - c * mn * dbn)
    return tikhonov, prev_pair, next_pair, gK, gb


def range_regulariser(network: ResNet, K: np.ndarray, b: np.ndarray,
                      left: tuple[np.ndarray, np.ndarray] | None = None,
                      right: tuple[np.ndarray, np.ndarray] | None = None,
                      want_grad: bool = True):
    """``R``'s share and gradient of the consecutive layers ``first..first+L-1``.

    ``K``, ``b`` hold those layers (leading axis ``L``); ``left`` and ``right`` are
    ``(K, b)`` of the layers just before and after them (None at the network's ends).
    The share is the Tikhonov terms of these layers and the time-derivative terms of
    the pairs ``(n, n+1)`` whose first layer is one of them, so that the shares of a
    partition of the layers add up to ``R``'s layer part; the gradient is
    ``dR/dtheta_n`` of these layers. A rank of a layer-parallel run calls it with its
    own layers and its neighbours' boundary layers; the serial sweep with all layers.
    Written with :func:`layer_regulariser_terms`.

    Returns
    -------
    value : float
    grad_K, grad_b : ndarray, or None without ``want_grad``
    """
    L = K.shape[0]
    ones = np.ones(L, K.dtype)
    has_prev, has_next = ones.copy(), ones.copy()
    K_prev, b_prev = np.empty_like(K), np.empty_like(b)
    K_next, b_next = np.empty_like(K), np.empty_like(b)
    K_prev[1:], b_prev[1:] = K[:-1], b[:-1]
    K_next[:-1], b_next[:-1] = K[1:], b[1:]
    for arr_K, arr_b, row, mask, side in ((K_prev, b_prev, 0, has_prev, left),
                                          (K_next, b_next, L - 1, has_next, right)):
        if side is None:
            arr_K[row], arr_b[row], mask[row] = K[row], b[row], 0.0
        else:
            arr_K[row], arr_b[row] = side
    tik, _, pairs, gK, gb = layer_regulariser_terms(network, K, b, K_prev, b_prev, has_prev,
                                                    K_next, b_next, has_next, want_grad)
    return float(np.sum(tik) + np.sum(pairs)), gK, gb


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
    value, _, _ = range_regulariser(network, params.K, params.b, want_grad=False)
    return value + head_regulariser(network, params)


def add_regulariser_grad(network: ResNet, params: Params, grads: Params) -> None:
    """Add ``dR/dtheta`` to ``grads`` in place."""
    _, gK, gb = range_regulariser(network, params.K, params.b)
    grads.K += gK
    grads.b += gb
    head_regulariser(network, params, grads)


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
    prev, nxt = max(n - 1, 0), min(n + 1, N - 1)
    one = np.ones(1, params.K.dtype)
    tik, pp, pn, gK, gb = layer_regulariser_terms(
        network, np.asarray(K)[None], np.asarray(b)[None], params.K[prev][None],
        params.b[prev][None], one * (n > 0), params.K[nxt][None], params.b[nxt][None],
        one * (n < N - 1))
    return float(tik[0] + pp[0] + pn[0]), gK[0], gb[0]


def assemble_gradient(network: ResNet, params: Params, X: np.ndarray, grad_K: np.ndarray,
                      grad_b: np.ndarray, lam0: np.ndarray, dsig_in, dW: np.ndarray,
                      dmu: np.ndarray) -> Params:
    """``dJ/dtheta`` from what the two sweeps produce: the data part of the layer gradients
    (``grad_K``, ``grad_b``, used in place), ``lambda_0`` with ``sigma'(a_in)`` for the
    opening layer (:func:`opening_backward`), and the classifier's ``dPhi/dW``,
    ``dPhi/dmu``; then the regulariser's gradient is added (:func:`add_regulariser_grad`).
    The one gradient assembly of the serial sweeps, MSA and the neural ODE; the
    layer-parallel driver assembles the same pieces on the ranks that hold them.
    """
    dtype = network.dtype
    grads = Params(K=grad_K, b=grad_b,
                   K_in=None if params.K_in is None else np.zeros_like(params.K_in),
                   b_in=None if params.b_in is None else np.zeros_like(params.b_in),
                   W=np.ascontiguousarray(dW, dtype=dtype), mu=np.asarray(dmu, dtype=dtype))
    opening_backward(params, X, lam0, dsig_in, grads)
    add_regulariser_grad(network, params, grads)
    return grads
