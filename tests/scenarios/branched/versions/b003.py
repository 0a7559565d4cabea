"""branch two

Revision ID: b003
Revises: b001
"""

from alembic import op

revision = "b003"
down_revision = "b001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("CREATE TABLE two (id int)")


def downgrade() -> None:
    pass
