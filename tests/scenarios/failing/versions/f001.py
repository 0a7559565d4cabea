"""create a table

Revision ID: f001
Revises: 
"""

from alembic import op

revision = "f001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("CREATE TABLE first (id int)")


def downgrade() -> None:
    pass
