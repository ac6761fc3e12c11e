"""Claim 8: ptoc's MGRIT takes the same iterations as PyMGRIT on the same problem.

Source: the MGRIT algorithm of Falgout, Friedhoff, Kolev, MacLachlan & Schroder (2014)
as used for ResNets by Günther et al. (2020), whose conventions ptoc follows (those of
PyMGRIT 1.0.6: only the first finest-level iteration starts with an F-relaxation, the
residual is the 2-norm over the finest C-points of ``Phi(u_{i-1}) - u_i``);
docs/theory/mgrit.md; the comparison is that of docs/benchmarks.md
(``benchmarks/bench_pymgrit.py``).

The problem (the solver benchmark of docs/benchmarks.md): the forward sweep
``X_{n+1} = X_n + h tanh(X_n K_n^T + b_n)`` of width 16 and batch 32, T = 1 (h = 1/N),
``K_n ~ N(0, 1/16)``, ``b_n ~ N(0, 1)``, ``X_0 ~ N(0, 1)``, float64, drawn from
``numpy.random.default_rng(seed)`` in the order K, b, (classifier weights, unused), X_0:
the problem of ``ptoc solve --seed``. Both libraries run MGRIT with coarsening m = 4,
FCF relaxation, V-cycles, no nested iteration, zero initial guess, the coarse step of a
level taking the weights of the fine layer at its start time (ptoc's
``coarse_weights="inject"``), and stop when the absolute residual is at most 1e-10. Two
hierarchies: two levels (PyMGRIT ``level=2``, ptoc ``max_levels=2``) and as many as fit
(coarsening down to 2 points; PyMGRIT ``level`` = the number of ptoc's levels with
``min_coarse_steps=1``). PyMGRIT side: an ``Application`` whose step from ``t_start`` to
``t_stop`` is ``u + (t_stop - t_start) tanh(u K_n^T + b_n)``,
``n = round(t_start / h)``, set up by ``simple_setup_problem``.

Holds when, for every case, the iteration counts differ by at most one (the
benchmark's criterion) and the residual histories agree iteration by iteration:
``|r_ptoc - r_PyMGRIT| <= 1e-6 r_PyMGRIT + 1e-13`` (the same iteration done with a
different order of floating-point operations; 1e-13 is the round-off level of a
residual summed over all C-points of states of size one). Full mode: N = 1024 (the
benchmark's depth) for seeds 0, 1, 2, and N = 4096 for seed 0; quick mode: N = 256, seed 0.

PyMGRIT is an optional dependency (the ``bench`` extra: ``pip install '.[bench]'``); without it the
claim is reported as skipped. PyMGRIT 1.0.6 calls ``np.in1d``, removed in NumPy 2.4,
so it is aliased to ``np.isin`` (the same on PyMGRIT's 1-D time grids) before import.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from _problems import benchmark  # validation/_problems.py

import ptoc
from ptoc.cli.claims import Record, Verdict, script_main
from ptoc.parallel import mgrit_levels, parallel_forward

NUMBER = 8
CLAIM = ("ptoc's MGRIT takes the same number of iterations as PyMGRIT on the same problem "
         "(two-level and max-level, m = 4, FCF, tol 1e-10), with the same residual history")
SOURCE = ("Falgout et al. 2014 / Günther et al. 2020, MGRIT as implemented by PyMGRIT "
          "1.0.6; docs/theory/mgrit.md; the comparison of docs/benchmarks.md")

M, TOL = 4, 1e-10  # the benchmark's COARSENING and TOL (checked in run)
ITER_TOL = 1  # the benchmark's criterion: counts equal within one
REL_TOL, ABS_TOL = 1e-6, 1e-13
INSTALL = "pip install '.[bench]' (PyMGRIT 1.0.6)"


def _compare(ours: list[float], theirs: list[float]) -> tuple[bool, float, float, list[dict]]:
    rows, ok, worst, worst_abs = [], len(ours) == len(theirs), 0.0, 0.0
    for k in range(max(len(ours), len(theirs))):
        a = ours[k] if k < len(ours) else None
        p = theirs[k] if k < len(theirs) else None
        row = {"iteration": k + 1, "ptoc": a, "PyMGRIT": p}
        if a is not None and p is not None:
            diff = abs(a - p)
            row["abs diff"], row["rel diff"] = diff, diff / p if p > 0 else float("inf")
            worst, worst_abs = max(worst, row["rel diff"]), max(worst_abs, diff)
            ok = ok and diff <= REL_TOL * p + ABS_TOL
        rows.append(row)
    return ok, worst, worst_abs, rows


def _plot(cases: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = sorted({c["config"] for c in cases}, reverse=True)
    fig, axes = plt.subplots(1, len(configs), figsize=(5.5 * len(configs), 4), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, config in zip(axes[0], configs, strict=True):
        for i, c in enumerate(x for x in cases if x["config"] == config):
            col = colours[i % len(colours)]
            lab = f"N={c['depth']}, seed {c['seed']}"
            ax.semilogy(range(1, len(c["ptoc_residuals"]) + 1), c["ptoc_residuals"], "-",
                        color=col, label=f"ptoc, {lab}")
            ax.semilogy(range(1, len(c["pymgrit_residuals"]) + 1), c["pymgrit_residuals"],
                        "o", color=col, mfc="none", ms=7, label=f"PyMGRIT, {lab}")
        ax.axhline(TOL, color="grey", lw=0.8, ls="--", label="tol 1e-10")
        ax.set_xlabel("MGRIT iteration")
        ax.set_ylabel("residual (2-norm over the finest C-points)")
        ax.set_title(f"{config}, m = {M}, FCF, V-cycle")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("ptoc MGRIT (lines) vs PyMGRIT 1.0.6 (circles): forward sweep, d=16, "
                 "batch 32, T=1, tanh", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(quick: bool, out_dir: Path) -> Record:
    bench = benchmark("bench_pymgrit")  # its make_problem and pymgrit_solve
    if (bench.COARSENING, bench.TOL) != (M, TOL):
        raise RuntimeError("bench_pymgrit.py's COARSENING and TOL differ from this claim's")
    if bench.PYMGRIT_ERROR is not None:
        return Record(Verdict.SKIPPED, None,
                      reason=f"PyMGRIT cannot be imported ({bench.PYMGRIT_ERROR}); {INSTALL}",
                      tolerance=f"iterations within {ITER_TOL}; residuals within "
                      f"{REL_TOL:g} relative + {ABS_TOL:g}")
    import importlib.metadata as md

    version = md.version("pymgrit")
    cases_in = [(256, 0)] if quick else [(1024, 0), (1024, 1), (1024, 2), (4096, 0)]
    cases, checks = [], {}
    for depth, seed in cases_in:
        net, params, X0 = bench.make_problem(seed, depth)
        serial = ptoc.forward(net, params, X0, target="cpu").states[-1]
        n_max = len(mgrit_levels(depth, M, 10, 1))
        for config, max_levels in (("two-level", 2), ("max-level", 10)):
            solver = ptoc.MGRIT(coarsening=M, max_levels=max_levels, min_coarse_steps=1,
                                relaxation="FCF", cycle="V", tol=TOL,
                                coarse_weights="inject", nested_iteration=False)
            states, rec = parallel_forward(net, params, X0, solver)
            level = 2 if max_levels == 2 else n_max
            _, pm_states, info, _ = bench.pymgrit_solve(params.K, params.b, X0, level)
            theirs, x_end = [float(r) for r in info["conv"]], pm_states[-1]
            ours = list(rec.residuals)
            same, worst, worst_abs, rows = _compare(ours, theirs)
            name = f"N={depth} seed {seed} {config}"
            checks[f"{name}: iterations within {ITER_TOL}"] = \
                abs(rec.iterations - len(theirs)) <= ITER_TOL
            checks[f"{name}: residual histories agree"] = same
            cases.append({
                "depth": depth, "seed": seed, "config": config, "levels": rec.levels,
                "pymgrit_level": level, "ptoc_iterations": rec.iterations,
                "pymgrit_iterations": len(theirs), "ptoc_residuals": ours,
                "pymgrit_residuals": theirs, "worst_rel_residual_diff": worst,
                "worst_abs_residual_diff": worst_abs,
                "residual_table": rows,
                "max|x_N ptoc - serial|": float(np.max(np.abs(states[-1] - serial))),
                "max|x_N PyMGRIT - serial|": float(np.max(np.abs(x_end - serial))),
            })
    fig = "pymgrit_iterations.png"
    _plot(cases, out_dir / fig)
    first = {c["config"]: c for c in reversed(cases)}  # the first case of each config
    our = {f"{k} iterations (ptoc/PyMGRIT)": f"{c['ptoc_iterations']}/{c['pymgrit_iterations']}"
           for k, c in sorted(first.items(), reverse=True)}
    our["N"] = cases_in[0][0]
    our["worst residual diff abs"] = max(c["worst_abs_residual_diff"] for c in cases)
    our["worst residual diff rel"] = max(c["worst_rel_residual_diff"] for c in cases)
    summary = [{k: c[k] for k in ("depth", "seed", "config", "levels", "ptoc_iterations",
                                  "pymgrit_iterations", "worst_rel_residual_diff",
                                  "worst_abs_residual_diff")}
               for c in cases]
    return Record.from_checks(
        checks, our_value=our,
        paper_value={"benchmark record (N=1024, seed 0)": "two-level 7/7, max-level 9/9"},
        tolerance=f"iteration counts differ by at most {ITER_TOL}; per iteration "
                  f"|r_ptoc - r_PyMGRIT| <= {REL_TOL:g} r_PyMGRIT + {ABS_TOL:g}",
        details={"pymgrit": version, "summary": summary, "cases": cases,
                 "settings": {"m": M, "relaxation": "FCF", "cycle": "V", "tol": TOL,
                              "nested_iteration": False, "coarse_weights": "inject",
                              "width": bench.WIDTH, "batch": bench.BATCH,
                              "T": bench.T_FINAL}},
        figures=[fig])


if __name__ == "__main__":
    raise SystemExit(script_main(__name__))
