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

# Cody-Waite split of ln(2)/2 (high part exact in 31 bits, so that ``k`` times it is exact
# for the ``k <= 58`` of tanh) and 2/ln 2.
_HALF_LN2_HI = 0.693145751953125 / 2
_HALF_LN2_LO = 1.42860682030941723212e-6 / 2
_TWO_OVER_LN2 = 2.8853900817779268
_TWO_M58 = 2.0**-58

#: ``tanh(h) ~ h O(h^2) / E(h^2)`` on ``|h| <= ln(2)/4``: the coefficients of ``E`` (degree
#: 3) and ``O`` (degree 2), constant term first. They are the fifth convergent of the
#: continued fraction ``tanh h = h / (1 + h^2 / (3 + h^2 / (5 + h^2 / (7 + ...))))``, which
#: is also the [6/6] Pade approximant of ``exp(2h) = (E + h O) / (E - h O)``; exact
#: rationals (``E = 1 + 20/44 s + 16/792 s^2 + 64/665280 s^3``, ``O = 1 + 8/66 s +
#: 32/15840 s^2``), largest relative error 5.2e-19 on the interval (mpmath, 50 digits).
_TANH_E = (1.0, 20.0 / 44.0, 16.0 / 792.0, 64.0 / 665280.0)
_TANH_O = (1.0, 8.0 / 66.0, 32.0 / 15840.0)


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
    """Hyperbolic tangent to 3 ulp, written so that a loop of it vectorises.

    A library ``tanh`` is an opaque call that blocks SIMD code; this one is only
    arithmetic, with one division. For ``y = min(|a|, 20)`` (``tanh(20)`` rounds to 1):

    1. reduce ``2y = k ln 2 + 2h`` with ``k = round(2y / ln 2)``, ``|h| <= ln(2)/4``
       (Cody-Waite, ``k`` exact);
    2. ``exp(2h) = (E + w) / (E - w)`` with ``w = h O(h^2)``, ``E = E(h^2)``: the [6/6]
       Pade approximant of the exponential, equivalently ``tanh(h) = w / E``
       (:data:`_TANH_E`, :data:`_TANH_O`; relative error 5e-19);
    3. with ``p = 2^-k``, ``exp(-2y) = p (E - w) / (E + w)``, and
       ``tanh(y) = (1 - exp(-2y)) / (1 + exp(-2y))`` becomes

       ``tanh(y) = ((1 - p) E + (1 + p) w) / ((1 + p) E + (1 - p) w)``.

    ``1 - p`` and ``1 + p`` are exact (or round to 1 where ``tanh`` does), so nothing
    cancels: for small ``y`` (``k = 0``) this is ``w / E``, with full relative accuracy
    down to the smallest subnormal. Compiled for the CPU, its largest error against a
    64-bit-mantissa reference is 2.97 ulp (mean 0.44 ulp over 8e5 arguments; run as
    Python, with no product fused into a sum: 4.15 and 0.67). The expm1 formulation it replaced
    had 3.0 (mean 0.56) and took 9% more time in a loop of
    ``x + h tanh(a)`` (187 against 206 ns over 512 entries, d = 16, S = 32), its
    degree-11 polynomial and separate ``2^k`` scaling being about five vector
    operations more per entry.

    ``k`` stays a float, never converted to an integer, so a NaN ``a`` goes through
    every operation as NaN and no step is undefined for it (an integer conversion of
    NaN is, in LLVM); compiled for the CPU, ``k`` is rounded and turned into the
    exponent of ``2^-k`` in few vector operations (:mod:`ptoc.kernels._bits`, the same
    bits). The last line returns ``a`` itself for NaN all the same: without it, LLVM
    rewrote ``tanh`` (its sign, squared in ``sigma'``) differently in different loops,
    and the convolutional kernels' stored and recomputed ``sigma'`` differed in the
    last bits.
    """
    y = abs(a)
    if y > 20.0:  # not for NaN, which goes on as NaN
        y = 20.0
    k = floor_value(y * _TWO_OVER_LN2 + 0.5)
    h = (y - k * _HALF_LN2_HI) - k * _HALF_LN2_LO
    s = h * h
    e = _TANH_E
    o = _TANH_O
    big_e = e[0] + s * (e[1] + s * (e[2] + s * e[3]))
    w = h * (o[0] + s * (o[1] + s * o[2]))
    p = power_of_two(-k)  # exact: 0 <= k <= 58 because y <= 20
    t = math.copysign(((1.0 - p) * big_e + (1.0 + p) * w)
                      / ((1.0 + p) * big_e + (1.0 - p) * w), a)
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
