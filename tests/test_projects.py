"""Users' own Alembic projects, as `alembic init` and the cookbook make them, in every driver.

Each project is made by the installed Alembic's own `alembic init -t TEMPLATE`, then changed only
as its shape says (an edit below, and the files in its tests/scenarios/ folder); they share the
three revisions in tests/scenarios/blog_versions/. Each must migrate empty → head, re-run as a
no-op, pass `check`, report in `status`, go down one revision and back, and end with the schema
bare `alembic upgrade head` gives on a second database.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Callable, NamedTuple

import alembic
import pytest

from tests.conftest import ADMIN_URL, MIGRATE_JOB, SCENARIOS, Db, create_database, drop_database, run_job

ALEMBIC = str(Path(MIGRATE_JOB).parent / "alembic")
# the job's own schema, which bare Alembic does not make
JOB_SCHEMA = "migrate_job"
SHARED_VERSIONS = "%(here)s/../blog_versions"
# a revision after the shared three, b004, doing `body`
REVISION = '''"""{doc}

Revision ID: b004
Revises: b003
"""

import sqlalchemy as sa
from alembic import op

revision = "b004"
down_revision = "b003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    {body}


def downgrade() -> None:
    pass
'''


def replace(path: Path, old: str, new: str) -> None:
    """Edit a template file as a user would; a template that changed under us fails loudly."""
    text = path.read_text()
    assert old in text, f"{path.name} no longer contains {old!r}"
    path.write_text(text.replace(old, new, 1))


def set_options(ini: Path, **options: str) -> None:
    """Set options in alembic.ini's [alembic] section (replacing the template's line, if any)."""
    text = ini.read_text()
    for key, value in options.items():
        text, found = re.subn(rf"(?m)^{key} = .*$", lambda _: f"{key} = {value}", text)
        if not found:
            text = text.replace("[alembic]\n", f"[alembic]\n{key} = {value}\n", 1)
    ini.write_text(text)


def share_the_connection(project: Path) -> None:
    """Alembic's cookbook, "Programmatic API use (connection sharing) With Asyncio"."""
    replace(project / "migrations" / "env.py", "    asyncio.run(run_async_migrations())\n",
            '    connectable = config.attributes.get("connection", None)\n\n'
            "    if connectable is None:\n        asyncio.run(run_async_migrations())\n"
            "    else:\n        do_run_migrations(connectable)\n")


def share_the_connection_sync(project: Path) -> None:
    """Alembic's cookbook, "Sharing a Connection across one or more programmatic migration commands"."""
    replace(project / "migrations" / "env.py", "    connectable = engine_from_config(",
            '    connectable = config.attributes.get("connection", None)\n'
            "    if connectable is not None:\n"
            "        context.configure(connection=connectable, target_metadata=target_metadata)\n"
            "        with context.begin_transaction():\n            context.run_migrations()\n"
            "        return\n\n"
            "    connectable = engine_from_config(")


def version_table_in_code(project: Path) -> None:
    """The version table in the app's own schema, under its own name: set in env.py, not alembic.ini."""
    env_py = project / "migrations" / "env.py"
    replace(env_py, "from sqlalchemy import pool\n", "from sqlalchemy import pool\nfrom sqlalchemy import text\n")
    replace(env_py, "target_metadata = None\n",
            'target_metadata = None\nVERSION_TABLE = dict(version_table="schema_version", version_table_schema="app")\n')
    replace(env_py, '        dialect_opts={"paramstyle": "named"},\n',
            '        dialect_opts={"paramstyle": "named"},\n        **VERSION_TABLE,\n')
    replace(env_py, "            connection=connection, target_metadata=target_metadata\n",
            "            connection=connection, target_metadata=target_metadata, **VERSION_TABLE\n")
    replace(env_py, "        context.configure(\n            connection=connection,",
            '        connection.execute(text("CREATE SCHEMA IF NOT EXISTS app"))\n        connection.commit()\n'
            "        context.configure(\n            connection=connection,")


def own_engine(project: Path) -> None:
    """The app's own settings name the database, as in many FastAPI projects; alembic.ini's URL
    (which migrate-job fills in) only when they do not."""
    env_py = project / "migrations" / "env.py"
    replace(env_py, "from sqlalchemy import engine_from_config\n", "import os\n\nfrom sqlalchemy import create_engine\n")
    replace(env_py, '    connectable = engine_from_config(\n        config.get_section(config.config_ini_section, {}),\n'
                    '        prefix="sqlalchemy.",\n',
            '    connectable = create_engine(\n'
            '        os.environ.get("APP_DATABASE_URL") or config.get_main_option("sqlalchemy.url"),\n')


def own_async_engine(project: Path) -> None:
    """The same, in the async template: an AsyncEngine from the app's own settings."""
    env_py = project / "migrations" / "env.py"
    replace(env_py, "from sqlalchemy.ext.asyncio import async_engine_from_config\n",
            "import os\n\nfrom sqlalchemy.ext.asyncio import create_async_engine\n")
    replace(env_py, '    connectable = async_engine_from_config(\n        config.get_section(config.config_ini_section, {}),\n'
                    '        prefix="sqlalchemy.",\n',
            '    connectable = create_async_engine(\n'
            '        os.environ.get("APP_DATABASE_URL") or config.get_main_option("sqlalchemy.url"),\n')


def imports_noisy_settings(project: Path) -> None:
    """env.py imports the app's settings module, which configures logging (and prints) on import,
    and relies on that configuration as it migrates."""
    env_py = project / "migrations" / "env.py"
    replace(env_py, "from alembic import context\n", "from alembic import context\n\nimport noisy_settings\n")
    replace(env_py, "def run_migrations_online() -> None:\n", "def run_migrations_online() -> None:\n"
                                                                  "    noisy_settings.check()\n")


def version_locations_in_env_py(project: Path) -> None:
    """env.py says where the revisions are, in code (Prefect's `context.script.version_locations =
    [...]`, online and offline); alembic.ini names none (its default, an empty versions/)."""
    ini = project / "alembic.ini"
    ini.write_text("\n".join(line for line in ini.read_text().splitlines() if not line.startswith("version_locations")))
    env_py = project / "migrations" / "env.py"
    located = ('    import os\n    context.script.version_locations = '
               '[os.path.join(os.path.dirname(__file__), "..", "..", "blog_versions")]\n')
    replace(env_py, "def run_migrations_offline() -> None:\n", "def run_migrations_offline() -> None:\n" + located)
    replace(env_py, "def run_migrations_online() -> None:\n", "def run_migrations_online() -> None:\n" + located)


def more_versions_beside(project: Path) -> None:
    """The shape's folder brings revisions in `versions/` beside alembic.ini: a second version location."""
    set_options(project / "alembic.ini", version_locations=f"{SHARED_VERSIONS}{os.pathsep}%(here)s/versions",
                version_path_separator="os")


def in_an_ini_section_of_its_own(project: Path) -> None:
    """The project's options in `[blog]` (`alembic -n blog`); `[alembic]` points nowhere."""
    ini = project / "alembic.ini"
    ini.write_text(ini.read_text().replace("[alembic]\n", "[alembic]\nscript_location = nowhere\n\n[blog]\n", 1))


def connection_taken_for_an_engine(project: Path) -> None:
    """JupyterHub's env.py: what `config.attributes["connection"]` holds is connected to, as an Engine."""
    replace(project / "migrations" / "env.py",
            '    connectable = engine_from_config(\n        config.get_section(config.config_ini_section, {}),\n'
            '        prefix="sqlalchemy.",\n        poolclass=pool.NullPool,\n    )\n',
            '    connectable = config.attributes.get("connection", None)\n    if connectable is None:\n'
            '        connectable = engine_from_config(\n            config.get_section(config.config_ini_section, {}),\n'
            '            prefix="sqlalchemy.",\n            poolclass=pool.NullPool,\n        )\n')


def in_a_package(project: Path) -> None:
    """script_location and a second version location inside a package (tests/scenarios/package_location)."""
    set_options(project / "alembic.ini", script_location="blog_migrations:migrations", path_separator="space",
                version_path_separator="space",
                version_locations=f"blog_migrations:migrations/versions {SHARED_VERSIONS}")


class Shape(NamedTuple):
    # `alembic init -t` template
    template: str
    # the URL scheme the user writes
    scheme: str
    # what the user changed in the template, and the folder of tests/scenarios/ with files added
    edit: Callable[[Path], None] | None = None
    folder: str | None = None
    # what ALEMBIC_CONFIG names
    config: str = "alembic.ini"
    # the revisions at head, and where the version table is
    heads: tuple[str, ...] = ("b003",)
    version_table: str = "public.alembic_version"
    # where `alembic init` puts the scripts
    scripts: str = "migrations"
    # how the project runs `alembic`: its arguments before the command, the target; and the job's settings for the same
    alembic_args: tuple[str, ...] = ()
    target: str = "head"
    settings: tuple[tuple[str, str], ...] = ()
    # the revisions a run from empty applies, in order
    applied: tuple[str, ...] = ("b001", "b002", "b003")


# [tool.alembic] in pyproject.toml is read by Alembic 1.16 and newer (the lowest-versions run has older)
PYPROJECT_ALEMBIC = tuple(int(p) for p in alembic.__version__.split(".")[:2]) >= (1, 16)
needs_pyproject_alembic = pytest.mark.skipif(not PYPROJECT_ALEMBIC, reason="Alembic < 1.16 has no pyproject.toml support")

SHAPES = {
    "async-template": Shape("async", "postgresql+asyncpg"),
    "async-cookbook-shared-connection": Shape("async", "postgresql+asyncpg", share_the_connection),
    "sync-cookbook-shared-connection": Shape("generic", "postgresql", share_the_connection_sync),
    "sync-template-psycopg3": Shape("generic", "postgresql+psycopg"),
    "sync-template-psycopg2": Shape("generic", "postgresql+psycopg2"),
    "sync-template-no-driver": Shape("generic", "postgresql"),
    "sync-template-postgres-scheme": Shape("generic", "postgres"),
    "pyproject-template-via-ini": Shape("pyproject", "postgresql"),
    "pyproject-template-via-toml": Shape("pyproject", "postgresql+psycopg", config="pyproject.toml"),
    "version-table-in-env-py": Shape("generic", "postgresql", version_table_in_code, version_table="app.schema_version"),
    "package-script-location": Shape("generic", "postgresql", in_a_package, "package_location", heads=("p004",),
                                     scripts="blog_migrations/migrations", applied=("b001", "b002", "b003", "p004")),
    "app-configures-logging": Shape("generic", "postgresql", imports_noisy_settings, "noisy_logging"),
    "version-locations-in-env-py": Shape("generic", "postgresql", version_locations_in_env_py),
    "x-data-argument": Shape("generic", "postgresql", more_versions_beside, "x_data", heads=("x004",),
                             alembic_args=("-x", "data=true"), settings=(("MIGRATE_X_ARGS", "data=true"),),
                             applied=("b001", "b002", "b003", "x004")),
    "ini-section": Shape("generic", "postgresql", in_an_ini_section_of_its_own, alembic_args=("-n", "blog"),
                         settings=(("MIGRATE_INI_SECTION", "blog"),)),
    "connection-taken-for-an-engine": Shape("generic", "postgresql", connection_taken_for_an_engine),
    "expand-contract-heads": Shape("generic", "postgresql", more_versions_beside, "expand_contract", heads=("c004",),
                                   target="heads", settings=(("MIGRATE_TARGET", "heads"),),
                                   applied=("b001", "b002", "b003", "e004", "c004")),
}
OWN_ENGINE = Shape("generic", "postgresql", own_engine)
# env.py building its own engine from the app's settings, in each driver
OWN_ENGINES = {
    "psycopg2": OWN_ENGINE,
    "psycopg3": Shape("generic", "postgresql+psycopg", own_engine),
    "asyncpg": Shape("async", "postgresql+asyncpg", own_async_engine),
}


def make_project(shape: Shape, where: Path) -> Path:
    """`alembic init` in `where/project`, the shape's edits and files, and the shared revisions beside it."""
    if shape.template == "pyproject" and not PYPROJECT_ALEMBIC:
        pytest.skip("Alembic < 1.16 has no pyproject.toml support")
    project = where / "project"
    project.mkdir(parents=True)
    subprocess.run([ALEMBIC, "init", "-t", shape.template, shape.scripts], cwd=project, check=True, capture_output=True)
    if shape.template == "pyproject":
        replace(project / "pyproject.toml", "[tool.alembic]\n", f'[tool.alembic]\nversion_locations = ["{SHARED_VERSIONS}"]\n')
    else:
        # (Alembic before 1.16 writes `version_path_separator = os  # Use os.pathsep...`, which it
        # cannot read back once version_locations is set)
        set_options(project / "alembic.ini", version_locations=SHARED_VERSIONS, version_path_separator="os")
    if shape.folder:
        shutil.copytree(SCENARIOS / shape.folder, project, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
    if shape.edit:
        shape.edit(project)
    shutil.copytree(SCENARIOS / "blog_versions", where / "blog_versions", ignore=shutil.ignore_patterns("__pycache__"))
    return project


def url_for(db: Db, scheme: str) -> str:
    return scheme + "://" + db.url.split("://", 1)[1]


def bare_alembic_upgrade(shape: Shape, db: Db, where: Path, edit: Callable[[Path], Path] | None = None) -> None:
    """`alembic upgrade head` as the project's own developers run it, with the URL in alembic.ini
    (`edit(where)` makes the project instead, when given)."""
    project = edit(where) if edit else make_project(shape, where)
    ini = project / "alembic.ini"
    # (SQLAlchemy itself does not take the `postgres://` spelling some platforms hand out)
    url = url_for(db, "postgresql" if shape.scheme == "postgres" else shape.scheme)
    ini.write_text(re.sub(r"(?m)^sqlalchemy\.url = .*$", "sqlalchemy.url = " + url.replace("%", "%%"), ini.read_text()))
    subprocess.run([ALEMBIC, *shape.alembic_args, "upgrade", shape.target], cwd=project, check=True, capture_output=True,
                   text=True)


def contents(db: Db) -> str:
    """The schema and the rows, as pg_dump prints them, less the job's own tables."""
    dump = subprocess.run(["pg_dump", "--no-owner", "--no-privileges", "-N", JOB_SCHEMA, db.url],
                          check=True, capture_output=True, text=True).stdout
    return "\n".join(line for line in dump.splitlines()
                     if line.strip() and not line.startswith(("--", "SET ", "SELECT pg_catalog.set_config", "\\restrict",
                                                               "\\unrestrict")))


def schema(db: Db) -> str:
    """The database's schema as pg_dump prints it, less comments, settings and the job's own tables."""
    dump = subprocess.run(["pg_dump", "--schema-only", "--no-owner", "--no-privileges", "-N", JOB_SCHEMA, db.url],
                          check=True, capture_output=True, text=True).stdout
    kept = [line for line in dump.splitlines()
            if line.strip() and not line.startswith(("--", "SET ", "SELECT pg_catalog.set_config", "\\restrict",
                                                      "\\unrestrict"))]
    return "\n".join(kept)


def version_rows(db: Db, table: str) -> list[str]:
    return sorted(r[0] for r in db.query(f"SELECT version_num FROM {table}"))


@pytest.fixture
def reference_db() -> Db:
    database = create_database(ADMIN_URL, prefix="ref")
    yield database
    drop_database(database)


@pytest.mark.parametrize("name", SHAPES)
def test_project_shape_migrates_like_bare_alembic(name: str, db: Db, reference_db: Db, env: dict[str, str],
                                                  tmp_path: Path) -> None:
    """The shape migrates, re-runs as a no-op through the fast path, checks, reports, goes down one
    and back, and ends with the schema and rows bare Alembic makes of it."""
    shape = SHAPES[name]
    project = make_project(shape, tmp_path / "job")
    job_env = _job_env(env, db, shape, project)

    first = run_job("run", env=job_env, cwd=project)
    assert (0, "migrated") == (first.code, first.event("run.done")["outcome"]), first.stdout + first.stderr
    assert list(shape.applied) == [e["revision"] for e in first.events("migration.done")]
    assert list(shape.heads) == version_rows(db, shape.version_table)

    again = run_job("run", env=job_env, cwd=project)
    assert (0, "up-to-date", [], "shared") == (again.code, again.event("run.done")["outcome"],
                                               again.events("backup.done"), again.event("lock.acquired")["mode"])

    assert 0 == run_job("check", env=job_env, cwd=project).code
    status = run_job("status", "--format", "json", env=job_env, cwd=project)
    report = json.loads(status.stdout)
    assert (0, list(shape.heads), 0, shape.version_table.removeprefix("public.")) == (
        status.code, report["current"], report["pending_count"], report["version_table"])

    down = run_job("downgrade", "-1", "--yes", env=job_env, cwd=project)
    assert 0 == down.code, down.stdout
    assert 8 == run_job("check", env=job_env, cwd=project).code
    back = run_job("run", env=job_env, cwd=project)
    assert (0, 1) == (back.code, len(back.events("migration.done")))

    bare_alembic_upgrade(shape, reference_db, tmp_path / "bare")
    assert contents(reference_db) == contents(db)


def _job_env(env: dict[str, str], db: Db, shape: Shape, project: Path, **extra: str) -> dict[str, str]:
    return {**env, "DATABASE_URL": url_for(db, shape.scheme), "ALEMBIC_CONFIG": str(project / shape.config),
            **dict(shape.settings), **extra}


def test_the_apps_logging_configuration_stands_and_stdout_stays_json(db: Db, env: dict[str, str],
                                                                    tmp_path: Path) -> None:
    """An app module's dictConfig, basicConfig, root handlers and print take effect as under bare
    Alembic (its code checks them as it migrates); what they write to stdout goes to stderr, and
    stdout stays one JSON object a line."""
    shape = SHAPES["app-configures-logging"]
    project = make_project(shape, tmp_path)

    result = run_job("run", env=_job_env(env, db, shape, project), cwd=project)

    assert 0 == result.code, result.stdout[-2000:] + result.stderr[-2000:]
    assert all(isinstance(line, dict) for line in result.lines)  # every line parsed as JSON
    assert ["b001", "b002", "b003"] == [e["revision"] for e in result.events("migration.done")]
    assert "settings loaded" in result.stderr and "app WARNING app.audit: migrating" in result.stderr
    # Alembic's records go where the project sent them (env.py's fileConfig: its console handler), as under bare Alembic
    assert "INFO  [alembic.runtime.migration] Running upgrade  -> b001, users" in result.stderr


def test_alembic_records_go_through_the_jobs_renderer_when_the_project_sends_them_to_the_root(
        db: Db, env: dict[str, str], tmp_path: Path) -> None:
    """The stock template's fileConfig(alembic.ini): Alembic's records reach the job's JSON lines too."""
    shape = SHAPES["sync-template-psycopg2"]
    project = make_project(shape, tmp_path)

    result = run_job("run", env=_job_env(env, db, shape, project), cwd=project)

    assert 0 == result.code
    assert ["Running upgrade  -> b001, users", "Running upgrade b001 -> b002, posts, by user"] == [
        line["event"] for line in result.lines
        if line.get("logger") == "alembic.runtime.migration" and line["event"].startswith("Running")][:2]


def test_version_table_set_in_env_py_is_the_one_read_and_written(db: Db, env: dict[str, str], tmp_path: Path) -> None:
    """With the version table named only in env.py, nothing is written to the default one."""
    shape = SHAPES["version-table-in-env-py"]
    project = make_project(shape, tmp_path)

    assert 0 == run_job("run", env=_job_env(env, db, shape, project), cwd=project).code

    assert (["b003"], []) == (version_rows(db, "app.schema_version"),
                              db.query("SELECT 1 FROM pg_tables WHERE tablename = 'alembic_version'"))


@pytest.mark.parametrize("name", ["version-table-in-env-py", "sync-template-psycopg3", "async-template"])
def test_second_start_at_head_skips_alembic_without_a_manifest(name: str, db: Db, env: dict[str, str],
                                                              tmp_path: Path) -> None:
    """What the first run learned (heads, version table) lets the next start at head skip SQLAlchemy and Alembic."""
    shape = SHAPES[name]
    project = make_project(shape, tmp_path)
    job_env = _job_env(env, db, shape, project, PYTHONVERBOSE="1")
    assert 0 == run_job("run", env=job_env, cwd=project).code
    assert not list(project.rglob("migrate-job-heads.json"))

    result = run_job("run", env=job_env, cwd=project)

    assert ("up-to-date", "shared") == (result.event("run.done")["outcome"], result.event("lock.acquired")["mode"])
    assert "import 'alembic'" not in result.stderr and "import 'sqlalchemy'" not in result.stderr
    assert "import 'psycopg2'" in result.stderr  # the verbose import log is really there


def test_a_tampered_record_costs_speed_only(db: Db, env: dict[str, str], tmp_path: Path) -> None:
    """A record whose heads were edited no longer matches its seal: the next run asks Alembic and migrates."""
    shape = SHAPES["sync-template-psycopg2"]
    project = make_project(shape, tmp_path)
    job_env = _job_env(env, db, shape, project)
    assert 0 == run_job("run", env=job_env, cwd=project).code
    assert "shared" == run_job("run", env=job_env, cwd=project).event("lock.acquired")["mode"]  # answered from it
    db.query("UPDATE migrate_job.migrate_job_history_heads SET heads = '{b002}'")
    db.query("UPDATE alembic_version SET version_num = 'b002'")
    db.query("ALTER TABLE users DROP COLUMN display_name")

    result = run_job("run", env=job_env, cwd=project)

    assert (0, ["b003"]) == (result.code, [e["revision"] for e in result.events("migration.done")])


def test_a_changed_revision_file_is_not_answered_from_the_record(db: Db, env: dict[str, str], tmp_path: Path) -> None:
    """A revision added after the record was written changes the fingerprint: it is applied."""
    shape = SHAPES["sync-template-psycopg2"]
    project = make_project(shape, tmp_path)
    job_env = _job_env(env, db, shape, project)
    assert 0 == run_job("run", env=job_env, cwd=project).code
    assert 1 == db.query("SELECT count(*) FROM migrate_job.migrate_job_history_heads")[0][0]
    (tmp_path / "blog_versions" / "b004_tags.py").write_text(
        (SCENARIOS / "package_location" / "blog_migrations" / "migrations" / "versions" / "p004_tags.py")
        .read_text().replace("p004", "b004"))

    assert 8 == run_job("check", env=job_env, cwd=project).code
    result = run_job("run", env=job_env, cwd=project)
    assert (0, ["b004"]) == (result.code, [e["revision"] for e in result.events("migration.done")])


def own_engine_project(driver: str, db: Db, app_db: Db, env: dict[str, str], where: Path) -> tuple[Path, dict[str, str]]:
    """A project whose env.py builds its engine from APP_DATABASE_URL (`app_db`), in `driver`; DATABASE_URL is `db`."""
    shape = OWN_ENGINES[driver]
    project = make_project(shape, where)
    return project, {**env, "ALEMBIC_CONFIG": str(project / "alembic.ini"), "DATABASE_URL": url_for(db, shape.scheme),
                     "APP_DATABASE_URL": url_for(app_db, shape.scheme)}


@pytest.mark.parametrize("driver", OWN_ENGINES)
def test_env_py_on_another_database_is_refused(driver: str, db: Db, reference_db: Db, env: dict[str, str],
                                               tmp_path: Path) -> None:
    """An env.py whose own settings point elsewhere is refused (exit 2, both named) before anything changes."""
    project, job_env = own_engine_project(driver, db, reference_db, env, tmp_path)

    result = run_job("run", env=job_env, cwd=project)

    error = result.event("run.failed")["error"]
    assert (2, True, True) == (result.code, repr(reference_db.name) in error, repr(db.name) in error)
    assert ([], [], []) == (db.version(), reference_db.version(), list(Path(env["MIGRATE_BACKUP_DIR"]).iterdir()))


@pytest.mark.parametrize("driver", OWN_ENGINES)
def test_env_py_with_its_own_engine_on_the_same_database_migrates(driver: str, db: Db, env: dict[str, str],
                                                                  tmp_path: Path) -> None:
    """An env.py that builds its engine from the app's settings works when they name the same database."""
    project, job_env = own_engine_project(driver, db, db, env, tmp_path)

    result = run_job("run", env=job_env, cwd=project)

    assert (0, ["b003"]) == (result.code, db.version())


@needs_pyproject_alembic
@pytest.mark.parametrize("config", ["pyproject.toml", "alembic.ini"])
def test_pyproject_project_manifest_and_lint(config: str, env: dict[str, str], tmp_path: Path) -> None:
    """`manifest` and `lint --all` read a pyproject.toml project through either file."""
    project = make_project(SHAPES["pyproject-template-via-toml"], tmp_path)
    job_env = {**env, "ALEMBIC_CONFIG": str(project / config)}

    written = run_job("manifest", env=job_env, cwd=project)
    linted = run_job("lint", "--all", "--allow", "prefer-bigint-over-int,prefer-identity", env=job_env, cwd=project)

    assert (0, ["b003"]) == (written.code, json.loads((project / "migrations" / "migrate-job-heads.json").read_text())["heads"])
    assert 3 == linted.event("lint.done")["revisions"]


@pytest.mark.parametrize(("url", "named"), [
    ("mysql://root@127.0.0.1/test", "must be a PostgreSQL URL"),
    ("postgresql+pg8000://postgres@127.0.0.1/test", "unsupported driver 'pg8000'"),
    ("postgresql+psycopg://postgres@127.0.0.1/test?ssl=true", "'ssl' is not a connection parameter of libpq"),
])
def test_a_url_that_will_not_work_exits_2_naming_the_drivers_that_do(url: str, named: str, env: dict[str, str]) -> None:
    """A URL of another database or driver is a configuration error that lists what works."""
    result = run_job("run", env={**env, "DATABASE_URL": url})

    error = result.event("run.failed")["error"]
    assert (2, True) == (result.code, named in error)
    assert "postgresql+asyncpg://" in error or "libpq" in error


@pytest.mark.skipif(PYPROJECT_ALEMBIC, reason="this Alembic reads pyproject.toml")
def test_pyproject_project_on_an_older_alembic_exits_2_saying_why(env: dict[str, str], tmp_path: Path) -> None:
    """With an Alembic too old for [tool.alembic], the run stops at once and names the version needed."""
    project = make_project(SHAPES["sync-template-psycopg2"], tmp_path)  # (no pyproject template before 1.16)
    (project / "alembic.ini").unlink()
    (project / "pyproject.toml").write_text('[tool.alembic]\nscript_location = "%(here)s/migrations"\n')

    result = run_job("run", env={**env, "ALEMBIC_CONFIG": str(project / "pyproject.toml")}, cwd=project)

    assert (2, True) == (result.code, "needs Alembic 1.16 or newer" in result.event("run.failed")["error"])


@pytest.mark.parametrize("name", ["package-script-location", "pyproject-template-via-toml", "sync-template-psycopg2"])
def test_manifest_gives_the_fast_path_for_every_script_location(name: str, db: Db, env: dict[str, str],
                                                                tmp_path: Path) -> None:
    """Package-style, pyproject and %(here)s locations (several at once) get a manifest the next start uses."""
    shape = SHAPES[name]
    project = make_project(shape, tmp_path)
    # no record in the database: only the manifest can make the start fast
    job_env = _job_env(env, db, shape, project, MIGRATE_HISTORY_TABLE="off", PYTHONVERBOSE="1")
    assert 0 == run_job("run", env=job_env, cwd=project).code
    assert 0 == run_job("manifest", env=job_env, cwd=project).code

    result = run_job("run", env=job_env, cwd=project)

    assert ("up-to-date", "shared") == (result.event("run.done")["outcome"], result.event("lock.acquired")["mode"])
    assert "import 'alembic'" not in result.stderr


def test_check_wait_passes_once_the_version_table_in_env_py_is_at_head(db: Db, env: dict[str, str],
                                                                       tmp_path: Path) -> None:
    """An app pod's `check --wait` reads the table env.py configures, so it passes after the run."""
    shape = SHAPES["version-table-in-env-py"]
    project = make_project(shape, tmp_path)
    job_env = _job_env(env, db, shape, project, MIGRATE_WAIT_TIMEOUT="1")
    assert 8 == run_job("check", "--wait", env=job_env, cwd=project).code
    assert 0 == run_job("run", env=job_env, cwd=project).code

    assert 0 == run_job("check", "--wait", env=job_env, cwd=project).code


NEXT = REVISION.format(doc="tags", body='op.create_table("tags", sa.Column("name", sa.Text, primary_key=True))')


@pytest.mark.parametrize("recorded_by", ["database", "manifest"])
def test_a_revision_added_where_env_py_looks_is_migrated_never_up_to_date(recorded_by: str, db: Db, env: dict[str, str],
                                                                         tmp_path: Path) -> None:
    """Revisions where env.py sets version_locations in code (Prefect's shape): what the fast path
    knows holds only while those files are as they were, so a new revision there is applied, from
    the database's record or from a manifest written by `migrate-job manifest` (which asks env.py too)."""
    shape = SHAPES["version-locations-in-env-py"]
    project = make_project(shape, tmp_path)
    job_env = _job_env(env, db, shape, project)
    assert 0 == run_job("run", env=job_env, cwd=project).code
    if recorded_by == "manifest":
        db.query("DELETE FROM migrate_job.migrate_job_history_heads")
        written = run_job("manifest", env=job_env, cwd=project)
        assert 0 == written.code, written.stdout
        assert (0, "shared") == (lambda r: (r.code, r.event("lock.acquired")["mode"]))(
            run_job("run", env=job_env, cwd=project))
        db.query("DELETE FROM migrate_job.migrate_job_history_heads")
    (tmp_path / "blog_versions" / "b004_tags.py").write_text(NEXT)

    result = run_job("run", env=job_env, cwd=project)

    assert (0, "migrated", ["b004"]) == (result.code, result.event("run.done")["outcome"], db.version())


def test_scripts_with_no_revision_are_an_error_never_up_to_date(db: Db, env: dict[str, str], tmp_path: Path) -> None:
    """A version location that holds nothing (a wrong path): exit 2 naming where it looked; `check` too."""
    shape = SHAPES["sync-template-psycopg2"]
    project = make_project(shape, tmp_path)
    shutil.rmtree(tmp_path / "blog_versions")
    (tmp_path / "blog_versions").mkdir()

    for command in ("run", "check"):
        result = run_job(command, env=_job_env(env, db, shape, project), cwd=project)
        error = result.event("run.failed")["error"]
        assert (2, True) == (result.code, "no revision found" in error and "blog_versions" in error), error
    assert [] == db.version()


def test_python_warnings_are_log_lines(db: Db, env: dict[str, str], tmp_path: Path) -> None:
    """A warning the project's code raises is a JSON line (`python.warning`), not raw text on stderr."""
    shape = SHAPES["sync-template-psycopg2"]
    project = make_project(shape, tmp_path)
    replace(project / "migrations" / "env.py", "from alembic import context\n",
            "from alembic import context\nimport warnings\nwarnings.warn('this env.py is old', UserWarning)\n")

    result = run_job("run", env=_job_env(env, db, shape, project), cwd=project)

    warnings = {(w["category"], w["message"]) for w in result.events("python.warning")}  # (each time env.py runs)
    assert (0, {("UserWarning", "this env.py is old")}) == (result.code, warnings)
    assert "UserWarning" not in result.stderr
