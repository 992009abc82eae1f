"""Heartbeats that do not take the global lock: one lease file per running batch (docs/leases.md).

Every `heartbeat` seconds a worker rewrites `<ledger>.leases/<batch id>` (a temp file renamed over it) with its
owner (worker id and the batch's fencing nonce) and its clock. The ledger's own row (`batches.heartbeat_at`, a transaction under the global lock
that also tells a fenced worker it lost its batch) is refreshed only every `ledger_interval(settings)`,
half a lease by default. A janitor judges a batch by the fresher of the two, so a batch expires exactly
as before (lease + clock skew without any sign of life); the ledger lock is no longer taken 1,000 times a
minute by 1,000 workers (bench/heartbeat_load.py).

A lease file only ever delays a reclaim, never causes one, and correctness never depends on it: the batch's
fencing token still fences a zombie at publication. A lease file naming another owner, or unreadable, is ignored.
"""

import logging
import os
import time
from pathlib import Path

from . import claim
from .errors import FULL_ERRNOS, LedgerError, NotOwner, StorageFull

log = logging.getLogger("ledgerbc.lease")


def lease_dir(ledger_path) -> Path:
    return Path(str(ledger_path) + ".leases")


def lease_path(ledger_path, batch_id: int) -> Path:
    return lease_dir(ledger_path) / str(int(batch_id))


def ledger_interval(settings) -> float:
    """How often a working batch's heartbeat goes to the ledger itself: every half lease (two chances per
    lease, the lease file beats in between), never more often than the heartbeat."""
    return max(settings.heartbeat, settings.lease / 2)


def owner(worker_id: str, token: str | None) -> str:
    """Who holds a batch, as a lease file says it: the worker and the batch's fencing nonce."""
    return f"{worker_id} {token}" if token else worker_id


def write(ledger_path, batch_id: int, holder: str, now: float) -> None:
    """Renew the lease file of `batch_id` (atomic: readers see the old or the new content). Raises OSError."""
    final = lease_path(ledger_path, batch_id)
    final.parent.mkdir(exist_ok=True)
    tmp = final.with_name(f".{final.name}.{os.getpid()}")
    tmp.write_text(f"{holder}\n{now!r}\n")
    os.replace(tmp, final)


def read(ledger_path, batch_id: int, holder: str) -> float | None:
    """The time `holder` (see `owner`) last renewed the lease of `batch_id`, or None (no file, another
    holder, garbage)."""
    try:
        found, at = lease_path(ledger_path, batch_id).read_text().split("\n")[:2]
        return float(at) if found == holder else None
    except (OSError, ValueError):
        return None


def last_beat(ledger_path, batch_id: int, holder: str, ledger_beat: float) -> float:
    """The fresher of the ledger's heartbeat and the lease file's."""
    beat = read(ledger_path, batch_id, holder)
    return ledger_beat if beat is None else max(ledger_beat, beat)


def remove(ledger_path, batch_id: int) -> None:
    try:
        lease_path(ledger_path, batch_id).unlink()
    except OSError:
        pass


def remove_stale(ledger_path, running: set[int]) -> list[str]:
    """Delete lease files (and temp files of crashed writers) of batches that are not running; their names."""
    folder = lease_dir(ledger_path)
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        name = entry.name.lstrip(".").split(".")[0]  # "<id>", or ".<id>.<pid>" for a writer's temp file
        if name.isdigit() and int(name) in running:
            continue
        try:
            os.unlink(entry.path)
            removed.append(entry.name)
        except OSError:
            pass
    return removed


class Heartbeat:
    """The heartbeat of one batch, called every `settings.heartbeat` seconds while it is worked on.

    Raises NotOwner when the ledger says the batch was reclaimed (checked at every ledger beat), and
    LedgerError when the ledger beat failed (the caller logs it and carries on: the lease file still beats).
    """

    def __init__(self, ledger, settings, batch):
        self.ledger = ledger
        self.batch = batch  # claim.Claim
        self.batch_id = batch.batch_id
        self.holder = owner(batch.worker_id, batch.token)
        self.every = ledger_interval(settings)
        self.last_ledger = time.monotonic()  # the claim wrote the first heartbeat into the ledger

    def beat(self) -> None:
        if time.monotonic() - self.last_ledger >= self.every:
            try:
                self._ledger_beat()
                return
            except NotOwner:
                raise
            except LedgerError:
                # The ledger is unreachable (locked, being rebuilt): the lease file still says this worker
                # is alive, so its batch does not expire meanwhile. The caller logs the error.
                self._lease_beat()
                raise
        if not self._lease_beat():
            self._ledger_beat()

    def renew_lease(self) -> None:
        """Write the lease file now (best effort): the batch shows a sign of life before its first heartbeat."""
        self._lease_beat()

    def _lease_beat(self) -> bool:
        try:
            write(self.ledger.path, self.batch_id, self.holder, self.ledger.clock())
        except OSError as exc:
            if exc.errno in FULL_ERRNOS:  # the ledger's filesystem is full: stop, say so once
                raise StorageFull(f"{exc.strerror}: {exc.filename}", folder=lease_dir(self.ledger.path)) from None
            log.warning("lease file of batch %s: %s; heartbeating through the ledger", self.batch_id, exc)
            return False
        self.ledger.note_contact()  # the shared filesystem answered: the janitor's stall rule counts it
        return True

    def _ledger_beat(self) -> None:
        claim.heartbeat(self.ledger, self.batch)
        self.last_ledger = time.monotonic()
