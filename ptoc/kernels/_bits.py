"""``2**k`` built from its bits, and ``floor`` without a test, for the CPU kernels' tanh.

:func:`ptoc._maths.tanh` scales by ``2**k`` for an integral ``k`` in ``[-58, 0]``
(:func:`ptoc._maths.power_of_two`). Written in Python that is an integer shift, a
conversion to float and a multiplication, and compiled it stays so: on a vector of 8
entries two more operations than writing the exponent field of the float directly,
``(k + 1023) << 52``. The tanh loop is bound by its number of vector operations
(about one cycle each per vector, measured), and this took 5% off it
(``benchmarks/profile_layer_step.py``). Both give the exact power of two, so the
results are the same bits.

The exponent ``k`` is kept as a float, rounded by :func:`ptoc._maths.floor_value` (one
rounding instruction, which passes NaN through) and turned into the integer of the
exponent field by an addition (:data:`_SHIFTER`) rather than a conversion, which is
undefined for NaN in LLVM: 8 to 9% less time for the loop, the same bits.

Importing this module registers these versions of :func:`ptoc._maths.power_of_two` and
:func:`ptoc._maths.floor_value` for the CPU target (:mod:`ptoc.kernels.cpu` and
:mod:`ptoc.kernels.conv_cpu`, whose disk caches are keyed on this file); the CUDA target
and the simulator run the Python ones.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.core.extending import intrinsic, overload

from .. import _maths


@intrinsic
def float64_from_bits(typingctx, bits):
    """The float64 whose IEEE-754 bit pattern is the int64 ``bits`` (no conversion)."""
    if bits != types.int64:
        return None
    sig = types.float64(types.int64)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())

    return sig, codegen


#: ``1.5 * 2**52``: adding it to an integral float ``k`` with ``|k| < 2**51`` gives a float
#: whose low fraction bits hold ``k`` (two's complement), so that its bits minus those of
#: this constant are ``k`` as an integer, with no conversion instruction.
_SHIFTER = 1.5 * 2.0**52
_SHIFTER_BITS = int(np.array(_SHIFTER).view(np.int64))


@intrinsic
def bits_of_float64(typingctx, x):
    """The int64 bit pattern of the float64 ``x`` (no conversion; NaN included)."""
    if x != types.float64:
        return None
    sig = types.int64(types.float64)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(64))

    return sig, codegen


@overload(_maths.floor_value, target="cpu")
def _floor_value_cpu(x):
    """``floor(x)`` as a float with no test: the rounding instruction passes NaN and
    infinities through (the Python version tests for them because ``math.floor``
    gives an integer)."""
    if not isinstance(x, types.Float):
        return None

    def impl(x):
        return np.floor(x)

    return impl


@overload(_maths.power_of_two, target="cpu")
def _power_of_two_cpu(k):
    """``2**k`` for an integral ``k`` in ``[-1022, 1023]`` (the ``[-58, 0]`` of tanh
    included): the exponent field ``k + 1023``, no fraction bits.

    A float ``k`` is turned into the integer by :data:`_SHIFTER` (one addition) rather
    than by a conversion: a conversion of NaN is undefined in LLVM, while this gives
    some value for NaN, which :func:`ptoc._maths.tanh` multiplies by NaN."""
    if isinstance(k, types.Integer):
        def impl(k):
            return float64_from_bits((np.int64(k) + np.int64(1023)) << np.int64(52))
        return impl
    if isinstance(k, types.Float):
        offset = np.int64(1023 - _SHIFTER_BITS)

        def impl_float(k):
            shifted = np.float64(k) + _SHIFTER
            return float64_from_bits((bits_of_float64(shifted) + offset) << np.int64(52))
        return impl_float
    return None
