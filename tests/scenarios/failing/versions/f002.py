"""fails half-way

Revision ID: f002
Revises: f001
"""

from alembic import op

revision = "f002"
down_revision = "f001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("CREATE TABLE second (id int)")
    op.execute("SELECT 1 / 0")


def downgrade() -> None:
    pass
