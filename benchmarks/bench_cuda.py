#!/usr/bin/env python
"""ptoc's CUDA kernels against PyTorch CUDA, for a lent GPU machine.

Two measurements per width ``d`` and batch ``S`` (float64, tanh, depth ``--depth``):

* ``gradient``: the serial gradient's two sweeps, ``forward_sweep`` storing sigma' then
  ``adjoint_sweep`` with the parameter gradient, on device arrays (nothing crosses to
  the host while timed), against PyTorch on the same device, the residual layers
  ``x <- x + h tanh(x K_n^T + b_n)`` and ``x_N.backward(lambda_N)``; the gradients are
  compared (maximum relative difference, printed; the script stops above 1e-8);
* ``forward``: the state sweep, ptoc's serial sweep (``ptoc.forward``), ptoc's MGRIT
  (``parallel_forward`` on one rank, two levels, coarsening 4, tolerance 1e-10; host
  arrays in and out, its own setup included) and PyTorch's forward under ``no_grad``.

Each implementation runs once untimed (compilation, PyTorch's warm-up), then all are
timed in ``--repeat`` interleaved rounds (fewer once a measurement has taken
``--budget`` seconds) with a device synchronisation before the clock stops; medians
are printed with the ratios PyTorch/ptoc (above 1: ptoc is faster). Writes
``benchmarks/out/cuda_<timestamp>.json`` (machine, settings, every sample) unless
``--no-json``.

Without a GPU the script says so and stops; on Numba's CUDA simulator
(``NUMBA_ENABLE_CUDASIM=1``, with ``--quick``: tiny shapes) it runs ptoc's side only, to
check that the script works before a device session::

    python benchmarks/bench_cuda.py                                  # d 64..512, S 1e4, 1e5
    python benchmarks/bench_cuda.py --widths 64 512 --batches 10000 --depth 32
    NUMBA_ENABLE_CUDASIM=1 python benchmarks/bench_cuda.py --quick --no-json
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import sys
import time
from pathlib import Path

import _machine
import numpy as np

import ptoc
from ptoc import _config
from ptoc.parallel.driver import parallel_forward

try:
    import torch
    import torch.nn.functional as F  # noqa: N812
except ImportError:
    torch = None

RESULTS = Path(__file__).resolve().parent / "out"
TANH = ptoc.Activation.TANH.code


def _torch_device():
    """PyTorch's CUDA device, or None (no torch, no GPU, or Numba's simulator)."""
    if torch is None or os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return None
    return torch.device("cuda") if torch.cuda.is_available() else None


def _problem(d: int, S: int, N: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((S, d)), rng.standard_normal((N, d, d)) / np.sqrt(d),
            0.1 * rng.standard_normal((N, d)), rng.standard_normal((S, d)))


def gradient_runners(d: int, S: int, N: int) -> tuple[dict, dict]:
    """``(runners, gradient getters)`` of the two sweeps on the device."""
    from numba import cuda

    from ptoc.kernels import cuda as kern

    X, K, b, lam = _problem(d, S, N)
    h = 1.0 / N
    dX, dK, db, dlam = (cuda.to_device(a) for a in (X, K, b, lam))
    states = cuda.device_array((N + 1, S, d))
    dsig = cuda.device_array((N, S, d))
    gK, gb = cuda.device_array((N, d, d)), cuda.device_array((N, d))
    zeros_K, zeros_b = cuda.to_device(np.zeros((N, d, d))), cuda.to_device(np.zeros((N, d)))

    def ptoc_run():
        states[0].copy_to_device(dX)
        gK.copy_to_device(zeros_K)
        gb.copy_to_device(zeros_b)
        kern.forward_sweep(states, dK, db, h, TANH, dsig, _config.CHUNK)
        kern.adjoint_sweep(states, dlam, dK, db, h, TANH, dsig, gK, gb, None, _config.CHUNK)
        cuda.synchronize()

    runners = {"ptoc": ptoc_run}
    grads = {"ptoc": lambda: (gK.copy_to_host(), gb.copy_to_host())}
    dev = _torch_device()
    if dev is not None:
        Ks = [torch.tensor(K[n], device=dev, requires_grad=True) for n in range(N)]
        bs = [torch.tensor(b[n], device=dev, requires_grad=True) for n in range(N)]
        tX, tlam = torch.tensor(X, device=dev), torch.tensor(lam, device=dev)

        def torch_run():
            for t in Ks + bs:
                t.grad = None
            x = tX
            for n in range(N):
                x = x + h * torch.tanh(F.linear(x, Ks[n], bs[n]))
            x.backward(tlam)
            torch.cuda.synchronize()

        runners["torch"] = torch_run
        grads["torch"] = lambda: (np.stack([t.grad.cpu().numpy() for t in Ks]),
                                  np.stack([t.grad.cpu().numpy() for t in bs]))
    return runners, grads


def forward_runners(d: int, S: int, N: int) -> dict:
    """The state sweep: ptoc serial (cuda), ptoc MGRIT (cuda), PyTorch (no_grad)."""
    from numba import cuda

    X, K, b, _ = _problem(d, S, N)
    net = ptoc.ResNet(width=d, depth=N, T=1.0, activation="tanh", n_in=d, n_classes=2,
                      opening="identity", gamma=0.0, gamma_t=0.0, gamma_c=0.0)
    params = ptoc.Params(K=K, b=b, K_in=None, b_in=None, W=np.zeros((2, d)), mu=np.zeros(2))
    solver = ptoc.MGRIT(max_levels=2, coarsening=4, tol=1e-10)

    def serial():
        ptoc.forward(net, params, X, target="cuda", store_derivatives=False)
        cuda.synchronize()

    def mgrit():
        parallel_forward(net, params, X, solver, target="cuda")
        cuda.synchronize()

    runners = {"ptoc serial": serial, "ptoc MGRIT": mgrit}
    dev = _torch_device()
    if dev is not None:
        tK, tb = torch.tensor(K, device=dev), torch.tensor(b, device=dev)
        tX = torch.tensor(X, device=dev)

        def torch_run():
            with torch.no_grad():
                x = tX
                for n in range(N):
                    x = x + (1.0 / N) * torch.tanh(F.linear(x, tK[n], tb[n]))
            torch.cuda.synchronize()

        runners["torch"] = torch_run
    return runners


def timed(runners: dict, repeat: int, budget: float) -> dict:
    """Interleaved rounds after one untimed call each, ``repeat`` of them or fewer once
    ``budget`` seconds are spent (at least one); the samples in seconds."""
    start = time.perf_counter()
    for run in runners.values():
        run()
    samples = {name: [] for name in runners}
    for _ in range(repeat):
        for name, run in runners.items():
            t0 = time.perf_counter()
            run()
            samples[name].append(time.perf_counter() - t0)
        if time.perf_counter() - start > budget:
            break
    return samples


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256, 512])
    parser.add_argument("--batches", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--budget", type=float, default=60.0,
                        help="seconds per measurement of a cell before it stops repeating")
    parser.add_argument("--quick", action="store_true",
                        help="d = 8, S = 64, N = 8, 2 rounds (a check of the script)")
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--no-json", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.widths, args.batches, args.depth, args.repeat = [8], [64], 8, 2
    try:
        from numba import cuda
        available = cuda.is_available()
    except ImportError:
        available = False
    if not available:
        print("no CUDA device (and no NUMBA_ENABLE_CUDASIM=1): nothing to measure")
        return 2
    if _torch_device() is None:
        print("Note: PyTorch CUDA is not available here; only ptoc is timed.")
    cells = []
    for d in args.widths:
        for S in args.batches:
            N = args.depth
            cell = {"d": d, "S": S, "N": N}
            runners, grads = gradient_runners(d, S, N)
            cell["gradient"] = timed(runners, args.repeat, args.budget)
            if "torch" in grads:
                (pK, pb), (tK, tb) = grads["ptoc"](), grads["torch"]()
                cell["max_rel_diff"] = max(_rel(pK, tK), _rel(pb, tb))
                if cell["max_rel_diff"] > 1e-8:
                    print(f"d={d} S={S}: gradients differ from PyTorch's by "
                          f"{cell['max_rel_diff']:.1e}", file=sys.stderr)
                    return 1
            cell["forward"] = timed(forward_runners(d, S, N), args.repeat, args.budget)
            cells.append(cell)
            line = [f"d={d:4d} S={S:7d} N={N}:"]
            for part in ("gradient", "forward"):
                med = {k: statistics.median(v) for k, v in cell[part].items()}
                line.append(part + " " + ", ".join(f"{k} {1e3 * t:.2f} ms"
                                                    for k, t in med.items()))
                for k, t in med.items():
                    if k != "torch" and "torch" in med:
                        line.append(f"torch/{k} {med['torch'] / t:.2f}x")
            print("  ".join(line), flush=True)
    if not args.no_json:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        path = args.output or RESULTS / f"cuda_{stamp}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {"benchmark": "ptoc CUDA kernels vs PyTorch CUDA",
                  "command": " ".join([Path(sys.argv[0]).name]
                                      + (list(argv) if argv is not None else sys.argv[1:])),
                  "date": _dt.datetime.now().isoformat(timespec="seconds"),
                  "machine": _machine.machine_info(),
                  "gpu": (torch.cuda.get_device_name(0) if _torch_device() is not None
                          else None),
                  "settings": {"depth": args.depth, "repeat": args.repeat,
                               "budget_s": args.budget,
                               "dtype": "float64", "activation": "tanh",
                               "mgrit": "two levels, coarsening 4, tol 1e-10"},
                  "cells": cells}
        path.write_text(json.dumps(record, indent=1) + "\n")
        print(f"JSON record: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
