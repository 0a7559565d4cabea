"""What only reads (check, status, plan) never writes: it answers on a hot standby, and with a role
that may only read; what changes the database still needs the primary."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.conftest import Db, run_job
from tests.pgcluster import Cluster

pytestmark = pytest.mark.faults


@pytest.fixture
def standby() -> Iterator[tuple[Cluster, Cluster]]:
    """A primary with the example migrated to 0005, and a hot standby streaming from it."""
    primary = Cluster(Path(tempfile.mkdtemp(prefix="migrate-job-primary-")))
    primary.start()
    primary.psql("CREATE DATABASE blog")
    replica = Cluster(Path(tempfile.mkdtemp(prefix="migrate-job-standby-")))
    try:
        replica.replicate(primary)
        replica.start()
        yield primary, replica
    finally:
        replica.destroy()
        primary.destroy()


def _replayed(replica: Cluster, expected: str) -> None:
    deadline = time.monotonic() + 30
    while replica.psql("SELECT string_agg(version_num, ',') FROM alembic_version", "blog") != expected:
        assert time.monotonic() < deadline, "the standby never caught up"
        time.sleep(0.1)


@pytest.mark.parametrize(("argv", "code"), [(["check"], 8), (["check", "--wait", "--wait-timeout", "2"], 8),
                                             (["status", "--format", "json"], 0), (["plan", "--format", "json"], 0)])
def test_read_only_commands_answer_on_a_hot_standby(argv: list[str], code: int, standby: tuple[Cluster, Cluster],
                                                    env: dict[str, str]) -> None:
    """check (8: 0006 pending; with --wait, polling where LISTEN is not allowed), status and plan
    against the standby say what the primary holds."""
    primary, replica = standby
    assert 0 == run_job("run", env={**env, "DATABASE_URL": primary.url("blog"), "MIGRATE_TARGET": "0005"}).code
    _replayed(replica, "0005")

    result = run_job(*argv, env={**env, "DATABASE_URL": replica.url("blog")})

    assert code == result.code, result.stdout[-1000:] + result.stderr[-1000:]
    if argv[0] != "check":
        assert ["0005"] == json.loads(result.stdout)["current"]


def test_a_run_against_a_hot_standby_waits_for_a_primary(standby: tuple[Cluster, Cluster], env: dict[str, str]) -> None:
    """A run needs the primary: on the standby it waits (wait.retry) and gives up with exit 3."""
    _, replica = standby

    result = run_job("run", env={**env, "DATABASE_URL": replica.url("blog"), "MIGRATE_WAIT_TIMEOUT": "2"})

    assert (3, True) == (result.code, "recovery" in result.event("run.failed")["error"])


def test_read_only_commands_work_with_a_role_that_may_only_read(db: Db, env: dict[str, str]) -> None:
    """A role whose transactions are read-only: check, status and plan answer, and write nothing."""
    assert 0 == run_job("run", env={**env, "MIGRATE_TARGET": "0005"}).code
    role = f"reader_{db.name}"
    db.query(f"CREATE ROLE {role} LOGIN; ALTER ROLE {role} SET default_transaction_read_only = on; "
             f"GRANT USAGE ON SCHEMA migrate_job TO {role}; GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}; "
             f"GRANT SELECT ON ALL TABLES IN SCHEMA migrate_job TO {role}")
    before = db.query("SELECT count(*) FROM migrate_job.migrate_job_history")
    reader = {**env, "DATABASE_URL": db.url.replace("//postgres@", f"//{role}@")}
    try:
        results = [run_job(*argv, env=reader) for argv in (["check"], ["status"], ["plan"])]

        assert [8, 0, 0] == [r.code for r in results], [r.stderr[-500:] for r in results]
        assert before == db.query("SELECT count(*) FROM migrate_job.migrate_job_history")
    finally:
        db.query(f"DROP OWNED BY {role}; DROP ROLE {role}")
