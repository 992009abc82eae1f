"""`ledgerbc verify [--deep]`: do the ledger and the files on disk keep the exactly-once promise? (DESIGN §4)

It changes nothing. One read transaction takes a snapshot of the ledger; everything else reads files,
outside the lock. Checked:

- every done file has its outputs and its summary as `outputs` recorded them at publication (present,
  same size, same crc32), and the ledger's read counts agree with those rows;
- no pending, claimed, failed, waiting, duplicate or gone file has outputs, and no output file on disk is
  unknown to the ledger;
- a claimed file belongs to a running batch; no pod5 (file_identifier) is claimed by two running batches
  or published under two paths; a running batch holds files;
- `--deep`: every pod5 of a done file and every output is read: each output holds only reads of its own
  pod5 (by read id, or `pi` parent for a split read), no record twice, every read of the pod5 present
  (except those dorado did not return, recorded as missing), as many records as recorded, the same as its
  summary lists.

The outputs are listed before the snapshot is taken, so a publication landing meanwhile is not reported
as an unknown output; still, run it when no worker publishes, as users do before deleting raw data.
`verify()` returns a `VerifyReport` (callable from Python); the CLI prints one line per violation,
`<rel path>: <what is wrong>`, and exits 0 only when there is none (EXIT_VIOLATIONS otherwise).
"""
from __future__ import annotations

import gzip
import multiprocessing
import os
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa

from . import published
from .layout import Layout
from .models import CLAIMED, DONE, DUPLICATE, FAIL, GONE, PASS, RUNNING, SUMMARY, Batch, Output, Pod5File

EXIT_VIOLATIONS = 14  # (errors.py holds 1-13: 12 finalize refusing, 13 a worker with another dorado)
READERS = 8  # threads checksumming outputs (file reads and crc32 release the GIL)
PARALLEL_MIN_FILES = 200  # done files before --deep reads them in a process pool
_NOT_PRIMARY = 0x900


@dataclass(order=True)
class Violation:
    rel: str  # the input's path relative to INPUT_DIR (or `batch <id>`)
    what: str

    def line(self) -> str:
        return f"{self.rel}: {self.what}"


@dataclass
class VerifyReport:
    violations: list[Violation] = field(default_factory=list)
    files: int = 0
    done: int = 0
    outputs: int = 0
    bytes_checked: int = 0
    deep: bool = False

    @property
    def ok(self) -> bool:
        return not self.violations

    def lines(self) -> list[str]:
        return [v.line() for v in sorted(self.violations)]

    def summary(self) -> str:
        what = (f"{self.files} files, {self.done} done, {self.outputs} outputs ({self.bytes_checked / 1e6:.1f} MB "
                f"checksummed){', every read id' if self.deep else ''}")
        if self.ok:
            return f"verify: {what}: every invariant holds"
        return f"verify: {what}: {len(self.violations)} violations"


@dataclass
class _Snapshot:
    files: list
    outputs: dict  # file id -> [Output rows]
    batches: dict  # batch id -> (state, worker)


def verify(ledger, deep: bool = False, processes: int | None = None) -> VerifyReport:
    """Check the invariants of the module docstring, changing nothing."""
    settings = ledger.read_settings()
    layout = Layout(Path(settings.output_dir))
    on_disk = published.output_files(layout)  # before the snapshot: a publication meanwhile is in the snapshot too
    snap = ledger.transact(_snapshot)
    report = VerifyReport(files=len(snap.files), deep=deep)
    bad = report.violations
    by_id = {f.id: f for f in snap.files}
    by_rel = {f.rel_path: f for f in snap.files}
    report.done = sum(1 for f in snap.files if f.state == DONE)
    report.outputs = sum(len(v) for f_id, v in snap.outputs.items() if by_id.get(f_id) and by_id[f_id].state == DONE)

    _check_ledger(snap, by_id, bad, published.barcoded(settings))
    _check_outputs(snap, by_id, layout, report)
    _check_unknown(snap, by_id, by_rel, layout, settings, on_disk, bad)
    if deep:
        _check_reads(snap, by_id, layout, settings, bad, processes)
    return report


def _snapshot(conn) -> _Snapshot:
    t = Pod5File
    files = conn.execute(sa.select(
        t.id, t.rel_path, t.state, t.batch_id, t.file_identifier, t.duplicate_of, t.reads_pass, t.reads_fail,
        t.reads_missing, t.read_count)).all()
    outputs = defaultdict(list)
    for o in conn.execute(sa.select(Output.file_id, Output.kind, Output.barcode, Output.path, Output.reads,
                                    Output.bytes, Output.checksum)):
        outputs[o.file_id].append(o)
    batches = {b.id: (b.state, b.worker_id) for b in conn.execute(sa.select(Batch.id, Batch.state, Batch.worker_id))}
    return _Snapshot(files, dict(outputs), batches)


# -- the ledger alone -------------------------------------------------------------------------------------
def _check_ledger(snap: _Snapshot, by_id: dict, bad: list, is_barcoded: bool) -> None:
    claimed_by_fid = defaultdict(list)
    done_by_fid = defaultdict(list)
    holding = Counter()
    for f in snap.files:
        if f.state == CLAIMED:
            state = snap.batches.get(f.batch_id, ("missing", None))[0]
            if state != RUNNING:
                bad.append(Violation(f.rel_path, f"claimed by batch {f.batch_id}, which is {state}, not running"))
            else:
                holding[f.batch_id] += 1
            if f.file_identifier:
                claimed_by_fid[f.file_identifier].append(f)
        elif f.state == DONE:
            if f.file_identifier:
                done_by_fid[f.file_identifier].append(f)
            _check_done_counts(f, snap.outputs.get(f.id, []), bad, is_barcoded)
        elif f.id in snap.outputs:
            bad.append(Violation(f.rel_path, f"{f.state}, but the ledger records outputs for it"))
        if f.state in (DUPLICATE, GONE) and f.duplicate_of is not None:
            twin = by_id.get(f.duplicate_of)
            if twin is None or twin.state in (DUPLICATE, GONE) or twin.file_identifier != f.file_identifier:
                what = "missing" if twin is None else f"{twin.rel_path} ({twin.state})"
                bad.append(Violation(f.rel_path, f"{f.state} of {what}, which is not its original"))
        if f.state == DUPLICATE and f.duplicate_of is None:
            bad.append(Violation(f.rel_path, "a duplicate of no file"))
    for fid, rows in claimed_by_fid.items():
        if len({r.batch_id for r in rows}) > 1:
            for r in rows:
                others = ", ".join(f"{o.rel_path} (batch {o.batch_id})" for o in rows if o is not r)
                bad.append(Violation(r.rel_path, f"the same pod5 is also claimed as {others}: two running batches"))
    for fid, rows in done_by_fid.items():
        if len(rows) > 1:
            for r in rows:
                others = ", ".join(o.rel_path for o in rows if o is not r)
                bad.append(Violation(r.rel_path, f"the same pod5 is also published as {others}: its reads twice"))
    for batch_id, (state, worker) in snap.batches.items():
        if state == RUNNING and not holding[batch_id]:
            bad.append(Violation(f"batch {batch_id}", f"running (worker {worker}) but holds no claimed file"))


def _check_done_counts(f, rows, bad: list, is_barcoded: bool) -> None:
    if not rows:
        bad.append(Violation(f.rel_path, "done, but the ledger records no outputs for it (a ledger from before "
                                         "schema 0003: `ledgerbc recover` records them from disk)"))
        return
    kinds = Counter(o.kind for o in rows)
    if not kinds[SUMMARY]:
        bad.append(Violation(f.rel_path, "done, but no summary is recorded for it"))
    if not kinds[PASS] and not is_barcoded:  # unbarcoded, its pass/ output is its done marker
        bad.append(Violation(f.rel_path, "done, but no pass/ output is recorded for it"))
    passed = sum(o.reads for o in rows if o.kind == PASS)
    failed = sum(o.reads for o in rows if o.kind == FAIL)
    if (passed, failed) != (f.reads_pass or 0, f.reads_fail or 0):
        bad.append(Violation(f.rel_path, f"the ledger counts {f.reads_pass} pass and {f.reads_fail} fail reads, its "
                                         f"outputs {passed} and {failed}"))
    listed = sum(o.reads for o in rows if o.kind == SUMMARY)
    if kinds[SUMMARY] and listed != passed + failed:
        bad.append(Violation(f.rel_path, f"its summary lists {listed} records, its outputs hold {passed + failed}"))


# -- recorded outputs against the files ------------------------------------------------------------------
def _check_outputs(snap: _Snapshot, by_id: dict, layout: Layout, report: VerifyReport) -> None:
    todo = [(by_id[f_id].rel_path, o) for f_id, rows in snap.outputs.items()
            if f_id in by_id and by_id[f_id].state == DONE for o in rows]

    def one(item):
        rel, o = item
        path = layout.output / o.path
        try:
            size = path.stat().st_size
        except OSError:
            return 0, Violation(rel, f"{o.path} is missing")
        if size != o.bytes:
            return 0, Violation(rel, f"{o.path} has {size} bytes, {o.bytes} were published")
        if o.checksum:
            try:
                _size, checksum = published._checksum(path)
            except OSError as exc:
                return 0, Violation(rel, f"{o.path} cannot be read ({exc.strerror or exc})")
            if checksum != o.checksum:
                return size, Violation(rel, f"{o.path} has changed since it was published ({checksum}, "
                                            f"published {o.checksum})")
        return size, None

    with ThreadPoolExecutor(READERS) as pool:
        for size, violation in pool.map(one, todo, chunksize=64):
            report.bytes_checked += size
            if violation is not None:
                report.violations.append(violation)


def _check_unknown(snap, by_id, by_rel, layout, settings, on_disk: set, bad: list) -> None:
    known = {o.path for f_id, rows in snap.outputs.items() if f_id in by_id and by_id[f_id].state == DONE
             for o in rows}
    for path in sorted(on_disk - known):
        if not (layout.output / path).exists():
            continue  # removed meanwhile (a reclaim cleaning up a publication cut short)
        shape = published.input_of(layout, settings, layout.output / path)
        rel = shape[2] if shape else path
        row = by_rel.get(rel)
        if shape is None:
            bad.append(Violation(path, "not an output of any input (unexpected file in an output folder)"))
        elif row is None:
            bad.append(Violation(rel, f"{path} is published for it, but the ledger does not know this pod5"))
        elif row.state != DONE:
            bad.append(Violation(rel, f"{row.state}, but {path} is published for it"))
        elif row.id not in snap.outputs:
            continue  # done with no outputs recorded at all: one line already says so (and how to fix it)
        else:
            bad.append(Violation(rel, f"{path} is not one of its recorded outputs"))


# -- --deep: every read id ----------------------------------------------------------------------------------
def _check_reads(snap, by_id, layout: Layout, settings, bad: list, processes: int | None) -> None:
    input_dir = Path(settings.input_dir)
    copies = defaultdict(list)  # file_identifier -> paths that hold that pod5
    for f in snap.files:
        if f.file_identifier:
            copies[f.file_identifier].append(f.rel_path)
    tasks = []
    for f in snap.files:
        if f.state != DONE:
            continue
        pod5s = [input_dir / f.rel_path] + [input_dir / r for r in copies.get(f.file_identifier, []) if r != f.rel_path]
        rows = snap.outputs.get(f.id, [])
        outputs = [(str(layout.output / o.path), o.path, o.reads) for o in rows if o.kind in (PASS, FAIL)]
        summary = next((str(layout.output / o.path) for o in rows if o.kind == SUMMARY), None)
        tasks.append((f.rel_path, [str(p) for p in pod5s], outputs, summary, f.reads_missing or 0))
    for problems in _map(_deep_one, tasks, processes):
        bad.extend(Violation(rel, what) for rel, what in problems)


def _map(fn, tasks, processes):
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    workers = processes or min(cpus, 8)
    if len(tasks) < PARALLEL_MIN_FILES or workers < 2:
        yield from map(fn, tasks)
        return
    # fork, as the scan does: the children only read files, and no ledger lock or connection is held.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        yield from pool.map(fn, tasks, chunksize=16)


def _deep_one(task) -> list[tuple[str, str]]:
    rel, pod5s, outputs, summary, missing = task
    from . import pod5check

    problems = []
    ids_in = None
    for path in pod5s:
        try:
            ids_in = set(pod5check.read_ids(Path(path)))
            break
        except Exception:  # gone, moved, damaged: try a copy of it
            continue
    seen = Counter()
    parents = set()
    for path, shown, recorded in outputs:
        n = 0
        try:
            for read_id, parent in _output_records(Path(path)):
                seen[read_id] += 1
                parents.add(parent or read_id)
                n += 1
        except Exception as exc:
            problems.append((rel, f"{shown} cannot be read ({type(exc).__name__}: {exc})"))
            continue
        if n != recorded:
            problems.append((rel, f"{shown} holds {n} reads, {recorded} were published"))
    twice = [r for r, n in seen.items() if n > 1]
    if twice:
        problems.append((rel, f"{len(twice)} records are written twice (e.g. {twice[0]})"))
    if summary is not None:
        try:
            listed = _summary_ids(Path(summary))
            if listed != set(seen):
                problems.append((rel, f"its summary lists {len(listed - set(seen))} records that are in no output and "
                                      f"misses {len(set(seen) - listed)} that are"))
        except OSError:
            pass  # reported as missing by the non-deep checks
    if ids_in is None:
        problems.append((rel, "its pod5 is no longer in INPUT_DIR (nor a copy of it): its reads cannot be checked"))
        return problems
    foreign = parents - ids_in
    if foreign:
        problems.append((rel, f"its outputs hold {len(foreign)} reads of another pod5 (e.g. {sorted(foreign)[0]})"))
    absent = len(ids_in - parents)
    if absent != missing:
        problems.append((rel, f"{absent} of its {len(ids_in)} reads are in no output ({missing} recorded as not "
                              "returned by dorado)"))
    return problems


def _output_records(path: Path):
    """(read id, pi parent or None) of every primary record of a FASTQ (header tags), FASTQ.gz or BAM output."""
    if path.name.endswith(".bam"):
        import pysam

        with pysam.AlignmentFile(str(path), "rb", check_sq=False) as bam:
            for record in bam:
                if record.flag & _NOT_PRIMARY:
                    continue
                parent = record.get_tag("pi") if record.has_tag("pi") else None
                yield record.query_name, parent
        return
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as fh:
        for n, line in enumerate(fh):
            if n % 4:
                continue
            if not line.startswith(b"@"):
                raise ValueError(f"line {n + 1} is not a FASTQ header")
            fields = line.rstrip(b"\n").split(b"\t")
            parent = next((f[5:].decode() for f in fields[1:] if f.startswith(b"pi:Z:")), None)
            yield fields[0][1:].decode("utf-8", "surrogateescape"), parent


def _summary_ids(path: Path) -> set[str]:
    with open(path, encoding="utf-8", errors="surrogateescape") as fh:
        header = fh.readline().rstrip("\n").split("\t")
        col = header.index("read_id")
        return {line.rstrip("\n").split("\t")[col] for line in fh if line.strip()}
