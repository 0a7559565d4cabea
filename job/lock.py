"""The migration lock: a session-level advisory lock on the connection that runs the migrations.

Waiters never block inside the server (`pg_advisory_lock` would hold a lock wait that a holder's
`CREATE INDEX CONCURRENTLY` has to wait out); they poll `pg_try_advisory_lock` in autocommit with
jittered backoff. The holder NOTIFYs on release so the next waiter takes over at once; polling
covers a holder that vanished without a word (its session ends and the server frees the lock).
"""

from __future__ import annotations

import os
import random
import select
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import psycopg2

from job.errors import ConfigError, LockTimeout
from job.logs import log

HOLDER_SQL = """
SELECT a.pid, a.application_name, host(a.client_addr), a.backend_start, a.state
FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
  AND l.classid::bigint = %(classid)s AND l.objid::bigint = %(objid)s
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""

# Waiters report who holds the lock at the first miss and then this often.
REPORT_EVERY = 10.0
# Backoff between tries when no notification arrives: from the first to the cap, full jitter.
FIRST_DELAY, MAX_DELAY = 0.05, 1.0


def channel(key: int) -> str:
    return f"migrate_job_{key & 0xFFFFFFFFFFFFFFFF:016x}"


def ensure_own_session(conn: Any, connect_kwargs: dict[str, str]) -> None:
    """Refuse a pooler in transaction mode (PgBouncer's pool_mode=transaction), where a session
    advisory lock stays on a server connection that the next client is handed.

    Our session notes its backend pid; a second client connects and notes its own. Connected
    directly, or through a session pool, the two differ while we are connected. A transaction pool
    gives the second client the server connection our statement just released: the same pid.
    """
    with conn.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        ours = cur.fetchone()[0]
    other = psycopg2.connect(**connect_kwargs)
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


def _try(conn: Any, key: int) -> bool:
    with conn.cursor() as cur:
        cur.execute("SELECT pg_try_advisory_lock(%s)", (key,))
        return bool(cur.fetchone()[0])


def sleep_or_notified(conn: Any, seconds: float) -> None:
    """Sleep up to `seconds`, waking early when the holder announces its release."""
    ready, _, _ = select.select([conn.fileno()], [], [], seconds)
    if ready:
        conn.poll()
        conn.notifies.clear()


def acquire(conn: Any, key: int, timeout: float, while_waiting: Callable[[], None] | None = None) -> float:
    """Take the lock within `timeout` seconds or raise LockTimeout; return the seconds waited.

    `while_waiting` runs once, after the first miss: work worth doing while another session holds it.
    """
    started = time.monotonic()
    if _try(conn, key):
        return 0.0
    with conn.cursor() as cur:
        cur.execute(f"LISTEN {channel(key)}")
    # The holder is migrating and every start-up waits on it: give it the CPU (a waiter's own work
    # is a poll now and then, and with no manifest loading Alembic, which can wait).
    os.nice(10)
    if while_waiting is not None:
        while_waiting()
    try:
        next_report, attempt = started, 0
        while True:
            now = time.monotonic()
            waited = now - started
            if now >= next_report:
                log.info("lock.waiting", key=key, waited=round(waited, 3), holder=holder(conn, key))
                next_report = now + REPORT_EVERY
            if waited >= timeout:
                raise LockTimeout(
                    f"migration lock {key} not acquired within {timeout:g} s (MIGRATE_LOCK_TIMEOUT); "
                    f"held by {_describe(holder(conn, key))}"
                )
            delay = random.uniform(0, min(MAX_DELAY, FIRST_DELAY * 2**attempt))
            sleep_or_notified(conn, min(delay, max(timeout - waited, 0.0)))
            attempt += 1
            if _try(conn, key):
                return time.monotonic() - started
    finally:
        if not conn.closed:
            with conn.cursor() as cur:
                cur.execute("UNLISTEN *")


def release(conn: Any, key: int) -> None:
    """Release the lock and wake the waiters; if the session is broken, closing it releases the lock."""
    if conn.closed:
        log.info("lock.released", key=key, by="session end")
        return
    try:
        conn.rollback()
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_unlock(%s)", (key,))
            cur.execute(f"NOTIFY {channel(key)}")
        log.info("lock.released", key=key)
    except psycopg2.Error:
        conn.close()
        log.info("lock.released", key=key, by="session end")


@contextmanager
def advisory_lock(conn: Any, key: int, timeout: float, while_waiting: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold the migration lock on `conn` for the body of the `with`."""
    waited = acquire(conn, key, timeout, while_waiting)
    log.info("lock.acquired", key=key, waited=round(waited, 3))
    try:
        yield
    finally:
        release(conn, key)


def _describe(info: dict[str, Any] | None) -> str:
    if info is None:
        return "a session that has since released it"
    return (
        f"pid {info['pid']} ({info['application_name'] or 'no application_name'}, "
        f"{info['client_addr']}, since {info['since']})"
    )
