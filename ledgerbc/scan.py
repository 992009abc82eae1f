"""Admitting pod5 files into the ledger (DESIGN §5, §7).

A scan walks INPUT_DIR, looks only at what it does not know yet (or what is still settling), and records
each file as pending (complete), duplicate (same pod5 `file_identifier` as a known file), failed
(unreadable, or incomplete outside follow mode) or waiting (follow mode: not complete or not settled).
Inspection (file I/O) happens outside the ledger lock; recording happens in short transactions.

Copies and moves (DESIGN §4 Copies): the original of a `file_identifier` keeps its place through every
rescan; a copy found later is its duplicate. An original (pending, waiting or failed: never basecalled) whose path
is gone at the next scan is marked `gone`, and a copy still on disk becomes the original in its place
(`mv incoming/x.pod5 final/x.pod5`: the new path is basecalled). Without a copy it is `gone` all the same:
its path cannot be basecalled, and status lists it; if it comes back, the next scan admits it again. A
done file whose path vanished stays done: its reads are published. A claimed one is left to its batch
(which fails it: the pod5 cannot be read), then handled at the next scan.
"""

import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from . import modelplan, models, pod5check
from .models import CLAIMED, DONE, DUPLICATE, FAILED, GONE, PENDING, WAITING, Pod5File

CHUNK = 500  # rows per transaction: keeps each hold of the global lock short
PARALLEL_MIN_FILES = 2000  # files to inspect before a process pool pays for its start (~1 s)
PARALLEL_MAX_WORKERS = 8
# Rows a scan marks gone when their path vanishes: never basecalled (a waiting one too: retried, or followed,
# half-written, then moved away). Claimed ones are their batch's; done ones are published.
_MAY_VANISH = (PENDING, WAITING, FAILED)
# One statement, values bound per row: building `.values(...)` anew for every row cost ~0.4 ms of
# SQLAlchemy work per file (bench/scale.py: 1M files took minutes, holding the lock ~250 ms per chunk).
_INSERT = sqlite_insert(Pod5File).on_conflict_do_nothing(index_elements=["rel_path"])


@dataclass
class Observation:
    """What a scan saw of one file. `info` when complete and readable, else `error`."""

    rel: str
    size: int
    mtime_ns: int
    info: pod5check.Pod5Info | None = None
    error: str | None = None
    incomplete: bool = False  # the error is "not complete yet" (may still be written)
    writer_busy: bool = False  # a pod5 writer's temporary files are in its folder
    refused: str | None = None  # complete, but the study's model must never get it (modelplan.refusal)


@dataclass
class ScanReport:
    seen: int = 0
    added: int = 0
    duplicates: int = 0
    failed: int = 0
    waiting: int = 0
    unchanged: int = 0
    gone: int = 0  # originals whose path vanished before they were basecalled
    promoted: int = 0  # copies that became the original of a gone file
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = (
            f"{self.seen} pod5 files seen: {self.added} new pending, {self.duplicates} duplicates, "
            f"{self.failed} failed, {self.waiting} waiting to complete, {self.unchanged} already known"
        )
        if self.gone:
            text += f"; {self.gone} gone from INPUT_DIR before they were basecalled ({self.promoted} replaced by a copy)"
        return text


@dataclass
class _Known:
    id: int
    size: int
    mtime_ns: int
    state: str
    batch_id: int | None
    stable_since: float | None
    chemistry: str | None = None


def run_info_values(info) -> dict:
    """The run-info columns of a file (DESIGN §4: one chemistry per batch) from its `pod5check.Pod5Info`."""
    run = info.run_info if info is not None else None
    if run is None:
        return {}
    first = run.keys[0] if run.keys else None
    return dict(
        chemistry=run.key, samples=run.samples,
        flow_cell_product_code=first.flow_cell_product_code.upper() if first else None,
        sequencing_kit=first.sequencing_kit.upper() if first else None,
        sample_rate=first.sample_rate if first else None,
    )


def walk(input_dir: Path, exclude: Path | None = None, warnings: list | None = None):
    """Yield (rel, path, stat, busy identifiers of its folder) for every candidate pod5 file.

    Hidden entries (`.x`, MinKNOW's `.<id>.tmp-*`, macOS `._x`) and the `exclude` tree (the output
    folder when it lies inside the input) are skipped; folder symlinks are not followed (loops).
    """
    input_dir = Path(input_dir)
    stack = [input_dir]
    while stack:
        folder = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            if warnings is not None:
                warnings.append(f"cannot read folder {folder}: {exc.strerror or exc}")
            continue
        busy = {i for e in entries if (i := pod5check.writer_tmp_identifier(e.name))}
        subdirs = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            if entry.is_dir(follow_symlinks=False):
                if exclude is None or path != exclude:
                    subdirs.append(path)
                continue
            if not entry.name.endswith(".pod5"):
                continue
            try:
                st = entry.stat()  # follows a file symlink: an input folder of links is fine
            except OSError as exc:
                if warnings is not None:
                    warnings.append(f"cannot stat {path}: {exc.strerror or exc}")
                continue
            yield path.relative_to(input_dir).as_posix(), path, st, busy
        stack.extend(reversed(subdirs))


def observe(path: Path, rel: str, st, busy: set) -> Observation:
    """Inspect one file (file I/O, outside the lock)."""
    obs = Observation(rel=rel, size=st.st_size, mtime_ns=st.st_mtime_ns, writer_busy=bool(busy))
    try:
        obs.info = pod5check.inspect(path, st.st_size)
        if obs.info.file_identifier in busy:
            obs.info, obs.incomplete = None, True
            obs.error = "its writer's temporary files are still beside it"
    except pod5check.NotComplete as exc:
        obs.error, obs.incomplete = str(exc), True
    except pod5check.Unreadable as exc:
        obs.error = str(exc)
    except OSError as exc:
        obs.error = f"cannot read it: {exc.strerror or exc}"
    return obs


def _observe_one(item) -> Observation:
    rel, path, st, busy = item
    return observe(path, rel, st, busy)


def _observe_all(todo):
    """Observations of `todo` in order. Opening a pod5 costs ~0.5-1 ms of CPU (the pod5 library, not the
    disk), so a big scan (init, rebuild: bench/rebuild.py) inspects in a process pool on every CPU this
    process may use; small scans (follow mode) stay in-process."""
    try:
        cpus = len(os.sched_getaffinity(0))  # what Slurm's cgroup allows, not the node's count
    except AttributeError:
        cpus = os.cpu_count() or 1
    workers = min(cpus, PARALLEL_MAX_WORKERS)
    if len(todo) < PARALLEL_MIN_FILES or workers < 2:
        yield from map(_observe_one, todo)
        return
    # fork, not spawn: spawn re-imports the caller's __main__, which fails for scripts without a main
    # guard. Safe here: the scan holds no ledger lock or connection while it inspects (NullPool), and
    # the children only read files. A pool that breaks anyway leaves the scan to finish in-process.
    done = 0
    try:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            for obs in pool.map(_observe_one, todo, chunksize=256):
                yield obs
                done += 1
    except BrokenProcessPool:
        yield from map(_observe_one, todo[done:])


class Scanner:
    """Scans one ledger's INPUT_DIR. Keeps what it learnt between scans (follow mode scans often)."""

    def __init__(self, ledger, settings, follow: bool = False, clock=time.time):
        self.ledger = ledger
        self.settings = settings
        self.follow = follow
        self.clock = clock
        self._known: dict[str, _Known] = {}
        self._max_id = 0
        # Follow mode, once the run's final summary exists: acquisition is over, so settle is not waited
        # for and a file still incomplete (writer temporaries or not) is failed at once (follow.py).
        self.acquisition_over = False

    def _refresh_known(self) -> None:
        def load(conn, after):
            t = Pod5File
            return conn.execute(
                sa.select(t.id, t.rel_path, t.size, t.mtime_ns, t.state, t.batch_id, t.stable_since, t.chemistry)
                .where(t.id > after)
            ).all()

        def load_unsettled(conn):
            t = Pod5File
            return conn.execute(
                sa.select(t.id, t.rel_path, t.size, t.mtime_ns, t.state, t.batch_id, t.stable_since, t.chemistry)
                .where(t.state.in_((WAITING, FAILED, GONE)))
            ).all()

        rows = self.ledger.transact(load, self._max_id)
        if self._known:  # states of known rows change (waiting -> pending, retry): refresh those cheaply
            unsettled = self.ledger.transact(load_unsettled)
            still = {r.id for r in unsettled}
            for k in self._known.values():
                if k.state in (WAITING, FAILED, GONE) and k.id not in still:
                    k.state = PENDING  # settled meanwhile (by another scanner, or retried): not ours to look at
            rows += unsettled
        for r in rows:
            self._known[r.rel_path] = _Known(r.id, r.size, r.mtime_ns, r.state, r.batch_id, r.stable_since,
                                             r.chemistry)
            self._max_id = max(self._max_id, r.id)

    def _needs_look(self, rel: str, st) -> bool:
        known = self._known.get(rel)
        if known is None or known.state in (WAITING, GONE):
            return True  # (gone: it is back)
        if known.state == PENDING and known.chemistry is None:
            return True  # admitted by a ledgerbc that did not read run info (schema < 0003): read it now
        changed = (known.size, known.mtime_ns) != (st.st_size, st.st_mtime_ns)
        # A file that failed its admission check (never claimed) is looked at again once it changes.
        return known.state == FAILED and known.batch_id is None and changed

    def scan(self, progress=None) -> ScanReport:
        """Walk INPUT_DIR once and record what changed. `progress(done, total)` is called as it goes."""
        report = ScanReport()
        self._refresh_known()
        settings = self.settings
        output = Path(settings.output_dir).resolve()
        todo, seen = [], set()
        for rel, path, st, busy in walk(Path(settings.input_dir), exclude=output, warnings=report.warnings):
            report.seen += 1
            seen.add(rel)
            if self._needs_look(rel, st):
                todo.append((rel, path, st, busy))
            else:
                report.unchanged += 1
        # Before new files are recorded: a moved original's new path must find it gone, not still there.
        self._record_vanished(seen, report)
        observations = []
        refusals: dict = {}  # per chemistry key
        for n, obs in enumerate(_observe_all(todo), 1):
            if obs.info is not None and obs.info.run_info is not None:
                key = obs.info.run_info.key
                if key not in refusals:
                    refusals[key] = modelplan.refusal(settings, key)
                obs.refused = refusals[key]
            observations.append(obs)
            if progress:
                progress(n, len(todo))
        record(self.ledger, observations, self.follow, settings.settle, self.clock(), report, self._known,
               over=self.acquisition_over)
        return report


    def _record_vanished(self, seen: set, report: ScanReport) -> None:
        """Originals (pending, waiting or failed) whose path was not seen: gone, a copy on disk taking their place."""
        candidates = [rel for rel, k in self._known.items()
                      if rel not in seen and k.state in _MAY_VANISH]
        if not candidates:
            return
        if report.warnings:
            report.warnings.append(f"{len(candidates)} known files were not seen, but part of INPUT_DIR could not be "
                                   "read: none is marked gone")
            return
        if not seen:
            report.warnings.append(f"INPUT_DIR {self.settings.input_dir} looks empty (not mounted?): "
                                   f"{len(candidates)} known files not marked gone")
            return
        root = Path(self.settings.input_dir)
        candidates = [rel for rel in candidates if not os.path.lexists(root / rel)]  # the walk is not the last word
        for start in range(0, len(candidates), CHUNK):
            chunk = candidates[start : start + CHUNK]
            states, gone, promoted = self.ledger.transact(_record_gone, chunk, seen, self.clock())
            for rel, state in states.items():
                if rel in self._known:
                    self._known[rel].state = state
            report.gone += gone
            report.promoted += promoted


def _record_gone(conn, rels, seen: set, now: float):
    """Mark the originals among `rels` (vanished paths) gone, guarded by the state they are in (pending,
    waiting or failed: never claimed or done). A copy of one still on disk becomes the original (first in sorted order)
    and the other copies point at it. Returns ({rel: state now}, gone, promoted)."""
    t = Pod5File
    rows = conn.execute(sa.select(t.id, t.rel_path, t.state, t.file_identifier).where(t.rel_path.in_(rels))).all()
    states = {r.rel_path: r.state for r in rows}
    gone = promoted = 0
    events = []
    for r in rows:
        if r.state not in _MAY_VANISH:
            continue  # claimed (its batch fails it), done (its reads are published), already gone
        copies = []
        if r.file_identifier is not None:
            copies = sorted(
                (c for c in conn.execute(sa.select(t.id, t.rel_path).where(
                    t.file_identifier == r.file_identifier, t.state == DUPLICATE, t.id != r.id)).all()
                 if c.rel_path in seen),
                key=lambda c: c.rel_path)
        heir = copies[0] if copies else None
        why = "vanished from INPUT_DIR before it was basecalled" + (
            f": its copy {heir.rel_path} is the original now" if heir else " (no copy of it is left)")
        moved = conn.execute(
            sa.update(t).where(t.id == r.id, t.state == r.state, t.state.not_in((CLAIMED, DONE)))
            .values(state=GONE, duplicate_of=heir.id if heir else None, batch_id=None, last_error=why)
        ).rowcount
        if not moved:
            continue
        states[r.rel_path] = GONE
        gone += 1
        events.append({"ts": now, "kind": "file-gone", "file_id": r.id, "message": f"{r.rel_path}: {why}"})
        if heir is not None:
            conn.execute(sa.update(t).where(t.id == heir.id, t.state == DUPLICATE)
                         .values(state=PENDING, duplicate_of=None, attempts=0, last_error=None))
            _point_copies_at(conn, r.file_identifier, heir.id)
            promoted += 1
        elif r.file_identifier is not None:
            # No copy on disk: the copies and earlier paths of this pod5 (none seen, or one would be the heir)
            # are gone with it, until one comes back (a scan admits it again).
            conn.execute(sa.update(t).where(t.file_identifier == r.file_identifier, t.id != r.id,
                                            t.state.in_((DUPLICATE, GONE)))
                         .values(state=GONE, duplicate_of=None))
    if events:
        conn.execute(sa.insert(models.Event), events[:100])
    return states, gone, promoted


def _point_copies_at(conn, file_identifier: str, original_id: int) -> None:
    """Every duplicate and gone path of a pod5 names its one original (never another copy, nor a path that
    is gone itself: a file moved twice, `a -> b -> c`, leaves a and b both gone of c)."""
    t = Pod5File
    conn.execute(sa.update(t).where(t.file_identifier == file_identifier, t.state.in_((DUPLICATE, GONE)),
                                    t.id != original_id).values(duplicate_of=original_id))


def record(ledger, observations, follow: bool, settle: float, now: float, report: ScanReport, known: dict,
           over: bool = False):
    """Write observations to the ledger in short transactions (the scan's only write path)."""
    for start in range(0, len(observations), CHUNK):
        chunk = observations[start : start + CHUNK]
        counts = ledger.transact(_record_chunk, chunk, follow, settle, now, known, over)
        for key, value in counts.items():
            setattr(report, key, getattr(report, key) + value)


def _decide(obs: Observation, prior: _Known | None, follow: bool, settle: float, now: float, over: bool = False):
    """(state, error, stable_since) for an observation. `over`: the run's acquisition has ended."""
    if prior is not None and (prior.size, prior.mtime_ns) == (obs.size, obs.mtime_ns):
        stable_since = prior.stable_since if prior.stable_since is not None else now
    else:
        # New or changed. A file first seen with an old mtime has been stable since then.
        stable_since = min(now, obs.mtime_ns / 1e9) if prior is None else now
    if obs.info is not None:
        if follow and not over and now - stable_since < settle:
            return WAITING, None, stable_since
        if obs.refused is not None:
            return FAILED, obs.refused, stable_since
        return PENDING, None, stable_since
    if not obs.incomplete:
        return FAILED, obs.error, stable_since
    if not follow:
        return FAILED, f"{obs.error}. Run `ledgerbc retry` once it is complete.", stable_since
    if over:
        why = "the run's final summary exists (acquisition is over), so it will not complete"
        return FAILED, f"{obs.error}; {why}", stable_since
    if obs.writer_busy or now - stable_since < settle:
        return WAITING, obs.error, stable_since
    return FAILED, f"{obs.error}; unchanged for {now - stable_since:.0f}s, so it will not complete", stable_since


def _record_chunk(conn, chunk, follow, settle, now, known, over=False):
    t = Pod5File
    counts = {"added": 0, "duplicates": 0, "failed": 0, "waiting": 0}
    decided = [(obs, known.get(obs.rel), *_decide(obs, known.get(obs.rel), follow, settle, now, over)) for obs in chunk]
    identifiers = {obs.info.file_identifier for obs, _, state, *_ in decided if state == PENDING}
    originals, with_copies = {}, set()
    if identifiers:
        originals = dict(
            conn.execute(
                sa.select(t.file_identifier, t.id).where(
                    t.file_identifier.in_(identifiers), t.state.not_in((DUPLICATE, GONE))
                )
            ).all()
        )
        # Pod5s that already have copies or gone paths to point at a new original (one query per chunk: an
        # UPDATE per admitted file was half of a 100,000-file rebuild's scan, bench/rebuild.py --profile).
        with_copies = set(conn.execute(
            sa.select(t.file_identifier).where(t.file_identifier.in_(identifiers), t.state.in_((DUPLICATE, GONE)))
        ).scalars())
    for obs, prior, state, error, stable_since in decided:
        if prior is not None and prior.state == PENDING:
            # Run info of a file admitted before it was recorded: only those columns, only while still pending.
            if obs.info is not None:
                conn.execute(sa.update(t).where(t.id == prior.id, t.state == PENDING, t.chemistry.is_(None))
                             .values(**run_info_values(obs.info)))
                prior.chemistry = obs.info.run_info.key if obs.info.run_info else None
            continue
        values = dict(
            size=obs.size, mtime_ns=obs.mtime_ns, state=state, last_error=error, stable_since=stable_since,
            read_count=obs.info.read_count if obs.info else None,
            file_identifier=obs.info.file_identifier if obs.info else None, duplicate_of=None,
            **run_info_values(obs.info),
        )
        prior_id = prior.id if prior else None
        if state == PENDING:
            original = originals.get(obs.info.file_identifier)
            if original is not None and original != prior_id:
                values.update(state=DUPLICATE, duplicate_of=original)
        if prior is None:
            result = conn.execute(_INSERT, dict(rel_path=obs.rel, attempts=0, added_at=now, **values))
            if result.rowcount == 0:
                continue  # another scanner recorded it first
            row_id = result.inserted_primary_key[0]
        else:
            # Only rows still waiting, failed at admission or gone (and back) are ours to change (guarded).
            result = conn.execute(
                sa.update(t).where(t.id == prior_id, t.state.in_((WAITING, FAILED, GONE)), t.batch_id.is_(None))
                .values(**values)
            )
            if result.rowcount == 0:
                continue
            row_id = prior_id
        state = values["state"]
        if state == PENDING and values["file_identifier"]:
            originals[values["file_identifier"]] = row_id
            if values["file_identifier"] in with_copies:
                # A moved original: its old paths, found gone with no copy, now have this one in their place.
                _point_copies_at(conn, values["file_identifier"], row_id)
        key = {PENDING: "added", DUPLICATE: "duplicates", FAILED: "failed", WAITING: "waiting"}[state]
        counts[key] += 1
        known[obs.rel] = _Known(row_id, obs.size, obs.mtime_ns, state, None, stable_since, values.get("chemistry"))
    if counts["failed"]:
        conn.execute(
            sa.insert(models.Event),
            [
                {"ts": now, "kind": "admission-failed", "message": f"{obs.rel}: {error}"}
                for obs, _, state, error, _ in decided
                if state == FAILED
            ][:100],
        )
    return counts
