"""Layer-parallel solvers against the serial sweep (docs/theory/parareal.md and
docs/theory/mgrit.md)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ptoc
from ptoc.parallel import (
    MGRIT,
    DivergenceError,
    Parareal,
    Serial,
    SimulatedRanks,
    mgrit_levels,
    partition,
)
from ptoc.parallel.driver import parallel_adjoint, parallel_gradient


def problem(width=4, depth=12, S=6, seed=0, act="tanh", T=1.0, scale=1.0, gammas=(1e-2,) * 3):
    rng = np.random.default_rng(seed)
    net = ptoc.ResNet(width=width, depth=depth, T=T, activation=act, n_in=3, n_classes=3,
                      gamma=gammas[0], gamma_t=gammas[1], gamma_c=gammas[2])
    params = net.init_params(rng, scale=scale)
    params.b[...] = rng.standard_normal(params.b.shape)
    X = rng.standard_normal((S, 3))
    y = rng.integers(0, 3, S)
    return net, params, X, y


def serial(net, params, X, y):
    fwd = ptoc.forward(net, params, X)
    loss, grads = ptoc.loss_and_grad(net, params, X, y)
    _, lam_N, _, _ = ptoc.objective.classifier_loss(params, fwd.final_state, y)
    adj = ptoc.adjoint(net, params, fwd, lam_N, keep_adjoints=True)
    return fwd.states, adj.adjoints, loss, grads


def rel(a, b):
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def grad_rel(g, ref):
    return max(rel(g[k], ref[k]) for k in ref)


# --- exactness properties ----------------------------------------------------------------------

@pytest.mark.parametrize("ranks", [1, 3])
def test_one_level_mgrit_is_the_serial_sweep_bitwise(ranks):
    net, params, X, y = problem(depth=10)
    states, lams, loss, grads = serial(net, params, X, y)
    r = parallel_gradient(net, params, X, y, MGRIT(max_levels=1), comm=ranks)
    assert np.array_equal(r.states, states) and np.array_equal(r.adjoints, lams)
    assert all(np.array_equal(r.grads[k], grads[k]) for k in grads) or ranks > 1
    assert r.forward.iterations == 1 and r.forward.levels == 1


@pytest.mark.parametrize("ranks", [1, 2, 5])
def test_serial_on_ranks_is_the_serial_sweep_bitwise(ranks):
    net, params, X, y = problem(depth=11)
    states, lams, loss, grads = serial(net, params, X, y)
    r = parallel_gradient(net, params, X, y, Serial(), comm=ranks)
    assert np.array_equal(r.states, states) and np.array_equal(r.adjoints, lams)
    for k in ("K", "b", "K_in", "b_in", "W", "mu"):
        assert rel(r.grads[k], grads[k]) < 1e-14  # regulariser sums split across ranks
    assert r.forward.steps_total == net.depth == r.forward.steps_critical_path


@pytest.mark.parametrize("P, N", [(3, 12), (4, 10), (5, 5)])
def test_parareal_is_exact_on_the_first_k_chunks_after_k_iterations(P, N):
    net, params, X, y = problem(depth=N, scale=1.5)
    states, *_ = serial(net, params, X, y)
    bounds = partition(N, P)
    for k in range(P + 1):
        fwd = ptoc.forward(net, params, X, solver=Parareal(chunks=P, max_iterations=k,
                                                           tol=0))
        exact_to = bounds[min(k + 1, P)]  # chunks 0..k run from exact boundaries
        assert np.array_equal(fwd.states[: exact_to + 1], states[: exact_to + 1]), k
        # the next chunk is not yet exact (unless it has one layer: then G_j = F_j)
        if exact_to < N and bounds[k + 2] - bounds[k + 1] > 1:
            assert not np.array_equal(fwd.states[exact_to + 1], states[exact_to + 1])
    assert np.array_equal(fwd.states, states)  # after P iterations: everywhere, bitwise


@pytest.mark.parametrize("coarse", ["inject", "average"])
def test_two_level_mgrit_with_f_relaxation_gives_the_parareal_iterates(coarse):
    m, P = 4, 5
    net, params, X, y = problem(depth=m * P, scale=1.5)
    for k in (1, 2, 3):
        par = ptoc.forward(net, params, X, solver=Parareal(chunks=P, coarse=coarse,
                                                           max_iterations=k, tol=0))
        mg = ptoc.forward(net, params, X, solver=MGRIT(
            coarsening=m, max_levels=2, relaxation="F", nested_iteration=True,
            coarse_weights=coarse, max_iterations=k, tol=0))
        assert mg.solve.iterations == par.solve.iterations == k
        f_points = [n for n in range(net.depth + 1) if n % m]  # the fine trajectories
        assert rel(mg.states[f_points], par.states[f_points]) < 1e-13
        serial_states = ptoc.forward(net, params, X).states
        assert rel(mg.states[f_points], serial_states[f_points]) > 1e-8 or k >= P


def test_fcf_makes_two_more_c_points_exact_per_iteration():
    m, n_c = 3, 8
    net, params, X, y = problem(depth=m * n_c, scale=1.5)
    states = ptoc.forward(net, params, X).states
    for k in (1, 2, 3):
        fwd = ptoc.forward(net, params, X, solver=MGRIT(
            coarsening=m, max_levels=2, relaxation="FCF", max_iterations=k, tol=0))
        err = np.max(np.abs(fwd.states - states), axis=(1, 2)) / np.max(np.abs(states))
        c_exact = 2 * k  # C-points 0..2k
        assert np.all(err[: c_exact * m + 1] < 1e-13), (k, err[: c_exact * m + 1].max())
        assert err[(c_exact + 1) * m] > 1e-10  # the next C-point is not yet exact
    with_f = ptoc.forward(net, params, X, solver=MGRIT(
        coarsening=m, max_levels=2, relaxation="F", max_iterations=2, tol=0))
    err_f = np.max(np.abs(with_f.states - states), axis=(1, 2)) / np.max(np.abs(states))
    assert err_f[3 * m] > 1e-10  # F-relaxation alone: only one more per iteration


# --- convergence to the serial solution --------------------------------------------------------

@given(depth=st.integers(2, 24), m=st.integers(2, 5), ranks=st.integers(1, 4),
       levels=st.integers(2, 5), cycle=st.sampled_from(["V", "F"]),
       relax=st.sampled_from(["F", "FCF"]), weights=st.sampled_from(["inject", "average"]),
       seed=st.integers(0, 10_000))
def test_mgrit_converges_to_the_serial_gradient(depth, m, ranks, levels, cycle, relax, weights,
                                                seed):
    ranks = min(ranks, depth)
    net, params, X, y = problem(depth=depth, seed=seed)
    states, lams, loss, grads = serial(net, params, X, y)
    solver = MGRIT(coarsening=m, max_levels=levels, min_coarse_steps=1, cycle=cycle,
                   relaxation=relax, coarse_weights=weights, tol=1e-14, max_iterations=60)
    r = parallel_gradient(net, params, X, y, solver, comm=ranks)
    assert r.forward.converged and r.adjoint.converged
    assert rel(r.states, states) < 1e-10 and rel(r.adjoints, lams) < 1e-10
    assert abs(r.loss - loss) < 1e-10 * abs(loss) and grad_rel(r.grads, grads) < 1e-10


@given(depth=st.integers(2, 24), m=st.integers(2, 4), ranks=st.integers(1, 4),
       levels=st.integers(2, 4), cycle=st.sampled_from(["V", "F"]),
       relax=st.sampled_from(["F", "FCF"]), nested=st.booleans(),
       iterations=st.integers(1, 3))
def test_mgrit_reads_no_buffer_before_writing_it(depth, m, ranks, levels, cycle, relax, nested,
                                                 iterations):
    """Reused buffers have undefined content: with every buffer handed out full of NaN,
    an MGRIT gradient (states, adjoints, residual histories) has the same bits as with
    fresh ones, on any layout, cycle, relaxation and number of iterations."""
    from ptoc import _workspace

    ranks = min(ranks, depth)
    net, params, X, y = problem(depth=depth, seed=depth + m)
    solver = MGRIT(coarsening=m, max_levels=levels, min_coarse_steps=1, cycle=cycle,
                   relaxation=relax, nested_iteration=nested, tol=0,
                   max_iterations=iterations)
    clean = parallel_gradient(net, params, X, y, solver, comm=ranks)
    get = _workspace.Workspace.get

    def poisoned(self, name, shape, dtype):
        buf = get(self, name, shape, dtype)
        if np.issubdtype(buf.dtype, np.floating):
            buf.fill(np.nan)
        return buf

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_workspace.Workspace, "get", poisoned)
        dirty = parallel_gradient(net, params, X, y, solver, comm=ranks)
    assert np.array_equal(clean.states, dirty.states)
    assert np.array_equal(clean.adjoints, dirty.adjoints)
    assert all(np.array_equal(clean.grads[k], dirty.grads[k]) for k in clean.grads)
    assert clean.forward.residuals == dirty.forward.residuals
    assert clean.adjoint.residuals == dirty.adjoint.residuals


@given(depth=st.integers(1, 20), chunks=st.integers(1, 6), seed=st.integers(0, 10_000),
       coarse=st.sampled_from(["inject", "average"]))
def test_parareal_converges_to_the_serial_gradient(depth, chunks, seed, coarse):
    chunks = min(chunks, depth)
    net, params, X, y = problem(depth=depth, seed=seed)
    states, lams, loss, grads = serial(net, params, X, y)
    r = parallel_gradient(net, params, X, y, Parareal(chunks=chunks, coarse=coarse, tol=1e-14))
    assert r.forward.iterations <= chunks and r.adjoint.iterations <= chunks
    assert rel(r.states, states) < 1e-10 and rel(r.adjoints, lams) < 1e-10
    assert grad_rel(r.grads, grads) < 1e-10


def test_errors_decrease_as_iterations_grow():
    net, params, X, y = problem(depth=32, scale=1.2, S=8)
    states, lams, loss, grads = serial(net, params, X, y)
    errors = []
    for k in (1, 2, 4, 8):
        r = parallel_gradient(net, params, X, y, MGRIT(coarsening=2, max_iterations=k,
                                                       tol=0))
        errors.append((rel(r.states, states), rel(r.adjoints, lams), grad_rel(r.grads, grads)))
    for quantity in zip(*errors, strict=True):
        assert all(b < a for a, b in zip(quantity, quantity[1:], strict=False))
    assert errors[-1][2] < 1e-8


def test_residual_history_is_recorded_and_decreases():
    net, params, X, y = problem(depth=64, S=8)
    fwd = ptoc.forward(net, params, X, solver=MGRIT(coarsening=4, tol=1e-12))
    res = fwd.solve.residuals
    assert fwd.solve.converged and len(res) == fwd.solve.iterations and res[-1] <= 1e-12
    assert all(b < a for a, b in zip(res, res[1:], strict=False))


def test_warm_start_from_the_solution_converges_at_once():
    net, params, X, y = problem(depth=32)
    states = ptoc.forward(net, params, X).states
    fwd = ptoc.forward(net, params, X, solver=MGRIT(coarsening=4, tol=1e-12),
                       initial_guess=states)
    assert fwd.solve.iterations == 1
    cold = ptoc.forward(net, params, X, solver=MGRIT(coarsening=4, tol=1e-12))
    assert cold.solve.iterations > 1


# --- ranks -------------------------------------------------------------------------------------

@pytest.mark.parametrize("solver", [MGRIT(coarsening=3, max_iterations=3, tol=0),
                                    MGRIT(coarsening=2, cycle="F", coarse_weights="average",
                                          max_iterations=2, tol=0)])
def test_results_do_not_depend_on_the_number_of_ranks(solver):
    net, params, X, y = problem(depth=17)
    results = [parallel_gradient(net, params, X, y, solver, comm=p) for p in (1, 2, 3, 7)]
    for r in results[1:]:
        assert np.array_equal(r.states, results[0].states)
        assert np.array_equal(r.adjoints, results[0].adjoints)
        assert grad_rel(r.grads, results[0].grads) < 1e-14


@given(depth=st.integers(2, 30), seed=st.integers(0, 2**31),
       rule=st.sampled_from(["inject", "average"]))
def test_stacked_coarse_weights_are_those_of_each_range(depth, seed, rule):
    # the one-rank fast path (a few array operations for a whole level) gives the bits
    # of the per-range rule that ranks holding other layers use
    from ptoc.parallel.comm import SingleRank
    from ptoc.parallel.options import CoarseWeights
    from ptoc.parallel.problem import SweepProblem
    from ptoc.propagator import ResNetPropagator

    rng = np.random.default_rng(seed)
    net, params, X, y = problem(depth=depth, seed=seed % 1000)
    cuts = np.unique(np.concatenate([[0, depth], rng.integers(0, depth, rng.integers(1, 6))]))
    starts, ends = cuts[:-1], cuts[1:]
    order = rng.permutation(len(starts))
    starts, ends = starts[order], ends[order]
    prob = SweepProblem(SingleRank(), ResNetPropagator(net, params), partition(depth, 1),
                        backward=False)
    prob.gather_coarse_weights([list(zip(starts.tolist(), ends.tolist(), strict=True))],
                               CoarseWeights.parse(rule))
    K, b = prob.coarse_weight_stack(starts, ends)
    for j, (s, e) in enumerate(zip(starts.tolist(), ends.tolist(), strict=True)):
        theta = prob.coarse_weights(s, e)
        assert np.array_equal(K[j], theta[0]) and np.array_equal(b[j], theta[1])
        want = params.K[s] if rule == "inject" else params.K[s:e].mean(axis=0)
        assert np.allclose(theta[0], want, rtol=1e-14, atol=1e-15)


def test_critical_path_shrinks_with_ranks():
    net, params, X, y = problem(depth=64, S=4)
    paths = []
    for p in (1, 2, 4, 8):
        fwd = ptoc.forward(net, params, X, solver=MGRIT(coarsening=4, tol=1e-10), comm=p)
        assert fwd.solve.ranks == p
        paths.append(fwd.solve.steps_critical_path)
        if p == 1:
            assert fwd.solve.steps_total == fwd.solve.steps_critical_path
    assert all(b < a for a, b in zip(paths, paths[1:], strict=False))


def test_each_rank_uses_only_its_own_layers():
    from ptoc.propagator import LayerSlice, ResNetPropagator

    net, params, X, y = problem(depth=6)
    piece = ResNetPropagator(net, params).layer_slice(2, 4)
    assert isinstance(piece, LayerSlice) and (piece.start, piece.stop) == (2, 4)
    piece.step(2, np.zeros((2, net.width)))
    with pytest.raises(IndexError, match="layer 4 is not held here"):
        piece.step(4, np.zeros((2, net.width)))
    assert piece.parameters()[0].shape[0] == 2


def test_mgrit_levels():
    assert [len(p) - 1 for p in mgrit_levels(1024, 4, 10, 1)] == [1024, 256, 64, 16, 4, 1]
    assert [len(p) - 1 for p in mgrit_levels(1024, 4, 10, 2)] == [1024, 256, 64, 16, 4]
    lv = mgrit_levels(10, 4, 3, 1)
    assert lv[1].tolist() == [0, 4, 8, 10] and lv[2].tolist() == [0, 10]


# --- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("make, match", [
    (lambda: MGRIT(coarsening=1), "coarsening factor m must be an integer >= 2"),
    (lambda: MGRIT(tol=-1e-3), "MGRIT tol must be a finite number >= 0"),
    (lambda: MGRIT(tol=float("nan")), "MGRIT tol must be a finite number >= 0"),
    (lambda: MGRIT(max_levels=0), "max_levels"),
    (lambda: MGRIT(relaxation="FF"), "unknown relaxation"),
    (lambda: MGRIT(cycle="W"), "unknown cycle"),
    (lambda: Parareal(chunks=0), "chunks"),
    (lambda: Parareal(tol=-1.0), "Parareal tol must be a finite number >= 0"),
    (lambda: Parareal(coarse="median"), "unknown coarse-weight rule"),
])
def test_bad_options_are_named(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_layouts_are_named_on_every_rank():
    net, params, X, y = problem(depth=4)
    with pytest.raises(ValueError, match=r"Parareal\(chunks=5\) needs at most 4"):
        ptoc.loss_and_grad(net, params, X, y, solver=Parareal(chunks=5))
    with pytest.raises(ValueError, match="5 ranks for 4 layers"):
        ptoc.loss_and_grad(net, params, X, y, solver=MGRIT(coarsening=2), comm=5)
    with pytest.raises(ValueError, match=r"Parareal\(chunks=2\) runs one chunk per rank, but "
                                         "the communicator has 3"):
        ptoc.loss_and_grad(net, params, X, y, solver=Parareal(chunks=2), comm=3)
    with pytest.raises(ValueError, match="cannot coarsen"):
        ptoc.loss_and_grad(net, params, X, y, solver=MGRIT(coarsening=4, max_levels=3,
                                                           min_coarse_steps=2))
    with pytest.raises(TypeError, match="pass an instance"):
        ptoc.loss_and_grad(net, params, X, y, solver=MGRIT)


def test_bad_initial_guess_is_named():
    net, params, X, y = problem(depth=6)
    guess = np.zeros((7, X.shape[0], net.width))
    guess[3, 0, 0] = np.nan
    with pytest.raises(ValueError, match="initial_guess contains non-finite"):
        ptoc.forward(net, params, X, solver=MGRIT(coarsening=2), initial_guess=guess)
    with pytest.raises(ValueError, match="initial_guess has shape"):
        ptoc.forward(net, params, X, solver=MGRIT(coarsening=2), initial_guess=guess[:3])


def test_divergence_stops_with_a_clear_error():
    # an unstable coarse step (huge weights, T large): MGRIT's residual grows
    net, params, X, y = problem(depth=64, T=40.0, scale=6.0, act="relu", gammas=(0, 0, 0))
    with pytest.raises(DivergenceError, match="MGRIT diverged"):
        ptoc.forward(net, params, X, solver=MGRIT(coarsening=8, max_levels=2,
                                                  relaxation="F", max_iterations=30))


def test_a_failing_rank_does_not_hang_the_others():
    def program(comm):
        if comm.rank == 1:
            raise RuntimeError("rank 1 broke")
        return comm.recv(1, 99)  # would wait forever without failure propagation

    with pytest.raises(RuntimeError, match="rank 1 broke"):
        SimulatedRanks(3, timeout=30).run(program)


# --- any propagator ---------------------------------------------------------------------------

class LinearODE(ptoc.Propagator):
    """A user-written propagator: x_{n+1} = x_n + h x_n A_n^T, with coarse steps."""

    def __init__(self, A, h=0.05):
        self.A, self.h, self.n_layers = A, h, A.shape[0]

    def step(self, n, x):
        return x + self.h * x @ self.A[n].T

    def adjoint_step(self, n, x, lam, grad=None):
        if grad is not None:
            grad[0][n] += self.h * lam.T @ x
        return lam + self.h * lam @ self.A[n]

    def objective(self, x):
        return 0.5 * float(np.sum(x * x))

    def objective_gradient(self, x):
        return x

    def parameters(self):
        return [self.A]

    def layer_parameters(self, n):
        return (self.A[n],)

    def coarse_step(self, params, n_layers, x):
        return x + n_layers * self.h * x @ params[0].T

    def coarse_adjoint_step(self, params, n_layers, x, lam):
        return lam + n_layers * self.h * lam @ params[0]


@pytest.mark.parametrize("solver, ranks", [
    (MGRIT(coarsening=3, tol=1e-13), 1), (MGRIT(coarsening=2, cycle="F", tol=1e-13), 3),
    (Parareal(chunks=4, coarse="average", tol=1e-13), None), (Serial(), 2)])
def test_solvers_work_on_a_user_written_propagator(solver, ranks):
    from ptoc.parallel import solve_adjoints, solve_states

    rng = np.random.default_rng(5)
    prop = LinearODE(rng.standard_normal((17, 3, 3)))
    x0 = rng.standard_normal((4, 3))
    ref = np.empty((18, 4, 3))
    prop.propagate(x0, states=ref)
    states, rec = solve_states(prop, x0, solver, comm=ranks)
    assert rel(states, ref) < 1e-12 and rec.converged
    lam_N = prop.objective_gradient(ref[-1])
    lams, grad, arec = solve_adjoints(prop, ref, lam_N, solver, comm=ranks)
    g_ref = prop.zero_gradient()
    lam0 = prop.adjoint_propagate(ref, lam_N, grad=g_ref)
    assert rel(lams[0], lam0) < 1e-12 and rel(grad[0], g_ref[0]) < 1e-12


def test_parareal_accepts_a_coarse_network_or_a_function():
    P, N = 4, 16
    net, params, X, y = problem(depth=N)
    states, lams, loss, grads = serial(net, params, X, y)
    # a coarse ResNet with one layer per chunk: the chunks' first-layer weights
    coarse_net = ptoc.ResNet(width=net.width, depth=P, T=net.T, n_in=3, n_classes=3)
    cparams = coarse_net.init_params(0)
    cparams.K[...] = params.K[::N // P]
    cparams.b[...] = params.b[::N // P]
    coarse = ptoc.ResNetPropagator(coarse_net, cparams)
    r = parallel_gradient(net, params, X, y, Parareal(chunks=P, coarse=coarse, tol=1e-14))
    builtin = parallel_gradient(net, params, X, y, Parareal(chunks=P, tol=1e-14))
    assert r.forward.iterations == builtin.forward.iterations
    assert grad_rel(r.grads, grads) < 1e-10
    fwd = ptoc.forward(net, params, X, solver=Parareal(chunks=P, coarse=coarse.step, tol=1e-14))
    assert rel(fwd.states, states) < 1e-12
    with pytest.raises(TypeError, match="adjoint sweep needs the coarse propagator's adjoint"):
        ptoc.loss_and_grad(net, params, X, y, solver=Parareal(chunks=P, coarse=coarse.step))


@pytest.mark.cuda
def test_cuda_target_through_the_solvers():
    net, params, X, y = problem(depth=6, S=3, width=3)
    loss, grads = ptoc.loss_and_grad(net, params, X, y)
    loss_c, grads_c = ptoc.loss_and_grad(net, params, X, y, target="cuda", comm=2,
                                         solver=MGRIT(coarsening=2, tol=1e-13))
    assert grad_rel(grads_c, grads) < 1e-10


def test_public_adjoint_runs_the_requested_solver():
    """``ptoc.adjoint(..., solver=, comm=, initial_guess=)`` solves layer-parallel (it once
    ignored these and ran the serial sweep)."""
    net = ptoc.ResNet(width=4, depth=12, n_in=3, n_classes=3)
    p = net.init_params(0, scale=1.5)
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((6, 3)), rng.integers(0, 3, 6)
    fwd = ptoc.forward(net, p, X)
    _, lam_N, _, _ = ptoc.objective.classifier_loss(p, fwd.final_state, y)
    serial = ptoc.adjoint(net, p, fwd, lam_N, keep_adjoints=True)
    rough = ptoc.Parareal(chunks=3, max_iterations=0, tol=0)
    one = ptoc.adjoint(net, p, fwd, lam_N, solver=rough, comm=3)
    lams, gK, gb, _ = parallel_adjoint(net, p, fwd.states, lam_N, rough, comm=3)
    assert one.solve is not None and one.solve.iterations == 0
    assert np.array_equal(one.adjoints, lams) and np.array_equal(one.grad_K, gK)
    assert np.max(np.abs(one.adjoints - serial.adjoints)) > 1e-3  # not the serial sweep
    exact = ptoc.adjoint(net, p, fwd, lam_N, solver=ptoc.MGRIT(coarsening=2, tol=1e-13),
                         comm=2, initial_guess=one)
    assert exact.solve.converged
    np.testing.assert_allclose(exact.adjoints, serial.adjoints, rtol=0, atol=1e-12)
    np.testing.assert_allclose(exact.grad_K, serial.grad_K, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(exact.initial_adjoint, exact.adjoints[0])
    with pytest.raises(ValueError, match="all states"):
        ptoc.adjoint(net, p, ptoc.forward(net, p, X, checkpoint_every=4), lam_N, solver=rough)
    bare = ptoc.adjoint(net, p, fwd, lam_N)  # serial, without its adjoints
    with pytest.raises(ValueError, match="keep_adjoints=True"):
        ptoc.adjoint(net, p, fwd, lam_N, solver=rough, comm=2, initial_guess=bare)
    warm = ptoc.adjoint(net, p, fwd, lam_N, solver=ptoc.MGRIT(coarsening=2, max_iterations=1,
                                                                 tol=0),
                        initial_guess=serial)
    np.testing.assert_allclose(warm.adjoints, serial.adjoints, rtol=0, atol=1e-13)


@pytest.mark.parametrize("solver", [ptoc.MGRIT(coarsening=2, tol=1e-13), ptoc.Parareal(chunks=2)])
def test_layer_parallel_gradient_with_identity_opening_and_classifier_weight(solver):
    """An identity opening has no K_in, b_in; with gamma_c > 0 the parallel gradient once
    raised KeyError: 'K_in'."""
    net = ptoc.ResNet(width=4, depth=8, n_in=4, n_classes=3, opening="identity", gamma_c=1e-2)
    p = net.init_params(0)
    rng = np.random.default_rng(1)
    X, y = rng.standard_normal((5, 4)), rng.integers(0, 3, 5)
    loss, grads = ptoc.loss_and_grad(net, p, X, y, solver=solver, comm=2)
    ref_loss, ref = ptoc.loss_and_grad(net, p, X, y)
    assert loss == pytest.approx(ref_loss, rel=1e-12)
    for k in ref:
        np.testing.assert_allclose(grads[k], ref[k], rtol=0, atol=1e-12)


@settings(max_examples=12)
@given(P=st.integers(2, 4), depth=st.integers(4, 14), seed=st.integers(0, 10**6),
       which=st.sampled_from(["mgrit-fcf", "mgrit-f-2it", "parareal", "serial"]))
def test_a_rank_reads_only_its_own_layers(P, depth, seed, which):
    """A rank holds only its layers' parameters. Poisoning every other layer's
    K_n, b_n on each rank (1e300) leaves the loss and gradient bitwise unchanged: foreign
    layers (coarse weights, the regulariser's neighbours) arrive only as messages. The
    head (W, mu, K_in, b_in) is replicated on every rank."""
    from ptoc.parallel.driver import _bounds, _gradient_program

    solver = {"mgrit-fcf": MGRIT(coarsening=2, tol=1e-13),
              "mgrit-f-2it": MGRIT(coarsening=3, relaxation="F", max_iterations=2, tol=1e-13),
              "parareal": Parareal(chunks=P, coarse="average"), "serial": Serial()}[which]
    net = ptoc.ResNet(width=3, depth=depth, n_in=2, n_classes=3, gamma=1e-2, gamma_t=1e-2,
                      gamma_c=1e-2)
    p = net.init_params(seed % 97)
    rng = np.random.default_rng(seed)
    X, y = rng.standard_normal((5, 2)), rng.integers(0, 3, 5)
    ref = parallel_gradient(net, p, X, y, solver, comm=P)

    def program(c):
        _, a, b = _bounds(c, depth)
        local = p.copy()
        foreign = np.ones(depth, bool)
        foreign[a:b] = False
        local.K[foreign], local.b[foreign] = 1e300, -1e300
        return _gradient_program(c, net, local, X, y, solver, "cpu", None, None)

    for got in SimulatedRanks(P).run(program):
        assert got.loss == ref.loss
        for k in ref.grads:
            assert np.array_equal(got.grads[k], ref.grads[k]), k


def _slices(p, depth, P):
    """``rank -> that rank's slice``: copies of its layers only, and the head."""
    from ptoc.parallel import owned_layers

    def for_rank(r):
        a, b = owned_layers(depth, P, r)
        return ptoc.Params(K=p.K[a:b].copy(), b=p.b[a:b].copy(), K_in=p.K_in, b_in=p.b_in,
                           W=p.W, mu=p.mu)
    return for_rank


@settings(max_examples=12)
@given(P=st.integers(1, 4), depth=st.integers(4, 14), seed=st.integers(0, 10**6),
       opening=st.sampled_from(["dense", "identity"]),
       which=st.sampled_from(["mgrit-fcf", "mgrit-f-2it", "parareal", "serial"]))
def test_local_gradient_equals_the_full_parameter_run_bitwise(P, depth, seed, opening, which):
    """With ``local_gradient`` each rank is given only its own layers (the full
    K, b never exist on it); loss, head gradient and records equal those of
    ``parallel_gradient`` with the full parameters, and the layer gradients, stacked in
    rank order, equal the full gradient, bit for bit."""
    from ptoc.parallel import local_gradient, owned_layers

    solver = {"mgrit-fcf": MGRIT(coarsening=2, tol=1e-13),
              "mgrit-f-2it": MGRIT(coarsening=3, relaxation="F", max_iterations=2, tol=1e-13),
              "parareal": Parareal(coarse="average"), "serial": Serial()}[which]
    net = ptoc.ResNet(width=3, depth=depth, n_in=3 if opening == "identity" else 2,
                      n_classes=3, opening=opening, gamma=1e-2, gamma_t=1e-2, gamma_c=1e-2)
    p = net.init_params(seed % 97)
    rng = np.random.default_rng(seed)
    X, y = rng.standard_normal((5, net.n_in)), rng.integers(0, 3, 5)
    ref = parallel_gradient(net, p, X, y, solver, comm=P)
    got = local_gradient(net, _slices(p, depth, P), X, y, solver, comm=P)
    assert len(got) == P
    for r, g in enumerate(got):
        assert g.layers == owned_layers(depth, P, r)
        assert g.grads.K.shape[0] == g.layers[1] - g.layers[0]
        assert g.states is None and g.adjoints is None
        assert g.loss == ref.loss
        assert g.forward.residuals == ref.forward.residuals
        assert g.adjoint.iterations == ref.adjoint.iterations
        for k in ("W", "mu", "K_in", "b_in"):
            mine, full = getattr(g.grads, k), getattr(ref.grads, k)
            assert (mine is None and full is None) or np.array_equal(mine, full), k
    for k in ("K", "b"):
        assert np.array_equal(np.concatenate([g.grads[k] for g in got]), ref.grads[k]), k


def test_local_gradient_on_one_rank_takes_the_whole_network():
    from ptoc.parallel import local_gradient

    net, p, X, y = problem(depth=6)
    got = local_gradient(net, p, X, y, MGRIT(coarsening=2, tol=1e-13))
    loss, grads = ptoc.loss_and_grad(net, p, X, y)
    assert got.layers == (0, 6) and got.loss == pytest.approx(loss, rel=1e-12)
    np.testing.assert_allclose(got.grads.K, grads.K, rtol=0, atol=1e-12)


def test_local_gradient_names_the_rank_with_a_bad_slice_on_every_rank(monkeypatch):
    """A wrong slice on one rank is an error on every rank (a rank that went on would
    wait for the failed one forever), raised before any sweep starts, naming the rank."""
    import ptoc.parallel.driver as drv
    from ptoc.parallel import local_gradient

    net, p, X, y = problem(depth=7)
    good = _slices(p, 7, 3)  # layers 0..2, 3..4, 5..6

    def bad(r):
        s = good(r)
        if r == 1:
            s.K = s.K[:-1]  # one layer short
        return s

    started = []
    real = drv._gradient_program
    monkeypatch.setattr(drv, "_gradient_program",
                        lambda *a, **k: started.append(1) or real(*a, **k))
    with pytest.raises(ValueError, match=r"rank 1: params\['K'\] has shape \(1, 4, 4\), "
                                         r"expected \(2, 4, 4\) \(layers 3\.\.4\)"):
        local_gradient(net, bad, X, y, Serial(), comm=3)
    assert started == []  # no rank went past the check

    def nan(r):
        s = good(r)
        if r == 2:
            s.b = np.full_like(s.b, np.nan)
        return s

    with pytest.raises(ValueError, match=r"rank 2: params\['b'\] contains non-finite"):
        local_gradient(net, nan, X, y, Serial(), comm=3)
    assert started == []
    local_gradient(net, good, X, y, Serial(), comm=3)
    assert started == [1, 1, 1]  # the spy sees the ranks that do start


def test_local_gradient_bad_arguments():
    from ptoc.parallel import local_gradient

    net, p, X, y = problem(depth=6)
    slices = _slices(p, 6, 2)
    with pytest.raises(TypeError, match="params must be a function rank -> that rank's slice"):
        local_gradient(net, slices(0), X, y, Serial(), comm=2)
    with pytest.raises(ValueError, match="needs the labels"):
        local_gradient(net, slices, X, None, Serial(), comm=2)

    def broken(r):  # any failure of the user's function is reported on every rank
        if r == 1:
            raise KeyError("no such layer file")
        return slices(r)

    with pytest.raises(ValueError, match="rank 1: KeyError: 'no such layer file'"):
        local_gradient(net, broken, X, y, Serial(), comm=2)


@pytest.mark.parametrize("args, message", [
    ((10, 0, 0), "n_ranks must be a positive integer"),
    ((10, 3, 3), r"rank must be an integer in \[0, 3\)"),
    ((2, 3, 0), "cannot spread 2 layers over 3 ranks"),
])
def test_owned_layers_bad_input(args, message):
    from ptoc.parallel import owned_layers

    with pytest.raises(ValueError, match=message):
        owned_layers(*args)
    assert owned_layers(10, 3, 0) == (0, 4) and owned_layers(10, 3, 2) == (7, 10)


@pytest.mark.parametrize("solver, extra", [
    (Parareal(chunks=3, max_iterations=2, tol=0), 1),
    (Parareal(chunks=3, tol=1e-13), 1),
    (MGRIT(coarsening=2, max_iterations=2, tol=0), 0),
    (MGRIT(coarsening=2, tol=1e-13), 0),
])
def test_residual_history_length_is_as_documented(solver, extra):
    """SolveResult.residuals: parareal also records its iteration 0 (the coarse
    prediction), MGRIT records one value per cycle; the last is the returned solution's."""
    net, params, X, y = problem(depth=9)
    r = parallel_gradient(net, params, X, y, solver, comm=3)
    for rec in (r.forward, r.adjoint):
        assert len(rec.residuals) == rec.iterations + extra
        assert rec.converged == (rec.residuals[-1] <= solver.tol)


def test_solvers_that_coarsen_refuse_a_propagator_without_coarse_grid_before_any_step():
    from ptoc.parallel import solve_adjoints, solve_states

    class Counting(LinearODE):
        steps = 0
        # LinearODE's coarse grid taken away again
        layer_parameters = ptoc.Propagator.layer_parameters
        coarse_step = ptoc.Propagator.coarse_step
        coarse_adjoint_step = ptoc.Propagator.coarse_adjoint_step

        def step(self, n, x):
            Counting.steps += 1
            return super().step(n, x)

    rng = np.random.default_rng(0)
    prop = Counting(rng.standard_normal((8, 2, 2)))
    assert not prop.has_coarse_grid
    x0 = rng.standard_normal((3, 2))
    for solver, what in ((MGRIT(coarsening=2), "MGRIT with 10 levels coarsens"),
                         (Parareal(chunks=2), "Parareal\\(coarse='inject'\\) builds coarse")):
        with pytest.raises(TypeError, match=what + ".*Counting has no coarse grid"):
            solve_states(prop, x0, solver)
        with pytest.raises(TypeError, match=what):
            solve_adjoints(prop, np.zeros((9, 3, 2)), x0, solver)
    assert Counting.steps == 0
    # the serial sweep and one-level MGRIT need no coarse grid
    states, _ = solve_states(prop, x0, MGRIT(max_levels=1), comm=2)
    np.testing.assert_array_equal(states, solve_states(prop, x0, Serial())[0])


def test_a_user_written_strategy_runs_through_the_drivers():
    """The drivers ask the strategy object to solve; they do not know the three built-in
    ones: a strategy written here (the serial pipeline, counting its calls) works."""
    from dataclasses import dataclass

    from ptoc.parallel import SweepSolver
    from ptoc.parallel.serial import serial_pipeline

    calls = []

    @dataclass(frozen=True)
    class Pipeline(SweepSolver):
        name = "pipeline"

        def solve_sweep(self, comm, problem, u0, shape, dtype, guess=None):
            from ptoc.parallel.options import SweepOutcome

            calls.append((comm.rank, problem.backward))
            return SweepOutcome(serial_pipeline(comm, problem, u0, shape, dtype), True, 1, [])

    net, params, X, y = problem(depth=6)
    r = parallel_gradient(net, params, X, y, Pipeline(), comm=3)
    loss, grads = ptoc.loss_and_grad(net, params, X, y)
    assert r.forward.method == "pipeline" and r.forward.ranks == 3
    assert sorted(calls) == [(k, b) for k in range(3) for b in (False, True)]
    np.testing.assert_allclose(r.loss, loss, rtol=1e-14)
    np.testing.assert_allclose(r.grads.K, grads.K, rtol=1e-12, atol=1e-15)
    assert ptoc.parallel.check_solver(Pipeline()) is not None
    with pytest.raises(TypeError, match="pass an instance"):
        ptoc.parallel.check_solver(Pipeline)


def test_every_comm_argument_is_resolved_by_one_function():
    """Solvers and PGCL read ``comm=`` the same way (ptoc.parallel.comm.resolve_ranks)."""
    from ptoc.parallel.comm import SingleRank, resolve_ranks
    from ptoc.pgcl import PGCL

    assert isinstance(resolve_ranks(None), SingleRank)
    assert resolve_ranks(None, default=3).size == 3
    assert isinstance(resolve_ranks(1), SimulatedRanks) and resolve_ranks(np.int64(4)).size == 4
    assert isinstance(resolve_ranks(1, one_is_single=True), SingleRank)
    ranks = SimulatedRanks(2)
    assert resolve_ranks(ranks) is ranks
    for bad in (0, -2):
        with pytest.raises(ValueError, match="PGCL comm must be a positive number"):
            PGCL(comm=bad)
        with pytest.raises(ValueError, match="comm must be a positive number"):
            ptoc.loss_and_grad(*problem(depth=4), solver=MGRIT(max_levels=1), comm=bad)
    for bad in (True, 2.0, "two"):
        with pytest.raises(ValueError, match="PGCL comm must be None"):
            PGCL(comm=bad)
        with pytest.raises(ValueError, match="comm must be None"):
            ptoc.loss_and_grad(*problem(depth=4), solver=MGRIT(max_levels=1), comm=bad)


def test_the_parareal_core_takes_a_fine_propagator_per_iteration_and_a_stopping_rule():
    """PararealSolve's hooks (the parareal neural ODE of ptoc.node uses them): ``fine(k,
    last)`` is the fine propagator of the sweep from U^k, a rule that tests before that
    sweep stops the solve, and the last sweep uses ``fine(K, True)``. Checked against the
    recurrence written out, bit for bit, with the work records."""
    from ptoc.parallel.parareal import PararealRule, PararealSolve
    from ptoc.parallel.problem import SweepProblem

    P, N, K = 3, 8, 2
    rng = np.random.default_rng(3)
    early, late = (LinearODE(rng.standard_normal((N, 3, 3))) for _ in range(2))
    x0 = rng.standard_normal((4, 3))
    bounds = partition(N, P)
    asked = []

    def fine(k, last):
        asked.append((k, last))
        return late if last or k >= 1 else early

    class StopAt(PararealRule):
        tests_fine_sweep = False

        def __init__(self):
            self.residuals = []

        def check(self, comm, it):
            assert it.fine_end is None
            self.residuals.append(float(it.k))
            return it.k == K

    def program(comm):
        problem = SweepProblem(comm, late, bounds, backward=False)
        run = PararealSolve(comm, problem, Parareal(max_iterations=5),
                            x0 if comm.rank == 0 else None, x0.shape, x0.dtype, fine=fine,
                            rule=StopAt())
        converged, k = run.solve()
        return (converged, k, run.local_solution().values.copy(), run.fine_work,
                run.coarse_work, run.residuals)

    out = SimulatedRanks(P).run(program)

    def F(prop, j, x):
        states = np.empty((bounds[j + 1] - bounds[j] + 1,) + x.shape)
        prop.propagate(x, int(bounds[j]), int(bounds[j + 1]), states)
        return states

    def G(j, x):  # the built-in coarse step with "inject" weights
        return late.coarse_step((late.A[bounds[j]],), int(bounds[j + 1] - bounds[j]), x)

    U = [x0]
    for j in range(P):
        U.append(G(j, U[j]))
    for k in range(1, K + 1):
        prop = early if k == 1 else late
        new = [x0]
        for j in range(P):
            new.append(F(prop, j, U[j])[-1] + (G(j, new[j]) - G(j, U[j])))
        U = new
    for j, (converged, k, traj, fine_work, coarse_work, residuals) in enumerate(out):
        assert converged and k == K and residuals == [0.0, 1.0, 2.0]
        assert np.array_equal(traj, F(late, j, U[j]))
        L = int(bounds[j + 1] - bounds[j])
        # rank 0's input never changes: it sweeps again only for the new propagator
        assert fine_work == ([L, L, 0] if j == 0 else [L, L, L])
        assert coarse_work == ([1, 0, 0] if j == 0 else [1, 1, 1])
    assert sorted(set(asked)) == [(0, False), (1, False), (2, True)]
