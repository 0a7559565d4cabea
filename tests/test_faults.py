"""Fault injection against real PostgreSQL: each case asserts the exit code, the log event, the
database state afterwards, and that the lock is free. Run alone with `pytest -m faults`."""

from __future__ import annotations

import os
import random
import re
import resource
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from job import backup as job_backup
from job.config import Database
from tests.conftest import (
    ROOT, Db, Result, finish, finish_logged, run_job, scenario, start_job, start_logged,
)
from tests.events import events, wait_for_event
from tests.pgcluster import Cluster, server_user

pytestmark = pytest.mark.faults


def _wait_until(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


# --- the application's transactions ----------------------------------------------------------

def test_revision_blocked_by_an_app_transaction_retries_then_succeeds(db: Db, env: dict[str, str]) -> None:
    """DDL behind a long app transaction gives up after the lock timeout, retries, and succeeds once
    the transaction ends; meanwhile the app's queries never wait longer than that timeout."""
    assert 0 == run_job("run", env={**env, "MIGRATE_TARGET": "0004"}).code
    app = db.connect(application_name="blog-app")
    app.autocommit = False
    with app.cursor() as cur:
        cur.execute("SELECT count(*) FROM users")  # holds ACCESS SHARE on users until commit
    waits: list[float] = []
    stop = threading.Event()

    def app_queries() -> None:
        reader = db.connect()
        while not stop.is_set():
            started = time.monotonic()
            with reader.cursor() as cur:
                cur.execute("SELECT count(*) FROM users")
            waits.append(time.monotonic() - started)
            time.sleep(0.02)
        reader.close()

    readers = threading.Thread(target=app_queries)
    readers.start()
    job = start_job("run", env={**env, "MIGRATE_STATEMENT_LOCK_TIMEOUT": "0.5", "MIGRATE_LOCK_RETRIES": "20"})
    time.sleep(3)
    app.commit()
    app.close()
    result = finish(job)
    stop.set()
    readers.join()

    assert 0 == result.code, result.stdout
    retries = result.events("migration.retry")
    assert retries and retries[0]["revision"] == "0005"
    assert "blog-app" in [b["application_name"] for b in retries[0]["blockers"]]
    assert ["0006"] == db.version()
    assert max(waits) < 0.5 + 0.4, sorted(waits)[-5:]
    assert 0 == db.advisory_locks()


def test_revision_blocked_past_its_retries_exits_6_naming_the_blocker(db: Db, env: dict[str, str]) -> None:
    """When the app's transaction outlasts every retry, the job exits 6 and names the blocking pid."""
    assert 0 == run_job("run", env={**env, "MIGRATE_TARGET": "0004"}).code
    app = db.connect(application_name="long-report")
    app.autocommit = False
    with app.cursor() as cur:
        cur.execute("SELECT count(*) FROM users")
        cur.execute("SELECT pg_backend_pid()")
        (pid,) = cur.fetchone()

    result = run_job("run", env={**env, "MIGRATE_STATEMENT_LOCK_TIMEOUT": "0.2", "MIGRATE_LOCK_RETRIES": "1"})
    app.rollback()
    app.close()

    assert 6 == result.code
    error = result.event("run.failed")["error"]
    assert "0005" in error and f"pid {pid}" in error and "long-report" in error
    assert 1 == len(result.events("migration.retry"))
    assert ["0004"] == db.version()
    assert 0 == db.advisory_locks()


# --- the server and the process going away ---------------------------------------------------

def test_server_restarted_mid_revision_exits_6_and_the_next_run_completes(cluster, env: dict[str, str],
                                                                          tmp_path: Path) -> None:
    """A server restart during a revision: exit 6 saying it was rolled back; the next run finishes."""
    cluster.start()
    slow = {**env, "DATABASE_URL": cluster.url(), "ALEMBIC_CONFIG": scenario("slow"), "SCENARIO_SLEEP": "30",
            "MIGRATE_BACKUP": "off"}
    out = tmp_path / "out"
    proc = start_logged(slow, out)
    wait_for_event(out, "migration.done")
    time.sleep(0.5)
    cluster.restart()

    result = finish_logged(proc, out)

    assert 6 == result.code, result.stdout
    error = result.event("run.failed")["error"]
    assert "s002" in error and "rolled the revision back" in error
    assert "s001" == cluster.psql("SELECT version_num FROM alembic_version")
    assert 0 == run_job("run", env={**slow, "SCENARIO_SLEEP": "0"}).code
    assert "s002" == cluster.psql("SELECT version_num FROM alembic_version")
    assert "1" == cluster.psql("SELECT count(*) FROM ran")


def test_sigkill_of_the_holder_rolls_back_and_frees_the_lock(db: Db, env: dict[str, str], tmp_path: Path) -> None:
    """A holder killed outright: the server rolls its revision back and frees the lock; the next run completes."""
    slow = {**env, "ALEMBIC_CONFIG": scenario("slow"), "SCENARIO_SLEEP": "30"}
    out = tmp_path / "out"
    proc = start_logged(slow, out)
    wait_for_event(out, "migration.done")
    time.sleep(0.5)
    proc.kill()
    proc.wait()

    assert _wait_until(lambda: db.advisory_locks() == 0)
    assert ["s001"] == db.version()
    assert [(0,)] == db.query("SELECT count(*) FROM ran")
    result = run_job("run", env={**slow, "SCENARIO_SLEEP": "0"})
    assert 0 == result.code
    assert ["s002"] == db.version()
    assert [(1,)] == db.query("SELECT count(*) FROM ran")


def test_chaos_of_killed_runners_still_applies_every_revision_once(db: Db, env: dict[str, str],
                                                                   backup_dir: Path) -> None:
    """24 runners, a few SIGKILLed at random moments, re-run until all exit 0: the database ends
    at head, every revision applied exactly once, no partial backup, no lock left."""
    chaos = {**env, "ALEMBIC_CONFIG": scenario("chaos"), "MIGRATE_LOCK_TIMEOUT": "120"}
    rng = random.Random(20261125)
    procs = [start_job("run", env=chaos) for _ in range(24)]
    deadline = time.monotonic() + 6
    killed = 0
    while time.monotonic() < deadline and killed < 6:
        time.sleep(rng.uniform(0.2, 1.0))
        alive = [p for p in procs if p.poll() is None]
        if alive:
            rng.choice(alive).kill()
            killed += 1
    codes = [p.wait(timeout=120) for p in procs]
    for _ in range(3):  # the killed ones are started again, as Kubernetes would
        failed = [i for i, code in enumerate(codes) if code != 0]
        if not failed:
            break
        reruns = [start_job("run", env=chaos) for _ in failed]
        for i, proc in zip(failed, reruns):
            codes[i] = finish(proc).code

    assert killed > 0
    assert [0] * 24 == codes
    assert ["c006"] == db.version()
    assert [(f"c00{i}", 1) for i in range(1, 7)] == db.query(
        "SELECT revision, count(*) FROM effects GROUP BY revision ORDER BY revision"
    )
    assert [] == [p.name for p in backup_dir.iterdir() if p.name.endswith(".partial")]
    for dump in backup_dir.glob("*.dump"):
        assert Path(f"{dump}.json").exists()
    assert 0 == db.advisory_locks()


# --- backups that cannot be written ----------------------------------------------------------

def _limit_file_size(limit: int):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_full_disk_during_backup_exits_5_and_keeps_older_backups(db: Db, env: dict[str, str],
                                                                 backup_dir: Path) -> None:
    """A backup that hits the file size limit exits 5: nothing migrated, no partial file, older backups intact."""
    assert 0 == run_job("run", env={**env, "MIGRATE_TARGET": "0004"}).code
    db.query("INSERT INTO users (email, first_name, last_name) "
             "SELECT 'u' || g || '@example.org', md5(g::text), md5((g * 3)::text) FROM generate_series(1, 5000) g")
    older = sorted((p.name, p.read_bytes()) for p in backup_dir.iterdir())
    from tests.conftest import MIGRATE_JOB

    proc = subprocess.run([MIGRATE_JOB, "run"], env=env, cwd=ROOT, capture_output=True, text=True,
                          preexec_fn=_limit_file_size(64 * 1024))
    result = Result(proc.returncode, proc.stdout, proc.stderr)

    assert 5 == result.code, result.stdout
    assert "SIGXFSZ" in result.event("run.failed")["error"] or "File too large" in result.event("run.failed")["error"]
    assert ["0004"] == db.version()
    assert older == sorted((p.name, p.read_bytes()) for p in backup_dir.iterdir())
    assert 0 == db.advisory_locks()


def test_backup_dir_that_is_not_writable_exits_5(db: Db, env: dict[str, str]) -> None:
    """A backup directory the job may not write to exits 5 with nothing migrated."""
    db.holds_data()
    locked_dir = Path(tempfile.mkdtemp(prefix="migrate-job-ro-"))
    # root ignores permissions; an immutable directory stops root too
    lock_cmd, unlock_cmd = (["chattr", "+i"], ["chattr", "-i"]) if os.geteuid() == 0 else (["chmod", "555"], ["chmod", "755"])
    subprocess.run([*lock_cmd, str(locked_dir)], check=True)
    try:
        result = run_job("run", env={**env, "MIGRATE_BACKUP_DIR": str(locked_dir)})
    finally:
        subprocess.run([*unlock_cmd, str(locked_dir)], check=True)
        shutil.rmtree(locked_dir)

    assert 5 == result.code, result.stdout + result.stderr
    assert "cannot write to backup directory" in result.event("run.failed")["error"]
    assert [] == db.version()
    assert 0 == db.advisory_locks()


def test_missing_backup_dir_exits_5(db: Db, env: dict[str, str], tmp_path: Path) -> None:
    """A backup directory that does not exist exits 5 and says how to fix it."""
    db.holds_data()
    result = run_job("run", env={**env, "MIGRATE_BACKUP_DIR": str(tmp_path / "nope")})

    assert 5 == result.code
    assert "MIGRATE_BACKUP_DIR" in result.event("run.failed")["error"]
    assert [] == db.version()


def test_pg_dump_older_than_the_server_is_explained() -> None:
    """pg_dump's own refusal of a newer server becomes an error naming the client package to install."""
    # what pg_dump prints (src/bin/pg_dump/pg_backup_db.c); this machine has no older pg_dump to run
    stderr = "pg_dump: error: aborting because of server version mismatch\npg_dump: detail: server version: 16.1; pg_dump version: 15.20\n"

    error = job_backup.server_too_new(stderr, 160001)

    assert ("pg_dump is older than the server (server version: 16.1; pg_dump version: 15.20): install "
            "postgresql-client-16 or newer in the image (build argument PG_MAJOR)") == str(error)
    assert job_backup.server_too_new("pg_dump: error: connection to server failed", 160001) is None


# --- configuration -----------------------------------------------------------------------------

def test_invalid_alembic_ini_exits_2(env: dict[str, str], tmp_path: Path) -> None:
    """An alembic.ini that is not an Alembic configuration exits 2."""
    ini = tmp_path / "alembic.ini"
    ini.write_text("this is not\n[an ini\n")

    result = run_job("run", env={**env, "ALEMBIC_CONFIG": str(ini)})

    assert 2 == result.code
    assert "Traceback" not in result.stdout + result.stderr


def test_session_tells_the_server_to_notice_a_vanished_client(env: dict[str, str]) -> None:
    """The job's session sets server-side TCP keepalives, so a vanished pod's lock is freed."""
    from job.wait import wait_for_database

    conn = wait_for_database(Database.from_url(env["DATABASE_URL"]).connect_kwargs("t"), timeout=5)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT current_setting('tcp_keepalives_idle'), current_setting('tcp_keepalives_count')")
            assert ("10", "3") == cur.fetchone()
            cur.execute("SELECT current_setting('client_connection_check_interval')")
            assert ("1s",) == cur.fetchone()
    finally:
        conn.close()


@pytest.mark.parametrize(("sslmode", "tls"), [("require", "t"), ("disable", "f")])
def test_sslmode_reaches_pg_dump(env: dict[str, str], tmp_path: Path, sslmode: str, tls: str) -> None:
    """Against a server offering TLS, the URL's sslmode decides whether pg_dump's own session uses it
    (libpq's default, prefer, would use it either way: `disable` shows the parameter arrives)."""
    from tests.pgcluster import Cluster

    cluster = Cluster(Path(tempfile.mkdtemp(prefix="migrate-job-pgssl-")), ssl=True)
    cluster.start()
    try:
        url = cluster.url() + f"?sslmode={sslmode}"
        job_env = {**env, "DATABASE_URL": url}
        assert 0 == run_job("run", env={**job_env, "MIGRATE_TARGET": "0003"}).code
        import psycopg2

        blocker = psycopg2.connect(url)
        with blocker.cursor() as cur:  # pg_dump waits for this lock, long enough to be looked at
            cur.execute("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
        out = tmp_path / "out"
        proc = start_logged(job_env, out)
        wait_for_event(out, "backup.start")
        waiting = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
        assert _wait_until(lambda: cluster.psql(waiting) == "1")
        dumping_over_tls = cluster.psql(
            "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a ON a.pid = s.pid "
            "WHERE a.wait_event_type = 'Lock' AND a.application_name LIKE 'migrate-job/%'"
        )
        blocker.rollback()
        blocker.close()
        result = finish_logged(proc, out)
    finally:
        cluster.destroy()

    assert tls == dumping_over_tls
    assert 0 == result.code, result.stdout
    assert result.event("backup.done")["bytes"] > 0


def test_url_parameters_reach_psycopg2_and_pg_dump(db: Db, env: dict[str, str]) -> None:
    """sslmode from the URL reaches psycopg2 (a non-SSL server refuses it) and pg_dump's conninfo."""
    result = run_job("run", env={**env, "DATABASE_URL": db.url + "?sslmode=require"})
    database = Database.from_url("postgresql://u:pw@h:5433/d?sslmode=require&sslrootcert=/ca.pem")

    assert 3 == result.code
    assert "SSL" in result.event("run.failed")["error"]
    conninfo = database.conninfo_without_password("x")
    assert "sslmode=require" in conninfo and "sslrootcert=/ca.pem" in conninfo and "pw" not in conninfo
    assert 0 == run_job("run", env={**env, "DATABASE_URL": db.url + "?sslmode=disable"}).code


# --- PgBouncer -------------------------------------------------------------------------------

@pytest.fixture
def pgbouncer(db: Db):
    """Start Debian's pgbouncer in front of the test server; yields a function making its URL for a pool mode."""
    binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    if not Path(binary).exists():
        pytest.fail("pgbouncer is not installed (.ci/run installs Debian's pgbouncer)")
    started: list[tuple[subprocess.Popen, Path]] = []

    def start(mode: str) -> str:
        from tests.pgcluster import free_port

        directory = Path(tempfile.mkdtemp(prefix="migrate-job-bouncer-"))
        port = free_port()
        (directory / "users.txt").write_text('"postgres" ""\n')
        (directory / "pgbouncer.ini").write_text(
            "[databases]\n* = host=127.0.0.1 port=5432\n"
            f"[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nauth_type = trust\n"
            f"auth_file = {directory}/users.txt\npool_mode = {mode}\nunix_socket_dir =\n"
            f"logfile = {directory}/pgbouncer.log\npidfile = {directory}/pgbouncer.pid\n"
            "ignore_startup_parameters = extra_float_digits,options\n"
        )
        user = server_user()
        if user is not None:
            shutil.chown(directory, user)
            for f in directory.iterdir():
                shutil.chown(f, user)
        argv = ([binary] if user is None else ["runuser", "-u", user, "--", binary]) + [str(directory / "pgbouncer.ini")]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started.append((proc, directory))
        url = f"postgresql://postgres@127.0.0.1:{port}/{db.name}"
        import psycopg2

        def accepts() -> bool:
            try:
                psycopg2.connect(url, connect_timeout=1).close()
                return True
            except psycopg2.OperationalError:
                return False

        assert _wait_until(accepts), (directory / "pgbouncer.log").read_text()
        return url

    yield start
    for proc, directory in started:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(directory, ignore_errors=True)


def test_pgbouncer_transaction_pooling_is_refused(db: Db, env: dict[str, str], pgbouncer) -> None:
    """Through PgBouncer in transaction mode the session lock is not ours: exit 2, nothing migrated."""
    result = run_job("run", env={**env, "DATABASE_URL": pgbouncer("transaction")})

    assert 2 == result.code, result.stdout
    assert "transaction mode" in result.event("run.failed")["error"]
    assert [] == result.events("lock.acquired")
    assert [] == db.version()


def test_pgbouncer_session_pooling_works(db: Db, env: dict[str, str], pgbouncer) -> None:
    """Through PgBouncer in session mode the lock is sound, and the job migrates."""
    result = run_job("run", env={**env, "DATABASE_URL": pgbouncer("session")})

    assert 0 == result.code, result.stdout
    assert ["0006"] == db.version()
    assert 0 == db.advisory_locks()


def test_a_server_crash_at_any_point_of_a_long_history_leaves_what_a_plain_rerun_completes(
        cluster: Cluster, env: dict[str, str], tmp_path: Path) -> None:
    """The server stopped dead (immediate shutdown: no checkpoint, the newest commits not yet
    flushed when synchronous_commit was off) in the middle of 120 revisions, some of which build an
    index concurrently: after its restart a plain re-run reaches head, dropping the INVALID index
    a build cut short left, and every index is valid; or, when the crash fell between a build's own
    commit and its version row's, says so, and the recovery it names completes it."""
    project = tmp_path / "long"
    (project / "versions").mkdir(parents=True)
    shutil.copy(ROOT / "tests" / "scenarios" / "slow" / "env.py", project / "env.py")
    (project / "alembic.ini").write_text(f"[alembic]\nscript_location = %(here)s\nprepend_sys_path = {ROOT}\n")
    previous = None
    for i in range(1, 121):
        rev = f"r{i:04d}"
        body = (f'    op.execute("CREATE TABLE t{i} (id int)")\n' if i % 10 else
                f'    with op.get_context().autocommit_block():\n'
                f'        op.execute("CREATE INDEX CONCURRENTLY t{i - 1}_id ON t{i - 1} (id)")\n')
        (project / "versions" / f"{rev}.py").write_text(
            f'"""step {i}"""\nfrom alembic import op\n\nrevision = "{rev}"\ndown_revision = {previous!r}\n'
            f"branch_labels = None\ndepends_on = None\n\n\ndef upgrade():\n{body}\n\ndef downgrade():\n    pass\n")
        previous = rev
    cluster.start()
    cluster.psql("CREATE DATABASE crash")
    job_env = {**env, "DATABASE_URL": cluster.url("crash"), "ALEMBIC_CONFIG": str(project / "alembic.ini"),
               "MIGRATE_BACKUP": "off", "MIGRATE_WAIT_TIMEOUT": "30"}
    out = tmp_path / "job.log"
    proc = start_logged(job_env, out)
    deadline = time.monotonic() + 60
    while sum(e == "migration.done" for e in events(out.read_text())) < 45:
        assert time.monotonic() < deadline and proc.poll() is None, out.read_text()[-2000:]
        time.sleep(0.01)
    cluster.stop(mode="immediate")
    crashed = finish_logged(proc, out)
    cluster.start()

    rerun = run_job("run", env=job_env)

    if rerun.code == 6:
        # the crash fell between a CREATE INDEX CONCURRENTLY's own commit and its version row's (a
        # window no tool closes): the re-run says so, and the recovery it names completes the history
        error = rerun.event("run.failed")["error"]
        assert "was killed before its version row committed" in error, rerun.stdout[-2000:]
        index = re.search(r'relation "(\w+)" already exists', error).group(1)
        assert "t" == cluster.psql(f"SELECT indisvalid FROM pg_index WHERE indexrelid = '{index}'::regclass", "crash")
        cluster.psql(f"DROP INDEX CONCURRENTLY {index}", "crash")
        rerun = run_job("run", env=job_env)
    assert (True, 0) == (crashed.code != 0, rerun.code), rerun.stdout[-2000:]
    assert ("r0120", "0") == (cluster.psql("SELECT version_num FROM alembic_version", "crash"),
                              cluster.psql("SELECT count(*) FROM pg_index WHERE NOT indisvalid", "crash"))
