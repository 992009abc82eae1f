"""The frame of a ledger transaction (db.Ledger._transaction) keeps the shared-filesystem rules.

The connection is opened before the lock and closed after it (issue 16); these tests pin what must still
hold: every statement that touches the database runs under the lock, from BEGIN IMMEDIATE to COMMIT; each
transaction has a connection of its own; a commit made by another process at any point before our BEGIN
(even after our connection was opened) is seen; a failed transaction leaves no SQLite lock behind; the
journal is a rollback journal and the commit syncs FULL, even for a ledger someone switched to WAL.
"""
from __future__ import annotations

import fcntl
import os
import sqlite3
import subprocess
import sys

import pytest
import sqlalchemy as sa

from ledgerbc import db
from ledgerbc.errors import LedgerError
from ledgerbc.models import Pod5File

BUMP = (
    "import sys\nfrom ledgerbc.db import Ledger\n"
    "Ledger(sys.argv[1]).transact(lambda c: c.exec_driver_sql('UPDATE pod5_files SET attempts = attempts + 1'))\n"
)


def attempts(ledger) -> int:
    return ledger.transact(lambda c: c.exec_driver_sql("SELECT attempts FROM pod5_files").scalar())


def lock_is_held(lock_path) -> bool:
    """Whether anyone (this process included: flock belongs to the open file) holds the ledger lock."""
    fd = os.open(lock_path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also gives back the flock if we got it
    return False


def test_every_statement_between_begin_and_commit_runs_under_the_lock(make_ledger):
    ledger, _settings = make_ledger(2)
    seen = []  # (statement, lock held at that moment)

    @sa.event.listens_for(ledger._get_engine(), "connect", insert=True)  # before db's own pragmas
    def trace(dbapi_conn, _record):
        dbapi_conn.set_trace_callback(lambda sql: seen.append((sql.strip(), lock_is_held(ledger.lock_path))))

    def txn(conn):
        conn.exec_driver_sql("UPDATE pod5_files SET attempts = attempts + 1")
        return conn.execute(sa.select(sa.func.count()).select_from(Pod5File)).scalar()

    assert ledger.transact(txn) == 2
    statements = [s for s, _held in seen]
    begin, commit = statements.index("BEGIN IMMEDIATE"), statements.index("COMMIT")
    assert begin < commit
    assert all(held for _s, held in seen[begin:commit + 1])  # the UPDATE and the SELECT among them
    # Before the lock only settings of the connection (no I/O): never a read of the database.
    before = [s for s, held in seen[:begin] if not held]
    assert before and all(s.upper().startswith("PRAGMA") and "JOURNAL_MODE" not in s.upper()
                          and "SYNCHRONOUS" not in s.upper() for s in before)
    assert not lock_is_held(ledger.lock_path)  # released afterwards
    assert attempts(ledger) == 1


def test_each_transaction_has_a_connection_of_its_own(make_ledger):
    """A TEMP table lives and dies with its connection: the next transaction must not see it."""
    ledger, _settings = make_ledger(1)
    ledger.transact(lambda c: c.exec_driver_sql("CREATE TEMP TABLE mine (x)"))
    count = "SELECT count(*) FROM sqlite_temp_master WHERE name = 'mine'"
    assert ledger.transact(lambda c: c.exec_driver_sql(count).scalar()) == 0


def test_a_write_from_another_process_between_two_transactions_is_seen(make_ledger):
    ledger, _settings = make_ledger(1)
    assert attempts(ledger) == 0
    subprocess.run([sys.executable, "-c", BUMP, str(ledger.path)], check=True)
    assert attempts(ledger) == 1


def test_a_commit_after_our_connection_opened_but_before_our_lock_is_seen(make_ledger):
    """The connection is opened before the lock is taken; another process commits in between. Our
    transaction reads the database only after BEGIN IMMEDIATE, under the lock: it sees that commit."""
    ledger, _settings = make_ledger(1)
    assert attempts(ledger) == 0
    engine = ledger._get_engine()
    bumped = []

    @sa.event.listens_for(engine, "connect")
    def other_process_commits(_dbapi_conn, _record):
        if not bumped:  # our connection is open, our lock not taken yet
            assert not lock_is_held(ledger.lock_path)
            subprocess.run([sys.executable, "-c", BUMP, str(ledger.path)], check=True)
            bumped.append(True)

    assert ledger.transact(lambda c: c.exec_driver_sql("SELECT attempts FROM pod5_files").scalar()) == 1
    assert bumped == [True]


def test_a_failed_transaction_is_rolled_back_and_leaves_no_sqlite_lock(make_ledger):
    ledger, _settings = make_ledger(1)

    def txn(conn):
        conn.exec_driver_sql("UPDATE pod5_files SET attempts = 99")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        ledger.transact(txn)
    assert not lock_is_held(ledger.lock_path)
    other = sqlite3.connect(ledger.path, timeout=0, isolation_level=None)  # no busy wait: must get it at once
    try:
        other.execute("BEGIN IMMEDIATE")
        assert other.execute("SELECT attempts FROM pod5_files").fetchone()[0] == 0
        other.execute("ROLLBACK")
    finally:
        other.close()


def test_a_ledger_switched_to_wal_by_hand_is_switched_back(make_ledger):
    ledger, _settings = make_ledger(1)
    raw = sqlite3.connect(ledger.path)
    assert raw.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
    raw.close()
    ledger.transact(lambda c: c.exec_driver_sql("UPDATE pod5_files SET attempts = attempts + 1"))
    raw = sqlite3.connect(ledger.path)
    try:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == db.JOURNAL_MODE.lower()
        assert raw.execute("SELECT attempts FROM pod5_files").fetchone()[0] == 1
    finally:
        raw.close()


def test_a_wal_ledger_that_cannot_be_switched_back_is_refused(make_ledger, monkeypatch):
    ledger, _settings = make_ledger(1)
    raw = sqlite3.connect(ledger.path)
    raw.execute("PRAGMA journal_mode=WAL")
    raw.close()
    monkeypatch.setattr(db, "set_pragmas", lambda _conn: None)  # as if the conversion had no effect
    with pytest.raises(LedgerError, match="rollback journal"):
        ledger.transact(lambda c: c.exec_driver_sql("SELECT 1").scalar())
