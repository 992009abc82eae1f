"""`ledgerbc run` against bad files and a misbehaving dorado: crash, hang, SIGTERM; heartbeats."""
import os
import signal

import pytest

from helpers import (
    REAL_POD5, Study, assert_work_tree_clean, batch, check_outputs, events, files_by_rel, pid_alive,
    wait_for,
)
from ledgerbc import lease, models
from ledgerbc.testkit.synth import make_dataset, truncate_copy, write_pod5


def _by_batch(study: Study, batch_id: int) -> dict:
    return {rel: r for rel, r in files_by_rel(study.ledger).items() if r.batch_id == batch_id}


@pytest.mark.slow
def test_corrupt_and_truncated_files_fail_with_their_error_and_good_ones_are_done(study: Study):
    make_dataset(study.input, 12, seed=11, hostile_names=False)
    (study.input / "real").mkdir()
    (study.input / "real" / "single_split_read.pod5").write_bytes(
        (REAL_POD5 / "single_split_read" / "single_split_read.pod5").read_bytes())
    (study.input / "bad").mkdir()
    truncate_copy(REAL_POD5 / "multi_read_pod5" / "filtered.pod5", study.input / "bad" / "cut short.pod5")
    write_pod5(study.input / "bad" / "REFUSE_ME.pod5", 5, seed=1)  # the stand-in is told it is corrupt
    rotten = study.input / "bad" / "rotten.pod5"
    write_pod5(rotten, 6, seed=2)
    study.init("--batch-files", 4, "--min-qscore", 10, "--max-attempts", 3)

    # Admission: the truncated copy failed at scan, with the pod5 check's error; the others are pending.
    rows = files_by_rel(study.ledger)
    cut = rows["bad/cut short.pod5"]
    assert (cut.state, cut.attempts, cut.batch_id) == (models.FAILED, 0, None)
    assert "not a complete pod5 file" in cut.last_error
    assert rows["bad/rotten.pod5"].state == rows["bad/REFUSE_ME.pod5"].state == models.PENDING

    # A file that goes bad after the scan (bit rot, a botched re-copy): same size, random bytes.
    rotten.write_bytes(os.urandom(rotten.stat().st_size))

    workers = [study.start_worker(f"w{i}", LEDGERBC_SIM_FAIL_MATCH="REFUSE_ME") for i in range(2)]
    assert study.wait_workers(workers, timeout=120) == {"w0": 0, "w1": 0}

    rows = files_by_rel(study.ledger)
    bad = {"bad/REFUSE_ME.pod5": "dorado returned no reads", "bad/rotten.pod5": "cannot be read"}
    for rel, why in bad.items():
        r = rows[rel]
        assert (r.state, r.attempts) == (models.FAILED, 3), rel
        assert why in r.last_error and os.path.basename(rel) in r.last_error, r.last_error
        assert "[error]" in r.last_error, r.last_error  # dorado's own line about that file is kept
        failures = events(study.ledger, "file-failed")
        attempts = [e for e in failures if e.file_id == r.id]
        assert len(attempts) == 3
        # After its first failure the file is retried alone, so it cannot fail batch-mates again.
        assert all(batch(study.ledger, e.batch_id).n_files == 1 for e in attempts[1:])
    assert events(study.ledger, "file-failed") and all(
        e.file_id in {rows[rel].id for rel in bad} for e in events(study.ledger, "file-failed"))

    good = {rel: r for rel, r in rows.items() if rel not in bad and rel != "bad/cut short.pod5"}
    assert len(good) == 13
    # Good files are done at the first attempt, batch-mates of a bad file included.
    assert {(r.state, r.attempts) for r in good.values()} == {(models.DONE, 0)}
    outputs = check_outputs(study, "fastq", min_qscore=10)
    assert set(outputs.passed) == set(good)
    assert not (study.output / "pass" / "bad").exists() and not (study.output / "fail" / "bad").exists()

    status = study.status()
    assert status["files"]["failed"] == 3 and status["files"]["done"] == 13
    assert {f["path"]: f["error"] for f in status["failed"]} == {
        rel: rows[rel].last_error for rel in ("bad/cut short.pod5", *bad)}
    text = study.cli("status", "--ledger", study.ledger_path).stdout
    for rel in ("bad/cut short.pod5", *bad):
        assert rel in text
    assert_work_tree_clean(study)


@pytest.mark.slow
def test_dorado_crash_counts_attempts_then_fails_with_the_error_kept(study: Study):
    make_dataset(study.input, 3, seed=12, hostile_names=False)
    study.init("--batch-files", 8, "--max-attempts", 2)

    first = study.start_worker("w1", "--max-batches", "1", LEDGERBC_SIM_CRASH=1)
    assert study.wait_workers([first], timeout=60) == {"w1": 0}
    (failed_batch,) = events(study.ledger, "batch-failed")
    b = batch(study.ledger, failed_batch.batch_id)
    assert b.state == models.BATCH_FAILED and "dorado exited with status 1" in b.error
    rows = files_by_rel(study.ledger)
    in_batch = {rel for rel, r in rows.items() if r.attempts}
    assert len(in_batch) == b.n_files
    for rel, r in rows.items():  # back to pending, attempts+1 for the batch's files, the error kept
        assert r.state == models.PENDING and r.batch_id is None
        assert (r.attempts, r.last_error is not None) == ((1, True) if rel in in_batch else (0, False))
        if rel in in_batch:
            assert "dorado exited with status 1" in r.last_error and "simulated crash" in r.last_error
    log = (study.output / "logs" / f"{b.id}.log").read_text()
    assert "[error] simulated crash" in log
    assert not study.published()

    second = study.start_worker("w2", LEDGERBC_SIM_CRASH=1)
    assert study.wait_workers([second], timeout=60) == {"w2": 0}  # a bad batch never kills the worker
    rows = files_by_rel(study.ledger)
    assert {(r.state, r.attempts) for r in rows.values()} == {(models.FAILED, 2)}
    assert all("dorado exited with status 1" in r.last_error and "simulated crash" in r.last_error
               for r in rows.values())
    assert not study.published()
    status = study.status()
    assert status["files"]["failed"] == 3
    assert {f["path"]: (f["attempts"], f["error"]) for f in status["failed"]} == {
        rel: (2, r.last_error) for rel, r in rows.items()}
    text = study.cli("status", "--ledger", study.ledger_path).stdout
    assert all(rel in text for rel in rows) and "dorado exited with status 1" in text
    assert not study.dorado_pids()
    assert_work_tree_clean(study)


@pytest.mark.slow
def test_dorado_hang_is_bounded_by_the_batch_timeout(study: Study):
    make_dataset(study.input, 3, seed=13, hostile_names=False)
    flag = study.root / "hang"
    flag.touch()
    study.dorado_while(flag, once=True, LEDGERBC_SIM_HANG=1)  # the first dorado run hangs, later ones work
    study.init("--batch-files", 8, "--max-attempts", 2, "--batch-timeout", "3s")

    worker = study.start_worker("w")
    hung, pid = study.dorado_running()
    hung_files = set(_by_batch(study, hung.id))
    # 3 s of timeout and 3 s of grace for a dorado that ignores SIGTERM; far less than "forever".
    assert study.wait_workers([worker], timeout=60) == {"w": 0}
    assert not pid_alive(pid)
    assert not study.dorado_pids()

    b = batch(study.ledger, hung.id)
    assert b.state == models.BATCH_FAILED and "timed out after 3s" in b.error
    assert [e.batch_id for e in events(study.ledger, "batch-failed")] == [hung.id]
    rows = files_by_rel(study.ledger)
    assert {r.state for r in rows.values()} == {models.DONE}
    assert {rel for rel, r in rows.items() if r.attempts == 1} == hung_files
    assert all(r.attempts == 0 for rel, r in rows.items() if rel not in hung_files)
    check_outputs(study)
    assert_work_tree_clean(study)


@pytest.mark.slow
def test_sigterm_mid_batch_stops_dorado_releases_the_batch_and_exits_143(study: Study):
    make_dataset(study.input, 4, seed=14, hostile_names=True)
    study.init("--batch-files", 8)
    worker = study.start_worker("w", LEDGERBC_SIM_DELAY=60)
    running, pid = study.dorado_running()

    # While dorado runs, the worker refreshes the batch's lease every heartbeat (1 s): in its lease file,
    # and in the ledger every half lease (10 s).
    def last_beat():
        return lease.last_beat(study.ledger_path, running.id, running.worker_id, batch(study.ledger, running.id).heartbeat_at)

    beats = [running.heartbeat_at]
    for _ in range(2):
        wait_for(lambda: last_beat() > beats[-1], 60, "a heartbeat")  # 1 s apart; generous for a loaded machine
        beats.append(last_beat())
    assert running.claimed_at <= beats[0] < beats[1] < beats[2]
    wait_for(lambda: batch(study.ledger, running.id).heartbeat_at > running.heartbeat_at, 60, "a ledger heartbeat")
    (live,) = study.status()["running_batches"]
    assert live["batch_id"] == running.id and live["heartbeat_age_s"] < 20  # within the lease: alive
    before = _by_batch(study, running.id)
    assert before and {r.attempts for r in before.values()} == {0}

    worker.send_signal(signal.SIGTERM)
    # Released at once: far sooner than the 60 s dorado would need.
    assert study.wait_workers([worker], timeout=20) == {"w": 143}
    assert not pid_alive(pid), "dorado was left running"
    assert not study.dorado_pids()

    b = batch(study.ledger, running.id)
    assert b.state == models.RELEASED
    assert events(study.ledger, "batch-released", running.id)
    rows = files_by_rel(study.ledger)
    for rel in before:
        assert (rows[rel].state, rows[rel].attempts, rows[rel].batch_id) == (models.PENDING, 0, None)
    assert {r.state for r in rows.values()} == {models.PENDING}
    status = study.status()
    assert status["running_batches"] == [] and [w["state"] for w in status["workers"]] == ["exited"]
    assert not study.published()
    assert_work_tree_clean(study)
