#!/usr/bin/env python
"""Time the serial gradient (forward + backward sweep): NumPy, Numba CPU and PyTorch CPU.

What is timed, per cell (width d, batch S, depth N), activation tanh, float64:

* ``--level api`` (the default): ``ptoc.loss_and_grad(network, params, X, labels,
  target=...)`` for the targets ``numpy`` and ``cpu`` (dense opening layer, N residual
  layers, softmax cross-entropy classifier; regularisers switched off), against the
  same network in PyTorch autograd: ``x = tanh(X K_in^T + b_in)``, then per layer
  ``x = x + h tanh(x K_n^T + b_n)`` (``torch.nn.functional.linear``, one leaf tensor
  per layer as in an ``nn.ModuleList``), ``loss = cross_entropy(x W^T + mu, labels)``,
  ``loss.backward()``.
* ``--level kernels``: the kernel sweeps alone, ``forward_sweep`` (storing sigma') then
  ``adjoint_sweep`` from a given ``lambda_N``, of ``ptoc.kernels.reference`` and
  ``ptoc.kernels.cpu`` (buffers allocated once per cell), against PyTorch: the residual
  layers from ``x_0 = X``, then ``x_N.backward(lambda_N)``.

Every implementation runs once per cell untimed first (warm-up; this also compiles
the Numba kernels), and its gradient is compared with PyTorch's (the maximum relative
difference over all parameter arrays is printed, and the script stops if it exceeds
1e-8, so it cannot time wrong maths). Then the implementations are timed in
interleaved rounds until each has ``--min-repeats`` samples and its share of
``--budget`` seconds is spent (at most ``--max-repeats``; a cell whose single call
takes longer than its share gets fewer repeats, at least one). Reported: the median.

Flop count: ``6 S d^2 N`` (2 S d^2 per matrix product: one product per layer in the
forward sweep, two in the backward sweep with sigma' stored); the opening layer, the
classifier and all elementwise work are not counted. The peak is
``threads x nominal GHz x DP flops per cycle per core``; the flops per cycle are
inferred from the CPU flags and printed with the assumption (override with
``--flops-per-cycle``).

Usage::

    python benchmarks/bench_gradient.py            # full grid, about 10 minutes
    python benchmarks/bench_gradient.py --quick    # a few cells, about a minute
    python benchmarks/bench_gradient.py --level kernels --threads 1 --small  # MGRIT's shapes
    python benchmarks/bench_gradient.py --widths 8 64 --batches 256 --depths 64

A JSON record (machine, versions, settings, every sample) goes to
``benchmarks/out/gradient_<timestamp>.json`` unless ``--no-json``.
"""

from __future__ import annotations

import os

# NumPy's OpenBLAS threads busy-wait for 2^28 cycles (about 0.1 s) after each call,
# which halves the speed of whatever is timed next on the same cores (measured: Numba
# 7 -> 15 ms, torch 18 -> 39 ms right after a NumPy call). Interleaved timing needs
# them to sleep at once; this must be set before NumPy is imported (a value set by
# the user wins).
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

import argparse  # noqa: E402
import datetime as _dt  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import _machine  # noqa: E402 - benchmarks/_machine.py
import numpy as np  # noqa: E402

import ptoc  # noqa: E402
from ptoc import kernels  # noqa: E402
from ptoc.activations import Activation  # noqa: E402

try:
    import torch
    import torch.nn.functional as F  # noqa: N812
except ImportError:  # the torch column is skipped with a note
    torch = None

#: What the ptoc columns time: "api" (ptoc.loss_and_grad) or "kernels" (the sweeps).
LEVEL = "api"

WIDTHS = (4, 8, 16, 32, 64)
BATCHES = (64, 256, 1024)
DEPTHS = (64, 256, 1024)
QUICK = {"widths": (8, 16, 64), "batches": (256,), "depths": (64,)}
#: The shapes of layer-parallel work (MGRIT steps a few samples through narrow layers).
SMALL = {"widths": (4, 8, 16), "batches": (16, 32, 64), "depths": (256,)}
N_IN, N_CLASSES, T_FINAL = 2, 5, 1.0
ACTIVATION = Activation.TANH
MAX_REL_DIFF = 1e-8
RESULTS = Path(__file__).resolve().parent / "out"


# --- the machine ------------------------------------------------------------------------------

def peak_assumption(cpu: dict, override: float | None) -> tuple[float, str]:
    """Double-precision flops per cycle and per core, and the reason given for it."""
    if override is not None:
        return override, "given with --flops-per-cycle"
    flags = set(cpu.get("flags", "").split())
    amd = cpu.get("vendor_id") == "AuthenticAMD"
    family = int(cpu.get("cpu family", "0") or 0)
    if "avx512f" in flags and amd and family == 25:
        return 16.0, ("AVX-512 on AMD family 25 (Zen 4): 512-bit instructions on two "
                      "256-bit FMA pipes = 2 x 4 doubles x 2 flops")
    if "avx512f" in flags:
        return 32.0, ("AVX-512 with two 512-bit FMA pipes per core (AMD family 26 / Zen 5, "
                      "Intel server cores) = 2 x 8 doubles x 2 flops")
    if "fma" in flags and "avx2" in flags:
        return 16.0, "AVX2 with two 256-bit FMA pipes = 2 x 4 doubles x 2 flops"
    return 4.0, "no FMA/AVX2 flags found: 2 x 2 doubles per cycle (SSE2) assumed"


def machine_info(threads: int) -> dict:

    cpu = _machine.cpuinfo()
    info = _machine.machine_info()
    info.update(
        cpu_vendor=cpu.get("vendor_id"), cpu_family=cpu.get("cpu family"),
        simd=sorted(f for f in ("avx2", "fma", "avx512f", "avx512dq")
                    if f in cpu.get("flags", "").split()),
        numba_threading_layer=None, torch=torch.__version__ if torch is not None else None,
        threads=threads, OPENBLAS_THREAD_TIMEOUT=os.environ.get("OPENBLAS_THREAD_TIMEOUT"),
    )
    try:
        from threadpoolctl import threadpool_info

        info["numpy_blas"] = [{k: p.get(k) for k in ("internal_api", "version", "num_threads")}
                              for p in threadpool_info()]
    except ImportError:
        info["numpy_blas"] = None
    return info


# --- problems: what one call computes -------------------------------------------------------

def _rel(a: np.ndarray, b: np.ndarray) -> float:
    scale = float(np.max(np.abs(b))) if b.size else 0.0
    return float(np.max(np.abs(a - b))) / scale if scale else float(np.max(np.abs(a)))


def max_rel_diff(grads: dict, ref: dict) -> float:
    return max(_rel(np.asarray(grads[k]), np.asarray(ref[k])) for k in ref)


class ApiProblem:
    """``ptoc.loss_and_grad`` on a ResNet with a dense opening layer and a classifier."""

    level = "api"

    def __init__(self, d: int, S: int, N: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.net = ptoc.ResNet(width=d, depth=N, T=T_FINAL, activation=ACTIVATION.value,
                               n_in=N_IN, n_classes=N_CLASSES, opening="dense",
                               gamma=0.0, gamma_t=0.0, gamma_c=0.0)
        params = self.net.init_params(seed=seed)
        params.b[...] = 0.1 * rng.standard_normal(params.b.shape)
        self.params = params.to_dict()
        self.X = rng.standard_normal((S, N_IN))
        self.labels = rng.integers(0, N_CLASSES, S)

    def ptoc_runner(self, target: str):
        net, params, X, labels = self.net, self.params, self.X, self.labels

        def run():
            return ptoc.loss_and_grad(net, params, X, labels, target=target)[1]

        return run

    def torch_runner(self):
        p = self.params
        N, h = self.net.depth, self.net.h
        leaf = {k: torch.tensor(p[k], requires_grad=True) for k in ("K_in", "b_in", "W", "mu")}
        Ks = [torch.tensor(p["K"][n], requires_grad=True) for n in range(N)]
        bs = [torch.tensor(p["b"][n], requires_grad=True) for n in range(N)]
        X = torch.tensor(self.X)
        labels = torch.tensor(self.labels)
        every = list(leaf.values()) + Ks + bs

        def run():
            for t in every:
                t.grad = None
            x = torch.tanh(F.linear(X, leaf["K_in"], leaf["b_in"]))
            for n in range(N):
                x = x + h * torch.tanh(F.linear(x, Ks[n], bs[n]))
            loss = F.cross_entropy(F.linear(x, leaf["W"], leaf["mu"]), labels)
            loss.backward()
            return {"K": Ks, "b": bs} | {k: t.grad for k, t in leaf.items()}

        return run

    @staticmethod
    def gradients(result) -> dict:
        """Plain NumPy arrays keyed like the parameters, from either kind of result."""
        out = {}
        for k, v in result.items():
            if isinstance(v, list):  # torch: one leaf tensor per layer
                v = np.stack([t.grad.numpy() for t in v])
            elif torch is not None and isinstance(v, torch.Tensor):
                v = v.numpy()
            out[k] = np.asarray(v)
        return out


class KernelProblem:
    """``forward_sweep`` (storing sigma') + ``adjoint_sweep`` of one kernel target."""

    level = "kernels"

    def __init__(self, d: int, S: int, N: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.h = T_FINAL / N
        self.X = rng.standard_normal((S, d))
        self.K = rng.standard_normal((N, d, d)) / np.sqrt(d)
        self.b = 0.1 * rng.standard_normal((N, d))
        self.lam = rng.standard_normal((S, d))

    def ptoc_runner(self, target: str):
        kern = kernels.backend(target)
        N, (S, d) = self.K.shape[0], self.X.shape
        states = np.empty((N + 1, S, d))
        dsig = np.empty((N, S, d))
        gK, gb = np.empty_like(self.K), np.empty_like(self.b)
        act, chunk = ACTIVATION.code, ptoc._config.CHUNK

        def run():
            states[0] = self.X
            gK[...] = 0.0
            gb[...] = 0.0
            kern.forward_sweep(states, self.K, self.b, self.h, act, dsig, chunk)
            kern.adjoint_sweep(states, self.lam, self.K, self.b, self.h, act, dsig, gK, gb,
                               None, chunk)
            return {"K": gK, "b": gb}

        return run

    def torch_runner(self):
        N, h = self.K.shape[0], self.h
        Ks = [torch.tensor(self.K[n], requires_grad=True) for n in range(N)]
        bs = [torch.tensor(self.b[n], requires_grad=True) for n in range(N)]
        X, lam = torch.tensor(self.X), torch.tensor(self.lam)

        def run():
            for t in Ks + bs:
                t.grad = None
            x = X
            for n in range(N):
                x = x + h * torch.tanh(F.linear(x, Ks[n], bs[n]))
            x.backward(lam)
            return {"K": Ks, "b": bs}

        return run

    gradients = staticmethod(ApiProblem.gradients)


PROBLEMS = {"api": ApiProblem, "kernels": KernelProblem}


# --- timing ---------------------------------------------------------------------------------

def time_cell(runners: dict, budget: float, min_repeats: int, max_repeats: int) -> dict:
    """Interleaved timing of warmed-up runners; returns the samples (seconds) of each."""
    share = budget / len(runners)
    samples = {name: [] for name in runners}
    spent = dict.fromkeys(runners, 0.0)
    first = {}
    order = list(runners)
    gc.collect()
    gc.disable()
    try:
        while True:
            active = []
            for name in order:
                n = len(samples[name])
                # a slow cell gets fewer repeats: as many as fit in its share, at least one
                wanted = min_repeats if name not in first else max(
                    1, min(min_repeats, int(share / max(first[name], 1e-9))))
                if n < max_repeats and (n < wanted or spent[name] < share):
                    active.append(name)
            if not active:
                break
            for name in active:
                t0 = time.perf_counter()
                runners[name]()
                dt = time.perf_counter() - t0
                samples[name].append(dt)
                spent[name] += dt
                first.setdefault(name, dt)
            order = order[1:] + order[:1]  # rotate, so no runner always goes first
    finally:
        gc.enable()
    return samples


def run_cell(Problem, d: int, S: int, N: int, targets: list[str], args) -> dict:
    problem = Problem(d, S, N, seed=args.seed)
    runners = {t: problem.ptoc_runner(t) for t in targets if t != "torch"}
    if "torch" in targets:
        runners["torch"] = problem.torch_runner()
    # warm-up (compiles the Numba kernels on the first cell) and the maths check
    grads = {name: problem.gradients(run()) for name, run in runners.items()}
    ref_name = "torch" if "torch" in grads else "numpy" if "numpy" in grads else None
    diffs = {}
    if ref_name is not None:
        for name, g in grads.items():
            if name != ref_name:
                diffs[name] = max_rel_diff(g, grads[ref_name])
                if not diffs[name] <= MAX_REL_DIFF:
                    sys.exit(f"d={d} S={S} N={N}: {name} and {ref_name} gradients differ by "
                             f"{diffs[name]:.2e} (relative) > {MAX_REL_DIFF:g}; not timing "
                             "wrong maths")
    del grads
    samples = time_cell(runners, args.budget, args.min_repeats, args.max_repeats)
    flops = 6.0 * S * d * d * N
    cell = {"d": d, "S": S, "N": N, "flops": flops, "reference_for_diff": ref_name,
            "max_rel_diff": diffs, "median_s": {}, "samples_s": samples, "gflops": {}}
    for name, ts in samples.items():
        cell["median_s"][name] = float(np.median(ts))
        cell["gflops"][name] = flops / cell["median_s"][name] / 1e9
    med = cell["median_s"]
    if "cpu" in med:
        cell["speedup_cpu_vs_torch"] = med["torch"] / med["cpu"] if "torch" in med else None
        cell["speedup_cpu_vs_numpy"] = med["numpy"] / med["cpu"] if "numpy" in med else None
    return cell


# --- output ---------------------------------------------------------------------------------

def _fmt_ms(t: float | None) -> str:
    return "-" if t is None else f"{t * 1e3:.3g}" if t < 0.1 else f"{t * 1e3:.0f}"


def table(cells: list[dict], peak: float) -> str:
    """Markdown table; speed-ups are time ratios (above 1: Numba is faster)."""
    head = ["d", "S", "N", "NumPy ms", "Numba ms", "torch ms", "torch/Numba", "NumPy/Numba",
            "Numba GFLOP/s", "% of peak", "torch GFLOP/s", "max rel diff"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in cells:
        med, gf = c["median_s"], c["gflops"]
        vt, vn = c.get("speedup_cpu_vs_torch"), c.get("speedup_cpu_vs_numpy")
        diff = max(c["max_rel_diff"].values()) if c["max_rel_diff"] else None
        row = [str(c["d"]), str(c["S"]), str(c["N"]), _fmt_ms(med.get("numpy")),
               _fmt_ms(med.get("cpu")), _fmt_ms(med.get("torch")),
               "-" if vt is None else f"{vt:.2f}x", "-" if vn is None else f"{vn:.1f}x",
               f"{gf['cpu']:.1f}", f"{100 * gf['cpu'] / peak:.0f}%",
               "-" if "torch" not in gf else f"{gf['torch']:.1f}",
               "-" if diff is None else f"{diff:.1e}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def targets_summary(cells: list[dict]) -> list[str]:
    """The issue's targets: Numba >= 2x torch for d <= 16, >= 1x for d = 64."""
    out = []
    for label, widths, goal in (("d <= 16", (4, 8, 16), 2.0), ("d = 64", (64,), 1.0)):
        ratios = [c["speedup_cpu_vs_torch"] for c in cells
                  if c["d"] in widths and c.get("speedup_cpu_vs_torch") is not None]
        if ratios:
            worst = min(ratios)
            out.append(f"target Numba >= {goal:g}x torch for {label}: worst cell {worst:.2f}x "
                       f"({'met' if worst >= goal else 'NOT met'}, {len(ratios)} cells)")
    return out


def main(argv=None) -> int:
    import numba

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    presets = parser.add_mutually_exclusive_group()
    presets.add_argument("--quick", action="store_true", help="widths 8 16 64, S=256, N=64")
    presets.add_argument("--small", action="store_true",
                         help="the small shapes of MGRIT work: widths 4 8 16, S=16 32 64, N=256")
    parser.add_argument("--widths", type=int, nargs="+")
    parser.add_argument("--batches", type=int, nargs="+")
    parser.add_argument("--depths", type=int, nargs="+")
    parser.add_argument("--level", choices=sorted(PROBLEMS), default=LEVEL)
    parser.add_argument("--targets", nargs="+", default=["numpy", "cpu", "torch"],
                        choices=["numpy", "cpu", "torch"])
    parser.add_argument("--threads", type=int, default=numba.config.NUMBA_NUM_THREADS,
                        help="threads for Numba, torch and NumPy's BLAS (default: all)")
    parser.add_argument("--budget", type=float, default=10.0,
                        help="timing seconds per cell, shared by the implementations")
    parser.add_argument("--min-repeats", type=int, default=5)
    parser.add_argument("--max-repeats", type=int, default=50)
    parser.add_argument("--flops-per-cycle", type=float, default=None)
    parser.add_argument("--ghz", type=float, default=None, help="nominal clock (default: cpuinfo)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--no-json", action="store_true")
    args = parser.parse_args(argv)

    grid = (QUICK if args.quick else SMALL if args.small
            else {"widths": WIDTHS, "batches": BATCHES, "depths": DEPTHS})
    widths = args.widths or grid["widths"]
    batches = args.batches or grid["batches"]
    depths = args.depths or grid["depths"]
    targets = list(dict.fromkeys(args.targets))
    if "cpu" not in targets:
        parser.error("--targets must include cpu (the ratios are Numba's)")
    notes = []
    if "torch" in targets and torch is None:
        targets.remove("torch")
        notes.append("PyTorch is not installed: the torch column is skipped "
                     "(pip install 'ptoc[bench]').")

    numba.set_num_threads(args.threads)
    if torch is not None:
        torch.set_num_threads(args.threads)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(args.threads)
    except ImportError:
        notes.append("threadpoolctl is not installed: NumPy's BLAS uses its default threads.")

    info = machine_info(args.threads)
    cpu = _machine.cpuinfo()
    ghz = args.ghz or (info["cpu_mhz"] / 1000.0 if info["cpu_mhz"] else 1.0)
    fpc, why = peak_assumption(cpu, args.flops_per_cycle)
    peak = args.threads * ghz * fpc
    Problem = PROBLEMS[args.level]

    print(f"# Serial gradient (forward + backward), tanh, float64, level '{args.level}'")
    print(f"CPU: {info['cpu_model']} ({info['logical_cpus']} logical CPUs), threads: "
          f"{args.threads}; numpy {info['numpy']}, numba {info['numba']}, "
          f"torch {info['torch']}")
    print(f"Peak: {args.threads} threads x {ghz:.2f} GHz x {fpc:g} DP flop/cycle = "
          f"{peak:.1f} GFLOP/s (assumed: {why}; nominal clock, turbo not counted)")
    print("Flops counted: 6 S d^2 N (2 S d^2 per product: 1 forward, 2 backward per layer)")
    for note in notes:
        print("Note:", note)
    print(flush=True)

    cells = []
    t_start = time.perf_counter()
    for d in widths:
        for S in batches:
            for N in depths:
                cell = run_cell(Problem, d, S, N, targets, args)
                cells.append(cell)
                med = cell["median_s"]
                print(f"d={d:3d} S={S:5d} N={N:5d}: "
                      + "  ".join(f"{k} {_fmt_ms(v)} ms" for k, v in med.items())
                      + (f"  torch/Numba {cell['speedup_cpu_vs_torch']:.2f}x"
                         if cell.get("speedup_cpu_vs_torch") else ""), flush=True)
    elapsed = time.perf_counter() - t_start
    info["numba_threading_layer"] = numba.threading_layer()  # known once a kernel has run

    print()
    print(table(cells, peak))
    print()
    for line in targets_summary(cells):
        print(line)
    print(f"({len(cells)} cells in {elapsed / 60:.1f} min; medians over interleaved repeats, "
          "warm-up and JIT compilation excluded)")

    if not args.no_json:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        path = args.output or RESULTS / f"gradient_{stamp}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "benchmark": "serial gradient, forward + backward",
            "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None
                                                           else sys.argv[1:])),
            "date": _dt.datetime.now().isoformat(timespec="seconds"),
            "level": args.level, "activation": ACTIVATION.value, "dtype": "float64",
            "chunk": ptoc._config.CHUNK, "machine": info,
            "peak": {"gflops": peak, "threads": args.threads, "ghz": ghz,
                     "flops_per_cycle": fpc, "assumption": why},
            "flop_count": "6*S*d*d*N (2*S*d*d per product; 1 forward + 2 backward per layer)",
            "settings": {"budget_s": args.budget, "min_repeats": args.min_repeats,
                         "max_repeats": args.max_repeats, "seed": args.seed,
                         "statistic": "median"},
            "notes": notes, "elapsed_s": elapsed, "cells": cells,
            "targets": targets_summary(cells),
        }
        path.write_text(json.dumps(record, indent=1) + "\n")
        print(f"JSON record: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
