"""Simultaneous layer-parallel training (Günther et al. 2020) against serial training."""

import numpy as np
import pytest

import ptoc
from ptoc.optim import SGD, Adam
from ptoc.parallel import MGRIT, Parareal
from ptoc.simultaneous import SimultaneousGradient
from ptoc.training import train


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
