"""zkcelery demo: the README's examples on a real Celery worker, with contending copies.

Run it from a clone of the repository, with the test ensemble up::

    pip install . && ./zk-test.sh && python examples/demo.py [--hosts HOST:PORT,...]

It starts one ``celery worker -P prefork -c 2`` on kombu's filesystem broker (no broker
server needed), sends two or three copies of each README example at once (``locking_task``,
``refined``, ``waiting``, ``limited``, ``mutex_task``, ``requeued``, ``per_server``), and prints
a timeline: which pool process held which lock when, which copy skipped its body, waited,
retried, was rejected or requeued.  While two mutexes are held it also shows
``python -m zkcelery ... ls``, the operator's view.  Then it stops the worker, deletes its
ZooKeeper root (``/zkcelery-demo/<id>``) and its temporary folder, and exits 0 when every
task ended as expected (1 otherwise, 2 when no ZooKeeper answers).  It takes about 20 s.

Hosts: ``--hosts``, else ``.zk-test/hosts`` (written by ``./zk-test.sh``; ``.zk-test-PORT``
with ``ZK_TEST_PORT=PORT``), else ``127.0.0.1:2181``.

This file is both the driver (``python examples/demo.py``) and the worker's app module
(``celery -A demo worker``, run in ``examples/``): the broker folder, the ZooKeeper hosts
and root reach the worker through ``ZKCELERY_DEMO_*`` environment variables, and the
tasks append their events to a timeline file in that folder.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# Use the clone's zkcelery.py, installed or not, and write no __pycache__ into the clone
# (its .gitignore does not list one); the worker gets the same through its environment.
sys.path.insert(1, str(REPO))
sys.dont_write_bytecode = True

from celery import Celery, Task, current_task, signals  # noqa: E402
from celery.result import AsyncResult  # noqa: E402
from kazoo.client import KazooClient  # noqa: E402

import zkcelery  # noqa: E402
from testsupport import AtomicFilesystemTransport, ensemble_hosts  # noqa: E402

ENV_DIR, ENV_HOSTS, ENV_ROOT = "ZKCELERY_DEMO_DIR", "ZKCELERY_DEMO_HOSTS", "ZKCELERY_DEMO_ROOT"
TIMELINE = "timeline.jsonl"
DEADLINE = 90.0  # seconds for the whole run: the demo never hangs


# ---------------------------------------------------------------------------
# The app, as the worker (and the driver) configure it
# ---------------------------------------------------------------------------


def configure(app: Celery) -> None:
    """Point ``app`` at the demo's broker folder and ZooKeeper root, if the driver set them."""
    folder = os.environ.get(ENV_DIR)
    if not folder:
        return
    base = Path(folder)
    app.conf.update(
        broker_url="filesystem://",
        broker_transport=AtomicFilesystemTransport,
        broker_transport_options={
            "data_folder_in": str(base / "queue"),
            "data_folder_out": str(base / "queue"),
            # kombu writes ./control and moves consumed messages to /tmp by default.
            "control_folder": str(base / "control"),
            "store_processed": True,
            "processed_folder": str(base / "processed"),
            "polling_interval": 0.05,
        },
        broker_connection_retry_on_startup=True,
        result_backend=f"file://{base / 'results'}",
        # One message per pool process: a copy waits in the queue, not behind a busy one.
        worker_prefetch_multiplier=1,
        ZOOKEEPER_HOSTS=os.environ[ENV_HOSTS],
        ZOOKEEPER_ROOT=os.environ[ENV_ROOT],
    )


app = Celery("demo")
configure(app)


# ---------------------------------------------------------------------------
# The timeline: every pool process appends events to one file
# ---------------------------------------------------------------------------


def note(event: str, task_id: str | None = None, task: str | None = None) -> None:
    """Append one event (time, pid, task, event) to the timeline file."""
    folder = os.environ.get(ENV_DIR)
    if not folder:
        return
    if task_id is None:
        task_id, task = current_task.request.id, current_task.name
    line = json.dumps(
        {"t": time.monotonic(), "pid": os.getpid(), "id": task_id, "task": task, "event": event}
    )
    # One write of an O_APPEND file: lines from different processes never interleave.
    fd = os.open(Path(folder) / TIMELINE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def do_work(data: dict) -> None:
    """The README's placeholder: note the body's start and end, and take ``hold`` seconds."""
    note("in")
    time.sleep(data["hold"])
    note("out")


class _ContentionEvents(logging.Handler):
    """Turns zkcelery's log records about retries and rejections into timeline events.

    A retry or a rejection happens inside zkcelery, before the body runs; its record
    says which in its attributes (``outcome``, ``task_id``, ``task_name``), not only in
    its text.
    """

    EVENTS = {"requeued": "requeued", "rejected": "rejected", "retrying": "retrying"}

    def emit(self, record: logging.LogRecord) -> None:
        task_id = getattr(record, "task_id", None)
        if task_id is None:
            return
        # Anything else about a task, and a line that tells an error (ZooKeeper out of
        # reach, say, even when the task retries): show it as it is.
        outcome = None if hasattr(record, "error") else getattr(record, "outcome", None)
        event = self.EVENTS.get(outcome, f"log: {record.getMessage()}")
        note(event, task_id, record.task_name)


@signals.worker_process_init.connect
def _watch_contention(**_: Any) -> None:
    log = logging.getLogger("zkcelery")
    log.setLevel(logging.INFO)  # the worker may log at WARNING; these lines are INFO
    log.addHandler(_ContentionEvents())


@signals.worker_ready.connect
def _announce_ready(**_: Any) -> None:
    folder = os.environ.get(ENV_DIR)
    if folder:
        (Path(folder) / "ready").touch()


# ---------------------------------------------------------------------------
# The README's examples (plus a note() where the README's body does nothing)
# ---------------------------------------------------------------------------


@app.task(base=zkcelery.LockTask, bind=True)
def locking_task(self: zkcelery.LockTask, data: dict) -> None:
    with self.lock() as lock_acquired:
        if lock_acquired:
            do_work(data)
        else:
            note("skipped")


@app.task(base=zkcelery.LockTask, bind=True)
def refined(self: zkcelery.LockTask, a: str, data: dict) -> None:
    # retry=True alone retries after the task's default_retry_delay (3 minutes):
    # countdown=1, passed on to self.retry(), keeps the demo short.
    with self.lock(a, retry=True, countdown=1):
        do_work(data)


@app.task(base=zkcelery.LockTask, bind=True)
def waiting(self: zkcelery.LockTask, data: dict) -> None:
    note("waits")
    with self.lock(blocking=True):
        do_work(data)


@app.task(base=zkcelery.LockTask, bind=True)
def limited(self: zkcelery.LockTask, tenant: str, data: dict) -> None:
    # max_leases=1, not the README's 3: this worker runs two tasks at once, so a limit
    # of 2 or more would never turn a copy away.
    with self.semaphore(tenant, max_leases=1) as acquired:
        if acquired:
            do_work(data)
        else:
            note("skipped")


@app.task(base=zkcelery.MutexTask, bind=True)
def mutex_task(self: zkcelery.MutexTask, data: dict) -> None:
    do_work(data)


@app.task(base=zkcelery.MutexTask, bind=True, mutex_requeue=True)
def requeued(self: zkcelery.MutexTask, data: dict) -> None:
    do_work(data)


@app.task(base=zkcelery.MutexTask, bind=True, mutex_keys=("server_name",))
def per_server(self: zkcelery.MutexTask, server_name: str, data: dict) -> None:
    do_work(data)


# ---------------------------------------------------------------------------
# The driver: scenes, each a few copies sent at once
# ---------------------------------------------------------------------------


def exactly(n: int) -> range:
    return range(n, n + 1)


def at_least(n: int) -> range:
    return range(n, 1000)


@dataclass
class Scene:
    title: str
    kind: str  # what the copies contend for: "lock", "lease" (a semaphore's) or "mutex"
    calls: list[tuple[Task, tuple]]  # (task, the arguments before ``data``)
    hold: float  # how long each body runs
    states: dict[str, list[str]]  # key -> the final states of its copies, sorted
    events: dict[tuple[str, str], range]  # (key, event) -> how many times it happens
    show_ls: bool = False  # run `python -m zkcelery ls` while two bodies run


SCENES = [
    Scene(
        "locking_task: self.lock() never waits; the copy without it skips its body",
        "lock",
        [(locking_task, ()), (locking_task, ())],
        hold=1.0,
        states={"locking_task()": ["SUCCESS", "SUCCESS"]},
        events={("locking_task()", "in"): exactly(1), ("locking_task()", "skipped"): exactly(1)},
    ),
    Scene(
        "refined: self.lock(a, retry=True, countdown=1) retries until 'report-1' is free",
        "lock",
        [(refined, ("report-1",)), (refined, ("report-1",)), (refined, ("report-2",))],
        hold=1.5,
        states={"refined('report-1')": ["SUCCESS"] * 2, "refined('report-2')": ["SUCCESS"]},
        events={
            ("refined('report-1')", "in"): exactly(2),
            ("refined('report-1')", "retrying"): at_least(1),
            ("refined('report-2')", "in"): exactly(1),
        },
    ),
    Scene(
        "waiting: self.lock(blocking=True) waits for the holder to finish",
        "lock",
        [(waiting, ()), (waiting, ())],
        hold=1.0,
        states={"waiting()": ["SUCCESS", "SUCCESS"]},
        events={("waiting()", "in"): exactly(2)},
    ),
    Scene(
        "limited: self.semaphore(tenant, max_leases=1), one lease per tenant at a time",
        "lease",
        [(limited, ("acme",)), (limited, ("acme",)), (limited, ("globex",))],
        hold=1.0,
        states={"limited('acme')": ["SUCCESS"] * 2, "limited('globex')": ["SUCCESS"]},
        events={
            ("limited('acme')", "in"): exactly(1),
            ("limited('acme')", "skipped"): exactly(1),
            ("limited('globex')", "in"): exactly(1),
        },
    ),
    Scene(
        "mutex_task: MutexTask rejects the second copy (state FAILURE, zkcelery.MutexHeld)",
        "mutex",
        [(mutex_task, ()), (mutex_task, ())],
        hold=1.0,
        states={"mutex_task()": ["REJECTED", "SUCCESS"]},
        events={("mutex_task()", "in"): exactly(1), ("mutex_task()", "rejected"): exactly(1)},
    ),
    Scene(
        "requeued: mutex_requeue=True sends the second copy back to the queue until it runs",
        "mutex",
        [(requeued, ()), (requeued, ())],
        hold=1.0,
        states={"requeued()": ["SUCCESS", "SUCCESS"]},
        events={("requeued()", "in"): exactly(2), ("requeued()", "requeued"): at_least(1)},
    ),
    Scene(
        "per_server: mutex_keys=('server_name',), one mutex per server",
        "mutex",
        [(per_server, ("db1",)), (per_server, ("db1",)), (per_server, ("db2",))],
        hold=2.0,
        states={"per_server('db1')": ["REJECTED", "SUCCESS"], "per_server('db2')": ["SUCCESS"]},
        events={
            ("per_server('db1')", "in"): exactly(1),
            ("per_server('db1')", "rejected"): exactly(1),
            ("per_server('db2')", "in"): exactly(1),
        },
        show_ls=True,
    ),
]

TEXTS = {  # by event, or by (event, kind) where the kind changes the words
    "in": "runs its body ({hold:g} s) holding the {kind}",
    "out": "body done; releases the {kind}",
    ("skipped", "lock"): "lock held elsewhere: falsy lease, body skipped",
    ("skipped", "lease"): "no lease left (max_leases=1): body skipped",
    "waits": "asks for the lock and blocks",
    "retrying": "lock held: body not run, self.retry(countdown=1)",
    "rejected": "mutex held: rejected, ends FAILURE (MutexHeld)",
    "requeued": "mutex held: rejected and requeued",
}


class DemoError(Exception):
    """The demo cannot go on (the worker died, a wait timed out)."""


@dataclass
class Copy:
    """One task sent by the driver."""

    task: Task
    args: tuple
    result: AsyncResult

    @property
    def key(self) -> str:  # as zkcelery names the lock, without the "demo." prefix
        return f"{self.task.name.rpartition('.')[2]}({', '.join(map(repr, self.args))})"

    def outcome(self) -> str:
        state = self.result.state
        if state == "FAILURE" and isinstance(self.result.result, zkcelery.MutexHeld):
            return "REJECTED"
        return state


@dataclass
class Run:
    """What the scenes share: the worker, the folders, the clock and the deadline."""

    folder: Path
    hosts: str
    root: str
    worker: subprocess.Popen
    deadline: float
    t0: float = 0.0

    def check_alive(self) -> None:
        if self.worker.poll() is not None:
            raise DemoError(f"the worker exited with status {self.worker.returncode}")
        if time.monotonic() > self.deadline:
            raise DemoError(f"the demo took more than {DEADLINE:g} s")

    def events(self) -> list[dict]:
        path = self.folder / TIMELINE
        found = []
        if path.exists():
            for line in path.read_text().splitlines():
                with contextlib.suppress(ValueError):
                    found.append(json.loads(line))
        return found


def run_scene(run: Run, number: int, scene: Scene) -> list[str]:
    """Send the scene's copies at once, wait for them, print their timeline; return problems."""
    copies = [
        Copy(task, args, task.delay(*args, {"hold": scene.hold})) for task, args in scene.calls
    ]
    if not run.t0:
        run.t0 = time.monotonic()
    ids = {copy.result.id: copy for copy in copies}
    rows: list[tuple[float, str]] = []  # (when, what to print)
    problems = []
    if scene.show_ls:
        wait_until(run, lambda: sum(e["event"] == "in" for e in own(run, ids)) >= 2)
        when, listing, ok = show_ls(run)
        rows.append((when, listing))
        if not ok:
            problems.append(f"python -m zkcelery ls failed:\n{listing}")
    wait_until(run, lambda: all(copy.result.ready() for copy in copies))
    events = own(run, ids)
    for e in events:
        copy = ids[e["id"]]
        text = TEXTS.get((e["event"], scene.kind)) or TEXTS.get(e["event"], e["event"])
        text = text.format(hold=scene.hold, kind=scene.kind)
        rows.append(
            (e["t"], f"pid {e['pid']:<8}  {e['id'][:8]}  {copy.key:19}  {text}"),
        )
    print(f"\n{number}. {scene.title}")
    for when, text in sorted(rows, key=lambda row: row[0]):
        print(f"  {when - run.t0:+6.2f}s  {text}")
    return problems + check(scene, copies, events)


def own(run: Run, ids: dict[str, Copy]) -> list[dict]:
    """The timeline events of these copies, in time order."""
    return sorted((e for e in run.events() if e["id"] in ids), key=lambda e: e["t"])


def wait_until(run: Run, predicate: Any, limit: float = 20.0) -> None:
    until = time.monotonic() + limit
    while not predicate():
        run.check_alive()
        if time.monotonic() > until:
            raise DemoError(f"a scene took more than {limit:g} s")
        time.sleep(0.05)


def show_ls(run: Run) -> tuple[float, str, bool]:
    """When, what ``python -m zkcelery ls`` printed (under its command line), whether it ran."""
    argv = ["--hosts", run.hosts, "--root", run.root, "ls"]
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "zkcelery", *argv],
        capture_output=True,
        text=True,
        timeout=20,
        env=worker_env(run.folder, run.hosts, run.root),
        check=False,
    )
    out = (done.stdout + done.stderr).rstrip()
    lines = [f"$ python -m zkcelery {' '.join(argv)}", *(f"    {x}" for x in out.splitlines())]
    return started, "\n".join(lines), done.returncode == 0


def check(scene: Scene, copies: list[Copy], events: list[dict]) -> list[str]:
    """Whether the scene went as the README says; one message per difference."""
    problems = []
    for key, expected in scene.states.items():
        got = sorted(copy.outcome() for copy in copies if copy.key == key)
        if got != sorted(expected):
            problems.append(f"{key}: final states {got}, expected {sorted(expected)}")
    by_id = {copy.result.id: copy for copy in copies}
    counts = Counter((by_id[e["id"]].key, e["event"]) for e in events)
    for (key, event), allowed in scene.events.items():
        if counts[key, event] not in allowed:
            problems.append(f"{key}: {counts[key, event]} '{event}' events, expected {allowed}")
    # The one guarantee behind it all: no two bodies of one key ever overlap.
    spans: dict[str, list[tuple[float, float]]] = {}
    starts: dict[str, float] = {}
    for e in events:
        if e["event"] == "in":
            starts[e["id"]] = e["t"]
        elif e["event"] == "out" and e["id"] in starts:
            spans.setdefault(by_id[e["id"]].key, []).append((starts.pop(e["id"]), e["t"]))
    for key, runs in spans.items():
        runs.sort()
        if any(later[0] < earlier[1] for earlier, later in zip(runs, runs[1:])):
            problems.append(f"{key}: two bodies ran at once")
    for e in events:
        if e["event"].startswith("log: "):
            problems.append(f"{by_id[e['id']].key}: {e['event']}")
    return problems


# ---------------------------------------------------------------------------
# The driver: ZooKeeper, the worker, and main()
# ---------------------------------------------------------------------------


def connect(hosts: str) -> KazooClient | None:
    """A client of the ensemble, or None when no quorum answers within a few seconds."""
    logging.getLogger("kazoo").setLevel(logging.CRITICAL)  # its retries are noise here
    client = KazooClient(hosts=hosts, timeout=10)
    try:
        client.start(timeout=4)
    except Exception:
        with contextlib.suppress(Exception):
            client.stop()
            client.close()
        return None
    return client


def worker_env(folder: Path, hosts: str, root: str) -> dict[str, str]:
    paths = [str(HERE), str(REPO), os.environ.get("PYTHONPATH", "")]
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in paths if p),
        "PYTHONDONTWRITEBYTECODE": "1",
        ENV_DIR: str(folder),
        ENV_HOSTS: hosts,
        ENV_ROOT: root,
    }


def start_worker(folder: Path, hosts: str, root: str) -> subprocess.Popen:
    for name in ("queue", "control", "processed", "results"):
        (folder / name).mkdir()
    argv = [
        sys.executable, "-m", "celery", "-A", "demo", "worker",
        "-P", "prefork", "-c", "2", "-n", f"zkcelery-demo-{os.getpid()}@%h",
        "--without-gossip", "--without-mingle", "--without-heartbeat",
        "-l", "INFO", "-f", str(folder / "worker.log"),
    ]  # fmt: skip
    with open(folder / "worker.err", "w") as err:
        # Its own process group: Ctrl-C reaches the driver only, and a stuck worker
        # can be killed with all its pool processes.
        return subprocess.Popen(
            argv,
            cwd=HERE,
            env=worker_env(folder, hosts, root),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )


def wait_ready(worker: subprocess.Popen, folder: Path, deadline: float) -> None:
    while not (folder / "ready").exists():
        if worker.poll() is not None:
            raise DemoError(f"the worker exited with status {worker.returncode}")
        if time.monotonic() > deadline:
            raise DemoError("the worker did not start within 30 s")
        time.sleep(0.05)


def stop_worker(worker: subprocess.Popen) -> None:
    """Warm shutdown (SIGTERM); SIGKILL to its process group when it does not end."""
    if worker.poll() is None:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(10)
        except subprocess.TimeoutExpired:
            print("the worker did not stop within 10 s: killing it", file=sys.stderr)
    # Also any pool process left behind by a worker that died or was killed.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(worker.pid, signal.SIGKILL)
    worker.wait(10)


def remove_root(client: KazooClient, root: str) -> None:
    """Delete the demo's znodes and close the client, giving up after 10 s."""

    def remove() -> None:
        with contextlib.suppress(Exception):
            client.delete(root, recursive=True)
        with contextlib.suppress(Exception):  # the shared parent, unless another run uses it
            client.delete(root.rsplit("/", 1)[0])
        with contextlib.suppress(Exception):
            client.stop()
            client.close()

    # kazoo's calls wait for a connection without a limit: never let cleanup hang.
    cleaner = threading.Thread(target=remove, daemon=True)
    cleaner.start()
    cleaner.join(10)


def tail(path: Path, lines: int = 25) -> str:
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hosts", help="ZooKeeper hosts (default: .zk-test/hosts)")
    hosts = parser.parse_args(argv).hosts or ensemble_hosts()
    client = connect(hosts)
    if client is None:
        print(f"demo: no ZooKeeper answers at {hosts}: run ./zk-test.sh", file=sys.stderr)
        return 2
    # SIGTERM (a CI timeout) cleans up like Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.monotonic()
    root = f"/zkcelery-demo/{uuid.uuid4().hex[:12]}"
    folder = Path(tempfile.mkdtemp(prefix="zkcelery-demo-"))
    os.environ.update({ENV_DIR: str(folder), ENV_HOSTS: hosts, ENV_ROOT: root})
    configure(app)
    worker = None
    problems: list[str] = []
    stopped_in = 0.0
    try:
        worker = start_worker(folder, hosts, root)
        wait_ready(worker, folder, started + 30)
        ready = time.monotonic() - started
        print(
            f"zkcelery demo: worker pid {worker.pid} (prefork, 2 processes), ready in {ready:.1f} s"
        )
        print(f"ZooKeeper {hosts}, root {root}")
        print(f"  {'time':>7}  {'pool process':12}  {'task id':8}  {'lock key':19}  what happened")
        run = Run(folder, hosts, root, worker, started + DEADLINE)
        for number, scene in enumerate(SCENES, 1):
            problems += run_scene(run, number, scene)
    except DemoError as exc:
        problems.append(str(exc))
    except KeyboardInterrupt:
        problems.append("interrupted")
    finally:
        if worker is not None:
            stopping = time.monotonic()
            stop_worker(worker)
            stopped_in = time.monotonic() - stopping
        remove_root(client, root)
        if problems:
            print("\nthe worker's last log lines:", file=sys.stderr)
            print(tail(folder / "worker.log") or tail(folder / "worker.err"), file=sys.stderr)
        shutil.rmtree(folder, ignore_errors=True)
    took = time.monotonic() - started
    if problems:
        print(f"\nFAILED after {took:.1f} s:", *problems, sep="\n  ", file=sys.stderr)
        return 1
    print(
        f"\nevery task ended as expected, in {took:.1f} s; "
        f"worker stopped in {stopped_in:.1f} s; {root} deleted"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
