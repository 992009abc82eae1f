"""The batch life cycle (DESIGN §4): claim, heartbeat, publish, fail, release.

Each function is one short transaction under the global lock. The fencing token of a batch is its id
plus a random nonce (`Batch.token`): every change to a batch or its files first checks, in the same
transaction, that the batch is still running and owned by the caller with that token, and refuses with
`NotOwner` otherwise: a read of the batch row (`_owned`), or the change of that row itself made conditional
on it (`_fenced`: one statement instead of two under the lock). A zombie worker whose batch was reclaimed —
or whose batch id was handed out again after a rebuild that saw no trace of its claim — can neither
heartbeat, nor publish, nor fail files that moved on.

Files are named by their identity, relative path plus pod5 `file_identifier`, never by row id: a rebuild
renumbers rows under a live worker, which must still publish exactly its own files.
"""

from __future__ import annotations

import json
import math
import secrets
from dataclasses import dataclass, field

import sqlalchemy as sa

from . import models
from .db import BATCH_IDS_HANDED_OUT_SQL
from .errors import IllegalTransition, NotOwner
from .models import CLAIMED, DONE, FAILED, PENDING, RUNNING, Batch, Event, Output, Pod5File, Worker
from .prepared import Prepared, p

LOOKAHEAD = 2048  # pending rows read per claim: enough to size the batch, cheap on a 1M-file ledger
# Rows a claim reads first. A batch that needs more reads on, twice as many rows again each time, up to
# LOOKAHEAD; the tail of the run reads on to LOOKAHEAD at once (`_claim`).
FIRST_ROWS = 64
TAIL_LARGEST_FIRST = True  # byte-target batches: largest files first once the target shrinks (choose_batch)


@dataclass
class ClaimedFile:
    rel: str
    file_identifier: str | None
    size: int
    read_count: int | None = None
    samples: int | None = None
    attempts: int = 0
    id: int | None = None  # its row id in the ledger that made the claim: informational, never used to publish


@dataclass
class Claim:
    batch_id: int
    token: str
    worker_id: str
    files: list[ClaimedFile]
    chemistry: str | None = None

    @property
    def n_bytes(self) -> int:
        return sum(f.size for f in self.files)


@dataclass
class OutputRecord:
    """One output file written for an input: what `outputs` records at publication."""

    kind: str  # models.PASS | FAIL | SUMMARY
    path: str  # relative to OUTPUT_DIR
    reads: int = 0
    bases: int = 0
    bytes: int = 0
    checksum: str | None = None
    barcode: str | None = None


@dataclass
class FileResult:
    """The outcome of one file of a batch, as the worker saw it after splitting dorado's output."""

    rel: str
    ok: bool
    reads_pass: int = 0
    reads_fail: int = 0
    reads_missing: int = 0
    bases: int = 0
    error: str | None = None
    outputs: list[OutputRecord] = field(default_factory=list)
    isolate: bool = True  # a failure on the file's own account: claim it alone next time


def _now(ledger) -> float:
    return ledger.clock()


# -- the hot path's statements (prepared.py: names from the models, compiled once) ----------------------
P, B, W = Pod5File, Batch, Worker
_EVENT = Prepared.of(sa.insert(Event).values(
    ts=p("ts"), kind=p("kind"), worker_id=p("worker_id"), batch_id=p("batch_id"), file_id=p("file_id"),
    message=p("message")))
_OWNER = Prepared.of(sa.select(B.worker_id, B.state, B.token).where(B.id == p("batch_id")))
_TOUCH = Prepared.of(sa.update(W).where(W.worker_id == p("worker_id"))
                     .values(last_seen=p("now"), state=models.WORKER_RUNNING))
_LIVE = Prepared.of(sa.select(sa.func.count()).select_from(W)
                    .where(W.state == models.WORKER_RUNNING, W.last_seen >= p("since")))
# Only columns of the queue index (models.Pod5File): the read of up to LOOKAHEAD rows is the index alone.
_PENDING_COLUMNS = (P.id, P.size, P.isolate, P.chemistry)
_PENDING = Prepared.of(sa.select(*_PENDING_COLUMNS).where(P.state == PENDING).order_by(P.id).limit(p("n")))
_PENDING_AFTER = Prepared.of(sa.select(*_PENDING_COLUMNS).where(P.state == PENDING, P.id > p("after"))
                             .order_by(P.id).limit(p("n")))
_PENDING_OF_KEY = Prepared.of(sa.select(*_PENDING_COLUMNS)
                              .where(P.state == PENDING, P.chemistry.is_(p("chemistry"))).order_by(P.id).limit(p("n")))
# How many files are pending, counted up to n inside SQLite (no row reaches Python).
_QUEUED = Prepared.of(sa.select(sa.func.count()).select_from(
    sa.select(P.id).where(P.state == PENDING).limit(p("n")).subquery()))
# The new id: above every id handed out (db.BATCH_IDS_HANDED_OUT_SQL: the table's highest, a rebuild's floor).
_NEW_BATCH = Prepared.of(sa.insert(B).values(
    id=sa.literal_column(f"(SELECT {BATCH_IDS_HANDED_OUT_SQL}) + 1"), worker_id=p("worker_id"), state=RUNNING,
    claimed_at=p("now"), heartbeat_at=p("now"), n_files=p("n_files"), n_bytes=p("n_bytes"), token=p("token"),
    chemistry=p("chemistry")))
_TAKE_FILE = Prepared.of(sa.update(P).where(P.id == p("id"), P.state == PENDING)
                         .values(state=CLAIMED, batch_id=p("batch_id")))
# The fence as a condition of the batch row's own update (`_fenced`): running, this worker's, this nonce.
_FENCE = (B.id == p("batch_id"), B.state == RUNNING, B.worker_id == p("worker_id"), B.token.is_(p("token")))
_BEAT = Prepared.of(sa.update(B).where(*_FENCE).values(heartbeat_at=p("now")))
_BATCH_FILES_COLUMNS = (P.id, P.rel_path, P.file_identifier, P.size, P.read_count, P.samples, P.attempts)
_BATCH_FILES = Prepared.of(sa.select(*_BATCH_FILES_COLUMNS).where(P.batch_id == p("batch_id"), P.state == CLAIMED))
# The same for files named by row id (a claim) or by path (a publication). There is no index on batch_id, so
# _BATCH_FILES reads every claimed file of the ledger (those of every running batch: a page read each on a
# network filesystem, 1.6 s of lock per publication with 1,000 running batches on GlusterFS,
# bench/scale_limit.py); these look up only the batch's own rows, by primary key or by the unique rel_path:
# the names (one parameter, a JSON array: still one prepared statement) drive the loop (CROSS JOIN keeps
# SQLite from scanning a state index instead).
_COLUMNS_SQL = ", ".join(f"pod5_files.{c.key}" for c in _BATCH_FILES_COLUMNS)
_BATCH_FILES_BY_ID = Prepared.of(sa.text(
    f"SELECT {_COLUMNS_SQL} FROM json_each(:names) AS n CROSS JOIN pod5_files ON pod5_files.id = n.value "
    "WHERE pod5_files.batch_id = :batch_id AND pod5_files.state = :claimed").bindparams(claimed=CLAIMED))
_BATCH_FILES_BY_REL = Prepared.of(sa.text(
    f"SELECT {_COLUMNS_SQL} FROM json_each(:names) AS n CROSS JOIN pod5_files ON pod5_files.rel_path = n.value "
    "WHERE pod5_files.batch_id = :batch_id AND pod5_files.state = :claimed").bindparams(claimed=CLAIMED))
_FILE_DONE = Prepared.of(sa.update(P).where(P.id == p("id"), P.batch_id == p("batch_id"), P.state == CLAIMED).values(
    state=DONE, reads_pass=p("reads_pass"), reads_fail=p("reads_fail"), reads_missing=p("reads_missing"),
    bases=p("bases"), done_at=p("now"), last_error=None, isolate=False))
_OUTPUT = Prepared.of(sa.insert(Output).values(
    file_id=p("file_id"), batch_id=p("batch_id"), kind=p("kind"), barcode=p("barcode"), path=p("path"),
    reads=p("reads"), bases=p("bases"), bytes=p("bytes"), checksum=p("checksum")))
_FINISH = Prepared.of(sa.update(B).where(*_FENCE)
                      .values(state=p("state"), finished_at=p("now"), error=p("error")))
_PROVENANCE = Prepared.of(sa.update(B).where(B.id == p("batch_id"))
                          .values(model=p("model"), dorado_version=p("dorado_version"), gpus=p("gpus")))
HOT_PATH = (_EVENT, _OWNER, _TOUCH, _LIVE, _PENDING, _PENDING_AFTER, _PENDING_OF_KEY, _QUEUED, _NEW_BATCH,
            _TAKE_FILE, _BEAT, _BATCH_FILES, _BATCH_FILES_BY_ID, _BATCH_FILES_BY_REL, _FILE_DONE, _OUTPUT, _FINISH,
            _PROVENANCE)


def event(conn, now, kind, worker_id=None, batch_id=None, file_id=None, message=None):
    """Append to the ledger's history (`events`)."""
    _EVENT.run(conn, ts=now, kind=kind, worker_id=worker_id, batch_id=batch_id, file_id=file_id, message=message)


def _owned(conn, c: Claim):
    """The guard: the batch must be running and owned by `c.worker_id` under the same fencing nonce."""
    row = _OWNER.run(conn, batch_id=c.batch_id).fetchone()
    if row is None or row[0] != c.worker_id or row[1] != RUNNING or row[2] != c.token:
        state = "gone" if row is None else (
            f"{row[1]}, owner {row[0]}" + ("" if row[2] == c.token else ", another fencing token"))
        raise NotOwner(f"batch {c.batch_id} is no longer owned by {c.worker_id} ({state}): this worker was fenced.")
    return row


def _fenced(conn, update: Prepared, c: Claim, **values) -> None:
    """Run an UPDATE of the claim's batch row under the fence (`_FENCE`): the check and the change in one
    statement. NotOwner, saying why (`_owned`), when it changed no row."""
    if update.run(conn, batch_id=c.batch_id, worker_id=c.worker_id, token=c.token, **values).rowcount != 1:
        _owned(conn, c)  # raises NotOwner: the row is gone, ended, another worker's or another nonce's
        raise IllegalTransition(f"batch {c.batch_id}: its row is owned by {c.worker_id} but was not updated.")


# -- workers -----------------------------------------------------------------------------------------
class _Recent:
    """What this process wrote and read in each ledger lately, by the ledger's clock: when it last wrote a
    worker's row (`touch_worker` with `where`), and the live-worker count it last read (`_live_workers`).

    A worker's claim reads neither page again within one heartbeat interval: on a network filesystem every
    page a transaction reads is a round trip under the lock, and the count reads the whole workers table. Both
    are read with more slack than that: `last_seen` within a lease (at least three heartbeats), and the count
    sizes the tail of a run, whose workers come and go over minutes. A row deleted meanwhile (a rebuilt
    ledger) or marked exited is written again within a heartbeat. In a run, the heartbeats during dorado
    write the row, so a claim after a batch skips it; the count is remembered per worker, so it is read
    again at every claim of a worker whose batches last longer than a heartbeat (most): it saves reads only
    where claims come often (small batches, the shrinking tail, bench/claim.py's instant basecaller).
    """

    def __init__(self):
        self.written: dict[tuple[str, str], float] = {}
        self.live: dict[tuple[str, str], tuple[float, int]] = {}

    @staticmethod
    def fresh(at: float | None, now: float, within: float) -> bool:
        return at is not None and 0 <= now - at < within  # a clock that went back counts as stale

    def wrote_lately(self, where: str, worker_id: str, now: float, within: float) -> bool:
        return self.fresh(self.written.get((where, worker_id)), now, within)


_RECENT = _Recent()


def touch_worker(conn, worker_id: str, now: float, where: str | None = None, **values) -> None:
    """Mark a worker alive, re-creating its row if a rebuilt ledger does not know it yet. `where` (the
    ledger's path): remember the write, so that the claims of the next heartbeat interval skip it."""
    if values or not _TOUCH.run(conn, now=now, worker_id=worker_id).rowcount:
        values = dict(last_seen=now, state=models.WORKER_RUNNING, **values)
        updated = conn.execute(sa.update(Worker).where(Worker.worker_id == worker_id).values(**values))
        if updated.rowcount == 0:
            values.setdefault("host", worker_id.rsplit("@", 1)[-1])
            values.setdefault("pid", 0)
            conn.execute(sa.insert(Worker).values(worker_id=worker_id, started_at=now, batches_done=0, **values))
    if where is not None:
        _RECENT.written[(where, worker_id)] = now


def register_worker(ledger, worker_id: str, host: str, pid: int, device: str | None, **details) -> None:
    """A worker starts (`details`: dorado_version, gpus)."""

    def txn(conn):
        now = _now(ledger)
        touch_worker(conn, worker_id, now, str(ledger.path), host=host, pid=pid, device=device, **details)
        event(conn, now, "worker-start", worker_id, message=f"{host} pid {pid} {device or ''}".strip())

    ledger.transact(txn)


def worker_exited(ledger, worker_id: str, reason: str = "") -> None:
    def txn(conn):
        now = _now(ledger)
        conn.execute(sa.update(Worker).where(Worker.worker_id == worker_id)
                     .values(state=models.WORKER_EXITED, last_seen=now))
        event(conn, now, "worker-exit", worker_id, message=reason or None)

    ledger.transact(txn)


# -- claim -------------------------------------------------------------------------------------------
def _live_workers(conn, now: float, window: float) -> int:
    return _LIVE.run(conn, since=now - window).fetchone()[0]


def _live_workers_lately(conn, where: str, worker_id: str, now: float, settings) -> int:
    """`_live_workers`, read again only once the count this worker read is a heartbeat old (`_Recent`)."""
    at, live = _RECENT.live.get((where, worker_id), (None, 0))
    if not _RECENT.fresh(at, now, settings.heartbeat):
        live = _live_workers(conn, now, settings.lease + settings.clock_skew)
        _RECENT.live[(where, worker_id)] = (now, live)
    return live


def choose_batch(pending, batch_files, batch_bytes, live_workers, exhausted: bool):
    """Pick the files of the next batch from `pending` (oldest first; rows with id, size, isolate,
    chemistry). Every file of a batch has the same chemistry key (DESIGN §4: dorado refuses or
    miscalls mixed chemistries): the key of the oldest pending file, or in the tail of the run that of the
    largest one.

    The target is the configured count or byte size, shrunk toward the end of the run so that the last
    batches spread over every live worker instead of leaving GPUs idle: each claim takes at most
    1/(2*workers) of what remains (guided self-scheduling, over all chemistries: a small chemistry group
    in the middle of a big run keeps full batches). `exhausted` says `pending` is all there is.
    A file marked `isolate` (it failed on its own account) is claimed alone, so a bad file cannot fail its
    batch-mates again. With a byte target, once it has shrunk the largest files go first (TAIL_LARGEST_FIRST).
    """
    return _choose(pending, batch_files, batch_bytes, live_workers, exhausted)[0]


def _choose(pending, batch_files, batch_bytes, live_workers, exhausted: bool) -> tuple[list, bool]:
    """`choose_batch`, and whether the batch is complete: False when it ran out of rows before its target (rows
    after `pending` could still join it), True when a row stopped it (target reached, the next row too big,
    an isolated file)."""
    if not pending:
        return [], False
    if pending[0].isolate:
        return [pending[0]], True
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
            # idle while it runs; bench/makespan.py measures it. Only in byte mode, where a batch of big
            # files stays within its byte target; isolated files are still claimed alone when they come first.
            pending = sorted((r for r in pending if not r.isolate), key=lambda r: -r.size)  # stable: ties oldest first
    chemistry = pending[0].chemistry
    chosen, total = [], 0
    for row in pending:
        if row.chemistry != chemistry:
            continue
        if row.isolate or (chosen and total + key(row) > target):
            return chosen, True
        chosen.append(row)
        total += key(row)
        if total >= target:
            return chosen, True
    return chosen, False


def horizon(settings, live_workers: int) -> int:
    """How many of the oldest pending rows the batch is chosen from: with a file target, enough to tell
    whether fewer than target x share files remain (choose_batch's tail rule); with a byte target, LOOKAHEAD."""
    if settings.batch_files is None:
        return LOOKAHEAD
    return min(LOOKAHEAD, settings.batch_files * 2 * max(1, live_workers) + 1)


def claim_batch(ledger, worker_id: str, settings) -> Claim | None:
    """Atomically claim the next batch of pending files for `worker_id`; None when nothing is pending."""
    return ledger.transact(lambda conn: _claim(conn, str(ledger.path), worker_id, settings, _now(ledger)))


def _claim(conn, where: str, worker_id: str, settings, now: float) -> Claim | None:
    """The claim itself, inside a transaction (claim_batch, or publish with claim_next), in the ledger at
    `where` (its path: what this process read and wrote there lately, `_Recent`)."""
    live = _live_workers_lately(conn, where, worker_id, now, settings)
    # The batch is chosen from the oldest `lookahead` pending rows (`horizon`), but read only as far as it
    # needs: first FIRST_ROWS rows, and how many are pending (up to `lookahead`, counted in
    # SQLite). Where the queue is longer than the horizon and the rows read make a whole batch, that is the
    # batch the whole horizon gives (a prefix of the same rows in the same order): no more is read. A batch
    # the rows read cannot fill reads on after the last of them, as many rows again each time, until it is
    # whole or the horizon is read; the tail of the run (its sizing needs every pending row) reads on to the
    # end of the horizon at once. Lean rows from the queue index alone (_PENDING_COLUMNS): Python objects for 2,048 rows
    # were most of a byte-target claim's time under the lock (docs/benchmarks.md).
    lookahead = horizon(settings, live)
    first = min(FIRST_ROWS, lookahead)
    pending = _PENDING.rows(conn, n=first)
    if not pending:
        return None
    exhausted = len(pending) < first or (
        first < lookahead and _QUEUED.run(conn, n=lookahead).fetchone()[0] < lookahead)
    if exhausted and len(pending) == first:  # the tail: every pending row, read on after those already read
        pending += _PENDING_AFTER.rows(conn, after=pending[-1].id, n=lookahead - len(pending))
    chosen, complete = _choose(pending, settings.batch_files, settings.batch_bytes, live, exhausted)
    while not complete and not exhausted and len(pending) < lookahead:
        more = _PENDING_AFTER.rows(conn, after=pending[-1].id, n=min(len(pending), lookahead - len(pending)))
        if not more:  # cannot happen: the queue was counted at `lookahead` or more in this transaction
            break
        pending += more
        chosen, complete = _choose(pending, settings.batch_files, settings.batch_bytes, live, exhausted)
    if not complete and not exhausted and any(r.chemistry != chosen[0].chemistry for r in pending):
        # A long queue holds other chemistries too: fill the batch from this chemistry's own rows. (When
        # every row read is of this chemistry, they are already its first rows: no second read.)
        same = _PENDING_OF_KEY.rows(conn, chemistry=chosen[0].chemistry, n=lookahead)
        chosen = choose_batch(same, settings.batch_files, settings.batch_bytes, live, exhausted=False)
    token = secrets.token_hex(8)
    chemistry = chosen[0].chemistry
    batch_id = _NEW_BATCH.run(conn, worker_id=worker_id, now=now, n_files=len(chosen),
                              n_bytes=sum(r.size for r in chosen), token=token, chemistry=chemistry).lastrowid
    moved = _TAKE_FILE.run_many(conn, [{"id": r.id, "batch_id": batch_id} for r in chosen]).rowcount
    if moved != len(chosen):  # the row count proves the claim; anything else is a protocol breach
        raise IllegalTransition(f"claim of batch {batch_id} moved {moved} of {len(chosen)} files.")
    if not _RECENT.wrote_lately(where, worker_id, now, settings.heartbeat):
        touch_worker(conn, worker_id, now, where)
    files = [ClaimedFile(rel, fid, size, reads, samples, attempts, row_id)
             for row_id, rel, fid, size, reads, samples, attempts in _BATCH_FILES_BY_ID.run(
                 conn, batch_id=batch_id, names=json.dumps([r.id for r in chosen]))]
    order = {r.id: i for i, r in enumerate(chosen)}
    files.sort(key=lambda f: order[f.id])
    return Claim(batch_id, token, worker_id, files, chemistry)


# -- while dorado runs --------------------------------------------------------------------------------
def heartbeat(ledger, c: Claim) -> None:
    """Refresh the lease of a batch; NotOwner if it was reclaimed or released meanwhile."""

    def txn(conn):
        now = _now(ledger)
        _fenced(conn, _BEAT, c, now=now)
        touch_worker(conn, c.worker_id, now, str(ledger.path))

    ledger.transact(txn)


def still_owned(ledger, c: Claim) -> bool:
    """Is the batch still this worker's? (A read: for deciding whether an error is only a fencing.)"""
    try:
        ledger.transact(lambda conn: _owned(conn, c))
        return True
    except NotOwner:
        return False


def worker_alive(ledger, worker_id: str) -> None:
    """A worker without a batch (watchman, follower) says it is still there."""
    ledger.transact(lambda conn: touch_worker(conn, worker_id, _now(ledger)))


# -- endings -------------------------------------------------------------------------------------------
def return_files(conn, batch_id: int, ids, error: str | None, count_attempt: bool, max_attempts: int,
                 isolate: bool = False):
    """Give claimed files of a batch back: pending again, or failed once past `max_attempts`.

    `isolate`: the failure was on the files' own account (dorado error, no reads): claim each alone next time.
    """
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
                isolate=isolate,
                state=sa.case((t.attempts + 1 >= max_attempts, FAILED), else_=PENDING),
                batch_id=sa.case((t.attempts + 1 >= max_attempts, t.batch_id), else_=None),
            )
        ).rowcount
    if moved != len(ids):
        raise IllegalTransition(f"batch {batch_id}: {len(ids) - moved} of its files were not claimed by it.")


def fail_files_now(conn, batch_id: int, ids, error: str) -> None:
    """Fail claimed files at once, whatever their attempts: retrying cannot help (e.g. a chemistry that
    this dorado has no model for). `ledgerbc retry` brings them back."""
    ids = list(ids)
    moved = conn.execute(
        sa.update(Pod5File).where(Pod5File.id.in_(ids), Pod5File.batch_id == batch_id, Pod5File.state == CLAIMED)
        .values(state=FAILED, attempts=Pod5File.attempts + 1, last_error=error)
    ).rowcount
    if moved != len(ids):
        raise IllegalTransition(f"batch {batch_id}: {len(ids) - moved} of its files were not claimed by it.")


def _batch_files(conn, batch_id: int, rels=None) -> dict[str, tuple]:
    """The files a batch still holds (of `rels` only, when given), by relative path: (row id, file_identifier)."""
    rows = (_BATCH_FILES.run(conn, batch_id=batch_id) if rels is None
            else _BATCH_FILES_BY_REL.run(conn, batch_id=batch_id, names=json.dumps(list(rels))))
    return {rel: (row_id, fid) for row_id, rel, fid, *_ in rows}


def _claimed_files(conn, c: Claim, rels: list[str]) -> dict[str, tuple]:
    """`_batch_files` of `rels` for a publication: first by the row ids the claim saw (the primary key: pages
    the update reads anyway), by path only when a row moved (a rebuild renumbers rows under a live worker).
    A row found by id counts only if it is still this batch's claim of the same path."""
    wanted = set(rels)
    ids = [f.id for f in c.files if f.rel in wanted]
    if len(ids) == len(wanted) and None not in ids:
        rows = _BATCH_FILES_BY_ID.run(conn, batch_id=c.batch_id, names=json.dumps(ids))
        held = {rel: (row_id, fid) for row_id, rel, fid, *_ in rows}
        if set(held) == wanted:
            return held
    return _batch_files(conn, c.batch_id, rels)


def _finish_batch(conn, c: Claim, state, now, error=None):
    """End the claim's batch, fenced: first in every ending transaction, before its files are touched (and
    rolled back with them if anything after it fails)."""
    _fenced(conn, _FINISH, c, state=state, now=now, error=error)


def check_identities(held: dict[str, tuple], c: Claim, rels) -> None:
    """Every file named must still be claimed by this batch, as the same pod5 (file_identifier)."""
    expected = {f.rel: f.file_identifier for f in c.files}
    for rel in rels:
        row = held.get(rel)
        if row is None:
            raise NotOwner(f"batch {c.batch_id}: {rel} is no longer claimed by it: this worker was fenced.")
        if rel not in expected or row[1] != expected[rel]:
            raise IllegalTransition(
                f"batch {c.batch_id}: {rel} is now another pod5 file (file_identifier {row[1]}, claimed as "
                f"{expected.get(rel)}): nothing published."
            )


def publish(ledger, c: Claim, results: list[FileResult], installer, max_attempts: int,
            claim_next=None, provenance: dict | None = None) -> Claim | None:
    """Publish a finished batch, in one transaction under the lock (DESIGN §4 Publish):

    1. check the batch is still ours (marking it done, fenced: `_finish_batch`) and every one of its files is
       still claimed by it as the same pod5;
    2. only then `installer.run()`: the renames into pass/, fail/, summary/ (it checks the lock is still
       trustworthy before each); 3. record every file's outcome and its outputs.
    If anything fails after the renames began — a refused update, a failed COMMIT, a lock that may have
    been lost — `installer.undo()` runs under the same lock and moves the outputs back: a transaction that
    fails leaves no new output in place. `installer` may be None (nothing to rename).

    `provenance` (model, dorado_version, gpus: what dorado's BAM says it ran with) is recorded on the batch.

    With `claim_next` (the settings), the same transaction also claims the worker's next batch and
    returns it (None when nothing is pending): one transaction per batch instead of two, so the lock is
    held half as often (bench/claim.py). Without it, returns None.
    """

    def txn(conn):
        now = _now(ledger)
        _finish_batch(conn, c, models.BATCH_DONE, now)
        held = _claimed_files(conn, c, [r.rel for r in results])
        check_identities(held, c, [r.rel for r in results])
        if installer is not None:
            installer.run()
        good = [r for r in results if r.ok]
        if good:
            moved = _FILE_DONE.run_many(conn, [
                dict(id=held[r.rel][0], batch_id=c.batch_id, reads_pass=r.reads_pass, reads_fail=r.reads_fail,
                     reads_missing=r.reads_missing, bases=r.bases, now=now) for r in good]).rowcount
            if moved != len(good):
                raise IllegalTransition(f"{len(good) - moved} files of batch {c.batch_id} were not claimed by it.")
            outputs = [dict(file_id=held[r.rel][0], batch_id=c.batch_id, kind=o.kind, barcode=o.barcode, path=o.path,
                            reads=o.reads, bases=o.bases, bytes=o.bytes, checksum=o.checksum)
                       for r in good for o in r.outputs]
            if outputs:
                _OUTPUT.run_many(conn, outputs)
        for r in results:
            if not r.ok:
                return_files(conn, c.batch_id, [held[r.rel][0]], r.error, True, max_attempts, isolate=r.isolate)
                event(conn, now, "file-failed", c.worker_id, c.batch_id, held[r.rel][0], r.error)
        if provenance:
            _PROVENANCE.run(conn, batch_id=c.batch_id, **{k: provenance.get(k) for k in ("model", "dorado_version", "gpus")})
        # No `batch-done` event and no count on the worker row: the batch row says done, by whom and when
        # (status and the report count a worker's batches from it); each would be one more page to journal.
        return _claim(conn, str(ledger.path), c.worker_id, claim_next, now) if claim_next is not None else None

    return ledger.transact(txn, undo=installer.undo if installer is not None else None)


def fail_batch(ledger, c: Claim, error: str, max_attempts: int, now_failed: bool = False) -> None:
    """dorado failed on the whole batch: every file back to pending with attempts+1 (or failed), each to be
    claimed alone next time. `now_failed`: dorado refused the batch's chemistry, so retrying cannot help:
    its files fail at once, and so do the pending files of the same chemistry, which dorado would refuse
    the same way (one dorado call per refused chemistry, not one per file and attempt)."""

    def txn(conn):
        now = _now(ledger)
        _finish_batch(conn, c, models.BATCH_FAILED, now, error)
        ids = [row_id for row_id, _fid in _batch_files(conn, c.batch_id).values()]
        if now_failed:
            fail_files_now(conn, c.batch_id, ids, error)
            same = conn.execute(
                sa.update(Pod5File).where(Pod5File.state == PENDING, Pod5File.chemistry.is_(c.chemistry))
                .values(state=FAILED, last_error=f"not sent to dorado: {error}")
            ).rowcount
            if same:
                event(conn, now, "chemistry-refused", c.worker_id, c.batch_id,
                      message=f"{same} more pending files of chemistry {c.chemistry} failed with batch {c.batch_id}")
        else:
            return_files(conn, c.batch_id, ids, error, True, max_attempts, isolate=True)
        event(conn, now, "batch-failed", c.worker_id, c.batch_id, message=error)

    ledger.transact(txn)


def release_batch(ledger, c: Claim, reason: str) -> None:
    """Give a batch back at once (SIGTERM, shutdown, storage full): its files are pending again, no
    attempt counted."""

    def txn(conn):
        now = _now(ledger)
        _finish_batch(conn, c, models.RELEASED, now, reason)
        ids = [row_id for row_id, _fid in _batch_files(conn, c.batch_id).values()]
        return_files(conn, c.batch_id, ids, None, False, 0)
        event(conn, now, "batch-released", c.worker_id, c.batch_id, message=reason)

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
        event(conn, _now(ledger), "retry", message=f"{n} failed files queued again")
        return n

    return ledger.transact(txn)
