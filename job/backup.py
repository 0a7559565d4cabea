"""Backups with pg_dump: argument lists, the password in the environment, atomic and verified.

pg_dump writes a private temporary file; we hash it (from the page cache), fsync and rename it,
then check it with `pg_restore --list` before anything migrates. Streaming the dump through us
instead would have our hashing compete with pg_dump's compression for the CPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, NamedTuple

from job.config import Database
from job.errors import BackupFailed, RestoreFailed
from job.logs import log

CHUNK = 1 << 20  # bytes read at a time when hashing
PARTIAL = ".partial"


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


# what a sidecar must hold to be taken for one of ours
SIDECAR_FIELDS = ("database", "from_revision", "to_revision", "created_at", "sha256")


# Anything of the database's own: relations (tables, views, sequences…), functions, types other
# than tables' row types, extensions beyond the built-in plpgsql. Relations named with the job's
# own prefix (its history tables, their sequences and indexes) do not count.
NOTHING_TO_BACK_UP_SQL = """
SELECT NOT EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                   WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%%'
                     AND (%(own)s::text IS NULL OR c.relname NOT LIKE %(own)s || '%%'))
   AND NOT EXISTS (SELECT 1 FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                   WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%%')
   AND NOT EXISTS (SELECT 1 FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
                   WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%%'
                     AND t.typtype IN ('b', 'd', 'e', 'r', 'm') AND t.typelem = 0)
   AND NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname <> 'plpgsql')
"""


def nothing_to_back_up(conn: Any, own_prefix: str | None) -> bool:
    """Whether the database holds nothing of its own (a first deploy): its backup could restore nothing."""
    with conn.cursor() as cur:
        cur.execute(NOTHING_TO_BACK_UP_SQL, {"own": own_prefix})
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
    return found.group(1).strip() if found else _first_error(stderr)


def dumped_by(listing: str) -> str:
    """The pg_dump version an archive records, from `pg_restore --list` (e.g. '15.20 (Debian 15.20-0+deb12u1)')."""
    match = re.search(r"^;\s*Dumped by pg_dump version: (.+)$", listing, re.MULTILINE)
    if not match:
        raise BackupFailed("pg_restore --list shows no pg_dump version: the backup is not a pg_dump archive")
    return match.group(1).strip()


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise BackupFailed(f"{name} not found on PATH: install postgresql-client, or set MIGRATE_BACKUP=off")
    return path


def child_env(database: Database, env: Mapping[str, str]) -> dict[str, str]:
    """The environment for pg_dump/pg_restore: ours, less our URL, plus PGPASSWORD."""
    child = {k: v for k, v in env.items() if k not in ("DATABASE_URL", "DATABASE_URL_FILE")}
    if database.password is not None:
        child["PGPASSWORD"] = database.password
    return child


def set_of(server: str, database: str) -> str:
    """The backup set of one database on one server: 8 hex characters, in names and sidecars."""
    return hashlib.sha256(f"{server}/{database}".encode()).hexdigest()[:8]


def file_name(moment: dt.datetime, database: str, set_key: str, from_revision: list[str], to_revision: list[str]) -> str:
    """Timestamp first, so a plain listing sorts by time; the set key tells one database's files from another's."""
    def part(revs: list[str]) -> str:
        return "+".join(revs) or "base"

    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{database}_{set_key}_{part(from_revision)}_to_{part(to_revision)}")
    return f"{moment.strftime('%Y%m%dT%H%M%S.%fZ')}_{safe}.dump"


# a backup file's name as file_name writes it, with or without (older versions) a set key
NAME = re.compile(r"^\d{8}T\d{6}\.\d{6}Z_[A-Za-z0-9_.-]+\.dump$")


def take(
    database: Database,
    directory: Path,
    database_name: str,
    server_version: int,
    from_revision: list[str],
    to_revision: list[str],
    keep: int,
    application_name: str,
    env: Mapping[str, str],
    lock_wait_timeout: float = 300,
    exclude_tables: list[str] = [],
    set_key: str = "",
    wait_timeout: float = 0,
) -> Backup:
    """Dump the database into `directory`, verify it, write the sidecar, prune the set (`prune`)."""
    pg_dump, pg_restore = tool("pg_dump"), tool("pg_restore")
    if not directory.is_dir():
        raise BackupFailed(
            f"backup directory {str(directory)!r} does not exist: mount a volume there, "
            "set MIGRATE_BACKUP_DIR, or set MIGRATE_BACKUP=off"
        )
    remove_partials(directory, set_key)
    moment = dt.datetime.now(dt.timezone.utc)
    final = directory / file_name(moment, database_name, set_key, from_revision, to_revision)
    sequence = 1 + max((b.get("sequence") or 0 for b in listing(directory, database_name, set_key)), default=0)
    log.info("backup.start", path=str(final), database=database_name)
    started = time.monotonic()
    child = child_env(database, env)
    argv = [
        pg_dump,
        "--format=custom",
        "--no-password",
        # pg_dump takes a share lock on every table: never wait forever behind an app's transaction
        # (0 would mean "wait forever" to pg_dump, where MIGRATE_LOCK_TIMEOUT=0 means "try once")
        f"--lock-wait-timeout={max(int(lock_wait_timeout * 1000), 1)}",
        # the job's own history is not the application's data: a restore must not rewind it
        # (and its id sequence, which pg_restore --clean would otherwise try to drop from under it)
        *(f"--exclude-table={name}" for table in exclude_tables for name in (table, f"{table}_id_seq")),
        f"--dbname={database.conninfo_without_password(application_name)}",
    ]
    size, digest, version = _dump_atomically(argv, [pg_restore, "--list"], child, final, server_version, wait_timeout)
    try:
        backup = Backup(
            path=str(final),
            database=database_name,
            from_revision=from_revision,
            to_revision=to_revision,
            created_at=moment.isoformat(),
            bytes=size,
            sha256=digest,
            seconds=round(time.monotonic() - started, 3),
            pg_dump_version=version,
            server_version=server_version,
            set=set_key,
            sequence=sequence,
        )
        _write_atomically(sidecar_of(final), (json.dumps(backup._asdict(), indent=2) + "\n").encode())
    except BaseException:
        final.unlink(missing_ok=True)
        raise
    log.info("backup.done", path=backup.path, bytes=backup.bytes, seconds=backup.seconds, sha256=backup.sha256)
    prune(directory, database_name, set_key, keep)
    return backup


def mark_succeeded(path: str) -> None:
    """Note in its sidecar that the migration this backup preceded succeeded (see `prune`)."""
    sidecar = sidecar_of(Path(path))
    try:
        meta = json.loads(sidecar.read_text())
        _write_atomically(sidecar, (json.dumps({**meta, "succeeded": True}, indent=2) + "\n").encode())
    except (OSError, ValueError, BackupFailed) as e:
        log.warning("backup.unmarked", path=path, error=str(e))


def verified(directory: Path, name: str) -> tuple[Path, dict[str, Any]]:
    """The backup `name` (an absolute path, or a name in `directory`: never the working
    directory's) and its sidecar, its sha256 checked."""
    path = Path(name) if Path(name).is_absolute() else directory / name
    try:
        meta = json.loads(sidecar_of(path).read_text())
    except FileNotFoundError:
        raise RestoreFailed(f"no backup {str(path)!r} with a sidecar ({sidecar_of(path).name}) to check it against") from None
    except ValueError:
        raise RestoreFailed(f"the sidecar of {str(path)!r} is not valid JSON") from None
    if not _ours(meta):
        raise RestoreFailed(f"the sidecar of {str(path)!r} is not one of ours (it lacks {', '.join(SIDECAR_FIELDS)})")
    try:
        _, digest = _sha256(path)
    except OSError as e:
        raise RestoreFailed(f"cannot read backup {str(path)!r}: {e.strerror}") from None
    if digest != meta.get("sha256"):
        raise RestoreFailed(
            f"backup {str(path)!r} does not match its sidecar's sha256: it is damaged or was changed; not restoring"
        )
    return path, meta


def restore(database: Database, path: Path, application_name: str, env: Mapping[str, str],
            cancel_lock_waits: Callable[[str], int], clearing: str) -> None:
    """Bring the database back to exactly the state the backup holds, in one transaction: all of
    it, or no change at all.

    `pg_restore --clean` drops only what is in the archive, so what later migrations added (a
    table, a type, a foreign key onto a restored table, an extension) would stay or block the
    drops. So psql runs, in a single transaction, `clearing` (drops everything the database holds
    besides the job's own tables: `clearing_sql`) and then the archive's script as pg_restore
    writes it, streamed (a dump may be larger than memory).

    Dropping takes exclusive locks, and every application query would queue behind a restore
    waiting for one. The archive's script sets lock_timeout to 0 itself, so while it runs
    `cancel_lock_waits(its application_name)` is called every 0.2 s to cancel a statement of it
    that has waited too long; the transaction then undoes everything.
    """
    pg_restore, psql = tool("pg_restore"), tool("psql")
    name = f"{application_name}/restore"[:63]
    child = child_env(database, env)
    script = subprocess.Popen([pg_restore, "--clean", "--if-exists", "--file=-", str(path)], env=child,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_dies_with_job)
    runner = subprocess.Popen(
        [psql, "--no-psqlrc", "--quiet", "--single-transaction", "--set=ON_ERROR_STOP=1", "--file=-",
         f"--dbname={database.conninfo_without_password(name)}"],
        env=child, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        preexec_fn=_dies_with_job)
    errors: list[bytes] = []

    def feed() -> None:
        """Write `clearing`, then the archive's script, into psql."""
        try:
            runner.stdin.write(clearing.encode() + b"\n")
            while chunk := script.stdout.read(CHUNK):
                runner.stdin.write(chunk)
        except BrokenPipeError:
            pass  # psql stopped at an error: its stderr says which
        finally:
            with contextlib.suppress(BrokenPipeError):
                runner.stdin.close()
        errors.append(script.stderr.read())

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    cancelled = 0
    try:
        while True:
            try:
                runner.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                cancelled += cancel_lock_waits(name)
    except BaseException:
        runner.kill()
        script.kill()
        runner.wait()
        raise
    finally:
        feeder.join(timeout=5)
        script.wait()
    stderr = runner.stderr.read().decode(errors="replace")
    if runner.returncode != 0:
        why = " (it waited longer than MIGRATE_LOCK_TIMEOUT for a table lock)" if cancelled else ""
        raise RestoreFailed(f"the restore failed, the database is unchanged{why}: {_first_error(stderr)}")
    if script.returncode != 0:
        raise RestoreFailed(f"pg_restore could not read the backup: {_first_error(b''.join(errors).decode(errors='replace'))}")


def archive_database(path: Path) -> str | None:
    """The database the archive itself says it was dumped from (its table of contents' header)."""
    result = subprocess.run([tool("pg_restore"), "--list", str(path)], capture_output=True, text=True, errors="replace")
    found = re.search(r"(?m)^;\s+dbname: (.*)$", result.stdout)
    return found.group(1).strip() if found else None


# Everything of the database's own, as DROP statements: schemas other than public (with what is in
# them), extensions, then in the schemas left the relations, routines and types that are not the
# job's own or an extension's. Run before the archive's script, in its transaction.
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
extension_owned AS (SELECT objid FROM pg_depend WHERE deptype = 'e')
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
   AND c.oid NOT IN (SELECT objid FROM extension_owned)
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
SELECT format('DROP TYPE IF EXISTS %%I.%%I CASCADE;', n.nspname, t.typname)
  FROM pg_type t JOIN user_schemas n ON n.oid = t.typnamespace JOIN pg_class c ON c.oid = t.typrelid
 WHERE t.typtype = 'c' AND c.relkind = 'c' AND (n.nspname = 'public' OR n.oid IN (SELECT oid FROM kept_schemas))
"""


def clearing_sql(conn: Any, kept_tables: list[str]) -> str:
    """DROP statements for everything the database holds besides `kept_tables` (the job's own)."""
    with conn.cursor() as cur:
        cur.execute("SELECT array_agg(t) FROM unnest(%s::text[]) t WHERE to_regclass(t) IS NOT NULL", (kept_tables,))
        kept = cur.fetchone()[0] or []
        cur.execute(CLEARING_SQL, {"kept": kept})
        return "\n".join(row[0] for row in cur.fetchall())


def sidecar_of(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def listing(directory: Path, database_name: str | None = None, set_key: str | None = None) -> list[dict[str, Any]]:
    """Sidecars of the backups in `directory` (optionally of one database, and of one set),
    newest first. Anything else there (other files, directories, sidecars that are not ours) is
    passed over with a warning: a backup directory is input like any other."""
    found = []
    for side in directory.glob("*.dump.json"):
        dump = side.with_name(side.name[: -len(".json")])
        meta = _sidecar(side) if NAME.match(dump.name) else None
        if meta is None:
            if side not in _ignored:  # once per run, however often the directory is read
                _ignored.add(side)
                log.warning("backup.ignored", path=str(side), reason="not a backup sidecar of ours")
            continue
        if database_name is not None and meta["database"] != database_name:
            continue
        if set_key is not None and meta.get("set", set_key) != set_key:  # (older sidecars have no set)
            continue
        found.append({**meta, "path": str(dump)})  # the path is where it is, not what the sidecar says
    return sorted(found, key=_newest_first)


_ignored: set[Path] = set()


def _sidecar(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return meta if _ours(meta) else None


def _ours(meta: Any) -> bool:
    """Whether a sidecar's content is one of ours: an object with every field we write and read."""
    return isinstance(meta, dict) and all(field in meta for field in SIDECAR_FIELDS)


def _newest_first(meta: dict[str, Any]) -> tuple[int, str]:
    """By the set's sequence number (counted under the lock); older sidecars without one come
    after them, by time."""
    sequence = meta.get("sequence")
    return -(sequence if isinstance(sequence, int) else 0), _descending(str(meta.get("created_at", "")))


def _descending(text: str) -> str:
    """A key that sorts `text` descending inside an ascending sort."""
    return "".join(chr(0x10FFFF - ord(c)) for c in text)


def prune(directory: Path, database_name: str, set_key: str, keep: int) -> None:
    """Delete the backups of this set that are no longer a way back. Newest first, kept are: the
    newest (just taken); the newest backup of each migration (the same from and to revisions: a
    retry replaces its own earlier backup) until `keep` are kept; and, whatever `keep` says, the
    first backup taken since the last migration that succeeded: the way back from a migration
    that keeps failing. Only files of this set, found in `directory` by name, are deleted."""
    backups = listing(directory, database_name, set_key)
    if not backups:
        return
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
    for meta in backups:
        if meta["path"] not in kept:
            path = directory / Path(meta["path"]).name
            path.unlink(missing_ok=True)
            sidecar_of(path).unlink(missing_ok=True)
            log.info("backup.pruned", path=str(path))


def remove_partials(directory: Path, set_key: str) -> None:
    """A partial file of this set is a dead run's leftover: under the lock no other job writes one.
    Another set's (another database on the same volume) may be being written right now."""
    for leftover in directory.glob(f".*_{set_key}_*{PARTIAL}" if set_key else f".*{PARTIAL}"):
        if leftover.is_file():
            leftover.unlink(missing_ok=True)
            log.warning("backup.partial_removed", path=str(leftover))


def _dies_with_job() -> None:
    """In the child, before exec: die when the job dies (Linux's PR_SET_PDEATHSIG). A SIGKILLed job
    must not leave its pg_dump holding share locks on every table, or its pg_restore running."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: nothing to ask for


def _server_full(stderr: str) -> bool:
    lowered = stderr.lower()
    return "too many clients" in lowered or "remaining connection slots are reserved" in lowered


def _dump_atomically(argv: list[str], list_argv: list[str], env: dict[str, str], final: Path,
                     server_version: int, wait_timeout: float = 0) -> tuple[int, str, str]:
    """pg_dump into a private temporary file that becomes `final` only once complete and readable
    by `pg_restore --list`; return its size, sha256 and the pg_dump version it records."""
    with _atomically(final) as partial:
        deadline = time.monotonic() + wait_timeout
        while True:
            result = subprocess.run([*argv, f"--file={partial}"], env=env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, text=True, errors="replace", preexec_fn=_dies_with_job)
            if result.returncode == 0 or not _server_full(result.stderr) or time.monotonic() >= deadline:
                break
            # the server has no connection slot for pg_dump right now: wait within MIGRATE_WAIT_TIMEOUT
            log.info("backup.retry", error=_first_error(result.stderr))
            time.sleep(min(1.0, max(deadline - time.monotonic(), 0)))
        if result.returncode < 0:
            name = signal.Signals(-result.returncode).name
            raise BackupFailed(f"pg_dump was killed by {name}" + (
                " (the file size limit)" if name == "SIGXFSZ" else ""))
        if result.returncode != 0:
            raise server_too_new(result.stderr, server_version) or BackupFailed(
                f"pg_dump failed: {_first_error(result.stderr)}")
        # pg_restore reads the archive's table of contents while we hash the file
        listing = subprocess.Popen([*list_argv, str(partial)], env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, errors="replace", preexec_fn=_dies_with_job)
        try:
            size, digest = _sha256(partial)
        finally:
            out, err = listing.communicate()
        if listing.returncode != 0:
            raise BackupFailed(f"pg_restore --list cannot read the backup: {_first_error(err)}")
        return size, digest, dumped_by(out)


def _write_atomically(path: Path, content: bytes) -> None:
    with _atomically(path) as partial:
        partial.write_bytes(content)


@contextlib.contextmanager
def _atomically(final: Path) -> Iterator[Path]:
    """A temporary file beside `final`, created 0600 before anything writes to it (so no byte is ever
    readable by others); when the body succeeds it is fsynced and renamed over `final`, the directory
    fsynced; whatever happens, no temporary file is left."""
    partial = final.with_name(f".{final.name}{PARTIAL}")
    try:
        os.close(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as e:
        raise BackupFailed(f"cannot write to backup directory {str(final.parent)!r}: {e.strerror}") from None
    try:
        yield partial
        fd = os.open(partial, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(partial, final)
        _fsync_dir(final.parent)
    except OSError as e:
        raise BackupFailed(f"cannot write {str(final)!r}: {e.strerror}") from None
    finally:
        partial.unlink(missing_ok=True)


def _sha256(path: Path) -> tuple[int, str]:
    """Size and sha256 of a file, read in chunks (a dump may be larger than memory)."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _first_error(stderr: str) -> str:
    """What went wrong, from pg_dump/pg_restore/psql output: the first error line with the DETAIL
    and HINT lines that follow it (its cause), not the last line (often `Command was: ...`)."""
    lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
    first = next((i for i, line in enumerate(lines) if "error:" in line.lower() or "fatal:" in line.lower()), None)
    if first is None:
        return lines[-1] if lines else "no error output"
    cause = [lines[first]]
    for line in lines[first + 1:]:
        if "detail:" in line.lower() or "hint:" in line.lower():
            cause.append(line)
        elif cause:
            break
    return " ".join(cause)
