"""merge first and last name into full_name

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-25

A data migration, reversible: the downgrade splits full_name at its first space.
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

# The previous release reads first_name and last_name: its pods must stop rather than start on this
# schema (see the README's "Rollbacks and rolling updates").
breaks_previous_release = "drops users.first_name and users.last_name, which the previous release reads"


def upgrade() -> None:
    op.add_column("users", sa.Column("full_name", sa.String(200), nullable=True))
    op.execute("UPDATE users SET full_name = btrim(first_name || ' ' || last_name)")
    op.alter_column("users", "full_name", nullable=False)
    op.drop_column("users", "first_name")
    op.drop_column("users", "last_name")


def downgrade() -> None:
    op.add_column("users", sa.Column("first_name", sa.String(100), nullable=True))
    op.add_column("users", sa.Column("last_name", sa.String(100), nullable=True))
    op.execute(
        """
        UPDATE users SET
            first_name = split_part(full_name, ' ', 1),
            last_name = CASE WHEN strpos(full_name, ' ') > 0
                             THEN substr(full_name, strpos(full_name, ' ') + 1) ELSE '' END
        """
    )
    op.alter_column("users", "first_name", nullable=False)
    op.alter_column("users", "last_name", nullable=False)
    op.drop_column("users", "full_name")
