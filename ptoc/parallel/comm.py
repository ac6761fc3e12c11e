"""Communication behind a small interface: one rank, P simulated ranks, or MPI.

Every layer-parallel algorithm in ptoc is written once, as the program of one rank
(SPMD), against :class:`Communicator`:

* ``rank``, ``size``;
* ``send(obj, dest, tag)`` (buffered: returns at once) and ``recv(source, tag)``
  (blocks until the matching message arrives; messages between a pair of ranks with
  the same tag arrive in the order they were sent);
* ``allgather(obj)``, a list of every rank's ``obj`` in rank order, from which each
  rank computes reductions itself, in rank order, so that sums are bitwise the same
  on every rank and for every implementation;
* ``count(steps)``: the layer steps this rank just did.

Implementations: :class:`SingleRank` (no parallelism), :class:`SimulatedRanks`
(``P`` ranks as threads of one process, deterministic, for tests and teaching) and
:class:`MPIRanks` (mpi4py). Solvers never call MPI directly, and relaxation code never
sends: communication happens between the phases of an algorithm.

Critical path. Each rank keeps a logical clock of layer steps (Lamport's clock):
``count`` advances it, every message carries the sender's clock, and a receive sets
the receiver's clock to at least the sender's. At the end, the largest clock is the
number of layer steps a parallel machine must execute one after another, given this
algorithm's dependencies (with free communication): the critical path. The sum of
all ranks' counts is the total work.

Failures. A rank that fails must never leave the others waiting for it forever, and
ranks handed different problems must never return an answer. Two rules, kept here:

1. *Agreement at the start of a solve.* Each entry point runs its input checks on
   every rank inside :func:`agree` (``run_program(..., check=...)``); the checks return
   the facts the ranks must share (the
   network, the solver, digests of the batch, ...). One collective exchanges every
   rank's outcome: an exception on one rank, or facts that differ, end the solve on
   every rank together with an ordinary exception that names the rank (or what
   differs, e.g. "ranks disagree on the network depth: rank 0 has 13, rank 1 has
   16"). The ranks stay in step, so a caller may catch it and carry on.
2. *Anything else ends an MPI job.* After the start, the ranks wait on each other's
   messages; an exception on one of them cannot be agreed on, because the others
   are blocked in a receive. :meth:`MPIRanks.run` therefore prints the traceback and
   calls ``Abort``, which ends every process of the job, unless the exception is one
   that is raised on every rank at the same point (a :class:`CollectiveError`, such as
   :class:`~ptoc.parallel.DivergenceError`, raised after the residual is summed, or
   the exception :func:`agree` raised). An exception that escapes a script on one
   rank only, before any solve, would also leave the others waiting: creating an
   :class:`MPIRanks` of several ranks installs a ``sys.excepthook`` that prints it and
   aborts the job (as ``python -m mpi4py`` does; an exception raised before that
   :class:`MPIRanks` exists is out of ptoc's reach, and a rank that catches an
   exception and exits normally while the others still run leaves them waiting).
   A failing rank writes its report, waits :data:`ABORT_GRACE` seconds so that
   ``mpiexec`` forwards it, then aborts.

:class:`SimulatedRanks` behaves the same way in one process: a rank's exception
releases the ranks waiting on it and is re-raised by :meth:`SimulatedRanks.run`.
"""

from __future__ import annotations

import abc
import copy
import dataclasses
import enum
import hashlib
import os
import queue
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._checks import check_positive_float


class RankFailedError(RuntimeError):
    """Raised on the other ranks of a simulated run when one rank failed."""


class CollectiveError(Exception):
    """Base of the errors a program raises on every rank at the same point (after a
    collective operation), so that no rank is left waiting: such an error ends an
    MPI program normally instead of aborting the job (see the module doc)."""


class RanksDisagreeError(CollectiveError, ValueError):
    """The ranks were handed different problems, or the input checks failed on some
    ranks only (raised on every rank alike by :func:`agree`)."""


@dataclass
class StepCount:
    """Layer steps of one run: total work and the critical path (see the module doc)."""

    total: int
    critical_path: int


class Communicator(abc.ABC):
    """The communication interface of the layer-parallel solvers (see the module doc)."""

    def __init__(self) -> None:
        self.clock = 0  # logical clock, in layer steps
        self.steps = 0  # layer steps done by this rank
        self.agreed_failure: BaseException | None = None  # the last error agree() raised

    rank: int
    size: int

    # --- point to point -------------------------------------------------------------------
    def send(self, obj: Any, dest: int, tag: int) -> None:
        """Send ``obj`` to rank ``dest`` (buffered; returns at once)."""
        self._send((self.clock, obj), dest, tag)

    def recv(self, source: int, tag: int) -> Any:
        """Receive the next object from ``source`` with ``tag`` (blocks)."""
        clock, obj = self._recv(source, tag)
        self.clock = max(self.clock, clock)
        return obj

    # --- collectives ------------------------------------------------------------------------
    def allgather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order; synchronises the logical clocks."""
        pairs = self._allgather((self.clock, obj))
        self.clock = max(c for c, _ in pairs)
        return [o for _, o in pairs]

    def sum(self, value: float) -> float:
        """Sum of ``value`` over the ranks, added in rank order (bitwise reproducible)."""
        total = 0.0
        for v in self.allgather(float(value)):
            total += v
        return total

    def max(self, value: float) -> float:
        return max(self.allgather(float(value)))

    def bcast(self, obj: Any, root: int = 0) -> Any:
        """``root``'s ``obj`` on every rank."""
        return self.allgather(obj if self.rank == root else None)[root]

    # --- step counting ----------------------------------------------------------------------
    def count(self, steps: int = 1) -> None:
        """Record ``steps`` layer steps done by this rank."""
        self.steps += steps
        self.clock += steps

    def step_count(self) -> StepCount:
        """Total steps over all ranks and the critical path (collective)."""
        pairs = self._allgather((self.clock, self.steps))
        return StepCount(total=sum(s for _, s in pairs), critical_path=max(c for c, _ in pairs))

    def reset_count(self) -> None:
        self.clock = 0
        self.steps = 0

    # --- implementation hooks ---------------------------------------------------------------
    @abc.abstractmethod
    def _send(self, payload: Any, dest: int, tag: int) -> None: ...

    @abc.abstractmethod
    def _recv(self, source: int, tag: int) -> Any: ...

    @abc.abstractmethod
    def _allgather(self, payload: Any) -> list[Any]: ...

    def run(self, program: Callable[[Communicator], Any]) -> Any:
        """Run the SPMD ``program`` on this communicator and return this rank's result."""
        return program(self)


class SingleRank(Communicator):
    """One rank: no parallelism, no messages."""

    rank = 0
    size = 1

    def _send(self, payload, dest, tag):
        raise RuntimeError("a single rank cannot send messages")

    def _recv(self, source, tag):
        raise RuntimeError("a single rank cannot receive messages")

    def _allgather(self, payload):
        return [payload]


def _read_only(obj: Any) -> Any:
    """Mark every NumPy array inside ``obj`` (nested lists, tuples, dicts) read-only."""
    import numpy as np

    if isinstance(obj, np.ndarray):
        obj.setflags(write=False)
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            _read_only(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            _read_only(item)
    return obj


class _Hub:
    """Shared state of a simulated run: message queues and a barrier for collectives."""

    def __init__(self, size: int, timeout: float):
        self.size = size
        self.timeout = timeout
        self.lock = threading.Lock()
        self.queues: dict[tuple[int, int, int], queue.Queue] = {}
        self.slots: list[Any] = [None] * size
        self.barrier = threading.Barrier(size)
        self.failed = threading.Event()

    def channel(self, source: int, dest: int, tag: int) -> queue.Queue:
        key = (source, dest, tag)
        with self.lock:
            q = self.queues.get(key)
            if q is None:
                q = self.queues[key] = queue.Queue()
            return q


class _SimulatedRank(Communicator):
    def __init__(self, hub: _Hub, rank: int):
        super().__init__()
        self.hub = hub
        self.rank = rank
        self.size = hub.size

    def _check(self, peer: int, what: str) -> None:
        if not (isinstance(peer, int) and 0 <= peer < self.size) or peer == self.rank:
            raise ValueError(f"rank {self.rank}: cannot {what} rank {peer!r} of {self.size}")

    def _send(self, payload, dest, tag):
        self._check(dest, "send to")
        # a message is a copy, as over MPI: ranks never share mutable objects
        self.hub.channel(self.rank, dest, tag).put(copy.deepcopy(payload))

    def _recv(self, source, tag):
        self._check(source, "receive from")
        q = self.hub.channel(source, self.rank, tag)
        waited = 0.0
        while True:
            if self.hub.failed.is_set():
                raise RankFailedError(f"rank {self.rank}: another rank failed")
            try:
                return q.get(timeout=0.05)
            except queue.Empty:
                waited += 0.05
                if waited > self.hub.timeout:
                    raise RuntimeError(
                        f"rank {self.rank}: no message from rank {source} (tag {tag}) after "
                        f"{self.hub.timeout:g} s: the SPMD program is deadlocked"
                    ) from None

    def _allgather(self, payload):
        hub = self.hub
        try:
            hub.barrier.wait(timeout=hub.timeout)
            # each rank copies its own payload once (as a message would) and marks its
            # arrays read-only: every rank then reads the same copies, and a rank that
            # tried to modify what it received would fail loudly instead of corrupting
            # another rank's data
            hub.slots[self.rank] = _read_only(copy.deepcopy(payload))
            hub.barrier.wait(timeout=hub.timeout)
            out = list(hub.slots)
            hub.barrier.wait(timeout=hub.timeout)
        except threading.BrokenBarrierError:
            raise RankFailedError(f"rank {self.rank}: another rank failed or timed out") from None
        return out


def is_root(comm: Any) -> bool:
    """Whether this process should write a run's files: False only on the ranks other
    than 0 of a :class:`Communicator` (MPI); simulated ranks (``None``, a number,
    :class:`SimulatedRanks`) all live in one process, which writes once."""
    return not isinstance(comm, Communicator) or comm.rank == 0


class SimulatedRanks:
    """``size`` ranks simulated by threads of this process.

    ``SimulatedRanks(4).run(program)`` runs ``program(comm)`` once per rank, each with
    its own :class:`Communicator`, and returns the list of results in rank order. If
    a rank raises, the others are released (no hang) and the first failure in rank
    order is re-raised. Compiled kernels hold the interpreter lock, so ranks take
    turns: this is a faithful simulation of the algorithm, not a speed-up.

    Parameters
    ----------
    size : int
        Number of ranks.
    timeout : float
        Seconds a rank may wait for a message before the run is declared deadlocked.
    """

    def __init__(self, size: int, timeout: float = 300.0):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"the number of simulated ranks must be a positive integer, "
                             f"got {size!r}")
        self.size = size
        self.timeout = check_positive_float("SimulatedRanks timeout (seconds)", timeout)

    def run(self, program: Callable[[Communicator], Any]) -> list[Any]:
        hub = _Hub(self.size, self.timeout)
        results: list[Any] = [None] * self.size
        errors: list[BaseException | None] = [None] * self.size

        def target(rank: int) -> None:
            comm = _SimulatedRank(hub, rank)
            try:
                results[rank] = program(comm)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
                errors[rank] = exc
                hub.failed.set()
                hub.barrier.abort()

        if self.size == 1:
            target(0)
        else:
            threads = [threading.Thread(target=target, args=(r,), name=f"ptoc-rank-{r}",
                                        daemon=True) for r in range(self.size)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        real = [e for e in errors if e is not None and not isinstance(e, RankFailedError)]
        if real:
            raise real[0]
        if any(e is not None for e in errors):
            raise next(e for e in errors if e is not None)
        return results


class MPIRanks(Communicator):
    """The ranks of an MPI communicator (mpi4py), default ``MPI.COMM_WORLD``.

    Objects go with mpi4py's pickle-based ``isend``/``recv``: sends return at once,
    as the interface promises (a blocking ``send`` could wait for the receiver and
    deadlock two ranks sending to each other), and their requests are completed by
    :meth:`finish`, which :meth:`run` calls at the end of a program.

    A program that fails on this rank with anything but an error raised on every rank
    at once aborts the job (:meth:`run`); with several ranks, an exception that
    escapes the script does too (see the module doc, *Failures*).
    """

    def __init__(self, mpi_comm: Any = None):
        super().__init__()
        try:
            from mpi4py import MPI
        except ImportError as exc:
            raise ImportError("MPI needs mpi4py and an MPI library: pip install 'ptoc[mpi]'"
                              ) from exc
        self.mpi = mpi_comm if mpi_comm is not None else MPI.COMM_WORLD
        self.rank = self.mpi.Get_rank()
        self.size = self.mpi.Get_size()
        self._pending: list[Any] = []
        if self.size > 1:
            _abort_on_uncaught_exceptions(self.mpi)

    def _send(self, payload, dest, tag):
        self._pending.append(self.mpi.isend(payload, dest=dest, tag=tag))
        if len(self._pending) > 64:
            self._pending = [r for r in self._pending if not r.Test()]

    def _recv(self, source, tag):
        return self.mpi.recv(source=source, tag=tag)

    def _allgather(self, payload):
        return self.mpi.allgather(payload)

    def run(self, program):
        """Run ``program`` on this rank; an exception that the other ranks do not raise
        too ends the whole job (``Abort``) after its traceback is printed."""
        try:
            result = program(self)
        except BaseException as exc:
            if self.size > 1 and not (isinstance(exc, CollectiveError)
                                      or exc is self.agreed_failure):
                _abort(self.mpi, "failed in a layer-parallel program")
            raise
        self.finish()
        return result

    def finish(self) -> None:
        """Wait until every message this rank sent has been delivered."""
        for request in self._pending:
            request.wait()
        self._pending.clear()


#: Seconds a failing rank waits, after writing its report, before it aborts the job:
#: ``mpiexec`` may drop output still on its way when the job is torn down.
ABORT_GRACE = 0.3


def _abort(mpi_comm: Any, what: str) -> None:
    """Print the exception being handled, naming this rank, and abort ``mpi_comm``'s job."""
    rank, size = mpi_comm.Get_rank(), mpi_comm.Get_size()
    report = (f"ptoc: rank {rank} of {size} {what}; aborting the MPI job (the other ranks "
              f"would wait for it forever):\n{traceback.format_exc()}")
    sys.stderr.write(report)
    sys.stderr.flush()
    time.sleep(ABORT_GRACE)
    mpi_comm.Abort(1)
    os._exit(1)  # should Abort return, run no more Python code on this rank


_EXCEPTHOOK_INSTALLED = False


def _abort_on_uncaught_exceptions(mpi_comm: Any) -> None:
    """Make an exception that escapes this process abort the MPI job (once per process):
    otherwise the process would wait in ``MPI_Finalize`` and the others in their next
    message, forever."""
    global _EXCEPTHOOK_INSTALLED
    if _EXCEPTHOOK_INSTALLED:
        return
    _EXCEPTHOOK_INSTALLED = True
    previous = sys.excepthook

    def hook(kind, value, tb):
        if issubclass(kind, KeyboardInterrupt):  # mpiexec interrupts every rank itself
            previous(kind, value, tb)
            return
        try:
            raise value
        except BaseException:  # noqa: BLE001 - _abort prints it
            _abort(mpi_comm, "stopped on an uncaught exception")

    sys.excepthook = hook


# --- agreement at the start of a solve -------------------------------------------------------

def digest(array: Any) -> str:
    """A short description of an array that ranks can compare cheaply: its shape, dtype
    and a hash of its bytes (``"None"`` for None)."""
    if array is None:
        return "None"
    a = np.ascontiguousarray(array)
    content = hashlib.blake2b(a.tobytes(), digest_size=8).hexdigest()
    return f"shape {a.shape} {a.dtype}, content hash {content}"


def config_facts(what: str, obj: Any) -> dict[str, str]:
    """``{"<what> <field>": repr(value)}`` for a dataclass (a network, a solver), so that
    :func:`agree` names the field that differs; ``{what: repr(obj)}`` otherwise."""
    def show(value: Any) -> str:
        return repr(value.value if isinstance(value, enum.Enum) else value)

    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        facts = {what: type(obj).__name__}
        facts.update({f"{what} {f.name}": show(getattr(obj, f.name))
                      for f in dataclasses.fields(obj) if f.compare})
        return facts
    return {what: show(obj)}


def agree(comm: Communicator, check: Callable[[], Mapping[str, str]],
          what: str = "the solve") -> None:
    """Start a solve on every rank together: run ``check`` here, then agree.

    ``check`` does this rank's input checks and returns the facts every rank must share
    (names to short strings: :func:`digest`, :func:`config_facts`). One collective
    exchanges every rank's outcome, and every rank raises alike:

    * the checks failed with the same message on every rank: each rank its own
      exception (the message of a bad input is the same on one rank and on many);
    * they failed on some ranks only, or differently: :class:`RanksDisagreeError`
      naming each failed rank and its message;
    * the facts differ: :class:`RanksDisagreeError` naming each fact that differs and
      every rank's value.

    Parameters
    ----------
    comm : Communicator
    check : callable
        ``check() -> {name: value}``; its exceptions are agreed on, not raised at once.
    what : str
        What is starting, for the messages (e.g. ``"local_gradient"``).

    Raises
    ------
    RanksDisagreeError or the exception of ``check``
        On every rank alike, before the solve starts.
    """
    failure: Exception | None = None
    facts: Mapping[str, str] | None = None
    try:
        facts = check()
    except Exception as exc:  # noqa: BLE001 - agreed on below, then re-raised
        failure = exc
    gathered = comm.allgather((None if failure is None else _describe(failure),
                               None if facts is None else dict(facts)))
    failed = [(r, message) for r, (message, _) in enumerate(gathered) if message is not None]
    error: Exception | None
    if failure is not None and len(failed) == comm.size \
            and len({message for _, message in failed}) == 1:
        error = failure
    elif failed:
        error = RanksDisagreeError(
            f"{what} cannot start: its input checks failed on {len(failed)} of {comm.size} "
            "ranks: " + "; ".join(f"rank {r}: {message}" for r, message in failed))
    else:
        error = _disagreement([f for _, f in gathered])
    if error is None:
        return
    comm.agreed_failure = error
    if error is failure:
        raise failure
    raise error from failure


def _describe(exc: BaseException) -> str:
    """``exc``'s message, after its type unless it is a ValueError or a TypeError (the
    usual errors of a bad input, whose messages say what is wrong)."""
    if isinstance(exc, (ValueError, TypeError)):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def _disagreement(facts: list[dict[str, str]]) -> RanksDisagreeError | None:
    """The error naming every fact on which the ranks differ (None when they agree); a
    fact that some ranks lack (a field of another kind of solver) is not listed, as the
    fact that names the kind differs already."""
    differ = []
    for name in dict.fromkeys(name for f in facts for name in f):
        values = [f.get(name) for f in facts]
        if None not in values and len(set(values)) > 1:
            differ.append(f"the {name}: " + ", ".join(
                f"rank {r} has {v}" for r, v in enumerate(values)))
    if not differ:
        return None
    return RanksDisagreeError("ranks disagree on " + "; on ".join(differ)
                              + " (every rank must be given the same problem)")


def resolve_ranks(comm: Any, default: int | None = None, owner: str = "",
                  one_is_single: bool = False) -> SimulatedRanks | Communicator:
    """What runs an SPMD program for the ``comm=`` argument of a solver or a method.

    ``None``: ``default`` simulated ranks, or one rank (:class:`SingleRank`) when
    ``default`` is None; a positive integer ``P``: ``P`` simulated ranks (with
    ``one_is_single``, ``P = 1`` is a :class:`SingleRank`); a :class:`SimulatedRanks` or
    a :class:`Communicator` (such as :class:`MPIRanks`): itself. Anything else raises
    ``ValueError`` naming what is allowed (and ``owner``, e.g. ``"PGCL"``, when given).
    """
    prefix = f"{owner} " if owner else ""
    if comm is None:
        comm = default
        if comm is None:
            return SingleRank()
    if isinstance(comm, (SimulatedRanks, Communicator)):
        return comm
    if isinstance(comm, (bool, np.bool_)) or not isinstance(comm, (int, np.integer)):
        raise ValueError(f"{prefix}comm must be None, a positive number of simulated ranks, "
                         "ptoc.parallel.SimulatedRanks or a ptoc.parallel Communicator (e.g. "
                         f"MPIRanks()), got {comm!r}")
    if comm < 1:
        raise ValueError(f"{prefix}comm must be a positive number of simulated ranks, "
                         f"got {comm!r}")
    return SingleRank() if comm == 1 and one_is_single else SimulatedRanks(int(comm))


def run_program(runner: SimulatedRanks | Communicator, program: Callable[[Communicator], Any],
                check: Callable[[Communicator], Mapping[str, str]] | None = None,
                what: str = "the solve", every_rank: bool = False) -> Any:
    """Run ``program`` on ``runner``'s ranks and return this process's result.

    Parameters
    ----------
    runner : SimulatedRanks or Communicator
        From :func:`resolve_ranks`.
    program : callable
        ``program(comm)``, the SPMD program of one rank.
    check : callable, optional
        ``check(comm)``: this rank's input checks, returning the facts every rank must
        share; every rank starts with :func:`agree` on it (see the module doc).
    what : str
        What is starting, for the messages of :func:`agree`.
    every_rank : bool
        With simulated ranks, return every rank's result (a list in rank order)
        instead of rank 0's.
    """
    if check is not None:
        def checked(comm: Communicator) -> Any:
            agree(comm, lambda: check(comm), what)
            return program(comm)
    else:
        checked = program
    if isinstance(runner, SimulatedRanks):
        results = runner.run(checked)
        return results if every_rank else results[0]
    return runner.run(checked)
