"""zkcelery's private names that the tests and their processes use: here, and nowhere else.

The tests judge zkcelery by what it does (nodes in ZooKeeper, tasks run, signals
sent, log lines) and reach inside only to cause a fault or to read a fact no
public name gives.  Each private name they need is bound here once, so that a
change of zkcelery's internals is one edit in this file, and this file is the
list of what the tests pin.  Worker and child processes import it too: it
imports neither pytest nor the test module.
"""

from __future__ import annotations

import zkcelery

# -- Sessions: one per process and app --------------------------------------

#: The session of an app in this process (made at first use): its id, its
#: client (to expire it, to count its requests), its settings.
session = zkcelery._connection
#: Every session of this process, by app: closed between tests, and checked
#: empty after a malformed setting.
sessions = zkcelery._connections
#: The sessions that free revoked tasks' keys, by app (closed when idle).
revocation_sessions = zkcelery._revocations
#: Marks a kazoo callback to run on the connection's thread (the test of it).
at_once = zkcelery._at_once
#: A request's answer lost with the connection: a test raises it in a fenced write.
ConnectionLost = zkcelery._ConnectionLost

# -- Settings and names ------------------------------------------------------

read_settings = zkcelery._read_settings
parse_hosts = zkcelery._parse_hosts
#: The znode name of a key: the tests find a lock's node by it.
lock_name = zkcelery._lock_name
NAME_LIMIT = zkcelery._NAME_LIMIT
SEP = zkcelery._SEP
#: The suffix of an exclusive lock's queue container, beside its node.
QUEUE = zkcelery._QUEUE
LOCKS, MUTEXES, BEAT = zkcelery._LOCKS, zkcelery._MUTEXES, zkcelery._BEAT
#: The private parts of kazoo and Celery zkcelery relies on (checked by a test).
INTERNALS = zkcelery._INTERNALS

# -- Leases, the queue engine, the mutex tasks --------------------------------

MutexLease = zkcelery._MutexLease
#: The engine's per-join state: a test replaces its watch to end a session mid-way.
Join = zkcelery._Join
MutexFacts, MutexStep = zkcelery._MutexFacts, zkcelery._MutexStep
#: MutexTask's decision, a pure function: tested offline by a table.
decide_mutex = zkcelery._decide_mutex
alive_here = zkcelery._alive_here
redis_visibility_timeout = zkcelery._redis_visibility_timeout
free_revoked = zkcelery._free_revoked

# -- What the command line and the hooks use ----------------------------------

listing = zkcelery._listing
break_row = zkcelery._break
