"""Claim 14: the speedup predicted from counted critical-path layer steps matches the
speedup measured on MPI ranks, for parareal and MGRIT, for growing depth.

Source: the layer-parallel solvers of Günther et al. (2020) (parareal and MGRIT
across layers; "speedup over layer-serial methods through greater concurrency",
abstract) and ptoc's cost model (docs/architecture.md): every solve counts its
layer steps with logical (Lamport) clocks, so the critical path of P ranks is known
from a run on simulated ranks, and the speedup of P processors is predicted as

    T_P = sum over the sweeps of critical_path(P) x c,    speedup(P) = T_serial / T_P,

with ``c`` the measured time per layer step of the same method and sweep on one rank
(its median wall time over its total steps) and ``T_serial`` the measured serial
sweep(s) on one rank. At P = 1 prediction and measurement agree by construction; P = 2
is the test.

Two parts:

(a) Counting (quick and full mode, no timing). On simulated ranks, for small N and P
(P dividing N) the counted critical paths equal their closed forms, derived from the
algorithms' dependencies (chunk or rank ``r`` owns ``L = N/P`` layers, ``q = L/m``
coarse intervals, ``n_c = N/m``; ``K`` = iterations done):

* serial sweep, pipelined through the ranks: ``N`` (total work ``N``);
* parareal (one chunk per rank, run to exactness, ``K <= P``):
  ``P + L + sum_{j=1}^{min(K, P-1)} (L + P - j)``, i.e. ``N + P(P+1)/2`` at ``K = P``;
  total work ``(1 + L) sum_{j=0}^{min(K, P-1)} (P - j)``;
* two-level MGRIT, F-relaxation: ``2L + n_c + q + (K-1)(L + n_c + 2q)``;
* two-level MGRIT, FCF-relaxation: ``3L + n_c + q + (K-1)(2L + n_c + q)``;
* any MGRIT on one rank: critical path = total work;

for the state sweep and the adjoint sweep alike. Holds when every count is equal.

(b) Measurement (full mode). The problem of ``ptoc solve``: ``X_{n+1} = X_n
+ h tanh(X_n K_n^T + b_n)``, d = 16, batch 32, T = 1, seed 0, N = 1024 and 4096 layers;
parareal (one chunk per rank, tol 1e-10) and MGRIT (m = 4, FCF, V-cycles, up to 10
levels, coarsest grid >= 2 steps, tol 1e-10), as in ``benchmarks/bench_scaling.py``.
``mpiexec -n P`` (P = 1, 2; one Numba and one BLAS thread per rank) runs the state
sweep, the adjoint sweep and the parameter gradient (``parallel_gradient`` on
``MPIRanks``) in warm processes: one untimed round, then rounds of every method
interleaved, two launches per P, interleaved. A sweep's time is the largest
``SolveResult.wall_time`` over the ranks; the forward figure is the state sweep, the
gradient figure the state plus the adjoint sweep. Predicted speedups come from the
critical paths counted on simulated ranks (P = 1 ... 64). Holds when the MPI runs
count the same critical paths as the simulation and, at P = 2, the measured speedup
of parareal and MGRIT is within 25% of the predicted one (``|measured / predicted -
1| <= 0.25``: the model ignores communication and all work that is not a layer step)
for both depths and both the forward sweep and the gradient. Predicted speedups for
P = 4 ... 64 are tabulated, not judged (no such machine here). The serial sweep
pipelined through 2 ranks is the control: its critical path is N, its predicted
speedup 1, and a measured value far from 1 means the ranks did not get two free
cores. The measurement waits (at most 3 minutes) for the 1-minute load average to
fall below 1 and records the load average before and after.

Quick mode runs part (a) only: it never judges timings.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from ptoc.cli.claims import Record, Verdict, script_main
from ptoc.cli.solve import _problem as solve_problem
from ptoc.parallel import MGRIT, Parareal, Serial, parallel_gradient

NUMBER = 14
CLAIM = ("the speedup predicted from counted critical-path layer steps matches the speedup "
         "measured on MPI ranks, for parareal and MGRIT, for growing depth")
SOURCE = ("Günther et al. 2020 (layer-parallel parareal/MGRIT, speedup through concurrency); "
          "ptoc's critical-path cost model, docs/architecture.md")

SPEEDUP_TOL = 0.25  # |measured / predicted - 1| at P = 2
DEPTHS = (1024, 4096)
SIM_RANKS = (1, 2, 4, 8, 16, 32, 64)
METHODS = ("serial", "parareal", "mgrit")
REPEATS, LAUNCHES = 5, 2
TOL = 1e-10
NEVER = 0.0  # no tolerance: run the solver's max_iterations (stop only at a zero residual)
QUIET_LOAD, QUIET_WAIT = 1.0, 180.0  # wait (at most 180 s) for a 1-min load average < 1


# --- (a) counting ---------------------------------------------------------------------------

def _small(N: int):
    """A small problem of the same kind for the step counts (which do not depend on it)."""
    return _problem(N, width=4, batch=3)


def parareal_critical_path(N: int, P: int, K: int) -> int:
    L = N // P
    return P + L + sum(L + P - j for j in range(1, min(K, P - 1) + 1))


def parareal_total(N: int, P: int, K: int) -> int:
    return (1 + N // P) * sum(P - j for j in range(0, min(K, P - 1) + 1))


def mgrit2_critical_path(N: int, P: int, m: int, relaxation: str, K: int) -> int:
    L = N // P
    q, nc = L // m, N // m
    if relaxation == "F":
        return 2 * L + nc + q + (K - 1) * (L + nc + 2 * q)
    return 3 * L + nc + q + (K - 1) * (2 * L + nc + q)


def _counting() -> tuple[dict[str, bool], list[dict]]:
    checks: dict[str, bool] = {}
    rows: list[dict] = []

    def add(label, rec_f, rec_a, want_f, want_a, total=None):
        for sweep, rec, want in (("forward", rec_f, want_f), ("adjoint", rec_a, want_a)):
            ok = rec.steps_critical_path == want
            if total is not None:
                ok = ok and rec.steps_total == total(rec)
            rows.append({"case": label, "sweep": sweep, "iterations": rec.iterations,
                         "counted": rec.steps_critical_path, "formula": want,
                         "total": rec.steps_total, "ok": ok})
            checks[f"{label} {sweep}: counted critical path = formula"] = ok

    for N, P in ((16, 2), (32, 4), (48, 3), (64, 4)):
        net, params, X, y = _small(N)
        r = parallel_gradient(net, params, X, y, Serial(), comm=P)
        add(f"serial N={N} P={P}", r.forward, r.adjoint, N, N, total=lambda _, N=N: N)
        r = parallel_gradient(net, params, X, y, Parareal(chunks=P, tol=NEVER), comm=P)
        add(f"parareal N={N} P={P}", r.forward, r.adjoint,
            parareal_critical_path(N, P, r.forward.iterations),
            parareal_critical_path(N, P, r.adjoint.iterations),
            total=lambda rec, N=N, P=P: parareal_total(N, P, rec.iterations))
        for m in (2, 4):
            if (N // P) % m:
                continue
            for relax in ("F", "FCF"):
                for K in (1, 3):
                    solver = MGRIT(coarsening=m, max_levels=2, relaxation=relax, tol=NEVER,
                                   max_iterations=K)
                    r = parallel_gradient(net, params, X, y, solver, comm=P)
                    add(f"MGRIT two-level {relax} m={m} N={N} P={P} K<={K}", r.forward,
                        r.adjoint,
                        mgrit2_critical_path(N, P, m, relax, r.forward.iterations),
                        mgrit2_critical_path(N, P, m, relax, r.adjoint.iterations))
    net, params, X, y = _small(64)
    r = parallel_gradient(net, params, X, y, MGRIT(coarsening=2, max_levels=10, tol=NEVER,
                                                   max_iterations=3), comm=1)
    add("MGRIT 6 levels m=2 N=64 on one rank (critical path = total)", r.forward, r.adjoint,
        r.forward.steps_total, r.adjoint.steps_total)
    return checks, rows


# --- (b) measurement ---------------------------------------------------------------------------

def _problem(depth: int, width: int = 16, batch: int = 32, seed: int = 0):
    """The problem of ``ptoc solve``: its own builder, with these sizes."""
    return solve_problem(SimpleNamespace(width=width, depth=depth, batch=batch, seed=seed,
                                         T=1.0, activation="tanh"))


def _solver(method: str):
    if method == "serial":
        return Serial()
    if method == "parareal":
        return Parareal(tol=TOL)
    return MGRIT(coarsening=4, relaxation="FCF", cycle="V", max_levels=10, min_coarse_steps=2,
                 tol=TOL)


def _worker(spec_path: str) -> int:
    """Runs under ``mpiexec``: every method of the spec, round after round, in this
    process; rank 0 writes every round's per-rank records."""
    from ptoc.parallel import MPIRanks

    spec = json.loads(Path(spec_path).read_text())
    comm = MPIRanks()
    net, params, X, y = _problem(spec["depth"])
    methods = list(spec["methods"])
    for r in range(spec["warmup"] + spec["repeats"]):
        for method in methods:  # the same order on every rank
            comm.mpi.Barrier()
            res = parallel_gradient(net, params, X, y, _solver(method), comm=comm)
            mine = {s: {"wall": rec.wall_time, "total": rec.steps_total,
                        "critical": rec.steps_critical_path, "iterations": rec.iterations}
                    for s, rec in (("forward", res.forward), ("adjoint", res.adjoint))}
            ranks = comm.mpi.allgather(mine)
            if comm.rank == 0 and r >= spec["warmup"]:
                path = Path(spec["out"]) / f"{method}_{r}.json"
                path.write_text(json.dumps(ranks))
        methods = methods[1:] + methods[:1]
    return 0


def _launch(mpiexec: str, ranks: int, depth: int) -> dict[str, list[dict]]:
    """One ``mpiexec -n ranks`` launch; per method, one sample per timed round."""
    with tempfile.TemporaryDirectory(prefix="ptoc-speedup-") as tmp:
        spec = Path(tmp) / "spec.json"
        spec.write_text(json.dumps({"depth": depth, "methods": METHODS, "warmup": 1,
                                    "repeats": REPEATS, "out": tmp}))
        boot = ("import importlib.util, sys; "
                "s = importlib.util.spec_from_file_location('ptoc_speedup_worker', sys.argv[1]); "
                "m = importlib.util.module_from_spec(s); s.loader.exec_module(m); "
                "sys.exit(m._worker(sys.argv[2]))")
        env = dict(os.environ, OPENBLAS_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
        cmd = [mpiexec, "-n", str(ranks), sys.executable, "-c", boot,
               str(Path(__file__).resolve()), str(spec)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}):\n"
                               f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        out: dict[str, list[dict]] = {}
        for method in METHODS:
            for r in range(1, 1 + REPEATS):
                ranks_rec = json.loads((Path(tmp) / f"{method}_{r}.json").read_text())
                out.setdefault(method, []).append({
                    s: {"wall_max": max(x[s]["wall"] for x in ranks_rec),
                        "total": ranks_rec[0][s]["total"],
                        "critical": ranks_rec[0][s]["critical"],
                        "iterations": ranks_rec[0][s]["iterations"]}
                    for s in ("forward", "adjoint")})
    return out


def _simulate(depth: int, P: int, method: str) -> dict:
    net, params, X, y = _problem(depth)
    r = parallel_gradient(net, params, X, y, _solver(method), comm=P)
    return {s: {"critical": rec.steps_critical_path, "total": rec.steps_total,
                "iterations": rec.iterations} for s, rec in (("forward", r.forward),
                                                             ("adjoint", r.adjoint))}


def _sweeps(kind: str) -> tuple[str, ...]:
    return ("forward",) if kind == "forward" else ("forward", "adjoint")


def _seconds(samples: list[dict], kind: str) -> float:
    return statistics.median(sum(s[p]["wall_max"] for p in _sweeps(kind)) for s in samples)


def _measure(mpiexec: str) -> dict:
    """Per (N, ranks, method), the samples of every launch (launches interleaved)."""
    measured: dict = {}
    for N in DEPTHS:
        order = [1, 2]
        for _ in range(LAUNCHES):
            for P in order:
                for method, samples in _launch(mpiexec, P, N).items():
                    measured.setdefault((N, P, method), []).extend(samples)
            order = order[::-1]
    return measured


def _analyse(measured: dict, simulated: dict) -> dict:
    out: dict = {}
    for kind in ("forward", "gradient"):
        for N in DEPTHS:
            t_serial = _seconds(measured[(N, 1, "serial")], kind)
            for method in METHODS:
                ref = measured[(N, 1, method)]
                cell: dict = {"measured_s": {}, "measured_speedup": {}}
                for P in (1, 2):
                    t = _seconds(measured[(N, P, method)], kind)
                    cell["measured_s"][P] = t
                    cell["measured_speedup"][P] = t_serial / t
                cost = {p: statistics.median(s[p]["wall_max"] for s in ref) / ref[0][p]["total"]
                        for p in _sweeps(kind)}
                cell["seconds_per_step"] = cost
                cell["critical_path"], cell["predicted_speedup"] = {}, {}
                for P in SIM_RANKS:
                    if method == "serial":
                        cp = {p: N for p in _sweeps(kind)}
                    else:
                        cp = {p: simulated[(N, P, method)][p]["critical"] for p in _sweeps(kind)}
                    cell["critical_path"][P] = cp
                    cell["predicted_speedup"][P] = t_serial / sum(cp[p] * cost[p] for p in cp)
                cell["ratio_P2"] = cell["measured_speedup"][2] / cell["predicted_speedup"][2]
                out[(kind, N, method)] = cell
    return out


def _plot(analysis: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharex=True, sharey=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, kind in enumerate(("forward", "gradient")):
        for j, method in enumerate(("parareal", "mgrit")):
            ax = axes[i, j]
            for k, N in enumerate(DEPTHS):
                c = analysis[(kind, N, method)]
                col = colours[k]
                ax.plot(SIM_RANKS, [c["predicted_speedup"][P] for P in SIM_RANKS], "-o",
                        color=col, ms=3, label=f"N={N} predicted")
                ax.plot([1, 2], [c["measured_speedup"][P] for P in (1, 2)], "s", color=col,
                        ms=9, mfc="none", mew=1.5, label=f"N={N} measured (MPI)")
            ax.axhline(1.0, color="grey", lw=0.8, ls="--")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(SIM_RANKS)
            ax.set_xticklabels([str(P) for P in SIM_RANKS])
            ax.grid(True, which="both", alpha=0.3)
            ax.set_title(f"{method}, {'state sweep' if kind == 'forward' else 'gradient'}")
            if i == 1:
                ax.set_xlabel("ranks P")
            if j == 0:
                ax.set_ylabel("speedup over the serial sweep(s) on 1 rank")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("Predicted (critical path x per-step cost on 1 rank) and measured (mpiexec "
                 "-n 1, 2) speedup\nd=16, batch 32, T=1, tanh, tol 1e-10", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(quick: bool, out_dir: Path) -> Record:
    checks, rows = _counting()
    n_count = len(checks)
    details: dict = {"counting": rows}
    tol_text = "counted critical path = closed form, exactly"
    if quick:
        ok = sum(checks.values())
        return Record.from_checks(
            checks, our_value={"counts equal to the formula": f"{ok}/{n_count}"},
            tolerance=tol_text + " (quick mode: no timings judged)", details=details)

    mpiexec = shutil.which("mpiexec")
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        mpiexec = None
    if mpiexec is None:
        return Record(Verdict.SKIPPED, {"counts equal to the formula":
                                        f"{sum(checks.values())}/{n_count}"},
                      reason="mpiexec or mpi4py not found: nothing to measure "
                             "(pip install 'ptoc[mpi]')", details=details)
    t0 = time.perf_counter()
    simulated = {(N, P, m): _simulate(N, P, m) for N in DEPTHS for P in SIM_RANKS
                 for m in ("parareal", "mgrit")}
    sim_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    while os.getloadavg()[0] > QUIET_LOAD and time.perf_counter() - t0 < QUIET_WAIT:
        time.sleep(5.0)  # timings need the cores: let the machine settle first
    waited = time.perf_counter() - t0
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    measured = _measure(mpiexec)
    seconds = time.perf_counter() - t0
    load_after = os.getloadavg()
    analysis = _analyse(measured, simulated)

    for N in DEPTHS:
        for method in ("parareal", "mgrit"):
            for P in (1, 2):
                for sweep in ("forward", "adjoint"):
                    got = measured[(N, P, method)][0][sweep]["critical"]
                    want = simulated[(N, P, method)][sweep]["critical"]
                    checks[f"N={N} {method} P={P} {sweep}: MPI critical path = simulated"] = \
                        got == want
    table = []
    for (kind, N, method), c in analysis.items():
        row = {"sweeps": kind, "N": N, "method": method,
               "measured P=1": c["measured_speedup"][1], "measured P=2": c["measured_speedup"][2],
               "predicted P=2": c["predicted_speedup"][2], "measured/predicted P=2": c["ratio_P2"],
               "ms 1 rank": 1e3 * c["measured_s"][1], "ms 2 ranks": 1e3 * c["measured_s"][2],
               "critical path P=2": sum(c["critical_path"][2].values())}
        row.update({f"predicted P={P}": c["predicted_speedup"][P] for P in SIM_RANKS if P > 2})
        table.append(row)
        if method != "serial":
            checks[f"{method} {kind} N={N}: measured P=2 speedup within {SPEEDUP_TOL:.0%} of "
                   "predicted"] = abs(c["ratio_P2"] - 1.0) <= SPEEDUP_TOL
    fig = "speedup.png"
    _plot(analysis, out_dir / fig)
    our = {}
    for N in DEPTHS:
        for method in ("parareal", "mgrit"):
            c = analysis[("gradient", N, method)]
            our[f"{method} N={N} grad P=2 meas/pred"] = \
                f"{c['measured_speedup'][2]:.2f}/{c['predicted_speedup'][2]:.2f}"
    details.update({
        "speedup_table": table,
        "load_average_before_after": [list(load_before), list(load_after)],
        "measurement_seconds": seconds, "simulation_seconds": sim_seconds,
        "waited_for_quiet_machine_seconds": waited,
        "settings": {"depths": DEPTHS, "simulated_ranks": SIM_RANKS, "repeats": REPEATS,
                     "launches": LAUNCHES, "tol": TOL,
                     "parareal": "one chunk per rank, inject coarse weights",
                     "mgrit": "m=4, FCF, V, max_levels=10, min_coarse_steps=2",
                     "threads": "OPENBLAS_NUM_THREADS=1, NUMBA_NUM_THREADS=1 per rank",
                     "cpus": os.cpu_count()},
        "simulated": {f"N={N} P={P} {m}": v for (N, P, m), v in simulated.items()},
        "measured": {f"N={N} P={P} {m}": v for (N, P, m), v in measured.items()},
    })
    # control: the serial sweep pipelined through 2 ranks has the serial critical path, so
    # its predicted speedup is 1; far from 1 measured, the two ranks lacked free cores
    control = [analysis[(k, N, "serial")]["ratio_P2"] for k in ("forward", "gradient")
               for N in DEPTHS]
    our["serial pipeline P=2 meas/pred (control)"] = \
        f"{min(control):.2f}..{max(control):.2f}"
    failed = [k for k, v in checks.items() if not v]
    reason = None
    if failed:
        reason = "does not hold: " + ", ".join(failed)
        if any(abs(c - 1.0) > SPEEDUP_TOL for c in control):
            reason += (f" (control: the serial pipeline on 2 ranks, predicted speedup 1, "
                       f"measured {min(control):.2f}..{max(control):.2f} of it, load average "
                       f"{load_before[0]:.1f} before and {load_after[0]:.1f} after: the "
                       f"machine did not give the two ranks two free cores)")
    return Record.from_checks(
        checks, our_value=our, reason=reason,
        tolerance=tol_text + f"; MPI counts = simulated counts; at P = 2 |measured / "
                  f"predicted speedup - 1| <= {SPEEDUP_TOL:g} for parareal and MGRIT, "
                  "forward and gradient, every N",
        details=details, figures=[fig])


if __name__ == "__main__":
    raise SystemExit(script_main(__name__))
