"""`rehearse`: the pending revisions applied to a throwaway copy of the database (job.scratch)
through the same pipeline as `run` (job.pipeline: the same per-revision transactions, timeouts and
env.py), with a recorder beside them (job.recorder); then, where the revisions have downgrades,
down to the starting revision and up again, the schema compared each way (job.schema).

The report says, per revision and per statement, how long it took, what it locked and for how
long, what it rewrote, which indexes it built and how many rows it changed. A threshold crossed is
a finding, and a finding ends the rehearsal with exit 6 naming the revision: the longest ACCESS
EXCLUSIVE hold on a table with rows (MIGRATE_REHEARSAL_MAX_EXCLUSIVE), a downgrade that does not
leave the schema its upgrade found, an upgrade run again that does not make what it made the first
time. The live database is only read (a dump, or nothing when a backup at its revision is there).
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any, Iterator, NamedTuple

from job import commands, commits, db, logs, pipeline, plan, schema, scratch, stepper, tables
from job.config import Settings
from job.errors import ConfigError, Interrupted, JobError, MigrationFailed
from job.logs import log
from job.recorder import Recorder
from job.wait import connected


class Findings(JobError):
    """What the rehearsal found past a threshold (exit 6, as a failed migration: the deploy stops)."""

    exit_code = 6


class Finding(NamedTuple):
    revision: str
    finding: str  # exclusive-lock, downgrade-incomplete, upgrade-differs
    detail: str


class Report(NamedTuple):
    """What `rehearse` found (its JSON document is this, as a dict)."""

    database: str
    copy: str
    source: str
    started_at: list[str]
    revisions: list[dict[str, Any]]
    round_trip: dict[str, Any]
    findings: list[dict[str, str]]
    seconds: float


def rehearse(settings: Settings) -> Report:
    """Rehearse the pending revisions on a copy; the copy is dropped however this ends."""
    if settings.other_databases:
        raise ConfigError("rehearse copies one database: a multidb env.py's other databases "
                          f"({', '.join(name for name, _ in settings.other_databases)}) are not copied")
    started = time.monotonic()
    with connected(settings) as live, scratch.made(settings, live) as copy:
        database = db.database_name(live)
        on_copy = settings._replace(database=copy.database, backup="off", sections=(), lock_key=None)
        watcher = _Watcher(on_copy, copy.name)
        recorder = Recorder(copy.database.connect_kwargs(f"{settings.application_name}/rehearsal"[:63]),
                            tables.of(settings.history_table).schema, settings.version_table, copy.name)
        stepper.observers[:] = [recorder, watcher]
        recorder.listen()
        try:
            with logs.about(rehearsal=copy.name), _pointing_at(copy.database):
                current = watcher.current()
                failed = _failing(watcher, "fails", lambda: pipeline.run(on_copy))
                recorder.recording = False
                revisions = [r.as_dict() for r in recorder.revisions]
                round_trip = (_round_trip(settings, on_copy, watcher, recorder, current) if not failed else
                              {"done": False, "reason": "a revision failed"})
        finally:
            stepper.observers[:] = []
            recorder.close()
            watcher.close()
    findings = [*_exclusive_holds(settings, recorder), *watcher.findings]
    report = Report(database, copy.name, copy.source, list(current), revisions, round_trip,
                    [f._asdict() for f in findings], round(time.monotonic() - started, 3))
    for revision in revisions:
        log.info("rehearsal.revision", **{k: v for k, v in revision.items() if k != "statements"},
                 statements=len(revision["statements"]))
    for finding in findings:
        log.warning("rehearsal.finding", **finding._asdict())
    log.info("rehearsal.done", revisions=len(revisions), findings=len(findings), seconds=report.seconds)
    return report


@contextlib.contextmanager
def _pointing_at(database: Any) -> Iterator[None]:
    """DATABASE_URL names the copy while the rehearsal runs: an env.py that reads it itself (not
    sqlalchemy.url) migrates the copy too. (The job's children never get DATABASE_URL.)"""
    was = os.environ.get("DATABASE_URL")
    if was is not None:
        os.environ["DATABASE_URL"] = database.sqlalchemy_url()
    try:
        yield
    finally:
        if was is not None:
            os.environ["DATABASE_URL"] = was


def check(report: Report) -> None:
    """Exit 6 on a finding, naming the first."""
    if report.findings:
        first = report.findings[0]
        more = f" (and {len(report.findings) - 1} more findings, listed above)" if len(report.findings) > 1 else ""
        raise Findings(f"rehearsal: revision {first['revision']}: {first['detail']}{more}")


def _round_trip(settings: Settings, on_copy: Settings, watcher: _Watcher, recorder: Recorder,
                current: tuple[str, ...]) -> dict[str, Any]:
    """Down to where the copy started and up again, when every rehearsed revision has a downgrade."""
    rehearsed = [r.revision for r in recorder.revisions if r.direction == "upgrade"]
    if not settings.rehearsal_round_trip:
        return {"done": False, "reason": "MIGRATE_REHEARSAL_ROUND_TRIP is off"}
    if not rehearsed:
        return {"done": False, "reason": "nothing was pending"}
    if len(current) > 1:
        return {"done": False, "reason": "the database started at several heads"}
    irreversible = watcher.without_downgrade(rehearsed)
    if irreversible:
        return {"done": False, "reason": f"revision {irreversible[0]} has no downgrade (its body does nothing)"}
    log.info("rehearsal.round_trip", down_to=current[0] if current else "base", revisions=len(rehearsed))
    watcher.going = "down"
    if _failing(watcher, "downgrade-fails", lambda: commands.downgrade(on_copy, current[0] if current else "base")):
        return {"done": False, "reason": "a downgrade failed", "revisions": rehearsed}
    watcher.going = "up again"
    if _failing(watcher, "upgrade-fails-after-downgrade", lambda: pipeline.run(on_copy)):
        return {"done": False, "reason": "an upgrade after its downgrade failed", "revisions": rehearsed}
    return {"done": True, "revisions": rehearsed,
            "differences": [f._asdict() for f in watcher.findings]}


def _failing(watcher: _Watcher, finding: str, run: Any) -> bool:
    """Run a pass on the copy; a revision that fails there is a finding (the copy takes the blow)."""
    try:
        run()
    except MigrationFailed as e:
        signum = db.received_signal()
        if signum is not None:  # (a signal wins over whatever its cancel made fail, as in `run`)
            raise Interrupted(signum) from None
        watcher.findings.append(Finding(e.revision or "?", finding, str(e)))
        return True
    return False


def _exclusive_holds(settings: Settings, recorder: Recorder) -> list[Finding]:
    found = []
    for revision in recorder.revisions:
        longest = revision.longest_exclusive()
        if longest is not None and longest[1] > settings.rehearsal_max_exclusive:
            table, seconds = longest
            found.append(Finding(revision.revision, "exclusive-lock",
                                 f"it held ACCESS EXCLUSIVE on {table} (which has rows) for {seconds:.3f} s, past "
                                 f"MIGRATE_REHEARSAL_MAX_EXCLUSIVE={settings.rehearsal_max_exclusive:g}: every query "
                                 "of the application on that table would wait that long"))
    return found


class _Watcher:
    """A stepper observer on the copy: the schema before and after each revision of the first pass,
    compared with what each downgrade and each upgrade run again leaves."""

    def __init__(self, on_copy: Settings, copy_name: str) -> None:
        self.settings = on_copy
        self.copy_name = copy_name
        self.going = "up"
        self.before: dict[str, schema.Snapshot] = {}
        self.after: dict[str, schema.Snapshot] = {}
        self.findings: list[Finding] = []
        self._conn: Any = None
        self._project: Any = None

    def conn(self) -> Any:
        if self._conn is None:
            self._conn = db.connect(self.settings.database.connect_kwargs(
                f"{self.settings.application_name}/rehearsal"[:63]))
        return self._conn

    def current(self) -> tuple[str, ...]:
        return plan.current_revisions(self.conn(), self.settings.version_table)

    def snapshot(self) -> schema.Snapshot:
        excluded = schema.excluded_by_job(self.conn(), tables.of(self.settings.history_table),
                                          self.settings.version_table)
        return schema.snapshot(self.conn(), *excluded)

    def started(self, step: Any, direction: str, _connection: Any) -> None:
        if self.going == "up" and direction == "upgrade":
            self.before[step.revision] = self.snapshot()

    def committed(self, step: Any, direction: str, _seconds: float) -> None:
        if self.going == "up" and direction == "upgrade":
            self.after[step.revision] = self.snapshot()
        elif self.going == "down" and direction == "downgrade" and step.revision in self.before:
            self._compare(step.revision, "downgrade-incomplete", self.before[step.revision],
                          "its downgrade does not leave the schema its upgrade found")
        elif self.going == "up again" and direction == "upgrade" and step.revision in self.after:
            self._compare(step.revision, "upgrade-differs", self.after[step.revision],
                          "run again after its downgrade, its upgrade does not make what it made the first time")

    def failed(self, _step: Any, _direction: str) -> None:
        pass

    def _compare(self, revision: str, finding: str, expected: schema.Snapshot, what: str) -> None:
        differences = schema.differences(expected, self.snapshot())
        if differences:
            shown = "; ".join(str(d) for d in differences[:5])
            more = f" (and {len(differences) - 5} more)" if len(differences) > 5 else ""
            self.findings.append(Finding(revision, finding, f"{what}: {shown}{more}"))

    def without_downgrade(self, revisions: list[str]) -> list[str]:
        """The revisions whose downgrade() does nothing (`pass`, a docstring): irreversible by design.
        (A sourceless .pyc revision cannot be read: it is taken to have one.)"""
        from alembic.script import ScriptDirectory

        from job.migrate import _config, source_of

        scripts = ScriptDirectory.from_config(_config(self.settings.alembic))
        return [r for r in revisions if (text := source_of(scripts, r)) and commits.does_nothing(text, "downgrade")]

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
