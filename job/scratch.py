"""The throwaway copy of the database a rehearsal runs on (job.rehearse): made on the live
database's server (which needs CREATEDB) or on MIGRATE_REHEARSAL_URL's, filled from the newest
verified backup of the database when it is at the live database's revision, else from a fresh dump
streamed into it, and always dropped.

A copy is named `migrate_job_rehearsal_<set>_<run id>` (<set>: the live database's backup set,
job.backup.set_of) and held, for as long as its rehearsal runs, by an advisory lock keyed on its
name, on the session that made it. A copy whose lock nobody holds is one a killed rehearsal left
(SIGKILL runs no clean-up): the next rehearsal of the database drops it.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
import time
from typing import Any, Iterator, NamedTuple

from psycopg2 import sql

from job import archive, backup, children, db, logs, plan, tables
from job.config import Database, Settings, parse_lock_key
from job.errors import BackupFailed, ConfigError, first_line
from job.logs import log

PREFIX = "migrate_job_rehearsal_"


class Copy(NamedTuple):
    """A copy made: its name, how env.py and the job reach it, what it was filled from."""

    name: str
    database: Database
    source: str


def prefix_of(live: Any) -> str:
    """The names of this live database's copies begin so."""
    return f"{PREFIX}{backup.set_of(db.server_identity(live), db.database_name(live))}_"


@contextlib.contextmanager
def made(settings: Settings, live: Any) -> Iterator[Copy]:
    """A copy of the database `live` is on, dropped when the body ends, however it ends."""
    server_settings = settings.rehearsal_server
    server = db.connect(server_settings.connect_kwargs(settings.application_name)) if server_settings else live
    where = server_settings or settings.database
    name = f"{prefix_of(live)}{logs.run_id()}"
    copy = Copy(name, where._replace(params={**where.params, "dbname": name}), "")
    try:
        with server.cursor() as cur:
            cur.execute("SELECT pg_advisory_lock(%s)", (parse_lock_key(name),))
        _drop_leftovers(server, prefix_of(live))
        _create(server, live, name)
        try:
            started = time.monotonic()
            copy = copy._replace(source=_fill(settings, live, copy, same_server=server_settings is None))
            log.info("rehearsal.copy", database=name, source=copy.source, seconds=round(time.monotonic() - started, 3))
            yield copy
        finally:
            with db.cleaning_up():
                _drop(server, name)
    finally:
        if server is not live:
            server.close()
        elif not live.closed:
            with contextlib.suppress(Exception), live.cursor() as cur:
                cur.execute("SELECT pg_advisory_unlock(%s)", (parse_lock_key(name),))


def _create(server: Any, live: Any, name: str) -> None:
    """An empty database with the live one's encoding and locale."""
    with live.cursor() as cur:
        cur.execute("SELECT pg_encoding_to_char(encoding), datcollate, datctype FROM pg_database "
                    "WHERE datname = current_database()")
        encoding, collate, ctype = cur.fetchone()
    try:
        with server.cursor() as cur:
            cur.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0 ENCODING {} LC_COLLATE {} LC_CTYPE {}").format(
                sql.Identifier(name), sql.Literal(encoding), sql.Literal(collate), sql.Literal(ctype)))
    except Exception as e:
        if db.sqlstate(e) == "42501":  # insufficient_privilege
            raise ConfigError(f"rehearse cannot make its copy: {first_line(e)}. Give the role CREATEDB, or "
                              "name a server where it has it in MIGRATE_REHEARSAL_URL") from None
        if db.sqlstate(e) is not None and not db.received_signal():
            raise ConfigError(f"rehearse cannot make its copy {name}: {first_line(e)}") from None
        raise
    log.info("rehearsal.created", database=name)


def _drop(server: Any, name: str) -> None:
    """Drop the copy (ending any session still on it): on the server session, or a new one if a
    signal's cancel left that unusable."""
    statement = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
    try:
        with server.cursor() as cur:
            cur.execute(statement)
    except Exception:
        fresh = db.connect(server.connect_kwargs)
        try:
            with fresh.cursor() as cur:
                cur.execute(statement)
        finally:
            fresh.close()
    log.info("rehearsal.dropped", database=name)


def _drop_leftovers(server: Any, prefix: str) -> None:
    """Drop the copies of this database that no running rehearsal holds."""
    with server.cursor() as cur:
        cur.execute("SELECT datname FROM pg_database WHERE starts_with(datname, %s)", (prefix,))
        names = [row[0] for row in cur.fetchall()]
        for name in names:
            cur.execute("SELECT pg_try_advisory_lock(%s)", (parse_lock_key(name),))
            if not cur.fetchone()[0]:
                continue  # another rehearsal's, still running
            try:
                cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
                log.info("rehearsal.leftover_dropped", database=name, reason="a rehearsal that was killed left it")
            finally:
                cur.execute("SELECT pg_advisory_unlock(%s)", (parse_lock_key(name),))


def _fill(settings: Settings, live: Any, copy: Copy, same_server: bool) -> str:
    """Fill the copy; return what from: a backup's path, or "dump"."""
    found = _backup_at_current(settings, live) if same_server else None
    if found is not None:
        store, name, meta = found
        try:
            backup.restore(copy.database, store, name, meta["sha256"], settings.application_name, os.environ,
                           cancel_lock_waits=lambda _session: 0, clearing="")
            return store.path_of(name)
        except BackupFailed as e:
            log.warning("rehearsal.backup_unusable", path=store.path_of(name), error=str(e))
            _empty(settings, copy)
    _dump_into(settings, live, copy, same_server)
    return "dump"


def _backup_at_current(settings: Settings, live: Any) -> tuple[Any, str, dict[str, Any]] | None:
    """The newest backup of the live database that was taken at its current revision (a backup
    holds the database as it was before the change it was taken for: its `from_revision`), checked
    against its sidecar (the restore checks its sha256 as it reads it); None if there is none."""
    try:
        current = sorted(plan.current_revisions(live, settings.version_table))
        store = backup.store(settings)
        listed = backup.listing(store, db.database_name(live),
                                backup.set_of(db.server_identity(live), db.database_name(live)))
        for meta in listed:
            if sorted(meta.get("from_revision") or []) == current and current:
                return backup.verified(store, meta["path"])
    except (BackupFailed, ConfigError, OSError) as e:
        log.info("rehearsal.no_backup", reason=str(e))
    return None


def _empty(settings: Settings, copy: Copy) -> None:
    """What a restore that failed half-way left (it runs in one transaction: nothing, normally)."""
    conn = db.connect(copy.database.connect_kwargs(settings.application_name))
    try:
        clearing = backup.clearing_sql(conn, None)
        if clearing:
            with conn.cursor() as cur:
                cur.execute(clearing)
    finally:
        conn.close()


def _dump_into(settings: Settings, live: Any, copy: Copy, same_server: bool) -> None:
    """pg_dump of the live database streamed into pg_restore on the copy, in one transaction. On
    another server the roles may not exist: the copy's objects are then the rehearsal's role's."""
    own = tables.of(settings.history_table)
    dump_argv = [backup.tool("pg_dump"), "--format=custom", "--compress=0",  # (a pipe: compressing is only work)
                 *backup.dump_options(settings.database, f"{settings.application_name}/rehearsal",
                                      settings.lock_timeout, own)]
    load_argv = [backup.tool("pg_restore"), "--single-transaction", "--exit-on-error", "--no-password",
                 *([] if same_server else ["--no-owner", "--no-privileges"]),
                 f"--dbname={copy.database.conninfo_without_password(settings.application_name)}"]
    dump_errors, load_errors = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    dump = children.spawn(dump_argv, env=backup.child_env(settings.database, os.environ), stdout=subprocess.PIPE,
                          stderr=dump_errors)
    load = children.spawn(load_argv, env=backup.child_env(copy.database, os.environ), stdin=dump.stdout,
                          stdout=subprocess.DEVNULL, stderr=load_errors)
    dump.stdout.close()  # (pg_restore holds the pipe's reading end: pg_dump sees it close if pg_restore stops)
    try:
        while load.poll() is None or dump.poll() is None:
            time.sleep(0.05)
    except BaseException:
        for child in (dump, load):
            child.kill()
            child.wait()
        raise
    finally:
        with dump_errors, load_errors:
            problems = [(tool, archive.written(errors)) for tool, child, errors in
                        (("pg_dump", dump, dump_errors), ("pg_restore", load, load_errors)) if child.returncode]
    if problems:
        tool, stderr = problems[0]
        raise BackupFailed(f"rehearse could not copy the database ({tool}): {archive.first_error(stderr)}")
