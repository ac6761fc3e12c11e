"""Implicit Runge-Kutta schemes of the neural ODE (ptoc.node): Newton's method and its
record, orders, the exact adjoint of the implicit step, and the parareal neural ODE with
implicit coarse and fine propagators and per-iteration steps per piece."""

import numpy as np
import pytest

import ptoc
from ptoc.node import (
    NEWTON_MAX_ITERATIONS,
    NewtonConvergenceError,
    NODEParareal,
    RKPropagator,
    Scheme,
    SolveCount,
    _stages,
    node_loss,
    node_loss_and_grad,
    node_solve,
)

IMPLICIT = [s for s in Scheme if s.implicit]
#: stage groups solved per step and the size of each group's system (in units of d)
GROUPS = {Scheme.BACKWARD_EULER: [1], Scheme.MIDPOINT: [1], Scheme.TRAPEZOIDAL: [1],
          Scheme.SDIRK2: [1, 1], Scheme.SDIRK3: [1, 1], Scheme.GAUSS2: [2]}


def _problem(width=4, depth=6, T=1.0, S=5, seed=3, activation="tanh"):
    net = ptoc.ResNet(width=width, depth=depth, T=T, activation=activation, n_in=width,
                      n_classes=2, opening="identity")
    rng = np.random.default_rng(seed)
    p = net.init_params(rng, scale=2.0)
    p.b[...] = 0.5 * rng.standard_normal(p.b.shape)
    return net, p, rng.standard_normal((S, width))


def test_the_implicit_schemes_are_the_ones_named():
    assert set(IMPLICIT) == set(GROUPS)
    assert not any(s.implicit for s in (Scheme.EULER, Scheme.HEUN, Scheme.RK4))
    assert [Scheme.parse(v).order for v in ("backward-euler", "midpoint", "trapezoidal",
                                             "sdirk2", "sdirk3", "gauss2")] == [1, 2, 2, 2, 3, 4]


@pytest.mark.parametrize("scheme", IMPLICIT)
def test_newton_solves_the_stage_equations_and_counts_its_systems(scheme):
    net, p, x = _problem(S=7)
    K, b, tau = p.K[0], p.b[0], 0.3
    count = SolveCount()
    Xs, As, ks = _stages(x, K, b, tau, scheme, net.activation, count)
    # the stage equations k_i = sigma(K X_i + b), X_i = x + tau sum_j A_ij k_j hold to round-off
    from ptoc.node import _TABLEAUS
    A = _TABLEAUS[scheme].A
    for i, row in enumerate(A):
        Xi = x + tau * sum(aij * ks[j] for j, aij in enumerate(row))
        assert np.max(np.abs(Xi - Xs[i])) <= 1e-14
        assert np.max(np.abs(ks[i] - np.tanh(Xs[i] @ K.T + b))) <= 1e-14
    # one system per sample and Newton update, of size (stages of the group) x d
    S, d = x.shape
    assert count.steps == 0 and count.newton_iterations >= len(GROUPS[scheme])
    assert count.linear_systems == S * count.newton_iterations
    per_update = {g * d for g in GROUPS[scheme]}
    assert len(per_update) == 1  # every group of a scheme has the same size here
    assert count.linear_cost == count.linear_systems * per_update.pop() ** 3
    # and a solve adds the steps
    sol = node_solve(net, p, x, scheme=scheme, substeps=3)
    assert sol.final_solves.steps == net.depth * 3 == sol.total_fine_steps
    assert sol.final_solves.newton_iterations >= net.depth * 3 * len(GROUPS[scheme])


def test_explicit_schemes_solve_no_systems():
    net, p, x = _problem()
    for scheme in (Scheme.EULER, Scheme.HEUN, Scheme.RK4):
        assert node_solve(net, p, x, scheme=scheme, substeps=2).final_solves == SolveCount(
            steps=2 * net.depth)


@pytest.mark.parametrize("scheme, substeps", [("backward-euler", (16, 32, 64)),
                                              ("midpoint", (8, 16, 32)),
                                              ("trapezoidal", (8, 16, 32)),
                                              ("sdirk2", (8, 16, 32)), ("sdirk3", (16, 32, 64)),
                                              ("gauss2", (4, 8, 16))])
def test_implicit_convergence_orders(scheme, substeps):
    net, p, x0 = _problem(depth=2)
    exact = node_solve(net, p, x0, scheme="rk4", substeps=1024).final_state
    errors = np.array([np.max(np.abs(node_solve(net, p, x0, scheme=scheme, substeps=m)
                                     .final_state - exact)) for m in substeps])
    slopes = np.log2(errors[:-1] / errors[1:])
    assert np.all(np.abs(slopes - Scheme.parse(scheme).order) < 0.15), slopes


@pytest.mark.parametrize("scheme", IMPLICIT)
@pytest.mark.parametrize("activation", ["tanh", "smoothrelu"])
def test_implicit_step_adjoint_dot_product_and_central_differences(scheme, activation):
    """The adjoint of the implicit step (the transposed stage system at the converged
    stages) is the transpose of its tangent, and both match central differences."""
    rng = np.random.default_rng(5)
    S, d, tau = 4, 3, 0.4
    x, dx, lam = (rng.standard_normal((S, d)) for _ in range(3))
    dK, db = rng.standard_normal((1, d, d)), rng.standard_normal((1, d))
    net = ptoc.ResNet(width=d, depth=1, T=tau, activation=activation, n_in=d, n_classes=2,
                      opening="identity")
    p = net.init_params(0)
    p.K[...], p.b[...] = rng.standard_normal((1, d, d)), rng.standard_normal((1, d))
    prop = RKPropagator(net, p, scheme=scheme)
    tangent = prop.tangent_step(0, x, dx)
    grad = prop.zero_gradient()
    lam0 = prop.adjoint_step(0, x, lam, grad)
    lhs, rhs = float(np.vdot(lam, tangent)), float(np.vdot(lam0, dx))
    assert abs(lhs - rhs) <= 1e-13 * (np.sum(np.abs(lam * tangent)) + np.sum(np.abs(lam0 * dx)))
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


@pytest.mark.parametrize("scheme", IMPLICIT)
def test_implicit_gradient_matches_central_differences(scheme):
    net = ptoc.ResNet(width=3, depth=3, T=1.5, n_in=2, n_classes=3)
    rng = np.random.default_rng(8)
    p = net.init_params(rng)
    p.b[...] = 0.5 * rng.standard_normal(p.b.shape)
    X, y = rng.standard_normal((4, 2)), np.arange(4) % 3
    _, grads, _ = node_loss_and_grad(net, p, X, y, scheme=scheme, substeps=2)
    eps = 1e-6
    for key in p:
        v = rng.standard_normal(p[key].shape)
        plus, minus = p.copy(), p.copy()
        plus[key][...] += eps * v
        minus[key][...] -= eps * v
        fd = (node_loss(net, plus, X, y, scheme=scheme, substeps=2)
              - node_loss(net, minus, X, y, scheme=scheme, substeps=2)) / (2 * eps)
        exact = float(np.vdot(grads[key], v))
        assert abs(fd - exact) <= 1e-6 * abs(exact) + 1e-9, (key, fd, exact)


@pytest.mark.parametrize("scheme", IMPLICIT)
def test_the_implicit_propagator_passes_the_checker(scheme):
    net, p, x0 = _problem(width=3, depth=4, T=2.0)
    prop = RKPropagator(net, p, np.arange(5) % 2, scheme=scheme, substeps=2)
    ptoc.check_propagator(prop, x0[:, :3], raise_on_failure=True)


def test_newton_non_convergence_is_an_error_naming_the_piece():
    # x' = tanh(-20 x + 0.3), d = 1: undamped Newton on backward Euler's stage with a
    # step of 0.5 cycles between the saturated branches of tanh
    net = ptoc.ResNet(width=1, depth=2, T=1.0, n_in=1, n_classes=2, opening="identity")
    p = net.zero_params()
    p.K[:], p.b[:] = -20.0, 0.3
    x0 = np.linspace(-2, 2, 9)[:, None]
    message = (rf"piece 0, substep 1 of 1: Newton's method for the backward-euler stages "
               rf"\(step 0.5\) did not converge in NEWTON_MAX_ITERATIONS="
               rf"{NEWTON_MAX_ITERATIONS} updates")
    with pytest.raises(NewtonConvergenceError, match=message):
        node_solve(net, p, x0, scheme="backward-euler")
    p.K[0] = -1.0  # the first piece is fine now, the second is not
    with pytest.raises(NewtonConvergenceError, match="piece 1, substep 1 of 2"):
        node_solve(net, p, x0, scheme="backward-euler", substeps=2)
    with pytest.raises(NewtonConvergenceError, match="did not converge"):  # and in parareal
        node_solve(net, p, x0, parareal=NODEParareal(2, schedule=("backward-euler",)))
    # smaller steps converge
    assert np.all(np.isfinite(node_solve(net, p, x0, scheme="backward-euler", substeps=4)
                              .final_state))


def test_parareal_with_implicit_coarse_and_fine_is_exact_and_counted():
    net, p, x0 = _problem(depth=12)
    P, m = 4, 2
    serial = node_solve(net, p, x0, scheme="gauss2", substeps=m)
    opts = NODEParareal(P, schedule=(("backward-euler", 1), ("midpoint", 1), ("gauss2", m)),
                        coarse_scheme="backward-euler", tol=0)
    sol = node_solve(net, p, x0, parareal=opts, keep_iterates=True)
    assert sol.substeps == m and sol.converged
    assert sol.schemes[:3] == [Scheme.BACKWARD_EULER, Scheme.MIDPOINT, Scheme.GAUSS2]
    assert sol.fine_substeps[:3] == [1, 1, m] and set(sol.fine_substeps[2:]) == {m}
    assert sol.iterations == 2 + P
    assert np.array_equal(sol.states, serial.states)
    # the record: steps match the step counts, systems are d x d or (2d) x (2d)
    S, d = x0.shape
    assert [c.steps for c in sol.fine_solves] == sol.fine_steps
    assert sol.fine_steps[:3] == [12, 12, 24]  # every chunk solved with 1, 1, m steps
    for c, s in zip(sol.fine_solves, sol.schemes, strict=True):
        n = (2 if s is Scheme.GAUSS2 else 1) * d
        assert c.linear_systems == S * c.newton_iterations
        assert c.linear_cost == c.linear_systems * n ** 3
    assert [c.steps for c in sol.coarse_solves] == sol.coarse_steps
    assert sol.coarse_steps[0] == 12 and sol.coarse_solves[0].linear_cost == \
        sol.coarse_solves[0].linear_systems * d ** 3 > 0
    record = sol.to_dict()
    assert record["fine_substeps"] == sol.fine_substeps
    assert record["coarse_solves"][0] == sol.coarse_solves[0].to_dict()
    # the coarse scheme is the coarse propagator: U^0 is the serial backward-Euler sweep
    coarse = node_solve(net, p, x0, scheme="backward-euler", substeps=1)
    assert np.array_equal(sol.iterates[0], coarse.states[sol.bounds])
    # an explicit fine schedule with an implicit coarse propagator works too
    mixed = node_solve(net, p, x0, substeps=1, parareal=NODEParareal(
        P, schedule=("heun", "rk4"), coarse_scheme="backward-euler", tol=0))
    assert np.array_equal(mixed.states, node_solve(net, p, x0, substeps=1).states)


def test_schedule_substeps_are_checked():
    net, p, x0 = _problem()
    opts = NODEParareal(2, schedule=(("midpoint", 2), ("gauss2", 4)))
    assert opts.fine_substeps == (2, 4) and opts.schedule == (Scheme.MIDPOINT, Scheme.GAUSS2)
    assert node_solve(net, p, x0, parareal=opts, substeps=4).substeps == 4
    with pytest.raises(ValueError, match="substeps=3 conflicts with the parareal schedule, "
                                         "whose last entry sets 4 steps per piece"):
        node_solve(net, p, x0, parareal=opts, substeps=3)
    mixed = NODEParareal(2, schedule=(("midpoint", 2), "gauss2"))
    assert node_solve(net, p, x0, parareal=mixed, substeps=3).fine_substeps[:2] == [2, 3]
    with pytest.raises(ValueError, match=r"the substeps of NODEParareal schedule entry "
                                         r"\('gauss2', 0\) must be a positive integer"):
        NODEParareal(2, schedule=(("gauss2", 0),))
    with pytest.raises(ValueError, match=r"must be a scheme or a \(scheme, substeps\) pair, "
                                         r"got \('gauss2', 1, 2\)"):
        NODEParareal(2, schedule=(("gauss2", 1, 2),))
    with pytest.raises(ValueError, match="unknown ODE scheme 'gauss3'"):
        NODEParareal(2, coarse_scheme="gauss3")
