"""Concurrency, failures, signals, the lock and secrets: each ends with the right exit code and state."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from job.config import lock_key_for
from job.plan import VersionTable
from tests.conftest import (
    MIGRATE_JOB, ROOT, SECRET, SECRET_IN_URL, Db, finish, finish_logged, hold_lock, run_job, scenario,
    start_job, start_logged,
)
from tests.events import wait_for_event

pytestmark = pytest.mark.faults


def test_eight_replicas_at_once_migrate_once(db: Db, env: dict[str, str]) -> None:
    """Eight jobs started together on a slow migration all exit 0, and the migration ran once."""
    db.holds_data()
    slow = {**env, "ALEMBIC_CONFIG": scenario("slow"), "SCENARIO_SLEEP": "2"}
    procs = [start_job("run", env=slow) for _ in range(8)]
    results = [finish(p) for p in procs]

    assert [0] * 8 == [r.code for r in results], [r.stdout[-500:] for r in results if r.code]
    assert [(1,)] == db.query("SELECT count(*) FROM ran")
    outcomes = sorted(r.event("run.done")["outcome"] for r in results)
    assert ["migrated"] + ["up-to-date"] * 7 == outcomes
    assert any(r.events("lock.waiting") for r in results)
    assert 1 == sum(len(r.events("backup.done")) for r in results)
    assert 0 == db.advisory_locks()


def test_lock_waiting_names_the_holder_and_times_out_with_4(db: Db, env: dict[str, str]) -> None:
    """While another session holds the lock, the job logs its pid and application_name, then exits 4."""
    holder, pid = hold_lock(db)

    result = run_job("run", env={**env, "MIGRATE_LOCK_TIMEOUT": "1"})
    holder.close()

    assert 4 == result.code
    waiting = result.events("lock.waiting")[0]["holder"]
    assert (pid, "someone-else") == (waiting["pid"], waiting["application_name"])
    assert waiting["client_addr"] and waiting["since"]
    assert f"pid {pid}" in result.event("run.failed")["error"]
    assert [] == db.version()


def test_a_waiting_run_gives_the_holder_the_cpu(db: Db, env: dict[str, str], tmp_path: Path) -> None:
    """A run that has to wait for the lock lowers its own priority to the lowest (nice 19)."""
    holder, _ = hold_lock(db)
    out = tmp_path / "waiter.log"
    waiter = start_logged({**env, "MIGRATE_LOCK_TIMEOUT": "30"}, out)
    try:
        wait_for_event(out, "lock.waiting")
        nice = os.getpriority(os.PRIO_PROCESS, waiter.pid)
    finally:
        waiter.terminate()
        finish_logged(waiter, out)
        holder.close()

    assert 19 == nice


def test_lock_key_integer_is_used_as_is(db: Db, env: dict[str, str]) -> None:
    """MIGRATE_LOCK_KEY=4242 makes the job wait on advisory lock 4242."""
    holder, _ = hold_lock(db, key=4242)

    result = run_job("run", env={**env, "MIGRATE_LOCK_KEY": "4242", "MIGRATE_LOCK_TIMEOUT": "0.5"})
    holder.close()

    assert 4 == result.code
    assert 4242 == result.events("lock.waiting")[0]["key"]


def test_lock_is_handed_over_when_the_holder_releases(db: Db, env: dict[str, str], tmp_path: Path) -> None:
    """A waiting job takes the lock when the holder lets go, and then migrates."""
    holder, _ = hold_lock(db)
    out = tmp_path / "out"
    proc = start_logged(env, out)
    wait_for_event(out, "lock.waiting")
    time.sleep(0.5)
    with holder.cursor() as cur:
        cur.execute("SELECT pg_advisory_unlock(%s)", (lock_key_for(db.name, VersionTable()),))
    holder.close()

    result = finish_logged(proc, out)

    assert 0 == result.code
    assert result.event("lock.acquired")["waited"] >= 0.5
    assert ["0006"] == db.version()


def test_failing_revision_exits_6_at_the_last_committed_revision(db: Db, env: dict[str, str]) -> None:
    """A revision that errors exits 6, names itself, leaves the previous revision committed and the lock free."""
    result = run_job("run", env={**env, "ALEMBIC_CONFIG": scenario("failing")})

    assert 6 == result.code
    failed = result.event("run.failed")
    assert "f002" in failed["error"] and "division by zero" in failed["error"]
    assert (6, "MigrationFailed") == (failed["exit_code"], failed["error_type"])
    assert ["f001"] == db.version()
    assert ({"first"}, {"migrate_job_history", "migrate_job_history_heads", "migrate_job_history_lineage"}) == (
        db.tables() - {"alembic_version"}, db.tables("migrate_job"))
    assert ["f001"] == [e["revision"] for e in result.events("migration.done")]
    assert 1 == len(result.events("lock.released"))
    assert 0 == db.advisory_locks()
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_mid_revision_rolls_back_and_releases(db: Db, env: dict[str, str], tmp_path: Path,
                                                      signum: int, code: int) -> None:
    """SIGTERM/SIGINT during a long statement cancel it within seconds: rolled back, lock free, 143/130."""
    out = tmp_path / "out"
    proc = start_logged({**env, "ALEMBIC_CONFIG": scenario("slow"), "SCENARIO_SLEEP": "60"}, out)
    wait_for_event(out, "migration.done")  # s001 done, s002 (60 s of pg_sleep) running
    time.sleep(0.5)
    sent = time.monotonic()
    proc.send_signal(signum)

    result = finish_logged(proc, out, timeout=30)

    assert code == result.code
    assert time.monotonic() - sent < 5
    assert (code, "Interrupted") == (result.event("run.failed")["exit_code"], result.event("run.failed")["error_type"])
    assert ["s001"] == db.version()
    assert [(0,)] == db.query("SELECT count(*) FROM ran")
    assert 0 == db.advisory_locks()
    assert [] == db.query(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND state = 'active' "
        "AND query LIKE 'SELECT pg_sleep%%'"
    )
    assert "lock.released" in result.names


def test_sigterm_while_waiting_for_the_lock_exits_143(db: Db, env: dict[str, str], tmp_path: Path) -> None:
    """A job waiting for the lock stops at once on SIGTERM."""
    holder, _ = hold_lock(db)
    out = tmp_path / "out"
    proc = start_logged(env, out)
    wait_for_event(out, "lock.waiting")
    proc.send_signal(signal.SIGTERM)

    result = finish_logged(proc, out, timeout=10)
    holder.close()

    assert 143 == result.code
    assert [] == db.version()


def test_unknown_database_revision_exits_7_before_anything(db: Db, env: dict[str, str], backup_dir: Path) -> None:
    """A database at a revision the scripts do not know exits 7 without a backup or a change."""
    assert 0 == run_job("run", env={**env, "MIGRATE_TARGET": "0002"}).code
    db.query("UPDATE alembic_version SET version_num = 'feedface'")
    backups = sorted(backup_dir.iterdir())

    result = run_job("run", env=env)

    assert 7 == result.code
    assert "feedface" in result.event("run.failed")["error"]
    assert ["feedface"] == db.version()
    assert backups == sorted(backup_dir.iterdir())
    assert 0 == db.advisory_locks()


def test_several_heads_with_target_head_exits_7(db: Db, env: dict[str, str]) -> None:
    """Scripts with two heads and MIGRATE_TARGET=head exit 7 and create nothing."""
    result = run_job("run", env={**env, "ALEMBIC_CONFIG": scenario("branched")})

    assert 7 == result.code
    assert "2 heads" in result.event("run.failed")["error"]
    assert set() == db.tables()


def test_several_heads_with_target_heads_migrates_both(db: Db, env: dict[str, str]) -> None:
    """MIGRATE_TARGET=heads applies both branches, one revision per transaction."""
    result = run_job("run", env={**env, "ALEMBIC_CONFIG": scenario("branched"), "MIGRATE_TARGET": "heads"})

    assert 0 == result.code, result.stdout
    assert ["b002", "b003"] == db.version()
    assert 3 == len(result.events("migration.done"))


def test_database_started_late_is_waited_for(cluster, env: dict[str, str]) -> None:
    """A job started before its database retries until the server is up, then migrates."""
    late = {**env, "DATABASE_URL": cluster.url(), "MIGRATE_WAIT_TIMEOUT": "60"}
    proc = start_job("run", env=late)
    time.sleep(3)
    cluster.start()

    result = finish(proc)

    assert 0 == result.code, result.stdout
    assert result.events("wait.retry")
    assert "connection refused" in result.events("wait.retry")[0]["error"].lower()
    assert "0006" == cluster.psql("SELECT version_num FROM alembic_version")


def test_database_never_starting_exits_3_after_the_timeout(cluster, env: dict[str, str]) -> None:
    """With no server, the job exits 3 once MIGRATE_WAIT_TIMEOUT has passed, and not before."""
    started = time.monotonic()
    result = run_job("run", env={**env, "DATABASE_URL": cluster.url(), "MIGRATE_WAIT_TIMEOUT": "2"})

    assert 3 == result.code
    assert time.monotonic() - started >= 2
    assert "MIGRATE_WAIT_TIMEOUT" in result.event("run.failed")["error"]


def test_wrong_password_fails_fast_with_3(app_db: Db, env: dict[str, str]) -> None:
    """A refused password is not retried: exit 3 at once, with what to fix."""
    wrong = app_db.url.replace(SECRET_IN_URL, "not-the-password")
    started = time.monotonic()

    result = run_job("run", env={**env, "DATABASE_URL": wrong, "MIGRATE_WAIT_TIMEOUT": "30"})

    assert 3 == result.code
    assert time.monotonic() - started < 10
    assert [] == result.events("wait.retry")
    assert "password authentication failed" in result.event("run.failed")["error"]


def test_missing_database_fails_fast_with_3(db: Db, env: dict[str, str]) -> None:
    """A database that does not exist is not retried: exit 3 at once."""
    result = run_job("run", env={**env, "DATABASE_URL": db.url + "_nope", "MIGRATE_WAIT_TIMEOUT": "30"})

    assert 3 == result.code
    assert [] == result.events("wait.retry")
    assert "does not exist" in result.event("run.failed")["error"]


@pytest.mark.parametrize("url", ["mysql://u:p@h/db", "postgresql://h:notaport/db", "not a url"])
def test_bad_url_exits_2(env: dict[str, str], url: str) -> None:
    """An unusable DATABASE_URL is a configuration error: exit 2, no traceback, no password."""
    result = run_job("run", env={**env, "DATABASE_URL": url})

    assert 2 == result.code
    assert "ConfigError" == result.event("run.failed")["error_type"]
    assert "Traceback" not in result.stdout + result.stderr
    assert ":p@" not in result.stdout


def test_missing_alembic_ini_exits_2(env: dict[str, str], tmp_path: Path) -> None:
    """A missing alembic.ini exits 2 and says how to point at one."""
    result = run_job("run", env={**env, "ALEMBIC_CONFIG": str(tmp_path / "nope.ini")})

    assert 2 == result.code
    assert "ALEMBIC_CONFIG" in result.event("run.failed")["error"]


def test_bad_flag_exits_2_as_json(env: dict[str, str]) -> None:
    """An unknown flag is a usage error logged as JSON, exit 2."""
    result = run_job("run", "--no-such-flag", env=env)

    assert 2 == result.code
    assert "--no-such-flag" in result.event("run.failed")["error"]


def test_pg_dump_missing_exits_5_and_migrates_nothing(db: Db, env: dict[str, str], tmp_path: Path) -> None:
    """Without pg_dump on PATH the backup fails: exit 5, nothing migrated, no file left."""
    db.holds_data()
    bare_path = tmp_path / "bin"
    bare_path.mkdir()
    result = run_job("run", env={**env, "PATH": str(bare_path)})

    assert 5 == result.code
    assert "pg_dump not found" in result.event("run.failed")["error"]
    assert [] == db.version()
    assert [] == list(Path(env["MIGRATE_BACKUP_DIR"]).iterdir())


def test_password_never_leaks_into_output_or_pg_dump_argv(app_db: Db, env: dict[str, str], tmp_path: Path) -> None:
    """The password reaches pg_dump through its environment only, and appears in no output."""
    job_env = {**env, "DATABASE_URL": app_db.url}
    assert 0 == run_job("run", env={**job_env, "MIGRATE_TARGET": "0003"}).code
    blocker = app_db.connect()
    blocker.autocommit = False
    with blocker.cursor() as cur:  # pg_dump will wait for this lock, long enough to be inspected
        cur.execute("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
    out = tmp_path / "out"
    proc = start_logged(job_env, out)
    wait_for_event(out, "backup.start")
    cmdlines, environs = _pg_dump_processes(app_db.name, timeout=10)
    blocker.rollback()
    blocker.close()
    result = finish_logged(proc, out)

    assert 0 == result.code, result.stdout
    assert cmdlines
    forms = (SECRET, SECRET_IN_URL, "s3cr")
    assert not any(form in cmdline for cmdline in cmdlines for form in forms)
    assert any(f"PGPASSWORD={SECRET}" in environ for environ in environs)
    sidecar = Path(result.event("backup.done")["path"] + ".json").read_text()
    termination = Path(env["MIGRATE_TERMINATION_LOG"]).read_text()
    for text in (result.stdout, result.stderr, sidecar, termination):
        assert not any(form in text for form in forms)


def test_password_never_leaks_when_the_revision_fails(app_db: Db, env: dict[str, str]) -> None:
    """A failure's error, log and termination message carry no password."""
    result = run_job("run", env={**env, "DATABASE_URL": app_db.url, "ALEMBIC_CONFIG": scenario("failing")})

    assert 6 == result.code
    termination = Path(env["MIGRATE_TERMINATION_LOG"]).read_text()
    for text in (result.stdout, result.stderr, termination):
        assert SECRET not in text and SECRET_IN_URL not in text


def test_encoded_password_works_for_a_stock_env_py(app_db: Db, env: dict[str, str], tmp_path: Path) -> None:
    """A `%` in the encoded password survives configparser on its way to a stock env.py's engine."""
    alembic = str(Path(MIGRATE_JOB).parent / "alembic")
    subprocess.run([alembic, "init", "migrations"], cwd=tmp_path, check=True, capture_output=True)
    subprocess.run([alembic, "revision", "-m", "one"], cwd=tmp_path, check=True, capture_output=True)

    result = run_job("run", env={**env, "DATABASE_URL": app_db.url, "ALEMBIC_CONFIG": str(tmp_path / "alembic.ini")},
                     cwd=tmp_path)

    assert 0 == result.code, result.stdout
    assert 1 == len(app_db.version())
    assert SECRET not in result.stdout and SECRET_IN_URL not in result.stdout


def _pg_dump_processes(database: str, timeout: float) -> tuple[list[str], list[str]]:
    """The command lines and environments of the pg_dump processes dumping `database`, once there are some
    (other tests' pg_dumps may be running at the same time)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        cmdlines, environs = [], []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                if "pg_dump" in cmdline.split(" ")[0] and f"dbname={database}" in cmdline:
                    cmdlines.append(cmdline)
                    environs.append(Path(f"/proc/{pid}/environ").read_bytes().replace(b"\0", b"\n").decode())
            except OSError:
                continue
        if cmdlines:
            return cmdlines, environs
        time.sleep(0.02)
    return [], []


def test_broken_env_py_is_a_configuration_error(db: Db, env: dict[str, str], tmp_path: Path) -> None:
    """An env.py that cannot even import exits 2 naming env.py, not 6 naming a revision."""
    import shutil

    project = tmp_path / "broken"
    shutil.copytree(Path(scenario("failing")).parent, project)
    (project / "env.py").write_text("import no_such_module_anywhere\n")

    result = run_job("run", env={**env, "ALEMBIC_CONFIG": str(project / "alembic.ini"), "PYTHONPATH": str(ROOT)})

    assert 2 == result.code
    assert "env.py" in result.event("run.failed")["error"]
    assert [] == db.version()


def test_revision_file_that_does_not_import_is_a_configuration_error(db: Db, env: dict[str, str], tmp_path: Path) -> None:
    """A revision file with a syntax error exits 2 before any backup or change."""
    import shutil

    project = tmp_path / "broken"
    shutil.copytree(Path(scenario("failing")).parent, project)
    (project / "versions" / "f003.py").write_text("revision = 'f003'\ndown_revision = 'f002'\ndef upgrade(:\n")

    result = run_job("run", env={**env, "ALEMBIC_CONFIG": str(project / "alembic.ini"), "PYTHONPATH": str(ROOT)})

    assert 2 == result.code
    assert "SyntaxError" in result.event("run.failed")["error"]
    assert [] == result.events("backup.start")
    assert [] == db.version()


def test_sigterm_during_the_backup_leaves_nothing_behind(db: Db, env: dict[str, str], backup_dir: Path,
                                                         tmp_path: Path) -> None:
    """SIGTERM while pg_dump runs: pg_dump stops, no file (partial or not) is left, nothing migrated, 143."""
    assert 0 == run_job("run", env={**env, "MIGRATE_TARGET": "0003"}).code
    before = sorted(backup_dir.iterdir())
    blocker = db.connect()
    blocker.autocommit = False
    with blocker.cursor() as cur:  # pg_dump waits for this lock until the signal
        cur.execute("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
    out = tmp_path / "out"
    proc = start_logged(env, out)
    wait_for_event(out, "backup.start")
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)

    result = finish_logged(proc, out, timeout=15)
    blocker.rollback()
    blocker.close()

    assert 143 == result.code
    assert before == sorted(backup_dir.iterdir())
    assert ["0003"] == db.version()
    assert 0 == db.advisory_locks()
    others = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
    deadline = time.monotonic() + 5  # pg_dump's session ends once it finds its client gone
    while db.query(others)[0][0] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [(0,)] == db.query(others)


def test_a_log_reader_that_goes_away_does_not_stop_the_migration(db: Db, env: dict[str, str]) -> None:
    """`migrate-job run | head -1`: the reader closes the pipe after one line; the job migrates and exits 0."""
    proc = subprocess.Popen([MIGRATE_JOB, "run"], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert "run.start" in proc.stdout.readline()
    proc.stdout.close()

    assert 0 == proc.wait(timeout=60), proc.stderr.read()
    assert ["0006"] == db.version()
    assert "Traceback" not in proc.stderr.read()
