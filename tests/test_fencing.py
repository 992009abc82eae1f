"""Fencing: a batch reclaimed under a running worker is never published by it (DESIGN §4, Lease/Publish)."""
import os

import pytest
import sqlalchemy as sa

from helpers import (
    Study, assert_work_tree_clean, batch, check_outputs, events, files_by_rel, pid_alive, query,
)
from ledgerbc import claim, janitor, models
from ledgerbc.errors import NotOwner
from ledgerbc.run import Worker, WorkerOptions
from ledgerbc.testkit.synth import make_dataset


def _reclaim(study: Study, batch_id: int) -> None:
    ledger = study.ledger
    report = janitor.JanitorReport()
    janitor.reclaim(ledger, ledger.read_settings(), batch_id, report, reason="test")
    assert report.reclaimed == [batch_id]


@pytest.mark.slow
def test_reclaimed_batch_is_never_published_by_its_worker(study: Study):
    make_dataset(study.input, 5, seed=3, hostile_names=False)
    study.init("--batch-files", 8)
    worker = study.start_worker("zombie", "--max-batches", "1", LEDGERBC_SIM_DELAY=30)

    fenced, pid = study.dorado_running()
    claimed = {rel for rel, r in files_by_rel(study.ledger).items() if r.batch_id == fenced.id}
    assert claimed and all(r.state == models.CLAIMED for r in files_by_rel(study.ledger).values() if r.rel_path in claimed)
    _reclaim(study, fenced.id)

    # The worker finds out at its next heartbeat, stops dorado (long before its 30 s delay is over) and exits.
    assert study.wait_workers([worker], timeout=25) == {"zombie": 0}
    assert not pid_alive(pid), "the fenced worker left dorado running"
    assert not study.dorado_pids()
    log = (study.output / "logs" / f"{fenced.id}.log").read_text(errors="replace")
    assert "Finished in" not in log, "dorado ran to the end: it was not stopped"
    # Fenced, not failed or released: the zombie made no change to the batch after the reclaim.
    kinds = {e.kind for e in events(study.ledger, batch_id=fenced.id)}
    assert "batch-reclaimed" in kinds and not kinds & {"batch-failed", "batch-released", "file-failed"}
    assert "Traceback" not in study.worker_log("zombie")

    assert batch(study.ledger, fenced.id).state == models.RECLAIMED
    rows = files_by_rel(study.ledger)
    for rel in claimed:
        assert (rows[rel].state, rows[rel].attempts, rows[rel].batch_id) == (models.PENDING, 1, None)
        assert rows[rel].last_error == "reclaimed: test"
    assert not study.published()
    assert_work_tree_clean(study)

    # Someone else finishes the work: each file once, none by the fenced batch.
    helper = study.start_worker("helper")
    assert study.wait_workers([helper], timeout=60) == {"helper": 0}
    rows = files_by_rel(study.ledger)
    assert {r.state for r in rows.values()} == {models.DONE}
    assert all(r.batch_id != fenced.id and r.attempts == 1 for r in rows.values() if r.rel_path in claimed)
    check_outputs(study)
    done = query(study.ledger, sa.select(models.Batch.worker_id).where(models.Batch.state == models.BATCH_DONE))
    assert {worker_id for (worker_id,) in done} == {"helper"}


@pytest.mark.slow
def test_fenced_worker_keeps_going_and_drains_the_rest(study: Study):
    """Without --max-batches the fenced worker stays alive and does the work again."""
    make_dataset(study.input, 4, seed=4, hostile_names=True)
    flag = study.root / "slow"  # dorado is slow only while this exists: the test makes the first run slow
    flag.touch()
    study.dorado_while(flag, LEDGERBC_SIM_DELAY=30)
    study.init("--batch-files", 8)
    worker = study.start_worker("w")

    fenced, pid = study.dorado_running()
    claimed = {rel for rel, r in files_by_rel(study.ledger).items() if r.batch_id == fenced.id}
    flag.unlink()
    _reclaim(study, fenced.id)
    assert study.wait_workers([worker], timeout=60) == {"w": 0}
    assert not pid_alive(pid)

    assert batch(study.ledger, fenced.id).state == models.RECLAIMED
    rows = files_by_rel(study.ledger)
    assert {r.state for r in rows.values()} == {models.DONE}
    assert all(r.batch_id != fenced.id for r in rows.values())
    # The reclaim counted one attempt for each of its files; losing a worker is not the files' fault, so
    # they were batched together again (not isolated like files dorado failed on).
    for rel, r in rows.items():
        assert r.attempts == (1 if rel in claimed else 0)
    assert len({rows[rel].batch_id for rel in claimed}) == 1
    check_outputs(study)
    assert_work_tree_clean(study)


def test_publish_refused_after_reclaim_even_when_dorado_finished(study: Study, monkeypatch):
    """The publication-time fence, in the real worker: dorado finished, the batch was reclaimed before the
    publish transaction; nothing is renamed into pass/ and no file is marked done by that batch."""
    make_dataset(study.input, 3, seed=5, hostile_names=False)
    study.init("--batch-files", 8, "--dorado", study.bin / "dorado")
    ledger = study.ledger
    installs = []
    real_publish = claim.publish

    def publish_after_a_reclaim(ledger_, c, results, installer, *args):
        _reclaim(study, c.batch_id)
        installs.append(c.batch_id)
        real_run = installer.run

        def tracked_run():
            installs.append(("installed", c.batch_id))
            real_run()

        installer.run = tracked_run
        return real_publish(ledger_, c, results, installer, *args)

    monkeypatch.setattr(claim, "publish", publish_after_a_reclaim)
    w = Worker.open(ledger, WorkerOptions(worker_id="late", max_batches=1), env=study.env())
    assert w.run() == 0

    (batch_id,) = installs
    assert batch(ledger, batch_id).state == models.RECLAIMED
    rows = files_by_rel(ledger).values()
    assert len([r for r in rows if r.attempts == 1]) == batch(ledger, batch_id).n_files
    assert {(r.state, r.attempts) for r in rows} <= {(models.PENDING, 1), (models.PENDING, 0)}
    assert not study.published()
    assert_work_tree_clean(study)


def test_heartbeat_and_publish_of_a_reclaimed_batch_raise_not_owner(study: Study):
    make_dataset(study.input, 2, seed=6, hostile_names=False)
    study.init("--batch-files", 8)
    ledger = study.ledger
    settings = ledger.read_settings()
    claim.register_worker(ledger, "w", "host", os.getpid(), None)
    got = claim.claim_batch(ledger, "w", settings)
    claim.heartbeat(ledger, got)
    _reclaim(study, got.batch_id)

    with pytest.raises(NotOwner):
        claim.heartbeat(ledger, got)
    called = []

    class Tracked:
        def run(self):
            called.append(1)

        def undo(self):
            pass

    results = [claim.FileResult(f.rel, True, reads_pass=1) for f in got.files]
    with pytest.raises(NotOwner):
        claim.publish(ledger, got, results, Tracked(), settings.max_attempts)
    assert called == []
    with pytest.raises(NotOwner):
        claim.fail_batch(ledger, got, "late failure", settings.max_attempts)
    with pytest.raises(NotOwner):
        claim.release_batch(ledger, got, "late release")
    rows = files_by_rel(ledger)
    assert {(rows[f.rel].state, rows[f.rel].attempts, rows[f.rel].last_error) for f in got.files} == {
        (models.PENDING, 1, "reclaimed: test")}
    # A new claim gets a new batch id: the fencing token is never reused.
    again = claim.claim_batch(ledger, "w", settings)
    assert again.batch_id > got.batch_id


def test_worker_claims_its_next_batch_in_the_publishing_transaction(study: Study, monkeypatch):
    """One transaction per batch: only the first claim is a claim of its own; every later batch comes
    with the publication of the one before (claim.publish(..., claim_next=...))."""
    make_dataset(study.input, 6, seed=5, hostile_names=False)
    study.init("--batch-files", 2, "--dorado", study.bin / "dorado")
    ledger = study.ledger
    own_claims = []
    real_claim = claim.claim_batch
    monkeypatch.setattr(claim, "claim_batch", lambda *a: own_claims.append(1) or real_claim(*a))
    w = Worker.open(ledger, WorkerOptions(worker_id="solo"), env=study.env())
    assert w.run() == 0
    done = [b for b in _batches(ledger) if b.state == models.BATCH_DONE]
    assert len(done) >= 3 and all(b.worker_id == "solo" for b in done)
    assert len(own_claims) == 2  # the first batch, and the final "nothing pending" look
    assert {r.state for r in files_by_rel(ledger).values()} == {models.DONE}
    check_outputs(study)


def test_a_batch_claimed_with_the_last_publication_is_released_when_the_worker_stops(study: Study, monkeypatch):
    make_dataset(study.input, 6, seed=6, hostile_names=False)
    study.init("--batch-files", 2, "--dorado", study.bin / "dorado")
    ledger = study.ledger
    w = Worker.open(ledger, WorkerOptions(worker_id="stopping"), env=study.env())
    real_publish = claim.publish
    handed = []

    def publish_then_signal(*args, **kwargs):
        nxt = real_publish(*args, **kwargs)
        handed.append(nxt)
        w.stop.requested = True  # SIGTERM right after the transaction that also claimed the next batch
        return nxt

    monkeypatch.setattr(claim, "publish", publish_then_signal)
    assert w.run() == 143
    (nxt,) = handed
    assert nxt is not None
    assert batch(ledger, nxt.batch_id).state == models.RELEASED
    rows = files_by_rel(ledger)
    assert all(rows[f.rel].state == models.PENDING and rows[f.rel].attempts == 0 for f in nxt.files)
    assert len([r for r in rows.values() if r.state == models.DONE]) == 2
    assert_work_tree_clean(study)


def _batches(ledger):
    import sqlalchemy as sa

    return ledger.transact(lambda c: c.execute(sa.select(models.Batch)).all())


def test_a_folder_removal_failing_after_a_publication_does_not_stop_the_worker(study: Study, monkeypatch):
    """On GlusterFS, closing a folder another client removed meanwhile fails with ESTALE, which
    `shutil.rmtree(ignore_errors=True)` still raises: a worker of the CI's Slurm array died of it right after
    publishing, holding the batch it had claimed with that publication for a whole lease. Removing a
    published batch's folders is best effort now: every batch is published and the worker ends with 0."""
    import errno
    import shutil

    make_dataset(study.input, 6, seed=7, hostile_names=False)
    study.init("--batch-files", 2, "--dorado", study.bin / "dorado")
    ledger = study.ledger
    real_rmtree = shutil.rmtree
    stale = []

    def rmtree_closing_a_stale_handle(path, *args, **kwargs):
        real_rmtree(path, *args, **kwargs)
        stale.append(path)
        raise OSError(errno.ESTALE, "Stale file handle")

    monkeypatch.setattr(shutil, "rmtree", rmtree_closing_a_stale_handle)
    w = Worker.open(ledger, WorkerOptions(worker_id="stale"), env=study.env())
    assert w.run() == 0
    assert stale
    assert {b.state for b in _batches(ledger)} == {models.BATCH_DONE}
    assert {r.state for r in files_by_rel(ledger).values()} == {models.DONE}
    check_outputs(study)


def test_a_worker_dying_of_an_unexpected_error_gives_back_the_batch_it_claimed_with_a_publication(
        study: Study, monkeypatch):
    """Whatever kills the worker between the transaction that published a batch (and claimed the next) and
    the start of that next batch, the next batch is released at once instead of waiting out its lease."""
    from ledgerbc import batch as batch_module

    make_dataset(study.input, 6, seed=8, hostile_names=False)
    study.init("--batch-files", 2, "--dorado", study.bin / "dorado")
    ledger = study.ledger

    def cleanup_that_breaks(self):
        raise RuntimeError("a bug after the publication")

    monkeypatch.setattr(batch_module.BatchRun, "cleanup", cleanup_that_breaks)
    w = Worker.open(ledger, WorkerOptions(worker_id="dying"), env=study.env())
    with pytest.raises(RuntimeError, match="a bug after the publication"):
        w.run()
    states = sorted(b.state for b in _batches(ledger))
    assert states == [models.BATCH_DONE, models.RELEASED], states
    rows = files_by_rel(ledger).values()
    assert sorted(r.state for r in rows) == [models.DONE] * 2 + [models.PENDING] * 4
    assert all(r.attempts == 0 for r in rows if r.state == models.PENDING)
