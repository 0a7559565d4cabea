"""chaos step 2: records its effect, after a second

Revision ID: c002
"""

from alembic import op

revision = "c002"
down_revision = "c001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("INSERT INTO effects (revision) VALUES ('c002')")
    op.execute("SELECT pg_sleep(1)")


def downgrade() -> None:
    pass
