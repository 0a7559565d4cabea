"""tenant table 1

Revision ID: t001
Revises: 
"""

from alembic import op

revision = "t001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("CREATE TABLE tenant_table_1 (id serial PRIMARY KEY, name text NOT NULL)")
    op.execute("INSERT INTO tenant_table_1 (name) SELECT 'row ' || g FROM generate_series(1, 100) g")


def downgrade() -> None:
    op.execute("DROP TABLE tenant_table_1")
