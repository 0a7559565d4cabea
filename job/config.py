"""Settings, loaded once from the environment and flags; the database URL and its redaction."""

from __future__ import annotations

import hashlib
import math
import re
import socket
import sys
import urllib.parse
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple

import psycopg2.extensions
from psycopg2 import sql

from job import compression, credentials
from job.alembic_files import AlembicFiles
from job.errors import ConfigError

# The drivers env.py may be handed (the URL's `+driver`), and the module each needs. The job's
# own session (lock, plan, history) and pg_dump always use libpq, through psycopg2.
DRIVERS = {"psycopg2": "psycopg2", "psycopg": "psycopg", "asyncpg": "asyncpg"}
# What env.py gets for a URL that names no driver: psycopg2, which is always installed (SQLAlchemy
# 2.1 would pick psycopg 3 for a bare `postgresql://`, which the job does not depend on).
DEFAULT_DRIVER = "psycopg2"
# how the drivers' packages are installed beside the job
EXTRAS = {"psycopg": "migrate-job[psycopg]", "asyncpg": "migrate-job[asyncpg]"}
WORKING_URLS = "postgres://, postgresql://, postgresql+psycopg2://, postgresql+psycopg://, postgresql+asyncpg://"

# libpq parameters that asyncpg spells its own way (asyncpg.connect keywords), and those it reads
# from the environment only; application_name and the session settings reach asyncpg's sessions
# through the job's connect hook (job.migrate), not the URL.
ASYNCPG_KEYWORDS = {"sslmode": "ssl", "connect_timeout": "timeout", "target_session_attrs": "target_session_attrs"}
ASYNCPG_ENVIRONMENT = {"sslrootcert": "PGSSLROOTCERT", "sslcert": "PGSSLCERT", "sslkey": "PGSSLKEY", "sslcrl": "PGSSLCRL"}

# Every connection the job opens: a name that points at the pod, and TCP keepalives so a holder
# whose pod vanished loses its session (and so the lock) within about idle + interval * count = 25 s.
CONNECTION_DEFAULTS = {
    "keepalives": "1",
    "keepalives_idle": "10",
    "keepalives_interval": "5",
    "keepalives_count": "3",
    "connect_timeout": "5",
    # libpq: give up on a connection whose sent data has gone unacknowledged this long (ms)
    "tcp_user_timeout": "25000",
}

# libpq connection parameters that pg_dump/pg_restore get through their conninfo string.
# The password is never one of them: it travels in PGPASSWORD.
_NOT_FOR_CONNINFO = {"password"}

_URL_PASSWORD = re.compile(r"(://[^:/?#@\s]*:)([^@\s]*)(@)")


# (NamedTuples, not dataclasses: a start-up trick, see job/__main__.py)


class Database(NamedTuple):
    """How to reach the database: libpq parameters parsed by libpq itself, password kept aside, and
    the driver env.py gets with the parameters only that driver knows."""

    params: Mapping[str, str]
    password: str | None = None
    driver: str = DEFAULT_DRIVER
    # query parameters for env.py's driver that libpq does not know (asyncpg's own keywords)
    driver_query: Mapping[str, str] = {}

    def __repr__(self) -> str:
        return (f"Database(params={self.params!r}, password={'***' if self.password else None}, "
                f"driver={self.driver!r}, driver_query={self.driver_query!r})")

    @classmethod
    def from_url(cls, url: str) -> Database:
        """Parse any PostgreSQL URL SQLAlchemy knows: `postgres://`, `postgresql://`, `+psycopg2`,
        `+psycopg` or `+asyncpg`. libpq parses what it knows (multi-host, URL-encoding); asyncpg's
        own query parameters are kept for env.py, with `ssl` also read as libpq's `sslmode`."""
        url = url.strip()
        _refuse_unencoded_password(url)
        scheme, sep, rest = url.partition("://")
        dialect, _, driver = scheme.partition("+")
        if not sep or dialect.lower() not in ("postgres", "postgresql"):
            raise ConfigError(f"unsupported database URL {redact_url(url)!r}: it must be a PostgreSQL URL, "
                              f"one of {WORKING_URLS}")
        driver = driver.lower() or DEFAULT_DRIVER
        if driver not in DRIVERS:
            raise ConfigError(f"unsupported driver {driver!r} in the database URL: the drivers that work are "
                              f"{', '.join(DRIVERS)} ({WORKING_URLS})")
        location, _, query = rest.partition("?")
        libpq_query, driver_query = [], {}
        for name, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
            if driver == "asyncpg" and name == "ssl":
                driver_query[name] = value
                if value in SSL_MODES:
                    libpq_query.append(("sslmode", value))
            elif is_libpq_parameter(name):
                libpq_query.append((name, value))
            elif driver == "asyncpg":
                driver_query[name] = value
            else:
                raise ConfigError(f"invalid database URL {redact_url(url)!r}: {name!r} is not a connection "
                                  f"parameter of libpq, which the {driver} driver uses")
        libpq_url = "postgresql://" + location + (
            # quote, not quote_plus: libpq reads "+" as a plus sign
            "?" + urllib.parse.urlencode(libpq_query, quote_via=urllib.parse.quote) if libpq_query else "")
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
        return cls(params=params, password=password, driver=driver, driver_query=driver_query)

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
        """A libpq conninfo string for pg_dump/pg_restore argv: everything but the password, with
        the same keepalives and connect timeout as the job's own session (URL parameters win)."""
        params = {**CONNECTION_DEFAULTS, **{k: v for k, v in self.params.items() if k not in _NOT_FOR_CONNINFO}}
        params["application_name"] = application_name
        return psycopg2.extensions.make_dsn(**params)

    def sqlalchemy_url(self) -> str:
        """The URL env.py gets: the driver the user named, with the parameters that driver takes."""
        from sqlalchemy.engine import URL

        query: dict[str, Any] = {k: v for k, v in self.params.items() if k not in ("host", "port", "user", "dbname")}
        if self.driver == "asyncpg":
            query = {ASYNCPG_KEYWORDS[k]: v for k, v in query.items() if k in ASYNCPG_KEYWORDS}
            query.update(self.driver_query)
        host, port = self.params.get("host"), self.params.get("port")
        if host and (host.startswith("/") or "," in host):
            # a Unix socket directory or several hosts: SQLAlchemy takes them as ?host=host:port
            ports = (port or "").split(",")
            query["host"] = [f"{h}:{ports[i] if i < len(ports) else ports[-1]}".rstrip(":")
                             if not h.startswith("/") else h for i, h in enumerate(host.split(","))]
            host = port = None
        return URL.create(
            f"postgresql+{self.driver}",
            username=self.params.get("user"),
            password=self.password,
            host=host,
            port=int(port) if port and port.isdigit() else None,
            database=self.params.get("dbname"),
            query=query,
        ).render_as_string(hide_password=False)

    def driver_environment(self) -> dict[str, str]:
        """Environment variables env.py's driver needs for what its URL cannot say (asyncpg reads
        the TLS certificate paths from libpq's variables only)."""
        if self.driver != "asyncpg":
            return {}
        return {ASYNCPG_ENVIRONMENT[k]: v for k, v in self.params.items() if k in ASYNCPG_ENVIRONMENT}

    def check_driver_installed(self) -> None:
        """Refuse a URL whose driver env.py could not import, before anything runs."""
        import importlib.util

        if importlib.util.find_spec(DRIVERS[self.driver]) is None:
            raise ConfigError(f"the database URL names the {self.driver} driver, which is not installed: "
                              f"pip install '{EXTRAS.get(self.driver, self.driver)}'")


SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


def is_libpq_parameter(name: str) -> bool:
    """Whether libpq (the one psycopg2 is built with) knows connection parameter `name`."""
    try:
        psycopg2.extensions.parse_dsn(f"{name}=x")
    except psycopg2.ProgrammingError:
        return False
    return True


# what may follow the user info: host[:port], comma-separated (IPv6 in brackets), or nothing
_HOSTS = r"(?:(?:\[[0-9A-Fa-f:.%]+\]|[A-Za-z0-9._%-]*)(?::\d*)?)(?:,(?:\[[0-9A-Fa-f:.%]+\]|[A-Za-z0-9._%-]*)(?::\d*)?)*"


def _refuse_unencoded_password(url: str) -> None:
    """A password with `@ / ? # %` left as they are makes the URL parse into something else (the
    rest of the password as a host, a port, a query), and every message about it would show the
    password. Find it as a person would (between the first `:` after the user and the last `@`),
    and refuse it without printing it."""
    rest = url.partition("://")[2]
    # the `@` that ends the user info is the first one followed by something shaped like hosts
    # (an `@` inside a query value is followed by `=`, `&` and the like)
    ends = [m.start() for m in re.finditer("@", rest)
            if re.fullmatch(_HOSTS, re.split(r"[/?#]", rest[m.start() + 1:], maxsplit=1)[0])]
    if not ends:
        return
    userinfo = rest[: ends[0]]
    user, colon, password = userinfo.partition(":")
    if not colon:
        return
    if re.search(r"[@/?#]|%(?![0-9A-Fa-f]{2})", password):
        masked = url.replace(password, "***", 1)
        raise ConfigError(
            f"the password in the database URL {masked!r} must be URL-encoded: write @ as %40, / as %2F, "
            "? as %3F, # as %23 and % as %25 (or put it in PGPASSWORD)"
        )


def redact_url(text: str) -> str:
    """Mask the password part of any URL in `text`."""
    return _URL_PASSWORD.sub(r"\1***\3", text)


class VersionTable(NamedTuple):
    """Where Alembic keeps the revision(s) the database is at: a table, in a schema or on the search path."""

    name: str = "alembic_version"
    schema: str | None = None

    def identifier(self) -> sql.Identifier:
        return sql.Identifier(self.name) if self.schema is None else sql.Identifier(self.schema, self.name)

    def __str__(self) -> str:
        return self.name if self.schema is None else f"{self.schema}.{self.name}"


class Settings(NamedTuple):
    """Everything a command needs, resolved once from the environment and command-line flags
    (`load`); what each setting means, its flag, variable and default are in OPTIONS."""

    # where the database is, and the secret to keep out of every output
    database: Database
    # the Alembic project: alembic.ini and/or pyproject.toml; any project works, including a stock `alembic init`
    alembic: AlembicFiles
    # Alembic's version table as the config files name it (`version_table`, `version_table_schema`);
    # an env.py that sets it in code is asked where it is (job.migrate.Project.locate)
    version_table: VersionTable
    target: str
    wait_timeout: float
    lock_timeout: float
    lock_key: int | None
    backup: str
    backup_dir: str
    s3_addressing: str
    backup_keep: int
    # how a backup's archive is compressed (job.compression)
    backup_compression: compression.Method
    statement_lock_timeout: float
    lock_retries: int
    statement_timeout: float
    progress_interval: float
    end_idle_blockers_after: float
    history_table: str | None
    allow_ahead: bool
    termination_log: str | None
    lint_allow: str | None
    lint_start_after: str | None
    # job.drift: what an applied revision's edited file, and a schema that is not the one the job
    # left, do to a run (warn or refuse: exit 9); objects other tools own, never drift
    on_changed_revision: str
    on_drift: str
    drift_exclude: tuple[str, ...]
    # names our sessions in pg_stat_activity: the pod's hostname
    application_name: str
    # a multidb env.py: the alembic.ini sections it reads its engines' URLs from, and the database
    # each names (DATABASE_URL's, or another); the job fills them in, locks and backs up each
    sections: tuple[tuple[str, Database], ...]
    # `rehearse`: the server its copy is made on (None: the live database's), the longest ACCESS
    # EXCLUSIVE hold on a table with rows it lets pass, whether it goes down and up again
    rehearsal_server: Database | None
    rehearsal_max_exclusive: float
    rehearsal_round_trip: bool
    # the object storage credentials in the environment (AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN)
    cloud_secrets: tuple[str, ...]
    # where the password of a connection that names none comes from, afresh for each (job.credentials):
    # the file, the command (its output kept password_cache seconds) or MIGRATE_AUTH's provider
    auth: str = "password"
    password_file: str | None = None
    password_command: str | None = None
    password_cache: float = 60.0
    # what those make (None: the URL's or PGPASSWORD's password, read once)
    password_source: credentials.Source | None = None
    # `run` over many databases (job.fleet): the targets as given (a list, @FILE or a query), how
    # many run at once, how many complete before the rest start, whether a failure stops the rest
    fleet: str | None = None
    fleet_parallel: int = 4
    fleet_canary: int = 0
    fleet_fail_fast: bool = False
    # an Indexed Job's pods (JOB_COMPLETION_INDEX) each take their share of the fleet
    fleet_shards: int = 1
    # the schema this run migrates, for a tenant kept in a schema of a shared database (None: the
    # database); how env.py learns it: the sessions' search_path, or an -x argument (`x:KEY`)
    tenant_schema: str | None = None
    tenant_schema_via: str = "search_path"

    @property
    def secrets(self) -> tuple[str, ...]:
        """Strings that must never be printed."""
        databases = [self.database, *(database for _, database in self.sections),
                     *([self.rehearsal_server] if self.rehearsal_server else [])]
        return tuple(d.password for d in databases if d.password) + self.cloud_secrets

    @property
    def other_databases(self) -> tuple[tuple[str, Database], ...]:
        """The sections that name a database other than DATABASE_URL's."""
        return tuple((name, database) for name, database in self.sections if database != self.database)


def lock_key_for(database_name: str, version_table: VersionTable) -> int:
    """The default advisory lock key: one per database and version table as the config files name
    it (so every replica of one code version agrees before anything is loaded), as a signed 64-bit int.
    For the default table on the search path it is the key earlier versions used."""
    name = version_table.name if version_table.schema is None else f"{version_table.schema}.{version_table.name}"
    return _hash_key(f"migrate-job:{database_name}:{name}")


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


def version_table_of(files: AlembicFiles) -> VersionTable:
    """The version table the config files name: `version_table` and `version_table_schema` (options
    of ours, for an env.py to pass on), else Alembic's default `alembic_version` on the search path."""
    name = files.option("version_table") or "alembic_version"
    schema = files.option("version_table_schema") or None
    for value, option in ((name, "version_table"), (schema, "version_table_schema")):
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"{option} in {str(files.main)!r} must be a string")
    return VersionTable(name, schema)


def schema_name(value: str, name: str) -> str:
    """A tenant's schema name (MIGRATE_TENANT_SCHEMA, a MIGRATE_FLEET entry): always quoted where the job
    writes it, so letters, digits, `_`, `$` and `-` as tenants are usually named, up to 63 bytes."""
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_$-]{0,62}", value):
        raise ConfigError(f"{name}={value!r} is not a schema name (letters, digits, _, $ and -, up to 63)")
    return value


def _schema_via(value: str, name: str) -> str:
    key = value[2:] if value.startswith("x:") else None
    if value != "search_path" and not (key and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", key)):
        raise ConfigError(f"{name}={value!r}: give search_path (the sessions' search path is the schema) or x:KEY "
                          "(env.py gets -x KEY=SCHEMA)")
    return value


def in_schema(database: Database, schema: str) -> Database:
    """The database with its sessions' search_path set to `schema` alone, as libpq's `options`
    (after any the URL gives): the job's own sessions, pg_dump's, and env.py's engine, whichever
    driver, all resolve unqualified names there, as a tenant's revisions expect."""
    option = f'-csearch_path="{schema}"'  # (no spaces in a schema name: nothing for libpq to escape)
    given = database.params.get("options")
    return database._replace(params={**database.params, "options": f"{given} {option}" if given else option})


def load(env: Mapping[str, str], flags: Mapping[str, object], need_database: bool = True) -> Settings:
    """Resolve settings: flags override the environment, which overrides the defaults (OPTIONS)."""
    values = {o.field: (o.parse(raw, o.variable) if (raw := _given(o, env, flags)) is not None else o.default)
              for o in OPTIONS if o.parse is not None}
    # the settings that depend on others or on more than one variable
    x_args = values.pop("x_args")
    if values["tenant_schema"] is not None and values["tenant_schema_via"].startswith("x:"):
        # (env.py reads the tenant from -x)
        x_args = (*x_args, f"{values['tenant_schema_via'][2:]}={values['tenant_schema']}")
    alembic = AlembicFiles.find(Path(_given(_OPTION["config"], env, flags) or "alembic.ini"),
                                values.pop("ini_section"), x_args)
    url = _given(_OPTION["database_url"], env, flags)
    listed = _given(_OPTION["databases"], env, flags)
    multidb = _multidb_urls(alembic) if listed is None else {}
    if multidb and url is None and not env.get("DATABASE_URL_FILE") and not _libpq_env(env):
        database = next(iter(multidb.values()))  # (a multidb project that names its databases itself)
    elif need_database or url or env.get("DATABASE_URL_FILE"):
        database = _database(url, env)
    else:
        database = Database.from_libpq_env(env)
    log_options(env, flags, strict=True)  # logging is already set up (leniently): refuse bad values
    source = credentials.chosen(values["auth"], values["password_file"], values["password_command"],
                                values["password_cache"], values["wait_timeout"],
                                static=database.password is not None or bool(env.get("PGPASSWORD")))
    if values["auth"] in credentials.CLOUD:
        database = database._replace(params=credentials.cloud_tls(database.params, env))
        if values["rehearsal_server"] is not None:
            server = values["rehearsal_server"]
            values["rehearsal_server"] = server._replace(params=credentials.cloud_tls(server.params, env))
    version_table = version_table_of(alembic)
    if values["tenant_schema"] is not None:
        if listed is not None or multidb:
            raise ConfigError("MIGRATE_TENANT_SCHEMA migrates one schema of one database: a multidb env.py's databases "
                              "(MIGRATE_DATABASES) cannot each be given it")
        if values["tenant_schema_via"] == "search_path":
            database = in_schema(database, values["tenant_schema"])
        # (its own version table, unless the config files name the schema it is in)
        version_table = version_table._replace(schema=version_table.schema or values["tenant_schema"])
    return Settings(
        database=database,
        alembic=alembic,
        version_table=version_table,
        **values,
        application_name=f"migrate-job/{socket.gethostname()}"[:63],
        sections=(_sections(listed, database) if listed is not None else
                  _distinct(tuple((name, url or database) for name, url in multidb.items()), "alembic.ini")),
        cloud_secrets=tuple(env[v] for v in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN") if env.get(v)),
        password_source=source,
    )


S3_SCHEME = "s3://"


class S3Location(NamedTuple):
    """Where in object storage: a bucket, and a prefix inside it ('' or ending in '/')."""

    bucket: str
    prefix: str

    def __str__(self) -> str:
        return f"{S3_SCHEME}{self.bucket}/{self.prefix}"

    def key(self, name: str) -> str:
        return self.prefix + name


def parse_s3(url: str) -> S3Location:
    """`s3://bucket` or `s3://bucket/prefix`; credentials never belong in it."""
    rest = url[len(S3_SCHEME):]
    bucket, _, prefix = rest.partition("/")
    if "@" in bucket or ":" in bucket:
        raise ConfigError(
            "MIGRATE_BACKUP_DIR: an s3:// location holds no credentials or port: give s3://bucket/prefix, and "
            "credentials through the AWS chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a web identity, an "
            "instance profile), the endpoint as AWS_ENDPOINT_URL"
        )
    if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket):
        raise ConfigError(f"MIGRATE_BACKUP_DIR: {bucket!r} is not a bucket name (3 to 63 lowercase letters, "
                          "digits, dots and hyphens): give s3://bucket/prefix")
    if any(c in prefix for c in "?#\\") or "//" in prefix or any(p in (".", "..") for p in prefix.split("/")):
        raise ConfigError(f"MIGRATE_BACKUP_DIR: the prefix {prefix!r} must be plain path segments: s3://bucket/a/b")
    return S3Location(bucket, prefix.strip("/") + "/" if prefix.strip("/") else "")


def _backup_location(value: str) -> str:
    """A directory, or an S3 location checked now, before anything runs."""
    if value.lower().startswith(S3_SCHEME):
        return str(parse_s3(S3_SCHEME + value[len(S3_SCHEME):]))
    if "://" in value:
        raise ConfigError(f"MIGRATE_BACKUP_DIR={redact_url(value)!r}: give a directory or s3://bucket/prefix")
    return value


def _sections(value: str | None, database: Database) -> tuple[tuple[str, Database], ...]:
    """MIGRATE_DATABASES: `section` (DATABASE_URL's database) or `section=URL`, separated by spaces or lines."""
    sections = []
    for entry in (value or "").split():
        name, _, url = entry.partition("=")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ConfigError(f"MIGRATE_DATABASES: {redact_url(entry)!r} is not `section` or `section=URL`")
        sections.append((name, Database.from_url(url) if url else database))
    if len({name for name, _ in sections}) != len(sections):
        raise ConfigError("MIGRATE_DATABASES names a section more than once")
    return _distinct(tuple(sections), "MIGRATE_DATABASES")


def _multidb_urls(files: AlembicFiles) -> dict[str, Database | None]:
    """A multidb project's own word (`alembic init -t multidb`): the sections its `databases = ...`
    option lists, each with the URL of its `sqlalchemy.url` (None where that is not a PostgreSQL
    URL, such as the template's `driver://...`: DATABASE_URL's database then)."""
    listed = files.option("databases")
    if not isinstance(listed, str) or not listed.strip():
        return {}
    urls: dict[str, Database | None] = {}
    for name in re.split(r"[,\s]+", listed.strip()):
        url = files.section_option(name, "sqlalchemy.url")
        urls[name] = Database.from_url(url) if url and url.split("://")[0].split("+")[0] in ("postgres", "postgresql") \
            else None
    return urls


def _distinct(sections: tuple[tuple[str, Database], ...], where: str) -> tuple[tuple[str, Database], ...]:
    """Refuse two sections that name one database: env.py would hold two sessions on it, each
    waiting for the other's locks (its own transaction around each)."""
    for index, (name, database) in enumerate(sections):
        for other, same in sections[:index]:
            if _where(same) == _where(database):
                raise ConfigError(
                    f"{where}: the multidb sections {other!r} and {name!r} both name the database "
                    f"{_where(database)[2] or 'of DATABASE_URL'}: give each section its own database (its "
                    "sqlalchemy.url in alembic.ini, or MIGRATE_DATABASES='section=postgresql://...')")
    return sections


def _where(database: Database) -> tuple[str, str, str]:
    params = database.params
    return params.get("host", ""), params.get("port", ""), params.get("dbname", "")


def _libpq_env(env: Mapping[str, str]) -> bool:
    return any(env.get(v) for v in ("PGHOST", "PGDATABASE", "PGSERVICE"))


def log_options(env: Mapping[str, object], flags: Mapping[str, object], strict: bool = False) -> tuple[str, str]:
    """Log format and level: flag, else MIGRATE_LOG_FORMAT / MIGRATE_LOG_LEVEL, else JSON (console on a
    TTY) at info. Logging starts before the rest of the settings are read, so that even a bad setting
    is reported as a log line: then (strict=False) a bad value falls back to the default."""
    fmt_option, level_option = _OPTION["log_format"], _OPTION["log_level"]
    fmt = (_given(fmt_option, env, flags) or "").lower()
    level = (_given(level_option, env, flags) or level_option.default).lower()
    if strict:
        _choice(fmt or "json", fmt_option.variable, fmt_option.choices)
        _choice(level, level_option.variable, level_option.choices)
    if fmt not in fmt_option.choices:
        fmt = "console" if sys.stdout is not None and sys.stdout.isatty() else "json"
    return fmt, level if level in level_option.choices else level_option.default


def termination_log(env: Mapping[str, object], flags: Mapping[str, object]) -> str | None:
    """MIGRATE_TERMINATION_LOG, read before the other settings: a bad one is reported there too."""
    return _given(_OPTION["termination_log"], env, flags) or None


def _given(option: Option, env: Mapping[str, object], flags: Mapping[str, object]) -> Any:
    """What was given for a setting: its flag, else its variable (unset or empty: None). A flag
    given more than once (-x) is the list of its values."""
    value = flags.get(option.field)
    if value is not None:
        return value if option.repeat else str(value)
    value = env.get(option.variable)
    return str(value) if value not in (None, "") else None


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
    if _libpq_env(env):
        return Database.from_libpq_env(env)
    raise ConfigError(
        "no database configured: set DATABASE_URL (postgresql://user:password@host:5432/dbname), "
        "DATABASE_URL_FILE, or libpq's PGHOST/PGPORT/PGUSER/PGPASSWORD/PGDATABASE"
    )


# The most seconds any setting may say: what every place a value goes takes. PostgreSQL keeps its
# timeouts (lock_timeout, statement_timeout) and pg_dump its --lock-wait-timeout as whole
# milliseconds in a 32-bit integer: 2147483647 ms, 24.8 days. (time_t, select() and sleep() take more.)
MAX_SECONDS = 2_147_483.647
# the smallest non-zero time PostgreSQL keeps (a millisecond): less would round to 0, "no limit"
RESOLUTION = 0.001


def seconds(low: float = 0.0, high: float = MAX_SECONDS, zero: bool = True) -> Callable[[str, str], float]:
    """A parser of a number of seconds between `low` and `high`; 0 allowed (with its own meaning)
    when `zero`, and otherwise nothing below a millisecond (it would reach PostgreSQL as 0)."""
    def parse(value: str, name: str) -> float:
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        floor = max(low, RESOLUTION)
        if not math.isfinite(number) or not (number == 0 and zero or floor <= number <= high):
            allowed = f"{'0 or ' if zero else ''}{floor:g} to {high:g}"
            raise ConfigError(f"{name}={value!r} must be a number of seconds: {allowed}")
        return number
    return parse


def count(low: int, high: int) -> Callable[[str, str], int]:
    """A parser of a whole number between `low` and `high`."""
    def parse(value: str, name: str) -> int:
        try:
            number = int(value.strip())
        except ValueError:
            number = low - 1
        if not low <= number <= high:
            raise ConfigError(f"{name}={value!r} must be a whole number from {low} to {high}")
        return number
    return parse


def milliseconds(value: float) -> int:
    """Seconds as PostgreSQL and pg_dump take them: whole milliseconds, never rounded down to 0."""
    return math.ceil(round(value * 1000, 6))


def _boolean(value: str | None, name: str, default: bool) -> bool:
    if value is None:
        return default
    if value.lower() in ("true", "1", "yes", "on"):
        return True
    if value.lower() in ("false", "0", "no", "off"):
        return False
    raise ConfigError(f"{name}={value!r} must be true or false")


def _choice(value: str, name: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} must be one of: {', '.join(choices)}")
    return value


def _identifier(value: str, name: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,62}", value):
        raise ConfigError(f"{name}={value!r} must be a plain SQL identifier (letters, digits, underscore)")
    return value


class Option(NamedTuple):
    """One setting: its Settings field, flag, environment variable, parser (value, variable name →
    value; None: `load` resolves it from more than one input), default, and what it means (the
    flag's help)."""

    field: str
    flag: str
    variable: str
    parse: Callable[[Any, str], Any] | None
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    # a one-letter form of the flag, as Alembic's CLI spells it (-x, -n)
    short: str | None = None
    # the flag may be given more than once; the variable holds the values, space-separated
    repeat: bool = False


def _text(value: str, _name: str) -> str:
    return value


def _one_of(*choices: str) -> Callable[[str, str], str]:
    return lambda value, name: _choice(value, name, choices)


def _x_args(value: str | list[str], name: str) -> tuple[str, ...]:
    """Alembic's -x arguments: the flag's values, or the variable's, split as a shell would (quotes
    keep a value with spaces together)."""
    import shlex

    if isinstance(value, list):
        return tuple(value)
    try:
        return tuple(shlex.split(value))
    except ValueError as e:
        raise ConfigError(f"{name}={value!r}: {e} (space-separated KEY=VALUE; quote a value with spaces)") from None


def _patterns(value: str) -> tuple[str, ...]:
    return tuple(p for p in value.replace(",", " ").split() if p)


def _section(value: str, name: str) -> str:
    if not value.strip() or any(c in value for c in "[]\n"):
        raise ConfigError(f"{name}={value!r} is not an ini section name")
    return value.strip()


def _history(value: str, name: str) -> str | None:
    """`off`, `name` (in the job's own schema, job.tables) or `schema.name`."""
    if value.lower() == "off":
        return None
    schema, _, table = value.rpartition(".")
    if schema:
        _identifier(schema, name)
    _identifier(table, name)
    if len(table) > 63 - len("_revisions"):
        raise ConfigError(f"{name}={value!r}: the name must leave room for the _revisions beside it (53 characters)")
    return value


OPTIONS: tuple[Option, ...] = (
    Option("database_url", "--database-url", "DATABASE_URL", None, None,
           "the database (a password here shows in the process list: prefer the variable, or DATABASE_URL_FILE)"),
    Option("password_file", "--password-file", "DATABASE_PASSWORD_FILE", _text, None,
           "a file holding the password, read again for every new connection (a mounted, rotated Secret)"),
    Option("password_command", "--password-command", "MIGRATE_PASSWORD_COMMAND", _text, None,
           "a shell command whose output is the password (run again once MIGRATE_PASSWORD_CACHE has passed)"),
    Option("password_cache", "--password-cache", "MIGRATE_PASSWORD_CACHE", seconds(), 60.0,
           "seconds the password command's output is used for new connections; 0: run it for each"),
    Option("auth", "--auth", "MIGRATE_AUTH", _one_of(*credentials.PROVIDERS), "password",
           "where passwords come from: password (the URL, PGPASSWORD, the file or the command), or a cloud "
           "provider's IAM token: aws-rds-iam, azure-entra, gcp-cloudsql", credentials.PROVIDERS),
    Option("config", "--config", "ALEMBIC_CONFIG", None, "alembic.ini", "the project's alembic.ini or pyproject.toml"),
    Option("databases", "--databases", "MIGRATE_DATABASES", None, None,
           "a multidb env.py's alembic.ini sections: `section` or `section=URL`"),
    Option("ini_section", "--name", "MIGRATE_INI_SECTION", _section, "alembic",
           "the alembic.ini section to read, as `alembic -n NAME`", short="-n"),
    Option("x_args", "--x-arg", "MIGRATE_X_ARGS", _x_args, (),
           "an argument for env.py, as `alembic -x KEY=VALUE` (repeatable; the variable: space-separated)",
           short="-x", repeat=True),
    Option("target", "--target", "MIGRATE_TARGET", _text, "head", "revision to migrate to"),
    Option("wait_timeout", "--wait-timeout", "MIGRATE_WAIT_TIMEOUT", seconds(), 60.0,
           "seconds to wait for the database to accept queries"),
    Option("lock_timeout", "--lock-timeout", "MIGRATE_LOCK_TIMEOUT", seconds(), 300.0,
           "seconds to wait for the lock (and for pg_dump's and restore's table locks)"),
    Option("lock_key", "--lock-key", "MIGRATE_LOCK_KEY", lambda value, _name: parse_lock_key(value), None,
           "advisory lock key: a 64-bit integer or any string (default: from the database and version table)"),
    Option("backup", "--backup", "MIGRATE_BACKUP", _one_of("auto", "always", "off"), "auto",
           "auto (only when something is pending), always, off", ("auto", "always", "off")),
    Option("backup_dir", "--backup-dir", "MIGRATE_BACKUP_DIR", lambda value, _name: _backup_location(value), "/backups",
           "where backups are kept: a directory, or s3://bucket/prefix"),
    Option("s3_addressing", "--s3-addressing", "MIGRATE_S3_ADDRESSING", _one_of("auto", "path", "virtual"), "auto",
           "how the bucket is addressed: path (most S3-compatible servers), virtual (bucket.host) or auto",
           ("auto", "path", "virtual")),
    Option("backup_keep", "--backup-keep", "MIGRATE_BACKUP_KEEP",
           count(1, 10_000), 5,
           "newest backups kept per database"),
    Option("backup_compression", "--backup-compression", "MIGRATE_BACKUP_COMPRESSION", compression.parse,
           compression.parse(compression.DEFAULT),
           "how backups are compressed: zstd[:1-19] (as they stream, on every core), gzip[:0-9] (pg_dump's own), none"),
    Option("statement_lock_timeout", "--statement-lock-timeout", "MIGRATE_STATEMENT_LOCK_TIMEOUT", seconds(zero=False),
           5.0,
           "seconds a DDL statement may wait for a table lock before its revision is retried"),
    Option("lock_retries", "--lock-retries", "MIGRATE_LOCK_RETRIES", count(0, 1000), 5,
           "retries of a revision that hit that lock timeout"),
    Option("statement_timeout", "--statement-timeout", "MIGRATE_STATEMENT_TIMEOUT", seconds(), 0.0,
           "seconds any statement may run; 0 is no limit"),
    Option("progress_interval", "--progress-interval", "MIGRATE_PROGRESS_INTERVAL", seconds(), 10.0,
           "seconds between migration.progress reports of a long statement; 0: none"),
    Option("end_idle_blockers_after", "--end-idle-blockers-after", "MIGRATE_END_IDLE_BLOCKERS_AFTER", seconds(), 0.0,
           "end a session that blocks a revision while idle in its transaction longer than this; 0: never"),
    Option("rehearsal_server", "--rehearsal-url", "MIGRATE_REHEARSAL_URL", lambda value, _name: Database.from_url(value),
           None, "rehearse: the server to make the copy on, and the database to connect to there (default: the "
           "live database's server)"),
    Option("rehearsal_max_exclusive", "--rehearsal-max-exclusive", "MIGRATE_REHEARSAL_MAX_EXCLUSIVE", seconds(), 5.0,
           "rehearse: the longest a revision may hold ACCESS EXCLUSIVE on a table with rows (exit 6 beyond)"),
    Option("rehearsal_round_trip", "--rehearsal-round-trip", "MIGRATE_REHEARSAL_ROUND_TRIP",
           lambda value, name: _boolean(value, name, True), True,
           "rehearse: then down to the starting revision and up again, comparing the schema each way"),
    Option("history_table", "--history-table", "MIGRATE_HISTORY_TABLE", _history, "migrate_job_history",
           "run history table (and the job's other tables beside it); off disables them"),
    Option("allow_ahead", "--allow-ahead", "MIGRATE_ALLOW_AHEAD", lambda value, name: _boolean(value, name, True), True,
           "start on a database ahead of these scripts on their own line (older code after newer)"),
    Option("fleet", "--fleet", "MIGRATE_FLEET", _text, None,
           "run every tenant of a fleet: schema names of DATABASE_URL's database, database:NAME or URLs (spaces, "
           "commas or lines), @FILE of them, or query:SQL on DATABASE_URL's database that gives them"),
    Option("fleet_parallel", "--fleet-parallel", "MIGRATE_FLEET_PARALLEL", count(1, 64), 4,
           "how many of the fleet's databases are migrated at once"),
    Option("fleet_canary", "--fleet-canary", "MIGRATE_FLEET_CANARY", count(0, 10000), 0,
           "how many of the fleet's first databases must succeed before the others start"),
    Option("fleet_fail_fast", "--fleet-fail-fast", "MIGRATE_FLEET_FAIL_FAST",
           lambda value, name: _boolean(value, name, False), False,
           "start no more of the fleet's databases once one failed"),
    Option("fleet_shards", "--fleet-shards", "MIGRATE_FLEET_SHARDS", count(1, 10000), 1,
           "the fleet is shared among this many pods (an Indexed Job's completions): each migrates the "
           "databases of its JOB_COMPLETION_INDEX"),
    Option("tenant_schema", "--tenant-schema", "MIGRATE_TENANT_SCHEMA", schema_name, None,
           "migrate one schema of the database (a tenant's): its own version table, lock, backup and records"),
    Option("tenant_schema_via", "--tenant-schema-via", "MIGRATE_TENANT_SCHEMA_VIA", _schema_via, "search_path",
           "how env.py gets MIGRATE_TENANT_SCHEMA: search_path (every session's search path is the schema), or x:KEY "
           "(-x KEY=SCHEMA, for an env.py that sets the search path or version_table_schema itself)"),
    Option("termination_log", "--termination-log", "MIGRATE_TERMINATION_LOG", _text, None,
           "where the one-line outcome is written (default /dev/termination-log, when it exists)"),
    Option("lint_allow", "--lint-allow", "MIGRATE_LINT_ALLOW", _text, None,
           "lint findings accepted on purpose: rule or revision:rule, comma-separated"),
    Option("lint_start_after", "--lint-start-after", "MIGRATE_LINT_START_AFTER", _text, None,
           "lint only the revisions after this one (history up to it already ran in production)"),
    Option("on_changed_revision", "--on-changed-revision", "MIGRATE_ON_CHANGED_REVISION", _one_of("warn", "refuse"),
           "warn", "an applied revision whose file changed since: warn (revision.changed), or refuse (exit 9) until "
           "`migrate-job accept` records the change", ("warn", "refuse")),
    Option("on_drift", "--on-drift", "MIGRATE_ON_DRIFT", _one_of("warn", "refuse"), "warn",
           "a schema that differs from the one the job recorded for its revision: warn (schema.drift), or refuse "
           "(exit 9) before any revision runs", ("warn", "refuse")),
    Option("drift_exclude", "--drift-exclude", "MIGRATE_DRIFT_EXCLUDE", lambda value, _name: _patterns(value), (),
           "objects never reported as drift: shell-style patterns of names (schema.table, schema.table.column), "
           "comma- or space-separated"),
    Option("log_format", "--log-format", "MIGRATE_LOG_FORMAT", None, None, "json, or console (the default on a TTY)",
           ("json", "console")),
    Option("log_level", "--log-level", "MIGRATE_LOG_LEVEL", None, "info", "debug, info, warning or error",
           ("debug", "info", "warning", "error")),
)
_OPTION = {o.field: o for o in OPTIONS}
