"""tenant table 3

Revision ID: t003
Revises: t002
"""

from alembic import op

revision = "t003"
down_revision = "t002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("CREATE TABLE tenant_table_3 (id serial PRIMARY KEY, name text NOT NULL)")
    op.execute("INSERT INTO tenant_table_3 (name) SELECT 'row ' || g FROM generate_series(1, 100) g")


def downgrade() -> None:
    op.execute("DROP TABLE tenant_table_3")
