"""Roles (watchman, scanner) and follow-mode settle tracking.

Revision ID: 0002
Revises: 0001
"""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        "roles",
        sa.Column("name", sa.String(), primary_key=True),
        sa.Column("worker_id", sa.String(), nullable=False),
        sa.Column("heartbeat_at", sa.Float(), nullable=False),
    )
    with op.batch_alter_table("pod5_files") as batch:
        batch.add_column(sa.Column("stable_since", sa.Float(), nullable=True))


def downgrade():
    with op.batch_alter_table("pod5_files") as batch:
        batch.drop_column("stable_since")
    op.drop_table("roles")
