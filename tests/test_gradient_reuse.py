"""GradientMethod reuses the line search's evaluation at the accepted point.

L-BFGS evaluates the gradient at the point it accepts; the next step starts there.
For a deterministic gradient on the same batch (full-batch training) that evaluation
is reused instead of repeated. These tests check that it changes no bit of a run,
that it saves exactly the evaluations it should, and that it is never used when it
would be wrong (another batch, a batch changed in place, another network, a gradient
with memory, another dtype).
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ptoc
from ptoc import methods
from ptoc.methods import GradientMethod, _same_arrays
from ptoc.node import NeuralODEGradient
from ptoc.optim import LBFGS, Adam
from ptoc.parallel import MGRIT
from ptoc.simultaneous import SimultaneousGradient


class Counting:
    """The exact gradient, counting calls; ``deterministic`` as given."""

    def __init__(self, net, deterministic):
        self.net, self.deterministic, self.calls = net, deterministic, 0

    def __call__(self, p, X, y):
        self.calls += 1
        return ptoc.loss_and_grad(self.net, p, X, y)


def _train(net, data, grad_fn, optimizer, epochs, batch_size, seed=0):
    return ptoc.train(net, net.init_params(seed), data, optimizer=optimizer, grad_fn=grad_fn,
                      epochs=epochs, batch_size=batch_size, seed=seed, progress=False)


def _bitwise(a, b):
    assert list(a) == list(b)
    for k in a:
        assert np.array_equal(a[k], b[k]), k


@settings(max_examples=12)
@given(width=st.integers(2, 5), depth=st.integers(1, 6), seed=st.integers(0, 50),
       batch=st.sampled_from([None, 7, 13]), optimizer=st.sampled_from(["lbfgs", "adam"]),
       memory=st.integers(1, 4))
def test_reuse_changes_no_bit_and_saves_one_evaluation_per_full_batch_lbfgs_step(
        width, depth, seed, batch, optimizer, memory):
    net = ptoc.ResNet(width=width, depth=depth, T=1.0, n_in=2, n_classes=5, gamma=1e-3)
    data = ptoc.data.peaks(n_per_class=5, n_val_per_class=2, grid=32, seed=seed)
    opt = LBFGS(memory=memory) if optimizer == "lbfgs" else Adam(lr=0.05)
    plain, reused = Counting(net, False), Counting(net, True)
    a = _train(net, data, plain, opt, 4, batch, seed)
    b = _train(net, data, reused, opt, 4, batch, seed)
    _bitwise(a.params, b.params)
    assert [r["train_loss"] for r in a.history] == [r["train_loss"] for r in b.history]
    if optimizer == "adam":  # no closure: every start is a new point
        assert plain.calls == reused.calls == a.steps
    elif batch is None:
        # every step's start but the first is the point the previous line search accepted
        trials = b.optimizer_state.closure_calls
        assert plain.calls == a.steps + trials
        assert reused.calls == 1 + trials
    else:  # another batch at every step: nothing to reuse
        assert reused.calls == plain.calls == a.steps + b.optimizer_state.closure_calls


def test_a_failed_line_search_reuses_the_start_of_its_own_step():
    """No trial accepted: the parameters stay, and so does the evaluation at them."""
    net = ptoc.ResNet(width=3, depth=3, n_in=2, n_classes=5)
    data = ptoc.data.peaks(n_per_class=5, n_val_per_class=2, grid=32)
    opt = LBFGS(lr=1e8, max_backtracks=0)  # f >= 0 cannot drop by c1 * 1e8 * |g'd|
    plain, reused = Counting(net, False), Counting(net, True)
    a = _train(net, data, plain, opt, 5, None)
    b = _train(net, data, reused, opt, 5, None)
    assert b.optimizer_state.failed_line_searches == 5
    _bitwise(b.params, net.init_params(0))
    _bitwise(a.params, b.params)
    assert plain.calls == 2 * 5  # start + the one rejected trial, every step
    assert reused.calls == 1 + 5  # the first start, then only the trials


def test_the_default_exact_gradient_is_reused(monkeypatch):
    net = ptoc.ResNet(width=3, depth=4, n_in=2, n_classes=5)
    data = ptoc.data.peaks(n_per_class=5, n_val_per_class=2, grid=32)
    calls = []
    real = methods.loss_and_grad

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(methods, "loss_and_grad", spy)
    assert GradientMethod(LBFGS()).deterministic
    res = _train(net, data, None, LBFGS(), 6, None)
    assert len(calls) == 1 + res.optimizer_state.closure_calls
    monkeypatch.undo()
    ref = _train(net, data, Counting(net, False), LBFGS(), 6, None)
    _bitwise(res.params, ref.params)


@pytest.mark.parametrize("change", ["nothing", "X in place", "y in place", "network",
                                    "another batch"])
def test_the_evaluation_is_matched_by_value(change):
    """Two steps; between them the batch or the network may change (the batch even in
    place, same objects): the second step's start is reused only if nothing did."""
    net = ptoc.ResNet(width=3, depth=3, n_in=2, n_classes=5, gamma=1e-3)
    data = ptoc.data.peaks(n_per_class=5, n_val_per_class=2, grid=32)
    X, y = data.X_train.copy(), data.y_train.copy()
    grad = Counting(net, True)
    method = GradientMethod(LBFGS(), grad)
    first = method.step(net, net.init_params(0), method.init(net, net.init_params(0)), X, y)
    if change == "X in place":
        X[0, 0] += 1e-12
    elif change == "y in place":
        y[0] = (y[0] + 1) % 5
    elif change == "network":
        net = ptoc.ResNet(width=3, depth=3, n_in=2, n_classes=5, gamma=2e-3)
        grad.net = net
    elif change == "another batch":
        X, y = X[1:], y[1:]
    second = method.step(net, first.params, first.state, X, y)
    starts = 1 if change == "nothing" else 2
    assert grad.calls == starts + second.state.closure_calls


def test_arrays_match_only_with_the_same_keys_dtype_shape_and_values():
    a = {"K": np.ones((2, 2)), "b": np.zeros(2)}
    assert _same_arrays(a, {"K": np.ones((2, 2)), "b": np.zeros(2)})
    assert not _same_arrays(a, {"K": np.ones((2, 2), np.float32), "b": np.zeros(2)})
    assert not _same_arrays(a, {"K": np.ones((1, 2, 2)), "b": np.zeros(2)})
    assert not _same_arrays(a, {"b": np.zeros(2), "K": np.ones((2, 2))})
    assert not _same_arrays(a, {"K": np.ones((2, 2))})
    nan = {"K": np.full((2, 2), np.nan), "b": np.zeros(2)}
    assert not _same_arrays(nan, {"K": np.full((2, 2), np.nan), "b": np.zeros(2)})


def test_the_neural_ode_gradient_is_reused_and_the_simultaneous_one_is_not():
    net = ptoc.ResNet(width=3, depth=4, n_in=2, n_classes=5)
    data = ptoc.data.peaks(n_per_class=5, n_val_per_class=2, grid=32)

    node = NeuralODEGradient(net)
    res = _train(net, data, node, LBFGS(), 4, None)
    assert node.deterministic
    assert len(node.records) == 1 + res.optimizer_state.closure_calls

    simultaneous = SimultaneousGradient(net, MGRIT(coarsening=2, max_iterations=1), comm=2)
    res = _train(net, data, simultaneous, LBFGS(), 4, None)
    assert not simultaneous.deterministic
    assert len(simultaneous.records) == res.steps + res.optimizer_state.closure_calls


def test_a_gradient_function_subclass_declares_its_abilities():
    """GradientMethod reads a gradient's abilities from the GradientFunction contract:
    a subclass declares them, a plain callable gets the defaults, anything else is
    refused before training starts."""
    from ptoc.methods import GradientFunction

    net = ptoc.ResNet(width=3, depth=3, n_in=2, n_classes=5)
    data = ptoc.data.peaks(n_per_class=5, n_val_per_class=2, grid=32)

    class Declared(GradientFunction):
        deterministic = True

        def __init__(self):
            self.calls, self.loaded = 0, None

        def __call__(self, p, X, y):
            self.calls += 1
            return ptoc.loss_and_grad(net, p, X, y)

        def state_dict(self):
            return {"calls": np.int64(self.calls)}

        def load_state(self, d):
            self.loaded = dict(d)

        def config(self):
            return {"name": "declared"}

    fn = Declared()
    method = GradientMethod(LBFGS(), grad_fn=fn)
    assert method.deterministic and method.writes_files
    assert method.config()["gradient"] == {"name": "declared"}
    res = _train(net, data, fn, LBFGS(), 3, None)
    assert fn.calls == 1 + res.optimizer_state.closure_calls  # reused, as declared
    state = method.state_dict(method.init(net, net.init_params(0)))
    assert int(state["grad_fn.calls"]) == fn.calls
    method.load_state(state, net, net.init_params(0))
    assert fn.loaded == {"calls": fn.calls}

    plain = GradientMethod(LBFGS(), grad_fn=lambda p, X, y: ptoc.loss_and_grad(net, p, X, y))
    assert not plain.deterministic and plain.evaluator() is None
    assert plain.config()["gradient"] == "custom"
    plain_state = plain.state_dict(plain.init(net, net.init_params(0)))
    assert plain_state and all(k.startswith("optimizer.") for k in plain_state)
    with pytest.raises(TypeError, match="grad_fn must be callable"):
        GradientMethod(LBFGS(), grad_fn=42)


def test_value_only_trials_ask_the_gradient_for_the_objective_alone():
    """With LBFGS(value_only_trials=True) a step calls the gradient once, at its start,
    and the line search calls ``value``: a callable's own ``value`` when it has one,
    else the loss of a full call (its gradient discarded)."""
    net = ptoc.ResNet(width=3, depth=4, n_in=2, n_classes=5, gamma=1e-3)
    data = ptoc.data.peaks(n_per_class=5, n_val_per_class=2, grid=32)

    class WithValue(Counting):
        values = 0

        def value(self, p, X, y):
            self.values += 1
            return ptoc.loss(self.net, p, X, y)

    own, plain = WithValue(net, False), Counting(net, False)
    a = _train(net, data, own, LBFGS(value_only_trials=True), 5, None)
    b = _train(net, data, plain, LBFGS(value_only_trials=True), 5, None)
    trials = a.optimizer_state.closure_calls
    assert own.calls == 5 and own.values == trials >= 5
    assert plain.calls == 5 + b.optimizer_state.closure_calls
    _bitwise(a.params, b.params)
