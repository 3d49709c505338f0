"""What zkcelery's tests, its demo and its benchmarks share (not part of the package).

- :func:`ensemble_hosts`: where the test ensemble that ``./zk-test.sh`` started listens;
- :class:`AtomicFilesystemTransport`: kombu's filesystem transport, without its lost
  messages, for workers that need no broker server;
- :func:`four_letter`: a ZooKeeper server's answer to ``srvr``, ``cons``...
- :class:`Partition`: a TCP proxy whose link can be cut (both ways or one), delayed,
  flapped and healed; :class:`PeerNetwork`, one per directed link between the servers of
  an ensemble started with ``ZK_TEST_PEER_PROXIES=1`` (``python testsupport.py peers``
  runs them by hand).
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kombu.transport import filesystem
from kombu.utils.json import dumps

REPO = Path(__file__).resolve().parent


def zk_test_port() -> int:
    """The test ensemble's base client port: ``ZK_TEST_PORT``, as for ``zk-test.sh``."""
    return int(os.environ.get("ZK_TEST_PORT") or 2181)


def zk_test_dir(port: int | None = None) -> Path:
    """The state folder ``zk-test.sh`` uses for that port (``ZK_TEST_DIR`` if set)."""
    if os.environ.get("ZK_TEST_DIR"):
        return Path(os.environ["ZK_TEST_DIR"])
    port = zk_test_port() if port is None else port
    return REPO / (".zk-test" if port == 2181 else f".zk-test-{port}")


def ensemble_hosts() -> str:
    """``$ZK_TEST_HOSTS``, else what ``zk-test.sh`` wrote in its state folder, else its ports.

    Never a server the test ensemble does not run on: a moved ensemble
    (``ZK_TEST_PORT``) is found without further variables.
    """
    if os.environ.get("ZK_TEST_HOSTS"):
        return os.environ["ZK_TEST_HOSTS"]
    state = zk_test_dir() / "hosts"
    if state.exists() and state.read_text().strip():
        return state.read_text().strip()
    port = zk_test_port()
    return ",".join(f"127.0.0.1:{port + n}" for n in range(3))


def four_letter(entry: str, word: str, timeout: float = 5.0) -> str:
    """A ZooKeeper server's answer to a four-letter command, e.g. ``srvr`` or ``cons``."""
    host, _, port = entry.rpartition(":")
    with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as sock:
        sock.sendall(word.encode())
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


class _AtomicFilesystemChannel(filesystem.Channel):
    """kombu's filesystem channel, publishing each message atomically.

    kombu creates the message file and only then writes it: a consumer that
    moves the file away in between (its lock does not stop a rename) reads it
    empty or half-written, and the message is lost (a retried or requeued task
    vanished once in a few hundred).  A temporary file that no consumer takes,
    renamed into place, closes the window.  kombu before 5.7 takes any file
    whose name contains ".QUEUE.msg", so the temporary name holds no ".msg" at
    all; the final name starts with a nanosecond clock so that the queue (read
    in name order) keeps the order of sending.
    """

    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:  # type: ignore[override]
        name = f"{time.monotonic_ns():020d}_{uuid.uuid4().hex}.{queue}.msg"
        hidden = os.path.join(self.data_folder_out, f".{uuid.uuid4().hex}.partial")
        with open(hidden, "wb") as f:
            f.write(dumps(payload).encode())
        os.rename(hidden, os.path.join(self.data_folder_out, name))


def sent_at(message: Path) -> float:
    """When a message file of the transport below was published, on ``time.monotonic``'s clock."""
    return int(message.name.split("_", 1)[0]) / 1e9


class AtomicFilesystemTransport(filesystem.Transport):
    """``broker_transport = "testsupport:AtomicFilesystemTransport"``."""

    Channel = _AtomicFilesystemChannel


# ---------------------------------------------------------------------------
# The network nemesis: proxies on loopback, no privileges
# ---------------------------------------------------------------------------

#: A link's two directions: from whoever connects to the target, and back.
UP, DOWN = "up", "down"
BOTH = (UP, DOWN)


class Partition:
    """A TCP proxy to ``target`` whose link can be cut like a network partition.

    ``cut()`` blackholes the link (nothing is forwarded, nothing is closed, new
    connections hang), as a dead switch would; ``cut(UP)`` or ``cut(DOWN)`` only one
    direction (what the connecting side sends, or what it is sent), the other flows.
    What arrives while cut is held, and goes on ``heal()``, as TCP's retransmissions
    would carry it.  ``delay(s)`` holds every byte ``s`` seconds; ``flap(every, for_)``
    cuts and heals by turns, in the background.  ``close()`` ends every connection, so
    that both peers see it closed at once, and takes no more: a link lost for good.
    ``drop()`` ends every connection and takes new ones: the client reconnects at once.
    """

    def __init__(self, target: tuple[str, int], port: int = 0) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", port))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.flowing = {d: threading.Event() for d in BOTH}
        self.delays = dict.fromkeys(BOTH, 0.0)
        self.heal()
        self.closed = False
        self.sockets: list[socket.socket] = []
        self._flapping: threading.Event | None = None
        threading.Thread(target=self._accept, daemon=True).start()

    def cut(self, *directions: str) -> None:
        for d in directions or BOTH:
            self.flowing[d].clear()

    def heal(self, *directions: str) -> None:
        for d in directions or BOTH:
            self.flowing[d].set()

    def delay(self, seconds: float, *directions: str) -> None:
        for d in directions or BOTH:
            self.delays[d] = seconds

    def flap(self, every: float, for_: float, *directions: str) -> threading.Thread:
        """Cut and heal by turns every ``every`` s for ``for_`` s, then heal; in a thread."""
        stop = self._flapping = threading.Event()

        def run() -> None:
            until = time.monotonic() + for_
            while time.monotonic() < until and not stop.is_set():
                self.cut(*directions)
                stop.wait(every)
                self.heal(*directions)
                stop.wait(every)
            self.heal(*directions)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    def stop_flapping(self) -> None:
        if self._flapping is not None:
            self._flapping.set()

    def close(self) -> None:
        self.closed = True
        self.stop_flapping()
        self.heal()
        self._end([self.listener, *self.sockets])

    def drop(self) -> None:
        sockets, self.sockets = self.sockets, []
        self._end(sockets)

    @staticmethod
    def _end(sockets: list[socket.socket]) -> None:
        for sock in sockets:
            with contextlib.suppress(OSError):  # wakes a thread blocked on it; sends FIN
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            for d in BOTH:  # a handshake needs both ways: a new connection hangs meanwhile
                self.flowing[d].wait()
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            self.sockets += [client, server]
            for a, b, d in ((client, server, UP), (server, client, DOWN)):
                chunks: queue.SimpleQueue[tuple[float, bytes]] = queue.SimpleQueue()
                threading.Thread(target=self._read, args=(a, b, chunks), daemon=True).start()
                threading.Thread(target=self._write, args=(a, b, chunks, d), daemon=True).start()

    def _read(self, source: socket.socket, sink: socket.socket, chunks: queue.SimpleQueue) -> None:
        """Take what arrives at once, stamped, so that a delay or a cut holds it in order."""
        data = b""
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                chunks.put((time.monotonic(), data))
        chunks.put((time.monotonic(), b""))  # the end: after what came before it

    def _write(
        self, source: socket.socket, sink: socket.socket, chunks: queue.SimpleQueue, d: str
    ) -> None:
        with contextlib.suppress(OSError):
            while not self.closed:
                arrived, data = chunks.get()
                while not self.closed:  # held while cut, and until its delay has passed
                    self.flowing[d].wait()
                    late = arrived + self.delays[d] - time.monotonic()
                    if late <= 0 and self.flowing[d].is_set():
                        break
                    time.sleep(min(max(late, 0.001), 0.01))
                if not data or self.closed:
                    break
                sink.sendall(data)
        self._end([source, sink])  # wakes the other direction's reader


def zk_test(*args: str, env: dict[str, str] | None = None, check: bool = True) -> str:
    """Run ``zk-test.sh ARGS`` with ``env`` added (and no broker); its stdout."""
    done = subprocess.run([str(REPO / "zk-test.sh"), *args], capture_output=True, text=True,
                          env={**os.environ, "ZK_TEST_BROKERS": "none", **(env or {})},
                          timeout=180, check=False)  # fmt: skip
    if check and done.returncode:
        raise RuntimeError(f"zk-test.sh {' '.join(args)} failed:\n{done.stdout}{done.stderr}")
    return done.stdout.strip()


class PeerNetwork:
    """The links between the servers of an ensemble ``zk-test.sh`` starts with
    ``ZK_TEST_PEER_PROXIES=1``: a :class:`Partition` per directed link I->J and port
    (quorum, election), where server I's configuration names server J.

    Traffic is cut by its direction between servers, not by proxy: ZooKeeper keeps one
    election connection per pair, the one the higher server id made (a lower id's is
    dropped, and the higher one connects back), and a follower's quorum connection to
    the leader carries both ways.  So the bytes server I sends server J go up through
    I->J's proxies and down through J->I's, and ``cut(i, j)`` holds both.
    """

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.links: dict[tuple[int, int], list[Partition]] = {}
        for line in zk_test("peer-links", env=env).splitlines():
            i, j, quorum, quorum_to, election, election_to = map(int, line.split())
            self.links[i, j] = [Partition(("127.0.0.1", quorum_to), quorum),
                                Partition(("127.0.0.1", election_to), election)]  # fmt: skip

    def _ways(self, i: int, j: int) -> Iterator[tuple[Partition, str]]:
        """The proxies and directions that carry what server I sends server J."""
        yield from ((p, UP) for p in self.links[i, j])
        yield from ((p, DOWN) for p in self.links[j, i])

    def cut(self, i: int, j: int, one_way: bool = False) -> None:
        """Hold what server I sends server J, and unless ``one_way``, what J sends I."""
        for a, b in ((i, j),) if one_way else ((i, j), (j, i)):
            for proxy, d in self._ways(a, b):
                proxy.cut(d)

    def isolate(self, n: int) -> None:
        """Cut server N from every other server, both ways (its clients stay connected)."""
        for other in {i for i, _ in self.links} - {n}:
            self.cut(n, other)

    def heal(self) -> None:
        for proxies in self.links.values():
            for proxy in proxies:
                proxy.stop_flapping()
                proxy.heal()
                proxy.delay(0.0)

    def close(self) -> None:
        for proxies in self.links.values():
            for proxy in proxies:
                proxy.close()


def _run_peers() -> None:
    """``python testsupport.py peers``: run the proxies of the ensemble that ``zk-test.sh``
    starts with the same variables (``ZK_TEST_PORT``...) and ``ZK_TEST_PEER_PROXIES=1``,
    until interrupted."""
    network = PeerNetwork({"ZK_TEST_PEER_PROXIES": "1"})
    for (i, j), (quorum, election) in sorted(network.links.items()):
        print(f"{i}->{j}: quorum {quorum.address}, election {election.address}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        threading.Event().wait()
    network.close()


class ProxiedEnsemble:
    """A 3-server ensemble whose peer links go through a :class:`PeerNetwork` in this
    process: started on ``port`` with its state in ``folder``, with the test timing or
    ZooKeeper's stock one (``stock``: tickTime 2000, default session bounds)."""

    def __init__(self, port: int, folder: Path, stock: bool = False) -> None:
        self.port, self.stock = port, stock
        self.env = {"ZK_TEST_PORT": str(port), "ZK_TEST_DIR": str(folder), "ZK_TEST_TICK": "",
                    "ZK_TEST_PEER_PROXIES": "1", "ZK_TEST_STOCK": str(int(stock)),
                    "ZK_TEST_TLS": "0"}  # fmt: skip
        self.network = PeerNetwork(self.env)
        try:
            self.hosts = self._start()
        except BaseException:
            self.stop()  # the servers that did start too: nothing is left running
            raise

    def _start(self, tries: int = 4) -> str:
        """Start the servers; the connection string.  A server left out by a split vote
        at startup (a third of the starts through the proxies: it counts a vote the voter
        has since changed, leads alone until initLimit ticks pass, then does so again)
        is restarted, and then the whole ensemble afresh: a healthy start takes 2 s."""
        env = {**self.env, "ZK_TEST_START_TIMEOUT": "8"}
        for tries_left in reversed(range(tries)):
            try:
                return zk_test(env=env).splitlines()[-1]
            except RuntimeError:
                if not tries_left:
                    raise
            modes = self.modes()
            stuck = [n for n, mode in modes.items() if mode not in ("leader", "follower")]
            if tries_left % 2 and list(modes.values()).count("leader") == 1:
                for n in stuck:
                    zk_test("stop-server", str(n), env=env, check=False)
            else:
                zk_test("stop", "--clean", env=env, check=False)
        raise AssertionError("unreachable")

    def server(self, n: int) -> str:
        """Server N's client address."""
        return f"127.0.0.1:{self.port + n - 1}"

    def modes(self) -> dict[int, str]:
        modes = {}
        for n in (1, 2, 3):
            try:
                answer = four_letter(self.server(n), "srvr", timeout=1)
            except OSError:
                answer = ""
            modes[n] = next((line.split()[-1] for line in answer.splitlines()
                             if line.startswith("Mode:")), "down")  # fmt: skip
        return modes

    def wait_serving(self, timeout: float = 120) -> int:
        """Wait until every server leads or follows; the leader's number."""
        deadline = time.monotonic() + timeout
        while True:
            modes = self.modes()
            leaders = [n for n, mode in modes.items() if mode == "leader"]
            if len(leaders) == 1 and all(m in ("leader", "follower") for m in modes.values()):
                return leaders[0]
            if time.monotonic() > deadline:
                raise RuntimeError(f"the proxied ensemble on {self.port} does not serve: {modes}")
            time.sleep(0.1)

    def stop(self) -> None:
        self.network.close()
        zk_test("stop", "--clean", env=self.env, check=False)


@dataclass
class CutTrial:
    """One trial of a cut: seconds from the cut until the holder's ``lease.lost`` read
    true, and until the rival was granted (None: not within the trial's limit)."""

    lost: float | None
    granted: float | None
    #: How long before the cut the holder's last answer through the leader was sent.
    heard_before: float
    #: Whether the holder's lease.lost read true when the rival was granted.
    lost_at_grant: bool
    #: A pause only: whether, once its server resumed, the holder's session was found
    #: expired (a new one took its place) with its lease still reading lost.
    expired: bool | None = None

    @property
    def margin(self) -> float | None:
        if self.lost is None or self.granted is None:
            return None
        return self.granted - self.lost


#: The one-way cuts of the holder's own link (cut_trial): which direction each holds.
CLIENT_CUTS = {"client-requests": UP, "client-answers": DOWN}


def _lock_task(hosts: str, root: str, session_timeout: float) -> Any:
    from celery import Celery

    import zkcelery

    app = Celery(f"cut-{uuid.uuid4().hex[:6]}", set_as_current=False)
    app.conf.update(ZOOKEEPER_HOSTS=hosts, ZOOKEEPER_ROOT=root, ZOOKEEPER_CONNECT_TIMEOUT=2,
                    ZOOKEEPER_SESSION_TIMEOUT=session_timeout)  # fmt: skip

    @app.task(shared=False, base=zkcelery.LockTask, bind=True, name="cut.lock")
    def task(self: Any) -> None:
        pass

    return task


def cut_trial(
    ensemble: ProxiedEnsemble, cut: str, root: str, session_timeout: float = 2.0,
    after_answer: bool = True, limit: float = 120.0, quiet: bool = False,
) -> CutTrial:  # fmt: skip
    """A holder's lease held through a server cut off by ``cut``, and a rival waiting on
    the same key through the leader (another server when the leader is the one cut).

    ``cut`` is "follower" (a follower from the leader, both ways, its clients still
    connected to it: the holder's), "leader" (the leader from both followers, both
    ways: the holder is the leader's client, the rival a follower's), "pause" (the
    holder's server, a follower, SIGSTOPped until the rival holds, then resumed; the
    rival on the other two: the trial then waits for the holder's session to be found
    expired, ``CutTrial.expired``), or one of CLIENT_CUTS: the holder reaches a follower
    only through a :class:`Partition`, the rival the leader directly, and the holder's
    link is cut one way: "client-requests" loses what the holder sends (answers would
    come back), "client-answers" what it is sent (its requests and pings still reach the
    server).  With
    ``after_answer`` the cut comes just after an answer through the leader reached the
    holder (the worst moment for the ``lost`` rule); else at once.  ``quiet`` stops
    kazoo's own pings on the holder's session: the server hears only the watchdog.
    """
    import testinternals as internals

    leader = ensemble.wait_serving()
    followers = [n for n in (1, 2, 3) if n != leader]
    if cut == "leader":  # the rival on the majority's side: both followers
        held_on, waits_on = leader, ",".join(map(ensemble.server, followers))
    elif cut == "pause":  # the rival on the other two
        held_on, waits_on = followers[0], ",".join(map(ensemble.server, [leader, followers[1]]))
    else:  # the rival on the leader's side: the leader alone
        held_on, waits_on = followers[0], ensemble.server(leader)
    holds_through = ensemble.server(held_on)
    link = None
    if cut in CLIENT_CUTS:
        host, port = holds_through.rsplit(":", 1)
        link = Partition((host, int(port)))
        holds_through = link.address
    holder = _lock_task(holds_through, root, session_timeout)
    rival = _lock_task(waits_on, root, session_timeout)
    key = uuid.uuid4().hex
    lease = holder.lock(key).__enter__()
    assert lease, "the holder did not get the lock"
    granted: list[tuple[float, bool]] = []
    paused = 0  # the pid of the server paused, once it is

    def wait() -> None:
        from zkcelery import CoordinationError

        until = time.monotonic() + limit
        while not granted and time.monotonic() < until:
            try:  # a waiter whose server is in an election fails, and a task would retry
                with rival.lock(key, blocking=True, timeout=until - time.monotonic()) as taken:
                    if taken:
                        granted.append((time.monotonic(), bool(lease.lost)))
            except CoordinationError:
                time.sleep(0.05)

    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    try:
        deadline = time.monotonic() + 10
        while len(lease.waiters()) < 1:
            if time.monotonic() > deadline:
                raise RuntimeError("the rival did not queue")
            time.sleep(0.01)
        liveness = internals.session(holder.app).liveness
        if quiet:  # its syncs come often enough that the connection stays up
            internals.session(holder.app).client._connection._send_ping = lambda timeout: None
        for _ in range(2 if quiet else 1):  # quiet: the one before came from the watchdog too
            heard = liveness.heard
            while after_answer and liveness.heard == heard:
                time.sleep(0.0005)
        if cut == "pause":
            paused = _server_pid(ensemble, held_on)
            os.kill(paused, signal.SIGSTOP)
        elif link is not None:
            link.cut(CLIENT_CUTS[cut])
        elif cut == "follower":
            ensemble.network.cut(held_on, leader)
        else:
            for follower in followers:
                ensemble.network.cut(leader, follower)
        at = time.monotonic()
        heard_before = at - liveness.heard
        lost = None
        while lost is None and time.monotonic() < at + limit:
            if lease.lost:
                lost = time.monotonic() - at
            time.sleep(0.001)
        waiter.join(limit)
    finally:
        if paused:
            with contextlib.suppress(ProcessLookupError):  # it died paused: nothing to resume
                os.kill(paused, signal.SIGCONT)
        ensemble.network.heal()
        if link is not None:
            link.heal()
    expired = _found_expired(holder, lease, limit) if paused else None
    lease.__exit__(None, None, None)
    for task in (holder, rival):
        session = internals.sessions.pop(task.app, None)
        if session is not None:
            session.close()
    if link is not None:
        link.close()
    ensemble.wait_serving()
    return CutTrial(lost, granted[0][0] - at if granted else None, heard_before,
                    granted[0][1] if granted else False, expired)  # fmt: skip


def _server_pid(ensemble: ProxiedEnsemble, n: int) -> int:
    """The pid of server N's JVM, from the pid file ``zk-test.sh`` keeps in the server's
    state folder, once its command line shows it is that server (not a reused pid)."""
    folder = Path(ensemble.env["ZK_TEST_DIR"]) / str(n)
    pid = int((folder / "pid").read_text())
    words = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    if str(folder / "zoo.cfg").encode() not in words:
        raise RuntimeError(f"pid {pid} is not server {n} of the ensemble on {ensemble.port}")
    return pid


def _found_expired(holder: Any, lease: Any, limit: float) -> bool:
    """Once the holder's server resumed: whether its client found the session expired
    (kazoo makes a new one when its server says so) while the lease still read lost."""
    import testinternals as internals

    session = internals.session(holder.app)
    gone = lease._grant.session_id
    until = time.monotonic() + limit
    while session.session_id in (None, gone) or not session.live.is_set():
        if time.monotonic() > until:
            return False
        time.sleep(0.01)
    return bool(lease.lost)


if __name__ == "__main__":
    if sys.argv[1:] != ["peers"]:
        sys.exit("usage: python testsupport.py peers")
    _run_peers()
