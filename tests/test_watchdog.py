"""While a revision runs, the job says who blocks it and how far it has got: the lock graph's blocking
sessions (not merely the oldest transactions), an opt-in end to blockers idle in their transaction,
and the progress PostgreSQL reports of a long statement."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import Db, finish_logged, start_logged
from tests.events import wait_for_event
from tests.test_env_sessions import at_head_with_next
from tests.test_projects import SHAPES

pytestmark = pytest.mark.faults

ADD_COLUMN = 'op.add_column("users", sa.Column("nickname", sa.Text))'


@pytest.mark.parametrize("env_py", ["own-engine", "shared-connection"])
def test_a_blocked_alter_table_names_the_session_that_blocks_it(env_py: str, db: Db, env: dict[str, str],
                                                                tmp_path: Path) -> None:
    """An application transaction holding users: `migration.blocked` names it (pid, application_name,
    state), so do `migration.retry` and the final error; the other open transaction, which blocks
    nothing, is not named."""
    shape = {"own-engine": SHAPES["sync-template-psycopg2"], "shared-connection": SHAPES["sync-cookbook-shared-connection"]}[env_py]
    job_env = at_head_with_next(shape, db, env, tmp_path, body=ADD_COLUMN)
    app = db.connect(application_name="the-app")
    app.autocommit = False
    app.cursor().execute("SELECT * FROM users")  # ACCESS SHARE until it ends
    bystander = db.connect(application_name="bystander")
    bystander.autocommit = False
    bystander.cursor().execute("SELECT 1")  # an older transaction that blocks nothing
    app_pid = app.get_backend_pid()
    try:
        result = finish_logged(start_logged({**job_env, "MIGRATE_STATEMENT_LOCK_TIMEOUT": "2", "MIGRATE_LOCK_RETRIES": "1"},
                                            tmp_path / "job.log", cwd=tmp_path / "project"),
                               tmp_path / "job.log", timeout=60)
    finally:
        app.close()
        bystander.close()

    blocked = result.events("migration.blocked")
    assert (6, True) == (result.code, bool(blocked)), result.stdout[-1500:]
    assert [(app_pid, "the-app", "idle in transaction")] == [
        (b["pid"], b["application_name"], b["state"]) for b in blocked[0]["blockers"]]
    assert ("b004", "ALTER TABLE users ADD COLUMN nickname TEXT") == (blocked[0]["revision"], blocked[0]["statement"])
    assert [app_pid] == [b["pid"] for b in result.event("migration.retry")["blockers"]]
    error = result.event("run.failed")["error"]
    assert f"pid {app_pid} (the-app" in error and "bystander" not in error


def test_a_blocker_idle_in_its_transaction_is_ended_when_asked(db: Db, env: dict[str, str], tmp_path: Path) -> None:
    """MIGRATE_END_IDLE_BLOCKERS_AFTER=1: the application session idle in its transaction on users is
    ended (`migration.blocker_ended`), and the revision goes through."""
    job_env = at_head_with_next(SHAPES["sync-template-psycopg2"], db, env, tmp_path, body=ADD_COLUMN)
    app = db.connect(application_name="forgot-to-commit")
    app.autocommit = False
    app.cursor().execute("SELECT * FROM users")
    app_pid = app.get_backend_pid()
    try:
        result = finish_logged(start_logged({**job_env, "MIGRATE_STATEMENT_LOCK_TIMEOUT": "20",
                                             "MIGRATE_END_IDLE_BLOCKERS_AFTER": "1"}, tmp_path / "job.log",
                                            cwd=tmp_path / "project"), tmp_path / "job.log", timeout=60)
    finally:
        app.close()

    assert (0, ["b004"]) == (result.code, db.version()), result.stdout[-1500:]
    (ended,) = result.events("migration.blocker_ended")
    assert (app_pid, "forgot-to-commit") == (ended["pid"], ended["application_name"])


def test_a_long_index_build_reports_its_progress(db: Db, env: dict[str, str], tmp_path: Path) -> None:
    """CREATE INDEX CONCURRENTLY on a table that takes seconds: `migration.progress` every interval,
    running, with the build's phase and a percentage from pg_stat_progress_create_index."""
    body = ('with op.get_context().autocommit_block():\n'
            '        op.execute("CREATE INDEX CONCURRENTLY big_padded ON big (md5(padding))")')
    job_env = at_head_with_next(SHAPES["sync-template-psycopg2"], db, env, tmp_path, body=body)
    db.query("CREATE TABLE big AS SELECT g AS id, md5(g::text) || md5((g * 3)::text) AS padding "
             "FROM generate_series(1, 1500000) g")

    out = tmp_path / "job.log"
    proc = start_logged({**job_env, "MIGRATE_PROGRESS_INTERVAL": "0.5"}, out, cwd=tmp_path / "project")
    wait_for_event(out, "migration.start")
    result = finish_logged(proc, out, timeout=120)

    progress = result.events("migration.progress")
    assert (0, True) == (result.code, len(progress) >= 2), result.stdout[-1500:]
    reported = [p for event in progress for p in event["progress"] if p["what"] == "create index"]
    assert reported and all(event["revision"] == "b004" and event["state"] == "running" for event in progress)
    assert any(p.get("percent") is not None and p["phase"] for p in reported)
