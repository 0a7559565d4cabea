"""chaos step 1: records its effect

Revision ID: c001
"""

from alembic import op

revision = "c001"
down_revision = None
branch_labels = None
depends_on = None

def upgrade() -> None:
    op.execute("CREATE TABLE effects (revision text NOT NULL, at timestamptz NOT NULL DEFAULT now())")
    op.execute("INSERT INTO effects (revision) VALUES ('c001')")
    op.execute("SELECT pg_sleep(0)")


def downgrade() -> None:
    pass
