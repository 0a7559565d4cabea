"""Revisions that end their own transaction, to run statements that cannot run inside one
(`CREATE INDEX CONCURRENTLY`): `op.get_bind().commit()`, `op.execute("COMMIT")`,
`with op.get_context().autocommit_block():`.

Whatever such a revision committed before it failed stays, while its version row does not: a
plain re-run would start it again from the top and trip over its own first statements. So the
job runs only the shapes a re-run can always complete, and refuses the others before anything
runs, saying what to write instead (read from the revision's source, not by running it):

- the transaction is ended first thing: `op.get_bind().commit()` (or `op.execute("COMMIT")`,
  `with autocommit_block():`) comes before any other statement of the function;
- what runs outside a transaction is one statement: an `autocommit_block()` holds one, and a
  function ending its transaction with `op.execute("COMMIT")` has one more statement after it;
- after `op.get_bind().commit()`, the rest of the function runs in a new transaction that the job
  commits together with the version row (SQLAlchemy begins it, but Alembic no longer commits it).

A one-statement failure outside a transaction is `CREATE INDEX CONCURRENTLY` leaving an INVALID
index behind; the job drops such indexes that the failed revision left, as PostgreSQL's
documentation recommends, so that the re-run can build it again.
"""

from __future__ import annotations

import ast
import re
from typing import Any, NamedTuple

from psycopg2 import sql

_COMMIT_SQL = re.compile(r"^\s*(COMMIT|END)(\s+(WORK|TRANSACTION))?\s*;?\s*$", re.IGNORECASE)

ADVICE = (
    "give each statement that must run outside a transaction (CREATE INDEX CONCURRENTLY...) a revision "
    "of its own whose function is only `with op.get_context().autocommit_block():` around that one "
    "statement, or end the transaction before anything else with `op.get_bind().commit()`"
)


class Ending(NamedTuple):
    """How a revision function ends its transaction, and whether a re-run could complete it."""

    revision: str
    function: str
    idiom: str
    problem: str | None


def ending(source: str, revision: str, function: str) -> Ending | None:
    """How `function` (upgrade or downgrade) in a revision's `source` ends its transaction, if it does."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None  # Alembic has already imported it: this does not happen
    body = next((node.body for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == function), None)
    if body is None:
        return None
    statements = [s for s in body if not _inert(s)]
    found = [(index, _idiom(s)) for index, s in enumerate(statements) if _idiom(s)]
    if not found:
        return None
    index, idiom = found[0]
    problem = None
    if index > 0:
        problem = f"it changes the schema before it ends its transaction with {idiom}"
    elif len(found) > 1:
        problem = "it ends its transaction more than once"
    elif idiom == "autocommit_block()" and len([s for s in statements[0].body if not _inert(s)]) != 1:
        problem = "its autocommit_block() holds more than one statement"
    elif idiom == "autocommit_block()" and len(statements) > 1:
        problem = "it runs more statements after its autocommit_block()"
    elif idiom == 'execute("COMMIT")' and len(statements) != 2:
        problem = 'it runs more than one statement after execute("COMMIT"), each committed on its own'
    return Ending(revision, function, idiom, problem)


def _inert(statement: ast.stmt) -> bool:
    """A docstring, `pass`, or naming what Alembic hands out (`bind = op.get_bind()`)."""
    if isinstance(statement, ast.Pass) or (isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant)):
        return True
    if isinstance(statement, ast.Assign) and isinstance(statement.value, ast.Call):
        func = statement.value.func
        return isinstance(func, ast.Attribute) and func.attr in ("get_bind", "get_context")
    return False


def _idiom(statement: ast.stmt) -> str | None:
    """The transaction-ending idiom `statement` is or holds, if any."""
    if isinstance(statement, ast.With):
        for item in statement.items:
            call = item.context_expr
            if isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and call.func.attr == "autocommit_block":
                return "autocommit_block()"
    for node in ast.walk(statement):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        if node.func.attr == "commit" and not node.args:
            return "commit()"
        if node.func.attr == "autocommit_block":
            return "autocommit_block()"
        if node.func.attr in ("execute", "exec_driver_sql") and node.args and _commit_sql(node.args[0]):
            return 'execute("COMMIT")'
    return None


def _commit_sql(argument: ast.expr) -> bool:
    if isinstance(argument, ast.Call) and argument.args:  # sa.text("COMMIT")
        argument = argument.args[0]
    return isinstance(argument, ast.Constant) and isinstance(argument.value, str) and bool(_COMMIT_SQL.match(argument.value))


# ---- an interrupted CREATE INDEX CONCURRENTLY ------------------------------------------------------

INVALID_INDEXES_SQL = """
SELECT n.nspname, c.relname FROM pg_index i
JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE NOT i.indisvalid
"""


def invalid_indexes(conn: Any) -> set[tuple[str, str]]:
    """The INVALID indexes in the database, (schema, name): what a failed CREATE INDEX CONCURRENTLY leaves."""
    with conn.cursor() as cur:
        cur.execute(INVALID_INDEXES_SQL)
        return {(schema, name) for schema, name in cur.fetchall()}


def drop_left_behind(conn: Any, before: set[tuple[str, str]]) -> list[str]:
    """Drop the INVALID indexes that were not there before the failed revision ran (in autocommit:
    DROP INDEX CONCURRENTLY cannot run in a transaction either); return their names."""
    left = sorted(invalid_indexes(conn) - before)
    with conn.cursor() as cur:
        for schema, name in left:
            cur.execute(sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(sql.Identifier(schema, name)))
    return [f"{schema}.{name}" for schema, name in left]
