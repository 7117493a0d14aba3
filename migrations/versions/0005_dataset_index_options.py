"""dataset index options: a dataset's own FAISS index policy over the process-wide settings

Revision ID: 0005
Revises: 0004
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A plain ADD COLUMN on both databases: a batch rebuild on SQLite would drop the table's AUTOINCREMENT.
    op.add_column("datasets", sa.Column("index_options", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("datasets", table_kwargs={"sqlite_autoincrement": True}) as batch_op:
        batch_op.drop_column("index_options")
