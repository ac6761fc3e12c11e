r"""NumPy reference kernels of one convolutional residual layer: readable, vectorised.

The target to teach from and to check :mod:`ptoc.kernels.conv_cpu` against; both
modules have the same functions with the same signatures, and the public, validating
wrappers are in :mod:`ptoc.kernels.conv`. Theory: :doc:`/theory/conv`.

Conventions. A batch of states is ``x`` with shape ``(S, C_in, H, W)``. A kernel ``K``
has shape ``(C_out, C_in, 3, 3)`` and a bias ``b`` shape ``(C_out,)``. The convolution
is a cross-correlation with stride 1 and zero padding 1, as PyTorch's ``conv2d``:
with ``xp`` the input padded by one zero row and column on every side,

.. math::

    \operatorname{conv}(x, K)[s, i, y, z] = \sum_{j} \sum_{u, v = 0}^{2}
        K[i, j, u, v]\, xp[s, j, y + u, z + v],

that is, a sum over the 9 *taps* ``(u, v)`` of the kernel, each a channel mixing
``K[:, :, u, v]`` of the padded input shifted by ``(u, v)``. A residual layer (``C_in =
C_out``) maps ``x`` to ``x + h sigma(a)`` with ``a = conv(x, K) + b`` (``b`` added to every
pixel of its channel); the opening maps the images to ``sigma(a)``.

The adjoint (ptoc's convention, :doc:`/theory/adjoint`: ``lambda = dJ/dx``, co-state
``p = -lambda``): with ``g = sigma'(a) * lambda_{n+1}``,

.. math::

    \lambda_n = \lambda_{n+1} + h \operatorname{conv}^T(g, K), \qquad
    \operatorname{conv}^T(g, K)[s, j, Y, Z] = \sum_i \sum_{u, v} K[i, j, u, v]\,
        g[s, i, Y + 1 - u, Z + 1 - v]

(entries of ``g`` outside the image are zero): the convolution with the kernel flipped
in space and transposed in its channels. The parameter gradient is

.. math::

    \frac{\partial J}{\partial K_n}[i, j, u, v] = h \sum_{s, y, z} g[s, i, y, z]\,
        xp[s, j, y + u, z + v], \qquad
    \frac{\partial J}{\partial b_n}[i] = h \sum_{s, y, z} g[s, i, y, z].

The data part of the layer Hamiltonian is ``sum_s p_s . Phi_n(x_s)``, and its gradient
in ``(K, b)`` is the gradient above with ``p`` in place of ``lambda`` (Li & Hao 2018).

``act`` is the integer activation code of :mod:`ptoc._maths`.
"""

from __future__ import annotations

import numpy as np

from ..activations import Activation, dsigma, sigma

_BY_CODE = {a.code: a for a in Activation}

#: The taps ``(u, v)`` of a 3 x 3 kernel, row by row.
TAPS = tuple((u, v) for u in range(3) for v in range(3))


def _padded(x: np.ndarray) -> np.ndarray:
    """``x`` (S, C, H, W) with one zero row and column added on every side."""
    return np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))


def conv(x, K, b):
    """``a = conv(x, K) + b``: the sum over the 9 taps of shifted slices of the padded input."""
    S, _, H, W = x.shape
    xp = _padded(x)
    a = np.empty((S, K.shape[0], H, W), dtype=np.result_type(x, K))
    a[...] = b[None, :, None, None]
    for u, v in TAPS:
        a += np.einsum("ij,sjyz->siyz", K[:, :, u, v], xp[:, :, u:u + H, v:v + W])
    return a


def conv_transpose(g, K):
    """``conv^T(g, K)`` (S, C_in, H, W): the transpose of ``x -> conv(x, K)`` applied to ``g``.

    Each tap ``(u, v)`` sends ``K[:, :, u, v]^T g`` back to the input pixels it read,
    the window shifted by ``(u, v)`` in the padded input; the padding is then dropped.
    """
    S, _, H, W = g.shape
    gp = np.zeros((S, K.shape[1], H + 2, W + 2), dtype=np.result_type(g, K))
    for u, v in TAPS:
        gp[:, :, u:u + H, v:v + W] += np.einsum("ij,siyz->sjyz", K[:, :, u, v], g)
    return gp[:, :, 1:H + 1, 1:W + 1]


def kernel_gradient(x, g):
    """``sum_{s,y,z} g[s, i, y, z] xp[s, j, y + u, z + v]`` (C_out, C_in, 3, 3): the
    derivative of ``sum(g * conv(x, K))`` in ``K``."""
    _, _, H, W = x.shape
    xp = _padded(x)
    out = np.empty((g.shape[1], x.shape[1], 3, 3), dtype=np.result_type(x, g))
    for u, v in TAPS:
        out[:, :, u, v] = np.einsum("siyz,sjyz->ij", g, xp[:, :, u:u + H, v:v + W])
    return out


def layer(x, K, b, h, act, residual, out, dsig):
    """``out = x + h sigma(a)`` (``residual``) or ``out = h sigma(a)``, ``a = conv(x, K) + b``;
    ``sigma'(a)`` into ``dsig`` when it is not None. Returns ``out``."""
    a = conv(x, K, b)
    activation = _BY_CODE[act]
    out[...] = h * sigma(a, activation)
    if residual:
        out += x
    if dsig is not None:
        dsig[...] = dsigma(a, activation)
    return out


def adjoint(x, lam, K, b, h, act, out, gK, gb, dsig=None):
    """With ``g = sigma'(a) * lam``: ``out = lam + h conv^T(g, K)`` when ``out`` is not None
    (a residual layer's adjoint step); ``gK += h kernel_gradient(x, g)`` and
    ``gb += h sum g`` when ``gK`` is not None. ``dsig``, when given, is ``sigma'(a)`` of
    this layer at ``x`` as :func:`layer` stored it, and the convolution is not computed
    again. Returns ``out``."""
    if dsig is None:
        dsig = dsigma(conv(x, K, b), _BY_CODE[act])
    g = dsig * lam
    if out is not None:
        out[...] = lam + h * conv_transpose(g, K)
    if gK is not None:
        gK += h * kernel_gradient(x, g)
        gb += h * g.sum(axis=(0, 2, 3))
    return out


def hamiltonian(x, p, K, b, h, act):
    """The data part of the layer Hamiltonian, ``sum_s <p_s, x_s + h sigma(a_s)>``."""
    return float(np.vdot(p, layer(x, K, b, h, act, True, np.empty_like(x), None)))


def hamiltonian_grad(x, p, K, b, h, act, gK, gb):
    """``gK, gb += d/d(K, b) hamiltonian(x, p, K, b, h, act)``: :func:`adjoint`'s
    gradient with ``p`` in place of ``lambda``."""
    adjoint(x, p, K, b, h, act, None, gK, gb)
