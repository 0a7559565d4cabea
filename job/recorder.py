"""What each statement of a rehearsed revision did to the database (job.rehearse): how long it ran,
every table lock it took and how long the strongest was held, the tables it rewrote, the indexes
it built, the rows it changed.

Whatever env.py's connection and driver, through SQLAlchemy's events on every Engine (as
job.commits' ledger listens). After each statement of a running revision, one catalog query on
the very same session, inside the revision's transaction (`AFTER_SQL`):

- the relation locks the session holds. A lock is held to the end of its transaction, so each is
  held from the start of the statement that first holds it to the commit;
- every relation's storage (relfilenode): a table rewritten (a type change, a volatile default,
  VACUUM FULL) gets new storage, an index built is a new index or new storage for one;
- the rows each table has changed in the transaction (pg_stat_xact_user_tables).

A statement that runs outside a transaction (in an `autocommit_block()`, after a literal COMMIT)
holds its locks only while it runs: a connection of the recorder's own samples them every SAMPLE
seconds meanwhile (so a lock such a statement holds for less than that may go unseen: it is
then held too briefly to matter).

The recorder's own queries on env.py's connection go through its DBAPI cursor (db.fetch_literal),
which SQLAlchemy's events do not see: they are never taken for the revision's.

Which tables had rows is read as each revision starts (their storage is not empty): an exclusive
lock on a table made in the same revision keeps nobody waiting.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from typing import Any, NamedTuple

from job import commits, db
from job.config import VersionTable
from job.errors import ConfigError
from job.logs import log

# PostgreSQL's table lock modes, weakest first (pg_locks spells them so)
MODES = ("AccessShareLock", "RowShareLock", "RowExclusiveLock", "ShareUpdateExclusiveLock", "ShareLock",
         "ShareRowExclusiveLock", "ExclusiveLock", "AccessExclusiveLock")
ACCESS_EXCLUSIVE = "AccessExclusiveLock"
# what a mode keeps the application from doing while it is held (the documentation's conflict table)
BLOCKS = {"AccessExclusiveLock": "reads and writes", "ExclusiveLock": "writes", "ShareRowExclusiveLock": "writes",
          "ShareLock": "writes"}

# how often the locks of a statement outside a transaction are looked at, seconds
SAMPLE = 0.05
STATEMENT_TEXT = 160


def mode_name(mode: str) -> str:
    """AccessExclusiveLock -> ACCESS EXCLUSIVE, as SQL's LOCK statement names it."""
    words = "".join(f" {c}" if c.isupper() else c for c in mode.removesuffix("Lock")).strip()
    return words.upper()


@dataclasses.dataclass
class Statement:
    """One statement of a revision, and what it did."""

    sql: str
    started: float
    seconds: float = 0.0
    in_transaction: bool = True
    locks: list[tuple[int, str]] = dataclasses.field(default_factory=list)  # (relation oid, mode) it took
    rewrote: list[str] = dataclasses.field(default_factory=list)
    indexes_built: list[str] = dataclasses.field(default_factory=list)
    rows: int | None = None

    def as_dict(self, names: dict[int, str]) -> dict[str, Any]:
        return {"sql": self.sql, "seconds": round(self.seconds, 3), "in_transaction": self.in_transaction,
                "locks": [{"relation": names.get(oid, f"oid {oid}"), "mode": mode_name(mode)} for oid, mode in self.locks],
                "rewrote": self.rewrote, "indexes_built": self.indexes_built, "rows": self.rows}


class Hold(NamedTuple):
    """A lock a revision held: on which relation, in which mode, for how long, taken by which statement."""

    relation: int
    mode: str
    seconds: float
    statement: int


@dataclasses.dataclass
class Revision:
    """What one revision did, statement by statement."""

    revision: str
    description: str
    direction: str
    started: float
    # tables (oids) that held rows as it started
    had_rows: set[int]
    seconds: float = 0.0
    failed: bool = False
    statements: list[Statement] = dataclasses.field(default_factory=list)
    holds: list[Hold] = dataclasses.field(default_factory=list)
    names: dict[int, str] = dataclasses.field(default_factory=dict)

    def strongest(self) -> list[dict[str, Any]]:
        """Per relation, the strongest lock held and the longest it was held, strongest first."""
        best: dict[int, Hold] = {}
        for hold in self.holds:
            known = best.get(hold.relation)
            if known is None or (MODES.index(hold.mode), hold.seconds) > (MODES.index(known.mode), known.seconds):
                best[hold.relation] = hold
        ordered = sorted(best.values(), key=lambda h: (-MODES.index(h.mode), -h.seconds, self.name(h.relation)))
        return [{"relation": self.name(h.relation), "mode": mode_name(h.mode), "held_seconds": round(h.seconds, 3),
                 "blocks": BLOCKS.get(h.mode, "nothing the application does"), "had_rows": h.relation in self.had_rows,
                 "statement": h.statement} for h in ordered]

    def longest_exclusive(self) -> tuple[str, float] | None:
        """The longest ACCESS EXCLUSIVE hold on a table that had rows: (table, seconds)."""
        holds = [h for h in self.holds if h.mode == ACCESS_EXCLUSIVE and h.relation in self.had_rows]
        if not holds:
            return None
        longest = max(holds, key=lambda h: h.seconds)
        return self.name(longest.relation), longest.seconds

    def rewritten(self) -> list[str]:
        return sorted({name for s in self.statements for name in s.rewrote})

    def indexes_built(self) -> list[str]:
        return sorted({name for s in self.statements for name in s.indexes_built})

    def rows_changed(self) -> int:
        return sum(s.rows or 0 for s in self.statements)

    def name(self, oid: int) -> str:
        return self.names.get(oid, f"oid {oid}")

    def as_dict(self) -> dict[str, Any]:
        longest = self.longest_exclusive()
        return {"revision": self.revision, "description": self.description, "direction": self.direction,
                "seconds": round(self.seconds, 3), "failed": self.failed, "locks": self.strongest(),
                "longest_exclusive": {"relation": longest[0], "seconds": round(longest[1], 3)} if longest else None,
                "rewritten": self.rewritten(), "indexes_built": self.indexes_built(), "rows_changed": self.rows_changed(),
                "statements": [s.as_dict(self.names) for s in self.statements]}


def _projects(own_schema: str | None, version_table: VersionTable) -> str:
    """A condition on pg_class c (joined to pg_namespace n): a relation of the project's, not of the
    catalogs, the job's own schema or Alembic's version table."""
    quoted = ".".join('"' + part.replace('"', '""') + '"' for part in (version_table.schema, version_table.name) if part)
    own = f", {db.literal(own_schema)}" if own_schema else ""
    return (f"n.nspname NOT IN ('pg_catalog', 'information_schema'{own}) AND n.nspname NOT LIKE 'pg\\_%' "
            f"AND c.oid IS DISTINCT FROM to_regclass({db.literal(quoted)}) AND c.oid NOT IN "
            f"(SELECT indexrelid FROM pg_index WHERE indrelid = to_regclass({db.literal(quoted)}))")


# every relation with storage: oid, its storage, kind, name, the table of an index
STORAGE_SQL = """
SELECT coalesce(json_agg(json_build_array(c.oid, c.relfilenode, c.relkind,
                                          quote_ident(n.nspname) || '.' || quote_ident(c.relname), i.indrelid{rows})), '[]')
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace LEFT JOIN pg_index i ON i.indexrelid = c.oid
WHERE c.relkind IN ('r', 'm', 'i', 'p', 'I', 'S') AND {projects}
"""

AFTER_SQL = """
SELECT pg_backend_pid(), now() <> statement_timestamp(),
  (SELECT coalesce(json_agg(json_build_array(l.relation, l.mode)), '[]')
   FROM pg_locks l JOIN pg_class c ON c.oid = l.relation JOIN pg_namespace n ON n.oid = c.relnamespace
   WHERE l.pid = pg_backend_pid() AND l.locktype = 'relation' AND l.granted AND {projects}),
  ({storage}),
  (SELECT coalesce(json_agg(json_build_array(c.oid, s.n_tup_ins + s.n_tup_upd + s.n_tup_del)), '[]')
   FROM pg_stat_xact_user_tables s JOIN pg_class c ON c.oid = s.relid JOIN pg_namespace n ON n.oid = c.relnamespace
   WHERE s.n_tup_ins + s.n_tup_upd + s.n_tup_del > 0 AND {projects})
"""

SAMPLE_SQL = """
SELECT l.relation, l.mode FROM pg_locks l JOIN pg_class c ON c.oid = l.relation JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE l.pid = {pid} AND l.locktype = 'relation' AND l.granted AND {projects}
"""


class Recorder:
    """Listens while revisions run (a job.stepper observer, and SQLAlchemy's events); `revisions`
    holds what each did. `recording` is False for passes that are only timed (a round trip's)."""

    def __init__(self, connect_kwargs: dict[str, str], own_schema: str | None, version_table: VersionTable,
                 copy: str | None = None) -> None:
        # the database every statement must run on (the rehearsal's copy): an env.py that builds its
        # engine from a URL of its own (not sqlalchemy.url) would otherwise migrate the live one
        self.copy = copy
        self.connect_kwargs = {**connect_kwargs, "application_name":
                               f"{connect_kwargs.get('application_name', 'migrate-job')}/recorder"[:63]}
        projects = _projects(own_schema, version_table)
        self._storage_sql = STORAGE_SQL.format(rows=", c.relkind IN ('r', 'm') AND pg_relation_size(c.oid) > 0",
                                               projects=projects)
        self._after_sql = AFTER_SQL.format(projects=projects, storage=STORAGE_SQL.format(rows="", projects=projects))
        self._sample_sql = SAMPLE_SQL.replace("{projects}", projects)  # ({pid} is filled in as it samples)
        self._version_row = commits.version_row(version_table)
        self.revisions: list[Revision] = []
        self.recording = True
        self._current: Revision | None = None
        self._storage: dict[int, tuple[Any, ...]] = {}
        self._counts: dict[int, int] = {}
        self._open: dict[tuple[int, str], tuple[float, int]] = {}
        self._outside = False  # after a literal COMMIT: each statement runs on its own
        self._side: Any = None
        self._sampler = _Sampler(self)
        self._listening = False

    # ---- the stepper's observer -----------------------------------------------------------------

    def started(self, step: Any, direction: str, _connection: Any) -> None:
        if not self.recording:
            return
        with self.side().cursor() as cur:
            cur.execute(self._storage_sql)
            storage = _json(cur.fetchone()[0])
        self._storage = {row[0]: tuple(row[:5]) for row in storage}
        self._current = Revision(step.revision, step.description, direction, time.monotonic(),
                                 had_rows={row[0] for row in storage if row[5]},
                                 names={row[0]: row[3] for row in storage})
        self._counts, self._open, self._outside = {}, {}, False

    def committed(self, step: Any, _direction: str, seconds: float) -> None:
        if self._current is None or self._current.revision != step.revision:
            return
        self._transaction_ended()
        self._current.seconds = seconds
        self.revisions.append(self._current)
        self._current = None

    def failed(self, step: Any, _direction: str) -> None:
        if self._current is None or self._current.revision != step.revision:
            return
        self._transaction_ended()
        self._current.failed, self._current.seconds = True, time.monotonic() - self._current.started
        self.revisions.append(self._current)
        self._current = None

    # ---- SQLAlchemy's events --------------------------------------------------------------------

    def listen(self) -> None:
        """Before env.py makes its engine (a connection takes in the listeners there are then)."""
        if self._listening:
            return
        from sqlalchemy import event
        from sqlalchemy.engine import Engine

        event.listen(Engine, "before_cursor_execute", self._before)
        event.listen(Engine, "after_cursor_execute", self._after)
        event.listen(Engine, "handle_error", self._error)
        event.listen(Engine, "commit", self._ended)
        event.listen(Engine, "rollback", self._ended)
        self._listening = True

    def _ours(self, statement: str) -> bool:
        """Whether a statement is the running revision's own work."""
        return self._current is not None and not self._version_row(statement)

    def _before(self, conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if self.copy is not None and not conn.info.get("migrate_job.on_copy"):
            self._refuse_another_database(conn)
        if not self._ours(statement):
            return
        conn.info["migrate_job.started"] = time.monotonic()
        if self._outside or commits.autocommit(conn):
            pid = conn.info.get("migrate_job.pid")
            if pid is None:
                pid = conn.info["migrate_job.pid"] = db.fetch_literal(conn, "SELECT pg_backend_pid()")[0]
            self._sampler.begin(pid)

    def _after(self, conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        if not self._ours(statement):
            return
        revision, started = self._current, conn.info.pop("migrate_job.started", time.monotonic())
        sampled = self._sampler.end()
        if commits.is_commit(statement):
            self._transaction_ended()
            self._outside = True
            return
        text = " ".join(statement.split())
        found = Statement(text if len(text) <= STATEMENT_TEXT else text[:STATEMENT_TEXT] + "…", started,
                          seconds=time.monotonic() - started)
        pid, in_transaction, locks, storage, counts = db.fetch_literal(conn, self._after_sql)
        conn.info["migrate_job.pid"] = pid
        index = len(revision.statements)
        found.in_transaction = bool(in_transaction)
        if found.in_transaction:
            for oid, mode in _json(locks):
                if (oid, mode) not in self._open:
                    self._open[(oid, mode)] = (started, index)
                    found.locks.append((oid, mode))
            counts = {oid: n for oid, n in _json(counts)}
            found.rows = sum(n - self._counts.get(oid, 0) for oid, n in counts.items())
            self._counts = counts
        else:
            found.locks = sorted(sampled)
            revision.holds.extend(Hold(oid, mode, found.seconds, index) for oid, mode in found.locks)
            found.rows = cursor.rowcount if getattr(cursor, "rowcount", -1) is not None and cursor.rowcount >= 0 else None
        self._compare_storage(found, _json(storage))
        revision.statements.append(found)

    def _refuse_another_database(self, conn: Any) -> None:
        """Before the first statement of each connection env.py makes: it must be on the copy."""
        name = db.fetch_literal(conn, "SELECT current_database()")[0]
        if name != self.copy:
            raise ConfigError(f"env.py connected to the database {name!r}, not to the rehearsal's copy {self.copy!r}: "
                              "it builds its engine from a URL of its own, not from sqlalchemy.url (which the job "
                              "sets), so a rehearsal would change that database. Refused before its statement ran; "
                              "make env.py read config.get_main_option('sqlalchemy.url')")
        conn.info["migrate_job.on_copy"] = True

    def _error(self, _context: Any) -> None:
        self._sampler.end()

    def _ended(self, _conn: Any) -> None:
        """A transaction of env.py's ended (committed or rolled back): its locks are released."""
        if self._current is not None:
            self._transaction_ended()

    def _transaction_ended(self) -> None:
        now = time.monotonic()
        self._current.holds.extend(Hold(oid, mode, now - since, index)
                                   for (oid, mode), (since, index) in self._open.items())
        self._open, self._counts = {}, {}

    def _compare_storage(self, found: Statement, storage: list[list[Any]]) -> None:
        revision = self._current
        now = {row[0]: tuple(row[:5]) for row in storage}
        for oid, (_, relfilenode, kind, name, table) in now.items():
            revision.names[oid] = name
            before = self._storage.get(oid)
            if kind in ("r", "m") and before is not None and before[1] and before[1] != relfilenode:
                found.rewrote.append(name)
            elif kind == "i" and (before is None or before[1] != relfilenode):
                found.indexes_built.append(name)
        self._storage = now

    # ---- the recorder's own connection ----------------------------------------------------------

    def side(self) -> Any:
        if self._side is None:
            self._side = db.connect(self.connect_kwargs)
        return self._side

    def close(self) -> None:
        self._sampler.stop()
        if self._side is not None:
            self._side.close()
            self._side = None


class _Sampler:
    """The locks a statement outside a transaction holds while it runs, looked at every SAMPLE
    seconds from a connection of its own (a thread, started with the first such statement)."""

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder
        self._pid: int | None = None
        self._seen: set[tuple[int, str]] = set()
        self._changed = threading.Condition()
        self._stopped = False
        self._thread: threading.Thread | None = None
        self._conn: Any = None

    def begin(self, pid: int) -> None:
        with self._changed:
            self._pid, self._seen = pid, set()
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="lock-sampler", daemon=True)
                self._thread.start()
            self._changed.notify()

    def end(self) -> set[tuple[int, str]]:
        with self._changed:
            seen, self._pid, self._seen = self._seen, None, set()
            return seen

    def stop(self) -> None:
        with self._changed:
            self._stopped, self._pid = True, None
            self._changed.notify()
        if self._thread is not None:
            self._thread.join(timeout=2)
        if self._conn is not None:
            self._conn.close()

    def _loop(self) -> None:
        try:
            self._conn = db.connect(self.recorder.connect_kwargs)
            while True:
                with self._changed:
                    while self._pid is None and not self._stopped:
                        self._changed.wait()
                    if self._stopped:
                        return
                    pid = self._pid
                with self._conn.cursor() as cur:
                    cur.execute(self.recorder._sample_sql.format(pid=int(pid)))
                    rows = {(oid, mode) for oid, mode in cur.fetchall()}
                with self._changed:
                    if self._pid == pid:
                        self._seen |= rows
                time.sleep(SAMPLE)
        except BaseException as e:  # (sampling never fails the rehearsal: its report says less)
            log.debug("recorder.sampler_stopped", error=str(e))


def _json(value: Any) -> Any:
    """json from any driver: psycopg2 and psycopg 3 parse it, asyncpg hands over the text."""
    return json.loads(value) if isinstance(value, (str, bytes)) else value
