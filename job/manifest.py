"""The script heads, and where the version table is, without importing Alembic or a revision file.

Whatever Alembic has learned about one exact set of scripts (their heads, and the version table
their env.py configures) is kept under a fingerprint of the files it came from: alembic.ini and/or
pyproject.toml, env.py and every file in the version locations, paths and contents hashed. At
start-up the fingerprint is computed again (reading the files, not importing them) and what was
learned is used only if it matches, so a changed file can cost speed but never give a wrong answer.

It is kept in two places:
- the heads manifest beside the scripts, written by `migrate-job manifest` at image build time
  (heads only: the version table is the one the config files name);
- the database, by any run that loaded Alembic (`<history table>_heads`), so that a project with
  no build step starts fast from the second start of a code version on, in every pod. That record
  is looked up by a hash of the fingerprint and sealed with an HMAC keyed by the fingerprint itself:
  a record of a foreign project, or an edited one, does not match and costs speed only.

Anything this module does not understand means "nothing known": the caller falls back to Alembic.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
from pathlib import Path
from typing import Any, NamedTuple

from psycopg2 import sql

from job import db, tables
from job.alembic_files import AlembicFiles
from job.config import Settings, VersionTable
from job.logs import log

NAME = "migrate-job-heads.json"


class Known(NamedTuple):
    """What is known about the scripts without loading them."""

    # what the version table holds at the scripts' heads (a head another head depends on is not
    # kept there: job.lineage.at_heads)
    heads: tuple[str, ...]
    version_table: VersionTable
    # the version locations env.py sets in code, where they are not the config files' (Prefect's
    # `context.script.version_locations = [...]`), and the fingerprint of the files in them: what is
    # known holds only while that fingerprint does
    locations: tuple[str, ...] = ()
    locations_fingerprint: str = ""

    def holds(self) -> bool:
        """Whether what is known still describes the scripts: some heads, and env.py's own version
        locations (if any) as they were. No heads would say any database at base is at its target."""
        if not self.heads:
            return False
        return not self.locations or fingerprint_locations(self.locations) == self.locations_fingerprint


class Scripts(NamedTuple):
    """Where the scripts are, and the fingerprint of everything Alembic's answers depend on."""

    directory: Path
    fingerprint: str

    @property
    def manifest_path(self) -> Path:
        return self.directory / NAME


def scripts(files: AlembicFiles) -> Scripts | None:
    """Locate the scripts and fingerprint them; None when the locations are not understood."""
    found = _locations(files)
    if found is None:
        return None
    script, versions, recursive = found
    digest = hashlib.sha256()
    if files.section != "alembic" or files.x_args:  # what env.py reads may depend on them
        digest.update(json.dumps(["invoked", files.section, list(files.x_args)]).encode() + b"\n")
    for config_file in [*files.paths, script / "env.py"]:
        content = _read(str(config_file)) if config_file.is_file() else b""
        digest.update(f"config {config_file.name} {len(content)}\n".encode())
        digest.update(content)
    _digest_locations(digest, [str(v) for v in versions], recursive)
    return Scripts(script, digest.hexdigest())


def _digest_locations(digest: Any, locations: list[str], recursive: bool) -> None:
    for location in locations:
        digest.update(f"location {location}\n".encode())
        for relative, path in sorted(_files(location, "", recursive)):
            content = _read(path)
            digest.update(f"file {relative} {len(content)}\n".encode())
            digest.update(content)


def fingerprint_locations(locations: tuple[str, ...]) -> str:
    """The fingerprint of every file under `locations` (recursively: a superset of what Alembic reads)."""
    digest = hashlib.sha256()
    _digest_locations(digest, list(locations), True)
    return digest.hexdigest()


def locations(files: AlembicFiles) -> list[Path] | None:
    """The version locations the config files name, resolved; None when they are not understood."""
    found = _locations(files)
    return None if found is None else [Path(os.path.realpath(p)) for p in found[1]]


def from_file(found: Scripts, configured: VersionTable) -> Known | None:
    """The heads in the manifest, if it was written for these exact scripts."""
    try:
        manifest = json.loads(found.manifest_path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("fingerprint") != found.fingerprint:
        return None
    heads, moved, moved_fingerprint = (manifest.get(k) for k in ("heads", "locations", "locations_fingerprint"))
    if not _strings(heads) or not _strings(moved or []) or not isinstance(moved_fingerprint or "", str):
        return None
    known = Known(tuple(sorted(heads)), configured, tuple(moved or ()), moved_fingerprint or "")
    return known if known.holds() else None


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def write(found: Scripts, known: Known) -> Path:
    """Record what Alembic says of the scripts as they are now (its version table is the config files')."""
    path = found.manifest_path
    content: dict[str, Any] = {"heads": sorted(known.heads), "fingerprint": found.fingerprint}
    if known.locations:
        content.update(locations=list(known.locations), locations_fingerprint=known.locations_fingerprint)
    path.write_text(json.dumps(content, indent=2) + "\n")
    return path


# ---- the record in the database ----------------------------------------------------------------

RECORD_DDL = """
CREATE TABLE IF NOT EXISTS {table} (
    scripts text PRIMARY KEY,      -- sha256 of the scripts' fingerprint
    heads text[] NOT NULL,         -- the version table's rows at the scripts' heads
    version_table text NOT NULL,
    version_table_schema text,
    seal text NOT NULL,            -- HMAC of the rest, keyed by the fingerprint
    recorded_at timestamptz NOT NULL DEFAULT now()
);
-- (added after the first version: a table an older version made gains them)
ALTER TABLE {table} ADD COLUMN IF NOT EXISTS locations text[] NOT NULL DEFAULT '{{}}',
                    ADD COLUMN IF NOT EXISTS locations_fingerprint text NOT NULL DEFAULT ''
"""


def from_database(conn: Any, own: tables.Own | None, found: Scripts, schema: str | None = None) -> Known | None:
    """What an earlier run recorded for these exact scripts, if anything (and its seal holds). The
    row is read whole, as JSON: a table an older version made lacks the newer columns. A tenant's
    schema (MIGRATE_TENANT_SCHEMA) has a record of its own: its version table is its own."""
    table = tables.found(conn, own, "heads")
    if table is None:
        return None
    with conn.cursor() as cur:
        cur.execute(sql.SQL("SELECT to_jsonb(r) FROM {} r WHERE scripts = %s").format(table.identifier()),
                    (_record_id(found, schema),))
        row = cur.fetchone()
    if row is None:
        return None
    record = row[0]
    known = Known(tuple(sorted(record["heads"])), VersionTable(record["version_table"], record["version_table_schema"]),
                  tuple(record.get("locations") or ()), record.get("locations_fingerprint") or "")
    return known if hmac.compare_digest(record["seal"], _seal(found, known)) and known.holds() else None


def remember(conn: Any, own: tables.Own | None, found: Scripts, known: Known, schema: str | None = None) -> str | None:
    """Record what Alembic answered for these scripts; return why it could not be, if it could not.
    (Runs on the session holding the migration lock.)"""
    if own is None:
        return None

    def write(cur: Any) -> None:
        table = tables.prepare(cur, own, "heads", RECORD_DDL).identifier()
        cur.execute(
            sql.SQL(
                "INSERT INTO {} (scripts, heads, version_table, version_table_schema, locations, locations_fingerprint, "
                "seal) VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (scripts) DO UPDATE SET heads = EXCLUDED.heads, "
                "version_table = EXCLUDED.version_table, version_table_schema = EXCLUDED.version_table_schema, "
                "locations = EXCLUDED.locations, locations_fingerprint = EXCLUDED.locations_fingerprint, "
                "seal = EXCLUDED.seal, recorded_at = now()"
            ).format(table),
            (_record_id(found, schema), list(known.heads), known.version_table.name, known.version_table.schema,
             list(known.locations), known.locations_fingerprint, _seal(found, known)),
        )

    return db.best_effort(conn, write)[1]


def _record_id(found: Scripts, schema: str | None) -> str:
    scope = f" schema {schema}" if schema is not None else ""  # (a database's own: the id earlier versions wrote)
    return hashlib.sha256(f"migrate-job scripts {found.fingerprint}{scope}".encode()).hexdigest()


def _seal(found: Scripts, known: Known) -> str:
    # (the format's version first: a record of a job that did not record lineage is not used, so the
    # first run after an upgrade loads Alembic once and records the lineage too)
    payload = json.dumps(["v3", sorted(known.heads), known.version_table.name, known.version_table.schema,
                          list(known.locations), known.locations_fingerprint])
    return hmac.new(found.fingerprint.encode(), payload.encode(), hashlib.sha256).hexdigest()


# ---- reading the files ---------------------------------------------------------------------------


def _locations(files: AlembicFiles) -> tuple[Path, list[Path], bool] | None:
    """script_location, the version locations and whether they are searched recursively."""
    script_location = files.option("script_location")
    if not isinstance(script_location, str):
        return None
    search_path = _prepended(files)
    script = _resolve(script_location, files.base_dir("script_location"), search_path)
    if script is None:
        return None
    raw = files.option("version_locations")
    if raw:
        if isinstance(raw, str):
            raw = _split(files, raw, "path_separator", "version_path_separator")
            if raw is None:
                return None
        versions = [_resolve(p.strip(), files.base_dir("version_locations"), search_path) for p in raw if p.strip()]
        if any(v is None for v in versions):
            return None
    else:
        versions = [script / "versions"]
    if not all(location.is_dir() for location in versions):
        return None  # nothing to fingerprint there: Alembic will say what is wrong
    recursive = str(files.option("recursive_version_locations") or "false").lower() in ("true", "1", "yes")
    return script, versions, recursive  # type: ignore[return-value]


# Alembic's separators for lists in alembic.ini (Config._get_file_separator_char)
SEPARATORS = {"space": " ", "newline": "\n", "os": os.pathsep, ":": ":", ";": ";"}


def _split(files: AlembicFiles, raw: str, *separator_options: str) -> list[str] | None:
    """A list option of alembic.ini split as Alembic splits it: by the first separator option set,
    else (Alembic's legacy rule) on spaces and commas. None for a separator Alembic refuses."""
    for option in separator_options:
        name = files.option(option)
        if name is not None:
            return raw.split(SEPARATORS[name]) if name in SEPARATORS else None
    return re.split(r", *|(?: +)", raw)


def _prepended(files: AlembicFiles) -> list[str]:
    """`prepend_sys_path`: where Alembic looks for the project's packages first."""
    raw = files.option("prepend_sys_path") or []
    if isinstance(raw, str):
        raw = _split(files, raw, "path_separator") or []
    return [os.path.abspath(p.strip()) for p in raw if p.strip()]


def _resolve(location: str, base: Path, search_path: list[str]) -> Path | None:
    """A directory option: a path, or a package resource `package:path` (found without importing a
    top-level package, as Alembic's `importlib.resources` would). A relative path is where Alembic
    finds it, from the working directory (MLflow's alembic.ini, deep in its package, names its
    scripts from site-packages); else from `base`, the file that set it."""
    package, colon, resource = location.partition(":")
    if not colon or Path(location).is_absolute() or os.sep in package or not package.replace(".", "").isidentifier():
        path = Path(location)
        if path.is_absolute():
            return path.resolve()
        return (path.resolve() if path.is_dir() else base / path).resolve()
    import importlib.util

    import sys

    saved = sys.path[:]
    sys.path[:0] = search_path
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    finally:
        sys.path[:] = saved
    if spec is None or not spec.submodule_search_locations:
        return None
    return (Path(list(spec.submodule_search_locations)[0]) / resource).resolve()


def _files(directory: str, prefix: str, recursive: bool) -> list[tuple[str, str]]:
    """(relative name, path) of every file under `directory`; os.scandir, as this runs at every start-up."""
    try:
        entries = list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = []
    for entry in entries:
        if entry.is_file():
            found.append((prefix + entry.name, entry.path))
        elif recursive and entry.is_dir() and entry.name != "__pycache__":
            found.extend(_files(entry.path, f"{prefix}{entry.name}/", recursive))
    return found


def _read(path: str) -> bytes:
    """A file's bytes through bare file descriptors: a Python file object costs more than the read
    itself, and this runs for every revision file at every start-up."""
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def known_scripts(settings: Settings, conn: Any, found: Scripts | None) -> Known | None:
    """The heads and version table without loading Alembic: recorded in the database by an earlier
    run of these exact scripts (it asked env.py where the version table is), else the heads manifest."""
    if found is None:
        return None
    return (from_database(conn, tables.of(settings.history_table), found, settings.tenant_schema)
            or from_file(found, settings.version_table))


def learned(settings: Settings, conn: Any, found: Scripts | None, known: Known | None, learned: Known) -> None:
    """Record what Alembic said of these scripts, so that the next start need not load it."""
    if found is None or known == learned:
        return
    problem = remember(conn, tables.of(settings.history_table), found, learned, settings.tenant_schema)
    if problem:
        log.warning("heads.unrecorded", error=problem)
