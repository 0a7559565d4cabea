"""never reached

Revision ID: f003
Revises: f002
"""

from alembic import op

revision = "f003"
down_revision = "f002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("CREATE TABLE third (id int)")


def downgrade() -> None:
    pass
