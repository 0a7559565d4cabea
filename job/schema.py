"""The database's schema as the catalog holds it, in one query: every object the project owns, by
kind and name, with a definition that changes exactly when the object does.

`snapshot` reads it; `differences` says what differs between two of them, object by object (what
was expected, what was found); `fingerprint` is one hash of it. A rehearsal compares the schema
before a revision with the one its downgrade leaves, and a database with the schema the job
recorded for its revision: both without a dump, in one catalog query.

Left out: the catalogs, objects that belong to an extension, the job's own schema and tables, the
version table (and what hangs on those: their indexes, constraints, sequences). Row counts, sizes,
statistics, comments and grants are not the schema here.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable, NamedTuple

# (kind, name, definition) of each object. Names are schema-qualified; columns, constraints,
# triggers and policies are named after their table. A definition is what PostgreSQL itself
# prints for the object (pg_get_indexdef, pg_get_constraintdef...), so two databases built by the
# same revisions have the same definitions, whatever their oids, sizes or statistics.
SNAPSHOT_SQL = r"""
WITH excluded(oid) AS (SELECT unnest(%(excluded)s::oid[])),
ns AS (
    SELECT oid, nspname FROM pg_namespace
    WHERE nspname NOT IN ('pg_catalog', 'information_schema') AND nspname NOT LIKE 'pg\_%%'
      AND nspname <> ALL(%(excluded_schemas)s::text[]) AND (%(only)s::text IS NULL OR nspname = %(only)s::text)
      AND oid NOT IN (SELECT objid FROM pg_depend WHERE classid = 'pg_namespace'::regclass AND deptype = 'e')
),
extension_owned AS (SELECT classid, objid FROM pg_depend WHERE deptype = 'e'),
rel AS (
    SELECT c.oid, c.relname, c.relkind, c.relpersistence, c.relrowsecurity, c.relforcerowsecurity, c.relispartition,
           n.nspname, quote_ident(n.nspname) || '.' || quote_ident(c.relname) AS qualified
    FROM pg_class c JOIN ns n ON n.oid = c.relnamespace
    WHERE c.oid NOT IN (SELECT objid FROM extension_owned WHERE classid = 'pg_class'::regclass)
      AND c.oid NOT IN (SELECT oid FROM excluded)
      -- what belongs to an excluded table (its sequences), or a sequence of an identity column (the
      -- column says it). (Neither subquery refers to c: each is read once, not once per relation.)
      AND c.oid NOT IN (SELECT d.objid FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                        AND d.refobjid IN (SELECT oid FROM excluded))
      AND NOT (c.relkind = 'S' AND c.oid IN (SELECT d.objid FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                                             AND d.deptype = 'i' AND d.refobjsubid > 0))
)
SELECT 'schema', quote_ident(nspname), '' FROM ns
UNION ALL
SELECT 'extension', quote_ident(e.extname), e.extversion || ' in ' || quote_ident(n.nspname)
  FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
 WHERE e.extname <> 'plpgsql' AND %(only)s::text IS NULL
UNION ALL
SELECT CASE r.relkind WHEN 'v' THEN 'view' WHEN 'm' THEN 'materialized view' WHEN 'S' THEN 'sequence'
                      WHEN 'f' THEN 'foreign table' ELSE 'table' END,
       r.qualified,
       concat_ws(' ',
           CASE r.relkind WHEN 'p' THEN 'partitioned by ' || pg_get_partkeydef(r.oid) END,
           CASE WHEN r.relispartition THEN 'partition of ' || (SELECT i.inhparent::regclass::text FROM pg_inherits i
                                                                 WHERE i.inhrelid = r.oid)
                                           || ' ' || pg_get_expr(c.relpartbound, r.oid) END,
           CASE r.relpersistence WHEN 'u' THEN 'unlogged' END,
           CASE WHEN r.relrowsecurity THEN 'row level security' END,
           CASE WHEN r.relforcerowsecurity THEN 'forced' END,
           CASE WHEN r.relkind IN ('v', 'm') THEN pg_get_viewdef(r.oid) END,
           CASE WHEN r.relkind = 'S' THEN (SELECT format('%%s start %%s increment %%s min %%s max %%s cache %%s%%s',
                                                         format_type(s.seqtypid, NULL), s.seqstart, s.seqincrement,
                                                         s.seqmin, s.seqmax, s.seqcache,
                                                         CASE WHEN s.seqcycle THEN ' cycle' ELSE '' END)
                                           FROM pg_sequence s WHERE s.seqrelid = r.oid) END)
  FROM rel r JOIN pg_class c ON c.oid = r.oid
 WHERE r.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')
UNION ALL
SELECT 'column', r.qualified || '.' || quote_ident(a.attname),
       concat_ws(' ', format_type(a.atttypid, a.atttypmod),
           CASE WHEN a.attcollation <> 0 AND a.attcollation <> t.typcollation
                THEN 'collate ' || (SELECT quote_ident(collname) FROM pg_collation WHERE oid = a.attcollation) END,
           CASE WHEN a.attnotnull THEN 'not null' END,
           CASE a.attidentity WHEN 'a' THEN 'generated always as identity' WHEN 'd' THEN 'generated by default as identity' END,
           CASE WHEN a.attgenerated = 's' THEN 'generated always as (' || pg_get_expr(d.adbin, d.adrelid) || ') stored'
                WHEN d.adbin IS NOT NULL THEN 'default ' || pg_get_expr(d.adbin, d.adrelid) END)
  FROM rel r JOIN pg_attribute a ON a.attrelid = r.oid JOIN pg_type t ON t.oid = a.atttypid
  LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
 WHERE r.relkind IN ('r', 'p', 'f') AND a.attnum > 0 AND NOT a.attisdropped
UNION ALL
SELECT 'constraint', r.qualified || '.' || quote_ident(k.conname), pg_get_constraintdef(k.oid)
       || CASE WHEN NOT k.convalidated THEN ' (not valid)' ELSE '' END
  FROM pg_constraint k JOIN rel r ON r.oid = k.conrelid
 WHERE k.conparentid = 0
UNION ALL
-- an index that backs a constraint is the constraint's (named once, as the constraint)
SELECT 'index', quote_ident(r.nspname) || '.' || quote_ident(c.relname), pg_get_indexdef(i.indexrelid)
       || CASE WHEN NOT i.indisvalid THEN ' (invalid)' ELSE '' END
  FROM pg_index i JOIN rel r ON r.oid = i.indrelid JOIN pg_class c ON c.oid = i.indexrelid
 WHERE NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = i.indexrelid AND k.contype IN ('p', 'u', 'x'))
   AND NOT EXISTS (SELECT 1 FROM pg_inherits h WHERE h.inhrelid = i.indexrelid)
UNION ALL
SELECT 'trigger', r.qualified || '.' || quote_ident(g.tgname), pg_get_triggerdef(g.oid)
       || CASE g.tgenabled WHEN 'D' THEN ' (disabled)' WHEN 'R' THEN ' (replica)' WHEN 'A' THEN ' (always)' ELSE '' END
  FROM pg_trigger g JOIN rel r ON r.oid = g.tgrelid
 WHERE NOT g.tgisinternal AND g.tgparentid = 0
UNION ALL
SELECT 'policy', r.qualified || '.' || quote_ident(p.polname),
       concat_ws(' ', CASE WHEN p.polpermissive THEN 'permissive' ELSE 'restrictive' END, p.polcmd,
                 'to ' || (SELECT string_agg(CASE WHEN x = 0 THEN 'public' ELSE x::regrole::text END, ', ' ORDER BY x)
                           FROM unnest(p.polroles) x),
                 'using (' || pg_get_expr(p.polqual, p.polrelid) || ')',
                 'with check (' || pg_get_expr(p.polwithcheck, p.polrelid) || ')')
  FROM pg_policy p JOIN rel r ON r.oid = p.polrelid
UNION ALL
-- a function's whole definition is long: its hash stands for it
SELECT CASE p.prokind WHEN 'p' THEN 'procedure' WHEN 'a' THEN 'aggregate' ELSE 'function' END,
       quote_ident(n.nspname) || '.' || quote_ident(p.proname) || '(' || pg_get_function_identity_arguments(p.oid) || ')',
       CASE WHEN p.prokind = 'a' THEN 'md5 ' || md5((SELECT g::text FROM pg_aggregate g WHERE g.aggfnoid = p.oid))
            ELSE 'returns ' || coalesce(pg_get_function_result(p.oid), 'nothing') || ', md5 ' || md5(pg_get_functiondef(p.oid)) END
  FROM pg_proc p JOIN ns n ON n.oid = p.pronamespace
 WHERE p.oid NOT IN (SELECT objid FROM extension_owned WHERE classid = 'pg_proc'::regclass)
UNION ALL
SELECT 'type', quote_ident(n.nspname) || '.' || quote_ident(t.typname),
       CASE t.typtype
           WHEN 'e' THEN 'enum (' || (SELECT string_agg(quote_literal(enumlabel), ', ' ORDER BY enumsortorder)
                                      FROM pg_enum WHERE enumtypid = t.oid) || ')'
           WHEN 'd' THEN concat_ws(' ', 'domain ' || format_type(t.typbasetype, t.typtypmod),
                                   CASE WHEN t.typnotnull THEN 'not null' END,
                                   'default ' || t.typdefault,
                                   (SELECT string_agg(pg_get_constraintdef(k.oid), ' ' ORDER BY k.conname)
                                    FROM pg_constraint k WHERE k.contypid = t.oid))
           WHEN 'r' THEN 'range of ' || (SELECT format_type(rngsubtype, NULL) FROM pg_range WHERE rngtypid = t.oid)
           WHEN 'c' THEN 'composite (' || (SELECT string_agg(quote_ident(a.attname) || ' ' || format_type(a.atttypid, a.atttypmod),
                                                              ', ' ORDER BY a.attnum)
                                           FROM pg_attribute a WHERE a.attrelid = t.typrelid AND a.attnum > 0
                                             AND NOT a.attisdropped) || ')'
           ELSE 'base type' END
  FROM pg_type t JOIN ns n ON n.oid = t.typnamespace
 WHERE t.oid NOT IN (SELECT objid FROM extension_owned WHERE classid = 'pg_type'::regclass)
   AND (t.typtype IN ('e', 'd', 'r', 'b') AND t.typelem = 0 AND NOT (t.typtype = 'b' AND t.typarray = 0)
        OR t.typtype = 'c' AND (SELECT relkind FROM pg_class WHERE oid = t.typrelid) = 'c')
"""

# (kind, name) -> definition
Snapshot = dict[tuple[str, str], str]


class Difference(NamedTuple):
    """One object that differs: what was expected of it (None: it should not be there) and what was
    found (None: it is missing)."""

    object: str
    kind: str
    expected: str | None
    found: str | None

    def as_dict(self) -> dict[str, Any]:
        return self._asdict()

    def __str__(self) -> str:
        if self.expected is None:
            return f"{self.kind} {self.object} is there, and should not be"
        if self.found is None:
            return f"{self.kind} {self.object} is missing"
        return f"{self.kind} {self.object} is {self.found!r}, expected {self.expected!r}"


def snapshot(conn: Any, excluded_tables: Iterable[str] = (), excluded_schemas: Iterable[str] = (),
             lock_timeout: float | None = None, only: str | None = None) -> Snapshot:
    """The schema of the database `conn` (psycopg2) is on, leaving out `excluded_tables` (names as
    SQL would write them) and `excluded_schemas`. (Printing a default or a view's definition opens
    its table: with `lock_timeout`, a table another session holds ACCESS EXCLUSIVE is waited for
    that long at most, then the read fails with lock_not_available.)"""
    with conn.cursor() as cur:
        # (named on the session's search path, as Alembic and the job name them)
        cur.execute("SELECT coalesce(array_agg(to_regclass(t)::oid) FILTER (WHERE to_regclass(t) IS NOT NULL), '{}') "
                    "FROM unnest(%s::text[]) t", (list(excluded_tables),))
        excluded = cur.fetchone()[0]
        # (with the catalog alone on the search path, every name PostgreSQL prints is schema-qualified:
        # the same definitions whatever search path the session was given)
        cur.execute("BEGIN READ ONLY; SET LOCAL search_path = pg_catalog")
        if lock_timeout is not None:
            cur.execute("SELECT set_config('lock_timeout', %s, true)", (f"{max(int(lock_timeout * 1000), 1)}ms",))
        try:
            cur.execute(SNAPSHOT_SQL, {"excluded": excluded, "excluded_schemas": list(excluded_schemas), "only": only})
            rows = cur.fetchall()
        finally:
            cur.execute("ROLLBACK")
    return {(kind, name): definition for kind, name, definition in rows}


def differences(expected: Snapshot, found: Snapshot) -> list[Difference]:
    """Every object that is not the same in both, in a stable order (by name, then kind)."""
    keys = sorted(set(expected) | set(found), key=lambda key: (key[1], key[0]))
    return [Difference(name, kind, expected.get((kind, name)), found.get((kind, name)))
            for kind, name in keys if expected.get((kind, name)) != found.get((kind, name))]


def fingerprint(schema: Snapshot) -> str:
    """One sha256 of the whole schema: equal exactly when the snapshots are."""
    text = json.dumps(sorted([kind, name, definition] for (kind, name), definition in schema.items()))
    return hashlib.sha256(text.encode()).hexdigest()


def excluded_by_job(conn: Any, own: Any, version_table: Any) -> tuple[list[str], list[str]]:
    """What of a database is the job's or Alembic's, not the project's schema: (tables, schemas)."""
    tables = [t.identifier().as_string(conn) for t in own.all()] if own is not None else []
    if version_table is not None:
        tables.append(version_table.identifier().as_string(conn))
    schemas = [own.schema] if own is not None and own.own_schema else []
    return tables, schemas
