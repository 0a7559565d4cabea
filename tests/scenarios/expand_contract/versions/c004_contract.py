"""contract: display_name goes, once the expand step is in

Revision ID: c004
Revises: b003
"""

from alembic import op

revision = "c004"
down_revision = "b003"
branch_labels = ("contract",)
depends_on = "e004"


def upgrade() -> None:
    op.drop_column("users", "display_name")


def downgrade() -> None:
    import sqlalchemy as sa

    op.add_column("users", sa.Column("display_name", sa.Text))
