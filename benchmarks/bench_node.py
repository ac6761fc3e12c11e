#!/usr/bin/env python
"""Parareal neural ODE (Lorin): fixed RK4 fine solver against the order-raising schedule.

The problem: a fixed random network ``x' = tanh(K(t) x + b(t))`` on ``[0, T]`` with
piecewise-constant weights on ``N`` pieces (``ptoc.ResNet(width, N, T)``,
``K_n ~ N(0, 1/d)``, ``b_n ~ N(0, 1/4)``), a batch of ``S`` initial states
``x_0 ~ N(0, 1)``, float64. The reference is the serial RK4 solution with
``--ref-substeps`` steps per piece; the error of an iterate is the max-norm over all
chunk boundaries, samples and features of ``U^k - x_ref``.

Parareal (``ptoc.node.node_solve(..., parareal=NODEParareal(P, ...))``) with ``P``
chunks, ``--substeps`` fine steps per piece and two fine solvers:

* ``rk4``: RK4 at every iteration;
* ``euler>heun>rk4``: Lorin's order-raising schedule, Euler at iteration 1, Heun at 2,
  RK4 from 3 on,

each with both coarse propagators (forward Euler, one step per piece or one step per
chunk). The solve runs to exactness (``tol`` tiny, the default iteration budget) and
keeps every iterate; for each accuracy target the table gives the first iteration
whose error is at most the target and the fine work spent up to it: fine steps and
right-hand-side evaluations (1, 2, 4 per Euler, Heun, RK4 step) over all chunks and
on the critical path (per iteration the largest chunk, summed over the iterations).
A chunk whose input and scheme did not change since its last fine solve is not
solved again (a converged processor idles), as in ``ptoc.node``. The coarse sweeps
and the final fine sweep that produces the full trajectory are not counted. The
serial fine RK4 solve is given for comparison (all its work is on the critical path).

With ``--implicit`` the comparison is that of validation claim 13 on this one problem:
a backward-Euler coarse propagator, the implicit schedules backward Euler > midpoint >
Gauss-2 and backward Euler > SDIRK2 > SDIRK3 against fixed high-order (Gauss-2, SDIRK3)
and low-order (midpoint, SDIRK2) fine solvers, every scheme's steps per piece set by
the accuracy it must deliver (:func:`implicit_case`); the table gives overall time
steps (fine and coarse), linear systems and their cost ``sum n^3`` to each target.

Nothing is timed: the counts are the cost model (parareal is simulated in one
process).

Usage::

    python benchmarks/bench_node.py             # d=8, N=64, T=2, S=32, P=8
    python benchmarks/bench_node.py --quick     # N=32, P=4
    python benchmarks/bench_node.py --T 4 --substeps 4 --targets 1e-6 1e-8
    python benchmarks/bench_node.py --implicit --depth 32 --batch 16 --chunks 4 \
        --targets 1e-3 1e-4 1e-5 1e-6

A JSON record (settings, every error history and cost per iteration, the table) goes to
``benchmarks/out/node_<timestamp>.json`` unless ``--no-json``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import itertools
import json
import platform
import sys
import time
from pathlib import Path

import _machine  # benchmarks/_machine.py
import numpy as np

import ptoc
from ptoc.node import NODECoarse, NODEParareal, Scheme, node_solve

RESULTS = Path(__file__).resolve().parent / "out"
SCHEDULES: dict[str, tuple[Scheme, ...]] = {
    "rk4": (Scheme.RK4,),
    "euler>heun>rk4": (Scheme.EULER, Scheme.HEUN, Scheme.RK4),
}


def problem(width: int, depth: int, T: float, batch: int, seed: int):
    """The network, its parameters and the initial states."""
    net = ptoc.ResNet(width=width, depth=depth, T=T, activation="tanh", n_in=width,
                      n_classes=2, opening="identity")
    rng = np.random.default_rng(seed)
    params = net.init_params(rng)
    params.b[...] = 0.5 * rng.standard_normal(params.b.shape)
    x0 = rng.standard_normal((batch, width))
    return net, params, x0


def run_case(net, params, x0, x_ref, chunks: int, substeps: int, schedule, coarse,
             targets) -> dict:
    """One parareal solve to exactness; error and cumulative cost per iteration."""
    opts = NODEParareal(chunks, schedule=schedule, coarse=coarse, tol=0)
    sol = node_solve(net, params, x0, substeps=substeps, parareal=opts, keep_iterates=True)
    ref = x_ref[sol.bounds]
    errors = [float(np.max(np.abs(U - ref))) for U in sol.iterates]
    cumul = {name: np.concatenate([[0], np.cumsum(getattr(sol, name))]).tolist()
             for name in ("fine_steps", "fine_steps_critical", "rhs_evaluations",
                          "rhs_evaluations_critical")}
    reached = {}
    for eps in targets:
        k = next((i for i, e in enumerate(errors) if e <= eps), None)
        reached[repr(eps)] = None if k is None else {
            "iterations": k, "error": errors[k], **{n: int(c[k]) for n, c in cumul.items()}}
    return {"schedule": [s.value for s in schedule], "coarse": coarse.value,
            "iterations": sol.iterations, "errors": errors,
            "schemes": [s.value for s in sol.schemes], "cumulative": cumul,
            "reached": reached, "record": sol.to_dict()}


# ----------------------------------------------------------------------------------------
# Implicit solvers: steps per piece set by each scheme's accuracy target (claim 13)
# ----------------------------------------------------------------------------------------

S = Scheme
#: Each family: an order-raising schedule and its two fixed baselines.
FAMILIES = {
    "gauss": {"schedule": (S.BACKWARD_EULER, S.MIDPOINT, S.GAUSS2),
              "high": S.GAUSS2, "low": S.MIDPOINT},
    "sdirk": {"schedule": (S.BACKWARD_EULER, S.SDIRK2, S.SDIRK3),
              "high": S.SDIRK3, "low": S.SDIRK2},
}
IMPLICIT_COARSE = S.BACKWARD_EULER
MAX_SUBSTEPS = 256
COST_KEYS = ("steps", "linear_systems", "linear_cost")


class SubstepOracle:
    """``m_s(e)``: the smallest ``m`` in ``1, 2, 4, ..., MAX_SUBSTEPS`` whose serial solve
    with scheme ``s`` has boundary error ``<= e`` (None beyond); the errors are kept."""

    def __init__(self, net, params, x0, ref_at_bounds: np.ndarray, bounds: np.ndarray):
        self.args = (net, params, x0)
        self.ref, self.bounds = ref_at_bounds, bounds
        self.errors: dict[Scheme, dict[int, float]] = {}

    def error(self, s: Scheme, m: int) -> float:
        table = self.errors.setdefault(s, {})
        if m not in table:
            sol = node_solve(*self.args, scheme=s, substeps=m)
            table[m] = float(np.max(np.abs(sol.states[self.bounds * m] - self.ref)))
        return table[m]

    def substeps(self, s: Scheme, e: float) -> int | None:
        m = 1
        while m <= MAX_SUBSTEPS:
            if self.error(s, m) <= e:
                return m
            m *= 2
        return None


def run_implicit(net, params, x0, ref_at_bounds, chunks: int, entries) -> dict:
    """Parareal to exactness with the schedule ``entries`` ((scheme, m) pairs) and the
    backward-Euler coarse propagator per piece; per iterate the error and the cumulative
    work (coarse sweeps and fine sweeps up to it) of each of :data:`COST_KEYS`."""
    opts = NODEParareal(chunks, schedule=entries, coarse=NODECoarse.PIECE,
                        coarse_scheme=IMPLICIT_COARSE, tol=0)
    sol = node_solve(net, params, x0, parareal=opts, keep_iterates=True)
    errors = [float(np.max(np.abs(U - ref_at_bounds))) for U in sol.iterates]
    cumulative = {}
    for key in COST_KEYS:
        per = [getattr(sol.coarse_solves[0], key)] + [
            getattr(f, key) + getattr(c, key)
            for f, c in zip(sol.fine_solves, sol.coarse_solves[1:], strict=True)]
        cumulative[key] = np.cumsum(per).astype(int).tolist()
    return {"entries": [[s.value, m] for s, m in entries], "errors": errors,
            "cumulative": cumulative, "iterations": sol.iterations}


def cost_to(run: dict | None, eps: float, key: str) -> int | None:
    """The cumulative ``key`` work of ``run`` up to its first iterate with error ``<= eps``
    (None when never, or when the run could not be set up)."""
    if run is None:
        return None
    k = next((i for i, e in enumerate(run["errors"]) if e <= eps), None)
    return None if k is None else run["cumulative"][key][k]


def implicit_case(net, params, x0, chunks: int, targets, ref_substeps: int = 64) -> dict:
    """Every family's schedule and fixed baselines for each target ``eps``.

    A fixed solver ``s`` runs ``m_s(eps/2)`` steps per piece; the schedule's scheme ``l``
    of ``L`` runs ``m_{s_l}(e_l)``, ``e_l = e_0^(1 - l/L) (eps/2)^(l/L)``, from the
    coarse sweep's error ``e_0`` down to ``eps/2`` (:class:`SubstepOracle`; a scheme that
    cannot reach its target within ``MAX_SUBSTEPS`` makes that run None).
    """
    reference = node_solve(net, params, x0, scheme="rk4", substeps=ref_substeps)
    bounds = NODEParareal(chunks).chunk_bounds(net.depth)
    ref = reference.states[::ref_substeps][bounds]
    oracle = SubstepOracle(net, params, x0, ref, bounds)
    e0 = run_implicit(net, params, x0, ref, chunks, ((IMPLICIT_COARSE, 1),))["errors"][0]
    runs: dict[str, dict] = {}
    cache: dict[tuple, dict | None] = {}

    def run(entries):
        key = tuple(entries)
        if key not in cache:
            cache[key] = None if any(m is None for _, m in entries) else \
                run_implicit(net, params, x0, ref, chunks, entries)
        return cache[key]

    for eps in targets:
        for fam, spec in FAMILIES.items():
            L = len(spec["schedule"])
            ladder = [e0 ** (1 - l / L) * (eps / 2) ** (l / L) for l in range(1, L + 1)]
            sched = tuple((s, oracle.substeps(s, e))
                          for s, e in zip(spec["schedule"], ladder, strict=True))
            runs[f"{fam} schedule {eps:g}"] = {"ladder": ladder, "run": run(sched)}
            for which in ("high", "low"):
                s = spec[which]
                runs[f"{fam} {which} {eps:g}"] = {
                    "run": run(((s, oracle.substeps(s, eps / 2)),))}
    return {"coarse_error": e0, "runs": runs,
            "serial_errors": {s.value: {str(m): e for m, e in t.items()}
                              for s, t in oracle.errors.items()}}


def implicit_table(case: dict, targets) -> str:
    head = (f"{'configuration':>16} {'target':>7} {'schedule (scheme x steps/piece)':>44} "
            f"{'steps':>6} {'systems':>8} {'sum n^3':>10}")
    lines = [head, "-" * len(head)]
    for eps in targets:
        for fam, which in itertools.product(FAMILIES, ("schedule", "high", "low")):
            r = case["runs"][f"{fam} {which} {eps:g}"]["run"]
            name = f"{fam} {which}"
            if r is None or cost_to(r, eps, "steps") is None:
                lines.append(f"{name:>16} {eps:>7.0e} {'not reached':>44}")
                continue
            entries = " > ".join(f"{s}x{m}" for s, m in r["entries"])
            lines.append(f"{name:>16} {eps:>7.0e} {entries:>44} "
                         + " ".join(f"{cost_to(r, eps, k):>{w}d}"
                                    for k, w in zip(COST_KEYS, (6, 8, 10), strict=True)))
        lines.append("")
    return "\n".join(lines)


def table(cases: list[dict], serial: dict, targets) -> str:
    head = (f"{'coarse':>6} {'fine solver':>15} {'target':>7} {'iters':>5} {'error':>8} "
            f"{'steps':>6} {'steps crit':>10} {'RHS':>6} {'RHS crit':>8}")
    lines = [head, "-" * len(head)]
    for eps in targets:
        for c in cases:
            r = c["reached"][repr(eps)]
            name = ">".join(c["schedule"])
            if r is None:
                lines.append(f"{c['coarse']:>6} {name:>15} {eps:>7.0e} {'not reached':>14}")
                continue
            lines.append(f"{c['coarse']:>6} {name:>15} {eps:>7.0e} {r['iterations']:>5d} "
                         f"{r['error']:>8.1e} {r['fine_steps']:>6d} "
                         f"{r['fine_steps_critical']:>10d} {r['rhs_evaluations']:>6d} "
                         f"{r['rhs_evaluations_critical']:>8d}")
        lines.append("")
    lines.append(f"serial fine RK4 solve (no parareal): error {serial['error']:.1e}, "
                 f"{serial['fine_steps']} steps, {serial['rhs_evaluations']} RHS evaluations, "
                 "all on the critical path")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="N=32 pieces, P=4 chunks")
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--depth", type=int, default=None, help="pieces N (default 64)")
    parser.add_argument("--T", type=float, default=2.0)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--chunks", type=int, default=None, help="P (default 8)")
    parser.add_argument("--substeps", type=int, default=2, help="fine steps per piece")
    parser.add_argument("--ref-substeps", type=int, default=64,
                        help="RK4 steps per piece of the reference solution")
    parser.add_argument("--targets", type=float, nargs="+", default=[1e-6, 1e-8])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--no-json", action="store_true")
    parser.add_argument("--implicit", action="store_true",
                        help="the implicit families of validation claim 13 (no JSON)")
    args = parser.parse_args(argv)
    depth = args.depth or (32 if args.quick else 64)
    chunks = args.chunks or (4 if args.quick else 8)
    targets = sorted(args.targets, reverse=True)
    if args.implicit:
        t0 = time.perf_counter()
        net, params, x0 = problem(args.width, depth, args.T, args.batch, args.seed)
        case = implicit_case(net, params, x0, chunks, targets, args.ref_substeps)
        print(f"# Parareal neural ODE, implicit solvers: d={args.width}, N={depth}, "
              f"T={args.T:g}, tanh, S={args.batch}, P={chunks}, backward-Euler coarse per "
              f"piece; coarse error {case['coarse_error']:.1e}; steps and systems are "
              "fine + coarse over all chunks")
        print(implicit_table(case, targets))
        print(f"({time.perf_counter() - t0:.1f} s)")
        return 0

    t0 = time.perf_counter()
    net, params, x0 = problem(args.width, depth, args.T, args.batch, args.seed)
    reference = node_solve(net, params, x0, scheme="rk4", substeps=args.ref_substeps)
    x_ref = reference.states[:: args.ref_substeps]  # the states at t_n, n = 0..N
    fine = node_solve(net, params, x0, scheme="rk4", substeps=args.substeps)
    serial = {"error": float(np.max(np.abs(fine.states[:: args.substeps] - x_ref))),
              "fine_steps": fine.total_fine_steps,
              "rhs_evaluations": fine.total_rhs_evaluations}
    cases = [run_case(net, params, x0, x_ref, chunks, args.substeps, schedule, coarse, targets)
             for coarse in NODECoarse for schedule in SCHEDULES.values()]
    elapsed = time.perf_counter() - t0

    print(f"# Parareal neural ODE: d={args.width}, N={depth}, T={args.T:g}, tanh, S={args.batch}, "
          f"P={chunks}, {args.substeps} fine steps per piece; error = max over boundaries vs "
          f"RK4 with {args.ref_substeps} steps per piece")
    print(table(cases, serial, targets))
    for c in cases:
        print(f"errors per iteration, coarse={c['coarse']}, {'>'.join(c['schedule'])}: "
              + " ".join(f"{e:.0e}" for e in c["errors"]))
    print(f"({elapsed:.1f} s)")

    if not args.no_json:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        path = args.output or RESULTS / f"node_{stamp}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "benchmark": "parareal neural ODE: fine work to reach an accuracy, fixed RK4 vs "
                         "order-raising schedule",
            "command": " ".join([Path(sys.argv[0]).name]
                                + (argv if argv is not None else sys.argv[1:])),
            "date": _dt.datetime.now().isoformat(timespec="seconds"),
            "git_commit": _machine.git_commit(),
            "machine": {"python": platform.python_version(), "numpy": np.__version__,
                        "platform": platform.platform()},
            "settings": {"width": args.width, "depth": depth, "T": args.T,
                         "batch": args.batch, "chunks": chunks, "substeps": args.substeps,
                         "ref_substeps": args.ref_substeps, "targets": targets,
                         "seed": args.seed, "activation": "tanh", "dtype": "float64"},
            "serial_fine": serial, "cases": cases, "elapsed_s": elapsed,
            "table": table(cases, serial, targets).splitlines(),
        }
        path.write_text(json.dumps(record, indent=1) + "\n")
        print(f"JSON record: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
