"""What every benchmark record says about the machine it ran on (shared by the scripts
of this folder; not a benchmark itself)."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

import numpy as np


def cpuinfo() -> dict[str, str]:
    """Model name, vendor, family, model number, nominal MHz and flags from /proc/cpuinfo
    (Linux; empty elsewhere), each from the first processor listed."""
    info: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key in ("model name", "vendor_id", "cpu family", "model", "cpu MHz", "flags") \
                and key not in info:
            info[key] = value
    return info


def git_commit() -> str | None:
    """The commit of the checkout these scripts are in, or None outside git."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def dist_version(dist: str) -> str | None:
    """The installed version of a distribution, or None."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info() -> dict:
    """CPU (with its family and model numbers: machines that name themselves alike, such
    as "AMD EPYC", differ in their vector units), core count, platform, Python, NumPy,
    Numba, ptoc and the git commit."""
    import numba

    import ptoc

    cpu = cpuinfo()
    return {
        "cpu_model": cpu.get("model name") or platform.processor() or "unknown",
        "cpu_family": cpu.get("cpu family"), "cpu_model_number": cpu.get("model"),
        "cpu_mhz": float(cpu["cpu MHz"]) if "cpu MHz" in cpu else None,
        "logical_cpus": os.cpu_count(), "platform": platform.platform(),
        "python": platform.python_version(), "numpy": np.__version__,
        "numba": numba.__version__, "ptoc": ptoc.__version__, "git_commit": git_commit(),
    }
