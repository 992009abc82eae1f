"""dorado BAM -> the outputs of each pod5 file (FASTQ, gzipped FASTQ or BAM; per barcode when barcoded) and
its per-read summary, in staging, with read accounting.

dorado tags every record with `fn:Z:<name of the file it read>`: the link name in the batch's
ASSIGNED dir, which `links` maps back to the input's path relative to INPUT_DIR. With barcoding
(`--kit-name`), its `BC:Z:` tag names the barcode (or the sample sheet's alias): the record goes to
`pass|fail/<barcode>/<rel>`, `unclassified` without one (DESIGN §2, §5).
"""
from __future__ import annotations

import contextlib
import datetime
import gzip
import os
import re
import resource
import uuid
import zlib
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import pysam

from . import bgzf
from .claim import OutputRecord
from .durable import fsync_dir
from .layout import SUMMARY_COLUMNS, UNCLASSIFIED, output_relpath, summary_relpath
from .models import FAIL, PASS, SUMMARY
from .writers import MAX_OPEN_FILES, Background, OutputWriter, parallel, sync_all

EMITS = ("fastq", "fastq.gz", "bam")  # also the output file extensions
PUBLISH_ORDER = (FAIL, PASS, SUMMARY)  # the publication's steps: the summary last (the done marker)
_SAFE_FOLDER = re.compile(r"^(?!\.{1,2}$)[A-Za-z0-9._-]+$")
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]")
READ_THREADS = 2  # htslib threads inflating dorado's BAM while the Python loop splits it
# samtools fastq drops secondary (0x100) and supplementary (0x800) records: they repeat a read.
_NOT_PRIMARY = 0x900
_ERROR_PROB = 10.0 ** (-np.arange(256) / 10.0)


@dataclass
class Written:
    """One output file in staging, ready to be renamed to OUTPUT_DIR/`path`."""

    kind: str  # pass | fail | summary
    barcode: str | None
    path: str  # relative to OUTPUT_DIR
    staged: Path
    reads: int = 0
    bases: int = 0
    bytes: int = 0
    checksum: str | None = None


@dataclass
class FileOutput:
    link_name: str            # the fn:Z value (name of the link in the ASSIGNED dir)
    rel: str                  # input path relative to INPUT_DIR, e.g. "a/b/x.pod5"
    reads_pass: int = 0
    reads_fail: int = 0
    bases: int = 0
    parent_ids: set[str] = field(default_factory=set)  # own read id, or the pi:Z parent
    written: dict[tuple[str, str | None], Written] = field(default_factory=dict)  # (kind, barcode) -> file

    def records(self, output_root=None) -> list[OutputRecord]:
        return [OutputRecord(w.kind, w.path, w.reads, w.bases, w.bytes, w.checksum, w.barcode)
                for w in self.written.values()]

    @property
    def pass_path(self) -> Path | None:
        """The staged pass output of an unbarcoded study (tests, benchmarks)."""
        w = self.written.get((PASS, None))
        return w.staged if w else None

    @property
    def fail_path(self) -> Path | None:
        w = self.written.get((FAIL, None))
        return w.staged if w else None


@dataclass
class SplitResult:
    files: dict[str, FileOutput]      # by link name, one per link given
    foreign: dict[str, int]           # fn values not in the batch -> record count
    untagged: int                     # records without fn
    dorado_version: str | None = None  # @PG VN of dorado's BAM
    models: tuple[str, ...] = ()       # basecall_model of its read groups


def read_qscore(record: pysam.AlignedSegment) -> float:
    """The record's `qs` tag, else the mean of its base qualities taken as error probabilities."""
    try:
        return float(record.get_tag("qs"))
    except KeyError:
        quals = record.query_qualities
        if not quals:
            return 0.0
        mean_error = _ERROR_PROB[np.frombuffer(quals, dtype=np.uint8)].mean()
        return float(-10.0 * np.log10(mean_error))


def barcode_folder(bc: str | None, kit: str | None) -> str:
    """The `<barcode>` folder of a record's `BC:Z:` value (docs/dorado-facts.md §4): `barcodeNN` for dorado's
    `<KIT>_barcodeNN` (kit compared case-insensitively), the sample sheet's alias as it is, `unclassified`
    for none (dorado's basecaller writes no BC tag then; `dorado demux` writes `BC:Z:unclassified`).
    A value that is not a safe folder name (dorado's aliases are `[A-Za-z0-9_-]`) has its other characters
    replaced by `_`: a BAM tag never names a folder outside pass/ or fail/."""
    if not bc or bc == UNCLASSIFIED:
        return UNCLASSIFIED
    if kit and len(bc) > len(kit) and bc[len(kit)] == "_" and bc[:len(kit)].upper() == kit.upper():
        bc = bc[len(kit) + 1:]
    if _SAFE_FOLDER.match(bc):
        return bc
    bc = _UNSAFE_CHARS.sub("_", bc)
    return bc if bc.strip(".") else "_" * len(bc)


def _allow_open_files(needed: int) -> None:
    """Raise the soft open-files limit toward the hard one if a batch needs many writers."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


class _ReadGroups:
    """Run id and acquisition start of each read group of dorado's header (for the summary)."""

    def __init__(self, header: dict):
        self.runs: dict[str, tuple[str, datetime.datetime | None]] = {}
        self.models: list[str] = []
        for rg in header.get("RG", []):
            ds = dict(item.split("=", 1) for item in rg.get("DS", "").split() if "=" in item)
            start = _parse_time(ds.get("acquisition_start_time") or rg.get("DT"))
            self.runs[rg.get("ID", "")] = (ds.get("runid", rg.get("ID", "").split("_", 1)[0]), start)
            if ds.get("basecall_model") and ds["basecall_model"] not in self.models:
                self.models.append(ds["basecall_model"])

    def run_of(self, record) -> tuple[str, datetime.datetime | None]:
        rg = record.get_tag("RG") if record.has_tag("RG") else ""
        found = self.runs.get(rg)
        if found is None:
            found = self.runs[rg] = self._guess(rg)
        return found

    def _guess(self, rg: str) -> tuple[str, datetime.datetime | None]:
        """A record's RG:Z the header does not list: dorado appends `_<barcode or alias>` to the run's group
        (`<run>_<model>`), and 1.4 may leave a barcode's group out of the header. The run's group is the
        longest listed ID that is a prefix of it; else only the run id (the ID's first field) is known."""
        best = max((i for i in self.runs if i and rg.startswith(i + "_")), key=len, default=None)
        return self.runs[best] if best is not None else (rg.split("_", 1)[0], None)


def _parse_time(text: str | None) -> datetime.datetime | None:
    """An ISO time (dorado's `st:Z`, a read group's start), always with a time zone (UTC when it has none)."""
    if not text:
        return None
    try:
        parsed = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=datetime.timezone.utc)


def _tag(record, name, default=""):
    try:
        return record.get_tag(name)
    except KeyError:
        return default


_TSV_ESCAPES = str.maketrans({"\t": "\\t", "\n": "\\n", "\r": "\\r"})


def summary_line(record, rel: str, run: tuple, passed: bool, qscore: float, barcode: str,
                 parent: str | None = None) -> str:
    """One line of `summary/<rel>.tsv` (DESIGN §5 columns, dorado's sequencing_summary names): `start_time` in
    seconds since the run's acquisition start (empty when the run's start is unknown), `passes_filtering`
    TRUE/FALSE by ledgerbc's --min-qscore, `parent_read_id` the `pi:Z` parent or the read's own id. A tab,
    newline or CR in the file name is written as `\\t`, `\\n`, `\\r` (one field, one line per record).
    `parent`: the parent id when the caller has it already (the splitter's hot path)."""
    run_id, acquisition_start = run
    read_id = record.query_name
    if parent is None:
        parent = record.get_tag("pi") if record.has_tag("pi") else read_id
    start_time = ""
    if acquisition_start is not None:
        started = _parse_time(_tag(record, "st", None))
        if started is not None:
            start_time = f"{(started - acquisition_start).total_seconds():.6f}"
    duration = _tag(record, "du")
    if isinstance(duration, float):
        duration = f"{duration:.6f}"
    return (f"{rel.translate(_TSV_ESCAPES)}\t{read_id}\t{parent}\t{run_id}\t{_tag(record, 'ch')}\t"
            f"{_tag(record, 'mx')}\t{start_time}\t{duration}\t{'TRUE' if passed else 'FALSE'}\t"
            f"{record.query_length}\t{qscore:.6f}\t{_tag(record, 'ns')}\t{barcode}\n")


class _SummaryWriter:
    """A per-input summary in staging: written to a temp name, fsynced, then renamed (like OutputWriter)."""

    def __init__(self, final: Path):
        final.parent.mkdir(parents=True, exist_ok=True)
        self.final = final
        self.tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        self.lines: list[str] = ["\t".join(SUMMARY_COLUMNS) + "\n"]
        self.checksum = None
        self.size = 0

    def sync(self) -> None:
        """Write the lines and fsync them (`writers.sync_all` runs these in parallel with the outputs')."""
        data = "".join(self.lines).encode("utf-8", "surrogateescape")
        with open(self.tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        self.size, self.checksum = len(data), f"crc32:{zlib.crc32(data):08x}"

    def publish(self) -> Path:
        os.replace(self.tmp, self.final)
        return self.final

    def discard(self) -> None:
        self.tmp.unlink(missing_ok=True)


def split_bam(bam_path, links: dict[str, str], staging_dir, emit: str = "fastq",
              min_qscore: float = 0.0, kit_name: str | None = None) -> SplitResult:
    """Split dorado's BAM into the outputs of each link in `links`, and its summary.

    `links` maps link name (the `fn:Z` value) -> input path relative to INPUT_DIR. Outputs go to
    `staging_dir/<path relative to OUTPUT_DIR>` (pass/[<barcode>/]<rel>.<emit>, fail/..., summary/<rel>.tsv),
    each written to a temp name, fsynced and renamed. Unbarcoded (`kit_name` None): a pass output for every
    link, empty if no read passed; a fail output only when some read failed. Barcoded: a pass output for
    every barcode with any record of that input, a fail output where some failed. Every link gets its
    summary (one line per output record). Records naming a file outside `links` or no file are counted,
    not written. Reads the BAM once, streaming. Raises OSError/ValueError from pysam if the BAM is
    unreadable or truncated, leaving no temp files behind.
    """
    if emit not in EMITS:
        raise ValueError(f"emit must be one of {', '.join(EMITS)}, not {emit!r}")
    staging = Path(staging_dir)
    files = {name: FileOutput(name, rel) for name, rel in links.items()}
    foreign: dict[str, int] = {}
    untagged = 0
    writers: dict[tuple[str, str, str | None], OutputWriter] = {}
    summaries = {name: _SummaryWriter(staging / summary_relpath(rel)) for name, rel in links.items()}
    counts: dict[tuple[str, str, str | None], list[int]] = {}
    folders: dict[str | None, str] = {}  # BC value -> <barcode> folder
    _allow_open_files(OutputWriter.fds_per_writer * 2 * len(links) + MAX_OPEN_FILES + 64)

    # htslib inflates dorado's BAM in its own threads: half of the calling thread's time otherwise (the
    # calling thread, which runs the Python loop, is what limits the split; bench/overhead.py).
    bam = _open_calls(bam_path)
    header = bam.header.to_dict()
    groups = _ReadGroups(header)
    version = next((pg.get("VN") for pg in header.get("PG", []) if pg.get("PN") == "dorado"), None)
    barcoded = kit_name is not None
    background = Background()

    def relpath(kind: str, name: str, barcode: str | None) -> str:
        out = output_relpath(links[name], emit)
        return f"{kind}/{barcode}/{out}" if barcode is not None else f"{kind}/{out}"

    def writer(name: str, kind: str, barcode: str | None) -> OutputWriter:
        key = (name, kind, barcode)
        if key not in writers:
            if len(writers) % 256 == 0:  # a barcoded batch: an output per file x barcode x pass/fail
                _allow_open_files(OutputWriter.fds_per_writer * (len(writers) + 256) + MAX_OPEN_FILES + 64)
            writers[key] = OutputWriter(staging / relpath(kind, name, barcode), emit, bam, background)
            counts[key] = [0, 0]
        return writers[key]

    try:
        for record in bam:
            try:
                name = record.get_tag("fn")
            except KeyError:
                untagged += 1
                continue
            out = files.get(name)
            if out is None:
                foreign[name] = foreign.get(name, 0) + 1
                continue
            barcode = None
            if barcoded:
                bc = record.get_tag("BC") if record.has_tag("BC") else None
                barcode = folders.get(bc)
                if barcode is None:
                    barcode = folders[bc] = barcode_folder(bc, kit_name)
            if record.flag & _NOT_PRIMARY:
                if emit == "bam":  # kept for aligned BAM output, never counted as a read
                    writer(name, PASS, barcode).write(record)
                continue
            qscore = read_qscore(record)
            passed = qscore >= min_qscore
            kind = PASS if passed else FAIL
            writer(name, kind, barcode).write(record)
            if barcoded and kind == FAIL:
                writer(name, PASS, barcode)  # every barcode with a record in this input has its pass file
            length = record.query_length
            tally = counts[(name, kind, barcode)]
            tally[0] += 1
            tally[1] += length
            if passed:
                out.reads_pass += 1
            else:
                out.reads_fail += 1
            out.bases += length
            parent = record.get_tag("pi") if record.has_tag("pi") else record.query_name
            out.parent_ids.add(parent)
            summaries[name].lines.append(summary_line(
                record, links[name], groups.run_of(record), passed, qscore, barcode or UNCLASSIFIED, parent))

        if not barcoded:
            for name in files:
                writer(name, PASS, None)  # every input gets its pass file, empty if no read passed
        for w in writers.values():
            w.finish()
        background.wait()
        sync_all([*writers.values(), *summaries.values()])
    except BaseException:
        background.shutdown()  # no queued job may write to an output being discarded
        for w in writers.values():
            w.discard()
        for s in summaries.values():
            s.discard()
        with contextlib.suppress(OSError):  # htslib's close fails after a read error: keep that error
            bam.close()
        raise
    background.shutdown()
    bam.close()

    for (name, kind, barcode), w in writers.items():
        reads, bases = counts[(name, kind, barcode)]
        files[name].written[(kind, barcode)] = Written(
            kind, barcode, relpath(kind, name, barcode), w.publish(), reads, bases, w.size, w.checksum)
    for name, s in summaries.items():
        path = summary_relpath(links[name])
        files[name].written[(SUMMARY, None)] = Written(
            SUMMARY, None, path, s.publish(), len(s.lines) - 1, 0, s.size, s.checksum)
    parallel([partial(fsync_dir, folder) for folder in
              {w.final.parent for w in writers.values()} | {s.final.parent for s in summaries.values()}])
    return SplitResult(files=files, foreign=foreign, untagged=untagged, dorado_version=version,
                       models=tuple(groups.models))


def _open_calls(bam_path) -> pysam.AlignmentFile:
    """dorado's BAM, opened with htslib's own messages off: the staging of a batch fenced meanwhile (reclaimed,
    its staging cleaned) is gone, and then its worker says so in one line (batch.py), not an htslib error on
    stderr as well. An open that fails still raises, with what happened.

    The file's BGZF framing is checked first (`bgzf.check_framing`): htslib's reader thread stops on a
    damaged or missing block, and its open then waits for that thread forever (gdb: the main thread in
    `bgzf_check_EOF`, no reader thread left; seen here within a few thousand opens of truncated BAMs, about
    once in fifty seconds of trying). A worker would hang in the split while its heartbeat keeps the batch's
    lease alive. Damage inside a well-framed block fails in the worker threads' inflate and raises."""
    bgzf.check_framing(bam_path)
    previous = pysam.set_verbosity(0)
    try:
        return pysam.AlignmentFile(str(bam_path), "rb", check_sq=False, threads=READ_THREADS)
    finally:
        pysam.set_verbosity(previous)


def count_output_reads(path) -> int:
    """Number of reads in a published output (.fastq, .fastq.gz or .bam; primary records only)."""
    path = Path(path)
    if path.name.endswith(".bam"):
        with pysam.AlignmentFile(str(path), "rb", check_sq=False) as bam:
            return sum(1 for record in bam if not record.flag & _NOT_PRIMARY)
    opener = gzip.open if path.name.endswith(".gz") else open
    lines = 0
    with opener(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            lines += chunk.count(b"\n")
    return lines // 4


def count_published(pass_path, fail_path) -> tuple[int, int]:
    """(pass reads, fail reads) of one published input: its pass/ output, and its fail/ output if any."""
    fail_path = Path(fail_path)
    return count_output_reads(pass_path), count_output_reads(fail_path) if fail_path.exists() else 0
