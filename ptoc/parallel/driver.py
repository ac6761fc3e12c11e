"""Layer-parallel sweeps and the gradient: the SPMD programs and how they are run.

:func:`parallel_forward`, :func:`parallel_adjoint` and :func:`parallel_gradient` run
the same program on every rank of a communicator:

1. rank 0 applies the opening layer; the state sweep is solved by the chosen solver
   (serial pipeline, parareal or MGRIT), each rank holding its own layers only
   (:class:`ptoc.propagator.LayerSlice`);
2. the last rank evaluates the classifier loss and ``lambda_N``;
3. the adjoint sweep is solved by the same solver, backward, from those (possibly
   inexact) states;
4. each rank forms the gradient of its own layers from ``x_n`` and ``lambda_{n+1}``
   (:doc:`/theory/adjoint`), rank 0 that of the opening layer, the last rank that
   of the classifier, and every rank its part of the regulariser (neighbouring
   layers are exchanged for the time-smoothness term);
5. results are gathered, so every rank returns the full loss, gradient and states.

``comm`` may be None (one rank, or ``chunks`` simulated ranks for parareal), an
integer (that many simulated ranks), :class:`~ptoc.parallel.SimulatedRanks`, or a
:class:`~ptoc.parallel.Communicator` such as :class:`~ptoc.parallel.MPIRanks`.

Every entry point starts its program with :func:`~ptoc.parallel.comm.agree`: each rank
checks that the solver fits the layout and, on several ranks, the ranks compare the
facts of their problem (:func:`problem_facts`: the network or propagator, the solver,
the target, the shapes of the layer parameters, digests of the head parameters and of
the arrays of the batch). A failed check or a disagreement is the same error on every
rank, before any layer step.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..kernels import single_threaded_blas
from ..model import Params, ResNet
from ..propagator import LayerSlice, Model, ResNetModel, as_model
from .comm import (
    Communicator,
    SimulatedRanks,
    config_facts,
    digest,
    resolve_ranks,
    run_program,
)
from .layout import partition
from .options import SolveResult
from .problem import Block, SweepProblem
from .serial import Serial
from .solvers import check_solver

TAG_BOUNDARY = 7


@dataclass
class GradientResult:
    """Loss, gradient and the records of both layer-parallel sweeps.

    Attributes
    ----------
    loss : float
        ``J = Phi(x_N) + R`` at the computed states.
    grads : Params
    forward, adjoint : SolveResult
        Records of the state and adjoint sweeps.
    states, adjoints : ndarray (N+1, S, d), optional
        The computed ``x_n`` and ``lambda_n`` (for warm starts).
    layers : (int, int), optional
        Set by :func:`local_gradient`: ``grads.K`` and ``grads.b`` hold the layers
        ``layers[0] .. layers[1]-1`` only (this rank's). None: all layers.
    """

    loss: float
    grads: Params
    forward: SolveResult
    adjoint: SolveResult
    states: np.ndarray | None = None
    adjoints: np.ndarray | None = None
    layers: tuple[int, int] | None = None


# --- running a program on ranks ---------------------------------------------------------------

def _runner(solver, comm) -> tuple[Any, int]:
    """``(runner, n_ranks)``: what runs the SPMD program, and on how many ranks (no
    communicator: the solver's own number of simulated ranks, or one)."""
    runner = resolve_ranks(comm, default=solver.simulated_ranks())
    return runner, runner.size


def check_layout(solver, n_layers: int, n_ranks: int) -> None:
    """Raise (identically on every rank) when the solver cannot run on these ranks."""
    solver.check_layout(n_layers, n_ranks)


def problem_facts(model: Any, solver, target, arrays: dict[str, Any],
                   params: Any = None) -> dict[str, str]:
    """What every rank of a solve must share, for :func:`~ptoc.parallel.comm.agree`.

    ``model``: a :class:`Model` (a ResNet's configuration is compared field by field) or
    a :class:`ptoc.Propagator`; ``arrays``: the batch and guesses by name (digests);
    ``params``: the layer arrays are compared by their shape per layer only (a rank
    may hold placeholders for, or only, its own layers), the head arrays by digest.
    """
    network = getattr(model, "network", None)
    if network is not None:
        facts = config_facts("network", network)
    else:
        facts = {"model": type(model).__name__, "number of layers": repr(model.n_layers)}
    facts.update(config_facts("solver", solver))
    facts["target"] = repr(target)
    if params is not None:
        facts.update({f"parameter {k} (per layer)": f"shape {np.shape(params[k])[1:]}"
                      for k in model.layer_keys})
        facts.update({f"parameter {k}": digest(params[k])
                      for k in (*model.opening_keys, *model.terminal_keys)})
    facts.update({name: digest(value) for name, value in arrays.items()})
    return facts


def _run(runner, solver, n_layers: int, facts, program, every_rank: bool = False,
         what: str = "the solve", target=None) -> Any:
    """Run ``program`` on ``runner``'s ranks, each starting with the agreement of the
    module doc: the layout check, and on several ranks ``facts(rank)`` (the rank's
    own checks, if any, then the facts the ranks compare). ``every_rank``: return every
    simulated rank's result (a list), not rank 0's. On the ``"cpu"`` target BLAS is
    held to one thread meanwhile (:func:`ptoc.kernels.single_threaded_blas`)."""

    def check(c: Communicator) -> dict[str, str]:
        check_layout(solver, n_layers, c.size)
        return facts(c.rank) if c.size > 1 else {}
    with (single_threaded_blas(target) if target is not None else contextlib.nullcontext()):
        return run_program(runner, program, check, what, every_rank)


# --- one sweep on one rank ---------------------------------------------------------------------

def _solve_sweep(comm: Communicator, problem: SweepProblem, solver, u0, shape, dtype,
                 guess: dict[int, np.ndarray] | None) -> tuple[Block, SolveResult]:
    """Solve one sweep; returns this rank's positions (ghost included) and the record.

    ``wall_time`` is that of the slowest rank: it is read after the collective that
    gathers the step counts.
    """
    before = comm.step_count()
    t0 = time.perf_counter()
    sweep = "adjoint" if problem.backward else "forward"
    out = solver.solve_sweep(comm, problem, u0, shape, dtype, guess)
    after = comm.step_count()
    wall = time.perf_counter() - t0
    record = SolveResult(method=solver.name, sweep=sweep, residuals=list(out.residuals),
                         iterations=out.iterations, converged=out.converged,
                         steps_total=after.total - before.total,
                         steps_critical_path=after.critical_path - before.critical_path,
                         ranks=comm.size, levels=out.levels, wall_time=wall)
    return out.local, record


# --- the programs -------------------------------------------------------------------------------

def _gather_positions(comm: Communicator, local: Block, owner: np.ndarray,
                      backward: bool) -> np.ndarray:
    """All positions, in layer order (``x_n`` or ``lambda_n`` at index ``n``), on every rank.

    The solvers hand out blocks they no longer write to, so on one rank the block's
    array is returned as it is (state sweep) or reversed into a new one (adjoint).
    """
    mine = np.flatnonzero(owner == comm.rank)
    lo, hi = int(mine[0]), int(mine[-1]) + 1
    if comm.size == 1 and local.base == lo and len(local.values) == hi - lo:
        return local.values[::-1].copy() if backward else local.values
    parts = comm.allgather((lo, local.values[lo - local.base:hi - local.base]))
    first = parts[0][1]
    out = np.empty((len(owner),) + first.shape[1:], first.dtype)
    for start, values in parts:
        out[start:start + len(values)] = values
    return out[::-1].copy() if backward else out


def _bounds(comm, N):
    bounds = partition(N, comm.size)
    return bounds, int(bounds[comm.rank]), int(bounds[comm.rank + 1])


def _forward_program(comm, model, params, X, solver, target, guess, need_all, prop=None):
    """The state sweep on this rank; ``prop`` is this rank's :class:`LayerSlice` (built
    from the full ``params`` when None). Rank 0 also returns the opening's cache."""
    model = as_model(model)
    N = model.n_layers
    bounds, a, b = _bounds(comm, N)
    if prop is None:
        local = {k: params[k][a:b] for k in model.layer_keys}
        prop = LayerSlice(model.layers(local, target=target, span=(a, b)), a, N)
    comm.reset_count()
    x0, opening_cache = model.opening(params, X) if comm.rank == 0 else (None, None)
    problem = SweepProblem(comm, prop, bounds, backward=False)
    g = None if guess is None else {k: guess[k] for k in range(a, b + 1)}
    states, record = _solve_sweep(comm, problem, solver, x0, model.state_shape(X), model.dtype,
                                  g)
    full = _gather_positions(comm, states, problem.owner, False) if need_all else None
    return prop, bounds, problem, states, record, full, opening_cache


def _adjoint_program(comm, model, prop, bounds, states: Block, lam_N, solver, guess):
    """The adjoint sweep from the states ``x_a .. x_b`` of this rank's layers."""
    N = model.n_layers
    a, b = int(bounds[comm.rank]), int(bounds[comm.rank + 1])
    problem = SweepProblem(comm, prop, bounds, backward=True, states=states)
    g = None if guess is None else {N - n: guess[n] for n in range(a, b + 1)}
    lams, record = _solve_sweep(comm, problem, solver, lam_N, states.values.shape[1:],
                                model.dtype, g)
    return problem, lams, record


def _layer_states(a: int, b: int, states: Block) -> np.ndarray:
    """``x_n`` for the layers ``n = a .. b-1`` (a view)."""
    return states.values[a - states.base:b - states.base]


def _next_adjoints(N: int, a: int, b: int, lams: Block) -> np.ndarray:
    """``lambda_{n+1}`` for the layers ``n = a .. b-1``, solver positions ``N - n - 1``
    (a view in layer order, with a negative stride)."""
    first, last = N - 1 - a - lams.base, N - b - lams.base  # rows of n = a and n = b-1
    return lams.values[last:first + 1][::-1]


def _data_gradients(comm, prop, N: int, a: int, b: int, states: Block, lams: Block):
    """The data part of the gradient of this rank's layers ``a..b-1`` (structured as the
    slice's parameters) from ``x_n`` and ``lambda_{n+1}``, counted as ``b - a`` steps."""
    grad = prop.zero_gradient()
    prop.layer_gradients(a, _layer_states(a, b, states), _next_adjoints(N, a, b, lams), grad)
    comm.count(b - a)
    return grad


def _layer_gradients(comm, model, prop, bounds, states: Block, lams: Block):
    """Gradient of this rank's layers (data part and regulariser), structured as the
    slice's parameters, and the regulariser's share."""
    a, b = int(bounds[comm.rank]), int(bounds[comm.rank + 1])
    grad = _data_gradients(comm, prop, model.n_layers, a, b, states, lams)
    return grad, _regulariser_share(comm, model, prop, grad)


def _regulariser_share(comm, model, prop, grad) -> float:
    """This rank's share of the layer regulariser, its gradient added into ``grad``; the
    layers' parameters are those ``prop`` holds, their neighbours' arrive from the
    neighbouring ranks."""
    arrays = prop.parameters()
    if comm.rank > 0:
        comm.send(tuple(p[0] for p in arrays), comm.rank - 1, TAG_BOUNDARY)
    if comm.rank < comm.size - 1:
        comm.send(tuple(p[-1] for p in arrays), comm.rank + 1, TAG_BOUNDARY)
    left = comm.recv(comm.rank - 1, TAG_BOUNDARY) if comm.rank > 0 else None
    right = comm.recv(comm.rank + 1, TAG_BOUNDARY) if comm.rank < comm.size - 1 else None
    return model.layer_regulariser(arrays, left, right, grad)


def _serial_record(comm, sweep: str, n_layers: int, t0: float) -> SolveResult:
    """The record of one serial sweep of ``n_layers`` steps on one rank, started at
    ``t0`` (the steps are counted here)."""
    before = comm.step_count()
    comm.count(n_layers)
    after = comm.step_count()
    return SolveResult(method=Serial.name, sweep=sweep, residuals=[], iterations=1,
                       converged=True, steps_total=after.total - before.total,
                       steps_critical_path=after.critical_path - before.critical_path,
                       ranks=1, levels=None, wall_time=time.perf_counter() - t0)


def _one_rank_serial_gradient(comm, model, params, X, y, target, gather_all, local):
    """:func:`_gradient_program` on one rank with the serial sweep: the propagator's
    :meth:`~ptoc.Propagator.gradient_forward` and
    :meth:`~ptoc.Propagator.gradient_backward` (the adjoint sweep and the layer gradients
    in one pass; the convolutional ResNet keeps ``sigma'`` from the state sweep for it)."""
    N = model.n_layers
    prop = model.layers({k: params[k] for k in model.layer_keys}, target=target, span=(0, N))
    comm.reset_count()
    x0, opening_cache = model.opening(params, X)
    t0 = time.perf_counter()
    states, cache = prop.gradient_forward(np.ascontiguousarray(x0, dtype=model.dtype))
    frecord = _serial_record(comm, "forward", N, t0)
    data_loss, lam_N, terminal_grads = model.terminal(params, states[N], y)
    t0 = time.perf_counter()
    grad = prop.zero_gradient()
    lams = prop.gradient_backward(states, cache, np.ascontiguousarray(lam_N, dtype=model.dtype),
                                  grad)
    arecord = _serial_record(comm, "adjoint", N, t0)
    del cache
    reg = _regulariser_share(comm, model, prop, grad)
    arrays = dict(zip(model.layer_keys, grad, strict=True))
    opening_grads = model.opening_gradient(params, X, lams[0], opening_cache)
    arrays.update({k: np.array(opening_grads[k], dtype=model.dtype) for k in model.opening_keys})
    arrays.update({k: np.array(terminal_grads[k], dtype=model.dtype)
                   for k in model.terminal_keys})
    grads = model.pack(arrays)
    loss = data_loss + reg + model.head_regulariser(params, grads)
    if local:
        return GradientResult(loss, grads, frecord, arecord, layers=(0, N))
    if not gather_all:
        return GradientResult(loss, grads, frecord, arecord)
    return GradientResult(loss, grads, frecord, arecord, states, lams)


def _gradient_program(comm, model, params, X, y, solver, target, guess_states, guess_lams,
                      gather_all=True, local=False):
    """Loss and gradient on this rank. ``local``: the layer arrays of ``params`` hold this
    rank's layers only, and the result keeps them local (no states, this rank's rows
    of the layer gradients)."""
    model = as_model(model)
    if comm.size == 1 and isinstance(solver, Serial):
        return _one_rank_serial_gradient(comm, model, params, X, y, target, gather_all, local)
    N = model.n_layers
    prop = None
    if local:
        _, a, b = _bounds(comm, N)
        prop = LayerSlice(model.layers(params, target=target, span=(a, b)), a, N)
    prop, bounds, fproblem, states, frecord, _, opening_cache = _forward_program(
        comm, model, params, X, solver, target, guess_states, need_all=False, prop=prop)
    last = comm.size - 1
    lam_N = None
    pieces: dict[str, Any] = {}
    if comm.rank == last:
        data_loss, lam_N, terminal_grads = model.terminal(params, states[N], y)
        pieces.update(terminal_grads, data_loss=data_loss)
    aproblem, lams, arecord = _adjoint_program(comm, model, prop, bounds, states, lam_N,
                                               solver, guess_lams)
    layer_grads, reg = _layer_gradients(comm, model, prop, bounds, states, lams)
    pieces.update(rank=comm.rank, reg=reg)
    if not local:
        pieces.update(zip(model.layer_keys, layer_grads, strict=True))
    if comm.rank == 0:  # lambda_0 is solver position N
        pieces.update(model.opening_gradient(params, X, lams[N], opening_cache))
    gathered = comm.allgather(pieces)
    total_reg = 0.0
    for p in gathered:
        total_reg += p["reg"]
    head, tail = gathered[0], gathered[last]

    def own(a):  # gathered arrays are shared read-only between simulated ranks
        return np.array(a, dtype=model.dtype)

    if local:
        arrays = dict(zip(model.layer_keys, layer_grads, strict=True))
    else:
        arrays = {k: np.concatenate([p[k] for p in gathered]) for k in model.layer_keys}
    arrays.update({k: own(head[k]) for k in model.opening_keys})
    arrays.update({k: own(tail[k]) for k in model.terminal_keys})
    grads = model.pack(arrays)
    loss = tail["data_loss"] + total_reg + model.head_regulariser(params, grads)
    if local:
        a, b = int(bounds[comm.rank]), int(bounds[comm.rank + 1])
        return GradientResult(loss, grads, frecord, arecord, layers=(a, b))
    if not gather_all:
        return GradientResult(loss, grads, frecord, arecord)
    full_states = _gather_positions(comm, states, fproblem.owner, False)
    full_lams = _gather_positions(comm, lams, aproblem.owner, True)
    return GradientResult(loss, grads, frecord, arecord, full_states, full_lams)


# --- public entry points --------------------------------------------------------------------------

def parallel_gradient(network: ResNet | Model, params, X, y, solver, *, comm=None,
                      target="cpu", initial_states=None, initial_adjoints=None,
                      keep_states: bool = True) -> GradientResult:
    """Loss and gradient with the state and adjoint sweeps solved by ``solver`` on ranks.

    ``network`` is a :class:`ptoc.ResNet` or any :class:`ptoc.propagator.Model` (the
    program reads the model through that contract only). Inputs must already be
    validated (``ptoc.loss_and_grad`` does it). With
    ``keep_states`` every rank also receives all states and adjoints (for warm starts
    and inspection); without, only the loss, the gradient and the records.
    ``initial_states`` and ``initial_adjoints`` (N+1, S, d) warm-start MGRIT, as
    simultaneous training does (Günther et al. 2020).
    Theory: :doc:`/theory/mgrit`, :doc:`/theory/simultaneous`.

    Locality: rank ``r`` reads only its own layers ``params.K[a:b]``, ``params.b[a:b]``
    (``a, b = partition(N, P)[r:r + 2]``); the coarse weights and the regulariser's
    neighbours from other ranks' layers arrive as messages. The head (``W, mu, K_in,
    b_in``) is read on every rank. Under MPI a process may therefore hold placeholders
    (e.g. zeros) for the other ranks' layers and gets the same result, bit for bit
    (``tests/test_parallel.py::test_a_rank_reads_only_its_own_layers``);
    :func:`local_gradient` takes only this rank's layers in the first place.
    """
    model = as_model(network)
    runner, _ = _runner(solver, comm)
    return _run(runner, solver, model.n_layers, lambda rank: problem_facts(
        model, solver, target, {"inputs X": X, "labels y": y, "initial states": initial_states,
                                "initial adjoints": initial_adjoints}, params),
        lambda c: _gradient_program(c, model, params, X, y, solver, target, initial_states,
                                    initial_adjoints, keep_states), target=target)


def owned_layers(n_layers: int, n_ranks: int, rank: int) -> tuple[int, int]:
    """``(start, stop)``: the residual layers ``start..stop-1`` that rank ``rank`` of
    ``n_ranks`` owns in every layer-parallel solve (contiguous, sizes differing by at
    most one, the larger first: :func:`~ptoc.parallel.partition`)."""
    for name, value in (("n_layers", n_layers), ("n_ranks", n_ranks)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) \
            or not 0 <= rank < n_ranks:
        raise ValueError(f"rank must be an integer in [0, {n_ranks}), got {rank!r}")
    bounds = partition(int(n_layers), int(n_ranks))
    return int(bounds[rank]), int(bounds[rank + 1])


def local_gradient(network: ResNet, params, X, y, solver, *, comm=None, target="cpu"):
    """Loss and gradient on ranks that each hold only their own layers' parameters.

    The memory-distributed form of :func:`parallel_gradient` (Günther et al. 2020,
    section 3: each processor stores the states and weights of its layers only). On
    rank ``r`` of ``P``, ``params.K`` and ``params.b`` hold the layers ``start..stop-1``
    given by ``owned_layers(N, P, r)`` (``stop - start`` rows; row ``n - start`` is layer
    ``n``); the head (``W, mu`` and, with a dense opening, ``K_in, b_in``) is whole on
    every rank. No rank ever holds another rank's layers: the coarse weights and the
    regulariser's neighbours arrive as messages. The loss, the head gradient and the
    solve records are the same on every rank; the layer gradient stays local.

    The results equal :func:`parallel_gradient` with the full parameters, bit for bit.

    Parameters
    ----------
    network : ResNet
    params : Params, dict, or callable
        This rank's slice, or a function ``rank -> slice`` (needed with simulated ranks,
        which all live in one process).
    X : array (S, n_in)
    y : array of int (S,)
        The batch, the same on every rank.
    solver : Serial, Parareal or MGRIT
    comm : None, int, SimulatedRanks or Communicator
        As in :func:`parallel_gradient`; None is one rank (then the slice is everything).
    target : Target or str

    Returns
    -------
    GradientResult or list of GradientResult
        This rank's result, with ``grads.K``, ``grads.b`` of its own layers and
        ``layers = (start, stop)``; no states or adjoints. With simulated ranks, the
        list of every rank's result, in rank order.

    Raises
    ------
    ValueError
        On every rank alike, before any kernel runs, when any rank's slice has a wrong
        key, shape or a non-finite entry: a
        :class:`~ptoc.parallel.RanksDisagreeError` naming the ranks and their messages
        when not every rank has the same fault; also when the ranks disagree on the
        network, the solver, the head parameters or the batch.
    """
    from .._checks import check_inputs
    from ..kernels import Target
    if not isinstance(network, ResNet):
        raise TypeError(f"network must be a ptoc.ResNet, got {type(network).__name__}")
    solver = check_solver(solver)
    X, y = check_inputs(network, X, y)
    if y is None:
        raise ValueError("local_gradient needs the labels y")
    target = Target.parse(target)
    runner, size = _runner(solver, comm)
    if isinstance(runner, SimulatedRanks) and size > 1 and not callable(params):
        raise TypeError("with simulated ranks params must be a function rank -> that rank's "
                        "slice (all ranks live in this process)")
    model = ResNetModel(network)
    slices: dict[int, Params] = {}  # this process's ranks' checked slices

    def facts_of(rank: int) -> dict[str, str]:
        """Check rank ``rank``'s slice (a failure is agreed on, naming the rank), then
        the facts of its problem."""
        mine = params(rank) if callable(params) else params
        slices[rank] = network.check_params(mine, layers=owned_layers(network.depth, size, rank))
        return problem_facts(model, solver, target, {"inputs X": X, "labels y": y},
                              slices[rank])

    def program(c):
        if c.size == 1:  # no agreement on one rank: check the slice here
            facts_of(c.rank)
        return _gradient_program(c, model, slices[c.rank], X, y, solver, target, None, None,
                                 gather_all=False, local=True)

    # simulated ranks: every rank's result, in rank order
    return _run(runner, solver, network.depth, facts_of, program, every_rank=True,
                what="local_gradient", target=target)


def parallel_forward(network: ResNet, params: Params, X, solver, *, comm=None, target="cpu",
                     initial_states=None) -> tuple[np.ndarray, SolveResult]:
    """All states ``x_0..x_N`` (N+1, S, d) from the state sweep solved by ``solver``."""
    model = as_model(network)
    runner, _ = _runner(solver, comm)

    def program(c):
        *_, record, full, _ = _forward_program(c, model, params, X, solver, target,
                                               initial_states, need_all=True)
        return full, record
    return _run(runner, solver, model.n_layers, lambda rank: problem_facts(
        model, solver, target, {"inputs X": X, "initial states": initial_states}, params),
        program, target=target)


def parallel_adjoint(network: ResNet, params: Params, states: np.ndarray, lam_N: np.ndarray,
                     solver, *, comm=None, target="cpu",
                     initial_adjoints=None) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                     SolveResult]:
    """``(lambda (N+1, S, d), grad_K, grad_b, record)``: the adjoint sweep from given states
    solved by ``solver``, and the data part of the layer gradients."""
    model = as_model(network)
    runner, _ = _runner(solver, comm)
    N = model.n_layers

    def program(c):
        bounds, a, b = _bounds(c, N)
        layers = {k: params[k][a:b] for k in model.layer_keys}
        prop = LayerSlice(model.layers(layers, target=target, span=(a, b)), a, N)
        c.reset_count()
        local = Block(a, np.ascontiguousarray(states[a:b + 1]))
        lamN = lam_N if c.rank == c.size - 1 else None
        aproblem, lams, record = _adjoint_program(c, model, prop, bounds, local, lamN,
                                                  solver, initial_adjoints)
        gK, gb = _data_gradients(c, prop, N, a, b, local, lams)
        parts = c.allgather((gK, gb))
        full = _gather_positions(c, lams, aproblem.owner, True)
        return (full, np.concatenate([p[0] for p in parts]),
                np.concatenate([p[1] for p in parts]), record)
    return _run(runner, solver, N, lambda rank: problem_facts(
        model, solver, target, {"states": states, "final adjoint lambda_N": lam_N,
                                "initial adjoints": initial_adjoints}, params), program,
        target=target)


# --- any propagator --------------------------------------------------------------------------

def _check_states_guess(guess, n_positions: int, shape, name: str):
    if guess is None:
        return None
    arr = np.asarray(guess)
    if arr.shape != (n_positions,) + tuple(shape):
        raise ValueError(f"{name} has shape {arr.shape}, expected {(n_positions,) + tuple(shape)}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")
    return arr


def _prepare(prop, solver, comm):
    """``(solver, N, runner)`` for a sweep of ``prop``: the strategy checked, the
    propagator checked for the abilities it needs (the layout is checked on the ranks,
    by :func:`_run`)."""
    solver = check_solver(solver)
    N = int(prop.n_layers)
    solver.check_propagator(prop)
    runner, _ = _runner(solver, comm)
    return solver, N, runner


def solve_states(prop, x0, solver, *, comm=None, initial_guess=None
                 ) -> tuple[np.ndarray, SolveResult]:
    """States ``x_0..x_N`` of any :class:`ptoc.Propagator` by ``solver`` on ranks.

    Every rank calls ``prop.step(n, x)`` for its own layers only. MGRIT and parareal
    with built-in coarse steps also need ``layer_parameters``, ``coarse_step`` and
    ``coarse_adjoint_step`` (see :class:`ptoc.Propagator`).
    Theory: :doc:`/theory/parareal`, :doc:`/theory/mgrit`.

    Returns
    -------
    states : ndarray (N+1, ...)
    record : SolveResult
    """
    solver, N, runner = _prepare(prop, solver, comm)
    x0 = np.asarray(x0)
    guess = _check_states_guess(initial_guess, N + 1, x0.shape, "initial_guess")

    def program(c):
        bounds = partition(N, c.size)
        problem = SweepProblem(c, prop, bounds, backward=False)
        c.reset_count()
        mine = np.flatnonzero(problem.owner == c.rank)
        g = None if guess is None else {int(k): guess[k] for k in range(max(mine[0] - 1, 0),
                                                                       mine[-1] + 1)}
        local, record = _solve_sweep(c, problem, solver, x0 if c.rank == 0 else None,
                                     x0.shape, x0.dtype, g)
        return _gather_positions(c, local, problem.owner, False), record
    return _run(runner, solver, N, lambda rank: problem_facts(
        prop, solver, None, {"initial state x0": x0, "initial guess": guess}), program,
        target=getattr(prop, "target", None))


def solve_adjoints(prop, states, lam_N, solver, *, comm=None, initial_guess=None
                   ) -> tuple[np.ndarray, list[np.ndarray], SolveResult]:
    """Adjoints ``lambda_0..lambda_N`` and the parameter gradient of any
    :class:`ptoc.Propagator`, by ``solver`` on ranks, from given states.

    The adjoint sweep ``lambda_n = Phi_n'(x_n)^T lambda_{n+1}`` runs backward from
    ``lam_N``; the gradient is
    ``sum_n d(lambda_{n+1} . Phi_n(x_n))/d theta_n`` (each rank adds its own layers; the
    parts are gathered). Theory: :doc:`/theory/adjoint`, :doc:`/theory/parareal`,
    :doc:`/theory/mgrit`.

    Returns
    -------
    adjoints : ndarray (N+1, ...)
        ``adjoints[n]`` is ``lambda_n``.
    grad : list of ndarray
        Structure of ``prop.zero_gradient()``.
    record : SolveResult
    """
    solver, N, runner = _prepare(prop, solver, comm)
    states = np.asarray(states)
    lam_N = np.asarray(lam_N)
    if states.shape[0] != N + 1:
        raise ValueError(f"states has {states.shape[0]} entries, expected N+1 = {N + 1}")
    guess = _check_states_guess(initial_guess, N + 1, lam_N.shape, "initial_guess")

    def program(c):
        bounds = partition(N, c.size)
        a, b = int(bounds[c.rank]), int(bounds[c.rank + 1])
        problem = SweepProblem(c, prop, bounds, backward=True,
                               states=Block(a, np.ascontiguousarray(states[a:b + 1])))
        c.reset_count()
        g = None if guess is None else {N - n: guess[n] for n in range(a, b + 1)}
        local, record = _solve_sweep(c, problem, solver,
                                     lam_N if c.rank == c.size - 1 else None, lam_N.shape,
                                     lam_N.dtype, g)
        grad = prop.zero_gradient()
        for n in range(a, b):
            prop.layer_gradient(n, states[n], local[N - n - 1], grad)
        c.count(b - a)
        parts = c.allgather(grad)
        total = [np.zeros_like(p) for p in grad]
        for part in parts:  # each rank filled only its own layers
            for t, p in zip(total, part, strict=True):
                t += p
        full = _gather_positions(c, local, problem.owner, True)
        return full, total, record
    return _run(runner, solver, N, lambda rank: problem_facts(
        prop, solver, None, {"states": states, "final adjoint lambda_N": lam_N,
                             "initial guess": guess}), program,
        target=getattr(prop, "target", None))
