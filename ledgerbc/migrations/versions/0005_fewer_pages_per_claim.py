"""Fewer pages per claim: one queue index on pod5_files, batch ids without AUTOINCREMENT.

Every page a transaction changes is journalled (three writes) and written back (one), and read first: five
round trips on a network filesystem (docs/benchmarks.md, "One queue index, no id counter, 8 KiB pages"). A
publish + claim used to change seven; after this, five.

- pod5_files: `ix_pod5_files_state_id` (state, id) and `ix_pod5_files_state_chemistry_id` (state, chemistry,
  id) become one index, `ix_pod5_files_queue` (state, id, chemistry): every state change wrote both. The
  queue is still read oldest first, and a chemistry's own files are found in that order from the index
  alone (the chemistry is in it), without a table lookup per skipped row.
- batches: no AUTOINCREMENT, whose counter (`sqlite_sequence`) was one more page per claim. A batch id is
  the highest id in the table plus one, or the floor a rebuild sets above every id it saw, kept in the
  database header (`PRAGMA user_version`, on page 1, which every transaction writes anyway). The old
  counter becomes that floor here, so no id it handed out is handed out again.

Revision ID: 0005
Revises: 0004
"""
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def _batches_table(autoincrement: bool) -> None:
    """Copy the table (SQLite cannot drop AUTOINCREMENT in place). pod5_files refers to it: migrations run with
    foreign keys off (db.make_engine), and the copy must leave every reference as it found it."""
    conn = op.get_bind()
    broken = "SELECT count(*) FROM pragma_foreign_key_check('pod5_files')"
    before = conn.exec_driver_sql(broken).scalar()
    with op.batch_alter_table("batches", recreate="always",
                              table_kwargs={"sqlite_autoincrement": autoincrement}) as batch:
        batch.alter_column("id")
    after = conn.exec_driver_sql(broken).scalar()
    if after != before:
        raise RuntimeError(f"copying the batches table broke {after - before} references from pod5_files")


def upgrade():
    conn = op.get_bind()
    op.drop_index("ix_pod5_files_state_chemistry_id", "pod5_files")
    op.drop_index("ix_pod5_files_state_id", "pod5_files")
    op.create_index("ix_pod5_files_queue", "pod5_files", ["state", "id", "chemistry"])
    handed_out = conn.exec_driver_sql("SELECT seq FROM sqlite_sequence WHERE name = 'batches'").scalar() or 0
    _batches_table(autoincrement=False)
    conn.exec_driver_sql(f"PRAGMA user_version = {int(handed_out)}")


def downgrade():
    conn = op.get_bind()
    floor = conn.exec_driver_sql(
        "SELECT max(coalesce((SELECT max(id) FROM batches), 0), (SELECT user_version FROM pragma_user_version))"
    ).scalar()
    _batches_table(autoincrement=True)
    conn.exec_driver_sql("DELETE FROM sqlite_sequence WHERE name = 'batches'")
    conn.exec_driver_sql("INSERT INTO sqlite_sequence (name, seq) VALUES ('batches', ?)", (int(floor),))
    conn.exec_driver_sql("PRAGMA user_version = 0")
    op.drop_index("ix_pod5_files_queue", "pod5_files")
    op.create_index("ix_pod5_files_state_chemistry_id", "pod5_files", ["state", "chemistry", "id"])
    op.create_index("ix_pod5_files_state_id", "pod5_files", ["state", "id"])
