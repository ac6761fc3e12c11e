"""The loss gradient against the truth: finite differences, backpropagation, the
dot-product identity, and the Hamiltonian (docs/theory/adjoint.md,
docs/theory/maximum_principle.md)."""

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import ptoc
from ptoc.propagator import ResNetPropagator
from ptoc.testing import tape_loss_and_grad

ACTS = ["tanh", "relu", "smoothrelu"]


def problem(act="tanh", width=5, depth=6, n_in=3, n_classes=4, S=17, seed=0, T=1.3,
            opening="dense", gammas=(1e-2, 3e-2, 2e-2), dtype=np.float64):
    rng = np.random.default_rng(seed)
    net = ptoc.ResNet(width=width, depth=depth, T=T, activation=act, n_in=n_in,
                      n_classes=n_classes, opening=opening, gamma=gammas[0],
                      gamma_t=gammas[1], gamma_c=gammas[2], dtype=dtype)
    params = net.init_params(rng, scale=1.5)
    # nonzero biases keep pre-activations off the kinks of ReLU/SmoothReLU, where
    # central differences and the (sub)gradient legitimately differ
    params.b[...] = rng.standard_normal(params.b.shape) * 0.7
    params.mu[...] = rng.standard_normal(params.mu.shape)
    if params.b_in is not None:
        params.b_in[...] = rng.standard_normal(params.b_in.shape)
    X = rng.standard_normal((S, n_in))
    y = rng.integers(0, n_classes, S)
    return net, params, X, y


def fd_entry(net, params, X, y, key, idx, eps=1e-6):
    p_plus, p_minus = params.copy(), params.copy()
    p_plus[key][idx] += eps
    p_minus[key][idx] -= eps
    return (ptoc.loss(net, p_plus, X, y) - ptoc.loss(net, p_minus, X, y)) / (2 * eps)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("key", ["K", "b", "K_in", "b_in", "W", "mu"])
def test_gradient_equals_central_differences(act, key):
    net, params, X, y = problem(act)
    _, grads = ptoc.loss_and_grad(net, params, X, y)
    rng = np.random.default_rng(1)
    shape = params[key].shape
    entries = {tuple(int(rng.integers(0, s)) for s in shape) for _ in range(6)}
    entries |= {tuple(0 for _ in shape), tuple(s - 1 for s in shape)}
    for idx in entries:
        fd = fd_entry(net, params, X, y, key, idx)
        g = grads[key][idx]
        assert abs(g - fd) <= 1e-6 * max(abs(fd), 1e-3), (key, idx, g, fd)


@pytest.mark.parametrize("act", ACTS)
def test_identity_opening_gradient(act):
    net, params, X, y = problem(act, width=4, n_in=4, opening="identity")
    assert "K_in" not in params
    _, grads = ptoc.loss_and_grad(net, params, X, y)
    assert set(grads) == {"K", "b", "W", "mu"}
    for key, idx in [("K", (2, 1, 3)), ("b", (5, 0)), ("W", (1, 2))]:
        fd = fd_entry(net, params, X, y, key, idx)
        assert abs(grads[key][idx] - fd) <= 1e-6 * max(abs(fd), 1e-3)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("target", ["numpy", "cpu"])
def test_adjoint_equals_backpropagation_to_round_off(act, target):
    """The discrete adjoint is reverse-mode differentiation of the forward code."""
    net, params, X, y = problem(act, depth=9)
    loss, grads = ptoc.loss_and_grad(net, params, X, y, target=target)
    loss_bp, grads_bp = tape_loss_and_grad(net, params, X, y)
    assert abs(loss - loss_bp) <= 1e-14 * abs(loss_bp)
    for key in grads:
        scale = np.max(np.abs(grads_bp[key]))
        assert np.max(np.abs(grads[key] - grads_bp[key])) <= 1e-13 * scale, key


@pytest.mark.parametrize("act", ACTS)
def test_dot_product_identity_of_tangent_and_adjoint(act):
    """<lambda_N, dx_N> = <lambda_0, dx_0> + sum_n <dJ/dtheta_n, dtheta_n> for the
    linearised forward sweep (tangent) and the adjoint sweep, over the whole network."""
    net, params, X, _ = problem(act, depth=12, S=9)
    rng = np.random.default_rng(2)
    prop = ResNetPropagator(net, params)
    x0 = prop.initial_state(X)
    states = np.empty((net.depth + 1,) + x0.shape)
    prop.propagate(x0, states=states)
    dx = rng.standard_normal(x0.shape)
    dK = rng.standard_normal(params.K.shape)
    db = rng.standard_normal(params.b.shape)
    dx0 = dx.copy()
    for n in range(net.depth):
        dx = prop.tangent_step(n, states[n], dx, dK[n], db[n])
    lam_N = rng.standard_normal(x0.shape)
    grad = prop.zero_gradient()
    lam0 = prop.adjoint_propagate(states, lam_N, grad=grad)
    lhs = np.vdot(lam_N, dx)
    rhs = np.vdot(lam0, dx0) + np.vdot(grad[0], dK) + np.vdot(grad[1], db)
    assert abs(lhs - rhs) <= 1e-10 * abs(lhs)


def _crosses_a_kink(net, params, X, v, eps) -> bool:
    """Whether a pre-activation ``K_n x_n + b_n`` of a relu network changes sign between
    the parameters moved by ``-eps v`` and by ``+eps v``: central differences then
    straddle a kink, where the loss has one-sided derivatives along ``v`` but none."""
    signs = []
    for t in (-eps, 0.0, eps):
        p = params.unravel(params.ravel() + t * v.ravel())
        xs = ptoc.forward(net, p, X).states
        signs.append(np.einsum("nsd,ned->nse", xs[:-1], p.K) + p.b[:, None, :] > 0)
    return not (np.array_equal(signs[0], signs[1]) and np.array_equal(signs[1], signs[2]))


@given(width=st.integers(1, 9), depth=st.integers(1, 12), S=st.integers(1, 40),
       T=st.floats(0.1, 5.0), act=st.sampled_from(ACTS), seed=st.integers(0, 2**20))
def test_gradient_property_random_networks(width, depth, S, T, act, seed):
    """Directional derivative along a random direction = <grad, direction>, wherever the
    loss has one along the segment the central difference spans (for relu: no
    pre-activation changes sign on it; random exploration drew one 2e-6 from zero, where
    the forward difference matched the gradient and the backward one did not)."""
    net, params, X, y = problem(act, width=width, depth=depth, S=S, T=T, seed=seed, n_in=2,
                                n_classes=3)
    _, grads = ptoc.loss_and_grad(net, params, X, y)
    rng = np.random.default_rng(seed + 1)
    v = params.unravel(rng.standard_normal(params.ravel().size))
    eps = 1e-6
    assume(act != "relu" or not _crosses_a_kink(net, params, X, v, eps))

    def J(t):
        return ptoc.loss(net, params.unravel(params.ravel() + t * v.ravel()), X, y)

    fd = (J(eps) - J(-eps)) / (2 * eps)
    predicted = float(np.vdot(grads.ravel(), v.ravel()))
    assert abs(fd - predicted) <= 1e-6 * max(abs(fd), 1e-2)


@given(depth=st.integers(1, 20), c=st.integers(1, 25), S=st.integers(1, 30),
       seed=st.integers(0, 1000))
def test_checkpointing_gives_the_same_gradient_bitwise(depth, c, S, seed):
    net, params, X, y = problem("tanh", depth=depth, S=S, seed=seed)
    loss, grads = ptoc.loss_and_grad(net, params, X, y)
    loss_c, grads_c = ptoc.loss_and_grad(net, params, X, y, checkpoint_every=c)
    assert loss == loss_c
    for k in grads:
        assert np.array_equal(grads[k], grads_c[k]), k


def test_checkpointed_forward_keeps_the_marked_states():
    net, params, X, _ = problem("tanh", depth=10)
    full = ptoc.forward(net, params, X)
    ck = ptoc.forward(net, params, X, checkpoint_every=4)
    assert ck.states.shape[0] == 4  # x_0, x_4, x_8, x_10
    for k, n in enumerate([0, 4, 8, 10]):
        assert np.array_equal(ck.states[k], full.states[n])


@pytest.mark.parametrize("target", ["numpy", "cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_targets_agree_on_loss_and_gradient(target):
    net, params, X, y = problem("smoothrelu", depth=3 if target == "cuda" else 8,
                                S=6 if target == "cuda" else 40)
    loss_ref, g_ref = ptoc.loss_and_grad(net, params, X, y, target="numpy")
    loss, g = ptoc.loss_and_grad(net, params, X, y, target=target)
    assert abs(loss - loss_ref) <= 1e-12 * abs(loss_ref)
    for k in g:
        assert np.max(np.abs(g[k] - g_ref[k])) <= 1e-12 * np.max(np.abs(g_ref[k])), k


def test_float32_gradient():
    net, params, X, y = problem("tanh", dtype=np.float32)
    loss, grads = ptoc.loss_and_grad(net, params, X, y)
    assert grads.K.dtype == np.float32
    net64 = ptoc.ResNet(**{f: getattr(net, f) for f in ("width", "depth", "T", "activation",
                                                         "n_in", "n_classes", "gamma",
                                                         "gamma_t", "gamma_c")})
    loss64, grads64 = ptoc.loss_and_grad(net64, params.to_dict(), X, y)
    assert abs(loss - loss64) < 1e-5 * abs(loss64)
    assert np.max(np.abs(grads["K"] - grads64["K"])) < 1e-4 * np.max(np.abs(grads64["K"]))


# --- the Hamiltonian of the maximum principle --------------------------------------------------

@pytest.mark.parametrize("act", ACTS)
def test_hamiltonian_gradient_is_minus_the_loss_gradient_per_layer(act):
    """grad_theta sum_s H_n(x_n, p_{n+1}, theta_n) = -dJ/dtheta_n, regulariser included."""
    net, params, X, y = problem(act, depth=7)
    _, grads = ptoc.loss_and_grad(net, params, X, y)
    fwd = ptoc.forward(net, params, X)
    _, lam_N, _, _ = ptoc.objective.classifier_loss(params, fwd.final_state, y)
    adj = ptoc.adjoint(net, params, fwd, lam_N, keep_adjoints=True)
    for n in range(net.depth):
        hK, hb = ptoc.hamiltonian_grad(net, params, n, fwd.states[n], -adj.adjoints[n + 1])
        np.testing.assert_allclose(hK, -grads.K[n], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(hb, -grads.b[n], rtol=1e-12, atol=1e-14)


def test_pmp_state_and_costate_equations():
    """x_{n+1} = grad_p H_n and p_n = grad_x H_n: the discrete maximum principle
    (docs/theory/maximum_principle.md)."""
    net, params, X, y = problem("tanh", depth=5)
    fwd = ptoc.forward(net, params, X)
    _, lam_N, _, _ = ptoc.objective.classifier_loss(params, fwd.final_state, y)
    adj = ptoc.adjoint(net, params, fwd, lam_N, keep_adjoints=True)
    prop = ResNetPropagator(net, params)
    n = 2
    x, p_next = fwd.states[n], -adj.adjoints[n + 1]
    # H is linear in p: grad_p H = Phi_n(x)
    rng = np.random.default_rng(0)
    q = rng.standard_normal(x.shape)
    Hq = ptoc.hamiltonian(net, params, n, x, q) - ptoc.hamiltonian(net, params, n, x, 0 * q)
    assert abs(Hq - np.vdot(q, fwd.states[n + 1])) < 1e-12 * abs(Hq)
    # grad_x H by central differences along a direction equals <p_n, dx>
    dx = rng.standard_normal(x.shape)
    eps = 1e-6
    fd = (ptoc.hamiltonian(net, params, n, x + eps * dx, p_next)
          - ptoc.hamiltonian(net, params, n, x - eps * dx, p_next)) / (2 * eps)
    assert abs(fd - np.vdot(-adj.adjoints[n], dx)) < 1e-7 * abs(fd)
    assert np.array_equal(prop.step(n, x), fwd.states[n + 1])


def test_hamiltonian_value_includes_the_layer_regulariser():
    net, params, X, _ = problem("tanh", depth=4)
    x = np.random.default_rng(0).standard_normal((5, net.width))
    zero = np.zeros_like(x)
    value = ptoc.hamiltonian(net, params, 1, x, zero)
    r, _, _ = ptoc.objective.layer_regulariser(net, params, 1, params.K[1], params.b[1])
    assert value == pytest.approx(-r, rel=1e-14)
    assert r > 0


# --- model facts -------------------------------------------------------------------------------

def test_peaks_initial_loss_is_ln5_at_near_zero_weights():
    data = ptoc.data.peaks()
    net = ptoc.ResNet(width=8, depth=32, n_in=2, n_classes=5)
    params = net.init_params(seed=0, scale=1e-8)
    loss = ptoc.loss(net, params, data.X_train, data.y_train)
    assert abs(loss - np.log(5)) < 1e-6
    exact = ptoc.loss(net, net.zero_params(), data.X_train, data.y_train)
    assert abs(exact - np.log(5)) < 1e-15


def test_params_round_trip_through_a_plain_dict():
    net, params, X, y = problem("tanh")
    d = params.to_dict()
    assert type(d) is dict and set(d) == set(ptoc.PARAM_KEYS)
    back = ptoc.Params.from_dict(d)
    assert back == params
    loss_p, g_p = ptoc.loss_and_grad(net, params, X, y)
    loss_d, g_d = ptoc.loss_and_grad(net, d, X, y)
    assert isinstance(g_p, ptoc.Params) and type(g_d) is dict
    assert loss_p == loss_d and all(np.array_equal(g_p[k], g_d[k]) for k in d)
    assert params.unravel(params.ravel()) == params


def test_predict_and_accuracy():
    net, params, X, y = problem("tanh")
    z = ptoc.predict_logits(net, params, X)
    assert z.shape == (X.shape[0], net.n_classes)
    pred = ptoc.predict(net, params, X)
    assert np.array_equal(pred, np.argmax(z, axis=1))
    assert ptoc.accuracy(net, params, X, pred) == 1.0


# --- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("mutate, match", [
    (lambda X, y, p: (X[:, :2], y, p), "network expects n_in=3"),
    (lambda X, y, p: (X[:0], y[:0], p), "batch is empty"),
    (lambda X, y, p: (np.where(X > 1, np.nan, X), y, p), "X contains non-finite"),
    (lambda X, y, p: (X, y + 10, p), "out of range"),
    (lambda X, y, p: (X, -y - 1, p), "out of range"),
    (lambda X, y, p: (X, y[:-1], p), "labels has 16 entries but X has 17"),
    (lambda X, y, p: (X, y + 0.5, p), "integer class indices"),
    (lambda X, y, p: (X, y.reshape(-1, 1), p), "1-D array"),
    (lambda X, y, p: (X, y, {**p.to_dict(), "K": p.K[:-1]}), r"params\['K'\] has shape"),
    (lambda X, y, p: (X, y, {**p.to_dict(), "W": np.full_like(p.W, np.inf)}),
     r"params\['W'\] contains non-finite"),
    (lambda X, y, p: (X, y, {k: v for k, v in p.items() if k != "mu"}), "missing"),
    (lambda X, y, p: (X, y, {**p.to_dict(), "extra": p.mu}), "unexpected keys"),
])
def test_bad_input_gives_a_clear_error(mutate, match):
    net, params, X, y = problem("tanh")
    X, y, p = mutate(X, y, params)
    with pytest.raises(ValueError, match=match):
        ptoc.loss_and_grad(net, p, X, y)


@pytest.mark.parametrize("kwargs, match", [
    ({"activation": "swish"}, "unknown activation"),
    ({"width": 0}, "width must be a positive integer"),
    ({"depth": 2.5}, "depth must be a positive integer"),
    ({"T": -1.0}, r"T must lie in \[6.661e-16, 4.504e\+15\] for depth=3 in float64"),
    ({"n_classes": 1}, "n_classes must be >= 2"),
    ({"opening": "identity"}, "identity opening layer needs n_in == width"),
    ({"gamma": float("nan")}, "gamma must be finite"),
    ({"dtype": np.int32}, "dtype must be float64 or float32"),
])
def test_bad_network_gives_a_clear_error(kwargs, match):
    args = {"width": 4, "depth": 3, "n_in": 2, "n_classes": 3} | kwargs
    with pytest.raises(ValueError, match=match):
        ptoc.ResNet(**args)


def test_bad_solver_options():
    net, params, X, y = problem("tanh")
    with pytest.raises(ValueError, match="checkpoint_every must be a positive integer"):
        ptoc.loss_and_grad(net, params, X, y, checkpoint_every=0)
    with pytest.raises(ValueError, match="unknown target"):
        ptoc.loss_and_grad(net, params, X, y, target="gpu")


def test_reused_buffers_never_alias_returned_results():
    """loss_and_grad/loss/predict reuse internal buffers; what they return must not."""
    net, params, X, y = problem("tanh", depth=5)
    fwd = ptoc.forward(net, params, X)
    states = fwd.states.copy()
    loss1, g1 = ptoc.loss_and_grad(net, params, X, y)
    g1_copy = g1.copy()
    X2 = X + 1.0
    loss2, g2 = ptoc.loss_and_grad(net, params, X2, y)
    ptoc.predict(net, params, X2)
    ptoc.loss(net, params, X2, y)
    assert np.array_equal(fwd.states, states)
    assert g1 == g1_copy and loss1 != loss2
    assert ptoc.loss_and_grad(net, params, X, y)[0] == loss1
    ptoc.sweeps.release_workspace()
    assert ptoc.loss_and_grad(net, params, X, y)[1] == g1_copy
