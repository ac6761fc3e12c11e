"""Claim 4: MGRIT's structural properties -- one level, two levels with F, FCF.

Claims (docs/theory/mgrit.md; Falgout, Friedhoff, Kolev, MacLachlan & Schroder 2014,
"Parallel time integration with multigrid"; for ResNets Günther et al. 2020):

(a) MGRIT with one level is the serial sweep: ``MGRIT(max_levels=1)`` gives the states
    and adjoints of the serial sweep bit for bit (on any number of ranks), and on one
    rank also the gradient bit for bit.
(b) Two-level MGRIT with F-relaxation (and nested iteration, i.e. started from the
    coarse solution, as parareal is) is parareal with the same coarse propagator,
    iterate by iterate: after every iteration ``k`` its fine trajectory (the F-points,
    which both methods compute by fine steps from the current C-point values) equals
    that of ``Parareal(max_iterations=k)``.
(c) Two-level MGRIT makes the solution exact on one more C-point per iteration with
    F-relaxation, and on two more with FCF-relaxation: after ``k`` iterations the
    C-points ``0..k`` (F) or ``0..2k`` (FCF) are exact, and no more.

How it is checked
-----------------
Random ResNets (tanh, ReLU, SmoothReLU; several seeds), float64, through the public
solvers: ``ptoc.forward(..., solver=MGRIT(...) / Parareal(...))`` for the state sweep,
``ptoc.parallel.parallel_adjoint`` (from the exact states) for the adjoint sweep,
``ptoc.parallel.parallel_gradient`` for (a); references are the serial
``ptoc.forward``, ``ptoc.adjoint(keep_adjoints=True)`` and ``ptoc.loss_and_grad``.

* (a) holds when states and adjoints are ``numpy.array_equal`` to the serial ones on
  1, 2, 3 and 5 ranks, the gradient is ``array_equal`` on one rank, and within 1e-14
  relative on several ranks (the regulariser's sum is split across ranks there, so
  its terms are added in another order).
* (b) holds when, for ``k = 1..P`` (P = N/m chunks = coarse steps), coarse weights
  ``inject`` and ``average``, both sweeps, the F-point values agree to round-off:
  ``max |x_mgrit - x_parareal| <= 1e-13 max |x|`` (the two methods reach the same
  iterate through different arithmetic: FAS correction ``v + (u_c - v)`` against
  ``F + (G_new - G_old)``). C-points are not compared: MGRIT stores the corrected
  coarse values ``U_j^k`` there, parareal returns the fine trajectory's end
  ``F_{j-1}(U_{j-1}^k)``; equal F-points after them imply equal ``U_j^k``.
* (c) a C-point counts as exact when its error is ``<= 1e-13 max |x|`` (the FAS
  correction adds round-off to an exact value, so bit equality is not expected);
  holds when the number of exact C-points after ``k`` iterations (C-point 0 not
  counted) is exactly ``min(k, n_c)`` with F- and ``min(2k, n_c)`` with FCF-relaxation,
  for both sweeps, on 1 rank and (full run) 3 ranks. The smallest error among the
  C-points counted inexact is recorded, to show the split is clean.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from _problems import random_problem, serial_sweeps  # validation/_problems.py

import ptoc
from ptoc.cli.claims import Record, script_main
from ptoc.parallel import MGRIT, Parareal, SimulatedRanks, parallel_adjoint, parallel_gradient

NUMBER = 4
CLAIM = ("MGRIT with one level is the serial sweep bit for bit; two-level MGRIT with "
         "F-relaxation is parareal iterate by iterate; FCF makes two more C-points exact "
         "per iteration (F: one)")
SOURCE = ("Falgout et al. 2014 (MGRIT; parareal as two-level F-relaxation MGRIT); "
          "Günther et al. 2020; docs/theory/mgrit.md")

ACTS = ("tanh", "relu", "smoothrelu")
ROUND_OFF = 1e-13
GRAD_RANKS_TOL = 1e-14


def _serial(net, params, X, y):
    loss, grads = ptoc.loss_and_grad(net, params, X, y)
    return (*serial_sweeps(net, params, X, y), loss, grads)


def _rel(a, b):
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


# --- (a) one level -------------------------------------------------------------------------------

def _one_level(act, N, seed, ranks):
    net, params, X, y = random_problem(act, N, seed)
    fwd, _, adj, loss, grads = _serial(net, params, X, y)
    rows = []
    for r in ranks:
        res = parallel_gradient(net, params, X, y, MGRIT(max_levels=1), comm=r)
        grad_bitwise = all(np.array_equal(res.grads[k], grads[k]) for k in grads)
        grad_rel = max(_rel(res.grads[k], grads[k]) for k in grads)
        rows.append({"activation": act, "N": N, "seed": seed, "ranks": r,
                     "states_bitwise": bool(np.array_equal(res.states, fwd.states)),
                     "adjoints_bitwise": bool(np.array_equal(res.adjoints, adj.adjoints)),
                     "gradient_bitwise": grad_bitwise, "gradient_rel": grad_rel,
                     "loss_rel": abs(res.loss - loss) / abs(loss),
                     "iterations": res.forward.iterations, "levels": res.forward.levels})
    return rows


# --- (b) two-level F-relaxation = parareal -----------------------------------------------------

def _f_equals_parareal(act, m, P, seed, coarse, mgrit_ranks):
    N = m * P
    net, params, X, y = random_problem(act, N, seed)
    fwd, lam_N, adj, *_ = _serial(net, params, X, y)
    f_points = np.array([n for n in range(N + 1) if n % m])  # same set for both sweeps
    worst = {"states": 0.0, "adjoints": 0.0}
    distance = {"states": [], "adjoints": []}  # parareal iterate vs serial, per k
    for k in range(1, P + 1):
        par = Parareal(chunks=P, coarse=coarse, max_iterations=k, tol=0)
        mg = MGRIT(coarsening=m, max_levels=2, relaxation="F", nested_iteration=True,
                   coarse_weights=coarse, max_iterations=k, tol=0)
        ps = ptoc.forward(net, params, X, solver=par, comm=SimulatedRanks(P)).states
        ms = ptoc.forward(net, params, X, solver=mg, comm=mgrit_ranks).states
        pl = parallel_adjoint(net, params, fwd.states, lam_N, par, comm=SimulatedRanks(P))[0]
        ml = parallel_adjoint(net, params, fwd.states, lam_N, mg, comm=mgrit_ranks)[0]
        worst["states"] = max(worst["states"], _rel(ms[f_points], ps[f_points]))
        worst["adjoints"] = max(worst["adjoints"], _rel(ml[f_points], pl[f_points]))
        distance["states"].append(_rel(ps, fwd.states))
        distance["adjoints"].append(_rel(pl, adj.adjoints))
    return {"activation": act, "m": m, "P": P, "N": N, "seed": seed, "coarse": coarse,
            "mgrit_ranks": mgrit_ranks, "max_rel_diff_states": worst["states"],
            "max_rel_diff_adjoints": worst["adjoints"],
            "parareal_error_vs_serial_per_k": distance}


# --- (c) exact C-points per iteration ----------------------------------------------------------

def _leading_exact(err):
    """Number of leading exact C-points after C-point 0, and the first inexact error."""
    i = 1
    while i < len(err) and err[i] <= ROUND_OFF:
        i += 1
    return i - 1, (float(err[i]) if i < len(err) else None)


def _c_points(act, m, N, seed, ranks):
    net, params, X, y = random_problem(act, N, seed)
    fwd, lam_N, adj, *_ = _serial(net, params, X, y)
    C = list(range(0, N + 1, m))
    if C[-1] != N:
        C.append(N)
    n_c = len(C) - 1
    x_scale, l_scale = np.max(np.abs(fwd.states)), np.max(np.abs(adj.adjoints))
    out = {"activation": act, "m": m, "N": N, "n_c": n_c, "seed": seed, "ranks": ranks}
    for relax in ("F", "FCF"):
        per = 1 if relax == "F" else 2
        counts = {"states": [], "adjoints": []}
        first_inexact = []
        for k in range(1, n_c + 1):
            mg = MGRIT(coarsening=m, max_levels=2, relaxation=relax, max_iterations=k,
                       tol=0)
            xs = ptoc.forward(net, params, X, solver=mg, comm=ranks).states
            ls = parallel_adjoint(net, params, fwd.states, lam_N, mg, comm=ranks)[0]
            es = np.max(np.abs(xs - fwd.states), axis=(1, 2))[C] / x_scale
            # adjoint: solver position c holds lambda_{N-c}
            ea = np.max(np.abs(ls - adj.adjoints), axis=(1, 2))[[N - c for c in C]] / l_scale
            for key, e in (("states", es), ("adjoints", ea)):
                count, inexact = _leading_exact(e)
                counts[key].append(count)
                if inexact is not None:
                    first_inexact.append(inexact)
        expected = [min(per * k, n_c) for k in range(1, n_c + 1)]
        out[relax] = {"exact_c_points_states": counts["states"],
                      "exact_c_points_adjoints": counts["adjoints"], "expected": expected,
                      "as_claimed": counts["states"] == expected
                      and counts["adjoints"] == expected,
                      "smallest_inexact_error": min(first_inexact) if first_inexact else None}
    return out


def _figure(case, path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    n_c = case["n_c"]
    k = np.arange(1, n_c + 1)
    for relax, color, per in (("F", "tab:blue", 1), ("FCF", "tab:red", 2)):
        ax.plot(k, np.minimum(per * k, n_c), "-", color=color, lw=6, alpha=0.2,
                label=f"{relax}: claimed min({per if per > 1 else ''}k, n_c)")
        ax.plot(k, case[relax]["exact_c_points_states"], "o-", color=color, ms=6,
                label=f"{relax}: state sweep")
        ax.plot(k, case[relax]["exact_c_points_adjoints"], "x--", color=color, ms=8,
                label=f"{relax}: adjoint sweep")
    ax.set_xlabel("MGRIT iterations k (two levels)")
    ax.set_ylabel(f"exact C-points (error <= {ROUND_OFF:g}), of n_c = {n_c}")
    ax.set_title(f"N={case['N']}, m={case['m']}, {case['activation']}: "
                 "exact C-points per iteration", fontsize=10)
    ax.set_xticks(k)
    ax.set_yticks(range(n_c + 1))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run(quick: bool, out_dir: Path) -> Record:
    if quick:
        one_level = [(act, 10, 0) for act in ACTS]
        one_level_ranks = (1, 3)
        f_cases = [("tanh", 4, 3, 0, "inject", 1), ("smoothrelu", 3, 3, 1, "average", 1)]
        c_cases = [("tanh", 3, 18, 0, 1), ("relu", 4, 14, 0, 1)]
    else:
        one_level = [(act, N, s) for act in ACTS for N in (10, 37) for s in (0, 1)]
        one_level_ranks = (1, 2, 3, 5)
        f_cases = [(act, m, P, s, coarse, r) for act in ACTS for (m, P) in ((2, 6), (4, 5),
                                                                            (3, 7))
                   for s in (0, 1) for coarse in ("inject", "average") for r in (1, 3)]
        c_cases = [(act, m, N, s, r) for act in ACTS for (m, N) in ((3, 24), (4, 22), (2, 20))
                   for s in (0, 1) for r in (1, 3)]

    one_rows = [row for act, N, s in one_level for row in _one_level(act, N, s,
                                                                      one_level_ranks)]
    f_rows = [_f_equals_parareal(*c) for c in f_cases]
    c_rows = [_c_points(*c) for c in c_cases]

    name = "mgrit_properties.png"
    _figure(c_rows[0], out_dir / name)

    worst_f = max(max(r["max_rel_diff_states"], r["max_rel_diff_adjoints"]) for r in f_rows)
    multi = [r for r in one_rows if r["ranks"] > 1]
    checks = {
        "one level: states and adjoints = serial, bitwise, every rank count":
            all(r["states_bitwise"] and r["adjoints_bitwise"] for r in one_rows),
        "one level: gradient = serial, bitwise, one rank":
            all(r["gradient_bitwise"] for r in one_rows if r["ranks"] == 1),
        f"one level: gradient = serial to {GRAD_RANKS_TOL:g} on several ranks":
            all(r["gradient_rel"] <= GRAD_RANKS_TOL for r in multi),
        f"two-level F-relaxation = parareal iterate by iterate (<= {ROUND_OFF:g})":
            worst_f <= ROUND_OFF,
        "F-relaxation: exactly k exact C-points after k iterations":
            all(r["F"]["as_claimed"] for r in c_rows),
        "FCF-relaxation: exactly 2k exact C-points after k iterations":
            all(r["FCF"]["as_claimed"] for r in c_rows),
    }
    n_one = sum(r["states_bitwise"] and r["adjoints_bitwise"] for r in one_rows)
    n_c = sum(r["F"]["as_claimed"] and r["FCF"]["as_claimed"] for r in c_rows)
    smallest_inexact = min(v for r in c_rows for relax in ("F", "FCF")
                           for v in [r[relax]["smallest_inexact_error"]] if v is not None)
    return Record.from_checks(
        checks,
        our_value={"one level bitwise": f"{n_one}/{len(one_rows)}",
                   "one-level grad rel (ranks>1)": max((r["gradient_rel"] for r in multi),
                                                       default=0.0),
                   "MGRIT(F) vs parareal max rel": worst_f,
                   "C-point staircases as claimed": f"{n_c}/{len(c_rows)}",
                   "smallest inexact C-point error": smallest_inexact},
        tolerance={"one level": "bitwise (states, adjoints; gradient on one rank), gradient "
                                f"<= {GRAD_RANKS_TOL:g} relative on several ranks",
                   "F = parareal": f"F-point values <= {ROUND_OFF:g} max|x| apart",
                   "C-points": f"exact means error <= {ROUND_OFF:g} max|x|; count must be "
                               "exactly min(k, n_c) (F) or min(2k, n_c) (FCF)"},
        details={"one_level": one_rows, "f_relaxation_vs_parareal": f_rows,
                 "c_points": c_rows},
        figures=[name])


if __name__ == "__main__":
    raise SystemExit(script_main(__name__))
