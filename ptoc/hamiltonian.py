"""The layer Hamiltonian of the discrete maximum principle (Li & Hao 2018).

Theory: :doc:`/theory/maximum_principle`. With co-state ``p = -lambda``, the
Hamiltonian of layer ``n`` summed over the batch is

    sum_s H_n(x_s, p_s, theta) = sum_s p_s . Phi_n(x_s; theta) - R_n(theta),

where ``R_n`` collects the terms of the regulariser that involve ``theta_n``
(:func:`ptoc.objective.layer_regulariser`). The discrete maximum principle reads
``x_{n+1} = grad_p H_n``, ``p_n = grad_x H_n(x_n, p_{n+1}, theta_n)``, ``p_N = -grad Phi``
and ``theta*_n`` maximises ``sum_s H_n(x*_{n,s}, p*_{n+1,s}, theta)``; and
``grad_theta sum_s H_n = -dJ/dtheta_n`` at ``theta = theta_n`` (gradient descent is
Hamiltonian ascent), which the tests check.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from . import kernels
from .kernels import Target
from .model import Params, ResNet
from .objective import layer_regulariser


def layer_arguments(network: ResNet, params, n: int, K, b):
    """``(params, K, b)`` checked for layer ``n``: the parameters validated, ``n`` a layer
    index, and ``(K, b)`` the given ones (in the network's dtype) or layer ``n``'s."""
    p = network.check_params(params)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 0 <= n < network.depth:
        raise ValueError(f"layer index n must be an integer in [0, {network.depth}), got {n!r}")
    K = p.K[n] if K is None else np.asarray(K, dtype=network.dtype)
    b = p.b[n] if b is None else np.asarray(b, dtype=network.dtype)
    return p, K, b


def hamiltonian(network: ResNet, params: Params | Mapping, n: int, x, p_next, K=None, b=None,
                *, target: Target | str = Target.CPU) -> float:
    """``sum_s H_n(x_s, p_{n+1,s}, theta)`` with ``theta = (K, b)`` (default: layer ``n``'s).

    The layer Hamiltonian of the discrete maximum principle (Li & Hao 2018):
    ``sum_s p_{n+1,s} . Phi_n(x_s; theta) - R_n(theta)``.
    Theory: :doc:`/theory/maximum_principle`.

    Parameters
    ----------
    network, params
        The network and its current parameters (neighbouring layers enter ``R_n``).
    n : int
        Layer index.
    x : array (S, d)
        States ``x_n``.
    p_next : array (S, d)
        Co-states ``p_{n+1} = -lambda_{n+1}``.
    K, b : arrays, optional
        The layer parameters ``theta`` at which to evaluate; default ``theta_n``.
    """
    p, K, b = layer_arguments(network, params, n, K, b)
    data = kernels.layer_hamiltonian(x, p_next, K, b, network.h, network.activation,
                                     target=target)
    return data - layer_regulariser(network, p, n, K, b)[0]


def hamiltonian_grad(network: ResNet, params: Params | Mapping, n: int, x, p_next, K=None,
                     b=None, *, target: Target | str = Target.CPU):
    """Gradient in ``(K, b)`` of :func:`hamiltonian`; equals ``-dJ/dtheta_n`` at ``theta_n``.

    ``grad_theta sum_s H_n = -dJ/dtheta_n`` (Li & Hao 2018):
    gradient descent is Hamiltonian ascent. Theory: :doc:`/theory/maximum_principle`.

    Returns
    -------
    (grad_K, grad_b) : ndarrays (d, d), (d,)
    """
    p, K, b = layer_arguments(network, params, n, K, b)
    gK, gb = kernels.layer_hamiltonian_grad(x, p_next, K, b, network.h, network.activation,
                                            target=target)
    _, rK, rb = layer_regulariser(network, p, n, K, b)
    return gK - rK, gb - rb
