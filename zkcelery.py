"""Distributed locks, semaphores and mutexes for Celery tasks, held in ZooKeeper.

A guarded section never runs twice at once, and a lock whose holder dies is
freed by ZooKeeper when the holder's session expires: no lock outlives a
crashed worker, and no lock is ever held by two tasks.

Connection handling
===================

Every process keeps one ZooKeeper session per Celery app, opened at first use
and shared by all tasks (and threads) of that process.  A forked child never
uses its parent's session; worker shutdown closes the session so that its
locks are freed at once.  The settings are read from the Celery
configuration, in upper case, lower case, or ``CELERY_`` namespaced (Django)
spellings:

=============================  ==================  ===================================
setting                        default             meaning
=============================  ==================  ===================================
``ZOOKEEPER_HOSTS``            ``127.0.0.1:2181``  comma-separated ``host:port`` list
                                                   (``[::1]:2183`` for IPv6, optional
                                                   ``/chroot`` suffix), or a list
``ZOOKEEPER_SESSION_TIMEOUT``  ``10`` s            how long after a crash a held
                                                   lock is freed
``ZOOKEEPER_CONNECT_TIMEOUT``  ``5`` s             longest wait for a connection
                                                   before ``CoordinationError``
``ZOOKEEPER_ROOT``             ``/zkcelery``       the znode everything lives under
``ZOOKEEPER_AUTH``             none                ``'digest:user:secret'``: only that
                                                   identity may change or delete
                                                   the module's znodes
``ZOOKEEPER_PROTECT_READS``    ``False``           with ``ZOOKEEPER_AUTH``, others may
                                                   not read holder metadata either
``ZOOKEEPER_SSL``              none                ``True``, or a dict of kazoo's
                                                   ``ca``, ``certfile``, ``keyfile``,
                                                   ``verify_certs``...
=============================  ==================  ===================================

Locking
=======

:class:`LockTask` gives a bound task the context managers ``self.lock()`` and
``self.semaphore()``.  A lock admits one holder; a semaphore admits
``max_leases``.  Both are non-blocking by default and yield a :class:`Lease`
that is truthy when it was acquired; the body runs either way::

    import zkcelery

    @app.task(base=zkcelery.LockTask, bind=True)
    def locking_task(self, data):
        with self.lock() as lock_acquired:
            if lock_acquired:
                do_work(data)

The lock's name is the task's name; positional values refine it, so that
``self.lock(a)`` only excludes tasks locking the same ``a``.  With
``retry=True`` a lock that is not acquired retries the task (``self.retry``)
from the ``with`` statement itself, and the body does not run; any other
keyword goes to ``self.retry``::

    @app.task(base=zkcelery.LockTask, bind=True)
    def refined(self, a, data):
        with self.lock(a, retry=True, countdown=10, max_retries=1):
            do_work(data)

``blocking=True`` waits for the lock instead (``timeout=`` seconds at most,
then the lease is falsy); it forces ``retry=False``.  A semaphore takes
``max_leases``::

    @app.task(base=zkcelery.LockTask, bind=True)
    def limited(self, tenant, data):
        with self.semaphore(tenant, max_leases=3) as acquired:
            if acquired:
                do_work(data)

``identifier='name'`` replaces the task name in the lock's name, so that
different tasks can share one lock.

Mutex
=====

:class:`MutexTask` runs the whole task body under a mutex named after the
task and, with ``mutex_keys``, the values of those arguments.  When the mutex
is held elsewhere the task raises :class:`celery.exceptions.Reject` and ends
(Celery records it as a failure).  With ``mutex_requeue=True`` the message is
requeued instead: the task turns ``acks_late`` on (without it Celery has
already acknowledged the message and a requeue would lose it), and a copy
that finds the mutex held first waits until it is freed (and then runs) or
for a growing delay (0.25 s doubling up to 8 s) before it is requeued, so
that requeued copies do not spin::

    @app.task(base=zkcelery.MutexTask, bind=True, mutex_keys=('server_name',))
    def per_server(self, server_name, data):
        do_work(data)

Operations
==========

``python -m zkcelery ls`` lists every held lock, semaphore and mutex with its
holders; ``rm KEY`` breaks one; ``check`` reports the ensemble's health.  They
read the app's settings with ``-A proj`` (or run as ``celery -A proj zk``), or
take ``--hosts`` and ``--root``.

Faults
======

If ZooKeeper cannot be reached within ``ZOOKEEPER_CONNECT_TIMEOUT``,
``lock()`` and ``semaphore()`` raise :class:`CoordinationError` (or retry the
task with ``retry=True``) and ``MutexTask`` retries the task.  If the session
is lost while a lease is held, ``lease.lost`` turns true and a warning is
logged; the body is not interrupted.  Long-running bodies that write to shared
storage should check ``lease.lost`` or pass ``lease.token`` (a fencing token)
to the storage.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import os
import re
import socket
import sys
import threading
import time
import uuid
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from typing import Any, Callable, NoReturn
from urllib.parse import quote

import celery
import click
from celery import signals
from celery.exceptions import Ignore, Reject
from kazoo.client import KazooClient
from kazoo.exceptions import (
    AuthFailedError,
    ConnectionClosedError,
    ConnectionLoss,
    KazooException,
    NoAuthError,
    NodeExistsError,
    NoNodeError,
    SessionExpiredError,
)
from kazoo.handlers.threading import SequentialThreadingHandler
from kazoo.protocol.states import KazooState, ZnodeStat
from kazoo.retry import KazooRetry
from kazoo.security import make_acl, make_digest_acl

__all__ = [
    "ConfigurationError",
    "CoordinationError",
    "Lease",
    "LockTask",
    "MutexTask",
    "ZKCeleryError",
]

logger = logging.getLogger("zkcelery")


class ZKCeleryError(Exception):
    """Base of the errors raised by zkcelery."""


class CoordinationError(ZKCeleryError):
    """ZooKeeper could not be reached in time, or the session was lost while acquiring."""


class ConfigurationError(ZKCeleryError, ValueError):
    """A ``ZOOKEEPER_*`` setting is malformed."""


class _ConnectionLost(CoordinationError):
    """The connection dropped while a request was in flight: it may or may not have applied."""


# ---------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------


class LockTask(celery.Task):
    """Task base offering ``self.lock()`` and ``self.semaphore()``; use with ``bind=True``."""

    def lock(
        self,
        *values: Any,
        blocking: bool = False,
        timeout: float | None = None,
        retry: bool = False,
        identifier: str | None = None,
        **retry_options: Any,
    ) -> Lease:
        """A lock on this task's name refined by ``values``: one holder at a time."""
        return Lease(
            self, _LOCKS, values, None, blocking, timeout, retry, identifier, retry_options
        )

    def semaphore(
        self,
        *values: Any,
        max_leases: int = 1,
        blocking: bool = False,
        timeout: float | None = None,
        retry: bool = False,
        identifier: str | None = None,
        **retry_options: Any,
    ) -> Lease:
        """A semaphore on this task's name refined by ``values``: ``max_leases`` holders."""
        return Lease(
            self, _SEMAPHORES, values, max_leases, blocking, timeout, retry, identifier,
            retry_options,
        )  # fmt: skip


class MutexTask(celery.Task):
    """Task base whose whole body runs under a mutex; contention raises ``Reject``.

    Task options: ``mutex_keys`` names the arguments whose values refine the
    mutex; ``mutex_requeue=True`` requeues a rejected task instead of failing it
    (and turns on ``acks_late`` and, unless the task sets it, ``reject_on_worker_lost``).
    """

    mutex_keys: Sequence[str] = ()
    mutex_requeue: bool = False
    _mutex_signature: inspect.Signature | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # Celery builds a task's class when the task is defined (or when a lazy
        # app finalizes): check the options now, before any message arrives.
        super().__init_subclass__(**kwargs)
        run = cls.__dict__.get("run")
        if run is None:  # an intermediate base class, not a task
            return
        cls._mutex_signature = _check_mutex_options(cls, run)
        if cls.mutex_requeue:
            cls.acks_late = True
            # Without it, Celery acknowledges the message of a pool process that
            # dies in the body (SIGKILL, the OOM killer) and the task is lost.
            if not any("reject_on_worker_lost" in vars(k) for k in cls.__mro__[:-1]
                       if issubclass(k, MutexTask)):  # fmt: skip
                cls.reject_on_worker_lost = True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        started = time.monotonic()
        lease = Lease(self, _MUTEXES, self._mutex_values(args, kwargs))
        self._take(lease)
        if not lease:
            self._contended(lease, started)  # returns holding the mutex, or raises
        try:
            return super().__call__(*args, **kwargs)
        finally:
            lease.release()

    def _take(self, lease: Lease) -> None:
        try:
            lease.acquire()
        except CoordinationError as exc:  # never drop the task: retry it
            logger.warning(
                "task %s[%s]: mutex not acquired: %s; retrying the task",
                self.name, self.request.id, exc,
            )  # fmt: skip
            raise self.retry(exc=exc) from exc

    def _mutex_values(self, args: tuple, kwargs: dict) -> tuple:
        if not self.mutex_keys or self._mutex_signature is None:
            return ()
        bound = self._mutex_signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return tuple(bound.arguments[key] for key in self.mutex_keys)

    def _contended(self, lease: Lease, started: float) -> None:
        """The mutex is held: wait and take it, or raise ``Reject`` / ``Ignore``."""
        holder = _holder(lease)
        if self.request.id is not None and holder.get("task_id") == self.request.id:
            holder = self._held_by_itself(lease, holder, started)
            if lease:
                return
        if self.mutex_requeue:
            # Back off before the requeue, so that copies do not spin while a
            # long holder runs; if the holder leaves meanwhile, take it now.
            wanted = _requeue_delay(self.request.id)
            lease.wait_for_release(_unacked_wait(self.app, started, wanted))
            self._take(lease)
            if lease:
                return
            holder = _holder(lease)
        self._reject(lease, holder, requeue=bool(self.mutex_requeue))

    def _held_by_itself(self, lease: Lease, holder: dict, started: float) -> dict:
        """This task id holds its own mutex: this message is a second delivery of it.

        Either its first delivery is still running (Redis restored its message
        after ``visibility_timeout``, or RabbitMQ redelivered it after losing the
        worker's connection): then this copy is dropped, neither run nor
        requeued.  Or the process that ran it died, and Celery requeued its
        message (``reject_on_worker_lost``): its session ends within the session
        timeout, and then this copy takes the mutex and runs.  Returns the
        holder after waiting, unless it took the mutex or dropped the message.
        """
        alive = _process_alive(holder)
        if alive:
            self._drop(lease, holder, "its first delivery runs on")
        # Dead, or on another host: a dead holder's node goes within the session
        # timeout, a live one stays.  Wait that long (when the broker lets us).
        wanted = _read_settings(self.app).session_timeout + 1.0
        wait = _unacked_wait(self.app, started, wanted)
        logger.info(
            "task %s[%s]: mutex %s is held by this same task (%s %s pid %s): waiting up to "
            "%.1f s for that session to end",
            self.name, self.request.id, _mutex_key(lease, holder),
            "a dead process, on" if alive is False else "on", holder.get("host"),
            holder.get("pid"), wait,
        )  # fmt: skip
        lease.wait_for_release(wait)
        self._take(lease)
        if lease:
            return holder
        now = _holder(lease)
        if now.get("task_id") != self.request.id:
            return now  # the dead holder's session ended and another task took it
        if wait >= wanted and alive is None:
            # It held on for a whole session timeout: its session, and so its
            # first delivery, is alive elsewhere.
            self._drop(lease, now, "its first delivery still holds it, on")
        # Its process is gone but its session has not ended yet within what the
        # broker lets this message wait: back to the queue, to find it free later.
        self._reject(lease, now, requeue=True)

    def _drop(self, lease: Lease, holder: dict, why: str) -> NoReturn:
        """Acknowledge this message without running the body: another delivery runs it."""
        logger.info(
            "task %s[%s]: mutex %s is held by this same task (%s %s pid %s): "
            "a second delivery of its message; dropped",
            self.name, self.request.id, _mutex_key(lease, holder), why,
            holder.get("host"), holder.get("pid"),
        )  # fmt: skip
        _quiet_in_celery_log(self.request.id)
        raise Ignore()

    def _reject(self, lease: Lease, holder: dict, requeue: bool) -> NoReturn:
        key = _mutex_key(lease, holder)
        holder_id = holder.get("task_id")
        logger.info(
            "task %s[%s]: mutex %s is held by %s; rejected and %s",
            self.name, self.request.id, key,
            f"task {holder_id}" if holder_id else "another holder",
            "requeued" if requeue else "dropped",
        )  # fmt: skip
        _quiet_in_celery_log(self.request.id)
        raise Reject(f"mutex {key} is held by another task", requeue=requeue)


def _holder(lease: Lease) -> dict:
    """The metadata of the mutex's holder, or ``{}`` (released meanwhile, or unreadable)."""
    try:
        holders = lease.holders()
    except ZKCeleryError:
        return {}
    return holders[0] if holders else {}


def _mutex_key(lease: Lease, holder: dict) -> str:
    return str(holder.get("key") or getattr(lease, "key", None) or "")


def _process_alive(holder: dict) -> bool | None:
    """Whether the holder's process is alive: None when it is not on this host.

    Only a "True" is acted on at once (a copy is dropped), so it errs towards
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
        except ProcessLookupError:
            return False
        except OSError:
            pass
        return True
    except OSError:
        return None
    fields = stat[stat.rindex(b")") + 2 :].split()  # from field 3, the state, on
    if fields[0] in (b"Z", b"X"):
        return False
    acquired = holder.get("acquired")
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/stat", "rb") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith(b"btime "))
        began = boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime
        if isinstance(acquired, (int, float)) and began > acquired + 1.0:
            return False
    return True


#: zkcelery's own waits keep a message unacknowledged for at most this share of
#: the Redis ``visibility_timeout``, after which Redis would deliver it again.
_VISIBILITY_SHARE = 0.25
_visibility: weakref.WeakKeyDictionary[celery.Celery, float | None] = weakref.WeakKeyDictionary()


def _redis_visibility_timeout(app: celery.Celery) -> float | None:
    """The app's Redis ``visibility_timeout`` in seconds; None when the broker is not Redis."""
    try:
        return _visibility[app]
    except KeyError:
        pass
    seconds: float | None = None
    with contextlib.suppress(Exception):  # an unusable broker URL is Celery's to report
        conn = app.connection_for_read()
        try:
            transport = conn.get_transport_cls()
        finally:
            conn.release()
        if getattr(transport, "driver_type", None) == "redis":
            default = getattr(getattr(transport, "Channel", None), "visibility_timeout", 3600)
            options = app.conf.broker_transport_options or {}
            seconds = float(options.get("visibility_timeout", default))
    _visibility[app] = seconds
    return seconds


def _unacked_wait(app: celery.Celery, started: float, wanted: float) -> float:
    """How long a task that started at ``started`` may wait now, at most ``wanted``."""
    timeout = _redis_visibility_timeout(app)
    if timeout is None:
        return wanted
    left = timeout * _VISIBILITY_SHARE - (time.monotonic() - started)
    return max(0.0, min(wanted, left))


_quiet_ids: set = set()


def _quiet_in_celery_log(task_id: Any) -> None:
    """zkcelery has logged this rejection in one line: Celery need not log it again."""
    if len(_quiet_ids) > 1000:  # Celery did not log some: forget them
        _quiet_ids.clear()
    _quiet_ids.add(task_id)


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


logging.getLogger("celery.app.trace").addFilter(_QuietRejections())

_warned: set = set()


def _warn_duplicates(task: celery.Task, setting: str, seconds: float, timeout: float) -> None:
    """Say once per process and task that Redis will deliver its messages twice."""
    if (task.name, setting) in _warned:
        return
    _warned.add((task.name, setting))
    logger.warning(
        "task %s: %s (%g s) is longer than the Redis visibility_timeout (%g s, in "
        "broker_transport_options): Redis will deliver such a message again while the "
        "first delivery still waits or runs, so duplicates are certain; raise "
        "visibility_timeout above it",
        task.name, setting, seconds, timeout,
    )  # fmt: skip


def _check_limits(sender: Any = None, **_: Any) -> None:
    """Before a zkcelery task runs: is a setting of it sure to make duplicates on Redis?"""
    if not isinstance(sender, (LockTask, MutexTask)) or (sender.name, "checked") in _warned:
        return
    _warned.add((sender.name, "checked"))
    timeout = _redis_visibility_timeout(sender.app)
    if timeout is None:
        return
    conf = sender.app.conf
    if sender.acks_late:  # its message stays unacknowledged while the body runs
        for option, setting in (("time_limit", "task_time_limit"),
                                ("soft_time_limit", "task_soft_time_limit")):  # fmt: skip
            limit = getattr(sender, option, None) or conf.get(setting)
            if isinstance(limit, (int, float)) and limit > timeout:
                _warn_duplicates(sender, f"{option} ({setting})", limit, timeout)
                break
    delay = sender.default_retry_delay
    if isinstance(sender, MutexTask) and isinstance(delay, (int, float)) and delay > timeout:
        _warn_duplicates(sender, "default_retry_delay (its retry countdown)", delay, timeout)


def _check_retry(sender: Any = None, reason: Any = None, **_: Any) -> None:
    """A zkcelery task retries: a countdown past the visibility timeout means duplicates."""
    if not isinstance(sender, (LockTask, MutexTask)):
        return
    when = getattr(reason, "when", None)
    if isinstance(when, datetime):
        now = datetime.now(when.tzinfo) if when.tzinfo else datetime.now()
        when = (when - now).total_seconds()
    timeout = _redis_visibility_timeout(sender.app)
    if timeout is not None and isinstance(when, (int, float)) and when > timeout:
        _warn_duplicates(sender, "the retry countdown", when, timeout)


signals.task_prerun.connect(_check_limits, weak=False)
signals.task_retry.connect(_check_retry, weak=False)


# ---------------------------------------------------------------------------
# Leases: the one lock primitive behind lock(), semaphore() and MutexTask
# ---------------------------------------------------------------------------
#
# Znode layout, under ZOOKEEPER_ROOT (three persistent nodes, made once per
# process; nothing else is ever persistent):
#
#   /zkcelery/locks/<name>                  one ephemeral node: the holder
#   /zkcelery/mutexes/<name>                likewise, for MutexTask
#   /zkcelery/semaphores/<name>@<max>@<guid>@0000000042
#                                           one ephemeral-sequential node per
#                                           holder or waiter
#
# <name> is the lock's name (the task name and its refining values) encoded
# by _lock_name() into one znode name that holds none of the characters "@"
# or "#" unless it is digested.  Every node carries its holder's metadata as
# JSON, so "who holds it" costs no extra node.
#
# A lock or mutex is exclusive by path: acquiring is one create (the floor of
# a lock: one quorum write), failing is one failed create, releasing is one
# delete.  There is no per-key parent, so nothing is left behind however many
# distinct keys are used (kazoo's Lock leaves one persistent node per key).
# A waiter watches the node and tries again when it is deleted.
#
# A semaphore holder creates a sequential node under the shared parent, then
# lists the parent: it holds a lease when fewer than <max> nodes of the same
# name have a lower sequence number.  That is one write, one read and, to
# release, one delete.  <max> travels in the node name so that holders that
# disagree on it are found by the same read; <guid> lets a holder recognise
# its own node after a create whose answer was lost with the connection (the
# orphan kazoo issue #732 describes).  A waiter watches the parent's children.
#
# The fencing token is the holder node's creation zxid: ZooKeeper's global
# transaction id, so it strictly increases with every grant of any lock.

_LOCKS, _SEMAPHORES, _MUTEXES = "locks", "semaphores", "mutexes"
_KIND = {_LOCKS: "lock", _SEMAPHORES: "semaphore", _MUTEXES: "mutex"}
_SEP = "@"  # separates the parts of a semaphore node name; never in a name
_SEQ_DIGITS = 10  # ZooKeeper appends a 10-digit counter to sequential nodes


def _semaphore_node(child: str) -> tuple[str, int]:
    """A semaphore node's lock name and max_leases, from ``<name>@<max>@<guid>@<seq>``."""
    name, max_leases, _, _ = child.rsplit(_SEP, 3)
    return name, int(max_leases)


class Lease:
    """A claim on a lock, semaphore or mutex, yielded by ``lock()`` / ``semaphore()``.

    Truthy while it is held.  ``token`` is a fencing token (an integer that
    strictly increases with every grant of the lock), ``lost`` turns true once
    the lock may be held by someone else, ``suspended`` while the connection
    to ZooKeeper is down, and ``holders()`` lists who holds the lock now.
    """

    def __init__(
        self,
        task: celery.Task,
        namespace: str,
        values: Sequence[Any],
        max_leases: int | None = None,
        blocking: bool = False,
        timeout: float | None = None,
        retry: bool = False,
        identifier: str | None = None,
        retry_options: dict | None = None,
    ) -> None:
        _check_wait(blocking, timeout)
        if max_leases is not None:
            _check_max_leases(max_leases)
        if retry_options and not retry:
            raise TypeError(
                f"{sorted(retry_options)} are options of self.retry(): they need retry=True"
            )
        base = task.name if identifier is None else identifier
        if not isinstance(base, str) or not base:
            raise TypeError(f"identifier must be a non-empty str, not {base!r}")
        self.name = _lock_name(base, values)
        self.key = _readable_key(base, values)
        self._task = task
        self._namespace = namespace
        self._max_leases = max_leases
        self._blocking = bool(blocking)
        self._timeout = timeout
        self._retry = bool(retry) and not blocking
        self._retry_options = retry_options or {}
        self._conn: _Connection | None = None
        self._path: str | None = None
        self._session: int | None = None
        self._lost = False
        self._broken = False  # our node was deleted from outside: never delete it again
        self._thread = 0
        self.token: int | None = None

    # -- the public view ---------------------------------------------------

    def __bool__(self) -> bool:
        return self._path is not None

    def __repr__(self) -> str:
        state = "held" if self else "not held"
        return f"<Lease {self._namespace} {self.key} {state} token={self.token}>"

    @property
    def lost(self) -> bool:
        """True once the lock may be held by someone else (sticky).

        That is when the session is known to be lost, when the connection has
        been down for about the session timeout, or when the lock's node was
        deleted from outside (``python -m zkcelery rm``): the last costs one
        read per look while the session is sound.
        """
        if not self._lost and self._path is not None and self._conn is not None:
            if self._session_lost():
                self._mark_lost("the ZooKeeper session expired or the connection is down")
            elif self._conn.broken(self._path, self.token):
                self._broken = True
                self._conn._forget(self._path, self)  # let others in this process try it
                self._mark_lost("its znode was deleted from outside")
        return self._lost

    @property
    def _kind(self) -> str:
        return _KIND[self._namespace]

    def _mark_lost(self, why: str) -> None:
        self._lost = True
        self._log(logging.WARNING, "lost: %s; another task may hold it now", why)

    def _log(self, level: int, what: str, *args: Any) -> None:
        """Log a line naming the task, its id, and this lease's kind and key."""
        logger.log(
            level, f"task %s[%s]: %s %s {what}",
            self._task.name, self._task_id(), self._kind, self.key, *args,
        )  # fmt: skip

    def _session_lost(self) -> bool:
        assert self._conn is not None
        return self._conn.session_lost_since(self._session)

    @property
    def suspended(self) -> bool:
        """True while the connection is down and the lease is in doubt."""
        return self._path is not None and self._conn is not None and self._conn.suspended

    def holders(self) -> list[dict]:
        """The metadata of every current holder of this lock (task id, host, pid...)."""
        conn = self._connect()
        return [meta for _, meta in conn.holders(self._namespace, self.name)]

    # -- context manager -----------------------------------------------------

    def __enter__(self) -> Lease:
        try:
            self.acquire()
        except CoordinationError as exc:
            if not self._retry:
                self._log(logging.WARNING, "not acquired: %s", exc)
                raise
            self._log(logging.WARNING, "not acquired: %s; retrying the task", exc)
            raise self._task.retry(**{"exc": exc, **self._retry_options}) from exc
        if not self and self._retry:
            self._log(logging.INFO, "is held; retrying the task")
            raise self._task.retry(**self._retry_options)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.release()

    # -- acquire and release -----------------------------------------------

    def acquire(self) -> bool:
        """Try to take the lease (waiting if blocking); return whether it is held."""
        if self:
            raise ZKCeleryError(f"{self!r} is already held")
        conn = self._connect()
        self._thread = threading.get_ident()
        deadline = None
        if self._blocking and self._timeout is not None:
            deadline = time.monotonic() + self._timeout
        data = self._metadata(conn)
        if self._max_leases is None:
            held = conn.acquire_exclusive(self, data, self._blocking, deadline)
        else:
            held = conn.acquire_counted(self, data, self._max_leases, self._blocking, deadline)
        if not held:
            self._log(logging.DEBUG, "is held elsewhere")
        return held

    def release(self) -> None:
        """Give the lease back; a no-op when it is not held or its session is gone."""
        path, conn = self._path, self._conn
        if path is None or conn is None:
            return
        self._path = None
        if self._broken:  # the node at ``path`` may be another holder's now
            return
        conn.release(self, path)

    def wait_for_release(self, seconds: float) -> None:
        """Wait until the (exclusive) lock this lease failed to take is freed, or ``seconds``."""
        if self._conn is not None:
            # Only a courtesy: if ZooKeeper is away, the next acquire says so.
            with contextlib.suppress(CoordinationError):
                self._conn.wait_deleted(self._node_path(), time.monotonic() + seconds)

    # -- helpers for _Connection ---------------------------------------------

    def _connect(self) -> _Connection:
        if self._conn is None:
            self._conn = _connection(self._task.app)
        return self._conn

    def _node_path(self) -> str:
        assert self._conn is not None
        return f"{self._conn.settings.root}/{self._namespace}/{self.name}"

    def _task_id(self) -> str | None:
        return getattr(self._task.request, "id", None)

    def _metadata(self, conn: _Connection) -> bytes:
        meta = {
            "task_id": self._task_id(),
            "task": self._task.name,
            "host": conn.hostname,
            "pid": os.getpid(),
            "acquired": time.time(),
            "key": self.key,
        }
        if self._max_leases is not None:
            meta["max_leases"] = self._max_leases
        return json.dumps(meta).encode()

    def _granted(self, path: str, stat: ZnodeStat) -> bool:
        # The node's own stat says which session owns it and when it was made.
        self._path, self._session, self.token = path, stat.ephemeralOwner, stat.czxid
        self._lost = False
        return True


# ---------------------------------------------------------------------------
# Lock names
# ---------------------------------------------------------------------------

_NAME_LIMIT = 240  # longer names keep a readable prefix and end in a digest
_PREFIX_KEPT = 160


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


def _readable_key(base: str, values: Sequence[Any]) -> str:
    shown = ", ".join(_short_repr(v) for v in values)
    return f"{base}({shown})"


def _short_repr(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


# ---------------------------------------------------------------------------
# Settings
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


def _setting(app: celery.Celery, name: str, default: Any = None) -> Any:
    # Celery aliases upper and lower case for its own settings only.
    for key in (name, name.lower(), f"CELERY_{name}"):
        value = app.conf.get(key)
        if value is not None:
            return value
    return default


def _read_settings(app: celery.Celery) -> _Settings:
    hosts, chroot = _parse_hosts(_setting(app, "ZOOKEEPER_HOSTS", _DEFAULT_HOSTS))
    root = _parse_root(_setting(app, "ZOOKEEPER_ROOT", "/zkcelery"))
    auth = _parse_auth(_setting(app, "ZOOKEEPER_AUTH"))
    return _Settings(
        hosts=hosts,
        root=chroot + root,
        session_timeout=_parse_seconds(app, "ZOOKEEPER_SESSION_TIMEOUT", 10.0),
        connect_timeout=_parse_seconds(app, "ZOOKEEPER_CONNECT_TIMEOUT", 5.0),
        auth=auth,
        protect_reads=_parse_flag(app, "ZOOKEEPER_PROTECT_READS"),
        ssl=_parse_ssl(_setting(app, "ZOOKEEPER_SSL")),
    )


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


def _parse_host(entry: str, whole: Any) -> str:
    entry = entry.strip()
    if not entry:
        raise ConfigurationError(f"ZOOKEEPER_HOSTS {whole!r} has an empty entry")
    match = _HOST_RE.fullmatch(entry)
    if match is None:
        raise ConfigurationError(f"ZOOKEEPER_HOSTS: {entry!r} is not host:port")
    host = match["ip6"] or match["host"]
    port = match["p6"] if match["ip6"] else match["port"]
    if port is None:
        port = "2181"
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


def _parse_seconds(app: celery.Celery, name: str, default: float) -> float:
    value = _setting(app, name, default)
    try:
        if isinstance(value, bool):
            raise ValueError
        seconds = float(value)
    except (TypeError, ValueError):
        raise ConfigurationError(f"{name} must be a number of seconds, not {value!r}") from None
    if not seconds > 0 or seconds == float("inf"):
        raise ConfigurationError(f"{name} must be a positive number of seconds, not {value!r}")
    return seconds


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


def _check_wait(blocking: Any, timeout: Any) -> None:
    if timeout is None:
        return
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout must be a number of seconds or None, not {timeout!r}")
    if not timeout >= 0:
        raise ValueError(f"timeout must be 0 or more seconds, not {timeout!r}")
    if not blocking:
        raise ValueError(f"timeout={timeout!r} has no effect without blocking=True")


def _check_max_leases(max_leases: Any) -> None:
    if isinstance(max_leases, bool) or not isinstance(max_leases, int):
        raise TypeError(f"max_leases must be an int, not {max_leases!r}")
    if max_leases < 1:
        raise ValueError(f"max_leases must be 1 or more, not {max_leases!r}")


def _check_mutex_options(cls: type[MutexTask], run: Any) -> inspect.Signature:
    task = cls.__dict__.get("name") or cls.__name__
    keys = cls.mutex_keys
    if isinstance(keys, str) or not all(isinstance(key, str) for key in keys):
        raise TypeError(
            f"task {task}: mutex_keys must be a tuple of parameter names, not {keys!r}"
            + (f" (did you mean ({keys!r},)?)" if isinstance(keys, str) else "")
        )
    if cls.mutex_requeue and cls.__dict__.get("acks_late") is False:
        raise ValueError(
            f"task {task}: mutex_requeue=True needs acks_late (Celery only requeues a "
            "rejected message it has not acknowledged yet); remove acks_late=False"
        )
    bound = not isinstance(run, staticmethod)
    function = run.__func__ if isinstance(run, staticmethod) else run
    signature = inspect.signature(function)
    if bound:  # bind=True: drop ``self``
        params = list(signature.parameters.values())[1:]
        signature = signature.replace(parameters=params)
    named = {
        p.name
        for p in signature.parameters.values()
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }
    for key in keys:
        if key not in named:
            raise TypeError(
                f"task {task}: mutex_keys names {key!r}, which is not a parameter of the "
                f"task (its parameters: {', '.join(sorted(named)) or 'none'})"
            )
    return signature


_rejections: dict[Any, int] = {}


def _requeue_delay(task_id: Any) -> float:
    # Process-local and bounded: a requeued copy may land on another process,
    # which only makes it start again from the shortest delay.
    count = _rejections.pop(task_id, 0)
    if len(_rejections) > 1000:
        _rejections.pop(next(iter(_rejections)))
    _rejections[task_id] = count + 1
    return min(8.0, 0.25 * 2**count)


# ---------------------------------------------------------------------------
# The connection: one kazoo client per process and app
# ---------------------------------------------------------------------------

_RECOVERABLE = (ConnectionLoss, SessionExpiredError, ConnectionClosedError)
#: A lease is called lost this fraction of the session timeout after the
#: connection is seen down: a little under the third that is left, at most,
#: before ZooKeeper may expire the session (see session_lost_since).
_LOST_AFTER_SUSPENDED = 0.25


class _Connection:
    """One ZooKeeper session and what this process holds in it."""

    def __init__(self, settings: _Settings) -> None:
        self.settings = settings
        self.pid = os.getpid()
        self.hostname = socket.gethostname()
        self.client = _make_client(settings)
        self.handler = self.client.handler
        self._timeout_error = self.handler.timeout_exception
        self._live = self.handler.event_object()
        self._suspended_at: float | None = None
        self._lost_after = settings.session_timeout * _LOST_AFTER_SUSPENDED
        self._mutex = threading.Lock()
        self._held: dict[str, Lease] = {}  # path -> lease, for this process
        self._orphans: dict[str, int | None] = {}  # path -> session, to delete on reconnect
        self._ready = False  # the namespace nodes exist
        self.client.add_listener(self._on_state)
        self.client.start_async()

    # -- state -------------------------------------------------------------

    @property
    def session(self) -> int | None:
        client_id = self.client.client_id
        return client_id[0] if client_id else None

    @property
    def suspended(self) -> bool:
        return self._suspended_at is not None

    def session_lost_since(self, session: int | None) -> bool:
        """Whether a lease taken in ``session`` may now be held by someone else.

        kazoo notices a silent connection up to 2/3 of the session timeout
        after it broke (a ping every third, dropped when one goes unanswered),
        and reports LOST only once it reconnects, when ZooKeeper may long have
        deleted the node.  Counting _LOST_AFTER_SUSPENDED of the timeout from
        the suspension keeps "lost" within one session timeout of the break.
        """
        if self._live.is_set() and self.session != session:
            return True
        since = self._suspended_at
        return since is not None and time.monotonic() - since >= self._lost_after

    def _on_state(self, state: str) -> None:
        # Runs on kazoo's connection thread: never block here.
        if state == KazooState.CONNECTED:
            self._suspended_at = None
            self._live.set()
            if self._orphans:
                self.handler.spawn(self._reap_orphans)
            self.handler.spawn(self._report_lost)
            return
        self._live.clear()
        if state == KazooState.SUSPENDED:
            self._suspended_at = time.monotonic()
            self.handler.spawn(self._warn_when_lost, self._suspended_at)
        else:  # LOST: the session is gone, and so is every node it held
            self._suspended_at = (
                self._suspended_at or time.monotonic() - self.settings.session_timeout
            )
            self._orphans.clear()
            self.handler.spawn(self._report_lost)

    def _warn_when_lost(self, suspended_at: float) -> None:
        self.handler.sleep_func(self._lost_after)
        if self._suspended_at == suspended_at:
            self._report_lost()

    def _report_lost(self) -> None:
        with self._mutex:
            leases = list(self._held.values())
        for lease in leases:
            if lease and not lease._lost and lease._session_lost():  # granted ones only
                lease._mark_lost("the ZooKeeper session expired or the connection is down")

    def broken(self, path: str, token: int | None) -> bool:
        """Whether our node at ``path`` was deleted or replaced behind our back."""
        if not self._live.is_set():
            return False  # cannot tell; the session's fate decides
        try:
            stat = self.call(self.client.exists_async, path)
        except (ZKCeleryError, KazooException, self._timeout_error):
            return False
        return stat is None or stat.czxid != token

    def wait_connected(self, deadline: float | None = None) -> None:
        limit = self.settings.connect_timeout
        if deadline is not None:
            limit = max(0.0, min(limit, deadline - time.monotonic()))
        if not self._live.wait(limit) and not self._live.is_set():
            raise CoordinationError(
                f"ZooKeeper at {self.settings.hosts} did not answer within {limit:.3g} s "
                "(ZOOKEEPER_CONNECT_TIMEOUT)"
            )

    # -- requests ------------------------------------------------------------

    def call(
        self,
        method: Callable,
        *args: Any,
        deadline: float | None = None,
        abandon: Callable | None = None,
        **kwargs: Any,
    ) -> Any:
        """One request, waiting for a connection and an answer at most the connect timeout.

        A request that times out may still be applied later: ``abandon`` is
        then called with its result, whenever that comes.
        """
        self.wait_connected(deadline)
        result = method(*args, **kwargs)
        limit = self.settings.connect_timeout
        if deadline is not None:
            limit = max(0.001, min(limit, deadline - time.monotonic()))
        try:
            return result.get(timeout=limit)
        except (NoAuthError, AuthFailedError) as exc:
            raise ZKCeleryError(
                f"ZooKeeper refused access ({type(exc).__name__}): the znodes under "
                f"{self.settings.root} belong to another identity; check ZOOKEEPER_AUTH"
            ) from None
        except _RECOVERABLE as exc:
            raise _ConnectionLost(f"connection to ZooKeeper lost ({type(exc).__name__})") from exc
        except self._timeout_error:
            if abandon is not None:
                result.rawlink(abandon)
            raise CoordinationError(f"ZooKeeper did not answer within {limit:.3g} s") from None

    def read(self, method: Callable, *args: Any, **kwargs: Any) -> Any:
        """A read, asked again on the next connection if the first drops (a leader change)."""
        deadline = time.monotonic() + self.settings.connect_timeout
        while True:
            try:
                return self.call(method, *args, deadline=deadline, **kwargs)
            except _ConnectionLost:
                if time.monotonic() >= deadline:
                    raise

    def _delete_late(self, result: Any) -> None:
        # Runs on kazoo's callback thread: send, never wait.
        if result.successful():
            self.client.delete_async(result.value[0])

    def _ensure_namespaces(self) -> None:
        if self._ready:
            return
        root = self.settings.root
        for path in (root, *(f"{root}/{ns}" for ns in (_LOCKS, _SEMAPHORES, _MUTEXES))):
            with contextlib.suppress(NodeExistsError):
                self.call(self.client.create_async, path, makepath=True)
        self._ready = True

    def _create(self, path: str, data: bytes, sequence: bool = False) -> tuple[str, ZnodeStat]:
        self._ensure_namespaces()
        try:
            return self._create_once(path, data, sequence)
        except NoNodeError:  # someone removed a namespace node: make it again
            self._ready = False
            self._ensure_namespaces()
            return self._create_once(path, data, sequence)

    def _create_once(self, path: str, data: bytes, sequence: bool) -> tuple[str, ZnodeStat]:
        return self.call(
            self.client.create_async, path, data, abandon=self._delete_late,
            ephemeral=True, sequence=sequence, include_data=True,
        )  # fmt: skip

    # -- exclusive: locks and mutexes ----------------------------------------

    def acquire_exclusive(
        self, lease: Lease, data: bytes, blocking: bool, deadline: float | None
    ) -> bool:
        path = lease._node_path()
        while True:
            with self._mutex:
                holder = self._held.get(path)
                if holder is None:
                    self._held[path] = lease
            if holder is not None:  # held in this process: no request needed
                if blocking and deadline is None and holder._thread == lease._thread:
                    raise ZKCeleryError(
                        f"{lease.key} is already held by this thread and locks are not "
                        "reentrant: blocking without a timeout would wait forever"
                    )
            elif self._try_create(lease, path, data):
                return True
            if not blocking or not self.wait_deleted(path, deadline):
                return False
            if deadline is not None and time.monotonic() >= deadline:
                return False  # the node may be gone while a local holder is still making it

    def _try_create(self, lease: Lease, path: str, data: bytes) -> bool:
        """One create of the lock's node, ``lease`` being registered as this process's taker."""
        session = self.session
        granted = False
        try:
            try:
                created, stat = self._create(path, data)
            except NodeExistsError:
                return False
            except _ConnectionLost as exc:
                # The create may have been applied before the answer was lost.
                found = self._recover_exclusive(path, session, exc)
                if found is None:
                    return False
                created, stat = path, found
            granted = lease._granted(created, stat)
            return granted
        finally:
            # Whatever happened, a lease that did not get the lock must not stay
            # registered: this process would refuse the lock to itself forever,
            # and the reaper would spare the orphan it left in ZooKeeper.
            if not granted:
                self._forget(path, lease)

    def _recover_exclusive(
        self, path: str, session: int | None, exc: Exception
    ) -> ZnodeStat | None:
        try:
            self.wait_connected()
            if self.session != session:
                return None  # a new session: whatever we made is gone
            stat = self.read(self.client.exists_async, path)
        except CoordinationError as again:
            self._orphans[path] = session
            raise CoordinationError(f"connection lost while acquiring: {again}") from exc
        if stat is not None and stat.ephemeralOwner == session:
            return stat
        return None

    def _forget(self, path: str, lease: Lease) -> None:
        with self._mutex:
            if self._held.get(path) is lease:
                del self._held[path]

    def wait_deleted(self, path: str, deadline: float | None) -> bool:
        """Wait until ``path`` is gone (or the connection changes); False at the deadline."""
        event = self.handler.event_object()
        try:
            stat = self.call(self.client.exists_async, path, watch=_setter(event))
        except _ConnectionLost:
            return True  # the connection changed: look again
        if stat is None:
            return True
        return self._wait(event, deadline)

    def _wait(self, event: Any, deadline: float | None) -> bool:
        if deadline is None:
            event.wait()
            return True
        remaining = deadline - time.monotonic()
        return remaining > 0 and (event.wait(remaining) or event.is_set())

    # -- counted: semaphores ---------------------------------------------------

    def acquire_counted(
        self, lease: Lease, data: bytes, max_leases: int, blocking: bool, deadline: float | None
    ) -> bool:
        parent = f"{self.settings.root}/{_SEMAPHORES}"
        prefix = _SEP.join((lease.name, str(max_leases), uuid.uuid4().hex[:16], ""))
        session = self.session
        try:
            path, stat = self._create(f"{parent}/{prefix}", data, sequence=True)
        except _ConnectionLost as exc:
            found = self._recover_counted(parent, prefix, session, exc)
            if found is None:
                return False
            path, stat = found
        node = path.rsplit("/", 1)[1]
        granted = False
        try:
            while True:
                event = self.handler.event_object()
                watch = _setter(event) if blocking else None
                if self._rank(parent, lease, node, max_leases, watch) < max_leases:
                    granted = lease._granted(path, stat)
                    with self._mutex:
                        self._held[path] = lease
                    return True
                if not blocking or not self._wait(event, deadline):
                    return False
        finally:
            if not granted:  # a waiter that gives up, or fails, leaves no node behind
                self._delete_own(path, stat.czxid, stat.ephemeralOwner)

    def _rank(self, parent: str, lease: Lease, node: str, max_leases: int, watch: Any) -> int:
        """Our node's place among the nodes of the same semaphore (max_leases if it is gone)."""
        siblings, others = [], set()
        for child in self.read(self.client.get_children_async, parent, watch=watch):
            name, limit = _semaphore_node(child)
            if name == lease.name:
                siblings.append(child)
                if limit != max_leases:
                    others.add(limit)
        if others:
            raise ZKCeleryError(
                f"semaphore {lease.key}: max_leases={max_leases} here, but other holders "
                f"use max_leases={sorted(others)}; all holders of one semaphore must agree"
            )
        order = sorted(siblings, key=lambda child: child[-_SEQ_DIGITS:])
        return order.index(node) if node in order else max_leases

    def _recover_counted(
        self, parent: str, prefix: str, session: int | None, exc: Exception
    ) -> tuple[str, ZnodeStat] | None:
        try:
            self.wait_connected()
            if self.session != session:
                return None
            for child in self.read(self.client.get_children_async, parent):
                if child.startswith(prefix):
                    path = f"{parent}/{child}"
                    stat = self.read(self.client.exists_async, path)
                    return (path, stat) if stat is not None else None
        except CoordinationError as again:
            self._orphans[f"{parent}/{prefix}"] = session
            raise CoordinationError(f"connection lost while acquiring: {again}") from exc
        return None

    # -- release ----------------------------------------------------------------

    def release(self, lease: Lease, path: str) -> None:
        self._forget(path, lease)
        token, session = lease.token, lease._session
        try:
            self._delete_own(path, token, session)
        except CoordinationError as exc:
            lease._log(
                logging.WARNING,
                "not released (%s); ZooKeeper frees it when the session ends, or this "
                "process deletes it when it reconnects",
                exc,
            )

    def _delete_own(self, path: str, token: int | None, session: int | None) -> None:
        """Delete our node at ``path``, never another session's, within the connect timeout.

        kazoo's own retry never gives up, so a release during a partition would
        hang until the network healed; here the whole release has one deadline.
        """
        deadline = time.monotonic() + self.settings.connect_timeout
        first = True
        while True:
            try:
                self.wait_connected(deadline)
                if self.session != session:
                    return  # the session ended: the node is gone with it
                if not first:
                    # The last delete may have been applied and the lock taken
                    # again since: only delete the node we created.
                    stat = self.call(self.client.exists_async, path, deadline=deadline)
                    if stat is None or stat.czxid != token:
                        return
                first = False
                self.call(self.client.delete_async, path, deadline=deadline)
                return
            except NoNodeError:
                return
            except _ConnectionLost:
                if time.monotonic() < deadline:
                    continue  # ask again on the next connection
                self._orphans[path] = session
                raise
            except CoordinationError:  # no connection in time: delete it on reconnect
                self._orphans[path] = session
                raise

    def _reap_orphans(self) -> None:
        """Delete the nodes that a release or acquire had to leave behind."""
        session = self.session
        for path, owner in list(self._orphans.items()):
            self._orphans.pop(path, None)
            if owner != session:
                continue
            try:
                parent, name = path.rsplit("/", 1)
                if name.endswith(_SEP):  # a semaphore node known by its prefix
                    targets = [
                        f"{parent}/{c}"
                        for c in self.call(self.client.get_children_async, parent)
                        if c.startswith(name)
                    ]
                else:
                    targets = [path]
                for target in targets:
                    with self._mutex:
                        if target in self._held:
                            continue
                    stat = self.call(self.client.exists_async, target)
                    if stat is not None and stat.ephemeralOwner == session:
                        self.call(self.client.delete_async, target)
            except (ZKCeleryError, KazooException, self._timeout_error) as exc:
                logger.warning("could not delete orphan znode %s: %s", path, exc)
                self._orphans.setdefault(path, owner)

    # -- reading ---------------------------------------------------------------

    def holders(self, namespace: str, name: str) -> list[tuple[str, dict]]:
        parent = f"{self.settings.root}/{namespace}"
        if namespace == _SEMAPHORES:
            children = self.read(self.client.get_children_async, parent)
            paths = [f"{parent}/{c}" for c in children if _semaphore_node(c)[0] == name]
        else:
            paths = [f"{parent}/{name}"]
        found = []
        for path in paths:
            try:
                data, _ = self.read(self.client.get_async, path)
            except NoNodeError:
                continue
            found.append((path, json.loads(data or b"{}")))
        return found

    def close(self) -> None:
        """End the session (its ephemeral nodes go at once) without hanging."""
        stopper = threading.Thread(target=_stop_quietly, args=(self.client,), daemon=True)
        stopper.start()
        stopper.join(self.settings.connect_timeout)


def _setter(event: Any) -> Callable[[Any], None]:
    """A watch callback that sets ``event`` (whatever the watch reports)."""
    return lambda _: event.set()


def _stop_quietly(client: KazooClient) -> None:
    with contextlib.suppress(Exception):
        client.stop()
        client.close()


def _make_client(settings: _Settings) -> KazooClient:
    options: dict[str, Any] = dict(settings.ssl)
    if settings.auth is not None:
        scheme, credential = settings.auth
        options["auth_data"] = [(scheme, credential)]
        if scheme == "digest":
            # Only this identity may change or delete what zkcelery creates;
            # others may read (list holders) unless reads are protected too.
            user, password = credential.split(":", 1)
            acl = [make_digest_acl(user, password, all=True)]
            if not settings.protect_reads:
                acl.append(make_acl("world", "anyone", read=True))
            options["default_acl"] = acl
    handler = _pick_handler()
    # Reconnect forever in the background, quickly: a lease waits for the
    # connection at most ZOOKEEPER_CONNECT_TIMEOUT, and ZooKeeper coming back
    # must not need a restart.  Commands are never retried by kazoo (its
    # default retry never gives up); _Connection bounds every call.  kazoo
    # insists that the retry sleeps as the handler does (eventlet's differs).
    retry = KazooRetry(
        max_tries=-1, delay=0.05, backoff=2, max_delay=1.0, sleep_func=handler.sleep_func
    )
    return KazooClient(
        hosts=settings.hosts,
        timeout=settings.session_timeout,
        connection_retry=retry,
        handler=handler,
        **options,
    )


def _pick_handler() -> Any:
    """kazoo's handler matching the process's monkey-patching (gevent, eventlet).

    Only a patched process can use them, and importing them imports gevent or
    eventlet: look at the patch state of what is already imported, lazily.
    """
    if "gevent.monkey" in sys.modules and sys.modules["gevent.monkey"].is_module_patched("socket"):
        from kazoo.handlers.gevent import SequentialGeventHandler

        return SequentialGeventHandler()
    if "eventlet.patcher" in sys.modules and sys.modules["eventlet.patcher"].is_monkey_patched(
        "socket"
    ):
        from kazoo.handlers.eventlet import SequentialEventletHandler

        return SequentialEventletHandler()
    return SequentialThreadingHandler()


# One connection per process and app.  A child inherits the dict on fork but
# must never use what is in it: an inherited kazoo client has no threads, so
# its calls hang and its stop() blocks.  The at-fork hook and the pid check
# both drop it unused.
_connections: weakref.WeakKeyDictionary[celery.Celery, _Connection] = weakref.WeakKeyDictionary()
_connections_lock = threading.Lock()


def _connection(app: celery.Celery) -> _Connection:
    conn = _connections.get(app)
    if conn is not None and conn.pid == os.getpid():
        return conn
    with _connections_lock:
        conn = _connections.get(app)
        if conn is None or conn.pid != os.getpid():
            conn = _connections[app] = _Connection(_read_settings(app))
        return conn


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


os.register_at_fork(after_in_child=_forget_inherited)
signals.worker_process_shutdown.connect(_close_all, weak=False)
signals.worker_shutdown.connect(_close_all, weak=False)


# ---------------------------------------------------------------------------
# Command line: python -m zkcelery, or celery -A proj zk
# ---------------------------------------------------------------------------


@click.group(name="zk", help="See and break zkcelery's locks; check the ZooKeeper ensemble.")
@click.option(
    "-A", "--app", "app_name", help="The Celery app whose settings to use (as celery -A)."
)
@click.option("--hosts", help="ZooKeeper hosts, instead of the app's ZOOKEEPER_HOSTS.")
@click.option("--root", help="The root znode, instead of the app's ZOOKEEPER_ROOT.")
@click.pass_context
def zk_command(
    ctx: click.Context, app_name: str | None, hosts: str | None, root: str | None
) -> None:
    app = getattr(ctx.obj, "app", None)  # given by `celery -A proj zk`
    if app_name:
        from celery.app.utils import find_app

        app = find_app(app_name)
    if app is None:
        app = celery.Celery("zkcelery", set_as_current=False)
    if hosts:
        app.conf.ZOOKEEPER_HOSTS = hosts
    if root:
        app.conf.ZOOKEEPER_ROOT = root
    ctx.obj = app


@zk_command.command(name="ls", help="List every held lock, semaphore and mutex.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON, for scripts.")
@click.pass_obj
def _ls_command(app: celery.Celery, as_json: bool) -> None:
    rows = _listing(_connection(app))
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no locks are held")
        return
    click.echo(f"{'KIND':9} {'STATE':7} {'AGE':>8}  {'HOLDER':42} {'HOST':16} {'PID':>7}  KEY")
    for row in rows:
        holder = f"{row['task']}[{row['task_id']}]"
        click.echo(
            f"{row['kind']:9} {row['state']:7} {row['age']:>7.1f}s  {holder:42.42} "
            f"{row['host']:16.16} {row['pid']!s:>7}  {row['key']}"
        )


@zk_command.command(name="rm", help="Break the lock whose key (as ls shows it) is KEY.")
@click.argument("key")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_obj
def _rm_command(app: celery.Celery, key: str, yes: bool) -> None:
    conn = _connection(app)
    rows = [row for row in _listing(conn) if key in (row["key"], row["node"])]
    if not rows:
        raise click.ClickException(f"no lock, semaphore or mutex has the key {key!r}")
    for row in rows:
        click.echo(f"{row['kind']} {row['key']}: held by {row['task']}[{row['task_id']}] "
                   f"on {row['host']} pid {row['pid']} for {row['age']:.1f}s")  # fmt: skip
    if not yes:
        click.confirm("Break it? The holder, if alive, sees lease.lost", abort=True)
    for row in rows:
        with contextlib.suppress(NoNodeError):
            conn.call(conn.client.delete_async, row["path"])
        click.echo(f"broke {row['kind']} {row['key']} held by {row['task']}[{row['task_id']}]")


@zk_command.command(
    name="check", help="Report each server's mode and round trip; exit 1 without quorum."
)
@click.pass_obj
def _check_command(app: celery.Celery) -> None:
    settings = _read_settings(app)
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
    if quorum:
        conn = _connection(app)
        started = time.monotonic()
        conn.call(conn.client.exists_async, "/")
        click.echo(f"session round trip {(time.monotonic() - started) * 1000:.1f} ms")
    else:
        sys.exit(1)


def _listing(conn: _Connection) -> list[dict]:
    """Every node under the root, with its holder's metadata, age and state."""
    rows = []
    now = time.time()
    for namespace in (_LOCKS, _MUTEXES, _SEMAPHORES):
        parent = f"{conn.settings.root}/{namespace}"
        try:
            children = conn.call(conn.client.get_children_async, parent)
        except NoNodeError:
            continue
        ranks: dict[str, list[str]] = {}  # a semaphore's nodes, by its name
        for child in children if namespace == _SEMAPHORES else ():
            ranks.setdefault(_semaphore_node(child)[0], []).append(child)
        for child in children:
            try:
                data, stat = conn.call(conn.client.get_async, f"{parent}/{child}")
            except NoNodeError:
                continue
            meta = json.loads(data or b"{}")
            state = "held"
            if namespace == _SEMAPHORES:
                name, limit = _semaphore_node(child)
                order = sorted(ranks[name], key=lambda c: c[-_SEQ_DIGITS:])
                state = "held" if order.index(child) < limit else "waiting"
            rows.append({
                "kind": _KIND[namespace], "state": state, "key": meta.get("key", child),
                "node": child, "path": f"{parent}/{child}", "task": meta.get("task"),
                "task_id": meta.get("task_id"), "host": meta.get("host"),
                "pid": meta.get("pid"), "age": round(now - stat.ctime / 1000, 3),
            })  # fmt: skip
    return rows


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


def main() -> None:
    """``python -m zkcelery``."""
    zk_command(prog_name="python -m zkcelery")


if __name__ == "__main__":
    main()
