"""Claim 6: the gradient from MGRIT state and adjoint sweeps converges to the serial one.

Claim (Günther, Ruthotto, Schroder, Cyr & Gauger 2020, "Layer-parallel training of deep
residual neural networks": the gradient is assembled from layer-parallel (MGRIT)
solutions of the forward (state) and backward (adjoint) sweeps; docs/theory/adjoint.md
and docs/theory/mgrit.md): as the number of MGRIT iterations of both sweeps grows, the gradient
``dJ/dtheta`` formed from the MGRIT states ``x_n`` and adjoints ``lambda_{n+1}`` (and the
opening layer's and classifier's gradients from ``lambda_0`` and ``x_N``) converges to
the gradient of the serial sweeps, and at convergence (residual-based stopping) it
equals it to 1e-10 relative.

How it is checked
-----------------
Peaks data (``ptoc.data.peaks``, a seeded subset of the training points), width 8,
SmoothReLU, ``T = 5`` (the Peaks setting of Günther et al.), random weights; depths
``N = 16 .. 4096``; MGRIT with coarsening 4, FCF relaxation, V-cycles, as many levels
as fit (full run also: two levels, a tanh network with ``T = 1``, another seed, and
three simulated ranks).
For ``k = 1, 2, ...`` ``ptoc.parallel.parallel_gradient(..., MGRIT(max_iterations=k,
tol=0))`` runs exactly ``k`` iterations of the state sweep and then ``k`` of the
adjoint sweep from those states (each from a zero initial guess); its gradient is
compared with the serial ``ptoc.loss_and_grad``:
``err_k = max over parameter groups of max|g_k - g| / max|g|``. The iterations stop at
``err_k <= 1e-13`` or a cap. Separately, ``MGRIT(tol=1e-12, max_iterations=100)`` (the
residual-based stop) gives the gradient "at convergence".

"Holds" means, in every case: (a) both sweeps converged and the gradient (and the loss)
at convergence is within ``1e-10`` relative of the serial one; (b) ``err_k`` reaches
``1e-10`` within the cap and does not increase from one iteration to the next while it
is above the round-off floor ``1e-12`` (convergence as the iterations grow).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

import ptoc
from ptoc.cli.claims import Record, script_main
from ptoc.parallel import MGRIT, parallel_gradient

NUMBER = 6
CLAIM = ("the gradient from MGRIT state and adjoint sweeps converges to the serial "
         "gradient as MGRIT iterations grow, and equals it to 1e-10 relative at convergence")
SOURCE = ("Günther, Ruthotto, Schroder, Cyr & Gauger 2020, layer-parallel training of deep "
          "ResNets (MGRIT forward and adjoint solves); docs/theory/adjoint.md, "
          "docs/theory/mgrit.md")

CONVERGED_TOL = 1e-10
FLOOR = 1e-12
STOP = 1e-13


def _problem(depth, S, act="smoothrelu", T=5.0, seed=0):
    data = ptoc.data.peaks()
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(data.X_train), S, replace=False)
    X, y = data.X_train[idx], data.y_train[idx]
    net = ptoc.ResNet(width=8, depth=depth, T=T, activation=act, n_in=2, n_classes=5,
                      gamma=1e-3, gamma_t=1e-3, gamma_c=1e-3)
    params = net.init_params(rng, scale=1.0)
    params.b[...] = 0.5 * rng.standard_normal(params.b.shape)
    return net, params, X, y


def _grad_rel(g, ref):
    return max(float(np.max(np.abs(g[k] - ref[k])) / max(np.max(np.abs(ref[k])), 1e-300))
               for k in ref)


def _case(depth, S, cap, act="smoothrelu", T=5.0, levels=10, ranks=None, seed=0):
    net, params, X, y = _problem(depth, S, act, T, seed)
    loss, grads = ptoc.loss_and_grad(net, params, X, y)
    fwd = ptoc.forward(net, params, X)
    errors, state_errors, adjoint_errors = [], [], []
    lam_ref = None
    for k in range(1, cap + 1):
        solver = MGRIT(coarsening=4, max_levels=levels, relaxation="FCF", max_iterations=k,
                       tol=0)
        r = parallel_gradient(net, params, X, y, solver, comm=ranks)
        if lam_ref is None:
            _, lam_N, _, _ = ptoc.objective.classifier_loss(params, fwd.final_state, y)
            lam_ref = ptoc.adjoint(net, params, fwd, lam_N, keep_adjoints=True).adjoints
        errors.append(_grad_rel(r.grads, grads))
        state_errors.append(float(np.max(np.abs(r.states - fwd.states))
                                  / np.max(np.abs(fwd.states))))
        adjoint_errors.append(float(np.max(np.abs(r.adjoints - lam_ref))
                                    / np.max(np.abs(lam_ref))))
        if errors[-1] <= STOP:
            break
    solver = MGRIT(coarsening=4, max_levels=levels, relaxation="FCF", tol=1e-12,
                   max_iterations=100)
    conv = parallel_gradient(net, params, X, y, solver, comm=ranks)
    monotone = all(b <= a for a, b in zip(errors, errors[1:], strict=False) if a > FLOOR)
    return {"depth": depth, "S": S, "seed": seed, "activation": act, "T": T, "max_levels": levels,
            "levels_used": conv.forward.levels, "ranks": ranks or 1, "errors": errors,
            "state_errors": state_errors, "adjoint_errors": adjoint_errors,
            "reaches_1e-10": bool(min(errors) <= CONVERGED_TOL),
            "iterations_to_1e-10": next((i + 1 for i, e in enumerate(errors)
                                         if e <= CONVERGED_TOL), None),
            "non_increasing_above_floor": monotone,
            "converged": bool(conv.forward.converged and conv.adjoint.converged),
            "iterations_at_convergence": [conv.forward.iterations, conv.adjoint.iterations],
            "gradient_rel_at_convergence": _grad_rel(conv.grads, grads),
            "loss_rel_at_convergence": abs(conv.loss - loss) / abs(loss),
            "forward_residuals": conv.forward.residuals,
            "adjoint_residuals": conv.adjoint.residuals}


def _label(c):
    extra = []
    if c["max_levels"] == 2:
        extra.append("2 levels")
    if c["activation"] != "smoothrelu":
        extra.append(f"{c['activation']}, T={c['T']:g}")
    if c["ranks"] > 1:
        extra.append(f"{c['ranks']} ranks")
    if c["seed"]:
        extra.append(f"seed {c['seed']}")
    return f"N={c['depth']}" + (f" ({', '.join(extra)})" if extra else "")


def _figure(cases, path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.6))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for c in cases:
        k = np.arange(1, len(c["errors"]) + 1)
        style = "-" if c["max_levels"] != 2 and c["ranks"] == 1 and not c["seed"] and \
            c["activation"] == "smoothrelu" else "--"
        ax.semilogy(k, np.maximum(c["errors"], 1e-17), style, marker="o", ms=3,
                    label=_label(c))
    ax.axhline(CONVERGED_TOL, color="k", lw=0.8, ls=":", label="1e-10")
    ax.set_xlabel("MGRIT iterations k (state sweep, then adjoint sweep)")
    ax.set_ylabel("max_groups max|g_k - g_serial| / max|g_serial|")
    ax.set_title("Gradient from MGRIT sweeps vs serial gradient (Peaks, d=8, m=4, FCF)",
                 fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run(quick: bool, out_dir: Path) -> Record:
    if quick:
        specs = [dict(depth=16, S=8, cap=10), dict(depth=64, S=8, cap=12)]
    else:
        specs = [dict(depth=16, S=32, cap=20), dict(depth=64, S=32, cap=20),
                 dict(depth=256, S=32, cap=24), dict(depth=1024, S=32, cap=24),
                 dict(depth=4096, S=32, cap=24), dict(depth=1024, S=32, cap=24, seed=1),
                 dict(depth=256, S=32, cap=24, levels=2),
                 dict(depth=256, S=32, cap=24, act="tanh", T=1.0),
                 dict(depth=256, S=32, cap=24, ranks=3)]
    cases = [_case(**s) for s in specs]
    name = "mgrit_adjoint_gradient.png"
    _figure(cases, out_dir / name)
    checks = {
        "both sweeps converge (residual <= 1e-12)": all(c["converged"] for c in cases),
        f"gradient at convergence within {CONVERGED_TOL:g} of serial":
            all(c["gradient_rel_at_convergence"] <= CONVERGED_TOL
                and c["loss_rel_at_convergence"] <= CONVERGED_TOL for c in cases),
        f"gradient error reaches {CONVERGED_TOL:g} as iterations grow":
            all(c["reaches_1e-10"] for c in cases),
        f"gradient error non-increasing above {FLOOR:g}":
            all(c["non_increasing_above_floor"] for c in cases),
    }
    return Record.from_checks(
        checks,
        our_value={_label(c): {"iterations to 1e-10": c["iterations_to_1e-10"],
                               "grad rel at convergence": c["gradient_rel_at_convergence"]}
                   for c in cases},
        tolerance=f"at convergence (MGRIT residual <= 1e-12): gradient and loss within "
                  f"{CONVERGED_TOL:g} relative; error reaches {CONVERGED_TOL:g} and is "
                  f"non-increasing above {FLOOR:g}",
        details={"cases": cases},
        figures=[name])


if __name__ == "__main__":
    raise SystemExit(script_main(__name__))
