"""The one owner of the ledger database: engine, lock, pragmas, transactions, retries, schema.

Rules for SQLite on a shared (network) filesystem, each learnt the hard way:
- Every transaction, reads included, runs under an exclusive lock on a separate file
  (`<ledger>.lock`): SQLite's own byte-range locks are not trustworthy on every network filesystem.
  We use `filelock.UnixFileLock` (flock) explicitly: never a silent fallback to a soft lock.
- A fresh connection per transaction (NullPool): no page cache survives another host's write.
- Rollback journal, never WAL: WAL's shared memory does not work across hosts and loses updates.
- `synchronous=FULL` and `BEGIN IMMEDIATE`: the write lock is taken at once, not on first write.
"""

import contextlib
import inspect
import json
import os
import random
import sqlite3
import time
from pathlib import Path
from urllib.parse import quote

import filelock
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.pool import NullPool

from . import errors, models
from .durable import fsync_path

# Schema revisions this version knows, oldest first; the last is what it writes.
KNOWN_REVISIONS = ("0001", "0002")
SCHEMA_HEAD = KNOWN_REVISIONS[-1]

LOCK_POLL = float(os.environ.get("LEDGERBC_LOCK_POLL", "0.01"))  # seconds between attempts at a held lock (jittered)
IO_RETRIES = 4

_CORRUPT_MARKERS = ("file is not a database", "malformed", "not a database", "file is encrypted")
_BUSY_MARKERS = ("database is locked", "database is busy", "database table is locked")
# "readonly database" is also SQLITE_READONLY_DBMOVED: the file was deleted or renamed under an open
# transaction. Reopening tells a lost ledger (LedgerNotFound) from a really read-only one (still fails).
_IO_MARKERS = ("disk i/o error", "unable to open database file", "stale file handle", "readonly database")


def _sqlite_connect(path: Path, create: bool):
    mode = "rwc" if create else "rw"  # never create a ledger by accident (a typo'd path)
    conn = sqlite3.connect(
        f"file:{quote(str(path))}?mode={mode}", uri=True, timeout=30, isolation_level=None,
        check_same_thread=False,
    )
    return conn


def make_engine(path: Path, create: bool = False) -> sa.Engine:
    """The only engine factory: NullPool, rollback journal, synchronous=FULL, BEGIN IMMEDIATE."""
    engine = sa.create_engine(
        "sqlite://", creator=lambda: _sqlite_connect(path, create), poolclass=NullPool
    )

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn, _record):
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=DELETE")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn):
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def _flock(lock_path: Path) -> filelock.UnixFileLock:
    kwargs = {}
    if "fallback_to_soft" in inspect.signature(filelock.UnixFileLock.__init__).parameters:
        kwargs["fallback_to_soft"] = False  # a soft lock is no lock across hosts: fail loudly instead
    return filelock.UnixFileLock(str(lock_path), **kwargs)


def _classify(exc: BaseException) -> str:
    text = str(exc).lower()
    if any(m in text for m in _CORRUPT_MARKERS):
        return "corrupt"
    if any(m in text for m in _BUSY_MARKERS):
        return "busy"
    if any(m in text for m in _IO_MARKERS):
        return "io"
    return "other"


def _backoff(attempt: int, base: float = 0.05, cap: float = 2.0) -> float:
    # Full jitter: concurrent workers that collided must not retry in lockstep.
    return random.uniform(0, min(cap, base * 2**attempt))


class Ledger:
    """A handle on one ledger file. Cheap to create; holds no connection between transactions."""

    def __init__(self, path, lock_timeout: float = 300.0, clock=time.time):
        self.path = Path(path).absolute()
        self.lock_path = Path(str(self.path) + ".lock")
        self.lock_timeout = lock_timeout
        self.clock = clock
        self._lock = _flock(self.lock_path)
        self._engine = None
        self._schema_checked = False
        self._released_at: float | None = None
        self._contended = False
        # Janitor stall rule: `contact_since` is when this process's current run of uninterrupted ledger
        # access began; a gap longer than `stall_gap` between successful transactions restarts it.
        self.last_contact: float | None = None
        self.contact_since: float | None = None
        self.stall_gap: float = float("inf")

    # -- locking -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self):
        """The global lock as a context manager, for work that must not interleave with any transaction."""
        # Fairness. Waiters poll (filelock has no queue), so a process that releases the lock and takes
        # it again at once (publish, then claim) would always win and starve them for seconds
        # (bench/claim.py). After a hold it had to wait for, a process lets one poll period pass
        # before it retakes the lock, so the waiters get their turn. Uncontended, this costs nothing.
        if self._contended and self._released_at is not None:
            courtesy = 1.5 * LOCK_POLL - (time.monotonic() - self._released_at)
            if courtesy > 0:
                time.sleep(courtesy)
        deadline = time.monotonic() + self.lock_timeout
        waited = False
        while True:
            try:
                self._lock.acquire(blocking=False)
                break
            except filelock.Timeout:
                waited = True
                if time.monotonic() >= deadline:
                    raise errors.LockTimeout(
                        f"could not take the ledger lock {self.lock_path} within "
                        f"{self.lock_timeout:.0f}s. Check for a hung process holding it "
                        "(`ledgerbc doctor`)."
                    ) from None
                # Short and jittered: transactions hold the lock for a few milliseconds.
                time.sleep(random.uniform(0.5, 1.5) * LOCK_POLL)
            except OSError as exc:
                raise errors.UnsafeFilesystem(
                    f"cannot lock {self.lock_path}: {exc.strerror or exc}. The ledger folder must "
                    "be writable and support file locks; run `ledgerbc doctor`."
                ) from None
        try:
            yield
        finally:
            self._lock.release()
            self._released_at = time.monotonic()
            self._contended = waited

    # -- transactions ------------------------------------------------------------------------
    def transact(self, fn, *args, **kwargs):
        """Run `fn(conn, *args, **kwargs)` in one short exclusive transaction and return its result.

        `fn` may be called more than once (after `database is locked` or an I/O error), so any
        side effect it has outside the database must be idempotent.
        """
        if not self.path.exists():
            raise errors.LedgerNotFound(
                f"no ledger at {self.path}. Create it with `ledgerbc init`, or rebuild a lost one "
                "with `ledgerbc recover --rebuild --input DIR --output DIR`."
            )
        if self.path.is_dir():
            raise errors.BadInput(f"the ledger path {self.path} is a folder. Give the ledger file's path.")
        busy = io = 0
        while True:
            try:
                with self.locked():
                    engine = self._get_engine()
                    with engine.connect() as conn, conn.begin():
                        if not self._schema_checked:
                            self._check_schema(conn)
                        result = fn(conn, *args, **kwargs)
                self._note_contact()
                return result
            except (sa.exc.OperationalError, sa.exc.DatabaseError, sqlite3.DatabaseError) as exc:
                kind = _classify(exc)
                if kind == "corrupt":
                    raise errors.LedgerCorrupt(
                        f"the ledger {self.path} is damaged or not a ledger ({_short(exc)}). "
                        "Run `ledgerbc doctor`, then `ledgerbc recover --rebuild --input DIR --output DIR`."
                    ) from None
                if kind == "busy" and busy < 20:
                    # Someone outside our lock (e.g. an sqlite3 shell) holds the database.
                    busy += 1
                    time.sleep(_backoff(busy))
                    continue
                if kind == "io" and io < IO_RETRIES:
                    io += 1
                    self._engine = None  # reopen: a new engine, a new file handle
                    time.sleep(_backoff(io, base=0.2))
                    if not self.path.exists():
                        raise errors.LedgerNotFound(
                            f"the ledger {self.path} disappeared. Rebuild it with "
                            "`ledgerbc recover --rebuild --input DIR --output DIR`."
                        ) from None
                    continue
                raise errors.LedgerError(
                    f"ledger {self.path}: {_short(exc)}. Run `ledgerbc doctor`."
                ) from None

    def _note_contact(self) -> None:
        now = self.clock()
        if self.last_contact is None or now - self.last_contact > self.stall_gap:
            self.contact_since = now
        self.last_contact = now

    def _get_engine(self):
        if self._engine is None:
            self._engine = make_engine(self.path)
        return self._engine

    def _check_schema(self, conn):
        try:
            rows = conn.exec_driver_sql("SELECT version_num FROM alembic_version").fetchall()
        except sa.exc.OperationalError as exc:
            if _classify(exc) != "other":
                raise
            raise errors.LedgerCorrupt(
                f"{self.path} is an SQLite file but not a ledgerbc ledger. Give the right --ledger, "
                "or rebuild with `ledgerbc recover --rebuild --input DIR --output DIR`."
            ) from None
        version = rows[0][0] if rows else None
        if version not in KNOWN_REVISIONS:
            raise errors.SchemaMismatch(
                f"the ledger {self.path} has schema '{version}', newer than this ledgerbc knows "
                f"(up to {SCHEMA_HEAD}). Use the ledgerbc version that wrote it (pip install -U ledgerbc)."
            )
        if version != SCHEMA_HEAD:
            raise errors.SchemaMismatch(
                f"the ledger {self.path} has the older schema {version} (this ledgerbc writes "
                f"{SCHEMA_HEAD}). Stop all workers, then run `ledgerbc upgrade --ledger {self.path}`."
            )
        self._schema_checked = True

    def health(self) -> tuple[str | None, list[str]]:
        """(schema revision, `PRAGMA integrity_check` lines) under the lock, for `ledgerbc doctor`.

        Unlike `transact`, it does not refuse an old or newer schema: doctor reports it. Raises
        LedgerNotFound or LedgerCorrupt when the file is missing or not a database.
        """
        if not self.path.is_file():
            raise errors.LedgerNotFound(f"no ledger at {self.path}. Create it with `ledgerbc init`.")
        try:
            with self.locked():
                with self._get_engine().connect() as conn, conn.begin():
                    try:
                        version = conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()
                    except sa.exc.OperationalError as exc:
                        if _classify(exc) != "other":
                            raise
                        version = None
                    lines = [row[0] for row in conn.exec_driver_sql("PRAGMA integrity_check").fetchall()]
        except (sa.exc.OperationalError, sa.exc.DatabaseError, sqlite3.DatabaseError) as exc:
            if _classify(exc) == "corrupt":
                raise errors.LedgerCorrupt(
                    f"the ledger {self.path} is damaged or not a ledger ({_short(exc)}). Rebuild it with "
                    "`ledgerbc recover --rebuild --input DIR --output DIR`."
                ) from None
            raise errors.LedgerError(f"ledger {self.path}: {_short(exc)}.") from None
        if version is None:
            raise errors.LedgerCorrupt(
                f"{self.path} is an SQLite file but not a ledgerbc ledger. Give the right --ledger."
            )
        return version, lines

    # -- settings ------------------------------------------------------------------------------
    def read_settings(self):
        from .settings import Settings

        rows = self.transact(lambda c: c.execute(sa.select(models.Setting.key, models.Setting.value)).all())
        # Paths stored relative to the ledger's folder resolve through whichever mount this process uses.
        return Settings.from_dict({k: json.loads(v) for k, v in rows}).resolved(self.path.parent)


def _short(exc) -> str:
    orig = getattr(exc, "orig", None) or exc
    return str(orig).splitlines()[0][:200]


def write_settings(conn, settings) -> None:
    table = models.Setting.__table__
    conn.execute(table.delete())
    conn.execute(
        table.insert(), [{"key": k, "value": json.dumps(v)} for k, v in settings.to_dict().items()]
    )


def create_ledger_file(path: Path, settings, revision: str = SCHEMA_HEAD) -> None:
    """Build a new ledger at `path` (which must not exist yet) with the schema and settings."""
    from . import schema

    engine = make_engine(path, create=True)
    try:
        with engine.connect() as conn:
            schema.upgrade(conn, revision)
            conn.commit()
            with conn.begin():
                write_settings(conn, settings.stored_for(path.parent))
    finally:
        engine.dispose()
    fsync_path(path)

