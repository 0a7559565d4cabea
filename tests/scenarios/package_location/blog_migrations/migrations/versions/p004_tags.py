"""tags, in the package's own version location

Revision ID: p004
Revises: b003
"""

import sqlalchemy as sa
from alembic import op

revision = "p004"
down_revision = "b003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table("tags", sa.Column("name", sa.Text, primary_key=True))


def downgrade() -> None:
    op.drop_table("tags")
