"""`run` over a fleet of tenant databases (MIGRATE_FLEET, job.fleet), on the machine's PostgreSQL:
every database migrated as `run` migrates one, at most MIGRATE_FLEET_PARALLEL at once; a failing
tenant, a tenant added later, resume, canary, fail-fast, the sources of the list, a signal mid-fleet."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Iterator

import psycopg2
import pytest

from tests.conftest import (ADMIN_URL, ROOT, Db, Result, base_env, create_database, drop_database, finish_logged,
                            kill, run_job, scenario, start_logged)
from tests.events import events

HEAD = ["0006"]


@pytest.fixture
def tenants(request: pytest.FixtureRequest) -> Iterator[list[Db]]:
    """Fresh tenant databases (20 unless the test's `count` mark says otherwise)."""
    marker = request.node.get_closest_marker("count")
    made = [create_database(ADMIN_URL, prefix="fleet") for _ in range(marker.args[0] if marker else 20)]
    yield made
    for tenant in made:
        drop_database(tenant)


def fleet_env(tmp_path: Path, tenants: list[Db], **extra: str) -> dict[str, str]:
    backups = tmp_path / "backups"
    backups.mkdir(exist_ok=True)
    return base_env(**{
        "DATABASE_URL": tenants[0].url,
        "MIGRATE_FLEET": ",".join("database:" + t.name for t in tenants),
        "ALEMBIC_CONFIG": str(ROOT / "alembic.ini"),
        "MIGRATE_BACKUP_DIR": str(backups),
        "MIGRATE_TERMINATION_LOG": str(tmp_path / "termination-log"),
        "MIGRATE_WAIT_TIMEOUT": "10",
        "MIGRATE_LOCK_TIMEOUT": "30",
        **extra,
    })


def break_tenant(tenant: Db) -> None:
    """A tenant whose first revision fails: the table it creates is already there."""
    tenant.query("CREATE TABLE users (id int)")


def version(tenant: Db) -> list[str]:
    try:
        return tenant.version()
    except psycopg2.errors.UndefinedTable:
        return []


def terminated_mid_fleet(env: dict[str, str], out: Path) -> Result:
    """A fleet of two at a time over the slow scenario, sent SIGTERM once both running tenants are
    past their first revision, into their second (SCENARIO_SLEEP long)."""
    proc = start_logged(env, out)
    deadline = time.monotonic() + 60
    while events(out.read_text()).count("migration.done") < 2:
        assert time.monotonic() < deadline, out.read_text()
        time.sleep(0.05)
    time.sleep(0.5)
    kill(proc)
    return finish_logged(proc, out, timeout=60)


def outcomes(result) -> dict[str, str]:
    return {e["tenant"]: e["outcome"] for e in result.events("fleet.target")}


def test_twenty_tenants_one_failing_then_resumed_and_one_added(tmp_path: Path, tenants: list[Db]) -> None:
    broken = tenants[7]
    break_tenant(broken)
    env = fleet_env(tmp_path, tenants, MIGRATE_FLEET_PARALLEL="4")

    result = run_job("run", env=env, timeout=300)

    assert result.code == 6, result.stdout[-3000:]
    assert outcomes(result) == {t.name: ("failed" if t is broken else "migrated") for t in tenants}
    (failed,) = [e for e in result.events("fleet.target") if e["outcome"] == "failed"]
    assert failed["exit_code"] == 6 and "users" in failed["error"]
    done = result.event("fleet.done")
    assert done["counts"] == {"migrated": 19, "failed": 1} and done["exit_code"] == 6
    assert done["failed"] == [{"tenant": broken.name, "exit_code": 6}]
    for tenant in tenants:
        assert version(tenant) == ([] if tenant is broken else HEAD)
    # every line of a tenant's run says which tenant, and the fleet's run it belongs to
    fleet_id = result.event("fleet.start")["run_id"]
    runs = [line for line in result.lines if line["event"].startswith(("migration.", "lock.", "plan"))]
    assert runs and [line for line in runs if line.get("tenant") not in {t.name for t in tenants}
                     or line["fleet_run_id"] != fleet_id] == []
    assert len({line["run_id"] for line in result.events("run.done") if "tenant" in line}) == 19  # (a run_id each)
    assert result.event("run.failed")["tenant"] == broken.name
    assert result.lines[-1]["event"] == "run.done" and "tenant" not in result.lines[-1]  # (the fleet's own)
    message = (tmp_path / "termination-log").read_text()
    assert message.startswith(f"fleet-failed: 1 of 20 failed; {broken.name} (exit 6)") and "19 migrated" in message

    # resume: the failed tenant fixed, a re-run migrates it alone; the others answer at head
    broken.query("DROP TABLE users")
    added = create_database(ADMIN_URL, prefix="fleet")
    try:
        env["MIGRATE_FLEET"] += f",database:{added.name}"
        again = run_job("run", env=env, timeout=300)
        assert again.code == 0, again.stdout[-3000:]
        assert outcomes(again) == {**{t.name: "up-to-date" for t in tenants}, broken.name: "migrated",
                                   added.name: "migrated"}
        assert version(broken) == HEAD and version(added) == HEAD
        assert not again.events("backup.start") or {e["tenant"] for e in again.events("backup.start")} <= {broken.name}
        assert (tmp_path / "termination-log").read_text().startswith("fleet-done: 0 of 21 failed")
    finally:
        drop_database(added)


@pytest.mark.count(5)
def test_canary_that_fails_stops_the_fleet_before_the_rest_start(tmp_path: Path, tenants: list[Db]) -> None:
    break_tenant(tenants[1])
    result = run_job("run", env=fleet_env(tmp_path, tenants, MIGRATE_FLEET_CANARY="2"), timeout=300)

    assert result.code == 6
    assert outcomes(result) == {tenants[0].name: "migrated", tenants[1].name: "failed",
                                **{t.name: "not-started" for t in tenants[2:]}}
    assert result.event("fleet.canary_failed")["not_started"] == 3
    assert [version(t) for t in tenants[2:]] == [[], [], []]


@pytest.mark.count(5)
def test_canary_that_succeeds_lets_the_rest_run(tmp_path: Path, tenants: list[Db]) -> None:
    result = run_job("run", env=fleet_env(tmp_path, tenants, MIGRATE_FLEET_CANARY="2"), timeout=300)

    assert result.code == 0
    ended = [e["tenant"] for e in result.events("fleet.target")]
    assert set(ended[:2]) == {tenants[0].name, tenants[1].name} and set(ended) == {t.name for t in tenants}
    started = [line["tenant"] for line in result.events("run.start") if "tenant" in line]
    assert set(started[:2]) == {tenants[0].name, tenants[1].name}
    # the others started only once both canaries had ended
    canaries_done = max(i for i, line in enumerate(result.lines)
                        if line["event"] == "fleet.target" and line["tenant"] in ended[:2])
    first_other = min(i for i, line in enumerate(result.lines)
                      if line["event"] == "run.start" and line.get("tenant") in ended[2:])
    assert canaries_done < first_other


@pytest.mark.count(5)
def test_fail_fast_starts_no_more_once_one_failed(tmp_path: Path, tenants: list[Db]) -> None:
    break_tenant(tenants[1])
    env = fleet_env(tmp_path, tenants, MIGRATE_FLEET_PARALLEL="1", MIGRATE_FLEET_FAIL_FAST="true")
    result = run_job("run", env=env, timeout=300)

    assert result.code == 6
    assert outcomes(result) == {tenants[0].name: "migrated", tenants[1].name: "failed",
                                **{t.name: "not-started" for t in tenants[2:]}}
    assert result.event("fleet.done")["counts"] == {"migrated": 1, "failed": 1, "not-started": 3}

    # without fail-fast the rest of the fleet goes on past the failure
    env["MIGRATE_FLEET_FAIL_FAST"] = "false"
    env["MIGRATE_FLEET"] = ",".join("database:" + t.name for t in tenants[1:])
    env["DATABASE_URL"] = tenants[1].url
    result = run_job("run", env=env, timeout=300)
    assert result.code == 6
    assert outcomes(result) == {tenants[1].name: "failed", **{t.name: "migrated" for t in tenants[2:]}}


@pytest.mark.count(4)
def test_the_list_from_a_file_urls_and_a_query(tmp_path: Path, tenants: list[Db]) -> None:
    listing = tmp_path / "tenants"
    with_password = tenants[0].url.replace("postgres@", "postgres:Fl33tS3cret@")  # (trust auth: any will do)
    listing.write_text(f"# tenants\n{with_password}\n\ndatabase:{tenants[1].name}\n")
    result = run_job("run", env=fleet_env(tmp_path, tenants, MIGRATE_FLEET=f"@{listing}"), timeout=300)
    assert result.code == 0, result.stdout[-2000:]
    assert "Fl33tS3cret" not in result.stdout + result.stderr + (tmp_path / "termination-log").read_text()
    assert sorted(outcomes(result).values()) == ["migrated", "migrated"]
    assert version(tenants[0]) == HEAD and version(tenants[1]) == HEAD and version(tenants[2]) == []

    names = ", ".join(f"'{t.name}'" for t in tenants)
    query = f"SELECT 'database:' || datname FROM pg_database WHERE datname IN ({names}) ORDER BY datname"
    result = run_job("run", env=fleet_env(tmp_path, tenants, MIGRATE_FLEET=query), timeout=300)
    assert result.code == 0
    assert sorted(outcomes(result).items()) == sorted(
        (t.name, "up-to-date" if t in tenants[:2] else "migrated") for t in tenants)
    # CONTRACT.md's form of a query
    result = run_job("run", env=fleet_env(tmp_path, tenants, MIGRATE_FLEET=f"query:{query}"), timeout=300)
    assert result.code == 0 and set(outcomes(result).values()) == {"up-to-date"} and len(outcomes(result)) == 4


@pytest.mark.count(1)
@pytest.mark.parametrize("given, says", [
    ("@/nonexistent/tenants", "cannot read /nonexistent/tenants"),
    ("SELECT nosuchcolumn FROM pg_database", "MIGRATE_FLEET's query failed"),
    ("mysql://u:hunter2@h/db", "unsupported database URL"),
    ("has/slash", "is not a schema name"),
    ("database:has/slash", "is not a database name"),
    ("table:users", "neither a PostgreSQL URL, database:NAME, nor a schema name"),
    (" , ", "names no tenant"),
])
def test_a_fleet_that_cannot_be_read_exits_2_before_anything_runs(tmp_path: Path, tenants: list[Db], given: str,
                                                                 says: str) -> None:
    result = run_job("run", env=fleet_env(tmp_path, tenants, MIGRATE_FLEET=given))
    assert result.code == 2, result.stdout
    assert says in result.failure
    assert "hunter2" not in result.stdout + result.stderr
    assert not result.events("fleet.target") and version(tenants[0]) == []


@pytest.mark.count(1)
def test_names_without_a_database_url_to_find_them_on_exit_2(tmp_path: Path, tenants: list[Db]) -> None:
    env = fleet_env(tmp_path, tenants)
    del env["DATABASE_URL"]
    result = run_job("run", env=env)
    assert result.code == 2 and "set DATABASE_URL" in result.failure


@pytest.mark.count(4)
def test_sigterm_mid_fleet_leaves_every_tenant_clean_and_says_which_were_done(tmp_path: Path,
                                                                              tenants: list[Db]) -> None:
    env = fleet_env(tmp_path, tenants, ALEMBIC_CONFIG=scenario("slow"), SCENARIO_SLEEP="30",
                    MIGRATE_FLEET_PARALLEL="2", MIGRATE_BACKUP="off")
    result = terminated_mid_fleet(env, tmp_path / "out")

    assert result.code == 143, result.stdout[-3000:]
    ended = outcomes(result)
    assert set(ended) == {t.name for t in tenants}
    interrupted = {name for name, outcome in ended.items() if outcome == "interrupted"}
    assert len(interrupted) == 2 and sorted(ended.values()) == ["interrupted"] * 2 + ["not-started"] * 2
    assert {e["exit_code"] for e in result.events("fleet.target") if e["outcome"] == "interrupted"} == {143}
    assert result.event("fleet.done")["exit_code"] == 143
    for tenant in tenants:  # s002 rolled back where it ran; nothing where nothing started; no lock left
        assert version(tenant) == (["s001"] if tenant.name in interrupted else [])
        assert tenant.advisory_locks() == 0
    assert result.lines[-1]["event"] == "run.done"


@pytest.mark.count(5)
def test_an_env_py_that_reads_database_url_itself_migrates_each_tenant(tmp_path: Path, tenants: list[Db]) -> None:
    """Many env.py files build their engine from DATABASE_URL in the environment: in a fleet's run it
    is that run's database, not the one DATABASE_URL names for the fleet."""
    env = fleet_env(tmp_path, tenants, ALEMBIC_CONFIG=scenario("tenant"), MIGRATE_BACKUP="off")
    result = run_job("run", env=env, timeout=300)

    assert result.code == 0, result.stdout[-3000:]
    assert set(outcomes(result).values()) == {"migrated"}
    for tenant in tenants:
        assert version(tenant) == ["t003"]
        assert tenant.query("SELECT count(*) FROM tenant_table_1") == [(100,)]
    assert len(result.events("migration.done")) == 15


@pytest.mark.count(9)
def test_three_shards_of_an_indexed_job_share_the_fleet_each_database_once(tmp_path: Path,
                                                                           tenants: list[Db]) -> None:
    env = fleet_env(tmp_path, tenants, MIGRATE_FLEET_SHARDS="3", MIGRATE_BACKUP="off")
    taken = []
    for index in range(3):
        result = run_job("run", env={**env, "JOB_COMPLETION_INDEX": str(index)}, timeout=300)
        assert result.code == 0, result.stdout[-2000:]
        assert (result.event("fleet.start")["shard"], result.event("fleet.start")["shards"]) == (index, 3)
        taken.append(set(outcomes(result)))
        assert set(outcomes(result).values()) <= {"migrated"}
    assert sum(len(shard) for shard in taken) == 9 and set().union(*taken) == {t.name for t in tenants}
    assert all(version(t) == HEAD for t in tenants)
    # the shards do not depend on the list's order
    reordered = {**env, "MIGRATE_FLEET": ",".join("database:" + t.name for t in reversed(tenants)),
                 "JOB_COMPLETION_INDEX": "1"}
    assert set(outcomes(run_job("run", env=reordered, timeout=300))) == taken[1]


@pytest.mark.count(1)
@pytest.mark.parametrize("index", [None, "3", "-1", "one"])
def test_shards_without_a_completion_index_that_fits_exit_2(tmp_path: Path, tenants: list[Db],
                                                           index: str | None) -> None:
    env = fleet_env(tmp_path, tenants, MIGRATE_FLEET_SHARDS="3")
    if index is not None:
        env["JOB_COMPLETION_INDEX"] = index
    result = run_job("run", env=env)
    assert result.code == 2 and "JOB_COMPLETION_INDEX, 0 to 2" in result.failure
    assert version(tenants[0]) == []


@pytest.mark.count(4)
def test_check_over_a_fleet_says_each_database_and_exits_8_while_any_is_pending(tmp_path: Path,
                                                                              tenants: list[Db]) -> None:
    env = fleet_env(tmp_path, tenants, MIGRATE_BACKUP="off")
    assert run_job("run", env={**env, "MIGRATE_FLEET": ",".join("database:" + t.name for t in tenants[:2])}).code == 0

    checked = run_job("check", env=env)
    assert checked.code == 8, checked.stdout[-2000:]
    assert outcomes(checked) == {**{t.name: "at-target" for t in tenants[:2]}, **{t.name: "pending" for t in tenants[2:]}}
    assert checked.event("fleet.done")["counts"] == {"at-target": 2, "pending": 2}
    assert (tmp_path / "termination-log").read_text().startswith("fleet-pending: 0 of 4 failed; 2 at-target, 2 pending")
    assert [version(t) for t in tenants[2:]] == [[], []]  # (check changes nothing)

    # `check --wait` (the app's init container) returns once the whole fleet is at its target
    out = tmp_path / "check.out"
    waiting = start_logged({**env, "MIGRATE_WAIT_TIMEOUT": "60"}, out, "check", "--wait")
    assert run_job("run", env=env, timeout=300).code == 0
    waited = finish_logged(waiting, out, timeout=90)
    assert waited.code == 0, waited.stdout[-2000:]
    assert set(outcomes(waited).values()) == {"at-target"}

    # --format json: one document for the fleet, every tenant in it (CONTRACT.md: one JSON document)
    report = run_job("check", "--format", "json", env=env)
    assert report.code == 0 and report.stderr.count("fleet.target") == len(tenants)
    document = json.loads(report.stdout)
    assert document["at_target"] is True and {t["tenant"] for t in document["tenants"]} == {t.name for t in tenants}
    assert {(t["outcome"], tuple(t["current"]), t["pending"] == []) for t in document["tenants"]} == {
        ("at-target", tuple(HEAD), True)}


def test_each_database_of_a_fleet_gets_its_password_from_the_password_file(password_cluster, tmp_path: Path) -> None:
    """Names on DATABASE_URL's server, DATABASE_URL without a password, the password in a mounted
    file (job.credentials): every database's run, and the env.py engine it builds, connects with it."""
    from tests.conftest import SECRET

    names = [f"pf_{uuid.uuid4().hex[:12]}" for _ in range(3)]
    for name in names:
        password_cluster.psql(f'CREATE DATABASE "{name}" OWNER app')
    try:
        secret = tmp_path / "password"
        secret.write_text(SECRET)
        env = base_env(DATABASE_URL=f"postgresql://app@127.0.0.1:{password_cluster.port}/{names[0]}",
                       DATABASE_PASSWORD_FILE=str(secret), MIGRATE_FLEET=" ".join("database:" + name for name in names),
                       ALEMBIC_CONFIG=scenario("tenant"), MIGRATE_BACKUP="off", MIGRATE_WAIT_TIMEOUT="10")
        result = run_job("run", env=env, timeout=300)
        assert result.code == 0, result.stdout[-2000:]
        assert outcomes(result) == {name: "migrated" for name in names}
        assert SECRET not in result.stdout + result.stderr
    finally:
        for name in names:
            password_cluster.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
