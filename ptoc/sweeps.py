"""Serial forward and adjoint sweeps, the loss and its full gradient.

The forward sweep propagates a batch through all layers; the adjoint sweep runs
backward from ``lambda_N = dPhi/dx_N`` (:doc:`/theory/adjoint`) and accumulates the
parameter gradient on the way. Together with the opening layer, the classifier and
the regulariser (:mod:`ptoc.objective`) they give ``J`` and ``dJ/dtheta`` exactly:
the discrete adjoint *is* reverse-mode differentiation of the forward code.

Memory. Keeping every state costs ``(N+1) S d`` numbers, plus ``N S d`` for the stored
``sigma'(a_n)`` that spare the adjoint sweep a recomputation of the pre-activations.
With ``checkpoint_every=c`` only the states at layers ``0, c, 2c, ...`` are kept
(``ceil(N/c)+1`` states); the adjoint sweep recomputes one segment of ``c`` layers at a
time from its checkpoint (``(2c+1) S d`` working memory). The total is smallest for
``c ~ sqrt(N)``; the price is one extra forward sweep (about a third more work).
Recomputation uses the same kernels on the same inputs, so the gradient is bit for
bit the one without checkpoints.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from . import _config
from ._checks import check_inputs, check_positive_int
from ._workspace import Workspace
from .conv import ConvResNet
from .kernels import Target, backend
from .kernels import single_threaded_blas as _single_threaded_blas
from .model import Params, ResNet
from .objective import (
    assemble_gradient,
    classifier_loss,
    logits,
    opening_forward,
    regulariser,
    regulariser_workspace,
)
from .parallel.driver import parallel_adjoint, parallel_forward, parallel_gradient
from .parallel.options import SolveResult
from .parallel.problem import scratch as parallel_workspace
from .parallel.serial import Serial
from .parallel.solvers import check_solver
from .propagator import Model, level_workspace

_workspace = Workspace()


def release_workspace() -> None:
    """Free the buffers that :func:`loss_and_grad`, the layer-parallel solvers and the
    ResNet level steps keep for reuse (this thread's)."""
    _workspace.clear()
    parallel_workspace.clear()
    level_workspace.clear()
    regulariser_workspace.clear()


@dataclass
class ForwardResult:
    """States of a forward sweep.

    ``x_0 .. x_N``. Theory: :doc:`/theory/resnet`.

    Attributes
    ----------
    states : ndarray
        With ``checkpoint_every=None``: all states, shape (N+1, S, d), ``states[n] = x_n``.
        Otherwise the checkpoints ``x_0, x_c, x_2c, ..., x_N`` (the last one is always
        ``x_N``), shape (ceil(N/c)+1, S, d).
    checkpoint_every : int or None
        Spacing ``c`` of the checkpoints, or None when all states are kept.
    derivatives : ndarray or None
        ``sigma'(a_n)`` for ``n = 0..N-1`` (N, S, d) when all states are kept and
        ``store_derivatives`` was requested; used by the adjoint sweep.
    opening_derivative : ndarray, tuple or None
        What the opening's gradient needs: for a :class:`ptoc.ResNet`, ``sigma'(a_in)`` of
        a dense opening layer (None without one); for a model (e.g. a
        :class:`ptoc.ConvResNet`), the opening's cache, the second value of
        :meth:`ptoc.propagator.Model.opening` (the ConvResNet's: the images and
        ``sigma'(a_in)``).
    solve : SolveResult or None
        Record of a layer-parallel solve (None for the plain serial sweep).
    network : ResNet or None
        The network the sweep ran through (None for a result built by hand):
        :func:`adjoint` refuses the result for a network whose sweep differs (width,
        depth, ``T``, activation or dtype). The kernel target is not recorded: every
        target stores the same layout and values, so any target may run the adjoint.
    """

    states: np.ndarray
    checkpoint_every: int | None
    derivatives: np.ndarray | None
    opening_derivative: np.ndarray | None
    solve: SolveResult | None = None
    network: ResNet | None = None

    @property
    def final_state(self) -> np.ndarray:
        """``x_N`` (S, d)."""
        return self.states[-1]

    @property
    def initial_state(self) -> np.ndarray:
        """``x_0`` (S, d)."""
        return self.states[0]


def _guess(guess, network: ResNet, S: int, name: str):
    """A warm start as an (N+1, S, d) array of finite values, or None."""
    if guess is None:
        return None
    arr = np.asarray(getattr(guess, "states", guess), dtype=network.dtype)
    shape = (network.depth + 1, S, network.width)
    if arr.shape != shape:
        raise ValueError(f"{name} has shape {arr.shape}, expected {shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")
    return arr


def _checkpoint_layers(N: int, c: int) -> list[int]:
    return list(range(0, N, c)) + [N]


#: The fields of a :class:`ResNet` that its sweeps depend on (not the regularisers).
_SWEEP_FIELDS = ("width", "depth", "T", "activation", "dtype")


def _check_forward_result(network: ResNet, fwd) -> None:
    """Raise unless ``fwd`` is a :class:`ForwardResult` of a sweep through ``network``.

    A result carries its network (:attr:`ForwardResult.network`): one computed for a
    network of another width, depth, ``T``, activation or dtype is refused by name.
    Whatever its origin, its arrays must have the layout of ``network`` and of its own
    ``checkpoint_every``: ``N+1`` states (``ceil(N/c)+1`` checkpoints) of one shape
    ``(S, d)``, and ``N`` stored derivatives of that shape if any.
    """
    if not isinstance(fwd, ForwardResult):
        raise TypeError(f"fwd must be the ForwardResult of ptoc.forward, got "
                        f"{type(fwd).__name__}")
    if fwd.network is not None and not isinstance(fwd.network, ResNet):
        raise ValueError(f"fwd was computed for a {type(fwd.network).__name__}, but adjoint "
                         f"was given a ResNet ({network.describe()}): run ptoc.forward with "
                         "this network")
    if fwd.network is not None:
        differ = [f for f in _SWEEP_FIELDS
                  if getattr(fwd.network, f) != getattr(network, f)]
        if differ:
            raise ValueError(f"fwd was computed for {fwd.network.describe()}, "
                             f"{fwd.network.dtype}, but adjoint was given "
                             f"{network.describe()}, {network.dtype} (they differ in "
                             f"{', '.join(differ)}): run ptoc.forward with this network")
    N, d = network.depth, network.width
    c = fwd.checkpoint_every
    if c is not None:
        c = check_positive_int("fwd.checkpoint_every", c)
    n_states = N + 1 if c is None or c >= N else len(_checkpoint_layers(N, c))
    states = np.asarray(fwd.states)
    layout = "all states" if c is None else f"checkpoint_every={c}"
    if states.ndim != 3 or states.shape[0] != n_states or states.shape[2] != d:
        raise ValueError(f"fwd.states has shape {states.shape}, but {layout} of "
                         f"{network.describe()} needs ({n_states}, S, {d})")
    if fwd.derivatives is not None and fwd.derivatives.shape != (N,) + states.shape[1:]:
        raise ValueError(f"fwd.derivatives has shape {fwd.derivatives.shape}, expected "
                         f"{(N,) + states.shape[1:]}")


def _as_params(network: ResNet, params) -> Params:
    return network.check_params(params)


def forward(network: ResNet, params: Params | Mapping, X, *, target: Target | str = Target.CPU,
            checkpoint_every: int | None = None, store_derivatives: bool = True,
            solver=None, comm=None, initial_guess=None) -> ForwardResult:
    """Serial forward sweep ``x_{n+1} = x_n + h sigma(K_n x_n + b_n)`` from ``x_0 = opening(X)``.

    The state equation: forward Euler on the layer grid
    (Günther et al. 2020), solved layer after layer or, with ``solver``, layer-parallel
    (section 4). Theory: :doc:`/theory/resnet`, :doc:`/theory/parareal`,
    :doc:`/theory/mgrit`.

    Parameters
    ----------
    network : ResNet
    params : Params or dict
    X : array (S, n_in)
        Inputs, one sample per row.
    target : Target or str
        Kernel target (``"numpy"``, ``"cpu"``, ``"cuda"``).
    checkpoint_every : int, optional
        Keep only every ``c``-th state (see the module docstring); None keeps all.
    store_derivatives : bool
        Keep ``sigma'(a_n)`` for the adjoint sweep (only when all states are kept).
    solver : Serial, Parareal or MGRIT, optional
        Solve the sweep layer-parallel (:doc:`/theory/parareal`, :doc:`/theory/mgrit`);
        the result's ``solve`` holds the record (residuals, iterations, layer steps).
    comm : int, SimulatedRanks or Communicator, optional
        The ranks (see :mod:`ptoc.parallel.driver`).
    initial_guess : array (N+1, S, d) or ForwardResult, optional
        Warm start of MGRIT (e.g. the states of the previous optimisation step).
    """
    if isinstance(network, ConvResNet):
        return _model_forward(network, params, X, target, checkpoint_every, solver, comm,
                              initial_guess)
    params = _as_params(network, params)
    X, _ = check_inputs(network, X)
    kern = backend(target)
    c = check_positive_int("checkpoint_every", checkpoint_every, allow_none=True)
    solver = check_solver(solver)
    if comm is not None or not isinstance(solver, Serial):
        if c is not None:
            raise ValueError("checkpoint_every applies to the plain serial sweep only")
        guess = _guess(initial_guess, network, X.shape[0], "initial_guess")
        states, record = parallel_forward(network, params, X, solver, comm=comm,
                                          target=Target.parse(target), initial_states=guess)
        return ForwardResult(states, None, None, opening_forward(network, params, X)[1],
                             record, network)
    with _single_threaded_blas(kern):
        return _forward(network, params, X, kern, c, store_derivatives)


def _forward(network, params, X, kern, c, store_derivatives, scratch=False) -> ForwardResult:
    """Forward sweep; with ``scratch`` the big arrays are reused buffers (internal use)."""
    N, d, S = network.depth, network.width, X.shape[0]
    act = network.activation.code

    def buffer(name, shape):
        return _workspace.get(name, shape, network.dtype) if scratch else np.empty(
            shape, network.dtype)

    x0, dsig_in = opening_forward(network, params, X)
    if c is None or c >= N:
        states = buffer("states", (N + 1, S, d))
        states[0] = x0
        dsig = buffer("dsig", (N, S, d)) if store_derivatives else None
        kern.forward_sweep(states, params.K, params.b, network.h, act, dsig, _config.CHUNK)
        return ForwardResult(states, None, dsig, dsig_in, network=network)
    marks = _checkpoint_layers(N, c)
    checkpoints = buffer("checkpoints", (len(marks), S, d))
    checkpoints[0] = x0
    segment = buffer("segment", (c + 1, S, d))
    for k in range(len(marks) - 1):
        n0, n1 = marks[k], marks[k + 1]
        seg = segment[: n1 - n0 + 1]
        seg[0] = checkpoints[k]
        kern.forward_sweep(seg, params.K[n0:n1], params.b[n0:n1], network.h, act, None,
                           _config.CHUNK)
        checkpoints[k + 1] = seg[-1]
    return ForwardResult(checkpoints, c, None, dsig_in, network=network)


def _final_state(network: ResNet, params: Params, X: np.ndarray, kern) -> np.ndarray:
    """``x_N`` alone, for evaluation: two ``(S, d)`` buffers, each layer stepping from one
    into the other, instead of the ``(N+1, S, d)`` trajectory of :func:`forward`.

    Each layer is the kernel's ``step``, the same arithmetic on the same inputs as the
    kernel's sweep, so ``x_N`` is bit for bit that of :func:`forward`. The result is a
    workspace buffer: use it before the next call of this thread.
    """
    x0, _ = opening_forward(network, params, X)
    pair = [_workspace.get(f"evaluation state {i}", x0.shape, network.dtype) for i in (0, 1)]
    pair[0][...] = x0
    act, h = network.activation.code, network.h
    for n in range(network.depth):
        kern.step(pair[n % 2], params.K[n], params.b[n], h, act, pair[(n + 1) % 2], None,
                  _config.CHUNK)
    return pair[network.depth % 2]


@dataclass
class AdjointResult:
    """Result of an adjoint sweep.

    ``lambda_n`` and the layer gradients. Theory:
    :doc:`/theory/adjoint`.

    Attributes
    ----------
    initial_adjoint : ndarray (S, d)
        ``lambda_0``.
    grad_K, grad_b : ndarrays (N, d, d), (N, d)
        Data part of ``dJ/dK_n``, ``dJ/db_n`` (no regulariser).
    adjoints : ndarray (N+1, S, d) or None
        All ``lambda_n`` when requested (only without checkpoints), and always after a
        layer-parallel solve.
    solve : SolveResult or None
        Record of a layer-parallel solve (None for the plain serial sweep).
    """

    initial_adjoint: np.ndarray
    grad_K: np.ndarray
    grad_b: np.ndarray
    adjoints: np.ndarray | None = None
    solve: SolveResult | None = None


def adjoint(network: ResNet, params: Params | Mapping, fwd: ForwardResult, lam_N, *,
            target: Target | str = Target.CPU, keep_adjoints: bool = False, solver=None,
            comm=None, initial_guess=None) -> AdjointResult:
    """Adjoint sweep ``lambda_n = lambda_{n+1} + h K_n^T (sigma'(a_n) * lambda_{n+1})``.

    Starts from ``lambda_N = lam_N`` (S, d) and accumulates ``dJ/dK_n``, ``dJ/db_n``
    (:doc:`/theory/adjoint`). With a checkpointed ``fwd`` each segment is recomputed
    from its checkpoint first. With a ``solver`` (and ``comm``) the sweep is solved
    layer-parallel from the states of ``fwd`` (all states needed), warm-started from
    ``initial_guess`` (N+1, S, d, or an earlier AdjointResult) if given; the result then
    holds all adjoints and the solve record. The adjoint-based gradient of Günther et
    al. 2020; it equals backpropagation to round-off. Theory: :doc:`/theory/adjoint`.

    Raises
    ------
    TypeError
        When ``fwd`` is not a :class:`ForwardResult`.
    ValueError
        When ``fwd`` was computed for a network of another width, depth, ``T``,
        activation or dtype, or its arrays do not have the layout of ``network`` and of
        its ``checkpoint_every``; for a ``lam_N`` of the wrong shape or not finite.
    """
    if isinstance(network, ConvResNet):
        return _model_adjoint(network, params, fwd, lam_N, target, keep_adjoints, solver, comm,
                              initial_guess)
    params = _as_params(network, params)
    _check_forward_result(network, fwd)
    lam_N = np.ascontiguousarray(lam_N, dtype=network.dtype)
    if lam_N.shape != fwd.final_state.shape:
        raise ValueError(f"lam_N has shape {lam_N.shape}, expected {fwd.final_state.shape}")
    if not np.all(np.isfinite(lam_N)):
        raise ValueError("lam_N contains non-finite values (NaN or inf)")
    if keep_adjoints and fwd.checkpoint_every is not None:
        raise ValueError("keep_adjoints needs a forward result with all states "
                         "(checkpoint_every=None)")
    solver = check_solver(solver)
    kern = backend(target)
    if comm is not None or not isinstance(solver, Serial):
        if fwd.checkpoint_every is not None:
            raise ValueError("a layer-parallel adjoint sweep needs a forward result with all "
                             "states (checkpoint_every=None)")
        if isinstance(initial_guess, AdjointResult) and initial_guess.adjoints is None:
            raise ValueError("initial_guess is an AdjointResult without its adjoints: "
                             "compute it with keep_adjoints=True (or with a solver)")
        guess = None if initial_guess is None else _guess(
            getattr(initial_guess, "adjoints", initial_guess), network, lam_N.shape[0],
            "initial_guess")
        lams, gK, gb, record = parallel_adjoint(network, params, fwd.states, lam_N, solver,
                                                comm=comm, target=Target.parse(target),
                                                initial_adjoints=guess)
        return AdjointResult(np.array(lams[0]), gK, gb, lams, record)
    with _single_threaded_blas(kern):
        return _adjoint(network, params, fwd, lam_N, kern, keep_adjoints)


def _adjoint(network, params, fwd, lam_N, kern, keep_adjoints) -> AdjointResult:
    N, d = network.depth, network.width
    act, h = network.activation.code, network.h
    gK = np.zeros((N, d, d), network.dtype)
    gb = np.zeros((N, d), network.dtype)
    if fwd.checkpoint_every is None:
        lams = np.empty((N + 1,) + lam_N.shape, network.dtype) if keep_adjoints else None
        lam0 = kern.adjoint_sweep(fwd.states, lam_N, params.K, params.b, h, act,
                                  fwd.derivatives, gK, gb, lams, _config.CHUNK)
        return AdjointResult(lam0, gK, gb, lams)
    c = fwd.checkpoint_every
    marks = _checkpoint_layers(N, c)
    S = lam_N.shape[0]
    segment = _workspace.get("adjoint_segment", (c + 1, S, d), network.dtype)
    dsig = _workspace.get("adjoint_dsig", (c, S, d), network.dtype)
    lam = lam_N
    for k in range(len(marks) - 2, -1, -1):
        n0, n1 = marks[k], marks[k + 1]
        seg, ds = segment[: n1 - n0 + 1], dsig[: n1 - n0]
        seg[0] = fwd.states[k]
        kern.forward_sweep(seg, params.K[n0:n1], params.b[n0:n1], h, act, ds, _config.CHUNK)
        lam = kern.adjoint_sweep(seg, lam, params.K[n0:n1], params.b[n0:n1], h, act, ds,
                                 gK[n0:n1], gb[n0:n1], None, _config.CHUNK)
    return AdjointResult(np.asarray(lam), gK, gb, None)


def _loss_and_grad(network: ResNet, params: Params, X, y, kern, checkpoint_every):
    with _single_threaded_blas(kern):
        return _loss_and_grad_body(network, params, X, y, kern, checkpoint_every)


def _loss_and_grad_body(network: ResNet, params: Params, X, y, kern, checkpoint_every):
    fwd = _forward(network, params, X, kern, checkpoint_every, store_derivatives=True,
                   scratch=True)
    loss, lam_N, dW, dmu = classifier_loss(params, fwd.final_state, y)
    adj = _adjoint(network, params, fwd, lam_N, kern, False)
    grads, reg = assemble_gradient(network, params, X, adj.grad_K, adj.grad_b,
                                   adj.initial_adjoint, fwd.opening_derivative, dW, dmu)
    return loss + reg, grads


def loss_and_grad(network: ResNet, params: Params | Mapping, X, labels, *,
                  target: Target | str = Target.CPU, checkpoint_every: int | None = None,
                  solver=None, comm=None):
    """Objective ``J = Phi(x_N) + R`` and its gradient with respect to every parameter.

    ``Phi`` is the batch-mean softmax cross-entropy (:doc:`/theory/resnet`); the
    gradient comes from the discrete adjoint (section 2), which equals reverse-mode
    differentiation of the forward sweep to round-off (the adjoint-based gradient of
    Günther et al. 2020). Theory: :doc:`/theory/resnet`, :doc:`/theory/adjoint`.

    Parameters
    ----------
    network : ResNet
    params : Params or dict of arrays
        Keys ``K, b, K_in, b_in, W, mu`` (no ``K_in, b_in`` for an identity opening).
    X : array (S, n_in)
        Inputs, one sample per row.
    labels : array of int (S,)
        Class indices in ``[0, n_classes)``.
    target : Target or str
        ``"numpy"``, ``"cpu"`` (default) or ``"cuda"``.
    checkpoint_every : int, optional
        Keep every ``c``-th state only and recompute the rest (same result, less memory).
    solver : Serial, Parareal or MGRIT, optional
        Solve the state and adjoint sweeps layer-parallel (:doc:`/theory/mgrit`); at
        convergence the gradient equals the serial one. For the solve records and warm
        starts use :func:`ptoc.parallel.parallel_gradient`.
    comm : int, SimulatedRanks or Communicator, optional
        The ranks: a number of simulated ranks, ``ptoc.parallel.SimulatedRanks(P)`` or
        ``ptoc.parallel.MPIRanks()`` under ``mpiexec``. Default: one rank (parareal:
        ``chunks`` simulated ranks).

    Returns
    -------
    loss : float
        ``J(theta)``.
    grads : dict or Params
        ``dJ/dtheta`` with the same keys and shapes as ``params``; a plain ``dict`` when
        ``params`` is a dict, a :class:`Params` when it is one.

    Examples
    --------
    >>> import numpy as np, ptoc
    >>> net = ptoc.ResNet(width=4, depth=8, n_in=2, n_classes=3)
    >>> params = net.init_params(seed=0).to_dict()
    >>> X, y = np.random.default_rng(0).standard_normal((10, 2)), np.arange(10) % 3
    >>> loss, grads = ptoc.loss_and_grad(net, params, X, y)
    >>> sorted(grads) == sorted(params)
    True
    """
    if isinstance(network, ConvResNet):
        return _model_loss_and_grad(network, params, X, labels, target, checkpoint_every,
                                    solver, comm)
    as_dict = not isinstance(params, Params)
    p = _as_params(network, params)
    X, y = check_inputs(network, X, labels)
    c = check_positive_int("checkpoint_every", checkpoint_every, allow_none=True)
    kern = backend(target)
    solver = check_solver(solver)
    if comm is not None or not isinstance(solver, Serial):
        if c is not None:
            raise ValueError("checkpoint_every applies to the plain serial sweep only")
        result = parallel_gradient(network, p, X, y, solver, comm=comm,
                                   target=Target.parse(target), keep_states=False)
        return result.loss, (result.grads.to_dict(copy=False) if as_dict else result.grads)
    loss, grads = _loss_and_grad(network, p, X, y, kern, c)
    return loss, (grads.to_dict(copy=False) if as_dict else grads)


def loss(network: ResNet, params: Params | Mapping, X, labels, *,
         target: Target | str = Target.CPU) -> float:
    """Objective ``J = Phi(x_N) + R`` without the gradient (one forward sweep).

    Günther et al. 2020. Theory: :doc:`/theory/resnet`.
    """
    if isinstance(network, ConvResNet):
        p = network.check_params(params)
        _, y = network.check_inputs(X, labels)
        value = network.terminal(p, network.final_state(p, X, target=target), y)[0]
        return value + network.regulariser(p)
    p = _as_params(network, params)
    X, y = check_inputs(network, X, labels)
    kern = backend(target)
    with _single_threaded_blas(kern):
        value, *_ = classifier_loss(p, _final_state(network, p, X, kern), y)
        return value + regulariser(network, p)


def predict_logits(network: ResNet, params: Params | Mapping, X, *,
                   target: Target | str = Target.CPU) -> np.ndarray:
    """Classifier scores ``z = W x_N + mu`` (S, C) for inputs ``X``."""
    if isinstance(network, ConvResNet):
        p = network.check_params(params)
        xN = network.final_state(p, X, target=target)
        return logits(p, xN.reshape(xN.shape[0], -1))
    p = _as_params(network, params)
    X, _ = check_inputs(network, X)
    kern = backend(target)
    with _single_threaded_blas(kern):
        return logits(p, _final_state(network, p, X, kern))


def predict(network: ResNet, params: Params | Mapping, X, *,
            target: Target | str = Target.CPU) -> np.ndarray:
    """Predicted class of each row of ``X`` (argmax of the scores).

    The scores are the classifier ``z = W x_N + mu``.
    Theory: :doc:`/theory/resnet`.
    """
    return np.argmax(predict_logits(network, params, X, target=target), axis=1)


def accuracy(network: ResNet, params: Params | Mapping, X, labels, *,
             target: Target | str = Target.CPU) -> float:
    """Fraction of rows of ``X`` whose predicted class equals ``labels``.

    Uses :func:`predict`. Theory: :doc:`/theory/resnet`.
    """
    _, y = (network.check_inputs(X, labels) if isinstance(network, ConvResNet)
            else check_inputs(network, X, labels))
    return float(np.mean(predict(network, params, X, target=target) == y))


# --- models other than the ResNet: the same API through the Model contract --------------------

def _model_options(model: Model, checkpoint_every, solver):
    """The solver, refusing the options the model path does not have."""
    if checkpoint_every is not None:
        raise ValueError(f"checkpoint_every is available for a ptoc.ResNet only, not for a "
                         f"{type(model).__name__}: leave it None")
    return check_solver(solver)


def _model_forward(model: Model, params, X, target, checkpoint_every, solver, comm,
                   initial_guess) -> ForwardResult:
    """:func:`forward` of a model (a :class:`~ptoc.ConvResNet`): all states, from the
    model's propagator, or layer-parallel; ``opening_derivative`` holds the opening's
    cache (:meth:`Model.opening`)."""
    solver = _model_options(model, checkpoint_every, solver)
    p = model.check_params(params)
    X, _ = model.check_inputs(X)
    x0, cache = model.opening(p, X)
    if comm is not None or not isinstance(solver, Serial):
        guess = None if initial_guess is None else np.asarray(
            getattr(initial_guess, "states", initial_guess), dtype=model.dtype)
        states, record = parallel_forward(model, p, X, solver, comm=comm,
                                          target=Target.parse(target), initial_states=guess)
        return ForwardResult(states, None, None, cache, record, model)
    states = np.empty((model.n_layers + 1,) + x0.shape, model.dtype)
    model.layers(p, target=target).propagate(x0, 0, model.n_layers, states)
    return ForwardResult(states, None, None, cache, None, model)


def _model_adjoint(model: Model, params, fwd, lam_N, target, keep_adjoints, solver, comm,
                   initial_guess) -> AdjointResult:
    """:func:`adjoint` of a model: ``lambda_0``, the data part of the layer gradients (the
    propagator's ``parameters()``, ``[K, b]``) and, when asked, all adjoints."""
    solver = check_solver(solver)
    p = model.check_params(params)
    if not isinstance(fwd, ForwardResult) or fwd.network != model:
        raise ValueError("fwd must be the ForwardResult of ptoc.forward with this network")
    lam_N = np.ascontiguousarray(lam_N, dtype=model.dtype)
    if lam_N.shape != fwd.final_state.shape:
        raise ValueError(f"lam_N has shape {lam_N.shape}, expected {fwd.final_state.shape}")
    if not np.all(np.isfinite(lam_N)):
        raise ValueError("lam_N contains non-finite values (NaN or inf)")
    if comm is not None or not isinstance(solver, Serial):
        guess = None if initial_guess is None else np.asarray(
            getattr(initial_guess, "adjoints", initial_guess), dtype=model.dtype)
        lams, gK, gb, record = parallel_adjoint(model, p, fwd.states, lam_N, solver, comm=comm,
                                                target=Target.parse(target),
                                                initial_adjoints=guess)
        return AdjointResult(np.array(lams[0]), gK, gb, lams, record)
    prop = model.layers(p, target=target)
    grad = prop.zero_gradient()
    N = model.n_layers
    if keep_adjoints:
        lams = np.empty((N + 1,) + lam_N.shape, model.dtype)
        lams[N] = lam_N
        for n in range(N - 1, -1, -1):
            lams[n] = prop.adjoint_step(n, fwd.states[n], lams[n + 1], grad)
        return AdjointResult(lams[0].copy(), grad[0], grad[1], lams)
    lam0 = prop.adjoint_propagate(fwd.states, lam_N, 0, N, grad)
    return AdjointResult(lam0, grad[0], grad[1])


def _model_loss_and_grad(model: Model, params, X, labels, target, checkpoint_every, solver,
                         comm):
    """:func:`loss_and_grad` of a model: :func:`~ptoc.parallel.parallel_gradient` (serial
    on one rank unless a solver or ranks are given)."""
    solver = _model_options(model, checkpoint_every, solver)
    p = model.check_params(params)
    X, y = model.check_inputs(X, labels)
    result = parallel_gradient(model, p, X, y, solver, comm=comm, target=Target.parse(target),
                               keep_states=False)
    grads = result.grads
    return result.loss, (grads if isinstance(params, Params) else grads.to_dict(copy=False))
