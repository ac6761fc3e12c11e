"""The three solver strategies in one place, and the check of a ``solver=`` argument."""

from __future__ import annotations

from typing import Any

from .mgrit import MGRIT
from .options import SweepSolver
from .parareal import Parareal
from .serial import Serial

#: Any of the strategies ptoc ships.
Solver = Serial | Parareal | MGRIT


def check_solver(solver: Any) -> SweepSolver:
    """Return ``solver`` if it is a strategy object (None: ``Serial()``), else a clear
    ``TypeError``."""
    if solver is None:
        return Serial()
    if isinstance(solver, SweepSolver):
        return solver
    if isinstance(solver, type) and issubclass(solver, SweepSolver):
        raise TypeError(f"pass an instance, e.g. solver=ptoc.{solver.__name__}(), "
                        "not the class")
    raise TypeError("solver must be ptoc.Serial(), ptoc.Parareal(...) or ptoc.MGRIT(...), "
                    f"got {solver!r}")
