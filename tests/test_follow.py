"""Follow mode (follow.py, DESIGN §7): admission while a sequencer writes, one rate-limited scanner, the end
of a run (final summary or --idle-exit), and what status shows.

The live-run tests are real: a writer process makes pod5 files with `pod5.Writer` while `ledgerbc run
--follow` workers (subprocesses, stand-in dorado on PATH) basecall them.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

from helpers import (
    KIT, Study, assert_work_tree_clean, check_outputs, events, files_by_rel, query, wait_for,
)
from ledgerbc import follow, models, status
from ledgerbc import scan as scan_module
from ledgerbc.create import init_ledger
from ledgerbc.db import Ledger
from ledgerbc.follow import RunState, find_final_summary, scan_interval, take_scanner_role
from ledgerbc.scan import Scanner
from ledgerbc.settings import Settings
from ledgerbc.testkit.synth import truncate_copy, write_pod5

WRITER = Path(__file__).with_name("live_writer.py")
SETTLE = 2.0
# The live runs, unbarcoded and with --kit-name (outputs per barcode folder, the summary as done marker).
WITH_AND_WITHOUT_BARCODES = pytest.mark.parametrize("barcoding", [[], ["--kit-name", KIT]], ids=["flat", "barcoded"])


def summary_text(n: int) -> str:
    return f"instrument=PC24B000\nflow_cell_id=PAW00000\npod5_files_in_final_dest={n}\npod5_files_in_fallback=0\n"


# -- the final summary --------------------------------------------------------------------------------------
def test_final_summary_is_looked_for_in_input_dir_and_above_a_pod5_folder_only(tmp_path):
    run = tmp_path / "run"
    pod5_dir = run / "pod5"
    pod5_dir.mkdir(parents=True)
    assert find_final_summary(run) is None and find_final_summary(pod5_dir) is None

    (run / "final_summary_PAW00000_abc_123.txt").write_text(summary_text(42))
    assert find_final_summary(pod5_dir).expected_files == 42  # INPUT_DIR is the run's pod5/ folder
    assert find_final_summary(run).expected_files == 42  # INPUT_DIR is the run folder
    other = run / "not_a_pod5_folder"
    other.mkdir()
    assert find_final_summary(other) is None  # only a pod5* folder's parent is the run folder

    parent = tmp_path  # a folder of runs: subfolders are not searched (one run's end is not the input's)
    assert find_final_summary(parent) is None

    (run / "final_summary_PAW00000_def_456.txt").write_text(summary_text(8))
    both = find_final_summary(run)
    assert both.expected_files == 50 and len(both.paths) == 2
    (run / "final_summary_PAW00000_ghi_789.txt").write_text("instrument=PC24B000\n")  # no count (yet)
    assert find_final_summary(run).expected_files is None
    assert follow.parse_expected_files("a=1\n pod5_files_in_final_dest = 7 \n") == 7
    assert follow.parse_expected_files("pod5_files_in_final_dest=seven\n") is None


def test_scan_interval_follows_settle_within_bounds_and_backs_off_for_slow_scans():
    assert scan_interval(2) == 3.0  # floor
    assert scan_interval(60) == 15.0  # settle / 4
    assert scan_interval(3600) == 60.0  # capped
    assert scan_interval(60, last_scan_seconds=30) == 120.0  # 4x a slow walk


# -- the end of a run, from the ledger's counts ----------------------------------------------------------------
def state(summary_n=-1, **counts) -> RunState:
    summary = None if summary_n == -1 else follow.FinalSummary(("x",), summary_n)
    return RunState(counts=counts, summary=summary)


def test_end_of_run_rules():
    # no summary: only --idle-exit ends it, never with pending work, waiting files do not hold it
    assert state(done=5).end_reason(idle_for=1e6, idle_exit=None) is None
    assert state(done=5, waiting=2).end_reason(idle_for=11, idle_exit=10) is not None
    assert state(done=5).end_reason(idle_for=9, idle_exit=10) is None
    assert state(pending=1).end_reason(idle_for=1e6, idle_exit=10) is None
    # summary: every expected file seen and nothing pending or waiting
    assert state(5, done=4, failed=1).end_reason(idle_for=0, idle_exit=None) is not None
    assert state(5, done=4, waiting=1).end_reason(idle_for=1e6, idle_exit=1) is None
    assert state(5, done=4, pending=1).end_reason(idle_for=1e6, idle_exit=1) is None
    assert state(None, done=1).end_reason(idle_for=0, idle_exit=None) is not None  # count unknown
    # fewer files than the summary counts: a grace of --idle-exit, else SHORT_RUN_GRACE
    assert state(5, done=3).end_reason(idle_for=60, idle_exit=None) is None
    assert "only 3 were seen" in state(5, done=3).end_reason(idle_for=follow.SHORT_RUN_GRACE, idle_exit=None)
    assert state(5, done=3).end_reason(idle_for=11, idle_exit=10) is not None


# -- the scanner role ---------------------------------------------------------------------------------------------
def test_one_scanner_at_a_time_rate_limited_and_replaced_when_busy_or_dead(make_ledger):
    ledger, _ = make_ledger()
    ttl, interval = 30.0, 5.0

    def take(worker, now):
        return ledger.transact(take_scanner_role, now, worker, ttl, interval)

    assert take("w1", 100.0)
    assert not take("w2", 101.0)  # w1 is alive and idle
    assert not take("w1", 102.0)  # not within the interval of the last scan, even for the holder
    assert not take("w2", 110.0)  # interval passed, but w1 still holds it and is idle
    assert take("w1", 110.0)
    # w1 starts basecalling: w2 takes over once the interval since w1's last scan has passed
    ledger.transact(lambda c: c.execute(sa.insert(models.Batch).values(
        worker_id="w1", state=models.RUNNING, claimed_at=111.0, heartbeat_at=111.0, n_files=1, n_bytes=1)))
    assert not take("w2", 112.0)
    assert take("w2", 115.5)
    assert not take("w1", 130.0)  # w2 holds it now and is idle
    assert take("w3", 115.5 + ttl + 1)  # w2 went silent longer than the ttl


# -- the scanner's admission rules with acquisition over ----------------------------------------------------------
def follow_ledger(tmp_path, settle=60.0):
    inp = tmp_path / "input"
    inp.mkdir()
    path, _, _ = init_ledger(Settings(input_dir=str(inp), output_dir=str(tmp_path / "output"), settle=settle))
    return Ledger(path), inp


def rows(ledger):
    return {r.rel_path: r for r in ledger.transact(lambda c: c.execute(sa.select(models.Pod5File)).all())}


def test_once_the_run_is_over_settle_is_waived_and_incomplete_files_fail_at_once(tmp_path):
    ledger, inp = follow_ledger(tmp_path)
    write_pod5(inp / "complete.pod5", 3)
    (inp / "dead").mkdir()
    (inp / "dead" / f".{uuid.uuid4()}.tmp-reads").write_bytes(b"")  # a writer that died mid-file
    truncate_copy(inp / "complete.pod5", inp / "dead" / "cut.pod5")
    scanner = Scanner(ledger, ledger.read_settings(), follow=True)
    scanner.scan()
    scanner.scan()
    before = rows(ledger)
    assert before["complete.pod5"].state == models.WAITING  # written just now: settling
    assert before["dead/cut.pod5"].state == models.WAITING  # writer temporaries beside it

    scanner.acquisition_over = True
    report = scanner.scan()
    after = rows(ledger)
    assert after["complete.pod5"].state == models.PENDING
    cut = after["dead/cut.pod5"]
    assert cut.state == models.FAILED and cut.batch_id is None
    assert "not a complete pod5 file" in cut.last_error and "final summary exists" in cut.last_error
    assert (report.added, report.failed) == (1, 1)


def test_a_scanner_does_not_reopen_files_another_scanner_admitted(tmp_path, monkeypatch):
    ledger, inp = follow_ledger(tmp_path)
    for i in range(3):
        write_pod5(inp / f"f{i}.pod5", 2, seed=i)
    settings = ledger.read_settings()
    first, second = Scanner(ledger, settings, follow=True), Scanner(ledger, settings, follow=True)
    first.scan()
    second.acquisition_over = True
    assert second.scan().added == 3  # the other worker, now the scanner, admitted them

    opened = []
    real = scan_module.observe
    monkeypatch.setattr(scan_module, "observe", lambda *a: opened.append(a[1]) or real(*a))
    report = first.scan()
    assert opened == [] and report.unchanged == 3


# -- status --------------------------------------------------------------------------------------------------
def test_status_shows_the_follow_section(tmp_path):
    ledger, inp = follow_ledger(tmp_path, settle=0.0)
    write_pod5(inp / "a.pod5", 2)
    Scanner(ledger, ledger.read_settings(), follow=True).scan()
    data = status.report(ledger)["follow"]
    assert data == {
        "scanner": None, "last_scan_age_s": None, "final_summary": None, "expected_files": None,
        "files_seen": 1, "files_done": 0, "files_waiting": 0, "files_to_come": None, "run_over": False,
    }
    ledger.transact(take_scanner_role, ledger.clock(), "w1", 60.0, 5.0)
    follow.record_final_summary(ledger, follow.FinalSummary(("/run/final_summary_x.txt",), 3))
    data = status.report(ledger)
    section = data["follow"]
    assert section["scanner"] == "w1" and section["last_scan_age_s"] >= 0
    assert section["final_summary"] == ["/run/final_summary_x.txt"]
    assert (section["expected_files"], section["files_to_come"], section["run_over"]) == (3, 2, False)
    text = status.render(data)
    assert "follow:  run ended (final_summary_x.txt): 1 of 3 files seen, 0 done, 0 waiting" in text
    assert "scanner w1" in text


# -- live runs, end to end ----------------------------------------------------------------------------------
def start_writer(study: Study, run_dir: Path, n_files: int) -> tuple[subprocess.Popen, Path]:
    log = study.root / "writer.jsonl"
    proc = subprocess.Popen(
        [sys.executable, str(WRITER), str(study.input), str(run_dir), str(n_files), str(log)],
        env=study.env(), stdout=subprocess.DEVNULL, stderr=open(study.root / "writer.err", "wb"),
    )
    study.procs.append(proc)  # killed by study.close() if the test fails
    proc.worker_id = "writer"
    return proc, log


def writer_log(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


@pytest.mark.slow
@WITH_AND_WITHOUT_BARCODES
def test_a_live_run_is_basecalled_once_never_before_each_file_is_complete(study, barcoding):
    n_files = 60
    run_dir = study.root / "run"
    study.input = run_dir / "pod5"  # INPUT_DIR is the run's pod5/ folder: the summary is in its parent
    study.input.mkdir(parents=True)
    study.init("--batch-files", "4", "--settle", f"{SETTLE:g}s", *barcoding)  # on an empty INPUT_DIR
    workers = [study.start_worker(f"w{i}", "--follow") for i in (1, 2, 3)]
    time.sleep(1.0)
    writer, log = start_writer(study, run_dir, n_files)

    # While the writer writes: files in flight are seen and held back as waiting, no summary yet.
    snapshots = []
    while writer.poll() is None:
        snapshots.append(status.report(study.ledger))
        time.sleep(1.0)
    assert writer.returncode == 0, (study.root / "writer.err").read_text()
    assert max(s["files"]["waiting"] for s in snapshots) >= 1, "the scanner never saw a file being written"
    middle = snapshots[len(snapshots) // 2]
    assert middle["follow"]["final_summary"] is None and middle["follow"]["scanner"] in {"w1", "w2", "w3"}
    assert 0 < middle["follow"]["files_seen"] < n_files

    entries = writer_log(log)
    closed = {e["rel"]: e["closed_at"] for e in entries if "rel" in e}
    summary_at = entries[-1]["written_at"]
    assert len(closed) == n_files

    # Every file gets done (how long the backlog takes depends on the machine's load: bounded generously),
    # then all workers leave on their own, soon after the last one is done.
    ledger = study.ledger
    wait_for(lambda: status.report(ledger)["files"]["done"] == n_files, max(10.0, summary_at + 120 - time.time()),
             "every file to be basecalled")
    last_done = max(r.done_at for r in files_by_rel(ledger).values())
    codes = study.wait_workers(workers, timeout=max(1.0, last_done + 20 - time.time()))
    assert codes == {"w1": 0, "w2": 0, "w3": 0}, codes
    print(f"final summary written {summary_at:.1f}, last file done {last_done - summary_at:+.1f}s, "
          f"workers gone {time.time() - summary_at:+.1f}s")

    files = files_by_rel(ledger)
    assert set(files) == set(closed)
    assert {r.state for r in files.values()} == {models.DONE}
    batches = {b.id: b for b in query(ledger, sa.select(models.Batch))}
    assert {b.state for b in batches.values()} == {models.BATCH_DONE}
    assert sum(b.n_files for b in batches.values()) == n_files  # no file was ever claimed twice
    for rel, row in files.items():
        claimed_at = batches[row.batch_id].claimed_at
        assert claimed_at > closed[rel], f"{rel} was claimed before its writer closed it"
        mtime = (study.input / rel).stat().st_mtime
        # Settled, or admitted once the final summary existed: acquisition is over, so a complete file
        # does not wait for the settle time any more (docs/follow.md).
        assert claimed_at >= mtime + SETTLE - 0.1 or claimed_at >= summary_at, f"{rel} was claimed before it settled"
    assert not events(ledger, "admission-failed") and not events(ledger, "batch-failed")

    outputs = check_outputs(study)  # each read of each pod5 exactly once, split reads via pi:Z
    split = [r for rel in files for r in outputs.records(rel) if "pi" in r.tags]
    assert len(split) == 2 * 3  # files 7, 27 and 47 each hold one read the stand-in dorado splits in two
    assert_work_tree_clean(study)

    final = study.status()["follow"]
    assert final["final_summary"] == [str(run_dir / "final_summary_PAW00000_live_0a1b2c3d.txt")]
    assert (final["expected_files"], final["files_seen"], final["files_done"]) == (n_files, n_files, n_files)
    assert final["run_over"] and final["scanner"] is None
    text = study.cli("status", "--ledger", study.ledger_path).stdout
    assert f"{n_files} of {n_files} files seen, {n_files} done" in text


@pytest.mark.slow
@pytest.mark.parametrize("ending", ["final-summary", "idle-exit"])
@WITH_AND_WITHOUT_BARCODES
def test_a_truncated_pod5_is_failed_not_claimed_and_does_not_hold_the_run(study, ending, barcoding):
    good = [study.input / "PAW_good_0.pod5", study.input / "barcode02" / "PAW_good_1.pod5"]
    for i, path in enumerate(good):
        write_pod5(path, 5, seed=i)
    study.init("--batch-files", "4", "--settle", f"{SETTLE:g}s", *barcoding)
    options = ["--follow"] + (["--idle-exit", "6s"] if ending == "idle-exit" else [])
    workers = [study.start_worker(f"w{i}", *options) for i in (1, 2)]
    started = time.time()

    rel = "cut/PAW_truncated.pod5"
    (study.input / "cut").mkdir()
    if ending == "final-summary":
        # A writer that died: its temporaries stay, so only the end of acquisition can settle the file.
        (study.input / "cut" / f".{uuid.uuid4()}.tmp-reads").write_bytes(b"\0" * 100)
    truncate_copy(good[0], study.input / rel)

    ledger = study.ledger
    if ending == "final-summary":
        wait_for(lambda: rel in files_by_rel(ledger), 20, "the truncated file to be seen")
        time.sleep(3 * SETTLE + 4)  # well past settle + a scan interval: it is still only waiting
        row = files_by_rel(ledger)[rel]
        assert (row.state, row.batch_id) == (models.WAITING, None)
        assert all(w.poll() is None for w in workers), "a worker left before the run ended"
        (study.input / "final_summary_PAW00000_cut_1.txt").write_text(summary_text(3))
        codes = study.wait_workers(workers, timeout=120)  # the end of the run is seen: both leave
    else:
        codes = study.wait_workers(workers, timeout=90)  # generous: worker start-up is slow on a loaded machine
        assert time.time() - started >= 6  # not before --idle-exit
    assert codes == {"w1": 0, "w2": 0}, codes

    files = files_by_rel(ledger)
    cut = files[rel]
    assert cut.state == models.FAILED and cut.batch_id is None and cut.attempts == 0
    expected_error = "final summary exists" if ending == "final-summary" else "unchanged for"
    assert "not a complete pod5 file" in cut.last_error and expected_error in cut.last_error
    assert {files[p.relative_to(study.input).as_posix()].state for p in good} == {models.DONE}
    assert sum(b.n_files for b in query(ledger, sa.select(models.Batch))) == 2  # never claimed
    check_outputs(study)

    data = study.status()
    assert [{k: f[k] for k in ("path", "attempts", "error")} for f in data["failed"]] == [  # keys only get added
        {"path": rel, "attempts": 0, "error": cut.last_error}]
    assert data["follow"]["run_over"] is (ending == "final-summary")
    text = study.cli("status", "--ledger", study.ledger_path).stdout
    assert "failed files (1):" in text and rel in text and expected_error in text
