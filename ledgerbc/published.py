"""Published outputs <-> the ledger (DESIGN §2, §4): what marks an input done on disk, what is published
for it, and the guarded transactions that bring the ledger in line with it.

- The **done marker** of an input: `pass/<rel>.<emit>` unbarcoded (always written, empty when every read
  failed); with `--kit-name`, `summary/<rel>.tsv` (published last, after every per-barcode output).
- **What is on disk** for an input (`read`): its outputs per kind and barcode with reads, bases, bytes
  and crc32, as `outputs` rows record them at publication. Counts come from the summary when it is there
  and agrees with the files, else from the outputs themselves; an unbarcoded tree from before summaries
  gets its summary written from the outputs (a FASTQ header carries every SAM tag of the record).

Used by reclaim, reconcile, rebuild (janitor.py, rebuild.py) and verify. The readers here do file I/O
(stat, read, checksum): call them OUTSIDE the ledger lock, then apply what they found with
`mark_done`/`mark_pending` in a short transaction that is guarded by the state (and batch) the file was
seen in, so a file that moved on meanwhile (claimed, published) is left alone.
"""
from __future__ import annotations

import csv
import gzip
import os
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa

from .claim import OutputRecord
from .durable import fsync_dir
from .errors import FULL_ERRNOS, StorageFull
from .layout import SUMMARY_COLUMNS, Layout, output_relpath, summary_relpath
from .prepared import Prepared, p
from .models import DONE, FAIL, PASS, PENDING, SUMMARY, Output, Pod5File

UNCLASSIFIED = "unclassified"
_NOT_PRIMARY = 0x900  # secondary, supplementary: never a read of its own (split.py)


# -- where an input's outputs are -------------------------------------------------------------------------
def barcoded(settings) -> bool:
    return bool(getattr(settings, "kit_name", None))


def done_marker(layout: Layout, settings, rel: str) -> Path:
    """The file whose presence says input `rel` is published (DESIGN §2)."""
    return layout.summary_path(rel) if barcoded(settings) else layout.pass_path(rel, settings.emit)


def is_published(layout: Layout, settings, rel: str) -> bool:
    return done_marker(layout, settings, rel).is_file()


def candidates(layout: Layout, settings, rel: str, barcodes=None) -> list[tuple[str, str | None, Path]]:
    """(kind, barcode, path) of every output input `rel` can have. Barcode folders only in a barcoded
    study: unbarcoded, `pass/<a>/<rel>` is the output of the input `<a>/<rel>`, never of `rel`."""
    out = output_relpath(rel, settings.emit)
    found = [(SUMMARY, None, layout.summary_path(rel))]
    if barcoded(settings):
        for barcode in (layout.barcode_dirs() if barcodes is None else barcodes):
            found += [(PASS, barcode, layout.pass_dir / barcode / out), (FAIL, barcode, layout.fail_dir / barcode / out)]
    else:
        found += [(PASS, None, layout.pass_dir / out), (FAIL, None, layout.fail_dir / out)]
    return found


def existing(layout: Layout, settings, rel: str, barcodes=None) -> list[tuple[str, str | None, Path]]:
    """The outputs of `rel` that exist on disk (stat calls: never under the lock on a big study)."""
    return [c for c in candidates(layout, settings, rel, barcodes) if c[2].is_file()]


def input_of(layout: Layout, settings, path: Path) -> tuple[str, str | None, str] | None:
    """(kind, barcode, input rel) an output file under pass/, fail/ or summary/ belongs to; None if the
    path is not shaped like an output."""
    try:
        rel = path.relative_to(layout.output).as_posix()
    except ValueError:
        return None
    top, _, rest = rel.partition("/")
    if top == "summary":
        return (SUMMARY, None, rest[: -len(".tsv")] + ".pod5") if rest.endswith(".tsv") else None
    if top not in (PASS, FAIL) or not rest.endswith("." + settings.emit):
        return None
    barcode = None
    if barcoded(settings):
        barcode, _, rest = rest.partition("/")
        if not rest:
            return None
    return top, barcode, rest[: -len(settings.emit)] + "pod5"


def output_files(layout: Layout, tops=None) -> set[str]:
    """Every file under pass/, fail/ and summary/ (or the folders `tops`), as paths relative to OUTPUT_DIR,
    hidden ones (a publication's temporary files) aside. File I/O: outside the lock."""
    found = set()
    for top in (layout.pass_dir, layout.fail_dir, layout.summary_dir) if tops is None else tops:
        stack = [top]
        while stack:
            folder = stack.pop()
            try:
                entries = list(os.scandir(folder))
            except OSError:
                continue
            for e in entries:
                if e.name.startswith("."):
                    continue
                if e.is_dir(follow_symlinks=False):
                    stack.append(Path(e.path))
                else:
                    found.add(Path(e.path).relative_to(layout.output).as_posix())
    return found


def outputs_by_input(layout: Layout, settings) -> dict[str, list[Path]]:
    """Every output on disk (pass/, fail/, summary/), by the rel path of the input it belongs to, whether or
    not that input's pod5 is still in INPUT_DIR, or its publication complete (done_marker among them)."""
    found = defaultdict(list)
    for path in output_files(layout):
        shape = input_of(layout, settings, layout.output / path)
        if shape is not None:
            found[shape[2]].append(layout.output / path)
    return dict(found)


def summary_read_ids(layout: Layout, settings, rel: str) -> set[str]:
    """The pod5 read ids (own id, or the parent of a split read) the summary of a published input lists;
    empty when it has none or cannot be read."""
    tally = _read_summary(layout.summary_path(rel), barcoded(settings))
    return tally.parents if tally is not None else set()


# -- what is published for an input ----------------------------------------------------------------------
@dataclass
class Published:
    """The outputs on disk of one published input."""

    rel: str
    outputs: list[OutputRecord] = field(default_factory=list)
    parents: int | None = None  # distinct pod5 reads covered (own id or pi parent), from the summary
    regenerated: bool = False  # its summary was written from the outputs (a tree from before summaries)

    def _sum(self, kind, attr):
        return sum(getattr(o, attr) for o in self.outputs if o.kind == kind)

    @property
    def reads_pass(self) -> int:
        return self._sum(PASS, "reads")

    @property
    def reads_fail(self) -> int:
        return self._sum(FAIL, "reads")

    @property
    def bases(self) -> int:
        return self._sum(PASS, "bases") + self._sum(FAIL, "bases")


def read(layout: Layout, settings, rel: str, barcodes=None, input_dir=None) -> Published | None:
    """What is published for input `rel`, or None when its done marker is absent. File I/O: outside the lock.

    Counts per (kind, barcode) come from `summary/<rel>.tsv` when it lists exactly the outputs present;
    else every output is read, and a missing or disagreeing summary is written anew from them.
    `input_dir` (default settings.input_dir): where the pod5 is, for the run's start time in a summary
    that has to be written from FASTQ (which does not carry the run's read groups).
    """
    if not is_published(layout, settings, rel):
        return None
    files = existing(layout, settings, rel, barcodes)
    summary = next((p for kind, _b, p in files if kind == SUMMARY), None)
    outputs = [(kind, barcode, path) for kind, barcode, path in files if kind != SUMMARY]
    tally = _read_summary(summary, barcoded(settings)) if summary is not None else None
    regenerated = False
    if tally is None or not _agrees(tally, outputs):
        lines, tally = _summarize_outputs(outputs, rel, settings, Path(input_dir or settings.input_dir))
        summary = write_summary(layout.summary_path(rel), lines, replace=summary is not None)
        regenerated = True
    records = []
    for kind, barcode, path in outputs:
        size, checksum = _checksum(path)
        reads, bases = tally.counts.get((kind, barcode), (0, 0))
        records.append(OutputRecord(kind, _relative(layout, path), reads, bases, size, checksum, barcode))
    size, checksum = _checksum(summary)
    records.append(OutputRecord(SUMMARY, summary_relpath(rel), tally.lines, 0, size, checksum, None))
    return Published(rel, records, len(tally.parents), regenerated)


def _relative(layout: Layout, path: Path) -> str:
    return path.relative_to(layout.output).as_posix()


def _checksum(path: Path) -> tuple[int, str]:
    from .writers import file_checksum

    return file_checksum(path)


@dataclass
class _Tally:
    counts: dict  # (kind, barcode) -> (reads, bases)
    lines: int
    parents: set


def _read_summary(path: Path, is_barcoded: bool) -> _Tally | None:
    """Reads and bases per (kind, barcode) as a summary lists them; None if it is not a readable summary."""
    reads, bases = Counter(), Counter()
    parents, lines = set(), 0
    try:
        with open(path, newline="", encoding="utf-8", errors="surrogateescape") as fh:
            rows = csv.reader(fh, delimiter="\t")
            header = next(rows, None)
            if header is None or tuple(header[: len(SUMMARY_COLUMNS)]) != SUMMARY_COLUMNS:
                return None
            col = {name: i for i, name in enumerate(header)}
            for row in rows:
                kind = PASS if row[col["passes_filtering"]] == "TRUE" else FAIL
                key = (kind, row[col["barcode_arrangement"]] if is_barcoded else None)
                reads[key] += 1
                bases[key] += int(row[col["sequence_length_template"]] or 0)
                parents.add(row[col["parent_read_id"]] or row[col["read_id"]])
                lines += 1
    except (OSError, ValueError, IndexError, KeyError):
        return None
    return _Tally({k: (reads[k], bases[k]) for k in reads}, lines, parents)


def _agrees(tally: _Tally, outputs) -> bool:
    """Does the summary list records for exactly the outputs present (an empty pass file may have none)?"""
    present = {(kind, barcode) for kind, barcode, _p in outputs}
    listed = {key for key, (n, _b) in tally.counts.items() if n}
    empty_fail = {key for key in present - listed if key[0] == FAIL}  # a fail/ output exists only when non-empty
    return listed <= present and not empty_fail


# -- a summary written from the outputs (trees from before summaries) ---------------------------------------
def _summarize_outputs(outputs, rel: str, settings, input_dir: Path):
    from . import split

    lines = ["\t".join(SUMMARY_COLUMNS) + "\n"]
    counts = defaultdict(lambda: [0, 0])
    parents = set()
    starts = None
    for kind, barcode, path in sorted(outputs, key=lambda o: str(o[2])):
        for record, runs in _records(path):
            if record.flag & _NOT_PRIMARY:
                continue
            if runs is None:  # FASTQ: the run's start time is in the pod5, not in the output
                if starts is None:
                    starts = _acquisition_starts(input_dir / rel)
                run = _run_of_fastq(record, starts)
            else:
                run = runs.run_of(record)
            lines.append(split.summary_line(record, rel, run, kind == PASS, split.read_qscore(record),
                                            barcode or UNCLASSIFIED))
            counts[(kind, barcode)][0] += 1
            counts[(kind, barcode)][1] += record.query_length
            parents.add(_tag(record, "pi") or record.query_name)
    tally = _Tally({k: tuple(v) for k, v in counts.items()}, len(lines) - 1, parents)
    return lines, tally


def _tag(record, name):
    try:
        return record.get_tag(name)
    except KeyError:
        return None


def _records(path: Path):
    """(pysam record, read groups or None) of every record of an output: BAM, or FASTQ whose header carries
    the record's SAM tags (`@id<TAB>tags`, writers.fastq_entry)."""
    import pysam

    from .split import _ReadGroups

    if path.name.endswith(".bam"):
        with pysam.AlignmentFile(str(path), "rb", check_sq=False) as bam:
            runs = _ReadGroups(bam.header.to_dict())
            for record in bam:
                yield record, runs
        return
    header = pysam.AlignmentHeader.from_dict({"HD": {"VN": "1.6"}})
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as fh:
        while True:
            head = fh.readline()
            if not head:
                return
            seq, _plus, qual = fh.readline(), fh.readline(), fh.readline()
            name, *tags = head.decode("utf-8", "surrogateescape").rstrip("\n")[1:].split("\t")
            seq = seq.decode().rstrip("\n") or "*"
            qual = qual.decode().rstrip("\n") or "*"
            line = "\t".join([name, "4", "*", "0", "0", "*", "*", "0", "0", seq, qual, *tags])
            yield pysam.AlignedSegment.fromstring(line, header), None


def _acquisition_starts(pod5_path: Path) -> dict:
    """{run id: acquisition start time} of a pod5 file's runs, by `protocol_run_id` (what dorado names its read
    groups after) and by `acquisition_id`; {} if the pod5 cannot be read."""
    try:
        import pod5

        with pod5.Reader(pod5_path) as reader:
            runs = reader.run_info_table.read_all().to_pylist()
    except Exception:  # the input may be gone or damaged: the summary then has no start times
        return {}
    return {r[key]: r["acquisition_start_time"] for r in runs for key in ("acquisition_id", "protocol_run_id")
            if r.get(key)}


def _run_of_fastq(record, starts: dict):
    import datetime

    run_id = (_tag(record, "RG") or "").split("_", 1)[0]
    start = starts.get(run_id)
    if isinstance(start, datetime.datetime) and start.tzinfo is None:
        start = start.replace(tzinfo=datetime.timezone.utc)
    return run_id, start


def write_summary(final: Path, lines: list[str], replace: bool = False) -> Path:
    """Write a summary beside its final name, fsynced, then put it in place: by rename when `replace`,
    else by link (a summary published meanwhile is kept: it is the newer one)."""
    from .publish import make_dirs

    make_dirs(final.parent)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    data = "".join(lines).encode("utf-8", "surrogateescape")
    try:
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            if exc.errno not in FULL_ERRNOS:
                raise
            raise StorageFull(  # a janitor, `recover` or a rebuild writing a missing summary on a full disk
                f"no space left on the filesystem of {final.parent} to write {final.name} ({exc.strerror}). Free "
                "space (or raise the quota), then run the command again; nothing was failed.", folder=final.parent,
            ) from None
        if replace:
            os.replace(tmp, final)
        else:
            try:
                os.link(tmp, final)
            except FileExistsError:
                pass
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(final.parent)
    return final


# -- applying what was found: short guarded transactions ---------------------------------------------------
def _done_values(found: Published, read_count: int | None) -> dict:
    missing = None if read_count is None or found.parents is None else max(0, read_count - found.parents)
    return dict(reads_pass=found.reads_pass, reads_fail=found.reads_fail, bases=found.bases, reads_missing=missing)


def _output_rows(file_id: int, batch_id: int | None, outputs: list[OutputRecord]) -> list[dict]:
    return [dict(file_id=file_id, batch_id=batch_id, kind=o.kind, barcode=o.barcode, path=o.path, reads=o.reads,
                 bases=o.bases, bytes=o.bytes, checksum=o.checksum) for o in outputs]


def mark_done(conn, file_id: int, found: Published, now: float, seen_state: str, seen_batch: int | None,
              batch_id: int | None = None) -> bool:
    """Mark a file done from its published outputs, with its `outputs` rows, if it is still in the state
    (and batch) it was seen in when its outputs were read. False (nothing changed) otherwise."""
    t = Pod5File
    read_count = conn.execute(sa.select(t.read_count).where(t.id == file_id)).scalar()
    batch_id = batch_id if batch_id is not None else seen_batch
    moved = conn.execute(
        sa.update(t).where(t.id == file_id, t.state == seen_state,
                           t.batch_id.is_(None) if seen_batch is None else t.batch_id == seen_batch)
        .values(state=DONE, done_at=now, last_error=None, isolate=False, batch_id=batch_id,
                **_done_values(found, read_count))
    ).rowcount
    if not moved:
        return False
    record_outputs(conn, file_id, batch_id, found.outputs)
    return True


_PENDING_DONE = Prepared.of(
    sa.update(Pod5File).where(Pod5File.id == p("file_id"), Pod5File.state == PENDING, Pod5File.batch_id.is_(None))
    .values(state=DONE, done_at=p("now"), last_error=None, reads_pass=p("reads_pass"), reads_fail=p("reads_fail"),
            bases=p("bases"), reads_missing=p("reads_missing")))
_OUTPUT = Prepared.of(sa.insert(Output).values(
    file_id=p("file_id"), batch_id=p("batch_id"), kind=p("kind"), barcode=p("barcode"), path=p("path"),
    reads=p("reads"), bases=p("bases"), bytes=p("bytes"), checksum=p("checksum")))


def mark_pending_files_done(conn, items: list[tuple[int, int | None, Published]], now: float) -> int:
    """Many pending files (not in any batch) done at once, with their `outputs` rows: (file id, read count,
    what is published). For a rebuild, under the lock: one prepared statement per table (prepared.py), not
    SQLAlchemy's machinery per row (~10 us instead of ~100 us a file)."""
    if not items:
        return 0
    moved = _PENDING_DONE.run_many(conn, [dict(file_id=i, now=now, **_done_values(got, n)) for i, n, got in items]).rowcount
    _OUTPUT.run_many(conn, [row for i, _n, got in items for row in _output_rows(i, None, got.outputs)])
    return moved


def record_outputs(conn, file_id: int, batch_id: int | None, outputs: list[OutputRecord]) -> None:
    """Replace the `outputs` rows of a file."""
    conn.execute(sa.delete(Output).where(Output.file_id == file_id))
    if outputs:
        conn.execute(sa.insert(Output), _output_rows(file_id, batch_id, outputs))


def mark_pending(conn, file_id: int, seen_batch: int | None, leftovers: list[Path]) -> bool:
    """A done file whose done marker vanished: pending again (guarded: still done, same batch), its
    `outputs` rows dropped and its leftover outputs removed, under the lock, before anyone can claim it."""
    t = Pod5File
    moved = conn.execute(
        sa.update(t).where(t.id == file_id, t.state == DONE,
                           t.batch_id.is_(None) if seen_batch is None else t.batch_id == seen_batch)
        .values(state=PENDING, batch_id=None, reads_pass=None, reads_fail=None, reads_missing=None, bases=None,
                done_at=None)
    ).rowcount
    if not moved:
        return False
    conn.execute(sa.delete(Output).where(Output.file_id == file_id))
    for path in leftovers:
        path.unlink(missing_ok=True)
    return True
