"""The worker loop (`ledgerbc run`, what slurm_array.sh execs).

    claim a batch -> BatchRun (batch.py: link, dorado, split, publish, which also claims the next) -> ...
    nothing pending -> stay as the one watchman while batches run elsewhere, or follow a live run
    (follow.py), or exit.

Signal handlers only set a flag (`StopFlag`); the loop and the batch honour it within about a second.
Exit codes (README): 0 done, 3 dorado's version unreadable, 4 ledger lost for a whole lease, 11 storage full,
13 this worker's dorado is not the study's (provenance.py), 143 stopped by a signal.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from . import claim, dorado, janitor, provenance, roles
from .batch import LEDGER_UNAVAILABLE, BatchRun, Crew
from .errors import BadInput, LedgerCorrupt, LedgerError, StorageFull
from .layout import Layout
from .slurm import default_worker_id, hostname

log = logging.getLogger("ledgerbc.run")

TICK = 1.0
EXIT_OK = 0
EXIT_LEDGER_LOST = 4
EXIT_STORAGE_FULL = 11
EXIT_STOPPED = 143  # stopped by SIGTERM/SIGINT after releasing its batch (128 + SIGTERM)
DEFAULT_PATIENCE = 300.0  # how long to wait for a missing ledger before its settings (and lease) are known


@dataclass
class WorkerOptions:
    worker_id: str | None = None
    device: str | None = None
    follow: bool = False
    idle_exit: float | None = None
    max_batches: int | None = None


class StopFlag:
    """Set by SIGTERM/SIGINT; naps end early when it is set."""

    def __init__(self, sleep=time.sleep):
        self.requested = False
        self.sleep = sleep

    def set(self, signum, _frame=None) -> None:
        self.requested = True
        log.warning("signal %s: releasing the current batch and exiting", signal.Signals(signum).name)

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self.set)
        signal.signal(signal.SIGINT, self.set)

    def nap(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while not self.requested and time.monotonic() < end:
            self.sleep(min(TICK, max(0.0, end - time.monotonic())))


def patiently(fn, *args, within: float, stop: StopFlag, pause: float = 1.0, **kwargs):
    """Call a ledger function, waiting out a missing, locked or rebuilt ledger for up to `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        try:
            return fn(*args, **kwargs)
        except LEDGER_UNAVAILABLE as exc:
            if time.monotonic() > deadline or stop.requested:
                raise
            log.warning("ledger unavailable (%s); waiting for it", exc)
            stop.nap(pause)


class Worker:
    """One worker: its settings, identity and dorado are known from the start (`Worker.open`)."""

    def __init__(self, ledger, settings, options: WorkerOptions, executable: str, env=None, stop: StopFlag | None = None):
        self.ledger = ledger
        self.settings = settings
        self.opts = options
        self.worker_id = options.worker_id or default_worker_id()
        self.env = env
        self.stop = stop or StopFlag()
        self.layout = Layout(Path(settings.output_dir))
        self.janitor = janitor.Janitor(ledger, settings)
        self.crew = Crew(ledger, settings, self.layout, self.worker_id, executable, options.device, env,
                         self.janitor, self.stop, self.patiently)
        self.batches = 0
        self.follower = None
        if options.follow:
            from .follow import Follower

            self.follower = Follower(self)

    @classmethod
    def open(cls, ledger, options: WorkerOptions, env=None, stop: StopFlag | None = None) -> "Worker":
        """Check the ledger's filesystem, read the study's settings (waiting out a ledger being rebuilt),
        find dorado; a ledger already damaged is reported at once (only a rebuild fixes it)."""
        from .mounts import refuse_unsafe_mount

        stop = stop or StopFlag()
        refuse_unsafe_mount(ledger.path.parent)  # before the first lock: NFS nolock, Lustre localflock...
        try:
            settings = ledger.read_settings()
        except LedgerCorrupt:
            raise
        except LEDGER_UNAVAILABLE:
            settings = patiently(ledger.read_settings, within=DEFAULT_PATIENCE, stop=stop)
        return cls(ledger, settings, options, dorado.find_executable(settings), env=env, stop=stop)

    def dorado_version(self) -> str:
        """This worker's `dorado --version`: what its outputs will say they were made with (DESIGN §5)."""
        version, said = dorado.query_version(self.crew.executable, env=self.env)
        if version is None:
            raise BadInput(f"{said}: this worker cannot tell which dorado would make its outputs. Check the dorado "
                           "installation (`ledgerbc doctor`).")
        return version

    @property
    def stop_requested(self) -> bool:
        return self.stop.requested

    def patiently(self, fn, *args, **kwargs):
        """A ledger call that waits out a missing or locked ledger (a rebuild in progress) for one lease."""
        pause = min(5.0, max(0.5, self.settings.heartbeat / 4))
        return patiently(fn, *args, within=self.settings.lease, stop=self.stop, pause=pause, **kwargs)

    def nap(self, seconds: float) -> None:
        self.stop.nap(seconds)

    # -- the loop --------------------------------------------------------------------------------------
    def run(self) -> int:
        version = self.dorado_version()
        self.settings.dorado_version = self.patiently(provenance.admit_worker, self.ledger, self.worker_id, version,
                                                      self.settings.output_dir)
        claim.register_worker(self.ledger, self.worker_id, hostname(), os.getpid(), self.opts.device,
                              gpus=self.crew.gpus, dorado_version=version)
        janitor.reclaim_own_stale(self.ledger, self.settings, self.worker_id)
        code, pending = EXIT_OK, None
        self._unstarted = None
        try:
            pending = self._loop()
        except LEDGER_UNAVAILABLE as exc:
            log.error("giving up: %s", exc)
            code = EXIT_LEDGER_LOST
        except StorageFull as exc:
            log.error("%s", exc)  # the one line saying which folder is full (no traceback, no second line)
            code = EXIT_STORAGE_FULL
        finally:
            # On any exit, also an unexpected one: give back a batch claimed and not started.
            self._leave(pending if pending is not None else self._unstarted, code)
        if self.stop.requested and code == EXIT_OK:
            code = EXIT_STOPPED
        return code

    def _loop(self) -> claim.Claim | None:
        """Claim and process batches until nothing is left (or a stop); returns a batch claimed but not
        started (the caller gives it back)."""
        watching = False
        idle_since = time.monotonic()
        batch = None
        while not self.stop.requested:
            self.patiently(self.janitor.maybe_run, not watching)
            if self.opts.max_batches is not None and self.batches >= self.opts.max_batches:
                return batch
            if batch is None:
                batch = self.patiently(claim.claim_batch, self.ledger, self.worker_id, self.settings)
            if batch is not None and self.stop.requested:  # the signal came during the claim
                return batch
            watching = False
            if batch is not None:
                more = self.opts.max_batches is None or self.batches + 1 < self.opts.max_batches
                job = BatchRun(self.crew, batch, more)
                try:
                    job.execute()
                finally:
                    self._unstarted = job.next  # claimed in the transaction that published this one
                self.batches += 1
                batch = job.next
                idle_since = time.monotonic()
                continue
            if self.follower is not None:
                if self.follower.step(idle_since):
                    return None
                continue
            if not self.watch():
                return None
            watching = True  # the watchman passes once per heartbeat, not a share of the crew's rate
        return batch

    def _leave(self, pending: claim.Claim | None, code: int) -> None:
        if pending is not None:  # claimed, then told to stop: give it back
            try:
                claim.release_batch(self.ledger, pending, "worker stopped")
            except LedgerError as exc:
                log.warning("could not release batch %s: %s", pending.batch_id, exc)
        roles.drop_role_quietly(self.ledger, roles.WATCHMAN, self.worker_id)
        reason = "stopped by signal" if self.stop.requested else ("storage full" if code == EXIT_STORAGE_FULL else "")
        try:
            claim.worker_exited(self.ledger, self.worker_id, reason)
        except LedgerError:
            pass

    def watch(self) -> bool:
        """Nothing pending. Stay as the single watchman while batches run elsewhere; True to keep going."""
        if self.patiently(janitor.nothing_left, self.ledger):
            return False
        ttl = self.settings.lease + self.settings.clock_skew
        if not self.patiently(roles.take_role, self.ledger, roles.WATCHMAN, self.worker_id, ttl):
            # The watchman renews its role every few seconds. One that stopped renewing may be dead: stay until
            # its role expires and take over, or a dead watchman would strand a dead worker's batch.
            alive = self.settings.heartbeat + self.settings.clock_skew
            if self.patiently(roles.renewed_within, self.ledger, roles.WATCHMAN, alive):
                return False  # another worker watches: this GPU can go
        self.patiently(claim.worker_alive, self.ledger, self.worker_id)
        self.nap(min(self.settings.heartbeat, 5.0))
        return True
