"""The propagator contract and its checker: it passes correct propagators and
catches broken ones."""

import numpy as np
import pytest

import ptoc
from ptoc import Propagator, check_propagator


class LinearPropagator(Propagator):
    """A user-written propagator: x_{n+1} = x_n + h x_n A_n^T, Phi(x) = |x - target|^2 / 2."""

    def __init__(self, A, h=0.1, target=None, wrong_adjoint=False, wrong_grad=False):
        self.A = A
        self.h = h
        self.n_layers = A.shape[0]
        self.target = target
        self.wrong_adjoint = wrong_adjoint
        self.wrong_grad = wrong_grad

    def step(self, n, x):
        return x + self.h * x @ self.A[n].T

    def adjoint_step(self, n, x, lam, grad=None):
        if grad is not None:
            factor = 2.0 if self.wrong_grad else 1.0
            grad[0][n] += factor * self.h * lam.T @ x
        A = self.A[n].T if self.wrong_adjoint else self.A[n]
        return lam + self.h * lam @ A

    def objective(self, x):
        return 0.5 * float(np.sum((x - self.target) ** 2))

    def objective_gradient(self, x):
        return x - self.target

    def parameters(self):
        return [self.A]


def linear(**kw):
    rng = np.random.default_rng(0)
    A = rng.standard_normal((6, 4, 4))
    return LinearPropagator(A, target=rng.standard_normal((3, 4)), **kw), rng.standard_normal(
        (3, 4))


def test_checker_accepts_a_correct_user_propagator():
    prop, x0 = linear()
    report = check_propagator(prop, x0)
    assert report.passed, str(report)
    assert len(report.checks) >= 8
    assert "all checks passed" in str(report)


def test_checker_catches_a_wrong_adjoint():
    prop, x0 = linear(wrong_adjoint=True)
    report = check_propagator(prop, x0)
    assert not report.passed
    assert any("dot-product" in c.name for c in report.failures)
    with pytest.raises(AssertionError, match="dot-product"):
        report.raise_if_failed()


def test_checker_catches_a_wrong_parameter_gradient():
    prop, x0 = linear(wrong_grad=True)
    report = check_propagator(prop, x0)
    names = [c.name for c in report.failures]
    assert any("layer gradient" in n for n in names)
    assert any("whole-chain gradient in the parameters" in n for n in names)
    assert not any("dot-product" in n for n in names)


def test_checker_catches_an_inconsistent_range_method():
    class Skewed(LinearPropagator):
        def propagate(self, x, start=0, stop=None, states=None):
            return super().propagate(x, start, stop, states) * (1 + 1e-6)

    rng = np.random.default_rng(0)
    prop = Skewed(rng.standard_normal((5, 3, 3)), target=np.zeros((2, 3)))
    report = check_propagator(prop, rng.standard_normal((2, 3)))
    assert any("propagate = loop" in c.name for c in report.failures)


@pytest.mark.parametrize("act", ["tanh", "relu", "smoothrelu"])
@pytest.mark.parametrize("target", ["numpy", "cpu"])
def test_resnet_propagator_passes_the_checker(act, target):
    rng = np.random.default_rng(3)
    net = ptoc.ResNet(width=6, depth=10, n_in=2, n_classes=3, activation=act)
    params = net.init_params(rng)
    params.b[...] = rng.standard_normal(params.b.shape)
    params.b_in[...] = rng.standard_normal(params.b_in.shape)
    X = rng.standard_normal((11, 2))
    y = rng.integers(0, 3, 11)
    prop = ptoc.ResNetPropagator(net, params, y, target=target)
    report = check_propagator(prop, prop.initial_state(X), raise_on_failure=True)
    assert report.passed


def test_resnet_propagator_range_methods_match_the_sweeps():
    rng = np.random.default_rng(4)
    net = ptoc.ResNet(width=5, depth=9, n_in=2, n_classes=3)
    params = net.init_params(rng)
    X = rng.standard_normal((8, 2))
    y = rng.integers(0, 3, 8)
    prop = ptoc.ResNetPropagator(net, params, y)
    fwd = ptoc.forward(net, params, X)
    x = prop.initial_state(X)
    mid = prop.propagate(x, 0, 4)
    assert np.array_equal(mid, fwd.states[4])
    assert np.array_equal(prop.propagate(mid, 4, 9), fwd.final_state)
    lam_N = prop.objective_gradient(fwd.final_state)
    adj = ptoc.adjoint(net, params, fwd, lam_N, keep_adjoints=True)
    grad = prop.zero_gradient()
    lam4 = prop.adjoint_propagate(fwd.states[4:], lam_N, 4, 9, grad)
    assert np.array_equal(lam4, adj.adjoints[4])
    assert np.array_equal(grad[0][4:], adj.grad_K[4:])
    assert np.all(grad[0][:4] == 0)


def test_checker_rejects_non_propagators():
    with pytest.raises(TypeError, match="ptoc.Propagator"):
        check_propagator(object(), np.zeros(3))


def test_propagator_without_labels_explains_itself():
    net = ptoc.ResNet(width=3, depth=2, n_in=3, n_classes=2, opening="identity")
    prop = ptoc.ResNetPropagator(net, net.init_params(0))
    with pytest.raises(ValueError, match="no labels"):
        prop.objective(np.zeros((2, 3)))
