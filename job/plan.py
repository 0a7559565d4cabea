"""The plan's values (`Step`, `Plan`, `VersionTable`), and what the database is at: read from its
version table, and, without Alembic, whether what is known of the scripts settles it.
(What Alembic says would run is job.migrate.Project.plan.)"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping, NamedTuple, Sequence

import psycopg2
from psycopg2 import sql

from job import db, lineage, manifest
from job.config import Settings, VersionTable
from job.errors import MigrationFailed, RevisionError, first_line
from job.logs import log

if TYPE_CHECKING:
    from job.lock import Other


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
        try:
            cur.execute(sql.SQL("SELECT version_num FROM {}").format(table))
            rows = cur.fetchall()
        except (psycopg2.ProgrammingError, psycopg2.DataError) as e:  # (no version_num column, ...)
            raise RevisionError(f"the version table {version_table} is not one Alembic keeps: {first_line(e)}; "
                                "nothing was changed") from None
    if any(not isinstance(row[0], str) or not row[0] for row in rows):
        raise RevisionError(f"the version table {version_table} holds an empty or NULL revision: nothing was changed; "
                            "delete that row (or stamp the real revision with `alembic stamp`)")
    return tuple(sorted(row[0] for row in rows))


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
    return Plan(current=current, target=target, heads=heads, ahead=steps_of(ahead))


def steps_of(revisions: Sequence[lineage.Revision]) -> tuple[Step, ...]:
    return tuple(Step(r.revision, r.description) for r in revisions)


def known_plan(settings: Settings, conn: Any, known: manifest.Known) -> Plan | None:
    """The plan when what is known of the scripts without Alembic settles it: the database is at the
    target, or ahead of it on its own line (by the recorded lineage); else None."""
    return known_at_target(known.heads, current_revisions(conn, known.version_table), settings.target,
                           lineage.recorded(settings, conn, known.version_table), settings.allow_ahead)


def refuse_out_of_step(conn: Any, others: Sequence[Other], version_table: VersionTable, current: tuple[str, ...],
                       advice: str) -> None:
    """Raise MigrationFailed naming each other database that is not at `current` (DATABASE_URL's)."""
    theirs = [(other, current_revisions(other.conn, version_table)) for other in others]
    apart = [(other, revisions) for other, revisions in theirs if revisions != current]
    if apart:
        raise MigrationFailed(
            f"the databases are at different revisions: {db.database_name(conn)} at {', '.join(current) or 'base'}, "
            + ", ".join(f"{o.section} ({db.database_name(o.conn)}) at {', '.join(r) or 'base'}" for o, r in apart)
            + f": {advice}")


def log_plan(the_plan: Plan) -> None:
    log.info("plan", **the_plan.as_dict())
    log_ahead(the_plan)


def log_ahead(the_plan: Plan) -> None:
    """`database.ahead`, when older code finds the database ahead of its scripts."""
    if the_plan.ahead:
        log.info("database.ahead", **the_plan.ahead_fields())


def settled(settings: Settings, conn: Any, scripts: manifest.Scripts | None, known: manifest.Known | None) -> Plan | None:
    """The plan when what is known of the scripts (`known`, else what a run has recorded since)
    proves there is nothing to do: the database at the target, or ahead of it on its own line, and
    no backup asked for regardless (MIGRATE_BACKUP=always); None: ask Alembic."""
    known = known or manifest.known_scripts(settings, conn, scripts)
    found = known_plan(settings, conn, known) if known is not None else None
    return found if found is not None and settings.backup != "always" else None
