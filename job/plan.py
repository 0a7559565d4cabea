"""What the database is at, what the scripts are at, and what would run in between."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple, Sequence

from psycopg2 import sql

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
    """Current revision(s), the target, and the revisions that would apply, in order."""

    current: tuple[str, ...]
    target: str
    heads: tuple[str, ...]
    pending: Sequence[Step] = ()

    def as_dict(self) -> dict[str, Any]:
        return {
            "current": list(self.current),
            "target": self.target,
            "heads": list(self.heads),
            "pending": [{"revision": s.revision, "description": s.description} for s in self.pending],
        }


def current_revisions(conn: Any, version_table: VersionTable) -> tuple[str, ...]:
    """Read the version table with the bare driver; an absent table is an empty (base) database.
    (Looked up first rather than read and caught: a failed read would be an ERROR in the server's log.)"""
    table = version_table.identifier()
    with conn.cursor() as cur:
        cur.execute("SELECT to_regclass(%s)", (table.as_string(conn),))
        if cur.fetchone()[0] is None:
            return ()
        cur.execute(sql.SQL("SELECT version_num FROM {}").format(table))
        return tuple(sorted(row[0] for row in cur.fetchall()))


def known_at_target(heads: tuple[str, ...] | None, current: tuple[str, ...], target: str) -> Plan | None:
    """The empty plan when the manifest's heads prove the database is at the target; None means ask Alembic."""
    if target not in ("head", "heads"):
        return None
    if heads is None or (target == "head" and len(heads) != 1) or tuple(sorted(current)) != heads:
        return None
    return Plan(current=current, target=target, heads=heads)


def make(project: Project, current: tuple[str, ...], target: str) -> Plan:
    """Validate the database against the scripts and list the pending revisions."""
    project.validate(current, target)
    return Plan(current=current, target=target, heads=project.heads(), pending=project.steps(current, target))
