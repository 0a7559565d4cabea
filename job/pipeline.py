"""`run`, the pipeline: wait → lock → plan → drift → backup → upgrade → verify, each step a call into its
own module. Only the CLI imports this module, and the rehearsal (job.rehearse), which runs it on a
copy of the database; the other commands (job.commands) share the steps, not the pipeline."""

from __future__ import annotations

import random
import time

from job import history, lock, manifest, plan, wait
from job.config import Settings
from job.project import Alembic


def run(settings: Settings) -> str:
    """Migrate the database to the target under the lock; return the outcome ("migrated" or "up-to-date")."""
    started = time.monotonic()
    while True:
        try:
            return run_once(settings, started)
        except lock.MakeRoom:  # waited holding nothing: start over in a moment, on a new connection
            time.sleep(random.uniform(0.5, 2.0))


def run_once(settings: Settings, started: float) -> str:
    """One attempt at `run`, its lock timeout counted from `started`."""
    scripts = manifest.scripts(settings.alembic)
    with wait.connected(settings) as conn, Alembic(settings, conn) as alembic:
        known = manifest.known_scripts(settings, conn, scripts)
        with lock.for_migration(settings, conn, since=started, shared_first=known is not None,
                                settled=lambda: plan.settled(settings, conn, scripts, known),
                                while_waiting=None if known else alembic.load) as held, \
                lock.other_databases(settings, conn) as others:
            if held.settled:
                plan.log_plan(held.settled)
                return "up-to-date"
            from job import backup, drift, migrate  # (only when there is work: at head a run loads none)

            project, version_table = alembic.project(), alembic.version_table()
            the_plan = migrate.plan_run(settings, conn, project, version_table, others, scripts, known)
            drift.before_migrating(settings, conn, project, version_table, the_plan)
            if not the_plan.pending and settings.backup != "always":
                return "up-to-date"
            with history.of(settings, conn).run("run") as record:
                taken = backup.before_migrating(settings, conn, others, the_plan, record)
                if the_plan.pending:
                    migrate.apply_steps(settings, conn, project, list(the_plan.pending), settings.target, "upgrade",
                                        record, version_table, rows_within=not others, recovery=taken.recovery())
                    migrate.verify(settings, conn, project, version_table, others=others)
                    drift.after_migrating(settings, conn, project, version_table,
                                          [step.revision for step in the_plan.pending], "migrated")
                backup.succeeded(settings, taken)
                record.outcome = "migrated" if the_plan.pending else "up-to-date"
                return record.outcome
