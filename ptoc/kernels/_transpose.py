"""An 8 x 8 block transpose for the CPU kernels, in registers.

The CPU kernels move states between the solver's sample-major rows ``(S, d)`` and
their feature-major tiles ``(d, W)`` (see :mod:`ptoc.kernels.cpu`). Written as loops
of scalar loads and stores, a transpose costs about one cycle per entry: LLVM does
not turn a strided copy into the shuffles of a register transpose. At the small
shapes of layer-parallel work this was a third of a layer step (d = 16, S = 32: about
0.11 us for each transpose, against 0.26 us for the product ``K x``).

:func:`transpose8` copies one 8 x 8 block with eight vector loads, three rounds of
eight two-input shuffles (pairs of entries, then pairs of pairs, then halves) and
eight vector stores, as LLVM IR that is the same for every target (``shufflevector``;
on AVX-512 each vector is one register, on AVX2 two). It moves entries and computes
nothing, so results are bit for bit those of the scalar loops. :func:`transpose8_times`
multiplies each entry by one of another array on its way out (the adjoint's
``sigma'(a) * lambda`` as the stored ``sigma'`` is transposed in): one multiplication
per entry, the same as a pass of multiplications after the transpose, without that
pass.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core.extending import intrinsic

#: The shuffle masks of the three rounds: round ``k`` interleaves blocks of ``2**k``
#: entries of two vectors ``2**k`` rows apart (low halves, then high halves).
_ROUNDS = (
    (1, (0, 8, 2, 10, 4, 12, 6, 14), (1, 9, 3, 11, 5, 13, 7, 15)),
    (2, (0, 1, 8, 9, 4, 5, 12, 13), (2, 3, 10, 11, 6, 7, 14, 15)),
    (4, (0, 1, 2, 3, 8, 9, 10, 11), (4, 5, 6, 7, 12, 13, 14, 15)),
)


def _codegen(times: bool):
    """The code of :func:`transpose8` (``times``: of :func:`transpose8_times`)."""

    def codegen(context, builder, signature, args):
        arr_a = context.make_array(signature.args[0])(context, builder, args[0])
        arr_b = context.make_array(signature.args[3])(context, builder, args[3])
        element = context.get_data_type(signature.args[0].dtype)
        itemsize = context.get_abi_sizeof(element)
        vector = ir.VectorType(element, 8)
        intp = context.get_value_type(types.intp)

        def row(arr, r, c):
            """Pointer to ``arr[r, c:c+8]`` as one vector."""
            stride = builder.extract_value(arr.strides, 0)
            offset = builder.add(builder.mul(r, stride),
                                 builder.mul(c, ir.Constant(intp, itemsize)))
            address = builder.add(builder.ptrtoint(arr.data, intp), offset)
            return builder.inttoptr(address, vector.as_pointer())

        rows = [builder.load(row(arr_a, builder.add(args[1], ir.Constant(intp, i)), args[2]),
                             align=itemsize) for i in range(8)]
        mask_type = ir.VectorType(ir.IntType(32), 8)
        for step, low, high in _ROUNDS:
            low_mask = ir.Constant(mask_type, list(low))
            high_mask = ir.Constant(mask_type, list(high))
            nxt = list(rows)
            for first in range(0, 8, 2 * step):
                for k in range(first, first + step):
                    nxt[k] = builder.shuffle_vector(rows[k], rows[k + step], low_mask)
                    nxt[k + step] = builder.shuffle_vector(rows[k], rows[k + step], high_mask)
            rows = nxt
        if times:
            arr_c = context.make_array(signature.args[6])(context, builder, args[6])
        for j in range(8):
            out = rows[j]
            r = builder.add(args[4], ir.Constant(intp, j))
            if times:  # one multiplication per entry, a[...] * c[...]
                out = builder.fmul(out, builder.load(row(arr_c, r, args[5]), align=itemsize))
            builder.store(out, row(arr_b, r, args[5]), align=itemsize)
        return context.get_dummy_value()

    return codegen


def _float_matrices(*arrays) -> bool:
    return (all(isinstance(x, types.Array) and x.ndim == 2 for x in arrays)
            and arrays[0].dtype in (types.float64, types.float32)
            and all(x.dtype == arrays[0].dtype for x in arrays))


@intrinsic
def transpose8(typingctx, a, a0, a1, b, b0, b1):
    """``b[b0 + j, b1 + i] = a[a0 + i, a1 + j]`` for ``0 <= i, j < 8``.

    ``a`` and ``b`` are 2-D float64 or float32 arrays (the same dtype) whose rows have
    unit stride (``strides[1] == itemsize``; rows may be any distance apart, even
    negative); both blocks must lie inside their arrays (nothing is checked: the
    kernels that call this check the strides and the ranges).
    """
    if not _float_matrices(a, b):
        return None
    return types.void(a, types.intp, types.intp, b, types.intp, types.intp), _codegen(False)


@intrinsic
def transpose8_times(typingctx, a, a0, a1, b, b0, b1, c):
    """``b[b0 + j, b1 + i] = a[a0 + i, a1 + j] * c[b0 + j, b1 + i]``: :func:`transpose8`
    with each entry multiplied, before it is stored, by the entry of ``c`` (shaped and
    indexed as ``b``, unit-stride rows too) at its place; one rounding per entry, as
    ``a * c`` entry by entry."""
    if not _float_matrices(a, b, c):
        return None
    return (types.void(a, types.intp, types.intp, b, types.intp, types.intp, c),
            _codegen(True))
