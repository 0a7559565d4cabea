"""How a command ends: its outcome and exit code, or the exit code of what it raised; `run.done`
or `run.failed` (the error as one line, redacted), and the termination message Kubernetes shows.
The CLI ends every command here, and job.fleet each of its databases' runs."""

from __future__ import annotations

import time
from typing import Any, Callable, NamedTuple

import psycopg2

from job import db, logs
from job.errors import DatabaseUnavailable, Interrupted, JobError, LockTimeout, first_line
from job.logs import log


class Ended(NamedTuple):
    """How a command ended: its outcome ("failed" or "interrupted" when it raised), exit code and error."""

    outcome: str
    exit_code: int
    error: str | None = None


def attempt(work: Callable[[], tuple[Any, ...]], started: float, termination: str | None) -> Ended:
    """Do a command's work: (outcome, exit code), and the termination message where the command
    words its own. Log how it ended (run.done, or run.failed with the error as one line) and write
    the termination message. Every exception becomes its exit code here."""
    try:
        outcome, code, *worded = work()
    except BaseException as e:
        error, detail = _failure(e)
        code, message = failed(error, started, termination, detail)
        return Ended("interrupted" if isinstance(error, Interrupted) else "failed", code, message)
    log.info("run.done", outcome=outcome, exit_code=code, seconds=_since(started))
    logs.terminate(termination, worded[0] if worded else f"{outcome} (exit {code})")
    return Ended(outcome, code)


def _failure(e: BaseException) -> tuple[BaseException, str | None]:
    """The error a run ends with, for an exception it raised (and a traceback for one we did not foresee)."""
    signum = db.received_signal()
    if isinstance(e, Interrupted) or (signum is not None and (not isinstance(e, JobError)
                                                              or isinstance(e, DatabaseUnavailable))):
        # whatever a signal's cancel made fail (a read waiting on a lock, a connection), the signal ends the run
        return (e if isinstance(e, Interrupted) else Interrupted(signum)), None
    if isinstance(e, JobError):
        return e, None
    if db.sqlstate(e) == db.LOCK_NOT_AVAILABLE:  # the job's own read waited out its lock_timeout
        return LockTimeout(f"the job's own statement waited longer than MIGRATE_STATEMENT_LOCK_TIMEOUT for a "
                           f"table lock ({first_line(e)}): another session holds one on the job's or "
                           "Alembic's tables; nothing was changed, run the job again"), None
    if isinstance(e, (psycopg2.OperationalError, psycopg2.InterfaceError)):  # the job's own session, outside a revision
        return DatabaseUnavailable(f"the connection to the database was lost: {first_line(e)}; "
                                   "nothing was left half-done: run the job again"), None
    import traceback

    return e, traceback.format_exc()


def failed(error: BaseException, started: float, termination: str | None,
           detail: str | None = None) -> tuple[int, str]:
    """Log run.failed with a one-line error, write the termination message; the exit code and the error."""
    if isinstance(error, Interrupted):
        message = f"interrupted by signal {error.signum}: the running revision was rolled back, the lock released"
        if error.left_behind:
            message += f". {error.left_behind}"
    elif isinstance(error, JobError):
        message = str(error)
    else:
        message = f"unexpected error: {type(error).__name__}: {error}"
    code = getattr(error, "exit_code", 1)
    message = " ".join(message.split())
    fields: dict[str, Any] = {"error_type": type(error).__name__, "error": message, "exit_code": code}
    if detail:
        fields["traceback"] = detail
    log.error("run.failed", seconds=_since(started), **fields)
    logs.terminate(termination, logs.redactor.text(f"failed (exit {code}): {message}"))
    return code, logs.redactor.text(message)


def _since(started: float) -> float:
    return round(time.monotonic() - started, 3)
