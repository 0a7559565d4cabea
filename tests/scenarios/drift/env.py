"""An env.py with models (target_metadata), as `alembic init` writes one once models exist: the
job's shared connection when it gives one, else an engine from sqlalchemy.url. `-x include_schemas=1`
makes autogenerate look at every schema (the job's own included)."""

from alembic import context
from sqlalchemy import Connection, engine_from_config, pool

from drift_models import metadata

config = context.config
include_schemas = context.get_x_argument(as_dictionary=True).get("include_schemas") == "1"


def migrate(connection) -> None:
    context.configure(connection=connection, target_metadata=metadata, transaction_per_migration=True,
                      include_schemas=include_schemas)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
elif isinstance(config.attributes.get("connection"), Connection):
    migrate(config.attributes["connection"])
else:
    engine = engine_from_config(config.get_section(config.config_ini_section, {}), prefix="sqlalchemy.",
                                poolclass=pool.NullPool)
    with engine.connect() as connection:
        migrate(connection)
