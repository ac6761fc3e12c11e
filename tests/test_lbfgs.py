"""Tests of the L-BFGS optimiser (ptoc.optim.LBFGS).

Convergence on a convex quadratic and on Rosenbrock's function, the two-loop
recursion against the explicit BFGS inverse-Hessian matrices, the Armijo line search
(backtracking out of NaN regions, refusing ascent), an exact checkpoint/resume through
``np.savez``, a real ptoc training problem, and the validation of the options.
"""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ptoc
from ptoc.optim import (
    LBFGS,
    OPTIMISERS,
    LBFGSState,
    lbfgs_two_loop,
    make_optimizer,
)

# --- helpers ----------------------------------------------------------------------------------


def _run(opt, closure, params, n_steps, state=None):
    """``n_steps`` updates, the gradient passed in coming from the closure itself."""
    state = opt.init(params) if state is None else state
    for _ in range(n_steps):
        _, grads = closure(params)
        params, state = opt.update(params, grads, state, closure=closure)
    return params, state


def _spd(rng, n, cond):
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return (q * np.geomspace(1.0, cond, n)) @ q.T


def _rosenbrock(x):
    """The chained Rosenbrock function ``sum 100 (x_{i+1} - x_i^2)^2 + (1 - x_i)^2``."""
    r = x[1:] - x[:-1] ** 2
    f = np.sum(100.0 * r**2 + (1.0 - x[:-1]) ** 2)
    g = np.zeros_like(x)
    g[:-1] += -400.0 * x[:-1] * r - 2.0 * (1.0 - x[:-1])
    g[1:] += 200.0 * r
    return f, g


def _rosenbrock_closure(p):
    f, g = _rosenbrock(p["x"])
    return f, {"x": g}


# --- 1. convex quadratic --------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_converges_on_a_convex_quadratic_with_monotone_loss(seed):
    rng = np.random.default_rng(seed)
    n = 20
    A = _spd(rng, n, cond=10.0)
    b = rng.standard_normal(n)
    x_star = np.linalg.solve(A, b)

    # f(x) = x'Ax/2 - b'x, evaluated as (x - x*)'A(x - x*)/2, which differs from it by the
    # constant b'x*/2 only: the same objective and gradient, but its values near the
    # minimum are resolved far below the round-off of f(x*) ~ 1, which the Armijo test
    # needs for an error of 1e-10 in x (f - f* ~ 1e-20).
    def closure(p):
        x = p["x"]
        e = x - x_star
        return 0.5 * e @ (A @ e), {"x": A @ x - b}

    opt = LBFGS(memory=n)
    params, state = {"x": np.zeros(n)}, opt.init({"x": np.zeros(n)})
    losses = [closure(params)[0]]
    for _ in range(3 * n):
        _, grads = closure(params)
        params, state = opt.update(params, grads, state, closure=closure)
        losses.append(closure(params)[0])
        assert state.loss == losses[-1]  # the state holds the loss at the returned point
        if np.linalg.norm(params["x"] - x_star) <= 1e-10:
            break
    assert np.linalg.norm(params["x"] - x_star) <= 1e-10, state.step
    assert np.all(np.diff(losses) <= 0.0), losses
    assert state.failed_line_searches == 0
    assert 0 < state.n_pairs <= n


# --- 2. Rosenbrock ----------------------------------------------------------------------------


@pytest.mark.parametrize("x0", [[-1.2, 1.0], [-1.2, 1.0] * 5], ids=["2-D", "10-D chain"])
def test_reaches_the_minimum_of_rosenbrock(x0):
    opt = LBFGS(memory=10)
    params = {"x": np.array(x0)}
    state = opt.init(params)
    losses = []
    for _ in range(400):
        _, grads = _rosenbrock_closure(params)
        params, state = opt.update(params, grads, state, closure=_rosenbrock_closure)
        losses.append(state.loss)
        if np.max(np.abs(params["x"] - 1.0)) <= 1e-6:
            break
    assert np.max(np.abs(params["x"] - 1.0)) <= 1e-6, (state.step, params["x"])
    assert np.all(np.diff(losses) <= 0.0)
    assert state.closure_calls >= 2 * state.step  # one fresh f(x) plus >= 1 trial per step


# --- 3. two-loop recursion = explicit BFGS inverse update -------------------------------------


def _explicit_inverse_bfgs(s, y):
    n = s.shape[1]
    gamma = (s[-1] @ y[-1]) / (y[-1] @ y[-1])
    H = gamma * np.eye(n)
    for si, yi in zip(s, y, strict=True):
        rho = 1.0 / (yi @ si)
        V = np.eye(n) - rho * np.outer(yi, si)
        H = V.T @ H @ V + rho * np.outer(si, si)  # (I - rho s y') H (I - rho y s') + rho s s'
    return H


@settings(deadline=None)
@given(n=st.integers(1, 12), m=st.integers(1, 8), seed=st.integers(0, 2**32 - 1))
def test_two_loop_recursion_equals_the_explicit_bfgs_matrix(n, m, seed):
    rng = np.random.default_rng(seed)
    s = rng.standard_normal((m, n))
    y = np.empty_like(s)
    for i in range(m):  # y_i = B_i s_i with a random SPD B_i, so that s_i'y_i > 0
        B = _spd(rng, n, cond=rng.uniform(1.0, 20.0))
        y[i] = B @ s[i]
    assert np.all(np.einsum("ij,ij->i", s, y) > 0)
    g = rng.standard_normal(n)
    H = _explicit_inverse_bfgs(s, y)
    expected = H @ g
    got = lbfgs_two_loop(g, s, y)
    assert got.dtype == np.float64
    assert np.linalg.norm(got - expected) <= 1e-12 * np.linalg.norm(expected)
    # H is symmetric positive definite and satisfies the newest secant equation H y = s
    assert np.allclose(H, H.T, atol=1e-12 * np.abs(H).max())
    assert np.all(np.linalg.eigvalsh(0.5 * (H + H.T)) > 0)
    assert np.allclose(lbfgs_two_loop(y[-1], s, y), s[-1], rtol=1e-10, atol=1e-12)


def test_two_loop_without_pairs_is_the_identity():
    g = np.array([1.0, -2.0, 3.0])
    out = lbfgs_two_loop(g, np.zeros((0, 3)), np.zeros((0, 3)))
    assert np.array_equal(out, g) and out is not g


# --- 4. the Armijo line search ----------------------------------------------------------------


@pytest.mark.parametrize("bad", ["loss", "grad"])
def test_line_search_backtracks_out_of_a_nan_region(bad):
    radius = 2.0

    def closure(p):
        x = p["x"]
        f, g = 0.5 * x @ x, x.copy()
        if np.linalg.norm(x) > radius:
            if bad == "loss":
                f = np.nan
            else:  # a lower, finite loss, but no gradient: must be rejected all the same
                f, g = -1.0, np.full_like(x, np.nan)
        return f, {"x": g}

    opt = LBFGS(lr=10.0)  # every first trial step leaves the finite region
    params = {"x": np.array([1.2, -0.9])}  # |x| = 1.5
    state = opt.init(params)
    f_prev = closure(params)[0]
    for _ in range(5):
        _, grads = closure(params)
        params, state = opt.update(params, grads, state, closure=closure)
        assert np.all(np.isfinite(params["x"]))
        assert np.linalg.norm(params["x"]) <= radius
        assert np.isfinite(state.loss) and state.loss <= f_prev
        assert np.all(np.isfinite(state.grad)) and np.all(np.isfinite(state.s))
        f_prev = state.loss
    assert state.failed_line_searches == 0
    # the first update: f(x) and the trials t = 10, 5 (rejected) and 2.5 (accepted)
    first = opt.update({"x": np.array([1.2, -0.9])}, {"x": np.array([1.2, -0.9])},
                       opt.init(params), closure=closure)[1]
    assert first.closure_calls == 4
    assert first.loss < 0.5 * 1.5**2


def test_line_search_refuses_an_ascent_and_keeps_the_parameters():
    rng = np.random.default_rng(3)
    A = _spd(rng, 6, cond=5.0)

    def good(p):
        return 0.5 * p["x"] @ A @ p["x"], {"x": A @ p["x"]}

    def wrong_sign(p):  # the loss of `good` with the gradient of its negative
        return 0.5 * p["x"] @ A @ p["x"], {"x": -(A @ p["x"])}

    opt = LBFGS(memory=4, max_backtracks=12)
    params, state = _run(opt, good, {"x": rng.standard_normal(6)}, 3)
    assert state.n_pairs > 0 and state.failed_line_searches == 0
    calls = state.closure_calls
    x_before = params["x"].copy()
    _, grads = wrong_sign(params)
    new, new_state = opt.update(params, grads, state, closure=wrong_sign)
    assert np.array_equal(new["x"], x_before) and new["x"] is not params["x"]
    assert np.array_equal(params["x"], x_before)  # the input is untouched
    assert new_state.failed_line_searches == 1
    assert new_state.n_pairs == 0  # memory reset
    assert new_state.step == state.step + 1
    assert new_state.closure_calls == calls + 1 + (opt.max_backtracks + 1)
    assert new_state.loss == good(params)[0]
    # with the right gradient it goes on from the reset state
    new2, state2 = opt.update(new, good(new)[1], new_state, closure=good)
    assert good(new2)[0] < good(new)[0] and state2.failed_line_searches == 1


def test_memory_keeps_the_newest_pairs():
    rng = np.random.default_rng(5)
    A, b = _spd(rng, 8, cond=50.0), rng.standard_normal(8)

    def closure(p):
        return 0.5 * p["x"] @ A @ p["x"] - b @ p["x"], {"x": A @ p["x"] - b}

    opt = LBFGS(memory=3)
    params = {"x": np.zeros(8)}
    state = opt.init(params)
    xs, gs = [params["x"]], [closure(params)[1]["x"]]
    for _ in range(7):
        params, state = opt.update(params, closure(params)[1], state, closure=closure)
        xs.append(params["x"])
        gs.append(closure(params)[1]["x"])
    assert state.failed_line_searches == 0 and state.n_pairs == 3  # convex: every pair kept
    for row, k in enumerate(range(len(xs) - 3, len(xs))):  # the last three steps, oldest first
        assert np.array_equal(state.s[row], xs[k] - xs[k - 1])
        assert np.array_equal(state.y[row], gs[k] - gs[k - 1])
    assert np.array_equal(state.grad, gs[-1])


def test_pairs_without_positive_curvature_are_skipped():
    # f = x^4/4 - x^2/2 is concave near 0: a step from 0.1 towards the well at 1 gives s'y < 0
    def closure(p):
        x = p["x"]
        return float(np.sum(x**4 / 4 - x**2 / 2)), {"x": x**3 - x}

    opt = LBFGS()
    params = {"x": np.array([0.1])}
    new, state = opt.update(params, closure(params)[1], opt.init(params), closure=closure)
    s, y = new["x"] - params["x"], closure(new)[1]["x"] - closure(params)[1]["x"]
    assert s @ y < 0 and state.n_pairs == 0 and state.failed_line_searches == 0
    assert closure(new)[0] < closure(params)[0]
    new, state = _run(opt, closure, new, 30, state=state)
    assert abs(new["x"][0] - 1.0) < 1e-8
    assert np.all(np.einsum("ij,ij->i", state.s, state.y) > 0)


def test_loss_at_x_is_evaluated_afresh_for_each_batch():
    # mini-batch training: the closure of each update is bound to another batch, here
    # the same quadratic shifted by a batch-dependent constant. A loss at x kept from the
    # previous update (another batch) would make every Armijo test fail or pass wrongly.
    a = np.array([1.0, 3.0])
    def closure_for(batch):
        def closure(p):
            x = p["x"]
            return 0.5 * x @ (a * x) + 100.0 * batch, {"x": a * x}
        return closure

    opt = LBFGS()
    params = {"x": np.array([0.6, -0.3])}
    state = opt.init(params)
    for batch in [3, 0, 2, 1]:
        closure = closure_for(batch)
        f_before = closure(params)[0]
        params, state = opt.update(params, closure(params)[1], state, closure=closure)
        assert state.failed_line_searches == 0
        assert f_before > state.loss == closure(params)[0]
    assert np.linalg.norm(params["x"]) < 0.1


def test_a_non_descent_direction_resets_the_memory():
    # a corrupted memory (s'y < 0, which update() never stores) makes -H g an ascent
    # direction; the update must fall back to steepest descent with an empty memory.
    def closure(p):
        return 0.5 * p["x"] @ p["x"], {"x": p["x"].copy()}

    x = {"x": np.array([1.0, 0.5])}
    opt = LBFGS()
    bad = LBFGSState(3, np.array([[1.0, 0.0]]), np.array([[-1.0, 0.0]]), None, None, 0, 0)
    assert lbfgs_two_loop(x["x"], bad.s, bad.y) @ x["x"] < 0  # -H g ascends
    new_bad, state_bad = opt.update(x, closure(x)[1], bad, closure=closure)
    new_ref, state_ref = opt.update(x, closure(x)[1], opt.init(x), closure=closure)
    assert np.array_equal(new_bad["x"], new_ref["x"])
    assert np.array_equal(state_bad.s, state_ref.s) and state_bad.n_pairs == 1
    assert closure(new_bad)[0] < closure(x)[0]


def test_first_step_is_steepest_descent_of_length_at_most_lr():
    seen = []

    def closure(p):
        seen.append(p["x"].copy())
        return 0.5 * p["x"] @ p["x"], {"x": p["x"].copy()}

    x0 = np.array([3.0, 4.0])  # |g| = 5
    opt = LBFGS(lr=0.5)
    opt.update({"x": x0}, {"x": x0.copy()}, opt.init({"x": x0}), closure=closure)
    assert np.array_equal(seen[0], x0)  # f(x) evaluated afresh first
    assert np.allclose(seen[1], x0 - 0.5 * x0 / 5.0, rtol=0, atol=1e-15)


def test_stationary_point_is_left_alone():
    opt = LBFGS()
    x = {"x": np.zeros(3)}
    new, state = opt.update(x, {"x": np.zeros(3)}, opt.init(x),
                            closure=lambda p: (0.0, {"x": np.zeros(3)}))
    assert np.array_equal(new["x"], x["x"]) and state.failed_line_searches == 0


# --- 5. checkpoint and resume -----------------------------------------------------------------


def _two_key_closure(p):
    x = np.concatenate([p["a"].ravel(), p["b"]])
    f, g = _rosenbrock(x)
    return f, {"a": g[:6].reshape(3, 2).astype(p["a"].dtype), "b": g[6:].astype(p["b"].dtype)}


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_state_roundtrips_through_npz_and_resumes_bit_for_bit(tmp_path, dtype):
    opt = LBFGS(memory=3)  # fewer pairs than steps: the oldest are dropped
    p0 = {"a": np.full((3, 2), -1.2, dtype=dtype), "b": np.array([1.0, -1.0, 0.5], dtype=dtype)}

    p_full, s_full = _run(opt, _two_key_closure, p0, 10)

    p5, s5 = _run(opt, _two_key_closure, p0, 5)
    assert s5.n_pairs == 3 and s5.s.dtype == dtype and s5.grad.dtype == dtype
    d = opt.state_dict(s5)
    np.savez(tmp_path / "opt.npz", **d)
    with np.load(tmp_path / "opt.npz", allow_pickle=False) as z:
        loaded = opt.load_state({k: z[k] for k in z.files})
    assert loaded.step == s5.step == 5 and loaded.loss == s5.loss
    assert loaded.closure_calls == s5.closure_calls
    for name in ("s", "y", "grad"):
        a, b = getattr(loaded, name), getattr(s5, name)
        assert a.dtype == b.dtype and np.array_equal(a, b), name
    d2 = opt.state_dict(loaded)
    assert set(d) == set(d2)
    for k in d:
        a, b = np.asarray(d[k]), np.asarray(d2[k])
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), k

    p_resumed, s_resumed = _run(opt, _two_key_closure, p5, 5, state=loaded)
    for k in p_full:
        assert p_resumed[k].dtype == dtype
        assert np.array_equal(p_resumed[k], p_full[k]), k
    for k, v in opt.state_dict(s_full).items():
        assert np.asarray(v).tobytes() == np.asarray(opt.state_dict(s_resumed)[k]).tobytes(), k
    assert _two_key_closure(p_full)[0] < _two_key_closure(p0)[0]


def test_load_state_checks_the_optimiser_and_the_parameters():
    x = {"x": np.ones(3)}
    d = LBFGS().state_dict(LBFGS().init(x))
    assert "grad" not in d and "loss" not in d
    with pytest.raises(ValueError, match="'lbfgs'"):
        ptoc.Adam().load_state(d)
    with pytest.raises(ValueError, match="'s'"):
        LBFGS().load_state({"optimizer": "lbfgs", "step": 0})
    state = LBFGS().load_state(d)
    assert isinstance(state, LBFGSState) and state.grad is None and state.loss is None
    with pytest.raises(ValueError, match="other parameters"):
        LBFGS().update({"x": np.ones(4)}, {"x": np.ones(4)}, state,
                       closure=lambda p: (0.0, {"x": p["x"]}))


# --- 6. a real ptoc problem -------------------------------------------------------------------


def test_trains_a_resnet_on_peaks():
    net = ptoc.ResNet(width=4, depth=4, n_in=2, n_classes=5, activation="smoothrelu")
    data = ptoc.data.peaks(n_per_class=20, n_val_per_class=4, grid=64)
    X, y = data.X_train, data.y_train

    def closure(p):
        return ptoc.loss_and_grad(net, p, X, y)

    params = net.init_params(seed=0)
    loss0 = closure(params)[0]
    opt = LBFGS()
    new, state = _run(opt, closure, params, 20)
    assert isinstance(new, ptoc.Params)
    assert state.loss == closure(new)[0]
    assert state.loss < 0.7 * loss0, (loss0, state.loss)
    assert state.failed_line_searches == 0
    assert state.s.shape == (opt.memory, params.ravel().size)


# --- 7. validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"memory": 0}, "memory"),
        ({"memory": -3}, "memory"),
        ({"memory": 2.5}, "memory"),
        ({"memory": True}, "memory"),
        ({"lr": 0.0}, "lr"),
        ({"lr": -1.0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"c1": 0.0}, "c1"),
        ({"c1": 1.0}, "c1"),
        ({"backtrack": 0.0}, "backtrack"),
        ({"backtrack": 1.0}, "backtrack"),
        ({"backtrack": 1.5}, "backtrack"),
        ({"max_backtracks": -1}, "max_backtracks"),
        ({"curvature_eps": -1e-3}, "curvature_eps"),
    ],
)
def test_bad_options_name_the_option(kwargs, name):
    with pytest.raises(ValueError, match=name):
        LBFGS(**kwargs)
    with pytest.raises(ValueError, match=name):
        make_optimizer("lbfgs", **kwargs)


def test_update_needs_a_closure_and_matching_grads():
    opt = LBFGS()
    x = {"x": np.ones(2)}
    with pytest.raises(ValueError, match="LBFGS needs closure="):
        opt.update(x, {"x": np.ones(2)}, opt.init(x))
    with pytest.raises(ValueError, match="closure must be callable"):
        opt.update(x, {"x": np.ones(2)}, opt.init(x), closure=3)
    with pytest.raises(ValueError, match="keys"):
        opt.update(x, {"y": np.ones(2)}, opt.init(x), closure=lambda p: (0.0, p))
    with pytest.raises(ValueError, match="non-finite loss"):
        opt.update(x, {"x": np.ones(2)}, opt.init(x),
                   closure=lambda p: (np.inf, {"x": np.ones(2)}))


# --- 8. registry and config --------------------------------------------------------------------


def test_make_optimizer_and_config_roundtrip():
    assert OPTIMISERS["lbfgs"] is LBFGS and ptoc.LBFGS is LBFGS
    opt = make_optimizer("lbfgs", memory=5)
    assert opt == LBFGS(memory=5) and opt.memory == 5
    cfg = opt.config()
    assert cfg["name"] == "lbfgs" and cfg["memory"] == 5
    assert make_optimizer(**json.loads(json.dumps(cfg))) == opt
    with pytest.raises(ValueError, match="momentum"):
        make_optimizer("lbfgs", momentum=0.9)


def test_a_given_loss_saves_one_closure_call_and_changes_nothing_else():
    """``update(..., loss=f)`` uses the caller's loss at x instead of calling the closure
    there again: one evaluation fewer per step, the same iterates for an exact gradient."""
    a = np.array([1.0, 3.0, 0.5])
    calls = []

    def closure(p):
        calls.append(1)
        x = p["x"]
        return 0.5 * x @ (a * x) + np.sin(x).sum(), {"x": a * x + np.cos(x)}

    opt = LBFGS()
    runs = {}
    for given_loss in (False, True):
        params, state = {"x": np.array([0.9, -0.7, 2.0])}, opt.init({"x": np.zeros(3)})
        calls.clear()
        for _ in range(6):
            f, g = closure(params)
            params, state = opt.update(params, g, state, closure=closure,
                                       loss=f if given_loss else None)
        runs[given_loss] = (params["x"], len(calls), state.closure_calls)
    assert np.array_equal(runs[True][0], runs[False][0])
    assert runs[False][1] - runs[True][1] == 6  # one call per step saved
    assert runs[False][2] - runs[True][2] == 6


def test_training_with_lbfgs_evaluates_the_start_of_each_step_once():
    net = ptoc.ResNet(width=3, depth=4, n_in=2, n_classes=5)
    data = ptoc.data.peaks(n_per_class=10, n_val_per_class=2, grid=32)
    seen = []

    def grad_fn(p, X, y):
        seen.append(p.K.copy())
        return ptoc.loss_and_grad(net, p, X, y)

    res = ptoc.train(net, net.init_params(0), data, optimizer=LBFGS(), grad_fn=grad_fn,
                     epochs=5, batch_size=None, progress=False)
    assert res.steps == 5 and res.optimizer_state.failed_line_searches == 0
    repeats = sum(np.array_equal(a, b) for a, b in zip(seen, seen[1:], strict=False))
    # the start of a step is evaluated once (it was twice: by train, then by the line
    # search). What remains: the next step starts at the point the line search accepted
    # and evaluates it again, since this grad_fn does not say it is deterministic (with
    # deterministic = True that evaluation is reused: tests/test_gradient_reuse.py).
    assert repeats == res.steps - 1


# --- value-only trials (one gradient per step, Günther et al.'s reference code) -------------


def _counting_rosenbrock():
    """The Rosenbrock closure and objective, counting their calls."""
    calls = {"closure": 0, "objective": 0}

    def closure(p):
        calls["closure"] += 1
        return _rosenbrock_closure(p)

    def objective(p):
        calls["objective"] += 1
        return _rosenbrock(p["x"])[0]

    return closure, objective, calls


def _steps_with_start_gradient(opt, params, n_steps, closure, objective):
    """``n_steps`` updates, each given the loss and gradient at its start (as
    GradientMethod gives them); the states after every update."""
    state, states = opt.init(params), []
    for _ in range(n_steps):
        f, g = _rosenbrock_closure(params)
        params, state = opt.update(params, g, state, closure=closure, loss=f,
                                   objective=objective)
        states.append(state)
    return params, states


def test_value_only_trials_take_the_same_steps_with_one_gradient_per_step():
    """With an exact gradient, forming each curvature pair at the next update (from the
    gradient there) gives the pair the line search would have formed at its accepted
    point: the iterates are the same bit for bit, while the line search evaluates only
    the objective."""
    x0 = {"x": np.array([-1.2, 1.0, -0.5, 0.8])}
    closure, objective, calls = _counting_rosenbrock()
    plain, plain_states = _steps_with_start_gradient(LBFGS(memory=3), x0, 30, closure, None)
    trials = plain_states[-1].closure_calls
    assert calls == {"closure": trials, "objective": 0}
    closure, objective, calls = _counting_rosenbrock()
    value_only, states = _steps_with_start_gradient(LBFGS(memory=3, value_only_trials=True), x0,
                                                    30, closure, objective)
    assert np.array_equal(value_only["x"], plain["x"])
    assert calls == {"closure": 0, "objective": trials}
    assert states[-1].closure_calls == trials and states[-1].grad is None
    # the pairs lag one update behind: update k+1 stores the pair update k made
    for before, after in zip(plain_states[:-1], states[1:], strict=True):
        assert np.array_equal(before.s, after.s) and np.array_equal(before.y, after.y)
    assert _rosenbrock(value_only["x"])[0] < 1e-3 * _rosenbrock(x0["x"])[0]


def test_value_only_trials_pair_is_completed_by_the_next_gradient():
    opt = LBFGS(memory=5, value_only_trials=True)
    closure, objective, _ = _counting_rosenbrock()
    x0 = {"x": np.array([0.3, -0.2])}
    f0, g0 = _rosenbrock_closure(x0)
    x1, s1 = opt.update(x0, g0, opt.init(x0), closure=closure, loss=f0, objective=objective)
    assert s1.n_pairs == 0  # no gradient at x1 yet
    assert np.array_equal(s1.start, x0["x"]) and np.array_equal(s1.start_grad, g0["x"])
    f1, g1 = _rosenbrock_closure(x1)
    _, s2 = opt.update(x1, g1, s1, closure=closure, loss=f1, objective=objective)
    assert s2.n_pairs == 1
    assert np.array_equal(s2.s[0], x1["x"] - x0["x"])
    assert np.array_equal(s2.y[0], g1["x"] - g0["x"])


def test_value_only_trials_without_objective_use_the_closure_loss():
    opt = LBFGS(value_only_trials=True)
    closure, _, calls = _counting_rosenbrock()
    x0 = {"x": np.array([0.3, -0.2])}
    f0, g0 = _rosenbrock_closure(x0)
    _, state = opt.update(x0, g0, opt.init(x0), closure=closure, loss=f0)
    assert calls["closure"] == state.closure_calls >= 1
    with pytest.raises(ValueError, match="objective must be callable"):
        opt.update(x0, g0, opt.init(x0), closure=closure, loss=f0, objective=3)


def test_value_only_state_round_trips_and_bad_states_are_named(tmp_path):
    opt = LBFGS(memory=2, value_only_trials=True)
    closure, objective, _ = _counting_rosenbrock()
    x0 = {"x": np.array([-1.2, 1.0, 0.4])}
    _, states = _steps_with_start_gradient(opt, x0, 4, closure, objective)
    d = opt.state_dict(states[-1])
    np.savez(tmp_path / "s.npz", **d)
    back = opt.load_state(dict(np.load(tmp_path / "s.npz")))
    for name in ("s", "y", "start", "start_grad"):
        assert np.array_equal(getattr(back, name), getattr(states[-1], name)), name
    assert back.grad is None and back.loss == states[-1].loss
    half = {k: v for k, v in d.items() if k != "start_grad"}
    with pytest.raises(ValueError, match="only one of 'start' and 'start_grad'"):
        opt.load_state(half)
    with pytest.raises(ValueError, match="start has shape"):
        opt.load_state({**d, "start": np.zeros(7)})
    with pytest.raises(ValueError, match="value_only_trials must be True or False"):
        LBFGS(value_only_trials="yes")
    assert make_optimizer(**opt.config()) == opt
