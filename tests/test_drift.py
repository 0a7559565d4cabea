"""The database is what the code says (job.integrity, job.drift), on real PostgreSQL: edited
applied revisions, hand-made schema changes, models against the database, excludes, the job's own
tables, and a deploy in flight."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from tests.conftest import SCENARIOS, Db, Result, finish, run_job, scenario, start_job


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A copy of the drift scenario (its files get edited)."""
    target = tmp_path / "drift"
    shutil.copytree(SCENARIOS / "drift", target, ignore=shutil.ignore_patterns("__pycache__"))
    return target


@pytest.fixture
def denv(env: dict[str, str], project: Path) -> dict[str, str]:
    return {**env, "ALEMBIC_CONFIG": str(project / "alembic.ini"), "MIGRATE_BACKUP": "off"}


def names(result: Result, event: str) -> list[str]:
    return [line["event"] for line in result.lines if line["event"] in (event, "migration.start")]


def drift_of(env: dict[str, str], *args: str) -> tuple[int, dict]:
    result = run_job("drift", "--format", "json", *args, env=env)
    assert result.stdout.strip(), result.stderr
    return result.code, json.loads(result.stdout)


def found(report: dict, against: str) -> set[tuple[str, str, str | None, str | None]]:
    return {(d["object"], d["kind"], d["expected"], d["found"]) for d in report["differences"] if d["against"] == against}


# --- edited applied revisions ------------------------------------------------------------------

def edit(project: Path, revision: str, old: str, new: str) -> None:
    path = project / "versions" / f"{revision}.py"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def test_an_edited_applied_revision_warns_and_with_refuse_exits_9_until_accepted(db: Db, denv: dict[str, str],
                                                                                 project: Path) -> None:
    assert 0 == run_job("run", env={**denv, "MIGRATE_TARGET": "d002"}).code
    edit(project, "d001", 'sa.String(100)', 'sa.String(120)')  # what the next environment would get differs

    warned = run_job("run", env=denv)
    assert 0 == warned.code, warned.failure
    changed = warned.event("revision.changed")
    assert ("d001", "applied", "warn") == (changed["revision"], changed["recorded"], changed["outcome"])
    assert changed["recorded_sha256"] != changed["file_sha256"]
    assert names(warned, "revision.changed").index("revision.changed") < names(warned, "revision.changed").index(
        "migration.start")

    edit(project, "d002", '"title", sa.Text', '"title", sa.String(300)')
    refused = run_job("run", env={**denv, "MIGRATE_ON_CHANGED_REVISION": "refuse"})
    assert 9 == refused.code
    assert {"d001", "d002"} == {e["revision"] for e in refused.events("revision.changed")}
    assert "d001, d002" in refused.failure and "migrate-job accept" in refused.failure

    accepted = run_job("accept", "d001", "--reason", "widened on purpose, production too", env=denv)
    assert 0 == accepted.code, accepted.failure
    assert "widened on purpose" in accepted.event("revision.accepted")["reason"]
    code, report = drift_of(denv)  # (a run at head takes the fast path: it loads no scripts to compare)
    assert (9, {("d002", "revision file")}) == (code, {(o, k) for o, k, _, _ in found(report, "revision")})
    assert 0 == run_job("accept", "--reason", "both", env=denv).code  # every changed one
    assert (0, []) == drift_of(denv)[0:1] + (drift_of(denv)[1]["differences"],)
    rows = db.query("SELECT revision, recorded, accepted_reason, accepted_by IS NOT NULL, replaced_sha256 IS NOT NULL "
                    "FROM migrate_job.migrate_job_history_revisions ORDER BY revision")
    assert [("d001", "accepted", "widened on purpose, production too", True, True),
            ("d002", "accepted", "both", True, True), ("d003", "applied", None, False, False)] == rows


def test_whitespace_comments_and_docstrings_do_not_count_but_code_does(db: Db, denv: dict[str, str],
                                                                       project: Path) -> None:
    assert 0 == run_job("run", env=denv).code
    path = project / "versions" / "d002.py"
    path.write_text('"""books, reworded\n\nRevision ID: d002\n"""\n# a comment\n'
                    + path.read_text().split('"""\n', 1)[1].replace("    op.create_index(", "\n\n    op.create_index(  # why\n")
                    .replace('sa.Column("title", sa.Text, nullable=False)', "sa.Column('title', sa.Text, nullable = False)"))
    refuse = {**denv, "MIGRATE_ON_CHANGED_REVISION": "refuse"}
    quiet = run_job("drift", env=refuse)
    assert 0 == quiet.code, quiet.failure
    assert [] == quiet.events("revision.changed")

    edit(project, "d003", 'sa.String(20)', 'sa.String(20), nullable=True')
    assert 9 == run_job("drift", env=refuse).code


def test_a_database_migrated_before_the_hashes_gets_them_on_first_sight(db: Db, denv: dict[str, str],
                                                                         project: Path) -> None:
    assert 0 == run_job("run", env={**denv, "MIGRATE_TARGET": "d002"}).code
    db.query("DROP TABLE migrate_job.migrate_job_history_revisions")  # as a version before this one left it
    edit(project, "d001", 'sa.String(100)', 'sa.String(120)')  # (edited before anyone could know)

    first = run_job("run", env={**denv, "MIGRATE_ON_CHANGED_REVISION": "refuse"})

    assert 0 == first.code, first.failure
    assert [] == first.events("revision.changed")
    assert [("d001", "first-seen"), ("d002", "first-seen"), ("d003", "applied")] == db.query(
        "SELECT revision, recorded FROM migrate_job.migrate_job_history_revisions ORDER BY revision")


# --- hand-made changes ---------------------------------------------------------------------------

@pytest.mark.parametrize("change, kind, name", [
    ("CREATE INDEX hotfix_authors_name ON authors (name)", "index", "public.hotfix_authors_name"),
    ("ALTER TABLE authors DROP CONSTRAINT uq_authors_email", "constraint", "public.authors.uq_authors_email"),
    ("ALTER TABLE books ALTER COLUMN title DROP NOT NULL", "column", "public.books.title"),
])
def test_a_hand_made_change_is_reported_before_the_next_revision_runs(db: Db, denv: dict[str, str], change: str,
                                                                      kind: str, name: str) -> None:
    assert 0 == run_job("run", env={**denv, "MIGRATE_TARGET": "d002"}).code
    db.query(change)

    refused = run_job("run", env={**denv, "MIGRATE_ON_DRIFT": "refuse"})
    assert 9 == refused.code
    assert [(name, kind)] == [(d["object"], d["kind"]) for d in refused.event("schema.drift")["differences"]]
    assert "d003" in refused.failure and [] == refused.events("migration.start")
    assert [("d002",)] == db.query("SELECT version_num FROM alembic_version")

    checked = run_job("check", env={**denv, "MIGRATE_TARGET": "d002"})
    assert 0 == checked.code and 1 == checked.event("schema.drift")["count"]
    status = run_job("status", "--format", "json", env=denv)
    assert [name] == [d["object"] for d in json.loads(status.stdout)["drift"]]

    warned = run_job("run", env=denv)
    assert 0 == warned.code, warned.failure
    events = names(warned, "schema.drift")
    assert events.index("schema.drift") < events.index("migration.start")
    # the schema it left is the one recorded now: the next comparison starts from it
    assert [] == run_job("check", env=denv).events("schema.drift")


def test_accept_schema_records_a_hand_made_change_as_meant(db: Db, denv: dict[str, str]) -> None:
    assert 0 == run_job("run", env={**denv, "MIGRATE_TARGET": "d002"}).code
    db.query("CREATE INDEX hotfix ON books (author_id)")
    assert 9 == run_job("check", env={**denv, "MIGRATE_TARGET": "d002", "MIGRATE_ON_DRIFT": "refuse"}).code

    accepted = run_job("accept", "--schema", "--reason", "hotfix from incident 42", env=denv)

    assert 0 == accepted.code, accepted.failure
    assert (1, "hotfix from incident 42") == (accepted.event("schema.accepted")["differed"],
                                              accepted.event("schema.accepted")["reason"])
    assert 0 == run_job("run", env={**denv, "MIGRATE_ON_DRIFT": "refuse"}).code
    assert 2 == run_job("accept", "--schema", env=denv).code  # --reason is required
    assert 2 == run_job("accept", "--schema", "--reason", " ", env=denv).code


# --- models against the database -----------------------------------------------------------------

def test_drift_reports_every_kind_alembic_compares(db: Db, denv: dict[str, str]) -> None:
    assert 0 == run_job("run", env=denv).code
    code, clean = drift_of(denv)
    assert (0, [], "compared") == (code, clean["differences"], clean["models"])

    db.query("""
        CREATE TABLE console_notes (id int);
        ALTER TABLE authors ADD COLUMN nickname text;
        ALTER TABLE books DROP COLUMN isbn;
        ALTER TABLE authors ALTER COLUMN name TYPE varchar(150);
        ALTER TABLE books ALTER COLUMN title DROP NOT NULL;
        DROP INDEX ix_books_title;
        ALTER TABLE authors DROP CONSTRAINT uq_authors_email;
        ALTER TABLE books DROP CONSTRAINT fk_books_author;
    """)
    code, report = drift_of(denv)

    assert 9 == code
    models = found(report, "models")
    assert ("public.console_notes", "table", None, "id") in models
    assert ("public.authors.nickname", "column", None, "TEXT") in models
    assert ("public.books.isbn", "column", "VARCHAR(20)", None) in models
    assert ("public.authors.name", "column type", "VARCHAR(100)", "VARCHAR(150)") in models
    assert ("public.books.title", "column nullable", "False", "True") in models
    assert ("public.ix_books_title", "index", "index on books (title)", None) in models
    assert ("public.authors.uq_authors_email", "constraint", "unique (email)", None) in models
    assert ("public.books.fk_books_author", "foreign key", "foreign key (author_id) references authors (id)",
            None) in models
    assert 8 == len(models)
    # the same objects against the schema the job left (there, the new table's column is one more)
    assert ("public.console_notes.id", "column", None, "integer") in found(report, "recorded")
    assert 9 == len(found(report, "recorded"))
    assert "op.create_index(" in report["operations"] and "op.drop_table('console_notes')" in report["operations"]


def test_excludes_and_the_jobs_own_tables_are_never_drift(db: Db, denv: dict[str, str]) -> None:
    assert 0 == run_job("run", env=denv).code
    db.query("CREATE TABLE pgboss_jobs (id int); CREATE INDEX pgboss_idx ON pgboss_jobs (id); "
               "ALTER TABLE authors ADD COLUMN audit_stamp text")
    everything = {**denv, "MIGRATE_X_ARGS": "include_schemas=1"}  # autogenerate sees the job's schema too
    code, report = drift_of(everything)
    assert 9 == code
    assert not [d for d in report["differences"] if "migrate_job" in d["object"] or "alembic_version" in d["object"]]

    code, report = drift_of({**everything, "MIGRATE_DRIFT_EXCLUDE": "public.pgboss_*, *.audit_stamp"})
    assert (0, []) == (code, report["differences"]), report


def test_drift_waits_for_a_deploy_in_flight_instead_of_reporting_it(db: Db, denv: dict[str, str]) -> None:
    assert 0 == run_job("run", env={**denv, "MIGRATE_TARGET": "d002"}).code
    deploy = start_job("run", env={**denv, "DRIFT_SLEEP": "3"})
    started = time.monotonic()
    # (the deploy holds the lock once its d003 is running: the schema is half-way)
    while not db.query("SELECT 1 FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep(3%'"):
        assert time.monotonic() - started < 30
        time.sleep(0.05)

    code, report = drift_of(denv)

    assert 0 == finish(deploy).code
    assert (0, [], ["d003"]) == (code, report["differences"], report["current"])


def test_drift_without_models_or_a_record_says_what_it_could_not_compare(db: Db, env: dict[str, str]) -> None:
    lint_env = {**env, "ALEMBIC_CONFIG": scenario("lint"), "MIGRATE_HISTORY_TABLE": "off", "MIGRATE_BACKUP": "off"}
    assert 0 == run_job("run", env=lint_env).code
    code, report = drift_of(lint_env)
    assert (0, None) == (code, report["recorded_at"])
    assert "no target_metadata" in report["models"]


def test_a_table_another_session_holds_never_stops_the_check_or_the_run(db: Db, denv: dict[str, str]) -> None:
    """Printing a column default opens its table: while another session holds one ACCESS
    EXCLUSIVE, the comparison before the revisions and the record after them give up (each says
    so) after a second, and the run goes on as it would without them."""
    assert 0 == run_job("run", env={**denv, "MIGRATE_TARGET": "d002"}).code
    blocker = db.connect()
    blocker.autocommit = False
    try:
        with blocker.cursor() as cur:
            cur.execute("LOCK TABLE authors IN ACCESS EXCLUSIVE MODE")
        result = run_job("run", env={**denv, "MIGRATE_ON_DRIFT": "refuse"})
    finally:
        blocker.rollback()
        blocker.close()

    assert 0 == result.code, result.failure
    assert "lock timeout" in result.event("schema.unchecked")["error"]
    assert "lock timeout" in result.event("schema.not_recorded")["error"]
    assert ["d003"] == db.version()
