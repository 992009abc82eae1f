"""`ledgerbc recover --rebuild`: recreate a lost or corrupt ledger from the filesystem alone (DESIGN §4).

- every pod5 under INPUT_DIR is scanned again (pending, duplicate, or failed admission);
- a file whose `pass/` output exists is done (read counts taken from its outputs);
- the files linked from `work/ASSIGNED_<batch>_<worker>/` belong to that batch again, running, with a
  fresh heartbeat: a live worker keeps its batch and can still publish; a dead one's batch expires;
- batch ids continue above every id found on disk (ASSIGNED folders, staging, logs, the old ledger),
  plus a margin for claims too recent to have left a trace, so a fencing token is never reused.

The slow part (scanning pod5 files, counting output reads) runs before taking the lock; the adoption of
ASSIGNED folders and published outputs, and the swap, run under the global lock, so no publication can
interleave. The old ledger file, if any, is kept beside it as `<name>.replaced-<time>`.
"""

import json
import os
import shutil
import sqlite3
import time
from pathlib import Path

import sqlalchemy as sa

from . import claim, db, models, split
from .durable import fsync_dir
from .create import check_input_dir, check_output_dir
from .errors import BadInput
from .layout import MANIFEST, Layout
from .models import CLAIMED, DONE, PENDING, RUNNING, Batch, Pod5File
from .scan import Scanner
from .settings import Settings

ID_MARGIN = 1000  # batch ids possibly handed out without leaving a trace on disk yet


def rebuild_ledger(input_dir, output_dir, ledger_path=None, clock=time.time, progress=None):
    """Rebuild the ledger; returns (ledger path, lines describing what was found). `progress(done, total)`
    follows the scan of INPUT_DIR, its longest part."""
    input_dir = check_input_dir(Path(input_dir))
    output_dir = check_output_dir(Path(output_dir))
    try:
        settings = Settings.read_json(output_dir)
    except BadInput:
        raise BadInput(
            f"no readable {output_dir}/ledgerbc.settings.json: is {output_dir} the OUTPUT_DIR given to init?"
        ) from None
    settings.input_dir, settings.output_dir = str(input_dir), str(output_dir)
    layout = Layout(output_dir)
    ledger_path = Path(ledger_path).absolute() if ledger_path else layout.default_ledger
    if ledger_path.is_dir():
        raise BadInput(f"the ledger path {ledger_path} is a folder. Give a file path for --ledger.")

    tmp = ledger_path.with_name(f".{ledger_path.name}.rebuild-{os.getpid()}")
    if tmp.exists():
        tmp.unlink()
    try:
        db.create_ledger_file(tmp, settings)
        aside = db.Ledger(tmp, clock=clock)
        Scanner(aside, settings).scan(progress=progress)
        rows = aside.transact(lambda c: c.execute(sa.select(Pod5File.id, Pod5File.rel_path)).all())
        counts = {r.rel_path: _count(layout, settings.emit, r.rel_path) for r in rows
                  if layout.pass_path(r.rel_path, settings.emit).exists()}
        live = db.Ledger(ledger_path, clock=clock)
        with live.locked():
            lines = aside.transact(_adopt, layout, settings, input_dir, counts, _max_batch_id(layout, ledger_path), clock())
            replaced = ledger_path.with_name(f"{ledger_path.name}.replaced-{int(clock())}")
            if ledger_path.exists():
                os.replace(ledger_path, replaced)
            # A hot journal left by a process killed mid-transaction belongs to the old file: beside the new
            # one, SQLite would roll the old pages back into it. It goes aside with the old file.
            journal = ledger_path.with_name(f"{ledger_path.name}-journal")
            if journal.exists():
                os.replace(journal, replaced.with_name(f"{replaced.name}-journal"))
            os.replace(tmp, ledger_path)
            fsync_dir(ledger_path.parent)
    finally:
        for leftover in (tmp, Path(f"{tmp}.lock"), Path(f"{tmp}.turnstile")):
            if leftover.exists():
                leftover.unlink()
    settings.write_json()
    return ledger_path, lines


def read_manifest(folder: Path) -> dict:
    """The manifest a worker wrote into its ASSIGNED folder (batch id, fencing nonce, files); {} if none."""
    try:
        return json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _count(layout, emit, rel):
    return split.count_published(layout.pass_path(rel, emit), layout.fail_path(rel, emit))


def _max_batch_id(layout: Layout, ledger_path: Path) -> int:
    ids = [b for b, _w, _p in layout.assigned_dirs()] + [b for b, _p in layout.staging_dirs()]
    if layout.logs.is_dir():
        ids += [int(p.name.split(".")[0]) for p in layout.logs.iterdir() if p.name.split(".")[0].isdigit()]
    try:  # the old ledger, when it can still be read, knows the highest id handed out
        conn = sqlite3.connect(f"file:{ledger_path}?mode=ro", uri=True, timeout=5)
        try:
            row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name='batches'").fetchone()
            if row:
                ids.append(int(row[0]))
        finally:
            conn.close()
    except sqlite3.Error:
        pass
    return max(ids, default=0)


def _adopt(conn, layout, settings, input_dir, counts, max_id, now):
    """Under the global lock: published outputs -> done, ASSIGNED folders -> running batches."""
    lines = []
    by_rel = {r.rel_path: r for r in conn.execute(sa.select(Pod5File.id, Pod5File.rel_path, Pod5File.state, Pod5File.size))}
    done = []
    for rel, row in by_rel.items():
        if row.state == models.DUPLICATE:
            continue
        # Outputs counted before the lock were published then (never unpublished); any other file is
        # looked at again: a publication may have landed since.
        if rel not in counts and not layout.pass_path(rel, settings.emit).exists():
            continue
        reads_pass, reads_fail = counts.get(rel) or _count(layout, settings.emit, rel)
        done.append({"file_id": row.id, "rp": reads_pass, "rf": reads_fail})
    if done:  # one executemany: a statement per row cost ~0.25 ms each, under the lock (bench/rebuild.py)
        conn.execute(
            sa.update(Pod5File).where(Pod5File.id == sa.bindparam("file_id"))
            .values(state=DONE, reads_pass=sa.bindparam("rp"), reads_fail=sa.bindparam("rf"), done_at=now,
                    last_error=None),
            done,
        )
    done = len(done)
    lines.append(f"{len(by_rel)} pod5 files found, {done} already published")
    for batch_id, worker_id, folder in sorted(layout.assigned_dirs()):
        members = []
        for link in folder.iterdir():
            if not link.is_symlink():
                continue
            target = Path(os.path.normpath(Path(os.path.realpath(folder)) / os.readlink(link)))
            try:
                rel = target.relative_to(input_dir).as_posix()
            except ValueError:
                continue
            row = by_rel.get(rel)
            if row is not None and row.state in (PENDING, models.FAILED) and not layout.pass_path(rel, settings.emit).exists():
                members.append(row)
        if not members:
            # Everything in it is published (its worker died before removing it): nobody will need it.
            shutil.rmtree(folder, ignore_errors=True)
            for b, staged in layout.staging_dirs():
                if b == batch_id:
                    shutil.rmtree(staged, ignore_errors=True)
            lines.append(f"ASSIGNED_{batch_id}_{worker_id}: nothing left to do in it, removed")
            continue
        manifest = read_manifest(folder)
        conn.execute(
            sa.insert(Batch).values(
                id=batch_id, worker_id=worker_id, state=RUNNING, claimed_at=now, heartbeat_at=now,
                n_files=len(members), n_bytes=sum(m.size for m in members),
                token=manifest.get("token"), chemistry=manifest.get("chemistry"),
            )
        )
        conn.execute(
            sa.update(Pod5File).where(Pod5File.id.in_([m.id for m in members]))
            .values(state=CLAIMED, batch_id=batch_id, last_error=None)
        )
        claim.touch_worker(conn, worker_id, now)
        lines.append(f"batch {batch_id} of {worker_id}: {len(members)} files assigned, running again")
    # Staging without an ASSIGNED folder: its worker published (or died after) and removed the folder.
    adopted = {b for b, _w, _p in layout.assigned_dirs()}
    for batch_id, staged in layout.staging_dirs():
        if batch_id not in adopted:
            shutil.rmtree(staged, ignore_errors=True)
            lines.append(f"staging of batch {staged.name}: no ASSIGNED folder, removed")
    next_id = max_id + ID_MARGIN
    conn.exec_driver_sql("DELETE FROM sqlite_sequence WHERE name='batches'")
    conn.exec_driver_sql("INSERT INTO sqlite_sequence(name, seq) VALUES ('batches', ?)", (next_id,))
    conn.execute(sa.insert(models.Event).values(ts=now, kind="rebuild", message="; ".join(lines)[:2000]))
    lines.append(f"new batch ids start above {next_id}")
    return lines
