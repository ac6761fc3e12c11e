"""Register-blocked products for the CPU kernels: a block of outputs held in registers.

The CPU kernels compute three products per layer, two on feature-major tiles (one row
per feature, one column per sample, see :mod:`ptoc.kernels.cpu`) and one that sums
over samples:

* the pre-activation ``a[i, t] = b[i] + sum_j K[i, j] x[j, t]`` (``_maths.preactivation``,
  mode :data:`BIAS`),
* the adjoint update ``lam[j, t] += h * sum_i K[i, j] g[i, t]`` (``_maths.adjoint_entry``,
  mode :data:`ADD_SCALED`, with ``M = K^T``),
* the weight-gradient partial of a chunk ``pK[i, j] = sum_t (h g[i, t]) x[t, j]``
  (``_maths.gradient_partial_entry``, mode :data:`ZERO`: ``M`` is the tile ``h g``
  restricted to the chunk, ``src`` the chunk's sample rows of ``x``, and the "samples"
  of a block are the columns ``j``).

At width 8 and 16 the forward sweep may skip the tiles (:func:`ptoc.kernels.cpu._preact_rows`):
its pre-activation is then mode :data:`BIAS_COLS`, with ``M`` the sample-major states
(a block's rows are samples), ``src`` the transpose of ``K`` and the features one or
two vectors, the same chain ``b[i] + x[s, 0] K[i, 0] + x[s, 1] K[i, 1] + ...`` per
entry.

Each intrinsic here computes one block of such outputs, ``R`` rows by ``V`` vectors of
``L`` samples (``R x V`` accumulators), as LLVM IR written out by hand: the
accumulators start from the bias (or from zero), then one loop over the ``k`` terms
loads ``V`` vectors of ``src`` row ``k`` and, for each of the ``R`` rows, one
coefficient ``M[r, k]`` broadcast to a vector, and adds ``M[r, k] * src[k, t]`` to
each accumulator; at the end the block is stored (or, for the adjoint update, added to
``dst`` times ``h``). A row of the result is loaded and stored once per product, not
once per few terms, and nothing is set up per block beyond the ``R x V`` starting
values, so a product of 8 x 8 by 8 x 16 costs a few tens of cycles more than its
multiply-adds: written as loops over tile rows, LLVM hoisted and spilled the
coefficients of every pass, which made such a product several times slower than its
arithmetic (``benchmarks/profile_layer_step.py``).

Sums and their order. Every output is the chain ``acc <- acc + M[r, k] * src[k, t]`` in
ascending ``k`` from its starting value, one rounding per term: with contraction on
(``"contract"`` in ``ptoc._config.CPU_FASTMATH``) each term is one ``llvm.fmuladd``
(a fused multiply-add where the machine has one), otherwise a multiplication and an
addition, the order of ``_maths.preactivation`` and ``_maths.adjoint_entry``. The
block shape does not enter the arithmetic: a sample gets the same bits in any block,
any work item and any tail (the ``L = 1`` intrinsics are the same chain on scalars).
For the gradient partial this is the samples of the chunk in order, as
``gradient_partial_entry`` adds them.

Block shapes. Two multiply-adds start per cycle and each takes about four cycles, so a
block needs eight independent accumulators to keep the units busy: 4 rows by 16
samples (two vectors) for the tile products, 8 rows by one vector of 8 columns for the
partial at width 8; narrower blocks serve the edges.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core.extending import intrinsic

from .. import _config

#: Terms fused into one multiply-add (see the module docstring).
_CONTRACT = _config.CPU_FASTMATH is True or (
    isinstance(_config.CPU_FASTMATH, (set, frozenset)) and "contract" in _config.CPU_FASTMATH)

#: Start from the bias ``b[r]`` and store the block (the pre-activation).
BIAS = 0
#: Start from zero and add ``h`` times the block to ``dst`` (the adjoint update).
ADD_SCALED = 1
#: Start from zero and store the block (the weight-gradient partial).
ZERO = 2
#: Start from the vector ``b[t .. t+L-1]``, the same for every row, and store the block
#: (the pre-activation of sample-major rows: ``M`` the states, ``src`` ``K^T``).
BIAS_COLS = 3


def _block_intrinsic(R: int, V: int, L: int, mode: int):
    """The intrinsic ``f(M, src, dst, r, t, b, h)`` for rows ``r .. r+R-1`` and samples
    ``t .. t + V*L - 1`` (``mode``: :data:`BIAS`, :data:`ADD_SCALED`, :data:`ZERO` or
    :data:`BIAS_COLS`).

    ``M`` may have any strides (its entries are loaded one by one); with ``L > 1`` the
    rows of ``src`` and ``dst`` must have adjacent entries (``strides[1] == itemsize``),
    since ``L`` of them are one vector load. Nothing is checked: the callers pass scratch
    tiles, or check the stride first."""

    def typer(typingctx, M, src, dst, r, t, b, h):
        arrays = (M, src, dst)
        if not all(isinstance(a, types.Array) and a.ndim == 2 for a in arrays):
            return None
        dtype = M.dtype
        if dtype not in (types.float64, types.float32) or any(a.dtype != dtype
                                                              for a in arrays[1:]):
            return None
        if not (isinstance(b, types.Array) and b.ndim == 1 and b.dtype == dtype):
            return None
        sig = types.void(M, src, dst, types.intp, types.intp, b, h)

        def codegen(context, builder, signature, args):
            _, _, _, r_, t_, b_, h_ = args
            arr_M, arr_s, arr_d = (context.make_array(ty)(context, builder, val)
                                   for ty, val in zip(signature.args[:3], args[:3], strict=True))
            element = context.get_data_type(signature.args[0].dtype)
            itemsize = context.get_abi_sizeof(element)
            intp = context.get_value_type(types.intp)
            # vectors even for one sample (L = 1): Numba's fast-math pass puts its flags on
            # every call that returns a scalar float, and ``reassoc`` there would let LLVM
            # turn the k loop of a scalar chain into a vector reduction (other bits)
            vec = ir.VectorType(element, L)

            def address(arr, row, col, ty):
                """Pointer to ``arr[row, col]`` (as a ``ty``)."""
                s0 = builder.extract_value(arr.strides, 0)
                s1 = builder.extract_value(arr.strides, 1)
                offset = builder.add(builder.mul(row, s0), builder.mul(col, s1))
                where = builder.add(builder.ptrtoint(arr.data, intp), offset)
                return builder.inttoptr(where, ty.as_pointer())

            def const(i):
                return ir.Constant(intp, i)

            def splat(x):
                undef = ir.Constant(vec, ir.Undefined)
                one = builder.insert_element(undef, x, ir.Constant(ir.IntType(32), 0))
                mask = ir.Constant(ir.VectorType(ir.IntType(32), L), [0] * L)
                return builder.shuffle_vector(one, undef, mask)

            suffix = f"v{L}f{itemsize * 8}"
            fmuladd = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(vec, [vec, vec, vec]), f"llvm.fmuladd.{suffix}")

            def mul_add(a, x, acc):
                """``acc + a * x``, one term of the chain."""
                if _CONTRACT:
                    return builder.call(fmuladd, [a, x, acc])
                return builder.fadd(acc, builder.fmul(a, x))

            def cols(v):
                return builder.add(t_, const(v * L))

            # starting values
            accs = [[cgutils.alloca_once(builder, vec) for _ in range(V)] for _ in range(R)]
            if mode == BIAS_COLS:  # b[t + v L ...] as vectors (unit stride: the caller checks)
                arr_b = context.make_array(signature.args[5])(context, builder, b_)
                for v in range(V):
                    where = builder.add(builder.ptrtoint(arr_b.data, intp),
                                        builder.mul(cols(v), const(itemsize)))
                    bias = builder.load(builder.inttoptr(where, vec.as_pointer()),
                                        align=itemsize)
                    for i in range(R):
                        builder.store(bias, accs[i][v])
            elif mode == BIAS:
                arr_b = context.make_array(signature.args[5])(context, builder, b_)
                s0 = builder.extract_value(arr_b.strides, 0)
                for i in range(R):
                    where = builder.add(builder.ptrtoint(arr_b.data, intp),
                                        builder.mul(builder.add(r_, const(i)), s0))
                    bias = splat(builder.load(builder.inttoptr(where, element.as_pointer()),
                                              align=itemsize))
                    for v in range(V):
                        builder.store(bias, accs[i][v])
            else:  # ADD_SCALED and ZERO
                zero = ir.Constant(vec, [ir.Constant(element, 0.0)] * L)
                for i in range(R):
                    for v in range(V):
                        builder.store(zero, accs[i][v])
            # the terms, in ascending k
            n_terms = builder.extract_value(arr_M.shape, 1)
            with cgutils.for_range(builder, n_terms, intp=intp) as loop:
                k = loop.index
                xs = [builder.load(address(arr_s, k, cols(v), vec), align=itemsize)
                      for v in range(V)]
                for i in range(R):
                    row = builder.add(r_, const(i))
                    coef = splat(builder.load(address(arr_M, row, k, element), align=itemsize))
                    for v in range(V):
                        builder.store(mul_add(coef, xs[v], builder.load(accs[i][v])),
                                      accs[i][v])
            # the block out
            if mode == ADD_SCALED:
                scale = splat(context.cast(builder, h_, signature.args[6],
                                           signature.args[0].dtype))
            for i in range(R):
                row = builder.add(r_, const(i))
                for v in range(V):
                    where = address(arr_d, row, cols(v), vec)
                    acc = builder.load(accs[i][v])
                    if mode == ADD_SCALED:
                        acc = mul_add(scale, acc, builder.load(where, align=itemsize))
                    builder.store(acc, where, align=itemsize)
            return context.get_dummy_value()

        return sig, codegen

    typer.__name__ = f"_block_{('bias', 'add', 'zero', 'bias_cols')[mode]}_{R}x{V * L}"
    return intrinsic(typer)


#: ``block(M, src, dst, r, t, b, h)``: rows ``r .. r+R-1``, samples ``t .. t+C-1``.
bias_4x16 = _block_intrinsic(4, 2, 8, BIAS)
bias_4x8 = _block_intrinsic(4, 1, 8, BIAS)
bias_4x1 = _block_intrinsic(4, 1, 1, BIAS)
bias_1x16 = _block_intrinsic(1, 2, 8, BIAS)
bias_1x8 = _block_intrinsic(1, 1, 8, BIAS)
bias_1x1 = _block_intrinsic(1, 1, 1, BIAS)
add_4x16 = _block_intrinsic(4, 2, 8, ADD_SCALED)
add_4x8 = _block_intrinsic(4, 1, 8, ADD_SCALED)
add_4x1 = _block_intrinsic(4, 1, 1, ADD_SCALED)
add_1x16 = _block_intrinsic(1, 2, 8, ADD_SCALED)
add_1x8 = _block_intrinsic(1, 1, 8, ADD_SCALED)
add_1x1 = _block_intrinsic(1, 1, 1, ADD_SCALED)
zero_8x8 = _block_intrinsic(8, 1, 8, ZERO)
zero_4x16 = _block_intrinsic(4, 2, 8, ZERO)
zero_4x8 = _block_intrinsic(4, 1, 8, ZERO)
zero_4x4 = _block_intrinsic(4, 1, 4, ZERO)
zero_4x1 = _block_intrinsic(4, 1, 1, ZERO)
zero_1x16 = _block_intrinsic(1, 2, 8, ZERO)
zero_1x8 = _block_intrinsic(1, 1, 8, ZERO)
zero_1x4 = _block_intrinsic(1, 1, 4, ZERO)
zero_1x1 = _block_intrinsic(1, 1, 1, ZERO)
#: Eight (or one) sample-major rows of width 8 (16) by all their features: ``M`` the
#: rows, ``src`` ``K^T`` (unit-stride rows), ``b`` a unit-stride row.
bias_cols_8x8 = _block_intrinsic(8, 1, 8, BIAS_COLS)
bias_cols_1x8 = _block_intrinsic(1, 1, 8, BIAS_COLS)
bias_cols_8x16 = _block_intrinsic(8, 2, 8, BIAS_COLS)
bias_cols_1x16 = _block_intrinsic(1, 2, 8, BIAS_COLS)
#: The adjoint update of eight sample-major rows of width 8 (16): ``M`` the rows of
#: ``g = sigma' * lambda``, ``src`` ``K`` itself, ``dst`` the rows of ``lambda``.
add_8x8 = _block_intrinsic(8, 1, 8, ADD_SCALED)
add_8x16 = _block_intrinsic(8, 2, 8, ADD_SCALED)



#: The flags of :func:`lane_sum_scaled`'s arithmetic: ``arcp`` (reciprocals may replace
#: divisions, of which there are none) changes nothing here, but Numba's fast-math pass
#: only adds its flags to instructions that have none, so with it the order written
#: stays the order computed in any caller, fast-math or not.
_KEEP_ORDER = ("arcp",)


@intrinsic
def lane_sum_scaled(typingctx, x, h):
    """``x <- h x`` on a unit-stride row of samples, and the sum of the scaled entries in
    eight lanes: entry ``t`` goes to lane ``t % 8``, each lane adds its entries (as
    stored in ``x``) in order, in float64, from ``0.0 * h``, and the lanes are added as
    ``((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7))``; returns a float64.

    The whole blocks of eight are one vector multiplication, store and addition each;
    the last ``len(x) % 8`` entries go to the first lanes one by one. Written out
    because LLVM does not make one vector of eight scalar chains, and a loop of them
    in a function without ``reassoc`` took twice the time of the reduction LLVM chose
    with it (``ptoc.kernels.cpu._lane_sum_scaled``). Its arithmetic carries the flag
    :data:`_KEEP_ORDER` only, so it may be inlined into fast-math kernels and still
    add in the order written."""
    if not (isinstance(x, types.Array) and x.ndim == 1
            and x.dtype in (types.float64, types.float32)
            and h in (types.float64, types.float32)):
        return None
    sig = types.float64(x, h)

    def codegen(context, builder, signature, args):
        x_, h_ = args

        def _fmul(a, b):
            return builder.fmul(a, b, flags=_KEEP_ORDER)

        def _fadd(a, b):
            return builder.fadd(a, b, flags=_KEEP_ORDER)

        arr = context.make_array(signature.args[0])(context, builder, x_)
        element = context.get_data_type(signature.args[0].dtype)
        double = ir.DoubleType()
        intp = context.get_value_type(types.intp)
        itemsize = context.get_abi_sizeof(element)
        vec = ir.VectorType(element, 8)
        dvec = ir.VectorType(double, 8)
        # h x in the wider of the two types, as Python's h * x[t], then stored in x's
        # type; the lanes add the stored value, in float64
        h_double = signature.args[1] == types.float64
        wide = h_double or element == double
        compute = double if wide else element
        h_c = h_ if (h_double or not wide) else builder.fpext(h_, double)

        def widen(v, ty):
            return v if element == double else builder.fpext(v, ty)

        def splat(value, ty):
            undef = ir.Constant(ty, ir.Undefined)
            one = builder.insert_element(undef, value, ir.Constant(ir.IntType(32), 0))
            mask = ir.Constant(ir.VectorType(ir.IntType(32), 8), [0] * 8)
            return builder.shuffle_vector(one, undef, mask)

        def scaled(v, vector):
            """``h v`` as stored in ``x``: ``v`` of ``x``'s type, a vector or a scalar."""
            cty = ir.VectorType(compute, 8) if vector else compute
            if compute != element:
                v = builder.fpext(v, cty)
            out = _fmul(v, splat(h_c, cty) if vector else h_c)
            if compute != element:
                out = builder.fptrunc(out, vec if vector else element)
            return out

        n = builder.extract_value(arr.shape, 0)
        n8 = builder.and_(n, ir.Constant(intp, -8))
        zero = _fmul(ir.Constant(double, 0.0),
                            h_ if h_double else builder.fpext(h_, double))
        acc = cgutils.alloca_once(builder, dvec)
        builder.store(splat(zero, dvec), acc)
        with cgutils.for_range_slice(builder, ir.Constant(intp, 0), n8,
                                     ir.Constant(intp, 8), intp=intp) as (t, _):
            ptr = builder.bitcast(builder.gep(arr.data, [t]), vec.as_pointer())
            v = scaled(builder.load(ptr, align=itemsize), True)
            builder.store(v, ptr, align=itemsize)
            builder.store(_fadd(builder.load(acc), widen(v, dvec)), acc)
        total = builder.load(acc)
        result = cgutils.alloca_once(builder, double)

        def tree(ls):
            return _fadd(_fadd(_fadd(ls[0], ls[1]), _fadd(ls[2], ls[3])),
                         _fadd(_fadd(ls[4], ls[5]), _fadd(ls[6], ls[7])))

        i32 = ir.IntType(32)
        with builder.if_else(builder.icmp_signed("<", n8, n)) as (remainder, whole):
            with remainder:  # the last n % 8 entries to lanes 0 .. 6, then the tree
                lanes = [cgutils.alloca_once_value(
                    builder, builder.extract_element(total, ir.Constant(i32, j)))
                    for j in range(8)]
                for j in range(7):
                    t = builder.add(n8, ir.Constant(intp, j))
                    with builder.if_then(builder.icmp_signed("<", t, n)):
                        ptr = builder.gep(arr.data, [t])
                        v = scaled(builder.load(ptr, align=itemsize), False)
                        builder.store(v, ptr, align=itemsize)
                        builder.store(_fadd(builder.load(lanes[j]), widen(v, double)),
                                      lanes[j])
                builder.store(tree([builder.load(lane) for lane in lanes]), result)
            with whole:  # the same tree on the vector: pairs, pairs of pairs, the two
                def halves(v, size):
                    ty = ir.VectorType(i32, size // 2)
                    even = builder.shuffle_vector(v, v, ir.Constant(ty, list(range(0, size, 2))))
                    odd = builder.shuffle_vector(v, v, ir.Constant(ty, list(range(1, size, 2))))
                    return _fadd(even, odd)
                pairs = halves(halves(total, 8), 4)
                builder.store(_fadd(builder.extract_element(pairs, ir.Constant(i32, 0)),
                                    builder.extract_element(pairs, ir.Constant(i32, 1))),
                              result)
        return builder.load(result)

    return sig, codegen


def _scale_and_bias_intrinsic(V: int):
    """The intrinsic ``f(x, h, pb)`` for the sample-major rows of one chunk at width
    ``d = 8 V``, flat in ``x`` (unit stride, ``m d`` entries): ``x <- h x`` and
    ``pb[i] = sum_t x[t d + i]`` (as stored), sample ``t`` in lane ``t % 8``, each lane
    adding its samples in order in float64 from ``0.0 * h``, and the lanes combined as
    ``((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7))``, then stored in ``pb``'s type.

    ``ptoc.kernels.cpu._scale_and_bias_rows`` with eight lanes computes the same, and so
    the same bits as the tiles' :func:`lane_sum_scaled` feature by feature. Here the
    eight lanes of a feature are ``8 V`` vectors held in registers over the chunk (one
    per sample of a block of eight and vector of features), the last ``m % 8`` samples
    go to the first lanes, and the tree is ``7 V`` vector additions. The products
    ``h x`` are formed as Python forms them (in the wider of the two types, stored in
    ``x``'s); every operation carries the flags :data:`_KEEP_ORDER` only, so the function
    may be inlined into fast-math kernels: as a function of its own, compiled without
    fast-math flags, the loop cost a call and kept its lanes in memory, about 60 ns per
    layer at d = 8, S = 16, as much as the weight partial's products."""

    def typer(typingctx, x, h, pb):
        if not (isinstance(x, types.Array) and x.ndim == 1
                and x.dtype in (types.float64, types.float32)
                and h in (types.float64, types.float32)
                and isinstance(pb, types.Array) and pb.ndim == 1 and pb.dtype == x.dtype):
            return None
        sig = types.void(x, h, pb)

        def codegen(context, builder, signature, args):
            x_, h_, pb_ = args
            arr = context.make_array(signature.args[0])(context, builder, x_)
            arr_b = context.make_array(signature.args[2])(context, builder, pb_)
            element = context.get_data_type(signature.args[0].dtype)
            double = ir.DoubleType()
            intp = context.get_value_type(types.intp)
            i32 = ir.IntType(32)
            itemsize = context.get_abi_sizeof(element)
            vec = ir.VectorType(element, 8)
            dvec = ir.VectorType(double, 8)
            h_double = signature.args[1] == types.float64
            wide = h_double or element == double
            compute = ir.VectorType(double if wide else element, 8)
            h_c = h_ if (h_double or not wide) else builder.fpext(h_, double)

            def splat(value, ty):
                undef = ir.Constant(ty, ir.Undefined)
                one = builder.insert_element(undef, value, ir.Constant(i32, 0))
                return builder.shuffle_vector(one, undef,
                                              ir.Constant(ir.VectorType(i32, 8), [0] * 8))

            def const(i):
                return ir.Constant(intp, i)

            h_vec = splat(h_c, compute)
            zero = builder.fmul(ir.Constant(double, 0.0),
                                h_ if h_double else builder.fpext(h_, double), flags=_KEEP_ORDER)
            accs = [[cgutils.alloca_once_value(builder, splat(zero, dvec)) for _ in range(V)]
                    for _ in range(8)]

            def add_row(at, lane):
                """Scale the ``V`` vectors of the sample row at entry ``at`` and add them to
                the accumulators of ``lane``."""
                for v in range(V):
                    ptr = builder.bitcast(builder.gep(arr.data, [builder.add(at, const(8 * v))]),
                                          vec.as_pointer())
                    value = builder.load(ptr, align=itemsize)
                    if compute != vec:
                        value = builder.fpext(value, compute)
                    value = builder.fmul(value, h_vec, flags=_KEEP_ORDER)
                    if compute != vec:
                        value = builder.fptrunc(value, vec)
                    builder.store(value, ptr, align=itemsize)
                    if vec != dvec:
                        value = builder.fpext(value, dvec)
                    builder.store(builder.fadd(builder.load(accs[lane][v]), value,
                                               flags=_KEEP_ORDER), accs[lane][v])

            n = builder.extract_value(arr.shape, 0)
            block = 64 * V  # eight samples of 8 V entries
            whole = builder.mul(builder.udiv(n, const(block)), const(block))
            with cgutils.for_range_slice(builder, const(0), whole, const(block),
                                         intp=intp) as (t, _):
                for lane in range(8):
                    add_row(builder.add(t, const(8 * V * lane)), lane)
            for lane in range(7):  # the last m % 8 samples, to lanes 0 .. 6
                at = builder.add(whole, const(8 * V * lane))
                with builder.if_then(builder.icmp_signed("<", at, n)):
                    add_row(at, lane)
            for v in range(V):
                ls = [builder.load(accs[lane][v]) for lane in range(8)]

                def add(a, b):
                    return builder.fadd(a, b, flags=_KEEP_ORDER)

                total = add(add(add(ls[0], ls[1]), add(ls[2], ls[3])),
                            add(add(ls[4], ls[5]), add(ls[6], ls[7])))
                if vec != dvec:
                    total = builder.fptrunc(total, vec)
                ptr = builder.bitcast(builder.gep(arr_b.data, [const(8 * v)]), vec.as_pointer())
                builder.store(total, ptr, align=itemsize)
            return context.get_dummy_value()

        return sig, codegen

    typer.__name__ = f"_scale_and_bias_{8 * V}"
    return intrinsic(typer)


#: ``f(x, h, pb)``: one chunk's rows of width 8 (or 16), flat.
scale_and_bias_8 = _scale_and_bias_intrinsic(1)
scale_and_bias_16 = _scale_and_bias_intrinsic(2)
