"""Run info per file (one chemistry per batch), fencing nonces, provenance, isolation, and the outputs table.

- pod5_files: the file's run-info key (flow cell product code, kit, sample rate -> `chemistry`), its signal
  samples, and `isolate` (claim it alone). Files that earlier versions recognised as "failed on their own
  account" by the text of their last error are marked `isolate` here.
- batches: the fencing nonce `token`, the chemistry, model, dorado version and GPUs it ran with.
- workers: dorado version and GPUs.
- outputs: one row per published output file (pass/fail per barcode, and the summary), with its read and
  base counts, size and checksum: what `verify` checks and what status, finalize and the report add up.

Revision ID: 0003
Revises: 0002
"""
import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table("pod5_files") as batch:
        batch.add_column(sa.Column("flow_cell_product_code", sa.String(), nullable=True))
        batch.add_column(sa.Column("sequencing_kit", sa.String(), nullable=True))
        batch.add_column(sa.Column("sample_rate", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("chemistry", sa.String(), nullable=True))
        batch.add_column(sa.Column("samples", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("isolate", sa.Boolean(), nullable=False, server_default=sa.false()))
    op.create_index("ix_pod5_files_state_chemistry_id", "pod5_files", ["state", "chemistry", "id"])
    # Before 0003 a pending file with attempts whose last error did not start with "reclaimed: " was
    # claimed alone (it had failed on its own account): that is what `isolate` now says.
    op.execute(
        "UPDATE pod5_files SET isolate = 1 WHERE attempts > 0 AND state = 'pending' "
        "AND (last_error IS NULL OR last_error NOT LIKE 'reclaimed: %')"
    )
    with op.batch_alter_table("batches") as batch:
        batch.add_column(sa.Column("token", sa.String(), nullable=True))
        batch.add_column(sa.Column("chemistry", sa.String(), nullable=True))
        batch.add_column(sa.Column("model", sa.String(), nullable=True))
        batch.add_column(sa.Column("dorado_version", sa.String(), nullable=True))
        batch.add_column(sa.Column("gpus", sa.String(), nullable=True))
    with op.batch_alter_table("workers") as batch:
        batch.add_column(sa.Column("dorado_version", sa.String(), nullable=True))
        batch.add_column(sa.Column("gpus", sa.String(), nullable=True))
    op.create_table(
        "outputs",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("file_id", sa.Integer(), sa.ForeignKey("pod5_files.id"), nullable=False),
        sa.Column("batch_id", sa.Integer(), nullable=True),
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("barcode", sa.String(), nullable=True),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("reads", sa.Integer(), nullable=False),
        sa.Column("bases", sa.Integer(), nullable=False),
        sa.Column("bytes", sa.Integer(), nullable=False),
        sa.Column("checksum", sa.String(), nullable=True),
    )
    op.create_index("ix_outputs_file_id", "outputs", ["file_id"])
    op.create_index("ix_outputs_barcode", "outputs", ["barcode"])


def downgrade():
    op.drop_table("outputs")
    with op.batch_alter_table("workers") as batch:
        batch.drop_column("gpus")
        batch.drop_column("dorado_version")
    with op.batch_alter_table("batches") as batch:
        for column in ("gpus", "dorado_version", "model", "chemistry", "token"):
            batch.drop_column(column)
    op.drop_index("ix_pod5_files_state_chemistry_id", "pod5_files")
    with op.batch_alter_table("pod5_files") as batch:
        for column in ("isolate", "samples", "chemistry", "sample_rate", "sequencing_kit", "flow_cell_product_code"):
            batch.drop_column(column)
