"""Claim 9: the closed-form ternary and binary Hamiltonian maximisers equal brute force.

Li & Hao (2018), discrete-weight MSA: each weight entry maximises
``f(w) = M w - lam |w| - rho (w - W)^2`` over ``{-1, 0, +1}`` (ternary) or ``{-1, +1}``
(binary); ptoc's closed form (``ptoc.discrete``, derivation in its docstring) is
``sign(c)`` where ``|c| > lam + rho`` (else 0), ``c = M + 2 rho W``. Checked against
enumerating the discrete set for random ``M, W, rho, lam`` over several scales,
entry by entry: the closed form must attain the brute-force maximum to round-off
(ties may pick either maximiser).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ptoc.cli.claims import Record, script_main
from ptoc.discrete import binary_maximiser, discrete_objective, ternary_maximiser

NUMBER = 9
CLAIM = "the closed-form ternary and binary maximisers equal brute force over the discrete set"
SOURCE = "Li & Hao 2018, discrete-weight MSA; docs/theory/msa.md"


def _brute(M, W, rho, lam, levels):
    values = np.stack([discrete_objective(w, M, W, rho, lam) for w in levels])
    return values.max(axis=0)


def run(quick: bool, out_dir: Path) -> Record:
    rng = np.random.default_rng(9)
    cases = 20 if quick else 2000
    worst = {"ternary": 0.0, "binary": 0.0}
    entries = 0
    for _ in range(cases):
        shape = tuple(rng.integers(1, 9, size=2))
        scale = 10.0 ** rng.uniform(-3, 3)
        M = scale * rng.standard_normal(shape)
        W = rng.choice([-1.0, 0.0, 1.0], size=shape) if rng.random() < 0.5 \
            else rng.standard_normal(shape)
        rho = scale * rng.exponential()
        lam = scale * rng.exponential()
        for kind, levels, w in (
                ("ternary", (-1.0, 0.0, 1.0), ternary_maximiser(M, W, rho, lam)),
                ("binary", (-1.0, 1.0), binary_maximiser(M, W, rho))):
            lam_k = lam if kind == "ternary" else 0.0
            best = _brute(M, W, rho, lam_k, levels)
            got = discrete_objective(w, M, W, rho, lam_k)
            gap = (best - got) / (np.abs(best) + scale)
            worst[kind] = max(worst[kind], float(gap.max()))
            assert set(np.unique(w)) <= set(levels)
        entries += M.size
    tol = 1e-12
    return Record.from_checks(
        {f"{k} attains the brute-force maximum": v <= tol for k, v in worst.items()},
        our_value={"ternary gap": worst["ternary"], "binary gap": worst["binary"]},
        tolerance=f"relative objective gap <= {tol:g}",
        details={"cases": cases, "entries": entries})


if __name__ == "__main__":
    raise SystemExit(script_main(__name__))
