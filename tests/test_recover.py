"""A damaged or lost ledger (DESIGN §4 "Rebuild"): every command refuses it in one line naming
`recover --rebuild`; the rebuild recreates it from INPUT_DIR, pass/ and work/ASSIGNED_*, after which
the run completes with nothing basecalled twice, a worker alive mid-batch keeps its batch, and batch
ids (fencing tokens) are never handed out again.
"""
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from ledgerbc import claim, models
from ledgerbc.models import Batch
from ledgerbc.rebuild import rebuild_ledger
from ledgerbc.testkit.synth import write_pod5
from helpers import KIT, make_study, check_exactly_once, basecallers_of, kill_leftovers, pod5_reads

REBUILD_HINT = "recover --rebuild"
# Rebuild tests run on a flat and on a barcoded study (outputs per barcode, the summary as done marker).
WITH_AND_WITHOUT_BARCODES = pytest.mark.parametrize("kit", [None, KIT], ids=["flat", "barcoded"])


pytestmark = pytest.mark.usefixtures("no_stray_processes")


def assert_one_error_line(result, exit_code=5, *needles):
    code = result.exit_code if hasattr(result, "exit_code") else result.returncode
    out = result.stdout + result.stderr
    assert code == exit_code, f"exit {code}, wanted {exit_code}: {out}"
    assert "Traceback" not in out
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), f"not one Error: line: {result.stderr!r}"
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(params=[None, KIT], ids=["flat", "barcoded"])
def half_done(request, tmp_path):
    """12 files, batches of 3, two batches basecalled by a real worker; then the ledger is garbage."""
    study = make_study(tmp_path, 12, 3, kit_name=request.param)
    first = study.cli("run", "--worker-id", "early", "--max-batches", "2")
    assert first.returncode == 0, first.stderr
    published = study.outputs()
    assert len(study.published_inputs()) == 6
    study.ledger_path.write_bytes(os.urandom(64 * 1024))  # a disk error, a bad copy, a stray `dd`
    yield study, published
    kill_leftovers(str(tmp_path))


COMMANDS = [
    ["status"], ["status", "--json"], ["scan"], ["run"], ["run", "--max-batches", "1"], ["retry", "--all-failed"],
    ["retry", "some/file.pod5"], ["recover"], ["recover", "--force"], ["upgrade"],
]


def test_every_command_refuses_a_garbage_ledger_in_one_line_naming_the_rebuild(half_done):
    study, _ = half_done
    before = study.ledger_path.read_bytes()
    for args in COMMANDS:
        assert_one_error_line(study.invoke(*args), 5, "damaged or not a ledger", REBUILD_HINT)
    for args in (["status"], ["run", "--worker-id", "w9"]):  # the real console script, as a user or Slurm runs it
        assert_one_error_line(study.cli(*args, timeout=120), 5, REBUILD_HINT)  # at once: no retrying
    assert study.ledger_path.read_bytes() == before, "a command wrote into the damaged ledger"


def test_after_a_rebuild_the_run_completes_without_basecalling_anything_twice(half_done):
    study, published = half_done
    logs_before = sorted(p.name for p in (study.output / "logs").iterdir())
    assert logs_before == ["1.log", "2.log"]

    result = study.invoke("recover", "--rebuild", "--input", study.input, "--output", study.output)
    assert result.exit_code == 0, result.output
    assert "12 pod5 files found, 6 already published" in result.output
    assert f"export LEDGERBC_LEDGER={study.ledger_path}" in result.output
    assert list(study.output.glob("ledgerbc.db.replaced-*")), "the damaged ledger was not kept aside"
    state = study.files()
    done_from_disk = {rel for rel, (s, _b) in state.items() if s == models.DONE}
    assert len(done_from_disk) == 6 and {s for s, _b in state.values()} == {models.DONE, models.PENDING}

    finish = study.cli("run", "--worker-id", "late")
    assert finish.returncode == 0, finish.stderr
    check_exactly_once(pod5_reads(study.input), study.output)
    report = study.status()
    assert (report["files"]["done"], report["files"]["pending"], report["running_batches"]) == (12, 0, [])
    # The six outputs published before the loss were never written again (same inode, same mtime)...
    after = study.outputs()
    assert {k: after[k] for k in published} == published
    # ...no batch after the rebuild held any of their files, and new batch ids lie above the old ones.
    state = study.files()
    assert all(state[rel][1] is None for rel in done_from_disk)
    new_batches = {b for rel, (_s, b) in state.items() if rel not in done_from_disk}
    assert new_batches and min(new_batches) > 2
    new_logs = sorted(set(p.name for p in (study.output / "logs").iterdir()) - set(logs_before))
    assert sorted(int(n.split(".")[0]) for n in new_logs) == sorted(new_batches)


@WITH_AND_WITHOUT_BARCODES
def test_a_pod5_moved_after_its_publication_is_its_published_self_after_a_rebuild(tmp_path, kit):
    """`mv` of a published pod5 into another folder, then the ledger is lost: the rebuild finds its outputs
    under the old path, which holds no pod5 any more, and the pod5 under the new one. The old path is done (the
    new one its copy): nothing is basecalled again, and verify --deep holds (found by tests/history.py)."""
    study = make_study(tmp_path, 4, 2, kit_name=kit)
    assert study.cli("run", "--worker-id", "early", "--max-batches", "1").returncode == 0
    moved = sorted(study.published_inputs())[0]
    published = study.outputs()
    (study.input / "moved").mkdir()
    os.rename(study.input / moved, study.input / "moved" / Path(moved).name)
    study.ledger_path.unlink()

    result = study.invoke("recover", "--rebuild", "--input", study.input, "--output", study.output)
    assert result.exit_code == 0, result.output
    assert "1 published files are no longer at their path: done (1 found elsewhere" in result.output
    state = study.files()
    assert state[moved][0] == models.DONE and state[f"moved/{Path(moved).name}"][0] == models.DUPLICATE
    assert study.cli("run", "--worker-id", "late").returncode == 0
    assert study.published_inputs() == set(state) - {f"moved/{Path(moved).name}"}
    assert {k: study.outputs()[k] for k in published} == published, "an output published before was written again"
    deep = study.invoke("verify", "--deep")
    assert deep.exit_code == 0, deep.output


@pytest.mark.slow
@WITH_AND_WITHOUT_BARCODES
def test_rebuild_while_a_worker_is_mid_batch_lets_it_keep_and_publish_its_batch(tmp_path, kit):
    study = make_study(tmp_path, 3, 3, lease="30s", delay=4, kit_name=kit)  # dorado takes 4 s to start: time to rebuild mid-batch
    worker = study.start_worker("alive")
    try:
        deadline = time.monotonic() + 60
        while not (assigned := list((study.output / "work").glob("ASSIGNED_*_alive"))) or not basecallers_of(worker.pid):
            assert time.monotonic() < deadline and worker.poll() is None, study.worker_log("alive")
            time.sleep(0.1)
        batch_id = int(assigned[0].name.split("_")[1])
        mine = {os.path.realpath(link) for link in assigned[0].iterdir() if link.is_symlink()}  # links may be relative
        # Mid-batch, the ledger is overwritten with garbage and rebuilt from the files on disk.
        study.ledger_path.write_bytes(os.urandom(32 * 1024))
        result = study.invoke("recover", "--rebuild", "--input", study.input, "--output", study.output)
        assert result.exit_code == 0, result.output
        assert f"batch {batch_id} of alive: {len(mine)} files assigned, running again" in result.output
        assert worker.wait(timeout=120) == 0, study.worker_log("alive")
    finally:
        kill_leftovers(str(tmp_path))
    log = study.worker_log("alive")
    assert f"batch {batch_id}: done" in log and "fenced" not in log, log
    state = study.files()
    assert {state[str(Path(t).relative_to(study.input.resolve()))] for t in mine} == {(models.DONE, batch_id)}
    assert {s for s, _b in state.values()} == {models.DONE}
    ledger = study.ledger
    row = ledger.transact(lambda c: c.execute(sa.select(Batch.worker_id, Batch.state).where(Batch.id == batch_id)).one())
    assert tuple(row) == ("alive", models.BATCH_DONE)
    check_exactly_once(pod5_reads(study.input), study.output)
    assert not list((study.output / "work").glob("ASSIGNED_*"))
    # The next claim (a new file arrives) gets a fencing token above everything seen before the rebuild.
    write_pod5(study.input / "late" / "new.pod5", 3, seed=99)
    assert study.cli("scan").returncode == 0
    claim.register_worker(ledger, "w-next", "node", 1, None)
    nxt = claim.claim_batch(ledger, "w-next", ledger.read_settings())
    assert nxt.batch_id > batch_id


def test_batch_ids_after_a_rebuild_exceed_every_id_the_old_ledger_handed_out(tmp_path):
    """The old ledger is still readable (e.g. rebuilt because its content went wrong): its id sequence
    counts, even for batches that left no trace on disk."""
    study = make_study(tmp_path, 3, 1)
    ledger = study.ledger
    settings = ledger.read_settings()
    claim.register_worker(ledger, "w", "node", 1, None)
    for _ in range(40):  # claims released at once: ids consumed, nothing on disk
        b = claim.claim_batch(ledger, "w", settings)
        claim.release_batch(ledger, b, "test")
    assert b.batch_id == 40
    rebuild_ledger(study.input, study.output)
    ledger = study.ledger
    claim.register_worker(ledger, "w", "node", 1, None)
    assert claim.claim_batch(ledger, "w", settings).batch_id > 40


def test_batch_ids_after_losing_the_ledger_exceed_every_id_left_on_disk(tmp_path):
    study = make_study(tmp_path, 3, 1)
    (study.output / "logs" / "7001.log").write_text("[ledgerbc] running: dorado ...\n")  # a batch long gone
    (study.output / "work" / "ASSIGNED_6500_dead@node").mkdir()
    (study.output / "work" / "staging" / "6900").mkdir(parents=True)
    study.ledger_path.unlink()
    rebuild_ledger(study.input, study.output)
    ledger = study.ledger
    claim.register_worker(ledger, "w", "node", 1, None)
    assert claim.claim_batch(ledger, "w", ledger.read_settings()).batch_id > 7001


HOT_JOURNAL = r"""
import os, sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
# The old ledger's last committed state: every file failed (what a rebuild must not bring back).
conn.execute("UPDATE pod5_files SET state = 'failed', attempts = 3, last_error = 'OLD LEDGER PAGE'")
conn.execute("PRAGMA cache_size=1")  # changed pages spill into the file mid-transaction
conn.execute("BEGIN IMMEDIATE")
conn.execute("UPDATE pod5_files SET last_error = 'in flight'")
conn.execute("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 3000) "
             "INSERT INTO events(ts, kind, message) SELECT i, 'x', hex(randomblob(200)) FROM n")
os._exit(9)  # killed mid-transaction: a hot journal (the pages as they were before it) stays beside the ledger
"""


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["deleted", "garbage"])
@WITH_AND_WITHOUT_BARCODES
def test_a_hot_journal_left_by_the_lost_ledger_does_not_corrupt_the_rebuilt_one(tmp_path, loss, kit):
    study = make_study(tmp_path, 3, 1, kit_name=kit)
    subprocess.run([sys.executable, "-c", HOT_JOURNAL, str(study.ledger_path)], check=False, timeout=60)
    journal = Path(f"{study.ledger_path}-journal")
    assert journal.stat().st_size > 0
    if loss == "deleted":
        study.ledger_path.unlink()
    else:
        study.ledger_path.write_bytes(os.urandom(16 * 1024))
    result = study.invoke("recover", "--rebuild", "--input", study.input, "--output", study.output)
    assert result.exit_code == 0, result.output
    # Rolling the old ledger's journal back into the new file would bring back its pages ("failed" rows).
    assert study.status()["files"]["pending"] == 3
    assert {s for s, _b in study.files().values()} == {models.PENDING}
    conn = sqlite3.connect(study.ledger_path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        conn.close()
    finish = study.cli("run", "--worker-id", "after")
    assert finish.returncode == 0, finish.stderr
    check_exactly_once(pod5_reads(study.input), study.output)


@pytest.mark.slow
@WITH_AND_WITHOUT_BARCODES
def test_a_worker_whose_ledger_stays_lost_gives_up_and_a_rebuild_lets_others_finish_its_batch(tmp_path, kit):
    study = make_study(tmp_path, 2, 2, lease="3s", delay=3, kit_name=kit)
    worker = study.start_worker("stranded")
    try:
        deadline = time.monotonic() + 60
        while not basecallers_of(worker.pid):
            assert time.monotonic() < deadline and worker.poll() is None, study.worker_log("stranded")
            time.sleep(0.1)
        study.ledger_path.unlink()  # lost mid-batch, and nobody rebuilds it within a lease
        # dorado finishes; the publication waits one lease for the ledger, then the worker gives up.
        assert worker.wait(timeout=60) == 4, study.worker_log("stranded")
        assert "giving up" in study.worker_log("stranded")
        assigned = list((study.output / "work").glob("ASSIGNED_*_stranded"))
        assert len(assigned) == 1, "the unpublished batch's folder is what a rebuild adopts"
        assert not list((study.output / "pass").rglob("*.fastq"))

        result = study.cli("recover", "--rebuild", "--input", study.input, "--output", study.output)
        assert result.returncode == 0, result.stderr
        assert f"batch {assigned[0].name.split('_')[1]} of stranded: 1 files assigned, running again" in result.stdout
        finish = study.cli("run", "--worker-id", "rescuer")  # the watchman reclaims the dead batch
        assert finish.returncode == 0, finish.stderr
    finally:
        kill_leftovers(str(tmp_path))
    assert "reclaimed batch" in finish.stderr
    assert {s for s, _b in study.files().values()} == {models.DONE}
    check_exactly_once(pod5_reads(study.input), study.output)
    assert not list((study.output / "work").glob("ASSIGNED_*"))


@pytest.mark.slow
@pytest.mark.parametrize("error, raised", [
    ("LedgerNotFound", True),  # the worker gives up on the ledger (exit 4)
    ("LedgerError", False),  # the batch is failed, the worker goes on
])
def test_a_ledger_error_mid_batch_does_not_leave_dorado_running(tmp_path, monkeypatch, error, raised):
    """dorado runs in its own session: a batch ending on a ledger error must stop it, or it runs on orphaned."""
    from ledgerbc import batch as batch_mod
    from ledgerbc import dorado, errors, run

    study = make_study(tmp_path, 1, 1, lease="3s", hang=1)  # dorado never finishes on its own
    ledger = study.ledger
    worker = run.Worker(ledger, ledger.read_settings(), run.WorkerOptions(worker_id="w"),
                        str(study.root / "bin" / "dorado"), env=study.env())
    started, real = [], dorado.DoradoProcess

    def recording(*args, **kwargs):
        started.append(real(*args, **kwargs))
        return started[-1]

    def broken_ledger():
        if started:
            raise getattr(errors, error)(f"ledger {study.ledger_path}: disk I/O error. Run `ledgerbc doctor`.")

    monkeypatch.setattr(batch_mod.dorado, "DoradoProcess", recording)
    monkeypatch.setattr(worker.janitor, "maybe_run", broken_ledger)
    claim.register_worker(ledger, "w", "node", 1, None)
    batch = claim.claim_batch(ledger, "w", worker.settings)
    job = batch_mod.BatchRun(worker.crew, batch, more=False)
    try:
        if raised:
            with pytest.raises(errors.LedgerError, match="disk I/O error"):
                job.execute()
        else:
            assert job.execute() == "failed"
        assert started and started[0].proc.poll() is not None, "dorado left running"
    finally:
        kill_leftovers(str(tmp_path))


def test_a_ledger_deleted_under_an_open_transaction_is_reported_as_lost_not_as_an_internal_error(tmp_path):
    """SQLite answers a write to a file unlinked mid-transaction with "attempt to write a readonly
    database" (SQLITE_READONLY_DBMOVED). That is a lost ledger: LedgerNotFound, which a worker waits out
    until a rebuild, not a generic error that ends the worker with exit 1."""
    from ledgerbc import errors
    from ledgerbc.models import Event

    study = make_study(tmp_path, 1, 1)
    ledger = study.ledger

    def deleted_meanwhile(conn):
        study.ledger_path.unlink(missing_ok=True)
        conn.execute(sa.insert(Event).values(ts=1.0, kind="test"))

    with pytest.raises(errors.LedgerNotFound, match="disappeared.*recover --rebuild"):
        ledger.transact(deleted_meanwhile)
