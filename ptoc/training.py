"""Mini-batch training loop: gradients in, optimiser steps, history and outputs out.

:func:`train` knows nothing about how a gradient is computed: it calls
``grad_fn(params, X, y) -> (loss, grads)``, by default the exact serial adjoint
:func:`ptoc.loss_and_grad`, so layer-parallel gradient methods plug in unchanged.

Random-number protocol (so a run can be reproduced, also by another program):
one generator ``rng = np.random.default_rng(seed)`` is made at the start. In
mini-batch mode, at the start of every epoch ``e = 1, 2, ...`` (and at no other
time) ``perm = rng.permutation(n_train)`` is drawn; the epoch's batches are
``perm[0:B], perm[B:2B], ...`` in this order, the last one holding the remaining
``n_train mod B`` samples when ``B`` does not divide ``n_train``. In full-batch mode
(``batch_size=None`` or ``>= n_train``) no random number is drawn and every step
uses the training set in its stored order. Nothing else in the loop is random.

Divergence: before every update the loss and the gradient are checked; if either
holds NaN or infinity (or the update would produce non-finite parameters) the run
stops at once, keeps the parameters from before that step and reports the epoch
and step in :attr:`TrainResult.reason`. Nothing is raised.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm.auto import tqdm

from . import io as _io
from ._validate import check_inputs, check_positive_int
from .kernels import Target, backend
from .model import Params, ResNet
from .optim import Adam, Optimizer
from .sweeps import accuracy, loss, loss_and_grad

__all__ = [
    "HISTORY_COLUMNS",
    "GradFn",
    "History",
    "TrainResult",
    "train",
]

#: ``grad_fn(params, X, y) -> (loss, grads)``: objective and gradient on one batch.
GradFn = Callable[[Params, np.ndarray, np.ndarray], tuple[float, Mapping[str, np.ndarray]]]

#: Columns of the per-epoch history, in order.
HISTORY_COLUMNS: tuple[str, ...] = (
    "epoch", "steps", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "time",
)

_INT_COLUMNS = ("epoch", "steps")


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
        Wall-clock seconds since the start of training.
    """

    records: list[dict[str, Any]] = field(default_factory=list)

    def __getitem__(self, i):  # type: ignore[override]
        return self.records[i]

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.records)

    def append(self, record: Mapping[str, Any]) -> None:
        """Add one epoch's record (missing columns become NaN)."""
        self.records.append({k: record.get(k, math.nan) for k in HISTORY_COLUMNS})

    def column(self, name: str) -> np.ndarray:
        """One column as a float array (NaN where not evaluated)."""
        if name not in HISTORY_COLUMNS:
            raise KeyError(f"unknown history column {name!r}; columns are {HISTORY_COLUMNS}")
        return np.array([float(r[name]) for r in self.records], dtype=float)

    def to_list(self) -> list[dict[str, Any]]:
        """Records as plain dicts with NaN replaced by None (valid JSON)."""
        return [{k: _nan_to_none(r[k]) for k in HISTORY_COLUMNS} for r in self.records]

    def save_json(self, path: str | os.PathLike) -> Path:
        """Write the records as a JSON list of objects (NaN as ``null``)."""
        path = Path(path)
        path.write_text(json.dumps(self.to_list(), indent=1) + "\n", encoding="utf-8")
        return path

    def save_csv(self, path: str | os.PathLike) -> Path:
        """Write a CSV file with a header row of :data:`HISTORY_COLUMNS` (NaN as empty field).

        Floats are written with Python's round-trip ``repr``.
        """
        path = Path(path)
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(HISTORY_COLUMNS)
            for r in self.records:
                writer.writerow(["" if v is None else repr(v) for v in
                                 (_nan_to_none(r[k]) for k in HISTORY_COLUMNS)])
        return path

    @classmethod
    def load_json(cls, path: str | os.PathLike) -> History:
        """Read a file written by :meth:`save_json` (``null`` back to NaN)."""
        rows = json.loads(Path(path).read_text(encoding="utf-8"))
        return cls([{k: (math.nan if r.get(k) is None else r[k]) for k in HISTORY_COLUMNS}
                    for r in rows])


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
        Optimiser state that goes with ``params`` (for resuming).
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
        ``"plot"``); empty without ``output_dir``.
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


def _first_nonfinite(loss_value: Any, grads: Mapping[str, np.ndarray]) -> str | None:
    try:
        lv = float(loss_value)
    except (TypeError, ValueError):
        raise TypeError(f"grad_fn must return (loss, grads) with a real loss, "
                        f"got {type(loss_value).__name__}") from None
    if not math.isfinite(lv):
        return f"non-finite loss ({lv})"
    for k, g in grads.items():
        if not np.all(np.isfinite(g)):
            return f"non-finite gradient of {k!r}"
    return None


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


def train(
    network: ResNet,
    params: Params | Mapping[str, np.ndarray],
    data: Any,
    *,
    optimizer: Optimizer = Adam(lr=3e-3),  # noqa: B008 - frozen, immutable dataclass
    epochs: int = 100,
    batch_size: int | None = 50,
    target: Target | str = Target.CPU,
    seed: int = 0,
    grad_fn: GradFn | None = None,
    eval_every: int = 1,
    output_dir: str | os.PathLike | None = None,
    progress: bool | Literal["force"] = True,
    callback: Callable[[dict[str, Any], Params], bool | None] | None = None,
) -> TrainResult:
    """Train ``network`` from ``params`` on ``data`` with mini-batch ``optimizer`` steps.

    Parameters
    ----------
    network : ResNet
    params : Params or dict of arrays
        Initial parameters (not modified), e.g. ``network.init_params(seed)``.
    data : ptoc.data.Dataset
        Anything with ``X_train, y_train, X_val, y_val`` (the validation set may be
        empty).
    optimizer : Optimizer
        :class:`ptoc.optim.Adam` or :class:`ptoc.optim.SGD`; the default
        ``Adam(lr=3e-3)`` (with ``epochs=100``, ``batch_size=50``) is the setting of
        ``ptoc train``, tuned on Peaks.
    epochs : int
        Passes over the training set.
    batch_size : int or None
        Samples per step; None, or a value ``>= n_train``, means full batch.
    target : Target or str
        Kernel target of the default ``grad_fn`` and of the evaluations.
    seed : int
        Seed of the shuffling generator (see the module docstring for the protocol).
    grad_fn : callable, optional
        ``grad_fn(params, X, y) -> (loss, grads)`` on one batch; default
        ``ptoc.loss_and_grad(network, params, X, y, target=target)``.
    eval_every : int
        Evaluate training accuracy and validation loss and accuracy every this many
        epochs (and always after the last one).
    output_dir : str or path-like, optional
        If given (created if needed): write ``model.npz`` (:func:`ptoc.io.save_model`,
        the final or last good parameters), ``history.json``, ``history.csv`` and
        ``training.png`` (:func:`ptoc.plotting.plot_history`) at the end, also after
        divergence or interruption.
    progress : bool or "force"
        True: a tqdm bar over epochs on stderr, shown only when stderr is a terminal;
        False: none; ``"force"``: always.
    callback : callable, optional
        ``callback(record, params)`` after every epoch, with the epoch's history
        record and the current parameters; a truthy return stops training
        (``stopped_early=True``).

    Returns
    -------
    TrainResult

    Raises
    ------
    ValueError
        For invalid arguments or data that do not fit the network.
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
    if not isinstance(network, ResNet):
        raise TypeError(f"network must be a ptoc.ResNet, got {type(network).__name__}")
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"optimizer must be a ptoc.optim optimiser (Adam, SGD), "
                        f"got {type(optimizer).__name__}")
    params = network.check_params(params)
    epochs = check_positive_int("epochs", epochs)
    eval_every = check_positive_int("eval_every", eval_every)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    disable = _progress_disable(progress)
    target = Target.parse(target)
    backend(target)  # fail early (ImportError) when the target is unavailable
    for attr in ("X_train", "y_train", "X_val", "y_val"):
        if not hasattr(data, attr):
            raise TypeError(f"data must have X_train, y_train, X_val, y_val (a "
                            f"ptoc.data.Dataset); it has no {attr!r}")
    X, y = check_inputs(network, data.X_train, data.y_train)
    has_val = np.shape(data.X_val)[0] > 0
    if has_val:
        X_val, y_val = check_inputs(network, data.X_val, data.y_val)
    n = X.shape[0]
    B = check_positive_int("batch_size", batch_size, allow_none=True)
    full_batch = B is None or B >= n
    if grad_fn is None:
        def grad_fn(p, Xb, yb):
            return loss_and_grad(network, p, Xb, yb, target=target)
    elif not callable(grad_fn):
        raise TypeError("grad_fn must be callable: grad_fn(params, X, y) -> (loss, grads)")
    out_dir = None
    if output_dir is not None:
        out_dir = Path(output_dir)
        out_dir.mkdir(parents=True, exist_ok=True)

    rng = np.random.default_rng(int(seed))
    state = optimizer.init(params)
    history = History()
    best_params: Params | None = None
    best_epoch: int | None = None
    best_acc = -math.inf
    steps = 0
    epochs_done = 0
    reason: str | None = None
    diverged = False

    def evaluate(p: Params) -> tuple[float, float, float]:
        train_acc = accuracy(network, p, X, y, target=target)
        if not has_val:
            return train_acc, math.nan, math.nan
        return (train_acc, loss(network, p, X_val, y_val, target=target),
                accuracy(network, p, X_val, y_val, target=target))

    bar = tqdm(total=epochs, desc="training", unit="epoch", disable=disable,
               file=sys.stderr, dynamic_ncols=True)
    try:
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            for epoch in range(1, epochs + 1):
                if full_batch:
                    batches: list[np.ndarray | None] = [None]
                else:
                    perm = rng.permutation(n)
                    batches = [perm[i:i + B] for i in range(0, n, B)]
                batch_losses: list[float] = []
                for bi, idx in enumerate(batches):
                    Xb, yb = (X, y) if idx is None else (X[idx], y[idx])
                    loss_value, grads = grad_fn(params, Xb, yb)
                    if not isinstance(grads, Params) and isinstance(grads, Mapping):
                        grads = Params.from_dict(grads)
                    where = (f"epoch {epoch}, step {steps + 1} "
                             f"(batch {bi + 1} of {len(batches)})")
                    bad = _first_nonfinite(loss_value, grads)
                    if bad is None:
                        def closure(p, Xb=Xb, yb=yb):
                            return grad_fn(p, Xb, yb)
                        new_params, new_state = optimizer.update(params, grads, state,
                                                                 closure=closure)
                        if not _all_finite(new_params):
                            bad = "non-finite parameters after the update"
                    if bad is not None:
                        diverged = True
                        reason = (f"training diverged: {bad} at {where}; kept the parameters "
                                  f"after step {steps}")
                        break
                    params, state = new_params, new_state
                    steps += 1
                    batch_losses.append(float(loss_value))
                if diverged:
                    break
                record: dict[str, Any] = {
                    "epoch": epoch,
                    "steps": steps,
                    "train_loss": float(np.mean(batch_losses)),
                }
                if epoch % eval_every == 0 or epoch == epochs:
                    tr_acc, v_loss, v_acc = evaluate(params)
                    record.update(train_accuracy=tr_acc, val_loss=v_loss, val_accuracy=v_acc)
                    if has_val and v_acc > best_acc:
                        best_acc, best_epoch, best_params = v_acc, epoch, params.copy()
                record["time"] = time.perf_counter() - t_start
                history.append(record)
                epochs_done = epoch
                post = {"loss": f"{record['train_loss']:.4f}"}
                if "train_accuracy" in record:
                    post["acc"] = f"{record['train_accuracy']:.3f}"
                    if has_val:
                        post["val_acc"] = f"{record['val_accuracy']:.3f}"
                bar.set_postfix(post, refresh=False)
                bar.update(1)
                if callback is not None and callback(history[-1], params):
                    if epoch < epochs:
                        reason = f"stopped by the callback after epoch {epoch}, step {steps}"
                    break
    except KeyboardInterrupt:
        reason = (f"interrupted (KeyboardInterrupt) during epoch {epochs_done + 1}; kept the "
                  f"parameters after step {steps}")
    finally:
        bar.close()

    tr_acc, v_loss, v_acc = evaluate(params)
    tr_loss = loss(network, params, X, y, target=target)
    result = TrainResult(
        params=params,
        best_params=best_params,
        best_epoch=best_epoch,
        history=history,
        optimizer_state=state,
        steps=steps,
        epochs=epochs_done,
        stopped_early=reason is not None,
        reason=reason,
        diverged=diverged,
        wall_time=math.nan,
        train_loss=tr_loss,
        train_accuracy=tr_acc,
        val_loss=v_loss,
        val_accuracy=v_acc,
    )
    if out_dir is not None:
        result.outputs = _write_outputs(out_dir, network, result, optimizer, data,
                                        batch_size=None if full_batch else B, seed=int(seed))
    result.wall_time = time.perf_counter() - t_start
    return result


def _write_outputs(out_dir: Path, network: ResNet, result: TrainResult, optimizer: Optimizer,
                   data: Any, *, batch_size: int | None, seed: int) -> dict[str, Path]:
    from .plotting import plot_history

    extra = {
        "data": getattr(data, "name", None),
        "optimizer": optimizer.config(),
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
    outputs = {"model": _io.save_model(out_dir / "model.npz", network, result.params, extra)}
    outputs["history_json"] = result.history.save_json(out_dir / "history.json")
    outputs["history_csv"] = result.history.save_csv(out_dir / "history.csv")
    title = f"{getattr(data, 'name', 'data')}: {network.describe()}"
    outputs["plot"] = plot_history(result.history, out_dir / "training.png", title=title)
    return outputs
