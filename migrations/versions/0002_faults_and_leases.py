"""faults and leases: ids never reused on SQLite, the worker's in-flight state, a change-log cursor

Revision ID: 0002
Revises: 0001
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Tables whose ids other places remember (index files, the change log, API processes' memory): on SQLite an
# INTEGER PRIMARY KEY without AUTOINCREMENT hands the id of a deleted highest row to the next insert.
NEVER_REUSED = ("datasets", "embeddings", "records", "index_changes", "calibrations")
# PostgreSQL: the id of the writing transaction, so a follower can tell committed changes from in-flight ones.
TXID_DEFAULT = "(pg_current_xact_id()::text::bigint)"


def upgrade() -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    with op.batch_alter_table("records") as batch_op:
        batch_op.add_column(sa.Column("inflight_batch", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("batch_limit", sa.Integer(), nullable=True))
    with op.batch_alter_table("index_changes") as batch_op:
        batch_op.add_column(
            sa.Column("txid", sa.BigInteger(), server_default=None if sqlite else sa.text(TXID_DEFAULT), nullable=True)
        )
        batch_op.create_index("ix_index_changes_txid", ["txid"], unique=False)
    op.create_table(
        "change_log_pruned",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("max_id", sa.BigInteger(), nullable=False),
        sa.Column("max_txid", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    if sqlite:  # last: a later batch operation would rebuild the table from reflection, without AUTOINCREMENT
        for table in NEVER_REUSED:
            with op.batch_alter_table(table, recreate="always", table_kwargs={"sqlite_autoincrement": True}):
                pass


def downgrade() -> None:
    op.drop_table("change_log_pruned")
    with op.batch_alter_table("index_changes") as batch_op:
        batch_op.drop_index("ix_index_changes_txid")
        batch_op.drop_column("txid")
    with op.batch_alter_table("records") as batch_op:
        batch_op.drop_column("batch_limit")
        batch_op.drop_column("inflight_batch")
