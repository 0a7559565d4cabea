"""chaos step 5: records its effect

Revision ID: c005
"""

from alembic import op

revision = "c005"
down_revision = "c004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("INSERT INTO effects (revision) VALUES ('c005')")
    op.execute("SELECT pg_sleep(0)")


def downgrade() -> None:
    pass
