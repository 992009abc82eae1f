"""What makes "no server" safe (DESIGN §4): expiry, reclaim, cleanup, reconcile, rebuild.

Expiry never decides correctness (the batch id fences zombies); it only decides when work is redone.
A janitor inside a long-lived worker reclaims a batch only when the batch's heartbeat is older than
lease + clock skew AND the janitor itself reached the ledger without a stall for that whole window
(`Ledger.contact_since`), so a node that was cut off from the filesystem does not come back and
mass-reclaim live work. `ledgerbc recover` (one-shot) judges by heartbeat age alone.
"""

import logging
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa

from . import claim, lease, models, split
from .layout import Layout
from .models import CLAIMED, DONE, PENDING, RUNNING, Batch, Pod5File

log = logging.getLogger("ledgerbc.janitor")

CREW = 4  # janitor passes per heartbeat interval across all busy workers (Janitor.maybe_run)
RECLAIMED = "reclaimed: "  # the last error of files taken back from a worker that went silent


@dataclass
class JanitorReport:
    reclaimed: list[int] = field(default_factory=list)  # batch ids
    files_returned: int = 0
    files_found_published: int = 0
    cleaned: list[str] = field(default_factory=list)
    reconciled_pending: list[str] = field(default_factory=list)  # done in ledger, output missing
    reconciled_done: list[str] = field(default_factory=list)  # output on disk, ledger did not know

    def lines(self) -> list[str]:
        out = [f"reclaimed batch {b}" for b in self.reclaimed]
        if self.files_returned:
            out.append(f"{self.files_returned} files of reclaimed batches returned to pending (or failed)")
        if self.files_found_published:
            out.append(f"{self.files_found_published} files of reclaimed batches were already published: done")
        out += [f"removed {c}" for c in self.cleaned]
        out += [f"output missing, pending again: {r}" for r in self.reconciled_pending]
        out += [f"output found, marked done: {r}" for r in self.reconciled_done]
        return out or ["nothing to do"]


class Janitor:
    def __init__(self, ledger, settings):
        self.ledger = ledger
        self.settings = settings
        self.layout = Layout(Path(settings.output_dir))
        self._last_pass = None
        self._workers = 1  # workers with running batches, as of the last pass
        self._jitter = random.uniform(0.5, 1.5)
        # The stall rule is the janitor's own: longer than a heartbeat (+ skew) without reaching the
        # ledger restarts its contact window, whoever created the Ledger handle.
        ledger.stall_gap = min(ledger.stall_gap, settings.heartbeat + settings.clock_skew)

    @property
    def window(self) -> float:
        return self.settings.lease + self.settings.clock_skew

    def maybe_run(self, shared: bool = True) -> JanitorReport | None:
        """A pass when one is due: cheap enough to call from every loop turn.

        A lone janitor (the watchman, `shared=False`) passes once per heartbeat interval. Busy workers share
        the job: each passes once per heartbeat x (workers with running batches / CREW), jittered, so the
        whole cluster makes about CREW passes per interval however many GPUs it has, instead of one per
        worker (two transactions and a listing of work/ each: 1,000 workers would take the lock ~30 times
        a second for nothing). An expired batch is still found within about a heartbeat interval.
        """
        now = time.monotonic()
        interval = self.settings.heartbeat
        if shared:
            interval *= max(1.0, self._workers / CREW) * self._jitter
        if self._last_pass is not None and now - self._last_pass < interval:
            return None
        self._last_pass = now
        self._jitter = random.uniform(0.5, 1.5)
        try:
            return self.run_pass()
        except OSError as exc:
            # A file or folder another client removed meanwhile (ESTALE on a network filesystem): the chore is
            # retried at the next pass; a janitor's hiccup must never end a worker.
            log.warning("janitor pass cut short: %s", exc)
            return None

    def run_pass(self, one_shot: bool = False, force: bool = False) -> JanitorReport:
        report = JanitorReport()
        # Touch the ledger first, so a stall just ended shows up as a fresh contact window.
        running = self.ledger.transact(_running_batches)
        self._workers = len({b.worker_id for b in running})
        now = self.ledger.clock()
        trusted = one_shot or force or (
            self.ledger.contact_since is not None and now - self.ledger.contact_since >= self.window
        )
        if trusted:
            # The ledger's heartbeat first; only a batch silent there too has its lease file read.
            expired = [
                b.id for b in running
                if force or (now - b.heartbeat_at > self.window
                             and now - lease.last_beat(self.ledger.path, b.id, lease.owner(b.worker_id, b.token), b.heartbeat_at) > self.window)
            ]
            for batch_id in expired:
                reclaim(self.ledger, self.settings, batch_id, report, force=force)
        cleanup(self.ledger, self.layout, report)
        lease.remove_stale(self.ledger.path, {b.id for b in running} - set(report.reclaimed))
        return report


def _running_batches(conn):
    return conn.execute(
        sa.select(Batch.id, Batch.worker_id, Batch.heartbeat_at, Batch.token).where(Batch.state == RUNNING)).all()


def reclaim(ledger, settings, batch_id: int, report: JanitorReport, force: bool = False, reason: str | None = None):
    """Take an expired batch back: files already published are done, the others pending with attempts+1."""
    layout = Layout(Path(settings.output_dir))
    window = settings.lease + settings.clock_skew

    def txn(conn):
        now = ledger.clock()
        row = conn.execute(sa.select(Batch.worker_id, Batch.heartbeat_at, Batch.state, Batch.token)
                           .where(Batch.id == batch_id)).first()
        # Re-check inside the transaction: the worker may have heartbeaten since we looked (ledger or lease file).
        if row is None or row.state != RUNNING:
            return None
        beat = lease.last_beat(ledger.path, batch_id, lease.owner(row.worker_id, row.token), row.heartbeat_at)
        if not force and reason is None and now - beat <= window:
            return None
        files = conn.execute(
            sa.select(Pod5File.id, Pod5File.rel_path).where(Pod5File.batch_id == batch_id, Pod5File.state == CLAIMED)
        ).all()
        published, others = [], []
        for f in files:
            # Its owner renamed outputs into place and died before the commit: the output is complete.
            (published if layout.pass_path(f.rel_path, settings.emit).exists() else others).append(f)
        for f in published:
            _mark_done_from_disk(conn, layout, settings.emit, f.id, f.rel_path, now)
        # Outputs its owner renamed before it died (a publication cut short) of files that are not done: gone
        # with the batch, under the lock, before anyone can claim and publish the file again.
        barcodes = layout.barcode_dirs() if others else ()
        for f in others:
            for partial in layout.outputs_of(f.rel_path, settings.emit, barcodes):
                partial.unlink(missing_ok=True)
        why = RECLAIMED + (reason or f"lease expired: worker {row.worker_id} silent for {now - beat:.0f}s")
        claim.return_files(conn, batch_id, [f.id for f in others], why, True, settings.max_attempts, isolate=False)
        conn.execute(
            sa.update(Batch).where(Batch.id == batch_id).values(state=models.RECLAIMED, finished_at=now, error=why)
        )
        claim.event(conn, now, "batch-reclaimed", row.worker_id, batch_id, why)
        return len(others), len(published)

    outcome = ledger.transact(txn)
    if outcome is None:
        return  # still running and alive, or already over
    lease.remove(ledger.path, batch_id)
    returned, published = outcome
    if returned or published:
        report.reclaimed.append(batch_id)
        report.files_returned += returned
        report.files_found_published += published
        log.warning("reclaimed batch %s (%d files back, %d already published)", batch_id, returned, published)


def _mark_done_from_disk(conn, layout, emit, file_id, rel, now):
    passed, failed = split.count_published(layout.pass_path(rel, emit), layout.fail_path(rel, emit))
    conn.execute(
        sa.update(Pod5File).where(Pod5File.id == file_id)
        .values(state=DONE, reads_pass=passed, reads_fail=failed, done_at=now, last_error=None)
    )


def reclaim_own_stale(ledger, settings, worker_id: str) -> list[int]:
    """At start: batches still running under this worker id belong to a dead earlier incarnation."""
    running = ledger.transact(_running_batches)
    report = JanitorReport()
    for b in running:
        if b.worker_id == worker_id:
            reclaim(ledger, settings, b.id, report, reason=f"worker {worker_id} restarted")
    return report.reclaimed


def cleanup(ledger, layout: Layout, report: JanitorReport) -> None:
    """Remove ASSIGNED folders and staging of batches that are over (never of a running one)."""
    on_disk = {batch_id: path for batch_id, _w, path in layout.assigned_dirs()}
    for batch_id, _path in layout.staging_dirs():
        on_disk.setdefault(batch_id, None)
    if not on_disk:
        return
    states = dict(
        ledger.transact(lambda conn: conn.execute(sa.select(Batch.id, Batch.state).where(Batch.id.in_(list(on_disk)))).all())
    )
    for batch_id in on_disk:
        if states.get(batch_id) in (None, RUNNING):
            continue  # unknown to this ledger (a rebuild will adopt it) or still running
        for path in layout.assigned_dirs_for(batch_id) + [p for b, p in layout.staging_dirs() if b == batch_id]:
            if path.exists():
                shutil.rmtree(path, ignore_errors=True)
                report.cleaned.append(str(path.relative_to(layout.output)))


def nothing_left(ledger) -> bool:
    """No file pending or claimed, no batch running: the run is over (outside follow mode)."""

    def txn(conn):
        busy = conn.execute(
            sa.select(sa.func.count()).select_from(Pod5File).where(Pod5File.state.in_((PENDING, CLAIMED)))
        ).scalar_one()
        running = conn.execute(sa.select(sa.func.count()).select_from(Batch).where(Batch.state == RUNNING)).scalar_one()
        return busy == 0 and running == 0

    return ledger.transact(txn)


def reconcile(ledger, settings, report: JanitorReport) -> None:
    """Make the ledger agree with pass/: done without output -> pending; output the ledger missed -> done."""
    layout = Layout(Path(settings.output_dir))
    rows = ledger.transact(
        lambda conn: conn.execute(
            sa.select(Pod5File.id, Pod5File.rel_path, Pod5File.state, Pod5File.batch_id)
        ).all()
    )
    running = {b.id for b in ledger.transact(_running_batches)}
    lost, found = [], []
    for r in rows:
        exists = layout.pass_path(r.rel_path, settings.emit).exists()
        if r.state == DONE and not exists:
            lost.append(r)
        elif exists and (r.state == PENDING or r.state == models.FAILED or (r.state == CLAIMED and r.batch_id not in running)):
            found.append(r)

    def txn(conn):
        now = ledger.clock()
        for r in lost:
            conn.execute(
                sa.update(Pod5File).where(Pod5File.id == r.id, Pod5File.state == DONE)
                .values(state=PENDING, batch_id=None, reads_pass=None, reads_fail=None, bases=None, done_at=None)
            )
        for r in found:
            _mark_done_from_disk(conn, layout, settings.emit, r.id, r.rel_path, now)
        if lost or found:
            claim.event(conn, now, "reconcile", message=f"{len(lost)} lost outputs, {len(found)} found outputs")

    ledger.transact(txn)
    report.reconciled_pending += [r.rel_path for r in lost]
    report.reconciled_done += [r.rel_path for r in found]


def recover(ledger, force: bool = False) -> JanitorReport:
    """`ledgerbc recover`: a one-shot janitor pass (heartbeat age alone, or every batch with force), then
    reconcile the ledger with the outputs on disk."""
    settings = ledger.read_settings()
    janitor = Janitor(ledger, settings)
    report = janitor.run_pass(one_shot=True, force=force)
    reconcile(ledger, settings, report)
    return report

