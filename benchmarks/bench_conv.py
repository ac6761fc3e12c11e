#!/usr/bin/env python
"""The convolutional ResNet's serial gradient against PyTorch CPU autograd.

Builds the same network in PyTorch (float64: ``conv2d`` with stride 1 and padding 1,
tanh, the classifier on ``vec(x_N)``, batch-mean cross-entropy and ptoc's regulariser),
checks that ``ptoc.loss_and_grad`` of each target of ``--targets`` gives the same loss and
gradients (to 1e-9 relative), then times one gradient of each target and of PyTorch,
interleaved, median of ``--repeat``, on ``--threads`` threads (Numba and PyTorch). The
rate is GFLOP/s of the residual layers' convolutions, ``6 S C^2 9 H W N`` flops per
gradient (a convolution, a transposed convolution and a kernel gradient of
``2 S C^2 9 H W`` flops each per layer; opening, classifier and elementwise work not
counted), also as a share of the machine's FP64 peak (``bench_gradient.peak_assumption``:
threads x nominal GHz x flops per cycle). A JSON record (machine, settings, every
sample) goes to ``benchmarks/out/conv_<timestamp>.json`` and a figure (the PyTorch /
Numba time ratio and the Numba GFLOP/s of every cell) next to it as ``.png``, unless
``--no-json``.

Usage::

    python benchmarks/bench_conv.py                 # channels 4, 8; batch 64; depth 8
    python benchmarks/bench_conv.py --channels 4 8 16 --batches 64 256 --depths 8 32
    python benchmarks/bench_conv.py --targets numpy cpu   # the NumPy reference too

Needs torch (the ``bench`` extra).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import time
from pathlib import Path

import _machine  # benchmarks/_machine.py
import numba
import numpy as np
from bench_gradient import machine_info, peak_assumption  # also sets OPENBLAS_THREAD_TIMEOUT

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


def gradient_flops(C: int, S: int, N: int, image_shape: tuple[int, int, int]) -> float:
    """Flops of the residual layers' convolutions in one gradient (module doc)."""
    return 6.0 * S * C * C * 9 * image_shape[1] * image_shape[2] * N


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--batches", type=int, nargs="+", default=[64])
    parser.add_argument("--depths", type=int, nargs="+", default=[8])
    parser.add_argument("--targets", nargs="+", choices=["numpy", "cpu"], default=["cpu"])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=numba.config.NUMBA_NUM_THREADS)
    parser.add_argument("--flops-per-cycle", type=float, default=None)
    parser.add_argument("--ghz", type=float, default=None, help="nominal clock (default: cpuinfo)")
    parser.add_argument("--no-json", action="store_true")
    args = parser.parse_args()
    started = time.perf_counter()

    import torch

    numba.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    cpu_info = _machine.cpuinfo()
    ghz = args.ghz or (float(cpu_info["cpu MHz"]) / 1000.0 if "cpu MHz" in cpu_info else 1.0)
    fpc, why = peak_assumption(cpu_info, args.flops_per_cycle)
    peak = args.threads * ghz * fpc
    print(f"Peak: {args.threads} threads x {ghz:.2f} GHz x {fpc:g} DP flop/cycle = "
          f"{peak:.1f} GFLOP/s ({why})")

    rows = []
    for C in args.channels:
        for S in args.batches:
            for N in args.depths:
                net, p, X, y = problem(C, N, S)
                J, ref = torch_gradient(net, p, X, y)
                worst = 0.0
                for target in args.targets:
                    loss, g = ptoc.loss_and_grad(net, p, X, y, target=target)
                    worst = max(worst, abs(loss - J) / abs(J), *(
                        float(np.max(np.abs(g[k] - ref[k])) / max(np.max(np.abs(ref[k])),
                                                                   1e-300)) for k in ref))
                if not worst <= 1e-9:
                    raise SystemExit(f"C={C} S={S} N={N}: ptoc and PyTorch differ by {worst:.1e} "
                                     "(relative), more than 1e-9")
                times: dict[str, list[float]] = {t: [] for t in (*args.targets, "torch")}
                for _ in range(args.repeat):  # interleaved
                    for name in times:
                        start = time.perf_counter()
                        if name == "torch":
                            torch_gradient(net, p, X, y)
                        else:
                            ptoc.loss_and_grad(net, p, X, y, target=name)
                        times[name].append(time.perf_counter() - start)
                med = {k: float(np.median(v)) for k, v in times.items()}
                gflops = {k: gradient_flops(C, S, N, net.image_shape) / v / 1e9
                          for k, v in med.items()}
                rows.append({"channels": C, "batch": S, "depth": N, "max_rel_diff": worst,
                             "samples_s": times,
                             **{f"{k}_ms": 1e3 * v for k, v in med.items()},
                             **{f"{k}_gflops": v for k, v in gflops.items()},
                             "torch_over_cpu": med["torch"] / med["cpu"] if "cpu" in med
                             else None})
                cells = "  ".join(f"{k} {1e3 * v:8.1f} ms {gflops[k]:6.2f} GF/s "
                                  f"({100 * gflops[k] / peak:4.1f}%)" for k, v in med.items())
                ratio = (f"  torch/cpu {med['torch'] / med['cpu']:5.2f}x" if "cpu" in med
                         else "")
                print(f"C={C:3d} S={S:4d} N={N:3d}: {cells}{ratio}  max rel diff {worst:.1e}",
                      flush=True)
    elapsed = time.perf_counter() - started
    if not args.no_json:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        path = Path(__file__).parent / "out" / f"conv_{stamp}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {"benchmark": "ConvResNet serial gradient against PyTorch CPU autograd",
                  "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
                  "date": _dt.datetime.now().isoformat(timespec="seconds"),
                  "machine": machine_info(args.threads), "image_shape": [1, 28, 28],
                  "activation": "tanh", "dtype": "float64",
                  "flop_count": "6*S*C*C*9*H*W*N (conv, transposed conv and kernel gradient "
                                "per layer)",
                  "settings": {"repeat": args.repeat, "statistic": "median",
                               "interleaved": True, "threads": args.threads},
                  "targets": args.targets,
                  "peak": {"gflops": peak, "ghz": ghz, "flops_per_cycle": fpc, "why": why},
                  "elapsed_s": elapsed, "rows": rows}
        path.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {path}")
        if plot(rows, peak, path.with_suffix(".png")):
            print(f"wrote {path.with_suffix('.png')}")


def plot(rows: list[dict], peak: float, png: Path) -> bool:
    """Two panels: PyTorch / Numba time ratio and Numba GFLOP/s (share of the peak), one
    bar per cell. False when matplotlib is missing or there is no ``cpu`` column."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in rows if r.get("torch_over_cpu") is not None]
    if not rows:
        return False
    labels = [f"C={r['channels']}\nS={r['batch']}\nN={r['depth']}" for r in rows]
    fig, (a, b) = plt.subplots(2, 1, figsize=(max(6.0, 0.7 * len(rows) + 2), 6), sharex=True)
    x = np.arange(len(rows))
    a.bar(x, [r["torch_over_cpu"] for r in rows], color="tab:blue")
    a.axhline(1.0, color="k", lw=0.8)
    a.axhline(2.0, color="tab:red", lw=0.8, ls="--")
    a.set_ylabel("PyTorch / Numba time")
    a.set_title("ConvResNet serial gradient, 28x28, float64 (above 1: ptoc faster)")
    b.bar(x, [r["cpu_gflops"] for r in rows], color="tab:green")
    b.set_ylabel("Numba GFLOP/s")
    sec = b.secondary_yaxis("right", functions=(lambda v: 100 * v / peak,
                                                lambda p: p * peak / 100))
    sec.set_ylabel("% of FP64 peak")
    b.set_xticks(x, labels, fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return True


if __name__ == "__main__":
    main()
