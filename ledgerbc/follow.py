"""Follow mode (`ledgerbc run --follow`, DESIGN §7): basecall a run while the sequencer still writes it.

A worker started with `--follow` has a `Follower`; its loop calls `Follower.step(idle_since)` whenever it
could not claim anything. A step:

- scans INPUT_DIR, only in the worker holding the SCANNER role (`take_scanner_role`), at most once per
  `scan_interval` across all workers, with a `Scanner` kept on the worker, so known unchanged files are
  only stat'ed, never reopened;
- looks for the run's `final_summary_*.txt` (MinKNOW writes it when acquisition ends); once it exists
  the scanner admits complete files without waiting for the settle time and fails at once any file
  still incomplete, and the summary is recorded in the ledger (a `final-summary` event) for every
  worker and for `status`;
- fails files that vanished while waiting, once the summary exists (they can no longer complete);
- decides whether the run is over (`RunState.end_reason`); then the worker leaves, except a single
  watchman while batches still run elsewhere (as when draining without --follow);
- otherwise says the worker is alive and naps (the nap honours SIGTERM).

Completeness, the end of a run and the rate limits are described in docs/follow.md.
"""

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa

from . import claim, roles
from .models import (
    CLAIMED, DONE, DUPLICATE, FAILED, PENDING, RUNNING, WAITING, Batch, Event, Pod5File, Role,
)
from .scan import Scanner

log = logging.getLogger("ledgerbc.follow")

MIN_SCAN_INTERVAL = 3.0  # seconds: the floor of the scan rate, whatever the settle time
MAX_SETTLE_SHARE = 60.0  # settle/4 is the interval up to this; a long settle needs no slower scans
SCAN_COST_FACTOR = 4  # the next scan waits at least 4x the last one's duration (a walk of 100k files
#                       on a network filesystem can take tens of seconds: keep the metadata load bounded)
SHORT_RUN_GRACE = 300.0  # summary found but fewer files than it counts: end after this long idle
SUMMARY_GLOB_PREFIX = "final_summary_"
SUMMARY_KEY = "pod5_files_in_final_dest"
# INPUT_DIR names under a MinKNOW run folder: the final summary is then in the parent.
RUN_SUBFOLDERS = ("pod5", "pod5_pass", "pod5_fail", "pod5_skip")
SUMMARY_EVENT = "final-summary"


# -- the run's final summary ------------------------------------------------------------------------------
@dataclass(frozen=True)
class FinalSummary:
    paths: tuple[str, ...]
    expected_files: int | None  # sum of pod5_files_in_final_dest; None when a summary lacks it


def summary_folders(input_dir) -> list[Path]:
    """Where a run's final summary may be: INPUT_DIR, and its parent when INPUT_DIR is the run's pod5 folder.

    Subfolders are not searched: a folder holding several runs has several summaries, and one run's end
    is not the end of the input (use --idle-exit there).
    """
    input_dir = Path(input_dir)
    folders = [input_dir]
    if input_dir.name in RUN_SUBFOLDERS:
        folders.append(input_dir.parent)
    return folders


def parse_expected_files(text: str) -> int | None:
    """`pod5_files_in_final_dest=N` of a final summary's key=value lines, else None."""
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() == SUMMARY_KEY:
            try:
                return int(value.strip())
            except ValueError:
                return None
    return None


def find_final_summary(input_dir) -> FinalSummary | None:
    """The run's `final_summary_*.txt` files (all of them: counts add up), or None when there is none yet."""
    paths, total = [], 0
    for folder in summary_folders(input_dir):
        try:
            names = sorted(
                e.name for e in os.scandir(folder)
                if e.name.startswith(SUMMARY_GLOB_PREFIX) and e.name.endswith(".txt") and e.is_file()
            )
        except OSError:
            continue
        for name in names:
            path = folder / name
            try:
                n = parse_expected_files(path.read_text(encoding="utf-8", errors="replace"))
            except OSError:
                continue
            paths.append(str(path))
            total = None if n is None or total is None else total + n
    return FinalSummary(tuple(paths), total) if paths else None


def record_final_summary(ledger, summary: FinalSummary) -> None:
    """Tell every worker and `status` (a `final-summary` event; the latest one counts)."""
    message = json.dumps({"paths": list(summary.paths), SUMMARY_KEY: summary.expected_files})
    ledger.transact(
        lambda conn: conn.execute(sa.insert(Event).values(ts=ledger.clock(), kind=SUMMARY_EVENT, message=message))
    )


def recorded_final_summary(conn) -> FinalSummary | None:
    message = conn.execute(
        sa.select(Event.message).where(Event.kind == SUMMARY_EVENT).order_by(Event.id.desc()).limit(1)
    ).scalar_one_or_none()
    if message is None:
        return None
    data = json.loads(message)
    return FinalSummary(tuple(data.get("paths") or ()), data.get(SUMMARY_KEY))


# -- the state of the run, as the ledger sees it ------------------------------------------------------------
@dataclass
class RunState:
    counts: dict = field(default_factory=dict)  # files per state
    running: int = 0  # batches running
    last_activity: float | None = None  # newest file seen, waiting file changed or batch claimed
    summary: FinalSummary | None = None

    def n(self, state: str) -> int:
        return self.counts.get(state, 0)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def end_reason(self, idle_for: float, idle_exit: float | None) -> str | None:
        """Why the run is over for this worker, or None to keep following. `idle_for`: seconds without
        anything new seen or claimed. Pending work is never left: the caller claims it first."""
        if self.n(PENDING):
            return None
        if self.summary is not None:
            if self.n(WAITING):
                return None  # the next scan admits or fails them (acquisition is over)
            expected = self.summary.expected_files
            if expected is None or self.total >= expected:
                return "the run's final summary exists and every file was admitted"
            # Fewer files than the summary counts: a copy still arriving, or INPUT_DIR holds part of the run.
            grace = idle_exit if idle_exit is not None else SHORT_RUN_GRACE
            if idle_for >= grace:
                return (f"the final summary counts {expected} pod5 files but only {self.total} were seen, "
                        f"and nothing new came for {idle_for:.0f}s")
            return None
        if idle_exit is not None and idle_for >= idle_exit:
            return f"nothing new was seen or claimed for {idle_for:.0f}s (--idle-exit)"
        return None


def poll(conn, now: float, worker_id: str | None = None) -> RunState:
    """One short transaction: the run's state; marks `worker_id` alive (a follower has no batch to beat)."""
    t = Pod5File
    state = RunState()
    state.counts = dict(conn.execute(sa.select(t.state, sa.func.count()).group_by(t.state)).all())
    state.running = conn.execute(
        sa.select(sa.func.count()).select_from(Batch).where(Batch.state == RUNNING)
    ).scalar_one()
    # ids grow with insertion, so the newest row of each table is found by its primary key, not a scan
    newest_file = conn.execute(sa.select(t.added_at).order_by(t.id.desc()).limit(1)).scalar_one_or_none()
    newest_claim = conn.execute(sa.select(Batch.claimed_at).order_by(Batch.id.desc()).limit(1)).scalar_one_or_none()
    changing = conn.execute(sa.select(sa.func.max(t.stable_since)).where(t.state == WAITING)).scalar_one_or_none()
    times = [x for x in (newest_file, newest_claim, changing) if x is not None]
    state.last_activity = max(times) if times else None
    state.summary = recorded_final_summary(conn)
    if worker_id is not None:
        claim.touch_worker(conn, worker_id, now)
    return state


def scan_interval(settle: float, last_scan_seconds: float = 0.0) -> float:
    """Seconds between two scans: settle/4 (at most 60 s, at least 3 s), and at least 4x the last scan."""
    return max(MIN_SCAN_INTERVAL, min(settle / 4, MAX_SETTLE_SHARE), SCAN_COST_FACTOR * last_scan_seconds)


def take_scanner_role(conn, now: float, worker_id: str, ttl: float, interval: float) -> bool:
    """May `worker_id` scan now? If so it holds the SCANNER role, whose `heartbeat_at` is the last scan's start.

    The role follows `roles.take_role` (free, expired after `ttl`, or renewed by its holder) with two
    follow-mode rules: a holder busy basecalling (it owns a running batch) does not scan, so an idle worker
    takes the role over at once instead of after a whole ttl; and nobody scans within `interval` of the
    last scan, whoever made it, so handovers never make scans more frequent. Correctness never depends on
    this (a scan is idempotent); it bounds the load on the filesystem.
    """
    row = conn.execute(sa.select(Role.worker_id, Role.heartbeat_at).where(Role.name == roles.SCANNER)).first()
    if row is not None:
        if row.worker_id != worker_id and now - row.heartbeat_at <= ttl:
            busy = conn.execute(
                sa.select(sa.func.count()).select_from(Batch)
                .where(Batch.worker_id == row.worker_id, Batch.state == RUNNING)
            ).scalar_one()
            if not busy:
                return False  # a live scanner that is free to scan
        if now - row.heartbeat_at < interval:
            return False
        conn.execute(sa.update(Role).where(Role.name == roles.SCANNER).values(worker_id=worker_id, heartbeat_at=now))
    else:
        conn.execute(sa.insert(Role).values(name=roles.SCANNER, worker_id=worker_id, heartbeat_at=now))
    return True


def fail_vanished(conn, now: float, rels: list[str]) -> int:
    """Waiting files that are gone from INPUT_DIR after the run ended: failed (guarded: still waiting)."""
    if not rels:
        return 0
    error = "it disappeared from INPUT_DIR before it was complete, and the run's final summary exists"
    n = conn.execute(
        sa.update(Pod5File).where(Pod5File.rel_path.in_(rels), Pod5File.state == WAITING, Pod5File.batch_id.is_(None))
        .values(state=FAILED, last_error=error)
    ).rowcount
    if n:
        conn.execute(sa.insert(Event), [{"ts": now, "kind": "admission-failed", "message": f"{rel}: {error}"}
                                        for rel in rels[:100]])
    return n


# -- the step -------------------------------------------------------------------------------------------------
class Follower:
    """What one worker keeps between follow steps: its Scanner (the cache of known files), the scan schedule
    and what it knows of the final summary."""

    def __init__(self, worker):
        self.worker = worker
        self.settings = worker.settings
        self.scanner = Scanner(worker.ledger, worker.settings, follow=True)
        self.interval = scan_interval(self.settings.settle)
        self.next_scan = 0.0  # monotonic time of this worker's next scan attempt
        self.summary: FinalSummary | None = None  # as found on disk (or learnt from the ledger)
        self.recorded: FinalSummary | None = None  # as last written to the ledger
        self.state: RunState | None = None  # the last poll
        self.warned: set[str] = set()
        idle_exit = worker.opts.idle_exit
        if idle_exit is not None and idle_exit < 2 * self.settings.settle:
            log.warning("--idle-exit %.0fs is short next to the settle time (%.0fs): a file that pauses while "
                        "being written may be left behind", idle_exit, self.settings.settle)

    @property
    def role_ttl(self) -> float:
        return self.settings.lease + self.settings.clock_skew

    def step(self, idle_since: float) -> bool:
        w = self.worker
        if time.monotonic() >= self.next_scan:
            self.next_scan = time.monotonic() + self.interval
            if w.patiently(w.ledger.transact, take_scanner_role, w.ledger.clock(), w.worker_id,
                            self.role_ttl, self.interval):
                self._scan()
        self.state = state = w.patiently(w.ledger.transact, poll, w.ledger.clock(), w.worker_id)
        if state.n(PENDING):
            return False  # back to the loop, which claims it
        idle_for = time.monotonic() - idle_since
        if state.last_activity is not None:
            idle_for = min(idle_for, w.ledger.clock() - state.last_activity)
        reason = state.end_reason(idle_for, w.opts.idle_exit)
        if reason is not None:
            if (state.n(CLAIMED) or state.running) and w.watch():
                # Batches still run elsewhere: this worker is the one watchman that stays (it picks up
                # reclaimed work); the others go.
                return w.stop_requested
            roles.drop_role_quietly(w.ledger, roles.SCANNER, w.worker_id)
            log.info("following ends: %s (%d done, %d failed, %d duplicates)",
                     reason, state.n(DONE), state.n(FAILED), state.n(DUPLICATE))
            return True
        # Short naps: the janitor in this worker trusts its view only while it reaches the ledger at
        # least once per heartbeat (the stall rule), and pending work is claimed at the next turn.
        nap = min(self.settings.heartbeat, self.next_scan - time.monotonic())
        w.nap(max(0.5, min(nap, self.interval)))
        if w.stop_requested:
            roles.drop_role_quietly(w.ledger, roles.SCANNER, w.worker_id)
            return True
        return False

    def _scan(self) -> None:
        w = self.worker
        if self.summary is None or self.summary.expected_files is None:
            # Looked for before the walk: a file still incomplete after the summary exists will not complete.
            found = find_final_summary(self.settings.input_dir)
            in_ledger = self.state.summary if self.state is not None else None
            if found is not None:
                self.summary = found
            elif self.summary is None and in_ledger is not None:
                self.summary = in_ledger  # another scanner found it (this node may not see the file)
            if in_ledger is not None and in_ledger == self.summary:
                self.recorded = in_ledger  # already told
        self.scanner.acquisition_over = self.summary is not None
        started = time.monotonic()
        report = w.patiently(self.scanner.scan)
        took = time.monotonic() - started
        self.next_scan = time.monotonic() + scan_interval(self.settings.settle, took)
        if report.added or report.failed or report.duplicates:
            log.info("scan: %s (%.1fs)", report.summary(), took)
        for warning in report.warnings:
            if warning not in self.warned:
                self.warned.add(warning)
                log.warning("scan: %s", warning)
        if self.summary is None:
            return
        waiting = w.patiently(
            w.ledger.transact,
            lambda conn: list(conn.execute(sa.select(Pod5File.rel_path).where(Pod5File.state == WAITING)).scalars()),
        )
        root = Path(self.settings.input_dir)
        gone = [rel for rel in waiting if not (root / rel).exists()]
        if gone and w.patiently(w.ledger.transact, fail_vanished, w.ledger.clock(), gone):
            log.warning("%d waiting files vanished after the run ended: failed (e.g. %s)", len(gone), gone[0])
        if self.summary != self.recorded:
            # Recorded after the scan that honoured it, so a worker reading it sees every file there was.
            w.patiently(record_final_summary, w.ledger, self.summary)
            self.recorded = self.summary
            log.info("final summary found (%s): %s pod5 files in the run", ", ".join(self.summary.paths),
                     self.summary.expected_files if self.summary.expected_files is not None else "unknown")


# -- status ---------------------------------------------------------------------------------------------------
def status_section(conn, now: float, counts: dict) -> dict:
    """The `follow` section of `status --json` (see docs/follow.md). `counts`: files per state."""
    summary = recorded_final_summary(conn)
    scanner = conn.execute(sa.select(Role.worker_id, Role.heartbeat_at).where(Role.name == roles.SCANNER)).first()
    seen = sum(counts.values())
    expected = summary.expected_files if summary else None
    outstanding = counts.get(PENDING, 0) + counts.get(CLAIMED, 0) + counts.get(WAITING, 0)
    return {
        "scanner": scanner.worker_id if scanner else None,
        "last_scan_age_s": round(now - scanner.heartbeat_at, 1) if scanner else None,
        "final_summary": list(summary.paths) if summary else None,
        "expected_files": expected,
        "files_seen": seen,
        "files_done": counts.get(DONE, 0),
        "files_waiting": counts.get(WAITING, 0),
        "files_to_come": max(0, expected - seen) if expected is not None else None,
        "run_over": bool(summary) and outstanding == 0 and (expected is None or seen >= expected),
    }


def render_status(section: dict) -> str | None:
    """One line for the text status, or None when nothing was ever followed."""
    s = section
    if s["scanner"] is None and s["final_summary"] is None and not s["files_waiting"]:
        return None
    if s["final_summary"]:
        names = ", ".join(Path(p).name for p in s["final_summary"])
        expected = s["expected_files"] if s["expected_files"] is not None else "?"
        head = f"run ended ({names}): {s['files_seen']} of {expected} files seen"
    else:
        head = f"run in progress (no final summary yet): {s['files_seen']} files seen"
    line = f"follow:  {head}, {s['files_done']} done, {s['files_waiting']} waiting to complete"
    if s["scanner"]:
        line += f"; scanner {s['scanner']}, last scan {s['last_scan_age_s']:.0f}s ago"
    if s["run_over"]:
        line += "; nothing left to do"
    return line
