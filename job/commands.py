"""The commands besides `run`: wait, check, plan, status, backup, restore, downgrade, lint, manifest.

Each takes the settings and returns what it found or did; the CLI prints and maps to exit codes.
All that change the database hold the same advisory lock as `run`. Alembic (job.migrate) and the
backup code (job.backup) are imported by the commands that use them: `run` at head loads neither.
"""

from __future__ import annotations

import datetime as dt
import os
import random
import time
from pathlib import Path
from typing import Any, NamedTuple

import psycopg2

from job import db, history, lock, manifest, plan, tables
from job.config import Settings
from job.errors import BackupFailed, ConfigError, LintFindings
from job.logs import log
from job.project import Alembic, version_table_of
from job.wait import connected


def wait(settings: Settings) -> str:
    """Return once the database accepts queries."""
    with connected(settings):
        return "ready"


def check(settings: Settings, block: bool = False) -> plan.Plan:
    """The plan from the database's current revision; with `block`, wait until nothing is pending.
    Read-only: it answers on a hot standby and with a read-only role. While it waits (every app
    pod's init container does), it gives its connection back to a server that is nearly full, as a
    lock waiter does (job.lock.MakeRoom): the migration's own connections come first."""
    deadline = time.monotonic() + settings.wait_timeout
    scripts = manifest.scripts(settings.alembic)
    while True:
        # (a dead network does not outlast the wait)
        with connected(settings, primary=False) as conn, Alembic(settings, conn) as alembic, \
                db.answered_by(deadline + 5):
            listening = block and _listen(conn, lock.channel(lock.key_of(settings, conn)))
            while True:
                known = manifest.known_scripts(settings, conn, scripts)
                the_plan = known and plan.known_plan(settings, conn, known)
                if the_plan is None or settings.other_databases:
                    the_plan = alembic_plan(settings, conn, alembic)
                if not block or not the_plan.pending or time.monotonic() >= deadline:
                    plan.log_ahead(the_plan)
                    if not the_plan.pending:
                        _drift_at_target(settings, conn, known.version_table if known else alembic.version_table(),
                                         the_plan.current)
                    return the_plan
                log.info("check.waiting", current=list(the_plan.current), pending=len(the_plan.pending))
                if lock.free_slots(conn) < lock.ROOM:
                    log.info("check.making_room", reason="the server is nearly out of connection slots: this "
                             "waiter gives its own back to the migration for a moment")
                    break
                pause = min(1.0, max(deadline - time.monotonic(), 0.0))
                lock.sleep_or_notified(conn, pause) if listening else time.sleep(pause)
        time.sleep(min(random.uniform(0.5, 2.0), max(deadline - time.monotonic(), 0.0)))


def _drift_at_target(settings: Settings, conn: Any, version_table: plan.VersionTable,
                     current: tuple[str, ...]) -> None:
    """At the target, the schema against the one the job recorded (schema.drift; exit 9 with MIGRATE_ON_DRIFT=refuse)."""
    from job import drift

    drift.refuse_drift(settings, drift.at_target(settings, conn, version_table, current), "the application")


def _listen(conn: Any, channel: str) -> bool:
    """LISTEN for the migrating job's release; False where the server does not allow it (a hot
    standby): then the waiter polls."""
    try:
        with conn.cursor() as cur:
            cur.execute(f"LISTEN {channel}")
        return True
    except psycopg2.Error:
        return False


def alembic_plan(settings: Settings, conn: Any, alembic: Alembic) -> plan.Plan:
    """The plan by Alembic; for a multidb env.py, from the database that lags, if one does."""
    from job import migrate

    project, version_table = alembic.project(), alembic.version_table()
    the_plan = migrate.plan_for(settings, conn, project, version_table)
    for section, current in others_current(settings, version_table):
        if current != the_plan.current:  # a multidb env.py's other database lags: its plan
            log.info("check.database", section=section, current=list(current))
            the_plan = migrate.plan_for(settings, conn, project, version_table, current)
    return the_plan


def others_current(settings: Settings, version_table: plan.VersionTable) -> list[tuple[str, tuple[str, ...]]]:
    """Where each other database a multidb env.py migrates is (MIGRATE_DATABASES), read without a lock."""
    found = []
    for section, database in settings.other_databases:
        with connected(settings._replace(database=database), primary=False) as conn:
            found.append((section, plan.current_revisions(conn, version_table)))
    return found


def plan_of(settings: Settings, sql: bool = False) -> tuple[plan.Plan, str | None]:
    """The plan, and with `sql` the offline SQL the pending revisions would run; changes nothing."""
    from job import migrate

    with connected(settings, primary=False) as conn, migrate.project_of(settings, conn) as project:
        the_plan = migrate.plan_for(settings, conn, project, version_table_of(settings, conn, project))
        return the_plan, project.offline_sql(the_plan.current, settings.target) if sql else None


class Status(NamedTuple):
    """What `status` reports (its JSON is this, as a dict)."""

    database: str
    version_table: str
    current: list[str]
    target: str
    heads: list[str]
    # None when the plan could not be made: `problem` says why (status shows everything else)
    pending_count: int | None
    pending: list[dict[str, str]] | None
    ahead: list[dict[str, str]] | None
    problem: str | None
    # the advisory lock: key, held, holder (pid, application_name, client_addr, since)
    lock: dict[str, Any]
    # the newest backups of this database: path, from, to, bytes, created_at, age_seconds
    backups: list[dict[str, Any]]
    # why the backups could not be listed (a missing directory or bucket), else None
    backups_problem: str | None
    # the last runs (job.history.recent)
    history: list[dict[str, Any]]
    # a multidb env.py's other databases: section, current
    databases: list[dict[str, Any]]
    # the objects that differ from the schema the job recorded for the current revisions (job.drift),
    # and when that was recorded (None: nothing was)
    drift: list[dict[str, Any]]
    schema_recorded_at: str | None
    # MIGRATE_TENANT_SCHEMA: the tenant's schema all of the above is about (None: the database)
    tenant_schema: str | None = None


def status(settings: Settings) -> Status:
    """Revisions, pending work, the lock's holder, the newest backups, the last runs and drift."""
    from job import drift, migrate

    with connected(settings, primary=False) as conn, migrate.project_of(settings, conn) as project:
        name = db.database_name(conn)
        version_table = version_table_of(settings, conn, project)
        current = plan.current_revisions(conn, version_table)
        key = lock.key_of(settings, conn)
        try:
            planned = migrate.plan_for(settings, conn, project, version_table, current).as_dict()
            heads, pending, ahead, problem = planned["heads"], planned["pending"], planned["ahead"], None
        except Exception as e:  # still show everything else: this is what on-call reads
            heads, pending, ahead, problem = list(project.heads()), None, None, str(e)
        holder = lock.holder(conn, key)
        newest, backups_problem = _newest_backups(settings, name)
        found, recorded_at = drift.against_recorded(settings, conn, version_table, current)
        drift.report_schema(settings, found, recorded_at, when="status")
        return Status(
            database=name, version_table=str(version_table), current=list(current), target=settings.target,
            heads=heads, pending_count=None if pending is None else len(pending), pending=pending, ahead=ahead,
            problem=problem, lock={"key": key, "held": holder is not None, "holder": holder},
            backups=newest, backups_problem=backups_problem,
            history=history.recent(conn, tables.of(settings.history_table), schema=settings.tenant_schema),
            databases=[{"section": section, "current": list(current)}
                       for section, current in others_current(settings, version_table)],
            drift=[f.as_dict() for f in found], schema_recorded_at=recorded_at, tenant_schema=settings.tenant_schema,
        )


def _newest_backups(settings: Settings, database: str) -> tuple[list[dict[str, Any]], str | None]:
    """The five newest backups of `database` (or of its tenant's schema), with their age; or why they
    could not be listed."""
    from job import backup

    now = dt.datetime.now(dt.timezone.utc)
    try:
        store = backup.store(settings)
        store.ready()
        # (a tenant's schema has backups of its own: MIGRATE_TENANT_SCHEMA's, else the whole database's)
        newest = [b for b in backup.listing(store, database) if b.get("schema") == settings.tenant_schema][:5]
    except BackupFailed as e:  # still show everything else
        return [], str(e)
    return [{"path": b["path"], "from": b["from_revision"], "to": b["to_revision"], "bytes": b["bytes"],
             "created_at": b["created_at"],
             "age_seconds": round((now - dt.datetime.fromisoformat(b["created_at"])).total_seconds())}
            for b in newest], None


def backup_now(settings: Settings) -> str:
    """Take a backup under the lock, labelled with the current revision; return its path."""
    from job import backup

    with connected(settings) as conn, lock.locked(settings, conn), lock.other_databases(settings, conn) as others:
        version_table = version_table_of(settings, conn)
        current = plan.current_revisions(conn, version_table)
        with history.of(settings, conn).run("backup") as record:
            taken = []
            for other in others:  # a multidb env.py's other databases too, each under its lock
                theirs = plan.current_revisions(other.conn, version_table)
                taken.append(backup.take_backup(settings, other.conn, theirs, theirs, other.database).path)
            record.backup_path = backup.take_backup(settings, conn, current, current).path
            backup.succeeded(settings, backup.Taken([*taken, record.backup_path]))  # no migration follows that could fail
            return record.backup_path


def backups(settings: Settings) -> list[dict[str, Any]]:
    """The backups in the backup directory or bucket, newest first, with their sidecars."""
    from job import backup

    store = backup.store(settings)
    try:
        store.ready()
    except BackupFailed as e:  # nothing is being backed up: a location that is not there is configuration
        raise ConfigError(str(e)) from None
    return backup.listing(store)


def restore(settings: Settings, name: str, force: bool = False) -> tuple[list[str], list[str]]:
    """Check the backup against its sidecar, then restore it under the lock; return revisions before and after."""
    from job import backup

    store, name, meta = backup.verified(backup.store(settings), name)
    path = store.path_of(name)
    with connected(settings) as conn:
        database = db.database_name(conn)
        dumped_from = backup.archive_database(store, name, meta["sha256"])  # the archive's own word, not only the sidecar's
        for claimed in (meta.get("database"), dumped_from):
            if claimed != database and not force:
                raise ConfigError(
                    f"backup {name} is of database {claimed!r}, not {database!r}: "
                    "add --force to restore it here anyway"
                )
        if meta.get("schema") != settings.tenant_schema:  # (never with --force: the other tenants' data is at stake)
            raise ConfigError(
                f"backup {name} holds the schema {meta['schema']!r} alone: restore it with MIGRATE_TENANT_SCHEMA="
                f"{meta['schema']}" if meta.get("schema") else
                f"backup {name} holds the whole database, and MIGRATE_TENANT_SCHEMA={settings.tenant_schema} names one "
                "tenant's schema: restoring it would replace every tenant's; unset MIGRATE_TENANT_SCHEMA to do that")
        with lock.locked(settings, conn), history.of(settings, conn).run("restore") as record:
            version_table = version_table_of(settings, conn)
            before = list(plan.current_revisions(conn, version_table))
            # a backup holds the database as it was before the migration it preceded: from_revision
            log.info("restore.start", path=path, before=before, backup_at=meta.get("from_revision"))
            record.backup_path = path
            backup.restore(settings.database, store, name, meta["sha256"], settings.application_name, os.environ,
                           lambda name: lock.cancel_lock_waits(conn, name, settings.lock_timeout),
                           backup.clearing_sql(conn, tables.of(settings.history_table), settings.tenant_schema))
            after = list(plan.current_revisions(conn, version_table))
            log.info("restore.done", path=path, before=before, after=after)
            return before, after


def downgrade(settings: Settings, target: str) -> str:
    """Back up, then downgrade to `target` one revision per transaction, under the lock."""
    from job import backup, drift, migrate

    with connected(settings) as conn, lock.locked(settings, conn), lock.other_databases(settings, conn) as others, \
            migrate.project_of(settings, conn) as project:
        version_table = version_table_of(settings, conn, project)
        current = plan.current_revisions(conn, version_table)
        project.validate(current, "heads")
        steps = project.steps(current, target, "downgrade")
        log.info("plan", current=list(current), target=target, direction="downgrade",
                 pending=[{"revision": s.revision, "description": s.description} for s in steps])
        if not steps:
            return "up-to-date"
        migrate.warn_nonatomic(project, steps, "downgrade")
        final = project.after_downgrade(steps)
        # a relative target (-1) is resolved once: after the first step it would mean something else
        absolute = "base" if not final else final[0] if len(final) == 1 else target
        with history.of(settings, conn).run("downgrade") as record:
            # (a database with revisions to undo always holds something to back up)
            taken = backup.before_changing(settings, conn, others, current, tuple(final), record)
            migrate.apply_steps(settings, conn, project, steps, absolute, "downgrade", record, version_table,
                                rows_within=not others, recovery=taken.recovery())
            migrate.verify(settings, conn, project, version_table, undone=steps, others=others)
            drift.after_migrating(settings, conn, project, version_table, (), "downgraded")
            backup.succeeded(settings, taken)
            record.outcome = "downgraded"
            return "downgraded"


def lint(settings: Settings, everything: bool = False, allow: str | None = None) -> list[Any]:
    """Check the pending revisions' SQL (with `everything`, the whole history, offline) with squawk."""
    from job import migrate

    from job import lint as linter

    allowed = linter.allowances(settings.alembic, allow)
    start_after = settings.lint_start_after or settings.alembic.migrate_job_option("lint_start_after")
    if everything:
        with migrate.project_of(settings, None) as project:
            project.settle_offline()
            graph = project.lineage()
            steps = linter.after(project.steps((), "heads"), start_after, graph)
            sql = [(s, project.step_sql(s.revision)) for s in steps]
            endings = project.transaction_endings(steps, "upgrade")
        pg_version = "15"
    else:
        with connected(settings, primary=False) as conn, migrate.project_of(settings, conn) as project:
            graph = project.lineage()
            steps = migrate.plan_for(settings, conn, project, version_table_of(settings, conn, project)).pending
            steps = linter.after(steps, start_after, graph)
            sql = [(s, project.step_sql(s.revision)) for s in steps]
            endings = project.transaction_endings(steps, "upgrade")
            pg_version = str(conn.server_version // 10000)
    findings, suggestions = linter.check(sql, allowed, pg_version, {r for r, rev in graph.items() if rev.breaking},
                                         endings.values())
    for suggestion in suggestions:
        log.warning("lint.suggestion", revision=suggestion.revision, rule=suggestion.rule, message=suggestion.message,
                    line=suggestion.line)
    for finding in findings:
        log.warning("lint.finding", revision=finding.revision, rule=finding.rule, message=finding.message,
                    line=finding.line)
    log.info("lint.done", revisions=len(steps), findings=len(findings))
    if findings:
        raise LintFindings(
            f"{len(findings)} unsafe operation(s) in {len({f.revision for f in findings})} revision(s): "
            + "; ".join(f"{f.revision} {f.rule}" for f in findings)
            + " (fix them, or allow them with a reason in alembic.ini [migrate_job] lint_allow)"
        )
    return findings


def write_manifest(settings: Settings) -> Path:
    """Record the scripts' heads (as Alembic computes them) for the fast path."""
    from job import migrate

    scripts = manifest.scripts(settings.alembic)
    if scripts is None:
        raise ConfigError(f"the script location in {str(settings.alembic.main)!r} is not understood: "
                          "no heads manifest can be used for it")
    project = migrate.Project(settings.alembic)
    project.settle_offline()  # (env.py may put the scripts somewhere else than the config files say)
    project.validate_target("heads")  # (no revision at all: nothing a start-up could trust)
    try:
        return manifest.write(scripts, migrate.known_of(project, settings.version_table))
    except OSError as e:
        raise ConfigError(f"cannot write the heads manifest: {e}") from None
