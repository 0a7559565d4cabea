"""One revision per transaction: env.py runs once for the pending revisions and is handed them
one at a time (`Stepper`), so that the job logs and records each as it commits; a revision that
times out on a table lock is retried, and any other failure is told apart from a signal's cancel."""

from __future__ import annotations

import datetime as dt
import random
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

import psycopg2

from job import commits, db, plan, sessions
from job.errors import ConfigError, Interrupted, JobError, LockLost, MigrationFailed, first_line
from job.history import History, Interruption
from job.logs import log
from job.plan import Step, VersionTable

if TYPE_CHECKING:
    from job.migrate import Project
    from job.watchdog import Watchdog


# Who else watches the revisions run (a rehearsal's recorder, job.recorder): each is told as a
# revision starts (`started(step, direction, connection)`, before its transaction), ends
# (`committed(step, direction, seconds)`) or fails (`failed(step, direction)`; a revision retried
# after a lock timeout starts again).
observers: list[Any] = []

# what to do after a revision that committed part of its work failed, when the caller says nothing
UNDO_BY_HAND = "undo what it committed by hand (it is listed above), then run the job again"


def apply(
    project: Project,
    steps: list[Step],
    target: str,
    direction: str = "upgrade",
    lock_retries: int = 0,
    history: History | None = None,
    version_table: VersionTable | None = None,
    rows_within: bool = True,
    confirm_lock: Callable[[], None] | None = None,
    recovery: str = UNDO_BY_HAND,
    lock_held: str = "",
    watchdog: Watchdog | None = None,
) -> None:
    """Apply `steps` (upgrade or downgrade) one per transaction, logging each and recording it in
    `history`; raise MigrationFailed naming the one that failed.

    env.py runs once for all of them (a long history would otherwise pay for env.py, its engine and
    its first connection once per revision), and is handed them one at a time (`Stepper`). A
    revision whose DDL gave up waiting for a table lock (`lock_timeout`) is retried with backoff:
    the application's transactions go first, and the migration tries again when they have moved on.
    A revision that ends its own transaction and fails after committing part of its work is never
    retried: the error says what it committed (job.commits.Ledger) and `recovery`, what to do.
    """
    pending = list(steps)
    retried: dict[str, int] = {}
    endings = project.transaction_endings(pending, direction)
    # revisions that commit statements on their own which an earlier run was killed in the middle of
    interrupted = history.interrupted(endings, direction) if history is not None and endings else {}
    for revision, interruption in interrupted.items():
        log.warning("migration.interrupted_before", revision=revision, run=interruption.run_id,
                    host=interruption.host, started_at=interruption.started_at.isoformat())
    cleared: set[str] = set()
    if endings:
        # (only then: listening to every statement costs a long history of plain revisions about 9%,
        # `make bench`; before env.py runs, since a connection takes in the listeners there are then)
        commits.ledger.listen()
    while pending:
        stepper = Stepper(project, pending, target, direction, history, endings, rows_within, confirm_lock, lock_held)
        if watchdog is not None:
            watchdog.watch(lambda: (stepper.running, stepper._started[0]))
        try:
            project.run_env(stepper, on_version_apply=stepper.applied)
        except Interrupted as e:
            committed = commits.ledger.stop()
            if committed and stepper.running is not None:
                e.left_behind = _left_behind(stepper.running, committed, recovery)
            stepper.failed("interrupted", e.left_behind)
            stepper.clean_up()
            raise
        except BaseException as e:  # whatever a revision raises (sys.exit() included) is its failure
            committed = commits.ledger.stop()
            stepper.clean_up()
            step = stepper.running
            if step is None and not stepper.done and db.received_signal() is None and not isinstance(
                    e, (MigrationFailed, ConfigError)):
                raise ConfigError(
                    f"the Alembic environment (env.py) failed before revision {pending[0].revision} could run: "
                    f"{type(e).__name__}: {first_line(e)}{async_hint(e)}"
                ) from None
            if isinstance(e, JobError) and not isinstance(e, MigrationFailed):
                raise  # the job's own verdict (a refused connection, a lost lock), not the revision's
            if (step is not None and not committed and _is_transient(e)
                    and retried.get(step.revision, 0) < lock_retries):
                retried[step.revision] = retried.get(step.revision, 0) + 1
                _back_off(project, step, retried[step.revision], lock_retries, e, watchdog)
                pending = pending[len(stepper.done):]
                continue
            if (step is not None and step.revision in interrupted and step.revision not in cleared
                    and not committed and stepper.clear_interrupted_build(e, interrupted[step.revision])):
                cleared.add(step.revision)  # (once: what is in the way now is not what the killed run left)
                pending = pending[len(stepper.done):]
                continue
            failure = e if isinstance(e, MigrationFailed) else _failure(step or pending[0], e, project, watchdog)
            if step is not None and step.revision in interrupted and not isinstance(failure, Interrupted):
                failure = MigrationFailed(f"{failure}. {_after_interruption(step, interrupted[step.revision])}",
                                          revision=step.revision)
            if committed and step is not None:
                left_behind = _left_behind(step, committed, recovery)
                if isinstance(failure, Interrupted):
                    failure.left_behind = left_behind
                else:
                    failure = MigrationFailed(f"{failure}. {left_behind}", revision=step.revision)
            stepper.failed("interrupted" if isinstance(failure, Interrupted) else "failed", str(failure))
            raise failure from None
        stepper.committed_by_env_py(version_table)
        if not stepper.done:
            raise MigrationFailed(f"env.py ran no migration (revision {pending[0].revision} is still pending): "
                                  "does it call context.run_migrations()?", revision=pending[0].revision)
        pending = pending[len(stepper.done):]


class Stepper:
    """The `fn` env.py's MigrationContext pulls revisions from: one at a time, so that the job
    regains control between them. Alembic asks for the next revision only once the previous one's
    transaction has ended (`MigrationContext.run_migrations`); the job makes every env.py give each
    revision a transaction of its own (`transaction_per_migration`, see `_environment`), and checks
    that it did commit before reporting it done. An env.py that holds one transaction of its own
    around all of them gets one revision per run instead, committed when env.py ends it."""

    def __init__(self, project: Project, pending: list[Step], target: str, direction: str,
                 history: History | None, endings: Mapping[str, commits.Ending], rows_within: bool = True,
                 confirm_lock: Callable[[], None] | None = None, lock_held: str = "") -> None:
        self.project, self.pending, self.target, self.direction, self.history = project, pending, target, direction, history
        self.endings, self.rows_within, self.confirm_lock = endings, rows_within, confirm_lock
        # PL/pgSQL that fails a revision's transaction if the job's session lost the lock (job.lock.held_sql)
        self.lock_held = lock_held
        # PL/pgSQL that puts env.py's session back as it was before the first revision (job.sessions.baseline)
        self._baseline: str | None = None
        self.done: list[Step] = []
        self.running: Step | None = None
        self._started = (0.0, dt.datetime.now(dt.timezone.utc))
        self._row: int | None = None  # the history row `begun` wrote for the running revision
        self._recorded = False
        # INVALID indexes before a revision that ends its own transaction ran (job.commits)
        self._invalid_before: set[tuple[str, str]] | None = None

    def __call__(self, rev: Any, context: Any) -> Iterator[Any]:
        planned = self.project._revs(self.direction, self.target, rev)
        if [s.revision.revision for s in planned[:1]] != [self.pending[0].revision]:
            raise MigrationFailed(
                f"the database moved while we held the lock: expected {self.pending[0].revision} next, found "
                f"{', '.join(rev) or 'base'} (did env.py connect to another database, or a revision commit on its own?)",
                revision=self.pending[0].revision)
        return self._one_at_a_time(planned, context)

    def _one_at_a_time(self, planned: list[Any], context: Any) -> Iterator[Any]:
        for script_step, step in zip(planned, self.pending):
            db.raise_if_signalled()  # a signal that landed between revisions: no next one
            db.keep_signal_handlers()  # (env.py, or the revision before, may have set its own)
            if step != self.running:  # (a multidb env.py asks again for each of its databases)
                if self.confirm_lock is not None and not self.lock_held:
                    self.confirm_lock()  # never run a revision on a lock the server has taken back
                log.info("migration.start", revision=step.revision, description=step.description,
                         direction=self.direction)
                self.running, self._started = step, (time.monotonic(), dt.datetime.now(dt.timezone.utc))
                self._recorded = False
                self._row = None
                if step.revision in self.endings and self.history is not None:
                    self._row = self.history.begun(step.revision, self.direction, self._started[1])
                commits.ledger.open(step.revision, VersionTable(context.version_table, context.version_table_schema))
                for observer in observers:
                    observer.started(step, self.direction, context.connection)
            self._invalid_before = None
            if step.revision in self.endings and self.project.raw_connection is not None:
                self._invalid_before = commits.invalid_indexes(self.project.raw_connection)
            connection = context.connection
            if self._baseline is None and connection is not None and self.rows_within:
                self._baseline = sessions.baseline(connection)
            before = connection.get_transaction() if connection is not None else None
            yield script_step
            # The revision's transaction has ended, as far as Alembic knows. One still open is either
            # env.py's own, held around every revision (it commits it when it ends it), or one the
            # revision began after committing Alembic's (`op.get_bind().commit()`): that one holds
            # the rest of the revision and its version row, and nobody else will commit it.
            after = connection.get_transaction() if connection is not None else None
            if after is not None and after.is_active:
                if after is before:
                    return
                connection.commit()
            self._committed()

    def committed_by_env_py(self, version_table: VersionTable | None) -> None:
        """env.py returned after its own transaction held the running revision: check it committed."""
        if self.running is None:
            return
        raw = self.project.raw_connection
        if version_table is not None and raw is not None:
            self.project.rollback()  # what env.py left open on the shared connection is not committed
            current = plan.current_revisions(raw, version_table)
            if (self.running.revision in current) != (self.direction == "upgrade"):
                step, self.running = self.running, None
                raise MigrationFailed(f"env.py ended without committing revision {step.revision} "
                                      f"({step.description}): the database is at {', '.join(current) or 'base'}",
                                      revision=step.revision)
        self._committed()

    def clean_up(self) -> None:
        """After the running revision failed: drop the INVALID indexes it left (job.commits)."""
        raw = self.project.raw_connection
        if self._invalid_before is None or raw is None or raw.closed:
            return
        self.project.rollback()
        try:
            with db.autocommit(raw):
                dropped = commits.drop_left_behind(raw, self._invalid_before)
        except psycopg2.Error as e:
            log.warning("migration.cleanup_failed", error=first_line(e))
            return
        if dropped:
            log.info("migration.cleanup", revision=self.running and self.running.revision, dropped=dropped,
                     reason="INVALID indexes the failed revision left (a failed CREATE INDEX CONCURRENTLY)")

    def clear_interrupted_build(self, error: BaseException, interruption: Interruption) -> bool:
        """The running revision, which an earlier run was killed in the middle of, found a relation
        of the name it makes already there: if that is an INVALID index (what a CREATE INDEX
        CONCURRENTLY cut short leaves), drop it, as PostgreSQL's documentation says, and say so.
        Whether it did (the revision is then run again)."""
        raw = self.project.raw_connection
        name = commits.already_there(error)
        if name is None or raw is None or raw.closed:
            return False
        self.project.rollback()
        try:
            with db.autocommit(raw):
                dropped = commits.drop_invalid_index(raw, name)
        except psycopg2.Error as e:
            log.warning("migration.cleanup_failed", error=first_line(e))
            return False
        if dropped:
            log.info("migration.cleanup", revision=self.running and self.running.revision, dropped=[dropped],
                     reason=f"the INVALID index {interruption} left when it was killed building it")
        return dropped is not None

    def applied(self, ctx: Any, **_: Any) -> None:
        """Alembic's on_version_apply: the running revision's version row is written, its transaction
        not yet committed. In that same transaction, in one round trip: the lock is confirmed held
        (a revision whose job lost it rolls back), the session is put back as it was before the
        first revision (a `SET search_path`, `SET ROLE` or timeout of this revision's does not reach
        the next), and its history row is written.

        Every revision but the last commits without waiting for its WAL to reach disk
        (`synchronous_commit` off for that transaction only): the last one's commit, synchronous,
        flushes them all before the run reports success. Each commit is still atomic and seen by
        everyone at once; only a server crash in the middle of the run could take back the newest
        of them, and then the run fails too (its connection is lost) and the next one applies them
        again. On a long history this saves most of the cost of one transaction per revision
        (`make bench`: 300 revisions)."""
        commits.ledger.close()  # (the revision's own work is done: what follows is the job's)
        if self.running is None:
            return
        # (a revision that ends its own transaction commits for good what a rollback cannot take
        # back, an index built concurrently: its version row must not be the one a crash loses)
        defer = ("PERFORM set_config('synchronous_commit', 'off', true);"
                 if self.running != self.pending[-1] and self.running.revision not in self.endings else "")
        prelude = " ".join(part for part in (self.lock_held if self.rows_within else "",
                                             self._baseline or "", defer) if part)
        if self.history is not None and self.rows_within:
            started, started_at = self._started
            self._recorded = self.history.revision_within(ctx.connection, self.running.revision, self.direction,
                                                          started_at, time.monotonic() - started, prelude=prelude,
                                                          row=self._row)
        if prelude and not self._recorded:
            db.plpgsql(ctx.connection, prelude)

    def _committed(self) -> None:
        step, (started, started_at) = self.running, self._started
        seconds = time.monotonic() - started
        if self.history is not None and not self._recorded:
            self.history.revision(step.revision, self.direction, started_at, seconds, "applied", row=self._row)
        log.info("migration.done", revision=step.revision, description=step.description, direction=self.direction,
                 seconds=round(seconds, 3))
        for observer in observers:
            observer.committed(step, self.direction, seconds)
        self.done.append(step)
        self.running = None

    def failed(self, outcome: str, error: str | None) -> None:
        """The running revision rolled back (or was never started): record how."""
        if self.running is None:
            return
        for observer in observers:
            observer.failed(self.running, self.direction)
        if self.history is not None:
            started, started_at = self._started
            self.history.revision(self.running.revision, self.direction, started_at, time.monotonic() - started,
                                  outcome, error, row=self._row)


def _after_interruption(step: Step, interruption: Interruption) -> str:
    """Why a revision that an earlier run was killed in the middle of may fail now, and what to do."""
    return (f"An earlier {interruption}, was killed before its version row committed: what the revision "
            f"ran outside a transaction before that (CREATE INDEX CONCURRENTLY...) stays. To recover: check that "
            f"what is there is what revision {step.revision} makes, undo it by hand (DROP INDEX CONCURRENTLY...), "
            f"then run the job again")


def _left_behind(step: Step, committed: list[str], recovery: str) -> str:
    """What a revision committed before it stopped, and what to do about it."""
    return (f"Before it stopped, revision {step.revision} had committed part of its work, which stays while its "
            f"version row does not (a plain re-run would start it again over that work): "
            f"{'; '.join(committed)}. To recover: {recovery}")


def _blockers(project: Project, watchdog: Watchdog | None) -> list[dict[str, Any]]:
    """Who blocked the revision: the sessions the watchdog saw in its lock graph, else (a wait too
    short for it to see) the oldest open transactions."""
    if watchdog is not None and watchdog.blockers:
        return [b.as_dict() for b in watchdog.blockers]
    return project.long_transactions()


def _back_off(project: Project, step: Step, attempt: int, retries: int, error: BaseException,
              watchdog: Watchdog | None = None) -> None:
    """Wait before trying a revision that timed out on a table lock again: exponential from 0.5 s,
    capped at 10 s, full jitter, so that the application's transactions go first."""
    delay = random.uniform(0, min(10.0, 0.5 * 2 ** attempt))
    log.warning("migration.retry", revision=step.revision, attempt=attempt, retries=retries, next_in=round(delay, 3),
                error=first_line(db.root_error(error)), blockers=_blockers(project, watchdog))
    time.sleep(delay)


# What PostgreSQL documents as worth trying again, the transaction rolled back whole first: a lock
# not granted within lock_timeout, a serialization failure and a deadlock (class 40, "transaction
# rollback": "the transaction can be retried"). Everything else is the revision's own failure.
TRANSIENT = {db.LOCK_NOT_AVAILABLE: "could not take its table locks within MIGRATE_STATEMENT_LOCK_TIMEOUT",
             "40001": "could not be serialized with a concurrent transaction",
             "40P01": "was chosen as the victim of a deadlock"}


def _is_transient(error: BaseException) -> bool:
    return db.received_signal() is None and db.sqlstate(error) in TRANSIENT


def _failure(step: Step, error: BaseException, project: Project, watchdog: Watchdog | None = None) -> BaseException:
    """Tell a signal's cancel from a revision's own failure, and say what state the database is in
    (for every driver: the job's psycopg2 session, or env.py's psycopg 3 or asyncpg)."""
    signum = db.received_signal()
    code = db.sqlstate(error)
    if signum is not None and (code == db.QUERY_CANCELED or not isinstance(error, Exception) or db.is_disconnect(error)):
        return Interrupted(signum)
    cause = db.root_error(error)
    message = first_line(cause)
    if code == db.LOCK_LOST:
        return LockLost(f"revision {step.revision} ({step.description}) was rolled back: {message} (a revision "
                        "released it, or the server ended the job's session); run the job again")
    if code in TRANSIENT:
        if watchdog is not None and watchdog.blockers:
            blockers = ", ".join(str(b) for b in watchdog.blockers)
        else:
            blockers = ", ".join(
                f"pid {b['pid']} ({b['application_name'] or 'no application_name'}, {b['state']} since {b['xact_start']})"
                for b in project.long_transactions())
        return MigrationFailed(
            f"revision {step.revision} ({step.description}) {TRANSIENT[code]}, after all MIGRATE_LOCK_RETRIES; "
            f"rolled back. Blocking: {blockers or 'no transaction is open any more'}",
            revision=step.revision,
        )
    if db.is_disconnect(error):
        return MigrationFailed(
            f"revision {step.revision} ({step.description}) lost its connection: {message}; "
            "the server rolled the revision back, run the job again",
            revision=step.revision,
        )
    return MigrationFailed(
        f"revision {step.revision} ({step.description}) failed and was rolled back: "
        f"{type(cause).__name__}: {message}",
        revision=step.revision,
    )


def async_hint(error: BaseException) -> str:
    if "asyncio extension requires an async driver" in str(error):
        return " (this env.py is async: name an async driver in DATABASE_URL, postgresql+asyncpg://...)"
    return ""
