"""Alembic, driven on the connection that holds the lock, one revision per transaction.

Alembic hands the work to the project's env.py. Ours takes the shared connection from
`config.attributes["connection"]` (the Alembic cookbook's "sharing a connection" recipe); a stock
`alembic init` env.py ignores it and builds its own engine from `sqlalchemy.url`, which we fill in
with the driver the user named. Either way env.py runs once for the pending revisions, is made to
give each a transaction of its own, and hands them out one at a time (`Stepper`), so the job logs
and records each as it commits.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import io
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import alembic
import psycopg2
from alembic.config import Config
from alembic.runtime.environment import EnvironmentContext
from alembic.script import ScriptDirectory
from alembic.script.revision import RevisionMap
from alembic.util import CommandError
from sqlalchemy import Connection, create_engine
from sqlalchemy.pool import StaticPool

from job import commits, db, lineage, lock, logs, manifest, plan, stepper, watchdog
from job.alembic_files import AlembicFiles
from job.config import Database, Settings
from job.errors import ConfigError, LoopsOverSchemas, MigrationFailed, RevisionError, first_line
from job.history import History
from job.logs import log
from job.plan import Step, VersionTable
from job.sessions import identity, sessions
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
                 session: Mapping[str, str] | None = None, sections: tuple[tuple[str, Database], ...] = (),
                 schema: str | None = None) -> None:
        self.files = files
        # a tenant's schema (MIGRATE_TENANT_SCHEMA): where its version table is, unless env.py says
        self.schema = schema
        self.config = _config(files)
        if database is not None:
            # configparser interpolation would read a URL-encoded password's % as a reference
            self.config.set_main_option("sqlalchemy.url", database.sqlalchemy_url().replace("%", "%%"))
            os.environ.update(database.driver_environment())
        else:  # offline: env.py only needs a dialect
            self.config.set_main_option("sqlalchemy.url", "postgresql+psycopg2://")
        self._multidb = bool(sections)
        for section, named in sections:  # a multidb env.py's engines (MIGRATE_DATABASES)
            self.config.set_section_option(section, "sqlalchemy.url", named.sqlalchemy_url().replace("%", "%%"))
            os.environ.update(named.driver_environment())
        self.config.attributes["configure_logger"] = False
        sessions.start(session or {}, [identity(raw_connection)] if raw_connection is not None else None)
        try:
            with logs.project_code():
                self.script = ScriptDirectory.from_config(self.config)
        except Exception as e:
            raise ConfigError(
                f"the Alembic project in {str(files.main)!r} cannot be loaded: {type(e).__name__}: {e}"
            ) from None
        self._load_revisions()
        # where the scripts are as the config files say; env.py may move them (`_follow_env_py`)
        self._configured = _whereabouts(self.script)
        self.raw_connection = raw_connection
        self._connection: Any = None
        self._version_table: VersionTable | None = None
        # the version table env.py last configured (for a failure before it ran anything)
        self._configured_table: VersionTable | None = None
        self._lineage: dict[str, lineage.Revision] | None = None
        # (revision, upgrade or downgrade) -> how it ends its transaction, if it does
        self._endings: dict[tuple[str, str], commits.Ending | None] = {}

    def _load_revisions(self) -> None:
        """Import every revision file now, not mid-plan."""
        try:
            with logs.project_code():
                self.script.revision_map.heads
        except Exception as e:
            raise ConfigError(
                f"the Alembic project in {str(self.files.main)!r} cannot be loaded: {type(e).__name__}: {e}"
            ) from None

    def _follow_env_py(self) -> None:
        """Where env.py put the scripts: an env.py may set `context.script.version_locations` (or
        the script directory's other options) in code, as Prefect's does; Alembic reads revisions
        only when first asked, after env.py, so the plan must come from the same place."""
        now = _whereabouts(self.script)
        if now != self._configured:
            self._configured = now
            self.script.__dict__.pop("_version_locations", None)  # (memoized by Alembic 1.15+)
            self.script.revision_map = RevisionMap(self.script._load_revisions)
            self._endings.clear()
            self._lineage = None
            self._load_revisions()

    def locations(self) -> tuple[str, ...]:
        """The directories the revisions are read from, as env.py left them."""
        return tuple(str(p) for p in self.script._version_locations)

    def moved_locations(self) -> tuple[str, ...]:
        """The version locations, when env.py set them to other directories than the config files
        name (what the heads manifest and the database's record must also fingerprint); else ()."""
        configured = manifest.locations(self.files)
        if configured is not None and {str(p) for p in configured} == {os.path.realpath(p) for p in self.locations()}:
            return ()
        return tuple(os.path.realpath(p) for p in self.locations())

    def settle_offline(self) -> None:
        """With no database (lint --all, manifest): run env.py offline once, emitting nothing, so
        that the scripts are wherever it puts them. An env.py that has no offline mode leaves them
        where the config files say."""
        try:
            self._offline(lambda rev, ctx: [], None, "heads")
        except Exception:
            pass

    def connection(self) -> Any:
        """A SQLAlchemy connection over the raw psycopg2 connection (the one holding the lock)."""
        if self._connection is None and self.raw_connection is not None:
            raw = self.raw_connection
            raw.autocommit = False
            engine = create_engine("postgresql+psycopg2://", creator=lambda: raw, poolclass=StaticPool)
            engine._connection_cls = SharedConnection
            self._connection = engine.connect()
            self.config.attributes["connection"] = self._connection
        return self._connection

    def allow(self, connections: list[Any]) -> None:
        """Let env.py also connect to the databases of these (locked) connections."""
        if sessions.expected is not None:
            sessions.expected.extend(identity(conn) for conn in connections)

    def locate(self) -> VersionTable:
        """Ask env.py where its version table is, as `alembic current` does (changing nothing).

        env.py may set `version_table` / `version_table_schema` in code: only running it tells.
        (Every connection it opens meanwhile is checked to be on the locked database: `_Sessions`.)"""
        if self._version_table is not None:
            return self._version_table
        seen: list[VersionTable] = []
        schemas: list[str | None] = []  # (the schema of each turn: for an env.py that loops over them)

        def found(rev: Any, context: Any) -> list[Any]:
            seen.append(VersionTable(context.version_table, context.version_table_schema))
            schemas.append(context.version_table_schema or _current_schema(context.connection))
            return []

        try:
            self.run_env(found, dont_mutate=True)
        except ConfigError:
            raise
        except Exception as e:
            self.rollback()
            if self._configured_table is not None and self.raw_connection is not None:
                plan.current_revisions(self.raw_connection, self._configured_table)  # (a table that is not Alembic's: 7)
            raise ConfigError(f"the Alembic environment (env.py) failed: {type(e).__name__}: {first_line(e)}"
                              f"{stepper.async_hint(e)}") from None
        finally:
            self.rollback()
        if not seen and self.schema is not None:
            raise ConfigError(f"env.py ran no migrations in the tenant's schema {self.schema!r} "
                              "(MIGRATE_TENANT_SCHEMA): it configured every run for another schema (its "
                              "version_table_schema, or the connection's search path). With "
                              "MIGRATE_TENANT_SCHEMA_VIA=search_path the job sets the search path; an env.py that "
                              "sets its own needs x:KEY, and to read the schema from -x KEY")
        if not seen:
            raise ConfigError("env.py ran no migrations online (it never called context.run_migrations())")
        if len(seen) > 1 and not self._multidb:
            raise _loops_itself(seen, schemas)
        self._version_table = seen[0]
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

    def refuse_redundant(self, current: tuple[str, ...]) -> None:
        """Where Alembic cannot plan from the version table: refuse, before anything changes, rows on
        one line of history (one descends from the other, through its parents or what it depends
        on), saying so. (Alembic itself leaves such rows after some downgrades across depends_on, and
        plans from them: so this is asked only once its planning has failed.)"""
        graph = self.lineage()
        known = [c for c in current if c in graph]
        for newer in known:
            older = [c for c in known if c != newer and c in lineage.ancestry([newer], graph)]
            if older:
                raise RevisionError(
                    f"the version table holds {', '.join(older)} and {newer}, and {newer} comes after "
                    f"{', '.join(older)}: one line of history has two rows (added by hand, or by a tool that does "
                    f"not keep the table as Alembic does). Nothing was changed: delete the row(s) the schema is "
                    f"not at ({', '.join(older)}, if it is at {newer}), then run the job again")

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

    def at_heads(self) -> tuple[str, ...]:
        """What the version table holds once at every head: the heads, less those another head
        depends on (expand/contract branches: Alembic keeps only the dependent one)."""
        return lineage.at_heads(self.heads(), self.lineage())

    def validate_target(self, target: str) -> None:
        """Refuse scripts with no revision, an ambiguous `head`, or a target the scripts lack."""
        heads = self.heads()
        if not heads:
            raise ConfigError(
                f"no revision found where the scripts are ({', '.join(map(str, self.locations()))}): a run would migrate "
                f"nothing and leave the database as it is. Check script_location and version_locations in "
                f"{str(self.files.main)!r} (or what env.py sets in context.script.version_locations)")
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
        release's code (its module's `breaks_previous_release`). Read once (again only if env.py
        moves the scripts)."""
        if self._lineage is None:
            self._lineage = {
                s.revision: lineage.Revision(s.revision, tuple(s._all_down_revisions), s.doc or "",
                                             _breaking(getattr(s.module, lineage.MARKER, None)))
                for s in self.script.walk_revisions()
            }
        return self._lineage

    def _revs(self, direction: str, target: str, current: tuple[str, ...]) -> list[Any]:
        # ScriptDirectory._upgrade_revs / _downgrade_revs are what alembic.command.upgrade and
        # downgrade themselves run.
        revs = self.script._upgrade_revs if direction == "upgrade" else self.script._downgrade_revs
        try:
            return revs(target, current)
        except CommandError as e:
            self.refuse_redundant(current)
            hint = "to go back, use `migrate-job downgrade`" if direction == "upgrade" else "to go forward, use run"
            raise ConfigError(f"cannot {direction} from {', '.join(current) or 'base'} to {target!r}: {e} ({hint})") from None

    def run_env(self, fn: Callable[[Any, Any], Any], as_sql: bool = False,
                on_version_apply: Callable[..., None] | None = None, **kw: Any) -> None:
        """Run the project's env.py once with `fn` choosing the steps (and `on_version_apply` hearing of
        each version row written); then the job's signal handlers are its own again, and the
        scripts are wherever env.py put them."""
        if not as_sql:
            self.connection()
        environment = _environment(self.config, self.script, on_version_apply, self.schema, fn=fn, as_sql=as_sql, **kw)
        try:
            with logs.project_code(), environment:
                self.script.run_env()
        finally:
            db.keep_signal_handlers()
            self._follow_env_py()
            self._configured_table = environment.configured

    def offline_sql(self, current: tuple[str, ...], target: str) -> str:
        """The SQL `alembic upgrade --sql` would emit from `current` to `target`."""
        return self._offline(lambda rev, ctx: self._revs("upgrade", target, current),
                             current[0] if len(current) == 1 else None, target)

    def _offline(self, fn: Callable[[Any, Any], list[Any]], starting_rev: str | None, destination_rev: str) -> str:
        """Run env.py in offline (--sql) mode and return what it wrote. A revision that needs a live
        database to be written out (it reads rows through get_bind(), commits on it) is a
        configuration error naming it, not a traceback."""
        buffer = io.StringIO()
        self.config.output_buffer = buffer
        rendering: list[str] = []

        def one_by_one(rev: Any, context: Any) -> Iterator[Any]:
            for step in fn(rev, context):
                rendering[:] = [getattr(getattr(step, "revision", None), "revision", "?")]
                yield step
            rendering.clear()

        try:
            self.run_env(one_by_one, as_sql=True, starting_rev=starting_rev, destination_rev=destination_rev)
        except ConfigError:
            raise
        except Exception as e:
            where = f"revision {rendering[0]}" if rendering else "env.py"
            raise ConfigError(f"{where} cannot be written out as SQL without a database (offline, as `alembic "
                              f"upgrade --sql`): {type(e).__name__}: {first_line(e)}. It needs a live database "
                              "(it reads rows or commits through op.get_bind()): run it, or rehearse it, instead") from None
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
                source = source_of(self.script, step.revision)
                self._endings[step.revision, function] = commits.ending(source, step.revision, function) if source else None
        return {s.revision: e for s in steps if (e := self._endings[s.revision, function])}

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


class SharedConnection(Connection):
    """The locked session as env.py finds it in `config.attributes["connection"]`: a Connection (the
    cookbook's "sharing a connection"), and for an env.py that takes it to be an Engine, as
    pytest-alembic shares one (JupyterHub's `with connectable.connect() as connection:`), its own
    `connect()`, which lends this very connection. What env.py closes stays open: the session, and
    the lock on it, are the job's to end."""

    def connect(self) -> SharedConnection:
        return self

    def close(self) -> None:
        """(the job ends the session itself: `Project.close`)"""


def source_of(script: ScriptDirectory, revision: str) -> str:
    """A revision file's source; "" for a sourceless (.pyc) revision: nothing to read."""
    try:
        return Path(script.get_revision(revision).path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return ""


def _whereabouts(script: ScriptDirectory) -> tuple[Any, ...]:
    """What decides which revision files a script directory reads."""
    return (script.dir, tuple(script.version_locations or ()), script.recursive_version_locations, script.sourceless)


def _breaking(marker: Any) -> str | None:
    """A revision's `breaks_previous_release`: True, or the reason, means older code must stop."""
    if not marker:
        return None
    return marker.strip() if isinstance(marker, str) and marker.strip() else f"marked {lineage.MARKER}"


def _environment(config: Config, script: ScriptDirectory, on_version_apply: Callable[..., None] | None,
                 schema: str | None = None, **kw: Any) -> EnvironmentContext:
    """The context env.py configures: whatever it passes, every revision gets a transaction of its
    own (`transaction_per_migration`), so that a failure leaves the database at the last revision
    that committed and the job can report each one (see `Stepper`). (Wrapped on the instance: the
    `alembic.context` module proxy is set up for EnvironmentContext itself, not for subclasses.)"""
    environment = EnvironmentContext(config, script, **kw)
    configure, run_migrations = environment.configure, environment.run_migrations

    def per_migration(*args: Any, **options: Any) -> None:
        callbacks = list(options.get("on_version_apply") or ())
        if on_version_apply is not None:
            callbacks.append(on_version_apply)
        environment.elsewhere = schema is not None and _another_schema(options, schema)
        if environment.elsewhere:  # (configured as env.py asks, then passed over: `run_for_the_tenant`)
            configure(*args, **options)
            return
        if schema is not None and not options.get("version_table_schema"):
            # a tenant's version table in its schema, named so: the one the job reads and locks by,
            # whatever else the search path holds (where Alembic would create it on that path anyway)
            options["version_table_schema"] = schema
        environment.configured = VersionTable(options.get("version_table") or "alembic_version",
                                              options.get("version_table_schema"))
        configure(*args, **{**options, "transaction_per_migration": True, "on_version_apply": callbacks})

    def run_for_the_tenant(**kw: Any) -> None:
        """An env.py that loops over tenant schemas itself (Netflix Dispatch's shape) runs the
        migrations once per schema it finds; with a tenant's schema to migrate (MIGRATE_TENANT_SCHEMA,
        a fleet's entry), every other schema's turn is passed over, so that each run plans, locks,
        backs up and records that one tenant."""
        if not environment.elsewhere:
            run_migrations(**kw)

    environment.configure = per_migration  # type: ignore[method-assign]
    environment.run_migrations = run_for_the_tenant  # type: ignore[method-assign]
    environment.configured = None  # (the version table env.py configured, once it has: for errors)
    environment.elsewhere = False
    return environment


def _another_schema(options: Mapping[str, Any], schema: str) -> bool:
    """Whether env.py configured this turn for a schema other than the tenant's: by its version
    table's schema, else by the search path of the connection it passed. (Asked on that
    connection without leaving a transaction open that env.py did not have.)"""
    named = options.get("version_table_schema")
    if named:
        return named != schema
    current = _current_schema(options.get("connection"))
    return current is not None and current != schema


def _current_schema(connection: Any) -> str | None:
    """The schema first on the search path of env.py's connection (None: none, or no connection),
    asked without leaving a transaction open that env.py did not have."""
    if connection is None or not hasattr(connection, "exec_driver_sql"):
        return None
    began = not connection.in_transaction()
    current = connection.exec_driver_sql("SELECT current_schema()").scalar()
    if began:
        connection.rollback()
    return current


def _config(files: AlembicFiles) -> Config:
    """Alembic's Config for alembic.ini and/or pyproject.toml (the latter needs Alembic 1.16+), as
    `alembic -n SECTION -x ARG ... upgrade` makes it: env.py's `config.config_ini_section`,
    `context.get_x_argument()` and `config.cmd_opts` read what they would under the alembic CLI."""
    options = argparse.Namespace(config=str(files.main), name=files.section, x=list(files.x_args), raiseerr=False,
                                 quiet=False)
    if files.toml is not None and files.toml_alembic:
        if "toml_file" not in inspect.signature(Config).parameters:
            raise ConfigError(f"{str(files.toml)!r} configures Alembic in [tool.alembic], which needs Alembic 1.16 "
                              f"or newer (installed: {alembic.__version__})")
        return Config(file_=str(files.ini) if files.ini else None, toml_file=str(files.toml),
                      ini_section=files.section, cmd_opts=options)
    return Config(str(files.ini), ini_section=files.section, cmd_opts=options)


# --- what every command that loads Alembic shares ---------------------------------------------

def _loops_itself(seen: list[VersionTable], schemas: list[str | None]) -> ConfigError:
    """An env.py that runs the migrations more than once in one run (but for a multidb env.py's
    engines) loops over tenants itself, a schema each (Netflix Dispatch's shape), with a version
    table in each schema or the search_path alone. One run cannot follow it (it would take one
    version table for all of them, and call a tenant added later up to date); when each turn is in
    a schema of its own, those schemas are a fleet (LoopsOverSchemas: the CLI runs them so)."""
    tables = sorted({f"{t.schema}.{t.name}" if t.schema else f"{t.name} (on the search_path)" for t in seen})
    message = (f"env.py runs the migrations {len(seen)} times in one run (version tables: {', '.join(tables)}): it "
               "loops over tenants itself, one schema each. The job plans, locks, backs up and records one schema per "
               "run; nothing was changed. List the tenant schemas in MIGRATE_FLEET (for instance MIGRATE_FLEET=\""
               "query:SELECT nspname FROM pg_namespace WHERE nspname LIKE 'tenant%'\"), or name one in "
               "MIGRATE_TENANT_SCHEMA: each run then migrates that schema's turn of the loop alone (README: Many "
               "tenants)")
    distinct = list(dict.fromkeys(s for s in schemas if s is not None))
    if len(distinct) == len(schemas):
        return LoopsOverSchemas(message, distinct)
    return ConfigError(message)


@contextlib.contextmanager
def project_of(settings: Settings, conn: Any | None) -> Iterator[Project]:
    """The Alembic project; with `conn`, env.py migrates on that connection (the one holding the lock)."""
    settings.database.check_driver_installed()
    project = Project(settings.alembic, settings.database, conn, session_options(settings), settings.sections,
                      settings.tenant_schema)
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
                record: History, version_table: VersionTable, rows_within: bool = True,
                recovery: str = stepper.UNDO_BY_HAND) -> None:
    """Apply the steps, each in its own transaction, with our session's timeouts, into the history
    (a revision's row inside its transaction, unless env.py migrates several databases), the lock
    confirmed before each; `recovery` says how to get back if one fails having committed part of its work."""
    key = lock.key_of(settings, conn)
    holder = conn.server_pid or conn.get_backend_pid()
    with watchdog.Watchdog(conn.connect_kwargs or settings.database.connect_kwargs(settings.application_name),
                           holder, settings.progress_interval, settings.end_idle_blockers_after) as watching:
        stepper.apply(project, steps, target, direction, settings.lock_retries, record, version_table, rows_within,
                      confirm_lock=lambda: lock.confirm(conn, key), recovery=recovery,
                      lock_held=lock.held_sql(key, holder), watchdog=watching)


def verify(settings: Settings, conn: Any, project: Project, version_table: VersionTable,
           undone: list[Step] = (), others: list[lock.Other] = ()) -> None:
    """Read the version table again: the database (and every other one env.py migrates) must now be
    at the target; after a downgrade, none of the `undone` revisions may still be applied (a revision
    another branch depends on stays, as Alembic leaves it)."""
    project.close()
    lock.confirm(conn, lock.key_of(settings, conn))
    direction = "downgrade" if undone else "upgrade"
    current = plan.current_revisions(conn, version_table)
    plan.refuse_out_of_step(conn, others, version_table, current, f"after the {direction}, run the job again")
    if undone:
        applied = set(lineage.ancestry(current, project.lineage()))
        left = [s for s in undone if s.revision in applied]
    else:
        left = project.steps(current, settings.target, direction)
    if left:
        raise MigrationFailed(
            f"after the {direction}, the database is at {', '.join(current) or 'base'} with "
            f"{len(left)} revision(s) still to go: {', '.join(s.revision for s in left)}"
        )


def refuse_missing_schema(settings: Settings, conn: Any) -> None:
    """A tenant's schema (MIGRATE_TENANT_SCHEMA) must be there: the job does not create one (a mistyped
    name would become a tenant), and its revisions would create their tables nowhere."""
    if settings.tenant_schema is None:
        return
    with conn.cursor() as cur:
        cur.execute("SELECT EXISTS (SELECT FROM pg_namespace WHERE nspname = %s)", (settings.tenant_schema,))
        if not cur.fetchone()[0]:
            raise ConfigError(f"the schema {settings.tenant_schema!r} (MIGRATE_TENANT_SCHEMA) is not in the database "
                              f"{db.database_name(conn)!r}: create it first (CREATE SCHEMA), or correct the name "
                              "(in MIGRATE_FLEET, a tenant database is database:NAME or a URL)")


def plan_run(settings: Settings, conn: Any, project: Project, version_table: VersionTable, others: list[lock.Other],
             scripts: manifest.Scripts | None, known: manifest.Known | None) -> plan.Plan:
    """`run`'s plan, by Alembic, under the exclusive lock: every other database env.py migrates at
    the same revision, what Alembic said recorded (`record_scripts`), the plan logged, and its
    revisions' transaction endings checked before anything runs."""
    refuse_missing_schema(settings, conn)
    the_plan = plan_for(settings, conn, project, version_table)
    plan.refuse_out_of_step(conn, others, version_table, the_plan.current,
                            "restore the one that moved alone, or bring it to the same revision by hand")
    record_scripts(settings, conn, project, version_table, the_plan, scripts, known)
    plan.log_plan(the_plan)
    warn_nonatomic(project, list(the_plan.pending), "upgrade")
    return the_plan


def warn_nonatomic(project: Project, steps: list[Step], direction: str) -> None:
    """Say, before anything runs, which of `steps` end their transaction in a shape where a failure
    after the commit would leave committed work a plain re-run trips over (job.commits)."""
    for ending in project.transaction_endings(steps, direction).values():
        if ending.problem:
            log.warning("migration.nonatomic", revision=ending.revision, direction=direction, reason=ending.problem,
                        if_it_fails="the run stops with exit 6 naming what the revision committed, and how to get "
                                    "back (the backup this run takes)")


def record_scripts(settings: Settings, conn: Any, project: Project, version_table: VersionTable,
                   the_plan: plan.Plan, scripts: manifest.Scripts | None, known: manifest.Known | None) -> None:
    """Record what Alembic said of these scripts (their heads, for the next start's fast path;
    their revision graph, for older code meeting this database), before anything is applied.
    Older code has nothing to add to what newer code recorded."""
    if the_plan.ahead:
        return
    manifest.learned(settings, conn, scripts, known, known_of(project, version_table))
    lineage.record_scripts(settings, conn, project.lineage().values(), version_table)


def known_of(project: Project, version_table: VersionTable) -> manifest.Known:
    """What the fast path needs to know of these scripts: the version table at their heads, where
    it is, and the version locations env.py moved them to (fingerprinted), if it did."""
    moved = project.moved_locations()
    return manifest.Known(project.at_heads(), version_table, moved,
                          manifest.fingerprint_locations(moved) if moved else "")
