"""`ledgerbc doctor`: mount options from mountinfo lines, the lock probe, clock skew, ledger content,
dorado and the model; and the cheap refusal that `run` and `submit` do at start."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from ledgerbc import doctor, errors, models, mounts
from ledgerbc.cli import cli
from ledgerbc.testkit import install_fake_dorado

FIXTURES = Path(__file__).resolve().parent / "fixtures"

# Real-world shaped lines (proc(5)): optional fields, then "-", fstype, source, super options.
NFS3_NOLOCK = ("612 27 0:55 / /nfs/data rw,relatime shared:300 - nfs fs01:/export/data "
               "rw,vers=3,rsize=1048576,wsize=1048576,namlen=255,hard,nolock,proto=tcp,timeo=600,retrans=2,"
               "sec=sys,mountaddr=10.0.0.1,mountvers=3,mountport=20048,mountproto=udp,local_lock=all,addr=10.0.0.1")
NFS4_LOCAL_LOCK_ALL = ("613 27 0:56 / /nfs/data rw,relatime shared:301 - nfs4 fs01:/export/data "
                       "rw,vers=4.2,rsize=1048576,wsize=1048576,namlen=255,hard,proto=tcp,timeo=600,retrans=2,"
                       "sec=sys,clientaddr=10.0.0.5,local_lock=all,addr=10.0.0.1")
NFS4_LOCAL_LOCK_FLOCK = NFS4_LOCAL_LOCK_ALL.replace("local_lock=all", "local_lock=flock")
NFS4_OK = NFS4_LOCAL_LOCK_ALL.replace("local_lock=all", "local_lock=none")
LUSTRE_LOCALFLOCK = ("700 27 0:60 / /nfs/data rw,relatime shared:400 - lustre 10.0.0.2@o2ib:/scratch "
                     "rw,localflock,lazystatfs,encrypt")
LUSTRE_NOFLOCK = LUSTRE_LOCALFLOCK.replace("localflock", "noflock")
LUSTRE_FLOCK = LUSTRE_LOCALFLOCK.replace("localflock", "flock")
LUSTRE_DEFAULT = LUSTRE_LOCALFLOCK.replace("localflock,", "")
GLUSTER = ("801 27 0:70 / /nfs/data rw,relatime - fuse.glusterfs ci-gluster:/ledger "
           "rw,user_id=0,group_id=0,default_permissions,allow_other,max_read=131072")
EXT4 = "27 1 254:0 / /nfs/data rw,relatime - ext4 /dev/vda rw,discard"
SSHFS = "900 27 0:80 / /nfs/data rw,nosuid,nodev,relatime - fuse.sshfs user@host:/data rw,user_id=0,group_id=0"
S3FS = "901 27 0:81 / /nfs/data rw,relatime - fuse.s3fs s3fs rw,user_id=0,group_id=0"
BEEGFS = "902 27 0:82 / /nfs/data rw,relatime - beegfs beegfs_nodev rw,cfgFile=/etc/beegfs/beegfs-client.conf"


def judge(line: str) -> doctor.Check:
    table = mounts.parse_mountinfo("27 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n" + line + "\n")
    return mounts.judge_mount(mounts.mount_of("/nfs/data/run1", table), "/nfs/data/run1")


@pytest.mark.parametrize("line,needles", [
    (NFS3_NOLOCK, ["`nolock`", "Remount without `nolock`", "--ledger"]),
    (NFS4_LOCAL_LOCK_ALL, ["`local_lock=all`", "Remount with `local_lock=none`", "--ledger"]),
    (NFS4_LOCAL_LOCK_FLOCK, ["`local_lock=flock`", "Remount with `local_lock=none`"]),
    (LUSTRE_LOCALFLOCK, ["`localflock`", "Remount with `flock`", "--ledger"]),
    (LUSTRE_NOFLOCK, ["`noflock`", "Remount with `flock`"]),
    (SSHFS, ["sshfs keeps locks per mount", "--ledger"]),
])
def test_unsafe_mounts_are_refused_with_the_fix(line, needles):
    check = judge(line)
    assert check.status == doctor.FAIL and check.exit_code == errors.UnsafeFilesystem.exit_code == 7
    for needle in needles:
        assert needle in check.detail
    assert "/nfs/data/run1" in check.detail


@pytest.mark.parametrize("line,fstype", [
    (NFS4_OK, "nfs4"), (LUSTRE_FLOCK, "lustre"), (GLUSTER, "fuse.glusterfs"), (EXT4, "ext4"),
])
def test_safe_mounts_are_accepted(line, fstype):
    check = judge(line)
    assert check.status == doctor.OK, check.detail
    assert fstype in check.detail


@pytest.mark.parametrize("line,needle", [
    (S3FS, "unknown or network filesystem"), (BEEGFS, "tuneUseGlobalFileLocks"), (LUSTRE_DEFAULT, "flock"),
])
def test_unknown_or_unconfirmed_network_filesystems_warn(line, needle):
    check = judge(line)
    assert check.status == doctor.WARN and needle in check.detail


def test_mountinfo_parsing_fields_escapes_and_longest_prefix():
    text = "\n".join([
        "27 1 254:0 / / rw,relatime - ext4 /dev/vda rw,discard",
        # several optional fields; a mount point with a space (\040); super options carry the NFS options
        r"40 27 0:40 /exp /mnt/my\040data rw,noatime shared:12 master:3 propagate_from:2 - nfs4 srv:/exp rw,vers=4.1,local_lock=none",
        "41 27 0:41 / /mnt/ab rw - tmpfs tmpfs rw",
        "42 27 0:42 / /mnt/a rw - xfs /dev/sdb rw",
        "43 42 0:43 / /mnt/a rw - fuse.glusterfs g:/v rw",  # mounted over /mnt/a: the top one counts
        "garbage line",
    ])
    table = mounts.parse_mountinfo(text)
    assert len(table) == 5
    nfs = table[1]
    assert nfs.mount_point == "/mnt/my data" and nfs.root == "/exp" and nfs.fstype == "nfs4"
    assert nfs.optional_fields == ["shared:12", "master:3", "propagate_from:2"]
    assert nfs.mount_options == ["rw", "noatime"]
    assert nfs.options["local_lock"] == "none" and nfs.options["vers"] == "4.1"
    assert mounts.mount_of("/mnt/my data/x/ledger", table) is nfs
    assert mounts.mount_of("/mnt/a/x", table).fstype == "fuse.glusterfs"
    assert mounts.mount_of("/mnt/abc/x", table).fstype == "ext4"  # /mnt/a is no prefix of /mnt/abc
    assert mounts.mount_of("/mnt/ab", table).fstype == "tmpfs"
    assert mounts.mount_of("/", table).fstype == "ext4"


def _fake_mountinfo(tmp_path, line: str) -> str:
    path = tmp_path / "mountinfo"
    path.write_text(line.replace("/nfs/data", "/") + "\n")  # the filesystem mounted at /: holds tmp_path
    return str(path)


def test_refuse_unsafe_mount_raises_with_exit_7(tmp_path):
    info = _fake_mountinfo(tmp_path, NFS3_NOLOCK)
    with pytest.raises(errors.UnsafeFilesystem, match="nolock") as caught:
        mounts.refuse_unsafe_mount(tmp_path, mountinfo=info)
    assert caught.value.exit_code == 7
    assert mounts.refuse_unsafe_mount(tmp_path, mountinfo=_fake_mountinfo(tmp_path, GLUSTER)).status == doctor.OK


def test_run_refuses_an_unsafe_mount_before_registering(make_ledger, tmp_path, monkeypatch):
    ledger, _settings = make_ledger(n_files=2)
    monkeypatch.setattr(mounts, "MOUNTINFO", _fake_mountinfo(tmp_path, LUSTRE_LOCALFLOCK))
    result = CliRunner().invoke(cli, ["run", "--ledger", str(ledger.path)])
    assert result.exit_code == 7, result.output
    assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1 and "localflock" in result.stderr
    assert ledger.transact(lambda c: c.execute(sa.select(sa.func.count()).select_from(models.Worker)).scalar_one()) == 0


# -- the whole doctor ---------------------------------------------------------------------------------------
@pytest.fixture
def dorado_on_path(tmp_path, monkeypatch):
    install_fake_dorado(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")


def doctor_cli(ledger_path):
    result = CliRunner().invoke(cli, ["doctor", "--ledger", str(ledger_path)])
    return result, result.stdout.splitlines()


def test_doctor_passes_on_local_disk(make_ledger, dorado_on_path):
    ledger, _ = make_ledger(n_files=3)
    result, lines = doctor_cli(ledger.path)
    assert result.exit_code == 0, result.output
    names = [line.split(":", 1)[0].split()[1] for line in lines]
    assert names == ["sqlite", "mount", "lock", "clock", "integrity", "schema", "counts", "workers", "dorado", "model"]
    assert all(line.startswith("ok    ") for line in lines), result.output
    assert "1.1.1+simulated" in lines[names.index("dorado")]


def test_doctor_reports_a_missing_dorado_and_model(make_ledger, tmp_path, monkeypatch):
    models_dir = tmp_path / "models"
    (models_dir / "dna_r10.4.1_e8.2_400bps_hac@v5.0.0").mkdir(parents=True)
    ledger, _ = make_ledger(dorado=str(tmp_path / "no-dorado"), model="sup", models_directory=str(models_dir))
    result, lines = doctor_cli(ledger.path)
    assert result.exit_code == errors.BadInput.exit_code
    fails = [line for line in lines if line.startswith("FAIL")]
    assert len(fails) == 2
    assert "not found on PATH" in fails[0] and "--dorado PATH" in fails[0]
    assert "model sup is not in" in fails[1] and "dorado download --model sup" in fails[1]


@pytest.mark.parametrize("model,found", [
    ("hac", True), ("hac@v5.0.0", True), ("hac@v4.3.0", False), ("sup", False),
    ("dna_r10.4.1_e8.2_400bps_hac@v5.0.0", True), ("dna_r10.4.1_e8.2_400bps_sup@v5.0.0", False),
])
def test_model_in_models_directory(tmp_path, model, found):
    (tmp_path / "dna_r10.4.1_e8.2_400bps_hac@v5.0.0").mkdir()
    check = doctor.model_check(model, str(tmp_path))
    assert (check.status == doctor.OK) is found, check.detail


def test_doctor_missing_and_corrupt_ledger(tmp_path, dorado_on_path):
    result, lines = doctor_cli(tmp_path / "none.db")
    assert result.exit_code == errors.LedgerNotFound.exit_code
    assert [line[:4] for line in lines] == ["ok  ", "ok  ", "ok  ", "ok  ", "FAIL"]  # sqlite, mount, lock, clock
    junk = tmp_path / "junk.db"
    junk.write_bytes(os.urandom(8192))
    result, lines = doctor_cli(junk)
    assert result.exit_code == errors.LedgerCorrupt.exit_code
    assert lines[-1].startswith("FAIL  ledger:") and "recover --rebuild" in lines[-1]


def test_doctor_old_schema_names_the_upgrade(tmp_path, dorado_on_path):
    import shutil

    path = tmp_path / "old.db"
    shutil.copy(FIXTURES / "ledger-0001.db", path)
    result, lines = doctor_cli(path)
    assert result.exit_code == errors.SchemaMismatch.exit_code
    assert any(line.startswith("FAIL  schema:") and "ledgerbc upgrade" in line for line in lines), lines


def test_doctor_catches_lost_updates_that_integrity_check_misses(make_ledger, dorado_on_path):
    ledger, _ = make_ledger(n_files=3)

    def break_it(conn):  # what a lost update leaves: a claimed file without its batch, a batch without files
        conn.execute(sa.update(models.Pod5File).where(models.Pod5File.id == 1).values(state=models.CLAIMED))
        conn.execute(sa.insert(models.Batch).values(id=7, worker_id="w", state=models.RUNNING, claimed_at=0,
                                                    heartbeat_at=0, n_files=1, n_bytes=1))

    ledger.transact(break_it)
    result, lines = doctor_cli(ledger.path)
    assert result.exit_code == errors.LedgerCorrupt.exit_code
    assert any(line.startswith("ok    integrity:") for line in lines)
    counts = next(line for line in lines if " counts:" in line)
    assert counts.startswith("FAIL") and "1 claimed files belong to no running batch" in counts
    assert "1 running batches have no claimed files" in counts and "recover --rebuild" in counts


# -- the lock probe ---------------------------------------------------------------------------------------
class NoLockLedger:
    """A ledger whose lock does nothing: what a filesystem with per-client locks looks like from one host."""

    def __init__(self, path: Path):
        self.path = path
        self.lock_path = Path(str(path) + ".lock")

    @contextmanager
    def locked(self):
        yield


def test_lock_probe_fails_when_processes_do_not_exclude(tmp_path):
    check = doctor.lock_check(NoLockLedger(tmp_path / "l.db"))
    assert check.status == doctor.FAIL and check.exit_code == 7
    assert "took" in check.detail and "--ledger" in check.detail


def test_lock_probe_fails_when_the_lock_never_comes_free(tmp_path):
    ledger = NoLockLedger(tmp_path / "l.db")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX); "
         "print('held', flush=True); time.sleep(60)", str(ledger.lock_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        check = doctor.lock_check(ledger)
    finally:
        holder.kill()
        holder.wait()
    assert check.status == doctor.FAIL and "stayed locked" in check.detail


def test_lock_probe_ok_with_the_real_lock(make_ledger):
    ledger, _ = make_ledger()
    assert doctor.lock_check(ledger).status == doctor.OK


# -- clock skew -----------------------------------------------------------------------------------------------
def test_clock_skew_against_the_file_server(tmp_path):
    assert abs(doctor.measure_skew(tmp_path)) < 1.0
    behind = lambda: time.time() - 120  # noqa: E731 -- this host's clock 2 min behind the file server
    assert 119 < doctor.measure_skew(tmp_path, clock=behind) < 121
    check = doctor.clock_check(tmp_path, 60, clock=behind)
    assert check.status == doctor.WARN and "+120" in check.detail and "--clock-skew" in check.detail
    assert doctor.clock_check(tmp_path, 300, clock=behind).status == doctor.OK
    assert not list(tmp_path.iterdir()), "the probe file must be removed"


def test_doctor_warns_when_live_workers_approach_what_one_ledger_carries(make_ledger, dorado_on_path, monkeypatch):
    from ledgerbc import claim, limits

    monkeypatch.setattr(limits, "LEDGER_WORKERS_LIMIT", 10)
    ledger, _ = make_ledger(n_files=1)
    for i in range(7):
        claim.register_worker(ledger, f"w{i}@gpu", "gpu", i, None)
    result, lines = doctor_cli(ledger.path)
    assert result.exit_code == 0, result.output
    assert [line for line in lines if line.startswith("ok    workers:")] == [
        "ok    workers: 7 live workers (one ledger carries ~10: bench/scale_limit.py)"]
    claim.register_worker(ledger, "w7@gpu", "gpu", 7, None)
    claim.worker_exited(ledger, "w0@gpu")  # an exited worker does not count
    claim.register_worker(ledger, "w8@gpu", "gpu", 8, None)
    result, lines = doctor_cli(ledger.path)
    assert result.exit_code == 0, result.output  # a warning
    warn = [line for line in lines if line.startswith("warn  workers:")]
    assert len(warn) == 1 and warn[0].startswith("warn  workers: 8 live workers: one ledger loses about 1%")


# -- the SQLite library -------------------------------------------------------------------------------------
def test_every_sqlite_feature_of_the_hot_path_is_probed_and_this_library_has_them():
    """A table-valued function the claim, the publication or the batch id floor use is in a db.SQLITE_NEEDS
    probe, so a library without it is told at the start, not at the first claim."""
    import re

    from ledgerbc import claim, db

    probes = " ".join(sql for _feature, sql in db.SQLITE_NEEDS)
    used = set()
    for sql in [stmt.sql for stmt in claim.HOT_PATH] + [db.BATCH_IDS_HANDED_OUT_SQL]:
        used |= set(re.findall(r"\b(json_\w+|pragma_\w+)\b", sql))
    assert used >= {"json_each", "pragma_user_version"}
    assert all(name in probes for name in used), used
    assert "ON CONFLICT" in probes  # the scan's insert (scan._INSERT)
    db.check_sqlite()  # this machine's library (the tests above ran the statements themselves)


def test_an_sqlite_library_without_a_needed_feature_is_refused_in_one_line_before_the_ledger_is_touched(
        make_ledger, dorado_on_path, monkeypatch):
    """Simulated: a probe this library fails, as json_each fails where JSON1 was not built in. `status` and a
    transaction refuse with exit 15 and one line naming the feature; doctor says it first; the ledger is as
    it was (no lock or turnstile file beside a new one)."""
    import sqlite3

    from ledgerbc import db

    ledger, settings = make_ledger(n_files=2)
    monkeypatch.setattr(db, "SQLITE_NEEDS", db.SQLITE_NEEDS + (("frobnicate (an extension)", "SELECT frobnicate(1)"),))
    monkeypatch.setattr(db, "_sqlite_fit", False)
    result = CliRunner().invoke(cli, ["status", "--ledger", str(ledger.path)])
    assert result.exit_code == 15, result.output
    assert result.stderr.startswith("Error: this Python's SQLite library") and result.stderr.count("\n") == 1
    assert "lacks frobnicate (an extension)" in result.stderr and "Traceback" not in result.output
    with pytest.raises(errors.SqliteUnfit):
        db.Ledger(ledger.path).transact(lambda conn: None)
    fresh = ledger.path.parent / "new" / "ledgerbc.db"
    fresh.parent.mkdir()
    with pytest.raises(errors.SqliteUnfit):
        db.create_ledger_file(fresh, settings)
    assert list(fresh.parent.iterdir()) == []

    result, lines = doctor_cli(ledger.path)
    assert result.exit_code == 15, result.output
    assert lines[0].startswith("FAIL  sqlite: ") and "frobnicate" in lines[0]
    assert [line.split(":", 1)[0].split()[1] for line in lines] == ["sqlite", "mount", "lock"]
    raw = sqlite3.connect(ledger.path)
    assert raw.execute("SELECT state, count(*) FROM pod5_files GROUP BY state").fetchall() == [("pending", 2)]
    raw.close()
