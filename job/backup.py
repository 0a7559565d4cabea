"""Backups with pg_dump: argument lists, the password in the environment, verified before
anything migrates, pruned by one rule; kept in a store: a directory (job.directory) or an
S3-compatible bucket (job.bucket), which both promise that a backup's name holds a complete
archive or nothing.

A store offers: str() (where it is), path_of(name), locate(what an operator typed), ready() (what
can be checked before a request), names(), read/write/delete/size(name), free_space() (None: no limit), chunks(name) (a stream
of its bytes), remove_partials(matches) and dump(name, pg_dump argv, env, spawn, pg_restore,
prepare, compression method) -> archive.Read.
A backup is its archive and a JSON sidecar beside it (the archive's name + ".json"), written
only once the archive is complete and verified.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple

from psycopg2 import sql

from job import archive, children, compression, credentials, db, tables
from job.archive import first_error
from job.config import S3_SCHEME, Database, Settings, milliseconds, parse_s3
from job.errors import BackupFailed, DumpExited, RestoreFailed
from job.logs import log

CHUNK = 1 << 20  # bytes passed at a time between the archive and pg_restore
SIDECAR = ".json"


class Backup(NamedTuple):
    """A verified backup and its sidecar's content."""

    path: str
    database: str
    from_revision: list[str]
    to_revision: list[str]
    created_at: str
    bytes: int
    sha256: str
    seconds: float
    pg_dump_version: str
    server_version: int
    # the backup set: one database on one server (a volume may hold several sets)
    set: str = ""
    # order within the set, counted under the lock: clocks and names may lie
    sequence: int = 0
    # the migration it preceded succeeded (written after the run)
    succeeded: bool = False
    # how the archive is compressed (job.compression): zstd:LEVEL, a zstd frame around a
    # custom-format archive; gzip:LEVEL (older backups have no field: pg_dump's default), none
    compression: str = "gzip:6"
    # a tenant's schema (MIGRATE_TENANT_SCHEMA): the backup holds that schema alone, and a restore
    # replaces that schema alone (None: the whole database)
    schema: str | None = None


# what a sidecar must hold to be taken for one of ours
SIDECAR_FIELDS = ("database", "from_revision", "to_revision", "created_at", "sha256")


# Anything of the database's own: relations (tables, views, sequences…), functions, types other
# than tables' row types, extensions beyond the built-in plpgsql. The job's own tables (job.tables),
# their sequences and indexes do not count, nor does the job's own schema.
NOTHING_TO_BACK_UP_SQL = """
WITH own AS (SELECT to_regclass(t) AS oid FROM unnest(%(own)s::text[]) t)
SELECT NOT EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                   WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', %(schema)s) AND n.nspname NOT LIKE 'pg\\_%%'
                     AND (%(only)s::text IS NULL OR n.nspname = %(only)s::text)
                     AND c.oid NOT IN (SELECT oid FROM own WHERE oid IS NOT NULL)
                     AND c.oid NOT IN (SELECT d.objid FROM pg_depend d JOIN own ON d.refobjid = own.oid)
                     AND c.oid NOT IN (SELECT i.indexrelid FROM pg_index i JOIN own ON i.indrelid = own.oid))
   AND NOT EXISTS (SELECT 1 FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                   WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%%'
                     AND (%(only)s::text IS NULL OR n.nspname = %(only)s::text))
   AND NOT EXISTS (SELECT 1 FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
                   WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%%'
                     AND (%(only)s::text IS NULL OR n.nspname = %(only)s::text)
                     AND t.typtype IN ('b', 'd', 'e', 'r', 'm') AND t.typelem = 0)
   AND NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname <> 'plpgsql' AND %(only)s::text IS NULL)
"""


def nothing_to_back_up(conn: Any, own: tables.Own | None, only: str | None = None) -> bool:
    """Whether the database (with `only`, that tenant's schema) holds nothing of its own (a first
    deploy): its backup could restore nothing."""
    with conn.cursor() as cur:
        cur.execute(NOTHING_TO_BACK_UP_SQL, {
            "own": [t.identifier().as_string(conn) for t in own.all()] if own else [],
            "schema": own.schema if own and own.own_schema else "", "only": only})
        return bool(cur.fetchone()[0])


def server_too_new(stderr: str, server_version_num: int) -> BackupFailed | None:
    """pg_dump refuses a server of a newer major version than its own ("aborting because of server
    version mismatch", right after it connects): say what to install instead."""
    if "server version mismatch" not in stderr:
        return None
    server_major = server_version_num // 10000 if server_version_num >= 100000 else server_version_num // 100
    return BackupFailed(
        f"pg_dump is older than the server ({_detail(stderr)}): install "
        f"postgresql-client-{server_major} or newer in the image (build argument PG_MAJOR)"
    )


def _detail(stderr: str) -> str:
    """The text of the first DETAIL line, else the first error."""
    found = re.search(r"(?im)detail:\s*(.*)$", stderr)
    return found.group(1).strip() if found else first_error(stderr)


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise BackupFailed(f"{name} not found on PATH: install postgresql-client, or set MIGRATE_BACKUP=off")
    return path


def child_env(database: Database, env: Mapping[str, str]) -> dict[str, str]:
    """The environment for pg_dump/pg_restore/psql: ours, less our URL, plus PGPASSWORD (fresh from
    its source, job.credentials, at each spawn)."""
    child = {k: v for k, v in env.items() if k not in ("DATABASE_URL", "DATABASE_URL_FILE")}
    password = database.password if database.password is not None else credentials.password_for(database.params)
    if password is not None:
        child["PGPASSWORD"] = password
    return child


def set_of(server: str, database: str, schema: str | None = None) -> str:
    """The backup set of one database on one server (or of one tenant's schema in it): 8 hex
    characters, in names and sidecars. Each set is kept and pruned on its own."""
    scope = f"/{schema}" if schema is not None else ""
    return hashlib.sha256(f"{server}/{database}{scope}".encode()).hexdigest()[:8]


def file_name(moment: dt.datetime, database: str, set_key: str, from_revision: list[str], to_revision: list[str]) -> str:
    """Timestamp first, so a plain listing sorts by time; the set key tells one database's files from another's."""
    def part(revs: list[str]) -> str:
        return "+".join(revs) or "base"

    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{database}_{set_key}_{part(from_revision)}_to_{part(to_revision)}")
    return f"{moment.strftime('%Y%m%dT%H%M%S.%fZ')}_{safe}.dump"


# a backup file's name as file_name writes it, with or without (older versions) a set key
NAME = re.compile(r"^\d{8}T\d{6}\.\d{6}Z_[A-Za-z0-9_.-]+\.dump$")


def store_for(location: str, env: Mapping[str, str], addressing: str = "auto") -> Any:
    """The store MIGRATE_BACKUP_DIR names (config checked it): `s3://bucket/prefix`, else a
    directory. One per location in a run, so a bucket's client is made once."""
    key = (location, addressing)
    if key not in _stores:
        if location.startswith(S3_SCHEME):
            from job.bucket import Bucket

            _stores[key] = Bucket(parse_s3(location), env, addressing)
        else:
            from job.directory import Directory

            _stores[key] = Directory(Path(location))
    return _stores[key]


_stores: dict[tuple[str, str], Any] = {}


def take(
    store: Any,
    database: Database,
    database_name: str,
    server_version: int,
    from_revision: list[str],
    to_revision: list[str],
    keep: int,
    application_name: str,
    env: Mapping[str, str],
    lock_wait_timeout: float = 300,
    own: tables.Own | None = None,
    set_key: str = "",
    wait_timeout: float = 0,
    method: compression.Method = compression.parse(compression.DEFAULT),
    schema: str | None = None,
) -> Backup:
    """Dump the database into the store, verify it, write the sidecar, prune the set (`prune`)."""
    pg_dump, pg_restore = tool("pg_dump"), tool("pg_restore")
    store.ready()
    moment = dt.datetime.now(dt.timezone.utc)
    name = file_name(moment, database_name if schema is None else f"{database_name}.{schema}", set_key,
                     from_revision, to_revision)
    log.info("backup.start", path=store.path_of(name), database=database_name)
    started = time.monotonic()
    argv = [pg_dump, "--format=custom", method.pg_dump_option(),
            *dump_options(database, application_name, lock_wait_timeout, own),
            # (quoted: the schema's name as it is, not a pattern folded to lower case)
            *([f'--schema="{schema}"'] if schema is not None else [])]
    earlier = listing(store, database_name, set_key)
    coming = {"path": store.path_of(name), "from_revision": from_revision, "to_revision": to_revision}

    def prepare() -> None:
        remove_leftovers(store, set_key, name)
        make_room(store, coming, earlier, keep)

    try:
        dumped = _dump(store, name, argv, lambda: child_env(database, env), pg_restore, server_version, wait_timeout,
                       prepare=prepare, method=method)
    except BackupFailed as e:
        raise _no_room(e, store, earlier, keep) or e from None
    try:
        sequence = 1 + max((b.get("sequence") or 0 for b in earlier), default=0)
        backup = Backup(
            path=store.path_of(name),
            database=database_name,
            from_revision=from_revision,
            to_revision=to_revision,
            created_at=moment.isoformat(),
            bytes=dumped.size,
            sha256=dumped.sha256,
            seconds=round(time.monotonic() - started, 3),
            pg_dump_version=archive.dumped_by(dumped.listing),
            server_version=server_version,
            set=set_key,
            sequence=sequence,
            compression=str(method),
            schema=schema,
        )
        store.write(name + SIDECAR, _json(backup._asdict()))
    except BaseException:
        with contextlib.suppress(BackupFailed):
            store.delete(name)
        raise
    log.info("backup.done", path=backup.path, bytes=backup.bytes, seconds=backup.seconds, sha256=backup.sha256)
    prune(store, [backup._asdict(), *earlier], keep)  # (the set as listed, without reading it again)
    return backup


def _no_room(error: BackupFailed, store: Any, earlier: list[dict[str, Any]], keep: int) -> BackupFailed | None:
    """A backup that ran out of space, said with the sizes: what is free, and what retention keeps."""
    if "no space left" not in str(error).lower():
        return None
    kept = [b for b in earlier if b not in expendable(earlier, keep)]
    return BackupFailed(
        f"{error}: the backup volume {store} has {store.free_space()} bytes free after making room within "
        f"MIGRATE_BACKUP_KEEP={keep}; the {len(kept)} backup(s) retention keeps hold "
        f"{sum(b.get('bytes') or 0 for b in kept)} bytes, the newest {(earlier[0].get('bytes') if earlier else 0)}. "
        "Give the volume more room, or lower MIGRATE_BACKUP_KEEP")


def dump_options(database: Database, application_name: str, lock_wait_timeout: float,
                 own: tables.Own | None) -> list[str]:
    """pg_dump's options for a dump of the application's database (a backup's, a rehearsal's copy's)."""
    return [
        "--no-password",
        # pg_dump takes a share lock on every table: never wait forever behind an app's transaction
        # (0 would mean "wait forever" to pg_dump, where MIGRATE_LOCK_TIMEOUT=0 means "try once")
        f"--lock-wait-timeout={max(milliseconds(lock_wait_timeout), 1)}",
        # the job's own history is not the application's data: a restore must not rewind it
        # (and its id sequence, which pg_restore --clean would otherwise try to drop from under it)
        *_excluded(own),
        f"--dbname={database.conninfo_without_password(application_name)}",
    ]


def _excluded(own: tables.Own | None) -> list[str]:
    """pg_dump's options that leave the job's own tables out (with their sequences): the job's
    schema whole, and each table where it may stand beside the application's."""
    if own is None:
        return []
    options = [f"--exclude-schema={own.schema}"] if own.own_schema else []
    return options + [f"--exclude-table={name}" for table in own.all()
                      for name in (str(table), f"{table}_id_seq")]


def _dump(store: Any, name: str, argv: list[str], environment: Callable[[], dict[str, str]], pg_restore: str,
          server_version: int, wait_timeout: float, prepare: Callable[[], None],
          method: compression.Method) -> archive.Read:
    """pg_dump into the store (which calls `prepare` before the first byte is written); while the
    server has no connection slot for it, try again within MIGRATE_WAIT_TIMEOUT. `environment` is
    asked at each spawn: a kept password the server refused (rotated since) is asked for afresh once."""
    deadline = time.monotonic() + wait_timeout
    refreshed = False
    while True:
        try:
            return store.dump(name, argv, environment(), children.spawn, pg_restore, prepare, method)
        except DumpExited as e:
            if e.returncode < 0:
                killer = signal.Signals(-e.returncode).name
                raise BackupFailed(f"pg_dump was killed by {killer}" + (
                    " (the file size limit)" if killer == "SIGXFSZ" else "")) from None
            if not refreshed and credentials.stale(e.stderr):
                refreshed = True
                continue
            if not _server_full(e.stderr) or time.monotonic() >= deadline:
                raise server_too_new(e.stderr, server_version) or BackupFailed(
                    f"pg_dump failed: {first_error(e.stderr)}") from None
            log.info("backup.retry", error=first_error(e.stderr))
            time.sleep(min(1.0, max(deadline - time.monotonic(), 0)))


def mark_succeeded(store: Any, path: str) -> None:
    """Note in its sidecar that the migration this backup preceded succeeded (see `prune`)."""
    name = path.rsplit("/", 1)[-1] + SIDECAR
    try:
        meta = json.loads(store.read(name) or b"")
        store.write(name, _json({**meta, "succeeded": True}))
    except (OSError, ValueError, BackupFailed) as e:
        log.warning("backup.unmarked", path=path, error=str(e))


def verified(store: Any, given: str) -> tuple[Any, str, dict[str, Any]]:
    """The store and name of the backup an operator names (`store.locate`), and its sidecar: one of
    ours, its size that of the archive. Its sha256 is checked as `restore` reads it."""
    store, name = store.locate(given)
    path = store.path_of(name)
    content = store.read(name + SIDECAR)
    if content is None:
        raise RestoreFailed(f"no backup {path!r} with a sidecar ({name}{SIDECAR}) to check it against")
    meta = _parsed(content)
    if meta is None:
        raise RestoreFailed(f"the sidecar of {path!r} is not one of ours: not JSON with {', '.join(SIDECAR_FIELDS)}")
    size = store.size(name)
    if size is None:
        raise RestoreFailed(f"no backup {path!r}: its sidecar is there, the archive is not")
    if size != meta.get("bytes", size):
        raise RestoreFailed(f"backup {path!r} holds {size} bytes, its sidecar says {meta['bytes']}: "
                            "it is damaged or was changed; not restoring")
    return store, name, meta


def restore(database: Database, store: Any, name: str, sha256: str, application_name: str, env: Mapping[str, str],
            cancel_lock_waits: Callable[[str], int], clearing: str) -> None:
    """Bring the database back to exactly the state the backup holds, in one transaction: all of
    it, or no change at all.

    `pg_restore --clean` drops only what is in the archive, so what later migrations added (a
    table, a type, a foreign key onto a restored table, an extension) would stay or block the
    drops. So psql runs, in a single transaction, `clearing` (drops everything the database holds
    besides the job's own tables: `clearing_sql`) and then the archive's script as pg_restore
    writes it, streamed (a dump may be larger than memory, or in a bucket).

    The archive streams from the store into pg_restore and is hashed on the way; psql ends its
    transaction (at the end of its input) only once the whole archive matched `sha256`: a damaged
    backup changes nothing.

    Dropping takes exclusive locks, and every application query would queue behind a restore
    waiting for one. The archive's script sets lock_timeout to 0 itself, so while it runs
    `cancel_lock_waits(its application_name)` is called every 0.2 s to cancel a statement of it
    that has waited too long; the transaction then undoes everything.
    """
    pg_restore, psql = tool("pg_restore"), tool("psql")
    session = f"{application_name}/restore"[:63]
    child = child_env(database, env)
    # (stderr in files: a NOTICE per dropped object could fill a pipe nobody reads yet)
    script_errors, psql_errors = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    script = children.spawn([pg_restore, "--clean", "--if-exists", "--file=-"], env=child, stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE, stderr=script_errors)
    runner = children.spawn(
        [psql, "--no-psqlrc", "--quiet", "--single-transaction", "--set=ON_ERROR_STOP=1", "--file=-",
         f"--dbname={database.conninfo_without_password(session)}"],
        env=child, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=psql_errors)
    read: dict[str, Any] = {}  # what pump found: the archive's sha256, or why it could not read it
    unread = ""  # why pg_restore could not read the archive, if it could not
    done = threading.Event()  # the restore is over: stop reading the archive

    def pump() -> None:
        """The archive from the store into pg_restore, decompressed (job.compression), hashed as
        stored; read to its end even if pg_restore stops or the archive does not decompress, so
        that damage is named as such."""
        writing = True
        try:
            with store.chunks(name) as chunks:
                stream = archive.Hashed(chunks)
                try:
                    for piece in compression.decoded(stream):
                        if done.is_set():
                            return
                        if writing:
                            try:
                                script.stdin.write(piece)
                            except BrokenPipeError:
                                writing = False
                except compression.Undecodable as e:
                    read["undecodable"] = str(e)
                for _ in stream:  # (what pg_restore did not need, or what did not decompress)
                    if done.is_set():
                        return
                read["sha256"] = stream.rest()
        except Exception as e:
            read["error"] = str(e)
        finally:
            with contextlib.suppress(BrokenPipeError):
                script.stdin.close()

    def feed() -> None:
        """Write `clearing`, then the archive's script, into psql; end its input (which commits)
        only once pg_restore read the whole archive and it matched its sha256."""
        nonlocal unread
        try:
            runner.stdin.write(RESTORE_SETTINGS.encode() + clearing.encode() + b"\n")
            while chunk := script.stdout.read(CHUNK):
                runner.stdin.write(chunk)
            source.join()
            if script.wait() != 0:
                unread = first_error(archive.written(script_errors))
            if unread or read.get("sha256") != sha256 or "undecodable" in read:
                runner.kill()  # psql never saw the end of its input: the transaction rolls back
                return
            runner.stdin.close()
        except BrokenPipeError:
            pass  # psql stopped at an error: its stderr says which

    source = threading.Thread(target=pump, daemon=True)
    feeder = threading.Thread(target=feed, daemon=True)
    source.start()
    feeder.start()
    cancelled = 0
    try:
        while True:
            try:
                runner.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                cancelled += cancel_lock_waits(session)
    except BaseException:
        runner.kill()
        runner.wait()
        raise
    finally:
        done.set()
        script.kill()
        feeder.join(timeout=5)
        source.join(timeout=5)
        script.wait()
        script_errors.close()
    path = store.path_of(name)
    if "error" in read:
        raise RestoreFailed(f"cannot read backup {path!r}, the database is unchanged: {read['error']}")
    if read.get("sha256") not in (None, sha256):
        raise RestoreFailed(f"backup {path!r} does not match its sidecar's sha256: it is damaged or was changed; "
                            "the database is unchanged")
    if "undecodable" in read:
        raise RestoreFailed(f"backup {path!r} is damaged, the database is unchanged: {read['undecodable']}")
    if unread:
        raise RestoreFailed(f"pg_restore could not read the backup, the database is unchanged: {unread}")
    if runner.returncode != 0:
        why = " (it waited longer than MIGRATE_LOCK_TIMEOUT for a table lock)" if cancelled else ""
        with psql_errors:
            stderr = archive.written(psql_errors)
        raise RestoreFailed(f"the restore failed, the database is unchanged{why}: {first_error(stderr)}")


# The restore's own session: its index and constraint builds (most of a restore after the data)
# sort in maintenance_work_mem, 64 MB by default; 1 GB (never less than the server gives) lets
# them sort in memory (by hand on a 1.2 GB database: 16.9 s instead of 20.9 s). One index is built
# at a time, so that is the most this session asks for.
RESTORE_SETTINGS = """SELECT set_config('maintenance_work_mem', '1GB', false)
 WHERE pg_size_bytes(current_setting('maintenance_work_mem')) < pg_size_bytes('1GB');
"""


def archive_database(store: Any, name: str, sha256: str) -> str | None:
    """The database the archive itself says it was dumped from (its table of contents' header).
    An archive whose table of contents does not read is checked against its sidecar's `sha256`,
    to say whether it was damaged (it does not match) or was never a pg_dump archive."""
    try:
        with store.chunks(name) as chunks:
            return archive.dumped_from(archive.read(chunks, tool("pg_restore"), {}, whole=False).listing)
    except BackupFailed as e:
        with store.chunks(name) as chunks:
            damaged = archive.Hashed(chunks).rest() != sha256
        if damaged:
            raise RestoreFailed(f"backup {store.path_of(name)!r} does not match its sidecar's sha256: it is damaged "
                                "or was changed; the database is unchanged") from None
        raise RestoreFailed(f"backup {store.path_of(name)!r} cannot be restored, the database is unchanged: {e}") from None


# Everything of the database's own, as DROP statements: schemas other than public (with what is in
# them), extensions, then in the schemas left the relations, routines and types that are not the
# job's own or an extension's, and every large object. Run before the archive's script, in its transaction.
CLEARING_SQL = """
WITH kept AS (  -- the job's own tables, and the sequences they own
    SELECT c.oid FROM pg_class c WHERE c.oid = ANY(%(kept)s::regclass[])
    UNION SELECT d.objid FROM pg_depend d WHERE d.refobjid = ANY(%(kept)s::regclass[]) AND d.classid = 'pg_class'::regclass
),
user_schemas AS (
    SELECT oid, nspname FROM pg_namespace
    WHERE nspname NOT IN ('pg_catalog', 'information_schema') AND nspname NOT LIKE 'pg\\_%%'
),
kept_schemas AS (SELECT DISTINCT relnamespace AS oid FROM pg_class WHERE oid IN (SELECT oid FROM kept)),
extension_owned AS (SELECT objid FROM pg_depend WHERE deptype = 'e'),
-- sequences of serial and identity columns go with their table (an identity's cannot be dropped alone)
column_owned AS (SELECT objid FROM pg_depend WHERE classid = 'pg_class'::regclass AND refclassid = 'pg_class'::regclass
                 AND refobjsubid > 0 AND deptype IN ('a', 'i'))
SELECT format('DROP SCHEMA IF EXISTS %%I CASCADE;', nspname) FROM user_schemas
 WHERE nspname <> 'public' AND oid NOT IN (SELECT oid FROM kept_schemas)
UNION ALL
SELECT format('DROP EXTENSION IF EXISTS %%I CASCADE;', extname) FROM pg_extension WHERE extname <> 'plpgsql'
UNION ALL
SELECT format('DROP %%s IF EXISTS %%I.%%I CASCADE;',
              CASE c.relkind WHEN 'v' THEN 'VIEW' WHEN 'm' THEN 'MATERIALIZED VIEW' WHEN 'S' THEN 'SEQUENCE'
                             WHEN 'f' THEN 'FOREIGN TABLE' ELSE 'TABLE' END, n.nspname, c.relname)
  FROM pg_class c JOIN user_schemas n ON n.oid = c.relnamespace
 WHERE c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f') AND c.oid NOT IN (SELECT oid FROM kept)
   AND c.oid NOT IN (SELECT objid FROM extension_owned) AND c.oid NOT IN (SELECT objid FROM column_owned)
   AND (n.nspname = 'public' OR n.oid IN (SELECT oid FROM kept_schemas))
UNION ALL
SELECT format('DROP ROUTINE IF EXISTS %%I.%%I(%%s) CASCADE;', n.nspname, p.proname, pg_get_function_identity_arguments(p.oid))
  FROM pg_proc p JOIN user_schemas n ON n.oid = p.pronamespace
 WHERE p.oid NOT IN (SELECT objid FROM extension_owned) AND (n.nspname = 'public' OR n.oid IN (SELECT oid FROM kept_schemas))
UNION ALL
SELECT format('DROP %%s IF EXISTS %%I.%%I CASCADE;', CASE t.typtype WHEN 'd' THEN 'DOMAIN' ELSE 'TYPE' END, n.nspname, t.typname)
  FROM pg_type t JOIN user_schemas n ON n.oid = t.typnamespace
 WHERE t.typtype IN ('e', 'd', 'r', 'm', 'b') AND t.typelem = 0 AND t.oid NOT IN (SELECT objid FROM extension_owned)
   AND (n.nspname = 'public' OR n.oid IN (SELECT oid FROM kept_schemas))
UNION ALL
SELECT format('SELECT pg_catalog.lo_unlink(%%s);', oid) FROM pg_largeobject_metadata
UNION ALL
SELECT format('DROP TYPE IF EXISTS %%I.%%I CASCADE;', n.nspname, t.typname)
  FROM pg_type t JOIN user_schemas n ON n.oid = t.typnamespace JOIN pg_class c ON c.oid = t.typrelid
 WHERE t.typtype = 'c' AND c.relkind = 'c' AND (n.nspname = 'public' OR n.oid IN (SELECT oid FROM kept_schemas))
"""


def clearing_sql(conn: Any, own: tables.Own | None, schema: str | None = None) -> str:
    """DROP statements for everything the database holds besides the job's own tables (and its
    schema); for a backup of one tenant's schema, that schema (the archive creates it again)."""
    if schema is not None:
        return sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE;").format(sql.Identifier(schema)).as_string(conn)
    kept_tables = [t.identifier().as_string(conn) for t in own.all()] if own else []
    with conn.cursor() as cur:
        cur.execute("SELECT array_agg(t) FROM unnest(%s::text[]) t WHERE to_regclass(t) IS NOT NULL", (kept_tables,))
        kept = cur.fetchone()[0] or []
        cur.execute(CLEARING_SQL, {"kept": kept})
        return "\n".join(row[0] for row in cur.fetchall())


def listing(store: Any, database_name: str | None = None, set_key: str | None = None) -> list[dict[str, Any]]:
    """Sidecars of the backups in the store (optionally of one database, and of one set), newest
    first. Anything else there (other files, sidecars that are not ours) is passed over with a
    warning: a backup store is input like any other."""
    found = []
    names = set(store.names())
    for side in sorted(n for n in names if n.endswith(".dump" + SIDECAR)):
        dump = side[: -len(SIDECAR)]
        meta = _parsed(store.read(side) or b"") if NAME.match(dump) else None
        if meta is None:
            if (str(store), side) not in _ignored:  # once per run, however often the store is read
                _ignored.add((str(store), side))
                log.warning("backup.ignored", path=store.path_of(side), reason="not a backup sidecar of ours")
            continue
        if database_name is not None and meta["database"] != database_name:
            continue
        if set_key is not None and meta.get("set", set_key) != set_key:  # (older sidecars have no set)
            continue
        found.append({**meta, "path": store.path_of(dump)})  # the path is where it is, not what the sidecar says
    return sorted(found, key=_newest_first)


_ignored: set[tuple[str, str]] = set()


def _parsed(content: bytes) -> dict[str, Any] | None:
    """A sidecar's content, if it is one of ours: a JSON object with every field we write and read."""
    try:
        meta = json.loads(content)
    except (ValueError, UnicodeDecodeError):
        return None
    return meta if isinstance(meta, dict) and all(field in meta for field in SIDECAR_FIELDS) else None


def _json(meta: dict[str, Any]) -> bytes:
    return (json.dumps(meta, indent=2) + "\n").encode()


def _newest_first(meta: dict[str, Any]) -> tuple[int, str]:
    """By the set's sequence number (counted under the lock); older sidecars without one come
    after them, by time."""
    sequence = meta.get("sequence")
    return -(sequence if isinstance(sequence, int) else 0), _descending(str(meta.get("created_at", "")))


def _descending(text: str) -> str:
    """A key that sorts `text` descending inside an ascending sort."""
    return "".join(chr(0x10FFFF - ord(c)) for c in text)


def expendable(backups: list[dict[str, Any]], keep: int) -> list[dict[str, Any]]:
    """The backups of one set (`backups`: as `listing` gives them, newest first) that are no longer
    a way back, newest first. Kept are: the newest (just taken); the newest backup of each migration
    (the same from and to revisions: a retry replaces its own earlier backup) until `keep` are kept;
    and, whatever `keep` says, the first backup taken since the last migration that succeeded: the
    way back from a migration that keeps failing."""
    if not backups:
        return []
    since_success = []
    for meta in backups:
        if meta.get("succeeded"):
            break
        since_success.append(meta)
    kept = {backups[0]["path"], *([since_success[-1]["path"]] if since_success else [])}
    regular: list[str] = []
    seen = set()
    for meta in backups:
        migration = (tuple(meta["from_revision"]), tuple(meta["to_revision"]))
        if migration[0] != migration[1] and migration in seen:
            continue  # an older attempt at the same migration
        seen.add(migration)
        if len(regular) < keep:
            regular.append(meta["path"])
    kept.update(regular)
    return [meta for meta in backups if meta["path"] not in kept]


def prune(store: Any, backups: list[dict[str, Any]], keep: int) -> None:
    """Delete the backups of one set that are no longer a way back (`expendable`). Only backups
    found in the store by name are deleted: the sidecar first, so that a backup listed is never half gone."""
    for meta in expendable(backups, keep):
        _delete(store, meta, "no longer a way back")


def _delete(store: Any, meta: dict[str, Any], reason: str) -> None:
    name = meta["path"].rsplit("/", 1)[-1]
    store.delete(name + SIDECAR)
    store.delete(name)
    log.info("backup.pruned", path=store.path_of(name), reason=reason)


# the room a new backup is taken to need: its set's newest, and some for growth
GROWTH = 1.25


def make_room(store: Any, coming: dict[str, Any], earlier: list[dict[str, Any]], keep: int) -> None:
    """Before a backup is written to a volume sized for MIGRATE_BACKUP_KEEP of them: if the free
    space is less than the set's newest backup needs (GROWTH), delete now, oldest first, what
    retention would delete once this backup is taken, until it is enough. Never more than that:
    what retention keeps stays, and a volume still short then fails the backup with the sizes."""
    free = store.free_space()
    if free is None or not earlier:
        return
    needed = int(max(b.get("bytes") or 0 for b in earlier[:1]) * GROWTH)
    for meta in reversed(expendable([coming, *earlier], keep)):
        if free >= needed:
            return
        _delete(store, meta, f"making room: {free} bytes free, the newest backup of this database needs about {needed}")
        free = store.free_space() or 0


def remove_leftovers(store: Any, set_key: str, writing: str) -> None:
    """What a dead run of this set left: partial files or unfinished uploads, and archives whose
    sidecar was never written. Under the lock no other job writes one of this set, but for this
    run (`writing`); another set's (another database in the same store) may be being written."""
    def ours(name: str) -> bool:
        return name != writing and (f"_{set_key}_" in name if set_key else True)

    store.remove_partials(ours)
    names = set(store.names())
    for name in sorted(names):
        if NAME.match(name) and ours(name) and name + SIDECAR not in names:
            store.delete(name)
            log.warning("backup.partial_removed", path=store.path_of(name))


def _server_full(stderr: str) -> bool:
    lowered = stderr.lower()
    return "too many clients" in lowered or "remaining connection slots are reserved" in lowered


# --- what the commands that back up share -----------------------------------------------------

def store(settings: Settings) -> Any:
    """Where backups are kept (MIGRATE_BACKUP_DIR): a directory or a bucket."""
    return store_for(settings.backup_dir, os.environ, settings.s3_addressing)


def needs_backup(settings: Settings, conn: Any, current: tuple[str, ...]) -> bool:
    """`auto` does not back up a database that holds nothing yet (a first deploy: nothing to restore)."""
    if settings.backup == "auto" and not current and nothing_to_back_up(conn, tables.of(settings.history_table),
                                                                        settings.tenant_schema):
        log.info("backup.skipped", database=db.database_name(conn),
                 reason="the database holds nothing yet (a first deploy): nothing to restore")
        return False
    return True


def take_backup(settings: Settings, conn: Any, from_revision: tuple[str, ...], to_revision: tuple[str, ...],
                database: Database | None = None) -> Backup:
    """A verified backup of this database (DATABASE_URL's unless `database` says which), labelled
    with the revisions it goes from and to."""
    return take(
        store(settings),
        database or settings.database,
        db.database_name(conn),
        conn.server_version,
        list(from_revision),
        list(to_revision),
        settings.backup_keep,
        settings.application_name,
        os.environ,
        lock_wait_timeout=settings.lock_timeout,
        own=tables.of(settings.history_table),
        set_key=set_of(db.server_identity(conn), db.database_name(conn), settings.tenant_schema),
        wait_timeout=settings.wait_timeout,
        method=settings.backup_compression,
        schema=settings.tenant_schema,
    )


class Taken(NamedTuple):
    """The backups taken before a change (the main database's last), and what they mean for
    getting back: `recovery()` says it in words."""

    paths: list[str]
    # MIGRATE_BACKUP=off: none was asked for
    off: bool = False
    # the main database held nothing of its own, so it was not backed up (a first deploy)
    held_nothing: bool = False

    def recovery(self) -> str:
        """What to do once a change failed half-way (a revision that commits part of its work)."""
        if self.paths and not self.held_nothing:
            *others, main = self.paths
            also = ("; and restore each other database's, with DATABASE_URL set to it: "
                    + ", ".join(_name(o) for o in others)) if others else ""
            return (f"restore the backup this run took before it changed anything, `migrate-job restore "
                    f"{_name(main)} --yes` (the database as it was before this run){also}; fix the revision, "
                    "then run the job again")
        if self.held_nothing:
            return ("the database held nothing of its own before this run: drop it and create it again (or drop "
                    "everything this run created in it), fix the revision, then run the job again")
        if self.off:
            return ("no backup was taken (MIGRATE_BACKUP=off): undo by hand what it committed (listed above), "
                    "then run the job again")
        return "undo by hand what it committed (listed above), then run the job again"


def _name(path: str) -> str:
    """A backup's name, as `restore` takes it from MIGRATE_BACKUP_DIR."""
    return path.rsplit("/", 1)[-1]


def succeeded(settings: Settings, taken: Taken) -> None:
    """The migration these backups preceded succeeded: retention may now let them go in turn."""
    for path in taken.paths:
        mark_succeeded(store(settings), path)


def before_migrating(settings: Settings, conn: Any, others: list[Any], the_plan: Any, record: Any) -> Taken:
    """`run`'s backups (MIGRATE_BACKUP: `auto` only when something is pending), labelled from where
    the databases are to where the plan takes them."""
    if settings.backup == "off" or (settings.backup == "auto" and not the_plan.pending):
        return Taken([], off=settings.backup == "off")
    to = the_plan.heads if the_plan.pending else the_plan.current
    return before_changing(settings, conn, others, the_plan.current, to, record)


def before_changing(settings: Settings, conn: Any, others: list[Any], current: tuple[str, ...],
                    to: tuple[str, ...], record: Any) -> Taken:
    """Back up every database a change touches (a multidb env.py's others first, each under its
    lock), before the first change to any of them; the main one's path also in `record`."""
    if settings.backup == "off":
        return Taken([], off=True)
    taken = []
    for other in others:
        if needs_backup(settings, other.conn, current):
            taken.append(take_backup(settings, other.conn, current, to, other.database).path)
    if not needs_backup(settings, conn, current):
        return Taken(taken, held_nothing=True)
    record.backup_path = take_backup(settings, conn, current, to).path
    return Taken([*taken, record.backup_path])
