"""``ptoc info``: versions, Numba threads and which kernel targets can run here."""

from __future__ import annotations

import argparse
import importlib
import os
import platform

import numpy as np

from .arguments import Formatter

__all__ = ["add_parser", "run"]


def add_parser(sub) -> None:
    """Register the ``info`` subcommand on the subparsers ``sub``."""
    i = sub.add_parser("info", help="versions, Numba threads and available targets",
                       description="Print versions (ptoc, python, numpy, numba), the number "
                       "of Numba threads and which kernel targets are available here.",
                       formatter_class=Formatter)
    i.set_defaults(func=run)


def _version(module: str) -> str | None:
    try:
        mod = importlib.import_module(module)
    except Exception:  # noqa: BLE001 - any import failure means "not usable"
        return None
    return str(getattr(mod, "__version__", "unknown version"))


def _cuda_status() -> str:
    simulator = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
    try:
        from numba import cuda
    except ImportError as exc:
        return f"not installed (numba.cuda cannot be imported: {exc}; pip install 'ptoc[cuda]')"
    if simulator:
        return "simulator (NUMBA_ENABLE_CUDASIM=1: kernels run on the CPU, slowly)"
    if _version("numba_cuda") is None:
        return ("not installed (the numba-cuda package is missing; pip install 'ptoc[cuda]')")
    try:
        available = cuda.is_available()
    except Exception as exc:  # noqa: BLE001 - driver errors vary by platform
        return f"not available ({exc})"
    if not available:
        reason = ""
        try:
            err = cuda.cuda_error()
            reason = " ".join(str(err).split()) if err else ""
        except Exception:  # noqa: BLE001
            pass
        return f"not available ({reason or 'no CUDA GPU found'})"
    try:
        dev = cuda.get_current_device()
        name = dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name)
        cc = ".".join(map(str, dev.compute_capability))
        return f"available ({name}, compute capability {cc})"
    except Exception as exc:  # noqa: BLE001
        return f"available (device query failed: {exc})"


def run(args: argparse.Namespace) -> int:
    """Print the versions, threads and targets; return 0."""
    import numba

    from .._version import __version__

    print(f"ptoc {__version__}")
    print(f"python {platform.python_version()} ({platform.python_implementation()}, "
          f"{platform.system()} {platform.machine()})")
    print(f"numpy {np.__version__}")
    print(f"numba {numba.__version__}")
    print(f"numba threads: {numba.get_num_threads()} (NUMBA_NUM_THREADS="
          f"{numba.config.NUMBA_NUM_THREADS}, {os.cpu_count()} CPUs)")
    print("targets:")
    print("  numpy: available")
    try:
        from ..kernels import backend

        backend("cpu")
        print("  cpu:   available (Numba njit/prange)")
    except Exception as exc:  # noqa: BLE001
        print(f"  cpu:   not available ({exc})")
    print(f"  cuda:  {_cuda_status()}")
    print("optional packages:")
    for module, name, purpose in (("sklearn", "scikit-learn", "digits data set"),
                                  ("mpi4py", "mpi4py", "MPI layer parallelism"),
                                  ("numba_cuda", "numba-cuda", "cuda target")):
        v = _version(module)
        print(f"  {name}: {v if v is not None else 'not installed'} ({purpose})")
    return 0

