"""chaos step 6: records its effect

Revision ID: c006
"""

from alembic import op

revision = "c006"
down_revision = "c005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("INSERT INTO effects (revision) VALUES ('c006')")
    op.execute("SELECT pg_sleep(0)")


def downgrade() -> None:
    pass
