"""Real MPI: ``mpiexec -n P ptoc solve`` equals the simulated ranks, and bad input fails
on every rank without a hang.

mpi4py and the ``mpich`` wheel (which provides ``mpiexec``) come with the ``test``
extra. The mpich wheel busy-polls while a rank waits and this machine has few cores,
so the problems are tiny and each run has a timeout.
"""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import ptoc
from ptoc.cli.solve import _problem, _solver
from ptoc.parallel import SimulatedRanks
from ptoc.parallel.driver import parallel_gradient

MPIEXEC = shutil.which("mpiexec")

pytestmark = pytest.mark.mpi  # every test here launches mpiexec


def mpiexec(P, *args, timeout=120):
    assert MPIEXEC is not None, "mpiexec not found: pip install 'ptoc[test]' provides it"
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", NUMBA_NUM_THREADS="1",
               OMP_NUM_THREADS="1")
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    cmd = [MPIEXEC, "-n", str(P), sys.executable, "-m", "ptoc", "solve", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def run_script(name, P, out_dir):
    """Run ``tests/<name>.py OUT_DIR`` under ``mpiexec -n P`` (it must succeed) and return
    the script as a module, for building the same problem in this process."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", NUMBA_NUM_THREADS="1",
               OMP_NUM_THREADS="1")
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    cmd = [MPIEXEC, "-n", str(P), sys.executable, str(path), str(out_dir)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    return script


class Options:
    """The options ``ptoc solve`` parses, for building the same problem in-process."""

    def __init__(self, **kw):
        self.width, self.depth, self.batch, self.T = 4, 13, 5, 1.0
        self.activation, self.seed = "tanh", 3
        self.method, self.coarsening, self.levels, self.min_coarse = "mgrit", 2, 10, 2
        self.relaxation, self.cycle, self.coarse_weights, self.nested = "FCF", "V", "inject", False
        self.tol, self.max_iterations = 1e-10, 50
        self.__dict__.update(kw)

    def argv(self):
        """The options, each only with a method that reads it (ptoc solve refuses others)."""
        argv = ["--width", str(self.width), "--depth", str(self.depth), "--batch",
                str(self.batch), "--seed", str(self.seed), "--method", self.method]
        if self.method != "serial":
            argv += ["--tol", repr(self.tol)]
        if self.method == "mgrit":
            argv += ["--coarsening", str(self.coarsening), "--relaxation", self.relaxation,
                     "--cycle", self.cycle]
        return argv


@pytest.mark.parametrize("P", [1, 2, 3, 4])
@pytest.mark.parametrize("method", ["mgrit", "parareal", "serial"])
def test_mpi_equals_the_simulated_ranks(P, method, tmp_path):
    opt = Options(method=method, cycle="F" if P == 3 else "V")
    net, params, X, y = _problem(opt)
    solver = _solver(opt)
    simulated = parallel_gradient(net, params, X, y, solver, comm=SimulatedRanks(P))
    out = tmp_path / "mpi.npz"
    run = mpiexec(P, *opt.argv(), "--save", str(out))
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"on {P} rank(s)" in run.stdout
    got = np.load(out)
    # same arithmetic in the same order: bitwise equal to the simulated run
    assert np.array_equal(got["states"], simulated.states)
    assert np.array_equal(got["adjoints"], simulated.adjoints)
    for k in ("K", "b", "W", "mu"):
        assert np.array_equal(got[f"grad_{k}"], simulated.grads[k]), k
    serial_loss, serial_grads = ptoc.loss_and_grad(net, params, X, y)
    scale = max(np.max(np.abs(serial_grads[k])) for k in serial_grads)
    assert max(np.max(np.abs(got[f"grad_{k}"] - serial_grads[k])) for k in serial_grads) \
        <= 1e-10 * scale


def test_mpi_prints_the_solve_record():
    run = mpiexec(2, *Options(depth=16).argv(), "--check")
    assert run.returncode == 0, run.stderr
    assert "mgrit forward sweep on 2 rank(s)" in run.stdout
    assert "on the critical path" in run.stdout and "residuals:" in run.stdout
    assert "max relative difference from the serial sweep, gradient" in run.stdout


@pytest.mark.parametrize("args, message", [
    (["--coarsening", "1"], "coarsening factor m must be an integer >= 2"),
    (["--depth", "2", "--method", "mgrit", "--coarsening", "2", "--levels", "1"],
     "3 ranks for 2 layers"),
    (["--tol", "0"], "--tol: must be > 0"),
])
def test_bad_input_fails_on_every_rank_without_hanging(args, message):
    run = mpiexec(3, *args, timeout=60)
    assert run.returncode != 0
    assert message in run.stderr
    assert "Traceback" not in run.stderr


@pytest.mark.parametrize("P", [2, 3])
def test_mpi_ranks_holding_only_their_layers_equal_the_full_run(P, tmp_path):
    """Each MPI process draws and holds only its own layers' parameters
    (``local_gradient``); loss, head gradient and the stacked layer gradients equal
    the simulated run with the full parameters, bit for bit."""
    script = run_script("mpi_local_script", P, tmp_path)
    net = script.network()
    full = script.params_of_layers(0, net.depth)
    _, X, y = script.head_and_batch()
    ref = parallel_gradient(net, full, X, y, script.solver(), comm=SimulatedRanks(P))
    parts = [np.load(tmp_path / f"rank{r}.npz") for r in range(P)]
    bounds = [0] + [int(p["layers"][1]) for p in parts]
    assert bounds == [int(v) for v in ptoc.parallel.partition(net.depth, P)]
    for p in parts:
        assert float(p["loss"]) == ref.loss
        assert list(p["residuals"]) == ref.forward.residuals
        for k in ("W", "mu", "K_in", "b_in"):
            assert np.array_equal(p[f"grad_{k}"], ref.grads[k]), k
    for k in ("K", "b"):
        assert np.array_equal(np.concatenate([p[f"grad_{k}"] for p in parts]), ref.grads[k]), k


@pytest.mark.parametrize("P", [2, 3])
def test_mpi_conv_resnet_equals_the_simulated_ranks(P, tmp_path):
    """The convolutional ResNet through the same contract on real MPI ranks: its MGRIT
    gradient, state solve and adjoint solve equal those on simulated ranks bit for bit."""
    script = run_script("mpi_conv_script", P, tmp_path)
    got = np.load(tmp_path / "conv.npz")
    ref = script.results(SimulatedRanks(P))
    assert sorted(got.files) == sorted(ref)
    for k, v in ref.items():
        assert np.array_equal(got[k], v), k
    serial = script.problem()
    loss, grads = ptoc.loss_and_grad(*serial)
    assert abs(float(got["loss"]) - loss) < 1e-6 * abs(loss)  # 3 MGRIT iterations: close
