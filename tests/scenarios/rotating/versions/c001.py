"""a table recording who each later revision connected as

Revision ID: c001
Revises: 
"""

from alembic import op

revision = "c001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("CREATE TABLE connected_as (revision text, role text, how text)")


def downgrade() -> None:
    op.execute("DROP TABLE connected_as")
