"""`lint`: each pending revision's offline SQL, checked by squawk for operations that lock or
rewrite tables unsafely. Findings name the revision; an allow-list accepts some on purpose."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Collection, Iterable, Mapping, NamedTuple

from job.alembic_files import AlembicFiles
from job.commits import ADVICE, Ending
from job.errors import ConfigError
from job.lineage import ancestry
from job.plan import Step

# Rules the job itself takes care of, for every revision.
JOB_ALLOWS = {
    "require-lock-timeout": "the job sets lock_timeout (MIGRATE_STATEMENT_LOCK_TIMEOUT) on its session",
    "require-statement-timeout": "the job sets statement_timeout (MIGRATE_STATEMENT_TIMEOUT) when asked to",
    "prefer-robust-stmts": "each revision runs in its own transaction, so a failure leaves nothing half-done",
    "transaction-nesting": "the offline SQL wraps each revision in the transaction the job runs it in",
}


# Operations that break code still using what they change: the previous release's, during a rolling
# update or after an app rollback. A revision with one of these should declare it (job.lineage).
BREAKS_OLD_CODE = {
    "ban-drop-column": "drops a column",
    "ban-drop-table": "drops a table",
    "renaming-column": "renames a column",
    "renaming-table": "renames a table",
    "changing-column-type": "changes a column's type",
    "adding-required-field": "adds a NOT NULL column without a default (older code's inserts fail)",
}


class Finding(NamedTuple):
    revision: str
    rule: str
    message: str
    line: int


def allowances(files: AlembicFiles, extra: str | None) -> set[str]:
    """Entries `rule` or `revision:rule`: from alembic.ini's [migrate_job] lint_allow (or pyproject.toml's
    [tool.migrate-job] lint-allow), MIGRATE_LINT_ALLOW, --allow."""
    listed = files.migrate_job_option("lint_allow") or ""
    entries = [line.split("#", 1)[0].strip() for line in listed.splitlines()]
    entries += [e.strip() for e in (extra or "").split(",")]
    return {e for e in entries if e} | set(JOB_ALLOWS)


def squawk() -> str:
    found = shutil.which("squawk") or str(Path(sys.executable).parent / "squawk")
    if not Path(found).exists():
        raise ConfigError("squawk not found: pip install squawk-cli")
    return found


# A rule of the job's own, beside squawk's: a revision that commits part of its work before it
# ends (job.commits). The job runs such revisions, as Alembic does (history cannot be rewritten);
# lint says it of new ones, where it can still be written atomically.
NONATOMIC = "nonatomic-revision"


def after(steps: list[Step], start_after: str | None, graph: Mapping[str, Any]) -> list[Step]:
    """The steps lint checks: those after `start_after` (MIGRATE_LINT_START_AFTER: the revision
    history is taken to end at, as strong_migrations' `start_after`, by revision rather than by
    timestamp), that is every one but it and what it stands on; all without it."""
    if not start_after:
        return steps
    if start_after not in graph:
        raise ConfigError(f"MIGRATE_LINT_START_AFTER={start_after!r} is not a revision of these scripts")
    history = set(ancestry([start_after], graph))
    return [s for s in steps if s.revision not in history]


def check(sql_by_step: list[tuple[Step, str]], allowed: set[str], pg_version: str,
          marked_breaking: Collection[str] = (), endings: Iterable[Ending] = ()) -> tuple[list[Finding], list[Finding]]:
    """Run squawk over each revision's SQL, and the job's own rule over how each ends its
    transaction (`endings`). Return the findings no allowance covers, and the operations that break
    the previous release's code in revisions not marked `breaks_previous_release` (suggestions,
    whether or not allowed: an allowance says the lock is acceptable, not that old code copes)."""
    own = [Finding(e.revision, NONATOMIC, f"{e.problem}: a failure after its commit leaves committed work a "
                   f"re-run trips over. Instead: {ADVICE}", 0) for e in endings if e.problem]
    own = [f for f in own if f.rule not in allowed and f"{f.revision}:{f.rule}" not in allowed]
    with tempfile.TemporaryDirectory(prefix="migrate-job-lint-") as tmp:
        files = {}
        for index, (step, text) in enumerate(sql_by_step):
            path = Path(tmp) / f"{index:05d}.sql"
            path.write_text(text)
            files[str(path)] = step
        if not files:
            return own, []
        result = subprocess.run(
            [squawk(), "--reporter", "json", f"--pg-version={pg_version}", *files],
            capture_output=True, text=True,
        )
    try:
        reported: list[dict[str, Any]] = json.loads(result.stdout or "[]")
    except ValueError:
        raise ConfigError(f"squawk failed: {(result.stderr or result.stdout).strip()[:500]}") from None
    findings, suggestions = [], []
    for item in reported:
        step = files[item["file"]]
        rule = item["rule_name"]
        if rule in BREAKS_OLD_CODE and step.revision not in marked_breaking:
            suggestions.append(Finding(
                step.revision, rule,
                f"this revision {BREAKS_OLD_CODE[rule]}: if the previous release still uses it, set "
                "`breaks_previous_release = \"why\"` in the revision (older pods then stop rather than fail), "
                "or ship it a release after the code stops using it", item["line"] + 1))
        if rule in allowed or f"{step.revision}:{rule}" in allowed:
            continue
        findings.append(Finding(step.revision, rule, item["message"], item["line"] + 1))
    return own + findings, suggestions
