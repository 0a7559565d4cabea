"""`migrate-job rehearse`: the pending revisions run on a throwaway copy of the database, on real
PostgreSQL, through env.py's own engine and through the job's shared connection."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Db, finish_logged, start_logged
from tests.events import wait_for_event
from tests.test_projects import REVISION, SHAPES, make_project, run_job, url_for


ENV_PYS = {"own-engine": SHAPES["sync-template-psycopg2"], "shared-connection": SHAPES["sync-cookbook-shared-connection"]}


def at_b003_with(env_py: str, db: Db, env: dict[str, str], where: Path, upgrade: str, downgrade: str) -> dict[str, str]:
    """The project migrated to b003, a table `wide` with 100 000 rows beside it, and b004 added."""
    shape = ENV_PYS[env_py]
    project = make_project(shape, where)
    job_env = {**env, "DATABASE_URL": url_for(db, shape.scheme), "ALEMBIC_CONFIG": str(project / shape.config)}
    assert 0 == run_job("run", env=job_env, cwd=project).code
    db.query("CREATE TABLE wide AS SELECT g AS id, md5(g::text) AS label FROM generate_series(1, 100000) g")
    write_b004(where, upgrade, downgrade)
    return job_env


def write_b004(where: Path, upgrade: str, downgrade: str) -> None:
    text = REVISION.format(doc="the next revision", body=upgrade)
    assert text.endswith("def downgrade() -> None:\n    pass\n")
    (where / "blog_versions" / "b004_next.py").write_text(text.removesuffix("pass\n") + downgrade + "\n")


def rehearsing(job_env: dict[str, str], out: Path) -> tuple[Any, str]:
    """A rehearsal started, running its revision on its copy; and what it has logged so far."""
    proc = start_logged(job_env, out, "rehearse")
    wait_for_event(out, "migration.start", timeout=60)
    return proc, out.read_text()


def left(db: Db, *logs: str) -> list[str]:
    """The copies the rehearsals that logged `logs` made which are still there."""
    made = [e["database"] for log in logs for e in events_of(log) if e["event"] == "rehearsal.created"]
    assert made, "no copy was made"
    return [name for (name,) in db.query("SELECT datname FROM pg_database WHERE datname = ANY(%s)", (made,))]


def report_of(result: Any) -> dict:
    assert result.stdout, result.stderr[-3000:]
    return json.loads(result.stdout)


def events_of(log: str) -> list[dict]:
    return [json.loads(line) for line in log.splitlines() if line.startswith("{")]


def column_type(db: Db, table: str, column: str) -> str:
    ((found,),) = db.query("SELECT data_type FROM information_schema.columns WHERE table_name = %s AND column_name = %s",
                           (table, column))
    return found


@pytest.mark.parametrize("env_py", list(ENV_PYS))
def test_a_rewrite_under_access_exclusive_past_the_threshold_is_a_finding_and_the_live_database_is_untouched(
        env_py: str, db: Db, env: dict[str, str], tmp_path: Path) -> None:
    job_env = at_b003_with(env_py, db, env, tmp_path, 'op.execute("ALTER TABLE wide ALTER COLUMN id TYPE bigint")',
                           'op.execute("ALTER TABLE wide ALTER COLUMN id TYPE integer")')

    result = run_job("rehearse", "--format", "json", env={**job_env, "MIGRATE_REHEARSAL_MAX_EXCLUSIVE": "0.001"})

    report = report_of(result)
    (b004,) = [r for r in report["revisions"] if r["revision"] == "b004"]
    assert (6, ["b003"], "integer", []) == (result.code, db.version(), column_type(db, "wide", "id"), left(db, result.stderr)), \
        result.stderr[-2000:]
    assert (["public.wide"], "public.wide", "ACCESS EXCLUSIVE") == (
        b004["rewritten"], b004["longest_exclusive"]["relation"], b004["locks"][0]["mode"])
    assert [("b004", "exclusive-lock")] == [(f["revision"], f["finding"]) for f in report["findings"]]
    assert "dump" == report["source"]  # (no backup was taken at b003: the first deploy had nothing to back up)
    assert "revision b004" in json.loads(result.stderr.splitlines()[-1])["error"]


def test_a_rehearsal_within_the_thresholds_passes_and_goes_down_and_up_again(db: Db, env: dict[str, str],
                                                                             tmp_path: Path) -> None:
    """Its copy comes from the backup taken at the database's revision."""
    job_env = at_b003_with("own-engine", db, env, tmp_path,
                           'op.execute("ALTER TABLE wide ADD COLUMN note text")\n'
                           '    op.execute("UPDATE wide SET note = label WHERE id <= 10")',
                           'op.execute("ALTER TABLE wide DROP COLUMN note")')
    assert 0 == run_job("backup", env=job_env).code

    result = run_job("rehearse", "--format", "json", env=job_env)

    report = report_of(result)
    (b004,) = report["revisions"]
    assert (0, ["b003"], [], []) == (result.code, db.version(), left(db, result.stderr), report["findings"]), result.stderr[-2000:]
    assert report["source"].endswith(".dump"), report["source"]
    assert (10, [], True, ["b004"]) == (b004["rows_changed"], b004["rewritten"], report["round_trip"]["done"],
                                        report["round_trip"]["revisions"])
    assert "note" not in {c for (c,) in db.query("SELECT column_name FROM information_schema.columns "
                                                 "WHERE table_name = 'wide'")}


@pytest.mark.parametrize("env_py", list(ENV_PYS))
def test_a_downgrade_that_does_not_undo_its_upgrade_is_a_finding(env_py: str, db: Db, env: dict[str, str],
                                                                 tmp_path: Path) -> None:
    job_env = at_b003_with(env_py, db, env, tmp_path,
                           'op.execute("ALTER TABLE wide ADD COLUMN note text")\n'
                           '    op.execute("CREATE INDEX wide_label ON wide (label)")',
                           'op.execute("DROP INDEX wide_label")')

    result = run_job("rehearse", "--format", "json", env=job_env)

    report = report_of(result)
    assert (6, ["b003"], []) == (result.code, db.version(), left(db, result.stderr)), result.stderr[-2000:]
    # (what the downgrade left in place then fails the upgrade run again: a second finding)
    ((revision, finding, detail), again) = [tuple(f.values()) for f in report["findings"]]
    assert ("b004", "downgrade-incomplete", True) == (revision, finding, "public.wide.note" in detail), detail
    assert ("b004", "upgrade-fails-after-downgrade") == (again[0], again[1]), again
    assert ["public.wide_label"] == report["revisions"][0]["indexes_built"]


def test_a_rehearsal_stopped_by_a_signal_drops_its_copy(db: Db, env: dict[str, str], tmp_path: Path) -> None:
    job_env = at_b003_with("own-engine", db, env, tmp_path, 'op.execute("SELECT pg_sleep(60)")', "pass")
    out = tmp_path / "rehearse.log"
    proc, made = rehearsing(job_env, out)
    assert 1 == len(left(db, made))

    proc.send_signal(signal.SIGTERM)
    result = finish_logged(proc, out)

    assert (143, [], ["b003"]) == (result.code, left(db, made), db.version()), result.stdout[-2000:]
    assert result.events("rehearsal.dropped")


def test_a_copy_a_killed_rehearsal_left_is_dropped_by_the_next(db: Db, env: dict[str, str], tmp_path: Path) -> None:
    job_env = at_b003_with("own-engine", db, env, tmp_path, 'op.execute("SELECT pg_sleep(60)")', "pass")
    proc, made = rehearsing(job_env, tmp_path / "rehearse.log")
    (killed,) = left(db, made)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    write_b004(tmp_path, "pass", "pass")

    result = run_job("rehearse", env=job_env)

    assert (0, [], [killed]) == (result.code, left(db, made, result.stdout),
                               [e["database"] for e in result.events("rehearsal.leftover_dropped")]), result.stdout[-2000:]
