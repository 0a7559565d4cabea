"""Rollbacks and rolling updates: the previous release's pods start on a schema the next release
migrated, by the lineage the job records, unless a revision in between breaks them, the lineage is
unknown, or the database is on another line.

A "release" here is a copy of the example project with the revisions it shipped, as in its image.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, Db, Result, finish, pg_restore, run_job, start_job

VERSIONS = ROOT / "alembic" / "versions"

# a revision of the previous release's own that the next release does not have (a diverged branch)
OWN_LINE = '''"""an index only this branch has

Revision ID: {revision}
Revises: {down}
"""
from alembic import op

revision = "{revision}"
down_revision = "{down}"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_{revision}", "users", ["email"])


def downgrade() -> None:
    op.drop_index("ix_{revision}", table_name="users")
'''


def release(tmp_path: Path, name: str, last: str, extra: dict[str, str] | None = None,
            unmark: bool = False) -> Path:
    """The example project as a release shipped it: its revisions up to `last`, plus `extra`
    (revision -> down revision) of its own; with `unmark`, 0006 without its breaking marker."""
    root = tmp_path / name
    (root / "alembic" / "versions").mkdir(parents=True)
    shutil.copy(ROOT / "alembic.ini", root / "alembic.ini")
    for item in ("env.py", "script.py.mako"):
        shutil.copy(ROOT / "alembic" / item, root / "alembic" / item)
    for path in sorted(VERSIONS.glob("0*.py")):
        if path.name[:4] <= last:
            text = path.read_text()
            if unmark:
                text = "\n".join(line for line in text.splitlines() if not line.startswith("breaks_previous_release"))
            (root / "alembic" / "versions" / path.name).write_text(text)
    for revision, down in (extra or {}).items():
        (root / "alembic" / "versions" / f"{revision}.py").write_text(OWN_LINE.format(revision=revision, down=down))
    return root / "alembic.ini"


@pytest.fixture
def env(env: dict[str, str]) -> dict[str, str]:
    """The copied projects import `app` and `job` from the repository."""
    return {**env, "PYTHONPATH": str(ROOT)}


def job(env: dict[str, str], ini: Path, *args: str, **extra: str) -> Result:
    return run_job(*(args or ("run",)), env={**env, "ALEMBIC_CONFIG": str(ini), **extra}, cwd=ini.parent)


def bare_alembic_upgrade(env: dict[str, str], db: Db, ini: Path) -> None:
    """`alembic upgrade head`, as another tool migrates: no lineage recorded."""
    upgraded = subprocess.run([str(Path(sys.executable).parent / "alembic"), "-c", str(ini), "upgrade", "head"],
                              cwd=ini.parent, capture_output=True, text=True, env={**env, "DATABASE_URL": db.url})
    assert upgraded.returncode == 0, upgraded.stderr


def termination(env: dict[str, str]) -> str:
    return Path(env["MIGRATE_TERMINATION_LOG"]).read_text()


@pytest.mark.parametrize("how", ["ran here before", "never ran here", "with a heads manifest"])
def test_the_previous_release_starts_on_a_schema_the_next_one_migrated(db: Db, env: dict[str, str],
                                                                         tmp_path: Path, how: str) -> None:
    """Release N (0001-0004) after release N+1 (0005) migrated: run, check, check --wait exit 0 and
    log database.ahead; status and plan say so."""
    old, new = release(tmp_path, "n", "0004"), release(tmp_path, "n1", "0005")
    if how == "ran here before":
        assert job(env, old).code == 0
    if how == "with a heads manifest":
        assert job(env, old, "manifest").code == 0
    assert job(env, new).code == 0
    assert db.version() == ["0005"]

    ran = job(env, old)
    assert ran.code == 0, ran.stdout
    ahead = ran.event("database.ahead")
    assert ahead["current"] == ["0005"] and ahead["heads"] == ["0004"] and ahead["ahead"] == ["0005"]
    assert ran.event("run.done")["outcome"] == "up-to-date"
    assert "migration.start" not in ran.names and "backup.start" not in ran.names
    if how != "never ran here":  # what is known of the scripts settles it: no Alembic, no exclusive lock
        assert ran.event("lock.acquired")["mode"] == "shared"

    for args in (("check",), ("check", "--wait")):
        checked = job(env, old, *args)
        assert checked.code == 0, checked.stdout
        assert checked.event("database.ahead")["ahead"] == ["0005"]
        assert checked.event("check")["at_target"] is True

    status = job(env, old, "status", "--format", "json")
    assert status.code == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["problem"] is None and report["pending_count"] == 0
    assert report["ahead"] == [{"revision": "0005", "description": "add a required role to users"}]
    text = job(env, old, "status").stdout
    assert "ahead:   the database has 1 revision(s) these scripts lack" in text and "0005" in text

    planned = json.loads(job(env, old, "plan", "--format", "json").stdout)
    assert planned["pending"] == [] and [a["revision"] for a in planned["ahead"]] == ["0005"]
    assert db.version() == ["0005"]


def test_allow_ahead_false_restores_the_refusal(db: Db, env: dict[str, str], tmp_path: Path) -> None:
    old, new = release(tmp_path, "n", "0004"), release(tmp_path, "n1", "0005")
    assert job(env, old).code == 0 and job(env, new).code == 0

    refused = job(env, old, MIGRATE_ALLOW_AHEAD="false")
    assert refused.code == 7
    assert "MIGRATE_ALLOW_AHEAD=false" in refused.event("run.failed")["error"]
    assert "ahead of these migration scripts on their own line (they lack '0005')" in termination(env)
    assert job(env, old, "check", "--no-allow-ahead").code == 7
    assert job(env, old, "check", "--no-allow-ahead", MIGRATE_ALLOW_AHEAD="true").code == 7  # the flag wins
    assert job(env, old, "check", "--allow-ahead", MIGRATE_ALLOW_AHEAD="false").code == 0
    assert job(env, old, "check", MIGRATE_ALLOW_AHEAD="maybe").code == 2


def test_a_breaking_revision_in_between_stops_older_code(db: Db, env: dict[str, str], tmp_path: Path) -> None:
    """0006 drops the columns release 0005 reads, and says so: the previous releases stop, naming it,
    even when they were at head a moment before (the fast path steps aside for the refusal)."""
    n, n1 = release(tmp_path, "n", "0005"), release(tmp_path, "n1", "0006")
    older = release(tmp_path, "n-1", "0004")
    assert job(env, n).code == 0 and job(env, n1).code == 0

    for code in (n, older):
        for args in (("run",), ("check",), ("check", "--wait")):
            stopped = job(env, code, *args, MIGRATE_WAIT_TIMEOUT="30")
            assert stopped.code == 7, stopped.stdout
            error = stopped.event("run.failed")["error"]
            assert "breaks the previous release's code: '0006' (drops users.first_name and users.last_name" in error
            assert stopped.event("run.failed")["seconds"] < 20  # refused at once, not waited out
    status = job(env, n, "status", "--format", "json")
    assert status.code == 7 and "0006" in json.loads(status.stdout)["problem"]

    # unmarked, the same revision lets the previous release start
    unmarked = release(tmp_path, "n1-unmarked", "0006", unmark=True)
    assert job(env, unmarked, "run", MIGRATE_BACKUP="always").code == 0  # records the lineage again
    assert job(env, n).code == 0


def test_without_lineage_older_code_refuses_and_says_why(db: Db, env: dict[str, str], tmp_path: Path) -> None:
    """A database migrated by another tool (bare Alembic): no lineage, exit 7 as before, saying so."""
    old, new = release(tmp_path, "n", "0004"), release(tmp_path, "n1", "0005")
    bare_alembic_upgrade(env, db, new)
    for args in (("run",), ("check",), ("check", "--wait")):
        refused = job(env, old, *args)
        assert refused.code == 7
        assert "no lineage is recorded in the database" in refused.event("run.failed")["error"]
    assert "cannot tell whether it descends from these scripts' head" in termination(env)


def test_lineage_that_lacks_the_revision_is_no_lineage(db: Db, env: dict[str, str], tmp_path: Path) -> None:
    """The job recorded an older graph; the newest revision was applied by another tool."""
    old, new = release(tmp_path, "n", "0004"), release(tmp_path, "n1", "0005")
    assert job(env, old).code == 0
    bare_alembic_upgrade(env, db, new)
    refused = job(env, old)
    assert refused.code == 7
    assert "the recorded lineage does not have it" in refused.event("run.failed")["error"]


@pytest.mark.parametrize("fork", ["0004", "0003"])
def test_a_diverged_branch_is_refused(db: Db, env: dict[str, str], tmp_path: Path, fork: str) -> None:
    """The database was migrated by a line that parts from this code's after `fork`: exit 7 naming
    where the lines part, whether or not this code has revisions of its own past it."""
    old = release(tmp_path, "n", "0004", extra={"0005b": "0004"} if fork == "0004" else None)
    other = release(tmp_path, "other", fork, extra={"0005x": fork})
    assert job(env, other).code == 0
    assert db.version() == ["0005x"]
    for args in (("run",), ("check",), ("check", "--wait")):
        refused = job(env, old, *args)
        assert refused.code == 7, refused.stdout
        error = refused.event("run.failed")["error"]
        assert "the database is at revision '0005x', on a line these migration scripts do not have" in error
        assert f"the lines part after {fork!r}" in error
    assert db.version() == ["0005x"]


def test_lineage_is_recorded_before_anything_is_applied(db: Db, env: dict[str, str], tmp_path: Path) -> None:
    """The graph of the scripts that ran, with the marker, beside the history; never in a backup."""
    db.holds_data()
    new = release(tmp_path, "n1", "0006")
    ran = job(env, new)
    assert ran.code == 0
    rows = db.query("SELECT revision, down_revisions, breaking FROM migrate_job.migrate_job_history_lineage "
                    "WHERE version_table = 'alembic_version' ORDER BY revision")
    assert [(r, d) for r, d, _ in rows] == [("0001", []), ("0002", ["0001"]), ("0003", ["0002"]),
                                            ("0004", ["0003"]), ("0005", ["0004"]), ("0006", ["0005"])]
    assert [r for r, _, b in rows if b] == ["0006"]
    dump = Path(ran.event("backup.done")["path"])
    listing = pg_restore("--list", backup=dump, check=True).stdout.decode()
    assert "legacy_notes" in listing and "migrate_job_history_lineage" not in listing


def test_old_and_new_pods_start_together_in_a_rollout(db: Db, env: dict[str, str], tmp_path: Path) -> None:
    """initContainer mode during a rolling update: pods of both releases start at once on a
    database at the old head. One migration; every pod starts."""
    old, new = release(tmp_path, "n", "0004"), release(tmp_path, "n1", "0005")
    assert job(env, old).code == 0
    pods = [start_job("run", env={**env, "ALEMBIC_CONFIG": str(ini)}, cwd=ini.parent)
            for ini in (new, old, new, old, old, new)]
    results = [finish(pod) for pod in pods]
    assert [r.code for r in results] == [0] * 6, [r.stdout for r in results if r.code]
    assert sum(len(r.events("migration.done")) for r in results) == 1
    assert db.version() == ["0005"]
    assert job(env, old, "check").code == 0


def test_lint_suggests_the_marker_for_what_breaks_older_code(env: dict[str, str], tmp_path: Path) -> None:
    """0006 drops two columns: unmarked, lint suggests the marker for each (whether or not the rule
    is allowed, and without failing); marked, it does not."""
    unmarked = job(env, release(tmp_path, "unmarked", "0006", unmark=True), "lint", "--all")
    assert unmarked.code == 0, unmarked.stdout
    suggestions = unmarked.events("lint.suggestion")
    assert [(s["revision"], s["rule"]) for s in suggestions] == [("0006", "ban-drop-column")] * 2
    assert "breaks_previous_release" in suggestions[0]["message"]

    marked = job(env, release(tmp_path, "marked", "0006"), "lint", "--all")
    assert marked.code == 0 and marked.events("lint.suggestion") == []
