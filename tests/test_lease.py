"""Lease files (ledgerbc/lease.py): heartbeats between ledger heartbeats, judged by the janitor.

Same set-up as test_janitor.py (injected clocks, lease 60 s, heartbeat 10 s, skew 20 s: a batch silent
for more than 80 s is reclaimable). A lease file may only delay a reclaim; it never causes one, and one
naming another worker is ignored.
"""
import time

import pytest

from ledgerbc import claim, janitor, lease, status
from ledgerbc.errors import NotOwner
from test_janitor import WINDOW, batch_state, janitor_with_contact, ledger_with_offset, start_worker


def holder(batch) -> str:
    """Who a lease file names: the worker and the batch's fencing nonce."""
    return lease.owner(batch.worker_id, batch.token)


def test_a_fresh_lease_file_keeps_a_batch_whose_ledger_heartbeat_is_old(clocked_study):
    wl = ledger_with_offset(clocked_study)
    batch = start_worker(wl, "w1", clocked_study.settings)
    beat = lease.Heartbeat(wl, clocked_study.settings, batch)
    jan = janitor_with_contact(clocked_study, WINDOW + 40, step=10)  # the clock moves 120 s; the ledger heartbeat is that old
    beat.beat()  # within the ledger interval: the lease file only
    assert lease.read(clocked_study.path, batch.batch_id, holder(batch)) == clocked_study.clock()
    report = jan.run_pass()
    assert report.reclaimed == [] and batch_state(wl, batch.batch_id) == "running"
    # status shows the lease file's age, not the ledger's
    shown = {b["batch_id"]: b["heartbeat_age_s"] for b in status.report(wl)["running_batches"]}
    assert shown[batch.batch_id] == 0.0

    # The worker goes silent: once the lease file is older than the window too, the batch is reclaimed,
    # and its lease file is removed.
    jan = janitor_with_contact(clocked_study, WINDOW + 1, step=10)  # the clock moves on; the janitor stays in contact
    report = jan.run_pass()
    assert report.reclaimed == [batch.batch_id]
    assert batch_state(wl, batch.batch_id) == "reclaimed"
    assert not lease.lease_path(clocked_study.path, batch.batch_id).exists()
    with pytest.raises(NotOwner):
        claim.heartbeat(wl, batch)


def test_a_lease_file_of_another_worker_or_garbage_does_not_keep_a_batch(clocked_study):
    wl = ledger_with_offset(clocked_study)
    batch = start_worker(wl, "w1", clocked_study.settings)
    claim.register_worker(wl, "w2", "node", 2, None)
    other = claim.claim_batch(wl, "w2", clocked_study.settings)
    jan = janitor_with_contact(clocked_study, WINDOW + 40, step=10)
    lease.write(clocked_study.path, batch.batch_id, "somebody-else", clocked_study.clock())
    assert lease.read(clocked_study.path, batch.batch_id, holder(batch)) is None
    lease.lease_path(clocked_study.path, other.batch_id).write_text(holder(other) + "\nnot-a-time\n")
    assert lease.read(clocked_study.path, other.batch_id, holder(other)) is None
    report = jan.run_pass()
    assert sorted(report.reclaimed) == sorted([batch.batch_id, other.batch_id])


def test_heartbeat_goes_to_the_ledger_every_half_lease_and_finds_a_fence(clocked_study):
    wl = ledger_with_offset(clocked_study)
    batch = start_worker(wl, "w1", clocked_study.settings)
    beat = lease.Heartbeat(wl, clocked_study.settings, batch)
    assert beat.every == clocked_study.settings.lease / 2

    def ledger_beat_at():
        return wl.transact(lambda c: c.exec_driver_sql(
            "SELECT heartbeat_at FROM batches WHERE id = ?", (batch.batch_id,)).scalar_one())

    claimed_at = ledger_beat_at()
    clocked_study.clock.advance(HEARTBEAT_S := clocked_study.settings.heartbeat)
    beat.beat()
    assert ledger_beat_at() == claimed_at  # lease file only
    assert lease.read(clocked_study.path, batch.batch_id, holder(batch)) == claimed_at + HEARTBEAT_S
    beat.last_ledger = time.monotonic() - beat.every  # half a lease has passed (monotonic clock)
    clocked_study.clock.advance(HEARTBEAT_S)
    beat.beat()
    assert ledger_beat_at() == claimed_at + 2 * HEARTBEAT_S  # this one went to the ledger

    # The batch is taken away (reclaimed whatever its lease says): the next ledger beat raises NotOwner.
    janitor.reclaim(wl, clocked_study.settings, batch.batch_id, janitor.JanitorReport(), reason="taken away by the test")
    clocked_study.clock.advance(HEARTBEAT_S)
    beat.beat()  # a lease-file beat cannot know
    beat.last_ledger = time.monotonic() - beat.every
    with pytest.raises(NotOwner):
        beat.beat()
    lease.remove(clocked_study.path, batch.batch_id)  # what the worker does when the batch is over
    assert not lease.lease_path(clocked_study.path, batch.batch_id).exists()


def test_an_unwritable_lease_folder_falls_back_to_the_ledger(clocked_study):
    wl = ledger_with_offset(clocked_study)
    batch = start_worker(wl, "w1", clocked_study.settings)
    lease.lease_dir(clocked_study.path).write_text("a file where the folder should be")
    beat = lease.Heartbeat(wl, clocked_study.settings, batch)
    clocked_study.clock.advance(5)
    beat.beat()
    assert wl.transact(lambda c: c.exec_driver_sql(
        "SELECT heartbeat_at FROM batches WHERE id = ?", (batch.batch_id,)).scalar_one()) == clocked_study.clock()


def test_janitor_removes_lease_files_of_batches_that_are_over(clocked_study):
    wl = ledger_with_offset(clocked_study)
    batch = start_worker(wl, "w1", clocked_study.settings)
    lease.write(clocked_study.path, batch.batch_id, holder(batch), clocked_study.clock())
    lease.write(clocked_study.path, 999, "w9", clocked_study.clock())  # a crashed worker's, for a batch the ledger never ran
    (lease.lease_dir(clocked_study.path) / ".998.1234").write_text("half-written by a dead writer")
    janitor.Janitor(wl, clocked_study.settings).run_pass()
    left = sorted(p.name for p in lease.lease_dir(clocked_study.path).iterdir())
    assert left == [str(batch.batch_id)]


def test_busy_workers_share_janitor_passes(clocked_study, monkeypatch):
    """With many busy workers, each passes rarely (the crew makes ~CREW passes per heartbeat); the
    watchman (shared=False) passes every heartbeat."""
    wl = ledger_with_offset(clocked_study)
    jan = janitor.Janitor(wl, clocked_study.settings)
    passes = []
    monkeypatch.setattr(jan, "run_pass", lambda: passes.append(1) or janitor.JanitorReport())
    now = [1000.0]
    monkeypatch.setattr(janitor.time, "monotonic", lambda: now[0])
    jan._workers = 40 * janitor.CREW  # as counted by its last pass
    hb = clocked_study.settings.heartbeat
    for _ in range(400):  # 400 heartbeat intervals
        jan.maybe_run()
        now[0] += hb
    assert 4 <= len(passes) <= 20  # about 400 / 40, jittered
    passes.clear()
    for _ in range(50):
        jan.maybe_run(shared=False)
        now[0] += hb
    assert len(passes) == 50


def test_a_ledger_beat_that_fails_still_renews_the_lease_file(clocked_study, monkeypatch):
    """The ledger is unreachable at a ledger beat (locked, being rebuilt): the beat raises for the caller
    to log, but the lease file is renewed, so the batch does not expire while the worker keeps working."""
    from ledgerbc.errors import LockTimeout

    wl = ledger_with_offset(clocked_study)
    batch = start_worker(wl, "w1", clocked_study.settings)
    beat = lease.Heartbeat(wl, clocked_study.settings, batch)
    beat.last_ledger = time.monotonic() - beat.every

    def locked_out(*_args):
        raise LockTimeout("could not take the ledger lock (simulated)")

    monkeypatch.setattr(claim, "heartbeat", locked_out)
    clocked_study.clock.advance(30)
    with pytest.raises(LockTimeout):
        beat.beat()
    assert lease.read(clocked_study.path, batch.batch_id, holder(batch)) == clocked_study.clock()
    with pytest.raises(LockTimeout):  # still due: the next beat tries the ledger again
        beat.beat()
