"""The migration lock: a session-level advisory lock on the connection that runs the migrations.

It is a readers-writer lock: a run that only needs to see that the database is at its target
holds it shared, so fifty pods starting at head check at once; a run with work to do holds it
exclusive, which excludes them all. Waiters never block inside the server (`pg_advisory_lock` would hold a lock wait that a holder's
`CREATE INDEX CONCURRENTLY` has to wait out); they poll `pg_try_advisory_lock` in autocommit with
jittered backoff. The holder NOTIFYs on release so the next waiter takes over at once; polling
covers a holder that vanished without a word (its session ends and the server frees the lock).
"""

from __future__ import annotations

import os
import random
import select
import time
from contextlib import ExitStack, contextmanager
from typing import Any, Callable, Iterator, NamedTuple

import psycopg2

from job import credentials, db
from job.config import Database, Settings, lock_key_for
from job.errors import ConfigError, LockLost, LockTimeout, first_line
from job.logs import log
from job.wait import connected

HOLDER_SQL = """
SELECT a.pid, a.application_name, host(a.client_addr), a.backend_start, a.state
FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
  AND l.classid::bigint = %(classid)s AND l.objid::bigint = %(objid)s
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
ORDER BY l.mode = 'ExclusiveLock' DESC  -- the migrating holder first; else a reader
LIMIT 1
"""

SHARED, EXCLUSIVE = "shared", "exclusive"
# Free connection slots below which a waiter gives its own back (see MakeRoom).
ROOM = 3
FREE_SLOTS_SQL = """
SELECT current_setting('max_connections')::int - current_setting('superuser_reserved_connections')::int
       - (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')
"""


class MakeRoom(Exception):
    """Raised while waiting, holding nothing: the server is nearly out of connection slots, and the
    holder needs some of its own (pg_dump's, env.py's engine). Fifty replicas waiting on a server
    of twenty slots would otherwise keep the holder from ever backing up; so a waiter closes its
    connection, waits a moment and starts over, its lock timeout still counted from its first try."""
# Waiters report who holds the lock at the first miss and then this often.
REPORT_EVERY = 10.0
# Backoff between tries when no notification arrives: from the first to the cap, full jitter.
FIRST_DELAY, MAX_DELAY = 0.05, 1.0


def channel(key: int) -> str:
    return f"migrate_job_{key & 0xFFFFFFFFFFFFFFFF:016x}"


def ensure_own_session(conn: Any, connect_kwargs: dict[str, str]) -> None:
    """Refuse a pooler in transaction mode (PgBouncer's pool_mode=transaction), where a session
    advisory lock stays on a server connection that the next client is handed.

    Connected directly (or through a TCP proxy that relays the server's BackendKeyData), the
    backend pid libpq was given at connection start is the one our statements run in: no pooler,
    nothing more to check. A pooler hands out cancel keys of its own, so then: a second client
    connects and notes its backend pid. Through a session pool the two differ while we are
    connected; a transaction pool gives the second client the server connection our statement
    just released, with the same pid.
    """
    ours = conn.server_pid  # read as the session started (job.wait)
    if ours == conn.get_backend_pid():
        return
    other = psycopg2.connect(**credentials.completed(connect_kwargs))
    try:
        with other.cursor() as cur:
            cur.execute("SELECT pg_backend_pid()")
            theirs = cur.fetchone()[0]
    finally:
        other.close()
    if ours == theirs:
        raise ConfigError(
            "DATABASE_URL reaches PostgreSQL through a pooler in transaction mode (PgBouncer "
            "pool_mode=transaction?): another client was given our server session, so the "
            "migration lock would not be ours alone. Point the job at PostgreSQL directly, or at a "
            "pool in session mode"
        )


def cancel_lock_waits(conn: Any, application_name: str, longer_than: float) -> int:
    """Cancel the statements of sessions named `application_name` that have waited for a lock
    longer than `longer_than` seconds (pg_locks.waitstart, PostgreSQL 14+); return how many."""
    if conn.server_version < 140000:
        return 0
    with conn.cursor() as cur:
        cur.execute(
            "SELECT count(pg_cancel_backend(l.pid)) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE a.application_name = %s AND NOT l.granted AND l.waitstart < now() - make_interval(secs => %s)",
            (application_name, longer_than),
        )
        return cur.fetchone()[0]


def holder(conn: Any, key: int) -> dict[str, Any] | None:
    """Who holds advisory lock `key` in this database: pid, application_name, client address, since when."""
    unsigned = key & 0xFFFFFFFFFFFFFFFF
    with conn.cursor() as cur:
        cur.execute(HOLDER_SQL, {"classid": unsigned >> 32, "objid": unsigned & 0xFFFFFFFF})
        row = cur.fetchone()
    if row is None:
        return None
    pid, application_name, client_addr, since, state = row
    return {
        "pid": pid,
        "application_name": application_name,
        "client_addr": client_addr or "local",
        "since": since.isoformat() if since else None,
        "state": state,
    }


def _try(conn: Any, key: int, mode: str) -> bool:
    function = "pg_try_advisory_lock_shared" if mode == SHARED else "pg_try_advisory_lock"
    with conn.cursor() as cur:
        cur.execute(f"SELECT {function}(%s)", (key,))
        return bool(cur.fetchone()[0])


def _unlock(conn: Any, key: int, mode: str) -> None:
    function = "pg_advisory_unlock_shared" if mode == SHARED else "pg_advisory_unlock"
    with conn.cursor() as cur:
        cur.execute(f"SELECT {function}(%s)", (key,))


def sleep_or_notified(conn: Any, seconds: float) -> None:
    """Sleep up to `seconds`, waking early when the holder announces its release."""
    ready, _, _ = select.select([conn.fileno()], [], [], seconds)
    if ready:
        conn.poll()
        conn.notifies.clear()


def _attempt(conn: Any, key: int, enough: Callable[[], bool] | None) -> str | None:
    """One try: the shared lock if `enough` passes under it, else the exclusive lock, else nothing."""
    if enough is not None and _try(conn, key, SHARED):
        if enough():
            return SHARED
        # Trade the shared lock for the exclusive one in one round trip: a session's own locks
        # never conflict with each other, so the order the two calls run in does not matter.
        with conn.cursor() as cur:
            cur.execute("SELECT pg_try_advisory_lock(%(key)s), pg_advisory_unlock_shared(%(key)s)", {"key": key})
            return EXCLUSIVE if cur.fetchone()[0] else None
    return EXCLUSIVE if _try(conn, key, EXCLUSIVE) else None


def acquire(
    conn: Any,
    key: int,
    timeout: float,
    while_waiting: Callable[[], None] | None = None,
    enough: Callable[[], bool] | None = None,
    since: float | None = None,
    make_room: bool = False,
) -> tuple[str, float]:
    """Take the lock within `timeout` seconds of `since` (see `_acquire`). Every statement of the
    wait is answered by its end (plus a connect timeout's grace), or the connection counts as lost:
    a dead network does not make the wait endless."""
    since = time.monotonic() if since is None else since
    with db.answered_by(since + timeout + 5):
        return _acquire(conn, key, timeout, while_waiting, enough, since, make_room)


def _acquire(
    conn: Any,
    key: int,
    timeout: float,
    while_waiting: Callable[[], None] | None,
    enough: Callable[[], bool] | None,
    started: float,
    make_room: bool,
) -> tuple[str, float]:
    """Take the lock within `timeout` seconds or raise LockTimeout; return the mode held and the seconds waited.

    A readers-writer lock: with `enough` (a check run under the shared lock, such as "the database
    is already at the target"), a session whose check passes holds only the shared lock, and any
    number of them can check at once; a session with work to do takes the exclusive lock, which
    excludes every reader. `while_waiting` runs once, after the first miss.
    """
    listening = False
    next_report, attempt = started, 0
    try:
        while True:
            mode = _attempt(conn, key, enough)
            if mode is not None:
                return mode, time.monotonic() - started
            if not listening:
                with conn.cursor() as cur:
                    cur.execute(f"LISTEN {channel(key)}")
                listening = True
                # The holder is migrating and every start-up waits on it: give it the CPU. A waiter's
                # own work (loading the log pipeline, a poll now and then, with no manifest loading
                # Alembic) can wait. This only weighs against processes in the same cgroup (replicas
                # started side by side on one machine); a pod's container has its own.
                os.nice(19)
                if while_waiting is not None:
                    while_waiting()
            now = time.monotonic()
            waited = now - started
            if make_room and free_slots(conn) < ROOM:
                log.info("lock.making_room", key=key, waited=round(waited, 3),
                         reason="the server is nearly out of connection slots: this waiter gives its own back")
                raise MakeRoom()
            if now >= next_report:
                log.info("lock.waiting", key=key, waited=round(waited, 3), holder=holder(conn, key))
                next_report = now + REPORT_EVERY
            if waited >= timeout:
                raise LockTimeout(
                    f"migration lock {key} not acquired within {timeout:g} s (MIGRATE_LOCK_TIMEOUT); "
                    f"held by {describe(holder(conn, key))}"
                )
            delay = random.uniform(0, min(MAX_DELAY, FIRST_DELAY * 2**attempt))
            sleep_or_notified(conn, min(delay, max(timeout - waited, 0.0)))
            attempt += 1
    finally:
        if listening and not conn.closed:
            with conn.cursor() as cur:
                cur.execute("UNLISTEN *")


def free_slots(conn: Any) -> int:
    """How many more clients the server admits (ordinary roles)."""
    with conn.cursor() as cur:
        cur.execute(FREE_SLOTS_SQL)
        return int(cur.fetchone()[0])


def confirm(conn: Any, key: int) -> None:
    """Raise LockLost unless the session that took lock `key` is still there. A session-level
    advisory lock ends only with its session (or an unlock, which only `release` does), so a live
    session is a held lock: one cheap round trip, not a read of pg_locks (which gathers every lock
    on the server) before each revision."""
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
    except psycopg2.Error as e:
        raise LockLost(f"the session holding the migration lock {key} is gone ({first_line(e)}); "
                       "nothing more was run: run the job again") from None


def held_sql(key: int, holder_pid: int) -> str:
    """PL/pgSQL that raises LOCK_LOST unless the session `holder_pid` still holds lock `key`
    exclusively: run inside each revision's transaction, from whichever session env.py migrates on
    (pg_locks shows every session's locks), so that a revision whose job lost the lock (it ran
    pg_advisory_unlock_all(), or the server ended the job's session) rolls back rather than commits."""
    unsigned = key & 0xFFFFFFFFFFFFFFFF
    return (
        "IF NOT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1 "
        f"AND mode = 'ExclusiveLock' AND pid = {int(holder_pid)} AND classid::bigint = {unsigned >> 32} "
        f"AND objid::bigint = {unsigned & 0xFFFFFFFF} "
        "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())) THEN "
        f"RAISE EXCEPTION 'the migration lock {key} is no longer held by the job''s session (pid {int(holder_pid)})' "
        f"USING ERRCODE = '{db.LOCK_LOST}'; END IF;")


def release(conn: Any, key: int, mode: str = EXCLUSIVE) -> None:
    """Release the lock (waking the waiters after an exclusive hold); a broken session releases it by ending."""
    if conn.closed:
        log.info("lock.released", key=key, mode=mode, by="session end")
        return
    try:
        conn.rollback()
        conn.autocommit = True
        _unlock(conn, key, mode)
        if mode == EXCLUSIVE:
            with conn.cursor() as cur:
                cur.execute(f"NOTIFY {channel(key)}")
        log.info("lock.released", key=key, mode=mode)
    except psycopg2.Error:
        conn.close()
        log.info("lock.released", key=key, mode=mode, by="session end")


@contextmanager
def advisory_lock(
    conn: Any,
    key: int,
    timeout: float,
    while_waiting: Callable[[], None] | None = None,
    enough: Callable[[], bool] | None = None,
    since: float | None = None,
    make_room: bool = False,
) -> Iterator[str]:
    """Hold the migration lock on `conn` for the body of the `with`; yields the mode held."""
    mode, waited = acquire(conn, key, timeout, while_waiting, enough, since, make_room)
    log.info("lock.acquired", key=key, mode=mode, waited=round(waited, 3))
    try:
        yield mode
    finally:
        release(conn, key, mode)


def describe(info: dict[str, Any] | None) -> str:
    """Who holds the lock, as `holder` found it, in words."""
    if info is None:
        return "a session that has since released it"
    return (
        f"pid {info['pid']} ({info['application_name'] or 'no application_name'}, "
        f"{info['client_addr']}, since {info['since']})"
    )


def key_of(settings: Settings, conn: Any) -> int:
    """MIGRATE_LOCK_KEY, else the key derived from the database name and the version table."""
    if settings.lock_key is not None:
        return settings.lock_key
    return lock_key_for(db.database_name(conn), settings.version_table)


@contextmanager
def locked(settings: Settings, conn: Any, while_waiting: Callable[[], None] | None = None,
           enough: Callable[[], bool] | None = None, since: float | None = None,
           make_room: bool = False) -> Iterator[str]:
    """Hold the migration lock on `conn` (refusing a transaction-mode pooler first); yields its mode.
    Without `enough` it is always exclusive."""
    ensure_own_session(conn, settings.database.connect_kwargs(settings.application_name))
    with advisory_lock(conn, key_of(settings, conn), settings.lock_timeout, while_waiting, enough,
                       since, make_room) as mode:
        yield mode


class Other(NamedTuple):
    """Another database a multidb env.py migrates (MIGRATE_DATABASES), connected and locked."""

    section: str
    database: Database
    conn: Any


@contextmanager
def other_databases(settings: Settings, main: Any) -> Iterator[list[Other]]:
    """Wait for and lock each other database env.py migrates, in the order they are listed (every
    runner takes them in the same order, after DATABASE_URL's, on `main`); release them at the end.
    Two sections that reach one database however spelt (an address and a name for one server) are
    refused: env.py would hold two sessions on it, each waiting for the other's locks."""
    with ExitStack() as stack:
        others = []
        seen = {_identity(main): "DATABASE_URL's"} if settings.other_databases else {}
        for section, database in settings.other_databases:
            conn = stack.enter_context(connected(settings._replace(database=database)))
            reached = _identity(conn)
            if reached in seen:
                raise ConfigError(f"the multidb section {section!r} reaches the same database as {seen[reached]} "
                                  f"({db.database_name(conn)}): give each section its own database")
            seen[reached] = repr(section)
            stack.enter_context(advisory_lock(conn, key_of(settings, conn), settings.lock_timeout))
            others.append(Other(section, database, conn))
        yield others


def _identity(conn: Any) -> tuple[str, str]:
    """Which database a connection reached: its name on a server (its system identifier)."""
    return db.database_name(conn), db.server_identity(conn)


class Held(NamedTuple):
    """The lock `for_migration` holds, and what proved there was nothing to do (None: there is work)."""

    mode: str
    settled: Any


@contextmanager
def for_migration(settings: Settings, conn: Any, since: float, settled: Callable[[], Any], shared_first: bool,
                  while_waiting: Callable[[], None] | None = None) -> Iterator[Held]:
    """`run`'s lock. With `shared_first` (what is known of the scripts may settle it without
    Alembic), first the shared lock: as many replicas as like hold it at once, each asking
    `settled()`; the first that finds work trades it for the exclusive one. Under the exclusive
    lock `settled()` is asked once more (another replica may have done the work, and recorded what
    it learned, while this one waited). `while_waiting` runs while another replica holds it. With
    other databases to migrate (MIGRATE_DATABASES) every run checks them all: exclusive, no shortcut."""
    proved: list[Any] = [None]

    def enough() -> bool:
        proved[0] = settled()
        return proved[0] is not None

    fast = shared_first and not settings.other_databases
    with locked(settings, conn, while_waiting, enough if fast else None, since, make_room=True) as mode:
        if mode == EXCLUSIVE:
            proved[0] = None if settings.other_databases else settled()
        yield Held(mode, proved[0])
