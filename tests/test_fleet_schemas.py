"""Tenants kept as schemas of one database (MIGRATE_TENANT_SCHEMA, and MIGRATE_FLEET's schema
names), on the machine's PostgreSQL: each schema migrated as `run` migrates a database (its own
version table, lock, backup, heads record, history and schema record), however env.py learns the
schema (the search path the job sets, `-x tenant=…`, or a loop of its own over the schemas)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from job import schema as schemas
from tests.conftest import ADMIN_URL, ROOT, Db, base_env, create_database, drop_database, run_job, scenario
from tests.test_fleet import outcomes, terminated_mid_fleet

TENANT_HEAD = ["t003"]


def tenant_env(db: Db, tmp_path: Path, **extra: str) -> dict[str, str]:
    backups = tmp_path / "backups"
    backups.mkdir(exist_ok=True)
    return base_env(**{
        "DATABASE_URL": db.url,
        "ALEMBIC_CONFIG": scenario("tenant"),
        "MIGRATE_BACKUP_DIR": str(backups),
        "MIGRATE_TERMINATION_LOG": str(tmp_path / "termination-log"),
        "MIGRATE_WAIT_TIMEOUT": "10",
        "MIGRATE_LOCK_TIMEOUT": "30",
        **extra,
    })


def make_schemas(db: Db, names: list[str]) -> None:
    db.query("".join(f'CREATE SCHEMA "{name}";' for name in names))


def versions(db: Db) -> dict[str, list[str]]:
    """Each schema's version table's rows (a schema without one is left out)."""
    rows = db.query("SELECT table_schema FROM information_schema.tables WHERE table_name = 'alembic_version'")
    return {s: sorted(r[0] for r in db.query(f'SELECT version_num FROM "{s}".alembic_version')) for (s,) in rows}


def test_two_hundred_tenant_schemas_one_failing_then_resumed_and_one_added(db: Db, tmp_path: Path) -> None:
    names = [f"tenant_{i:03d}" for i in range(200)]
    make_schemas(db, names)
    broken = "tenant_042"
    db.query(f"CREATE TABLE {broken}.tenant_table_1 (id int)")  # (its first revision fails: already there)
    db.query("CREATE TABLE public.shared_plans (id int)")  # (what the app keeps outside the tenants: untouched)
    env = tenant_env(db, tmp_path, MIGRATE_FLEET="query:SELECT nspname FROM pg_namespace WHERE nspname LIKE "
                                                 "'tenant\\_%' ORDER BY 1", MIGRATE_FLEET_PARALLEL="4")

    result = run_job("run", env=env, timeout=600)

    assert result.code == 6, result.stdout[-3000:]
    assert outcomes(result) == {name: "failed" if name == broken else "migrated" for name in names}
    assert result.event("fleet.done")["failed"] == [{"tenant": broken, "exit_code": 6}]
    found = versions(db)
    assert found == {name: TENANT_HEAD for name in names if name != broken}  # (the broken one's rolled back whole)
    assert "public" not in found and db.tables("public") == {"shared_plans"}
    assert db.query("SELECT count(*) FROM tenant_199.tenant_table_1") == [(100,)]
    # each schema its own lock: 200 keys, none shared
    assert len({e["key"] for e in result.events("lock.acquired")}) == 200
    # the history tells the tenants apart: one run per schema, its revisions with it
    assert db.query("SELECT count(DISTINCT tenant_schema), count(*) FILTER (WHERE tenant_schema IS NULL) "
                    "FROM migrate_job.migrate_job_history") == [(200, 0)]
    assert (tmp_path / "termination-log").read_text().startswith(f"fleet-failed: 1 of 200 failed; {broken} (exit 6)")

    # resume: the broken tenant fixed and one added; a re-run migrates those two alone
    db.query(f"DROP TABLE {broken}.tenant_table_1")
    make_schemas(db, ["tenant_200"])
    again = run_job("run", env=env, timeout=600)
    assert again.code == 0, again.stdout[-3000:]
    assert outcomes(again) == {**{name: "up-to-date" for name in names}, broken: "migrated", "tenant_200": "migrated"}
    assert versions(db)[broken] == TENANT_HEAD and versions(db)["tenant_200"] == TENANT_HEAD
    assert not [e for e in again.lines if e.get("event") == "schema.drift"]  # (another tenant's change is not drift)


@pytest.mark.parametrize("via, project", [("search_path", "tenant"), ("search_path", None), ("x:tenant", "tenant_x")])
def test_one_tenant_schema_reaches_env_py_the_way_the_project_expects(db: Db, tmp_path: Path, via: str,
                                                                      project: str | None) -> None:
    """The three ways a schema reaches env.py: the search path the job sets (an env.py that builds its
    engine from DATABASE_URL itself, and the blog's, from sqlalchemy.url), or -x tenant=NAME for an
    env.py that points its connection and version table at the schema itself."""
    make_schemas(db, ["Acme-1", "globex"])
    config = scenario(project) if project else str(ROOT / "alembic.ini")
    env = tenant_env(db, tmp_path, ALEMBIC_CONFIG=config, MIGRATE_TENANT_SCHEMA="Acme-1", MIGRATE_TENANT_SCHEMA_VIA=via)

    result = run_job("run", env=env)

    assert result.code == 0, result.stdout[-3000:]
    head = TENANT_HEAD if project else ["0006"]
    assert versions(db) == {"Acme-1": head}
    tables = {r[0] for r in db.query("SELECT tablename FROM pg_tables WHERE schemaname = 'Acme-1'")}
    assert ("tenant_table_3" if project else "comments") in tables
    assert db.tables("public") == set() and db.tables("globex") == set()
    assert run_job("run", env=env).event("run.done")["outcome"] == "up-to-date"
    assert run_job("check", env=env).code == 0
    assert run_job("check", env={**env, "MIGRATE_TENANT_SCHEMA": "globex"}).code == 8


def test_a_tenant_schema_the_database_lacks_is_exit_2_and_creates_nothing(db: Db, tmp_path: Path) -> None:
    result = run_job("run", env=tenant_env(db, tmp_path, MIGRATE_TENANT_SCHEMA="nosuch"))
    assert result.code == 2 and "the schema 'nosuch' (MIGRATE_TENANT_SCHEMA) is not in the database" in result.failure
    assert db.query("SELECT count(*) FROM pg_namespace WHERE nspname = 'nosuch'") == [(0,)]
    for bad in ("two words", "semi;colon", 'quo"te'):
        result = run_job("run", env=tenant_env(db, tmp_path, MIGRATE_TENANT_SCHEMA=bad))
        assert result.code == 2 and "is not a schema name" in result.failure, bad


@pytest.mark.parametrize("project, head, table", [("tenant", TENANT_HEAD, "tenant_table_1"),
                                                 ("blog", ["0006"], "users")])
def test_the_job_and_bare_alembic_leave_the_same_tenant_schema(db: Db, tmp_path: Path, project: str, head: list[str],
                                                              table: str) -> None:
    """The same project into two schemas: by the job with MIGRATE_TENANT_SCHEMA, and by bare
    `alembic upgrade head` with the search path in PGOPTIONS, as a shell loop would: the same
    objects, the same rows, the same version (the tenant scenario, and the blog service's history)."""
    config = scenario("tenant") if project == "tenant" else str(ROOT / "alembic.ini")
    make_schemas(db, ["by_job", "by_alembic"])
    assert run_job("run", env=tenant_env(db, tmp_path, ALEMBIC_CONFIG=config, MIGRATE_TENANT_SCHEMA="by_job")).code == 0
    bare = subprocess.run([sys.executable, "-m", "alembic", "-c", config, "upgrade", "head"],
                          env={**os.environ, "DATABASE_URL": db.url, "PGOPTIONS": "-csearch_path=by_alembic"},
                          capture_output=True, text=True, cwd=ROOT)
    assert bare.returncode == 0, bare.stderr

    conn = db.connect()
    try:
        job_side, alembic_side = (
            {(kind, re.sub(rf"\b{s}\b", "S", name)): re.sub(rf"\b{s}\b", "S", d)
             for (kind, name), d in schemas.snapshot(conn, only=s).items()} for s in ("by_job", "by_alembic"))
    finally:
        conn.close()
    assert job_side == alembic_side and len(job_side) > 5
    assert versions(db) == {"by_job": head, "by_alembic": head}
    assert (db.query(f"SELECT count(*) FROM by_job.{table}") == db.query(f"SELECT count(*) FROM by_alembic.{table}"))
    assert db.tables("public") == set()


def test_a_tenant_backup_holds_its_schema_and_restores_it_alone(db: Db, tmp_path: Path) -> None:
    make_schemas(db, ["acme", "globex"])
    acme, globex = (tenant_env(db, tmp_path, MIGRATE_TENANT_SCHEMA=s, MIGRATE_TARGET="t001")
                    for s in ("acme", "globex"))
    for env in (acme, globex):
        assert run_job("run", env=env).code == 0
    db.query("INSERT INTO globex.tenant_table_1 (name) VALUES ('globex keeps this')")
    # acme upgraded: its backup is taken first, of its schema alone
    result = run_job("run", env={**acme, "MIGRATE_TARGET": "head"})
    assert result.code == 0, result.stdout[-2000:]
    path = result.event("backup.done")["path"]
    assert "acme" in Path(path).name
    listed = subprocess.run(["pg_restore", "--list"], input=_archive(path), capture_output=True).stdout.decode()
    assert "acme tenant_table_1" in listed and "globex" not in listed
    db.query("INSERT INTO acme.tenant_table_3 (name) VALUES ('after the backup')")

    # restoring it needs acme's MIGRATE_TENANT_SCHEMA: never the whole database's, nor another tenant's
    name = Path(path).name
    for env in ({**acme, "MIGRATE_TENANT_SCHEMA": ""}, globex):
        refused = run_job("restore", name, "--yes", env=env)
        assert refused.code == 2 and "MIGRATE_TENANT_SCHEMA=acme" in refused.failure
    restored = run_job("restore", name, "--yes", env=acme)
    assert restored.code == 0, restored.stdout[-2000:]
    assert versions(db) == {"acme": ["t001"], "globex": ["t001"]}
    assert "tenant_table_3" not in db.tables("acme")
    assert db.query("SELECT name FROM globex.tenant_table_1 WHERE id > 100") == [("globex keeps this",)]

    # status is about the tenant: its revision, its backups, its runs
    report = json.loads(run_job("status", "--format", "json", env=acme).stdout)
    assert report["tenant_schema"] == "acme" and report["current"] == ["t001"]
    assert [b["path"] for b in report["backups"]] == [path]  # (globex's backups are globex's)
    assert report["history"][0]["command"] == "restore" and len(report["history"]) == 3
    assert "(tenant schema acme)" in run_job("status", env=acme).stdout


def _archive(path: str) -> bytes:
    from tests.conftest import custom_archive

    return custom_archive(Path(path).read_bytes())


@pytest.mark.parametrize("listed", [True, False], ids=["schemas-listed", "schemas-found"])
@pytest.mark.parametrize("shape", ["version_table_schema", "search_path"])
def test_an_env_py_that_loops_over_tenant_schemas_itself_is_run_once_per_tenant(db: Db, tmp_path: Path,
                                                                                shape: str, listed: bool) -> None:
    """Netflix Dispatch's shape, both ways, with the schemas in MIGRATE_FLEET or found by asking
    env.py: each tenant's run passes over every other schema's turn of env.py's loop, so each tenant
    is planned, locked and recorded alone, and a tenant added later is migrated (not taken for up
    to date)."""
    make_schemas(db, ["tenant_a", "tenant_b", "tenant_c"])
    env = tenant_env(db, tmp_path, ALEMBIC_CONFIG=scenario("schema_loop"), SCENARIO_LOOP=shape)
    if listed:
        env["MIGRATE_FLEET"] = "query:SELECT nspname FROM pg_namespace WHERE nspname LIKE 'tenant%'"

    result = run_job("run", env=env, timeout=300)

    assert result.code == 0, result.stdout[-3000:]
    assert bool(result.events("fleet.from_env_py")) is not listed
    assert outcomes(result) == {s: "migrated" for s in ("tenant_a", "tenant_b", "tenant_c")}
    assert len(result.events("migration.done")) == 3  # (one revision in each of three schemas: not 9)
    assert versions(db) == {s: ["l001"] for s in ("tenant_a", "tenant_b", "tenant_c")}
    assert db.query("SELECT count(*) FROM migrate_job.migrate_job_history WHERE kind = 'revision'") == [(3,)]

    make_schemas(db, ["tenant_d"])
    assert run_job("check", env=env).code == 8
    checked = json.loads(run_job("check", "--format", "json", env=env).stdout)
    assert checked["at_target"] is False and {t["tenant"]: [s["revision"] for s in t["pending"]]
                                              for t in checked["tenants"]} == {
        "tenant_a": [], "tenant_b": [], "tenant_c": [], "tenant_d": ["l001"]}
    again = run_job("run", env=env, timeout=300)
    assert again.code == 0, again.stdout[-3000:]
    assert outcomes(again) == {"tenant_a": "up-to-date", "tenant_b": "up-to-date", "tenant_c": "up-to-date",
                               "tenant_d": "migrated"}
    assert "things" in db.tables("tenant_d") and run_job("check", env=env).code == 0
    assert db.tables("public") == set()


@pytest.mark.parametrize("shape", ["version_table_schema", "search_path"])
def test_a_command_for_one_tenant_refuses_an_env_py_that_loops_over_schemas(db: Db, env: dict[str, str],
                                                                           shape: str) -> None:
    """Without a tenant schema to pick its turn, a command that works on one tenant (a backup, a
    downgrade) cannot follow the loop: exit 2 before anything is written, saying what to set."""
    make_schemas(db, ["tenant_a", "tenant_b", "tenant_c"])
    for command in (["backup"], ["downgrade", "base", "--yes"]):
        result = run_job(*command, env={**env, "ALEMBIC_CONFIG": scenario("schema_loop"), "SCENARIO_LOOP": shape})
        assert result.code == 2, result.stdout[-2000:]
        assert "runs the migrations 3 times in one run" in result.failure
        assert "MIGRATE_TENANT_SCHEMA" in result.failure and "MIGRATE_FLEET" in result.failure
    assert db.query("SELECT count(*) FROM pg_tables WHERE tablename IN ('things', 'alembic_version')") == [(0,)]
    assert not result.events("backup.start")


def test_status_over_a_fleet_reports_each_tenant_and_other_commands_refuse_a_fleet(db: Db, tmp_path: Path) -> None:
    make_schemas(db, ["acme", "globex", "initech"])
    env = tenant_env(db, tmp_path, MIGRATE_FLEET="acme,globex,initech")
    assert run_job("run", env={**env, "MIGRATE_FLEET": "acme,globex"}).code == 0
    assert run_job("run", env={**env, "MIGRATE_FLEET": "initech", "MIGRATE_TARGET": "t001"}).code == 0

    report = json.loads(run_job("status", "--format", "json", env=env).stdout)
    by_tenant = {t["tenant"]: t for t in report["tenants"]}
    assert {name: (t["outcome"], t["current"], t["pending_count"]) for name, t in by_tenant.items()} == {
        "acme": ("at-target", TENANT_HEAD, 0), "globex": ("at-target", TENANT_HEAD, 0),
        "initech": ("pending", ["t001"], 2)}
    assert by_tenant["initech"]["last_run"]["outcome"] == "migrated" and not by_tenant["acme"]["lock_held"]
    text = run_job("status", env=env)
    assert text.code == 0
    rows = [line.split() for line in text.stdout.splitlines()]
    assert rows[0][:3] == ["tenant", "state", "current"] and rows[1][:4] == ["initech", "pending", "t001", "2"]
    assert run_job("check", env=env).code == 8
    checked = json.loads(run_job("check", "--format", "json", env=env).stdout)
    assert checked["at_target"] is False and {t["tenant"]: [s["revision"] for s in t["pending"]]
                                              for t in checked["tenants"]} == {
        "acme": [], "globex": [], "initech": ["t002", "t003"]}

    # a command that works on one tenant never does one alone when a fleet is named
    for command in (["backup"], ["downgrade", "base", "--yes"], ["plan"], ["drift"]):
        refused = run_job(*command, env=env)
        assert refused.code == 2 and "works on one tenant, and MIGRATE_FLEET names a fleet" in refused.failure, command
    assert versions(db) == {"acme": TENANT_HEAD, "globex": TENANT_HEAD, "initech": ["t001"]}


def test_sigterm_mid_schema_fleet_leaves_every_tenant_clean_and_says_which_were_done(db: Db, tmp_path: Path) -> None:
    names = ["tenant_a", "tenant_b", "tenant_c", "tenant_d"]
    make_schemas(db, names)
    env = tenant_env(db, tmp_path, ALEMBIC_CONFIG=scenario("slow"), SCENARIO_SLEEP="30", MIGRATE_BACKUP="off",
                     MIGRATE_FLEET=",".join(names), MIGRATE_FLEET_PARALLEL="2")
    result = terminated_mid_fleet(env, tmp_path / "out")

    assert result.code == 143, result.stdout[-3000:]
    ended = outcomes(result)
    interrupted = {name for name, outcome in ended.items() if outcome == "interrupted"}
    assert len(interrupted) == 2 and sorted(ended.values()) == ["interrupted"] * 2 + ["not-started"] * 2
    # s002 rolled back where it ran, in that schema alone; nothing where nothing started; no lock left
    assert versions(db) == {name: ["s001"] for name in interrupted}
    assert all(db.tables(name) == ({"alembic_version", "ran"} if name in interrupted else set()) for name in names)
    assert db.advisory_locks() == 0 and db.tables("public") == set()


def test_a_fleet_of_schemas_and_databases_runs_each_where_it_is(db: Db, tmp_path: Path) -> None:
    """One list of both kinds, one worker: after a tenant database at head the same worker takes a
    tenant schema, which is in DATABASE_URL's database still (each run starts from the fleet's
    environment, not the one the worker's last run set)."""
    other = create_database(ADMIN_URL, prefix="fleet")
    try:
        make_schemas(db, ["acme", "globex"])
        env = tenant_env(db, tmp_path, MIGRATE_FLEET=f"database:{other.name},acme,globex", MIGRATE_FLEET_PARALLEL="1")
        assert run_job("run", env=env).code == 0
        make_schemas(db, ["initech"])
        again = run_job("run", env={**env, "MIGRATE_FLEET": env["MIGRATE_FLEET"] + ",initech"})

        assert again.code == 0, again.stdout[-3000:]
        assert outcomes(again) == {other.name: "up-to-date", "acme": "up-to-date", "globex": "up-to-date",
                                   "initech": "migrated"}
        assert versions(db) == {s: TENANT_HEAD for s in ("acme", "globex", "initech")}
        assert versions(other) == {"public": TENANT_HEAD}
    finally:
        drop_database(other)


@pytest.mark.parametrize("setting, value, rest", [("MIGRATE_FLEET_CANARY", "2", "not-started"),
                                                  ("MIGRATE_FLEET_FAIL_FAST", "true", "not-started"),
                                                  ("MIGRATE_FLEET_FAIL_FAST", "false", "migrated")])
def test_a_failing_canary_or_fail_fast_stops_a_schema_fleet(db: Db, tmp_path: Path, setting: str, value: str,
                                                            rest: str) -> None:
    names = [f"tenant_{i}" for i in range(6)]
    make_schemas(db, names)
    db.query("CREATE TABLE tenant_1.tenant_table_1 (id int)")  # (the second tenant's first revision fails)
    env = tenant_env(db, tmp_path, MIGRATE_FLEET=",".join(names), MIGRATE_FLEET_PARALLEL="1", **{setting: value})

    result = run_job("run", env=env, timeout=300)

    assert result.code == 6, result.stdout[-3000:]
    assert outcomes(result) == {"tenant_0": "migrated", "tenant_1": "failed", **{n: rest for n in names[2:]}}
    assert set(versions(db)) == {"tenant_0"} | (set(names[2:]) if rest == "migrated" else set())
