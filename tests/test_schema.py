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
