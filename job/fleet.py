"""`run` over a fleet of tenants (MIGRATE_FLEET), one code version: schemas of one database, or
databases, each migrated exactly as `run` migrates one database (job.pipeline: its own lock,
backup, plan, revisions and history; a schema's with MIGRATE_TENANT_SCHEMA, job.config), by one of
at most MIGRATE_FLEET_PARALLEL workers forked from this process: Python, the job and Alembic are
loaded once. A worker runs tenants in turn while it finds them at their target (a run at head costs
its few queries, not a Python start-up, nor a fork: `make bench`); a run that did work or failed is
its last. The first MIGRATE_FLEET_CANARY must all succeed before the others start; with
MIGRATE_FLEET_FAIL_FAST, none starts once one failed. A signal stops the fleet: the running
tenants get it (each rolls back its running revision and releases its lock, as `run` does), no
other starts, and the summary says which were done.

Every line a tenant's run logs carries `tenant` (the schema, or the database without its
password) and `fleet_run_id`; `fleet.target` says how each ended, `fleet.done` sums up. The fleet
exits 0 when every tenant succeeded, 6 when any failed (its own exit code is in its
`fleet.target`), 143/130 when a signal stopped it. A re-run redoes only what is not at its target:
the others answer at head.

With MIGRATE_FLEET_SHARDS, each pod of an Indexed Job takes the tenants of its shard
(JOB_COMPLETION_INDEX), by a hash of each one's name (`shard_of`).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import re
import select
import signal
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple

from job import __version__, config, credentials, db, logs, text
from job.config import Settings
from job.errors import ConfigError, MigrationFailed, Pending, first_line
from job.logs import log

# what a target's line says when the fleet did not start it, and when its run succeeded
NOT_STARTED = "not-started"
SUCCEEDED = ("migrated", "up-to-date", "at-target")
PENDING = "pending"  # (`check`: not a failure, not yet done)
FAILED_CODE = MigrationFailed.exit_code  # a fleet `run` with a failure (each database's own code is in its fleet.target)
SIGNAL_CODES = {signal.SIGTERM: 143, signal.SIGINT: 130}
QUERY = re.compile(r"^\s*(select|with)\b", re.IGNORECASE)


class Target(NamedTuple):
    """One tenant of the fleet: its database's URL (what `run` gets as DATABASE_URL), its schema
    there for a tenant kept in a schema (what `run` gets as MIGRATE_TENANT_SCHEMA), and how logs name it."""

    url: str
    label: str
    schema: str | None = None


class Ended(NamedTuple):
    """How one target's run ended."""

    target: Target
    outcome: str  # migrated, up-to-date, failed, interrupted, not-started (check, status: at-target, pending)
    exit_code: int | None
    seconds: float
    error: str | None = None
    # `status`: what the tenant's status said (its revisions, pending count, lock, last run)
    state: dict[str, Any] | None = None


def targets(settings: Settings, env: Mapping[str, str]) -> list[Target]:
    """The fleet MIGRATE_FLEET names: its entries (spaces, commas or lines), the lines of @FILE, or
    the first column of `query:SQL` (or a bare SELECT/WITH) run on DATABASE_URL's database. An
    entry is a schema name in DATABASE_URL's database, `database:NAME` on its server (its user,
    password and parameters), or a PostgreSQL URL (`_target`)."""
    given = (settings.fleet or "").strip()
    if given.startswith("@"):
        path = Path(given[1:])
        try:
            given = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"MIGRATE_FLEET={given!r}: cannot read {path}: {e}") from None
        entries = [line.strip() for line in given.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    elif given.lower().startswith("query:"):  # (CONTRACT.md's form)
        entries = _queried(settings, given[len("query:"):])
    elif QUERY.match(given):
        entries = _queried(settings, given)
    else:
        entries = [entry for entry in re.split(r"[\s,]+", given) if entry]
    found: dict[tuple[str, str | None], Target] = {}
    for entry in entries:
        target = _target(entry, env)
        found.setdefault((target.url, target.schema), target)  # (a tenant listed twice is migrated once)
    if not found:
        raise ConfigError("MIGRATE_FLEET names no tenant: give schema names, URLs or database:NAME entries, @FILE, "
                          "or a SELECT")
    index = shard_index(settings.fleet_shards, env)
    return [t for t in found.values() if shard_of(t, settings.fleet_shards) == index]


def shard_index(shards: int, env: Mapping[str, str]) -> int:
    """This pod's shard: JOB_COMPLETION_INDEX, which the Job controller gives each pod of an
    Indexed Job (0 to completions - 1)."""
    if shards == 1:
        return 0
    given = env.get("JOB_COMPLETION_INDEX", "")
    if not given.strip().isdigit() or int(given) >= shards:
        raise ConfigError(f"MIGRATE_FLEET_SHARDS={shards} needs JOB_COMPLETION_INDEX, 0 to {shards - 1} (an Indexed "
                          f"Job's pod gets it from the Job controller), not {given!r}")
    return int(given)


def shard_of(target: Target, shards: int) -> int:
    """The shard a tenant belongs to, by its name alone: every pod agrees on it whatever order
    its list came in, and a tenant added later moves no other."""
    return int.from_bytes(hashlib.sha256(target.label.encode()).digest()[:8], "big") % shards


def _queried(settings: Settings, query: str) -> list[str]:
    """The first column of `query`'s rows, on DATABASE_URL's database (closed before any fork)."""
    import psycopg2

    from job import wait

    try:
        with wait.connected(settings, primary=False) as conn, conn.cursor() as cur:
            cur.execute(query)
            return [str(row[0]).strip() for row in cur.fetchall() if row and row[0] is not None]
    except psycopg2.Error as e:
        raise ConfigError(f"MIGRATE_FLEET's query failed: {first_line(e)}") from None


def _target(entry: str, env: Mapping[str, str]) -> Target:
    """An entry of the list: a URL (a tenant database), `database:NAME` (a database on DATABASE_URL's
    server), or a schema name (a tenant schema in DATABASE_URL's database)."""
    if "://" in entry:
        database = config.Database.from_url(entry)  # (refuses what `run` would refuse)
        logs.redactor.add([database.password] if database.password else [])
        params = database.params
        return Target(entry, f"{params.get('host', '')}:{params.get('port', '5432')}/{params.get('dbname', '')}")
    kind, colon, name = entry.partition(":")
    if colon and kind.lower() == "database":
        if not re.fullmatch(r"[^\s/?#@:]{1,63}", name):
            raise ConfigError(f"MIGRATE_FLEET: {config.redact_url(entry)!r}: {name!r} is not a database name")
        parts = urllib.parse.urlsplit(_base(entry, env, "a database on its server"))
        return Target(urllib.parse.urlunsplit(parts._replace(path="/" + urllib.parse.quote(name, safe=""))), name)
    if colon:
        raise ConfigError(f"MIGRATE_FLEET: {config.redact_url(entry)!r} is neither a PostgreSQL URL, database:NAME, "
                          "nor a schema name")
    schema = config.schema_name(entry, "MIGRATE_FLEET's entry")
    return Target("", schema, schema)  # (in the database DATABASE_URL or DATABASE_URL_FILE names)


def _base(entry: str, env: Mapping[str, str], what: str) -> str:
    """DATABASE_URL, which an entry given by name is relative to."""
    base = env.get("DATABASE_URL")
    if not base:
        raise ConfigError(f"MIGRATE_FLEET names {entry!r}: set DATABASE_URL to {what} (its user, password and "
                          "parameters are used), or give each tenant as a URL")
    return base


def run(settings: Settings, env: Mapping[str, str], flags: Mapping[str, Any], command: str = "run",
        work: Callable[[Settings], tuple[Any, ...]] | None = None) -> tuple[str, int, str]:
    """`command` on every tenant of the fleet (`run`: job.pipeline; `check`, `status`: `work`, the
    CLI's command on one tenant, and for `status` the fleet's report printed): the fleet's outcome,
    exit code (module docstring) and termination message."""
    log.release()  # (a single run holds its lines until the lock; the fleet takes none itself)
    env = dict(env)  # (as the fleet was given it: each target's run changes the process's own)
    fleet = targets(settings, env)
    log.info("fleet.start", command=command, targets=len(fleet), parallel=settings.fleet_parallel,
             canary=settings.fleet_canary, fail_fast=settings.fleet_fail_fast,
             **({"shard": shard_index(settings.fleet_shards, env), "shards": settings.fleet_shards}
                if settings.fleet_shards > 1 else {}))
    if work is None:
        from job import pipeline

        # what a run with work to do loads (job.pipeline), loaded here once: every forked run has it
        for module in ("job.backup", "job.drift", "job.migrate"):
            importlib.import_module(module)
        work = lambda one: (pipeline.run(one), 0)  # noqa: E731
    scheduler = _Scheduler(settings, env, flags, command, work)
    canary, rest = fleet[:settings.fleet_canary], fleet[settings.fleet_canary:]
    try:
        ended = scheduler.run(canary)
        if any(e.outcome not in SUCCEEDED for e in ended):
            if canary:
                log.warning("fleet.canary_failed", failed=[e.target.label for e in ended if e.exit_code],
                            not_started=len(rest))
            ended += not_started(rest)
        else:
            ended += scheduler.run(rest)
    finally:
        scheduler.close()
    if _prints(command, flags):
        report = [{"tenant": e.target.label, "outcome": e.outcome, **(e.state or {}),
                   **({"error": e.error} if e.error else {})} for e in sorted(ended, key=lambda e: e.target.label)]
        logs.output_for(sys.stdout).write(_document(command, report) if flags.get("format") == "json"
                                          else text.fleet_status(report))
    return summary(ended, scheduler.signalled, command)


def _prints(command: str, flags: Mapping[str, Any]) -> bool:
    """Whether the fleet prints a report on stdout (its lines, and every tenant's, then go to
    stderr, as the CLI sends a printing command's): `status`, and `--format json`."""
    return command == "status" or flags.get("format") == "json"


def _document(command: str, report: list[dict[str, Any]]) -> str:
    """`--format json` over a fleet: one document, every tenant in it (`check`: and whether all are
    at their target)."""
    return json.dumps({**({"at_target": all(t["outcome"] == "at-target" for t in report)} if command == "check"
                          else {}), "tenants": report}) + "\n"


def summary(ended: list[Ended], signalled: int | None, command: str = "run") -> tuple[str, int, str]:
    """Log fleet.done; the fleet's outcome, exit code and termination message (failures first).
    `run`: 0, or 6 when any tenant failed or was not started. `check`: 0 when every tenant is at
    its target, 8 when any is pending and none failed, else the first failure's exit code.
    `status`: 0, or the first tenant's exit code that is not (its status could not be read)."""
    counts: dict[str, int] = {}
    for e in ended:
        counts[e.outcome] = counts.get(e.outcome, 0) + 1
    failed = [e for e in ended if e.outcome in ("failed", "interrupted")]
    if signalled:
        code = SIGNAL_CODES.get(signalled, 143)
    elif command == "check":
        code = (failed[0].exit_code or 1) if failed else (Pending.exit_code if PENDING in counts else 0)
    elif command == "status":
        code = next((e.exit_code for e in ended if e.exit_code), 0)
    else:
        code = FAILED_CODE if failed or NOT_STARTED in counts else 0
    log.info("fleet.done", command=command, targets=len(ended), counts=counts, exit_code=code,
             failed=[{"tenant": e.target.label, "exit_code": e.exit_code} for e in failed][:100])
    outcome = ("interrupted" if signalled else "fleet-failed" if failed else "fleet-pending" if code
               else "fleet-done")
    done = ", ".join(f"{n} {what}" for what, n in sorted(counts.items()) if what not in ("failed", "interrupted"))
    message = (f"{outcome}: {len(failed)} of {len(ended)} failed" + "".join(
        f"; {e.target.label} (exit {e.exit_code}): {e.error or e.outcome}" for e in failed) + f"; {done}")
    return outcome, code, logs.redactor.text(message)


def not_started(batch: list[Target]) -> list[Ended]:
    """The targets the fleet stopped before starting them, each said (a re-run starts them)."""
    for target in batch:
        log.info("fleet.target", tenant=target.label, outcome=NOT_STARTED)
    return [Ended(target, NOT_STARTED, None, 0.0) for target in batch]


class _Worker:
    """A process forked from the fleet's that runs targets in turn: while they are at their target
    (a run at head loads nothing and leaves nothing behind) it takes the next; a run that did work,
    or failed, is its last, so that whatever Alembic and the project's env.py loaded stays with it."""

    def __init__(self, pid: int, tasks: int, results: int) -> None:
        self.pid, self.tasks = pid, tasks
        self.results = os.fdopen(results, "r")
        self.target: Target | None = None
        self.started = 0.0

    def give(self, target: Target) -> None:
        self.target, self.started = target, time.monotonic()
        os.write(self.tasks, (json.dumps(target._asdict()) + "\n").encode())

    def close(self) -> None:
        """No more targets: the worker ends once it has read to the end of its tasks."""
        with contextlib.suppress(OSError):
            os.close(self.tasks)
        self.results.close()


# the outcomes after which a worker takes another target (nothing was loaded or changed)
AT_TARGET = ("up-to-date", "at-target")


def _reusable(command: str, outcome: str) -> bool:
    """Whether a worker may take another target after this one: `status` loads Alembic and runs
    env.py every time, so never after it."""
    return command != "status" and outcome in AT_TARGET


class _Scheduler:
    """Targets given to at most `parallel` workers (`_Worker`) at a time, and their results collected."""

    def __init__(self, settings: Settings, env: Mapping[str, str], flags: Mapping[str, Any], command: str,
                 work: Callable[[Settings], tuple[Any, ...]]) -> None:
        self.settings, self.env, self.flags, self.command, self.work = settings, env, flags, command, work
        self.signalled: int | None = None
        self.failed = False
        self.workers: list[_Worker] = []

    def run(self, batch: list[Target]) -> list[Ended]:
        ended: list[Ended] = []
        waiting = list(batch)
        previous = {s: signal.signal(s, self._on_signal) for s in SIGNAL_CODES}
        try:
            while waiting or self._busy():
                while waiting and not self._stopping():
                    idle = [w for w in self.workers if w.target is None]
                    if not idle and len(self.workers) >= self.settings.fleet_parallel:
                        break
                    worker = idle[0] if idle else self._fork()
                    try:
                        worker.give(waiting[0])
                    except OSError:  # an idle worker that died (the OOM killer): another takes the target
                        self._forget(worker)
                        continue
                    waiting.pop(0)
                if self._stopping():
                    ended += not_started(waiting)
                    waiting = []
                if self._busy():
                    ended += self._collect()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        return ended

    def close(self) -> None:
        """End every worker (they are idle: the batches are over)."""
        for worker in self.workers:
            worker.close()
        for worker in self.workers:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(worker.pid, 0)
        self.workers = []

    def _forget(self, worker: _Worker, reaped: bool = False) -> None:
        """A worker that has ended, or is ending: no more targets for it."""
        self.workers.remove(worker)
        worker.target = None
        worker.close()
        if not reaped:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(worker.pid, 0)

    def _busy(self) -> list[_Worker]:
        return [w for w in self.workers if w.target is not None]

    def _stopping(self) -> bool:
        return self.signalled is not None or (self.failed and self.settings.fleet_fail_fast)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        """Stop the fleet: pass the signal on to every running target (each ends as `run` does)."""
        if self.signalled is None:
            self.signalled = signum
            log.warning("fleet.stopping", signal=signum, running=[w.target.label for w in self._busy() if w.target])
        for worker in self._busy():
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signum)

    def _fork(self) -> _Worker:
        logs.drain(1.0)  # (nothing of ours waits in a queue the child would inherit)
        sys.stdout.flush()
        sys.stderr.flush()
        tasks_read, tasks_write = os.pipe()
        results_read, results_write = os.pipe()
        # a signal to the fleet in the moment of the fork must not reach the child's copy of our handler
        signal.pthread_sigmask(signal.SIG_BLOCK, SIGNAL_CODES)
        try:
            pid = os.fork()
            if pid == 0:  # the worker
                code = 1
                try:
                    for fd in [tasks_write, results_read, *(w.tasks for w in self.workers),
                               *(w.results.fileno() for w in self.workers)]:
                        os.close(fd)  # (the others' ends are the fleet's: their EOF must not wait for us)
                    for s in SIGNAL_CODES:
                        signal.signal(s, signal.SIG_DFL)
                    signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNAL_CODES)
                    code = _serve(tasks_read, results_write, self.command, self.work, self.env, self.flags)
                finally:
                    os._exit(code)
        finally:
            if pid != 0:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNAL_CODES)
        os.close(tasks_read)
        os.close(results_write)
        worker = _Worker(pid, tasks_write, results_read)
        self.workers.append(worker)
        return worker

    def _collect(self) -> list[Ended]:
        """Wait for a result (or the end) of any busy worker; what ended."""
        busy = {w.results.fileno(): w for w in self._busy()}
        readable, _, _ = select.select(list(busy), [], [])
        ended = []
        for fd in readable:
            worker = busy[fd]
            target, started = worker.target, worker.started
            assert target is not None
            line = worker.results.readline()
            if line:
                result = json.loads(line)
            else:  # killed before it could say (SIGKILL, the OOM killer)
                _, status = os.waitpid(worker.pid, 0)
                code = os.waitstatus_to_exitcode(status)
                result = {"outcome": "failed", "exit_code": code if code > 0 else 128 - code,
                          "error": f"its process ended without a result ({_how(status)})"}
            worker.target = None
            if not line or not _reusable(self.command, result["outcome"]):  # (that run was the worker's last)
                self._forget(worker, reaped=not line)
            done = Ended(target, result["outcome"], result["exit_code"], round(time.monotonic() - started, 3),
                         result.get("error"), result.get("state"))
            self.failed = self.failed or done.outcome not in (*SUCCEEDED, PENDING)
            log.info("fleet.target", tenant=target.label, outcome=done.outcome, exit_code=done.exit_code,
                     seconds=done.seconds, **({"error": done.error} if done.error else {}), **(done.state or {}))
            ended.append(done)
        return ended


def _serve(tasks: int, results: int, command: str, work: Callable[[Settings], tuple[Any, ...]],
           env: Mapping[str, str], flags: Mapping[str, Any]) -> int:
    """A worker: each target it reads from `tasks` run in turn, how each ended written to `results`;
    it ends after a run that did not find its database at the target, or at the end of its tasks."""
    with os.fdopen(tasks, "r") as given, os.fdopen(results, "w") as said:
        for line in given:
            ended, state = _run_target(Target(**json.loads(line)), command, work, env, flags)
            said.write(json.dumps({"outcome": ended.outcome, "exit_code": ended.exit_code, "error": ended.error,
                                   **({"state": state} if state else {})}) + "\n")
            said.flush()
            if not _reusable(command, ended.outcome):
                return ended.exit_code
    return 0


def _run_target(target: Target, command: str, work: Callable[[Settings], tuple[Any, ...]], env: Mapping[str, str],
                flags: Mapping[str, Any]) -> tuple[Any, dict[str, Any] | None]:
    """In a worker: `command` on one target, exactly as the CLI runs it, its lines carrying the
    target; how it ended (job.ending.Ended), and the state `work` reported (`status`), if any."""
    from job import ending

    started = time.monotonic()
    fleet_run_id = logs.run_id()
    logs.configure(*config.log_options(env, flags), stream=sys.stderr if _prints(command, flags) else sys.stdout,
                   hold=command == "run")
    db.install_signal_handlers()
    # (a worker's earlier target set these for its run: each target starts from the fleet's own)
    for variable in ("DATABASE_URL", "DATABASE_URL_FILE", "MIGRATE_TENANT_SCHEMA"):
        if variable in env:
            os.environ[variable] = env[variable]
        else:
            os.environ.pop(variable, None)
    os.environ.pop("MIGRATE_FLEET", None)
    child_env = {k: v for k, v in env.items() if k != "MIGRATE_FLEET"}
    child_flags = {**flags, "fleet": None}
    if target.schema is not None:  # a tenant schema: `run` with MIGRATE_TENANT_SCHEMA, on the fleet's database
        os.environ["MIGRATE_TENANT_SCHEMA"] = child_env["MIGRATE_TENANT_SCHEMA"] = target.schema
        child_flags["tenant_schema"] = target.schema
    else:
        # env.py, and the project's settings it imports, often read DATABASE_URL themselves: it is the target's
        os.environ.pop("DATABASE_URL_FILE", None)
        os.environ["DATABASE_URL"] = child_env["DATABASE_URL"] = child_flags["database_url"] = target.url
        child_env.pop("DATABASE_URL_FILE", None)
    with logs.about(tenant=target.label, fleet_run_id=fleet_run_id):
        log.info("run.start", command=command, version=__version__)

        state: dict[str, Any] = {}

        def one() -> tuple[str, int]:  # (as cli.main prepares a command)
            settings = config.load(child_env, child_flags)
            logs.redactor.add(settings.secrets)
            credentials.install(settings.password_source, logs.redactor.add)  # (this database's, not the fleet's)
            outcome, code, *reported = work(settings)
            state.update(*reported)
            return outcome, code

        ended = ending.attempt(one, started, os.devnull)  # (the fleet writes the termination message)
    logs.drain(2.0)
    return ended, state or None


def _how(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit {os.waitstatus_to_exitcode(status)}"
