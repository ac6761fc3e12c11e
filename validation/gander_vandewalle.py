"""Claim 3: on a linear ResNet, ptoc's parareal error obeys the superlinear bound of
Gander & Vandewalle.

Claim
-----
For a linear residual network ``x_{n+1} = x_n + h (K_n x_n + b_n)`` (activation = the
identity, layer-dependent ``K_n``, any ``b_n``), the parareal iterates ``U_j^k`` at the
chunk boundaries satisfy, for every iteration ``k >= 1`` and boundary ``j``,

    ||U_j^k - x*_{s_j}|| <= C(j-1, k) alpha^k beta^(j-k-1) max_i ||U_i^0 - x*_{s_i}||,

with ``alpha = max_j ||F_j - G_j||``, ``beta = max(1, max_j ||G_j||)`` and the binomial
coefficient ``C(j-1, k) = (j-1)(j-2)...(j-k) / k! <= (j-1)^k / k!`` (zero for ``j <= k``):
the ``1/k!`` makes the bound, and the convergence it guarantees, superlinear.

Source
------
Gander & Vandewalle 2007, "Analysis of the parareal time-parallel time-integration
method" (SIAM J. Sci. Comput.), their superlinear bound for linear problems, which
has this form (product ``prod_{l=1..k} (j - l) / k!``) for a scalar linear ODE;
here it is proved, in the same form, for the discrete, matrix-valued,
layer-dependent case below. Parareal as ptoc runs it: docs/theory/parareal.md.

What is proved (the discrete linear case)
-----------------------------------------
Chunks ``j = 0..P-1`` cover layers ``s_j .. s_{j+1}-1`` (``ptoc.parallel.partition``).
The fine chunk propagator is affine with linear part
``F_j = (I + h K_{s_{j+1}-1}) ... (I + h K_{s_j})``; the built-in coarse step (weights of
the chunk's first layer, ``Parareal(coarse="inject")``) is ``x + L_j h (K_{s_j} x +
b_{s_j})`` with linear part ``G_j = I + L_j h K_{s_j}``, ``L_j = s_{j+1} - s_j``. ptoc's
iteration (``ptoc/parallel/parareal.py``) is ``U_0^k = x_0``,
``U_{j+1}^0 = G_j(U_j^0)`` and ``U_{j+1}^k = F_j(U_j^{k-1}) + G_j(U_j^k) - G_j(U_j^{k-1})``.
The exact boundary values satisfy ``x*_{s_{j+1}} = F_j(x*_{s_j})``, so the affine parts
cancel and the errors ``e_j^k = U_j^k - x*_{s_j}`` obey, with ``D_j = F_j - G_j``,

    e_0^k = 0,   e_{j+1}^k = G_j e_j^k + D_j e_j^{k-1}.                       (1)

*Lemma.* For ``k >= 1`` and ``j >= 1``, writing ``G_{a:b} = G_a G_{a-1} ... G_b``
(the identity when ``a < b``),

    e_j^k = sum over j > i_1 > i_2 > ... > i_k >= 1 of
            G_{j-1:i_1+1} D_{i_1} G_{i_1-1:i_2+1} D_{i_2} ... G_{i_{k-1}-1:i_k+1} D_{i_k} e_{i_k}^0.

*Proof.* Unrolling (1) in ``j`` with ``e_0^k = 0`` gives
``e_j^k = sum_{i=0}^{j-1} G_{j-1:i+1} D_i e_i^{k-1}``. For ``k = 1`` the term ``i = 0``
vanishes (``e_0^0 = 0``), which is the claim; for ``k > 1`` insert the claim for
``e_i^{k-1}`` (induction on ``k``); terms whose last index would be 0 vanish. []

*Theorem (the bound checked here).* Let ``||.||`` be a norm on states and the induced
norm on the matrices. Each term of the lemma has ``k`` factors ``D`` (norm
``<= alpha``) and ``(j-1-i_1) + sum_l (i_l - i_{l+1} - 1) = j - k - i_k <= j - k - 1``
factors ``G`` (norm ``<= beta``, and ``beta >= 1``), and there are ``C(j-1, k)`` ways of
choosing ``k`` distinct indices from ``1..j-1``. Hence

    ||e_j^k|| <= C(j-1, k) alpha^k beta^(j-k-1) max_{1<=i<j} ||e_i^0||.        (GV)

(``i_k <= j - k``, so only the initial errors before boundary ``j`` enter; the check
takes the max over ``i = 1..P-1``, which is larger.)

The same expansion with the triangle inequality gives the sharper computable
bound ``B_j^k = sum_{i=1}^{j-1} (prod_{l=i+1}^{j-1} ||G_l||) ||D_i|| B_i^{k-1}``,
``B_i^0 = ||e_i^0||`` (recursive bound, ``<= (GV)``), also reported. States here are
batches (S samples x d, one sample per row; a matrix ``M`` acts as ``x -> x M^T``);
the norm is the Frobenius norm of the batch, and the matrix norm the spectral norm
(``||E M^T||_F <= ||M||_2 ||E||_F``).

How it is checked
-----------------
``sigma = identity`` is not one of ptoc's activations, so the linear network is a
user-written :class:`ptoc.Propagator` (``LinearResNet`` below, with ``coarse_step``
and ``layer_parameters`` so that parareal's built-in coarse step applies), checked by
``ptoc.check_propagator``. Parareal runs through
``ptoc.parallel.solve_states(prop, x0, ptoc.Parareal(chunks=P, max_iterations=k),
comm=P simulated ranks)`` for ``k = 0..P``. The iterate ``U_j^k`` is what chunk ``j``'s
first fine layer receives in the solve stopped after ``k`` iterations (the
propagator records the last input of that layer; chunk ``j`` re-runs its fine steps
whenever ``U_j`` changes). The last boundary ``U_P^k`` is never an input of a fine
chunk, so the measured boundaries are ``j = 1..P-1``. The exact states are the serial
sweep. Cases: three spectra of ``K_n = A + eps sin(2 pi t_n / T) B`` (``A`` normal with
real negative eigenvalues, "decaying"; normal with eigenvalues ``-0.2 +- i omega``,
"oscillatory"; a random non-normal ``A``), ``T in {1, 4}``, ``P in {4, 8, 16, 32}``,
``N = 128`` layers (full mode; quick: two spectra, ``T = 1``, ``P = 4``, ``N = 16``),
``d = 6``, ``S = 3``, random ``b_n``, ``eps = 0.2 ||A|| / ||B||``.

Holds when, at every iteration ``k = 1..P`` and every measured boundary,
``measured <= bound (1 + 1e-10) + 1e-12 max_n ||x*_n||`` (the absolute term is
round-off: the measured error is a difference of floating-point states), for (GV)
and for the recursive bound. Also checked: ptoc's iterates equal recursion (1)
evaluated with the matrices (relative ``1e-10``), i.e. ptoc runs the iteration the
theorem is about, and the propagator passes ``ptoc.check_propagator``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

import ptoc
from ptoc.cli.claims import Record, script_main
from ptoc.parallel import partition, solve_states

NUMBER = 3
CLAIM = ("on a linear ResNet (sigma = identity) the parareal error at every iteration k and "
         "chunk boundary j is at most C(j-1,k) alpha^k beta^(j-k-1) max||e^0|| "
         "(Gander-Vandewalle superlinear bound)")
SOURCE = ("Gander & Vandewalle 2007, Analysis of the parareal time-parallel time-integration "
          "method (SIAM J. Sci. Comput.), superlinear bound for linear problems; "
          "docs/theory/parareal.md")

RTOL, ATOL = 1e-10, 1e-12


class LinearResNet(ptoc.Propagator):
    """``x_{n+1} = x_n + h (K_n x_n + b_n)`` (one sample per row), objective ``|x|^2 / 2``.

    ``watch``: layers whose latest input ``step`` keeps in ``last_input`` (a copy).
    """

    def __init__(self, K, b, h, watch=()):
        self.K, self.b, self.h = K, b, float(h)
        self.n_layers = K.shape[0]
        self.watch = set(watch)
        self.last_input: dict[int, np.ndarray] = {}

    def step(self, n, x):
        if n in self.watch:
            self.last_input[n] = np.array(x)
        return x + self.h * (x @ self.K[n].T + self.b[n])

    def adjoint_step(self, n, x, lam, grad=None):
        if grad is not None:
            grad[0][n] += self.h * lam.T @ x
            grad[1][n] += self.h * lam.sum(axis=0)
        return lam + self.h * lam @ self.K[n]

    def objective(self, x):
        return 0.5 * float(np.sum(x * x))

    def objective_gradient(self, x):
        return np.array(x)

    def parameters(self):
        return [self.K, self.b]

    def layer_parameters(self, n):
        return (self.K[n], self.b[n])

    def coarse_step(self, params, n_layers, x):
        K, b = params
        return x + n_layers * self.h * (x @ K.T + b)

    def coarse_adjoint_step(self, params, n_layers, x, lam):
        return lam + n_layers * self.h * lam @ params[0]


def _spectrum_matrix(kind: str, d: int, rng) -> np.ndarray:
    Q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    if kind == "decaying":
        core = np.diag(-np.geomspace(0.5, 5.0, d))
    elif kind == "oscillatory":
        core = np.zeros((d, d))
        for i, w in enumerate(np.linspace(1.0, 5.0, d // 2)):
            core[2 * i:2 * i + 2, 2 * i:2 * i + 2] = [[-0.2, w], [-w, -0.2]]
    elif kind == "non-normal":
        return 1.5 * rng.standard_normal((d, d)) / math.sqrt(d)
    else:
        raise ValueError(kind)
    return Q @ core @ Q.T


def _network(kind: str, T: float, N: int, d: int, seed: int):
    rng = np.random.default_rng(seed)
    A = _spectrum_matrix(kind, d, rng)
    B = rng.standard_normal((d, d))
    B *= 0.2 * np.linalg.norm(A, 2) / np.linalg.norm(B, 2)
    t = np.arange(N) * (T / N)
    K = A[None] + np.sin(2 * np.pi * t / T)[:, None, None] * B[None]
    b = 0.1 * rng.standard_normal((N, d))
    return K, b, T / N


def _chunk_matrices(K, h, bounds):
    d = K.shape[1]
    F, G = [], []
    for j in range(len(bounds) - 1):
        s, e = int(bounds[j]), int(bounds[j + 1])
        M = np.eye(d)
        for n in range(s, e):
            M = (np.eye(d) + h * K[n]) @ M
        F.append(M)
        G.append(np.eye(d) + (e - s) * h * K[s])
    return F, G


def _bounds(e0, F, G, P):
    """(GV) closed-form and recursive bounds, arrays (P+1, P+1) indexed [k, j]."""
    normD = np.array([np.linalg.norm(f - g, 2) for f, g in zip(F, G, strict=True)])
    normG = np.array([np.linalg.norm(g, 2) for g in G])
    alpha, beta = float(normD.max()), max(1.0, float(normG.max()))
    E0 = float(np.max(e0[1:P]))
    gv = np.zeros((P + 1, P + 1))
    rec = np.zeros((P + 1, P + 1))
    rec[0] = e0
    gv[0] = e0
    for k in range(1, P + 1):
        for j in range(1, P + 1):
            if j - 1 >= k:
                gv[k, j] = math.comb(j - 1, k) * alpha ** k * beta ** (j - k - 1) * E0
            total = 0.0
            for i in range(1, j):
                total += float(np.prod(normG[i + 1:j])) * normD[i] * rec[k - 1, i]
            rec[k, j] = total
    return gv, rec, alpha, beta


def _one_case(kind, T, P, N, d, S, seed):
    K, b, h = _network(kind, T, N, d, seed)
    bounds = partition(N, P)
    firsts = [int(s) for s in bounds[1:-1]]
    prop = LinearResNet(K, b, h, watch=firsts)
    x0 = np.random.default_rng(seed + 1).standard_normal((S, d))
    ref = np.empty((N + 1, S, d))
    prop.propagate(x0, states=ref)
    scale = float(max(np.linalg.norm(ref[n]) for n in range(N + 1)))
    measured = np.zeros((P + 1, P))  # [k, j] for j = 0..P-1 (j = 0 is x_0: error 0)
    iterates = np.zeros((P + 1, P, S, d))
    for k in range(P + 1):
        prop.last_input.clear()
        solve_states(prop, x0, ptoc.Parareal(chunks=P, max_iterations=k, tol=0),
                     comm=P)
        iterates[k, 0] = x0
        for j, s in enumerate(firsts, start=1):
            iterates[k, j] = prop.last_input[s]
            measured[k, j] = np.linalg.norm(prop.last_input[s] - ref[s])
    F, G = _chunk_matrices(K, h, bounds)
    # recursion (1) with the matrices, from ptoc's own iteration-0 errors
    e = iterates[0] - ref[bounds[:-1]]
    rec_gap = 0.0
    for k in range(1, P + 1):
        new = np.zeros_like(e)
        for j in range(P - 1):
            new[j + 1] = new[j] @ G[j].T + e[j] @ (F[j] - G[j]).T
        e = new
        diff = np.linalg.norm(e - (iterates[k] - ref[bounds[:-1]])) / scale
        rec_gap = max(rec_gap, float(diff))
    # the bounds at j <= P-1 use e_i^0 for i <= j-1 <= P-2 only: all observed
    e0 = np.zeros(P + 1)
    e0[1:P] = measured[0, 1:]
    gv, rec, alpha, beta = _bounds(e0, F, G, P)
    allow = ATOL * scale
    ks = slice(1, P + 1)
    excess_gv = float(np.max(measured[ks, 1:] - (gv[ks, 1:P] * (1 + RTOL) + allow)))
    excess_rec = float(np.max(measured[ks, 1:] - (rec[ks, 1:P] * (1 + RTOL) + allow)))
    with np.errstate(divide="ignore", invalid="ignore"):
        pos = (measured[ks, 1:] > allow) & (gv[ks, 1:P] > 0)
        tight_gv = float(np.max(measured[ks, 1:][pos] / gv[ks, 1:P][pos])) if pos.any() else 0.0
        tight_rec = float(np.max(measured[ks, 1:][pos] / rec[ks, 1:P][pos])) if pos.any() \
            else 0.0
    return {
        "spectrum": kind, "T": T, "P": P, "N": N,
        "alpha": alpha, "beta": beta, "scale": scale,
        "measured_max_per_k": measured.max(axis=1),
        "gv_bound_max_per_k": gv[:, 1:P].max(axis=1),
        "recursive_bound_max_per_k": rec[:, 1:P].max(axis=1),
        "excess_over_gv": excess_gv, "excess_over_recursive": excess_rec,
        "worst_measured_over_gv": tight_gv, "worst_measured_over_recursive": tight_rec,
        "recursion_gap": rec_gap,
        "exact_after_k": bool(all(measured[k, j] == 0.0 for k in range(P + 1)
                                  for j in range(1, min(k, P - 1) + 1))),
    }, prop, x0


def _figure(cases, path: Path, spectra, Ts) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    fig = Figure(figsize=(4.2 * len(Ts), 3.3 * len(spectra)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(spectra), len(Ts), squeeze=False)
    colours = ["tab:blue", "tab:orange", "tab:green", "tab:red"]
    for r, kind in enumerate(spectra):
        for c, T in enumerate(Ts):
            ax = axes[r][c]
            mine = [cs for cs in cases if cs["spectrum"] == kind and cs["T"] == T]
            for i, cs in enumerate(mine):
                P = cs["P"]
                k = np.arange(P + 1)
                col = colours[i % len(colours)]
                m = np.asarray(cs["measured_max_per_k"]) / cs["scale"]
                gv = np.asarray(cs["gv_bound_max_per_k"]) / cs["scale"]
                rc = np.asarray(cs["recursive_bound_max_per_k"]) / cs["scale"]
                ok = m > 0
                ax.semilogy(k[ok], m[ok], "o-", color=col, ms=3)
                okb = gv > 0
                ax.semilogy(k[okb], gv[okb], "--", color=col)
                okr = rc > 0
                ax.semilogy(k[okr], rc[okr], ":", color=col)
            ax.axhline(ATOL, color="0.5", lw=0.8)
            ax.text(0.98, ATOL, "round-off allowance", color="0.4", fontsize=6,
                    ha="right", va="bottom", transform=ax.get_yaxis_transform())
            ax.set_ylim(bottom=1e-20)
            ax.set_title(f"{kind}, T={T:g}", fontsize=9)
            ax.set_xlabel("parareal iteration k")
            ax.set_ylabel("max_j error / max_n |x*_n|")
            ax.grid(True, which="major", alpha=0.3)
    Ps = sorted({cs["P"] for cs in cases})
    handles = [Line2D([], [], color=colours[i % len(colours)], label=f"P={P}")
               for i, P in enumerate(Ps)]
    handles += [Line2D([], [], color="k", marker="o", ms=3, label="measured"),
                Line2D([], [], color="k", ls="--", label="GV bound"),
                Line2D([], [], color="k", ls=":", label="recursive bound")]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8)
    fig.suptitle("Parareal on a linear ResNet: max over chunk boundaries of the measured "
                 "error vs the Gander-Vandewalle bound", fontsize=9)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=110)


def run(quick: bool, out_dir: Path) -> Record:
    d, S, N = 6, 3, (16 if quick else 128)
    spectra = ["decaying", "oscillatory"] if quick else ["decaying", "oscillatory",
                                                         "non-normal"]
    Ts = [1.0] if quick else [1.0, 4.0]
    Ps = [4] if quick else [4, 8, 16, 32]
    cases = []
    prop = x0 = None
    for si, kind in enumerate(spectra):
        for T in Ts:
            for P in Ps:
                case, p, x = _one_case(kind, T, P, N, d, S, seed=100 * si + int(T))
                cases.append(case)
                prop, x0 = prop or p, x0 if x0 is not None else x
    report = ptoc.check_propagator(prop, x0)
    fig = "gander_vandewalle.png"
    _figure(cases, out_dir / fig, spectra, Ts)
    worst_gv = max(c["excess_over_gv"] for c in cases)
    worst_rec = max(c["excess_over_recursive"] for c in cases)
    rec_gap = max(c["recursion_gap"] for c in cases)
    checks = {
        "the linear user propagator passes ptoc.check_propagator": report.passed,
        "ptoc's parareal iterates = error recursion (1) with the matrices (rel. 1e-10)":
            rec_gap <= 1e-10,
        "measured error <= GV bound at every iteration and boundary": worst_gv <= 0.0,
        "measured error <= recursive bound at every iteration and boundary": worst_rec <= 0.0,
    }
    table = [{k: c[k] for k in ("spectrum", "T", "P", "alpha", "beta",
                                "worst_measured_over_gv", "worst_measured_over_recursive",
                                "excess_over_gv", "recursion_gap")} for c in cases]
    return Record.from_checks(
        checks,
        our_value={"cases": len(cases),
                   "max measured/GV bound": max(c["worst_measured_over_gv"] for c in cases),
                   "max measured/recursive bound":
                       max(c["worst_measured_over_recursive"] for c in cases),
                   "max (measured - bound), allowance subtracted": worst_gv},
        paper_value="||e_j^k|| <= C(j-1,k) alpha^k beta^(j-k-1) max||e^0|| (Gander & "
                    "Vandewalle 2007, linear case)",
        tolerance=f"measured <= bound*(1+{RTOL:g}) + {ATOL:g}*max_n||x*_n|| at every k=1..P and "
                  "boundary j=1..P-1",
        details={"table": table, "cases": cases, "propagator_check": str(report),
                 "d": d, "S": S, "N": N},
        figures=[fig])


if __name__ == "__main__":
    raise SystemExit(script_main(__name__))
