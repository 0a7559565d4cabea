"""The env.py every scenario shares: the shared connection first, else an engine from sqlalchemy.url."""

from alembic import context
from sqlalchemy import Connection, engine_from_config, pool


def run() -> None:
    config = context.config
    if context.is_offline_mode():
        context.configure(url=config.get_main_option("sqlalchemy.url"), literal_binds=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    shared = config.attributes.get("connection")
    if isinstance(shared, Connection):
        _migrate(shared)
        return
    engine = engine_from_config(config.get_section(config.config_ini_section, {}), prefix="sqlalchemy.",
                                poolclass=pool.NullPool)
    with engine.connect() as connection:
        _migrate(connection)


def _migrate(connection) -> None:
    context.configure(connection=connection, transaction_per_migration=True)
    with context.begin_transaction():
        context.run_migrations()
