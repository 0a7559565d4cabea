"""`run`, the pipeline: wait → lock → plan → backup → upgrade → verify; and the session helpers
every command shares."""

from __future__ import annotations

import contextlib
import os
import random
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator, NamedTuple

import psycopg2

from job import db, lineage, lock, manifest, plan
from job.config import Database, Settings, lock_key_for
from job.errors import MigrationFailed
from job.history import History
from job.logs import log, run_id
from job.wait import wait_for_database

if TYPE_CHECKING:  # Alembic, SQLAlchemy and the backup code load only when there is work
    from job import backup, migrate


def run(settings: Settings) -> str:
    """Migrate the database to the target under the lock; return the outcome ("migrated" or "up-to-date")."""
    started = time.monotonic()
    while True:
        try:
            return run_once(settings, started)
        except lock.MakeRoom:  # waited holding nothing: start over in a moment, on a new connection
            time.sleep(random.uniform(0.5, 2.0))


def run_once(settings: Settings, started: float) -> str:
    """One attempt at `run`, its lock timeout counted from `started`."""
    scripts = manifest.scripts(settings.alembic)
    with connected(settings) as conn, contextlib.ExitStack() as later:
        known = known_scripts(settings, conn, scripts)
        project: migrate.Project | None = None
        at_head: plan.Plan | None = None

        def prepare() -> None:
            """Without the heads only Alembic can answer: load it while another replica holds the lock."""
            nonlocal project
            if known is None:
                project = later.enter_context(project_of(settings, conn))

        def at_target() -> bool:
            """Under the shared lock: does what is known of the scripts prove there is nothing to do?"""
            nonlocal at_head
            at_head = known_plan(settings, conn, known)
            return at_head is not None and settings.backup != "always"

        # (with other databases, every run checks them all under their locks: no shared fast path)
        fast = known is not None and not settings.other_databases
        with locked(settings, conn, while_waiting=prepare, enough=at_target if fast else None, since=started,
                    make_room=True) as mode:
            if mode == lock.SHARED:
                log_plan(at_head)
                return "up-to-date"
            others = later.enter_context(other_databases(settings))
            return migrate_exclusively(settings, conn, others, scripts, known,
                                       lambda: project or later.enter_context(project_of(settings, conn)))


def migrate_exclusively(settings: Settings, conn: Any, others: list[Other], scripts: manifest.Scripts | None,
                        known: manifest.Known | None, project_of_run: Callable[[], migrate.Project]) -> str:
    """Under the exclusive lock: plan again (another replica may have done the work while this one
    waited, and recorded what it learned of the scripts), back up, upgrade, verify."""
    known = known or known_scripts(settings, conn, scripts)
    if known is not None and not others:
        at_head = known_plan(settings, conn, known)
        if at_head and settings.backup != "always":
            log_plan(at_head)
            return "up-to-date"
    project = project_of_run()
    version_table = project.locate()
    the_plan = plan_for(settings, conn, project, version_table)
    refuse_out_of_step(conn, others, version_table, the_plan.current,
                       "restore the one that moved alone, or bring it to the same revision by hand")
    if not the_plan.ahead:  # (older code has nothing to add to what newer code recorded)
        remember(settings, conn, scripts, known, manifest.Known(the_plan.heads, version_table))
        record_lineage(settings, conn, project, version_table)
    log_plan(the_plan)
    project.refuse_unsafe_endings(list(the_plan.pending), "upgrade")
    backing_up = settings.backup == "always" or (settings.backup == "auto" and bool(the_plan.pending))
    if not the_plan.pending and not backing_up:
        return "up-to-date"
    backups_taken: list[str] = []
    with history(settings, conn).run("run") as record:
        if backing_up:
            to = the_plan.heads if the_plan.pending else the_plan.current
            # every database env.py migrates, before the first change to any of them
            for other in others:
                if needs_backup(settings, other.conn, the_plan):
                    backups_taken.append(take_backup(settings, other.conn, the_plan.current, to, other.database).path)
            if needs_backup(settings, conn, the_plan):
                record.backup_path = take_backup(settings, conn, the_plan.current, to).path
                backups_taken.append(record.backup_path)
        if not the_plan.pending:
            succeeded(settings, backups_taken)
            record.outcome = "up-to-date"
            return "up-to-date"
        apply(settings, conn, project, the_plan.pending, settings.target, "upgrade", record, version_table,
              rows_within=not others)
        verify(settings, conn, project, version_table, others=others)
        succeeded(settings, backups_taken)
        record.outcome = "migrated"
        return "migrated"


class Other(NamedTuple):
    """Another database a multidb env.py migrates (MIGRATE_DATABASES), connected and locked."""

    section: str
    database: Database
    conn: Any


@contextlib.contextmanager
def other_databases(settings: Settings) -> Iterator[list[Other]]:
    """Wait for and lock each other database env.py migrates, in the order they are listed (every
    runner takes them in the same order, after DATABASE_URL's); release them at the end."""
    with contextlib.ExitStack() as stack:
        others = []
        for section, database in settings.other_databases:
            conn = wait_for_database(database.connect_kwargs(settings.application_name), settings.wait_timeout,
                                     session_options(settings))
            stack.callback(conn.close)
            stack.enter_context(lock.advisory_lock(conn, lock_key(settings, conn), settings.lock_timeout))
            others.append(Other(section, database, conn))
        yield others


def refuse_out_of_step(conn: Any, others: list[Other], version_table: plan.VersionTable, current: tuple[str, ...],
                       advice: str) -> None:
    """Raise MigrationFailed naming each other database that is not at `current` (DATABASE_URL's)."""
    theirs = [(other, plan.current_revisions(other.conn, version_table)) for other in others]
    apart = [(other, revisions) for other, revisions in theirs if revisions != current]
    if apart:
        raise MigrationFailed(
            f"the databases are at different revisions: {database_name(conn)} at {', '.join(current) or 'base'}, "
            + ", ".join(f"{o.section} ({database_name(o.conn)}) at {', '.join(r) or 'base'}" for o, r in apart)
            + f": {advice}")


def own_tables(settings: Settings) -> list[str]:
    """The job's own tables in the database (history and what runs learned): never backed up or restored."""
    history_table = settings.history_table
    return [t for t in (history_table, manifest.record_table(history_table), lineage.table_for(history_table)) if t]


def needs_backup(settings: Settings, conn: Any, the_plan: plan.Plan) -> bool:
    """`auto` does not back up a database that holds nothing yet (a first deploy: nothing to restore)."""
    from job import backup

    if settings.backup == "auto" and not the_plan.current and backup.nothing_to_back_up(conn, settings.history_table):
        log.info("backup.skipped", database=database_name(conn),
                 reason="the database holds nothing yet (a first deploy): nothing to restore")
        return False
    return True


def known_scripts(settings: Settings, conn: Any, scripts: manifest.Scripts | None) -> manifest.Known | None:
    """The heads and version table without loading Alembic: recorded in the database by an earlier
    run of these exact scripts (it asked env.py where the version table is), else the heads manifest."""
    if scripts is None:
        return None
    return (manifest.from_database(conn, manifest.record_table(settings.history_table), scripts)
            or manifest.from_file(scripts, settings.version_table))


def known_plan(settings: Settings, conn: Any, known: manifest.Known) -> plan.Plan | None:
    """The plan when what is known of the scripts without Alembic settles it: the database is at the
    target, or ahead of it on its own line (by the recorded lineage); else None."""
    return plan.known_at_target(known.heads, plan.current_revisions(conn, known.version_table), settings.target,
                                recorded_lineage(settings, conn, known.version_table), settings.allow_ahead)


def plan_for(settings: Settings, conn: Any, project: migrate.Project, version_table: plan.VersionTable,
             current: tuple[str, ...] | None = None) -> plan.Plan:
    """The plan from `current` (what the database is at, read when not given), by Alembic; a database
    at revisions the scripts lack is judged by its recorded lineage."""
    if current is None:
        current = plan.current_revisions(conn, version_table)
    return plan.make(project, current, settings.target, recorded_lineage(settings, conn, version_table),
                     settings.allow_ahead)


def recorded_lineage(settings: Settings, conn: Any, version_table: plan.VersionTable) -> plan.Recorded:
    table = lineage.table_for(settings.history_table)
    return lambda: lineage.read(conn, table, str(version_table))


def record_lineage(settings: Settings, conn: Any, project: migrate.Project, version_table: plan.VersionTable) -> None:
    """Record the scripts' revision graph beside the version table before anything is applied, so
    that older code meeting this database can tell where it stands (job.lineage)."""
    with db.autocommit(conn):
        problem = lineage.record(conn, lineage.table_for(settings.history_table), str(version_table),
                                 project.lineage().values())
    if problem:
        log.warning("lineage.unrecorded", error=problem)


def log_plan(the_plan: plan.Plan) -> None:
    log.info("plan", **the_plan.as_dict())
    log_ahead(the_plan)


def log_ahead(the_plan: plan.Plan) -> None:
    """`database.ahead`, when older code finds the database ahead of its scripts."""
    if the_plan.ahead:
        log.info("database.ahead", **the_plan.ahead_fields())


def remember(settings: Settings, conn: Any, scripts: manifest.Scripts | None, known: manifest.Known | None,
             learned: manifest.Known) -> None:
    """Record what Alembic said of these scripts, so that the next start need not load it."""
    if scripts is None or known == learned:
        return
    with db.autocommit(conn):
        problem = manifest.remember(conn, manifest.record_table(settings.history_table), scripts, learned)
    if problem:
        log.warning("heads.unrecorded", error=problem)


def version_table_of(settings: Settings, conn: Any, project: migrate.Project | None = None) -> plan.VersionTable:
    """Where the version table is: as a run recorded it for these scripts, else asked of env.py
    (the heads manifest only repeats what the config files say)."""
    scripts = manifest.scripts(settings.alembic)
    recorded = scripts and manifest.from_database(conn, manifest.record_table(settings.history_table), scripts)
    if recorded:
        return recorded.version_table
    if project is not None:
        return project.locate()
    with project_of(settings, conn) as loaded:
        return loaded.locate()


@contextlib.contextmanager
def connected(settings: Settings) -> Iterator[Any]:
    """A connection once the database answers, closed at the end."""
    conn = wait_for_database(settings.database.connect_kwargs(settings.application_name), settings.wait_timeout,
                             session_options(settings))
    try:
        yield conn
    finally:
        conn.close()


@contextlib.contextmanager
def locked(settings: Settings, conn: Any, while_waiting: Callable[[], None] | None = None,
           enough: Callable[[], bool] | None = None, since: float | None = None,
           make_room: bool = False) -> Iterator[str]:
    """Hold the migration lock on `conn` (refusing a transaction-mode pooler first); yields its mode.
    Without `enough` it is always exclusive."""
    lock.ensure_own_session(conn, settings.database.connect_kwargs(settings.application_name))
    with lock.advisory_lock(conn, lock_key(settings, conn), settings.lock_timeout, while_waiting, enough,
                            since, make_room) as mode:
        yield mode


@contextlib.contextmanager
def project_of(settings: Settings, conn: Any | None) -> Iterator[migrate.Project]:
    """The Alembic project; with `conn`, env.py migrates on that connection (the one holding the lock)."""
    from job import migrate

    settings.database.check_driver_installed()
    project = migrate.Project(settings.alembic, settings.database, conn, session_options(settings), settings.sections)
    for _, database in settings.other_databases:  # env.py may connect to these too
        with connected(settings._replace(database=database)) as other:
            project.allow([other])
    try:
        yield project
    finally:
        project.close()


def history(settings: Settings, conn: Any) -> History:
    return History(conn, settings.history_table, run_id())


def database_name(conn: Any) -> str:
    return conn.get_dsn_parameters()["dbname"]


def lock_key(settings: Settings, conn: Any) -> int:
    if settings.lock_key is not None:
        return settings.lock_key
    return lock_key_for(database_name(conn), settings.version_table)


def session_options(settings: Settings) -> dict[str, str]:
    """Server settings for every migrating session: ours, and every one env.py opens (job.migrate)."""
    return {
        "application_name": settings.application_name,
        "lock_timeout": f"{int(settings.statement_lock_timeout * 1000)}ms",
        "statement_timeout": f"{int(settings.statement_timeout * 1000)}ms",
        # never sit on locks in an abandoned transaction
        "idle_in_transaction_session_timeout": "60000ms",
    }


def take_backup(settings: Settings, conn: Any, from_revision: tuple[str, ...], to_revision: tuple[str, ...],
                database: Database | None = None) -> backup.Backup:
    """A verified backup of this database (DATABASE_URL's unless `database` says which), labelled
    with the revisions it goes from and to."""
    from job import backup

    return backup.take(
        backup_store(settings),
        database or settings.database,
        database_name(conn),
        conn.server_version,
        list(from_revision),
        list(to_revision),
        settings.backup_keep,
        settings.application_name,
        os.environ,
        lock_wait_timeout=settings.lock_timeout,
        exclude_tables=own_tables(settings),
        set_key=backup.set_of(server_identity(conn), database_name(conn)),
        wait_timeout=settings.wait_timeout,
    )


def backup_store(settings: Settings) -> Any:
    """Where backups are kept (MIGRATE_BACKUP_DIR): a directory or a bucket (job.backup)."""
    from job import backup

    return backup.store_for(settings.backup_dir, os.environ, settings.s3_addressing)


def succeeded(settings: Settings, paths: list[str]) -> None:
    """The migration these backups preceded succeeded: retention may now let them go in turn."""
    from job import backup

    for path in paths:
        backup.mark_succeeded(backup_store(settings), path)


def server_identity(conn: Any) -> str:
    """Which server this is, for the backup set: its system identifier, else (where the function is
    not granted, as on some managed services) the address the job reached it at."""
    try:
        with db.autocommit(conn), conn.cursor() as cur:
            cur.execute("SELECT system_identifier::text FROM pg_control_system()")
            return cur.fetchone()[0]
    except psycopg2.Error:
        params = conn.get_dsn_parameters()
        return f"{params.get('host', '')}:{params.get('port', '')}"


def apply(settings: Settings, conn: Any, project: migrate.Project, steps: list[plan.Step], target: str,
          direction: str, record: History, version_table: plan.VersionTable, rows_within: bool = True) -> None:
    """Apply the steps, each in its own transaction, with our session's timeouts, into the history
    (a revision's row inside its transaction, unless env.py migrates several databases)."""
    from job import migrate

    key = lock_key(settings, conn)
    migrate.apply(project, steps, target, direction, settings.lock_retries, record, version_table, rows_within,
                  confirm_lock=lambda: lock.confirm(conn, key))


def verify(settings: Settings, conn: Any, project: migrate.Project, version_table: plan.VersionTable,
           direction: str = "upgrade", target: str | None = None, others: list[Other] = ()) -> None:
    """Read the version table again: the database (and every other one env.py migrates) must now be at the target."""
    project.close()
    lock.confirm(conn, lock_key(settings, conn))
    current = plan.current_revisions(conn, version_table)
    refuse_out_of_step(conn, others, version_table, current, f"after the {direction}, run the job again")
    left = project.steps(current, target or settings.target, direction)
    if left:
        raise MigrationFailed(
            f"after the {direction}, the database is at {', '.join(current) or 'base'} with "
            f"{len(left)} revision(s) still to go: {', '.join(s.revision for s in left)}"
        )
