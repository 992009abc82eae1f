"""Which filesystem holds a folder, and is its locking safe for the ledger (DESIGN §6)?

Read from /proc/self/mountinfo. Used by `doctor`, and by `run` and `submit` before they touch the ledger.

Why the mount options matter: the ledger's only protection against two workers writing at once is the
`flock` on `<ledger>.lock`. On NFS mounted with `nolock` or `local_lock=flock|posix|all`, and on Lustre
with `localflock`, that lock is taken on each client alone: every node "holds" it at the same time and
the ledger silently loses updates. Lustre `noflock` refuses flock outright. sshfs keeps locks per mount.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field

from . import errors

log = logging.getLogger("ledgerbc.mounts")

MOUNTINFO = "/proc/self/mountinfo"
OK, WARN, FAIL = "ok", "warn", "FAIL"

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


def kernel_lock_wait_is_safe(folder, mountinfo: str | None = None) -> bool:
    """May a process on this host wait in the kernel for a lock on a file in `folder` (a blocking flock that
    a signal interrupts)? Only on a local filesystem. On GlusterFS 10 a blocking flock interrupted by a
    signal wedges the volume within seconds (bricks stop answering, every process using the mount hangs
    unkillable: docs/locking.md); a FUSE or network filesystem's handling of an interrupted lock request is
    the server's business, so anywhere but LOCAL_FS (or where the mount cannot be told) locks are polled."""
    mounts = read_mounts(mountinfo)
    m = mount_of(os.path.realpath(folder), mounts) if mounts else None
    return m is not None and m.fstype in LOCAL_FS


def refuse_unsafe_mount(folder, mountinfo: str | None = None) -> Check:
    """The cheap part of doctor, for `run` and `submit`: raise UnsafeFilesystem on a known-unsafe mount."""
    check = mount_check(folder, mountinfo)
    if check.status == FAIL:
        raise errors.UnsafeFilesystem(check.detail)
    if check.status == WARN:
        log.warning("%s", check.detail)
    return check
