"""Optimisers, model files and the training loop."""

import io
import json
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import ptoc
from ptoc.io import load_model, save_model
from ptoc.optim import OPTIMISERS, SGD, Adam, make_optimizer
from ptoc.plotting import plot_history
from ptoc.training import HISTORY_COLUMNS, History, train

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def small_data():
    return ptoc.data.peaks(n_per_class=40, n_val_per_class=10, grid=64)


@pytest.fixture(scope="module")
def small_net():
    return ptoc.ResNet(width=4, depth=4, T=2.0, activation="tanh", n_in=2, n_classes=5)


def _tree(**arrays):
    return {k: np.asarray(v, dtype=np.float64) for k, v in arrays.items()}


# --- optimisers: the equations on hand-computed examples -------------------------------------

def test_sgd_plain_step_is_theta_minus_lr_g():
    p = _tree(a=[1.0, 2.0], b=[[3.0]])
    g = _tree(a=[0.5, -1.0], b=[[2.0]])
    opt = SGD(lr=0.1)
    state = opt.init(p)
    assert state.velocity is None
    new, state = opt.update(p, g, state)
    np.testing.assert_array_equal(new["a"], [1.0 - 0.05, 2.0 + 0.1])
    np.testing.assert_array_equal(new["b"], [[3.0 - 0.2]])
    assert state.step == 1


def test_sgd_momentum_two_steps():
    p0 = _tree(a=[1.0, 2.0])
    g1, g2 = _tree(a=[1.0, -2.0]), _tree(a=[0.5, 0.5])
    opt = SGD(lr=0.1, momentum=0.9)
    p1, s = opt.update(p0, g1, opt.init(p0))
    # v1 = g1, p1 = p0 - lr v1
    np.testing.assert_allclose(p1["a"], [1.0 - 0.1, 2.0 + 0.2], rtol=0, atol=1e-15)
    p2, s = opt.update(p1, g2, s)
    # v2 = 0.9 v1 + g2 = [1.4, -1.3]; p2 = p1 - 0.1 v2
    np.testing.assert_allclose(s.velocity["a"], [1.4, -1.3], rtol=0, atol=1e-15)
    np.testing.assert_allclose(p2["a"], [0.9 - 0.14, 2.2 + 0.13], rtol=0, atol=1e-15)


def test_sgd_nesterov_first_step():
    p0 = _tree(a=[1.0])
    opt = SGD(lr=0.1, momentum=0.5, nesterov=True)
    p1, _ = opt.update(p0, _tree(a=[2.0]), opt.init(p0))
    # v1 = g = 2; p1 = p0 - lr (g + mu v1) = 1 - 0.1 * 3
    np.testing.assert_allclose(p1["a"], [0.7], rtol=0, atol=1e-15)


def test_adam_first_two_steps():
    lr, b1, b2, eps = 0.01, 0.9, 0.999, 1e-8
    p0 = _tree(a=[1.0, -1.0, 0.5])
    g1 = _tree(a=[0.3, -2.0, 0.0])
    g2 = _tree(a=[-0.1, 1.0, 4.0])
    opt = Adam(lr=lr, beta1=b1, beta2=b2, eps=eps)
    p1, s1 = opt.update(p0, g1, opt.init(p0))
    # step 1: m_hat = g, v_hat = g^2, so theta moves by lr g / (|g| + eps)
    for i in range(3):
        g = g1["a"][i]
        expected = p0["a"][i] - lr * g / (abs(g) + eps)
        assert p1["a"][i] == pytest.approx(expected, rel=1e-14, abs=1e-16)
    p2, s2 = opt.update(p1, g2, s1)
    assert s2.step == 2
    for i in range(3):
        ga, gb = g1["a"][i], g2["a"][i]
        m = b1 * (1 - b1) * ga + (1 - b1) * gb
        v = b2 * (1 - b2) * ga**2 + (1 - b2) * gb**2
        m_hat, v_hat = m / (1 - b1**2), v / (1 - b2**2)
        expected = p1["a"][i] - lr * m_hat / (math.sqrt(v_hat) + eps)
        assert s2.m["a"][i] == pytest.approx(m, rel=1e-14, abs=1e-300)
        assert s2.v["a"][i] == pytest.approx(v, rel=1e-14, abs=1e-300)
        assert p2["a"][i] == pytest.approx(expected, rel=1e-14, abs=1e-16)


@pytest.mark.parametrize("opt", [SGD(lr=0.1), SGD(lr=0.1, momentum=0.9), Adam()])
def test_update_is_pure_and_keeps_container_and_dtype(opt, small_net):
    params = small_net.init_params(0)
    net32 = ptoc.ResNet(width=4, depth=4, n_in=2, n_classes=5, dtype="float32")
    for p in (params, net32.init_params(0)):
        grads = p.copy()
        before_p, before_g = p.copy(), grads.copy()
        state = opt.init(p)
        before_s = {k: np.copy(v) for k, v in opt.state_dict(state).items()}
        new, new_state = opt.update(p, grads, state)
        assert isinstance(new, ptoc.Params)
        assert p == before_p and grads == before_g
        after_s = opt.state_dict(state)
        assert all(np.array_equal(before_s[k], after_s[k]) for k in before_s)
        assert all(new[k].dtype == p[k].dtype for k in p)
        assert all(new_state_arr.dtype == p.K.dtype for new_state_arr in
                   [v for k, v in opt.state_dict(new_state).items() if k.endswith(".K")])
        assert new != p


@pytest.mark.parametrize(
    ("cls", "kwargs", "name"),
    [
        (SGD, {"lr": 0.0}, "lr"),
        (SGD, {"lr": -1.0}, "lr"),
        (SGD, {"lr": float("inf")}, "lr"),
        (SGD, {"lr": float("nan")}, "lr"),
        (SGD, {"momentum": 1.0}, "momentum"),
        (SGD, {"momentum": -0.1}, "momentum"),
        (SGD, {"nesterov": True}, "nesterov"),
        (Adam, {"lr": 0}, "lr"),
        (Adam, {"beta1": 1.0}, "beta1"),
        (Adam, {"beta2": -0.5}, "beta2"),
        (Adam, {"eps": 0.0}, "eps"),
        (Adam, {"eps": "x"}, "eps"),
    ],
)
def test_bad_hyperparameters_name_the_option(cls, kwargs, name):
    with pytest.raises(ValueError, match=name):
        cls(**kwargs)


def test_registry_and_make_optimizer():
    from ptoc.optim import LBFGS

    assert OPTIMISERS == {"sgd": SGD, "adam": Adam, "lbfgs": LBFGS}
    opt = make_optimizer("adam", lr=1e-3)
    assert opt == Adam(lr=1e-3)
    assert make_optimizer(**opt.config()) == opt
    assert make_optimizer(**SGD(0.5, 0.9, True).config()) == SGD(0.5, 0.9, True)
    with pytest.raises(ValueError, match="unknown optimizer 'bfgs'"):
        make_optimizer("bfgs")
    with pytest.raises(ValueError, match="momentum"):
        make_optimizer("adam", momentum=0.9)


def test_grads_must_match_params():
    opt = Adam()
    p = _tree(a=[1.0, 2.0])
    with pytest.raises(ValueError, match="keys"):
        opt.update(p, _tree(b=[1.0, 2.0]), opt.init(p))
    with pytest.raises(ValueError, match="shape"):
        opt.update(p, _tree(a=[1.0]), opt.init(p))


def test_closure_is_accepted_and_ignored():
    opt = SGD(lr=0.1)
    p, g = _tree(a=[1.0]), _tree(a=[1.0])

    def closure(q):
        raise AssertionError("SGD must not evaluate the closure")

    a, _ = opt.update(p, g, opt.init(p), closure=closure)
    b, _ = opt.update(p, g, opt.init(p))
    assert np.array_equal(a["a"], b["a"])


def _npz_roundtrip(d):
    buf = io.BytesIO()
    np.savez(buf, **d)
    buf.seek(0)
    with np.load(buf, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


_shapes = st.lists(hnp.array_shapes(min_dims=0, max_dims=3, min_side=1, max_side=4),
                   min_size=1, max_size=4)


@given(shapes=_shapes, seed=st.integers(0, 2**32 - 1), n_steps=st.integers(0, 3),
       which=st.sampled_from(["adam", "sgd", "sgd-nesterov", "sgd-plain"]),
       dtype=st.sampled_from([np.float64, np.float32]))
def test_optimiser_state_roundtrips_exactly_through_npz(shapes, seed, n_steps, which, dtype):
    opt = {"adam": Adam(lr=0.01), "sgd": SGD(lr=0.1, momentum=0.9),
           "sgd-nesterov": SGD(lr=0.1, momentum=0.5, nesterov=True),
           "sgd-plain": SGD(lr=0.1)}[which]
    rng = np.random.default_rng(seed)
    params = {f"p{i}": rng.standard_normal(s).astype(dtype) for i, s in enumerate(shapes)}
    state = opt.init(params)
    for _ in range(n_steps):
        grads = {k: rng.standard_normal(v.shape).astype(dtype) for k, v in params.items()}
        params, state = opt.update(params, grads, state)
    d = opt.state_dict(state)
    loaded = opt.load_state(_npz_roundtrip(d))
    d2 = opt.state_dict(loaded)
    assert set(d) == set(d2)
    for k in d:
        a, b = np.asarray(d[k]), np.asarray(d2[k])
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    # continuing from the restored state is bit for bit continuing from the original
    grads = {k: rng.standard_normal(v.shape).astype(dtype) for k, v in params.items()}
    p_a, _ = opt.update(params, grads, state)
    p_b, _ = opt.update(params, grads, loaded)
    assert all(p_a[k].tobytes() == p_b[k].tobytes() for k in params)


def test_load_state_checks_the_optimiser():
    p = _tree(a=[1.0])
    d = Adam().state_dict(Adam().init(p))
    with pytest.raises(ValueError, match="'adam'"):
        SGD(lr=0.1, momentum=0.9).load_state(d)
    with pytest.raises(ValueError, match="step"):
        Adam().load_state({"optimizer": "adam"})


# --- model files -------------------------------------------------------------------------------

def _assert_bitwise(p, q):
    assert list(p) == list(q)
    for k in p:
        assert p[k].dtype == q[k].dtype and p[k].shape == q[k].shape
        assert p[k].tobytes() == q[k].tobytes()


@pytest.mark.parametrize(
    "net",
    [
        ptoc.ResNet(width=3, depth=5, T=1.7, activation="smoothrelu", n_in=2, n_classes=4,
                    gamma=0.1, gamma_t=1e-3, gamma_c=0.0),
        ptoc.ResNet(width=2, depth=3, T=0.1, activation="relu", n_in=2, n_classes=3,
                    opening="identity", dtype="float32"),
    ],
    ids=["dense-float64", "identity-float32"],
)
def test_model_file_roundtrip_is_lossless(tmp_path, net):
    params = net.init_params(7, scale=1.3)
    extra = {"note": "hi", "acc": np.float64(0.25), "list": [1, 2], "nested": {"a": None}}
    path = save_model(tmp_path / "m.npz", net, params, extra)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.npz"]  # no temp file left
    net2, params2, extra2 = load_model(path)
    assert net2 == net
    _assert_bitwise(params, params2)
    assert extra2 == {"note": "hi", "acc": 0.25, "list": [1, 2], "nested": {"a": None}}
    with np.load(path, allow_pickle=False) as z:  # readable without ptoc
        assert json.loads(str(z["network"]))["dtype"] == net.dtype.name
        assert ("K_in" in z.files) == net.has_opening_weights
    # overwriting in place works and changes the content
    save_model(path, net, net.init_params(8))
    _, params3, extra3 = load_model(path)
    assert params3 != params and extra3 == {}


def test_load_model_errors(tmp_path, small_net):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "missing.npz")
    (tmp_path / "text.npz").write_text("not a model")
    with pytest.raises(ValueError, match="not a ptoc model file"):
        load_model(tmp_path / "text.npz")
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(ValueError, match="not a ptoc model file"):
        load_model(tmp_path / "other.npz")
    with pytest.raises(ValueError, match="not JSON-serialisable"):
        save_model(tmp_path / "m.npz", small_net, small_net.init_params(0), {"x": object()})
    with pytest.raises(ValueError, match="shape"):
        save_model(tmp_path / "m.npz", small_net, {**small_net.init_params(0), "W": np.zeros(2)})
    with pytest.raises(FileNotFoundError):
        save_model(tmp_path / "nodir" / "m.npz", small_net, small_net.init_params(0))
    assert not (tmp_path / "m.npz").exists()


# --- the training loop -------------------------------------------------------------------------

def test_train_decreases_the_loss(small_net, small_data):
    p0 = small_net.init_params(0)
    loss0 = ptoc.loss(small_net, p0, small_data.X_train, small_data.y_train)
    res = train(small_net, p0, small_data, optimizer=Adam(lr=0.02), epochs=8, batch_size=20,
                progress=False)
    assert not res.stopped_early and res.reason is None and not res.diverged
    assert res.epochs == 8 and res.steps == 8 * 10 and len(res.history) == 8
    assert res.train_loss < 0.8 * loss0
    h = res.history.column("train_loss")
    assert h[-1] < h[0]
    assert res.best_epoch is not None and 1 <= res.best_epoch <= 8
    assert res.val_accuracy == res.history[-1]["val_accuracy"]
    assert res.outputs == {}


def test_same_seed_is_bitwise_reproducible_and_seeds_differ(small_net, small_data):
    kw = dict(optimizer=Adam(lr=0.01), epochs=2, batch_size=32, progress=False)
    p0 = small_net.init_params(1)
    a = train(small_net, p0, small_data, seed=5, **kw)
    b = train(small_net, p0, small_data, seed=5, **kw)
    c = train(small_net, p0, small_data, seed=6, **kw)
    _assert_bitwise(a.params, b.params)
    assert a.params != c.params


def _manual_run(net, p0, data, opt, batch_size, seed, n_steps):
    """The documented RNG protocol, written out: the reference for train()."""
    rng = np.random.default_rng(seed)
    params, state = p0, opt.init(p0)
    n, done = data.X_train.shape[0], 0
    while True:
        perm = rng.permutation(n)
        for i in range(0, n, batch_size):
            if done == n_steps:
                return params
            idx = perm[i:i + batch_size]
            _, g = ptoc.loss_and_grad(net, params, data.X_train[idx], data.y_train[idx])
            params, state = opt.update(params, g, state)
            done += 1


def test_train_follows_the_documented_shuffling_protocol(small_net, small_data):
    opt, p0 = Adam(lr=0.01), small_net.init_params(2)
    # 200 samples, batch 30: six batches of 30 and one of 20 per epoch
    res = train(small_net, p0, small_data, optimizer=opt, epochs=2, batch_size=30, seed=3,
                progress=False)
    assert res.steps == 14
    _assert_bitwise(res.params, _manual_run(small_net, p0, small_data, opt, 30, 3, 14))


@pytest.mark.parametrize("batch_size", [None, 200, 10_000])
def test_full_batch(small_net, small_data, batch_size):
    seen = []

    def grad_fn(p, X, y):
        seen.append((X.copy(), y.copy()))
        return ptoc.loss_and_grad(small_net, p, X, y)

    res = train(small_net, small_net.init_params(0), small_data, optimizer=SGD(lr=0.1),
                epochs=3, batch_size=batch_size, grad_fn=grad_fn, progress=False)
    assert res.steps == 3 and len(seen) == 3
    for X, y in seen:
        np.testing.assert_array_equal(X, small_data.X_train)
        np.testing.assert_array_equal(y, small_data.y_train)


@pytest.mark.parametrize("what", ["loss", "grad"])
def test_divergence_keeps_the_last_good_params(tmp_path, small_net, small_data, what):
    k = 7  # the 7th gradient evaluation is bad: epoch 2 (5 batches of 40 per epoch), batch 2
    calls = []

    def grad_fn(p, X, y):
        calls.append(1)
        loss, g = ptoc.loss_and_grad(small_net, p, X, y)
        if len(calls) == k:
            if what == "loss":
                loss = float("nan")
            else:
                g = g.copy()
                g.b[1, 0] = np.inf
        return loss, g

    opt, p0 = Adam(lr=0.01), small_net.init_params(0)
    res = train(small_net, p0, small_data, optimizer=opt, epochs=5, batch_size=40, seed=1,
                grad_fn=grad_fn, output_dir=tmp_path, progress=False)
    assert len(calls) == k  # stopped immediately
    assert res.stopped_early and res.diverged
    assert "step 7" in res.reason and "epoch 2" in res.reason
    assert ("loss" if what == "loss" else "gradient of 'b'") in res.reason
    assert res.steps == k - 1 and res.epochs == 1 and len(res.history) == 1
    expected = _manual_run(small_net, p0, small_data, opt, 40, 1, k - 1)
    _assert_bitwise(res.params, expected)
    _, saved, extra = load_model(res.outputs["model"])
    _assert_bitwise(saved, expected)
    assert extra["diverged"] is True and extra["steps"] == k - 1
    assert (tmp_path / "history.json").exists() and (tmp_path / "training.png").exists()


def test_divergence_with_a_huge_learning_rate(small_net, small_data):
    res = train(small_net, small_net.init_params(0), small_data, optimizer=SGD(lr=1e300),
                epochs=3, batch_size=50, progress=False)
    assert res.diverged and res.stopped_early and res.steps < 12
    assert all(np.all(np.isfinite(v)) for v in res.params.values())
    assert "step" in res.reason


def test_outputs_and_history_files(tmp_path, small_net, small_data):
    out = tmp_path / "run" / "nested"
    res = train(small_net, small_net.init_params(0), small_data, epochs=5, batch_size=50,
                eval_every=2, output_dir=out, progress=False)
    assert set(res.outputs) == {"model", "history_json", "history_csv", "plot"}
    for name in ("model.npz", "history.json", "history.csv", "training.png"):
        assert (out / name).is_file()
    rows = json.loads((out / "history.json").read_text())
    assert len(rows) == 5 and all(list(r) == list(HISTORY_COLUMNS) for r in rows)
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5]
    evaluated = [r["val_accuracy"] is not None for r in rows]
    assert evaluated == [False, True, False, True, True]  # every 2 epochs and the last
    assert History.load_json(out / "history.json").column("train_loss").tolist() == \
        res.history.column("train_loss").tolist()
    lines = (out / "history.csv").read_text().splitlines()
    assert lines[0] == ",".join(HISTORY_COLUMNS) and len(lines) == 6
    first = lines[1].split(",")
    assert first[0] == "1" and first[1] == "4" and first[4] == ""
    assert float(first[2]) == res.history[0]["train_loss"]  # exact repr
    assert (out / "training.png").read_bytes()[:8] == PNG_MAGIC
    net, params, extra = load_model(out / "model.npz")
    assert net == small_net and params == res.params
    assert extra["optimizer"] == Adam().config() | {"lr": 3e-3}
    assert extra["val_accuracy"] == res.val_accuracy


def test_callback_can_stop_training(small_net, small_data):
    seen = []

    def callback(record, params):
        seen.append(record["epoch"])
        assert isinstance(params, ptoc.Params)
        return record["epoch"] == 2

    res = train(small_net, small_net.init_params(0), small_data, epochs=5, batch_size=100,
                callback=callback, progress=False)
    assert seen == [1, 2] and res.epochs == 2 and res.stopped_early and not res.diverged
    assert "callback" in res.reason


def test_train_validates_its_arguments(small_net, small_data):
    p = small_net.init_params(0)
    with pytest.raises(ValueError, match="epochs"):
        train(small_net, p, small_data, epochs=0, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        train(small_net, p, small_data, batch_size=0, progress=False)
    with pytest.raises(ValueError, match="seed"):
        train(small_net, p, small_data, seed=-1, progress=False)
    with pytest.raises(ValueError, match="target"):
        train(small_net, p, small_data, target="tpu", progress=False)
    with pytest.raises(ValueError, match="progress"):
        train(small_net, p, small_data, progress="sometimes")
    wide = ptoc.ResNet(width=4, depth=2, n_in=3, n_classes=5)
    with pytest.raises(ValueError, match="n_in"):
        train(wide, wide.init_params(0), small_data, progress=False)


def test_progress_bar_when_forced(small_net, small_data, capsys):
    train(small_net, small_net.init_params(0), small_data, epochs=2, batch_size=100,
          progress="force")
    err = capsys.readouterr().err
    assert "training" in err and "2/2" in err and "val_acc" in err
    train(small_net, small_net.init_params(0), small_data, epochs=1, batch_size=100,
          progress=True)  # stderr is not a terminal under pytest: no bar
    assert capsys.readouterr().err == ""


def test_plot_history_from_plain_dicts(tmp_path):
    rows = [{"epoch": 1, "train_loss": 1.0, "train_accuracy": None, "val_loss": None,
             "val_accuracy": None},
            {"epoch": 2, "train_loss": 0.5, "train_accuracy": 0.8, "val_loss": 0.6,
             "val_accuracy": 0.7}]
    path = plot_history(rows, tmp_path / "h.png", title="t")
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert plot_history([], tmp_path / "empty.png").read_bytes()[:8] == PNG_MAGIC


def test_only_the_writing_rank_writes_files(tmp_path):
    """Under MPI every rank trains the same model and only rank 0 writes the run's files:
    a method whose ``writes_files`` is False (an MPI rank > 0) leaves output_dir alone
    and returns the same parameters."""
    from ptoc.methods import GradientMethod
    from ptoc.optim import SGD
    from ptoc.parallel import SingleRank
    from ptoc.parallel.comm import is_root
    from ptoc.simultaneous import SimultaneousGradient

    class OtherRank(GradientMethod):
        @property
        def writes_files(self):
            return False

    net = ptoc.ResNet(width=3, depth=4, n_in=2, n_classes=5)
    data = ptoc.data.peaks(n_per_class=8, n_val_per_class=2, grid=32)
    p0 = net.init_params(0)
    kw = dict(epochs=2, batch_size=20, checkpoint_every=1, progress=False)
    quiet = ptoc.train(net, p0, data, method=OtherRank(SGD(lr=0.1)),
                       output_dir=tmp_path / "b", **kw)
    loud = ptoc.train(net, p0, data, method=GradientMethod(SGD(lr=0.1)),
                      output_dir=tmp_path / "a", **kw)
    assert not (tmp_path / "b").exists() and quiet.outputs == {}
    assert (tmp_path / "a" / "model.npz").exists() and (tmp_path / "a" / "checkpoint.npz").exists()
    assert all(np.array_equal(quiet.params[k], loud.params[k]) for k in loud.params)

    class Rank1(SingleRank):
        rank = 1

    assert is_root(None) and is_root(3) and is_root(SingleRank()) and not is_root(Rank1())
    assert not SimultaneousGradient(net, comm=Rank1()).writes_files
    assert not GradientMethod(SGD(lr=0.1), SimultaneousGradient(net, comm=Rank1())).writes_files
    assert not ptoc.pgcl.PGCL(comm=Rank1()).writes_files and ptoc.pgcl.PGCL(comm=2).writes_files
