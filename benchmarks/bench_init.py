#!/usr/bin/env python
"""Independent against smooth initial layer weights, by depth (``init_params(layers=...)``).

Peaks (``ptoc.data.peaks()``), ResNet of width 8, SmoothReLU, T = 5, default
regulariser weights (gamma_t = 1e-4), trained with ``ptoc train``'s defaults (Adam,
lr 3e-3, batch 50) for ``--epochs`` epochs from ``init_params(seed, layers=...)``,
seeds 0 .. ``--seeds``-1 (the seed also shuffles the batches). Reported: the
regulariser and the objective at the start and the validation accuracy at the end,
mean and per seed. With independent layers the time-smoothness term starts near
gamma_t d N^2 / T and dominates a deep network's objective; with smooth layers it is
bounded. Nothing is timed. Usage::

    python benchmarks/bench_init.py                 # N = 32, 256, 1024; 3 seeds, 10 epochs
    python benchmarks/bench_init.py --depths 64 --seeds 1 --epochs 2

Writes ``benchmarks/out/init_<timestamp>.json`` unless ``--no-json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import ptoc
from ptoc.objective import regulariser

RESULTS = Path(__file__).resolve().parent / "out"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--depths", type=int, nargs="+", default=[32, 256, 1024])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--no-json", action="store_true")
    args = ap.parse_args(argv)
    if args.seeds < 1 or args.epochs < 1 or min(args.depths) < 1:
        ap.error("--depths, --seeds and --epochs must be positive")

    data = ptoc.data.peaks()
    rows = []
    print("| N | layers | R at start | J at start | val. accuracy (mean) | per seed |")
    print("|---|---|---|---|---|---|")
    for N in args.depths:
        net = ptoc.ResNet(width=8, depth=N, T=5.0, activation="smoothrelu", n_in=data.n_in,
                          n_classes=data.n_classes)
        for layers in ("independent", "smooth"):
            reg, obj, acc = [], [], []
            for seed in range(args.seeds):
                p0 = net.init_params(seed, layers=layers)
                reg.append(regulariser(net, p0))
                obj.append(ptoc.loss(net, p0, data.X_train, data.y_train))
                res = ptoc.train(net, p0, data, epochs=args.epochs, batch_size=50, seed=seed,
                                 progress=False)
                acc.append(res.val_accuracy)
            rows.append({"depth": N, "layers": layers, "regulariser_start": reg,
                         "objective_start": obj, "val_accuracy": acc})
            print(f"| {N} | {layers} | {np.mean(reg):.3g} | {np.mean(obj):.3g} | "
                  f"{100 * np.mean(acc):.1f}% | {' '.join(f'{100 * a:.1f}' for a in acc)} |")
    if not args.no_json:
        RESULTS.mkdir(exist_ok=True)
        path = RESULTS / f"init_{time.strftime('%Y%m%d-%H%M%S')}.json"
        path.write_text(json.dumps({
            "benchmark": "independent vs smooth initial layer weights",
            "command": " ".join(["bench_init.py", *(argv or [])]),
            "settings": vars(args) | {"data": data.name, "width": 8, "T": 5.0,
                                      "activation": "smoothrelu", "optimizer": "Adam(3e-3)",
                                      "batch_size": 50, "ptoc": ptoc.__version__},
            "rows": rows}, indent=1) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
