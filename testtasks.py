"""The code zkcelery's test workers run: ``celery -A testtasks worker`` (or ``beat``).

Worker and beat processes import this module, never the test module or pytest:
the README's examples, executed into it as written (``do_work`` notes each
body); the tasks the tests send; and the enter/exit record the bodies keep in
files, independent of zkcelery's own view.  The ``workers`` fixture
(conftest.py) passes the broker, the ZooKeeper namespace and the record's folder
in the environment, so one module serves every test's workers.
"""

from __future__ import annotations

import contextlib
import functools
import json
import mmap
import os
import re
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from celery import Celery, signals
from celery.exceptions import Reject

import testinternals as internals
import zkcelery
from testsupport import ensemble_hosts

#: Sessions in the tests are short, so that faults play out in seconds.
SESSION_TIMEOUT = 2.0
CONNECT_TIMEOUT = 2.0

# ---------------------------------------------------------------------------
# The record, and the app's settings
# ---------------------------------------------------------------------------


def record_body(key: Any, hold: float = 0.0, **extra: Any) -> None:
    """Called inside a guarded body: note (key, pid, enter, exit) in the record."""
    folder = os.environ.get("ZKCELERY_TEST_RECORD")
    enter = time.monotonic()  # one clock for every process on the machine
    if hold:
        time.sleep(hold)
    leave = time.monotonic()
    if folder:
        line = json.dumps(
            {"key": str(key), "pid": os.getpid(), "enter": enter, "exit": leave, **extra}
        )
        with open(Path(folder) / f"{os.getpid()}.log", "a") as f:
            f.write(line + "\n")


def wait_for_marker(marker: str, limit: float = 60.0) -> None:
    """Hold the body until the test creates ``marker`` (``limit`` seconds at most): a hold
    that ends when the test has seen what it looks for, however loaded the machine."""
    deadline = time.monotonic() + limit
    while not Path(marker).exists() and time.monotonic() < deadline:
        time.sleep(0.02)


def note_failure(task_id: str, exception: BaseException) -> None:
    """Called by a ``task_failure`` receiver: note it in the record, for ``failures()``."""
    folder = os.environ.get("ZKCELERY_TEST_RECORD")
    if folder:
        with open(Path(folder) / f"{os.getpid()}.failures", "a") as f:
            f.write(json.dumps([task_id, type(exception).__name__]) + "\n")


def broker_settings(
    folder: Path, url: str | None = None, queue: str | None = None, options: dict | None = None
) -> dict[str, Any]:
    """The app settings for a broker and results that work across processes.

    Without ``url``: kombu's filesystem transport in ``folder``, every folder it
    uses (its control folder too) inside it.  With it: that broker, the tasks on
    ``queue``, and ``options`` as its transport options.
    """
    queue_folder = folder / "queue"
    queue_folder.mkdir(parents=True, exist_ok=True)
    (folder / "results").mkdir(exist_ok=True)
    settings: dict[str, Any] = {"result_backend": f"file://{folder / 'results'}"}
    if url:
        settings["broker_url"] = url
        if queue:
            settings["task_default_queue"] = queue
        if options:
            settings["broker_transport_options"] = options
    else:
        settings["broker_url"] = "filesystem://"
        settings["broker_transport"] = "testsupport:AtomicFilesystemTransport"
        settings["broker_transport_options"] = {
            "data_folder_in": str(queue_folder),
            "data_folder_out": str(queue_folder),
            "control_folder": str(folder / "control"),
            "polling_interval": 0.05,
        }
    return settings


def worker_app(name: str = "zkcelery-tests") -> Celery:
    """The app of the worker processes (and of the tests that talk to them).

    Its broker, results and ZooKeeper namespace come from the environment the
    ``workers`` fixture sets, so one module serves every test's worker.
    """
    app = Celery(name, set_as_current=False)
    folder = os.environ.get("ZKCELERY_TEST_BROKER")
    if folder:
        options = json.loads(os.environ.get("ZKCELERY_TEST_TRANSPORT_OPTIONS") or "{}")
        app.conf.update(
            broker_settings(
                Path(folder),
                os.environ.get("ZKCELERY_TEST_BROKER_URL"),
                os.environ.get("ZKCELERY_TEST_QUEUE"),
                options,
            )
        )
    app.conf.update(
        ZOOKEEPER_HOSTS=os.environ.get("ZKCELERY_TEST_HOSTS", ensemble_hosts()),
        ZOOKEEPER_ROOT=os.environ.get("ZKCELERY_TEST_ROOT", "/zkcelery-tests/default"),
        ZOOKEEPER_SESSION_TIMEOUT=float(os.environ.get("ZKCELERY_TEST_SESSION", SESSION_TIMEOUT)),
        ZOOKEEPER_CONNECT_TIMEOUT=CONNECT_TIMEOUT,
        worker_prefetch_multiplier=1,
        # How long the worker waits for a killed pool process's result before it
        # raises WorkerLostError (and, with reject_on_worker_lost, requeues): 10 s by
        # default, of nothing but waiting in every test that kills a pool process.
        worker_lost_wait=1.0,
        worker_hijack_root_logger=False,
        # Celery has no setting for the retry delay; annotations set it on every task.
        task_annotations={"*": {"default_retry_delay": 0.2}},
        broker_connection_retry_on_startup=True,
    )
    return app


# ---------------------------------------------------------------------------
# The app: the README's examples, and tasks the tests need
# ---------------------------------------------------------------------------

app = worker_app()


def do_work(data: dict) -> None:
    record_body(**data)


def _readme_examples() -> list[str]:
    text = (Path(__file__).parent / "README.md").read_text()
    return [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "@app.task" in b]


for _example in _readme_examples():
    exec(compile(_example, "README.md", "exec"), globals())


@signals.worker_ready.connect
def _announce_ready(**_: Any) -> None:
    ready = os.environ.get("ZKCELERY_TEST_READY")
    if ready:
        Path(ready).touch()


@signals.task_failure.connect
def _note_failure(task_id: str, exception: BaseException, **_: Any) -> None:
    # Whichever process sends it (Celery 5.7 does in the worker's main process).
    note_failure(task_id, exception)


@app.task(base=zkcelery.LockTask, bind=True)
def hold_lock(self, key, hold=0.0, blocking=False):
    with self.lock(key, blocking=blocking) as lease:
        if lease:
            record_body(key, hold, token=lease.token)
        return bool(lease)


@app.task(base=zkcelery.LockTask, bind=True)
def hold_semaphore(self, key, max_leases, hold=0.0):
    with self.semaphore(key, max_leases=max_leases, blocking=True) as lease:
        record_body(key, hold)
        return bool(lease)


@app.task(base=zkcelery.LockTask, bind=True)
def retry_quickly(self, key):
    with self.lock(key, retry=True, countdown=0.1, max_retries=2):
        record_body(key)


@app.task(base=zkcelery.MutexTask, bind=True, max_retries=60, default_retry_delay=0.5)
def patient_mutex(self, data):
    do_work(data)


# The soak: every kind of guard, retried (never dropped, never given up: contention
# before an outage can take hundreds of retries) while ZooKeeper is away.
SOAK_RETRIES = 100_000


@app.task(base=zkcelery.MutexTask, bind=True, mutex_keys=("key",), max_retries=SOAK_RETRIES)
def soak_mutex(self, key, hold=0.003):
    record_body(f"mutex:{key}", hold)


@app.task(base=zkcelery.LockTask, bind=True, max_retries=SOAK_RETRIES)
def soak_lock(self, key, hold=0.003):
    with self.lock(key, retry=True, countdown=0.05):
        record_body(f"lock:{key}", hold)


@app.task(base=zkcelery.LockTask, bind=True, max_retries=SOAK_RETRIES)
def soak_semaphore(self, key, hold=0.003):
    with self.semaphore(key, max_leases=2, retry=True, countdown=0.05):
        record_body(f"sem:{key}", hold)


# Copies of themselves: Celery sends a retry or a replacement with the running task's id
# before the body returns; the first run then ends slowly, still in the mutex.
@app.task(base=zkcelery.MutexTask, bind=True, mutex_keys=("key",))
def retrying_mutex(self, key, tail=1.0):
    first = self.request.retries == 0
    try:
        if first:
            raise self.retry(countdown=0)
    finally:
        record_body(key, tail if first else 0.0, task_id=self.request.id, copy="retry")


@app.task(base=zkcelery.MutexTask, bind=True, mutex_keys=("key",))
def replacing_mutex(self, key, tail=1.0, replaced=False):
    # Retries once, then replaces itself: the replacement's retries start at 0 again.
    try:
        if not replaced and self.request.retries == 0:
            raise self.retry(countdown=0)
        if not replaced:
            return self.replace(replacing_mutex.si(key, tail, True))
    finally:
        record_body(key, 0.0 if replaced else tail, task_id=self.request.id, copy="replace")


@app.task(base=zkcelery.LockTask, bind=True, acks_late=True, reject_on_worker_lost=True)
def killable(self, key, marker):
    with self.lock(key, blocking=True):
        record_body(key, 0.0 if Path(marker).exists() else 60.0)


@app.task(base=zkcelery.EarlyMutexTask, bind=True, mutex_keys=("key",), max_retries=1)
def early(self, key, hold=0.0, fail=False, reject=False, countdown=None, marker=None):
    if marker is not None:
        wait_for_marker(marker)
    record_body(f"early:{key}", hold, retries=self.request.retries)
    if fail:
        raise ValueError("failed as asked")
    if reject:
        raise Reject("rejected as asked", requeue=False)
    if countdown is not None and not self.request.retries:
        raise self.retry(countdown=countdown)


@app.task(base=zkcelery.EarlyMutexTask, bind=True, mutex_keys=("key",), acks_late=True)
def early_late(self, key):
    # Acknowledged after the run: a copy sent back to the queue comes again.
    record_body(f"early:{key}", task_id=self.request.id)


@app.task(bind=True)
def handler_name(self):
    return type(internals.session(self.app).handler).__name__


_leaked: list = []


@app.task(base=zkcelery.LockTask, bind=True)
def leak_lock(self, key):
    lease = self.lock(key).__enter__()  # never released: only the session's end frees it
    _leaked.append(lease)
    return bool(lease)


# The broker tests' tasks: one mutex per key, each body noting its task id.
@app.task(base=zkcelery.MutexTask, bind=True, mutex_keys=("key",))
def broker_mutex(self, key, hold):
    record_body(key, hold, task_id=self.request.id)


@app.task(base=zkcelery.MutexTask, bind=True, mutex_keys=("key",), mutex_requeue=True)
def broker_requeued(self, key, hold):
    record_body(key, hold, task_id=self.request.id)


@app.task(base=zkcelery.MutexTask, bind=True, mutex_keys=("key",), mutex_requeue=True)
def killable_mutex(self, key, marker):
    # The first delivery holds until it is killed; once the marker exists, a body ends at once.
    record_body(key, 0.0 if Path(marker).exists() else 60.0, task_id=self.request.id)


@app.task(base=zkcelery.MutexTask, bind=True, mutex_keys=("key",), mutex_requeue=True,
          mutex_max_leases=2)  # fmt: skip
def limited_mutex(self, key, hold):
    # A body killed mid-run writes no record line: note its start first.
    folder = os.environ.get("ZKCELERY_TEST_RECORD")
    if folder:
        with open(Path(folder) / f"{os.getpid()}.starts", "a") as f:
            f.write(json.dumps([self.request.id, key, time.monotonic()]) + "\n")
    record_body(key, hold, task_id=self.request.id)


@app.task(base=zkcelery.LockTask, bind=True, max_retries=100)
def broker_lock_retry(self, key, hold):
    with self.lock(key, retry=True, countdown=0.2):
        record_body(key, hold, task_id=self.request.id)


@app.task
def broker_fails():
    raise ValueError("a real error keeps its traceback")


@app.task(base=zkcelery.MutexTask, bind=True, mutex_keys=("key",), mutex_requeue=True)
def mutex_until(self, key, marker):
    wait_for_marker(marker)
    record_body(key, task_id=self.request.id)


# The beat tests run `celery -A testtasks beat` with the schedule in the environment.
if os.environ.get("ZKCELERY_TEST_BEAT"):
    app.conf.beat_schedule = json.loads(os.environ["ZKCELERY_TEST_BEAT"])
# The scheduler as a setting, as the README allows beside `beat -S`.
if os.environ.get("ZKCELERY_TEST_BEAT_SCHEDULER"):
    app.conf.beat_scheduler = os.environ["ZKCELERY_TEST_BEAT_SCHEDULER"]


@app.task
def beat_tick():
    """What the beat tests' schedule sends; the broker's queue is the record."""


@signals.beat_init.connect
@signals.worker_process_init.connect
def _publish_session(**_: Any) -> None:
    # The session-expiry tests must hand a beat's or a pool process's session id
    # and password to another client (conftest.expire_session): publish them.
    folder = os.environ.get("ZKCELERY_TEST_SESSIONS")
    if folder:
        threading.Thread(target=_write_session, args=(Path(folder),), daemon=True).start()


def _write_session(folder: Path) -> None:
    written = None
    while True:
        session = internals.sessions.get(app)
        client_id = session.client.client_id if session is not None else None
        if client_id and client_id != written:
            part = folder / f".{os.getpid()}.part"
            part.write_text(json.dumps([client_id[0], client_id[1].hex()]))
            part.rename(folder / f"{os.getpid()}.json")
            written = client_id
        time.sleep(0.05)


# ---------------------------------------------------------------------------
# Observability: zkcelery's signals and metrics, seen from the worker's side
# ---------------------------------------------------------------------------

#: Every signal zkcelery sends, by its short name.
SIGNALS = {
    name: getattr(zkcelery, name)
    for name in zkcelery.__all__
    if type(getattr(zkcelery, name)).__name__ == "Signal"
}


def _note_signal(signal: Any = None, sender: Any = None, **facts: Any) -> None:
    """Note a zkcelery signal in the record: which, where, and its facts (leases by kind/key)."""
    folder = os.environ.get("ZKCELERY_TEST_RECORD")
    lease = facts.pop("lease", None)
    if lease is not None:
        facts.update(kind=lease.kind, key=lease.key, name=lease.task_name)
    facts.pop("holder", None)
    line = {"signal": signal.name.split(".")[-1], "sender": getattr(sender, "name", None),
            "pid": os.getpid(), "t": time.monotonic(), **facts}  # fmt: skip
    if folder:
        with open(Path(folder) / f"{os.getpid()}.signals", "a") as f:
            f.write(json.dumps(line, default=str) + "\n")


if os.environ.get("ZKCELERY_TEST_SIGNALS"):
    for _signal in SIGNALS.values():
        _signal.connect(_note_signal, weak=False)

if os.environ.get("ZKCELERY_TEST_EVENTS"):  # as a worker run with -E, for Flower
    app.conf.worker_send_task_events = True
    app.conf.task_send_sent_event = True

if os.environ.get("ZKCELERY_TEST_METRICS_PORT"):
    app.conf.ZOOKEEPER_METRICS_PORT = int(os.environ["ZKCELERY_TEST_METRICS_PORT"])
    app.conf.ZOOKEEPER_METRICS_ADDR = "127.0.0.1"

if os.environ.get("ZKCELERY_TEST_BEAT_METRICS_PORT"):
    app.conf.ZOOKEEPER_BEAT_METRICS_PORT = int(os.environ["ZKCELERY_TEST_BEAT_METRICS_PORT"])
    app.conf.ZOOKEEPER_METRICS_ADDR = "127.0.0.1"


#: The tasks whose deliveries _note_delivery counts.
_COUNTED = {"testtasks.metered_lock", "testtasks.broker_mutex", "testtasks.broker_requeued"}


@signals.task_prerun.connect
def _note_delivery(task: Any = None, task_id: str | None = None, **_: Any) -> None:
    # Celery's own count of deliveries (a requeued copy runs its prerun again), for the
    # metrics test: independent of zkcelery's signals.
    folder = os.environ.get("ZKCELERY_TEST_RECORD")
    if folder and task is not None and task.name in _COUNTED:
        with open(Path(folder) / f"{os.getpid()}.deliveries", "a") as f:
            f.write(json.dumps({"task": task.name, "task_id": task_id}) + "\n")


@signals.task_retry.connect
def _note_retry(request: Any = None, **_: Any) -> None:
    # Sent once Celery has stored the RETRY state of a run: a copy that follows it must
    # not end before that, or its SUCCESS is overwritten.
    folder = os.environ.get("ZKCELERY_TEST_RECORD")
    if folder and request is not None:
        with open(Path(folder) / f"{os.getpid()}.retries", "a") as f:
            f.write(json.dumps({"task_id": request.id, "t": time.monotonic()}) + "\n")


@app.task(base=zkcelery.LockTask, bind=True)
def lock_until(self, key, marker, blocking=True, timeout=None):
    """Hold a lock until the marker exists, having looked at ``lease.lost`` once."""
    with self.lock(key, blocking=blocking, timeout=timeout) as lease:
        if not lease:
            return False
        lease.lost  # noqa: B018 - the first look watches the node for a deletion
        wait_for_marker(marker)
        record_body(key, lost=lease.lost)
        return True


@app.task(base=zkcelery.LockTask, bind=True)
def metered_lock(self, key, hold):
    """A blocking lock: the body notes how long it waited and held, by its own clock."""
    asked = time.monotonic()
    with self.lock(key, blocking=True):
        granted = time.monotonic()
        time.sleep(hold)
    record_body(key, waited=granted - asked, held=time.monotonic() - granted)


@app.task
def send_early_twice(key, hold):
    """Send an early mutex task twice: the second send is refused; return both ids."""
    first = early.delay(key, hold=hold)
    try:
        early.delay(key)
    except zkcelery.AlreadyQueued as refused:
        return [first.id, refused.task_id]
    return [first.id, None]


@app.task
def send_early_and_a_copy(key, hold):
    """Send an early mutex task, and its message again with the same id: a second delivery."""
    first = early.delay(key, hold=hold)
    app.send_task("testtasks.early", args=(key,), kwargs={"hold": hold}, task_id=first.id)
    return first.id


# ---------------------------------------------------------------------------
# The history check's tasks (test_a_randomized_history_under_faults_...)
# ---------------------------------------------------------------------------

HISTORY_LEASES = 2  # the semaphore's max_leases
HISTORY_MUTEX_LEASES = 2  # the limited mutex's mutex_max_leases
HISTORY_RETRIES = 100_000  # never give up: a task ends SUCCESS, or the checker says why not
HISTORY_EARLY_TIMEOUT = 60.0  # an early key's life while queued: past any wait in the check


def _history_note(**fields: Any) -> None:
    """Append one event to this process's history file (beside the ``record_body`` files)."""
    folder = os.environ.get("ZKCELERY_TEST_RECORD")
    if folder:
        with open(Path(folder) / f"{os.getpid()}.history", "a") as f:
            f.write(json.dumps(fields) + "\n")


def _history_parts(lease: Any) -> list[Any]:
    """The single leases a lease is made of: a multi-lock's parts (one per key), else itself."""
    return list(getattr(lease, "parts", None) or [lease])


def _history_czxid(part: Any) -> int | None:
    """The creation zxid of the node granted for a single lease, None if it is gone now."""
    grant = part._grant
    if grant is None:
        return None
    try:
        stat = grant.session.client.exists_async(grant.path).get(timeout=1.0)
    except Exception:  # no answer in time (a fault): unknown, as gone
        return None
    return None if stat is None else stat.czxid


def _history_body(task: Any, kind: str, key: Any, hold: float, lease: Any) -> None:
    """A guarded body: note its start at once, hold, note its end with token and lost.

    The start names each key the lease holds (as ``ls`` and ``rm`` show it) and the
    node that was granted for it, by which the checker tells a grant on a node the
    nemesis deleted while it waited; the end says which of them saw their lease lost.
    """
    body = uuid.uuid4().hex
    parts = _history_parts(lease)
    _history_note(
        ev="start",
        body=body,
        kind=kind,
        key=key,
        task_id=task.request.id,
        pid=os.getpid(),
        t=time.monotonic(),
        hold=hold,
        parts=[
            {"res": part.key, "path": None if part._grant is None else part._grant.path}
            for part in parts
        ],
    )
    # Which node each key holds through: a path a deleted waiter had may be made again
    # (a queue emptied and made anew numbers from 0, and a lease keeps its guid).
    _history_note(ev="nodes", body=body, czxids=[_history_czxid(part) for part in parts])
    lost_at_start = lease.lost  # the first look watches the node: a later break is seen
    token = None
    with contextlib.suppress(zkcelery.ZKCeleryError):  # no connection now: unknown
        token = lease.token
    time.sleep(hold)
    lost = bool(lease.lost)
    if token is None:
        with contextlib.suppress(zkcelery.ZKCeleryError):
            token = lease.token
    _history_note(
        ev="end",
        body=body,
        t=time.monotonic(),
        token=token,
        lost=lost,
        lost_at_start=lost_at_start,
        parts_lost=[bool(part.lost) for part in parts],
    )


@signals.task_received.connect
def _history_received(request: Any = None, **_: Any) -> None:
    # In the worker's main process: which worker had each message, for a failure's report.
    if request is not None and str(request.name).startswith("testtasks.history_"):
        _history_note(ev="received", task_id=request.id, pid=os.getpid(), t=time.monotonic())


#: A history lock or semaphore task: redelivered if its process dies, never given up.
_HISTORY_LOCK_TASK = dict(
    base=zkcelery.LockTask,
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    max_retries=HISTORY_RETRIES,
)


def _history_blocking(task: Any, kind: str, key: Any, hold: float, take: Any) -> None:
    """Wait up to 2 s in line for ``take(blocking=True, timeout=2.0)``, run the body; else retry."""
    try:
        with take(blocking=True, timeout=2.0) as lease:
            if not lease:
                raise task.retry(countdown=0.05)
            _history_body(task, kind, key, hold, lease)
    except zkcelery.CoordinationError as exc:
        raise task.retry(exc=exc, countdown=0.2) from exc


@app.task(**_HISTORY_LOCK_TASK)
def history_lock(self, key, hold):
    _history_blocking(self, "lock", key, hold, functools.partial(self.lock, key))


@app.task(**_HISTORY_LOCK_TASK)
def history_semaphore(self, key, hold, blocking=False):
    # Blocking, it waits in line (a waiter the nemesis may delete); else it retries.
    if blocking:
        take = functools.partial(self.semaphore, key, max_leases=HISTORY_LEASES)
        _history_blocking(self, "semaphore", key, hold, take)
        return
    with self.semaphore(key, max_leases=HISTORY_LEASES, retry=True, countdown=0.05) as lease:
        _history_body(self, "semaphore", key, hold, lease)


#: The one lock name of the history's readers and writers (two tasks, one lock per key).
HISTORY_RW = "testtasks.history_rw"


@app.task(**_HISTORY_LOCK_TASK)
def history_read(self, key, hold):
    take = functools.partial(self.read_lock, key, name=HISTORY_RW)
    _history_blocking(self, "read", key, hold, take)


@app.task(**_HISTORY_LOCK_TASK)
def history_write(self, key, hold):
    take = functools.partial(self.write_lock, key, name=HISTORY_RW)
    _history_blocking(self, "write", key, hold, take)


@app.task(**_HISTORY_LOCK_TASK)
def history_multi(self, keys, hold):
    # The very locks history_lock takes, in the order given: a multi-lock of k0 and k2
    # excludes history_lock("k0"), history_lock("k2"), and every multi-lock on either.
    take = functools.partial(
        self.multi_lock, *(zkcelery.LockKey("testtasks.history_lock", key) for key in keys)
    )
    _history_blocking(self, "multi", keys, hold, take)


@app.task(
    base=zkcelery.MutexTask,
    bind=True,
    mutex_keys=("key",),
    mutex_requeue=True,
    max_retries=HISTORY_RETRIES,
)
def history_mutex(self, key, hold):
    _history_body(self, "mutex", key, hold, self.mutex_lease)


@app.task(
    base=zkcelery.MutexTask,
    bind=True,
    mutex_keys=("key",),
    mutex_requeue=True,
    mutex_max_leases=HISTORY_MUTEX_LEASES,
    max_retries=HISTORY_RETRIES,
)
def history_lmutex(self, key, hold):
    _history_body(self, "lmutex", key, hold, self.mutex_lease)


#: The history's early mutex, as the worker runs it and as the test sends it.
HISTORY_EARLY = dict(
    base=zkcelery.EarlyMutexTask,
    bind=True,
    name="testtasks.history_early",
    mutex_keys=("key",),
    mutex_timeout=HISTORY_EARLY_TIMEOUT,
    acks_late=True,
    reject_on_worker_lost=True,
    max_retries=HISTORY_RETRIES,
)


@app.task(**HISTORY_EARLY)
def history_early(self, key, hold):
    _history_body(self, "early", key, hold, self.request.zkcelery_early)


# ---------------------------------------------------------------------------
# Multi-locks
# ---------------------------------------------------------------------------


@app.task(base=zkcelery.MutexTask, bind=True, mutex_keys=("user", "account"), mutex_each_key=True)
def each_key_mutex(self, user, account, marker=""):
    """One mutex per argument; holds until ``marker`` exists, when given."""
    started = time.monotonic()
    if marker:
        wait_for_marker(marker)
    record_body(f"{user}/{account}", task_id=self.request.id, started=started)


@app.task(base=zkcelery.MutexTask, bind=True, mutex_keys=("user", "account"), mutex_each_key=True)
def each_key_retrying(self, user, account, tail=0.5):
    """Retries once; the first run then ends slowly, still holding both mutexes."""
    first = self.request.retries == 0
    try:
        if first:
            raise self.retry(countdown=0)
    finally:
        record_body(f"{user}/{account}", tail if first else 0.0, task_id=self.request.id)


# ---------------------------------------------------------------------------
# Child processes the tests start: python -m testtasks NAME ARGS...
# ---------------------------------------------------------------------------
#
# Each is a function here, not a script in a string, so that ruff and mypy see it.
# A test starts one with ``child_argv(name, *args)`` and reads what it prints.


def child_argv(name: str, *args: str) -> list[str]:
    """The command that runs the child ``name`` (a function below) with ``args``."""
    return [sys.executable, "-m", "testtasks", name, *args]


def _child_lock_task(hosts: str, root: str, session_timeout: float) -> Any:
    """A LockTask "t.lock" in its own app (as the tests' _lock_task_on makes)."""
    child = Celery("child", set_as_current=False)
    child.conf.update(
        ZOOKEEPER_HOSTS=hosts, ZOOKEEPER_ROOT=root, ZOOKEEPER_SESSION_TIMEOUT=session_timeout
    )

    @child.task(shared=False, base=zkcelery.LockTask, bind=True, name="t.lock")
    def task(self: Any) -> None:
        pass

    return task


def queued_waiter(hosts: str, root: str) -> None:
    """Wait for the lock "fair", say whether granted, hold it until a line comes on stdin."""
    task = _child_lock_task(hosts, root, 5)
    with task.lock("fair", blocking=True, timeout=30) as held:
        print("granted" if held else "not granted", flush=True)
        sys.stdin.readline()


def paused_holder(hosts: str, root: str) -> None:
    """Hold the lock "paused" in a 2 s session; after a pause, say whether it reads lost."""
    lease = _child_lock_task(hosts, root, 2).lock("paused").__enter__()
    # Until a jump in the clock: it was paused.  Each reading is compared with the one
    # before, the first one taken before "held" is printed: the test stops this process
    # once it reads "held", so a stop anywhere after that shows (a first reading taken
    # after the stop would hide it, and the loop would go on for ever: CI, twice).
    last = start = time.monotonic()
    print("held", flush=True)
    while last - start < 60:
        time.sleep(0.01)
        now = time.monotonic()
        if now - last >= 1.0:
            break
        last = now
    print("lost" if lease.lost else "not lost", flush=True)  # the first look after the pause


def early_sender(start: str) -> None:
    """Send ``early("one")`` 100 times from the moment ``start`` exists; print a JSON report."""
    sender = Celery("sender", set_as_current=False)
    sender.conf.update(
        broker_settings(Path(os.environ["ZKCELERY_TEST_BROKER"])),
        ZOOKEEPER_HOSTS=os.environ["ZKCELERY_TEST_HOSTS"],
        ZOOKEEPER_ROOT=os.environ["ZKCELERY_TEST_ROOT"],
    )

    @sender.task(
        base=zkcelery.EarlyMutexTask, bind=True, name="testtasks.early", mutex_keys=("key",)
    )
    def early(self: Any, key: Any, **_: Any) -> None:
        pass

    internals.session(sender).tree.ensure()
    print("ready", flush=True)
    while not Path(start).exists():
        time.sleep(0.005)
    sent: list[str] = []
    refused: set[str] = set()
    refusals = 0
    for _ in range(100):
        try:
            sent.append(early.delay("one").id)
        except zkcelery.AlreadyQueued as exc:
            refused.add(str(exc.task_id))
            refusals += 1
    report = {"sent": sent, "refused": sorted(refused), "refusals": refusals}
    print(json.dumps(report), flush=True)


def big_sleeper() -> None:
    """Touch 256 MiB, say "ready" and sleep: a process slow to tear down when killed."""
    memory = mmap.mmap(-1, 1 << 28)
    for page in range(0, 1 << 28, 4096):
        memory[page] = 1
    print("ready", flush=True)
    time.sleep(60)


CHILDREN = {f.__name__: f for f in (queued_waiter, paused_holder, early_sender, big_sleeper)}

if __name__ == "__main__":
    CHILDREN[sys.argv[1]](*sys.argv[2:])
