"""The three kernel targets against each other and against the element maths."""

import contextlib
import math
import platform

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ptoc import _maths as maths
from ptoc import kernels
from ptoc.activations import Activation, dsigma, sigma
from ptoc.kernels import Target, reference

ACTS = list(Activation)
COMPILED = [Target.CPU, pytest.param(Target.CUDA, marks=pytest.mark.cuda)]


def _layer(rng, S, d, dtype=np.float64, scale=1.0):
    x = rng.standard_normal((S, d)).astype(dtype)
    K = (rng.standard_normal((d, d)) * scale / np.sqrt(d)).astype(dtype)
    b = rng.standard_normal(d).astype(dtype)
    lam = rng.standard_normal((S, d)).astype(dtype)
    return x, K, b, lam


def _rel(a, b):
    return np.max(np.abs(np.asarray(a) - np.asarray(b))) / max(np.max(np.abs(b)), 1e-300)


# --- scalar maths ----------------------------------------------------------------------------

def test_tanh_is_accurate_to_a_few_ulp():
    rng = np.random.default_rng(0)
    a = np.concatenate([rng.standard_normal(20000) * 4, rng.uniform(-30, 30, 2000),
                        10.0 ** rng.uniform(-300, 1.5, 2000), [0.0, 19.999, 20.0, 20.001, 1e300]])
    a = np.concatenate([a, -a])
    ours = np.array([maths.tanh(v) for v in a])
    ref = np.tanh(a)
    ulps = np.abs(ours - ref) / np.spacing(np.abs(ref))
    assert ulps.max() <= 4
    assert math.isnan(maths.tanh(float("nan")))


@pytest.fixture(scope="module")
def compiled_tanh_loop():
    """``out[t] = tanh(a[t])`` compiled as the CPU kernels compile :func:`ptoc._maths.tanh`
    (jitable, the kernels' fast-math flags)."""
    from numba import njit
    from numba.extending import register_jitable

    from ptoc import _config
    from ptoc.kernels import _bits  # noqa: F401 - power_of_two for the CPU, as in the kernels

    tanh = register_jitable(maths.tanh)

    @njit(fastmath=_config.CPU_FASTMATH, error_model="numpy")
    def loop(a, out):
        for t in range(a.size):
            out[t] = tanh(a[t])

    return loop


def test_compiled_tanh_is_accurate_over_the_whole_range(compiled_tanh_loop):
    rng = np.random.default_rng(1)
    a = np.concatenate([rng.standard_normal(100000) * 4, rng.uniform(-30, 30, 10000),
                        10.0 ** rng.uniform(-320, 2, 10000), np.linspace(-1, 1, 20001),
                        [0.0, 5e-324, 1e-300, 19.999, 20.0, 20.001, 710.0, 1e300, np.inf]])
    a = np.concatenate([a, -a, [np.nan]])
    out = np.empty_like(a)
    compiled_tanh_loop(a, out)
    ref = np.tanh(a)
    finite = np.isfinite(a)
    ulps = np.abs(out[finite] - ref[finite]) / np.spacing(np.abs(ref[finite]))
    assert ulps.max() <= 4
    assert np.array_equal(out[~finite], ref[~finite], equal_nan=True)  # +-inf -> +-1, NaN
    assert np.array_equal(np.signbit(out), np.signbit(ref))  # -0.0 stays -0.0


@pytest.mark.skipif(np.finfo(np.longdouble).nmant < 63,
                    reason="needs an extended-precision long double (x86-64) as the reference")
def test_tanh_error_against_an_extended_precision_reference():
    """Against ``tanh`` in 64-bit-mantissa arithmetic (error about 1e-19, far below one
    float64 ulp): the compiled loop, which the CPU kernels run, stays under 3 ulp (2.97
    measured over these 8e5 arguments; mean 0.44, against 0.56 of the expm1 form it
    replaced). The Python function (the CUDA simulator's), where no product is fused
    into a sum, rounds about four times more per entry: under 4.5 (4.15; mean 0.67).
    NumPy's own tanh is 1.17 ulp off on the same arguments."""
    from numba import njit
    from numba.extending import register_jitable

    from ptoc import _config
    from ptoc.kernels import _bits  # noqa: F401 - the CPU versions, as in the kernels

    tanh = register_jitable(maths.tanh)

    @njit(fastmath=_config.CPU_FASTMATH, error_model="numpy")
    def loop(a, out):
        for t in range(a.size):
            out[t] = tanh(a[t])

    rng = np.random.default_rng(1)
    a = np.concatenate([rng.standard_normal(400000) * 4, rng.uniform(-30, 30, 100000),
                        10.0 ** rng.uniform(-320, 2, 100000), np.linspace(-1, 1, 200001)])
    ref = np.tanh(a.astype(np.longdouble))
    spacing = np.spacing(np.abs(ref).astype(np.float64)).astype(np.longdouble)

    def ulps(values):
        return (np.abs(values.astype(np.longdouble) - ref) / spacing).astype(np.float64)

    out = np.empty_like(a)
    loop(a, out)
    compiled = ulps(out)
    assert compiled.max() < 3.0 and compiled.mean() < 0.5
    python = ulps(np.array([maths.tanh(float(v)) for v in a]))
    assert python.max() < 4.5 and python.mean() < 0.7


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                    reason="reads x86-64 assembly")
def test_compiled_tanh_loop_is_vectorised(compiled_tanh_loop):
    """The loop divides whole vectors (divpd: SSE2 and up), so tanh is no opaque call."""
    a = np.zeros(64)
    compiled_tanh_loop(a, np.empty_like(a))
    asm = next(iter(compiled_tanh_loop.inspect_asm().values()))
    assert "divpd" in asm


@pytest.mark.parametrize("act", ACTS)
def test_scalar_activation_matches_vectorised_reference(act):
    a = np.concatenate([np.linspace(-3, 3, 2001), [-0.1, 0.1, 0.0, -1e-12, 1e-12]])
    pairs = np.array([maths.activation(v, act.code) for v in a])
    assert _rel(pairs[:, 0], sigma(a, act)) < 1e-15
    assert _rel(pairs[:, 1], dsigma(a, act)) < 1e-15


@pytest.mark.parametrize("act", ACTS)
def test_derivative_is_the_derivative(act):
    # central differences away from the kinks of ReLU / the blend points of SmoothReLU
    a = np.linspace(-2.5, 2.5, 1000)
    a = a[np.min(np.abs(a[:, None] - np.array([0.0, -0.1, 0.1])), axis=1) > 1e-3]
    eps = 1e-6
    fd = (sigma(a + eps, act) - sigma(a - eps, act)) / (2 * eps)
    assert np.max(np.abs(fd - dsigma(a, act))) < 1e-8


def test_smoothrelu_is_c1_at_the_blend_points():
    act = Activation.SMOOTHRELU
    for p in (-0.1, 0.1):
        left, right = np.array([p - 1e-12]), np.array([p + 1e-12])
        assert abs(sigma(left, act) - sigma(right, act))[0] < 1e-11
        assert abs(dsigma(left, act) - dsigma(right, act))[0] < 1e-10


# --- targets agree ----------------------------------------------------------------------------

def _run_all(target, x, K, b, h, act, lam):
    step, dsig = kernels.layer_step(x, K, b, h, act, target=target, return_derivative=True)
    adj, gK, gb = kernels.layer_adjoint_step(x, lam, K, b, h, act, target=target,
                                             accumulate_grad=True)
    pK, pb = kernels.layer_param_grad(x, lam, K, b, h, act, target=target)
    H = kernels.layer_hamiltonian(x, lam, K, b, h, act, target=target)
    return step, dsig, adj, gK, gb, pK, pb, H


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("target", COMPILED)
def test_compiled_targets_match_numpy_reference(target, act):
    rng = np.random.default_rng(1)
    S, d = (70, 9) if target is Target.CPU else (5, 3)
    x, K, b, lam = _layer(rng, S, d)
    ref = _run_all(Target.NUMPY, x, K, b, 0.3, act, lam)
    got = _run_all(target, x, K, b, 0.3, act, lam)
    for r, g in zip(ref, got, strict=True):
        assert _rel(g, r) < 1e-12


@given(S=st.integers(1, 150), d=st.integers(1, 20), h=st.floats(1e-3, 2.0),
       act=st.sampled_from(ACTS), seed=st.integers(0, 2**31), chunk=st.integers(1, 64))
def test_cpu_matches_reference_for_random_shapes_and_chunks(S, d, h, act, seed, chunk):
    rng = np.random.default_rng(seed)
    x, K, b, lam = _layer(rng, S, d, scale=2.0)
    cpu = kernels.backend("cpu")
    c = act.code
    o_ref, ds_ref = np.empty_like(x), np.empty_like(x)
    reference.step(x, K, b, h, c, o_ref, ds_ref, chunk)
    o, ds = np.empty_like(x), np.empty_like(x)
    cpu.step(x, K, b, h, c, o, ds, chunk)
    assert _rel(o, o_ref) < 1e-12 and np.max(np.abs(ds - ds_ref)) < 1e-12
    gK0 = rng.standard_normal((d, d))
    gb0 = rng.standard_normal(d)
    outs = []
    for kern in (reference, cpu):
        gK, gb, out = gK0.copy(), gb0.copy(), np.empty_like(x)
        kern.adjoint_step(x, lam, K, b, h, c, out, gK, gb, None, chunk)
        outs.append((out, gK, gb))
    for r, g in zip(*outs, strict=True):
        assert _rel(g, r) < 1e-12
    assert abs(cpu.hamiltonian(x, lam, K, b, h, c, chunk)
               - reference.hamiltonian(x, lam, K, b, h, c, chunk)) < 1e-12 * (1 + np.abs(x).sum())


def _thread_counts():
    """Each Numba thread count from 1 to the maximum, set in turn (restored afterwards)."""
    import numba

    try:
        for threads in range(1, numba.config.NUMBA_NUM_THREADS + 1):
            numba.set_num_threads(threads)
            yield threads
    finally:
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)


def _assert_all_bitwise_equal(results):
    for r in results[1:]:
        for a, c in zip(r, results[0], strict=True):
            assert np.array_equal(a, c)


_STRICT_SCRIPT = """
import numpy as np
from ptoc import _config, kernels
assert _config.CPU_FASTMATH is False
cpu, cuda = kernels.backend("cpu"), kernels.backend("cuda")
for S, d, N, chunk in [(1, 1, 1, 32), (37, 9, 2, 16), (70, 13, 3, 32), (5, 20, 2, 2),
                       (21, 8, 3, 32), (40, 16, 2, 16)]:
    for act in (0, 1, 2):
        rng = np.random.default_rng(S + d)
        x, lam = rng.standard_normal((S, d)), rng.standard_normal((S, d))
        K, b = rng.standard_normal((N, d, d)) * 1.5 / np.sqrt(d), rng.standard_normal((N, d))
        outs = []
        for kern in (cpu, cuda):
            st, ds = np.empty((N + 1, S, d)), np.empty((N, S, d))
            st[0] = x
            kern.forward_sweep(st, K, b, 0.3, act, ds, chunk)
            gK, gb, lams = np.ones_like(K), np.ones_like(b), np.empty((N + 1, S, d))
            lam0 = kern.adjoint_sweep(st, lam, K, b, 0.3, act, None, gK, gb, lams, chunk)
            # with sigma' stored (at d = 8 and 16 the CPU's sample-major rows path)
            gKs, gbs, lamss = np.ones_like(K), np.ones_like(b), np.empty((N + 1, S, d))
            lam0s = kern.adjoint_sweep(st, lam, K, b, 0.3, act, ds, gKs, gbs, lamss, chunk)
            out = np.empty_like(x)
            kern.step(x, K[0], b[0], 0.3, act, out, None, chunk)
            adj, gK1, gb1 = np.empty_like(x), np.ones((d, d)), np.ones(d)
            kern.adjoint_step(x, lam, K[0], b[0], 0.3, act, adj, gK1, gb1, None, chunk)
            H = kern.hamiltonian(x, lam, K[0], b[0], 0.3, act, chunk)
            outs.append([st, ds, gK, gb, lams, lam0, out, adj, gK1, gb1, np.array(H), gKs,
                         gbs, lamss, lam0s])
        for i, (c, g) in enumerate(zip(*outs, strict=True)):
            assert np.array_equal(c, g), (S, d, N, chunk, act, i)
print("ok")
"""


def test_strict_cpu_kernels_equal_the_element_functions_bit_for_bit():
    """With PTOC_FASTMATH=0, the CPU tile loops compute the sums of ptoc._maths exactly.

    The CUDA kernels (here on the simulator) call the element functions of ptoc._maths
    per entry; the CPU kernels call only ``activation`` and write the sums as loops
    over tile rows (see ptoc._maths). Without reassociation or contraction both must
    give the same bits, which holds only if the CPU adds the same terms in the same
    order: every remainder of the 8/4/1-term products and 4 x 4 gradient tiles
    (d = 1, 9, 13, 20), partial chunks, all activations.
    """
    import os
    import subprocess
    import sys

    env = os.environ | {"PTOC_FASTMATH": "0", "NUMBA_ENABLE_CUDASIM": "1"}
    out = subprocess.run([sys.executable, "-c", _STRICT_SCRIPT], capture_output=True,
                         text=True, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["ok"]


def test_cpu_gradient_is_independent_of_thread_count():
    rng = np.random.default_rng(3)
    x, K, b, lam = _layer(rng, 257, 11)
    _assert_all_bitwise_equal([
        kernels.layer_adjoint_step(x, lam, K, b, 0.1, "tanh", accumulate_grad=True)
        for _ in _thread_counts()])


def test_stored_derivative_gives_the_same_adjoint():
    rng = np.random.default_rng(4)
    x, K, b, lam = _layer(rng, 40, 6)
    cpu = kernels.backend("cpu")
    _, ds = kernels.layer_step(x, K, b, 0.2, "tanh", return_derivative=True)
    out1, out2 = np.empty_like(x), np.empty_like(x)
    g1 = np.zeros((6, 6)), np.zeros(6)
    g2 = np.zeros((6, 6)), np.zeros(6)
    cpu.adjoint_step(x, lam, K, b, 0.2, 0, out1, *g1, None, 32)
    cpu.adjoint_step(x, lam, K, b, 0.2, 0, out2, *g2, ds, 32)
    assert _rel(out2, out1) < 1e-14 and _rel(g2[0], g1[0]) < 1e-14


@pytest.mark.parametrize("target", [Target.NUMPY, Target.CPU])
def test_float32_is_supported(target):
    rng = np.random.default_rng(5)
    x, K, b, lam = _layer(rng, 33, 5, dtype=np.float32)
    out = kernels.layer_step(x, K, b, 0.1, "tanh", target=target)
    assert out.dtype == np.float32
    ref = kernels.layer_step(x.astype(np.float64), K.astype(np.float64), b.astype(np.float64),
                             0.1, "tanh", target="numpy")
    assert _rel(out, ref) < 1e-6


# --- the Hamiltonian ----------------------------------------------------------------------------

@pytest.mark.parametrize("target", [Target.NUMPY, Target.CPU])
@pytest.mark.parametrize("act", ACTS)
def test_hamiltonian_gradient_is_minus_the_loss_gradient_of_the_layer(target, act):
    """With p = -lambda, grad_theta sum_s p.Phi = -(h sum_s g x^T): ascent = descent."""
    rng = np.random.default_rng(6)
    x, K, b, lam = _layer(rng, 30, 7)
    hK, hb = kernels.layer_hamiltonian_grad(x, -lam, K, b, 0.25, act, target=target)
    gK, gb = kernels.layer_param_grad(x, lam, K, b, 0.25, act, target=target)
    np.testing.assert_allclose(hK, -gK, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(hb, -gb, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("act", ["tanh", "smoothrelu"])
def test_hamiltonian_gradient_matches_finite_differences(act):
    rng = np.random.default_rng(7)
    x, K, b, p = _layer(rng, 12, 4)
    h, eps = 0.3, 1e-6
    gK, gb = kernels.layer_hamiltonian_grad(x, p, K, b, h, act)
    for i, j in [(0, 0), (1, 3), (3, 2)]:
        Kp, Km = K.copy(), K.copy()
        Kp[i, j] += eps
        Km[i, j] -= eps
        fd = (kernels.layer_hamiltonian(x, p, Kp, b, h, act)
              - kernels.layer_hamiltonian(x, p, Km, b, h, act)) / (2 * eps)
        assert abs(fd - gK[i, j]) <= 1e-6 * max(1.0, abs(gK[i, j]))
    bp = b.copy()
    bp[2] += eps
    bm = b.copy()
    bm[2] -= eps
    fd = (kernels.layer_hamiltonian(x, p, K, bp, h, act)
          - kernels.layer_hamiltonian(x, p, K, bm, h, act)) / (2 * eps)
    assert abs(fd - gb[2]) <= 1e-6 * max(1.0, abs(gb[2]))


# --- bad input ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    ({"x": np.ones((0, 3))}, "empty"),
    ({"K": np.ones((3, 2))}, "K has shape"),
    ({"b": np.ones(4)}, "b has shape"),
    ({"x": np.ones(3)}, "x must be a 2-D"),
    ({"x": np.full((2, 3), np.nan)}, "non-finite"),
    ({"K": np.full((3, 3), np.inf)}, "non-finite"),
    ({"h": float("nan")}, "h must be finite"),
    ({"activation": "sigmoid"}, "unknown activation"),
    ({"target": "tpu"}, "unknown target"),
])
def test_bad_input_is_named(kwargs, match):
    args = {"x": np.ones((2, 3)), "K": np.eye(3), "b": np.zeros(3), "h": 0.1,
            "activation": "tanh", "target": "cpu"} | kwargs
    with pytest.raises(ValueError, match=match):
        kernels.layer_step(args.pop("x"), args.pop("K"), args.pop("b"), args.pop("h"),
                           args.pop("activation"), **args)


def test_bad_adjoint_shapes_are_named():
    with pytest.raises(ValueError, match="lam_next has shape"):
        kernels.layer_adjoint_step(np.ones((2, 3)), np.ones((3, 3)), np.eye(3), np.zeros(3), 0.1)
    with pytest.raises(ValueError, match="grad_K must be"):
        kernels.layer_param_grad(np.ones((2, 3)), np.ones((2, 3)), np.eye(3), np.zeros(3), 0.1,
                                 grad_K=np.zeros((2, 2)))


# --- optional targets load lazily and explain themselves --------------------------------------

def test_importing_ptoc_compiles_nothing_and_loads_no_optional_target():
    import subprocess
    import sys

    code = ("import sys, ptoc; "
            "print(int('numba' in sys.modules), int('numba.cuda' in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["0", "0"]


@pytest.mark.cuda
def test_cuda_without_a_device_gives_the_fix(monkeypatch):
    from numba import cuda

    cuda_kernels = kernels.backend("cuda")
    monkeypatch.setattr(cuda, "is_available", lambda: False)
    with pytest.raises(ImportError, match="NUMBA_ENABLE_CUDASIM=1"):
        cuda_kernels.check_available()
    monkeypatch.delitem(kernels._loaded, Target.CUDA)
    with pytest.raises(ImportError, match="no usable CUDA GPU"):
        kernels.layer_step(np.ones((2, 2)), np.eye(2), np.zeros(2), 0.1, target="cuda")


# --- sweeps: many layers per call (CPU work items, layer blocks) -----------------------------

@contextlib.contextmanager
def _cpu_settings(lanes, partial_bytes, min_lanes=16, parallel_min_work=0):
    """Temporarily set the CPU work-item widths, layer-block size and the smallest sweep
    run on several threads (``ptoc._config``; 0: every sweep with two or more work items
    and threads takes the parallel kernels)."""
    from ptoc import _config

    names = ("CPU_LANES", "CPU_PARTIAL_BYTES", "CPU_MIN_LANES", "CPU_PARALLEL_MIN_WORK")
    old = [getattr(_config, name) for name in names]
    for name, value in zip(names, (lanes, partial_bytes, min_lanes, parallel_min_work),
                           strict=True):
        setattr(_config, name, value)
    try:
        yield
    finally:
        for name, value in zip(names, old, strict=True):
            setattr(_config, name, value)


def _sweeps(kern, X, K, b, h, act, lam, chunk, store=True, gK0=None, gb0=None):
    N, (S, d) = K.shape[0], X.shape
    states = np.empty((N + 1, S, d), X.dtype)
    states[0] = X
    dsig = np.empty((N, S, d), X.dtype) if store else None
    kern.forward_sweep(states, K, b, h, act, dsig, chunk)
    gK = np.zeros_like(K) if gK0 is None else gK0.copy()
    gb = np.zeros_like(b) if gb0 is None else gb0.copy()
    lams = np.empty((N + 1, S, d), X.dtype)
    lam0 = kern.adjoint_sweep(states, lam, K, b, h, act, dsig, gK, gb, lams, chunk)
    return [states] + ([dsig] if store else []) + [gK, gb, lams, lam0]


def _deep(rng, S, d, N, dtype=np.float64):
    X = rng.standard_normal((S, d)).astype(dtype)
    K = (rng.standard_normal((N, d, d)) * 1.5 / np.sqrt(d)).astype(dtype)
    b = rng.standard_normal((N, d)).astype(dtype)
    lam = rng.standard_normal((S, d)).astype(dtype)
    return X, K, b, lam


@given(S=st.integers(1, 150), d=st.integers(1, 20), N=st.integers(0, 5),
       act=st.sampled_from(ACTS), seed=st.integers(0, 2**31), chunk=st.integers(1, 64),
       store=st.booleans(), lanes=st.sampled_from([1, 16, 128]),
       partial_bytes=st.sampled_from([1, 1 << 20]))
def test_cpu_sweeps_match_reference(S, d, N, act, seed, chunk, store, lanes, partial_bytes):
    # every remainder of the 8/4/1-term products and of the 4 x 4 gradient tiles
    # (d = 1..20), work items of one or several chunks (lanes), one layer or all
    # layers per adjoint block (partial_bytes), stored or recomputed sigma'
    rng = np.random.default_rng(seed)
    X, K, b, lam = _deep(rng, S, d, N)
    gK0, gb0 = rng.standard_normal((N, d, d)), rng.standard_normal((N, d))
    ref = _sweeps(reference, X, K, b, 0.2, act.code, lam, chunk, store, gK0, gb0)
    with _cpu_settings(lanes, partial_bytes):
        got = _sweeps(kernels.backend("cpu"), X, K, b, 0.2, act.code, lam, chunk, store,
                      gK0, gb0)
    for r, g in zip(ref, got, strict=True):
        assert g.shape == r.shape
        if r.size:
            assert _rel(g, r) < 1e-12


@pytest.mark.parametrize("S, d, N, chunk", [(203, 13, 5, 16), (257, 8, 3, 32), (64, 5, 4, 1)])
def test_cpu_sweeps_are_bitwise_independent_of_threads_and_work_split(S, d, N, chunk):
    rng = np.random.default_rng(8)
    X, K, b, lam = _deep(rng, S, d, N)
    cpu = kernels.backend("cpu")
    results = []
    for _ in _thread_counts():
        for lanes, min_lanes in ((1, 1), (32, 1), (32, 16), (128, 16)):
            for partial_bytes in (1, 1 << 20):
                # the parallel sweep kernels, and their one-thread variants
                for min_work in (0, 1 << 62):
                    with _cpu_settings(lanes, partial_bytes, min_lanes, min_work):
                        results.append(_sweeps(cpu, X, K, b, 0.3, 0, lam, chunk))
    _assert_all_bitwise_equal(results)


def _level_problem(rng, S, d, n, dtype=np.float64):
    """Positions ``0..n-1`` of one level: values, right-hand sides, weights, step sizes
    (position 0 is produced by no step), linearisation states."""
    u = rng.standard_normal((n, S, d)).astype(dtype)
    g = rng.standard_normal((n, S, d)).astype(dtype)
    K = (rng.standard_normal((n, d, d)) * 1.5 / np.sqrt(d)).astype(dtype)
    b = rng.standard_normal((n, d)).astype(dtype)
    dt = rng.uniform(0.05, 0.5, n).astype(dtype)
    dt[0] = 0.0
    X = rng.standard_normal((n, S, d)).astype(dtype)
    return u, g, K, b, dt, X


def _runs(rng, n):
    """Independent runs ``(starts, ends)`` in positions ``1..n-1`` (no run starts from a
    position that another run writes, as in a relaxation), and points."""
    cuts = np.sort(rng.choice(np.arange(1, n), size=min(n - 1, int(rng.integers(1, 6))),
                              replace=False))
    starts, ends = [], []
    for i, c in enumerate(cuts):
        end = cuts[i + 1] - 2 if i + 1 < len(cuts) else n - 1
        if c <= end and rng.random() < 0.8:
            starts.append(int(c))
            ends.append(int(rng.integers(c, end + 1)))
    points = np.sort(rng.choice(np.arange(1, n), size=int(rng.integers(1, n)), replace=False))
    return np.array(starts, np.int64), np.array(ends, np.int64), points


def _level_calls(kern, u, g, K, b, dt, X, act, starts, ends, points, chunk):
    """Every level kernel once, on copies; the outputs in a list (the adjoint steps with
    the derivatives ``D`` that ``level_derivatives`` computes from the states ``X``)."""
    D = np.zeros_like(X)
    kern.level_derivatives(X, K, b, act, D, chunk)
    out = [D]
    for rhs in (None, g):
        v = u.copy()
        kern.state_runs(v, rhs, K, b, dt, act, starts, ends, chunk)
        lam = u.copy()
        kern.adjoint_runs(lam, rhs, D, K, dt, starts, ends, chunk)
        out += [v, lam]
    p = np.empty((len(points),) + u.shape[1:], u.dtype)
    kern.state_points(u, K, b, dt, act, points, p, chunk)
    q = np.empty_like(p)
    kern.adjoint_points(u, D, K, dt, points, q, chunk)
    out += [p, q]
    # the point steps that end in a FAS half, into rows in reverse order of a larger array
    rows = np.arange(len(points), dtype=np.int64)[::-1] + 1
    for mode in (maths.POINT_RESIDUAL, maths.POINT_RESIDUAL_G, maths.POINT_TAU):
        rhs = g if mode == maths.POINT_RESIDUAL_G else None
        sp, ap = (np.full((len(points) + 2,) + u.shape[1:], 0.25, u.dtype) for _ in range(2))
        kern.state_points_into(u, K, b, dt, act, points, sp, rows, rhs, mode, chunk)
        kern.adjoint_points_into(u, D, K, dt, points, ap, rows, rhs, mode, chunk)
        out += [sp, ap]
    return out


@given(S=st.integers(1, 80), d=st.integers(1, 20), n=st.integers(2, 9),
       act=st.sampled_from(ACTS), seed=st.integers(0, 2**31), chunk=st.integers(1, 64),
       lanes=st.sampled_from([1, 16, 128]), min_lanes=st.sampled_from([1, 8, 16]))
def test_cpu_level_kernels_match_reference(S, d, n, act, seed, chunk, lanes, min_lanes):
    # the batched steps of the layer-parallel solvers: runs with and without a
    # right-hand side, points, state and adjoint, any work-item width
    rng = np.random.default_rng(seed)
    u, g, K, b, dt, X = _level_problem(rng, S, d, n)
    starts, ends, points = _runs(rng, n)
    ref = _level_calls(reference, u, g, K, b, dt, X, act.code, starts, ends, points, chunk)
    with _cpu_settings(lanes, 1 << 20, min_lanes):
        got = _level_calls(kernels.backend("cpu"), u, g, K, b, dt, X, act.code, starts, ends,
                           points, chunk)
    for r, c in zip(ref, got, strict=True):
        assert _rel(c, r) < 1e-12


@given(S=st.integers(1, 70), d=st.integers(1, 20), n=st.integers(2, 9),
       act=st.sampled_from(ACTS), seed=st.integers(0, 2**31), chunk=st.integers(1, 64))
def test_cpu_fused_fas_points_equal_the_point_steps_then_the_sums_bitwise(S, d, n, act, seed,
                                                                          chunk):
    """A point kernel that ends in a FAS half (formed on the tile) gives the bits of the
    plain point kernel followed by the NumPy sums of reference.point_ends, and writes only
    the rows it is given."""
    rng = np.random.default_rng(seed)
    u, g, K, b, dt, X = _level_problem(rng, S, d, n)
    _, _, points = _runs(rng, n)
    rows = rng.permutation(len(points) + 2)[: len(points)]
    cpu = kernels.backend("cpu")
    D = cpu.level_derivatives(X, K, b, act.code, None, chunk)
    for mode in (maths.POINT_RESIDUAL, maths.POINT_RESIDUAL_G, maths.POINT_TAU):
        rhs = g if mode == maths.POINT_RESIDUAL_G else None
        start = rng.standard_normal((len(points) + 2, S, d))
        for into, plain, args in (
                (cpu.state_points_into, cpu.state_points, (u, K, b, dt, act.code)),
                (cpu.adjoint_points_into, cpu.adjoint_points, (u, D, K, dt))):
            fused = start.copy()
            into(*args, points, fused, rows, rhs, mode, chunk)
            phi = np.empty((len(points), S, d))
            plain(*args, points, phi, chunk)
            want = start.copy()
            reference.point_ends(phi, u, rhs, points, want, rows, mode)
            assert np.array_equal(fused, want)
            others = np.setdiff1d(np.arange(len(start)), rows)
            assert np.array_equal(fused[others], start[others])


def _strided(a: np.ndarray) -> np.ndarray:
    """The values of ``a`` in a view that is not C-ordered (every other sample of a
    larger array)."""
    big = np.full((a.shape[0], 2 * a.shape[1]) + a.shape[2:], np.nan, a.dtype)
    view = big[:, ::2]
    view[...] = a
    return view


@given(S=st.integers(1, 40), d=st.integers(1, 12), n=st.integers(2, 7),
       seed=st.integers(0, 2**31))
def test_cpu_level_kernels_on_strided_grids_equal_those_on_c_ordered_ones(S, d, n, seed):
    # the CPU level kernels view their grids as flat rows; a grid that is not C-ordered
    # is computed on a C-ordered copy and written back: same bits, in place, and only
    # the rows a kernel writes change
    rng = np.random.default_rng(seed)
    u, g, K, b, dt, X = _level_problem(rng, S, d, n)
    starts, ends, points = _runs(rng, n)
    cpu = kernels.backend("cpu")
    D = cpu.level_derivatives(X, K, b, maths.TANH, None, 32)
    for rhs in (None, g):
        for run, extra in ((cpu.state_runs, (K, b, dt, maths.TANH)),
                           (cpu.adjoint_runs, (D, K, dt))):
            want = u.copy()
            run(want, rhs, *extra, starts, ends, 32)
            got = _strided(u)
            run(got, None if rhs is None else _strided(rhs), *extra, starts, ends, 32)
            assert not got.flags.c_contiguous
            assert np.array_equal(got, want)
    rows = np.arange(len(points), dtype=np.int64)[::-1] + 1
    for mode in (maths.POINT_RESIDUAL, maths.POINT_RESIDUAL_G, maths.POINT_TAU):
        rhs = g if mode == maths.POINT_RESIDUAL_G else None
        for into, extra in ((cpu.state_points_into, (K, b, dt, maths.TANH)),
                            (cpu.adjoint_points_into, (D, K, dt))):
            start = rng.standard_normal((len(points) + 2, S, d))
            want = start.copy()
            into(u, *extra, points, want, rows, rhs, mode, 32)
            got = _strided(start)
            into(_strided(u), *extra, points, got, rows,
                 None if rhs is None else _strided(rhs), mode, 32)
            assert np.array_equal(got, want)


@pytest.mark.parametrize("S, d, chunk", [(32, 16, 32), (45, 7, 16), (3, 9, 32)])
def test_cpu_level_kernels_are_bitwise_independent_of_threads_and_work_split(S, d, chunk):
    # the work-item width of these kernels depends on the number of runs (a serial
    # coarse sweep splits its batch, a relaxation with many runs does not): the same
    # position must come out the same either way
    rng = np.random.default_rng(11)
    u, g, K, b, dt, X = _level_problem(rng, S, d, 7)
    starts, ends, points = np.array([1, 5], np.int64), np.array([3, 6], np.int64), \
        np.arange(1, 7)
    cpu = kernels.backend("cpu")
    results = []
    for _ in _thread_counts():
        for lanes, min_lanes in ((1, 1), (8, 1), (32, 16), (128, 16), (128, 128)):
            with _cpu_settings(lanes, 1 << 20, min_lanes):
                results.append(_level_calls(cpu, u, g, K, b, dt, X, 0, starts, ends,
                                            points, chunk))
                # one run at a time (the narrowest work items) gives the same bits
                one = u.copy()
                for s, e in zip(starts, ends, strict=True):
                    cpu.state_runs(one, g, K, b, dt, 0, [s], [e], chunk)
                assert np.array_equal(one, results[-1][3])
    _assert_all_bitwise_equal(results)


@pytest.mark.parametrize("S, d, chunk", [(32, 16, 32), (45, 7, 16)])
def test_cpu_level_kernels_are_bitwise_independent_of_how_tasks_share_scratch(S, d, chunk):
    # a level kernel shares its tasks (one run or point on one work item each) over a
    # few scratch slots: one slot running every task in turn must give the bits of one
    # slot per task
    from ptoc import _config

    rng = np.random.default_rng(12)
    u, g, K, b, dt, X = _level_problem(rng, S, d, 9)
    starts, ends = np.array([1, 3, 5, 7], np.int64), np.array([1, 3, 6, 8], np.int64)
    points = np.arange(1, 9)
    cpu = kernels.backend("cpu")
    old = _config.CPU_SLOTS_PER_THREAD
    results = []
    try:
        for _ in _thread_counts():
            for slots in (1, 2, 64):
                _config.CPU_SLOTS_PER_THREAD = slots
                results.append(_level_calls(cpu, u, g, K, b, dt, X, 0, starts, ends, points,
                                            chunk))
    finally:
        _config.CPU_SLOTS_PER_THREAD = old
    _assert_all_bitwise_equal(results)


@given(S=st.integers(1, 140), d=st.integers(1, 40), lo=st.integers(0, 9),
       dtype=st.sampled_from([np.float64, np.float32]), reverse=st.booleans(),
       seed=st.integers(0, 2**32 - 1))
def test_cpu_transposes_move_every_entry_and_nothing_else(S, d, lo, dtype, reverse, seed):
    """The kernels' transposes between sample rows and feature tiles (8 x 8 blocks in
    registers, the rest entry by entry) against NumPy, for every width and batch, both
    dtypes, and rows with a negative stride (the adjoints the layer gradients read)."""
    from ptoc.kernels import cpu

    rng = np.random.default_rng(seed)
    m = min(S, 128)
    L = cpu._row_len.py_func(m)
    rows = rng.standard_normal((lo + S, d)).astype(dtype)
    src = rows[::-1] if reverse else rows
    tile = np.full((d, L), -1.0, dtype)
    cpu._load_t(src, lo, m, tile)
    np.testing.assert_array_equal(tile[:, :m], src[lo:lo + m].T)
    assert (tile[:, m:] == -1.0).all()
    out = np.full((lo + S, d), -1.0, dtype)
    dst = out[::-1] if reverse else out
    tile[:, :m] = rng.standard_normal((d, m)).astype(dtype)
    cpu._store_t(tile, dst, lo, m)
    np.testing.assert_array_equal(dst[lo:lo + m], tile[:, :m].T)
    untouched = np.ones(lo + S, bool)
    untouched[lo:lo + m] = False
    assert (dst[untouched] == -1.0).all()
    # the transpose in that multiplies as it stores (the adjoint's sigma' * lambda)
    lam = rng.standard_normal((d, L)).astype(dtype)
    tile = np.full((d, L), -1.0, dtype)
    cpu._load_times_t(src, lo, m, tile, lam)
    np.testing.assert_array_equal(tile[:, :m], src[lo:lo + m].T * lam[:, :m])
    assert (tile[:, m:] == -1.0).all()


@given(d=st.integers(1, 40), m=st.integers(1, 128), lo=st.integers(0, 5),
       dtype=st.sampled_from([np.float64, np.float32]), strided=st.booleans(),
       seed=st.integers(0, 2**32 - 1))
def test_cpu_register_blocked_products_write_exactly_their_entries(d, m, lo, dtype, strided,
                                                                   seed):
    """The three products of a layer step in register blocks (pre-activation, adjoint
    update, weight-gradient partial; ptoc.kernels._product) against NumPy, for every
    width and sample count (blocks of 16, 8, 4 and 1 samples or columns, rows in fours
    and one by one), both dtypes; nothing outside the result is written."""
    from ptoc.kernels import cpu

    rng = np.random.default_rng(seed)
    tol = 1e-12 if dtype == np.float64 else 2e-5
    L = cpu._row_len.py_func(m)
    K = (rng.standard_normal((d, d)) / np.sqrt(d)).astype(dtype)
    b = rng.standard_normal(d).astype(dtype)
    h = dtype(0.3)

    def tile():
        t = np.full((d, L), -7.0, dtype)
        t[:, :m] = rng.standard_normal((d, m))
        return t

    def close(got, want):
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol * (1 + np.abs(want).max()))

    x = tile()
    a = np.full((d, L), -7.0, dtype)
    cpu._preact_t(K, b, x, a, m)
    close(a[:, :m], K @ x[:, :m] + b[:, None])
    assert (a[:, m:] == -7.0).all()

    g, lam = tile(), tile()
    lam0 = lam.copy()
    cpu._adjoint_lam_t(np.ascontiguousarray(K.T), h, g, lam, m)
    close(lam[:, :m], lam0[:, :m] + h * (K.T @ g[:, :m]))
    assert (lam[:, m:] == -7.0).all()

    rows = rng.standard_normal((lo + m, d)).astype(dtype)
    if strided:  # sample rows whose entries are not adjacent: one column at a time
        rows = np.repeat(rows, 2, axis=1)[:, ::2]
    t0 = int(rng.integers(0, m))
    t1 = int(rng.integers(t0 + 1, m + 1))
    g0 = g.copy()
    pK, pb = np.full((d, d), -7.0, dtype), np.full(d, -7.0, dtype)
    cpu._partial_t(g, rows, lo, h, pK, pb, t0, t1)
    hg = h * g0[:, t0:t1]
    np.testing.assert_array_equal(g[:, t0:t1], hg)  # g is scaled in place, there only
    np.testing.assert_array_equal(np.delete(g, np.s_[t0:t1], axis=1),
                                  np.delete(g0, np.s_[t0:t1], axis=1))
    close(pK, hg @ rows[lo + t0:lo + t1])
    close(pb, hg.sum(axis=1))
    # adding a partial into the gradient: one addition per entry
    qK, qb = rng.standard_normal((d, d)).astype(dtype), rng.standard_normal(d).astype(dtype)
    sK, sb = qK.copy(), qb.copy()
    cpu._add_partial_into(pK.reshape(-1), pb, qK.reshape(-1), qb)  # flat rows, as the sweep
    np.testing.assert_array_equal(qK, sK + pK)
    np.testing.assert_array_equal(qb, sb + pb)


@pytest.mark.parametrize("act", ACTS)
def test_cpu_level_runs_equal_the_serial_sweeps_bitwise(act):
    # a level-0 run over every layer is the serial sweep: the same bits, state and adjoint
    rng = np.random.default_rng(13)
    N, S, d, h = 12, 32, 16, 0.1
    X, K, b, lam = _deep(rng, S, d, N)
    cpu = kernels.backend("cpu")
    states = np.empty((N + 1, S, d))
    states[0] = X
    cpu.forward_sweep(states, K, b, h, act.code, None, 32)
    pad = np.zeros((1, d, d)), np.zeros((1, d))
    Kl, bl = np.concatenate([pad[0], K]), np.concatenate([pad[1], b])
    dt = np.full(N + 1, h)
    u = np.zeros_like(states)
    u[0] = X
    cpu.state_runs(u, None, Kl, bl, dt, act.code, [1], [N], 32)
    assert np.array_equal(u, states)
    lams = np.empty_like(states)
    cpu.adjoint_sweep(states, lam, K, b, h, act.code, None, None, None, lams, 32)
    # adjoint step k is layer N - k at the state x_{N-k}
    Kb, bb = np.concatenate([pad[0], K[::-1]]), np.concatenate([pad[1], b[::-1]])
    Xb = np.concatenate([np.zeros((1, S, d)), states[N - 1::-1]])
    v = np.zeros_like(states)
    v[0] = lam
    D = cpu.level_derivatives(Xb, Kb, bb, act.code, None, 32)
    cpu.adjoint_runs(v, None, D, Kb, dt, [1], [N], 32)
    assert np.array_equal(v, lams[::-1])


def test_cpu_sweeps_in_float32():
    rng = np.random.default_rng(9)
    X, K, b, lam = _deep(rng, 70, 9, 4, dtype=np.float32)
    got = _sweeps(kernels.backend("cpu"), X, K, b, 0.2, 0, lam, 32)
    ref = _sweeps(reference, *(a.astype(np.float64) for a in (X, K, b)), 0.2, 0,
                  lam.astype(np.float64), 32)
    for r, g in zip(ref, got, strict=True):
        assert g.dtype == np.float32
        assert _rel(g, r) < 1e-5


@pytest.mark.parametrize("target", [Target.NUMPY, Target.CPU])
@pytest.mark.parametrize("act", ACTS)
def test_sweeps_propagate_nan(target, act):
    """A NaN entering a sample poisons that sample and the gradient, never becomes 0."""
    rng = np.random.default_rng(10)
    X, K, b, lam = _deep(rng, 40, 6, 3)
    X[3, 2] = np.nan
    kern = kernels.backend(target)
    states, dsig, gK, gb, lams, lam0 = _sweeps(kern, X, K, b, 0.2, act.code, lam, 32)
    assert np.isnan(states[-1][3]).all() and np.isnan(dsig[0][3]).all()
    assert np.isfinite(np.delete(states[-1], 3, axis=0)).all()
    assert np.isnan(gK).all() and np.isnan(gb).all()
    assert np.isnan(lam0[3]).all() and np.isfinite(np.delete(lam0, 3, axis=0)).all()


@pytest.mark.cuda
@pytest.mark.parametrize("act", ACTS)
def test_activation_maps_nan_to_nan(act):
    assert all(math.isnan(v) for v in maths.activation(float("nan"), act.code))
    a = np.array([np.nan, -1.0, 0.05, 2.0])
    assert np.isnan(sigma(a, act)[0]) and np.isnan(dsigma(a, act)[0])
    assert np.isfinite(sigma(a, act)[1:]).all() and np.isfinite(dsigma(a, act)[1:]).all()
    cuda_out = np.empty((1, 1))
    kernels.backend("cuda").step(np.full((1, 1), np.nan), np.ones((1, 1)), np.zeros(1), 0.1,
                                 act.code, cuda_out, None, 32)
    assert np.isnan(cuda_out).all()


@given(S=st.integers(1, 140), d=st.integers(1, 20), N=st.integers(1, 6),
       act=st.sampled_from(ACTS), seed=st.integers(0, 2**31),
       dtype=st.sampled_from([np.float64, np.float32]), chunk=st.integers(1, 64),
       lanes=st.sampled_from([1, 16, 128]))
def test_cpu_forward_sweep_gives_the_same_states_whether_or_not_it_stores_sigma_prime(
        S, d, N, act, seed, dtype, chunk, lanes):
    # with sigma' stored the step runs _activate_t, without it _activate_value_t (which
    # falls back to the former where LLVM would round a row's last entries differently):
    # the states must be the same bits (or a checkpointed gradient would differ) for
    # every work-item width, on one thread and in the parallel kernel
    rng = np.random.default_rng(seed)
    K = (rng.standard_normal((N, d, d)) * 1.5 / np.sqrt(d)).astype(dtype)
    b = rng.standard_normal((N, d)).astype(dtype)
    x0 = rng.standard_normal((S, d)).astype(dtype)
    cpu = kernels.backend("cpu")
    for _ in _thread_counts():
        with _cpu_settings(lanes, 1 << 20, min(lanes, 8)):
            stored = np.empty((N + 1, S, d), dtype)
            stored[0] = x0
            bare = stored.copy()
            cpu.forward_sweep(stored, K, b, 0.3, act.code, np.empty((N, S, d), dtype), chunk)
            cpu.forward_sweep(bare, K, b, 0.3, act.code, None, chunk)
            assert np.array_equal(stored, bare)


@pytest.mark.parametrize("S", [5, 300])  # one work item (partials added as made), several
def test_cpu_adjoint_sweep_adds_into_a_strided_gradient_as_into_a_c_ordered_one(S):
    # the sweep views gK as flat rows; a gK that is not C-ordered is summed into a copy
    # of itself and written back: the same bits, added to what it held
    rng = np.random.default_rng(4)
    N, d = 3, 6
    K = rng.standard_normal((N, d, d)) / np.sqrt(d)
    b = rng.standard_normal((N, d))
    states = np.empty((N + 1, S, d))
    states[0] = rng.standard_normal((S, d))
    cpu = kernels.backend("cpu")
    dsig = np.empty((N, S, d))
    cpu.forward_sweep(states, K, b, 0.2, maths.TANH, dsig, 32)
    lam = rng.standard_normal((S, d))
    start_K, start_b = rng.standard_normal((N, d, d)), rng.standard_normal((N, d))
    gK, gb = start_K.copy(), start_b.copy()
    cpu.adjoint_sweep(states, lam, K, b, 0.2, maths.TANH, dsig, gK, gb, None, 32)
    wide = np.full((N, d, 2 * d), np.nan)
    strided = wide[:, :, ::2]
    strided[...] = start_K
    gb2 = start_b.copy()
    cpu.adjoint_sweep(states, lam, K, b, 0.2, maths.TANH, dsig, strided, gb2, None, 32)
    assert not strided.flags.c_contiguous
    assert np.array_equal(strided, gK) and np.array_equal(gb2, gb)
    assert np.all(np.isnan(wide[:, :, 1::2]))


def test_cpu_thread_count_follows_set_num_threads(monkeypatch):
    """The kernels' cheap thread count is Numba's (per thread, after set_num_threads), with
    or without Numba's C getter."""
    import numba

    from ptoc.kernels import cpu

    before = numba.get_num_threads()
    try:
        for fast in (True, False):
            if not fast:
                monkeypatch.setattr(cpu, "_fast_thread_count", None)
                monkeypatch.setattr(cpu, "_started_thread_count", numba.get_num_threads)
            for n in range(1, numba.config.NUMBA_NUM_THREADS + 1):
                numba.set_num_threads(n)
                assert cpu._num_threads() == n == numba.get_num_threads()
    finally:
        numba.set_num_threads(before)
    assert cpu._num_threads() == before


@pytest.mark.parametrize("fastmath", [False, True])
def test_compiled_tanh_equals_the_python_one_bitwise(fastmath):
    """The CPU versions of ``floor_value`` and ``power_of_two`` (no test for NaN, the
    exponent from bits) give tanh the same bits as the Python functions, which the CUDA
    target compiles, when nothing is contracted; NaN in, NaN out with the kernels'
    fast-math flags too (their accuracy: the test above)."""
    from numba import njit
    from numba.extending import register_jitable

    from ptoc import _config
    from ptoc.kernels import _bits  # noqa: F401 - the CPU versions

    tanh = register_jitable(maths.tanh)

    @njit(fastmath=_config.CPU_FASTMATH if fastmath else False, error_model="numpy")
    def loop(a, out):
        for t in range(a.size):
            out[t] = tanh(a[t])

    rng = np.random.default_rng(7)
    a = np.concatenate([rng.standard_normal(20000) * 5, rng.uniform(-21, 21, 20000),
                        10.0 ** rng.uniform(-320, 3, 5000), -np.arange(0, 41) * math.log(2) / 2,
                        [0.0, -0.0, 20.0, -20.0, np.inf, -np.inf, 1e308]])
    a = np.concatenate([a, np.full(9, np.nan)])  # a whole vector of NaN, and a remainder
    a[::97] = np.nan
    out = np.empty_like(a)
    loop(a, out)
    nan = np.isnan(a)
    assert np.isnan(out[nan]).all() and not np.isnan(out[~nan]).any()
    if not fastmath:
        python = np.array([maths.tanh(float(v)) for v in a[~nan]])
        assert np.array_equal(out[~nan].view(np.int64), python.view(np.int64))


def test_floor_value_and_power_of_two_pass_nan_through():
    from numba import njit

    from ptoc.kernels import _bits  # noqa: F401 - the CPU versions

    @njit(error_model="numpy")
    def both(x, k):
        return maths.floor_value(x), maths.power_of_two(k)

    for x in (-3.5, -0.5, 0.0, 2.25, -40.0):
        assert both(x, 0.0)[0] == maths.floor_value(x) == math.floor(x)
    for k in range(-58, 1):
        assert both(0.0, float(k))[1] == maths.power_of_two(float(k)) == 2.0**k
    assert all(math.isnan(v) for v in (maths.floor_value(math.nan), maths.power_of_two(math.nan),
                                        both(math.nan, 0.0)[0]))
    assert maths.floor_value(math.inf) == math.inf and both(-math.inf, 0.0)[0] == -math.inf


@contextlib.contextmanager
def _one_thread():
    import numba

    before = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        yield
    finally:
        numba.set_num_threads(before)


@pytest.mark.parametrize("store", [True, False])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("d", [8, 16])
@given(S8=st.integers(1, 24), N=st.integers(1, 8), seed=st.integers(0, 2**31),
       dtype=st.sampled_from([np.float64, np.float32]), h=st.floats(0.01, 1.0))
def test_cpu_width_8_and_16_forward_on_sample_rows_gives_the_bits_of_the_tiles(
        d, store, act, S8, N, seed, dtype, h):
    """At width 8 or 16 with a batch of whole vectors a one-thread forward sweep (and
    step) runs on the sample-major rows (no tiles, no transposes): the same states and
    sigma' bit for bit as the tile kernels, which the level kernels and the other widths
    run."""
    from ptoc.kernels import cpu as cpu_module

    S = 8 * S8
    rng = np.random.default_rng(seed)
    K = (rng.standard_normal((N, d, d)) * 1.5 / np.sqrt(d)).astype(dtype)
    b = rng.standard_normal((N, d)).astype(dtype)
    x0 = (rng.standard_normal((S, d)) * 2).astype(dtype)
    cpu = kernels.backend("cpu")
    calls = []
    rows8 = cpu_module._forward_rows_one_thread
    results = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu_module, "_forward_rows_one_thread",
                   lambda *a: (calls.append(1), rows8(*a)))
        for enabled in (True, False):
            mp.setattr(cpu_module, "_rows_enabled", enabled)
            with _one_thread():
                states = np.empty((N + 1, S, d), dtype)
                states[0] = x0
                dsig = np.empty((N, S, d), dtype) if store else None
                cpu.forward_sweep(states, K, b, h, act.code, dsig, 32)
                out = np.empty((S, d), dtype)
                cpu.step(x0, K[0], b[0], h, act.code, out, None, 32)
            results.append((states, dsig, out))
    assert len(calls) == 2  # the sweep and the step of the first pass took the rows path
    (s1, d1, o1), (s2, d2, o2) = results
    assert np.array_equal(s1, s2) and np.array_equal(o1, o2) and np.array_equal(o1, s1[1])
    if store:
        assert np.array_equal(d1, d2)


def test_cpu_rows_path_is_taken_only_where_it_applies():
    from ptoc.kernels import cpu as cpu_module

    x = np.zeros((16, 8))
    K, b = np.zeros((3, 8, 8)), np.zeros((3, 8))
    outs, dsig = np.zeros((3, 16, 8)), np.zeros((3, 16, 8))
    ok = cpu_module._rows_path
    assert ok(x, K, b, outs, dsig, True) and ok(x, K, b, outs, None, False)
    assert not ok(np.zeros((12, 8)), K, b, np.zeros((3, 12, 8)), None, False)  # 12 % 8
    for d in (6, 24, 32):
        assert not ok(np.zeros((16, d)), np.zeros((3, d, d)), np.zeros((3, d)),
                      np.zeros((3, 16, d)), None, False)
    assert ok(np.zeros((16, 16)), np.zeros((3, 16, 16)), np.zeros((3, 16)),
              np.zeros((3, 16, 16)), None, False)
    assert not ok(np.zeros((16, 16))[:, ::2], K, b, outs, None, False)  # strided states
    assert not ok(x, np.zeros((3, 8, 16))[:, :, ::2], b, outs, None, False)  # strided K
    assert not ok(x, K, np.zeros((3, 16))[:, ::2], outs, None, False)  # strided b
    assert not ok(x, K, b, outs, np.zeros((3, 16, 16))[:, :, ::2], True)  # strided sigma'


@pytest.mark.parametrize("d", [8, 16])
@given(S=st.integers(1, 80), N=st.integers(1, 5), seed=st.integers(0, 2**31),
       dtype=st.sampled_from([np.float64, np.float32]), chunk=st.sampled_from([8, 16, 32]),
       keep=st.booleans(), grad=st.booleans(), h=st.floats(0.01, 1.0))
def test_cpu_width_8_and_16_adjoint_on_sample_rows_gives_the_bits_of_the_tiles(
        d, S, N, seed, dtype, chunk, keep, grad, h):
    """At width 8 or 16 with sigma' stored, a one-thread adjoint sweep (and adjoint step,
    and parameter gradient) runs on the sample-major rows: the same lambdas and the
    same gradient sums, added to what gK and gb held, bit for bit as the tiles, for any
    batch (whole vectors or not) and chunk."""
    from ptoc.kernels import cpu as cpu_module

    rng = np.random.default_rng(seed)
    K = (rng.standard_normal((N, d, d)) * 1.5 / np.sqrt(d)).astype(dtype)
    b = rng.standard_normal((N, d)).astype(dtype)
    states = (rng.standard_normal((N + 1, S, d)) * 2).astype(dtype)
    dsig = rng.uniform(0.0, 1.0, (N, S, d)).astype(dtype)
    lam_N = rng.standard_normal((S, d)).astype(dtype)
    start_K, start_b = rng.standard_normal((N, d, d)), rng.standard_normal((N, d))
    cpu = kernels.backend("cpu")
    calls, results = [], []
    rows = cpu_module._adjoint_rows_one_thread
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu_module, "_adjoint_rows_one_thread",
                   lambda *a: (calls.append(1), rows(*a)))
        for enabled in (True, False):
            mp.setattr(cpu_module, "_rows_enabled", enabled)
            with _one_thread():
                gK = start_K.astype(dtype) if grad else None
                gb = start_b.astype(dtype) if grad else None
                lams = np.empty((N + 1, S, d), dtype) if keep else None
                lam_0 = cpu.adjoint_sweep(states, lam_N, K, b, h, 0, dsig, gK, gb, lams, chunk)
                out = np.empty((S, d), dtype)
                gK1, gb1 = start_K[0].astype(dtype), start_b[0].astype(dtype)
                cpu.adjoint_step(states[0], lam_N, K[0], b[0], h, 0, out, gK1, gb1, dsig[0],
                                 chunk)
                gK2, gb2 = start_K[0].astype(dtype), start_b[0].astype(dtype)
                cpu.param_grad(states[0], lam_N, K[0], b[0], h, 0, gK2, gb2, dsig[0], chunk)
            results.append([lam_0, gK, gb, lams, out, gK1, gb1, gK2, gb2])
    assert len(calls) == 3  # the sweep, the step and the gradient of the first pass
    for a, c in zip(*results, strict=True):
        assert (a is None and c is None) or np.array_equal(a, c)


def test_cpu_adjoint_rows_path_is_taken_only_where_it_applies():
    from ptoc.kernels import cpu as cpu_module

    ok = cpu_module._adjoint_rows_path
    xs, lam, K = np.zeros((4, 16, 8)), np.zeros((16, 8)), np.zeros((3, 8, 8))
    dsig, lams, out = np.zeros((3, 16, 8)), np.zeros((4, 16, 8)), np.zeros((16, 8))
    assert ok(xs, lam, K, dsig, lams, out) and ok(xs, lam, K, dsig, None, None)
    assert ok(np.zeros((4, 13, 8)), np.zeros((13, 8)), K, np.zeros((3, 13, 8)), None, None)
    assert not ok(xs, lam, K, None, None, None)  # sigma' recomputed: the tiles
    for d in (4, 12, 32):
        assert not ok(np.zeros((4, 16, d)), np.zeros((16, d)), np.zeros((3, d, d)),
                      np.zeros((3, 16, d)), None, None)
    assert not ok(np.zeros((4, 16, 16))[:, :, ::2], lam, K, dsig, None, None)
    assert not ok(xs, np.zeros((16, 16))[:, ::2], K, dsig, None, None)
    assert not ok(xs, lam, np.zeros((3, 8, 16))[:, :, ::2], dsig, None, None)
    assert not ok(xs, lam, K, np.zeros((3, 16, 16))[:, :, ::2], None, None)
    assert not ok(xs, lam, K, dsig, np.zeros((4, 16, 16))[:, :, ::2], None)
    assert not ok(xs, lam, K, dsig, None, np.zeros((16, 16))[:, ::2])


@given(n=st.integers(0, 70), seed=st.integers(0, 2**31),
       dtype=st.sampled_from([np.float64, np.float32]),
       h_dtype=st.sampled_from([np.float64, np.float32]), h=st.floats(-2.0, 2.0))
def test_cpu_bias_partial_adds_the_samples_in_eight_lanes_in_a_fixed_order(
        n, seed, dtype, h_dtype, h):
    """The tiles' bias partial (which the sample-major rows reproduce) scales a row of
    samples by h and sums it as written: sample t in lane t % 8 in float64, each lane
    in order, the lanes as ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)), or, with
    PTOC_FASTMATH=0, in sample order; checked against those orders in Python, with
    scales of many magnitudes, so that another order would round differently."""
    from ptoc.kernels import cpu as cpu_module

    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(n) * 10.0 ** rng.uniform(-8, 8, n)).astype(dtype)
    hh = h_dtype(h)
    expected_x = np.array([dtype(hh * v) for v in x], dtype)  # h * x in the wider type
    lanes = [0.0 * float(hh)] * 8
    for t, v in enumerate(expected_x):
        lanes[t % 8] = lanes[t % 8] + float(v)
    expected = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + \
        ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]))
    in_order = 0.0 * float(hh)  # PTOC_FASTMATH=0: the samples one after the other
    for v in expected_x:
        in_order = in_order + float(v)
    y = x.copy()
    got = cpu_module._lane_sum_scaled(x, hh)
    got_in_order = cpu_module._sum_scaled_in_order(y, hh)
    assert np.array_equal(x, expected_x) and np.array_equal(y, expected_x)
    assert got == expected or (math.isnan(got) and math.isnan(expected))
    assert got_in_order == in_order or (math.isnan(got_in_order) and math.isnan(in_order))


def _level_case(S8, n, d, seed, dtype, with_g):
    """A level's values, weights, derivatives, step sizes, two runs and some points (with
    rows of an output to sum into), for the rows-against-tiles tests below."""
    S = 8 * S8
    rng = np.random.default_rng(seed)
    positions = np.sort(rng.choice(np.arange(1, n), size=int(rng.integers(1, n - 1)),
                                   replace=False))
    cut = int(rng.integers(1, n - 1))
    return dict(
        K=(rng.standard_normal((n, d, d)) * 1.5 / np.sqrt(d)).astype(dtype),
        b=rng.standard_normal((n, d)).astype(dtype),
        D=rng.uniform(0.0, 1.0, (n, S, d)).astype(dtype),
        dt=rng.uniform(0.05, 0.6, n).astype(dtype),
        u0=(rng.standard_normal((n, S, d)) * 2).astype(dtype),
        g=rng.standard_normal((n, S, d)).astype(dtype) if with_g else None,
        starts=np.array([1, cut + 1]), ends=np.array([cut - 1, n - 1]), positions=positions,
        rows=rng.permutation(len(positions)),
        base=rng.standard_normal((len(positions), S, d)).astype(dtype))


def _rows_against_tiles(names, compute, parallel=False):
    """``compute()`` with the rows paths on, then off; returns both results, after checking
    that the rows kernels ``names`` (their one-thread variants) ran five times (runs, four
    point modes) in the first pass. ``parallel``: as on two threads (the kernels' thread
    count says 2, whatever Numba runs) with every level kernel parallel
    (``CPU_PARALLEL_MIN_WORK = 0``), where the parallel variants ran at least once (a
    single point runs on one thread)."""
    from ptoc import _config
    from ptoc.kernels import cpu as cpu_module

    calls, results = [], []
    with pytest.MonkeyPatch.context() as mp:
        for name in names + tuple(n.replace("_one_thread", "_parallel") for n in names):
            kernel = getattr(cpu_module, name)
            mp.setattr(cpu_module, name, lambda *a, k=kernel, n=name: (calls.append(n), k(*a)))
        if parallel:
            mp.setattr(_config, "CPU_PARALLEL_MIN_WORK", 0)
            mp.setattr(cpu_module, "_num_threads", lambda: 2)
        for enabled in (True, False):
            mp.setattr(cpu_module, "_rows_enabled", enabled)
            if parallel:
                results.append(compute())
            else:
                with _one_thread():
                    results.append(compute())
    assert len(calls) == 5
    assert any(n.endswith("_parallel") for n in calls) == parallel
    return results


_POINT_MODES = (maths.POINT_APPLY, maths.POINT_RESIDUAL, maths.POINT_RESIDUAL_G,
                maths.POINT_TAU)


def _assert_same_level_results(results):
    (u1, o1), (u2, o2) = results
    assert np.array_equal(u1, u2)
    for a, c in zip(o1, o2, strict=True):
        assert np.array_equal(a, c)


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("d", [8, 16])
@pytest.mark.parametrize("act", ACTS)
@given(S8=st.integers(1, 8), n=st.integers(3, 14), seed=st.integers(0, 2**31),
       dtype=st.sampled_from([np.float64, np.float32]), with_g=st.booleans())
def test_cpu_state_level_kernels_on_sample_rows_give_the_bits_of_the_tiles(
        parallel, d, act, S8, n, seed, dtype, with_g):
    """On one thread at width 8 or 16 with a batch of whole vectors the state runs and
    points of MGRIT and parareal run on the grid's rows: every mode gives the bits of the
    tile kernels (runs with and without a right-hand side, points that apply the step or
    form either half of the FAS right-hand side)."""
    c = _level_case(S8, n, d, seed, dtype, with_g)
    cpu = kernels.backend("cpu")

    def compute():
        u = c["u0"].copy()
        cpu.state_runs(u, c["g"], c["K"], c["b"], c["dt"], act.code, c["starts"], c["ends"], 32)
        outs = []
        for mode in _POINT_MODES:
            out = c["base"].copy()
            gm = (c["u0"] if c["g"] is None else c["g"]) if mode == maths.POINT_RESIDUAL_G \
                else None
            cpu.state_points_into(u, c["K"], c["b"], c["dt"], act.code, c["positions"], out,
                                  None if mode == maths.POINT_APPLY else c["rows"], gm, mode, 32)
            outs.append(out)
        return u, outs

    _assert_same_level_results(_rows_against_tiles(
        ("_state_runs_rows_one_thread", "_state_points_rows_one_thread"), compute, parallel))


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("d", [8, 16])
@given(S8=st.integers(1, 8), n=st.integers(3, 14), seed=st.integers(0, 2**31),
       dtype=st.sampled_from([np.float64, np.float32]), with_g=st.booleans())
def test_cpu_adjoint_level_kernels_on_sample_rows_give_the_bits_of_the_tiles(
        parallel, d, S8, n, seed, dtype, with_g):
    """The adjoint runs and points of MGRIT and parareal on the grid's rows (one thread,
    width 8 or 16, a batch of whole vectors): the bits of the tiles in every mode."""
    c = _level_case(S8, n, d, seed, dtype, with_g)
    cpu = kernels.backend("cpu")

    def compute():
        lam = c["u0"].copy()
        cpu.adjoint_runs(lam, c["g"], c["D"], c["K"], c["dt"], c["starts"], c["ends"], 32)
        outs = []
        for mode in _POINT_MODES:
            out = c["base"].copy()
            gm = (c["u0"] if c["g"] is None else c["g"]) if mode == maths.POINT_RESIDUAL_G \
                else None
            cpu.adjoint_points_into(lam, c["D"], c["K"], c["dt"], c["positions"], out,
                                    None if mode == maths.POINT_APPLY else c["rows"], gm, mode,
                                    32)
            outs.append(out)
        return lam, outs

    _assert_same_level_results(_rows_against_tiles(
        ("_adjoint_runs_rows_one_thread", "_adjoint_points_rows_one_thread"), compute,
        parallel))


@pytest.mark.parametrize("d", [8, 16])
@pytest.mark.parametrize("act", ACTS)
@given(S8=st.integers(1, 6), n=st.integers(1, 9), seed=st.integers(0, 2**31),
       dtype=st.sampled_from([np.float64, np.float32]), backwards=st.booleans(),
       chunk=st.sampled_from([8, 16, 32]))
def test_cpu_layer_gradients_and_level_derivatives_on_sample_rows_give_the_bits_of_the_tiles(
        d, act, S8, n, seed, dtype, backwards, chunk):
    """On one thread at width 8 or 16 with a batch of whole vectors, the layer gradients
    of the layer-parallel solvers (from ``x_n`` and ``lambda_{n+1}``, the adjoints also
    as the backward view the solvers pass) and the ``sigma'`` of an adjoint level run on
    the sample-major rows: the bits of the tile kernels, added into gradients that
    already hold values."""
    from ptoc.kernels import cpu as cpu_module

    S = 8 * S8
    rng = np.random.default_rng(seed)
    xs = (rng.standard_normal((n, S, d)) * 2).astype(dtype)
    lam_rows = rng.standard_normal((n, S, d)).astype(dtype)
    lams = lam_rows[::-1] if backwards else lam_rows
    K = (rng.standard_normal((n, d, d)) * 1.5 / np.sqrt(d)).astype(dtype)
    b = rng.standard_normal((n, d)).astype(dtype)
    gK0 = rng.standard_normal((n, d, d)).astype(dtype)
    gb0 = rng.standard_normal((n, d)).astype(dtype)
    h = float(rng.uniform(0.01, 0.5))
    cpu = kernels.backend("cpu")

    def compute():
        gK, gb = gK0.copy(), gb0.copy()
        cpu.layer_gradients(xs, lams, K, b, h, act.code, gK, gb, chunk)
        D = cpu.level_derivatives(xs, K, b, act.code, None, chunk)
        return gK, gb, D[1:]

    calls, results = [], []
    with pytest.MonkeyPatch.context() as mp:
        for name in ("_layer_gradients_rows_one_thread", "_level_derivatives_rows"):
            kernel = getattr(cpu_module, name)
            mp.setattr(cpu_module, name, lambda *a, k=kernel: (calls.append(1), k(*a)))
        for enabled in (True, False):
            mp.setattr(cpu_module, "_rows_enabled", enabled)
            with _one_thread():
                results.append(compute())
    assert len(calls) == (2 if n > 1 else 1)
    for a, c in zip(*results, strict=True):
        assert np.array_equal(a, c)


def test_cpu_layer_gradients_take_the_rows_only_where_they_apply():
    """The rows path of the layer gradients needs width 8 or 16, a batch of whole vectors,
    states and adjoints stored as whole layers (either direction) and unit-stride
    weights, on any number of threads; otherwise the tiles run."""
    from ptoc.kernels import cpu as cpu_module

    def ok(S=16, d=8, lams=None, K=None):
        xs = np.zeros((3, S, d))
        lams = np.zeros((3, S, d)) if lams is None else lams
        K = np.zeros((3, d, d)) if K is None else K
        return cpu_module._gradients_rows(xs, lams, K, np.zeros((3, d)), np.zeros((3, d, d)),
                                          np.zeros((3, d)))

    with _one_thread():
        assert ok() and ok(d=16) and ok(lams=np.zeros((3, 16, 8))[::-1])
        assert not ok(d=4) and not ok(d=32) and not ok(S=12)
        assert not ok(lams=np.zeros((6, 16, 8))[::2])  # every other layer of a grid
        assert not ok(lams=np.zeros((3, 16, 8), order="F"))
        assert not ok(lams=np.zeros((3, 16, 8), np.float32))
        assert not ok(K=np.zeros((3, 8, 8)).transpose(0, 2, 1))
    import numba

    if numba.config.NUMBA_NUM_THREADS > 1:  # on more threads as well (a one-thread kernel)
        before = numba.get_num_threads()
        numba.set_num_threads(2)
        try:
            assert ok()
        finally:
            numba.set_num_threads(before)
