"""Shared by the claim scripts (not a claim: ``ptoc validate`` skips ``_*.py``).

A random small network with its batch, and its serial sweeps: the reference the
layer-parallel claims compare against; and :func:`benchmark`, which loads a script of
``benchmarks/`` so a claim can reuse the problem and peer code written there once.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np

import ptoc
from ptoc.methods import GradientFunction


def random_problem(act, depth, seed, width=4, S=6, T=1.0):
    """A ResNet with all regularisers on, scale-1.5 weights, random biases, S samples."""
    rng = np.random.default_rng(seed)
    net = ptoc.ResNet(width=width, depth=depth, T=T, activation=act, n_in=3, n_classes=3,
                      gamma=1e-2, gamma_t=1e-2, gamma_c=1e-2)
    params = net.init_params(rng, scale=1.5)
    params.b[...] = rng.standard_normal(params.b.shape)
    X = rng.standard_normal((S, 3))
    y = rng.integers(0, 3, S)
    return net, params, X, y


def serial_sweeps(net, params, X, y):
    """``(forward result, lambda_N, adjoint result with all adjoints)`` of the serial sweeps."""
    fwd = ptoc.forward(net, params, X)
    _, lam_N, _, _ = ptoc.objective.classifier_loss(params, fwd.final_state, y)
    adj = ptoc.adjoint(net, params, fwd, lam_N, keep_adjoints=True)
    return fwd, lam_N, adj


BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@functools.cache
def benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` as a module, loaded once (its ``main`` is not run)."""
    if str(BENCHMARKS) not in sys.path:  # the scripts share benchmarks/_machine.py
        sys.path.insert(0, str(BENCHMARKS))
    path = BENCHMARKS / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"ptoc_benchmark_{name}", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class CountingExactGradient(GradientFunction):
    """The exact serial gradient of ``net`` as a training method's gradient function,
    counting the gradient and the objective-only evaluations (what a step of the
    simultaneous claims is compared with)."""

    deterministic = True

    def __init__(self, net):
        self.net, self.gradients, self.values = net, 0, 0

    def __call__(self, params, X, y):
        self.gradients += 1
        return ptoc.loss_and_grad(self.net, params, X, y)

    def value(self, params, X, y):
        self.values += 1
        return ptoc.loss(self.net, params, X, y)
