"""Claim 7: on Peaks the initial loss is ln 5 at near-zero weights, and simultaneous
layer-parallel training - one warm-started inexact gradient per optimisation step, 2
MGRIT iterations per sweep - reaches the validation accuracy of serial training, in
Günther et al.'s own Peaks setup.

Source: Günther, Ruthotto, Schroder, Cyr & Gauger, "Layer-parallel training of deep
residual neural networks" (SIAM J. Math. Data Sci. 2020): the Peaks problem and the
simultaneous (one-shot) layer-parallel training whose inexact gradients give "similar
training performance to traditional methods" (abstract); the paper's Peaks accuracies
were not found in the text searchable here, so the claim is judged against serial
training. Setup: the authors' code ``steffi7574/LayerParallelLearning``,
``examples/peaks/peaks.cfg`` and ``src/main.cpp``, as :func:`ptoc.simultaneous.guenther_peaks`
translates it (its docstring lists each value and where ptoc differs): width 8, 30
residual layers on ``[0, 1]``, SmoothReLU, 5000 training and 200 validation points,
weights uniform in ``[0, 1e-3)``, regulariser 1e-7 / 1e-5 / 1e-7, MGRIT with coarsening
2, F-relaxation on the finest level, no coarse grid below 10 steps (two levels), 2
iterations per sweep, full-batch L-BFGS (10 pairs) with backtracking Armijo (1e-4,
factor 0.5, 15 trials), 130 steps. As in ``src/main.cpp`` (state and adjoint solve at
the top of each iteration, state solve only in each line-search trial) a step costs one
state and one adjoint sweep plus one state sweep per trial
(``LBFGS(value_only_trials=True)``); the simultaneous sweeps run on 15 simulated ranks
(two layers, one coarse interval, per rank; ptoc's results do not depend on the number
of ranks, only the critical path does). Serial training is the same optimiser on the
exact serial gradient.

(a) Initial loss. With all weights zero the logits are zero and the batch-mean
cross-entropy is exactly ``ln 5``, and so is ``J`` (holds when ``|J - ln 5| <=
1e-14``); with ``init_params(seed, scale=1e-3)`` (Gaussian, mean zero) the loss, i.e.
the cross-entropy ``J - R``, holds when ``|J - R - ln 5| <= 1e-6``. (The earlier
version of this claim checked ``J`` itself at scale 1e-3, and on this setup that check
failed in the first run; it was changed after that run, for this reason: ``J - ln 5``
is about 2e-6 there, almost all of it the time-derivative regulariser ``R`` of
independently drawn layers with ``gamma_t = gamma_ddt / h = 3e-4``, a term of order
``scale^2`` that is not the loss; ``J``, ``R`` and both differences are in the record.)
The loss at the reference's initialisation (uniform, mean ``5e-4``, not zero) is
reported, not judged.

(b) Simultaneous training. "Reaches" is ptoc's criterion, unchanged from the earlier
version of this claim (not tuned to this setup; an exploratory run preceded it): after the same
number of steps (130) the validation accuracy of simultaneous training, mean over the
initialisations of seeds 0, 1, 2, is at least that of serial training minus 2
percentage points, and no run diverges. A single accuracy on 200 points moves by
several points from one initialisation to the next, hence the mean; each seed is
reported. Also checked: every step cost what the reference's costs (2 state and 2
adjoint MGRIT iterations, and 2 state iterations per line-search trial). Reported:
MGRIT iterations, trials and critical-path layer steps per step, against the serial
method's ``N`` steps per state sweep and ``N`` per adjoint sweep.

Quick mode (CI, seconds): part (a) in full; part (b) 10 steps on 100 training points
per class, seed 0. Ten steps from weights of size 1e-3 are too few for accuracies to
be compared (reported, not judged); checked are the cost per step, that the inexact
gradients are close to the exact ones (median relative error at most 0.1, i.e. within
about 6 degrees) and that the training loss falls.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from _problems import CountingExactGradient  # validation/_problems.py

import ptoc
from ptoc.cli.claims import Record, script_main
from ptoc.methods import GradientMethod
from ptoc.objective import regulariser
from ptoc.simultaneous import guenther_peaks, step_costs
from ptoc.training import train

NUMBER = 7
CLAIM = ("Peaks: the initial loss is ln 5 at near-zero weights, and simultaneous training "
         "(one warm-started inexact gradient per step, 2 MGRIT iterations per sweep) reaches "
         "the validation accuracy of serial training in Günther et al.'s Peaks setup")
SOURCE = ("Günther, Ruthotto, Schroder, Cyr & Gauger 2020, Layer-parallel training of deep "
          "residual neural networks (Peaks; simultaneous layer-parallel training); setup from "
          "steffi7574/LayerParallelLearning examples/peaks/peaks.cfg and src/main.cpp; "
          "docs/theory/simultaneous.md")

ZERO_TOL = 1e-14  # |J - ln 5| at zero weights: round-off of the batch mean
TINY_SCALE, TINY_TOL = 1e-3, 1e-6  # near-zero weights
ACC_TOL = 0.02  # "reaches": at most 2 percentage points below serial
GRAD_TOL = 0.1  # quick mode: typical inexact gradient within 10% (< 6 degrees) of the exact one
RANKS = 15
ITERATIONS = 2  # MGRIT iterations per sweep (braid_maxiter)


def _initial_loss(net, data, seed: int, reference_init) -> dict:
    X, y = data.X_train, data.y_train
    zero = ptoc.loss(net, net.zero_params(), X, y)
    small = net.init_params(seed, scale=TINY_SCALE)
    tiny, tiny_reg = ptoc.loss(net, small, X, y), regulariser(net, small)
    ref, ref_reg = ptoc.loss(net, reference_init, X, y), regulariser(net, reference_init)
    return {"ln 5": math.log(5.0), "J zero weights": zero, "J scale 1e-3": tiny,
            "R scale 1e-3": tiny_reg, "J reference init": ref, "R reference init": ref_reg,
            "|J - ln 5| zero weights": abs(zero - math.log(5.0)),
            "|J - ln 5| scale 1e-3": abs(tiny - math.log(5.0)),
            "|J - R - ln 5| scale 1e-3": abs(tiny - tiny_reg - math.log(5.0)),
            "|J - R - ln 5| reference init": abs(ref - ref_reg - math.log(5.0))}


def _train_pair(seed: int, quick: bool) -> dict:
    """Serial and simultaneous training of the reference setup from the same start."""
    kw = {"n_per_class": 100, "epochs": 10} if quick else {}
    setup = guenther_peaks(seed=seed, comm=RANKS, **kw)
    net, data, steps = setup.network, setup.data, setup.epochs
    loss0 = ptoc.loss(net, setup.params, data.X_train, data.y_train)
    acc0 = ptoc.accuracy(net, setup.params, data.X_val, data.y_val)
    exact = CountingExactGradient(net)
    serial = train(net, setup.params, data, method=GradientMethod(setup.optimizer, exact),
                   epochs=steps, batch_size=None, seed=seed, progress=False)
    setup.gradient.exact_every = 1  # the exact gradient beside each inexact one
    simult = train(net, setup.params, data, method=setup.method, epochs=steps,
                   batch_size=None, seed=seed, progress=False)
    costs = step_costs(setup.gradient.records)
    errors = [r.grad_error for r in setup.gradient.records if r.kind == "gradient"]
    N = net.depth
    serial_trials = exact.values / steps
    return {
        "seed": seed, "steps": steps, "network": net.describe(), "n_train": len(data.y_train),
        "n_val": len(data.y_val),
        "serial": {"val_accuracy": [acc0] + serial.history.column("val_accuracy").tolist(),
                   "train_loss": [loss0] + serial.history.column("train_loss").tolist(),
                   "gradient_evaluations": exact.gradients, "trial_sweeps": exact.values,
                   "trials_per_step": serial_trials,
                   "critical_path_per_step": 2 * N + N * serial_trials},
        "simultaneous": {
            "val_accuracy": [acc0] + simult.history.column("val_accuracy").tolist(),
            "train_loss": [loss0] + simult.history.column("train_loss").tolist(),
            "diverged": simult.diverged,
            "state_iterations_per_step": float(np.mean([c.state_iterations for c in costs])),
            "adjoint_iterations_per_step": float(np.mean([c.adjoint_iterations
                                                          for c in costs])),
            "trials_per_step": float(np.mean([c.trial_sweeps for c in costs])),
            "critical_path_per_step": float(np.mean([c.steps_critical_path for c in costs])),
            "total_layer_steps_per_step": float(np.mean([c.steps_total for c in costs])),
            "reference_cost_every_step": len(costs) == steps and all(
                c.adjoint_iterations == ITERATIONS
                and c.state_iterations == ITERATIONS * (1 + c.trial_sweeps) for c in costs)},
        "grad_error_median": float(np.median(errors)), "grad_error_max": max(errors),
        "solver": repr(setup.solver), "optimizer": setup.optimizer.config(),
    }


def _plot(runs: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, run in enumerate(runs):
        col = colours[i % len(colours)]
        x = np.arange(run["steps"] + 1)
        for kind, style in (("serial", "-"), ("simultaneous", "--")):
            a.plot(x, 100 * np.array(run[kind]["val_accuracy"]), style, color=col,
                   label=f"{kind}, seed {run['seed']}")
            b.plot(x, run[kind]["train_loss"], style, color=col,
                   label=f"{kind}, seed {run['seed']}")
    b.axhline(math.log(5.0), color="grey", lw=0.8, ls=":", label="ln 5")
    a.set_ylabel("validation accuracy (%)")
    b.set_ylabel("training objective")
    b.set_yscale("log")
    for ax in (a, b):
        ax.set_xlabel("L-BFGS step")
        ax.grid(alpha=0.3)
    a.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(quick: bool, out_dir: Path) -> Record:
    seeds = (0,) if quick else (0, 1, 2)
    first = guenther_peaks(seed=seeds[0], n_per_class=100 if quick else None)
    initial = _initial_loss(first.network, first.data, seeds[0], first.params)
    runs = [_train_pair(s, quick) for s in seeds]
    steps = runs[0]["steps"]

    acc_serial = [r["serial"]["val_accuracy"][-1] for r in runs]
    acc_sim = [r["simultaneous"]["val_accuracy"][-1] for r in runs]
    mean_serial, mean_sim = float(np.mean(acc_serial)), float(np.mean(acc_sim))
    checks = {
        f"J = ln 5 at zero weights (|J - ln 5| <= {ZERO_TOL:g})":
            initial["|J - ln 5| zero weights"] <= ZERO_TOL,
        f"loss = ln 5 at weights of scale {TINY_SCALE:g} (|J - R - ln 5| <= {TINY_TOL:g})":
            initial["|J - R - ln 5| scale 1e-3"] <= TINY_TOL,
        f"every step costs {ITERATIONS} state + {ITERATIONS} adjoint MGRIT iterations and "
        f"{ITERATIONS} state iterations per line-search trial (src/main.cpp)":
            all(r["simultaneous"]["reference_cost_every_step"] for r in runs),
    }
    if quick:
        checks[f"median relative error of the inexact gradients <= {GRAD_TOL:g}"] = \
            all(r["grad_error_median"] <= GRAD_TOL for r in runs)
        checks["simultaneous training lowers the training objective"] = all(
            r["simultaneous"]["train_loss"][-1] < r["simultaneous"]["train_loss"][0]
            for r in runs)
        tolerance = (f"|J - ln 5| <= {ZERO_TOL:g} at zero weights and |J - R - ln 5| <= "
                     f"{TINY_TOL:g} at scale {TINY_SCALE:g}; the reference's cost per step; "
                     "quick mode: "
                     f"{steps} steps are too few to compare accuracies (reported, not judged): "
                     f"median relative error of the inexact gradients <= {GRAD_TOL:g} and the "
                     "objective falls")
    else:
        checks[f"simultaneous reaches serial validation accuracy after {steps} steps "
               f"(mean over seeds {list(seeds)}, at most {100 * ACC_TOL:g} points below)"] = \
            mean_sim >= mean_serial - ACC_TOL and not any(r["simultaneous"]["diverged"]
                                                         for r in runs)
        tolerance = (f"|J - ln 5| <= {ZERO_TOL:g} at zero weights and |J - R - ln 5| <= "
                     f"{TINY_TOL:g} at scale {TINY_SCALE:g}; the reference's cost per step; "
                     "validation "
                     f"accuracy after {steps} L-BFGS steps, mean over {len(seeds)} "
                     f"initialisations: simultaneous >= serial - {100 * ACC_TOL:g} percentage "
                     "points (criterion unchanged from the earlier version of this claim)")
    sim = [r["simultaneous"] for r in runs]
    ser = [r["serial"] for r in runs]
    our = {"J(0) - ln 5": initial["J zero weights"] - math.log(5.0),
           "J(1e-3) - R - ln 5": initial["J scale 1e-3"] - initial["R scale 1e-3"]
           - math.log(5.0),
           "serial acc": mean_serial, "simultaneous acc": mean_sim,
           "difference (points)": 100 * (mean_sim - mean_serial),
           "MGRIT iterations per step (state + adjoint)":
               float(np.mean([s["state_iterations_per_step"] + s["adjoint_iterations_per_step"]
                              for s in sim])),
           "critical-path layer steps per step, simultaneous":
               float(np.mean([s["critical_path_per_step"] for s in sim])),
           "critical-path layer steps per step, serial":
               float(np.mean([s["critical_path_per_step"] for s in ser]))}
    table = [{"seed": r["seed"], "serial val acc": r["serial"]["val_accuracy"][-1],
              "simultaneous val acc": r["simultaneous"]["val_accuracy"][-1],
              "serial objective": r["serial"]["train_loss"][-1],
              "simultaneous objective": r["simultaneous"]["train_loss"][-1],
              "state MGRIT its/step": r["simultaneous"]["state_iterations_per_step"],
              "adjoint MGRIT its/step": r["simultaneous"]["adjoint_iterations_per_step"],
              "trials/step simultaneous": r["simultaneous"]["trials_per_step"],
              "trials/step serial": r["serial"]["trials_per_step"],
              "critical path/step simultaneous": r["simultaneous"]["critical_path_per_step"],
              "critical path/step serial": r["serial"]["critical_path_per_step"],
              "median relative gradient error": r["grad_error_median"],
              "max relative gradient error": r["grad_error_max"]} for r in runs]
    fig = "peaks_simultaneous.png"
    _plot(runs, out_dir / fig,
          f"Peaks, Günther et al.'s setup ({runs[0]['n_train']} training, {runs[0]['n_val']} "
          f"validation points), {runs[0]['network']}, full-batch L-BFGS\nserial (exact "
          f"gradient, solid) vs simultaneous ({RANKS} ranks, one gradient per step, "
          f"{ITERATIONS} MGRIT iterations per sweep, dashed)")
    return Record.from_checks(
        checks, our_value=our,
        paper_value={"initial loss": math.log(5.0),
                     "accuracy": "similar training performance to serial training "
                                 "(abstract; the Peaks numbers were not found in searchable "
                                 "text); ptoc's criterion: within 2 points",
                     "cost per step (src/main.cpp)": "one state and one adjoint XBraid solve "
                                                     "of 2 iterations, one state solve of 2 "
                                                     "iterations per line-search trial"},
        tolerance=tolerance,
        details={"initial_loss": initial, "per_seed": table, "steps": steps,
                 "seeds": list(seeds), "network": runs[0]["network"],
                 "data": {"name": "peaks", "n_train": runs[0]["n_train"],
                          "n_val": runs[0]["n_val"]},
                 "solver": runs[0]["solver"], "optimizer": runs[0]["optimizer"],
                 "ranks": RANKS, "runs": runs},
        figures=[fig])


if __name__ == "__main__":
    raise SystemExit(script_main(__name__))
