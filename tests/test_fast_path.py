"""The heads manifest's fast path gives the same answer as Alembic in every case, or steps aside."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from job import manifest
from job.alembic_files import AlembicFiles
from job.plan import VersionTable
from tests.conftest import ROOT, SCENARIOS, Db, run_job

MERGE = '''"""merge the two branches

Revision ID: m004
Revises: b002, b003
"""

revision = "m004"
down_revision = ("b002", "b003")
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
'''


def _project(tmp_path: Path, name: str) -> Path:
    """A copy of a scenario (or the example) that the test may write a manifest into."""
    if name == "example":
        shutil.copytree(ROOT / "alembic", tmp_path / "alembic", ignore=shutil.ignore_patterns("migrate-job-heads.json"))
        ini = tmp_path / "alembic.ini"
        shutil.copy(ROOT / "alembic.ini", ini)
        return ini
    shutil.copytree(SCENARIOS / ("branched" if name == "merged" else name), tmp_path / name)
    if name == "merged":
        (tmp_path / name / "versions" / "m004.py").write_text(MERGE)
    return tmp_path / name / "alembic.ini"


def manifest_heads(ini: Path) -> tuple[str, ...] | None:
    """The heads the manifest beside `ini`'s scripts holds, if it matches them."""
    scripts = manifest.scripts(AlembicFiles.find(ini))
    known = scripts and manifest.from_file(scripts, VersionTable())
    return known.heads if known else None


def _set_version(db: Db, revisions: list[str]) -> None:
    db.query("CREATE TABLE IF NOT EXISTS alembic_version (version_num varchar(32) PRIMARY KEY)")
    db.query("DELETE FROM alembic_version")
    for revision in revisions:
        db.query("INSERT INTO alembic_version VALUES (%s)", (revision,))


@pytest.fixture
def env(env: dict[str, str]) -> dict[str, str]:
    """The copied projects import `app`, `job` and `tests.scenarios` from the repository."""
    return {**env, "PYTHONPATH": str(ROOT)}


def _check(env: dict[str, str], ini: Path, target: str) -> tuple[int, list[str] | None]:
    """`check`'s exit code and the pending revisions it lists (None when it refuses)."""
    result = run_job("check", "--format", "json", env={**env, "ALEMBIC_CONFIG": str(ini), "MIGRATE_TARGET": target},
                     cwd=ini.parent)
    document = json.loads(result.stdout) if result.code in (0, 8) else None
    return result.code, document and [p["revision"] for p in document["pending"]]


# (project, the database's revisions, target) → (check's exit code, the pending revisions)
CASES = [
    ("example", ["0006"], "head", (0, [])),
    ("example", ["0004"], "head", (8, ["0005", "0006"])),
    ("example", [], "head", (8, ["0001", "0002", "0003", "0004", "0005", "0006"])),
    ("example", ["0006"], "heads", (0, [])),
    ("example", ["feedface"], "head", (7, None)),
    ("branched", ["b002", "b003"], "heads", (0, [])),
    ("branched", ["b002", "b003"], "head", (7, None)),
    ("branched", ["b002"], "heads", (8, ["b003"])),
    ("merged", ["b002", "b003"], "head", (8, ["m004"])),
    ("merged", ["m004"], "head", (0, [])),
    ("merged", ["b002"], "heads", (8, ["b003", "m004"])),
]


@pytest.mark.parametrize(("name", "current", "target", "expected"), CASES)
def test_manifest_and_alembic_agree(db: Db, env: dict[str, str], tmp_path: Path, name: str,
                                    current: list[str], target: str, expected: tuple[int, list[str] | None]) -> None:
    """`check` answers as expected with Alembic alone, and the same with a valid manifest."""
    ini = _project(tmp_path, name)
    _set_version(db, current)
    without = _check(env, ini, target)

    assert 0 == run_job("manifest", env={**env, "ALEMBIC_CONFIG": str(ini)}, cwd=ini.parent).code
    assert manifest_heads(ini) is not None

    assert expected == without == _check(env, ini, target)


def test_manifest_records_alembic_heads(env: dict[str, str], tmp_path: Path) -> None:
    """The manifest of the merged history holds its one head."""
    ini = _project(tmp_path, "merged")

    run_job("manifest", env={**env, "ALEMBIC_CONFIG": str(ini)}, cwd=ini.parent)

    assert ("m004",) == manifest_heads(ini)


def test_a_new_revision_makes_the_manifest_stale(db: Db, env: dict[str, str], tmp_path: Path) -> None:
    """A revision added after the manifest was written is seen: check says pending, run applies it."""
    ini = _project(tmp_path, "branched")
    run_env = {**env, "ALEMBIC_CONFIG": str(ini), "MIGRATE_TARGET": "heads"}
    assert 0 == run_job("run", env=run_env, cwd=ini.parent).code
    run_job("manifest", env=run_env, cwd=ini.parent)
    assert ("b002", "b003") == manifest_heads(ini)  # fresh before the change
    (ini.parent / "versions" / "m004.py").write_text(MERGE)

    assert manifest_heads(ini) is None
    assert 8 == run_job("check", env=run_env, cwd=ini.parent).code
    assert 0 == run_job("run", env=run_env, cwd=ini.parent).code
    assert ["m004"] == db.version()


def test_an_edit_that_keeps_size_and_mtime_makes_the_manifest_stale(env: dict[str, str], tmp_path: Path) -> None:
    """The manifest is checked against file contents, not sizes and times."""
    ini = _project(tmp_path, "branched")
    run_job("manifest", env={**env, "ALEMBIC_CONFIG": str(ini)}, cwd=ini.parent)
    assert ("b002", "b003") == manifest_heads(ini)  # fresh before the change
    script = ini.parent / "versions" / "b003.py"
    stat = script.stat()
    script.write_text(script.read_text().replace('down_revision = "b001"', 'down_revision = "b002"'))
    os.utime(script, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    assert stat.st_size == script.stat().st_size
    assert manifest_heads(ini) is None


def test_a_manifest_from_other_scripts_is_ignored(env: dict[str, str], tmp_path: Path) -> None:
    """A manifest copied beside different scripts does not match their fingerprint."""
    example = _project(tmp_path / "a", "example")
    run_job("manifest", env={**env, "ALEMBIC_CONFIG": str(example)}, cwd=example.parent)
    branched = _project(tmp_path / "b", "branched")
    shutil.copy(example.parent / "alembic" / manifest.NAME, branched.parent / manifest.NAME)

    assert manifest_heads(branched) is None


def test_at_head_run_with_a_manifest_does_not_import_alembic(db: Db, env: dict[str, str], tmp_path: Path) -> None:
    """With a valid manifest, an at-head run answers without loading SQLAlchemy or Alembic."""
    ini = _project(tmp_path, "example")
    run_env = {**env, "ALEMBIC_CONFIG": str(ini), "PYTHONVERBOSE": "1"}
    assert 0 == run_job("run", env={**env, "ALEMBIC_CONFIG": str(ini)}, cwd=ini.parent).code
    run_job("manifest", env=run_env, cwd=ini.parent)

    result = run_job("run", env=run_env, cwd=ini.parent)

    assert "up-to-date" == result.event("run.done")["outcome"]
    assert "import 'alembic'" not in result.stderr and "import 'sqlalchemy'" not in result.stderr
    assert "import 'psycopg2'" in result.stderr  # the verbose import log is really there


def test_at_head_runs_hold_the_lock_shared_and_do_not_wait_for_each_other(db: Db, env: dict[str, str],
                                                                        tmp_path: Path) -> None:
    """With a manifest, a run at head takes the lock shared: another reader does not hold it up."""
    from tests.conftest import hold_lock

    ini = _project(tmp_path, "example")
    run_env = {**env, "ALEMBIC_CONFIG": str(ini), "MIGRATE_LOCK_TIMEOUT": "2"}
    assert 0 == run_job("run", env=run_env, cwd=ini.parent).code
    run_job("manifest", env=run_env, cwd=ini.parent)
    reader, _ = hold_lock(db, shared=True)

    result = run_job("run", env=run_env, cwd=ini.parent)
    reader.close()

    assert 0 == result.code
    assert ("shared", []) == (result.event("lock.acquired")["mode"], result.events("lock.waiting"))


def test_a_run_with_work_waits_for_readers_to_finish(db: Db, env: dict[str, str], tmp_path: Path) -> None:
    """A run with pending revisions needs the lock exclusive: it waits while a reader holds it shared."""
    from tests.conftest import hold_lock

    ini = _project(tmp_path, "example")
    run_env = {**env, "ALEMBIC_CONFIG": str(ini), "MIGRATE_LOCK_TIMEOUT": "1"}
    run_job("manifest", env=run_env, cwd=ini.parent)
    assert ("0006",) == manifest_heads(ini)  # (the fast path's reader check is there to be skipped)
    reader, pid = hold_lock(db, shared=True, application_name="reading-pod")

    result = run_job("run", env=run_env, cwd=ini.parent)
    reader.close()

    assert 4 == result.code
    assert (pid, "reading-pod") == tuple(result.events("lock.waiting")[0]["holder"][k] for k in ("pid", "application_name"))
    assert [] == db.version()


def test_a_run_with_work_takes_the_lock_exclusive(db: Db, env: dict[str, str], tmp_path: Path) -> None:
    """While a run migrates it holds the lock exclusive, so an at-head check could not slip in."""
    ini = _project(tmp_path, "example")
    run_env = {**env, "ALEMBIC_CONFIG": str(ini)}
    run_job("manifest", env=run_env, cwd=ini.parent)
    assert ("0006",) == manifest_heads(ini)  # (the shared lock would be tried first)

    result = run_job("run", env=run_env, cwd=ini.parent)

    assert ("exclusive", "migrated") == (result.event("lock.acquired")["mode"], result.event("run.done")["outcome"])


def test_scripts_named_from_the_working_directory_are_known_at_head(db: Db, env: dict[str, str],
                                                                    tmp_path: Path) -> None:
    """MLflow's layout: alembic.ini deep in the package names `script_location = mlflow/store/...`,
    relative to the working directory (site-packages), as Alembic reads it, not to the ini's own
    directory. What the first run learned of those scripts answers the next start at head without
    Alembic; so does a manifest written for them."""
    package = tmp_path / "app" / "store" / "migrations"
    shutil.copytree(SCENARIOS / "tenant", package)
    ini = package / "alembic.ini"
    ini.write_text("[alembic]\nscript_location = app/store/migrations\npath_separator = os\n")
    run_env = {**env, "ALEMBIC_CONFIG": str(ini), "PYTHONVERBOSE": "1"}
    assert run_job("run", env=run_env, cwd=tmp_path).code == 0

    result = run_job("run", env=run_env, cwd=tmp_path)

    assert ("up-to-date", "shared") == (result.event("run.done")["outcome"], result.event("lock.acquired")["mode"])
    assert "import 'alembic'" not in result.stderr and "import 'psycopg2'" in result.stderr
    assert run_job("manifest", env=run_env, cwd=tmp_path).code == 0
    assert json.loads((package / manifest.NAME).read_text())["heads"] == ["t003"]
