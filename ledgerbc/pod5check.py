"""Is a pod5 file complete and readable? (DESIGN §5)

A pod5 file starts and ends with the same 8-byte signature; the writer puts the end one last. While
MinKNOW (or `pod5.Writer`) writes a file, it is empty or short and hidden `.<file_identifier>.tmp-*`
files lie beside it.
"""

import os
from dataclasses import dataclass
from pathlib import Path

SIGNATURE = b"\x8bPOD\r\n\x1a\n"


class NotComplete(Exception):
    """Still being written or truncated: the signature is missing at one end."""


class Unreadable(Exception):
    """Complete on the outside, but the pod5 library cannot read it."""


@dataclass
class Pod5Info:
    read_count: int
    file_identifier: str
    run_info: object = None  # chemistry.FileRunInfo: the run-info keys of every read group, signal samples


def has_signatures(path: Path, size: int | None = None) -> bool:
    size = os.path.getsize(path) if size is None else size
    if size < 2 * len(SIGNATURE):
        return False
    with open(path, "rb") as fh:
        head = fh.read(len(SIGNATURE))
        fh.seek(-len(SIGNATURE), os.SEEK_END)
        tail = fh.read(len(SIGNATURE))
    return head == SIGNATURE and tail == SIGNATURE


def inspect(path: Path, size: int | None = None) -> Pod5Info:
    """Read count, file identifier and run info of a complete pod5; NotComplete or Unreadable otherwise."""
    if not has_signatures(path, size):
        raise NotComplete(
            "not a complete pod5 file (no pod5 signature at its start and end): still being written, "
            "truncated, or not pod5"
        )
    import pod5  # slow import: only when a file is really inspected

    from .chemistry import run_info_of

    try:
        with pod5.Reader(path) as reader:
            count = reader.num_reads
            identifier = str(reader.file_identifier)
            run_info = run_info_of(reader)
    except Exception as exc:  # the pod5 library raises many types for a damaged file
        raise Unreadable(f"pod5 cannot read it: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    return Pod5Info(read_count=count, file_identifier=identifier, run_info=run_info)


def writer_tmp_identifier(name: str) -> str | None:
    """The file identifier in a writer's temporary file name `.<identifier>.tmp-<what>`, else None."""
    if name.startswith(".") and ".tmp-" in name:
        return name[1:].split(".tmp-", 1)[0]
    return None


def read_ids(path: Path) -> list[str]:
    """Every read id in a pod5 file."""
    import pod5

    with pod5.Reader(path) as reader:
        return [str(r) for r in reader.read_ids]
