"""The convolutional ResNet's layer-parallel gradient on MPI ranks, for ``tests/test_mpi.py``.

Run as ``mpiexec -n P python tests/mpi_conv_script.py OUT_DIR``: every rank calls
:func:`ptoc.loss_and_grad` of the same small :class:`ptoc.ConvResNet` with MGRIT on
:class:`~ptoc.parallel.MPIRanks`, and also its state and adjoint solves
(:func:`ptoc.forward`, :func:`ptoc.adjoint`); rank 0 writes ``OUT_DIR/conv.npz``. The
test runs the same calls on simulated ranks in one process and compares bit for bit.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

import ptoc


def problem():
    """A ConvResNet of 2 channels on 5 x 4 images, 9 layers (uneven slices), batch 3."""
    net = ptoc.ConvResNet(2, 9, T=2.0, image_shape=(1, 5, 4), n_classes=3, gamma=1e-3,
                          gamma_t=1e-3, gamma_c=1e-3)
    p = net.init_params(4).to_dict()
    rng = np.random.default_rng(11)
    return net, p, rng.random((3, 20)), rng.integers(0, 3, 3)


def solver():
    return ptoc.MGRIT(coarsening=2, max_iterations=3, tol=0)


def results(comm) -> dict[str, np.ndarray]:
    """Loss, gradients, states and adjoints of :func:`problem` on ``comm``."""
    net, p, X, y = problem()
    loss, grads = ptoc.loss_and_grad(net, p, X, y, solver=solver(), comm=comm)
    fwd = ptoc.forward(net, p, X, solver=solver(), comm=comm)
    lam_N = np.ones_like(fwd.final_state)
    adj = ptoc.adjoint(net, p, fwd, lam_N, solver=solver(), comm=comm)
    out = {f"grad_{k}": v for k, v in grads.items()}
    out.update(loss=np.float64(loss), states=fwd.states, lam0=adj.initial_adjoint,
               adj_K=adj.grad_K, adj_b=adj.grad_b)
    return out


def main(argv: list[str]) -> int:
    from ptoc.parallel import MPIRanks

    comm = MPIRanks()
    out = results(comm)
    if comm.rank == 0:
        np.savez(Path(argv[1]) / "conv.npz", **out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
