"""`ledgerbc init`: check the folders, create the ledger atomically, remember the settings, first scan."""

import os
import shutil
import tempfile
from pathlib import Path

from . import db, dorado
from .durable import fsync_dir, fsync_path
from .errors import AlreadyInitialized, BadInput
from .layout import Layout
from .scan import Scanner
from .settings import SAMPLE_SHEET_COPY, SETTINGS_FILE, Settings


def check_input_dir(path: Path) -> Path:
    if not path.exists():
        raise BadInput(f"INPUT_DIR {path} does not exist. Give the folder holding the .pod5 files.")
    if not path.is_dir():
        raise BadInput(f"INPUT_DIR {path} is not a folder. Give the folder holding the .pod5 files.")
    if not os.access(path, os.R_OK | os.X_OK):
        raise BadInput(f"INPUT_DIR {path} is not readable by this user. Fix its permissions (chmod/chgrp).")
    return path.resolve()


def check_output_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BadInput(f"cannot create OUTPUT_DIR {path}: {exc.strerror or exc}. Choose a writable folder.") from None
    if not path.is_dir():
        raise BadInput(f"OUTPUT_DIR {path} is not a folder.")
    if not os.access(path, os.W_OK | os.X_OK):
        raise BadInput(f"OUTPUT_DIR {path} is not writable by this user. Choose a writable folder.")
    probe_writable(path, "OUTPUT_DIR")
    return path.resolve()


def probe_writable(folder: Path, what: str) -> None:
    """Create and remove a file: os.access trusts mode bits, which root, ACLs and odd mounts ignore."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".ledgerbc-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise BadInput(f"{what} {folder} is not writable: {exc.strerror or exc}. Choose a writable folder.") from None


def pin_dorado_version(settings: Settings) -> list[str]:
    """The study's dorado version from `dorado --version` when dorado is on PATH; warnings."""
    exe = shutil.which(settings.dorado)
    if exe is None:
        return []  # a login node without dorado: the first worker records its version
    version, said = dorado.query_version(exe)
    if version is None:
        return [f"{said}: the study's dorado version will be the first worker's."]
    settings.dorado_version = version
    return []


def init_ledger(settings: Settings, ledger_path: Path | None = None, progress=None):
    """Create the ledger for a study and scan INPUT_DIR. Returns (ledger path, scan report, warnings).
    With dorado on PATH, its version becomes the study's (else the first worker's does: provenance.py).
    Nothing is created when a folder, a setting or the sample sheet is refused."""
    warnings = settings.validate()  # before anything is created: a refused option leaves no trace
    settings.input_dir = str(check_input_dir(Path(settings.input_dir)))
    missing = dorado.missing_warning(settings)
    if missing:
        warnings.append(missing)
    sheet = read_sample_sheet(settings) if settings.sample_sheet else None
    if sheet is not None:
        warnings += sheet[0].warnings
    settings.output_dir = str(check_output_dir(Path(settings.output_dir)))
    layout = Layout(Path(settings.output_dir))
    ledger_path = Path(ledger_path).absolute() if ledger_path else layout.default_ledger
    if ledger_path.is_dir():
        raise BadInput(f"the ledger path {ledger_path} is a folder. Give a file path for --ledger.")
    if not ledger_path.parent.is_dir():
        raise BadInput(f"the folder of the ledger path {ledger_path} does not exist.")
    probe_writable(ledger_path.parent, "the ledger's folder")
    existing = layout.output / SETTINGS_FILE
    if ledger_path.exists() or existing.exists():
        raise AlreadyInitialized(
            f"{settings.output_dir} already has a ledger ({ledger_path if ledger_path.exists() else existing}). "
            "Add new files with `ledgerbc scan`, or give another OUTPUT_DIR."
        )
    if settings.dorado_version is None:
        warnings += pin_dorado_version(settings)
    # Build aside, then move into place under the global lock: no reader ever sees half a ledger,
    # and of two concurrent inits exactly one wins.
    tmp = ledger_path.with_name(f".{ledger_path.name}.init-{os.getpid()}")
    sheet_tmp = layout.output / f".{SAMPLE_SHEET_COPY}.init-{os.getpid()}"
    try:
        if sheet is not None:
            # Workers and rebuilds read init's copy, never the user's file (which may change or vanish).
            sheet_tmp.write_bytes(sheet[1])
            fsync_path(sheet_tmp)
            settings.sample_sheet = SAMPLE_SHEET_COPY  # relative to OUTPUT_DIR
        db.create_ledger_file(tmp, settings)
        ledger = db.Ledger(ledger_path)
        with ledger.locked():
            if ledger_path.exists():
                raise AlreadyInitialized(
                    f"another `ledgerbc init` created {ledger_path} first. Use `ledgerbc scan` to add files."
                )
            if sheet is not None:
                os.replace(sheet_tmp, layout.output / SAMPLE_SHEET_COPY)
            os.replace(tmp, ledger_path)
            fsync_dir(ledger_path.parent)
            fsync_dir(layout.output)
    finally:
        for leftover in (tmp, sheet_tmp):
            if leftover.exists():
                leftover.unlink()
    settings.write_json()
    for folder in (layout.pass_dir, layout.fail_dir, layout.work, layout.staging_root, layout.logs):
        folder.mkdir(parents=True, exist_ok=True)
    report = Scanner(ledger, settings).scan(progress=progress)
    return ledger_path, report, warnings


def read_sample_sheet(settings: Settings):
    """(the sample sheet given to init, checked as dorado checks it by samplesheet.parse; its bytes).
    BadInput listing every problem, one line each, when dorado would refuse it (it aborts at start)."""
    from .samplesheet import parse

    path = Path(settings.sample_sheet)
    if not path.is_file():
        raise BadInput(f"--sample-sheet {path} is not a readable file. Give the CSV sample sheet for dorado.")
    sheet = parse(path, settings.kit_name)
    if sheet.problems:
        lines = "\n".join(sheet.problems)
        raise BadInput(f"the sample sheet {path} has {len(sheet.problems)} problem(s) dorado would refuse it for "
                       f"(dorado aborts at start). Fix them and run init again:\n{lines}")
    try:
        return sheet, path.read_bytes()
    except OSError as exc:
        raise BadInput(f"cannot read the sample sheet {path}: {exc.strerror or exc}.") from None
