#!/usr/bin/env python
"""Cold start: wall time of a first run (empty Numba cache) against a warm one.

Each command runs in a subprocess with ``NUMBA_CACHE_DIR`` set to a fresh, empty
temporary folder (the cold run, which compiles the kernels), then once more with the
same folder (the warm run, which loads them). The cold minus the warm time is what the
first run spends compiling. Commands (``--commands`` picks some):

* ``train``: ``ptoc train --epochs 1 --quiet`` (Peaks, the default network);
* ``solve``: ``ptoc solve`` (the default MGRIT gradient problem, one process);
* ``solve-mpi``: ``mpiexec -n 2 ptoc solve`` with ``OPENBLAS_NUM_THREADS=1
  NUMBA_NUM_THREADS=1``, as the MPI tests run it;
* ``loss_and_grad``: one ``ptoc.loss_and_grad`` of a width-8, depth-32 ResNet on
  50 Peaks samples, in ``python -c``.

The ptoc imported is the one of this checkout (``PYTHONPATH`` is set to it). Usage::

    python benchmarks/bench_cold_start.py                    # all four, median of 2
    python benchmarks/bench_cold_start.py --commands train --repeat 3

Writes ``benchmarks/out/cold_start_<timestamp>.json`` unless ``--no-json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _machine

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "out"

_LOSS_AND_GRAD = (
    "import ptoc; data = ptoc.data.peaks(seed=0); "
    "net = ptoc.ResNet(width=8, depth=32, n_in=2, n_classes=5); "
    "p = net.init_params(seed=0); "
    "print(ptoc.loss_and_grad(net, p, data.X_train[:50], data.y_train[:50])[0])"
)


def command(name: str, work: Path) -> tuple[list[str], dict[str, str]]:
    """The argument list and extra environment of benchmark command ``name``; ``work`` is
    a fresh folder for its outputs."""
    python = [sys.executable, "-m", "ptoc"]
    if name == "train":
        return [*python, "train", "--epochs", "1", "--quiet", "--output", str(work / "run")], {}
    if name == "solve":
        return [*python, "solve"], {}
    if name == "solve-mpi":
        mpiexec = shutil.which("mpiexec")
        if mpiexec is None:
            raise SystemExit("bench_cold_start: mpiexec not found (pip install 'ptoc[test]')")
        return [mpiexec, "-n", "2", *python, "solve"], {
            "OPENBLAS_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    if name == "loss_and_grad":
        return [sys.executable, "-c", _LOSS_AND_GRAD], {}
    raise ValueError(f"unknown command {name!r}")


COMMANDS = ("train", "solve", "solve-mpi", "loss_and_grad")


def timed_run(name: str, cache: Path, timeout: float) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user and system, of the run and every process it
    started, helpers included) of one run of ``name`` with Numba's cache in ``cache``.
    The CPU time hardly depends on what else the machine runs; the wall time does."""
    with tempfile.TemporaryDirectory(prefix="ptoc-cold-work-") as work:
        argv, extra = command(name, Path(work))
        env = os.environ | extra | {"NUMBA_CACHE_DIR": str(cache), "PTOC_CACHE": "1",
                                    "PYTHONPATH": str(ROOT)}
        env.pop("NUMBA_ENABLE_CUDASIM", None)
        cpu0 = _children_cpu()
        t0 = time.perf_counter()
        out = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True,
                             timeout=timeout, check=False)
        wall = time.perf_counter() - t0
        cpu = _children_cpu() - cpu0
    if out.returncode != 0:
        raise SystemExit(f"bench_cold_start: {name} failed (exit {out.returncode}):\n"
                         f"{out.stderr[-2000:]}")
    return wall, cpu


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--commands", nargs="+", choices=COMMANDS, default=list(COMMANDS))
    ap.add_argument("--repeat", type=int, default=2,
                    help="cold/warm pairs per command, each with a fresh cache; the median "
                         "is reported (default: 2)")
    ap.add_argument("--timeout", type=float, default=600.0,
                    help="seconds after which one run counts as hung (default: 600)")
    ap.add_argument("--no-json", action="store_true")
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")

    rows = []
    print("| command | cold (s) | warm (s) | compiling (s) | cold CPU (s) | warm CPU (s) | "
          "cold runs (s) |")
    print("|---|---|---|---|---|---|---|")
    for name in args.commands:
        cold, warm = [], []
        for _ in range(args.repeat):
            with tempfile.TemporaryDirectory(prefix="ptoc-cold-cache-") as cache:
                cold.append(timed_run(name, Path(cache), args.timeout))
                warm.append(timed_run(name, Path(cache), args.timeout))
        c, w = (statistics.median(t[0] for t in runs) for runs in (cold, warm))
        c_cpu, w_cpu = (statistics.median(t[1] for t in runs) for runs in (cold, warm))
        rows.append({"command": name, "argv": command(name, Path("OUT"))[0][1:],
                     "cold_wall_s": [t[0] for t in cold], "warm_wall_s": [t[0] for t in warm],
                     "cold_cpu_s": [t[1] for t in cold], "warm_cpu_s": [t[1] for t in warm],
                     "cold_median_s": c, "warm_median_s": w, "cold_cpu_median_s": c_cpu,
                     "warm_cpu_median_s": w_cpu})
        print(f"| {name} | {c:.1f} | {w:.1f} | {c - w:.1f} | {c_cpu:.1f} | {w_cpu:.1f} | "
              f"{' '.join(f'{t[0]:.1f}' for t in cold)} |", flush=True)
    if not args.no_json:
        RESULTS.mkdir(exist_ok=True)
        path = RESULTS / f"cold_start_{time.strftime('%Y%m%d-%H%M%S')}.json"
        path.write_text(json.dumps({
            "benchmark": "cold start: first run (empty Numba cache) against a warm run",
            "command": " ".join(["bench_cold_start.py", *(argv or sys.argv[1:])]),
            "settings": vars(args), "machine": _machine.machine_info(),
            "load_average": os.getloadavg(), "rows": rows}, indent=1) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
