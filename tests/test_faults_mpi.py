"""A rank that fails or is handed another problem ends the run on every rank: never a
hang, never an answer the ranks do not agree on.

Under ``mpiexec -n 2``, ``tests/mpi_fault_script.py CASE`` makes the last rank
misbehave; each run has a subprocess timeout far above the time it takes, so a hang
fails the test. The same rules on :class:`~ptoc.parallel.SimulatedRanks` and the
decisions of :meth:`~ptoc.parallel.MPIRanks.run` are tested in this process.
"""

import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import ptoc
import ptoc.parallel.comm as comm_module
from ptoc.parallel import (
    DivergenceError,
    MPIRanks,
    RanksDisagreeError,
    Serial,
    SimulatedRanks,
    local_gradient,
)
from ptoc.parallel.comm import agree
from ptoc.propagator import ResNetModel

SCRIPT = Path(__file__).resolve().parent / "mpi_fault_script.py"
HANG = 60  # seconds: a run still going by then is hung (each takes about 1 s)


@pytest.fixture(scope="module")
def compiled_kernels():
    """Compile the script's kernels here, once, into Numba's cache: the ranks then load
    them, and a run's time is its own (compiling in both ranks of a fresh checkout could
    take longer than :data:`HANG`)."""
    spec = importlib.util.spec_from_file_location("mpi_fault_script", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    net, params, X, y = script.problem()
    ptoc.loss_and_grad(net, params, X, y, solver=script.solver())


def run_script(case: str) -> tuple[subprocess.CompletedProcess, float]:
    """``mpiexec -n 2 python tests/mpi_fault_script.py CASE``, and its wall time."""
    mpiexec = shutil.which("mpiexec")
    assert mpiexec is not None, "mpiexec not found: pip install 'ptoc[test]' provides it"
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", NUMBA_NUM_THREADS="1",
               OMP_NUM_THREADS="1")
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    t0 = time.perf_counter()
    run = subprocess.run([mpiexec, "-n", "2", sys.executable, str(SCRIPT), case],
                         capture_output=True, text=True, timeout=HANG, env=env)
    return run, time.perf_counter() - t0


@pytest.mark.mpi
def test_the_fault_script_runs_when_no_rank_misbehaves(compiled_kernels):
    run, _ = run_script("none")
    assert run.returncode == 0, run.stdout + run.stderr
    losses = {line.split("loss ")[1] for line in run.stdout.splitlines() if "loss" in line}
    assert len(losses) == 1  # both ranks printed the same loss


@pytest.mark.mpi
@pytest.mark.parametrize("case, message", [
    ("raise-before", "RuntimeError: injected fault before the solve"),
    ("labels", "label 3 is out of range"),
    ("raise-during", "RuntimeError: injected fault in the loss"),
    ("coarsening", "its input checks failed on 1 of 2 ranks: rank 1: MGRIT cannot coarsen 13 "
                   "layers with coarsening factor 64"),
    ("solver", "ranks disagree on the solver: rank 0 has MGRIT, rank 1 has Parareal"),
    ("depth", "ranks disagree on the network depth: rank 0 has 13, rank 1 has 16"),
    ("inputs", "ranks disagree on the inputs X: rank 0 has shape (5, 2) float64"),
    ("pgcl-inputs", "ranks disagree on the inputs X: rank 0 has shape (5, 2) float64"),
])
def test_one_misbehaving_rank_ends_the_job_on_every_rank(case, message, compiled_kernels):
    run, seconds = run_script(case)
    assert run.returncode != 0, run.stdout
    assert message in run.stderr
    assert "loss" not in run.stdout  # no rank returned an answer
    assert seconds < HANG / 3  # promptly: the job ends within seconds, it does not time out


# --- the same rules in one process ---------------------------------------------------------------

def problem(depth=7):
    net = ptoc.ResNet(width=3, depth=depth, n_in=2, n_classes=3)
    rng = np.random.default_rng(2)
    return net, net.init_params(seed=1), rng.standard_normal((4, 2)), rng.integers(0, 3, 4)


@pytest.mark.parametrize("timeout", [0, -1, float("nan"), float("inf"), "soon"])
def test_simulated_ranks_timeout_must_be_a_positive_number(timeout):
    with pytest.raises(ValueError, match="SimulatedRanks timeout"):
        SimulatedRanks(2, timeout=timeout)


def test_a_simulated_rank_that_fails_ends_the_ranks_waiting_for_it():
    """Rank 1 fails before sending; rank 0, waiting for its message, is released at once
    (not after the 300 s timeout) and the run raises rank 1's exception."""
    def program(c):
        if c.rank == 1:
            raise KeyError("rank 1 lost its data")
        return c.recv(1, tag=3)

    t0 = time.perf_counter()
    with pytest.raises(KeyError, match="rank 1 lost its data"):
        SimulatedRanks(2).run(program)
    assert time.perf_counter() - t0 < 5


def test_a_simulated_rank_that_fails_during_the_solve_ends_every_rank(monkeypatch):
    """The last rank fails between the two sweeps (the others wait in the adjoint sweep)."""
    net, params, X, y = problem()

    def terminal(*args, **kwargs):
        raise RuntimeError("injected fault in the loss")

    monkeypatch.setattr(ResNetModel, "terminal", terminal)
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match="injected fault in the loss"):
        ptoc.loss_and_grad(net, params, X, y, solver=ptoc.MGRIT(coarsening=2),
                           comm=SimulatedRanks(3))
    assert time.perf_counter() - t0 < 5


def test_simulated_ranks_with_different_heads_disagree():
    """Each simulated rank reads its own slice; a rank whose classifier differs (its
    loss would be another network's) is an error on every rank, naming the parameter."""
    net, params, X, y = problem(depth=6)

    def slices(rank):
        a, b = ptoc.parallel.owned_layers(6, 2, rank)
        mine = params.copy()
        mine.K, mine.b = params.K[a:b], params.b[a:b]
        if rank == 1:
            mine.W = mine.W + 1.0
        return mine

    with pytest.raises(RanksDisagreeError, match=r"ranks disagree on the parameter W: rank 0 "
                                                 r"has shape \(3, 3\) float64, content hash"):
        local_gradient(net, slices, X, y, Serial(), comm=2)


def test_agree_names_what_differs_and_which_rank_failed():
    def facts(rank):
        return {"network depth": str(16 if rank == 1 else 13), "network width": "3"}

    with pytest.raises(RanksDisagreeError, match="^ranks disagree on the network depth: rank 0 "
                                                 "has 13, rank 1 has 16, rank 2 has 13 "):
        SimulatedRanks(3).run(lambda c: agree(c, lambda: facts(c.rank)))

    def failing(rank):
        if rank == 2:
            raise OSError("disk full")
        return {}

    with pytest.raises(RanksDisagreeError, match="its input checks failed on 1 of 3 ranks: "
                                                 "rank 2: OSError: disk full"):
        SimulatedRanks(3).run(lambda c: agree(c, lambda: failing(c.rank)))


class FakeMPI:
    """The part of an mpi4py communicator :class:`MPIRanks` uses; ``Abort`` is recorded
    and stops the program (as the real one ends the process)."""

    class AbortedError(Exception):
        pass

    def __init__(self, rank=1, size=2):
        self.rank, self.size, self.aborted = rank, size, []

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return self.size

    def allgather(self, payload):  # of agree: rank 0's checks passed, with no facts
        return [(0, (None, {})), payload]  # (clock, object) pairs

    def Abort(self, code):
        self.aborted.append(code)
        raise FakeMPI.AbortedError


@pytest.fixture
def fake_mpi(monkeypatch):
    monkeypatch.setattr(comm_module, "_EXCEPTHOOK_INSTALLED", True)  # leave sys.excepthook be
    return FakeMPI()


def test_mpi_ranks_abort_the_job_when_one_rank_fails_alone(fake_mpi, capsys):
    comm = MPIRanks(fake_mpi)

    def program(c):
        raise RuntimeError("injected fault")

    with pytest.raises(FakeMPI.AbortedError):
        comm.run(program)
    assert fake_mpi.aborted == [1]
    err = capsys.readouterr().err
    assert "ptoc: rank 1 of 2 failed in a layer-parallel program; aborting" in err
    assert "RuntimeError: injected fault" in err


def test_mpi_ranks_end_normally_on_an_error_raised_on_every_rank(fake_mpi):
    """A divergence (raised on every rank after a sum) and an error the ranks agreed on
    end the program as ordinary exceptions: no abort, the caller may handle them."""
    comm = MPIRanks(fake_mpi)

    def diverges(c):
        raise DivergenceError("MGRIT diverged")

    with pytest.raises(DivergenceError):
        comm.run(diverges)

    def bad_input(c):
        def check():
            raise ValueError("label 3 is out of range")
        agree(c, check)

    with pytest.raises(RanksDisagreeError, match="rank 1: label 3 is out of range"):
        comm.run(bad_input)
    assert fake_mpi.aborted == []
