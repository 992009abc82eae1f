"""The ledger (db.py) and the batch life cycle (claim.py), on a real SQLite ledger under tmp_path."""
from __future__ import annotations

import math
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from collections import namedtuple
from pathlib import Path

import filelock
import pytest
import sqlalchemy as sa

from ledgerbc import claim, db, janitor, models, status
from ledgerbc.claim import FileResult, choose_batch
from ledgerbc.errors import LockTimeout, NotOwner
from ledgerbc.models import Batch, Pod5File, Worker

Row = namedtuple("Row", "id size attempts isolate chemistry", defaults=(0, False, None))


def files(ledger) -> dict[int, Pod5File]:
    return {r.id: r for r in ledger.transact(lambda c: c.execute(sa.select(Pod5File)).all())}


def batches(ledger) -> dict[int, Batch]:
    return {r.id: r for r in ledger.transact(lambda c: c.execute(sa.select(Batch)).all())}


def ids_of(c: claim.Claim) -> list[int]:
    return [f.id for f in c.files]


def ok_results(c: claim.Claim) -> list[FileResult]:
    return [FileResult(f.rel, ok=True, reads_pass=2, reads_fail=1, bases=300) for f in c.files]


class Recorder:
    """An installer that only counts its runs (the renames are tested in test_publish.py)."""

    def __init__(self):
        self.runs, self.undos = [], []

    def run(self):
        self.runs.append(1)

    def undo(self):
        self.undos.append(1)


def rel_of(ledger, file_id: int) -> str:
    return files(ledger)[file_id].rel_path


# -- claim ---------------------------------------------------------------------------------------------
def test_claim_by_files_takes_the_oldest_pending_files(make_ledger, clock):
    ledger, settings = make_ledger(100, batch_files=4, clock=clock)
    first = claim.claim_batch(ledger, "w1", settings)
    second = claim.claim_batch(ledger, "w2", settings)
    assert ids_of(first) == [1, 2, 3, 4] and ids_of(second) == [5, 6, 7, 8]
    assert second.batch_id > first.batch_id

    rows, bs = files(ledger), batches(ledger)
    for c in (first, second):
        assert all(rows[i].state == models.CLAIMED and rows[i].batch_id == c.batch_id for i in ids_of(c))
        b = bs[c.batch_id]
        assert (b.worker_id, b.state, b.n_files, b.n_bytes) == (c.worker_id, models.RUNNING, 4, 4000)
        assert b.claimed_at == b.heartbeat_at == clock.now
    assert sum(r.state == models.PENDING for r in rows.values()) == 92


def test_claim_by_bytes_fills_up_to_the_target_and_takes_a_big_file_alone(make_ledger):
    sizes = [300, 300, 300, 500, 2000] + [100] * 60
    ledger, settings = make_ledger(sizes=sizes, batch_bytes=1000)
    claims = [claim.claim_batch(ledger, "w", settings) for _ in range(4)]
    assert [[f.size for f in c.files] for c in claims] == [[300, 300, 300], [500], [2000], [100] * 10]
    assert [batches(ledger)[c.batch_id].n_bytes for c in claims] == [900, 500, 2000, 1000]


def test_claim_with_nothing_pending_returns_none_and_makes_no_batch(make_ledger):
    ledger, settings = make_ledger(2, batch_files=5)
    claimed = []
    while (c := claim.claim_batch(ledger, "w", settings)) is not None:
        claimed += ids_of(c)
    assert claimed == [1, 2]
    n_batches = len(batches(ledger))
    assert claim.claim_batch(ledger, "w", settings) is None
    assert len(batches(ledger)) == n_batches


def test_choose_batch_full_target_until_the_lookahead_is_exhausted():
    pending = [Row(i, 1000, 0) for i in range(1, 201)]
    assert len(choose_batch(pending, 40, None, live_workers=8, exhausted=False)) == 40
    # exhausted: at most 1/(2*workers) of what remains
    assert len(choose_batch(pending, 40, None, live_workers=8, exhausted=True)) == math.ceil(200 / 16)
    assert len(choose_batch(pending, 40, None, live_workers=0, exhausted=True)) == 40  # 0 workers counts as 1
    chosen = choose_batch(pending, None, 20_000, live_workers=8, exhausted=True)
    assert sum(r.size for r in chosen) <= math.ceil(200_000 / 16) and len(chosen) == 12
    assert len(choose_batch(pending, None, 20_000, live_workers=8, exhausted=False)) == 20


@pytest.mark.parametrize("by", ["files", "bytes"])
def test_choose_batch_shrinks_toward_the_end_of_the_run(by):
    """Simulate claiming until empty: batches never grow, end at one file, and each takes at most
    1/(2*workers) of what remains, so the tail spreads over every worker."""
    workers = 8
    pending = [Row(i, 1000, 0) for i in range(1, 301)]
    sizes = []
    while pending:
        remaining = len(pending) if by == "files" else 1000 * len(pending)
        chosen = choose_batch(pending, 40 if by == "files" else None, 40_000 if by == "bytes" else None,
                              workers, exhausted=True)
        amount = len(chosen) if by == "files" else sum(r.size for r in chosen)
        assert 1 <= len(chosen) <= 40 and chosen == pending[: len(chosen)]
        assert len(chosen) == 1 or amount <= math.ceil(remaining / (2 * workers))
        sizes.append(len(chosen))
        pending = pending[len(chosen):]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] < 40 and sizes[-1] == 1
    assert sizes.count(1) >= workers  # the last batches are single files: one per worker at the end


def test_claim_batch_shrinks_with_the_number_of_live_workers(make_ledger, clock):
    ledger, settings = make_ledger(40, batch_files=10, clock=clock)
    for n in range(4):
        claim.register_worker(ledger, f"w{n}", "host", 100 + n, None)
    assert len(claim.claim_batch(ledger, "w0", settings).files) == math.ceil(40 / (2 * 4))
    # Workers silent for longer than lease + clock skew do not count: only the claimer itself is live.
    clock.advance(settings.lease + settings.clock_skew + 1)
    claim.worker_alive(ledger, "w0")
    assert len(claim.claim_batch(ledger, "w0", settings).files) == min(10, math.ceil(35 / 2))


def test_a_retried_file_is_claimed_alone(make_ledger):
    ledger, settings = make_ledger(12, batch_files=4)
    c = claim.claim_batch(ledger, "w", settings)
    claim.fail_batch(ledger, c, "dorado exited 1", settings.max_attempts)
    rows = files(ledger)
    assert all(rows[i].state == models.PENDING and rows[i].attempts == 1 and rows[i].isolate for i in ids_of(c))
    again = [ids_of(claim.claim_batch(ledger, "w", settings)) for _ in range(5)]
    assert again == [[1], [2], [3], [4], [5, 6, 7, 8]]


def test_a_batch_stops_before_a_retried_file(make_ledger):
    ledger, settings = make_ledger(20, batch_files=4)
    a = claim.claim_batch(ledger, "w", settings)  # 1-4
    b = claim.claim_batch(ledger, "w", settings)  # 5-8
    results = ok_results(b)
    results[1] = FileResult(rel_of(ledger, 6), ok=False, error="no reads out")
    claim.publish(ledger, b, results, None, settings.max_attempts)
    claim.release_batch(ledger, a, "SIGTERM")  # 1-4 pending again, no attempt counted
    settings.batch_files = 8
    assert ids_of(claim.claim_batch(ledger, "w", settings)) == [1, 2, 3, 4]
    assert ids_of(claim.claim_batch(ledger, "w", settings)) == [6]
    assert files(ledger)[6].attempts == 1 and files(ledger)[1].attempts == 0


# -- publish ---------------------------------------------------------------------------------------------
def test_publish_records_every_file_and_installs_once(make_ledger, clock):
    ledger, settings = make_ledger(6, batch_files=3, clock=clock)
    claim.register_worker(ledger, "w", "host", 1, "cuda:0")
    c = claim.claim_batch(ledger, "w", settings)
    installs = Recorder()
    clock.advance(30)
    claim.publish(ledger, c, ok_results(c), installs, settings.max_attempts)
    assert installs.runs == [1] and installs.undos == []
    rows = files(ledger)
    for i in ids_of(c):
        r = rows[i]
        assert (r.state, r.reads_pass, r.reads_fail, r.bases, r.done_at) == (models.DONE, 2, 1, 300, clock.now)
    b = batches(ledger)[c.batch_id]
    assert (b.state, b.finished_at) == (models.BATCH_DONE, clock.now)
    workers = ledger.transact(lambda conn: status.collect(conn, clock.now, settings))["workers"]
    assert [(w["worker_id"], w["batches_done"]) for w in workers] == [("w", 1)]


def worker_row(ledger, worker_id="w"):
    return ledger.transact(lambda conn: conn.execute(sa.select(Worker).where(Worker.worker_id == worker_id)).first())


def test_a_claim_reads_and_writes_the_worker_pages_at_most_once_a_heartbeat(make_ledger, clock, monkeypatch):
    """The hot path neither writes this worker's row nor counts the live workers again within a heartbeat
    interval of doing so (pages it need not read or journal under the lock), and still keeps the row within a
    heartbeat of the truth: re-created when gone, revived when marked exited, corrected when ahead of the clock."""
    ledger, settings = make_ledger(12, clock=clock)  # heartbeat 5 s, 1-file batches
    counts = []
    live_workers = claim._live_workers
    monkeypatch.setattr(claim, "_live_workers", lambda *a: counts.append(clock.now) or live_workers(*a))

    def publish(c):
        return claim.publish(ledger, c, ok_results(c), None, settings.max_attempts, claim_next=settings)

    claim.register_worker(ledger, "w", "host", 1, "cuda:0")
    registered = clock.now
    clock.advance(settings.heartbeat - 1)
    c = claim.claim_batch(ledger, "w", settings)
    assert worker_row(ledger).last_seen == registered, "a row this process wrote within a heartbeat was written again"
    assert counts == [clock.now]
    clock.advance(0.5)
    c = publish(c)
    assert worker_row(ledger).last_seen == registered and counts == [clock.now - 0.5], "read or wrote again"
    clock.advance(2)  # more than a heartbeat since the row was written, not since the count
    c = publish(c)
    assert worker_row(ledger).last_seen == clock.now and len(counts) == 1
    clock.advance(settings.heartbeat)
    c = publish(c)
    assert worker_row(ledger).last_seen == clock.now and counts[-1] == clock.now and len(counts) == 2
    # Gone (a rebuilt ledger that never saw this worker): back within a heartbeat.
    ledger.transact(lambda conn: conn.execute(sa.delete(Worker)))
    clock.advance(1)
    c = publish(c)
    assert worker_row(ledger) is None
    clock.advance(settings.heartbeat)
    c = publish(c)
    assert (worker_row(ledger).last_seen, worker_row(ledger).state) == (clock.now, models.WORKER_RUNNING)
    # Marked exited (by a worker_exited of a previous life), or ahead of this clock: within a heartbeat too.
    ledger.transact(lambda conn: conn.execute(sa.update(Worker).values(state=models.WORKER_EXITED)))
    clock.advance(settings.heartbeat)
    c = publish(c)
    assert (worker_row(ledger).last_seen, worker_row(ledger).state) == (clock.now, models.WORKER_RUNNING)
    ledger.transact(lambda conn: conn.execute(sa.update(Worker).values(last_seen=clock.now + 3600)))
    clock.advance(settings.heartbeat)
    c = publish(c)
    assert worker_row(ledger).last_seen == clock.now
    # A clock that went back: what this process remembers counts as stale, the row is written.
    clock.advance(-60)
    c = publish(c)
    assert worker_row(ledger).last_seen == clock.now
    # Status counts the batches from their rows: eight published, one running.
    workers = ledger.transact(lambda conn: status.collect(conn, clock.now, settings))["workers"]
    assert [(w["worker_id"], w["batches_done"], w["current_batch"] is not None) for w in workers] == [("w", 8, True)]


# -- fencing ---------------------------------------------------------------------------------------------
def assert_fenced(ledger, settings, c: claim.Claim):
    installs = Recorder()
    with pytest.raises(NotOwner):
        claim.heartbeat(ledger, c)
    with pytest.raises(NotOwner):
        claim.publish(ledger, c, ok_results(c), installs, settings.max_attempts)
    with pytest.raises(NotOwner):
        claim.fail_batch(ledger, c, "late failure", settings.max_attempts)
    with pytest.raises(NotOwner):
        claim.release_batch(ledger, c, "late release")
    assert installs.runs == [], "a fenced worker's outputs were installed"


def test_a_released_batch_is_no_longer_owned(make_ledger):
    ledger, settings = make_ledger(4, batch_files=4)
    c = claim.claim_batch(ledger, "w", settings)
    claim.release_batch(ledger, c, "SIGTERM")
    before = files(ledger)
    assert all(r.state == models.PENDING and r.attempts == 0 and r.batch_id is None for r in before.values())
    assert batches(ledger)[c.batch_id].state == models.RELEASED
    assert_fenced(ledger, settings, c)
    assert files(ledger) == before  # the refused calls changed nothing


def test_another_worker_cannot_touch_a_batch(make_ledger):
    ledger, settings = make_ledger(8, batch_files=4)
    c = claim.claim_batch(ledger, "w1", settings)
    assert_fenced(ledger, settings, claim.Claim(c.batch_id, c.token, "w2", c.files))
    assert_fenced(ledger, settings, claim.Claim(999, c.token, "w1", c.files))  # a batch that never existed
    # The same id and worker with another fencing nonce: a claim lost with the ledger, its id handed out again.
    assert_fenced(ledger, settings, claim.Claim(c.batch_id, "0123456789abcdef", "w1", c.files))
    assert batches(ledger)[c.batch_id].state == models.RUNNING
    rows = files(ledger)
    assert ids_of(c) == [1, 2, 3, 4] and all(rows[i].state == models.CLAIMED for i in ids_of(c))


def test_a_reclaimed_batch_fences_its_old_worker(make_ledger):
    ledger, settings = make_ledger(6, batch_files=3)
    old = claim.claim_batch(ledger, "w1", settings)
    assert ids_of(old) == [1, 2, 3]
    report = janitor.JanitorReport()
    janitor.reclaim(ledger, settings, old.batch_id, report, reason="node lost (test)")
    assert report.reclaimed == [old.batch_id] and report.files_returned == 3
    rows = files(ledger)
    assert all((rows[i].state, rows[i].attempts, rows[i].last_error) == (models.PENDING, 1, "reclaimed: node lost (test)")
               for i in ids_of(old))
    assert batches(ledger)[old.batch_id].state == models.RECLAIMED
    assert_fenced(ledger, settings, old)

    new = claim.claim_batch(ledger, "w2", settings)  # the work moves on (reclaimed files batch normally)
    assert new.batch_id > old.batch_id and ids_of(new) == [1, 2, 3]
    assert_fenced(ledger, settings, old)  # the zombie still cannot publish over it
    claim.publish(ledger, new, ok_results(new), None, settings.max_attempts)
    assert files(ledger)[1].state == models.DONE


def test_lease_expiry_follows_the_injected_clock(make_ledger, clock):
    ledger, settings = make_ledger(4, batch_files=2, clock=clock)
    c = claim.claim_batch(ledger, "w", settings)
    assert ids_of(c) == [1, 2]
    jan = janitor.Janitor(ledger, settings)
    window = settings.lease + settings.clock_skew

    clock.advance(window - 1)
    assert jan.run_pass(one_shot=True).reclaimed == []
    claim.heartbeat(ledger, c)  # the lease is renewed from now
    assert batches(ledger)[c.batch_id].heartbeat_at == clock.now
    clock.advance(window - 1)
    assert jan.run_pass(one_shot=True).reclaimed == []
    clock.advance(2)
    assert jan.run_pass(one_shot=True).reclaimed == [c.batch_id]
    rows = files(ledger)
    assert all(rows[i].state == models.PENDING and "lease expired" in rows[i].last_error for i in ids_of(c))
    with pytest.raises(NotOwner):
        claim.heartbeat(ledger, c)


# -- attempts ---------------------------------------------------------------------------------------------
def test_past_max_attempts_a_file_fails_with_its_last_error(make_ledger):
    ledger, settings = make_ledger(1, max_attempts=2)
    c = claim.claim_batch(ledger, "w", settings)
    claim.fail_batch(ledger, c, "dorado exited 1", settings.max_attempts)
    assert (files(ledger)[1].state, files(ledger)[1].attempts) == (models.PENDING, 1)
    c = claim.claim_batch(ledger, "w", settings)
    claim.publish(ledger, c, [FileResult(c.files[0].rel, ok=False, error="3 reads in, none out")], None,
                  settings.max_attempts)
    row = files(ledger)[1]
    assert (row.state, row.attempts, row.last_error) == (models.FAILED, 2, "3 reads in, none out")
    assert claim.claim_batch(ledger, "w", settings) is None  # a failed file is never claimed again

    assert claim.retry_failed(ledger, None) == 1  # until the user asks
    row = files(ledger)[1]
    assert (row.state, row.attempts) == (models.PENDING, 0)


def test_reclaim_past_max_attempts_fails_the_file(make_ledger):
    ledger, settings = make_ledger(1, max_attempts=1)
    c = claim.claim_batch(ledger, "w", settings)
    janitor.reclaim(ledger, settings, c.batch_id, janitor.JanitorReport(), reason="worker vanished (test)")
    row = files(ledger)[1]
    assert (row.state, row.attempts, row.last_error) == (models.FAILED, 1, "reclaimed: worker vanished (test)")


# -- fencing tokens and the lock --------------------------------------------------------------------------
def test_batch_ids_rise_above_the_table_and_a_rebuilds_floor_and_a_reused_id_still_fences(make_ledger):
    ledger, settings = make_ledger(4)
    a = claim.claim_batch(ledger, "w", settings)
    b = claim.claim_batch(ledger, "w", settings)
    assert b.batch_id == a.batch_id + 1
    # A rebuild's floor (every id the lost ledger may have handed out): the next id is above it. It lives in
    # the database header, not in a counter row of its own (AUTOINCREMENT's sqlite_sequence: a page per claim).
    ledger.transact(lambda conn: db.set_batch_id_floor(conn, 40))
    c = claim.claim_batch(ledger, "w", settings)
    assert c.batch_id == 41 and ledger.transact(db.batch_ids_handed_out) == 41
    assert ledger.transact(lambda conn: conn.exec_driver_sql(
        "SELECT count(*) FROM sqlite_sequence WHERE name = 'batches'").scalar()) == 0
    assert sqlite3.connect(ledger.path).execute("PRAGMA user_version").fetchone()[0] == 40
    # ledgerbc never deletes a batch row. Deleted by hand, its id can be handed out again, with another
    # nonce: the worker that holds the old claim is fenced all the same.
    claim.release_batch(ledger, c, "test")
    ledger.transact(lambda conn: conn.execute(sa.delete(Batch).where(Batch.id == c.batch_id)))
    d = claim.claim_batch(ledger, "w", settings)
    assert d.batch_id == c.batch_id and d.token != c.token
    with pytest.raises(NotOwner, match="another fencing token"):
        claim.heartbeat(ledger, c)
    with pytest.raises(NotOwner):
        claim.publish(ledger, c, [FileResult(f.rel, ok=True) for f in c.files], None, 3)
    assert {f.rel for f in d.files} <= {r.rel_path for r in files(ledger).values() if r.state == models.CLAIMED}


def test_every_transaction_waits_for_the_lock_file(make_ledger):
    ledger, _settings = make_ledger(1)
    impatient = type(ledger)(ledger.path, lock_timeout=0.3)
    other = filelock.UnixFileLock(str(ledger.lock_path))  # another holder (flock is per open file)
    with other:
        with pytest.raises(LockTimeout):
            impatient.transact(lambda conn: conn.execute(sa.select(sa.func.count()).select_from(Pod5File)).scalar())
    assert impatient.transact(lambda conn: conn.execute(sa.select(sa.func.count()).select_from(Pod5File)).scalar()) == 1


def test_ledger_uses_a_rollback_journal_and_full_sync(make_ledger):
    ledger, _settings = make_ledger(1)
    mode, sync = ledger.transact(
        lambda conn: (conn.exec_driver_sql("PRAGMA journal_mode").scalar(),
                      conn.exec_driver_sql("PRAGMA synchronous").scalar())
    )
    assert mode.lower() in ("delete", "truncate", "persist") and sync == 2  # never WAL on a shared filesystem; 2 = FULL
    assert mode.lower() == db.JOURNAL_MODE.lower()


def test_a_process_frozen_in_the_turnstile_delays_others_briefly_not_forever(make_ledger, monkeypatch):
    """The turnstile (db._Turnstile) only orders waiters. A process stopped while holding it (SIGSTOP: a
    suspended job) makes each other process wait at most TURN_WAIT once, then poll the lock directly."""
    from ledgerbc import db

    ledger, _settings = make_ledger(3)
    monkeypatch.setattr(db, "TURN_WAIT", 0.3)
    frozen = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time\n"
         "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\nfcntl.flock(fd, fcntl.LOCK_EX)\n"
         "print('held', flush=True)\ntime.sleep(60)", str(ledger.path) + ".turnstile"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert frozen.stdout.readline().strip() == "held"
        os.kill(frozen.pid, signal.SIGSTOP)
        other = type(ledger)(ledger.path)
        count = lambda conn: conn.execute(sa.select(sa.func.count()).select_from(Pod5File)).scalar()  # noqa: E731
        waits = []  # each wait in the kernel for the turnstile: did it get its turn?
        real_wait = db._flock_blocking
        monkeypatch.setattr(db, "_flock_blocking", lambda fd, until: waits.append(real_wait(fd, until)) or waits[-1])
        assert other.transact(count) == 3
        assert waits == [False]  # it waited for its turn once, in vain (the holder is frozen)...
        for _ in range(5):
            assert other.transact(count) == 3
        assert waits == [False]  # ...then stopped waiting for the frozen holder
    finally:
        os.kill(frozen.pid, signal.SIGKILL)
        frozen.wait()


def _mountinfo_with(tmp_path, folder, fstype: str, source: str) -> str:
    """A mount table: `/` on ext4, `folder` a mount point of `fstype`."""
    info = tmp_path / f"mountinfo-{fstype}"
    info.write_text("1 0 0:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw\n"
                    f"2 1 0:2 / {os.path.realpath(folder)} rw,relatime shared:2 - {fstype} {source} rw\n")
    return str(info)


@pytest.mark.parametrize("fstype, source, in_kernel", [
    ("fuse.glusterfs", "server:/vol", False), ("nfs4", "server:/export", False), ("lustre", "mgs@tcp:/fs", False),
    ("fuse.unknownfs", "x", False), ("ext4", "/dev/vda2", True), ("xfs", "/dev/sdb1", True),
])
def test_lock_waits_sleep_in_the_kernel_only_on_a_local_filesystem(make_ledger, monkeypatch, tmp_path,
                                                                   fstype, source, in_kernel):
    """A blocking flock interrupted by a signal wedges a GlusterFS volume (docs/locking.md): with the ledger
    off a local filesystem, a process waiting for its turn or for the ledger lock makes no blocking flock on
    the ledger's folder, however long the wait and whatever signals it gets meanwhile; it queues in the
    kernel only behind the other processes of its host, on a local file (db.host_queue_path). With the
    ledger on ext4/xfs it sleeps in the kernel on the ledger's turnstile itself."""
    from ledgerbc import db, mounts

    ledger, _settings = make_ledger(1)
    monkeypatch.setattr(mounts, "MOUNTINFO", _mountinfo_with(tmp_path, ledger.path.parent, fstype, source))
    monkeypatch.setattr(db, "TURN_WAIT", 0.05)
    kernel_waits = []  # the file of every blocking flock
    real_wait = db._flock_blocking
    monkeypatch.setattr(db, "_flock_blocking", lambda fd, until: kernel_waits.append(
        os.readlink(f"/proc/self/fd/{fd}")) or real_wait(fd, until))
    waiter = type(ledger)(ledger.path)
    holder = subprocess.Popen(  # holds the turnstile, then the ledger lock, for 0.3 s each
        [sys.executable, "-c", "import fcntl, os, sys, time\n"
         "for path in sys.argv[1:]:\n"
         "    fd = os.open(path, os.O_RDWR | os.O_CREAT)\n    fcntl.flock(fd, fcntl.LOCK_EX)\n"
         "    print('held', flush=True)\n    time.sleep(0.3)\n    os.close(fd)\n",
         str(ledger.path) + ".turnstile", str(ledger.lock_path)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        signal.signal(signal.SIGUSR1, lambda *_: None)
        timer = threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGUSR1))  # a signal in the middle of the wait
        timer.start()
        assert waiter.transact(lambda c: c.exec_driver_sql("SELECT count(*) FROM pod5_files").scalar()) == 1
        assert holder.wait(10) == 0
    finally:
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        holder.kill()
        holder.wait()
    on_ledger_folder = [f for f in kernel_waits if Path(f).parent == ledger.path.parent]
    assert bool(on_ledger_folder) is in_kernel, (fstype, kernel_waits)
    if not in_kernel:
        assert kernel_waits == [str(db.host_queue_path(ledger.path))], kernel_waits
    assert mounts.kernel_lock_wait_is_safe(ledger.path.parent) is in_kernel


def test_the_host_queue_of_a_network_ledger_is_local_and_one_per_ledger(tmp_path):
    from ledgerbc import db, mounts

    a, b = db.host_queue_path(tmp_path / "a" / "ledgerbc.db"), db.host_queue_path(tmp_path / "b" / "ledgerbc.db")
    assert a != b and a == db.host_queue_path(tmp_path / "a" / "ledgerbc.db")
    assert mounts.kernel_lock_wait_is_safe(a.parent), f"{a.parent} is not on a local filesystem here"


def test_processes_take_turns_at_the_lock(make_ledger):
    """Under contention every process gets its turn (the turnstile): 6 processes, 60 transactions each,
    all finish, and the ledger counts every one of them (no lost update)."""
    ledger, _settings = make_ledger(1)
    script = (
        "import sys\nfrom ledgerbc.db import Ledger\nL = Ledger(sys.argv[1])\n"
        "for _ in range(60):\n"
        "    L.transact(lambda c: c.exec_driver_sql('UPDATE pod5_files SET attempts = attempts + 1'))\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", script, str(ledger.path)]) for _ in range(6)]
    assert [p.wait(120) for p in procs] == [0] * 6
    assert ledger.transact(lambda c: c.exec_driver_sql("SELECT attempts FROM pod5_files").scalar()) == 360
