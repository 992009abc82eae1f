"""Baseline: pod5 files, batches, workers, events, settings.

Revision ID: 0001
"""
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        "settings",
        sa.Column("key", sa.String(), primary_key=True),
        sa.Column("value", sa.Text(), nullable=False),
    )
    op.create_table(
        "batches",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("worker_id", sa.String(), nullable=False),
        sa.Column("state", sa.String(), nullable=False),
        sa.Column("claimed_at", sa.Float(), nullable=False),
        sa.Column("heartbeat_at", sa.Float(), nullable=False),
        sa.Column("finished_at", sa.Float(), nullable=True),
        sa.Column("n_files", sa.Integer(), nullable=False),
        sa.Column("n_bytes", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_batches_state", "batches", ["state"])
    op.create_table(
        "pod5_files",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("rel_path", sa.Text(), nullable=False, unique=True),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("mtime_ns", sa.Integer(), nullable=False),
        sa.Column("read_count", sa.Integer(), nullable=True),
        sa.Column("file_identifier", sa.String(), nullable=True),
        sa.Column("state", sa.String(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("batch_id", sa.Integer(), sa.ForeignKey("batches.id"), nullable=True),
        sa.Column("duplicate_of", sa.Integer(), sa.ForeignKey("pod5_files.id"), nullable=True),
        sa.Column("reads_pass", sa.Integer(), nullable=True),
        sa.Column("reads_fail", sa.Integer(), nullable=True),
        sa.Column("reads_missing", sa.Integer(), nullable=True),
        sa.Column("bases", sa.Integer(), nullable=True),
        sa.Column("added_at", sa.Float(), nullable=False),
        sa.Column("done_at", sa.Float(), nullable=True),
    )
    op.create_index("ix_pod5_files_state_id", "pod5_files", ["state", "id"])
    op.create_index("ix_pod5_files_file_identifier", "pod5_files", ["file_identifier"])
    op.create_table(
        "workers",
        sa.Column("worker_id", sa.String(), primary_key=True),
        sa.Column("host", sa.String(), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("device", sa.String(), nullable=True),
        sa.Column("started_at", sa.Float(), nullable=False),
        sa.Column("last_seen", sa.Float(), nullable=False),
        sa.Column("state", sa.String(), nullable=False),
        sa.Column("batches_done", sa.Integer(), nullable=False, server_default="0"),
    )
    op.create_table(
        "events",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("ts", sa.Float(), nullable=False),
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("worker_id", sa.String(), nullable=True),
        sa.Column("batch_id", sa.Integer(), nullable=True),
        sa.Column("file_id", sa.Integer(), nullable=True),
        sa.Column("message", sa.Text(), nullable=True),
    )


def downgrade():
    for table in ("events", "workers", "pod5_files", "batches", "settings"):
        op.drop_table(table)
