"""dorado BAM -> one output per pod5 file (FASTQ, gzipped FASTQ or BAM) in staging, with read accounting.

dorado tags every record with `fn:Z:<name of the file it read>`: the link name in the batch's
ASSIGNED dir, which `links` maps back to the input's path relative to INPUT_DIR.
"""
from __future__ import annotations

import gzip
import resource
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pysam

from .durable import fsync_dir
from .layout import output_relpath  # noqa: F401  (re-exported: callers split by it)
from .writers import Background, OutputWriter

EMITS = ("fastq", "fastq.gz", "bam")  # also the output file extensions
# samtools fastq drops secondary (0x100) and supplementary (0x800) records: they repeat a read.
_NOT_PRIMARY = 0x900
_ERROR_PROB = 10.0 ** (-np.arange(256) / 10.0)


@dataclass
class FileOutput:
    link_name: str            # the fn:Z value (name of the link in the ASSIGNED dir)
    rel: str                  # input path relative to INPUT_DIR, e.g. "a/b/x.pod5"
    pass_path: Path | None    # reads with qs >= min_qscore (always written, may be empty)
    fail_path: Path | None    # the rest; None when there are none
    reads_pass: int = 0
    reads_fail: int = 0
    bases: int = 0
    parent_ids: set[str] = field(default_factory=set)  # own read id, or the pi:Z parent


@dataclass
class SplitResult:
    files: dict[str, FileOutput]      # by link name, one per link given
    foreign: dict[str, int]           # fn values not in the batch -> record count
    untagged: int                     # records without fn


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


def _allow_open_files(needed: int) -> None:
    """Raise the soft open-files limit toward the hard one if a batch needs many writers."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def split_bam(bam_path, links: dict[str, str], staging_dir, emit: str = "fastq",
              min_qscore: float = 0.0) -> SplitResult:
    """Split dorado's BAM into one pass (and, if needed, one fail) output per link in `links`.

    `links` maps link name (the `fn:Z` value) -> input path relative to INPUT_DIR. Outputs go to
    `staging_dir/pass/<output_relpath(rel)>` and `staging_dir/fail/...`, each written to a temp
    name, fsynced and renamed; a pass file is written for every link, empty if no read passed.
    Records naming a file outside `links` or no file are counted, not written. Reads the BAM
    once, streaming. Raises OSError/ValueError from pysam if the BAM is unreadable or truncated,
    leaving no temp files behind.
    """
    if emit not in EMITS:
        raise ValueError(f"emit must be one of {', '.join(EMITS)}, not {emit!r}")
    staging = Path(staging_dir)
    files = {name: FileOutput(name, rel, None, None) for name, rel in links.items()}
    targets = {name: output_relpath(rel, emit) for name, rel in links.items()}
    foreign: dict[str, int] = {}
    untagged = 0
    writers: dict[tuple[str, str], OutputWriter] = {}
    _allow_open_files(2 * len(links) * OutputWriter.fds_per_writer + 64)

    bam = pysam.AlignmentFile(str(bam_path), "rb", check_sq=False)
    background = Background()
    try:
        def writer(name: str, kind: str) -> OutputWriter:
            key = (name, kind)
            if key not in writers:
                writers[key] = OutputWriter(staging / kind / targets[name], emit, bam, background)
            return writers[key]

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
            if record.flag & _NOT_PRIMARY:
                if emit == "bam":  # kept for aligned BAM output, never counted as a read
                    writer(name, "pass").write(record)
                continue
            passed = read_qscore(record) >= min_qscore
            writer(name, "pass" if passed else "fail").write(record)
            if passed:
                out.reads_pass += 1
            else:
                out.reads_fail += 1
            out.bases += record.query_length
            out.parent_ids.add(record.get_tag("pi") if record.has_tag("pi") else record.query_name)

        for name in files:
            writer(name, "pass")  # every input gets its pass file, empty if no read passed
        for w in writers.values():
            w.close()
    except BaseException:
        background.shutdown()  # no queued job may write to an output being discarded
        for w in writers.values():
            w.discard()
        raise
    finally:
        background.shutdown()
        bam.close()

    for (name, kind), w in writers.items():
        if kind == "pass":
            files[name].pass_path = w.publish()
        else:
            files[name].fail_path = w.publish()
    for name, out in files.items():
        if out.fail_path is None:  # a stale fail file from an earlier attempt must not survive
            (staging / "fail" / targets[name]).unlink(missing_ok=True)
    for folder in {w.final.parent for w in writers.values()}:
        fsync_dir(folder)
    return SplitResult(files=files, foreign=foreign, untagged=untagged)


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
