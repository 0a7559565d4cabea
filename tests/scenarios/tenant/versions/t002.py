"""tenant table 2

Revision ID: t002
Revises: t001
"""

from alembic import op

revision = "t002"
down_revision = "t001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("CREATE TABLE tenant_table_2 (id serial PRIMARY KEY, name text NOT NULL)")
    op.execute("INSERT INTO tenant_table_2 (name) SELECT 'row ' || g FROM generate_series(1, 100) g")


def downgrade() -> None:
    op.execute("DROP TABLE tenant_table_2")
