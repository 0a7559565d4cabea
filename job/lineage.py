"""The database's lineage: the revision graph of the scripts that migrated it, recorded beside the
version table, so that older code can tell "the database is ahead of me on my own line" from "the
database is on a line I do not know".

In a rolling update, a node drain or a `helm rollback` of the app, pods of the previous release
start against a schema the next release has already migrated. Expand/contract makes that safe:
each release's schema still serves the previous release's code, unless a revision says otherwise
(`breaks_previous_release` in its module). Alembic itself knows only its own scripts, so every run
that loads them records their graph here; an older run reads it back to place the database's
revisions relative to its own heads (`ahead_of`).
"""

from __future__ import annotations

import json
from typing import Any, Callable, Iterable, Mapping, NamedTuple

from psycopg2 import sql

from job import db, tables
from job.config import Settings
from job.errors import RevisionError
from job.logs import log

# the module-level name a revision sets (True, or the reason) when old code must not run on its schema
MARKER = "breaks_previous_release"

LINEAGE_DDL = """
CREATE TABLE IF NOT EXISTS {table} (
    version_table text NOT NULL,     -- the version table (schema.name) these revisions are recorded in
    revision text NOT NULL,
    down_revisions text[] NOT NULL,  -- what must be applied before it: its parents and dependencies
    description text NOT NULL,
    breaking text,                   -- why old code must not run past it (breaks_previous_release); NULL if it may
    recorded_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (version_table, revision)
)
"""

RECORD_SQL = """
INSERT INTO {table} AS old (version_table, revision, down_revisions, description, breaking)
SELECT %(version_table)s, r.revision, ARRAY(SELECT jsonb_array_elements_text(r.down)), r.description, r.breaking
FROM jsonb_to_recordset(%(revisions)s::jsonb) AS r(revision text, down jsonb, description text, breaking text)
ON CONFLICT (version_table, revision) DO UPDATE
SET down_revisions = EXCLUDED.down_revisions, description = EXCLUDED.description, breaking = EXCLUDED.breaking,
    recorded_at = now()
WHERE (old.down_revisions, old.description, old.breaking)
      IS DISTINCT FROM (EXCLUDED.down_revisions, EXCLUDED.description, EXCLUDED.breaking)
"""


class Revision(NamedTuple):
    """One revision of a script graph, as recorded."""

    revision: str
    down: tuple[str, ...]
    description: str
    breaking: str | None = None


def record(conn: Any, own: tables.Own | None, version_table: str, revisions: Iterable[Revision]) -> str | None:
    """Record (or update) the scripts' graph; return why it could not be, if it could not.
    Runs under the migration lock, before any revision is applied."""
    if own is None:
        return None
    payload = json.dumps([{"revision": r.revision, "down": list(r.down), "description": r.description,
                           "breaking": r.breaking} for r in revisions])

    def write(cur: Any) -> None:
        table = tables.prepare(cur, own, "lineage", LINEAGE_DDL).identifier()
        cur.execute(sql.SQL(RECORD_SQL).format(table=table), {"version_table": version_table, "revisions": payload})

    return db.best_effort(conn, write)[1]


def read(conn: Any, own: tables.Own | None, version_table: str) -> dict[str, Revision] | None:
    """The recorded graph for this version table; None when nothing is recorded."""
    table = tables.found(conn, own, "lineage")
    if table is None:
        return None
    with conn.cursor() as cur:
        cur.execute(sql.SQL("SELECT revision, down_revisions, description, breaking FROM {} WHERE version_table = %s")
                    .format(table.identifier()), (version_table,))
        rows = cur.fetchall()
    return {r[0]: Revision(r[0], tuple(r[1]), r[2], r[3]) for r in rows} or None


def at_heads(heads: Iterable[str], graph: Mapping[str, Revision]) -> tuple[str, ...]:
    """What Alembic's version table holds once every one of `heads` is applied: the heads less
    those that another head needs (depends on, directly or through its ancestors), as Alembic keeps
    only the dependent one (expand/contract branches whose contract head depends on the expand one)."""
    heads = sorted(set(heads))
    needed: set[str] = set()
    for head in heads:
        needed.update(r for r in ancestry([head], graph) if r != head)
    return tuple(h for h in heads if h not in needed)


def ahead_of(current: tuple[str, ...], ours: Mapping[str, Revision], targets: tuple[str, ...],
             recorded: Mapping[str, Revision] | None, allow: bool = True) -> list[Revision]:
    """The revisions the database has and these scripts lack (oldest first), when the database is
    ahead of `targets` on their own line and nothing in between breaks this code.

    `current`: what the database is at, some of it unknown to `ours` (the scripts' graph);
    `targets`: what this code migrates to (its heads, or MIGRATE_TARGET); `recorded`: the lineage.
    Raises RevisionError saying which case it is otherwise: no lineage, a line these scripts do not
    have, a breaking revision in between, or MIGRATE_ALLOW_AHEAD=false."""
    unknown = [c for c in current if c not in ours]
    at = _names(unknown)
    graph = {**(recorded or {}), **ours}  # these scripts' own word on their revisions comes first
    missing = [c for c in unknown if c not in graph]
    if missing:
        raise RevisionError(
            f"the database is at revision {_names(missing)}, which these migration scripts do not know, and "
            + ("no lineage is recorded in the database" if not recorded else "the recorded lineage does not have it")
            + ": the job cannot tell whether it descends from these scripts' head (the database was migrated by "
            "another tool or by a migrate-job that did not record lineage, the scripts are missing a revision, or "
            "the version table holds a name rather than an id). Deploy code that has the revision, or bring the "
            "database back to one of these scripts' revisions"
        )
    try:
        applied = ancestry(current, graph)
    except _Unrecorded as e:
        raise RevisionError(
            f"the database is at revision {at}, which these migration scripts do not know, and its recorded "
            f"lineage is incomplete (revision {e.revision!r} is not recorded): the job cannot tell whether the "
            "database descends from these scripts' head. Deploy code that has the revision"
        ) from None
    lacking = [r for r in applied if r not in ours]
    descends = not targets or all(set(targets) & set(ancestry((c,), graph)) for c in unknown)
    if not descends or not all(t in applied for t in targets):
        common = [r for r in applied if r in ours]
        forks = [r for r in common if not any(r in graph[o].down for o in common)]
        raise RevisionError(
            f"the database is at revision {at}, on a line these migration scripts do not have: it does not descend "
            f"from their {'head' if len(targets) == 1 else 'targets'} {_names(targets)} (the lines part after "
            f"{_names(forks) or 'base'}). Another branch was deployed, or a revision was rewritten: deploy code "
            "that has it, or downgrade with the code that migrated it"
        )
    breaking = [r for r in lacking if graph[r].breaking]
    if breaking:
        raise RevisionError(
            "the database is ahead of these migration scripts by a revision that breaks the previous release's "
            "code: " + "; ".join(f"{r!r} ({graph[r].breaking})" for r in breaking)
            + ". This code must not run on that schema: deploy a release that has it, or downgrade first"
        )
    if not allow:
        raise RevisionError(
            f"the database is at revision {at}, ahead of these migration scripts on their own line "
            f"(they lack {_names(lacking)}), and MIGRATE_ALLOW_AHEAD=false refuses to run older code on it"
        )
    return [graph[r] for r in lacking]


def _names(revisions: Iterable[str]) -> str:
    return ", ".join(repr(r) for r in revisions)


class _Unrecorded(Exception):
    def __init__(self, revision: str) -> None:
        super().__init__(revision)
        self.revision = revision


def ancestry(tips: Iterable[str], graph: Mapping[str, Revision]) -> list[str]:
    """Every revision applied when `tips` are, oldest first (each after what it needs); raises
    _Unrecorded naming the first one the graph does not have."""
    order: list[str] = []
    seen: set[str] = set()
    stack: list[tuple[str, bool]] = [(tip, False) for tip in sorted(tips, reverse=True)]
    while stack:  # depth-first, a revision placed after its down revisions (no recursion limit to hit)
        revision, below_placed = stack.pop()
        if below_placed:
            order.append(revision)
            continue
        if revision in seen:
            continue
        seen.add(revision)
        if revision not in graph:
            raise _Unrecorded(revision)
        stack.append((revision, True))
        stack.extend((down, False) for down in reversed(graph[revision].down) if down not in seen)
    return order


def recorded(settings: Settings, conn: Any, version_table: Any) -> Callable[[], dict[str, Revision] | None]:
    """The lineage recorded beside `version_table`, read when asked (only a database at revisions
    the scripts lack needs it)."""
    own = tables.of(settings.history_table)
    return lambda: read(conn, own, str(version_table))


def record_scripts(settings: Settings, conn: Any, revisions: Iterable[Revision], version_table: Any) -> None:
    """Record the scripts' revision graph beside the version table before anything is applied, so
    that older code meeting this database can tell where it stands."""
    problem = record(conn, tables.of(settings.history_table), str(version_table), revisions)
    if problem:
        log.warning("lineage.unrecorded", error=problem)
