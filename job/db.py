"""Connections that a signal can interrupt.

A Python signal handler cannot run while psycopg2 is blocked inside libpq. With a wait callback,
psycopg2 waits in Python (`select`), so our SIGTERM/SIGINT handler runs, raises `Interrupted`, and
the callback turns that into a server-side cancel of the running statement. The server answers
with an error, the transaction rolls back, and `received_signal()` tells the caller the error was
ours, not the revision's. See psycopg2's `extras.wait_select`, which does the same for SIGINT only.
"""

from __future__ import annotations

import contextlib
import select
import signal
from typing import Any, Iterator

import psycopg2
import psycopg2.errors
import psycopg2.extensions

from job.errors import Interrupted

_received: list[int] = []


def _on_signal(signum: int, _frame: Any) -> None:
    first = not _received
    _received.append(signum)
    if first:
        raise Interrupted(signum)


def install_signal_handlers() -> None:
    """Make SIGTERM and SIGINT raise `Interrupted` once, wherever the job is, and make DB waits interruptible."""
    _received.clear()
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    psycopg2.extensions.set_wait_callback(_wait)


def received_signal() -> int | None:
    """The first signal received, if any: a cancelled statement after a signal is an interruption."""
    return _received[0] if _received else None


def _wait(conn: Any) -> None:
    """psycopg2 wait callback: wait in Python, and on a signal cancel the statement and keep waiting."""
    while True:
        try:
            state = conn.poll()
            if state == psycopg2.extensions.POLL_OK:
                return
            if state == psycopg2.extensions.POLL_READ:
                select.select([conn.fileno()], [], [])
            elif state == psycopg2.extensions.POLL_WRITE:
                select.select([], [conn.fileno()], [])
            else:
                raise conn.OperationalError(f"bad state from poll: {state}")
        except Interrupted:
            try:
                conn.cancel()
            except psycopg2.Error:
                raise Interrupted(received_signal() or signal.SIGTERM) from None
            # the server now ends the statement with an error, which breaks this loop


class Connection(psycopg2.extensions.connection):
    """A psycopg2 connection that also knows `server_pid`, the pid of the server process its
    statements run in (`job.wait` reads it as the session starts; `job.lock` compares it with the
    pid libpq was given, to tell a pooler)."""

    server_pid: int | None = None


def connect(kwargs: dict[str, str]) -> Connection:
    """Open an autocommit psycopg2 connection (no transaction stays open while we wait for anything)."""
    conn = psycopg2.connect(**kwargs, connection_factory=Connection)
    conn.autocommit = True
    return conn


@contextlib.contextmanager
def autocommit(conn: Any) -> Iterator[None]:
    """Run the body's statements each in its own transaction, whatever mode `conn` is in."""
    was = conn.autocommit
    if not was:
        conn.rollback()
        conn.autocommit = True
    try:
        yield
    finally:
        if not was and not conn.closed:
            conn.autocommit = False


# SQLSTATEs the job tells apart, whichever driver raised them
QUERY_CANCELED = "57014"
LOCK_NOT_AVAILABLE = "55P03"


def _chain(error: BaseException | None) -> Iterator[BaseException]:
    """`error` and what it wraps: SQLAlchemy's `orig`, then causes and contexts."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = getattr(error, "orig", None) or error.__cause__ or error.__context__


def sqlstate(error: BaseException | None) -> str | None:
    """The SQLSTATE of the database error behind `error`: psycopg2's `pgcode`, psycopg 3's and
    asyncpg's `sqlstate` (SQLAlchemy's asyncpg adapter keeps it on the error it raises)."""
    for link in _chain(error):
        for attribute in ("pgcode", "sqlstate"):
            code = getattr(link, attribute, None)
            if isinstance(code, str) and len(code) == 5:
                return code
    return None


def root_error(error: BaseException) -> BaseException:
    """The driver's own error behind SQLAlchemy's wrapper, for messages."""
    orig = getattr(error, "orig", None)
    return orig if isinstance(orig, BaseException) else error


def is_cancel(error: BaseException) -> bool:
    """Whether `error` is (or wraps) a cancelled statement."""
    return sqlstate(error) == QUERY_CANCELED


def is_disconnect(error: BaseException) -> bool:
    """Whether `error` means the connection is gone (the server rolled back what it held)."""
    for link in _chain(error):
        if getattr(link, "connection_invalidated", False):
            return True
        if isinstance(link, psycopg2.OperationalError) and link.pgcode is None:
            return True
    return False
