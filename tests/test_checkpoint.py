"""Checkpoints and resuming: a run killed at any moment and resumed ends with exactly the
parameters of a run never interrupted (docs/running.md, "Checkpoints and resuming")."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ptoc
from ptoc.methods import GradientMethod, StepOutcome, TrainingMethod
from ptoc.optim import LBFGS, SGD, Adam
from ptoc.parallel import MGRIT
from ptoc.simultaneous import SimultaneousGradient
from ptoc.training import CHECKPOINT_NAME, load_checkpoint, train


@pytest.fixture(scope="module")
def net():
    return ptoc.ResNet(width=3, depth=4, T=1.0, n_in=2, n_classes=5, gamma=1e-3,
                       gamma_t=1e-3, gamma_c=1e-3)


@pytest.fixture(scope="module")
def data():
    return ptoc.data.peaks(n_per_class=14, n_val_per_class=4, grid=64, seed=2)


def _bitwise(a, b):
    assert set(a) == set(b)
    for k in a:
        assert np.array_equal(a[k], b[k]), k


class Snapshot:
    """A ``grad_fn`` that, before its ``at``-th call (or the first later one when no
    checkpoint exists yet), copies the run's checkpoint aside: what a kill at that moment
    would leave behind."""

    def __init__(self, inner, out_dir, at, keep_to):
        self.inner, self.out_dir, self.at, self.keep_to = inner, out_dir, at, keep_to
        self.calls = 0

    def __call__(self, params, X, y):
        self.calls += 1
        src = self.out_dir / CHECKPOINT_NAME
        if self.calls >= self.at and not self.keep_to.exists() and src.exists():
            self.keep_to.mkdir()
            shutil.copy(src, self.keep_to / CHECKPOINT_NAME)
        return self.inner(params, X, y)

    # the wrapped gradient's memory, identity and purity are the checkpoint's, not the
    # wrapper's
    @property
    def deterministic(self):
        return getattr(self.inner, "deterministic", False)

    def state_dict(self):
        return getattr(self.inner, "state_dict", dict)()

    def config(self):
        return getattr(self.inner, "config", lambda: "custom")()


def _killed_and_resumed(tmp_path, net, data, make_grad, optimizer, *, at, epochs, batch_size,
                        every, seed=4):
    """(uninterrupted result, result resumed from the checkpoint present at call ``at``)."""
    full, killed = tmp_path / "full", tmp_path / "killed"
    grad = Snapshot(make_grad(), full, at, killed)
    p0 = net.init_params(1)
    whole = train(net, p0, data, optimizer=optimizer, grad_fn=grad, epochs=epochs,
                  batch_size=batch_size, seed=seed, output_dir=full, checkpoint_every=every,
                  progress=False)
    assert grad.calls >= at and (killed / CHECKPOINT_NAME).exists()
    resumed = train(net, net.init_params(99), data, optimizer=optimizer, grad_fn=make_grad(),
                    epochs=epochs, batch_size=batch_size, seed=seed, output_dir=killed,
                    checkpoint_every=every, resume=True, progress=False)
    return whole, resumed


@pytest.mark.slow
@settings(max_examples=10)
@given(every=st.integers(1, 7), batch=st.sampled_from([9, 16, 30]), where=st.data())
def test_resume_equals_the_uninterrupted_run_adam(tmp_path_factory, net, data, every, batch,
                                                  where):
    tmp = tmp_path_factory.mktemp("adam")
    total = 6 * -(-data.X_train.shape[0] // batch)  # 6 epochs of ceil(n / batch) steps
    at = where.draw(st.integers(every + 1, total), label="killed before gradient call")

    def exact():
        return lambda p, X, y: ptoc.loss_and_grad(net, p, X, y)

    whole, resumed = _killed_and_resumed(tmp, net, data, exact, Adam(lr=0.02), at=at, epochs=6,
                                         batch_size=batch, every=every)
    _bitwise(resumed.params, whole.params)
    assert resumed.steps == whole.steps and resumed.epochs == whole.epochs == 6
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in whole.history]
    assert resumed.best_epoch == whole.best_epoch
    _bitwise(resumed.best_params, whole.best_params)


def _exact_deterministic(net):
    def grad(p, X, y):
        return ptoc.loss_and_grad(net, p, X, y)
    grad.deterministic = True  # GradientMethod reuses the line search's accepted evaluation
    return grad


@pytest.mark.parametrize("case", ["sgd-momentum", "lbfgs-full-batch", "lbfgs-full-batch-reused",
                                  "simultaneous"])
def test_resume_equals_the_uninterrupted_run(tmp_path, net, data, case):
    if case == "lbfgs-full-batch-reused":
        # the reused evaluation is a cache outside the checkpoint: the resumed run
        # evaluates its first start afresh, which gives the same bits
        def make():
            return _exact_deterministic(net)
        opt, batch, at = LBFGS(), None, 6
    elif case == "sgd-momentum":
        def make():
            return lambda p, X, y: ptoc.loss_and_grad(net, p, X, y)
        opt, batch, at = SGD(lr=0.05, momentum=0.9, nesterov=True), 11, 17
    elif case == "lbfgs-full-batch":
        def make():
            return lambda p, X, y: ptoc.loss_and_grad(net, p, X, y)
        opt, batch, at = LBFGS(), None, 9
    else:
        # the MGRIT warm start is part of the checkpoint: without it the resumed run's
        # inexact gradients would differ (a deeper network, on which one iteration is
        # far from exact: the control test below)
        net = _deep(net)

        def make():
            return SimultaneousGradient(net, MGRIT(coarsening=2, max_iterations=1, tol=1e-13),
                                        comm=2)
        opt, batch, at = Adam(lr=0.02), None, 6
    whole, resumed = _killed_and_resumed(tmp_path, net, data, make, opt, at=at, epochs=10,
                                         batch_size=batch, every=4)
    _bitwise(resumed.params, whole.params)
    assert resumed.steps == whole.steps


def _deep(net):
    """``net`` with 16 layers: one MGRIT iteration (coarsening 2) is then far from the
    exact sweep, and its warm start matters. On the 4 layers of ``net`` it was exact, and
    a run without the warm start differed from one with it by round-off only (5.6e-17 in
    the weights), or not at all."""
    return ptoc.ResNet(width=net.width, depth=16, T=net.T, n_in=2, n_classes=5, gamma=1e-3,
                       gamma_t=1e-3, gamma_c=1e-3)


def test_simultaneous_resume_needs_the_warm_start(tmp_path, net, data):
    """Control for the test above: dropping the warm start from the checkpoint changes the
    resumed run by far more than round-off, so the equality there is not an accident."""
    net = _deep(net)

    def make():
        return SimultaneousGradient(net, MGRIT(coarsening=2, max_iterations=1, tol=1e-13),
                                    comm=2)

    class Forgetful(SimultaneousGradient):
        def load_state(self, d):
            super().load_state({})

    full, killed = tmp_path / "full", tmp_path / "killed"
    grad = Snapshot(make(), full, 6, killed)
    whole = train(net, net.init_params(1), data, optimizer=Adam(lr=0.02), grad_fn=grad,
                  epochs=10, batch_size=None, output_dir=full, checkpoint_every=4,
                  progress=False)
    forgetful = Forgetful(net, MGRIT(coarsening=2, max_iterations=1, tol=1e-13), comm=2)
    resumed = train(net, net.init_params(1), data, optimizer=Adam(lr=0.02), grad_fn=forgetful,
                    epochs=10, batch_size=None, output_dir=killed, checkpoint_every=4,
                    resume=True, progress=False)
    assert np.max(np.abs(resumed.params.K - whole.params.K)) > 1e-6  # 1.4e-2 measured


def test_checkpoint_contents_and_atomic_write(tmp_path, net, data):
    res = train(net, net.init_params(0), data, optimizer=Adam(lr=0.01), epochs=3, batch_size=20,
                output_dir=tmp_path, checkpoint_every=5, progress=False)
    assert res.outputs["checkpoint"] == tmp_path / CHECKPOINT_NAME
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files
    ck = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    meta = ck["meta"]
    assert meta["epochs_done"] == 3 and meta["steps"] == res.steps == 3 * 4
    assert meta["next_batch"] == 0 and meta["seed"] == 0 and meta["batch_size"] == 20
    _bitwise(ptoc.Params.from_dict(ck["params"]), res.params)
    assert len(meta["history"]) == 3
    assert int(ck["state"]["optimizer.step"]) == res.steps


def test_a_finished_run_can_be_extended(tmp_path, net, data):
    kw = dict(optimizer=Adam(lr=0.01), batch_size=20, checkpoint_every=3, progress=False)
    longer = train(net, net.init_params(0), data, epochs=5, output_dir=tmp_path / "a", **kw)
    train(net, net.init_params(0), data, epochs=2, output_dir=tmp_path / "b", **kw)
    extended = train(net, net.init_params(0), data, epochs=5, output_dir=tmp_path / "b",
                     resume=True, **kw)
    _bitwise(extended.params, longer.params)
    assert extended.history.column("train_loss").tolist() == \
        longer.history.column("train_loss").tolist()


def test_divergence_leaves_the_last_good_checkpoint(tmp_path, net, data):
    calls = []

    def grad_fn(p, X, y):
        calls.append(1)
        loss, g = ptoc.loss_and_grad(net, p, X, y)
        return (float("nan") if len(calls) == 8 else loss), g

    res = train(net, net.init_params(0), data, optimizer=Adam(lr=0.01), grad_fn=grad_fn,
                epochs=4, batch_size=20, output_dir=tmp_path, checkpoint_every=5,
                progress=False)
    assert res.diverged and res.steps == 7
    ck = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert ck["meta"]["steps"] == 7 and ck["meta"]["next_batch"] == 3  # epoch 2, batch 3 next
    _bitwise(ptoc.Params.from_dict(ck["params"]), res.params)


def test_resume_refuses_another_run(tmp_path, net, data):
    kw = dict(optimizer=Adam(lr=0.01), epochs=2, batch_size=20, checkpoint_every=3,
              progress=False)
    train(net, net.init_params(0), data, output_dir=tmp_path, seed=1, **kw)
    p = net.init_params(0)
    with pytest.raises(ValueError, match="seed"):
        train(net, p, data, output_dir=tmp_path, seed=2, resume=True, **kw)
    with pytest.raises(ValueError, match="batch size"):
        train(net, p, data, output_dir=tmp_path, seed=1, resume=True,
              **{**kw, "batch_size": 21})
    with pytest.raises(ValueError, match="training method"):
        train(net, p, data, output_dir=tmp_path, seed=1, resume=True,
              **{**kw, "optimizer": Adam(lr=0.02)})
    other = ptoc.ResNet(width=3, depth=5, T=1.0, n_in=2, n_classes=5)
    with pytest.raises(ValueError, match="network"):
        train(other, other.init_params(0), data, output_dir=tmp_path, seed=1, resume=True,
              **kw)
    moved = ptoc.data.peaks(n_per_class=14, n_val_per_class=4, grid=64, seed=3)
    with pytest.raises(ValueError, match="data set"):
        train(net, p, moved, output_dir=tmp_path, seed=1, resume=True, **kw)
    with pytest.raises(ValueError, match="more than epochs=1"):
        train(net, p, data, output_dir=tmp_path, seed=1, resume=True, **{**kw, "epochs": 1})
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(net, p, data, output_dir=tmp_path / "empty", seed=1, resume=True, **kw)
    with pytest.raises(ValueError, match="output_dir"):
        train(net, p, data, checkpoint_every=3, progress=False)
    with pytest.raises(ValueError, match="checkpoint_every"):
        train(net, p, data, output_dir=tmp_path, checkpoint_every=0, progress=False)
    with pytest.raises(ValueError, match="not both"):
        train(net, p, data, method=GradientMethod(), optimizer=Adam(), progress=False)


class HalfStep(TrainingMethod):
    """A toy method: a gradient step whose state is a counter, with one metric."""

    name = "halfstep"

    def init(self, network, params):
        return 0

    def step(self, network, params, state, X, y):
        loss, g = ptoc.loss_and_grad(network, params, X, y)
        new = ptoc.Params.from_dict({k: params[k] - 0.1 * g[k] for k in params})
        return StepOutcome(loss, new, state + 1)

    def state_dict(self, state):
        return {"count": np.int64(state)}

    def load_state(self, d, network, params):
        return int(d["count"])

    def config(self):
        return {"name": self.name}

    def metrics(self, network, params, state):
        return {"count": float(state)}


def test_custom_method_metrics_reach_the_history_files(tmp_path, net, data):
    res = train(net, net.init_params(0), data, method=HalfStep(), epochs=3, batch_size=30,
                output_dir=tmp_path, checkpoint_every=2, progress=False)
    assert res.history.column("count").tolist() == [3.0, 6.0, 9.0]
    rows = json.loads((tmp_path / "history.json").read_text())
    assert [r["count"] for r in rows] == [3.0, 6.0, 9.0]
    assert (tmp_path / "history.csv").read_text().splitlines()[0].endswith(",count")
    assert ptoc.io.load_model(tmp_path / "model.npz")[2]["method"] == {"name": "halfstep"}


def _cli(*args):
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    return [sys.executable, "-m", "ptoc", "train", *args], env


@pytest.mark.slow
def test_cli_killed_with_sigkill_then_resumed_gives_identical_parameters(tmp_path):
    opts = ["--depth", "6", "--width", "4", "--epochs", "40", "--batch-size", "250",
            "--checkpoint-every", "3", "--quiet", "--seed", "2"]
    cmd, env = _cli(*opts, "-o", str(tmp_path / "killed"))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    ckpt = tmp_path / "killed" / CHECKPOINT_NAME
    deadline = time.monotonic() + 120
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(0.2)  # kill somewhere in the middle, not right at a checkpoint
    proc.send_signal(signal.SIGKILL)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, (out, err)  # it was killed, not finished
    assert not (tmp_path / "killed" / "model.npz").exists()
    steps_at_kill = load_checkpoint(ckpt)["meta"]["steps"]
    assert 0 < steps_at_kill < 40 * 20

    cmd, env = _cli("--resume", str(tmp_path / "killed"), "--quiet")
    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    cmd, env = _cli(*opts, "-o", str(tmp_path / "whole"))
    whole = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr
    _, a, _ = ptoc.io.load_model(tmp_path / "killed" / "model.npz")
    _, b, _ = ptoc.io.load_model(tmp_path / "whole" / "model.npz")
    _bitwise(a, b)
    ha = json.loads((tmp_path / "killed" / "history.json").read_text())
    hb = json.loads((tmp_path / "whole" / "history.json").read_text())
    assert [r["train_loss"] for r in ha] == [r["train_loss"] for r in hb]


def test_a_new_run_refuses_a_folder_that_holds_an_earlier_run(tmp_path, net, data):
    kw = dict(optimizer=Adam(lr=0.01), epochs=1, batch_size=20, progress=False)
    first = train(net, net.init_params(0), data, output_dir=tmp_path, **kw)
    model = (tmp_path / "model.npz").read_bytes()
    with pytest.raises(FileExistsError, match=r"earlier run \(.*model\.npz.*overwrite=True"):
        train(net, net.init_params(1), data, output_dir=tmp_path, **kw)
    assert (tmp_path / "model.npz").read_bytes() == model  # refused before any work
    with pytest.raises(ValueError, match="give one of them"):
        train(net, net.init_params(1), data, output_dir=tmp_path, resume=True,
              overwrite=True, **kw)
    second = train(net, net.init_params(1), data, output_dir=tmp_path, overwrite=True, **kw)
    assert (tmp_path / "model.npz").read_bytes() != model
    assert not all(np.array_equal(first.params[k], second.params[k]) for k in first.params)
    # any one file of a run is enough to refuse
    for name in ptoc.training.RUN_OUTPUTS:
        folder = tmp_path / f"only-{name}"
        folder.mkdir()
        (folder / name).write_bytes(b"")
        with pytest.raises(FileExistsError, match=name.replace(".", r"\.")):
            train(net, net.init_params(0), data, output_dir=folder, **kw)
