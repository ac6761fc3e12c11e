"""The disk cache of the compiled kernels (ptoc.kernels._cache): never stale, deletes nothing."""

import os
import subprocess
import sys
from pathlib import Path

import numba
import numpy as np
import pytest

import ptoc
from ptoc import _config
from ptoc.kernels import _cache

ROOT = Path(ptoc.__file__).resolve().parents[1]


def _python(code: str, cwd: Path, cache_dir: Path, *paths: Path) -> str:
    """Run ``code`` in a fresh interpreter (ptoc importable, Numba's cache in ``cache_dir``)."""
    env = os.environ | {
        "NUMBA_CACHE_DIR": str(cache_dir),
        "PTOC_CACHE": "1",
        "PYTHONPATH": os.pathsep.join(str(p) for p in (*paths, ROOT)),
    }
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip()


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_importing_the_cpu_kernels_deletes_and_changes_no_file(tmp_path):
    cache = tmp_path / "cache"
    code = "import ptoc.kernels.cpu"
    _python(code, tmp_path, cache)  # Numba makes the cache directories of the kernels
    dirs = [p for p in cache.rglob("*") if p.is_dir()]
    assert dirs
    for i, directory in enumerate(dirs):  # entries as Numba names them, and others
        (directory / f"cpu._forward-{i}.py311.nbi").write_bytes(b"an older index")
        (directory / f"cpu._forward-{i}.py311.1.nbc").write_bytes(b"older machine code")
        (directory / "ptoc_kernels_cpu.sha256").write_text("a stamp of older maths")
    before = _files(cache)
    _python(code, tmp_path, cache)
    assert _files(cache) == before


_MATHS = "def value():\n    return {}\n"

_KERNELS = """
import numba
import numpy as np
from numba.extending import register_jitable

import fake_maths
from ptoc.kernels import _cache

register_jitable(fake_maths.value)


@_cache.njit(depends_on=(fake_maths,))
def ours(x):
    return x + fake_maths.value()


@numba.njit(cache=True)
def plain(x):
    return x + fake_maths.value()
"""

_RUN = ("from user_kernels import ours, plain; "
        "print(ours(1.0), plain(1.0), sum(ours.stats.cache_hits.values()))")


def test_a_cached_kernel_follows_the_files_it_inlines(tmp_path):
    """The staleness problem and its fix, with a kernel that inlines another file."""
    maths = tmp_path / "fake_maths.py"
    (tmp_path / "user_kernels.py").write_text(_KERNELS)
    cache = tmp_path / "cache"

    def run(value: float) -> list[str]:
        maths.write_text(_MATHS.format(value))
        return _python(_RUN, tmp_path, cache, tmp_path).split()

    assert run(1.0) == ["2.0", "2.0", "0"]  # compiled and saved
    assert run(1.0) == ["2.0", "2.0", "1"]  # loaded from the cache
    # the inlined file changed: ours recompiles; Numba's plain cache keeps the old code
    assert run(10.0) == ["11.0", "2.0", "0"]
    assert run(1.0) == ["2.0", "2.0", "1"]  # the entry of the earlier digest is still there


@pytest.mark.parametrize("name, value", [("OPT", 0), ("ENABLE_PROFILING", 1),
                                         ("DEBUGINFO_DEFAULT", 1), ("LOOP_VECTORIZE", 0)])
def test_digest_covers_numba_settings_that_change_the_code(monkeypatch, name, value):
    """A kernel compiled under another NUMBA_* code-generation setting (profiling made
    the forward sweep 7 times slower) is not loaded by a run with the defaults."""
    import numba

    base = _cache.digest([], {"parallel": True})
    monkeypatch.setattr(numba.config, name, value)
    assert _cache.digest([], {"parallel": True}) != base


def test_digest_covers_file_contents_and_options(tmp_path):
    source = tmp_path / "maths.py"
    source.write_text("x = 1\n")
    base = _cache.digest([source], {"fastmath": {"contract", "reassoc"}, "parallel": True})
    assert base == _cache.digest([str(source)],
                                 {"parallel": True, "fastmath": {"reassoc", "contract"}})
    assert base != _cache.digest([source], {"fastmath": False, "parallel": True})
    assert base != _cache.digest([], {"fastmath": {"contract", "reassoc"}, "parallel": True})
    other = tmp_path / "other.py"
    other.write_text("x = 2\n")
    assert base != _cache.digest([other], {"fastmath": {"contract", "reassoc"},
                                           "parallel": True})
    assert len(base) == 64 and int(base, 16) >= 0


def test_njit_caches_only_when_the_cache_is_on(tmp_path, monkeypatch):
    monkeypatch.setattr(numba.config, "CACHE_DIR", str(tmp_path))

    def f(x):
        return x + 1

    monkeypatch.setattr(_config, "CACHE", False)
    assert _cache.njit(depends_on=(_config,))(f).stats.cache_path is None
    monkeypatch.setattr(_config, "CACHE", True)
    path = _cache.njit(depends_on=(_config,))(f).stats.cache_path
    assert path is not None and Path(path).is_relative_to(tmp_path)
    with pytest.raises(TypeError, match="cache="):
        _cache.njit(cache=True)


_SAME_SEED = """
import hashlib
import ptoc
data = ptoc.data.peaks(seed=0)
net = ptoc.ResNet(width=8, depth=32, n_in=2, n_classes=5)
p = net.init_params(seed=0)
p.b[...] = 0.1
loss, g = ptoc.loss_and_grad(net, p, data.X_train[:50], data.y_train[:50], target="cpu")
print(repr(loss), *(hashlib.sha256(v.tobytes()).hexdigest() for v in g.to_dict().values()))
"""


@pytest.mark.slow
def test_the_process_that_compiles_gets_the_bits_of_every_later_one(tmp_path):
    """A cold process (empty cache) and a warm one give the same gradient bit for bit.

    With fast-math, the JIT code of the process that compiled a kernel rounded the bias
    gradient differently from the code later processes load from the cache (this very
    problem differed by about 1e-16); now every process runs the code from the cache,
    and the one that compiles says so once."""
    cache = tmp_path / "cache"
    env = os.environ | {"NUMBA_CACHE_DIR": str(cache), "PTOC_CACHE": "1",
                        "PTOC_WARM_UP": "0", "PYTHONPATH": str(ROOT)}

    def run():
        out = subprocess.run([sys.executable, "-c", _SAME_SEED], cwd=tmp_path, env=env,
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-3000:]
        return out.stdout, out.stderr

    cold, cold_err = run()
    warm, warm_err = run()
    assert cold == warm
    assert cold_err.count("compiling the Numba kernels") == 1
    assert "compiling" not in warm_err


def test_a_kernel_called_with_a_constant_compiles_once(tmp_path, monkeypatch):
    """A call with ``n0 = 0`` that a loop later sets to ``n1`` is typed first with the
    literal type of 0, then with int64; Numba compiled the callee for both."""
    monkeypatch.setattr(numba.config, "CACHE_DIR", str(tmp_path))

    @_cache.njit()
    def block(total, n0, n1):
        for n in range(n0, n1):
            total[0] += n

    @_cache.njit()
    def blocks(total, N):
        n0 = 0
        while n0 < N:
            n1 = min(N, n0 + 3)
            block(total, n0, n1)
            n0 = n1

    total = np.zeros(1)
    blocks(total, 10)
    assert total[0] == 45.0
    assert len(block.signatures) == 1


def test_prune_stale_deletes_only_files_of_no_live_kernel(tmp_path):
    """Files of a kernel that moved to another line, or that the module no longer
    defines, go; the live kernels' files, those of other functions the module defines
    (plain Numba caching), other modules', other Python versions', bytecode and the
    lock stay."""
    live = {"cpu._forward-512.py311", "cpu._adjoint_item-600.py311"}
    keep = ["cpu._forward-512.py311.nbi", "cpu._forward-512.py311.1.nbc",
            "cpu._adjoint_item-600.py311.nbi", "cpu._forward-400.py312.nbi",
            "cpu.plain-30.py311.nbi", "conv_cpu._layer-10.py311.nbi",
            "rows._copy_rows-3.py311.nbi", "cpu.cpython-311.pyc", "ptoc-compile.lock",
            "cpux._forward-1.py311.nbi"]
    stale = ["cpu._forward-498.py311.nbi", "cpu._forward-498.py311.1.nbc",
             "cpu._forward-498.py311.2.nbc", "cpu._adjoint_item-7.py311.nbi",
             "cpu._adjoint_item-7.py311.1.nbc", "cpu._adjoint-590.py311.nbi",
             "cpu._adjoint-590.py311.3.nbc"]
    for name in keep + stale:
        (tmp_path / name).write_bytes(b"x")
    defined = {"_forward", "_adjoint_item", "plain"}.__contains__
    removed = _cache.prune_stale(tmp_path, "cpu", live, defined)
    assert sorted(removed) == sorted(stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)
    assert _cache.prune_stale(tmp_path / "missing", "cpu", live) == []


_PRUNE = """
import os, sys
import numpy as np
import ptoc
from ptoc.kernels import cpu

folder = cpu._forward._cache._cache_path
os.makedirs(folder, exist_ok=True)
tag = cpu._forward._cache._impl.filename_base.rsplit(".", 1)[1]
stale = [f"cpu._forward-1.{tag}.nbi", f"cpu._forward-1.{tag}.1.nbc", f"cpu._gone-9.{tag}.nbi"]
for name in stale:
    open(os.path.join(folder, name), "wb").close()
net = ptoc.ResNet(width=3, depth=4, n_in=2, n_classes=2)
X = np.random.default_rng(1).standard_normal((5, 2))
ptoc.loss_and_grad(net, net.init_params(1), X, np.arange(5) % 2)
names = os.listdir(folder)
# this small job runs (and compiles) the one-thread variant of the forward sweep
print(sum(n in names for n in stale),
      cpu._forward_one_thread._cache._impl.filename_base + ".nbi" in names)
"""


@pytest.mark.slow
def test_a_compile_removes_the_files_that_old_kernel_versions_left(tmp_path):
    """After its helpers have compiled, a process deletes the cache files of kernels
    that no longer exist at that line (here planted by hand) and keeps the new ones."""
    env = os.environ | {"NUMBA_CACHE_DIR": str(tmp_path / "cache"), "PTOC_CACHE": "1",
                        "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", _PRUNE], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["0", "True"]


_SIGNATURES = """
import numpy as np
import ptoc
from ptoc.kernels import cpu

net = ptoc.ResNet(width=3, depth=8, n_in=2, n_classes=2)
X = np.random.default_rng(1).standard_normal((5, 2))
p = net.init_params(1)
ptoc.loss_and_grad(net, p, X, np.arange(5) % 2)
ptoc.loss_and_grad(net, p, X, np.arange(5) % 2, solver=ptoc.MGRIT(coarsening=2))
print(len(cpu._adjoint_item.signatures), len(cpu._slot_tasks.signatures))
"""


@pytest.mark.slow
def test_a_helper_called_with_a_prange_index_compiles_once(tmp_path):
    """Numba types a ``prange`` index over an array's shape as unsigned in the parallel
    body and as signed in the function's first typing: a tile helper called with the
    index compiled twice (about 0.8 s of the adjoint sweep's first compilation) until
    the kernels cast it. Compiled in the process (``PTOC_CACHE=0``) to see every
    signature."""
    env = os.environ | {"NUMBA_CACHE_DIR": str(tmp_path), "PTOC_CACHE": "0",
                        "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", _SIGNATURES], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["1", "1"]


_MGRIT_GRADIENT = """
import sys
import numpy as np
import ptoc
from ptoc.kernels import _cache
from ptoc.parallel.driver import parallel_gradient

rounds = []
run_helpers = _cache._run_helpers
_cache._run_helpers = lambda fn, sig: rounds.append(fn.__name__) or run_helpers(fn, sig)
net = ptoc.ResNet(width=3, depth=16, n_in=2, n_classes=2)
X = np.random.default_rng(1).standard_normal((5, 2))
res = parallel_gradient(net, net.init_params(1), X, np.arange(5) % 2, ptoc.MGRIT(coarsening=2))
print(repr(res.loss), res.grads["K"].tobytes().hex())
print(len(rounds), file=sys.stderr)
"""


@pytest.mark.slow
def test_processes_starting_at_once_compile_once_with_one_round_of_helpers(tmp_path):
    """Two processes (as the ranks under mpiexec) need MGRIT's kernels at once with an
    empty cache: one compiles them all in one round of helper processes (the warm-up of
    the level kernels), while the other waits for it and loads them; both get the same
    bits, and only the one that compiles says so."""
    cache = tmp_path / "cache"
    env = os.environ | {"NUMBA_CACHE_DIR": str(cache), "PTOC_CACHE": "1",
                        "PTOC_WARM_UP": "1", "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", _MGRIT_GRADIENT], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-3000:] for _, err in outs]
    assert outs[0][0] == outs[1][0]
    said = [err.count("compiling the Numba kernels") for _, err in outs]
    rounds = [int(err.strip().splitlines()[-1]) for _, err in outs]
    assert sorted(said) == [0, 1]
    assert sorted(rounds) == [0, 1]


def test_every_grouped_kernel_exists_and_every_group_has_its_warm_up():
    """The group table names real compiled kernels (a renamed kernel would silently lose
    its warm-up) and every group's warm-up parts are functions of the helper module."""
    import importlib

    from numba.core.registry import CPUDispatcher

    from ptoc.kernels import _cache

    for qualified in _cache._GROUP_OF:
        module, name = qualified.rsplit(".", 1)
        kernel = getattr(importlib.import_module(module), name, None)
        assert isinstance(kernel, CPUDispatcher), qualified
    assert set(_cache._GROUP_OF.values()) == set(_cache._WARM_UPS)
    warm_up = importlib.import_module(_cache._WARM_UP_MODULE)
    for parts in _cache._WARM_UPS.values():
        for part in parts:
            assert callable(getattr(warm_up, part)), part


_FUSED_ROWS_KERNELS = tuple(f"_{sweep}_{kind}_rows_one_thread" for sweep in ("state", "adjoint")
                            for kind in ("runs_residuals", "correct_runs"))
_ROWS_LEVEL_KERNELS = tuple(
    f"_{sweep}_{kind}_rows_one_thread" for sweep in ("state", "adjoint")
    for kind in ("runs", "points")) + (
    "_layer_gradients_rows_one_thread", "_level_derivatives_rows")
_PARALLEL_ROWS_KERNELS = tuple(f"_{sweep}_{kind}_rows_parallel" for sweep in ("state", "adjoint")
                               for kind in ("runs", "points"))
_TILE_LEVEL_KERNELS = ("_state_runs", "_state_points", "_adjoint_runs", "_adjoint_points",
                       "_layer_grad_block", "_level_derivatives")


@pytest.mark.parametrize("rows, threads", [(True, 1), (True, 2), (False, 1), (False, 2)])
def test_level_warm_ups_compile_the_rows_kernels_or_the_tiles_as_the_caller_runs(
        rows, threads, monkeypatch):
    """The level kernels on sample-major rows run at widths 8 and 16, and such a caller
    runs no tile level kernel: a helper started by a rows kernel warms up the rows level
    kernels and no tile kernel (with MGRIT's fused passes on one thread, with the
    parallel variants on more), one started by a tile kernel the tiles and no rows
    kernel. The helper runs on the caller's thread count. Every call of a level kernel is
    recorded."""
    import numba

    from ptoc.kernels import _warm_up, cpu

    if threads > numba.config.NUMBA_NUM_THREADS:
        threads = numba.config.NUMBA_NUM_THREADS  # a one-core machine: both cases alike
    calls = []
    names = (_FUSED_ROWS_KERNELS + _ROWS_LEVEL_KERNELS + _PARALLEL_ROWS_KERNELS
             + _TILE_LEVEL_KERNELS)
    for name in names:
        kernel = getattr(cpu, name)
        monkeypatch.setattr(cpu, name, lambda *a, n=name, k=kernel: (calls.append(n), k(*a))[1])
    monkeypatch.setattr(_warm_up, "CALLER_ROWS", rows)
    before = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        _warm_up._warm_up_level_states()
        _warm_up._warm_up_level_adjoints()
    finally:
        numba.set_num_threads(before)
    if rows:
        extra = _FUSED_ROWS_KERNELS if threads == 1 else _PARALLEL_ROWS_KERNELS
        expected = _ROWS_LEVEL_KERNELS + extra
    else:
        expected = _TILE_LEVEL_KERNELS
    assert set(expected) <= set(calls)
    assert not (set(names) - set(expected)) & set(calls)


def test_helpers_are_told_whether_the_caller_runs_on_the_rows(monkeypatch):
    """Every helper of a group's warm-up learns the caller's thread count, on which it
    runs its workloads, and whether the kernel that started it is one of the rows
    kernels (:data:`ptoc.kernels._cache._ROWS_KERNELS`)."""
    import numba

    from ptoc.kernels import _cache

    sent = []

    class FakeHelper:
        def __init__(self, *args, **kwargs):
            self.stdin = self

        def write(self, data):
            import pickle

            sent.append(pickle.loads(data))

        def close(self):
            pass

        def wait(self):
            return 0

    monkeypatch.setattr(_cache.subprocess, "Popen", FakeHelper)
    from ptoc.kernels import cpu

    for kernel, rows in ((cpu._state_runs, False), (cpu._state_runs_rows_one_thread, True)):
        sent.clear()
        monkeypatch.setattr(_cache, "_warmed", set())
        _cache._run_helpers(kernel, ())
        assert len(sent) == 2 and all(job["caller_rows"] is rows for job in sent)
        assert all(job["caller_threads"] == numba.get_num_threads() for job in sent)
