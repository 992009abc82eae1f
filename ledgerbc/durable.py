"""fsync helpers: what makes a rename or a new file survive a crash of the node; best-effort removal."""

import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger("ledgerbc.durable")

PROBE_BYTES = 1 << 20


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    try:
        fsync_path(path)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the rename is still atomic


def _existing(folder: Path) -> Path:
    folder = Path(folder)
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    return folder


def nearly_full(folder: Path, nbytes: int = PROBE_BYTES) -> bool:
    """Is less than `nbytes` free for this user on the filesystem of `folder`? (statvfs: no write; quotas
    are not seen here, `probe_space` sees them.)"""
    try:
        st = os.statvfs(_existing(folder))
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < nbytes


def probe_space(folder: Path, nbytes: int = PROBE_BYTES) -> None:
    """Raise StorageFull when `nbytes` cannot be written and synced in `folder` (or the nearest existing
    parent): a failure that a full disk or quota caused is not the input files' fault (DESIGN §4)."""
    from .errors import FULL_ERRNOS, StorageFull

    folder = _existing(folder)
    probe = folder / f".ledgerbc-space-probe-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"\0" * nbytes)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        if exc.errno in FULL_ERRNOS:
            raise StorageFull(
                f"no space left on the filesystem of {folder} ({exc.strerror}). Free space (or raise the quota), "
                "then start the workers again; nothing was failed.", folder=folder,
            ) from None
    finally:
        try:
            probe.unlink()
        except OSError:
            pass


def remove_tree(path: Path) -> None:
    """Remove a folder tree as far as possible, never raising: what is left, the janitor removes later.
    `shutil.rmtree(ignore_errors=True)` alone still raises when closing a directory fails, as a close on
    GlusterFS does with ESTALE when another client removed the folder meanwhile (a worker died of that)."""
    try:
        shutil.rmtree(path, ignore_errors=True)
    except OSError as exc:
        log.warning("could not remove %s (left for the janitor): %s", path, exc.strerror or exc)
