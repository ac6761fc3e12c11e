"""Numba's disk cache for kernels that compile code from other files, never stale.

The staleness problem
---------------------
``numba.njit(cache=True)`` saves a function's machine code on disk and reuses it in
later processes. It finds the saved code by the function's signature, its bytecode,
the CPU, and a hash of the source file *that defines the function*; nothing else.
The kernels of :mod:`ptoc.kernels.cpu` compile code from two more files: they inline
the element functions of :mod:`ptoc._maths` (registered as jitable functions) and
take their compiler flags (fast-math) from :mod:`ptoc._config` and the environment.
An edit to ``_maths.py`` or ``_config.py`` alone, or another ``PTOC_FASTMATH``,
leaves ``cpu.py`` and the bytecode of its functions as they were, so Numba would
keep loading machine code compiled from the old maths or with the other flags.

The rule
--------
Compile such kernels with :func:`njit`, naming the files they compile from besides
their own in ``depends_on``. It compiles exactly like :func:`numba.njit` and, when
``ptoc._config.CACHE`` is on, caches with one more part in the key of every cache
entry: :func:`digest` of those files and of the compile options. Any change to them
gives another key, so the kernel is compiled afresh; a change back finds the earlier
entry again (switching ``PTOC_FASTMATH`` back and forth recompiles nothing).

The entries stay where Numba keeps its cache (``__pycache__`` next to the module, or
``NUMBA_CACHE_DIR``). Numba names a function's files after the function *and the line*
it starts on, so every edit that moves a kernel left its old files behind for good (a
development checkout had gathered 1,298 files, 116 MB). So after a helper has compiled,
:func:`prune_stale` deletes, in that cache folder, the files of this Python version of
each kernel compiled with :func:`njit` that name a line it no longer starts on, and those
of functions its module no longer defines. Nothing is deleted at import; entries for
other digests of a current kernel stay (switching back finds them): delete the folder to
reclaim their space.

A kernel module that compiles from its own file only (:mod:`ptoc.kernels.rows`) uses
:func:`njit` too, with no ``depends_on``: its key still covers the compiler options and
the Numba settings, and its old files are pruned (the warm-up of MGRIT's kernels, below,
compiles its kernels too).

Compiled here, run from the cache
---------------------------------
A process that compiles a kernel runs Numba's in-memory JIT code; a later process
runs the object code read back from the disk cache. With fast-math reassociation the
two need not round alike. Measured: the residual-bias gradient differed by about
1e-16, and a 300-step ``ptoc train`` that compiled its kernels ended 2e-13 away from
every later run with the same seed. Loading the kernel back from the cache in the
process that compiled it did not help (it still gave the JIT's bits): that process
has also compiled, on its own, each function the kernel calls, and the difference
comes from those, so what matters is that the process compiles nothing.

So a process never runs a kernel it compiled: a new signature is compiled in a helper
process (``python -m ptoc.kernels._cache``), which saves it, and is then loaded from
the cache, as every later process loads it. Where the cache cannot be written, or the
function cannot be imported by name, the kernel is compiled in the process as before
(every such process then runs the JIT code, alike).

The first run compiles once
---------------------------
Compiling takes seconds per kernel, so a first run (an empty cache) is slow; it says
so once on stderr. Three rules keep it short:

* Kernels come in groups that one kind of run needs together (:data:`_GROUP_OF`): the
  serial sweeps of training and ``loss_and_grad``, the level kernels and grid
  transfers of MGRIT and parareal, and the convolutional ResNet's kernels. The first
  helper for a kernel of a group also runs that group's warm-up parts
  (:data:`_WARM_UPS`, small workloads in :mod:`ptoc.kernels._warm_up`), each part in a
  helper of its own, all at once: one round of helpers compiles what such a run needs,
  on several cores, and nothing of the other groups (``PTOC_WARM_UP=0``: only what is asked for).
  Where the kernel that starts the round runs on the sample-major rows
  (:data:`_ROWS_KERNELS`: widths 8 and 16), the level warm-ups compile the rows kernels
  and no tile kernel, which such a run never calls.
* One process of a machine compiles at a time (a lock file in the cache directory):
  the ranks under ``mpiexec`` need the same kernels at the same moment; the first
  compiles them, the others wait and load them.
* A signature is compiled for the non-literal types of its arguments only
  (:func:`_compile_without_literals`), never once more for a constant.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import pickle
import re
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import numba
from numba.core import sigutils
from numba.core import types as numba_types

from .. import _config

try:  # one compiling process per machine (POSIX); elsewhere none is held
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

try:  # Numba's per-function disk cache, the class that numba.njit(cache=True) uses
    from numba.core.caching import FunctionCache
except ImportError:  # pragma: no cover - only if Numba moves its internals
    FunctionCache = None

Source = ModuleType | str | os.PathLike


@functools.cache
def _file_digest(path: Path) -> bytes:
    return hashlib.sha256(path.read_bytes()).digest()


def _canonical(value: object) -> object:
    """``value`` with sets sorted, so that its ``repr`` does not depend on set order."""
    if isinstance(value, (set, frozenset)):
        return tuple(sorted(value))
    return value


def digest(depends_on: Iterable[Source], options: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the contents of the files ``depends_on`` and of ``options``.

    Parameters
    ----------
    depends_on : iterable of module or path
        The files a kernel compiles from besides the one that defines it; a module
        stands for its ``__file__``.
    options : mapping
        The keyword arguments given to :func:`numba.njit`.

    Returns
    -------
    str
        64 hexadecimal digits; equal digests mean equal files and equal options.
    """
    h = hashlib.sha256()
    for source in depends_on:
        path = Path(source.__file__ if isinstance(source, ModuleType) else source)
        h.update(_file_digest(path.resolve()))
    h.update(repr(sorted((k, _canonical(v)) for k, v in options.items())).encode())
    h.update(repr(codegen_settings()).encode())
    return h.hexdigest()


#: Numba settings (``numba.config``, set from ``NUMBA_*`` environment variables) that change
#: the machine code of a kernel but not Numba's own cache key. Measured: the forward sweep
#: compiled under ``NUMBA_ENABLE_PROFILING=1`` ran 7 times slower (d = 8, S = 16), and
#: without this a later run with the default settings loaded it from the cache.
_CODEGEN_SETTINGS = ("OPT", "LOOP_VECTORIZE", "SLP_VECTORIZE", "ENABLE_AVX",
                     "DEBUGINFO_DEFAULT", "BOUNDSCHECK", "ENABLE_PROFILING")


def codegen_settings() -> tuple:
    """The values of :data:`_CODEGEN_SETTINGS` in ``numba.config`` now (part of every
    kernel's cache key, so kernels compiled under other settings are not reused)."""
    return tuple((name, repr(getattr(numba.config, name, None))) for name in _CODEGEN_SETTINGS)


if FunctionCache is not None:

    class _KeyedCache(FunctionCache):
        """Numba's disk cache of one function, with ``extra_key`` in every index key."""

        def __init__(self, py_func: Callable, extra_key: str):
            self._extra_key = extra_key
            self.read_back: set[int] = set()  # ids of the results loaded from here
            super().__init__(py_func)

        def _index_key(self, sig, codegen):
            return (*super()._index_key(sig, codegen), self._extra_key)

        def save_overload(self, sig, data):
            # a result loaded from this cache is in it already (and Numba cannot
            # serialise a loaded result again)
            if id(data) not in self.read_back:
                super().save_overload(sig, data)


def _compile_without_literals(dispatcher: Any) -> None:
    """Make ``dispatcher`` compile a call's signature with its literal types widened.

    Numba types a kernel's call of another with a constant argument (``n0 = 0`` before a
    loop that sets ``n0 = n1``) first with the literal type ``Literal[int](0)``, then
    with ``int64``, and compiled the callee twice, once for each. The literal version
    is never needed (no kernel asks for :func:`numba.literally`), so every request is
    widened (:func:`numba.core.types.unliteral`) before it is looked up, loaded or
    compiled: one signature, one compile.
    """
    compile_signature = dispatcher.compile

    def compile_widened(sig: Any) -> Any:
        args, return_type = sigutils.normalize_signature(sig)
        if return_type is not None:  # an explicit signature: compiled as given
            return compile_signature(sig)
        return compile_signature(tuple(numba_types.unliteral(a) for a in args))

    dispatcher.compile = compile_widened


def _enable(dispatcher: Any, extra_key: str) -> None:
    """Give ``dispatcher`` a disk cache keyed also on ``extra_key``.

    This does what ``Dispatcher.enable_caching`` (``cache=True``) does, with
    :class:`_KeyedCache` in place of Numba's ``FunctionCache``. If Numba's internals
    are not as expected, the kernel is left uncached (compiled in every process) with
    a warning: slower, never stale.
    """
    if FunctionCache is None or not hasattr(FunctionCache, "_index_key") \
            or not hasattr(dispatcher, "_cache"):
        warnings.warn("ptoc: this Numba's cache internals are not the expected ones; "
                      "compiled kernels are not cached on disk", RuntimeWarning, stacklevel=3)
        return
    try:
        dispatcher._cache = _KeyedCache(dispatcher.py_func, extra_key)
    except RuntimeError:  # Numba found no writable cache directory: compile every time
        return
    _live_files(dispatcher).add(dispatcher._cache._impl.filename_base)
    if os.environ.get(_HELPER) != "1" and _importable(dispatcher.py_func):
        _compile_in_helper(dispatcher)


# --- stale files: what earlier versions of a kernel module left in the cache -------------------

#: ``(cache folder, module file stem) -> (module name, file name bases of the kernels now
#: defined)`` (``"cpu._forward-512.py311"``), filled as :func:`njit` enables each
#: kernel's cache.
_LIVE: dict[tuple[str, str], tuple[str, set[str]]] = {}


def _live_files(dispatcher: Any) -> set[str]:
    py_func = dispatcher.py_func
    key = (str(dispatcher._cache._cache_path), Path(py_func.__code__.co_filename).stem)
    return _LIVE.setdefault(key, (py_func.__module__, set()))[1]


def prune_stale(directory: str | os.PathLike, stem: str, live: set[str],
                defined: Callable[[str], bool] = lambda name: True) -> list[str]:
    """Delete the cache files in ``directory`` of module ``stem`` that belong to no live
    kernel; returns their names.

    ``live`` holds the file name bases of the kernels the module now defines; ``defined``
    says whether the module still defines a name. A file named as Numba names a
    function's cache files (``stem.qualname-line.pyXY``, then ``.nbi`` or ``.N.nbc``), of
    the Python tag of the live bases, goes if its function is a live kernel at another
    line, or if the module no longer defines its function (a kernel since removed). Other
    functions' files (a plain ``numba.njit(cache=True)`` function of the same module),
    other Python versions' and other modules' files, bytecode and the lock file stay; a
    file that cannot be deleted (another process removed it, no permission) is left.
    """
    tags = {base.rsplit(".", 1)[-1] for base in live}
    names_of = {base[len(stem) + 1:base.rindex("-")] for base in live}
    pattern = re.compile(rf"^({re.escape(stem)}\.([\w.]+)-\d+\.(py\w+))(\.\d+)?\.(nbi|nbc)$")
    removed = []
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return removed
    for name in names:
        match = pattern.match(name)
        if match is None or match.group(3) not in tags or match.group(1) in live:
            continue
        qualname = match.group(2)
        if qualname not in names_of and defined(qualname.split(".")[0]):
            continue
        try:
            os.unlink(os.path.join(directory, name))
        except OSError:
            continue
        removed.append(name)
    return removed


def _prune_after_compile(dispatcher: Any) -> None:
    """:func:`prune_stale` for every kernel module whose cache shares ``dispatcher``'s
    folder (called with the machine's compile lock held)."""
    directory = str(dispatcher._cache._cache_path)
    for (folder, stem), (module_name, live) in _LIVE.items():
        module = sys.modules.get(module_name)
        if folder == directory and module is not None:
            prune_stale(folder, stem, live, lambda name, m=module: hasattr(m, name))


# --- compiled in a helper process, run from the cache (module docstring) --------------------

#: Set to "1" in the environment of the helper process, which compiles in-process.
_HELPER = "PTOC_KERNEL_HELPER"

#: Whether this process has said yet that it compiles (it says so once).
_said = False

#: The groups of kernels whose warm-up this process has run (or left to another process).
_warmed: set[str] = set()

#: The level kernels that only a caller on the sample-major rows runs (width 8 or 16, a
#: batch of whole vectors): when one of them starts the group's warm-up, the warm-up
#: compiles the rows kernels and no tile kernel (``_warm_up.CALLER_ROWS``).
_ROWS_KERNELS = frozenset(
    f"ptoc.kernels.cpu.{name}"
    for name in ("_layer_gradients_rows_one_thread", "_level_derivatives_rows",
                 "_state_runs_rows_one_thread", "_state_points_rows_one_thread",
                 "_adjoint_runs_rows_one_thread", "_adjoint_points_rows_one_thread",
                 "_state_runs_residuals_rows_one_thread",
                 "_state_correct_runs_rows_one_thread",
                 "_adjoint_runs_residuals_rows_one_thread",
                 "_adjoint_correct_runs_rows_one_thread",
                 "_state_runs_rows_parallel", "_state_points_rows_parallel",
                 "_adjoint_runs_rows_parallel", "_adjoint_points_rows_parallel"))

#: The group of each kernel that one kind of run needs together with others
#: (``module.name``). The first helper that a process starts for a kernel of a group also
#: runs the group's warm-up parts (:data:`_WARM_UPS`).
_GROUP_OF = {
    **{f"ptoc.kernels.cpu.{name}": "sweeps"
       for name in ("_forward", "_adjoint_block", "_add_partials", "_forward_one_thread",
                    "_forward_rows_one_thread", "_adjoint_rows_one_thread",
                    "_adjoint_block_one_thread", "_add_partials_one_thread")},
    **{f"ptoc.kernels.cpu.{name}": "levels"
       for name in ("_state_runs", "_state_points", "_adjoint_runs", "_adjoint_points",
                    "_layer_grad_block", "_level_derivatives")},
    **dict.fromkeys(_ROWS_KERNELS, "levels"),
    **{f"ptoc.kernels.rows.{name}": "levels"
       for name in ("_correct", "_copy_rows", "_sumsq_diff")},
    **{f"ptoc.kernels.conv_cpu.{name}": "conv"
       for name in ("_layer", "_adjoint", "_sum_partials", "_state_runs", "_adjoint_runs",
                    "_state_points", "_adjoint_points")},
}


def _importable(fn: Callable) -> bool:
    """Whether a helper process can find ``fn`` by module and name."""
    return fn.__module__ not in ("__main__", None) and "<locals>" not in fn.__qualname__


def _compile_in_helper(dispatcher: Any) -> None:
    """Make ``dispatcher`` compile a new signature in a helper process and load it from
    the disk cache; if that fails, compile it here."""
    compiler = dispatcher._compiler
    in_process = compiler.compile

    def compile_then_load(args: Any, return_type: Any) -> Any:
        if return_type is not None:  # an explicit return type: not a call's signature
            return in_process(args, return_type)
        loaded = _compiled_elsewhere(dispatcher, tuple(args))
        if loaded is None:
            return in_process(args, return_type)
        dispatcher._cache.read_back.add(id(loaded))
        # registered as Numba registers a cache hit
        dispatcher.targetctx.insert_user_function(loaded.entry_point, loaded.fndesc,
                                                  [loaded.library])
        return loaded

    compiler.compile = compile_then_load


def _compiled_elsewhere(dispatcher: Any, sig: tuple) -> Any:
    """``dispatcher``'s compile result for ``sig``, compiled by another process and loaded
    from the disk cache, or None.

    One process of a machine compiles at a time (a lock file in the cache directory):
    under ``mpiexec`` the first rank to need a kernel compiles it and the others wait,
    then find it in the cache. The operating system releases the lock of a process that
    dies, so a failed rank never blocks the others.
    """
    with _machine_lock(Path(dispatcher._cache._cache_path)):
        loaded = dispatcher._cache.load_overload(sig, dispatcher.targetctx)
        if loaded is None and _run_helpers(dispatcher.py_func, sig):
            loaded = dispatcher._cache.load_overload(sig, dispatcher.targetctx)
            _prune_after_compile(dispatcher)
    group = _GROUP_OF.get(f"{dispatcher.py_func.__module__}.{dispatcher.py_func.__qualname__}")
    if loaded is not None and group:  # this process or another has warmed the group up
        _warmed.add(group)
    return loaded


@contextlib.contextmanager
def _machine_lock(directory: Path) -> Iterator[None]:
    """Hold ``directory/ptoc-compile.lock`` (an exclusive ``flock``) for the block; where
    that is not possible (no ``fcntl``, a read-only directory), hold nothing."""
    if fcntl is None:
        yield
        return
    try:
        directory.mkdir(parents=True, exist_ok=True)
        handle = open(directory / "ptoc-compile.lock", "a")  # noqa: SIM115 - held below
    except OSError:
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run_helpers(fn: Callable, sig: tuple) -> bool:
    """Compile ``fn`` for ``sig`` in a helper process, and the first time a kernel of its
    group is compiled, that group's warm-up parts, each in a helper of its own, all at
    once; True if ``fn`` was compiled."""
    global _said
    group = _GROUP_OF.get(f"{fn.__module__}.{fn.__qualname__}")
    parts = _WARM_UPS[group] if _config.WARM_UP and group and group not in _warmed else ()
    if group:
        _warmed.add(group)
    if not _said:
        print("ptoc: compiling the Numba kernels for this machine (once, 10 to 30 s; later "
              "runs load them from Numba's disk cache)", file=sys.stderr, flush=True)
        _said = True
    # the warm-ups run on the caller's thread count (the kernels that a run picks depend
    # on it), and a caller on the rows (widths 8 and 16) gets the rows kernels warmed up,
    # any other the tiles
    caller = {"caller_threads": numba.get_num_threads(),
              "caller_rows": f"{fn.__module__}.{fn.__qualname__}" in _ROWS_KERNELS}
    jobs = [{"module": fn.__module__, "name": fn.__qualname__, "sig": sig,
             "warm_up": parts[:1]} | caller]
    jobs += [{"warm_up": (part,)} | caller for part in parts[1:]]
    helpers = []
    try:
        for job in jobs:
            helper = subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      env=dict(os.environ, **{_HELPER: "1"}))
            helpers.append(helper)
            helper.stdin.write(pickle.dumps(job | {"path": list(sys.path)}))
            helper.stdin.close()
    except OSError:
        pass
    codes = [helper.wait() for helper in helpers]
    return len(codes) == len(jobs) and codes[0] == 0


#: The warm-up parts of each group of kernels, run at once in helpers of their own: functions
#: of :data:`_WARM_UP_MODULE` (imported by name in the helper, so that this module, which
#: the kernel modules import, does not import the package the workloads use).
_WARM_UP_MODULE = "ptoc.kernels._warm_up"
_WARM_UPS: dict[str, tuple[str, ...]] = {
    "sweeps": ("_warm_up_forward", "_warm_up_adjoint"),
    "levels": ("_warm_up_level_states", "_warm_up_level_adjoints"),
    "conv": ("_warm_up_conv_gradient", "_warm_up_conv_levels"),
}


def _helper_main() -> int:
    """The helper process: compile what the payload on stdin names, then run its warm-up
    parts."""
    job = pickle.loads(sys.stdin.buffer.read())
    sys.path[:] = job["path"]
    import importlib

    if "module" in job:
        dispatcher = importlib.import_module(job["module"])
        for part in job["name"].split("."):
            dispatcher = getattr(dispatcher, part)
        dispatcher.compile(job["sig"])
    warm_up = importlib.import_module(_WARM_UP_MODULE) if job["warm_up"] else None
    if warm_up is not None:
        warm_up.CALLER_ROWS = job.get("caller_rows", False)
        # the caller's thread count (a rank of ``mpiexec`` sets one thread in the program,
        # not in the environment the helper inherits), so that the workloads take the
        # paths the caller's run takes
        numba.set_num_threads(max(1, min(job.get("caller_threads", 1),
                                         numba.config.NUMBA_NUM_THREADS)))
    for part in job["warm_up"]:
        try:
            getattr(warm_up, part)()
        except Exception:  # noqa: BLE001 - a warm-up only: what it misses compiles later
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(_helper_main())


def njit(depends_on: Iterable[Source] = (), **options: Any) -> Callable[[Callable], Any]:
    """:func:`numba.njit` with a disk cache that also covers ``depends_on`` and ``options``.

    Parameters
    ----------
    depends_on : iterable of module or path
        The files the decorated function compiles code from besides its own file, such
        as the modules of the jitable functions it calls.
    **options
        Keyword arguments of :func:`numba.njit` (``parallel``, ``fastmath``, ...), but not
        ``cache``: the function is cached when ``ptoc._config.CACHE`` is on.

    Returns
    -------
    decorator
        Turns a Python function into a Numba dispatcher.

    Examples
    --------
    In a kernel module that inlines :mod:`ptoc._maths`::

        @njit(depends_on=(_maths, _config), parallel=True, fastmath=True)
        def kernel(x): ...
    """
    if "cache" in options:
        raise TypeError("ptoc.kernels._cache.njit caches by itself (ptoc._config.CACHE); "
                        "do not pass cache=")
    depends_on = tuple(depends_on)

    def decorate(fn: Callable) -> Any:
        dispatcher = numba.njit(**options)(fn)
        _compile_without_literals(dispatcher)
        if _config.CACHE:
            try:
                key = digest(depends_on, options)
            except OSError:  # a source that is not a readable file (a zip install)
                return dispatcher  # uncached: slower, never stale
            _enable(dispatcher, key)
        return dispatcher

    return decorate
