"""Saving and loading trained models as one ``.npz`` file.

File format (``format_version`` 1). A NumPy ``.npz`` archive, readable without
ptoc and without pickle (``np.load(path, allow_pickle=False)``), with the entries

``K, b, [K_in, b_in,] W, mu``
    The parameter arrays, in the network's dtype, bit for bit.
``network``
    A JSON string describing the :class:`~ptoc.ResNet`: ``width, depth, T,
    activation, n_in, n_classes, opening, gamma, gamma_t, gamma_c, dtype``. Floats
    are written with Python's shortest round-trip representation, so they are read
    back exactly.
``extra``
    A JSON string of the user's ``extra`` dict (``"{}"`` when none was given).
``format``
    The string ``"ptoc-model"``; ``format_version`` the integer ``1``;
    ``ptoc_version`` the version of ptoc that wrote the file.

Files are written atomically: to a temporary file in the target directory that
then replaces the target with :func:`os.replace`, so a reader never sees a
half-written model, even if the writer is interrupted.
"""

from __future__ import annotations

import json
import os
import secrets
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ._version import __version__
from .model import PARAM_KEYS, Params, ResNet

__all__ = ["FORMAT", "FORMAT_VERSION", "load_model", "network_from_dict", "network_to_dict",
           "save_model"]

#: Value of the ``format`` entry of a ptoc model file.
FORMAT = "ptoc-model"
#: Version of the file layout written by :func:`save_model`.
FORMAT_VERSION = 1

_NETWORK_FIELDS = ("width", "depth", "T", "activation", "n_in", "n_classes", "opening",
                   "gamma", "gamma_t", "gamma_c", "dtype")


def network_to_dict(network: ResNet) -> dict[str, Any]:
    """The description of ``network`` as a JSON-serialisable dict.

    The inverse is :func:`network_from_dict`.
    """
    if not isinstance(network, ResNet):
        raise TypeError(f"network must be a ptoc.ResNet, got {type(network).__name__}")
    return {
        "width": network.width,
        "depth": network.depth,
        "T": network.T,
        "activation": network.activation.value,
        "n_in": network.n_in,
        "n_classes": network.n_classes,
        "opening": network.opening.value,
        "gamma": network.gamma,
        "gamma_t": network.gamma_t,
        "gamma_c": network.gamma_c,
        "dtype": network.dtype.name,
    }


def network_from_dict(d: Mapping[str, Any]) -> ResNet:
    """Rebuild a :class:`~ptoc.ResNet` from :func:`network_to_dict` output.

    Raises
    ------
    ValueError
        For missing or unknown fields, or invalid values.
    """
    missing = [k for k in _NETWORK_FIELDS if k not in d]
    unknown = sorted(set(d) - set(_NETWORK_FIELDS))
    if missing or unknown:
        raise ValueError(f"network description has missing fields {missing} "
                         f"and unknown fields {unknown}")
    return ResNet(**{k: d[k] for k in _NETWORK_FIELDS})


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serialisable")


def _strict_json(obj: Any, what: str) -> str:
    try:
        return json.dumps(obj, default=_json_default, allow_nan=False, sort_keys=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} is not JSON-serialisable: {exc}") from None


def save_model(path: str | os.PathLike, network: ResNet, params: Params | Mapping,
               extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``network`` and ``params`` (and an optional ``extra`` dict) to one ``.npz`` file.

    Parameters
    ----------
    path : str or path-like
        Target file. Used exactly as given (no ``.npz`` suffix is added); its
        directory must exist. An existing file is replaced atomically.
    network : ResNet
    params : Params or dict of arrays
        Validated with :meth:`ResNet.check_params` (shapes, finiteness) and stored
        in the network's dtype.
    extra : dict, optional
        JSON-serialisable metadata (NumPy scalars and arrays are converted to
        numbers and lists; NaN and infinity are refused), returned by
        :func:`load_model`.

    Returns
    -------
    pathlib.Path
        The path written.

    Raises
    ------
    ValueError
        For parameters that do not fit the network or an ``extra`` that is not
        JSON-serialisable.
    FileNotFoundError
        If the directory of ``path`` does not exist.
    """
    path = Path(path)
    p = network.check_params(params)
    if extra is not None and not isinstance(extra, Mapping):
        raise ValueError(f"extra must be a dict, got {type(extra).__name__}")
    entries: dict[str, Any] = {k: v for k, v in p.items()}
    entries["network"] = np.array(_strict_json(network_to_dict(network), "network"))
    entries["extra"] = np.array(_strict_json(dict(extra or {}), "extra"))
    entries["format"] = np.array(FORMAT)
    entries["format_version"] = np.array(FORMAT_VERSION, dtype=np.int64)
    entries["ptoc_version"] = np.array(__version__)
    _atomic_savez(path, entries)
    return path


def _atomic_savez(path: Path, entries: Mapping[str, np.ndarray]) -> None:
    """``np.savez`` to a temporary file next to ``path``, then ``os.replace`` it."""
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise FileNotFoundError(f"cannot write {str(path)!r}: directory {str(directory)!r} "
                                "does not exist")
    # os.open with mode 0o666 (not mkstemp's 0o600) so the file gets the usual
    # umask-based permissions; O_EXCL and a random name keep writers apart.
    while True:
        tmp = directory / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:  # pragma: no cover - 48 random bits
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **entries)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def load_model(path: str | os.PathLike) -> tuple[ResNet, Params, dict[str, Any]]:
    """Read a model written by :func:`save_model`.

    Parameters
    ----------
    path : str or path-like

    Returns
    -------
    network : ResNet
        Equal to the network that was saved.
    params : Params
        Bitwise equal to the saved parameters.
    extra : dict
        The ``extra`` dict given to :func:`save_model` (empty when none was).

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the file is not a ptoc model file (not an ``.npz``, no ``network`` entry,
        another format), is of a newer format version, or is inconsistent.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model file {str(path)!r} does not exist")
    if path.is_dir():
        raise ValueError(f"{str(path)!r} is a directory, not a ptoc model file")
    not_ours = f"{str(path)!r} is not a ptoc model file"
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{not_ours} (it is not an .npz archive)")
    try:
        npz = np.load(path, allow_pickle=False)
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise ValueError(f"{not_ours} (cannot read it as .npz: {exc})") from None
    with npz:
        try:
            files = set(npz.files)
            if "format" not in files or "network" not in files:
                raise ValueError(f"{not_ours} (no 'format'/'network' entries)")
            if str(npz["format"][()]) != FORMAT:
                raise ValueError(f"{not_ours} (format is {str(npz['format'][()])!r})")
            version = int(npz["format_version"][()]) if "format_version" in files else 0
            if version > FORMAT_VERSION:
                raise ValueError(
                    f"{str(path)!r} has format version {version}; this ptoc reads up to "
                    f"{FORMAT_VERSION}: upgrade ptoc"
                )
            net_d = json.loads(str(npz["network"][()]))
            extra = json.loads(str(npz["extra"][()])) if "extra" in files else {}
            arrays = {k: npz[k] for k in PARAM_KEYS if k in files}
        except (KeyError, json.JSONDecodeError, zipfile.BadZipFile, OSError) as exc:
            raise ValueError(f"{not_ours} or is damaged ({exc})") from None
    try:
        network = network_from_dict(net_d)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{str(path)!r} has an invalid network description: {exc}") from None
    for k, a in arrays.items():
        if a.dtype != network.dtype:
            raise ValueError(f"{str(path)!r}: params[{k!r}] has dtype {a.dtype} but the "
                             f"network's dtype is {network.dtype}")
    try:
        params = network.check_params(arrays)
    except ValueError as exc:
        raise ValueError(f"{str(path)!r} holds parameters that do not fit its network: "
                         f"{exc}") from None
    if not isinstance(extra, dict):
        raise ValueError(f"{str(path)!r}: the 'extra' entry is not a JSON object")
    return network, params, extra

