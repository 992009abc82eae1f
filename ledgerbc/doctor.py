"""`ledgerbc doctor`: is this ledger's storage, lock, clock and content fit for many workers (DESIGN §6)?

Every check yields one `Check` line: `ok|warn|FAIL  <check>: <detail>`. A FAIL carries the exit code of
the matching error (7 unsafe filesystem or lock, 4 no ledger, 5 damaged, 6 schema, 3 dorado/model, 15 an SQLite
library without what the ledger's statements use).

The mount checks live in `mounts.py` (also used by `run` and `submit`, which refuse an unsafe mount).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from . import errors
from .dorado import query_version as query_dorado_version
from .mounts import FAIL, OK, WARN, Check, mount_check

log = logging.getLogger("ledgerbc.doctor")

DEFAULT_CLOCK_SKEW = 60.0
PROBE_TIMEOUT = 60.0  # seconds for the lock-probe child (a slow network filesystem is slow, not broken)


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
    from . import schema

    try:
        version, problems = ledger.health()
    except errors.LedgerError as exc:
        return [Check(FAIL, "ledger", str(exc), exc.exit_code)], None
    if problems != ["ok"]:
        shown = "; ".join(problems[:3]) + (f" (+{len(problems) - 3} more)" if len(problems) > 3 else "")
        return [Check(FAIL, "integrity", f"PRAGMA integrity_check: {shown}. Stop the workers, then rebuild with "
                      "`ledgerbc recover --rebuild --input DIR --output DIR`.", errors.LedgerCorrupt.exit_code)], None
    checks = [Check(OK, "integrity", "PRAGMA integrity_check: ok")]
    if version != schema.head_revision():
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
    checks.append(workers_check(ledger, settings))
    return checks, settings


def workers_check(ledger, settings) -> Check:
    """Live workers (heartbeat within lease + clock skew) against what one ledger carries (limits.py)."""
    from . import claim, limits

    try:
        live = ledger.transact(lambda conn: claim._live_workers(conn, ledger.clock(), settings.lease + settings.clock_skew))
    except errors.LedgerError as exc:
        return Check(FAIL, "workers", str(exc), exc.exit_code)
    said = limits.warning(live, f"{live} live workers")
    if said:
        return Check(WARN, "workers", said)
    return Check(OK, "workers", f"{live} live workers (one ledger carries ~{limits.LEDGER_WORKERS_LIMIT:,}: "
                 "bench/scale_limit.py)")


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
    # (No check of the batch id counter against the highest id: since migration 0005 the counter is the highest
    # id, or a rebuild's floor above it: db.BATCH_IDS_HANDED_OUT_SQL.)
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
        found, said = query_dorado_version(exe)
        pinned = settings.dorado_version
        if found is not None and pinned and found != pinned:
            checks.append(Check(WARN, "dorado", f"{exe} --version: {found}, but the study's is {pinned}: workers "
                                "with this dorado refuse to claim (exit 13) unless `ledgerbc settings "
                                "--allow-dorado-upgrade` lets newer versions join."))
        elif found is not None:
            checks.append(Check(OK, "dorado", f"{exe} --version: {found}"
                                + (" (the study's)" if pinned else " (the study's version is not pinned yet)")))
        else:
            checks.append(Check(FAIL, "dorado", f"{said}. Check the dorado installation (libraries, module load).",
                                errors.BadInput.exit_code))
    for model in dict.fromkeys([settings.model, *sorted((settings.chemistry_models or {}).values())]):
        checks.append(model_check(model, settings.models_directory))
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


def sqlite_check() -> Check:
    """Can this Python's SQLite library run the ledger's statements (db.SQLITE_NEEDS)?"""
    import sqlite3

    from . import db

    try:
        db.check_sqlite()
    except errors.SqliteUnfit as exc:
        return Check(FAIL, "sqlite", str(exc), exc.exit_code)
    return Check(OK, "sqlite", f"SQLite {sqlite3.sqlite_version}: " + ", ".join(f for f, _sql in db.SQLITE_NEEDS))


# -- all of it ------------------------------------------------------------------------------------------------
def run_checks(ledger, mountinfo: str | None = None) -> list[Check]:
    """Every check, in order: SQLite library, mount, lock, clock, ledger content, dorado, model."""
    folder = ledger.path.parent
    if not folder.is_dir():
        return [Check(FAIL, "ledger", f"the folder {folder} of the ledger does not exist. Give the right --ledger.",
                      errors.LedgerNotFound.exit_code)]
    library = sqlite_check()
    if library.status == FAIL:  # nothing below can read the ledger; the folder's mount and lock are still told
        with _scratch_ledger(folder) as scratch:
            return [library, mount_check(folder, mountinfo), lock_check(scratch)]
    try:
        ledger.check_file()  # before any lock: nothing may be created beside something that is not a ledger
        problem = None
    except errors.LedgerError as exc:
        problem = Check(FAIL, "ledger", str(exc), exc.exit_code)
    checks = [library, mount_check(folder, mountinfo)]
    if problem is None:
        checks.append(lock_check(ledger))
    else:  # the folder's locks are still worth knowing (where a ledger would go), on a name removed after
        with _scratch_ledger(folder) as scratch:
            checks.append(lock_check(scratch))
    content, settings = ([problem], None) if problem else ledger_checks(ledger)
    checks.append(clock_check(folder, settings.clock_skew if settings else DEFAULT_CLOCK_SKEW))
    checks += content
    if settings is not None:
        checks += dorado_checks(settings)
    return checks


@contextlib.contextmanager
def _scratch_ledger(folder):
    """A ledger name in `folder` that is never created, for the lock probe where there is no ledger: its
    lock and turnstile files are removed afterwards, so doctor leaves the folder as it found it."""
    from .db import Ledger

    scratch = Ledger(Path(folder) / f".ledgerbc-lock-probe-{socket.gethostname()}-{os.getpid()}")
    try:
        yield scratch
    finally:
        for leftover in (scratch.lock_path, Path(f"{scratch.path}.turnstile")):
            leftover.unlink(missing_ok=True)


def exit_code(checks: list[Check]) -> int:
    """0 without a FAIL, else the exit code of the first FAIL."""
    return next((c.exit_code or 1 for c in checks if c.status == FAIL), 0)
