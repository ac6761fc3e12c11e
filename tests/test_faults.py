"""Faults of the core found by adversarial testing: results of one network handed to
another, memory held after evaluation, finite but meaningless arguments, solves that
stagnate, and a coarse propagator that returns nothing."""

import re
import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import ptoc
from ptoc import sweeps
from ptoc._workspace import BUFFER_OVERHEAD_BYTES, Workspace
from ptoc.objective import classifier_loss, logits, regulariser
from ptoc.parallel import MGRIT, Parareal
from ptoc.parallel.options import STAGNATION_WINDOW, has_stagnated


def small(width=4, depth=8, S=10, dtype="float64", seed=0):
    net = ptoc.ResNet(width=width, depth=depth, n_in=2, n_classes=3, dtype=dtype)
    X = np.random.default_rng(seed).standard_normal((S, 2))
    return net, net.init_params(seed), X


# --- adjoint of a forward result of another network --------------------------------------------

@pytest.mark.parametrize("target", ["cpu", "numpy"])
@pytest.mark.parametrize("other, checkpoint", [
    (dict(depth=4), None),   # shallower: once NaN (cpu) or a raw IndexError (numpy)
    (dict(depth=16), None),  # deeper: once a silently wrong number
    (dict(depth=4), 2),      # checkpointed, shallower: once a raw IndexError
    (dict(width=6), None),   # wider: once a message about lam_N only
])
def test_adjoint_refuses_forward_result_of_another_network(target, other, checkpoint):
    net, params, X = small()
    kw = dict(width=4, depth=8) | other
    onet, oparams, _ = small(**kw)
    fwd = ptoc.forward(onet, oparams, X, checkpoint_every=checkpoint)
    lam_N = np.ones((X.shape[0], net.width))
    with pytest.raises(ValueError, match=r"fwd was computed for ResNet\(d=\d+, N=\d+.*differ "
                                         rf"in {next(iter(other))}"):
        ptoc.adjoint(net, params, fwd, lam_N, target=target)


def test_adjoint_refuses_what_is_not_a_forward_result():
    net, params, X = small()
    with pytest.raises(TypeError, match="fwd must be the ForwardResult of ptoc.forward, got "
                                        "NoneType"):
        ptoc.adjoint(net, params, None, np.ones((X.shape[0], 4)))


def test_adjoint_checks_the_layout_of_a_hand_made_forward_result():
    net, params, X = small()
    fwd = ptoc.forward(net, params, X, checkpoint_every=3)
    fwd = sweeps.ForwardResult(fwd.states, 2, None, None)  # wrong spacing for its checkpoints
    with pytest.raises(ValueError, match=r"fwd.states has shape \(4, 10, 4\), but "
                                         r"checkpoint_every=2 .* needs \(5, S, 4\)"):
        ptoc.adjoint(net, params, fwd, np.ones((X.shape[0], 4)))


def test_adjoint_of_its_own_forward_result_is_unchanged_and_any_target_may_run_it():
    net, params, X = small()
    lam_N = np.random.default_rng(1).standard_normal((X.shape[0], 4))
    ref = ptoc.adjoint(net, params, ptoc.forward(net, params, X, target="numpy"), lam_N,
                       target="numpy")
    for c in (None, 3):
        adj = ptoc.adjoint(net, params, ptoc.forward(net, params, X, checkpoint_every=c),
                           lam_N, target="cpu")
        np.testing.assert_allclose(adj.initial_adjoint, ref.initial_adjoint, rtol=1e-12)


# --- memory held after evaluation ----------------------------------------------------------------

def test_predict_keeps_two_states_not_the_trajectory():
    """Evaluation keeps x_n and x_{n+1} only: after predict, accuracy and loss the sweeps'
    workspace holds two (S, d) buffers, not the (N+1) S d trajectory it once kept (for
    predict on 5,000 rows at d = 64, N = 512: 1.3 GB held after the call)."""
    net, params, X = small(width=16, depth=64, S=200)
    y = np.arange(200) % 3
    sweeps.release_workspace()
    ptoc.predict(net, params, X)
    ptoc.accuracy(net, params, X, y)
    ptoc.loss(net, params, X, y)
    held = sum(b.nbytes for b in sweeps._workspace.buffers.values())
    assert held <= 2 * 200 * 16 * 8


@pytest.mark.parametrize("target", ["cpu", "numpy"])
@pytest.mark.parametrize("depth", [7, 8])
def test_evaluation_gives_the_numbers_of_forward_bitwise(target, depth):
    net, params, X = small(width=5, depth=depth, S=70)
    y = np.arange(70) % 3
    x_N = ptoc.forward(net, params, X, target=target).final_state
    assert np.array_equal(ptoc.predict_logits(net, params, X, target=target),
                          logits(params, x_N))
    assert ptoc.loss(net, params, X, y, target=target) == \
        classifier_loss(params, x_N, y)[0] + regulariser(net, params)


def test_huge_finite_params_pass_the_finiteness_check_without_a_warning():
    """Entries near the largest float64 are finite: accepted, with no overflow warning;
    NaN and inf are refused, naming the array."""
    net = ptoc.ResNet(width=2, depth=2, n_in=2, n_classes=2)
    p = net.init_params(0).to_dict()
    p["K"] = np.full_like(p["K"], 1e308)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        net.check_params(p)
    for bad in (np.nan, np.inf, -np.inf):
        p["b"] = np.zeros_like(p["b"])
        p["b"][1, 0] = bad
        with pytest.raises(ValueError, match=r"params\['b'\] contains non-finite values"):
            net.check_params(p)


def test_workspace_is_bounded_in_bytes():
    ws = Workspace(capacity=100, max_bytes=1000)
    big = ws.get("big", (200,), np.float64)  # 1600 bytes: returned, not kept
    assert big.shape == (200,) and ws.held_bytes == 0
    a = ws.get("a", (40,), np.float64)
    b = ws.get("b", (40,), np.float64)
    assert ws.held_bytes == 2 * (320 + BUFFER_OVERHEAD_BYTES)
    assert ws.get("a", (40,), np.float64) is a  # reused; now the most recent
    ws.get("c", (40,), np.float64)  # evicts the least recently used, b
    assert ws.held_bytes <= 1000 and ws.get("a", (40,), np.float64) is a
    assert ws.get("b", (40,), np.float64) is not b


@given(ops=st.lists(st.tuples(st.sampled_from("abcde"), st.integers(0, 60)), max_size=40),
       capacity=st.integers(1, 4), max_bytes=st.integers(0, 2000))
def test_workspace_counts_the_bytes_it_keeps(ops, capacity, max_bytes):
    """The running count of kept bytes equals the sum over the kept buffers after any
    sequence of requests, and never exceeds either bound."""
    ws = Workspace(capacity=capacity, max_bytes=max_bytes)
    for name, n in ops:
        buf = ws.get(name, (n,), np.float64)
        assert buf.shape == (n,)
        assert ws.held_bytes == sum(b.nbytes + BUFFER_OVERHEAD_BYTES for b in ws.buffers.values())
        assert ws.held_bytes <= max_bytes and len(ws.buffers) <= capacity
    ws.clear()
    assert ws.held_bytes == 0 and not ws.buffers


@given(ops=st.lists(st.tuples(st.sampled_from("abcd"), st.integers(0, 40),
                              st.sampled_from([None, 0, 300, 700, 2000])), max_size=40),
       capacity=st.integers(1, 4))
def test_workspace_keeps_the_least_recently_used_order(ops, capacity):
    """Against a plain model of the documented rules (LRU order, both bounds, a buffer
    too big for the byte bound returned and not kept), with the byte bound changed
    between requests: the same buffers are reused, and the same ones kept, in order."""
    ws = Workspace(capacity=capacity, max_bytes=2000)
    model: list[tuple[str, int]] = []  # kept keys, least recently used first
    seen: dict[tuple[str, int], np.ndarray] = {}
    for name, n, new_limit in ops:
        if new_limit is not None:
            ws.max_bytes = new_limit
        key, limit = (name, n), ws.max_bytes
        charge = 8 * n + BUFFER_OVERHEAD_BYTES
        reused = key in model
        if reused:
            model.remove(key)
        if charge <= limit:
            while model and (len(model) >= capacity
                             or sum(8 * k[1] + BUFFER_OVERHEAD_BYTES for k in model)
                             + charge > limit):
                model.pop(0)
            model.append(key)
        buf = ws.get(name, (n,), np.float64)
        assert (buf is seen.get(key)) == reused
        seen[key] = buf
        assert [(k[0], k[1][0]) for k in ws.buffers] == model


def test_workspace_bound_follows_the_setting(monkeypatch):
    monkeypatch.setattr(ptoc._config, "WORKSPACE_BYTES", 0)
    net, params, X = small()
    sweeps.release_workspace()
    ptoc.loss_and_grad(net, params, X, np.arange(10) % 3)
    assert sweeps._workspace.held_bytes == 0


# --- finite but meaningless arguments ------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(T=1e-300), r"T must lie in \[1.776e-15, 4.504e\+15\] for depth=8 in float64: the step"),
    (dict(T=1e300), r"T must lie in \[.*T at most 1/epsilon"),
    (dict(T=-1), r"T must lie in \[1.776e-15, 4.504e\+15\]"),
    (dict(T=0), r"T must lie in \["),
    (dict(T=1e7, dtype="float32"), r"T must lie in \[9.537e-07, 8.389e\+06\] .* float32"),
    (dict(gamma=1e300), r"gamma must lie in \[0, 4.504e\+15\]"),
    (dict(gamma_t=-1.0), r"gamma_t must lie in \[0, "),
    (dict(gamma_c=1e20), r"gamma_c must lie in \[0, "),
    (dict(T=float("nan")), "T must be finite"),
    (dict(T="one"), "T must be a real number"),
])
def test_resnet_refuses_meaningless_magnitudes(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ptoc.ResNet(width=4, depth=8, **kwargs)


def test_resnet_accepts_the_ends_of_its_ranges():
    eps = np.finfo(np.float64).eps
    assert ptoc.ResNet(width=2, depth=8, T=8 * eps).h == eps
    assert ptoc.ResNet(width=2, depth=8, T=1e6, gamma=0.0, gamma_t=1 / eps).T == 1e6


@pytest.mark.parametrize("seed", [-1, "abc", 1.5, True])
def test_init_params_names_a_bad_seed(seed):
    net, _, _ = small()
    with pytest.raises(ValueError, match=r"seed must be None, an integer >= 0 or a "
                                         r"numpy.random.Generator, got"):
        net.init_params(seed=seed)


def test_init_params_refuses_a_meaningless_scale():
    net, _, _ = small()
    with pytest.raises(ValueError, match=r"scale must lie in \[0, "):
        net.init_params(0, scale=1e300)


# --- stagnation ----------------------------------------------------------------------------------

def test_stagnation_rule():
    floor = [1.0, 1e-3, 1e-7] + [1e-7] * STAGNATION_WINDOW
    assert has_stagnated(floor) and not has_stagnated(floor[:-1])
    assert has_stagnated([1.0, 1e-4, 1e-8] + [6e-9, 7e-9] * (STAGNATION_WINDOW // 2))
    halving = [0.9 ** k for k in range(400)]  # halves in 7 steps: never stagnated
    assert not any(has_stagnated(halving[:k]) for k in range(1, 401))
    # the plateau MGRIT crosses on ptoc solve --T 1e6 before it converges
    plateau = [1.15e7, 1.16e7, 1.27e7, 1.22e7, 1.18e7, 1.18e7, 1.13e7, 1.18e7, 1.14e7, 1.1e7]
    assert not has_stagnated(plateau)


def test_mgrit_warns_of_an_unreachable_tol_and_stops_when_it_stagnates():
    """float32 with tol=1e-10 once ran to max_iterations and advised raising it."""
    net, params, X = small(width=4, depth=64, S=8, dtype="float32")
    with pytest.warns(RuntimeWarning, match=r"MGRIT tol=1e-10 is below the rounding error "
                                            r"of the states in float32"):
        fwd = ptoc.forward(net, params, X, solver=MGRIT(coarsening=4, tol=1e-10,
                                                        max_iterations=50))
    rec = fwd.solve
    assert rec.stagnated and not rec.converged and rec.iterations < 50
    assert len(rec.residuals) == rec.iterations and has_stagnated(rec.residuals)
    assert f"stagnated at {min(rec.residuals):.3e} after {rec.iterations} iterations" in \
        rec.summary()


def test_mgrit_with_a_reachable_tol_neither_warns_nor_stagnates():
    net, params, X = small(width=4, depth=64, S=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fwd = ptoc.forward(net, params, X, solver=MGRIT(coarsening=4, tol=1e-10))
    assert fwd.solve.converged and not fwd.solve.stagnated
    assert "stagnated" not in fwd.solve.summary()


def test_parareal_cannot_stagnate_it_is_exact_after_its_chunks():
    """Parareal reproduces the serial sweep bit for bit after P iterations, so any tol is
    met by then, in float32 too."""
    net, params, X = small(width=4, depth=16, S=8, dtype="float32")
    fwd = ptoc.forward(net, params, X, solver=Parareal(chunks=4, tol=1e-30, max_iterations=10))
    assert fwd.solve.converged and fwd.solve.iterations <= 4 and not fwd.solve.stagnated


# --- a coarse propagator that returns nothing ----------------------------------------------------

@pytest.mark.parametrize("coarse, message", [
    (lambda j, x: None, r"coarse function coarse\(j, x\) returned None for chunk \d; it must "
                        r"return the state after the chunk, an array of shape \(10, 4\)"),
    (lambda j, x: x[:, :2], r"returned an array of shape \(10, 2\) .* expected real numbers "
                            r"of shape \(10, 4\)"),
])
def test_parareal_names_a_coarse_function_that_returns_no_state(coarse, message):
    net, params, X = small()
    with pytest.raises(ValueError, match=message):
        ptoc.forward(net, params, X, solver=Parareal(chunks=2, coarse=coarse))


def test_solve_on_a_long_time_horizon_stops_when_it_stagnates(capsys):
    """``ptoc solve --T 1e6``: MGRIT once sat at 4.5e-10 (tol 1e-10) until --max-iterations.
    It stops early, at the rounding error of states of size up to 1e6: a residual a few
    machine epsilons times the first one (about 1e7), whatever its last bits."""
    from ptoc.cli import main

    assert main(["solve", "--T", "1e6", "--depth", "64", "--sweep", "forward"]) == 3
    out = capsys.readouterr().out
    found = re.search(r"NOT converged \(stagnated at (\S+) after (\d+) iterations", out)
    first = float(re.search(r"residuals: (\S+)", out)[1])
    assert found and int(found[2]) < 50  # --max-iterations 50
    assert float(found[1]) < 50 * np.finfo(float).eps * first


def test_bounded_cache_keeps_at_most_its_bytes_least_recently_used_out():
    from ptoc._workspace import BUFFER_OVERHEAD_BYTES, array_bytes, bounded_cache

    calls = []

    @bounded_cache(4 * (1024 + BUFFER_OVERHEAD_BYTES))
    def block(n, size=128):
        calls.append(n)
        return [np.full(size, n, dtype=np.float64)]  # 1 KiB at the default size

    for n in range(10):
        block(n)
    assert block.cache_bytes() <= 4 * (1024 + BUFFER_OVERHEAD_BYTES)
    calls.clear()
    block(9), block(6)  # kept: no call
    assert calls == []
    block(0)  # dropped long ago: computed again
    assert calls == [0]
    big = block(99, 10_000)  # larger than the bound: returned, not kept
    assert array_bytes(big) == 80_000 and block.cache_bytes() <= 4 * 1152
    block(99, 10_000)
    assert calls == [0, 99, 99]


def test_mgrit_keeps_its_grid_structures_bounded_in_bytes():
    from ptoc.parallel import mgrit

    mgrit._structure.cache_clear()
    net = ptoc.ResNet(width=2, depth=64, n_in=2, n_classes=2)
    p = net.init_params(0)
    X, y = np.ones((3, 2)), np.array([0, 1, 0])
    for c in (2, 4, 8):
        ptoc.loss_and_grad(net, p, X, y, solver=ptoc.MGRIT(coarsening=c, max_iterations=1,
                                                           tol=1e-3), comm=2)
    held = mgrit._structure.cache_bytes()
    assert 0 < held <= mgrit.STRUCTURE_CACHE_BYTES
