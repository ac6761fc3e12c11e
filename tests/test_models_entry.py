"""The serial entry points take any model of the contract, not only the dense ResNet:
:func:`ptoc.training.train` (evaluation, history, checkpoints, resume), the model files
of :mod:`ptoc.io` and ``ptoc train --model``."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
from test_models import _model as toy_model  # the model ptoc does not know

import ptoc
from ptoc.io import MODEL_KINDS, load_model, network_from_dict, network_to_dict, save_model
from ptoc.layered import LayeredNetwork
from ptoc.optim import Adam
from ptoc.propagator import PropagatorModel
from ptoc.training import load_checkpoint, train


@pytest.fixture(scope="module")
def data():
    return ptoc.data.peaks(n_per_class=20, n_val_per_class=4, grid=64)


@pytest.fixture(scope="module")
def layered(data):
    return LayeredNetwork((2, 8, 8, data.n_classes))


def _run(net, data, out=None, **kw):
    options = dict(optimizer=Adam(lr=0.01), batch_size=30, progress=False, output_dir=out)
    options.update(kw)
    return train(net, net.init_params(0), data, **options)


def test_train_takes_a_layered_network_end_to_end(tmp_path, layered, data):
    """The loss falls, the history holds the model's own accuracy and the contract's
    validation loss, and model.npz loads back as the same network and parameters."""
    result = _run(layered, data, tmp_path, epochs=6)
    losses = result.history.column("train_loss")
    assert losses[-1] < 0.8 * losses[0]
    assert np.all(np.isfinite(result.history.column("val_accuracy")))
    assert result.val_accuracy == layered.accuracy(result.params, data.X_val, data.y_val)
    assert result.val_loss == pytest.approx(layered.loss(result.params, data.X_val, data.y_val),
                                            rel=1e-13)
    history = json.loads((tmp_path / "history.json").read_text())
    assert len(history) == 6
    net, params, extra = load_model(tmp_path / "model.npz")
    assert repr(net) == repr(layered)
    assert all(np.array_equal(params[k], result.params[k]) for k in layered.layer_keys)
    assert extra["epochs"] == 6


@pytest.mark.parametrize("every, batch", [(4, 30), (1, None)])
def test_a_layered_run_resumed_from_its_checkpoint_equals_the_uninterrupted_run(
        tmp_path, layered, data, every, batch):
    whole = _run(layered, data, tmp_path / "whole", epochs=4, batch_size=batch)
    _run(layered, data, tmp_path / "cut", epochs=2, batch_size=batch, checkpoint_every=every)
    meta = load_checkpoint(tmp_path / "cut" / "checkpoint.npz")["meta"]
    assert meta["network"]["kind"] == "layered"
    resumed = _run(layered, data, tmp_path / "cut", epochs=4, batch_size=batch,
                   checkpoint_every=every, resume=True)
    for k in layered.layer_keys:
        assert np.array_equal(resumed.params[k], whole.params[k])
    assert resumed.history.column("train_loss").tolist() == \
        whole.history.column("train_loss").tolist()


def test_resume_refuses_another_layered_network(tmp_path, layered, data):
    _run(layered, data, tmp_path, epochs=1, checkpoint_every=1)
    other = LayeredNetwork((2, 8, 9, data.n_classes))
    with pytest.raises(ValueError, match="the network differs"):
        _run(other, data, tmp_path, epochs=2, checkpoint_every=1, resume=True)


def test_train_takes_a_model_ptoc_does_not_know(tmp_path):
    """The hand-written propagator of tests/test_models.py: trained (J falls, the
    accuracy is NaN: the contract knows no classes); it cannot be written to a file,
    which is refused before any work, naming the kinds ptoc.io knows."""
    model, params, x0, y = toy_model()
    data = SimpleNamespace(name="toy", X_train=x0, y_train=y, X_val=x0, y_val=y)
    result = train(model, params, data, optimizer=Adam(lr=0.02), epochs=20, batch_size=None,
                   progress=False)
    losses = result.history.column("train_loss")
    assert losses[-1] < 0.8 * losses[0]
    assert np.isnan(result.val_accuracy) and result.best_params is None
    with pytest.raises(TypeError, match="PropagatorModel.*resnet, layered, conv"):
        train(model, params, data, epochs=1, progress=False, output_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_train_refuses_what_is_not_a_model(data):
    with pytest.raises(TypeError, match="ptoc.ResNet or a ptoc.propagator.Model"):
        train(object(), {}, data, epochs=1, progress=False)


def test_save_and_load_a_layered_network(tmp_path):
    net = LayeredNetwork((5, 7, 3), activation="tanh", batch_norm=False, bn_eps=1e-3)
    params = net.init_params(2)
    path = save_model(tmp_path / "m.npz", net, params, {"note": 1})
    loaded, back, extra = load_model(path)
    assert repr(loaded) == repr(net) and loaded.bn_eps == net.bn_eps
    assert sorted(back) == ["W", "b"] and extra == {"note": 1}
    assert all(np.array_equal(back[k], params[k]) for k in params)
    with np.load(path) as f:  # a ResNet's files keep version 1; other kinds are version 2
        assert int(f["format_version"]) == 2
    assert network_from_dict(network_to_dict(net)).widths == net.widths


def test_model_files_refuse_unknown_kinds(tmp_path):
    model, params, _, _ = toy_model()
    with pytest.raises(TypeError, match="cannot describe a PropagatorModel"):
        save_model(tmp_path / "m.npz", model, params)
    net = LayeredNetwork((3, 2))
    path = save_model(tmp_path / "m.npz", net, net.init_params(0))
    entries = dict(np.load(path))
    entries["network"] = np.array(json.dumps({"kind": "capsule", "size": 3}))
    np.savez(tmp_path / "odd.npz", **entries)
    with pytest.raises(ValueError, match="unknown model kind 'capsule'; this ptoc knows resnet"):
        load_model(tmp_path / "odd.npz")


def test_the_conv_kind_waits_for_ptoc_convresnet(monkeypatch):
    """The "conv" kind is registered by name and found by import: while ptoc has no
    ConvResNet a file of that kind is refused with a message saying so."""
    monkeypatch.delattr(ptoc, "ConvResNet", raising=False)
    assert MODEL_KINDS["conv"].find_class() is None
    with pytest.raises(ValueError, match="'conv' is not available in this ptoc"):
        network_from_dict({"kind": "conv", "channels": 4})


def test_a_registered_kind_round_trips(tmp_path, monkeypatch):
    """How a new kind plugs in: one register_model_kind call naming the class and its
    constructor fields (the class keeps them as attributes)."""

    class Narrow(LayeredNetwork):
        def __init__(self, width_in, classes):
            super().__init__((width_in, classes))
            self.width_in, self.classes = width_in, classes

    monkeypatch.setitem(MODEL_KINDS, "narrow", MODEL_KINDS["layered"])  # undone afterwards
    ptoc.io.register_model_kind("narrow", Narrow, ("width_in", "classes"))
    net = Narrow(4, 3)
    assert network_to_dict(net) == {"kind": "narrow", "width_in": 4, "classes": 3}
    loaded, _, _ = load_model(save_model(tmp_path / "n.npz", net, net.init_params(0)))
    assert isinstance(loaded, Narrow) and loaded.widths == (4, 3)


def test_a_kind_whose_fields_do_not_rebuild_it_is_refused(monkeypatch):
    class Forgetful(LayeredNetwork):
        def __init__(self, widths, bn_eps=1e-4):
            super().__init__(widths, bn_eps=bn_eps)
            self.widths = tuple(w + 1 for w in widths)  # not what it was built from

    monkeypatch.setitem(MODEL_KINDS, "forgetful", MODEL_KINDS["layered"])
    ptoc.io.register_model_kind("forgetful", Forgetful, ("widths",))
    with pytest.raises(ValueError, match="not described by its fields"):
        network_to_dict(Forgetful((3, 2)))


def test_propagator_model_is_not_mistaken_for_a_registered_kind():
    model, *_ = toy_model()
    assert isinstance(model, PropagatorModel)
    with pytest.raises(TypeError, match="register_model_kind"):
        network_to_dict(model)


# --- ptoc train --model ---------------------------------------------------------------------------

def test_cli_trains_a_layered_network_on_mnist(tmp_path, capsys):
    from ptoc.cli import main

    out = tmp_path / "run"
    argv = ["train", "--data", "mnist", "--model", "layered", "--widths", "784,8,10",
            "--epochs", "1", "--batch-size", "400", "--lr", "0.01", "--quiet",
            "--output", str(out)]
    assert main(argv) == 0
    assert "validation accuracy" in capsys.readouterr().out
    net, params, extra = load_model(out / "model.npz")
    assert isinstance(net, LayeredNetwork) and net.widths == (784, 8, 10)
    assert extra["data"] == "mnist" and extra["steps"] == 10
    assert json.loads((out / "history.json").read_text())[0]["val_accuracy"] > 0.3


def test_cli_resumes_a_layered_run_with_its_model_options(tmp_path):
    from ptoc.cli import main

    out = tmp_path / "run"
    argv = ["train", "--model", "layered", "--widths", "2,6,5", "--activation", "tanh",
            "--epochs", "1", "--batch-size", "100", "--quiet", "--output", str(out)]
    assert main(argv) == 0
    assert main(["train", "--resume", str(out), "--epochs", "2", "--quiet"]) == 0
    net, _, extra = load_model(out / "model.npz")
    assert net.widths == (2, 6, 5) and net.activation.value == "tanh"
    assert extra["epochs"] == 2


@pytest.mark.parametrize("argv, message", [
    (["--model", "layered", "--width", "4"], "argument --width: only applies to --model resnet,"
                                              " not layered"),
    (["--model", "layered", "--depth", "4"], "argument --depth: only applies to --model resnet "
                                              "or conv, not layered"),
    (["--channels", "3"], "argument --channels: only applies to --model conv, not resnet"),
    (["--widths", "2,4,5"], "argument --widths: only applies to --model layered, not resnet"),
    (["--model", "layered", "--widths", "3,4"], "argument --widths: must run from the peaks "
                                                "data set's 2 inputs to its 5 classes"),
    (["--model", "layered", "--widths", "2,x,5"], "argument --widths: must be integers"),
    (["--model", "layered", "--method", "node"], "argument --method node: trains the neural "
                                                 "ODE of a dense ResNet"),
    (["--model", "layered", "--method", "simultaneous"], "--model layered has none"),
    (["--model", "layered", "--method", "pgcl"], "--model layered has none"),
])
def test_cli_refuses_options_the_model_does_not_read(tmp_path, capsys, argv, message):
    from ptoc.cli import main

    assert main(["train", *argv, "--epochs", "1", "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_cli_conv_model_is_refused_until_ptoc_has_convresnet(tmp_path, capsys, monkeypatch):
    from ptoc.cli import main

    monkeypatch.delattr(ptoc, "ConvResNet", raising=False)
    argv = ["train", "--data", "digits", "--model", "conv", "--channels", "2", "--epochs", "1",
            "--output", str(tmp_path / "o")]
    assert main(argv) == 2
    assert "argument --model conv: this ptoc has no ptoc.ConvResNet" in capsys.readouterr().err


def test_cli_builds_the_conv_model_the_way_convresnet_is_specified(tmp_path, capsys,
                                                                    monkeypatch):
    """The code path for ptoc.ConvResNet, with a stand-in of its constructor (the real
    class trains through the same contract): the call the CLI makes, and peaks refused
    (not images)."""
    from ptoc.cli import main

    calls = []

    def stand_in(**kwargs):
        calls.append(kwargs)
        raise ValueError("stand-in, not a network")

    monkeypatch.setattr(ptoc, "ConvResNet", stand_in, raising=False)
    argv = ["train", "--data", "digits", "--model", "conv", "--channels", "3", "--depth", "2",
            "--T", "0.5", "--activation", "relu", "--epochs", "1", "--output", str(tmp_path)]
    assert main(argv) == 2
    assert calls == [dict(channels=3, depth=2, T=0.5, activation="relu", image_shape=(1, 8, 8),
                          n_classes=10)]
    assert "invalid network for the digits data set: stand-in" in capsys.readouterr().err
    assert main(["train", "--model", "conv", "--epochs", "1", "--output", str(tmp_path)]) == 2
    assert "needs image data (--data mnist or digits), not --data peaks" in \
        capsys.readouterr().err


def test_cli_trains_a_convolutional_resnet_on_mnist(tmp_path, capsys):
    """``ptoc train --data mnist --model conv``: the real ptoc.ConvResNet trains through
    the contract, reports its accuracy, and its model file loads back as a ConvResNet."""
    from ptoc.cli import main
    from ptoc.io import load_model

    out = tmp_path / "conv"
    argv = ["train", "--data", "mnist", "--model", "conv", "--channels", "2", "--depth", "2",
            "--epochs", "1", "--quiet", "--output", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "validation accuracy nan" not in text and "validation accuracy" in text
    net, params, _ = load_model(out / "model.npz")
    assert isinstance(net, ptoc.ConvResNet) and (net.channels, net.depth) == (2, 2)
    assert params["K"].shape == (2, 2, 2, 3, 3)
