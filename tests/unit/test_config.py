"""Settings: database URLs in every form the contract accepts (what the job's own session, libpq,
gets, and what env.py gets in the driver the user named), and the table every setting is declared
in. Pure parsing: no database, no subprocess."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from job import config
from job.config import Database
from job.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_a_url_without_driver_gives_env_py_psycopg2() -> None:
    """A bare postgresql:// URL hands env.py psycopg2, which is always installed (not SQLAlchemy 2.1's psycopg 3)."""
    database = Database.from_url("postgresql://app@db:5432/blog")

    assert "postgresql+psycopg2://app@db:5432/blog" == database.sqlalchemy_url()


def test_postgres_scheme_is_accepted_and_spelled_for_sqlalchemy() -> None:
    """The postgres:// spelling some platforms hand out reaches env.py as postgresql+psycopg2://."""
    assert Database.from_url("postgres://app@db/blog").sqlalchemy_url().startswith("postgresql+psycopg2://")


@pytest.mark.parametrize("driver", ["psycopg2", "psycopg", "asyncpg"])
def test_env_py_gets_the_driver_the_user_named(driver: str) -> None:
    """The URL's driver is the one env.py's engine uses."""
    database = Database.from_url(f"postgresql+{driver}://app@db/blog")

    assert (driver, f"postgresql+{driver}://app@db/blog") == (database.driver, database.sqlalchemy_url())


def test_libpq_parameters_reach_the_job_session_and_libpq_drivers() -> None:
    """sslmode, sslrootcert, options and application_name are libpq's: the job's session and psycopg get them as is."""
    database = Database.from_url(
        "postgresql+psycopg://app@db/blog?sslmode=verify-full&sslrootcert=/ca.pem&options=-c%20search_path%3Dapp")

    assert {"sslmode": "verify-full", "sslrootcert": "/ca.pem", "options": "-c search_path=app"}.items() <= \
        database.params.items()
    assert "sslmode=verify-full" in database.sqlalchemy_url() and "sslrootcert=%2Fca.pem" in database.sqlalchemy_url()


def test_asyncpg_url_parameters_translate_both_ways() -> None:
    """asyncpg's ssl= is libpq's sslmode for the job; libpq's TLS files reach asyncpg through its environment."""
    database = Database.from_url(
        "postgresql+asyncpg://app@db/blog?ssl=require&prepared_statement_cache_size=0&sslrootcert=/ca.pem"
        "&application_name=web")

    assert ("require", "/ca.pem") == (database.params["sslmode"], database.params["sslrootcert"])
    assert "postgresql+asyncpg://app@db/blog?prepared_statement_cache_size=0&ssl=require" == database.sqlalchemy_url()
    assert {"PGSSLROOTCERT": "/ca.pem"} == database.driver_environment()


def test_libpq_sslmode_becomes_asyncpg_ssl() -> None:
    """A libpq-style sslmode in an asyncpg URL reaches asyncpg as its ssl keyword."""
    assert Database.from_url("postgresql+asyncpg://app@db/blog?sslmode=require").sqlalchemy_url().endswith("?ssl=require")


def test_url_encoded_password_is_kept_aside_and_given_back_encoded() -> None:
    """The password is not among the libpq parameters, and env.py's URL carries it URL-encoded."""
    database = Database.from_url("postgresql+asyncpg://app:s3cr%25t%40p%3Ass%2Fw0rd@db/blog")

    assert ("s3cr%t@p:ss/w0rd", "password" in database.params) == (database.password, False)
    assert "app:s3cr%25t%40p%3Ass%2Fw0rd@db" in database.sqlalchemy_url()


def test_socket_directory_host_goes_in_the_query() -> None:
    """A Unix socket directory cannot be a URL host for SQLAlchemy: it travels as ?host=."""
    assert "postgresql+psycopg2://app@/blog?host=%2Fvar%2Frun%2Fpostgresql" == \
        Database.from_url("postgresql://app@/blog?host=/var/run/postgresql").sqlalchemy_url()


@pytest.mark.parametrize(("url", "message"), [
    ("mysql://root@db/blog", "must be a PostgreSQL URL"),
    ("postgresql+pg8000://app@db/blog", "the drivers that work are psycopg2, psycopg, asyncpg"),
    ("postgresql://app@db/blog?prepared_statement_cache_size=0", "not a connection parameter of libpq"),
    ("postgresql://app:pw@db:port/blog", "invalid database URL"),
])
def test_urls_that_cannot_work_are_configuration_errors(url: str, message: str) -> None:
    """Another database, an unknown driver, a parameter nothing takes: exit 2 with what works."""
    with pytest.raises(ConfigError, match=message) as raised:
        Database.from_url(url)
    assert ":pw@" not in str(raised.value)


@pytest.mark.parametrize("password", ["s3cr%t", "p@ss", "pa/ss", "p?ss", "p#ss", "100%"])
def test_a_password_that_is_not_url_encoded_is_refused_without_being_shown(password: str) -> None:
    """However the unencoded password would make the URL parse, the error names the fix and shows none of it."""
    with pytest.raises(ConfigError, match="must be URL-encoded") as raised:
        Database.from_url(f"postgresql://app:{password}@db:5432/blog")

    assert password not in str(raised.value) and "app:***@db" in str(raised.value)


def test_an_at_sign_in_a_query_value_is_not_taken_for_the_password() -> None:
    """The user info ends at the first `@` followed by hosts: `?application_name=a@b` is a query value."""
    database = Database.from_url("postgresql://app:pw@db/blog?application_name=a@b")

    assert ("pw", "a@b") == (database.password, database.params["application_name"])


# --- settings: one table, flags over variables over defaults ----------------------------------

def _settings(env: dict[str, str] | None = None, flags: dict[str, object] | None = None) -> config.Settings:
    base = {"DATABASE_URL": "postgresql://u@h/db", "ALEMBIC_CONFIG": str(ROOT / "alembic.ini")}
    return config.load({**base, **(env or {})}, flags or {})


def test_every_option_has_a_field_a_flag_and_a_variable() -> None:
    """Each setting is declared once: its Settings field exists, its flag and variable are unique."""
    # (the ini section and -x arguments are how Alembic is invoked: Settings.alembic holds them)
    fields = set(config.Settings._fields) | {"database_url", "config", "databases", "log_format", "log_level",
                                             "ini_section", "x_args"}
    assert [] == [o.field for o in config.OPTIONS if o.field not in fields]
    assert len({o.flag for o in config.OPTIONS}) == len({o.variable for o in config.OPTIONS}) == len(config.OPTIONS)


def test_defaults_come_from_the_table() -> None:
    settings = _settings()

    assert ("head", 60.0, 300.0, "auto", "/backups", 5, 5.0, 0.0, "migrate_job_history", True, None) == (
        settings.target, settings.wait_timeout, settings.lock_timeout, settings.backup, settings.backup_dir,
        settings.backup_keep, settings.statement_lock_timeout, settings.statement_timeout, settings.history_table,
        settings.allow_ahead, settings.termination_log)


def test_a_flag_overrides_the_variable() -> None:
    settings = _settings({"MIGRATE_LOCK_TIMEOUT": "10", "MIGRATE_HISTORY_TABLE": "off"}, {"lock_timeout": "20"})

    assert (20.0, None) == (settings.lock_timeout, settings.history_table)


@pytest.mark.parametrize("variable, value, says", [
    ("MIGRATE_WAIT_TIMEOUT", "soon", "must be a number of seconds: 0 or 0.001 to 2.14748e+06"),
    ("MIGRATE_WAIT_TIMEOUT", "nan", "must be a number of seconds"),
    ("MIGRATE_LOCK_TIMEOUT", "inf", "must be a number of seconds"),
    ("MIGRATE_STATEMENT_LOCK_TIMEOUT", "1e9", "must be a number of seconds"),
    ("MIGRATE_STATEMENT_LOCK_TIMEOUT", "0", "must be a number of seconds: 0.001 to"),
    ("MIGRATE_STATEMENT_TIMEOUT", "0.0004", "must be a number of seconds: 0 or 0.001 to"),
    ("MIGRATE_BACKUP_KEEP", "0", "must be a whole number from 1 to 10000"),
    ("MIGRATE_LOCK_RETRIES", "2.5", "must be a whole number from 0 to 1000"),
    ("MIGRATE_BACKUP", "sometimes", "must be one of: auto, always, off"),
    ("MIGRATE_ALLOW_AHEAD", "maybe", "must be true or false"),
    ("MIGRATE_HISTORY_TABLE", "a-b", "plain SQL identifier"),
])
def test_a_bad_value_names_its_variable(variable: str, value: str, says: str) -> None:
    with pytest.raises(ConfigError) as refused:
        _settings({variable: value})
    assert variable in str(refused.value) and says in str(refused.value)


def test_a_lock_key_is_an_integer_as_given_or_a_hashed_string() -> None:
    assert (42, -1) == (config.parse_lock_key("42"), config.parse_lock_key("-1"))
    assert config.parse_lock_key("blog") == config.parse_lock_key("blog") != config.parse_lock_key("shop")
    assert -(2**63) <= config.parse_lock_key("blog") < 2**63
    with pytest.raises(ConfigError, match="signed 64-bit"):
        config.parse_lock_key(str(2**63))


def test_the_default_lock_key_is_per_database_and_version_table() -> None:
    """The default table on the search path keeps the key earlier versions used."""
    default = config.lock_key_for("blog", config.VersionTable())

    assert default == config._hash_key("migrate-job:blog:alembic_version")
    assert len({default, config.lock_key_for("shop", config.VersionTable()),
                config.lock_key_for("blog", config.VersionTable("alembic_version", "tenant"))}) == 3


# --- every numeric setting, whatever it is given --------------------------------------------------

NUMERIC = [o for o in config.OPTIONS if o.parse is not None and isinstance(o.default, (int, float))
           and not isinstance(o.default, bool)]
# what a value may reach: PostgreSQL's int milliseconds, time_t, a count
INT32_MS = 2**31 - 1


def _reaches(option: config.Option, value: float) -> None:
    """Where a parsed value goes, it fits: a non-zero time stays non-zero in milliseconds, and
    every one fits PostgreSQL's 32-bit milliseconds (and so time_t, select() and sleep())."""
    assert math.isfinite(value)
    if isinstance(option.default, float):
        ms = config.milliseconds(value)
        assert 0 <= ms <= INT32_MS and (ms > 0) == (value > 0)
    else:
        assert float(value).is_integer() and 0 <= value <= 10_000


@pytest.mark.parametrize("option", NUMERIC, ids=lambda o: o.variable)
@settings(max_examples=300, deadline=None)
@given(raw=st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr), st.integers().map(str),
                     st.text(max_size=12), st.sampled_from(["nan", "inf", "-inf", "1e9", "0.0004", "1e-9", " 5 ",
                                                            "1_000", "0x10", "5s", "", "-0", "2147483.648"])))
def test_every_numeric_setting_is_a_value_that_fits_or_exit_2_naming_it(option: config.Option, raw: str) -> None:
    """Variable and flag alike: either a value that fits wherever it goes, or a ConfigError naming
    the variable and the allowed range; never another exception."""
    for env, flags in (({option.variable: raw}, {}), ({}, {option.field: raw})):
        try:
            loaded = _settings(env, flags)
        except ConfigError as e:
            assert option.variable in str(e) and (" to " in str(e)), str(e)
            continue
        _reaches(option, getattr(loaded, option.field))
