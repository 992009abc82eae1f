"""The queue index covers the claim's read: `ix_pod5_files_queue` (state, id, chemistry, size, isolate).

A claim reads the oldest pending files to size its batch: with a byte target (the default) up to
claim.LOOKAHEAD (2,048) of them, of which it needs the size and the isolate flag besides the id and the
chemistry. With those two in the index the read is the index alone: it no longer looks up each row in the
table, ~40 table pages per claim on a large queue, each a round trip on a network filesystem
(docs/benchmarks.md, "The queue index covers the claim's read"). The index is written by the same state
changes as before (size and isolate change only with them or on pending rows), in as many pages.

Revision ID: 0006
Revises: 0005
"""
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade():
    op.drop_index("ix_pod5_files_queue", "pod5_files")
    op.create_index("ix_pod5_files_queue", "pod5_files", ["state", "id", "chemistry", "size", "isolate"])


def downgrade():
    op.drop_index("ix_pod5_files_queue", "pod5_files")
    op.create_index("ix_pod5_files_queue", "pod5_files", ["state", "id", "chemistry"])
