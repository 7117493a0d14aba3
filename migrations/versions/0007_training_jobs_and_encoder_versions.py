"""learning from labels: training jobs, encoder versions, the serving version of a dataset, label folds

Revision ID: 0007
Revises: 0006
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
NOW = sa.text("(CURRENT_TIMESTAMP)")
UNFINISHED = sa.text("status IN ('queued', 'training', 'encoding')")


def upgrade() -> None:
    with op.batch_alter_table("datasets") as batch:
        batch.add_column(sa.Column("encoder_version", sa.String(length=128), nullable=True))
    with op.batch_alter_table("labels") as batch:
        batch.add_column(sa.Column("holdout", sa.Boolean(), nullable=True))
    op.create_table(
        "training_jobs",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("dataset_id", BigId, nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("progress", sa.Float(), nullable=False),
        sa.Column("labels", sa.Integer(), nullable=False),
        sa.Column("version", sa.String(length=128), nullable=True),
        sa.Column("adopted", sa.Boolean(), nullable=True),
        sa.Column("metrics", sa.JSON(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("options", sa.JSON(), nullable=False),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("claim_token", sa.String(length=64), nullable=True),
        sa.Column("lease_until", sa.DateTime(), nullable=True),
        sa.Column("created_at", sa.DateTime(), server_default=NOW, nullable=False),
        sa.Column("updated_at", sa.DateTime(), server_default=NOW, nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=True),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(["dataset_id"], ["datasets.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_training_jobs_dataset_created", "training_jobs", ["dataset_id", "created_at"])
    op.create_index("ix_training_jobs_queue", "training_jobs", ["status", "lease_until"])
    op.create_index(
        "uq_training_jobs_one_unfinished",
        "training_jobs",
        ["dataset_id"],
        unique=True,
        sqlite_where=UNFINISHED,
        postgresql_where=UNFINISHED,
    )
    op.create_table(
        "encoder_versions",
        sa.Column("id", BigId, nullable=False),
        sa.Column("dataset_id", BigId, nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("base_encoder", sa.String(length=128), nullable=False),
        sa.Column("encoder_key", sa.String(length=64), nullable=True),
        sa.Column("job_id", sa.String(length=32), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.DateTime(), server_default=NOW, nullable=False),
        sa.ForeignKeyConstraint(["dataset_id"], ["datasets.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name", name="uq_encoder_versions_name"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_encoder_versions_dataset", "encoder_versions", ["dataset_id"])


def downgrade() -> None:
    op.drop_index("ix_encoder_versions_dataset", table_name="encoder_versions")
    op.drop_table("encoder_versions")
    op.drop_index("uq_training_jobs_one_unfinished", table_name="training_jobs")
    op.drop_index("ix_training_jobs_queue", table_name="training_jobs")
    op.drop_index("ix_training_jobs_dataset_created", table_name="training_jobs")
    op.drop_table("training_jobs")
    with op.batch_alter_table("labels") as batch:
        batch.drop_column("holdout")
    with op.batch_alter_table("datasets") as batch:
        batch.drop_column("encoder_version")
