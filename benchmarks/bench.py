#!/usr/bin/env python3
"""Benchmark of zkcelery's locks against the floor, kazoo's recipes and the alternatives.

Run it against a running ensemble (``./zk-test.sh``)::

    python benchmarks/bench.py [--hosts H] [--quick] [--markdown] [--json PATH]

What is measured, each as the time of one whole cycle on one client:

1. the floor: a bare ephemeral create + delete (two quorum writes: what any ZooKeeper
   lock must pay), and one ``exists()`` (a read round trip, for scale);
2. zkcelery's ``with task.lock(key): pass``, uncontended, on a reused and on a fresh key;
3. kazoo's ``Lock(...).acquire(blocking=False)`` + ``release()``, a new ``Lock`` each cycle;
4. connect-per-call: a new ``KazooClient`` per lock (start, lock, stop, close), the design of
   the original ZooKeeper helper for Celery (fewer cycles: each one opens a session);
5. a failed try-lock on a lock another session holds, zkcelery and kazoo;
6. ``task.semaphore(max_leases=2)`` and kazoo's ``Semaphore(max_leases=2)``;
7. ``task.apply()`` of an empty task with and without ``base=zkcelery.MutexTask``;
8. the blocking handoff: from just before the holder's release to the return of a waiter
   blocked in another process (``time.monotonic``, one clock for the whole machine);
9. throughput: 1, 2 and 4 processes locking distinct keys, aggregate cycles per second;
10. a Redis lock cycle, redis-py's ``Lock``: ``SET NX PX`` and a ``DEL`` only of its own token
    (celery-once and celery-singleton take the same ``SET NX`` and release with a plain
    ``DEL``: two round trips either way), on a private ``redis-server`` when one is installed
    (redis-py comes with the ``test`` extra); and the peak RSS of a process using zkcelery;
11. the hot path with Prometheus metrics kept (``zkcelery.start_metrics_server``, its
    receivers on every lease signal) against the same lock cycle without: two child
    processes on one server, their batches alternating, wall time and the client's CPU
    time per cycle, and the requests of each (metrics add none);
12. ``task.read_lock()`` and ``task.write_lock()``, uncontended, and kazoo's ``ReadLock`` and
    ``WriteLock`` (``acquire(blocking=False)`` + ``release()``, a new one each cycle).
13. ``with task.multi_lock(*keys): pass``, uncontended, over 2 and over 4 keys (one
    multi-operation takes every key and one releases them: the same 2 requests as one lock).

Why ratios: write latency is dominated by fsync on the servers' disks and drifts 2-3x
between runs on a shared machine, so absolute times say little.  The contenders run
round-robin (a batch of each in turn, repeated, the order rotating every round) so that
drift hits all alike, and the targets are ratios between contenders of the same run.

Why request counts: they do not depend on the machine at all.  They are read from the
server's own counter (``srvr``'s ``Received``) around a burst of cycles, with the measured
client alone on its server; requests act as heartbeats, so a busy client sends no pings,
and the one packet of the ``srvr`` probe itself is calibrated away.

Where the clients are: measured (timed) clients on the first server of ``--hosts``,
holders of the "held" locks and the blocked waiters of the handoff on the second, and the
request-counting clients, one at a time, alone on the third (in a child process); the
throughput processes of both contenders spread over the servers alike.  Children are
spawned, never forked from a process that has a client.  Every run uses a fresh root
``/zkcelery-bench/<id>`` and deletes it at the end.

Peak RSS is read in fresh interpreters from ``/proc/self/status`` ``VmHWM``: Linux keeps
``ru_maxrss`` across ``execve``, so a child of this process would report this process's size.

Hosts: ``--hosts``, else ``$ZK_TEST_HOSTS``, else ``.zk-test/hosts`` beside this repository's
``zk-test.sh`` (``.zk-test-PORT`` with ``ZK_TEST_PORT=PORT``, or ``$ZK_TEST_DIR``), else
``127.0.0.1:2181,127.0.0.1:2182,127.0.0.1:2183`` (or from ``ZK_TEST_PORT``).
``--quick`` runs a few cycles of everything (CI) and asserts nothing about time.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import itertools
import json
import math
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from _common import (
    REPLY_TIMEOUT,
    REPO,
    TARGET_HEADER,
    Child,
    Layout,
    Table,
    Target,
    arguments,
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
    received,
    run_from,
    start_together,
    stop_children,
    target_rows,
)
from celery import Celery
from kazoo.client import KazooClient
from kazoo.recipe.lock import Lock, ReadLock, Semaphore, WriteLock

import zkcelery
from testsupport import ensemble_hosts, four_letter

DEFAULT_JSON = Path(__file__).resolve().parent / "results.json"
ROOT_PARENT = "/zkcelery-bench"
LOCKER, MUTEX, PLAIN, LIMITED = "bench.locker", "bench.mutex", "bench.plain", "bench.limited"

Cycle = Callable[[], object]
log = logger("bench")


# ---------------------------------------------------------------------------
# Plan and layout
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """How many cycles of what: the full run and ``--quick``."""

    quick: bool
    cycles: int  # timed cycles per contender
    batch: int  # cycles per contender per round
    connect_cycles: int  # connect-per-call is slow: fewer
    count_cycles: int  # the burst over which requests are counted
    handoff_cycles: int
    handoff_batch: int
    warmup: int
    throughput_seconds: float  # per point and round
    throughput_rounds: int


FULL = Plan(False, 500, 25, 100, 200, 100, 10, 10, 0.5, 6)
QUICK = Plan(True, 20, 5, 5, 20, 5, 1, 2, 0.3, 1)


class Roles(Layout):
    """Which server each kind of client uses (see the module docstring)."""

    @property
    def timing(self) -> str:
        return self.entry(0)

    @property
    def other(self) -> str:
        return self.entry(1)

    @property
    def count(self) -> str:
        return self.entry(2)

    @property
    def count_alone(self) -> bool:
        return self.count not in (self.timing, self.other)


def total_watches(entry: str) -> int:
    return int(field_of(four_letter(entry, "wchs"), "Total watches"))


# ---------------------------------------------------------------------------
# Clients, apps and the cycles measured
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Tasks:
    """A Celery app of its own and the tasks whose locks are measured."""

    app: Celery
    locker: Any
    mutex: Any
    plain: Any
    limited: Any


def make_tasks(hosts: str, root: str, main: str = "bench") -> Tasks:
    app = make_app(main, hosts, root)

    @app.task(base=zkcelery.LockTask, bind=True, shared=False, name=LOCKER)
    def locker(self: Any) -> None:
        """Never run: its lock() and semaphore() are what is measured."""

    @app.task(base=zkcelery.MutexTask, bind=True, shared=False, name=MUTEX)
    def mutex(self: Any) -> None:
        """An empty body under MutexTask's mutex."""

    @app.task(base=zkcelery.MutexTask, bind=True, shared=False, name=LIMITED, mutex_max_leases=2)
    def limited(self: Any) -> None:
        """An empty body under a MutexTask admitting two copies at once."""

    @app.task(bind=True, shared=False, name=PLAIN)
    def plain(self: Any) -> None:
        """The same empty body without a mutex."""

    return Tasks(app, locker, mutex, plain, limited)


def create_delete(client: KazooClient, path: str) -> None:
    client.create(path, ephemeral=True)
    client.delete(path)


def kazoo_lock_cycle(client: KazooClient, path: str) -> None:
    lock = Lock(client, path)
    if not lock.acquire(blocking=False):
        raise RuntimeError(f"kazoo Lock {path} unexpectedly held")
    lock.release()


def kazoo_failed_try(client: KazooClient, path: str) -> None:
    lock = Lock(client, path)
    if lock.acquire(blocking=False):
        lock.release()
        raise RuntimeError(f"kazoo Lock {path} should be held by another session")


def kazoo_semaphore_cycle(client: KazooClient, path: str) -> None:
    semaphore = Semaphore(client, path, max_leases=2)
    if not semaphore.acquire(blocking=False):
        raise RuntimeError(f"kazoo Semaphore {path} unexpectedly full")
    semaphore.release()


def kazoo_rw_cycle(client: KazooClient, path: str, recipe: type[Lock]) -> None:
    lock = recipe(client, path)
    if not lock.acquire(blocking=False):
        raise RuntimeError(f"kazoo {recipe.__name__} {path} unexpectedly held")
    lock.release()


def connect_per_call(hosts: str, path: str) -> None:
    """The original helper's design: a session per lock."""
    client = connect(hosts)
    try:
        kazoo_lock_cycle(client, path)
    finally:
        client.stop()
        client.close()


def zk_lock_cycle(task: Any, *key: Any) -> None:
    with task.lock(*key) as acquired:
        if not acquired:
            raise RuntimeError(f"zkcelery lock {key} unexpectedly held")


def zk_failed_try(task: Any, *key: Any) -> None:
    with task.lock(*key) as acquired:
        if acquired:
            raise RuntimeError(f"zkcelery lock {key} should be held by another session")


def zk_multi_lock_cycle(task: Any, *keys: Any) -> None:
    with task.multi_lock(*keys) as acquired:
        if not acquired:
            raise RuntimeError(f"zkcelery multi-lock {keys} unexpectedly held")


def zk_semaphore_cycle(task: Any, *key: Any) -> None:
    with task.semaphore(*key, max_leases=2) as acquired:
        if not acquired:
            raise RuntimeError(f"zkcelery semaphore {key} unexpectedly full")


def zk_rw_cycle(task: Any, mode: str, *key: Any) -> None:
    with getattr(task, f"{mode}_lock")(*key) as acquired:
        if not acquired:
            raise RuntimeError(f"zkcelery {mode} lock {key} unexpectedly held")


def apply_cycle(task: Any) -> None:
    result = task.apply()
    if not result.successful():
        raise RuntimeError(f"{task.name}.apply() failed: {result.result!r}")


def fresh_key_cycle(task: Any, tag: str) -> Cycle:
    counter = itertools.count()
    return lambda: zk_lock_cycle(task, "fresh", tag, next(counter))


def kazoo_paths(root: str) -> dict[str, str]:
    base = f"{root}/kazoo"
    names = ("floor", "lock", "held", "semaphore", "connect", "handoff", "rwlock")
    return {name: f"{base}/{name}" for name in names}


def kazoo_cycles(client: KazooClient, root: str) -> dict[str, Cycle]:
    paths = kazoo_paths(root)
    return {
        "floor": lambda: create_delete(client, paths["floor"]),
        "exists": lambda: client.exists(root),
        "kazoo_lock": lambda: kazoo_lock_cycle(client, paths["lock"]),
        "kazoo_try_fail": lambda: kazoo_failed_try(client, paths["held"]),
        "kazoo_semaphore": lambda: kazoo_semaphore_cycle(client, paths["semaphore"]),
        "kazoo_read": lambda: kazoo_rw_cycle(client, paths["rwlock"], ReadLock),
        "kazoo_write": lambda: kazoo_rw_cycle(client, paths["rwlock"], WriteLock),
    }


def zkcelery_cycles(tasks: Tasks, tag: str) -> dict[str, Cycle]:
    return {
        "zk_lock": lambda: zk_lock_cycle(tasks.locker, "reused"),
        "zk_lock_fresh": fresh_key_cycle(tasks.locker, tag),
        "zk_try_fail": lambda: zk_failed_try(tasks.locker, "held"),
        "zk_semaphore": lambda: zk_semaphore_cycle(tasks.locker, "semaphore"),
        "zk_read": lambda: zk_rw_cycle(tasks.locker, "read", "rwlock"),
        "zk_write": lambda: zk_rw_cycle(tasks.locker, "write", "rwlock"),
        "plain_apply": lambda: apply_cycle(tasks.plain),
        "mutex_apply": lambda: apply_cycle(tasks.mutex),
        "limited_apply": lambda: apply_cycle(tasks.limited),
        "zk_multi2": lambda: zk_multi_lock_cycle(tasks.locker, "m1", "m2"),
        "zk_multi4": lambda: zk_multi_lock_cycle(tasks.locker, "m1", "m2", "m3", "m4"),
    }


#: Why a container-based cycle may cost a little over 3 requests here: between two cycles
#: the container is empty, and the test ensemble reaps empty containers every 200 ms
#: (zk-test.sh; ZooKeeper's default is a minute): a cycle that finds it gone makes it again.
REAPED = "3 a cycle; the test ensemble reaps an idle container every 200 ms (+2 to make it)"


LABELS = {
    "floor": "1  floor: ephemeral create + delete",
    "exists": "1  exists() (one read)",
    "zk_lock": "2  zkcelery lock(), reused key",
    "zk_lock_fresh": "2  zkcelery lock(), fresh key",
    "kazoo_lock": "3  kazoo Lock, new per cycle",
    "connect": "4  connect-per-call (new KazooClient)",
    "zk_try_fail": "5  zkcelery failed try-lock",
    "kazoo_try_fail": "5  kazoo Lock failed try-lock",
    "zk_semaphore": "6  zkcelery semaphore(max_leases=2)",
    "kazoo_semaphore": "6  kazoo Semaphore(max_leases=2)",
    "zk_read": "12 zkcelery read_lock()",
    "kazoo_read": "12 kazoo ReadLock, new per cycle",
    "zk_write": "12 zkcelery write_lock()",
    "kazoo_write": "12 kazoo WriteLock, new per cycle",
    "plain_apply": "7  task.apply(), plain task",
    "mutex_apply": "7  task.apply(), MutexTask",
    "limited_apply": "7  task.apply(), MutexTask(mutex_max_leases=2)",
    "zk_multi2": "13 zkcelery multi_lock(), 2 keys",
    "zk_multi4": "13 zkcelery multi_lock(), 4 keys",
    "redis": "10 Redis Lock (redis-py): SET NX PX + checked DEL",
}
ORDER = list(LABELS)


# ---------------------------------------------------------------------------
# Request counts (in a child, alone on the counting server)
# ---------------------------------------------------------------------------


def count_burst(entry: str, cycle: Cycle, cycles: int, overhead: int) -> float:
    cycle()
    cycle()  # warm: namespaces made, connection busy
    before = received([entry])
    for _ in range(cycles):
        cycle()
    after = received([entry])
    return round((after - before - overhead) / cycles, 2)


class Counter:
    """In a child: counts each contender's requests, alone on the counting server."""

    def __init__(self, hosts: str, entry: str, root: str) -> None:
        self.hosts, self.entry, self.root = hosts, entry, root

    def count(self, cycles: int) -> dict[str, float]:
        hosts, entry, root = self.hosts, self.entry, self.root
        overhead = probe_overhead(lambda: received([entry]))
        counts: dict[str, float] = {}
        client = connect(hosts)
        try:
            for name, cycle in kazoo_cycles(client, root).items():
                counts[name] = count_burst(entry, cycle, cycles, overhead)
        finally:
            disconnect(client)
        path = kazoo_paths(root)["connect"]
        few = max(5, cycles // 10)
        counts["connect"] = count_burst(entry, lambda: connect_per_call(hosts, path), few, overhead)
        tasks = make_tasks(hosts, root, "count")
        try:
            for name, cycle in zkcelery_cycles(tasks, "count").items():
                counts[name] = count_burst(entry, cycle, cycles, overhead)
        finally:
            close_sessions()
        return counts


def count_requests(layout: Roles, root: str, plan: Plan) -> dict[str, float]:
    entry = layout.count
    child = Child("the counting child", Counter, layout.hosts(entry), entry, root)
    try:
        child.expect()
        return child.call("count", plan.count_cycles, timeout=REPLY_TIMEOUT * 3)
    finally:
        stop_children([child])


# ---------------------------------------------------------------------------
# Timing, round-robin
# ---------------------------------------------------------------------------


@dataclass
class Contender:
    name: str
    cycle: Cycle
    cycles: int
    samples: list[float] = field(default_factory=list)


def run_round_robin(contenders: list[Contender], plan: Plan) -> None:
    for contender in contenders:
        for _ in range(plan.warmup):
            contender.cycle()
    rounds = math.ceil(plan.cycles / plan.batch)
    clock = time.perf_counter
    for index in range(rounds):
        shift = index % len(contenders)
        for contender in contenders[shift:] + contenders[:shift]:
            todo = min(
                math.ceil(contender.cycles / rounds), contender.cycles - len(contender.samples)
            )
            for _ in range(todo):
                start = clock()
                contender.cycle()
                contender.samples.append(clock() - start)
            gc.collect()  # a contender's garbage is not collected on another's time


def summary(samples: Sequence[float]) -> dict[str, float]:
    return {
        "n": len(samples),
        "median_ms": statistics.median(samples) * 1e3,
        "p99_ms": percentile(samples, 0.99) * 1e3,
        "mean_ms": statistics.fmean(samples) * 1e3,
    }


# ---------------------------------------------------------------------------
# Blocking handoff: waiters in other processes
# ---------------------------------------------------------------------------


class Side:
    """In a child: one library's client, a zkcelery app's tasks or a ``KazooClient``."""

    def __init__(self, kind: str, hosts: str, root: str, main: str) -> None:
        self.kind = kind
        if kind == "zkcelery":
            self.tasks = make_tasks(hosts, root, main)
        else:
            self.client = connect(hosts)

    def close(self) -> None:
        if self.kind == "zkcelery":
            close_sessions()
        else:
            disconnect(self.client)


class Waiter(Side):
    """In a child: a blocked waiter of the handoff, on the lock of one library."""

    def __init__(self, kind: str, hosts: str, root: str) -> None:
        super().__init__(kind, hosts, root, "waiter")
        self.path = kazoo_paths(root)["handoff"]
        self.wait()  # warm, uncontended

    def wait(self) -> float:
        """Block until the lock is ours; when that was (``time.monotonic``)."""
        if self.kind == "zkcelery":
            with self.tasks.locker.lock("handoff", blocking=True, timeout=30) as acquired:
                acquired_at = time.monotonic()
                if not acquired:
                    raise TimeoutError("the handoff lock was not released within 30 s")
            return acquired_at
        lock = Lock(self.client, self.path)
        lock.acquire(timeout=30)  # raises LockTimeout
        acquired_at = time.monotonic()
        lock.release()
        return acquired_at


@contextlib.contextmanager
def kazoo_held(client: KazooClient, path: str) -> Iterator[bool]:
    lock = Lock(client, path)
    acquired = lock.acquire(blocking=False)
    try:
        yield acquired
    finally:
        if acquired:
            lock.release()


def wait_for_watch(entry: str, baseline: int | None) -> None:
    """Return once the waiter has set its watch (the server counts it), at most 10 s."""
    if baseline is None:  # no wchs on this server: give the waiter time
        time.sleep(0.05)
        return
    deadline = time.monotonic() + 10
    while total_watches(entry) <= baseline:
        if time.monotonic() > deadline:
            raise TimeoutError("the handoff waiter never set its watch")
        time.sleep(0.0005)


def watches_or_none(entry: str) -> int | None:
    try:
        return total_watches(entry)
    except (OSError, ValueError):
        return None


def one_handoff(holder: Callable[[], Any], waiter: Child, entry: str) -> float:
    baseline = watches_or_none(entry)
    with holder() as acquired:
        if not acquired:
            raise RuntimeError("the handoff holder could not take the lock")
        waiter.send("wait")
        wait_for_watch(entry, baseline)
        released_at = time.monotonic()
    return waiter.expect() - released_at


def measure_handoff(
    layout: Roles, root: str, plan: Plan, tasks: Tasks, client: KazooClient
) -> dict[str, list[float]]:
    waiter_hosts = layout.hosts(layout.other)
    path = kazoo_paths(root)["handoff"]
    holders: dict[str, Callable[[], Any]] = {
        "zkcelery": lambda: tasks.locker.lock("handoff"),
        "kazoo": lambda: kazoo_held(client, path),
    }
    waiters = {
        kind: Child(f"the {kind} handoff waiter", Waiter, kind, waiter_hosts, root)
        for kind in holders
    }
    try:
        for waiter in waiters.values():
            waiter.expect()
        samples: dict[str, list[float]] = {kind: [] for kind in holders}
        rounds = math.ceil(plan.handoff_cycles / plan.handoff_batch)
        for index in range(rounds):
            kinds = list(holders) if index % 2 == 0 else list(reversed(holders))
            for kind in kinds:
                for _ in range(plan.handoff_batch):
                    samples[kind].append(one_handoff(holders[kind], waiters[kind], layout.other))
        return samples
    finally:
        stop_children(list(waiters.values()))


# ---------------------------------------------------------------------------
# Throughput: processes locking distinct keys
# ---------------------------------------------------------------------------


class Locker(Side):
    """In a child: lock cycles on a key of its own, for a given time (throughput)."""

    def __init__(self, kind: str, hosts: str, root: str, index: int) -> None:
        super().__init__(kind, hosts, root, f"throughput{index}")
        self.index = index
        self.path = f"{root}/kazoo/throughput-{index}"
        self.cycle()  # warm

    def cycle(self) -> None:
        if self.kind == "zkcelery":
            zk_lock_cycle(self.tasks.locker, "throughput", self.index)
        else:
            kazoo_lock_cycle(self.client, self.path)

    def run(self, start_at: float, seconds: float) -> int:
        return len(run_from(start_at, seconds, self.cycle))


@dataclass
class Throughput:
    """Aggregate cycles per second, and zkcelery/kazoo per round (each pair back to back)."""

    rates: dict[str, dict[int, float]]
    round_ratios: dict[int, list[float]]

    def ratio(self, size: int) -> float:
        return self.rates["zkcelery"][size] / self.rates["kazoo"][size]

    def paired(self, size: int) -> float:
        """The median of the per-round ratios: a burst of outside load spoils one round only."""
        return statistics.median(self.round_ratios[size])


def measure_throughput(layout: Roles, root: str, plan: Plan) -> Throughput:
    kinds, sizes = ("zkcelery", "kazoo"), (1, 2, 4)
    workers = {
        kind: [
            Child(f"{kind} locker {i}", Locker, kind, layout.hosts(layout.entry(i)), root, i)
            for i in range(max(sizes))
        ]
        for kind in kinds
    }
    try:
        for worker in itertools.chain.from_iterable(workers.values()):
            worker.expect(REPLY_TIMEOUT * 2)
        totals = {(kind, size): 0 for kind in kinds for size in sizes}
        ratios: dict[int, list[float]] = {size: [] for size in sizes}
        points = list(totals)
        for index in range(plan.throughput_rounds):
            done = {}
            for kind, size in points if index % 2 == 0 else reversed(points):
                done[kind, size] = run_point(workers[kind][:size], plan.throughput_seconds)
                totals[kind, size] += done[kind, size]
            for size in sizes:
                ratios[size].append(done["zkcelery", size] / max(1, done["kazoo", size]))
        seconds = plan.throughput_seconds * plan.throughput_rounds
        rates = {kind: {size: totals[kind, size] / seconds for size in sizes} for kind in kinds}
        return Throughput(rates, ratios)
    finally:
        stop_children(list(itertools.chain.from_iterable(workers.values())))


def run_point(workers: Sequence[Child], seconds: float) -> int:
    return sum(start_together(workers, "run", seconds, lead=0.05)[1])


# ---------------------------------------------------------------------------
# Metrics: the cost of keeping them, on the hot path
# ---------------------------------------------------------------------------


class Metered(Side):
    """In a child: zkcelery lock cycles, with Prometheus metrics kept, or without.

    ``mode``: "plain" (none kept), "metered" (in the process, as solo, threads and gevent
    workers keep them) or "multiprocess" (in files of ``folder``, as a prefork pool's
    processes do).
    """

    def __init__(self, hosts: str, root: str, mode: str, folder: str) -> None:
        super().__init__("zkcelery", hosts, root, mode)
        if mode == "multiprocess":  # before prometheus_client is imported
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
        if mode != "plain":
            zkcelery.start_metrics_server(0, "127.0.0.1")
        self.key = mode
        self.cycle()  # warm

    def cycle(self) -> None:
        zk_lock_cycle(self.tasks.locker, self.key)

    def batch(self, cycles: int) -> tuple[list[float], float]:
        """Time ``cycles`` cycles: each one's wall time, and the CPU time of all."""
        samples, clock, cpu = [], time.perf_counter, time.process_time()
        for _ in range(cycles):
            start = clock()
            self.cycle()
            samples.append(clock() - start)
        return samples, time.process_time() - cpu

    def count(self, entry: str, cycles: int) -> float:
        return count_burst(entry, self.cycle, cycles, probe_overhead(lambda: received([entry])))

    def signal_cost(self, cycles: int) -> float:
        """Microseconds of the two signals a lock cycle sends (and their receivers), alone."""
        lease = self.tasks.locker.lock(self.key)
        started = time.perf_counter()
        for _ in range(cycles):
            zkcelery.lease_acquired.send(sender=self.tasks.locker, lease=lease, waited=0.001)
            zkcelery.lease_released.send(sender=self.tasks.locker, lease=lease, held=0.001)
        return (time.perf_counter() - started) / cycles * 1e6


def measure_metrics(layout: Roles, root: str, plan: Plan) -> dict[str, dict[str, float]]:
    """Lock cycles with metrics and without, alternating batches in two children."""
    hosts, folder = layout.hosts(layout.count), tempfile.mkdtemp(prefix="zkcelery-bench-")
    sides = {
        mode: Child(f"{mode} locker", Metered, hosts, root, mode, folder)
        for mode in ("plain", "metered", "multiprocess")
    }
    try:
        for child in sides.values():
            child.expect(REPLY_TIMEOUT * 2)
        requests = {n: c.call("count", layout.count, plan.count_cycles) for n, c in sides.items()}
        samples: dict[str, list[float]] = {name: [] for name in sides}
        cpu = dict.fromkeys(sides, 0.0)
        order = list(sides)
        for index in range(math.ceil(plan.cycles / plan.batch)):
            shift = index % len(order)
            for name in order[shift:] + order[:shift]:
                batch, seconds = sides[name].call("batch", plan.batch)
                samples[name] += batch
                cpu[name] += seconds
        return {
            name: {**summary(samples[name]), "cpu_us": cpu[name] / len(samples[name]) * 1e6,
                   "requests": requests[name],
                   "signals_us": sides[name].call("signal_cost", 20 * plan.cycles)}
            for name in sides
        }  # fmt: skip
    finally:
        stop_children(list(sides.values()))
        shutil.rmtree(folder, ignore_errors=True)


# ---------------------------------------------------------------------------
# Redis, for reference
# ---------------------------------------------------------------------------


# The lock is redis-py's own Lock, the one its documentation gives: acquire is one
# SET key token NX PX (token: a fresh uuid), release one EVALSHA of a script that
# deletes the key only while it still holds that token.  That is the promise zkcelery's
# lock keeps (a late release never frees the lock of whoever took it next), so both do
# the same job; and it costs what celery-once's and celery-singleton's SET NX + plain
# DEL cost, two round trips a cycle (the warm-up cycles load the script).  As for the
# ZooKeeper clients, each cycle makes a new lock object over one connection kept open.
REDIS_KEY = "bench-lock"


def redis_missing() -> str | None:
    """Why the Redis lock cannot be measured here, or None when it can."""
    if shutil.which("redis-server") is None:
        return "no redis-server on this machine"
    if importlib.util.find_spec("redis") is None:
        return "no redis-py (the test extra brings it)"
    return None


@dataclass
class Redis:
    process: subprocess.Popen
    client: Any  # a redis.Redis
    version: str  # the server's
    client_version: str  # redis-py's

    def cycle(self) -> None:
        lock = self.client.lock(REDIS_KEY, timeout=30)  # PX 30000
        if not lock.acquire(blocking=False):
            raise RuntimeError("redis lock unexpectedly held")
        lock.release()  # LockNotOwnedError if the key no longer holds our token

    def stop(self) -> None:
        self.client.close()
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_redis() -> Redis | None:
    """A private redis-server (no persistence) on a free port, or None (``redis_missing``)."""
    executable = shutil.which("redis-server")
    if executable is None or redis_missing() is not None:
        return None
    import redis

    port = free_port()
    command = [executable, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    command += ["--appendonly", "no", "--dir", tempfile.gettempdir()]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and process.poll() is None:
        try:
            version = client.info("server")["redis_version"]
        except redis.ConnectionError:
            time.sleep(0.05)
            continue
        return Redis(process, client, version, redis.__version__)
    client.close()
    process.kill()
    process.wait()
    return None


# ---------------------------------------------------------------------------
# Peak RSS, in fresh interpreters
# ---------------------------------------------------------------------------

# Linux keeps ru_maxrss across execve: a child started by this (large) process
# would report this process's size, so the probes read their own image's peak,
# VmHWM, and fall back to ru_maxrss where there is no /proc.
PEAK_RSS = """
import resource
def peak_rss():
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        with open("/proc/self/status") as status:
            hwm = [line.split()[1] for line in status if line.startswith("VmHWM:")]
    except OSError:
        hwm = []
    print(hwm[0] if hwm else maxrss, maxrss)
"""
# A bare kazoo client that connects and reads once, then reports: the end of two probes.
_BARE_CLIENT = """
client = KazooClient(hosts={hosts!r})
client.start(timeout=15)
client.exists("/")
peak_rss()
client.stop()
client.close()
"""
RSS_PROBES = {
    "zkcelery": """
import sys
sys.path.insert(0, {repo!r})
from celery import Celery, signals
import zkcelery
app = Celery("rss", set_as_current=False)
app.conf.update(ZOOKEEPER_HOSTS={hosts!r}, ZOOKEEPER_ROOT={root!r})
@app.task(base=zkcelery.LockTask, bind=True, shared=False)
def probe(self):
    pass
with probe.lock("rss") as acquired:
    assert acquired
peak_rss()
signals.worker_process_shutdown.send(sender=None)
""",
    "celery_app_kazoo": """
from celery import Celery
from kazoo.client import KazooClient
app = Celery("rss", set_as_current=False)
app.conf.update(ZOOKEEPER_HOSTS={hosts!r})
@app.task(bind=True, shared=False)
def probe(self):
    pass
probe.name, app.conf.get("ZOOKEEPER_HOSTS")
"""
    + _BARE_CLIENT,
    "celery_kazoo": """
import celery
from kazoo.client import KazooClient
"""
    + _BARE_CLIENT,
}


def measure_rss(hosts: str, root: str) -> dict[str, float]:
    """Peak RSS in MiB of a child using zkcelery, of one with a bare KazooClient, and between."""
    found = {}
    for name, code in RSS_PROBES.items():
        source = PEAK_RSS + code.format(repo=str(REPO), hosts=hosts, root=root)
        done = subprocess.run(
            [sys.executable, "-c", source], capture_output=True, text=True, timeout=120, check=True
        )
        peak_kib, maxrss_kib = done.stdout.split()[-2:]
        found[name] = int(peak_kib) / 1024
        found[f"{name}_ru_maxrss"] = int(maxrss_kib) / 1024  # inherited: for the record
    return found


# ---------------------------------------------------------------------------
# Results: ratios, targets, tables
# ---------------------------------------------------------------------------


def median_ms(stats: dict[str, dict[str, float]], name: str) -> float:
    return stats[name]["median_ms"]


def ratio(stats: dict[str, dict[str, float]], top: str, bottom: str) -> float:
    return median_ms(stats, top) / median_ms(stats, bottom)


def build_targets(
    stats: dict[str, dict[str, float]],
    counts: dict[str, float],
    handoff: dict[str, dict[str, float]],
    throughput: Throughput,
    metrics: dict[str, dict[str, float]],
) -> list[Target]:
    def over(top: str, bottom: str) -> float:
        return ratio(stats, top, bottom)

    floor = median_ms(stats, "floor")
    mutex_ms = median_ms(stats, "mutex_apply") - median_ms(stats, "plain_apply")
    mutex_requests = round(counts["mutex_apply"] - counts["plain_apply"], 2)
    limited_requests = round(counts["limited_apply"] - counts["plain_apply"], 2)
    reads = f"read {median_ms(stats, 'exists'):.2f} ms, create+delete {floor:.2f} ms"
    handoff_ratio = handoff["zkcelery"]["median_ms"] / handoff["kazoo"]["median_ms"]
    handoff_note = "after the release: nothing for zkcelery's first waiter, a listing for kazoo's"
    throughput_note = (
        f"median of {len(throughput.round_ratios[4])} paired rounds; "
        f"ratio of totals {throughput.ratio(4):.2f}"
    )
    return [
        Target("requests per lock cycle, reused key", counts["zk_lock"], "<=", 2),
        Target("requests per lock cycle, fresh key", counts["zk_lock_fresh"], "<=", 2),
        Target("requests per failed try-lock", counts["zk_try_fail"], "<=", 1),
        Target(
            "requests per semaphore cycle (max_leases=2)",
            counts["zk_semaphore"],
            "<=",
            3.05,
            REAPED,
        ),
        Target("requests per read-lock cycle (12)", counts["zk_read"], "<=", 3.05, REAPED),
        Target("requests per write-lock cycle (12)", counts["zk_write"], "<=", 3.05, REAPED),
        Target("requests per MutexTask run", mutex_requests, "<=", 2),
        Target("requests per limited MutexTask run (max 2)", limited_requests, "<=", 3.05, REAPED),
        Target("requests per multi-lock cycle, 2 keys (13)", counts["zk_multi2"], "<=", 2),
        Target("requests per multi-lock cycle, 4 keys (13)", counts["zk_multi4"], "<=", 2),
        Target("lock / floor (2)/(1), reused key", over("zk_lock", "floor"), "<=", 1.15),
        Target("lock / floor (2)/(1), fresh key", over("zk_lock_fresh", "floor"), "<=", 1.15),
        Target("lock / kazoo Lock (2)/(3)", over("zk_lock", "kazoo_lock"), "<=", 0.85, reads),
        Target("lock / connect-per-call (2)/(4)", over("zk_lock", "connect"), "<=", 0.40),
        Target("failed try-lock / kazoo (5)", over("zk_try_fail", "kazoo_try_fail"), "<=", 0.50),
        Target("semaphore / kazoo (6)", over("zk_semaphore", "kazoo_semaphore"), "<=", 0.40),
        Target(
            "MutexTask overhead / floor (7)",
            mutex_ms / floor,
            "<=",
            1.15,
            f"overhead {mutex_ms:.2f} ms",
        ),
        Target("handoff / kazoo (8)", handoff_ratio, "<=", 1.0, handoff_note),
        Target(
            "requests per lock cycle with metrics (11)", metrics["metered"]["requests"], "<=", 2
        ),
        *[
            Target(
                f"lock cycle with metrics{', multiprocess' if mode != 'metered' else ''} / "
                "without (11)",
                metrics[mode]["median_ms"] / metrics["plain"]["median_ms"],
                "<=",
                1.05,
                f"client CPU {metrics[mode]['cpu_us']:.0f} us a cycle with metrics, "
                f"{metrics['plain']['cpu_us']:.0f} us without; the signals alone "
                f"{metrics[mode]['signals_us']:.1f} us ({metrics['plain']['signals_us']:.1f} "
                "us unheard)",
            )
            for mode in ("metered", "multiprocess")
        ],
        Target(
            "throughput at 4 processes / kazoo (9)",
            throughput.paired(4),
            ">=",
            1.2,
            throughput_note,
        ),
    ]


def contender_rows(stats: dict[str, dict[str, float]], counts: dict[str, float]) -> list[list[str]]:
    rows = []
    for name in ORDER:
        if name in stats:
            row = stats[name]
            rows.append(
                [
                    LABELS[name],
                    str(int(row["n"])),
                    fmt(row["median_ms"]),
                    fmt(row["p99_ms"]),
                    fmt(counts.get(name)),
                ]
            )
    return rows


def metrics_rows(metrics: dict[str, dict[str, float]]) -> list[list[str]]:
    labels = {
        "plain": "11 lock(), metrics not kept",
        "metered": "11 lock(), metrics kept",
        "multiprocess": "11 lock(), metrics kept, multiprocess (prefork)",
    }
    return [
        [labels[name], str(int(row["n"])), fmt(row["median_ms"]), fmt(row["p99_ms"]),
         fmt(row["requests"])]
        for name, row in metrics.items()
    ]  # fmt: skip


def handoff_rows(handoff: dict[str, dict[str, float]]) -> list[list[str]]:
    return [
        [f"8  handoff, {kind}", str(int(row["n"])), fmt(row["median_ms"]), fmt(row["p99_ms"]), "-"]
        for kind, row in handoff.items()
    ]


def throughput_rows(throughput: Throughput) -> list[list[str]]:
    return [
        [
            str(size),
            f"{throughput.rates['zkcelery'][size]:.0f}",
            f"{throughput.rates['kazoo'][size]:.0f}",
            f"{throughput.ratio(size):.2f}",
            f"{throughput.paired(size):.2f}",
        ]
        for size in throughput.round_ratios
    ]


CONTENDER_HEADER = ["contender", "cycles", "median ms", "p99 ms", "ZK requests/cycle"]
THROUGHPUT_HEADER = [
    "processes",
    "zkcelery cycles/s",
    "kazoo Lock cycles/s",
    "ratio",
    "median of paired rounds",
]


def render(results: dict[str, Any], table: Table) -> str:
    stats, counts = results["contenders"], results["requests"]
    rows = (
        contender_rows(stats, counts)
        + handoff_rows(results["handoff"])
        + metrics_rows(results["metrics"])
    )
    parts = [table(CONTENDER_HEADER, rows)]
    parts.append(table(THROUGHPUT_HEADER, throughput_rows(results["throughput"])))
    parts.append(table(TARGET_HEADER, target_rows(results["target_objects"])))
    return "\n\n".join(parts)


def report_machine_lines(machine: dict[str, Any]) -> list[str]:
    return [
        *machine_lines(machine),
        f"measured clients on {machine['timing']}, holders and waiters on {machine['other']}, "
        f"request counts on {machine['count']}",
    ]


def notes_lines(results: dict[str, Any], plan: Plan) -> list[str]:
    rss, redis = results["rss"], results["redis"]
    lines = [
        f"connect-per-call: {plan.connect_cycles} cycles (each opens and closes a session); "
        f"handoff: {plan.handoff_cycles} per side; throughput: "
        f"{plan.throughput_rounds} x {plan.throughput_seconds:g} s per point",
        f"peak RSS (VmHWM of a fresh child): zkcelery (import, app, connect, lock once) "
        f"{rss['zkcelery']:.1f} MiB; the same without zkcelery (Celery app and task, bare "
        f"KazooClient) {rss['celery_app_kazoo']:.1f} MiB; celery + kazoo imported, bare "
        f"KazooClient {rss['celery_kazoo']:.1f} MiB",
        redis or f"Redis: not measured ({redis_missing() or 'redis-server did not start'})",
    ]
    if not results["layout_alone"]:
        lines.append("warning: fewer than 3 servers: request counts may include other pings")
    if plan.quick:
        lines.append("quick mode: few cycles; timings and verdicts are indicative only")
    return lines


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------


def redis_note(redis: Redis | None) -> str | None:
    if redis is None:
        return None
    return (
        f"Redis {redis.version}: a private redis-server without persistence, redis-py "
        f"{redis.client_version}'s Lock (SET NX PX + a DEL only of its own token, in a "
        "script: two round trips, nothing fsync'd)"
    )


@dataclass
class Session:
    """Everything the parent process holds open during a run, closed in ``close()``."""

    layout: Roles
    root: str
    client: KazooClient  # the measured kazoo client, on the timing server
    holder: KazooClient  # holds kazoo's "held" lock, on the other server
    tasks: Tasks  # the measured zkcelery app, on the timing server
    holder_tasks: Tasks  # holds zkcelery's "held" lock, on the other server
    held: list[Any] = field(default_factory=list)
    redis: Redis | None = None

    def close(self) -> None:
        for held in reversed(self.held):
            with contextlib.suppress(Exception):
                held.release()
        close_sessions()
        if self.redis is not None:
            self.redis.stop()
        delete_root(self.client, self.root, log)
        disconnect(self.holder)
        disconnect(self.client)


def open_session(layout: Roles) -> Session:
    root = new_root(ROOT_PARENT)
    client = connect(layout.hosts(layout.timing))
    holder = connect(layout.hosts(layout.other))
    session = Session(
        layout,
        root,
        client,
        holder,
        make_tasks(layout.hosts(layout.timing), root),
        make_tasks(layout.hosts(layout.other), root, "holder"),
    )
    try:
        client.ensure_path(f"{root}/kazoo")
        kazoo_lock = Lock(holder, kazoo_paths(root)["held"])
        if not kazoo_lock.acquire(blocking=False):
            raise RuntimeError("could not take kazoo's 'held' lock")
        session.held.append(kazoo_lock)
        zk_lease = session.holder_tasks.locker.lock("held")
        if not zk_lease.acquire():
            raise RuntimeError("could not take zkcelery's 'held' lock")
        session.held.append(zk_lease)
    except BaseException:
        session.close()
        raise
    return session


def timed_contenders(session: Session, plan: Plan) -> list[Contender]:
    cycles = {
        **kazoo_cycles(session.client, session.root),
        **zkcelery_cycles(session.tasks, "time"),
    }
    hosts, path = session.layout.hosts(session.layout.timing), kazoo_paths(session.root)["connect"]
    cycles["connect"] = lambda: connect_per_call(hosts, path)
    if session.redis is not None:
        cycles["redis"] = session.redis.cycle
    return [
        Contender(name, cycles[name], plan.connect_cycles if name == "connect" else plan.cycles)
        for name in ORDER
        if name in cycles
    ]


def run(layout: Roles, plan: Plan) -> dict[str, Any]:
    started = time.monotonic()
    machine = machine_info(layout, timing=layout.timing, other=layout.other, count=layout.count)
    session = open_session(layout)
    try:
        log(f"root {session.root}; counting requests on {layout.count}")
        counts = count_requests(layout, session.root, plan)
        session.redis = start_redis()
        contenders = timed_contenders(session, plan)
        log(f"timing {len(contenders)} contenders round-robin, {plan.cycles} cycles each")
        run_round_robin(contenders, plan)
        stats = {c.name: summary(c.samples) for c in contenders}
        log(f"blocking handoff, {plan.handoff_cycles} per side")
        handoff_samples = measure_handoff(layout, session.root, plan, session.tasks, session.client)
        handoff = {kind: summary(samples) for kind, samples in handoff_samples.items()}
        log("throughput at 1, 2 and 4 processes")
        throughput = measure_throughput(layout, session.root, plan)
        log("lock cycles with metrics kept and without")
        metrics = measure_metrics(layout, session.root, plan)
        log("peak RSS")
        rss = measure_rss(layout.hosts(layout.timing), session.root)
        redis = redis_note(session.redis)
    finally:
        session.close()
    targets = build_targets(stats, counts, handoff, throughput, metrics)
    return {
        "machine": machine,
        "plan": asdict(plan),
        "root": session.root,
        "contenders": stats,
        "requests": counts,
        "handoff": handoff,
        "throughput": throughput,
        "metrics": metrics,
        "rss": rss,
        "redis": redis,
        "layout_alone": layout.count_alone,
        "target_objects": targets,
        "targets": [{**asdict(t), "passed": t.passed} for t in targets],
        "seconds": time.monotonic() - started,
    }


def write_json(results: dict[str, Any], path: Path) -> None:
    data = {k: v for k, v in results.items() if k != "target_objects"}
    data["throughput"] = asdict(results["throughput"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    quick = "few cycles; asserts nothing"
    parser = arguments(__doc__, quick, DEFAULT_JSON, "where to write results")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    layout = Roles.parse(args.hosts or ensemble_hosts(), "bench")
    plan = QUICK if args.quick else FULL
    check_ensemble(layout, "bench")
    results = run(layout, plan)
    machine, notes = report_machine_lines(results["machine"]), notes_lines(results, plan)
    print_report(results, render, machine, notes, args.markdown)
    write_json(results, args.json)
    print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
