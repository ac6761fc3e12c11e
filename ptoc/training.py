"""The training loop: batches in, method steps, history, checkpoints and outputs out.

:func:`train` knows nothing about what a step does: it calls a
:class:`ptoc.methods.TrainingMethod` (by default :class:`ptoc.methods.GradientMethod`,
an optimiser on ``grad_fn(params, X, y) -> (loss, grads)``, itself by default the
exact serial adjoint :func:`ptoc.loss_and_grad`), so layer-parallel gradients,
Hamiltonian methods and predict-globally-correct-locally plug in unchanged.

Random-number protocol (so a run can be reproduced, also by another program):
one generator ``rng = np.random.default_rng(seed)`` is made at the start. In
mini-batch mode, at the start of every epoch ``e = 1, 2, ...`` (and at no other
time) ``perm = rng.permutation(n_train)`` is drawn; the epoch's batches are
``perm[0:B], perm[B:2B], ...`` in this order, the last one holding the remaining
``n_train mod B`` samples when ``B`` does not divide ``n_train``. In full-batch mode
(``batch_size=None`` or ``>= n_train``) no random number is drawn and every step
uses the training set in its stored order. Nothing else in the loop is random.

Divergence: the method checks the loss and the gradient of each step, and the loop
checks the loss and the new parameters; if any holds NaN or infinity the run stops
at once, keeps the parameters from before that step and reports the epoch and step
in :attr:`TrainResult.reason`. Nothing is raised.

A finite loss can be as meaningless (Adam at a huge learning rate ends with weights
of size ``lr`` and a loss of ``1e11``), so the loop also stops a run whose loss stays
far above where it started: when the loss of ``divergence_patience`` consecutive
steps (default 10) exceeds ``divergence_factor`` (default 100) times the reference
loss, the objective of the run's first step (at the initial parameters, on the first
batch). Well-behaved runs stay far below: Adam on Peaks at ``lr = 1``, far too large,
peaks at about 7 times its initial loss. The run then keeps the parameters of the last
step whose loss was within the bound (they and that step's method state are what
:attr:`TrainResult.params` and ``model.npz`` hold). No checkpoint is written while
the loss is above the bound, and one written just before, of parameters whose loss
then turned out above it, is replaced by the one before it: ``checkpoint.npz`` holds
the last checkpoint of parameters whose loss was measured within the bound.
``divergence_factor=None`` turns the rule off.

Output folder: it is checked (created, written into) before the first step and is
held by one run at a time (:class:`ptoc.io.RunFolderLock`, which takes over the lock
of a killed run with a warning); temporary files a killed run left behind are
deleted when the next run takes the folder.

Checkpoints and resuming: with ``checkpoint_every=k`` the loop writes
``checkpoint.npz`` into the output folder every ``k`` steps and at the end
(atomically, so a run killed at any moment leaves the previous checkpoint intact).
It holds the parameters, the method's state, the generator's state (as it was
before the current epoch's permutation) with the number of that epoch's batches
done, and the history. ``train(..., resume=True)`` redraws the permutation and
continues with the next batch: the final parameters are bitwise those of an
uninterrupted run.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm.auto import tqdm

from . import io as _io
from ._checks import check_inputs, check_positive_int, check_real
from .kernels import Target, backend
from .methods import GradientMethod, TrainingDivergedError, TrainingMethod, group_state, model_loss
from .model import Params, ResNet
from .optim import Adam, Optimizer
from .propagator import Model, ResNetModel, as_model
from .sweeps import accuracy, loss

__all__ = [
    "CHECKPOINT_NAME",
    "HISTORY_COLUMNS",
    "GradFn",
    "History",
    "TrainResult",
    "load_checkpoint",
    "train",
]

#: ``grad_fn(params, X, y) -> (loss, grads)``: objective and gradient on one batch.
GradFn = Callable[[Params, np.ndarray, np.ndarray], tuple[float, Mapping[str, np.ndarray]]]

#: Columns of the per-epoch history, in order.
HISTORY_COLUMNS: tuple[str, ...] = (
    "epoch", "steps", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "time",
)

_INT_COLUMNS = ("epoch", "steps")

#: File name of the checkpoint in a run's output folder.
CHECKPOINT_NAME = "checkpoint.npz"

#: The files a run writes into ``output_dir`` (:func:`train`); a folder that holds any of
#: them holds an earlier run, which a new run replaces only with ``overwrite=True``.
RUN_OUTPUTS = (CHECKPOINT_NAME, "model.npz", "history.json", "history.csv", "training.png")
CHECKPOINT_FORMAT = "ptoc-checkpoint"
CHECKPOINT_VERSION = 1


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@dataclass
class History(Sequence):
    """Per-epoch record of a training run: a sequence of dicts with :data:`HISTORY_COLUMNS`.

    Keys of each record:

    ``epoch``
        Epoch number, from 1.
    ``steps``
        Optimiser steps taken so far (cumulative).
    ``train_loss``
        Mean over the epoch's mini-batches of the objective ``J`` (loss plus
        regulariser) of each batch, at the parameters before that batch's step.
    ``train_accuracy``, ``val_loss``, ``val_accuracy``
        Accuracy on the full training set, objective and accuracy on the full
        validation set, at the end of the epoch; evaluated every ``eval_every``
        epochs and at the last one, NaN otherwise (and NaN for ``val_*`` without
        validation data).
    ``time``
        Wall-clock seconds since the start of training (of the first run, for a
        resumed one).

    A training method may add columns of its own after these (e.g.
    ``nonzero_fraction`` for discrete weights, :meth:`ptoc.methods.TrainingMethod.metrics`).
    """

    records: list[dict[str, Any]] = field(default_factory=list)

    def __getitem__(self, i):  # type: ignore[override]
        return self.records[i]

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.records)

    @property
    def columns(self) -> tuple[str, ...]:
        """:data:`HISTORY_COLUMNS`, then any method-specific columns in order of appearance."""
        extra: dict[str, None] = {}
        for r in self.records:
            extra.update((k, None) for k in r if k not in HISTORY_COLUMNS)
        return HISTORY_COLUMNS + tuple(extra)

    def append(self, record: Mapping[str, Any]) -> None:
        """Add one epoch's record (missing standard columns become NaN; extra keys are kept)."""
        row = {k: record.get(k, math.nan) for k in HISTORY_COLUMNS}
        row.update((k, v) for k, v in record.items() if k not in HISTORY_COLUMNS)
        self.records.append(row)

    def column(self, name: str) -> np.ndarray:
        """One column as a float array (NaN where not evaluated)."""
        if name not in self.columns:
            raise KeyError(f"unknown history column {name!r}; columns are {self.columns}")
        return np.array([float(r.get(name, math.nan)) for r in self.records], dtype=float)

    def to_list(self) -> list[dict[str, Any]]:
        """Records as plain dicts with NaN replaced by None (valid JSON)."""
        cols = self.columns
        return [{k: _nan_to_none(r.get(k, math.nan)) for k in cols} for r in self.records]

    def save_json(self, path: str | os.PathLike) -> Path:
        """Write the records as a JSON list of objects (NaN as ``null``)."""
        return _io.atomic_write_text(path, json.dumps(self.to_list(), indent=1) + "\n")

    def save_csv(self, path: str | os.PathLike) -> Path:
        """Write a CSV file with a header row of :data:`HISTORY_COLUMNS` (NaN as empty field).

        Floats are written with Python's round-trip ``repr``.
        """
        cols = self.columns
        text = io.StringIO(newline="")
        writer = csv.writer(text)
        writer.writerow(cols)
        for r in self.records:
            writer.writerow(["" if v is None else repr(v) for v in
                             (_nan_to_none(r.get(k, math.nan)) for k in cols)])
        return _io.atomic_write_text(path, text.getvalue())

    @classmethod
    def load_json(cls, path: str | os.PathLike) -> History:
        """Read a file written by :meth:`save_json` (``null`` back to NaN)."""
        return cls.load_json_records(json.loads(Path(path).read_text(encoding="utf-8")))

    @classmethod
    def load_json_records(cls, rows: Sequence[Mapping[str, Any]]) -> History:
        """From records as :meth:`to_list` gives them (``None`` back to NaN)."""
        history = cls()
        for r in rows:
            history.append({k: (math.nan if v is None else v) for k, v in r.items()})
        return history


@dataclass
class TrainResult:
    """Outcome of :func:`train`.

    Attributes
    ----------
    params : Params
        Final parameters: after the last step, or after the last good step when the
        run diverged or was stopped.
    best_params : Params or None
        Parameters at the end of the evaluated epoch with the highest validation
        accuracy (ties: the earlier epoch); None when nothing was evaluated or there
        is no validation data. Only ``params`` is written to ``model.npz``.
    best_epoch : int or None
        Epoch of ``best_params``.
    history : History
        One record per completed epoch.
    optimizer_state : object
        State of the training method that goes with ``params`` (for the gradient
        method: the optimiser's state).
    steps : int
        Optimiser steps taken (good ones).
    epochs : int
        Epochs completed.
    stopped_early : bool
        True when the run ended before ``epochs`` epochs: divergence, a callback
        asking to stop, or ``KeyboardInterrupt``.
    reason : str or None
        Why it stopped early (names the epoch and step), None otherwise.
    diverged : bool
        True when it stopped because of a non-finite loss, gradient or update.
    wall_time : float
        Seconds for the whole call.
    train_loss, train_accuracy, val_loss, val_accuracy : float
        ``J`` and accuracy of ``params`` on the full training and validation sets
        (NaN for validation without validation data).
    outputs : dict of str to Path
        Files written (keys ``"model"``, ``"history_json"``, ``"history_csv"``,
        ``"plot"``, and ``"checkpoint"`` with ``checkpoint_every``); empty without
        ``output_dir``.
    method : TrainingMethod or None
        The method that made the steps.
    """

    params: Params
    best_params: Params | None
    best_epoch: int | None
    history: History
    optimizer_state: Any
    steps: int
    epochs: int
    stopped_early: bool
    reason: str | None
    diverged: bool
    wall_time: float
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    outputs: dict[str, Path] = field(default_factory=dict)
    method: TrainingMethod | None = None


def _all_finite(params: Mapping[str, np.ndarray]) -> bool:
    return all(bool(np.all(np.isfinite(v))) for v in params.values())


def _progress_disable(progress: bool | str) -> bool | None:
    if progress == "force":
        return False
    if progress is True:
        return None  # tqdm: shown only when its stream is a terminal
    if progress is False:
        return True
    raise ValueError(f"progress must be True, False or 'force', got {progress!r}")


def _fingerprint(data: Any) -> str:
    """SHA-256 of the training and validation arrays (shapes, dtypes and bytes)."""
    h = hashlib.sha256()
    for attr in ("X_train", "y_train", "X_val", "y_val"):
        a = np.ascontiguousarray(getattr(data, attr))
        h.update(f"{attr}{a.shape}{a.dtype.str}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


@dataclass
class _Progress:
    """Where a run stands: everything :func:`train` needs to continue it exactly.

    ``epoch_rng`` and ``next_batch`` describe the epoch in progress (``epochs_done +
    1``): the shuffling generator's state *before* that epoch's permutation was drawn
    and the number of its batches already done. ``next_batch == 0`` means the epoch has
    not started; ``rng`` is then the generator's current state.
    """

    epochs_done: int = 0
    steps: int = 0
    next_batch: int = 0
    batch_losses: list[float] = field(default_factory=list)
    epoch_rng: dict[str, Any] | None = None
    rng: dict[str, Any] | None = None
    history: History = field(default_factory=History)
    best_params: Params | None = None
    best_epoch: int | None = None
    best_acc: float = -math.inf
    elapsed: float = 0.0
    reference_loss: float | None = None


def _checkpoint_bytes(network: ResNet | Model, method: TrainingMethod, params: Params, state: Any,
                      run: _Progress, identity: dict[str, Any]) -> bytes:
    """The content of ``checkpoint.npz`` for this point of the run."""
    entries: dict[str, Any] = {f"params.{k}": v for k, v in params.items()}
    if run.best_params is not None:
        entries.update({f"best.{k}": v for k, v in run.best_params.items()})
    for k, v in method.state_dict(state).items():
        if v is not None:
            entries[f"state.{k}"] = np.asarray(v)
    meta = dict(identity)
    meta.update(
        format=CHECKPOINT_FORMAT, format_version=CHECKPOINT_VERSION,
        epochs_done=run.epochs_done, steps=run.steps, next_batch=run.next_batch,
        batch_losses=[float(v) for v in run.batch_losses], epoch_rng=run.epoch_rng,
        rng=run.rng, history=run.history.to_list(), best_epoch=run.best_epoch,
        best_acc=None if not math.isfinite(run.best_acc) else run.best_acc,
        elapsed=run.elapsed, reference_loss=run.reference_loss,
    )
    entries["meta"] = np.array(json.dumps(meta, allow_nan=False))
    buffer = io.BytesIO()
    np.savez(buffer, **entries)
    return buffer.getvalue()


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint written by :func:`train` (``checkpoint_every``).

    Returns
    -------
    dict
        ``meta`` (the JSON record: network, method, batch size, seed, data
        fingerprint, epochs and steps done, shuffling state, history), ``params``,
        ``best_params`` (or None) and ``state`` (the method's flat state dict).

    Raises
    ------
    FileNotFoundError
        If there is no file at ``path``.
    ValueError
        If the file is not a ptoc checkpoint, is corrupt (empty, truncated, altered
        bytes; the message names the file) or has another format version.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}")
    d = _io.read_npz(path, "ptoc checkpoint")
    if "meta" not in d:
        raise ValueError(f"{str(path)!r} is not a ptoc checkpoint (no 'meta' entry)")
    try:
        meta = json.loads(str(d["meta"]))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{str(path)!r} is not a ptoc checkpoint or is corrupt: its 'meta' "
                         f"entry is not JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{str(path)!r} is not a ptoc checkpoint")
    if meta.get("format_version") != CHECKPOINT_VERSION:
        raise ValueError(f"{str(path)!r} has checkpoint format version "
                         f"{meta.get('format_version')}; this ptoc reads version "
                         f"{CHECKPOINT_VERSION}")
    best = group_state(d, "best")
    return {"meta": meta, "params": group_state(d, "params"),
            "best_params": best or None, "state": group_state(d, "state")}


def _checked_params(network: ResNet | Model, arrays: Mapping[str, np.ndarray]) -> Any:
    """Parameters read from a checkpoint, validated by the network (a ResNet's as
    :class:`Params`, another model's as its ``check_params`` returns them)."""
    if isinstance(network, ResNet):
        return network.check_params(Params.from_dict(arrays))
    return network.check_params(dict(arrays))


def _copy_params(params: Mapping[str, np.ndarray]) -> Any:
    """A deep copy of ``params`` (a :class:`Params` or a dict of arrays)."""
    if isinstance(params, Params):
        return params.copy()
    return {k: np.array(v, copy=True) for k, v in params.items()}


def _network_description(network: ResNet | Model) -> dict[str, Any]:
    """:func:`ptoc.io.network_to_dict` of ``network``, with an error that says why a
    run with an output folder needs it."""
    try:
        return _io.network_to_dict(network)
    except TypeError as exc:
        raise TypeError(f"output_dir (model.npz and checkpoints) needs a network that "
                        f"ptoc.io can describe: {exc}") from None


def _restore(ckpt: dict[str, Any], identity: dict[str, Any], network: ResNet | Model,
             method: TrainingMethod, epochs: int, path: Path) -> tuple[Params, Any, _Progress]:
    meta = ckpt["meta"]
    for key, what in (("network", "network"), ("method", "training method and its options"),
                      ("batch_size", "batch size"), ("seed", "seed"),
                      ("data", "data set (its arrays differ)"), ("eval_every", "eval_every")):
        if meta.get(key) != identity[key]:
            raise ValueError(f"cannot resume from {str(path)!r}: the {what} differs from the "
                             f"run that wrote it ({meta.get(key)!r} there, {identity[key]!r} "
                             "here)")
    try:
        if meta["epochs_done"] > epochs:
            raise ValueError(f"cannot resume from {str(path)!r}: it has done "
                             f"{meta['epochs_done']} epochs, more than epochs={epochs}")
        params = _checked_params(network, ckpt["params"])
        state = method.load_state(ckpt["state"], network, params)
        history = History.load_json_records(meta["history"])
        best = ckpt["best_params"]
        run = _Progress(
            epochs_done=meta["epochs_done"], steps=meta["steps"], next_batch=meta["next_batch"],
            batch_losses=list(meta["batch_losses"]), epoch_rng=meta["epoch_rng"],
            rng=meta["rng"], history=history,
            best_params=None if best is None else _checked_params(network, best),
            best_epoch=meta["best_epoch"],
            best_acc=-math.inf if meta["best_acc"] is None else meta["best_acc"],
            elapsed=meta["elapsed"], reference_loss=meta.get("reference_loss"))
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{str(path)!r} is a damaged ptoc checkpoint: an entry is missing or "
                         f"has the wrong type ({type(exc).__name__}: {exc})") from None
    return params, state, run


def train(
    network: ResNet | Model,
    params: Params | Mapping[str, np.ndarray],
    data: Any,
    *,
    method: TrainingMethod | None = None,
    optimizer: Optimizer | None = None,
    epochs: int = 100,
    batch_size: int | None = 50,
    target: Target | str = Target.CPU,
    seed: int = 0,
    grad_fn: GradFn | None = None,
    eval_every: int = 1,
    output_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool | Literal["force"] = True,
    callback: Callable[[dict[str, Any], Params], bool | None] | None = None,
    divergence_factor: float | None = 100.0,
    divergence_patience: int = 10,
) -> TrainResult:
    """Train ``network`` from ``params`` on ``data``, one ``method`` step per batch.

    Parameters
    ----------
    network : ResNet or ptoc.propagator.Model
        A ResNet (its compiled sweeps) or any model of the contract, e.g. a
        :class:`ptoc.layered.LayeredNetwork` (read through :func:`ptoc.propagator.as_model`:
        the evaluations are its opening, layers and terminal objective, and its
        accuracy is its own ``accuracy(params, X, y)`` method, NaN when it has none).
        With ``output_dir`` it must be of a kind :mod:`ptoc.io` can describe
        (:data:`ptoc.io.MODEL_KINDS`); a :class:`ptoc.propagator.ResNetModel` is trained
        as its ResNet.
    params : Params or dict of arrays
        Initial parameters (not modified), e.g. ``network.init_params(seed)``.
        Ignored when resuming (the checkpoint's are used).
    data : ptoc.data.Dataset
        Anything with ``X_train, y_train, X_val, y_val`` (the validation set may be
        empty).
    method : TrainingMethod, optional
        What a step does (:mod:`ptoc.methods`): e.g. :class:`ptoc.methods.GradientMethod`,
        MSA, PGCL. Default: ``GradientMethod(optimizer, grad_fn, target)``. Give either
        ``method`` or ``optimizer``/``grad_fn``, not both.
    optimizer : Optimizer, optional
        For the default gradient method: :class:`ptoc.optim.Adam`,
        :class:`~ptoc.optim.SGD` or :class:`~ptoc.optim.LBFGS`; default
        ``Adam(lr=3e-3)`` (with ``epochs=100``, ``batch_size=50``, the setting of
        ``ptoc train``, tuned on Peaks).
    epochs : int
        Passes over the training set (in all, counting those of a resumed run).
    batch_size : int or None
        Samples per step; None, or a value ``>= n_train``, means full batch.
    target : Target or str
        Kernel target of the default ``grad_fn`` and of the evaluations.
    seed : int
        Seed of the shuffling generator (see the module docstring for the protocol).
    grad_fn : callable, optional
        For the default gradient method: ``grad_fn(params, X, y) -> (loss, grads)`` on
        one batch; default ``ptoc.loss_and_grad(network, params, X, y, target=target)``.
    eval_every : int
        Evaluate training accuracy and validation loss and accuracy every this many
        epochs (and always after the last one).
    output_dir : str or path-like, optional
        If given (created if needed): write ``model.npz`` (:func:`ptoc.io.save_model`,
        the final or last good parameters), ``history.json``, ``history.csv`` and
        ``training.png`` (:func:`ptoc.plotting.plot_history`) at the end, also after
        divergence or interruption. Under MPI (a method on
        :class:`ptoc.parallel.MPIRanks`) only rank 0 writes (and shows progress); the
        others compute the same result (:attr:`TrainingMethod.writes_files`).
    checkpoint_every : int, optional
        Write ``output_dir/checkpoint.npz`` (atomically: a temporary file, then a
        rename) every this many steps, and at the end of the run (also after
        divergence or interruption, with the last good state). It holds the
        parameters, the method's state, the shuffling generator's state and the
        history: everything needed to continue bit for bit.
    resume : bool
        Continue the run whose checkpoint is in ``output_dir``: the network, method,
        batch size, seed, ``eval_every`` and data must be those of that run (else
        ValueError); ``epochs`` may be larger. The result then equals, bit for bit,
        that of a run never interrupted (the ``time`` column aside).
    overwrite : bool
        Start a new run in an ``output_dir`` that holds an earlier run's files
        (:data:`RUN_OUTPUTS`), replacing them. Without it (and without ``resume``) such a
        folder is refused before any work, so that an earlier run is never overwritten
        by mistake.
    progress : bool or "force"
        True: a tqdm bar over epochs on stderr, shown only when stderr is a terminal;
        False: none; ``"force"``: always.
    callback : callable, optional
        ``callback(record, params)`` after every epoch, with the epoch's history
        record and the current parameters; a truthy return stops training
        (``stopped_early=True``).
    divergence_factor : float or None
        The run diverges when the loss of ``divergence_patience`` consecutive steps
        exceeds this factor (``>= 1``) times the loss of its first step (see the module
        docstring); None turns the rule off (a non-finite loss still stops the run).
    divergence_patience : int
        That number of consecutive steps (``>= 1``).

    Returns
    -------
    TrainResult

    Raises
    ------
    ValueError
        For invalid arguments, data that do not fit the network, an ``output_dir``
        that cannot be created or written into, or a checkpoint that belongs to
        another run or is corrupt (the message names the file).
    FileNotFoundError
        When resuming and ``output_dir`` holds no checkpoint.
    FileExistsError
        When ``output_dir`` holds an earlier run and neither ``resume`` nor
        ``overwrite`` is given (the message names its files).
    ptoc.io.RunFolderInUseError
        When another running process holds ``output_dir``.
    ImportError
        When ``target`` is not available (e.g. ``"cuda"`` without a GPU).

    Notes
    -----
    A non-finite loss, gradient or updated parameter stops the run without raising
    (see the module docstring); check :attr:`TrainResult.diverged`. A
    ``KeyboardInterrupt`` also ends the run gracefully with the last good parameters
    and ``stopped_early=True``.

    Examples
    --------
    >>> import ptoc
    >>> from ptoc.training import train
    >>> data = ptoc.data.peaks(n_per_class=20, n_val_per_class=4, grid=64)
    >>> net = ptoc.ResNet(width=4, depth=4, n_in=2, n_classes=5)
    >>> res = train(net, net.init_params(0), data, epochs=2, batch_size=25, progress=False)
    >>> len(res.history), res.steps
    (2, 8)
    """
    t_start = time.perf_counter()
    if isinstance(network, ResNetModel):
        network = network.network
    as_model(network)  # TypeError for anything that is neither a ResNet nor a Model
    is_resnet = isinstance(network, ResNet)
    if method is not None:
        if optimizer is not None or grad_fn is not None:
            raise ValueError("give either method= or optimizer=/grad_fn= (the gradient "
                             "method's parts), not both")
        if not isinstance(method, TrainingMethod):
            raise TypeError(f"method must be a ptoc.methods.TrainingMethod, got "
                            f"{type(method).__name__}")
    else:
        if optimizer is None:
            optimizer = Adam(lr=3e-3)
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a ptoc.optim optimiser (Adam, SGD, LBFGS), "
                            f"got {type(optimizer).__name__}")
        if grad_fn is not None and not callable(grad_fn):
            raise TypeError("grad_fn must be callable: grad_fn(params, X, y) -> (loss, grads)")
        method = GradientMethod(optimizer, grad_fn, target)
    params = network.check_params(params)
    epochs = check_positive_int("epochs", epochs)
    eval_every = check_positive_int("eval_every", eval_every)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    checkpoint_every = check_positive_int("checkpoint_every", checkpoint_every,
                                          allow_none=True)
    if (checkpoint_every is not None or resume) and output_dir is None:
        raise ValueError("checkpoint_every and resume need output_dir (where the "
                         "checkpoint lives)")
    if resume and overwrite:
        raise ValueError("resume continues the run in output_dir and overwrite replaces it: "
                         "give one of them")
    if divergence_factor is not None:
        divergence_factor = check_real("divergence_factor", divergence_factor, low=1.0)
    divergence_patience = check_positive_int("divergence_patience", divergence_patience)
    disable = _progress_disable(progress)
    writer = method.writes_files  # False on MPI ranks other than 0: they compute, not write
    if not writer:
        disable = True
    target = Target.parse(target)
    backend(target)  # fail early (ImportError) when the target is unavailable
    for attr in ("X_train", "y_train", "X_val", "y_val"):
        if not hasattr(data, attr):
            raise TypeError(f"data must have X_train, y_train, X_val, y_val (a "
                            f"ptoc.data.Dataset); it has no {attr!r}")
    inputs = (functools.partial(check_inputs, network) if is_resnet
              else _model_inputs(network))
    X, y = inputs(data.X_train, data.y_train)
    has_val = np.shape(data.X_val)[0] > 0
    if has_val:
        X_val, y_val = inputs(data.X_val, data.y_val)
    n = X.shape[0]
    B = check_positive_int("batch_size", batch_size, allow_none=True)
    full_batch = B is None or B >= n
    out_dir = None if output_dir is None else Path(output_dir)
    ckpt_path = None if out_dir is None else out_dir / CHECKPOINT_NAME
    description = None if out_dir is None else _network_description(network)
    folder_lock: AbstractContextManager = nullcontext()
    if out_dir is not None and writer:
        if resume and not ckpt_path.is_file():
            raise FileNotFoundError(f"no checkpoint at {str(ckpt_path)!r}")
        if not resume and not overwrite:
            earlier = [name for name in RUN_OUTPUTS if (out_dir / name).exists()]
            if earlier:
                raise FileExistsError(
                    f"output_dir {str(out_dir)!r} holds an earlier run ({', '.join(earlier)}); "
                    "continue it with resume=True, choose another folder, or pass "
                    "overwrite=True to replace it")
        _io.prepare_output_dir(out_dir, "output_dir")
        folder_lock = _io.RunFolderLock(out_dir)
    with folder_lock:
        if isinstance(folder_lock, _io.RunFolderLock):
            if folder_lock.taken_over_from is not None:
                warnings.warn(f"took over the run folder {str(out_dir)!r} from process "
                              f"{folder_lock.taken_over_from}, which no longer runs",
                              RuntimeWarning, stacklevel=2)
            _io.remove_stale_temporaries(out_dir)
        identity = {"network": description,
                    "method": json.loads(json.dumps(method.config(), default=_io._json_default)),
                    "batch_size": None if full_batch else B, "seed": int(seed),
                    "eval_every": eval_every, "data": _fingerprint(data)}
        rng = np.random.default_rng(int(seed))
        if resume:
            assert ckpt_path is not None
            params, state, run = _restore(load_checkpoint(ckpt_path), identity, network, method,
                                          epochs, ckpt_path)
            if run.rng is not None:
                rng.bit_generator.state = run.rng
        else:
            state = method.init(network, params)
            run = _Progress()
        t_offset = run.elapsed - t_start
        reason: str | None = None
        diverged = False

        model_eval = method.evaluator()

        def evaluate(p: Params) -> tuple[float, float, float]:
            if model_eval is not None:
                train_acc = model_eval(p, X, y)[1]
                return (train_acc, *model_eval(p, X_val, y_val)) if has_val \
                    else (train_acc, math.nan, math.nan)
            if not is_resnet:
                train_acc = _model_accuracy(network, p, X, y)
                if not has_val:
                    return train_acc, math.nan, math.nan
                return (train_acc, model_loss(network, p, X_val, y_val, target=target),
                        _model_accuracy(network, p, X_val, y_val))
            train_acc = accuracy(network, p, X, y, target=target)
            if not has_val:
                return train_acc, math.nan, math.nan
            return (train_acc, loss(network, p, X_val, y_val, target=target),
                    accuracy(network, p, X_val, y_val, target=target))

        # The divergence rule: the parameters, method state and step count of the last step
        # whose loss was within the bound, and how many steps since were above it.
        last_good: tuple[Params, Any, int] = (params, state, run.steps)
        steps_above = 0
        # Whether the current epoch's permutation has been drawn (a checkpoint with
        # next_batch == 0 must then hold the generator's state from before the draw).
        permutation_drawn = False
        # (steps, bytes) of the last two checkpoints written, newest last: the newest may
        # hold parameters whose loss the next steps measure above the bound.
        written: list[tuple[int, bytes]] = []
        if resume and writer:
            written.append((run.steps, ckpt_path.read_bytes()))

        def checkpoint() -> None:
            """Write the checkpoint of the current parameters (not while the loss is
            above the divergence bound)."""
            if checkpoint_every is None or ckpt_path is None or not writer or steps_above:
                return
            if run.next_batch == 0:
                run.rng = (run.epoch_rng if permutation_drawn and run.epoch_rng is not None
                           else rng.bit_generator.state)
            run.elapsed = time.perf_counter() + t_offset
            content = _checkpoint_bytes(network, method, params, state, run, identity)
            _io.atomic_write(ckpt_path, lambda f: f.write(content))
            written[:] = [*written[-1:], (run.steps, content)]

        def keep_last_good_checkpoint() -> None:
            """After a divergence: put back the checkpoint before the newest when the newest
            holds parameters measured above the bound (none left: no checkpoint)."""
            if not written or written[-1][0] <= last_good[2]:
                return
            if len(written) == 2:
                _io.atomic_write(ckpt_path, lambda f: f.write(written[0][1]))
            else:
                ckpt_path.unlink(missing_ok=True)

        bar = tqdm(total=epochs, initial=run.epochs_done, desc="training", unit="epoch",
                   disable=disable, file=sys.stderr, dynamic_ncols=True)
        try:
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                for epoch in range(run.epochs_done + 1, epochs + 1):
                    if run.next_batch == 0:
                        run.epoch_rng = None if full_batch else rng.bit_generator.state
                        run.batch_losses = []
                    elif run.epoch_rng is not None:
                        rng.bit_generator.state = run.epoch_rng  # redraw the epoch's permutation
                    if full_batch:
                        batches: list[np.ndarray | None] = [None]
                    else:
                        perm = rng.permutation(n)
                        batches = [perm[i:i + B] for i in range(0, n, B)]
                    permutation_drawn = True
                    for bi in range(run.next_batch, len(batches)):
                        idx = batches[bi]
                        Xb, yb = (X, y) if idx is None else (X[idx], y[idx])
                        where = (f"epoch {epoch}, step {run.steps + 1} "
                                 f"(batch {bi + 1} of {len(batches)})")
                        try:
                            outcome = method.step(network, params, state, Xb, yb)
                            bad = None
                            if not math.isfinite(outcome.loss):
                                bad = f"non-finite loss ({outcome.loss})"
                            elif not _all_finite(outcome.params):
                                bad = "non-finite parameters after the update"
                        except TrainingDivergedError as exc:
                            bad = str(exc)
                        if bad is None and divergence_factor is not None:
                            if run.reference_loss is None:
                                run.reference_loss = float(outcome.loss)
                            bound = divergence_factor * run.reference_loss
                            if outcome.loss > bound:
                                steps_above += 1
                                if steps_above >= divergence_patience:
                                    bad = (f"the loss exceeded {divergence_factor:g} times the "
                                           f"first step's ({run.reference_loss:.4g}) at "
                                           f"{steps_above} consecutive steps (now "
                                           f"{outcome.loss:.4g})")
                            else:
                                steps_above = 0
                                last_good = (params, state, run.steps)
                        if bad is not None:
                            diverged = True
                            if steps_above:
                                params, state, good_steps = last_good
                                if writer and ckpt_path is not None:
                                    keep_last_good_checkpoint()
                            else:
                                good_steps = run.steps
                            reason = (f"training diverged: {bad} at {where}; kept the parameters "
                                      f"after step {good_steps}")
                            break
                        params, state = outcome.params, outcome.state
                        run.steps += 1
                        run.next_batch = bi + 1
                        run.batch_losses.append(float(outcome.loss))
                        if checkpoint_every is not None and run.steps % checkpoint_every == 0:
                            checkpoint()
                    if diverged:
                        break
                    record: dict[str, Any] = {
                        "epoch": epoch,
                        "steps": run.steps,
                        "train_loss": float(np.mean(run.batch_losses)),
                    }
                    if epoch % eval_every == 0 or epoch == epochs:
                        tr_acc, v_loss, v_acc = evaluate(params)
                        record.update(train_accuracy=tr_acc, val_loss=v_loss, val_accuracy=v_acc)
                        if has_val and v_acc > run.best_acc:
                            run.best_acc, run.best_epoch = v_acc, epoch
                            run.best_params = _copy_params(params)
                    record.update(method.metrics(network, params, state))
                    record["time"] = time.perf_counter() + t_offset
                    run.history.append(record)
                    run.epochs_done, run.next_batch, run.batch_losses = epoch, 0, []
                    permutation_drawn = False
                    post = {"loss": f"{record['train_loss']:.4f}"}
                    if "train_accuracy" in record:
                        post["acc"] = f"{record['train_accuracy']:.3f}"
                        if has_val:
                            post["val_acc"] = f"{record['val_accuracy']:.3f}"
                    bar.set_postfix(post, refresh=False)
                    bar.update(1)
                    if callback is not None and callback(run.history[-1], params):
                        if epoch < epochs:
                            reason = (f"stopped by the callback after epoch {epoch}, "
                                      f"step {run.steps}")
                        break
        except KeyboardInterrupt:
            reason = (f"interrupted (KeyboardInterrupt) during epoch {run.epochs_done + 1}; kept "
                      f"the parameters after step {run.steps}")
        finally:
            bar.close()
        checkpoint()

        tr_acc, v_loss, v_acc = evaluate(params)
        if model_eval is not None:
            tr_loss = model_eval(params, X, y)[0]
        elif is_resnet:
            tr_loss = loss(network, params, X, y, target=target)
        else:
            tr_loss = model_loss(network, params, X, y, target=target)
        result = TrainResult(
            params=params,
            best_params=run.best_params,
            best_epoch=run.best_epoch,
            history=run.history,
            optimizer_state=state,
            steps=last_good[2] if diverged and steps_above else run.steps,
            epochs=run.epochs_done,
            stopped_early=reason is not None,
            reason=reason,
            diverged=diverged,
            wall_time=math.nan,
            train_loss=tr_loss,
            train_accuracy=tr_acc,
            val_loss=v_loss,
            val_accuracy=v_acc,
            method=method,
        )
        if out_dir is not None and writer:
            result.outputs = _write_outputs(out_dir, network, result, method, data,
                                            batch_size=None if full_batch else B,
                                            seed=int(seed))
            if checkpoint_every is not None and ckpt_path is not None:
                result.outputs["checkpoint"] = ckpt_path
        result.wall_time = time.perf_counter() - t_start
        return result


def _write_outputs(out_dir: Path, network: ResNet | Model, result: TrainResult,
                   method: TrainingMethod, data: Any, *, batch_size: int | None,
                   seed: int) -> dict[str, Path]:
    from .plotting import plot_history

    extra = {
        "data": getattr(data, "name", None),
        "method": method.config(),
        "batch_size": batch_size,
        "seed": seed,
        "epochs": result.epochs,
        "steps": result.steps,
        "stopped_early": result.stopped_early,
        "diverged": result.diverged,
        "reason": result.reason,
        "train_loss": _nan_to_none(result.train_loss),
        "train_accuracy": _nan_to_none(result.train_accuracy),
        "val_loss": _nan_to_none(result.val_loss),
        "val_accuracy": _nan_to_none(result.val_accuracy),
    }
    if isinstance(method, GradientMethod):
        extra["optimizer"] = method.optimizer.config()
    outputs = {"model": _io.save_model(out_dir / "model.npz", network, result.params, extra)}
    outputs["history_json"] = result.history.save_json(out_dir / "history.json")
    outputs["history_csv"] = result.history.save_csv(out_dir / "history.csv")
    title = f"{getattr(data, 'name', 'data')}: {describe_network(network)}"
    outputs["plot"] = plot_history(result.history, out_dir / "training.png", title=title)
    return outputs


def describe_network(network: ResNet | Model) -> str:
    """A one-line description of ``network`` for headers and plot titles: its own
    ``describe()`` when it has one (a ResNet), else its ``repr``."""
    own = getattr(network, "describe", None)
    return own() if callable(own) else repr(network)


def _model_inputs(model: Model) -> Callable[[Any, Any], tuple[np.ndarray, np.ndarray]]:
    """``inputs(X, labels)``: the model's ``check_inputs``, with the labels as an array
    (the batches index them)."""
    def inputs(X, labels):
        X, labels = model.check_inputs(X, labels)
        return X, np.asarray(labels)
    return inputs


def _model_accuracy(network: Model, params: Mapping[str, np.ndarray], X: np.ndarray,
                    y: np.ndarray) -> float:
    """The model's own ``accuracy(params, X, y)`` (a classifier's), NaN when it has none:
    the :class:`ptoc.propagator.Model` contract has a loss but no notion of a class."""
    own = getattr(network, "accuracy", None)
    return float(own(params, X, y)) if callable(own) else math.nan
