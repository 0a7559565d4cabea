"""What each applied revision's file held when it ran, so that a file edited afterwards is caught.

Alembic records one thing per database, the revision id: a revision that already ran in
production and was edited afterwards gives the next environment another schema, and nothing
says so. When the job applies a revision it records two hashes of its file beside it (in the
job's own `_revisions` table): of its bytes, and of its code, the syntax tree with docstrings left
out, so that whitespace, comments, formatting and the docstring Alembic writes at the top do not
count and any change to what runs does. Every run that loads the scripts compares the applied
revisions' files with what was recorded (the bytes first: the code is parsed only when they
differ), and `revision.changed` names each that changed; MIGRATE_ON_CHANGED_REVISION=refuse makes
that exit 9, before anything runs, until `migrate-job accept` records the change on purpose (who,
when, why). A database migrated before the job kept these gets its revisions recorded the first
time it is seen, as they are then: nothing to compare them with.

(Flyway's checksums, Prisma's "modified after it was applied" and Atlas's atlas.sum catch the same.)
"""

from __future__ import annotations

import ast
import getpass
import hashlib
import json
import os
import socket
from typing import Any, Iterable, NamedTuple

from psycopg2 import sql

from job import db, logs, tables
from job.config import Settings
from job.errors import ConfigError, Drift
from job.logs import log

REVISIONS_DDL = """
CREATE TABLE IF NOT EXISTS {table} (
    version_table text NOT NULL,    -- the version table (schema.name) the revision is recorded in
    revision text NOT NULL,
    code_sha256 text NOT NULL,      -- its code: the syntax tree, docstrings left out
    file_sha256 text NOT NULL,      -- its bytes (when equal, the code is not parsed)
    recorded text NOT NULL,         -- applied, first-seen (migrated before the job recorded these), accepted
    run_id text NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    replaced_sha256 text,           -- accepted: the code hash it replaced
    accepted_by text,
    accepted_reason text,
    PRIMARY KEY (version_table, revision)
)
"""

READ_SQL = """
SELECT revision, code_sha256, file_sha256, recorded, recorded_at::text, run_id FROM {table} WHERE version_table = %s
"""

RECORD_SQL = """
INSERT INTO {table} AS old (version_table, revision, code_sha256, file_sha256, recorded, run_id, replaced_sha256,
                            accepted_by, accepted_reason)
SELECT %(version_table)s, r.revision, r.code, r.file, %(recorded)s, %(run_id)s, r.replaced, %(by)s, %(reason)s
FROM jsonb_to_recordset(%(rows)s::jsonb) AS r(revision text, code text, file text, replaced text)
ON CONFLICT (version_table, revision) DO UPDATE
SET code_sha256 = EXCLUDED.code_sha256, file_sha256 = EXCLUDED.file_sha256, recorded = EXCLUDED.recorded,
    run_id = EXCLUDED.run_id, recorded_at = now(), replaced_sha256 = EXCLUDED.replaced_sha256,
    accepted_by = EXCLUDED.accepted_by, accepted_reason = EXCLUDED.accepted_reason
"""


class Hashes(NamedTuple):
    """A revision file's two hashes."""

    code: str
    file: str


class Changed(NamedTuple):
    """An applied revision whose file is not what ran."""

    revision: str
    recorded: str       # how the recorded hash came to be: applied, first-seen, accepted
    recorded_at: str
    run_id: str
    recorded_sha256: str
    file_sha256: str    # the file's code now

    def as_dict(self) -> dict[str, str]:
        return self._asdict()


def code_hash(source: str) -> str:
    """sha256 of a revision's code: its syntax tree as Python prints it back (comments, whitespace,
    quotes and line breaks gone), without docstrings. A file that does not parse hashes as its text
    with runs of whitespace collapsed (Alembic cannot load it anyway)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return hashlib.sha256(" ".join(source.split()).encode()).hexdigest()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return hashlib.sha256(ast.unparse(tree).encode()).hexdigest()


def hashes_of(source: str) -> Hashes:
    return Hashes(code_hash(source), hashlib.sha256(source.encode()).hexdigest())


def applied(project: Any, current: Iterable[str]) -> list[str]:
    """The revisions of these scripts the database has applied, oldest first: every one up to its
    current ones (those the scripts do not know, a newer release's, left out)."""
    known = tuple(r for r in current if _knows(project, r))
    if not known:
        return []
    return [r.revision for r in reversed(list(project.script.revision_map.iterate_revisions(known, "base")))]


def _knows(project: Any, revision: str) -> bool:
    try:
        return project.script.revision_map.get_revision(revision) is not None
    except Exception:  # (Alembic raises for a revision it does not know)
        return False


def changed(settings: Settings, conn: Any, project: Any, version_table: Any, current: Iterable[str],
            record_first_seen: bool) -> list[Changed]:
    """The applied revisions whose files changed since they ran (or were last accepted), each
    logged as `revision.changed`; with `record_first_seen` (under the exclusive lock), those never
    recorded are recorded as they are now."""
    from job.migrate import source_of

    own = tables.of(settings.history_table)
    table = tables.found(conn, own, "revisions")
    recorded = {} if table is None else _read(conn, table, str(version_table))
    found, first_seen = [], {}
    for revision in applied(project, current):
        source = source_of(project.script, revision)
        if not source:  # a sourceless (.pyc) revision: nothing to compare
            continue
        row = recorded.get(revision)
        file_hash = hashlib.sha256(source.encode()).hexdigest()
        if row is None:
            first_seen[revision] = Hashes(code_hash(source), file_hash)
        elif row["file_sha256"] != file_hash and row["code_sha256"] != (code := code_hash(source)):
            found.append(Changed(revision, row["recorded"], row["recorded_at"], row["run_id"], row["code_sha256"], code))
    for change in found:
        log.warning("revision.changed", **change.as_dict(), path=project.script.get_revision(change.revision).path,
                    outcome=settings.on_changed_revision,
                    remedy="if the change is meant, record it: migrate-job accept REVISION --reason TEXT")
    if first_seen and record_first_seen:
        record(settings, conn, version_table, first_seen, "first-seen")
    return found


def refuse_changed(settings: Settings, found: list[Changed]) -> None:
    """MIGRATE_ON_CHANGED_REVISION=refuse: exit 9 before anything runs."""
    if found and settings.on_changed_revision == "refuse":
        names = ", ".join(c.revision for c in found)
        raise Drift(f"applied revision{'s' if len(found) > 1 else ''} {names} changed since {'they' if len(found) > 1 else 'it'} "
                    "ran (revision.changed): the next environment would get another schema. Put the file back, or "
                    "record the change on purpose with `migrate-job accept REVISION --reason TEXT` "
                    "(MIGRATE_ON_CHANGED_REVISION=refuse)")


def record_applied(settings: Settings, conn: Any, project: Any, version_table: Any, revisions: Iterable[str]) -> None:
    """Record the files of the revisions this run applied, as they ran."""
    from job.migrate import source_of

    hashes = {r: hashes_of(source) for r in revisions if (source := source_of(project.script, r))}
    if hashes:
        record(settings, conn, version_table, hashes, "applied")


def record(settings: Settings, conn: Any, version_table: Any, hashes: dict[str, Hashes], how: str,
           replaced: dict[str, str] | None = None, by: str | None = None, reason: str | None = None) -> None:
    """Write the hashes (the job's own table, best effort: it never fails a run)."""
    own = tables.of(settings.history_table)
    if own is None:
        return
    rows = json.dumps([{"revision": r, "code": h.code, "file": h.file, "replaced": (replaced or {}).get(r)}
                       for r, h in hashes.items()])

    def write(cur: Any) -> None:
        table = tables.prepare(cur, own, "revisions", REVISIONS_DDL).identifier()
        cur.execute(sql.SQL(RECORD_SQL).format(table=table),
                    {"version_table": str(version_table), "rows": rows, "recorded": how, "run_id": logs.run_id(),
                     "by": by, "reason": reason})

    problem = db.best_effort(conn, write)[1]
    if problem:
        log.warning("revision.not_recorded", revisions=sorted(hashes), error=problem)


def accept(settings: Settings, conn: Any, project: Any, version_table: Any, current: Iterable[str],
           revisions: list[str], reason: str) -> list[str]:
    """Record the changed files of `revisions` (all changed ones when empty) as they are now, with
    who, when and why; return the revisions accepted. Under the exclusive lock."""
    if tables.of(settings.history_table) is None:
        raise ConfigError("accept records into the job's own tables, and MIGRATE_HISTORY_TABLE is off")
    found = {c.revision: c for c in changed(settings, conn, project, version_table, current, record_first_seen=True)}
    wanted = revisions or sorted(found)
    applied_now = set(applied(project, current))
    for revision in wanted:
        if revision not in applied_now:
            raise ConfigError(f"revision {revision} is not applied to this database: there is nothing to accept")
        if revision not in found:
            raise ConfigError(f"revision {revision}'s file is what was recorded for it: there is no change to accept")
    if not wanted:
        return []
    from job.migrate import source_of

    hashes = {r: hashes_of(source_of(project.script, r)) for r in wanted}
    by = accepted_by(conn)
    record(settings, conn, version_table, hashes, "accepted", {r: found[r].recorded_sha256 for r in wanted}, by, reason)
    for revision in wanted:
        log.info("revision.accepted", revision=revision, replaced_sha256=found[revision].recorded_sha256,
                 code_sha256=hashes[revision].code, by=by, reason=reason)
    return wanted


def accepted_by(conn: Any) -> str:
    """Who accepts a change: the operator's login and host, and the database role."""
    try:
        login = getpass.getuser()
    except (KeyError, OSError):  # (a container's uid may have no name)
        login = str(os.getuid())
    with conn.cursor() as cur:
        cur.execute("SELECT current_user")
        return f"{login}@{socket.gethostname()} as {cur.fetchone()[0]}"


def _read(conn: Any, table: tables.Table, version_table: str) -> dict[str, dict[str, str]]:
    with conn.cursor() as cur:
        cur.execute(sql.SQL(READ_SQL).format(table=table.identifier()), (version_table,))
        return {row[0]: dict(zip(("code_sha256", "file_sha256", "recorded", "recorded_at", "run_id"), row[1:]))
                for row in cur.fetchall()}
