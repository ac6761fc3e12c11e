#!/usr/bin/env python
"""Split one layer step of the Numba CPU kernels into its parts, at small shapes.

For width d and batch S (default d = 16, S = 32, float64, tanh) this times, on one
thread, the tile loops of :mod:`ptoc.kernels.cpu` that one forward layer step and
one adjoint layer step of a sweep run, each part repeated in a compiled loop over
``--reps`` calls (no Python between the calls), per work item of ``W`` samples as
the serial sweep splits the batch:

* ``product``: the pre-activation ``a = K x + b`` (``_preact_t``);
* ``activation``: ``x <- x + h tanh(a)``, ``a <- tanh'(a)`` (``_activate_t``, the step
  of a sweep that stores ``sigma'``);
* ``activation, value``: ``x <- x + h tanh(a)`` alone (``_activate_value_t``, the step
  of the forward solves of MGRIT and parareal and of a sweep that stores nothing);
* ``transposes``: the two transposes out of a forward step (``x`` and ``sigma'``,
  ``_store_t``) and one transpose in (``_load_t``);
* ``forward step``: the three together, as ``_forward`` runs them;
* ``adjoint step``: ``g = sigma' * lam``, ``lam += h K^T g`` and the chunk's gradient
  partial (``_adjoint_g_t``, ``_adjoint_lam_t``, ``_partial_t``) with one transpose in;
* at widths 8 and 16 with a batch of whole vectors, where a one-thread forward sweep and
  the state level kernels skip the tiles: ``rows product`` (``_preact_rows``, with the
  transpose of ``K``) and ``rows activation, value`` (``_activate_rows_value_t`` over the
  batch's entries, ``x_out = x_in + h tanh(a)``).

Reported: nanoseconds per call for the whole batch (all work items), the median of
``--rounds`` rounds, and the product's GFLOP/s (``2 S d^2`` flops). These are the
numbers behind the kernel sweeps of ``bench_gradient.py --level kernels``; the
machine's other load moves them, so compare runs made back to back.

Usage::

    python benchmarks/profile_layer_step.py                  # d = 16, S = 32
    python benchmarks/profile_layer_step.py --widths 4 8 16 --batches 16 32 64
"""

from __future__ import annotations

import argparse
import time

import numba
import numpy as np
from numba import njit

import ptoc
from ptoc.kernels import cpu

TANH = ptoc.Activation.TANH.code


@njit
def _loop_product(K, b, x, a, m, reps):
    for _ in range(reps):
        cpu._preact_t(K, b, x, a, m)


@njit
def _loop_activation(a0, a, x, h, m, reps):
    for _ in range(reps):
        a[:, :] = a0  # sigma' overwrites a: restore the pre-activation (a copy; timed apart)
        cpu._activate_t(a, x, h, TANH, m)


@njit
def _loop_activation_value(a, x, h, m, reps):
    for _ in range(reps):
        cpu._activate_value_t(a, x, h, TANH, m)


@njit
def _loop_copy(a0, a, reps):
    for _ in range(reps):
        a[:, :] = a0


@njit
def _loop_transposes(x, a, rows, lo, m, reps):
    for _ in range(reps):
        cpu._store_t(x, rows, lo, m)
        cpu._store_t(a, rows, lo, m)
        cpu._load_t(rows, lo, m, x)


@njit
def _loop_forward(K, b, x, a, h, rows, dsig, lo, m, reps):
    for _ in range(reps):
        cpu._preact_t(K, b, x, a, m)
        cpu._activate_t(a, x, h, TANH, m)
        cpu._store_t(x, rows, lo, m)
        cpu._store_t(a, dsig, lo, m)
        cpu._load_t(rows, lo, m, x)  # keep the state bounded: start again from the rows


@njit
def _loop_adjoint(K, b, h, x, lam, g, pK, pb, rows, lo, m, chunk, reps):
    for _ in range(reps):
        cpu._load_t(rows, lo, m, x)
        cpu._adjoint_g_t(K, b, TANH, x, lam, g, m)
        cpu._adjoint_lam_t(K.T, h, g, lam, m)
        for t0 in range(0, m, chunk):
            cpu._partial_t(g, rows, lo, h, pK, pb, t0, min(m, t0 + chunk))


@njit
def _loop_rows_product(K, b, rows, KT, a, S, reps):
    for _ in range(reps):
        cpu._preact_rows(K, b, rows, KT, a, S)


@njit
def _loop_rows_activation_value(a, xin, xout, h, reps):
    for _ in range(reps):
        cpu._activate_rows_value_t(a, xin, xout, h, TANH)


def rows_apply(d: int, S: int) -> bool:
    """Whether the forward steps at this shape run on sample-major rows (one thread)."""
    return d in (8, 16) and S % 8 == 0


def _median_ns(fn, args, reps: int, rounds: int) -> float:
    fn(*args[:-1], 1)  # compile
    ts = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn(*args[:-1], reps)
        ts.append((time.perf_counter() - t0) / reps)
    return 1e9 * float(np.median(ts))


def measure(d: int, S: int, reps: int, rounds: int) -> dict[str, float]:
    """Nanoseconds per layer step for the whole batch, part by part."""
    chunk = ptoc._config.CHUNK
    W = cpu._state_width(S, chunk, 1)
    rng = np.random.default_rng(0)
    K = rng.standard_normal((d, d)) / np.sqrt(d)
    b = 0.1 * rng.standard_normal(d)
    h = 1.0 / 256
    rows = rng.standard_normal((S, d))
    dsig = np.empty_like(rows)
    L = cpu._row_len.py_func(W)
    x, a, a0, lam, g = (np.zeros((d, L)) for _ in range(5))
    pK, pb = np.empty((d, d)), np.empty(d)
    times: dict[str, float] = {}
    for lo in range(0, S, W):
        m = min(S, lo + W) - lo
        cpu._load_t(rows, lo, m, x)
        cpu._preact_t(K, b, x, a0, m)
        lam[:, :m] = rng.standard_normal((d, m))
        parts = {
            "product": (_loop_product, (K, b, x, a, m, reps)),
            "activation + copy": (_loop_activation, (a0, a, x, h, m, reps)),
            "copy": (_loop_copy, (a0, a, reps)),
            "activation, value": (_loop_activation_value, (a0, x, h, m, reps)),
            "transposes": (_loop_transposes, (x, a, rows, lo, m, reps)),
            "forward step": (_loop_forward, (K, b, x, a, h, rows, dsig, lo, m, reps)),
            "adjoint step": (_loop_adjoint, (K, b, h, x, lam, g, pK, pb, rows, lo, m,
                                             chunk, reps)),
        }
        for name, (fn, args) in parts.items():
            times[name] = times.get(name, 0.0) + _median_ns(fn, args, reps, rounds)
    times["activation"] = times.pop("activation + copy") - times.pop("copy")
    if rows_apply(d, S):
        a_rows = np.empty((S, d))
        K_T = np.empty((d, d))
        cpu._preact_rows(K, b, rows, K_T, a_rows, S)
        out = np.empty(S * d)
        times["rows product"] = _median_ns(_loop_rows_product, (K, b, rows, K_T, np.empty((S, d)),
                                                                S, reps), reps, rounds)
        times["rows activation, value"] = _median_ns(
            _loop_rows_activation_value, (a_rows.reshape(S * d), rows.reshape(S * d), out, h,
                                          reps), reps, rounds)
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[16])
    parser.add_argument("--batches", type=int, nargs="+", default=[32])
    parser.add_argument("--reps", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    numba.set_num_threads(1)
    names = ("product", "activation", "activation, value", "transposes", "forward step",
             "adjoint step", "rows product", "rows activation, value")
    print("ns per layer step (whole batch, one thread); product GFLOP/s = 2 S d^2 / time")
    print(f"{'d':>3s} {'S':>4s} " + " ".join(f"{n:>17s}" for n in names) + "  product GFLOP/s")
    for d in args.widths:
        for S in args.batches:
            t = measure(d, S, args.reps, args.rounds)
            print(f"{d:3d} {S:4d} " + " ".join(f"{t[n]:17.0f}" if n in t else f"{'-':>17s}"
                                                for n in names)
                  + f"  {2 * S * d * d / t['product']:.1f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
