"""Revisions that end their own transaction, to run statements that cannot run inside one
(`CREATE INDEX CONCURRENTLY`): `op.get_bind().commit()`, `op.execute("COMMIT")`,
`with op.get_context().autocommit_block():`.

The job runs every one of them as Alembic runs it: such revisions ran in production years ago, and
a new environment must run them from the top as they are. What one commits before it fails stays,
while its version row does not, so a plain re-run would start it again over its own committed
work. So the job:

- reads each pending revision's source before anything runs (`ending`) and, for the shapes where a
  failure could leave committed work behind (work before the commit, more than one statement
  outside a transaction, two ends), says so first (`migration.nonatomic`), naming the revision and
  why;
- keeps a ledger of what the running revision has committed, statement by statement, on whichever
  connection and driver env.py gave it (`Ledger`), so that a failure names exactly what stayed and
  how to recover (the backup this run took), and is never retried over it. It listens when a
  pending revision ends its transaction by one of the idioms above;
- drops the INVALID index a failed `CREATE INDEX CONCURRENTLY` leaves, as PostgreSQL's
  documentation recommends, so that the re-run builds it again.

The shapes a re-run always completes: the transaction ended first thing (before any other
statement of the function), then one statement outside a transaction (an `autocommit_block()`
holding one, or one statement after `op.execute("COMMIT")`); or `op.get_bind().commit()` first,
after which the rest of the function runs in a new transaction that the job commits together with
the version row (SQLAlchemy begins it, but Alembic no longer commits it).
"""

from __future__ import annotations

import ast
import re
from typing import Any, Callable, NamedTuple

from psycopg2 import sql

from job import db
from job.config import VersionTable

_COMMIT_SQL = re.compile(r"^\s*(COMMIT|END)(\s+(WORK|TRANSACTION))?\s*;?\s*$", re.IGNORECASE)

# how to write a new revision of this kind so that it is atomic in effect (lint says it)
ADVICE = (
    "give each statement that must run outside a transaction (CREATE INDEX CONCURRENTLY...) a revision "
    "of its own whose function is only `with op.get_context().autocommit_block():` around that one "
    "statement, or end the transaction before anything else with `op.get_bind().commit()`"
)


class Ending(NamedTuple):
    """How a revision function ends its transaction, and, if a failure after its commit could leave
    committed work that a plain re-run trips over, why (`problem`)."""

    revision: str
    function: str
    idiom: str
    problem: str | None


def _tree(source: str) -> ast.Module | None:
    try:
        return ast.parse(source)
    except (SyntaxError, SystemError):
        # (Alembic has already imported it, so not a syntax error; SystemError: CPython 3.11 before
        # 3.11.8 can fail parsing once its AST constructor failed in the process, python/cpython#106905)
        return None


def _body(tree: ast.Module, function: str) -> list[ast.stmt] | None:
    """The statements of `function` (upgrade or downgrade) in a revision's tree; None if it has none."""
    return next((node.body for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == function), None)


def does_nothing(source: str, function: str) -> bool:
    """Whether `function` in a revision's `source` is missing or holds only inert statements (a
    docstring, `pass`, `bind = op.get_bind()`): an irreversible revision's `downgrade`. A source
    that cannot be read as Python is taken to do something."""
    tree = _tree(source)
    if tree is None:
        return False
    body = _body(tree, function)
    return body is None or all(_inert(s) for s in body)


def ending(source: str, revision: str, function: str) -> Ending | None:
    """How `function` (upgrade or downgrade) in a revision's `source` ends its transaction, if it does."""
    tree = _tree(source)
    body = _body(tree, function) if tree is not None else None
    if body is None:
        return None
    statements = [s for s in body if not _inert(s)]
    binds = _connections(body)
    found = [(index, _idiom(s, binds)) for index, s in enumerate(statements) if _idiom(s, binds)]
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


def _connections(body: list[ast.stmt]) -> set[str]:
    """The names a function binds to the migration's connection (`bind = op.get_bind()`): a commit()
    on one of them ends the transaction; a commit() on anything else (an ORM Session made on it,
    which joins the connection's transaction and leaves it open) does not."""
    names = set()
    for node in body:
        for assigned in ast.walk(node):
            if isinstance(assigned, ast.Assign) and _is_bind(assigned.value):
                names.update(target.id for target in assigned.targets if isinstance(target, ast.Name))
    return names


def _is_bind(node: ast.AST) -> bool:
    """`op.get_bind()`, `context.get_bind()`, `op.get_context().bind`, `...connection`."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get_bind":
        return True
    return isinstance(node, ast.Attribute) and node.attr in ("bind", "connection")


def _idiom(statement: ast.stmt, binds: set[str] = frozenset()) -> str | None:
    """The transaction-ending idiom `statement` is or holds, if any."""
    if isinstance(statement, ast.With):
        for item in statement.items:
            call = item.context_expr
            if isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and call.func.attr == "autocommit_block":
                return "autocommit_block()"
    for node in ast.walk(statement):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        if node.func.attr == "commit" and not node.args and (
                _is_bind(node.func.value) or (isinstance(node.func.value, ast.Name) and node.func.value.id in binds)):
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


_ALREADY_THERE = re.compile(r'relation "([^"]+)" already exists')


def already_there(error: BaseException) -> str | None:
    """The name of the relation a statement found already there (duplicate_table, 42P07), if that
    is how it failed: what a CREATE INDEX CONCURRENTLY meets where a killed run left its index."""
    cause = db.root_error(error)
    if db.sqlstate(error) != "42P07":
        return None
    found = _ALREADY_THERE.search(str(cause))
    return found.group(1) if found else None


def drop_invalid_index(conn: Any, name: str) -> str | None:
    """Drop the INVALID index `name`, as the session's search_path finds it, if that is what it is
    (in autocommit: DROP INDEX CONCURRENTLY cannot run in a transaction); return its name."""
    with conn.cursor() as cur:
        cur.execute("SELECT n.nspname, c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                    "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE NOT i.indisvalid AND c.relname = %s "
                    "ORDER BY array_position(current_schemas(true), n.nspname::text) NULLS LAST LIMIT 1", (name,))
        row = cur.fetchone()
        if row is None:
            return None
        cur.execute(sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(sql.Identifier(*row)))
    return f"{row[0]}.{row[1]}"


def version_row(version_table: VersionTable | None) -> Callable[[str], Any]:
    """Whether a statement is Alembic's own write of the version table's row (not a revision's work)."""
    name = version_table.name if version_table is not None else "alembic_version"
    return re.compile(rf'\s*(INSERT\s+INTO|UPDATE|DELETE\s+FROM)\s+("?\w+"?\.)?"?{re.escape(name)}"?[\s(]',
                      re.IGNORECASE).match


def is_commit(statement: str) -> bool:
    """Whether a statement is a literal COMMIT (`op.execute("COMMIT")`): the transaction ends there."""
    return bool(_COMMIT_SQL.match(statement))


# ---- what the running revision has committed -----------------------------------------------------

# how much of each statement the ledger keeps (a revision's data migration may be a page of SQL)
STATEMENT_TEXT = 160


class Ledger:
    """The statements the running revision has committed so far, whatever env.py's connection and
    driver: SQLAlchemy's events on every Engine (a statement run in autocommit, or after a literal
    COMMIT, is committed as it runs; the others when their transaction commits). Alembic's own
    statements on the version table are not the revision's work and are left out."""

    def __init__(self) -> None:
        self.revision: str | None = None
        self.committed: list[str] = []
        self._pending: list[str] = []
        self._outside = False  # after a literal COMMIT: the server runs each statement on its own
        self._version_table: VersionTable | None = None
        # whether a statement is Alembic's own on the version table (not the revision's work)
        self._version_row: Any = lambda statement: None
        self._listening = False

    def open(self, revision: str, version_table: VersionTable | None) -> None:
        """Start the ledger of `revision` (its transaction has not begun)."""
        self.revision = revision
        if version_table != self._version_table:
            self._version_row = version_row(version_table)
            self._version_table = version_table
        self.committed, self._pending, self._outside = [], [], False

    def close(self) -> None:
        """The revision's own work is over (its version row is written): stop listening to it."""
        self.revision = None

    def stop(self) -> list[str]:
        """The running revision failed or was interrupted: what it had committed (the rest rolls back)."""
        committed = self.committed if self.revision is not None else []
        self.revision, self.committed, self._pending = None, [], []
        return committed

    def listen(self) -> None:
        """Listen on every Engine: before env.py makes its own, since a SQLAlchemy connection takes
        in only the listeners there were when it was made."""
        if self._listening:
            return
        from sqlalchemy import event
        from sqlalchemy.engine import Engine

        event.listen(Engine, "after_cursor_execute", self._executed)
        event.listen(Engine, "commit", self._commit)
        event.listen(Engine, "rollback", self._rollback)
        self._listening = True

    def _executed(self, conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if self.revision is None:
            return
        if _COMMIT_SQL.match(statement):
            self._commit(conn)
            self._outside = True
            return
        if self._version_row(statement):
            return
        text = " ".join(statement.split())
        text = text if len(text) <= STATEMENT_TEXT else text[:STATEMENT_TEXT] + "…"
        (self.committed if self._outside or autocommit(conn) else self._pending).append(text)

    def _commit(self, _conn: Any) -> None:
        if self.revision is not None:
            self.committed.extend(self._pending)
            self._pending, self._outside = [], False

    def _rollback(self, _conn: Any) -> None:
        if self.revision is not None:
            self._pending, self._outside = [], False



def autocommit(conn: Any) -> bool:
    """Whether a SQLAlchemy connection's driver connection runs each statement on its own (Alembic's
    autocommit_block sets that through the isolation level, on every driver)."""
    try:
        return bool(conn.connection.dbapi_connection.autocommit)
    except Exception:
        return False


ledger = Ledger()
