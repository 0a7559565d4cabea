"""Operator commands against real PostgreSQL: status, backup, restore, downgrade, history, lint."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import (
    MIGRATE_JOB, ROOT, Db, create_database, drop_database, hold_lock, pg_restore, run_job, scenario
)
from tests.events import wait_for_event


def _runs(db: Db) -> list[tuple]:
    return db.query("SELECT command, outcome, error FROM migrate_job.migrate_job_history WHERE kind = 'run' ORDER BY id")


def _revisions(db: Db) -> list[tuple]:
    return db.query("SELECT revision, direction, outcome FROM migrate_job.migrate_job_history WHERE kind = 'revision' ORDER BY id")


def _backup(env: dict[str, str]) -> str:
    result = run_job("backup", env=env)
    assert 0 == result.code, result.stdout
    return result.event("backup.done")["path"]


# --- status ----------------------------------------------------------------------------------

def test_status_names_the_lock_holder(db: Db, env: dict[str, str]) -> None:
    """While another session holds the migration lock, status names its pid and application_name."""
    holder, pid = hold_lock(db, application_name="pod-7f9c")

    result = run_job("status", "--format", "json", env=env)
    holder.close()

    report = json.loads(result.stdout)
    assert 0 == result.code
    assert (True, pid, "pod-7f9c") == (report["lock"]["held"], report["lock"]["holder"]["pid"],
                                       report["lock"]["holder"]["application_name"])
    assert (6, ["0006"]) == (report["pending_count"], report["heads"])


def test_status_shows_backups_and_history(db: Db, env: dict[str, str]) -> None:
    """After a run, status lists its backup and its history row, and prints a readable text form."""
    db.holds_data()
    path = run_job("run", env=env).event("backup.done")["path"]

    report = json.loads(run_job("status", "--format", "json", env=env).stdout)
    text = run_job("status", env=env).stdout

    assert [path] == [b["path"] for b in report["backups"]]
    assert ([], ["0006"]) == (report["backups"][0]["from"], report["backups"][0]["to"])
    assert ("run", "migrated") == (report["history"][0]["command"], report["history"][0]["outcome"])
    assert (0, False) == (report["pending_count"], report["lock"]["held"])
    assert "lock:     free" in text and Path(path).name in text and "migrated" in text


def test_status_at_an_unknown_revision_reports_and_exits_7(db: Db, env: dict[str, str]) -> None:
    """status still reports everything it can when the database's revision is unknown."""
    run_job("run", env=env)
    db.query("UPDATE alembic_version SET version_num = 'feedface'")

    result = run_job("status", "--format", "json", env=env)

    assert 7 == result.code
    report = json.loads(result.stdout)
    assert ["feedface"] == report["current"] and "feedface" in report["problem"]


# --- backup and restore ----------------------------------------------------------------------

def test_backup_list_shows_the_sidecars(env: dict[str, str]) -> None:
    """backup --list --format json lists each backup with its sidecar."""
    path = _backup(env)

    listed = json.loads(run_job("backup", "--list", "--format", "json", env=env).stdout)

    assert [path] == [b["path"] for b in listed]
    assert {"database", "from_revision", "to_revision", "bytes", "sha256", "created_at"} <= set(listed[0])


def test_backup_list_of_a_missing_directory_is_a_configuration_error(env: dict[str, str], tmp_path: Path) -> None:
    """backup --list where MIGRATE_BACKUP_DIR does not exist: exit 2, naming it (its log on stderr)."""
    missing = tmp_path / "not-mounted"

    result = run_job("backup", "--list", env={**env, "MIGRATE_BACKUP_DIR": str(missing)})
    failed = [line for line in map(json.loads, result.stderr.splitlines()) if line["event"] == "run.failed"]

    assert (2, "", [True]) == (result.code, result.stdout, [str(missing) in f["error"] for f in failed])


def test_backup_and_restore_round_trip(db: Db, env: dict[str, str]) -> None:
    """A restore brings back rows written before the backup and removes rows written after it."""
    run_job("run", env=env)
    db.query("INSERT INTO users (email, full_name) VALUES ('before@example.org', 'Before')")
    path = _backup(env)
    db.query("INSERT INTO users (email, full_name) VALUES ('after@example.org', 'After')")
    db.query("DELETE FROM users WHERE email = 'before@example.org'")

    result = run_job("restore", path, "--yes", env=env)

    assert 0 == result.code, result.stdout
    assert [("before@example.org",)] == db.query("SELECT email FROM users")
    assert (["0006"], ["0006"]) == (result.event("restore.done")["before"], result.event("restore.done")["after"])
    assert ("restore", "succeeded") == _runs(db)[-1][:2]  # the history itself survived the restore
    assert 0 == db.advisory_locks()


def test_restore_by_name_from_the_backup_dir(db: Db, env: dict[str, str]) -> None:
    """restore accepts a backup's file name in MIGRATE_BACKUP_DIR."""
    run_job("run", env=env)
    path = _backup(env)

    assert 0 == run_job("restore", Path(path).name, "--yes", env=env).code


def test_tampered_backup_is_refused(db: Db, env: dict[str, str]) -> None:
    """A backup whose bytes no longer match its sidecar's sha256 is not restored."""
    run_job("run", env=env)
    path = Path(_backup(env))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    db.query("INSERT INTO users (email, full_name) VALUES ('kept@example.org', 'Kept')")

    result = run_job("restore", str(path), "--yes", env=env)

    assert 5 == result.code
    assert "sha256" in result.event("run.failed")["error"]
    assert [("kept@example.org",)] == db.query("SELECT email FROM users")


def test_restore_blocked_by_an_app_transaction_gives_up_unchanged(db: Db, env: dict[str, str]) -> None:
    """A restore that cannot lock the tables within MIGRATE_LOCK_TIMEOUT exits 5 and changes nothing."""
    run_job("run", env=env)
    path = _backup(env)
    db.query("INSERT INTO users (email, full_name) VALUES ('kept@example.org', 'Kept')")
    app = db.connect()
    app.autocommit = False
    with app.cursor() as cur:
        cur.execute("SELECT count(*) FROM users")  # an open transaction reading users

    started = time.monotonic()
    result = run_job("restore", path, "--yes", env={**env, "MIGRATE_LOCK_TIMEOUT": "1"})
    app.rollback()
    app.close()

    assert 5 == result.code
    assert "unchanged" in result.event("run.failed")["error"]
    assert time.monotonic() - started < 15
    assert [("kept@example.org",)] == db.query("SELECT email FROM users")


def test_restore_without_yes_is_refused(db: Db, env: dict[str, str]) -> None:
    """restore without --yes changes nothing and exits 2."""
    run_job("run", env=env)
    path = _backup(env)
    db.query("INSERT INTO users (email, full_name) VALUES ('kept@example.org', 'Kept')")

    result = run_job("restore", path, env=env)

    assert 2 == result.code
    assert "--yes" in result.event("run.failed")["error"]
    assert [("kept@example.org",)] == db.query("SELECT email FROM users")


def test_restore_of_another_databases_backup_needs_force(db: Db, env: dict[str, str]) -> None:
    """A backup of another database is refused unless --force."""
    other = create_database(db.admin_url)
    try:
        other_env = {**env, "DATABASE_URL": other.url}
        run_job("run", env=other_env)
        path = _backup(other_env)
        run_job("run", env=env)

        refused = run_job("restore", path, "--yes", env=env)
        forced = run_job("restore", path, "--yes", "--force", env=env)
    finally:
        drop_database(other)

    assert 2 == refused.code and other.name in refused.event("run.failed")["error"]
    assert 0 == forced.code


# --- downgrade -------------------------------------------------------------------------------

def test_downgrade_to_base_and_back_up_with_data(db: Db, env: dict[str, str]) -> None:
    """Downgrade from head to base (after a backup of the data) and upgrade again, one revision per step."""
    run_job("run", env=env)
    db.query("INSERT INTO users (email, full_name) VALUES ('ada@example.org', 'Ada King Lovelace')")
    db.query("INSERT INTO posts (user_id, title, body) SELECT id, 'Notes', 'On the engine' FROM users")

    down = run_job("downgrade", "base", "--yes", env=env)

    assert 0 == down.code, down.stdout
    assert ["0006", "0005", "0004", "0003", "0002", "0001"] == [
        e["revision"] for e in down.events("migration.done") if e["direction"] == "downgrade"]
    assert [] == db.version()
    assert ({"alembic_version"}, {"migrate_job_history", "migrate_job_history_heads", "migrate_job_history_lineage",
                                  "migrate_job_history_revisions", "migrate_job_history_schema"}) == (
        db.tables(), db.tables("migrate_job"))
    dump = down.event("backup.done")["path"]
    restored = create_database(db.admin_url, prefix="restored")
    try:
        pg_restore("-d", restored.url, backup=dump, check=True)
        assert [("Ada King Lovelace",)] == restored.query("SELECT full_name FROM users")
    finally:
        drop_database(restored)

    up = run_job("run", env=env)
    assert 0 == up.code
    assert ["0006"] == db.version()


def test_downgrade_one_revision_keeps_the_data(db: Db, env: dict[str, str]) -> None:
    """Downgrading 0006 splits full_name back into first and last name; upgrading joins them again."""
    run_job("run", env=env)
    db.query("INSERT INTO users (email, full_name) VALUES ('g@example.org', 'Grace Hopper')")

    assert 0 == run_job("downgrade", "-1", "--yes", env=env).code
    assert [("Grace", "Hopper")] == db.query("SELECT first_name, last_name FROM users")
    assert 0 == run_job("run", env=env).code
    assert [("Grace Hopper",)] == db.query("SELECT full_name FROM users")
    assert [("0006", "downgrade", "applied")] == [r for r in _revisions(db) if r[1] == "downgrade"]


def test_downgrade_without_yes_is_refused(db: Db, env: dict[str, str]) -> None:
    """downgrade without --yes exits 2 and changes nothing."""
    run_job("run", env=env)

    result = run_job("downgrade", "base", env=env)

    assert 2 == result.code
    assert ["0006"] == db.version()


# --- history ---------------------------------------------------------------------------------

def test_history_records_a_successful_run_and_each_revision(db: Db, env: dict[str, str]) -> None:
    """A run that migrates leaves one run row and one row per revision, and an at-head run leaves none."""
    db.holds_data()
    result = run_job("run", env=env)
    run_job("run", env=env)

    rows = db.query("SELECT run_id, backup_path, host, seconds FROM migrate_job.migrate_job_history WHERE kind = 'run'")
    assert [("run", "migrated", None)] == _runs(db)
    assert [(f"000{i}", "upgrade", "applied") for i in range(1, 7)] == _revisions(db)
    assert result.lines[0]["run_id"] == rows[0][0]
    assert rows[0][1] == result.event("backup.done")["path"]
    assert rows[0][2] and rows[0][3] > 0


def test_history_records_a_failed_revision(db: Db, env: dict[str, str]) -> None:
    """A failing revision leaves a failed run row and a failed revision row with the error."""
    run_job("run", env={**env, "ALEMBIC_CONFIG": scenario("failing")})

    (command, outcome, error), = _runs(db)
    assert ("run", "failed") == (command, outcome)
    assert "division by zero" in error
    assert [("f001", "upgrade", "applied"), ("f002", "upgrade", "failed")] == _revisions(db)


def test_history_records_a_sigterm(db: Db, env: dict[str, str], tmp_path: Path) -> None:
    """A SIGTERM mid-revision leaves an interrupted run row and an interrupted revision row."""
    out = tmp_path / "out"
    proc = subprocess.Popen([MIGRATE_JOB, "run"], cwd=ROOT, stdout=out.open("w"), stderr=subprocess.PIPE,
                            env={**env, "ALEMBIC_CONFIG": scenario("slow"), "SCENARIO_SLEEP": "30"})
    wait_for_event(out, "migration.done")
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    assert 143 == proc.wait(timeout=20)

    assert [("run", "interrupted", "signal 15")] == _runs(db)
    assert [("s001", "upgrade", "applied"), ("s002", "upgrade", "interrupted")] == _revisions(db)


def test_history_off_creates_no_table(db: Db, env: dict[str, str]) -> None:
    """MIGRATE_HISTORY_TABLE=off writes no history."""
    assert 0 == run_job("run", env={**env, "MIGRATE_HISTORY_TABLE": "off"}).code

    assert (set(), set()) == (db.tables("migrate_job"), {t for t in db.tables() if t.startswith("migrate_job")})


@pytest.mark.parametrize(("setting", "table"), [("schema_runs", "migrate_job.schema_runs"),
                                              ("public.schema_runs", "public.schema_runs")])
def test_history_table_name_is_configurable(setting: str, table: str, db: Db, env: dict[str, str]) -> None:
    """MIGRATE_HISTORY_TABLE names the table: in the job's own schema, or in the schema it names."""
    assert 0 == run_job("run", env={**env, "MIGRATE_HISTORY_TABLE": setting}).code

    assert [("migrated",)] == db.query(f"SELECT outcome FROM {table} WHERE kind = 'run'")


# --- lint ------------------------------------------------------------------------------------

def test_lint_flags_an_unsafe_pending_revision(db: Db, env: dict[str, str]) -> None:
    """The pending l003 (index without CONCURRENTLY, NOT NULL column without default) fails lint."""
    lint_env = {**env, "ALEMBIC_CONFIG": scenario("lint")}
    assert 0 == run_job("run", env={**lint_env, "MIGRATE_TARGET": "l002"}).code

    result = run_job("lint", env=lint_env)

    assert 10 == result.code
    found = {(f["revision"], f["rule"]) for f in result.events("lint.finding")}
    assert {("l003", "require-concurrent-index-creation"), ("l003", "adding-required-field")} <= found
    assert {"l003"} == {revision for revision, _ in found}


def test_lint_passes_safe_revisions(db: Db, env: dict[str, str]) -> None:
    """Pending l001 and l002 (a new table, a nullable column) pass lint."""
    result = run_job("lint", env={**env, "ALEMBIC_CONFIG": scenario("lint"), "MIGRATE_TARGET": "l002"})

    assert 0 == result.code, result.stdout
    assert (2, 0) == (result.event("lint.done")["revisions"], result.event("lint.done")["findings"])


def test_lint_allow_list_accepts_findings_on_purpose(env: dict[str, str]) -> None:
    """Allowing l003's two findings by revision:rule makes lint pass."""
    result = run_job("lint", "--all", "--allow",
                     "l003:require-concurrent-index-creation,l003:adding-required-field",
                     env={**env, "ALEMBIC_CONFIG": scenario("lint")})

    assert 0 == result.code, result.stdout


def test_lint_of_the_example_history_is_clean(env: dict[str, str]) -> None:
    """The example's whole history passes, with its findings accepted in alembic.ini, and needs no database."""
    no_db = {k: v for k, v in env.items() if k != "DATABASE_URL"}

    result = run_job("lint", "--all", env=no_db)

    assert 0 == result.code, result.stdout
    assert 6 == result.event("lint.done")["revisions"]


def test_a_history_table_that_refuses_revision_rows_never_fails_a_migration(db: Db, env: dict[str, str]) -> None:
    """Revision rows are written inside each revision's transaction; one that errors leaves the revision be."""
    assert 0 == run_job("run", env={**env, "MIGRATE_TARGET": "0001"}).code
    db.query("CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'no'; END $$")
    db.query("CREATE TRIGGER refuse BEFORE INSERT ON migrate_job.migrate_job_history FOR EACH ROW WHEN (NEW.kind = 'revision') "
             "EXECUTE FUNCTION refuse()")

    result = run_job("run", env=env)

    assert (0, ["0006"]) == (result.code, db.version())
    assert [] == db.query("SELECT 1 FROM migrate_job.migrate_job_history WHERE kind = 'revision' AND revision <> '0001'")
