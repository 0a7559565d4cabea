"""The job's own tables: the run history, what runs learned of the scripts (`_heads`), the
revision graph (`_lineage`), what each applied revision's file held (`_revisions`) and the schema
each run left (`_schema`, both job.drift). They live in a schema of the job's own, `migrate_job`, where the
project's schema tooling never looks: Alembic's autogenerate and `alembic check` compare the
default schema only (unless env.py asks for `include_schemas`), so they propose nothing about
them and need no env.py edit. `MIGRATE_HISTORY_TABLE=schema.name` puts them elsewhere.

Versions before kept them beside the version table, on the search path; the first run that writes
them moves them here (`ALTER TABLE ... SET SCHEMA`: rows, sequences and indexes go along), and
until then they are read where they are. Whatever stands under one of these names is checked to
be the job's before it is read or written: naming an application table, or the version table,
is a configuration error, never a write into it.
"""

from __future__ import annotations

import contextlib
from typing import Any, NamedTuple

from psycopg2 import sql

from job.errors import ConfigError

SCHEMA = "migrate_job"

# the columns that tell one of the job's tables from anything else under its name
COLUMNS = {
    "history": {"run_id", "kind", "started_at", "outcome", "host"},
    "heads": {"scripts", "heads", "version_table", "seal"},
    "lineage": {"version_table", "revision", "down_revisions", "description"},
    "revisions": {"version_table", "revision", "code_sha256", "file_sha256", "accepted_reason"},
    "schema": {"version_table", "revisions", "fingerprint", "objects"},
}
# the advisory lock under which the tables are made or moved (a key of its own: never a
# migration lock's)
CREATING_KEY = int.from_bytes(b"mjtables", "big") - 2**63
SUFFIXES = {"history": "", "heads": "_heads", "lineage": "_lineage", "revisions": "_revisions", "schema": "_schema"}


class Table(NamedTuple):
    """A table by schema and name (no schema: wherever the search path finds it)."""

    schema: str | None
    name: str

    def identifier(self) -> sql.Identifier:
        return sql.Identifier(self.name) if self.schema is None else sql.Identifier(self.schema, self.name)

    def __str__(self) -> str:
        return self.name if self.schema is None else f"{self.schema}.{self.name}"


class Own(NamedTuple):
    """Where the job keeps its tables (MIGRATE_HISTORY_TABLE), and where older versions kept them."""

    schema: str | None
    base: str

    def table(self, kind: str) -> Table:
        return Table(self.schema, self.base + SUFFIXES[kind])

    def legacy(self, kind: str) -> Table | None:
        """Where a version before this one kept it: on the search path (none when a schema was named)."""
        return Table(None, self.base + SUFFIXES[kind]) if self.own_schema else None

    @property
    def own_schema(self) -> bool:
        """Whether the schema is the job's own (created by it, holding nothing else): backups leave it out."""
        return self.schema == SCHEMA

    def all(self) -> list[Table]:
        """Every table of the job's, where it is kept now and where it was kept before."""
        found = [self.table(kind) for kind in SUFFIXES]
        return found + [t for kind in SUFFIXES if (t := self.legacy(kind)) is not None]


def of(setting: str | None) -> Own | None:
    """MIGRATE_HISTORY_TABLE (checked by job.config): `name` in the job's schema, or `schema.name`; None: off."""
    if setting is None:
        return None
    schema, dot, name = setting.rpartition(".")
    return Own(schema if dot else SCHEMA, name)


def found(conn: Any, own: Own | None, kind: str) -> Table | None:
    """The job's table of `kind` to read ('history', 'heads', 'lineage'): where it is kept, else
    where an older version left it; None when there is none (or the tables are off)."""
    if own is None:
        return None
    candidates = [t for t in (own.table(kind), own.legacy(kind)) if t is not None]
    present = _columns(conn, candidates)
    for table in candidates:
        if table in present:
            _check(table, kind, present[table])
            return table
    return None


def prepare(cur: Any, own: Own, kind: str, ddl: str) -> Table:
    """Before writing the table of `kind` (under the migration lock): the schema made, all that an
    older version kept on the search path moved into it (every table at once, so none is left
    behind), whatever stands under the name checked to be the job's, and then `ddl` run for it
    (its CREATE TABLE IF NOT EXISTS, {table} the table)."""
    table = own.table(kind)
    pairs = [(k, own.table(k), own.legacy(k)) for k in SUFFIXES]
    everywhere = [t for _, new, old in pairs for t in (new, old) if t is not None]
    present = _columns(cur.connection, everywhere)
    if table in present and all(old is None or old not in present or new in present for _, new, old in pairs):
        _check(table, kind, present[table])
        cur.execute(sql.SQL(ddl).format(table=table.identifier()))
        return table
    # the runs of several tenant schemas of one database share these tables: the first to make one
    # must not race another (two CREATE ... IF NOT EXISTS at once fail on a duplicate catalog key).
    # (In autocommit, as the job writes its tables: a session-level lock, released here.)
    cur.execute("SELECT pg_advisory_lock(%s)", (CREATING_KEY,))
    try:
        present = _columns(cur.connection, everywhere)  # (as another run may have left them meanwhile)
        if own.schema is not None:
            cur.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(own.schema)))
        for k, new, old in pairs:
            if new in present:
                _check(new, k, present[new])
            elif old is not None and old in present:
                _check(old, k, present[old])
                cur.execute(sql.SQL("ALTER TABLE {} SET SCHEMA {}").format(old.identifier(),
                                                                          sql.Identifier(own.schema)))
        cur.execute(sql.SQL(ddl).format(table=table.identifier()))
    finally:
        with contextlib.suppress(Exception):  # (a session gone: its lock went with it)
            cur.execute("SELECT pg_advisory_unlock(%s)", (CREATING_KEY,))
    return table


def _columns(conn: Any, tables: list[Table]) -> dict[Table, set[str]]:
    """The columns of each of `tables` that exists, in one catalog query."""
    names = [t.identifier().as_string(conn) for t in tables]
    with conn.cursor() as cur:
        cur.execute("SELECT t.name, ARRAY(SELECT attname::text FROM pg_attribute WHERE attrelid = to_regclass(t.name) "
                    "AND attnum > 0 AND NOT attisdropped) FROM unnest(%s::text[]) AS t(name) "
                    "WHERE to_regclass(t.name) IS NOT NULL", (names,))
        rows = dict(cur.fetchall())
    return {table: set(rows[name]) for table, name in zip(tables, names) if name in rows}


def _check(table: Table, kind: str, columns: set[str]) -> None:
    missing = COLUMNS[kind] - columns
    if missing:
        raise ConfigError(
            f"{table} is not one of migrate-job's tables (it has no {', '.join(sorted(missing))} column): "
            f"MIGRATE_HISTORY_TABLE must name a table of the job's own, never an application table or the version "
            f"table; give another name (the default keeps them in the schema {SCHEMA}), or off")
