"""Distributed locks, semaphores and mutexes for Celery tasks, held in ZooKeeper.

A guarded section never runs twice at once, and a lock whose holder dies is
freed by ZooKeeper when the holder's session expires: no lock outlives a
crashed worker, and no lock is ever held by two tasks.  README.md is the
manual: the settings (``ZOOKEEPER_HOSTS``... in the Celery configuration),
every option, what each fault does, the costs, the signals (such as
:data:`lease_acquired`), and the command line (``python -m zkcelery
ls|rm|check|secure``, or ``celery -A proj zk``).

A lock in a task: :class:`LockTask` gives a bound task ``self.lock()``, one
holder at a time.  It does not wait by default; the body runs either way, and
the :class:`Lease` it yields is truthy when it holds::

    import zkcelery

    @app.task(base=zkcelery.LockTask, bind=True)
    def locking_task(self, data):
        with self.lock() as lock_acquired:
            if lock_acquired:
                do_work(data)

A semaphore admits ``max_leases`` holders at once; positional values refine
the name, so that only tasks with the same ``tenant`` share one::

    @app.task(base=zkcelery.LockTask, bind=True)
    def limited(self, tenant, data):
        with self.semaphore(tenant, max_leases=3) as acquired:
            if acquired:
                do_work(data)

``self.read_lock()`` and ``self.write_lock()`` share one lock between many
readers or one writer, served in arrival order; ``self.multi_lock(*keys)``
holds several locks as one lease, taken all or none without deadlock::

    @app.task(base=zkcelery.LockTask, bind=True)
    def transfer(self, source, target, data):
        accounts = zkcelery.LockKey("account", source), zkcelery.LockKey("account", target)
        with self.multi_lock(*accounts, blocking=True):
            do_work(data)

A :class:`MutexTask` runs its whole body under a mutex; a copy that finds it
held raises :class:`MutexHeld` (a ``Reject``), or with ``mutex_requeue=True``
goes back to the queue.  ``mutex_max_leases=N`` admits N copies per key at
once, and ``mutex_each_key=True`` makes each argument of ``mutex_keys`` a
mutex of its own::

    @app.task(base=zkcelery.MutexTask, bind=True)
    def mutex_task(self, data):
        do_work(data)

Also here: :class:`EarlyMutexTask`, whose mutex is taken when the task is
sent.  What runs beside the workers is in the companion modules:
``zkcelery_beat`` (the schedulers: the elected beat, EarlyMutexScheduler) and
``zkcelery_metrics`` (metrics, the exporter, ``ls --watch``).

The module is laid out in layers, each built on those above it: errors and
signals; the adapter to kazoo's and Celery's private parts (the only code that
touches them, all listed in ``_INTERNALS``); pure code (names, settings, ACLs);
the session, one object per job; the queue engine and the znode protocols (the
protocol map lists every node); leases; tasks; the companions' hooks; the
command line; and last every Celery hook and import-time side effect.  Read it
bottom up for the user's view, top down for the machinery.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import inspect
import json
import logging
import math
import os
import re
import select
import signal
import socket
import sys
import threading
import time
import types
import uuid
import weakref
from collections import deque, namedtuple
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from typing import Any, Callable, NoReturn, Optional, TypeVar, Union
from urllib.parse import quote

import celery
import click
from billiard.einfo import ExceptionInfo
from celery import signals
from celery.exceptions import Ignore, Reject, Retry
from celery.utils.dispatch import Signal
from celery.utils.saferepr import saferepr as safe_repr
from kazoo.client import KazooClient, TransactionRequest
from kazoo.exceptions import (
    EXCEPTIONS,
    AuthFailedError,
    BadArgumentsError,
    BadVersionError,
    ConnectionClosedError,
    ConnectionDropped,
    ConnectionLoss,
    KazooException,
    NoAuthError,
    NoChildrenForEphemeralsError,
    NodeExistsError,
    NoNodeError,
    NotEmptyError,
    RolledBackError,
    SessionExpiredError,
    UnimplementedError,
)
from kazoo.handlers.threading import SequentialThreadingHandler
from kazoo.protocol.serialization import (
    Auth,
    CheckVersion,
    Connect,
    Create,
    Create2,
    Delete,
    GetChildren,
    GetData,
    MultiHeader,
    SetData,
    Transaction,
    int_struct,
    long_struct,
    read_string,
    stat_struct,
)
from kazoo.protocol.states import EventType, KazooState, WatchedEvent, ZnodeStat
from kazoo.retry import KazooRetry
from kazoo.security import (
    ACL,
    OPEN_ACL_UNSAFE,
    Id,
    Permissions,
    make_acl,
    make_digest_acl,
)

#: The private parts of kazoo and Celery that zkcelery (and its companions) rely on, in one
#: place: (module, object, attribute, its parameters or None for plain data).  test_zkcelery
#: checks each against the installed versions, so that an upgrade that moves one fails a
#: test, not a worker, and fails if zkcelery uses a private attribute (``_name``) not listed.
_INTERNALS = (
    # the session id through a suspension, and requests kazoo has no method for
    ("kazoo.client", "KazooClient", "_session_id", None),
    ("kazoo.client", "KazooClient", "_connection", None),
    ("kazoo.client", "KazooClient", "_call", ("request", "async_object")),
    # the granted timeout and the time of the last answer (_instrument)
    ("kazoo.protocol.connection", "ConnectionHandler", "_invoke", ("timeout", "request", "xid")),
    ("kazoo.protocol.connection", "ConnectionHandler", "_submit", ("request", "timeout", "xid")),
    ("kazoo.protocol.connection", "ConnectionHandler", "_read_header", ("timeout",)),
    ("kazoo.protocol.serialization", "Connect", "time_out", None),
    # _PollingHandler.adopt: the connection's socket reads and writes, replaced
    ("kazoo.protocol.connection", "ConnectionHandler", "_read", ("length", "timeout")),
    ("kazoo.protocol.connection", "ConnectionHandler", "_write", ("msg", "timeout")),
    ("kazoo.protocol.connection", "ConnectionHandler", "_socket", None),
    # _PollingHandler overrides these two handler methods, and runs the callbacks
    # marked by _at_once from the Callback kazoo hands to dispatch_callback
    ("kazoo.handlers.threading", "SequentialThreadingHandler", "select", ("args", "kwargs")),
    ("kazoo.handlers.threading", "SequentialThreadingHandler", "dispatch_callback", ("callback",)),
    ("kazoo.protocol.states", "Callback", "func", None),
    ("kazoo.protocol.states", "Callback", "args", None),
    # the requests kazoo lacks (_CreateContainer, _CreateTTL, _Multi), built from its own
    ("kazoo.protocol.serialization", "Create2", "serialize", ()),
    ("kazoo.protocol.serialization", "Create2", "deserialize", ("bytes", "offset")),
    ("kazoo.protocol.serialization", "Transaction", "serialize", ()),
    ("kazoo.protocol.serialization", "MultiHeader", "deserialize", ("bytes", "offset")),
    # MutexTask's copies of itself, and its rejections' one log line
    ("celery.app.task", "Task", "on_replace", ("sig",)),
    ("celery.app.task", "Context", "replaced_task_nesting", None),
    ("celery.app.task", "Context", "retries", None),
    ("celery.app.task", "Context", "is_eager", None),
    ("celery.app.trace", "", "LOG_REJECTED", None),
    ("celery.app.trace", "", "LOG_IGNORED", None),
    # zkcelery_beat.ElectedScheduler has beat rebuild its heap of due entries when it takes over
    ("celery.beat", "Scheduler", "_heap", None),
)

__all__ = [
    "AccessDenied", "AlreadyAcquired", "AlreadyQueued", "ConfigurationError",
    "CoordinationError", "EarlyMutexTask", "Lease", "LockKey", "LockTask", "MaxLeasesMismatch",
    "MutexHeld", "MutexTask", "NotLeading", "NotReentrant", "StaleVersion", "ZKCeleryError",
    "app_command", "beat_deposed", "beat_elected", "beat_tick_skipped", "close_session",
    "early_refused", "lease_acquired", "lease_lost", "lease_not_acquired", "lease_released",
    "ls_rows", "ls_table", "mutex_dropped", "mutex_rejected", "mutex_requeued", "open_session",
    "setting",
]  # fmt: skip

logger = logging.getLogger("zkcelery")


def _log(level: int, msg: str, *args: Any, exc_info: Any = None, **facts: Any) -> None:
    """Log ``msg`` through zkcelery's logger, with ``facts`` as the record's attributes: so
    that tools read facts rather than match text.  README.md ("Logging") lists the facts,
    and every ``outcome``: each line has one, one word for what happened."""
    if logger.isEnabledFor(level):
        logger.log(level, msg, *args, exc_info=exc_info, extra=facts)


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


class ZKCeleryError(Exception):
    """Base of the errors raised by zkcelery."""


class CoordinationError(ZKCeleryError):
    """ZooKeeper could not be reached in time, or the session was lost while acquiring."""


class ConfigurationError(ZKCeleryError, ValueError):
    """A ``ZOOKEEPER_*`` setting is malformed, or a ``beat_schedule`` entry could never be sent."""


class AccessDenied(ZKCeleryError):
    """ZooKeeper refused a request: the znodes belong to another identity (``ZOOKEEPER_AUTH``)."""


class AlreadyAcquired(ZKCeleryError):
    """``acquire()`` was called on a lease that is held already."""


class NotReentrant(ZKCeleryError):
    """A blocking acquire without a timeout of a lock this thread holds: it would never end."""


class MaxLeasesMismatch(ZKCeleryError, ValueError):
    """Holders of one semaphore disagree on ``max_leases``."""


class MutexHeld(ZKCeleryError, Reject):
    """A :class:`MutexTask` copy found its mutex held by another task.

    It is a :class:`celery.exceptions.Reject` (``requeue`` is the task's
    ``mutex_requeue``), so Celery rejects the message and code that catches
    ``Reject`` catches it.  Without requeue the task ends in ``FAILURE`` with this
    exception as its result, and ``task_failure`` is sent once, on every Celery
    zkcelery supports (Celery records it itself from 5.7 on, zkcelery before).
    """

    def __init__(self, reason: str | None = None, requeue: bool = False) -> None:
        super().__init__(reason, requeue)  # Reject's: sets reason and requeue

    def __str__(self) -> str:
        return str(self.reason)


class AlreadyQueued(ZKCeleryError, Reject):
    """An :class:`EarlyMutexTask` send refused: a copy with the same key is queued or running.

    A :class:`celery.exceptions.Reject` too, as the original zkcelery raised.

    :ivar key: the mutex's readable key, e.g. ``"proj.sync('srv-1')"``.
    :ivar task_id: the id of the queued or running copy (None if unknown).
    """

    #: The metadata of the copy that holds the key, when known.
    holder: dict | None = None

    def __init__(self, key: str, task_id: str | None, state: str = "queued") -> None:
        super().__init__(f"{key} is already {state} (task {task_id})", False)
        # A result backend rebuilds an exception from its args: make them ours.
        self.args = (key, task_id, state)
        self.key = key
        self.task_id = task_id
        self.state = state

    __str__ = MutexHeld.__str__  # its reason, not its args

    def __reduce__(self) -> tuple:
        return (type(self), (self.key, self.task_id, self.state))


class _ConnectionLost(CoordinationError):
    """The connection dropped while a request was in flight: it may or may not have applied."""


class NotLeading(ZKCeleryError):
    """A lease's holder cannot confirm it still holds it (Lease.fenced_write, a beat's election)."""


class StaleVersion(NotLeading):
    """A fenced write named a version its node is no longer at: another wrote it since."""


# ---------------------------------------------------------------------------
# Signals: what happens to leases, mutex copies and the beat, in Celery's style
# ---------------------------------------------------------------------------
#
# Each is sent in the process where it happens (the pool child that holds the
# lease, the sender of an early mutex, the beat), synchronously; with no
# receiver connected a send costs one check.  Every signal's keyword arguments
# are listed with it; ``lease`` is the Lease (``lease.key``, ``lease.kind``,
# ``lease.task_name``...).  Celery's Signal logs and swallows a receiver's
# exception: a failing receiver never changes what a lock does.  lease_lost
# may be sent from one of kazoo's threads: a receiver must not block.

#: A lease was granted.  ``sender``: the task (the app, for the beat's
#: election); ``lease``; ``waited``: seconds since the lease's first try.
lease_acquired = Signal(name="zkcelery.lease_acquired")
#: A lease was given back.  ``sender``, ``lease``; ``held``: seconds held.
lease_released = Signal(name="zkcelery.lease_released")
#: A try ended without the lease.  ``sender``, ``lease``, ``waited``;
#: ``reason``: "held" (a try that does not wait), "timeout" (a blocking try
#: whose timeout passed) or "unavailable" (ZooKeeper did not answer in time).
lease_not_acquired = Signal(name="zkcelery.lease_not_acquired")
#: A held lease may now be someone else's.  ``sender``, ``lease``, ``held``;
#: ``reason``: "session" (its session expired or went unanswered too long) or
#: "deleted" (its node was deleted from outside, as by ``zkcelery rm``).
lease_lost = Signal(name="zkcelery.lease_lost")
#: A MutexTask or EarlyMutexTask copy found its mutex held and was rejected
#: without running.  ``sender``: the task; ``lease``; ``task_id``: this copy's;
#: ``holder``: the holder's metadata (task id, host, pid...), {} if unknown.
mutex_rejected = Signal(name="zkcelery.mutex_rejected")
#: As mutex_rejected, for a copy sent back to the queue (``mutex_requeue``).
mutex_requeued = Signal(name="zkcelery.mutex_requeued")
#: A second delivery of a message whose first delivery still runs was
#: acknowledged without running.  ``sender``, ``lease``, ``task_id``, ``holder``.
mutex_dropped = Signal(name="zkcelery.mutex_dropped")
#: ``EarlyMutexTask.apply_async()`` refused to send: the key is queued or
#: running.  ``sender``: the task; ``key``; ``task_id``: the copy that has it;
#: ``state``: "queued" or "running".
early_refused = Signal(name="zkcelery.early_refused")
#: This beat was elected and leads.  ``sender``: the ElectedScheduler;
#: ``token``: its fencing token.
beat_elected = Signal(name="zkcelery.beat_elected")
#: This beat stopped leading, or gave up taking over.  ``sender``; ``reason``.
beat_deposed = Signal(name="zkcelery.beat_deposed")
#: The leading beat skipped a tick of an EarlyMutexTask entry whose last run
#: is queued or running.  ``sender``; ``entry``: the entry's name; ``task_id``.
beat_tick_skipped = Signal(name="zkcelery.beat_tick_skipped")


# ---------------------------------------------------------------------------
# The kazoo adapter: the only code that touches kazoo's private parts
# ---------------------------------------------------------------------------
#
# Every private attribute of kazoo used here is in _INTERNALS (a test checks both
# ways); the session below reaches kazoo's privates only through this block.


_CLOCK = getattr(time, "CLOCK_BOOTTIME", None)


def _now() -> float:
    """Seconds on a clock that also counts a suspended host (Linux's BOOTTIME)."""
    return time.clock_gettime(_CLOCK) if _CLOCK is not None else time.monotonic()


#: Create flags: persistent with a time to live, a container, ephemeral and sequential.
_TTL_FLAG, _CONTAINER_FLAG, _EPHEMERAL_SEQUENTIAL = 5, 4, 3


class _CreateContainer(Create2):
    """ZooKeeper's create of a container (opcode 19), which kazoo lacks: a create's body
    with the container flag; its answer is a create2's (the path, then the stat)."""

    type = 19


class _CreateTTL(namedtuple("_CreateTTL", "path data acl flags ttl")):
    """ZooKeeper's create of a node with a time to live (opcode 21), which kazoo lacks:
    a create's body, then the TTL in milliseconds; its answer is a create2's."""

    type = 21

    def serialize(self) -> bytearray:
        body = Create2(self.path, self.data, self.acl, self.flags).serialize()
        return body + long_struct.pack(self.ttl)

    deserialize = Create2.deserialize


class _Multi(Transaction):
    """A multi-operation whose answer may hold a create2's: the server answers a TTL
    create in one so (the path, then the stat), which kazoo's Transaction cannot read."""

    @classmethod
    def deserialize(cls, bytes: Any, offset: int) -> list:
        results: list = []
        header, offset = MultiHeader.deserialize(bytes, offset)
        while not header.done:
            response: Any = True  # a delete's or a check's
            if header.type in (Create.type, Create2.type):
                response, offset = read_string(bytes, offset)
                offset += stat_struct.size if header.type == Create2.type else 0
            elif header.type == SetData.type:
                response = ZnodeStat._make(stat_struct.unpack_from(bytes, offset))
                offset += stat_struct.size
            elif header.type == -1:
                response = EXCEPTIONS[int_struct.unpack_from(bytes, offset)[0]]()
                offset += int_struct.size
            results.append(response)
            header, offset = MultiHeader.deserialize(bytes, offset)
        return results


def _session_id(client: KazooClient) -> int | None:
    """The session's id, also while the connection is down (client_id is None then): the
    session lives on through a suspension, and kazoo forgets its id only when it is lost."""
    return client._session_id  # type: ignore[no-any-return]


def _send(client: KazooClient, request: Any) -> Any:
    """Send a request object as it is; its async result.  For the requests kazoo has no
    method for, and for a contended acquisition's reads: kazoo's methods check their
    arguments and prefix each path with its chroot (empty here), several times a request."""
    result = client.handler.async_result()
    client._call(request, result)
    return result


class _PollingHandler(SequentialThreadingHandler):
    """kazoo's threading handler, waiting for its sockets with one ``poll()``.

    kazoo's select() builds an epoll selector for every call (create, register each
    descriptor, wait, close: five system calls and as many Python objects), before every
    read and write of its connection thread, several times a request: a third of a
    contended acquisition's CPU.  poll() is one system call, with no limit on descriptor
    numbers (select's 1024), and answers as select() does.  Each thread keeps a poll
    object per set of sockets it asks about (the same few): ``kept``, then afresh.
    """

    kept = 8

    def __init__(self) -> None:
        super().__init__()
        self._pollers = threading.local()

    def dispatch_callback(self, callback: Any) -> None:
        """Run a watch callback marked by _at_once here, on the connection thread.

        kazoo hands every watch event to its callback thread: a thread wake-up per
        event, and a waiter woken one thread later, though a callback that only sets
        flags and events need not wait.  Those run here keep their order among
        themselves (the connection thread reads a session's events in order); a policy
        marks all of its watches or none, so that the order it relies on holds.
        """
        if not getattr(callback.func, "_at_once", False):
            super().dispatch_callback(callback)
            return
        try:
            callback.func(*callback.args)
        except Exception as exc:  # never let a callback break the connection
            _log(logging.ERROR, "a watch callback failed: %s", exc, outcome="callback_failed",
                 error=str(exc), exc_info=True)  # fmt: skip

    def adopt(self, connection: Any) -> None:
        """Make ``connection`` read and write before it asks whether it can.

        kazoo's connection thread waits for its socket (select) before every read and
        write, though its main loop has just said the socket is readable and a send
        buffer is nearly always free: two reads (length, then body) and a write a
        request, each a system call more.  The socket does not block: trying first, and
        waiting only when it would block, answers the same, as soon.
        """

        def _read(length: int, timeout: float) -> bytes:
            sock = connection._socket
            parts = []
            while length > 0:
                parts.append(self._try(sock, sock.recv, length, timeout, writing=0))
                length -= len(parts[-1])
            return parts[0] if len(parts) == 1 else b"".join(parts)

        def _write(msg: bytes, timeout: float) -> None:
            sock = connection._socket
            view = memoryview(msg)
            while view:
                view = view[self._try(sock, sock.send, view, timeout, writing=1) :]

        connection._read, connection._write = _read, _write

    def _try(self, sock: Any, io: Callable, arg: Any, timeout: float, writing: int) -> Any:
        """``io(arg)`` on the non-blocking ``sock``, waiting only when it would block."""
        try:
            while True:
                try:
                    done = io(arg)
                except BlockingIOError:
                    lists = ([], [sock]) if writing else ([sock], [])
                    if not self.select(*lists, [], timeout)[writing]:
                        what = "write" if writing else "read"
                        raise self.timeout_exception(f"socket time-out during {what}") from None
                    continue
                if not done:
                    raise ConnectionDropped("socket connection broken")
                return done
        except OSError as exc:
            raise ConnectionDropped(f"socket connection error: {exc.strerror or exc}") from exc

    def select(self, rlist: Any, wlist: Any, xlist: Any, timeout: float | None = None) -> Any:
        cache = self._pollers.__dict__.setdefault("cache", {})
        key = (tuple(rlist), tuple(wlist), tuple(xlist))
        found = cache.get(key)
        if found is None:
            if len(cache) >= self.kept:
                cache.clear()
            found = cache[key] = self.poller(*key)
        poller, objects = found
        # Whole milliseconds, rounded up: a shorter wait would spin.
        ms = None if timeout is None else max(0, math.ceil(timeout * 1000))
        ready: tuple[list, list, list] = ([], [], [])
        for fd, events in poller.poll(ms):
            for group, obj, mask in objects[fd]:
                if events & mask:
                    ready[group].append(obj)
        return ready

    @staticmethod
    def poller(*groups: tuple) -> tuple[Any, dict[int, list[tuple[int, Any, int]]]]:
        """A poll object for select()'s three lists, and what each descriptor's events
        answer: an error or a hang-up makes it readable (and writable), as select() says."""
        answers = (select.POLLIN | select.POLLHUP | select.POLLERR | select.POLLNVAL,
                   select.POLLOUT | select.POLLERR | select.POLLHUP, select.POLLPRI)  # fmt: skip
        asks = (select.POLLIN, select.POLLOUT, select.POLLPRI)
        poller = select.poll()
        wanted: dict[int, int] = {}
        objects: dict[int, list[tuple[int, Any, int]]] = {}
        for group, members in enumerate(groups):
            for obj in members:
                fd = obj if isinstance(obj, int) else obj.fileno()
                wanted[fd] = wanted.get(fd, 0) | asks[group]
                poller.register(fd, wanted[fd])  # again: the mask grows
                objects.setdefault(fd, []).append((group, obj, answers[group]))
        return poller, objects


def _instrument(client: KazooClient, records: Any) -> None:
    """Tell ``records`` (a _Liveness) what kazoo keeps to itself, from three methods of the
    connection (on its thread): the timeout the server granted (_invoke carries the
    connect, and returns before kazoo reports CONNECTED), each request sent and answered.
    A _PollingHandler takes over a plain socket's I/O (TLS has its own rules for waits)."""
    connection = client._connection
    invoke, submit, read_header = connection._invoke, connection._submit, connection._read_header

    def recording_invoke(timeout: Any, request: Any, xid: Any = None) -> Any:
        began = _now()
        answer = invoke(timeout, request, xid)
        if isinstance(request, Connect) and getattr(answer[0], "time_out", 0) > 0:
            records.connected(answer[0].time_out / 1000.0, began)
        return answer

    def recording_submit(request: Any, timeout: Any, xid: Any = None) -> Any:
        records.sending(request, xid)
        return submit(request, timeout, xid)

    def recording_read_header(timeout: Any) -> Any:
        header, buffer, offset = read_header(timeout)
        records.answered(header.xid, header.zxid)
        return header, buffer, offset

    connection._invoke, connection._submit = recording_invoke, recording_submit
    connection._read_header = recording_read_header
    if isinstance(client.handler, _PollingHandler) and not client.use_ssl:
        client.handler.adopt(connection)


_CallbackT = TypeVar("_CallbackT", bound=Callable[..., None])


def _at_once(callback: _CallbackT) -> _CallbackT:
    """Mark a watch callback that may run on kazoo's connection thread (_PollingHandler):
    it must only set flags and events, never block, never call ZooKeeper."""
    callback._at_once = True  # type: ignore[attr-defined]
    return callback


# ---------------------------------------------------------------------------
# Celery shims: what zkcelery does where Celery does not (yet)
# ---------------------------------------------------------------------------

#: Whether the worker itself records a rejection without requeue (Celery 5.7 on, see
#: _record_rejection).  Once zkcelery requires celery>=5.7, delete _record_rejection,
#: _WorkerFacts and its setting in _worker_starts.
_CELERY_RECORDS_REJECTIONS = tuple(celery.VERSION[:2]) >= (5, 7)


@dataclass
class _WorkerFacts:
    """What a worker's main process knew at its start, inherited by its pool's processes."""

    sends_events: bool = False  #: it sends task events (``-E``, ``worker_send_task_events``)


_worker = _WorkerFacts()


def _record_rejection(task: celery.Task, exc: Reject) -> None:
    """Record a rejection without requeue as Celery 5.7 does: FAILURE, ``task_failure``.

    Called just before ``raise exc`` in a task.  Before 5.7 a worker only drops
    a message rejected without requeue (Celery issue #4222): the task would stay
    PENDING and ``result.get()`` would wait forever.  Only a worker's run is
    recorded, and only where Celery will not: a direct or eager call raises.
    Where the worker sends task events, the ``task-failed`` event 5.7 sends is
    sent too, so that Flower and celery-exporter see the rejection.
    """
    request = task.request
    if _CELERY_RECORDS_REJECTIONS or exc.requeue or request.called_directly or request.is_eager:
        return
    try:
        raise exc
    except Reject:
        einfo = ExceptionInfo()
    traceback = exc.__traceback__
    exc.__traceback__ = None  # raised again by the caller
    ignored = task.ignore_result if request.ignore_result is None else request.ignore_result
    try:
        task.backend.mark_as_failure(
            request.id, exc, einfo.traceback, request=request,
            store_result=not ignored or task.store_errors_even_if_ignored)  # fmt: skip
    except Exception:  # the message is rejected all the same, as Celery would
        _log(logging.WARNING, "task %s[%s]: could not store the rejection", task.name,
             request.id, exc_info=True, task_id=request.id, task_name=task.name,
             outcome="not_stored")  # fmt: skip
    signals.task_failure.send(sender=task, task_id=request.id, exception=exc, args=request.args,
                              kwargs=request.kwargs, traceback=traceback, einfo=einfo)  # fmt: skip
    if _worker.sends_events and task.send_events:
        try:
            task.send_event("task-failed", exception=safe_repr(exc), traceback=einfo.traceback)
        except Exception as error:  # a monitor's event must not change the rejection
            _log(logging.WARNING, "task %s[%s]: rejection not sent as a task event: %s",
                 task.name, request.id, error, task_id=request.id, task_name=task.name,
                 outcome="not_sent", error=str(error))  # fmt: skip


#: Task ids of rejections zkcelery logged in one line: Celery need not log them again.
_quiet_ids: set = set()


class _QuietRejections(logging.Filter):
    """Drops Celery's record (a WARNING with a traceback) of a rejection zkcelery logged.

    Celery logs every ``Reject`` and ``Ignore`` from ``celery.app.trace``, with
    the task id in the record's ``data``; only those zkcelery raised are dropped.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        data = getattr(record, "data", None)
        if isinstance(data, dict) and data.get("description") in ("rejected", "ignored"):
            task_id = data.get("id")
            if task_id in _quiet_ids:
                _quiet_ids.discard(task_id)
                return False
        return True


# ---------------------------------------------------------------------------
# Names: namespaces, node names, and lock names
# ---------------------------------------------------------------------------


# The namespaces: one persistent node each under ZOOKEEPER_ROOT.
_LOCKS, _MUTEXES, _SEMAPHORES = "locks", "mutexes", "semaphores"
_RWLOCKS = "rwlocks"  # read_lock() and write_lock()
_EARLY = "early"  # EarlyMutexTask
_BEAT = "beat"  # ElectedScheduler: the election, and the schedule's state
#: Every namespace, in the order the tree is made and ``ls``, ``rm`` and
#: ``secure`` walk them.
_NAMESPACE_NAMES = (_LOCKS, _MUTEXES, _SEMAPHORES, _RWLOCKS, _EARLY, _BEAT)


# Parts of node names.  A lock name never holds _SEP, so none of these suffixes
# can be mistaken for a key.
_SEP = "@"  # separates the parts of a contender's node name
_QUEUE = f"{_SEP}queue"  # suffix of an exclusive lock's queue container
_SCHEDULE = f"{_SEP}schedule"  # suffix of a beat's state node
_SEQ_DIGITS = 10  # ZooKeeper appends a 10-digit counter to sequential nodes
_NAME_LIMIT, _PREFIX_KEPT = 240, 160  # longer names keep a readable prefix and end in a digest


def _guid_of(data: bytes) -> str | None:
    """The guid a contender wrote in its node's data (None if it wrote none)."""
    try:
        return json.loads(data or b"{}").get("guid")
    except ValueError:
        return None


def _atom(text: str | bytes) -> str:
    if isinstance(text, str):
        text = text.encode("utf-8", "surrogatepass")
    return quote(text, safe="")


def _encode(value: Any, position: int, base: str) -> str:
    # Order matters: bool is an int and datetime is a date.
    if value is None:
        return "n"
    if isinstance(value, bool):
        return "t" if value else "f"
    if isinstance(value, int):
        return f"i:{int(value)}"
    if isinstance(value, float):
        return f"r:{_atom(repr(float(value)))}"
    if isinstance(value, str):
        return f"s:{_atom(value)}"
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"b:{_atom(bytes(value))}"
    if isinstance(value, Decimal):
        return f"d:{_atom(str(value))}"
    if isinstance(value, datetime):
        return f"T:{_atom(value.isoformat())}"
    if isinstance(value, date):
        return f"D:{_atom(value.isoformat())}"
    if isinstance(value, uuid.UUID):
        return f"u:{value}"
    if isinstance(value, (list, tuple)):  # one type: JSON turns tuples into lists
        return f"l({','.join(_encode(v, position, base) for v in value)})"
    if isinstance(value, dict):
        pairs = sorted(
            f"{_encode(k, position, base)}={_encode(v, position, base)}" for k, v in value.items()
        )
        return f"m({','.join(pairs)})"
    raise TypeError(
        f"cannot build a lock name for {base!r} from a value of type "
        f"{type(value).__qualname__!r} (refining value {position}): use str, int, float, "
        "bool, None, bytes, UUID, Decimal, date, datetime, or lists/tuples/dicts of them"
    )


def _lock_name(base: str, values: Sequence[Any]) -> str:
    """Encode a lock's base name and refining values as one znode name.

    The encoding is injective: every value is tagged with its type and its
    text percent-encoded, so the structural characters ``( ) , : =`` never
    occur inside a value.  It is stable (no ``hash()``, no addresses) and
    always a valid znode name (never ``.`` or ``..``, no ``/``, no control
    characters).  Names past ``_NAME_LIMIT`` keep a prefix and end in ``#``
    plus a SHA-256 digest of the whole; ``#`` never occurs otherwise.
    """
    name = f"{_atom(base)}({','.join(_encode(v, i, base) for i, v in enumerate(values))})"
    if len(name) > _NAME_LIMIT:
        digest = hashlib.sha256(name.encode()).hexdigest()
        name = f"{name[:_PREFIX_KEPT]}#{digest}"
    return name


def _readable_key(base: str, values: Sequence[Any]) -> str:
    shown = (repr(value) for value in values)
    return f"{base}({', '.join(t if len(t) <= 80 else f'{t[:77]}...' for t in shown)})"


# ---------------------------------------------------------------------------
# Settings, and the checks of task and call options
# ---------------------------------------------------------------------------


_DEFAULT_HOSTS = "127.0.0.1:2181"
_HOST_RE = re.compile(
    r"\[(?P<ip6>[0-9A-Za-z:.%]+)\](?::(?P<p6>[^:]*))?"  # [::1]:2181
    r"|(?P<host>[^:\s\[\]]+)(?::(?P<port>.*))?"  # host:2181
)
_SSL_OPTIONS = {"ca", "certfile", "keyfile", "keyfile_password", "verify_certs", "check_hostname"}


@dataclass(frozen=True)
class _Settings:
    hosts: str
    root: str  # the chroot (if any) joined with ZOOKEEPER_ROOT
    session_timeout: float
    connect_timeout: float
    auth: tuple[str, str] | None = None
    protect_reads: bool = False
    ssl: dict = field(default_factory=dict)


def setting(app: celery.Celery, name: str, default: Any = None) -> Any:
    """The raw value of zkcelery's setting ``name`` (``"ZOOKEEPER_METRICS_PORT"``) in ``app``,
    found as zkcelery finds it: upper case, lower case or ``CELERY_``-prefixed; else
    ``default``.  For the companion modules (zkcelery_metrics) and other extensions."""
    # Celery aliases upper and lower case for its own settings only.
    for key in (name, name.lower(), f"CELERY_{name}"):
        value = app.conf.get(key)
        if value is not None:
            return value
    return default


_setting = setting


def _parse_host(entry: str, whole: Any) -> str:
    entry = entry.strip()
    if not entry:
        raise ConfigurationError(f"ZOOKEEPER_HOSTS {whole!r} has an empty entry")
    if "/" in entry:
        # kazoo would take it as a chroot that only its own methods apply; zkcelery
        # sends some requests as they are, with its root holding the chroot.
        raise ConfigurationError(
            f"ZOOKEEPER_HOSTS: {entry!r} has a chroot; a list of hosts takes none (give "
            "the hosts as one string, 'host:port,host:port/chroot', or use ZOOKEEPER_ROOT)"
        )
    match = _HOST_RE.fullmatch(entry)
    if match is None:
        raise ConfigurationError(f"ZOOKEEPER_HOSTS: {entry!r} is not host:port")
    host = match["ip6"] or match["host"]
    port = match["p6"] if match["ip6"] else match["port"]
    port = "2181" if port is None else port
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigurationError(
            f"ZOOKEEPER_HOSTS: {entry!r} has a bad port {port!r} (a number from 1 to 65535)"
        )
    return f"[{host}]:{int(port)}" if match["ip6"] else f"{host}:{int(port)}"


def _parse_root(value: Any, setting: str = "ZOOKEEPER_ROOT") -> str:
    if not isinstance(value, str) or not value.startswith("/") or value == "/":
        raise ConfigurationError(
            f"{setting} must be an absolute znode path like '/zkcelery', not {value!r}"
        )
    if value.endswith("/"):
        raise ConfigurationError(f"{setting} {value!r} must not end with '/'")
    for part in value[1:].split("/"):
        if part in ("", ".", "..") or any(ord(c) < 32 or 0x7F <= ord(c) <= 0x9F for c in part):
            raise ConfigurationError(f"{setting} {value!r} has an invalid part {part!r}")
    return value


def _parse_hosts(value: Any) -> tuple[str, str]:
    """Validate ``ZOOKEEPER_HOSTS``; return (kazoo host string, chroot)."""
    chroot = ""
    if isinstance(value, (list, tuple)):
        if not all(isinstance(item, str) for item in value):
            raise ConfigurationError(f"ZOOKEEPER_HOSTS: every entry must be a str: {value!r}")
        entries = list(value)
    elif isinstance(value, str):
        text = value.strip()
        if "/" in text:
            text, chroot = text[: text.index("/")], text[text.index("/") :]
            chroot = "" if chroot == "/" else _parse_root(chroot, "ZOOKEEPER_HOSTS chroot")
        entries = text.split(",")
    else:
        raise ConfigurationError(
            f"ZOOKEEPER_HOSTS must be a str or a list of 'host:port', not {type(value).__name__}"
        )
    if not any(entry.strip() for entry in entries):
        raise ConfigurationError(f"ZOOKEEPER_HOSTS is empty ({value!r})")
    return ",".join(_parse_host(entry, value) for entry in entries), chroot


def _check_seconds(name: str, value: Any) -> float:
    """``value`` as a positive, finite number of seconds; ConfigurationError naming ``name``."""
    try:
        if isinstance(value, bool):
            raise ValueError
        seconds = float(value)
    except (TypeError, ValueError):
        raise ConfigurationError(f"{name} must be a number of seconds, not {value!r}") from None
    if not seconds > 0 or seconds == float("inf"):
        raise ConfigurationError(f"{name} must be a positive number of seconds, not {value!r}")
    return seconds


def _parse_seconds(app: celery.Celery, name: str, default: float) -> float:
    return _check_seconds(name, _setting(app, name, default))


def _parse_auth(value: Any) -> tuple[str, str] | None:
    if value is None:
        return None
    scheme, _, credential = value.partition(":") if isinstance(value, str) else ("", "", "")
    if not scheme or not credential or (scheme == "digest" and ":" not in credential):
        # Never echo the value: it holds a secret.
        raise ConfigurationError("ZOOKEEPER_AUTH must look like 'digest:user:secret'")
    return scheme, credential


def _parse_flag(app: celery.Celery, name: str) -> bool:
    value = _setting(app, name, False)
    if not isinstance(value, bool):
        raise ConfigurationError(f"{name} must be True or False, not {value!r}")
    return value


def _parse_ssl(value: Any) -> dict:
    if value is None or value is False:
        return {}
    if value is True:
        return {"use_ssl": True}
    if not isinstance(value, dict) or not set(value) <= _SSL_OPTIONS:
        unknown = sorted(set(value) - _SSL_OPTIONS) if isinstance(value, dict) else value
        raise ConfigurationError(
            f"ZOOKEEPER_SSL must be True or a dict of {sorted(_SSL_OPTIONS)}; got {unknown!r}"
        )
    return {"use_ssl": True, **value}


def _read_settings(app: celery.Celery) -> _Settings:
    hosts, chroot = _parse_hosts(_setting(app, "ZOOKEEPER_HOSTS", _DEFAULT_HOSTS))
    root = _parse_root(_setting(app, "ZOOKEEPER_ROOT", "/zkcelery"))
    return _Settings(
        hosts=hosts,
        root=chroot + root,
        session_timeout=_parse_seconds(app, "ZOOKEEPER_SESSION_TIMEOUT", 10.0),
        connect_timeout=_parse_seconds(app, "ZOOKEEPER_CONNECT_TIMEOUT", 5.0),
        auth=_parse_auth(_setting(app, "ZOOKEEPER_AUTH")),
        protect_reads=_parse_flag(app, "ZOOKEEPER_PROTECT_READS"),
        ssl=_parse_ssl(_setting(app, "ZOOKEEPER_SSL")),
    )


def _check_wait(blocking: Any, timeout: Any) -> None:
    if timeout is None:
        return
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout must be a number of seconds or None, not {timeout!r}")
    if not timeout >= 0:
        raise ValueError(f"timeout must be 0 or more seconds, not {timeout!r}")
    if not blocking:
        raise ValueError(f"timeout={timeout!r} has no effect without blocking=True")


#: What ``self.retry()`` takes: its own parameters and ``apply_async()``'s options.
_RETRY_KEYWORDS = frozenset({
    "args", "kwargs", "exc", "throw", "eta", "countdown", "max_retries", "task_id", "producer",
    "link", "link_error", "shadow", "expires", "retry", "retry_policy", "queue", "exchange",
    "routing_key", "priority", "serializer", "compression", "add_to_parent", "publisher",
    "headers", "ignore_result", "time_limit", "soft_time_limit", "connection", "router",
    "result_cls", "reply_to", "correlation_id", "expiration", "delivery_mode", "content_type",
    "content_encoding",
})  # fmt: skip


def _check_retry_options(namespace: str, options: dict, retry: bool) -> None:
    """Name a keyword that is neither the call's option nor ``self.retry()``'s, or needs retry."""
    calls = {_SEMAPHORES: "semaphore()", _RWLOCKS: "read_lock() / write_lock()"}
    call = calls.get(namespace, "lock()")
    own = "blocking, timeout, retry, identifier, name"
    if namespace == _SEMAPHORES:
        own = f"max_leases, {own}"
    unknown = sorted(set(options) - _RETRY_KEYWORDS)
    if unknown:
        raise TypeError(
            f"{call} got unknown keyword(s) {unknown}: its options are {own}; other keywords "
            "go to self.retry() with retry=True (countdown, max_retries, exc, eta, queue...)"
        )
    if options and not retry:
        raise TypeError(f"{sorted(options)} are options of self.retry(): they need retry=True")


def _check_max_leases(max_leases: Any) -> None:
    if isinstance(max_leases, bool) or not isinstance(max_leases, int):
        raise TypeError(f"max_leases must be an int, not {max_leases!r}")
    if max_leases < 1:
        raise ValueError(f"max_leases must be 1 or more, not {max_leases!r}")


def _check_mutex_options(cls: type[celery.Task], run: Any) -> inspect.Signature:
    task = cls.__dict__.get("name") or cls.__name__
    keys = cls.mutex_keys  # type: ignore[attr-defined]
    if isinstance(keys, str) or not all(isinstance(key, str) for key in keys):
        raise TypeError(
            f"task {task}: mutex_keys must be a tuple of parameter names, not {keys!r}"
            + (f" (did you mean ({keys!r},)?)" if isinstance(keys, str) else "")
        )
    if getattr(cls, "mutex_requeue", False) and cls.__dict__.get("acks_late") is False:
        raise ValueError(
            f"task {task}: mutex_requeue=True needs acks_late (Celery only requeues a "
            "rejected message it has not acknowledged yet); remove acks_late=False"
        )
    signature = inspect.signature(run.__func__ if isinstance(run, staticmethod) else run)
    if not isinstance(run, staticmethod):  # bind=True: drop ``self``
        signature = signature.replace(parameters=list(signature.parameters.values())[1:])
    named = {p.name for p in signature.parameters.values()
             if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}  # fmt: skip
    for key in keys:
        if key not in named:
            raise TypeError(
                f"task {task}: mutex_keys names {key!r}, which is not a parameter of the "
                f"task (its parameters: {', '.join(sorted(named)) or 'none'})"
            )
    # mutex_each_key: a MutexTask's, with two or more mutex_keys, one mutex each.
    each = getattr(cls, "mutex_each_key", False)
    if not isinstance(each, bool):
        raise TypeError(f"task {task}: mutex_each_key must be True or False, not {each!r}")
    if each and not issubclass(cls, MutexTask):
        raise TypeError(f"task {task}: mutex_each_key is an option of MutexTask only")
    if each and len(set(keys)) < 2:
        raise ValueError(
            f"task {task}: mutex_each_key=True takes one mutex per argument of mutex_keys, "
            f"and needs two or more of them (mutex_keys={tuple(keys)!r}); with one, leave "
            "mutex_each_key out"
        )
    if each and getattr(cls, "mutex_max_leases", None) not in (None, 1):
        raise ValueError(f"task {task}: mutex_each_key=True does not combine with mutex_max_leases")
    return signature


def _mutex_timeout(task: celery.Task) -> float:
    timeout = getattr(task, "mutex_timeout", None)
    if timeout is not None:
        return float(timeout)
    return _check_seconds("MUTEX_TIMEOUT", _setting(task.app, "MUTEX_TIMEOUT", 3600.0))


# ---------------------------------------------------------------------------
# Security: ACLs and identities (ZOOKEEPER_AUTH)
# ---------------------------------------------------------------------------


def _default_acl(settings: _Settings) -> list[ACL] | None:
    """The ACL of every node zkcelery creates: only this identity may change or delete;
    others may read (list holders) unless ZOOKEEPER_PROTECT_READS.  Only the digest scheme
    names an identity an ACL can hold."""
    if settings.auth is None or settings.auth[0] != "digest":
        return None
    user, password = settings.auth[1].split(":", 1)
    acl = [make_digest_acl(user, password, all=True)]
    if not settings.protect_reads:
        acl.append(make_acl("world", "anyone", read=True))
    return acl


#: Rights that let their holder break locks: make or remove nodes, or change the ACL.
_BREAKING = Permissions.CREATE | Permissions.DELETE | Permissions.ADMIN


def _acl_text(acls: list[ACL]) -> str:
    """Each entry as ``scheme:user=rwcda`` (the rights it grants)."""
    perms = ["".join(c for i, c in enumerate("rwcda") if a.perms >> i & 1) or "-" for a in acls]
    return ", ".join(f"{a.id.scheme}:{a.id.id.split(':')[0]}={p}" for a, p in zip(acls, perms))


def _acl_problem(path: str, acls: list[ACL], identity: Id | None) -> ZKCeleryError | None:
    """Why the ACL ``acls`` of ``path`` does not protect zkcelery's locks, or None."""
    if identity is None:
        return None
    ours = [acl for acl in acls if acl.id == identity]
    shown = _acl_text(acls)
    user = identity.id.split(":")[0]
    if any(acl.id != identity and acl.perms & _BREAKING for acl in acls):
        return ConfigurationError(
            f"ZOOKEEPER_AUTH is set, but {path} lets others create or delete nodes (its ACL: "
            f"{shown}), so anyone can break the locks under it. Run `python -m zkcelery "
            f"secure` (or `celery -A proj zk secure`) to give it to {user!r} alone."
        )
    if not any(acl.perms & Permissions.CREATE and acl.perms & Permissions.DELETE for acl in ours):
        return AccessDenied(
            f"{path} belongs to another identity (its ACL: {shown}); check ZOOKEEPER_AUTH"
        )
    return None


# ---------------------------------------------------------------------------
# The session: one kazoo client per process and app, one object per job
# ---------------------------------------------------------------------------


#: Fractions of the granted session timeout: a lease is called lost once no request
#: sent in the last _LOST_AFTER_SILENCE is known to have reached the leader (lost_since):
#: known once a request sent _REPORTED_AFTER after its answer was answered through the
#: leader (_Liveness); while leases are held, the watchdog looks every _WATCHDOG_EVERY,
#: and sends a sync when nothing newer was known for _SYNC_AFTER: idle, a sync each look,
#: each reporting the one sent five looks before, so that an answer may take 0.3 of the
#: timeout before a live session reads lost.
_LOST_AFTER_SILENCE, _WATCHDOG_EVERY, _SYNC_AFTER, _REPORTED_AFTER = 0.75, 0.075, 0.35, 0.3

#: Opcodes whose answer shows that the leader had our session alive when we sent them:
#: writes (create, delete, setData, setACL, multi, create2, container, TTL) and sync.
#: A follower answers reads and pings by itself, and does so for a while even when it
#: is cut off from the leader, which is what expires sessions.
_CONFIRMED_BY_LEADER = frozenset({1, 2, 5, 7, 9, 14, 15, 19, 21})

#: How long, and for how many keys, a process remembers a lock it found contended.
_CONTENDED_FOR, _CONTENDED_KEYS = 2.0, 1000

#: Creates of a node whose container keeps being reaped, before giving up.
_CONTAINER_TRIES = 10

_T = TypeVar("_T")


class _HiddenAuth(logging.Filter):
    """Hides ZOOKEEPER_AUTH's credentials and the session's password in kazoo's log lines.

    kazoo logs every request it sends at DEBUG: the authentication packet with its
    ``user:secret`` in clear, the connect request with the session's password (whoever
    reads it can take the session over).  On the logger itself, so that the record is
    changed before any handler, here or above, formats it.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and any(isinstance(arg, (Auth, Connect)) for arg in args):
            record.args = tuple(arg._replace(auth="<hidden>") if isinstance(arg, Auth)
                                else arg._replace(passwd=b"<hidden>") if isinstance(arg, Connect)
                                else arg for arg in args)  # fmt: skip
        return True


#: The logger zkcelery's clients log through: kazoo's default, without the secrets
#: (the filter is installed with the other import-time hooks, at the end).
_kazoo_logger = logging.getLogger("kazoo.client")


def _pick_handler() -> Any:
    """kazoo's handler matching the process's monkey-patching (gevent, eventlet).  Only a
    patched process can use them, and importing them imports gevent or eventlet: look at
    the patch state of what is already imported, lazily."""
    for patcher, patched, name in (
        ("gevent.monkey", "is_module_patched", "Gevent"),
        ("eventlet.patcher", "is_monkey_patched", "Eventlet"),
    ):
        if patcher in sys.modules and getattr(sys.modules[patcher], patched)("socket"):
            green = importlib.import_module(f"kazoo.handlers.{name.lower()}")
            return getattr(green, f"Sequential{name}Handler")()
    return _PollingHandler() if hasattr(select, "poll") else SequentialThreadingHandler()


class _Liveness:
    """What the ``lost`` rule judges by (_Session.lost_since), kept on kazoo's connection
    thread (_instrument): the session timeout the server granted, and when the leader
    last heard from us; and the zxid of an answer, for whoever asked (zxid_holding).

    A server touches a session on every packet from its client, but a follower tells
    the leader, which alone expires sessions, only in its answer to the leader's next
    ping (every half tick), and a write or a sync it passes on refreshes nothing: the
    leader only checks the session is not expired yet.  So a follower cut off from the
    leader just after answering leaves the leader the touch of its last ping answer,
    which can be older than the request just answered.  A request is known to have
    reached the leader once a request sent at least _REPORTED_AFTER after its answer
    is answered through the leader: a ping came between the two (pings are at most a
    quarter of the timeout apart, as ZooKeeper's minimum timeout is two ticks), and its
    answer went up the same ordered link before the second.
    """

    def __init__(self, session_timeout: float) -> None:
        #: What the server granted, which may be less than what we asked for.
        self.session_timeout = session_timeout
        #: When we sent the latest request known to have reached the leader (above):
        #: the leader renewed the session as of that moment or later.
        self.heard = self.reported = _now()  # reported: what a confirmed request now shows
        #: xid -> when sent, and what it reports if answered through the leader.
        self.sent: dict[int, tuple[float, float | None]] = {}
        self.touched: deque[tuple[float, float]] = deque()  # (answered, sent), in order
        #: Requests whose answer's zxid is wanted: id(request) -> where it goes,
        #: then xid -> where it goes once the request is sent.
        self.zxid_wanted: dict[int, list[int]] = {}
        self.zxid_coming: dict[int, list[int]] = {}

    def connected(self, session_timeout: float, began: float) -> None:
        self.session_timeout = session_timeout
        self.sent.clear()
        self.touched.clear()  # touches of another server: its pings may not reach the leader
        self.zxid_coming.clear()  # asked on the last connection: never answered
        self.heard = self.reported = began  # the leader validated the reconnect since

    def sending(self, request: Any, xid: int) -> None:
        now = _now()
        while self.touched and self.touched[0][0] <= now - self.session_timeout * _REPORTED_AFTER:
            self.reported = self.touched.popleft()[1]
        confirmed = getattr(request, "type", None) in _CONFIRMED_BY_LEADER
        self.sent.setdefault(xid, (now, self.reported if confirmed else None))  # pings share one
        box = self.zxid_wanted.pop(id(request), None)
        if box is not None:
            self.zxid_coming[xid] = box

    def answered(self, xid: int, zxid: int) -> None:
        sent, reports = self.sent.pop(xid, (None, None))
        if sent is not None:
            self.touched.append((_now(), sent))
        if reports is not None and reports > self.heard:
            self.heard = reports
        box = self.zxid_coming.pop(xid, None)
        if box is not None:
            box.append(zxid)

    def silent(self, fraction: float) -> bool:
        """Whether the leader answered nothing sent in the last ``fraction`` of the timeout."""
        return _now() - self.heard >= self.session_timeout * fraction


class _Requests:
    """Requests on one kazoo client, each through :meth:`call`, which waits for a connection
    and an answer at most ``ZOOKEEPER_CONNECT_TIMEOUT``: kazoo never retries a command (its
    default retry never gives up), and a lock that hangs is worse than one that fails."""

    def __init__(self, settings: _Settings) -> None:
        self.settings = settings
        options: dict[str, Any] = dict(settings.ssl)
        if settings.auth is not None:
            options["auth_data"] = [settings.auth]
            options["default_acl"] = _default_acl(settings)
        self.handler = handler = _pick_handler()
        # Reconnect forever in the background, quickly: a lease waits for the
        # connection at most ZOOKEEPER_CONNECT_TIMEOUT, and ZooKeeper coming back
        # must not need a restart.  kazoo insists that the retry sleeps as the
        # handler does (eventlet's differs).
        retry = KazooRetry(max_tries=-1, delay=0.05, backoff=2, max_delay=1.0,
                           sleep_func=handler.sleep_func)  # fmt: skip
        self.client = KazooClient(hosts=settings.hosts, timeout=settings.session_timeout,
                                  connection_retry=retry, handler=handler, logger=_kazoo_logger,
                                  **options)  # fmt: skip
        self.acl = self.client.default_acl or OPEN_ACL_UNSAFE  # of the nodes we make
        self.live = self.handler.event_object()  # set while connected
        self.liveness = _Liveness(settings.session_timeout)
        _instrument(self.client, self.liveness)
        self.send = functools.partial(_send, self.client)  # a request object, as it is

    @property
    def session_id(self) -> int | None:
        return _session_id(self.client)

    def wait_connected(self, deadline: float | None = None) -> None:
        if self.live.is_set():  # the common case, without Event.wait's lock
            return
        limit = self.settings.connect_timeout
        if deadline is not None:
            limit = max(0.0, min(limit, deadline - time.monotonic()))
        if not self.live.wait(limit) and not self.live.is_set():
            raise CoordinationError(
                f"ZooKeeper at {self.settings.hosts} did not answer within {limit:.3g} s "
                "(ZOOKEEPER_CONNECT_TIMEOUT)"
            )

    def wait(self, event: Any, deadline: float | None) -> bool:
        """Wait for ``event``; False if the deadline came first."""
        if deadline is None:
            event.wait()
            return True
        remaining = deadline - time.monotonic()
        return remaining > 0 and (event.wait(remaining) or event.is_set())

    def call(self, method: Callable, *args: Any, deadline: float | None = None,
             abandon: Callable | None = None, then: Callable[[], Any] | None = None,
             **kwargs: Any) -> Any:  # fmt: skip
        """One request.  One that times out may still be applied later: ``abandon`` is then
        called with its result, whenever that comes.  ``then`` is called once the request
        is on its way, before its answer is awaited: to send the next with no wait between.
        """
        self.wait_connected(deadline)
        result = method(*args, **kwargs)
        if then is not None:
            then()
        return self.answer(result, deadline, abandon)

    def answer(self, result: Any, deadline: float | None, abandon: Callable | None = None) -> Any:
        """The value of a request's ``result`` (see call)."""
        limit = self.settings.connect_timeout
        if deadline is not None:
            limit = max(0.001, min(limit, deadline - time.monotonic()))
        try:
            return result.get(timeout=limit)
        except (NoAuthError, AuthFailedError) as exc:
            raise AccessDenied(
                f"ZooKeeper refused access ({type(exc).__name__}): the znodes under "
                f"{self.settings.root} belong to another identity; check ZOOKEEPER_AUTH"
            ) from None
        except (ConnectionLoss, SessionExpiredError, ConnectionClosedError) as exc:
            raise _ConnectionLost(f"connection to ZooKeeper lost ({type(exc).__name__})") from exc
        except self.handler.timeout_exception:
            if abandon is not None:
                result.rawlink(abandon)
            raise CoordinationError(f"ZooKeeper did not answer within {limit:.3g} s") from None

    def retried(self, attempt: Callable[[float], _T]) -> _T:
        """``attempt(deadline)``, tried again on the next connection if one drops (a
        leader change), until the connect timeout has passed."""
        deadline = time.monotonic() + self.settings.connect_timeout
        while True:
            try:
                return attempt(deadline)
            except _ConnectionLost:
                if time.monotonic() >= deadline:
                    raise

    def read(self, method: Callable, *args: Any, **kwargs: Any) -> Any:
        """A read, asked again on the next connection if the first drops (see retried)."""
        return self.retried(lambda deadline: self.call(method, *args, deadline=deadline, **kwargs))

    def get_async(self, path: str, watch: Callable | None = None) -> Any:
        return self.send(GetData(path, watch))

    def get_children_async(self, path: str, watch: Callable | None = None) -> Any:
        return self.send(GetChildren(path, watch))

    def multi_async(self, ops: list) -> Any:
        """A multi-operation of request objects, some of them kazoo's own lacks."""
        return self.send(_Multi(ops))

    def read_nodes(self, paths: Iterable[str]) -> list[tuple[str, dict]]:
        """(path, metadata) of each node of ``paths`` that exists."""
        found = []
        for path in paths:
            with contextlib.suppress(NoNodeError):
                found.append((path, json.loads(self.read(self.get_async, path)[0] or b"{}")))
        return found

    def stats_watching(
        self, watches: Sequence[tuple[str, Callable[[WatchedEvent], None]]]
    ) -> list[ZnodeStat | None]:
        """The stat of each path, watching it for a change (None if it is absent).  Sent
        together, one wait for all: the server answers in the order sent, so each watch is
        set before the next request is read.  Gets, not exists: an exists on an absent node
        leaves a watch for its creation, which a key never used again would keep."""

        def ask(deadline: float) -> list[ZnodeStat | None]:
            self.wait_connected(deadline)
            asked = [self.get_async(path, watch) for path, watch in watches]
            return [self._stat_or_none(result, deadline) for result in asked]

        return self.retried(ask)

    def _stat_or_none(self, result: Any, deadline: float) -> ZnodeStat | None:
        with contextlib.suppress(NoNodeError):
            return self.answer(result, deadline)[1]  # type: ignore[no-any-return]
        return None

    def zxid_holding(self, nodes: Sequence[tuple[str, str, int | None]]) -> int | None:
        """A zxid at which each of ``nodes`` (path, guid, owner) was ours: a fencing token,
        or None if a node is not ours any more.

        It must order a grant among those it conflicts with, which a node's creation zxid
        does not: a queue node is made when its waiter joins, and a multi-lock takes its
        keys one at a time.  A sync, then the nodes read, sent together: the sync has our
        server catch up with the leader (a grant learnt from a watch brings no answer, and
        our follower may not have applied the release that granted it).  Each answer says
        its node is still ours, so all were when the first was read: the token is the zxid
        in that answer's header (the last its server applied), larger than every earlier
        grant's of these keys (before that holder's release, before our grant, before our
        sync), smaller than every later one's (after our release).
        """

        def ask(deadline: float) -> int | None:
            box: list[int] = []
            first = GetData(nodes[0][0], None)
            self.liveness.zxid_wanted[id(first)] = box
            try:
                self.wait_connected(deadline)
                synced = self.client.sync_async(nodes[0][0])
                asked = [self.send(first)] + [self.get_async(path) for path, _, _ in nodes[1:]]
                self.answer(synced, deadline)
                for (_, guid, owner), result in zip(nodes, asked):
                    data, stat = self.answer(result, deadline)
                    if stat.ephemeralOwner != owner or _guid_of(data) != guid:
                        return None
                return box[0]
            except NoNodeError:
                return None
            finally:
                self.liveness.zxid_wanted.pop(id(first), None)

        return self.retried(ask)


class _Contended:
    """The keys this process found contended lately (_CONTENDED_FOR, _CONTENDED_KEYS)."""

    def __init__(self, mutex: threading.Lock) -> None:
        self.mutex = mutex
        self.when: dict[str, float] = {}  # key path -> when last seen contended, oldest first

    def __call__(self, key_path: str, seen: bool = False) -> bool:
        """Whether ``key_path`` was found contended lately (and note it, if ``seen``)."""
        now = time.monotonic()
        with self.mutex:
            if seen:
                self.when.pop(key_path, None)
                self.when[key_path] = now
                while len(self.when) > _CONTENDED_KEYS:
                    self.when.pop(next(iter(self.when)))
                return True
            return now - self.when.get(key_path, -_CONTENDED_FOR) < _CONTENDED_FOR


def _deletion(
    path: str, version: int, parent: str | None, mark: bytes | None, epoch: tuple[str, int] | None
) -> list[Any]:
    """delete_own's requests: the epoch's check (a fenced delete checks the namespace's
    version, not the node's), the hand-off mark, the node, its container."""
    ops: list[Any] = []
    if epoch is not None:
        ops.append(CheckVersion(*epoch))
        version = -1
    if mark is not None:
        ops.append(SetData(path, mark, version))
        version = -1  # the set moved it
    ops.append(Delete(path, version))
    if parent is not None:
        ops.append(Delete(parent, -1))
    return ops


def _marks_release(key_path: str) -> bool:
    """Whether a holder of the key at ``key_path`` marks its node as it releases it.

    A mutex's does (in ``mutexes``): its data is set in the request that deletes it, so
    a second delivery of the holder's task waiting for the node sees it change, then go:
    the run ended, not its session (_decide_mutex).  A lock's ``<name>`` is
    deleted plainly: its first waiter must see a deletion (_ExclusivePolicy).  An early
    mutex's running form always marks (_EarlyMutex).
    """
    return key_path.rsplit("/", 2)[-2] == _MUTEXES


def _setter(event: Any) -> Callable[[Any], None]:
    """A watch callback that sets ``event`` (whatever the watch reports)."""
    return lambda _: event.set()


class _Holdings:
    """The grants this process holds in a session, and the watchdog over them.

    A holder that sends nothing hears only from its own server (pings): while leases
    are held or waited for, the watchdog syncs when nothing was confirmed through the
    leader for a while, which keeps ``lost`` from turning true on a healthy session,
    and logs a lease lost to silence, a pause or expiry.
    """

    def __init__(self, session: _Session) -> None:
        self.session = session
        self.grants: set[_Grant] = set()
        self.waiters = 0  # blocking acquires under way
        self.watching = False  # the watchdog runs
        self.syncing = False  # its sync is on its way

    def remember(self, grant: _Grant) -> None:
        with self.session.mutex:
            self.grants.add(grant)
        self._start_watchdog()

    def forget(self, grant: _Grant) -> None:
        with self.session.mutex:
            self.grants.discard(grant)

    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        """A blocking acquire: a waiter may be granted by a watch long after its
        last write, and its lease must not be born lost."""
        with self.session.mutex:
            self.waiters += 1
        self._start_watchdog()
        try:
            yield
        finally:
            with self.session.mutex:
                self.waiters -= 1

    def grants_now(self) -> list[_Grant]:
        with self.session.mutex:
            return list(self.grants)

    def held(self, path: str) -> bool:
        return any(grant.path == path for grant in self.grants_now())

    def refuse_reentry(self, key_path: str, key: str) -> None:
        me = threading.get_ident()
        mine = [g for g in self.grants_now() if g.key_path == key_path and g.thread == me]
        if any(not grant.is_lost() for grant in mine):
            raise NotReentrant(
                f"{key} is already held by this thread and locks are not reentrant: "
                "blocking without a timeout would wait forever"
            )

    def report_lost(self) -> None:
        for grant in self.grants_now():
            grant.check_session()

    def _start_watchdog(self) -> None:
        with self.session.mutex:
            start, self.watching = not self.watching, True
        if start:
            self.session.handler.spawn(self._watch)

    def _watch(self) -> None:
        session, liveness = self.session, self.session.liveness
        while True:
            session.handler.sleep_func(max(0.05, liveness.session_timeout * _WATCHDOG_EVERY))
            with session.mutex:
                if not self.grants and not self.waiters:
                    self.watching = False
                    return
            if liveness.silent(_SYNC_AFTER) and not self.syncing and session.live.is_set():
                self.syncing = True
                synced = session.client.sync_async(session.settings.root)
                synced.rawlink(lambda _: setattr(self, "syncing", False))
            self.report_lost()


class _Orphans:
    """Nodes a release or an acquire had to leave behind, to delete as soon as a request
    can be answered: on reconnect, and meanwhile by a thread that tries again, backing
    off, while connected (an answer that timed out on a live connection brings no
    reconnect)."""

    def __init__(self, session: _Session) -> None:
        self.session = session
        # (path, guid) -> the session that made it: two leases of one key may each
        # leave a node in doubt (a release, then a take), and each is reaped by its own.
        self.nodes: dict[tuple[str, str | None], int | None] = {}
        self.reaping = False  # a thread deletes them while connected

    def add(self, path: str, session_id: int | None, guid: str | None = None) -> None:
        """Remember a node to delete: a path, or a sequential node's prefix (ending in _SEP)."""
        with self.session.mutex:
            self.nodes[path, guid] = session_id
            start, self.reaping = not self.reaping, True
        if start:
            self.session.handler.spawn(self._reap_while_connected)

    def late(self, path: str, session_id: int | None, result: Any) -> None:
        """On kazoo's thread, the answer to a create (of a node at ``path``, or of prefix
        ``path``) we stopped waiting for: a create2's (path, stat), a multi-operation's
        list (the path first), or an error.  If it applied, delete the node now; if its
        answer is lost, on reconnect."""
        if not result.successful():
            self.add(path, session_id)
        elif isinstance(result.value[0], str):
            self.session.client.delete_async(result.value[0])

    def _reap_while_connected(self) -> None:
        delay = 0.2
        while True:
            self.session.handler.sleep_func(delay)
            if self.session.live.is_set():
                self.reap()
            with self.session.mutex:
                if not self.nodes:
                    self.reaping = False
                    return
            delay = min(delay * 2, 30.0)

    def reap(self) -> None:
        with self.session.mutex:
            orphans, self.nodes = self.nodes, {}
        session_id = self.session.session_id
        for (path, guid), owner in orphans.items():
            if owner != session_id:
                continue  # that session ended: its nodes went with it
            try:
                self._delete(path, owner, guid)
            except NoNodeError:
                pass  # gone already: nothing to do, ever
            except (ZKCeleryError, KazooException, self.session.handler.timeout_exception) as exc:
                _log(logging.WARNING, "could not delete orphan znode %s: %s", path, exc,
                     outcome="orphan_kept", error=str(exc))  # fmt: skip
                self.add(path, owner, guid)

    def _delete(self, path: str, owner: int | None, guid: str | None) -> None:
        session, held = self.session, self.session.holdings.held
        parent, name = path.rsplit("/", 1)
        if name.endswith(_SEP):  # a sequential node known by its prefix
            with contextlib.suppress(NoNodeError):
                for child in session.call(session.client.get_children_async, parent):
                    if child.startswith(name) and not held(f"{parent}/{child}"):
                        session.deletes.delete_own(f"{parent}/{child}", owner)
        elif not held(path):
            version = session.deletes.version_if_ours(path, owner, guid)
            if version is not None:
                session.call(session.client.delete_async, path, version)


class _Tree:
    """The persistent nodes zkcelery relies on: the root and a node per namespace, whose
    data version is its epoch, which ``rm`` bumps (see _Deletes)."""

    def __init__(self, session: _Session) -> None:
        self.session = session
        self.ready = False  # the nodes exist
        self.verified = False  # ...and, with ZOOKEEPER_AUTH, are ours alone
        self.epochs: dict[str, int] = {}  # namespace path -> its epoch, as last read

    def paths(self) -> list[str]:
        root = self.session.settings.root
        return [root, *(f"{root}/{namespace}" for namespace in _NAMESPACE_NAMES)]

    def make(self) -> None:
        for path in self.paths():
            with contextlib.suppress(NodeExistsError):
                self.session.call(self.session.client.create_async, path, makepath=True)

    def ensure(self, again: bool = False) -> None:
        """Make the nodes once (or ``again``); with ZOOKEEPER_AUTH, check they are ours."""
        if self.ready and not again:
            return
        self.make()
        if self.session.settings.auth is not None and not self.verified:
            # Once per process: one getACL per node of the tree.
            problems = _unprotected(self.session)
            if problems:
                raise problems[0]
            self.verified = True
        self.ready = True

    def epoch(self, namespace: str, again: bool = False) -> tuple[str, int]:
        """``namespace``'s node and its epoch (read once, or ``again``)."""
        version = None if again else self.epochs.get(namespace)
        while version is None:
            self.ensure()
            stat = self.session.read(self.session.client.exists_async, namespace)
            if stat is None:  # removed by hand: make it again
                self.ensure(again=True)
                continue
            version = self.epochs[namespace] = stat.version
        return namespace, version


class _Creates:
    """Creates under a container that may be reaped, and of nodes that outlive the session.

    A container's create may find it gone (reaped since, or never made): it is made,
    and may be reaped again before our create, when its last child just left: tried
    again, at most _CONTAINER_TRIES times.  ``then`` follows each create sent (see
    _Requests.call).
    """

    def __init__(self, session: _Session) -> None:
        self.session = session
        self.ttl_nodes = True  # until the servers say they have none

    def in_container(self, container: str, path: str, data: bytes, sequence: bool = False,
                     then: Callable[[], Any] | None = None) -> tuple[str, ZnodeStat]:  # fmt: skip
        """Create an ephemeral node under ``container``, making the container if it is gone."""
        session = self.session
        session.tree.ensure()
        for _ in range(_CONTAINER_TRIES):
            try:
                abandon = functools.partial(session.orphans.late, path, session.session_id)
                return session.call(  # type: ignore[no-any-return]
                    session.client.create_async, path, data, abandon=abandon, then=then,
                    ephemeral=True, sequence=sequence, include_data=True,
                )  # fmt: skip
            except NoNodeError:
                self._container(container)
        raise CoordinationError(f"the container {container} kept vanishing; gave up")

    def in_container_unless(self, container: str, path: str, data: bytes, absent: str,
                            then: Callable[[], Any] | None = None) -> str | None:  # fmt: skip
        """As in_container (sequential), only while ``absent`` does not exist: one
        multi-operation, the create, and a create and delete of ``absent`` (which fails if
        it exists).  The node's path (a multi answers no stat), or None if nothing made."""
        session = self.session
        session.tree.ensure()
        ops = [Create(path, data, session.acl, _EPHEMERAL_SEQUENTIAL),
               Create(absent, b"", session.acl, 1), Delete(absent, -1)]  # fmt: skip
        for _ in range(_CONTAINER_TRIES):
            abandon = functools.partial(session.orphans.late, path, session.session_id)
            results = session.call(session.multi_async, ops, abandon=abandon, then=then)
            if isinstance(results[0], str):
                return results[0]  # type: ignore[no-any-return]
            failed = next(r for r in results if not isinstance(r, RolledBackError))
            if failed is results[0] and isinstance(failed, NoNodeError):
                self._container(container)
            elif isinstance(failed, NodeExistsError):
                return None
            elif isinstance(failed, NoNodeError):  # the namespace node is gone
                session.tree.ensure(again=True)
            else:
                raise failed
        raise CoordinationError(f"the container {container} kept vanishing; gave up")

    def _container(self, path: str) -> None:
        try:
            self.session.call(
                self.session.send, _CreateContainer(path, b"", self.session.acl, _CONTAINER_FLAG)
            )
        except NodeExistsError:
            pass
        except NoNodeError:  # the namespace node is gone too
            self.session.tree.ensure(again=True)

    def expiring(self, path: str, data: bytes, seconds: float) -> None:
        """Create a node that outlives the session; a TTL node of ``seconds`` where allowed
        (``zookeeper.extendedTypesEnabled=true`` on the servers); elsewhere the node is
        persistent, and whoever reads it past the expiry in its data deletes it."""
        self.session.tree.ensure()
        if self.ttl_nodes:
            try:
                self.session.call(self.session.send, self.expiring_op(path, data, seconds))
                return
            except (UnimplementedError, BadArgumentsError):
                self.refused_ttl()
        self.session.call(self.session.client.create_async, path, data)

    def expiring_op(self, path: str, data: bytes, seconds: float | None) -> Any:
        """The create of a node that outlives the session (see expiring), to send: a TTL
        node's while the servers take them, else (or ``seconds`` None) a persistent one's."""
        if seconds is None or not self.ttl_nodes:
            return Create(path, data, self.session.acl, 0)
        return _CreateTTL(path, data, self.session.acl, _TTL_FLAG, int(seconds * 1000))

    def refused_ttl(self) -> None:
        """The servers refused a TTL node: make persistent ones from now on."""
        if self.ttl_nodes:
            self.ttl_nodes = False
            _log(logging.INFO, "ZooKeeper refuses TTL nodes: early mutexes use persistent nodes",
                 kind="early mutex", outcome="no_ttl")  # fmt: skip


class _Session(_Requests):
    """One ZooKeeper session: its client and states; its requests are its own (_Requests),
    each other job an object of its own (``session.orphans``, ``session.deletes``...)."""

    def __init__(self, settings: _Settings) -> None:
        super().__init__(settings)
        self.pid, self.hostname = os.getpid(), socket.gethostname()
        self.mutex = threading.Lock()
        self.last_used, self.in_use = time.monotonic(), 0  # for a session closed when idle
        self.suspended = False  # the connection is down (the session may live on)
        self.holdings, self.orphans = _Holdings(self), _Orphans(self)
        self.contended = _Contended(self.mutex)
        self.tree, self.creates, self.deletes = _Tree(self), _Creates(self), _Deletes(self)
        self.client.add_listener(self._on_state)
        self.client.start_async()

    def lost_since(self, session_id: int | None) -> bool:
        """Whether a lease taken in ``session_id`` may now be held by someone else.  No I/O.

        The leader expires a session the granted timeout after it last heard of it, never
        sooner.  A lease is called lost when the session is another one now, or once nothing
        sent in the last _LOST_AFTER_SILENCE of that timeout is known to have reached the
        leader (_Liveness: reported by a write or a sync, _CONFIRMED_BY_LEADER; the watchdog
        syncs while leases are held): before the leader can have expired it.  Judged from
        answers, not kazoo's states, which can lag past the expiry: kazoo pings only when it
        has sent nothing for a while, so while other threads send on a dead link it sees no
        disconnection; after a pause of the whole process (SIGSTOP, a paused VM, a suspended
        host) no state has changed yet when the body looks; and a follower cut off from the
        leader answers pings until it notices.
        """
        return self.session_id != session_id or self.liveness.silent(_LOST_AFTER_SILENCE)

    def _on_state(self, state: str) -> None:
        # Runs on kazoo's connection thread: never block here.
        self.suspended = state != KazooState.CONNECTED
        if state == KazooState.CONNECTED:
            self.live.set()
            if self.orphans.nodes:
                self.handler.spawn(self.orphans.reap)
            if self.holdings.grants:
                self.handler.spawn(self.holdings.report_lost)
            return
        self.live.clear()
        if state == KazooState.LOST:  # the session is gone, and so is every node it held
            with self.mutex:
                self.orphans.nodes.clear()
            self.handler.spawn(self.holdings.report_lost)

    def multi(self, build: Callable[[TransactionRequest], Any], **options: Any) -> list:
        """One multi-operation; its list of results holds an exception for a failed one."""
        self.tree.ensure()
        txn = self.client.transaction()
        build(txn)
        return self.call(txn.commit_async, **options)  # type: ignore[no-any-return]

    def owner_of(self, path: str, guid: str, before: int | None) -> int | None:
        """The session that made our node at ``path``, just created in ``before`` or later
        (None if the node is not ours).  A request is sent on whatever session is current
        then: if the id is the same after the answer, it is that one; else ask the server."""
        if self.session_id == before:
            return before
        after = self.session_id
        try:
            data, stat = self.read(self.client.get_async, path)
        except NoNodeError:
            return None
        except CoordinationError:
            self.orphans.add(path, after, guid)  # ours or none: deleted when it can be
            raise
        return stat.ephemeralOwner if _guid_of(data) == guid else None  # type: ignore[no-any-return]

    def close(self) -> None:
        """End the session (its ephemeral nodes go at once) without hanging.  Its leases end
        with it: released, not lost (a worker's shutdown, a script's end).  In a thread:
        celery beat closes from its SIGTERM handler, which may have interrupted the mutex's
        holder."""
        stopper = threading.Thread(target=self._end, daemon=True)
        stopper.start()
        stopper.join(self.settings.connect_timeout)

    def _end(self) -> None:
        for grant in self.holdings.grants_now():
            grant.end_with_session()
        with contextlib.suppress(Exception):
            self.client.stop()
            self.client.close()


class _Deletes:
    """Deletes of our own nodes, bounded in time (kazoo's retry never gives up: a release
    during a partition would hang until the network healed) and fenced against ``rm``.

    A node at a fixed path (a lock's ``<name>``, an early mutex's) may be another
    holder's by now: ``rm`` deleted ours and someone took the lock, while our holder ran
    on.  ``rm`` deletes in a multi-operation that bumps the namespace's epoch (_Tree,
    break_node); a delete that checks, in its multi-operation, the epoch read before our
    node was made deletes only a node no ``rm`` touched since, at the cost of a plain delete.
    """

    def __init__(self, session: _Session) -> None:
        self.session = session

    def delete_own(self, path: str, session_id: int | None, container: str | None = None,
                   guid: str | None = None, epoch: tuple[str, int] | None = None,
                   handoff: bytes | None = None) -> None:  # fmt: skip
        """Delete our node at ``path`` (and ``container``, if it is then empty).  With
        ``handoff``, the same multi-operation first sets the node's data to it: a watcher
        sees a change, not a deletion (a queue's hand-off; a mutex's release, see
        _marks_release).  With ``epoch`` (the namespace node, its version), the delete is
        fenced.  When the fence fails (some ``rm`` ran), or after a lost answer, the node
        is deleted only if it is still ours."""
        session, look = self.session, False  # look: read the node first, it may not be ours

        def attempt(deadline: float) -> None:
            nonlocal look, container, epoch
            while True:
                session.wait_connected(deadline)
                if session.session_id != session_id:
                    return  # the session ended: the node is gone with it
                version = -1
                if look:
                    if epoch is not None:  # the version now, read before we look
                        epoch = session.tree.epoch(epoch[0], again=True)
                    ours = self.version_if_ours(path, session_id, guid, deadline)
                    if ours is None:
                        return
                    version = ours
                look = True  # whatever comes next (a lost answer, an rm) means looking
                ops = _deletion(path, version, container, handoff, epoch)
                if len(ops) == 1:
                    session.call(session.send, ops[0], deadline=deadline)
                    return
                results = session.call(session.multi_async, ops, deadline=deadline)
                if epoch is not None and results[0] is not True:  # BadVersionError: rm ran
                    session.tree.epochs.pop(epoch[0], None)  # read again before the next take
                elif isinstance(results[-1], NotEmptyError):
                    container, look = None, False  # someone joined since: leave it to them
                else:
                    return  # deleted, or gone already

        try:
            session.retried(attempt)
        except NoNodeError:
            pass
        except CoordinationError:  # no connection in time: delete it on reconnect
            session.orphans.add(path, session_id, guid)
            raise

    def version_if_ours(self, path: str, session_id: int | None, guid: str | None,
                        deadline: float | None = None) -> int | None:  # fmt: skip
        """The version of the node at ``path`` if it is still ours (made in ``session_id``,
        with ``guid``), else None: the lock may have been released and taken by another
        since (the answer to our delete was lost, an ``rm``)."""
        data, stat = self.session.call(self.session.client.get_async, path, deadline=deadline)
        if stat.ephemeralOwner != session_id or (guid and _guid_of(data) != guid):
            return None
        return stat.version  # type: ignore[no-any-return]

    def break_node(self, namespace: str, path: str, czxid: int) -> bool:
        """What ``rm`` does (see the class): delete a holder's node and bump ``namespace``'s
        epoch, in one multi-operation.  Only the node created at ``czxid``, not one its
        holder made since: False if gone."""
        session = self.session
        try:
            _, stat = session.read(session.client.get_async, path)
        except NoNodeError:
            return False
        if stat.czxid != czxid:
            return False
        session.tree.ensure()
        ops = [SetData(namespace, b"", -1), Delete(path, stat.version)]
        results = session.call(session.multi_async, ops)  # a node changed meanwhile fails it
        return results[-1] is True


# One connection per process and app.  A child inherits the dict on fork but
# must never use what is in it: an inherited kazoo client has no threads, so
# its calls hang and its stop() blocks.  The at-fork hook and the pid check
# both drop it unused.
_connections: weakref.WeakKeyDictionary[celery.Celery, _Session] = weakref.WeakKeyDictionary()
_connections_lock = threading.Lock()


def _connection(app: celery.Celery) -> _Session:
    conn = _connections.get(app)
    if conn is None or conn.pid != os.getpid():
        with _connections_lock:  # checked again, under the lock
            conn = _connections.get(app)
            if conn is None or conn.pid != os.getpid():
                conn = _connections[app] = _Session(_read_settings(app))
    return conn


def _close_connection(app: celery.Celery, session: _Session) -> None:
    if _connections.get(app) is session:
        _connections.pop(app, None)
    session.close()


def _forget_inherited() -> None:
    global _connections_lock
    _connections_lock = threading.Lock()
    _connections.clear()


def _close_all(**_: Any) -> None:
    """Close this process's sessions, so that the locks they hold are freed at once."""
    with _connections_lock:
        conns = [c for c in _connections.values() if c.pid == os.getpid()]
        _connections.clear()
    for conn in conns:
        conn.close()


#: The main process's session for revocations, per app, until it has been idle this long.
_REVOCATIONS_IDLE = 5.0
_revocations: dict[celery.Celery, _Session] = {}


def _close_when_idle(app: celery.Celery, session: _Session) -> None:
    while True:
        time.sleep(_REVOCATIONS_IDLE)
        with _connections_lock:
            if not session.in_use and time.monotonic() - session.last_used >= _REVOCATIONS_IDLE:
                if _revocations.get(app) is session:
                    del _revocations[app]
                break
    session.close()


@contextlib.contextmanager
def _revocation_session(app: celery.Celery) -> Iterator[_Session]:
    """One session for a burst of revocations (revoking a thousand tasks opens one)."""
    with _connections_lock:
        session = _revocations.get(app)
        if session is None or session.pid != os.getpid():
            session = _revocations[app] = _Session(_read_settings(app))
            threading.Thread(target=_close_when_idle, args=(app, session), daemon=True).start()
        session.in_use += 1
    try:
        yield session
    finally:
        with _connections_lock:
            session.in_use -= 1
            session.last_used = time.monotonic()


# ---------------------------------------------------------------------------
# Protocols: how contenders for one key use their znodes
# ---------------------------------------------------------------------------
#
# The protocol map: every znode zkcelery makes, under ZOOKEEPER_ROOT
# (/zkcelery by default), and the class that owns it.  Each protocol is
# explained in its class.
#
#   node                                  kind                  owner: what
#   /zkcelery                             persistent            _Session: the root, made once
#   /zkcelery/<namespace>                 persistent            _Session: one per entry of
#                                                               _NAMESPACES, made once; its data
#                                                               version counts rm's breaks in it
#                                                               (see _ExclusiveLock)
#   locks/<name>                          ephemeral             _ExclusiveLock: the holder that
#                                                               found the lock free
#   locks/<name>@queue/                   container             _Queue (of _ExclusiveLock):
#                                                               the waiters, in arrival order
#   locks/<name>@queue/1@<guid>@<seq>     ephemeral sequential  _Queue: a waiter (the first in
#                                                               line holds once <name> is gone)
#   mutexes/<name>, <name>@queue/...      as locks/             MutexTask's mutexes
#   mutexes/<name>/<max>@<guid>@<seq>     as semaphores/        a MutexTask with mutex_max_leases
#                                                               (its guid starts with a mark of
#                                                               its task id: _MutexLease)
#   semaphores/<name>/                    container             _Queue (of _Semaphore): the
#                                                               holders and waiters, in order
#   semaphores/<name>/<max>@<guid>@<seq>  ephemeral sequential  _Queue: a holder or a waiter
#   rwlocks/<name>/                       container             _Queue (of _ReadWriteLock):
#                                                               readers and writers, in order
#   rwlocks/<name>/<mode>@<guid>@<seq>    ephemeral sequential  _Queue: a reader (read) or a
#                                                               writer (write), held or waiting
#   early/<name>                          TTL, else persistent  _EarlyMutex: queued, from the
#                                                               send to the run's start
#                                         ephemeral             _EarlyMutex: running
#   beat/<app>, <app>@queue/...           as locks/             the beat's election: its leader
#                                                               and standbys (ElectedScheduler)
#   beat/<app>@schedule                   persistent            Election: the schedule's
#                                                               state, the fence of every send
#
# <name> is a key's lock name (_lock_name: the task's name, or the name given,
# with the refining values), which never holds "@"; <app> is the beat app's
# main name, as a lock name (``proj()``).  <guid> is one lease's random id, by
# which a contender finds its own node again after a lost answer; <max> is a
# semaphore's max_leases, so that holders that disagree see it in one listing;
# <mode> is read or write, so that one listing tells who holds a read/write
# lock; <seq> is the 10-digit counter ZooKeeper appends, which orders the line.
# Every contender's node holds its metadata as JSON (task id, host, pid,
# identifier, key, guid...), so "who holds it" costs no extra node.
#
# No key leaves anything behind: ephemeral nodes go with their session, and the
# server removes a container once its last child is gone.  Only a queued early
# mutex outlives its sender, until its expiry (a TTL node expires by itself; a
# persistent one is deleted by whoever finds it expired), and the beat's state
# is one node per app.


#: What a protocol's acquire returns: the node, its fencing token if known,
#: and the session that made the node.
_Granted = tuple[str, Optional[int], Optional[int]]

#: The protocols a lease is a front door to (each explained in its class).
_Protocol = Union["_ExclusiveLock", "_Semaphore", "_ReadWriteLock", "_EarlyMutex"]

#: How a protocol's ``listed`` walk sees the tree: the names of a node's
#: children, none if it is gone.  ``ls`` reads them through the session (one
#: request each); the exporter and ``ls --watch`` from a cache (none).
_Children = Callable[[str], Collection[str]]


class _QueuePolicy:
    """A kind of queue (_Queue): which nodes in line hold, and which one a waiter watches.

    Data and pure functions of the sorted listing and our place in it; the rules
    every waiter obeys are the engine's.  This base is the exclusive line: the
    first node holds, every other waiter watches the one before it.
    """

    #: What each node's name starts with (see the protocol map).
    tag: object = 1
    #: The listing sets a children watch: it wakes a waiter with no node to watch.
    watch_listing = False
    #: A hand-off mark (a change, then gone) on the node watched grants ours.
    handoff = False
    #: The deletion of the one node keeping ours waiting, made in another session,
    #: grants ours (nodes join only at the back: nothing else can be ahead of us).
    sole = False
    #: The last waiter to leave deletes the container (else the server reaps it):
    #: the exclusive lock's fast path is open only once it is gone.
    leaves_container = False

    def front(self, children: list[str]) -> int:
        """How many nodes at the front of ``children`` hold."""
        return 1

    def blocker(self, children: list[str], index: int) -> int | None:
        """The index of the node that ours (at ``index``, waiting) watches; None: none."""
        return index - 1 if index else None


class _ExclusivePolicy(_QueuePolicy):
    """_ExclusiveLock's line: the first node holds once ``<name>`` (the queue's ``absent``) is gone.

    A holder's queue node is released by a multi-operation that rewrites its
    data and deletes it (a hand-off), and nothing else changes a queue node's
    data: the waiter behind, told "changed", knows that node was first and
    held, so it holds without listing again.  A node deleted plainly (its
    waiter gave up, its session ended, ``rm``) says nothing of those before
    it: the waiter lists again.
    """

    handoff = True
    leaves_container = True


_EXCLUSIVE = _ExclusivePolicy()


class _SemaphorePolicy(_QueuePolicy):
    """_Semaphore's line: the first ``max_leases`` hold; the first waiter watches the listing.

    No wake grants without a listing: the change that woke us may have
    granted another.
    """

    watch_listing = True

    def __init__(self, max_leases: int, label: str, option: str) -> None:
        self.max_leases = self.tag = max_leases
        self.label = label  # "semaphore <key>", "mutex <key>"
        self.option = option

    def front(self, children: list[str]) -> int:
        others = {int(c.split(_SEP, 1)[0]) for c in children} - {self.max_leases}
        if others:
            raise self.mismatch(sorted(others))
        return self.max_leases

    def blocker(self, children: list[str], index: int) -> int | None:
        return None if index == self.max_leases else index - 1

    def mismatch(self, others: list[int]) -> MaxLeasesMismatch:
        """The error for holders of one key that disagree on how many it admits."""
        return MaxLeasesMismatch(
            f"{self.label}: {self.option}={self.max_leases} here, but other holders use "
            f"{self.option}={others}; all holders of one key must agree"
        )


#: The modes of a read/write lock: the tag of its nodes (see _ReadWriteLock).
_READ, _WRITE = "read", "write"


class _ReadWritePolicy(_QueuePolicy):
    """_ReadWriteLock's line: the front holds; a waiter watches what blocks it."""

    sole = True

    def __init__(self, mode: str) -> None:
        self.mode = self.tag = mode

    @staticmethod
    def front(nodes: list[str]) -> int:
        """A writer alone, or the readers ahead of the first writer."""
        for i, node in enumerate(nodes):
            if node.startswith(_WRITE + _SEP):
                return i or 1
        return len(nodes)

    def blocker(self, children: list[str], index: int) -> int | None:
        """The last writer ahead of a reader; the node ahead of a writer."""
        if self.mode == _READ:
            return max(i for i in range(index) if children[i].startswith(_WRITE + _SEP))
        return index - 1


def _wait_gone(
    session: _Session, path: str, deadline: float | None, guid: str | None = None
) -> str:
    """Wait until the node at ``path`` is gone, or the deadline: say how it went.

    ``"released"``: marked by its holder's release, then gone (_marks_release).
    ``"gone"``: deleted otherwise (session ended, ``rm``), or before the first
    look.  ``"held"``: there at the deadline.  With ``guid``, only that
    holder's node counts: the next holder of a fixed path is not it.
    """
    changed = False
    while True:
        woken = session.handler.event_object()
        seen: list[Any] = []

        @_at_once
        def on_event(event: WatchedEvent, seen: list[Any] = seen, woken: Any = woken) -> None:
            seen.append(event.type)
            woken.set()

        try:
            data, _ = session.read(session.get_async, path, on_event)
        except NoNodeError:
            data = None
        if data is None or (guid is not None and _guid_of(data) != guid):
            return "released" if changed else "gone"
        if not session.wait(woken, deadline):
            return "held"
        # Changed (a hand-over note, or the release's mark: then it is gone
        # now), deleted, or the session moved: look again.
        changed = seen[:1] == [EventType.CHANGED]


def _by_arrival(children: Iterable[str]) -> list[str]:
    """Sequential nodes in line: by the counter ZooKeeper appended, whatever their prefix."""
    return sorted(children, key=lambda child: child[-_SEQ_DIGITS:])


#: Turns of a waiting loop that may pass without an event before it pauses:
#: each turn follows a change it saw, so this is a guard, not a rhythm.
_FREE_TURNS = 20


def _expired(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline


def _caught_up(session: _Session, session_id: int | None, path: str) -> bool:
    """After a lost answer: False if the session that sent the request ended; else sync
    with the leader, since the server we reconnected to may not have applied it yet."""
    session.wait_connected()
    if session.session_id != session_id:
        return False
    session.read(session.client.sync_async, path)
    return True


def _read_node(session: _Session, path: str) -> tuple[dict | None, Any]:
    """A contender's node: its metadata and stat; (None, None) if it is gone."""
    try:
        data, stat = session.read(session.get_async, path)
    except NoNodeError:
        return None, None
    return json.loads(data or b"{}"), stat


def _undo_late(
    session: _Session, nodes: list[tuple[str, str]], session_id: int | None, result: Any
) -> None:
    """On kazoo's thread, the answer to a multi-operation we stopped waiting for, which made
    every node of ``nodes`` ((path, guid) each) or none: if it applied, delete them now; if
    its answer is lost, on reconnect (the session's reaper)."""
    if not result.successful():
        for path, guid in nodes:
            session.orphans.add(path, session_id, guid)
    elif any(isinstance(value, str) for value in result.value):  # a create's path
        for path, _ in nodes:
            session.client.delete_async(path)


def _read_children(session: _Session) -> _Children:
    """The walk's view of the tree through ``session``: one getChildren per node asked."""

    def children(path: str) -> Collection[str]:
        try:
            return session.read(session.client.get_children_async, path)  # type: ignore[no-any-return]
        except NoNodeError:
            return ()

    return children


#: The data version of an early mutex's running form (created, then set once).  A node
#: made anew starts at 0 again: at 0, a run that read the queued form and came second
#: would delete the first run's running form at "its" version and run beside it (two
#: deliveries of one message at once).  At 1, it never matches a read of a queued form.
_RUNNING_VERSION = 1


def _to_running(path: str, version: int | None, data: bytes, txn: TransactionRequest) -> None:
    """The running form, an ephemeral node at _RUNNING_VERSION, made where there was none,
    or in place of the queued form read at ``version``, atomically."""
    if version is not None:
        txn.delete(path, version)
    txn.create(path, data, ephemeral=True)
    txn.set_data(path, data)


def _states(found: list[tuple[str, dict]], state: str) -> list[dict]:
    return [{**meta, "state": state} for _, meta in found]


class _EarlyMutex:
    """A mutex taken when a task is sent and held until its run ends (EarlyMutexTask).

    The key is one node, ``early/<name>``, in one of two forms:

    queued   made by the sender: a node that outlives the sender's session (a
             TTL node where the server allows them, else a persistent one),
             with the task id and an expiry ``mutex_timeout`` after the send
             in its data.  A message that is never delivered blocks the key
             only until then: whoever finds it expired deletes it (and the
             server reaps a TTL node by itself).
    running  an ephemeral node of the worker's session, so the key is free
             once ZooKeeper expires a dead worker's session; made at data
             version 1, the queued form at 0 (see _RUNNING_VERSION).  Two
             queued forms a version cannot tell apart: a sweep or a take of an
             *expired* one deletes at version 0, and a new send's queued form
             made in the round trip between its read and its delete would go
             instead (only past ``mutex_timeout``, and only in that window).

    A send creates the queued form, one request, or is refused if the node
    exists and has not expired.  A run turns its own queued form into the
    running form in one multi-operation (delete at the version it read,
    create ephemeral), so the key is never free in between; a retry turns it
    back before the retried copy is sent; the run's end deletes it.  A run
    that finds no node (its worker died and the message came back, or the
    task was called directly) simply creates the running form.
    """

    def __init__(
        self, session: _Session, path: str, guid: str, data: bytes, key: str, timeout: float
    ) -> None:
        self.session = session
        self.key_path = self.holder = path
        self.guid = guid
        self.key = key
        self.epoch: tuple[str, int] | None = None  # as for _ExclusiveLock
        self.meta = json.loads(data)
        self.task_id = self.meta["task_id"]
        self.timeout = timeout

    def reserve(self) -> None:  # see _EarlyLease.reserve
        queued = self._data("queued")
        for _ in range(_CONTAINER_TRIES):
            try:
                self.session.creates.expiring(self.holder, queued, self.timeout)
                return
            except (NodeExistsError, _ConnectionLost):
                pass
            holder, stat = _read_node(self.session, self.holder)
            if holder is None:
                continue
            if holder.get("guid") == self.guid or self._queued_here(holder):
                return  # ours: made before a lost answer, or kept by a retry
            if not self._expired(holder):
                raise AlreadyQueued(self.key, holder.get("task_id"), holder.get("state", "queued"))
            self._delete(stat)
        raise CoordinationError(f"early mutex {self.key} kept changing; gave up")

    def unreserve(self) -> None:
        """Delete the queued form if this task id made it (a failed send, a revoke)."""
        holder, stat = _read_node(self.session, self.holder)
        if holder and self._queued_here(holder):
            self._delete(stat)

    def acquire(self, blocking: bool, deadline: float | None) -> _Granted:
        """At the run's start: take the key in this session, or raise AlreadyQueued."""
        self.epoch = self.session.tree.epoch(self.holder.rsplit("/", 1)[0])
        running = self._data("running")
        for _ in range(_CONTAINER_TRIES):
            holder, stat = _read_node(self.session, self.holder)
            session_id = self.session.session_id
            if holder is not None and holder.get("guid") == self.guid:  # before a lost answer
                return self.holder, stat.czxid, stat.ephemeralOwner or None
            if holder is not None and not (self._expired(holder) or self._queued_here(holder)):
                state = holder.get("state", "queued")
                error = AlreadyQueued(self.key, holder.get("task_id"), state)
                error.holder = holder
                raise error
            version = None if holder is None else stat.version  # the queued form's, to delete
            ops = functools.partial(_to_running, self.holder, version, running)
            # A take we stop waiting for (the task retries) frees the key once it applies.
            ours = [(self.holder, self.guid)]
            abandon = functools.partial(_undo_late, self.session, ours, session_id)
            try:
                if isinstance(self.session.multi(ops, abandon=abandon)[-2], str):  # the create
                    return self._taken(session_id)
            except (NodeExistsError, _ConnectionLost):
                pass  # made, or changed, since we read it: again
        raise CoordinationError(f"early mutex {self.key} kept changing; gave up")

    def _taken(self, before: int | None) -> _Granted:
        owner = self.session.owner_of(self.holder, self.guid, before)
        if owner is None:
            raise CoordinationError(f"early mutex {self.key}: taken, then lost at once")
        return self.holder, None, owner

    def requeue(self, session_id: int | None) -> bool:
        """As _EarlyLease.requeue, in one multi-operation: no ``rm`` since we took it (the
        epoch), our running form deleted, the queued form made.  False: not ours (broken)."""
        if self.session.session_id != session_id:
            return True  # the session ended: the key went with it, the retried copy takes it
        for _ in range(_CONTAINER_TRIES):
            results = self._turn_queued()
            if isinstance(results[-1], str):
                return True
            if self.epoch is None or results[0] is True:
                break  # not the fence: the node is not ours any more
            # Some rm ran in the namespace since: is our node still ours?
            self.epoch = self.session.tree.epoch(self.epoch[0], again=True)
            holder, stat = _read_node(self.session, self.holder)
            if (holder or {}).get("guid") != self.guid or stat.ephemeralOwner != session_id:
                break
        _log(logging.WARNING, "early mutex %s: could not keep it for the retry", self.key,
             kind="early mutex", key=self.key, outcome="not_kept")  # fmt: skip
        return False

    def _turn_queued(self) -> list:
        fence = [CheckVersion(*self.epoch)] if self.epoch is not None else []
        ops = [*fence, Delete(self.holder, _RUNNING_VERSION)]
        create = self.session.creates.expiring_op(self.holder, self._data("queued"), self.timeout)
        try:
            results = self.session.call(self.session.multi_async, [*ops, create])
        except (UnimplementedError, BadArgumentsError):
            results = [UnimplementedError()]
        if isinstance(results[-1], (UnimplementedError, BadArgumentsError)):  # no TTL nodes
            self.session.creates.refused_ttl()
            create = self.session.creates.expiring_op(self.holder, self._data("queued"), None)
            results = self.session.call(self.session.multi_async, [*ops, create])
        return results  # type: ignore[no-any-return]

    def abandon(self, session_id: int | None) -> None:
        """Leave the running form this try may have made to the reaper (no I/O)."""
        self.session.orphans.add(self.holder, session_id, self.guid)

    def release(self, grant: _Grant) -> None:
        mark = self._data("ended")  # a second delivery waiting for it sees the run ended
        self.session.deletes.delete_own(
            grant.path, grant.session_id, guid=self.guid, epoch=self.epoch, handoff=mark
        )

    def contenders(self) -> tuple[list[dict], list[dict]]:
        found = self.session.read_nodes([self.holder])
        return _states(found, "held"), []

    # -- the namespace of early mutexes, as ls and secure walk it ---------------

    @staticmethod
    def listed(parent: str, children: _Children) -> Iterator[tuple[str, str, str]]:
        """(key node, its path, held) of every key under ``parent``; its data says its state."""
        for name in sorted(children(parent)):
            yield name, f"{parent}/{name}", "held"

    @staticmethod
    def guarding(session: _Session, parent: str) -> Iterator[str]:
        """None: every key is one node right under ``parent``, whose ACL guards it (no request)."""
        return iter(())

    def _data(self, state: str) -> bytes:
        now = time.time()
        meta = {**self.meta, "state": state, "acquired": now}
        if state == "queued":
            meta["expires"] = now + self.timeout
        return json.dumps(meta).encode()

    def _queued_here(self, holder: dict) -> bool:
        """Whether ``holder`` is this task id's queued form (its send's, or kept by a retry)."""
        return holder.get("state") == "queued" and holder.get("task_id") == self.task_id

    def _expired(self, holder: dict) -> bool:
        return holder.get("state") == "queued" and time.time() > holder.get("expires", 0)

    def _delete(self, stat: Any) -> None:
        with contextlib.suppress(NoNodeError, BadVersionError):
            self.session.call(self.session.client.delete_async, self.holder, stat.version)


class _Join:
    """One join of a waiter (_Queue): the watches it sets, turn by turn, and what they saw.

    The watches of an earlier join may still fire: they set what nobody reads.
    ``absent`` seen absent at the join cannot come back while our node queues;
    until then a holder that got in before the queue existed may hold it.
    """

    def __init__(self, queue: _Queue, absent_seen: bool) -> None:
        self.queue = queue
        self.policy = queue.policy
        self.own_watched = False  # our own node's watch is set
        self.own_gone = False  # ...and our node has been deleted since
        self.absent_gone = queue.absent is None or absent_seen
        self.absent_elsewhere = False  # its holder's session is not ours
        self.head = False  # we were first in line when we watched it
        self.granted_now = False  # it was gone when we watched it, and we first
        self.woken: Any = None  # the event of the current turn
        self.ahead: Any = None  # what the node watched in the current turn did
        self.sole = False  # that node is the only one keeping ours waiting

    def watch(self, index: int, listed: Any) -> Any:
        """Set this turn's watches, in one batch: the event that wakes us.

        None when what we meant to watch changed already (look again at
        once).  ``listed`` is the event the listing's children watch sets.
        """
        queue, policy, children = self.queue, self.policy, self.queue.children
        ahead = policy.blocker(children, index)
        if ahead is None and policy.watch_listing:
            self.woken = listed  # the listing set a children watch already
            return listed
        woken = self.woken = queue.session.handler.event_object()
        self.ahead, self.sole = None, False
        own = not self.own_watched and (policy.handoff or policy.sole or not self.absent_gone)
        # Marked before it is sent: a drop of the connection meanwhile (its
        # callback unmarks it) has the next turn set it again.
        self.own_watched = self.own_watched or own
        watches = [(queue.own_path, self._own_watch())] if own else []
        absent = None if self.absent_gone else queue.absent
        if absent is not None:
            self.head = index == 0
            watches.append((absent, self._absent_watch(woken)))
        if ahead is not None:
            watches.append((f"{queue.path}/{children[ahead]}", self._ahead_watch(woken)))
        stats = queue.session.stats_watching(watches)
        if own and stats.pop(0) is None:
            self.own_gone = True
        if self.own_gone:
            return None  # the next listing shows it
        if absent is not None:
            stat = stats.pop(0)
            if stat is not None:
                self.absent_elsewhere = stat.ephemeralOwner != queue.session.session_id
            else:
                # Gone for good: the listing just read stands, and first in it we
                # hold (once wait_turn has seen our node and its session live).
                self.absent_gone = True
                if index < policy.front(children):
                    self.granted_now = True
                    woken.set()
        if ahead is None:
            return woken
        stat = stats[0]
        if stat is None:
            return None  # the node ahead went already: look again
        # Not a node of our own session: its deletion may be that session's
        # end, and ours gone with it.
        rest = children[:ahead] + children[ahead + 1 :]
        mine = stat.ephemeralOwner == queue.session.session_id
        self.sole = policy.sole and not mine and index - 1 < policy.front(rest)
        return woken

    def granted_on_wake(self) -> bool:
        """Whether what woke this turn granted our node, so that no other listing is needed."""
        if self.granted_now:
            self.granted_now = False
            return True
        if self.ahead == EventType.CHANGED and self.policy.handoff:
            return self.absent_gone  # handed over by the node ahead, in this turn
        if self.ahead == EventType.DELETED and self.sole:
            return True
        # First in line, woken by ``absent``'s deletion: later arrivals queue behind,
        # so it is ours without another listing.  Not if its holder was of our own
        # session: its node may have gone with that session, and ours with it.
        return self.head and self.absent_gone and self.absent_elsewhere

    def _ahead_watch(self, woken: Any) -> Callable[[WatchedEvent], None]:
        @_at_once
        def on_event(event: WatchedEvent) -> None:
            # A watch of an earlier turn on the same node says nothing of this one.
            if woken is self.woken:
                self.ahead = event.type
            woken.set()

        return on_event

    def _absent_watch(self, woken: Any) -> Callable[[WatchedEvent], None]:
        @_at_once
        def on_event(event: WatchedEvent) -> None:
            if event.type == EventType.DELETED:
                self.absent_gone = True
                if self.head:  # others wait for the waiter ahead of them
                    woken.set()
            else:  # the session changed: look again
                woken.set()

        return on_event

    def _own_watch(self) -> Callable[[WatchedEvent], None]:
        @_at_once
        def on_event(event: WatchedEvent) -> None:
            if event.type == EventType.CHANGED:  # only our own release, after a grant
                return
            if event.type == EventType.DELETED:
                # Deleted from outside (or with our session): nothing grants this
                # join any more, and the sooner we join again, the nearer the front.
                self.own_gone = True
            else:
                # The connection dropped: kazoo fired every watch and keeps none,
                # so set this one again (its get then shows a deletion meanwhile).
                self.own_watched = False
            if self.woken is not None:
                self.woken.set()

        return on_event


class _Queue:
    """Contenders for one key, in arrival order: one ephemeral sequential node each
    (``<tag>@<guid>@<seq>``, see the protocol map) under one container node.

    Its policy (_QueuePolicy) says, of the sorted contenders, whether ours is
    granted and which one node we watch until it may be: one node, not the
    container, so a change wakes the one waiter it concerns (no herd).  With
    ``absent`` (an exclusive lock's ``<name>``), nothing holds until that
    node is gone (see _ExclusiveLock).

    Recovery: the guid finds our node again, after a sync, when a create's
    answer was lost with the connection (kazoo issue #732), and tells a
    duplicate such a create left.  A contender whose node is gone (its
    session ended, an operator removed it) joins again at the back, the only
    place left; a container reaped before our create is made again.

    Cleanup: our node is deleted by its path, in the session the server says
    made it (never the one current at another moment), or, if an exception
    comes while the create's answer is on its way, by the session's reaper.

    The rules every waiter obeys, whatever its policy, are kept here:

    - it is granted only while its own node exists, whatever woke it: one
      whose node was deleted (by hand, ``rm``) is out of line, and the one
      behind may already watch the same holder.  For a policy that may grant
      on a wake, without a listing, the engine watches our own node, in the
      batch of the join's first watch: a session's events come in the order
      of the changes, so the deletion is known before the change that would
      grant us.
    - a hand-off mark grants only from the node watched in the current turn.
    - a wake from an earlier join says nothing of this one: a new join sets
      new watches (_Join), while the session that made our node is ours.
    """

    def __init__(
        self, session: _Session, path: str, policy: _QueuePolicy, guid: str, data: bytes
    ) -> None:
        self.session = session
        self.path = path
        self.policy = policy
        self.guid = guid
        self.prefix = f"{policy.tag}{_SEP}{guid}{_SEP}"
        self.data = data
        self.absent: str | None = None  # set by an exclusive lock: its <name>
        self.absent_held = False  # known held: the next join skips the check
        self.node: str | None = None  # our child's name while we are in the queue
        self.token: int | None = None
        self.owner: int | None = None  # the session our node was made in
        self.children: list[str] = []  # the last sorted listing
        self._listing: Any = None  # the answer to come of a listing sent with the join

    @property
    def own_path(self) -> str:
        return f"{self.path}/{self.node}"

    def join(self, absent: str | None = None, watch: Callable | None = None) -> bool:
        """Create our node (or find it again after a lost answer); True if ``absent`` was
        checked absent in the same request, False if it existed (our node made alone).

        The listing (with ``watch``) is sent right after the create, with no wait:
        the server answers a session's requests in order, so it lists our node.
        """
        session = self.session

        def list_next() -> None:
            self._listing = session.get_children_async(self.path, watch)

        while self.node is None:
            session_id = session.session_id
            prefix = f"{self.path}/{self.prefix}"
            stat: ZnodeStat | None = None
            try:
                made = None
                if absent is not None:
                    made = session.creates.in_container_unless(
                        self.path, prefix, self.data, absent, then=list_next
                    )
                    absent = absent if made is not None else None
                if made is None:
                    made, stat = session.creates.in_container(
                        self.path, prefix, self.data, sequence=True, then=list_next
                    )
            except _ConnectionLost as exc:
                self._listing = None  # it may not follow the create that made our node
                found = self._find_own(session_id, exc)
                if found is None:
                    continue  # never made, or made in a session now ended
                made, stat = found
                absent = None  # a late copy of a plain create proves nothing of it
            # Without a stat (a multi-operation's answer), the token is read when asked.
            if stat is not None:
                self.token, self.owner = stat.czxid, stat.ephemeralOwner
            else:
                self.token, self.owner = None, session.owner_of(made, self.guid, session_id)
                if self.owner is None:
                    continue  # gone with the session it was made in: join again
            self.node = made.rsplit("/", 1)[1]
        return absent is not None

    def _find_own(self, session_id: int | None, exc: Exception) -> tuple[str, ZnodeStat] | None:
        session = self.session
        try:
            if not _caught_up(session, session_id, self.path):
                return None
            for child in self.listing():
                if child.startswith(self.prefix):
                    path = f"{self.path}/{child}"
                    stat = session.read(session.client.exists_async, path)
                    return (path, stat) if stat is not None else None
        except CoordinationError as again:
            session.orphans.add(f"{self.path}/{self.prefix}", session_id)
            raise CoordinationError(f"connection lost while acquiring: {again}") from exc
        return None

    def listing(self, watch: Callable | None = None) -> list[str]:
        """The contenders, sorted by arrival (empty when the container is gone).

        The answer to the listing sent with the last join, if one is to come.
        """
        sent, self._listing = self._listing, None
        try:
            if sent is not None:
                with contextlib.suppress(_ConnectionLost):  # else list again, when connected
                    return _by_arrival(self.session.answer(sent, None))
            return _by_arrival(self.session.read(self.session.get_children_async, self.path, watch))
        except NoNodeError:
            return []

    def wait_turn(self, blocking: bool, deadline: float | None) -> bool:
        """Join, and wait until the policy grants our node; False if not blocking or too late.

        A wait that ends without a grant, however it ends, leaves no node behind:
        deleted now by its path, else (no answer, an exception) by the reaper.
        """
        granted, session_id = False, self.session.session_id
        try:
            granted = self._wait_turn(blocking, deadline)
        except BaseException:
            self.abandon(session_id)  # first, with no I/O: whatever comes next
            raise
        finally:
            if not granted:
                with contextlib.suppress(CoordinationError):
                    self.leave()
        return granted

    def _wait_turn(self, blocking: bool, deadline: float | None) -> bool:
        policy, free_turns, joined = self.policy, 0, _Join(self, False)
        while True:
            listed = self.session.handler.event_object()
            watch = _setter(listed) if policy.watch_listing else None
            if self.node is None:
                # The try that found ``absent`` held skips the check once.
                absent = None if self.absent_held else self.absent
                self.absent_held = False
                joined = _Join(self, self.join(absent, watch))
            self.children = self.listing(watch)
            if self.node not in self.children:  # our node is gone: join again
                self.node = None
                continue
            self._drop_ghosts()
            index = self.children.index(self.node)
            if joined.absent_gone and index < policy.front(self.children):
                return True
            if not blocking or _expired(deadline):
                return False
            woken = joined.watch(index, listed)
            if woken is None or joined.own_gone:  # changed already, or our node is gone: look
                free_turns += 1
                if free_turns > _FREE_TURNS:
                    self.session.handler.sleep_func(0.05)
                continue
            if self.session.session_id != self.owner:
                # Our node's session ended before the watch was set: kazoo fired its
                # watches then, not this new one, and our node went too: join again.
                continue
            free_turns = 0
            if not self.session.wait(woken, deadline):
                return False
            if joined.granted_on_wake() and not joined.own_gone:
                return True

    def abandon(self, session_id: int | None) -> None:
        """Leave our node, known or not, to the session's reaper (an exception came mid-wait).

        No I/O: it may run while an asynchronous exception unwinds.  A node a grant holds
        is never reaped; the prefix is left for the try's session and for our node's.
        """
        for session in {session_id, self.owner} - {None}:
            self.session.orphans.add(f"{self.path}/{self.prefix}", session)

    def _drop_ghosts(self) -> None:
        """Delete our nodes but the current one: creates whose answer was lost, applied late."""
        for ghost in [c for c in self.children if c.startswith(self.prefix) and c != self.node]:
            self.children.remove(ghost)
            with contextlib.suppress(CoordinationError):  # else deleted by the reaper
                self.session.deletes.delete_own(f"{self.path}/{ghost}", self.owner)

    def leave(self, handoff: bool = False) -> None:
        """Delete our node (the last also the container, if its policy says so); with
        ``handoff``, mark it in the same request: its watcher is told it held (_ExclusivePolicy)."""
        if self.node is not None:
            path, self.node = self.own_path, None
            last = self.policy.leaves_container and len(self.children) <= 1
            container = self.path if last else None
            mark = self.data if handoff else None
            self.session.deletes.delete_own(path, self.owner, container, handoff=mark)

    def contenders(self) -> list[tuple[str, dict]]:
        """(path, metadata) of every contender, first in line first."""
        return self.session.read_nodes(f"{self.path}/{child}" for child in self.listing())


class _Line:
    """A protocol whose holders and waiters are one line in the key's container (_Queue).

    Its front holds (the policy's ``front``), as ``ls`` tells from one listing
    (``front_of``).
    """

    def __init__(self, queue: _Queue) -> None:
        self.session = queue.session
        self.key_path = queue.path
        self.guid = queue.guid
        self.queue = queue

    def acquire(self, blocking: bool, deadline: float | None) -> _Granted | None:
        if not self.queue.wait_turn(blocking, deadline):
            return None
        return self.queue.own_path, self.queue.token, self.queue.owner

    def abandon(self, session_id: int | None) -> None:
        self.queue.abandon(session_id)  # waiting or granted, to the reaper (no I/O)

    def release(self, grant: _Grant) -> None:
        # A waiter behind lists again whether the node changed or went: the
        # mark costs it nothing, and a limited mutex's copy sees the run ended.
        self.queue.leave(handoff=_marks_release(self.key_path))

    def contenders(self) -> tuple[list[dict], list[dict]]:
        queued = self.queue.contenders()
        front = self.front_of([path.rsplit("/", 1)[1] for path, _ in queued])
        return _states(queued[:front], "held"), _states(queued[front:], "waiting")

    @staticmethod
    def front_of(nodes: list[str]) -> int:
        """How many of the contenders ``nodes`` hold, as one listing tells."""
        raise NotImplementedError

    # -- a namespace of such keys, as ls and secure walk it ---------------------

    @classmethod
    def listed(cls, parent: str, children: _Children) -> Iterator[tuple[str, str, str]]:
        """(key node, contender path, held or waiting) of every contender under ``parent``."""
        for name in sorted(children(parent)):
            yield from cls.listed_key(name, f"{parent}/{name}", children)

    @classmethod
    def listed_key(
        cls, name: str, path: str, children: _Children
    ) -> Iterator[tuple[str, str, str]]:
        """As ``listed``, for the one container at ``path``."""
        nodes = _by_arrival(children(path))
        front = cls.front_of(nodes)
        for i, node in enumerate(nodes):
            yield name, f"{path}/{node}", "held" if i < front else "waiting"

    @staticmethod
    def guarding(session: _Session, parent: str) -> Iterator[str]:
        """The per-key nodes under ``parent`` whose ACL guards contenders: every container."""
        for child in sorted(session.read(session.client.get_children_async, parent)):
            yield f"{parent}/{child}"


class _Semaphore(_Line):
    """Up to ``max_leases`` holders at a time.

    Holders and waiters alike make one node in the semaphore's container
    (_Queue); the first ``max_leases`` in arrival order hold.  Uncontended:
    create, list, delete.  The limit is in every node's name, so holders
    that disagree on it are found by the same listing and refused.

    The first waiter (position ``max_leases``) may be granted by any holder
    leaving, so it watches the container's children; every later waiter
    watches the node before it.  A node that is granted rewrites its data (a
    watched change), so the next waiter wakes and takes over the first
    waiter's watch.  A release thus wakes the first waiter, and a grant the
    next one: never all of them.

    A limited MutexTask (``mutex_max_leases``) is such a semaphore, its
    container at ``mutexes/<name>``, where a plain mutex's holder node would
    be: copies that disagree on the limit, one (a node that cannot have
    children) and more (a container), find each other's node in the way and
    are refused with MaxLeasesMismatch, never admitted together.
    """

    def __init__(
        self, session: _Session, path: str, guid: str, data: bytes, policy: _SemaphorePolicy
    ) -> None:
        super().__init__(_Queue(session, path, policy, guid, data))
        self.policy = policy

    def acquire(self, blocking: bool, deadline: float | None) -> _Granted | None:
        try:
            granted = super().acquire(blocking, deadline)
        except NoChildrenForEphemeralsError:  # a plain mutex's node: see the class
            raise self.policy.mismatch([1]) from None
        if granted is not None and self.queue.node != self.queue.children[-1]:
            # Best effort (the waiter behind us watches our node): if the
            # connection is away, the watch fires anyway.
            with contextlib.suppress(NoNodeError, CoordinationError):
                self.session.call(self.session.client.set_async, granted[0], self.queue.data)
        return granted

    @staticmethod
    def front_of(nodes: list[str]) -> int:
        return int(nodes[0].split(_SEP, 1)[0]) if nodes else 0  # the limit in their names

    def holds_marked(self, mark: str) -> bool:
        """Whether another holder in the listing that granted ours has a guid starting ``mark``."""
        holders = self.queue.children[: self.policy.max_leases]
        return any(
            child != self.queue.node and child.split(_SEP)[1].startswith(mark) for child in holders
        )

    def wait_released(self, guid: str, deadline: float | None) -> str:
        """Wait until the contender with ``guid`` has left, or the deadline (see _wait_gone)."""
        for child in self.queue.listing():
            if child.split(_SEP)[1] == guid:
                return _wait_gone(self.session, f"{self.key_path}/{child}", deadline, guid)
        return "gone"


class _ExclusiveSet:
    """Several exclusive locks held together: a multi-lock (_MultiLease).

    No nodes of its own: each key is an _ExclusiveLock with its usual nodes,
    so a key held through a multi-lock excludes ``lock()`` (or a MutexTask)
    of that key and the other way round, and ``ls``, ``rm`` and the exporter
    see each key as the lock it is.  All keys are in one namespace.

    Uncontended, one multi-operation makes every key's ``<name>`` with that
    key's queue check (_ops), all or nothing, and one deletes them, fenced by
    the namespace's epoch as a single release is: 2 requests a cycle for any
    number of keys k, and a try that fails costs that one request.

    Otherwise (a key is held and the try blocks, a key has waiters, or was
    found contended lately) the keys are taken one at a time, each through
    its own lock and queue, sorted by lock name: the one global order.  A
    waiter then holds only keys that sort before the one it waits for, so no
    set of multi-locks can wait for each other in a cycle, whatever order
    their keys were given in.  Each key costs its own cycle, 2k requests and
    the waits (plus the failed multi-operation, if tried first).  A try that
    fails, or raises, part-way releases the keys it took, the last first; a
    key taken early whose session ended while a later one waited is taken
    again.

    Recovery: a lost answer to the multi-operation is recovered by reading
    the first key (it made all or none); one we stopped waiting for deletes
    what it made, when it comes, or on reconnect.  A release whose answer is
    lost leaves each node to the reaper (_Orphans.add); one that finds
    the epoch moved (an ``rm`` ran) or a node gone releases each key alone.
    """

    def __init__(self, session: _Session, locks: list[_ExclusiveLock]) -> None:
        self.session = session
        self.locks = locks  # sorted by name, one per key, all in one namespace

    def take_free(self) -> tuple[str, int]:
        """Make every ``<name>`` if all are free: ("taken", 0), or ("held"/"queued", its index)."""
        session, first = self.session, self.locks[0]
        # Read before the nodes can be ours: a release checks that no rm ran since.
        epoch = session.tree.epoch(first.parent)
        for lock in self.locks:
            lock.epoch = epoch
        while True:
            session_id = session.session_id
            nodes = [(lock.holder, lock.guid) for lock in self.locks]
            try:
                abandon = functools.partial(_undo_late, session, nodes, session_id)
                results = session.multi(self._ops, abandon=abandon)
            except _ConnectionLost as exc:
                if self._recover(session_id, exc):
                    self._owned_by(session_id)
                    return "taken", 0
                continue  # not applied: try again on the new connection
            if isinstance(results[0], str):
                try:
                    owner = session.owner_of(first.holder, first.guid, session_id)
                except CoordinationError:
                    self.orphan(session.session_id)
                    raise
                if owner is None:
                    continue  # gone with the session they were made in: try again
                self._owned_by(owner)
                return "taken", 0
            # The first operation that failed; those before it say "rolled back".
            failed = next(i for i, r in enumerate(results) if not isinstance(r, RolledBackError))
            index, op = divmod(failed, len(results) // len(self.locks))  # _ops' per key
            if op == 0 and isinstance(results[failed], NoNodeError):  # the namespace is gone
                session.tree.ensure(again=True)
                continue
            held = op == 0 and isinstance(results[failed], NodeExistsError)
            return "held" if held else "queued", index

    def release(self, grants: list[_Grant]) -> bool:
        """Delete every ``<name>`` in one request; False: release each on its own instead.

        :raises CoordinationError: no answer in time; each node is deleted, if
            still ours, when ZooKeeper answers.
        """
        session, owner = self.session, grants[0].session_id
        namespace, version = self.locks[0].epoch  # type: ignore[misc]

        def build(txn: TransactionRequest) -> None:
            txn.check(namespace, version)
            for grant in grants:
                txn.delete(grant.path)

        try:
            session.wait_connected()
            if session.session_id != owner:
                return True  # the session ended: the nodes went with it
            results = session.multi(build)
        except BaseException:  # no answer in time, or an exception from outside
            self.orphan(owner)
            raise
        # Not all deleted: an rm ran since the epoch was read, or a node is gone.
        return all(result is True for result in results)

    def _ops(self, txn: TransactionRequest) -> None:
        for lock in self.locks:
            txn.create(lock.holder, lock.data, ephemeral=True)
            txn.create(lock.queue.path)  # ...fails if a queue exists: then it is not free
            txn.delete(lock.queue.path)

    def _recover(self, session_id: int | None, exc: Exception) -> bool:
        """After a lost answer: whether the multi-operation applied (it made all or none)."""
        session, first = self.session, self.locks[0]
        try:
            if not _caught_up(session, session_id, first.holder):
                return False
            holder, _ = _read_node(session, first.holder)
        except CoordinationError as again:
            self.orphan(session_id)
            raise CoordinationError(f"connection lost while acquiring: {again}") from exc
        return holder is not None and holder.get("guid") == first.guid

    def _owned_by(self, owner: int | None) -> None:
        for lock in self.locks:
            lock._owner = owner

    def orphan(self, session_id: int | None) -> None:
        """Leave each key's ``<name>``, if it is ours, to the session's reaper (no I/O)."""
        for lock in self.locks:
            self.session.orphans.add(lock.holder, session_id, lock.guid)


class _ExclusiveLock:
    """One holder at a time: a lock or a mutex.

    Uncontended, the holder creates the ephemeral node ``<name>`` and deletes
    it to release: two requests, the floor of a lock.  The create is a
    multi-operation that also creates and deletes ``<name>@queue``: it
    succeeds only when the lock is free *and* nobody queues, so once a queue
    exists newcomers join it rather than barge in, and waiters are served in
    arrival order.  A non-blocking try that fails costs that one request.

    A blocking contender that finds the lock taken joins the queue (_Queue)
    and holds when its node is first and ``<name>`` is gone.  ``<name>``
    cannot come back while the queue is not empty, so a waiter needs to see
    it gone once: the join's multi-operation also creates and deletes
    ``<name>`` (if it is held, the node is made alone and the waiter watches
    ``<name>``).  Every other waiter watches the one before it
    (_ExclusivePolicy): a release wakes exactly one.  The last waiter to
    leave deletes the queue, reopening the fast path (the server would reap
    it only after its check interval, a minute by default).

    What a contended acquisition costs, and why no less.  Behind others: the
    join (a FIFO needs a sequence number), a listing (sequence numbers have
    gaps and guids are random: only a listing tells the node before), a read
    watching that node, one watching its own (so that a hand-off can be
    believed: see _Queue), and the release: five, with two waits for answers
    (the join goes with the listing, the reads together: a session's
    requests are answered in order), none between a hand-off and holding.
    First in line at its join: three.  Behind a holder of ``<name>``: the
    failed try, the join, a listing, a read watching ``<name>``, the release:
    five, its deletion granting without a listing; a process that found the
    key contended lately skips the try.  kazoo's Lock pays six behind others:
    it lists again on every wake.

    The fencing token is read when asked: see Lease.token.

    Release deletes ``<name>`` fenced by the namespace's epoch, read before
    ``<name>`` was made (once per process), which ``rm`` bumps as it breaks a
    holder: a broken holder's late release cannot delete the next holder's
    (_Deletes).  A queue node's name is unique: deleting it by its path is
    always safe.
    """

    def __init__(self, session: _Session, parent: str, name: str, guid: str, data: bytes) -> None:
        self.session = session
        self.guid = guid
        self.data = data
        self.parent = parent
        self.key_path = self.holder = f"{parent}/{name}"
        self.queue = _Queue(session, f"{self.holder}{_QUEUE}", _EXCLUSIVE, guid, data)
        self.queue.absent = self.holder
        self.epoch: tuple[str, int] | None = None  # the namespace's, before <name> was ours
        self._owner: int | None = None  # the session that made <name>, when ours

    def acquire(self, blocking: bool, deadline: float | None) -> _Granted | None:
        # A key this process found contended a moment ago most likely still
        # is: a blocking contender then joins the queue at once, sparing the
        # fast path's failed write (every write costs the leader an fsync).
        outcome = "queued"
        session_id = self.session.session_id
        try:
            if not (blocking and self.session.contended(self.key_path)):
                outcome = _ExclusiveSet(self.session, [self]).take_free()[0]
            if outcome == "queued" and not blocking and self._queue_abandoned():
                outcome = _ExclusiveSet(self.session, [self]).take_free()[0]
        except BaseException:  # the fast path's node, if it was made, to the reaper
            self.session.orphans.add(self.holder, session_id, self.guid)
            raise
        if outcome == "taken":
            return self.holder, None, self._owner
        # The try says <name> is held: a join checking it absent would fail.
        self.queue.absent_held = outcome == "held"
        self.session.contended(self.key_path, seen=True)
        if not blocking or not self.queue.wait_turn(blocking, deadline):
            return None
        return self.queue.own_path, None, self.queue.owner

    def _queue_abandoned(self) -> bool:
        """Remove a queue that no one is in any more (its last waiter crashed): True if gone."""
        if self.queue.listing():
            return False
        with contextlib.suppress(NoNodeError, NotEmptyError):
            self.session.call(self.session.client.delete_async, self.queue.path)
        return True

    def _holder_node(self) -> list[tuple[str, dict]]:
        holder, stat = _read_node(self.session, self.holder)
        if holder is None:
            return []
        if stat.ephemeralOwner:
            return [(self.holder, holder)]
        if self._clear_limited():  # not a holder's: a limited mutex's container
            return []
        raise MaxLeasesMismatch(
            f"{self.holder} holds a limited mutex (mutex_max_leases above 1), but this copy "
            "has mutex_max_leases=1; all holders of one key must agree"
        )

    def _clear_limited(self) -> bool:
        """Delete ``<name>`` if it is a limited mutex's container that no holder is in.

        Left for the server to reap (within a minute), it would stand in a plain
        mutex's way till then.  The probe's create fails if ``<name>`` is now a
        holder's node (which cannot have children), the delete if it has holders.
        """
        probe = f"{self.holder}/{_SEP}probe"

        def ops(txn: TransactionRequest) -> None:
            txn.create(probe, ephemeral=True)
            txn.delete(probe)
            txn.delete(self.holder)

        return isinstance(self.session.multi(ops)[0], str)

    def abandon(self, session_id: int | None) -> None:
        """Leave whatever this try made, ``<name>`` or a queue node, to the reaper (no I/O)."""
        self.session.orphans.add(self.holder, session_id, self.guid)
        self.queue.abandon(session_id)

    def release(self, grant: _Grant) -> None:
        if grant.path == self.holder:
            mark = self.data if _marks_release(self.holder) else None
            self.session.deletes.delete_own(
                grant.path, grant.session_id, guid=self.guid, epoch=self.epoch, handoff=mark
            )
        else:  # a holder's queue node: the waiter behind is told it held
            self.queue.leave(handoff=True)

    def contenders(self) -> tuple[list[dict], list[dict]]:
        """(holders, waiters): the metadata of each."""
        holder = self._holder_node()
        queued = self.queue.contenders()
        if not holder and queued:
            holder, queued = queued[:1], queued[1:]
        return _states(holder, "held"), _states(queued, "waiting")

    # -- a namespace of exclusive locks, as ls and secure walk it ---------------

    @staticmethod
    def listed(parent: str, children: _Children) -> Iterator[tuple[str, str, str]]:
        """(key node, contender path, held or waiting) of every contender under ``parent``."""
        keys = set(children(parent))
        keys -= {c for c in keys if c.endswith(_SCHEDULE)}  # a beat's state, not a lock
        for name in sorted({c[: -len(_QUEUE)] if c.endswith(_QUEUE) else c for c in keys}):
            held = name in keys
            if held and children(f"{parent}/{name}"):  # a limited mutex's container
                yield from _Semaphore.listed_key(name, f"{parent}/{name}", children)
                continue
            if held:  # its node, or an empty container (ls skips: no ephemeral owner)
                yield name, f"{parent}/{name}", "held"
            queue = f"{parent}/{name}{_QUEUE}"
            for i, node in enumerate(_by_arrival(children(queue)) if name + _QUEUE in keys else []):
                yield name, f"{queue}/{node}", "waiting" if held or i else "held"

    @staticmethod
    def guarding(session: _Session, parent: str) -> Iterator[str]:
        """The per-key nodes under ``parent`` whose ACL guards contenders: queues, beat
        states, and limited mutexes' containers (a holder's node is ephemeral)."""
        for path in _Line.guarding(session, parent):
            if path.endswith((_QUEUE, _SCHEDULE)):
                yield path
                continue
            with contextlib.suppress(NoNodeError):
                if not session.read(session.client.get_async, path)[1].ephemeralOwner:
                    yield path


class _ReadWriteLock(_Line):
    """Readers share it, a writer holds it alone: ``read_lock()`` and ``write_lock()``.

    Readers and writers of one key make one node each in the key's container
    (_Queue), tagged ``read`` or ``write``: a single line, in arrival order.
    Its front holds: the first node if a writer's, else every reader ahead of
    the first writer (front_of).  Neither overtakes the other, so neither
    starves, and a contender looks only at the nodes ahead of it: a writer
    behind a reader never holds the reader up (the deadlock of kazoo issue
    #649, where a reader also waited for a later writer).

    Each waiter watches one node for its deletion: a reader the last writer
    ahead of it, a writer the node just ahead.  A writer's release thus
    wakes the readers it kept waiting, or the one writer behind it; a
    reader's at most the writer right behind.  Never a herd: a writer behind
    n readers wakes at most n times.

    Uncontended, either costs three requests (create, list, delete), and so
    does a failed try.  A waiter woken by the deletion of the only node that
    kept it waiting, made in another session, holds without listing again
    (_QueuePolicy.sole); any other wake costs a listing and the next watch.

    The fencing token is the node's creation zxid: conflicting grants follow
    the line, the order of creation, so a writer's token exceeds every token
    granted before it, and a reader's every earlier writer's.  Overlapping
    readers are in no order among themselves, as a semaphore's holders.
    """

    def __init__(self, session: _Session, path: str, mode: str, guid: str, data: bytes) -> None:
        super().__init__(_Queue(session, path, _ReadWritePolicy(mode), guid, data))

    front_of = staticmethod(_ReadWritePolicy.front)

    @staticmethod
    def kind_of(path: str) -> str:
        """``read lock`` or ``write lock``: what the contender at ``path`` takes."""
        return f"{path.rsplit('/', 1)[1].split(_SEP, 1)[0]} lock"


# ---------------------------------------------------------------------------
# The namespace table, and whether the tree is protected
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Namespace:
    """A namespace node: what ``ls`` and log lines call its keys, and whose nodes it holds."""

    name: str
    kind: str
    #: The protocol whose nodes it holds, which also tells ``ls`` and ``secure``
    #: how to walk them (see the protocol map).
    protocol: type[_ExclusiveLock] | type[_Semaphore] | type[_ReadWriteLock] | type[_EarlyMutex]


#: Every namespace, by name (in _NAMESPACE_NAMES' order).
_NAMESPACES: dict[str, _Namespace] = {namespace.name: namespace for namespace in (
    _Namespace(_LOCKS, "lock", _ExclusiveLock),
    _Namespace(_MUTEXES, "mutex", _ExclusiveLock),
    _Namespace(_SEMAPHORES, "semaphore", _Semaphore),
    _Namespace(_RWLOCKS, "rwlock", _ReadWriteLock),  # each row: read lock or write lock
    _Namespace(_EARLY, "early mutex", _EarlyMutex),
    _Namespace(_BEAT, "beat", _ExclusiveLock),
)}  # fmt: skip


def _unprotected(session: _Session) -> list[ZKCeleryError]:
    """What is wrong with the ACLs of the tree (the root and namespaces), for ZOOKEEPER_AUTH.
    In ZooKeeper the right to create or delete a node is its parent's: a holder node
    under a parent that anyone may change is not protected."""
    acl = _default_acl(session.settings)
    identity = acl[0].id if acl else None  # our digest identity
    problems = []
    for path in session.tree.paths():
        with contextlib.suppress(NoNodeError):
            acls, _ = session.read(session.client.get_acls_async, path)
            problems.append(_acl_problem(path, acls, identity))
    return [problem for problem in problems if problem is not None]


def _protecting_nodes(session: _Session) -> Iterator[str]:
    """The root, the namespace nodes, and every per-key parent: whose ACL guards the locks."""
    yield from session.tree.paths()
    root = session.settings.root
    for namespace in _NAMESPACES.values():
        yield from namespace.protocol.guarding(session, f"{root}/{namespace.name}")


# ---------------------------------------------------------------------------
# Leases: the one lock primitive behind lock(), semaphore() and the mutexes
# ---------------------------------------------------------------------------
#
# A Lease is a front door: what its kind varies in is data (_Kind), each try
# is one protocol object's (see Protocols), and what it holds is one _Grant,
# the held node's identity, which the lease, the session and the release
# share.  A multi-lock is made of single leases, one per key.


def _deadline(seconds: float | None) -> float | None:
    return None if seconds is None else time.monotonic() + seconds


def _task_mark(task_id: str | None) -> str | None:
    """A limited mutex node's guid starts with this, for the task id it runs (see _MutexLease)."""
    if task_id is None:
        return None
    return hashlib.blake2b(str(task_id).encode(), digest_size=4).hexdigest()


_BROKEN = "its znode was deleted from outside"


def _loss_reason(why: str) -> str:
    """A lost lease's ``reason`` in its signal and log line: "deleted" or "session"."""
    return "deleted" if why == _BROKEN else "session"


_SESSION_LOST = "the ZooKeeper session expired, or went unanswered for too long to be sure it lives"


def _metadata(lease: Lease, session: _Session, guid: str) -> bytes:
    """What the node of one try of ``lease`` holds (see the protocol map)."""
    task_id, request = lease._task_id(), lease._task.request
    meta = {
        "task_id": task_id,
        "task": lease._task.name,
        "host": session.hostname,
        "pid": os.getpid(),
        "identifier": lease.identifier or f"{task_id}->{session.hostname}",
        "acquired": time.time(),
        "key": lease.key,
        "guid": guid,
        # Which copy of the task this is: a retry or a replacement keeps
        # the task id and counts up (see MutexTask._contended).
        "retries": getattr(request, "retries", 0) or 0,
        "nesting": getattr(request, "replaced_task_nesting", 0) or 0,
        # How long this session outlives its process: what the server
        # granted, which a waiter for a dead holder's node needs to know.
        "session_timeout": session.liveness.session_timeout,
    }
    # What its kind adds: a semaphore's limit, a read/write lock's mode.
    facts = {"max_leases": lease._max_leases, "mode": lease._kind.mode}
    meta.update((fact, value) for fact, value in facts.items() if value is not None)
    return json.dumps(meta).encode()


class _Grant:
    """One granted node, the one record of it: identity, session, and whether it may be lost.

    The lease, the session's registry and the release share it.  ``session_id``
    is the session that made the node, as the server says.  Lost for good when
    its session may have ended (_Session.lost_since) or its node is deleted
    from outside, learnt from a watch set at the first look: looking never waits.
    """

    def __init__(self, session: _Session, protocol: _Protocol, granted: _Granted, lease: Lease):
        self.session = session
        self.protocol = protocol
        self.path, self.token, self.session_id = granted
        self.key_path = protocol.key_path
        self.guid = protocol.guid
        self.thread = threading.get_ident()
        self.released = False
        self.why_lost: str | None = None
        self.granted_at = time.monotonic()
        self._watching = False
        self._lease = lease

    @property
    def holding(self) -> bool:
        return not self.released

    def is_lost(self) -> bool:
        self.check_session()
        if self.why_lost is None and not self.released and not self._watching:
            self._watching = True
            self.session.client.get_async(self.path, watch=self._on_event).rawlink(self._on_answer)
        return self.why_lost is not None

    def check_session(self) -> None:
        """Mark the grant lost if its session may have ended (no I/O)."""
        if self.why_lost is None and not self.released and self.session.lost_since(self.session_id):
            self.mark_lost(_SESSION_LOST)

    def fencing_token(self) -> int | None:
        if self.token is None and not self.released and self.why_lost is None:
            self.token = self.session.zxid_holding([(self.path, self.guid, self.session_id)])
            if self.token is None:
                self.mark_lost(_BROKEN)
        return self.token

    def held(self) -> float:
        return time.monotonic() - self.granted_at

    def settle(self) -> None:
        """Mark it released, its node given back another way (an early mutex's retry turns it
        queued, a multi-lock deletes all at once, a session closed on purpose takes it)."""
        if self._mark_released():
            self._lease._signal(lease_released, held=self.held())

    end_with_session = settle

    def _mark_released(self) -> bool:
        """Mark it released; True if that ends it, not a loss before.  Under the session's
        mutex, as mark_lost: a loss and a release racing send one signal, never both."""
        with self.session.mutex:
            ended = not self.released and self.why_lost is None
            self.released = True
        self.session.holdings.forget(self)
        return ended

    def mark_lost(self, why: str) -> None:
        with self.session.mutex:
            if self.why_lost is not None or self.released:
                return
            self.why_lost = why
        self.session.holdings.forget(self)
        reason = _loss_reason(why)
        self._lease._log(logging.WARNING, "lost: %s; another task may hold it now", why,
                         outcome="lost", reason=reason)  # fmt: skip
        self._lease._signal(lease_lost, held=self.held(), reason=reason)

    def release(self) -> None:
        # The signal waits for the delete (a receiver's work is not the lock's),
        # the mark does not (a loss seen meanwhile is not this release's).
        ended, held = self._mark_released(), self.held()
        try:
            if self.why_lost != _BROKEN:  # else the node at our path may be another's now
                self.protocol.release(self)
        except CoordinationError as exc:
            self._lease._not_released(exc)
        except BaseException:  # from outside, mid-release: the node, if still ours, later
            if self.why_lost != _BROKEN:
                self.session.orphans.add(self.path, self.session_id, self.guid)
            raise
        finally:
            if ended:
                self._lease._signal(lease_released, held=held)

    # Both run on kazoo's threads: never block.
    def _on_event(self, event: WatchedEvent) -> None:
        if event.type == EventType.DELETED:
            self.mark_lost(_BROKEN)
        else:  # the connection dropped and kazoo fired its watches: set it again
            self._watching = False

    def _on_answer(self, result: Any) -> None:
        if not result.successful():
            if isinstance(result.exception, NoNodeError):
                self.mark_lost(_BROKEN)
            return  # no answer: the session's fate decides
        data, stat = result.value
        if stat.ephemeralOwner != self.session_id or _guid_of(data) != self.guid:
            self.mark_lost(_BROKEN)

    def fenced_write(self, path: str, data: bytes, version: int) -> int:
        """Lease.fenced_write's write, fenced by this grant's node."""

        def fenced(txn: TransactionRequest) -> None:
            txn.check(self.path, -1)  # the lease's node exists (-1: any version)
            txn.set_data(path, data, version)

        deadline = time.monotonic() + self.session.settings.connect_timeout
        while True:
            if self.is_lost():
                raise NotLeading("its ZooKeeper session was lost or is in doubt (lease.lost)")
            try:
                try:
                    results = self.session.multi(fenced)
                    if isinstance(results[0], NoNodeError):
                        raise NotLeading("its lease's node is gone")
                    moved = isinstance(results[1], (BadVersionError, NoNodeError))
                except _ConnectionLost as lost:  # the answer is lost: did the write apply?
                    if time.monotonic() >= deadline:
                        raise CoordinationError("no answer within the connect timeout") from lost
                    stored, stat = self.session.read(self.session.client.get_async, path)
                    if stat.version == version:
                        continue  # not applied: write again, on the new connection
                    moved = stat.version != version + 1 or stored != data
            except (CoordinationError, NoNodeError) as exc:
                raise NotLeading(f"ZooKeeper did not confirm the write: {exc}") from exc
            if moved:
                raise StaleVersion(f"{path} was written by another since version {version}")
            return version + 1


class Lease:
    """A claim on a lock, semaphore or mutex, yielded by ``lock()`` / ``semaphore()``.

    Truthy while it is held; ``token``, ``lost``, ``suspended``, ``holders()``
    and ``waiters()`` tell the rest.

    Leases are made by :meth:`LockTask.lock`, :meth:`LockTask.semaphore`,
    :meth:`LockTask.read_lock`, :meth:`LockTask.write_lock` and
    :class:`MutexTask`, whose parameters are these; besides, ``task`` gives
    the name and the app, ``namespace`` (``"locks"``, ``"mutexes"``...),
    ``max_leases`` and ``mode`` say what the lease is of (see _KINDS), and
    ``task_id`` is the one an early mutex is held for.
    """

    def __init__(
        self,
        task: celery.Task | types.SimpleNamespace,
        namespace: str,
        values: Sequence[Any] = (),
        *,
        max_leases: int | None = None,
        mode: str | None = None,
        blocking: bool = False,
        timeout: float | None = None,
        retry: bool = False,
        identifier: str | None = None,
        name: str | None = None,
        retry_options: dict | None = None,
        task_id: str | None = None,
    ) -> None:
        _check_wait(blocking, timeout)
        if max_leases is not None:
            _check_max_leases(max_leases)
        _check_retry_options(namespace, retry_options or {}, retry)
        if identifier is not None and (not isinstance(identifier, str) or not identifier):
            raise TypeError(f"identifier must be a non-empty str, not {identifier!r}")
        base = task.name if name is None else name
        if not isinstance(base, str) or not base:
            raise TypeError(f"name must be a non-empty str, not {base!r}")
        self.name = _lock_name(base, values)
        self.key = _readable_key(base, values)
        self.identifier = identifier
        #: The name of the task that takes it (for the beat's election, its owner's).
        self.task_name = str(task.name)
        self._task = task
        self._kind = _KINDS[namespace, mode, max_leases is not None]
        #: What it is a lease of, as ``ls`` says: lock, semaphore, read lock, write lock,
        #: mutex, early mutex or beat.
        self.kind = self._kind.name
        self._namespace = namespace
        self._max_leases = max_leases
        self._blocking = bool(blocking)
        self._timeout = timeout
        self._retry = bool(retry) and not blocking
        self._retry_options = retry_options or {}
        self._session: _Session | None = None
        self._grant: _Grant | _MultiGrant | None = None  # the latest grant, kept after release
        self._first_try: float | None = None  # since when it is wanted (for ``waited``)
        self._early_id = task_id  # an early mutex's task id (the request's, by default)

    @classmethod
    def for_app(
        cls, app: celery.Celery, namespace: str, name: str, owner: str, **options: Any
    ) -> Lease:
        """A lease that ``app`` holds itself, with no task: the beat's election.

        ``owner`` stands where a task's name would (metadata, ``ls``, log lines);
        with no task to retry, ``retry`` is refused.  The options are the constructor's.
        """
        if options.get("retry"):
            raise TypeError(f"{owner} is not a task: a lease it holds cannot retry it")
        # What a lease uses of its task: its name, its app, its request's id.
        task = types.SimpleNamespace(app=app, name=owner, request=types.SimpleNamespace(id=None))
        return cls(task, namespace, name=name, **options)

    # -- the public view ---------------------------------------------------

    def __bool__(self) -> bool:
        return self._grant is not None and self._grant.holding

    def __repr__(self) -> str:
        return f"<Lease {self._namespace} {self.key} {'held' if self else 'not held'}>"

    @property
    def token(self) -> int | None:
        """The fencing token of the latest grant: an integer that strictly increases with
        every grant of the lock.

        A semaphore's or a read/write lock's is its node's creation zxid, known
        at once: those nodes hold in the order they were made.  An exclusive
        lease's (lock, mutex, beat) is a zxid at which its node was its own,
        learnt with a sync and one read the first time it is asked while it is held
        (_Session.zxid_holding): a queue node is made when its waiter joins,
        not when it holds.
        """
        return None if self._grant is None else self._grant.fencing_token()

    @property
    def lost(self) -> bool:
        """True once the lease may be held by someone else (sticky until re-acquired).

        That is when the session is known to be lost, when the server has
        answered nothing sent in the last three quarters of the session timeout
        it granted (a dead link, even one that other threads keep busy, or a
        paused process), or when the lease's node was deleted from outside
        (``python -m zkcelery rm``).  Reading it never waits: the first look
        sends one request, in the background, that watches the node for
        deletion.  It cannot stop a body that is paused mid-write when the
        lease goes: hand ``token`` to the storage for that.
        """
        return self._grant is not None and self._grant.is_lost()

    @property
    def suspended(self) -> bool:
        """True while the lease is held and the connection to ZooKeeper is down."""
        return bool(self) and self._session is not None and self._session.suspended

    def holders(self) -> list[dict]:
        """The metadata of every current holder (task id, host, pid, identifier...)."""
        return self._contenders()[0]

    def waiters(self) -> list[dict]:
        """The metadata of every contender waiting for the lease, first in line first."""
        return self._contenders()[1]

    # -- context manager -----------------------------------------------------

    def __enter__(self) -> Lease:
        held = bool(self)
        try:
            self.acquire()
        except CoordinationError as exc:
            if not self._retry:
                self._log(logging.WARNING, "not acquired: %s", exc, outcome="not_acquired",
                          error=str(exc))  # fmt: skip
                raise
            self._log(logging.WARNING, "not acquired: %s; retrying the task", exc,
                      outcome="retrying", error=str(exc))  # fmt: skip
            raise self._task.retry(**{"exc": exc, **self._retry_options}) from exc
        except BaseException:
            if not held:  # granted, then an exception from outside: ``with`` will not release
                self.release()
            raise
        if not self and self._retry:
            self._log(logging.INFO, "is held; retrying the task", outcome="retrying")
            raise self._task.retry(**self._retry_options)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.release()

    # -- acquire and release -----------------------------------------------

    def acquire(self) -> bool:
        """Try to take the lease (waiting if blocking); return whether it is held.

        :raises AlreadyAcquired: this lease is held already.
        :raises NotReentrant: blocking without a timeout on a lock this thread holds.
        :raises CoordinationError: ZooKeeper did not answer in time.
        """
        if self:
            raise AlreadyAcquired(f"{self!r} is already held: release it first")
        if self._first_try is None:
            self._first_try = time.monotonic()
        session = self._connect()
        deadline = _deadline(self._timeout) if self._blocking else None
        try:
            session.wait_connected(deadline)  # the metadata holds the granted session timeout
            if self._blocking and deadline is None:  # refused before anything is taken
                self._refuse_reentry(session)
            with session.holdings.waiting() if self._blocking else contextlib.nullcontext():
                granted = self._take(session, deadline)
        except (CoordinationError, AlreadyQueued) as exc:  # or an early mutex's key is taken
            reason = "held" if isinstance(exc, AlreadyQueued) else "unavailable"
            self._signal(lease_not_acquired, waited=self._waited(), reason=reason)
            raise
        if not granted:
            self._log(logging.DEBUG, "is held elsewhere", outcome="not_acquired")
            reason = "timeout" if self._blocking else "held"
            self._signal(lease_not_acquired, waited=self._waited(), reason=reason)
            return False
        waited, self._first_try = self._waited(), None
        self._signal(lease_acquired, waited=waited)
        return True

    def _take(self, session: _Session, deadline: float | None) -> bool:
        """One try, through a new protocol object: True once granted (and the grant kept)."""
        session_id = session.session_id
        protocol = self._protocol(session)
        granted: _Granted | None = None
        grant: _Grant | None = None
        try:
            granted = protocol.acquire(self._blocking, deadline)
            if granted is not None:
                grant = self._grant = _Grant(session, protocol, granted, self)
                session.holdings.remember(grant)
        except (CoordinationError, AlreadyQueued):
            raise  # a try that failed, not one cut short from outside (below)
        except BaseException:
            # An exception from outside (a soft time limit, a signal handler's): give
            # back what the try made, since the caller will not (``with`` calls no
            # __exit__ when __enter__ raised); a node granted, not yet returned, is
            # the reaper's, as a waiting one is.
            if granted is None:
                protocol.abandon(session_id)
            else:  # quietly: no signal said it was held
                grant = grant or _Grant(session, protocol, granted, self)  # if not made yet
                self._grant = None
                grant._mark_released()
                grant.release()
            raise
        return granted is not None

    def release(self) -> None:
        """Give the lease back; a no-op when it is not held or its session is gone."""
        if self._grant is not None and not self._grant.released:
            self._grant.release()

    # -- helpers -----------------------------------------------------------------

    def _connect(self) -> _Session:
        if self._session is None:
            self._session = _connection(self._task.app)
        return self._session

    def _key_path(self, session: _Session) -> str:
        return f"{session.settings.root}/{self._namespace}/{self.name}"

    def _protocol(self, session: _Session) -> _Protocol:
        """The protocol object of one try, with a random guid of its own (see _Queue: how a
        node is found again); a limited mutex's starts with its task's mark (_MutexLease)."""
        mark = _task_mark(self._task_id()) if self._kind.marked else None
        guid = (mark or "") + uuid.uuid4().hex[:16]
        parent = f"{session.settings.root}/{self._namespace}"
        return self._kind.protocol(self, session, parent, guid, _metadata(self, session, guid))

    def _contenders(self) -> tuple[list[dict], list[dict]]:
        return self._protocol(self._connect()).contenders()

    def _refuse_reentry(self, session: _Session) -> None:
        if self._max_leases is None:
            session.holdings.refuse_reentry(self._key_path(session), self.key)

    def _task_id(self) -> str | None:
        if self._early_id is not None:
            return self._early_id
        return getattr(self._task.request, "id", None)

    def _waited(self) -> float:
        return 0.0 if self._first_try is None else time.monotonic() - self._first_try

    def _signal(self, which: Signal, **facts: Any) -> None:
        """Send ``which`` about this lease, if anyone listens (see the Signals section)."""
        if which.receivers:
            task = self._task
            sender = task if isinstance(task, celery.Task) else task.app
            which.send(sender=sender, lease=self, **facts)

    def _log(self, level: int, what: str, *args: Any, **facts: Any) -> None:
        """Log a line naming the task, its id, and this lease's kind and key (as facts too)."""
        task_id = self._task_id()
        _log(
            level, f"task %s[%s]: %s %s {what}", self._task.name, task_id, self.kind, self.key,
            *args, task_id=task_id, task_name=self._task.name, kind=self.kind, key=self.key,
            **facts,
        )  # fmt: skip

    def _not_released(self, exc: Exception) -> None:
        self._log(logging.WARNING, "not released (%s); ZooKeeper frees it when the session ends, "
                  "or this process deletes it when it reconnects", exc, outcome="not_released",
                  error=str(exc))  # fmt: skip

    def fenced_write(self, path: str, data: bytes, version: int) -> int:
        """Set the data of node ``path`` to ``data`` only while this lease is held and ``path``
        is at ``version``; return its new version.  One multi-operation checks both (that the
        lease's node exists, and the version), so of two processes that both believe they hold
        the lease the later write fails: a holder deposed unawares cannot act on what it was
        about to write.  An answer lost with the connection is settled by reading ``path``.

        :raises StaleVersion: ``path`` is not at ``version`` (or is gone): another wrote it.
        :raises NotLeading: the lease is not held (or is a multi-lock), may be lost (:attr:`lost`)
            or its node is gone; or ZooKeeper did not confirm the write.
        """
        if not self or not isinstance(self._grant, _Grant):
            raise NotLeading("its lease is no longer held")
        return self._grant.fenced_write(path, data, version)


@dataclass(frozen=True)
class _Kind:
    """A kind of lease: its name (in ``ls``, log lines, metrics) and the protocol of its tries."""

    name: str
    #: Makes one try's protocol object: (lease, session, namespace node, guid, metadata).
    protocol: Callable[[Lease, _Session, str, str, bytes], _Protocol]
    mode: str | None = None  # a read/write lock's
    option: str = "max_leases"  # what sets a semaphore's limit, as a mismatch names it
    marked: bool = False  # its guids start with the task's mark (a limited mutex's)


def _exclusive(lease: Lease, session: _Session, parent: str, guid: str, data: bytes) -> _Protocol:
    return _ExclusiveLock(session, parent, lease.name, guid, data)


def _limited(lease: Lease, session: _Session, parent: str, guid: str, data: bytes) -> _Protocol:
    assert lease._max_leases is not None
    policy = _SemaphorePolicy(lease._max_leases, f"{lease.kind} {lease.key}", lease._kind.option)
    return _Semaphore(session, f"{parent}/{lease.name}", guid, data, policy)


def _read_write(lease: Lease, session: _Session, parent: str, guid: str, data: bytes) -> _Protocol:
    assert lease._kind.mode is not None
    return _ReadWriteLock(session, f"{parent}/{lease.name}", lease._kind.mode, guid, data)


def _early(lease: Lease, session: _Session, parent: str, guid: str, data: bytes) -> _Protocol:
    timeout = _mutex_timeout(lease._task)
    return _EarlyMutex(session, f"{parent}/{lease.name}", guid, data, lease.key, timeout)


#: Every kind, by (namespace, mode, max_leases given).
_KINDS = {
    (_LOCKS, None, False): _Kind("lock", _exclusive),
    (_MUTEXES, None, False): _Kind("mutex", _exclusive),
    (_MUTEXES, None, True): _Kind("mutex", _limited, option="mutex_max_leases", marked=True),
    (_SEMAPHORES, None, True): _Kind("semaphore", _limited),
    (_RWLOCKS, _READ, False): _Kind("read lock", _read_write, mode=_READ),
    (_RWLOCKS, _WRITE, False): _Kind("write lock", _read_write, mode=_WRITE),
    (_EARLY, None, False): _Kind("early mutex", _early),
    (_BEAT, None, False): _Kind("beat", _exclusive),
}


class _MutexLease(Lease):
    """MutexTask's lease: one holder (an exclusive lock), or ``mutex_max_leases`` (a semaphore).

    It can wait, note in its node that a copy of the task follows, and tell a
    holder with its own task id from others: a limited mutex's guids start
    with a mark of the task id, so the listing that grants a place shows one
    without reading any node.  Early mutexes and multi-locks are mutex leases.
    """

    @property
    def limited(self) -> bool:
        """Whether it admits more than one holder (``mutex_max_leases``)."""
        return self._max_leases is not None

    def beside_itself(self) -> bool:
        """Whether a limited mutex granted this lease beside a holder with the same task id."""
        grant, mark = self._grant, _task_mark(self._task_id())
        if not isinstance(grant, _Grant) or not isinstance(grant.protocol, _Semaphore):
            return False
        return mark is not None and grant.protocol.holds_marked(mark)

    def acquire_within(self, seconds: float) -> bool:
        """As :meth:`acquire` of a lease made with ``blocking=True, timeout=seconds``."""
        options = self._blocking, self._timeout
        self._blocking, self._timeout = True, seconds
        try:
            return self.acquire()
        finally:
            self._blocking, self._timeout = options

    def wait_for_holder(self, holder: dict, seconds: float | None) -> str | None:
        """Wait until ``holder`` (its node's metadata; ``{}``: whoever holds it) has released,
        or ``seconds`` (None: as long as it holds): as _wait_gone says; None if unwatched."""
        guid, session = holder.get("guid"), self._session
        guid = guid if isinstance(guid, str) else None
        # Only a courtesy: if ZooKeeper is away, the next acquire says so.
        with contextlib.suppress(CoordinationError):
            if session is not None and not self.limited:
                return _wait_gone(session, self._key_path(session), _deadline(seconds), guid)
            if session is not None and guid is not None:
                protocol = self._protocol(session)
                assert isinstance(protocol, _Semaphore)
                return protocol.wait_released(guid, _deadline(seconds))
        return None

    def hand_over(self) -> None:
        """Note in the node that a copy of this task follows (a retry or a replacement).

        The copy, sent with this run's task id before the mutex is released, is
        thus told from a second delivery of the message (see _follows).  Never
        in a queue node, whose change is a hand-off (_ExclusivePolicy): a mutex's
        lease is taken without waiting, so it never holds through the queue.
        """
        grant = self._grant
        if not isinstance(grant, _Grant) or grant.released:
            return
        session, path = grant.session, grant.path
        try:
            if f"{_QUEUE}/" in path:
                raise CoordinationError(f"{path} holds through its lock's queue: no note is "
                                        "written there")  # fmt: skip
            data, stat = session.read(session.client.get_async, path)
            if stat.ephemeralOwner == grant.session_id and _guid_of(data) == grant.guid:
                meta = json.dumps({**json.loads(data), "handover": True}).encode()
                session.call(session.client.set_async, path, meta, stat.version)
        except (ZKCeleryError, KazooException) as exc:
            self._log(logging.WARNING, "could not note the copy that follows: %s", exc,
                      outcome="not_noted", error=str(exc))  # fmt: skip


class _EarlyLease(_MutexLease):
    """EarlyMutexTask's lease, with the steps of the key's life besides the run (_EarlyMutex):
    ``reserve`` at the send, ``requeue`` at a retry, ``unreserve`` when nothing was sent
    after all, the message was revoked, or no retry follows."""

    def reserve(self) -> None:
        """At the send: make the key's queued form, or raise AlreadyQueued."""
        self._early().reserve()

    def unreserve(self) -> None:
        """Free the key if this task id holds it (queued; or running, by this lease)."""
        if self:
            self.release()
        self._early().unreserve()

    def requeue(self) -> None:
        """At a retry: turn the running form back into the queued form, for the retried copy."""
        grant = self._grant
        if not isinstance(grant, _Grant) or grant.released:
            return
        grant.check_session()  # no watch: our own requeue is about to delete the node
        if grant.why_lost is not None:
            return
        assert isinstance(grant.protocol, _EarlyMutex)
        try:
            if grant.protocol.requeue(grant.session_id):
                grant.settle()
        except CoordinationError as exc:
            self._log(logging.WARNING, "not kept for the retry: %s", exc,
                      outcome="not_kept", error=str(exc))  # fmt: skip
        # Not kept: the run's end releases it as usual, and the retried copy,
        # finding this task id running, waits for that.

    def free_revoked(self, session: _Session) -> None:
        """Free the key of a revoked message, in ``session`` (see _free_revoked); a failure is
        logged."""
        self._session = session
        try:
            self.unreserve()
        except ZKCeleryError as exc:
            self._log(logging.WARNING, "not freed after its revocation: %s", exc,
                      outcome="not_freed", error=str(exc))  # fmt: skip

    def _early(self) -> _EarlyMutex:
        protocol = self._protocol(self._connect())
        assert isinstance(protocol, _EarlyMutex)
        return protocol


class _MultiLease(_MutexLease):
    """One lease over several exclusive locks (``multi_lock``, ``mutex_each_key``).

    One part per key, a single exclusive lease, sorted by lock name: the one
    order every contender takes keys in (_ExclusiveSet: nodes and costs).
    Truthy while every part is held, ``lost`` once any part may be another's.
    ``token`` is one zxid at which every key was ours: above the token of
    every earlier holder of any of its keys, below every later one's, so a
    fencing token for each key, comparable with ``lock()``'s.  (A node's creation zxid would not
    be: a key taken last, by the fast path, is made after a plain waiter
    joined the queue of a key taken first, and that waiter holds next.)
    ``holders()`` and ``waiters()`` list every key's, the key a failed try
    found held first.  Signals are sent once for the whole lease.
    """

    def __init__(
        self,
        task: celery.Task,
        namespace: str,
        keys: Sequence[tuple[str | None, tuple]],
        **options: Any,
    ) -> None:
        super().__init__(task, namespace, **options)
        if not keys:
            raise TypeError("a multi-lock needs at least one key")
        parts: dict[str, _Part] = {}
        for name, values in keys:
            part = _Part(
                task, namespace, values, blocking=self._blocking, timeout=self._timeout,
                identifier=self.identifier, name=options.get("name") if name is None else name,
            )  # fmt: skip
            part.multi = self
            parts.setdefault(part.name, part)  # equal keys count once
        self.parts: list[_Part] = [parts[name] for name in sorted(parts)]
        self.name = "&".join(part.name for part in self.parts)  # "&" is never in a lock name
        self.key = " + ".join(part.key for part in self.parts)
        self._blocked: _Part | None = None  # the part the last failed try found held

    def wait_for_holder(self, holder: dict, seconds: float | None) -> None:
        """Wait until the key the last failed try found held is freed, or ``seconds``."""
        if self._blocked is not None:
            self._blocked.wait_for_holder({}, seconds)

    def hand_over(self) -> None:
        """A mutex's: note in every part's node that a copy of the task follows."""
        for part in self.parts:
            part.hand_over()

    def _contenders(self) -> tuple[list[dict], list[dict]]:
        found = [p._contenders() for p in sorted(self.parts, key=lambda p: p is not self._blocked)]
        return [h for held, _ in found for h in held], [w for _, wait in found for w in wait]

    def _refuse_reentry(self, session: _Session) -> None:
        for part in self.parts:
            part._refuse_reentry(session)

    def _take(self, session: _Session, deadline: float | None) -> bool:
        """Take every part, or none: True once all are held."""
        for part in self.parts:
            part._session = session
        while True:
            self._blocked = None
            outcome, together = self._take_together(session)
            if outcome == "held" and not self._blocking:
                return False
            if outcome != "taken" and not self._take_in_order(deadline):
                return False
            grants = [part._grant for part in self.parts if part._grant is not None]
            for grant in grants:  # a part taken first may have gone while a later one waited
                grant.check_session()
            if not any(grant.why_lost for grant in grants):
                self._grant = _MultiGrant(self, grants, together)
                return True
            for part in reversed(self.parts):
                part.release()
            if not self._blocking or _expired(deadline):
                raise CoordinationError("the session was lost while taking the keys")

    def _take_together(self, session: _Session) -> tuple[str, _ExclusiveSet | None]:
        """Try to take every free key in one request (_ExclusiveSet): "taken", with the set
        to release in one request; "held" or "queued" (the key ``_blocked`` is); or
        "contended" (lately: a blocking try goes straight to the queues)."""
        if self._blocking and any(session.contended(p._key_path(session)) for p in self.parts):
            return "contended", None
        locks = []
        for part in self.parts:
            lock = part._protocol(session)
            assert isinstance(lock, _ExclusiveLock)
            locks.append(lock)
        together = _ExclusiveSet(session, locks)
        session_id = session.session_id
        try:
            outcome, index = together.take_free()
            if outcome != "taken":
                self._blocked = self.parts[index]
                session.contended(locks[index].key_path, seen=True)
                return outcome, None
            for part, lock in zip(self.parts, locks):
                part._grant = _Grant(session, lock, (lock.holder, None, lock._owner), part)
                session.holdings.remember(part._grant)
        except BaseException:  # from outside: what the multi-operation made, to the reaper
            together.orphan(session_id)
            for part in self.parts:
                if part._grant is not None:
                    session.holdings.forget(part._grant)  # no longer held: not to be watched
                part._grant = None
            raise
        return outcome, together

    def _take_in_order(self, deadline: float | None) -> bool:
        """Take the parts one at a time, in order; a failure or an error releases those taken."""
        taken: list[_Part] = []
        try:
            for part in self.parts:
                # As this try waits (acquire_within sets it), within its one deadline.
                part._blocking = self._blocking
                part._timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                if not part.acquire():
                    self._blocked = part
                    return False
                taken.append(part)
            taken = []
            return True
        finally:
            for part in reversed(taken):
                part.release()


class _MultiGrant:
    """A multi-lock's grant: the grants of its parts, ended (released or lost) once for all."""

    def __init__(
        self, multi: _MultiLease, grants: list[_Grant], together: _ExclusiveSet | None
    ) -> None:
        self.multi = multi
        self.grants = grants  # the parts' own, shared
        self.together = together  # taken in one request: released in one
        self.released = False  # from the start of its release
        self.ended = False  # reported released or lost
        self.granted_at = time.monotonic()
        self._mutex = threading.Lock()

    @property
    def holding(self) -> bool:
        return not self.released and all(grant.holding for grant in self.grants)

    def is_lost(self) -> bool:
        return any(grant.is_lost() for grant in self.grants)

    def fencing_token(self) -> int | None:
        """One zxid at which every key was ours (see _MultiLease), learnt as Lease.token says."""
        grants = self.grants
        if self.holding and any(grant.token is None for grant in grants):
            nodes = [(grant.path, grant.guid, grant.session_id) for grant in grants]
            token = grants[0].session.zxid_holding(nodes)
            for grant in grants:  # if one is lost, none: each asks alone below, marking it
                if grant.token is None:
                    grant.token = token
        tokens = [grant.fencing_token() for grant in grants]
        return None if None in tokens else max(tokens)  # type: ignore[type-var]

    def held(self) -> float:
        return time.monotonic() - self.granted_at

    def part_ended(self, which: Signal, **facts: Any) -> None:
        """A part's grant ended outside ``release()`` (lost, or closed): so did this one."""
        with self._mutex:
            ended, self.ended = not self.ended, True
        if ended:
            self.multi._signal(which, **{**facts, "held": self.held()})

    def release(self) -> None:
        """Give every key back, the last taken first; keys no longer held are skipped.  Keys
        taken together, all held and none lost, are released in one request."""
        grants, together = self.grants, self.together
        with self._mutex:
            ended, self.ended, self.released = not self.ended, True, True
            # A part already lost ends the lease as lost, as one lease's grant does,
            # though the part's own signal may still be on its way (then swallowed).
            lost = next((grant.why_lost for grant in grants if grant.why_lost), None)
        held = [grant for grant in grants if grant.holding]
        try:
            if len(held) < len(grants) or together is None or any(g.why_lost for g in grants):
                for grant in reversed(held):
                    grant.release()
                return
            for grant in grants:  # marked first: our own deletes are no break (see _Grant.release)
                grant.settle()
            if not together.release(grants):  # an rm ran since, or a node is gone
                for grant in reversed(grants):  # one by one after all
                    grant.release()
        except CoordinationError as exc:
            self.multi._not_released(exc)
        finally:
            if ended and lost is not None:
                self.multi._signal(lease_lost, held=self.held(), reason=_loss_reason(lost))
            elif ended:
                self.multi._signal(lease_released, held=self.held())


class _Part(_MutexLease):
    """One key of a multi-lock: its grant's end is reported by the multi-lock's, once for all."""

    multi: _MultiLease
    _grant: _Grant | None

    def _signal(self, which: Signal, **facts: Any) -> None:
        grant = self.multi._grant
        if isinstance(grant, _MultiGrant) and (which is lease_lost or which is lease_released):
            grant.part_ended(which, **facts)


# ---------------------------------------------------------------------------
# Tasks: LockTask, MutexTask and EarlyMutexTask
# ---------------------------------------------------------------------------


class LockKey:
    """A key of :meth:`LockTask.multi_lock` on a lock of another name.

    ``LockKey("account", 7)`` is the lock that ``self.lock(7, name="account")``
    takes, in any task: the base name, then its refining values.
    """

    __slots__ = ("name", "values")

    def __init__(self, name: str, *values: Any) -> None:
        if not isinstance(name, str) or not name:
            raise TypeError(f"LockKey's name must be a non-empty str, not {name!r}")
        self.name = name
        self.values = values

    def __repr__(self) -> str:
        return f"LockKey({', '.join(map(repr, (self.name, *self.values)))})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LockKey) and (self.name, self.values) == (other.name, other.values)

    def __hash__(self) -> int:
        return hash((self.name, self.values))


def _values_of(key: Any) -> tuple[str | None, tuple]:
    """A multi-lock key as (base name or None for the lease's own, refining values)."""
    if isinstance(key, LockKey):
        return key.name, key.values
    return None, key if isinstance(key, tuple) else (key,)


class LockTask(celery.Task):
    """Task base offering locks as context managers; use with ``bind=True``.

    ``self.lock()``, ``self.semaphore()``, ``self.read_lock()`` and ``self.write_lock()``.
    """

    def lock(self, *values: Any, blocking: bool = False, timeout: float | None = None,
             retry: bool = False, identifier: str | None = None, name: str | None = None,
             **retry_options: Any) -> Lease:  # fmt: skip
        """A lock on this task's name refined by ``values``: one holder at a time.

        :param values: refine the lock: only tasks locking equal values exclude
            each other.
        :param blocking: wait for the lock instead of giving up at once; forces
            ``retry`` off.
        :param timeout: with ``blocking``, give up after this many seconds.
        :param retry: when the lock is held, retry the task (``self.retry``)
            from the ``with`` statement; the body does not run.
        :param identifier: a label for this contender, stored with it and shown
            by ``holders()`` and ``ls --json`` (default ``'<task id>-><hostname>'``).
        :param name: the lock's name instead of the task's, so that
            differently named tasks can share one lock.
        :param retry_options: with ``retry=True``, passed to ``self.retry()``
            (``countdown``, ``max_retries``, ``exc``...).
        """
        return Lease(self, _LOCKS, values, blocking=blocking, timeout=timeout, retry=retry,
                     identifier=identifier, name=name, retry_options=retry_options)  # fmt: skip

    def semaphore(self, *values: Any, max_leases: int = 1, blocking: bool = False,
                  timeout: float | None = None, retry: bool = False, identifier: str | None = None,
                  name: str | None = None, **retry_options: Any) -> Lease:  # fmt: skip
        """A semaphore on this task's name refined by ``values``: ``max_leases`` holders.

        :param max_leases: how many holders it admits at once; every holder of
            one semaphore must give the same number.
        :param values, blocking, timeout, retry, identifier, name, retry_options:
            as for :meth:`lock`.
        """
        return Lease(self, _SEMAPHORES, values, max_leases=max_leases, blocking=blocking,
                     timeout=timeout, retry=retry, identifier=identifier, name=name,
                     retry_options=retry_options)  # fmt: skip

    def read_lock(self, *values: Any, blocking: bool = False, timeout: float | None = None,
                  retry: bool = False, identifier: str | None = None, name: str | None = None,
                  **retry_options: Any) -> Lease:  # fmt: skip
        """A read lock on this task's name refined by ``values``: shared by readers.

        Any number of readers hold it at once, never beside a writer
        (:meth:`write_lock` on the same name and values).  Contenders are
        served in arrival order: a reader waits for the writers that came
        before it, never for one that came after.

        :param values, blocking, timeout, retry, identifier, name, retry_options:
            as for :meth:`lock`; tasks of other names that read and write the
            same thing share the lock by giving the same ``name``.
        """
        return Lease(self, _RWLOCKS, values, mode=_READ, blocking=blocking, timeout=timeout,
                     retry=retry, identifier=identifier, name=name,
                     retry_options=retry_options)  # fmt: skip

    def write_lock(self, *values: Any, blocking: bool = False, timeout: float | None = None,
                   retry: bool = False, identifier: str | None = None, name: str | None = None,
                   **retry_options: Any) -> Lease:  # fmt: skip
        """A write lock on this task's name refined by ``values``: one writer, no reader.

        It excludes every reader (:meth:`read_lock` on the same name and
        values) and every other writer.  Contenders are served in arrival
        order: a writer waits for the readers that came before it, and
        readers that come after it wait for it.

        :param values, blocking, timeout, retry, identifier, name, retry_options:
            as for :meth:`read_lock`.
        """
        return Lease(self, _RWLOCKS, values, mode=_WRITE, blocking=blocking, timeout=timeout,
                     retry=retry, identifier=identifier, name=name,
                     retry_options=retry_options)  # fmt: skip

    def multi_lock(self, *keys: Any, blocking: bool = False, timeout: float | None = None,
                   retry: bool = False, identifier: str | None = None, name: str | None = None,
                   **retry_options: Any) -> Lease:  # fmt: skip
        """One lease over several locks, taken all or none, and released together.

        Each key is one lock, the very lock ``lock()`` takes: a plain value
        refines this task's name (or ``name``), a tuple counts as several
        refining values, and a :class:`LockKey` names a lock of another name.
        Equal keys count once.  The keys are taken in one order that does
        not depend on the order given, so contenders asking for overlapping
        sets never wait for each other in a cycle; a try that fails, or
        raises, part-way keeps none of them.

        :param keys: the locks, at least one.
        :param blocking, timeout, retry, identifier, name, retry_options: as for
            :meth:`lock`; ``timeout`` bounds the whole wait, for all keys.

        The lease is truthy while it holds every key; ``lost`` is true once
        any key may be another's, and ``token`` is a fencing token valid for
        each of its keys (see :class:`_MultiLease`).
        """
        return _MultiLease(self, _LOCKS, [_values_of(key) for key in keys], blocking=blocking,
                           timeout=timeout, retry=retry, identifier=identifier, name=name,
                           retry_options=retry_options)  # fmt: skip


# -- Process facts: is the process that holds a key alive? ------------------

#: The kernel's flag of a process that has begun to exit (/proc/<pid>/stat, field 9).
_PF_EXITING = 0x4


def _started_after(fields: list[bytes], acquired: Any) -> bool:
    """Whether the process (/proc/<pid>/stat from field 3) began after the lease: a reused pid."""
    with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/stat", "rb") as f:
        boot = next(int(line.split()[1]) for line in f if line.startswith(b"btime "))
        began = boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime
        return isinstance(acquired, (int, float)) and began > acquired + 1.0
    return False


def _killed(pid: int) -> bool:
    """Whether a SIGKILL waits for the process ``pid``: it is as good as dead.

    A worker SIGKILLed with its pool, the broker gives its messages back as
    soon as the main process's connection closes; the pool child that ran the
    message may not have been scheduled to die yet, and looks alive.
    """
    kill = 1 << (signal.SIGKILL - 1)
    with contextlib.suppress(OSError, ValueError), open(f"/proc/{pid}/status", "rb") as f:
        masks = [line.split()[1] for line in f if line.startswith((b"SigPnd:", b"ShdPnd:"))]
        return any(int(mask, 16) & kill for mask in masks)
    return False


def _alive_here(holder: dict) -> bool | None:
    """Whether the holder's process is alive: None when it is not on this host.

    Only a True is acted on at once (a copy is dropped), so it errs towards
    False: a zombie (killed, not reaped: PID 1 in a container often never
    reaps) and a process younger than the lease (a reused pid) are dead.
    """
    pid = holder.get("pid")
    if holder.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0:
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        if os.path.isdir("/proc/self"):
            return False
        try:  # no /proc (macOS): ask the kernel
            os.kill(pid, 0)
        except OSError as exc:  # only "no such process" says it is gone
            return not isinstance(exc, ProcessLookupError)
        return True
    except OSError:
        return None
    fields = stat[stat.rindex(b")") + 2 :].split()  # from field 3, the state, on
    if fields[0] in (b"Z", b"X") or int(fields[6]) & _PF_EXITING or _killed(pid):
        return False  # dead, or dying: a SIGKILLed worker's child lives on for a moment
    return not _started_after(fields, holder.get("acquired"))


def _dead_for(holder: dict, app: celery.Celery) -> float:
    """The longest a dead holder's node can outlive it: what its session was granted.

    The server expires sessions in buckets of its tick, so up to a tick late (at
    most half the shortest timeout it grants); and a second.  A holder that did
    not say (an older zkcelery) is taken to have ours.
    """
    timeout = holder.get("session_timeout")
    if not isinstance(timeout, (int, float)) or timeout <= 0:
        timeout = _read_settings(app).session_timeout
    return float(timeout * 1.5 + 1.0)


# -- Broker facts: how long a message may stay unacknowledged ----------------

#: zkcelery's own waits keep a message unacknowledged for at most this share of
#: the Redis ``visibility_timeout``, after which Redis would deliver it again.
_VISIBILITY_SHARE = 0.25
#: Per app, its Redis ``visibility_timeout`` (None: the broker is not Redis), read once.
_visibility: weakref.WeakKeyDictionary[celery.Celery, float | None] = weakref.WeakKeyDictionary()


def _redis_visibility_timeout(app: celery.Celery) -> float | None:
    """The app's Redis ``visibility_timeout`` in seconds; None when the broker is not Redis."""
    if app in _visibility:
        return _visibility[app]
    seconds: float | None = None
    # An unusable broker URL is Celery's to report.  The connection is never opened; its
    # transport options are the app's broker_transport_options.
    with contextlib.suppress(Exception), app.connection_for_read() as conn:
        transport = conn.get_transport_cls()
        if getattr(transport, "driver_type", None) == "redis":
            default = getattr(getattr(transport, "Channel", None), "visibility_timeout", 3600)
            seconds = float(conn.transport_options.get("visibility_timeout", default))
    _visibility[app] = seconds
    return seconds


def _unacked_left(app: celery.Celery, started: float) -> float | None:
    """How long a task that started at ``started`` may still wait unacknowledged (None: ever)."""
    timeout = _redis_visibility_timeout(app)
    if timeout is None:
        return None
    return max(0.0, timeout * _VISIBILITY_SHARE - (time.monotonic() - started))


# ---------------------------------------------------------------------------
# Tasks: MutexTask's decision, and the mutex tasks
# ---------------------------------------------------------------------------


# -- MutexTask's decision: a pure function of what a refused copy knows ------


@dataclass(frozen=True)
class _MutexFacts:
    """What a MutexTask copy that did not get its mutex knows, as it decides its next step."""

    #: This request: its task id, its retries and replacements (``replaced_task_nesting``).
    task_id: str | None
    retries: int = 0
    nesting: int = 0
    #: This task's options: ``mutex_requeue``, ``acks_late``, ``mutex_max_leases`` > 1.
    requeue: bool = False
    acks_late: bool = False
    limited: bool = False
    #: The holder read after its last failed try ({}: none was found).
    holder: dict = field(default_factory=dict)
    #: Of a holder with this task id: whether its process is alive (None: not on
    #: this host, see _alive_here), and how long its node may outlive it.
    alive: bool | None = None
    dead_for: float = 0.0
    went: str | None = None  #: how its last wait ended (see Lease.wait_for_holder)
    left: float | None = None  #: how long the broker lets it wait unacknowledged (None: ever)
    backoffs: int = 0  #: how many times this process backed off before requeuing this task id

    def within(self, seconds: float) -> float:
        """At most ``seconds``, and at most what the broker leaves (``left``)."""
        return seconds if self.left is None else min(seconds, self.left)


@dataclass(frozen=True)
class _MutexStep:
    """One step of a refused MutexTask copy (see _decide_mutex).

    ``act``: run (try the mutex, in line up to ``seconds``), wait (up to
    ``seconds``, None: no bound, for ``holder`` to go), drop, reject or requeue
    (told ``holder``).  ``why`` names the step, or a drop's reason.
    """

    act: str
    why: str = ""
    seconds: float | None = None
    holder: dict = field(default_factory=dict)


def _follows(holder: dict, facts: _MutexFacts) -> bool:
    """Whether this request is a retry or replacement of the holder's run.

    A retry counts up ``retries``; a replacement counts up
    ``replaced_task_nesting`` and starts ``retries`` again, and Celery before
    5.7 does not even send the nesting.  So the holder notes in its node that
    a copy follows (``handover``) before it is sent, and that decides.  (A
    redelivery of the holder's own message that comes in that moment is then
    taken for its copy too: it waits, and runs after it, rather than being
    lost.)
    """
    theirs = (holder.get("nesting") or 0, holder.get("retries") or 0)
    return (facts.nesting, facts.retries) > theirs or bool(holder.get("handover"))


def _contest(facts: _MutexFacts) -> _MutexStep:
    """Another task holds the mutex: reject, or back off before the requeue."""
    if not facts.requeue:
        return _MutexStep("reject", holder=facts.holder)
    delay = facts.within(min(8.0, 0.25 * 2**facts.backoffs))
    # A limited mutex waits in line: a place may free up meanwhile.
    return _MutexStep("run" if facts.limited else "wait", "back off", delay)


def _decide_mutex(last: _MutexStep | None, facts: _MutexFacts) -> _MutexStep:
    """What a MutexTask copy does after ``last`` (None: its first try failed), from ``facts``.

    README.md (MutexTask) tells the rule and why.  A holder with this message's
    own task id is the run this copy follows (a retry or a replacement, sent
    before that run ends: wait for its release, then run), or the first delivery
    of this same message (Redis restored it, RabbitMQ redelivered it).  That one
    is dropped at once while it lives on this host; else its node is waited for
    as long as its session can outlive it, within the broker's bound: dropped if
    it went by a release (the run ended), run if it went with its session (the
    holder died), requeued if it is still there (alive elsewhere, or a leader
    election restarted its session): never dropped on a time bound alone.  Any
    other holder: rejected, or with ``mutex_requeue`` requeued after a back-off
    (so that copies do not spin while a long holder runs), taking the mutex if
    it is freed meanwhile.
    """
    holder = facts.holder
    if last is not None and last.act == "wait":  # then the step that tries the mutex again
        if last.why == "wait out" and facts.went == "released":
            return _MutexStep("drop", "its first delivery ran to its end, on", holder=last.holder)
        why = {"wait out": "waited out", "back off": "backed off"}.get(last.why, "followed")
        return _MutexStep("run", why, holder=last.holder)
    if last is None and not holder:  # its first try failed, and it was released since
        return _MutexStep("run", "again")
    if last is None or last.why == "again":  # the first look at a holder
        if facts.task_id is None or holder.get("task_id") != facts.task_id:
            return _contest(facts)
        if _follows(holder, facts):  # as long as the first run takes: it is ending
            return _MutexStep("wait", "follow", facts.left if facts.acks_late else None, holder)
        if facts.alive:
            return _MutexStep("drop", "its first delivery runs on", holder=holder)
        return _MutexStep("wait", "wait out", facts.within(facts.dead_for), holder)
    if last.why == "followed":
        if holder.get("guid") != last.holder.get("guid"):
            return _contest(facts)  # released, and another task took it
        if facts.acks_late and facts.left is not None:  # still ending; the broker wants an answer
            return _MutexStep("requeue", holder=holder)
        return _MutexStep("wait", "follow again", None, last.holder)
    if last.why == "waited out" and holder.get("task_id") != facts.task_id:
        return _contest(facts)  # the dead holder's session ended and another task took it
    # Still held by its first delivery (alive elsewhere, or dead with a session
    # not ended yet), or by another task after the back-off: requeued.
    return _MutexStep("requeue", holder=holder)


# -- The mutex tasks ---------------------------------------------------------

#: Back-offs before a requeue, by task id.  Process-local and bounded: a
#: requeued copy may land on another process, which only makes it start again
#: from the shortest delay.
_rejections: dict[Any, int] = {}
#: Per thread, the lock names whose holder runs an eager copy of itself.
_local = threading.local()


def _holder(lease: Lease, task_id: str | None = None) -> dict:
    """The mutex's holder (of several, the one with ``task_id`` if any), or {}: none, unreadable."""
    try:
        holders = lease.holders()
    except MaxLeasesMismatch:
        raise
    except ZKCeleryError:
        return {}
    own = [h for h in holders if task_id is not None and h.get("task_id") == task_id]
    return (own or holders or [{}])[0]


def _handed_over() -> set[str]:
    return vars(_local).setdefault("handed_over", set())  # type: ignore[no-any-return]


class _KeyedTask(celery.Task):
    """What MutexTask and EarlyMutexTask share: ``mutex_keys``, checked at definition."""

    mutex_keys: Sequence[str] = ()
    _mutex_signature: inspect.Signature | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # Celery builds a task's class when the task is defined (or when a lazy
        # app finalizes): check the options now, before any message arrives.
        super().__init_subclass__(**kwargs)
        run = cls.__dict__.get("run")
        if run is None:  # an intermediate base class, not a task
            return
        cls._mutex_signature = _check_mutex_options(cls, run)
        cls._check_options()

    @classmethod
    def _check_options(cls) -> None:
        """Check (and complete) the options of a task class being defined."""

    def _mutex_values(self, args: Any, kwargs: Any) -> tuple:
        """The values of ``mutex_keys`` in a call, bound by parameter name."""
        if not self.mutex_keys or self._mutex_signature is None:
            return ()
        bound = self._mutex_signature.bind(*(args or ()), **(kwargs or {}))
        bound.apply_defaults()
        return tuple(bound.arguments[key] for key in self.mutex_keys)

    def _refuse(self, lease: Lease, exc: Exception, which: Signal, holder: dict,
                quiet: bool = True) -> NoReturn:  # fmt: skip
        """This copy does not run (logged): tell ``which``'s receivers, and raise ``exc``.

        ``quiet``: zkcelery's line is the log's only record of it, not Celery's too.
        """
        if quiet:
            if len(_quiet_ids) > 1000:  # Celery did not log some: forget them
                _quiet_ids.clear()
            _quiet_ids.add(self.request.id)
        if isinstance(exc, Reject):
            _record_rejection(self, exc)
        lease._signal(which, task_id=self.request.id, holder=holder)
        raise exc


class MutexTask(_KeyedTask):
    """Task base whose whole body runs under a mutex; contention raises :class:`MutexHeld`.

    Task options: ``mutex_keys`` names the arguments whose values refine the
    mutex; ``mutex_max_leases=N`` admits up to N copies per key at once instead
    of one (a copy beyond N is handled as a copy that finds the mutex held);
    ``mutex_requeue=True`` requeues a rejected task instead of failing it (and
    turns on ``acks_late`` and, unless the task sets it, ``reject_on_worker_lost``);
    ``mutex_each_key=True`` takes one mutex per argument named in ``mutex_keys``
    instead of one over all of them, so that a copy is refused when any of its
    values is in use: ``user=1`` and ``account=1`` are then two mutexes, taken as
    a whole without waiting, and a copy that finds any of them held is handled as
    a copy of a plain MutexTask, told the holder of the one it found held.
    """

    mutex_requeue: bool = False
    mutex_max_leases: int = 1
    mutex_each_key: bool = False

    @property
    def mutex_lease(self) -> Lease | None:
        """The :class:`Lease` this run holds (``token``, ``lost``); None outside a run."""
        return getattr(self.request, "zkcelery_mutex", None)

    @classmethod
    def _check_options(cls) -> None:
        try:
            _check_max_leases(cls.mutex_max_leases)
        except (TypeError, ValueError) as exc:
            name = cls.__dict__.get("name") or cls.__name__
            raise type(exc)(f"task {name}: mutex_{exc}") from None
        if cls.mutex_requeue:
            cls.acks_late = True
            # Without it, Celery acknowledges the message of a pool process that
            # dies in the body (SIGKILL, the OOM killer) and the task is lost.
            if not any("reject_on_worker_lost" in vars(k) for k in cls.__mro__[:-1]
                       if issubclass(k, MutexTask)):  # fmt: skip
                cls.reject_on_worker_lost = True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        started = time.monotonic()
        lease = self._new_lease(args, kwargs)
        if lease.name in _handed_over():
            # An eager retry or replacement, run inside its first run's retry() or
            # replace(): that run holds the mutex and waits for this one, under it.
            return super().__call__(*args, **kwargs)
        self._take(lease)
        self._contended(lease, started)  # returns holding the mutex, or raises
        self.request.zkcelery_mutex = lease  # for an eager retry() or replace()
        retrying = False
        try:
            return super().__call__(*args, **kwargs)
        except Retry:
            # The copy that follows (same task id) waits for this release, and
            # Celery stores this run's RETRY state after the body: released
            # now, the copy could store its SUCCESS first and have it
            # overwritten.  A worker's run releases once the state is stored
            # (_release_after_run); a direct call has no such step.
            retrying = not (self.request.is_eager or self.request.called_directly)
            raise
        finally:
            if not retrying:
                lease.release()

    def retry(self, *args: Any, **kwargs: Any) -> Any:
        """``celery.Task.retry``; an eager retry runs under this run's mutex."""
        with self._handing_over():
            return super().retry(*args, **kwargs)

    def on_replace(self, sig: Any) -> Any:
        """``celery.Task.on_replace``; an eager replacement runs under this run's mutex."""
        with self._handing_over():
            return super().on_replace(sig)

    @contextlib.contextmanager
    def _handing_over(self) -> Iterator[None]:
        lease = getattr(self.request, "zkcelery_mutex", None)
        if lease and not self.request.is_eager:
            # The copy is sent with this task's id: say in the node that it
            # follows, before it can start (see _follows).
            lease.hand_over()
        eager = {lease.name} if lease and self.request.is_eager else set()
        _handed_over().update(eager)
        try:
            yield
        finally:
            _handed_over().difference_update(eager)

    def _new_lease(self, args: Any, kwargs: Any) -> _MutexLease | _MultiLease:
        """This call's mutex; with ``mutex_each_key``, a multi-lock of one per argument."""
        values = self._mutex_values(args, kwargs)
        if self.mutex_each_key:
            return _MultiLease(self, _MUTEXES, [(None, kv) for kv in zip(self.mutex_keys, values)])
        limit = self.mutex_max_leases if self.mutex_max_leases > 1 else None
        return _MutexLease(self, _MUTEXES, values, max_leases=limit)

    def _take(self, lease: _MutexLease | _MultiLease, within: float | None = None) -> None:
        """Try the mutex once, or wait in line for it up to ``within`` seconds."""
        try:
            lease.acquire() if within is None else lease.acquire_within(within)
        except CoordinationError as exc:  # never drop the task: retry it
            lease._log(logging.WARNING, "not acquired: %s; retrying the task", exc,
                       outcome="retrying", error=str(exc))  # fmt: skip
            raise self.retry(exc=exc) from exc
        if lease and lease.beside_itself():
            # A limited mutex admitted this copy beside a holder with this same
            # task id: that is its first delivery or the run it follows, which
            # must end first (see _decide_mutex).  Give the place back.
            lease.release()

    def _contended(self, lease: _MutexLease | _MultiLease, started: float) -> None:
        """Until the mutex is taken, take the steps _decide_mutex says; or raise."""
        step: _MutexStep | None = None
        went = None
        while not lease:
            facts = self._facts(lease, step, went, started)
            step = _decide_mutex(step, facts)
            if step.why == "back off":  # the next of this task id waits twice as long
                count = _rejections.pop(self.request.id, 0)
                if len(_rejections) > 1000:
                    _rejections.pop(next(iter(_rejections)))
                _rejections[self.request.id] = count + 1
            if step.act == "run":
                self._take(lease, step.seconds)
            elif step.act == "wait":
                self._say_waiting(lease, step, facts)
                went = lease.wait_for_holder(step.holder, step.seconds)
            else:
                self._reject(lease, step)

    def _facts(self, lease: _MutexLease | _MultiLease, last: _MutexStep | None,
               went: str | None, started: float) -> _MutexFacts:  # fmt: skip
        """What _decide_mutex needs, read after ``last``: the holder after a failed try."""
        request = self.request
        holder, alive, dead_for = (last.holder if last else {}), None, 0.0
        if last is None or last.act == "run":
            # After its back-off, a copy is told the first holder.
            backed_off = last is not None and last.why in ("back off", "backed off")
            holder = _holder(lease, None if backed_off else request.id)
            if request.id is not None and holder.get("task_id") == request.id:
                alive, dead_for = _alive_here(holder), _dead_for(holder, self.app)
        return _MutexFacts(
            request.id, request.retries or 0, getattr(request, "replaced_task_nesting", 0) or 0,
            requeue=bool(self.mutex_requeue), acks_late=bool(self.acks_late),
            limited=lease.limited, holder=holder, alive=alive, dead_for=dead_for, went=went,
            left=_unacked_left(self.app, started), backoffs=_rejections.get(request.id, 0),
        )  # fmt: skip

    def _say_waiting(self, lease: Lease, step: _MutexStep, facts: _MutexFacts) -> None:
        holder, wait = step.holder, step.seconds
        if step.why == "follow":
            lease._log(logging.INFO, "is held by its previous copy (retries %s, replaced %s): "
                       "waiting for its release", holder.get("retries"), holder.get("nesting"),
                       holder=holder.get("task_id"), outcome="waiting", wait=wait)  # fmt: skip
        elif step.why == "wait out":
            lease._log(logging.INFO, "is held by this same task (%s %s pid %s): waiting up to "
                       "%.1f s for that session to end",
                       "a dead process, on" if facts.alive is False else "on", holder.get("host"),
                       holder.get("pid"), wait, holder=holder.get("task_id"), outcome="waiting",
                       wait=wait)  # fmt: skip

    def _reject(self, lease: Lease, step: _MutexStep) -> NoReturn:
        """Drop, reject or requeue this copy, as ``step`` says."""
        holder, requeue, holder_id = step.holder, step.act == "requeue", step.holder.get("task_id")
        if step.act == "drop":
            lease._log(logging.INFO, "is held by this same task (%s %s pid %s): a second "
                       "delivery of its message; dropped", step.why, holder.get("host"),
                       holder.get("pid"), holder=holder_id, outcome="dropped")  # fmt: skip
            self._refuse(lease, Ignore(), mutex_dropped, holder)
        key = holder.get("key") or getattr(lease, "key", None) or ""
        exc = MutexHeld(f"mutex {key} is held by another task", requeue=requeue)
        lease._log(logging.INFO, "is held by %s; rejected and %s",
                   f"task {holder_id}" if holder_id else "another holder",
                   "requeued" if requeue else "dropped", holder=holder_id,
                   outcome="requeued" if requeue else "rejected", wait=lease._waited())  # fmt: skip
        self._refuse(lease, exc, mutex_requeued if requeue else mutex_rejected, holder)


class EarlyMutexTask(_KeyedTask):
    """Task base whose mutex is taken when the task is *sent*, and held until its run ends.

    ``apply_async()`` / ``delay()`` refuse to publish a copy whose key (the
    task's name and the values of ``mutex_keys``) is already queued or
    running, with :class:`AlreadyQueued`.  While the message waits, the key
    outlives the sender, for ``mutex_timeout`` seconds at most; when a worker
    starts the run, the key passes to the worker's session, so a worker that
    dies frees it within the session timeout.  ``self.retry()`` keeps it
    through the countdown; success, failure, rejection and revocation free it.

    Task options: ``mutex_keys`` (as for :class:`MutexTask`),
    ``mutex_timeout`` (seconds; default the ``MUTEX_TIMEOUT`` setting, else
    3600), and ``mutex_return_existing=True`` to get the queued or running
    copy's ``AsyncResult`` instead of the error (also a keyword of
    ``apply_async()``, for one call).
    """

    mutex_timeout: float | None = None
    mutex_return_existing: bool = False

    @classmethod
    def _check_options(cls) -> None:
        if getattr(cls, "mutex_max_leases", None) is not None:
            raise TypeError(f"task {cls.__dict__.get('name')}: an early mutex admits one copy "
                            "per key; mutex_max_leases is an option of MutexTask")  # fmt: skip
        if cls.mutex_timeout is not None:
            _check_seconds(f"task {cls.__dict__.get('name')}: mutex_timeout", cls.mutex_timeout)

    def apply_async(  # type: ignore[override]
        self, args: Any = None, kwargs: Any = None, task_id: str | None = None,
        producer: Any = None, link: Any = None, link_error: Any = None, shadow: str | None = None,
        *, mutex_return_existing: bool | None = None, **options: Any,
    ) -> Any:  # fmt: skip
        """Send the task unless a copy with the same key is queued or running.

        :param mutex_return_existing: return that copy's ``AsyncResult``
            instead of raising (default: the task's ``mutex_return_existing``).
        :raises AlreadyQueued: a copy with the same key is queued or running.

        The other parameters are ``celery.Task.apply_async``'s.
        """
        task_id = task_id or uuid.uuid4().hex
        lease = self._early_lease(args, kwargs, task_id)
        try:
            lease.reserve()
        except CoordinationError:
            with contextlib.suppress(ZKCeleryError):
                lease.unreserve()  # best effort: else it expires after mutex_timeout
            raise
        except AlreadyQueued as refused:
            self._refused(lease, refused)
            existing = mutex_return_existing
            if (self.mutex_return_existing if existing is None else existing) and refused.task_id:
                return self.AsyncResult(refused.task_id)
            raise
        try:
            return super().apply_async(args, kwargs, task_id, producer, link, link_error, shadow,
                                       **options)  # fmt: skip
        except BaseException:
            lease.unreserve()  # nothing was sent: the key is free again
            raise

    def _refused(self, lease: _EarlyLease, refused: AlreadyQueued) -> None:
        """A send was refused: tell receivers, and monitors that read task events.

        Where the app sends task events already (``task_send_sent_event``, which
        Flower and celery-exporter use to see tasks sent), the refused copy is
        announced as a ``task-rejected`` event under the id it would have had.
        """
        if early_refused.receivers:
            early_refused.send(sender=self, key=lease.key, task_id=refused.task_id,
                               state=refused.state)  # fmt: skip
        if not self.app.conf.task_send_sent_event:
            return
        try:
            with self.app.events.default_dispatcher() as dispatcher:
                dispatcher.send("task-rejected", uuid=lease._task_id(), name=self.name,
                                requeue=False, reason=str(refused),
                                holder=refused.task_id)  # fmt: skip
        except Exception as exc:  # a monitor's event must not change what the send does
            lease._log(logging.WARNING, "refusal not sent as a task event: %s", exc,
                       outcome="not_sent", error=str(exc))  # fmt: skip

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        lease = self._early_lease(args, kwargs, self.request.id)
        self._take(lease)
        self.request.zkcelery_early = lease  # for retry(), in this request only
        try:
            return super().__call__(*args, **kwargs)
        finally:
            lease.release()  # a no-op once retry() handed the key to the retried copy

    def retry(self, *args: Any, **kwargs: Any) -> Any:
        """``celery.Task.retry``, keeping the key for the retried copy through its countdown."""
        lease = getattr(self.request, "zkcelery_early", None)
        if lease:
            lease.requeue()  # before the retried copy is sent: it must find the key its own
        try:
            return super().retry(*args, **kwargs)
        except Retry:
            raise
        except BaseException:  # past max_retries: no copy follows, free the key
            if lease is not None:
                lease.unreserve()
            raise

    def _take(self, lease: _EarlyLease) -> None:
        """Take the key; running as this same task id, MutexTask's rule for a second delivery.

        That is _decide_mutex's rule without the broker's bound and without its
        back-off: still held after the wait, by any task, the copy goes back to the queue.
        """
        try:
            lease.acquire()
            return
        except CoordinationError as exc:  # never drop the task: retry it
            raise self.retry(exc=exc) from exc
        except AlreadyQueued as refused:
            holder = refused.holder or {}
            if refused.task_id != self.request.id or refused.state != "running":
                lease._log(logging.INFO, "is %s as task %s: rejected", refused.state,
                           refused.task_id, holder=refused.task_id,
                           outcome="rejected")  # fmt: skip
                self._refuse(lease, refused, mutex_rejected, holder, quiet=False)
        if _alive_here(holder):
            where = "in a live process here"
        elif lease.wait_for_holder(holder, _dead_for(holder, self.app)) != "released":
            with contextlib.suppress(AlreadyQueued):
                lease.acquire()
                return
            held = MutexHeld(f"early mutex {lease.key} is running as this same task", requeue=True)
            lease._log(logging.INFO, "is running as this same task past its session's "
                       "end: requeued", holder=self.request.id, outcome="requeued")  # fmt: skip
            self._refuse(lease, held, mutex_requeued, holder)
        else:
            where = "whose first delivery ran to its end"
        lease._log(logging.INFO, "is running as this same task %s: second delivery dropped",
                   where, holder=self.request.id, outcome="dropped")  # fmt: skip
        self._refuse(lease, Ignore(), mutex_dropped, holder, quiet=False)

    def _early_lease(self, args: Any, kwargs: Any, task_id: str | None) -> _EarlyLease:
        return _EarlyLease(self, _EARLY, self._mutex_values(args, kwargs), task_id=task_id)


# -- Task hooks (connected at the end of the module) --------------------------

_warned: set = set()


def _warn_duplicates(task: celery.Task, setting: str, seconds: Any) -> bool:
    """Whether ``seconds`` exceeds the Redis visibility_timeout (said once a task and setting)."""
    timeout = _redis_visibility_timeout(task.app)
    if timeout is None or not isinstance(seconds, (int, float)) or seconds <= timeout:
        return False
    if (task.name, setting) not in _warned:
        _warned.add((task.name, setting))
        _log(logging.WARNING, "task %s: %s (%g s) is longer than the Redis visibility_timeout "
             "(%g s, in broker_transport_options): Redis will deliver such a message again "
             "while the first delivery still waits or runs, so duplicates are certain; raise "
             "visibility_timeout above it", task.name, setting, seconds, timeout,
             task_name=task.name, outcome="duplicates_certain")  # fmt: skip
    return True


def _check_limits(sender: Any = None, **_: Any) -> None:
    """Before a zkcelery task runs: is a setting of it sure to make duplicates on Redis?"""
    if not isinstance(sender, (LockTask, MutexTask)) or (sender.name, "checked") in _warned:
        return
    _warned.add((sender.name, "checked"))
    if sender.acks_late:  # its message stays unacknowledged while the body runs
        for option, setting in (("time_limit", "task_time_limit"),
                                ("soft_time_limit", "task_soft_time_limit")):  # fmt: skip
            limit = getattr(sender, option, None) or sender.app.conf.get(setting)
            if _warn_duplicates(sender, f"{option} ({setting})", limit):
                break
    if isinstance(sender, MutexTask):
        delay = sender.default_retry_delay
        _warn_duplicates(sender, "default_retry_delay (its retry countdown)", delay)


def _release_after_run(task: Any = None, **_: Any) -> None:
    """A MutexTask run that retried keeps its mutex until Celery stored its state: free it."""
    lease = getattr(getattr(task, "request", None), "zkcelery_mutex", None)
    if lease:
        lease.release()


def _check_retry(sender: Any = None, reason: Any = None, **_: Any) -> None:
    """A zkcelery task retries: a countdown past the visibility timeout means duplicates."""
    if not isinstance(sender, (LockTask, MutexTask)):
        return
    when = getattr(reason, "when", None)
    if isinstance(when, datetime):  # naive or aware, as Celery was given it
        when = (when - datetime.now(when.tzinfo)).total_seconds()
    _warn_duplicates(sender, "the retry countdown", when)


def _free_revoked(sender: Any = None, request: Any = None, **_: Any) -> None:
    """A revoked EarlyMutexTask message frees the key it holds while queued.

    This runs in the worker's main process, which must keep no session (its
    pool children are forked from it): a short-lived one is used and closed.
    """
    if not isinstance(sender, EarlyMutexTask) or request is None:
        return
    lease = sender._early_lease(request.args, request.kwargs, request.id)
    with _revocation_session(sender.app) as session:
        lease.free_revoked(session)


# ---------------------------------------------------------------------------
# The companions: zkcelery_beat and zkcelery_metrics, imported when asked for
# ---------------------------------------------------------------------------
#
# What runs beside the workers lives in modules of their own, which import
# zkcelery (its public names only): never the other way round at import time,
# so that zkcelery.py copied alone gives every task-side feature.

#: The names zkcelery still answers for its companions: companion (zkcelery_<it>) -> names.
_COMPANIONS = {"beat": ("ElectedScheduler", "EarlyMutexScheduler", "Election", "skipped_tick"),
               "metrics": ("start_metrics_server", "TreeView")}  # fmt: skip


def _companion(module: str, what: str) -> types.ModuleType:
    """The companion ``module``, or a ConfigurationError saying how to get it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name != module:
            raise
        raise ConfigurationError(
            f"{what} needs {module}.py, zkcelery's companion module, which is not installed: "
            f"copy {module}.py beside zkcelery.py, or pip install zkcelery"
        ) from None


def __getattr__(name: str) -> Any:
    """_COMPANIONS' names as they were (``-S zkcelery.ElectedScheduler``), imported when asked."""
    companion = next((it for it, names in _COMPANIONS.items() if name in names), None)
    if companion is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(_companion(f"zkcelery_{companion}", f"zkcelery.{name}"), name)


def open_session(app: celery.Celery, shared: bool = False) -> _Session:
    """A ZooKeeper session for ``app``, connecting: one of its own, for a companion that follows
    the tree (zkcelery_metrics.TreeView), or with ``shared=True`` the process's one its leases
    use (zkcelery_beat.Election's).  ``.client`` is its KazooClient, ``.settings`` its
    ZOOKEEPER_* settings (``.root`` behind the chroot, ``.hosts``...), ``.session_id`` its id;
    ``.read(client.get_async, path)`` and ``.call(...)`` send a request as zkcelery does,
    ``.wait_connected()`` raises CoordinationError past ZOOKEEPER_CONNECT_TIMEOUT, and
    ``.close()`` ends one of its own (close_session the shared one)."""
    return _connection(app) if shared else _Session(_read_settings(app))


def close_session(app: celery.Celery) -> None:
    """End the process's shared session for ``app`` at once: the nodes of its leases go with it,
    a lease waiting in it raises CoordinationError, and the next lease opens another."""
    session = _connections.get(app)
    if session is not None:
        _close_connection(app, session)


def _metrics_asked(app: celery.Celery, setting: str) -> types.ModuleType | None:
    """zkcelery_metrics where ``setting`` (a metrics port) is set, else None; when it is
    set and the module is missing, one ERROR line and None: the process runs on."""
    if _setting(app, setting) is None:
        return None
    try:
        return _companion("zkcelery_metrics", setting)
    except ConfigurationError as exc:
        _log(logging.ERROR, "metrics not served: %s", exc, outcome="metrics_not_served",
             error=str(exc))  # fmt: skip
        return None


def _worker_starts(sender: Any = None, instance: Any = None, **_: Any) -> None:
    """``celery worker``, set up (its logging too) and before its pool forks: note what the
    pool processes must know, and serve metrics if ZOOKEEPER_METRICS_PORT is set."""
    _worker.sends_events = bool(getattr(instance, "task_events", False))
    metrics = _metrics_asked(instance.app, "ZOOKEEPER_METRICS_PORT")
    if metrics is not None:
        metrics.serve_worker_metrics(instance.app, instance.pool_cls)


def _beat_starts(sender: Any = None, **_: Any) -> None:
    """At a beat's start: serve metrics if ZOOKEEPER_BEAT_METRICS_PORT is set."""
    metrics = _metrics_asked(sender.app, "ZOOKEEPER_BEAT_METRICS_PORT")
    if metrics is not None:
        metrics.serve_beat_metrics(sender.app)


# ---------------------------------------------------------------------------
# Command line: python -m zkcelery, or celery -A proj zk
# ---------------------------------------------------------------------------


def _remember(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    """Keep ``-A``, ``--hosts`` or ``--root`` in ``ctx.meta``, which every context of the
    command line shares: given before the subcommand or after it, it names the same app."""
    if value is not None:
        ctx.meta[f"zkcelery.{param.name}"] = value


def _resolve(ctx: click.Context) -> celery.Celery:
    """The app the command line names: ``-A``'s, else the one ``celery -A proj zk`` gives in
    ``ctx.obj``, else a bare one; with ``--hosts`` and ``--root`` over its own settings."""
    app = getattr(ctx.obj, "app", None)
    if ctx.meta.get("zkcelery.app_name"):
        from celery.app.utils import find_app

        app = find_app(ctx.meta["zkcelery.app_name"])
    if app is None:
        app = celery.Celery("zkcelery", set_as_current=False)
    for option, name in (("hosts", "ZOOKEEPER_HOSTS"), ("root", "ZOOKEEPER_ROOT")):
        if ctx.meta.get(f"zkcelery.{option}"):
            app.conf[name] = ctx.meta[f"zkcelery.{option}"]
    return app


def _target_options(command: Callable) -> Callable:
    """``-A``, ``--hosts`` and ``--root``, before the subcommand or after it, as people type."""
    options = [
        click.option("-A", "--app", "app_name", expose_value=False, callback=_remember,
                     help="The Celery app whose settings to use (as celery -A)."),
        click.option("--hosts", expose_value=False, callback=_remember,
                     help="ZooKeeper hosts, instead of the app's ZOOKEEPER_HOSTS."),
        click.option("--root", expose_value=False, callback=_remember,
                     help="The root znode, instead of the app's ZOOKEEPER_ROOT."),
    ]  # fmt: skip
    for option in reversed(options):
        command = option(command)
    return command


def app_command(command: Callable) -> Callable:
    """Make the click command ``command`` one of ``zkcelery``'s (``celery -A proj zk``): it
    takes ``-A``, ``--hosts`` and ``--root``, is called with the Celery app they name (made
    once all are read) as its first argument, and a zkcelery, kazoo or OS error ends it in
    one line, exit 1.  Every subcommand is made with it, the companions' (``exporter``) too."""

    @click.pass_context
    @functools.wraps(command)
    def with_app(ctx: click.Context, *args: Any, **kwargs: Any) -> Any:
        try:
            return command(_resolve(ctx), *args, **kwargs)
        except (ZKCeleryError, KazooException, OSError) as exc:
            # No quorum, a bad setting, a port in use: one line, exit 1.
            raise click.ClickException(str(exc) or type(exc).__name__) from None

    return _target_options(with_app)


def _fail(message: str, **_: Any) -> NoReturn:
    raise click.ClickException(message)


class _Commands(click.Group):
    """zk's subcommands; ``exporter`` is zkcelery_metrics's, imported when it is named."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self.commands, "exporter"})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name == "exporter" and cmd_name not in self.commands:
            try:
                self.add_command(_companion("zkcelery_metrics", "The exporter").exporter_command)
            except ConfigurationError as exc:
                return click.Command(cmd_name, help=str(exc), callback=functools.partial(
                    _fail, str(exc)), context_settings={"ignore_unknown_options": True,
                    "allow_extra_args": True})  # fmt: skip
        return super().get_command(ctx, cmd_name)


def ls_table(rows: list[dict]) -> str:
    """``ls``'s table of ``rows`` (:func:`ls_rows`'), as text: for ``ls --watch``."""
    if not rows:
        return "no locks are held"
    lines = [f"{'KIND':11} {'STATE':7} {'AGE':>8}  {'HOLDER':42} {'HOST':16} {'PID':>7}  KEY"]
    for row in rows:
        holder = row["task"] if row["task_id"] is None else f"{row['task']}[{row['task_id']}]"
        lines.append(
            f"{row['kind']:11} {row['state']:7} {row['age']:>7.1f}s  {holder:42.42} "
            f"{row['host']:16.16} {row['pid']!s:>7}  {row['key']}"
        )
    return "\n".join(lines)


def _break(session: _Session, row: dict) -> bool:
    """Break the holder ``row`` (``ls``'s): False if it changed since.  Waiters stay: the
    first in line is granted the lock, as after any release."""
    namespace = f"{session.settings.root}/{row['namespace']}"
    return session.deletes.break_node(namespace, row["path"], row["czxid"])


def _describe(row: dict) -> str:
    return f"{row['kind']} {row['key']}: {row['state']} by {row['task']}[{row['task_id']}]"


def _protection_holds(session: _Session, settings: _Settings) -> bool:
    """Print whether ZOOKEEPER_AUTH protects the tree: False when it is set and does not."""
    if settings.auth is None:
        click.echo(
            f"ZOOKEEPER_AUTH is not set: any client may break the locks under {settings.root}"
        )
        return True
    problems = _unprotected(session)
    for problem in problems:
        click.echo(f"NOT PROTECTED: {problem}")
    if problems:
        return False
    user = settings.auth[1].split(":")[0]
    click.echo(f"protected: only {user!r} may create or delete under {settings.root}")
    return True


def _secure(session: _Session, acl: list[ACL]) -> int:
    """Set ``acl`` on every node that guards the locks; print and count the changes."""
    session.tree.make()
    changed = 0
    for path in _protecting_nodes(session):
        try:
            current, _ = session.read(session.client.get_acls_async, path)
            if sorted(current) == sorted(acl):
                continue
            try:
                session.call(session.client.set_acls_async, path, acl)
            except AccessDenied as exc:
                raise AccessDenied(str(exc), path) from None
        except NoNodeError:
            continue  # a container reaped meanwhile
        changed += 1
        click.echo(f"secured {path}: {_acl_text(current)} -> {_acl_text(acl)}")
    return changed


@click.command(
    name="secure", help="Give the tree zkcelery relies on to ZOOKEEPER_AUTH's identity alone."
)
@app_command
def _secure_command(app: celery.Celery) -> None:
    settings = _read_settings(app)
    acl = _default_acl(settings)
    if acl is None:
        raise click.ClickException("set ZOOKEEPER_AUTH = 'digest:user:secret' first")
    session = _connection(app)
    try:
        changed = _secure(session, acl)
    except AccessDenied as exc:
        raise click.ClickException(
            f"cannot change the ACL of {exc.args[1] if len(exc.args) > 1 else settings.root}: "
            f"{exc.args[0]}. Its owner, or a ZooKeeper superuser, must run this."
        ) from None
    click.echo(f"{changed} node(s) changed; {settings.root} is protected")


def ls_rows(
    root: str, children: _Children, node: Callable[[str], tuple[bytes, ZnodeStat] | None]
) -> list[dict]:
    """Every holder and waiter under ``root``, with its metadata, age and state: ls's rows.

    The tree is seen through ``children`` (a node's children's names) and
    ``node`` (a node's data and stat, None if it is gone): from the session for
    ``ls`` and ``rm``, from zkcelery_metrics's TreeView for the exporter and
    ``ls --watch``, which thus show the same rows.
    """
    rows = []
    now = time.time()
    for namespace in _NAMESPACES.values():
        parent = f"{root}/{namespace.name}"
        for key_node, path, state in namespace.protocol.listed(parent, children):
            found = node(path)
            if found is None:
                continue  # released since the walk saw it
            data, stat = found
            if not stat.ephemeralOwner and namespace.name != _EARLY:
                continue  # a limited mutex's container that its last holder left
            meta = json.loads(data or b"{}")
            if namespace.name == _EARLY:
                state = meta.get("state", state)  # queued or running
            kind = namespace.kind
            if namespace.name == _RWLOCKS:
                kind = _ReadWriteLock.kind_of(path)  # its node's name says which
            rows.append({
                "kind": kind, "namespace": namespace.name, "state": state,
                "key": meta.get("key", key_node),
                "node": key_node, "path": path, "task": meta.get("task"),
                "task_id": meta.get("task_id"), "identifier": meta.get("identifier"),
                "host": meta.get("host"), "pid": meta.get("pid"),
                "age": round(now - stat.ctime / 1000, 3), "czxid": stat.czxid,
            })  # fmt: skip
    return rows


def _listing(session: _Session) -> list[dict]:
    """Every holder and waiter under the root, read through ``session`` (see ls_rows)."""

    def node(path: str) -> tuple[bytes, ZnodeStat] | None:
        try:
            return session.read(session.client.get_async, path)  # type: ignore[no-any-return]
        except NoNodeError:
            return None

    return ls_rows(session.settings.root, _read_children(session), node)


@click.command(
    name="ls",
    help="List every held lock, semaphore and mutex, and who waits for it. With --watch, "
    "list them again at each change (at most every 0.2 s) until Ctrl-C: from a cache fed "
    "by ZooKeeper watches, so that an update costs no listing of the whole tree. On a "
    "terminal the screen is cleared before each; otherwise each comes after a blank line "
    "and a timestamp (with --json, one JSON document per line, and none while the view is "
    "not in sync with ZooKeeper).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON, for scripts.")
@click.option("--watch", is_flag=True, help="List again at each change, until Ctrl-C.")
@app_command
def _ls_command(app: celery.Celery, as_json: bool, watch: bool) -> None:
    if watch:
        _companion("zkcelery_metrics", "ls --watch").ls_watch(app, as_json)
    else:
        rows = _listing(_connection(app))
        click.echo(json.dumps(rows, indent=2) if as_json else ls_table(rows))


@click.command(name="rm", help="Break the lock whose key (as ls shows it) is KEY.")
@click.argument("key")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@app_command
def _rm_command(app: celery.Celery, key: str, yes: bool) -> None:
    conn = _connection(app)
    rows = [row for row in _listing(conn) if key in (row["key"], row["node"])]
    if not rows:
        raise click.ClickException(f"no lock, semaphore or mutex has the key {key!r}")
    held = [row for row in rows if row["state"] != "waiting"]
    for row in held:
        click.echo(f"{_describe(row)} on {row['host']} pid {row['pid']} for {row['age']:.1f}s")
    if len(held) < len(rows):
        click.echo(f"{len(rows) - len(held)} waiting: they stay in line, the first is served next")
    if not held:
        return
    if not yes:
        click.confirm("Break it? The holder, if alive, sees lease.lost", abort=True)
    for row in held:
        if _break(conn, row):
            click.echo(f"broke {_describe(row)}")
        else:
            click.echo(f"left {_describe(row)}: released or taken again since it was listed")


def _server_mode(server: str, timeout: float) -> tuple[str, float]:
    """One server's mode (leader, follower...) from its ``srvr`` command, and the time taken."""
    host, _, port = server.rpartition(":")
    started = time.monotonic()
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as sock:
            sock.sendall(b"srvr")
            answer = b""
            while chunk := sock.recv(4096):
                answer += chunk
    except OSError as exc:
        return f"down ({exc.strerror or exc})", time.monotonic() - started
    took = time.monotonic() - started
    match = re.search(rb"Mode: (\S+)", answer)
    return (match.group(1).decode() if match else "not serving"), took


def _quorum_serves(settings: _Settings) -> bool:
    """Print each server's mode and round trip; whether a quorum of them serves."""
    servers = settings.hosts.split(",")
    serving = 0
    for server in servers:
        mode, took = _server_mode(server, settings.connect_timeout)
        serving += mode in ("leader", "follower", "standalone")
        click.echo(f"{server:24} {mode:12} {took * 1000:7.1f} ms")
    quorum = serving > len(servers) // 2
    click.echo(
        f"{serving} of {len(servers)} servers serving: {'quorum' if quorum else 'NO QUORUM'}"
    )
    return quorum


@click.command(
    name="check",
    help="Report each server's mode and round trip, and whether ZOOKEEPER_AUTH protects the "
    "tree; exit 1 without quorum or when it does not.",
)
@app_command
def _check_command(app: celery.Celery) -> None:
    settings = _read_settings(app)
    if not _quorum_serves(settings):
        sys.exit(1)
    session = _connection(app)
    started = time.monotonic()
    session.call(session.client.exists_async, "/")
    click.echo(f"session round trip {(time.monotonic() - started) * 1000:.1f} ms")
    if not _protection_holds(session, settings):
        sys.exit(1)


# The group of `zkcelery` and `celery zk` (Celery finds it through the celery.commands
# entry point), with its subcommands, and exporter, zkcelery_metrics's (_Commands).
@click.group(
    name="zk",
    cls=_Commands,
    help="See and break zkcelery's locks; check the ZooKeeper ensemble.",
    commands=[_ls_command, _rm_command, _check_command, _secure_command],
)
@_target_options
def zk_command() -> None:
    if _kazoo_logger.level == logging.NOTSET:
        # kazoo warns at every failed connection attempt; a command says it once, as an error.
        _kazoo_logger.setLevel(logging.ERROR)


def main(prog_name: str = "zkcelery") -> None:
    """The ``zkcelery`` command (and ``python -m zkcelery``)."""
    zk_command(prog_name=prog_name)


# ---------------------------------------------------------------------------
# Celery hooks and import-time side effects: all of them, here
# ---------------------------------------------------------------------------
#
# Importing zkcelery changes nothing else: every signal it listens to, the two
# logging filters it installs and the at-fork hook are connected here, once.

# MutexTask's rejections are logged in one line: drop Celery's own record of them.
logging.getLogger("celery.app.trace").addFilter(_QuietRejections())
# kazoo logs its requests at DEBUG, the credentials and a session's password too.
_kazoo_logger.addFilter(_HiddenAuth())
# A setting sure to make duplicates on a Redis broker is named before it does.
signals.task_prerun.connect(_check_limits, weak=False)
signals.task_retry.connect(_check_retry, weak=False)
# A MutexTask run that retried frees its mutex once its RETRY state is stored.
signals.task_postrun.connect(_release_after_run, weak=False)
# A revoked EarlyMutexTask message frees the key it holds while queued.
signals.task_revoked.connect(_free_revoked, weak=False)
# A forked child never uses its parent's sessions; a worker that shuts down
# closes its own, so that the locks they hold are freed at once.
os.register_at_fork(after_in_child=_forget_inherited)
signals.worker_process_shutdown.connect(_close_all, weak=False)
signals.worker_shutdown.connect(_close_all, weak=False)
# Metrics, where the settings ask for them (zkcelery_metrics is imported then).
signals.celeryd_after_setup.connect(_worker_starts, weak=False)
signals.beat_init.connect(_beat_starts, weak=False)

if __name__ == "__main__":
    # The module's copy runs the command, not this __main__ one: the companions
    # import zkcelery, and must share its objects (the command line's context).
    import zkcelery

    zkcelery.main("python -m zkcelery")
