"""Simultaneous layer-parallel training (Günther, Ruthotto, Schroder, Cyr & Gauger 2020).

Exact training solves the state sweep and the adjoint sweep to the end at every
optimisation step. Günther et al. ("simultaneous" or one-shot layer-parallel
training) observe that this is wasteful far from a minimum: each step may run only a
few MGRIT iterations for the states and a few for the adjoints, *warm-started from the
layer-space solution of the previous step*, and update the parameters with the
resulting inexact gradient. As the parameters settle, consecutive problems differ
less, the warm starts get better, and the inexact gradient approaches the exact one.

:class:`SimultaneousGradient` is that gradient as a ``grad_fn`` for
:func:`ptoc.training.train` (:doc:`/theory/simultaneous`)::

    grad = SimultaneousGradient(net, MGRIT(max_iterations=2), comm=4)
    result = train(net, params, data, optimizer=LBFGS(), batch_size=None, grad_fn=grad)
    grad.records[-1]  # residuals, iterations, critical-path steps of the last step

With ``LBFGS(value_only_trials=True)`` a step costs one such gradient and, per
line-search trial, one warm-started state sweep (:meth:`SimultaneousGradient.value`),
as in Günther et al.'s reference code; :func:`step_costs` sums the records per step.
:func:`guenther_peaks` is the reference's Peaks setup (``examples/peaks/peaks.cfg``).

Warm starts are kept for the batch of the previous call: a call on the same samples
(full-batch training, and the line-search evaluations of L-BFGS within one step)
starts MGRIT from the previous states and adjoints; a call on other samples starts
cold (MGRIT's zero initial guess), so simultaneous training is meant for full
batches, as in Günther et al.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from .kernels import Target
from .methods import GradientFunction
from .model import Params, ResNet
from .parallel.comm import is_root
from .parallel.driver import parallel_forward, parallel_gradient
from .parallel.mgrit import MGRIT
from .parallel.serial import Serial
from .propagator import Model, as_model
from .sweeps import loss_and_grad

__all__ = ["PeaksSetup", "SimultaneousGradient", "StepCost", "StepRecord", "guenther_peaks",
           "step_costs"]


@dataclass
class StepRecord:
    """What one inexact gradient cost and how good it was.

    One call of :class:`SimultaneousGradient` (Günther et al. 2020). Theory:
    :doc:`/theory/simultaneous`.

    Attributes
    ----------
    loss : float
        The loss at the (inexact) states.
    forward_residuals, adjoint_residuals : list of float
        MGRIT residual norms after each iteration of the two sweeps.
    warm : bool
        Whether MGRIT started from the previous call's solution.
    steps_critical_path : int
        Layer steps on the critical path of the two sweeps (what a machine with one
        rank per layer range waits for); the layer gradients, ``N/P`` more steps per
        rank after the adjoint sweep, are not included.
    steps_total : int
        Layer steps on all ranks together.
    grad_error : float or None
        ``||g - g_exact|| / ||g_exact||`` (all parameters as one vector) when the exact
        gradient was computed for this call (``exact_every``), else None.
    kind : str
        ``"gradient"`` (a call: state and adjoint sweeps) or ``"state"`` (a
        :meth:`SimultaneousGradient.value`: the state sweep only, no adjoint residuals).
    """

    loss: float
    forward_residuals: list[float]
    adjoint_residuals: list[float]
    warm: bool
    steps_critical_path: int
    steps_total: int
    grad_error: float | None = None
    kind: str = "gradient"

    def to_dict(self) -> dict[str, Any]:
        return {"loss": self.loss, "forward_residuals": list(self.forward_residuals),
                "adjoint_residuals": list(self.adjoint_residuals), "warm": self.warm,
                "steps_critical_path": self.steps_critical_path,
                "steps_total": self.steps_total, "grad_error": self.grad_error,
                "kind": self.kind}


@dataclass
class StepCost:
    """What one optimisation step of simultaneous training cost: its gradient (state
    and adjoint sweep) and the state-only sweeps of its line-search trials.

    Attributes
    ----------
    state_iterations, adjoint_iterations : int
        MGRIT iterations of all the step's state sweeps, and of its adjoint sweep.
    trial_sweeps : int
        State-only sweeps (line-search trials).
    steps_critical_path, steps_total : int
        Layer steps of all of them (as in :class:`StepRecord`).
    """

    state_iterations: int
    adjoint_iterations: int
    trial_sweeps: int
    steps_critical_path: int
    steps_total: int


def step_costs(records: list[StepRecord]) -> list[StepCost]:
    """The records of one-gradient-per-step training grouped into optimisation steps.

    Each ``"gradient"`` record opens a step and the ``"state"`` records after it are
    its line-search trials: the pattern of :class:`ptoc.methods.GradientMethod` with
    ``LBFGS(value_only_trials=True)`` (or any optimiser that evaluates no gradient
    inside a step). Records before the first gradient raise ``ValueError``.
    """
    steps: list[StepCost] = []
    for r in records:
        its = len(r.forward_residuals)
        if r.kind == "gradient":
            steps.append(StepCost(its, len(r.adjoint_residuals), 0, r.steps_critical_path,
                                  r.steps_total))
        elif not steps:
            raise ValueError("a state-only record comes before any gradient record; "
                             "these records are not of one-gradient-per-step training")
        else:
            last = steps[-1]
            last.state_iterations += its
            last.trial_sweeps += 1
            last.steps_critical_path += r.steps_critical_path
            last.steps_total += r.steps_total
    return steps


def _default_solver() -> MGRIT:
    # two iterations per sweep and step (Günther et al.), stopping earlier only when the
    # residual is at round-off
    return MGRIT(max_iterations=2, tol=1e-13)


@dataclass
class SimultaneousGradient(GradientFunction):
    """``grad_fn(params, X, y) -> (loss, grads)`` from a few warm-started MGRIT iterations.

    Simultaneous (one-shot) layer-parallel training of Günther et al. 2020: each call
    runs ``solver.max_iterations`` MGRIT iterations on the state sweep and on the
    adjoint sweep, warm-started from the previous call's solution on the same batch,
    and returns the resulting inexact gradient. Theory:
    :doc:`/theory/simultaneous`.

    Parameters
    ----------
    network : ResNet or Model
        The network, or any :class:`ptoc.propagator.Model` (the gradient reads it
        through that contract only).
    solver : MGRIT
        The solver of both sweeps; its ``max_iterations`` is the number of MGRIT
        iterations per sweep and optimisation step (default 2, with ``tol=1e-13``).
        Non-convergence within that budget is the point and is not an error; a
        diverging residual still raises :class:`ptoc.parallel.DivergenceError`.
    comm : None, int or Communicator
        Where the sweeps run (see :func:`ptoc.parallel.parallel_gradient`): one
        rank, that many simulated ranks, or e.g. :class:`ptoc.MPIRanks`.
    target : Target or str
        Kernel target.
    exact_every : int
        Also compute the exact (serial) gradient every this many calls and record its
        distance to the inexact one in :attr:`StepRecord.grad_error`; 0 (default) never.

    Attributes
    ----------
    records : list of StepRecord
        One per call, in order.
    deterministic : bool
        False: the warm start makes a call depend on the calls before it, so
        :class:`ptoc.methods.GradientMethod` calls again at the start of every step
        (a second evaluation at the same point is a better one).
    """

    deterministic: ClassVar[bool] = False

    network: ResNet
    solver: MGRIT = field(default_factory=_default_solver)
    comm: Any = None
    target: Target | str = Target.CPU
    exact_every: int = 0
    records: list[StepRecord] = field(default_factory=list, init=False, repr=False)
    #: (X, y, states, adjoints) of the last call; adjoints None when no call on this
    #: batch has run the adjoint sweep yet
    _warm: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None] | None = field(
        default=None, init=False, repr=False)
    _model: Model | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._model = as_model(self.network)
        if not isinstance(self.solver, MGRIT):
            raise TypeError("simultaneous training runs MGRIT: solver must be ptoc.MGRIT(...), "
                            f"got {self.solver!r}")
        if isinstance(self.exact_every, bool) or not isinstance(self.exact_every, int) \
                or self.exact_every < 0:
            raise ValueError(f"exact_every must be a non-negative integer, got "
                             f"{self.exact_every!r}")
        self.target = Target.parse(self.target)

    @property
    def writes_files(self) -> bool:
        """False on MPI ranks other than 0
        (:attr:`ptoc.methods.TrainingMethod.writes_files`)."""
        return is_root(self.comm)

    def reset(self) -> None:
        """Forget the warm start and the records."""
        self._warm = None
        self.records.clear()

    def config(self) -> dict[str, Any]:
        """Description for checkpoints and model files: the solver, ranks and target."""
        comm = self.comm if self.comm is None or isinstance(self.comm, int) \
            else f"{type(self.comm).__name__}({getattr(self.comm, 'size', '?')})"
        return {"name": "simultaneous", "solver": repr(self.solver), "comm": comm,
                "target": self.target.value}

    def state_dict(self) -> dict[str, Any]:
        """The warm start (batch, layer-space states and, once an adjoint sweep has run
        on the batch, adjoints) as a flat dict of copies; empty before the first call.
        Part of a training checkpoint, so that a resumed run starts MGRIT from the same
        guess as an uninterrupted one."""
        if self._warm is None:
            return {}
        X0, y0, states, adjoints = self._warm
        d = {"X": X0.copy(), "y": y0.copy(), "states": states.copy()}
        if adjoints is not None:
            d["adjoints"] = adjoints.copy()
        return d

    def load_state(self, d) -> None:
        """Inverse of :meth:`state_dict` (the records are not part of it)."""
        if not d:
            self._warm = None
            return
        missing = {"X", "y", "states"} - set(d)
        if missing:
            raise ValueError(f"the saved warm start lacks {sorted(missing)}")
        adjoints = np.array(d["adjoints"], copy=True) if "adjoints" in d else None
        self._warm = (*(np.array(d[k], copy=True) for k in ("X", "y", "states")), adjoints)

    def _exact(self, params, X, y):
        """The exact gradient: the serial sweeps (compiled, for a ResNet)."""
        if isinstance(self.network, ResNet):
            return loss_and_grad(self.network, params, X, y, target=self.target)
        result = parallel_gradient(self._model, params, X, y, Serial(), target=self.target,
                                   keep_states=False)
        return result.loss, result.grads

    def _guess(self, X: np.ndarray, y: np.ndarray):
        if self._warm is None:
            return None, None
        X0, y0, states, adjoints = self._warm
        if X0.shape == X.shape and np.array_equal(X0, X) and np.array_equal(y0, y):
            return states, adjoints
        return None, None

    def value(self, params: Params, X: np.ndarray, y: np.ndarray) -> float:
        """The objective from the state sweep alone: ``solver.max_iterations`` MGRIT
        iterations warm-started as a call is, no adjoint sweep.

        What a line-search trial of ``LBFGS(value_only_trials=True)`` evaluates (Günther
        et al.'s reference code re-runs only the state solve there). The states become
        the next warm start; the adjoints of the last call are kept for the next call
        on the same batch. Appends a :class:`StepRecord` of kind ``"state"``.
        """
        params = self._model.check_params(params)
        states, adjoints = self._guess(X, y)
        full, record = parallel_forward(self.network, params, X, self.solver, comm=self.comm,
                                        target=self.target, initial_states=states)
        n = self._model.n_layers
        data_loss = self._model.terminal(params, full[n], y)[0]
        value = float(data_loss) + float(self._model.regulariser(params))
        self._warm = (np.array(X, copy=True), np.array(y, copy=True), full, adjoints)
        self.records.append(StepRecord(
            loss=value, forward_residuals=list(record.residuals), adjoint_residuals=[],
            warm=states is not None, steps_critical_path=record.steps_critical_path,
            steps_total=record.steps_total, kind="state"))
        return value

    def __call__(self, params: Params, X: np.ndarray, y: np.ndarray) -> tuple[float, Params]:
        params = self._model.check_params(params)
        states, adjoints = self._guess(X, y)
        result = parallel_gradient(self.network, params, X, y, self.solver, comm=self.comm,
                                   target=self.target, initial_states=states,
                                   initial_adjoints=adjoints, keep_states=True)
        self._warm = (np.array(X, copy=True), np.array(y, copy=True), result.states,
                      result.adjoints)
        error = None
        if self.exact_every and len(self.records) % self.exact_every == 0:
            _, exact = self._exact(params, X, y)
            num = math.sqrt(sum(float(np.sum((result.grads[k] - exact[k]) ** 2))
                                for k in exact))
            den = math.sqrt(sum(float(np.sum(exact[k] ** 2)) for k in exact))
            error = num / den if den > 0 else num
        fwd, adj = result.forward, result.adjoint
        self.records.append(StepRecord(
            loss=float(result.loss), forward_residuals=list(fwd.residuals),
            adjoint_residuals=list(adj.residuals), warm=states is not None,
            steps_critical_path=fwd.steps_critical_path + adj.steps_critical_path,
            steps_total=fwd.steps_total + adj.steps_total, grad_error=error))
        return float(result.loss), result.grads


# --- the reference's Peaks setup ---------------------------------------------------------------

#: ``examples/peaks/peaks.cfg`` of Günther et al.'s code (``steffi7574/LayerParallelLearning``):
#: the values :func:`guenther_peaks` translates.
PEAKS_CONFIG: dict[str, Any] = {
    "ntraining": 5000, "nvalidation": 200, "nfeatures": 2, "nclasses": 5,
    "nchannels": 8, "nlayers": 32, "T": 1.0, "activation": "SmoothReLu",
    "type_openlayer": "activate", "weights_open_init": 1e-3, "weights_init": 1e-3,
    "weights_class_init": 1e-3,
    "braid_cfactor0": 2, "braid_cfactor": 2, "braid_maxlevels": 10, "braid_mincoarse": 10,
    "braid_maxiter": 2, "braid_abstol": 1e-15, "braid_adjtol": 1e-15, "braid_setskip": 0,
    "braid_fmg": 0, "braid_nrelax": 1, "braid_nrelax0": 0,
    "batch_type": "deterministic", "nbatch": 5000,
    "gamma_tik": 1e-7, "gamma_ddt": 1e-5, "gamma_class": 1e-7,
    "stepsize_type": "backtrackingLS", "stepsize": 1.0, "optim_maxiter": 130, "gtol": 1e-4,
    "ls_maxiter": 15, "ls_factor": 0.5, "hessian_approx": "L-BFGS", "lbfgs_stages": 10,
}


@dataclass
class PeaksSetup:
    """Günther et al.'s Peaks experiment as ptoc objects (:func:`guenther_peaks`).

    Attributes
    ----------
    network : ResNet
    data : ptoc.data.Dataset
    params : Params
        The initial parameters.
    solver : MGRIT
        The solver of every state and adjoint sweep.
    optimizer : LBFGS
    gradient : SimultaneousGradient
        The inexact gradient of :attr:`method` (its :attr:`~SimultaneousGradient.records`
        describe the run).
    method : GradientMethod
        Simultaneous training: one warm-started gradient per step, state-only trials.
    serial_method : GradientMethod
        The same optimiser on the exact serial gradient.
    epochs : int
        Optimisation steps (full batch: one step per epoch).
    """

    network: ResNet
    data: Any
    params: Params
    solver: MGRIT
    optimizer: Any
    gradient: SimultaneousGradient
    method: Any
    serial_method: Any
    epochs: int


def guenther_peaks(*, seed: int = 0, comm: Any = None, n_per_class: int | None = None,
                   epochs: int | None = None) -> PeaksSetup:
    """The Peaks setup of Günther et al.'s reference code (``examples/peaks/peaks.cfg``).

    Günther, Ruthotto, Schroder, Cyr & Gauger 2020 (:doc:`/theory/simultaneous`); the
    values are :data:`PEAKS_CONFIG`:

    * network: width 8, 30 residual layers (``nlayers = 32`` counts the opening and the
      classifier), ``T = 1`` (so ``h = 1/30``), SmoothReLU, dense opening
      ``x_0 = sigma(K_in y + b_in)`` (``type_openlayer = activate``), softmax
      classifier;
    * data: :func:`ptoc.data.peaks` with 1000 training and 40 validation points per
      class (5000 and 200), one full batch;
    * initialisation: every parameter entry (weights and biases of the opening, the
      layers and the classifier) drawn uniformly from ``[0, 1e-3)`` (``weights_*_init``);
    * regulariser: Tikhonov ``gamma_tik = 1e-7`` and time derivative ``gamma_ddt =
      1e-5`` on the layers, ``gamma_class = 1e-7`` on the classifier (and, as
      ``gamma_tik``, on the opening). The reference sums its terms without the step
      ``h``, ptoc's layer terms carry it, so ``gamma = gamma_tik / h`` and ``gamma_t =
      gamma_ddt / h``, ``gamma_c = 1e-7``: the same objective;
    * MGRIT: coarsening 2 on every level, at most 10 levels, no coarse grid below 10
      steps (``braid_mincoarse``: 30 steps, then 15, then stop: two levels, as XBraid
      coarsens), F-relaxation on the finest level (``braid_nrelax0 = 0``) and FCF below
      (``braid_nrelax = 1``; with two levels the coarse level is solved exactly),
      V-cycles, exactly 2 iterations per sweep (``braid_maxiter``; the absolute
      tolerance 1e-15 is never met in two iterations), warm-started across steps;
    * optimiser: L-BFGS with 10 pairs, first trial step 1, backtracking Armijo line
      search (``c1 = 1e-4`` as in ``src/main.cpp``, factor 0.5, 15 trials), the trials
      evaluating the objective from a state sweep only and the curvature pair formed
      at the next step (``LBFGS(value_only_trials=True)``), 130 steps.

    Where ptoc differs (not configurable in ptoc, or deliberately):

    * biases: the reference's residual and opening layers have one scalar bias each
      (added to every channel); ptoc's have one per channel (``b_n`` in ``R^8``), so
      ptoc trains 7 more parameters per layer;
    * data: ptoc draws its own Peaks points (same surface, classes and counts); the
      reference reads its files; the initial values come from NumPy's generator
      (``seed``), not from C's ``rand()``;
    * L-BFGS safeguards: ptoc's first direction is ``-g / max(1, ||g||)`` (the
      reference's ``-g``), a pair with ``s'y <= 1e-10 ||s|| ||y||`` is skipped (the
      reference keeps every pair), and a line search with no accepted trial keeps the
      parameters and clears the memory (the reference keeps the smallest trial step);
    * the reference's derivative of the time-derivative term is truncated to an
      integer (``int regul_bar`` in ``Layer::evalRegulDDT_diff``, ``src/layer.cpp``),
      which is 0 here (``gamma_ddt / h^2 = 0.009``): its gradient omits the term
      that its objective includes; ptoc's gradient is that of its objective;
    * stopping: the reference also stops when ``||g|| < 1e-4``; ptoc runs ``epochs``
      steps;
    * validation: the reference reports validation accuracy from a 2-iteration MGRIT
      state solve on the validation set; ptoc evaluates it with the exact forward sweep.

    Parameters
    ----------
    seed : int
        Seed of the initial parameters and of the data points.
    comm : None, int or Communicator
        Where the simultaneous sweeps run (see :class:`SimultaneousGradient`).
    n_per_class : int, optional
        Training points per class (default 1000; smaller for quick runs).
    epochs : int, optional
        Optimisation steps (default 130, ``optim_maxiter``).
    """
    from . import data as datasets
    from .methods import GradientMethod
    from .optim import LBFGS
    from .parallel.options import Relaxation

    cfg = PEAKS_CONFIG
    n_layers = cfg["nlayers"] - 2
    h = cfg["T"] / n_layers
    net = ResNet(width=cfg["nchannels"], depth=n_layers, T=cfg["T"], activation="smoothrelu",
                 n_in=cfg["nfeatures"], n_classes=cfg["nclasses"], opening="dense",
                 gamma=cfg["gamma_tik"] / h, gamma_t=cfg["gamma_ddt"] / h,
                 gamma_c=cfg["gamma_class"])
    per_class = cfg["ntraining"] // cfg["nclasses"] if n_per_class is None else n_per_class
    data = datasets.peaks(n_per_class=per_class,
                          n_val_per_class=cfg["nvalidation"] // cfg["nclasses"], seed=seed)
    rng = np.random.default_rng(seed)
    scales = {"K_in": cfg["weights_open_init"], "b_in": cfg["weights_open_init"],
              "K": cfg["weights_init"], "b": cfg["weights_init"],
              "W": cfg["weights_class_init"], "mu": cfg["weights_class_init"]}
    params = Params.from_dict({k: (rng.random(shape) * scales[k]).astype(net.dtype)
                               for k, shape in net.param_shapes().items()})
    solver = MGRIT(coarsening=cfg["braid_cfactor"], max_levels=cfg["braid_maxlevels"],
                   min_coarse_steps=cfg["braid_mincoarse"],
                   relaxation=(Relaxation.F, Relaxation.FCF), tol=0,
                   max_iterations=cfg["braid_maxiter"])
    optimizer = LBFGS(memory=cfg["lbfgs_stages"], lr=cfg["stepsize"], c1=1e-4,
                      backtrack=cfg["ls_factor"], max_backtracks=cfg["ls_maxiter"] - 1,
                      value_only_trials=True)
    gradient = SimultaneousGradient(net, solver, comm=comm)
    return PeaksSetup(net, data, params, solver, optimizer, gradient,
                      GradientMethod(optimizer, gradient), GradientMethod(optimizer),
                      cfg["optim_maxiter"] if epochs is None else epochs)
