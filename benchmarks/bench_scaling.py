#!/usr/bin/env python
"""Strong scaling across layers: ptoc's parareal and MGRIT measured on 1 and 2 MPI ranks,
and the speed-up of P = 4 ... 64 ranks predicted from the counted critical path.

The problem is that of ``ptoc solve``: ``X_{n+1} = X_n + h tanh(X_n K_n^T +
b_n)``, d = 16, batch 32, T = 1, K_n ~ N(0, 1/d), b_n ~ N(0, 1), X_0 ~ N(0, 1), seed 0,
for N = 1024, 2048, 4096, 8192, 16384 layers. Solvers (``ptoc solve`` options):

* ``serial``: the serial sweep (on P ranks a pipeline through the ranks);
* ``parareal``: one chunk per rank, coarse steps with the chunk's first-layer weights,
  ``--tol 1e-10``;
* ``mgrit``: ``--coarsening 4 --relaxation FCF --cycle V --levels 10 --min-coarse 2
  --tol 1e-10`` (coarsen as far as possible, stopping before the coarsest grid would
  have fewer than 2 steps: N = 1024 gives 5 levels down to 4 steps, N = 16384 gives 7).

Sweeps: ``forward`` (the state sweep) and ``gradient`` (state sweep, adjoint sweep and
the parameter gradient; its time below is that of the two sweeps: the parameter
gradient and the final gathers, outside both sweeps, are not in it).

(a) Measured. ``mpiexec -n P`` with P = 1 and 2 runs this script as a worker that
does what ``python -m ptoc solve`` does (its argument parser, problem and solver, and
the same ``parallel_forward`` / ``parallel_gradient`` call on ``MPIRanks``) several
times in the same processes: a first, untimed round of every configuration (it loads
the compiled kernels from Numba's cache, which a single ``ptoc solve`` launch counts
inside its first sweep: see the single-launch table), then ``--repeats`` rounds, the
configurations interleaved, each solve started after a barrier. A sample is the
``SolveResult.wall_time`` of the sweep (each rank's clock around its part of the
solve: process start-up, problem set-up, JIT loading and the final gather of the
states are not in it), of the slowest rank. Every rank starts that clock right after
a collective (ptoc's step count), so together, but stops it when its own part is done,
before the closing collective: ``ptoc solve --json`` reports rank 0's clock, which for
the serial pipeline stops before rank 1's part of the forward sweep has run. So a
sweep's time is the maximum over ranks, and the gradient's is max(forward) +
max(adjoint); rank 0's figure (what ``ptoc solve`` reports) is printed beside it.
Launches: 1 rank x 1
Numba thread (the reference), 1 rank x 2 threads, 2 ranks x 1 thread
(``OPENBLAS_NUM_THREADS=1`` everywhere); each launch is repeated ``--launches`` times,
the launch configurations interleaved; a cell is the median over all its samples.

(b) Predicted. ``ptoc solve --ranks P`` (simulated ranks, threads of this process)
counts the layer steps on the critical path (Lamport clocks; a coarse step counts as
one). The prediction for P ranks, one core each, with free communication, is
``T_P = sum over sweeps of critical_path(P) x c``, where ``c`` is the measured time per
layer step of the same method and sweep on 1 rank x 1 thread (its median wall time /
its ``steps_total``). Speed-up = ``T_serial / T_P`` with ``T_serial`` the measured
serial sweep(s) on 1 rank x 1 thread. The algorithmic speed-up is the number of
serial layer steps (N per sweep) over the critical path. Prediction and measurement
are set side by side for P = 1 and 2 (at P = 1 they agree by construction).

Usage::

    python benchmarks/bench_scaling.py                  # about 15-20 minutes
    python benchmarks/bench_scaling.py --quick          # N = 1024, 2048; P = 4, 16, 64
    python benchmarks/bench_scaling.py --depths 1024 4096 --sim-ranks 4 8 16
    python benchmarks/bench_scaling.py --mpi-ranks 4 8 16   # also measure P = 4, 8, 16

On a machine with 16 cores, ``--mpi-ranks 4 8 16`` adds launches of P ranks x 1 thread
(P = 1 and 2 are always measured) and sets each measured speed-up beside its prediction;
a launch of more ranks x threads than logical CPUs is noted as oversubscribed.

Writes ``benchmarks/out/scaling_<timestamp>.json`` (machine, settings, every
sample and step count) and ``scaling_<timestamp>.png`` (predicted speed-up against P)
unless ``--no-json`` / ``--no-plot``.
"""

from __future__ import annotations

import os
import sys

WORKER = len(sys.argv) > 1 and sys.argv[1] == "--worker"
if not WORKER:
    # this process only runs the simulated ranks (whose times are not used): one Numba
    # thread keeps those many Python threads from each starting a team of Numba threads
    os.environ["NUMBA_NUM_THREADS"] = "1"
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import datetime as _dt  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import _machine  # noqa: E402 - benchmarks/_machine.py

DEPTHS = (1024, 2048, 4096, 8192, 16384)
SIM_RANKS = (4, 8, 16, 32, 64)
QUICK = {"depths": (1024, 2048), "sim_ranks": (4, 16, 64), "repeats": 2, "launches": 1}
METHODS = ("serial", "parareal", "mgrit")
SWEEPS = ("forward", "gradient")
#: (label, MPI ranks, Numba threads per rank); the first is the reference
LAUNCHES = (("1 rank x 1 thread", 1, 1), ("1 rank x 2 threads", 1, 2),
            ("2 ranks x 1 thread", 2, 1))
REFERENCE = LAUNCHES[0][0]


def launch_configs(mpi_ranks=()) -> tuple[tuple[str, int, int], ...]:
    """The launches measured: those of :data:`LAUNCHES`, then ``P ranks x 1 thread`` for
    every ``P > 2`` of ``--mpi-ranks`` (a machine with that many cores)."""
    return LAUNCHES + tuple((f"{P} ranks x 1 thread", P, 1)
                            for P in sorted(set(mpi_ranks)) if P > 2)


def measured_ranks(launch_set) -> dict[int, str]:
    """``{P: label}`` of the launches of P ranks with one thread each."""
    return {ranks: label for label, ranks, threads in launch_set if threads == 1}
MGRIT_ARGS = ["--coarsening", "4", "--relaxation", "FCF", "--cycle", "V", "--levels", "10",
              "--min-coarse", "2"]
RESULTS = Path(__file__).resolve().parent / "out"


def solve_args(depth: int, method: str, sweep: str, tol: float, seed: int) -> list[str]:
    """``ptoc solve`` options of one configuration (the problem options left at their
    defaults: width 16, batch 32, T 1, tanh)."""
    args = ["--depth", str(depth), "--method", method, "--sweep", sweep, "--seed", str(seed)]
    if method != "serial":  # ptoc solve refuses options its method does not read
        args += ["--tol", f"{tol:g}"]
    return args + (MGRIT_ARGS if method == "mgrit" else [])


# --- the worker: runs under mpiexec -----------------------------------------------------------

def _record(rec) -> dict:
    return {"wall_time": rec.wall_time, "steps_total": rec.steps_total,
            "steps_critical_path": rec.steps_critical_path, "iterations": rec.iterations,
            "levels": rec.levels, "converged": rec.converged,
            "final_residual": rec.residuals[-1] if rec.residuals else None}


def worker(spec_path: str) -> int:
    """Run every configuration of the spec, round after round, as ``ptoc solve`` does.

    The problem and the solver come from ``ptoc solve``'s own code (its argument parser,
    ``ptoc.cli.solve._problem`` and ``_solver``) and the same driver call
    (``parallel_forward`` or ``parallel_gradient`` on :class:`MPIRanks`); what differs
    from ``ptoc solve`` is that the solves repeat in one process and that every rank's
    ``SolveResult.wall_time`` is kept (``ptoc solve --json`` keeps rank 0's only).
    """
    import time as _time

    from ptoc.cli import build_parser
    from ptoc.cli.solve import _problem, _solver
    from ptoc.parallel import MPIRanks, SingleRank
    from ptoc.parallel.driver import parallel_forward, parallel_gradient

    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec["out"])
    comm = MPIRanks() if spec["mpi"] else SingleRank()
    barrier = comm.mpi.Barrier if spec["mpi"] else (lambda: None)
    gather = comm.mpi.allgather if spec["mpi"] else (lambda obj: [obj])
    parser = build_parser()
    prepared = []
    for cfg in spec["configs"]:
        ns = parser.parse_args(["solve", *cfg])
        net, params, X, y = _problem(ns)
        prepared.append((ns.sweep, net, params, X, y, _solver(ns)))
    order = list(range(len(prepared)))
    for r in range(spec["warmup"] + spec["repeats"]):
        for i in order:  # the same order on every rank: the ranks stay in step
            sweep, net, params, X, y, solver = prepared[i]
            barrier()
            t0 = _time.perf_counter()
            if sweep == "forward":
                records = [parallel_forward(net, params, X, solver, comm=comm)[1]]
            else:
                res = parallel_gradient(net, params, X, y, solver, comm=comm)
                records = [res.forward, res.adjoint]
            call = _time.perf_counter() - t0
            ranks = gather({"records": [_record(x) for x in records], "call_s": call})
            if comm.rank == 0:
                (out / f"c{i}_r{r}.json").write_text(json.dumps(ranks))
        order = order[1:] + order[:1]
    return 0


# --- measuring ----------------------------------------------------------------------------------

def _records(path: Path) -> dict:
    """Per-sweep records from one ``ptoc solve --json`` (rank 0's wall times)."""
    rec = json.loads(path.read_text())
    out = {"total_wall_time": rec["wall_time"], "ranks": rec["ranks"], "mpi": rec["mpi"]}
    for r in rec["records"]:
        out[r["sweep"]] = {k: r[k] for k in ("wall_time", "steps_total", "steps_critical_path",
                                             "iterations", "levels", "converged")}
        out[r["sweep"]]["final_residual"] = r["residuals"][-1] if r["residuals"] else None
    return out


def _worker_sample(path: Path) -> dict:
    """One timed solve from the worker: rank 0's records (step counts, iterations, what
    ``ptoc solve`` would report) plus the wall times of every rank and their maxima."""
    ranks = json.loads(path.read_text())
    first = ranks[0]["records"]
    sample = {"forward": dict(first[0]), "call_s_ranks": [x["call_s"] for x in ranks]}
    sample["forward"]["wall_time_ranks"] = [x["records"][0]["wall_time"] for x in ranks]
    sample["forward"]["wall_time_max"] = max(sample["forward"]["wall_time_ranks"])
    if len(first) > 1:
        sample["adjoint"] = dict(first[1])
        sample["adjoint"]["wall_time_ranks"] = [x["records"][1]["wall_time"] for x in ranks]
        sample["adjoint"]["wall_time_max"] = max(sample["adjoint"]["wall_time_ranks"])
        # Each sweep's clock starts right after a collective (ptoc's step count), so the
        # ranks start it together, and it ends when the slowest rank is done: the two
        # sweeps take max(forward) + max(adjoint). (A rank's own forward + adjoint is
        # shorter when it waited between the sweeps with its clock stopped.)
        sample["gradient_wall_time_max"] = sample["forward"]["wall_time_max"] + \
            sample["adjoint"]["wall_time_max"]
    return sample


def launch(mpiexec: str | None, ranks: int, threads: int, configs: list[list[str]],
           repeats: int, warmup: int, timeout: float) -> tuple[list[list[dict]], float]:
    """One ``mpiexec -n ranks`` launch of the worker; per config, the samples of every
    timed round (warm-up rounds dropped), and the launch's wall time."""
    with tempfile.TemporaryDirectory(prefix="ptoc-scaling-") as tmp:
        spec = Path(tmp) / "spec.json"
        spec.write_text(json.dumps({"configs": configs, "repeats": repeats, "warmup": warmup,
                                    "out": tmp, "mpi": mpiexec is not None}))
        env = dict(os.environ, OPENBLAS_NUM_THREADS="1", NUMBA_NUM_THREADS=str(threads))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(spec)]
        if mpiexec is not None:
            cmd = [mpiexec, "-n", str(ranks)] + cmd
        elif ranks > 1:
            raise RuntimeError("more than one rank needs mpiexec")
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                               f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        results = [[_worker_sample(Path(tmp) / f"c{i}_r{r}.json")
                    for r in range(warmup, warmup + repeats)] for i in range(len(configs))]
    return results, wall


def cold_launch(mpiexec: str, ranks: int, args: list[str], timeout: float) -> dict:
    """One plain ``mpiexec -n P python -m ptoc solve ... --json`` (a single solve)."""
    with tempfile.TemporaryDirectory(prefix="ptoc-scaling-") as tmp:
        path = Path(tmp) / "solve.json"
        env = dict(os.environ, OPENBLAS_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
        cmd = [mpiexec, "-n", str(ranks), sys.executable, "-m", "ptoc", "solve", *args,
               "--json", str(path)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        out = _records(path)
    out["process_wall_time"] = wall
    out["command"] = " ".join(["mpiexec", "-n", str(ranks), "python", "-m", "ptoc", "solve",
                               *args, "--json", "PATH"])
    return out


def simulate(depth: int, ranks: int, method: str, tol: float, seed: int) -> dict:
    """``ptoc solve --sweep gradient --ranks P`` in this process (simulated ranks): the
    step counts of both sweeps, and how long the simulation took."""
    from ptoc.cli import main as ptoc_main

    with tempfile.TemporaryDirectory(prefix="ptoc-scaling-") as tmp:
        path = Path(tmp) / "sim.json"
        argv = ["solve", *solve_args(depth, method, "gradient", tol, seed), "--ranks",
                str(ranks), "--json", str(path)]
        buf = io.StringIO()
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(buf):
            code = ptoc_main(argv)
        wall = time.perf_counter() - t0
        if code != 0:
            raise RuntimeError(f"ptoc {' '.join(argv)} returned {code}:\n{buf.getvalue()}")
        out = _records(path)
    out["simulation_seconds"] = wall
    return out


# --- the machine -------------------------------------------------------------------------------

def machine_info(mpiexec: str | None) -> dict:
    mpi_version = None
    if mpiexec is not None:
        try:
            text = subprocess.run([mpiexec, "--version"], capture_output=True, text=True,
                                  timeout=30).stdout
            mpi_version = next((" ".join(line.split()) for line in text.splitlines()
                                if "Version" in line), text.strip()[:80]) or None
        except (OSError, subprocess.SubprocessError):
            pass
    info = _machine.machine_info()
    info.update(mpi4py=_machine.dist_version("mpi4py"), mpich=_machine.dist_version("mpich"),
                mpiexec=mpiexec, mpiexec_version=mpi_version)
    return info


# --- analysis ----------------------------------------------------------------------------------

def _median(xs):
    import numpy as np

    return float(np.median(xs)) if xs else None


def sweep_samples(runs: list[dict], sweep: str) -> list[float]:
    """Seconds per sample, the slowest rank's: the forward sweep, or forward + adjoint."""
    if sweep == "forward":
        return [r["forward"]["wall_time_max"] for r in runs]
    return [r["gradient_wall_time_max"] for r in runs]


def rank0_samples(runs: list[dict], sweep: str) -> list[float]:
    """The same from rank 0's clock only (what ``ptoc solve --json`` reports)."""
    if sweep == "forward":
        return [r["forward"]["wall_time"] for r in runs]
    return [r["forward"]["wall_time"] + r["adjoint"]["wall_time"] for r in runs]


def analyse(depths, measured: dict, simulated: dict, launch_set=LAUNCHES) -> dict:
    """Medians, per-step costs, predictions and speed-ups: ``out[sweep][depth][method]``."""
    out: dict = {}
    for sweep in SWEEPS:
        out[sweep] = {}
        for N in depths:
            ref = measured[(N, REFERENCE)]
            t_serial = _median(sweep_samples(ref[("serial", sweep)], sweep))
            out[sweep][N] = {}
            for method in METHODS:
                cell: dict = {"measured_s": {}, "measured_speedup": {}, "predicted_s": {},
                              "predicted_speedup": {}, "algorithmic_speedup": {},
                              "critical_path": {}, "iterations": {}}
                for label, _, _ in launch_set:
                    runs = measured.get((N, label), {}).get((method, sweep))
                    if runs:
                        t = _median(sweep_samples(runs, sweep))
                        cell["measured_s"][label] = t
                        cell["measured_speedup"][label] = t_serial / t
                    if runs:
                        cell.setdefault("call_s", {})[label] = \
                            _median([max(r["call_s_ranks"]) for r in runs])
                    if runs and label != REFERENCE:
                        cell.setdefault("measured_rank0_s", {})[label] = \
                            _median(rank0_samples(runs, sweep))
                # per-step cost of each sweep of the same solve on 1 rank x 1 thread
                parts = ("forward",) if sweep == "forward" else ("forward", "adjoint")
                runs = ref[(method, sweep)]
                cost = {part: _median([r[part]["wall_time"] for r in runs])
                        / runs[0][part]["steps_total"] for part in parts}
                cell["seconds_per_step"] = cost
                for P in sorted(p for n, p, m in simulated if n == N and m == method):
                    sim = simulated[(N, P, method)]
                    cp = {part: sim[part]["steps_critical_path"] for part in parts}
                    t_pred = sum(cp[part] * cost[part] for part in parts)
                    cell["critical_path"][P] = cp
                    cell["iterations"][P] = {part: sim[part]["iterations"] for part in parts}
                    cell["predicted_s"][P] = t_pred
                    cell["predicted_speedup"][P] = t_serial / t_pred
                    cell["algorithmic_speedup"][P] = N * len(parts) / sum(cp.values())
                out[sweep][N][method] = cell
            out[sweep][N]["serial_reference_s"] = t_serial
    return out


def _ms(t):
    return "-" if t is None else f"{t * 1e3:.3g}" if t < 1 else f"{t * 1e3:.0f}"


def _x(v):
    return "-" if v is None else f"{v:.2f}" if v < 10 else f"{v:.1f}"


def tables(analysis: dict, depths, measured: dict, launch_set=LAUNCHES) -> str:
    lines = []
    ps = sorted({P for sweep in SWEEPS for N in depths for method in METHODS
                 for P in analysis[sweep][N][method]["predicted_speedup"]})
    meas_p = measured_ranks(launch_set)
    for sweep in SWEEPS:
        what = "forward sweep" if sweep == "forward" else \
            "gradient (forward + adjoint sweep times)"
        lines.append(f"\n### Measured: {what}, median ms (MPI, slowest rank)\n")
        head = ["N", "method"] + [lab for lab, _, _ in launch_set] + \
            ["2 ranks, rank 0's clock", "iterations P=1 / P=2", "levels"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        parts = ("forward",) if sweep == "forward" else ("forward", "adjoint")
        for N in depths:
            for method in METHODS:
                cell = analysis[sweep][N][method]
                its = []
                for label in (REFERENCE, "2 ranks x 1 thread"):
                    runs = measured.get((N, label), {}).get((method, sweep))
                    its.append("+".join(str(runs[0][p]["iterations"]) for p in parts)
                               if runs else "-")
                runs = measured[(N, REFERENCE)][(method, sweep)][0]
                lv = runs["forward"]["levels"] or "-"
                lines.append("| " + " | ".join(
                    [str(N), method] + [_ms(cell["measured_s"].get(lab))
                                        for lab, _, _ in launch_set]
                    + [_ms(cell.get("measured_rank0_s", {}).get("2 ranks x 1 thread")),
                       " / ".join(its) if method != "serial" else "-", str(lv)]) + " |")
        call = "parallel_forward" if sweep == "forward" else "parallel_gradient"
        lines.append(f"\n### The whole `{call}` call, median ms (slowest rank; with the "
                     "set-up, " + ("" if sweep == "forward" else "the parameter gradient, ")
                     + "and the final gathers of " + ("the states" if sweep == "forward"
                                                      else "states, adjoints and gradient")
                     + " to every rank)\n")
        head = ["N", "method"] + [lab for lab, _, _ in launch_set] + \
            [f"sweeps' share, {REFERENCE}"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for N in depths:
            for method in METHODS:
                cell = analysis[sweep][N][method]
                calls = cell.get("call_s", {})
                share = (f"{cell['measured_s'][REFERENCE] / calls[REFERENCE]:.0%}"
                         if REFERENCE in calls else "-")
                lines.append("| " + " | ".join(
                    [str(N), method] + [_ms(calls.get(lab)) for lab, _, _ in launch_set]
                    + [share]) + " |")
        lines.append(f"\n### Speed-up over the serial {what.split(' (')[0]} on 1 rank x 1 "
                     "thread: measured (MPI) and predicted (critical path x per-step cost, "
                     "free communication)\n")
        head = ["N", "method"]
        for P in ps:
            head += ([f"meas. P={P}"] if P in meas_p else []) + [f"pred. P={P}"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for N in depths:
            for method in METHODS:
                c = analysis[sweep][N][method]
                row = [str(N), method]
                for P in ps:
                    if P in meas_p:
                        row.append(_x(c["measured_speedup"].get(meas_p[P])))
                    row.append(_x(c["predicted_speedup"].get(P)))
                lines.append("| " + " | ".join(row) + " |")
        lines.append(f"\n### Algorithmic speed-up, {what.split(' (')[0]}: serial layer steps / "
                     "layer steps on the critical path (critical path in brackets)\n")
        head = ["N", "method"] + [f"P={P}" for P in ps]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for N in depths:
            for method in METHODS:
                c = analysis[sweep][N][method]
                row = [str(N), method]
                for P in ps:
                    a = c["algorithmic_speedup"].get(P)
                    cp = c["critical_path"].get(P)
                    row.append("-" if a is None else f"{_x(a)} ({sum(cp.values())})")
                lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot(analysis: dict, depths, path: Path, title: str, launch_set=LAUNCHES) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8.5), sharex=True, sharey=True)
    ps = sorted({P for sweep in SWEEPS for N in depths for method in METHODS
                 for P in analysis[sweep][N][method]["predicted_speedup"]})
    meas_p = measured_ranks(launch_set)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, sweep in enumerate(SWEEPS):
        for j, method in enumerate(("parareal", "mgrit")):
            ax = axes[i, j]
            for k, N in enumerate(depths):
                c = analysis[sweep][N][method]
                col = colours[k % len(colours)]
                xs = [P for P in ps if P in c["predicted_speedup"]]
                ax.plot(xs, [c["predicted_speedup"][P] for P in xs], "-o", color=col, ms=3,
                        label=f"N={N} predicted")
                meas = [(P, c["measured_speedup"].get(label)) for P, label in meas_p.items()]
                meas = [(P, v) for P, v in meas if v is not None]
                ax.plot([P for P, _ in meas], [v for _, v in meas], "s", color=col, ms=8,
                        mfc="none", mew=1.5, label=f"N={N} measured (MPI)")
            ax.axhline(1.0, color="grey", lw=0.8, ls="--")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(ps)
            ax.set_xticklabels([str(P) for P in ps])
            ax.grid(True, which="both", alpha=0.3)
            ax.set_title(f"{method}, {'forward sweep' if sweep == 'forward' else 'gradient'}")
            if i == 1:
                ax.set_xlabel("ranks P (one core each)")
            if j == 0:
                ax.set_ylabel("speed-up over the serial sweep")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(5, len(depths)), fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.09, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- main --------------------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depths", type=int, nargs="+", help=f"N (default {DEPTHS})")
    parser.add_argument("--sim-ranks", type=int, nargs="+",
                        help=f"simulated P for the predictions (default {SIM_RANKS})")
    parser.add_argument("--quick", action="store_true",
                        help="N = 1024, 2048; P = 4, 16, 64; 2 repeats, 1 launch")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per launch")
    parser.add_argument("--launches", type=int, default=2,
                        help="launches per (N, ranks, threads), interleaved")
    parser.add_argument("--tol", type=float, default=1e-10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sim-budget", type=float, default=720.0,
                        help="seconds for the simulated runs; those not started by then "
                        "are skipped (their wall time is not used, only their step counts)")
    parser.add_argument("--cold-depths", type=int, nargs="*", default=None,
                        help="depths at which to also time single plain `mpiexec -n P python "
                        "-m ptoc solve` launches (default: the smallest depth; none to skip)")
    parser.add_argument("--mpi-ranks", type=int, nargs="+", default=[],
                        help="also measure these numbers of MPI ranks (one Numba thread "
                        "each) beside 1 and 2, e.g. 4 8 16 on a 16-core machine")
    parser.add_argument("--mpiexec", default=shutil.which("mpiexec"))
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per launch")
    parser.add_argument("--output", type=Path, default=None, help="JSON path (PNG beside it)")
    parser.add_argument("--no-json", action="store_true")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    if any(P < 1 for P in args.mpi_ranks):
        parser.error(f"--mpi-ranks must be >= 1, got {args.mpi_ranks}")

    depths = tuple(args.depths or (QUICK["depths"] if args.quick else DEPTHS))
    sim_ranks = tuple(sorted(set(args.sim_ranks or (QUICK["sim_ranks"] if args.quick
                                                    else SIM_RANKS))))
    repeats = QUICK["repeats"] if args.quick and args.repeats == 3 else args.repeats
    launches = QUICK["launches"] if args.quick and args.launches == 2 else args.launches
    cold_depths = depths[:1] if args.cold_depths is None else tuple(args.cold_depths)
    notes = []
    mpiexec = args.mpiexec
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        mpiexec = None
    launch_set = launch_configs(args.mpi_ranks)
    too_deep = [P for P in args.mpi_ranks if P > min(depths)]
    if too_deep:
        parser.error(f"--mpi-ranks {too_deep}: more ranks than layers (N = {min(depths)})")
    cores = os.cpu_count() or 1
    if any(r * t > cores for _, r, t in launch_set):
        notes.append(f"launches of more ranks x threads than the {cores} logical CPUs of "
                     "this machine are oversubscribed: their times say nothing about "
                     "parallel speed")
    if mpiexec is None:
        launch_set = tuple(lc for lc in launch_set if lc[1] == 1)
        cold_depths = ()
        notes.append("mpiexec or mpi4py not found: P = 1 runs as a plain process (one "
                     "rank, no MPI); P = 2 is not measured (pip install 'ptoc[mpi]').")

    info = machine_info(mpiexec)
    print("# Strong scaling across layers: ptoc serial / parareal / MGRIT")
    print(f"CPU: {info['cpu_model']} ({info['logical_cpus']} logical CPUs); python "
          f"{info['python']}, numpy {info['numpy']}, numba {info['numba']}, mpi4py "
          f"{info['mpi4py']}, mpiexec: {info['mpiexec_version'] or 'none'}")
    print("Problem: ptoc solve defaults (d=16, batch 32, T=1, tanh, seed "
          f"{args.seed}); N = {', '.join(map(str, depths))}; tol {args.tol:g}")
    print(f"MGRIT: {' '.join(MGRIT_ARGS)}; parareal: one chunk per rank, inject")
    print("Timed: each sweep's SolveResult.wall_time, slowest rank, warm processes "
          f"(1 untimed round), {repeats} rounds x {launches} launches, median; "
          "OPENBLAS_NUM_THREADS=1")
    for note in notes:
        print("Note:", note)
    print(flush=True)
    t_start = time.perf_counter()

    # (a) measured
    configs = [(m, s) for m in METHODS for s in SWEEPS]
    measured: dict = {}
    launch_walls: dict = {}
    for N in depths:
        solve_configs = [solve_args(N, m, s, args.tol, args.seed) for m, s in configs]
        order = list(launch_set)
        for _ in range(launches):
            for label, ranks, threads in order:
                results, wall = launch(mpiexec, ranks, threads, solve_configs, repeats, 1,
                                       args.timeout)
                cell = measured.setdefault((N, label), {})
                for (m, s), runs in zip(configs, results, strict=True):
                    cell.setdefault((m, s), []).extend(runs)
                launch_walls.setdefault((N, label), []).append(wall)
                med = {f"{m[:4]} {s[:4]}": _ms(_median(sweep_samples(cell[(m, s)], s)))
                       for m, s in configs}
                print(f"N={N:5d} {label:19s} launch {wall:5.1f} s; medians so far (ms): "
                      + ", ".join(f"{k} {v}" for k, v in med.items()), flush=True)
            order = order[1:] + order[:1]
    t_measured = time.perf_counter() - t_start

    # single plain ptoc solve launches (JIT loading inside the first sweep)
    cold: list = []
    for N in cold_depths:
        for ranks in (1, 2):
            for m, s in configs:
                rec = cold_launch(mpiexec, ranks, solve_args(N, m, s, args.tol, args.seed),
                                  args.timeout)
                rec.update(depth=N, method=m, sweep=s, ranks_launched=ranks)
                cold.append(rec)
        print(f"N={N}: {len(cold)} single `ptoc solve` launches done", flush=True)

    # (b) simulated step counts
    simulated: dict = {}
    sim_skipped = []
    t_sim0 = time.perf_counter()
    for P in sorted({1, 2, *sim_ranks, *args.mpi_ranks}):
        for N in depths:
            if P > N:
                continue
            for m in METHODS:
                if time.perf_counter() - t_sim0 > args.sim_budget:
                    sim_skipped.append((N, P, m))
                    continue
                simulated[(N, P, m)] = sim = simulate(N, P, m, args.tol, args.seed)
                print(f"simulated P={P:2d} N={N:5d} {m:8s}: critical path fwd "
                      f"{sim['forward']['steps_critical_path']}, adj "
                      f"{sim['adjoint']['steps_critical_path']} "
                      f"({sim['simulation_seconds']:.1f} s)", flush=True)
    t_sim = time.perf_counter() - t_sim0
    if sim_skipped:
        notes.append(f"--sim-budget {args.sim_budget:g} s spent: {len(sim_skipped)} simulated "
                     f"runs skipped: {sim_skipped}")

    # consistency: MPI step counts against the simulation's
    mismatches = []
    for N in depths:
        for label, ranks, _ in launch_set:
            for (m, s), runs in measured[(N, label)].items():
                sim = simulated.get((N, ranks, m))
                if sim is None:
                    continue
                for part in (("forward",) if s == "forward" else ("forward", "adjoint")):
                    got = runs[0][part]["steps_critical_path"]
                    want = sim[part]["steps_critical_path"]
                    if got != want:
                        mismatches.append(f"N={N} {label} {m} {s}/{part}: MPI critical path "
                                          f"{got}, simulated {want}")
    if mismatches:
        notes.extend(mismatches)

    analysis = analyse(depths, measured, simulated, launch_set)
    print(tables(analysis, depths, measured, launch_set))
    print()
    print("Per-step costs (1 rank x 1 thread, us per layer step; forward / adjoint):")
    for N in depths:
        c = {m: analysis["gradient"][N][m]["seconds_per_step"] for m in METHODS}
        cf = {m: analysis["forward"][N][m]["seconds_per_step"]["forward"] for m in METHODS}
        print(f"  N={N:5d}: " + "; ".join(
            f"{m} {cf[m] * 1e6:.2f} / {c[m]['adjoint'] * 1e6:.2f}" for m in METHODS))
    if cold:
        print("\nSingle plain launches `mpiexec -n P python -m ptoc solve ... --json` "
              "(one solve per process): the sweep's wall_time includes loading the compiled "
              "kernels; compare the warm medians above")
        print("| N | P | method | sweep | single-launch sweep ms | warm median ms | "
              "process s |")
        print("|---|---|---|---|---|---|---|")
        for rec in cold:
            s = rec["sweep"]
            single = rec["forward"]["wall_time"] + (rec["adjoint"]["wall_time"]
                                                    if s == "gradient" else 0.0)
            label = "1 rank x 1 thread" if rec["ranks_launched"] == 1 else "2 ranks x 1 thread"
            warm = analysis[s][rec["depth"]][rec["method"]]["measured_s"].get(label)
            print(f"| {rec['depth']} | {rec['ranks_launched']} | {rec['method']} | {s} | "
                  f"{_ms(single)} | {_ms(warm)} | {rec['process_wall_time']:.2f} |")
    elapsed = time.perf_counter() - t_start
    print(f"\n(measurements {t_measured / 60:.1f} min, simulations {t_sim / 60:.1f} min, "
          f"{elapsed / 60:.1f} min in all)")
    for note in notes:
        print("Note:", note)

    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = args.output or RESULTS / f"scaling_{stamp}.json"
    if not args.no_plot:
        try:
            png = path.with_suffix(".png")
            png.parent.mkdir(parents=True, exist_ok=True)
            plot(analysis, depths, png,
                 "ptoc strong scaling across layers (d=16, batch 32, T=1, tol 1e-10)\n"
                 "lines: predicted = critical path x per-step cost measured on 1 rank x 1 "
                 "thread (one core per rank, free communication); squares: measured (MPI)",
                 launch_set)
            print(f"Plot: {png}")
        except ImportError:
            print("Note: matplotlib is not installed; no plot")
    if not args.no_json:
        path.parent.mkdir(parents=True, exist_ok=True)

        def keyed(d):
            return {" | ".join(map(str, k)) if isinstance(k, tuple) else str(k):
                    keyed(v) if isinstance(v, dict) else v for k, v in d.items()}

        record = {
            "benchmark": "strong scaling across layers (ptoc solve)",
            "command": " ".join([Path(sys.argv[0]).name] + (list(argv) if argv is not None
                                                           else sys.argv[1:])),
            "date": _dt.datetime.now().isoformat(timespec="seconds"),
            "machine": info,
            "settings": {
                "depths": depths, "sim_ranks": sim_ranks, "repeats_per_launch": repeats,
                "launches": launches, "warmup_rounds": 1, "tol": args.tol, "seed": args.seed,
                "mgrit": " ".join(MGRIT_ARGS), "parareal": "one chunk per rank, inject",
                "launch_configs": [{"label": lab, "ranks": r, "numba_threads": t}
                                   for lab, r, t in launch_set],
                "reference": REFERENCE, "OPENBLAS_NUM_THREADS": "1",
                "solve_args": {f"{m} {s}": solve_args(0, m, s, args.tol, args.seed)[2:]
                               for m, s in configs},
            },
            "timed": ("each sweep's SolveResult.wall_time (the solve as `ptoc solve` runs it: "
                      "same parser, problem, solver and driver call), max over ranks, in "
                      "processes that already ran every configuration once, each solve after "
                      "a barrier; gradient = max over ranks of the forward sweep time + max "
                      "over ranks of the adjoint sweep time. "
                      "Samples keep rank 0's records (what `ptoc solve --json` reports), every "
                      "rank's sweep times and every rank's time for the whole driver call "
                      "(call_s_ranks, incl. the final gathers)"),
            "prediction": ("T_P = sum over sweeps of steps_critical_path(P, simulated) x "
                           "(median wall_time / steps_total on 1 rank x 1 thread, same method "
                           "and sweep); communication free; speed-up = T_serial / T_P, "
                           "T_serial = measured serial sweep(s) on 1 rank x 1 thread"),
            "notes": notes, "elapsed_s": elapsed, "simulation_s": t_sim,
            "launch_walls_s": keyed(launch_walls),
            "measured": keyed({k: keyed(v) for k, v in measured.items()}),
            "simulated": keyed(simulated),
            "single_launches": cold,
            "analysis": keyed(analysis),
        }
        path.write_text(json.dumps(record, indent=1, default=str) + "\n")
        print(f"JSON record: {path}")
    return 0


if __name__ == "__main__":
    if WORKER:
        sys.exit(worker(sys.argv[2]))
    sys.exit(main())
