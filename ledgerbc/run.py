"""The worker loop (`ledgerbc run`, what slurm_array.sh execs).

claim a batch -> link its files into work/ASSIGNED_<batch>_<worker>/ -> run dorado on that folder while
heartbeating -> split dorado's BAM per source pod5 in staging -> publish (under the lock, only if the batch
is still ours) -> next. Signal handlers only set a flag; the loop honours it within about a second.
"""

import logging
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from . import claim, dorado, janitor, lease, pod5check, roles, split
from .durable import fsync_dir
from .errors import LedgerCorrupt, LedgerError, LedgerNotFound, LockTimeout, NotOwner
from .layout import Layout, link_name
from .slurm import default_worker_id, hostname

log = logging.getLogger("ledgerbc.run")

TICK = 1.0  # how often the loop looks at dorado, the stop flag and the clock
SIGNAL_GRACE = 2.0  # after dorado died of a signal: how long to wait for ours before failing the batch
EXIT_OK = 0
EXIT_STOPPED = 143  # stopped by SIGTERM/SIGINT after releasing its batch (128 + SIGTERM)
EXIT_LEDGER_LOST = 4


def default_batch_timeout(n_bytes: int) -> float:
    """Generous: 30 min of start-up and slack plus 1 s per 2 MB (a GPU does >10 MB/s)."""
    return 1800.0 + n_bytes / 2e6


@dataclass
class WorkerOptions:
    worker_id: str | None = None
    device: str | None = None
    follow: bool = False
    idle_exit: float | None = None
    max_batches: int | None = None


class Worker:
    def __init__(self, ledger, options: WorkerOptions, env=None, sleep=time.sleep):
        self.ledger = ledger
        self.opts = options
        self.worker_id = options.worker_id or default_worker_id()
        self.env = env
        self.sleep = sleep
        self.stop_requested = False
        self.settings = None
        self.layout = None
        self.janitor = None
        self.batches = 0
        self._beat = None  # lease.Heartbeat of the batch being worked on
        self._next = None  # the next batch, claimed in the transaction that published the last one

    # -- signals ---------------------------------------------------------------------------------
    def _on_signal(self, signum, _frame):
        self.stop_requested = True
        log.warning("signal %s: releasing the current batch and exiting", signal.Signals(signum).name)

    def install_signal_handlers(self):
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _nap(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while not self.stop_requested and time.monotonic() < end:
            self.sleep(min(TICK, max(0.0, end - time.monotonic())))

    def _patiently(self, fn, *args):
        """Call a ledger function, waiting out a missing, locked or rebuilt ledger for up to one lease."""
        deadline = time.monotonic() + (self.settings.lease if self.settings else 300)
        while True:
            try:
                return fn(*args)
            except (LedgerNotFound, LedgerCorrupt, LockTimeout) as exc:
                # A ledger already damaged when the worker starts is reported at once: only a rebuild fixes it.
                starting_on_corrupt = self.settings is None and isinstance(exc, LedgerCorrupt)
                if time.monotonic() > deadline or self.stop_requested or starting_on_corrupt:
                    raise
                log.warning("ledger unavailable (%s); waiting for it", exc)
                self._nap(min(5.0, max(0.5, self.settings.heartbeat / 4 if self.settings else 1)))

    # -- main loop ---------------------------------------------------------------------------------
    def run(self) -> int:
        from .mounts import refuse_unsafe_mount

        refuse_unsafe_mount(self.ledger.path.parent)  # before the first lock: NFS nolock, Lustre localflock...
        self.settings = self._patiently(self.ledger.read_settings)
        self.layout = Layout(Path(self.settings.output_dir))
        executable = dorado.find_executable(self.settings)
        self.janitor = janitor.Janitor(self.ledger, self.settings)
        claim.register_worker(self.ledger, self.worker_id, hostname(), os.getpid(), self.opts.device)
        janitor.reclaim_own_stale(self.ledger, self.settings, self.worker_id)
        code = EXIT_OK
        idle_since = time.monotonic()
        try:
            watching = False
            while not self.stop_requested:
                self._patiently(self.janitor.maybe_run, not watching)
                if self.opts.max_batches is not None and self.batches >= self.opts.max_batches:
                    break
                batch, self._next = self._next, None
                if batch is None:
                    batch = self._patiently(claim.claim_batch, self.ledger, self.worker_id, self.settings)
                if batch is not None and self.stop_requested:  # the signal came during the claim
                    claim.release_batch(self.ledger, batch.batch_id, self.worker_id, "worker stopped by signal")
                    break
                watching = False
                if batch is not None:
                    self.process(batch, executable)
                    self.batches += 1
                    idle_since = time.monotonic()
                    continue
                if self.opts.follow:
                    from .follow import follow_step

                    if follow_step(self, idle_since):
                        break
                    continue
                if not self._watch():
                    break
                watching = True  # the watchman passes once per heartbeat, not a share of the crew's rate
        except (LedgerNotFound, LedgerCorrupt, LockTimeout) as exc:
            log.error("giving up: %s", exc)
            code = EXIT_LEDGER_LOST
        finally:
            if self._next is not None:  # claimed with the last publication, then told to stop: give it back
                try:
                    claim.release_batch(self.ledger, self._next.batch_id, self.worker_id, "worker stopped")
                except LedgerError as exc:
                    log.warning("could not release batch %s: %s", self._next.batch_id, exc)
                self._next = None
            roles.drop_role_quietly(self.ledger, roles.WATCHMAN, self.worker_id)
            try:
                claim.worker_exited(self.ledger, self.worker_id, "stopped by signal" if self.stop_requested else "")
            except LedgerError:
                pass
        if self.stop_requested and code == EXIT_OK:
            code = EXIT_STOPPED
        return code

    def _watch(self) -> bool:
        """Nothing pending. Stay as the single watchman while batches run elsewhere; True to keep going."""
        if self._patiently(janitor.nothing_left, self.ledger):
            return False
        ttl = self.settings.lease + self.settings.clock_skew
        if not self._patiently(roles.take_role, self.ledger, roles.WATCHMAN, self.worker_id, ttl):
            # The watchman renews its role every few seconds. One that stopped renewing may be dead: stay until
            # its role expires and take over, or a dead watchman would strand a dead worker's batch.
            alive = self.settings.heartbeat + self.settings.clock_skew
            if self._patiently(roles.renewed_within, self.ledger, roles.WATCHMAN, alive):
                return False  # another worker watches: this GPU can go
        self._patiently(claim.worker_alive, self.ledger, self.worker_id)
        self._nap(min(self.settings.heartbeat, 5.0))
        return True

    # -- one batch ----------------------------------------------------------------------------------
    def process(self, batch: claim.Claim, executable: str) -> str:
        """Basecall one batch; returns 'done', 'failed', 'fenced' or 'stopped'. Never raises for a bad batch."""
        assigned = self.layout.assigned(batch.batch_id, self.worker_id)
        staging = self.layout.staging(batch.batch_id)
        proc = None
        try:
            links = self._link(batch, assigned)
            proc = dorado.DoradoProcess(
                dorado.build_argv(self.settings, assigned, self.opts.device, executable),
                staging / "calls.bam", self.layout.log(batch.batch_id), env=self.env,
            )
            outcome = self._supervise(batch, proc)
            if outcome == "exited":
                outcome = self._finish(batch, proc, links, staging)
        except NotOwner:
            outcome = "fenced"
        except (LedgerNotFound, LedgerCorrupt, LockTimeout):
            if proc is not None:
                proc.stop()  # giving up on the ledger: dorado (own session) must not outlive the worker
            raise  # ASSIGNED stays: a rebuild adopts it, and the batch then expires and is redone
        except LedgerError as exc:  # e.g. IllegalTransition: this batch is broken, the worker is not
            log.error("batch %s: %s", batch.batch_id, exc)
            try:
                outcome = self._fail(batch, f"ledger refused this batch's update: {exc}")
            except LedgerError:
                outcome = "failed"  # its lease will expire and a janitor will take it back
        except Exception as exc:  # one bad batch must never kill the worker
            log.exception("batch %s failed", batch.batch_id)
            outcome = self._fail(batch, f"ledgerbc could not process the batch: {type(exc).__name__}: {exc}")
        if proc is not None and proc.proc.poll() is None:
            proc.stop()  # the batch ended on an error while dorado ran: it must not run on, orphaned
        if outcome == "stopped":
            try:
                claim.release_batch(self.ledger, batch.batch_id, self.worker_id, "worker stopped by signal")
            except (NotOwner, LedgerError) as exc:
                log.warning("could not release batch %s: %s", batch.batch_id, exc)
        lease.remove(self.ledger.path, batch.batch_id)
        self._beat = None
        _remove(assigned)
        _remove(staging)
        log.info("batch %s: %s", batch.batch_id, outcome)
        return outcome

    def _link(self, batch, assigned: Path) -> dict[str, claim.ClaimedFile]:
        assigned.mkdir(parents=True, exist_ok=True)
        links = {}
        root = Path(self.settings.input_dir)
        for i, f in enumerate(batch.files):
            name = link_name(i, f.rel)
            target = assigned / name
            if not target.is_symlink():
                # Relative, so the link resolves through whichever mount of the shared filesystem a
                # reader (dorado here, or a rebuild on another node) uses.
                os.symlink(os.path.relpath(root / f.rel, assigned), target)
            links[name] = f
        return links

    def _supervise(self, batch, proc) -> str:
        """Wait for dorado, heartbeating; 'exited', 'stopped', 'fenced' or 'failed' (timeout)."""
        timeout = self.settings.batch_timeout or default_batch_timeout(batch.n_bytes)
        started = time.monotonic()
        next_beat = started + self.settings.heartbeat
        beat = self._heartbeat_of(batch)
        while True:
            if proc.poll(TICK) is not None:
                if proc.proc.returncode < 0 and not self.stop_requested:
                    # dorado died of a signal: scancel and Slurm signal every process of the task, and
                    # dorado (no handler) may die before our own SIGTERM lands. Wait for it briefly.
                    self._nap(SIGNAL_GRACE)
                return "stopped" if self.stop_requested else "exited"
            if self.stop_requested:
                proc.stop()
                return "stopped"
            now = time.monotonic()
            if now >= next_beat:
                next_beat = now + self.settings.heartbeat
                try:
                    beat.beat()
                except NotOwner:
                    log.warning("batch %s was reclaimed: stopping dorado, discarding its output", batch.batch_id)
                    proc.stop()
                    return "fenced"
                except LedgerError as exc:  # ledger briefly unreachable or being rebuilt: keep working
                    log.warning("heartbeat of batch %s failed: %s", batch.batch_id, exc)
                self._patiently(self.janitor.maybe_run)
            if now - started > timeout:
                proc.stop()
                return self._fail(batch, f"dorado timed out after {timeout:.0f}s (batch timeout)")

    def _finish(self, batch, proc, links, staging) -> str:
        rc = proc.proc.returncode
        errors = dorado.error_lines(proc.log_path)
        if rc != 0:
            detail = f"; {errors[-1]}" if errors else ""
            return self._fail(batch, f"dorado exited with status {rc}{detail} (log {proc.log_path})")
        def split_and_account():
            split_result = split.split_bam(
                proc.bam_path, {name: f.rel for name, f in links.items()}, staging,
                emit=self.settings.emit, min_qscore=self.settings.min_qscore,
            )
            return split_result, [self._account(name, f, split_result.files[name], errors) for name, f in links.items()]

        # Splitting a large BAM can take minutes: the lease is kept fresh meanwhile.
        result, results = self._heartbeating(batch, split_and_account)
        if result.foreign or result.untagged:
            log.warning("batch %s: dorado returned %d reads of files not in the batch and %d without fn",
                        batch.batch_id, sum(result.foreign.values()), result.untagged)

        def install():
            publish_outputs(self.layout, self.settings.emit, result, {r.file_id for r in results if r.ok}, links)

        # The next batch is claimed in the same transaction, unless this worker is about to stop.
        more = not self.stop_requested and (self.opts.max_batches is None or self.batches + 1 < self.opts.max_batches)
        self._next = self._patiently(
            claim.publish, self.ledger, batch.batch_id, self.worker_id, results, install, self.settings.max_attempts,
            self.settings if more else None,
        )
        return "done"

    def _heartbeating(self, batch, fn):
        """Run `fn()` in a thread while heartbeating the batch; NotOwner if it was reclaimed meanwhile."""
        box = {}

        def target():
            try:
                box["result"] = fn()
            except BaseException as exc:  # handed to the caller's thread below
                box["error"] = exc

        thread = threading.Thread(target=target, name=f"split-{batch.batch_id}", daemon=True)
        thread.start()
        fenced = None
        next_beat = time.monotonic() + self.settings.heartbeat
        beat = self._heartbeat_of(batch)
        while thread.is_alive():
            thread.join(TICK)
            if thread.is_alive() and fenced is None and time.monotonic() >= next_beat:
                next_beat = time.monotonic() + self.settings.heartbeat
                try:
                    beat.beat()
                except NotOwner as exc:
                    fenced = exc  # let the thread finish (it only writes to staging), then stop
                except LedgerError as exc:
                    log.warning("heartbeat of batch %s failed: %s", batch.batch_id, exc)
        if fenced is not None:
            raise fenced
        if "error" in box:
            raise box["error"]
        return box["result"]

    def _heartbeat_of(self, batch) -> lease.Heartbeat:
        """The batch's heartbeat (lease file, and the ledger every half lease); one per batch, kept across phases."""
        if self._beat is None or self._beat.batch_id != batch.batch_id:
            self._beat = lease.Heartbeat(self.ledger, self.settings, batch.batch_id, self.worker_id)
        return self._beat

    def _account(self, name, f: claim.ClaimedFile, out: split.FileOutput, errors: list[str]) -> claim.FileResult:
        """Reads in (pod5) against reads out (read id or pi parent) for one file."""
        try:
            ids_in = set(pod5check.read_ids(Path(self.settings.input_dir) / f.rel))
        except Exception as exc:  # damaged or replaced since the scan: this file fails, not its batch-mates
            said = [e for e in errors if name in e]
            why = f"; {said[-1]}" if said else ""
            return claim.FileResult(f.id, False, error=f"pod5 cannot be read any more ({type(exc).__name__}: {exc}){why}")
        extra = out.parent_ids - ids_in
        if extra:
            return claim.FileResult(f.id, False, error=f"dorado returned {len(extra)} reads that are not in this pod5")
        if ids_in and not out.parent_ids:
            said = [e for e in errors if name in e]
            why = said[-1] if said else "no [error] line named it"
            return claim.FileResult(f.id, False, error=f"dorado returned no reads for its {len(ids_in)} reads ({why})")
        return claim.FileResult(
            f.id, True, reads_pass=out.reads_pass, reads_fail=out.reads_fail,
            reads_missing=len(ids_in - out.parent_ids), bases=out.bases,
        )

    def _fail(self, batch, error: str) -> str:
        try:
            self._patiently(claim.fail_batch, self.ledger, batch.batch_id, self.worker_id, error, self.settings.max_attempts)
        except NotOwner:
            return "fenced"
        return "failed"


def publish_outputs(layout: Layout, emit: str, result: split.SplitResult, ok_ids: set[int], links) -> None:
    """Move staged outputs of the good files into pass/ and fail/. Idempotent: it may run twice."""
    touched = set()
    for name, f in links.items():
        if f.id not in ok_ids:
            continue
        out = result.files[name]
        final_pass = layout.pass_path(f.rel, emit)
        final_fail = layout.fail_path(f.rel, emit)
        if out.fail_path is not None:
            _install(out.fail_path, final_fail, touched)
        elif final_fail.exists():
            final_fail.unlink()  # left by an earlier attempt that published and then lost its batch
        # pass/ last: a pass/ file marks its input done (reclaim, rebuild), so its fail/ part must be in place.
        _install(out.pass_path, final_pass, touched)
    for folder in touched:
        fsync_dir(folder)


def _install(staged: Path | None, final: Path, touched: set) -> None:
    if staged is None or not staged.exists():
        if final.exists():
            return  # already moved by an earlier run of this same publication
        raise FileNotFoundError(f"staged output {staged} is missing")
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staged, final)
    touched.add(final.parent)


def _remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
