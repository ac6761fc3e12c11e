#!/usr/bin/env python
"""ptoc's MGRIT against PyMGRIT 1.0.6 on the forward sweep of a ResNet (one process).

The problem (the solver benchmark of docs/benchmarks.md, the same as
``ptoc solve --sweep forward``):
``X_{n+1} = X_n + h tanh(X_n K_n^T + b_n)``, width d = 16, batch S = 32, N = 1024
layers, T = 1 (h = 1/N), K_n ~ N(0, 1/d), b_n ~ N(0, 1), X_0 ~ N(0, 1), float64,
random numbers drawn as ``ptoc solve --seed`` draws them.

What is timed (each call from the same X_0 and parameters; one call = one sample):

* ``numpy loop``: the plain serial sweep in NumPy, ``X[n+1] = X[n] + h *
  np.tanh(X[n] @ K[n].T + b[n])`` into a preallocated (N+1, S, d) array;
* ``ptoc serial``: ``ptoc.forward(net, params, X_0, target="cpu")`` (the serial sweep
  of the library; it also stores sigma' for an adjoint sweep) and the same with
  ``store_derivatives=False`` (states only, the work MGRIT replaces);
* ``ptoc serial kernel, 1 thread``: the CPU kernel of that sweep,
  ``ptoc.kernels.backend("cpu").forward_sweep(states, K, b, h, tanh, None, CHUNK)``,
  into one (N+1, S, d) array made once: what a layer step costs with nothing around
  it. Each MGRIT solve's time per layer step on one thread is compared with it
  (target: at most 1.2 times);
* ``ptoc MGRIT``: ``ptoc.parallel.driver.parallel_forward(net, params, X_0,
  MGRIT(...))`` on one rank: setup (level structure, stacking the weights of every
  level), the iterations and the copy of all N+1 states; with ``--threads`` Numba
  threads and, when that is more than one, also with one thread (PyMGRIT and the
  NumPy loop use one core);
* ``PyMGRIT``: an ``Application`` whose step is ``u + (t_stop - t_start) *
  tanh(u @ K[n].T + b[n])`` with ``n = round(t_start / h)`` (the weights of the layer at
  the step's start time: ptoc's ``coarse_weights="inject"``), ``simple_setup_problem(app,
  level, coarsening=4)``; timed in two parts, ``setup`` (``simple_setup_problem`` and
  the ``Mgrit(...)`` constructor, which allocates every level) and ``solve``
  (``Mgrit.solve()``). The ratio PyMGRIT/ptoc is taken on ``solve`` alone (the
  conservative choice: ptoc's time includes its setup); setup + solve is also given.

MGRIT settings, both libraries: coarsening m = 4, FCF relaxation (``cf_iter=1``),
V-cycles, no nested iteration, zero initial guess, stop when the 2-norm over the
finest C-points of the residuals ``r_i = Phi(u_{i-1}) - u_i`` is below 1e-10 (absolute).
Two configurations: two levels (PyMGRIT ``level=2``; ptoc ``max_levels=2``) and the
most levels (PyMGRIT ``level=6``: 1025, 257, 65, 17, 5, 2 points; ptoc ``max_levels=10,
min_coarse_steps=1``, which coarsens to the same grids).

The floor: in the same run the script times, on one thread, the two parts of a layer
step that no orchestration removes, the product ``K x + b`` and the activation, at this
shape (``profile_layer_step.py``'s compiled loops of the kernels' tile helpers). A
solve of ``n`` layer steps cannot take less than ``n`` times their sum, which bounds
the ratio PyMGRIT/ptoc any MGRIT of these steps can reach on one core; the script prints
that bound next to the target (20x).

Every implementation runs once untimed (warm-up, Numba compilation); then all are
timed in interleaved rounds (the order rotates every round; the garbage collector
runs between calls, not during them). Reported: the median and the minimum.

Usage::

    python benchmarks/bench_pymgrit.py              # 40 rounds, about a minute
    python benchmarks/bench_pymgrit.py --quick      # 5 rounds
    python benchmarks/bench_pymgrit.py --repeats 100 --threads 1

PyMGRIT calls ``np.in1d``, removed in NumPy 2.4; the script aliases ``np.in1d =
np.isin`` before importing it. Without PyMGRIT (the ``bench`` extra,
``pip install '.[bench]'``) the script says so and times ptoc and the loop only. A
JSON record (machine, versions, settings, every sample) goes to
``benchmarks/out/pymgrit_<timestamp>.json`` unless ``--no-json``.
"""

from __future__ import annotations

import os

# One BLAS thread: the NumPy loop and PyMGRIT multiply 32 x 16 by 16 x 16 matrices,
# which OpenBLAS runs on one thread anyway, but idle OpenBLAS workers busy-wait after
# a call and would take a core from the Numba threads timed next. Set before NumPy
# is imported; a value set by the user wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

import argparse  # noqa: E402
import datetime as _dt  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import _machine  # noqa: E402 - benchmarks/_machine.py
import numpy as np  # noqa: E402
import profile_layer_step  # noqa: E402 - benchmarks/profile_layer_step.py

import ptoc  # noqa: E402
from ptoc.parallel.driver import parallel_forward  # noqa: E402

if not hasattr(np, "in1d"):
    # removed in NumPy 2.4; PyMGRIT 1.0.6 calls it on 1-D time grids, where isin is the same
    setattr(np, "in1d", np.isin)  # noqa: B010 - setattr keeps the NumPy-2 lint quiet

try:
    from pymgrit.core.application import Application
    from pymgrit.core.mgrit import Mgrit
    from pymgrit.core.simple_setup_problem import simple_setup_problem
    from pymgrit.core.vector import Vector
    PYMGRIT_ERROR = None
except Exception as exc:  # noqa: BLE001 - ImportError, or mpi4py failing to load MPI
    Application = Vector = object
    Mgrit = simple_setup_problem = None
    PYMGRIT_ERROR = f"{type(exc).__name__}: {exc}"

WIDTH, BATCH, DEPTH, T_FINAL = 16, 32, 1024, 1.0
COARSENING, TOL = 4, 1e-10
#: (label, PyMGRIT level, ptoc max_levels); min_coarse_steps=1 makes ptoc coarsen to
#: PyMGRIT's grids (down to 2 points for N = 1024, m = 4).
CONFIGS = (("two-level", 2, 2), ("max-level", 6, 10))
TARGET_RATIO = 20.0
TARGET_STEP_RATIO = 1.2  # an MGRIT layer step against one of the serial sweep's kernel
STATE_TOL = 1e-11  # "about 1e-12 or better" for the final state against the serial sweep
RESULTS = Path(__file__).resolve().parent / "out"


# --- the problem -------------------------------------------------------------------------------

def make_problem(seed: int, depth: int = DEPTH):
    """Network, parameters and X_0, drawn in the order ``ptoc solve`` draws them
    (K, b, W, X), so ``ptoc solve --sweep forward --seed S`` solves the same problem."""
    rng = np.random.default_rng(seed)
    d = WIDTH
    net = ptoc.ResNet(width=d, depth=depth, T=T_FINAL, activation="tanh", n_in=d,
                      n_classes=2, opening="identity", gamma=0.0, gamma_t=0.0, gamma_c=0.0)
    K = rng.standard_normal((depth, d, d)) / np.sqrt(d)
    b = rng.standard_normal((depth, d))
    rng.standard_normal((2, d))  # the classifier weights of ptoc solve (unused here)
    X0 = rng.standard_normal((BATCH, d))
    params = ptoc.Params(K=K, b=b, K_in=None, b_in=None, W=np.zeros((2, d)), mu=np.zeros(2))
    return net, params, X0


def numpy_loop(K: np.ndarray, b: np.ndarray, X0: np.ndarray, h: float) -> np.ndarray:
    """The serial sweep in plain NumPy: all N+1 states."""
    X = np.empty((len(K) + 1,) + X0.shape)
    X[0] = X0
    for n in range(len(K)):
        X[n + 1] = X[n] + h * np.tanh(X[n] @ K[n].T + b[n])
    return X


# --- PyMGRIT: a vector and an application ---------------------------------------------------

class StateVector(Vector):
    """One (S, d) state as a PyMGRIT vector (a NumPy array; operators return new vectors)."""

    def __init__(self, values: np.ndarray):
        super().__init__()
        self.values = values

    def set_values(self, values):
        self.values = values

    def get_values(self):
        return self.values

    def clone(self):
        return StateVector(self.values.copy())

    def clone_zero(self):
        return StateVector(np.zeros_like(self.values))

    def clone_rand(self):
        return StateVector(np.random.default_rng().random(self.values.shape))

    def __add__(self, other):
        return StateVector(self.values + other.values)

    def __sub__(self, other):
        return StateVector(self.values - other.values)

    def __mul__(self, other):
        return StateVector(self.values * other)

    def norm(self):
        return np.linalg.norm(self.values)  # 2-norm of the flattened state (Frobenius)

    def pack(self):
        return self.values

    def unpack(self, values):
        self.values = values


class ResNetForward(Application):
    """The forward sweep as a PyMGRIT time-stepping problem on t = 0, h, ..., T."""

    def __init__(self, K: np.ndarray, b: np.ndarray, X0: np.ndarray, T: float):
        super().__init__(t_start=0.0, t_stop=T, nt=len(K) + 1)
        self.K, self.b = K, b
        self.steps_per_time = len(K) / T  # 1 / h
        self.vector_template = StateVector(np.zeros_like(X0))
        self.vector_t_start = StateVector(X0.copy())

    def step(self, u_start: StateVector, t_start: float, t_stop: float) -> StateVector:
        n = int(round(t_start * self.steps_per_time))  # the layer at the step's start
        u = u_start.values
        return StateVector(u + (t_stop - t_start) * np.tanh(u @ self.K[n].T + self.b[n]))


class CountingResNetForward(ResNetForward):
    """:class:`ResNetForward` that counts its steps (used in the untimed warm-up only)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.calls = 0  # simple_setup_problem deep-copies the application per level: one
        # counter per level, summed after the solve

    def step(self, u_start, t_start, t_stop):
        self.calls += 1
        return super().step(u_start, t_start, t_stop)


def pymgrit_solve(K, b, X0, level: int, count: bool = False):
    """One PyMGRIT solve; returns the phase times, all fine-grid states, its info and (with
    ``count``) the number of steps it took."""
    t0 = time.perf_counter()
    app = (CountingResNetForward if count else ResNetForward)(K, b, X0, T_FINAL)
    problem = simple_setup_problem(app, level=level, coarsening=COARSENING)
    mgrit = Mgrit(problem, tol=TOL, nested_iteration=False, cf_iter=1, cycle_type="V",
                  logging_lvl=30)
    t1 = time.perf_counter()
    info = mgrit.solve()
    t2 = time.perf_counter()
    states = np.stack([v.values for v in mgrit.u[0]])
    steps = sum(p.calls for p in problem) if count else None
    return {"setup": t1 - t0, "solve": t2 - t1}, states, info, steps


# --- runners: each returns {phase: seconds} and the states --------------------------------------

def make_runners(net, params, X0, threads: int) -> tuple[dict, dict]:
    """``(runners, meta)``: the implementations to time, and what each is."""
    import numba

    K, b, h = params.K, params.b, net.h
    runners, meta = {}, {}

    def timed(fn, nthreads=None):
        def run():
            if nthreads is not None:
                numba.set_num_threads(nthreads)
            t0 = time.perf_counter()
            out = fn()
            return {"call": time.perf_counter() - t0}, out
        return run

    runners["numpy loop"] = timed(lambda: (numpy_loop(K, b, X0, h), None))
    meta["numpy loop"] = {"kind": "serial", "threads": 1}
    runners["ptoc serial"] = timed(
        lambda: (ptoc.forward(net, params, X0, target="cpu").states, None), threads)
    meta["ptoc serial"] = {"kind": "serial", "threads": threads,
                           "call": 'ptoc.forward(net, params, X0, target="cpu")'}
    runners["ptoc serial, states only"] = timed(
        lambda: (ptoc.forward(net, params, X0, target="cpu", store_derivatives=False).states,
                 None), threads)
    meta["ptoc serial, states only"] = {
        "kind": "serial", "threads": threads,
        "call": 'ptoc.forward(net, params, X0, target="cpu", store_derivatives=False)'}
    kern = ptoc.kernels.backend("cpu")
    sweep_states = np.empty((len(K) + 1,) + X0.shape)  # opening "identity": x_0 = X_0

    def kernel_sweep():
        sweep_states[0] = X0
        kern.forward_sweep(sweep_states, K, b, h, ptoc.Activation.TANH.code, None,
                           ptoc._config.CHUNK)
        return sweep_states, None
    runners["ptoc serial kernel, 1 thread"] = timed(kernel_sweep, 1)
    meta["ptoc serial kernel, 1 thread"] = {
        "kind": "serial", "threads": 1,
        "call": 'ptoc.kernels.backend("cpu").forward_sweep(states, K, b, h, tanh, None, '
                'CHUNK) into one reused (N+1, S, d) array'}
    thread_counts = [threads] + ([1] if threads > 1 else [])
    for label, level, max_levels in CONFIGS:
        solver = ptoc.MGRIT(coarsening=COARSENING, max_levels=max_levels, min_coarse_steps=1,
                            relaxation="FCF", cycle="V", tol=TOL, coarse_weights="inject",
                            nested_iteration=False)
        for nt in thread_counts:
            name = f"ptoc MGRIT {label}, {nt} thread{'s' if nt > 1 else ''}"
            runners[name] = timed(lambda s=solver: parallel_forward(net, params, X0, s), nt)
            meta[name] = {"kind": "ptoc", "config": label, "threads": nt, "solver": repr(solver)}
        if PYMGRIT_ERROR is None:
            name = f"PyMGRIT {label}"

            def run(level=level, count=False):
                phases, states, info, steps = pymgrit_solve(K, b, X0, level, count)
                return phases, (states, info, steps)
            runners[name] = run
            meta[name] = {"kind": "pymgrit", "config": label, "threads": 1, "level": level,
                          "call": f"simple_setup_problem(app, level={level}, coarsening="
                                  f"{COARSENING}); Mgrit(problem, tol={TOL:g}, "
                                  "nested_iteration=False, cf_iter=1, cycle_type='V', "
                                  "logging_lvl=30).solve()"}
    return runners, meta


def step_floor(rounds: int = 7, tries: int = 3) -> dict:
    """The product and activation of one layer step at the benchmark's shape, on one
    thread (nanoseconds, ``profile_layer_step.measure``): what every layer step of any
    MGRIT costs at least with these kernels (on tiles, or on sample-major rows where the
    kernels skip the tiles, whichever is cheaper). The activation is that of a forward solve's
    step, ``x + h tanh(a)`` with no ``sigma'`` (``_activate_value_t``). The smallest of
    ``tries`` medians of ``rounds`` rounds each, part by part: a floor is a best case,
    and one burst of other work on the machine once moved a median by half."""
    import numba

    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        runs = [profile_layer_step.measure(WIDTH, BATCH, reps=20000, rounds=rounds)
                for _ in range(tries)]
    finally:
        numba.set_num_threads(threads)
    t = {part: min(run[part] for run in runs) for part in ("product", "activation, value")}
    t["activation"] = t.pop("activation, value")
    layout = "tiles"
    if all("rows product" in run for run in runs):
        rows = {part: min(run["rows " + part] for run in runs)
                for part in ("product", "activation, value")}
        # the floor of the kernels a one-thread solve runs: the cheaper of the two layouts
        if rows["product"] + rows["activation, value"] < t["product"] + t["activation"]:
            t = {"product": rows["product"], "activation": rows["activation, value"]}
            layout = "sample-major rows"
    step = t["product"] + t["activation"]
    return {"product_ns": t["product"], "activation_ns": t["activation"],
            "step_us": step * 1e-3, "rounds": rounds, "tries": tries, "layout": layout,
            "product_gflops": 2 * BATCH * WIDTH * WIDTH / t["product"]}


def time_rounds(runners: dict, repeats: int) -> dict:
    """``repeats`` interleaved rounds; ``{name: {phase: [seconds, ...]}}``."""
    samples: dict = {name: {} for name in runners}
    order = list(runners)
    for _ in range(repeats):
        for name in order:
            gc.collect()
            gc.disable()
            try:
                phases, _ = runners[name]()
            finally:
                gc.enable()
            for k, v in phases.items():
                samples[name].setdefault(k, []).append(v)
        order = order[1:] + order[:1]
    return samples


# --- the machine -------------------------------------------------------------------------------

def machine_info(threads: int) -> dict:
    info = _machine.machine_info()
    info.update(numba_threads=threads, numba_threading_layer=None,
                pymgrit=_machine.dist_version("pymgrit"), mpi4py=_machine.dist_version("mpi4py"),
                OPENBLAS_NUM_THREADS=os.environ.get("OPENBLAS_NUM_THREADS"))
    return info


# --- checks and output ---------------------------------------------------------------------------

def _fmt_ms(t: float) -> str:
    return f"{t * 1e3:.3g}" if t < 0.1 else f"{t * 1e3:.0f}"


def main(argv=None) -> int:
    import numba

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=40, help="timed rounds (default 40)")
    parser.add_argument("--quick", action="store_true", help="5 rounds")
    parser.add_argument("--threads", type=int, default=numba.config.NUMBA_NUM_THREADS,
                        help="Numba threads of the ptoc runs (default: all cores); with more "
                        "than one, ptoc MGRIT is also timed on one thread")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=None, help="JSON path")
    parser.add_argument("--no-json", action="store_true")
    args = parser.parse_args(argv)
    repeats = 5 if args.quick else args.repeats
    if repeats < 1 or args.threads < 1:
        parser.error("--repeats and --threads must be >= 1")
    notes = []
    if PYMGRIT_ERROR is not None:
        notes.append(f"PyMGRIT could not be imported ({PYMGRIT_ERROR}): only ptoc and the "
                     "NumPy loop are timed (pip install '.[bench]').")
    elif _machine.dist_version("pymgrit") != "1.0.6":
        notes.append(f"PyMGRIT {_machine.dist_version('pymgrit')} is installed; this "
                     "comparison was written for 1.0.6.")

    numba.set_num_threads(args.threads)
    info = machine_info(args.threads)
    net, params, X0 = make_problem(args.seed)
    runners, meta = make_runners(net, params, X0, args.threads)

    print("# ptoc MGRIT vs PyMGRIT: forward sweep, d=16, S=32, N=1024, T=1, tanh, float64")
    print(f"CPU: {info['cpu_model']} ({info['logical_cpus']} logical CPUs); python "
          f"{info['python']}, numpy {info['numpy']}, numba {info['numba']}, ptoc "
          f"{info['ptoc']}, pymgrit {info['pymgrit']}; Numba threads {args.threads}, "
          f"OPENBLAS_NUM_THREADS={info['OPENBLAS_NUM_THREADS']}")
    print(f"MGRIT: m={COARSENING}, FCF, V-cycle, tol {TOL:g} (absolute, 2-norm of the "
          "C-point residuals), no nested iteration, zero initial guess")
    print("Timed per call: the whole solve from X_0 (ptoc: parallel_forward incl. setup and "
          "the copy of all states; PyMGRIT: setup and solve() timed apart, ratio on solve())")
    for note in notes:
        print("Note:", note)
    print(flush=True)

    # warm-up and correctness (this also compiles the Numba kernels)
    t_start = time.perf_counter()
    outputs = {name: (run(count=True) if meta[name]["kind"] == "pymgrit" else run())[1]
               for name, run in runners.items()}
    reference = outputs["ptoc serial"][0]  # the serial sweep (ptoc.forward, cpu)
    loop_states = outputs["numpy loop"][0]
    results: dict = {}
    for name, out in outputs.items():
        m = meta[name]
        r: dict = {"meta": m}
        if m["kind"] == "ptoc":
            states, rec = out
            r.update(iterations=rec.iterations, levels=rec.levels, converged=rec.converged,
                     residuals=list(rec.residuals), steps_total=rec.steps_total)
        elif m["kind"] == "pymgrit":
            states, pinfo, steps = out
            conv = [float(c) for c in pinfo["conv"]]
            r.update(iterations=len(conv), levels=m["level"], converged=conv[-1] < TOL,
                     residuals=conv, steps_total=steps)
        else:
            states = out[0]
            r["steps_total"] = DEPTH
        r["max_diff_final_vs_serial"] = float(np.max(np.abs(states[-1] - reference[-1])))
        r["max_diff_all_vs_serial"] = float(np.max(np.abs(states - reference)))
        r["max_diff_final_vs_numpy_loop"] = float(np.max(np.abs(states[-1] - loop_states[-1])))
        results[name] = r
    del outputs

    samples = time_rounds(runners, repeats)
    # the same one-thread solves and the serial kernel again, each timed call right after
    # an untimed one of the same kind (warm caches): interleaved with NumPy and PyMGRIT,
    # the serial sweep starts from caches the others have filled, and MGRIT, which passes
    # over its grids many times, less so. The three alternate in rounds, so that the
    # machine's drift (10-20% within minutes) hits them alike: timed one after the other
    # in blocks, the kernel's time moved from 0.72 to 0.91 us per step between two runs
    alone_names = ["ptoc serial kernel, 1 thread"] + [
        f"ptoc MGRIT {label}, 1 thread" for label, _, _ in CONFIGS]
    for name in alone_names:
        for _ in range(3):
            runners[name]()
    alone_samples: dict[str, list[float]] = {name: [] for name in alone_names}
    for _ in range(max(5, repeats // 2)):
        for name in alone_names:
            runners[name]()
            alone_samples[name].append(runners[name]()[0]["call"])
    alone = {name: float(np.median(v)) for name, v in alone_samples.items()}
    floor = step_floor()
    elapsed = time.perf_counter() - t_start
    info["numba_threading_layer"] = numba.threading_layer()
    for name, r in results.items():
        r["samples_s"] = samples[name]
        main_phase = "solve" if "solve" in samples[name] else "call"
        r["median_s"] = {k: float(np.median(v)) for k, v in samples[name].items()}
        r["min_s"] = {k: float(np.min(v)) for k, v in samples[name].items()}
        if main_phase == "solve":
            tot = np.add(samples[name]["setup"], samples[name]["solve"])
            r["median_s"]["setup+solve"] = float(np.median(tot))
            r["min_s"]["setup+solve"] = float(np.min(tot))
        r["median"], r["min"] = r["median_s"][main_phase], r["min_s"][main_phase]

    loop = results["numpy loop"]["median"]
    print(f"Serial sweeps (median / min of {repeats} interleaved calls):")
    for name in ("numpy loop", "ptoc serial", "ptoc serial, states only",
                 "ptoc serial kernel, 1 thread"):
        r = results[name]
        print(f"  {name:26s} {_fmt_ms(r['median'])} ms / {_fmt_ms(r['min'])} ms  "
              f"({r['median'] / loop:.2f}x the NumPy loop, "
              f"{r['median'] / DEPTH * 1e6:.2f} us per layer; max |x_N - serial| "
              f"{r['max_diff_final_vs_serial']:.1e})")
    print()

    head = ["config", "implementation", "levels", "iterations", "final residual",
            "median ms", "min ms", "PyMGRIT / this (median)", "PyMGRIT / this (min)",
            "time / NumPy loop", "layer steps", "us / step", "max |x_N - serial|",
            "max |x_n - serial|, all n"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    summary = []
    for label, _, _ in CONFIGS:
        pm = results.get(f"PyMGRIT {label}")
        names = [n for n in results if results[n]["meta"].get("config") == label]
        names.sort(key=lambda n: (results[n]["meta"]["kind"] != "pymgrit",
                                  -results[n]["meta"]["threads"]))
        for name in names:
            r = results[name]
            if pm is not None and r is not pm:
                r["ratio_pymgrit_solve_median"] = pm["median"] / r["median"]
                r["ratio_pymgrit_solve_min"] = pm["min"] / r["min"]
                r["ratio_pymgrit_setup_solve_median"] = pm["median_s"]["setup+solve"] / \
                    r["median"]
            r["ratio_to_numpy_loop"] = r["median"] / loop
            shown = name + (" (solve)" if r["meta"]["kind"] == "pymgrit" else "")
            lines.append("| " + " | ".join([
                label, shown, str(r["levels"]), str(r["iterations"]),
                f"{r['residuals'][-1]:.2e}", _fmt_ms(r["median"]), _fmt_ms(r["min"]),
                f"{r['ratio_pymgrit_solve_median']:.1f}x" if "ratio_pymgrit_solve_median" in r
                else "-",
                f"{r['ratio_pymgrit_solve_min']:.1f}x" if "ratio_pymgrit_solve_min" in r
                else "-",
                f"{r['ratio_to_numpy_loop']:.1f}x", str(r["steps_total"]),
                f"{r['median'] / r['steps_total'] * 1e6:.2f}",
                f"{r['max_diff_final_vs_serial']:.1e}", f"{r['max_diff_all_vs_serial']:.1e}",
            ]) + " |")
        if pm is not None:
            lines.append("| " + " | ".join([
                label, "PyMGRIT (setup + solve)", "", "", "",
                _fmt_ms(pm["median_s"]["setup+solve"]), _fmt_ms(pm["min_s"]["setup+solve"]),
                "", "", f"{pm['median_s']['setup+solve'] / loop:.1f}x", "", "", "", ""]) + " |")
            best = results[f"ptoc MGRIT {label}, {args.threads} thread"
                           f"{'s' if args.threads > 1 else ''}"]
            ratio = best["ratio_pymgrit_solve_median"]
            one = results[f"ptoc MGRIT {label}, 1 thread"]
            bound = pm["median"] / (one["steps_total"] * floor["step_us"] * 1e-6)
            one["floor_ratio_bound"] = bound
            it_ok = abs(best["iterations"] - pm["iterations"]) <= 1
            summary.append(
                f"{label}: PyMGRIT/ptoc = {ratio:.1f}x (median, PyMGRIT solve() alone; "
                f"{best['ratio_pymgrit_setup_solve_median']:.1f}x with its setup) - target >= "
                f"{TARGET_RATIO:g}x {'met' if ratio >= TARGET_RATIO else 'NOT met'}; "
                f"iterations ptoc {best['iterations']}, PyMGRIT {pm['iterations']} "
                f"({'match within one' if it_ok else 'DIFFER by more than one'}); "
                f"on one core no MGRIT of these {one['steps_total']} steps can exceed "
                f"{bound:.1f}x (the floor below)")
    kernel_us = results["ptoc serial kernel, 1 thread"]["median"] / DEPTH * 1e6
    kernel_alone_us = alone["ptoc serial kernel, 1 thread"] / DEPTH * 1e6
    results["ptoc serial kernel, 1 thread"]["median_alone_s"] = \
        alone["ptoc serial kernel, 1 thread"]
    for label, _, _ in CONFIGS:
        name = f"ptoc MGRIT {label}, 1 thread"
        one = results[name]
        step_us = one["median"] / one["steps_total"] * 1e6
        alone_us = alone[name] / one["steps_total"] * 1e6
        one["median_alone_s"] = alone[name]
        one["step_ratio_to_serial_kernel"] = step_us / kernel_us
        one["step_ratio_to_serial_kernel_alone"] = alone_us / kernel_alone_us
        verdict = ("met" if max(step_us / kernel_us, alone_us / kernel_alone_us)
                   <= TARGET_STEP_RATIO else "NOT met")
        summary.append(
            f"{label}: one thread, {step_us:.2f} us per layer step = "
            f"{step_us / kernel_us:.2f}x the serial sweep kernel's {kernel_us:.2f} us in the "
            f"interleaved rounds; {alone_us:.2f} us = {alone_us / kernel_alone_us:.2f}x "
            f"its {kernel_alone_us:.2f} us timed alone, caches warm (target <= "
            f"{TARGET_STEP_RATIO:g}x both ways: {verdict})")
    print("\n".join(lines))
    print()
    print(f"Floor of one layer step on one thread (d={WIDTH}, S={BATCH}, the kernels' "
          f"loops alone on {floor.get('layout', 'tiles')}, the cheaper layout; smallest of "
          f"{floor.get('tries', 1)} medians of {floor['rounds']} "
          f"rounds): product K x + b "
          f"{floor['product_ns']:.0f} ns + activation {floor['activation_ns']:.0f} ns = "
          f"{floor['step_us']:.3f} us (the product at {floor['product_gflops']:.1f} GFLOP/s); "
          "a solve of n steps takes at least n times this")
    print()
    for label, _, _ in CONFIGS:
        for name, r in results.items():
            if r["meta"].get("config") == label:
                err = max(r["max_diff_final_vs_serial"], r["max_diff_all_vs_serial"])
                if err > STATE_TOL:
                    summary.append(f"{name}: states differ from the serial sweep by {err:.1e} "
                                   f"> {STATE_TOL:g}")
    for line in summary:
        print(line)
    if not summary:
        print("(no PyMGRIT: no ratios)")

    # residual histories side by side
    if PYMGRIT_ERROR is None:
        for label, _, _ in CONFIGS:
            a = results[f"ptoc MGRIT {label}, {args.threads} thread"
                        f"{'s' if args.threads > 1 else ''}"]["residuals"]
            p = results[f"PyMGRIT {label}"]["residuals"]
            print(f"\nResidual history, {label} (both: sqrt(sum over C-points i >= 1 of "
                  "||Phi(u_{i-1}) - u_i||_F^2) after each iteration)")
            print("| iteration | ptoc SolveResult.residuals | PyMGRIT info['conv'] | "
                  "absolute difference | relative difference |")
            print("|---|---|---|---|---|")
            for k in range(max(len(a), len(p))):
                ra = f"{a[k]:.9e}" if k < len(a) else "-"
                rp = f"{p[k]:.9e}" if k < len(p) else "-"
                both = k < min(len(a), len(p))
                diff = f"{abs(a[k] - p[k]):.1e}" if both else "-"
                rel = f"{abs(a[k] - p[k]) / p[k]:.1e}" if both else "-"
                print(f"| {k + 1} | {ra} | {rp} | {diff} | {rel} |")
    print(f"\n({repeats} interleaved rounds, {elapsed:.0f} s in all; warm-up and JIT "
          "compilation excluded)")

    if not args.no_json:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        path = args.output or RESULTS / f"pymgrit_{stamp}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "benchmark": "ptoc MGRIT vs PyMGRIT, forward sweep",
            "command": " ".join([Path(sys.argv[0]).name] + (list(argv) if argv is not None
                                                           else sys.argv[1:])),
            "date": _dt.datetime.now().isoformat(timespec="seconds"),
            "machine": info,
            "problem": {"width": WIDTH, "batch": BATCH, "depth": DEPTH, "T": T_FINAL,
                        "activation": "tanh", "dtype": "float64", "seed": args.seed,
                        "K": "N(0, 1/d)", "b": "N(0, 1)", "X0": "N(0, 1)",
                        "draw_order": "K, b, W, X (as ptoc solve)"},
            "settings": {"coarsening": COARSENING, "relaxation": "FCF", "cycle": "V",
                         "tol": TOL, "nested_iteration": False, "coarse_weights": "inject",
                         "configs": [{"label": lab, "pymgrit_level": lv, "ptoc_max_levels": ml,
                                      "ptoc_min_coarse_steps": 1} for lab, lv, ml in CONFIGS],
                         "repeats": repeats, "statistic": "median (min also given)",
                         "interleaved": True},
            "timed": {
                "ptoc": "parallel_forward(...) on one rank: setup, iterations, copy of all "
                        "states",
                "pymgrit": "setup = simple_setup_problem + Mgrit(); solve = Mgrit.solve(); "
                           "ratios on solve",
                "numpy loop": "X[n+1] = X[n] + h*np.tanh(X[n] @ K[n].T + b[n]) into a "
                              "preallocated array",
            },
            "notes": notes, "summary": summary, "elapsed_s": elapsed, "floor": floor,
            "results": results,
        }
        path.write_text(json.dumps(record, indent=1) + "\n")
        print(f"JSON record: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
