"""Alembic environment for the blog.

Online, it migrates on what the caller shares through `config.attributes["connection"]`:
migrate-job passes the Connection that holds its advisory lock, pytest-alembic an Engine. Only
otherwise does it build its own engine from `sqlalchemy.url` or DATABASE_URL.
"""

import os
from logging.config import fileConfig

from alembic import context
from sqlalchemy import Connection, engine_from_config, pool

from app.models import Base
from job.config import Database

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name)

target_metadata = Base.metadata
version_table = config.get_main_option("version_table", "alembic_version")


def url() -> str:
    """The URL migrate-job set, or DATABASE_URL in any form the job accepts, as psycopg2."""
    configured = config.get_main_option("sqlalchemy.url")
    if configured:
        return configured
    if not os.environ.get("DATABASE_URL"):
        raise SystemExit("set DATABASE_URL (postgresql://user:password@host:5432/dbname)")
    return Database.from_url(os.environ["DATABASE_URL"]).sqlalchemy_url()


def run_migrations_offline() -> None:
    context.configure(
        url=url(),
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        version_table=version_table,
        transaction_per_migration=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def do_run_migrations(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        version_table=version_table,
        transaction_per_migration=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    shared = config.attributes.get("connection")
    if isinstance(shared, Connection):
        do_run_migrations(shared)
        return
    if shared is not None:  # an Engine, as pytest-alembic shares it
        with shared.connect() as connection:
            do_run_migrations(connection)
        return
    section = {**config.get_section(config.config_ini_section, {}), "sqlalchemy.url": url()}
    engine = engine_from_config(section, prefix="sqlalchemy.", poolclass=pool.NullPool)
    with engine.connect() as connection:
        do_run_migrations(connection)


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
