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


# --- the optional coarse grid and the batched level steps ----------------------------------------

class CoarseLinear(LinearPropagator):
    """LinearPropagator with a coarse grid: a step over L layers is x + L h x A^T."""

    def __init__(self, A, coarse_factor=1.0, wrong_coarse_adjoint=False, **kw):
        super().__init__(A, **kw)
        self.coarse_factor = coarse_factor
        self.wrong_coarse_adjoint = wrong_coarse_adjoint

    def layer_parameters(self, n):
        return (self.A[n],)

    def coarse_step(self, params, n_layers, x):
        return x + self.coarse_factor * n_layers * self.h * x @ params[0].T

    def coarse_adjoint_step(self, params, n_layers, x, lam):
        A = params[0].T if self.wrong_coarse_adjoint else params[0]
        return lam + self.coarse_factor * n_layers * self.h * lam @ A


def coarse_linear(**kw):
    rng = np.random.default_rng(0)
    prop = CoarseLinear(rng.standard_normal((6, 4, 4)), target=rng.standard_normal((3, 4)), **kw)
    return prop, rng.standard_normal((3, 4))


def test_a_complete_coarse_grid_is_declared_and_checked():
    prop, x0 = coarse_linear()
    assert prop.has_coarse_grid and not linear()[0].has_coarse_grid
    report = check_propagator(prop, x0)
    assert report.passed, str(report)
    names = [c.name for c in report.checks]
    for expected in ("coarse step over 1 layer = step", "coarse dot-product test",
                     "stacked_parameters = layer_parameters", "coarse level steps = loop",
                     "level steps (state sweep)", "level steps (adjoint sweep)"):
        assert any(expected in n for n in names), expected
    # without a coarse grid the coarse checks are not run, and nothing fails
    plain = check_propagator(*linear())
    assert plain.passed and not any("coarse" in c.name for c in plain.checks)


def test_checker_catches_a_wrong_coarse_adjoint():
    report = check_propagator(*coarse_linear(wrong_coarse_adjoint=True))
    assert [c.name for c in report.failures] and all(
        "coarse dot-product" in c.name for c in report.failures)


def test_checker_catches_a_coarse_step_that_is_not_the_layer_step():
    report = check_propagator(*coarse_linear(coarse_factor=1.5))
    names = [c.name for c in report.failures]
    assert names and all("coarse step over 1 layer = step" in n for n in names)


def test_checker_catches_a_half_declared_coarse_grid():
    class OnlyCoarseStep(LinearPropagator):
        def coarse_step(self, params, n_layers, x):
            return x

    rng = np.random.default_rng(1)
    prop = OnlyCoarseStep(rng.standard_normal((4, 3, 3)), target=np.zeros((2, 3)))
    assert not prop.has_coarse_grid
    report = check_propagator(prop, rng.standard_normal((2, 3)))
    [failure] = report.failures
    assert "coarse grid incomplete" in failure.name
    assert "layer_parameters" in failure.name and "coarse_adjoint_step" in failure.name
    with pytest.raises(NotImplementedError, match="missing: layer_parameters, "
                                                  "coarse_adjoint_step"):
        prop.layer_parameters(0)


def test_checker_catches_wrong_level_steps():
    from ptoc.propagator import LevelSteps

    class OffByOne(LevelSteps):
        def points_apply(self, u, positions):
            return super().points_apply(u, positions) + 1e-6

    class BadLevels(CoarseLinear):
        def level_steps(self, plan):
            return OffByOne(self, plan)

    rng = np.random.default_rng(2)
    prop = BadLevels(rng.standard_normal((5, 3, 3)), target=np.zeros((2, 3)))
    report = check_propagator(prop, rng.standard_normal((2, 3)))
    # the generic FAS halves are built on points_apply, and the F-relaxation with the
    # restriction's residuals on points_residual: they inherit the error (the correction
    # with the relaxations is built on runs, which are right)
    assert [c.name for c in report.failures] == [
        "level points (state sweep) = step",
        "level points residual (state sweep) = g + step - u",
        "level points tau (state sweep) = out + u - step",
        "level F-relaxation with the restriction's residuals = step by step"]


@pytest.mark.parametrize("target", ["numpy", "cpu"])
def test_resnet_compiled_level_steps_equal_the_generic_ones(target):
    """The ResNet's compiled level steps (fine and coarse, both sweeps) give the bits of
    the generic LevelSteps, which call step/coarse_step one at a time."""
    from ptoc.propagator import LevelPlan, LevelSteps, ResNetLevelSteps

    rng = np.random.default_rng(4)
    net = ptoc.ResNet(width=5, depth=12, n_in=2, n_classes=3)
    params = net.init_params(rng)
    prop = ptoc.ResNetPropagator(net, params, target=target)
    x0 = prop.initial_state(rng.standard_normal((7, 2)))
    states = np.empty((13, 7, 5))
    prop.propagate(x0, states=states)
    starts = np.array([0, 3, 4, 8])
    spans = np.array([3, 1, 4, 4])
    weights = tuple(np.array(w) for w in prop.stacked_parameters(starts))
    plans = [LevelPlan(0, False, np.arange(12), np.ones(12, np.int64)),
             LevelPlan(0, True, np.arange(11, -1, -1), np.ones(12, np.int64),
                       states=states[11::-1].copy()),
             LevelPlan(1, False, starts, spans, weights=weights),
             LevelPlan(1, True, starts[::-1].copy(), spans[::-1].copy(),
                       weights=tuple(w[::-1].copy() for w in weights),
                       states=states[starts[::-1]].copy())]
    for plan in plans:
        fast = prop.level_steps(plan)
        assert isinstance(fast, ResNetLevelSteps)
        slow = LevelSteps(prop, plan)
        n = plan.n_steps
        u, v = (np.empty((n + 1, 7, 5)) for _ in range(2))
        u[0] = v[0] = rng.standard_normal((7, 5))
        g = rng.standard_normal((n + 1, 7, 5))
        fast.runs(u, g, [1], [n])
        slow.runs(v, g, [1], [n])
        np.testing.assert_array_equal(u, v)
        picked = np.array([1, n])
        np.testing.assert_array_equal(fast.points_apply(u, picked), slow.points_apply(u, picked))
        # the FAS halves, with and without a right-hand side, into rows in reverse order
        rows = np.array([1, 0])
        for rhs in (None, g):
            a, b = (np.full((2, 7, 5), 3.0) for _ in range(2))
            fast.points_residual(u, rhs, picked, a, rows)
            slow.points_residual(u, rhs, picked, b, rows)
            np.testing.assert_array_equal(a, b)
            assert not np.any(a == 3.0)
            fast.points_tau(u, picked, a, rows)
            slow.points_tau(u, picked, b, rows)
            np.testing.assert_array_equal(a, b)


def test_a_layer_slice_refuses_foreign_layers_in_level_steps():
    from ptoc.propagator import LevelPlan

    net = ptoc.ResNet(width=3, depth=6, n_in=2, n_classes=2)
    piece = ptoc.ResNetPropagator(net, net.init_params(0)).layer_slice(2, 4)
    with pytest.raises(IndexError, match="layer 4 is not held here"):
        piece.level_steps(LevelPlan(0, False, np.array([3, 4]), np.ones(2, np.int64)))
    with pytest.raises(IndexError, match="layer 1 is not held here"):
        piece.stacked_parameters([1, 2])


def test_checker_catches_a_wrong_fas_half():
    """A LevelSteps whose FAS residual drops the right-hand side fails exactly that check,
    and the fused F-relaxation with the restriction's residuals, built on it."""
    from ptoc.propagator import LevelSteps

    class NoRhs(LevelSteps):
        def points_residual(self, u, g, positions, out, rows):
            super().points_residual(u, None, positions, out, rows)

    class BadLevels(CoarseLinear):
        def level_steps(self, plan):
            return NoRhs(self, plan)

    rng = np.random.default_rng(3)
    prop = BadLevels(rng.standard_normal((5, 3, 3)), target=np.zeros((2, 3)))
    report = check_propagator(prop, rng.standard_normal((2, 3)))
    assert [c.name for c in report.failures] == [
        "level points residual (state sweep) = g + step - u",
        "level F-relaxation with the restriction's residuals = step by step"]


@pytest.mark.parametrize("broken", ["correction", "c_relaxation", "injection"])
def test_checker_catches_wrong_fused_level_steps(broken):
    """A LevelSteps whose fused operations go wrong (the correction's sign, a C-point
    relaxed from its new neighbour, the injection of the wrong row) fails that check only."""
    from ptoc.propagator import LevelSteps

    class Broken(LevelSteps):
        def correct_then_runs(self, u, g, positions, uc, v, rows, starts, ends, before=None):
            if broken == "correction":
                return super().correct_then_runs(u, g, positions, v, uc, rows, starts, ends,
                                                 before)
            if broken == "c_relaxation" and before is not None:
                super().correct_then_runs(u, g, positions, uc, v, rows, starts, ends)
                before[:] = u[positions]
                for j in positions:
                    u[j] = self.step(int(j), u[int(j) - 1]) + g[j]
                    u[j - 1] += 1e-3  # the next point then reads a changed value
                return float(np.sum((u[positions] - before) ** 2))
            return super().correct_then_runs(u, g, positions, uc, v, rows, starts, ends,
                                             before)

        def runs_then_residuals(self, u, g, starts, ends, positions, out, rows, inject):
            super().runs_then_residuals(u, g, starts, ends, positions, out, rows, inject)
            if broken == "injection":
                inject[rows] = u[np.asarray(positions) - 1]

    class BadLevels(CoarseLinear):
        def level_steps(self, plan):
            return Broken(self, plan)

    rng = np.random.default_rng(5)
    prop = BadLevels(rng.standard_normal((6, 3, 3)), target=np.zeros((2, 3)))
    report = check_propagator(prop, rng.standard_normal((2, 3)))
    expected = ("level F-relaxation with the restriction's residuals = step by step"
                if broken == "injection" else
                "level correction, F- and C-relaxation = step by step")
    assert [c.name for c in report.failures] == [expected]
