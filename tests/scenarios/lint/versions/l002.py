"""add a nullable note (safe: no rewrite, no scan)

Revision ID: l002
"""

from alembic import op

revision = "l002"
down_revision = "l001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE items ADD COLUMN note text")


def downgrade() -> None:
    op.execute("ALTER TABLE items DROP COLUMN note")
