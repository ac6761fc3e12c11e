"""The CUDA level steps of the convolutional ResNet (ptoc.conv.ConvCudaLevelSteps, on the
level kernels of ptoc.kernels.conv_cuda), on Numba's CUDA simulator (see conftest.py):
the numbers of the CPU target, and solves that move data between host and device a
number of times that does not grow with the depth (their bits against the generic level
steps are checked in tests/test_conv_fused.py). The simulator runs every thread in
Python, so the problems are tiny."""

import numpy as np
import pytest

import ptoc
from ptoc import kernels
from ptoc.conv import ConvResNetPropagator
from ptoc.kernels import conv_cuda

pytestmark = pytest.mark.cuda

#: Two levels and two iterations whatever the residual, so that every depth runs the same
#: cycles (more levels would add copies per level, not per layer).
SOLVER = ptoc.MGRIT(coarsening=2, max_levels=2, tol=0, max_iterations=2)


def problem(depth, channels=2, batch=2, seed=0):
    net = ptoc.ConvResNet(channels, depth, image_shape=(1, 4, 4), n_classes=3)
    p = net.init_params(seed, scale=1.5)
    rng = np.random.default_rng(seed + 1)
    p.b[...] = 0.3 * rng.standard_normal(p.b.shape)  # nonzero biases: every entry matters
    return net, p, rng.standard_normal((batch, 16)), rng.integers(0, 3, batch)


def test_level_kernels_copy_host_inputs_once_and_leave_device_arrays_there():
    """Three runs of up to three steps: u, g and the run bounds go over once, u comes
    back once; with device weights nothing else moves."""
    rng = np.random.default_rng(3)
    u, g, X = (rng.standard_normal((7, 2, 2, 3, 4)) for _ in range(3))
    K, b, dt = rng.standard_normal((7, 2, 2, 3, 3)), rng.standard_normal((7, 2)), rng.random(7)
    starts, ends = np.array([1, 3, 5]), np.array([2, 4, 6])
    cuda = kernels.backend("cuda")
    with cuda.counting_transfers() as host_weights:
        conv_cuda.adjoint_runs(u.copy(), g, X, K, b, dt, 0, starts, ends)
    assert (host_weights.to_device, host_weights.to_host) == (7, 1)
    dX, dK, db, ddt = (conv_cuda.to_device(a) for a in (X, K, b, dt))
    with cuda.counting_transfers() as device_weights:
        conv_cuda.adjoint_runs(u.copy(), g, dX, dK, db, ddt, 0, starts, ends)
        conv_cuda.state_points(u, dK, db, ddt, 0, starts, np.empty((3,) + u.shape[1:]))
    assert (device_weights.to_device, device_weights.to_host) == (3 + 2, 1 + 1)


def counted_gradient(depth, solver=SOLVER, channels=2):
    """Transfers of a state solve, an adjoint solve and a whole ``loss_and_grad`` on
    ``"cuda"``, the gradient, and the gradient on ``"cpu"``."""
    cuda = kernels.backend("cuda")
    net, p, X, y = problem(depth, channels)
    with cuda.counting_transfers() as fwd_moved:
        fwd = ptoc.forward(net, p, X, target="cuda", solver=solver)
    lam_N = net.terminal(p, fwd.final_state, y)[1]
    with cuda.counting_transfers() as adj_moved:
        ptoc.adjoint(net, p, fwd, lam_N, target="cuda", solver=solver)
    with cuda.counting_transfers() as all_moved:
        gpu = ptoc.loss_and_grad(net, p, X, y, target="cuda", solver=solver)
    cpu = ptoc.loss_and_grad(net, p, X, y, target="cpu", solver=solver)
    return (fwd_moved, adj_moved, all_moved), gpu, cpu


def _assert_equal_to_cpu(gpu, cpu):
    assert abs(gpu[0] - cpu[0]) <= 1e-12
    for k in cpu[1]:
        np.testing.assert_allclose(gpu[1][k], cpu[1][k], rtol=0, atol=1e-12, err_msg=k)


@pytest.mark.slow
def test_a_solve_moves_data_a_number_of_times_independent_of_the_depth():
    """MGRIT solves and a whole ``loss_and_grad`` at depths 8 and 32 make the same copies
    between host and device (the generic level steps copied the states at every layer
    step, and the layer gradients copied every layer's arrays), and give the gradient of
    the CPU target."""
    moved8, gpu8, cpu8 = counted_gradient(8, channels=1)
    moved32, gpu32, cpu32 = counted_gradient(32, channels=1)
    assert moved8 == moved32
    assert all(m.to_device > 0 and m.to_host > 0 for m in moved32)
    _assert_equal_to_cpu(gpu8, cpu8)
    _assert_equal_to_cpu(gpu32, cpu32)


def test_mgrit_gradient_on_cuda_equals_the_cpu_target():
    _, gpu, cpu = counted_gradient(8)
    _assert_equal_to_cpu(gpu, cpu)


def test_batched_layer_gradients_have_the_bits_of_one_layer_at_a_time():
    net, p, X, y = problem(depth=3)
    params = net.check_params(p)
    prop = ConvResNetPropagator(net, params, y, target="cuda")
    rng = np.random.default_rng(5)
    xs, lams = (rng.standard_normal((3, 2, 2, 4, 4)) for _ in range(2))
    batched, looped = prop.zero_gradient(), prop.zero_gradient()
    cuda = kernels.backend("cuda")
    with cuda.counting_transfers() as moved:
        prop.layer_gradients(0, xs, lams, batched)
    assert moved.total == 6 + 2
    for n in range(3):
        prop.layer_gradient(n, xs[n], lams[n], looped)
    for a, r in zip(batched, looped, strict=True):
        np.testing.assert_array_equal(a, r)
