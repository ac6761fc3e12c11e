"""Files and folders of ``ptoc train``, ``ptoc solve`` and :func:`ptoc.training.train`:
checked before the work, written atomically, held by one run at a time, and clear errors
for damaged ones; the divergence rule on a finite but exploding loss; options a method
does not read."""

import errno
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

import ptoc
import ptoc.io
from ptoc.cli import main
from ptoc.io import LOCK_NAME, RunFolderInUseError, RunFolderLock, load_model
from ptoc.optim import Adam
from ptoc.training import CHECKPOINT_NAME, load_checkpoint, train

FAST = ["train", "--epochs", "1", "--depth", "4", "--width", "4", "--batch-size", "500",
        "--quiet"]


@pytest.fixture
def impossible(tmp_path):
    """A folder that cannot exist, even for root: it lies below a regular file."""
    (tmp_path / "afile").write_text("a file, not a folder")
    return tmp_path / "afile" / "sub"


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if the training loop is reached."""
    def refuse(*args, **kwargs):
        raise AssertionError("training started although the output was unusable")
    monkeypatch.setattr(ptoc.training, "train", refuse)


def _one_line_error(err: str, *words: str) -> None:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ptoc") and ": error: " in lines[0], err
    for word in words:
        assert word in lines[0], (word, err)


# --- output folders ---------------------------------------------------------------------


def test_impossible_output_folder_exits_2_before_training(impossible, no_training, capsys):
    assert main(FAST + ["-o", str(impossible)]) == 2
    _one_line_error(capsys.readouterr().err, "--output", str(impossible), "cannot create")


def test_impossible_output_dir_of_train_is_a_clear_value_error(impossible):
    net = ptoc.ResNet(width=2, depth=2, n_in=2, n_classes=5)
    data = ptoc.data.peaks(n_per_class=4, n_val_per_class=2, grid=32)
    with pytest.raises(ValueError, match="cannot create the output_dir .*sub"):
        train(net, net.init_params(0), data, epochs=1, output_dir=impossible, progress=False)


def test_a_full_disk_is_a_clear_error_and_leaves_no_temporary(tmp_path, monkeypatch, capsys):
    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(ptoc.io.os, "fsync", full)
    out = tmp_path / "run"
    assert main(FAST + ["-o", str(out)]) == 2
    _one_line_error(capsys.readouterr().err, "No space left on device", str(out))
    assert [p.name for p in out.iterdir() if p.name.endswith(".tmp")] == []


def test_a_failed_history_write_leaves_the_old_file(tmp_path, monkeypatch):
    history = ptoc.training.History()
    history.append({"epoch": 1, "steps": 1, "train_loss": 0.5})
    path = history.save_json(tmp_path / "history.json")
    before = path.read_text()
    history.append({"epoch": 2, "steps": 2, "train_loss": 0.25})

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(ptoc.io.os, "fsync", full)
    for save, name in ((history.save_json, "history.json"), (history.save_csv, "history.csv")):
        with pytest.raises(OSError, match=f"cannot write .*{name}.*No space left"):
            save(tmp_path / name)
    assert path.read_text() == before and not (tmp_path / "history.csv").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["history.json"]


# --- corrupt checkpoints --------------------------------------------------------------


def _corrupt(path, how):
    content = path.read_bytes()
    if how == "truncated":
        path.write_bytes(content[: len(content) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "flipped":
        middle = len(content) // 2
        path.write_bytes(content[:middle] + bytes(b ^ 0xFF for b in content[middle:middle + 8])
                         + content[middle + 8:])
    else:
        path.write_bytes(np.random.default_rng(0).bytes(len(content)))


CORRUPTIONS = ["truncated", "empty", "flipped", "random"]


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_a_corrupt_checkpoint_is_named_on_resume(tmp_path, how, capsys):
    out = tmp_path / "run"
    assert main(FAST + ["-o", str(out), "--checkpoint-every", "1"]) == 0
    _corrupt(out / CHECKPOINT_NAME, how)
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--quiet", "--epochs", "2"]) == 2
    _one_line_error(capsys.readouterr().err, str(out / CHECKPOINT_NAME), "corrupt")


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_a_corrupt_checkpoint_is_named_by_the_python_api(tmp_path, how):
    net = ptoc.ResNet(width=2, depth=2, n_in=2, n_classes=5)
    data = ptoc.data.peaks(n_per_class=4, n_val_per_class=2, grid=32)
    kw = dict(epochs=1, output_dir=tmp_path, checkpoint_every=1, progress=False)
    train(net, net.init_params(0), data, **kw)
    _corrupt(tmp_path / CHECKPOINT_NAME, how)
    with pytest.raises(ValueError, match=f"{CHECKPOINT_NAME}.* corrupt"):
        load_checkpoint(tmp_path / CHECKPOINT_NAME)
    with pytest.raises(ValueError, match=f"{CHECKPOINT_NAME}.* corrupt"):
        train(net, net.init_params(0), data, resume=True, **{**kw, "epochs": 2})


@pytest.mark.parametrize("content", ["[1, 2]", '{"width": 4, "colour": "red"}', "{"])
def test_a_damaged_run_file_is_named_on_resume(tmp_path, content, capsys):
    out = tmp_path / "run"
    assert main(FAST + ["-o", str(out), "--checkpoint-every", "1"]) == 0
    (out / "run.json").write_text(content)
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--quiet"]) == 2
    _one_line_error(capsys.readouterr().err, str(out / "run.json"))


# --- a run folder belongs to one run ----------------------------------------------------


def test_an_existing_run_folder_is_refused_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(FAST + ["-o", str(out), "--seed", "1"]) == 0
    model = (out / "model.npz").read_bytes()
    assert main(FAST + ["-o", str(out), "--seed", "2"]) == 2
    _one_line_error(capsys.readouterr().err, "holds an earlier run", "--resume", "--overwrite")
    assert (out / "model.npz").read_bytes() == model  # untouched
    assert json.loads((out / "run.json").read_text())["seed"] == 1
    assert main(FAST + ["-o", str(out), "--seed", "2", "--overwrite"]) == 0
    assert json.loads((out / "run.json").read_text())["seed"] == 2
    assert (out / "model.npz").read_bytes() != model
    assert main(["train", "--resume", str(out), "--overwrite"]) == 2


def test_a_run_folder_held_by_a_live_process_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / LOCK_NAME).write_text(f"{holder.pid} {socket.gethostname()}\n")
        assert main(FAST + ["-o", str(out)]) == 2
        _one_line_error(capsys.readouterr().err, "in use by process", str(holder.pid))
        net = ptoc.ResNet(width=2, depth=2, n_in=2, n_classes=5)
        data = ptoc.data.peaks(n_per_class=4, n_val_per_class=2, grid=32)
        with pytest.raises(RunFolderInUseError, match=str(holder.pid)):
            train(net, net.init_params(0), data, epochs=1, output_dir=out, progress=False)
    finally:
        holder.kill()
        holder.wait()
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing written


def test_a_stale_lock_of_a_killed_run_is_taken_over_with_a_message(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / LOCK_NAME).write_text(f"{dead.pid} {socket.gethostname()}\n")
    assert main(FAST + ["-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"locked by process {dead.pid}, which no longer runs" in err
    assert not (out / LOCK_NAME).exists() and (out / "model.npz").is_file()


def test_the_lock_is_reentrant_in_a_process_and_released(tmp_path):
    with RunFolderLock(tmp_path) as outer:
        assert (tmp_path / LOCK_NAME).read_text().split()[0] == str(os.getpid())
        with RunFolderLock(tmp_path):
            pass
        assert (tmp_path / LOCK_NAME).exists()
        assert outer.taken_over_from is None
    assert not (tmp_path / LOCK_NAME).exists()


# --- temporaries of killed writers ------------------------------------------------------


def test_stale_temporaries_are_removed_on_resume(tmp_path):
    net = ptoc.ResNet(width=2, depth=2, n_in=2, n_classes=5)
    data = ptoc.data.peaks(n_per_class=4, n_val_per_class=2, grid=32)
    kw = dict(output_dir=tmp_path, checkpoint_every=1, progress=False)
    train(net, net.init_params(0), data, epochs=1, **kw)
    stale = [".checkpoint.npz.0123456789ab.tmp", ".model.npz.abcdef012345.tmp"]
    others = [".notes.tmp", "keep.tmp", ".checkpoint.npz.xyz.tmp"]
    for name in stale + others:
        (tmp_path / name).write_bytes(b"half a file")
    train(net, net.init_params(0), data, epochs=2, resume=True, **kw)
    names = {p.name for p in tmp_path.iterdir()}
    assert not names & set(stale) and set(others) <= names


# --- ptoc solve's output files ----------------------------------------------------------

SOLVE = ["solve", "--depth", "8", "--width", "4", "--batch", "4", "--method", "parareal",
         "--ranks", "2"]


@pytest.mark.parametrize("option, name", [("--json", "r.json"), ("--save", "s.npz"),
                                          ("--plot", "r.png")])
def test_solve_checks_its_output_files_before_the_solve(impossible, option, name, capsys):
    assert main(SOLVE + [option, str(impossible.parent / name)]) == 2
    captured = capsys.readouterr()
    _one_line_error(captured.err, option, str(impossible.parent / name))
    assert "sweep" not in captured.out  # the solve did not run


def test_solve_save_refuses_a_folder_and_writes_exactly_the_path(tmp_path, capsys):
    assert main(SOLVE + ["--save", str(tmp_path)]) == 2
    _one_line_error(capsys.readouterr().err, "--save", "is a folder")
    assert main(SOLVE + ["--save", str(tmp_path / "solution")]) == 0
    assert f"to {tmp_path / 'solution'} (an .npz archive)" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["solution"]
    with np.load(tmp_path / "solution", allow_pickle=False) as z:
        assert {"states", "adjoints", "grad_K"} <= set(z.files)


def test_solve_plot_needs_an_image_suffix(tmp_path, capsys):
    assert main(SOLVE + ["--plot", str(tmp_path / "residuals.foo")]) == 2
    _one_line_error(capsys.readouterr().err, "--plot", "png")


# --- divergence of a finite loss ---------------------------------------------------------


def test_a_finite_but_exploding_loss_is_divergence(tmp_path, capsys):
    out = tmp_path / "run"
    argv = FAST + ["--lr", "1e6", "--epochs", "3", "-o", str(out), "--checkpoint-every", "1"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "diverged" in err and "exceeded 100 times" in err and "10 consecutive" in err
    net, params, extra = load_model(out / "model.npz")
    assert extra["diverged"] and extra["steps"] == 0  # only the first step's loss was good
    assert params == net.init_params(0)
    # the checkpoint after step 1 held parameters whose loss was then far too high
    assert not (out / CHECKPOINT_NAME).exists()
    assert main(argv[:-2] + ["-o", str(tmp_path / "off"), "--divergence-factor", "off"]) == 0


def test_the_divergence_rule_keeps_the_last_good_checkpoint(tmp_path):
    net = ptoc.ResNet(width=4, depth=4, n_in=2, n_classes=5)
    data = ptoc.data.peaks(n_per_class=40, n_val_per_class=4, grid=64)
    res = train(net, net.init_params(0), data, optimizer=Adam(lr=1e6), epochs=3,
                batch_size=20, output_dir=tmp_path, checkpoint_every=1, progress=False,
                divergence_patience=3)
    assert res.diverged and res.steps == 0 and "3 consecutive steps" in res.reason
    calm = train(net, net.init_params(0), data, optimizer=Adam(lr=1e-3), epochs=2,
                 batch_size=20, output_dir=tmp_path / "calm", checkpoint_every=3,
                 progress=False, divergence_factor=1.0, divergence_patience=3)
    assert not calm.diverged  # a decreasing loss never exceeds the first step's
    with pytest.raises(ValueError, match="divergence_factor"):
        train(net, net.init_params(0), data, epochs=1, divergence_factor=0.5, progress=False)
    with pytest.raises(ValueError, match="divergence_patience"):
        train(net, net.init_params(0), data, epochs=1, divergence_patience=0, progress=False)


# --- options a method does not read, and small texts -------------------------------------


@pytest.mark.parametrize("argv, option", [
    (["solve", "--method", "serial", "--levels", "3"], "--levels"),
    (["solve", "--method", "parareal", "--coarsening", "2"], "--coarsening"),
    (["solve", "--method", "serial", "--tol", "1e-3"], "--tol"),
    (FAST + ["--momentum", "0.5"], "--momentum"),
    (FAST + ["--divergence-factor", "0.5"], "--divergence-factor"),
])
def test_options_the_method_does_not_read_are_refused(argv, option, capsys):
    assert main(argv) == 2
    _one_line_error(capsys.readouterr().err, option)


def test_headers_print_option_values_not_enum_reprs(tmp_path, capsys):
    argv = ["train", "--method", "simultaneous", "--epochs", "1", "--depth", "8", "--width",
            "2", "--coarsening", "2", "--ranks", "2", "-o", str(tmp_path / "sim")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "relaxation=FCF" in out and "<" not in out
    assert main(["train", "--method", "msa", "--epochs", "1", "--depth", "2", "--width", "2",
                 "--batch-size", "full", "-o", str(tmp_path / "msa")]) == 0
    out = capsys.readouterr().out
    assert "inner=gradient" in out and "<" not in out


def test_batch_size_help_shows_one_default(capsys):
    assert main(["train", "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    start = help_text.index("--batch-size BATCH_SIZE samples")
    entry = help_text[start:help_text.index("--eval-every EVAL_EVERY", start)]
    assert entry.count("default") == 1


def test_solve_residuals_say_their_iterations(capsys):
    assert main(SOLVE) == 0
    out = capsys.readouterr().out
    summary = next(line for line in out.splitlines() if line.startswith("parareal forward"))
    iterations = int(summary.split(": ")[1].split()[0])
    residuals = next(line for line in out.splitlines() if "residuals:" in line)
    values, which = residuals.split(": ")[1].split(" (")
    assert which == f"after iterations 0..{iterations}, 0 is the coarse prediction)"
    assert len(values.split()) == iterations + 1


def test_an_interrupt_in_an_epochs_first_batch_resumes_bit_for_bit(tmp_path):
    """The checkpoint written at an interrupt during an epoch's first step holds the
    shuffling generator's state from before that epoch's permutation."""
    net = ptoc.ResNet(width=2, depth=2, n_in=2, n_classes=5)
    data = ptoc.data.peaks(n_per_class=8, n_val_per_class=2, grid=32)
    calls = 0

    def interrupted(p, X, y):  # the first step of epoch 2 (4 batches of 10 per epoch)
        nonlocal calls
        calls += 1
        if calls == 5:
            raise KeyboardInterrupt
        return ptoc.loss_and_grad(net, p, X, y)

    kw = dict(optimizer=Adam(lr=0.01), epochs=3, batch_size=10, checkpoint_every=3,
              progress=False)
    stopped = train(net, net.init_params(0), data, grad_fn=interrupted,
                    output_dir=tmp_path / "a", **kw)
    assert stopped.stopped_early and stopped.steps == 4
    def exact(p, X, y):
        return ptoc.loss_and_grad(net, p, X, y)

    resumed = train(net, net.init_params(0), data, grad_fn=exact, output_dir=tmp_path / "a",
                    resume=True, **kw)
    whole = train(net, net.init_params(0), data, grad_fn=exact, output_dir=tmp_path / "b", **kw)
    for k in whole.params:
        assert np.array_equal(resumed.params[k], whole.params[k]), k


def test_a_plot_that_fails_to_save_leaves_the_old_image(tmp_path, monkeypatch):
    """Figures are written atomically: a failure while writing keeps the earlier file."""
    from matplotlib.figure import Figure

    from ptoc.plotting import plot_history

    history = [{"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.1 / e,
                "train_accuracy": 0.3 * e, "val_accuracy": 0.25 * e} for e in (1, 2)]
    target = tmp_path / "training.png"
    target.write_bytes(b"the earlier image")

    def broken(self, fname, **kwargs):
        fname.write(b"half an ima")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken)
    with pytest.raises(OSError):
        plot_history(history, target)
    assert target.read_bytes() == b"the earlier image"
    assert [p.name for p in tmp_path.iterdir()] == ["training.png"]
