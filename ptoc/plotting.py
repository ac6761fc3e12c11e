"""Figures of training runs and of layer-parallel solves, drawn off-screen.

Figures are built with :class:`matplotlib.figure.Figure` and the Agg canvas
directly, never through :mod:`matplotlib.pyplot`: nothing opens a window, no global
figure state is touched and the backend chosen by the user's session is left alone.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["plot_history", "plot_residuals"]


def _column(records: list[Mapping[str, Any]], key: str) -> np.ndarray:
    out = np.full(len(records), np.nan)
    for i, r in enumerate(records):
        v = r.get(key)
        if v is not None:
            out[i] = float(v)
    return out


def plot_history(history: Iterable[Mapping[str, Any]], path: str | os.PathLike,
                 title: str | None = None) -> Path:
    """Save loss and accuracy against epoch, training and validation, as one image.

    Two panels: left the objective (training: mean over the epoch's mini-batches;
    validation: on the full validation set), right the accuracy (training and
    validation, on the full sets). Epochs where a value was not evaluated (``None``
    or NaN) are skipped.

    Parameters
    ----------
    history : iterable of dicts
        One dict per epoch with the keys ``epoch``, ``train_loss``,
        ``train_accuracy``, ``val_loss``, ``val_accuracy`` (a
        :class:`ptoc.training.History` qualifies).
    path : str or path-like
        Output file; the format follows the suffix (``.png`` recommended).
    title : str, optional
        Figure title.

    Returns
    -------
    pathlib.Path
        The file written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = [dict(r) for r in history]
    epoch = _column(records, "epoch")
    fig = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax_loss, ax_acc = fig.subplots(1, 2)
    panels = (
        (ax_loss, "loss", "objective J (loss + regulariser)"),
        (ax_acc, "accuracy", "accuracy"),
    )
    for ax, key, label in panels:
        for split, style in (("train", "-"), ("val", "--")):
            y = _column(records, f"{split}_{key}")
            ok = np.isfinite(y)
            if ok.any():
                name = "training" if split == "train" else "validation"
                ax.plot(epoch[ok], y[ok], style, marker="o" if ok.sum() < 30 else None,
                        markersize=3, label=name)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    ax_acc.set_ylim(-0.02, 1.02)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def _labelled_results(results: Any) -> list[tuple[str, Any]]:
    """``[(label, SolveResult), ...]`` from one result, a sequence or a mapping."""
    from .parallel.options import SolveResult

    if isinstance(results, SolveResult):
        pairs = [(None, results)]
    elif isinstance(results, Mapping):
        pairs = [(str(k), v) for k, v in results.items()]
    elif isinstance(results, Sequence) and not isinstance(results, (str, bytes)):
        pairs = [(None, r) for r in results]
    else:
        raise TypeError("results must be a SolveResult, a sequence of them or a mapping "
                        f"label -> SolveResult, got {type(results).__name__}")
    if not pairs:
        raise ValueError("no solve results to plot")
    out = []
    for i, (label, r) in enumerate(pairs):
        if not isinstance(r, SolveResult):
            raise TypeError(f"result {label or i} is a {type(r).__name__}, not a SolveResult")
        if not r.residuals:
            raise ValueError(f"result {label or i} ({r.method} {r.sweep} sweep) has no residual "
                             "history: the serial sweep is not iterative")
        out.append((label or f"{r.method}, {r.sweep} sweep", r))
    return out


def _residual_figure(results: Any, title: str | None, tol: float | None):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    pairs = _labelled_results(results)
    if tol is not None and not (np.isfinite(tol) and tol > 0):
        raise ValueError(f"tol must be positive and finite, got {tol!r}")
    fig = Figure(figsize=(6.5, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for label, r in pairs:
        k = np.asarray(r.residual_iterations)
        res = np.asarray(r.residuals, dtype=float)
        shown = res > 0  # a log axis cannot show an exact 0 (parareal after P iterations)
        exact = k[res == 0]
        if exact.size:
            label += f" (exactly 0 from iteration {exact[0]})"
        ax.semilogy(k[shown], res[shown], marker="o", markersize=3, label=label)
    if tol is not None:
        ax.axhline(tol, color="grey", ls="--", lw=1, label=f"tolerance {tol:g}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("iteration")
    ax.set_ylabel("residual norm")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    return fig


def plot_residuals(results: Any, path: str | os.PathLike, *, title: str | None = None,
                   tol: float | None = None) -> Path:
    """Save the residual history of layer-parallel solves (log scale) as one image.

    One line per solve: ``SolveResult.residuals`` against the iteration number, from 0
    for parareal (the coarse prediction) and from 1 for MGRIT (after the first cycle):
    see :attr:`ptoc.parallel.SolveResult.residual_iterations`. Residuals that are
    exactly 0 (parareal is exact after ``P`` iterations) cannot be drawn on a log axis;
    the legend says from which iteration on.

    Parameters
    ----------
    results : SolveResult, sequence of SolveResult, or mapping of str to SolveResult
        What :func:`ptoc.parallel.parallel_forward` and the other drivers return as
        records; a mapping gives the legend labels (default: method and sweep).
    path : str or path-like
        Output file; the format follows the suffix (``.png`` recommended).
    title : str, optional
    tol : float, optional
        Draw this tolerance as a dashed line.

    Returns
    -------
    pathlib.Path
        The file written.

    Raises
    ------
    TypeError
        For anything that is not a SolveResult.
    ValueError
        For no results, a result without residuals (a serial sweep), or a bad ``tol``.
    """
    fig = _residual_figure(results, title, tol)
    return _save(fig, path)


def _save(fig: Any, path: str | os.PathLike) -> Path:
    """Write ``fig`` to ``path`` atomically (:func:`ptoc.io.atomic_write`): a reader, or
    a run killed while writing, never leaves a half-written image. The format is the
    suffix's (PNG when there is none, as ``savefig`` would add)."""
    from .io import atomic_write

    path = Path(path)
    if not path.suffix:
        path = path.with_suffix(".png")
    fmt = path.suffix[1:].lower()
    return atomic_write(path, lambda f: fig.savefig(f, dpi=100, format=fmt))
