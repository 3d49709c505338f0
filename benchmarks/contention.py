#!/usr/bin/env python3
"""Contention and scale: zkcelery's leases beside kazoo's recipes, in one interleaved run.

Run it against a running ensemble (``./zk-test.sh``)::

    python benchmarks/contention.py [--hosts H] [--quick] [--json PATH] [--markdown] [--strict]

The figures of issues 12 ("Lease protocol v2") and 24 (ahead of kazoo under contention):

1. one exclusive lock, N blocking contenders (N = 1, 4, 16), one process each, looping on
   acquire (blocking) -> hold 1 ms -> release: acquisitions per second, requests per
   acquisition, p50/p99 wait (from calling acquire to holding), the least and the most
   acquisitions of one process, and the most holders seen at once (must be 1).  zkcelery: a
   ``LockTask`` called directly, ``with self.lock(key, blocking=True)`` in its body; kazoo: one
   ``Lock`` per process, ``acquire()`` / ``release()``;
2. semaphore isolation: requests per uncontended ``semaphore("B", max_leases=2)`` cycle,
   alone and while 8 processes block on semaphore "A" (max_leases=1) that a ninth holds;
3. scale: time (and requests) of that cycle with no other lease held and with 20,000
   unrelated leases held (the real layout: 20,000 semaphore keys, each a container node
   holding one ephemeral lease node);
4. 16 blocking waiters on a semaphore of 2 (1 ms hold): as 1, zkcelery's
   ``semaphore(key, max_leases=2, blocking=True)`` beside kazoo's ``Semaphore(max_leases=2)``
   (most holders at once must be 2).

Also reported for 1 and 4: writes per acquisition (how far the servers' zxid advanced: one
per transaction, a refused create or a failed multi-operation included; every write passes
through the leader's log and its fsync), and the contenders' own CPU time per acquisition
(``process_time``, kazoo's threads included), which matters when 16 processes share a few
cores.

Interleaving: at each point of 1 and 4 the two libraries run in alternate rounds, ABBA with
two rounds each (the first library alternating between points), so that drift of the shared
machine hits both; 2 measures B alone before and after the waiters, 3 alternates (below).  Each
window of uncontended cycles follows one unmeasured cycle: the test ensemble reaps an empty
container within 200 ms (the server's default is a minute), and the first use of a key whose
container was reaped costs two more requests (create, refused; create the container; create).

Processes: a pool of spawned worker processes (never forked from one with a client), worker
``i`` talking to server ``i mod 3`` only.  A worker opens its session (a Celery app of its own
with ``ZOOKEEPER_HOSTS`` naming its one server, or a ``KazooClient``) for a round, warms it,
and closes it after the round, so that idle clients do not send pings during another round.
The contenders of a round all start at one ``time.monotonic()`` instant (one clock for the
whole machine), run for the round's time, and finish the acquisition they are in.

Requests are the servers' own counters: the sum of ``srvr`` -> ``Received`` over all servers
just before and just after a round, less the packets of the probe itself (calibrated by
probing twice back to back at the start).  The same probe reads ``cons``, whose per-session
``recved`` tells what each of our sessions sent (a worker finds its zkcelery session there
from outside, by its socket's local address: zkcelery keeps its client to itself).
Whatever the servers received beyond that came from another client of the ensemble: a
round or window with more than two such packets (or 0.2%) is measured again, up to twice;
if every attempt was disturbed, its requests are counted from our sessions' own counters
(``cons``) instead, and marked with ``*``.

Safety: each contender records the monotonic times just after its acquire returned and just
before it released (an interval inside the time it really held), and the parent sweeps all
processes' intervals for the most that overlap.  More than the lease admits is a correctness
bug: the run then exits with status 1.  Timing targets print PASS/MISS and fail the run only
with ``--strict``.

The 20,000 unrelated leases are zkcelery's own: every worker but the measuring one holds its
share as ``semaphore(generation, i, max_leases=1)`` leases of a task of its own (8 threads
each), so zkcelery makes the real layout itself, a container per key holding one lease
node.  Each worker holds them in a session of its own, of at most 2,000 lease nodes: a
session's ephemeral nodes are deleted by one closeSession transaction that lists their
paths, and one that outgrows ``jute.maxbuffer`` (1 MB) breaks the servers' log
(shared/NOTES.md).  They are released the same way, leaving the empty containers to the
servers' reaper as any release does, and the run goes on once the servers' node count
(``srvr``) is back to what it was before them.  Making and removing them takes seconds
(a few requests per key, every one through the API), so the run alternates (full: none,
held, none, held, none, held, none) and the target is the median of each held batch over
the mean of the batches just before and after it.
kazoo's ``Semaphore`` keeps each semaphore under a path of its own, so unrelated leases
cannot cost it anything: 3 has no kazoo column.

Hosts: ``--hosts``, else ``$ZK_TEST_HOSTS``, else ``.zk-test/hosts`` beside this repository's
``zk-test.sh`` (or in ``$ZK_TEST_DIR``), else ``127.0.0.1:2181,127.0.0.1:2182,127.0.0.1:2183``.
Every run uses a fresh root ``/zkcelery-bench-contention/<id>`` and deletes it at the end.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import math
import os
import shlex
import socket
import stat
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from _common import (
    REPLY_TIMEOUT,
    TARGET_HEADER,
    Child,
    Layout,
    Table,
    Target,
    arguments,
    call_all,
    check_ensemble,
    close_sessions,
    connect,
    delete_root,
    disconnect,
    field_of,
    fmt,
    logger,
    machine_info,
    machine_lines,
    make_app,
    new_root,
    percentile,
    print_report,
    probe_overhead,
    run_from,
    start_together,
    stop_children,
    target_rows,
)
from kazoo.client import KazooClient
from kazoo.recipe.lock import Lock, Semaphore

import zkcelery
from testsupport import ensemble_hosts, four_letter

ROOT_PARENT = "/zkcelery-bench-contention"
TASK = "bench.contention"
KINDS = ("zkcelery", "kazoo")
NODES_PER_SESSION = 2_000  # keeps each filler session's closeSession transaction small
FILLER = "bench.filler"  # the task whose semaphores are the unrelated leases
FILL_THREADS = 8  # per filler worker: leases are taken and released this many at a time
FILL_TIMEOUT = 300.0  # seconds a filler worker may take to take or release its leases
#: Packets from other clients a window may include and still count as measured (a ping or
#: two of an idle client); a window with more is measured again, at most RETRIES more times.
FOREIGN_SLACK = 2
RETRIES = 2
Times = tuple[float, float, float]  # acquire called, held, about to release
log = logger("contention")


# ---------------------------------------------------------------------------
# Plan
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """How much of what: the full run and ``--quick``."""

    quick: bool
    sizes: tuple[int, ...]  # contenders on one lock (scenario 1)
    round_seconds: float  # one round of one library at one point
    rounds: int  # rounds per library per point: 2 is ABBA
    hold: float  # seconds a contender holds the lock
    semaphore_waiters: int  # scenario 4
    isolation_waiters: int  # scenario 2
    cycles: int  # uncontended semaphore cycles per condition (scenarios 2 and 3)
    leases: int  # unrelated leases held (scenario 3)
    scale_rounds: int  # times they are made and removed, between batches without them

    @property
    def pool(self) -> int:
        return max(*self.sizes, self.semaphore_waiters, self.isolation_waiters + 2)


FULL = Plan(False, (1, 4, 16), 2.0, 2, 0.001, 16, 8, 200, 20_000, 3)
QUICK = Plan(True, (1, 4), 0.5, 1, 0.001, 8, 8, 20, 2_000, 1)


# ---------------------------------------------------------------------------
# The servers' counters
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    """Packets received: by every server in all (``srvr``), and per session (``cons``)."""

    received: int
    sessions: dict[int, int]
    nodes: int
    zxid: int  # the highest last-applied transaction id: one more per write


Address = tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address as sockets and ZooKeeper's ``cons`` spell it (``[::1]``, ``fe80::1%2``)."""
    found = ipaddress.ip_address(text.strip("[]").split("%", 1)[0])
    mapped = getattr(found, "ipv4_mapped", None)
    return mapped or found


def cons_connections(text: str) -> Iterator[tuple[Address, int, int]]:
    """(client address, session id, packets received) of each session in a ``cons`` answer.

    A line: `` /127.0.0.1:40730[1](queued=0,recved=7,sent=7,sid=0x1000...,lop=...)``.
    """
    for line in text.splitlines():
        if "sid=" not in line or "recved=" not in line:
            continue
        head, body = line.split("(", 1)
        host, _, port = head.strip().rsplit("[", 1)[0].rsplit("/", 1)[-1].rpartition(":")
        fields = dict(part.split("=", 1) for part in body.split(",") if "=" in part)
        yield (ip(host), int(port)), int(fields["sid"], 16), int(fields["recved"])


def cons_sessions(text: str) -> dict[int, int]:
    return {sid: recved for _, sid, recved in cons_connections(text)}


def local_ends(entry: str) -> set[Address]:
    """The local addresses of this process's TCP connections to the server at ``entry``."""
    host, _, port = entry.rpartition(":")
    infos = socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM)
    server = {(ip(str(info[4][0])), int(port)) for info in infos}
    found = set()
    folder = "/proc/self/fd" if os.path.isdir("/proc/self/fd") else "/dev/fd"
    for name in os.listdir(folder):
        try:
            if not stat.S_ISSOCK(os.fstat(int(name)).st_mode):
                continue
            with socket.socket(fileno=os.dup(int(name))) as sock:
                if sock.family not in (socket.AF_INET, socket.AF_INET6):
                    continue
                peer, local = sock.getpeername(), sock.getsockname()
        except OSError:  # closed meanwhile (the listing's own), or not connected
            continue
        if (ip(peer[0]), peer[1]) in server:
            found.add((ip(local[0]), local[1]))
    return found


def own_sessions(entry: str) -> set[int]:
    """The sessions of this process's connections to the server at ``entry`` (its ``cons``)."""
    ends = local_ends(entry)
    cons = four_letter(entry, "cons")
    return {sid for address, sid, _ in cons_connections(cons) if address in ends and sid}


def session_opened_by(entry: str, opening: Callable[[], object]) -> int:
    """The id of the one session ``opening()`` opens in this process, on the server at ``entry``.

    zkcelery keeps its client to itself, so the session is found from outside: the server's
    ``cons`` lists each connection's client address with its session, and the connection
    is this process's one new socket to that server.
    """
    before = own_sessions(entry)
    opening()
    new = own_sessions(entry) - before
    if len(new) != 1:
        raise RuntimeError(f"{len(new)} new sessions of this process in {entry}'s cons, not 1")
    return new.pop()


def probe(entries: Sequence[str]) -> Probe:
    total, sessions, nodes, zxid = 0, {}, 0, 0
    for entry in entries:
        text = four_letter(entry, "srvr")
        total += int(field_of(text, "Received"))
        nodes = max(nodes, int(field_of(text, "Node count")))
        zxid = max(zxid, int(field_of(text, "Zxid"), 16))
        sessions.update(cons_sessions(four_letter(entry, "cons")))
    return Probe(total, sessions, nodes, zxid)


@dataclass(frozen=True)
class Counter:
    """Counts the requests of a window between two probes."""

    entries: tuple[str, ...]
    overhead: int  # packets one probe adds to the next one's count

    @classmethod
    def calibrate(cls, entries: Sequence[str]) -> Counter:
        return cls(tuple(entries), probe_overhead(lambda: probe(entries).received))

    def probe(self) -> Probe:
        return probe(self.entries)

    def window(
        self, before: Probe, after: Probe, measured: Sequence[int], others: Sequence[int] = ()
    ) -> Window:
        """The window's requests; ``measured`` and ``others`` are all the sessions we have open."""
        counts = {}
        missing = 0
        for sid in (*measured, *others):
            if sid in before.sessions and sid in after.sessions:
                counts[sid] = after.sessions[sid] - before.sessions[sid]
            else:
                missing += 1
        requests = after.received - before.received - self.overhead
        own = sum(counts.get(sid, 0) for sid in measured)
        others_sent = sum(counts.get(sid, 0) for sid in others)
        writes = after.zxid - before.zxid if after.zxid >> 32 == before.zxid >> 32 else -1
        return Window(requests, own, others_sent, missing, writes=writes)


@dataclass
class Window:
    requests: int = 0  # srvr: everything every server received, less the probe's own
    own: int = 0  # cons: what the measured sessions sent
    others: int = 0  # cons: what our other sessions (holders, idle waiters) sent
    missing: int = 0  # sessions of ours cons did not show both times (moved or closed)
    dirty: int = 0  # windows kept although disturbed (after RETRIES measured again)
    writes: int = 0  # transactions (the zxid's advance), everyone's; -1: a new leader came

    @property
    def ours(self) -> int:
        return self.own + self.others

    @property
    def foreign(self) -> int:
        """What no session of ours sent: another user of the ensemble."""
        return self.requests - self.ours

    @property
    def disturbed(self) -> bool:
        return self.missing > 0 or self.foreign > max(FOREIGN_SLACK, 0.002 * self.requests)

    @property
    def counted(self) -> int:
        """srvr's count; our sessions' own (cons) when another client disturbed it."""
        return self.ours if self.dirty else self.requests

    def kept(self) -> Window:
        self.dirty = int(self.disturbed)
        return self

    def __iadd__(self, other: Window) -> Window:
        self.requests += other.requests
        self.own += other.own
        self.others += other.others
        self.missing += other.missing
        self.dirty += other.dirty
        broken = self.writes < 0 or other.writes < 0
        self.writes = -1 if broken else self.writes + other.writes
        return self


# ---------------------------------------------------------------------------
# Workers: spawned processes answering over a pipe
# ---------------------------------------------------------------------------


class Worker:
    """What one worker process does; the parent calls its methods by name."""

    def __init__(self, index: int, entry: str, hosts: str, root: str) -> None:
        self.index = index
        self.entry = entry  # the one server of hosts
        self.hosts = hosts
        self.root = root
        self.app = make_app(f"contention{index}", hosts, root)

        @self.app.task(base=zkcelery.LockTask, bind=True, shared=False, name=TASK)
        def contend(self: Any, key: str, max_leases: int | None, hold: float) -> Times:
            """One blocking acquisition of the lock (or semaphore) ``key``, held ``hold`` s."""
            started = time.monotonic()
            if max_leases is None:
                lease = self.lock(key, blocking=True)
            else:
                lease = self.semaphore(key, max_leases=max_leases, blocking=True)
            with lease as held:
                holding = time.monotonic()
                if not held:
                    raise RuntimeError(f"blocking acquire of {key!r} returned unheld")
                time.sleep(hold)
                leaving = time.monotonic()
            return started, holding, leaving

        self.task = contend
        self.client: KazooClient | None = None
        self.zk_session: int | None = None
        self.op: Callable[[], Times] | None = None
        self.held: Any = None
        self.filler: Any = None  # a task of another app: unrelated leases (scenario 3)
        self.filler_session: int | None = None
        self.leases: list[Any] = []

    # -- sessions ------------------------------------------------------------------

    def open_zkcelery(self) -> int:
        def warm() -> None:
            with self.task.lock("warm", self.index) as held:  # connects, makes the namespaces
                if not held:
                    raise RuntimeError("the warm-up lock is held elsewhere")

        if self.zk_session is None:
            self.zk_session = session_opened_by(self.entry, warm)
        else:
            warm()
        return self.zk_session

    def open_kazoo(self) -> int:
        self.client = connect(self.hosts)
        self.client.ensure_path(f"{self.root}/kazoo")
        return self.client.client_id[0]

    def close(self) -> None:
        self.op = None
        if self.held is not None:
            self.held.release()
            self.held = None
        if self.zk_session is not None or self.filler_session is not None:
            close_sessions()  # the filler's too: its leases go with it
            self.zk_session = self.filler_session = None
            self.leases = []
        if self.client is not None:
            disconnect(self.client)
            self.client = None

    # -- contention (scenarios 1 and 4) -------------------------------------------

    def open_contender(self, kind: str, key: str, max_leases: int | None, hold: float) -> int:
        if kind == "zkcelery":
            session_id = self.open_zkcelery()

            def op() -> Times:
                return self.task(key, max_leases, hold)  # type: ignore[no-any-return]

        else:
            session_id = self.open_kazoo()
            path = f"{self.root}/kazoo/{key}"
            recipe: Any = (
                Lock(self.client, path)
                if max_leases is None
                else Semaphore(self.client, path, max_leases=max_leases)
            )

            def op() -> Times:
                started = time.monotonic()
                recipe.acquire(blocking=True)
                holding = time.monotonic()
                time.sleep(hold)
                leaving = time.monotonic()
                recipe.release()
                return started, holding, leaving

        op()  # warm: kazoo makes its paths; both learn the way
        self.op = op
        return session_id

    def run(self, start_at: float, seconds: float) -> dict[str, Any]:
        assert self.op is not None
        cpu = time.process_time()  # this process's, kazoo's threads included
        times = run_from(start_at, seconds, self.op)
        return {"times": times, "finished": time.monotonic(), "cpu": time.process_time() - cpu}

    # -- uncontended semaphore cycles, holders and waiters (scenarios 2 and 3) -----

    def cycles(self, key: str, max_leases: int, count: int) -> list[float]:
        durations = []
        for _ in range(count):
            started = time.perf_counter()
            with self.task.semaphore(key, max_leases=max_leases) as held:
                if not held:
                    raise RuntimeError(f"semaphore {key!r} unexpectedly full")
            durations.append(time.perf_counter() - started)
        return durations

    def hold(self, key: str, max_leases: int) -> None:
        self.held = self.task.semaphore(key, max_leases=max_leases)
        if not self.held.acquire():
            raise RuntimeError(f"semaphore {key!r} unexpectedly full")

    def waiting(self) -> int:
        return len(self.held.waiters())

    def release(self) -> None:
        self.held.release()
        self.held = None

    def wait(self, key: str, max_leases: int) -> bool:
        with self.task.semaphore(key, max_leases=max_leases, blocking=True) as held:
            return bool(held)

    # -- unrelated leases (scenario 3) ----------------------------------------------

    def open_filler(self) -> int:
        """A Celery app of its own, so a session of its own, for unrelated leases; its id."""
        app = make_app(f"filler{self.index}", self.hosts, self.root)

        @app.task(base=zkcelery.LockTask, bind=True, shared=False, name=FILLER)
        def filler(self: Any) -> None:
            """Never run: its semaphore() holds the unrelated leases."""

        def warm() -> None:
            with filler.semaphore("warm", self.index, max_leases=1) as held:
                if not held:
                    raise RuntimeError("the filler's warm-up semaphore is held elsewhere")

        self.filler = filler
        self.filler_session = session_opened_by(self.entry, warm)
        return self.filler_session

    def fill(self, generation: int, keys: Sequence[int]) -> None:
        """Hold one lease (max_leases=1) of each semaphore ``(generation, key)``."""

        def take(key: int) -> Any:
            lease = self.filler.semaphore(generation, key, max_leases=1)
            if not lease.acquire():
                raise RuntimeError(f"filler semaphore {key} unexpectedly full")
            return lease

        with ThreadPoolExecutor(FILL_THREADS) as threads:
            self.leases += threads.map(take, keys)

    def drain(self) -> None:
        with ThreadPoolExecutor(FILL_THREADS) as threads:
            list(threads.map(lambda lease: lease.release(), self.leases))
        self.leases = []


def start_pool(layout: Layout, root: str, size: int) -> list[Child]:
    pool = []
    for index in range(size):
        entry = layout.entry(index)
        label = f"worker {index} (on {entry})"
        pool.append(Child(label, Worker, index, entry, layout.hosts(entry), root))
    for worker in pool:
        worker.expect(REPLY_TIMEOUT * 2)
    return pool


# ---------------------------------------------------------------------------
# Scenarios 1 and 4: blocking contenders on one key
# ---------------------------------------------------------------------------


@dataclass
class Tally:
    """One library at one point, over all its rounds."""

    kind: str
    size: int
    limit: int  # holders the lease admits
    acquisitions: int = 0
    seconds: float = 0.0
    cpu: float = 0.0  # the contenders' CPU seconds
    window: Window = field(default_factory=Window)
    waits: list[float] = field(default_factory=list)
    per_process: list[int] = field(default_factory=list)
    max_holders: int = 0
    excess: int = 0  # acquisitions made while the lease was already full
    rounds: list[dict[str, Any]] = field(default_factory=list)
    repeated: int = 0  # rounds measured again because another client disturbed the count

    def check(self, times: Sequence[Times]) -> int:
        """Record the most holders at once in a round (kept or not); return it."""
        peak, excess = overlap([(holding, leaving) for _, holding, leaving in times], self.limit)
        self.max_holders = max(self.max_holders, peak)
        self.excess += excess
        return peak

    def add_round(self, replies: Sequence[dict[str, Any]], start_at: float, window: Window) -> None:
        times = [t for reply in replies for t in reply["times"]]
        seconds = max(reply["finished"] for reply in replies) - start_at
        counts = [len(reply["times"]) for reply in replies]
        self.per_process = [a + b for a, b in zip(self.per_process, counts)] or counts
        self.acquisitions += len(times)
        self.seconds += seconds
        self.cpu += sum(reply["cpu"] for reply in replies)
        self.window += window
        self.waits += [holding - started for started, holding, _ in times]
        self.rounds.append(
            {
                "acquisitions": len(times),
                "seconds": seconds,
                "requests_srvr": window.requests,
                "requests_our_sessions": window.ours,
                "writes": window.writes,
                "foreign_requests": window.foreign,
                "per_process": counts,
                "max_holders": self.check(times),
            }
        )

    @property
    def rate(self) -> float:
        return self.acquisitions / self.seconds

    @property
    def requests_per(self) -> float:
        return self.window.counted / max(1, self.acquisitions)

    @property
    def writes_per(self) -> float | None:
        return None if self.window.writes < 0 else self.window.writes / max(1, self.acquisitions)

    @property
    def cpu_ms_per(self) -> float:
        return self.cpu * 1e3 / max(1, self.acquisitions)

    @property
    def own_per(self) -> float:
        return self.window.own / max(1, self.acquisitions)

    @property
    def fairness(self) -> float:
        return min(self.per_process) / max(1, max(self.per_process))

    def summary(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "contenders": self.size,
            "acquisitions": self.acquisitions,
            "seconds": round(self.seconds, 3),
            "acquisitions_per_s": round(self.rate, 1),
            "requests_srvr": self.window.requests,
            "requests_our_sessions": self.window.ours,
            "requests_counted_from": "cons" if self.window.dirty else "srvr",
            "requests_per_acquisition": round(self.requests_per, 2),
            "own_requests_per_acquisition": round(self.own_per, 2),
            "client_cpu_ms_per_acquisition": round(self.cpu_ms_per, 3),
            "writes": self.window.writes,
            "sessions_not_seen_by_cons": self.window.missing,
            "wait_p50_ms": round(percentile(self.waits, 0.5) * 1e3, 2),
            "wait_p99_ms": round(percentile(self.waits, 0.99) * 1e3, 2),
            "min_per_process": min(self.per_process),
            "max_per_process": max(self.per_process),
            "min_over_max": round(self.fairness, 3),
            "max_holders": self.max_holders,
            "limit": self.limit,
            "acquisitions_over_limit": self.excess,
            "rounds_repeated": self.repeated,
            "rounds": self.rounds,
        }


def overlap(intervals: Sequence[tuple[float, float]], limit: int) -> tuple[int, int]:
    """The most holding intervals that overlap, and how many began with ``limit`` others held."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    holding = peak = excess = 0
    for _, step in events:  # at equal times a release (-1) sorts before an acquire (+1)
        holding += step
        peak = max(peak, holding)
        if step == 1 and holding > limit:
            excess += 1
    return peak, excess


def contention_round(
    children: Sequence[Child],
    counter: Counter,
    tally: Tally,
    key: str,
    max_leases: int | None,
    plan: Plan,
) -> None:
    """One round; measured again (at most RETRIES times) if another client disturbed it."""
    for attempt in range(RETRIES + 1):
        for child in children:
            child.send("open_contender", tally.kind, key, max_leases, plan.hold)
        sessions = [child.expect() for child in children]
        try:
            before = counter.probe()
            lead = 0.1 + 0.01 * len(children)
            start_at, replies = start_together(children, "run", plan.round_seconds, lead)
            after = counter.probe()
        finally:
            call_all(children, "close")
        window = counter.window(before, after, sessions)
        if not window.disturbed or attempt == RETRIES:
            tally.add_round(replies, start_at, window.kept())
            return
        tally.check([t for reply in replies for t in reply["times"]])
        tally.repeated += 1
        log(f"    again: {window.foreign} requests from other clients, {window.missing} missing")


def round_order(point: int, rounds: int) -> list[str]:
    """ABBA: the first library alternates from one point to the next."""
    first = list(KINDS) if point % 2 == 0 else list(reversed(KINDS))
    return [kind for r in range(rounds) for kind in (first if r % 2 == 0 else first[::-1])]


def contention_point(
    pool: Sequence[Child],
    counter: Counter,
    plan: Plan,
    point: int,
    size: int,
    key: str,
    max_leases: int | None,
) -> dict[str, Tally]:
    limit = 1 if max_leases is None else max_leases
    tallies = {kind: Tally(kind, size, limit) for kind in KINDS}
    for kind in round_order(point, plan.rounds):
        log(f"  {kind}, {size} contenders, {plan.round_seconds:g} s")
        contention_round(pool[:size], counter, tallies[kind], key, max_leases, plan)
    return tallies


# ---------------------------------------------------------------------------
# Scenarios 2 and 3: uncontended semaphore cycles beside other leases
# ---------------------------------------------------------------------------


@dataclass
class Cycles:
    """Uncontended semaphore cycles of one process, under one condition."""

    durations: list[float] = field(default_factory=list)
    window: Window = field(default_factory=Window)
    repeated: int = 0  # windows measured again because another client disturbed the count

    @property
    def requests_per(self) -> float:
        return self.window.counted / max(1, len(self.durations))

    @property
    def own_per(self) -> float:
        return self.window.own / max(1, len(self.durations))

    @property
    def median_ms(self) -> float:
        return statistics.median(self.durations) * 1e3

    def summary(self) -> dict[str, Any]:
        return {
            "cycles": len(self.durations),
            "requests_srvr": self.window.requests,
            "requests_our_sessions": self.window.ours,
            "requests_counted_from": "cons" if self.window.dirty else "srvr",
            "requests_per_cycle": round(self.requests_per, 2),
            "own_requests_per_cycle": round(self.own_per, 2),
            "others_requests": self.window.others,
            "foreign_requests": self.window.foreign,
            "windows_repeated": self.repeated,
            "median_ms": round(self.median_ms, 3),
            "p90_ms": round(percentile(self.durations, 0.9) * 1e3, 3),
            "mean_ms": round(statistics.fmean(self.durations) * 1e3, 3),
        }


def count_cycles(
    measurer: Child,
    counter: Counter,
    into: Cycles,
    key: str,
    count: int,
    own: int,
    others: Sequence[int] = (),
) -> None:
    """``count`` cycles of semaphore ``key`` (max_leases=2), timed and counted."""
    for attempt in range(RETRIES + 1):
        measurer.call("cycles", key, 2, 1)  # warm: the key's container exists again
        before = counter.probe()
        durations = measurer.call("cycles", key, 2, count)
        after = counter.probe()
        window = counter.window(before, after, [own], others)
        if not window.disturbed or attempt == RETRIES:
            into.durations += durations
            into.window += window.kept()
            return
        into.repeated += 1
        log(f"    again: {window.foreign} requests from other clients, {window.missing} missing")


def isolation(pool: Sequence[Child], counter: Counter, plan: Plan) -> dict[str, Cycles]:
    """Semaphore B alone, beside 8 waiters blocked on semaphore A, and alone again."""
    measurer, holder = pool[0], pool[1]
    waiters = pool[2 : 2 + plan.isolation_waiters]
    alone, beside = Cycles(), Cycles()
    own = measurer.call("open_zkcelery")
    try:
        count_cycles(measurer, counter, alone, "B", plan.cycles // 2, own)
        others = [holder.call("open_zkcelery")]
        holder.call("hold", "A", 1)
        others += call_all(waiters, "open_zkcelery")
        for waiter in waiters:
            waiter.send("wait", "A", 1)
        deadline = time.monotonic() + 30
        while holder.call("waiting") < len(waiters):
            if time.monotonic() > deadline:
                raise TimeoutError("the waiters on semaphore A never all queued")
            time.sleep(0.05)
        count_cycles(measurer, counter, beside, "B", plan.cycles, own, others)
        holder.call("release")
        if not all(waiter.expect() for waiter in waiters):
            raise RuntimeError("a waiter on semaphore A returned without it")
        count_cycles(measurer, counter, alone, "B", plan.cycles - plan.cycles // 2, own)
    finally:
        call_all([measurer, holder, *waiters], "close")
    return {"alone": alone, "beside_waiters": beside}


class Filler:
    """Unrelated semaphore leases, held through zkcelery by pool workers.

    Each worker holds its share of the keys in a session of its own (a Celery app of its
    own), at most NODES_PER_SESSION leases each: ``semaphore(generation, i, max_leases=1)``
    of a task named FILLER, so that zkcelery makes the real layout itself (a container per
    key, holding one lease node).  Released the same way, the containers are left to the
    servers' container reaper, as after any release: ``drain`` waits until the servers'
    node count is back to what it was before the leases (``srvr``).
    """

    def __init__(self, workers: Sequence[Child], count: int) -> None:
        if math.ceil(count / len(workers)) > NODES_PER_SESSION:
            raise ValueError(f"{count} leases need more than {len(workers)} filler workers")
        self.workers = workers
        self.count = count
        self.generation = 0
        self.nodes = 0  # the servers' node count before the leases
        self.session_ids: list[int] = call_all(workers, "open_filler")

    def fill(self, entries: Sequence[str]) -> None:
        self.nodes = node_count(entries)
        self.generation += 1
        keys = list(range(self.count))
        for number, worker in enumerate(self.workers):
            worker.send("fill", self.generation, keys[number :: len(self.workers)])
        for worker in self.workers:
            worker.expect(FILL_TIMEOUT)

    def drain(self, entries: Sequence[str]) -> None:
        for worker in self.workers:
            worker.send("drain")
        for worker in self.workers:
            worker.expect(FILL_TIMEOUT)
        slack = max(50, self.count // 100)  # other clients of the ensemble make nodes too
        deadline = time.monotonic() + FILL_TIMEOUT
        while (nodes := node_count(entries)) > self.nodes + slack:
            if time.monotonic() > deadline:
                log(f"  warning: {nodes - self.nodes:,} nodes more than before the leases")
                return
            time.sleep(0.05)

    def close(self) -> None:
        call_all(self.workers, "close")


def node_count(entries: Sequence[str]) -> int:
    """The most nodes a server has: the last to apply a change counts it last (``srvr``)."""
    return max(int(field_of(four_letter(entry, "srvr"), "Node count")) for entry in entries)


@dataclass
class Scale:
    """Semaphore cycles with no unrelated lease held and with ``leases`` held, alternating."""

    leases: int
    sessions: int
    none: list[Cycles] = field(default_factory=list)  # none, held, none, held... none
    held: list[Cycles] = field(default_factory=list)
    fill_seconds: list[float] = field(default_factory=list)
    drain_seconds: list[float] = field(default_factory=list)
    nodes: list[int] = field(default_factory=list)  # the servers' node count, none then held

    def pooled(self, which: list[Cycles]) -> Cycles:
        pooled = Cycles()
        for cycles in which:
            pooled.durations += cycles.durations
            pooled.window += cycles.window
            pooled.repeated += cycles.repeated
        return pooled

    @property
    def paired(self) -> list[float]:
        """Each held batch over the mean of the batches without, just before and after it."""
        return [
            held.median_ms / ((before.median_ms + after.median_ms) / 2)
            for held, before, after in zip(self.held, self.none, self.none[1:])
        ]

    def summary(self) -> dict[str, Any]:
        return {
            "leases": self.leases,
            "sessions": self.sessions,
            "none": self.pooled(self.none).summary(),
            "held": self.pooled(self.held).summary(),
            "none_batches": [c.summary() for c in self.none],
            "held_batches": [c.summary() for c in self.held],
            "paired_ratios": [round(r, 3) for r in self.paired],
            "fill_seconds": self.fill_seconds,
            "drain_seconds": self.drain_seconds,
            "node_counts": self.nodes,
        }


def scale(pool: Sequence[Child], counter: Counter, plan: Plan, layout: Layout, root: str) -> Scale:
    """Batches of semaphore cycles, alternately without and with ``plan.leases`` held."""
    measurer = pool[0]
    own = measurer.call("open_zkcelery")
    filler = Filler(pool[1:], plan.leases)
    found = Scale(plan.leases, len(filler.workers))
    per_none = math.ceil(plan.cycles / (plan.scale_rounds + 1))
    per_held = math.ceil(plan.cycles / plan.scale_rounds)
    try:
        for index in range(plan.scale_rounds):
            found.none.append(Cycles())
            count_cycles(
                measurer, counter, found.none[-1], "scale", per_none, own, filler.session_ids
            )
            found.nodes.append(counter.probe().nodes)
            started = time.monotonic()
            filler.fill(counter.entries)
            found.fill_seconds.append(round(time.monotonic() - started, 2))
            found.nodes.append(counter.probe().nodes)
            log(
                f"  {plan.leases:,} leases held ({index + 1}/{plan.scale_rounds}), made in "
                f"{found.fill_seconds[-1]:.1f} s; {found.nodes[-1]:,} nodes"
            )
            found.held.append(Cycles())
            count_cycles(
                measurer, counter, found.held[-1], "scale", per_held, own, filler.session_ids
            )
            started = time.monotonic()
            filler.drain(counter.entries)
            found.drain_seconds.append(round(time.monotonic() - started, 2))
        found.none.append(Cycles())
        count_cycles(measurer, counter, found.none[-1], "scale", per_none, own, filler.session_ids)
    finally:
        filler.close()
        measurer.call("close")
    return found


# ---------------------------------------------------------------------------
# Targets and tables
# ---------------------------------------------------------------------------


def lock_targets(size: int, point: dict[str, Tally]) -> list[Target]:
    """Issue 24's four, at one point of scenario 1: ahead of kazoo on every count."""
    zk, kz = point["zkcelery"], point["kazoo"]
    at = f"lock, {size} contender{'s' if size > 1 else ''}"
    return [
        Target(
            f"{at}: throughput / kazoo",
            zk.rate / kz.rate,
            ">=",
            1.1,
            f"{zk.rate:.0f} vs {kz.rate:.0f} acquisitions/s",
        ),
        Target(
            f"{at}: requests per acquisition / kazoo",
            zk.requests_per / kz.requests_per,
            "<=",
            1.0,
            f"{zk.requests_per:.2f} vs {kz.requests_per:.2f}",
        ),
        Target(
            f"{at}: client CPU per acquisition / kazoo",
            zk.cpu_ms_per / kz.cpu_ms_per,
            "<=",
            0.8,
            f"{zk.cpu_ms_per:.2f} vs {kz.cpu_ms_per:.2f} ms",
        ),
        Target(
            f"{at}: least / most served process",
            zk.fairness,
            ">=",
            0.9,
            f"{min(zk.per_process)}/{max(zk.per_process)} (kazoo "
            f"{min(kz.per_process)}/{max(kz.per_process)})",
        ),
    ]


def build_targets(results: dict[str, Any], plan: Plan) -> list[Target]:
    locks: dict[int, dict[str, Tally]] = results["locks"]
    semaphore = results["semaphore"]
    zs, ks = semaphore["zkcelery"], semaphore["kazoo"]
    iso = results["isolation"]
    scaled: Scale = results["scale"]
    none, held = scaled.pooled(scaled.none), scaled.pooled(scaled.held)
    lock_holders = max(t.max_holders for point in locks.values() for t in point.values())
    semaphore_holders = max(zs.max_holders, ks.max_holders)
    return [
        *(target for size in sorted(locks) for target in lock_targets(size, locks[size])),
        Target(
            "semaphore B beside 8 waiters on A: requests per cycle",
            iso["beside_waiters"].requests_per,
            "<=",
            3.3,
            f"alone {iso['alone'].requests_per:.2f}; B's own session "
            f"{iso['beside_waiters'].own_per:.2f}",
        ),
        Target(
            f"semaphore cycle, {scaled.leases:,} unrelated leases held / none",
            statistics.median(scaled.paired),
            "<=",
            1.3,
            f"median of {len(scaled.paired)} paired batches "
            f"({', '.join(f'{r:.2f}' for r in scaled.paired)}); all cycles: median "
            f"{held.median_ms:.2f} vs {none.median_ms:.2f} ms",
        ),
        Target(
            f"semaphore of 2, {zs.size} waiters: throughput / kazoo",
            zs.rate / ks.rate,
            ">=",
            1.0,
            f"{zs.rate:.0f} vs {ks.rate:.0f} acquisitions/s",
        ),
        Target(
            f"semaphore of 2, {zs.size} waiters: requests per acquisition / kazoo",
            zs.requests_per / ks.requests_per,
            "<=",
            1.0,
            f"{zs.requests_per:.2f} vs {ks.requests_per:.2f}",
        ),
        Target(
            "most holders of one lock at once (every run, both libraries)",
            lock_holders,
            "<=",
            1,
            f"zkcelery {max(p['zkcelery'].max_holders for p in locks.values())}, "
            f"kazoo {max(p['kazoo'].max_holders for p in locks.values())}",
            safety=True,
        ),
        Target(
            "most holders of the semaphore of 2 at once",
            semaphore_holders,
            "<=",
            2,
            f"zkcelery {zs.max_holders}, kazoo {ks.max_holders}",
            safety=True,
        ),
    ]


THROUGHPUT_HEADER = [
    "blocking contenders",
    "acq/s zkcelery",
    "kazoo",
    "ratio",
    "requests/acq zkcelery",
    "kazoo",
    "ratio",
    "writes/acq zkcelery",
    "kazoo",
    "client CPU ms/acq zkcelery",
    "kazoo",
]
WAIT_HEADER = [
    "blocking contenders",
    "p50 wait ms zkcelery",
    "kazoo",
    "p99 wait ms zkcelery",
    "kazoo",
    "least/most acq per process zkcelery",
    "kazoo",
    "most holders at once zkcelery",
    "kazoo",
]


def mark(window: Window) -> str:
    return "*" if window.dirty else ""


def throughput_row(label: str, point: dict[str, Tally]) -> list[str]:
    zk, kz = point["zkcelery"], point["kazoo"]
    return [
        label,
        f"{zk.rate:.0f}",
        f"{kz.rate:.0f}",
        f"{zk.rate / kz.rate:.2f}",
        f"{zk.requests_per:.2f}{mark(zk.window)}",
        f"{kz.requests_per:.2f}{mark(kz.window)}",
        f"{zk.requests_per / kz.requests_per:.2f}",
        f"{fmt(zk.writes_per)}{mark(zk.window)}",
        f"{fmt(kz.writes_per)}{mark(kz.window)}",
        f"{zk.cpu_ms_per:.2f}",
        f"{kz.cpu_ms_per:.2f}",
    ]


def wait_row(label: str, point: dict[str, Tally]) -> list[str]:
    zk, kz = point["zkcelery"], point["kazoo"]
    return [
        label,
        f"{percentile(zk.waits, 0.5) * 1e3:.1f}",
        f"{percentile(kz.waits, 0.5) * 1e3:.1f}",
        f"{percentile(zk.waits, 0.99) * 1e3:.1f}",
        f"{percentile(kz.waits, 0.99) * 1e3:.1f}",
        f"{min(zk.per_process)}/{max(zk.per_process)} ({zk.fairness:.2f})",
        f"{min(kz.per_process)}/{max(kz.per_process)} ({kz.fairness:.2f})",
        f"{zk.max_holders} (of {zk.limit})",
        f"{kz.max_holders} (of {kz.limit})",
    ]


CYCLES_HEADER = [
    "semaphore(max_leases=2) cycle, one process",
    "cycles",
    "requests/cycle",
    "the cycling session's own",
    "median ms",
    "p90 ms",
]


def cycles_row(label: str, cycles: Cycles) -> list[str]:
    return [
        label,
        str(len(cycles.durations)),
        f"{cycles.requests_per:.2f}{mark(cycles.window)}",
        f"{cycles.own_per:.2f}",
        f"{cycles.median_ms:.2f}",
        f"{percentile(cycles.durations, 0.9) * 1e3:.2f}",
    ]


def render(results: dict[str, Any], table: Table) -> str:
    plan: Plan = results["plan_object"]
    points = [(f"lock, {size}", point) for size, point in results["locks"].items()]
    semaphore = results["semaphore"]
    points.append((f"semaphore of 2, {semaphore['zkcelery'].size}", semaphore))
    iso, scaled = results["isolation"], results["scale"]
    waiters = plan.isolation_waiters
    cycle_rows = [
        cycles_row("B, nothing else (before and after)", iso["alone"]),
        cycles_row(f"B, {waiters} waiters blocked on A (max_leases=1)", iso["beside_waiters"]),
        cycles_row(
            f"no unrelated lease held ({len(scaled.none)} batches)", scaled.pooled(scaled.none)
        ),
        cycles_row(
            f"{scaled.leases:,} unrelated leases held ({len(scaled.held)} batches, between)",
            scaled.pooled(scaled.held),
        ),
    ]
    return "\n\n".join(
        [
            table(THROUGHPUT_HEADER, [throughput_row(*point) for point in points]),
            table(WAIT_HEADER, [wait_row(*point) for point in points]),
            table(CYCLES_HEADER, cycle_rows),
            table(TARGET_HEADER, target_rows(results["target_objects"])),
        ]
    )


def notes_lines(results: dict[str, Any]) -> list[str]:
    plan: Plan = results["plan_object"]
    iso, scaled = results["isolation"], results["scale"]
    tallies = [*(t for p in results["locks"].values() for t in p.values())]
    tallies += [results["semaphore"][kind] for kind in KINDS]
    cycles = [*iso.values(), *scaled.none, *scaled.held]
    per_kind = plan.round_seconds * plan.rounds
    beside = iso["beside_waiters"]
    lines = [
        f"contention: {plan.rounds} round(s) of {plan.round_seconds:g} s per library and point "
        f"({per_kind:g} s each, {'ABBA' if plan.rounds == 2 else 'AB/BA'}), "
        f"hold {plan.hold * 1e3:g} ms; worker i on server i mod {len(results['entries'])}",
        "requests: srvr Received summed over all servers, less the probe's own "
        f"{results['probe_overhead']} packets; the measured sessions' own (cons): "
        + ", ".join(f"{t.kind} {t.size} {t.own_per:.2f}" for t in tallies),
        f"B beside waiters: the holder and the waiters sent {beside.window.others} requests "
        f"during B's {len(beside.durations)} cycles (idle pings)",
        f"scale: {scaled.leases:,} leases over {scaled.sessions} filler sessions, made "
        f"{len(scaled.held)} time(s) in {', '.join(f'{x:g}' for x in scaled.fill_seconds)} s, "
        f"removed in {', '.join(f'{x:g}' for x in scaled.drain_seconds)} s; node count "
        f"{' -> '.join(f'{n:,}' for n in scaled.nodes[:2])}",
    ]
    windows = [t.window for t in tallies] + [c.window for c in cycles]
    if any(w.dirty for w in windows):
        lines.append(
            "* another client of the ensemble sent packets during every attempt: requests "
            "counted from our sessions' own counters (cons) instead of srvr; writes include "
            "the other client's"
        )
    repeated = sum(t.repeated for t in tallies) + sum(c.repeated for c in cycles)
    if repeated:
        lines.append(
            f"{repeated} round(s) or window(s) measured again: another client of the ensemble "
            f"sent more than {FOREIGN_SLACK} packets (or 0.2%) during them"
        )
    foreign = sum(t.window.foreign for t in tallies) + sum(c.window.foreign for c in cycles)
    missing = sum(t.window.missing for t in tallies) + sum(c.window.missing for c in cycles)
    lines.append(f"packets from other clients in the windows kept: {foreign}")
    if missing:
        lines.append(f"warning: {missing} sessions of ours were not in cons both times")
    if plan.quick:
        lines.append(
            f"quick mode: short rounds, targets at {max(plan.sizes)} contenders and "
            f"{plan.semaphore_waiters} semaphore waiters; indicative only"
        )
    return lines


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------


def delete_run_root(layout: Layout, root: str) -> None:
    try:
        client = connect(layout.hosts(layout.entry(0)))
    except Exception as exc:
        log(f"warning: could not connect to delete {root}: {exc!r}")
        return
    try:
        delete_root(client, root, log)
    finally:
        disconnect(client)


def run(layout: Layout, plan: Plan) -> dict[str, Any]:
    started = time.monotonic()
    machine = machine_info(layout, loadavg=os.getloadavg())
    root = new_root(ROOT_PARENT)
    client = connect(layout.hosts(layout.entry(0)))
    try:
        client.ensure_path(f"{root}/kazoo")
    finally:
        disconnect(client)  # an idle client would ping during the rounds
    pool: list[Child] = []
    try:
        counter = Counter.calibrate(layout.entries)
        log(f"root {root}; probe overhead {counter.overhead} packets; {plan.pool} workers")
        pool = start_pool(layout, root, plan.pool)
        locks = {}
        for point, size in enumerate(plan.sizes):
            log(f"1. one lock, {size} blocking contenders")
            locks[size] = contention_point(pool, counter, plan, point, size, f"lock{size}", None)
        log(f"4. semaphore of 2, {plan.semaphore_waiters} blocking waiters")
        semaphore = contention_point(
            pool, counter, plan, len(plan.sizes), plan.semaphore_waiters, "semaphore2", 2
        )
        log(f"2. semaphore B beside {plan.isolation_waiters} waiters on A")
        iso = isolation(pool, counter, plan)
        log(f"3. semaphore cycles beside {plan.leases:,} unrelated leases")
        scaled = scale(pool, counter, plan, layout, root)
    finally:
        stop_children(pool)
        delete_run_root(layout, root)
    results: dict[str, Any] = {
        "machine": machine,
        "plan_object": plan,
        "entries": layout.entries,
        "root": root,
        "probe_overhead": counter.overhead,
        "locks": locks,
        "semaphore": semaphore,
        "isolation": iso,
        "scale": scaled,
    }
    results["target_objects"] = build_targets(results, plan)
    results["seconds"] = time.monotonic() - started
    return results


def to_json(results: dict[str, Any], command: str) -> dict[str, Any]:
    return {
        "command": command,
        "machine": results["machine"],
        "plan": asdict(results["plan_object"]),
        "root": results["root"],
        "probe_overhead": results["probe_overhead"],
        "lock": {
            str(size): {kind: tally.summary() for kind, tally in point.items()}
            for size, point in results["locks"].items()
        },
        "semaphore_of_2": {kind: t.summary() for kind, t in results["semaphore"].items()},
        "isolation": {name: c.summary() for name, c in results["isolation"].items()},
        "scale": results["scale"].summary(),
        "targets": [
            {**asdict(t), "passed": t.passed, "verdict": t.verdict}
            for t in results["target_objects"]
        ],
        "seconds": round(results["seconds"], 1),
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = arguments(__doc__, "short rounds, N in {1, 4}", None, "write all figures here")
    parser.add_argument(
        "--strict", action="store_true", help="exit with status 1 when a timing target is missed"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    command = (
        shlex.join(["python", *sys.argv])
        if argv is None
        else shlex.join(["python", sys.argv[0], *argv])
    )
    layout = Layout.parse(args.hosts or ensemble_hosts(), "contention")
    plan = QUICK if args.quick else FULL
    check_ensemble(layout, "contention", ("srvr", "cons"))
    results = run(layout, plan)
    machine = [f"command: {command}", *machine_lines(results["machine"])]
    notes = notes_lines(results)
    print_report(results, render, machine, notes, args.markdown)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(to_json(results, command), indent=2) + "\n")
        print(f"results written to {args.json}")
    targets: list[Target] = results["target_objects"]
    unsafe = [t for t in targets if t.safety and t.passed is False]
    for target in unsafe:
        print(f"CORRECTNESS: {target.measure}: {target.value} ({target.note})", file=sys.stderr)
    missed = [t for t in targets if not t.safety and t.passed is False]
    return 1 if unsafe or (args.strict and missed) else 0


if __name__ == "__main__":
    sys.exit(main())
