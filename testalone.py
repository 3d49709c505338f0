"""A pytest plugin: the tests marked ``alone`` run with no other test beside them.

pyproject.toml runs the suite in four pytest-xdist processes.  Most tests wait on
sessions, workers and timers far more than they compute, so four at a time cut
their wall time even on two cores.  A test marked ``alone`` runs with no other
beside it: every test that stops or kills ZooKeeper servers (it uses the
``ensemble`` fixture, and is marked so at collection), and the soaks, which load
the machine.  It takes the gate below exclusively, every other test takes it
shared.  A turnstile in front of the gate stops new shared takers while an
exclusive one waits, so such a test waits for the tests running beside it, never
for the rest of the suite.

The gate is a pair of ``flock`` files in the run's meeting folder, outside the
checkout: one folder per test ensemble (``ZK_TEST_PORT``), so that two checkouts
testing against two ensembles never wait for each other.  conftest.py loads this
plugin (``pytest_plugins``).
"""

from __future__ import annotations

import contextlib
import fcntl
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from testsupport import zk_test_port


def meeting_folder(make: bool = True) -> Path:
    """Where the processes of one run meet, per test ensemble (made unless ``make`` is false)."""
    folder = Path(tempfile.gettempdir()) / f"zkcelery-tests-{zk_test_port()}"
    if make:
        folder.mkdir(exist_ok=True)
    return folder


@contextlib.contextmanager
def _gate(exclusive: bool) -> Iterator[None]:
    folder = meeting_folder()
    with open(folder / "turnstile", "a") as turnstile, open(folder / "gate", "a") as gate:
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        try:
            fcntl.flock(gate, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        finally:
            if not exclusive:
                fcntl.flock(turnstile, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(gate, fcntl.LOCK_UN)
            fcntl.flock(turnstile, fcntl.LOCK_UN)


@pytest.fixture(autouse=True)
def _alone_if_marked(request: pytest.FixtureRequest) -> Iterator[None]:
    """First set up and last torn down (autouse): the whole test is inside the gate."""
    with _gate(exclusive=request.node.get_closest_marker("alone") is not None):
        yield


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # tryfirst: before pytest's own -m selection looks at the markers.
    for item in items:
        if "ensemble" in getattr(item, "fixturenames", ()):  # it stops or kills servers
            item.add_marker(pytest.mark.alone)
    # The tests that run alone first, one after the other: each one waits until the
    # tests beside it have finished, and the others wait for it, so that spread out
    # among the rest they would leave the other processes idle once each, not once.
    items.sort(key=lambda item: item.get_closest_marker("alone") is None)
