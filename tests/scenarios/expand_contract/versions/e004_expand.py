"""expand: users.handle, nullable, beside display_name

Revision ID: e004
Revises: b003
"""

import sqlalchemy as sa
from alembic import op

revision = "e004"
down_revision = "b003"
branch_labels = ("expand",)
depends_on = None


def upgrade() -> None:
    op.add_column("users", sa.Column("handle", sa.Text))


def downgrade() -> None:
    op.drop_column("users", "handle")
