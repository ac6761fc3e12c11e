#!/usr/bin/env python
"""Ternary and binary ResNets trained by discrete MSA (Li & Hao 2018) on digits.

Li & Hao report 98.8% test accuracy on MNIST for a ternary network with 1.8% nonzero
weights. This script makes the same kind of comparison at a size that runs on two
cores in minutes: scikit-learn's 8x8 digits (:func:`ptoc.data.digits`: 1347 training
and 450 held-out images, 64 pixels in [0, 1], 10 classes).

Network (the same for every row): ``ptoc.ResNet(width=64, depth=8, T=3, tanh,
n_in=64, n_classes=10, opening="identity")``. Why this one: with an *identity*
opening ``x_0 = y`` every hidden weight sits in the residual layers, so the discrete
networks have no float hidden layer to lean on (a dense float opening would do much
of the work and blur the comparison); 64 is the input size, 8 layers of 64x64 give
32768 residual weights, and one gradient step on a batch of 64 costs a few
milliseconds. Only the classifier ``W, mu`` (650 numbers) and the biases stay float,
as in most discrete-weight networks. ``T = 3`` rather than 1: digits is nearly
linearly separable, and in a trial (2 seeds) the float ResNet beat the "no residual
weights" floor below by only 0.1 points at ``T = 1`` (60 epochs) but by 1.2 points at
``T = 3`` (30 epochs); the comparison is only informative where the residual layers
matter.

Rows, each trained for the same number of epochs (40) with batches of 64 (a new
``rng.permutation`` per epoch), seeds 0-4 for the initial weights and the shuffling:

* ``float (Adam)``: :class:`ptoc.methods.GradientMethod` with ``Adam(lr=3e-3)``
  (the default of ``ptoc train``);
* ``no residual weights``: ``K_n = 0`` throughout (a ternary run with ``lam`` so large
  that every weight is 0): the head and biases alone, i.e. a linear classifier. This
  is the floor the residual layers have to beat;
* ``ternary``: :class:`ptoc.msa.DiscreteMSA` with its defaults (``rho = 1``,
  ``lam = 1``, linear ``rho_k`` growth 0.01, ``beta = 0.99``), and with ``lam = 4``
  (sparser);
* ``binary``: ``DiscreteMSA(kind="binary")`` (defaults ``rho = 0.5``, same schedule).

Reported per row: final test accuracy (mean and spread over the seeds; no selection
on the test set), final training accuracy, the fraction of nonzero residual weights
and the wall time per run. A JSON record goes to
``benchmarks/out/discrete_<timestamp>.json`` unless ``--no-json``.

Usage::

    python benchmarks/bench_discrete.py            # 40 epochs, 5 seeds (1-3 minutes)
    python benchmarks/bench_discrete.py --quick    # 5 epochs, 1 seed
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import sys
import time
from pathlib import Path

import _machine  # benchmarks/_machine.py
import numpy as np

import ptoc
from ptoc.methods import GradientMethod, TrainingMethod
from ptoc.msa import DiscreteMSA
from ptoc.optim import Adam
from ptoc.sweeps import accuracy, loss


def _network(depth: int, T: float) -> ptoc.ResNet:
    return ptoc.ResNet(width=64, depth=depth, T=T, activation="tanh", n_in=64,
                       n_classes=10, opening="identity")


def _rows(lam_sparse: float) -> list[tuple[str, TrainingMethod]]:
    return [
        ("float (Adam)", GradientMethod(optimizer=Adam(lr=3e-3))),
        ("no residual weights (K = 0)", DiscreteMSA(kind="ternary", lam=1e12)),
        ("ternary (defaults, lam = 1)", DiscreteMSA(kind="ternary")),
        (f"ternary (lam = {lam_sparse:g})", DiscreteMSA(kind="ternary", lam=lam_sparse)),
        ("binary (defaults)", DiscreteMSA(kind="binary")),
    ]


def _train(network, method: TrainingMethod, data, epochs: int, batch: int, seed: int):
    params = network.init_params(seed)
    state = method.init(network, params)
    if isinstance(method, DiscreteMSA):
        params = method.discrete_params(network, params, state)
    rng = np.random.default_rng(seed)
    X, y = data.X_train, data.y_train
    n = len(y)
    t0 = time.perf_counter()
    for _ in range(epochs):
        perm = rng.permutation(n)
        for i in range(0, n, batch):
            idx = perm[i:i + batch]
            out = method.step(network, params, state, X[idx], y[idx])
            params, state = out.params, out.state
    wall = time.perf_counter() - t0
    frac = method.metrics(network, params, state).get(
        "nonzero_fraction", float(np.count_nonzero(params.K) / params.K.size))
    return {
        "seed": seed,
        "test_accuracy": accuracy(network, params, data.X_val, data.y_val),
        "train_accuracy": accuracy(network, params, X, y),
        "train_loss": loss(network, params, X, y),
        "nonzero_fraction": float(frac),
        "wall_s": wall,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="5 epochs, one seed")
    parser.add_argument("--epochs", type=int, default=None, help="default 40 (quick: 5)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="default 0 1 2 3 4 (quick: 0)")
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--T", type=float, default=3.0, help="final time (depth of the ODE)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lam-sparse", type=float, default=4.0,
                        help="lam of the sparse ternary row")
    parser.add_argument("--output", type=Path, default=None, help="JSON path")
    parser.add_argument("--no-json", action="store_true")
    args = parser.parse_args(argv)
    epochs = args.epochs if args.epochs is not None else (5 if args.quick else 40)
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2, 3, 4])
    if epochs < 1 or args.batch_size < 1 or args.depth < 1 or not seeds or args.T <= 0:
        parser.error("epochs, batch size, depth and T must be positive, and seeds non-empty")

    data = ptoc.data.digits()
    network = _network(args.depth, args.T)
    # compile the kernels before anything is timed
    loss(network, network.init_params(0), data.X_train[:8], data.y_train[:8])
    ptoc.loss_and_grad(network, network.init_params(0), data.X_train[:8], data.y_train[:8])
    print(f"digits: {len(data.y_train)} train / {len(data.y_val)} test; {network.describe()}; "
          f"{epochs} epochs, batch {args.batch_size}, seeds {seeds}", flush=True)
    start = time.perf_counter()
    rows = []
    for label, method in _rows(args.lam_sparse):
        runs = []
        for seed in seeds:
            runs.append(_train(network, method, data, epochs, args.batch_size, seed))
            print(f"  {label:30s} seed {seed}: test {runs[-1]['test_accuracy']:.4f}, "
                  f"nonzero {runs[-1]['nonzero_fraction']:.4f}, "
                  f"{runs[-1]['wall_s']:.1f} s", flush=True)
        acc = np.array([r["test_accuracy"] for r in runs])
        rows.append({"label": label, "method": method.config(), "runs": runs,
                     "test_accuracy_mean": float(acc.mean()),
                     "test_accuracy_min": float(acc.min()),
                     "test_accuracy_max": float(acc.max()),
                     "train_accuracy_mean": float(np.mean([r["train_accuracy"] for r in runs])),
                     "nonzero_fraction_mean": float(np.mean([r["nonzero_fraction"]
                                                             for r in runs])),
                     "wall_s_mean": float(np.mean([r["wall_s"] for r in runs]))})
    elapsed = time.perf_counter() - start

    print()
    head = (f"| {'network':30s} | test acc. mean [min, max] | train acc. | nonzero "
            f"weights | s/run |")
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for r in rows:
        spread = f"{100 * r['test_accuracy_mean']:.1f}% [{100 * r['test_accuracy_min']:.1f}, " \
                 f"{100 * r['test_accuracy_max']:.1f}]"
        print(f"| {r['label']:30s} | {spread:25s} | {100 * r['train_accuracy_mean']:9.1f}% | "
              f"{100 * r['nonzero_fraction_mean']:14.1f}% | {r['wall_s_mean']:5.1f} |")
    print(f"\ntotal {elapsed:.0f} s")

    if not args.no_json:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        path = args.output or Path(__file__).parent / "out" / f"discrete_{stamp}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "benchmark": "discrete-weight MSA (Li & Hao 2018) on digits",
            "command": " ".join(["bench_discrete.py"] + (argv if argv is not None
                                                         else sys.argv[1:])),
            "date": _dt.datetime.now().isoformat(timespec="seconds"),
            "network": {"width": 64, "depth": args.depth, "T": args.T, "activation": "tanh",
                        "opening": "identity", "n_in": 64, "n_classes": 10},
            "data": {"name": "digits", "n_train": int(len(data.y_train)),
                     "n_test": int(len(data.y_val)), "split_seed": 0},
            "settings": {"epochs": epochs, "batch_size": args.batch_size, "seeds": seeds},
            "machine": {"platform": platform.platform(), "python": platform.python_version(),
                        "numpy": np.__version__, "ptoc": getattr(ptoc, "__version__", None),
                        "git_commit": _machine.git_commit()},
            "elapsed_s": elapsed,
            "rows": rows,
        }
        path.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
