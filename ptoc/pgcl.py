r"""Predict globally, correct locally: layer-parallel training by chunks (Parpas & Muir).

The ``N`` layers are split into ``P`` contiguous chunks (:func:`ptoc.parallel.partition`,
uneven allowed), one per rank. Chunk ``j``'s fine propagator ``F_j`` runs its layers;
its coarse propagator ``G_j`` is one coarse step of the model's propagator standing for
the chunk's ``L_j`` layers, with the chunk's first-layer weights (``coarse="inject"``) or
their mean (``"average"``), the rule of the parareal and MGRIT coarse grids. One step:

1. **predict** (global, cheap): the chunk-boundary states go forward through the coarse
   steps, ``U_{j+1} = F_j^old + (G_j(U_j) - G_j^old)`` (parareal's update, with the fine
   and coarse values of the previous step on the same batch), the last chunk takes
   ``Lambda_P = dPhi/dx_N`` at its own fine final state, and the co-states go backward
   through the transposed coarse steps, ``Lambda_j = A_j^old + (G_j'(U_j)^T Lambda_{j+1}
   - B_j^old)``; a step without stored values (a new batch) starts cold (``cold_start``);
2. **correct** (local, parallel): every chunk runs its own layers from ``U_j`` and back
   from ``Lambda_{j+1}`` and updates its own parameters (its layers; the opening on the
   first chunk, the terminal objective's on the last) with its own optimiser,
   ``local_steps`` times;
3. **store** the fine and coarse values of the first local sweep for the next step.

Written this way, unchanged weights and boundaries give ``U_{j+1} = F_j^old`` bit for bit:
at a fixed point every prediction is exact, the local gradients are the exact gradient,
and the fixed points are the stationary points of serial gradient descent. The
derivation, the costs and the measured behaviour are on :doc:`/theory/pgcl`. The model
is read through :class:`ptoc.propagator.Model` only.

Reference: P. Parpas and C. Muir, "Predict globally, correct locally: parallel-in-time
optimal control of neural networks" (the idea; these equations are written in ptoc's
conventions and are not taken from the paper).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from ._checks import check_integer, scalar_entry
from ._options import OptionEnum
from .kernels import Target, backend
from .kernels import single_threaded_blas as _single_threaded_blas
from .methods import (
    StepOutcome,
    TrainingDivergedError,
    TrainingMethod,
    check_gradient_optimizer,
    group_state,
)
from .model import Params, ResNet
from .optim import Adam, Optimizer
from .parallel.comm import (
    Communicator,
    SimulatedRanks,
    SingleRank,
    is_root,
    resolve_ranks,
    run_program,
)
from .parallel.driver import problem_facts
from .parallel.layout import partition, sum_of_squares
from .parallel.options import CoarseWeights
from .parallel.problem import coarse_weights
from .propagator import Model, Propagator, as_model

__all__ = [
    "PGCL",
    "ChunkMemory",
    "ColdStart",
    "LocalUpdate",
    "PGCLState",
    "Prediction",
]

TAG_STATE, TAG_COSTATE = 21, 22
#: What :meth:`PGCL.load_state` calls its input in error messages.
_STATE_DICT = "PGCL state dict"


class LocalUpdate(OptionEnum, what="local update"):
    r"""How a chunk forms the direction of its local update.

    ``GRADIENT``: the parameter gradient accumulated by the fine adjoint sweep
    (:doc:`/theory/adjoint`) plus the regulariser's. ``HAMILTONIAN``: minus the gradient
    of the layer Hamiltonians, :math:`-\nabla_\theta \sum_s H_n(x_n, p_{n+1}, \theta)`
    with :math:`p = -\lambda`, from :func:`ptoc.hamiltonian_grad` layer by layer (a step
    along it is Hamiltonian ascent). The two coincide, :math:`\nabla_\theta \sum_s H_n =
    -\partial J/\partial\theta_n` (:doc:`/theory/maximum_principle`), up to round-off from the
    different summation; ``HAMILTONIAN`` is the slower reference path. The head takes
    its gradient in both cases (it has no layer Hamiltonian).
    """

    GRADIENT = "gradient"
    HAMILTONIAN = "hamiltonian"


class ColdStart(OptionEnum, what="cold start"):
    """The prediction of a step without usable corrections (the first step, a new batch).

    ``COARSE``: the plain coarse prediction, :math:`U_{j+1} = G_j(U_j)` and
    :math:`\\Lambda_j = G_j'(U_j)^T \\Lambda_{j+1}` (cheap; the step's gradient is
    inexact). ``SERIAL``: exact boundaries from the serial fine sweeps run as a pipeline
    through the ranks (the step is an exact gradient step, at the serial critical path).
    """

    COARSE = "coarse"
    SERIAL = "serial"


@dataclass(frozen=True)
class ChunkMemory:
    """The fine and coarse boundary values chunk ``j`` kept from its last sweep.

    Attributes
    ----------
    forward : ndarray (S, d) or None
        :math:`F_j^{old}`, the fine state at the chunk's end (None for the last chunk).
    coarse_forward : ndarray (S, d) or None
        :math:`G_j^{old}`, the coarse step from the same initial state and weights.
    adjoint : ndarray (S, d) or None
        :math:`A_j^{old}`, the fine co-state :math:`\\lambda_{a_j}` at the chunk's start
        (None for the first chunk).
    coarse_adjoint : ndarray (S, d) or None
        :math:`B_j^{old}`, the coarse adjoint step from the same values.
    """

    forward: np.ndarray | None
    coarse_forward: np.ndarray | None
    adjoint: np.ndarray | None
    coarse_adjoint: np.ndarray | None


@dataclass(frozen=True)
class PGCLState:
    """State of :class:`PGCL` between steps (identical on every rank).

    Attributes
    ----------
    ranks : int
        Number of chunks ``P`` it was made for.
    step : int
        Parameter updates made so far.
    optimizer : tuple
        One optimiser state per chunk (for the chunk's own parameters).
    batch : tuple (X, y) or None
        The batch the corrections belong to.
    memory : tuple of ChunkMemory or None
        Per chunk, the fine and coarse boundary values of the last sweep on ``batch``.
    defects : tuple of float
        ``(state_defect, costate_defect)`` of the last step (NaN before the first).
    """

    ranks: int
    step: int
    optimizer: tuple[Any, ...]
    batch: tuple[np.ndarray, np.ndarray] | None = None
    memory: tuple[ChunkMemory, ...] | None = None
    defects: tuple[float, float] = (math.nan, math.nan)


@dataclass
class Prediction:
    """The boundary values of one PGCL sweep (:meth:`PGCL.predict`).

    Attributes
    ----------
    bounds : ndarray (P+1,)
        Chunk bounds ``a_0 .. a_P``.
    states : ndarray (P, S, d)
        Predicted chunk initial states :math:`U_j \\approx x_{a_j}` (``U_0 = x_0`` exact).
    costates : ndarray (P, S, d)
        Predicted chunk terminal co-states :math:`\\Lambda_{j+1} \\approx
        \\lambda_{a_{j+1}}`; the last is the last chunk's own :math:`\\partial\\Phi/\\partial x_N`.
    fine_states : ndarray (P, S, d)
        :math:`F_j(U_j)`, the fine state at every chunk's end.
    fine_costates : ndarray (P, S, d)
        The fine co-state :math:`\\lambda_{a_j}` at every chunk's start (from
        :math:`\\Lambda_{j+1}`).
    cold : bool
        Whether the prediction started cold (no corrections for this batch).
    state_defect, costate_defect : float
        ``sqrt(sum_j |F_j(U_j) - U_{j+1}|^2)`` and ``sqrt(sum_j |lambda^fine_{a_j} - Lambda_j|^2)``
        over the interior boundaries.
    """

    bounds: np.ndarray
    states: np.ndarray
    costates: np.ndarray
    fine_states: np.ndarray
    fine_costates: np.ndarray
    cold: bool
    state_defect: float
    costate_defect: float


# --- helpers -----------------------------------------------------------------------------------

def _copy_tree(obj: Any) -> Any:
    """Writeable copies of the arrays in nested tuples, lists and dicts (and dataclasses
    of arrays, such as optimiser states), for what comes back from a collective."""
    if isinstance(obj, np.ndarray):
        return np.array(obj, copy=True)
    if isinstance(obj, tuple):
        return tuple(_copy_tree(o) for o in obj)
    if isinstance(obj, list):
        return [_copy_tree(o) for o in obj]
    if isinstance(obj, dict):
        return {k: _copy_tree(v) for k, v in obj.items()}
    if hasattr(obj, "__dataclass_fields__"):
        return type(obj)(**{k: _copy_tree(getattr(obj, k)) for k in obj.__dataclass_fields__})
    return obj


@dataclass
class _Job:
    """What every rank's program reads (never writes)."""

    method: PGCL
    model: Model
    params: Mapping[str, np.ndarray]
    X: np.ndarray
    y: np.ndarray
    state: PGCLState
    warm: bool
    update: bool
    collect: bool


# --- the method --------------------------------------------------------------------------------

@dataclass
class PGCL(TrainingMethod):
    r"""Predict globally, correct locally (Parpas & Muir; :doc:`/theory/pgcl`).

    See the module docstring for the equations. One :meth:`step` predicts the chunk
    boundary states and co-states with the coarse network and last step's fine
    corrections, then every chunk updates its own parameters from its own fine sweeps.
    Theory: :doc:`/theory/pgcl`.

    Parameters
    ----------
    optimizer : SGD or Adam
        The local optimiser; each chunk keeps its own state (momentum, moments) for its
        own parameters. Default ``Adam(lr=3e-3)``, as for
        :class:`ptoc.methods.GradientMethod`. (L-BFGS needs the global objective and is
        refused.)
    local_steps : int
        Local updates per step (``>= 1``); each after a new local forward and backward
        sweep from the same predicted boundary values.
    coarse : CoarseWeights or str
        Weights of the coarse step of a chunk: ``"inject"`` (its first layer's, default)
        or ``"average"`` (the mean over the chunk).
    local_update : LocalUpdate or str
        ``"gradient"`` (default) or ``"hamiltonian"`` (the same direction from
        :func:`ptoc.hamiltonian_grad`; see :class:`LocalUpdate`).
    cold_start : ColdStart or str
        Prediction of a step without corrections for its batch: ``"coarse"`` (default) or
        ``"serial"`` (see :class:`ColdStart`).
    comm : None, int, SimulatedRanks or Communicator
        The ranks, one chunk each: None or 1 (one rank, one chunk), ``P`` (``P``
        simulated ranks, :class:`ptoc.SimulatedRanks`), or a communicator such as
        :class:`ptoc.MPIRanks` under ``mpiexec -n P``.
    target : Target or str
        Kernel target of the layer sweeps.

    Notes
    -----
    :attr:`StepOutcome.loss` is :math:`\Phi` at the last chunk's fine final state
    :math:`F_{P-1}(U_{P-1})` (the predicted state) plus :math:`R(\theta)`, at the
    parameters before the step: it equals :math:`J(\theta)` exactly when the prediction
    of :math:`U_{P-1}` is exact (always for one chunk). ``info`` holds

    * ``state_defect``, ``costate_defect``: the predictions' errors against this step's
      fine values, :math:`\sqrt{\sum_j \|F_j(U_j) - U_{j+1}\|^2}` and
      :math:`\sqrt{\sum_j \|\lambda^{fine}_{a_j} - \Lambda_j\|^2}` over the interior
      boundaries (both 0 when the step's gradient is exact), and ``*_rel`` the same
      divided by the norm of the fine values;
    * ``cold``: whether the step started without corrections;
    * ``steps_total`` and ``steps_critical_path``: layer steps on all ranks and on the
      critical path (the communicator's logical clock);
    * ``ranks``.

    Raises
    ------
    ValueError
        At construction, for an option out of range (the message names it); in
        :meth:`init` and :meth:`step`, for more chunks than layers.
    """

    name: ClassVar[str] = "pgcl"

    optimizer: Optimizer = field(default_factory=lambda: Adam(lr=3e-3))
    local_steps: int = 1
    coarse: CoarseWeights | str = CoarseWeights.INJECT
    local_update: LocalUpdate | str = LocalUpdate.GRADIENT
    cold_start: ColdStart | str = ColdStart.COARSE
    comm: Any = None
    target: Target | str = Target.CPU
    _runner: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.optimizer = check_gradient_optimizer("PGCL optimizer", self.optimizer)
        self.local_steps = check_integer("PGCL local_steps", self.local_steps, 1)
        for name, cls in (("coarse", CoarseWeights), ("local_update", LocalUpdate),
                          ("cold_start", ColdStart), ("target", Target)):
            try:
                setattr(self, name, cls.parse(getattr(self, name)))
            except ValueError as exc:
                raise ValueError(f"PGCL {name}: {exc}") from None
        self._runner = resolve_ranks(self.comm, owner="PGCL", one_is_single=True)

    # --- layout ---------------------------------------------------------------------------------
    @property
    def ranks(self) -> int:
        """Number of chunks ``P`` (the number of ranks)."""
        return int(self._runner.size)

    def _bounds(self, model: Model) -> np.ndarray:
        P, N = self.ranks, model.n_layers
        if P > N:
            raise ValueError(f"PGCL comm: {P} ranks (chunks) for {N} layers; every chunk needs "
                             "at least one layer (use at most as many ranks as layers)")
        return partition(N, P)

    def _local_params(self, model: Model, params: Mapping, a: int, e: int,
                      j: int) -> dict[str, np.ndarray]:
        """Copies of the parameters chunk ``j`` owns: its layers' rows of the layer arrays,
        the opening's (first chunk) and the terminal objective's (last chunk)."""
        out = {k: params[k][a:e].copy() for k in model.layer_keys}
        if j == 0:
            out.update({k: params[k].copy() for k in model.opening_keys})
        if j == self.ranks - 1:
            out.update({k: params[k].copy() for k in model.terminal_keys})
        return out

    # --- interface ------------------------------------------------------------------------------
    def init(self, network: ResNet, params: Params) -> PGCLState:
        """Fresh state: no corrections, a zero optimiser state per chunk."""
        model = as_model(network)
        params = model.check_params(params)
        bounds = self._bounds(model)
        opt = tuple(self.optimizer.init(self._local_params(model, params, int(bounds[j]),
                                                           int(bounds[j + 1]), j))
                    for j in range(self.ranks))
        return PGCLState(ranks=self.ranks, step=0, optimizer=opt)

    def step(self, network: ResNet, params: Params, state: PGCLState, X: np.ndarray,
             y: np.ndarray) -> StepOutcome:
        """One predict-correct step on ``(X, y)`` (see the module docstring)."""
        result = self._run(network, params, state, X, y, update=True, collect=False)
        return StepOutcome(result["loss"], result["params"], result["state"], result["info"])

    def predict(self, network: ResNet, params: Params, state: PGCLState, X: np.ndarray,
                y: np.ndarray) -> tuple[Prediction, PGCLState]:
        """Predict and sweep without updating any parameter.

        Runs phases 1 and 3 of a step (prediction, the chunks' fine sweeps, storing the
        new corrections) with the weights left as they are. Returns the
        :class:`Prediction` and the state with the refreshed corrections (optimiser
        states and step count unchanged). With fixed weights, repeated calls are
        parareal iterations for the boundary values.
        """
        result = self._run(network, params, state, X, y, update=False, collect=True)
        return result["prediction"], result["state"]

    def state_dict(self, state: PGCLState) -> dict[str, Any]:
        """Flat dict of arrays and scalars: ``ranks``, ``step``, ``defects``,
        ``optimizer.<j>.*``, and with corrections ``batch.X``, ``batch.y`` and
        ``memory.<j>.<forward|coarse_forward|adjoint|coarse_adjoint>``."""
        d: dict[str, Any] = {"method": self.name, "ranks": np.int64(state.ranks),
                             "step": np.int64(state.step),
                             "defects": np.array(state.defects, dtype=np.float64)}
        for j, s in enumerate(state.optimizer):
            d.update({f"optimizer.{j}.{k}": v for k, v in self.optimizer.state_dict(s).items()})
        if state.memory is not None and state.batch is not None:
            d["batch.X"], d["batch.y"] = state.batch[0].copy(), state.batch[1].copy()
            for j, m in enumerate(state.memory):
                for k in ChunkMemory.__dataclass_fields__:
                    v = getattr(m, k)
                    if v is not None:
                        d[f"memory.{j}.{k}"] = v.copy()
        return d

    def load_state(self, d: Mapping[str, Any], network: ResNet, params: Params) -> PGCLState:
        """Inverse of :meth:`state_dict` (also accepts what :func:`numpy.load` returns)."""
        self.check_state_name(d, required=False)
        P = int(scalar_entry(d, "ranks", _STATE_DICT))
        if P != self.ranks:
            raise ValueError(f"the saved PGCL state is for {P} ranks (chunks); this PGCL runs "
                             f"on {self.ranks}: resume with the same number of ranks")
        model = as_model(network)
        self._bounds(model)
        opt = tuple(self.optimizer.load_state(group_state(d, f"optimizer.{j}"))
                    for j in range(P))
        defects = tuple(float(v) for v in np.asarray(d["defects"], dtype=np.float64))
        batch = memory = None
        if "batch.X" in d:
            batch = (np.array(d["batch.X"], dtype=model.dtype, copy=True),
                     np.array(d["batch.y"], dtype=np.int64, copy=True))
            mem = []
            for j in range(P):
                g = group_state(d, f"memory.{j}")
                mem.append(ChunkMemory(**{k: (np.array(g[k], dtype=model.dtype, copy=True)
                                              if k in g else None)
                                          for k in ChunkMemory.__dataclass_fields__}))
            memory = tuple(mem)
        step = int(scalar_entry(d, "step", _STATE_DICT))
        return PGCLState(ranks=P, step=step, optimizer=opt, batch=batch, memory=memory,
                         defects=(defects[0], defects[1]))

    @property
    def writes_files(self) -> bool:
        """False on MPI ranks other than 0
        (:attr:`ptoc.methods.TrainingMethod.writes_files`)."""
        return is_root(self.comm)

    def config(self) -> dict[str, Any]:
        """Name and options (JSON-serialisable)."""
        runner = self._runner
        kind = ("single" if isinstance(runner, SingleRank) else "simulated"
                if isinstance(runner, SimulatedRanks) else type(runner).__name__)
        return {"name": self.name, "optimizer": self.optimizer.config(),
                "local_steps": self.local_steps, "coarse": self.coarse.value,
                "local_update": self.local_update.value, "cold_start": self.cold_start.value,
                "ranks": self.ranks, "comm": kind, "target": self.target.value}

    def metrics(self, network: ResNet, params: Params, state: PGCLState) -> dict[str, float]:
        """The boundary defects of the last step (see :class:`PGCL` Notes)."""
        if state.step == 0:
            return {}
        return {"state_defect": state.defects[0], "costate_defect": state.defects[1]}

    # --- running --------------------------------------------------------------------------------
    def _run(self, network: ResNet, params: Params, state: PGCLState, X: np.ndarray,
             y: np.ndarray, update: bool, collect: bool) -> dict[str, Any]:
        model = as_model(network)
        params = model.check_params(params)
        X, y = model.check_inputs(X, y)
        self._bounds(model)
        if not isinstance(state, PGCLState):
            raise TypeError(f"state must be a PGCLState (from PGCL.init), got "
                            f"{type(state).__name__}")
        if state.ranks != self.ranks:
            raise ValueError(f"the PGCL state is for {state.ranks} ranks (chunks); this PGCL "
                             f"runs on {self.ranks}")
        warm = (state.memory is not None and state.batch is not None
                and state.batch[0].shape == X.shape and np.array_equal(state.batch[0], X)
                and np.array_equal(state.batch[1], y))
        job = _Job(self, model, params, X, y, state, warm, update, collect)
        kern = backend(self.target)
        runner = self._runner
        def facts(c: Communicator) -> dict[str, str]:
            """What every rank must share: the model, the batch, the parameters, the
            options and the step (compared by :func:`ptoc.parallel.comm.agree`)."""
            if c.size == 1:
                return {}
            out = problem_facts(model, None, self.target, {"inputs X": X, "labels y": y},
                                params)
            out.update({f"PGCL {k}": repr(v) for k, v in self.config().items()
                        if k != "comm"})
            out["PGCL step"] = repr(state.step)
            return out

        with _single_threaded_blas(kern):
            out = run_program(runner, lambda c: _program(c, job), check=facts,
                              what="the PGCL step")
        if isinstance(out, TrainingDivergedError):
            raise out
        return out


# --- the program of one rank (SPMD) ---------------------------------------------------------------

class _Chunk:
    """Chunk ``j``'s sweeps, coarse steps and gradients (no communication here), through
    the model contract: its layers are ``model.layers`` over its own parameters."""

    def __init__(self, job: _Job, j: int, bounds: np.ndarray):
        m, model = job.method, job.model
        self.job, self.model, self.j = job, model, j
        self.P = len(bounds) - 1
        self.a, self.e = int(bounds[j]), int(bounds[j + 1])
        self.L = self.e - self.a
        self.first, self.last = j == 0, j == self.P - 1
        self.local = m._local_params(model, job.params, self.a, self.e, j)
        # the coarse step's weights: those of the chunk's layers at the step's start
        start = self.layers()
        rule = range(self.L) if m.coarse is CoarseWeights.AVERAGE else range(1)
        self.theta = coarse_weights([start.layer_parameters(n) for n in rule])

    def layers(self) -> Propagator:
        """The chunk's layers, with its current parameters, as a propagator (layer ``k``
        is the model's layer ``a + k``)."""
        return self.model.layers(self.local, target=self.job.method.target,
                                 span=(self.a, self.e))

    # coarse propagator of the chunk: one step standing for its L layers
    def coarse(self, U: np.ndarray) -> np.ndarray:
        return self.layers().coarse_step(self.theta, self.L, U)

    def coarse_adjoint(self, U: np.ndarray, lam: np.ndarray) -> np.ndarray:
        return self.layers().coarse_adjoint_step(self.theta, self.L, U, lam)

    def opening(self) -> tuple[np.ndarray, Any]:
        return self.model.opening(self.local, self.job.X)

    def fine_forward(self, U: np.ndarray) -> np.ndarray:
        """States ``x_a .. x_e`` from ``x_a = U``."""
        xs = np.empty((self.L + 1,) + U.shape, U.dtype)
        self.layers().propagate(U, 0, self.L, states=xs)
        return xs

    def terminal(self, xs: np.ndarray):
        """Last chunk: ``(Phi, lambda_N, dPhi/d(terminal parameters))`` at its own fine
        final state."""
        return self.model.terminal(self.local, xs[-1], self.job.y)

    def fine_backward(self, xs, lamT, opening_cache, head_grads) -> tuple[np.ndarray, dict]:
        """Co-state at the chunk's start and the gradient of the local objective."""
        model, loc = self.model, self.local
        prop = self.layers()
        layer_grads = prop.zero_gradient()
        if self.job.method.local_update is LocalUpdate.HAMILTONIAN:
            lams = np.empty((self.L + 1,) + lamT.shape, lamT.dtype)  # lams[k] = lambda_{a+k}
            lams[self.L] = lamT
            for k in range(self.L - 1, -1, -1):
                lams[k] = prop.adjoint_step(k, xs[k], lams[k + 1])
            lam_a = lams[0]
            self._hamiltonian_direction(xs, lams, layer_grads)
        else:
            lam_a = prop.adjoint_propagate(xs, lamT, 0, self.L, layer_grads)
            self._add_regulariser(layer_grads)
        grads: dict[str, np.ndarray] = dict(zip(model.layer_keys, layer_grads, strict=True))
        if self.first:
            grads.update(model.opening_gradient(loc, self.job.X, lam_a, opening_cache))
        if self.last:
            grads.update({k: np.ascontiguousarray(v, dtype=model.dtype)
                          for k, v in head_grads.items()})
        heads = [k for k in (*model.terminal_keys, *model.opening_keys) if k in grads]
        model.head_regulariser({k: loc[k] for k in heads}, grads)
        return lam_a, grads

    def _neighbours(self) -> tuple[tuple | None, tuple | None]:
        """The layers beside the chunk, at the step's start values."""
        params, keys = self.job.params, self.model.layer_keys
        left = tuple(params[k][self.a - 1] for k in keys) if self.a > 0 else None
        right = tuple(params[k][self.e] for k in keys) if self.e < self.model.n_layers \
            else None
        return left, right

    def _add_regulariser(self, layer_grads: list[np.ndarray]) -> None:
        """``dR/dtheta_n`` of the chunk's layers, neighbours at the step's start values
        (the model's layer regulariser, as the serial gradient has it)."""
        left, right = self._neighbours()
        self.model.layer_regulariser([self.local[k] for k in self.model.layer_keys], left,
                                     right, layer_grads)

    def _hamiltonian_direction(self, xs, lams, layer_grads) -> None:
        """``-grad_theta sum_s H_n(x_n, p_{n+1}, theta_n)``, ``p = -lambda``, layer by layer
        (the model's :meth:`~ptoc.propagator.Model.hamiltonian_gradient`)."""
        params, model = self.job.params, self.model
        cur = {k: np.array(v, copy=True) for k, v in params.items()}
        for k in model.layer_keys:
            cur[k][self.a:self.e] = self.local[k]
        target = self.job.method.target
        for i in range(self.L):
            hams = model.hamiltonian_gradient(cur, self.a + i, xs[i], -lams[i + 1],
                                              target=target)
            for g, h in zip(layer_grads, hams, strict=True):
                g[i] = -h


def _finite(grads: Mapping[str, np.ndarray]) -> str | None:
    for k, g in grads.items():
        if not np.all(np.isfinite(g)):
            return k
    return None


def _program(comm: Communicator, job: _Job) -> dict[str, Any] | TrainingDivergedError:
    """One PGCL step (or sweep) on rank ``comm.rank``; every rank returns the same result."""
    comm.reset_count()
    m, state = job.method, job.state
    bounds = partition(job.model.n_layers, comm.size)
    c = _Chunk(job, comm.rank, bounds)
    j, L = c.j, c.L
    mem = state.memory[j] if job.warm else None
    serial = not job.warm and m.cold_start is ColdStart.SERIAL

    # 1. forward prediction; the fine sweep runs after the send (or, serially, before it)
    opening_cache = None
    if c.first:
        U, opening_cache = c.opening()
    else:
        U = comm.recv(j - 1, TAG_STATE)
    G = pred_next = None
    if not c.last and not serial:
        G = c.coarse(U)
        comm.count(1)
        pred_next = G if mem is None else mem.forward + (G - mem.coarse_forward)
        comm.send(pred_next, j + 1, TAG_STATE)
    xs = c.fine_forward(U)
    comm.count(L)
    if not c.last and serial:
        pred_next = xs[-1]
        comm.send(pred_next, j + 1, TAG_STATE)
        G = c.coarse(U)
        comm.count(1)

    # 2. terminal co-state of the chunk, then the backward prediction for chunk j-1
    data_loss, head_grads = math.nan, None
    if c.last:
        data_loss, lamT, head_grads = c.terminal(xs)
    else:
        lamT = comm.recv(j + 1, TAG_COSTATE)
    B = pred_prev = None
    if not c.first and not serial:
        B = c.coarse_adjoint(U, lamT)
        comm.count(1)
        pred_prev = B if mem is None else mem.adjoint + (B - mem.coarse_adjoint)
        comm.send(pred_prev, j - 1, TAG_COSTATE)
    lam_a, grads = c.fine_backward(xs, lamT, opening_cache, head_grads)
    comm.count(L)
    if not c.first and serial:
        pred_prev = lam_a
        comm.send(pred_prev, j - 1, TAG_COSTATE)
        B = c.coarse_adjoint(U, lamT)
        comm.count(1)

    memory = ChunkMemory(forward=None if c.last else xs[-1].copy(), coarse_forward=G,
                         adjoint=None if c.first else lam_a.copy(), coarse_adjoint=B)
    sq = [0.0, 0.0, 0.0, 0.0]  # state defect, fine state norm, costate defect, fine norm
    if not c.last:
        sq[0], sq[1] = sum_of_squares(xs[-1] - pred_next), sum_of_squares(xs[-1])
    if not c.first:
        sq[2], sq[3] = sum_of_squares(lam_a - pred_prev), sum_of_squares(lam_a)
    bad = None if math.isfinite(data_loss) or not c.last else "loss"
    bad = bad or (None if _finite(grads) is None else f"gradient of {_finite(grads)!r}")
    collected = (U, lamT, xs[-1], lam_a) if job.collect else None

    # 3. correct: local updates of the chunk's own parameters
    opt_state = state.optimizer[j]
    if job.update and bad is None:
        for k in range(m.local_steps):
            if k > 0:
                if c.first:
                    U, opening_cache = c.opening()
                xs = c.fine_forward(U)
                if c.last:
                    _, lamT, head_grads = c.terminal(xs)
                _, grads = c.fine_backward(xs, lamT, opening_cache, head_grads)
                comm.count(2 * L)
                key = _finite(grads)
                if key is not None:
                    bad = f"local gradient of {key!r} (local step {k + 1})"
                    break
            c.local, opt_state = m.optimizer.update(c.local, grads, opt_state)
        if bad is None:
            key = _finite(c.local)
            bad = None if key is None else f"updated parameter {key!r}"

    payload = {"local": c.local, "opt": opt_state, "memory": memory, "sq": sq,
               "loss": data_loss, "bad": bad, "clock": comm.clock, "steps": comm.steps,
               "collected": collected}
    parts = _copy_tree(comm.allgather(payload))
    return _assemble(job, bounds, parts)


def _assemble(job: _Job, bounds: np.ndarray, parts: list[dict[str, Any]]
              ) -> dict[str, Any] | TrainingDivergedError:
    """The full result from every chunk's part (the same on every rank)."""
    for j, p in enumerate(parts):
        if p["bad"] is not None:
            return TrainingDivergedError(f"PGCL: non-finite {p['bad']} on chunk {j}")
    model, params, state = job.model, job.params, job.state
    P = len(parts)
    sq = [0.0, 0.0, 0.0, 0.0]
    for p in parts:  # rank order: the same bits on every rank
        for i in range(4):
            sq[i] += p["sq"][i]
    sd, cd = math.sqrt(sq[0]), math.sqrt(sq[2])
    loss = float(parts[-1]["loss"]) + model.regulariser(params)
    info = {"state_defect": sd, "costate_defect": cd,
            "state_defect_rel": sd / math.sqrt(sq[1]) if sq[1] > 0 else sd,
            "costate_defect_rel": cd / math.sqrt(sq[3]) if sq[3] > 0 else cd,
            "cold": not job.warm, "ranks": P,
            "steps_total": int(sum(p["steps"] for p in parts)),
            "steps_critical_path": int(max(p["clock"] for p in parts))}
    memory = tuple(p["memory"] for p in parts)
    batch = (job.X.copy(), job.y.copy())
    out: dict[str, Any] = {"loss": loss, "info": info}
    if job.update:
        first, last = parts[0]["local"], parts[-1]["local"]
        new = {k: np.concatenate([p["local"][k] for p in parts]) for k in model.layer_keys}
        new.update({k: first[k] for k in model.opening_keys})
        new.update({k: last[k] for k in model.terminal_keys})
        out["params"] = model.pack(new)
        out["state"] = PGCLState(ranks=P, step=state.step + 1,
                                 optimizer=tuple(p["opt"] for p in parts), batch=batch,
                                 memory=memory, defects=(sd, cd))
    else:
        col = [p["collected"] for p in parts]
        out["state"] = PGCLState(ranks=P, step=state.step, optimizer=state.optimizer,
                                 batch=batch, memory=memory, defects=(sd, cd))
        out["prediction"] = Prediction(
            bounds=np.array(bounds), states=np.stack([c[0] for c in col]),
            costates=np.stack([c[1] for c in col]), fine_states=np.stack([c[2] for c in col]),
            fine_costates=np.stack([c[3] for c in col]), cold=not job.warm, state_defect=sd,
            costate_defect=cd)
    return out
