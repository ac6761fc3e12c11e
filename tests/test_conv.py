"""Tests of ptoc.conv: the convolutional ResNet through the one propagator contract.

The adjoint is checked against central finite differences and the dot-product identity
(hypothesis over channels, image sizes, depths and batches), against PyTorch's
``conv2d`` autograd, and the NumPy and Numba CPU kernels against each other; every
layer-parallel solver gives the serial sweep's states, adjoints and gradient, and every
training method of ptoc trains the network through the Model contract.
"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import ptoc
from ptoc.kernels import conv as conv_kernels
from ptoc.kernels import conv_cpu, conv_reference
from ptoc.methods import GradientMethod
from ptoc.optim import Adam
from ptoc.parallel import parallel_gradient

REGULARISED = {"gamma": 1e-2, "gamma_t": 1e-1, "gamma_c": 1e-2}


def _problem(channels=3, depth=4, image=(2, 5, 6), batch=4, n_classes=3, seed=0,
             activation="tanh"):
    net = ptoc.ConvResNet(channels, depth, T=1.0, activation=activation, image_shape=image,
                          n_classes=n_classes, **REGULARISED)
    p = net.init_params(seed).to_dict()
    rng = np.random.default_rng(seed + 1)
    for k in ("b", "b_in", "mu"):  # nonzero biases: every parameter matters
        p[k][...] = 0.3 * rng.standard_normal(p[k].shape)
    X = rng.standard_normal((batch, int(np.prod(image))))
    y = rng.integers(0, n_classes, batch)
    return net, p, X, y


def _richardson(f, eps):
    """Derivative of ``f`` at 0 by central differences with Richardson extrapolation."""
    d1 = (f(eps) - f(-eps)) / (2 * eps)
    d2 = (f(eps / 2) - f(-eps / 2)) / eps
    return (4 * d2 - d1) / 3


# --- the adjoint against the truth --------------------------------------------------------

@given(channels=st.integers(1, 4), size=st.integers(3, 8), depth=st.integers(1, 5),
       batch=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_the_gradient_equals_central_differences_and_the_adjoint_is_the_transpose(
        channels, size, depth, batch, seed):
    """Every parameter array's gradient along a random direction against central
    differences of J, and the dot-product identity <mu, Phi_n'(x) dx> =
    <Phi_n'(x)^T mu, dx> of a layer, on the NumPy reference."""
    net, p, X, y = _problem(channels, depth, (2, size, size + 1), batch, seed=seed)
    loss, grads = ptoc.loss_and_grad(net, p, X, y, target="numpy")
    rng = np.random.default_rng(seed)
    for key in p:
        v = rng.standard_normal(p[key].shape)

        def J(t, key=key, v=v):
            q = dict(p)
            q[key] = p[key] + t * v
            return ptoc.loss(net, q, X, y, target="numpy")
        fd = _richardson(J, 1e-3)
        exact = float(np.vdot(grads[key], v))
        assert abs(fd - exact) <= 1e-7 * max(1.0, abs(fd)), key
    assert ptoc.loss(net, p, X, y, target="numpy") == pytest.approx(loss, rel=1e-14)

    prop = net.propagator(p, y, target="numpy")
    x = prop.initial_state(X)
    n = int(rng.integers(depth))
    dx, mu = rng.standard_normal(x.shape), rng.standard_normal(x.shape)
    jdx = (prop.step(n, x + 1e-4 * dx) - prop.step(n, x - 1e-4 * dx)) / 2e-4
    lhs, rhs = float(np.vdot(mu, jdx)), float(np.vdot(prop.adjoint_step(n, x, mu), dx))
    assert abs(lhs - rhs) <= 1e-8 * np.linalg.norm(mu) * np.linalg.norm(jdx)


@pytest.mark.parametrize("target", ["numpy", "cpu"])
@pytest.mark.parametrize("activation", ["tanh", "smoothrelu"])
def test_the_propagator_passes_the_checker(target, activation):
    """ptoc.check_propagator: dot-product tests, layer and whole-chain gradients against
    finite differences, range methods, level steps and the coarse grid."""
    net, p, X, y = _problem(activation=activation)
    prop = net.propagator(p, y, target=target)
    report = ptoc.check_propagator(prop, prop.initial_state(X))
    assert report.passed, str(report)
    assert any("coarse" in c.name for c in report.checks)


def _cross_correlation(x, K, b):
    """PyTorch's ``conv2d(x, K, b, stride=1, padding=1)`` written as its definition, one
    output entry at a time (independent of ptoc's tap-sum kernels)."""
    S, C, H, W = x.shape
    xp = np.zeros((S, C, H + 2, W + 2))
    xp[:, :, 1:-1, 1:-1] = x
    out = np.empty((S, K.shape[0], H, W))
    for s in range(S):
        for o in range(K.shape[0]):
            for i in range(H):
                for j in range(W):
                    out[s, o, i, j] = np.sum(K[o] * xp[s, :, i:i + 3, j:j + 3]) + b[o]
    return out


@pytest.mark.parametrize("target", ["numpy", "cpu"])
def test_the_layers_are_pytorch_s_conv2d(target):
    """Opening and residual layers are conv2d as PyTorch defines it (cross-correlation,
    stride 1, zero padding 1): checked against the definition entry by entry, so that a
    flipped kernel or a shifted padding cannot pass. (The gradient is checked against
    finite differences above, and against PyTorch autograd in benchmarks/bench_conv.py.)"""
    net, p, X, y = _problem(channels=3, depth=2, image=(2, 5, 4), batch=3)
    Y = X.reshape((3,) + net.image_shape)
    x0 = np.tanh(_cross_correlation(Y, p["K_in"], p["b_in"]))
    prop = net.propagator(p, y, target=target)
    np.testing.assert_allclose(prop.initial_state(X), x0, rtol=0, atol=1e-13)
    x1 = x0 + net.h * np.tanh(_cross_correlation(x0, p["K"][0], p["b"][0]))
    np.testing.assert_allclose(prop.step(0, x0), x1, rtol=0, atol=1e-13)


# --- the two targets ------------------------------------------------------------------------

def test_the_numba_kernels_equal_the_numpy_reference():
    rng = np.random.default_rng(3)
    S, C, H, W = 5, 3, 7, 6
    x, lam = rng.standard_normal((S, C, H, W)), rng.standard_normal((S, C, H, W))
    K, b = 0.5 * rng.standard_normal((C, C, 3, 3)), rng.standard_normal(C)
    for act in ("tanh", "relu", "smoothrelu"):
        step = [conv_kernels.conv_layer_step(x, K, b, 0.3, act, target=t)
                for t in ("numpy", "cpu")]
        np.testing.assert_allclose(step[1], step[0], rtol=0, atol=1e-12)
        adj = [conv_kernels.conv_layer_adjoint_step(x, lam, K, b, 0.3, act, target=t)
               for t in ("numpy", "cpu")]
        for a, r in zip(adj[1], adj[0], strict=True):
            np.testing.assert_allclose(a, r, rtol=0, atol=1e-12)
        ham = [conv_kernels.conv_layer_hamiltonian(x, lam, K, b, 0.3, act, target=t)
               for t in ("numpy", "cpu")]
        assert abs(ham[1] - ham[0]) <= 1e-12 * abs(ham[0])
        hg = [conv_kernels.conv_layer_hamiltonian_grad(x, lam, K, b, 0.3, act, target=t)
              for t in ("numpy", "cpu")]
        for a, r in zip(hg[1], hg[0], strict=True):
            np.testing.assert_allclose(a, r, rtol=0, atol=1e-12)
    # the opening: other channel counts in and out, no residual
    Y, K_in = rng.standard_normal((S, 2, H, W)), rng.standard_normal((C, 2, 3, 3))
    outs = []
    for kern in (conv_reference, conv_cpu):
        out, dsig = np.empty((S, C, H, W)), np.empty((S, C, H, W))
        kern.layer(Y, K_in, b, 1.0, 0, False, out, dsig)
        gK, gb = np.zeros_like(K_in), np.zeros_like(b)
        kern.adjoint(Y, lam, K_in, b, 1.0, 0, None, gK, gb)
        outs.append((out, dsig, gK, gb))
    for a, r in zip(*outs, strict=True):
        np.testing.assert_allclose(a, r, rtol=0, atol=1e-12)


def test_the_numba_gradient_is_summed_per_chunk_and_independent_of_the_threads(monkeypatch):
    """A batch of several chunks (and a last, partial one): the gradient equals the NumPy
    reference to 1e-12, and every output has the same bits on 1 and 2 threads."""
    import numba

    monkeypatch.setattr(ptoc._config, "CHUNK", 3)
    rng = np.random.default_rng(5)
    S, C, H, W = 8, 2, 5, 4
    x, lam = rng.standard_normal((S, C, H, W)), rng.standard_normal((S, C, H, W))
    K, b = 0.5 * rng.standard_normal((C, C, 3, 3)), rng.standard_normal(C)
    ref = conv_kernels.conv_layer_adjoint_step(x, lam, K, b, 0.3, target="numpy")
    runs = []
    before = numba.get_num_threads()
    try:
        for threads in (1, min(2, numba.config.NUMBA_NUM_THREADS)):
            numba.set_num_threads(threads)
            runs.append(conv_kernels.conv_layer_adjoint_step(x, lam, K, b, 0.3, target="cpu"))
    finally:
        numba.set_num_threads(before)
    for a, r in zip(runs[0], ref, strict=True):
        np.testing.assert_allclose(a, r, rtol=0, atol=1e-12)
    for a, r in zip(runs[1], runs[0], strict=True):
        np.testing.assert_array_equal(a, r)


def test_the_whole_gradient_agrees_across_targets():
    net, p, X, y = _problem(channels=4, depth=3, image=(1, 8, 8), batch=4)
    (l0, g0), (l1, g1) = (ptoc.loss_and_grad(net, p, X, y, target=t) for t in ("numpy", "cpu"))
    assert abs(l1 - l0) <= 1e-12 * abs(l0)
    for k in p:
        np.testing.assert_allclose(g1[k], g0[k], rtol=0, atol=1e-12)


def test_the_hamiltonian_kernels_are_the_layer_gradient_with_the_costate():
    """grad_theta H_n of the kernels (with the regulariser) equals the contract's default,
    -(dJ/dtheta_n) from the propagator's layer gradient at lambda = -p."""
    net, p, X, y = _problem()
    params = net.check_params(p)
    x = net.propagator(params, y).initial_state(X)
    pn = np.random.default_rng(5).standard_normal(x.shape)
    for n in (0, 2, 3):
        fast = net.hamiltonian_gradient(params, n, x, pn)
        generic = ptoc.propagator.Model.hamiltonian_gradient(net, params, n, x, pn)
        for a, r in zip(fast, generic, strict=True):
            np.testing.assert_allclose(a, r, rtol=0, atol=1e-13)


# --- layer-parallel solvers -------------------------------------------------------------------

@pytest.mark.parametrize("solver, comm", [
    (ptoc.Serial(), 3), (ptoc.Parareal(chunks=2, coarse="average"), None),
    (ptoc.MGRIT(coarsening=2, tol=1e-14), 1), (ptoc.MGRIT(coarsening=2, cycle="F", tol=1e-14), 2)])
def test_every_solver_gives_the_serial_sweeps(solver, comm):
    net, p, X, y = _problem(depth=4)
    fwd = ptoc.forward(net, p, X)
    lamN = np.random.default_rng(2).standard_normal(fwd.final_state.shape)
    adj = ptoc.adjoint(net, p, fwd, lamN, keep_adjoints=True)
    pfwd = ptoc.forward(net, p, X, solver=solver, comm=comm)
    padj = ptoc.adjoint(net, p, pfwd, lamN, solver=solver, comm=comm)
    assert pfwd.solve.converged and padj.solve.converged
    np.testing.assert_allclose(pfwd.states, fwd.states, rtol=0, atol=1e-12)
    np.testing.assert_allclose(padj.adjoints, adj.adjoints, rtol=0, atol=1e-12)
    np.testing.assert_allclose(padj.grad_K, adj.grad_K, rtol=0, atol=1e-12)
    loss, grads = ptoc.loss_and_grad(net, p, X, y)
    ploss, pgrads = ptoc.loss_and_grad(net, p, X, y, solver=solver, comm=comm)
    result = parallel_gradient(net, net.check_params(p), X, y, solver, comm=comm)
    for value, g in ((ploss, pgrads), (result.loss, result.grads)):
        assert abs(value - loss) <= 1e-13 * abs(loss)
        for k in p:
            np.testing.assert_allclose(g[k], grads[k], rtol=0, atol=1e-12)


# --- training methods through the contract ---------------------------------------------------

def _train(method, net, p, X, y, steps):
    first = ptoc.loss(net, p, X, y)
    state = method.init(net, p)
    for _ in range(steps):
        outcome = method.step(net, p, state, X, y)
        p, state = outcome.params, outcome.state
    return first, p, state


def _small():
    return _problem(channels=2, depth=4, image=(1, 4, 4), batch=6)


def test_simultaneous_training_trains_the_network():
    from ptoc.simultaneous import SimultaneousGradient

    net, p, X, y = _small()
    grad_fn = SimultaneousGradient(net, ptoc.MGRIT(coarsening=2, max_iterations=2, tol=1e-13),
                                   comm=2, exact_every=5)
    first, p, _ = _train(GradientMethod(Adam(lr=0.02), grad_fn=grad_fn), net, p, X, y, 15)
    assert ptoc.loss(net, p, X, y) < 0.9 * first
    assert all(r.warm for r in grad_fn.records[1:])


@pytest.mark.parametrize("update", ["gradient", "hamiltonian"])
def test_pgcl_trains_the_network(update):
    net, p, X, y = _small()
    method = ptoc.PGCL(optimizer=Adam(lr=0.02), comm=2, local_steps=2, local_update=update)
    first, p, _ = _train(method, net, p, X, y, 15)
    assert ptoc.loss(net, p, X, y) < 0.9 * first


@pytest.mark.parametrize("method", ["emsa", "msa"])
def test_the_methods_of_successive_approximations_train_the_network(method):
    net, p, X, y = _small()
    m = (ptoc.EMSA(rho=1.0, inner_steps=3) if method == "emsa"
         else ptoc.MSA(inner_steps=3, lr=0.5))
    first, p, _ = _train(m, net, p, X, y, 6)
    assert sorted(p) == sorted(net.param_shapes())
    assert ptoc.loss(net, p, X, y) < 0.95 * first


@pytest.mark.parametrize("kind", ["ternary", "binary"])
def test_discrete_weights_train_the_network(kind):
    """Li & Hao's discrete-weight MSA: every kernel entry of K_n is a_n times -1, 0 or 1
    (or -1, 1)."""
    net, p, X, y = _small()
    m = ptoc.DiscreteMSA(kind=kind, optimizer=Adam(lr=0.02))
    state = m.init(net, p)
    first = ptoc.loss(net, m.discrete_params(net, p, state), X, y)
    for _ in range(20):
        outcome = m.step(net, p, state, X, y)
        p, state = outcome.params, outcome.state
    allowed = {-1.0, 1.0} if kind == "binary" else {-1.0, 0.0, 1.0}
    assert set(np.unique(state.levels)) <= allowed
    assert np.array_equal(p["K"], state.scale.reshape(-1, 1, 1, 1, 1) * state.levels)
    assert ptoc.loss(net, p, X, y) < 0.9 * first


# --- the API and its errors ---------------------------------------------------------------------

def test_images_and_flattened_images_give_the_same_result():
    net, p, X, y = _problem()
    images = X.reshape((len(X),) + net.image_shape)
    assert ptoc.loss_and_grad(net, p, images, y)[0] == ptoc.loss_and_grad(net, p, X, y)[0]
    np.testing.assert_array_equal(ptoc.predict(net, p, images), ptoc.predict(net, p, X))
    assert ptoc.accuracy(net, p, X, y) == np.mean(ptoc.predict(net, p, X) == y)
    assert ptoc.predict_logits(net, p, X).shape == (len(X), net.n_classes)


def test_bad_input_gets_a_clear_error():
    net, p, X, y = _problem()
    with pytest.raises(ValueError, match="unknown target 'gpu'; valid choices are 'numpy', "
                                         "'cpu', 'cuda'"):
        ptoc.loss_and_grad(net, p, X, y, target="gpu")
    with pytest.raises(ValueError, match=r"image_shape=\(2, 5, 6\)"):
        ptoc.loss(net, p, X.reshape(4, 2, 6, 5), y)
    with pytest.raises(ValueError, match="flattened images"):
        ptoc.predict(net, p, X[:, :7])
    bad = dict(p, K=p["K"][:, :, :, :2])
    with pytest.raises(ValueError, match=r"params\['K'\] has shape"):
        ptoc.loss_and_grad(net, bad, X, y)
    with pytest.raises(ValueError, match="checkpoint_every"):
        ptoc.loss_and_grad(net, p, X, y, checkpoint_every=2)
    with pytest.raises(ValueError, match="label 7 is out of range"):
        ptoc.loss(net, p, X, np.array([0, 1, 7, 2]))
    with pytest.raises(ValueError, match="image_shape"):
        ptoc.ConvResNet(3, 4, image_shape=(28, 28))
    with pytest.raises(ValueError, match="channels"):
        ptoc.ConvResNet(0, 4)
    with pytest.raises(ValueError, match=r"K has shape \(3, 3, 3, 2\)"):
        conv_kernels.conv_layer_step(np.zeros((1, 3, 4, 4)), np.zeros((3, 3, 3, 2)),
                                     np.zeros(3), 0.1)


def test_the_parameters_have_the_documented_keys_and_shapes():
    net = ptoc.ConvResNet(4, 8, image_shape=(1, 28, 28))
    shapes = {k: v.shape for k, v in net.init_params(0).to_dict().items()}
    assert shapes == {"K": (8, 4, 4, 3, 3), "b": (8, 4), "K_in": (4, 1, 3, 3), "b_in": (4,),
                      "W": (10, 4 * 28 * 28), "mu": (10,)}


def test_adjoint_refuses_a_forward_result_of_the_other_kind_of_network():
    """A ConvResNet's forward result given with a ResNet, and the other way round, is a
    clear error naming what was computed for what (not an AttributeError)."""
    net, p, X, y = _problem()
    fwd_conv = ptoc.forward(net, p, X, target="numpy")
    dense = ptoc.ResNet(width=3, depth=4, n_in=60, n_classes=3)
    with pytest.raises(ValueError, match="fwd was computed for a ConvResNet"):
        ptoc.adjoint(dense, dense.init_params(0), fwd_conv, np.zeros((4, 3)))
    fwd_dense = ptoc.forward(dense, dense.init_params(0), X)
    with pytest.raises(ValueError, match="ForwardResult of ptoc.forward with this network"):
        ptoc.adjoint(net, p, fwd_dense, np.zeros_like(fwd_conv.final_state))


@pytest.mark.parametrize("solver", [ptoc.Serial(), ptoc.MGRIT(coarsening=2, max_iterations=2)])
def test_blas_runs_on_one_thread_while_the_cpu_kernels_own_the_cores(monkeypatch, solver):
    """The classifier's NumPy products run with BLAS held to one thread during a
    gradient on the CPU target (a spinning multi-threaded BLAS slows the Numba threads
    down on a small machine), and BLAS gets its threads back afterwards."""
    from threadpoolctl import threadpool_info

    import ptoc.conv

    def blas_threads():  # NumPy's own BLAS (other libraries may have loaded their own)
        return [p["num_threads"] for p in threadpool_info()
                if p["user_api"] == "blas" and "numpy" in p["filepath"]]

    before = blas_threads()
    seen = []
    real = ptoc.conv.classifier_loss

    def spy(*args):
        seen.append(blas_threads())
        return real(*args)

    monkeypatch.setattr(ptoc.conv, "classifier_loss", spy)
    net, p, X, y = _problem(channels=2, depth=4, image=(1, 4, 4), batch=3)
    ptoc.loss_and_grad(net, p, X, y, target="cpu", solver=solver)
    assert before and seen and all(threads == [1] * len(before) for threads in seen)
    assert blas_threads() == before
