"""One MPI rank misbehaves, for ``tests/test_faults_mpi.py``.

Run as ``mpiexec -n 2 python tests/mpi_fault_script.py CASE``: every rank builds the
same tiny problem and calls :func:`ptoc.loss_and_grad` with MGRIT on
:class:`~ptoc.parallel.MPIRanks`, except that the last rank does what ``CASE`` says
(:data:`CASES`). The job must end on every rank, with a non-zero exit code and the
reason on stderr; it must never hang nor print a loss. The raising cases print the
time of the raise on stderr (``rank 1 raises at <unix time>``), to time the job's end.
"""

from __future__ import annotations

import sys
import time

import numpy as np

import ptoc

#: What the last rank does differently, by case name.
CASES = {
    "none": "does as the others do (the run succeeds)",
    "raise-before": "raises RuntimeError before the solve",
    "labels": "passes a label out of range (the input check fails on that rank only)",
    "raise-during": "raises RuntimeError in the loss, between the two sweeps",
    "coarsening": "uses MGRIT(coarsening=64)",
    "solver": "uses Parareal instead of MGRIT",
    "depth": "has a network of another depth",
    "inputs": "has other inputs X",
    "pgcl-inputs": "has other inputs X in a PGCL step (not a solve)",
}


def problem(depth: int = 13):
    """A tiny network and batch, the same on every rank."""
    net = ptoc.ResNet(width=3, depth=depth, n_in=2, n_classes=3)
    params = net.init_params(seed=4)
    rng = np.random.default_rng(8)
    return net, params, rng.standard_normal((5, 2)), rng.integers(0, 3, 5)


def stamp(rank: int) -> None:
    """Say on stderr when the fault happens (to time how long the job takes to end)."""
    print(f"rank {rank} raises at {time.time():.6f}", file=sys.stderr, flush=True)


def solver() -> ptoc.MGRIT:
    """The solver of every well-behaved rank."""
    return ptoc.MGRIT(coarsening=2, max_iterations=3)


def main(argv: list[str]) -> int:
    from ptoc.parallel import MPIRanks

    case = argv[1]
    if case not in CASES:
        raise SystemExit(f"unknown case {case!r}; one of {sorted(CASES)}")
    comm = MPIRanks()
    odd = comm.rank == comm.size - 1
    net, params, X, y = problem(16 if odd and case == "depth" else 13)
    method = solver()
    if odd:
        if case == "raise-before":
            stamp(comm.rank)
            raise RuntimeError("injected fault before the solve")
        if case == "labels":
            y = y.copy()
            y[0] = net.n_classes
        if case == "raise-during":
            def terminal(*args, **kwargs):
                stamp(comm.rank)
                raise RuntimeError("injected fault in the loss")
            ptoc.propagator.ResNetModel.terminal = terminal
        if case == "coarsening":
            method = ptoc.MGRIT(coarsening=64, max_iterations=3)
        if case == "solver":
            method = ptoc.Parareal(max_iterations=3)
        if case in ("inputs", "pgcl-inputs"):
            X = X + 1.0
    if case.startswith("pgcl"):
        pgcl = ptoc.PGCL(comm=comm)
        loss = pgcl.step(net, params, pgcl.init(net, params), X, y).loss
    else:
        loss, _ = ptoc.loss_and_grad(net, params, X, y, solver=method, comm=comm)
    print(f"rank {comm.rank}: loss {loss!r}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
