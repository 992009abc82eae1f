"""`ledgerbc doctor` on the GlusterFS volume of ci/cluster-up.sh, through both of its mounts, the
ledger lock excluding a process on the other mount (two mounts = two clients = two hosts), and
processes contending for the lock leaving the volume working."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ledgerbc import doctor
from ledgerbc.db import Ledger
from ledgerbc.testkit.synth import make_dataset

from .conftest import cli, job_env, unavailable

pytestmark = pytest.mark.integration


def test_doctor_passes_on_the_gluster_mounts(gluster_root, bin_dir, tmp_path):
    root_a, root_b = gluster_root
    make_dataset(tmp_path / "input", 3, seed=31, hostile_names=False, size_spread=False)
    env = job_env(bin_dir)
    cli("init", tmp_path / "input", root_a / "output", "--lease", "10m", "--heartbeat", "10s", env=env)
    for root in (root_a, root_b):
        proc = cli("doctor", "--ledger", root / "output" / "ledgerbc.db", env=env, check=False)
        lines = proc.stdout.splitlines()
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert [line.split(":", 1)[0] for line in lines] == [
            "ok    sqlite", "ok    mount", "ok    lock", "ok    clock", "ok    integrity", "ok    schema", "ok    counts",
            "ok    workers", "ok    dorado", "ok    model"], proc.stdout
        assert "fuse.glusterfs" in lines[1] and str(root) in lines[1]
    # the ledger's OUTPUT_DIR (its own folder) is found through whichever mount the reader uses
    assert Ledger(root_b / "output" / "ledgerbc.db").read_settings().output_dir == str(root_b / "output")


def test_the_ledger_lock_excludes_a_process_on_the_other_mount(gluster_root):
    root_a, root_b = gluster_root
    held = Ledger(root_a / "ledgerbc.db")
    with held.locked():
        assert doctor._probe_child(root_b / "ledgerbc.db.lock") == "busy"
    assert doctor._probe_child(root_b / "ledgerbc.db.lock") == "acquired"


IMPATIENT_WORKER = """
import sys
from ledgerbc import db
from ledgerbc.db import Ledger
db.TURN_WAIT = 0.005  # every wait for a turn is bounded this tightly: cut short as often as the code allows
ledger = Ledger(sys.argv[1])
for _ in range(int(sys.argv[2])):
    ledger.transact(lambda c: c.exec_driver_sql("UPDATE pod5_files SET attempts = attempts + 1"))
"""


def interrupted_lock_requests(mount: str) -> int:
    """Lock requests the Gluster client of `mount` reports as interrupted (its log, where cluster-up.sh
    leaves it); -1 where there is no log to read."""
    log = Path("/var/log/glusterfs") / (mount.strip("/").replace("/", "-") + ".log")
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return -1
    return sum(1 for line in text.splitlines() if "fuse_setlk_cbk" in line and "Interrupted system call" in line)


def test_contended_lock_waits_leave_the_volume_working(gluster_root, make_ledger):
    """8 processes on both mounts run 40 transactions each on one ledger, every wait for a turn bounded to
    5 ms. Before: such a wait was a blocking flock that a SIGALRM cut short, and signals that interrupt
    blocking lock requests wedge GlusterFS 10 within seconds (the brick stops answering, every process on
    the mount hangs unkillable in the kernel: docs/locking.md). Now no lock wait on Gluster blocks or
    takes a signal: all finish, the counts add up, both mounts answer, no lock request was interrupted."""
    root_a, root_b = gluster_root
    ledger, _settings = make_ledger(1, path=root_a / "ledgerbc.db")
    before = {m: interrupted_lock_requests(str(m)) for m in (root_a.parent, root_b.parent)}
    if -1 in before.values():
        unavailable(f"no Gluster client log to read in /var/log/glusterfs for {list(before)}")
    procs = [subprocess.Popen([sys.executable, "-c", IMPATIENT_WORKER, str((root_a, root_b)[i % 2] / "ledgerbc.db"),
                               "40"]) for i in range(8)]
    start = time.monotonic()
    try:
        codes = []
        for p in procs:
            try:
                codes.append(p.wait(max(1.0, start + 180 - time.monotonic())))
            except subprocess.TimeoutExpired:
                codes.append(None)
        assert codes == [0] * 8, f"exit codes after {time.monotonic() - start:.0f}s: {codes} (None: still running, hung on the mount?)"
    finally:
        for p in procs:
            p.kill()
    total = ledger.transact(lambda c: c.exec_driver_sql("SELECT attempts FROM pod5_files").scalar())
    assert total == 8 * 40
    assert sorted(os.listdir(root_b)) == sorted(os.listdir(root_a))  # both clients still answer
    after = {m: interrupted_lock_requests(str(m)) for m in before}
    assert after == before, f"interrupted lock requests in the Gluster client logs: {before} -> {after}"
