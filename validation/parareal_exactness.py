"""Claim 2: parareal is exact on the first k chunk boundaries after k iterations.

Claim (docs/theory/parareal.md; parareal of Lions, Maday & Turinici 2001 as analysed by
Gander & Vandewalle 2007, applied across layers by Günther et al. 2020): with the
layers split into P contiguous chunks (fine propagator ``F_j`` = the exact layers of
chunk ``j``, coarse ``G_j`` = one step of size (chunk length) x h) and the update
``U_{j+1}^k = F_j(U_j^{k-1}) + G_j(U_j^k) - G_j(U_j^{k-1})``, the boundary values
``U_1 .. U_k`` are exact after ``k`` iterations, so the returned fine trajectory
(``F_j`` run from every ``U_j^k``) equals the serial sweep on chunks ``0..k``; after ``P``
iterations it equals the serial sweep everywhere (the returned fine trajectory already
after ``P - 1``, since it needs ``U_0 .. U_{P-1}`` only). The same holds for the adjoint
sweep, which runs backward: after ``k`` iterations the last ``k`` chunk boundaries, and
the adjoints of the last ``k + 1`` chunks, are exact.

How it is checked
-----------------
Random ResNets (tanh, ReLU, SmoothReLU; several depths N and chunk counts P, P not
dividing N so that chunks are uneven; several seeds; coarse weights ``inject`` and
``average``), float64. For every ``k = 0..P``:

* state sweep: ``ptoc.forward(..., solver=Parareal(chunks=P, max_iterations=k,
  tol=0), comm=SimulatedRanks(P))`` (which runs
  ``ptoc.parallel.parallel_forward``) against the serial ``ptoc.forward``;
* adjoint sweep: ``ptoc.parallel.parallel_adjoint`` from the exact states and the
  exact ``lambda_N`` with the same solver, against the serial ``ptoc.adjoint``
  (``keep_adjoints=True``); after ``P`` iterations also the data part of the layer
  gradients it returns against the serial one.

"Holds" means **bit-for-bit equality** (``numpy.array_equal``): the parareal update is
written as ``F + (G_new - G_old)``, so a converged boundary gives ``F_j`` exactly and
the fine steps are the serial kernels' own arithmetic -- no round-off tolerance is
needed or allowed. (Positions ``0..bounds[k+1]`` for the state sweep,
``bounds[P-1-k]..N`` for the adjoint sweep.) The record also says, as information,
whether the first boundary not yet covered by the guarantee is still inexact, and
after how many iterations the whole trajectory first equals the serial one bit for
bit. The guarantee is a lower bound: a chunk of one layer has ``G_j = F_j``, and with
many chunks parareal converges to round-off before ``P`` iterations -- once the
correction ``G_new - G_old`` falls below half an ulp of ``F_j(U_j)`` the boundary is
bit-exact early (seen here with P = 16).

The figure shows the staircase: the error at every chunk boundary after every
iteration, for the state and the adjoint sweep.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from _problems import random_problem, serial_sweeps  # validation/_problems.py

import ptoc
from ptoc.cli.claims import Record, script_main
from ptoc.parallel import Parareal, SimulatedRanks, parallel_adjoint, partition

NUMBER = 2
CLAIM = ("parareal across layers is exact on the first k chunk boundaries after k "
         "iterations and equals the serial sweep bit for bit after P iterations, for the "
         "state and the adjoint sweep")
SOURCE = ("Gander & Vandewalle 2007 (parareal exactness); Günther et al. 2020 "
          "(layer-parallel ResNets); docs/theory/parareal.md")

ACTS = ("tanh", "relu", "smoothrelu")




def _case(act, N, P, seed, coarse):
    """Errors per position for every k, and the checks of one case."""
    net, params, X, y = random_problem(act, N, seed)
    fwd, lam_N, adj = serial_sweeps(net, params, X, y)
    bounds = partition(N, P)
    x_scale = np.max(np.abs(fwd.states))
    l_scale = np.max(np.abs(adj.adjoints))
    state_err, adj_err = [], []
    ok_state = ok_adj = True
    sharp_state = sharp_adj = True
    grads_bitwise = None
    bitwise_from = {"states": None, "adjoints": None}
    for k in range(P + 1):
        solver = Parareal(chunks=P, coarse=coarse, max_iterations=k, tol=0)
        states = ptoc.forward(net, params, X, solver=solver, comm=SimulatedRanks(P)).states
        lams, gK, gb, _ = parallel_adjoint(net, params, fwd.states, lam_N, solver,
                                           comm=SimulatedRanks(P))
        es = np.max(np.abs(states - fwd.states), axis=(1, 2)) / x_scale
        ea = np.max(np.abs(lams - adj.adjoints), axis=(1, 2)) / l_scale
        for key, e in (("states", es), ("adjoints", ea)):
            if bitwise_from[key] is None and not e.any():
                bitwise_from[key] = k
        state_err.append(es[bounds])
        adj_err.append(ea[bounds])
        hi = int(bounds[min(k + 1, P)])  # chunks 0..k ran from exact boundaries
        lo = int(bounds[max(P - 1 - k, 0)])  # adjoint: chunks P-1-k..P-1
        ok_state &= bool(np.array_equal(states[:hi + 1], fwd.states[:hi + 1]))
        ok_adj &= bool(np.array_equal(lams[lo:], adj.adjoints[lo:]))
        if k + 2 <= P and bounds[k + 2] - bounds[k + 1] > 1:  # next boundary, >1 layer
            sharp_state &= bool(es[bounds[k + 2]] > 0)
        if P - 2 - k >= 0 and bounds[P - 1 - k] - bounds[P - 2 - k] > 1:
            sharp_adj &= bool(ea[bounds[P - 2 - k]] > 0)
        if k == P:
            grads_bitwise = bool(np.array_equal(gK, adj.grad_K) and np.array_equal(gb,
                                                                                 adj.grad_b))
    return {"activation": act, "N": N, "P": P, "seed": seed, "coarse": coarse,
            "chunk_sizes": np.diff(bounds).tolist(),
            "state_exact_as_claimed": ok_state, "adjoint_exact_as_claimed": ok_adj,
            "layer_gradient_bitwise_after_P": grads_bitwise,
            "iterations_to_bitwise_states": bitwise_from["states"],
            "iterations_to_bitwise_adjoints": bitwise_from["adjoints"],
            "state_next_boundary_inexact": sharp_state,
            "adjoint_next_boundary_inexact": sharp_adj,
            "state_boundary_errors": np.array(state_err),
            "adjoint_boundary_errors": np.array(adj_err)}


def _figure(case, path):
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    P = case["P"]
    cmap = colormaps["viridis"].with_extremes(bad="white")
    for ax, key, title in ((axes[0], "state_boundary_errors", "state sweep (forward)"),
                           (axes[1], "adjoint_boundary_errors", "adjoint sweep (backward)")):
        err = np.array(case[key])[:, 1:] if key.startswith("state") else \
            np.array(case[key])[:, :-1]
        logs = np.where(err > 0, np.log10(np.maximum(err, 1e-300)), np.nan)
        im = ax.imshow(np.ma.masked_invalid(logs), cmap=cmap, aspect="auto", origin="lower",
                       vmin=-17, vmax=0)
        for k in range(err.shape[0]):
            for j in range(err.shape[1]):
                if err[k, j] == 0:
                    ax.text(j, k, "0", ha="center", va="center", fontsize=7)
        labels = list(range(1, P + 1)) if key.startswith("state") else list(range(P))
        ax.set_xticks(range(P))
        ax.set_xticklabels([f"{b}" for b in np.asarray(partition(case["N"], P))[labels]],
                           fontsize=7)
        ax.set_xlabel("chunk boundary (layer index n)")
        ax.set_ylabel("iterations k")
        ax.set_title(title, fontsize=10)
        fig.colorbar(im, ax=ax, label="log10 max-norm error / max |value|  (0: bitwise exact)")
    fig.suptitle(f"Parareal, N={case['N']}, P={P} (chunks {case['chunk_sizes']}), "
                 f"{case['activation']}: error at the chunk boundaries", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run(quick: bool, out_dir: Path) -> Record:
    if quick:
        layouts = [(12, 3), (17, 5), (10, 4)]
        seeds, coarse_rules = [0], ["inject"]
        fig_layout = (17, 5)
    else:
        layouts = [(12, 3), (12, 5), (17, 4), (17, 5), (10, 10), (33, 4), (33, 7),
                   (67, 8), (100, 7), (100, 16), (257, 16)]
        seeds, coarse_rules = [0, 1, 2], ["inject", "average"]
        fig_layout = (67, 8)
    cases = []
    fig_case = None
    for act in ACTS:
        for N, P in layouts:
            for seed in seeds:
                for coarse in coarse_rules:
                    c = _case(act, N, P, seed, coarse)
                    cases.append(c)
                    if fig_case is None and (N, P) == fig_layout and act == "tanh":
                        fig_case = c
    name = "parareal_exactness.png"
    _figure(fig_case, out_dir / name)

    checks = {
        "states exact (bitwise) on chunks 0..k after k iterations":
            all(c["state_exact_as_claimed"] for c in cases),
        "adjoints exact (bitwise) on the last k+1 chunks after k iterations":
            all(c["adjoint_exact_as_claimed"] for c in cases),
        "layer gradients from the parareal adjoint = serial, bitwise, after P":
            all(c["layer_gradient_bitwise_after_P"] for c in cases),
    }
    table = [{k: v for k, v in c.items() if not k.endswith("boundary_errors")} for c in cases]
    return Record.from_checks(
        checks,
        our_value={"cases": len(cases),
                   "state sweep exact as claimed": sum(c["state_exact_as_claimed"]
                                                       for c in cases),
                   "adjoint sweep exact as claimed": sum(c["adjoint_exact_as_claimed"]
                                                         for c in cases),
                   "bitwise after P": sum(c["state_exact_as_claimed"]
                                          and c["adjoint_exact_as_claimed"] for c in cases)},
        tolerance="bit for bit (numpy.array_equal), no round-off allowance: the arithmetic "
                  "order of the converged chunks is that of the serial sweep",
        details={"cases": table,
                 "guarantee_is_sharp_states": all(c["state_next_boundary_inexact"]
                                                  for c in cases),
                 "guarantee_is_sharp_adjoints": all(c["adjoint_next_boundary_inexact"]
                                                    for c in cases),
                 "figure_case": {"activation": fig_case["activation"], "N": fig_case["N"],
                                 "P": fig_case["P"], "seed": fig_case["seed"],
                                 "state_boundary_errors": fig_case["state_boundary_errors"],
                                 "adjoint_boundary_errors":
                                     fig_case["adjoint_boundary_errors"]}},
        figures=[name])


if __name__ == "__main__":
    raise SystemExit(script_main(__name__))
