"""Fixtures for zkcelery's tests: a real ZooKeeper ensemble, apps and real workers.

Nothing here is a fake.  The ensemble is the one ``./zk-test.sh`` starts (three
servers on loopback); when it does not answer, every test that needs it fails
with the message to start it.  Workers are real ``celery worker`` processes
(prefork unless a test asks otherwise) on kombu's filesystem transport, so
that they need no broker server.
The tests whose outcome depends on the broker (acknowledgement, requeue,
redelivery) use ``broker_workers`` instead: the same workers on the RabbitMQ
and on the Redis that ``./zk-test.sh`` also starts, once on each.

Each test gets its own ``ZOOKEEPER_ROOT`` and its own broker folder (or queue
and Redis keys), so tests may run in any order and in parallel.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
from celery import Celery
from hypothesis import settings as hypothesis_settings
from hypothesis.configuration import set_hypothesis_home_dir
from kazoo.client import KazooClient
from kazoo.exceptions import NoNodeError

import testinternals as internals
from testalone import meeting_folder
from testsupport import (
    Partition,
    ProxiedEnsemble,
    ensemble_hosts,
    four_letter,
    zk_test_port,
)
from testtasks import CONNECT_TIMEOUT, SESSION_TIMEOUT, broker_settings

# The tests marked alone run with no other beside them (testalone.py).
pytest_plugins = ["testalone"]

# No example database, and hypothesis's caches in a temporary folder: a run leaves no
# .hypothesis folder in the checkout (a failure prints its falsifying example, and how
# to reproduce it, instead).
hypothesis_settings.register_profile("zkcelery", database=None)
hypothesis_settings.load_profile("zkcelery")
set_hypothesis_home_dir(str(Path(tempfile.gettempdir()) / "zkcelery-hypothesis"))  # one, reused

HERE = Path(__file__).resolve().parent
ZK_TEST = HERE / "zk-test.sh"
START_HINT = "no ZooKeeper ensemble answers at {hosts}: run ./zk-test.sh to start one"
#: zk-test.sh's highest base port (server 3's election port is base + 20003).
MAX_BASE_PORT = 65535 - 20003
#: The TLS test ensemble's base port, from the test ensemble's.
TLS_OFFSET = 300


# ---------------------------------------------------------------------------
# The ensemble
# ---------------------------------------------------------------------------


class Ensemble:
    """Control of the test ensemble, through ``zk-test.sh``, for fault tests."""

    def __init__(self, hosts: str) -> None:
        self.hosts = hosts

    def _run(self, *args: str, check: bool = True) -> str:
        env = {**os.environ, "ZK_TEST_BROKERS": "none"}  # the ensemble only, never the brokers
        done = subprocess.run(
            [str(ZK_TEST), *args], env=env, capture_output=True, text=True, timeout=120,
            check=False,
        )  # fmt: skip
        if check and done.returncode != 0:
            raise RuntimeError(f"zk-test.sh {' '.join(args)} failed:\n{done.stdout}{done.stderr}")
        return done.stdout.strip()

    def leader(self) -> int:
        return int(self._run("leader"))

    def stop_server(self, n: int) -> None:
        self._run("stop-server", str(n))

    def kill_server(self, n: int) -> None:
        self._run("kill-server", str(n))

    def start_server(self, n: int) -> None:
        self._run("start-server", str(n))

    def wait_quorum(self) -> None:
        self._run("wait")

    def stop(self) -> None:
        self._run("stop")

    def start(self) -> None:
        self._run()

    def status(self) -> str:
        return self._run("status", check=False)


@pytest.fixture
def zk_hosts(request: pytest.FixtureRequest, ensemble_hosts_checked: str) -> str:
    """The hosts of the ensemble this test runs on: the test ensemble's.

    Parametrized indirectly with ``"no-ttl"``, those of the second ensemble,
    whose servers keep ZooKeeper's default and make no TTL nodes.
    """
    if getattr(request, "param", "ttl") == "no-ttl":
        return request.getfixturevalue("second_ensemble").hosts  # type: ignore[no-any-return]
    return ensemble_hosts_checked


#: Run a test on both ensembles: with TTL nodes, and without (ZooKeeper's default).
both_ttl = pytest.mark.parametrize("zk_hosts", ["ttl", "no-ttl"], indirect=True)


@pytest.fixture(scope="session")
def ensemble_hosts_checked() -> str:
    """The test ensemble's hosts; fails (never skips) when no quorum answers."""
    hosts = ensemble_hosts()
    client = KazooClient(hosts=hosts, timeout=SESSION_TIMEOUT)
    try:
        client.start(timeout=4)
        answered = True
    except Exception:
        answered = False
    finally:
        with contextlib.suppress(Exception):
            client.stop()
            client.close()
    if not answered:
        pytest.fail(START_HINT.format(hosts=hosts), pytrace=False)
    with open(meeting_folder() / "runs", "a") as runs:
        runs.write(f"{_run_id()}\n")  # this run cleans up at its end (pytest_sessionfinish)
    return hosts


@pytest.fixture(scope="session")
def ensemble(ensemble_hosts_checked: str) -> Iterator[Ensemble]:
    """Start/stop servers; after a fault test, every server is brought back.

    Only the ensemble ``zk-test.sh`` runs: a fault test pointed elsewhere
    (``ZK_TEST_HOSTS``) fails rather than stop servers it was not given.
    """
    control = Ensemble(ensemble_hosts_checked)
    managed = control._run("hosts", check=False)
    if managed != ensemble_hosts_checked:
        pytest.fail(
            f"fault tests stop and start servers through zk-test.sh, which runs {managed!r};"
            f" the tests were given {ensemble_hosts_checked!r} (ZK_TEST_HOSTS): run them on"
            " the ensemble ./zk-test.sh started, or deselect them with -m 'not slow'",
            pytrace=False,
        )
    yield control
    control.start()


@pytest.fixture
def restore_ensemble(ensemble: Ensemble) -> Iterator[Ensemble]:
    """For tests that stop servers: bring all three back, with a quorum, afterwards."""
    yield ensemble
    ensemble.start()
    ensemble.wait_quorum()


@dataclass
class SecondEnsemble:
    """The second ensemble's plain hosts, its TLS hosts and the CA that signed them."""

    hosts: str
    tls_hosts: str
    ca: str


@pytest.fixture(scope="session")
def second_ensemble(ensemble_hosts_checked: str) -> Iterator[SecondEnsemble]:
    """A second 3-server ensemble, started once when a test asks: TLS on, TTL nodes off.

    Its ports follow the test ensemble's: 300 above its base port (below, near the
    top of the range), so that neither ensemble's client, TLS (+100), quorum
    (+10000) or election (+20000) ports meet the other's.
    """
    port = _second_port()
    _second_ensemble_run()  # zk-test.sh's own lock: the run's other processes reuse it
    tls_hosts, ca = _second_ensemble_run("tls-hosts").split()
    yield SecondEnsemble(",".join(f"127.0.0.1:{port + n}" for n in range(3)), tls_hosts, ca)


def _second_port() -> int:
    base = zk_test_port()
    return base + TLS_OFFSET if base + TLS_OFFSET <= MAX_BASE_PORT else base - TLS_OFFSET


def _second_ensemble_run(*args: str) -> str:
    env = {**os.environ, "ZK_TEST_PORT": str(_second_port()),
           "ZK_TEST_DIR": str(meeting_folder() / "second-ensemble"),
           "ZK_TEST_TLS": "1", "ZK_TEST_TTL": "0", "ZK_TEST_BROKERS": "none"}  # fmt: skip
    done = subprocess.run([str(ZK_TEST), *args], env=env, capture_output=True, text=True,
                          timeout=120, check=False)  # fmt: skip
    if done.returncode:
        raise RuntimeError(f"zk-test.sh {args} failed:\n{done.stdout}{done.stderr}")
    return done.stdout


def _run_id() -> str:
    """This run's id: set by the first process (before xdist starts its workers), inherited."""
    return os.environ.setdefault("ZKCELERY_TEST_RUN", uuid.uuid4().hex)


def pytest_configure(config: pytest.Config) -> None:
    _run_id()


def pytest_sessionfinish(session: pytest.Session) -> None:
    # Once, in the process that ran or dispatched every test (never an xdist worker), if
    # a test of this run used the ensemble (a run that did not, `pytest -m "not zk"`
    # beside a whole run, say, must not stop anything under that run's tests): the second
    # ensemble, if a test started it, and the run's meeting folder.
    if hasattr(session.config, "workerinput"):
        return
    folder = meeting_folder(make=False)
    try:
        if _run_id() not in (folder / "runs").read_text().split():
            return
    except OSError:
        return
    if (folder / "second-ensemble").exists():
        _second_ensemble_run("stop", "--clean")
    with contextlib.suppress(OSError):
        for path in folder.iterdir():
            path.unlink()
        folder.rmdir()


@pytest.fixture
def tls_ensemble(second_ensemble: SecondEnsemble) -> tuple[str, str]:
    """The second ensemble's TLS hosts and the CA's path."""
    return second_ensemble.tls_hosts, second_ensemble.ca


class CaughtUpClient(KazooClient):
    """A client whose reads first catch up with the leader (``sync``).

    The server it reads from may be a follower that has not yet applied what
    another session wrote a moment ago (a waiter's node, a holder's data): a
    test that saw a change through zkcelery must see it here too.
    """

    def get(self, path: str, watch: Any = None) -> Any:
        self.sync(path)
        return super().get(path, watch)

    def get_children(self, path: str, *args: Any, **kwargs: Any) -> Any:
        self.sync(path)
        return super().get_children(path, *args, **kwargs)

    def exists(self, path: str, watch: Any = None) -> Any:
        self.sync(path)
        return super().exists(path, watch)


@pytest.fixture
def zk(zk_hosts: str) -> Iterator[KazooClient]:
    """An independent client, for looking at znodes from outside zkcelery."""
    client = CaughtUpClient(hosts=zk_hosts, timeout=SESSION_TIMEOUT * 2)
    client.start(timeout=10)
    yield client
    with contextlib.suppress(Exception):
        client.stop()
        client.close()


@pytest.fixture
def zk_root(request: pytest.FixtureRequest, zk: KazooClient) -> Iterator[str]:
    """This test's own ZOOKEEPER_ROOT, removed afterwards."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", request.node.name)[:60]
    root = f"/zkcelery-tests/{name}-{uuid.uuid4().hex[:8]}"
    yield root
    for identity in TEST_IDENTITIES:  # whoever made a node under it may delete it
        with contextlib.suppress(Exception):
            zk.add_auth("digest", identity)
    with contextlib.suppress(Exception):
        zk.delete(root, recursive=True)


#: The digest identities the tests use in ZOOKEEPER_AUTH (user:password).
TEST_IDENTITIES = ("worker:s3cret", "other:pw")


def count_znodes(client: KazooClient, path: str) -> int:
    """How many znodes are at and below ``path`` (a container may go while we count)."""
    try:
        children = client.get_children(path)
    except NoNodeError:
        return 0
    return 1 + sum(count_znodes(client, f"{path}/{c}") for c in children)


#: The proxied ensembles' base ports, from the test ensemble's: the test timing's, the
#: stock timing's, and the test timing's again for the client-link test, so that it runs
#: beside the other two (their proxies are on their quorum and election ports plus 10-33).
PROXIED_OFFSETS = {"fast": 2000, "stock": 3000, "client": 4000}


@pytest.fixture
def proxied_ensemble(
    request: pytest.FixtureRequest, zk_hosts: str, tmp_path: Path
) -> Iterator[ProxiedEnsemble]:
    """A 3-server ensemble of its own whose peer links go through proxies in this process
    (``network``: cut, one way or both, delay, flap, heal), started for the test and
    stopped after it.  Parametrized indirectly with "fast" (the test timing), "stock"
    (tickTime 2000, ZooKeeper's default session bounds) or "client" (the test timing on
    ports of its own).  It uses ``zk_hosts`` only to
    be marked ``zk``: it needs Java and ZooKeeper as the test ensemble does."""
    timing = getattr(request, "param", "fast")
    base = zk_test_port() + PROXIED_OFFSETS[timing]
    if base > 45502:  # the last proxy's port is base + 20033
        base -= 2 * PROXIED_OFFSETS[timing]
    ensemble = ProxiedEnsemble(base, tmp_path / f"proxied-{timing}", stock=timing == "stock")
    try:
        ensemble.wait_serving()
        yield ensemble
    finally:
        ensemble.stop()


@pytest.fixture
def partition(zk_hosts: str) -> Iterator[Partition]:
    """A cuttable link to the ensemble's first server."""
    host, port = zk_hosts.split(",")[0].rsplit(":", 1)
    proxy = Partition((host, int(port)))
    yield proxy
    proxy.close()


# ---------------------------------------------------------------------------
# Apps
# ---------------------------------------------------------------------------


def configure(app: Celery, hosts: str, root: str, **settings: Any) -> Celery:
    defaults = {
        "ZOOKEEPER_HOSTS": hosts,
        "ZOOKEEPER_ROOT": root,
        "ZOOKEEPER_SESSION_TIMEOUT": SESSION_TIMEOUT,
        "ZOOKEEPER_CONNECT_TIMEOUT": CONNECT_TIMEOUT,
    }
    app.conf.update({**defaults, **settings})
    return app


@pytest.fixture
def make_app(zk_hosts: str, zk_root: str) -> Iterator[Callable[..., Celery]]:
    """Build in-process apps on this test's namespace; their sessions close afterwards."""
    apps: list[Celery] = []

    def make(**settings: Any) -> Celery:
        app = Celery(f"test-{len(apps)}", set_as_current=False)
        app.conf.update(
            broker_url="memory://", result_backend="cache+memory://", task_always_eager=False
        )
        apps.append(configure(app, zk_hosts, zk_root, **settings))
        return app

    yield make
    for app in apps:
        close_sessions(app)


def close_sessions(app: Celery) -> None:
    """Close an app's session in this process, as worker shutdown does."""
    conn = internals.sessions.pop(app, None)
    if conn is not None:
        conn.close()


@pytest.fixture
def app(make_app: Callable[..., Celery]) -> Celery:
    return make_app()


@pytest.fixture
def offline_app() -> Iterator[Celery]:
    """An app for tests that need no server: its hosts answer nothing (port 1)."""
    app = Celery("offline", set_as_current=False)
    app.conf.update(broker_url="memory://", ZOOKEEPER_HOSTS="127.0.0.1:1")
    yield app
    close_sessions(app)


@pytest.fixture
def threads_worker(app: Celery) -> Iterator[Any]:
    """An in-process worker with the threads pool, on the ``app`` fixture."""
    from celery.contrib.testing.worker import start_worker

    with start_worker(app, pool="threads", concurrency=4, perform_ping_check=False) as worker:
        yield worker


# ---------------------------------------------------------------------------
# Real worker processes
# ---------------------------------------------------------------------------


def most_at_once(spans: list[tuple[float, float]]) -> int:
    """The most of the (start, end) spans that ever overlap (one ending as one starts: not)."""
    events = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans])
    level = peak = 0
    for _, step in events:
        level += step
        peak = max(peak, level)
    return peak


class Record:
    """An enter/exit record kept in files, independent of zkcelery's view."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def entries(self) -> list[dict]:
        found = []
        for path in self.folder.glob("*.log"):
            for line in path.read_text().splitlines():
                with contextlib.suppress(ValueError):
                    found.append(json.loads(line))
        return sorted(found, key=lambda e: e["enter"])

    def failures(self) -> list[tuple[str, str]]:
        """(task id, exception type) of every ``task_failure`` signal, as noted."""
        found = []
        for path in self.folder.glob("*.failures"):
            found += [tuple(json.loads(line)) for line in path.read_text().splitlines()]
        return sorted(found)

    def notes(self, suffix: str) -> list[dict]:
        """The JSON lines the workers' processes noted in ``*.<suffix>`` files (signals...)."""
        found = []
        for path in self.folder.glob(f"*.{suffix}"):
            for line in path.read_text().splitlines():
                with contextlib.suppress(ValueError):
                    found.append(json.loads(line))
        return found

    def max_concurrent(self, key: Any = None) -> int:
        """The most bodies of ``key`` (or of any key) that ever ran at once."""
        return most_at_once(
            [(e["enter"], e["exit"]) for e in self.entries() if key is None or e["key"] == key]
        )

    def overlaps(self) -> list[tuple[dict, dict]]:
        """Pairs of bodies of the same key that overlapped in time."""
        last: dict[str, dict] = {}
        found = []
        for e in self.entries():
            prev = last.get(e["key"])
            if prev is not None and e["enter"] < prev["exit"]:
                found.append((prev, e))
            if prev is None or e["exit"] > prev["exit"]:
                last[e["key"]] = e
        return found


class Worker:
    """One ``celery worker`` subprocess."""

    def __init__(self, proc: subprocess.Popen, log: Path, ready: Path) -> None:
        self.proc, self.log, self.ready = proc, log, ready

    @property
    def pid(self) -> int:
        return self.proc.pid

    def children(self) -> list[int]:
        out = subprocess.run(
            ["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True, check=False
        )
        return [int(p) for p in out.stdout.split()]

    def wait_ready(self, timeout: float = 60) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.tail()}")
            return self.ready.exists()

        wait_for(ready, timeout, lambda: f"for the worker to be ready:\n{self.tail()}", 0.05)

    def stop(self, timeout: float = 20) -> None:
        """Warm shutdown (SIGTERM); SIGKILL to the whole group if it does not end."""
        self.terminate()
        self.wait(timeout)

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = 20) -> None:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def tail(self, lines: int = 60) -> str:
        if not self.log.exists():
            return "(no log)"
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


class Workers:
    """Start worker processes, and a client app that talks to them, for one test.

    With a ``broker``, the workers and the client use it, on a queue (and, on
    Redis, keys) of this test's own; ``configure()`` sets its transport options.
    """

    def __init__(self, tmp: Path, hosts: str, root: str, broker: Broker | None = None) -> None:
        self.tmp, self.hosts, self.root, self.broker = tmp, hosts, root, broker
        self.record = Record(tmp / "record")
        self.record.folder.mkdir()
        self.started: list[Worker] = []
        self.queue = f"zkt-{uuid.uuid4().hex[:12]}"
        self.options = broker.transport_options(self.queue) if broker else {}
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
            "ZKCELERY_TEST_BROKER": str(tmp / "broker"),
            "ZKCELERY_TEST_HOSTS": hosts,
            "ZKCELERY_TEST_ROOT": root,
            "ZKCELERY_TEST_RECORD": str(self.record.folder),
        }
        if broker:
            self.env.update(ZKCELERY_TEST_BROKER_URL=broker.url, ZKCELERY_TEST_QUEUE=self.queue)
        self.app = Celery("zkcelery-tests-client", set_as_current=False)
        self.configure()

    def configure(self, **transport_options: Any) -> None:
        """Add broker transport options, for the workers started from now on and the client."""
        self.options.update(transport_options)
        self.env["ZKCELERY_TEST_TRANSPORT_OPTIONS"] = json.dumps(self.options)
        url = self.broker.url if self.broker else None
        self.app.conf.update(broker_settings(self.tmp / "broker", url, self.queue, self.options))

    def start(
        self,
        pool: str = "prefork",
        concurrency: int = 2,
        wait: bool = True,
        queues: str | None = None,
        host: str | None = None,
        **env: str,
    ) -> Worker:
        """Start a ``celery worker``; ``queues`` limits what it consumes (``-Q``).

        With ``host``, the worker runs in a UTS namespace of its own under that
        host name: to this machine's zkcelery it is a worker on another host.
        """
        n = len(self.started)
        log, ready = self.tmp / f"worker{n}.log", self.tmp / f"worker{n}.ready"
        # A node name of this test's own: RabbitMQ lets one connection at a time hold a
        # node's control queue (<name>.celery.pidbox), so tests beside each other on one
        # broker must not share names.
        argv = [
            sys.executable, "-m", "celery", "-A", "testtasks", "worker",
            "-P", pool, "-c", str(concurrency), "-n", f"w{n}-{self.queue}@%h", "-l", "INFO",
            "--without-gossip", "--without-mingle", "--without-heartbeat",
            "-f", str(log), *(["-Q", queues] if queues else []),
        ]  # fmt: skip
        if host is not None:
            argv = ["unshare", "--uts", "sh", "-c", f'hostname {host} && exec "$@"', "sh", *argv]
        proc = subprocess.Popen(
            argv, cwd=HERE, env={**self.env, "ZKCELERY_TEST_READY": str(ready), **env},
            stdout=subprocess.DEVNULL,
            stderr=open(self.tmp / f"worker{n}.err", "w"),  # noqa: SIM115 - the worker's to keep
            start_new_session=True,
        )  # fmt: skip
        worker = Worker(proc, log, ready)
        self.started.append(worker)
        if wait:
            worker.wait_ready()
        return worker

    def send(self, name: str, *args: Any, **options: Any) -> Any:
        """Send task ``name`` (as the worker module names it) with ``args``."""
        return self.app.send_task(f"testtasks.{name}", args=args, **options)

    def stop(self) -> None:
        # All at once: a warm shutdown takes seconds even when idle.
        for worker in self.started:
            worker.terminate()
        for worker in self.started:
            worker.wait()

    def kill(self) -> None:
        """SIGKILL every worker's process group: the end of a test, where a warm
        shutdown (seconds each) proves nothing (a test of its own does that)."""
        for worker in self.started:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(worker.pid, signal.SIGKILL)
        for worker in self.started:
            worker.proc.wait(10)

    def logs(self) -> str:
        return "\n".join(f"--- worker {w.pid}\n{w.tail()}" for w in self.started)


def _running(
    group: Workers, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Workers]:
    """Yield ``group``; stop its workers afterwards and show their logs if the test failed."""
    monkeypatch.setenv("ZKCELERY_TEST_RECORD", str(group.record.folder))  # in-process bodies
    yield group
    group.kill()
    close_sessions(group.app)  # a sender's session, and one for revocations
    session = internals.revocation_sessions.pop(group.app, None)
    if session is not None:
        session.close()
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(group.logs())


@pytest.fixture
def workers(
    tmp_path: Path,
    zk_hosts: str,
    zk_root: str,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Workers]:
    """Real ``celery worker`` subprocesses on this test's namespace and broker."""
    yield from _running(Workers(tmp_path, zk_hosts, zk_root), request, monkeypatch)


@pytest.fixture
def broker_workers(
    tmp_path: Path,
    zk_hosts: str,
    zk_root: str,
    broker: Broker,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Workers]:
    """``workers`` on a real broker: RabbitMQ, then Redis (see the ``broker`` fixture)."""
    group = Workers(tmp_path, zk_hosts, zk_root, broker)
    yield from _running(group, request, monkeypatch)
    broker.forget(group.queue)


# ---------------------------------------------------------------------------
# Real brokers: the RabbitMQ and the Redis that ./zk-test.sh starts
# ---------------------------------------------------------------------------

BROKER_HINT = (
    "no {name} that zk-test.sh started answers at {url}: run ./zk-test.sh (it starts"
    " ZooKeeper, RabbitMQ and Redis),"
    " or ./zk-test.sh start-brokers {kind}"
)


def broker_url(kind: str) -> str:
    """The URL of the test broker: its port from the environment, as ``zk-test.sh`` reads it."""
    variable, default = {"rabbitmq": ("ZK_TEST_AMQP_PORT", 5672),
                         "redis": ("ZK_TEST_REDIS_PORT", 6379)}[kind]  # fmt: skip
    port = int(os.environ.get(variable) or default)
    if kind == "rabbitmq":
        return f"amqp://guest:guest@127.0.0.1:{port}//"
    return f"redis://127.0.0.1:{port}/0"


class Broker:
    """One test broker: its URL, and a look at a queue from the broker's side."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.url = broker_url(kind)
        self.name = {"rabbitmq": "RabbitMQ", "redis": "Redis"}[kind]

    def ours(self) -> bool:
        """Whether zk-test.sh runs this broker (never a system one that happens to answer)."""
        port = self.url.rsplit(":", 1)[1].split("/")[0]
        variable = {"rabbitmq": "ZK_TEST_AMQP_PORT", "redis": "ZK_TEST_REDIS_PORT"}[self.kind]
        done = subprocess.run(
            [str(ZK_TEST), "broker-status"], env={**os.environ, variable: port},
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        return any(
            line.split()[:2] == [self.kind, "running"] and self.url in line
            for line in done.stdout.splitlines()
        )

    def answers(self) -> bool:
        client = self._redis() if self.kind == "redis" else None  # no client library: an error
        try:
            if client is not None:
                return bool(client.ping())
            from kombu import Connection

            with Connection(self.url, connect_timeout=3) as conn:
                conn.connect()
            return True
        except Exception:
            return False

    def _redis(self) -> Any:
        import redis

        return redis.Redis.from_url(self.url, socket_timeout=5, socket_connect_timeout=3)

    def transport_options(self, queue: str) -> dict[str, Any]:
        """Options that keep a test's messages apart: on Redis, its own unacked keys."""
        if self.kind != "redis":
            return {}
        return {
            "unacked_key": f"{queue}.unacked",
            "unacked_index_key": f"{queue}.unacked_index",
            "unacked_mutex_key": f"{queue}.unacked_mutex",
        }

    def left(self, queue: str) -> int:
        """Messages of ``queue`` still in the broker, ready or unacknowledged, once no
        consumer is attached (after ``Workers.stop``: a worker acknowledges a late-acked
        message after storing its result, so a kill can leave the last one unacked).

        RabbitMQ requeues what a consumer held when its connection closes, so with
        the consumers gone a passive declare counts both; Redis keeps unacknowledged
        messages in a hash until a sweep restores them, so both are counted there.
        No ``rabbitmqctl``: each call of it starts an Erlang VM.
        """
        if self.kind == "redis":
            client = self._redis()
            # kombu keeps one list per priority step: the queue's name, then suffixed.
            lists = [k for k in client.scan_iter(match=f"{queue}*") if client.type(k) == b"list"]
            return int(sum(client.llen(k) for k in lists) + client.hlen(f"{queue}.unacked"))
        from kombu import Connection

        with Connection(self.url, connect_timeout=3) as conn:
            channel = conn.default_channel

            def drained() -> tuple[int] | bool:
                try:
                    ok = channel.queue_declare(queue, passive=True)
                except conn.channel_errors:
                    return (0,)  # never declared: nothing in it
                return ok.consumer_count == 0 and (ok.message_count,)

            (count,) = wait_for(drained, 20, "the queue's consumers to be gone")
            return int(count)

    def restore_unacked(self, options: dict[str, Any]) -> None:
        """Redis: what every consumer does now and then (how often depends on kombu's
        version): give messages unacknowledged for ``visibility_timeout`` to a consumer again.
        """
        from kombu import Connection

        with Connection(self.url, transport_options=options, connect_timeout=3) as conn:
            conn.default_channel.qos.restore_visible(num=1000, interval=1)

    def forget(self, queue: str) -> None:
        """Delete what a test left in the broker under its queue's name."""
        with contextlib.suppress(Exception):
            if self.kind == "redis":
                client = self._redis()
                keys = list(client.scan_iter(match=f"*{queue}*"))
                if keys:
                    client.delete(*keys)
                for key in client.scan_iter(match="_kombu.binding.*"):
                    for member in client.smembers(key):
                        if queue.encode() in member:
                            client.srem(key, member)
            else:
                from kombu import Connection

                with Connection(self.url, connect_timeout=3) as conn:
                    channel = conn.default_channel
                    channel.queue_delete(queue)
                    channel.exchange_delete(queue)


_answering: dict[str, bool] = {}


@pytest.fixture(params=["rabbitmq", "redis"])
def broker(request: pytest.FixtureRequest) -> Broker:
    """A real broker, RabbitMQ then Redis; fails (never skips) when it does not answer."""
    found = Broker(request.param)
    if found.kind not in _answering:
        _answering[found.kind] = found.ours() and found.answers()
    if not _answering[found.kind]:
        pytest.fail(BROKER_HINT.format(name=found.name, url=found.url, kind=found.kind),
                    pytrace=False)  # fmt: skip
    return found


_figures: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    # Where the reports of every test arrive (xdist sends its workers' here too).
    if report.when == "teardown":
        _figures.extend(f"{report.nodeid.split('::')[-1]}: {value}"
                        for name, value in report.user_properties if name == "figures")  # fmt: skip


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _figures:
        terminalreporter.section("figures measured by the tests")
        for line in _figures:
            terminalreporter.write_line(line)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Any:
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


def wait_for(
    predicate: Callable[[], Any],
    timeout: float = 20,
    what: str | Callable[[], str] = "condition",
    interval: float = 0.02,
) -> Any:
    """Poll ``predicate`` every ``interval`` seconds until it is truthy, and return its value.

    After ``timeout`` seconds, fail naming ``what`` (a callable is asked then, for a
    message that shows the state at that moment).  Every wait of the tests comes here.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            said = what() if callable(what) else f"waiting for {what}"
            raise AssertionError(f"timed out after {timeout} s {said}")
        time.sleep(interval)


def expire_session(app_or_client: Any, hosts: str) -> None:
    """Expire a ZooKeeper session for real, as kazoo's own harness does.

    Another client attaches to the same session id and password and closes
    it: the server ends the session, deletes its ephemeral nodes, and the
    owner learns it only when it next talks to the server (LOST).
    """
    client = app_or_client
    if isinstance(app_or_client, Celery):
        client = internals.session(app_or_client).client
    session_id, password = client.client_id
    thief = KazooClient(hosts=hosts, client_id=(session_id, password))
    thief.start(timeout=10)
    thief.stop()
    thief.close()


def _each_server(hosts: str, word: str) -> Iterator[str]:
    """Each server's answer to a four-letter ``word``; none from a server that is down
    (another test's fault), which holds no connection or watch of ours."""
    for entry in hosts.split(","):
        with contextlib.suppress(OSError):
            yield four_letter(entry, word)


def session_requests(hosts: str, app: Celery) -> int:
    """Packets the servers have received from ``app``'s session on its connection (``cons``).

    Other clients of the ensemble (idle pings, other tests' sessions) do not count.
    """
    sid = f"sid={internals.session(app).session_id:#x},"
    for answer in _each_server(hosts, "cons"):
        for line in answer.splitlines():
            if sid in line:
                return int(re.search(r"recved=(\d+)", line).group(1))  # type: ignore[union-attr]
    raise AssertionError(f"no server has a connection of the session {sid}")


def watching(hosts: str, app: Celery, path: str) -> bool:
    """Whether ``app``'s session has a watch set on ``path`` (the servers' ``wchp``).

    The servers' own word that a waiter is in place: it has sent and had
    answered the request that watches what it waits for.
    """
    session_id = internals.session(app).session_id
    if session_id is None:  # not connected yet
        return False
    sid = f"{session_id:#x}"
    for answer in _each_server(hosts, "wchp"):
        watched = None
        for line in answer.splitlines():
            if line.startswith("/"):
                watched = line.strip()
            elif watched == path and line.strip() == sid:
                return True
    return False


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # A test needs the ensemble exactly when it uses the zk_hosts fixture, directly
    # or through another; `pytest -m "not zk"` runs the rest with no server at all.
    # tryfirst: before pytest's own -m selection looks at the markers.
    for item in items:
        if "zk_hosts" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.zk)
