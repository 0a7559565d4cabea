"""Every session env.py opens is held to the job's guarantees, whatever driver its own engine uses:
the job's session settings, the lock timeout with the revision retried, no session left behind
after a signal, and no connection to another database than the locked one."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from tests.conftest import Db, finish_logged, start_logged
from tests.events import wait_for_event
from tests.test_projects import REVISION, SHAPES, Shape, make_project, run_job, url_for

pytestmark = pytest.mark.faults

# env.py building its own engine, in each driver: the stock sync template (psycopg2, psycopg 3)
# and the stock async template (asyncpg)
OWN_ENGINES = {
    "psycopg2": SHAPES["sync-template-psycopg2"],
    "psycopg3": SHAPES["sync-template-psycopg3"],
    "asyncpg": SHAPES["async-template"],
}



def at_head_with_next(shape: Shape, db: Db, env: dict[str, str], where: Path, body: str) -> dict[str, str]:
    """The project migrated to b003, with b004 (doing `body`) added; the job's environment for it."""
    project = make_project(shape, where)
    job_env = {**env, "DATABASE_URL": url_for(db, shape.scheme), "ALEMBIC_CONFIG": str(project / shape.config)}
    assert 0 == run_job("run", env=job_env, cwd=project).code
    (where / "blog_versions" / "b004_next.py").write_text(REVISION.format(doc="the next revision", body=body))
    return job_env


def sessions_of_the_job(db: Db) -> list[tuple[int, str]]:
    return db.query("SELECT pid, state FROM pg_stat_activity WHERE datname = %s AND application_name LIKE 'migrate-job/%%'",
                    (db.name,))


@pytest.mark.parametrize("driver", OWN_ENGINES)
def test_env_py_sessions_get_the_job_settings(driver: str, db: Db, env: dict[str, str], tmp_path: Path) -> None:
    """A revision run on env.py's own engine sees the job's application_name and timeouts."""
    job_env = at_head_with_next(OWN_ENGINES[driver], db, env, tmp_path, body=(
        'op.execute("CREATE TABLE seen AS SELECT current_setting(\'application_name\') AS app, '
        'current_setting(\'lock_timeout\') AS lock, current_setting(\'idle_in_transaction_session_timeout\') AS idle")'))

    assert 0 == run_job("run", env={**job_env, "MIGRATE_STATEMENT_LOCK_TIMEOUT": "1.5"}).code

    ((app, lock, idle),) = db.query("SELECT app, lock, idle FROM seen")
    assert (True, "1500ms", "1min") == (app.startswith("migrate-job/"), lock, idle)


@pytest.mark.parametrize("driver", OWN_ENGINES)
def test_lock_timeout_on_env_py_engine_is_retried(driver: str, db: Db, env: dict[str, str], tmp_path: Path) -> None:
    """DDL on env.py's own engine gives up behind an application transaction, is retried, and then applies."""
    job_env = at_head_with_next(OWN_ENGINES[driver], db, env, tmp_path,
                                body='op.add_column("users", sa.Column("nickname", sa.Text))')
    app = db.connect(application_name="app")
    app.autocommit = False
    app.cursor().execute("SELECT * FROM users")  # holds users' ACCESS SHARE lock until it ends
    out = tmp_path / "job.log"

    proc = start_logged({**job_env, "MIGRATE_STATEMENT_LOCK_TIMEOUT": "0.3", "MIGRATE_LOCK_RETRIES": "20"}, out)
    wait_for_event(out, "migration.retry")
    app.rollback()
    result = finish_logged(proc, out)
    app.close()

    assert (0, "b004") == (result.code, result.events("migration.done")[-1]["revision"]), result.stdout[-800:]
    assert "app" in {b["application_name"] for b in result.events("migration.retry")[0]["blockers"]}


@pytest.mark.parametrize("driver", OWN_ENGINES)
def test_sigterm_mid_revision_leaves_no_session_behind(driver: str, db: Db, env: dict[str, str], tmp_path: Path) -> None:
    """SIGTERM while env.py's own session runs a revision: exit 143 at once, and none of the run's sessions remain."""
    job_env = at_head_with_next(OWN_ENGINES[driver], db, env, tmp_path, body='op.execute("SELECT pg_sleep(60)")')
    out = tmp_path / "job.log"
    proc = start_logged(job_env, out)
    wait_for_event(out, "migration.start")
    deadline = time.monotonic() + 10
    while not any(state == "active" for _, state in sessions_of_the_job(db)) and time.monotonic() < deadline:
        time.sleep(0.05)  # env.py's session is running the revision
    assert any(state == "active" for _, state in sessions_of_the_job(db))

    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    result = finish_logged(proc, out, timeout=30)
    took = time.monotonic() - sent

    assert (143, True) == (result.code, took < 5), (took, result.stdout[-800:])
    deadline = time.monotonic() + 2  # a terminated backend takes a moment to go
    while sessions_of_the_job(db) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [] == sessions_of_the_job(db)
    assert ["b003"] == db.version()
