"""Where things live under OUTPUT_DIR (DESIGN §2). Pure path arithmetic, no I/O."""

import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

LEDGER_NAME = "ledgerbc.db"
EMITS = ("fastq", "fastq.gz", "bam")
MANIFEST = ".batch.json"  # in an ASSIGNED folder: batch id, fencing nonce, worker, files (rel + identifier)
# summary/<rel>.tsv: dorado's sequencing_summary column names (DESIGN §5)
SUMMARY_COLUMNS = (
    "filename", "read_id", "parent_read_id", "run_id", "channel", "mux", "start_time", "duration",
    "passes_filtering", "sequence_length_template", "mean_qscore_template", "num_samples", "barcode_arrangement",
)
# The <barcode> folder of reads without a barcode; also the `barcode_arrangement` of every summary row of an
# unbarcoded study: pycoQC and NanoPlot take it as "no barcode" (docs/qc-clients.md).
UNCLASSIFIED = "unclassified"
_ASSIGNED = re.compile(r"^ASSIGNED_(\d+)_(.+)$")
_HALF_MADE = re.compile(r"^\.ASSIGNED_(\d+)_.+\.tmp-[^.]*$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
WORKER_ID_OK = re.compile(r"^[A-Za-z0-9._@:+-]+$")


def _stem(rel: str) -> str:
    path = PurePosixPath(rel)
    if path.is_absolute() or ".." in path.parts or not path.name:
        raise ValueError(f"not a relative path inside the input folder: {rel!r}")
    return rel[: -len(".pod5")] if rel.endswith(".pod5") else rel


def output_relpath(rel: str, emit: str) -> str:
    """`a/b/x.pod5` -> `a/b/x.fastq` (or `.fastq.gz`, `.bam`): the same name under pass/ and fail/."""
    if emit not in EMITS:
        raise ValueError(f"emit must be one of {', '.join(EMITS)}, not {emit!r}")
    return f"{_stem(rel)}.{emit}"


def summary_relpath(rel: str) -> str:
    """`a/b/x.pod5` -> `summary/a/b/x.tsv`, relative to OUTPUT_DIR."""
    return f"summary/{_stem(rel)}.tsv"


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

    @property
    def summary_dir(self) -> Path:
        return self.output / "summary"

    @property
    def final_dir(self) -> Path:
        return self.output / "final"

    def pass_path(self, rel: str, emit: str) -> Path:
        return self.pass_dir / output_relpath(rel, emit)

    def fail_path(self, rel: str, emit: str) -> Path:
        return self.fail_dir / output_relpath(rel, emit)

    def summary_path(self, rel: str) -> Path:
        return self.output / summary_relpath(rel)

    def barcode_dirs(self) -> list[str]:
        """Names of the <barcode> folders under pass/ and fail/ (a barcoded study's outputs)."""
        return sorted({e.name for top in (self.pass_dir, self.fail_dir) for e in entries(top) if is_dir(e)})

    def outputs_of(self, rel: str, emit: str, barcodes=None, flat: bool = True) -> list[Path]:
        """Every output file of input `rel` that exists on disk: pass/ and fail/ (unless not `flat`; per
        barcode in `barcodes`), and its summary. File I/O (stat): never under the ledger lock on a big study.
        A study is flat or barcoded, never both: `pass/<a>/<rel>` of a flat study is the output of input
        `<a>/<rel>`, and `pass/<rel>` of a barcoded one may be barcode `<a>`'s output of another input."""
        out = output_relpath(rel, emit)
        candidates = [self.pass_dir / out, self.fail_dir / out] if flat else []
        candidates.append(self.summary_path(rel))
        for barcode in barcodes or ():
            candidates += [self.pass_dir / barcode / out, self.fail_dir / barcode / out]
        return [p for p in candidates if p.is_file()]

    def assigned(self, batch_id: int, worker_id: str) -> Path:
        return self.work / f"ASSIGNED_{batch_id}_{worker_id}"

    def half_made(self, batch_id: int, worker_id: str, token: str) -> Path:
        """Where a batch's ASSIGNED folder is made, under a hidden name, before it is renamed into place."""
        return self.work / f".ASSIGNED_{batch_id}_{worker_id}.tmp-{token}"

    def half_made_dirs(self):
        """Yield (batch id, path) for every ASSIGNED folder still being made, or left half-made by a worker
        that died or met a full disk while making it."""
        for entry in entries(self.work):
            m = _HALF_MADE.match(entry.name)
            if m and is_dir(entry):
                yield int(m.group(1)), Path(entry.path)

    def staging(self, batch_id: int, token: str | None = None) -> Path:
        """A batch's staging folder, `<batch>.<token>`: never shared, even by two batches given the same id
        (a claim lost with the ledger, and one made after its rebuild)."""
        return self.staging_root / (f"{batch_id}.{token}" if token else str(batch_id))

    def staging_dirs(self):
        """Yield (batch id, path) for every batch staging folder."""
        for entry in entries(self.staging_root):
            head = entry.name.split(".", 1)[0]
            if head.isdigit():
                yield int(head), Path(entry.path)

    def log(self, batch_id: int) -> Path:
        return self.logs / f"{batch_id}.log"

    def assigned_dirs(self):
        """Yield (batch id, worker id, path) for every ASSIGNED_ folder in the work tree (complete ones:
        a folder still being made has a hidden temp name)."""
        for entry in entries(self.work):
            m = _ASSIGNED.match(entry.name)
            if m and is_dir(entry):
                yield int(m.group(1)), m.group(2), Path(entry.path)

    def assigned_dirs_for(self, batch_id: int) -> list[Path]:
        return [path for b, _w, path in self.assigned_dirs() if b == batch_id]


def entries(folder: Path) -> list[os.DirEntry]:
    """The entries of a folder, [] when it is missing. On a network filesystem another client may remove a
    folder while it is listed (ESTALE, ENOENT): such a folder is simply gone, never an error."""
    try:
        with os.scandir(folder) as it:
            return list(it)
    except OSError:
        return []


def is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:  # removed meanwhile by another client (ESTALE)
        return False


def link_name(index: int, rel: str) -> str:
    """A link name unique within its batch and safe as a BAM tag value and on dorado's command line."""
    base = _UNSAFE.sub("_", rel.rsplit("/", 1)[-1])
    return f"{index:05d}_{base}"
