"""Residual-history figures of layer-parallel solves (ptoc.plotting.plot_residuals) and
``ptoc solve --plot``: what is drawn is the record's residuals at the right iterations."""

import numpy as np
import pytest

import ptoc
from ptoc.cli import main
from ptoc.parallel import MGRIT, Parareal, SolveResult
from ptoc.parallel.driver import parallel_forward
from ptoc.plotting import _residual_figure, plot_residuals

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def records():
    net = ptoc.ResNet(width=4, depth=12, n_in=4, n_classes=2, opening="identity")
    p = net.init_params(0)
    X = np.random.default_rng(0).standard_normal((5, 4))
    _, pr = parallel_forward(net, p, X, Parareal(tol=0), comm=3)
    _, mg = parallel_forward(net, p, X, MGRIT(coarsening=2, tol=1e-12), comm=2)
    return pr, mg


def test_iterations_start_at_0_for_parareal_and_at_1_for_mgrit(records):
    pr, mg = records
    # parareal on 3 chunks: the prediction and 3 corrections, the last exactly 0
    assert len(pr.residuals) == pr.iterations + 1 == 4 and pr.residuals[-1] == 0.0
    assert pr.residual_iterations == [0, 1, 2, 3]
    assert len(mg.residuals) == mg.iterations
    assert mg.residual_iterations == list(range(1, mg.iterations + 1))


def test_the_lines_are_the_residuals(records):
    pr, mg = records
    fig = _residual_figure({"parareal": pr, "mgrit": mg}, "t", 1e-12)
    ax = fig.axes[0]
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    assert set(lines) == {"parareal (exactly 0 from iteration 3)", "mgrit", "tolerance 1e-12"}
    x, y = lines["mgrit"].get_data()
    assert np.array_equal(x, np.arange(1, mg.iterations + 1))
    assert np.array_equal(y, mg.residuals)
    x, y = lines["parareal (exactly 0 from iteration 3)"].get_data()
    assert np.array_equal(x, [0, 1, 2]) and np.array_equal(y, pr.residuals[:3])
    assert np.array_equal(lines["tolerance 1e-12"].get_ydata(), [1e-12, 1e-12])
    assert ax.get_yscale() == "log" and ax.get_title() == "t"


def test_default_labels_and_the_file(records, tmp_path):
    pr, mg = records
    fig = _residual_figure([pr, mg], None, None)
    labels = [ln.get_label() for ln in fig.axes[0].get_lines()]
    assert labels == ["parareal, forward sweep (exactly 0 from iteration 3)",
                      "mgrit, forward sweep"]
    path = plot_residuals(mg, tmp_path / "r.png", title="MGRIT", tol=1e-10)
    assert path == tmp_path / "r.png" and path.read_bytes()[:8] == PNG_MAGIC


def test_bad_input_is_named(records, tmp_path):
    pr, _ = records
    serial = SolveResult("serial", "forward")
    with pytest.raises(ValueError, match="serial forward sweep.*no residual history"):
        plot_residuals(serial, tmp_path / "s.png")
    with pytest.raises(ValueError, match="no solve results"):
        plot_residuals([], tmp_path / "s.png")
    with pytest.raises(TypeError, match="result b is a dict, not a SolveResult"):
        plot_residuals({"a": pr, "b": {}}, tmp_path / "s.png")
    with pytest.raises(TypeError, match="got float"):
        plot_residuals(1.0, tmp_path / "s.png")
    for tol in (0.0, -1.0, np.nan):
        with pytest.raises(ValueError, match="tol must be positive"):
            plot_residuals(pr, tmp_path / "s.png", tol=tol)
    assert not (tmp_path / "s.png").exists()


def test_solve_cli_writes_the_plot_and_refuses_it_for_serial(tmp_path, capsys):
    path = tmp_path / "res.png"
    assert main(["solve", "--method", "parareal", "--depth", "16", "--ranks", "2",
                 "--plot", str(path)]) == 0
    assert f"residual history: {path}" in capsys.readouterr().out
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert main(["solve", "--method", "serial", "--depth", "16", "--plot",
                 str(tmp_path / "no.png")]) == 2
    assert "--plot: the serial sweep has no residual history" in capsys.readouterr().err
    assert not (tmp_path / "no.png").exists()
