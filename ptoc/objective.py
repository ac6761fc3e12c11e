"""Opening layer, classifier loss and regulariser, with their gradients.

The pieces of ``J(theta) = Phi(x_N) + R(theta)`` (``DESIGN.md`` section 1) that are not
residual layers. Each is one small dense operation, so it is written in NumPy for
every target.

* Opening layer: ``x_0 = sigma(Y K_in^T + b_in)`` (or ``x_0 = Y``).
* Classifier: ``z_s = W x_{N,s} + mu`` and ``Phi = (1/S) sum_s CE(softmax(z_s), c_s)``,
  with ``CE = log sum_k exp(z_{s,k}) - z_{s,c_s}``, evaluated after subtracting
  ``max_k z_{s,k}``.
* Terminal adjoint (``DESIGN.md`` section 2): ``lambda_{N,s} = dPhi/dx_{N,s} =
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


def regulariser(network: ResNet, params: Params) -> float:
    """Value of ``R(theta)`` (see the module docstring)."""
    h = network.h
    value = 0.0
    if network.gamma:
        value += 0.5 * network.gamma * h * (np.vdot(params.K, params.K)
                                            + np.vdot(params.b, params.b))
    if network.gamma_t and network.depth > 1:
        dK = np.diff(params.K, axis=0)
        db = np.diff(params.b, axis=0)
        value += 0.5 * network.gamma_t / h * (np.vdot(dK, dK) + np.vdot(db, db))
    if network.gamma_c:
        value += 0.5 * network.gamma_c * sum(float(np.vdot(params[k], params[k]))
                                             for k in ("W", "mu", "K_in", "b_in") if k in params)
    return float(value)


def _time_smoothing_grad(theta: np.ndarray, scale: float) -> np.ndarray:
    """Gradient of ``scale/2 sum_n |theta_{n+1} - theta_n|^2`` along the layer axis."""
    g = np.zeros_like(theta)
    diff = np.diff(theta, axis=0)
    g[1:] += scale * diff
    g[:-1] -= scale * diff
    return g


def add_regulariser_grad(network: ResNet, params: Params, grads: Params) -> None:
    """Add ``dR/dtheta`` to ``grads`` in place."""
    h = network.h
    if network.gamma:
        grads.K += network.gamma * h * params.K
        grads.b += network.gamma * h * params.b
    if network.gamma_t and network.depth > 1:
        grads.K += _time_smoothing_grad(params.K, network.gamma_t / h)
        grads.b += _time_smoothing_grad(params.b, network.gamma_t / h)
    if network.gamma_c:
        for k in ("W", "mu", "K_in", "b_in"):
            if k in grads:
                grads[k][...] += network.gamma_c * params[k]


def layer_regulariser(network: ResNet, params: Params, n: int, K: np.ndarray, b: np.ndarray):
    """``R_n(theta)`` and its gradient: the terms of ``R`` that involve layer ``n``.

    ``theta = (K, b)`` replaces ``theta_n``; the neighbours ``theta_{n-1}``, ``theta_{n+1}``
    stay at their values in ``params`` (``DESIGN.md`` section 3):
    ``R_n = gamma/2 h (|K|^2 + |b|^2) + gamma_t/(2h) (|theta - theta_{n-1}|^2 +
    |theta_{n+1} - theta|^2)`` (neighbour terms present where the neighbour exists).
    ``dR_n/dtheta`` at ``theta = theta_n`` equals ``dR/dtheta_n``.

    Returns
    -------
    (value, grad_K, grad_b)
    """
    h, N = network.h, network.depth
    value = 0.5 * network.gamma * h * (np.vdot(K, K) + np.vdot(b, b))
    gK = network.gamma * h * K
    gb = network.gamma * h * b
    c = network.gamma_t / h
    for m in (n - 1, n + 1):
        if 0 <= m < N and c:
            dK = K - params.K[m]
            db = b - params.b[m]
            value += 0.5 * c * (np.vdot(dK, dK) + np.vdot(db, db))
            gK = gK + c * dK
            gb = gb + c * db
    return float(value), np.asarray(gK), np.asarray(gb)
