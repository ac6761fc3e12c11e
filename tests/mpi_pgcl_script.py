"""A few PGCL steps on MPI ranks, for ``tests/test_pgcl.py``.

Run as ``mpiexec -n P python tests/mpi_pgcl_script.py OUT_DIR CONFIG``: every rank
trains the same tiny problem with ``PGCL(comm=MPIRanks(), **CONFIGS[CONFIG])`` and
writes ``OUT_DIR/rank<r>.npz`` (final parameters, per-step losses and records, the
final state dict). The test imports this file to run the very same problem and
options on :class:`ptoc.parallel.SimulatedRanks` and compares.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

import ptoc
from ptoc.optim import SGD, Adam
from ptoc.pgcl import PGCL

#: Options of the runs the test launches (by name).
CONFIGS: dict[str, dict[str, Any]] = {
    "momentum": {"optimizer": SGD(lr=0.2, momentum=0.5)},
    "adam-average-local2": {"optimizer": Adam(lr=0.02), "coarse": "average", "local_steps": 2},
    "serial-start": {"optimizer": SGD(lr=0.2), "cold_start": "serial"},
}
STEPS = 4
INFO_KEYS = ("state_defect", "costate_defect", "steps_total", "steps_critical_path")


def problem(depth: int = 7):
    """A tiny network (``depth`` layers, so that 2 and 3 ranks get uneven chunks) and batch."""
    rng = np.random.default_rng(11)
    net = ptoc.ResNet(width=3, depth=depth, n_in=2, n_classes=3, gamma=1e-2, gamma_t=2e-2,
                      gamma_c=1e-2)
    params = net.init_params(rng, scale=1.2)
    params.b[...] = 0.5 * rng.standard_normal(params.b.shape)
    X = rng.standard_normal((5, 2))
    y = rng.integers(0, 3, 5)
    return net, params, X, y


def run(comm: Any, config: str) -> dict[str, np.ndarray]:
    """Train ``STEPS`` steps; everything the comparison needs, as arrays."""
    net, params, X, y = problem()
    method = PGCL(comm=comm, **CONFIGS[config])
    state = method.init(net, params)
    losses, infos = [], []
    for _ in range(STEPS):
        out = method.step(net, params, state, X, y)
        params, state = out.params, out.state
        losses.append(out.loss)
        infos.append([out.info[k] for k in INFO_KEYS])
    result = {f"param.{k}": v for k, v in params.items()}
    result["losses"] = np.array(losses)
    result["infos"] = np.array(infos, dtype=np.float64)
    result.update({f"state.{k}": np.asarray(v) for k, v in method.state_dict(state).items()})
    return result


def train(comm: Any, out_dir: Path | None) -> ptoc.TrainResult:
    """``ptoc.train`` with PGCL on ``comm``, writing into ``out_dir`` (rank 0 only)."""
    net, params, X, y = problem()
    data = ptoc.data.Dataset(name="tiny", X_train=X, y_train=y, X_val=X[:2], y_val=y[:2],
                             n_classes=net.n_classes)
    return ptoc.train(net, params, data, epochs=3, batch_size=None, progress=False,
                      method=PGCL(comm=comm, optimizer=SGD(lr=0.2)), output_dir=out_dir,
                      checkpoint_every=1)


def main(argv: list[str]) -> int:
    from ptoc.parallel import MPIRanks

    out_dir, config = Path(argv[1]), argv[2]
    comm = MPIRanks()
    if config == "train":
        result = train(comm, out_dir / "run")
        np.savez(out_dir / f"rank{comm.rank}.npz", outputs=np.array(sorted(result.outputs)),
                 **{f"param.{k}": v for k, v in result.params.items()})
        return 0
    result = run(comm, config)
    result["size"] = np.int64(comm.size)
    np.savez(out_dir / f"rank{comm.rank}.npz", **result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
