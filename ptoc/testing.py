"""Tools to check ptoc against independent truths: a minimal reverse-mode tape.

:class:`Tape` records a computation on NumPy arrays and differentiates it by
reverse accumulation (backpropagation), knowing nothing of adjoints or
Hamiltonians. :func:`tape_loss_and_grad` writes the ResNet objective of
:doc:`/theory/resnet` with it, so that the discrete adjoint of
:func:`ptoc.loss_and_grad` can be compared with backpropagation of the forward code
(they agree to round-off; see ``tests/test_gradients.py``). It is slow and meant for
small problems only.
"""

from __future__ import annotations

import numpy as np

from .activations import dsigma, sigma
from .model import Params, ResNet
from .objective import regulariser


class Node:
    """A value on a :class:`Tape` and its adjoint (``grad``)."""

    def __init__(self, tape: Tape, value: np.ndarray, parents=()):
        self.tape = tape
        self.value = np.asarray(value, dtype=np.float64)
        self.parents = parents  # tuples (node, vector-Jacobian product)
        self.grad = np.zeros_like(self.value)
        tape.nodes.append(self)

    def __add__(self, other: Node) -> Node:
        def unbroadcast(g, shape):
            while g.ndim > len(shape):
                g = g.sum(axis=0)
            return g
        return Node(self.tape, self.value + other.value,
                    ((self, lambda g: unbroadcast(g, self.value.shape)),
                     (other, lambda g: unbroadcast(g, other.value.shape))))

    def __mul__(self, c: float) -> Node:
        return Node(self.tape, self.value * c, ((self, lambda g: g * c),))

    def matmul_t(self, w: Node) -> Node:
        """``self @ w.T`` for a batch ``self`` (S, m) and a weight ``w`` (k, m)."""
        x, W = self.value, w.value
        return Node(self.tape, x @ W.T, ((self, lambda g: g @ W), (w, lambda g: g.T @ x)))

    def act(self, activation) -> Node:
        a = self.value
        return Node(self.tape, sigma(a, activation),
                    ((self, lambda g: g * dsigma(a, activation)),))


class Tape:
    """Records nodes in creation order; :meth:`backward` propagates adjoints in reverse."""

    def __init__(self):
        self.nodes: list[Node] = []

    def variable(self, value) -> Node:
        return Node(self, np.array(value, dtype=np.float64))

    def backward(self, out: Node, seed=1.0) -> None:
        out.grad = out.grad + seed
        for node in reversed(self.nodes):
            for parent, vjp in node.parents:
                parent.grad = parent.grad + vjp(node.grad)


def _mean_cross_entropy(z: Node, labels: np.ndarray) -> Node:
    S = z.value.shape[0]
    shifted = z.value - z.value.max(axis=1, keepdims=True)
    p = np.exp(shifted)
    p /= p.sum(axis=1, keepdims=True)
    rows = np.arange(S)
    value = np.mean(-np.log(p[rows, labels]))

    def vjp(g):
        d = p.copy()
        d[rows, labels] -= 1.0
        return g * d / S
    return Node(z.tape, value, ((z, vjp),))


def tape_loss_and_grad(network: ResNet, params: Params, X: np.ndarray, labels: np.ndarray):
    """``J`` and ``dJ/dtheta`` by backpropagation through the recorded forward code.

    The regulariser's gradient is taken from :func:`ptoc.objective.add_regulariser_grad`
    (it involves no states); every data-dependent term is differentiated by the tape.
    """
    from .objective import add_regulariser_grad

    tape = Tape()
    leaves = {k: tape.variable(v) for k, v in params.items()}
    x = tape.variable(X)
    if network.has_opening_weights:
        x = (x.matmul_t(leaves["K_in"]) + leaves["b_in"]).act(network.activation)
    K_layers = [tape.variable(params.K[n]) for n in range(network.depth)]
    b_layers = [tape.variable(params.b[n]) for n in range(network.depth)]
    for n in range(network.depth):
        x = x + (x.matmul_t(K_layers[n]) + b_layers[n]).act(network.activation) * network.h
    z = x.matmul_t(leaves["W"]) + leaves["mu"]
    loss = _mean_cross_entropy(z, np.asarray(labels))
    tape.backward(loss)
    grads = {k: v.grad.copy() for k, v in leaves.items()}
    grads["K"] = np.stack([k.grad for k in K_layers])
    grads["b"] = np.stack([b.grad for b in b_layers])
    out = Params.from_dict(grads)
    add_regulariser_grad(network, params, out)
    return float(loss.value) + regulariser(network, params), out
