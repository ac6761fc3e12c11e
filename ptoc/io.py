"""Saving and loading trained models as one ``.npz`` file.

File format (``format_version`` 1 for a ResNet, 2 for the other model kinds). A NumPy
``.npz`` archive, readable without ptoc and without pickle
(``np.load(path, allow_pickle=False)``), with the entries

``K, b, [K_in, b_in,] W, mu`` (a ResNet; another model kind: its own parameter names)
    The parameter arrays, in the network's dtype, bit for bit.
``network``
    A JSON string describing the network. A :class:`~ptoc.ResNet`: ``width, depth, T,
    activation, n_in, n_classes, opening, gamma, gamma_t, gamma_c, dtype``. Any other
    kind (version 2): ``kind`` (a name of :data:`MODEL_KINDS`, e.g. ``"layered"``) and
    the arguments its class is built from. Floats are written with Python's shortest
    round-trip representation, so they are read back exactly.
``extra``
    A JSON string of the user's ``extra`` dict (``"{}"`` when none was given).
``format``
    The string ``"ptoc-model"``; ``format_version`` the integer ``1`` or ``2``;
    ``ptoc_version`` the version of ptoc that wrote the file.

Model kinds. :data:`MODEL_KINDS` names every kind of network that files (and
:func:`ptoc.training.train`'s checkpoints) can describe: ``"resnet"``
(:class:`ptoc.ResNet`), ``"layered"`` (:class:`ptoc.layered.LayeredNetwork`) and
``"conv"`` (``ptoc.ConvResNet``, once this ptoc has it). A kind is its class and the
names of the constructor arguments that the class keeps as attributes of the same
name; the description is those attributes (enums as their values, dtypes as their
names, tuples as lists) and the class is rebuilt from them. A new kind plugs in with
one call, :func:`register_model_kind`.

Files are written atomically: to a temporary file in the target directory that
then replaces the target with :func:`os.replace`, so a reader never sees a
half-written model, even if the writer is interrupted.

This module also holds the file rules of the rest of ptoc, one place each: atomic
writes (:func:`atomic_write`) and the clean-up of what a killed writer left
(:func:`remove_stale_temporaries`), checks of output folders and files before the
work (:func:`prepare_output_dir`, :func:`check_output_file`), reading an ``.npz``
with a clear error for a damaged one (:func:`read_npz`), and the lock that gives a
run folder to one run at a time (:class:`RunFolderLock`).
"""

from __future__ import annotations

import enum
import json
import os
import re
import secrets
import socket
import sys
import zipfile
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from ._version import __version__
from .model import PARAM_KEYS, Params, ResNet

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "LOCK_NAME",
    "MODEL_KINDS",
    "ModelKind",
    "RunFolderInUseError",
    "RunFolderLock",
    "atomic_write",
    "atomic_write_text",
    "check_output_file",
    "load_model",
    "network_from_dict",
    "network_to_dict",
    "prepare_output_dir",
    "read_npz",
    "register_model_kind",
    "remove_stale_temporaries",
    "save_model",
]

#: Value of the ``format`` entry of a ptoc model file.
FORMAT = "ptoc-model"
#: Version of the file layout written by :func:`save_model` for a model kind other than
#: a ResNet (whose files keep version 1, readable by every ptoc).
FORMAT_VERSION = 2

#: Entries of a model file that are not parameters.
_RESERVED_ENTRIES = ("network", "extra", "format", "format_version", "ptoc_version")

_NETWORK_FIELDS = ("width", "depth", "T", "activation", "n_in", "n_classes", "opening",
                   "gamma", "gamma_t", "gamma_c", "dtype")


@dataclass(frozen=True)
class ModelKind:
    """A kind of network that model files and checkpoints can describe.

    Attributes
    ----------
    name : str
        The ``kind`` written into the description (e.g. ``"layered"``).
    find_class : callable
        ``find_class()`` returns the class, or None when this ptoc does not have it.
    fields : tuple of str
        The constructor's arguments, each kept by the object as an attribute of the
        same name: the description is those attributes and ``cls(**description)``
        rebuilds the object.
    """

    name: str
    find_class: Callable[[], type | None]
    fields: tuple[str, ...]


def _layered_class() -> type:
    from .layered import LayeredNetwork

    return LayeredNetwork


def _conv_class() -> type | None:
    """``ptoc.ConvResNet``, None where this ptoc has none (the package ``ptoc`` is
    imported whenever this module is)."""
    return getattr(sys.modules["ptoc"], "ConvResNet", None)


#: The model kinds, by name (see the module docstring); extend with
#: :func:`register_model_kind`.
MODEL_KINDS: dict[str, ModelKind] = {
    "resnet": ModelKind("resnet", lambda: ResNet, _NETWORK_FIELDS),
    "layered": ModelKind("layered", _layered_class,
                         ("widths", "activation", "batch_norm", "last_activation", "bn_eps")),
    "conv": ModelKind("conv", _conv_class,
                      ("channels", "depth", "T", "activation", "image_shape", "n_classes",
                       "gamma", "gamma_t", "gamma_c", "dtype")),
}


def register_model_kind(name: str, cls: type, fields: tuple[str, ...]) -> ModelKind:
    """Let model files and checkpoints describe networks of class ``cls``.

    Parameters
    ----------
    name : str
        The kind's name in descriptions; a registered name is replaced.
    cls : type
        The network class (the object given to :func:`save_model` or
        :func:`ptoc.training.train`, or the ``network`` attribute of the model given).
    fields : tuple of str
        Constructor arguments that ``cls`` keeps as attributes of the same name; their
        values must be JSON numbers, strings, booleans, enums, dtypes or tuples of these.

    Returns
    -------
    ModelKind
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    if not isinstance(cls, type):
        raise TypeError(f"cls must be a class, got {type(cls).__name__}")
    kind = ModelKind(name, lambda: cls, tuple(fields))
    MODEL_KINDS[name] = kind
    return kind


def _kind_of(network: Any) -> tuple[ModelKind, Any]:
    """The registered kind of ``network`` (or of its ``network`` attribute, as a
    :class:`ptoc.propagator.ResNetModel` has) and the object it describes: of the kinds
    whose class the object is an instance of, the one nearest in its class's MRO (a
    subclass registered as its own kind is described as that kind)."""
    for obj in (network, getattr(network, "network", None)):
        if obj is None:
            continue
        mro = type(obj).__mro__
        found = [(mro.index(cls), kind) for kind in MODEL_KINDS.values()
                 if (cls := kind.find_class()) is not None and cls in mro]
        if found:
            return min(found, key=lambda pair: pair[0])[1], obj
    raise TypeError(f"ptoc.io cannot describe a {type(network).__name__}: the model kinds it "
                    f"knows are {', '.join(MODEL_KINDS)} (ptoc.io.MODEL_KINDS; add one with "
                    "ptoc.io.register_model_kind)")


def _plain(value: Any) -> Any:
    """``value`` as JSON: enums as their values, dtypes as their names, tuples as lists."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, np.dtype):
        return value.name
    if isinstance(value, type) and issubclass(value, np.generic):
        return np.dtype(value).name
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _from_plain(value: Any) -> Any:
    """A described value as a constructor argument (lists back to tuples)."""
    return tuple(_from_plain(v) for v in value) if isinstance(value, list) else value


def network_to_dict(network: Any) -> dict[str, Any]:
    """The description of ``network`` as a JSON-serialisable dict.

    A :class:`~ptoc.ResNet` gives its fields (no ``kind``, as in version 1 files); any
    other registered kind (:data:`MODEL_KINDS`) gives ``kind`` and its fields. The
    inverse is :func:`network_from_dict`.

    Raises
    ------
    TypeError
        When ``network`` is of no registered kind.
    ValueError
        When the description does not rebuild an equal network (a registered class
        that does not keep its constructor's arguments as its attributes).
    """
    kind, obj = _kind_of(network)
    d = {f: _plain(getattr(obj, f)) for f in kind.fields}
    if kind.name == "resnet":
        return d
    d = {"kind": kind.name, **d}
    try:
        rebuilt = network_from_dict(json.loads(json.dumps(d)))
        again = {f: _plain(getattr(rebuilt, f)) for f in kind.fields}
    except (TypeError, ValueError) as exc:
        again = f"not rebuilt ({type(exc).__name__}: {exc})"
    if json.dumps(again) != json.dumps({f: d[f] for f in kind.fields}):
        raise ValueError(f"the {kind.name!r} network {obj!r} is not described by its "
                         f"fields {list(kind.fields)}: rebuilt, it has {again}")
    return d


def network_from_dict(d: Mapping[str, Any]) -> Any:
    """Rebuild a network from :func:`network_to_dict` output (no ``kind``: a ResNet).

    Raises
    ------
    ValueError
        For an unknown kind, a kind this ptoc does not have, missing or unknown
        fields, or invalid values.
    """
    name = d.get("kind", "resnet")
    if name not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {name!r}; this ptoc knows "
                         f"{', '.join(MODEL_KINDS)}")
    kind = MODEL_KINDS[name]
    cls = kind.find_class()
    if cls is None:
        raise ValueError(f"the model kind {name!r} is not available in this ptoc "
                         f"({__version__}): upgrade ptoc")
    given = {k: v for k, v in d.items() if k != "kind"}
    missing = [k for k in kind.fields if k not in given]
    unknown = sorted(set(given) - set(kind.fields))
    if missing or unknown:
        raise ValueError(f"{name} network description has missing fields {missing} "
                         f"and unknown fields {unknown}")
    return cls(**{k: _from_plain(given[k]) for k in kind.fields})


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


def save_model(path: str | os.PathLike, network: Any, params: Params | Mapping,
               extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``network`` and ``params`` (and an optional ``extra`` dict) to one ``.npz`` file.

    Parameters
    ----------
    path : str or path-like
        Target file. Used exactly as given (no ``.npz`` suffix is added); its
        directory must exist. An existing file is replaced atomically.
    network : ResNet or a network of another kind in :data:`MODEL_KINDS`
        E.g. a :class:`ptoc.layered.LayeredNetwork`; a model whose ``network``
        attribute is of a registered kind (a :class:`ptoc.propagator.ResNetModel`)
        is written as that network.
    params : Params or dict of arrays
        Validated with the network's ``check_params`` (shapes, finiteness) and stored
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
    TypeError
        If ``network`` is of no registered model kind (the message lists the kinds).
    ValueError
        For parameters that do not fit the network or an ``extra`` that is not
        JSON-serialisable.
    FileNotFoundError
        If the directory of ``path`` does not exist.
    """
    path = Path(path)
    description = network_to_dict(network)
    _, described = _kind_of(network)
    p = described.check_params(params)
    if extra is not None and not isinstance(extra, Mapping):
        raise ValueError(f"extra must be a dict, got {type(extra).__name__}")
    clash = sorted(set(p) & set(_RESERVED_ENTRIES))
    if clash:
        raise ValueError(f"parameter names {clash} clash with the entries of a model file")
    entries: dict[str, Any] = {k: v for k, v in p.items()}
    entries["network"] = np.array(_strict_json(description, "network"))
    entries["extra"] = np.array(_strict_json(dict(extra or {}), "extra"))
    entries["format"] = np.array(FORMAT)
    entries["format_version"] = np.array(1 if "kind" not in description else FORMAT_VERSION,
                                         dtype=np.int64)
    entries["ptoc_version"] = np.array(__version__)
    _atomic_savez(path, entries)
    return path


#: Name of a temporary file of :func:`atomic_write`: ``.<target name>.<12 hex digits>.tmp``.
_TEMPORARY = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp$")


def _open_temporary(directory: Path, name: str) -> tuple[int, Path]:
    """Create ``directory/.<name>.<random>.tmp`` exclusively; return its descriptor and path.

    ``os.open`` with mode 0o666 (not mkstemp's 0o600) gives the file the usual
    umask-based permissions; ``O_EXCL`` and 48 random bits keep writers apart.
    """
    while True:
        tmp = directory / f".{name}.{secrets.token_hex(6)}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:  # pragma: no cover - 48 random bits
            continue


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Write a file atomically: ``write(f)`` into a temporary file next to ``path``, fsync,
    then :func:`os.replace` it onto ``path``.

    A reader sees the old file or the new one, never a half-written one, even when the
    writer is killed; a killed writer leaves at most a temporary file
    ``.<name>.<12 hex digits>.tmp``, which :func:`remove_stale_temporaries` deletes.

    Parameters
    ----------
    path : str or path-like
        Target file, used exactly as given; its folder must exist.
    write : callable
        ``write(f)`` writes the content to the binary file object ``f``.

    Returns
    -------
    pathlib.Path
        The path written.

    Raises
    ------
    FileNotFoundError
        If the folder of ``path`` does not exist.
    OSError
        If the file cannot be written (no permission, disk full): the message names
        ``path``; the target is then unchanged and no temporary file is left.
    """
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise FileNotFoundError(f"cannot write {str(path)!r}: directory {str(directory)!r} "
                                "does not exist")
    try:
        fd, tmp = _open_temporary(directory, path.name)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot write {str(path)!r}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError) and exc.errno is not None:
            raise OSError(exc.errno, f"cannot write {str(path)!r}: {exc.strerror}") from None
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """:func:`atomic_write` of ``text`` in UTF-8."""
    data = text.encode("utf-8")
    return atomic_write(path, lambda f: f.write(data))


def _atomic_savez(path: Path, entries: Mapping[str, np.ndarray]) -> None:
    """``np.savez`` of ``entries`` to exactly ``path`` (no suffix added), atomically."""
    atomic_write(path, lambda f: np.savez(f, **entries))


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete the temporary files :func:`atomic_write` left in ``directory`` when killed.

    Only files named like ours (``.<name>.<12 hex digits>.tmp``) are touched. Call it
    only while no other writer uses the folder (e.g. holding :class:`RunFolderLock`).

    Returns
    -------
    list of pathlib.Path
        The files deleted.
    """
    removed = []
    for entry in Path(directory).iterdir():
        if _TEMPORARY.match(entry.name) and entry.is_file():
            try:
                entry.unlink()
            except FileNotFoundError:  # pragma: no cover - removed meanwhile
                continue
            removed.append(entry)
    return removed


def _probe_writable(directory: Path) -> None:
    """Create and delete a temporary file in ``directory`` (OSError if that fails)."""
    fd, tmp = _open_temporary(directory, "write-probe")
    os.close(fd)
    os.unlink(tmp)


def prepare_output_dir(path: str | os.PathLike, what: str = "output folder") -> Path:
    """Create the folder ``path`` (with its parents) if needed and check that files can be
    written into it, before any work whose results would go there.

    Raises
    ------
    ValueError
        Naming ``path`` and the reason: it is a file, lies below a file, cannot be
        created or is not writable (read-only, no permission, disk full).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} {str(path)!r} exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"cannot create the {what} {str(path)!r}: {exc.strerror}") from None
    try:
        _probe_writable(path)
    except OSError as exc:
        raise ValueError(f"cannot write into the {what} {str(path)!r}: {exc.strerror}") \
            from None
    return path


def check_output_file(path: str | os.PathLike) -> Path:
    """Check, before the work, that the file ``path`` can be written.

    Its folder must exist and be writable, and ``path`` must not be a folder.

    Raises
    ------
    ValueError
        Naming ``path`` and the reason.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{str(path)!r} is a folder; give a file name")
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        reason = "is not a folder" if directory.exists() else "does not exist"
        raise ValueError(f"cannot write {str(path)!r}: {str(directory)!r} {reason}")
    try:
        _probe_writable(directory)
    except OSError as exc:
        raise ValueError(f"cannot write {str(path)!r}: {exc.strerror}") from None
    return path


def read_npz(path: str | os.PathLike, what: str) -> dict[str, np.ndarray]:
    """Every entry of the ``.npz`` archive ``path``, read without pickle.

    Parameters
    ----------
    path : str or path-like
    what : str
        What the file should be (e.g. ``"ptoc model file"``), for the messages.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If it is a folder, or not an ``.npz`` archive or a damaged one (empty,
        truncated, altered bytes): the message names ``path`` and says so.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    if path.is_dir():
        raise ValueError(f"{str(path)!r} is a folder, not a {what}")
    corrupt = f"{str(path)!r} is not a {what} or is corrupt"
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{corrupt}: it is not an .npz archive (empty, truncated or another "
                         "kind of file)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as exc:
        raise ValueError(f"{corrupt}: cannot read it ({exc})") from None


#: Name of the lock file that marks a run folder as in use (see :class:`RunFolderLock`).
LOCK_NAME = ".ptoc-run.lock"

#: Run folders this process holds, by real path, with the nesting depth of their locks.
_HELD_FOLDERS: dict[str, int] = {}


class RunFolderInUseError(RuntimeError):
    """Another process, still running, holds the lock of a run folder."""


def _lock_owner(path: Path) -> tuple[int, str] | None:
    """``(pid, host)`` written in the lock file ``path``; None when it cannot be read."""
    try:
        pid, host = path.read_text(encoding="utf-8").split()
        return int(pid), host
    except (OSError, ValueError):
        return None


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but another user's
        return True
    return True


class RunFolderLock:
    """A run folder belongs to one run at a time: hold this while writing into it.

    Entering creates ``folder/.ptoc-run.lock`` exclusively (``O_EXCL``) with the
    process id and host name; leaving deletes it. A lock whose process no longer
    runs on this host (a run that was killed) is stale: it is taken over and
    :attr:`taken_over_from` says from which process id. The lock is re-entrant
    within one process (the command line holds it around :func:`ptoc.training.train`,
    which takes it again).

    Parameters
    ----------
    folder : str or path-like
        An existing folder.

    Raises
    ------
    RunFolderInUseError
        On entering, when a live process holds the folder (or the lock file does
        not say which process holds it).
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.taken_over_from: int | None = None
        self._key = os.path.realpath(self.folder)

    def __enter__(self) -> RunFolderLock:
        if self._key in _HELD_FOLDERS:
            _HELD_FOLDERS[self._key] += 1
            return self
        host = socket.gethostname()
        while True:
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                owner = _lock_owner(self.path)
                if owner is None:
                    raise RunFolderInUseError(
                        f"the run folder {str(self.folder)!r} is locked by "
                        f"{str(self.path)!r}, which does not say by which process; delete "
                        "that file if no run uses the folder") from None
                pid, owner_host = owner
                if owner_host != host or (pid != os.getpid() and _process_alive(pid)):
                    raise RunFolderInUseError(
                        f"the run folder {str(self.folder)!r} is in use by process {pid} on "
                        f"{owner_host} (lock file {str(self.path)!r}); wait for that run to "
                        "end or choose another folder") from None
                try:  # stale: its process is gone
                    self.path.unlink()
                except FileNotFoundError:
                    pass
                self.taken_over_from = pid
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(f"{os.getpid()} {host}\n")
            break
        _HELD_FOLDERS[self._key] = 1
        return self

    def __exit__(self, *exc_info: object) -> None:
        _HELD_FOLDERS[self._key] -= 1
        if _HELD_FOLDERS[self._key] > 0:
            return
        del _HELD_FOLDERS[self._key]
        owner = _lock_owner(self.path)
        if owner is not None and owner[0] == os.getpid():
            try:
                self.path.unlink()
            except FileNotFoundError:  # pragma: no cover - removed by hand
                pass


def load_model(path: str | os.PathLike) -> tuple[Any, Mapping[str, np.ndarray], dict[str, Any]]:
    """Read a model written by :func:`save_model`.

    Parameters
    ----------
    path : str or path-like

    Returns
    -------
    network : ResNet or a network of another kind in :data:`MODEL_KINDS`
        Equal to (described as) the network that was saved.
    params : Params or dict of arrays
        Bitwise equal to the saved parameters (:class:`Params` for a ResNet, else
        what the network's ``check_params`` returns).
    extra : dict
        The ``extra`` dict given to :func:`save_model` (empty when none was).

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the file is not a ptoc model file (not an ``.npz``, no ``network`` entry,
        another format) or is damaged (:func:`read_npz`), is of a newer format version,
        of a model kind this ptoc does not know, or is inconsistent.
    """
    path = Path(path)
    entries = read_npz(path, "ptoc model file")
    not_ours = f"{str(path)!r} is not a ptoc model file"
    try:
        if "format" not in entries or "network" not in entries:
            raise ValueError(f"{not_ours} (no 'format'/'network' entries)")
        if str(entries["format"][()]) != FORMAT:
            raise ValueError(f"{not_ours} (format is {str(entries['format'][()])!r})")
        version = int(entries["format_version"][()]) if "format_version" in entries else 0
        if version > FORMAT_VERSION:
            raise ValueError(
                f"{str(path)!r} has format version {version}; this ptoc reads up to "
                f"{FORMAT_VERSION}: upgrade ptoc"
            )
        net_d = json.loads(str(entries["network"][()]))
        extra = json.loads(str(entries["extra"][()])) if "extra" in entries else {}
        if not isinstance(net_d, dict):
            raise TypeError("the 'network' entry is not a JSON object")
        if "kind" in net_d:
            arrays = {k: v for k, v in entries.items() if k not in _RESERVED_ENTRIES}
        else:
            arrays = {k: entries[k] for k in PARAM_KEYS if k in entries}
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
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
