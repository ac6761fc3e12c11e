"""The ``ptoc`` command line."""

import json
import subprocess
import sys

import numpy as np
import pytest

import ptoc
from ptoc.cli import main
from ptoc.cli.train import METHODS
from ptoc.io import load_model

FAST = ["train", "--epochs", "1", "--depth", "4", "--width", "4", "--batch-size", "500"]


def test_train_writes_outputs_and_prints_accuracies(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(FAST + ["--output", str(out)]) == 0
    captured = capsys.readouterr()
    assert "train accuracy" in captured.out and "validation accuracy" in captured.out
    assert str(out) in captured.out
    assert "Traceback" not in captured.err
    for name in ("model.npz", "history.json", "history.csv", "training.png"):
        assert (out / name).is_file()
    net, params, extra = load_model(out / "model.npz")
    assert (net.width, net.depth, net.T, net.activation.value) == (4, 4, 5.0, "tanh")
    assert extra["optimizer"] == {"name": "adam", "lr": 3e-3, "beta1": 0.9, "beta2": 0.999,
                                  "eps": 1e-8}
    assert extra["batch_size"] == 500 and extra["data"] == "peaks"
    rows = json.loads((out / "history.json").read_text())
    assert len(rows) == 1 and rows[0]["steps"] == 10


def test_train_options_reach_the_model(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--epochs", "2", "--depth", "3", "--width", "2", "--T", "0.5",
            "--activation", "smoothrelu", "--optimizer", "sgd", "--lr", "0.05",
            "--momentum", "0.5", "--batch-size", "full", "--gamma", "0.01", "--seed", "3",
            "--dtype", "float32", "--target", "numpy", "--quiet", "--output", str(out)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.err == ""  # --quiet: no progress bar, no header
    assert "ptoc: training" not in captured.out and "validation accuracy" in captured.out
    net, params, extra = load_model(out / "model.npz")
    assert net == ptoc.ResNet(width=2, depth=3, T=0.5, activation="smoothrelu", n_in=2,
                              n_classes=5, gamma=0.01, dtype="float32")
    assert extra["optimizer"] == {"name": "sgd", "lr": 0.05, "momentum": 0.5,
                                  "nesterov": False}
    assert extra["batch_size"] is None and extra["steps"] == 2 and extra["seed"] == 3


def test_divergence_exits_1_and_keeps_the_model(tmp_path, capsys):
    out = tmp_path / "run"
    argv = FAST + ["--optimizer", "sgd", "--lr", "1e300", "--output", str(out), "--quiet"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "diverged" in err and "step" in err and "last good model" in err
    assert str(out / "model.npz") in err and "Traceback" not in err
    _, params, _ = load_model(out / "model.npz")
    assert all(np.all(np.isfinite(v)) for v in params.values())


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["info", "--help"]])
def test_help_exits_0(argv, capsys):
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "usage: ptoc" in out


def test_help_lists_subcommands_and_every_train_option(capsys):
    main(["--help"])
    top = capsys.readouterr().out
    assert "train" in top and "info" in top
    main(["train", "--help"])
    text = capsys.readouterr().out
    for option in ("--data", "--width", "--depth", "--T", "--activation", "--optimizer",
                   "--lr", "--momentum", "--epochs", "--batch-size", "--target", "--seed",
                   "--output", "--gamma", "--quiet"):
        assert option in text, option
    assert "(default: 32)" in text and "(default: adam)" in text and "(default: peaks)" in text


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        (["--width", "0"], "--width"),
        (["--depth", "-3"], "--depth"),
        (["--activation", "foo"], "--activation"),
        (["--target", "tpu"], "--target"),
        (["--lr", "-1"], "--lr"),
        (["--lr", "nan"], "--lr"),
        (["--momentum", "1"], "--momentum"),
        (["--epochs", "x"], "--epochs"),
        (["--batch-size", "0"], "--batch-size"),
        (["--data", "cifar10"], "--data"),
        (["--no-such-option"], "--no-such-option"),
        (["--nesterov"], "--nesterov"),
        (["--optimizer", "sgd", "--momentum", "0", "--nesterov"], "--nesterov"),
        (["--method", "nope"], "--method"),
        (["--ranks", "2"], "--ranks"),
        (["--mgrit-iterations", "3"], "--mgrit-iterations"),
        (["--method", "simultaneous", "--coarsening", "1"], "coarsening"),
        (["--method", "simultaneous", "--ranks", "40"], "--method simultaneous"),
        (["--substeps", "2"], "--substeps"),
        (["--method", "simultaneous", "--chunks", "2"], "--chunks"),
        (["--method", "node", "--chunks", "40", "--depth", "8"], "chunks"),
        (["--method", "node", "--schedule", "euler,rk5"], "rk5"),
        (["--method", "node", "--scheme", "heun", "--schedule", "euler,rk4"], "--schedule"),
        (["--checkpoint-every", "0"], "--checkpoint-every"),
        (["--local-steps", "2"], "--local-steps"),
        (["--method", "pgcl", "--optimizer", "lbfgs"], "L-BFGS"),
        (["--method", "pgcl", "--ranks", "40", "--depth", "8"], "--ranks"),
    ],
)
def test_bad_options_exit_2_with_one_clear_line(argv, option, capsys, tmp_path):
    assert main(["train", *argv, "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "ptoc" in err and "error" in err and option in err
    assert "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_method_alone_lists_the_methods(capsys):
    assert main(["train", "--method"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == list(METHODS)
    assert {"serial", "simultaneous", "node"} <= set(METHODS)
    assert all(len(line.split(maxsplit=1)[1]) > 20 for line in lines)


def test_simultaneous_training_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--method", "simultaneous", "--ranks", "2", "--depth", "8",
                 "--epochs", "4", "--batch-size", "full", "--output", str(out), "-q"]) == 0
    history = json.loads((out / "history.json").read_text())
    assert len(history) == 4 and history[-1]["train_loss"] < history[0]["train_loss"]
    assert (out / "model.npz").exists()


def test_lbfgs_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--optimizer", "lbfgs", "--activation", "smoothrelu", "--depth", "8",
                 "--epochs", "5", "--batch-size", "full", "--output", str(out), "-q"]) == 0
    history = json.loads((out / "history.json").read_text())
    losses = [h["train_loss"] for h in history]
    assert all(b <= a for a, b in zip(losses, losses[1:], strict=False))  # Armijo steps
    assert losses[-1] < 0.8 * losses[0]


def test_no_subcommand_is_an_error(capsys):
    assert main([]) == 2
    assert "error" in capsys.readouterr().err


def test_invalid_network_is_a_clean_error(tmp_path, capsys):
    # an identity opening needs width == n_in (2 for Peaks)
    assert main(["train", "--opening", "identity", "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ptoc: error:") and "identity" in err and "Traceback" not in err


def test_unavailable_target_is_a_clean_error(monkeypatch, tmp_path, capsys):
    def backend(target):
        raise ImportError("target 'cuda' found no usable CUDA GPU")

    monkeypatch.setattr(ptoc.kernels, "backend", backend)
    assert main(["train", "--target", "cuda", "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ptoc: error: argument --target cuda:") and "no usable" in err


def test_missing_scikit_learn_is_a_clean_error(monkeypatch, tmp_path, capsys):
    message = "the digits data set needs scikit-learn: pip install 'ptoc[digits]'"

    def digits(**kwargs):
        raise ImportError(message)

    monkeypatch.setattr(ptoc.data, "digits", digits)
    assert main(["train", "--data", "digits", "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for word in ("ptoc 0.1.0", "numpy", "numba", "python", "numba threads", "cpu:", "cuda:"):
        assert word in out, word
    cuda_line = next(line for line in out.splitlines() if "cuda:" in line)
    assert any(s in cuda_line for s in ("available", "simulator", "not installed"))


def test_python_dash_m_ptoc():
    proc = subprocess.run([sys.executable, "-m", "ptoc", "--help"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "usage: ptoc" in proc.stdout and "train" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "ptoc", "train", "--width", "0"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "--width" in proc.stderr and "Traceback" not in proc.stderr


def test_node_training_from_the_command_line(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--method", "node", "--chunks", "4", "--schedule", "euler,heun,rk4",
                 "--parareal-iterations", "3", "--depth", "8", "--epochs", "6",
                 "--batch-size", "full", "--optimizer", "adam", "--lr", "0.02",
                 "--output", str(out), "-q"]) == 0
    history = json.loads((out / "history.json").read_text())
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    _, params, extra = ptoc.io.load_model(out / "model.npz")
    assert extra["method"]["gradient"]["name"] == "node"
    assert extra["method"]["gradient"]["scheme"] == "rk4"
    net = ptoc.ResNet(width=8, depth=8, T=5.0, n_in=2, n_classes=5, gamma=1e-4,
                      gamma_t=1e-4, gamma_c=1e-4)
    data = ptoc.data.peaks()
    # the reported validation loss is the neural ODE's (serial RK4), not the ResNet's
    from ptoc.node import node_loss
    assert history[-1]["val_loss"] == node_loss(net, params, data.X_val, data.y_val,
                                                scheme="rk4")


def test_resume_takes_its_options_from_the_run(tmp_path, capsys):
    out = tmp_path / "run"
    base = ["train", "--depth", "4", "--width", "3", "--batch-size", "500", "--seed", "1",
            "--checkpoint-every", "4", "-q"]
    assert main([*base, "--epochs", "2", "--output", str(out)]) == 0
    stored = json.loads((out / "run.json").read_text())
    assert stored["depth"] == 4 and stored["seed"] == 1 and "output" not in stored
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--seed", "3"]) == 2
    err = capsys.readouterr().err
    assert "--seed" in err and "run.json" in err and "Traceback" not in err
    assert main(["train", "--resume", str(out), "--output", str(tmp_path / "x")]) == 2
    assert "--output" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path / "nothing")]) == 2
    assert "run.json" in capsys.readouterr().err
    (tmp_path / "early").mkdir()
    (tmp_path / "early" / "run.json").write_text((out / "run.json").read_text())
    assert main(["train", "--resume", str(tmp_path / "early")]) == 2
    assert "checkpoint" in capsys.readouterr().err
    # a finished run continued to 4 epochs equals a 4-epoch run
    assert main(["train", "--resume", str(out), "--epochs", "4", "-q"]) == 0
    assert main([*base, "--epochs", "4", "--output", str(tmp_path / "whole")]) == 0
    _, a, _ = ptoc.io.load_model(out / "model.npz")
    _, b, _ = ptoc.io.load_model(tmp_path / "whole" / "model.npz")
    for k in a:
        assert np.array_equal(a[k], b[k]), k


def test_pgcl_training_from_the_command_line(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--method", "pgcl", "--ranks", "3", "--depth", "6", "--epochs", "6",
                 "--lr", "0.02", "--coarse-weights", "average", "--output", str(out),
                 "-q"]) == 0
    history = json.loads((out / "history.json").read_text())
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert [r["steps"] for r in history] == [1, 2, 3, 4, 5, 6]  # full batch by default
    assert "state_defect" in history[-1]
    _, _, extra = ptoc.io.load_model(out / "model.npz")
    assert extra["method"]["name"] == "pgcl" and extra["batch_size"] is None
    assert json.loads((out / "run.json").read_text())["batch_size"] is None


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_decreases_the_loss_on_peaks(method, tmp_path):
    """Every training method, from the command line, lowers the objective."""
    out = tmp_path / method
    extra = ["--ranks", "2"] if method in ("simultaneous", "pgcl") else []
    assert main(["train", "--method", method, "--depth", "6", "--width", "4", "--epochs", "8",
                 "--lr", "0.02", *extra, "--output", str(out), "-q"]) == 0
    history = json.loads((out / "history.json").read_text())
    net, _, saved = ptoc.io.load_model(out / "model.npz")
    data = ptoc.data.peaks()
    start = ptoc.loss(net, net.init_params(0), data.X_val, data.y_val)
    assert history[-1]["val_loss"] < 0.8 * start, (start, history)
    assert saved["method"]["name"] == ("gradient" if method in ("serial", "simultaneous",
                                                                 "node") else method)
    if method in ("ternary", "binary"):
        fractions = [r["nonzero_fraction"] for r in history]
        assert all(0 < f <= 1 for f in fractions)
        assert (method == "binary") == all(f == 1 for f in fractions)


def test_solve_exit_codes(capsys):
    """ptoc solve: 0 when solved to the tolerance, 3 when stopped at --max-iterations."""
    assert main(["solve", "--method", "mgrit", "--depth", "16", "--ranks", "2"]) == 0
    assert "NOT converged" not in capsys.readouterr().out
    assert main(["solve", "--method", "mgrit", "--depth", "16", "--max-iterations", "1"]) == 3
    out = capsys.readouterr().out
    assert "NOT converged" in out and "exit code 3" in out


def test_solve_that_stagnates_says_so_instead_of_asking_for_more_iterations(capsys):
    """A long horizon (T = 1e6) leaves MGRIT's residual on its rounding floor, 4.5e-10,
    above --tol 1e-10: the solve stops when the residual stagnates and says that more
    iterations will not help (it used to run all 50 and ask for more)."""
    code = main(["solve", "--method", "mgrit", "--T", "1e6", "--depth", "64", "--sweep",
                 "forward"])
    out = capsys.readouterr().out
    assert code == 3
    assert "stagnated at residual" in out and "raise --max-iterations" not in out


@pytest.mark.parametrize("keep", [0, 1 << 20])
def test_the_command_line_keeps_freed_memory_unless_told_not_to(keep, monkeypatch, capsys):
    import ptoc.cli as cli
    from ptoc import _config

    calls = []
    monkeypatch.setattr(_config, "KEEP_FREED_BYTES", keep)
    monkeypatch.setattr(cli, "keep_freed_memory", calls.append)
    assert main(["info"]) == 0
    assert calls == ([keep] if keep else [])
