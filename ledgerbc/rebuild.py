"""`ledgerbc recover --rebuild`: recreate a lost or corrupt ledger from the filesystem alone (DESIGN §4).

- INPUT_DIR and OUTPUT_DIR must be the folders `ledgerbc.settings.json` records (`--force` to override):
  another INPUT_DIR changes every relative path, and everything would be basecalled again;
- every pod5 under INPUT_DIR is scanned again (pending, duplicate, or failed admission);
- a file whose done marker exists (published.py) is done, with its `outputs` rows read from disk; so is
  a published input whose pod5 is no longer at its path (moved after its publication): the pod5 holding
  its reads (by read id, read only when there is such an input) is its copy, not new work;
- copies (one `file_identifier` under several paths): the original is the one already published, else the
  one claimed in an ASSIGNED folder, else the first in sorted order; never the walk order, which a file
  arriving later can change;
- outputs of a publication cut short (its done marker absent), of a file no adopted batch holds, are removed,
  as a reclaim would have (the file is basecalled again, or moved away and its copy is);
- each `work/ASSIGNED_<batch>_<worker>/` is adopted from its manifest (`.batch.json`: batch id, fencing
  nonce, worker, files by rel + file_identifier; a folder without one, from an older version, by its links
  with no nonce): its files belong to that batch again, running, with a fresh heartbeat, so a live worker
  keeps its batch and publishes exactly its files; a dead one's batch expires. A file claimed by two
  folders goes to the highest batch id, the newest claim. Hidden `.ASSIGNED_*.tmp-*` folders are claims
  that were never completed: removed;
- batch ids continue above every id seen on disk (ASSIGNED folders, staging, logs, lease files) and in the
  old ledger when it can be read. A claim that left no trace can still be handed its id again: harmless,
  since the fencing token is the id *and* a random nonce (claim.py), which the new claim does not share.

The slow part (scanning pod5 files, reading and checksumming published outputs) runs before taking the
lock; under the global lock only cheap checks run (has an ASSIGNED folder appeared or vanished, has a file
of one been published meanwhile: then the lock is let go, the news read, and the check repeated), then
the adoption and the swap, so no publication can interleave. The old ledger file, if any, is kept beside
it as `<name>.replaced-<time>`.
"""
from __future__ import annotations

import json
import os
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import sqlalchemy as sa

from . import claim, db, models, pod5check, published
from .create import check_input_dir, check_output_dir
from .durable import fsync_dir, remove_tree
from .errors import BadInput
from .layout import MANIFEST, Layout
from .lease import lease_dir
from .models import CLAIMED, DUPLICATE, PENDING, RUNNING, Batch, Pod5File
from .scan import Scanner
from .settings import SETTINGS_FILE, Settings

LOCKED_TRIES = 3  # times the lock is let go to read news (publications meanwhile) before reading them under it
READERS = 8  # threads reading published outputs (file I/O and crc32 release the GIL)


@dataclass
class Assigned:
    """One `work/ASSIGNED_<batch>_<worker>` folder: the claim it records."""

    batch_id: int
    worker_id: str
    folder: Path
    files: list[tuple[str, str | None]]  # (rel, file_identifier: None when known only by its link)
    token: str | None = None
    chemistry: str | None = None
    manifest: bool = False


@dataclass
class Survey:
    """What the disk says, read outside the lock: published inputs and claims (ASSIGNED folders)."""

    layout: Layout
    settings: Settings
    input_dir: Path
    published: dict[str, published.Published] = field(default_factory=dict)
    assigned: list[Assigned] = field(default_factory=list)
    moved: dict[str, str | None] = field(default_factory=dict)  # published rel, no pod5 there -> a pod5 with its reads
    unfinished: dict[str, list[Path]] = field(default_factory=dict)  # rel -> outputs, no done marker among them

    def read_published(self, rels) -> None:
        rels = [r for r in rels if r not in self.published]
        barcodes = self.layout.barcode_dirs() if published.barcoded(self.settings) else ()

        def one(rel):
            return rel, published.read(self.layout, self.settings, rel, barcodes, input_dir=self.input_dir)

        with ThreadPoolExecutor(READERS) as pool:
            for rel, got in pool.map(one, rels):
                if got is not None:
                    self.published[rel] = got

    def find_moved(self, rows) -> None:
        """Published inputs whose path holds no pod5 any more (moved after their publication, `mv run1/x
        run2/x`): their outputs are read, and the scanned pod5 that holds their reads (by a read id their
        summary lists) is found, so it is recorded as their copy and not basecalled again. Pod5 read ids are
        read only when there are such inputs, and the pod5 files with the same name first. `rows`: (rel_path,
        file_identifier) of every file the scan found."""
        on_disk = published.outputs_by_input(self.layout, self.settings)
        marked = set()
        for rel, paths in on_disk.items():
            if published.done_marker(self.layout, self.settings, rel) in paths:
                marked.add(rel)
            else:
                self.unfinished[rel] = paths
        gone = sorted(marked - {r.rel_path for r in rows})
        self.read_published(gone)
        wanted: dict[str, list[str]] = {}  # one read id of each -> those inputs
        for rel in gone:
            if rel in self.published:
                self.moved[rel] = None
                ids = published.summary_read_ids(self.layout, self.settings, rel)
                if ids:
                    wanted.setdefault(min(ids), []).append(rel)
        names = {PurePosixPath(rel).name for rels in wanted.values() for rel in rels}
        holders = sorted((r.rel_path for r in rows if r.file_identifier and r.rel_path not in self.published),
                         key=lambda rel: (PurePosixPath(rel).name not in names, rel))
        for rel in holders:
            if not wanted:
                break
            try:
                ids = set(pod5check.read_ids(self.input_dir / rel))
            except Exception:  # damaged or vanished meanwhile: not the pod5 of anything published
                continue
            for read_id in wanted.keys() & ids:
                for moved in wanted.pop(read_id):
                    self.moved[moved] = rel

    def news(self, old_ledger_live: bool) -> list[str]:
        """Under the lock, cheap: re-list ASSIGNED folders (reading the manifests of new ones) and return the
        claimed files that were published since the survey: those of folders that vanished (their worker
        published and cleaned up), and, when the old ledger could still take publications, of every folder."""
        now = {(a.batch_id, a.worker_id): a for a in read_assigned(self.layout, self.input_dir, known=self.assigned)}
        before = {(a.batch_id, a.worker_id): a for a in self.assigned}
        look = [a for key, a in before.items() if key not in now]
        if old_ledger_live:
            look += list(now.values())
        self.assigned = list(now.values())
        return sorted({rel for a in look for rel, _fid in a.files
                       if rel not in self.published and published.is_published(self.layout, self.settings, rel)})


def rebuild_ledger(input_dir, output_dir, ledger_path=None, clock=time.time, force: bool = False, progress=None):
    """Rebuild the ledger; returns (ledger path, lines describing what was found). Refuses (BadInput) an
    INPUT or OUTPUT folder other than the recorded ones unless `force`. `progress(done, total)` follows the
    scan of INPUT_DIR, its longest part."""
    input_dir = check_input_dir(Path(input_dir))
    output_dir = check_output_dir(Path(output_dir))
    try:
        settings = Settings.read_json(output_dir)
    except BadInput:
        raise BadInput(
            f"no readable {output_dir}/{SETTINGS_FILE}: is {output_dir} the OUTPUT_DIR given to init?"
        ) from None
    lines = check_recorded_folders(settings, input_dir, output_dir, force)
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
        rows = aside.transact(lambda c: c.execute(sa.select(Pod5File.rel_path, Pod5File.file_identifier)).all())
        survey = Survey(layout, settings, input_dir, assigned=read_assigned(layout, input_dir))
        survey.read_published([r.rel_path for r in rows if r.file_identifier is not None])
        survey.find_moved(rows)
        # The bulk, on the ledger built aside, before the lock: published files are never unpublished.
        found = aside.transact(_prepare, survey, clock())
        old_seq, old_live = _old_ledger(ledger_path)
        live = db.Ledger(ledger_path, clock=clock)
        for attempt in range(LOCKED_TRIES + 1):
            with live.locked():
                news = survey.news(old_live)
                if news and attempt < LOCKED_TRIES:
                    pass  # read them outside the lock, then look again
                else:
                    survey.read_published(news)  # the last try: under the lock, rather than never finishing
                    lines += found + aside.transact(_adopt, survey, max(old_seq, _max_id_on_disk(layout, ledger_path)),
                                                    clock())
                    _swap(tmp, ledger_path, clock())
                    break
            survey.read_published(news)
    finally:
        for leftover in (tmp, Path(f"{tmp}.lock"), Path(f"{tmp}.turnstile")):
            if leftover.exists():
                leftover.unlink()
    settings.write_json()
    return ledger_path, lines


def check_recorded_folders(settings: Settings, input_dir: Path, output_dir: Path, force: bool) -> list[str]:
    """INPUT and OUTPUT must resolve to the folders `ledgerbc.settings.json` records: another INPUT_DIR (the
    run folder instead of its pod5/ subfolder) changes every relative path, and everything would be
    basecalled again. A recorded folder that does not exist here (another mount point) counts as another
    folder. With `force`, a line says what was overridden."""
    lines = []
    for name, option, recorded, given in (("INPUT_DIR", "--input", settings.input_dir, input_dir),
                                          ("OUTPUT_DIR", "--output", settings.output_dir, output_dir)):
        if not recorded or _same_folder(recorded, given):
            continue
        if not force:
            raise BadInput(
                f"{option} {given} is not the {name} recorded in {output_dir / SETTINGS_FILE} ({recorded}). "
                f"Give {recorded}, or add --force to rebuild with {given} anyway."
            )
        lines.append(f"{name} is now {given} (--force; ledgerbc.settings.json recorded {recorded})")
    return lines


def _same_folder(recorded: str, given: Path) -> bool:
    try:
        return os.path.samefile(recorded, given)
    except OSError:
        return False


def read_manifest(folder: Path) -> dict:
    """The manifest a worker wrote into its ASSIGNED folder (batch id, fencing nonce, files); {} if none."""
    try:
        data = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def read_assigned(layout: Layout, input_dir: Path, known: list[Assigned] = ()) -> list[Assigned]:
    """Every complete ASSIGNED folder and the claim it records (folders in `known` are not read again)."""
    cache = {(a.batch_id, a.worker_id, a.folder): a for a in known}
    found = []
    for batch_id, worker_id, folder in layout.assigned_dirs():
        if (batch_id, worker_id, folder) in cache:
            found.append(cache[(batch_id, worker_id, folder)])
            continue
        manifest = read_manifest(folder)
        listed = manifest.get("files")
        if manifest.get("batch_id") == batch_id and isinstance(listed, list):
            files = [(f["rel"], f.get("file_identifier")) for f in listed if isinstance(f, dict) and "rel" in f]
            found.append(Assigned(batch_id, manifest.get("worker_id") or worker_id, folder, files,
                                  manifest.get("token"), manifest.get("chemistry"), manifest=True))
        else:  # a folder made by an older version: its links say which files it holds, no nonce
            found.append(Assigned(batch_id, worker_id, folder, [(rel, None) for rel in _linked(folder, input_dir)]))
    return found


def _linked(folder: Path, input_dir: Path) -> list[str]:
    rels = []
    try:
        links = sorted(folder.iterdir())
    except OSError:
        return rels
    for link in links:
        if not link.is_symlink():
            continue
        target = Path(os.path.normpath(Path(os.path.realpath(folder)) / os.readlink(link)))
        for candidate in (target, Path(os.path.realpath(link))):
            try:
                rels.append(candidate.relative_to(input_dir).as_posix())
                break
            except ValueError:
                continue
    return rels


def _old_ledger(ledger_path: Path) -> tuple[int, bool]:
    """(highest batch id the old ledger handed out, whether it can still take publications)."""
    try:
        conn = sqlite3.connect(f"file:{ledger_path}?mode=ro", uri=True, timeout=5)
        try:
            counters = [f"SELECT {db.BATCH_IDS_HANDED_OUT_SQL}"]
            if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'sqlite_sequence'").fetchone():
                counters.append("SELECT seq FROM sqlite_sequence WHERE name = 'batches'")  # before migration 0005
            return max(int((conn.execute(sql).fetchone() or (0,))[0] or 0) for sql in counters), True
        finally:
            conn.close()
    except sqlite3.Error:
        return 0, False


def _max_id_on_disk(layout: Layout, ledger_path: Path) -> int:
    """The highest batch id with a trace on disk: ASSIGNED folders (hidden half-made ones too), staging,
    logs, lease files."""
    ids = [b for b, _w, _p in layout.assigned_dirs()] + [b for b, _p in layout.staging_dirs()]
    ids += [b for b, _p in hidden_claims(layout)]
    for folder in (layout.logs, lease_dir(ledger_path)):
        if folder.is_dir():
            ids += [int(head) for p in folder.iterdir() if (head := p.name.lstrip(".").split(".")[0]).isdigit()]
    return max(ids, default=0)


def hidden_claims(layout: Layout) -> list[tuple[int, Path]]:
    """`.ASSIGNED_<batch>_<worker>.tmp-<nonce>` folders: claims whose folder was never completed."""
    if not layout.work.is_dir():
        return []
    found = []
    for entry in layout.work.iterdir():
        if entry.name.startswith(".ASSIGNED_") and ".tmp-" in entry.name:
            head = entry.name[len(".ASSIGNED_"):].split("_", 1)[0]
            found.append((int(head) if head.isdigit() else 0, entry))
    return found


def _swap(tmp: Path, ledger_path: Path, now: float) -> None:
    replaced = ledger_path.with_name(f"{ledger_path.name}.replaced-{int(now)}")
    if ledger_path.exists():
        os.replace(ledger_path, replaced)
    # A hot journal left by a process killed mid-transaction belongs to the old file: beside the new
    # one, SQLite would roll the old pages back into it. It goes aside with the old file.
    journal = ledger_path.with_name(f"{ledger_path.name}-journal")
    if journal.exists():
        os.replace(journal, replaced.with_name(f"{replaced.name}-journal"))
    os.replace(tmp, ledger_path)
    fsync_dir(ledger_path.parent)


def _prepare(conn, survey: Survey, now: float) -> list[str]:
    """Before the lock, on the ledger built aside: originals of copies, published files -> done with their
    `outputs` rows (the bulk of the writes)."""
    t = Pod5File
    _record_moved(conn, survey, now)
    rows = conn.execute(sa.select(t.id, t.rel_path, t.state, t.file_identifier)).all()
    claimed_rel = {rel for a in survey.assigned for rel, _fid in a.files}
    lines = _elect_originals(conn, rows, survey.published, claimed_rel)
    if survey.moved:
        copies = sum(1 for holder in survey.moved.values() if holder)
        lines.append(f"{len(survey.moved)} published files are no longer at their path: done ({copies} found "
                     "elsewhere in INPUT_DIR, recorded as their copies)")
    _mark_published(conn, survey, now)
    return lines


def _record_moved(conn, survey: Survey, now: float) -> None:
    """A row for each published input whose pod5 moved away (Survey.find_moved), as the pod5 it was made from
    (the one now holding its reads): published, it is that pod5's original (_elect_originals), marked done
    with the others (_mark_published); the pod5's new path is its duplicate."""
    t = Pod5File
    holders = {r.rel_path: r for r in conn.execute(sa.select(t.rel_path, t.size, t.mtime_ns, t.read_count, t.file_identifier)
                                                   .where(t.rel_path.in_({h for h in survey.moved.values() if h})))}
    for rel, holder in survey.moved.items():
        h = holders.get(holder)
        conn.execute(sa.insert(t).values(
            rel_path=rel, state=PENDING, attempts=0, added_at=now, size=h.size if h else 0,
            mtime_ns=h.mtime_ns if h else 0, read_count=h.read_count if h else None,
            file_identifier=h.file_identifier if h else None))


def _mark_published(conn, survey: Survey, now: float) -> int:
    """Published files still pending in the ledger built aside: done (one statement per table)."""
    t = Pod5File
    pending = {r.rel_path: r for r in conn.execute(
        sa.select(t.id, t.rel_path, t.read_count).where(t.state == PENDING, t.batch_id.is_(None)))}
    return published.mark_pending_files_done(conn, [
        (row.id, row.read_count, got) for rel, got in survey.published.items() if (row := pending.get(rel)) is not None],
        now)


def _adopt(conn, survey: Survey, max_id: int, now: float) -> list[str]:
    """Under the global lock, on the ledger built aside: files published since `_prepare` -> done, ASSIGNED
    folders -> running batches, the batch id counter. Only a few statements per ASSIGNED folder, and cheap
    file operations (removing half-made claim folders and dead work folders)."""
    layout = survey.layout
    lines = []
    t = Pod5File
    _mark_published(conn, survey, now)
    rows = conn.execute(sa.select(t.id, t.rel_path, t.state, t.size, t.file_identifier)).all()
    by_rel = {r.rel_path: r for r in rows}
    done = conn.execute(sa.select(sa.func.count()).select_from(t).where(t.state == models.DONE)).scalar_one()
    lines.append(f"{len(rows)} pod5 files found, {done} already published")

    for _batch_id, path in hidden_claims(layout):
        remove_tree(path)
        lines.append(f"{path.name}: a claim whose folder was never completed, removed")

    taken: dict[str, int] = {}  # rel -> the batch it was adopted into
    adopted: dict[int, Assigned] = {}
    for a in sorted(survey.assigned, key=lambda a: (-a.batch_id, str(a.folder))):
        name = a.folder.name
        if a.batch_id in adopted:
            lines.append(f"{name}: batch {a.batch_id} was already adopted from {adopted[a.batch_id].folder.name} "
                         "(an id handed out twice, told apart by its fencing nonce): not adopted")
            continue
        members = []
        for rel, fid in a.files:
            row = by_rel.get(rel)
            if rel in taken:
                lines.append(f"{name}: {rel} is also in batch {taken[rel]}, the newer claim: left to it")
            elif row is None or row.state != PENDING:
                continue  # published, a copy's duplicate, gone from INPUT_DIR or unreadable
            elif fid is not None and fid != row.file_identifier:
                lines.append(f"{name}: {rel} is now another pod5 file (file_identifier {row.file_identifier}, "
                             f"claimed as {fid}): not adopted")
            else:
                members.append(row)
        if not members:
            # Everything in it is published (its worker died before removing it) or claimed anew: nobody needs it.
            remove_tree(a.folder)
            lines.append(f"{name}: nothing left to do in it, removed")
            continue
        conn.execute(sa.insert(Batch).values(
            id=a.batch_id, worker_id=a.worker_id, state=RUNNING, claimed_at=now, heartbeat_at=now,
            n_files=len(members), n_bytes=sum(m.size for m in members), token=a.token, chemistry=a.chemistry,
        ))
        conn.execute(sa.update(t).where(t.id.in_([m.id for m in members]), t.state == PENDING)
                     .values(state=CLAIMED, batch_id=a.batch_id, last_error=None))
        claim.touch_worker(conn, a.worker_id, now)
        adopted[a.batch_id] = a
        for m in members:
            taken[m.rel_path] = a.batch_id
        how = "" if a.manifest else " (no manifest: an older version's folder, adopted by its links without a fencing nonce)"
        lines.append(f"batch {a.batch_id} of {a.worker_id}: {len(members)} files assigned, running again{how}")
    # Outputs of a publication cut short (no done marker), of a file no adopted batch holds: what a reclaim
    # would have removed (a file back to pending, or moved away meanwhile, must not keep half its reads out).
    for rel, paths in sorted(survey.unfinished.items()):
        if rel not in taken and not published.is_published(layout, survey.settings, rel):
            for path in paths:
                path.unlink(missing_ok=True)
            lines.append(f"{rel}: {len(paths)} outputs of a publication cut short, removed")
    # Staging of a batch not adopted: its worker published (or died after) and removed the folder, or it
    # was fenced; either way nobody will publish from it.
    for batch_id, staged in layout.staging_dirs():
        a = adopted.get(batch_id)
        if a is None or staged.name != (f"{batch_id}.{a.token}" if a.token else str(batch_id)):
            remove_tree(staged)
            lines.append(f"staging of batch {staged.name}: no ASSIGNED folder adopted, removed")
    db.set_batch_id_floor(conn, max_id)
    conn.execute(sa.insert(models.Event).values(ts=now, kind="rebuild", message="; ".join(lines)[:2000]))
    lines.append(f"new batch ids start above {max_id}")
    return lines


def _elect_originals(conn, rows, found: dict, claimed_rel: set) -> list[str]:
    """Of several rows with one file_identifier, the original is the published one, else one claimed in an
    ASSIGNED folder, else the first in sorted order; the others are its duplicates."""
    t = Pod5File
    groups: dict[str, list] = {}
    for r in rows:
        if r.file_identifier is not None and r.state in (PENDING, DUPLICATE):
            groups.setdefault(r.file_identifier, []).append(r)
    lines = []
    for members in groups.values():
        if len(members) < 2:
            continue
        members.sort(key=lambda r: r.rel_path)
        done = [r for r in members if r.rel_path in found]
        original = (done or [r for r in members if r.rel_path in claimed_rel] or members)[0]
        if len(done) > 1:
            lines.append(f"{', '.join(r.rel_path for r in done)} are one pod5 file published more than once: "
                         f"{original.rel_path} is the original, run `ledgerbc verify`")
        conn.execute(sa.update(t).where(t.id == original.id).values(state=PENDING, duplicate_of=None))
        others = [r.id for r in members if r.id != original.id]
        conn.execute(sa.update(t).where(t.id.in_(others)).values(state=DUPLICATE, duplicate_of=original.id))
    return lines
