"""Settings, loaded once from the environment and flags; the database URL and its redaction."""

from __future__ import annotations

import configparser
import hashlib
import re
import socket
import sys
from pathlib import Path
from typing import Mapping, NamedTuple

import psycopg2.extensions

from job.errors import ConfigError

SCHEMES = ("postgres://", "postgresql://", "postgresql+psycopg2://")

# Every connection the job opens: a name that points at the pod, and TCP keepalives so a holder
# whose pod vanished loses its session (and so the lock) within about idle + interval * count = 25 s.
CONNECTION_DEFAULTS = {
    "keepalives": "1",
    "keepalives_idle": "10",
    "keepalives_interval": "5",
    "keepalives_count": "3",
    "connect_timeout": "5",
}

# libpq connection parameters that pg_dump/pg_restore get through their conninfo string.
# The password is never one of them: it travels in PGPASSWORD.
_NOT_FOR_CONNINFO = {"password"}

_URL_PASSWORD = re.compile(r"(://[^:/?#@\s]*:)([^@\s]*)(@)")


# Settings, Database and the plan's records are NamedTuples, not dataclasses: importing
# dataclasses (and inspect with it) costs every start-up ~9 ms of CPU, more than the job's own modules.


class Database(NamedTuple):
    """How to reach the database: libpq parameters parsed by libpq itself, password kept aside."""

    params: Mapping[str, str]
    password: str | None = None

    def __repr__(self) -> str:
        return f"Database(params={self.params!r}, password={'***' if self.password else None})"

    @classmethod
    def from_url(cls, url: str) -> Database:
        """Parse any URL form the contract accepts; the `+psycopg2` driver suffix is implied."""
        url = url.strip()
        if not url.startswith(SCHEMES):
            raise ConfigError(
                f"unsupported database URL {redact_url(url)!r}: it must start with one of "
                + ", ".join(SCHEMES)
            )
        libpq_url = "postgresql://" + url.split("://", 1)[1]
        try:
            params = psycopg2.extensions.parse_dsn(libpq_url)
        except psycopg2.ProgrammingError as e:
            raise ConfigError(
                f"invalid database URL {redact_url(url)!r}: {redact_url(str(e)).strip()}"
            ) from None
        password = params.pop("password", None)
        for port in params.get("port", "").split(","):
            if port and not port.isdigit():
                raise ConfigError(f"invalid database URL {redact_url(url)!r}: port {port!r} is not a number")
        return cls(params=params, password=password)

    @classmethod
    def from_libpq_env(cls, env: Mapping[str, str]) -> Database:
        """Leave host, user and database to libpq's PG* variables; remember the password to redact it."""
        return cls(params={}, password=env.get("PGPASSWORD") or None)

    def connect_kwargs(self, application_name: str) -> dict[str, str]:
        """Keyword arguments for psycopg2.connect(); URL parameters win over our defaults."""
        kwargs = {**CONNECTION_DEFAULTS, **self.params, "application_name": application_name}
        if self.password is not None:
            kwargs["password"] = self.password
        return kwargs

    def conninfo_without_password(self, application_name: str) -> str:
        """A libpq conninfo string for pg_dump/pg_restore argv: everything but the password."""
        params = {k: v for k, v in self.params.items() if k not in _NOT_FOR_CONNINFO}
        params["application_name"] = application_name
        return psycopg2.extensions.make_dsn(**params)

    def sqlalchemy_url(self, server_settings: Mapping[str, str] = {}) -> str:
        """A `postgresql+psycopg2://` URL for env.py files that build their own engine.

        `server_settings` reach that engine's sessions through libpq's `options` (-c name=value).
        """
        from sqlalchemy.engine import URL

        query = {k: v for k, v in self.params.items() if k not in ("host", "port", "user", "dbname")}
        if server_settings:
            extra = " ".join(f"-c {k}={v}" for k, v in server_settings.items())
            query["options"] = f"{query['options']} {extra}" if query.get("options") else extra
        port = self.params.get("port")
        return URL.create(
            "postgresql+psycopg2",
            username=self.params.get("user"),
            password=self.password,
            host=self.params.get("host"),
            port=int(port) if port and port.isdigit() else None,
            database=self.params.get("dbname"),
            query=query,
        ).render_as_string(hide_password=False)


def redact_url(text: str) -> str:
    """Mask the password part of any URL in `text`."""
    return _URL_PASSWORD.sub(r"\1***\3", text)


class Settings(NamedTuple):
    """Everything a command needs, resolved once from the environment and command-line flags."""

    # where the database is, and the secret to keep out of every output
    database: Database
    # the Alembic project (alembic.ini); any project works, including a stock `alembic init`
    alembic_config: Path
    # Alembic's version table: `version_table` in alembic.ini (the default lock key derives from it)
    version_table: str = "alembic_version"
    # revision to upgrade to
    target: str = "head"
    # seconds to wait for the database to accept queries
    wait_timeout: float = 60.0
    # seconds to wait for the advisory lock
    lock_timeout: float = 300.0
    # explicit advisory lock key; None derives it from the database name and version table
    lock_key: int | None = None
    # auto (only when something is pending), always, off
    backup: str = "auto"
    # where backups are written
    backup_dir: Path = Path("/backups")
    # newest backups kept per database
    backup_keep: int = 5
    # seconds a DDL statement may wait for a table lock before its revision is retried
    statement_lock_timeout: float = 5.0
    # retries of a revision that hit that lock timeout
    lock_retries: int = 5
    # seconds any statement may run; 0 is no limit
    statement_timeout: float = 0.0
    # run history table; None disables it
    history_table: str | None = "migrate_job_history"
    # names our sessions in pg_stat_activity: the pod's hostname
    application_name: str = "migrate-job"

    @property
    def secrets(self) -> tuple[str, ...]:
        """Strings that must never be printed."""
        return (self.database.password,) if self.database.password else ()


def lock_key_for(database_name: str, version_table: str) -> int:
    """The default advisory lock key: one per database and version table, as a signed 64-bit int."""
    return _hash_key(f"migrate-job:{database_name}:{version_table}")


def parse_lock_key(value: str) -> int:
    """An integer is used as is (it must fit PostgreSQL's bigint); any other string is hashed."""
    try:
        key = int(value)
    except ValueError:
        return _hash_key(value)
    if not -(2**63) <= key < 2**63:
        raise ConfigError(f"MIGRATE_LOCK_KEY {value} does not fit a signed 64-bit integer")
    return key


def _hash_key(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big", signed=True)


def version_table_of(alembic_ini: Path) -> str:
    """The version table name our env.py uses: `version_table` in alembic.ini, else Alembic's default."""
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read(alembic_ini)
    except configparser.Error as e:
        raise ConfigError(f"{str(alembic_ini)!r} is not a valid alembic.ini: {' '.join(str(e).split())}") from None
    if not parser.has_section("alembic"):
        raise ConfigError(f"{str(alembic_ini)!r} has no [alembic] section: is ALEMBIC_CONFIG the right file?")
    return parser.get("alembic", "version_table", fallback="alembic_version")


def load(env: Mapping[str, str], flags: Mapping[str, object], need_database: bool = True) -> Settings:
    """Resolve settings: flags override the environment, which overrides the defaults."""

    def pick(flag: str, var: str) -> str | None:
        value = flags.get(flag)
        if value is not None:
            return str(value)
        value = env.get(var)
        return value if value not in (None, "") else None

    url = pick("database_url", "DATABASE_URL")
    if need_database or url or env.get("DATABASE_URL_FILE"):
        database = _database(url, env)
    else:
        database = Database.from_libpq_env(env)
    alembic_config = Path(pick("config", "ALEMBIC_CONFIG") or "alembic.ini")
    if not alembic_config.is_file():
        raise ConfigError(
            f"Alembic config {str(alembic_config)!r} not found: run from your project directory "
            "or set ALEMBIC_CONFIG (or --config) to its alembic.ini"
        )
    log_options(env, flags, strict=True)  # logging is already set up (leniently): refuse bad values
    lock_key = pick("lock_key", "MIGRATE_LOCK_KEY")
    history = pick("history_table", "MIGRATE_HISTORY_TABLE") or "migrate_job_history"
    return Settings(
        database=database,
        alembic_config=alembic_config,
        version_table=version_table_of(alembic_config),  # also fails on a broken alembic.ini, before connecting
        target=pick("target", "MIGRATE_TARGET") or "head",
        wait_timeout=_number(pick("wait_timeout", "MIGRATE_WAIT_TIMEOUT"), "MIGRATE_WAIT_TIMEOUT", 60),
        lock_timeout=_number(pick("lock_timeout", "MIGRATE_LOCK_TIMEOUT"), "MIGRATE_LOCK_TIMEOUT", 300),
        lock_key=parse_lock_key(lock_key) if lock_key is not None else None,
        backup=_choice(pick("backup", "MIGRATE_BACKUP") or "auto", "MIGRATE_BACKUP", ("auto", "always", "off")),
        backup_dir=Path(pick("backup_dir", "MIGRATE_BACKUP_DIR") or "/backups"),
        backup_keep=int(_number(pick("backup_keep", "MIGRATE_BACKUP_KEEP"), "MIGRATE_BACKUP_KEEP", 5, minimum=1, integer=True)),
        statement_lock_timeout=_number(
            pick("statement_lock_timeout", "MIGRATE_STATEMENT_LOCK_TIMEOUT"), "MIGRATE_STATEMENT_LOCK_TIMEOUT", 5
        ),
        lock_retries=int(_number(pick("lock_retries", "MIGRATE_LOCK_RETRIES"), "MIGRATE_LOCK_RETRIES", 5, integer=True)),
        statement_timeout=_number(pick("statement_timeout", "MIGRATE_STATEMENT_TIMEOUT"), "MIGRATE_STATEMENT_TIMEOUT", 0),
        history_table=None if history.lower() == "off" else _identifier(history, "MIGRATE_HISTORY_TABLE"),
        application_name=f"migrate-job/{socket.gethostname()}"[:63],
    )


def log_options(env: Mapping[str, object], flags: Mapping[str, object], strict: bool = False) -> tuple[str, str]:
    """Log format and level: flag, else MIGRATE_LOG_FORMAT / MIGRATE_LOG_LEVEL, else JSON (console on a
    TTY) at info. Logging starts before the rest of the settings are read, so that even a bad setting
    is reported as a log line: then (strict=False) a bad value falls back to the default."""
    fmt = str(flags.get("log_format") or env.get("MIGRATE_LOG_FORMAT") or "").lower()
    level = str(flags.get("log_level") or env.get("MIGRATE_LOG_LEVEL") or "info").lower()
    if strict:
        _choice(fmt or "json", "MIGRATE_LOG_FORMAT", ("json", "console"))
        _choice(level, "MIGRATE_LOG_LEVEL", ("debug", "info", "warning", "error"))
    if fmt not in ("json", "console"):
        fmt = "console" if sys.stdout.isatty() else "json"
    return fmt, level if level in ("debug", "info", "warning", "error") else "info"


def _database(url: str | None, env: Mapping[str, str]) -> Database:
    if url is None and env.get("DATABASE_URL_FILE"):
        path = Path(env["DATABASE_URL_FILE"])
        try:
            url = path.read_text().strip()
        except OSError as e:
            raise ConfigError(f"cannot read DATABASE_URL_FILE {str(path)!r}: {e.strerror}") from None
        if not url:
            raise ConfigError(f"DATABASE_URL_FILE {str(path)!r} is empty")
    if url is not None:
        return Database.from_url(url)
    if any(env.get(v) for v in ("PGHOST", "PGDATABASE", "PGSERVICE")):
        return Database.from_libpq_env(env)
    raise ConfigError(
        "no database configured: set DATABASE_URL (postgresql://user:password@host:5432/dbname), "
        "DATABASE_URL_FILE, or libpq's PGHOST/PGPORT/PGUSER/PGPASSWORD/PGDATABASE"
    )


def _number(value: str | None, name: str, default: float, minimum: float = 0, integer: bool = False) -> float:
    if value is None:
        return default
    try:
        number = int(value) if integer else float(value)
    except ValueError:
        kind = "a whole number" if integer else "a number of seconds"
        raise ConfigError(f"{name}={value!r} is not {kind}") from None
    if number < minimum:
        raise ConfigError(f"{name}={value!r} must be at least {minimum:g}")
    return number


def _choice(value: str, name: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} must be one of: {', '.join(choices)}")
    return value


def _identifier(value: str, name: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,62}", value):
        raise ConfigError(f"{name}={value!r} must be a plain SQL identifier (letters, digits, underscore)")
    return value
