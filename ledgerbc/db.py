"""The one owner of the ledger database: engine, lock, pragmas, transactions, retries, schema.

Rules for SQLite on a shared (network) filesystem, each learnt the hard way:
- Every transaction, reads included, runs under an exclusive lock on a separate file
  (`<ledger>.lock`): SQLite's own byte-range locks are not trustworthy on every network filesystem.
  We use `filelock.UnixFileLock` (flock) explicitly: never a silent fallback to a soft lock.
- A fresh connection per transaction (NullPool): no page cache survives another host's write.
- Rollback journal, never WAL: WAL's shared memory does not work across hosts and loses updates.
- `synchronous=FULL` and `BEGIN IMMEDIATE`: the write lock is taken at once, not on first write.

The frame of one transaction (`Ledger._transaction`), and why each step is where it is:
  open a new connection, set synchronous/foreign_keys   <- before the lock: opening reads only the file
                                                           header SQLite always probes (no lock, no page
                                                           cache), and these pragmas are settings of the
                                                           connection (no I/O)
  take the lock; BEGIN IMMEDIATE                        <- SQLite takes its own locks and reads the
                                                           database from here on, under ours
  PRAGMA journal_mode=<JOURNAL_MODE>                    <- inside the transaction it is a setting of
                                                           this connection (no I/O, no second round of
                                                           SQLite locking; a WAL file refuses it: then
                                                           the next attempt converts it, see below)
  the statements; COMMIT                                <- all of SQLite's locks are released here
  release the lock; close the connection                <- closing does no I/O but a few stats of the file
A transaction that fails is rolled back and its connection closed before the lock is released.
On a network filesystem each file operation is a round trip: the frame keeps opening and closing (about a
third of a bare transaction's file operations, bench/ceiling.py) out of the time the lock is held.
"""

import contextlib
import fcntl
import hashlib
import inspect
import json
import os
import random
import signal
import sqlite3
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import quote

import filelock
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.pool import NullPool

from . import errors, ledgerfile, models, mounts
from .durable import fsync_path

LOCK_POLL = float(os.environ.get("LEDGERBC_LOCK_POLL", "0.01"))  # seconds between attempts at a held lock (jittered)
TURN_POLL = 0.0005  # the same, for the one process that holds the turnstile (it is next in line)
# ... where that lock is on a network filesystem: each attempt is a request to its server, which the
# holder's transaction waits behind (bench/ceiling.py on Gluster: hold 19 ms polling every 0.5 ms, 16 ms every 5)
NETWORK_TURN_POLL = 0.005
TURN_WAIT = 5.0  # longest wait for the turnstile before polling the ledger lock directly
TURN_BYPASS = 60.0  # after such a wait, how long this process polls without the turnstile
IO_RETRIES = 4
# How long a transaction may hold the ledger lock before its writes are no longer trusted. A network
# filesystem revokes the lock of a client it has not heard from for its timeout (GlusterFS
# `network.ping-timeout`, 42 s by default; the NFSv4 lease, 90 s): a process frozen (SIGSTOP, a stalled
# node) past it may wake up believing it still holds the lock while another process has taken it. A
# transaction that wrote and held the lock longer than this rolls back instead of committing, and a
# publication renames nothing after it (`Ledger.check_lock_trusted`). Far above any real transaction
# (milliseconds), well below the filesystems' timeouts; `doctor` compares them.
LOCK_TRUST = float(os.environ.get("LEDGERBC_LOCK_TRUST", "15"))
LOCK_TRUST_RETRIES = 3
# A rollback journal, never WAL. DELETE creates and unlinks `<ledger>-journal` in each transaction; TRUNCATE
# and PERSIST keep the file (empty, resp. with a zeroed header) between transactions. Any of the three is
# safe across hosts: a journal is "hot" (rolled back by the next transaction, under our lock) only when it
# is non-empty with a non-zero header and no SQLite lock is held, which only a crash mid-commit leaves.
JOURNAL_MODE = "DELETE"
# The page size of a new ledger. With 8 KiB the schema fits on page 1, which every transaction reads anyway:
# a transaction on a fresh connection reads two pages fewer than with SQLite's 4 KiB (the schema's own pages),
# each a round trip on a network filesystem (docs/benchmarks.md, "One queue index, no id counter, 8 KiB
# pages"). Ledgers made before keep their 4 KiB pages (a page size changes only by VACUUM); both work alike.
PAGE_SIZE = 8192

_CORRUPT_MARKERS = ("file is not a database", "malformed", "not a database", "file is encrypted")
_BUSY_MARKERS = ("database is locked", "database is busy", "database table is locked")
# "readonly database" is also SQLITE_READONLY_DBMOVED: the file was deleted or renamed under an open
# transaction. Reopening tells a lost ledger (LedgerNotFound) from a really read-only one (still fails).
_IO_MARKERS = ("disk i/o error", "unable to open database file", "stale file handle", "readonly database")
_FULL_MARKERS = ("database or disk is full", "no space left", "disk quota exceeded")


def _held_clock() -> float:
    """Seconds on a clock that keeps counting while the process is stopped or the machine suspended."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def _sqlite_connect(path: Path, create: bool):
    mode = "rwc" if create else "rw"  # never create a ledger by accident (a typo'd path)
    conn = sqlite3.connect(
        f"file:{quote(str(path))}?mode={mode}", uri=True, timeout=30, isolation_level=None,
        check_same_thread=False,
    )
    if create:
        conn.execute(f"PRAGMA page_size={PAGE_SIZE}")  # no I/O; it takes effect when the first table is written
    return conn


def make_engine(path: Path, create: bool = False, careful: bool = True, foreign_keys: bool = True) -> sa.Engine:
    """The only engine factory: NullPool, rollback journal, synchronous=FULL, BEGIN IMMEDIATE.

    `careful`: set the journal mode and synchronous=FULL as soon as a connection opens, which reads the
    file's first page: for callers that create the file or already hold the lock (create, migrate).
    `Ledger` opens connections before taking the lock and passes False: it sets them under the lock.
    `foreign_keys=False`: for migrations, which copy a table that others refer to (SQLite's own procedure
    for a schema change; a migration that copies checks the references itself).
    """
    engine = sa.create_engine(
        "sqlite://", creator=lambda: _sqlite_connect(path, create), poolclass=NullPool
    )

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn, _record):
        if careful:
            set_pragmas(dbapi_conn)
        # a setting of the connection (no I/O); a no-op in a transaction
        dbapi_conn.execute(f"PRAGMA foreign_keys={'ON' if foreign_keys else 'OFF'}")

    @event.listens_for(engine, "begin")
    def _begin(conn):
        dbapi_conn = conn.connection.dbapi_connection
        dbapi_conn.execute("BEGIN IMMEDIATE")  # on the driver's connection: SQLAlchemy adds nothing here
        check_pragmas(dbapi_conn)

    return engine


class _Unsettled(Exception):
    """A transaction began without our journal mode or synchronous=FULL: it must not go on."""


def set_pragmas(dbapi_conn) -> None:
    """Outside a transaction: JOURNAL_MODE (converts a WAL file back: needs no other process in the ledger)
    and synchronous=FULL. Both read the database's first page (SQLite takes its shared lock for it)."""
    dbapi_conn.execute(f"PRAGMA journal_mode={JOURNAL_MODE}")
    dbapi_conn.execute("PRAGMA synchronous=FULL")


def check_pragmas(dbapi_conn) -> None:
    """Right after BEGIN IMMEDIATE, under the lock: put the transaction in JOURNAL_MODE and make sure the
    commit syncs FULL, with no I/O. Inside a transaction a rollback mode is a setting of the connection that
    applies from the first write; a WAL file refuses it, and synchronous cannot be changed (only read: it is
    FULL unless this libsqlite3 was built with another default). Either raises _Unsettled, and the caller
    retries with `set_pragmas` before BEGIN."""
    try:
        mode = dbapi_conn.execute(f"PRAGMA journal_mode={JOURNAL_MODE}").fetchone()[0]
    except sqlite3.OperationalError as exc:
        if "wal" in str(exc).lower():
            raise _Unsettled(str(exc)) from None
        raise
    if str(mode).lower() != JOURNAL_MODE.lower():
        raise _Unsettled(f"journal_mode is {mode}, not {JOURNAL_MODE}")
    level = dbapi_conn.execute("PRAGMA synchronous").fetchone()[0]
    if level != 2:  # 2 = FULL
        raise _Unsettled(f"synchronous is {level}, not FULL (2)")


def _flock(lock_path: Path) -> filelock.UnixFileLock:
    kwargs = {}
    if "fallback_to_soft" in inspect.signature(filelock.UnixFileLock.__init__).parameters:
        kwargs["fallback_to_soft"] = False  # a soft lock is no lock across hosts: fail loudly instead
    return filelock.UnixFileLock(str(lock_path), **kwargs)


class _TurnstileTimeout(Exception):
    pass


class _Turnstile:
    """Who waits next for the ledger lock: a flock on `<ledger>.turnstile`, one per process.

    `enter` returns True once this process holds the turnstile, False if the deadline passed first or the
    turnstile is unusable (then the caller just polls the ledger lock, as every process did before). On a
    local filesystem the main thread sleeps in the kernel meanwhile (a blocking flock, woken when the
    holder leaves; it cannot time out, so a SIGALRM interval timer bounds the wait). On any other
    filesystem, and in other threads, the turnstile is polled: a signal that interrupts a blocking flock
    on GlusterFS wedges the whole volume (`mounts.kernel_lock_wait_is_safe`, docs/locking.md), and Slurm
    signals its tasks. The descriptor is per process: flock belongs to the open file, which a fork would share.
    """

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None
        self._pid: int | None = None
        self._held = False
        self._bypass_until = 0.0
        self._lock_fd: tuple[int, int] | None = None  # (pid, descriptor of the ledger lock file), see await_free
        self._kernel_wait: bool | None = None  # may the main thread wait in a blocking flock here? (first use)

    def on_local_filesystem(self) -> bool:
        if self._kernel_wait is None:
            self._kernel_wait = mounts.kernel_lock_wait_is_safe(self.path.parent)
        return self._kernel_wait

    def waits_in_kernel(self) -> bool:
        """True in the main thread on a local filesystem: only there does a lock wait sleep in the kernel."""
        return threading.current_thread() is threading.main_thread() and self.on_local_filesystem()

    def _open(self) -> int | None:
        if self._pid != os.getpid():
            self._fd, self._pid, self._held = None, os.getpid(), False
            try:
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
            except OSError:
                self._fd = None  # e.g. a read-only folder: poll instead
        return self._fd

    def enter(self, deadline: float) -> bool:
        fd = self._open()
        now = time.monotonic()
        if fd is None or self._held or now < self._bypass_until:  # (held: by another thread of this process)
            return False
        # Bounded: a holder that froze (SIGSTOP, e.g. a suspended Slurm job) must not stall everyone for
        # the whole lock timeout. Past TURN_WAIT this process polls the ledger lock, as before, for a while.
        until = min(deadline, now + TURN_WAIT)
        try:
            if self.waits_in_kernel():
                got = _flock_blocking(fd, until)
            else:
                got = self._wait_polling(fd, until)
        except OSError:
            return False
        if not got:
            self._bypass_until = time.monotonic() + TURN_BYPASS
        self._held = got
        return got

    @staticmethod
    def _wait_polling(fd: int, deadline: float) -> bool:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    return False
                time.sleep(random.uniform(0.5, 1.5) * LOCK_POLL)

    def leave(self) -> None:
        self._held = False
        try:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        except OSError:
            pass

    def await_free(self, lock_path: Path, deadline: float) -> None:
        """For the turnstile's holder, where `waits_in_kernel`: sleep in the kernel until the ledger lock is free.

        A blocking flock on a descriptor of our own, given back at once: only a wake-up call, so the lock
        is handed on as soon as its holder lets it go instead of at the next poll. filelock then takes it
        (the other waiters are all behind the turnstile). On a timeout, and where the kernel must not
        wait, the caller just polls: it is the only process polling the ledger lock, so it may poll often
        (every TURN_POLL; NETWORK_TURN_POLL on a network filesystem, where each poll is a request to the server).
        """
        if not self.waits_in_kernel():
            return
        if self._lock_fd is None or self._lock_fd[0] != os.getpid():
            try:
                self._lock_fd = (os.getpid(), os.open(lock_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC))
            except OSError:
                return  # not created yet (filelock creates it): poll
        fd = self._lock_fd[1]
        try:
            if _flock_blocking(fd, min(deadline, time.monotonic() + TURN_WAIT)):
                fcntl.flock(fd, fcntl.LOCK_UN)
        except OSError:
            pass


HOST_QUEUE_DIRS = ("/dev/shm", tempfile.gettempdir())


def host_queue_path(ledger: Path) -> Path | None:
    """A file on this host's own memory or disk standing for `ledger` (its resolved path hashed), where the
    processes of this host queue in the kernel before they poll a ledger on a network filesystem; None if
    no such folder is writable. A per-job private /tmp (Slurm's job_container) only makes it per job."""
    key = hashlib.sha256(os.path.realpath(ledger).encode("utf-8", "surrogateescape")).hexdigest()[:20]
    for folder in HOST_QUEUE_DIRS:
        if os.path.isdir(folder) and os.access(folder, os.W_OK | os.X_OK):
            return Path(folder) / f"ledgerbc-{key}.queue"
    return None


def _flock_blocking(fd: int, until: float) -> bool:
    """An exclusive flock on `fd`, waiting in the kernel until `until` (monotonic) at most; main thread only.

    A blocking flock cannot time out by itself: a SIGALRM interval timer interrupts it.
    """
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        pass

    def expire(_signum, _frame):
        raise _TurnstileTimeout

    previous = signal.signal(signal.SIGALRM, expire)
    try:
        signal.setitimer(signal.ITIMER_REAL, max(0.001, until - time.monotonic()))
        fcntl.flock(fd, fcntl.LOCK_EX)  # other signals (SIGTERM) run their handler and the wait resumes
        signal.setitimer(signal.ITIMER_REAL, 0)
        return True
    except _TurnstileTimeout:
        fcntl.flock(fd, fcntl.LOCK_UN)  # the alarm may have come just after the flock was granted
        return False
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _classify(exc: BaseException) -> str:
    text = str(exc).lower()
    if any(m in text for m in _FULL_MARKERS):
        return "full"
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


# What the ledger's statements need of the SQLite library this Python links, each with a statement that uses
# it: the scan's INSERT ... ON CONFLICT (3.24), the claim's and publication's `json_each` (JSON1, built in
# from 3.38, a build option before) and the batch id floor's `pragma_user_version` (3.16). A cluster's
# Python may link an older system library (RHEL 8: 3.26): without this check, the first claim of every
# worker would fail with an internal error instead of one line saying what to load.
SQLITE_NEEDS = (
    ("INSERT ... ON CONFLICT (SQLite 3.24 or newer)",
     "CREATE TEMP TABLE t (k PRIMARY KEY); INSERT INTO t VALUES (1) ON CONFLICT (k) DO NOTHING"),
    ("json_each (the JSON1 extension)", "SELECT value FROM json_each('[1]')"),
    ("pragma functions (SQLite 3.16 or newer)", "SELECT user_version FROM pragma_user_version"),
)
_sqlite_fit: bool = False


def check_sqlite() -> None:
    """SqliteUnfit, naming what is missing, unless this process's SQLite library runs every SQLITE_NEEDS
    statement (on a private in-memory database, once per process)."""
    global _sqlite_fit
    if _sqlite_fit:
        return
    missing = []
    conn = sqlite3.connect(":memory:", isolation_level=None)
    try:
        for feature, sql in SQLITE_NEEDS:
            try:
                conn.executescript(sql)
            except sqlite3.Error:
                missing.append(feature)
    finally:
        conn.close()
    if missing:
        raise errors.SqliteUnfit(
            f"this Python's SQLite library ({sqlite3.sqlite_version}) lacks {' and '.join(missing)}, which the "
            f"ledger needs. Run ledgerbc with a Python linked against a newer SQLite (e.g. a newer Python module "
            f"or a conda Python); `ledgerbc doctor` checks it."
        )
    _sqlite_fit = True


class Ledger:
    """A handle on one ledger file. Cheap to create; holds no connection between transactions."""

    def __init__(self, path, lock_timeout: float = 300.0, clock=time.time):
        self.path = Path(path).absolute()
        self.lock_path = Path(str(self.path) + ".lock")
        self.lock_timeout = lock_timeout
        self.clock = clock
        self._lock = _flock(self.lock_path)
        self._turnstile = _Turnstile(Path(str(self.path) + ".turnstile"))
        self._host_queue: _Turnstile | bool | None = None  # None: not looked for yet; False: none (locked())
        self._engine = None
        self._careful = False  # set_pragmas before every BEGIN (only where libsqlite3's default is not FULL)
        self._schema_checked = False
        self._file_checked = False
        self.lock_trust = LOCK_TRUST
        self._locked_at: float | None = None
        # Janitor stall rule: `contact_since` is when this process's current run of uninterrupted ledger
        # access began; a gap longer than `stall_gap` between successful transactions restarts it.
        self.last_contact: float | None = None
        self.contact_since: float | None = None
        self.stall_gap: float = float("inf")

    def check_file(self) -> None:
        """Refuse a path that is not an SQLite file (missing, a folder, README.md) before the first lock:
        the lock and turnstile files are created beside the ledger only once it is one (ledgerfile.py).
        And an SQLite library that cannot run the ledger's statements (`check_sqlite`)."""
        if not self._file_checked:
            check_sqlite()
            ledgerfile.check(self.path)
            self._file_checked = True

    # -- locking -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self):
        """The global lock as a context manager, for work that must not interleave with any transaction.

        The lock itself is `filelock`'s flock on `<ledger>.lock`; filelock can only poll for a held lock.
        Waiting is organised by a turnstile (`<ledger>.turnstile`, see `_Turnstile`): a process first takes
        the turnstile, and only the turnstile's holder waits for the ledger lock; it lets the turnstile go
        as soon as it holds the ledger lock. So one process at most polls the ledger lock quickly, and a
        process that just released the lock queues like everyone else instead of retaking it at once
        (bench/claim.py: throughput and p99 claim latency). On a local filesystem both waits sleep in the
        kernel (`_Turnstile.await_free`). On a network filesystem no wait may (docs/locking.md): the
        processes of one host first queue in the kernel on a local file (`host_queue_path`), so one
        process per host polls the turnstile (every LOCK_POLL), and its holder polls the ledger lock
        (every NETWORK_TURN_POLL). The turnstile decides only who waits next; mutual exclusion is the
        ledger lock's alone.
        """
        deadline = time.monotonic() + self.lock_timeout
        queue = self._host_queue_of_network_ledger()
        queued = queue.enter(deadline) if queue is not None else False
        turn = False
        try:
            turn = self._turnstile.enter(deadline)
            if turn:
                self._turnstile.await_free(self.lock_path, deadline)
            next_poll = TURN_POLL if self._turnstile.on_local_filesystem() else NETWORK_TURN_POLL
            self._take_lock(deadline, poll=next_poll if turn else LOCK_POLL)
        finally:
            # The host's next process starts polling the turnstile while this one still holds it: it then
            # races the other hosts' waiters at the release instead of being first there every time.
            if queued:
                queue.leave()
            if turn:
                self._turnstile.leave()
        self._locked_at = _held_clock()
        try:
            yield
        finally:
            self._locked_at = None
            self._lock.release()

    def _host_queue_of_network_ledger(self) -> _Turnstile | None:
        """Where the ledger's own turnstile cannot be waited for in the kernel (a network filesystem), the
        processes of this host first queue in the kernel on a local file (`host_queue_path`), so that one
        process per host at most polls the shared turnstile. None on a local filesystem, in other threads
        and where no local folder is writable."""
        if self._turnstile.waits_in_kernel() or threading.current_thread() is not threading.main_thread():
            return None
        if self._host_queue is None:
            path = host_queue_path(self.path)
            self._host_queue = _Turnstile(path) if path is not None else False
        return self._host_queue or None

    def check_lock_trusted(self) -> None:
        """Raise LockMaybeLost when the lock has been held longer than `lock_trust` (see LOCK_TRUST): the
        filesystem may have revoked it meanwhile. Called before every rename of a publication and before
        every COMMIT of a transaction that wrote."""
        if self._locked_at is not None and _held_clock() - self._locked_at > self.lock_trust:
            raise errors.LockMaybeLost(
                f"held the ledger lock {self.lock_path} for {_held_clock() - self._locked_at:.0f}s (this process "
                f"was frozen or the filesystem stalled): the filesystem may have given it to another process, "
                "so nothing was committed or renamed."
            )

    def _take_lock(self, deadline: float, poll: float) -> None:
        while True:
            try:
                self._lock.acquire(blocking=False)
                return
            except filelock.Timeout:
                if time.monotonic() >= deadline:
                    raise errors.LockTimeout(
                        f"could not take the ledger lock {self.lock_path} within "
                        f"{self.lock_timeout:.0f}s. Check for a hung process holding it "
                        "(`ledgerbc doctor`)."
                    ) from None
                time.sleep(random.uniform(0.5, 1.5) * poll)  # jittered: transactions last milliseconds
            except OSError as exc:
                raise errors.UnsafeFilesystem(
                    f"cannot lock {self.lock_path}: {exc.strerror or exc}. The ledger folder must "
                    "be writable and support file locks; run `ledgerbc doctor`."
                ) from None

    # -- transactions ------------------------------------------------------------------------
    @contextlib.contextmanager
    def _transaction(self, careful: bool = False, undo=None):
        """One transaction in the frame of the module docstring; yields its SQLAlchemy connection.

        `careful` (a retry after an I/O error or unsettled pragmas): `set_pragmas` before BEGIN, under the
        lock (it reads the first page): converts a WAL file back, and sets synchronous=FULL where this
        libsqlite3 defaults to less. `undo`: see `transact`.
        """
        conn = self._get_engine().connect()  # a new sqlite3 connection (NullPool); no lock, no read yet
        committed = False
        try:
            with self.locked():
                try:
                    if careful or self._careful:
                        set_pragmas(conn.connection.dbapi_connection)
                    with conn.begin():
                        yield conn
                        if conn.connection.dbapi_connection.in_transaction and _wrote(conn):
                            self.check_lock_trusted()  # raising here rolls the transaction back
                    committed = True
                finally:
                    if not committed:
                        conn.close()  # rolled back and closed while the lock is still ours
                        if undo is not None:
                            undo()
        finally:
            if committed:
                conn.close()  # SQLite released its locks at COMMIT: closing needs no lock of ours

    def transact(self, fn, *args, undo=None, **kwargs):
        """Run `fn(conn, *args, **kwargs)` in one short exclusive transaction and return its result.

        `fn` may be called more than once (after `database is locked`, an I/O error or a lock held too
        long), so any side effect it has outside the database must be idempotent. `undo()`, when given, is
        called under the same lock whenever `fn` ran but the transaction did not commit (an error in `fn`,
        a failed COMMIT, a lock that may have been lost): it must take back `fn`'s side effects outside the
        database (a publication's renames).
        """
        self.check_file()
        busy = io = lost = unsettled = 0
        while True:
            try:
                with self._transaction(careful=io > 0 or unsettled > 0, undo=undo) as conn:
                    if not self._schema_checked:
                        self._check_schema(conn)
                    result = fn(conn, *args, **kwargs)
                self.note_contact()
                return result
            except errors.LockMaybeLost:
                lost += 1
                if lost > LOCK_TRUST_RETRIES:
                    raise
                continue  # a fresh lock: the next attempt is quick unless this process is frozen again
            except _Unsettled as exc:
                if unsettled:  # set before BEGIN, under the lock, and still not right
                    raise errors.LedgerError(
                        f"ledger {self.path}: {exc}: a ledger on a shared filesystem needs a rollback journal "
                        "and synchronous=FULL. Run `ledgerbc doctor`."
                    ) from None
                unsettled += 1
                self._careful = "synchronous" in str(exc)  # this libsqlite3's default: every time from now on
            except (sa.exc.OperationalError, sa.exc.DatabaseError, sqlite3.DatabaseError) as exc:
                kind = _classify(exc)
                if kind == "full":
                    raise errors.StorageFull(
                        f"the ledger {self.path} cannot be written: its filesystem is full ({_short(exc)}). "
                        f"Free space in {self.path.parent}, then start the workers again.",
                        folder=self.path.parent, ledger=True,
                    ) from None
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

    def note_contact(self) -> None:
        now = self.clock()
        if self.last_contact is None or now - self.last_contact > self.stall_gap:
            self.contact_since = now
        self.last_contact = now

    def _get_engine(self):
        if self._engine is None:
            self._engine = make_engine(self.path, careful=False)
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
        from .schema import head_revision, known_revisions  # alembic: only once a ledger is opened

        head = head_revision()
        if version not in known_revisions():
            raise errors.SchemaMismatch(
                f"the ledger {self.path} has schema '{version}', newer than this ledgerbc knows "
                f"(up to {head}). Use the ledgerbc version that wrote it (pip install -U ledgerbc)."
            )
        if version != head:
            raise errors.SchemaMismatch(
                f"the ledger {self.path} has the older schema {version} (this ledgerbc writes "
                f"{head}). Stop all workers, then run `ledgerbc upgrade --ledger {self.path}`."
            )
        self._schema_checked = True

    def health(self) -> tuple[str | None, list[str]]:
        """(schema revision, `PRAGMA integrity_check` lines) under the lock, for `ledgerbc doctor`.

        Unlike `transact`, it does not refuse an old or newer schema: doctor reports it. Raises
        LedgerNotFound or LedgerCorrupt when the file is missing or not a database.
        """
        self.check_file()
        try:
            with self._transaction(careful=True) as conn:  # doctor: also converts a WAL file back
                try:
                    version = conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()
                except sa.exc.OperationalError as exc:
                    if _classify(exc) != "other":
                        raise
                    version = None
                lines = [row[0] for row in conn.exec_driver_sql("PRAGMA integrity_check").fetchall()]
        except _Unsettled as exc:
            raise errors.LedgerError(f"ledger {self.path}: {exc}. Stop the workers and run `ledgerbc doctor` "
                                     "again.") from None
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


def _wrote(conn) -> bool:
    """Did this transaction change anything? (sqlite3's `total_changes`, per connection: it is fresh.)"""
    return conn.connection.dbapi_connection.total_changes > 0


def _short(exc) -> str:
    orig = getattr(exc, "orig", None) or exc
    return str(orig).splitlines()[0][:200]


# Every batch id up to this has been handed out: the highest id in the table, or the floor a rebuild set above
# every id it saw, kept in the database header's user_version (page 1, which every transaction reads and every
# write changes anyway: no page of its own, unlike AUTOINCREMENT's counter; migration 0005). A new batch
# takes the next id (claim._NEW_BATCH). Batch rows are never deleted.
BATCH_IDS_HANDED_OUT_SQL = ("max(coalesce((SELECT max(id) FROM batches), 0), "
                            "(SELECT user_version FROM pragma_user_version))")
BATCH_ID_FLOOR_MAX = 2**31 - 1  # user_version is a signed 32-bit integer


def batch_ids_handed_out(conn) -> int | None:
    """Every batch id up to this one has been handed out (BATCH_IDS_HANDED_OUT_SQL). None before the first."""
    return conn.exec_driver_sql(f"SELECT {BATCH_IDS_HANDED_OUT_SQL}").scalar() or None


def set_batch_id_floor(conn, floor: int) -> None:
    """New batch ids start above `floor` (a rebuild: above every id the lost ledger may have handed out)."""
    if not 0 <= floor <= BATCH_ID_FLOOR_MAX:
        raise errors.LedgerError(f"batch id floor {floor} is out of range (0..{BATCH_ID_FLOOR_MAX}).")
    conn.exec_driver_sql(f"PRAGMA user_version = {int(floor)}")


def write_settings(conn, settings) -> None:
    table = models.Setting.__table__
    conn.execute(table.delete())
    conn.execute(
        table.insert(), [{"key": k, "value": json.dumps(v)} for k, v in settings.to_dict().items()]
    )


def create_ledger_file(path: Path, settings, revision: str | None = None) -> None:
    """Build a new ledger at `path` (which must not exist yet) with the schema (`revision`, default the
    newest) and settings."""
    from . import schema

    check_sqlite()
    revision = revision or schema.head_revision()
    engine = make_engine(path, create=True, foreign_keys=False)
    try:
        with engine.connect() as conn:
            schema.upgrade(conn, revision)
            conn.commit()
            with conn.begin():
                write_settings(conn, settings.stored_for(path.parent))
    finally:
        engine.dispose()
    fsync_path(path)

