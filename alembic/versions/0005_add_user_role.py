"""add a required role to users

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25

The table already has rows, so the column arrives in three steps: nullable, backfilled, then
NOT NULL. The default keeps inserts from older app versions working during a rolling deploy.
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("users", sa.Column("role", sa.String(20), nullable=True))
    op.execute("UPDATE users SET role = 'member' WHERE role IS NULL")
    op.alter_column("users", "role", nullable=False, server_default="member")


def downgrade() -> None:
    op.drop_column("users", "role")
