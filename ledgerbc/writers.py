"""Output files of the splitter: written under a temp name, compressed off the main thread, fsynced.

FASTQ entries are gathered into ~256 KiB chunks; fastq.gz chunks are compressed by ISA-L's gzip. For BAM,
htslib writes level-0 (stored) BGZF blocks to an in-memory scratch file and ISA-L deflates them one for
one (same data, CRC and sizes). Compression and file writes run in one background thread, in order,
while the main thread reads dorado's BAM (pysam and ISA-L release the GIL): bench/overhead.py,
split 4.8 -> 1.7 s for a 20-file batch in fastq.gz and BAM. Without the isal package: stdlib gzip and
htslib's own BGZF compression, same content, 2-3x slower.
"""
from __future__ import annotations

import gzip
import os
import tempfile
import threading
import uuid
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pysam

from .durable import fsync_path

try:  # ISA-L's deflate: at level 1 ~4x zlib's speed on basecalled reads, for output no larger
    from isal import igzip as _gzip
    from isal import isal_zlib as _deflate
    from isal.isal_zlib import crc32 as _crc32
except ImportError:  # pragma: no cover - a dependency; without it: stdlib gzip, htslib's BGZF (2-3x slower)
    _gzip = _deflate = None
    from zlib import crc32 as _crc32


# gzip/BGZF level of fastq.gz and bam outputs. Level 1, not 6: on basecalled reads it is ~5x (gzip) and
# ~2x (BAM) faster for outputs only 2-5% larger; at level 6 the splitter cost 8% (fastq.gz) and 3.7%
# (bam) of a batch's GPU time (bench/overhead.py).
COMPRESS_LEVEL = 1
_COMPLEMENT = str.maketrans("ACGTNacgtn", "TGCANtgcan")
# BGZF block: 18-byte gzip header (BSIZE = block size - 1 at 16-17), raw deflate data, CRC32, ISIZE.
_BGZF_HEADER, _BGZF_FOOTER = 18, 8
_CHUNK = 1 << 18  # an output's data is handed to the background thread in chunks of ~256 KiB
_QUEUED = 8  # chunks waiting for the background thread, at most
# Bytes the outputs of one split may hold back in their chunks, together: past it, an output hands over its
# chunk once it has `_CHUNK // 16`. 20 files x 97 barcodes x pass/fail = 3,880 outputs of 256 KiB chunks
# would otherwise hold up to 1 GB.
BUFFERED_LIMIT = 64 << 20
# Temp files a split keeps open at once. A barcoded batch has an output per file x barcode x pass/fail
# (20 files x 97 barcodes x 2 = 3,880): past this many, the least recently written is closed and
# reopened for appending when written again, so a split never runs out of file descriptors.
MAX_OPEN_FILES = 512
# The final fsyncs of a split's outputs run this many at a time: on ext4, 300 fsyncs take 0.8 s one
# after the other and 0.08 s eight at a time (the journal commits them together); on a network
# filesystem each is a round trip to the server.
SYNC_THREADS = 8


def _scratch_fd() -> int:
    """An unnamed, in-memory (else unlinked temp) file: htslib writes a BAM's stored blocks to it."""
    try:
        return os.memfd_create("ledgerbc-bam", os.MFD_CLOEXEC)
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        fd, path = tempfile.mkstemp(prefix=".ledgerbc-bam-")
        os.unlink(path)
        return fd


def _redeflate(block: memoryview) -> bytes:
    """One BGZF block written at level 0 (stored), deflated at COMPRESS_LEVEL by ISA-L: same data, CRC, ISIZE."""
    if int.from_bytes(block[-4:], "little") == 0:  # empty, e.g. the EOF marker: as htslib wrote it
        return bytes(block)
    data = _deflate.decompress(block[_BGZF_HEADER:-_BGZF_FOOTER], -15)
    deflated = _deflate.compress(data, COMPRESS_LEVEL, -15)
    size = _BGZF_HEADER + len(deflated) + _BGZF_FOOTER
    if size > len(block):  # incompressible: the stored block (<= 64 KiB, as htslib wrote it) is smaller
        return bytes(block)
    return b"".join((block[:16], (size - 1).to_bytes(2, "little"), deflated, block[-_BGZF_FOOTER:]))


def fastq_entry(record: pysam.AlignedSegment) -> bytes:
    """The record as `samtools fastq -T '*'` writes it: `@id<TAB>tags...`, sequence, `+`, qualities."""
    fields = record.to_string().split("\t")
    seq = "" if fields[9] == "*" else fields[9]
    qual = fields[10]
    if qual == "*":
        qual = '"' * len(seq)  # samtools fastq's default quality (-v 1) when the BAM has none
    if record.is_reverse:  # aligned to the reverse strand: give back the read as sequenced
        seq, qual = seq.translate(_COMPLEMENT)[::-1], qual[::-1]
    header = "\t".join([fields[0]] + fields[11:])
    return f"@{header}\n{seq}\n+\n{qual}\n".encode("utf-8", "surrogateescape")


class Background:
    """Runs the writers' compression and file writes in one thread, first in first out, while the main
    thread reads the BAM (ISA-L, zlib and file writes release the GIL); inline on a single core.
    At most `_QUEUED` jobs wait (bounded memory); a job's error is raised by a later `submit` or `wait`.
    """

    def __init__(self):
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threaded = cores > 1
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="ledgerbc-split") if threaded else None
        self.queued: deque = deque()
        self.handles = _Handles()
        self.folders: set[Path] = set()  # output folders made so far (a barcoded split makes hundreds of outputs)
        self.buffered = 0  # bytes all outputs hold back in chunks (BUFFERED_LIMIT); main thread only

    def submit(self, job, *args) -> None:
        if self.pool is None:
            job(*args)
            return
        self.queued.append(self.pool.submit(job, *args))
        while self.queued and (len(self.queued) > _QUEUED or self.queued[0].done()):
            self.queued.popleft().result()

    def wait(self) -> None:
        while self.queued:
            self.queued.popleft().result()

    def shutdown(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


class _Handles:
    """The open temp files of one split, at most `limit` (least recently written closed first). The lock
    serialises opening, writing and closing: the background thread writes chunks while the main thread
    starts new outputs (a gzip header) and evicts others."""

    def __init__(self, limit: int | None = None):
        self.limit = limit or MAX_OPEN_FILES
        self.lock = threading.Lock()
        self.open: OrderedDict = OrderedDict()  # _Tallied -> None, least recently written first

    def write(self, tallied: "_Tallied", data) -> None:
        with self.lock:
            if tallied.file is None:
                while len(self.open) >= self.limit:
                    self._close(next(iter(self.open)))
                tallied.file = open(tallied.path, "ab" if tallied.created else "wb")
                tallied.created = True
            self.open[tallied] = None
            self.open.move_to_end(tallied)
            tallied.file.write(data)

    def close(self, tallied: "_Tallied") -> None:
        with self.lock:
            self._close(tallied)

    def _close(self, tallied: "_Tallied") -> None:
        self.open.pop(tallied, None)
        if tallied.file is not None:
            file, tallied.file = tallied.file, None
            file.close()


class _Tallied:
    """A temp file written through `_Handles` that keeps the CRC-32 and the size of every byte written: the
    checksum `outputs` records at publication (`verify` recomputes it), at no extra read of the file."""

    def __init__(self, path: Path, handles: _Handles):
        self.path = path
        self.handles = handles
        self.file = None
        self.created = False  # the file is made by the first write (or by `sync` when nothing was written)
        self.crc = 0
        self.size = 0

    def write(self, data) -> int:
        self.crc = _crc32(data, self.crc)
        self.size += len(data)
        self.handles.write(self, data)
        return len(data)

    def flush(self) -> None:
        pass  # every write goes to the file (or to the buffer `close` flushes)

    def close(self) -> None:
        self.handles.close(self)

    def sync(self) -> None:
        """Close, then make the file's data durable (fsync through a fresh descriptor: same inode)."""
        self.close()
        if not self.created:
            open(self.path, "wb").close()
            self.created = True
        fsync_path(self.path)


def file_checksum(path) -> tuple[int, str]:
    """(size, "crc32:<8 hex>") of a file, read in 1 MiB chunks: what `verify` compares with the ledger."""
    crc, size = 0, 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            crc = _crc32(chunk, crc)
            size += len(chunk)
    return size, f"crc32:{crc:08x}"


class OutputWriter:
    """One output file written to a hidden temp name beside its final path, renamed by `publish`.

    FASTQ entries are gathered into ~256 KiB chunks, compressed (fastq.gz: ISA-L's gzip) and written
    by the `Background` thread. BAM, with ISA-L: htslib writes level-0 (stored) BGZF blocks to an
    in-memory scratch file; every ~256 KiB they are taken out and deflated one for one by ISA-L
    into the temp file (~5x htslib's zlib at level 1), in the background.
    """

    fds_per_writer = 2  # BAM: the scratch file and htslib's duplicate of it (temp files: `_Handles`)

    def __init__(self, final: Path, emit: str, template: pysam.AlignmentFile, background: Background):
        if final.parent not in background.folders:
            final.parent.mkdir(parents=True, exist_ok=True)
            background.folders.add(final.parent)
        self.final = final
        self.tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        self.background = background
        self.size, self.checksum = 0, None  # of the finished file, once closed
        self.bam = self.raw = self.stream = self.scratch = None
        self.chunk: list[bytes] = []
        self.unflushed = 0  # bytes given to `write` since the last chunk was handed over
        self.tail = b""  # what `finish` left for `sync` to write: the last partial chunk, the last BGZF blocks
        if emit == "bam" and _deflate is None:
            self.bam = pysam.AlignmentFile(str(self.tmp), "wb", template=template,
                                           format_options=[f"level={COMPRESS_LEVEL}".encode()])
            return
        self.raw = _Tallied(self.tmp, background.handles)
        self.stream = self.raw
        if emit == "bam":
            self.scratch, self.drained, self.pending = _scratch_fd(), 0, bytearray()
            try:
                self.bam = pysam.AlignmentFile(self.scratch, "wb0", template=template)
            except BaseException:
                os.close(self.scratch)
                self.raw.close()
                raise
        elif emit == "fastq.gz":
            self.stream = (_gzip or gzip).GzipFile(filename="", mode="wb", fileobj=self.raw,
                                                   compresslevel=COMPRESS_LEVEL, mtime=0)

    def write(self, record: pysam.AlignedSegment) -> None:
        if self.bam is not None:
            written = self.bam.write(record)
            if self.scratch is not None:
                self.unflushed += written
                self.background.buffered += written
                if self._chunk_full():
                    self._drain()
        else:
            entry = fastq_entry(record)
            self.chunk.append(entry)
            self.unflushed += len(entry)
            self.background.buffered += len(entry)
            if self._chunk_full():
                self._flush_chunk()

    def _chunk_full(self) -> bool:
        return self.unflushed >= _CHUNK or (self.background.buffered > BUFFERED_LIMIT
                                            and self.unflushed >= _CHUNK // 16)

    def _flush_chunk(self) -> None:
        if self.chunk:
            self.background.submit(self.stream.write, b"".join(self.chunk))
        self._handed_over()
        self.chunk = []

    def _drain(self) -> None:
        """Hand the whole BGZF blocks htslib has written to the scratch file so far to the background."""
        blocks = self._take_blocks()
        if blocks:
            self.background.submit(self._deflate_blocks, blocks)

    def _take_blocks(self) -> bytes:
        """The whole BGZF blocks htslib has written to the scratch file since the last call."""
        self._handed_over()
        size = os.fstat(self.scratch).st_size
        while self.drained < size:
            chunk = os.pread(self.scratch, size - self.drained, self.drained)
            if not chunk:
                raise OSError(f"short read from the BAM scratch file of {self.tmp}")
            self.pending += chunk
            self.drained += len(chunk)
        os.ftruncate(self.scratch, 0)  # frees it; htslib appends at its own offset (a hole before)
        pos = 0
        while len(self.pending) - pos >= _BGZF_HEADER:
            end = pos + int.from_bytes(self.pending[pos + 16:pos + 18], "little") + 1
            if end > len(self.pending):
                break
            pos = end
        blocks = bytes(self.pending[:pos])
        del self.pending[:pos]
        return blocks

    def _handed_over(self) -> None:
        self.background.buffered -= self.unflushed
        self.unflushed = 0

    def _deflate_blocks(self, stored: bytes) -> None:
        blocks, pos = [], 0
        with memoryview(stored) as view:
            while pos < len(view):
                end = pos + int.from_bytes(view[pos + 16:pos + 18], "little") + 1
                blocks.append(_redeflate(view[pos:end]))
                pos = end
        self.raw.write(b"".join(blocks))

    def finish(self) -> None:
        """The end of the input: what is left to write (the last partial chunk; for BAM, htslib's last blocks)
        is kept as `tail` for `sync`, not handed to the background one small job per output (a barcoded
        split has hundreds: each hand-over costs a thread switch). Then, once the background has drained
        (`Background.wait`), `sync` makes the file complete and durable."""
        if self.raw is None:
            self.bam.close()
            return
        if self.scratch is not None:
            try:
                self.bam.close()
                self.tail = self._take_blocks()
                if self.pending:
                    raise OSError(f"htslib left a partial BGZF block for {self.tmp}")
            finally:
                os.close(self.scratch)
                self.scratch = None
        else:
            self.tail = b"".join(self.chunk)
            self._handed_over()
        self.chunk = []

    def sync(self) -> None:
        """After `finish` and the background's drain: the tail, the gzip trailer, fsync, size and checksum.
        Writers of one split may sync in parallel (`sync_all`; compression and writes release the GIL)."""
        if self.raw is None:
            fsync_path(self.tmp)
            self.size, self.checksum = file_checksum(self.tmp)
            return
        if self.tail:
            tail, self.tail = self.tail, b""
            if self.bam is not None:
                self._deflate_blocks(tail)
            else:
                self.stream.write(tail)
        if self.stream is not self.raw:
            self.stream.close()  # the gzip trailer, written to the temp file
        self.raw.sync()
        self.size, self.checksum = self.raw.size, f"crc32:{self.raw.crc:08x}"

    def close(self) -> None:
        """`finish`, the background's drain and `sync` for this one output."""
        self.finish()
        self.background.wait()
        self.sync()

    def publish(self) -> Path:
        os.replace(self.tmp, self.final)
        return self.final

    def discard(self) -> None:
        """Drop the output unfinished: close what is open (background stopped first), remove the temp file."""
        for handle in (self.stream, self.bam, self.raw):
            try:
                if handle is not None:
                    handle.close()
            except Exception:
                pass
        if self.scratch is not None:
            os.close(self.scratch)
            self.scratch = None
        self.tmp.unlink(missing_ok=True)


def sync_all(outputs) -> None:
    """`sync()` every finished output (the fsyncs dominate a barcoded split), SYNC_THREADS at a time."""
    parallel([out.sync for out in outputs])


def parallel(calls) -> None:
    """Run the calls SYNC_THREADS at a time (fsyncs: they wait on the disk or the file server, not the CPU);
    the first exception is raised once all have ended."""
    calls = list(calls)
    if len(calls) < 2:
        for call in calls:
            call()
        return
    with ThreadPoolExecutor(min(SYNC_THREADS, len(calls)), thread_name_prefix="ledgerbc-sync") as pool:
        for future in [pool.submit(call) for call in calls]:
            future.result()
