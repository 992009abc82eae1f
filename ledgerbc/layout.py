"""Where things live under OUTPUT_DIR (DESIGN §2). Pure path arithmetic, no I/O."""

import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

LEDGER_NAME = "ledgerbc.db"
EMITS = ("fastq", "fastq.gz", "bam")
_ASSIGNED = re.compile(r"^ASSIGNED_(\d+)_(.+)$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
WORKER_ID_OK = re.compile(r"^[A-Za-z0-9._@:+-]+$")


def output_relpath(rel: str, emit: str) -> str:
    """`a/b/x.pod5` -> `a/b/x.fastq` (or `.fastq.gz`, `.bam`): the same name under pass/ and fail/."""
    if emit not in EMITS:
        raise ValueError(f"emit must be one of {', '.join(EMITS)}, not {emit!r}")
    path = PurePosixPath(rel)
    if path.is_absolute() or ".." in path.parts or not path.name:
        raise ValueError(f"not a relative path inside the input folder: {rel!r}")
    stem = rel[: -len(".pod5")] if rel.endswith(".pod5") else rel
    return f"{stem}.{emit}"


@dataclass(frozen=True)
class Layout:
    output: Path

    @property
    def default_ledger(self) -> Path:
        return self.output / LEDGER_NAME

    @property
    def pass_dir(self) -> Path:
        return self.output / "pass"

    @property
    def fail_dir(self) -> Path:
        return self.output / "fail"

    @property
    def work(self) -> Path:
        return self.output / "work"

    @property
    def staging_root(self) -> Path:
        return self.work / "staging"

    @property
    def logs(self) -> Path:
        return self.output / "logs"

    def pass_path(self, rel: str, emit: str) -> Path:
        return self.pass_dir / output_relpath(rel, emit)

    def fail_path(self, rel: str, emit: str) -> Path:
        return self.fail_dir / output_relpath(rel, emit)

    def assigned(self, batch_id: int, worker_id: str) -> Path:
        return self.work / f"ASSIGNED_{batch_id}_{worker_id}"

    def staging(self, batch_id: int) -> Path:
        return self.staging_root / str(batch_id)

    def log(self, batch_id: int) -> Path:
        return self.logs / f"{batch_id}.log"

    def assigned_dirs(self):
        """Yield (batch id, worker id, path) for every ASSIGNED_ folder in the work tree."""
        if not self.work.is_dir():
            return
        for entry in self.work.iterdir():
            m = _ASSIGNED.match(entry.name)
            if m and entry.is_dir():
                yield int(m.group(1)), m.group(2), entry

    def assigned_dirs_for(self, batch_id: int) -> list[Path]:
        return [path for b, _w, path in self.assigned_dirs() if b == batch_id]


def link_name(index: int, rel: str) -> str:
    """A link name unique within its batch and safe as a BAM tag value and on dorado's command line."""
    base = _UNSAFE.sub("_", rel.rsplit("/", 1)[-1])
    return f"{index:05d}_{base}"
