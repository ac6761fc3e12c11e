"""Claim 13: an order-raising fine solver in the parareal neural ODE needs fewer overall time
steps, and so fewer linear systems with implicit solvers, for the same accuracy.

Lorin (2020), "Derivation and analysis of parallel-in-time neural ordinary differential
equations" (Ann. Math. Artif. Intell. 88, 1035-1059), abstract: the neural ODE
``x' = sigma(K(t) x + b(t))`` is solved by parareal, and "when using implicit ODE solvers,
solutions to linear systems with up to cubic complexity are then required for solving
nonlinear systems using for instance Newton's algorithm; as the proposed approach allows
to reduce the overall number of time-steps thanks to an iterative increase of the
accuracy order of the ODE system solvers, it then reduces the number of linear systems to
solve". The abstract gives no numbers. docs/theory/node.md for the method; ``ptoc.node``
for the solver (implicit schemes by Newton's method with the exact Jacobian, every linear
system counted).

The quantity is Lorin's: overall time steps and linear systems to reach an accuracy, with
the number of steps of every scheme set by the accuracy it has to deliver. Everything
below was fixed before the full run.

Problem (``benchmarks/bench_node.py``'s): width 8, tanh, ``K_n ~ N(0, 1/d)``,
``b_n ~ N(0, 1/4)``, ``x_0 ~ N(0, 1)``, ``N`` pieces on ``[0, T]``. Parareal with ``P``
chunks; the coarse propagator is one backward-Euler step per piece for every
configuration (an implicit coarse solver, as the claim's setting). The error of an
iterate ``U^k`` is ``max |U^k - x_ref|`` over the chunk boundaries, samples and features,
``x_ref`` the serial RK4 solution with 64 steps per piece. The comparison is
``benchmarks/bench_node.py``'s ``implicit_case`` (``--implicit``), run here over the cases.

Steps per piece follow each scheme's accuracy target. ``m_s(e)`` is the smallest
``m`` in ``1, 2, 4, ..., 256`` whose serial solve with scheme ``s`` has boundary error
``<= e`` (an oracle, computed for every configuration alike and not counted). For a
final target ``eps``:

* a fixed fine solver ``s`` runs ``m_s(eps/2)`` steps per piece at every iteration (half
  the target for the discretisation, half for the parareal iteration);
* an order-raising schedule ``s_1 -> s_2 -> s_3`` runs ``s_l`` with
  ``m_{s_l}(e_l)`` at iteration ``l``, ``e_l = e_0^(1 - l/3) (eps/2)^(l/3)``, geometric
  from the error ``e_0`` of the coarse sweep ``U^0`` down to ``eps/2`` for the last
  scheme, which then runs until the target is met.

Two families, each a schedule and its two named baselines:

* Gauss: schedule backward Euler -> implicit midpoint -> Gauss-2 (orders 1, 2, 4);
  baseline (i) fixed Gauss-2 (the high order), (ii) fixed implicit midpoint (low order,
  run to the same final accuracy);
* SDIRK: schedule backward Euler -> SDIRK2 -> SDIRK3 (orders 1, 2, 3); baseline (i)
  fixed SDIRK3, (ii) fixed SDIRK2.

(Fixed backward Euler is not a baseline: to ``1e-6`` it needs more than 256 steps per
piece.) Each run goes to exactness (``tol`` tiny, the default budget); the cost of a
configuration for ``eps`` is the work up to the first iterate with error ``<= eps``
(coarse sweeps included, the final fine sweep that produces the trajectory not; a run
that never reaches ``eps`` loses):

* **overall time steps**: fine and coarse steps over all chunks (Lorin's quantity);
* **linear systems**: Newton's linear solves, one per sample and update, fine and coarse;
* linear-system cost: ``sum n^3`` over those systems (``n = d`` for backward Euler,
  midpoint, SDIRK stages; ``2d`` for Gauss-2), the cubic cost the abstract refers to.

Verdict rule: the claim holds iff the schedule needs strictly fewer overall time steps
**and** strictly fewer linear systems than **each** baseline of its family in more than
half of the counted (case, target) pairs **of every group** (each ``P`` and each family;
a pair counts when at least one of the two reaches the target). The linear-system cost is
reported with the same tally but does not decide (the abstract claims fewer steps and
systems; the cost is the "scaling effect" that follows). Cases (full): ``N = 32``,
``T`` in {2, 4}, ``P`` in {4, 8}, batch 16, seeds {0, 1}, targets ``1e-3 .. 1e-6``.
Quick: ``N = 16``, ``T = 2``, ``P = 4``, batch 8, seed 0, targets ``1e-3, 1e-5``.

The previous form of this claim (explicit Euler -> Heun -> RK4 against fixed RK4, the
same steps per piece at every iteration, judged on right-hand-side evaluations) failed:
by construction that schedule cannot reduce time steps. Its result is kept in
``details["explicit_schedule_record"]``.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
from _problems import benchmark  # validation/_problems.py

from ptoc.cli.claims import Record, script_main

BENCH = benchmark("bench_node")  # the problem and the implicit comparison live there
FAMILIES = BENCH.FAMILIES

NUMBER = 13
CLAIM = ("parareal neural ODE with an order-raising implicit fine solver (steps per "
         "iteration set by each scheme's accuracy target) needs fewer overall time steps "
         "and fewer linear systems for the same accuracy than a fixed high-order or a "
         "fixed low-order implicit fine solver")
SOURCE = ("Lorin 2020, Derivation and analysis of parallel-in-time neural ordinary "
          "differential equations (Ann. Math. Artif. Intell. 88), abstract; "
          "docs/theory/node.md")

MEASURES = {"overall time steps": "steps", "linear systems": "linear_systems",
            "linear-system cost (sum n^3)": "linear_cost"}
DECIDING = ("overall time steps", "linear systems")
REF_SUBSTEPS = 64

#: The explicit-schedule result of this claim's previous form (full run of that script).
EXPLICIT_RECORD = {
    "setting": "Euler -> Heun -> RK4 vs fixed RK4, same steps per piece at every "
               "iteration, forward-Euler coarse, width 8, N = 64, P in {4, 8, 16}, "
               "T in {2, 4}, 1/2/4 steps per piece, 2 seeds, targets 1e-4, 1e-6, 1e-8",
    "verdict": "fail",
    "total fine RHS evaluations: schedule fewer": "103/204 (75 more, 26 ties), median "
                                                 "ratio 0.99; P = 16: 64/68, P = 4: 9/49",
    "critical-path fine RHS evaluations: schedule fewer": "175/204, median ratio 0.875",
    "total fine steps: schedule fewer": "never (median ratio 1.55)",
}




def _compare(base: int | None, sched: int | None) -> str:
    if base is None and sched is None:
        return "neither"
    if sched is None:
        return "baseline"
    if base is None or sched < base:
        return "schedule"
    return "tie" if sched == base else "baseline"


def _figure(out_dir: Path, cases: list[dict], targets) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = cases[0]
    eps = targets[len(targets) // 2]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7.5), squeeze=False)
    for col, fam in enumerate(FAMILIES):
        for row, key in enumerate(("steps", "linear_systems")):
            ax = axes[row][col]
            for name, style in ((f"{fam} schedule", dict(color="tab:orange", marker="s")),
                                (f"{fam} high", dict(color="k", marker="o")),
                                (f"{fam} low", dict(color="tab:blue", marker="^"))):
                r = c["runs"][f"{name} {eps:g}"]["run"]
                if r is None:
                    continue
                label = f"{name}: " + " > ".join(f"{s}x{m}" for s, m in r["entries"])
                ax.semilogy(r["cumulative"][key], r["errors"], label=label, ms=4, **style)
            ax.axhline(eps, color="grey", ls=":", lw=0.8)
            ax.set_xlabel(f"cumulative {key.replace('_', ' ')} (fine + coarse, all chunks)")
            ax.set_ylabel("max boundary error vs reference")
            ax.set_title(f"{fam}: P={c['chunks']}, T={c['T']:g}, target {eps:g}", fontsize=8)
            ax.legend(fontsize=6)
    fig.tight_layout()
    name = "node_schedule.png"
    fig.savefig(out_dir / name, dpi=110)
    plt.close(fig)
    return name


def run(quick: bool, out_dir: Path) -> Record:
    width = 8
    if quick:
        depth, batch, Ps, Ts, seeds, targets = 16, 8, (4,), (2.0,), (0,), (1e-3, 1e-5)
    else:
        depth, batch, Ps, Ts, seeds = 32, 16, (4, 8), (2.0, 4.0), (0, 1)
        targets = (1e-3, 1e-4, 1e-5, 1e-6)
    cases = []
    for seed, T, P in itertools.product(seeds, Ts, Ps):
        net, params, x0 = BENCH.problem(width, depth, T, batch, seed)
        cases.append({"seed": seed, "T": T, "chunks": P,
                      **BENCH.implicit_case(net, params, x0, P, targets, REF_SUBSTEPS)})

    rows = []
    for c, eps, fam, which in itertools.product(cases, targets, FAMILIES, ("high", "low")):
        sched = c["runs"][f"{fam} schedule {eps:g}"]["run"]
        base = c["runs"][f"{fam} {which} {eps:g}"]["run"]
        row = {"seed": c["seed"], "T": c["T"], "chunks": c["chunks"], "family": fam,
               "baseline": f"{which} ({FAMILIES[fam][which].value})", "target": eps}
        for meas, key in MEASURES.items():
            b, s = BENCH.cost_to(base, eps, key), BENCH.cost_to(sched, eps, key)
            row[meas] = {"schedule": s, "baseline": b, "winner": _compare(b, s)}
        rows.append(row)

    groups = [("chunks", P) for P in Ps] + [("family", f) for f in FAMILIES]
    per_measure = {}
    for meas in MEASURES:
        by = {}
        for which in ("high", "low"):
            sel = [r for r in rows if r["baseline"].startswith(which)]
            tally = {}
            for field, v in groups:
                w = [r[meas]["winner"] for r in sel if r[field] == v]
                g = {k: w.count(k) for k in ("schedule", "baseline", "tie")}
                g["majority"] = g["schedule"] > sum(g.values()) / 2
                tally[f"{field}={v}"] = g
            ratios = [r[meas]["schedule"] / r[meas]["baseline"] for r in sel
                      if r[meas]["baseline"] and r[meas]["schedule"] is not None]
            w = [r[meas]["winner"] for r in sel]
            by[which] = {"schedule": w.count("schedule"), "baseline": w.count("baseline"),
                         "tie": w.count("tie"), "neither": w.count("neither"),
                         "median ratio schedule/baseline":
                             float(np.median(ratios)) if ratios else None,
                         "by_group": tally,
                         "holds": all(g["majority"] for g in tally.values())}
        per_measure[meas] = by
    checks = {f"{meas}: schedule < fixed {which}-order in > 1/2 of the pairs of every P and "
              f"family": per_measure[meas][which]["holds"]
              for meas in DECIDING for which in ("high", "low")}

    def summary(meas, which):
        t = per_measure[meas][which]
        counted = t["schedule"] + t["baseline"] + t["tie"]
        ratio = t["median ratio schedule/baseline"]
        return (f"{t['schedule']}/{counted} fewer, median ratio "
                f"{'n/a' if ratio is None else f'{ratio:.2f}'}")

    our = {f"{meas} vs fixed {which}": summary(meas, which)
           for meas in MEASURES for which in ("high", "low")}
    figures = [_figure(out_dir, cases, targets)]
    return Record.from_checks(
        checks, our_value=our,
        paper_value="fewer overall time steps and so fewer linear systems with the "
                    "order-raising solver (no numbers in the abstract)",
        tolerance=("overall time steps and linear systems (fine + coarse, all chunks) to "
                   "reach max boundary error <= target, steps per piece set by each "
                   "scheme's accuracy target: schedule strictly fewer than each fixed "
                   "baseline in > 1/2 of the (case, target) pairs of every P and family"),
        details={"setting": {"width": width, "depth": depth, "chunks": list(Ps),
                             "batch": batch, "T": list(Ts), "seeds": list(seeds),
                             "targets": list(targets),
                             "coarse": f"{BENCH.IMPLICIT_COARSE.value} per piece",
                             "reference_substeps": REF_SUBSTEPS,
                             "max_substeps": BENCH.MAX_SUBSTEPS,
                             "families": {f: {k: ([s.value for s in v] if k == "schedule"
                                                  else v.value) for k, v in spec.items()}
                                          for f, spec in FAMILIES.items()}},
                 "deciding_measures": list(DECIDING), "per_measure": per_measure,
                 "pairs": rows, "cases": cases,
                 "explicit_schedule_record": EXPLICIT_RECORD},
        figures=figures)


if __name__ == "__main__":
    raise SystemExit(script_main(__name__))
