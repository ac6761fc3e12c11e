r"""The per-entry mathematics of one convolutional residual layer, written once.

Plain Python functions on array entries, the convolutional counterparts of the dense
layer's :mod:`ptoc._maths`: each computes one entry of an array, with loops over the
channels and the 3 x 3 taps (and, for the gradients, over a chunk of samples and the
pixels). They run as they are in the interpreter and in the CUDA simulator, and
:mod:`ptoc.kernels.conv_cuda` registers them (:data:`CUDA_FUNCTIONS`) as jitable, so
that its kernels, one thread per entry, call exactly this code on a GPU.

Notation (:doc:`/theory/conv`): states ``x`` (S, C_in, H, W), a kernel ``K`` (C_out,
C_in, 3, 3), a bias ``b`` (C_out,); the convolution is a cross-correlation with stride
1 and zero padding 1. Tap ``(u, v)`` of output pixel ``(y, z)`` reads input pixel
``(y + u - 1, z + v - 1)``; a pixel outside the image is a zero of the padding, and its
term is left out of the sum (adding a zero would not change it). Every sum below runs
in ascending index order, so an entry's value does not depend on which thread
computes it. The readable, vectorised form of the same equations is
:mod:`ptoc.kernels.conv_reference`.
"""

from __future__ import annotations


def conv_entry(x, K, b, s, i, y, z):
    """``a[s, i, y, z] = b[i] + sum_j sum_{u,v} K[i, j, u, v] x[s, j, y + u - 1, z + v - 1]``,
    the taps outside the image left out (zero padding); the sum runs over ``j``, then
    ``u``, then ``v``."""
    H, W = x.shape[2], x.shape[3]
    acc = b[i]
    for j in range(K.shape[1]):
        for u in range(3):
            row = y + u - 1
            if row >= 0 and row < H:
                for v in range(3):
                    col = z + v - 1
                    if col >= 0 and col < W:
                        acc += K[i, j, u, v] * x[s, j, row, col]
    return acc


def conv_transpose_entry(g, K, s, j, y, z):
    """``conv^T(g, K)[s, j, y, z] = sum_i sum_{u,v} K[i, j, u, v] g[s, i, y + 1 - u, z + 1 - v]``,
    the entries of ``g`` outside the image left out: every output pixel that read input
    pixel ``(y, z)`` of channel ``j``, weighted by the tap that read it."""
    H, W = g.shape[2], g.shape[3]
    acc = 0.0
    for i in range(K.shape[0]):
        for u in range(3):
            row = y + 1 - u
            if row >= 0 and row < H:
                for v in range(3):
                    col = z + 1 - v
                    if col >= 0 and col < W:
                        acc += K[i, j, u, v] * g[s, i, row, col]
    return acc


def kernel_gradient_partial_entry(g, x, i, j, u, v, lo, hi):
    """Chunk partial of the kernel gradient (without the factor ``h``),
    ``sum_{s=lo}^{hi-1} sum_{y,z} g[s, i, y, z] x[s, j, y + u - 1, z + v - 1]``, over the
    output pixels whose tap ``(u, v)`` reads inside the image.

    ``dJ/dK[i, j, u, v] = h sum_s (...)`` is the sum of these partials over consecutive
    chunks of samples, added in chunk order, so it does not depend on how the work is
    shared out among threads.
    """
    H, W = x.shape[2], x.shape[3]
    y_lo, y_hi = max(0, 1 - u), min(H, H + 1 - u)
    z_lo, z_hi = max(0, 1 - v), min(W, W + 1 - v)
    acc = 0.0
    for s in range(lo, hi):
        for y in range(y_lo, y_hi):
            for z in range(z_lo, z_hi):
                acc += g[s, i, y, z] * x[s, j, y + u - 1, z + v - 1]
    return acc


def bias_gradient_partial_entry(g, i, lo, hi):
    """Chunk partial of the bias gradient (without ``h``), ``sum_{s=lo}^{hi-1} sum_{y,z}
    g[s, i, y, z]``."""
    acc = 0.0
    for s in range(lo, hi):
        for y in range(g.shape[2]):
            for z in range(g.shape[3]):
                acc += g[s, i, y, z]
    return acc


#: The functions the CUDA kernels of :mod:`ptoc.kernels.conv_cuda` call, registered as
#: jitable there (the activation is :func:`ptoc._maths.activation`, registered by
#: :mod:`ptoc.kernels.cuda`).
CUDA_FUNCTIONS = (conv_entry, conv_transpose_entry, kernel_gradient_partial_entry,
                  bias_gradient_partial_entry)
