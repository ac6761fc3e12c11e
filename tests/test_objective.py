"""The one regulariser: its shares over any partition of the layers add up to R, its
gradient is the same bits whoever computes it (serial, a rank's range, one layer's
R_n), and it is the derivative of R (central finite differences)."""

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

import ptoc
from ptoc.objective import (
    add_regulariser_grad,
    head_regulariser,
    layer_regulariser,
    range_regulariser,
    regulariser,
)


def _network(depth, width, seed, gammas):
    net = ptoc.ResNet(width=width, depth=depth, n_in=2, n_classes=3, gamma=gammas[0],
                      gamma_t=gammas[1], gamma_c=gammas[2])
    params = net.init_params(seed)
    rng = np.random.default_rng(seed)
    params.b[...] = rng.standard_normal(params.b.shape)
    return net, params


def _zero_grads(params):
    return ptoc.Params(**{k: (None if params.get(k) is None else np.zeros_like(params[k]))
                          for k in ("K", "b", "K_in", "b_in", "W", "mu")})


gammas = st.tuples(*(st.sampled_from([0.0, 1e-3, 0.7]) for _ in range(3)))


@given(depth=st.integers(1, 12), width=st.integers(1, 4), seed=st.integers(0, 10_000),
       gammas=gammas, data=st.data())
def test_range_shares_partition_the_regulariser(depth, width, seed, gammas, data):
    net, params = _network(depth, width, seed, gammas)
    cuts = sorted(data.draw(st.sets(st.integers(1, depth - 1), max_size=depth - 1))
                  if depth > 1 else set())
    bounds = [0, *cuts, depth]
    total = 0.0
    gK, gb = [], []
    for a, e in zip(bounds, bounds[1:], strict=False):
        left = (params.K[a - 1], params.b[a - 1]) if a > 0 else None
        right = (params.K[e], params.b[e]) if e < depth else None
        value, (rK, rb) = range_regulariser(net, [params.K[a:e], params.b[a:e]], left, right)
        total += value
        gK.append(rK)
        gb.append(rb)
    grads = _zero_grads(params)
    add_regulariser_grad(net, params, grads)
    # the gradient: the same bits, however the layers are split
    assert np.array_equal(np.concatenate(gK), grads.K)
    assert np.array_equal(np.concatenate(gb), grads.b)
    # and so is one layer's R_n gradient at theta_n
    n = data.draw(st.integers(0, depth - 1))
    _, lK, lb = layer_regulariser(net, params, n, params.K[n], params.b[n])
    assert np.array_equal(lK, grads.K[n]) and np.array_equal(lb, grads.b[n])
    # the value: the shares add up to R's layer part (summed in another order), and R is
    # that part plus the head's
    layer_part, _ = range_regulariser(net, [params.K, params.b], want_grad=False)
    np.testing.assert_allclose(total, layer_part, rtol=1e-13, atol=1e-300)
    assert regulariser(net, params) == layer_part + head_regulariser(net, params)


@given(depth=st.integers(1, 6), seed=st.integers(0, 1000), gammas=gammas)
def test_regulariser_gradient_is_its_derivative(depth, seed, gammas):
    net, params = _network(depth, 3, seed, gammas)
    grads = _zero_grads(params)
    add_regulariser_grad(net, params, grads)
    rng = np.random.default_rng(seed + 1)
    for key in params:
        v = rng.standard_normal(params[key].shape)
        saved = params[key].copy()
        eps = 1e-6

        def R(t, key=key, v=v, saved=saved):
            params[key][...] = saved + t * v
            try:
                return regulariser(net, params)
            finally:
                params[key][...] = saved

        fd = (R(eps) - R(-eps)) / (2 * eps)  # exact for a quadratic, up to round-off
        predicted = float(np.vdot(grads[key], v))
        assert abs(fd - predicted) <= 1e-6 * max(1.0, abs(fd)), key


def test_layer_regulariser_holds_the_terms_of_one_layer():
    """R_n(theta) - R_n(theta_n) = R(theta_n -> theta) - R: R_n holds every term of R
    that involves layer n (both neighbour pairs), the neighbours fixed."""
    net, params = _network(5, 3, 0, (0.3, 0.5, 0.2))
    rng = np.random.default_rng(0)
    for n in range(5):
        K, b = rng.standard_normal((3, 3)), rng.standard_normal(3)
        before = regulariser(net, params)
        r0 = layer_regulariser(net, params, n, params.K[n], params.b[n])[0]
        r1 = layer_regulariser(net, params, n, K, b)[0]
        moved = ptoc.Params(**{k: (None if params.get(k) is None else params[k].copy())
                               for k in ("K", "b", "K_in", "b_in", "W", "mu")})
        moved.K[n], moved.b[n] = K, b
        np.testing.assert_allclose(r1 - r0, regulariser(net, moved) - before, rtol=1e-12)
