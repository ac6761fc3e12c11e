"""The CUDA kernels of the convolutional residual layer (ptoc.kernels.conv_cuda).

Run on Numba's CUDA simulator (``tests/conftest.py`` sets ``NUMBA_ENABLE_CUDASIM=1``
before numba is imported; ``PTOC_TEST_REAL_CUDA=1`` runs them on a GPU): every kernel
against the NumPy reference over random channel counts, image sizes and batches, the
optional outputs, device arrays, a whole gradient and an MGRIT solve of a small
ConvResNet, bitwise independence of the launch configuration, and the error without a
GPU. The simulator runs every thread in Python, so the problems are tiny.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ptoc
from ptoc import _config, kernels
from ptoc.activations import Activation
from ptoc.kernels import Target, conv_reference
from ptoc.kernels import conv as conv_kernels

pytestmark = pytest.mark.cuda

ACTS = [a.code for a in Activation]


@pytest.fixture(scope="module")
def conv_cuda():
    return conv_kernels.conv_backend("cuda")


def _arrays(rng, S, C_in, C_out, H, W):
    x = rng.standard_normal((S, C_in, H, W))
    K = rng.standard_normal((C_out, C_in, 3, 3)) / np.sqrt(9 * C_in)
    b = rng.standard_normal(C_out)
    lam = rng.standard_normal((S, C_out, H, W))
    return x, K, b, lam


def _close(actual, expected):
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-12)


@settings(max_examples=6, deadline=None)
@given(channels=st.integers(1, 3), image_channels=st.integers(1, 3), H=st.integers(1, 6),
       W=st.integers(1, 6), S=st.integers(1, 5), act=st.sampled_from(ACTS),
       seed=st.integers(0, 2**16))
def test_every_kernel_equals_the_numpy_reference(conv_cuda, channels, image_channels, H, W, S,
                                                 act, seed):
    """layer (residual, and the opening's C_in -> C_out without residual), adjoint with its
    gradient accumulated into non-zero gK, gb, the Hamiltonian and its gradient, float64,
    to 1e-12."""
    rng = np.random.default_rng(seed)
    x, K, b, lam = _arrays(rng, S, channels, channels, H, W)
    h = 0.37
    runs = {}
    for name, kern in (("numpy", conv_reference), ("cuda", conv_cuda)):
        out, dsig = np.empty_like(x), np.empty_like(x)
        returned = kern.layer(x, K, b, h, act, True, out, dsig)
        assert returned is out
        gK, gb = np.full_like(K, 0.5), np.full_like(b, -0.25)
        adj = kern.adjoint(x, lam, K, b, h, act, np.empty_like(x), gK, gb)
        hK, hb = np.ones_like(K), np.ones_like(b)
        kern.hamiltonian_grad(x, lam, K, b, h, act, hK, hb)
        runs[name] = (out, dsig, adj, gK, gb, hK, hb, kern.hamiltonian(x, lam, K, b, h, act))
    for got, want in zip(runs["cuda"], runs["numpy"], strict=True):
        _close(got, want)

    # the opening: image_channels -> channels, no residual, h = 1, gradient only
    Y, K_in, b_in, lam0 = _arrays(rng, S, image_channels, channels, H, W)
    opened = {}
    for name, kern in (("numpy", conv_reference), ("cuda", conv_cuda)):
        out, dsig = np.empty_like(lam0), np.empty_like(lam0)
        kern.layer(Y, K_in, b_in, 1.0, act, False, out, dsig)
        gK, gb = np.zeros_like(K_in), np.zeros_like(b_in)
        assert kern.adjoint(Y, lam0, K_in, b_in, 1.0, act, None, gK, gb) is None
        opened[name] = (out, dsig, gK, gb)
    for got, want in zip(opened["cuda"], opened["numpy"], strict=True):
        _close(got, want)


def test_optional_outputs_are_left_alone(conv_cuda):
    """dsig=None computes only the layer; gK=None only the adjoint (gb untouched too);
    out=None only the gradient."""
    rng = np.random.default_rng(3)
    x, K, b, lam = _arrays(rng, 2, 2, 2, 3, 4)
    out = conv_cuda.layer(x, K, b, 0.2, 0, True, np.empty_like(x), None)
    _close(out, conv_reference.layer(x, K, b, 0.2, 0, True, np.empty_like(x), None))

    adj = conv_cuda.adjoint(x, lam, K, b, 0.2, 0, np.empty_like(x), None, None)
    ref_gK, ref_gb = np.zeros_like(K), np.zeros_like(b)
    ref_adj = conv_reference.adjoint(x, lam, K, b, 0.2, 0, np.empty_like(x), ref_gK, ref_gb)
    _close(adj, ref_adj)

    gK, gb = np.zeros_like(K), np.zeros_like(b)
    assert conv_cuda.adjoint(x, lam, K, b, 0.2, 0, None, gK, gb) is None
    _close(gK, ref_gK)
    _close(gb, ref_gb)


def test_device_arrays_are_accepted_and_left_on_the_device(conv_cuda):
    """Device inputs and outputs: the results are written into the caller's device arrays
    (the same objects returned), and the gradient accumulates on the device."""
    from numba import cuda

    rng = np.random.default_rng(4)
    x, K, b, lam = _arrays(rng, 3, 2, 2, 4, 3)
    dx, dK, db, dlam = map(cuda.to_device, (x, K, b, lam))
    dout, ddsig = cuda.device_array(x.shape), cuda.device_array(x.shape)
    assert conv_cuda.layer(dx, dK, db, 0.3, 2, True, dout, ddsig) is dout
    ref_out, ref_dsig = np.empty_like(x), np.empty_like(x)
    conv_reference.layer(x, K, b, 0.3, 2, True, ref_out, ref_dsig)
    _close(dout.copy_to_host(), ref_out)
    _close(ddsig.copy_to_host(), ref_dsig)

    dadj = cuda.device_array(x.shape)
    gK0, gb0 = rng.standard_normal(K.shape), rng.standard_normal(b.shape)
    dgK, dgb = cuda.to_device(gK0), cuda.to_device(gb0)
    assert conv_cuda.adjoint(dx, dlam, dK, db, 0.3, 2, dadj, dgK, dgb) is dadj
    ref_gK, ref_gb = gK0.copy(), gb0.copy()
    ref_adj = conv_reference.adjoint(x, lam, K, b, 0.3, 2, np.empty_like(x), ref_gK, ref_gb)
    _close(dadj.copy_to_host(), ref_adj)
    _close(dgK.copy_to_host(), ref_gK)
    _close(dgb.copy_to_host(), ref_gb)
    assert conv_cuda.hamiltonian(dx, dlam, dK, db, 0.3, 2) == pytest.approx(
        conv_reference.hamiltonian(x, lam, K, b, 0.3, 2), rel=0, abs=1e-12)


def test_results_do_not_depend_on_the_launch_configuration(conv_cuda, monkeypatch):
    """1 and 4 x 4 threads per block (several chunks of samples): identical bits."""
    monkeypatch.setattr(_config, "CHUNK", 2)
    rng = np.random.default_rng(5)
    x, K, b, lam = _arrays(rng, 5, 2, 2, 5, 4)
    results = []
    for threads in (1, 4):
        monkeypatch.setattr(_config, "CUDA_THREADS", threads)
        out, dsig = np.empty_like(x), np.empty_like(x)
        conv_cuda.layer(x, K, b, 0.3, 0, True, out, dsig)
        gK, gb = np.zeros_like(K), np.zeros_like(b)
        adj = conv_cuda.adjoint(x, lam, K, b, 0.3, 0, np.empty_like(x), gK, gb)
        results.append((out, dsig, adj, gK, gb, conv_cuda.hamiltonian(x, lam, K, b, 0.3, 0)))
    for first, second in zip(*results, strict=True):
        np.testing.assert_array_equal(first, second)


def _tiny_problem():
    net = ptoc.ConvResNet(2, 3, T=1.0, image_shape=(1, 5, 5), n_classes=3, gamma=1e-2,
                          gamma_t=1e-1, gamma_c=1e-2)
    p = net.init_params(0).to_dict()
    rng = np.random.default_rng(1)
    for k in ("b", "b_in", "mu"):  # nonzero biases: every parameter matters
        p[k][...] = 0.3 * rng.standard_normal(p[k].shape)
    X = rng.standard_normal((3, 25))
    y = rng.integers(0, 3, 3)
    return net, p, X, y


def test_a_whole_gradient_on_cuda_equals_numpy():
    net, p, X, y = _tiny_problem()
    loss, grads = ptoc.loss_and_grad(net, p, X, y, target="numpy")
    cuda_loss, cuda_grads = ptoc.loss_and_grad(net, p, X, y, target="cuda")
    assert cuda_loss == pytest.approx(loss, rel=1e-12, abs=0)
    assert cuda_grads.keys() == grads.keys()
    for key in grads:
        _close(cuda_grads[key], grads[key])
    np.testing.assert_array_equal(ptoc.predict(net, p, X, target="cuda"),
                                  ptoc.predict(net, p, X, target="numpy"))


def test_an_mgrit_solve_on_cuda_equals_the_serial_sweep():
    net, p, X, y = _tiny_problem()
    fwd = ptoc.forward(net, p, X, target="cuda")
    lamN = np.random.default_rng(2).standard_normal(fwd.final_state.shape)
    adj = ptoc.adjoint(net, p, fwd, lamN, keep_adjoints=True, target="cuda")
    solver = ptoc.MGRIT(coarsening=2, tol=1e-14)
    pfwd = ptoc.forward(net, p, X, solver=solver, target="cuda")
    padj = ptoc.adjoint(net, p, pfwd, lamN, solver=solver, target="cuda")
    assert pfwd.solve.converged and padj.solve.converged
    _close(pfwd.states, fwd.states)
    _close(padj.adjoints, adj.adjoints)
    _close(padj.grad_K, adj.grad_K)


def test_cuda_without_a_device_gives_the_dense_targets_error(monkeypatch):
    """No GPU and no simulator: the convolution kernels, the wrappers and the network all
    raise the dense CUDA target's ImportError with the fix, before any kernel runs."""
    from numba import cuda

    kernels.backend("cuda")
    monkeypatch.setattr(cuda, "is_available", lambda: False)
    monkeypatch.delitem(kernels._loaded, Target.CUDA)
    with pytest.raises(ImportError, match="no usable CUDA GPU.*NUMBA_ENABLE_CUDASIM=1"):
        conv_kernels.conv_backend("cuda")
    with pytest.raises(ImportError, match="no usable CUDA GPU"):
        conv_kernels.conv_layer_step(np.zeros((1, 2, 3, 3)), np.zeros((2, 2, 3, 3)),
                                     np.zeros(2), 0.1, target="cuda")
    net, p, X, y = _tiny_problem()
    with pytest.raises(ImportError, match="no usable CUDA GPU"):
        ptoc.loss_and_grad(net, p, X, y, target="cuda")


def test_the_wrappers_validate_before_a_cuda_kernel_runs():
    with pytest.raises(ValueError, match=r"K has shape \(3, 3, 3, 2\)"):
        conv_kernels.conv_layer_step(np.zeros((1, 3, 4, 4)), np.zeros((3, 3, 3, 2)),
                                     np.zeros(3), 0.1, target="cuda")
    with pytest.raises(ValueError, match="lam contains non-finite"):
        conv_kernels.conv_layer_adjoint_step(np.zeros((1, 1, 2, 2)), np.full((1, 1, 2, 2), np.nan),
                                             np.zeros((1, 1, 3, 3)), np.zeros(1), 0.1,
                                             target="cuda")


def test_a_stored_sigma_prime_gives_the_bits_of_the_recomputed_one(conv_cuda, monkeypatch):
    """The adjoint reads a stored ``sigma'`` as the other targets do (no convolution), with
    the same bits as recomputing it; the serial gradient on cuda keeps it from the state
    sweep and passes it to every layer's adjoint."""
    rng = np.random.default_rng(7)
    x, K, b, lam = _arrays(rng, 3, 2, 2, 4, 5)
    out = np.empty_like(x)
    dsig = np.empty_like(x)
    conv_cuda.layer(x, K, b, 0.3, Activation.TANH.code, True, out, dsig)
    results = []
    for stored in (None, dsig):
        o, gK, gb = np.empty_like(lam), np.zeros_like(K), np.zeros_like(b)
        conv_cuda.adjoint(x, lam, K, b, 0.3, Activation.TANH.code, o, gK, gb, stored)
        results.append((o, gK, gb))
    for a, r in zip(*results, strict=True):
        np.testing.assert_array_equal(a, r)

    seen = []
    real = conv_cuda.adjoint

    def spy(x, lam, K, b, h, act, out, gK, gb, dsig=None):
        seen.append(dsig is not None)
        return real(x, lam, K, b, h, act, out, gK, gb, dsig)

    monkeypatch.setattr(conv_cuda, "adjoint", spy)
    net, p, X, y = _tiny_problem()
    ptoc.loss_and_grad(net, p, X, y, target="cuda")
    assert seen == [True] * net.depth  # every layer (the opening runs on the CPU kernels)
