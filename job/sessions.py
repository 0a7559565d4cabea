"""The session guards: every session env.py opens, through any SQLAlchemy engine, gets the job's
session settings, is checked to be on a database the job has locked before any statement runs on
it, and is remembered, so that the job can end any that outlive the run."""

from __future__ import annotations

from typing import Any, Mapping

import psycopg2
from sqlalchemy import event
from sqlalchemy.engine import Engine

from job import db
from job.errors import ConfigError, first_line
from job.logs import log


class Sessions:
    """Every session env.py opens, through any SQLAlchemy engine, sync or async (an AsyncEngine's
    pool is its sync engine's), whatever URL it was built from: the job listens for `connect` on
    every Engine at once. Each session gets the job's settings (job.pipeline.session_options), is
    checked to be on the database the job has locked before any statement runs on it, and is
    remembered, so that the job can end any that outlive the run."""

    def __init__(self) -> None:
        self.settings: dict[str, str] = {}
        # the databases env.py may connect to: DATABASE_URL's and MIGRATE_DATABASES' (None: any)
        self.expected: list[tuple[Any, ...]] | None = None
        # (pid, backend_start) of each session opened
        self.opened: list[tuple[int, str]] = []
        self._listening = False

    def start(self, settings: Mapping[str, str], expected: list[tuple[Any, ...]] | None) -> None:
        self.settings, self.expected, self.opened = dict(settings), expected, []
        if not self._listening:
            event.listen(Engine, "connect", self._on_connect)
            self._listening = True

    def _on_connect(self, dbapi_connection: Any, _record: Any) -> None:
        if not self.settings and self.expected is None:
            return
        # in autocommit, as SQLAlchemy's own recipe does: a SET inside a transaction that is then
        # rolled back (as dialect initialisation does) would be undone. One round trip, literal
        # values only: every driver has its own parameter style.
        autocommit = dbapi_connection.autocommit
        dbapi_connection.autocommit = True
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(
                f"SELECT pid, backend_start::text, {IDENTITY_COLUMNS}"
                + "".join(f", set_config({db.literal(k)}, {db.literal(v)}, false)" for k, v in self.settings.items())
                + " FROM pg_stat_activity WHERE pid = pg_backend_pid()")
            row = tuple(cursor.fetchone())
        finally:
            cursor.close()
            dbapi_connection.autocommit = autocommit
        self.opened.append((row[0], row[1]))
        identity = row[2:6]
        if self.expected is not None and identity not in self.expected:
            raise ConfigError(
                f"env.py connects to {describe(*identity)}, but the job has locked and backed up only "
                f"{' and '.join(describe(*e) for e in self.expected)}: env.py must take DATABASE_URL "
                "(`config.get_main_option('sqlalchemy.url')`), and a multidb env.py's other databases must be "
                "listed in MIGRATE_DATABASES (`section=URL` for each alembic.ini section it reads a URL from)"
            )

    def end_leftovers(self, conn: Any) -> None:
        """Terminate the sessions env.py opened that are still at work (running a statement, or in a
        transaction): an interrupted revision's. Only the very same sessions (pid, start time and our
        application_name: a pooler may have handed the server connection to someone else); an idle
        one holds nothing, and ends with this process."""
        own = getattr(conn, "server_pid", None) or conn.get_backend_pid()  # the server's pid, behind a pooler too
        left = [(pid, start) for pid, start in self.opened if pid != own]
        self.opened = []
        if not left:
            return
        try:
            with db.autocommit(conn), conn.cursor() as cur:
                cur.execute(
                    "SELECT a.pid, pg_terminate_backend(a.pid) FROM pg_stat_activity a "
                    "JOIN unnest(%s::int[], %s::text[]) AS o(pid, started) ON a.pid = o.pid "
                    "AND a.backend_start::text = o.started "
                    "WHERE a.state <> 'idle' AND a.application_name = %s",
                    ([pid for pid, _ in left], [start for _, start in left],
                     self.settings.get("application_name", "")))
                ended = [pid for pid, done in cur.fetchall() if done]
        except psycopg2.Error as e:
            log.warning("session.not_ended", pids=[pid for pid, _ in left], error=first_line(e))
            return
        if ended:
            log.info("session.ended", pids=ended, reason="env.py left it open")


sessions = Sessions()


# Which database a session is on: its name, and the server (started once, at one instant).
IDENTITY_COLUMNS = "current_database(), pg_postmaster_start_time()::text, inet_server_addr()::text, inet_server_port()"


def identity(conn: Any) -> tuple[Any, ...]:
    with conn.cursor() as cur:
        cur.execute(f"SELECT {IDENTITY_COLUMNS}")
        return tuple(cur.fetchone())


def describe(name: str, started: str, address: str | None, port: int | None) -> str:
    where = f"{address.split('/')[0]}:{port}" if address else "a local socket"
    return f"database {name!r} on {where} (server started {started})"


# What a revision may change in its session and leave for the next one: the search path, the role,
# timeouts, any setting. Read before the first revision (what the job and env.py set up), and put
# back inside each revision's transaction, so every revision starts from it.
BASELINE_SQL = """
SELECT current_user = session_user, current_user::text,
       coalesce(json_object_agg(name, setting) FILTER (WHERE source = 'session'), '{}')::text
FROM pg_settings
WHERE name NOT LIKE 'transaction\\_%' AND name NOT IN ('role', 'session_authorization')
"""


def baseline(connection: Any) -> str:
    """PL/pgSQL that puts the session of `connection` (a SQLAlchemy connection, any driver) back as
    it is now: every setting reset, then those set in the session set again, the role too."""
    import json

    own_role, role, settings = db.fetch_literal(connection, BASELINE_SQL)
    restore = [f"PERFORM set_config({db.literal(name)}, {db.literal(value)}, false);"
               for name, value in sorted(json.loads(settings).items())]
    if not own_role:
        restore.append(f"PERFORM set_config('role', {db.literal(role)}, false);")
    return "RESET ALL; RESET ROLE; " + " ".join(restore)
