"""takes a while, then records that it ran

Revision ID: s002
Revises: s001
"""

import os

from alembic import op

revision = "s002"
down_revision = "s001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("INSERT INTO ran DEFAULT VALUES")
    seconds = float(os.environ.get("SCENARIO_SLEEP", "2"))
    op.execute(f"SELECT pg_sleep({seconds})")
    op.execute("CREATE TABLE slow_done (id int)")


def downgrade() -> None:
    pass
