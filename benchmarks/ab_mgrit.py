#!/usr/bin/env python
"""This checkout's MGRIT driver against the one of another git revision, in one process.

Loads ``ptoc/parallel/mgrit.py`` as it is at ``--against`` under another module name
(the rest of the package is this checkout's: kernels, propagators, level steps), then
times the two ``MGRIT`` solvers in alternation on the problem of ``bench_pymgrit.py``
(d = 16, S = 32, N = 1024, m = 4, FCF, V-cycles, tol 1e-10), after checking that both
give the same bits. Whole-process speed on this machine drifts by several percent over
minutes; alternating in one process is how a change of a few percent can be seen.
A revision whose ``mgrit.py`` needs level-steps methods this checkout lacks cannot be
loaded this way.

Usage::

    python benchmarks/ab_mgrit.py --against HEAD~1                  # forward, two levels
    python benchmarks/ab_mgrit.py --against HEAD~1 --levels 10 --sweep gradient

Nothing is written.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import gc  # noqa: E402
import importlib.util  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import bench_pymgrit as bench  # noqa: E402 - benchmarks/bench_pymgrit.py
import numpy as np  # noqa: E402

import ptoc  # noqa: E402
from ptoc.parallel.driver import parallel_forward, parallel_gradient  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def load_mgrit(revision: str):
    """``ptoc/parallel/mgrit.py`` of ``revision`` as the module ``ptoc.parallel.mgrit_ab``."""
    source = subprocess.check_output(["git", "show", f"{revision}:ptoc/parallel/mgrit.py"],
                                     cwd=ROOT)
    spec = importlib.util.spec_from_loader("ptoc.parallel.mgrit_ab", loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "ptoc.parallel"
    sys.modules[spec.name] = module
    exec(compile(source, f"{revision}:ptoc/parallel/mgrit.py", "exec"), module.__dict__)
    return module


def main(argv=None) -> int:
    import numba

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", required=True, help="git revision to compare with")
    parser.add_argument("--levels", type=int, default=2, help="MGRIT max_levels (default 2)")
    parser.add_argument("--sweep", choices=("forward", "gradient"), default="forward")
    parser.add_argument("--threads", type=int, default=1, help="Numba threads (default 1)")
    parser.add_argument("--repeats", type=int, default=40, help="timed pairs (default 40)")
    args = parser.parse_args(argv)
    if args.levels < 2 or args.threads < 1 or args.repeats < 1:
        parser.error("--levels must be >= 2, --threads and --repeats >= 1")
    numba.set_num_threads(args.threads)
    other = load_mgrit(args.against)
    options = dict(coarsening=bench.COARSENING, max_levels=args.levels, min_coarse_steps=1,
                   relaxation="FCF", cycle="V", tol=bench.TOL)
    solvers = {args.against: other.MGRIT(**options), "this checkout": ptoc.MGRIT(**options)}
    net, params, X0 = bench.make_problem(0)
    if args.sweep == "forward":
        def run(solver):
            return parallel_forward(net, params, X0, solver)[0]
    else:
        net = ptoc.ResNet(width=bench.WIDTH, depth=bench.DEPTH, n_in=bench.WIDTH,
                          n_classes=4)
        params = net.init_params(0)
        rng = np.random.default_rng(0)
        X, y = rng.standard_normal((bench.BATCH, bench.WIDTH)), rng.integers(0, 4, bench.BATCH)

        def run(solver):
            result = parallel_gradient(net, params, X, y, solver)
            return np.concatenate([result.grads[k].ravel() for k in result.grads])
    results = [run(s) for s in solvers.values()]
    same = np.array_equal(results[0], results[1])
    print(f"{args.sweep}, {args.levels} levels max, {args.threads} thread(s): the same bits: "
          f"{same}")
    times: dict[str, list[float]] = {name: [] for name in solvers}
    for _ in range(args.repeats):
        for name, solver in solvers.items():
            gc.collect()
            gc.disable()
            try:
                t0 = time.perf_counter()
                run(solver)
                times[name].append(time.perf_counter() - t0)
            finally:
                gc.enable()
    for name, samples in times.items():
        print(f"{name:>16s}: median {1e3 * np.median(samples):8.3f} ms, "
              f"min {1e3 * np.min(samples):8.3f} ms")
    ratio = np.median(times[args.against]) / np.median(times["this checkout"])
    print(f"{args.against} / this checkout (medians): {ratio:.3f}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
