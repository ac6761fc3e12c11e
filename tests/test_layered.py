"""Tests of ptoc.layered: dense networks whose widths change, with batch normalisation.

The network is a ptoc Model (Li & Hao's control system ``x_{n+1} = f_n(x_n, theta_n)``
with the whole batch as the state): its exact adjoint is checked against central
finite differences and the dot-product identity, and the serial sweeps, the training
loop's methods and the methods of successive approximations train it.
"""

import numpy as np
import pytest

import ptoc
from ptoc.layered import BatchStatistics, LayeredNetwork
from ptoc.methods import GradientMethod
from ptoc.optim import Adam
from ptoc.parallel import parallel_gradient

WIDTHS = (5, 7, 4, 3)


def _problem(seed=0, **kwargs):
    net = LayeredNetwork(WIDTHS, **kwargs)
    params = net.init_params(seed, bn="truncated_normal")
    rng = np.random.default_rng(seed + 1)
    X = rng.standard_normal((8, WIDTHS[0]))
    y = rng.integers(0, WIDTHS[-1], 8)
    return net, params, X, y


def _loss(net, params, X, y):
    return parallel_gradient(net, params, X, y, ptoc.Serial(), keep_states=False).loss


@pytest.mark.parametrize("kwargs", [{}, {"activation": "tanh"}, {"batch_norm": False},
                                    {"last_activation": True}])
def test_the_propagator_passes_the_checker(kwargs):
    """Dot-product identity, layer gradients and the whole chain against finite
    differences, range methods and level steps (ptoc.check_propagator)."""
    net, params, X, y = _problem(**kwargs)
    report = ptoc.check_propagator(net.propagator(params, y), net.opening(params, X)[0])
    assert report.passed, str(report)


def test_the_batch_norm_adjoint_equals_central_differences_entry_by_entry():
    """Every entry of dJ/dgamma and dJ/dbeta, and sampled entries of dJ/dW of every
    layer, against central differences of J: the batch statistics couple the samples,
    and the adjoint must differentiate through them."""
    net, params, X, y = _problem(3)
    grads = parallel_gradient(net, params, X, y, ptoc.Serial()).grads
    rng = np.random.default_rng(0)
    h = 1e-6
    for key in ("gamma", "beta", "W"):
        mask = net.feature_mask() if key != "W" else net.weight_mask()
        entries = np.argwhere(mask)
        if key == "W":
            entries = entries[rng.choice(len(entries), 12, replace=False)]
        for idx in map(tuple, entries):
            plus = {k: v.copy() for k, v in params.items()}
            minus = {k: v.copy() for k, v in params.items()}
            plus[key][idx] += h
            minus[key][idx] -= h
            fd = (_loss(net, plus, X, y) - _loss(net, minus, X, y)) / (2 * h)
            assert abs(fd - grads[key][idx]) <= 1e-7 * max(1.0, abs(fd)), (key, idx)
    # the padding has no gradient
    assert not np.any(grads["W"][~net.weight_mask()])


def test_a_gradient_without_batch_statistics_would_differ():
    """The check above can fail: freezing the batch statistics (the evaluation-mode
    derivative) gives another gradient of gamma's layer."""
    net, params, X, y = _problem(3)
    grads = parallel_gradient(net, params, X, y, ptoc.Serial()).grads
    x = net.opening(params, X)[0]
    prop = net.propagator(params, y)
    states = [x]
    for n in range(net.n_layers):
        states.append(prop.step(n, states[-1]))
    stats = BatchStatistics(np.zeros((3, 7)), np.zeros((3, 7)))
    for n in range(net.n_layers):
        z = prop._product(n, states[n])
        stats.mean[n, :z.shape[1]], stats.var[n, :z.shape[1]] = z.mean(0), z.var(0)
    lam = prop.objective_gradient(states[-1])
    frozen = prop.zero_gradient()
    for n in range(net.n_layers - 1, -1, -1):
        i, o = prop._dims(n)
        a, zhat, s = prop._forward(n, states[n])
        g = lam[:, :o] * (net.activation.derivative(a) if prop._activated(n) else 1.0)
        dz = g * params["gamma"][n, :o] / s
        frozen[0][n, :o, :i] += dz.T @ states[n][:, :i]
        lam = np.zeros_like(lam)
        lam[:, :i] = dz @ params["W"][n, :o, :i]
    assert np.max(np.abs(frozen[0] - grads["W"])) > 1e-3


@pytest.mark.parametrize("comm", [None, 3])
def test_the_serial_solver_on_simulated_ranks_gives_the_same_gradient(comm):
    net, params, X, y = _problem()
    one = parallel_gradient(net, params, X, y, ptoc.Serial())
    split = parallel_gradient(net, params, X, y, ptoc.Serial(), comm=comm)
    assert split.loss == pytest.approx(one.loss, rel=1e-14)
    for k in net.layer_keys:
        np.testing.assert_allclose(split.grads[k], one.grads[k], rtol=0, atol=1e-14)


@pytest.mark.parametrize("solver", [ptoc.MGRIT(coarsening=2), ptoc.Parareal(chunks=2)])
def test_layer_parallel_solvers_refuse_with_a_clear_error(solver):
    net, params, X, y = _problem()
    with pytest.raises(NotImplementedError, match="widths change"):
        parallel_gradient(net, params, X, y, solver)


def test_evaluation_mode_with_one_batch_statistics_is_training_mode():
    net, params, X, y = _problem()
    stats = net.population_statistics(params, X, batch_size=len(X))
    np.testing.assert_allclose(net.scores(params, X, stats), net.scores(params, X),
                               rtol=1e-12, atol=1e-12)
    # on other statistics it differs, and it classifies one sample alone
    halves = net.population_statistics(params, X, batch_size=4)
    assert not np.allclose(net.scores(params, X, halves), net.scores(params, X))
    assert net.scores(params, X[:1], halves).shape == (1, 3)


def test_gradient_training_and_msa_train_the_network():
    """Adam (the float baseline of the claim) and Li & Hao's MSA through the contract."""
    from ptoc.msa import MSA

    net, params, X, y = _problem()
    first = _loss(net, params, X, y)

    def grad_fn(p, Xb, yb):
        r = parallel_gradient(net, p, Xb, yb, ptoc.Serial(), keep_states=False)
        return r.loss, r.grads

    for method in (GradientMethod(Adam(lr=0.05), grad_fn=grad_fn), MSA(inner_steps=3, lr=0.5)):
        p, state = params, method.init(net, params)
        for _ in range(15):
            outcome = method.step(net, p, state, X, y)
            p, state = outcome.params, outcome.state
        assert _loss(net, p, X, y) < 0.5 * first
        assert not np.any(p["W"][~net.weight_mask()])


@pytest.mark.parametrize("kind", ["ternary", "binary"])
def test_li_hao_discrete_weights_train_the_network(kind):
    """Every weight matrix (input and output layers included) in {-1, 0, 1} (or
    {-1, 1}) without scale, the padding kept at 0; batch normalisation by Adam."""
    from ptoc.msa import DiscreteMSA

    net, params, X, y = _problem()
    m = DiscreteMSA.li_hao(steps_per_epoch=5, kind=kind, optimizer=Adam(lr=0.05), beta=0.9)
    state = m.init(net, params)
    p = m.discrete_params(net, params, state)
    first = _loss(net, p, X, y)
    for _ in range(30):
        outcome = m.step(net, p, state, X, y)
        p, state = outcome.params, outcome.state
    mask = net.weight_mask()
    allowed = [-1.0, 1.0] if kind == "binary" else [-1.0, 0.0, 1.0]
    assert np.all(np.isin(p["W"][mask], allowed)) and not np.any(p["W"][~mask])
    assert np.array_equal(p["W"], state.levels)
    # random binary weights of a 7-wide network are a poorer start than ternary ones
    assert _loss(net, p, X, y) < (0.5 if kind == "ternary" else 0.9) * first
    frac = m.metrics(net, p, state)["nonzero_fraction"]
    assert frac == np.count_nonzero(state.levels) / net.n_weights()
    restored = m.load_state(m.state_dict(state), net, p)
    assert np.array_equal(restored.levels, state.levels)


@pytest.mark.parametrize("args, kwargs, match", [
    ((5,), {}, "at least 2 entries"),
    ((5, 0, 3), {}, r"widths\[1\] must be an integer >= 1"),
    ((5, 1), {}, "number of classes"),
    ((5, 3), {"bn_eps": 0.0}, "bn_eps"),
    ((5, 3), {"activation": "sigmoid"}, "activation"),
])
def test_bad_networks_are_refused(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        LayeredNetwork(args, **kwargs)


def test_bad_parameters_and_inputs_are_refused():
    net, params, X, y = _problem()
    bad = dict(params, W=params["W"].copy())
    bad["W"][0, 6, 6] = 1.0  # layer 0 maps 5 features: column 6 is padding
    with pytest.raises(ValueError, match="padding"):
        net.check_params(bad)
    with pytest.raises(ValueError, match=r"params\['gamma'\] has shape"):
        net.check_params(dict(params, gamma=params["gamma"][:2]))
    with pytest.raises(ValueError, match="expected"):
        net.check_params({"W": params["W"]})
    with pytest.raises(ValueError, match="at least 2 samples"):
        net.check_inputs(X[:1], y[:1])
    with pytest.raises(ValueError, match=r"shape \(S, 5\)"):
        net.check_inputs(X[:, :4])
    with pytest.raises(ValueError, match="labels must be 8 integers in 0..2"):
        net.check_inputs(X, y + 3)
    with pytest.raises(ValueError, match="no labels"):
        net.layers(params).objective(net.opening(params, X)[0])
