"""Partitions between ZooKeeper servers: how soon a cut-off holder's ``lease.lost`` turns
true, how soon a rival holds the same lock, and the margin between (issue 32).

Starts its own 3-server ensembles (``zk-test.sh`` with ``ZK_TEST_PEER_PROXIES=1``, the
proxies in this process, see testsupport.PeerNetwork), one per timing asked for: the
tests' ("fast": tickTime 200, sessions of 2 s) and ZooKeeper's stock one ("stock":
tickTime 2000, default session bounds, so 2 s asked is 4 s granted), on the test
ensemble's base port (``ZK_TEST_PORT``) plus 2000 and 3000.  Each trial holds a lock in
a session connected to the server to cut, queues a rival on the other side, cuts
(just after an answer through the leader reached the holder, every other trial, the
worst moment for the ``lost`` rule; else at once), and measures from the cut.  ``--cut
pause`` SIGSTOPs the holder's server (a follower) instead of cutting it, resumes it once
the rival holds, and checks the holder then finds its session expired.  Prints min and
median per scenario and timing; exits 1 if a margin was not positive.

    python benchmarks/partitions.py --trials 20 --timing fast stock --cut follower leader pause

``--cut client-requests`` and ``--cut client-answers`` instead cut the holder's own link
to a follower (its client goes through a proxy) one way: what it sends, or what it is
sent.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from testsupport import CLIENT_CUTS, CutTrial, ProxiedEnsemble, cut_trial, zk_test_port

OFFSETS = {"fast": 2000, "stock": 3000}


def summary(name: str, runs: list[CutTrial]) -> str:
    def figures(values: list[float | None]) -> str:
        got = [v for v in values if v is not None]
        if not got:
            return "none"
        return f"min {min(got):6.2f}  median {statistics.median(got):6.2f}"

    missing = sum(r.margin is None for r in runs)
    return (
        f"{name:<16} {len(runs):3d} trials | lost {figures([r.lost for r in runs])} | "
        f"granted {figures([r.granted for r in runs])} | margin {figures([r.margin for r in runs])}"
        + (f" | {missing} incomplete" if missing else "")
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--timing", nargs="+", choices=sorted(OFFSETS), default=["fast", "stock"])
    parser.add_argument(
        "--cut",
        nargs="+",
        choices=["follower", "leader", "pause", *CLIENT_CUTS],
        default=["follower"],
        help="client-requests, client-answers: the holder's own link, one way",
    )
    parser.add_argument(
        "--limit",
        type=float,
        default=120.0,
        help="seconds a trial waits for lost and a grant (default 120)",
    )
    parser.add_argument("--session", type=float, default=2.0, help="seconds asked (default 2)")
    parser.add_argument("--quiet", action="store_true", help="no kazoo pings on the holder's")
    args = parser.parse_args()
    lines, bad = [], 0
    for timing in args.timing:
        with tempfile.TemporaryDirectory(prefix=f"zkcelery-partitions-{timing}-") as folder:
            started = time.monotonic()
            ensemble = ProxiedEnsemble(zk_test_port() + OFFSETS[timing], Path(folder),
                                       stock=timing == "stock")  # fmt: skip
            try:
                ensemble.wait_serving()
                print(f"{timing}: ensemble up in {time.monotonic() - started:.1f} s", flush=True)
                for cut in args.cut:
                    root = f"/zkcelery-partitions/{uuid.uuid4().hex[:8]}"
                    runs = []
                    for i in range(args.trials):
                        after = args.quiet or i % 2 == 0
                        run = cut_trial(
                            ensemble, cut, root, args.session, after, args.limit, args.quiet
                        )
                        runs.append(run)
                        ok = run.margin is not None and run.margin > 0 and run.lost_at_grant
                        ok = ok and run.expired is not False
                        bad += not ok
                        print(f"  {timing} {cut} #{i}: lost {run.lost} granted {run.granted}"
                              f" heard {run.heard_before:.3f} s before"
                              f"{'' if run.expired is None else f' expired {run.expired}'}"
                              f"{'' if ok else '  BAD'}",
                              flush=True)  # fmt: skip
                    lines.append(summary(f"{cut} ({timing})", runs))
            finally:
                ensemble.stop()
    print("\nseconds after the cut:")
    print("\n".join(lines))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
