"""The per-element mathematics of one residual layer, written once.

These are plain Python functions on scalars and array entries. They run as they
are in the interpreter (and in the CUDA simulator), and each compiled target
registers the ones its kernels call as jitable functions, so that those kernels
call exactly this code:

* :mod:`ptoc.kernels.cuda` calls every function here (:data:`CUDA_FUNCTIONS`): one
  thread computes one entry, with :func:`preactivation`, :func:`activation`,
  :func:`adjoint_entry`, :func:`gradient_partial_entry` and
  :func:`bias_partial_entry`.
* :mod:`ptoc.kernels.cpu` calls :func:`activation` (and through it :func:`tanh`),
  the nonlinear part (:data:`CPU_FUNCTIONS`). It does not call the four functions
  that are sums over an index (:func:`preactivation`, :func:`adjoint_entry`,
  :func:`gradient_partial_entry`, :func:`bias_partial_entry`): each computes one
  entry with a loop over features (or samples), while the CPU kernels keep a
  work item's samples in feature-major tiles and vectorise over the samples, which
  needs the loops interchanged. A CPU gradient sweep (forward and adjoint) that
  calls these functions per entry was measured 8x to 9x slower than the tile
  kernels on one thread and 9x to 22x on two (d = 8, 16, 64; S = 256, N = 64;
  float64, tanh). The tile loops add the same terms in the same order instead:
  with ``PTOC_FASTMATH=0`` (nothing reassociated or contracted) the CPU results
  equal those of the CUDA kernels, which call these functions, bit for bit, and
  ``tests/test_kernels.py`` checks that.

So the targets differ in how the loops over samples ``s`` and features ``i, j``
map to threads and vector lanes, and, with the default ``PTOC_FASTMATH=1``, in
round-off (the CPU may contract and reassociate; see :mod:`ptoc.kernels.cpu`). The
readable, vectorised form of the same equations is :mod:`ptoc.kernels.reference`.

Notation (:doc:`/theory/resnet`). One layer maps a batch of states ``x`` (S, d) to
``x + h sigma(a)`` with pre-activation ``a[s, i] = b[i] + sum_j K[i, j] x[s, j]``.
Every sum below runs in ascending index order.

Activation codes are small integers because compiled kernels take scalars only;
the public API uses :class:`ptoc.Activation`.
"""

from __future__ import annotations

import math

#: Private activation codes used inside compiled kernels (see ``Activation.code``).
TANH = 0
RELU = 1
SMOOTHRELU = 2

#: What a level kernel's point step does with its value ``phi`` of position ``k``
#: (``state_points_into`` / ``adjoint_points_into`` of every kernel target):
#: ``out[r] = phi``; ``out[rows[r]] = phi - u[k]``; ``out[rows[r]] = g[k] + (phi - u[k])``;
#: ``out[rows[r]] = out[rows[r]] + (u[k] - phi)``. The middle two and the last are the
#: halves of MGRIT's FAS right-hand side (:mod:`ptoc.parallel.mgrit`).
POINT_APPLY, POINT_RESIDUAL, POINT_RESIDUAL_G, POINT_TAU = 0, 1, 2, 3

#: Half-width of the quadratic blend of SmoothReLU (Günther et al. 2020, the Peaks experiments).
SMOOTHRELU_ETA = 0.1

# Cody-Waite split of ln 2 (high part exact in 32 bits) and 1/ln 2.
_LN2_HI = 0.693145751953125
_LN2_LO = 1.42860682030941723212e-6
_INV_LN2 = 1.4426950408889634
_TWO_M58 = 2.0**-58

#: ``expm1(r) ~ r P(r)`` on ``|r| <= ln(2)/2``: the coefficients of ``P``, degree 10 first,
#: then ``P(0) = 1``. A Chebyshev (near-minimax) fit of ``expm1(r)/r``, made with mpmath's
#: ``chebyfit`` at 40 digits and rounded to float64; largest relative error of ``r P(r)``
#: 2.4e-17 (about 0.2 ulp), against 4e-18 for the degree-13 Taylor polynomial it
#: replaces, which needed two more multiply-adds per entry.
_EXPM1_P = (2.5105206480259365e-08, 2.762635737968284e-07, 2.755725542549107e-06,
            2.4801504346665615e-05, 0.00019841269874800694, 0.001388888893248886,
            0.008333333333326141, 0.04166666666657314, 0.1666666666666667,
            0.5000000000000006)


def floor_value(x):
    """``floor(x)`` as a float; NaN and infinities are returned as they are. The CPU
    kernels compile a version without the test (:mod:`ptoc.kernels._bits`): the
    rounding instruction passes NaN through by itself."""
    if not math.isfinite(x):
        return x
    return float(math.floor(x))


def power_of_two(k):
    """``2**k`` for an integral float ``k`` in ``[-58, 0]``, exactly (the scaling of
    :func:`tanh`); NaN for NaN. The CPU kernels compile a version that writes the
    exponent bits (:mod:`ptoc.kernels._bits`: the same values, and a NaN ``k`` gives a
    value that leaves :func:`tanh` NaN)."""
    if k != k:
        return k
    return float(1 << int(58 + k)) * _TWO_M58


def tanh(a):
    """Hyperbolic tangent to about 2 ulp, written so that a loop of it vectorises.

    A library ``tanh`` is an opaque call that blocks SIMD code; this one is only
    arithmetic. With ``y = min(|a|, 20)`` (``tanh(20)`` rounds to 1), compute
    ``u = expm1(-2y)`` by the reduction ``-2y = k ln 2 + r``, ``|r| <= ln(2)/2``,
    a degree-11 polynomial for ``expm1(r)`` (relative error < 3e-17, :data:`_EXPM1_P`) and
    ``expm1(-2y) = 2^k expm1(r) + (2^k - 1)``; then ``tanh(y) = -u / (2 + u)``, which
    keeps full relative accuracy for tiny ``|a|``.

    The polynomial is evaluated by Estrin's scheme (three short polynomials joined with
    ``r^4``) rather than Horner's: a loop of tanh was bound by the latency of Horner's
    ten dependent multiply-adds, and takes 9% less time this way (190 against 209 ns for
    ``x + h tanh(a)`` over 512 entries, d = 16, S = 32), with the same largest error
    against NumPy's tanh (3 ulp over 7e5 arguments; mean 0.63 ulp against 0.61).

    ``k`` stays a float, never converted to an integer, so a NaN ``a`` goes through
    every operation as NaN and no step is undefined for it (an integer conversion of
    NaN is, in LLVM); compiled for the CPU, ``k`` is then rounded and turned into the
    exponent of ``2^k`` in fewer vector operations (:mod:`ptoc.kernels._bits`, 8 to 9%
    less time for the loop, the same bits). The last line returns ``a`` itself for NaN
    all the same: dropping it saved another 2%, but then LLVM rewrote ``tanh`` (its
    sign, squared in ``sigma'``) differently in different loops, and the convolutional
    kernels' stored and recomputed ``sigma'`` differed in the last bits.
    """
    y = abs(a)
    if y > 20.0:  # not for NaN, which goes on as NaN
        y = 20.0
    z = -2.0 * y
    k = floor_value(z * _INV_LN2 + 0.5)
    r = (z - k * _LN2_HI) - k * _LN2_LO
    # P(r) by Estrin's scheme: the degrees 0-3, 4-7 and 8-10 as three short polynomials,
    # joined with r^4, so that the chain of dependent operations is four deep, not ten
    c = _EXPM1_P
    r2 = r * r
    r4 = r2 * r2
    low = (1.0 + c[9] * r) + (c[8] + c[7] * r) * r2
    mid = (c[6] + c[5] * r) + (c[4] + c[3] * r) * r2
    high = (c[2] + c[1] * r) + c[0] * r2
    em1_r = (low + (mid + high * r4) * r4) * r
    two_k = power_of_two(k)  # exact: k >= -58 because y <= 20
    u = two_k * em1_r + (two_k - 1.0)
    t = math.copysign(-u / (2.0 + u), a)
    return t if a == a else a


def activation(a, act):
    """``(sigma(a), sigma'(a))`` for activation code ``act`` (:doc:`/theory/resnet`).

    * tanh: ``(t, 1 - t^2)`` with ``t = tanh(a)``;
    * ReLU: ``(max(a, 0), [a > 0])`` (derivative 0 at ``a = 0``);
    * SmoothReLU, ``eta = 0.1``: ``(a^2/(4 eta) + a/2 + eta/4, a/(2 eta) + 1/2)`` for
      ``|a| < eta``, the ReLU pair otherwise; value and slope are continuous.

    A NaN ``a`` gives ``(NaN, NaN)`` for every activation, so a diverging run is
    never silently turned into zeros.
    """
    if act == TANH:
        t = tanh(a)
        return t, 1.0 - t * t
    if act == SMOOTHRELU and abs(a) < SMOOTHRELU_ETA:
        return (a * a / (4.0 * SMOOTHRELU_ETA) + 0.5 * a + 0.25 * SMOOTHRELU_ETA,
                a / (2.0 * SMOOTHRELU_ETA) + 0.5)
    if a > 0.0:
        return a, 1.0
    if a <= 0.0:
        return 0.0, 0.0
    return a, a  # NaN: propagate it to the value and the slope


def preactivation(x, K, b, s, i):
    """``a[s, i] = b[i] + sum_j K[i, j] x[s, j]``."""
    acc = b[i]
    for j in range(x.shape[1]):
        acc += K[i, j] * x[s, j]
    return acc


def adjoint_entry(lam, K, g, gs, h, s, j):
    """One entry of the adjoint step (:doc:`/theory/adjoint`).

    ``lambda_n[s, j] = lam[s, j] + h sum_i K[i, j] g[gs, i]`` with
    ``g = sigma'(a) * lam`` (row ``gs`` of ``g`` belongs to sample ``s``).
    """
    acc = 0.0 * h
    for i in range(K.shape[0]):
        acc += K[i, j] * g[gs, i]
    return lam[s, j] + h * acc


def gradient_partial_entry(g, x, h, i, j, lo, hi):
    """Chunk partial of the weight gradient, ``sum_{s=lo}^{hi-1} (h g[s, i]) x[s, j]``.

    ``dJ/dK_n[i, j] = h sum_s g[s, i] x[s, j]`` is the sum of these partials over
    consecutive chunks of ``chunk`` samples, added in chunk order, which makes the
    result independent of the number of threads.
    """
    acc = 0.0 * h
    for s in range(lo, hi):
        acc += (h * g[s, i]) * x[s, j]
    return acc


def bias_partial_entry(g, h, i, lo, hi):
    """Chunk partial of the bias gradient, ``sum_{s=lo}^{hi-1} h g[s, i]``."""
    acc = 0.0 * h
    for s in range(lo, hi):
        acc += h * g[s, i]
    return acc


#: The functions the CPU kernels call, registered as jitable by :mod:`ptoc.kernels.cpu`
#: (in dependency order: :func:`activation` calls :func:`tanh`, which calls
#: :func:`floor_value` and :func:`power_of_two`, registered for the CPU by
#: :mod:`ptoc.kernels._bits`).
CPU_FUNCTIONS = (tanh, activation)

#: The functions the CUDA kernels call, registered by :mod:`ptoc.kernels.cuda`: all of them.
CUDA_FUNCTIONS = (floor_value, power_of_two) + CPU_FUNCTIONS + (
    preactivation, adjoint_entry, gradient_partial_entry, bias_partial_entry)
