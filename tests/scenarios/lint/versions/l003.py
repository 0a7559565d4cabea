"""index and require a column the unsafe way

Revision ID: l003

Both statements lock a table that already has rows: the index blocks writes while it builds
(no CONCURRENTLY), and a NOT NULL column without a default fails or forces a rewrite.
"""

from alembic import op

revision = "l003"
down_revision = "l002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("CREATE INDEX ix_items_name ON items (name)")
    op.execute("ALTER TABLE items ADD COLUMN sku text NOT NULL")


def downgrade() -> None:
    op.execute("ALTER TABLE items DROP COLUMN sku")
    op.execute("DROP INDEX ix_items_name")
