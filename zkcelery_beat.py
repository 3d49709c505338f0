"""zkcelery's beat schedulers: zkcelery's companion for what runs in ``celery beat``.

    celery -A proj beat -S zkcelery_beat.ElectedScheduler

runs beat on every host, with ZooKeeper electing the one that sends
(``-S zkcelery.ElectedScheduler``, the older spelling, names the same class).
Every beat process competes for one :class:`Election`, named after the app's
main name, in the ``beat`` namespace of the protocol map; the holder leads and
sends, the others stand by in line and send nothing.  The leader keeps the
schedule's state in one node (_BeatState), whose version-checked writes fence
every send.  README.md, "Beat on every host", is the manual.
:class:`EarlyMutexScheduler` is Celery's one-host beat, skipping the ticks an
:class:`zkcelery.EarlyMutexTask` refuses (:func:`skipped_tick`).

This module runs beside the workers, not in them: it imports only zkcelery's
public names, and a copy of ``zkcelery.py`` alone still gives every task-side
feature.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import traceback
from datetime import datetime, timedelta
from typing import Any, Callable

import celery
from celery.beat import PersistentScheduler, ScheduleEntry, Scheduler, SchedulingError
from kazoo.exceptions import NodeExistsError, NoNodeError

import zkcelery
from zkcelery import AlreadyQueued, ConfigurationError, NotLeading, StaleVersion, ZKCeleryError

__all__ = ["EarlyMutexScheduler", "ElectedScheduler", "Election", "skipped_tick"]

_beat_logger = logging.getLogger("celery.beat")  # where Celery's beat logs its sends


_logger = logging.getLogger("zkcelery")


def _log(level: int, msg: str, *args: Any, **facts: Any) -> None:
    """As zkcelery logs: on its logger, ``facts`` as the record's attributes (README, Logging)."""
    if _logger.isEnabledFor(level):
        _logger.log(level, msg, *args, extra=facts)


class _SkippedTick:
    """A skipped tick's result: Celery 5.3.0 logs ``.id`` of what ``apply_async`` returns."""

    id = None

    def __bool__(self) -> bool:  # newer Celery logs no id for a falsy result
        return False


def _refusal(exc: BaseException | None) -> AlreadyQueued | None:
    """The AlreadyQueued behind ``exc`` (Celery wraps it in SchedulingError), if any."""
    seen = set()
    while exc is not None and id(exc) not in seen and not isinstance(exc, AlreadyQueued):
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return exc if isinstance(exc, AlreadyQueued) else None


def skipped_tick(scheduler: Scheduler, entry: ScheduleEntry, exc: BaseException) -> bool:
    """Whether a beat send that raised ``exc`` was refused by an :class:`zkcelery.EarlyMutexTask`.

    If so, the tick is skipped, not failed: the entry's last run is queued or running, so this
    logs one INFO line (no traceback) naming the holder's task id, sends
    :data:`zkcelery.beat_tick_skipped`, and returns True; the scheduler moves on.  False for
    any other error, which stays the scheduler's.  For a beat scheduler of one's own;
    EarlyMutexScheduler and ElectedScheduler use it.
    """
    refused = _refusal(exc)
    if refused is None:
        return False
    _log(logging.INFO, "beat: %s skipped: %s", entry.name, refused, task_name=entry.task,
         kind="early mutex", key=refused.key, holder=refused.task_id,
         outcome="skipped")  # fmt: skip
    if zkcelery.beat_tick_skipped.receivers:
        zkcelery.beat_tick_skipped.send(sender=scheduler, entry=entry.name, task_id=refused.task_id)
    return True


class EarlyMutexScheduler(PersistentScheduler):
    """``celery beat -S zkcelery_beat.EarlyMutexScheduler`` (or ``zkcelery.EarlyMutexScheduler``):
    a send an :class:`zkcelery.EarlyMutexTask` refuses (its last run is still queued or running)
    is a skipped tick (:func:`skipped_tick`), logged once at INFO with the holder's task id,
    not as an error; the schedule moves on."""

    def apply_async(self, entry: Any, producer: Any = None, advance: bool = True, **kw: Any) -> Any:
        try:
            return super().apply_async(entry, producer, advance, **kw)
        except SchedulingError as exc:
            if not skipped_tick(self, entry, exc):
                raise
            return _SkippedTick()


class Election:
    """An election among the processes of one app, and a state node only its leader writes.

    What :class:`ElectedScheduler` is built on.  ``lease`` is the election: an exclusive
    :class:`zkcelery.Lease` named ``name`` in the ``beat`` namespace that the app holds itself
    (``owner`` stands where a task's name would: ``ls``, logs, metrics); its ``acquire()`` waits
    in line.  The state node, ``path`` (``beat/<name>@schedule``), is written only through
    :meth:`claim` and :meth:`write`, each fenced (:meth:`zkcelery.Lease.fenced_write`): one
    multi-operation checks that the lease's node exists and that the node is at the version
    this process last read or wrote.  Of two processes that both believe they lead, the later
    write fails (:class:`zkcelery.NotLeading`), so a leader deposed without knowing it cannot
    act on what it was about to write.

    :raises ConfigurationError: a ``ZOOKEEPER_*`` setting of ``app`` is malformed.
    """

    def __init__(self, app: celery.Celery, name: str, *, owner: str, identifier: str) -> None:
        # The process's session for the app, which the lease uses: the state is read in it.
        self._session = zkcelery.open_session(app, shared=True)
        settings = self._session.settings
        self.app = app
        #: The ensemble, as ZOOKEEPER_HOSTS names it.
        self.hosts = settings.hosts
        self.lease = zkcelery.Lease.for_app(
            app, "beat", name, owner=owner, blocking=True, identifier=identifier
        )
        #: The state node (the protocol map's ``beat/<app>@schedule``).
        self.path = f"{settings.root}/beat/{self.lease.name}@schedule"
        #: The version this process last read or wrote: what its next write names.
        self.version = -1

    def claim(self, make: Callable[[bytes], bytes]) -> None:
        """Read the state node and write ``make(its data)``: a new leader's first act, after
        which a write by any earlier leader fails.  ``make`` is called again with the new
        data when a deposed leader wrote since the read."""
        for tries_left in reversed(range(3)):
            data = make(self._read())
            try:
                self.write(data)
                return
            except StaleVersion:
                # A deposed leader wrote since our read; we hold the lease: read again.
                if not tries_left:
                    raise

    def write(self, data: bytes) -> None:
        """Write ``data`` if this process still leads (the fence every send passes first), else
        raise :class:`zkcelery.NotLeading`: one fenced write, as the class says."""
        try:
            self.version = self.lease.fenced_write(self.path, data, self.version)
        except StaleVersion as exc:
            raise StaleVersion("another beat has written the schedule's state since") from exc

    def close(self) -> None:
        """Leave the election at once: release the lease, and end this process's session."""
        # Release first, so that closing is not reported as a lost lease.  In a
        # thread: celery beat calls close() from its SIGTERM handler, which may
        # have interrupted this thread in the session's mutex.
        releaser = threading.Thread(target=self.lease.release, daemon=True)
        releaser.start()
        releaser.join(self._session.settings.connect_timeout)
        # The standby's node, or a leader's unreleased one, goes too.
        zkcelery.close_session(self.app)

    def _read(self) -> bytes:
        """The node's data, and its version noted; the node is made (empty) if it is missing."""
        session = self._session
        for _ in range(3):
            try:
                data, stat = session.read(session.client.get_async, self.path)
                self.version = stat.version
                return data  # type: ignore[no-any-return]
            except NoNodeError:
                with contextlib.suppress(NodeExistsError):
                    session.call(session.client.create_async, self.path, b"")
        raise NotLeading(f"{self.path} keeps vanishing")


class ElectedScheduler(Scheduler):
    """A ``celery beat`` scheduler to start on every host: ZooKeeper elects the one that sends.

    ``celery -A proj beat -S zkcelery_beat.ElectedScheduler`` (or the
    ``beat_scheduler`` setting; ``zkcelery.ElectedScheduler`` is the same
    class).  Every process competes for one lease, named after the app's main
    name, in the ``beat`` namespace; the holder leads and sends, the others
    stand by in line and send nothing (``ls`` shows both).  When the leader
    dies, the first standby leads as soon as ZooKeeper ends the dead session.

    A leader checks ``lease.lost`` before every send, and first writes the
    tick to the schedule's state in ZooKeeper with a version check, so that a
    leader that was deposed without knowing it cannot send: its write fails.
    When it loses the lease it stops, releases it, and stands by again.

    The state (each entry's last run time and run count) lives in ZooKeeper:
    a new leader neither repeats a tick nor skips one; a tick that fell due
    while no beat led is sent once, late, with a warning.  Every message
    carries the headers ``zkcelery_beat_token`` (the leader's fencing token)
    and ``zkcelery_beat_run`` (the entry's run number).  A send that an
    :class:`zkcelery.EarlyMutexTask` refuses (:class:`zkcelery.AlreadyQueued`)
    is logged at INFO as a skipped tick.  An entry naming a task the app does
    not know, or a malformed schedule, is an error at start.
    """

    #: Seconds the election thread pauses after it failed to reach ZooKeeper.
    retry_interval = 1.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Set before Scheduler.__init__, which calls setup_schedule (unless lazy).
        self._election: Election | None = None
        self._state: _BeatState | None = None
        self._leading = False
        self._token: int | None = None
        self._late: set[str] = set()  # entries that fell due while no beat led
        self._compete = threading.Event()  # main -> election thread: take part again
        self._elected = threading.Event()  # election thread -> main: the lease is ours
        self._closed = threading.Event()
        super().__init__(*args, **kwargs)

    # -- setup ---------------------------------------------------------------

    def setup_schedule(self) -> None:
        _check_beat_schedule(self.app, self.app.conf.beat_schedule)  # before any session opens
        self._election = self._new_election()  # malformed settings: an error at start
        self._state = _BeatState(self._election)
        self.merge_inplace(self.app.conf.beat_schedule)
        self.install_default_entries(self.schedule)
        self._compete.set()
        threading.Thread(target=self._elect, name="zkcelery-beat-election", daemon=True).start()

    def _new_election(self) -> Election:
        return Election(
            self.app, self.app.main or "celery", owner="celery beat",
            identifier=f"celery beat {os.getpid()}@{socket.gethostname()}",
        )  # fmt: skip

    @property
    def info(self) -> str:
        # celery beat's banner asks a scheduler made without setup_schedule (lazy).
        election = self._election or self._new_election()
        namespace = election.path.rsplit("/", 1)[0]
        return f"    . leader election -> ZooKeeper {election.hosts} {namespace}"

    @property
    def _lease(self) -> zkcelery.Lease:
        assert self._election is not None
        return self._election.lease

    # -- the election thread ---------------------------------------------------

    def _elect(self) -> None:
        """Wait in line for the lease whenever the main thread asks; never sends."""
        failing = False
        while True:
            self._compete.wait()
            if self._closed.is_set():
                return
            if not failing:
                _log(logging.INFO, "beat: standing by to lead the schedule of %s",
                     self._lease.key, kind="beat", key=self._lease.key,
                     outcome="standing_by")  # fmt: skip
            try:
                self._lease.acquire()  # blocks until granted
            except Exception as exc:  # CoordinationError above all: keep trying
                if self._closed.is_set():
                    return
                if not failing:
                    _log(
                        logging.WARNING,
                        "beat: cannot take part in the election for %s: %s; trying again",
                        self._lease.key, exc, kind="beat", key=self._lease.key,
                        outcome="not_acquired", error=str(exc),
                    )  # fmt: skip
                failing = True
                self._closed.wait(self.retry_interval)
                continue
            failing = False
            self._compete.clear()
            self._elected.set()

    # -- the main thread: lead, or wait to ----------------------------------------

    def tick(self, *args: Any, **kwargs: Any) -> float:
        if self._closed.is_set():
            return float(self.max_interval)
        if not self._leading and not self._lead_once_elected():
            return 0.0
        if self._lease.lost:
            self._step_down("its ZooKeeper session was lost or is in doubt (lease.lost)")
            return 0.0
        try:
            return super().tick(*args, **kwargs)  # type: ignore[no-any-return]
        except NotLeading as exc:
            self._step_down(str(exc))
            return 0.0

    def _lead_once_elected(self) -> bool:
        """Wait (at most max_interval) for the election thread's news; take over if elected."""
        if not self._elected.wait(self.max_interval) or self._closed.is_set():
            return False
        self._elected.clear()
        try:
            self._take_over()
        except ZKCeleryError as exc:  # NotLeading, CoordinationError
            self._step_down(f"could not take over: {exc}")
            return False
        return True

    def _take_over(self) -> None:
        """Read the schedule's state and claim it with a fenced write; then lead."""
        election, state, lease = self._election, self._state, self._lease
        assert election is not None and state is not None
        self._token = lease.token
        if self._token is None:
            raise NotLeading("its lease was lost as it was granted")

        def claim(data: bytes) -> bytes:
            state.load(data, self.schedule)
            self._late = {name for name, entry in self.schedule.items() if _is_due(entry)}
            return state.encode(self._token, self.schedule)

        election.claim(claim)  # from here on, a write by any earlier leader fails
        self._leading = True
        self._heap = None  # rebuilt from the loaded entries at the next tick
        _log(
            logging.INFO,
            "beat: leading the schedule of %s (fencing token %s); %d entries, %d due now",
            lease.key, self._token, len(self.schedule), len(self._late), kind=lease.kind,
            key=lease.key, outcome="elected",
        )  # fmt: skip
        if zkcelery.beat_elected.receivers:
            zkcelery.beat_elected.send(sender=self, token=self._token)

    def _step_down(self, why: str) -> None:
        was = "stopped leading" if self._leading else "not leading"
        _log(logging.WARNING, "beat: %s the schedule of %s: %s; standing by", was,
             self._lease.key, why, kind=self._lease.kind, key=self._lease.key, outcome="deposed",
             reason=why)  # fmt: skip
        if zkcelery.beat_deposed.receivers:
            zkcelery.beat_deposed.send(sender=self, reason=why)
        self._leading = False
        self._heap = None
        self._late.clear()
        self._lease.release()  # a quiet no-op when the session is gone
        if not self._closed.is_set():
            self._compete.set()

    # -- sending ---------------------------------------------------------------

    def reserve(self, entry: ScheduleEntry) -> ScheduleEntry:
        """Advance ``entry`` in ZooKeeper, fenced, before it is sent; raise if not leading."""
        assert self._election is not None and self._state is not None
        if not self._leading or self._lease.lost:
            raise NotLeading("its ZooKeeper session was lost or is in doubt (lease.lost)")
        new_entry = next(entry)
        entries = {**self.schedule, entry.name: new_entry}
        self._election.write(self._state.encode(self._token, entries))
        self.schedule[entry.name] = new_entry
        return new_entry  # type: ignore[no-any-return]

    def apply_entry(self, entry: ScheduleEntry, producer: Any = None) -> None:
        if entry.name in self._late:
            self._late.discard(entry.name)
            late = _lateness(entry)
            _log(
                logging.WARNING,
                "beat: %s fell due %s while no beat was leading; sending it now, once",
                entry.name, "earlier" if late is None else f"{late:.2f} s ago",
                task_name=entry.task, kind="beat", outcome="late", wait=late,
            )  # fmt: skip
        _beat_logger.info("Scheduler: Sending due task %s (%s)", entry.name, entry.task)
        try:
            result = self.apply_async(self._stamped(entry), producer=producer, advance=False)
        except Exception as exc:
            if skipped_tick(self, entry, exc):
                return
            _beat_logger.error(
                "Message Error: %s\n%s", exc, traceback.format_stack(), exc_info=True
            )
            return
        if result is not None and hasattr(result, "id"):
            _beat_logger.debug("%s sent. id->%s", entry.task, result.id)

    def _stamped(self, entry: ScheduleEntry) -> ScheduleEntry:
        """``entry`` with the leader's fencing token and the run number in its headers."""
        headers = {
            **(entry.options.get("headers") or {}),
            "zkcelery_beat_token": self._token,
            "zkcelery_beat_run": entry.total_run_count + 1,
        }
        options = {**entry.options, "headers": headers}
        return entry.__class__(**dict(entry, options=options))  # type: ignore[no-any-return]

    # -- the end -----------------------------------------------------------------

    def close(self) -> None:
        """Leave the election at once: end this process's session for the app."""
        if not self._closed.is_set():
            self._closed.set()
            self._compete.set()  # wake the election thread, so that it ends
            self._elected.set()
            if self._election is not None:
                self._election.close()
            if self._leading:
                _log(logging.INFO, "beat: stopped leading: shutting down", kind="beat",
                     outcome="stopped")  # fmt: skip
                if zkcelery.beat_deposed.receivers:
                    zkcelery.beat_deposed.send(sender=self, reason="shutting down")
            self._leading = False
        super().close()


class _BeatState:
    """The content of the schedule's state node, ``beat/<app>@schedule``.

    JSON: who leads (fencing token, host, pid, identifier) and each entry's
    last run time and run count.  The leader writes it through its
    :class:`Election`: once when it takes over (its claim) and
    before every send (the tick's reservation), each write fenced, so of two
    processes that both believe they lead, the later write fails and its tick
    is not sent: two leaders cannot send one tick.
    """

    def __init__(self, election: Election) -> None:
        self.election = election

    def load(self, data: bytes, schedule: dict[str, ScheduleEntry]) -> None:
        """Set each entry's last run and run count from ``data``: one new here counts from now."""
        try:
            saved = json.loads(data or b"{}").get("entries", {})
        except (ValueError, AttributeError):
            _log(logging.WARNING, "beat: %s holds no readable state; starting afresh",
                 self.election.path, kind="beat", outcome="state_unreadable")  # fmt: skip
            saved = {}
        for name, entry in schedule.items():
            try:
                last = datetime.fromisoformat(saved[name]["last_run_at"])
                count = int(saved[name]["total_run_count"])
            except (KeyError, TypeError, ValueError):  # new here: it counts from now
                entry.last_run_at, entry.total_run_count = entry.default_now(), 0
                continue
            entry.last_run_at, entry.total_run_count = last, count

    def encode(self, token: int | None, entries: dict[str, ScheduleEntry]) -> bytes:
        """The content for ``entries``, led by the holder of the fencing token ``token``."""
        state = {
            "leader": {
                "token": token,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "identifier": self.election.lease.identifier,
            },
            "entries": {
                name: {
                    "last_run_at": entry.last_run_at.isoformat(),
                    "total_run_count": entry.total_run_count,
                }
                for name, entry in sorted(entries.items())
            },
        }
        return json.dumps(state).encode()


def _check_beat_schedule(app: celery.Celery, entries: Any) -> None:
    """Raise ConfigurationError for an entry beat could never send, naming it."""
    if not entries:
        return
    if not isinstance(entries, dict):
        raise ConfigurationError(f"beat_schedule must be a dict of entries, not {entries!r}")
    for name, entry in entries.items():
        where = f"beat_schedule entry {name!r}"
        if not isinstance(entry, dict):
            raise ConfigurationError(f"{where} must be a dict with 'task' and 'schedule'")
        task = entry.get("task")
        if not isinstance(task, str) or not task:
            raise ConfigurationError(f"{where} has no task name: 'task': 'proj.tasks.name'")
        if task not in app.tasks:
            raise ConfigurationError(
                f"{where}: task {task!r} is not registered in the app beat runs with "
                "(a typo, or a module missing from the app's imports or include?)"
            )
        _check_schedule(where, entry.get("schedule"))
        if not isinstance(entry.get("args", ()), (list, tuple)):
            raise ConfigurationError(f"{where}: 'args' must be a list or tuple")
        if not isinstance(entry.get("kwargs") or {}, dict):
            raise ConfigurationError(f"{where}: 'kwargs' must be a dict")


def _check_schedule(where: str, schedule: Any) -> None:
    if isinstance(schedule, timedelta):
        schedule = schedule.total_seconds()
    if isinstance(schedule, bool):
        pass
    elif isinstance(schedule, (int, float)):
        if 0 < schedule < float("inf"):
            return
    elif callable(getattr(schedule, "is_due", None)):
        return
    raise ConfigurationError(
        f"{where}: 'schedule' must be a positive number of seconds, a timedelta, or a "
        f"schedule such as crontab() or solar(), not {schedule!r}"
    )


def _is_due(entry: ScheduleEntry) -> bool:
    try:
        return bool(entry.is_due()[0])
    except Exception:  # Celery logs an entry whose next run cannot be computed
        return False


def _lateness(entry: ScheduleEntry) -> float | None:
    """How many seconds ago ``entry`` fell due (None if its schedule cannot say)."""
    try:
        remaining = entry.schedule.remaining_estimate(entry.last_run_at)
        return max(0.0, -remaining.total_seconds())  # type: ignore[no-any-return]
    except Exception:
        return None
