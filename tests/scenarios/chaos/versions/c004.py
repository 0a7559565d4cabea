"""chaos step 4: records its effect, after a second

Revision ID: c004
"""

from alembic import op

revision = "c004"
down_revision = "c003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("INSERT INTO effects (revision) VALUES ('c004')")
    op.execute("SELECT pg_sleep(1)")


def downgrade() -> None:
    pass
