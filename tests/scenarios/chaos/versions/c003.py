"""chaos step 3: records its effect

Revision ID: c003
"""

from alembic import op

revision = "c003"
down_revision = "c002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("INSERT INTO effects (revision) VALUES ('c003')")
    op.execute("SELECT pg_sleep(0)")


def downgrade() -> None:
    pass
