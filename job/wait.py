"""Wait until the database accepts queries: retry what is transient, fail fast on what is not."""

from __future__ import annotations

import contextlib
import random
import re
import time
from typing import Any, Callable, Iterator, Mapping

import psycopg2

from job import db
from job.config import Settings, milliseconds
from job.errors import ConfigError, DatabaseUnavailable, first_line
from job.logs import log

# Connection errors worth waiting out: the server or its DNS name is not there yet, it is
# starting, recovering or full. Anything else (a refused password, a missing database or role,
# a pg_hba rule) will not fix itself by waiting.
TRANSIENT = (
    "connection refused",
    "could not translate host name",
    "temporary failure in name resolution",
    "name or service not known",
    "no such file or directory",  # the Unix socket is not there yet
    "the database system is starting up",
    "the database system is shutting down",
    "the database system is in recovery mode",
    "the database system is not yet accepting connections",
    "too many connections",
    "too many clients",
    "remaining connection slots are reserved",
    "timeout expired",
    "server closed the connection unexpectedly",
    "no route to host",
    "network is unreachable",
    "connection reset by peer",
    "could not receive data from server",
    "is in recovery",
)

HINTS = {
    "password authentication failed": "check the password in DATABASE_URL (URL-encode @ : / % in it), PGPASSWORD, "
                                      "DATABASE_PASSWORD_FILE, what MIGRATE_PASSWORD_COMMAND prints, or the role's "
                                      "IAM grant (MIGRATE_AUTH)",
    "no password supplied": "put the password in DATABASE_URL, PGPASSWORD or DATABASE_PASSWORD_FILE, or set "
                            "MIGRATE_PASSWORD_COMMAND or MIGRATE_AUTH",
    "does not exist": "check the database and user names in DATABASE_URL; the job does not create them",
    "no pg_hba.conf entry": "the server's pg_hba.conf does not admit this client, user and database",
}


# One round trip: is this the primary, which server process is ours (see job.lock.ensure_own_session),
# and make the *server* notice when our pod vanishes, so that it ends our session and frees the lock
# within about 10 + 5 * 3 = 25 s. (libpq's keepalive parameters only make the client notice a dead server.)
SESSION_SQL = """
SELECT pg_is_in_recovery(),
       pg_backend_pid(),
       set_config('tcp_keepalives_idle', '10', false),
       set_config('tcp_keepalives_interval', '5', false),
       set_config('tcp_keepalives_count', '3', false),
       set_config('tcp_user_timeout', '25000', false),
       -- PostgreSQL 14+: notice a client that went away even mid-statement (a SIGKILLed holder's
       -- pg_sleep or long UPDATE is cancelled within a second, and its lock freed)
       CASE WHEN current_setting('server_version_num')::int >= 140000
            THEN set_config('client_connection_check_interval', '1000', false) END,
       -- PostgreSQL 14+: a database-wide idle_session_timeout must not end the session that holds
       -- the lock while env.py's own engine or pg_dump does the work
       CASE WHEN current_setting('server_version_num')::int >= 140000
            THEN set_config('idle_session_timeout', '0', false) END
"""


class _StillInRecovery(psycopg2.OperationalError):
    """The server accepts connections but is a read-only standby: migrations need the primary."""


def is_transient(error: BaseException) -> bool:
    return isinstance(error, psycopg2.OperationalError) and any(
        t in str(error).lower() for t in TRANSIENT
    )


# Backoff between attempts: exponential from 0.1 s, capped at 2 s, with full jitter.
BACKOFF_FIRST, BACKOFF_CAP = 0.1, 2.0


def _retry(attempt: Callable[[], Any], first: Exception, started: float, timeout: float) -> Any:
    """After a transient first failure, retry with tenacity until `timeout` seconds from `started`."""
    import tenacity

    def logged(number: int, error: BaseException | None, upcoming: float) -> None:
        log.info("wait.retry", attempt=number, error=first_line(error), next_in=round(upcoming, 3),
                 waited=round(time.monotonic() - started, 3))

    if time.monotonic() - started >= timeout:
        raise first
    delay = random.uniform(0, BACKOFF_FIRST)
    logged(1, first, delay)
    time.sleep(delay)
    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception(is_transient),
        stop=tenacity.stop_after_delay(max(timeout - (time.monotonic() - started), 0)),
        # tenacity's first attempt is our second: its waits start one step up
        wait=tenacity.wait_random_exponential(multiplier=BACKOFF_FIRST * 2, max=BACKOFF_CAP),
        before_sleep=lambda state: logged(state.attempt_number + 1, state.outcome.exception(), state.upcoming_sleep),
        reraise=True,
    )
    return retrying(attempt)


def resolved(kwargs: dict[str, str], within: float) -> dict[str, str]:
    """libpq looks host names up itself, in C, where neither a signal nor the job's timeouts reach
    it: a name server that does not answer holds it for as long as the system resolver retries. So
    the job looks them up first, in a thread it waits for (a signal interrupts the wait) no longer
    than `within` seconds, and hands libpq the addresses (`hostaddr`) beside the names (`host`: still
    what TLS verifies and what messages name)."""
    host = kwargs.get("host")
    if not host or kwargs.get("hostaddr"):
        return kwargs
    ports = (kwargs.get("port") or "5432").split(",")
    addresses = [
        "" if not name or name.startswith("/") or _is_address(name) else _look_up(name, ports[min(i, len(ports) - 1)], within)
        for i, name in enumerate(host.split(","))
    ]
    return {**kwargs, "hostaddr": ",".join(addresses)} if any(addresses) else kwargs


def _is_address(name: str) -> bool:
    return ":" in name or bool(re.fullmatch(r"\d{1,3}(\.\d{1,3}){3}", name))


def _look_up(name: str, port: str, within: float) -> str:
    import socket
    import threading

    found: list[Any] = []

    def look_up() -> None:
        try:
            found.append(socket.getaddrinfo(name, port or None, type=socket.SOCK_STREAM)[0][4][0])
        except (OSError, UnicodeError) as e:
            found.append(e)

    thread = threading.Thread(target=look_up, name="resolve", daemon=True)
    thread.start()
    thread.join(within)
    if not found:
        raise psycopg2.OperationalError(f'could not translate host name "{name}" to address: no answer from the '
                                        f"name server within {within:g} s")
    if isinstance(found[0], BaseException):
        raise psycopg2.OperationalError(f'could not translate host name "{name}" to address: '
                                        f"{getattr(found[0], 'strerror', None) or found[0]}")
    return str(found[0])


def wait_for_database(connect_kwargs: dict[str, str], timeout: float, session: Mapping[str, str] = {},
                      primary: bool = True) -> Any:
    """Return an autocommit connection once the database answers queries, retrying for `timeout`
    seconds; `session` settings are set in its first round trip, so that every statement of the run
    (the version read and the history writes included) runs under them. Unless `primary` is asked
    for (anything that may write), a hot standby answers too."""
    started = time.monotonic()

    def attempt() -> Any:
        remaining = timeout - (time.monotonic() - started)
        # libpq's smallest useful connect_timeout is 2 s
        kwargs = {**connect_kwargs, "connect_timeout": str(max(2, min(int(remaining) or 2, 5)))}
        conn = db.connect(resolved(kwargs, float(kwargs["connect_timeout"])))
        with conn.cursor() as cur:
            cur.execute(SESSION_SQL + "".join(", set_config(%s, %s, false)" for _ in session),
                        [part for item in session.items() for part in item])
            in_recovery, conn.server_pid = cur.fetchone()[:2]
        if in_recovery and primary:
            conn.close()
            raise _StillInRecovery("the server is in recovery (a read-only standby); migrations need the primary")
        return conn

    try:
        try:
            conn = attempt()  # the database is usually up: the retry machinery loads only when it is not
        except psycopg2.OperationalError as first:
            if not is_transient(first):
                raise
            conn = _retry(attempt, first, started, timeout)
    except psycopg2.ProgrammingError as e:
        raise ConfigError(f"invalid connection parameters: {first_line(e)}") from None
    except psycopg2.OperationalError as e:
        message = first_line(e)
        if re.search(r"invalid .* (value|option)|unrecognized .* option", message.lower()):
            raise ConfigError(f"invalid connection parameters: {message}") from None
        if is_transient(e):
            raise DatabaseUnavailable(
                f"database not ready after {timeout:g} s (MIGRATE_WAIT_TIMEOUT): {message}"
            ) from None
        hint = next((h for key, h in HINTS.items() if key in message.lower()), None)
        raise DatabaseUnavailable(
            f"database refused the connection: {message}" + (f" ({hint})" if hint else "")
        ) from None
    log.info(
        "wait.ready",
        seconds=round(time.monotonic() - started, 3),
        server_version=conn.server_version,
    )
    return conn


@contextlib.contextmanager
def connected(settings: Settings, primary: bool = True) -> Iterator[Any]:
    """A connection once the database answers, closed at the end; `primary=False` for what only reads
    (check, status, plan), which a hot standby may answer."""
    conn = wait_for_database(settings.database.connect_kwargs(settings.application_name), settings.wait_timeout,
                             session_options(settings), primary)
    try:
        yield conn
    finally:
        conn.close()


def session_options(settings: Settings) -> dict[str, str]:
    """Server settings for every migrating session: ours, and every one env.py opens (job.migrate)."""
    return {
        "application_name": settings.application_name,
        "lock_timeout": f"{milliseconds(settings.statement_lock_timeout)}ms",
        "statement_timeout": f"{milliseconds(settings.statement_timeout)}ms",
        # never sit on locks in an abandoned transaction
        "idle_in_transaction_session_timeout": "60000ms",
        # a tenant's schema (MIGRATE_TENANT_SCHEMA), also for the drivers whose URL cannot carry libpq's options
        **({"search_path": f'"{settings.tenant_schema}"'}
           if settings.tenant_schema and settings.tenant_schema_via == "search_path" else {}),
    }
