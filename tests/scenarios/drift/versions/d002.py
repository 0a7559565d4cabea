"""books

Revision ID: d002
"""
import sqlalchemy as sa
from alembic import op

revision = "d002"
down_revision = "d001"
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        "books",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("author_id", sa.Integer, sa.ForeignKey("authors.id", name="fk_books_author"), nullable=False),
        sa.Column("title", sa.Text, nullable=False),
    )
    op.create_index("ix_books_title", "books", ["title"])


def downgrade():
    op.drop_table("books")
