"""A tenant-schema env.py that takes its tenant from `-x tenant=NAME` (as `alembic -x tenant=acme
upgrade head` would give it) and points everything at that schema itself: the search path of its
connection, and the version table's schema. The job gives it the -x argument with
MIGRATE_TENANT_SCHEMA_VIA=x:tenant, and sets no search path of its own."""

from alembic import context
from sqlalchemy import engine_from_config, pool, text

config = context.config
tenant = context.get_x_argument(as_dictionary=True)["tenant"]
engine = engine_from_config(config.get_section(config.config_ini_section, {}), prefix="sqlalchemy.",
                            poolclass=pool.NullPool)
with engine.connect() as connection:
    connection.execute(text(f'SET search_path TO "{tenant}"'))
    connection.commit()
    context.configure(connection=connection, version_table_schema=tenant, transaction_per_migration=True)
    with context.begin_transaction():
        context.run_migrations()
