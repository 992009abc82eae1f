"""BGZF, the block gzip of BAM files (SAM/BAM specification 4.1): the few facts the splitter (a dorado BAM
before htslib opens it) and `finalize`'s concatenation (concat.py) both read, without inflating anything."""
from __future__ import annotations

import errno
import os
import struct

MAGIC = b"\x1f\x8b\x08\x04"  # gzip, deflate, FEXTRA set: the first bytes of every BGZF block
# The BGZF end-of-file marker: an empty block (SAM/BAM spec 4.1.2).
BGZF_EOF = bytes.fromhex("1f8b08040000000000ff0600424302001b0003000000000000000000")
HEAD = 18 + 64  # bytes to read at a block's start to see its size field (a BC subfield after others)


def block_size(head: bytes) -> int | None:
    """The total size of the BGZF block whose first bytes are `head` (its BC extra subfield holds BSIZE,
    the size - 1), or None when `head` is not the start of a BGZF block or holds no BC subfield."""
    if len(head) < 18 or head[:4] != MAGIC:
        return None
    xlen = struct.unpack_from("<H", head, 10)[0]
    pos, end = 12, 12 + xlen
    while pos + 4 <= min(end, len(head)):
        slen = struct.unpack_from("<H", head, pos + 2)[0]
        if head[pos:pos + 2] == b"BC" and slen == 2 and pos + 6 <= len(head):
            return struct.unpack_from("<H", head, pos + 4)[0] + 1
        pos += 4 + slen
    return None


def check_framing(path) -> None:
    """Raise OSError (EIO) unless `path` is a chain of BGZF blocks that ends exactly at the file's end with
    the EOF block: what a BAM that its writer finished is. Reads each block's header only (one `pread` per
    block of up to 64 KiB)."""
    def damaged(offset: int, what: str) -> OSError:
        return OSError(errno.EIO, f"not a complete BAM: {what} at byte {offset}", str(path))

    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        offset = 0
        last = b""
        while offset < size:
            head = os.pread(fd, HEAD, offset)
            if len(head) < 18 or head[:4] != MAGIC:
                raise damaged(offset, "no BGZF block header")
            xlen = struct.unpack_from("<H", head, 10)[0]
            if 12 + xlen > len(head):
                head = os.pread(fd, 12 + xlen, offset)
            bsize = block_size(head)
            if bsize is None or bsize < 12 + xlen + 8:
                raise damaged(offset, "no BGZF block size")
            if offset + bsize > size:
                raise damaged(offset, "a block cut short (file truncated)")
            if offset + bsize == size:
                last = os.pread(fd, bsize, offset)
            offset += bsize
    finally:
        os.close(fd)
    if last != BGZF_EOF:
        raise OSError(errno.EIO, "no BGZF EOF marker; file may be truncated", str(path))
