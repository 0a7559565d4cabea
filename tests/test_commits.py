"""Revisions that end their own transaction (CREATE INDEX CONCURRENTLY and its idioms), with the
stock env.py (its own engine) and the cookbook's shared connection: they reach head, are reported
only once committed, keep one history row each, and a failure is completed by a plain re-run."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import Db, create_database, drop_database, ADMIN_URL
from tests.test_env_sessions import REVISION
from tests.test_projects import SHAPES, Shape, bare_alembic_upgrade, make_project, run_job, schema, url_for

pytestmark = pytest.mark.faults

ENV_PY = {"own-engine": SHAPES["sync-template-psycopg2"], "shared-connection": SHAPES["sync-cookbook-shared-connection"]}

COMMIT_FIRST = ('op.get_bind().commit()\n    op.create_table("tags", sa.Column("name", sa.Text, primary_key=True))\n'
                '    op.add_column("users", sa.Column("nickname", sa.Text))')
AUTOCOMMIT_BLOCK = ('with op.get_context().autocommit_block():\n'
                    '        op.create_index("users_display_name", "users", ["display_name"], unique=True,\n'
                    '                        postgresql_concurrently=True)')
EXECUTE_COMMIT = ('op.execute("COMMIT")\n'
                  '    op.execute("CREATE UNIQUE INDEX CONCURRENTLY users_display_name ON users (display_name)")')
AFTER = 'op.create_table("later", sa.Column("id", sa.Integer, primary_key=True))'


def project_with(shape: Shape, where: Path, b004: str) -> Path:
    """The shape's project with b004 (`b004` as its upgrade) and b005 (a plain revision) after the blog's three."""
    project = make_project(shape, where)
    versions = where / "blog_versions"
    (versions / "b004_ends_its_transaction.py").write_text(REVISION.format(doc="ends its transaction", body=b004))
    (versions / "b005_later.py").write_text(
        REVISION.format(doc="later", body=AFTER).replace("b004", "b005").replace('"b003"', '"b004"')
        .replace("Revises: b003", "Revises: b004"))
    return project


def job_env(env: dict[str, str], db: Db, shape: Shape, project: Path) -> dict[str, str]:
    return {**env, "DATABASE_URL": url_for(db, shape.scheme), "ALEMBIC_CONFIG": str(project / "alembic.ini")}


def history_rows(db: Db) -> list[tuple[str, str]]:
    return db.query("SELECT revision, outcome FROM migrate_job_history WHERE kind = 'revision' ORDER BY id")


@pytest.mark.parametrize("env_py", ENV_PY)
@pytest.mark.parametrize("b004", [COMMIT_FIRST, AUTOCOMMIT_BLOCK, EXECUTE_COMMIT], ids=["commit-first", "autocommit-block", "execute-commit"])
def test_a_revision_that_ends_its_transaction_reaches_head(env_py: str, b004: str, db: Db, env: dict[str, str],
                                                         tmp_path: Path) -> None:
    """Each safe idiom reaches head with the schema of the same revision written without it, one history row each."""
    shape = ENV_PY[env_py]
    project = project_with(shape, tmp_path / "job", b004)

    result = run_job("run", env=job_env(env, db, shape, project), cwd=project)

    assert (0, ["b005"]) == (result.code, db.version()), result.stdout[-1000:]
    assert ["b001", "b002", "b003", "b004", "b005"] == [e["revision"] for e in result.events("migration.done")]
    assert [(f"b00{i}", "applied") for i in range(1, 6)] == history_rows(db)
    without_idiom = (b004.replace("op.get_bind().commit()\n    ", "").replace('op.execute("COMMIT")\n    ', "")
                     .replace("INDEX CONCURRENTLY", "INDEX"))
    if "autocommit_block" in without_idiom:
        without_idiom = 'op.create_index("users_display_name", "users", ["display_name"], unique=True)'
    reference = create_database(ADMIN_URL, prefix="ref")
    try:
        bare_alembic_upgrade(shape, reference, tmp_path / "bare", edit=lambda where: project_with(shape, where, without_idiom))
        assert schema(reference) == schema(db)
    finally:
        drop_database(reference)


@pytest.mark.parametrize("env_py", ENV_PY)
@pytest.mark.parametrize("b004", [AUTOCOMMIT_BLOCK, EXECUTE_COMMIT], ids=["autocommit-block", "execute-commit"])
def test_a_failure_outside_a_transaction_is_completed_by_a_plain_rerun(env_py: str, b004: str, db: Db,
                                                                      env: dict[str, str], tmp_path: Path) -> None:
    """A CREATE UNIQUE INDEX CONCURRENTLY that fails leaves no INVALID index: after the data is fixed, a re-run completes."""
    shape = ENV_PY[env_py]
    project = project_with(shape, tmp_path, b004)
    environment = job_env(env, db, shape, project)
    (tmp_path / "blog_versions" / "b004_ends_its_transaction.py").rename(tmp_path / "b004.hold")
    (tmp_path / "blog_versions" / "b005_later.py").rename(tmp_path / "b005.hold")
    assert 0 == run_job("run", env=environment, cwd=project).code
    db.query("INSERT INTO users (email, display_name) VALUES ('a@x', 'same'), ('b@y', 'same')")
    (tmp_path / "b004.hold").rename(tmp_path / "blog_versions" / "b004_ends_its_transaction.py")
    (tmp_path / "b005.hold").rename(tmp_path / "blog_versions" / "b005_later.py")

    failed = run_job("run", env=environment, cwd=project)

    assert (6, "b004", ["b003"]) == (failed.code, failed.event("run.failed")["error"].split()[1], db.version())
    assert ["public.users_display_name"] == failed.event("migration.cleanup")["dropped"]
    assert [] == db.query("SELECT indexrelid FROM pg_index WHERE NOT indisvalid")
    db.query("UPDATE users SET display_name = email")
    rerun = run_job("run", env=environment, cwd=project)
    assert (0, ["b005"]) == (rerun.code, db.version()), rerun.stdout[-800:]


@pytest.mark.parametrize("b004", [
    'op.add_column("users", sa.Column("nickname", sa.Text))\n    op.get_bind().commit()\n    op.execute("SELECT 1")',
    'with op.get_context().autocommit_block():\n        op.execute("CREATE INDEX CONCURRENTLY a ON users (email)")\n'
    '        op.execute("CREATE INDEX CONCURRENTLY b ON users (display_name)")',
    'op.execute("COMMIT")\n    op.execute("CREATE INDEX CONCURRENTLY a ON users (email)")\n    op.execute("SELECT 1")',
], ids=["work-before-commit", "two-statements-in-autocommit", "two-statements-after-commit"])
def test_a_shape_a_rerun_could_not_complete_is_refused_before_anything_runs(b004: str, db: Db, env: dict[str, str],
                                                                            tmp_path: Path) -> None:
    """Exit 2 naming the revision and what to write instead; no revision ran, no backup was taken."""
    shape = ENV_PY["own-engine"]
    project = project_with(shape, tmp_path, b004)
    db.holds_data()

    result = run_job("run", env=job_env(env, db, shape, project), cwd=project)

    error = result.event("run.failed")["error"]
    assert (2, True, True) == (result.code, "revision b004 cannot be run safely" in error, "autocommit_block" in error)
    assert ([], [], []) == (db.version(), result.events("migration.start"), result.events("backup.done"))
