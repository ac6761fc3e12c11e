"""The gradient on MPI ranks that each build only their own layers, for ``tests/test_mpi.py``.

Run as ``mpiexec -n P python tests/mpi_local_script.py OUT_DIR``: rank ``r`` draws the
parameters of its layers ``owned_layers(N, P, r)`` alone (layer ``n`` from its own
generator, :func:`layer`), never the full ``K`` and ``b``, calls
:func:`ptoc.parallel.local_gradient` on :class:`~ptoc.parallel.MPIRanks` and writes
``OUT_DIR/rank<r>.npz``. The test builds the same layers for all ranks in one process
and compares with :func:`ptoc.parallel.parallel_gradient`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

import ptoc

DEPTH = 11  # uneven slices on 2, 3 and 4 ranks


def network() -> ptoc.ResNet:
    return ptoc.ResNet(width=3, depth=DEPTH, n_in=2, n_classes=3, gamma=1e-2, gamma_t=2e-2,
                       gamma_c=1e-2)


def layer(n: int) -> tuple[np.ndarray, np.ndarray]:
    """``(K_n, b_n)``, from a generator of its own (so any rank can draw any layer)."""
    rng = np.random.default_rng([5, n])
    return 0.8 * rng.standard_normal((3, 3)), 0.5 * rng.standard_normal(3)


def head_and_batch():
    rng = np.random.default_rng(17)
    head = {"K_in": rng.standard_normal((3, 2)), "b_in": rng.standard_normal(3),
            "W": rng.standard_normal((3, 3)), "mu": rng.standard_normal(3)}
    return head, rng.standard_normal((6, 2)), rng.integers(0, 3, 6)


def params_of_layers(start: int, stop: int) -> ptoc.Params:
    head, _, _ = head_and_batch()
    K, b = zip(*(layer(n) for n in range(start, stop)), strict=True)
    return ptoc.Params(K=np.stack(K), b=np.stack(b), **head)


def solver():
    return ptoc.MGRIT(coarsening=2, max_iterations=3, tol=1e-13)


def main(argv: list[str]) -> int:
    from ptoc.parallel import MPIRanks, local_gradient, owned_layers

    comm = MPIRanks()
    a, b = owned_layers(DEPTH, comm.size, comm.rank)
    _, X, y = head_and_batch()
    got = local_gradient(network(), params_of_layers(a, b), X, y, solver(), comm=comm)
    out = {f"grad_{k}": v for k, v in got.grads.items()}
    out.update(loss=np.float64(got.loss), layers=np.array(got.layers),
               residuals=np.array(got.forward.residuals))
    np.savez(Path(argv[1]) / f"rank{comm.rank}.npz", **out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
