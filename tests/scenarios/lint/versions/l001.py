"""create items (safe: a new table)

Revision ID: l001
"""

from alembic import op

revision = "l001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("CREATE TABLE items (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, name text NOT NULL)")


def downgrade() -> None:
    op.execute("DROP TABLE items")
