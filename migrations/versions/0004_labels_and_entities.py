"""labels and entities

Revision ID: 0004
Revises: 0003
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
NOW = sa.text("(CURRENT_TIMESTAMP)")


def upgrade() -> None:
    op.create_table(
        "labels",
        sa.Column("id", BigId, nullable=False),
        sa.Column("dataset_id", BigId, nullable=False),
        sa.Column("left_source", sa.String(length=64), nullable=False),
        sa.Column("left_id", sa.String(length=256), nullable=False),
        sa.Column("right_source", sa.String(length=64), nullable=False),
        sa.Column("right_id", sa.String(length=256), nullable=False),
        sa.Column("label", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(), server_default=NOW, nullable=False),
        sa.Column("updated_at", sa.DateTime(), server_default=NOW, nullable=False),
        sa.ForeignKeyConstraint(["dataset_id"], ["datasets.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("dataset_id", "left_source", "left_id", "right_source", "right_id", name="uq_labels_pair"),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "entity_states",
        sa.Column("dataset_id", BigId, nullable=False),
        sa.Column("calibration_id", sa.BigInteger(), nullable=True),
        sa.Column("threshold", sa.Float(), nullable=True),
        sa.Column("updated_at", sa.DateTime(), server_default=NOW, nullable=False),
        sa.ForeignKeyConstraint(["dataset_id"], ["datasets.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("dataset_id"),
    )
    op.create_table(
        "entities",
        sa.Column("id", BigId, nullable=False),
        sa.Column("dataset_id", BigId, nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(), server_default=NOW, nullable=False),
        sa.ForeignKeyConstraint(["dataset_id"], ["datasets.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_entities_dataset_size", "entities", ["dataset_id", "size"])
    op.create_table(
        "entity_members",
        sa.Column("record_id", sa.BigInteger(), nullable=False),
        sa.Column("dataset_id", BigId, nullable=False),
        sa.Column("entity_id", BigId, nullable=False),
        sa.Column("embedding_id", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(["dataset_id"], ["datasets.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["entity_id"], ["entities.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("record_id"),
    )
    op.create_index("ix_entity_members_entity", "entity_members", ["entity_id"])
    op.create_index("ix_entity_members_dataset", "entity_members", ["dataset_id"])
    op.create_table(
        "entity_links",
        sa.Column("id", BigId, nullable=False),
        sa.Column("dataset_id", BigId, nullable=False),
        sa.Column("left_record_id", sa.BigInteger(), nullable=False),
        sa.Column("right_record_id", sa.BigInteger(), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["dataset_id"], ["datasets.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("left_record_id", "right_record_id", name="uq_entity_links_pair"),
    )
    op.create_index("ix_entity_links_right", "entity_links", ["right_record_id"])
    op.create_index("ix_entity_links_dataset", "entity_links", ["dataset_id"])


def downgrade() -> None:
    op.drop_index("ix_entity_links_dataset", table_name="entity_links")
    op.drop_index("ix_entity_links_right", table_name="entity_links")
    op.drop_table("entity_links")
    op.drop_index("ix_entity_members_dataset", table_name="entity_members")
    op.drop_index("ix_entity_members_entity", table_name="entity_members")
    op.drop_table("entity_members")
    op.drop_index("ix_entities_dataset_size", table_name="entities")
    op.drop_table("entities")
    op.drop_table("entity_states")
    op.drop_table("labels")
