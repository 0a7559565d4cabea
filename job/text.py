"""What the commands print for people (`--format text`): plans, status, backup lists."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from job import lock
from job.commands import Status
from job.plan import Plan


def plan(the_plan: Plan) -> str:
    return "\n".join([
        f"current: {', '.join(the_plan.current) or 'base (empty)'}",
        f"target:  {the_plan.target} ({', '.join(the_plan.heads)})",
        f"pending: {len(the_plan.pending)}",
        *(f"  {s.revision}  {s.description}" for s in the_plan.pending),
        *_ahead(the_plan.as_dict()["ahead"]),
    ])


def status(report: Status) -> str:
    holder = report.lock["holder"]
    return "\n".join([
        f"database: {report.database}" + (f" (tenant schema {report.tenant_schema})" if report.tenant_schema else ""),
        f"current:  {', '.join(report.current) or 'base (empty)'}",
        f"heads:    {', '.join(report.heads)}",
        f"pending:  {report.pending_count if report.problem is None else 'unknown: ' + report.problem}",
        *(f"  {p['revision']}  {p['description']}" for p in report.pending or []),
        *_ahead(report.ahead or []),
        "lock:     " + ("free" if holder is None else f"held by {lock.describe(holder)}"),
        "backups:" + ("  none" if not report.backups else "")
        + (f"  ({report.backups_problem})" if report.backups_problem else ""),
        *(f"  {Path(b['path']).name}  {'+'.join(b['from']) or 'base'} -> {'+'.join(b['to']) or 'base'}  "
          f"{size(b['bytes'])}  {age(b['age_seconds'])} ago" for b in report.backups),
        "history:" + ("  none" if not report.history else ""),
        *(f"  {h['started_at'][:19]}  {h['command']:<9} {h['outcome'] or 'no outcome (killed?)':<12} "
          f"{(h['seconds'] or 0):.1f} s  {h['host']}  {h['revisions'] or ''}" for h in report.history),
        "schema:   " + ("nothing recorded for this revision yet" if report.schema_recorded_at is None else
                        f"as recorded {report.schema_recorded_at[:19]}" if not report.drift else
                        f"{len(report.drift)} objects differ from the schema recorded {report.schema_recorded_at[:19]}"),
        *differences(report.drift),
    ])


def differences(found: list[dict[str, Any]]) -> list[str]:
    """Drift (job.drift.Found), a line each: against what, the object, expected and found."""
    return [f"  {f['against']:<9} {f['kind']:<16} {f['object']}  expected: {_or_absent(f['expected'])}  "
            f"found: {_or_absent(f['found'])}" for f in found]


def drift(report: Any) -> str:
    """`drift`'s report (job.drift.Report): the differences, then the operations that reconcile the models."""
    lines = [f"database {report.database} at {', '.join(report.current) or 'base'}: "
             f"{len(report.differences) or 'no'} difference{'' if len(report.differences) == 1 else 's'}",
             "recorded schema: " + (report.recorded_at[:19] if report.recorded_at else "none recorded for this revision"),
             f"models: {report.models}", *differences(report.differences)]
    if report.operations:
        lines += ["", "Alembic operations that would bring the database to the models:", report.operations.strip()]
    return "\n".join(lines)


def _or_absent(value: str | None) -> str:
    return "(absent)" if value is None else value


def rehearsal(report: Any) -> str:
    """A rehearsal's report (job.rehearse.Report): a line per revision, its strongest locks under it."""
    lines = [f"rehearsed on a copy of {report.database} ({report.source}), {report.seconds:.1f} s",
             f"{'revision':<14} {'seconds':>8}  {'rows':>8}  rewrote / built"]
    for r in report.revisions:
        lines.append(f"{r['revision']:<14} {r['seconds']:>8.3f}  {r['rows_changed']:>8}  "
                     f"{', '.join(r['rewritten'] + r['indexes_built']) or '-'}")
        lines += [f"  {lock['mode']:<24} {lock['relation']}  {lock['held_seconds']:.3f} s (blocks "
                  f"{lock['blocks']})" for lock in r["locks"]]
    trip = report.round_trip
    lines.append("round trip: " + ("down and up again" if trip.get("done") else f"not done: {trip.get('reason')}"))
    lines += [f"FINDING {f['revision']} {f['finding']}: {f['detail']}" for f in report.findings]
    return "\n".join(lines)


def backups(found: list[dict[str, Any]]) -> str:
    return "\n".join(
        f"{Path(b['path']).name}  {b['database']}  {'+'.join(b['from_revision']) or 'base'} -> "
        f"{'+'.join(b['to_revision']) or 'base'}  {size(b['bytes'])}  {b['created_at']}"
        for b in found
    ) or "no backups"


def _ahead(ahead: list[dict[str, str]]) -> list[str]:
    """Lines saying the database is ahead of these scripts, and by what; none when it is not."""
    if not ahead:
        return []
    return [f"ahead:   the database has {len(ahead)} revision(s) these scripts lack (newer code migrated it; "
            "this code may run on it)", *(f"  {a['revision']}  {a['description']}" for a in ahead)]


def size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def age(seconds: float) -> str:
    for unit, length in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= length:
            return f"{seconds / length:.0f} {unit}"
    return f"{seconds:.0f} s"


def fleet_status(tenants: list[dict[str, Any]]) -> str:
    """`status` over a fleet: a row per tenant (job.fleet), the ones needing attention first."""
    order = {"failed": 0, "interrupted": 0, "unknown": 1, "pending": 2, "not-started": 3, "at-target": 4}
    rows = [("tenant", "state", "current", "pending", "lock", "last run")]
    for t in sorted(tenants, key=lambda t: (order.get(t["outcome"], 1), t["tenant"])):
        last = t.get("last_run")
        rows.append((t["tenant"], t["outcome"], ", ".join(t.get("current") or []) or "base",
                     "?" if t.get("pending_count") is None else str(t["pending_count"]),
                     "held" if t.get("lock_held") else "free",
                     f"{last['command']} {last['outcome'] or 'running'} {last['started_at'][:19]}" if last
                     else t.get("error") or t.get("problem") or ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows) + "\n"
