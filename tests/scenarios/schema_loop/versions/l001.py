"""a table in each tenant's schema

Revision ID: l001
Revises:
"""

from alembic import op

revision = "l001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("CREATE TABLE things (id serial PRIMARY KEY)")


def downgrade() -> None:
    op.execute("DROP TABLE things")
