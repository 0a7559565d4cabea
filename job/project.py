"""The Alembic project of a run: loaded at most once, and only when asked for (a run at head never
loads Alembic or SQLAlchemy), or while another replica holds the lock; closed at the end."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from job import manifest, tables
from job.config import Settings, VersionTable

if TYPE_CHECKING:
    from job.migrate import Project


class Alembic:
    """`with Alembic(settings, conn) as alembic:` … `alembic.project()`."""

    def __init__(self, settings: Settings, conn: Any) -> None:
        self.settings, self.conn = settings, conn
        self._stack = contextlib.ExitStack()
        self._project: Project | None = None
        self._version_table: VersionTable | None = None

    def __enter__(self) -> Alembic:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()

    def load(self) -> None:
        self.project()

    def project(self) -> Project:
        if self._project is None:
            from job import migrate

            self._project = self._stack.enter_context(migrate.project_of(self.settings, self.conn))
        return self._project

    def version_table(self) -> VersionTable:
        """Where env.py keeps the version table (it runs to tell: asked once)."""
        if self._version_table is None:
            self._version_table = self.project().locate()
        return self._version_table


def version_table_of(settings: Settings, conn: Any, project: Project | None = None) -> VersionTable:
    """Where the version table is. With the project loaded, asked of env.py (which also puts the
    scripts where it finds them, so the plan that follows reads the right ones); else as a run
    recorded it for these scripts, else asked of env.py all the same (the heads manifest only
    repeats what the config files say): Alembic loads only for that."""
    if project is not None:
        return project.locate()
    found = manifest.scripts(settings.alembic)
    recorded = found and manifest.from_database(conn, tables.of(settings.history_table), found, settings.tenant_schema)
    if recorded:
        return recorded.version_table
    with Alembic(settings, conn) as alembic:
        return alembic.version_table()
