"""Alembic, driven on the connection that holds the lock, one revision per transaction.

Alembic hands the work to the project's env.py. Ours takes the shared connection from
`config.attributes["connection"]` (the Alembic cookbook's "sharing a connection" recipe); a stock
`alembic init` env.py ignores it and builds its own engine from `sqlalchemy.url`, which we fill in.
Either way each revision runs in its own `run_env()`, so each commits on its own, whatever
`transaction_per_migration` the env.py passes.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import inspect
import io
import logging.config
import os
import sys
import time
from typing import Any, Callable, Iterator, Mapping, NamedTuple

import psycopg2
import psycopg2.errors
import alembic
import tenacity
from alembic.config import Config
from alembic.runtime.environment import EnvironmentContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.pool import StaticPool

from job import db, logs
from job.alembic_files import AlembicFiles
from job.config import Database
from job.errors import ConfigError, Interrupted, MigrationFailed, RevisionError
from job.logs import log
from job.plan import Step, VersionTable
from job.wait import one_line


LONG_TRANSACTIONS_SQL = """
SELECT pid, application_name, state, xact_start FROM pg_stat_activity
WHERE datname = current_database() AND pid <> pg_backend_pid() AND xact_start IS NOT NULL
  AND backend_type = 'client backend' AND application_name NOT LIKE 'migrate-job/%'
ORDER BY xact_start LIMIT 5
"""


class Located(NamedTuple):
    """What env.py itself reads: its version table, the revisions in it, and the database it reached."""

    version_table: VersionTable
    current: tuple[str, ...]
    database: str


class Project:
    """An Alembic project: its config and scripts, loaded once, and the connection env.py should use.

    `database` is what env.py's own engines connect to (the URL in the driver the user named);
    `session` the settings every session env.py opens gets, through a connect hook on every
    SQLAlchemy engine, async ones included (whatever URL or engine env.py builds)."""

    def __init__(self, files: AlembicFiles, database: Database | None = None, raw_connection: Any | None = None,
                 session: Mapping[str, str] | None = None) -> None:
        self.files = files
        self.config = _config(files)
        if database is not None:
            # configparser interpolation would read a URL-encoded password's % as a reference
            self.config.set_main_option("sqlalchemy.url", database.sqlalchemy_url().replace("%", "%%"))
            os.environ.update(database.driver_environment())
        else:  # offline: env.py only needs a dialect
            self.config.set_main_option("sqlalchemy.url", "postgresql+psycopg2://")
        self.config.attributes["configure_logger"] = False
        _session_settings.clear()
        _session_settings.update(session or {})
        _hook_every_engine()
        try:
            with owned_logging():
                self.script = ScriptDirectory.from_config(self.config)
                self.script.revision_map.heads  # imports every revision file now, not mid-plan
        except Exception as e:
            raise ConfigError(
                f"the Alembic project in {str(files.main)!r} cannot be loaded: {type(e).__name__}: {e}"
            ) from None
        self.raw_connection = raw_connection
        self._connection: Any = None

    def connection(self) -> Any:
        """A SQLAlchemy connection over the raw psycopg2 connection (the one holding the lock)."""
        if self._connection is None and self.raw_connection is not None:
            raw = self.raw_connection
            raw.autocommit = False
            engine = create_engine("postgresql+psycopg2://", creator=lambda: raw, poolclass=StaticPool)
            self._connection = engine.connect()
            self.config.attributes["connection"] = self._connection
        return self._connection

    def locate(self, conn: Any) -> Located:
        """Ask env.py where its version table is, as `alembic current` does (changing nothing), and
        check that it migrates the database `conn` (the job's own, locked session) is connected to.

        env.py may set `version_table` / `version_table_schema` in code, and may build its own
        engine from its own settings: only running it tells."""
        seen: list[Located] = []

        def found(rev: Any, context: Any) -> list[Any]:
            identity = context.connection.exec_driver_sql(IDENTITY_SQL).one()
            seen.append(Located(VersionTable(context.version_table, context.version_table_schema),
                                tuple(sorted(context.get_current_heads())), _describe(*identity)))
            if identity != _identity(conn):
                raise ConfigError(
                    f"env.py migrates {_describe(*identity)}, but DATABASE_URL is {_describe(*_identity(conn))}: "
                    "the job locks and backs up DATABASE_URL's database, so env.py must use it "
                    "(take the URL from `config.get_main_option('sqlalchemy.url')`)"
                )
            return []

        try:
            self.run_env(found, dont_mutate=True)
        except ConfigError:
            raise
        except Exception as e:
            raise ConfigError(f"the Alembic environment (env.py) failed: {type(e).__name__}: {one_line(e)}"
                              f"{_async_hint(e)}") from None
        finally:
            self.rollback()
        if not seen:
            raise ConfigError("env.py ran no migrations online (it never called context.run_migrations())")
        return seen[0]

    def heads(self) -> tuple[str, ...]:
        return tuple(self.script.get_heads())

    def steps(self, current: tuple[str, ...], target: str, direction: str = "upgrade") -> list[Step]:
        """The revisions between `current` and `target`, in the order they apply (or are undone)."""
        return [Step(s.revision.revision, s.doc) for s in self._revs(direction, target, current)]

    def validate(self, current: tuple[str, ...], target: str) -> None:
        """Refuse a database at an unknown revision, an ambiguous `head`, or a target the scripts lack."""
        for revision in current:
            try:
                self.script.get_revision(revision)
            except Exception:
                raise RevisionError(
                    f"the database is at revision {revision!r}, which these migration scripts do not "
                    "know: it was migrated by newer code, or the scripts are missing a revision"
                ) from None
        heads = self.heads()
        if target == "head" and len(heads) > 1:
            raise RevisionError(
                f"the migration scripts have {len(heads)} heads ({', '.join(heads)}) and the target is "
                "'head': merge them (alembic merge heads) or set MIGRATE_TARGET"
            )
        try:
            self.script.get_revisions(target)
        except Exception:
            raise ConfigError(f"MIGRATE_TARGET {target!r} is not a revision of these scripts") from None

    def _revs(self, direction: str, target: str, current: tuple[str, ...]) -> list[Any]:
        # ScriptDirectory._upgrade_revs / _downgrade_revs are what alembic.command.upgrade and
        # downgrade themselves run.
        revs = self.script._upgrade_revs if direction == "upgrade" else self.script._downgrade_revs
        try:
            return revs(target, current)
        except CommandError as e:
            hint = "to go back, use `migrate-job downgrade`" if direction == "upgrade" else "to go forward, use run"
            raise ConfigError(f"cannot {direction} from {', '.join(current) or 'base'} to {target!r}: {e} ({hint})") from None

    def run_env(self, fn: Callable[[Any, Any], list[Any]], as_sql: bool = False, **kw: Any) -> None:
        """Run the project's env.py once with `fn` choosing the steps; env.py never reconfigures logging."""
        if not as_sql:
            self.connection()
        with owned_logging(), EnvironmentContext(self.config, self.script, fn=fn, as_sql=as_sql, **kw):
            self.script.run_env()

    def offline_sql(self, current: tuple[str, ...], target: str) -> str:
        """The SQL `alembic upgrade --sql` would emit from `current` to `target`."""
        return self._offline(lambda rev, ctx: self._revs("upgrade", target, current),
                             current[0] if len(current) == 1 else None, target)

    def _offline(self, fn: Callable[[Any, Any], list[Any]], starting_rev: str | None, destination_rev: str) -> str:
        """Run env.py in offline (--sql) mode and return what it wrote."""
        buffer = io.StringIO()
        self.config.output_buffer = buffer
        self.run_env(fn, as_sql=True, starting_rev=starting_rev, destination_rev=destination_rev)
        return buffer.getvalue()

    def long_transactions(self) -> list[dict[str, Any]]:
        """Other sessions' open transactions in this database, oldest first: who blocks our DDL."""
        raw = self.raw_connection
        if raw is None or raw.closed:
            return []
        try:
            with raw.cursor() as cur:
                cur.execute(LONG_TRANSACTIONS_SQL)
                rows = cur.fetchall()
            raw.rollback()
        except psycopg2.Error:
            return []
        return [
            {"pid": pid, "application_name": app, "state": state, "xact_start": start.isoformat()}
            for pid, app, state, start in rows
        ]

    def after_downgrade(self, steps: list[Step]) -> list[str]:
        """The revision(s) the database is at once `steps` (a downgrade, in order) are undone."""
        down = self.script.get_revision(steps[-1].revision).down_revision
        return [] if down is None else [down] if isinstance(down, str) else list(down)

    def step_sql(self, revision: str) -> str:
        """The offline SQL of upgrading through one revision only, less Alembic's own statements on
        its version table (what `lint` checks: they are not the revision's to fix)."""
        from alembic.runtime.migration import MigrationStep

        script = self.script.get_revision(revision)
        step = MigrationStep.upgrade_from_script(self.script.revision_map, script)
        down = script.down_revision
        version_table: list[str] = []

        def one_step(rev: Any, context: Any) -> list[Any]:
            version_table.append(context.version_table)
            return [step]

        sql = self._offline(one_step, down if isinstance(down, str) or down is None else down[0], revision)
        return ";\n".join(st for st in sql.split(";\n") if not version_table or version_table[0] not in st)

    def rollback(self) -> None:
        """End whatever transaction env.py left open on the shared connection (reads included)."""
        if self._connection is not None:
            with contextlib.suppress(Exception):
                self._connection.rollback()
        elif self.raw_connection is not None and not self.raw_connection.closed:
            self.raw_connection.rollback()

    def close(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(Exception):
                self._connection.rollback()
            self.config.attributes.pop("connection", None)
            self._connection = None
            if not self.raw_connection.closed:
                self.raw_connection.rollback()
                self.raw_connection.autocommit = True


def _config(files: AlembicFiles) -> Config:
    """Alembic's Config for alembic.ini and/or pyproject.toml (the latter needs Alembic 1.16+)."""
    if files.toml is not None and files.toml_alembic:
        if "toml_file" not in inspect.signature(Config).parameters:
            raise ConfigError(f"{str(files.toml)!r} configures Alembic in [tool.alembic], which needs Alembic 1.16 "
                              f"or newer (installed: {alembic.__version__})")
        return Config(file_=str(files.ini) if files.ini else None, toml_file=str(files.toml))
    return Config(str(files.ini))


# Settings every session env.py opens gets (job.pipeline.session_options), set by a connect hook.
_session_settings: dict[str, str] = {}
_hooked: list[bool] = []


def _hook_every_engine() -> None:
    """Listen for `connect` on every Engine at once: env.py's own engines, sync or async (an
    AsyncEngine's pool is its sync engine's), whatever URL they were built from."""
    if not _hooked:
        event.listen(Engine, "connect", _on_connect)
        _hooked.append(True)


def _on_connect(dbapi_connection: Any, _record: Any) -> None:
    if not _session_settings:
        return
    # in autocommit, as SQLAlchemy's own recipe does: a SET inside a transaction that is then
    # rolled back (as dialect initialisation does) would be undone
    autocommit = dbapi_connection.autocommit
    dbapi_connection.autocommit = True
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("SELECT " + ", ".join(
            f"set_config({_literal(name)}, {_literal(value)}, false)" for name, value in _session_settings.items()))
    finally:
        cursor.close()
        dbapi_connection.autocommit = autocommit


def _literal(value: str) -> str:
    """A SQL string literal (no driver-specific parameter style: this runs on every driver)."""
    return "'" + value.replace("'", "''") + "'"


# Which database a session is on: its name, and the server (started once, at one instant).
IDENTITY_SQL = "SELECT current_database(), pg_postmaster_start_time()::text, inet_server_addr()::text, inet_server_port()"


def _identity(conn: Any) -> tuple[Any, ...]:
    with conn.cursor() as cur:
        cur.execute(IDENTITY_SQL)
        return tuple(cur.fetchone())


def _describe(name: str, started: str, address: str | None, port: int | None) -> str:
    where = f"{address.split('/')[0]}:{port}" if address else "a local socket"
    return f"database {name!r} on {where} (server started {started})"


def _async_hint(error: BaseException) -> str:
    if "asyncio extension requires an async driver" in str(error):
        return " (this env.py is async: name an async driver in DATABASE_URL, postgresql+asyncpg://...)"
    return ""


@contextlib.contextmanager
def owned_logging() -> Iterator[None]:
    """The job owns logging and stdout while the project's code runs (env.py, the app modules it
    imports, revision files): logging configuration calls do nothing (a stock env.py calls
    fileConfig; app settings modules call dictConfig or basicConfig on import), `print` goes to
    stderr, and afterwards the job's root handler is the only one again and no logger stays
    disabled, so Alembic's records keep going through the job's renderer."""
    saved = (logging.config.fileConfig, logging.config.dictConfig, logging.basicConfig)
    logging.config.fileConfig = logging.config.dictConfig = logging.basicConfig = lambda *a, **k: None
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        logging.config.fileConfig, logging.config.dictConfig, logging.basicConfig = saved
        logs.reclaim()


def apply(
    project: Project,
    steps: list[Step],
    target: str,
    direction: str = "upgrade",
    lock_retries: int = 0,
    on_step: Callable[[Step, dt.datetime, float, str, str | None], None] | None = None,
) -> None:
    """Apply `steps` (upgrade or downgrade) one per transaction, logging each; raise MigrationFailed
    naming the one that failed. `on_step(step, started, seconds, outcome, error)` hears of each.

    A revision whose DDL gave up waiting for a table lock (`lock_timeout`) is retried with backoff:
    the application's transactions go first, and the migration tries again when they have moved on.
    """
    record = on_step or (lambda *args: None)
    for step in steps:
        log.info("migration.start", revision=step.revision, description=step.description, direction=direction)
        started, started_at = time.monotonic(), dt.datetime.now(dt.timezone.utc)
        reached: list[bool] = []

        def one_step(rev: Any, _context: Any, expected: str = step.revision) -> list[Any]:
            reached.append(True)
            steps_now = project._revs(direction, target, rev)[:1]
            if not steps_now or steps_now[0].revision.revision != expected:
                raise MigrationFailed(f"the database moved while we held the lock: expected {expected} next")
            return steps_now

        def before_retry(state: tenacity.RetryCallState, step: Step = step) -> None:
            log.warning(
                "migration.retry",
                revision=step.revision,
                attempt=state.attempt_number,
                retries=lock_retries,
                next_in=round(state.upcoming_sleep, 3),
                error=one_line(db.driver_error(state.outcome.exception())),
                blockers=project.long_transactions(),
            )

        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(_is_lock_timeout),
            stop=tenacity.stop_after_attempt(lock_retries + 1),
            wait=tenacity.wait_random_exponential(multiplier=0.5, max=10),
            before_sleep=before_retry,
            reraise=True,
        )
        try:
            retrying(project.run_env, one_step)
        except Exception as e:
            if not reached and db.received_signal() is None and not isinstance(e, MigrationFailed):
                raise ConfigError(
                    f"the Alembic environment (env.py) failed before revision {step.revision} could run: "
                    f"{type(e).__name__}: {one_line(e)}{_async_hint(e)}"
                ) from None
            failure = e if isinstance(e, MigrationFailed) else _failure(step, e, project)
            record(step, started_at, time.monotonic() - started,
                   "interrupted" if isinstance(failure, Interrupted) else "failed", str(failure))
            raise failure from None
        except Interrupted:
            record(step, started_at, time.monotonic() - started, "interrupted", None)
            raise
        seconds = time.monotonic() - started
        record(step, started_at, seconds, "applied", None)
        log.info("migration.done", revision=step.revision, description=step.description, direction=direction,
                 seconds=round(seconds, 3))


def _is_lock_timeout(error: BaseException) -> bool:
    return db.received_signal() is None and isinstance(db.driver_error(error), psycopg2.errors.LockNotAvailable)


def _failure(step: Step, error: Exception, project: Project) -> BaseException:
    """Tell a signal's cancel from a revision's own failure, and say what state the database is in."""
    signum = db.received_signal()
    if signum is not None and db.is_cancel(error):
        return Interrupted(signum)
    driver = db.driver_error(error)
    message = one_line(driver or error)
    if isinstance(driver, psycopg2.errors.LockNotAvailable):
        blockers = ", ".join(
            f"pid {b['pid']} ({b['application_name'] or 'no application_name'}, {b['state']} since {b['xact_start']})"
            for b in project.long_transactions()
        )
        return MigrationFailed(
            f"revision {step.revision} ({step.description}) could not take its table locks within "
            f"MIGRATE_STATEMENT_LOCK_TIMEOUT, after all MIGRATE_LOCK_RETRIES; rolled back. "
            f"Blocking: {blockers or 'no transaction is open any more'}",
            revision=step.revision,
        )
    if isinstance(driver, psycopg2.OperationalError) and getattr(driver, "pgcode", None) is None:
        return MigrationFailed(
            f"revision {step.revision} ({step.description}) lost its connection: {message}; "
            "the server rolled the revision back, run the job again",
            revision=step.revision,
        )
    return MigrationFailed(
        f"revision {step.revision} ({step.description}) failed and was rolled back: "
        f"{type(driver or error).__name__}: {message}",
        revision=step.revision,
    )
