"""What ``bench.py`` and ``contention.py`` share (not part of the package).

- the ensemble: :class:`Layout` (``--hosts`` split into servers), the servers' counters
  (``srvr``), :func:`check_ensemble`, :func:`machine_info`, a run's root and its deletion;
- clients: kazoo's (:func:`connect`) and zkcelery's, through a Celery app of its own
  (:func:`make_app`, :func:`close_sessions`);
- :class:`Child`: a spawned process serving an object's methods over a pipe, and
  :func:`run_from` / :func:`start_together` for children that start at one instant;
- results: :class:`Target`, :func:`percentile`, plain and markdown tables, the report;
- :func:`arguments`: the options both scripts take.

Importing it puts this repository first on ``sys.path``: the scripts measure its
``zkcelery.py`` (and use its ``testsupport.py``), not a copy installed elsewhere.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import math
import multiprocessing as mp
import os
import platform
import subprocess
import sys
import time
import traceback
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Callable, TypeVar

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from celery import Celery, signals  # noqa: E402
from kazoo.client import KazooClient  # noqa: E402
from kazoo.exceptions import NoNodeError, NotEmptyError  # noqa: E402

import zkcelery  # noqa: E402
from testsupport import four_letter  # noqa: E402

SPAWN = mp.get_context("spawn")
REPLY_TIMEOUT = 60.0  # seconds a child may take to answer, beyond the work asked of it


def logger(program: str) -> Callable[[str], None]:
    def log(message: str) -> None:
        print(f"{program}: {message}", file=sys.stderr, flush=True)

    return log


# ---------------------------------------------------------------------------
# The ensemble
# ---------------------------------------------------------------------------


L = TypeVar("L", bound="Layout")


@dataclass(frozen=True)
class Layout:
    """The servers of ``--hosts``, one at a time: a client is put on exactly one."""

    entries: tuple[str, ...]
    chroot: str

    @classmethod
    def parse(cls: type[L], hosts: str, program: str) -> L:
        text, chroot = hosts.strip(), ""
        if "/" in text:
            text, chroot = text[: text.index("/")], text[text.index("/") :]
        entries = tuple(entry.strip() for entry in text.split(",") if entry.strip())
        if not entries:
            raise SystemExit(f"{program}: no host in {hosts!r}")
        return cls(entries, chroot)

    def entry(self, index: int) -> str:
        return self.entries[index % len(self.entries)]

    def hosts(self, entry: str) -> str:
        return entry + self.chroot


def field_of(text: str, name: str) -> str:
    """A field of a four-letter word's answer (``srvr``: ``Received: 123``...)."""
    for line in text.splitlines():
        if line.startswith(f"{name}:"):
            return line.split(":", 1)[1].strip()
    raise ValueError(f"no {name!r} in the server's answer {text[:200]!r}")


def received(entries: Sequence[str]) -> int:
    """The packets these servers have received from clients (``srvr``), summed."""
    return sum(int(field_of(four_letter(entry, "srvr"), "Received")) for entry in entries)


def probe_overhead(read: Callable[[], int], tries: int = 3) -> int:
    """The packets one probe (``read``) adds to the next one's count: its own connections'."""
    pairs = []
    for _ in range(tries):
        first = read()
        pairs.append(read() - first)
    return min(pairs)


def check_ensemble(layout: Layout, program: str, words: Sequence[str] = ("srvr",)) -> None:
    for entry in layout.entries:
        try:
            for word in words:
                four_letter(entry, word)
        except OSError as exc:
            raise SystemExit(
                f"{program}: no ZooKeeper server answers at {entry} ({exc}): start the "
                "ensemble with ./zk-test.sh, or name it with --hosts"
            ) from None


def zkcelery_version() -> str:
    """Which zkcelery.py was measured: its path, content digest and git state."""
    path = Path(zkcelery.__file__)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    try:
        git = ["git", "-C", str(path.parent)]
        commit = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--", path.name], capture_output=True, text=True
        ).stdout.strip()
        state = f", git {commit}{' + uncommitted changes' if dirty else ''}"
    except (OSError, subprocess.CalledProcessError):
        state = ""
    return f"{path} (sha256 {digest}{state})"


def machine_info(layout: Layout, **extra: Any) -> dict[str, Any]:
    answers = {entry: four_letter(entry, "srvr") for entry in layout.entries}
    return {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "kazoo": metadata.version("kazoo"),
        "celery": metadata.version("celery"),
        "zkcelery": zkcelery_version(),
        "zookeeper": field_of(answers[layout.entry(0)], "Zookeeper version").split("-")[0],
        "modes": {entry: field_of(text, "Mode") for entry, text in answers.items()},
        **extra,
    }


def machine_lines(machine: dict[str, Any]) -> list[str]:
    load = ""
    if "loadavg" in machine:
        load = f", load average {', '.join(f'{x:.2f}' for x in machine['loadavg'])} at start"
    return [
        f"date: {machine['date']}",
        f"machine: {machine['nproc']} cpus{load}, {machine['platform']}",
        f"python {machine['python']}, kazoo {machine['kazoo']}, celery {machine['celery']}, "
        f"ZooKeeper {machine['zookeeper']}",
        f"zkcelery from {machine['zkcelery']}",
        f"servers: {', '.join(f'{e} {m}' for e, m in machine['modes'].items())}",
    ]


def new_root(parent: str) -> str:
    """A fresh root for one run, under ``parent``."""
    return f"{parent}/{uuid.uuid4().hex[:12]}"


def delete_root(client: KazooClient, root: str, log: Callable[[str], None]) -> None:
    """Delete this run's root, and its parent when no other run uses it."""
    try:
        with contextlib.suppress(NoNodeError):
            client.delete(root, recursive=True)
        with contextlib.suppress(NoNodeError, NotEmptyError):
            client.delete(root.rsplit("/", 1)[0])
    except Exception as exc:
        log(f"warning: could not delete {root}: {exc!r}")


# ---------------------------------------------------------------------------
# Clients
# ---------------------------------------------------------------------------


def connect(hosts: str) -> KazooClient:
    client = KazooClient(hosts=hosts)
    client.start(timeout=15)
    return client


def disconnect(client: KazooClient) -> None:
    with contextlib.suppress(Exception):
        client.stop()
        client.close()


def make_app(main: str, hosts: str, root: str) -> Celery:
    """A Celery app of its own (so a session of its own), on ``hosts`` under ``root``."""
    app = Celery(main, set_as_current=False)
    app.conf.update(ZOOKEEPER_HOSTS=hosts, ZOOKEEPER_ROOT=root)
    return app


def close_sessions() -> None:
    """Close this process's zkcelery sessions, as a worker does when it shuts down."""
    signals.worker_process_shutdown.send(sender=None)


# ---------------------------------------------------------------------------
# Children: spawned processes answering over a pipe
# ---------------------------------------------------------------------------


def _serve(factory: Callable[..., Any], args: tuple, conn: Connection) -> None:
    """A child's loop: make the object, say so, call its methods until ("exit",), close it.

    Errors are answered with their traceback; the object's ``close()``, if it has one, runs
    however the loop ends.
    """
    try:
        served = factory(*args)
    except Exception:
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("ok", None))
    try:
        while (message := conn.recv())[0] != "exit":
            name, args = message
            try:
                conn.send(("ok", getattr(served, name)(*args)))
            except Exception:
                conn.send(("error", traceback.format_exc()))
    finally:
        with contextlib.suppress(Exception):
            getattr(served, "close", lambda: None)()


class Child:
    """A spawned process (never forked from one with a client) serving ``factory(*args)``.

    The parent calls the object's methods by name; ``expect`` the first time is its
    answer to being made.
    """

    def __init__(self, label: str, factory: Callable[..., Any], *args: Any) -> None:
        self.label = label
        self.conn, child = SPAWN.Pipe()
        self.process = SPAWN.Process(target=_serve, args=(factory, args, child), daemon=True)
        self.process.start()
        child.close()

    def send(self, name: str, *args: Any) -> None:
        self.conn.send((name, args))

    def expect(self, timeout: float = REPLY_TIMEOUT) -> Any:
        if not self.conn.poll(timeout):
            raise TimeoutError(f"{self.label} did not answer within {timeout:.0f} s")
        status, value = self.conn.recv()
        if status == "error":
            raise RuntimeError(f"{self.label} failed:\n{value}")
        return value

    def call(self, name: str, *args: Any, timeout: float = REPLY_TIMEOUT) -> Any:
        self.send(name, *args)
        return self.expect(timeout)


def call_all(children: Sequence[Child], name: str, *args: Any) -> list[Any]:
    for child in children:
        child.send(name, *args)
    return [child.expect() for child in children]


def stop_children(children: Sequence[Child]) -> None:
    for child in children:
        with contextlib.suppress(OSError, ValueError):
            child.conn.send(("exit",))
    for child in children:
        child.process.join(15)
        if child.process.is_alive():
            child.process.terminate()
            child.process.join(5)
        child.conn.close()


def run_from(start_at: float, seconds: float, op: Callable[[], Any]) -> list[Any]:
    """In a child: from ``start_at`` (``time.monotonic``), ``op()`` again and again for ``seconds``.

    The op under way at the end is finished; what each returned is returned.
    """
    time.sleep(max(0.0, start_at - time.monotonic()))
    end, done = start_at + seconds, []
    while time.monotonic() < end:
        done.append(op())
    return done


def start_together(
    children: Sequence[Child], name: str, seconds: float, lead: float
) -> tuple[float, list[Any]]:
    """Have the children run ``name(start_at, seconds)`` from one instant ``lead`` s away."""
    start_at = time.monotonic() + lead
    for child in children:
        child.send(name, start_at, seconds)
    return start_at, [child.expect(REPLY_TIMEOUT + seconds) for child in children]


# ---------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------


@dataclass
class Target:
    """A measure against its target: PASS, MISS (FAIL for a correctness check) or n/a."""

    measure: str
    value: float | None
    op: str  # "<=" or ">="
    limit: float
    note: str = ""
    safety: bool = False  # a correctness check, not a timing target

    @property
    def passed(self) -> bool | None:
        if self.value is None:
            return None
        value = round(self.value, 2)
        return value <= self.limit if self.op == "<=" else value >= self.limit

    @property
    def verdict(self) -> str:
        if self.passed is None:
            return "n/a"
        return "PASS" if self.passed else ("FAIL" if self.safety else "MISS")


def percentile(samples: Sequence[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))]


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


TARGET_HEADER = ["measure", "value", "target", "result", "note"]


def target_rows(targets: Sequence[Target]) -> list[list[str]]:
    return [[t.measure, fmt(t.value), f"{t.op} {t.limit:g}", t.verdict, t.note] for t in targets]


Table = Callable[[Sequence[str], Sequence[Sequence[str]]], str]


def plain_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(header, widths))]
    lines.append("  ".join("-" * width for width in widths))
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows]
    return "\n".join(line.rstrip() for line in lines)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def print_report(
    results: dict[str, Any],
    render: Callable[[dict[str, Any], Table], str],
    machine: list[str],
    notes: list[str],
    markdown: bool,
) -> None:
    """The tables as text; with ``markdown``, again as the README shows them."""
    print("\n".join(machine))
    print()
    print(render(results, plain_table))
    print()
    print("\n".join(notes))
    print(f"run took {results['seconds']:.0f} s")
    if markdown:
        print()
        print("\n".join(f"- {line}" for line in machine))
        print()
        print(render(results, markdown_table))
        print()
        print("\n".join(f"- {line}" for line in notes))


def arguments(
    doc: str | None, quick_help: str, json_default: Path | None, json_help: str
) -> argparse.ArgumentParser:
    """The options both scripts take: ``--hosts``, ``--quick``, ``--markdown``, ``--json``."""
    parser = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    parser.add_argument("--hosts", default=None, help="ZooKeeper hosts (default: .zk-test/hosts)")
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--markdown", action="store_true", help="also print markdown tables")
    parser.add_argument("--json", type=Path, default=json_default, help=json_help)
    return parser
