"""The commands: `run` is the pipeline, wait → lock → plan → backup → upgrade → verify."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from job import lock, manifest, plan
from job.config import Settings, lock_key_for, version_table_of
from job.errors import ConfigError, MigrationFailed
from job.logs import log
from job.wait import wait_for_database

if TYPE_CHECKING:
    from job import backup, migrate


def run(settings: Settings) -> str:
    """Migrate the database to the target under the lock; return the outcome ("migrated" or "up-to-date")."""
    heads = manifest.heads(settings.alembic_config)
    with connected(settings) as conn, contextlib.ExitStack() as later:
        project = None

        def prepare() -> None:
            """Without a manifest only Alembic can answer: load it while another replica holds the lock."""
            nonlocal project
            if heads is None:
                project = later.enter_context(project_of(settings, conn))

        with locked(settings, conn, while_waiting=prepare):
            current = plan.current_revisions(conn, version_table(settings))
            known = plan.known_at_target(heads, current, settings.target)
            if known and settings.backup != "always":
                log.info("plan", **known.as_dict())
                return "up-to-date"
            project = project or later.enter_context(project_of(settings, conn))
            the_plan = plan.make(project, current, settings.target)
            log.info("plan", **the_plan.as_dict())
            if settings.backup == "always" or (settings.backup == "auto" and the_plan.pending):
                take_backup(settings, conn, the_plan.current, the_plan.heads if the_plan.pending else the_plan.current)
            if not the_plan.pending:
                return "up-to-date"
            upgrade(settings, conn, project, the_plan)
            verify(settings, conn, project)
            return "migrated"


def backup_now(settings: Settings) -> backup.Backup:
    """Take a backup under the lock, labelled with the current revision."""
    with connected(settings) as conn, locked(settings, conn):
        current = plan.current_revisions(conn, version_table(settings))
        return take_backup(settings, conn, current, current)


def wait(settings: Settings) -> str:
    """Return once the database accepts queries."""
    with connected(settings):
        return "ready"


def check(settings: Settings, block: bool = False) -> plan.Plan:
    """The plan from the database's current revision; with `block`, wait until nothing is pending."""
    deadline = time.monotonic() + settings.wait_timeout
    heads = manifest.heads(settings.alembic_config)
    project = None
    with connected(settings) as conn, contextlib.ExitStack() as stack:
        if block:
            # the migrating job NOTIFYs when it releases the lock; poll anyway every second
            with conn.cursor() as cur:
                cur.execute(f"LISTEN {lock.channel(lock_key(settings, conn))}")
        while True:
            current = plan.current_revisions(conn, version_table(settings))
            the_plan = plan.known_at_target(heads, current, settings.target)
            if the_plan is None:
                project = project or stack.enter_context(project_of(settings, None))
                the_plan = plan.make(project, current, settings.target)
            if not block or not the_plan.pending or time.monotonic() >= deadline:
                return the_plan
            log.info("check.waiting", current=list(the_plan.current), pending=len(the_plan.pending))
            lock.sleep_or_notified(conn, min(1.0, max(deadline - time.monotonic(), 0.0)))


def plan_of(settings: Settings, sql: bool = False) -> tuple[plan.Plan, str | None]:
    """The plan, and with `sql` the offline SQL the pending revisions would run; changes nothing."""
    with connected(settings) as conn, project_of(settings, None) as project:
        the_plan = plan.make(project, plan.current_revisions(conn, version_table(settings)), settings.target)
        return the_plan, project.offline_sql(the_plan.current, settings.target) if sql else None


@contextlib.contextmanager
def connected(settings: Settings) -> Iterator[Any]:
    conn = wait_for_database(settings.database.connect_kwargs(settings.application_name), settings.wait_timeout)
    try:
        yield conn
    finally:
        conn.close()


@contextlib.contextmanager
def locked(settings: Settings, conn: Any, while_waiting: Any = None) -> Iterator[None]:
    lock.ensure_own_session(conn, settings.database.connect_kwargs(settings.application_name))
    with lock.advisory_lock(conn, lock_key(settings, conn), settings.lock_timeout, while_waiting):
        yield


@contextlib.contextmanager
def project_of(settings: Settings, conn: Any | None) -> Iterator[migrate.Project]:
    """The Alembic project; with `conn`, env.py migrates on that connection (the one holding the lock)."""
    from job import migrate  # SQLAlchemy and Alembic: only when the fast path cannot answer

    project = migrate.Project(settings.alembic_config, settings.database.sqlalchemy_url(session_options(settings)), conn)
    try:
        yield project
    finally:
        project.close()


def version_table(settings: Settings) -> str:
    return version_table_of(settings.alembic_config)


def lock_key(settings: Settings, conn: Any) -> int:
    if settings.lock_key is not None:
        return settings.lock_key
    return lock_key_for(conn.get_dsn_parameters()["dbname"], version_table(settings))


def session_options(settings: Settings) -> dict[str, str]:
    """Server settings for every migrating session: ours by SET, an env.py's own engine by `options`."""
    return {
        "lock_timeout": f"{int(settings.statement_lock_timeout * 1000)}ms",
        "statement_timeout": f"{int(settings.statement_timeout * 1000)}ms",
        # never sit on locks in an abandoned transaction
        "idle_in_transaction_session_timeout": "60000ms",
    }


def set_session_timeouts(conn: Any, settings: Settings) -> None:
    with conn.cursor() as cur:
        for name, value in session_options(settings).items():
            cur.execute("SELECT set_config(%s, %s, false)", (name, value))


def take_backup(settings: Settings, conn: Any, from_revision: tuple[str, ...], to_revision: tuple[str, ...]) -> backup.Backup:
    from job import backup

    return backup.take(
        settings.database,
        settings.backup_dir,
        conn.get_dsn_parameters()["dbname"],
        conn.server_version,
        list(from_revision),
        list(to_revision),
        settings.backup_keep,
        settings.application_name,
        os.environ,
        lock_wait_timeout=settings.lock_timeout,
    )


def upgrade(settings: Settings, conn: Any, project: migrate.Project, the_plan: plan.Plan) -> None:
    """Apply the pending revisions, each in its own transaction, with our session's timeouts."""
    from job import migrate

    set_session_timeouts(conn, settings)
    migrate.upgrade(project, the_plan.pending, settings.target, settings.lock_retries)


def verify(settings: Settings, conn: Any, project: migrate.Project) -> None:
    """Read the version table again: the database must now be at the target."""
    project.close()
    current = plan.current_revisions(conn, version_table(settings))
    left = project.steps(current, settings.target)
    if left:
        raise MigrationFailed(
            f"after upgrading, the database is at {', '.join(current) or 'base'} with "
            f"{len(left)} revision(s) still pending: {', '.join(s.revision for s in left)}"
        )


def write_manifest(settings: Settings) -> Path:
    """Record the scripts' heads (as Alembic computes them) for the fast path."""
    from job import migrate

    project = migrate.Project(settings.alembic_config, "postgresql+psycopg2://")
    try:
        return manifest.write(settings.alembic_config, project.heads())
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot write the heads manifest: {e}") from None
