"""branch one

Revision ID: b002
Revises: b001
"""

from alembic import op

revision = "b002"
down_revision = "b001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("CREATE TABLE one (id int)")


def downgrade() -> None:
    pass
