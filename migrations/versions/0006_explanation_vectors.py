"""explanation vectors: a cache of each dataset's own for explanations, out of the shared embeddings table

Revision ID: 0006
Revises: 0005
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
NOW = sa.text("(CURRENT_TIMESTAMP)")

# Explanations used to cache their vectors in the shared content cache, where no dataset owned them and nothing
# deleted them. Rows that no record, index change or entity member refers to are those (or vectors of records
# since replaced or deleted): nothing reads them by id, and at worst a text is encoded again.
UNREFERENCED_EMBEDDINGS = """
DELETE FROM embeddings
WHERE id NOT IN (SELECT embedding_id FROM records WHERE embedding_id IS NOT NULL)
  AND id NOT IN (SELECT embedding_id FROM index_changes WHERE embedding_id IS NOT NULL)
  AND id NOT IN (SELECT embedding_id FROM entity_members)
"""


def upgrade() -> None:
    op.create_table(
        "explanation_vectors",
        sa.Column("id", BigId, nullable=False),
        sa.Column("dataset_id", BigId, nullable=False),
        sa.Column("encoder_key", sa.String(length=64), nullable=False),
        sa.Column("input_hash", sa.String(length=64), nullable=False),
        sa.Column("dim", sa.Integer(), nullable=False),
        sa.Column("vector", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(), server_default=NOW, nullable=False),
        sa.ForeignKeyConstraint(["dataset_id"], ["datasets.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("dataset_id", "encoder_key", "input_hash", name="uq_explanation_vectors_dataset_input"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_explanation_vectors_dataset_id", "explanation_vectors", ["dataset_id", "id"])
    op.execute(UNREFERENCED_EMBEDDINGS)


def downgrade() -> None:
    op.drop_index("ix_explanation_vectors_dataset_id", table_name="explanation_vectors")
    op.drop_table("explanation_vectors")
