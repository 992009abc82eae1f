"""Concatenating published outputs into one file without decompressing them (what `finalize` writes).

- FASTQ and gzipped FASTQ: the files' bytes, one after the other (a gzip file may hold many members;
  every gzip reader reads them all, `gzip -t` tests them all).
- BAM: a BAM file is a header followed by records, all inside a chain of BGZF blocks (each block a
  gzip member of at most 64 KiB of data) ending with an empty EOF block. The product gets ONE header,
  merged from its inputs' headers (`MergedHeader`), written as BGZF blocks of its own; then each input's
  blocks after its header are copied raw, minus its EOF block; then one EOF block. htslib flushes the
  header into its own block(s) (`bam_hdr_write` ends with `bgzf_flush`), and so do our writers (htslib
  writes, ISA-L re-deflates block for block), so the copy starts at a block boundary; a header that
  shares its last block with records (another writer) has only that block's records re-compressed,
  as `samtools cat` does.

Copies use `copy_file_range` (in-kernel; a reflink on filesystems that share extents), then `sendfile`,
then a read/write loop with a large buffer where the kernel refuses both (e.g. across filesystems on old
kernels): I/O-bound like `cat`, which does the same (bench/finalize.py).
"""
from __future__ import annotations

import errno
import gzip
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from .bgzf import BGZF_EOF, HEAD, MAGIC, block_size
from .errors import OutputDamaged

try:  # ISA-L inflates/deflates the few header blocks faster; zlib gives the same bytes' meaning
    from isal import isal_zlib as _zlib
except ImportError:  # pragma: no cover - a dependency
    _zlib = zlib

COPY_CHUNK = 1 << 30  # bytes per copy_file_range/sendfile call
BUFFER = 8 << 20  # the read/write fallback's buffer
_BGZF_MAX_DATA = 0xFF00  # uncompressed bytes per block, as htslib (BGZF_BLOCK_SIZE)
_HEADER_LEVEL = 6  # the merged header is small: compress it well
EMPTY_GZIP = gzip.compress(b"", mtime=0)  # a product with no input is still a gzip file


# -- raw copies -------------------------------------------------------------------------------------------
class Copier:
    """Copies byte ranges of files to one output descriptor, with the fastest call the kernel accepts."""

    def __init__(self, out_fd: int, progress=None):
        self.out_fd = out_fd
        self.progress = progress  # progress(n) after every chunk copied
        self.mode = "copy_file_range" if hasattr(os, "copy_file_range") else "sendfile"

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self.out_fd, view)
            view = view[n:]

    def copy(self, src_fd: int, offset: int, count: int, name) -> None:
        """Append `count` bytes of `src_fd` from `offset` to the output."""
        while count > 0:
            n = self._copy_some(src_fd, offset, min(count, COPY_CHUNK))
            if n == 0:
                raise OutputDamaged(
                    f"{name} became shorter while finalize read it. An output must never change once published: "
                    "run `ledgerbc verify`."
                )
            offset += n
            count -= n
            if self.progress:
                self.progress(n)

    def _copy_some(self, src_fd: int, offset: int, count: int) -> int:
        if self.mode == "copy_file_range":
            try:
                return os.copy_file_range(src_fd, self.out_fd, count, offset)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF,
                                     errno.ETXTBSY, errno.EPERM):
                    raise
                self.mode = "sendfile"
        if self.mode == "sendfile":
            try:
                return os.sendfile(self.out_fd, src_fd, offset, count)
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
                self.mode = "read"
        data = os.pread(src_fd, min(count, BUFFER), offset)
        self.write(data)
        return len(data)


def open_output(path) -> int:
    return os.open(path, os.O_RDONLY | os.O_CLOEXEC)


def append_files(copier: Copier, paths) -> None:
    """FASTQ, FASTQ.gz: every file's bytes, in order."""
    for path in paths:
        fd = open_output(path)
        try:
            copier.copy(fd, 0, os.fstat(fd).st_size, path)
        finally:
            os.close(fd)


# -- BGZF and the BAM header ----------------------------------------------------------------------------
def _block_size(head: bytes, name) -> int:
    """The total size of the BGZF block whose first bytes are `head` (its BC extra subfield: BSIZE+1)."""
    if len(head) < 18 or head[:4] != MAGIC:
        raise OutputDamaged(f"{name} is not a BGZF-compressed BAM file. Run `ledgerbc verify`.")
    size = block_size(head)
    if size is None:
        raise OutputDamaged(f"{name} has a gzip block without a BGZF size field. Run `ledgerbc verify`.")
    return size


def _inflate_block(block: bytes, name) -> bytes:
    xlen = struct.unpack_from("<H", block, 10)[0]
    try:
        data = _zlib.decompress(block[12 + xlen:-8], -15)
    except Exception as exc:
        raise OutputDamaged(f"{name}: a damaged BGZF block ({exc}). Run `ledgerbc verify`.") from None
    if len(data) != struct.unpack_from("<I", block, len(block) - 4)[0]:
        raise OutputDamaged(f"{name}: a BGZF block of the wrong size. Run `ledgerbc verify`.")
    return data


def bgzf_blocks(data: bytes) -> bytes:
    """`data` as BGZF blocks of at most 0xff00 bytes each (no EOF block)."""
    out = []
    for pos in range(0, len(data), _BGZF_MAX_DATA):
        chunk = data[pos:pos + _BGZF_MAX_DATA]
        comp = zlib.compressobj(_HEADER_LEVEL, zlib.DEFLATED, -15)
        deflated = comp.compress(chunk) + comp.flush()
        header = b"\x1f\x8b\x08\x04\x00\x00\x00\x00\x00\xff\x06\x00BC\x02\x00"
        out.append(header + struct.pack("<H", 18 + len(deflated) + 8 - 1) + deflated
                   + struct.pack("<II", zlib.crc32(chunk) & 0xFFFFFFFF, len(chunk)))
    return b"".join(out)


@dataclass
class BamInput:
    """A BAM output as finalize sees it: its header, and where its records' blocks start."""

    path: Path
    size: int
    text: str                # the header's SAM text
    refs: bytes              # n_ref and the binary reference list
    body_offset: int         # first byte of the first block after the header's last block
    leftover: bytes = b""    # records that shared the header's last block (re-compressed on copy)
    body_end: int = 0        # where the EOF block starts


def read_bam_header(path) -> BamInput:
    """Read the header of a BAM file block by block, and find where its records start."""
    path = Path(path)
    fd = open_output(path)
    try:
        size = os.fstat(fd).st_size
        if size < len(BGZF_EOF) or os.pread(fd, len(BGZF_EOF), size - len(BGZF_EOF)) != BGZF_EOF:
            raise OutputDamaged(f"{path} is truncated (no BGZF end-of-file block). Run `ledgerbc verify`.")
        data = bytearray()
        offset = 0
        needed = None
        while True:
            if offset >= size:
                raise OutputDamaged(f"{path} ends inside its BAM header. Run `ledgerbc verify`.")
            head = os.pread(fd, HEAD, offset)
            block_size = _block_size(head, path)
            block = os.pread(fd, block_size, offset)
            if len(block) != block_size:
                raise OutputDamaged(f"{path} is truncated inside a BGZF block. Run `ledgerbc verify`.")
            data += _inflate_block(block, path)
            offset += block_size
            needed = _header_length(data, path)
            if needed is not None and len(data) >= needed:
                break
    finally:
        os.close(fd)
    l_text = struct.unpack_from("<i", data, 4)[0]
    text = bytes(data[8:8 + l_text]).split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
    return BamInput(path=path, size=size, text=text, refs=bytes(data[8 + l_text:needed]), body_offset=offset,
                    leftover=bytes(data[needed:]), body_end=size - len(BGZF_EOF))


def _header_length(data: bytearray, name) -> int | None:
    """Bytes of the binary BAM header at the start of `data`, or None if more data is needed to tell."""
    if len(data) < 8:
        return None
    if data[:4] != b"BAM\1":
        raise OutputDamaged(f"{name} is not a BAM file (no BAM magic). Run `ledgerbc verify`.")
    pos = 8 + struct.unpack_from("<i", data, 4)[0]
    if len(data) < pos + 4:
        return None
    n_ref = struct.unpack_from("<i", data, pos)[0]
    pos += 4
    for _ in range(n_ref):
        if len(data) < pos + 4:
            return None
        pos += 4 + struct.unpack_from("<i", data, pos)[0] + 4
        if len(data) < pos:
            return None
    return pos


def _tag(line: str, key: str) -> str | None:
    for part in line.split("\t")[1:]:
        if part.startswith(key + ":"):
            return part[len(key) + 1:]
    return None


@dataclass
class MergedHeader:
    """One header for many BAM files, merged as `samtools cat` does, plus @PG de-duplication.

    The first input gives @HD, @SQ, @CO and every other line; @RG lines are merged by ID (records
    point to their read group by ID: each must be in the header); @PG lines are kept once per program
    and version (each per-input BAM repeats dorado's @PG, whose CL names a different batch folder),
    a later one with a taken ID but another version gets the ID `<ID>.<n>`. All inputs must have the
    same reference list (unaligned BAM has none), or their records' reference ids would be wrong.
    """

    first: list[str] = field(default_factory=list)
    rg: dict[str, str] = field(default_factory=dict)
    pg: list[str] = field(default_factory=list)
    pg_ids: dict[str, tuple] = field(default_factory=dict)
    pg_seen: set = field(default_factory=set)
    refs: bytes | None = None
    refs_from: Path | None = None
    inputs: int = 0

    def add(self, bam: BamInput) -> None:
        if self.refs is None:
            self.refs, self.refs_from = bam.refs, bam.path
        elif bam.refs != self.refs:
            raise OutputDamaged(
                f"{bam.path} and {self.refs_from} have different reference sequences (@SQ) and cannot be "
                "concatenated. Outputs of one study should all be unaligned BAM: check --dorado-arg."
            )
        lines = [line for line in bam.text.split("\n") if line]
        first = self.inputs == 0
        self.inputs += 1
        for line in lines:
            kind = line[:3]
            if kind == "@RG":
                self.rg.setdefault(_tag(line, "ID") or "", line)
            elif kind == "@PG":
                self._add_pg(line)
            elif first:
                self.first.append(line)
        if first and not self.first:
            self.first.append("@HD\tVN:1.6\tSO:unknown")

    def _add_pg(self, line: str) -> None:
        key = (_tag(line, "PN"), _tag(line, "VN"), _tag(line, "ID"))
        if key in self.pg_seen:
            return
        self.pg_seen.add(key)
        ident = key[2] or "pg"
        if ident in self.pg_ids:
            n = 1
            while f"{ident}.{n}" in self.pg_ids:
                n += 1
            parts = line.split("\t")
            line = "\t".join(["@PG", f"ID:{ident}.{n}"] + [p for p in parts[1:] if not p.startswith("ID:")])
            ident = f"{ident}.{n}"
        self.pg_ids[ident] = key
        self.pg.append(line)

    def text(self) -> str:
        hd = [line for line in self.first if line.startswith("@HD")]
        rest = [line for line in self.first if not line.startswith("@HD")]
        sq = [line for line in rest if line.startswith("@SQ")]
        other = [line for line in rest if not line.startswith("@SQ")]
        return "".join(line + "\n" for line in hd + sq + self.pg + list(self.rg.values()) + other)

    def binary(self) -> bytes:
        text = self.text().encode("utf-8", "surrogateescape")
        return b"BAM\1" + struct.pack("<i", len(text)) + text + (self.refs or struct.pack("<i", 0))


def append_bam_records(copier: Copier, bam: BamInput) -> None:
    """The records of one BAM input, as raw BGZF blocks (its EOF block left out)."""
    if bam.leftover:
        copier.write(bgzf_blocks(bam.leftover))
    fd = open_output(bam.path)
    try:
        if os.fstat(fd).st_size != bam.size:
            raise OutputDamaged(f"{bam.path} changed while finalize read it. Run `ledgerbc verify`.")
        copier.copy(fd, bam.body_offset, bam.body_end - bam.body_offset, bam.path)
    finally:
        os.close(fd)


def write_bam(copier: Copier, inputs: list[BamInput], header: MergedHeader) -> None:
    copier.write(bgzf_blocks(header.binary()))
    for bam in inputs:
        append_bam_records(copier, bam)
    copier.write(BGZF_EOF)


# -- sequencing summaries ---------------------------------------------------------------------------------
def first_line(fd: int, name) -> bytes:
    """The first line of a file, newline included (a summary's header)."""
    head = b""
    while b"\n" not in head:
        more = os.pread(fd, 65536, len(head))
        if not more:
            raise OutputDamaged(f"{name} has no header line. Run `ledgerbc verify`.")
        head += more
    return head[: head.index(b"\n") + 1]


def append_summaries(copier: Copier, paths, default_header: bytes) -> None:
    """Summary files with one header line: the first file's; every other file must have the same."""
    header = None
    for path in paths:
        fd = open_output(path)
        try:
            line = first_line(fd, path)
            if header is None:
                header = line
                copier.write(header)
            elif line != header:
                raise OutputDamaged(
                    f"{path} has other columns than the summaries before it and cannot be concatenated. "
                    "Run `ledgerbc verify`."
                )
            copier.copy(fd, len(line), os.fstat(fd).st_size - len(line), path)
        finally:
            os.close(fd)
    if header is None:
        copier.write(default_header)
