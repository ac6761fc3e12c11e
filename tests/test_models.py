"""Every method on the one contract: a model written here, which no module of ptoc
knows, is solved by Serial, Parareal and MGRIT and trained by simultaneous training.

The model is the antisymmetric ResNet of tutorial 8 (Haber & Ruthotto's stable
architecture): ``x_{n+1} = x_n + h tanh(A_n x_n + b_n)``, ``A_n = K_n - K_n^T - gamma I``,
with a least-squares objective; as a :class:`ptoc.propagator.PropagatorModel` its inputs
are the initial states.
"""

import pathlib

import numpy as np
import pytest

import ptoc
from ptoc.methods import GradientMethod
from ptoc.optim import Adam
from ptoc.parallel import parallel_gradient
from ptoc.propagator import PropagatorModel
from ptoc.simultaneous import SimultaneousGradient


class AntisymmetricLayers(ptoc.Propagator):
    """x_{n+1} = x_n + h tanh(A_n x_n + b_n), A_n = K_n - K_n^T - gamma I; |x_N - t|^2/(2S)."""

    def __init__(self, K, b, h, gamma, targets):
        self.K, self.b, self.h, self.gamma, self.targets = K, b, h, gamma, targets
        self.n_layers = K.shape[0]

    def _layer(self, K, b, dt, x):
        A = K - K.T - self.gamma * np.eye(K.shape[0])
        return x + dt * np.tanh(x @ A.T + b)

    def _adjoint(self, K, b, dt, x, lam):
        A = K - K.T - self.gamma * np.eye(K.shape[0])
        g = (1.0 - np.tanh(x @ A.T + b) ** 2) * lam
        return lam + dt * g @ A, g

    def step(self, n, x):
        return self._layer(self.K[n], self.b[n], self.h, x)

    def adjoint_step(self, n, x, lam, grad=None):
        out, g = self._adjoint(self.K[n], self.b[n], self.h, x, lam)
        if grad is not None:
            G = self.h * g.T @ x
            grad[0][n] += G - G.T
            grad[1][n] += self.h * g.sum(axis=0)
        return out

    def objective(self, x):
        return 0.5 * float(np.sum((x - self.targets) ** 2)) / x.shape[0]

    def objective_gradient(self, x):
        return (x - self.targets) / x.shape[0]

    def parameters(self):
        return [self.K, self.b]

    def layer_parameters(self, n):
        return (self.K[n], self.b[n])

    def coarse_step(self, params, n_layers, x):
        return self._layer(params[0], params[1], n_layers * self.h, x)

    def coarse_adjoint_step(self, params, n_layers, x, lam):
        return self._adjoint(params[0], params[1], n_layers * self.h, x, lam)[0]


N, d, S, T = 16, 3, 5, 2.0


def _model(seed=0):
    rng = np.random.default_rng(seed)
    targets = rng.standard_normal((S, d))
    params = {"K": 0.5 * rng.standard_normal((N, d, d)), "b": 0.3 * rng.standard_normal((N, d))}

    def factory(arrays):
        return AntisymmetricLayers(arrays[0], arrays[1], T / N, 0.1, targets)

    x0 = rng.standard_normal((S, d))
    return PropagatorModel(factory, params), params, x0, np.zeros(S, np.int64)


def _serial_gradient(model, params, x0):
    prop = model.layers(params)
    states = np.empty((N + 1, S, d))
    prop.propagate(x0, 0, N, states)
    grad = prop.zero_gradient()
    prop.adjoint_propagate(states, prop.objective_gradient(states[-1]), 0, N, grad)
    return prop.objective(states[-1]), dict(zip(("K", "b"), grad, strict=True))


def test_the_model_is_unknown_to_ptoc_and_its_propagator_passes_the_checker():
    sources = pathlib.Path(ptoc.__file__).parent.rglob("*.py")
    assert not any("Antisymmetric" in f.read_text() for f in sources)
    model, params, x0, _ = _model()
    report = ptoc.check_propagator(model.layers(params), x0)
    assert report.passed, str(report)


@pytest.mark.parametrize("solver, comm", [
    (ptoc.Serial(), 3), (ptoc.Parareal(chunks=4, coarse="average"), None),
    (ptoc.MGRIT(coarsening=2, tol=1e-14), 1), (ptoc.MGRIT(coarsening=4, cycle="F", tol=1e-14), 3)])
def test_every_solver_gives_the_serial_gradient_of_the_model(solver, comm):
    model, params, x0, y = _model()
    loss, grads = _serial_gradient(model, params, x0)
    result = parallel_gradient(model, params, x0, y, solver, comm=comm)
    assert result.forward.converged and result.adjoint.converged
    assert abs(result.loss - loss) <= 1e-13 * abs(loss)
    assert sorted(result.grads) == ["K", "b"]
    for k in grads:
        np.testing.assert_allclose(result.grads[k], grads[k], rtol=0, atol=1e-12)


def test_simultaneous_training_trains_the_model():
    """A few warm-started MGRIT iterations per step (Günther et al.), on 2 simulated
    ranks: the objective falls, and the inexact gradient of the last step is close to
    the exact one."""
    model, params, x0, y = _model()
    grad_fn = SimultaneousGradient(model, ptoc.MGRIT(coarsening=2, max_iterations=2, tol=1e-13),
                                   comm=2, exact_every=5)
    method = GradientMethod(Adam(lr=0.02), grad_fn=grad_fn)
    state = method.init(model, params)
    first, _ = _serial_gradient(model, params, x0)
    for _ in range(30):
        outcome = method.step(model, params, state, x0, y)
        params, state = outcome.params, outcome.state
    last, _ = _serial_gradient(model, params, x0)
    assert last < 0.8 * first
    assert all(r.warm for r in grad_fn.records[1:])
    errors = [r.grad_error for r in grad_fn.records if r.grad_error is not None]
    assert len(errors) == 6 and errors[-1] < 1e-2


def test_pgcl_trains_the_model_and_one_chunk_is_exact_gradient_descent():
    """PGCL (Parpas & Muir) through the contract: on one chunk it is gradient descent
    with the exact gradient, bit for bit; on three simulated ranks it lowers J."""
    from ptoc.optim import SGD
    from ptoc.pgcl import PGCL

    model, params, x0, y = _model()

    def exact(p, X, labels):
        r = parallel_gradient(model, p, X, labels, ptoc.Serial(), keep_states=False)
        return r.loss, r.grads

    one, reference = PGCL(optimizer=SGD(lr=0.05)), GradientMethod(SGD(lr=0.05), grad_fn=exact)
    p1, s1 = params, one.init(model, params)
    p2, s2 = params, reference.init(model, params)
    for _ in range(3):
        o1, o2 = one.step(model, p1, s1, x0, y), reference.step(model, p2, s2, x0, y)
        assert o1.loss == o2.loss
        (p1, s1), (p2, s2) = (o1.params, o1.state), (o2.params, o2.state)
        assert all(np.array_equal(p1[k], p2[k]) for k in ("K", "b"))

    three = PGCL(optimizer=Adam(lr=0.02), comm=3, local_steps=2)
    p, state = params, three.init(model, params)
    first, _ = _serial_gradient(model, params, x0)
    for _ in range(30):
        outcome = three.step(model, p, state, x0, y)
        p, state = outcome.params, outcome.state
    assert _serial_gradient(model, p, x0)[0] < 0.8 * first
    assert outcome.info["state_defect_rel"] < 0.05


class _Forwarding(ptoc.propagator.Model):
    """A ResNet seen only through the Model contract (not a ResNetModel): methods must
    take their generic, contract-only path on it."""

    def __init__(self, network):
        self.inner = ptoc.propagator.ResNetModel(network)
        for name in ("n_layers", "dtype", "layer_keys", "opening_keys", "terminal_keys"):
            setattr(self, name, getattr(self.inner, name))

    def __getattribute__(self, name):
        if name in ("inner", "n_layers", "dtype", "layer_keys", "opening_keys",
                    "terminal_keys", "__class__", "__dict__"):
            return object.__getattribute__(self, name)
        return getattr(object.__getattribute__(self, "inner"), name)

    # the abstract methods (reached through __getattribute__)
    check_params = layers = terminal = None


@pytest.mark.parametrize("rho", [0.0, 1.0])
def test_the_contract_s_extended_hamiltonian_equals_the_resnet_formula(rho):
    """E-MSA's layer objective F_n built from the contract (one-layer propagators, the
    model's regulariser terms, the mixed derivative by extrapolated differences) equals
    the hand-derived batched ResNet form, at weights away from the current ones."""
    from ptoc.msa import _problem, _sweeps

    net = ptoc.ResNet(width=3, depth=5, n_in=2, n_classes=3, gamma=1e-2, gamma_t=1e-1,
                      gamma_c=1e-2)
    rng = np.random.default_rng(7)
    p = net.init_params(1)
    p.b[...] = 0.3 * rng.standard_normal(p.b.shape)
    X, y = rng.standard_normal((9, 2)), rng.integers(0, 3, 9)
    fast, generic = ptoc.propagator.ResNetModel(net), _Forwarding(net)
    _, states, costates, _ = _sweeps(fast, p, X, y, ptoc.Target.CPU)
    a = _problem(fast, p, states, costates, rho, ptoc.Target.CPU)
    b = _problem(generic, p, states, costates, rho, ptoc.Target.CPU)
    assert type(a).__name__ == "_Problem" and type(b).__name__ == "_ModelProblem"
    theta = a.flatten([p.K, p.b]) + 0.1 * rng.standard_normal((5, 12))
    Fa, Ga = a.evaluate(theta)
    Fb, Gb = b.evaluate(b.flatten(a.unflatten(theta)))
    np.testing.assert_allclose(Fb, Fa, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(Gb, Ga, rtol=1e-7 if rho else 1e-12, atol=1e-10)
    idx = np.array([3, 1])
    np.testing.assert_allclose(b.evaluate(theta[idx], idx)[0], Fa[idx], rtol=1e-12)


@pytest.mark.parametrize("method", ["emsa", "msa"])
def test_the_methods_of_successive_approximations_train_the_model(method):
    """E-MSA (Li, Chen, Tai & E) and MSA (Li & Hao) maximise each layer's Hamiltonian of
    the model through the contract: J falls."""
    from ptoc.msa import EMSA, MSA

    model, params, x0, y = _model()
    m = EMSA(rho=1.0, inner_steps=3) if method == "emsa" else MSA(inner_steps=3, lr=0.5)
    state = m.init(model, params)
    first, _ = _serial_gradient(model, params, x0)
    for _ in range(8):
        outcome = m.step(model, params, state, x0, y)
        params, state = outcome.params, outcome.state
        assert outcome.info["layers_moved"] > 0
    assert sorted(params) == ["K", "b"]
    assert _serial_gradient(model, params, x0)[0] < 0.9 * first


@pytest.mark.parametrize("kind", ["ternary", "binary"])
def test_discrete_weights_train_the_model(kind):
    """Li & Hao's discrete-weight MSA through the contract: the model's first layer array
    (here K) becomes a_n W_n with W_n in {-1, 0, 1} (or {-1, 1}), chosen by the closed-form
    maximiser of the layer Hamiltonian; the rest is trained by the optimiser. J falls."""
    from ptoc.msa import DiscreteMSA

    model, params, x0, y = _model()
    m = DiscreteMSA(kind=kind, optimizer=Adam(lr=0.02))
    state = m.init(model, params)
    first, _ = _serial_gradient(model, m.discrete_params(model, params, state), x0)
    for _ in range(30):
        outcome = m.step(model, params, state, x0, y)
        params, state = outcome.params, outcome.state
    allowed = {-1.0, 1.0} if kind == "binary" else {-1.0, 0.0, 1.0}
    assert set(np.unique(state.levels)) <= allowed
    a = state.scale[:, None, None]
    assert np.array_equal(params["K"], a * state.levels)
    assert _serial_gradient(model, params, x0)[0] < 0.75 * first


def test_the_default_layer_hamiltonian_gradient_is_the_gradient_direction():
    """Model.hamiltonian_gradient's default (the propagator's layer gradient and the
    regulariser, the maximum principle's identity) gives PGCL's "hamiltonian" local
    update the direction of its gradient update on a model ptoc does not know."""
    from ptoc.optim import SGD
    from ptoc.pgcl import PGCL

    model, params, x0, y = _model()
    out = []
    for update in ("gradient", "hamiltonian"):
        m = PGCL(optimizer=SGD(lr=0.05), comm=2, local_update=update)
        p, state = params, m.init(model, params)
        for _ in range(3):
            o = m.step(model, p, state, x0, y)
            p, state = o.params, o.state
        out.append(p)
    for k in ("K", "b"):
        np.testing.assert_allclose(out[1][k], out[0][k], rtol=0, atol=1e-13)
    assert not np.array_equal(out[0]["K"], params["K"])
