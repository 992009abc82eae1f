"""The schema has one source, the shipped migrations: the models agree with them, and what a ledger is
checked against and what `upgrade` writes both come from them."""
from __future__ import annotations

import re
from pathlib import Path

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from ledgerbc import db, models, schema
from ledgerbc.settings import Settings

VERSIONS = Path(schema.MIGRATIONS) / "versions"


def test_known_revisions_are_the_migration_files_in_order():
    files = sorted(p.name for p in VERSIONS.glob("[0-9]*.py"))
    assert schema.known_revisions() == tuple(name.split("_", 1)[0] for name in files)
    assert schema.known_revisions()[:3] == ("0001", "0002", "0003")
    assert schema.head_revision() == schema.known_revisions()[-1]


def test_a_new_ledger_is_written_at_the_head_revision(tmp_path):
    path = tmp_path / "ledgerbc.db"
    db.create_ledger_file(path, Settings(input_dir=str(tmp_path), output_dir=str(tmp_path)))
    engine = db.make_engine(path)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar() == schema.head_revision()
    engine.dispose()


def test_the_models_describe_exactly_what_the_migrations_build(tmp_path):
    path = tmp_path / "ledgerbc.db"
    db.create_ledger_file(path, Settings(input_dir=str(tmp_path), output_dir=str(tmp_path)))
    engine = db.make_engine(path)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), models.Base.metadata)
    engine.dispose()
    assert diff == []


def test_every_migration_file_declares_the_revision_its_name_says():
    for path in VERSIONS.glob("[0-9]*.py"):
        text = path.read_text()
        declared = re.search(r'^revision = "(\w+)"', text, re.M).group(1)
        assert path.name.startswith(declared + "_"), path.name


def test_an_unknown_revision_is_refused_and_an_old_one_names_upgrade(tmp_path):
    from ledgerbc import errors

    path = tmp_path / "ledgerbc.db"
    db.create_ledger_file(path, Settings(input_dir=str(tmp_path), output_dir=str(tmp_path)), revision="0002")
    ledger = db.Ledger(path)
    try:
        ledger.read_settings()
    except errors.SchemaMismatch as exc:
        assert "older schema 0002" in str(exc) and "ledgerbc upgrade" in str(exc)
    else:
        raise AssertionError("an 0002 ledger was opened without the upgrade")
    with sa.create_engine(f"sqlite:///{path}").begin() as conn:
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = '9999'")
    try:
        db.Ledger(path).read_settings()
    except errors.SchemaMismatch as exc:
        assert "'9999', newer than this ledgerbc knows" in str(exc)
    else:
        raise AssertionError("a ledger of an unknown (newer) schema was opened")


def test_the_revisions_read_without_alembic_are_alembics_own():
    from alembic.script import ScriptDirectory

    walked = ScriptDirectory.from_config(schema.alembic_config()).walk_revisions()
    assert schema.known_revisions() == tuple(reversed([rev.revision for rev in walked]))


def test_upgrade_from_0004_keeps_every_row_and_reference_hands_out_no_id_of_the_old_counter_and_covers_the_queue(
        tmp_path):
    """0005 copies `batches` without AUTOINCREMENT and merges the two state indexes: the rows, their references
    from pod5_files and the counter (here a rebuild's floor above the highest row) all come through. 0006 puts
    what the claim reads of the queue into its index."""
    import sqlite3

    from ledgerbc import claim, migrate

    path = tmp_path / "ledgerbc.db"
    settings = Settings(input_dir=str(tmp_path), output_dir=str(tmp_path), batch_files=1, batch_bytes=None)
    db.create_ledger_file(path, settings, revision="0004")
    raw = sqlite3.connect(path, isolation_level=None)
    raw.execute("PRAGMA foreign_keys=ON")
    for i in (1, 2, 3):
        raw.execute("INSERT INTO batches (id, worker_id, state, claimed_at, heartbeat_at, n_files, n_bytes, token, "
                    "chemistry) VALUES (?, 'w', ?, 0, 0, 1, 10, ?, 'k')",
                    (i, "running" if i == 3 else "done", f"t{i}"))
    raw.execute("UPDATE sqlite_sequence SET seq = 50 WHERE name = 'batches'")  # a rebuild's floor
    rows = [("done", 1), ("done", 2), ("claimed", 3), ("pending", None), ("pending", None)]
    for i, (state, batch) in enumerate(rows):
        raw.execute("INSERT INTO pod5_files (id, rel_path, size, mtime_ns, read_count, file_identifier, state, "
                    "attempts, batch_id, added_at, chemistry, isolate) VALUES (?, ?, 10, 0, 1, ?, ?, 0, ?, 0, 'k', 0)",
                    (i + 1, f"f{i}.pod5", f"fid{i}", state, batch))
    raw.close()

    before, after, _backup = migrate.upgrade_ledger(db.Ledger(path))
    assert (before, after) == ("0004", schema.head_revision())
    raw = sqlite3.connect(path)
    assert raw.execute("PRAGMA user_version").fetchone()[0] == 50
    assert "AUTOINCREMENT" not in raw.execute("SELECT sql FROM sqlite_master WHERE name = 'batches'").fetchone()[0]
    assert raw.execute("SELECT id, state, token FROM batches ORDER BY id").fetchall() == [
        (1, "done", "t1"), (2, "done", "t2"), (3, "running", "t3")]
    assert raw.execute("SELECT id, state, batch_id FROM pod5_files ORDER BY id").fetchall() == [
        (1, "done", 1), (2, "done", 2), (3, "claimed", 3), (4, "pending", None), (5, "pending", None)]
    assert raw.execute("PRAGMA foreign_key_check").fetchall() == []
    indexes = {r[0] for r in raw.execute(
        "SELECT name FROM sqlite_master WHERE tbl_name = 'pod5_files' AND type = 'index'")}
    assert "ix_pod5_files_queue" in indexes
    assert not indexes & {"ix_pod5_files_state_id", "ix_pod5_files_state_chemistry_id"}
    # 0006: the queue index holds what the claim reads of the queue (size and isolate), in the queue's order
    assert [r[2] for r in raw.execute("PRAGMA index_info('ix_pod5_files_queue')")] == [
        "state", "id", "chemistry", "size", "isolate"]
    assert raw.execute("SELECT id, size, isolate FROM pod5_files INDEXED BY ix_pod5_files_queue "
                       "WHERE state = 'pending' ORDER BY id").fetchall() == [(4, 10, 0), (5, 10, 0)]
    raw.close()
    ledger = db.Ledger(path)
    assert ledger.transact(db.batch_ids_handed_out) == 50
    c = claim.claim_batch(ledger, "w2", ledger.read_settings())
    assert c.batch_id == 51 and [f.rel for f in c.files] == ["f3.pod5"]


def test_a_new_ledger_has_8k_pages_and_its_schema_on_the_first(tmp_path):
    """Every transaction reads page 1; with the schema on it, a fresh connection reads no other page to learn
    the schema (db.PAGE_SIZE)."""
    import sqlite3

    path = tmp_path / "ledgerbc.db"
    db.create_ledger_file(path, Settings(input_dir=str(tmp_path), output_dir=str(tmp_path)))
    raw = sqlite3.connect(path)
    assert raw.execute("PRAGMA page_size").fetchone()[0] == 8192
    assert raw.execute("SELECT count(*) FROM dbstat WHERE name = 'sqlite_schema'").fetchone()[0] == 1
    raw.close()
