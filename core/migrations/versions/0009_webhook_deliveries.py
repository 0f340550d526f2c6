"""deliveries: webhook notifications of study events ride the same outbox

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07 02:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("deliveries") as batch:
        batch.alter_column("report_id", existing_type=sa.Integer(), nullable=True)
        batch.alter_column("destination", existing_type=sa.String(128), type_=sa.String(512))
        batch.add_column(sa.Column("study_id", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("event", sa.String(16), nullable=False, server_default=""))
        batch.add_column(sa.Column("payload", sa.Text(), nullable=True))
        batch.create_foreign_key("fk_deliveries_study_id", "studies", ["study_id"], ["id"])
        batch.create_index("ix_deliveries_study_id", ["study_id"])
    op.execute(
        "UPDATE deliveries SET study_id = "
        "(SELECT reports.study_id FROM reports WHERE reports.id = deliveries.report_id)"
    )


def downgrade() -> None:
    op.execute("DELETE FROM deliveries WHERE report_id IS NULL")
    with op.batch_alter_table("deliveries") as batch:
        batch.drop_index("ix_deliveries_study_id")
        batch.drop_constraint("fk_deliveries_study_id", type_="foreignkey")
        batch.drop_column("payload")
        batch.drop_column("event")
        batch.drop_column("study_id")
        batch.alter_column("destination", existing_type=sa.String(512), type_=sa.String(128))
        batch.alter_column("report_id", existing_type=sa.Integer(), nullable=False)
