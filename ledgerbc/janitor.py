"""What makes "no server" safe (DESIGN §4): expiry, reclaim, cleanup, reconcile, rebuild.

Expiry never decides correctness (the batch id fences zombies); it only decides when work is redone.
A janitor inside a long-lived worker reclaims a batch only when the batch's heartbeat is older than
lease + clock skew AND the janitor itself reached the ledger without a stall for that whole window
(`Ledger.contact_since`), so a node that was cut off from the filesystem does not come back and
mass-reclaim live work. `ledgerbc recover` (one-shot) judges by heartbeat age alone.
"""

import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa

from . import claim, lease, models, published
from .db import batch_ids_handed_out
from .durable import remove_tree
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
    left: list[str] = field(default_factory=list)  # `recover --force`: running batches it did not take, and why
    cleaned: list[str] = field(default_factory=list)
    reconciled_pending: list[str] = field(default_factory=list)  # done in ledger, output missing
    reconciled_done: list[str] = field(default_factory=list)  # output on disk, ledger did not know
    outputs_recorded: int = 0  # done files from an older ledger whose outputs rows were read from disk
    summaries_written: int = 0  # of those (or of files marked done from disk): summaries written from outputs

    def lines(self) -> list[str]:
        out = [f"reclaimed batch {b}" for b in self.reclaimed]
        if self.files_returned:
            out.append(f"{self.files_returned} files of reclaimed batches returned to pending (or failed)")
        if self.files_found_published:
            out.append(f"{self.files_found_published} files of reclaimed batches were already published: done")
        out += self.left
        out += [f"removed {c}" for c in self.cleaned]
        out += [f"output missing, pending again: {r}" for r in self.reconciled_pending]
        out += [f"output found, marked done: {r}" for r in self.reconciled_done]
        if self.outputs_recorded:
            out.append(f"{self.outputs_recorded} done files had no outputs recorded (a ledger from before "
                       "schema 0003): recorded from disk")
        if self.summaries_written:
            out.append(f"{self.summaries_written} summaries written from their outputs (published before summaries)")
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
        """Reclaim expired batches (all but the visibly alive ones with `force`), then clean up work folders.

        `force` (`recover --force`, after a cluster-wide crash): every running batch whose lease was not
        renewed within `fresh_window` is taken back WITHOUT counting an attempt (its files did nothing
        wrong); a batch whose worker is visibly alive is left, and the report says so.
        """
        report = JanitorReport()
        # Touch the ledger first, so a stall just ended shows up as a fresh contact window.
        running = self.ledger.transact(_running_batches)
        self._workers = len({b.worker_id for b in running})
        now = self.ledger.clock()
        trusted = one_shot or force or (
            self.ledger.contact_since is not None and now - self.ledger.contact_since >= self.window
        )
        for b in running:
            if force:
                # a beat after `now` was read (the worker is alive, or the clocks differ a little) is age 0, not -0s
                age = max(0.0, now - lease.last_beat(self.ledger.path, b.id, lease.owner(b.worker_id, b.token),
                                                     b.heartbeat_at))
                if age <= fresh_window(self.settings):
                    report.left.append(f"left batch {b.id} of {b.worker_id} running: its lease was renewed {age:.0f}s "
                                       "ago (the worker is alive)")
                    continue
                reclaim(self.ledger, self.settings, b.id, report, force=True)
            # The ledger's heartbeat first; only a batch silent there too has its lease file read.
            elif trusted and now - b.heartbeat_at > self.window and now - lease.last_beat(
                    self.ledger.path, b.id, lease.owner(b.worker_id, b.token), b.heartbeat_at) > self.window:
                reclaim(self.ledger, self.settings, b.id, report)
        cleanup(self.ledger, self.layout, report)
        lease.remove_stale(self.ledger.path, {b.id for b in running} - set(report.reclaimed))
        return report


def fresh_window(settings) -> float:
    """How recently a batch's lease must have been renewed for `recover --force` to leave it: a live worker
    renews its lease file every heartbeat; two of them plus the clock skew allow for a slow one."""
    return 2 * settings.heartbeat + settings.clock_skew


def _running_batches(conn):
    return conn.execute(
        sa.select(Batch.id, Batch.worker_id, Batch.heartbeat_at, Batch.token).where(Batch.state == RUNNING)).all()


def reclaim(ledger, settings, batch_id: int, report: JanitorReport, force: bool = False, reason: str | None = None):
    """Take an expired batch back: files already published are done, the others pending with attempts+1
    (`force`: no attempt counted; `reason`: taken back whatever its heartbeat says).

    Three steps, so that nothing slow runs under the lock: a read of the batch's files; outside the lock,
    the outputs of those already published (their owner renamed them into place and died before its
    commit) are read and the leftovers of the others listed; then one transaction guarded by the batch's
    state, token and heartbeat applies it. A publication that landed in between makes it give up; the
    next pass starts again.
    """
    layout = Layout(Path(settings.output_dir))
    window = settings.lease + settings.clock_skew
    seen = ledger.transact(_batch_and_files, batch_id)
    if seen is None:
        return  # over already
    row, files = seen
    found, leftovers = {}, {}
    barcodes = layout.barcode_dirs() if published.barcoded(settings) else ()
    for f in files:
        got = published.read(layout, settings, f.rel_path, barcodes)
        if got is not None:
            found[f.id] = got
        else:
            leftovers[f.id] = [path for _k, _b, path in published.existing(layout, settings, f.rel_path, barcodes)]

    def txn(conn):
        now = ledger.clock()
        current = conn.execute(sa.select(Batch.worker_id, Batch.heartbeat_at, Batch.state, Batch.token)
                               .where(Batch.id == batch_id)).first()
        # Re-check inside the transaction: the worker may have heartbeaten since we looked (ledger or lease
        # file), or finished; a batch given the same id after a rebuild has another token.
        if current is None or current.state != RUNNING or current.token != row.token:
            return None
        beat = lease.last_beat(ledger.path, batch_id, lease.owner(current.worker_id, current.token), current.heartbeat_at)
        if force:
            if now - beat <= fresh_window(settings):
                return None
        elif reason is None and now - beat <= window:
            return None
        held = {r.id: r.rel_path for r in conn.execute(_CLAIMED_BY.where(Pod5File.batch_id == batch_id))}
        if set(held) != {f.id for f in files} or any(
                published.is_published(layout, settings, held[i]) for i in held if i not in found):
            return "again"  # files changed meanwhile (a publication cut short, a rebuild): next pass
        for file_id, got in found.items():
            published.mark_done(conn, file_id, got, now, CLAIMED, batch_id)
        # Outputs its owner renamed before it died (a publication cut short) of files that are not done: gone
        # with the batch, under the lock, before anyone can claim and publish the file again.
        for paths in leftovers.values():
            for path in paths:
                path.unlink(missing_ok=True)
        if force:
            why = RECLAIMED + "recover --force (no attempt counted)"
        else:
            why = RECLAIMED + (reason or f"lease expired: worker {current.worker_id} silent for {now - beat:.0f}s")
        claim.return_files(conn, batch_id, list(leftovers), why, not force, settings.max_attempts, isolate=False)
        conn.execute(
            sa.update(Batch).where(Batch.id == batch_id).values(state=models.RECLAIMED, finished_at=now, error=why)
        )
        claim.event(conn, now, "batch-reclaimed", current.worker_id, batch_id, why)
        return len(leftovers), len(found)

    outcome = ledger.transact(txn)
    if outcome is None or outcome == "again":
        return  # still running and alive, or already over, or changed under us
    lease.remove(ledger.path, batch_id)
    returned, done = outcome
    report.summaries_written += sum(1 for got in found.values() if got.regenerated)
    if returned or done:
        report.reclaimed.append(batch_id)
        report.files_returned += returned
        report.files_found_published += done
        log.warning("reclaimed batch %s (%d files back, %d already published)", batch_id, returned, done)


_CLAIMED_BY = sa.select(Pod5File.id, Pod5File.rel_path).where(Pod5File.state == CLAIMED)


def _batch_and_files(conn, batch_id):
    row = conn.execute(sa.select(Batch.worker_id, Batch.state, Batch.token).where(Batch.id == batch_id)).first()
    if row is None or row.state != RUNNING:
        return None
    return row, conn.execute(_CLAIMED_BY.where(Pod5File.batch_id == batch_id)).all()


def reclaim_own_stale(ledger, settings, worker_id: str) -> list[int]:
    """At start: batches still running under this worker id belong to a dead earlier incarnation."""
    running = ledger.transact(_running_batches)
    report = JanitorReport()
    for b in running:
        if b.worker_id == worker_id:
            reclaim(ledger, settings, b.id, report, reason=f"worker {worker_id} restarted")
    return report.reclaimed


def cleanup(ledger, layout: Layout, report: JanitorReport) -> None:
    """Remove ASSIGNED folders (also half-made ones: a worker died, or met a full disk, while linking) and
    staging of batches that are over (never of a running one)."""
    on_disk = {batch_id: path for batch_id, _w, path in layout.assigned_dirs()}
    others = list(layout.staging_dirs()) + list(layout.half_made_dirs())
    for batch_id, _path in others:
        on_disk.setdefault(batch_id, None)
    if not on_disk:
        return

    def view(conn):
        states = dict(conn.execute(sa.select(Batch.id, Batch.state).where(Batch.id.in_(list(on_disk)))).all())
        return states, batch_ids_handed_out(conn) or 0

    states, handed_out = ledger.transact(view)
    for batch_id in on_disk:
        state = states.get(batch_id)
        if state == RUNNING or (state is None and batch_id > handed_out):
            continue  # still running, or an id this ledger has not handed out yet (a rebuild may adopt it)
        # Over, or an id this ledger handed out but does not know: a worker that claimed it from a ledger lost
        # since, and linked its folder after the rebuild; its batch can never be published (seed 510).
        for path in layout.assigned_dirs_for(batch_id) + [p for b, p in others if b == batch_id]:
            if path.exists():
                remove_tree(path)
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
    """Make the ledger agree with the published outputs (their done markers, published.py):

    - done in the ledger, done marker gone: pending again (its leftover outputs removed);
    - done marker present, ledger does not know (pending, failed, or claimed by a batch that is over):
      done, with its `outputs` rows;
    - done, but no `outputs` rows (a ledger from before schema 0003): the rows are read from disk.

    One read transaction, then the files are looked at outside the lock, then one short transaction
    applies each change guarded by the state and batch the file was seen in: a file claimed meanwhile
    is never marked done, a file published meanwhile never made pending.
    """
    layout = Layout(Path(settings.output_dir))
    rows, running, recorded = ledger.transact(_reconcile_view)
    barcodes = layout.barcode_dirs() if published.barcoded(settings) else ()
    lost, found, backfill = [], [], []
    for r in rows:
        if r.state not in (DONE, PENDING, models.FAILED, CLAIMED):
            continue  # waiting, duplicate, gone: never basecalled here
        if r.state == CLAIMED and r.batch_id in running:
            continue  # its batch's own publication or reclaim decides
        marked = published.is_published(layout, settings, r.rel_path)
        if r.state == DONE and not marked:
            lost.append((r, [p for _k, _b, p in published.existing(layout, settings, r.rel_path, barcodes)]))
        elif marked and (r.state != DONE or r.id not in recorded):
            got = published.read(layout, settings, r.rel_path, barcodes)
            if got is not None:
                (found if r.state != DONE else backfill).append((r, got))

    def txn(conn):
        now = ledger.clock()
        out = [], [], []
        for r, leftovers in lost:
            if published.mark_pending(conn, r.id, r.batch_id, leftovers):
                out[0].append(r)
        over = {b for b, state in conn.execute(sa.select(Batch.id, Batch.state)
                                               .where(Batch.id.in_({r.batch_id for r, _g in found if r.batch_id})))
                if state != RUNNING}
        for r, got in found:
            if r.state == CLAIMED and r.batch_id not in over:
                continue  # its batch was adopted again (a rebuild) meanwhile
            if published.mark_done(conn, r.id, got, now, r.state, r.batch_id):
                out[1].append((r, got))
        for r, got in backfill:
            if published.mark_done(conn, r.id, got, now, DONE, r.batch_id):
                out[2].append((r, got))
        if out[0] or out[1]:
            claim.event(conn, now, "reconcile", message=f"{len(out[0])} lost outputs, {len(out[1])} found outputs")
        if out[2]:
            claim.event(conn, now, "reconcile", message=f"{len(out[2])} done files: outputs recorded from disk")
        return out

    if not (lost or found or backfill):
        return
    pending, done, recorded_now = ledger.transact(txn)
    report.reconciled_pending += [r.rel_path for r in pending]
    report.reconciled_done += [r.rel_path for r, _g in done]
    report.outputs_recorded += len(recorded_now)
    report.summaries_written += sum(1 for _r, got in done + recorded_now if got.regenerated)


def _reconcile_view(conn):
    rows = conn.execute(sa.select(Pod5File.id, Pod5File.rel_path, Pod5File.state, Pod5File.batch_id)).all()
    running = set(conn.execute(sa.select(Batch.id).where(Batch.state == RUNNING)).scalars())
    recorded = set(conn.execute(sa.select(models.Output.file_id).distinct()).scalars())
    return rows, running, recorded


def recover(ledger, force: bool = False) -> JanitorReport:
    """`ledgerbc recover`: a one-shot janitor pass (heartbeat age alone, or every batch with force), then
    reconcile the ledger with the outputs on disk."""
    settings = ledger.read_settings()
    janitor = Janitor(ledger, settings)
    report = janitor.run_pass(one_shot=True, force=force)
    reconcile(ledger, settings, report)
    return report

