"""Parareal neural ODE (Lorin): fine schemes, exact discrete adjoint, parareal, training."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ptoc
from ptoc.node import (
    NeuralODEGradient,
    NODECoarse,
    NODEDivergenceError,
    NODEParareal,
    RKLevelSteps,
    RKPropagator,
    Scheme,
    node_forward,
    node_loss,
    node_loss_and_grad,
    node_solve,
)
from ptoc.optim import Adam
from ptoc.training import train

ACTIVATIONS = ("tanh", "relu", "smoothrelu")


def _network(width, depth, *, n_in=None, n_classes=3, T=1.0, activation="tanh",
             opening="dense", gammas=(1e-3, 1e-3, 1e-3)):
    n_in = width if opening == "identity" else (n_in or 2)
    return ptoc.ResNet(width=width, depth=depth, T=T, activation=activation, n_in=n_in,
                       n_classes=n_classes, opening=opening, gamma=gammas[0],
                       gamma_t=gammas[1], gamma_c=gammas[2])


def _params(net, seed, scale=1.0):
    """Random parameters with non-zero biases (the default init has zero biases)."""
    rng = np.random.default_rng(seed)
    p = net.init_params(rng, scale=scale)
    p.b[...] = 0.5 * rng.standard_normal(p.b.shape)
    p.mu[...] = 0.5 * rng.standard_normal(p.mu.shape)
    if p.b_in is not None:
        p.b_in[...] = 0.5 * rng.standard_normal(p.b_in.shape)
    return p


def _solvable(p, scheme, span):
    """``p`` with its layer weights scaled, for an implicit ``scheme``, so that every step
    of length up to ``span`` exists and Newton finds it: ``span ||K_n||_2 <= 1/2`` makes
    the stage equations a contraction (sigma is 1-Lipschitz). Beyond it a step may have
    no solution (backward Euler with relu at d = 1, tau = 1, K = 1.85, b = -1.15,
    x = 0.80) or undamped Newton may cycle; either is reported as a
    NewtonConvergenceError (test_node_implicit.py), not a property to test here."""
    if Scheme.parse(scheme).implicit:
        p.K[...] *= min(1.0, 0.5 / (span * max(np.linalg.norm(K, 2) for K in p.K)))
    return p


def _batch(net, S, seed):
    rng = np.random.default_rng(seed + 1000)
    return rng.standard_normal((S, net.n_in)), rng.integers(0, net.n_classes, S)


def _max_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(a[k]) - np.asarray(b[k])))) for k in a)


# ----------------------------------------------------------------------------------------
# Euler with one substep is the ResNet
# ----------------------------------------------------------------------------------------


@settings(deadline=None, max_examples=20)
@given(width=st.integers(1, 5), depth=st.integers(1, 6), S=st.integers(1, 6),
       activation=st.sampled_from(ACTIVATIONS), opening=st.sampled_from(["dense", "identity"]),
       T=st.floats(0.1, 4.0), seed=st.integers(0, 10_000))
def test_euler_with_one_substep_is_the_resnet(width, depth, S, activation, opening, T, seed):
    net = _network(width, depth, T=T, activation=activation, opening=opening)
    p = _params(net, seed)
    X, y = _batch(net, S, seed)
    sol = node_forward(net, p, X, scheme="euler", substeps=1)
    fwd = ptoc.forward(net, p, X)
    assert sol.states.shape == fwd.states.shape
    assert np.max(np.abs(sol.states - fwd.states)) <= 1e-12
    loss, grads, info = node_loss_and_grad(net, p, X, y, scheme=Scheme.EULER, substeps=1)
    ref_loss, ref_grads = ptoc.loss_and_grad(net, p, X, y)
    assert abs(loss - ref_loss) <= 1e-12 * max(1.0, abs(ref_loss))
    assert sorted(grads) == sorted(ref_grads)
    scale = max(1.0, max(float(np.max(np.abs(g))) for g in ref_grads.values()))
    assert _max_diff(grads, ref_grads) <= 1e-12 * scale
    assert info.total_fine_steps == depth and info.total_rhs_evaluations == depth


def test_euler_differs_from_the_higher_order_schemes():
    # the comparison above is not between identical functions: Heun and RK4 differ
    net = _network(3, 4, T=2.0)
    p = _params(net, 1)
    X, y = _batch(net, 4, 1)
    ref = ptoc.loss(net, p, X, y)
    for s in ("heun", "rk4"):
        assert abs(node_loss(net, p, X, y, scheme=s) - ref) > 1e-6
    assert abs(node_loss(net, p, X, y, scheme="euler", substeps=2) - ref) > 1e-6


# ----------------------------------------------------------------------------------------
# The gradient: finite differences and the dot-product identity
# ----------------------------------------------------------------------------------------


@settings(deadline=None, max_examples=12)
@given(scheme=st.sampled_from(list(Scheme)), substeps=st.integers(1, 3),
       width=st.integers(1, 4), depth=st.integers(1, 4), S=st.integers(1, 4),
       opening=st.sampled_from(["dense", "identity"]), seed=st.integers(0, 10_000))
def test_gradients_match_central_differences(scheme, substeps, width, depth, S, opening,
                                             seed):
    net = _network(width, depth, T=1.5, opening=opening)
    p = _solvable(_params(net, seed), scheme, 1.5)
    X, y = _batch(net, S, seed)
    _, grads, _ = node_loss_and_grad(net, p, X, y, scheme=scheme, substeps=substeps)
    rng = np.random.default_rng(seed + 7)
    eps = 1e-6
    for key in p:
        v = rng.standard_normal(p[key].shape)
        plus, minus = p.copy(), p.copy()
        plus[key][...] += eps * v
        minus[key][...] -= eps * v
        fd = (node_loss(net, plus, X, y, scheme=scheme, substeps=substeps)
              - node_loss(net, minus, X, y, scheme=scheme, substeps=substeps)) / (2 * eps)
        exact = float(np.vdot(grads[key], v))
        assert abs(fd - exact) <= 1e-6 * abs(exact) + 1e-9, (key, fd, exact)


@settings(deadline=None, max_examples=25)
@given(scheme=st.sampled_from(list(Scheme)), activation=st.sampled_from(ACTIVATIONS),
       S=st.integers(1, 5), d=st.integers(1, 5), tau=st.floats(0.01, 1.0),
       seed=st.integers(0, 10_000))
def test_step_adjoint_is_the_transpose_of_the_tangent(scheme, activation, S, d, tau, seed):
    # one piece of length tau with weights (K, b): RKPropagator's step is one RK step
    rng = np.random.default_rng(seed)
    x, dx, lam = (rng.standard_normal((S, d)) for _ in range(3))
    dK, db = rng.standard_normal((1, d, d)), rng.standard_normal((1, d))
    net = _network(d, 1, T=tau, activation=activation, opening="identity")
    p = net.init_params(0)
    p.K[...], p.b[...] = rng.standard_normal((1, d, d)), rng.standard_normal((1, d))
    _solvable(p, scheme, tau)
    prop = RKPropagator(net, p, scheme=scheme)
    tangent = prop.tangent_step(0, x, dx)
    grad = prop.zero_gradient()
    lam0 = prop.adjoint_step(0, x, lam, grad)
    # the state part: <lam, T dx> = <T^T lam, dx> (the dot-product identity)
    lhs, rhs = float(np.vdot(lam, tangent)), float(np.vdot(lam0, dx))
    assert abs(lhs - rhs) <= 1e-13 * (np.sum(np.abs(lam * tangent)) + np.sum(np.abs(lam0 * dx)))
    if activation == "tanh":  # and against central differences of the step
        eps = 1e-6
        fd = (prop.step(0, x + eps * dx) - prop.step(0, x - eps * dx)) / (2 * eps)
        assert np.max(np.abs(fd - tangent)) <= 1e-7 * max(1.0, np.max(np.abs(tangent)))
        K0, b0 = p.K.copy(), p.b.copy()
        p.K[...], p.b[...] = K0 + eps * dK, b0 + eps * db
        plus = float(np.vdot(lam, prop.step(0, x)))
        p.K[...], p.b[...] = K0 - eps * dK, b0 - eps * db
        minus = float(np.vdot(lam, prop.step(0, x)))
        exact = float(np.vdot(grad[0], dK) + np.vdot(grad[1], db))
        assert abs((plus - minus) / (2 * eps) - exact) <= 1e-7 * max(1.0, abs(exact))


# ----------------------------------------------------------------------------------------
# Orders of accuracy
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme, substeps", [("euler", (16, 32, 64)), ("heun", (8, 16, 32)),
                                              ("rk4", (4, 8, 16))])
def test_convergence_orders(scheme, substeps):
    # smooth right-hand side (tanh), two pieces with different weights, T = 1
    net = _network(4, 2, n_classes=2, opening="identity")
    p = _params(net, 3, scale=2.0)
    x0 = np.random.default_rng(4).standard_normal((5, 4))
    exact = node_solve(net, p, x0, scheme="rk4", substeps=1024).final_state
    errors = np.array([np.max(np.abs(node_solve(net, p, x0, scheme=scheme, substeps=m)
                                     .final_state - exact)) for m in substeps])
    slopes = np.log2(errors[:-1] / errors[1:])
    assert np.all(np.abs(slopes - Scheme.parse(scheme).order) < 0.15), slopes


# ----------------------------------------------------------------------------------------
# Parareal
# ----------------------------------------------------------------------------------------


@st.composite
def _chunk_sizes(draw, N):
    P = draw(st.integers(1, N))
    cuts = sorted(draw(st.lists(st.integers(1, N - 1), min_size=P - 1, max_size=P - 1,
                                unique=True))) if P > 1 else []
    return tuple(int(v) for v in np.diff([0, *cuts, N]))


@settings(deadline=None, max_examples=30)
@given(data=st.data(), N=st.integers(1, 9), width=st.integers(1, 4), S=st.integers(1, 4),
       scheme=st.sampled_from(list(Scheme)), substeps=st.integers(1, 2),
       coarse=st.sampled_from(list(NODECoarse)), seed=st.integers(0, 10_000))
def test_parareal_is_exact_on_the_first_k_boundaries(data, N, width, S, scheme, substeps,
                                                      coarse, seed):
    sizes = data.draw(_chunk_sizes(N), label="chunk sizes")
    P = len(sizes)
    k = data.draw(st.integers(0, P), label="iterations")
    net = _network(width, N, T=2.0, activation="tanh")
    p = _solvable(_params(net, seed), scheme, 2.0)  # a coarse step may span all of T
    X, y = _batch(net, S, seed)
    serial = node_forward(net, p, X, scheme=scheme, substeps=substeps)
    opts = NODEParareal(sizes, schedule=(scheme,), max_iterations=k, tol=0,
                        coarse=coarse)
    sol = node_forward(net, p, X, substeps=substeps, parareal=opts)
    at_bounds = serial.states[sol.bounds * substeps]
    assert sol.iterations <= k
    assert np.array_equal(sol.boundaries[: k + 1], at_bounds[: k + 1])
    # after P iterations (the default) everything is the serial solve, bit for bit
    full = NODEParareal(sizes, schedule=(scheme,), tol=0, coarse=coarse)
    loss, grads, info = node_loss_and_grad(net, p, X, y, substeps=substeps, parareal=full)
    ref_loss, ref_grads, _ = node_loss_and_grad(net, p, X, y, scheme=scheme,
                                                substeps=substeps)
    assert info.converged
    # P iterations, or fewer at a fixed point U^k == U^{k-1} (e.g. G = F: Euler with one
    # substep and the per-piece coarse), which is the serial solution (asserted below)
    assert info.iterations == P or info.changes[-1] == 0.0
    assert np.array_equal(info.boundaries, at_bounds)
    assert np.array_equal(info.states, serial.states)
    assert loss == ref_loss and _max_diff(grads, ref_grads) == 0.0


def _problem(depth=32):
    net = _network(4, depth, T=1.0, n_classes=2, opening="identity")
    p = _params(net, 11)
    x0 = np.random.default_rng(12).standard_normal((6, 4))
    return net, p, x0


def test_parareal_converges_to_the_fine_serial_solution():
    net, p, x0 = _problem()
    serial = node_solve(net, p, x0, scheme="rk4", substeps=2)
    sol = node_solve(net, p, x0, substeps=2, keep_iterates=True,
                     parareal=NODEParareal(8, coarse="chunk", tol=0))
    exact = serial.states[sol.bounds * 2]
    errors = [float(np.max(np.abs(U - exact))) for U in sol.iterates]
    assert errors[0] > 1e-2  # a poor coarse solution ...
    assert all(e1 < e0 for e0, e1 in zip(errors[:-1], errors[1:], strict=True))  # ... improved
    assert errors[-1] == 0.0 and sol.iterations == 8
    # iteration 0 is the coarse sweep: one Euler step per chunk with its first weights ...
    U, H = sol.iterates[0], 4 * net.h
    for j in range(8):
        n = sol.bounds[j]
        step = U[j] + H * np.tanh(U[j] @ p.K[n].T + p.b[n])
        assert np.max(np.abs(U[j + 1] - step)) <= 1e-14
    # ... or, by default, one per piece: the ResNet's forward sweep
    piece = node_solve(net, p, x0, parareal=NODEParareal(8, max_iterations=0),
                       keep_iterates=True)
    resnet = ptoc.forward(net, p, x0).states[piece.bounds]
    assert np.max(np.abs(piece.iterates[0] - resnet)) <= 1e-13
    # changes are the max-norm of the boundary updates
    assert sol.changes == [float(np.max(np.abs(b - a)))
                           for a, b in zip(sol.iterates[:-1], sol.iterates[1:], strict=True)]
    # stopping on the tolerance: earlier, and accurate to about the tolerance
    early = node_solve(net, p, x0, substeps=2,
                       parareal=NODEParareal(8, coarse="chunk", tol=1e-6))
    assert early.converged and early.iterations < 8 and early.changes[-1] <= 1e-6
    assert all(c > 1e-6 for c in early.changes[:-1])
    assert np.max(np.abs(early.boundaries - exact)) <= 1e-5
    short = node_solve(net, p, x0, substeps=2,
                       parareal=NODEParareal(8, coarse="chunk", max_iterations=2))
    assert not short.converged and short.iterations == 2


def test_parareal_cost_record():
    net, p, x0 = _problem(depth=6)
    sizes, m = (3, 1, 2), 2
    sol = node_solve(net, p, x0, substeps=m, parareal=NODEParareal(sizes, tol=0))
    assert sol.iterations == 3 and sol.schemes == [Scheme.RK4] * 3
    # iteration 1 solves every chunk; later ones skip the chunks whose input is exact
    assert sol.fine_steps == [12, 6, 4] and sol.fine_steps_critical == [6, 4, 4]
    assert sol.rhs_evaluations == [48, 24, 16] and sol.rhs_evaluations_critical == [24, 16, 16]
    assert sol.coarse_steps == [6, 3, 2, 0]  # one Euler step per piece
    assert sol.final_fine_steps == 0  # every final trajectory was already computed
    assert sol.total_fine_steps == 22 and sol.critical_fine_steps == 14
    chunked = node_solve(net, p, x0, substeps=m,
                         parareal=NODEParareal(sizes, coarse="chunk", tol=0))
    assert chunked.coarse_steps == [3, 2, 1, 0]
    serial = node_solve(net, p, x0, scheme="heun", substeps=m)
    assert serial.total_fine_steps == 12 and serial.total_rhs_evaluations == 24


def test_order_raising_schedule_converges_to_the_last_scheme():
    net, p, x0 = _problem()
    X, y = x0, np.arange(6) % 2
    rk4 = node_solve(net, p, x0, scheme="rk4", substeps=2)
    euler = node_solve(net, p, x0, scheme="euler", substeps=2)
    schedule = ("euler", "heun", "rk4")
    sol = node_solve(net, p, x0, substeps=2,
                     parareal=NODEParareal(8, schedule=schedule, coarse="chunk", tol=0))
    assert sol.schemes == [Scheme.EULER, Scheme.HEUN] + [Scheme.RK4] * 8
    assert sol.converged and sol.iterations == 10
    assert np.array_equal(sol.states, rk4.states)
    assert sol.rhs_evaluations[:3] == [64, 128, 256]  # 1, 2, 4 evaluations per step
    # with a tolerance it stops early, close to the RK4 solution and far from Euler's
    early = node_solve(net, p, x0, substeps=2,
                       parareal=NODEParareal(8, schedule=schedule, coarse="chunk", tol=1e-8))
    assert early.converged and early.iterations < 10
    assert np.max(np.abs(early.final_state - rk4.final_state)) <= 1e-7
    assert np.max(np.abs(early.final_state - euler.final_state)) > 5e-4
    # the gradient at exact convergence is the serial RK4 gradient, bit for bit
    loss, grads, _ = node_loss_and_grad(net, p, X, y, substeps=2, parareal=NODEParareal(
        8, schedule=schedule, coarse="chunk", tol=0))
    ref_loss, ref_grads, _ = node_loss_and_grad(net, p, X, y, scheme="rk4", substeps=2)
    assert loss == ref_loss and _max_diff(grads, ref_grads) == 0.0


@settings(max_examples=10)
@given(seed=st.integers(0, 100), chunks=st.integers(2, 6), later=st.sampled_from(["heun", "rk4"]))
def test_an_euler_iteration_with_one_substep_per_piece_returns_the_coarse_sweep(seed, chunks,
                                                                             later):
    """docs/theory/node.md: with coarse="piece" and one substep, Euler is the coarse
    propagator, so iteration 1 with Euler changes nothing at all; with two substeps, or
    one coarse step per chunk, it does."""
    net = _network(4, 12, opening="identity")
    p, (x0, _) = _params(net, seed), _batch(net, 5, seed)
    schedule = ("euler", later)
    wasted = node_solve(net, p, x0, substeps=1, parareal=NODEParareal(chunks, schedule=schedule))
    assert wasted.changes[0] == 0.0  # max |U^1 - U^0|
    for substeps, coarse in ((2, "piece"), (1, "chunk")):
        sol = node_solve(net, p, x0, substeps=substeps,
                         parareal=NODEParareal(chunks, schedule=schedule, coarse=coarse))
        assert sol.changes[0] > 1e-6


def test_divergence_names_the_iteration():
    d = 2
    net = _network(d, 8, T=8.0, n_classes=2, activation="relu", opening="identity")
    p = net.zero_params()
    p.K[:] = 20.0 * np.eye(d)  # x' = 20 x + 1: Euler over a whole chunk is far too weak
    p.b[:] = 1.0
    x0 = np.ones((1, d))
    with pytest.raises(NODEDivergenceError, match="iteration 2: the boundary update"):
        node_solve(net, p, x0, substeps=4, parareal=NODEParareal(8, coarse="chunk"))
    # the growth is real: with a huge divergence factor the iterates grow by > 1e6
    sol = node_solve(net, p, x0, substeps=4, parareal=NODEParareal(
        8, coarse="chunk", divergence_factor=1e300, max_iterations=2))
    assert sol.changes[1] > 1e6 * sol.changes[0]
    p.K[:] = 1e200 * np.eye(d)  # overflow
    with pytest.raises(ptoc.DivergenceError, match=r"iteration 0\): non-finite"):
        node_solve(net, p, x0, parareal=NODEParareal(4))
    short = _network(d, 4, n_classes=2, activation="relu", opening="identity")
    q = short.zero_params()
    q.K[:] = 1e200 * np.eye(d)
    q.b[:] = 1.0
    with pytest.raises(NODEDivergenceError, match="iteration 1: non-finite"):
        node_solve(short, q, x0, substeps=2, parareal=NODEParareal(1, coarse="chunk"))


# ----------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------


def test_training_with_the_parareal_node_gradient_decreases_the_loss():
    data = ptoc.data.peaks(n_per_class=20, n_val_per_class=4, grid=64)
    net = ptoc.ResNet(width=4, depth=8, T=2.0, n_in=2, n_classes=5, activation="tanh")
    p0 = net.init_params(0)
    opts = NODEParareal(4, schedule=("euler", "rk4"), max_iterations=3)
    grad = NeuralODEGradient(net, parareal=opts)
    result = train(net, p0, data, optimizer=Adam(lr=2e-2), epochs=25, batch_size=None,
                   progress=False, grad_fn=grad)
    assert not result.diverged and len(grad.records) == 25
    start = node_loss(net, p0, data.X_train, data.y_train, parareal=opts)
    end = node_loss(net, result.params, data.X_train, data.y_train, parareal=opts)
    assert end < 0.85 * start
    assert grad.records[0].loss == pytest.approx(start, rel=1e-12)
    assert all(r.iterations == 3 and r.fine_steps_critical < r.fine_steps
               for r in grad.records)
    assert grad.records[-1].to_dict()["rhs_evaluations"] == grad.records[-1].rhs_evaluations
    # the epoch reports are the neural ODE's (serial RK4), not the Euler ResNet's
    serial_end = node_loss(net, result.params, data.X_train, data.y_train, scheme="rk4")
    assert result.train_loss == serial_end
    assert result.train_loss != ptoc.loss(net, result.params, data.X_train, data.y_train)
    scores = node_forward(net, result.params, data.X_val, scheme="rk4").final_state \
        @ result.params.W.T + result.params.mu
    assert result.val_accuracy == np.mean(np.argmax(scores, axis=1) == data.y_val)
    assert result.val_loss == node_loss(net, result.params, data.X_val, data.y_val,
                                        scheme="rk4")


def test_gradient_class_keeps_records_and_the_key_types():
    net = _network(3, 4)
    p = _params(net, 0)
    X, y = _batch(net, 5, 0)
    grad = NeuralODEGradient(net, scheme="heun", substeps=2)
    loss, grads = grad(p.to_dict(), X, y)
    assert isinstance(grads, dict) and sorted(grads) == sorted(p)
    ref_loss, ref_grads, info = node_loss_and_grad(net, p, X, y, scheme="heun", substeps=2)
    assert loss == ref_loss and _max_diff(grads, ref_grads) == 0.0
    record = grad.records[0]
    assert (record.iterations, record.fine_steps, record.rhs_evaluations) == (0, 8, 16)
    grad.reset()
    assert grad.records == []


@pytest.mark.parametrize("keep", [True, False])
@pytest.mark.parametrize("scheme, group_sizes", [("heun", ()), ("backward-euler", (1,)),
                                                  ("sdirk2", (1, 1)), ("gauss-2", (2,))])
def test_records_count_the_linear_systems_of_the_forward_solve_and_the_adjoint(
        scheme, group_sizes, keep, monkeypatch):
    # the adjoint of an implicit step solves one transposed system per sample and
    # implicit group; it recomputes the stages (the same Newton updates as the final
    # forward sweep) only where the forward sweep could not keep them
    if not keep:
        monkeypatch.setattr(ptoc._config, "STORED_DERIVATIVE_BYTES", 0)
    net = _network(3, 4)
    p = _params(net, 0)
    S = 5
    X, y = _batch(net, S, 0)
    grad = NeuralODEGradient(net, scheme=scheme, substeps=2)
    grad(p, X, y)
    record = grad.records[0]
    _, _, info = node_loss_and_grad(net, p, X, y, scheme=scheme, substeps=2)
    steps, d = 4 * 2, 3
    forward, adjoint = record.forward_solves, record.adjoint_solves
    assert forward == info.forward_solves == info.final_solves  # serial: one sweep
    assert forward.steps == adjoint.steps == steps
    recomputed = 0 if (keep and group_sizes) else 1
    assert (info.stages is not None) == (keep and bool(group_sizes))
    assert adjoint.newton_iterations == recomputed * forward.newton_iterations
    assert adjoint.linear_systems == (recomputed * forward.linear_systems
                                      + steps * S * len(group_sizes))
    assert adjoint.linear_cost == recomputed * forward.linear_cost + steps * S * sum(
        (g * d) ** 3 for g in group_sizes)
    if not group_sizes:
        assert forward.linear_systems == adjoint.linear_systems == 0
    else:
        assert forward.newton_iterations >= steps * len(group_sizes)
        assert forward.linear_systems == S * forward.newton_iterations
    assert record.to_dict()["adjoint_solves"]["linear_systems"] == adjoint.linear_systems


@pytest.mark.parametrize("scheme", ["backward-euler", "sdirk2", "gauss-2", "trapezoidal"])
@pytest.mark.parametrize("chunks", [None, 2])
def test_kept_stages_give_the_gradient_of_recomputed_ones_bitwise(scheme, chunks, monkeypatch):
    """Keeping an implicit scheme's stages from the forward sweep (serial, or the final
    parareal sweep of each chunk) changes no bit of the loss or the gradient; a bound too
    small for all of them keeps none."""
    net = _network(3, 4)
    p = _params(net, 1)
    X, y = _batch(net, 6, 1)
    parareal = None if chunks is None else NODEParareal(chunks, schedule=("euler", scheme))
    kw = dict(scheme=None if chunks else scheme, substeps=2, parareal=parareal)
    loss, grads, info = node_loss_and_grad(net, p, X, y, **kw)
    assert info.stages is not None and len(info.stages) == (chunks or 1)
    assert sum(len(c) for c in info.stages) == 4 * 2
    needed = 4 * 2 * 2 * Scheme.parse(scheme).stages * 6 * 3 * 8
    for bound, kept in ((needed, True), (needed - 1, False), (0, False)):
        monkeypatch.setattr(ptoc._config, "STORED_DERIVATIVE_BYTES", bound)
        loss2, grads2, info2 = node_loss_and_grad(net, p, X, y, **kw)
        assert (info2.stages is not None) == kept
        assert loss2 == loss and _max_diff(grads2, grads) == 0.0
        assert (info2.adjoint_solves.newton_iterations == 0) == kept
        assert info2.adjoint_solves.linear_systems == info.adjoint_solves.linear_systems + (
            0 if kept else info2.adjoint_solves.newton_iterations * 6)


def test_a_parareal_record_counts_every_coarse_and_fine_solve():
    net = _network(3, 8)
    p = _params(net, 0)
    X, y = _batch(net, 4, 0)
    opts = NODEParareal(4, schedule=("backward-euler",), max_iterations=2)
    grad = NeuralODEGradient(net, parareal=opts)
    grad(p, X, y)
    _, _, info = node_loss_and_grad(net, p, X, y, parareal=opts)
    total = info.final_solves
    for c in info.coarse_solves + info.fine_solves:
        total = total + c
    assert grad.records[0].forward_solves == total
    assert total.linear_systems > info.final_solves.linear_systems > 0


# ----------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------


def test_bad_inputs_are_named(monkeypatch):
    import ptoc.node as node

    def no_work(*args, **kwargs):  # every check must come before any solving
        raise AssertionError("solved before checking the inputs")

    monkeypatch.setattr(node, "_fine_trajectory", no_work)
    net = _network(3, 4)
    p = _params(net, 0)
    X, y = _batch(net, 5, 0)
    with pytest.raises(ValueError, match="unknown ODE scheme 'rk5'"):
        node_loss_and_grad(net, p, X, y, scheme="rk5")
    with pytest.raises(ValueError, match="substeps must be a positive integer, got 0"):
        node_loss_and_grad(net, p, X, y, substeps=0)
    with pytest.raises(ValueError, match="chunks P=5 exceeds the N=4 pieces"):
        node_loss_and_grad(net, p, X, y, parareal=NODEParareal(5))
    with pytest.raises(ValueError, match=r"chunk sizes \(2, 1\) sum to 3"):
        node_loss_and_grad(net, p, X, y, parareal=NODEParareal((2, 1)))
    with pytest.raises(ValueError, match="tol must be a finite number >= 0"):
        NODEParareal(2, tol=-1.0)
    with pytest.raises(ValueError, match="schedule is empty"):
        NODEParareal(2, schedule=())
    with pytest.raises(ValueError, match="unknown ODE scheme 'rk3'"):
        NODEParareal(2, schedule=("euler", "rk3"))
    with pytest.raises(ValueError, match="unknown coarse propagator"):
        NODEParareal(2, coarse="fine")
    with pytest.raises(ValueError, match="max_iterations"):
        NODEParareal(2, max_iterations=-1)
    with pytest.raises(ValueError, match="chunks must be a positive integer"):
        NODEParareal(0)
    with pytest.raises(ValueError, match="conflicts with the parareal schedule"):
        node_loss_and_grad(net, p, X, y, scheme="euler", parareal=NODEParareal(2))
    with pytest.raises(ValueError, match="features per sample"):
        node_loss_and_grad(net, p, X[:, :1], y)
    with pytest.raises(ValueError, match=r"params\['K'\] has shape"):
        node_loss_and_grad(net, {**p.to_dict(), "K": p.K[:2]}, X, y)
    with pytest.raises(ValueError, match=r"x0 must have shape \(S, 3\)"):
        node_solve(net, p, np.zeros((2, 4)))
    with pytest.raises(ValueError, match="unknown ODE scheme"):
        NeuralODEGradient(net, scheme="rk5")
    with pytest.raises(TypeError, match="ResNet"):
        NeuralODEGradient("net")
    assert Scheme.parse("RK4") is Scheme.RK4 and Scheme.parse(" Heun ") is Scheme.HEUN


# ----------------------------------------------------------------------------------------
# The parareal neural ODE on ptoc's parareal core (RKPropagator, PararealSolve)
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", list(Scheme))
@pytest.mark.parametrize("substeps", [1, 3])
@pytest.mark.parametrize("activation", ["tanh", "smoothrelu"])
def test_the_runge_kutta_propagator_passes_the_checker(scheme, substeps, activation):
    net = _network(3, 5, T=2.0, activation=activation)
    p = _params(net, 4)
    X, y = _batch(net, 4, 4)
    x0 = ptoc.ResNetPropagator(net, p).initial_state(X)
    prop = RKPropagator(net, p, y, scheme=scheme, substeps=substeps)
    assert prop.has_coarse_grid
    ptoc.check_propagator(prop, x0, raise_on_failure=True)
    # its layers are the pieces of node_solve, bit for bit, and its level steps keep them
    serial = node_solve(net, p, x0, scheme=scheme, substeps=substeps)
    states = np.empty((net.depth + 1,) + x0.shape)
    prop.propagate(x0, states=states)
    assert np.array_equal(states, serial.states[::substeps])
    one = x0
    for n in range(net.depth):
        one = prop.step(n, one)
    assert np.array_equal(one, serial.final_state)
    plan = ptoc.propagator.LevelPlan(level=0, backward=False, layers=np.arange(net.depth),
                                     spans=np.ones(net.depth, np.int64))
    steps = prop.level_steps(plan)
    assert isinstance(steps, RKLevelSteps)
    u = np.empty_like(states)
    u[0] = x0
    steps.runs(u, None, [1], [net.depth])
    assert np.array_equal(u, states) and np.array_equal(steps.trajectory, serial.states)
    # the objective is the classifier's, and needs the labels
    assert prop.objective(serial.final_state) == ptoc.objective.classifier_loss(
        p, serial.final_state, y)[0]
    with pytest.raises(ValueError, match="has no labels"):
        RKPropagator(net, p).objective(serial.final_state)


def test_the_parareal_neural_ode_runs_on_the_parareal_core(monkeypatch):
    """node_solve's parareal is ptoc.parallel.parareal.PararealSolve (one rank per chunk)
    with a fine propagator per iteration and the neural ODE's stopping rule."""
    from ptoc.parallel import parareal as core

    calls = []
    solve = core.PararealSolve.solve

    def counted(self):
        calls.append((self.comm.rank, self.fine is not None, type(self.rule).__name__))
        return solve(self)

    monkeypatch.setattr(core.PararealSolve, "solve", counted)
    net, p, x0 = _problem(depth=8)
    sol = node_solve(net, p, x0, substeps=2,
                     parareal=NODEParareal((3, 1, 4), schedule=("euler", "heun", "rk4")))
    assert sorted(calls) == [(j, True, "_NODERule") for j in range(3)]
    assert sol.converged and sol.schemes[:3] == [Scheme.EULER, Scheme.HEUN, Scheme.RK4]


@settings(deadline=None, max_examples=20)
@given(N=st.integers(1, 8), data=st.data(), scheme=st.sampled_from(list(Scheme)),
       substeps=st.integers(1, 2), coarse=st.sampled_from(list(NODECoarse)),
       seed=st.integers(0, 10_000))
def test_ptoc_parareal_on_the_runge_kutta_propagator_is_node_solve_bitwise(
        N, data, scheme, substeps, coarse, seed):
    """With a fixed schedule of one scheme, ptoc.Parareal on the RKPropagator with the
    neural ODE's coarse propagator gives node_solve's states, bit for bit, after any
    number of iterations; with Euler, one substep and coarse="chunk" that coarse
    propagator is Parareal's built-in "inject" coarse step."""
    from ptoc.parallel import solve_states

    P = data.draw(st.integers(1, N), label="chunks")
    k = data.draw(st.integers(0, P), label="iterations")
    net = _network(3, N, T=2.0)
    p = _solvable(_params(net, seed), scheme, 2.0)  # a coarse step may span all of T
    x0 = _batch(net, 3, seed)[0] @ p.K_in.T
    opts = NODEParareal(P, schedule=(scheme,), coarse=coarse, max_iterations=k, tol=0)
    node = node_solve(net, p, x0, substeps=substeps, parareal=opts)
    prop = RKPropagator(net, p, scheme=scheme, substeps=substeps)
    par = ptoc.Parareal(chunks=P, coarse=opts.coarse_function(prop), max_iterations=k,
                        tol=0)
    states, record = solve_states(prop, x0, par)
    assert record.ranks == P and record.iterations <= k
    # Parareal returns every chunk's fine trajectory F_j(U_j) after its start (position
    # p_j holds the end of chunk j-1's), node_solve the same trajectories from U_j
    fine = np.concatenate([node.boundaries[:1]] + [t[substeps::substeps]
                                                   for t in node.trajectories])
    assert np.array_equal(states, fine)
    if scheme is Scheme.EULER and substeps == 1 and coarse is NODECoarse.CHUNK:
        inject, _ = solve_states(prop, x0, ptoc.Parareal(chunks=P, coarse="inject",
                                                         max_iterations=k, tol=0))
        assert np.array_equal(inject, states)


@pytest.mark.parametrize("schedule", [("rk4",), ("euler", "heun", "rk4"), ("heun", "rk4")])
@pytest.mark.parametrize("coarse", list(NODECoarse))
def test_node_parareal_is_a_sweep_solver_for_solve_states(schedule, coarse):
    """NODEParareal as a strategy: ptoc.parallel.solve_states on the RKPropagator with the
    schedule's last scheme gives node_solve's states and records."""
    from ptoc.parallel import solve_states

    net, p, x0 = _problem(depth=12)
    for tol in (1e-300, 2e-2):
        opts = NODEParareal(4, schedule=schedule, coarse=coarse, tol=tol)
        sol = node_solve(net, p, x0, substeps=2, parareal=opts)
        prop = RKPropagator(net, p, scheme=schedule[-1], substeps=2)
        states, record = solve_states(prop, x0, opts)
        # the chunks' fine trajectories F_j(U_j) after their starts (see the test above)
        fine = np.concatenate([x0[None]] + [t[2::2] for t in sol.trajectories])
        assert np.array_equal(states, fine)
        assert record.method == "node-parareal" and record.ranks == 4
        assert record.residuals == sol.changes and record.residual_iterations[0] == 1
        assert (record.iterations, record.converged) == (sol.iterations, sol.converged)
        again, _ = solve_states(prop, x0, opts, comm=ptoc.parallel.SimulatedRanks(4))
        assert np.array_equal(again, states)
    assert sol.iterations < len(schedule) - 1 + 4  # the tolerance stopped it early


def test_node_parareal_refuses_what_it_cannot_solve():
    from ptoc.parallel import solve_adjoints, solve_states

    net, p, x0 = _problem(depth=6)
    prop = RKPropagator(net, p, scheme="rk4")
    with pytest.raises(TypeError, match="given as a ptoc.node.RKPropagator"):
        solve_states(ptoc.ResNetPropagator(net, p), x0, NODEParareal(2))
    with pytest.raises(TypeError, match="given as a ptoc.node.RKPropagator"):
        ptoc.forward(net, p, x0, solver=NODEParareal(2))
    with pytest.raises(ValueError, match="scheme 'heun' is not the schedule's last scheme"):
        solve_states(prop.with_scheme("heun"), x0, NODEParareal(2))
    with pytest.raises(ValueError, match=r"chunk sizes \(1, 5\) differ from the ranks' layers"):
        solve_states(prop, x0, NODEParareal((1, 5)))
    with pytest.raises(ValueError, match="with 3 chunks runs one chunk per rank"):
        solve_states(prop, x0, NODEParareal(3), comm=2)
    states, _ = solve_states(prop, x0, NODEParareal((3, 3)))  # the even split is fine
    with pytest.raises(TypeError, match="solves the state sweep"):
        solve_adjoints(prop, states, np.ones_like(x0), NODEParareal(2))
