"""Revisions that end their own transaction (CREATE INDEX CONCURRENTLY and its idioms), with the
stock env.py (its own engine) and the cookbook's shared connection: they reach head, are reported
only once committed, keep one history row each, and a failure is completed by a plain re-run."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.conftest import Db, create_database, drop_database, start_logged, ADMIN_URL
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
    return db.query("SELECT revision, outcome FROM migrate_job.migrate_job_history WHERE kind = 'revision' ORDER BY id")


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


# Shapes that commit part of their work before they end (a failure after the commit leaves it
# behind), as real projects wrote them: PyPI's warehouse (68a00c174ba5: indexes, then commit(),
# then an autocommit_block() with CREATE INDEX CONCURRENTLY), an autocommit_block() with one more
# statement, two statements after a literal COMMIT.
WAREHOUSE = ('op.create_index("users_email_plain", "users", ["email"])\n'
             '    op.get_bind().commit()\n'
             '    with op.get_context().autocommit_block():\n'
             '        op.create_index("users_display_name", "users", ["display_name"], unique=True,\n'
             '                        postgresql_concurrently=True)')
TWO_IN_AUTOCOMMIT = ('with op.get_context().autocommit_block():\n'
                     '        op.execute("CREATE UNIQUE INDEX CONCURRENTLY users_display_name ON users (display_name)")\n'
                     '        op.execute("ANALYZE users")')
TWO_AFTER_COMMIT = ('op.execute("COMMIT")\n'
                    '    op.execute("CREATE UNIQUE INDEX CONCURRENTLY users_display_name ON users (display_name)")\n'
                    '    op.execute("ANALYZE users")')
NONATOMIC = {"warehouse": WAREHOUSE, "two-in-autocommit-block": TWO_IN_AUTOCOMMIT, "two-after-commit": TWO_AFTER_COMMIT}


def warehouse_env_py(project: Path) -> None:
    """warehouse/migrations/env.py's shape: its own engine and transaction, session timeouts and an
    advisory lock of its own, and a commit of its own after run_migrations (without which bare
    Alembic would lose what follows a revision's commit())."""
    env_py = project / "migrations" / "env.py"
    text = env_py.read_text()
    start = text.index("def run_migrations_online() -> None:")
    end = text.index("if context.is_offline_mode():")
    env_py.write_text(text[:start] + '''def run_migrations_online() -> None:
    from sqlalchemy import create_engine, text
    connectable = create_engine(config.get_main_option("sqlalchemy.url"), poolclass=pool.NullPool)
    with connectable.connect() as connection:
        connection.execute(text("SET lock_timeout = 4000"))
        context.configure(connection=connection, target_metadata=target_metadata, transaction_per_migration=True)
        with context.begin_transaction():
            connection.execute(text("SELECT pg_advisory_lock(hashtext('alembic'))"))
            context.run_migrations()
            context.get_bind().commit()
            connection.execute(text("SELECT pg_advisory_unlock(hashtext('alembic'))"))


''' + text[end:])


WAREHOUSE_SHAPE = Shape("generic", "postgresql", warehouse_env_py)
NONATOMIC_ENV_PY = {**ENV_PY, "warehouse-env-py": WAREHOUSE_SHAPE}


# each shape with the env.py shapes bare Alembic runs it with to head (an autocommit_block() first
# thing fails under bare Alembic in warehouse's env.py, which holds a transaction of its own)
CASES = [(b004, env_py) for b004 in NONATOMIC for env_py in NONATOMIC_ENV_PY
         if env_py != "warehouse-env-py" or b004 == "warehouse"]


def reference_shape(b004: str) -> Shape:
    """The env.py bare Alembic runs `b004` with: warehouse's own for its idiom, the stock template's else."""
    return WAREHOUSE_SHAPE if b004 == "warehouse" else ENV_PY["own-engine"]


@pytest.mark.parametrize(("b004", "env_py"), CASES)
def test_a_history_that_commits_before_its_end_runs_as_bare_alembic_runs_it(
        env_py: str, b004: str, db: Db, env: dict[str, str], tmp_path: Path) -> None:
    """Never refused: it reaches head with the schema bare Alembic makes of the same files, after a
    `migration.nonatomic` warning naming the revision, before anything ran."""
    shape = NONATOMIC_ENV_PY[env_py]
    project = project_with(shape, tmp_path / "job", NONATOMIC[b004])

    result = run_job("run", env=job_env(env, db, shape, project), cwd=project)

    assert (0, ["b005"]) == (result.code, db.version()), result.stdout[-2000:]
    (warning,) = result.events("migration.nonatomic")
    assert "b004" == warning["revision"] and result.names.index("migration.nonatomic") < result.names.index(
        "migration.start")
    assert [(f"b00{i}", "applied") for i in range(1, 6)] == history_rows(db)
    rerun = run_job("run", env=job_env(env, db, shape, project), cwd=project)
    assert (0, "up-to-date") == (rerun.code, rerun.event("run.done")["outcome"])
    reference = create_database(ADMIN_URL, prefix="ref")
    try:
        bare = reference_shape(b004)
        bare_alembic_upgrade(bare, reference, tmp_path / "bare", edit=lambda where: project_with(bare, where, NONATOMIC[b004]))
        assert ["b005"] == reference.version()
        assert schema(reference) == schema(db)
    finally:
        drop_database(reference)


def duplicate_display_names(db: Db, env: dict[str, str], shape: Shape, project: Path, tmp_path: Path) -> None:
    """The project at b003 with two users of the same display name: b004's unique index will fail."""
    versions = tmp_path / "blog_versions"
    for name in ("b004_ends_its_transaction.py", "b005_later.py"):
        (versions / name).rename(tmp_path / name)
    assert 0 == run_job("run", env=job_env(env, db, shape, project), cwd=project).code
    db.query("INSERT INTO users (email, display_name) VALUES ('a@x', 'same'), ('b@y', 'same')")
    for name in ("b004_ends_its_transaction.py", "b005_later.py"):
        (tmp_path / name).rename(versions / name)


# b004 shapes whose unique index fails on duplicates after the revision committed something
FAILING_AFTER_COMMIT = {
    "warehouse": WAREHOUSE,
    "two-after-commit": ('op.execute("COMMIT")\n'
                         '    op.execute("CREATE INDEX CONCURRENTLY users_email_plain ON users (email)")\n'
                         '    op.execute("CREATE UNIQUE INDEX CONCURRENTLY users_display_name ON users (display_name)")'),
}


@pytest.mark.parametrize("b004", FAILING_AFTER_COMMIT)
def test_a_failure_after_the_commit_says_what_stayed_and_the_restore_brings_it_back(
        b004: str, db: Db, env: dict[str, str], tmp_path: Path) -> None:
    """Exit 6 naming what the revision committed and the restore of this run's backup, never retried
    over it; that restore and a plain re-run, once the data is fixed, reach head."""
    shape = reference_shape(b004)
    project = project_with(shape, tmp_path, FAILING_AFTER_COMMIT[b004])
    environment = job_env(env, db, shape, project)
    duplicate_display_names(db, env, shape, project, tmp_path)

    failed = run_job("run", env=environment, cwd=project)

    error = failed.event("run.failed")["error"]
    backup = Path(failed.event("backup.done")["path"]).name
    assert (6, ["b003"], []) == (failed.code, db.version(), failed.events("migration.retry")), failed.stdout[-2000:]
    assert "revision b004" in error and "had committed part of its work" in error
    assert f"migrate-job restore {backup} --yes" in error
    assert "users_email_plain ON users (email)" in error and "users_display_name" not in error.split(
        "had committed part of its work")[1].split("To recover")[0]
    assert [("users_email_plain",)] == db.query("SELECT indexname FROM pg_indexes WHERE indexname = 'users_email_plain'")

    restored = run_job("restore", backup, "--yes", env=environment, cwd=project)
    assert (0, ["b003"], []) == (restored.code, db.version(), db.query(
        "SELECT indexname FROM pg_indexes WHERE indexname = 'users_email_plain'")), restored.stdout[-1000:]
    db.query("UPDATE users SET display_name = email")
    rerun = run_job("run", env=environment, cwd=project)
    assert (0, ["b005"]) == (rerun.code, db.version()), rerun.stdout[-1000:]


def test_a_failure_after_the_commit_on_a_database_that_held_nothing_says_to_start_it_over(
        db: Db, env: dict[str, str], tmp_path: Path) -> None:
    """A first deploy is not backed up (nothing to restore): the error says to empty the database and run again."""
    b004 = ('op.create_index("users_email_plain", "users", ["email"])\n    op.get_bind().commit()\n'
            '    op.execute("CREATE INDEX CONCURRENTLY users_nowhere ON nowhere (id)")')
    project = project_with(WAREHOUSE_SHAPE, tmp_path, b004)

    failed = run_job("run", env=job_env(env, db, WAREHOUSE_SHAPE, project), cwd=project)

    error = failed.event("run.failed")["error"]
    assert (6, ["b003"], []) == (failed.code, db.version(), failed.events("backup.done")), failed.stdout[-2000:]
    assert "users_email_plain" in error and "held nothing of its own before this run" in error


def test_lint_flags_the_shape_in_new_revisions_only(env: dict[str, str], tmp_path: Path) -> None:
    """`lint --all` names a revision that commits part of its work (nonatomic-revision); with
    MIGRATE_LINT_START_AFTER at it (history that already ran), it and what it stands on are not checked."""
    project = project_with(ENV_PY["own-engine"], tmp_path, TWO_IN_AUTOCOMMIT)
    lint_env = {**env, "ALEMBIC_CONFIG": str(project / "alembic.ini")}

    flagged = run_job("lint", "--all", env=lint_env, cwd=project)
    since = run_job("lint", "--all", env={**lint_env, "MIGRATE_LINT_START_AFTER": "b004"}, cwd=project)

    assert (10, [("b004", "nonatomic-revision")]) == (flagged.code, [
        (f["revision"], f["rule"]) for f in flagged.events("lint.finding") if f["rule"] == "nonatomic-revision"])
    assert {f["revision"] for f in since.events("lint.finding")} <= {"b005"}
    assert 1 == since.event("lint.done")["revisions"]
    unknown = run_job("lint", "--all", env={**lint_env, "MIGRATE_LINT_START_AFTER": "nope"}, cwd=project)
    assert (2, True) == (unknown.code, "MIGRATE_LINT_START_AFTER" in unknown.event("run.failed")["error"])


def test_a_revision_that_needs_a_database_to_be_written_out_is_named(db: Db, env: dict[str, str],
                                                                    tmp_path: Path) -> None:
    """Offline SQL (`plan --sql`, `lint`) of warehouse's commit() on the connection, or of a revision
    reading rows through get_bind(): exit 2 naming the revision, no traceback; lint of what comes
    after history (MIGRATE_LINT_START_AFTER) is unaffected."""
    reads = 'count = op.get_bind().execute(sa.text("SELECT count(*) FROM users")).scalar()\n    print(count)'
    for body in (WAREHOUSE, reads):
        project = project_with(WAREHOUSE_SHAPE, tmp_path / str(len(body)), body)
        job = job_env(env, db, WAREHOUSE_SHAPE, project)
        for argv in (("plan", "--sql"), ("lint", "--all")):
            result = run_job(*argv, env=job, cwd=project)
            error = result.failure
            assert (2, True, "traceback" not in error) == (
                result.code, error.startswith("revision b004 cannot be written out as SQL"), True), error
        assert 2 != run_job("lint", "--all", env={**job, "MIGRATE_LINT_START_AFTER": "b004"}, cwd=project).code


# --- a run killed in the middle of a revision that commits on its own ---------------------------------

def _killed_while(db: Db, environment: dict[str, str], project: Path, tmp_path: Path, blocker_sql: str,
                  waiting: str) -> None:
    """Run the job on b004 while another session (`blocker_sql`, left open) makes its `waiting`
    statement wait; then kill it outright, as SIGKILL or a lost node would: the job process, then
    its sessions (the server would end them when their sockets close). The blocker then ends."""
    blocker = db.connect()
    blocker.autocommit = False
    with blocker.cursor() as cur:
        cur.execute(blocker_sql)
    proc = start_logged(environment, tmp_path / "killed.log", cwd=project)
    deadline = time.monotonic() + 30
    while not db.query("SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND wait_event_type = 'Lock' "
                       "AND query LIKE %s", (db.name, waiting))[0][0]:
        assert time.monotonic() < deadline and proc.poll() is None, (tmp_path / "killed.log").read_text()[-2000:]
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    db.query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> %s "
             "AND pid <> pg_backend_pid()", (db.name, blocker.get_backend_pid()))
    blocker.rollback()
    blocker.close()


def _migrated_to_b003(environment: dict[str, str], project: Path, tmp_path: Path) -> None:
    """The database at b003: b004 (which ends its transaction) and b005 held back for that run."""
    versions = tmp_path / "blog_versions"
    for name in ("b004_ends_its_transaction.py", "b005_later.py"):
        (versions / name).rename(tmp_path / name)
    assert 0 == run_job("run", env=environment, cwd=project).code
    for name in ("b004_ends_its_transaction.py", "b005_later.py"):
        (tmp_path / name).rename(versions / name)


@pytest.mark.parametrize("env_py", ENV_PY)
def test_a_run_killed_while_it_built_an_index_concurrently_is_completed_by_a_plain_rerun(
        env_py: str, db: Db, env: dict[str, str], tmp_path: Path) -> None:
    """Killed while its CREATE INDEX CONCURRENTLY waited for an older snapshot: the INVALID index
    stays, with no version row. The next run knows (the history row the killed run began), drops
    that index and reaches head, every index valid."""
    shape = ENV_PY[env_py]
    project = project_with(shape, tmp_path, EXECUTE_COMMIT)
    environment = job_env(env, db, shape, project)
    _migrated_to_b003(environment, project, tmp_path)

    _killed_while(db, environment, project, tmp_path, "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ; SELECT 1",
                  "CREATE UNIQUE INDEX CONCURRENTLY%")
    assert (["b003"], [("users_display_name",)]) == (db.version(), db.query(
        "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid WHERE NOT i.indisvalid"))

    rerun = run_job("run", env=environment, cwd=project)

    assert (0, ["b005"]) == (rerun.code, db.version()), rerun.stdout[-2000:]
    assert "b004" == rerun.event("migration.interrupted_before")["revision"]
    assert ["public.users_display_name"] == rerun.event("migration.cleanup")["dropped"]
    assert [(True,)] == db.query("SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                                 "WHERE c.relname = 'users_display_name'")


def test_a_run_killed_after_its_index_was_built_but_before_its_version_row_says_so(
        db: Db, env: dict[str, str], tmp_path: Path) -> None:
    """Killed once its CREATE INDEX CONCURRENTLY had committed, while its version row waited: the
    index is there and valid, the database at b003. The re-run cannot tell that index from one
    someone else made: exit 6 naming the revision, the killed run and what to do; nothing dropped."""
    shape = ENV_PY["own-engine"]
    project = project_with(shape, tmp_path, AUTOCOMMIT_BLOCK)
    environment = {**job_env(env, db, shape, project), "MIGRATE_STATEMENT_LOCK_TIMEOUT": "120"}
    _migrated_to_b003(environment, project, tmp_path)

    # (a read-committed transaction holds no snapshot between statements: the index builds, the version row waits)
    _killed_while(db, environment, project, tmp_path, "SELECT * FROM alembic_version FOR UPDATE", "UPDATE alembic_version%")
    assert ["b003"] == db.version()

    rerun = run_job("run", env=environment, cwd=project)

    error = rerun.event("run.failed")["error"]
    assert (6, ["b003"]) == (rerun.code, db.version()), rerun.stdout[-2000:]
    assert "b004" in error and "was killed before its version row committed" in error and "already exists" in error
    assert [(True,)] == db.query("SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                                 "WHERE c.relname = 'users_display_name'")
