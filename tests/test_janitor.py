"""Expiry, reclaim, cleanup and reconcile (DESIGN §4), with injected clocks: no test sleeps.

Every `Ledger` takes a `clock`; a worker whose node clock runs off by `skew` is a ledger whose clock is
the test clock plus or minus `skew`. Lease 60 s, heartbeat 10 s, clock skew 20 s: a batch is
reclaimable when its heartbeat is older than 80 s, as seen by a janitor that has reached the ledger
without a stall for 80 s (or by the one-shot `recover`).
"""
import json
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from ledgerbc import claim, janitor, models, publish, split
from ledgerbc.batch import installer_for
from ledgerbc.cli import cli
from ledgerbc.db import Ledger
from ledgerbc.layout import link_name
from ledgerbc.models import Batch, Event, Pod5File
from ledgerbc.testkit import install_fake_dorado
from helpers import HEARTBEAT, LEASE, SKEW, T0, check_exactly_once

WINDOW = LEASE + SKEW


class FailIfRun:
    """An installer that must never run (a fenced publication renames nothing)."""

    def run(self):
        pytest.fail("installed outputs")

    def undo(self):
        pass


def ledger_with_offset(clocked_study, offset: float = 0.0) -> Ledger:
    """A handle on the clocked_study's ledger as seen by a node whose clock is `offset` seconds off."""
    return Ledger(clocked_study.path, clock=lambda: clocked_study.clock() + offset)


def files(ledger) -> dict[str, SimpleNamespace]:
    rows = ledger.transact(lambda c: c.execute(sa.select(Pod5File.__table__)).all())
    return {
        r.rel_path: SimpleNamespace(state=r.state, attempts=r.attempts, error=r.last_error, batch_id=r.batch_id,
                                    reads_pass=r.reads_pass, reads_fail=r.reads_fail)
        for r in rows
    }


def batch_state(ledger, batch_id) -> str:
    return ledger.transact(lambda c: c.execute(sa.select(Batch.state).where(Batch.id == batch_id)).scalar_one())


def start_worker(ledger, worker_id, settings):
    claim.register_worker(ledger, worker_id, "node", 1, None)
    batch = claim.claim_batch(ledger, worker_id, settings)
    assert batch is not None and len(batch.files) == 3
    return batch


def janitor_with_contact(clocked_study, seconds: float, offset: float = 0.0, step: float = HEARTBEAT):
    """A janitor whose ledger it has been reaching every `step` seconds for `seconds` (time moves on)."""
    jl = ledger_with_offset(clocked_study, offset)
    jan = janitor.Janitor(jl, clocked_study.settings)
    end = clocked_study.clock() + seconds
    while True:
        jl.transact(lambda c: None)
        if clocked_study.clock() >= end:
            return jan
        clocked_study.clock.advance(min(step, end - clocked_study.clock()))


# -- expiry ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("worker_offset, janitor_offset", [
    (-SKEW, 0.0), (SKEW, 0.0), (-SKEW / 2, SKEW / 2), (SKEW / 2, -SKEW / 2), (0.0, 0.0),
])
def test_a_live_worker_whose_clock_is_off_by_up_to_the_skew_margin_never_loses_its_batch(
    clocked_study, worker_offset, janitor_offset
):
    wl = ledger_with_offset(clocked_study, worker_offset)
    batch = start_worker(wl, "w-skewed", clocked_study.settings)
    jl = ledger_with_offset(clocked_study, janitor_offset)
    jan = janitor.Janitor(jl, clocked_study.settings)
    # Three expiry windows of run: the worker heartbeats every heartbeat interval, the janitor passes
    # every second, so some passes fall just before a heartbeat (the oldest the heartbeat ever looks).
    for second in range(1, int(3 * WINDOW)):
        clocked_study.clock.advance(1.0)
        if second % HEARTBEAT == 0:
            claim.heartbeat(wl, batch)
        report = jan.run_pass()
        assert report.reclaimed == [], f"live batch reclaimed at +{second}s"
    assert batch_state(jl, batch.batch_id) == models.RUNNING
    assert {f.state for f in files(jl).values() if f.batch_id == batch.batch_id} == {models.CLAIMED}


@pytest.mark.parametrize("worker_offset", [-SKEW, SKEW])
def test_a_batch_is_not_reclaimed_at_lease_plus_skew_however_the_clocks_stand(clocked_study, worker_offset):
    """The boundary: a worker whose clock runs `skew` behind, silent for exactly the lease, looks
    lease + skew old to the janitor; that is not yet expired."""
    wl = ledger_with_offset(clocked_study, worker_offset)
    batch = start_worker(wl, "w", clocked_study.settings)
    jan = janitor_with_contact(clocked_study, LEASE + SKEW + worker_offset)
    assert clocked_study.clock() - (T0 + worker_offset) <= WINDOW
    assert jan.run_pass().reclaimed == []
    assert batch_state(jan.ledger, batch.batch_id) == models.RUNNING


def test_a_batch_silent_longer_than_lease_plus_skew_is_reclaimed_by_a_janitor_in_contact(clocked_study):
    wl = ledger_with_offset(clocked_study)
    batch = start_worker(wl, "w-dead", clocked_study.settings)
    jan = janitor_with_contact(clocked_study, WINDOW)
    assert jan.run_pass().reclaimed == []  # exactly lease + skew: not yet
    clocked_study.clock.advance(1.0)
    report = jan.run_pass()
    assert report.reclaimed == [batch.batch_id]
    assert report.files_returned == 3
    assert batch_state(jan.ledger, batch.batch_id) == models.RECLAIMED
    mine = {rel: f for rel, f in files(jan.ledger).items() if rel in {f.rel for f in batch.files}}
    assert {(f.state, f.attempts, f.batch_id) for f in mine.values()} == {(models.PENDING, 1, None)}
    assert all("lease expired: worker w-dead silent for 81s" in f.error for f in mine.values())
    # The dead worker, back from the grave, is fenced: it can neither heartbeat nor publish.
    with pytest.raises(claim.NotOwner):
        claim.heartbeat(wl, batch)
    with pytest.raises(claim.NotOwner):
        claim.publish(wl, batch, [], FailIfRun(), 2)


def test_a_janitor_whose_own_ledger_access_stalled_reclaims_nothing_until_it_had_contact_again(clocked_study):
    wl = ledger_with_offset(clocked_study)
    batch = start_worker(wl, "w", clocked_study.settings)
    jan = janitor_with_contact(clocked_study, 2 * WINDOW)  # a long-lived janitor with good contact...
    claim.heartbeat(wl, batch)
    assert jan.run_pass().reclaimed == []
    # ...then the shared filesystem hangs for 10 leases: nobody reaches the ledger, the clock jumps.
    clocked_study.clock.advance(10 * LEASE)
    assert clocked_study.clock() - jan.ledger.last_contact > LEASE
    report = jan.run_pass()
    assert report.reclaimed == [], "reclaimed right after its own stall"
    assert batch_state(jan.ledger, batch.batch_id) == models.RUNNING
    # Within the window the worker comes back too and heartbeats: it keeps its batch.
    clocked_study.clock.advance(HEARTBEAT)
    assert jan.run_pass().reclaimed == []
    claim.heartbeat(wl, batch)
    for _ in range(int(3 * WINDOW / HEARTBEAT)):
        clocked_study.clock.advance(HEARTBEAT)
        if clocked_study.clock() % 30 < HEARTBEAT:  # the worker keeps beating (every 30 s, well within the lease)
            claim.heartbeat(wl, batch)
        assert jan.run_pass().reclaimed == []
    assert batch_state(jan.ledger, batch.batch_id) == models.RUNNING


def test_after_a_stall_a_janitor_reclaims_once_it_has_had_contact_for_lease_plus_skew(clocked_study):
    wl = ledger_with_offset(clocked_study)
    batch = start_worker(wl, "w-dead", clocked_study.settings)
    jan = janitor_with_contact(clocked_study, WINDOW / 2)
    clocked_study.clock.advance(10 * LEASE)  # stall: the batch's heartbeat is now 10 leases old
    resumed = clocked_study.clock()
    reclaimed_at = None
    while reclaimed_at is None:
        report = jan.run_pass()
        if report.reclaimed:
            reclaimed_at = clocked_study.clock()
            assert report.reclaimed == [batch.batch_id]
        clocked_study.clock.advance(HEARTBEAT)
        assert clocked_study.clock() - resumed < 3 * WINDOW, "never reclaimed"
    assert reclaimed_at - resumed == pytest.approx(WINDOW)
    assert batch_state(jan.ledger, batch.batch_id) == models.RECLAIMED


def test_a_worker_janitor_detects_its_stall_without_being_told_the_gap(clocked_study):
    """The stall rule belongs to the janitor: a Janitor on a fresh Ledger handle applies it by itself."""
    start_worker(ledger_with_offset(clocked_study), "w-dead", clocked_study.settings)
    jl = ledger_with_offset(clocked_study)
    jan = janitor.Janitor(jl, clocked_study.settings)
    assert jan.run_pass().reclaimed == []  # first contact: no history yet
    clocked_study.clock.advance(10 * LEASE)
    assert jan.run_pass().reclaimed == []


# -- the one-shot janitor ------------------------------------------------------------------------------
def test_recover_judges_by_heartbeat_age_alone(clocked_study):
    wl = ledger_with_offset(clocked_study)
    batch = start_worker(wl, "w-dead", clocked_study.settings)
    clocked_study.clock.advance(WINDOW)
    fresh = ledger_with_offset(clocked_study)  # a one-shot process: no contact history at all
    assert janitor.recover(fresh).reclaimed == []
    clocked_study.clock.advance(1.0)
    report = janitor.recover(ledger_with_offset(clocked_study))
    assert report.reclaimed == [batch.batch_id]
    assert "reclaimed batch %d" % batch.batch_id in report.lines()
    assert {f.state for f in files(fresh).values()} == {models.PENDING}


def test_recover_force_reclaims_silent_batches_before_they_expire_without_counting_an_attempt(clocked_study):
    wl = ledger_with_offset(clocked_study)
    batch = start_worker(wl, "w-crashed", clocked_study.settings)
    clocked_study.clock.advance(1.0)
    assert janitor.recover(ledger_with_offset(clocked_study)).reclaimed == []
    # Silent for longer than two heartbeats + skew (a live worker renews its lease every heartbeat), but
    # not for lease + skew: only --force takes it, and its files did nothing wrong: no attempt counted.
    clocked_study.clock.advance(janitor.fresh_window(clocked_study.settings))
    assert clocked_study.clock() - T0 < WINDOW
    assert janitor.recover(ledger_with_offset(clocked_study)).reclaimed == []
    report = janitor.recover(ledger_with_offset(clocked_study), force=True)
    assert report.reclaimed == [batch.batch_id]
    mine = [f for rel, f in files(wl).items() if rel in {f.rel for f in batch.files}]
    assert [(f.state, f.attempts) for f in mine] == [(models.PENDING, 0)] * 3
    with pytest.raises(claim.NotOwner):
        claim.heartbeat(wl, batch)


def test_recover_force_never_takes_a_batch_whose_lease_is_being_renewed(clocked_study):
    """`recover --force` during a live run must not fail good files: a worker renewing its lease keeps its
    batch, and the report says which batch was left and why."""
    from ledgerbc import lease

    wl = ledger_with_offset(clocked_study)
    batch = start_worker(wl, "w-alive", clocked_study.settings)
    for _ in range(int(3 * WINDOW / HEARTBEAT)):  # the ledger's heartbeat stays old; the lease file is fresh
        clocked_study.clock.advance(HEARTBEAT)
        lease.write(clocked_study.path, batch.batch_id, lease.owner("w-alive", batch.token), clocked_study.clock())
        report = janitor.recover(ledger_with_offset(clocked_study), force=True)
        assert report.reclaimed == []
        assert report.lines() == [f"left batch {batch.batch_id} of w-alive running: its lease was renewed 0s ago "
                                  "(the worker is alive)"]
    assert batch_state(wl, batch.batch_id) == models.RUNNING
    claim.heartbeat(wl, batch)


def test_recover_cli_reclaims_only_with_force_when_the_lease_is_not_renewed(clocked_study):
    batch = start_worker(Ledger(clocked_study.path, clock=lambda: T0), "w-gone", clocked_study.settings)
    runner = CliRunner()
    fresh = Ledger(clocked_study.path)  # real clock: the batch's heartbeat (T0) is decades old for recover
    fresh.transact(lambda c: c.execute(sa.update(Batch).values(heartbeat_at=fresh.clock() - janitor.fresh_window(clocked_study.settings) - 5)))
    result = runner.invoke(cli, ["recover", "--ledger", str(clocked_study.path)])
    assert result.exit_code == 0, result.output
    assert "reclaimed" not in result.output
    assert batch_state(Ledger(clocked_study.path), batch.batch_id) == models.RUNNING
    result = runner.invoke(cli, ["recover", "--ledger", str(clocked_study.path), "--force"])
    assert result.exit_code == 0, result.output
    assert f"reclaimed batch {batch.batch_id}" in result.output
    assert batch_state(Ledger(clocked_study.path), batch.batch_id) == models.RECLAIMED


# -- what reclaiming does to the files -------------------------------------------------------------------
def expire(clocked_study, batch_ids):
    clocked_study.clock.advance(WINDOW + 1)
    report = janitor.recover(ledger_with_offset(clocked_study))
    assert sorted(report.reclaimed) == sorted(batch_ids)
    return report


def test_reclaimed_files_go_back_to_pending_then_fail_past_max_attempts_with_the_error_kept(clocked_study):
    wl = ledger_with_offset(clocked_study)
    first = start_worker(wl, "w1", clocked_study.settings)
    target = first.files[0].rel
    expire(clocked_study, [first.batch_id])
    assert files(wl)[target].state == models.PENDING and files(wl)[target].attempts == 1
    # Reclaimed from a dead worker is not the file's fault: it is batched with the others again
    # (oldest first); its second loss is its last attempt (max_attempts=2).
    claim.register_worker(wl, "w2", "node", 2, None)
    second = claim.claim_batch(wl, "w2", clocked_study.settings)
    assert second.files[0].rel == target and [f.rel for f in second.files] == [f.rel for f in first.files]
    expire(clocked_study, [second.batch_id])
    f = files(wl)[target]
    assert (f.state, f.attempts) == (models.FAILED, 2)
    assert f.error.startswith("reclaimed: lease expired: worker w2 silent for")
    status = CliRunner().invoke(cli, ["status", "--ledger", str(clocked_study.path), "--json"])
    failed = json.loads(status.output)["failed"]
    # status --json only ever adds keys: compare the ones this test is about
    assert [{k: e[k] for k in ("path", "attempts", "error")} for e in failed] == [
        {"path": g.rel, "attempts": 2, "error": f.error} for g in first.files]


@pytest.fixture
def dorado_exe(tmp_path):
    return str(install_fake_dorado(tmp_path / "bin"))


def basecall_in_staging(clocked_study, batch, dorado_exe, min_qscore=0.0):
    """What a worker does before publishing: links, the stand-in dorado, the split. Returns (result, links)."""
    assigned = clocked_study.layout.assigned(batch.batch_id, batch.worker_id)
    assigned.mkdir(parents=True)
    links = {}
    for i, f in enumerate(batch.files):
        name = link_name(i, f.rel)
        os.symlink(clocked_study.input / f.rel, assigned / name)
        links[name] = f
    staging = clocked_study.layout.staging(batch.batch_id, batch.token)
    staging.mkdir(parents=True)
    with open(staging / "calls.bam", "wb") as out:
        subprocess.run([dorado_exe, "basecaller", "hac", str(assigned)], stdout=out, stderr=subprocess.DEVNULL,
                       check=True, timeout=120)
    result = split.split_bam(staging / "calls.bam", {n: f.rel for n, f in links.items()}, staging,
                             min_qscore=min_qscore)
    return result, links


def test_a_reclaimed_batch_whose_outputs_were_already_renamed_into_pass_ends_done_not_redone(clocked_study, dorado_exe):
    wl = ledger_with_offset(clocked_study)
    batch = start_worker(wl, "w-died-publishing", clocked_study.settings)
    result, links = basecall_in_staging(clocked_study, batch, dorado_exe)
    # The owner renamed two of its three outputs into pass/ and died before the transaction committed.
    published = [f for f in links.values()][:2]
    installer_for(clocked_study.layout, "fastq", result, {f.rel for f in published}, links).run()
    mtimes = {f.rel: clocked_study.layout.pass_path(f.rel, "fastq").stat().st_mtime_ns for f in published}

    report = expire(clocked_study, [batch.batch_id])
    assert (report.files_found_published, report.files_returned) == (2, 1)
    state = files(wl)
    for f in published:
        assert state[f.rel].state == models.DONE
        assert state[f.rel].reads_pass + state[f.rel].reads_fail == len(clocked_study.reads[f.rel])
    leftover = [f for f in batch.files if f not in published][0]
    assert (state[leftover.rel].state, state[leftover.rel].attempts) == (models.PENDING, 1)
    # Only the unpublished file is basecalled again; the published outputs are never touched.
    claim.register_worker(wl, "w2", "node", 2, None)
    again = claim.claim_batch(wl, "w2", clocked_study.settings)
    assert leftover.rel in [f.rel for f in again.files]
    assert not {f.rel for f in published} & {f.rel for f in again.files}
    assert {f.rel: clocked_study.layout.pass_path(f.rel, "fastq").stat().st_mtime_ns for f in published} == mtimes
    check_exactly_once({f.rel: clocked_study.reads[f.rel] for f in published}, clocked_study.output)


class Died(BaseException):
    """The worker process dies here (SIGKILL, node crash): nothing after this line runs."""


def test_an_owner_dying_right_after_renaming_a_pass_file_loses_none_of_that_files_reads(
    clocked_study, dorado_exe, monkeypatch
):
    """A pass/ file marks its input done (for reclaim and rebuild): its fail/ part must be in place first."""
    wl = ledger_with_offset(clocked_study)
    batch = start_worker(wl, "w-died", clocked_study.settings)
    result, links = basecall_in_staging(clocked_study, batch, dorado_exe, min_qscore=12.0)
    name, first = next((n, f) for n, f in links.items() if result.files[n].reads_fail and result.files[n].reads_pass)
    real_replace = os.replace

    def replace_then_die(src, dst):
        real_replace(src, dst)
        if Path(dst) == clocked_study.layout.pass_path(first.rel, "fastq"):
            raise Died()

    monkeypatch.setattr(publish.os, "replace", replace_then_die)
    with pytest.raises(Died):
        installer_for(clocked_study.layout, "fastq", result, {f.rel for f in links.values()}, links).run()
    monkeypatch.undo()

    expire(clocked_study, [batch.batch_id])
    state = files(wl)[first.rel]
    assert state.state == models.DONE
    assert (state.reads_pass, state.reads_fail) == (result.files[name].reads_pass, result.files[name].reads_fail)
    check_exactly_once({first.rel: clocked_study.reads[first.rel]}, clocked_study.output)


def test_a_zombie_cannot_publish_over_its_reclaimed_batch(clocked_study, dorado_exe):
    wl = ledger_with_offset(clocked_study)
    batch = start_worker(wl, "w-zombie", clocked_study.settings)
    result, links = basecall_in_staging(clocked_study, batch, dorado_exe)
    expire(clocked_study, [batch.batch_id])
    results = [claim.FileResult(f.rel, True, reads_pass=1) for f in links.values()]
    install = installer_for(clocked_study.layout, "fastq", result, {f.rel for f in links.values()}, links)
    with pytest.raises(claim.NotOwner):
        claim.publish(wl, batch, results, install, 2)
    assert not list((clocked_study.output / "pass").rglob("*.fastq")), "a fenced worker published"
    assert {f.state for f in files(wl).values()} == {models.PENDING}


# -- cleanup ---------------------------------------------------------------------------------------------
def make_work_dirs(clocked_study, batch):
    """The batch's ASSIGNED folder, its staging, and a half-made ASSIGNED folder (a worker met a full disk
    while linking, or died then)."""
    assigned = clocked_study.layout.assigned(batch.batch_id, batch.worker_id)
    staging = clocked_study.layout.staging(batch.batch_id, batch.token)
    half_made = clocked_study.layout.half_made(batch.batch_id, batch.worker_id, batch.token)
    for folder in (assigned, staging / "pass", half_made):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "x").write_text("x")
    return assigned, staging, half_made


def test_cleanup_removes_work_of_finished_batches_and_never_of_running_ones(clocked_study):
    wl = ledger_with_offset(clocked_study)
    claim.register_worker(wl, "w-done", "node", 1, None)
    claim.register_worker(wl, "w-run", "node", 2, None)
    done = claim.claim_batch(wl, "w-done", clocked_study.settings)
    running = claim.claim_batch(wl, "w-run", clocked_study.settings)
    done_dirs = make_work_dirs(clocked_study, done)
    running_dirs = make_work_dirs(clocked_study, running)
    # The finished batch's worker released it (SIGTERM) and died before removing its folders.
    claim.release_batch(wl, done, "stopped")
    jan = janitor_with_contact(clocked_study, 3 * WINDOW)
    for _ in range(3):
        claim.heartbeat(wl, running)
        report = jan.run_pass()
        clocked_study.clock.advance(HEARTBEAT)
    assert not any(p.exists() for p in done_dirs)
    assert all(p.exists() for p in running_dirs)
    assert batch_state(wl, running.batch_id) == models.RUNNING
    assert report.reclaimed == []
    # The running batch's worker dies; once its batch is reclaimed, the same pass removes its folders.
    silent_since = clocked_study.clock() - HEARTBEAT
    while True:
        clocked_study.clock.advance(HEARTBEAT)
        report = jan.run_pass()
        if report.reclaimed:
            break
        assert all(p.exists() for p in running_dirs)
        assert clocked_study.clock() - silent_since <= WINDOW
    assert report.reclaimed == [running.batch_id]
    assert not any(p.exists() for p in running_dirs)
    assert sorted(report.cleaned) == sorted(str(p.relative_to(clocked_study.output)) for p in running_dirs)


# -- reconcile -------------------------------------------------------------------------------------------
def publish_batch(clocked_study, ledger, batch, dorado_exe):
    result, links = basecall_in_staging(clocked_study, batch, dorado_exe)
    results = [
        claim.FileResult(f.rel, True, reads_pass=result.files[n].reads_pass, reads_fail=result.files[n].reads_fail,
                         outputs=result.files[n].records())
        for n, f in links.items()
    ]
    install = installer_for(clocked_study.layout, "fastq", result, {f.rel for f in links.values()}, links)
    claim.publish(ledger, batch, results, install, 2)


def write_fastq(path: Path, read_ids):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"@{r}\tqs:f:12\nACGT\n+\n++++\n" for r in read_ids))


def test_reconcile_makes_the_ledger_agree_with_pass(clocked_study, dorado_exe):
    wl = ledger_with_offset(clocked_study)
    batch = start_worker(wl, "w", clocked_study.settings)
    publish_batch(clocked_study, wl, batch, dorado_exe)
    state = files(wl)
    assert {state[f.rel].state for f in batch.files} == {models.DONE}
    lost = batch.files[0].rel
    clocked_study.layout.pass_path(lost, "fastq").unlink()  # someone deleted a published output
    restored = next(rel for rel, f in state.items() if f.state == models.PENDING)
    write_fastq(clocked_study.layout.pass_path(restored, "fastq"), clocked_study.reads[restored])  # e.g. restored from a backup

    report = janitor.recover(ledger_with_offset(clocked_study))
    assert report.reconciled_pending == [lost]
    assert report.reconciled_done == [restored]
    state = files(wl)
    assert (state[lost].state, state[lost].batch_id, state[lost].reads_pass) == (models.PENDING, None, None)
    assert (state[restored].state, state[restored].reads_pass) == (models.DONE, len(clocked_study.reads[restored]))
    events = wl.transact(lambda c: c.execute(sa.select(Event.message).where(Event.kind == "reconcile")).scalars().all())
    assert events == ["1 lost outputs, 1 found outputs"]
    # The lost file is basecalled again, the restored one never.
    claim.register_worker(wl, "w2", "node", 2, None)
    claimed = set()
    while (b := claim.claim_batch(wl, "w2", clocked_study.settings)) is not None:
        claimed |= {f.rel for f in b.files}
    assert lost in claimed and restored not in claimed
    # A second recover finds nothing to do.
    assert janitor.recover(ledger_with_offset(clocked_study)).lines() == ["nothing to do"]


def test_reclaim_own_stale_takes_back_a_dead_incarnations_batch_at_once(clocked_study):
    wl = ledger_with_offset(clocked_study)
    batch = start_worker(wl, "array_7@node", clocked_study.settings)
    clocked_study.clock.advance(1.0)  # far from expired: but the same worker id starting again proves it died
    assert janitor.reclaim_own_stale(wl, clocked_study.settings, "array_7@node") == [batch.batch_id]
    assert janitor.reclaim_own_stale(wl, clocked_study.settings, "other@node") == []
    assert {f.state for f in files(wl).values()} == {models.PENDING}


def test_recover_cli_prints_one_line_per_action(clocked_study):
    wl = Ledger(clocked_study.path, clock=lambda: T0)
    batch = start_worker(wl, "w-dead", clocked_study.settings)
    make_work_dirs(clocked_study, batch)
    # The real clock is decades after T0: the batch is long expired for a one-shot janitor.
    result = CliRunner().invoke(cli, ["recover", "--ledger", str(clocked_study.path)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert f"reclaimed batch {batch.batch_id}" in lines
    assert "3 files of reclaimed batches returned to pending (or failed)" in lines
    assert f"removed work/ASSIGNED_{batch.batch_id}_w-dead" in lines
    assert not clocked_study.layout.assigned(batch.batch_id, "w-dead").exists()
