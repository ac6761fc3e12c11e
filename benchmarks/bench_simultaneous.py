#!/usr/bin/env python
"""Serial against simultaneous layer-parallel training on Peaks.

The setting of Günther et al. (2020) for Peaks: a ResNet of width 8 and 32 layers,
SmoothReLU, ``T = 5``, trained full batch with L-BFGS (memory 10, Armijo
backtracking from step 1) from ``init_params(seed)`` on ``ptoc.data.peaks()`` (5000
training, 200 validation points). Two gradients drive the same optimiser:

* ``serial``: the exact gradient (serial state and adjoint sweeps);
* ``simultaneous``: :class:`ptoc.simultaneous.SimultaneousGradient`, only
  ``--mgrit-iterations`` MGRIT iterations (default 2) per sweep and gradient
  evaluation, warm-started from the previous evaluation's layer-space solution, on
  P = 4, 8, 16 simulated ranks.

Reported per run: validation accuracy and loss after the same numbers of optimisation
steps, gradient evaluations (L-BFGS's line search evaluates more than once per step; the
exact gradient is deterministic, so its evaluation at the point a line search accepts
also starts the next step, while the warm-started simultaneous gradient is evaluated
there again, see ``ptoc.methods.GradientMethod``), and layer steps on the critical path
in all: for serial training ``2N`` per evaluation (one forward and one adjoint sweep,
one layer step each), for simultaneous training the sum over evaluations of MGRIT's
counted critical path of both sweeps (Lamport clocks of the simulated ranks, a coarse
step counted as one).
Every ``--exact-every`` evaluations the relative distance of the inexact gradient
from the exact one is recorded. Two MGRIT settings: ``default`` (``ptoc train
--method simultaneous``: m = 4, FCF, as many levels as fit) and ``cheap`` (m = 4, two
levels, F-relaxation: the shortest critical path at this depth).

Nothing is timed: the numbers are counts and accuracies, so the run may share the
machine. Usage::

    python benchmarks/bench_simultaneous.py            # 100 L-BFGS steps, ~3 minutes
    python benchmarks/bench_simultaneous.py --quick    # 15 steps, P = 4

Writes ``benchmarks/out/simultaneous_<timestamp>.json`` and a PNG of validation
accuracy against steps and against critical-path layer steps.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

import ptoc
from ptoc.optim import LBFGS
from ptoc.parallel import MGRIT, Relaxation
from ptoc.simultaneous import SimultaneousGradient
from ptoc.training import train

RESULTS = Path(__file__).resolve().parent / "out"

SOLVERS = {
    "default": dict(coarsening=4, relaxation=Relaxation.FCF),
    "cheap": dict(coarsening=4, relaxation=Relaxation.F, max_levels=2),
}


def run(net, data, steps, seed, grad_fn=None):
    result = train(net, net.init_params(seed), data, optimizer=LBFGS(), epochs=steps,
                   batch_size=None, seed=seed, grad_fn=grad_fn, progress=False)
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=100, help="L-BFGS steps")
    ap.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--mgrit-iterations", type=int, default=2)
    ap.add_argument("--exact-every", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--depth", type=int, default=32)
    ap.add_argument("--report", type=int, nargs="+", default=[10, 25, 50, 100],
                    help="steps at which accuracies are tabulated")
    ap.add_argument("--quick", action="store_true", help="15 steps on 4 ranks")
    ap.add_argument("--no-json", action="store_true")
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.ranks, args.report = 15, [4], [5, 15]
    report = [s for s in args.report if s <= args.steps]

    data = ptoc.data.peaks()
    net = ptoc.ResNet(width=8, depth=args.depth, T=5.0, activation="smoothrelu",
                      n_in=data.n_in, n_classes=data.n_classes)
    N = net.depth
    record = {"settings": vars(args) | {"network": net.describe(), "T": 5.0,
                                        "data": data.name, "n_train": len(data.y_train),
                                        "n_val": len(data.y_val)},
              "machine": {"python": sys.version.split()[0], "platform": platform.platform(),
                          "ptoc": ptoc.__version__},
              "runs": []}

    calls = []

    def exact(p, X, y):
        calls.append(1)
        return ptoc.loss_and_grad(net, p, X, y)

    exact.deterministic = True  # as the default exact gradient: reused at accepted points

    t0 = time.perf_counter()
    serial = run(net, data, args.steps, args.seed, grad_fn=exact)
    runs = [{"name": "serial", "ranks": 1, "solver": "exact",
             "val_accuracy": serial.history.column("val_accuracy").tolist(),
             "val_loss": serial.history.column("val_loss").tolist(),
             "train_loss": serial.history.column("train_loss").tolist(),
             "evaluations": len(calls),
             "critical_per_eval": [2 * N] * len(calls),
             "seconds": time.perf_counter() - t0}]
    print(f"serial: {len(calls)} gradient evaluations, final validation accuracy "
          f"{serial.val_accuracy:.3f}", flush=True)
    for sname, skw in SOLVERS.items():
        for P in args.ranks:
            t0 = time.perf_counter()
            solver = MGRIT(max_iterations=args.mgrit_iterations, tol=1e-13, **skw)
            grad = SimultaneousGradient(net, solver, comm=P, exact_every=args.exact_every)
            res = run(net, data, args.steps, args.seed, grad_fn=grad)
            errors = [r.grad_error for r in grad.records if r.grad_error is not None]
            runs.append({
                "name": f"simultaneous-{sname}", "ranks": P, "solver": repr(solver),
                "val_accuracy": res.history.column("val_accuracy").tolist(),
                "val_loss": res.history.column("val_loss").tolist(),
                "train_loss": res.history.column("train_loss").tolist(),
                "evaluations": len(grad.records),
                "critical_per_eval": [r.steps_critical_path for r in grad.records],
                "total_per_eval": [r.steps_total for r in grad.records],
                "grad_errors": errors,
                "diverged": res.diverged, "reason": res.reason,
                "seconds": time.perf_counter() - t0})
            print(f"simultaneous {sname} P={P}: {len(grad.records)} evaluations, final "
                  f"validation accuracy {res.val_accuracy:.3f}, median gradient error "
                  f"{np.median(errors) if errors else float('nan'):.2e}", flush=True)
    record["runs"] = runs

    head = (f"{'run':<22}{'P':>3}" + "".join(f"{'acc@' + str(s):>9}" for s in report)
            + f"{'evals':>7}{'crit/eval':>10}{'crit total':>11}{'vs serial':>10}"
            + f"{'grad err':>10}")
    print()
    print(head)
    base = sum(runs[0]["critical_per_eval"])
    for r in runs:
        accs = "".join(f"{100 * r['val_accuracy'][s - 1]:>8.1f}%" for s in report)
        crit = sum(r["critical_per_eval"])
        err = np.median(r["grad_errors"]) if r.get("grad_errors") else float("nan")
        print(f"{r['name']:<22}{r['ranks']:>3}{accs}{r['evaluations']:>7}"
              f"{crit / r['evaluations']:>10.1f}{crit:>11d}{crit / base:>10.2f}{err:>10.1e}")
    print(f"\n(critical path: layer steps a machine with P ranks waits for; serial = 2N = "
          f"{2 * N} per gradient evaluation; grad err = median ||g - g_exact|| / "
          f"||g_exact|| over evaluations sampled every {args.exact_every})")

    stamp = time.strftime("%Y%m%d-%H%M%S")
    RESULTS.mkdir(exist_ok=True)
    if not args.no_json:
        path = RESULTS / f"simultaneous_{stamp}.json"
        path.write_text(json.dumps(record, indent=1, default=float) + "\n")
        print(f"wrote {path}")
    if not args.no_plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
        for r in runs:
            label = r["name"] if r["name"] == "serial" else f"{r['name']}, P={r['ranks']}"
            acc = 100 * np.array(r["val_accuracy"])
            a.plot(np.arange(1, len(acc) + 1), acc, label=label)
            # critical-path steps after each optimisation step: spread evaluations evenly
            crit = np.cumsum(r["critical_per_eval"])
            idx = np.linspace(0, len(crit) - 1, len(acc)).round().astype(int)
            b.plot(crit[idx], acc, label=label)
        a.set_xlabel("L-BFGS step")
        b.set_xlabel("layer steps on the critical path")
        for ax in (a, b):
            ax.set_ylabel("validation accuracy (%)")
            ax.grid(alpha=0.3)
        a.legend(fontsize=7)
        fig.suptitle(f"Peaks, {net.describe()}: serial vs simultaneous training")
        fig.tight_layout()
        path = RESULTS / f"simultaneous_{stamp}.png"
        fig.savefig(path, dpi=120)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
