"""What zkcelery's tests, its demo and its benchmarks share (not part of the package).

- :func:`ensemble_hosts`: where the test ensemble that ``./zk-test.sh`` started listens;
- :class:`AtomicFilesystemTransport`: kombu's filesystem transport, without its lost
  messages, for workers that need no broker server;
- :func:`four_letter`: a ZooKeeper server's answer to ``srvr``, ``cons``...
"""

from __future__ import annotations

import os
import socket
import time
import uuid
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
