"""What a running revision is doing to the live database, watched from a connection of the job's
own: who blocks it while it waits for a lock, how far a long statement has got.

A thread beside the revisions. It connects only once a revision has run for a moment (a history of
quick revisions never pays for it), then every TICK asks pg_stat_activity about the sessions the
revision runs on (the job's own, and every one env.py opened):

- one waiting for a lock: `migration.blocked`, with each session that actually blocks it (the lock
  graph, pg_blocking_pids: not merely the oldest open transactions), first after BLOCKED_AFTER and
  then at every progress interval; what it saw last is what `migration.retry` and the final error
  name. With MIGRATE_END_IDLE_BLOCKERS_AFTER, a blocker idle in its transaction longer than that is
  ended (`migration.blocker_ended`);
- every MIGRATE_PROGRESS_INTERVAL seconds: `migration.progress`, running or waiting, and what
  PostgreSQL's progress views say of the statement (an index build's phase, blocks and tuples done
  of total; CLUSTER and VACUUM FULL rewrites; COPY; ANALYZE), with a percentage and an estimate of
  the time left where they give totals. On a terminal, one line on stderr that updates.

(strong_migrations and Atlas check a migration's SQL before it runs; neither watches it run.)
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any, Callable, NamedTuple

from job import db, sessions
from job.errors import first_line
from job.logs import log

# how often the thread looks; after how long a revision is watched at all, and a lock wait reported
TICK = 0.25
WATCH_AFTER = 0.5
BLOCKED_AFTER = 1.0
QUERY_TEXT = 200

ACTIVE_SQL = """
SELECT pid, wait_event_type = 'Lock', extract(epoch FROM now() - query_start), left(query, %(text)s),
       pg_blocking_pids(pid)
FROM pg_stat_activity WHERE pid = ANY(%(pids)s) AND state = 'active'
"""

BLOCKERS_SQL = """
SELECT pid, application_name, coalesce(host(client_addr), 'local'), state, backend_type,
       extract(epoch FROM now() - xact_start), extract(epoch FROM now() - state_change), left(query, %(text)s)
FROM pg_stat_activity WHERE pid = ANY(%(pids)s) ORDER BY xact_start NULLS LAST
"""

# what PostgreSQL's progress views say of a session's statement: (what, phase, done, total, unit)
PROGRESS_SQL = """
SELECT pid, 'create index', phase, blocks_done, blocks_total, 'blocks', tuples_done, tuples_total
  FROM pg_stat_progress_create_index WHERE pid = ANY(%(pids)s)
UNION ALL
SELECT pid, lower(command), phase, heap_blks_scanned, heap_blks_total, 'blocks', heap_tuples_scanned, NULL
  FROM pg_stat_progress_cluster WHERE pid = ANY(%(pids)s)
UNION ALL
SELECT pid, 'copy ' || lower(command), type, bytes_processed, nullif(bytes_total, 0), 'bytes', tuples_processed, NULL
  FROM pg_stat_progress_copy WHERE pid = ANY(%(pids)s)
UNION ALL
SELECT pid, 'analyze', phase, sample_blks_scanned, sample_blks_total, 'blocks', NULL, NULL
  FROM pg_stat_progress_analyze WHERE pid = ANY(%(pids)s)
UNION ALL
SELECT pid, 'vacuum', phase, heap_blks_scanned, heap_blks_total, 'blocks', NULL, NULL
  FROM pg_stat_progress_vacuum WHERE pid = ANY(%(pids)s)
"""


class Blocker(NamedTuple):
    """A session that blocks the revision's statement."""

    pid: int
    application_name: str
    client_addr: str
    state: str | None
    backend_type: str | None
    transaction_seconds: float | None
    state_seconds: float | None
    query: str | None

    def as_dict(self) -> dict[str, Any]:
        return {"pid": self.pid, "application_name": self.application_name, "client_addr": self.client_addr,
                "state": self.state, "transaction_seconds": _rounded(self.transaction_seconds),
                "query": self.query}

    def __str__(self) -> str:
        age = f", its transaction {self.transaction_seconds:.0f} s old" if self.transaction_seconds else ""
        return (f"pid {self.pid} ({self.application_name or 'no application_name'}, {self.client_addr}, "
                f"{self.state or self.backend_type}{age}: {(self.query or '').strip()[:80]!r})")


class Watchdog:
    """`with Watchdog(...) as watchdog:` around the revisions; `watch(running)` names what runs."""

    def __init__(self, connect_kwargs: dict[str, str], holder_pid: int | None, progress_every: float,
                 end_idle_after: float = 0.0) -> None:
        self.connect_kwargs = {**connect_kwargs,
                               "application_name": f"{connect_kwargs.get('application_name', 'migrate-job')}"
                                                   "/watchdog"[:63]}
        self.holder_pid, self.progress_every, self.end_idle_after = holder_pid, progress_every, end_idle_after
        # the blockers seen last while a statement of the running revision waited
        self.blockers: list[Blocker] = []
        self._running: Callable[[], tuple[Any, float]] = lambda: (None, 0.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="watchdog", daemon=True)
        self._conn: Any = None
        self._seen: Any = None  # the revision the reports below are of
        self._next_blocked = self._next_progress = 0.0
        self._tty = sys.stderr is not None and sys.stderr.isatty()

    def __enter__(self) -> Watchdog:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        if self._tty and self._seen is not None:
            sys.stderr.write("\n")
        if self._conn is not None and not self._thread.is_alive():
            self._conn.close()

    def watch(self, running: Callable[[], tuple[Any, float]]) -> None:
        """What runs now: (the running revision or None, when it started, monotonic)."""
        self._running = running

    def _loop(self) -> None:
        while not self._stop.wait(TICK):
            try:
                self._tick()
            except BaseException as e:  # the watchdog never fails the run (a signal's deadline ends it too)
                log.debug("watchdog.stopped", error=first_line(e))
                return

    def _tick(self) -> None:
        step, started = self._running()
        now = time.monotonic()
        if step is None or now - started < WATCH_AFTER:
            return
        if step is not self._seen:
            self._seen, self.blockers = step, []
            self._next_blocked = started + BLOCKED_AFTER
            self._next_progress = started + self.progress_every
        if self._conn is None:
            self._conn = db.connect(self.connect_kwargs)
        pids = sorted({pid for pid, _ in sessions.sessions.opened} | ({self.holder_pid} if self.holder_pid else set()))
        with self._conn.cursor() as cur:
            cur.execute(ACTIVE_SQL, {"pids": pids, "text": QUERY_TEXT})
            active = cur.fetchall()
        waiting = [row for row in active if row[1]]
        if waiting and now >= self._next_blocked:
            self._blocked(step, waiting, now - started)
            self._next_blocked = now + (self.progress_every or 10.0)
        if self.progress_every and now >= self._next_progress:
            self._progress(step, active, bool(waiting), now - started)
            self._next_progress = now + self.progress_every

    def _blocked(self, step: Any, waiting: list[tuple], elapsed: float) -> None:
        blocking = sorted({pid for row in waiting for pid in row[4] or ()})
        with self._conn.cursor() as cur:
            cur.execute(BLOCKERS_SQL, {"pids": blocking, "text": QUERY_TEXT})
            self.blockers = [Blocker(*row) for row in cur.fetchall()]
        log.warning("migration.blocked", revision=step.revision, waited=_rounded(min(float(row[2] or 0) for row in waiting)),
                    statement=waiting[0][3], elapsed=_rounded(elapsed), blockers=[b.as_dict() for b in self.blockers])
        if self.end_idle_after:
            for blocker in self.blockers:
                if blocker.state in ("idle in transaction", "idle in transaction (aborted)") \
                        and (blocker.state_seconds or 0) >= self.end_idle_after:
                    with self._conn.cursor() as cur:
                        cur.execute("SELECT pg_terminate_backend(%s)", (blocker.pid,))
                        ended = cur.fetchone()[0]
                    if ended:
                        log.warning("migration.blocker_ended", revision=step.revision, **blocker.as_dict(),
                                    idle_seconds=_rounded(blocker.state_seconds),
                                    reason="idle in its transaction longer than MIGRATE_END_IDLE_BLOCKERS_AFTER")

    def _progress(self, step: Any, active: list[tuple], waiting: bool, elapsed: float) -> None:
        with self._conn.cursor() as cur:
            cur.execute(PROGRESS_SQL, {"pids": [row[0] for row in active]})
            views = cur.fetchall()
        statement_seconds = max((float(row[2] or 0) for row in active), default=0.0)
        progress = [_described(view, statement_seconds) for view in views]
        state = "waiting for a lock" if waiting else "running" if active else "between statements"
        log.info("migration.progress", revision=step.revision, elapsed=_rounded(elapsed), state=state,
                 statement=active[0][3] if active else None, progress=progress)
        if self._tty:
            done = next((p for p in progress if p.get("percent") is not None), None)
            line = f"{step.revision}: {state} {elapsed:.0f} s" + (
                f", {done['what']} {done['phase']}: {done['percent']}%" if done else "")
            sys.stderr.write("\r" + line[:120].ljust(120))
            sys.stderr.flush()


def _described(view: tuple, statement_seconds: float) -> dict[str, Any]:
    """A progress view's row as a report: what, phase, done of total, percent and an estimate."""
    _pid, what, phase, done, total, unit, tuples_done, tuples_total = view  # bigints: ints, never Decimal
    if not total and tuples_total:
        done, total, unit = tuples_done, tuples_total, "tuples"
    found: dict[str, Any] = {"what": what, "phase": phase, "done": done, "total": total, "unit": unit}
    if total and done is not None:
        fraction = min(max(done / total, 0.0), 1.0)
        found["percent"] = round(100 * fraction, 1)
        if fraction > 0.01:
            found["seconds_left"] = round(statement_seconds * (1 - fraction) / fraction, 1)
    if tuples_done is not None and unit != "tuples":
        found["tuples_done"] = tuples_done
    return found


def _rounded(value: Any) -> Any:
    return round(float(value), 3) if value is not None else None
