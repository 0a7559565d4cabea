"""`alembic init -t multidb`: env.py migrates two databases. Listed in MIGRATE_DATABASES, each is
locked and backed up before its first change and reported by status and check; a database env.py
reaches that is not listed is refused before anything changes."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from tests.conftest import ADMIN_URL, Db, create_database, drop_database, run_job
from tests.test_projects import ALEMBIC, schema

pytestmark = pytest.mark.faults

REVISION = '''"""{doc}

Revision ID: {rev}
Revises: {down}
"""

import sqlalchemy as sa
from alembic import op

revision = "{rev}"
down_revision = {down_repr}
branch_labels = None
depends_on = None


def upgrade(engine_name: str) -> None:
    globals()["upgrade_%s" % engine_name]()


def downgrade(engine_name: str) -> None:
    globals()["downgrade_%s" % engine_name]()


def upgrade_engine1() -> None:
    {up1}


def downgrade_engine1() -> None:
    {down1}


def upgrade_engine2() -> None:
    {up2}


def downgrade_engine2() -> None:
    {down2}
'''


@pytest.fixture
def second_db() -> Iterator[Db]:
    database = create_database(ADMIN_URL, prefix="m2")
    yield database
    drop_database(database)


def multidb_project(where: Path) -> Path:
    """`alembic init -t multidb` with two revisions, each changing both databases."""
    where.mkdir(parents=True)
    subprocess.run([ALEMBIC, "init", "-t", "multidb", "migrations"], cwd=where, check=True, capture_output=True)
    versions = where / "migrations" / "versions"
    (versions / "m001.py").write_text(REVISION.format(
        doc="accounts, and their audit log", rev="m001", down="", down_repr=None,
        up1='op.create_table("accounts", sa.Column("id", sa.Integer, primary_key=True))',
        down1='op.drop_table("accounts")',
        up2='op.create_table("audit_log", sa.Column("id", sa.Integer, primary_key=True))',
        down2='op.drop_table("audit_log")'))
    (versions / "m002.py").write_text(REVISION.format(
        doc="names", rev="m002", down="m001", down_repr='"m001"',
        up1='op.add_column("accounts", sa.Column("name", sa.Text))', down1='op.drop_column("accounts", "name")',
        up2='op.add_column("audit_log", sa.Column("what", sa.Text))', down2='op.drop_column("audit_log", "what")'))
    return where


def version(db: Db) -> list[str]:
    return db.version()


def test_every_database_is_locked_backed_up_and_migrated(db: Db, second_db: Db, env: dict[str, str],
                                                         tmp_path: Path) -> None:
    """Both databases are backed up before the first change, migrated, then re-run, checked, reported, downgraded."""
    project = multidb_project(tmp_path / "project")
    db.holds_data(), second_db.holds_data()
    job_env = {**env, "ALEMBIC_CONFIG": str(project / "alembic.ini"),
               "MIGRATE_DATABASES": f"engine1 engine2={second_db.url}"}

    first = run_job("run", env=job_env, cwd=project)

    assert 0 == first.code, first.stdout[-1500:]
    assert (["m002"], ["m002"]) == (version(db), version(second_db))
    assert ["accounts", "audit_log"] == sorted(t for t in db.tables() | second_db.tables() if t in ("accounts", "audit_log"))
    backups = [json.loads(Path(e["path"] + ".json").read_text())["database"] for e in first.events("backup.done")]
    assert sorted([db.name, second_db.name]) == sorted(backups)
    names = first.names
    assert max(i for i, n in enumerate(names) if n == "backup.done") < names.index("migration.start")
    assert 2 == len(first.events("lock.acquired"))
    assert ["m001", "m002"] == [e["revision"] for e in first.events("migration.done")]

    again = run_job("run", env=job_env, cwd=project)
    assert (0, [], []) == (again.code, again.events("migration.start"), again.events("backup.done"))
    assert 0 == run_job("check", env=job_env, cwd=project).code
    report = json.loads(run_job("status", "--format", "json", env=job_env, cwd=project).stdout)
    assert [{"section": "engine2", "current": ["m002"]}] == report["databases"]

    assert 0 == run_job("downgrade", "-1", "--yes", env=job_env, cwd=project).code
    assert (["m001"], ["m001"]) == (version(db), version(second_db))
    assert 8 == run_job("check", env=job_env, cwd=project).code
    assert 0 == run_job("run", env=job_env, cwd=project).code
    assert (["m002"], ["m002"]) == (version(db), version(second_db))


def test_check_sees_a_database_left_behind(db: Db, second_db: Db, env: dict[str, str], tmp_path: Path) -> None:
    """check is pending while any listed database is behind, even if DATABASE_URL's is at head."""
    project = multidb_project(tmp_path / "project")
    job_env = {**env, "ALEMBIC_CONFIG": str(project / "alembic.ini"),
               "MIGRATE_DATABASES": f"engine1 engine2={second_db.url}"}
    assert 0 == run_job("run", env=job_env, cwd=project).code
    second_db.query("UPDATE alembic_version SET version_num = 'm001'")

    assert 8 == run_job("check", env=job_env, cwd=project).code


def urls_in_the_ini(project: Path, first: Db, second: Db) -> Path:
    """The template's two `sqlalchemy.url = driver://...` placeholders set to the databases, as a user
    must for bare `alembic upgrade head` to work at all."""
    ini = project / "alembic.ini"
    text = ini.read_text()
    text = re.sub(r"(?m)^sqlalchemy\.url = driver://user:pass@localhost/dbname$", f"sqlalchemy.url = {first.url}", text)
    text = re.sub(r"(?m)^sqlalchemy\.url = driver://user:pass@localhost/dbname2$", f"sqlalchemy.url = {second.url}", text)
    ini.write_text(text)
    return ini


@pytest.mark.parametrize("database_url", ["given", "unset"])
def test_the_unchanged_template_needs_only_its_own_databases_list(database_url: str, db: Db, second_db: Db,
                                                                   env: dict[str, str], tmp_path: Path) -> None:
    """`databases = engine1, engine2` and each section's URL, as the project already says them: both
    databases reach head as bare Alembic leaves them, a re-run is a no-op; DATABASE_URL may name the
    first or be left out."""
    project = multidb_project(tmp_path / "project")
    ini = urls_in_the_ini(project, db, second_db)
    job_env = {**env, "ALEMBIC_CONFIG": str(ini)}
    if database_url == "unset":
        del job_env["DATABASE_URL"]

    first = run_job("run", env=job_env, cwd=project)

    assert (0, ["m002"], ["m002"]) == (first.code, version(db), version(second_db)), first.stdout[-1500:]
    assert ([], 2) == (first.events("migration.retry"), len(first.events("lock.acquired")))
    again = run_job("run", env=job_env, cwd=project)
    assert (0, []) == (again.code, again.events("migration.start"))
    bare_one, bare_two = create_database(ADMIN_URL, prefix="r1"), create_database(ADMIN_URL, prefix="r2")
    try:
        bare = multidb_project(tmp_path / "bare")
        urls_in_the_ini(bare, bare_one, bare_two)
        subprocess.run([ALEMBIC, "upgrade", "head"], cwd=bare, check=True, capture_output=True)
        assert (schema(bare_one), schema(bare_two)) == (schema(db), schema(second_db))
    finally:
        drop_database(bare_one), drop_database(bare_two)


def test_two_sections_naming_one_database_are_refused_before_anything_changes(db: Db, second_db: Db,
                                                                             env: dict[str, str], tmp_path: Path) -> None:
    """MIGRATE_DATABASES="engine1 engine2" (both DATABASE_URL's), or two spellings of one database:
    exit 2 naming the sections, no lock wait, nothing changed."""
    project = multidb_project(tmp_path / "project")
    ini = urls_in_the_ini(project, db, second_db)
    same = db.url.replace("127.0.0.1", "localhost")
    for setting in ("engine1 engine2", f"engine1 engine2={same}"):
        result = run_job("run", env={**env, "ALEMBIC_CONFIG": str(ini), "MIGRATE_DATABASES": setting}, cwd=project)

        error = result.event("run.failed")["error"]
        assert (2, True, []) == (result.code, "'engine2'" in error, result.events("migration.start")), error
        assert ([], []) == (version(db), version(second_db))


def test_a_database_not_listed_is_refused_before_anything_changes(db: Db, second_db: Db, env: dict[str, str],
                                                                  tmp_path: Path) -> None:
    """MIGRATE_DATABASES lists engine1 only, while env.py reaches engine2's database (its URL in
    alembic.ini): the unlisted database is refused, exit 2, nothing changed."""
    project = multidb_project(tmp_path / "project")
    ini = urls_in_the_ini(project, db, second_db)

    result = run_job("run", env={**env, "ALEMBIC_CONFIG": str(ini), "MIGRATE_DATABASES": "engine1"}, cwd=project)

    error = result.event("run.failed")["error"]
    assert (2, True, True) == (result.code, repr(second_db.name) in error, "MIGRATE_DATABASES" in error)
    assert ([], []) == (version(db), version(second_db))
