"""the credentials rotate while this revision runs: then it connects again, as a project's code may

Revision ID: c002
Revises: c001

ROTATE_COMMAND (the test's) changes the role's password on the server and where the job reads it
from. Afterwards, a new engine from the URL the job gave env.py must connect, sync and async
(asyncpg), and so must an engine that already connected before it, and the job's watchdog,
which connects while the long statement below runs.
"""

import asyncio
import os
import subprocess

from alembic import context, op
from sqlalchemy import create_engine, make_url, pool, text
from sqlalchemy.ext.asyncio import create_async_engine

revision = "c002"
down_revision = "c001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # (an engine that connected before the rotation, as a project's module-level engine has)
    earlier = create_engine(context.config.get_main_option("sqlalchemy.url"), poolclass=pool.NullPool)
    with earlier.connect() as before:
        before.execute(text("SELECT 1"))
    subprocess.run(os.environ["ROTATE_COMMAND"], shell=True, check=True)
    engine = create_engine(context.config.get_main_option("sqlalchemy.url"), poolclass=pool.NullPool)
    with engine.connect() as again:
        role = again.execute(text("SELECT current_user")).scalar()
    op.execute(f"INSERT INTO connected_as VALUES ('c002', '{role}', 'a new engine after the rotation')")
    with earlier.connect() as again:
        role = again.execute(text("SELECT current_user")).scalar()
    op.execute(f"INSERT INTO connected_as VALUES ('c002', '{role}', 'the earlier engine after the rotation')")
    async_role = asyncio.run(_async_current_user())
    op.execute(f"INSERT INTO connected_as VALUES ('c002', '{async_role}', 'an async engine after the rotation')")
    op.execute("SELECT pg_sleep(2)")


async def _async_current_user() -> str:
    url = make_url(context.config.get_main_option("sqlalchemy.url")).set(drivername="postgresql+asyncpg", query={})
    engine = create_async_engine(url, poolclass=pool.NullPool)
    try:
        async with engine.connect() as again:
            return (await again.execute(text("SELECT current_user"))).scalar()
    finally:
        await engine.dispose()


def downgrade() -> None:
    pass
