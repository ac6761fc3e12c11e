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
"""

from __future__ import annotations

import abc
import copy
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np


class RankFailedError(RuntimeError):
    """Raised on the other ranks of a simulated run when one rank failed."""


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
        self.timeout = float(timeout)

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

    def _send(self, payload, dest, tag):
        self._pending.append(self.mpi.isend(payload, dest=dest, tag=tag))
        if len(self._pending) > 64:
            self._pending = [r for r in self._pending if not r.Test()]

    def _recv(self, source, tag):
        return self.mpi.recv(source=source, tag=tag)

    def _allgather(self, payload):
        return self.mpi.allgather(payload)

    def run(self, program):
        try:
            return program(self)
        finally:
            self.finish()

    def finish(self) -> None:
        """Wait until every message this rank sent has been delivered."""
        for request in self._pending:
            request.wait()
        self._pending.clear()


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


def run_program(runner: SimulatedRanks | Communicator, program: Callable[[Communicator], Any]
                ) -> Any:
    """Run ``program`` on ``runner``'s ranks and return this process's result (rank 0's
    for simulated ranks, whose results are all computed here)."""
    if isinstance(runner, SimulatedRanks):
        return runner.run(program)[0]
    return runner.run(program)
