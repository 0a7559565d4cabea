"""The database is what the code says: the schema each run left, compared with the live one (a
hand-made change), and the models compared with the database; with job.integrity (an edited
applied revision), all that `run`, `check`, `status` and `drift` say of it.

After each run that changed the database, the job records the schema it left (job.schema: one
catalog query; the job's own tables and the version table left out) in its own `_schema` table,
keyed by the revisions the database is at. The next run with work compares the live schema with
it before any revision runs, so that the operator knows when a revision is about to meet a schema
nobody tested: `schema.drift` lists the objects that differ, and MIGRATE_ON_DRIFT=refuse makes it
exit 9. `check` and `status` say the same. `migrate-job accept --schema` records the live schema
as the one expected, on purpose (who, when, why).

`migrate-job drift` (read-only, under the lock held shared, so that a deploy in flight is waited
for rather than reported) compares the database with (a) the schema the job recorded for its
revision, (b) the models: env.py's `target_metadata`, through Alembic's own comparison
(autogenerate, with env.py's include_object, compare_type... as `alembic check` uses them), and
(c) the applied revisions' files. Each difference is one object: what was expected, what was
found. MIGRATE_DRIFT_EXCLUDE names objects other tools own.
"""

from __future__ import annotations

import fnmatch
import json
from typing import Any, Iterable, NamedTuple

import psycopg2
from psycopg2 import sql

from job import db, integrity, logs, plan, schema, tables
from job.config import Settings
from job.errors import ConfigError, Drift, first_line
from job.logs import log

SCHEMA_DDL = """
CREATE TABLE IF NOT EXISTS {table} (
    version_table text NOT NULL,    -- the version table (schema.name)
    revisions text[] NOT NULL,      -- what it held (sorted) when this schema was recorded
    fingerprint text NOT NULL,      -- job.schema.fingerprint of objects
    objects jsonb NOT NULL,         -- [[kind, name, definition], ...] (job.schema.snapshot)
    recorded text NOT NULL,         -- migrated, downgraded, accepted
    run_id text NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    accepted_by text,
    accepted_reason text,
    PRIMARY KEY (version_table, revisions)
)
"""

RECORD_SQL = """
INSERT INTO {table} (version_table, revisions, fingerprint, objects, recorded, run_id, accepted_by, accepted_reason)
VALUES (%(version_table)s, %(revisions)s, %(fingerprint)s, %(objects)s::jsonb, %(recorded)s, %(run_id)s, %(by)s,
        %(reason)s)
ON CONFLICT (version_table, revisions) DO UPDATE
SET fingerprint = EXCLUDED.fingerprint, objects = EXCLUDED.objects, recorded = EXCLUDED.recorded,
    run_id = EXCLUDED.run_id, recorded_at = now(), accepted_by = EXCLUDED.accepted_by,
    accepted_reason = EXCLUDED.accepted_reason
"""

# the fingerprint first: the objects are read only when it differs
FINGERPRINT_SQL = "SELECT fingerprint, recorded_at::text FROM {table} WHERE version_table = %s AND revisions = %s"
OBJECTS_SQL = "SELECT objects FROM {table} WHERE version_table = %s AND revisions = %s"

# at most this many differences in one log line (the count is always whole)
LOGGED = 50


class Found(NamedTuple):
    """One difference: against what (`recorded`: the schema the job left; `models`: env.py's
    target_metadata; `revision`: an applied revision's file), the object, what was expected, what
    was found (None: not there)."""

    against: str
    object: str
    kind: str
    expected: str | None
    found: str | None

    def as_dict(self) -> dict[str, Any]:
        return self._asdict()


class Report(NamedTuple):
    """What `drift` found (its JSON document is this, as a dict)."""

    database: str
    current: list[str]
    recorded_at: str | None   # when the schema compared with was recorded (None: none was)
    models: str               # compared, or why not
    differences: list[dict[str, Any]]
    operations: str           # the Alembic operations that would bring the database to the models


# --- the schema the job left ---------------------------------------------------------------------

# how long reading the schema waits for a table another session holds ACCESS EXCLUSIVE (the
# check then gives up, saying so: it never holds up or fails a run)
READ_LOCK_TIMEOUT = 1.0


class Unreadable(Exception):
    """The schema could not be read in time (a table held ACCESS EXCLUSIVE by another session)."""


def live(settings: Settings, conn: Any, version_table: Any) -> schema.Snapshot:
    """The live schema, the job's own tables and the version table left out; Unreadable when
    another session's lock kept a table from being read within READ_LOCK_TIMEOUT."""
    try:
        return schema.snapshot(conn, *schema.excluded_by_job(conn, tables.of(settings.history_table), version_table),
                               lock_timeout=READ_LOCK_TIMEOUT, only=settings.tenant_schema)
    except psycopg2.Error as e:
        db.raise_if_signalled()
        if db.sqlstate(e) != db.LOCK_NOT_AVAILABLE:
            raise
        raise Unreadable(first_line(e)) from None


def record_schema(settings: Settings, conn: Any, version_table: Any, how: str, by: str | None = None,
                  reason: str | None = None) -> None:
    """Record the schema the database is in now, for the revisions it is at (best effort)."""
    own = tables.of(settings.history_table)
    if own is None:
        return
    try:
        objects = live(settings, conn, version_table)
    except Unreadable as e:
        log.warning("schema.not_recorded", error=str(e))
        return
    current = sorted(plan.current_revisions(conn, version_table))

    def write(cur: Any) -> None:
        table = tables.prepare(cur, own, "schema", SCHEMA_DDL).identifier()
        cur.execute(sql.SQL(RECORD_SQL).format(table=table), {
            "version_table": str(version_table), "revisions": current, "fingerprint": schema.fingerprint(objects),
            "objects": json.dumps(sorted([k, n, d] for (k, n), d in objects.items())), "recorded": how,
            "run_id": logs.run_id(), "by": by, "reason": reason})

    problem = db.best_effort(conn, write)[1]
    if problem:
        log.warning("schema.not_recorded", error=problem)


def against_recorded(settings: Settings, conn: Any, version_table: Any,
                     current: Iterable[str]) -> tuple[list[Found], str | None]:
    """The objects that differ from the schema recorded for the revisions the database is at, and
    when that was recorded (None, and nothing found, when nothing was)."""
    table = tables.found(conn, tables.of(settings.history_table), "schema")
    if table is None:
        return [], None
    key = (str(version_table), sorted(current))
    with conn.cursor() as cur:
        cur.execute(sql.SQL(FINGERPRINT_SQL).format(table=table.identifier()), key)
        row = cur.fetchone()
    if row is None:
        return [], None
    fingerprint, recorded_at = row
    try:
        now = live(settings, conn, version_table)
    except Unreadable as e:
        log.warning("schema.unchecked", error=str(e), recorded_at=recorded_at,
                    reason="another session holds a table: the schema was not compared this time")
        return [], recorded_at
    if schema.fingerprint(now) == fingerprint:
        return [], recorded_at
    with conn.cursor() as cur:
        cur.execute(sql.SQL(OBJECTS_SQL).format(table=table.identifier()), key)
        expected = {(kind, name): definition for kind, name, definition in cur.fetchone()[0]}
    found = [Found("recorded", *d) for d in schema.differences(expected, now)]
    return excluding(settings, found), recorded_at


def excluding(settings: Settings, found: list[Found]) -> list[Found]:
    """Leave out MIGRATE_DRIFT_EXCLUDE's objects: a pattern matches an object's name, or the name
    of what it is part of (`public.audit_log` also leaves out `public.audit_log.id`)."""
    if not settings.drift_exclude:
        return found

    def excluded(name: str) -> bool:
        parts = name.split(".")
        names = {".".join(parts[:i]) for i in range(1, len(parts) + 1)} | {name.replace('"', "")}
        return any(fnmatch.fnmatchcase(n, p) for n in names for p in settings.drift_exclude)

    return [f for f in found if not excluded(f.object)]


def report_schema(settings: Settings, found: list[Found], recorded_at: str | None, when: str) -> None:
    """Log `schema.drift` (warning) when the schema is not the one recorded; refuse when asked."""
    if not found:
        return
    log.warning("schema.drift", count=len(found), recorded_at=recorded_at, when=when, outcome=settings.on_drift,
                differences=[f.as_dict() for f in found[:LOGGED]],
                remedy="undo the hand-made change, or record it as expected: migrate-job accept --schema --reason TEXT")


def refuse_drift(settings: Settings, found: list[Found], before: str) -> None:
    if found and settings.on_drift == "refuse":
        first = found[0]
        raise Drift(f"the schema differs from the one the job recorded for this revision in {len(found)} object"
                    f"{'s' if len(found) > 1 else ''} (schema.drift; first: {first.kind} {first.object}): {before} "
                    "meets a schema nobody tested. Undo the change, or record it as expected with `migrate-job "
                    "accept --schema --reason TEXT` (MIGRATE_ON_DRIFT=refuse)")


# --- in `run` and the commands ---------------------------------------------------------------------

def before_migrating(settings: Settings, conn: Any, project: Any, version_table: Any, the_plan: plan.Plan) -> None:
    """Under the exclusive lock, the scripts loaded, before any backup or revision: the applied
    revisions' files (recording those first seen), and, when there is work, the live schema
    against the recorded one. Either refuses (exit 9) when asked to."""
    if tables.of(settings.history_table) is None:
        return
    changed = integrity.changed(settings, conn, project, version_table, the_plan.current, record_first_seen=True)
    integrity.refuse_changed(settings, changed)
    if the_plan.pending:
        found, recorded_at = against_recorded(settings, conn, version_table, the_plan.current)
        report_schema(settings, found, recorded_at, when="before migrating")
        refuse_drift(settings, found, f"revision {the_plan.pending[0].revision}")


def after_migrating(settings: Settings, conn: Any, project: Any, version_table: Any, applied: Iterable[str],
                    how: str) -> None:
    """After a run that changed the database: what its revisions' files held, and the schema it left."""
    if tables.of(settings.history_table) is None:
        return
    integrity.record_applied(settings, conn, project, version_table, applied)
    record_schema(settings, conn, version_table, how)


def at_target(settings: Settings, conn: Any, version_table: Any, current: Iterable[str]) -> list[Found]:
    """`check` and `status` at the target: the live schema against the recorded one (logged)."""
    if tables.of(settings.history_table) is None:
        return []
    found, recorded_at = against_recorded(settings, conn, version_table, current)
    report_schema(settings, found, recorded_at, when="at the target")
    return found


# --- `drift` ---------------------------------------------------------------------------------------

def drift(settings: Settings) -> Report:
    """Compare the live database with the recorded schema, the models and the applied revisions'
    files; read-only, under the lock held shared (a migration in flight is waited for)."""
    from job import lock, migrate
    from job.project import version_table_of
    from job.wait import connected

    with connected(settings) as conn, lock.locked(settings, conn, enough=lambda: True), \
            migrate.project_of(settings, conn) as project:
        version_table = version_table_of(settings, conn, project)
        current = plan.current_revisions(conn, version_table)
        found, recorded_at = against_recorded(settings, conn, version_table, current)
        changed = integrity.changed(settings, conn, project, version_table, current, record_first_seen=False)
        found += [Found("revision", c.revision, "revision file", c.recorded_sha256, c.file_sha256) for c in changed]
        models, operations, differences = _models(settings, conn, project, version_table)
        found += excluding(settings, differences)
        report = Report(db.database_name(conn), list(current), recorded_at, models, [f.as_dict() for f in found],
                        operations if differences else "")
    for difference in found:
        log.warning("drift.difference", **difference.as_dict())
    log.info("drift.done", differences=len(found), recorded_at=recorded_at, models=models)
    return report


def check_report(report: Report) -> None:
    if report.differences:
        first = report.differences[0]
        more = f" (and {len(report.differences) - 1} more)" if len(report.differences) > 1 else ""
        raise Drift(f"drift: {first['kind']} {first['object']} differs from the "
                    f"{ {'recorded': 'schema the job recorded', 'models': 'models', 'revision': 'file that ran'}[first['against']] }"
                    f"{more}")


def _models(settings: Settings, conn: Any, project: Any, version_table: Any) -> tuple[str, str, list[Found]]:
    """env.py's target_metadata against the database by Alembic's autogenerate comparison: (whether
    it was compared, or why not; the operations that would reconcile them; the differences)."""
    from alembic.autogenerate import produce_migrations, render_python_code

    got: dict[str, Any] = {}

    def compare(rev: Any, context: Any) -> list[Any]:
        metadata = context.opts.get("target_metadata")
        if metadata is None:
            got["why_not"] = "env.py passes no target_metadata to context.configure"
            return []
        script = produce_migrations(context, metadata)
        got["diffs"] = script.upgrade_ops.as_diffs()
        got["operations"] = render_python_code(script.upgrade_ops) if not script.upgrade_ops.is_empty() else ""
        got["default_schema"] = context.dialect.default_schema_name
        return []

    try:
        project.run_env(compare)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"env.py failed while the models were compared: {type(e).__name__}: "
                          f"{first_line(e)}") from None
    finally:
        project.rollback()
    if "diffs" not in got:
        return got.get("why_not", "env.py never ran its migrations"), "", []
    own_tables, own_schemas = schema.excluded_by_job(conn, tables.of(settings.history_table), version_table)
    mine = {name.replace('"', "") for name in own_tables} | set(own_schemas)
    found = [f for diff in got["diffs"] for f in _differences(diff, got["default_schema"] or "public")]
    found = [f for f in found if not any(f.object == m or f.object.startswith(m + ".") for m in mine)]
    return "compared", got["operations"], found


def _name(schema_name: str | None, name: str, default: str) -> str:
    return f"{schema_name or default}.{name}"


def _differences(diff: Any, default: str) -> list[Found]:
    """Alembic's diff tuples as objects: `add_*` is in the models and not the database, `remove_*`
    the other way, `modify_*` is one attribute of a column (the models' value expected)."""
    if isinstance(diff, list):  # one column's changes, each a modify_* tuple
        return [f for d in diff for f in _differences(d, default)]
    op, *rest = diff
    verb, _, what = op.partition("_")
    if verb == "modify":  # (op, schema, table, column, existing kw, database's value, models' value)
        schema_name, table, column, _, existing, wanted = rest
        return [Found("models", f"{_name(schema_name, table, default)}.{column}", f"column {what}",
                      _text(wanted), _text(existing))]
    thing = rest[-1]
    if what == "table":
        name, definition = _name(thing.schema, thing.name, default), ", ".join(c.name for c in thing.columns)
    elif what == "column":
        name = f"{_name(rest[0], rest[1], default)}.{thing.name}"
        definition = f"{thing.type}{'' if thing.nullable else ' not null'}"
    elif what == "index":
        table = thing.table
        name = _name(table.schema if table is not None else None, thing.name or "?", default)
        columns = ", ".join(getattr(e, "name", None) or str(e) for e in thing.expressions)
        definition = f"{'unique ' if thing.unique else ''}index on {table.name if table is not None else '?'} ({columns})"
    elif what in ("constraint", "fk"):
        table = thing.table
        columns = ", ".join(c.name for c in thing.columns) if thing.columns else ""
        name = f"{_name(table.schema, table.name, default)}.{thing.name or '(' + columns + ')'}"
        definition = f"{_constraint_kind(thing)} ({columns})"
        if what == "fk":
            definition += (f" references {thing.referred_table.name} "
                           f"({', '.join(e.column.name for e in thing.elements)})")
    else:  # table comments and anything a newer Alembic compares
        name, definition = str(getattr(thing, "name", thing)), op
    kind = {"fk": "foreign key"}.get(what, what)
    return [Found("models", name, kind, definition, None) if verb == "add"
            else Found("models", name, kind, None, definition)]


def _constraint_kind(constraint: Any) -> str:
    return {"UniqueConstraint": "unique", "ForeignKeyConstraint": "foreign key", "CheckConstraint": "check",
            "PrimaryKeyConstraint": "primary key"}.get(type(constraint).__name__, type(constraint).__name__)


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def accept(settings: Settings, revisions: list[str], reason: str, whole_schema: bool) -> tuple[list[str], int]:
    """`accept`: under the exclusive lock, record the changed files of `revisions` (every changed
    one, when none is named and not `whole_schema`) as they are now, and with `whole_schema` the
    live schema as the one expected at its revision; who, when and why with each. Returns the
    revisions accepted and how many objects differed from the schema recorded before."""
    from job import lock, migrate
    from job.project import version_table_of
    from job.wait import connected

    if tables.of(settings.history_table) is None:
        raise ConfigError("accept records into the job's own tables, and MIGRATE_HISTORY_TABLE is off")
    if not reason.strip():
        raise ConfigError("accept needs --reason: why the change is meant (it is recorded with who and when)")
    with connected(settings) as conn, lock.locked(settings, conn), migrate.project_of(settings, conn) as project:
        version_table = version_table_of(settings, conn, project)
        current = plan.current_revisions(conn, version_table)
        accepted = (integrity.accept(settings, conn, project, version_table, current, revisions, reason)
                    if revisions or not whole_schema else [])
        differed = 0
        if whole_schema:
            found, _ = against_recorded(settings, conn, version_table, current)
            differed = len(found)
            by = integrity.accepted_by(conn)
            record_schema(settings, conn, version_table, "accepted", by, reason)
            log.info("schema.accepted", current=sorted(current), differed=differed, by=by, reason=reason)
        return accepted, differed
