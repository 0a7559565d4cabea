"""Alembic, driven on the connection that holds the lock, one revision per transaction.

Alembic hands the work to the project's env.py. Ours takes the shared connection from
`config.attributes["connection"]` (the Alembic cookbook's "sharing a connection" recipe); a stock
`alembic init` env.py ignores it and builds its own engine from `sqlalchemy.url`, which we fill in
with the driver the user named. Either way env.py runs once for the pending revisions, is made to
give each a transaction of its own, and hands them out one at a time (`Stepper`), so the job logs
and records each as it commits.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import inspect
import io
import logging.config
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import alembic
import psycopg2
from alembic.config import Config
from alembic.runtime.environment import EnvironmentContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.pool import StaticPool

from job import commits, db, lineage, lock, logs, manifest, plan
from job.alembic_files import AlembicFiles
from job.config import Database, Settings
from job.errors import ConfigError, Interrupted, JobError, MigrationFailed, RevisionError, first_line
from job.history import History
from job.logs import log
from job.plan import Step, VersionTable
from job.wait import connected, session_options


LONG_TRANSACTIONS_SQL = """
SELECT pid, application_name, state, xact_start FROM pg_stat_activity
WHERE datname = current_database() AND pid <> pg_backend_pid() AND xact_start IS NOT NULL
  AND backend_type = 'client backend' AND application_name NOT LIKE 'migrate-job/%'
ORDER BY xact_start LIMIT 5
"""


class Project:
    """An Alembic project: its config and scripts, loaded once, and the connection env.py should use.

    `database` is what env.py's own engines connect to (the URL in the driver the user named);
    `session` the settings every session env.py opens gets, through a connect hook on every
    SQLAlchemy engine, async ones included (whatever URL or engine env.py builds)."""

    def __init__(self, files: AlembicFiles, database: Database | None = None, raw_connection: Any | None = None,
                 session: Mapping[str, str] | None = None, sections: tuple[tuple[str, Database], ...] = ()) -> None:
        self.files = files
        self.config = _config(files)
        if database is not None:
            # configparser interpolation would read a URL-encoded password's % as a reference
            self.config.set_main_option("sqlalchemy.url", database.sqlalchemy_url().replace("%", "%%"))
            os.environ.update(database.driver_environment())
        else:  # offline: env.py only needs a dialect
            self.config.set_main_option("sqlalchemy.url", "postgresql+psycopg2://")
        for section, named in sections:  # a multidb env.py's engines (MIGRATE_DATABASES)
            self.config.set_section_option(section, "sqlalchemy.url", named.sqlalchemy_url().replace("%", "%%"))
            os.environ.update(named.driver_environment())
        self.config.attributes["configure_logger"] = False
        sessions.start(session or {}, [_identity(raw_connection)] if raw_connection is not None else None)
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
        # (revision, upgrade or downgrade) -> how it ends its transaction, if it does
        self._endings: dict[tuple[str, str], commits.Ending | None] = {}

    def connection(self) -> Any:
        """A SQLAlchemy connection over the raw psycopg2 connection (the one holding the lock)."""
        if self._connection is None and self.raw_connection is not None:
            raw = self.raw_connection
            raw.autocommit = False
            engine = create_engine("postgresql+psycopg2://", creator=lambda: raw, poolclass=StaticPool)
            self._connection = engine.connect()
            self.config.attributes["connection"] = self._connection
        return self._connection

    def allow(self, connections: list[Any]) -> None:
        """Let env.py also connect to the databases of these (locked) connections."""
        if sessions.expected is not None:
            sessions.expected.extend(_identity(conn) for conn in connections)

    def locate(self) -> VersionTable:
        """Ask env.py where its version table is, as `alembic current` does (changing nothing).

        env.py may set `version_table` / `version_table_schema` in code: only running it tells.
        (Every connection it opens meanwhile is checked to be on the locked database: `_Sessions`.)"""
        seen: list[VersionTable] = []

        def found(rev: Any, context: Any) -> list[Any]:
            seen.append(VersionTable(context.version_table, context.version_table_schema))
            return []

        try:
            self.run_env(found, dont_mutate=True)
        except ConfigError:
            raise
        except Exception as e:
            raise ConfigError(f"the Alembic environment (env.py) failed: {type(e).__name__}: {first_line(e)}"
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
        for revision in self.unknown(current):
            raise RevisionError(
                f"the database is at revision {revision!r}, which these migration scripts do not "
                "know as a revision id: it was migrated by newer code, the scripts are missing a revision, "
                "or the version table holds a name rather than an id"
            )
        self.validate_target(target)

    def unknown(self, current: tuple[str, ...]) -> list[str]:
        """The revisions the database is at that these scripts do not have (as ids)."""
        found = []
        for revision in current:
            try:
                script = self.script.get_revision(revision)
            except Exception:
                script = None
            if script is None or script.revision != revision:  # `head`, a branch label, a partial id
                found.append(revision)
        return found

    def validate_target(self, target: str) -> None:
        """Refuse an ambiguous `head`, or a target the scripts lack."""
        heads = self.heads()
        if target == "head" and len(heads) > 1:
            raise RevisionError(
                f"the migration scripts have {len(heads)} heads ({', '.join(heads)}) and the target is "
                "'head': merge them (alembic merge heads) or set MIGRATE_TARGET"
            )
        self.targets(target)

    def targets(self, target: str) -> tuple[str, ...]:
        """The revision ids `target` stands for (`head`, `heads`, an id, a branch label; none for base)."""
        try:
            return tuple(s.revision for s in self.script.get_revisions(target) if s is not None)
        except Exception:
            raise ConfigError(f"MIGRATE_TARGET {target!r} is not a revision of these scripts") from None

    def plan(self, current: tuple[str, ...], target: str, recorded: plan.Recorded = lambda: None,
             allow_ahead: bool = True) -> plan.Plan:
        """Validate the database against the scripts and list the pending revisions; a database
        ahead of the scripts is judged by its recorded lineage (job.lineage)."""
        self.validate_target(target)
        if self.unknown(current):
            ahead = lineage.ahead_of(current, self.lineage(), self.targets(target), recorded(), allow_ahead)
            return plan.Plan(current=current, target=target, heads=self.heads(), ahead=plan.steps_of(ahead))
        return plan.Plan(current=current, target=target, heads=self.heads(), pending=self.steps(current, target))

    def lineage(self) -> dict[str, lineage.Revision]:
        """The scripts' revision graph as job.lineage records it: each revision, what must be applied
        before it (parents and `depends_on`), its description, and whether it breaks the previous
        release's code (its module's `breaks_previous_release`)."""
        return {
            s.revision: lineage.Revision(s.revision, tuple(s._all_down_revisions), s.doc or "",
                                         _breaking(getattr(s.module, lineage.MARKER, None)))
            for s in self.script.walk_revisions()
        }

    def _revs(self, direction: str, target: str, current: tuple[str, ...]) -> list[Any]:
        # ScriptDirectory._upgrade_revs / _downgrade_revs are what alembic.command.upgrade and
        # downgrade themselves run.
        revs = self.script._upgrade_revs if direction == "upgrade" else self.script._downgrade_revs
        try:
            return revs(target, current)
        except CommandError as e:
            hint = "to go back, use `migrate-job downgrade`" if direction == "upgrade" else "to go forward, use run"
            raise ConfigError(f"cannot {direction} from {', '.join(current) or 'base'} to {target!r}: {e} ({hint})") from None

    def run_env(self, fn: Callable[[Any, Any], Any], as_sql: bool = False,
                on_version_apply: Callable[..., None] | None = None, **kw: Any) -> None:
        """Run the project's env.py once with `fn` choosing the steps (and `on_version_apply` hearing of
        each version row written); env.py never reconfigures logging."""
        if not as_sql:
            self.connection()
        with owned_logging(), _environment(self.config, self.script, on_version_apply, fn=fn, as_sql=as_sql, **kw):
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

    def transaction_endings(self, steps: list[Step], direction: str) -> dict[str, commits.Ending]:
        """The pending revisions that end their own transaction, and how (read from their source,
        once per revision and direction: the refusal before the run and the run itself both ask)."""
        function = "upgrade" if direction == "upgrade" else "downgrade"
        for step in steps:
            if (step.revision, function) not in self._endings:
                try:
                    source = Path(self.script.get_revision(step.revision).path).read_text(encoding="utf-8")
                except (OSError, UnicodeDecodeError):
                    source = ""  # a sourceless (.pyc) revision: nothing to read
                self._endings[step.revision, function] = commits.ending(source, step.revision, function) if source else None
        return {s.revision: e for s in steps if (e := self._endings[s.revision, function])}

    def refuse_unsafe_endings(self, steps: list[Step], direction: str) -> None:
        """Refuse, before anything runs, a revision that ends its transaction in a way a re-run
        could not complete after a failure (job.commits)."""
        unsafe = [e for e in self.transaction_endings(steps, direction).values() if e.problem]
        if unsafe:
            raise ConfigError(
                "; ".join(f"revision {e.revision} cannot be run safely: {e.problem}" for e in unsafe)
                + f" (if it failed after that, a re-run could not complete it). Instead: {commits.ADVICE}"
            )

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
        """End whatever transaction is open on the job's session, through the shared connection
        or not (reads included: a transaction begun before env.py created the version table would
        not see it, even in READ COMMITTED: PostgreSQL takes in catalog changes at transaction start)."""
        if self._connection is not None:
            with contextlib.suppress(Exception):
                self._connection.rollback()
        if self.raw_connection is not None and not self.raw_connection.closed:
            self.raw_connection.rollback()

    def close(self) -> None:
        """Roll back what is open on the shared connection, and end every session env.py left open
        (an interrupted revision's psycopg 3 or asyncpg session is still running its statement)."""
        if self._connection is not None:
            with contextlib.suppress(Exception):
                self._connection.rollback()
            self.config.attributes.pop("connection", None)
            self._connection = None
            if not self.raw_connection.closed:
                self.raw_connection.rollback()
                self.raw_connection.autocommit = True
        if self.raw_connection is not None and not self.raw_connection.closed:
            sessions.end_leftovers(self.raw_connection)


def _breaking(marker: Any) -> str | None:
    """A revision's `breaks_previous_release`: True, or the reason, means older code must stop."""
    if not marker:
        return None
    return marker.strip() if isinstance(marker, str) and marker.strip() else f"marked {lineage.MARKER}"


def _environment(config: Config, script: ScriptDirectory, on_version_apply: Callable[..., None] | None,
                 **kw: Any) -> EnvironmentContext:
    """The context env.py configures: whatever it passes, every revision gets a transaction of its
    own (`transaction_per_migration`), so that a failure leaves the database at the last revision
    that committed and the job can report each one (see `Stepper`). (Wrapped on the instance: the
    `alembic.context` module proxy is set up for EnvironmentContext itself, not for subclasses.)"""
    environment = EnvironmentContext(config, script, **kw)
    configure = environment.configure

    def per_migration(*args: Any, **options: Any) -> None:
        callbacks = list(options.get("on_version_apply") or ())
        if on_version_apply is not None:
            callbacks.append(on_version_apply)
        configure(*args, **{**options, "transaction_per_migration": True, "on_version_apply": callbacks})

    environment.configure = per_migration  # type: ignore[method-assign]
    return environment


def _config(files: AlembicFiles) -> Config:
    """Alembic's Config for alembic.ini and/or pyproject.toml (the latter needs Alembic 1.16+)."""
    if files.toml is not None and files.toml_alembic:
        if "toml_file" not in inspect.signature(Config).parameters:
            raise ConfigError(f"{str(files.toml)!r} configures Alembic in [tool.alembic], which needs Alembic 1.16 "
                              f"or newer (installed: {alembic.__version__})")
        return Config(file_=str(files.ini) if files.ini else None, toml_file=str(files.toml))
    return Config(str(files.ini))


class _Sessions:
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
                f"env.py connects to {_describe(*identity)}, but the job has locked and backed up only "
                f"{' and '.join(_describe(*e) for e in self.expected)}: env.py must take DATABASE_URL "
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


sessions = _Sessions()


# Which database a session is on: its name, and the server (started once, at one instant).
IDENTITY_COLUMNS = "current_database(), pg_postmaster_start_time()::text, inet_server_addr()::text, inet_server_port()"


def _identity(conn: Any) -> tuple[Any, ...]:
    with conn.cursor() as cur:
        cur.execute(f"SELECT {IDENTITY_COLUMNS}")
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
    history: History | None = None,
    version_table: VersionTable | None = None,
    rows_within: bool = True,
    confirm_lock: Callable[[], None] | None = None,
) -> None:
    """Apply `steps` (upgrade or downgrade) one per transaction, logging each and recording it in
    `history`; raise MigrationFailed naming the one that failed.

    env.py runs once for all of them (a long history would otherwise pay for env.py, its engine and
    its first connection once per revision), and is handed them one at a time (`Stepper`). A
    revision whose DDL gave up waiting for a table lock (`lock_timeout`) is retried with backoff:
    the application's transactions go first, and the migration tries again when they have moved on.
    """
    pending = list(steps)
    retried: dict[str, int] = {}
    endings = project.transaction_endings(pending, direction)
    while pending:
        stepper = Stepper(project, pending, target, direction, history, endings, rows_within, confirm_lock)
        try:
            project.run_env(stepper, on_version_apply=stepper.applied)
        except Interrupted:
            stepper.failed("interrupted", None)
            stepper.clean_up()
            raise
        except (Exception, SystemExit, KeyboardInterrupt) as e:  # a revision's sys.exit() is its failure
            stepper.clean_up()
            step = stepper.running
            if step is None and not stepper.done and db.received_signal() is None and not isinstance(
                    e, (MigrationFailed, ConfigError)):
                raise ConfigError(
                    f"the Alembic environment (env.py) failed before revision {pending[0].revision} could run: "
                    f"{type(e).__name__}: {first_line(e)}{_async_hint(e)}"
                ) from None
            if isinstance(e, JobError) and not isinstance(e, MigrationFailed):
                raise  # the job's own verdict (a refused connection, a lost lock), not the revision's
            if step is not None and _is_lock_timeout(e) and retried.get(step.revision, 0) < lock_retries:
                retried[step.revision] = retried.get(step.revision, 0) + 1
                _back_off(project, step, retried[step.revision], lock_retries, e)
                pending = pending[len(stepper.done):]
                continue
            failure = e if isinstance(e, MigrationFailed) else _failure(step or pending[0], e, project)
            stepper.failed("interrupted" if isinstance(failure, Interrupted) else "failed", str(failure))
            raise failure from None
        stepper.committed_by_env_py(version_table)
        if not stepper.done:
            raise MigrationFailed(f"env.py ran no migration (revision {pending[0].revision} is still pending): "
                                  "does it call context.run_migrations()?", revision=pending[0].revision)
        pending = pending[len(stepper.done):]


class Stepper:
    """The `fn` env.py's MigrationContext pulls revisions from: one at a time, so that the job
    regains control between them. Alembic asks for the next revision only once the previous one's
    transaction has ended (`MigrationContext.run_migrations`); the job makes every env.py give each
    revision a transaction of its own (`transaction_per_migration`, see `_environment`), and checks
    that it did commit before reporting it done. An env.py that holds one transaction of its own
    around all of them gets one revision per run instead, committed when env.py ends it."""

    def __init__(self, project: Project, pending: list[Step], target: str, direction: str,
                 history: History | None, endings: Mapping[str, commits.Ending], rows_within: bool = True,
                 confirm_lock: Callable[[], None] | None = None) -> None:
        self.project, self.pending, self.target, self.direction, self.history = project, pending, target, direction, history
        self.endings, self.rows_within, self.confirm_lock = endings, rows_within, confirm_lock
        self.done: list[Step] = []
        self.running: Step | None = None
        self._started = (0.0, dt.datetime.now(dt.timezone.utc))
        self._recorded = False
        # INVALID indexes before a revision that ends its own transaction ran (job.commits)
        self._invalid_before: set[tuple[str, str]] | None = None

    def __call__(self, rev: Any, context: Any) -> Iterator[Any]:
        planned = self.project._revs(self.direction, self.target, rev)
        if [s.revision.revision for s in planned[:1]] != [self.pending[0].revision]:
            raise MigrationFailed(
                f"the database moved while we held the lock: expected {self.pending[0].revision} next, found "
                f"{', '.join(rev) or 'base'} (did env.py connect to another database, or a revision commit on its own?)",
                revision=self.pending[0].revision)
        return self._one_at_a_time(planned, context)

    def _one_at_a_time(self, planned: list[Any], context: Any) -> Iterator[Any]:
        for script_step, step in zip(planned, self.pending):
            db.raise_if_signalled()  # a signal that landed between revisions: no next one
            if step != self.running:  # (a multidb env.py asks again for each of its databases)
                if self.confirm_lock is not None:
                    self.confirm_lock()  # never run a revision on a lock the server has taken back
                log.info("migration.start", revision=step.revision, description=step.description,
                         direction=self.direction)
                self.running, self._started = step, (time.monotonic(), dt.datetime.now(dt.timezone.utc))
                self._recorded = False
            self._invalid_before = None
            if step.revision in self.endings and self.project.raw_connection is not None:
                self._invalid_before = commits.invalid_indexes(self.project.raw_connection)
            connection = context.connection
            before = connection.get_transaction() if connection is not None else None
            yield script_step
            # The revision's transaction has ended, as far as Alembic knows. One still open is either
            # env.py's own, held around every revision (it commits it when it ends it), or one the
            # revision began after committing Alembic's (`op.get_bind().commit()`): that one holds
            # the rest of the revision and its version row, and nobody else will commit it.
            after = connection.get_transaction() if connection is not None else None
            if after is not None and after.is_active:
                if after is before:
                    return
                connection.commit()
            self._committed()

    def committed_by_env_py(self, version_table: VersionTable | None) -> None:
        """env.py returned after its own transaction held the running revision: check it committed."""
        if self.running is None:
            return
        raw = self.project.raw_connection
        if version_table is not None and raw is not None:
            self.project.rollback()  # what env.py left open on the shared connection is not committed
            current = plan.current_revisions(raw, version_table)
            if (self.running.revision in current) != (self.direction == "upgrade"):
                step, self.running = self.running, None
                raise MigrationFailed(f"env.py ended without committing revision {step.revision} "
                                      f"({step.description}): the database is at {', '.join(current) or 'base'}",
                                      revision=step.revision)
        self._committed()

    def clean_up(self) -> None:
        """After the running revision failed: drop the INVALID indexes it left (job.commits)."""
        raw = self.project.raw_connection
        if self._invalid_before is None or raw is None or raw.closed:
            return
        self.project.rollback()
        try:
            with db.autocommit(raw):
                dropped = commits.drop_left_behind(raw, self._invalid_before)
        except psycopg2.Error as e:
            log.warning("migration.cleanup_failed", error=first_line(e))
            return
        if dropped:
            log.info("migration.cleanup", revision=self.running and self.running.revision, dropped=dropped,
                     reason="INVALID indexes the failed revision left (a failed CREATE INDEX CONCURRENTLY)")

    def applied(self, ctx: Any, **_: Any) -> None:
        """Alembic's on_version_apply: the running revision's version row is written, its transaction
        not yet committed. Its history row goes into that same transaction.

        Every revision but the last commits without waiting for its WAL to reach disk
        (`synchronous_commit` off for that transaction only): the last one's commit, synchronous,
        flushes them all before the run reports success. Each commit is still atomic and seen by
        everyone at once; only a server crash in the middle of the run could take back the newest
        of them, and then the run fails too (its connection is lost) and the next one applies them
        again. On a long history this saves most of the cost of one transaction per revision
        (`make bench`: 300 revisions)."""
        if self.running is None:
            return
        defer = "PERFORM set_config('synchronous_commit', 'off', true);" if self.running != self.pending[-1] else ""
        if self.history is not None and self.rows_within:
            started, started_at = self._started
            self._recorded = self.history.revision_within(ctx.connection, self.running.revision, self.direction,
                                                          started_at, time.monotonic() - started, prelude=defer)
        if defer and not self._recorded:
            db.execute_literal(ctx.connection, "SELECT set_config('synchronous_commit', 'off', true)")

    def _committed(self) -> None:
        step, (started, started_at) = self.running, self._started
        seconds = time.monotonic() - started
        if self.history is not None and not self._recorded:
            self.history.revision(step.revision, self.direction, started_at, seconds, "applied")
        log.info("migration.done", revision=step.revision, description=step.description, direction=self.direction,
                 seconds=round(seconds, 3))
        self.done.append(step)
        self.running = None

    def failed(self, outcome: str, error: str | None) -> None:
        """The running revision rolled back (or was never started): record how."""
        if self.running is not None and self.history is not None:
            started, started_at = self._started
            self.history.revision(self.running.revision, self.direction, started_at, time.monotonic() - started,
                                  outcome, error)


def _back_off(project: Project, step: Step, attempt: int, retries: int, error: BaseException) -> None:
    """Wait before trying a revision that timed out on a table lock again: exponential from 0.5 s,
    capped at 10 s, full jitter, so that the application's transactions go first."""
    delay = random.uniform(0, min(10.0, 0.5 * 2 ** attempt))
    log.warning("migration.retry", revision=step.revision, attempt=attempt, retries=retries, next_in=round(delay, 3),
                error=first_line(db.root_error(error)), blockers=project.long_transactions())
    time.sleep(delay)


def _is_lock_timeout(error: BaseException) -> bool:
    return db.received_signal() is None and db.sqlstate(error) == db.LOCK_NOT_AVAILABLE


def _failure(step: Step, error: Exception, project: Project) -> BaseException:
    """Tell a signal's cancel from a revision's own failure, and say what state the database is in
    (for every driver: the job's psycopg2 session, or env.py's psycopg 3 or asyncpg)."""
    signum = db.received_signal()
    code = db.sqlstate(error)
    if signum is not None and (code == db.QUERY_CANCELED or not isinstance(error, Exception) or db.is_disconnect(error)):
        return Interrupted(signum)
    cause = db.root_error(error)
    message = first_line(cause)
    if code == db.LOCK_NOT_AVAILABLE:
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
    if db.is_disconnect(error):
        return MigrationFailed(
            f"revision {step.revision} ({step.description}) lost its connection: {message}; "
            "the server rolled the revision back, run the job again",
            revision=step.revision,
        )
    return MigrationFailed(
        f"revision {step.revision} ({step.description}) failed and was rolled back: "
        f"{type(cause).__name__}: {message}",
        revision=step.revision,
    )


# --- what every command that loads Alembic shares ---------------------------------------------

@contextlib.contextmanager
def project_of(settings: Settings, conn: Any | None) -> Iterator[Project]:
    """The Alembic project; with `conn`, env.py migrates on that connection (the one holding the lock)."""
    settings.database.check_driver_installed()
    project = Project(settings.alembic, settings.database, conn, session_options(settings), settings.sections)
    for _, database in settings.other_databases:  # env.py may connect to these too
        with connected(settings._replace(database=database)) as other:
            project.allow([other])
    try:
        yield project
    finally:
        project.close()


def plan_for(settings: Settings, conn: Any, project: Project, version_table: plan.VersionTable,
             current: tuple[str, ...] | None = None) -> plan.Plan:
    """The plan from `current` (what the database is at, read when not given), by Alembic; a database
    at revisions the scripts lack is judged by its recorded lineage."""
    if current is None:
        current = plan.current_revisions(conn, version_table)
    return project.plan(current, settings.target, lineage.recorded(settings, conn, version_table),
                        settings.allow_ahead)


def apply_steps(settings: Settings, conn: Any, project: Project, steps: list[Step], target: str, direction: str,
                record: History, version_table: VersionTable, rows_within: bool = True) -> None:
    """Apply the steps, each in its own transaction, with our session's timeouts, into the history
    (a revision's row inside its transaction, unless env.py migrates several databases), the lock
    confirmed before each."""
    key = lock.key_of(settings, conn)
    apply(project, steps, target, direction, settings.lock_retries, record, version_table, rows_within,
          confirm_lock=lambda: lock.confirm(conn, key))


def verify(settings: Settings, conn: Any, project: Project, version_table: VersionTable,
           direction: str = "upgrade", target: str | None = None, others: list[lock.Other] = ()) -> None:
    """Read the version table again: the database (and every other one env.py migrates) must now be at the target."""
    project.close()
    lock.confirm(conn, lock.key_of(settings, conn))
    current = plan.current_revisions(conn, version_table)
    plan.refuse_out_of_step(conn, others, version_table, current, f"after the {direction}, run the job again")
    left = project.steps(current, target or settings.target, direction)
    if left:
        raise MigrationFailed(
            f"after the {direction}, the database is at {', '.join(current) or 'base'} with "
            f"{len(left)} revision(s) still to go: {', '.join(s.revision for s in left)}"
        )


def plan_run(settings: Settings, conn: Any, project: Project, version_table: VersionTable, others: list[lock.Other],
             scripts: manifest.Scripts | None, known: manifest.Known | None) -> plan.Plan:
    """`run`'s plan, by Alembic, under the exclusive lock: every other database env.py migrates at
    the same revision, what Alembic said recorded (`record_scripts`), the plan logged, and its
    revisions' transaction endings checked before anything runs."""
    the_plan = plan_for(settings, conn, project, version_table)
    plan.refuse_out_of_step(conn, others, version_table, the_plan.current,
                            "restore the one that moved alone, or bring it to the same revision by hand")
    record_scripts(settings, conn, project, version_table, the_plan, scripts, known)
    plan.log_plan(the_plan)
    project.refuse_unsafe_endings(list(the_plan.pending), "upgrade")
    return the_plan


def record_scripts(settings: Settings, conn: Any, project: Project, version_table: VersionTable,
                   the_plan: plan.Plan, scripts: manifest.Scripts | None, known: manifest.Known | None) -> None:
    """Record what Alembic said of these scripts (their heads, for the next start's fast path;
    their revision graph, for older code meeting this database), before anything is applied.
    Older code has nothing to add to what newer code recorded."""
    if the_plan.ahead:
        return
    manifest.learned(settings, conn, scripts, known, manifest.Known(the_plan.heads, version_table))
    lineage.record_scripts(settings, conn, project.lineage().values(), version_table)
