"""MGRIT's fused level passes (``LevelSteps.runs_then_residuals`` and
``correct_then_runs``): a compiled level does them interval by interval, and must give
the bits of the same operations done one after the other; a solve that uses them must
give the bits of one that does not."""

import contextlib

import numba
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import ptoc
from ptoc.kernels import cpu as cpu_module
from ptoc.parallel import MGRIT
from ptoc.parallel import mgrit as mgrit_module
from ptoc.parallel.driver import parallel_forward, parallel_gradient
from ptoc.propagator import LevelPlan, LevelSteps, ResNetPropagator


@contextlib.contextmanager
def _threads(n):
    before = numba.get_num_threads()
    numba.set_num_threads(n)
    try:
        yield
    finally:
        numba.set_num_threads(before)


@contextlib.contextmanager
def _counting(*names):
    """Count the calls of the compiled kernels ``names`` of ``ptoc.kernels.cpu``."""
    calls = []
    with pytest.MonkeyPatch.context() as mp:
        for name in names:
            kernel = getattr(cpu_module, name)
            mp.setattr(cpu_module, name, lambda *a, k=kernel: (calls.append(1), k(*a))[1])
        yield calls


def _level(d, S, n, seed, with_g, adjacent, backward=False):
    """A fine level of ``n`` steps (state steps, or adjoint steps about random states):
    the propagator's level steps, C-points (two of them next to each other when
    ``adjacent``), the F-runs between them, the values and the coarse arrays of a
    restriction and a correction."""
    rng = np.random.default_rng(seed)
    net = ptoc.ResNet(width=d, depth=n, n_in=3, n_classes=3)
    params = net.init_params(rng, scale=1.5)
    params.b[...] = rng.standard_normal(params.b.shape)
    prop = ResNetPropagator(net, params, target="cpu")
    layers = np.arange(n, dtype=np.int64)
    plan = LevelPlan(level=0, backward=backward, layers=layers[::-1].copy() if backward
                     else layers, spans=np.ones(n, dtype=np.int64),
                     states=rng.standard_normal((n, S, d)) if backward else None)
    steps = prop.level_steps(plan)
    c = set(rng.choice(np.arange(1, n + 1), size=int(rng.integers(1, max(2, n // 2))),
                       replace=False).tolist())
    if adjacent and n >= 3:
        k = int(rng.integers(2, n + 1))
        c |= {k - 1, k}
    c = np.array(sorted(c), dtype=np.int64)
    f = [k for k in range(1, n + 1) if k not in set(c.tolist())]
    starts, ends = [], []
    for k in f:
        if starts and ends[-1] == k - 1:
            ends[-1] = k
        else:
            starts.append(k)
            ends.append(k)
    nc = len(c)
    shape = (S, d)
    return dict(
        steps=steps, c=c, rows=rng.permutation(np.arange(1, nc + 1)).astype(np.int64),
        starts=np.array(starts, dtype=np.int64), ends=np.array(ends, dtype=np.int64),
        u=rng.standard_normal((n + 1,) + shape) * 2,
        g=rng.standard_normal((n + 1,) + shape) if with_g else None,
        out=rng.standard_normal((nc + 1,) + shape), inject=rng.standard_normal((nc + 1,) + shape),
        uc=rng.standard_normal((nc + 1,) + shape), v=rng.standard_normal((nc + 1,) + shape))


def _restriction(case, method):
    u, out, inject = case["u"].copy(), case["out"].copy(), case["inject"].copy()
    method(case["steps"], u, case["g"], case["starts"], case["ends"], case["c"], out,
           case["rows"], inject)
    return u, out, inject


def _correction(case, method, measure):
    u = case["u"].copy()
    before = np.full((len(case["c"]),) + u.shape[1:], np.nan) if measure else None
    sq = method(case["steps"], u, case["g"], case["c"], case["uc"], case["v"], case["rows"],
                case["starts"], case["ends"], before)
    return u, before, sq


def _same(a, b):
    for x, y in zip(a, b, strict=True):
        if isinstance(x, np.ndarray):
            assert np.array_equal(x, y)
        else:
            assert x == y


@pytest.mark.parametrize("sweep", ["state", "adjoint"])
@pytest.mark.parametrize("d", [8, 16])
@given(S8=st.integers(1, 5), n=st.integers(2, 24), seed=st.integers(0, 2**31),
       with_g=st.booleans(), adjacent=st.booleans(), measure=st.booleans())
def test_fused_level_passes_give_the_bits_of_the_operations_one_after_the_other(
        sweep, d, S8, n, seed, with_g, adjacent, measure):
    """On one thread at width 8 or 16 (where the compiled passes run: checked by counting
    their calls) the F-relaxation with the restriction's fine half, and the correction
    with the F-relaxation and the measured C-relaxation (C-points next to each other
    included, each reading its neighbour's value from before), give the values and the
    sum of the composed operations bit for bit, on one thread and on all of them; for
    state steps and for adjoint steps."""
    case = _level(d, 8 * S8, n, seed, with_g, adjacent, backward=sweep == "adjoint")
    with _threads(1), _counting(f"_{sweep}_runs_residuals_rows_one_thread",
                                f"_{sweep}_correct_runs_rows_one_thread") as calls:
        fused = (_restriction(case, type(case["steps"]).runs_then_residuals),
                 _correction(case, type(case["steps"]).correct_then_runs, measure))
    assert len(calls) == (len(case["starts"]) > 0) + (len(case["c"]) > 0)
    for threads in (1, numba.config.NUMBA_NUM_THREADS):
        with _threads(threads):
            composed = (_restriction(case, LevelSteps.runs_then_residuals),
                        _correction(case, LevelSteps.correct_then_runs, measure))
        _same(fused[0], composed[0])
        _same(fused[1], composed[1])
    if measure and len(case["c"]):
        u, before, sq = fused[1]
        assert not np.isnan(before).any()
        assert sq == pytest.approx(float(np.sum((u[case["c"]] - before) ** 2)), rel=1e-12)


def test_a_c_point_after_a_c_point_reads_the_value_from_before_the_c_relaxation():
    """C-points 2 and 3 next to each other: the new value at 3 is the step from the value
    at 2 before the sweep (the corrected one), whichever path runs."""
    case = _level(8, 8, 4, 0, False, False)
    rng = np.random.default_rng(5)
    case.update(c=np.array([2, 3], dtype=np.int64), rows=np.array([1, 2], dtype=np.int64),
                starts=np.array([1, 4], dtype=np.int64), ends=np.array([1, 4], dtype=np.int64),
                uc=rng.standard_normal((3, 8, 8)), v=rng.standard_normal((3, 8, 8)))
    with _threads(1):
        u, before, _ = _correction(case, type(case["steps"]).correct_then_runs, True)
    corrected = case["u"][2] + (case["uc"][1] - case["v"][1])
    assert np.array_equal(before[0], corrected)
    assert np.array_equal(u[3], case["steps"].step(3, corrected))


def _without_fused_passes(mp):
    """Make every MGRIT level take the operations one call at a time, as on a level
    shared with other ranks."""
    init = mgrit_module.MGRITSolve.__init__

    def init_then_share(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self._alone = [False] * len(self.levels)
    mp.setattr(mgrit_module.MGRITSolve, "__init__", init_then_share)


@pytest.mark.parametrize("width", [8, 5])
@given(depth=st.integers(3, 40), coarsening=st.integers(2, 5), max_levels=st.integers(2, 4),
       relaxation=st.sampled_from(["F", "FCF"]), cycle=st.sampled_from(["V", "F"]),
       nested=st.booleans(), seed=st.integers(0, 2**31),
       dtype=st.sampled_from([np.float64, np.float32]))
def test_mgrit_with_fused_level_passes_gives_the_bits_of_mgrit_without(
        width, depth, coarsening, max_levels, relaxation, cycle, nested, seed, dtype):
    """A one-rank MGRIT solve (states and adjoints) with the fused passes, on one thread
    (width 8: compiled; width 5: composed), gives the states, adjoints, gradient and
    residual history of the same solve with every operation a call of its own, in
    float64 and float32."""
    rng = np.random.default_rng(seed)
    net = ptoc.ResNet(width=width, depth=depth, n_in=3, n_classes=3, dtype=dtype)
    params = net.init_params(rng)
    X, y = rng.standard_normal((16, 3)).astype(dtype), rng.integers(0, 3, 16)
    solver = MGRIT(coarsening=coarsening, max_levels=max_levels, min_coarse_steps=1,
                   relaxation=relaxation, cycle=cycle, nested_iteration=nested,
                   tol=1e-12 if dtype == np.float64 else 1e-5, max_iterations=6)
    results = []
    with _threads(1):
        results.append(parallel_gradient(net, params, X, y, solver))
        with pytest.MonkeyPatch.context() as mp:
            _without_fused_passes(mp)
            results.append(parallel_gradient(net, params, X, y, solver))
    a, b = results
    assert np.array_equal(a.states, b.states) and np.array_equal(a.adjoints, b.adjoints)
    assert all(np.array_equal(a.grads[k], b.grads[k]) for k in a.grads)
    assert a.forward.residuals == b.forward.residuals
    assert a.adjoint.residuals == b.adjoint.residuals
    assert a.forward.steps_total == b.forward.steps_total


def test_mgrit_on_one_rank_takes_the_fused_passes_at_width_16_on_one_thread():
    """The PyMGRIT benchmark's shape (width 16, S = 32) on one thread: the compiled passes
    run, for the states and for the adjoints, and the solves converge to the serial
    sweeps (states, gradient)."""
    rng = np.random.default_rng(1)
    net = ptoc.ResNet(width=16, depth=64, n_in=3, n_classes=3)
    params = net.init_params(rng)
    X = rng.standard_normal((32, 3))
    y = rng.integers(0, 3, 32)
    names = [f"_{s}_{p}_rows_one_thread" for s in ("state", "adjoint")
             for p in ("runs_residuals", "correct_runs")]
    with _threads(1), _counting(*names) as calls:
        states, record = parallel_forward(net, params, X, MGRIT(coarsening=4, max_levels=2,
                                                                tol=1e-12))
    assert len(calls) == 2 * record.iterations
    serial = ptoc.forward(net, params, X).states
    assert np.max(np.abs(states - serial)) < 1e-12
    with _threads(1), _counting(*names) as calls:
        result = parallel_gradient(net, params, X, y, MGRIT(coarsening=4, max_levels=2,
                                                            tol=1e-12))
    assert len(calls) == 2 * (result.forward.iterations + result.adjoint.iterations)
    _, grads = ptoc.loss_and_grad(net, params, X, y)
    assert all(np.max(np.abs(result.grads[k] - grads[k])) < 1e-9 * np.max(np.abs(grads[k]))
               for k in grads)
