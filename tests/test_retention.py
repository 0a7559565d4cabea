"""Backups are never pruned away while they are a way back: failing deploys, clocks ahead, volumes
shared by several databases, and whatever else lies in the backup directory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import ADMIN_URL, Db, create_database, drop_database, run_job, scenario

pytestmark = pytest.mark.faults


def dumps(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("*.dump"))


def test_the_backup_before_a_failing_migration_survives_any_number_of_retries(db: Db, env: dict[str, str],
                                                                            backup_dir: Path) -> None:
    """Six failing attempts with MIGRATE_BACKUP_KEEP=1: the first attempt's backup (the only one holding
    the state before f001) is still there, beside one backup of the retries' state."""
    db.holds_data()
    failing = {**env, "ALEMBIC_CONFIG": scenario("failing"), "MIGRATE_BACKUP_KEEP": "1"}
    results = [run_job("run", env=failing) for _ in range(6)]

    assert [6] * 6 == [r.code for r in results]
    first = Path(results[0].event("backup.done")["path"]).name
    last = Path(results[-1].event("backup.done")["path"]).name
    assert ("base_to_f003" in first, "f001_to_f003" in last) == (True, True)
    assert sorted([first, last]) == dumps(backup_dir)


def test_a_successful_migration_lets_the_way_back_go_in_turn(db: Db, env: dict[str, str], backup_dir: Path) -> None:
    """Once a migration succeeds, keep applies again: MIGRATE_BACKUP_KEEP=1 leaves the newest backup only."""
    db.holds_data()
    keep1 = {**env, "MIGRATE_BACKUP_KEEP": "1"}
    assert 0 == run_job("run", env={**keep1, "MIGRATE_TARGET": "0003"}).code

    newest = run_job("run", env=keep1).event("backup.done")["path"]

    assert [Path(newest).name] == dumps(backup_dir)


def test_a_clock_ahead_does_not_prune_the_backup_just_taken(db: Db, env: dict[str, str], backup_dir: Path) -> None:
    """Backups another pod wrote with its clock years ahead sort later by name; the new one is still kept."""
    db.holds_data()
    first = Path(run_job("run", env={**env, "MIGRATE_TARGET": "0003"}).event("backup.done")["path"])
    meta = json.loads(first.with_name(first.name + ".json").read_text())
    for n in range(2, 7):  # sequences 2..6, named and dated in 2099
        name = f"2099010{n}T000000.000000Z_" + first.name.split("_", 1)[1]
        shutil.copy(first, backup_dir / name)
        (backup_dir / f"{name}.json").write_text(json.dumps({**meta, "sequence": n, "succeeded": True,
                                                             "created_at": f"2099-01-0{n}T00:00:00+00:00"}))

    newest = Path(run_job("run", env={**env, "MIGRATE_BACKUP_KEEP": "5"}).event("backup.done")["path"])

    assert newest.exists()
    assert 7 == json.loads(newest.with_name(newest.name + ".json").read_text())["sequence"]


def test_prune_never_deletes_a_path_a_sidecar_names(db: Db, env: dict[str, str], backup_dir: Path,
                                                   tmp_path: Path) -> None:
    """A sidecar whose `path` points outside the backup directory does not lead prune there."""
    db.holds_data()
    victim = tmp_path / "elsewhere.dump"
    victim.write_text("not ours")
    keep1 = {**env, "MIGRATE_BACKUP": "always", "MIGRATE_BACKUP_KEEP": "1"}
    first = Path(run_job("run", env=keep1).event("backup.done")["path"])
    sidecar = first.with_name(first.name + ".json")
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "path": str(victim)}))

    for _ in range(2):
        assert 0 == run_job("run", env=keep1).code

    assert (True, False) == (victim.exists(), first.exists())


def test_a_volume_shared_by_two_databases_loses_neither_ones_files(db: Db, env: dict[str, str],
                                                                    backup_dir: Path) -> None:
    """Another database's backups, and its backup being written, are left alone by this one's runs."""
    other = create_database(ADMIN_URL)
    try:
        db.holds_data(), other.holds_data()
        keep1 = {**env, "MIGRATE_BACKUP": "always", "MIGRATE_BACKUP_KEEP": "1"}
        theirs = Path(run_job("run", env={**keep1, "DATABASE_URL": other.url}).event("backup.done")["path"])
        in_progress = backup_dir / f".{theirs.name.replace(theirs.name[:4], '2030', 1)}.partial"
        in_progress.write_text("pg_dump is writing this")

        for _ in range(3):
            assert 0 == run_job("run", env=keep1).code

        assert (True, True) == (theirs.exists(), in_progress.exists())
        assert 2 == len(dumps(backup_dir))
    finally:
        drop_database(other)


def test_whatever_else_is_in_the_backup_directory_is_passed_over(db: Db, env: dict[str, str],
                                                                backup_dir: Path) -> None:
    """A directory named like a partial file, non-object and incomplete sidecars, other files: warnings, never a failure."""
    db.holds_data()
    (backup_dir / ".20260101T000000.000000Z_x.dump.partial").mkdir()
    (backup_dir / "20260101T000000.000000Z_x_a.dump.json").write_text("[1, 2]")
    (backup_dir / "20260101T000000.000000Z_x_b.dump.json").write_text('{"database": "x"}')
    (backup_dir / "20260101T000000.000000Z_x_c.dump.json").write_text("{not json")
    (backup_dir / "notes.txt").write_text("hello")

    run = run_job("run", env=env)
    status = run_job("status", "--format", "json", env=env)
    listed = run_job("backup", "--list", "--format", "json", env=env)

    assert (0, 0, 0) == (run.code, status.code, listed.code), run.stdout[-600:]
    assert 3 == len(run.events("backup.ignored"))
    assert [run.event("backup.done")["path"]] == [b["path"] for b in json.loads(listed.stdout)]


def test_restore_takes_a_relative_name_from_the_backup_directory_only(db: Db, env: dict[str, str],
                                                                      backup_dir: Path, tmp_path: Path) -> None:
    """A backup of the same name in the working directory is never the one restored."""
    db.holds_data()
    made = Path(run_job("run", env=env).event("backup.done")["path"])
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    shutil.copy(made, elsewhere / "decoy.dump")
    shutil.copy(made.with_name(made.name + ".json"), elsewhere / "decoy.dump.json")

    result = run_job("restore", "decoy.dump", "--yes", env=env, cwd=elsewhere)

    assert (5, True) == (result.code, str(backup_dir / "decoy.dump") in result.event("run.failed")["error"])


def schema_and_rows(db: Db) -> tuple[str, list[tuple]]:
    """The schema as pg_dump prints it (less the job's own tables) and every user table's row count."""
    from tests.test_projects import schema

    counts = db.query(
        "SELECT c.relname, (xpath('/row/n/text()', query_to_xml(format('SELECT count(*) AS n FROM %I.%I', "
        "n.nspname, c.relname), false, true, '')))[1]::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'migrate_job') ORDER BY 1")
    return schema(db), counts


def test_restore_brings_back_exactly_the_state_at_backup_time(db: Db, env: dict[str, str]) -> None:
    """After later migrations and an operator added tables, foreign keys, a type, a sequence, an index
    and an extension, restoring an earlier backup leaves the schema and rows of backup time, nothing else."""
    assert 0 == run_job("run", env={**env, "MIGRATE_TARGET": "0003"}).code
    db.query("INSERT INTO users (email, first_name, last_name) VALUES ('a@example.org', 'A', 'B')")
    backup = run_job("backup", env=env).event("backup.done")["path"]
    at_backup = schema_and_rows(db)
    assert 0 == run_job("run", env=env).code  # 0004: a table with a foreign key onto users, and more
    db.query("CREATE EXTENSION citext; CREATE TYPE mood AS ENUM ('ok'); CREATE SEQUENCE tickets; "
             "CREATE TABLE notes (id int PRIMARY KEY, body citext, mood mood); CREATE INDEX users_lower ON users (lower(email)); "
             "CREATE SCHEMA reports; CREATE TABLE reports.daily (day date)")
    assert at_backup != schema_and_rows(db)

    result = run_job("restore", Path(backup).name, "--yes", env=env)

    assert 0 == result.code, result.stdout[-800:]
    assert at_backup == schema_and_rows(db)
    assert (["0006"], ["0003"]) == (result.event("restore.done")["before"], result.event("restore.done")["after"])
    assert 0 == run_job("run", env=env).code  # and the next run migrates again from there


def test_a_failed_restore_changes_nothing_and_says_why(db: Db, env: dict[str, str]) -> None:
    """A restore that fails half-way (the archive gives a table to a role dropped since) leaves the
    database as it was, exit 5, with the first error rather than the last line."""
    role = f"gone_{db.name}"
    db.query(f'CREATE ROLE "{role}"')
    assert 0 == run_job("run", env={**env, "MIGRATE_TARGET": "0003"}).code
    db.query(f'ALTER TABLE users OWNER TO "{role}"')
    backup = run_job("backup", env=env).event("backup.done")["path"]
    db.query(f'ALTER TABLE users OWNER TO CURRENT_USER; DROP ROLE "{role}"')
    assert 0 == run_job("run", env=env).code
    before = schema_and_rows(db)

    result = run_job("restore", Path(backup).name, "--yes", env=env)

    error = result.event("run.failed")["error"]
    assert (5, True) == (result.code, f'role "{role}" does not exist' in error), error
    assert before == schema_and_rows(db)


def test_restore_compares_the_archives_own_database_name(db: Db, env: dict[str, str], backup_dir: Path) -> None:
    """A dump of another database whose sidecar was edited to name this one is still refused without --force."""
    other = create_database(ADMIN_URL)
    try:
        other.holds_data()
        theirs = Path(run_job("backup", env={**env, "DATABASE_URL": other.url}).event("backup.done")["path"])
        sidecar = theirs.with_name(theirs.name + ".json")
        sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "database": db.name}))

        result = run_job("restore", theirs.name, "--yes", env=env)
    finally:
        drop_database(other)

    assert (2, True) == (result.code, repr(other.name) in result.event("run.failed")["error"])


def large_objects(db: Db) -> list[tuple]:
    return db.query("SELECT oid::text, encode(lo_get(oid), 'escape') FROM pg_largeobject_metadata ORDER BY 1")


def test_restore_brings_back_every_kind_of_object_the_database_held(db: Db, env: dict[str, str]) -> None:
    """Large objects (those made later gone, those of backup time back), an unlogged table's rows, a
    column of an extension's type: as they were at backup time."""
    assert 0 == run_job("run", env={**env, "MIGRATE_TARGET": "0003"}).code
    db.query("CREATE EXTENSION hstore; CREATE UNLOGGED TABLE cache (k text PRIMARY KEY, v hstore); "
             "INSERT INTO cache VALUES ('a', 'x=>1'), ('b', 'y=>2'); SELECT lo_from_bytea(0, 'kept blob')")
    at_backup = (schema_and_rows(db), large_objects(db), db.query("SELECT k, v::text FROM cache ORDER BY k"))
    backup = run_job("backup", env=env).event("backup.done")["path"]
    db.query("DELETE FROM cache WHERE k = 'a'; SELECT lo_unlink(oid) FROM pg_largeobject_metadata; "
             "SELECT lo_from_bytea(0, 'a later blob')")
    assert at_backup != (schema_and_rows(db), large_objects(db), db.query("SELECT k, v::text FROM cache ORDER BY k"))

    result = run_job("restore", Path(backup).name, "--yes", env=env)

    assert 0 == result.code, result.stdout[-1500:]
    assert at_backup == (schema_and_rows(db), large_objects(db), db.query("SELECT k, v::text FROM cache ORDER BY k"))


# --- a volume sized for MIGRATE_BACKUP_KEEP backups -------------------------------------------------

@pytest.fixture
def small_volume(tmp_path: Path) -> Path:
    """A filesystem of its own, 1.6 MiB (tmpfs: mounting needs root, as CI runs)."""
    import os
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("mounting a small filesystem needs root (CI runs as root)")
    volume = tmp_path / "volume"
    volume.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1600k", "tmpfs", str(volume)], check=True)
    yield volume
    subprocess.run(["umount", str(volume)], check=True)


def _sized(db: Db, kilobytes: int) -> None:
    """Rows whose dump takes about `kilobytes` (random hex: pg_dump's compression takes off about 40%)."""
    db.query("CREATE TABLE IF NOT EXISTS payload (id int, v text)")
    db.query("TRUNCATE payload")
    db.query("INSERT INTO payload SELECT g, md5(random()::text) || md5(random()::text) FROM generate_series(1, %s) g",
             (kilobytes * 1024 // 40,))


def test_a_volume_full_of_the_backups_retention_keeps_makes_room_for_the_next(db: Db, env: dict[str, str],
                                                                             small_volume: Path) -> None:
    """MIGRATE_BACKUP_KEEP=2 on a volume that holds two backups and a little: the third and every
    later one first deletes what retention would delete after it (`backup.pruned`, making room),
    never what it keeps, and succeeds."""
    _sized(db, 650)
    keep2 = {**env, "MIGRATE_BACKUP_DIR": str(small_volume), "MIGRATE_BACKUP_KEEP": "2"}
    taken = [run_job("backup", env=keep2) for _ in range(4)]

    assert [0, 0, 0, 0] == [r.code for r in taken], taken[-1].stdout[-1500:]
    made_room = [e for r in taken for e in r.events("backup.pruned") if e["reason"].startswith("making room")]
    assert made_room and all(Path(e["path"]).name != Path(taken[-1].event("backup.done")["path"]).name
                             for e in made_room)
    assert sorted(Path(r.event("backup.done")["path"]).name for r in taken[-2:]) == dumps(small_volume)


def test_what_retention_cannot_free_is_exit_5_with_the_sizes(db: Db, env: dict[str, str], small_volume: Path) -> None:
    """A backup bigger than the whole volume: exit 5 saying what is free and what retention keeps;
    the backup retention keeps is still there, nothing was migrated."""
    keep1 = {**env, "MIGRATE_BACKUP_DIR": str(small_volume), "MIGRATE_BACKUP_KEEP": "1"}
    assert 0 == run_job("run", env={**keep1, "MIGRATE_TARGET": "0005"}).code
    _sized(db, 300)
    first = run_job("backup", env=keep1)
    assert 0 == first.code
    _sized(db, 6000)

    result = run_job("run", env=keep1)

    error = result.event("run.failed")["error"]
    assert (5, ["0005"], True, True) == (result.code, db.version(), "bytes free" in error, "MIGRATE_BACKUP_KEEP=1" in error), \
        error
    assert [Path(first.event("backup.done")["path"]).name] == dumps(small_volume)
