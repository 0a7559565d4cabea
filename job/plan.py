"""What the database is at, what the scripts are at, and what would run in between."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping, NamedTuple, Sequence

from psycopg2 import sql

from job import db, lineage
from job.errors import RevisionError

if TYPE_CHECKING:  # Alembic is imported only when there is work to do
    from job.migrate import Project


class VersionTable(NamedTuple):
    """Where Alembic keeps the revision(s) the database is at: a table, in a schema or on the search path."""

    name: str = "alembic_version"
    schema: str | None = None

    def identifier(self) -> sql.Identifier:
        return sql.Identifier(self.name) if self.schema is None else sql.Identifier(self.schema, self.name)

    def __str__(self) -> str:
        return self.name if self.schema is None else f"{self.schema}.{self.name}"


class Step(NamedTuple):
    """One pending revision."""

    revision: str
    description: str


class Plan(NamedTuple):
    """Current revision(s), the target, and the revisions that would apply, in order; or, when the
    database is ahead of these scripts on their own line, the revisions it has that they lack."""

    current: tuple[str, ...]
    target: str
    heads: tuple[str, ...]
    pending: Sequence[Step] = ()
    ahead: Sequence[Step] = ()

    def as_dict(self) -> dict[str, Any]:
        return {
            "current": list(self.current),
            "target": self.target,
            "heads": list(self.heads),
            "pending": [{"revision": s.revision, "description": s.description} for s in self.pending],
            "ahead": [{"revision": s.revision, "description": s.description} for s in self.ahead],
        }

    def ahead_fields(self) -> dict[str, Any]:
        """What `database.ahead` logs."""
        return {"current": list(self.current), "heads": list(self.heads), "ahead": [s.revision for s in self.ahead]}


# the lineage recorded in the database, read only when the database is at a revision the scripts lack
Recorded = Callable[[], "Mapping[str, lineage.Revision] | None"]


def current_revisions(conn: Any, version_table: VersionTable) -> tuple[str, ...]:
    """Read the version table with the bare driver; an absent table is an empty (base) database."""
    table = version_table.identifier()
    with conn.cursor() as cur:
        if not db.table_exists(cur, table):
            return ()
        cur.execute(sql.SQL("SELECT version_num FROM {}").format(table))
        return tuple(sorted(row[0] for row in cur.fetchall()))


def known_at_target(heads: tuple[str, ...] | None, current: tuple[str, ...], target: str,
                    recorded: Recorded = lambda: None, allow_ahead: bool = True) -> Plan | None:
    """The empty plan when the known heads prove the database is at the target, or (by the recorded
    lineage) ahead of it on its own line; None means ask Alembic (which also words every refusal)."""
    if target not in ("head", "heads"):
        return None
    if heads is None or (target == "head" and len(heads) != 1):
        return None
    if tuple(sorted(current)) == heads:
        return Plan(current=current, target=target, heads=heads)
    graph = recorded() if allow_ahead and set(current) - set(heads) else None
    if not graph or not all(h in graph for h in heads):
        return None
    ours = {r: graph[r] for r in lineage.ancestry(heads, graph)}
    if all(c in ours for c in current):
        return None  # behind: work to do
    try:
        ahead = lineage.ahead_of(current, ours, heads, graph)
    except RevisionError:
        return None
    return Plan(current=current, target=target, heads=heads, ahead=_steps(ahead))


def make(project: Project, current: tuple[str, ...], target: str, recorded: Recorded = lambda: None,
         allow_ahead: bool = True) -> Plan:
    """Validate the database against the scripts and list the pending revisions; a database ahead of
    the scripts is judged by its recorded lineage (job.lineage)."""
    project.validate_target(target)
    if project.unknown(current):
        ahead = lineage.ahead_of(current, project.lineage(), project.targets(target), recorded(), allow_ahead)
        return Plan(current=current, target=target, heads=project.heads(), ahead=_steps(ahead))
    return Plan(current=current, target=target, heads=project.heads(), pending=project.steps(current, target))


def _steps(revisions: Sequence[lineage.Revision]) -> tuple[Step, ...]:
    return tuple(Step(r.revision, r.description) for r in revisions)
