"""Moving a batch's staged outputs into place: the renames of a publication (DESIGN §4 Publish).

`claim.publish` calls `Installer.run()` under the ledger lock, after it has checked that the batch still
owns every one of its files, and `Installer.undo()` if the transaction then does not commit. The renames
go in steps, each made durable before the next begins, so that after a power loss a later step is never
on disk without the earlier ones:

  1. stale outputs of an earlier, interrupted attempt that this one does not replace are removed;
  2. the fail/ outputs;  3. the pass/ outputs;  4. the summary (with barcodes, the done marker).

A directory created for an output is fsynced into its parent before the rename into it; each rename's
directory is fsynced before the next step. Before every rename the installer asks the ledger whether its
lock is still trustworthy (`Ledger.check_lock_trusted`): a process frozen past the filesystem's lock
timeout renames nothing more, and `undo` moves back what it had renamed.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from pathlib import Path

from .durable import fsync_dir


@dataclass
class Move:
    staged: Path
    final: Path


@dataclass
class Installer:
    """The renames of one publication, in steps (each a list of moves); `stale`: files to remove first."""

    steps: list[list[Move]]
    stale: list[Path] = field(default_factory=list)
    check_lock: object = None  # callable raising when the lock may have been lost (Ledger.check_lock_trusted)
    _done: list[Move] = field(default_factory=list)
    _removed: list[Path] = field(default_factory=list)

    def run(self) -> None:
        """Do the renames (idempotent: a move whose staged file is gone and whose final file exists was done
        by an earlier run of this same publication)."""
        self._done = []
        for path in self.stale:
            self._check()
            try:
                path.unlink()
                self._removed.append(path)
            except FileNotFoundError:
                pass
        if self.stale:
            for folder in {p.parent for p in self.stale}:
                fsync_dir(folder)
        for step in self.steps:
            touched = set()
            for move in step:
                self._check()
                if _move(move):
                    self._done.append(move)
                    touched.add(move.final.parent)
            for folder in touched:
                fsync_dir(folder)

    def undo(self) -> None:
        """Move back what `run` renamed (the transaction did not commit). Stale files it removed are gone:
        they belonged to no committed publication."""
        touched = set()
        for move in reversed(self._done):
            try:
                move.staged.parent.mkdir(parents=True, exist_ok=True)
                os.replace(move.final, move.staged)
                touched.add(move.final.parent)
            except FileNotFoundError:
                pass
        self._done = []
        for folder in touched:
            fsync_dir(folder)

    def _check(self) -> None:
        if self.check_lock is not None:
            self.check_lock()


def _move(move: Move) -> bool:
    """Rename a staged output into place; False if an earlier run of the same publication already did.

    One rename in the common case: the staged file and the destination folder are looked at only when it
    fails. Each look is a round trip on a network filesystem, made under the ledger lock: two `stat`s before
    every rename were 45% of a publication's renames on GlusterFS (docs/benchmarks.md, "Scale limit")."""
    try:
        os.replace(move.staged, move.final)
        return True
    except FileNotFoundError:
        pass
    if not move.staged.exists():
        if move.final.exists():
            return False
        raise FileNotFoundError(errno.ENOENT, "staged output is missing", str(move.staged))
    make_dirs(move.final.parent)  # a new folder is made durable in its parent before the rename into it
    os.replace(move.staged, move.final)
    return True


def make_dirs(folder: Path) -> None:
    """`mkdir -p` that makes every folder it creates durable in its parent (fsync of the parent)."""
    if folder.is_dir():
        return
    missing = []
    at = folder
    while not at.is_dir():
        missing.append(at)
        at = at.parent
    for path in reversed(missing):
        try:
            path.mkdir()
        except FileExistsError:
            pass
        fsync_dir(path.parent)
