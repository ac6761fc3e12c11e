"""``2**k`` built from its bits, for the CPU kernels' tanh.

:func:`ptoc._maths.tanh` scales by ``2**k`` for an integral ``k`` in ``[-58, 0]``
(:func:`ptoc._maths.power_of_two`). Written in Python that is an integer shift, a
conversion to float and a multiplication, and compiled it stays so: on a vector of 8
entries two more operations than writing the exponent field of the float directly,
``(k + 1023) << 52``. The tanh loop is bound by its number of vector operations
(about one cycle each per vector, measured), and this took 5% off it
(``benchmarks/profile_layer_step.py``). Both give the exact power of two, so the
results are the same bits.

Importing this module registers that version of :func:`ptoc._maths.power_of_two` for
the CPU target (:mod:`ptoc.kernels.cpu` and :mod:`ptoc.kernels.conv_cpu`, whose disk
caches are keyed on this file); the CUDA target and the simulator run the Python one.
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


@overload(_maths.power_of_two, target="cpu")
def _power_of_two_cpu(k):
    """``2**k`` for an integral ``k`` in ``[-1022, 1023]`` (the ``[-58, 0]`` of tanh
    included; compiled, ``math.floor`` gives it as an integer): the exponent field
    ``k + 1023``, no fraction bits."""
    if not isinstance(k, (types.Integer, types.Float)):
        return None

    def impl(k):
        return float64_from_bits((np.int64(k) + np.int64(1023)) << np.int64(52))

    return impl
