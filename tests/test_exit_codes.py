"""Every way a run can end has its exit code: a revision's sys.exit(), a version row that is a
name, a full server, a connection or a lock lost outside a revision; and nothing outlives the job."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.conftest import Db, finish_logged, start_logged
from tests.events import wait_for_event
from tests.pgcluster import Cluster
from tests.test_env_sessions import at_head_with_next
from tests.test_projects import SHAPES, run_job

pytestmark = pytest.mark.faults

OWN_ENGINE = SHAPES["sync-template-psycopg2"]


@pytest.mark.parametrize("body", ["import sys\n    sys.exit(0)", "import sys\n    sys.exit(3)", "raise KeyboardInterrupt"],
                         ids=["sys.exit(0)", "sys.exit(3)", "KeyboardInterrupt"])
def test_a_revision_that_exits_is_a_failed_revision(body: str, db: Db, env: dict[str, str], tmp_path: Path) -> None:
    """sys.exit() or KeyboardInterrupt inside a revision: exit 6 naming it, rolled back, history `failed`."""
    job_env = at_head_with_next(OWN_ENGINE, db, env, tmp_path, body='op.execute("CREATE TABLE half (id int)")\n    ' + body)

    result = run_job("run", env=job_env)

    assert (6, True, ["b003"]) == (result.code, "revision b004" in result.event("run.failed")["error"], db.version())
    assert "half" not in db.tables()
    assert [("b004", "failed")] == db.query(
        "SELECT revision, outcome FROM migrate_job.migrate_job_history WHERE kind = 'revision' AND revision = 'b004'")


@pytest.mark.parametrize("row", ["head", "heads", "b00"])
def test_a_version_row_that_is_not_a_revision_id_exits_7(row: str, db: Db, env: dict[str, str], tmp_path: Path) -> None:
    """A version table holding `head`, `heads` or a partial id is not taken for the revision it names."""
    job_env = at_head_with_next(OWN_ENGINE, db, env, tmp_path, body="pass")
    db.query("UPDATE alembic_version SET version_num = %s", (row,))

    result = run_job("run", env=job_env)

    assert (7, True) == (result.code, repr(row) in result.event("run.failed")["error"])


def test_a_full_server_is_waited_for(tmp_path: Path, env: dict[str, str]) -> None:
    """Every connection slot taken when the job starts: `too many clients` is retried until one frees up."""
    import psycopg2

    cluster = Cluster(Path(tempfile.mkdtemp(prefix="migrate-job-full-")), max_connections=8)
    cluster.start()
    try:
        cluster.psql("CREATE DATABASE full_server")
        url = cluster.url("full_server", password="password")
        fillers = []
        while True:  # take every slot but the superusers' reserved ones
            try:
                fillers.append(psycopg2.connect(url))
            except psycopg2.OperationalError:
                break
        out = tmp_path / "job.log"
        proc = start_logged({**env, "DATABASE_URL": url, "MIGRATE_WAIT_TIMEOUT": "60"}, out)
        wait_for_event(out, "wait.retry")
        time.sleep(1)
        for conn in fillers:
            conn.close()
        result = finish_logged(proc, out)
    finally:
        cluster.destroy()

    assert (0, True) == (result.code, "too many clients" in result.events("wait.retry")[0]["error"]), result.stdout[-600:]


def test_a_connection_lost_while_waiting_for_the_lock_exits_3(db: Db, env: dict[str, str], tmp_path: Path) -> None:
    """The job's session ended by the server while it waits for the lock: exit 3 with what happened, not a traceback."""
    from tests.conftest import hold_lock

    holder, _ = hold_lock(db)
    out = tmp_path / "job.log"
    proc = start_logged(env, out)
    wait_for_event(out, "lock.waiting")
    db.query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s "
             "AND application_name LIKE 'migrate-job/%%'", (db.name,))
    result = finish_logged(proc, out)
    holder.close()

    failed = result.event("run.failed")
    assert (3, "DatabaseUnavailable", None) == (result.code, failed["error_type"], failed.get("traceback"))


def test_idle_session_timeout_does_not_take_the_lock_from_its_holder(db: Db, env: dict[str, str],
                                                                   tmp_path: Path) -> None:
    """With idle_session_timeout=1s on the database, the locked session idles through a 2.5 s revision on env.py's engine."""
    job_env = at_head_with_next(OWN_ENGINE, db, env, tmp_path, body='op.execute("SELECT pg_sleep(2.5)")')
    db.query(f'ALTER DATABASE "{db.name}" SET idle_session_timeout = \'1s\'')

    result = run_job("run", env=job_env)

    assert (0, ["b004"]) == (result.code, db.version()), result.stdout[-600:]


def test_a_lock_lost_mid_run_stops_before_the_next_revision_with_4(db: Db, env: dict[str, str],
                                                                   tmp_path: Path) -> None:
    """The session holding the lock is ended while env.py's engine runs b004: b004 finds it lost
    inside its transaction and rolls back, b005 never starts, exit 4."""
    job_env = at_head_with_next(OWN_ENGINE, db, env, tmp_path, body='op.execute("SELECT pg_sleep(1.5)")')
    (tmp_path / "blog_versions" / "b005_after.py").write_text(
        (tmp_path / "blog_versions" / "b004_next.py").read_text().replace("b004", "b005").replace('"b003"', '"b004"')
        .replace("Revises: b003", "Revises: b004").replace("pg_sleep(1.5)", "SELECT 1"))
    out = tmp_path / "job.log"
    proc = start_logged(job_env, out)
    wait_for_event(out, "migration.start")
    db.query("SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND granted "
             "AND database = (SELECT oid FROM pg_database WHERE datname = %s)", (db.name,))
    result = finish_logged(proc, out)

    assert (4, "LockLost", ["b003"]) == (result.code, result.event("run.failed")["error_type"], db.version())
    assert ["b004"] == [e["revision"] for e in result.events("migration.start")]


def test_a_sigkilled_job_leaves_no_pg_dump_behind(db: Db, env: dict[str, str], tmp_path: Path) -> None:
    """pg_dump waiting on a table lock when the job is SIGKILLed dies with it, and releases its share locks."""
    db.holds_data()
    app = db.connect(application_name="app")
    app.autocommit = False
    app.cursor().execute("LOCK TABLE legacy_notes IN ACCESS EXCLUSIVE MODE")  # pg_dump waits for it
    out = tmp_path / "job.log"
    proc = start_logged(env, out)
    wait_for_event(out, "backup.start")
    time.sleep(0.5)

    def dumps() -> list[int]:
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"pg_dump" in cmdline and db.name.encode() in cmdline:
                found.append(int(pid))
        return found

    assert dumps()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 5
    while dumps() and time.monotonic() < deadline:
        time.sleep(0.05)
    app.rollback()
    app.close()

    assert [] == dumps()


@pytest.mark.parametrize("password", ["s3cr%t@p:ss/w0rd", "qz@xk@vj9", "hlf%"])
def test_an_unencoded_password_never_shows(password: str, env: dict[str, str], tmp_path: Path) -> None:
    """Exit 2 telling how to encode it; no piece of it in stdout, stderr or the termination log."""
    result = run_job("run", env={**env, "DATABASE_URL": f"postgresql://app:{password}@127.0.0.1:5432/postgres"})

    everything = result.stdout + result.stderr + Path(env["MIGRATE_TERMINATION_LOG"]).read_text()
    pieces = [piece for piece in re.split(r"[@%:/]", password) if len(piece) >= 3]
    assert (2, []) == (result.code, [piece for piece in pieces if piece in everything])
    assert "must be URL-encoded" in result.event("run.failed")["error"]


def test_an_unresponsive_server_is_given_up_on_by_the_wait_timeout(db: Db, env: dict[str, str]) -> None:
    """A server that accepts TCP and never answers: exit 3 by MIGRATE_WAIT_TIMEOUT (plus one connect timeout)."""
    from tests.tcpproxy import Proxy

    proxy = Proxy(5432)
    proxy.black_hole()
    try:
        started = time.monotonic()
        result = run_job("run", env={**env, "DATABASE_URL": f"postgresql://postgres@127.0.0.1:{proxy.port}/{db.name}",
                                     "MIGRATE_WAIT_TIMEOUT": "4"}, timeout=60)
        took = time.monotonic() - started
    finally:
        proxy.close()

    assert (3, True) == (result.code, took < 11), (took, result.stdout[-600:])
    assert "timeout expired" in result.event("run.failed")["error"]


def test_sigterm_ends_the_job_in_seconds_even_when_the_server_is_unreachable(db: Db, env: dict[str, str],
                                                                            tmp_path: Path) -> None:
    """Mid-revision, the network goes dark, then SIGTERM: the cancel request cannot reach the server, and
    the job still exits 143 within a few seconds."""
    from tests.conftest import scenario
    from tests.tcpproxy import Proxy

    proxy = Proxy(5432)
    try:
        slow = {**env, "ALEMBIC_CONFIG": scenario("slow"), "SCENARIO_SLEEP": "30",
                "DATABASE_URL": f"postgresql://postgres@127.0.0.1:{proxy.port}/{db.name}"}
        out = tmp_path / "job.log"
        proc = start_logged(slow, out)
        wait_for_event(out, "migration.start")
        time.sleep(0.3)
        proxy.black_hole()
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        result = finish_logged(proc, out, timeout=60)
        took = time.monotonic() - sent
    finally:
        proxy.close()

    assert (143, True) == (result.code, took < 5), (took, result.stdout[-600:])


def test_a_locked_history_table_never_holds_up_the_run(db: Db, env: dict[str, str]) -> None:
    """An operator's SHARE lock on the history table: the run warns once and migrates, within about one lock timeout."""
    assert 0 == run_job("run", env={**env, "MIGRATE_TARGET": "0001"}).code
    operator = db.connect(application_name="operator")
    operator.autocommit = False
    operator.cursor().execute("LOCK TABLE migrate_job.migrate_job_history IN SHARE MODE")
    started = time.monotonic()

    result = run_job("run", env={**env, "MIGRATE_STATEMENT_LOCK_TIMEOUT": "1"})
    took = time.monotonic() - started
    operator.rollback()
    operator.close()

    assert (0, ["0006"], 1) == (result.code, db.version(), len(result.events("history.unavailable")))
    assert took < 10, took


def test_sigterm_while_a_history_write_waits_is_not_swallowed(db: Db, env: dict[str, str], tmp_path: Path) -> None:
    """A SIGTERM that cancels a waiting history write ends the run (143); no revision starts after it."""
    db.holds_data()
    assert 0 == run_job("run", env={**env, "MIGRATE_TARGET": "0001"}).code
    operator = db.connect(application_name="operator")
    operator.autocommit = False
    operator.cursor().execute("LOCK TABLE migrate_job.migrate_job_history IN SHARE MODE")
    out = tmp_path / "job.log"
    proc = start_logged({**env, "MIGRATE_STATEMENT_LOCK_TIMEOUT": "30"}, out)
    wait_for_event(out, "plan")  # the run row's write comes next, and waits on the lock
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    result = finish_logged(proc, out)
    operator.rollback()
    operator.close()

    assert (143, [], ["0001"]) == (result.code, result.events("migration.start"), db.version())


@pytest.mark.parametrize("command", ["run", "check --wait"])
def test_a_wait_ends_by_its_timeout_when_the_network_dies(command: str, db: Db, env: dict[str, str],
                                                          tmp_path: Path) -> None:
    """Waiting for the lock (or for migrations) when the network goes dark: the job ends by the wait's
    timeout (plus a few seconds), exit 3, instead of waiting for the network to come back."""
    from tests.conftest import hold_lock
    from tests.tcpproxy import Proxy

    holder, _ = hold_lock(db)
    proxy = Proxy(5432)
    try:
        waiting = {**env, "DATABASE_URL": f"postgresql://postgres@127.0.0.1:{proxy.port}/{db.name}",
                   "MIGRATE_LOCK_TIMEOUT": "4", "MIGRATE_WAIT_TIMEOUT": "4"}
        out = tmp_path / "job.log"
        proc = start_logged(waiting, out, *command.split())
        wait_for_event(out, "lock.waiting" if command == "run" else "check.waiting")
        proxy.black_hole()
        started = time.monotonic()
        result = finish_logged(proc, out, timeout=60)
        took = time.monotonic() - started
    finally:
        proxy.close()
        holder.close()

    # (the timeout plus the job's own bounded steps; without the deadline it waits for the network, minutes;
    # a loaded two-core machine has measured 13.5 s)
    assert (3, True) == (result.code, took < 20), (took, result.stdout[-600:])


@contextlib.contextmanager
def twenty_slots(env: dict[str, str]) -> Iterator[tuple[Cluster, dict[str, str]]]:
    """A server of max_connections=20 with a database holding something to back up, and the
    environment of runs that wait two minutes for it and for the lock."""
    cluster = Cluster(Path(tempfile.mkdtemp(prefix="migrate-job-full-")), max_connections=20)
    cluster.start()
    try:
        cluster.psql("CREATE DATABASE full_server")
        cluster.psql("CREATE TABLE legacy (id int)", database="full_server")
        url = cluster.url("full_server", password="password")
        yield cluster, {**env, "DATABASE_URL": url, "MIGRATE_WAIT_TIMEOUT": "120", "MIGRATE_LOCK_TIMEOUT": "120"}
    finally:
        cluster.destroy()


def test_fifty_runs_on_twenty_connection_slots_all_migrate(tmp_path: Path, env: dict[str, str]) -> None:
    """Fifty runs at once on max_connections=20, backup included: waiters give their slots back so the
    holder's pg_dump gets one; every run exits 0 and the migrations ran once."""
    with twenty_slots(env) as (cluster, runs):
        outs = [tmp_path / f"job{n}.log" for n in range(50)]
        procs = [start_logged(runs, out) for out in outs]
        results = [finish_logged(p, out, timeout=300) for p, out in zip(procs, outs)]
        versions = cluster.psql("SELECT version_num FROM alembic_version", database="full_server").split()

    codes = [r.code for r in results]
    assert {0: 50} == {code: codes.count(code) for code in set(codes)}, [
        r.event("run.failed")["error"] for r in results if r.code][:3]
    assert (1, ["0006"]) == (sum(len(r.events("backup.done")) for r in results), versions)


def test_app_pods_waiting_for_migrations_leave_the_slots_the_migration_needs(tmp_path: Path,
                                                                              env: dict[str, str]) -> None:
    """Twenty `check --wait` pollers (every app pod's init container) on max_connections=20, then the
    run: the pollers give their connections back to a nearly full server, so the run's pg_dump and
    env.py get theirs; it migrates, and every poller then sees the target."""
    with twenty_slots(env) as (cluster, runs):
        outs = [tmp_path / f"poller{n}.log" for n in range(20)]
        pollers = [start_logged(runs, out, "check", "--wait") for out in outs]
        deadline = time.monotonic() + 60
        while _connected(cluster, "full_server") < 15:
            assert time.monotonic() < deadline, "the pollers never connected"
            time.sleep(0.2)
        migrated = run_job("run", env=runs, timeout=180)
        polled = [finish_logged(p, out, timeout=180) for p, out in zip(pollers, outs)]

    assert (0, 1) == (migrated.code, len(migrated.events("backup.done"))), migrated.stdout[-1500:]
    assert [0] * 20 == [r.code for r in polled]
    assert any(r.events("check.making_room") for r in polled)


def _connected(cluster: Any, database: str) -> int:
    """How many sessions are on `database`; a server with no slot left for the question has them all
    (the pollers connect as the superuser too, so they may take the reserved slots)."""
    try:
        return int(cluster.psql(f"SELECT count(*) FROM pg_stat_activity WHERE datname = '{database}'"))
    except subprocess.CalledProcessError as e:
        if "too many clients" in (e.stderr or ""):
            return 1 << 30
        raise


def test_lock_timeout_zero_tries_the_lock_once(db: Db, env: dict[str, str]) -> None:
    """MIGRATE_LOCK_TIMEOUT=0 with the lock held elsewhere: exit 4 at once."""
    from tests.conftest import hold_lock

    holder, _ = hold_lock(db)
    started = time.monotonic()
    result = run_job("run", env={**env, "MIGRATE_LOCK_TIMEOUT": "0"})
    took = time.monotonic() - started
    holder.close()

    assert (4, True) == (result.code, took < 5), (took, result.stdout[-1500:])


def test_lock_timeout_zero_does_not_let_pg_dump_wait_forever(db: Db, env: dict[str, str]) -> None:
    """pg_dump's --lock-wait-timeout=0 would wait forever; with MIGRATE_LOCK_TIMEOUT=0 a locked table fails the backup at once."""
    db.holds_data()
    app = db.connect(application_name="app")
    app.autocommit = False
    app.cursor().execute("LOCK TABLE legacy_notes IN ACCESS EXCLUSIVE MODE")
    started = time.monotonic()
    result = run_job("run", env={**env, "MIGRATE_LOCK_TIMEOUT": "0"}, timeout=60)
    took = time.monotonic() - started
    app.rollback()
    app.close()

    assert (5, [], True) == (result.code, db.version(), took < 10), (took, result.stdout[-400:])
