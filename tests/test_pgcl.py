"""Predict globally, correct locally (Parpas & Muir; docs/theory/pgcl.md): ptoc.pgcl.PGCL."""

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ptoc
from ptoc.methods import GradientMethod, TrainingDivergedError
from ptoc.optim import LBFGS, SGD, Adam
from ptoc.parallel import SimulatedRanks, SingleRank, partition
from ptoc.pgcl import PGCL, ColdStart, LocalUpdate, PGCLState

HERE = Path(__file__).resolve().parent
MPIEXEC = shutil.which("mpiexec")


def problem(width=4, depth=7, S=6, seed=0, act="tanh", gammas=(1e-2, 1e-2, 1e-2), scale=1.0,
            n_in=3, T=1.0, opening="dense"):
    rng = np.random.default_rng(seed)
    n_in = width if opening == "identity" else n_in
    net = ptoc.ResNet(width=width, depth=depth, T=T, activation=act, n_in=n_in, n_classes=3,
                      opening=opening, gamma=gammas[0], gamma_t=gammas[1],
                      gamma_c=gammas[2])
    params = net.init_params(rng, scale=scale)
    params.b[...] = 0.5 * rng.standard_normal(params.b.shape)
    X = rng.standard_normal((S, n_in))
    y = rng.integers(0, 3, S)
    return net, params, X, y


def serial_sweeps(net, params, X, y):
    """All states and co-states of the serial sweeps."""
    fwd = ptoc.forward(net, params, X)
    _, lam_N, _, _ = ptoc.objective.classifier_loss(params, fwd.final_state, y)
    adj = ptoc.adjoint(net, params, fwd, lam_N, keep_adjoints=True)
    return fwd.states, adj.adjoints


def run(method, net, params, X, y, steps, state=None):
    state = method.init(net, params) if state is None else state
    outs = []
    for _ in range(steps):
        out = method.step(net, params, state, X, y)
        params, state = out.params, out.state
        outs.append(out)
    return params, state, outs


def same(p, q):
    return list(p) == list(q) and all(np.array_equal(p[k], q[k]) for k in p)


def grad_norm(net, params, X, y):
    _, g = ptoc.loss_and_grad(net, params, X, y)
    return math.sqrt(sum(float(np.sum(g[k] ** 2)) for k in g))


# --- exactness ---------------------------------------------------------------------------------

@pytest.mark.parametrize("optimizer", [SGD(lr=0.1), SGD(lr=0.1, momentum=0.9, nesterov=True),
                                       Adam(lr=0.01)], ids=["sgd", "nesterov", "adam"])
def test_one_chunk_is_serial_gradient_descent_bitwise(optimizer):
    net, params, X, y = problem()
    p1, _, o1 = run(PGCL(optimizer=optimizer), net, params, X, y, 3)
    p2, _, o2 = run(GradientMethod(optimizer=optimizer), net, params, X, y, 3)
    assert same(p1, p2)
    assert [o.loss for o in o1] == [o.loss for o in o2]
    assert o1[0].info["steps_total"] == o1[0].info["steps_critical_path"] == 2 * net.depth


@pytest.mark.parametrize("P", [2, 3, 7])
def test_serial_cold_start_on_P_ranks_equals_one_rank_and_serial_step(P):
    # the first step from exact (serially pipelined) boundaries is an exact gradient step:
    # the same bits on P simulated ranks, on one rank and for serial gradient descent
    net, params, X, y = problem(depth=7)
    opt = SGD(lr=0.1)
    many = PGCL(optimizer=opt, comm=P, cold_start="serial").step(
        net, params, PGCL(optimizer=opt, comm=P).init(net, params), X, y)
    one = PGCL(optimizer=opt).step(net, params, PGCL(optimizer=opt).init(net, params), X, y)
    ref = GradientMethod(optimizer=opt)
    serial = ref.step(net, params, ref.init(net, params), X, y)
    assert same(many.params, one.params) and same(one.params, serial.params)
    assert many.loss == one.loss == serial.loss
    assert many.info["state_defect"] == many.info["costate_defect"] == 0.0
    assert many.info["cold"] and many.info["steps_critical_path"] == 2 * net.depth


def test_the_coarse_cold_start_is_not_exact():
    # the counterpart of the test above: without corrections the step is inexact
    net, params, X, y = problem(depth=8, scale=1.5)
    m = PGCL(optimizer=SGD(lr=0.1), comm=4)
    out = m.step(net, params, m.init(net, params), X, y)
    ref = GradientMethod(optimizer=SGD(lr=0.1))
    serial = ref.step(net, params, ref.init(net, params), X, y)
    assert out.info["cold"] and out.info["state_defect"] > 1e-3
    assert max(float(np.max(np.abs(out.params[k] - serial.params[k]))) for k in params) > 1e-6


@settings(deadline=None)
@given(N=st.integers(1, 9), data=st.data(), width=st.integers(1, 4), S=st.integers(1, 5),
       seed=st.integers(0, 2**16), act=st.sampled_from(["tanh", "relu", "smoothrelu"]),
       coarse=st.sampled_from(["inject", "average"]),
       opening=st.sampled_from(["dense", "identity"]))
def test_prediction_with_the_fine_correction_is_exact_for_unchanged_weights(
        N, data, width, S, seed, act, coarse, opening):
    P = data.draw(st.integers(1, N), label="P")
    net, params, X, y = problem(width=width, depth=N, S=S, seed=seed, act=act, n_in=2,
                                opening=opening)
    states, lams = serial_sweeps(net, params, X, y)
    bounds = partition(N, P)
    opt = SGD(lr=0.3)

    # a serial cold start stores the fine values of `params`; the step then changes the
    # weights, but predicting again at `params` is exact, bit for bit
    m = PGCL(optimizer=opt, comm=P, coarse=coarse, cold_start="serial")
    moved = m.step(net, params, m.init(net, params), X, y)
    assert P == 1 or not same(moved.params, params)
    pred, _ = m.predict(net, params, moved.state, X, y)
    assert not pred.cold
    assert np.array_equal(pred.bounds, bounds)
    assert np.array_equal(pred.states, states[bounds[:-1]])
    assert np.array_equal(pred.costates, lams[bounds[1:]])
    assert np.array_equal(pred.fine_states, states[bounds[1:]])
    assert np.array_equal(pred.fine_costates, lams[bounds[:-1]])
    assert pred.state_defect == pred.costate_defect == 0.0
    # ... and a step from there is exactly the serial gradient step
    warm = m.step(net, params, moved.state, X, y)
    ref = GradientMethod(optimizer=opt)
    serial = ref.step(net, params, ref.init(net, params), X, y)
    assert same(warm.params, serial.params) and warm.loss == serial.loss

    # from a coarse cold start, predictions at fixed weights are parareal iterations:
    # after k of them the first k+1 chunk initial states are exact; the co-states follow
    # backward once all states are (the last chunk's own lambda_N first)
    m = PGCL(optimizer=opt, comm=P, coarse=coarse)
    state = m.init(net, params)
    for k in range(2 * P - 1):
        pred, state = m.predict(net, params, state, X, y)
        assert pred.cold == (k == 0)
        for j in range(P):
            exact_state = np.array_equal(pred.states[j], states[bounds[j]])
            assert exact_state or j > k, (k, j)
            exact_costate = np.array_equal(pred.costates[j], lams[bounds[j + 1]])
            assert exact_costate or k < 2 * P - 2 - j, (k, j)
    assert pred.state_defect == pred.costate_defect == 0.0
    assert state.step == 0  # predict never updates


def test_layer_steps_on_the_critical_path():
    net, params, X, y = problem(depth=8)
    P, L = 4, 2
    _, _, outs = run(PGCL(comm=P), net, params, X, y, 2)
    for o in outs:  # forward coarse pipeline, last chunk, backward coarse pipeline, chunk 0
        assert o.info["steps_critical_path"] == 2 * (P - 1) + L + L
        assert o.info["steps_total"] == 2 * net.depth + 2 * (P - 1)
    _, _, outs = run(PGCL(comm=P, local_steps=3), net, params, X, y, 1)
    assert outs[0].info["steps_total"] == 3 * 2 * net.depth + 2 * (P - 1)
    serial = PGCL(comm=P, cold_start="serial").step(net, params,
                                                    PGCL(comm=P).init(net, params), X, y)
    assert serial.info["steps_critical_path"] == 2 * net.depth


# --- convergence -------------------------------------------------------------------------------

def descend(method, net, params, X, y, max_steps=1000, tol=1e-11):
    """Steps until the exact gradient norm is at most ``tol``; (params, first step's params,
    last outcome)."""
    p, s = params, method.init(net, params)
    for k in range(max_steps):
        out = method.step(net, p, s, X, y)
        p, s = out.params, out.state
        if k == 0:
            first = p
        if k % 10 == 9 and grad_norm(net, p, X, y) <= tol:
            break
    return p, first, out


def stationary_problem():
    """A tiny, strongly regularised network with a stationary point that is not trivial
    (K, W != 0, so that a coarse step is not exact there) and that gradient descent with
    lr = 1 reaches to round-off in a few hundred steps."""
    net, params, X, y = problem(width=3, depth=6, S=8, seed=1, n_in=2, T=3.0,
                                gammas=(1.0, 0.02, 0.3))
    return net, params, 3.0 * X, y


@pytest.fixture(scope="module")
def serial_stationary_point():
    net, params, X, y = stationary_problem()
    return descend(GradientMethod(optimizer=SGD(lr=1.0)), net, params, X, y)


@pytest.mark.parametrize("options", [
    {"comm": 3},
    {"comm": 4, "coarse": "average", "local_steps": 2},
], ids=["P3", "P4-average-local2"])
def test_pgcl_reaches_the_stationary_point_of_serial_gradient_descent(
        options, serial_stationary_point):
    # serial gradient descent converges to a stationary point theta*; PGCL from the same
    # start, with its inexact steps, must converge to the same theta*: its fixed points
    # are the zeros of the exact gradient
    net, params, X, y = stationary_problem()
    theta, serial_first, _ = serial_stationary_point
    got, pgcl_first, out = descend(PGCL(optimizer=SGD(lr=1.0), **options), net, params, X, y)
    assert grad_norm(net, theta, X, y) <= 1e-11
    assert grad_norm(net, got, X, y) <= 1e-11
    # the coarse prediction alone is not exact at theta* ...
    m = PGCL(comm=options["comm"])
    cold, _ = m.predict(net, theta, m.init(net, theta), X, y)
    assert cold.state_defect > 1e-4 and cold.costate_defect > 1e-6
    # ... the trajectories differ (PGCL's first step is coarse-predicted) ...
    assert max(float(np.max(np.abs(pgcl_first[k] - serial_first[k]))) for k in params) > 1e-6
    # ... and yet the limits agree to round-off
    assert max(float(np.max(np.abs(got[k] - theta[k]))) for k in params) <= 1e-10
    assert out.info["state_defect"] <= 1e-12 and out.info["costate_defect"] <= 1e-12


def test_pgcl_decreases_the_loss_on_peaks():
    ds = ptoc.data.peaks(n_per_class=20, n_val_per_class=2, grid=64)
    net = ptoc.ResNet(width=4, depth=8, n_in=2, n_classes=5)
    params = net.init_params(0)
    before = ptoc.sweeps.loss(net, params, ds.X_train, ds.y_train)
    m = PGCL(optimizer=Adam(lr=0.03), comm=4)
    p, state, outs = run(m, net, params, ds.X_train, ds.y_train, 40)
    after = ptoc.sweeps.loss(net, p, ds.X_train, ds.y_train)
    assert after < 0.6 * before
    assert outs[-1].loss < 0.6 * outs[0].loss
    # the prediction keeps up with the changing weights, at a shorter critical path
    assert outs[-1].info["state_defect_rel"] < 0.02
    assert outs[-1].info["costate_defect_rel"] < 0.02
    assert outs[-1].info["steps_critical_path"] < 2 * net.depth
    assert m.metrics(net, p, state) == {"state_defect": outs[-1].info["state_defect"],
                                        "costate_defect": outs[-1].info["costate_defect"]}


def test_hamiltonian_local_update_is_the_gradient_update():
    net, params, X, y = problem(depth=7)
    a, _, oa = run(PGCL(optimizer=Adam(lr=0.02), comm=3, local_steps=2), net, params, X, y, 3)
    b, _, ob = run(PGCL(optimizer=Adam(lr=0.02), comm=3, local_steps=2,
                        local_update=LocalUpdate.HAMILTONIAN), net, params, X, y, 3)
    for k in params:  # same direction, summed differently
        assert np.allclose(a[k], b[k], rtol=0, atol=1e-13), k
    assert abs(oa[-1].loss - ob[-1].loss) < 1e-13
    assert not same(a, params)


# --- ranks -------------------------------------------------------------------------------------

def test_every_way_to_ask_for_ranks_gives_the_same_bits():
    net, params, X, y = problem(depth=7)
    opts = {"optimizer": SGD(lr=0.2, momentum=0.5), "local_steps": 2}
    one = [run(PGCL(comm=c, **opts), net, params, X, y, 3)[0]
           for c in (None, 1, SingleRank(), SimulatedRanks(1))]
    assert all(same(one[0], p) for p in one[1:])
    three = [run(PGCL(comm=c, **opts), net, params, X, y, 3)[0]
             for c in (3, SimulatedRanks(3))]
    assert same(three[0], three[1])
    assert not same(one[0], three[0])  # three chunks is another algorithm ...
    # ... but every simulated rank returns the same full parameters
    m = PGCL(comm=3, **opts)
    job_state = m.init(net, params)
    results = SimulatedRanks(3).run(
        lambda c: PGCL(comm=c, **opts).step(net, params, job_state, X, y).params)
    assert all(same(results[0], r) for r in results[1:])
    assert same(results[0], m.step(net, params, job_state, X, y).params)


def load_script():
    spec = importlib.util.spec_from_file_location("mpi_pgcl_script", HERE / "mpi_pgcl_script.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.mpi
@pytest.mark.parametrize("P, config", [(2, "momentum"), (3, "adam-average-local2")])
def test_mpi_ranks_equal_the_simulated_ranks(P, config, tmp_path):
    assert MPIEXEC is not None, "mpiexec not found: pip install 'ptoc[test]' provides it"
    script = load_script()
    net, *_ = script.problem()
    assert net.depth % P != 0  # uneven chunks
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", NUMBA_NUM_THREADS="1",
               OMP_NUM_THREADS="1")
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    cmd = [MPIEXEC, "-n", str(P), sys.executable, str(HERE / "mpi_pgcl_script.py"),
           str(tmp_path), config]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    simulated = script.run(SimulatedRanks(P), config)
    for r in range(P):
        got = np.load(tmp_path / f"rank{r}.npz")
        assert int(got["size"]) == P
        assert set(got.files) - {"size"} == set(simulated)
        for k, v in simulated.items():  # same arithmetic in the same order: same bits
            assert np.array_equal(got[k], v), (r, k)
    assert simulated["infos"][-1][0] > 0  # a real (inexact) prediction was compared


# --- state, checkpoints, training ----------------------------------------------------------------

@pytest.mark.parametrize("options", [
    {"optimizer": Adam(lr=0.02), "local_steps": 2, "coarse": "average"},
    {"optimizer": SGD(lr=0.2, momentum=0.9), "cold_start": "serial"},
], ids=["adam", "momentum"])
def test_state_dict_round_trip_continues_bit_for_bit(options, tmp_path):
    net, params, X, y = problem(depth=7)
    straight, _, outs = run(PGCL(comm=3, **options), net, params, X, y, 10)
    m = PGCL(comm=3, **options)
    half, state, first = run(m, net, params, X, y, 5)
    np.savez(tmp_path / "state.npz", **m.state_dict(state))
    with np.load(tmp_path / "state.npz") as f:
        saved = dict(f)
    m2 = PGCL(comm=3, **options)
    restored = m2.load_state(saved, net, half)
    assert isinstance(restored, PGCLState) and restored.step == 5
    resumed, _, second = run(m2, net, half, X, y, 5, state=restored)
    assert same(resumed, straight)
    assert [o.loss for o in first + second] == [o.loss for o in outs]
    assert [o.info for o in first + second] == [o.info for o in outs]
    assert not second[0].info["cold"]  # the corrections came back too
    with pytest.raises(ValueError, match="for 3 ranks"):
        PGCL(comm=2, **options).load_state(saved, net, half)


def test_config_is_json():
    m = PGCL(optimizer=Adam(lr=0.01), comm=2, local_steps=3, coarse="average",
             cold_start=ColdStart.SERIAL)
    cfg = json.loads(json.dumps(m.config()))
    assert cfg["name"] == "pgcl" == PGCL.name
    assert cfg["ranks"] == 2 and cfg["local_steps"] == 3 and cfg["coarse"] == "average"
    assert cfg["cold_start"] == "serial" and cfg["optimizer"]["name"] == "adam"


def test_train_with_pgcl_equals_the_step_loop_and_resumes_bit_for_bit(tmp_path):
    from ptoc.training import train

    ds = ptoc.data.peaks(n_per_class=10, n_val_per_class=2, grid=64)
    net = ptoc.ResNet(width=4, depth=6, n_in=2, n_classes=5)
    params = net.init_params(1)

    def method():
        return PGCL(optimizer=Adam(lr=0.03), comm=3)

    result = train(net, params, ds, method=method(), epochs=8, batch_size=None,
                   progress=False)
    assert not result.stopped_early and result.steps == 8
    by_hand, _, outs = run(method(), net, params, ds.X_train, ds.y_train, 8)
    assert same(result.params, by_hand)
    assert list(result.history.column("train_loss")) == [o.loss for o in outs]
    assert result.history[-1]["state_defect"] == outs[-1].info["state_defect"]
    assert result.train_loss < ptoc.sweeps.loss(net, params, ds.X_train, ds.y_train)
    # a checkpoint holds the state dict (corrections and optimiser states of every chunk)
    train(net, params, ds, method=method(), epochs=4, batch_size=None, progress=False,
          output_dir=tmp_path, checkpoint_every=1)
    resumed = train(net, params, ds, method=method(), epochs=8, batch_size=None,
                    progress=False, output_dir=tmp_path, checkpoint_every=1, resume=True)
    assert resumed.steps == 8 and same(resumed.params, result.params)


# --- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("options, name", [
    ({"optimizer": LBFGS()}, "optimizer"),
    ({"optimizer": "adam"}, "optimizer"),
    ({"local_steps": 0}, "local_steps"),
    ({"local_steps": 1.5}, "local_steps"),
    ({"local_steps": True}, "local_steps"),
    ({"coarse": "middle"}, "coarse"),
    ({"local_update": "newton"}, "local_update"),
    ({"cold_start": "warm"}, "cold_start"),
    ({"comm": 0}, "comm"),
    ({"comm": True}, "comm"),
    ({"comm": "mpi"}, "comm"),
    ({"target": "gpu"}, "target"),
])
def test_bad_options_raise_a_value_error_naming_them(options, name):
    with pytest.raises(ValueError, match=rf"PGCL {name}\b"):
        PGCL(**options)


def test_more_ranks_than_layers_fail_before_any_sweep(monkeypatch):
    net, params, X, y = problem(depth=3)
    m = PGCL(comm=4)
    with pytest.raises(ValueError, match="PGCL comm: 4 ranks"):
        m.init(net, params)
    state = PGCL(comm=3).init(net, params)

    def no_sweeps(*args, **kwargs):
        raise AssertionError("a sweep ran")

    monkeypatch.setattr("ptoc.pgcl._program", no_sweeps)
    with pytest.raises(ValueError, match="PGCL comm: 4 ranks"):
        m.step(net, params, state, X, y)
    with pytest.raises(ValueError, match="for 3 ranks"):
        PGCL(comm=2).step(net, params, state, X, y)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_divergence_raises_training_diverged_on_every_rank():
    net, params, X, y = problem(depth=7)
    m = PGCL(optimizer=SGD(lr=1e200), comm=3)
    with pytest.raises(TrainingDivergedError, match="PGCL: non-finite"):
        run(m, net, params, X, y, 5)


@pytest.mark.mpi
def test_train_on_mpi_ranks_writes_once_and_equals_the_simulated_run(tmp_path):
    """``ptoc.train`` with PGCL on 2 MPI ranks: rank 0 writes the run's files, rank 1
    writes none and reports none, and both end with the parameters of the same run
    on simulated ranks, bit for bit."""
    assert MPIEXEC is not None, "mpiexec not found: pip install 'ptoc[test]' provides it"
    script = load_script()
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", NUMBA_NUM_THREADS="1",
               OMP_NUM_THREADS="1")
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    cmd = [MPIEXEC, "-n", "2", sys.executable, str(HERE / "mpi_pgcl_script.py"),
           str(tmp_path), "train"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    simulated = script.train(2, tmp_path / "simulated")
    ranks = [np.load(tmp_path / f"rank{r}.npz") for r in range(2)]
    assert sorted(ranks[0]["outputs"]) == sorted(simulated.outputs)
    assert len(ranks[1]["outputs"]) == 0
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == \
        sorted(p.name for p in (tmp_path / "simulated").iterdir())
    for got in ranks:
        for k, v in simulated.params.items():
            assert np.array_equal(got[f"param.{k}"], v), k
