"""`migrate-job run` end to end against real PostgreSQL, on the example blog migrations."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import time
import stat
import subprocess
from pathlib import Path

from tests.conftest import MIGRATE_JOB, ROOT, Db, create_database, drop_database, pg_restore, run_job

HEAD = "0006"
BLOG_TABLES = {"users", "posts", "comments", "profiles", "alembic_version"}


def test_run_migrates_an_empty_database_to_head(db: Db, env: dict[str, str]) -> None:
    """An empty database ends at head with every table of the blog."""
    result = run_job("run", env=env)

    assert 0 == result.code, result.stdout + result.stderr
    assert [HEAD] == db.version()
    assert BLOG_TABLES <= db.tables()
    assert "migrated" == result.event("run.done")["outcome"]


def test_run_logs_the_contract_events_in_order(db: Db, env: dict[str, str]) -> None:
    """The events come in the contract's order, one migration.start/done pair per revision."""
    db.holds_data()
    result = run_job("run", env=env)

    core = [line["event"] for line in result.lines if "logger" not in line]  # the job's own events
    expected = ["run.start", "wait.ready", "lock.acquired", "plan", "backup.start", "backup.done"]
    for revision in ["0001", "0002", "0003", "0004", "0005", "0006"]:
        expected += ["migration.start", "migration.done"]
    expected += ["lock.released", "run.done"]
    assert expected == core
    done = result.events("migration.done")
    assert ["0001", "0002", "0003", "0004", "0005", "0006"] == [e["revision"] for e in done]
    assert all(isinstance(e["seconds"], float) and e["description"] for e in done)


def test_every_stdout_line_is_json_with_the_contract_keys(env: dict[str, str]) -> None:
    """Every stdout line, Alembic's included, is a JSON object with timestamp, level, event and one run_id."""
    result = run_job("run", env=env)

    lines = result.lines  # raises on any line that is not JSON
    assert lines
    assert all({"timestamp", "level", "event", "run_id"} <= set(line) for line in lines)
    assert 1 == len({line["run_id"] for line in lines})
    assert all(line["timestamp"].endswith("Z") for line in lines)
    assert any(line.get("logger", "").startswith("alembic") for line in lines)


def _lines(out: io.StringIO) -> list[dict]:
    from job import logs

    logs.drain(5)  # (a thread of its own writes them)
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_held_lines_keep_the_time_they_happened() -> None:
    """A line held until the lock is tried is written later with the time it was logged, in order."""
    from job import logs

    out = io.StringIO()
    logs.configure(stream=out, hold=True)
    logs.log.info("first")
    time.sleep(0.2)
    logs.log.release()
    logs.log.info("second")

    first, second = _lines(out)
    assert ["first", "second"] == [first["event"], second["event"]]
    gap = dt.datetime.fromisoformat(second["timestamp"][:-1]) - dt.datetime.fromisoformat(first["timestamp"][:-1])
    assert gap >= dt.timedelta(seconds=0.2)


def test_a_warning_writes_the_held_lines_at_once() -> None:
    """A warning is never held: it goes out at once, after the lines held before it."""
    from job import logs

    out = io.StringIO()
    logs.configure(stream=out, hold=True)
    logs.log.info("held")
    logs.log.warning("urgent")

    assert ["held", "urgent"] == [line["event"] for line in _lines(out)]


def test_a_run_that_fails_before_the_lock_writes_its_held_lines(env: dict[str, str]) -> None:
    """A run that never reaches the lock (the database refuses it) still logs run.start before run.failed."""
    result = run_job("run", env={**env, "DATABASE_URL": env["DATABASE_URL"].rsplit("/", 1)[0] + "/no_such_db"})

    assert 3 == result.code
    assert ["run.start", "run.failed"] == [line["event"] for line in result.lines]


def test_backup_is_private_verified_and_described_by_its_sidecar(db: Db, env: dict[str, str], backup_dir: Path) -> None:
    """The backup is 0600, its sidecar's sha256 and size match the file, and it is named by time."""
    db.holds_data()
    result = run_job("run", env=env)

    done = result.event("backup.done")
    dump = Path(done["path"])
    sidecar = json.loads(dump.with_name(dump.name + ".json").read_text())
    assert 0o600 == stat.S_IMODE(dump.stat().st_mode)
    assert 0o600 == stat.S_IMODE(dump.with_name(dump.name + ".json").stat().st_mode)
    assert hashlib.sha256(dump.read_bytes()).hexdigest() == sidecar["sha256"] == done["sha256"]
    assert dump.stat().st_size == sidecar["bytes"] == done["bytes"]
    assert (db.name, [], [HEAD]) == (sidecar["database"], sidecar["from_revision"], sidecar["to_revision"])
    assert dump.name.startswith(sidecar["created_at"][:4])
    assert [] == [p.name for p in backup_dir.iterdir() if p.name.startswith(".")]
    pg_dump = subprocess.run(["pg_dump", "--version"], capture_output=True, text=True, check=True).stdout
    assert pg_dump.split()[2] == sidecar["pg_dump_version"].split()[0]  # "pg_dump (PostgreSQL) 15.20 ..."


def test_backup_restores_with_pg_restore(db: Db, env: dict[str, str]) -> None:
    """A backup taken before migrating restores the data as it was, at the revision it was taken at."""
    env_to_0005 = {**env, "MIGRATE_TARGET": "0005"}
    assert 0 == run_job("run", env=env_to_0005).code
    db.query("INSERT INTO users (email, first_name, last_name) VALUES ('ada@example.org', 'Ada', 'Lovelace')")
    dump = run_job("run", env=env).event("backup.done")["path"]

    restored = create_database(db.admin_url, prefix="restored")
    try:
        pg_restore("--no-owner", "-d", restored.url, backup=dump, check=True)
        assert ["0005"] == restored.version()
        assert [("Ada", "Lovelace", "member")] == restored.query("SELECT first_name, last_name, role FROM users")
    finally:
        drop_database(restored)


def test_data_migrations_keep_existing_rows(db: Db, env: dict[str, str]) -> None:
    """Rows written before 0005 and 0006 get a role and a full name."""
    assert 0 == run_job("run", env={**env, "MIGRATE_TARGET": "0004"}).code
    db.query("INSERT INTO users (email, first_name, last_name) VALUES ('g@example.org', 'Grace', 'Hopper')")

    assert 0 == run_job("run", env=env).code

    assert [("Grace Hopper", "member")] == db.query("SELECT full_name, role FROM users")


def test_rerun_at_head_is_a_no_op_without_backup(env: dict[str, str], backup_dir: Path) -> None:
    """A second run changes nothing and takes no backup."""
    assert 0 == run_job("run", env=env).code
    before = sorted(backup_dir.iterdir())

    result = run_job("run", env=env)

    assert 0 == result.code
    assert "up-to-date" == result.event("run.done")["outcome"]
    assert [] == result.events("backup.start") + result.events("migration.start")
    assert before == sorted(backup_dir.iterdir())


def test_backup_always_backs_up_at_head(env: dict[str, str], backup_dir: Path) -> None:
    """MIGRATE_BACKUP=always takes a backup even when nothing is pending."""
    assert 0 == run_job("run", env=env).code

    result = run_job("run", env={**env, "MIGRATE_BACKUP": "always"})

    assert 1 == len(result.events("backup.done"))
    assert 1 == len(list(backup_dir.glob("*.dump")))


def test_a_first_deploy_on_an_empty_database_is_not_backed_up(db: Db, env: dict[str, str], backup_dir: Path) -> None:
    """With `auto`, a database that holds nothing yet is migrated without a backup, and the log says why."""
    result = run_job("run", env=env)

    assert (0, [], []) == (result.code, result.events("backup.done"), list(backup_dir.iterdir()))
    assert "nothing to restore" in result.event("backup.skipped")["reason"]


def test_a_database_holding_anything_is_backed_up_before_its_first_migration(db: Db, env: dict[str, str],
                                                                           backup_dir: Path) -> None:
    """A type of its own is enough for `auto` to back the database up before migrating it."""
    db.query("CREATE TYPE mood AS ENUM ('happy')")

    result = run_job("run", env=env)

    assert (0, 1, []) == (result.code, len(result.events("backup.done")), result.events("backup.skipped"))


def test_backup_off_takes_none(env: dict[str, str], backup_dir: Path) -> None:
    """MIGRATE_BACKUP=off migrates without a backup."""
    result = run_job("run", env={**env, "MIGRATE_BACKUP": "off"})

    assert 0 == result.code
    assert [] == list(backup_dir.iterdir())


def test_backups_are_pruned_to_the_newest_keep(db: Db, env: dict[str, str], backup_dir: Path) -> None:
    """With MIGRATE_BACKUP_KEEP=2 only the two newest backups of the database remain."""
    keep2 = {**env, "MIGRATE_BACKUP": "always", "MIGRATE_BACKUP_KEEP": "2"}
    paths = [run_job("run", env=keep2).event("backup.done")["path"] for _ in range(3)]

    assert sorted(Path(p).name for p in paths[1:]) == sorted(p.name for p in backup_dir.glob("*.dump"))


def test_termination_log_gets_the_outcome(env: dict[str, str]) -> None:
    """The one-line outcome lands in MIGRATE_TERMINATION_LOG."""
    run_job("run", env=env)

    assert "migrated (exit 0)\n" == Path(env["MIGRATE_TERMINATION_LOG"]).read_text()


def test_wait_returns_when_the_database_answers(env: dict[str, str]) -> None:
    """`wait` exits 0 and logs wait.ready."""
    result = run_job("wait", env=env)

    assert 0 == result.code
    assert "ready" == result.event("run.done")["outcome"]


def test_check_exits_8_while_pending_and_0_at_head(env: dict[str, str]) -> None:
    """`check` reports pending migrations with exit 8, and 0 once at head."""
    assert 8 == run_job("check", env=env).code
    run_job("run", env=env)
    assert 0 == run_job("check", env=env).code


def test_check_json_prints_one_document(env: dict[str, str]) -> None:
    """`check --format json` prints one JSON document on stdout and keeps logs off it."""
    result = run_job("check", "--format", "json", env=env)

    document = json.loads(result.stdout)
    assert (False, 6) == (document["at_target"], len(document["pending"]))
    assert "run.done" in result.stderr


def test_check_wait_returns_once_another_job_migrated(db: Db, env: dict[str, str]) -> None:
    """`check --wait` blocks while migrations are pending and returns 0 when a job has run them."""
    waiter = subprocess.Popen(
        [MIGRATE_JOB, "check", "--wait"], env={**env, "MIGRATE_WAIT_TIMEOUT": "60"},
        stdout=subprocess.PIPE, text=True, cwd=ROOT,
    )
    assert 0 == run_job("run", env=env).code

    assert 0 == waiter.wait(timeout=30)


def test_check_wait_gives_up_after_the_timeout(env: dict[str, str]) -> None:
    """`check --wait` exits 8 when the wait timeout passes with migrations still pending."""
    result = run_job("check", "--wait", env={**env, "MIGRATE_WAIT_TIMEOUT": "1"})

    assert 8 == result.code
    assert result.events("check.waiting")


def test_plan_lists_pending_revisions_without_changing_anything(db: Db, env: dict[str, str]) -> None:
    """`plan --format json` lists the pending revisions in order and creates nothing."""
    result = run_job("plan", "--format", "json", env=env)

    plan = json.loads(result.stdout)
    assert ([], "head", ["0001", "0002", "0003", "0004", "0005", "0006"]) == (
        plan["current"], plan["target"], [p["revision"] for p in plan["pending"]]
    )
    assert set() == db.tables()


def test_plan_sql_prints_the_offline_sql(db: Db, env: dict[str, str]) -> None:
    """`plan --sql` prints the DDL the pending revisions would run."""
    assert 0 == run_job("run", env={**env, "MIGRATE_TARGET": "0004"}).code

    result = run_job("plan", "--sql", env=env)

    assert 0 == result.code
    assert "ALTER TABLE users ADD COLUMN role" in result.stdout
    assert "CREATE TABLE users" not in result.stdout
    assert ["0004"] == db.version()


def test_target_stops_at_the_given_revision(db: Db, env: dict[str, str]) -> None:
    """MIGRATE_TARGET=0003 migrates up to 0003 and no further."""
    result = run_job("run", env={**env, "MIGRATE_TARGET": "0003"})

    assert 0 == result.code
    assert ["0003"] == db.version()
    assert "profiles" not in db.tables()


def test_every_url_form_is_accepted(db: Db, env: dict[str, str]) -> None:
    """postgres://, postgresql:// and postgresql+psycopg2:// all reach the same database."""
    rest = db.url.split("://", 1)[1]
    for scheme in ("postgres", "postgresql+psycopg2", "postgresql"):
        result = run_job("wait", env={**env, "DATABASE_URL": f"{scheme}://{rest}"})
        assert 0 == result.code, (scheme, result.stdout)


def test_database_url_file_is_read(db: Db, env: dict[str, str], tmp_path: Path) -> None:
    """DATABASE_URL_FILE names a file (a mounted Secret) holding the URL."""
    secret = tmp_path / "url"
    secret.write_text(db.url + "\n")
    file_env = {k: v for k, v in env.items() if k != "DATABASE_URL"}

    result = run_job("run", env={**file_env, "DATABASE_URL_FILE": str(secret)})

    assert 0 == result.code
    assert [HEAD] == db.version()


def test_libpq_environment_is_enough(db: Db, env: dict[str, str]) -> None:
    """Without DATABASE_URL, libpq's PGHOST/PGPORT/PGUSER/PGDATABASE are used, backups included."""
    db.holds_data()
    pg_env = {k: v for k, v in env.items() if k != "DATABASE_URL"}
    pg_env.update(PGHOST="127.0.0.1", PGPORT="5432", PGUSER="postgres", PGDATABASE=db.name)

    result = run_job("run", env=pg_env)

    assert 0 == result.code, result.stdout
    assert [HEAD] == db.version()
    assert result.event("backup.done")["bytes"] > 0


def test_stock_alembic_init_project_works(db: Db, env: dict[str, str], tmp_path: Path) -> None:
    """A project made by `alembic init` (its own env.py, its own engine) migrates through ALEMBIC_CONFIG."""
    alembic = str(Path(MIGRATE_JOB).parent / "alembic")
    subprocess.run([alembic, "init", "migrations"], cwd=tmp_path, check=True, capture_output=True)
    subprocess.run([alembic, "revision", "-m", "create widgets"], cwd=tmp_path, check=True, capture_output=True)
    script = next((tmp_path / "migrations" / "versions").glob("*create_widgets.py"))
    stub = 'def upgrade() -> None:\n    """Upgrade schema."""\n    pass'
    assert stub in script.read_text()
    script.write_text(script.read_text().replace(stub, "def upgrade() -> None:\n    op.execute('CREATE TABLE widgets (id int)')"))

    result = run_job("run", env={**env, "ALEMBIC_CONFIG": str(tmp_path / "alembic.ini")}, cwd=tmp_path)

    assert 0 == result.code, result.stdout + result.stderr
    assert "widgets" in db.tables()
    assert 1 == len(db.version())
    assert any(line.get("logger", "").startswith("alembic") for line in result.lines)
    # env.py's fileConfig(alembic.ini) took effect, as under bare Alembic: its console handler on stderr
    assert (False, True) == ("INFO  [alembic" in result.stdout,
                             "INFO  [alembic.runtime.migration] Running upgrade" in result.stderr)


def test_app_readyz_follows_the_migrations(db: Db, env: dict[str, str], monkeypatch) -> None:
    """The blog's /readyz answers 503 before the migrations and 200 after; the API works at head."""
    from fastapi.testclient import TestClient

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("PGPASSWORD", raising=False)
    from app import main

    main.settings.cache_clear()
    main.engine.cache_clear()
    client = TestClient(main.app)
    assert 200 == client.get("/healthz").status_code
    assert 503 == client.get("/readyz").status_code

    assert 0 == run_job("run", env=env).code

    assert 200 == client.get("/readyz").status_code
    user = client.post("/users", json={"email": "a@example.org", "full_name": "Ada Lovelace"}).json()
    post = client.post("/posts", json={"user_id": user["id"], "title": "Hi", "body": "First"}).json()
    comment = client.post(f"/posts/{post['id']}/comments", json={"user_id": user["id"], "body": "Nice"})
    assert 201 == comment.status_code
    assert ["Nice"] == [c["body"] for c in client.get(f"/posts/{post['id']}/comments").json()]
    assert 404 == client.get("/users/999").status_code
    assert 204 == client.delete(f"/users/{user['id']}").status_code
    assert [] == client.get("/posts").json()


def test_no_argument_means_run(db: Db, env: dict[str, str]) -> None:
    """The image's default command is `run`; with no arguments the job runs the pipeline."""
    result = run_job(env=env)

    assert 0 == result.code
    assert [HEAD] == db.version()


def test_help_lists_every_command_at_the_terminal_width(env: dict[str, str]) -> None:
    """`--help` exits 0 listing every command, wrapped to COLUMNS."""
    from job.cli import COMMANDS

    result = run_job("--help", env={**env, "COLUMNS": "60"})

    assert 0 == result.code
    assert all(f"    {name}" in result.stdout for name in COMMANDS)
    assert max(len(line) for line in result.stdout.splitlines()) <= 60
