"""Simultaneous layer-parallel training (Günther et al. 2020) against serial training."""

import shutil

import numpy as np
import pytest

import ptoc
from ptoc.methods import GradientMethod
from ptoc.objective import regulariser
from ptoc.optim import LBFGS, SGD, Adam
from ptoc.parallel import MGRIT, Parareal, mgrit_levels
from ptoc.simultaneous import SimultaneousGradient, StepRecord, guenther_peaks, step_costs
from ptoc.training import CHECKPOINT_NAME, train


@pytest.fixture(scope="module")
def peaks():
    return ptoc.data.peaks(n_per_class=20, n_val_per_class=4, grid=64)


def _net(depth=16):
    return ptoc.ResNet(width=4, depth=depth, T=5.0, n_in=2, n_classes=5,
                       activation="smoothrelu")


@pytest.mark.parametrize("ranks", [None, 3])
def test_enough_mgrit_iterations_reproduce_serial_training(peaks, ranks):
    # 15 full-batch Adam steps: the parameters equal those of exact serial training
    net = _net()
    p0 = net.init_params(0)
    serial = train(net, p0, peaks, epochs=15, batch_size=None, optimizer=Adam(lr=1e-2),
                   progress=False)
    grad = SimultaneousGradient(net, MGRIT(coarsening=2, max_iterations=40, tol=1e-15),
                                comm=ranks)
    simul = train(net, p0, peaks, epochs=15, batch_size=None, optimizer=Adam(lr=1e-2),
                  progress=False, grad_fn=grad)
    assert len(grad.records) == 15
    for k in serial.params:
        assert np.max(np.abs(simul.params[k] - serial.params[k])) < 1e-8
    # and the parameters really moved (the comparison is not between two initial guesses)
    assert np.max(np.abs(serial.params["K"] - p0["K"])) > 1e-2


def test_warm_starts_make_few_iterations_accurate(peaks):
    # one MGRIT iteration per sweep: cold, the gradient is far off; warm-started from the
    # previous step, it is an order of magnitude closer
    net = _net(depth=64)
    grad = SimultaneousGradient(net, MGRIT(coarsening=2, max_iterations=1), exact_every=1)
    result = train(net, net.init_params(0), peaks, epochs=10, batch_size=None,
                   optimizer=Adam(lr=1e-2), progress=False, grad_fn=grad)
    errors = [r.grad_error for r in grad.records]
    assert [r.warm for r in grad.records] == [False] + [True] * 9
    assert errors[0] > 0.1 and errors[1] < errors[0] and max(errors[3:]) < errors[0] / 10
    assert all(len(r.forward_residuals) == 1 and len(r.adjoint_residuals) == 1
               for r in grad.records)
    assert result.steps == 10
    # at the same parameters, one warm iteration beats one cold iteration
    X, y = peaks.X_train, peaks.y_train
    grad(result.params, X, y)
    cold = SimultaneousGradient(net, MGRIT(coarsening=2, max_iterations=1), exact_every=1)
    cold(result.params, X, y)
    assert grad.records[-1].warm and not cold.records[0].warm
    assert grad.records[-1].grad_error < cold.records[0].grad_error / 5


def test_more_iterations_give_a_better_gradient(peaks):
    net = _net(depth=64)
    p0 = net.init_params(1)
    X, y = peaks.X_train, peaks.y_train
    errors = []
    for its in (1, 2, 4):
        grad = SimultaneousGradient(net, MGRIT(coarsening=2, max_iterations=its, tol=0),
                                    exact_every=1)
        grad(p0, X, y)
        errors.append(grad.records[0].grad_error)
    assert errors[0] > errors[1] > errors[2] > 0


def test_simultaneous_training_decreases_the_loss_on_peaks(peaks):
    net = _net(depth=32)
    p0 = net.init_params(0)
    grad = SimultaneousGradient(net, comm=2)  # the default: 2 MGRIT iterations per sweep
    result = train(net, p0, peaks, epochs=40, batch_size=None, optimizer=Adam(lr=1e-2),
                   progress=False, grad_fn=grad)
    start = ptoc.loss(net, p0, peaks.X_train, peaks.y_train)
    assert result.train_loss < 0.9 * start
    assert all(r.steps_critical_path < r.steps_total for r in grad.records)


def test_other_batches_start_cold(peaks):
    net = _net()
    grad = SimultaneousGradient(net, MGRIT(coarsening=2, max_iterations=2))
    train(net, net.init_params(0), peaks, epochs=2, batch_size=25, optimizer=SGD(lr=1e-2),
          progress=False, grad_fn=grad)
    assert len(grad.records) == 8 and not any(r.warm for r in grad.records)
    X, y = peaks.X_train, peaks.y_train
    grad.reset()
    grad(net.init_params(0), X, y)
    grad(net.init_params(0), X.copy(), y.copy())  # equal samples: warm
    grad(net.init_params(0), X[::-1], y[::-1])
    assert [r.warm for r in grad.records] == [False, True, False]


def test_bad_options_are_named():
    net = _net()
    with pytest.raises(TypeError, match="MGRIT"):
        SimultaneousGradient(net, Parareal())
    with pytest.raises(ValueError, match="exact_every"):
        SimultaneousGradient(net, exact_every=-1)
    with pytest.raises(TypeError, match="ResNet"):
        SimultaneousGradient("net")


# --- one inexact gradient per step (Günther et al.'s reference code) ------------------------

def _one_gradient_method(net, iterations=2, comm=2, tol=0.0):
    grad = SimultaneousGradient(net, MGRIT(coarsening=2, max_iterations=iterations, tol=tol),
                                comm=comm)
    return GradientMethod(LBFGS(value_only_trials=True), grad), grad


def test_a_step_costs_one_gradient_and_one_state_sweep_per_trial(peaks):
    """As src/main.cpp of the reference: per step one state and one adjoint solve of 2
    MGRIT iterations each, and per line-search trial one state solve of 2 iterations."""
    net = _net()
    method, grad = _one_gradient_method(net)
    X, y = peaks.X_train, peaks.y_train
    params, state = net.init_params(0), method.init(net, net.init_params(0))
    infos = []
    for _ in range(6):
        before = state.closure_calls
        out = method.step(net, params, state, X, y)
        params, state = out.params, out.state
        infos.append(out.info)
        assert out.info == {"gradient_evaluations": 1,
                            "objective_evaluations": state.closure_calls - before}
    kinds = [r.kind for r in grad.records]
    assert kinds.count("gradient") == 6 and kinds.count("state") == state.closure_calls
    for r in grad.records:
        assert len(r.forward_residuals) == 2
        assert len(r.adjoint_residuals) == (2 if r.kind == "gradient" else 0)
    assert [r.warm for r in grad.records] == [False] + [True] * (len(grad.records) - 1)
    costs = step_costs(grad.records)
    assert [c.trial_sweeps for c in costs] == [i["objective_evaluations"] for i in infos]
    assert all(c.trial_sweeps >= 1 and c.adjoint_iterations == 2
               and c.state_iterations == 2 * (1 + c.trial_sweeps) for c in costs)
    # a trial's cost is that of a state sweep: half of a gradient's
    gradient_cost = grad.records[0].steps_critical_path
    assert all(2 * r.steps_critical_path == gradient_cost
               for r in grad.records if r.kind == "state")
    assert params["K"].shape == net.init_params(0)["K"].shape and state.step == 6


def test_gradient_trials_cost_a_gradient_each():
    """Control for the test above: the default L-BFGS line search evaluates the gradient
    (state and adjoint sweeps) at every trial, and the next step again at its start."""
    net = _net()
    data = ptoc.data.peaks(n_per_class=20, n_val_per_class=4, grid=64)
    grad = SimultaneousGradient(net, MGRIT(coarsening=2, max_iterations=2, tol=0), comm=2)
    result = train(net, net.init_params(0), data, optimizer=LBFGS(), epochs=4,
                   batch_size=None, progress=False, grad_fn=grad)
    assert [r.kind for r in grad.records] == ["gradient"] * (
        4 + result.optimizer_state.closure_calls)
    with pytest.raises(ValueError, match="state-only record comes before"):
        step_costs([StepRecord(1.0, [0.1], [], False, 1, 1, kind="state")])


def test_exact_solves_with_one_gradient_per_step_reproduce_serial_training(peaks):
    net = _net()
    p0 = net.init_params(0)
    serial = train(net, p0, peaks, method=GradientMethod(LBFGS(value_only_trials=True)),
                   epochs=10, batch_size=None, progress=False)
    method, grad = _one_gradient_method(net, iterations=40, comm=3, tol=1e-15)
    simul = train(net, p0, peaks, method=method, epochs=10, batch_size=None, progress=False)
    assert simul.optimizer_state.closure_calls == serial.optimizer_state.closure_calls
    for k in serial.params:
        assert np.max(np.abs(simul.params[k] - serial.params[k])) < 1e-8
    assert np.max(np.abs(serial.params["K"] - p0["K"])) > 1e-2


def test_resume_with_one_gradient_per_step_is_bitwise(tmp_path, peaks):
    """The checkpoint holds the warm start and L-BFGS's pending pair (start point and
    gradient): a run killed before its 7th gradient and resumed ends on the same bits."""
    net = _net(depth=8)
    full, killed = tmp_path / "full", tmp_path / "killed"

    class Snapshot(SimultaneousGradient):
        def __call__(self, params, X, y):
            calls = sum(r.kind == "gradient" for r in self.records)
            if calls == 6 and not killed.exists():
                killed.mkdir()
                shutil.copy(full / CHECKPOINT_NAME, killed / CHECKPOINT_NAME)
            return super().__call__(params, X, y)

    solver = MGRIT(coarsening=2, max_iterations=1, tol=0)
    method = GradientMethod(LBFGS(value_only_trials=True), Snapshot(net, solver, comm=2))
    whole = train(net, net.init_params(1), peaks, method=method, epochs=10, batch_size=None,
                  output_dir=full, checkpoint_every=4, progress=False)
    assert (killed / CHECKPOINT_NAME).exists()
    again = GradientMethod(LBFGS(value_only_trials=True),
                           SimultaneousGradient(net, solver, comm=2))
    resumed = train(net, net.init_params(99), peaks, method=again, epochs=10, batch_size=None,
                    output_dir=killed, checkpoint_every=4, resume=True, progress=False)
    assert resumed.steps == whole.steps == 10
    for k in whole.params:
        assert np.array_equal(resumed.params[k], whole.params[k]), k


def test_guenther_peaks_is_the_reference_configuration():
    setup = guenther_peaks(n_per_class=4, epochs=3)
    net, p = setup.network, setup.params
    assert (net.width, net.depth, net.T, net.activation.value) == (8, 30, 1.0, "smoothrelu")
    assert setup.epochs == 3 and guenther_peaks(n_per_class=4).epochs == 130
    assert len(setup.data.y_val) == 200 and len(setup.data.y_train) == 20
    for k, a in p.items():  # uniform in [0, 1e-3): weights and biases
        assert a.min() >= 0 and a.max() < 1e-3 and a.max() > 5e-4, k
    # the reference's regulariser (no step h in its sums) equals ptoc's with gamma / h
    h = 1.0 / 30
    theta = [np.concatenate([p.K[n].ravel(), p.b[n]]) for n in range(30)]
    ref = (1e-7 / 2 * sum(np.sum(t**2) for t in theta)
           + 1e-5 / 2 * sum(np.sum(((theta[n] - theta[n - 1]) / h) ** 2) for n in range(1, 30))
           + 1e-7 / 2 * (np.sum(p.W**2) + np.sum(p.mu**2) + np.sum(p.K_in**2)
                         + np.sum(p.b_in**2)))
    assert abs(regulariser(net, p) - ref) <= 1e-12 * ref
    X, y = setup.data.X_train, setup.data.y_train
    assert abs(ptoc.loss(net, p, X, y) - np.log(5)) < 1e-3
    solver = setup.solver
    assert [len(lv) - 1 for lv in mgrit_levels(30, solver.coarsening, solver.max_levels,
                                               solver.min_coarse_steps)] == [30, 15]
    assert [solver.relaxation_on(i).value for i in (0, 1)] == ["F", "FCF"]
    assert (solver.max_iterations, solver.tol) == (2, 0.0)
    opt = setup.optimizer
    assert (opt.memory, opt.lr, opt.c1, opt.backtrack, opt.max_backtracks,
            opt.value_only_trials) == (10, 1.0, 1e-4, 0.5, 14, True)
    assert setup.method.grad_fn is setup.gradient and setup.serial_method.grad_fn is None
