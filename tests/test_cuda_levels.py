"""The CUDA level kernels of the layer-parallel solvers (ptoc.kernels.cuda), on Numba's
CUDA simulator (see conftest.py): the same numbers as the CPU level kernels, and a solve
that moves data between host and device a number of times that does not grow with the
depth."""

import os
import subprocess
import sys

import numpy as np
import pytest

import ptoc
from ptoc import kernels
from ptoc.objective import classifier_loss
from ptoc.parallel import MGRIT, Parareal
from ptoc.parallel.driver import parallel_gradient

pytestmark = pytest.mark.cuda

#: Two iterations whatever the residual, so that both depths run the same cycles.
SOLVERS = {
    "mgrit": MGRIT(coarsening=4, max_levels=2, tol=0, max_iterations=2),
    "parareal": Parareal(chunks=2, tol=0, max_iterations=2),
}


def problem(depth, width=2, S=3, seed=0):
    rng = np.random.default_rng(seed)
    net = ptoc.ResNet(width=width, depth=depth, n_in=3, n_classes=3)
    params = net.init_params(rng, scale=1.5)
    params.b[...] = rng.standard_normal(params.b.shape)
    return net, params, rng.standard_normal((S, 3)), rng.integers(0, 3, S)


def counted_solves(depth, solver):
    """Transfers of a state solve, an adjoint solve and a whole ``loss_and_grad``, and the
    layer steps the first two ran."""
    cuda = kernels.backend("cuda")
    net, params, X, y = problem(depth)
    with cuda.counting_transfers() as fwd_moved:
        fwd = ptoc.forward(net, params, X, target="cuda", solver=solver)
    lam_N = classifier_loss(params, fwd.final_state, y)[1]
    with cuda.counting_transfers() as adj_moved:
        adj = ptoc.adjoint(net, params, fwd, lam_N, target="cuda", solver=solver)
    with cuda.counting_transfers() as all_moved:
        ptoc.loss_and_grad(net, params, X, y, target="cuda", solver=solver)
    assert fwd.solve.iterations == adj.solve.iterations == 2
    steps = fwd.solve.steps_total + adj.solve.steps_total
    return (fwd_moved, adj_moved, all_moved), steps


@pytest.mark.parametrize("name", [pytest.param("mgrit", marks=pytest.mark.slow), "parareal"])
def test_a_solve_moves_data_a_number_of_times_independent_of_the_depth(name):
    """Level kernels run a whole relaxation on the device: the copies per solve depend on
    the iterations and levels, not on the layers (the generic level steps copied the
    states to the device and back at every layer step)."""
    moved16, steps16 = counted_solves(16, SOLVERS[name])
    moved64, steps64 = counted_solves(64, SOLVERS[name])
    assert moved16 == moved64
    assert steps64 > 3 * steps16 > 0
    fwd, adj, whole = moved64
    assert fwd.to_host > 0 and adj.to_host > 0
    assert fwd.total + adj.total < steps64 / 2
    assert whole.total < steps64 / 2


def test_every_kernel_argument_must_already_be_on_the_device():
    """A host array given to a kernel would be copied by Numba, unseen by the counter."""
    cuda = kernels.backend("cuda")
    with pytest.raises(TypeError, match="host array of shape \\(2, 2\\)"):
        cuda._launch(cuda._g_kernel, 1, 1, np.zeros((2, 2)))


def test_counting_transfers_counts_each_copy_once():
    cuda = kernels.backend("cuda")
    x = np.arange(6.0).reshape(2, 3)
    with cuda.counting_transfers() as moved:
        d = cuda.to_device(x)
        assert cuda.to_device(d) is d  # already there: no copy
        back = np.empty((3, 2)).T  # not C-contiguous
        cuda._download(d, back)
    assert (moved.to_device, moved.to_host) == (1, 1)
    assert np.array_equal(back, x)


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_cuda_solves_match_the_cpu_solves(name):
    solver = SOLVERS[name]
    net, params, X, y = problem(12, width=3, S=5, seed=1)
    cpu = parallel_gradient(net, params, X, y, solver, target="cpu")
    gpu = parallel_gradient(net, params, X, y, solver, target="cuda")
    np.testing.assert_allclose(gpu.states, cpu.states, rtol=0, atol=1e-12)
    np.testing.assert_allclose(gpu.adjoints, cpu.adjoints, rtol=0, atol=1e-12)
    for k in cpu.grads:
        np.testing.assert_allclose(gpu.grads[k], cpu.grads[k], rtol=0, atol=1e-12)
    assert abs(gpu.loss - cpu.loss) <= 1e-12


def test_parareal_on_cuda_ends_on_the_serial_cuda_sweep_bitwise():
    """After as many iterations as chunks every chunk has run from its exact start, so the
    states and adjoints are those of the serial sweeps on the same target, bit for bit."""
    net, params, X, y = problem(12, width=3, S=5, seed=2)
    fwd = ptoc.forward(net, params, X, target="cuda")
    lam_N = classifier_loss(params, fwd.final_state, y)[1]
    adj = ptoc.adjoint(net, params, fwd, lam_N, target="cuda", keep_adjoints=True)
    r = parallel_gradient(net, params, X, y, Parareal(chunks=3, max_iterations=3, tol=0),
                          target="cuda")
    assert np.array_equal(r.states, fwd.states)
    assert np.array_equal(r.adjoints, adj.adjoints)


_STRICT_SCRIPT = """
import numpy as np
import ptoc
from ptoc import _config, kernels
from ptoc.parallel import MGRIT
from ptoc.parallel.driver import parallel_gradient
assert _config.CPU_FASTMATH is False
cpu, cuda = kernels.backend("cpu"), kernels.backend("cuda")
for S, d, n, chunk in [(1, 1, 4, 32), (11, 9, 5, 4), (5, 13, 6, 2)]:
    for act in (0, 1, 2):
        rng = np.random.default_rng(S + d)
        u, g, X = (rng.standard_normal((n, S, d)) for _ in range(3))
        K, b = rng.standard_normal((n, d, d)) * 1.5 / np.sqrt(d), rng.standard_normal((n, d))
        dt = rng.random(n)
        starts, ends = np.array([1, n // 2 + 1]), np.array([n // 2 - 1, n - 1])
        points = np.array([1, n - 1, 2])
        outs = []
        for kern in (cpu, cuda):
            D = np.zeros_like(X)
            kern.level_derivatives(X, K, b, act, D, chunk)
            res = [D]
            for rhs in (None, g):
                su, au = u.copy(), u.copy()
                kern.state_runs(su, rhs, K, b, dt, act, starts, ends, chunk)
                kern.adjoint_runs(au, rhs, D, K, dt, starts, ends, chunk)
                res += [su, au]
            sp, ap = np.empty((3, S, d)), np.empty((3, S, d))
            kern.state_points(u, K, b, dt, act, points, sp, chunk)
            kern.adjoint_points(u, D, K, dt, points, ap, chunk)
            rows = np.array([2, 0, 1])
            for mode in (1, 2, 3):  # ptoc._maths.POINT_RESIDUAL, POINT_RESIDUAL_G, POINT_TAU
                sq, aq = np.full((3, S, d), 0.5), np.full((3, S, d), 0.5)
                kern.state_points_into(u, K, b, dt, act, points, sq, rows, g, mode, chunk)
                kern.adjoint_points_into(u, D, K, dt, points, aq, rows, g, mode, chunk)
                res += [sq, aq]
            gK, gb = np.ones_like(K), np.ones_like(b)
            kern.layer_gradients(X, u[::-1], K, b, 0.3, act, gK, gb, chunk)
            outs.append(res + [sp, ap, gK, gb])
        for i, (c, gpu) in enumerate(zip(*outs, strict=True)):
            assert np.array_equal(c, gpu), (S, d, n, chunk, act, i)
rng = np.random.default_rng(0)
net = ptoc.ResNet(width=3, depth=12, n_in=3, n_classes=3)
params = net.init_params(rng, scale=1.5)
X, y = rng.standard_normal((5, 3)), rng.integers(0, 3, 5)
solver = MGRIT(coarsening=2, max_levels=3, tol=0, max_iterations=2)
a, c = (parallel_gradient(net, params, X, y, solver, target=t) for t in ("cpu", "cuda"))
assert np.array_equal(a.states, c.states) and np.array_equal(a.adjoints, c.adjoints)
assert all(np.array_equal(a.grads[k], c.grads[k]) for k in a.grads)
print("ok")
"""


@pytest.mark.slow
def test_strict_cpu_level_kernels_equal_the_cuda_ones_bit_for_bit():
    """With PTOC_FASTMATH=0 the CPU level kernels add the same terms in the same order as
    the CUDA ones (which call ptoc._maths per entry): every level kernel, with and
    without a right-hand side, and a three-level MGRIT gradient, give the same bits."""
    env = os.environ | {"PTOC_FASTMATH": "0", "NUMBA_ENABLE_CUDASIM": "1"}
    out = subprocess.run([sys.executable, "-c", _STRICT_SCRIPT], capture_output=True,
                         text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["ok"]
