"""Claim 12: PGCL reaches the serial stationary point with a shorter critical path.

Parpas & Muir, "Predict globally, correct locally: parallel-in-time optimal control of
neural networks": the layers are split into ``P`` chunks; a coarse network predicts the
chunk-boundary states and co-states (corrected parareal-style with the previous step's
fine values) and every chunk then updates its own weights from its own fine sweeps,
without waiting for a full forward and backward propagation. The paper establishes
convergence (a gradient method with errors that vanish as the predictions converge)
and reports it more efficient than the serial method. In ptoc (``ptoc.pgcl``,
docs/theory/pgcl.md) the fixed points of PGCL are the stationary points of serial gradient
descent; the claim checked here has two parts:

1. *same stationary point*: from the same start and with the same optimiser, PGCL
   converges to the stationary point serial gradient descent converges to;
2. *fewer sequential layer steps*: it gets there with fewer layer steps on the
   critical path (the sequential time of a machine with one processor per chunk).

The check: the strongly regularised tiny problem of ``tests/test_pgcl.py`` (width 3,
dense opening from 2 inputs, 3 classes, 8 samples scaled by 3, tanh,
``gamma, gamma_t, gamma_c = 1, 0.02, 0.3``), with ``N = 16`` layers and ``T = 2`` so that
``P = 2, 4, 8`` chunks divide the layers; full batch, plain gradient steps
``SGD(lr=1)`` for serial descent (:class:`ptoc.methods.GradientMethod`) and for every
chunk of :class:`ptoc.pgcl.PGCL` (coarse cold start, injected coarse weights, one
local step). Every run goes until the *exact* gradient (:func:`ptoc.loss_and_grad`,
monitoring only, not counted) has ``||grad J|| <= 1e-11``. Cost: the serial method
spends ``2N`` layer steps per gradient, all sequential; a PGCL step spends
``info["steps_critical_path"]`` (coarse and fine layer steps on the longest chain of
dependent work, counted by the communicator's logical clocks; ``2(P-1) + L_0 + L_{P-1}``
here).

Symmetry. The network has exact symmetries: flipping the sign of a hidden coordinate or
permuting the hidden coordinates (``K_n -> D K_n D^T``, ``b_n -> D b_n``,
``K_in -> D K_in``, ``b_in -> D b_in``, ``W -> W D^T`` for a signed permutation ``D``) gives
the same network function and the same ``J`` (tanh is odd and the regulariser is
invariant). A stationary point of the training problem is therefore only defined up to
these ``2^3 3! = 48`` maps, and two runs can end at mirror images of one network. The
comparison takes the smallest parameter difference over the 48 maps (the raw
difference, without any map, is reported too).

Holds iff, decided before the run, for every ``P`` in {2, 4, 8}:

* PGCL reaches ``||grad J|| <= 1e-11`` (a stationary point);
* it is the serial one: ``max |theta_PGCL - D theta_serial| <= 1e-8`` for some symmetry
  ``D``, and ``|J_PGCL - J_serial| <= 1e-12``;
* PGCL needs fewer critical-path layer steps than serial descent to reach
  ``||grad J|| <= 1e-8`` (the number for ``1e-4`` and ``1e-11`` is reported too).

Quick mode: the ``N = 6``, ``T = 3`` problem of the tests with ``P = 3`` only, runs to
``||grad J|| <= 1e-9``, parameters within ``1e-6`` and ``J`` within ``1e-12``, critical path
compared at ``1e-8``.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np

import ptoc
from ptoc.cli.claims import Record, script_main
from ptoc.methods import GradientMethod
from ptoc.optim import SGD
from ptoc.pgcl import PGCL

NUMBER = 12
CLAIM = ("predict-globally-correct-locally converges to the serial method's stationary "
         "point with fewer layer steps on the critical path")
SOURCE = ("Parpas & Muir, Predict globally, correct locally: parallel-in-time optimal "
          "control of neural networks (convergence; numerical results); docs/theory/pgcl.md")

LR = 1.0
TOL_COMPARE = 1e-8  # the gradient norm at which the critical paths are compared


def _problem(depth: int, T: float):
    """The strongly regularised problem of ``tests/test_pgcl.py`` (``stationary_problem``)."""
    rng = np.random.default_rng(1)
    net = ptoc.ResNet(width=3, depth=depth, T=T, activation="tanh", n_in=2, n_classes=3,
                      opening="dense", gamma=1.0, gamma_t=0.02, gamma_c=0.3)
    params = net.init_params(rng)
    params.b[...] = 0.5 * rng.standard_normal(params.b.shape)
    X = rng.standard_normal((8, 2))
    y = rng.integers(0, 3, 8)
    return net, params, 3.0 * X, y


def _grad_norm(net, params, X, y) -> tuple[float, float]:
    J, g = ptoc.loss_and_grad(net, params, X, y)
    return float(J), math.sqrt(sum(float(np.sum(g[k] ** 2)) for k in g))


def _descend(net, params, X, y, P: int, tol: float, max_steps: int) -> dict:
    """Steps until ``||grad J|| <= tol``; per step the cumulative critical path and work."""
    if P == 1:
        method = GradientMethod(optimizer=SGD(lr=LR))
    else:
        method = PGCL(optimizer=SGD(lr=LR), comm=P)
    p, s = params, method.init(net, params)
    J0, g0 = _grad_norm(net, p, X, y)
    crit, work, hist_c, hist_g = 0, 0, [0], [g0]
    J, g = J0, g0
    for _ in range(max_steps):
        out = method.step(net, p, s, X, y)
        p, s = out.params, out.state
        if P == 1:
            crit += 2 * net.depth
            work += 2 * net.depth
        else:
            crit += out.info["steps_critical_path"]
            work += out.info["steps_total"]
        J, g = _grad_norm(net, p, X, y)
        hist_c.append(crit)
        hist_g.append(g)
        if g <= tol or not math.isfinite(g):
            break
    return {"params": p, "J": J, "grad_norm": g, "steps": len(hist_c) - 1,
            "critical_path": hist_c, "grad_norms": hist_g, "work": work,
            "per_step_critical": hist_c[1] - hist_c[0] if len(hist_c) > 1 else None}


def _first(run: dict, tol: float) -> int | None:
    return next((c for c, g in zip(run["critical_path"], run["grad_norms"], strict=True)
                 if g <= tol), None)


def _symmetries(d: int):
    """All signed permutation matrices of size ``d``."""
    for perm in itertools.permutations(range(d)):
        for signs in itertools.product((1.0, -1.0), repeat=d):
            D = np.zeros((d, d))
            D[np.arange(d), perm] = signs
            yield D


def _apply(D: np.ndarray, p) -> dict[str, np.ndarray]:
    return {"K": np.einsum("ij,njk,lk->nil", D, p["K"], D), "b": p["b"] @ D.T,
            "K_in": D @ p["K_in"], "b_in": D @ p["b_in"], "W": p["W"] @ D.T, "mu": p["mu"]}


def _difference(a, b) -> float:
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in ("K", "b", "K_in", "b_in", "W", "mu"))


def _figure(out_dir: Path, runs: dict[int, dict], tol: float, N: int) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for P, r in runs.items():
        label = f"serial gradient descent ({2 * N} per step)" if P == 1 else \
            f"PGCL, P = {P} ({r['per_step_critical']} per step)"
        ax.semilogy(r["critical_path"], r["grad_norms"], label=label,
                    color="k" if P == 1 else None, lw=2 if P == 1 else 1.5)
    ax.axhline(tol, color="grey", ls=":", lw=1)
    ax.text(0, tol, f" ||grad J|| = {tol:g}", va="bottom", fontsize=8, color="grey")
    ax.set_xlabel("layer steps on the critical path (cumulative)")
    ax.set_ylabel("||grad J|| (exact)")
    ax.set_title(f"PGCL vs serial gradient descent, N = {N}, SGD(lr={LR:g}), full batch")
    ax.legend(fontsize=8)
    fig.tight_layout()
    name = "pgcl_stationary.png"
    fig.savefig(out_dir / name, dpi=120)
    plt.close(fig)
    return name


def run(quick: bool, out_dir: Path) -> Record:
    if quick:
        depth, T, Ps, tol_stop, tol_theta, max_steps = 6, 3.0, [3], 1e-9, 1e-6, 1000
    else:
        depth, T, Ps, tol_stop, tol_theta, max_steps = 16, 2.0, [2, 4, 8], 1e-11, 1e-8, 3000
    tol_J = 1e-12
    net, params, X, y = _problem(depth, T)
    runs = {P: _descend(net, params, X, y, P, tol_stop, max_steps) for P in [1] + Ps}
    serial = runs[1]
    symmetries = list(_symmetries(net.width))
    mirrors = [_apply(D, serial["params"]) for D in symmetries]
    checks: dict[str, bool] = {
        f"serial descent reaches ||grad J|| <= {tol_stop:g}": serial["grad_norm"] <= tol_stop}
    rows = []
    serial_crit = {t: _first(serial, t) for t in (1e-4, TOL_COMPARE, tol_stop)}
    for P in Ps:
        r = runs[P]
        raw = _difference(r["params"], serial["params"])
        diffs = [_difference(r["params"], m) for m in mirrors]
        best = int(np.argmin(diffs))
        crit = {t: _first(r, t) for t in (1e-4, TOL_COMPARE, tol_stop)}
        sc, pc = serial_crit[TOL_COMPARE], crit[TOL_COMPARE]
        rows.append({
            "P": P, "steps": r["steps"], "grad_norm": r["grad_norm"],
            "J": r["J"], "J - J_serial": r["J"] - serial["J"],
            "max |theta - theta_serial| (raw)": raw,
            "max |theta - D theta_serial| (best symmetry)": diffs[best],
            "best symmetry is the identity": bool(diffs[best] == diffs[0]),
            "best symmetry D (signed permutation matrix)": symmetries[best],
            "critical path per step": r["per_step_critical"],
            "critical path to 1e-4": crit[1e-4],
            f"critical path to {TOL_COMPARE:g}": pc,
            f"critical path to {tol_stop:g}": crit[tol_stop],
            f"serial critical path to {TOL_COMPARE:g}": sc,
            "critical-path ratio PGCL/serial": None if pc is None or sc is None else pc / sc,
            "total layer steps (work) to the end": r["work"],
            "serial total layer steps to the end": serial["work"]})
        checks[f"P={P}: PGCL reaches ||grad J|| <= {tol_stop:g}"] = r["grad_norm"] <= tol_stop
        checks[f"P={P}: the serial stationary point (up to symmetry, {tol_theta:g}; "
               f"J within {tol_J:g})"] = diffs[best] <= tol_theta \
            and abs(r["J"] - serial["J"]) <= tol_J
        checks[f"P={P}: fewer critical-path layer steps to ||grad J|| <= {TOL_COMPARE:g}"] = \
            pc is not None and sc is not None and pc < sc
    figures = [_figure(out_dir, runs, TOL_COMPARE, depth)]
    our = {f"P={row['P']} crit/serial": row["critical-path ratio PGCL/serial"] for row in rows}
    our["max theta diff (sym.)"] = max(row["max |theta - D theta_serial| (best symmetry)"]
                                       for row in rows)
    return Record.from_checks(
        checks, our_value=our,
        paper_value="converges (gradient method with vanishing errors); more efficient than "
                    "the serial method (no numbers in the abstract)",
        tolerance=(f"||grad J|| <= {tol_stop:g}; parameters within {tol_theta:g} of the serial "
                   f"limit up to an exact symmetry, J within {tol_J:g}; critical path to "
                   f"||grad J|| <= {TOL_COMPARE:g} shorter than serial (2N per gradient)"),
        details={"problem": f"tests/test_pgcl.py stationary problem with N={depth}, T={T:g}",
                 "optimizer": f"SGD(lr={LR:g}), full batch", "per_P": rows,
                 "serial": {"steps": serial["steps"], "J": serial["J"],
                            "grad_norm": serial["grad_norm"],
                            "critical path per step": 2 * depth,
                            **{f"critical path to {t:g}": c for t, c in serial_crit.items()}},
                 "histories": {str(P): {"critical_path": r["critical_path"],
                                        "grad_norm": r["grad_norms"]}
                               for P, r in runs.items()}},
        figures=figures)


if __name__ == "__main__":
    raise SystemExit(script_main(__name__))
