"""Prometheus metrics of zkcelery's locks, and the exporter: zkcelery's companion for observability.

Two sources, because the facts are born in two places (README.md,
"Observability", is the manual):

- **The processes that take leases** count what happens to them: receivers of
  zkcelery's signals keep counters and histograms (:class:`_Metrics`), served
  by :func:`start_metrics_server`.  A worker whose ``ZOOKEEPER_METRICS_PORT``
  is set, or a beat with ``ZOOKEEPER_BEAT_METRICS_PORT``, serves them itself
  (zkcelery imports this module then).  A prefork pool's children take the
  leases and come and go: such a worker uses prometheus_client's
  multiprocess mode, in a folder of its own that goes with it.
- **The exporter**, ``python -m zkcelery exporter --port N`` (or ``celery -A
  proj zk exporter``), serves gauges of the whole deployment (who holds, who
  waits, the oldest hold, the beat leader) from :class:`TreeView`, a copy of
  the tree that ZooKeeper's watches keep current: a scrape sends no request.
  ``ls --watch`` lists the same copy again at each change.

This module runs beside the workers, not in them: it imports only zkcelery's
public names.  The metrics and the exporter need prometheus_client (``pip
install 'zkcelery[metrics]'``); ``ls --watch`` does not.
``zkcelery.start_metrics_server`` and ``zkcelery.TreeView`` are this module's.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import types
from collections.abc import Collection, Iterable, Iterator
from datetime import datetime
from typing import TYPE_CHECKING, Any, Callable

import celery
import click
from celery import signals
from kazoo.protocol.states import KazooState, ZnodeStat
from kazoo.recipe.cache import TreeCache, TreeEvent

import zkcelery
from zkcelery import ConfigurationError, Lease, ZKCeleryError

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

__all__ = [
    "TreeView",
    "exporter_command",
    "ls_watch",
    "serve_beat_metrics",
    "serve_worker_metrics",
    "start_metrics_server",
]


_logger = logging.getLogger("zkcelery")


def _log(level: int, msg: str, *args: Any, **facts: Any) -> None:
    """As zkcelery logs: on its logger, ``facts`` as the record's attributes (README, Logging)."""
    if _logger.isEnabledFor(level):
        _logger.log(level, msg, *args, extra=facts)


def _prometheus() -> types.ModuleType:
    """prometheus_client, or a clear error naming the extra that installs it."""
    try:
        import prometheus_client
    except ImportError as exc:
        raise ConfigurationError(
            "zkcelery's metrics need prometheus_client, which is not installed: "
            "pip install 'zkcelery[metrics]'"
        ) from exc
    return prometheus_client


# ---------------------------------------------------------------------------
# Metrics from the signals, in the processes that take leases
# ---------------------------------------------------------------------------


def start_metrics_server(port: int, addr: str = "0.0.0.0") -> int:
    """Count zkcelery's signals as Prometheus metrics, and serve them over HTTP on ``port``.

    A worker whose ``ZOOKEEPER_METRICS_PORT`` is set calls this itself, as
    does a beat with ``ZOOKEEPER_BEAT_METRICS_PORT``; call it in any other
    process whose leases, refusals or elections you want counted (a web
    process that sends EarlyMutexTasks).  Where ``PROMETHEUS_MULTIPROC_DIR`` is
    set (a prefork worker sets it for its pool), it serves what every process
    writing there counted (prometheus_client's multiprocess mode).

    :param port: the TCP port to listen on; 0 for any free one.
    :param addr: the address to listen on.
    :returns: the port it listens on.
    :raises ConfigurationError: prometheus_client is not installed (the
        ``zkcelery[metrics]`` extra), or ``port`` is not a port number.
    """
    port = _check_port("port", port, free=True)
    prom = _prometheus()
    _metrics()
    registry = prom.REGISTRY
    if os.environ.get(_MULTIPROC_DIR):
        registry = prom.CollectorRegistry()
        registry.register(_PoolFiles(os.environ[_MULTIPROC_DIR]))
    server = _metrics_server(registry, addr, port)
    threading.Thread(target=server.serve_forever, name="zkcelery-metrics", daemon=True).start()
    _log(logging.INFO, "metrics served on %s:%s", addr, server.server_port,
         outcome="metrics_served")  # fmt: skip
    return int(server.server_port)


_MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"
_WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 3600)
_HOLD_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 3600, 14400, 86400)


class _Metrics:
    """zkcelery's Prometheus metrics in this process, kept by receivers of its signals.

    Labels are the lease's ``kind`` and ``name``, the task's name (as
    celery-exporter's ``name``, so that the two join), never a key: key
    values are unbounded.  Made once per process (_metrics), in the
    multiprocess mode when ``PROMETHEUS_MULTIPROC_DIR`` was set before
    prometheus_client was imported.
    """

    def __init__(self, prom: types.ModuleType) -> None:
        counter, lease = prom.Counter, ["kind", "name"]
        self.wait = prom.Histogram(
            "zkcelery_lease_wait_seconds",
            "Seconds from a lease's first try to its grant, or to a try that ended without it.",
            [*lease, "outcome"], buckets=_WAIT_BUCKETS,
        )  # fmt: skip
        self.hold = prom.Histogram(
            "zkcelery_lease_hold_seconds", "Seconds a lease was held, from grant to release.",
            lease, buckets=_HOLD_BUCKETS,
        )  # fmt: skip
        self.acquired = counter("zkcelery_lease_acquired", "Leases granted.", lease)
        self.not_acquired = counter(
            "zkcelery_lease_not_acquired", "Tries that ended without the lease.", [*lease, "reason"]
        )
        self.lost = counter(
            "zkcelery_lease_lost", "Held leases that may have become another's.", [*lease, "reason"]
        )
        self.rejected = counter(
            "zkcelery_mutex_rejected", "Mutex task copies rejected without running.", lease
        )
        self.requeued = counter(
            "zkcelery_mutex_requeued", "Mutex task copies sent back to the queue.", lease
        )
        self.dropped = counter(
            "zkcelery_mutex_dropped", "Second deliveries dropped while the first ran.", lease
        )
        self.refused = counter("zkcelery_early_refused", "EarlyMutexTask sends refused.", ["name"])
        self.elected = counter("zkcelery_beat_elections", "Times this beat was elected.", ["name"])
        self.deposed = counter("zkcelery_beat_depositions", "Times this beat stopped leading.",
                               ["name"])  # fmt: skip
        self.skipped = counter(
            "zkcelery_beat_ticks_skipped",
            "Ticks skipped: the task's last run was queued.",
            ["name"],
        )
        self.leading = prom.Gauge(
            "zkcelery_beat_leading", "1 while this beat leads.", ["name"],
            multiprocess_mode="livesum",
        )  # fmt: skip
        self._bound: dict[tuple, Any] = {}

    def bound(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, kept: the hot path skips prometheus_client's lookup."""
        key = (id(metric), labels)
        child = self._bound.get(key)
        if child is None:
            child = self._bound[key] = metric.labels(*labels)
        return child

    def connect(self) -> None:
        z = zkcelery
        for sent, receiver in (
            (z.lease_acquired, self.on_acquired), (z.lease_not_acquired, self.on_not_acquired),
            (z.lease_released, self.on_released), (z.lease_lost, self.on_lost),
            (z.mutex_rejected, self.on_rejected), (z.mutex_requeued, self.on_requeued),
            (z.mutex_dropped, self.on_dropped), (z.early_refused, self.on_refused),
            (z.beat_elected, self.on_elected), (z.beat_deposed, self.on_deposed),
            (z.beat_tick_skipped, self.on_skipped),
        ):  # fmt: skip
            sent.connect(receiver, weak=False)

    # The receivers: each runs where its signal is sent, and does not block.
    def on_acquired(self, lease: Lease, waited: float, **_: Any) -> None:
        self.bound(self.wait, lease.kind, lease.task_name, "acquired").observe(waited)
        self.bound(self.acquired, lease.kind, lease.task_name).inc()

    def on_not_acquired(self, lease: Lease, waited: float, reason: str, **_: Any) -> None:
        self.bound(self.wait, lease.kind, lease.task_name, "not_acquired").observe(waited)
        self.bound(self.not_acquired, lease.kind, lease.task_name, reason).inc()

    def on_released(self, lease: Lease, held: float, **_: Any) -> None:
        self.bound(self.hold, lease.kind, lease.task_name).observe(held)

    def on_lost(self, lease: Lease, reason: str, **_: Any) -> None:
        self.bound(self.lost, lease.kind, lease.task_name, reason).inc()

    def on_rejected(self, lease: Lease, **_: Any) -> None:
        self.bound(self.rejected, lease.kind, lease.task_name).inc()

    def on_requeued(self, lease: Lease, **_: Any) -> None:
        self.bound(self.requeued, lease.kind, lease.task_name).inc()

    def on_dropped(self, lease: Lease, **_: Any) -> None:
        self.bound(self.dropped, lease.kind, lease.task_name).inc()

    def on_refused(self, sender: Any, **_: Any) -> None:
        self.bound(self.refused, sender.name).inc()

    def on_elected(self, sender: Any, **_: Any) -> None:
        self.bound(self.elected, _beat_name(sender)).inc()
        self.bound(self.leading, _beat_name(sender)).set(1)

    def on_deposed(self, sender: Any, **_: Any) -> None:
        self.bound(self.deposed, _beat_name(sender)).inc()
        self.bound(self.leading, _beat_name(sender)).set(0)

    def on_skipped(self, sender: Any, **_: Any) -> None:
        self.bound(self.skipped, _beat_name(sender)).inc()


def _beat_name(scheduler: Any) -> str:
    return str(scheduler.app.main or "celery")


_metrics_lock = threading.Lock()
_the_metrics: list[_Metrics] = []


def _metrics() -> _Metrics:
    """This process's _Metrics, made and connected to the signals the first time."""
    with _metrics_lock:
        if not _the_metrics:
            metrics = _Metrics(_prometheus())
            metrics.connect()
            _the_metrics.append(metrics)
        return _the_metrics[0]


def _check_port(name: str, value: Any, free: bool = False) -> int:
    """``value`` as a TCP port (0, any free one, only where ``free``); else ConfigurationError."""
    lowest = 0 if free else 1
    if isinstance(value, bool) or not isinstance(value, int) or not lowest <= value < 65536:
        raise ConfigurationError(
            f"{name} must be a TCP port number ({lowest}-65535), not {value!r}"
        )
    return value


def _serve_metrics_as_set(
    app: celery.Celery, setting: str, prepare: Callable[[], None] | None = None
) -> None:
    """Serve metrics on the port ``setting`` names (ZOOKEEPER_METRICS_ADDR: the address).

    ``prepare`` runs first, once the port is known.  Unset: nothing.  A failure
    (a bad setting, a port in use, no prometheus_client) is one ERROR line, and
    the process runs on without metrics.
    """
    try:
        value = zkcelery.setting(app, setting)
        if value is None:
            return
        port = _check_port(setting, value)
        if prepare is not None:
            prepare()
        start_metrics_server(port, zkcelery.setting(app, "ZOOKEEPER_METRICS_ADDR", "0.0.0.0"))
    except (ZKCeleryError, OSError) as exc:
        _log(logging.ERROR, "metrics not served: %s", exc, outcome="metrics_not_served",
             error=str(exc))  # fmt: skip


def serve_worker_metrics(app: celery.Celery, pool: Any) -> None:
    """At a worker's start, before its pool forks: serve metrics if ZOOKEEPER_METRICS_PORT is
    set (zkcelery calls this).  ``pool``: the worker's pool class, or its name as ``-P``.

    A prefork pool's children take the leases: they count in files that the
    main process serves (prometheus_client's multiprocess mode, which must be
    chosen before prometheus_client is first imported).
    """
    _serve_metrics_as_set(app, "ZOOKEEPER_METRICS_PORT", lambda: _prepare_pool(pool))


def serve_beat_metrics(app: celery.Celery) -> None:
    """At a beat's start: serve metrics if ZOOKEEPER_BEAT_METRICS_PORT is set (zkcelery calls
    this)."""
    _serve_metrics_as_set(app, "ZOOKEEPER_BEAT_METRICS_PORT")


def _prepare_pool(pool: Any) -> None:
    if _is_prefork(pool):
        _use_multiprocess_mode()


def _is_prefork(pool: Any) -> bool:
    """Whether the worker's pool (a class, or a name as ``-P`` takes it) is a prefork pool."""
    from celery.concurrency import get_implementation
    from celery.concurrency.prefork import TaskPool

    found = get_implementation(pool) if isinstance(pool, str) else pool
    return isinstance(found, type) and issubclass(found, TaskPool)


_made_dirs: list[str] = []


def _use_multiprocess_mode() -> None:
    if os.environ.get(_MULTIPROC_DIR):
        return  # the user's folder
    if "prometheus_client" in sys.modules:
        raise ConfigurationError(
            "prometheus_client was imported before the worker started, without "
            f"{_MULTIPROC_DIR}: the pool's processes could not report metrics; set "
            f"{_MULTIPROC_DIR} to an empty folder for the worker"
        )
    folder = tempfile.mkdtemp(prefix="zkcelery-metrics-")
    if not _made_dirs:  # the folder goes with the worker
        signals.worker_shutdown.connect(_remove_metrics_dirs, weak=False)
    _made_dirs.append(folder)
    os.environ[_MULTIPROC_DIR] = folder


def _remove_metrics_dirs(**_: Any) -> None:
    """The multiprocess folder a worker made goes with the worker."""
    while _made_dirs:
        shutil.rmtree(_made_dirs.pop(), ignore_errors=True)


class _PoolFiles:
    """What the processes writing in a multiprocess folder counted: prometheus_client's
    MultiProcessCollector, less the failure of one file failing the whole scrape.

    prometheus_client (0.16 to 0.26 at least: its issue #1199) creates a process's file,
    then sizes it: a scrape in between reads 0 bytes, and its merge raises for every file
    (HTTP 500).  A child killed in between leaves that empty file for good, and then every
    scrape fails.  Here an empty file is one in which nothing is recorded yet; a file that
    cannot be read (corrupt, unreadable) is left out of the scrape, which serves the rest,
    and a WARNING names it once, when it is found so: not at every scrape.  Its merge is
    prometheus_client's own (public ``merge``), so sums, histograms and gauges' modes are
    as its collector serves them.
    """

    def __init__(self, folder: str) -> None:
        from prometheus_client.multiprocess import MultiProcessCollector

        # Not registered: made for its check of the folder (ValueError) and its merge.
        self._merge = MultiProcessCollector(None, path=folder).merge
        self.folder = folder
        self._lock = threading.Lock()  # scrapes may come two at a time
        self._unreadable: set[str] = set()  # found so, and still there

    def collect(self) -> Iterable[Any]:
        with self._lock:
            files = [f for f in glob.glob(os.path.join(self.folder, "*.db")) if _sized(f)]
            self._unreadable &= set(files)
            # One unreadable so far is tried alone again: a file made readable is served.
            files = [f for f in files if f not in self._unreadable or self._merges(f)]
            try:
                return self._merge(files, accumulate=True)
            except Exception:  # a file turned unreadable: find it, serve the others
                readable = [f for f in files if self._merges(f)]
                return self._merge(readable, accumulate=True)

    def _merges(self, file: str) -> bool:
        """Whether ``file`` merges alone; if not, a WARNING the first time it does not."""
        try:
            self._merge([file], accumulate=True)
        except FileNotFoundError:
            return False  # removed since the listing: the worker stopping, say
        except Exception as exc:  # its read, its structs, its json or its UTF-8 may fail
            if file not in self._unreadable:
                self._unreadable.add(file)
                _log(
                    logging.WARNING,
                    "metrics file %s cannot be read, left out: %r",
                    file,
                    exc,
                    outcome="metrics_file_unreadable",
                    error=repr(exc),
                )
            return False
        self._unreadable.discard(file)
        return True


def _sized(file: str) -> bool:
    """Whether ``file`` has been sized: an empty one is being made, or its process was
    killed while it made it (prometheus_client's issue #1199), with nothing recorded."""
    try:
        return os.stat(file).st_size > 0
    except FileNotFoundError:
        return False  # removed since the listing: mark_process_dead, say
    except OSError:
        return True  # for the read to judge


def _metrics_server(registry: Any, addr: str, port: int) -> WSGIServer:
    """An HTTP server of ``registry`` (prometheus_client's WSGI app), one thread per scrape.

    Not prometheus_client's start_http_server: before 0.17 it does not say
    which port it bound, and ``--port 0`` asks for any free one.
    """
    import socketserver  # here: only a process that serves metrics pays for http.server
    import wsgiref.simple_server

    family = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)[0][0]

    class Server(socketserver.ThreadingMixIn, wsgiref.simple_server.WSGIServer):
        address_family = family
        daemon_threads = True

    class QuietHandler(wsgiref.simple_server.WSGIRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass  # a line per scrape is noise

    app = _prometheus().make_wsgi_app(registry)
    return wsgiref.simple_server.make_server(addr, port, app, Server, QuietHandler)


# ---------------------------------------------------------------------------
# The cached view of the tree: TreeView, for ls --watch and the exporter
# ---------------------------------------------------------------------------


class TreeView:
    """A live copy of what ``ls`` lists for ``app``, kept current by ZooKeeper's watches.

    For a process that follows the locks: ``ls --watch``, and the exporter.  It
    takes a session of its own (:func:`zkcelery.open_session`), which
    :meth:`close` ends; :meth:`start` loads it, then :meth:`snapshot` gives
    ``ls``'s rows without a request, and :meth:`wait_change` waits for a change.
    ``zkcelery.TreeView`` is this class.

    kazoo's TreeCache keeps a data and a children watch on every node under the
    root and feeds this copy.  Loading it reads each node twice (its data, its
    children); afterwards a change costs only the reads its watches trigger: a
    new contender one listing of its parent and two reads of its own node, a
    release one listing of the parent, a node's new data one read.  A
    namespace's listing names every key held in it, so on a large tree a new
    key costs a large answer, not more requests.  :meth:`snapshot` sends
    nothing: it builds ``ls``'s rows from the copy with ``ls``'s own walk
    (:func:`zkcelery.ls_rows`), so both always agree.

    While the connection is down (suspended) the copy is the last known and not
    in sync.  On a reconnect in the same session, the server fires the watches
    whose nodes changed meanwhile, and TreeCache reads every node again (two
    requests per node).  A lost session takes its watches with it: until
    TreeCache has read the whole tree in the next session, nothing is known and
    the rows are empty.
    """

    def __init__(self, app: celery.Celery) -> None:
        self.session = zkcelery.open_session(app)
        #: ZOOKEEPER_ROOT (behind the chroot, if any): the root of the copy.
        self.root = self.session.settings.root
        #: Counts the changes seen: the copy's, and the connection's.
        self.version = 0
        self._changed = threading.Condition()
        self._nodes: dict[str, tuple[bytes, ZnodeStat]] = {}
        self._children: dict[str, set[str]] = {}
        self._loaded = False  # the whole tree read since the session began
        self._cache = TreeCache(self.session.client, self.root)
        self._cache.listen(self._on_event)
        self._cache.listen_fault(self._on_fault)

    @property
    def session_id(self) -> int | None:
        """The id of the view's ZooKeeper session (as the servers' ``cons`` show it)."""
        return self.session.session_id

    def start(self) -> None:
        """Connect, and start loading the copy (see :meth:`wait_loaded`)."""
        self.session.wait_connected()
        self._cache.start()

    def close(self) -> None:
        """Stop following the tree, and end the view's session."""
        self._cache.close()
        self.session.close()

    def snapshot(self) -> tuple[bool, list[dict]]:
        """(in sync, ``ls``'s rows), from the copy, without a request (see the class)."""
        with self._changed:
            rows = zkcelery.ls_rows(self.root, self._listed, self._node) if self._loaded else []
            return self._loaded and self.session.client.state == KazooState.CONNECTED, rows

    def wait_loaded(self, timeout: float | None = None) -> bool:
        """Wait until the whole tree is in the copy; False at ``timeout``."""
        with self._changed:
            return self._changed.wait_for(lambda: self._loaded, timeout)

    def wait_change(self, seen: int, timeout: float | None = None) -> int:
        """The change count once it is no longer ``seen`` (or at ``timeout``)."""
        with self._changed:
            self._changed.wait_for(lambda: self.version != seen, timeout)
            return self.version

    def _listed(self, path: str) -> Collection[str]:
        return self._children.get(path, ())

    def _node(self, path: str) -> tuple[bytes, ZnodeStat] | None:
        return self._nodes.get(path)

    def _on_event(self, event: TreeEvent) -> None:
        # On TreeCache's own thread, in the order of its changes.
        kind, node = event.event_type, event.event_data
        with self._changed:
            if kind in (TreeEvent.NODE_ADDED, TreeEvent.NODE_UPDATED):
                self._nodes[node.path] = node.data, node.stat
                parent, name = node.path.rsplit("/", 1)
                self._children.setdefault(parent, set()).add(name)
            elif kind == TreeEvent.NODE_REMOVED:
                self._nodes.pop(node.path, None)
                self._children.pop(node.path, None)  # its children were removed before it
                parent, name = node.path.rsplit("/", 1)
                self._children.get(parent, set()).discard(name)
            elif kind == TreeEvent.CONNECTION_LOST:
                self._loaded = False
            elif kind == TreeEvent.INITIALIZED:
                self._loaded = True
            self.version += 1
            self._changed.notify_all()

    def _on_fault(self, exc: Exception) -> None:
        _log(logging.WARNING, "the cached view of %s: %s", self.root, exc, outcome="view_fault",
             error=str(exc))  # fmt: skip


def _stop_on_sigterm() -> None:
    """Make SIGTERM stop a long-running command as Ctrl-C does (KeyboardInterrupt)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.default_int_handler)


#: How long ``ls --watch`` lets changes gather before it lists them.
_WATCH_SETTLE = 0.2


def ls_watch(app: celery.Celery, as_json: bool) -> None:
    """``ls --watch`` (zkcelery's ``ls`` calls this): list again after each change of the
    holders or waiters, until Ctrl-C or SIGTERM."""
    _stop_on_sigterm()
    view = TreeView(app)
    try:
        view.start()
        view.wait_loaded()
        shown, seen = None, -1
        while True:
            seen = view.wait_change(seen)
            time.sleep(_WATCH_SETTLE)  # a burst of changes (a queue forming) makes one update
            seen = view.version
            in_sync, rows = view.snapshot()
            current = (in_sync, [{k: v for k, v in row.items() if k != "age"} for row in rows])
            if current != shown:  # not a beat's schedule written, say
                _print_update(in_sync, rows, as_json, first=shown is None)
                shown = current
    except KeyboardInterrupt:
        pass
    finally:
        view.close()


def _print_update(in_sync: bool, rows: list[dict], as_json: bool, first: bool) -> None:
    if as_json:
        if in_sync:
            click.echo(json.dumps(rows))
        return
    stamp = datetime.now().astimezone().isoformat(sep=" ", timespec="seconds")
    if sys.stdout.isatty():
        click.clear()
    elif not first:
        click.echo()
    click.echo(stamp if in_sync else f"{stamp}  NOT IN SYNC with ZooKeeper: the last known")
    click.echo(zkcelery.ls_table(rows))


# ---------------------------------------------------------------------------
# The exporter: the deployment's gauges, from a cached view of the tree
# ---------------------------------------------------------------------------


@click.command(
    name="exporter",
    help="Serve Prometheus metrics of the locks at http://ADDR:PORT/metrics: holders, "
    "waiters and the oldest hold's age by kind and task name, early mutex keys by state, "
    "the beat leader, and whether the exporter is in sync with ZooKeeper. A scrape sends "
    "no request to ZooKeeper: it reads a cache that watches keep up to date; while that "
    "cache is not in sync, only zkcelery_exporter_connected 0 is served. Needs "
    "zkcelery[metrics]; runs until Ctrl-C or SIGTERM.",
)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    required=True,
    help="The port to serve on (0: any free one, printed at start).",
)
@click.option("--addr", default="0.0.0.0", show_default=True, help="The address to bind.")
@zkcelery.app_command
def exporter_command(app: celery.Celery, port: int, addr: str) -> None:
    """``zkcelery exporter`` (``celery -A proj zk exporter``): zkcelery's group finds it here."""
    prometheus = _prometheus()  # without it: app_command's one-line error
    _stop_on_sigterm()
    view = TreeView(app)
    registry = prometheus.CollectorRegistry()
    registry.register(_LeaseCollector(view))
    server = _metrics_server(registry, addr, port)
    try:
        view.start()
        host = f"[{addr}]" if ":" in addr else addr
        click.echo(f"serving http://{host}:{server.server_port}/metrics for {view.root} "
                   f"(ZooKeeper session {view.session_id:#x})")  # fmt: skip
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        view.close()


class _LeaseCollector:
    """The exporter's gauges, from a TreeView at each scrape: no ZooKeeper request.

    ``name`` is the holder metadata's task name (the beat's owner for an
    election), never the key: keys are unbounded, task names are not.  Held
    means every contender ``ls`` does not show as waiting (an early mutex,
    queued or running, holds its key).  While the view is not in sync, only
    ``zkcelery_exporter_connected 0`` is served: a stale holder is no holder.
    """

    def __init__(self, view: TreeView) -> None:
        self.view = view
        self._lock = threading.Lock()  # scrapes may come two at a time
        self._waiting: set[int] = set()  # the czxids of the waiters at the last scrape
        self._granted: dict[int, float] = {}  # of those granted since: when it was seen

    def collect(self) -> Iterator[Any]:
        gauge = _prometheus().metrics_core.GaugeMetricFamily
        in_sync, rows = self.view.snapshot()
        rows = self._hold_ages(rows)
        yield gauge(
            "zkcelery_exporter_connected",
            "1 while the exporter's cached view is in sync with a live ZooKeeper session.",
            value=int(in_sync),
        )
        if in_sync:
            yield from _lease_gauges(gauge, rows)

    def _hold_ages(self, rows: list[dict]) -> list[dict]:
        """``rows`` with each holder's ``age`` counted from its grant, not its node's birth.

        A holder that waited in line holds through the node it queued with:
        its node's age counts the wait too.  One this exporter saw waiting is
        counted from the first scrape that saw it hold (to within a scrape
        interval); any other from its node's creation, which is its grant for
        a lock taken free, and the closest known otherwise.
        """
        now = time.monotonic()
        with self._lock:
            held = {row["czxid"] for row in rows if row["state"] != "waiting"}
            granted = {czxid: self._granted.get(czxid, now) for czxid in held & (
                self._waiting | set(self._granted))}  # fmt: skip
            self._granted = granted
            self._waiting = {row["czxid"] for row in rows if row["state"] == "waiting"}
        return [
            {**row, "age": round(now - granted[row["czxid"]], 3)}
            if row["czxid"] in granted else row
            for row in rows
        ]  # fmt: skip


def _lease_gauges(gauge: Any, rows: list[dict]) -> Iterator[Any]:
    """The gauges of ``rows`` (``ls``'s), by kind and task name."""
    held = gauge("zkcelery_leases_held", "Holders now.", labels=["kind", "name"])
    waiting = gauge("zkcelery_lease_waiters", "Waiters now.", labels=["kind", "name"])
    oldest = gauge(
        "zkcelery_lease_oldest_hold_seconds",
        "Age of the oldest current hold, in seconds.",
        labels=["kind", "name"],
    )
    early = gauge(
        "zkcelery_early_keys", "Early mutex keys, queued or running.", labels=["name", "state"]
    )
    leader = gauge(
        "zkcelery_beat_leader", "1 for each beat that leads.", labels=["name", "host", "pid"]
    )
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["kind"], _label(row["task"])), []).append(row)
    for labels, group in sorted(groups.items()):
        holds = [row["age"] for row in group if row["state"] != "waiting"]
        held.add_metric(labels, len(holds))
        waiting.add_metric(labels, len(group) - len(holds))
        if holds:
            oldest.add_metric(labels, max(holds))
    for (name, state), count in sorted(_count_early(rows).items()):
        early.add_metric([name, state], count)
    for row in rows:
        if row["namespace"] == "beat" and row["state"] == "held":  # the protocol map's names
            leader.add_metric([_label(row["task"]), _label(row["host"]), _label(row["pid"])], 1)
    yield from (held, waiting, oldest, early, leader)


def _count_early(rows: list[dict]) -> dict[tuple[str, str], int]:
    counts: dict[tuple[str, str], int] = {}
    for row in rows:
        if row["namespace"] == "early":
            labels = (_label(row["task"]), str(row["state"]))
            counts[labels] = counts.get(labels, 0) + 1
    return counts


def _label(value: Any) -> str:
    return "" if value is None else str(value)
