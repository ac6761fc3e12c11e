"""The ``ptoc`` command line.

``ptoc train`` (:mod:`ptoc.cli.train`)
    Train a ResNet on Peaks (default) or digits and write the model, the history
    (JSON and CSV), a plot and checkpoints into an output folder. With no options it
    trains width 8, depth 32, ``T = 5``, tanh, on Peaks with Adam (``lr = 3e-3``,
    batch 50, 100 epochs) on exact serial gradients, which reaches about 96-99%
    validation accuracy in well under a minute on two cores. ``--method`` picks one
    of the training methods (``--method`` alone lists them); ``--resume DIR``
    continues a run from its checkpoint.
``ptoc solve`` (:mod:`ptoc.cli.solve`)
    Solve the state and adjoint sweeps layer-parallel.
``ptoc validate`` (:mod:`ptoc.cli.validate`)
    Run the claim scripts of ``validation/`` (records and runner in
    :mod:`ptoc.cli.claims`).
``ptoc info`` (:mod:`ptoc.cli.info`)
    Versions, Numba threads and which kernel targets can run here.

Exit codes: 0 success; 1 training diverged, i.e. a non-finite loss or one above
``--divergence-factor`` times the first step's for ``--divergence-patience``
consecutive steps (the last good model is kept); 2 bad options, an output folder or
file that cannot be written (checked before any work), a damaged input file, or a
missing optional dependency (one ``ptoc: error: ...`` line, never a traceback,
:class:`ptoc.cli.errors.CLIError`); 130 interrupted with Ctrl-C (the last good model
is kept).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .. import _config
from .._memory import keep_freed_memory
from .._version import __version__
from . import info, solve, train, validate
from .arguments import PROG, Parser
from .errors import CLIError

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The ``ptoc`` argument parser (subcommands ``train``, ``solve``, ``validate``, ``info``).

    Returns
    -------
    argparse.ArgumentParser
        The parser; each subcommand sets ``func``, the function that runs it.
    """
    parser = Parser(
        prog=PROG,
        description=(
            "ptoc: parallel-in-time optimal control of residual neural networks.\n\n"
            "Subcommands:\n"
            "  train     train a ResNet on Peaks or digits with one of the training\n"
            "            methods; writes model.npz, history, plot and checkpoints\n"
            "  solve     solve the state/adjoint sweeps layer-parallel (parareal, MGRIT) on\n"
            "            simulated ranks or under mpiexec; prints residuals and step counts\n"
            "  validate  check the papers' claims (validation/), one table\n"
            "  info      versions, Numba threads and the available kernel targets\n\n"
            "Run 'ptoc <subcommand> --help' for the options of each."
        ),
        epilog=("exit codes: 0 success, 1 training diverged (last good model kept), "
                "2 bad options, 130 interrupted"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"ptoc {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{train,solve,validate,info}",
                                required=True)
    for command in (train, solve, validate, info):
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``ptoc`` command line with ``argv`` (default ``sys.argv[1:]``).

    Never raises for user errors: argparse errors and invalid combinations print one
    ``ptoc: error: ...`` line and return 2; ``--help`` returns 0.

    Parameters
    ----------
    argv : sequence of str, optional
        The arguments after the program name.

    Returns
    -------
    int
        The exit code.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(None if argv is None else list(argv))
    except SystemExit as exc:  # --help, --version, or an argparse error
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    if _config.KEEP_FREED_BYTES:  # this process is ptoc's own: reuse freed memory
        keep_freed_memory(_config.KEEP_FREED_BYTES)
    try:
        return int(args.func(args))
    except CLIError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
