"""An env.py that loops over tenant schemas itself, as Netflix Dispatch's does: for each schema,
the search_path set to it and the migrations run, with the version table in the schema
(SCENARIO_LOOP=version_table_schema) or found on the search_path alone (SCENARIO_LOOP=search_path)."""

import os

from alembic import context
from sqlalchemy import engine_from_config, pool, text

config = context.config
engine = engine_from_config(config.get_section(config.config_ini_section, {}), prefix="sqlalchemy.",
                            poolclass=pool.NullPool)
with engine.connect() as connection:
    schemas = [row[0] for row in connection.execute(
        text("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'tenant\\_%' ORDER BY 1"))]
    for schema in schemas:
        connection.execute(text(f'SET search_path TO "{schema}"'))
        connection.commit()
        options = {"version_table_schema": schema} if os.environ.get("SCENARIO_LOOP") == "version_table_schema" else {}
        context.configure(connection=connection, transaction_per_migration=True, **options)
        with context.begin_transaction():
            context.run_migrations()
