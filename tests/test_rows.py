"""MGRIT's compiled row operations (ptoc.kernels.rows) against the NumPy expressions
their docstrings state."""

import numba
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from ptoc.kernels import rows


def _problem(seed, n, S, d, k):
    rng = np.random.default_rng(seed)
    a, b = rng.standard_normal((n, S, d)), rng.standard_normal((n, S, d))
    ai = rng.choice(n, size=k, replace=False).astype(np.int64)
    bi = rng.choice(n, size=k, replace=False).astype(np.int64)
    return rng, a, b, ai, bi


@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 12), S=st.integers(1, 9),
       d=st.integers(1, 9), data=st.data())
def test_row_operations_equal_their_numpy_expressions(seed, n, S, d, data):
    k = data.draw(st.integers(1, n))
    rng, a, b, ai, bi = _problem(seed, n, S, d, k)
    v = rng.standard_normal((n, S, d))
    u = a.copy()
    rows.correct(u, ai, b, v, bi)
    want = a.copy()
    want[ai] = a[ai] + (b[bi] - v[bi])
    np.testing.assert_array_equal(u, want)
    dst = np.zeros_like(a)
    rows.copy_rows(dst, ai, b, bi)
    want = np.zeros_like(a)
    want[ai] = b[bi]
    np.testing.assert_array_equal(dst, want)


@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 12), S=st.integers(1, 40),
       d=st.integers(1, 20), data=st.data())
def test_sum_of_squared_differences_is_exact_to_rounding_and_thread_independent(
        seed, n, S, d, data):
    """Each row's sum split into vector lanes (every entry counted once: sizes not a
    multiple of the vector length included), rows in order: NumPy's value to rounding,
    the same bits on one and on all threads."""
    k = data.draw(st.integers(1, n))
    _, a, b, ai, bi = _problem(seed, n, S, d, k)
    want = float(np.sum((a[ai] - b[bi]) ** 2))
    values = []
    try:
        for threads in (1, numba.config.NUMBA_NUM_THREADS):
            numba.set_num_threads(threads)
            values.append(rows.sumsq_diff(a, ai, b, bi))
    finally:
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    assert values[0] == values[1]
    assert abs(values[0] - want) <= 1e-13 * want
    assert rows.sumsq_diff(a, ai[:0], b, bi[:0]) == 0.0


def test_row_operations_stay_strict_when_a_fast_math_kernel_compiles_them_first(tmp_path):
    """Numba compiles a function that sets no ``fastmath`` of its own with the flags of the
    compiled caller that first calls it, and keeps that code for later calls. The row
    operations say ``fastmath=False``: compiled first from a fast-math caller (in a fresh
    process, nothing cached), ``correct_row`` still computes ``dst + (a - b)`` as written,
    not ``(dst + a) - b``, and the sums of squares still add the rows in order."""
    import os
    import subprocess
    import sys

    script = """
import numpy as np, numba
from ptoc.kernels import rows

@numba.njit(fastmath=True)
def caller(dst, a, b, part):
    rows.correct_row(dst, a, b)
    return rows.sum_in_order(part)

rng = np.random.default_rng(0)
x, a, b = rng.standard_normal(4096), rng.standard_normal(4096), rng.standard_normal(4096)
part = rng.standard_normal(1000)
caller(x.copy(), a, b, part)
y = x.copy()
rows.correct_row(y, a, b)
assert np.array_equal(y, x + (a - b)), "correct_row reassociated"
assert not np.array_equal(x + (a - b), (x + a) - b)  # the data tell the two apart
total = 0.0
for p in part:
    total += p
assert rows.sum_in_order(part) == total, "sum_in_order reassociated"
print("strict")
"""
    env = dict(os.environ, PTOC_CACHE="0", NUMBA_CACHE_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and "strict" in out.stdout, out.stderr
