"""ptoc: parallel-in-time optimal control of residual neural networks.

A residual network is a forward-Euler discretisation of a controlled ODE; training
it is a discrete optimal-control problem. ptoc implements the network
(:class:`ResNet`), its exact discrete adjoint (:func:`loss_and_grad`), the layer
Hamiltonian of the maximum principle (:func:`hamiltonian`), per-layer kernels on
three targets (:mod:`ptoc.kernels`: NumPy, Numba CPU, Numba CUDA), and the
propagator contract that layer-parallel solvers use (:class:`Propagator`,
:func:`check_propagator`). The mathematics is derived in the theory pages
(:doc:`/theory/index`), and the layers of the package, its one sign convention and
where each equation is implemented are in :doc:`/architecture`; every docstring names
the equation it implements.

Quick example
-------------
>>> import ptoc
>>> data = ptoc.data.peaks(n_per_class=20, n_val_per_class=5)
>>> net = ptoc.ResNet(width=8, depth=16, T=1.0, activation="tanh", n_in=2, n_classes=5)
>>> params = net.init_params(seed=0)
>>> loss, grads = ptoc.loss_and_grad(net, params, data.X_train, data.y_train)
>>> grads["K"].shape
(16, 8, 8)
"""

from . import (
    conv,
    data,
    discrete,
    io,
    kernels,
    layered,
    methods,
    msa,
    node,
    optim,
    parallel,
    pgcl,
    plotting,
    simultaneous,
    training,
)
from ._memory import keep_freed_memory
from ._version import __version__ as __version__
from .activations import Activation
from .conv import ConvResNet, ConvResNetPropagator
from .hamiltonian import hamiltonian, hamiltonian_grad
from .io import load_model, save_model
from .kernels import Target
from .layered import LayeredNetwork
from .methods import GradientMethod, TrainingMethod
from .model import PARAM_KEYS, LayerInit, Opening, Params, ResNet
from .msa import EMSA, MSA, DiscreteMSA
from .node import NeuralODEGradient, NODEParareal
from .optim import LBFGS, OPTIMISERS, SGD, Adam
from .parallel import (
    MGRIT,
    CoarseWeights,
    Cycle,
    DivergenceError,
    MPIRanks,
    Parareal,
    Relaxation,
    Serial,
    SimulatedRanks,
    SolveResult,
)
from .pgcl import PGCL
from .propagator import (
    Check,
    Propagator,
    PropagatorReport,
    ResNetPropagator,
    check_propagator,
)
from .simultaneous import SimultaneousGradient
from .sweeps import (
    AdjointResult,
    ForwardResult,
    accuracy,
    adjoint,
    forward,
    loss,
    loss_and_grad,
    predict,
    predict_logits,
)
from .training import History, TrainResult, train

__all__ = [
    "keep_freed_memory",
    "ConvResNet",
    "ConvResNetPropagator",
    "conv",
    "EMSA",
    "MSA",
    "PGCL",
    "DiscreteMSA",
    "GradientMethod",
    "NeuralODEGradient",
    "NODEParareal",
    "SimultaneousGradient",
    "TrainingMethod",
    "discrete",
    "layered",
    "LayeredNetwork",
    "methods",
    "msa",
    "node",
    "pgcl",
    "simultaneous",
    "MGRIT",
    "CoarseWeights",
    "Cycle",
    "DivergenceError",
    "MPIRanks",
    "Parareal",
    "Relaxation",
    "Serial",
    "SimulatedRanks",
    "SolveResult",
    "parallel",
    "LBFGS",
    "OPTIMISERS",
    "SGD",
    "Activation",
    "Adam",
    "History",
    "TrainResult",
    "io",
    "load_model",
    "optim",
    "plotting",
    "save_model",
    "train",
    "training",
    "AdjointResult",
    "Check",
    "ForwardResult",
    "LayerInit",
    "Opening",
    "PARAM_KEYS",
    "Params",
    "Propagator",
    "PropagatorReport",
    "ResNet",
    "ResNetPropagator",
    "Target",
    "accuracy",
    "adjoint",
    "check_propagator",
    "data",
    "forward",
    "hamiltonian",
    "hamiltonian_grad",
    "kernels",
    "loss",
    "loss_and_grad",
    "predict",
    "predict_logits",
]
