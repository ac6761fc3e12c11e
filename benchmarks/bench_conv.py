#!/usr/bin/env python
"""The convolutional ResNet's serial gradient against PyTorch CPU autograd.

Builds the same network in PyTorch (float64: ``conv2d`` with stride 1 and padding 1,
tanh, the classifier on ``vec(x_N)``, batch-mean cross-entropy and ptoc's regulariser),
checks that ``ptoc.loss_and_grad`` gives the same loss and gradients (to 1e-9
relative), then times one gradient of each target (``numpy``, ``cpu``) and of PyTorch,
interleaved, median of ``--repeat``. A JSON record goes to
``benchmarks/out/conv_<timestamp>.json`` unless ``--no-json``.

Usage::

    python benchmarks/bench_conv.py                 # channels 4, 8; batch 64; depth 8
    python benchmarks/bench_conv.py --channels 4 8 16 --batches 64 256 --depths 8 32

Needs torch (the ``bench`` extra).
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


def torch_gradient(net: ptoc.ConvResNet, p: dict, X: np.ndarray, y: np.ndarray):
    """Loss and gradients by PyTorch autograd, regulariser included."""
    import torch

    S, h = X.shape[0], net.h
    T = {k: torch.tensor(v, requires_grad=True) for k, v in p.items()}
    conv2d = torch.nn.functional.conv2d
    x = torch.tanh(conv2d(torch.tensor(X.reshape((S,) + net.image_shape)), T["K_in"],
                          T["b_in"], padding=1))
    for n in range(net.depth):
        x = x + h * torch.tanh(conv2d(x, T["K"][n], T["b"][n], stride=1, padding=1))
    J = torch.nn.functional.cross_entropy(x.reshape(S, -1) @ T["W"].T + T["mu"],
                                          torch.tensor(y))
    J = (J + net.gamma / 2 * h * sum(T[k].pow(2).sum() for k in ("K", "b"))
         + net.gamma_t / (2 * h) * sum((T[k][1:] - T[k][:-1]).pow(2).sum() for k in ("K", "b"))
         + net.gamma_c / 2 * sum(T[k].pow(2).sum() for k in ("W", "mu", "K_in", "b_in")))
    J.backward()
    return J.detach().item(), {k: t.grad.numpy() for k, t in T.items()}


def problem(channels: int, depth: int, batch: int, seed: int = 0):
    net = ptoc.ConvResNet(channels, depth, image_shape=(1, 28, 28), n_classes=10)
    p = net.init_params(seed).to_dict()
    rng = np.random.default_rng(seed + 1)
    for k in ("b", "b_in", "mu"):
        p[k][...] = 0.1 * rng.standard_normal(p[k].shape)
    return net, p, rng.random((batch, 784)), rng.integers(0, 10, batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--batches", type=int, nargs="+", default=[64])
    parser.add_argument("--depths", type=int, nargs="+", default=[8])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--no-json", action="store_true")
    args = parser.parse_args()

    rows = []
    for C in args.channels:
        for S in args.batches:
            for N in args.depths:
                net, p, X, y = problem(C, N, S)
                J, ref = torch_gradient(net, p, X, y)
                worst = 0.0
                for target in ("numpy", "cpu"):
                    loss, g = ptoc.loss_and_grad(net, p, X, y, target=target)
                    worst = max(worst, abs(loss - J) / abs(J), *(
                        float(np.max(np.abs(g[k] - ref[k])) / max(np.max(np.abs(ref[k])),
                                                                   1e-300)) for k in ref))
                times: dict[str, list[float]] = {"numpy": [], "cpu": [], "torch": []}
                for _ in range(args.repeat):  # interleaved
                    for name in times:
                        start = time.perf_counter()
                        if name == "torch":
                            torch_gradient(net, p, X, y)
                        else:
                            ptoc.loss_and_grad(net, p, X, y, target=name)
                        times[name].append(time.perf_counter() - start)
                med = {k: float(np.median(v)) for k, v in times.items()}
                rows.append({"channels": C, "batch": S, "depth": N, "max_rel_diff": worst,
                             **{f"{k}_ms": 1e3 * v for k, v in med.items()},
                             "torch_over_cpu": med["torch"] / med["cpu"]})
                print(f"C={C:3d} S={S:4d} N={N:3d}: numpy {1e3 * med['numpy']:8.1f} ms  "
                      f"cpu {1e3 * med['cpu']:8.1f} ms  torch {1e3 * med['torch']:8.1f} ms  "
                      f"torch/cpu {med['torch'] / med['cpu']:5.2f}x  max rel diff {worst:.1e}")
    if not args.no_json:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        path = Path(__file__).parent / "out" / f"conv_{stamp}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {"benchmark": "ConvResNet serial gradient against PyTorch CPU autograd",
                  "rows": rows, "repeat": args.repeat,
                  "date": _dt.datetime.now().isoformat(timespec="seconds"),
                  "machine": {"platform": platform.platform(), "numpy": np.__version__,
                              "git_commit": _machine.git_commit()}}
        path.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
