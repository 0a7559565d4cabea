"""roles, and with `-x data=true` their reference rows (Alembic's cookbook recipe)

Revision ID: x004
Revises: b003
"""

import sqlalchemy as sa
from alembic import context, op

revision = "x004"
down_revision = "b003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table("roles", sa.Column("name", sa.Text, primary_key=True))
    if context.get_x_argument(as_dictionary=True).get("data") == "true":
        op.execute("INSERT INTO roles (name) VALUES ('admin'), ('reader')")


def downgrade() -> None:
    op.drop_table("roles")
