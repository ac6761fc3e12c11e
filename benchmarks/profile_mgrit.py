#!/usr/bin/env python
"""Where one MGRIT solve of the PyMGRIT benchmark spends its time, phase by phase.

The problem and solver settings are those of ``bench_pymgrit.py`` (d = 16, S = 32,
N = 1024, tanh, m = 4, FCF, V-cycles, tol 1e-10). Each phase of
:class:`ptoc.parallel.mgrit.MGRITSolve` (relaxations, restriction, correction, the
batched level kernels) is wrapped with a timer; the table gives the median over the
runs of the milliseconds per solve, the calls per solve and, for the kernels, the
microseconds per layer step. Phases nest (``_restrict`` contains ``points_residual``
and ``points_tau``), so the column does not add up; ``solve`` is the whole iteration
and ``total`` the whole call of ``parallel_forward`` (setup and the copy of the states
included).

It answers: how far is a solve from (layer steps) x (cost of one step), and what is
the rest. A first set of solves, timed with only the compiled kernels wrapped (about
0.3 us a call), splits a solve into the time inside the compiled kernels and the time
outside them (the orchestration in Python, the wrappers' checks, the setup) and lists
the largest gaps between two compiled calls. Usage::

    python benchmarks/profile_mgrit.py                       # two-level, all cores
    python benchmarks/profile_mgrit.py --levels 10 --threads 1

Nothing is written; the timers add about 1 us per wrapped call.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import collections  # noqa: E402
import time  # noqa: E402

import bench_pymgrit as bench  # noqa: E402 - benchmarks/bench_pymgrit.py
import numpy as np  # noqa: E402

import ptoc  # noqa: E402
from ptoc import propagator as _propagator  # noqa: E402
from ptoc.parallel import mgrit as _mgrit  # noqa: E402
from ptoc.parallel.driver import parallel_forward  # noqa: E402

PHASES = ("solve", "_f_relax", "_c_relax", "_c_relax_with_residual", "_restrict", "_correct",
          "_f_relax_and_restrict", "_correct_and_f_relax", "_correct_relax_with_residual")
KERNELS = ("runs", "points_apply", "points_residual", "points_tau", "runs_then_residuals",
           "correct_then_runs")


def _run_steps(starts, ends) -> int:
    return int(np.sum(np.asarray(ends) - np.asarray(starts) + 1))


def _instrument(times: dict, calls: collections.Counter, steps: collections.Counter) -> None:
    """Wrap the phases and kernels with timers that add into ``times``/``calls``."""
    def wrap(cls, name, is_kernel):
        original = getattr(cls, name)

        def timed(self, *args, **kwargs):
            if is_kernel:
                key = f"{name} (level {self.plan.level})"
                if name == "runs":
                    n = _run_steps(args[2], args[3])
                elif name == "runs_then_residuals":  # (u, g, starts, ends, positions, ...)
                    n = _run_steps(args[2], args[3]) + len(args[4])
                elif name == "correct_then_runs":  # (u, g, positions, uc, v, rows, starts,
                    # ends, before): the C-relaxation's steps with before
                    before = args[8] if len(args) > 8 else kwargs.get("before")
                    n = _run_steps(args[6], args[7]) + (len(args[2]) if before is not None
                                                        else 0)
                else:  # the positions: points_apply(u, p), points_residual(u, g, p, ...),
                    # points_tau(u, p, ...)
                    n = len(args[2] if name == "points_residual" else args[1])
                steps[key] += n
            else:
                key = name
            t0 = time.perf_counter()
            out = original(self, *args, **kwargs)
            times[key] = times.get(key, 0.0) + time.perf_counter() - t0
            calls[key] += 1
            return out
        setattr(cls, name, timed)

    for name in PHASES:
        wrap(_mgrit.MGRITSolve, name, False)
    for name in KERNELS:
        wrap(_propagator.ResNetLevelSteps, name, True)


def _time_compiled(calls: list) -> None:
    """Append ``(name, start, end)`` to ``calls`` for every call of a compiled level or
    row kernel (the functions that the wrappers of ``ptoc.kernels.cpu`` and
    ``ptoc.kernels.rows`` call): the rest of a solve is Python (orchestration, setup,
    the wrappers' checks) and NumPy."""
    from ptoc.kernels import cpu, rows

    def wrap(module, name):
        kernel = getattr(module, name)

        def timed(*args):
            t0 = time.perf_counter()
            out = kernel(*args)
            calls.append((name, t0, time.perf_counter()))
            return out
        setattr(module, name, timed)

    for name in dir(cpu):
        if name.endswith(("_one_thread", "_parallel")) and hasattr(getattr(cpu, name), "py_func"):
            wrap(cpu, name)
    for name in dir(rows):
        if name.startswith("_") and hasattr(getattr(rows, name), "py_func"):
            wrap(rows, name)


def _gaps(calls: list, start: float, end: float) -> dict:
    """The time between consecutive compiled calls of one solve, by the pair of kernels
    around it (``"(call)"`` before the first, ``"(return)"`` after the last):
    ``{(before, after): [seconds, ...]}``."""
    out = collections.defaultdict(list)
    prev_name, prev_end = "(call)", start
    for name, t0, t1 in calls:
        out[(prev_name, name)].append(t0 - prev_end)
        prev_name, prev_end = name, t1
    out[(prev_name, "(return)")].append(end - prev_end)
    return out


def main(argv=None) -> int:
    import numba

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", type=int, default=2, help="MGRIT max_levels (default 2)")
    parser.add_argument("--threads", type=int, default=numba.config.NUMBA_NUM_THREADS,
                        help="Numba threads (default: all cores)")
    parser.add_argument("--repeats", type=int, default=30, help="timed solves (default 30)")
    parser.add_argument("--cold", action="store_true",
                        help="evict the caches before each solve (write 64 MiB), as the other "
                             "implementations between two ptoc solves of bench_pymgrit.py do")
    args = parser.parse_args(argv)
    if args.levels < 2 or args.threads < 1 or args.repeats < 1:
        parser.error("--levels must be >= 2, --threads and --repeats >= 1")
    numba.set_num_threads(args.threads)
    net, params, X0 = bench.make_problem(0)
    solver = ptoc.MGRIT(coarsening=bench.COARSENING, max_levels=args.levels, min_coarse_steps=1,
                        relaxation="FCF", cycle="V", tol=bench.TOL, coarse_weights="inject",
                        nested_iteration=False)
    for _ in range(3):  # compile and warm the caches
        parallel_forward(net, params, X0, solver)
    flush = np.zeros(8 << 20) if args.cold else None
    # first the split inside / outside the compiled kernels, with no other timer on
    _time_compiled(compiled := [])
    split, gaps = [], collections.defaultdict(list)
    for _ in range(args.repeats):
        if flush is not None:
            flush += 1.0
        compiled.clear()
        t0 = time.perf_counter()
        parallel_forward(net, params, X0, solver)
        t1 = time.perf_counter()
        split.append((t1 - t0, sum(b - a for _, a, b in compiled)))
        for pair, seconds in _gaps(compiled, t0, t1).items():
            gaps[pair] += seconds
    _instrument(times := {}, calls := collections.Counter(), steps := collections.Counter())
    per_run: dict[str, list[float]] = collections.defaultdict(list)
    totals = []
    for _ in range(args.repeats):
        if flush is not None:
            flush += 1.0
        times.clear()
        t0 = time.perf_counter()
        _, record = parallel_forward(net, params, X0, solver)
        totals.append(time.perf_counter() - t0)
        for k, v in times.items():
            per_run[k].append(v)
    R = args.repeats
    print(f"MGRIT, {args.levels} levels max, N = {bench.DEPTH}, d = {bench.WIDTH}, "
          f"S = {bench.BATCH}, {args.threads} thread(s): {record.iterations} iterations, "
          f"{record.steps_total} layer steps")
    whole, inside = np.median(split, axis=0)
    outside = np.median([t - c for t, c in split])
    print(f"without phase timers: {1e3 * whole:.3f} ms a solve, {1e3 * inside:.3f} inside the "
          f"compiled kernels, {1e3 * outside:.3f} outside them (Python, NumPy, setup)")
    print("the largest gaps between compiled calls (ms per solve, times per solve, median "
          "us each):")
    for (before, after), seconds in sorted(gaps.items(), key=lambda kv: -sum(kv[1]))[:8]:
        print(f"  {1e3 * sum(seconds) / args.repeats:7.3f} {len(seconds) / args.repeats:4.0f}x "
              f"{1e6 * np.median(seconds):8.1f}  {before} -> {after}")
    print(f"{'phase':32s} {'ms/solve':>9s} {'calls':>6s} {'us/step':>8s}")
    print(f"{'total (parallel_forward)':32s} {1e3 * np.median(totals):9.3f}")
    for k in sorted(per_run, key=lambda k: -np.median(per_run[k])):
        med = np.median(per_run[k])
        us = f"{1e6 * med / (steps[k] / R):8.3f}" if steps[k] else ""
        print(f"{k:32s} {1e3 * med:9.3f} {calls[k] / R:6.0f} {us}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
