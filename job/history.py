"""The run history table: one row per run that changed something, and one per revision applied.

Like Flyway's schema history, for Alembic. The job creates the table itself on first use, in its
own transaction, in the job's own schema (job.tables). Rows are written on the session that
holds the lock, between revision transactions. A run's row is written when it starts, so a run
that was killed outright still leaves a row, with no outcome. At-head starts write nothing.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import socket
from typing import Any, Iterable, Iterator, NamedTuple

from psycopg2 import sql

from job import db, tables
from job.config import Settings
from job.errors import Interrupted, JobError
from job.logs import log, redactor, run_id

DDL = """
CREATE TABLE IF NOT EXISTS {table} (
    id bigserial PRIMARY KEY,
    run_id text NOT NULL,
    kind text NOT NULL,            -- 'run' or 'revision'
    command text,                  -- run, downgrade, restore, backup
    revision text,
    direction text,                -- upgrade or downgrade
    started_at timestamptz NOT NULL,
    finished_at timestamptz,
    seconds double precision,
    outcome text,                  -- NULL while running (or if the process was killed)
    error text,
    backup_path text,
    host text NOT NULL,
    tenant_schema text             -- MIGRATE_TENANT_SCHEMA: the tenant's schema the run migrated (NULL: the database)
)
"""
# (a table an older version made gains the column once, checked first: ALTER TABLE waits for every
# other tenant's run writing here)
ADD_TENANT_SCHEMA = "ALTER TABLE {table} ADD COLUMN IF NOT EXISTS tenant_schema text"


class Interruption(NamedTuple):
    """An earlier run that was killed in the middle of a revision."""

    run_id: str
    host: str
    started_at: dt.datetime

    def __str__(self) -> str:
        return f"run {self.run_id} on {self.host}, which began it at {self.started_at.isoformat()}"


class History:
    """Writes to the history table on `conn`; no tables of the job's (None) turns it off."""

    def __init__(self, conn: Any, own: tables.Own | None, run_id: str, schema: str | None = None) -> None:
        self.conn = conn
        # a tenant's schema (MIGRATE_TENANT_SCHEMA): its runs are told from the other tenants' in the one table
        self.schema = schema
        self.own = own
        self.table = own.table("history").identifier() if own is not None else None
        self.run_id = run_id
        self.host = socket.gethostname()
        self.backup_path: str | None = None
        self.outcome: str | None = None
        self._created = False

    def _write(self, statement: str, params: dict[str, Any]) -> Any:
        """Run one statement in its own transaction; history never fails a migration."""
        if self.table is None or self.conn.closed:
            return None
        table = self.table

        def write(cur: Any) -> Any:
            if not self._created:
                tables.prepare(cur, self.own, "history", DDL)
                if not db.has_column(cur, table, "tenant_schema"):
                    cur.execute(sql.SQL(ADD_TENANT_SCHEMA).format(table=table))
                self._created = True
            cur.execute(sql.SQL(statement).format(table=table), params)
            return cur.fetchone() if cur.description else None

        row, problem = db.best_effort(self.conn, write)
        if problem:
            log.warning("history.unavailable", error=problem)
            self.table = None  # for the rest of this run: one lock timeout, not one per revision
        return row

    @contextlib.contextmanager
    def run(self, command: str) -> Iterator[History]:
        """Record a run: its row now, its outcome (or error) when the body ends."""
        started = dt.datetime.now(dt.timezone.utc)
        row = self._write(
            "INSERT INTO {table} (run_id, kind, command, started_at, host, tenant_schema) "
            "VALUES (%(run_id)s, 'run', %(command)s, %(started)s, %(host)s, %(schema)s) RETURNING id",
            {"run_id": self.run_id, "command": command, "started": started, "host": self.host, "schema": self.schema},
        )
        outcome, error = "succeeded", None
        try:
            yield self
            outcome = self.outcome or outcome
        except Interrupted as e:
            outcome, error = "interrupted", f"signal {e.signum}"
            raise
        except JobError as e:
            outcome, error = "failed", redactor.text(str(e))
            raise
        finally:
            if row is not None:
                finished = dt.datetime.now(dt.timezone.utc)
                self._write(
                    "UPDATE {table} SET finished_at = %(finished)s, seconds = %(seconds)s, outcome = %(outcome)s, "
                    "error = %(error)s, backup_path = %(backup)s WHERE id = %(id)s",
                    {"finished": finished, "seconds": (finished - started).total_seconds(), "outcome": outcome,
                     "error": error, "backup": self.backup_path, "id": row[0]},
                )

    def begun(self, revision: str, direction: str, started: dt.datetime) -> int | None:
        """Record that a revision which commits statements on its own is about to run (no outcome
        yet), before it commits any: a run killed outright in the middle of it (SIGKILL, a server
        crash) leaves this row, which tells the next run what happened (`interrupted`). Its id,
        for `revision` and `revision_within` to complete; None when there is no history table."""
        row = self._write(
            "INSERT INTO {table} (run_id, kind, revision, direction, started_at, host, tenant_schema) VALUES ("
            "%(run_id)s, 'revision', %(revision)s, %(direction)s, %(started)s, %(host)s, %(schema)s) RETURNING id",
            {"run_id": self.run_id, "revision": revision, "direction": direction, "started": started,
             "host": self.host, "schema": self.schema})
        return row[0] if row else None

    def interrupted(self, revisions: Iterable[str], direction: str) -> dict[str, Interruption]:
        """The revisions among `revisions` that an earlier run began (`begun`) and never finished:
        it was killed in the middle of them. (Only the run holding the lock writes here, so a row
        without an outcome is never a run still going.)"""
        revisions = list(revisions)
        if self.table is None or not revisions:
            return {}
        table = self.table

        def read(cur: Any) -> list[tuple]:
            if not db.table_exists(cur, table):
                return []
            # (the newest attempt of each: an outcome there, whatever it is, means it was not cut short)
            cur.execute(sql.SQL(
                "SELECT revision, run_id, host, started_at FROM (SELECT DISTINCT ON (revision) revision, run_id, "
                "host, started_at, outcome FROM {table} WHERE kind = 'revision' AND direction = %s "
                "AND revision = ANY(%s) AND tenant_schema IS NOT DISTINCT FROM %s ORDER BY revision, id DESC) newest "
                "WHERE outcome IS NULL AND run_id <> %s"
            ).format(table=table), (direction, revisions, self.schema, self.run_id))
            return cur.fetchall()

        rows, problem = db.best_effort(self.conn, read)
        if problem:
            log.warning("history.unavailable", error=problem)
        return {revision: Interruption(run_id, host, started) for revision, run_id, host, started in rows or ()}

    def revision(self, revision: str, direction: str, started: dt.datetime, seconds: float, outcome: str,
                 error: str | None = None, row: int | None = None) -> None:
        """Record one revision applied (or failed, or interrupted), in a transaction of its own
        (completing the row `begun` wrote, if it wrote one)."""
        if row is not None:
            self._write(
                "UPDATE {table} SET finished_at = %(started)s + make_interval(secs => %(seconds)s), "
                "seconds = %(seconds)s, outcome = %(outcome)s, error = %(error)s WHERE id = %(id)s",
                {"started": started, "seconds": seconds, "outcome": outcome,
                 "error": error and redactor.text(error), "id": row})
            return
        self._write(
            "INSERT INTO {table} (run_id, kind, revision, direction, started_at, finished_at, seconds, outcome, "
            "error, host, tenant_schema) VALUES (%(run_id)s, 'revision', %(revision)s, %(direction)s, %(started)s, "
            "%(started)s + make_interval(secs => %(seconds)s), %(seconds)s, %(outcome)s, %(error)s, %(host)s, "
            "%(schema)s)",
            {"run_id": self.run_id, "revision": revision, "direction": direction, "started": started,
             "seconds": seconds, "outcome": outcome, "error": error and redactor.text(error), "host": self.host,
             "schema": self.schema},
        )

    def revision_within(self, connection: Any, revision: str, direction: str, started: dt.datetime,
                        seconds: float, prelude: str = "", row: int | None = None) -> bool:
        """Record a revision applied inside its own transaction, on env.py's connection (any driver),
        so that the row commits with the version row, at no commit of its own. In a DO block whose
        EXCEPTION clause keeps a failed insert from aborting the revision's transaction (PostgreSQL
        runs it as a subtransaction: a savepoint without its two extra round trips; its WARNING goes
        to the server's log). Literal values, no parameters: every driver has its own style. False
        when it was not tried. `prelude` (PL/pgSQL statements) runs first, outside the insert's
        subtransaction."""
        if self.table is None or not self._created:
            return False
        values = [self.run_id, revision, direction, started.isoformat(), repr(float(seconds)), self.host]
        if any(db.DO_TAG in value for value in [*values, self.schema or ""]):
            return False
        run_id, revision, direction, started_at, seconds_text, host = (db.literal(v) for v in values)
        schema = "NULL" if self.schema is None else db.literal(self.schema)
        if row is not None:  # (the row `begun` wrote, completed in the version row's transaction)
            db.plpgsql(connection, (
                f"{prelude} BEGIN UPDATE {self.table.as_string(self.conn)} SET finished_at = {started_at}::timestamptz "
                f"+ make_interval(secs => {seconds_text}::float8), seconds = {seconds_text}::float8, "
                f"outcome = 'applied' WHERE id = {int(row)}; EXCEPTION WHEN OTHERS THEN "
                f"RAISE WARNING USING MESSAGE = 'migrate-job history: ' || SQLERRM; END;"))
            return True
        db.plpgsql(connection, (
            f"{prelude} BEGIN INSERT INTO {self.table.as_string(self.conn)} (run_id, kind, revision, direction, "
            f"started_at, finished_at, seconds, outcome, host, tenant_schema) VALUES ({run_id}, 'revision', "
            f"{revision}, {direction}, {started_at}::timestamptz, {started_at}::timestamptz + make_interval(secs => "
            f"{seconds_text}::float8), {seconds_text}::float8, 'applied', {host}, {schema}); "
            f"EXCEPTION WHEN OTHERS THEN "
            f"RAISE WARNING USING MESSAGE = 'migrate-job history: ' || SQLERRM; END;"))
        return True


def recent(conn: Any, own: tables.Own | None, limit: int = 10, schema: str | None = None) -> list[dict[str, Any]]:
    """The newest runs (of the tenant's schema `schema`, else of the database), for `status`;
    empty when the table is off or not there yet."""
    table = tables.found(conn, own, "history")
    if table is None:
        return []
    with conn.cursor() as cur:
        scoped = db.has_column(cur, table.identifier(), "tenant_schema")
        cur.execute(
            sql.SQL(
                "SELECT run_id, command, started_at, seconds, outcome, error, backup_path, host, "
                "(SELECT string_agg(r.revision || ' ' || r.direction || ' ' || coalesce(r.outcome, '?'), ', ' "
                "ORDER BY r.id) FROM {table} r WHERE r.run_id = t.run_id AND r.kind = 'revision') "
                "FROM {table} t WHERE kind = 'run' AND " + ("tenant_schema IS NOT DISTINCT FROM %s" if scoped else
                                                            "%s::text IS NULL") + " ORDER BY id DESC LIMIT %s"
            ).format(table=table.identifier()),
            (schema, limit),
        )
        rows = cur.fetchall()
    keys = ("run_id", "command", "started_at", "seconds", "outcome", "error", "backup_path", "host", "revisions")
    return [
        {k: (v.isoformat() if isinstance(v, dt.datetime) else v) for k, v in zip(keys, row)} for row in rows
    ]


def of(settings: Settings, conn: Any) -> History:
    """This run's history, in MIGRATE_HISTORY_TABLE (off: none)."""
    return History(conn, tables.of(settings.history_table), run_id(), settings.tenant_schema)
