"""One exception hierarchy; the CLI turns each into its exit code."""


class JobError(Exception):
    """Base error for everything the job reports; `exit_code` is what the process exits with."""

    exit_code = 1


class ConfigError(JobError):
    """Usage or configuration is wrong: bad flag, bad URL, missing alembic.ini."""

    exit_code = 2


class LoopsOverSchemas(ConfigError):
    """env.py runs the migrations once per schema it finds, a tenant each (Netflix Dispatch's
    shape): `run`, `check` and `status` take those schemas as a fleet (job.fleet), each tenant
    planned, locked and recorded alone; any other command works on one and refuses them all."""

    def __init__(self, message: str, schemas: list[str]) -> None:
        super().__init__(message)
        self.schemas = schemas


class DatabaseUnavailable(JobError):
    """The database did not accept queries within the wait timeout, or refused us outright."""

    exit_code = 3


class LockTimeout(JobError):
    """Another session held the migration lock for longer than the lock timeout."""

    exit_code = 4


class LockLost(JobError):
    """The server ended the session that held the migration lock (idle or network timeouts, an
    operator's pg_terminate_backend): another runner may hold it now, so the job stops before its
    next revision."""

    exit_code = 4


class BackupFailed(JobError):
    """The backup could not be taken or verified; nothing was migrated."""

    exit_code = 5


class RestoreFailed(BackupFailed):
    """A backup could not be restored: missing, damaged (sha256 mismatch), or pg_restore failed
    (in one transaction, so the database is unchanged)."""


class MigrationFailed(JobError):
    """A revision failed; the database stays at the last revision that committed."""

    exit_code = 6

    def __init__(self, message: str, revision: str | None = None) -> None:
        super().__init__(message)
        self.revision = revision


class RevisionError(JobError):
    """The database is at a revision the scripts do not know, or `head` is ambiguous."""

    exit_code = 7


class Pending(JobError):
    """`check`: migrations are pending (not a failure: the answer asked for)."""

    exit_code = 8


class Drift(JobError):
    """The database differs from what the code says: an applied revision's file was edited, the
    schema was changed by hand, or the models and the database disagree (job.drift), where
    refusing was asked for; and `drift` finding any."""

    exit_code = 9


class LintFindings(JobError):
    """`lint` found unsafe operations in the revisions' SQL that no allow-list entry accepts (10:
    the contract gives 9 to drift)."""

    exit_code = 10


class Interrupted(BaseException):
    """SIGTERM or SIGINT arrived; raised from the signal handler so no `except Exception` swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
        # what the running revision had committed before the signal, when it ends its own transaction
        self.left_behind: str | None = None

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class DumpExited(Exception):
    """pg_dump exited non-zero (job.backup decides what that means: a retry, or BackupFailed)."""

    def __init__(self, returncode: int, stderr: str) -> None:
        super().__init__(f"pg_dump exited {returncode}")
        self.returncode, self.stderr = returncode, stderr


def first_line(error: BaseException) -> str:
    """The first meaningful line of an error (a driver's runs on with DETAIL, HINT and context lines)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__
