"""Faults by class, each class over several of its members, so that the next member is covered
before anyone names it: every ending signal at every step of a run, every state of the job's
output streams, every numeric setting given nonsense, version tables Alembic never leaves,
session state a revision leaves behind, errors PostgreSQL says to retry, and anything a revision
may raise."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from job import config
from tests.conftest import MIGRATE_JOB, ROOT, Db, finish_logged, hold_lock, run_job, scenario, start_logged
from tests.events import wait_for_event
from tests.test_env_sessions import REVISION, at_head_with_next
from tests.test_projects import SHAPES

pytestmark = pytest.mark.faults

ENDING = {"TERM": signal.SIGTERM, "INT": signal.SIGINT, "HUP": signal.SIGHUP, "QUIT": signal.SIGQUIT}


def no_session_of_the_job(db: Db) -> bool:
    """Nothing of the job's is left in the database: no session, no advisory lock."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        left = db.query("SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND application_name LIKE "
                        "'migrate-job/%%'", (db.name,))[0][0]
        if not left and not db.advisory_locks():
            return True
        time.sleep(0.1)
    return False


# --- every ending signal, at every step -------------------------------------------------------------

def _once_the_job(db: Db, condition: str) -> Callable[[Path], None]:
    """Reached once one of the job's sessions in `db` matches `condition` (on pg_stat_activity)."""
    def reached(out: Path) -> None:
        deadline = time.monotonic() + 30
        while not db.query(f"SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND {condition}", (db.name,))[0][0]:
            assert time.monotonic() < deadline, out.read_text() if out.exists() else "never reached"
            time.sleep(0.05)
    return reached


# the job's session waits for a table lock; the slow revision's statement runs
WAITS_ON_A_LOCK = "wait_event_type = 'Lock' AND application_name LIKE 'migrate-job/%%'"
RUNS_ITS_STATEMENT = "query LIKE 'SELECT pg_sleep%%'"
# pg_dump locks every table it dumps before it reads any
DUMP_WAITS_ON_A_LOCK = "wait_event_type = 'Lock' AND query LIKE 'LOCK TABLE%%'"


def _waiting_for_the_server(db: Db, env: dict[str, str], tmp_path: Path) -> tuple[dict[str, str], Any, Any, list[str]]:
    from tests.pgcluster import free_port

    return {**env, "DATABASE_URL": f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere",
            "MIGRATE_WAIT_TIMEOUT": "60"}, "wait.retry", None, []


def _waiting_for_the_lock(db: Db, env: dict[str, str], tmp_path: Path) -> tuple[dict[str, str], Any, Any, list[str]]:
    holder, _ = hold_lock(db)
    return env, "lock.waiting", holder, []


def _at_0005_with_locked(table: str, by: str, db: Db, env: dict[str, str]) -> tuple[dict[str, str], Any, Any, list[str]]:
    """The database at 0005, and a session `by` holding ACCESS EXCLUSIVE on `table`: the job waits on it."""
    assert 0 == run_job("run", env={**env, "MIGRATE_TARGET": "0005"}).code
    holder = db.connect(application_name=by)
    holder.autocommit = False
    holder.cursor().execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
    return {**env, "MIGRATE_STATEMENT_LOCK_TIMEOUT": "30"}, _once_the_job(db, WAITS_ON_A_LOCK), holder, ["0005"]


def _reading_a_locked_version_table(db: Db, env: dict[str, str], tmp_path: Path) -> tuple[dict[str, str], Any, Any, list[str]]:
    return _at_0005_with_locked("alembic_version", "app", db, env)


def _backing_up(db: Db, env: dict[str, str], tmp_path: Path) -> tuple[dict[str, str], Any, Any, list[str]]:
    """pg_dump held in the backup: an app's session holds a table it must lock (a dump of any size
    is over too fast to be interrupted on time)."""
    db.query("CREATE TABLE filler AS SELECT g AS id, md5(g::text) AS a FROM generate_series(1, 1000) g")
    holder = db.connect(application_name="app")
    holder.autocommit = False
    holder.cursor().execute("LOCK TABLE filler IN ACCESS EXCLUSIVE MODE")
    return env, _once_the_job(db, DUMP_WAITS_ON_A_LOCK), holder, []


def _in_a_revision(db: Db, env: dict[str, str], tmp_path: Path) -> tuple[dict[str, str], Any, Any, list[str]]:
    # (s001 commits before s002 sleeps in its statement)
    return ({**env, "ALEMBIC_CONFIG": scenario("slow"), "SCENARIO_SLEEP": "30"}, _once_the_job(db, RUNS_ITS_STATEMENT),
            None, ["s001"])


def _writing_history(db: Db, env: dict[str, str], tmp_path: Path) -> tuple[dict[str, str], Any, Any, list[str]]:
    return _at_0005_with_locked("migrate_job.migrate_job_history", "operator", db, env)


# each: the job's environment, the event that says it has reached the step, what holds it there,
# and the revision the database must be at after the interrupted run (what committed before it)
STEPS: dict[str, Callable[[Db, dict[str, str], Path], tuple[dict[str, str], Any, Any, list[str]]]] = {
    "waiting-for-the-server": _waiting_for_the_server,
    "waiting-for-the-lock": _waiting_for_the_lock,
    "reading-a-locked-version-table": _reading_a_locked_version_table,
    "backing-up": _backing_up,
    "in-a-revision": _in_a_revision,
    "writing-history": _writing_history,
}


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("name", ENDING)
def test_every_ending_signal_ends_every_step_the_same_way(name: str, step: str, db: Db, env: dict[str, str],
                                                         tmp_path: Path) -> None:
    """Exit 128 + the signal, `run.failed` Interrupted, within seconds; nothing of the job left
    behind (session, lock, partial backup), the database at a revision that committed."""
    job_env, reached, blocker, after = STEPS[step](db, env, tmp_path)
    out = tmp_path / "job.log"
    proc = start_logged(job_env, out)
    try:
        reached(out) if callable(reached) else wait_for_event(out, reached)
        time.sleep(0.5)  # (into the step: the wait, the read, the dump, the statement)
        sent = time.monotonic()
        proc.send_signal(ENDING[name])
        result = finish_logged(proc, out, timeout=20)
        took = time.monotonic() - sent
    finally:
        if blocker is not None:
            blocker.close()
        if proc.poll() is None:
            proc.kill()
    failed = result.event("run.failed")
    assert (128 + ENDING[name], "Interrupted") == (result.code, failed["error_type"]), result.stdout[-2000:]
    assert took < 10 and no_session_of_the_job(db)
    assert after == db.version()
    assert not [p for p in Path(env["MIGRATE_BACKUP_DIR"]).iterdir() if p.name.endswith(".partial")]


# --- every state of the output streams -------------------------------------------------------------

def _small_pipe() -> tuple[int, int]:
    """A pipe that holds one page: a job's few dozen log lines fill it."""
    reading, writing = os.pipe()
    fcntl.fcntl(writing, 1031, 4096)  # F_SETPIPE_SZ
    return reading, writing


@pytest.mark.parametrize("stream", ["closed", "full", "broken"])
def test_a_run_completes_whatever_its_stdout_is(stream: str, db: Db, env: dict[str, str], tmp_path: Path) -> None:
    """stdout closed from the start, a pipe nobody reads, or one whose reader went away: the run
    migrates, exits 0, and its termination message says so."""
    db.holds_data()
    reading, writing = _small_pipe()
    if stream == "closed":
        proc = subprocess.Popen([MIGRATE_JOB, "run"], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, preexec_fn=lambda: os.close(1))
    else:
        proc = subprocess.Popen([MIGRATE_JOB, "run"], env=env, cwd=ROOT, stdout=writing, stderr=subprocess.PIPE)
        if stream == "broken":
            os.close(reading)
    os.close(writing)
    try:
        _, stderr = proc.communicate(timeout=60)
    finally:
        if stream != "broken":
            os.close(reading)

    assert (0, ["0006"]) == (proc.returncode, db.version()), stderr
    assert "migrated (exit 0)\n" == Path(env["MIGRATE_TERMINATION_LOG"]).read_text()


def test_sigterm_ends_a_run_whose_stdout_nobody_reads_within_its_grace(db: Db, env: dict[str, str],
                                                                       tmp_path: Path) -> None:
    """A full pipe does not hold the job: SIGTERM in a revision ends it with 143 within seconds, the
    lock released, the termination message written."""
    reading, writing = _small_pipe()
    job_env = {**env, "ALEMBIC_CONFIG": scenario("slow"), "SCENARIO_SLEEP": "30", "MIGRATE_LOG_LEVEL": "debug"}
    proc = subprocess.Popen([MIGRATE_JOB, "run"], env=job_env, cwd=ROOT, stdout=writing, stderr=subprocess.DEVNULL)
    os.close(writing)
    try:
        _once_the_job(db, RUNS_ITS_STATEMENT)(tmp_path / "no log: stdout is the pipe")
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)
        took = time.monotonic() - sent
    finally:
        os.close(reading)
        if proc.poll() is None:
            proc.kill()

    assert (143, True) == (proc.returncode, took < 8)
    assert no_session_of_the_job(db)
    assert Path(env["MIGRATE_TERMINATION_LOG"]).read_text().startswith("failed (exit 143): interrupted by signal 15")


# --- every numeric setting, given nonsense, through the real command line -----------------------------

NUMERIC = [o.variable for o in config.OPTIONS if o.parse is not None and isinstance(o.default, (int, float))
           and not isinstance(o.default, bool)]


@pytest.mark.parametrize("value", ["nan", "inf", "1e12", "-1", "0x10"])
@pytest.mark.parametrize("variable", NUMERIC)
def test_a_numeric_setting_out_of_range_is_exit_2_naming_it(variable: str, value: str, env: dict[str, str]) -> None:
    """No traceback, no exit 1, nothing run: the variable and its range in the error."""
    result = run_job("run", env={**env, variable: value})

    failed = result.event("run.failed")
    assert (2, "ConfigError", True, False) == (result.code, failed["error_type"], variable in failed["error"],
                                              "traceback" in failed)


# --- version tables Alembic never leaves ------------------------------------------------------------

@pytest.mark.parametrize(("rows", "says", "command"), [
    (rows, says, command)
    for rows, says, commands in (
        # (a downgrade Alembic can plan from two rows on one line, as bare Alembic does)
        (["0004", "0005"], "one line of history has two rows", ("run", "check")),
        (["0002", "0005"], "one line of history has two rows", ("run", "check")),
        ([""], "holds an empty or NULL revision", ("run", "check", "downgrade")))
    for command in commands])
def test_a_version_table_alembic_would_never_leave_is_exit_7_before_anything_changes(
        rows: list[str], says: str, command: str, db: Db, env: dict[str, str]) -> None:
    """Two rows on one line where Alembic cannot plan from them, an empty one: exit 7 naming the
    state; the rows as they were."""
    assert 0 == run_job("run", env={**env, "MIGRATE_TARGET": "0005"}).code
    db.query("DELETE FROM alembic_version")
    for row in rows:
        db.query("INSERT INTO alembic_version VALUES (%s)", (row,))

    result = run_job(*({"downgrade": ["downgrade", "-1", "--yes"]}.get(command, [command])), env=env)

    assert (7, True) == (result.code, says in result.event("run.failed")["error"]), result.stdout[-1500:]
    assert sorted(rows) == db.version() and [] == result.events("migration.start")


def test_a_version_table_without_alembics_column_is_exit_7(db: Db, env: dict[str, str]) -> None:
    db.query("CREATE TABLE alembic_version (revision text)")

    result = run_job("run", env=env)

    assert (7, True) == (result.code, "is not one Alembic keeps" in result.event("run.failed")["error"])


# --- session state a revision leaves behind -----------------------------------------------------------

LEAVES = {
    "search-path": ('op.execute("CREATE SCHEMA elsewhere")\n    op.execute("SET search_path TO elsewhere, public")',
                    "SELECT table_schema FROM information_schema.tables WHERE table_name = 'after'", [("public",)]),
    "role": ('op.execute("CREATE ROLE mj_leaver_{db}")\n    op.execute("GRANT CREATE ON SCHEMA public TO mj_leaver_{db}")\n'
             '    op.execute("GRANT ALL ON alembic_version TO mj_leaver_{db}")\n    op.execute("SET ROLE mj_leaver_{db}")',
             "SELECT tableowner FROM pg_tables WHERE tablename = 'after'", [("postgres",)]),
    "lock-timeout": ('op.execute("SET lock_timeout = 0")',
                     "SELECT 1", [(1,)]),
}


@pytest.mark.parametrize("env_py", ["own-engine", "shared-connection"])
@pytest.mark.parametrize("leaves", LEAVES)
def test_each_revision_starts_from_the_session_the_job_set(leaves: str, env_py: str, db: Db, env: dict[str, str],
                                                          tmp_path: Path) -> None:
    """What b004 sets in its session (search path, role, a timeout) does not reach b005, whose table
    lands where and as whom the first revision's did, under the job's lock timeout."""
    shape = {"own-engine": SHAPES["sync-template-psycopg2"], "shared-connection": SHAPES["sync-cookbook-shared-connection"]}[env_py]
    body, query, expected = LEAVES[leaves]
    job_env = at_head_with_next(shape, db, env, tmp_path, body=body.replace("{db}", db.name))
    (tmp_path / "blog_versions" / "b005_after.py").write_text(
        REVISION.format(doc="after", body='op.execute("CREATE TABLE after (id int)")\n    op.execute("DO $$ BEGIN IF '
                        "current_setting('lock_timeout') = '0' THEN RAISE EXCEPTION 'no lock timeout'; END IF; END $$\")")
        .replace("b004", "b005").replace('"b003"', '"b004"').replace("Revises: b003", "Revises: b004"))
    try:
        result = run_job("run", env=job_env, cwd=tmp_path / "project")

        assert (0, ["b005"]) == (result.code, db.version()), result.stdout[-1500:]
        assert expected == db.query(query)
    finally:
        if leaves == "role":
            _drop_role(db)


def _drop_role(db: Db) -> None:
    db.query(f"DROP OWNED BY mj_leaver_{db.name}")
    db.query(f"DROP ROLE IF EXISTS mj_leaver_{db.name}")


@pytest.mark.parametrize("env_py", ["own-engine", "shared-connection"])
def test_a_revision_that_releases_the_lock_rolls_back_with_exit_4(env_py: str, db: Db, env: dict[str, str],
                                                                  tmp_path: Path) -> None:
    """pg_advisory_unlock_all() in a revision: the job finds its lock gone inside that revision's
    transaction, which rolls back; nothing after it runs."""
    shape = {"own-engine": SHAPES["sync-template-psycopg2"], "shared-connection": SHAPES["sync-cookbook-shared-connection"]}[env_py]
    job_env = at_head_with_next(shape, db, env, tmp_path, body='op.execute("CREATE TABLE unlocked (id int)")\n'
                                "    op.execute(\"SELECT pg_advisory_unlock_all()\")")
    if env_py == "own-engine":  # its own session holds no lock to release: release the job's, as another tool would
        job_env = at_head_with_next(shape, db, env, tmp_path / "2", body='op.execute("CREATE TABLE unlocked (id int)")\n'
                                    "    op.execute(\"SELECT pg_terminate_backend(pid, 10000) FROM pg_locks WHERE "
                                    "locktype = 'advisory' AND pid <> pg_backend_pid() AND database = "
                                    "(SELECT oid FROM pg_database WHERE datname = current_database())\")")
        project = tmp_path / "2" / "project"
    else:
        project = tmp_path / "project"

    result = run_job("run", env=job_env, cwd=project)

    assert (4, "LockLost", ["b003"]) == (result.code, result.event("run.failed")["error_type"], db.version()), \
        result.stdout[-1500:]
    assert "unlocked" not in db.tables()


# --- errors PostgreSQL says to retry, and anything a revision raises -------------------------------------

@pytest.mark.parametrize("sqlstate", ["40001", "40P01", "55P03"])
def test_a_revision_failing_with_an_error_to_retry_is_retried_whole(sqlstate: str, db: Db, env: dict[str, str],
                                                                     tmp_path: Path) -> None:
    """A serialization failure, a deadlock, a lock timeout on the first attempt: rolled back whole,
    retried, and the retry reaches head (a sequence counts the attempts: it is not rolled back)."""
    db.query("CREATE SEQUENCE attempts")
    body = ('op.execute("CREATE TABLE retried (id int)")\n    op.execute("DO $$ BEGIN IF nextval(\'attempts\') = 1 THEN '
            f"RAISE EXCEPTION 'first attempt' USING ERRCODE = '{sqlstate}'; END IF; END $$\")")
    job_env = at_head_with_next(SHAPES["sync-template-psycopg2"], db, env, tmp_path, body=body)

    result = run_job("run", env={**job_env, "MIGRATE_LOCK_RETRIES": "2"}, cwd=tmp_path / "project")

    assert (0, ["b004"], 1) == (result.code, db.version(), len(result.events("migration.retry"))), result.stdout[-1500:]
    assert [(2,)] == db.query("SELECT last_value FROM attempts")


@pytest.mark.parametrize("raised", ["SystemExit(3)", "KeyboardInterrupt()", "GeneratorExit()", "Surprise()"])
def test_anything_a_revision_raises_is_its_failure(raised: str, db: Db, env: dict[str, str], tmp_path: Path) -> None:
    """sys.exit(), KeyboardInterrupt, a BaseException of the revision's own: exit 6 naming it, rolled back."""
    body = ('op.execute("CREATE TABLE half (id int)")\n'
            "    class Surprise(BaseException):\n        pass\n"
            f"    raise {raised}")
    job_env = at_head_with_next(SHAPES["sync-template-psycopg2"], db, env, tmp_path, body=body)

    result = run_job("run", env=job_env, cwd=tmp_path / "project")

    failed = result.event("run.failed")
    assert (6, "MigrationFailed", True) == (result.code, failed["error_type"], "b004" in failed["error"]), \
        result.stdout[-1500:]
    assert (["b003"], False) == (db.version(), "half" in db.tables())


# --- a wait of any kind is bounded, name look-ups included ---------------------------------------------

@pytest.fixture
def silent_name_server() -> Any:
    """A network namespace whose name server (on its loopback) takes every question and answers
    none: the system resolver would wait 15 s a look-up (5 s, 3 attempts)."""
    import shutil
    import sys

    if os.geteuid() != 0:
        pytest.skip("a network namespace needs root (CI runs as root)")
    name = f"mjdns{os.getpid()}"
    etc = Path("/etc/netns") / name
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        etc.mkdir(parents=True)
        (etc / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:5 attempts:3\n")
        server = subprocess.Popen(["ip", "netns", "exec", name, sys.executable, "-c",
                                   "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                                   "s.bind(('127.0.0.1', 53))\nwhile True:\n    s.recvfrom(512)\n"])
        time.sleep(0.5)
        yield name
        server.kill()
    finally:
        shutil.rmtree(etc, ignore_errors=True)
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.mark.parametrize("ended_by", ["the wait timeout", "SIGTERM"])
def test_a_name_server_that_never_answers_does_not_hold_the_job(ended_by: str, silent_name_server: str,
                                                                 env: dict[str, str], tmp_path: Path) -> None:
    """The host name's look-up is the job's, bounded by the wait timeout and ended by a signal:
    exit 3 after MIGRATE_WAIT_TIMEOUT (wait.retry names the name server), or 143 at once."""
    job_env = {**env, "DATABASE_URL": "postgresql://postgres@db.internal.test:5432/blog", "MIGRATE_WAIT_TIMEOUT": "4"}
    out = tmp_path / "job.log"
    started = time.monotonic()
    proc = subprocess.Popen(["ip", "netns", "exec", silent_name_server, MIGRATE_JOB, "run"], env=job_env, cwd=ROOT,
                            stdout=out.open("w"), stderr=subprocess.PIPE, text=True)
    if ended_by == "SIGTERM":
        wait_for_event(out, "wait.retry")
        proc.send_signal(signal.SIGTERM)
    result = finish_logged(proc, out, timeout=60)
    took = time.monotonic() - started

    expected = 143 if ended_by == "SIGTERM" else 3
    assert (expected, True) == (result.code, took < 10), (took, result.stdout[-1500:])
    assert "no answer from the name server" in result.events("wait.retry")[0]["error"]


def test_the_jobs_signal_handling_survives_a_revision_that_sets_its_own(db: Db, env: dict[str, str],
                                                                         tmp_path: Path) -> None:
    """b004 ignores SIGTERM from then on (as a framework it imports might set a handler): SIGTERM in
    b005 still ends the run with 143, b005 rolled back."""
    job_env = at_head_with_next(SHAPES["sync-template-psycopg2"], db, env, tmp_path,
                                body="import signal\n    signal.signal(signal.SIGTERM, signal.SIG_IGN)")
    (tmp_path / "blog_versions" / "b005_after.py").write_text(
        REVISION.format(doc="after", body='op.execute("CREATE TABLE after (id int)")\n    op.execute("SELECT pg_sleep(30)")')
        .replace("b004", "b005").replace('"b003"', '"b004"').replace("Revises: b003", "Revises: b004"))
    out = tmp_path / "job.log"
    proc = subprocess.Popen([MIGRATE_JOB, "run"], env=job_env, cwd=tmp_path / "project", stdout=out.open("w"),
                            stderr=subprocess.PIPE, text=True)
    _once_the_job(db, "query LIKE 'SELECT pg_sleep(30)%%'")(out)
    proc.send_signal(signal.SIGTERM)
    result = finish_logged(proc, out, timeout=20)

    assert (143, ["b004"]) == (result.code, db.version()), result.stdout[-1500:]
