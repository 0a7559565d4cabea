"""The job's own tables live in a schema of their own: the project's `alembic check` and autogenerate
never see them, tables an older version kept beside the version table move there with every row,
and a name that is not the job's table is refused before anything is read or written."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT, Db, run_job
from tests.test_projects import ALEMBIC

OWN = {"migrate_job_history", "migrate_job_history_heads", "migrate_job_history_lineage", "migrate_job_history_revisions",
       "migrate_job_history_schema"}


def bare_alembic(*args: str, db: Db) -> subprocess.CompletedProcess:
    """The project's own Alembic command line on the example project (its env.py reads DATABASE_URL)."""
    return subprocess.run([ALEMBIC, "-c", str(ROOT / "alembic.ini"), *args], cwd=ROOT, capture_output=True, text=True,
                          env={"PATH": str(Path(ALEMBIC).parent), "DATABASE_URL": db.url, "PYTHONPATH": str(ROOT)})


def test_the_projects_alembic_check_is_clean_after_a_run(db: Db, env: dict[str, str]) -> None:
    """`alembic check` (autogenerate against the models) proposes nothing after the job ran, with
    no filter in env.py, and the job's tables are in its own schema."""
    assert 0 == run_job("run", env=env).code
    assert OWN == db.tables("migrate_job") and not {t for t in db.tables() if t.startswith("migrate_job")}

    checked = bare_alembic("check", db=db)

    assert (0, "No new upgrade operations detected.") == (checked.returncode, checked.stdout.strip().splitlines()[-1]), \
        checked.stdout + checked.stderr


def test_tables_an_older_version_kept_beside_the_version_table_move_with_their_rows(db: Db, env: dict[str, str]) -> None:
    """History, lineage and what runs learned, made where versions before kept them (public, on the
    search path), are moved into the job's schema by the next run, every row kept; starts at head
    are then answered from the moved record."""
    older = {**env, "MIGRATE_HISTORY_TABLE": "public.migrate_job_history"}
    assert 0 == run_job("run", env={**older, "MIGRATE_TARGET": "0005"}).code
    before = {t: db.query(f"SELECT count(*) FROM public.{t}")[0][0] for t in OWN}
    assert OWN <= db.tables() and all(before.values())

    upgraded = run_job("run", env=env)

    assert (0, ["0006"]) == (upgraded.code, db.version()), upgraded.stdout[-1500:]
    assert (OWN, set()) == (db.tables("migrate_job"), OWN & db.tables())
    after = {t: db.query(f"SELECT count(*) FROM migrate_job.{t}")[0][0] for t in OWN}
    assert all(after[t] >= before[t] for t in OWN) and after["migrate_job_history"] > before["migrate_job_history"]
    assert [("migrated",), ("migrated",)] == db.query(
        "SELECT outcome FROM migrate_job.migrate_job_history WHERE kind = 'run' ORDER BY id")
    at_head = run_job("run", env=env)
    assert (0, "shared") == (at_head.code, at_head.event("lock.acquired")["mode"])


@pytest.mark.parametrize("setting", ["public.users", "public.alembic_version"])
@pytest.mark.parametrize("command", ["run", "status"])
def test_a_history_table_that_is_not_the_jobs_is_refused(setting: str, command: str, db: Db,
                                                         env: dict[str, str]) -> None:
    """An application table or the version table named as the job's: exit 2 naming it, nothing written."""
    assert 0 == run_job("run", env={**env, "MIGRATE_TARGET": "0005"}).code
    columns = db.query(f"SELECT count(*) FROM information_schema.columns WHERE table_schema || '.' || table_name = "
                       f"'{setting}'")

    result = run_job(command, env={**env, "MIGRATE_HISTORY_TABLE": setting})

    logged = result.stdout if command == "run" else result.stderr  # (status prints on stdout, logs on stderr)
    (error,) = [json.loads(line)["error"] for line in logged.splitlines() if '"run.failed"' in line]
    assert (2, True) == (result.code, f"{setting} is not one of migrate-job's tables" in error), result.stdout[-1500:]
    assert (["0005"], columns) == (db.version(), db.query(
        f"SELECT count(*) FROM information_schema.columns WHERE table_schema || '.' || table_name = '{setting}'"))
