"""Every error a user can meet: one line saying what happened and which command fixes it.

The CLI prints `Error: <message>` and exits with `exit_code`; the codes are documented in the README.
`ledgerbc verify` finding violations is not an error but an answer: it exits 14 (verify.EXIT_VIOLATIONS).
"""
import errno


class LedgerError(Exception):
    """Base class. `exit_code` is the process exit status the CLI uses. A message of several lines is
    several errors (e.g. every refused option): the CLI prints each as its own `Error: ...` line."""

    exit_code = 1


class BadInput(LedgerError):
    """Input or output folder, option value or file given by the user is not usable."""

    exit_code = 3


class LedgerNotFound(LedgerError):
    exit_code = 4


class LedgerCorrupt(LedgerError):
    """The ledger file is not a readable SQLite ledger."""

    exit_code = 5


class SchemaMismatch(LedgerError):
    """The ledger was written by an older (upgrade it) or newer (refused) ledgerbc."""

    exit_code = 6


class LockTimeout(LedgerError):
    """The global lock file could not be taken in time."""

    exit_code = 7


class UnsafeFilesystem(LedgerError):
    exit_code = 7


class SqliteUnfit(LedgerError):
    """This Python's SQLite library lacks something the ledger's statements use (db.SQLITE_NEEDS)."""

    exit_code = 15


class AlreadyInitialized(LedgerError):
    exit_code = 8


class NotOwner(LedgerError):
    """A worker acted on a batch it no longer owns: it was fenced (reclaimed or released)."""

    exit_code = 9


class IllegalTransition(LedgerError):
    """A state change that the ledger protocol forbids (e.g. finishing a file that is already done)."""

    exit_code = 9


class LockMaybeLost(LedgerError):
    """The ledger lock was held so long that the filesystem may have revoked it: nothing was committed."""

    exit_code = 7


class SlurmError(LedgerError):
    exit_code = 10


FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)  # an OSError with one of these is StorageFull, never a failed file


class StorageFull(LedgerError):
    """OUTPUT_DIR or the ledger's filesystem is full (ENOSPC) or over quota (EDQUOT): nothing failed,
    the batch was given back (DESIGN §4 Storage full). `folder`: where space is missing; `ledger`: the
    ledger itself cannot be written."""

    exit_code = 11

    def __init__(self, message: str, folder=None, ledger: bool = False):
        super().__init__(message)
        self.folder = folder
        self.ledger = ledger


class NotFinished(LedgerError):
    """`finalize` without --partial while files are still pending, claimed or waiting."""

    exit_code = 12


class OutputDamaged(LedgerError):
    """`finalize` met a published output that is missing, changed since publication, or cannot be concatenated."""

    exit_code = 12


class DoradoVersionMismatch(LedgerError):
    """A worker's dorado is not the study's (DESIGN §5 provenance): it refuses to claim."""

    exit_code = 13
