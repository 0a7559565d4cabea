"""users.display_name, filled from the email

Revision ID: b003
Revises: b002
"""

import sqlalchemy as sa
from alembic import op

revision = "b003"
down_revision = "b002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("users", sa.Column("display_name", sa.Text))
    op.execute("UPDATE users SET display_name = split_part(email, '@', 1)")


def downgrade() -> None:
    op.drop_column("users", "display_name")
