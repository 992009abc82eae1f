"""`ledgerbc doctor`: is this ledger's storage, lock, clock and content fit for many workers (DESIGN §6)?

Every check yields one `Check` line: `ok|warn|FAIL  <check>: <detail>`. A FAIL carries the exit code of
the matching error (7 unsafe filesystem or lock, 4 no ledger, 5 damaged, 6 schema, 3 dorado/model).

Why the mount options matter: the ledger's only protection against two workers writing at once is the
`flock` on `<ledger>.lock`. On NFS mounted with `nolock` or `local_lock=flock|posix|all`, and on Lustre
with `localflock`, that lock is taken on each client alone: every node "holds" it at the same time and
the ledger silently loses updates. Lustre `noflock` refuses flock outright. sshfs keeps locks per mount.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import errors

log = logging.getLogger("ledgerbc.doctor")

MOUNTINFO = "/proc/self/mountinfo"
OK, WARN, FAIL = "ok", "warn", "FAIL"
DEFAULT_CLOCK_SKEW = 60.0
PROBE_TIMEOUT = 60.0  # seconds for the lock-probe child (a slow network filesystem is slow, not broken)

# Filesystems that live on this machine: locks are real, but only workers on this host can share them.
LOCAL_FS = {
    "ext2", "ext3", "ext4", "xfs", "btrfs", "zfs", "tmpfs", "f2fs", "jfs", "reiserfs", "overlay", "ramfs",
    "bcachefs", "nilfs2", "vfat", "exfat", "ntfs", "ntfs3", "hfsplus", "apfs",
}
# Network filesystems whose locks are held by the server (given the option checks below).
SAFE_NETWORK_FS = {
    "nfs": "NFS (server-side locks)",
    "nfs4": "NFS (server-side locks)",
    "lustre": "Lustre with flock",
    "fuse.glusterfs": "GlusterFS (server-side locks)",
    "glusterfs": "GlusterFS (server-side locks)",
    "gpfs": "IBM Storage Scale/GPFS (cluster-wide locks)",
    "ceph": "CephFS (cluster-wide locks)",
    "fuse.ceph-fuse": "CephFS (cluster-wide locks)",
}
_FIX_ELSEWHERE = "or put the ledger on a filesystem with cluster-wide locks with `--ledger PATH`"


@dataclass
class Check:
    status: str  # ok | warn | FAIL
    name: str
    detail: str
    exit_code: int = 0  # for a FAIL: the process exit status it stands for

    def line(self) -> str:
        return f"{self.status:<4}  {self.name}: {self.detail}"


@dataclass
class Mount:
    """One line of /proc/self/mountinfo (see proc(5))."""

    mount_id: int
    parent_id: int
    device: str
    root: str
    mount_point: str
    mount_options: list[str]
    optional_fields: list[str]
    fstype: str
    source: str
    super_options: list[str] = field(default_factory=list)

    @property
    def options(self) -> dict[str, str | None]:
        """Per-mount and superblock options together: `{'nolock': None, 'local_lock': 'none', ...}`."""
        out: dict[str, str | None] = {}
        for opt in self.mount_options + self.super_options:
            key, sep, value = opt.partition("=")
            out[key] = value if sep else None
        return out


def _unescape(text: str) -> str:
    # The kernel writes space, tab, newline and backslash in paths as \040, \011, \012, \134.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def parse_mountinfo(text: str) -> list[Mount]:
    """Parse mountinfo text; lines that do not have the documented shape are skipped."""
    mounts = []
    for line in text.splitlines():
        parts = line.split(" ")
        try:
            sep = parts.index("-", 6)  # the optional fields (0 or more) end with a lone "-"
            mount_id, parent_id, device, root, mount_point, mount_opts = parts[:6]
            fstype, source = parts[sep + 1], parts[sep + 2]
            super_opts = parts[sep + 3] if len(parts) > sep + 3 else ""
            mounts.append(Mount(
                mount_id=int(mount_id), parent_id=int(parent_id), device=device, root=_unescape(root),
                mount_point=_unescape(mount_point), mount_options=mount_opts.split(","),
                optional_fields=parts[6:sep], fstype=fstype, source=_unescape(source),
                super_options=[o for o in super_opts.split(",") if o],
            ))
        except (ValueError, IndexError):
            continue
    return mounts


def read_mounts(path: str | None = None) -> list[Mount] | None:
    """This process's mounts, or None where /proc is not available."""
    path = path or MOUNTINFO
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as fh:
            return parse_mountinfo(fh.read())
    except OSError:
        return None


def mount_of(path, mounts: list[Mount]) -> Mount | None:
    """The mount holding `path` (an absolute, resolved path): the longest mount point that is a
    prefix of it; of several mounts on one point, the last (the one on top)."""
    path = str(path)
    best = None
    for m in mounts:
        point = m.mount_point.rstrip("/") or "/"
        inside = path == point or point == "/" or path.startswith(point + "/")
        if inside and (best is None or len(point) >= len(best.mount_point.rstrip("/") or "/")):
            best = m
    return best


def judge_mount(m: Mount, folder) -> Check:
    """Refuse known-unsafe lock setups, warn for unknown network filesystems."""
    opts = m.options
    where = f"{folder} is on {m.fstype} {m.source} (mounted at {m.mount_point})"
    fs = m.fstype
    if fs in ("nfs", "nfs4"):
        if "nolock" in opts:
            return Check(FAIL, "mount", f"{where} with `nolock`: file locks stay on each host, so workers on "
                         f"different nodes would overwrite each other's ledger updates. Remount without `nolock` "
                         f"(ask your admins), {_FIX_ELSEWHERE}.", errors.UnsafeFilesystem.exit_code)
        local_lock = opts.get("local_lock")
        if "local_lock" in opts and local_lock != "none":
            return Check(FAIL, "mount", f"{where} with `local_lock={local_lock}`: those locks stay on each "
                         f"host. Remount with `local_lock=none` (ask your admins), {_FIX_ELSEWHERE}.",
                         errors.UnsafeFilesystem.exit_code)
        return Check(OK, "mount", f"{where}: {SAFE_NETWORK_FS[fs]}")
    if fs == "lustre":
        if "localflock" in opts:
            return Check(FAIL, "mount", f"{where} with `localflock`: locks are local to each client node, so "
                         f"workers on different nodes would overwrite each other's ledger updates. Remount with "
                         f"`flock` (ask your admins), {_FIX_ELSEWHERE}.", errors.UnsafeFilesystem.exit_code)
        if "noflock" in opts:
            return Check(FAIL, "mount", f"{where} with `noflock`: file locks are refused. Remount with `flock` "
                         f"(ask your admins), {_FIX_ELSEWHERE}.", errors.UnsafeFilesystem.exit_code)
        if "flock" in opts:
            return Check(OK, "mount", f"{where}: {SAFE_NETWORK_FS[fs]}")
        return Check(WARN, "mount", f"{where} without an explicit `flock` option: whether locks are cluster-wide "
                     "depends on the client's default. Ask for a `flock` mount; the lock probe below checks this host only.")
    if fs == "fuse.sshfs":
        return Check(FAIL, "mount", f"{where}: sshfs keeps locks per mount, so workers on different hosts "
                     f"would overwrite each other's ledger updates. Put the ledger on a shared cluster "
                     f"filesystem with `--ledger PATH`.", errors.UnsafeFilesystem.exit_code)
    if fs in SAFE_NETWORK_FS:
        return Check(OK, "mount", f"{where}: {SAFE_NETWORK_FS[fs]}")
    if fs in LOCAL_FS:
        return Check(OK, "mount", f"{where}: a local filesystem, fine when every worker runs on this host")
    if fs == "beegfs":
        return Check(WARN, "mount", f"{where}: BeeGFS locks are node-local unless the client sets "
                     "`tuneUseGlobalFileLocks=true`. Ask your admins, or put the ledger elsewhere with `--ledger PATH`.")
    return Check(WARN, "mount", f"{where}: an unknown or network filesystem; ledgerbc cannot tell whether its "
                 "locks are shared between nodes. Prefer NFS, Lustre (flock), GPFS, CephFS or GlusterFS.")


def mount_check(folder, mountinfo: str | None = None) -> Check:
    """The mount check of `folder` (the ledger's folder) against this process's mount table."""
    mountinfo = mountinfo or MOUNTINFO
    mounts = read_mounts(mountinfo)
    if not mounts:
        return Check(WARN, "mount", f"cannot read {mountinfo}: the mount of {folder} was not checked")
    real = os.path.realpath(folder)
    m = mount_of(real, mounts)
    if m is None:
        return Check(WARN, "mount", f"no mount found for {real} in {mountinfo}")
    return judge_mount(m, folder)


def refuse_unsafe_mount(folder, mountinfo: str | None = None) -> Check:
    """The cheap part of doctor, for `run` and `submit`: raise UnsafeFilesystem on a known-unsafe mount."""
    check = mount_check(folder, mountinfo)
    if check.status == FAIL:
        raise errors.UnsafeFilesystem(check.detail)
    if check.status == WARN:
        log.warning("%s", check.detail)
    return check


# -- the lock probe ------------------------------------------------------------------------------------------
# The child takes the lock the way db._flock does (filelock's flock, no soft fallback), without importing
# ledgerbc (SQLAlchemy makes that take a second).
_PROBE_CHILD = """
import inspect, sys
import filelock
kwargs = {}
if "fallback_to_soft" in inspect.signature(filelock.UnixFileLock.__init__).parameters:
    kwargs["fallback_to_soft"] = False
lock = filelock.UnixFileLock(sys.argv[1], **kwargs)
try:
    lock.acquire(timeout=0)
except filelock.Timeout:
    print("busy")
else:
    lock.release()
    print("acquired")
"""


def _probe_child(lock_path) -> str:
    """In another process: try the ledger lock without waiting; 'busy', 'acquired' or an error text."""
    try:
        proc = subprocess.run([sys.executable, "-c", _PROBE_CHILD, str(lock_path)], capture_output=True,
                              text=True, timeout=PROBE_TIMEOUT, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return f"the probe process hung for {PROBE_TIMEOUT:.0f}s"
    out = proc.stdout.strip()
    if proc.returncode != 0 or out not in ("busy", "acquired"):
        said = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return f"the probe process failed: {said}"
    return out


def lock_check(ledger) -> Check:
    """Two processes must exclude each other on the ledger's lock file, and the lock must come free."""
    name = "lock"
    try:
        with ledger.locked():
            while_held = _probe_child(ledger.lock_path)
    except errors.LedgerError as exc:
        return Check(FAIL, name, str(exc), errors.UnsafeFilesystem.exit_code)
    if while_held != "busy":
        detail = (f"another process took {ledger.lock_path} while this one held it: locks do not exclude "
                  "each other here. Put the ledger on a filesystem with working locks with `--ledger PATH`."
                  if while_held == "acquired" else f"{ledger.lock_path}: {while_held}")
        return Check(FAIL, name, detail, errors.UnsafeFilesystem.exit_code)
    after = _probe_child(ledger.lock_path)
    if after != "acquired":
        detail = (f"{ledger.lock_path} stayed locked after this process released it: another process holds "
                  "it (a hung worker?) or the filesystem does not release locks. Find it with `fuser` or `lsof`."
                  if after == "busy" else f"{ledger.lock_path}: {after}")
        return Check(FAIL, name, detail, errors.UnsafeFilesystem.exit_code)
    return Check(OK, name, f"two processes exclude each other on {ledger.lock_path}")


# -- clock skew ----------------------------------------------------------------------------------------------
def measure_skew(folder, clock=time.time) -> float:
    """Seconds the file server's clock is ahead (+) or behind (-) this host's: the mtime of a freshly
    written file against local time around the write (0 when it falls inside that interval)."""
    path = Path(folder) / f".ledgerbc-clock-{socket.gethostname()}-{os.getpid()}"
    before = clock()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, b"clock probe\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        mtime = os.stat(path).st_mtime
    finally:
        try:
            path.unlink()
        except OSError:
            pass
    after = clock()
    # Local filesystems stamp files with the kernel's coarse clock (a few ms behind time.time()).
    slack = 0.05
    if mtime < before - slack:
        return mtime - before
    if mtime > after + slack:
        return mtime - after
    return 0.0


def clock_check(folder, allowed: float, clock=time.time) -> Check:
    name = "clock"
    try:
        skew = measure_skew(folder, clock)
    except OSError as exc:
        return Check(FAIL, name, f"cannot write a probe file in {folder}: {exc.strerror or exc}. The ledger "
                     "folder must be writable.", errors.UnsafeFilesystem.exit_code)
    text = f"file server clock {'+' if skew >= 0 else ''}{skew:.1f}s against this host"
    if abs(skew) > allowed:
        return Check(WARN, name, f"{text}, more than the ledger's --clock-skew {allowed:g}s: live batches may be "
                     "taken for expired. Fix NTP on this host or the file server, or init with a larger --clock-skew.")
    return Check(OK, name, f"{text} (allowed {allowed:g}s)")


# -- the ledger's content ------------------------------------------------------------------------------------
def ledger_checks(ledger) -> tuple[list[Check], object | None]:
    """integrity_check, schema, count invariants; also returns the settings when they are readable."""
    from . import db

    try:
        version, problems = ledger.health()
    except errors.LedgerError as exc:
        return [Check(FAIL, "ledger", str(exc), exc.exit_code)], None
    if problems != ["ok"]:
        shown = "; ".join(problems[:3]) + (f" (+{len(problems) - 3} more)" if len(problems) > 3 else "")
        return [Check(FAIL, "integrity", f"PRAGMA integrity_check: {shown}. Stop the workers, then rebuild with "
                      "`ledgerbc recover --rebuild --input DIR --output DIR`.", errors.LedgerCorrupt.exit_code)], None
    checks = [Check(OK, "integrity", "PRAGMA integrity_check: ok")]
    if version != db.SCHEMA_HEAD:
        try:
            ledger.read_settings()  # raises the schema error with the command that fixes it
        except errors.LedgerError as exc:
            checks.append(Check(FAIL, "schema", str(exc), exc.exit_code))
            return checks, None
    checks.append(Check(OK, "schema", f"revision {version} (current)"))
    try:
        bad = ledger.transact(_invariant_violations)
        settings = ledger.read_settings()
    except errors.LedgerError as exc:
        checks.append(Check(FAIL, "counts", str(exc), exc.exit_code))
        return checks, None
    if bad:
        checks.append(Check(FAIL, "counts", "; ".join(bad) + ". Stop the workers, then rebuild with "
                            "`ledgerbc recover --rebuild --input DIR --output DIR`.", errors.LedgerCorrupt.exit_code))
    else:
        checks.append(Check(OK, "counts", "every claimed file belongs to a running batch, every running batch has files"))
    return checks, settings


def _invariant_violations(conn) -> list[str]:
    # integrity_check says ok even after lost updates (CLUSTER.md): these counts catch them.
    import sqlalchemy as sa

    from .models import CLAIMED, RUNNING, Batch, Pod5File

    out = []
    orphans = conn.execute(
        sa.select(sa.func.count()).select_from(Pod5File).outerjoin(Batch, Batch.id == Pod5File.batch_id)
        .where(Pod5File.state == CLAIMED, sa.or_(Batch.id.is_(None), Batch.state != RUNNING))
    ).scalar_one()
    if orphans:
        out.append(f"{orphans} claimed files belong to no running batch")
    claimed = sa.select(Pod5File.id).where(Pod5File.batch_id == Batch.id, Pod5File.state == CLAIMED).exists()
    empty = conn.execute(
        sa.select(sa.func.count()).select_from(Batch).where(Batch.state == RUNNING, ~claimed)
    ).scalar_one()
    if empty:
        out.append(f"{empty} running batches have no claimed files")
    max_id = conn.execute(sa.select(sa.func.max(Batch.id))).scalar_one()
    seq = conn.exec_driver_sql("SELECT seq FROM sqlite_sequence WHERE name='batches'").scalar()
    if max_id is not None and (seq is None or seq < max_id):
        out.append(f"the batch id counter ({seq}) is below the highest batch id ({max_id}): fencing tokens could repeat")
    return out


# -- dorado and its model ------------------------------------------------------------------------------------
_MODEL_COMPLEX = re.compile(r"^(fast|hac|sup)(@v[\d.]+|@latest)?(,.*)?$")


def dorado_checks(settings) -> list[Check]:
    checks = []
    exe = shutil.which(settings.dorado)
    if not exe:
        checks.append(Check(FAIL, "dorado", f"'{settings.dorado}' not found on PATH. Load it (e.g. `module load "
                            "dorado`) or give its path with `ledgerbc init --dorado PATH`.", errors.BadInput.exit_code))
    else:
        try:
            proc = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=120,
                                  stdin=subprocess.DEVNULL)
            said = (proc.stdout + proc.stderr).strip().splitlines()
            if proc.returncode == 0:
                checks.append(Check(OK, "dorado", f"{exe} --version: {said[0] if said else '(no output)'}"))
            else:
                checks.append(Check(FAIL, "dorado", f"`{exe} --version` exited with status {proc.returncode}: "
                                    f"{said[-1] if said else 'no output'}. Check the dorado installation "
                                    "(libraries, module load).", errors.BadInput.exit_code))
        except (OSError, subprocess.TimeoutExpired) as exc:
            checks.append(Check(FAIL, "dorado", f"`{exe} --version` could not run: {exc}. Check the dorado "
                                "installation.", errors.BadInput.exit_code))
    checks.append(model_check(settings.model, settings.models_directory))
    return checks


def model_check(model: str, models_directory: str | None) -> Check:
    """GPU nodes are often offline: dorado cannot download a model there, so it must already be on disk."""
    name = "model"
    if models_directory is None:
        if os.sep in model and not Path(model).exists():
            return Check(FAIL, name, f"model path {model} does not exist. Give an existing model folder with "
                         "`ledgerbc init --model`.", errors.BadInput.exit_code)
        return Check(OK, name, f"{model} (no --models-directory: dorado fetches it, which fails on offline nodes)")
    folder = Path(models_directory)
    if not folder.is_dir():
        return Check(FAIL, name, f"--models-directory {folder} is not a folder. Create it and run `dorado download "
                     f"--model {model} --models-directory {folder}` on a node with internet.", errors.BadInput.exit_code)
    if os.sep in model:
        found = Path(model).exists()
    else:
        m = _MODEL_COMPLEX.match(model)
        names = [p.name for p in folder.iterdir() if p.is_dir()]
        if m:  # a model complex (`hac`, `sup@v5.0.0`): dorado picks the simplex model for the data's chemistry
            want = f"_{m.group(1)}{m.group(2) if m.group(2) and m.group(2) != '@latest' else '@'}"
            found = any(want in n for n in names)
        else:
            found = model in names
    if not found:
        return Check(FAIL, name, f"model {model} is not in {folder}: dorado cannot download it on an offline GPU "
                     f"node. Run `dorado download --model {model} --models-directory {folder}` on a node with "
                     "internet.", errors.BadInput.exit_code)
    return Check(OK, name, f"{model} found in {folder}")


# -- all of it ------------------------------------------------------------------------------------------------
def run_checks(ledger, mountinfo: str | None = None) -> list[Check]:
    """Every check, in order: mount, lock, clock, ledger content, dorado, model."""
    folder = ledger.path.parent
    if not folder.is_dir():
        return [Check(FAIL, "ledger", f"the folder {folder} of the ledger does not exist. Give the right --ledger.",
                      errors.LedgerNotFound.exit_code)]
    checks = [mount_check(folder, mountinfo), lock_check(ledger)]
    content, settings = ([Check(FAIL, "ledger", f"no ledger at {ledger.path}. Create it with `ledgerbc init`, or "
                                "rebuild a lost one with `ledgerbc recover --rebuild --input DIR --output DIR`.",
                                errors.LedgerNotFound.exit_code)], None) if not ledger.path.is_file() else ledger_checks(ledger)
    checks.append(clock_check(folder, settings.clock_skew if settings else DEFAULT_CLOCK_SKEW))
    checks += content
    if settings is not None:
        checks += dorado_checks(settings)
    return checks


def exit_code(checks: list[Check]) -> int:
    """0 without a FAIL, else the exit code of the first FAIL."""
    return next((c.exit_code or 1 for c in checks if c.status == FAIL), 0)
