"""a table recording each time the slow revision runs

Revision ID: s001
Revises: 
"""

from alembic import op

revision = "s001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("CREATE TABLE ran (id serial PRIMARY KEY, at timestamptz NOT NULL DEFAULT now())")


def downgrade() -> None:
    pass
