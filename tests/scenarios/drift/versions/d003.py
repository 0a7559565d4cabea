"""books.isbn (DRIFT_SLEEP: seconds it takes, for a deploy in flight)

Revision ID: d003
"""
import os

import sqlalchemy as sa
from alembic import op

revision = "d003"
down_revision = "d002"
branch_labels = None
depends_on = None


def upgrade():
    op.add_column("books", sa.Column("isbn", sa.String(20)))
    op.execute(f"SELECT pg_sleep({float(os.environ.get('DRIFT_SLEEP', '0'))})")


def downgrade():
    op.drop_column("books", "isbn")
