"""Storage full, end to end (DESIGN §4): OUTPUT_DIR and the ledger on a small tmpfs, filled mid-run by a
filler file. Every worker exits on its own with exit code 11 and one line naming the folder, no file is
failed because of it, the ledger stays intact; once the filler is removed, one `run` finishes the study
exactly once.

Needs root (the test mounts its own tmpfs and unmounts it in a finally); skips elsewhere.
"""
import re
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from ledgerbc import models
from helpers import assert_verified, check_exactly_once, events, kill_leftovers, make_study, pod5_reads

pytestmark = pytest.mark.slow

N_FILES = 40
WORKERS = 3
FULL = re.compile(r"(no space left on the filesystem of \S+|the ledger \S+ cannot be written: its filesystem is full)")


@pytest.fixture
def small_disk(tmp_path):
    """A 24 MB tmpfs of this test's own, unmounted whatever happens."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}): needs root")
    try:
        yield mount
    finally:
        kill_leftovers(str(tmp_path))
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(folder: Path) -> Path:
    """Write a filler file until the filesystem refuses a single byte more."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as fh:
        for chunk in (1 << 20, 1 << 12, 1):
            try:
                while True:
                    fh.write(b"\0" * chunk)
            except OSError:
                continue
    return filler


@pytest.mark.parametrize("ledger_too", [True, False], ids=["output-and-ledger", "output-only"])
def test_a_full_disk_makes_every_worker_give_back_its_batch_and_exit_11(tmp_path, small_disk, ledger_too):
    """With the ledger on the full disk too, a batch cannot be given back (the ledger cannot be written): its
    lease expires instead. With only OUTPUT_DIR full, every batch is given back at once, no attempt counted."""
    ledger = None if ledger_too else tmp_path / "ledger" / "ledgerbc.db"
    if ledger is not None:
        ledger.parent.mkdir()
    study = make_study(tmp_path, N_FILES, 3, lease="5s", output=small_disk / "out", ledger=ledger, delay=1, seconds_per_mb=4)
    workers = {f"w{i}": study.start_worker(f"w{i}") for i in range(WORKERS)}
    deadline = time.monotonic() + 120
    while study.status()["files"]["done"] < 6:  # some batches published, others in flight
        assert time.monotonic() < deadline, "no progress before the disk was filled"
        time.sleep(0.2)
    filler = fill(small_disk)
    filled_at = time.monotonic()
    exits = {}
    for worker_id, proc in workers.items():
        code = proc.wait(timeout=180)  # a guard against a hang, not a timing assertion
        exits[worker_id] = (code, time.monotonic() - filled_at)
    print("storage full: worker exit code and seconds after the disk filled: "
          + ", ".join(f"{w} {c} {t:.1f}s" for w, (c, t) in sorted(exits.items())))
    for worker_id, (code, _t) in exits.items():
        log = study.worker_log(worker_id)
        assert code == 11, f"{worker_id} exited {code}:\n{log[-3000:]}"
        assert "Traceback" not in log, log[-3000:]
        said = [line for line in log.splitlines() if FULL.search(line)]
        assert len(said) == 1, f"{worker_id} did not say it once: {said}\n{log[-3000:]}"
        assert str(study.output) in said[0] and "nothing failed" in said[0], said[0]
        print(f"{worker_id}: {said[0]}")

    # Nothing failed because of the disk; the ledger is intact.
    conn = sqlite3.connect(study.ledger_path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        states = dict(conn.execute("SELECT state, count(*) FROM pod5_files GROUP BY state").fetchall())
        attempts = conn.execute("SELECT max(attempts) FROM pod5_files").fetchone()[0]
    finally:
        conn.close()
    assert models.FAILED not in states, states
    assert states.get(models.DONE, 0) < N_FILES, "the disk filled only after the run: the test proves nothing"
    if not ledger_too:
        assert attempts == 0 and models.CLAIMED not in states, (states, attempts, study.files(), [(e.kind, e.batch_id, e.message) for e in events(study.ledger) if e.kind.startswith(("batch-", "file-"))][-12:])

    filler.unlink()
    finish = study.cli("run", "--worker-id", "after", timeout=300)
    assert finish.returncode == 0, finish.stderr[-3000:]
    report = study.status()
    assert report["files"]["done"] == N_FILES and report["files"]["failed"] == 0
    check_exactly_once(pod5_reads(study.input), study.output)
    assert_verified(study.ledger_path)
