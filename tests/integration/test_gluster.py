"""`ledgerbc doctor` on the GlusterFS volume of ci/cluster-up.sh, through both of its mounts, and the
ledger lock excluding a process on the other mount (two mounts = two clients = two hosts)."""
from __future__ import annotations

import pytest

from ledgerbc import doctor
from ledgerbc.db import Ledger
from ledgerbc.testkit.synth import make_dataset

from .conftest import cli, job_env

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
            "ok    mount", "ok    lock", "ok    clock", "ok    integrity", "ok    schema", "ok    counts",
            "ok    workers", "ok    dorado", "ok    model"], proc.stdout
        assert "fuse.glusterfs" in lines[0] and str(root) in lines[0]
    # the ledger's OUTPUT_DIR (its own folder) is found through whichever mount the reader uses
    assert Ledger(root_b / "output" / "ledgerbc.db").read_settings().output_dir == str(root_b / "output")


def test_the_ledger_lock_excludes_a_process_on_the_other_mount(gluster_root):
    root_a, root_b = gluster_root
    held = Ledger(root_a / "ledgerbc.db")
    with held.locked():
        assert doctor._probe_child(root_b / "ledgerbc.db.lock") == "busy"
    assert doctor._probe_child(root_b / "ledgerbc.db.lock") == "acquired"
