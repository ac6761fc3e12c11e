"""The convolutional ResNet's fused serial gradient and its compiled MGRIT level steps.

On one rank with the serial sweep the gradient keeps ``sigma'(a_n)`` from the state
sweep and computes each adjoint and layer gradient together (one convolution forward, a
transposed convolution and a kernel gradient backward): it must equal the NumPy
reference to 1e-12 and central differences. :class:`ptoc.conv.ConvLevelSteps` runs a
whole relaxation of a level in one compiled call: its results must have the bits of the
generic :class:`ptoc.propagator.LevelSteps`, in every solver and on any number of threads.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ptoc
from ptoc import _config
from ptoc.conv import ConvCudaLevelSteps, ConvLevelSteps, ConvResNetPropagator
from ptoc.kernels import conv_cpu
from ptoc.parallel import parallel_gradient
from ptoc.propagator import LevelPlan, LevelSteps

ROOT = Path(__file__).resolve().parents[1]


def _problem(channels=2, depth=4, image=(1, 5, 4), batch=3, n_classes=3, seed=0):
    net = ptoc.ConvResNet(channels, depth, image_shape=image, n_classes=n_classes,
                          gamma=1e-2, gamma_t=1e-1, gamma_c=1e-2)
    p = net.init_params(seed).to_dict()
    rng = np.random.default_rng(seed + 1)
    for k in ("b", "b_in", "mu"):  # nonzero biases: every parameter matters
        p[k][...] = 0.3 * rng.standard_normal(p[k].shape)
    X = rng.standard_normal((batch, int(np.prod(image))))
    y = rng.integers(0, n_classes, batch)
    return net, p, X, y


# --- the fused serial gradient ---------------------------------------------------------------

@settings(deadline=None, max_examples=8)
@given(channels=st.integers(1, 3), height=st.integers(2, 6), width=st.integers(2, 6),
       depth=st.integers(1, 4), batch=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_the_fused_serial_gradient_equals_the_numpy_reference(channels, height, width, depth,
                                                              batch, seed):
    net, p, X, y = _problem(channels, depth, (2, height, width), batch, seed=seed)
    loss, grads = ptoc.loss_and_grad(net, p, X, y, target="cpu")
    ref_loss, ref = ptoc.loss_and_grad(net, p, X, y, target="numpy")
    assert abs(loss - ref_loss) <= 1e-12 * abs(ref_loss)
    for k in p:
        np.testing.assert_allclose(grads[k], ref[k], rtol=0, atol=1e-12)


def test_the_fused_serial_gradient_equals_central_differences():
    net, p, X, y = _problem(depth=3)
    _, grads = ptoc.loss_and_grad(net, p, X, y, target="cpu")
    for key, index in (("K", (1, 0, 1, 2, 0)), ("b", (2, 1))):
        def J(t, key=key, index=index):
            q = {k: v.copy() for k, v in p.items()}
            q[key][index] += t
            return ptoc.loss(net, q, X, y, target="cpu")
        eps = 1e-4
        d1 = (J(eps) - J(-eps)) / (2 * eps)
        d2 = (J(eps / 2) - J(-eps / 2)) / eps
        fd = (4 * d2 - d1) / 3
        assert abs(fd - grads[key][index]) <= 1e-8 * max(1.0, abs(fd))


def test_the_serial_gradient_runs_three_convolution_passes_per_layer(monkeypatch):
    """Forward: one layer kernel per layer, storing sigma'; backward: one adjoint kernel
    per layer that reads it (transposed convolution and kernel gradient, no convolution
    recomputed) and computes lambda_n and the layer gradient together."""
    net, p, X, y = _problem(depth=4)
    calls = []
    layer, adjoint = conv_cpu.layer, conv_cpu.adjoint

    def spy_layer(x, K, b, h, act, residual, out, dsig):
        calls.append(("layer", K.shape[1] == net.channels, dsig is not None))
        return layer(x, K, b, h, act, residual, out, dsig)

    def spy_adjoint(x, lam, K, b, h, act, out, gK, gb, dsig=None):
        assert gK is not None
        calls.append(("adjoint", out is not None, dsig is not None))
        if dsig is None:
            return adjoint(x, lam, K, b, h, act, out, gK, gb)
        return adjoint(x, lam, K, b, h, act, out, gK, gb, dsig)

    monkeypatch.setattr(conv_cpu, "layer", spy_layer)
    monkeypatch.setattr(conv_cpu, "adjoint", spy_adjoint)
    ptoc.loss_and_grad(net, p, X, y, target="cpu")
    residual_layers = [c for c in calls if c[0] == "layer" and c[1]]
    assert residual_layers == [("layer", True, True)] * net.depth
    # then the opening's gradient: the adjoint kernel without lambda_0's output, from the
    # sigma' the opening kept
    assert [c for c in calls if c[0] == "adjoint"] == ([("adjoint", True, True)] * net.depth
                                                       + [("adjoint", False, True)])


def test_sigma_prime_is_kept_only_for_the_layers_that_fit_their_bound(monkeypatch):
    """With room for two layers' sigma', two are kept and the others recomputed: the same
    bits as with all kept, and as the adjoint_step loop."""
    net, p, X, y = _problem(depth=5)
    params = net.check_params(p)
    prop = ConvResNetPropagator(net, params, y, target="cpu")
    x0 = net.opening(params, net.check_inputs(X)[0])[0]
    lam_N = np.random.default_rng(3).standard_normal(x0.shape)

    def sweeps():
        states, dsig = prop.gradient_forward(x0)
        grad = prop.zero_gradient()
        return states, dsig, prop.gradient_backward(states, dsig, lam_N, grad), grad

    states, dsig, lams, grad = sweeps()
    assert len(dsig) == net.depth
    monkeypatch.setattr(_config, "STORED_DERIVATIVE_BYTES", 2 * x0.nbytes + 1)
    _, few, lams2, grad2 = sweeps()
    assert len(few) == 2
    monkeypatch.setattr(_config, "STORED_DERIVATIVE_BYTES", 0)
    _, none, lams3, grad3 = sweeps()
    assert none is None
    loop = prop.zero_gradient()
    lam = lam_N
    for n in range(net.depth - 1, -1, -1):
        lam = prop.adjoint_step(n, states[n], lam, loop)
        np.testing.assert_array_equal(lams[n], lam)
    for other in (grad2, grad3, loop):
        for a, r in zip(other, grad, strict=True):
            np.testing.assert_array_equal(a, r)
    np.testing.assert_array_equal(lams2, lams)
    np.testing.assert_array_equal(lams3, lams)


# --- compiled level steps ----------------------------------------------------------------------

def _plans(prop, states, rng):
    """A fine and a coarse plan of each sweep over ``prop``'s layers."""
    N = prop.n_layers
    fine = np.arange(N, dtype=np.int64)
    order = fine[::-1].copy()
    spans = np.array([2, 1, 3][:N], dtype=np.int64)
    weights = tuple(w + 0.1 * rng.standard_normal(w.shape)
                    for w in prop.stacked_parameters(fine[:len(spans)]))
    return {
        "forward fine": LevelPlan(0, False, fine, np.ones(N, np.int64)),
        "adjoint fine": LevelPlan(0, True, order, np.ones(N, np.int64), states=states[order]),
        "forward coarse": LevelPlan(1, False, fine[:len(spans)], spans, weights),
        "adjoint coarse": LevelPlan(1, True, fine[:len(spans)], spans, weights,
                                    states[:len(spans)]),
    }


def _level_results(prop, plans, u0, g):
    """Runs (two of them, with and without ``g``) and points of every plan."""
    out = {}
    for name, plan in plans.items():
        steps = prop.level_steps(plan)
        n = plan.n_steps
        u = np.zeros((n + 1,) + u0.shape)
        u[0] = u0
        steps.runs(u, g[:n + 1], np.array([1]), np.array([n]))
        v = u.copy()
        steps.runs(v, None, np.array([1, n]), np.array([1, n]))
        out[name] = (u, v, steps.points_apply(u, np.array([n, 1])))
    return out


@pytest.mark.parametrize("target, batch, kind", [
    ("cpu", 5, ConvLevelSteps),
    pytest.param("cuda", 2, ConvCudaLevelSteps, marks=pytest.mark.cuda)])
def test_conv_level_steps_have_the_bits_of_the_generic_level_steps(target, batch, kind):
    """Forward and adjoint, fine and coarse plans, runs with and without a right-hand
    side, points: the compiled (cpu) and device-resident (cuda) level steps do the
    arithmetic of the one-step kernels of their target, bit for bit."""
    net, p, X, y = _problem(depth=4, batch=batch)
    params = net.check_params(p)
    prop = ConvResNetPropagator(net, params, y, target=target)
    rng = np.random.default_rng(7)
    x0 = net.opening(params, net.check_inputs(X)[0])[0]
    states = np.empty((net.depth + 1,) + x0.shape)
    prop.propagate(x0, 0, net.depth, states)
    plans = _plans(prop, states, rng)
    g = rng.standard_normal((net.depth + 1,) + x0.shape)
    for plan in plans.values():
        assert type(prop.level_steps(plan)) is kind
    fast = _level_results(prop, plans, x0, g)

    class Generic(ConvResNetPropagator):
        def level_steps(self, plan):
            return LevelSteps(self, plan)

    slow = _level_results(Generic(net, params, y, target=target), plans, x0, g)
    for name in plans:
        for a, r in zip(fast[name], slow[name], strict=True):
            np.testing.assert_array_equal(a, r, err_msg=name)


@pytest.mark.parametrize("solver, comm", [
    (ptoc.Serial(), 2), (ptoc.Parareal(chunks=2, coarse="average", max_iterations=1), None),
    (ptoc.MGRIT(coarsening=2, max_iterations=2), 2)])
def test_every_solver_has_the_bits_of_the_generic_level_steps(solver, comm, monkeypatch):
    """States, adjoints and the gradient of a solve on simulated ranks (not converged:
    every level step shows) with the compiled level steps and with the generic ones."""
    net, p, X, y = _problem(depth=6)
    params = net.check_params(p)
    X = net.check_inputs(X)[0]
    fast = parallel_gradient(net, params, X, y, solver, comm=comm)
    monkeypatch.setattr(ConvResNetPropagator, "level_steps",
                        lambda self, plan: LevelSteps(self, plan))
    slow = parallel_gradient(net, params, X, y, solver, comm=comm)
    np.testing.assert_array_equal(fast.states, slow.states)
    np.testing.assert_array_equal(fast.adjoints, slow.adjoints)
    for k in p:
        np.testing.assert_array_equal(fast.grads[k], slow.grads[k])


_THREADS_SCRIPT = """
import hashlib, numba, numpy as np, ptoc
from ptoc.parallel import parallel_gradient
net = ptoc.ConvResNet(2, 6, image_shape=(1, 5, 4), n_classes=3)
p = net.init_params(0)
rng = np.random.default_rng(1)
p.b[...] = 0.3 * rng.standard_normal(p.b.shape)
X, y = rng.standard_normal((7, 20)), rng.integers(0, 3, 7)
for threads in (1, 2):
    numba.set_num_threads(threads)
    digest = hashlib.sha256()
    for solver in (ptoc.Serial(), ptoc.MGRIT(coarsening=2, max_iterations=2)):
        r = parallel_gradient(net, p, net.check_inputs(X)[0], y, solver,
                              comm=None if isinstance(solver, ptoc.Serial) else 2)
        for a in (r.states, r.adjoints, r.grads.K, r.grads.b, r.grads.W):
            digest.update(np.ascontiguousarray(a).tobytes())
    print(digest.hexdigest())
"""


def test_the_level_steps_and_the_fused_gradient_do_not_depend_on_the_threads():
    """Serial (fused) and MGRIT (compiled level steps) on 1 and 2 Numba threads: the same
    bits (in a process with 2 threads, whatever this one has)."""
    env = dict(os.environ, NUMBA_NUM_THREADS="2", PYTHONPATH=str(ROOT))
    run = subprocess.run([sys.executable, "-c", _THREADS_SCRIPT], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    one, two = run.stdout.split()
    assert one == two
