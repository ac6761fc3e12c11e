"""Claim 1: the discrete adjoint is backpropagation, and equals finite differences.

Claim (docs/theory/adjoint.md; the adjoint view of ResNet training of Günther et al. 2020,
"Layer-parallel training of deep residual neural networks"): the gradient of
``J(theta) = Phi(x_N) + R(theta)`` computed by the discrete adjoint sweep
``lambda_n = lambda_{n+1} + h K_n^T (sigma'(a_n) * lambda_{n+1})`` with
``dJ/dK_n = h sum_s (sigma'(a_{n,s}) * lambda_{n+1,s}) x_{n,s}^T + dR/dK_n`` (and likewise
for ``b_n``, the opening layer and the classifier), i.e. :func:`ptoc.loss_and_grad`,

1. equals reverse-mode differentiation (backpropagation) of the forward code to
   round-off, for tanh, ReLU and SmoothReLU, every parameter group
   (``K, b, K_in, b_in, W, mu``), in float64;
2. equals central finite differences up to their truncation error;
3. and the linearised (tangent) forward sweep and the adjoint sweep satisfy the
   dot-product identity ``<lambda_N, dx_N> = <lambda_0, dx_0> + sum_n <dJ/dtheta_n,
   dtheta_n>`` (data part of the gradient) for arbitrary ``lambda_N``, ``dx_0``,
   ``dtheta``.

How it is checked
-----------------
Backpropagation is taken three ways, on random networks (several widths, depths,
batch sizes, final times ``T``, dense and identity opening layers, nonzero
regularisers, nonzero biases so that no pre-activation sits on a ReLU kink):

* ``ptoc.testing.tape_loss_and_grad``: the minimal tape the test suite uses (it
  reuses ptoc's activation functions and the regulariser's gradient);
* an independent reverse-mode tape written in this script (its own activations,
  cross-entropy and regulariser, nothing taken from ptoc but the parameters);
* PyTorch autograd in float64, in the full run when ``torch`` is installed (skipped
  otherwise, and in quick mode, where its import alone takes seconds; the claim is
  decided without it by the two tapes above).

"Holds" for 1: for every parameter group ``max |g - g_bp| <= 1e-13 max |g_bp|`` and
``|J - J_bp| <= 1e-13 |J_bp|``, for both CPU kernels targets (``numpy`` and ``cpu``).

For 2, on small networks (d = 4, N = 4, S = 5, several seeds: their pre-activations
stay about 1e-2 away from the kinks, which leaves a kink-free truncation regime), the
directional derivative ``<grad, v>`` along a random unit direction ``v`` in each
parameter group (and in all parameters together) is compared with
``(J(theta + eps v) - J(theta - eps v)) / (2 eps)`` over step sizes ``eps`` from
``1e-1`` to ``1e-11``; the error, relative to ``|grad of the group|``, must show
the V of central differences: (a) in the truncation regime (where the error exceeds
the round-off estimate ``eps_mach |J| / eps`` a hundredfold, ``eps <= 1e-2`` so that the
``eps^4`` term of the expansion is negligible, and no pre-activation
crosses a kink of the activation -- ReLU at 0, SmoothReLU at ``+-eta``, where the
loss is not smooth enough for the Taylor argument), the log-log slope of the error is
2 (fitted slope in ``[1.8, 2.2]``): the difference is the ``eps^2`` truncation error;
(b) the smallest error over the step sizes is ``<= 1e-8`` (a wrong gradient gives a
plateau at the size of its error instead).

For 3 "holds" means ``|lhs - rhs| <= 1e-12 (|lhs| + |<lambda_0,dx_0>| +
|<g_K,dK>| + |<g_b,db>|)`` (round-off of the sums).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

import ptoc
from ptoc.cli.claims import Record, script_main
from ptoc.propagator import ResNetPropagator
from ptoc.testing import tape_loss_and_grad

NUMBER = 1
CLAIM = ("the discrete adjoint gradient equals backpropagation to round-off (1e-13) and "
         "central finite differences to truncation error, for tanh, ReLU and SmoothReLU")
SOURCE = ("docs/theory/adjoint.md; Günther et al. 2020 (layer-parallel training of deep ResNets), "
          "adjoint-based gradient")

ACTS = ("tanh", "relu", "smoothrelu")
GROUPS = ("K", "b", "K_in", "b_in", "W", "mu")
ETA = 0.1  # SmoothReLU blend half-width (docs/theory/resnet.md)
BP_TOL = 1e-13
DOT_TOL = 1e-12
FD_MIN_TOL = 1e-8
SLOPE_RANGE = (1.8, 2.2)
EPS_MACH = np.finfo(np.float64).eps
FD_PROBLEM = dict(width=4, depth=4, S=5, T=1.3)
FD_FIT_MAX = 1e-2  # largest step in the slope fit: the eps^2 term must dominate eps^4


# --- random problems ----------------------------------------------------------------------------

def _problem(act, width, depth, S, seed, T, opening="dense", n_in=3, n_classes=4):
    rng = np.random.default_rng(seed)
    if opening == "identity":
        n_in = width
    net = ptoc.ResNet(width=width, depth=depth, T=T, activation=act, n_in=n_in,
                      n_classes=n_classes, opening=opening, gamma=1e-2, gamma_t=3e-2,
                      gamma_c=2e-2)
    params = net.init_params(rng, scale=1.5)
    # nonzero biases: pre-activations are then almost surely off the kinks
    params.b[...] = rng.standard_normal(params.b.shape) * 0.7
    params.mu[...] = rng.standard_normal(params.mu.shape)
    if params.b_in is not None:
        params.b_in[...] = rng.standard_normal(params.b_in.shape)
    X = rng.standard_normal((S, n_in))
    y = rng.integers(0, n_classes, S)
    return net, params, X, y


# --- an independent reverse-mode tape (nothing from ptoc but the numbers) -------------------

class _Var:
    """A node of the script's own tape: a value, its adjoint and how to pull it back."""

    def __init__(self, tape, value, parents=()):
        self.value = np.asarray(value, dtype=np.float64)
        self.grad = np.zeros_like(self.value)
        self.parents = parents  # (parent, vector-Jacobian product)
        tape.append(self)


def _sum_to(g, shape):
    while g.ndim > len(shape):
        g = g.sum(axis=0)
    return g


def _act_value(a, act):
    if act == "tanh":
        return np.tanh(a)
    relu = np.maximum(a, 0.0)
    if act == "relu":
        return relu
    return np.where(np.abs(a) < ETA, a * a / (4 * ETA) + a / 2 + ETA / 4, relu)


def _act_slope(a, act):
    if act == "tanh":
        return 1.0 - np.tanh(a) ** 2
    step = (a > 0).astype(np.float64)
    if act == "relu":
        return step
    return np.where(np.abs(a) < ETA, a / (2 * ETA) + 0.5, step)


def _own_backprop(net, params, X, y):
    """``J`` and ``dJ/dtheta`` by reverse accumulation through this script's forward code."""
    act = net.activation.value
    tape: list[_Var] = []
    leaf = {k: _Var(tape, params[k]) for k in params}

    def matmul_t(x, w):  # x (S, m) @ w.T, w (k, m)
        return _Var(tape, x.value @ w.value.T, ((x, lambda g: g @ w.value),
                                                  (w, lambda g: g.T @ x.value)))

    def add(p, q):
        return _Var(tape, p.value + q.value, ((p, lambda g: _sum_to(g, p.value.shape)),
                                              (q, lambda g: _sum_to(g, q.value.shape))))

    def scale(p, c):
        return _Var(tape, c * p.value, ((p, lambda g: c * g),))

    def activation(p):
        return _Var(tape, _act_value(p.value, act),
                    ((p, lambda g: g * _act_slope(p.value, act)),))

    def take(p, n):  # layer n of a stacked parameter
        def vjp(g):
            out = np.zeros_like(p.value)
            out[n] = g
            return out
        return _Var(tape, p.value[n], ((p, vjp),))

    def half_sq(p):  # sum(p^2)/2
        return _Var(tape, 0.5 * np.sum(p.value ** 2), ((p, lambda g: g * p.value),))

    def diff(p):  # p[1:] - p[:-1] along the layer axis
        def vjp(g):
            out = np.zeros_like(p.value)
            out[1:] += g
            out[:-1] -= g
            return out
        return _Var(tape, np.diff(p.value, axis=0), ((p, vjp),))

    def total(*terms):
        return _Var(tape, sum(t.value for t in terms), tuple((t, lambda g: g) for t in terms))

    def mean_ce(z):
        S = z.value.shape[0]
        m = z.value.max(axis=1, keepdims=True)
        e = np.exp(z.value - m)
        p = e / e.sum(axis=1, keepdims=True)
        rows = np.arange(S)
        value = np.mean(np.log(e.sum(axis=1)) + m[:, 0] - z.value[rows, y])

        def vjp(g):
            d = p.copy()
            d[rows, y] -= 1.0
            return g * d / S
        return _Var(tape, value, ((z, vjp),))

    h = net.h
    x = _Var(tape, X)
    if "K_in" in leaf:
        x = activation(add(matmul_t(x, leaf["K_in"]), leaf["b_in"]))
    for n in range(net.depth):
        x = add(x, scale(activation(add(matmul_t(x, take(leaf["K"], n)),
                                        take(leaf["b"], n))), h))
    loss = mean_ce(add(matmul_t(x, leaf["W"]), leaf["mu"]))
    terms = [loss, scale(total(half_sq(leaf["K"]), half_sq(leaf["b"])), net.gamma * h)]
    if net.depth > 1:
        terms.append(scale(total(half_sq(diff(leaf["K"])), half_sq(diff(leaf["b"]))),
                           net.gamma_t / h))
    terms.append(scale(total(*(half_sq(leaf[k]) for k in ("W", "mu", "K_in", "b_in")
                               if k in leaf)), net.gamma_c))
    J = total(*terms)
    J.grad = np.ones_like(J.value)
    for node in reversed(tape):
        for parent, vjp in node.parents:
            parent.grad = parent.grad + vjp(node.grad)
    return float(J.value), {k: v.grad for k, v in leaf.items()}


def _torch_backprop(torch, net, params, X, y):
    """``J`` and ``dJ/dtheta`` by PyTorch autograd (float64), the whole objective."""
    t = {k: torch.tensor(np.asarray(v), dtype=torch.float64, requires_grad=True)
         for k, v in params.items()}
    act = net.activation.value

    def sigma(a):
        if act == "tanh":
            return torch.tanh(a)
        if act == "relu":
            return torch.relu(a)
        return torch.where(a.abs() < ETA, a * a / (4 * ETA) + a / 2 + ETA / 4, torch.relu(a))

    x = torch.tensor(X, dtype=torch.float64)
    if "K_in" in t:
        x = sigma(x @ t["K_in"].T + t["b_in"])
    h = net.h
    for n in range(net.depth):
        x = x + h * sigma(x @ t["K"][n].T + t["b"][n])
    z = x @ t["W"].T + t["mu"]
    J = torch.nn.functional.cross_entropy(z, torch.tensor(y, dtype=torch.long))
    J = J + 0.5 * net.gamma * h * ((t["K"] ** 2).sum() + (t["b"] ** 2).sum())
    if net.depth > 1:
        J = J + 0.5 * net.gamma_t / h * ((torch.diff(t["K"], dim=0) ** 2).sum()
                                         + (torch.diff(t["b"], dim=0) ** 2).sum())
    J = J + 0.5 * net.gamma_c * sum((t[k] ** 2).sum() for k in ("W", "mu", "K_in", "b_in")
                                    if k in t)
    J.backward()
    return float(J.detach()), {k: v.grad.numpy().copy() for k, v in t.items()}


def _group_rel(g, ref):
    return {k: float(np.max(np.abs(np.asarray(g[k]) - ref[k])) / max(np.max(np.abs(ref[k])),
                                                                      1e-300))
            for k in ref}


# --- finite differences -----------------------------------------------------------------------

def _preactivation_regions(net, params, X):
    """Region index of every pre-activation (opening and residual layers): which piece
    of the activation it falls on (ReLU: a > 0; SmoothReLU: a < -eta, |a| < eta, a > eta)."""
    act = net.activation.value
    x = X
    pieces = []
    if params.K_in is not None:
        a = X @ params.K_in.T + params.b_in
        pieces.append(a.ravel())
        x = _act_value(a, act)
    for n in range(net.depth):
        a = x @ params.K[n].T + params.b[n]
        pieces.append(a.ravel())
        x = x + net.h * _act_value(a, act)
    a = np.concatenate(pieces)
    if act == "relu":
        return (a > 0).astype(np.int8)
    return np.digitize(a, [-ETA, ETA]).astype(np.int8)


def _fd_curve(net, params, X, y, grads, group, rng, eps_grid):
    """Errors of central differences along a random unit direction of ``group``."""
    theta = params.ravel()
    v_params = params.unravel(np.zeros_like(theta))
    keys = list(params) if group == "all" else [group]
    for k in keys:
        v_params[k][...] = rng.standard_normal(params[k].shape)
    v = v_params.ravel()
    v /= np.linalg.norm(v)
    v_params = params.unravel(v)
    exact = float(sum(np.vdot(grads[k], v_params[k]) for k in keys))
    gnorm = float(np.sqrt(sum(np.vdot(grads[k], grads[k]) for k in keys)))
    J0 = ptoc.loss(net, params, X, y, target="numpy")
    base = None if net.activation.value == "tanh" else _preactivation_regions(net, params, X)
    errors, kinks = [], []
    for eps in eps_grid:
        p_plus = params.unravel(theta + eps * v)
        p_minus = params.unravel(theta - eps * v)
        fd = (ptoc.loss(net, p_plus, X, y, target="numpy")
              - ptoc.loss(net, p_minus, X, y, target="numpy")) / (2 * eps)
        errors.append(abs(fd - exact) / gnorm)
        crossed = False
        if base is not None:
            crossed = not (np.array_equal(_preactivation_regions(net, p_plus, X), base)
                           and np.array_equal(_preactivation_regions(net, p_minus, X), base))
        kinks.append(crossed)
    errors = np.array(errors)
    roundoff = EPS_MACH * abs(J0) / eps_grid / gnorm
    regime = (errors > 100 * roundoff) & ~np.array(kinks) & (eps_grid <= FD_FIT_MAX)
    slope = None
    if regime.sum() >= 3:
        slope = float(np.polyfit(np.log(eps_grid[regime]), np.log(errors[regime]), 1)[0])
    return {"errors": errors, "kink_crossed": np.array(kinks), "truncation_regime": regime,
            "slope": slope, "min_error": float(errors.min()),
            "best_eps": float(eps_grid[int(np.argmin(errors))]), "directional": exact,
            "group_grad_norm": gnorm}


# --- dot-product identity --------------------------------------------------------------------

def _dot_identity(net, params, X, rng):
    prop = ResNetPropagator(net, params)
    x0 = prop.initial_state(X)
    states = np.empty((net.depth + 1,) + x0.shape)
    prop.propagate(x0, states=states)
    dx0 = rng.standard_normal(x0.shape)
    dK = rng.standard_normal(params.K.shape)
    db = rng.standard_normal(params.b.shape)
    dx = dx0
    for n in range(net.depth):
        dx = prop.tangent_step(n, states[n], dx, dK[n], db[n])
    lam_N = rng.standard_normal(x0.shape)
    grad = prop.zero_gradient()
    lam0 = prop.adjoint_propagate(states, lam_N, grad=grad)
    terms = [float(np.vdot(lam0, dx0)), float(np.vdot(grad[0], dK)),
             float(np.vdot(grad[1], db))]
    lhs = float(np.vdot(lam_N, dx))
    return abs(lhs - sum(terms)) / (abs(lhs) + sum(abs(t) for t in terms))


# --- the figure --------------------------------------------------------------------------------

def _figure(curves, eps_grid, path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 4.2))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(curves), sharey=True)
    for ax, (act, per_group) in zip(axes, curves.items(), strict=True):
        for group, c in per_group.items():
            err = np.maximum(c["errors"], 1e-17)
            line, = ax.loglog(eps_grid, err, "-", lw=1.2,
                              label=f"{group} (slope {c['slope']:.2f})" if c["slope"]
                              else group)
            kink = c["kink_crossed"]
            if kink.any():
                ax.loglog(eps_grid[kink], err[kink], "o", mfc="none", color=line.get_color(),
                          ms=4)
        ax.loglog(eps_grid, 1e-2 * eps_grid ** 2, "k--", lw=0.8, label=r"$\propto\epsilon^2$")
        ax.loglog(eps_grid, EPS_MACH / eps_grid, "k:", lw=0.8,
                  label=r"$\epsilon_{mach}/\epsilon$")
        ax.set_title(act)
        ax.set_xlabel("finite-difference step $\\epsilon$")
        ax.grid(True, which="major", alpha=0.3)
        ax.set_ylim(1e-17, 1e5)
        ax.legend(fontsize=6.5, loc="upper center", ncol=2)
    axes[0].set_ylabel("|central difference - <grad, v>| / |grad|")
    fig.suptitle("Central differences against the adjoint gradient (hollow: a "
                 "pre-activation crosses a kink)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# --- the check ---------------------------------------------------------------------------------

def run(quick: bool, out_dir: Path) -> Record:
    torch = None
    if not quick:  # importing torch takes seconds: the full run only
        try:
            import torch
        except ImportError:
            pass
    if quick:
        configs = [dict(width=5, depth=6, S=17, seed=0, T=1.3),
                   dict(width=4, depth=5, S=9, seed=1, T=1.0, opening="identity")]
        eps_grid = 10.0 ** -np.arange(1.0, 11.01, 0.2)
        dot_seeds = [0]
        fd_seeds = [0]
    else:
        configs = [dict(width=5, depth=6, S=17, seed=0, T=1.3),
                   dict(width=4, depth=5, S=9, seed=1, T=1.0, opening="identity"),
                   dict(width=3, depth=1, S=5, seed=2, T=0.5),
                   dict(width=8, depth=32, S=40, seed=3, T=2.0),
                   dict(width=6, depth=48, S=25, seed=4, T=5.0, opening="identity"),
                   dict(width=9, depth=12, S=64, seed=5, T=1.0, n_in=2, n_classes=5)]
        eps_grid = 10.0 ** -np.arange(1.0, 11.01, 0.1)
        dot_seeds = [0, 1, 2, 3]
        fd_seeds = [0, 1, 2, 3]

    bp_rows = []
    worst_bp = {"ptoc tape": 0.0, "own tape": 0.0, "torch": 0.0 if torch else None}
    for act in ACTS:
        for cfg in configs:
            net, params, X, y = _problem(act, **cfg)
            refs = {"ptoc tape": tape_loss_and_grad(net, params, X, y),
                    "own tape": _own_backprop(net, params, X, y)}
            if torch is not None:
                refs["torch"] = _torch_backprop(torch, net, params, X, y)
            for target in ("numpy", "cpu"):
                J, g = ptoc.loss_and_grad(net, params, X, y, target=target)
                for ref_name, (J_ref, g_ref) in refs.items():
                    rel = _group_rel(g, g_ref)
                    loss_rel = abs(J - J_ref) / abs(J_ref)
                    worst = max(max(rel.values()), loss_rel)
                    worst_bp[ref_name] = max(worst_bp[ref_name], worst)
                    bp_rows.append({"activation": act, **cfg, "target": target,
                                    "reference": ref_name, "loss_rel": loss_rel,
                                    **{f"{k}_rel": v for k, v in rel.items()}})

    fd_curves: dict[str, dict[str, dict]] = {}
    fd_summary = []
    for act in ACTS:
        for seed in fd_seeds:
            # a small network: its pre-activations stay ~1e-2 away from the kinks, which
            # leaves a kink-free truncation regime to measure the slope in
            net, params, X, y = _problem(act, **{**FD_PROBLEM, "seed": seed})
            _, grads = ptoc.loss_and_grad(net, params, X, y)
            rng = np.random.default_rng(100 + seed)
            for group in (*GROUPS, "all"):
                c = _fd_curve(net, params, X, y, grads, group, rng, eps_grid)
                if seed == fd_seeds[0]:
                    fd_curves.setdefault(act, {})[group] = c
                fd_summary.append({"activation": act, "seed": seed, "group": group,
                                   "slope": c["slope"],
                                   "slope_points": int(c["truncation_regime"].sum()),
                                   "min_error": c["min_error"], "best_eps": c["best_eps"],
                                   "kink_crossings": int(c["kink_crossed"].sum()),
                                   "directional_derivative": c["directional"]})

    dot_rows = []
    for act in ACTS:
        for cfg in configs:
            for s in dot_seeds:
                net, params, X, _ = _problem(act, **{**cfg, "seed": cfg["seed"] + 10 * s})
                rel = _dot_identity(net, params, X, np.random.default_rng(200 + s))
                dot_rows.append({"activation": act, **cfg, "seed": cfg["seed"] + 10 * s,
                                 "relative_defect": rel})
    worst_dot = max(r["relative_defect"] for r in dot_rows)

    slopes_ok = all(r["slope"] is not None and SLOPE_RANGE[0] <= r["slope"] <= SLOPE_RANGE[1]
                    for r in fd_summary)
    fd_min_ok = all(r["min_error"] <= FD_MIN_TOL for r in fd_summary)
    checks = {f"adjoint = backpropagation ({name}) to {BP_TOL:g}": w <= BP_TOL
              for name, w in worst_bp.items() if w is not None}
    checks[f"central differences: truncation slope in [{SLOPE_RANGE[0]}, {SLOPE_RANGE[1]}]"] = \
        slopes_ok
    checks[f"central differences: best error <= {FD_MIN_TOL:g}"] = fd_min_ok
    checks[f"dot-product identity to {DOT_TOL:g}"] = worst_dot <= DOT_TOL

    figures = []
    name = "adjoint_backprop_fd.png"
    _figure(fd_curves, eps_grid, out_dir / name)
    figures.append(name)

    slopes = [r["slope"] for r in fd_summary if r["slope"] is not None]
    our = {"max rel. diff to backprop": max(w for w in worst_bp.values() if w is not None),
           "FD slope range": [min(slopes), max(slopes)] if slopes else None,
           "FD best error (max)": max(r["min_error"] for r in fd_summary),
           "dot-product defect": worst_dot}
    return Record.from_checks(
        checks, our_value=our,
        tolerance={"backprop": f"per group max|g - g_bp| <= {BP_TOL:g} max|g_bp|, loss "
                               f"<= {BP_TOL:g} relative",
                   "finite differences": f"log-log slope in {list(SLOPE_RANGE)} in the "
                   f"truncation regime (no kink crossed) and best error <= {FD_MIN_TOL:g} "
                   "relative to |grad of the group|",
                   "dot product": f"<= {DOT_TOL:g} relative to the sum of the terms' "
                                  "magnitudes"},
        details={"torch": torch.__version__ if torch is not None else
                 "not installed: PyTorch comparison skipped (the two tapes decide)",
                 "worst_backprop_by_reference": worst_bp,
                 "backprop": bp_rows, "finite_differences": fd_summary,
                 "eps_grid": eps_grid,
                 "fd_errors": {a: {g: c["errors"] for g, c in d.items()}
                               for a, d in fd_curves.items()},
                 "dot_product": dot_rows},
        figures=figures)


if __name__ == "__main__":
    raise SystemExit(script_main(__name__))
