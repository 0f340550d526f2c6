"""faults: incomplete studies, delivery claims, worker liveness

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04 19:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("incomplete_reason", sa.Text(), nullable=False, server_default="")
        )
        batch_op.add_column(sa.Column("incomplete_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(
            sa.Column("open_associations", sa.Integer(), nullable=False, server_default="0")
        )
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.add_column(sa.Column("claimed_until", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(
            sa.Column("interrupted", sa.Integer(), nullable=False, server_default="0")
        )
    op.create_table(
        "workers",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    op.create_index(op.f("ix_workers_seen_at"), "workers", ["seen_at"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_workers_seen_at"), table_name="workers")
    op.drop_table("workers")
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.drop_column("interrupted")
        batch_op.drop_column("claimed_until")
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.drop_column("open_associations")
        batch_op.drop_column("incomplete_at")
        batch_op.drop_column("incomplete_reason")
