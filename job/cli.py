"""Command line: argparse verbs → settings → the command (the pipeline, another command, or a fleet
of either); job.ending turns how it ended into the exit code."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from typing import Any, Callable

from job import __version__, commands, config, credentials, db, ending, logs, pipeline, text
from job.errors import ConfigError, LoopsOverSchemas, Pending, RevisionError
from job.logs import log

class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse would print usage; raise so it is logged as JSON
        raise ConfigError(f"{message} (see `migrate-job --help`)")


def parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    for option in config.OPTIONS:  # every setting has its flag (job.config.OPTIONS)
        help = f"{option.help} ({option.variable})"
        flags = [option.short, option.flag] if option.short else [option.flag]
        if isinstance(option.default, bool):
            common.add_argument(*flags, dest=option.field, action=argparse.BooleanOptionalAction, default=None,
                                help=help)
        else:
            common.add_argument(*flags, dest=option.field, choices=option.choices, help=help,
                                action="append" if option.repeat else "store",
                                metavar="KEY=VALUE" if option.repeat else None)

    top = _Parser(prog="migrate-job", description="Run Alembic migrations safely, once, with a backup.")
    top.add_argument("--version", action="version", version=f"migrate-job {__version__}")
    verbs = top.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    verbs.add_parser("run", parents=[common], help="wait, lock, back up, upgrade to the target, verify")
    verbs.add_parser("wait", parents=[common], help="wait until the database accepts queries")
    check = verbs.add_parser("check", parents=[common], help="exit 0 at the target, 8 when migrations are pending")
    check.add_argument("--wait", action="store_true", help="block until at the target or the wait timeout passes")
    check.add_argument("--format", choices=("text", "json"), default="text")
    plan = verbs.add_parser("plan", parents=[common], help="print current, target and pending revisions")
    plan.add_argument("--sql", action="store_true", help="print the offline SQL of the pending revisions")
    plan.add_argument("--format", choices=("text", "json"), default="text")
    status = verbs.add_parser("status", parents=[common], help="revisions, pending, lock holder, backups, history")
    status.add_argument("--format", choices=("text", "json"), default="text")
    backup = verbs.add_parser("backup", parents=[common], help="take a backup now, under the lock")
    backup.add_argument("--list", action="store_true", help="list the backups and their sidecars instead")
    backup.add_argument("--format", choices=("text", "json"), default="text")
    restore = verbs.add_parser("restore", parents=[common], help="restore a backup, under the lock")
    restore.add_argument("backup_name", metavar="BACKUP", help="a backup file, or its name in MIGRATE_BACKUP_DIR")
    restore.add_argument("--yes", action="store_true", help="yes, replace the database's contents")
    restore.add_argument("--force", action="store_true", help="restore a backup of another database")
    downgrade = verbs.add_parser("downgrade", parents=[common], help="back up, then downgrade under the lock")
    downgrade.add_argument("revision", metavar="REVISION", help="revision to go down to (or base, or -1)")
    downgrade.add_argument("--yes", action="store_true", help="yes, undo revisions")
    lint = verbs.add_parser("lint", parents=[common], help="check the pending revisions' SQL for unsafe operations")
    lint.add_argument("--all", action="store_true", help="every revision from base, offline (no database)")
    lint.add_argument("--allow", dest="lint_allow", help="the same as --lint-allow")
    rehearse = verbs.add_parser("rehearse", parents=[common],
                                help="apply the pending revisions to a throwaway copy and report what each did")
    rehearse.add_argument("--format", choices=("text", "json"), default="text")
    drift = verbs.add_parser("drift", parents=[common], help="compare the database with the schema the job recorded, "
                             "the models and the applied revisions' files; exit 9 on drift (read-only)")
    drift.add_argument("--format", choices=("text", "json"), default="text")
    accept = verbs.add_parser("accept", parents=[common],
                              help="record an edited applied revision, or the live schema, as meant (who, when, why)")
    accept.add_argument("revisions", metavar="REVISION", nargs="*",
                        help="applied revisions whose changed files to accept (none: every changed one)")
    accept.add_argument("--schema", action="store_true", help="record the live schema as the one expected at its revision")
    accept.add_argument("--reason", required=True, help="why the change is meant (recorded)")
    verbs.add_parser("manifest", parents=[common],
                     help="record the script heads so start-ups at head skip loading Alembic (run at image build)")
    return top


def cmd_run(settings: config.Settings, args: argparse.Namespace) -> tuple[str, int]:
    return pipeline.run(settings), 0


def cmd_wait(settings: config.Settings, args: argparse.Namespace) -> tuple[str, int]:
    return commands.wait(settings), 0


def cmd_check(settings: config.Settings, args: argparse.Namespace) -> tuple[str, int]:
    outcome, code, report = checked(settings, args)
    if args.format == "json":
        _out(json.dumps(report))
    return outcome, code


def checked(settings: config.Settings, args: argparse.Namespace) -> tuple[str, int, dict[str, Any]]:
    """`check` of one database (or tenant): at-target or pending, and what its JSON says."""
    the_plan = commands.check(settings, block=args.wait)
    at_target = not the_plan.pending
    log.info("check", at_target=at_target, current=list(the_plan.current), pending=len(the_plan.pending))
    report = {"at_target": at_target, **the_plan.as_dict()}
    return ("at-target", 0, report) if at_target else ("pending", Pending.exit_code, report)


def cmd_plan(settings: config.Settings, args: argparse.Namespace) -> tuple[str, int]:
    the_plan, sql = commands.plan_of(settings, sql=args.sql)
    if sql is not None:
        _out(sql)
    elif args.format == "json":
        _out(json.dumps(the_plan.as_dict()))
    else:
        _out(text.plan(the_plan))
    return "planned", 0


def cmd_status(settings: config.Settings, args: argparse.Namespace) -> tuple[str, int]:
    report = commands.status(settings)
    _out(json.dumps(report._asdict()) if args.format == "json" else text.status(report))
    return "reported", RevisionError.exit_code if report.problem else 0


def cmd_backup(settings: config.Settings, args: argparse.Namespace) -> tuple[str, int]:
    if not args.list:
        commands.backup_now(settings)
        return "backed-up", 0
    found = commands.backups(settings)
    _out(json.dumps(found) if args.format == "json" else text.backups(found))
    return "listed", 0


def cmd_restore(settings: config.Settings, args: argparse.Namespace) -> tuple[str, int]:
    if not args.yes:
        raise ConfigError("restore replaces the database's contents with the backup's: add --yes to go ahead")
    commands.restore(settings, args.backup_name, force=args.force)
    return "restored", 0


def cmd_downgrade(settings: config.Settings, args: argparse.Namespace) -> tuple[str, int]:
    if not args.yes:
        raise ConfigError(f"downgrade undoes revisions down to {args.revision}: add --yes to go ahead")
    return commands.downgrade(settings, args.revision), 0


def cmd_lint(settings: config.Settings, args: argparse.Namespace) -> tuple[str, int]:
    commands.lint(settings, everything=args.all, allow=settings.lint_allow)
    return "clean", 0


def cmd_rehearse(settings: config.Settings, args: argparse.Namespace) -> tuple[str, int]:
    from job import rehearse

    report = rehearse.rehearse(settings)
    if args.format == "json":
        _out(json.dumps(report._asdict()))
    elif sys.stdout.isatty():
        _out(text.rehearsal(report))
    rehearse.check(report)
    return "rehearsed", 0


def cmd_drift(settings: config.Settings, args: argparse.Namespace) -> tuple[str, int]:
    from job import drift

    report = drift.drift(settings)
    if args.format == "json":
        _out(json.dumps(report._asdict()))
    elif sys.stdout.isatty():
        _out(text.drift(report))
    drift.check_report(report)
    return "no-drift", 0


def cmd_accept(settings: config.Settings, args: argparse.Namespace) -> tuple[str, int]:
    from job import drift

    drift.accept(settings, args.revisions, args.reason, args.schema)
    return "accepted", 0


def cmd_manifest(settings: config.Settings, args: argparse.Namespace) -> tuple[str, int]:
    path = commands.write_manifest(settings)
    log.info("manifest.written", path=str(path))
    return "written", 0


COMMANDS: dict[str, Callable[[config.Settings, argparse.Namespace], tuple[str, int]]] = {
    "run": cmd_run,
    "wait": cmd_wait,
    "check": cmd_check,
    "plan": cmd_plan,
    "status": cmd_status,
    "backup": cmd_backup,
    "restore": cmd_restore,
    "downgrade": cmd_downgrade,
    "lint": cmd_lint,
    "rehearse": cmd_rehearse,
    "drift": cmd_drift,
    "accept": cmd_accept,
    "manifest": cmd_manifest,
}
# commands whose product is on stdout: their logs go to stderr
PRINTS = {"plan", "status"}


def tenant_status(settings: config.Settings) -> tuple[str, int, dict[str, Any]]:
    """`status` of one tenant of a fleet: at-target or pending, and the state the fleet reports."""
    report = commands.status(settings)
    last = report.history[0] if report.history else None
    state = {"current": report.current, "heads": report.heads, "pending_count": report.pending_count,
             "lock_held": report.lock["held"], "drift": len(report.drift),
             "last_run": {k: last[k] for k in ("command", "outcome", "started_at")} if last else None}
    if report.problem:
        return "unknown", RevisionError.exit_code, {**state, "problem": report.problem}
    return ("pending" if report.pending_count else "at-target"), 0, state


# what each command that takes MIGRATE_FLEET runs on one tenant (None: job.pipeline's run)
FLEET_COMMANDS: dict[str, Callable[[argparse.Namespace], Any]] = {
    "run": lambda args: None,
    "check": lambda args: lambda one: checked(one, args),
    "status": lambda args: tenant_status,
}
# the commands that ignore MIGRATE_FLEET: they touch no tenant's schema (wait for the server; the
# offline ones); every other one works on one tenant and refuses a fleet rather than do one alone
ONE_OR_ANY = {"wait", "lint", "manifest"}


def over_fleet(settings: config.Settings, args: argparse.Namespace) -> tuple[Any, ...]:
    """`run`, `check` or `status` on every tenant of the fleet (job.fleet)."""
    from job import fleet

    return fleet.run(settings, os.environ, vars(args), args.command, FLEET_COMMANDS[args.command](args))


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    env = os.environ
    logs.redactor.add([env["PGPASSWORD"]] if env.get("PGPASSWORD") else [])
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parser().parse_args(argv or ["run"])
    except ConfigError as e:
        logs.configure(*config.log_options(env, {}))
        return ending.failed(e, started, config.termination_log(env, {}))[0]
    prints = args.command in PRINTS or getattr(args, "format", "text") == "json" or getattr(args, "list", False)
    # `run` holds its first lines until it has tried the lock (see job.logs)
    logs.configure(*config.log_options(env, vars(args)), stream=sys.stderr if prints else sys.stdout,
                   hold=args.command == "run")
    db.install_signal_handlers()
    warnings.showwarning = logs.show_warning
    log.info("run.start", command=args.command, version=__version__)
    termination = config.termination_log(env, vars(args))  # (the setting, read before the others)

    def work() -> tuple[Any, ...]:
        offline = args.command == "manifest" or (args.command == "lint" and args.all)
        settings = config.load(env, vars(args), need_database=not offline)
        logs.redactor.add(settings.secrets)
        credentials.install(settings.password_source, logs.redactor.add)
        if settings.fleet and args.command in FLEET_COMMANDS:
            return over_fleet(settings, args)
        if settings.fleet and args.command not in ONE_OR_ANY:
            raise ConfigError(f"{args.command} works on one tenant, and MIGRATE_FLEET names a fleet: unset "
                              "MIGRATE_FLEET and name the tenant (MIGRATE_TENANT_SCHEMA for a schema, DATABASE_URL "
                              "for a database); run, check and status take the fleet")
        try:
            return COMMANDS[args.command](settings, args)
        except LoopsOverSchemas as loop:
            if args.command not in FLEET_COMMANDS:
                raise
            # (nothing was changed: the run found the loop while asking env.py where its version table is)
            log.warning("fleet.from_env_py", schemas=len(loop.schemas), first=loop.schemas[:5],
                        reason="env.py runs the migrations once per schema: each schema is migrated as a tenant "
                               "of a fleet (MIGRATE_FLEET naming them says so, or names others)")
            return over_fleet(settings._replace(fleet=" ".join(loop.schemas)), args)

    return ending.attempt(work, started, termination).exit_code


def _out(text: str) -> None:
    logs.output_for(sys.stdout).write(text if text.endswith("\n") else text + "\n")
