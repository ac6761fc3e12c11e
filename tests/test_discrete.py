"""Closed-form discrete-weight maximisers (Li & Hao) against brute force."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ptoc.discrete import binary_maximiser, discrete_objective, ternary_maximiser

TERNARY = (-1.0, 0.0, 1.0)
BINARY = (-1.0, 1.0)


def brute_force(M, W, rho, lam, values):
    """Best value of each entry by trying every one; also the gap to the runner-up."""
    f = np.stack([discrete_objective(v, M, W, rho, lam) for v in values])
    order = np.sort(f, axis=0)
    return np.asarray(values)[np.argmax(f, axis=0)], f.max(axis=0), order[-1] - order[-2]


@given(shape=st.tuples(st.integers(1, 6), st.integers(1, 6)), seed=st.integers(0, 2**31),
       rho=st.floats(0, 10), lam=st.floats(0, 10), scale=st.sampled_from([1e-3, 1.0, 100.0]),
       discrete_w=st.booleans())
def test_maximisers_equal_brute_force(shape, seed, rho, lam, scale, discrete_w):
    rng = np.random.default_rng(seed)
    M = scale * rng.standard_normal(shape)
    W = rng.choice(TERNARY, shape) if discrete_w else rng.standard_normal(shape)
    for values, got in ((TERNARY, ternary_maximiser(M, W, rho, lam)),
                        (BINARY, binary_maximiser(M, W, rho))):
        assert set(np.unique(got)) <= set(values)
        best, fmax, gap = brute_force(M, W, rho, lam if values is TERNARY else 0.0, values)
        f_got = discrete_objective(got, M, W, rho, lam if values is TERNARY else 0.0)
        # the closed form attains the maximum (up to the rounding of f itself) ...
        tol = 1e-12 * (np.abs(M) + rho * (1 + np.abs(W)) ** 2 + lam + 1)
        assert np.all(f_got >= fmax - tol)
        # ... and is the brute-force argmax wherever the maximum is not a near-tie
        clear = gap > tol
        assert np.array_equal(got[clear], best[clear])


def test_ties_go_to_the_sparser_value_then_to_plus_one():
    # |M + 2 rho W| = lam + rho exactly: f(+-1) = f(0), the maximiser keeps the zero
    assert ternary_maximiser([1.5, -1.5], [0.0, 0.0], rho=0.5, lam=1.0).tolist() == [0.0, 0.0]
    assert binary_maximiser([0.0, 2.0], [0.0, -1.0], rho=1.0).tolist() == [1.0, 1.0]


def test_sparsity_grows_with_lambda():
    rng = np.random.default_rng(3)
    M, W = rng.standard_normal((40, 40)), rng.choice(TERNARY, (40, 40))
    nonzero = [np.count_nonzero(ternary_maximiser(M, W, 0.1, lam)) for lam in (0, 0.5, 1, 2)]
    assert nonzero[0] > nonzero[1] > nonzero[2] > nonzero[3]


def test_large_rho_keeps_the_current_weights():
    rng = np.random.default_rng(4)
    M, W = rng.standard_normal((10, 10)), rng.choice(TERNARY, (10, 10))
    assert np.array_equal(ternary_maximiser(M, W, rho=1e3, lam=0.1), W)
    Wb = rng.choice(BINARY, (10, 10))
    assert np.array_equal(binary_maximiser(M, Wb, rho=1e3), Wb)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"M": np.ones(3), "W": np.ones(2)}, "shape"),
    ({"M": [np.nan], "W": [0.0]}, "finite"),
    ({"M": [1.0], "W": [0.0], "rho": -1.0}, "rho"),
    ({"M": [1.0], "W": [0.0], "lam": np.inf}, "lam"),
])
def test_bad_input_is_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ternary_maximiser(**kwargs)


def test_per_layer_penalties_equal_one_call_per_layer():
    """rho and lam may be arrays broadcasting to M (one value per layer, as Li & Hao's
    rho_k): the same as calling the maximiser on each layer with its scalar."""
    rng = np.random.default_rng(5)
    M = rng.standard_normal((3, 4, 6))
    W = rng.choice(TERNARY, M.shape)
    rho = np.array([0.0, 0.3, 2.0]).reshape(3, 1, 1)
    lam = np.array([0.5, 0.0, 0.1]).reshape(3, 1, 1)
    got = ternary_maximiser(M, W, rho, lam)
    got_binary = binary_maximiser(M, np.sign(W) + (W == 0), rho)
    for n in range(3):
        assert np.array_equal(got[n], ternary_maximiser(M[n], W[n], rho[n, 0, 0], lam[n, 0, 0]))
        assert np.array_equal(got_binary[n],
                              binary_maximiser(M[n], np.sign(W[n]) + (W[n] == 0), rho[n, 0, 0]))


@pytest.mark.parametrize("rho, match", [(np.ones(5), "does not broadcast"),
                                        (np.array([[[0.1]], [[-0.1]]]), ">= 0")])
def test_bad_per_layer_penalties_are_refused(rho, match):
    M = np.zeros((2, 3, 4))
    with pytest.raises(ValueError, match=match):
        ternary_maximiser(M, M, rho)
