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
import threading
import time
from typing import Any, Callable, Iterator, TypeVar

import psycopg2
import psycopg2.errors
import psycopg2.extensions

from job import credentials
from job.errors import Interrupted, first_line

T = TypeVar("T")

_received: list[int] = []


def _on_signal(signum: int, _frame: Any) -> None:
    first = not _received
    _received.append(signum)
    if first:
        _signalled_at.append(time.monotonic())
    if first:
        raise Interrupted(signum)


# Every signal a container runtime or a terminal sends to end a process, and that a process can
# catch: each ends the run the same way (exit 128 + the signal's number). SIGKILL and SIGSTOP cannot
# be caught; a SIGKILLed job's session and children end with it (keepalives, client_connection_check_interval,
# PR_SET_PDEATHSIG).
ENDING = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)


def install_signal_handlers() -> None:
    """Make every ending signal raise `Interrupted` once, wherever the job is, and make DB waits interruptible."""
    _received.clear()
    _signalled_at.clear()
    keep_signal_handlers()


def keep_signal_handlers() -> None:
    """(Again) after the project's code ran, which may have set handlers of its own (a framework's
    SIGTERM handler, imported by env.py), or its own psycopg2 wait callback: the job's come back,
    and what was received stays received."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return  # (only the main thread may set handlers; env.py may run the migrations in a thread)
    for signum in ENDING:
        if signal.getsignal(signum) is not _on_signal:
            signal.signal(signum, _on_signal)
    if psycopg2.extensions.get_wait_callback() is not _wait:
        psycopg2.extensions.set_wait_callback(_wait)


def received_signal() -> int | None:
    """The first signal received, if any: a cancelled statement after a signal is an interruption."""
    return _received[0] if _received else None


# How long the job still waits on the server once a signal arrived (the cancel request included):
# whatever the network does, SIGTERM/SIGINT end the job within about this, well inside Kubernetes'
# 30 s grace period.
AFTER_SIGNAL = 2.0
_signalled_at: list[float] = []


class _Deadlines(threading.local):
    """Each thread's own deadlines (the watchdog connects and waits beside the main thread):
    `connecting`, when the connection being set up must be ready (psycopg2 connects asynchronously
    under a wait callback, and libpq applies connect_timeout only to blocking connects, so the job
    applies it here); `waiting`, the ends of waits with a deadline of their own (the lock wait,
    check --wait): a statement of theirs that the network leaves unanswered ends with them."""

    def __init__(self) -> None:
        self.connecting: list[float] = []
        self.waiting: list[float] = []
        # seconds beyond AFTER_SIGNAL that cleaning up after a signal may take (`cleaning_up`)
        self.grace = 0.0


_deadlines = _Deadlines()


@contextlib.contextmanager
def answered_by(deadline: float) -> Iterator[None]:
    """Statements in the body get no answer later than `deadline` (monotonic): past it, a dead
    network is a lost connection (psycopg2.OperationalError), not a wait without end."""
    _deadlines.waiting.append(deadline)
    try:
        yield
    finally:
        _deadlines.waiting.remove(deadline)


# what cleaning up after a signal may take at most (dropping a rehearsal's copy): still well inside
# Kubernetes' 30 s grace period
CLEANING_UP = 10.0


@contextlib.contextmanager
def cleaning_up() -> Iterator[None]:
    """Statements in the body (the clean-up of something the job made) may still run for
    CLEANING_UP seconds after a signal, where others get AFTER_SIGNAL."""
    was, _deadlines.grace = _deadlines.grace, CLEANING_UP - AFTER_SIGNAL
    try:
        yield
    finally:
        _deadlines.grace = was


def _deadline() -> float | None:
    deadlines = [*_deadlines.connecting, *_deadlines.waiting,
                 *(t + AFTER_SIGNAL + _deadlines.grace for t in _signalled_at)]
    return min(deadlines) if deadlines else None


def _select(conn: Any, reading: bool) -> None:
    """Wait for the connection's socket, up to the deadline, if there is one."""
    fd = [conn.fileno()]
    deadline = _deadline()
    if deadline is None:
        select.select(fd if reading else [], [] if reading else fd, [])
        return
    remaining = deadline - time.monotonic()
    if remaining <= 0 or not any(select.select(fd if reading else [], [] if reading else fd, [], remaining)):
        if _signalled_at:
            raise Interrupted(received_signal() or signal.SIGTERM)
        if _deadlines.waiting and not _deadlines.connecting:
            raise psycopg2.OperationalError("no answer from the server within the wait's timeout (network down?)")
        raise psycopg2.OperationalError("timeout expired")  # as libpq says it: a transient failure


def _wait(conn: Any) -> None:
    """psycopg2 wait callback: wait in Python, and on a signal cancel the statement and keep waiting
    (for the server's answer to the cancel, within AFTER_SIGNAL)."""
    while True:
        try:
            state = conn.poll()
            if state == psycopg2.extensions.POLL_OK:
                return
            if state in (psycopg2.extensions.POLL_READ, psycopg2.extensions.POLL_WRITE):
                _select(conn, reading=state == psycopg2.extensions.POLL_READ)
            else:
                raise conn.OperationalError(f"bad state from poll: {state}")
        except Interrupted:
            if not _signalled_at:
                _signalled_at.append(time.monotonic())
            if not _cancel(conn):
                raise Interrupted(received_signal() or signal.SIGTERM) from None
            # the server now ends the statement with an error, which breaks this loop


def _cancel(conn: Any) -> bool:
    """Ask the server to cancel the running statement; False if it could not be asked in time.

    Through a connection of our own calling pg_cancel_backend(), not psycopg2's cancel(): that one
    opens its connection in C, holding the interpreter, and blocks as long as the network says
    nothing; ours connects through this wait callback, so AFTER_SIGNAL bounds it."""
    kwargs = getattr(conn, "connect_kwargs", None)
    if not kwargs:
        try:
            conn.cancel()
            return True
        except psycopg2.Error:
            return False
    try:
        canceller = psycopg2.connect(**credentials.completed(kwargs))
        try:
            canceller.autocommit = True
            with canceller.cursor() as cur:
                cur.execute("SELECT pg_cancel_backend(%s)", (conn.server_pid or conn.get_backend_pid(),))
        finally:
            canceller.close()
        return True
    except (psycopg2.Error, Interrupted):
        return False


class Connection(psycopg2.extensions.connection):
    """A psycopg2 connection that also knows `server_pid`, the pid of the server process its
    statements run in (`job.wait` reads it as the session starts; `job.lock` compares it with the
    pid libpq was given, to tell a pooler)."""

    server_pid: int | None = None
    # how it was opened: a second connection asks the server to cancel its statement (_cancel)
    connect_kwargs: dict[str, str] | None = None


def connect(kwargs: dict[str, str]) -> Connection:
    """Open an autocommit psycopg2 connection (no transaction stays open while we wait for anything),
    within its connect_timeout."""
    timeout = float(kwargs.get("connect_timeout") or 0)
    _deadlines.connecting[:] = [time.monotonic() + timeout] if timeout > 0 else []
    try:
        conn = credentials.connected(
            lambda: psycopg2.connect(**credentials.completed(kwargs), connection_factory=Connection))
    finally:
        _deadlines.connecting.clear()
    conn.autocommit = True
    conn.connect_kwargs = kwargs
    return conn


def raise_if_signalled() -> None:
    """After an error the job would pass over (a history write failing): if it was a signal's cancel,
    the signal wins. No signal is ever swallowed."""
    if _received:
        raise Interrupted(_received[0])


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


def best_effort(conn: Any, write: Callable[[Any], T]) -> tuple[T | None, str | None]:
    """Run `write(cursor)` for the job's own tables (history, what runs learned), in autocommit:
    a database error there never fails a run (a signal still ends it). Return what `write`
    returned and None, or None and the error's first line."""
    try:
        with autocommit(conn), conn.cursor() as cur:
            return write(cur), None
    except psycopg2.Error as e:
        raise_if_signalled()
        return None, first_line(e)


def table_exists(cur: Any, table: Any) -> bool:
    """Whether `table` (a psycopg2.sql Identifier) exists, asked of the catalog: reading a missing
    table and catching the failure would log an ERROR in the server's log."""
    cur.execute("SELECT to_regclass(%s) IS NOT NULL", (table.as_string(cur.connection),))
    return bool(cur.fetchone()[0])


def has_column(cur: Any, table: Any, column: str) -> bool:
    """Whether `table` (a psycopg2.sql Identifier, existing) has `column`, asked of the catalog."""
    cur.execute("SELECT EXISTS (SELECT FROM pg_attribute WHERE attrelid = to_regclass(%s) AND attname = %s "
                "AND NOT attisdropped)", (table.as_string(cur.connection), column))
    return bool(cur.fetchone()[0])


def literal(value: str) -> str:
    """A SQL string literal, for statements run on any driver (each has its own parameter style)."""
    return "'" + value.replace("'", "''") + "'"


def execute_literal(connection: Any, statement: str) -> None:
    """Run literal SQL on a SQLAlchemy connection's DBAPI cursor: no driver interpolates anything
    in it (a `%` stays a `%`), whichever driver env.py uses."""
    cursor = connection.connection.cursor()
    try:
        cursor.execute(statement)
    finally:
        cursor.close()


# the dollar-quote tag of the job's DO blocks
DO_TAG = "$migrate_job$"


def plpgsql(connection: Any, body: str) -> None:
    """Run PL/pgSQL statements in one round trip, as a DO block, on a SQLAlchemy connection of any
    driver (inside whatever transaction it is in)."""
    execute_literal(connection, f"DO {DO_TAG} BEGIN {body} END {DO_TAG}")


def fetch_literal(connection: Any, statement: str) -> tuple[Any, ...]:
    """The first row of literal SQL run on a SQLAlchemy connection's DBAPI cursor (any driver)."""
    cursor = connection.connection.cursor()
    try:
        cursor.execute(statement)
        return tuple(cursor.fetchone())
    finally:
        cursor.close()


# SQLSTATEs the job tells apart, whichever driver raised them
QUERY_CANCELED = "57014"
LOCK_NOT_AVAILABLE = "55P03"
# raised by the job's own check, inside a revision's transaction, that its session still holds the lock
LOCK_LOST = "MJ001"


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


def database_name(conn: Any) -> str:
    return conn.get_dsn_parameters()["dbname"]


def server_identity(conn: Any) -> str:
    """Which server this is, for the backup set: its system identifier, else (where the function is
    not granted, as on some managed services) the address the job reached it at."""
    try:
        with autocommit(conn), conn.cursor() as cur:
            cur.execute("SELECT system_identifier::text FROM pg_control_system()")
            return cur.fetchone()[0]
    except psycopg2.Error:
        params = conn.get_dsn_parameters()
        return f"{params.get('host', '')}:{params.get('port', '')}"
