"""fsync helpers: what makes a rename or a new file survive a crash of the node."""

import os
from pathlib import Path


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
