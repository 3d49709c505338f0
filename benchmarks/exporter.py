#!/usr/bin/env python3
"""The exporter's cost: ``python -m zkcelery exporter`` beside many held locks.

Run it against a running ensemble (``./zk-test.sh``)::

    python benchmarks/exporter.py [--hosts H] [--quick] [--json PATH] [--markdown]

What it does (issue 22):

1. holds 10,000 locks (``--quick``: 1,000): uncontended ``LockTask.lock(i).acquire()`` of
   distinct keys, from 16 threads, in sessions of at most 2,000 leases each (a Celery app of
   its own per session: a session's ephemeral nodes are deleted by one closeSession
   transaction that lists them, which must stay well under ``jute.maxbuffer``);
2. starts the exporter as a subprocess on a free port of loopback, and polls ``/metrics``
   every 0.5 s until a scrape shows every lock held: the time from the start, and the
   requests the ensemble received meanwhile (``srvr`` Received, summed over the servers, less
   the probes' own packets) and the exporter's own session's (``cons``);
3. scrapes every 5 s for 60 s (``--quick``: 15 s): each scrape's latency, and the requests
   the exporter's session sent (``cons``: ``lcxid``, the last request's xid, which pings do
   not move; ``recved``, every packet, pings included) and the ensemble received;
4. the exporter's resident memory (``VmRSS``) after the load and at the end.

The holders' sessions are idle meanwhile but for zkcelery's watchdog (a sync when nothing
was confirmed by the leader lately) and pings: the ensemble's count less the exporter's
session's is theirs (and any other client's of the ensemble).

Hosts: ``--hosts``, else ``$ZK_TEST_HOSTS``, else ``.zk-test/hosts`` beside this repository's
``zk-test.sh``.  Every run uses a fresh root ``/zkcelery-bench-exporter/<id>`` and deletes it
at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shlex
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import (
    REPO,
    Layout,
    Table,
    arguments,
    check_ensemble,
    close_sessions,
    connect,
    delete_root,
    disconnect,
    fmt,
    logger,
    machine_info,
    machine_lines,
    make_app,
    new_root,
    print_report,
    probe_overhead,
    received,
)
from celery import Celery
from prometheus_client.parser import text_string_to_metric_families

import zkcelery
from testsupport import ensemble_hosts, four_letter

ROOT_PARENT = "/zkcelery-bench-exporter"
TASK = "bench.exporter"
LEASES_PER_SESSION = 2_000
HOLD_THREADS = 16
log = logger("exporter")


@dataclass(frozen=True)
class Plan:
    keys: int
    seconds: float  # of scraping
    interval: float = 5.0


FULL, QUICK = Plan(10_000, 60.0), Plan(1_000, 15.0)


# ---------------------------------------------------------------------------
# The held locks
# ---------------------------------------------------------------------------


def hold(hosts: str, root: str, keys: int) -> tuple[list[Celery], float]:
    """``keys`` locks held in sessions of LEASES_PER_SESSION at most: the apps, and the time."""
    apps = [make_app(f"holder-{i}", hosts, root) for i in range(-(-keys // LEASES_PER_SESSION))]
    tasks = [app.task(base=zkcelery.LockTask, bind=True, name=TASK)(_body) for app in apps]
    started = time.monotonic()

    def take(i: int) -> bool:
        return tasks[i // LEASES_PER_SESSION].lock(i).acquire()  # type: ignore[no-any-return]

    with ThreadPoolExecutor(HOLD_THREADS) as pool:
        taken = sum(pool.map(take, range(keys)))
    if taken != keys:
        raise SystemExit(f"exporter: only {taken} of {keys} locks taken")
    return apps, time.monotonic() - started


def _body(self: Any) -> None:
    pass


# ---------------------------------------------------------------------------
# The exporter and the servers' counters
# ---------------------------------------------------------------------------


class Exporter:
    """``python -m zkcelery exporter`` (this repository's) on a free port of loopback."""

    def __init__(self, hosts: str, root: str) -> None:
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "zkcelery", "--hosts", hosts, "--root", root, "exporter",
             "--port", "0", "--addr", "127.0.0.1"],
            cwd=REPO, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        match = re.search(r"(http://\S+/metrics) .*session (0x[0-9a-f]+)", line)
        if not match:
            self.stop()
            raise SystemExit(f"exporter: the exporter did not start: {line!r}")
        self.url, self.sid = match.group(1), match.group(2)

    def scrape(self) -> tuple[float, float]:
        """(seconds the scrape took, locks held as it says)."""
        began = time.monotonic()
        with urllib.request.urlopen(self.url, timeout=30) as answer:
            text = answer.read().decode()
        took = time.monotonic() - began
        held = sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "zkcelery_leases_held" and sample.labels.get("kind") == "lock"
        )
        return took, held

    def rss_mb(self) -> float:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024  # type: ignore[union-attr]

    def stop(self) -> int:
        self.proc.terminate()
        return self.proc.wait(30)


def session_counters(layout: Layout, sid: str) -> tuple[int, int]:
    """(packets received, last request's xid) of one session, from its server's ``cons``."""
    for entry in layout.entries:
        for line in four_letter(entry, "cons").splitlines():
            if f"sid={sid}," in line:
                recved = re.search(r"recved=(\d+)", line)
                lcxid = re.search(r"lcxid=(0x[0-9a-f]+)", line)
                return int(recved.group(1)), int(lcxid.group(1), 16)  # type: ignore[union-attr]
    raise SystemExit(f"exporter: no server has a connection of the session {sid}")


class Counter:
    """The ensemble's Received (``srvr``), less what reading it costs."""

    def __init__(self, layout: Layout) -> None:
        self.entries = layout.entries
        self.overhead = probe_overhead(self.read)

    def read(self) -> int:
        return received(self.entries)

    def since(self, before: int) -> int:
        return self.read() - before - self.overhead


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------


def run(layout: Layout, plan: Plan) -> dict[str, Any]:
    hosts = ",".join(layout.entries)
    root = new_root(ROOT_PARENT)
    client = connect(hosts)
    began = time.monotonic()
    results: dict[str, Any] = {"plan": plan.__dict__, "machine": machine_info(layout)}
    try:
        _apps, results["hold_seconds"] = hold(hosts, root, plan.keys)  # the sessions: kept
        log(f"{plan.keys} locks held in {results['hold_seconds']:.1f} s; starting the exporter")
        results.update(measure(layout, hosts, root, plan))
    finally:
        # A session closed with leases held logs each as lost: 10,000 lines of noise here.
        logging.getLogger("zkcelery").setLevel(logging.ERROR)
        close_sessions()
        delete_root(client, root, log)
        disconnect(client)
    results["seconds"] = time.monotonic() - began
    return results


def measure(layout: Layout, hosts: str, root: str, plan: Plan) -> dict[str, Any]:
    counter = Counter(layout)
    ensemble = counter.read()
    exporter = Exporter(hosts, root)
    try:
        while exporter.scrape()[1] < plan.keys:
            time.sleep(0.5)
        load = {
            "load_seconds": time.monotonic() - exporter.started,
            "load_ensemble": counter.since(ensemble),
            "load_exporter": session_counters(layout, exporter.sid)[0],
            "rss_loaded_mb": exporter.rss_mb(),
        }
        return {**load, **scrape_window(layout, exporter, counter, plan)}
    finally:
        load_code = exporter.stop()
        log(f"the exporter exited with status {load_code}")


def scrape_window(
    layout: Layout, exporter: Exporter, counter: Counter, plan: Plan
) -> dict[str, Any]:
    """Scrape every ``plan.interval`` for ``plan.seconds``: latencies and requests."""
    ensemble = counter.read()
    recved, lcxid = session_counters(layout, exporter.sid)
    began = time.monotonic()
    latencies, wrong = [], 0
    for n in range(int(plan.seconds / plan.interval)):
        time.sleep(max(0.0, began + n * plan.interval - time.monotonic()))
        took, held = exporter.scrape()
        latencies.append(took)
        wrong += held != plan.keys
    time.sleep(max(0.0, began + plan.seconds - time.monotonic()))
    minutes = (time.monotonic() - began) / 60
    recved_after, lcxid_after = session_counters(layout, exporter.sid)
    return {
        "scrapes": len(latencies),
        "scrapes_wrong": wrong,
        "window_seconds": minutes * 60,
        "window_ensemble": counter.since(ensemble),
        "window_exporter_requests": lcxid_after - lcxid,
        "window_exporter_packets": recved_after - recved,
        "latency_median_ms": statistics.median(latencies) * 1000,
        "latency_max_ms": max(latencies) * 1000,
        "rss_end_mb": exporter.rss_mb(),
    }


# ---------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------


def render(results: dict[str, Any], table: Table) -> str:
    plan, r = results["plan"], results
    minutes = r["window_seconds"] / 60
    rows = [
        [f"first complete scrape ({plan['keys']:,} held)", f"{r['load_seconds']:.1f} s",
         f"{r['load_ensemble']:,}", f"{r['load_exporter']:,}",
         f"{r['load_ensemble'] - r['load_exporter']:,}"],
        [f"{r['scrapes']} scrapes, one every {plan['interval']:g} s",
         f"{r['window_seconds']:.0f} s", f"{r['window_ensemble']:,}",
         f"{r['window_exporter_packets']:,}",
         f"{r['window_ensemble'] - r['window_exporter_packets']:,}"],
    ]  # fmt: skip
    first = table(
        ["phase", "time", "ensemble received", "the exporter's session", "the others"], rows
    )
    figures = [
        ["requests per scrape, the exporter's session (pings aside)",
         fmt(r["window_exporter_requests"] / r["scrapes"])],
        ["packets per minute while scraped, the exporter's session (pings)",
         fmt(r["window_exporter_packets"] / minutes, 1)],
        ["packets per scrape interval at the ensemble (every client, pings included)",
         fmt(r["window_ensemble"] / r["scrapes"], 1)],
        ["scrape latency, median / max (ms)",
         f"{r['latency_median_ms']:.0f} / {r['latency_max_ms']:.0f}"],
        ["scrapes that did not show every lock held", str(r["scrapes_wrong"])],
        ["exporter RSS after the load / at the end (MB)",
         f"{r['rss_loaded_mb']:.0f} / {r['rss_end_mb']:.0f}"],
    ]  # fmt: skip
    return first + "\n\n" + table(["measure", "value"], figures)


def notes(results: dict[str, Any]) -> list[str]:
    r = results
    return [
        f"{r['plan']['keys']:,} locks taken in {r['hold_seconds']:.1f} s from {HOLD_THREADS} "
        f"threads, {LEASES_PER_SESSION:,} per session",
        "ensemble received: srvr Received summed over the servers, less the probe's own; "
        "exporter's session: cons recved (pings included); requests: cons lcxid",
        "the others: the holders' sessions (watchdog syncs, pings), and any other client",
    ]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = arguments(__doc__, "1,000 locks, 15 s of scrapes", None, "write all figures here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join(["python", sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
    layout = Layout.parse(args.hosts or ensemble_hosts(), "exporter")
    check_ensemble(layout, "exporter", ("srvr", "cons"))
    results = run(layout, QUICK if args.quick else FULL)
    machine = [f"command: {command}", *machine_lines(results["machine"])]
    print_report(results, render, machine, notes(results), args.markdown)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"command": command, **results}, indent=2) + "\n")
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
