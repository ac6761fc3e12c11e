"""Figures of training runs, drawn off-screen.

Figures are built with :class:`matplotlib.figure.Figure` and the Agg canvas
directly, never through :mod:`matplotlib.pyplot`: nothing opens a window, no global
figure state is touched and the backend chosen by the user's session is left alone.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["plot_history"]


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
    path = Path(path)
    fig.savefig(path, dpi=100)
    return path
