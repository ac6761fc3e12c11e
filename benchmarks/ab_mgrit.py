#!/usr/bin/env python
"""This checkout's MGRIT against the one of another git revision, in one process.

Loads ``ptoc/parallel/mgrit.py`` as it is at ``--against`` under another module name
(the rest of the package is this checkout's: kernels, propagators, level steps), or,
with ``--package``, the whole ``ptoc`` package of that revision as ``ptoc_ab`` (its
kernels too, compiled into a cache of their own on first use), then times the two
solves in alternation on the problem of ``bench_pymgrit.py`` (d = 16, S = 32,
N = 1024, m = 4, FCF, V-cycles, tol 1e-10), after comparing their results.
Whole-process speed on this machine drifts by several percent over minutes;
alternating in one process is how a change of a few percent can be seen. A revision
whose ``mgrit.py`` needs level-steps methods this checkout lacks cannot be loaded
without ``--package``.

Usage::

    python benchmarks/ab_mgrit.py --against HEAD~1                  # forward, two levels
    python benchmarks/ab_mgrit.py --against HEAD~1 --levels 10 --sweep gradient
    python benchmarks/ab_mgrit.py --against HEAD~1 --package        # kernels changed too

Nothing is written but, with ``--package``, the exported package and its compiled
kernels under ``$TMPDIR/ptoc-ab/<commit>`` (about 2 MB and 30 MB; delete at will).
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import gc  # noqa: E402
import importlib.util  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tarfile  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import bench_pymgrit as bench  # noqa: E402 - benchmarks/bench_pymgrit.py
import numpy as np  # noqa: E402

import ptoc  # noqa: E402
from ptoc.parallel import driver as this_driver  # noqa: E402

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


def load_package(revision: str):
    """The ``ptoc`` package of ``revision``, exported and imported as ``ptoc_ab``."""
    commit = subprocess.check_output(["git", "rev-parse", "--verify", f"{revision}^{{commit}}"],
                                     cwd=ROOT, text=True).strip()
    home = Path(tempfile.gettempdir()) / "ptoc-ab" / commit
    package = home / "ptoc_ab"
    if not package.is_dir():
        archive = home / "ptoc.tar"
        home.mkdir(parents=True, exist_ok=True)
        with open(archive, "wb") as f:
            subprocess.run(["git", "archive", commit, "ptoc"], cwd=ROOT, stdout=f, check=True)
        staging = Path(tempfile.mkdtemp(dir=home))
        with tarfile.open(archive) as tar:
            tar.extractall(staging, filter="data")
        for path in (staging / "ptoc").rglob("*.py"):
            text = path.read_text()
            text = re.sub(r"\bfrom ptoc\b", "from ptoc_ab", text)
            text = re.sub(r"\bimport ptoc\b", "import ptoc_ab as ptoc", text)
            path.write_text(text.replace('"ptoc.', '"ptoc_ab.'))
        (staging / "ptoc").rename(package)
        archive.unlink()
    sys.path.insert(0, str(home))
    import ptoc_ab
    return ptoc_ab


def main(argv=None) -> int:
    import numba

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", required=True, help="git revision to compare with")
    parser.add_argument("--levels", type=int, default=2, help="MGRIT max_levels (default 2)")
    parser.add_argument("--sweep", choices=("forward", "gradient"), default="forward")
    parser.add_argument("--threads", type=int, default=1, help="Numba threads (default 1)")
    parser.add_argument("--repeats", type=int, default=40, help="timed pairs (default 40)")
    parser.add_argument("--package", action="store_true",
                        help="load the revision's whole package (kernels included), not only "
                             "its mgrit.py; its results may then differ in round-off")
    args = parser.parse_args(argv)
    if args.levels < 2 or args.threads < 1 or args.repeats < 1:
        parser.error("--levels must be >= 2, --threads and --repeats >= 1")
    numba.set_num_threads(args.threads)
    options = dict(coarsening=bench.COARSENING, max_levels=args.levels, min_coarse_steps=1,
                   relaxation="FCF", cycle="V", tol=bench.TOL)
    if args.package:
        other = load_package(args.against)
        from ptoc_ab.parallel import driver as other_driver
    else:
        other, other_driver = load_mgrit(args.against), None
    this = (ptoc, this_driver)
    that = (other if args.package else ptoc, other_driver or this_driver)
    solvers = {args.against: (that, other.MGRIT(**options)),
               "this checkout": (this, ptoc.MGRIT(**options))}
    _, params0, X0 = bench.make_problem(0)
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((bench.BATCH, bench.WIDTH)), rng.integers(0, 4, bench.BATCH)

    def make_run(package, driver, solver):
        forward, gradient = driver.parallel_forward, driver.parallel_gradient
        if args.sweep == "forward":
            net = package.ResNet(width=bench.WIDTH, depth=bench.DEPTH, T=bench.T_FINAL,
                                 activation="tanh", n_in=bench.WIDTH, n_classes=2,
                                 opening="identity", gamma=0.0, gamma_t=0.0, gamma_c=0.0)
            params = package.Params(K=params0.K, b=params0.b, K_in=None, b_in=None,
                                    W=params0.W, mu=params0.mu)
            return lambda: np.asarray(forward(net, params, X0, solver)[0])
        net = package.ResNet(width=bench.WIDTH, depth=bench.DEPTH, n_in=bench.WIDTH,
                             n_classes=4)
        params = net.init_params(0)

        def run():
            result = gradient(net, params, X, y, solver)
            return np.concatenate([result.grads[k].ravel() for k in result.grads])
        return run

    runs = {name: make_run(pkg[0], pkg[1], solver) for name, (pkg, solver) in solvers.items()}
    results = [run() for run in runs.values()]
    same = np.array_equal(results[0], results[1])
    diff = float(np.max(np.abs(results[0] - results[1])) / np.max(np.abs(results[1])))
    print(f"{args.sweep}, {args.levels} levels max, {args.threads} thread(s): the same bits: "
          f"{same} (largest difference {diff:.1e} of the largest entry)")
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            gc.collect()
            gc.disable()
            try:
                t0 = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - t0)
            finally:
                gc.enable()
    for name, samples in times.items():
        print(f"{name:>16s}: median {1e3 * np.median(samples):8.3f} ms, "
              f"min {1e3 * np.min(samples):8.3f} ms")
    ratio = np.median(times[args.against]) / np.median(times["this checkout"])
    print(f"{args.against} / this checkout (medians): {ratio:.3f}")
    return 0 if same or args.package else 1


if __name__ == "__main__":
    raise SystemExit(main())
