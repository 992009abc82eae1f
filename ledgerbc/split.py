"""dorado BAM -> the outputs of each pod5 file (FASTQ, gzipped FASTQ or BAM; per barcode when barcoded) and
its per-read summary, in staging, with read accounting.

dorado tags every record with `fn:Z:<name of the file it read>`: the link name in the batch's
ASSIGNED dir, which `links` maps back to the input's path relative to INPUT_DIR. With barcoding
(`--kit-name`), its `BC:Z:` tag names the barcode (or the sample sheet's alias): the record goes to
`pass|fail/<barcode>/<rel>`, `unclassified` without one (DESIGN §2, §5).
"""
from __future__ import annotations

import datetime
import gzip
import os
import resource
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pysam

from .claim import OutputRecord
from .durable import fsync_dir
from .layout import SUMMARY_COLUMNS, output_relpath, summary_relpath
from .models import FAIL, PASS, SUMMARY
from .writers import Background, OutputWriter

EMITS = ("fastq", "fastq.gz", "bam")  # also the output file extensions
PUBLISH_ORDER = (FAIL, PASS, SUMMARY)  # the publication's steps: the summary last (the done marker)
UNCLASSIFIED = "unclassified"
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
    """The `<barcode>` folder of a record's `BC:Z:` value: `barcodeNN` for dorado's `<KIT>_barcodeNN` (kit
    compared case-insensitively), the alias itself for a sample sheet's alias, `unclassified` for none."""
    if not bc or bc == UNCLASSIFIED:
        return UNCLASSIFIED
    if kit and bc.upper().startswith(kit.upper() + "_"):
        return bc[len(kit) + 1:]
    return bc


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
        try:
            return self.runs.get(record.get_tag("RG"), ("", None))
        except KeyError:
            return "", None


def _parse_time(text: str | None) -> datetime.datetime | None:
    if not text:
        return None
    try:
        return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def _tag(record, name, default=""):
    try:
        return record.get_tag(name)
    except KeyError:
        return default


def summary_line(record, rel: str, run: tuple, passed: bool, qscore: float, barcode: str) -> str:
    """One line of `summary/<rel>.tsv` (DESIGN §5 columns, dorado's sequencing_summary names)."""
    run_id, acquisition_start = run
    start_time = ""
    started = _parse_time(_tag(record, "st", None))
    if started is not None and acquisition_start is not None:
        start_time = f"{(started - acquisition_start).total_seconds():.6f}"
    read_id = record.query_name
    duration = _tag(record, "du", "")
    values = (
        rel, read_id, _tag(record, "pi", read_id), run_id, _tag(record, "ch"), _tag(record, "mx"), start_time,
        f"{duration:.6f}" if isinstance(duration, float) else duration, "TRUE" if passed else "FALSE",
        record.query_length, f"{qscore:.6f}", _tag(record, "ns"), barcode,
    )
    return "\t".join(str(v) for v in values) + "\n"


class _SummaryWriter:
    """A per-input summary in staging: written to a temp name, fsynced, then renamed (like OutputWriter)."""

    def __init__(self, final: Path):
        final.parent.mkdir(parents=True, exist_ok=True)
        self.final = final
        self.tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        self.lines: list[str] = ["\t".join(SUMMARY_COLUMNS) + "\n"]
        self.checksum = None
        self.size = 0

    def close(self) -> None:
        import zlib

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
    _allow_open_files(2 * len(links) * OutputWriter.fds_per_writer + 64)

    bam = pysam.AlignmentFile(str(bam_path), "rb", check_sq=False)
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
            barcode = barcode_folder(_tag(record, "BC", None), kit_name) if barcoded else None
            if record.flag & _NOT_PRIMARY:
                if emit == "bam":  # kept for aligned BAM output, never counted as a read
                    writer(name, PASS, barcode).write(record)
                continue
            qscore = read_qscore(record)
            passed = qscore >= min_qscore
            kind = PASS if passed else FAIL
            writer(name, kind, barcode).write(record)
            if barcoded:
                writer(name, PASS, barcode)  # every barcode with a record in this input has its pass file
            tally = counts[(name, kind, barcode)]
            tally[0] += 1
            tally[1] += record.query_length
            if passed:
                out.reads_pass += 1
            else:
                out.reads_fail += 1
            out.bases += record.query_length
            out.parent_ids.add(_tag(record, "pi", None) or record.query_name)
            summaries[name].lines.append(summary_line(
                record, links[name], groups.run_of(record), passed, qscore, barcode or UNCLASSIFIED))

        if not barcoded:
            for name in files:
                writer(name, PASS, None)  # every input gets its pass file, empty if no read passed
        for w in writers.values():
            w.close()
        for s in summaries.values():
            s.close()
    except BaseException:
        background.shutdown()  # no queued job may write to an output being discarded
        for w in writers.values():
            w.discard()
        for s in summaries.values():
            s.discard()
        raise
    finally:
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
    for folder in {w.final.parent for w in writers.values()} | {s.final.parent for s in summaries.values()}:
        fsync_dir(folder)
    return SplitResult(files=files, foreign=foreign, untagged=untagged, dorado_version=version,
                       models=tuple(groups.models))


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
