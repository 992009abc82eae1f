"""The batch life cycle (DESIGN §4): claim, heartbeat, publish, fail, release.

Each function is one short transaction under the global lock. The batch id is the fencing token:
every change to a batch or its files first checks, in the same transaction, that the batch is still
running and owned by the caller (`_owned`), and refuses with `NotOwner` otherwise. A zombie worker whose
batch was reclaimed can therefore neither heartbeat, nor publish, nor fail files that moved on.
"""

import math
from dataclasses import dataclass

import sqlalchemy as sa

from . import models
from .errors import IllegalTransition, NotOwner
from .models import CLAIMED, DONE, FAILED, PENDING, RUNNING, Pod5File, Worker

LOOKAHEAD = 2048  # pending rows read per claim: enough to size the batch, cheap on a 1M-file ledger
# Errors of files a janitor took back start with this: the worker died, not (necessarily) the file.
RECLAIMED = "reclaimed: "
TAIL_LARGEST_FIRST = True  # byte-target batches: largest files first once the target shrinks (choose_batch)


@dataclass
class ClaimedFile:
    id: int
    rel: str
    size: int
    read_count: int | None
    attempts: int


@dataclass
class Claim:
    batch_id: int
    worker_id: str
    files: list[ClaimedFile]

    @property
    def n_bytes(self) -> int:
        return sum(f.size for f in self.files)


@dataclass
class FileResult:
    """The outcome of one file of a batch, as the worker saw it after splitting dorado's output."""

    file_id: int
    ok: bool
    reads_pass: int = 0
    reads_fail: int = 0
    reads_missing: int = 0
    bases: int = 0
    error: str | None = None


def _now(ledger) -> float:
    return ledger.clock()


# The hot path (claim, publish, heartbeat) runs these statements as plain SQL: built once, no SQLAlchemy
# statement construction or cache-key work under the global lock (that was ~2 of the ~5 ms a claim and
# its publication held the lock; bench/claim.py). Column names are those of models.py.
_SQL_EVENT = "INSERT INTO events (ts, kind, worker_id, batch_id, file_id, message) VALUES (?, ?, ?, ?, ?, ?)"
_SQL_OWNER = "SELECT worker_id, state FROM batches WHERE id = ?"
_SQL_TOUCH = "UPDATE workers SET last_seen = ?, state = 'running' WHERE worker_id = ?"
_SQL_LIVE = "SELECT count(*) FROM workers WHERE state = 'running' AND last_seen >= ?"
_SQL_PENDING = "SELECT id, size, attempts, last_error FROM pod5_files WHERE state = ? ORDER BY id LIMIT ?"
_SQL_NEW_BATCH = (
    "INSERT INTO batches (worker_id, state, claimed_at, heartbeat_at, n_files, n_bytes) VALUES (?, ?, ?, ?, ?, ?)"
)
_SQL_TAKE_FILE = "UPDATE pod5_files SET state = ?, batch_id = ? WHERE id = ? AND state = ?"
_SQL_FILE_DETAILS = "SELECT id, rel_path, read_count FROM pod5_files WHERE id IN ({})"  # by primary key
_SQL_BEAT = "UPDATE batches SET heartbeat_at = ? WHERE id = ?"
_SQL_FILE_DONE = (
    "UPDATE pod5_files SET state = ?, reads_pass = ?, reads_fail = ?, reads_missing = ?, bases = ?, done_at = ?,"
    " last_error = NULL WHERE id = ? AND batch_id = ? AND state = ?"
)
_SQL_FINISH = "UPDATE batches SET state = ?, finished_at = ?, error = ? WHERE id = ? AND state = ?"
_SQL_WORKER_DONE = "UPDATE workers SET batches_done = batches_done + 1, last_seen = ? WHERE worker_id = ?"


def _write(conn, sql: str, params=()):
    """Run a prebuilt INSERT/UPDATE on the transaction's own sqlite3 connection (no SQLAlchemy result
    machinery: it is most of what is left of a statement's cost); a list of tuples runs it for each."""
    raw = conn.connection.dbapi_connection
    return raw.executemany(sql, params) if isinstance(params, list) else raw.execute(sql, params)


def _event(conn, now, kind, worker_id=None, batch_id=None, file_id=None, message=None):
    _write(conn, _SQL_EVENT, (now, kind, worker_id, batch_id, file_id, message))


def _owned(conn, batch_id: int, worker_id: str):
    """The guard: the batch must be running and owned by `worker_id`."""
    row = conn.exec_driver_sql(_SQL_OWNER, (batch_id,)).first()
    if row is None or row.worker_id != worker_id or row.state != RUNNING:
        state = "gone" if row is None else f"{row.state}, owner {row.worker_id}"
        raise NotOwner(f"batch {batch_id} is no longer owned by {worker_id} ({state}): this worker was fenced.")
    return row


# -- workers -----------------------------------------------------------------------------------------
def touch_worker(conn, worker_id: str, now: float, **values) -> None:
    """Mark a worker alive, re-creating its row if a rebuilt ledger does not know it yet."""
    if not values:  # the hot path: claims, heartbeats
        if _write(conn, _SQL_TOUCH, (now, worker_id)).rowcount:
            return
    values = dict(last_seen=now, state="running", **values)
    updated = conn.execute(sa.update(Worker).where(Worker.worker_id == worker_id).values(**values))
    if updated.rowcount == 0:
        values.setdefault("host", worker_id.rsplit("@", 1)[-1])
        values.setdefault("pid", 0)
        conn.execute(sa.insert(Worker).values(worker_id=worker_id, started_at=now, batches_done=0, **values))


def register_worker(ledger, worker_id: str, host: str, pid: int, device: str | None) -> None:
    def txn(conn):
        now = _now(ledger)
        touch_worker(conn, worker_id, now, host=host, pid=pid, device=device)
        _event(conn, now, "worker-start", worker_id, message=f"{host} pid {pid} {device or ''}".strip())

    ledger.transact(txn)


def worker_exited(ledger, worker_id: str, reason: str = "") -> None:
    def txn(conn):
        now = _now(ledger)
        conn.execute(sa.update(Worker).where(Worker.worker_id == worker_id).values(state="exited", last_seen=now))
        _event(conn, now, "worker-exit", worker_id, message=reason or None)

    ledger.transact(txn)


# -- claim -------------------------------------------------------------------------------------------
def _live_workers(conn, now: float, window: float) -> int:
    return conn.exec_driver_sql(_SQL_LIVE, (now - window,)).scalar_one()


def suspect(row) -> bool:
    """A pending file whose earlier attempt failed on the file's account (dorado error, no reads)."""
    return row.attempts > 0 and not (getattr(row, "last_error", None) or "").startswith(RECLAIMED)


def choose_batch(pending, batch_files, batch_bytes, live_workers, exhausted: bool):
    """Pick the files of the next batch from `pending` (oldest first, (id, size, attempts) rows).

    The target is the configured count or byte size, shrunk toward the end of the run so that the
    last batches spread over every live worker instead of leaving GPUs idle: each claim takes at most
    1/(2*workers) of what remains (guided self-scheduling). `exhausted` says `pending` is all there is.
    A file that already failed once (not merely reclaimed from a dead worker) is claimed alone, so a bad
    file cannot fail its batch-mates again. With a byte target, once it has shrunk the largest files go first (see TAIL_LARGEST_FIRST).
    """
    if not pending:
        return []
    if suspect(pending[0]):
        return [pending[0]]
    share = 2 * max(1, live_workers)
    if batch_files is not None:
        remaining = len(pending)
        target = batch_files if not exhausted else min(batch_files, math.ceil(remaining / share))
        key = lambda row: 1  # noqa: E731
    else:
        remaining = sum(r.size for r in pending)
        target = batch_bytes if not exhausted else min(batch_bytes, math.ceil(remaining / share))
        key = lambda row: row.size  # noqa: E731
        if target < batch_bytes and TAIL_LARGEST_FIRST:
            # The tail of the run (the target has shrunk): largest files first (longest processing time
            # first). Taken oldest first, a 20 GB file claimed in the last minutes leaves every other GPU
            # idle while it runs; bench/makespan.py measures it (makespan 1.09 -> 1.02 of the lower
            # bound). Only in byte mode, where a batch of big files stays within its byte target;
            # retried files are still claimed alone, oldest first, when they come first (above).
            pending = sorted((r for r in pending if not suspect(r)), key=lambda r: -r.size)  # stable: ties oldest first
    chosen, total = [], 0
    for row in pending:
        if suspect(row):
            break
        if chosen and total + key(row) > target:
            break
        chosen.append(row)
        total += key(row)
        if total >= target:
            break
    return chosen


def claim_batch(ledger, worker_id: str, settings) -> Claim | None:
    """Atomically claim the next batch of pending files for `worker_id`; None when nothing is pending."""
    return ledger.transact(lambda conn: _claim(conn, worker_id, settings, _now(ledger)))


def _claim(conn, worker_id: str, settings, now: float) -> Claim | None:
    """The claim itself, inside a transaction (claim_batch, or publish with claim_next)."""
    live = _live_workers(conn, now, settings.lease + settings.clock_skew)
    # Read only as far ahead as the sizing rule needs: with a file target, whether fewer than
    # target x share files remain; with a byte target, up to LOOKAHEAD rows. Lean columns and the
    # driver's own rows: this read is most of a claim's time under the lock.
    lookahead = LOOKAHEAD
    if settings.batch_files is not None:
        lookahead = min(LOOKAHEAD, settings.batch_files * 2 * max(1, live) + 1)
    pending = conn.exec_driver_sql(_SQL_PENDING, (PENDING, lookahead)).all()
    if not pending:
        return None
    chosen = choose_batch(
        pending, settings.batch_files, settings.batch_bytes, live, exhausted=len(pending) < lookahead
    )
    batch_id = _write(conn, _SQL_NEW_BATCH, (worker_id, RUNNING, now, now, len(chosen), sum(r.size for r in chosen))).lastrowid
    moved = _write(conn, _SQL_TAKE_FILE, [(CLAIMED, batch_id, r.id, PENDING) for r in chosen]).rowcount
    if moved != len(chosen):  # the row count proves the claim; anything else is a protocol breach
        raise IllegalTransition(f"claim of batch {batch_id} moved {moved} of {len(chosen)} files.")
    touch_worker(conn, worker_id, now)
    ids = tuple(r.id for r in chosen)
    details = {r.id: r for r in conn.exec_driver_sql(_SQL_FILE_DETAILS.format(", ".join("?" * len(ids))), ids)}
    return Claim(
        batch_id, worker_id,
        [ClaimedFile(r.id, details[r.id].rel_path, r.size, details[r.id].read_count, r.attempts) for r in chosen],
    )


# -- while dorado runs --------------------------------------------------------------------------------
def heartbeat(ledger, batch_id: int, worker_id: str) -> None:
    """Refresh the lease of a batch; NotOwner if it was reclaimed or released meanwhile."""

    def txn(conn):
        now = _now(ledger)
        _owned(conn, batch_id, worker_id)
        _write(conn, _SQL_BEAT, (now, batch_id))
        touch_worker(conn, worker_id, now)

    ledger.transact(txn)


def worker_alive(ledger, worker_id: str) -> None:
    """A worker without a batch (watchman, follower) says it is still there."""
    ledger.transact(lambda conn: touch_worker(conn, worker_id, _now(ledger)))


# -- endings -------------------------------------------------------------------------------------------
def return_files(conn, batch_id: int, ids, error: str | None, count_attempt: bool, max_attempts: int, now: float):
    """Give claimed files of a batch back: pending again, or failed once past `max_attempts`."""
    t = Pod5File
    ids = list(ids)
    if not ids:
        return
    if not count_attempt:
        moved = conn.execute(
            sa.update(t).where(t.id.in_(ids), t.batch_id == batch_id, t.state == CLAIMED)
            .values(state=PENDING, batch_id=None)
        ).rowcount
    else:
        moved = conn.execute(
            sa.update(t).where(t.id.in_(ids), t.batch_id == batch_id, t.state == CLAIMED)
            .values(
                attempts=t.attempts + 1,
                last_error=error,
                state=sa.case((t.attempts + 1 >= max_attempts, FAILED), else_=PENDING),
                batch_id=sa.case((t.attempts + 1 >= max_attempts, t.batch_id), else_=None),
            )
        ).rowcount
    if moved != len(ids):
        raise IllegalTransition(f"batch {batch_id}: {len(ids) - moved} of its files were not claimed by it.")


def _batch_file_ids(conn, batch_id: int) -> list[int]:
    return list(
        conn.execute(sa.select(Pod5File.id).where(Pod5File.batch_id == batch_id, Pod5File.state == CLAIMED)).scalars()
    )


def _finish_batch(conn, batch_id, state, now, error=None):
    _write(conn, _SQL_FINISH, (state, now, error, batch_id, RUNNING))


def publish(ledger, batch_id: int, worker_id: str, results: list[FileResult], install, max_attempts: int,
            claim_next=None) -> Claim | None:
    """Publish a finished batch: if still ours, `install()` (the renames into pass/ and fail/) and
    record every file's outcome, in one transaction. `install` must be idempotent (it may rerun).

    With `claim_next` (the settings), the same transaction also claims the worker's next batch and
    returns it (None when nothing is pending): one transaction per batch instead of two, so the lock is
    held half as often (bench/claim.py). Without it, returns None.
    """

    def txn(conn):
        now = _now(ledger)
        _owned(conn, batch_id, worker_id)
        install()
        good = [r for r in results if r.ok]
        if good:
            moved = _write(
                conn, _SQL_FILE_DONE,
                [(DONE, r.reads_pass, r.reads_fail, r.reads_missing, r.bases, now, r.file_id, batch_id, CLAIMED)
                 for r in good],
            ).rowcount
            if moved != len(good):
                raise IllegalTransition(f"{len(good) - moved} files of batch {batch_id} were not claimed by it.")
        for r in results:
            if not r.ok:
                return_files(conn, batch_id, [r.file_id], r.error, True, max_attempts, now)
                _event(conn, now, "file-failed", worker_id, batch_id, r.file_id, r.error)
        _finish_batch(conn, batch_id, models.BATCH_DONE, now)
        _write(conn, _SQL_WORKER_DONE, (now, worker_id))
        _event(conn, now, "batch-done", worker_id, batch_id, message=f"{len(good)}/{len(results)} files done")
        return _claim(conn, worker_id, claim_next, now) if claim_next is not None else None

    return ledger.transact(txn)


def fail_batch(ledger, batch_id: int, worker_id: str, error: str, max_attempts: int) -> None:
    """dorado failed on the whole batch: every file back to pending with attempts+1 (or failed)."""

    def txn(conn):
        now = _now(ledger)
        _owned(conn, batch_id, worker_id)
        return_files(conn, batch_id, _batch_file_ids(conn, batch_id), error, True, max_attempts, now)
        _finish_batch(conn, batch_id, models.BATCH_FAILED, now, error)
        _event(conn, now, "batch-failed", worker_id, batch_id, message=error)

    ledger.transact(txn)


def release_batch(ledger, batch_id: int, worker_id: str, reason: str) -> None:
    """Give a batch back at once (SIGTERM, shutdown): its files are pending again, no attempt counted."""

    def txn(conn):
        now = _now(ledger)
        _owned(conn, batch_id, worker_id)
        return_files(conn, batch_id, _batch_file_ids(conn, batch_id), None, False, 0, now)
        _finish_batch(conn, batch_id, models.RELEASED, now, reason)
        _event(conn, now, "batch-released", worker_id, batch_id, message=reason)

    ledger.transact(txn)


def retry_failed(ledger, rel_paths: list[str] | None) -> int:
    """Failed files (all, or the named ones) back to pending with a fresh attempt count."""

    def txn(conn):
        t = Pod5File
        query = sa.update(t).where(t.state == FAILED)
        if rel_paths is not None:
            query = query.where(t.rel_path.in_(rel_paths))
        # Files that failed admission (never claimed) are re-inspected by the next scan instead.
        n = conn.execute(
            query.where(t.read_count.is_not(None)).values(state=PENDING, attempts=0, batch_id=None)
        ).rowcount
        n += conn.execute(query.where(t.read_count.is_(None)).values(state=models.WAITING, batch_id=None)).rowcount
        _event(conn, _now(ledger), "retry", message=f"{n} failed files queued again")
        return n

    return ledger.transact(txn)

