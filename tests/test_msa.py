"""MSA, E-MSA and discrete-weight training (Li & Hao 2018; Li, Chen, Tai & E 2018)."""

import io

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import ptoc
from ptoc.hamiltonian import hamiltonian
from ptoc.methods import TrainingDivergedError
from ptoc.msa import (
    EMSA,
    MSA,
    DiscreteMSA,
    InnerSolver,
    RhoSchedule,
    WeightSet,
    _problem,
    extended_hamiltonian,
    make_msa_method,
)
from ptoc.optim import SGD, Adam
from ptoc.sweeps import adjoint, forward, loss, loss_and_grad


@pytest.fixture(scope="module")
def peaks():
    return ptoc.data.peaks(n_per_class=40, n_val_per_class=4, grid=64)


def _net(**kw):
    options = dict(width=8, depth=8, T=2.0, n_in=2, n_classes=5, activation="tanh")
    options.update(kw)
    return ptoc.ResNet(**options)


def _run(net, method, X, y, steps, batch=None, seed=0, params=None, state=None):
    """``steps`` method steps (full batch, or random batches of ``batch``); the losses
    before each step, the final parameters and state."""
    p = net.init_params(0) if params is None else params
    s = method.init(net, p) if state is None else state
    rng = np.random.default_rng(seed)
    losses = []
    for _ in range(steps):
        if batch is None:
            Xb, yb = X, y
        else:
            idx = rng.choice(len(y), batch, replace=False)
            Xb, yb = X[idx], y[idx]
        out = method.step(net, p, s, Xb, yb)
        p, s = out.params, out.state
        losses.append(out.loss)
    return losses, p, s


def _sweep_data(net, p, X, y):
    fwd = forward(net, p, X)
    _, lam_N, _, _ = ptoc.objective.classifier_loss(p, fwd.final_state, y)
    adj = adjoint(net, p, fwd, lam_N, keep_adjoints=True)
    return fwd.states, -adj.adjoints


# --- the per-layer objective -----------------------------------------------------------------

@pytest.mark.parametrize("activation", list(ptoc.Activation))
def test_second_derivative_matches_finite_differences(activation):
    from ptoc.activations import dsigma, second_derivative

    a = np.linspace(-2, 2, 81) + 0.0123  # no point within 1e-6 of a kink
    eps = 1e-6
    fd = (dsigma(a + eps, activation) - dsigma(a - eps, activation)) / (2 * eps)
    np.testing.assert_allclose(second_derivative(a, activation), fd, atol=1e-8)
    assert np.isnan(second_derivative(np.array([np.nan]), activation)[0])


def _finite_differences(f, K, b, eps=1e-6):
    gK, gb = np.zeros_like(K), np.zeros_like(b)
    for idx in np.ndindex(K.shape):
        Kp, Km = K.copy(), K.copy()
        Kp[idx] += eps
        Km[idx] -= eps
        gK[idx] = (f(Kp, b) - f(Km, b)) / (2 * eps)
    for i in range(b.size):
        bp, bm = b.copy(), b.copy()
        bp[i] += eps
        bm[i] -= eps
        gb[i] = (f(K, bp) - f(K, bm)) / (2 * eps)
    return gK, gb


def _check_fd(activation, seed, S, d, rho, gamma, gamma_t, n):
    rng = np.random.default_rng(seed)
    net = ptoc.ResNet(width=d, depth=3, n_in=2, n_classes=3, activation=activation,
                      gamma=gamma, gamma_t=gamma_t)
    p = net.init_params(seed)
    # arbitrary states and co-states, weights away from theta_n: both penalties active
    x, x_next = rng.standard_normal((2, S, d))
    pn, pn1 = rng.standard_normal((2, S, d)) / S
    K = rng.standard_normal((d, d))
    b = rng.standard_normal(d)

    def f(K_, b_):
        return extended_hamiltonian(net, p, n, x, x_next, pn, pn1, K_, b_, rho=rho)[0]

    _, gK, gb = extended_hamiltonian(net, p, n, x, x_next, pn, pn1, K, b, rho=rho)
    fK, fb = _finite_differences(f, K, b)
    scale = max(1.0, np.max(np.abs(gK)), np.max(np.abs(gb)))
    assert np.max(np.abs(gK - fK)) < 1e-6 * scale
    assert np.max(np.abs(gb - fb)) < 1e-6 * scale


@given(seed=st.integers(0, 2**31), S=st.integers(1, 6), d=st.integers(1, 4),
       rho=st.sampled_from([0.0, 0.7, 30.0]), gamma=st.sampled_from([0.0, 0.1]),
       gamma_t=st.sampled_from([0.0, 0.3]), n=st.integers(0, 2))
def test_extended_hamiltonian_gradient_matches_finite_differences(seed, S, d, rho, gamma,
                                                                  gamma_t, n):
    _check_fd("tanh", seed, S, d, rho, gamma, gamma_t, n)


@pytest.mark.parametrize("activation", ["smoothrelu", "relu"])
def test_extended_hamiltonian_gradient_other_activations(activation):
    # fixed seeds (pre-activations away from the kinks): the sigma'' of these activations
    for seed in range(3):
        _check_fd(activation, seed, 5, 3, 4.0, 0.1, 0.3, 1)


@pytest.mark.parametrize("rho", [0.0, 5.0])
def test_gradient_at_current_weights_is_minus_dJ(peaks, rho):
    # grad F_n(theta_n) = grad sum_s H_n = -dJ/dtheta_n (penalties and their gradients vanish
    # at theta_n); at rho = 0, F_n is the layer Hamiltonian itself
    net = _net(depth=6, gamma=1e-2, gamma_t=1e-1, gamma_c=1e-2)
    p = net.init_params(3)
    p.b[:] = np.random.default_rng(1).standard_normal(p.b.shape) * 0.2
    X, y = peaks.X_train[:30], peaks.y_train[:30]
    _, grads = loss_and_grad(net, p, X, y)
    states, costates = _sweep_data(net, p, X, y)
    prob = _problem(ptoc.propagator.ResNetModel(net), p, states, costates, rho, ptoc.Target.CPU)
    F_all, G_all = prob.evaluate(prob.flatten([p.K, p.b]))  # all layers at once
    for n in range(net.depth):
        value, gK, gb = extended_hamiltonian(net, p, n, states[n], states[n + 1], costates[n],
                                             costates[n + 1], rho=rho)
        np.testing.assert_allclose(gK, -grads.K[n], rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(gb, -grads.b[n], rtol=1e-10, atol=1e-14)
        # the stacked evaluation is the same problem, layer by layer
        assert F_all[n] == pytest.approx(value, rel=1e-13, abs=1e-15)
        np.testing.assert_allclose(G_all[n], np.concatenate([gK.ravel(), gb]), rtol=1e-12,
                                   atol=1e-15)
        if rho == 0:
            assert value == pytest.approx(hamiltonian(net, p, n, states[n], costates[n + 1]),
                                          rel=1e-13, abs=1e-15)
    # and the objective does depend on rho away from theta_n
    K = p.K[2] + 0.1
    v0 = extended_hamiltonian(net, p, 2, states[2], states[3], costates[2], costates[3], K,
                              rho=0.0)[0]
    v1 = extended_hamiltonian(net, p, 2, states[2], states[3], costates[2], costates[3], K,
                              rho=5.0)[0]
    assert v1 < v0


def test_rho_is_independent_of_the_batch_size(peaks):
    # the same data repeated twice (S -> 2S): the same objective and the same gradient,
    # so rho means the same for every batch size
    net = _net(depth=4)
    p = net.init_params(2)
    X, y = peaks.X_train[:20], peaks.y_train[:20]
    K, b = p.K[1] + 0.2, p.b[1] - 0.1
    out = []
    for reps in (1, 2):
        Xr, yr = np.tile(X, (reps, 1)), np.tile(y, reps)
        states, costates = _sweep_data(net, p, Xr, yr)
        out.append(extended_hamiltonian(net, p, 1, states[1], states[2], costates[1],
                                        costates[2], K, b, rho=3.0))
    assert out[0][0] == pytest.approx(out[1][0], rel=1e-12)
    np.testing.assert_allclose(out[0][1], out[1][1], rtol=1e-10, atol=1e-14)


# --- training ------------------------------------------------------------------------------

@pytest.mark.parametrize("method", [
    MSA(),
    MSA(inner=InnerSolver.LBFGS),
    EMSA(rho=10.0),
    DiscreteMSA(kind=WeightSet.TERNARY),
    DiscreteMSA(kind=WeightSet.BINARY),
], ids=["msa", "msa-lbfgs", "emsa", "ternary", "binary"])
def test_methods_decrease_the_loss(peaks, method):
    net = _net()
    X, y = peaks.X_train, peaks.y_train
    p0 = net.init_params(0)
    J0 = loss(net, p0, X, y)
    _, p, _ = _run(net, method, X, y, steps=60, batch=50)
    assert loss(net, p, X, y) < 0.6 * J0


@pytest.mark.parametrize("kind", ["ternary", "binary"])
def test_discrete_updates_beat_frozen_discrete_weights(peaks, kind):
    # the loss decrease is not only the head's: with the discrete weights frozen
    # (rho huge: no entry ever flips) the same steps end higher
    net = _net()
    X, y = peaks.X_train, peaks.y_train
    _, p, s = _run(net, DiscreteMSA(kind=kind), X, y, steps=60, batch=50)
    _, pf, sf = _run(net, DiscreteMSA(kind=kind, rho=1e9), X, y, steps=60, batch=50)
    s0 = DiscreteMSA(kind=kind).init(net, net.init_params(0))
    assert np.array_equal(sf.levels, s0.levels)
    assert not np.array_equal(s.levels, s0.levels)
    assert loss(net, p, X, y) < loss(net, pf, X, y) - 0.05


def test_emsa_with_large_rho_decreases_J_monotonically(peaks):
    # Li, Chen, Tai & E: for rho large enough every E-MSA step decreases J. Aggressive
    # inner steps (lr 5, 5 iterations), full batch, a nearly frozen head
    net = _net()
    X, y = peaks.X_train, peaks.y_train
    opts = dict(lr=5.0, inner_steps=5, head_optimizer=SGD(lr=1e-4))
    losses, p, _ = _run(net, EMSA(rho=100.0, **opts), X, y, steps=15)
    losses.append(loss(net, p, X, y))
    assert np.all(np.diff(losses) < 0)
    assert losses[-1] < losses[0] - 0.1
    # without the error control the same steps overshoot: J goes up at some step
    plain, _, _ = _run(net, EMSA(rho=0.0, **opts), X, y, steps=15)
    assert np.any(np.diff(plain) > 0)


@pytest.mark.parametrize("kind", ["ternary", "binary"])
def test_discrete_weights_stay_discrete(peaks, kind):
    net = _net()
    method = DiscreteMSA(kind=kind)
    allowed = (-1.0, 1.0) if kind == "binary" else (-1.0, 0.0, 1.0)
    p = net.init_params(0)
    s = method.init(net, p)
    pq = method.discrete_params(net, p, s)
    rng = np.random.default_rng(0)
    flips = 0
    for _ in range(12):
        idx = rng.choice(len(peaks.y_train), 50, replace=False)
        out = method.step(net, pq, s, peaks.X_train[idx], peaks.y_train[idx])
        flips += out.info["flipped"]
        pq, s = out.params, out.state
        a = np.exp(s.log_scale)
        assert np.all(a > 0)
        assert np.all(np.isin(s.levels, allowed))
        assert np.array_equal(pq.K, a[:, None, None] * s.levels)  # bit for bit
        ratio = pq.K / a[:, None, None]
        assert np.all(np.isin(ratio, allowed))
        frac = method.metrics(net, pq, s)["nonzero_fraction"]
        assert frac == np.count_nonzero(pq.K) / pq.K.size
    assert flips > 0
    if kind == "binary":
        assert frac == 1.0


def test_nonzero_fraction_decreases_as_lambda_grows(peaks):
    net = _net()
    X, y = peaks.X_train, peaks.y_train
    fractions = []
    for lam in (0.0, 1.0, 3.0, 6.0):
        m = DiscreteMSA(kind="ternary", lam=lam, rho=0.5)
        _, p, s = _run(net, m, X, y, steps=15, batch=50)
        fractions.append(m.metrics(net, p, s)["nonzero_fraction"])
    assert all(a > b for a, b in zip(fractions, fractions[1:], strict=False))
    assert fractions[-1] < 0.1


def test_initial_quantisation():
    net = _net(width=6, depth=3)
    p = net.init_params(5)
    for kind in WeightSet:
        m = DiscreteMSA(kind=kind)
        s = m.init(net, p)
        a = np.exp(s.log_scale)
        for n in range(net.depth):
            K, W = p.K[n], s.levels[n]
            if kind is WeightSet.TERNARY:
                thr = 0.7 * np.mean(np.abs(K))
                assert np.array_equal(W, np.where(np.abs(K) > thr, np.sign(K), 0.0))
            else:
                assert np.array_equal(W, np.where(K >= 0, 1.0, -1.0))
            # the least-squares scale: a_n W_n is the closest multiple of W_n to K_n
            assert a[n] == pytest.approx(np.sum(K * W) / np.sum(W * W), rel=1e-12)


def _roundtrip(d):
    buf = io.BytesIO()
    np.savez(buf, **d)
    buf.seek(0)
    return dict(np.load(buf))


@pytest.mark.parametrize("make", [
    lambda: EMSA(rho=2.0, inner="lbfgs"),
    lambda: MSA(head_optimizer=SGD(lr=1e-2, momentum=0.9)),
    lambda: DiscreteMSA(kind="ternary", rho=0.5, rho_schedule="linear", rho_growth=0.1),
    lambda: DiscreteMSA(kind="binary"),
], ids=["emsa-lbfgs", "msa-sgd", "ternary", "binary"])
def test_state_dict_round_trip_continues_bit_for_bit(peaks, make):
    net = _net(opening="dense")
    X, y = peaks.X_train, peaks.y_train
    ref_losses, ref_p, _ = _run(net, make(), X, y, steps=10, batch=40, seed=3)
    # 5 steps, save through np.savez / np.load, a fresh method object, 5 more steps
    rng = np.random.default_rng(3)
    m = make()
    p = net.init_params(0)
    s = m.init(net, p)
    losses = []
    for k in range(10):
        if k == 5:
            saved = _roundtrip(m.state_dict(s))
            m = make()
            s = m.load_state(saved, net, p)
        idx = rng.choice(len(y), 40, replace=False)
        out = m.step(net, p, s, X[idx], y[idx])
        p, s = out.params, out.state
        losses.append(out.loss)
    assert losses == ref_losses
    for k in ref_p:
        assert np.array_equal(p[k], ref_p[k]), k


def test_load_state_rejects_another_methods_state():
    net = _net()
    p = net.init_params(0)
    d = EMSA().state_dict(EMSA().init(net, p))
    with pytest.raises(ValueError, match="emsa"):
        DiscreteMSA().load_state(d, net, p)
    t = DiscreteMSA(kind="ternary")
    bad = t.state_dict(t.init(net, p))
    bad["levels"] = bad["levels"] * 0.5
    with pytest.raises(ValueError, match="levels"):
        t.load_state(bad, net, p)


@pytest.mark.parametrize("make, option", [
    (lambda: EMSA(rho=-1.0), "rho"),
    (lambda: EMSA(rho=float("nan")), "rho"),
    (lambda: EMSA(inner="newton"), "inner"),
    (lambda: EMSA(inner=2), "inner"),
    (lambda: EMSA(inner_steps=0), "inner_steps"),
    (lambda: EMSA(inner_steps=2.0), "inner_steps"),
    (lambda: MSA(lr=0.0), "lr"),
    (lambda: EMSA(backtrack=1.0), "backtrack"),
    (lambda: EMSA(max_backtracks=-1), "max_backtracks"),
    (lambda: EMSA(c1=0.0), "c1"),
    (lambda: EMSA(head_optimizer=ptoc.LBFGS()), "head_optimizer"),
    (lambda: EMSA(target="tpu"), "target"),
    (lambda: DiscreteMSA(kind="quaternary"), "kind"),
    (lambda: DiscreteMSA(lam=-0.1), "lam"),
    (lambda: DiscreteMSA(kind="binary", lam=1.0), "lam"),
    (lambda: DiscreteMSA(rho=-2.0), "rho"),
    (lambda: DiscreteMSA(rho_schedule="cosine"), "rho_schedule"),
    (lambda: DiscreteMSA(rho_growth=-1.0), "rho_growth"),
    (lambda: DiscreteMSA(beta=1.0), "beta"),
    (lambda: DiscreteMSA(init_threshold=-1.0), "init_threshold"),
    (lambda: DiscreteMSA(rho_rule="largest"), "rho_rule"),
    (lambda: DiscreteMSA(beta_decay=0.0), "beta_decay"),
    (lambda: DiscreteMSA(beta_decay=0.95), "steps_per_epoch"),
    (lambda: DiscreteMSA(steps_per_epoch=0), "steps_per_epoch"),
    (lambda: DiscreteMSA(scale="no"), "scale"),
    (lambda: DiscreteMSA(init_levels="zeros"), "init_levels"),
    (lambda: DiscreteMSA(seed=-1), "seed"),
    (lambda: DiscreteMSA(optimizer="adam"), "optimizer"),
    (lambda: make_msa_method("sgd"), "method"),
    (lambda: make_msa_method("msa", rho=1.0), "rho"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_bad_options_raise_a_value_error_naming_them(make, option):
    with pytest.raises(ValueError, match=option):
        make()


def test_make_msa_method_and_config():
    m = make_msa_method("emsa", rho=3.0, inner="lbfgs", head_optimizer={"name": "adam",
                                                                          "lr": 1e-3})
    assert isinstance(m, EMSA) and m.rho == 3.0 and m.inner is InnerSolver.LBFGS
    assert m.head_optimizer == Adam(lr=1e-3)
    assert make_msa_method(**m.config()).config() == m.config()
    msa = make_msa_method("msa", inner_steps=2)
    assert type(msa) is MSA and msa.rho == 0.0 and msa.name == "msa"
    assert make_msa_method(**msa.config()).config() == msa.config()
    for kind in ("ternary", "binary"):
        d = make_msa_method(kind, rho_schedule="geometric", rho_growth=0.01)
        assert d.name == kind and d.kind is WeightSet(kind)
        assert d.rho_schedule is RhoSchedule.GEOMETRIC
        assert d.rho_at(2) == pytest.approx(d.rho * 1.01 ** 2)
        assert make_msa_method(**d.config()).config() == d.config()
    assert make_msa_method("binary").lam == 0.0


def test_non_finite_update_raises_training_diverged(peaks):
    net = _net()
    p = net.init_params(0)
    m = EMSA(head_optimizer=SGD(lr=1e308))
    s = m.init(net, p)
    with np.errstate(all="ignore"), pytest.raises(TrainingDivergedError, match="non-finite"):
        for _ in range(3):  # the classifier overflows within a step or two
            out = m.step(net, p, s, peaks.X_train, peaks.y_train)
            p, s = out.params, out.state


@pytest.mark.parametrize("make", [
    lambda: DiscreteMSA(kind="ternary"),
    lambda: EMSA(rho=2.0, inner="lbfgs"),
], ids=["ternary", "emsa"])
def test_train_with_the_method_and_resume_bit_for_bit(peaks, tmp_path, make):
    # ptoc.train drives the method; a run checkpointed after 2 epochs and resumed to 4
    # equals the uninterrupted run bit for bit (state_dict/load_state through np.savez)
    from ptoc.training import train

    net = _net()
    p0 = net.init_params(0)
    full = train(net, p0, peaks, method=make(), epochs=4, batch_size=50, progress=False)
    assert not full.diverged and full.steps == 16
    J = full.history.column("train_loss")
    assert J[-1] < J[0]
    first = train(net, p0, peaks, method=make(), epochs=2, batch_size=50, progress=False,
                  output_dir=tmp_path, checkpoint_every=3)
    assert first.steps == 8
    resumed = train(net, p0, peaks, method=make(), epochs=4, batch_size=50, progress=False,
                    output_dir=tmp_path, checkpoint_every=3, resume=True)
    for k in full.params:
        assert np.array_equal(resumed.params[k], full.params[k]), k
    if isinstance(make(), DiscreteMSA):
        fractions = [r["nonzero_fraction"] for r in full.history]
        assert len(fractions) == 4 and all(0 < f < 1 for f in fractions)
        K = full.params.K
        a = np.abs(K).max(axis=(1, 2))
        assert np.all(np.isin(K / a[:, None, None], (-1.0, 0.0, 1.0)))
        assert fractions[-1] == np.count_nonzero(K) / K.size


# --- Li & Hao's recipe -------------------------------------------------------------------------

def _li_hao_reference(M, W, rho, lam, binary):
    """Li & Hao's update as their code writes it (layers.py), per layer, from scratch:
    rho_k = rho max|M| over the entries whose weight differs from sign(M); ternary: +1
    where M > rho_k (1 - 2W) + lam, -1 where M < -rho_k (1 + 2W) - lam, else 0; binary:
    sign(M) where |M| > rho_k, else W."""
    out = np.empty_like(W)
    for n in range(W.shape[0]):
        m, w = M[n], W[n]
        wrong = w != np.sign(m)
        rho_k = rho * (np.abs(m[wrong]).max() if wrong.any() else 0.0)
        if binary:
            out[n] = np.where(np.abs(m) > rho_k, np.where(m >= 0, 1.0, -1.0), w)
        else:
            new = np.zeros_like(w)
            new[m > rho_k * (1 - 2 * w) + lam] = 1.0
            new[m < -rho_k * (1 + 2 * w) - lam] = -1.0
            out[n] = new
    return out


@pytest.mark.parametrize("kind", ["ternary", "binary"])
def test_li_hao_update_is_their_rule(peaks, kind):
    """Every weight of every layer after each step equals Li & Hao's rule applied to the
    step's moving average M and the previous weights; no scale is learnt; beta follows
    the per-epoch schedule."""
    net = _net()
    m = DiscreteMSA.li_hao(steps_per_epoch=3, kind=kind, seed=4)
    assert (m.rho, m.lam, m.beta, m.beta_decay, m.scale) == (
        0.25, 1e-7 if kind == "ternary" else 0.0, 0.999, 0.95, False)
    p = net.init_params(0)
    s = m.init(net, p)
    p = m.discrete_params(net, p, s)
    values = [-1.0, 1.0] if kind == "binary" else [-1.0, 0.0, 1.0]
    assert set(np.unique(s.levels)) == set(values)  # random levels, all values present
    rng = np.random.default_rng(1)
    for k in range(7):
        idx = rng.choice(len(peaks.y_train), 50, replace=False)
        out = m.step(net, p, s, peaks.X_train[idx], peaks.y_train[idx])
        expected = _li_hao_reference(out.state.moving_average, s.levels, m.rho, m.lam,
                                     kind == "binary")
        assert np.array_equal(out.state.levels, expected)
        assert np.array_equal(out.state.log_scale, np.zeros(net.depth))
        assert np.array_equal(out.params.K, out.state.levels)
        assert out.info["beta_k"] == 1 - 0.001 * 0.95 ** (k // 3)
        p, s = out.params, out.state


def test_li_hao_levels_are_seeded():
    net = _net()
    p = net.init_params(0)
    a, b, c = (DiscreteMSA.li_hao(5, seed=seed).init(net, p).levels for seed in (1, 1, 2))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_li_hao_config_round_trips():
    """The recipe is a DiscreteMSA configuration: its config rebuilds it (checkpoints,
    run folders)."""
    m = DiscreteMSA.li_hao(40, kind="binary", seed=3)
    again = make_msa_method(**m.config())
    assert again.config() == m.config() and again.beta_at(80) == m.beta_at(80)
