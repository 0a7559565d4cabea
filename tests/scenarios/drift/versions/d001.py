"""authors

Revision ID: d001
"""
import sqlalchemy as sa
from alembic import op

revision = "d001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        "authors",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("email", sa.String(200), nullable=False),
        sa.UniqueConstraint("email", name="uq_authors_email"),
    )


def downgrade():
    op.drop_table("authors")
