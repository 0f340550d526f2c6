"""report_objects (key images and key object selection) and what each delivery sends

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07 02:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "report_objects",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("report_id", sa.Integer(), sa.ForeignKey("reports.id"), nullable=False),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("sop_class_uid", sa.String(64), nullable=False),
        sa.Column("sop_instance_uid", sa.String(64), nullable=False, unique=True),
        sa.Column("path", sa.String(512), nullable=False),
    )
    op.create_index("ix_report_objects_report_id", "report_objects", ["report_id"])
    with op.batch_alter_table("deliveries") as batch:
        # rows made before key images existed sent the SR alone
        batch.add_column(sa.Column("objects", sa.String(32), nullable=False, server_default="sr"))


def downgrade() -> None:
    with op.batch_alter_table("deliveries") as batch:
        batch.drop_column("objects")
    op.drop_index("ix_report_objects_report_id", "report_objects")
    op.drop_table("report_objects")
