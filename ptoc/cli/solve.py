"""``ptoc solve``: one layer-parallel solve from the command line, on simulated or MPI ranks.

This is the subcommand that runs under ``mpiexec``: every rank parses the same options
and fails the same way on bad input, before any message is sent, so no rank is left
waiting.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from .arguments import (
    Formatter,
    nonnegative_int,
    positive_float,
    positive_int,
    refuse_unread_options,
)
from .errors import CLIError

__all__ = ["add_parser", "run"]

#: Environment variables of which any one means that this process runs under ``mpiexec``.
MPI_ENV = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")

#: Defaults of the solver options that only some methods read.
METHOD_OPTION_DEFAULTS = {
    "coarsening": 4, "levels": 10, "min_coarse": 2, "relaxation": "FCF", "cycle": "V",
    "coarse_weights": "inject", "nested": False, "tol": 1e-10, "max_iterations": 50,
}

#: Which of :data:`METHOD_OPTION_DEFAULTS` each ``--method`` reads.
METHOD_OPTIONS = {
    "serial": (),
    "parareal": ("tol", "max_iterations"),
    "mgrit": tuple(METHOD_OPTION_DEFAULTS),
}


def add_parser(sub) -> None:
    """Register the ``solve`` subcommand on the subparsers ``sub``."""
    s = sub.add_parser(
        "solve",
        help="solve the state/adjoint sweeps layer-parallel (serial, parareal, MGRIT)",
        description=(
            "Solve the forward (state) sweep, the adjoint sweep, or both with the\n"
            "gradient, of a ResNet layer-parallel and print the iterations, the residual\n"
            "history, the time and the layer steps in total and on the critical path\n"
            "(theory: docs/theory/parareal.md and docs/theory/mgrit.md).\n\n"
            "The default problem is the solver benchmark of docs/benchmarks.md:\n"
            "X_{n+1} = X_n + h tanh(X_n K_n^T + b_n), d = 16, batch 32, N = 1024, T = 1,\n"
            "K_n ~ N(0, 1/d), b_n ~ N(0, 1), X_0 ~ N(0, 1) (an identity opening layer).\n\n"
            "Ranks: under mpiexec every rank takes its share of the layers (MPI);\n"
            "otherwise --ranks simulates that many ranks in this process. Set\n"
            "OPENBLAS_NUM_THREADS=1 under mpiexec; Numba uses cores/ranks threads per rank\n"
            "unless NUMBA_NUM_THREADS is set.\n\n"
            "example: mpiexec -n 4 ptoc solve --method mgrit --coarsening 4"),
        epilog=("exit codes: 0 solved to the tolerance, 1 diverged, 2 bad options, "
                "3 stopped short of the tolerance (at --max-iterations, or stagnated)"),
        formatter_class=Formatter)
    g = s.add_argument_group("problem")
    g.add_argument("--width", type=positive_int, default=16, help="state dimension d")
    g.add_argument("--depth", type=positive_int, default=1024, help="number of layers N")
    g.add_argument("--batch", type=positive_int, default=32, help="samples S")
    g.add_argument("--T", type=positive_float, default=1.0, help="final time")
    g.add_argument("--activation", choices=("tanh", "relu", "smoothrelu"), default="tanh")
    g.add_argument("--seed", type=nonnegative_int, default=0, help="seed of K, b, X, labels")
    g.add_argument("--sweep", choices=("forward", "adjoint", "gradient"), default="gradient",
                   help="what to solve (gradient: both sweeps and the parameter gradient)")
    g = s.add_argument_group("solver")
    g.add_argument("--method", choices=tuple(METHOD_OPTIONS), default="mgrit",
                   help="serial sweep, parareal (one chunk per rank) or MGRIT; the options "
                   "below that name a method are refused with another one")
    d = METHOD_OPTION_DEFAULTS
    g.add_argument("--coarsening", type=positive_int, default=d["coarsening"],
                   help="MGRIT factor m (>= 2)")
    g.add_argument("--levels", type=positive_int, default=d["levels"], help="MGRIT max levels")
    g.add_argument("--min-coarse", type=positive_int, default=d["min_coarse"],
                   help="MGRIT: fewest steps on the coarsest grid")
    g.add_argument("--relaxation", choices=("F", "FCF"), default=d["relaxation"],
                   help="MGRIT relaxation")
    g.add_argument("--cycle", choices=("V", "F"), default=d["cycle"], help="MGRIT cycle")
    g.add_argument("--coarse-weights", choices=("inject", "average"),
                   default=d["coarse_weights"], help="MGRIT: weights of a coarse step")
    g.add_argument("--nested", action="store_true", help="MGRIT nested iteration")
    g.add_argument("--tol", type=positive_float, default=d["tol"],
                   help="parareal, MGRIT: absolute residual tolerance")
    g.add_argument("--max-iterations", type=positive_int, default=d["max_iterations"],
                   help="parareal, MGRIT: most iterations")
    g = s.add_argument_group("run")
    g.add_argument("--ranks", type=positive_int, default=1,
                   help="simulated ranks when not under mpiexec")
    g.add_argument("--repeat", type=positive_int, default=1,
                   help="solve this many times and report the median time (the first solve "
                   "also loads the compiled kernels)")
    g.add_argument("--check", action="store_true",
                   help="also run the serial sweep and print the largest relative differences")
    g.add_argument("--json", metavar="PATH", help="write the records as JSON (rank 0)")
    g.add_argument("--save", metavar="PATH",
                   help="write states, adjoints and gradient as an .npz archive to exactly "
                   "PATH, e.g. solution.npz (rank 0; no suffix is added)")
    g.add_argument("--plot", metavar="PATH",
                   help="draw the residual history of the (last) solve, log scale, with the "
                   "tolerance, into an image such as residuals.png (rank 0; parareal and "
                   "MGRIT)")
    s.set_defaults(func=run)


def _under_mpi() -> bool:
    return any(k in os.environ for k in MPI_ENV)


def _problem(args):
    import ptoc

    rng = np.random.default_rng(args.seed)
    net = ptoc.ResNet(width=args.width, depth=args.depth, T=args.T, activation=args.activation,
                      n_in=args.width, n_classes=2, opening="identity", gamma=0.0, gamma_t=0.0,
                      gamma_c=0.0)
    d = args.width
    params = ptoc.Params(K=rng.standard_normal((args.depth, d, d)) / np.sqrt(d),
                         b=rng.standard_normal((args.depth, d)), K_in=None, b_in=None,
                         W=rng.standard_normal((2, d)) / np.sqrt(d), mu=np.zeros(2))
    X = rng.standard_normal((args.batch, d))
    y = rng.integers(0, 2, args.batch)
    return net, params, X, y


def _solver(args):
    import ptoc

    if args.method == "serial":
        return ptoc.Serial()
    if args.method == "parareal":
        return ptoc.Parareal(tol=args.tol, max_iterations=args.max_iterations)
    return ptoc.MGRIT(coarsening=args.coarsening, max_levels=args.levels,
                      min_coarse_steps=args.min_coarse, relaxation=args.relaxation,
                      cycle=args.cycle, tol=args.tol, max_iterations=args.max_iterations,
                      coarse_weights=args.coarse_weights, nested_iteration=args.nested)


def _check_outputs(args: argparse.Namespace) -> None:
    """``--json``, ``--save`` and ``--plot`` must be writable files, checked before the solve."""
    from ptoc.io import check_output_file

    if args.plot and args.method == "serial":
        raise CLIError("argument --plot: the serial sweep has no residual history; use "
                       "--method parareal or mgrit")
    for option in ("json", "save", "plot"):
        path = getattr(args, option)
        if path is None:
            continue
        try:
            check_output_file(path)
        except ValueError as exc:
            raise CLIError(f"argument --{option}: {exc}") from None
    if args.plot:
        from matplotlib.figure import Figure

        formats = Figure().canvas.get_supported_filetypes()
        suffix = os.path.splitext(args.plot)[1].lstrip(".").lower()
        if suffix not in formats:
            raise CLIError(f"argument --plot: {args.plot!r} needs the suffix of an image "
                           f"format, one of {', '.join(sorted(formats))} (e.g. residuals.png)")


def _residual_line(rec) -> str:
    """The residual history of ``rec``, saying which iteration each value belongs to."""
    its = rec.residual_iterations
    first = ", 0 is the coarse prediction" if its[0] == 0 else ""
    return ("  residuals: " + " ".join(f"{r:.2e}" for r in rec.residuals)
            + f" (after iterations {its[0]}..{its[-1]}{first})")


def run(args: argparse.Namespace) -> int:
    """Run ``ptoc solve``; return the exit code (0, 1 diverged, 3 not converged)."""
    import ptoc
    from ptoc.io import atomic_write, atomic_write_text
    from ptoc.parallel import MPIRanks, SimulatedRanks, SingleRank
    from ptoc.parallel.driver import parallel_adjoint, parallel_forward, parallel_gradient

    refuse_unread_options(args, args.method, METHOD_OPTIONS, METHOD_OPTION_DEFAULTS)
    if _under_mpi() and args.ranks != 1:
        raise CLIError("argument --ranks: simulates ranks without mpiexec; under mpiexec the "
                       "ranks are mpiexec's (-n)")
    _check_outputs(args)
    try:
        solver = _solver(args)
        net, params, X, y = _problem(args)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    if _under_mpi():
        comm = MPIRanks()
        if "NUMBA_NUM_THREADS" not in os.environ and comm.size > 1:
            import numba

            numba.set_num_threads(max(1, min(numba.config.NUMBA_NUM_THREADS,
                                             (os.cpu_count() or 1) // comm.size)))
    else:
        comm = SimulatedRanks(args.ranks) if args.ranks > 1 else SingleRank()
    rank = getattr(comm, "rank", 0)

    def say(*a):
        if rank == 0:
            print(*a, flush=True)

    say(f"ptoc solve: {net.describe()}, batch {args.batch}; {args.method} on {comm.size} "
        f"{'MPI' if isinstance(comm, MPIRanks) else 'simulated'} rank(s), sweep "
        f"{args.sweep}")
    def solve_once():
        if args.sweep == "forward":
            states, rec = parallel_forward(net, params, X, solver, comm=comm)
            return [rec], {"states": states}
        if args.sweep == "adjoint":
            states = ptoc.forward(net, params, X).states
            lam_N = ptoc.objective.classifier_loss(params, states[-1], y)[1]
            lams, gK, gb, rec = parallel_adjoint(net, params, states, lam_N, solver, comm=comm)
            return [rec], {"adjoints": lams, "grad_K": gK, "grad_b": gb}
        res = parallel_gradient(net, params, X, y, solver, comm=comm)
        out = {"states": res.states, "adjoints": res.adjoints, "loss": res.loss}
        out.update({f"grad_{k}": v for k, v in res.grads.items()})
        return [res.forward, res.adjoint], out

    t0 = time.perf_counter()
    times = []
    try:
        for _ in range(args.repeat):
            records, out = solve_once()
            times.append([r.wall_time for r in records])
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    except ptoc.DivergenceError as exc:
        say(f"ptoc: error: {exc}")
        return 1
    wall = time.perf_counter() - t0
    medians = np.median(np.array(times), axis=0)
    for rec, med in zip(records, medians, strict=True):
        say(rec.summary())
        if rec.residuals:
            say(_residual_line(rec))
        if args.repeat > 1:
            say(f"  time {med:.4f} s (median of {args.repeat} solves; the first "
                f"{times[0][list(records).index(rec)]:.4f} s)")
        else:
            say(f"  time {rec.wall_time:.4f} s (includes loading the compiled kernels; use "
                "--repeat for warm timings)")
    say(f"total time {wall:.3f} s")
    check = {}
    if args.check and rank == 0:
        serial_states = ptoc.forward(net, params, X).states
        if "states" in out:
            check["states"] = float(np.max(np.abs(out["states"] - serial_states))
                                    / np.max(np.abs(serial_states)))
        if args.sweep == "gradient":
            _, g = ptoc.loss_and_grad(net, params, X, y)
            check["gradient"] = max(float(np.max(np.abs(out[f"grad_{k}"] - g[k]))
                                          / max(np.max(np.abs(g[k])), 1e-300)) for k in g)
        for k, v in check.items():
            print(f"  max relative difference from the serial sweep, {k}: {v:.2e}")
    if rank == 0 and args.json:
        record = {"problem": vars(args) | {"func": None}, "ranks": comm.size,
                  "mpi": isinstance(comm, MPIRanks), "wall_time": wall,
                  "records": [vars(r) for r in records], "check": check,
                  "solve_times": times}
        atomic_write_text(args.json, json.dumps(record, indent=1, default=str))
        print(f"records: {args.json}")
    if rank == 0 and args.save:
        atomic_write(args.save, lambda f: np.savez(f, **out))
        print(f"wrote {', '.join(out)} to {args.save} (an .npz archive)")
    if rank == 0 and args.plot:
        from ptoc.plotting import plot_residuals

        where = f"{comm.size} {'MPI' if isinstance(comm, MPIRanks) else 'simulated'} rank(s)"
        path = plot_residuals({f"{r.sweep} sweep": r for r in records}, args.plot,
                              tol=args.tol, title=f"ptoc solve: {args.method} on {where}\n"
                              f"{net.describe()}, batch {args.batch}")
        print(f"residual history: {path}")
    stuck = [r for r in records if r.stagnated]
    if stuck:
        r = stuck[0]
        say(f"ptoc: the {r.sweep} sweep stagnated at residual {min(r.residuals):.3g} after "
            f"{r.iterations} iterations, short of --tol {args.tol:g}: more iterations will "
            "not help; raise --tol (exit code 3)")
        return 3
    if not all(r.converged for r in records):
        say("ptoc: the solve stopped at --max-iterations before reaching the tolerance "
            "(exit code 3); raise --max-iterations or --tol")
        return 3
    return 0

