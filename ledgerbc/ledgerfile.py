"""Is this path a ledger? Asked before anything creates a file beside it.

A transaction creates `<ledger>.lock` and `<ledger>.turnstile` next to the ledger; a command given a
wrong path (`--ledger README.md`, a folder, a typo) must refuse it before that, leaving the folder as
it was. Only the file itself is looked at (no SQLite, no lock): its 16-byte SQLite header is written
when the ledger is created and never changes. Whether an SQLite file is a *ledgerbc* ledger is decided
later, inside the first transaction (`db.Ledger`). Light on purpose: `ledgerbc status --ledger WRONG`
answers before SQLAlchemy is imported.
"""

from pathlib import Path

from .errors import BadInput, LedgerCorrupt, LedgerNotFound

SQLITE_HEADER = b"SQLite format 3\x00"
REBUILD = "`ledgerbc recover --rebuild --input DIR --output DIR`"


def check(path) -> Path:
    """Return `path` when it is an SQLite file; otherwise raise the one-line error a user should see."""
    path = Path(path)
    if path.is_dir():
        raise BadInput(f"the ledger path {path} is a folder. Give the ledger file's path.")
    try:
        with open(path, "rb") as fh:
            header = fh.read(len(SQLITE_HEADER))
    except FileNotFoundError:
        raise LedgerNotFound(
            f"no ledger at {path}. Create it with `ledgerbc init`, or rebuild a lost one with {REBUILD}."
        ) from None
    except OSError as exc:
        raise BadInput(f"cannot read the ledger {path}: {exc.strerror or exc}. Check its permissions.") from None
    if header != SQLITE_HEADER:
        raise LedgerCorrupt(
            f"the ledger {path} is damaged or not a ledger (no SQLite header). Give the right --ledger, or run "
            f"`ledgerbc doctor`, then {REBUILD}."
        )
    return path
