"""`ledgerbc upgrade`: bring an older ledger to this version's schema, keeping a backup copy."""

import shutil
from pathlib import Path

import sqlalchemy as sa

from . import db, schema
from .errors import LedgerCorrupt, LedgerNotFound, SchemaMismatch


def current_revision(path) -> str | None:
    if not Path(path).is_file():
        raise LedgerNotFound(f"no ledger at {path}. Give the ledger's path with --ledger (or LEDGERBC_LEDGER).")
    engine = db.make_engine(path)
    try:
        with engine.connect() as conn:
            return conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()
    except sa.exc.DBAPIError as exc:  # the same one-line errors as every other command (db.Ledger.transact)
        what = "is damaged or not a ledger" if db._classify(exc) == "corrupt" else "is not a ledgerbc ledger"
        raise LedgerCorrupt(
            f"the ledger {path} {what} ({db._short(exc)}). Run `ledgerbc doctor`, then "
            "`ledgerbc recover --rebuild --input DIR --output DIR`."
        ) from None
    finally:
        engine.dispose()


def upgrade_ledger(ledger):
    """Returns (revision before, revision after, backup path or None)."""
    ledger.check_file()  # before locking: no stray .lock beside something that is not a ledger
    with ledger.locked():
        before = current_revision(ledger.path)
        head = schema.head_revision()
        if before not in schema.known_revisions():
            raise SchemaMismatch(
                f"the ledger {ledger.path} has schema '{before}', newer than this ledgerbc knows. "
                "Use the ledgerbc version that wrote it."
            )
        if before == head:
            return before, before, None
        backup = ledger.path.with_name(f"{ledger.path.name}.before-{head}")
        shutil.copy2(ledger.path, backup)
        engine = db.make_engine(ledger.path, foreign_keys=False)
        try:
            with engine.connect() as conn:
                schema.upgrade(conn, "head")
                conn.commit()
        finally:
            engine.dispose()
        return before, current_revision(ledger.path), backup



