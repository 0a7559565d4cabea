"""root

Revision ID: b001
Revises: 
"""

from alembic import op

revision = "b001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("CREATE TABLE root (id int)")


def downgrade() -> None:
    pass
