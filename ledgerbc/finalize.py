"""`ledgerbc finalize`: one product per sample from the published outputs, the merged summary, the report.

Per sample (the `<barcode>` folder name — the sample sheet's alias, `barcodeNN`, `unclassified` — or `all`
for an unbarcoded study) it writes `final/<sample>.pass.<emit>` and `final/<sample>.fail.<emit>` (the
second empty when the sample has no failing read), then `final/sequencing_summary.txt` and
`final/report.html` (DESIGN §7). Inputs are the outputs of done files as the `outputs` table records them,
in input path order, so a rerun over the same done files gives byte-identical products; a done file
without `outputs` rows (a ledger from before they were recorded, or rebuilt from the files) contributes
its outputs found on disk (`Layout.outputs_of`: pass/, fail/, per <barcode> folder when barcoded, summary/). Nothing is decompressed (concat.py).

Each product is written to a hidden temp name in final/, fsynced, and renamed over the old one, so an
interrupted finalize leaves every product either as it was or complete and new. The ledger is only read
(one transaction); everything under final/ is derived from it and the published outputs.
"""
from __future__ import annotations

import fcntl
import os
import re
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa

from . import concat, models
from .durable import fsync_dir
from .errors import LockTimeout, NotFinished, OutputDamaged
from .layout import SUMMARY_COLUMNS, Layout, output_relpath
from .units import format_size

SUMMARY_NAME = "sequencing_summary.txt"
REPORT_NAME = "report.html"
UNBARCODED = "all"
UNFINISHED = (models.PENDING, models.CLAIMED, models.WAITING)
LIST_LIMIT = 50  # missing files printed by --partial
COPY_SWITCH_INTERVAL = 0.0001  # s: the GIL switch interval while the copies and the report run together
_TEMP = re.compile(r"^\..+\.tmp-\d+-[0-9a-f]{8}$")
_SAMPLE_OK = re.compile(r"^[^/\0.][^/\0]*$")


@dataclass
class Piece:
    """One published output that goes into a product."""

    rel: str            # the input's path relative to INPUT_DIR
    sample: str
    kind: str           # pass | fail | summary
    path: Path
    size: int = 0
    recorded_size: int | None = None  # its size when published (`outputs.bytes`), when recorded


@dataclass
class Plan:
    """What finalize will concatenate, read from the ledger in one transaction."""

    emit: str
    final: Path
    counts: dict[str, int]
    unfinished: list[str]
    pieces: list[Piece]
    without_summary: int = 0

    def products(self) -> dict[str, dict[str, list[Piece]]]:
        """{sample: {"pass": [...], "fail": [...]}} in sample-name order, pieces in input path order."""
        out: dict[str, dict[str, list[Piece]]] = {}
        for p in self.pieces:
            if p.kind != models.SUMMARY:
                out.setdefault(p.sample, {models.PASS: [], models.FAIL: []})[p.kind].append(p)
        return dict(sorted(out.items()))

    @property
    def summaries(self) -> list[Piece]:
        return [p for p in self.pieces if p.kind == models.SUMMARY]


@dataclass
class Product:
    path: Path
    inputs: int | None  # published outputs concatenated into it (None: the report)
    size: int

    def line(self) -> str:
        made_of = f"{self.inputs} outputs, " if self.inputs is not None else ""
        return f"{self.path}: {made_of}{format_size(self.size)}"


@dataclass
class FinalizeResult:
    products: list[Product] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # files not basecalled yet (--partial)
    copied_bytes: int = 0  # published outputs copied into the products
    copy_seconds: float = 0.0  # wall time of those copies (products and summary, fsyncs included)

    def lines(self) -> list[str]:
        rate = self.copied_bytes / self.copy_seconds if self.copy_seconds > 0 else 0.0
        return [p.line() for p in self.products] + [
            f"copied {format_size(self.copied_bytes)} in {self.copy_seconds:.1f} s ({format_size(rate)}/s)"]


def plan(ledger, partial: bool = False) -> Plan:
    """Read what to finalize; NotFinished (exit 12) while files are unfinished, unless `partial`."""
    settings = ledger.read_settings()
    output = Path(settings.output_dir)
    emit = settings.emit

    def txn(conn):
        f, o = models.Pod5File, models.Output
        counts = dict(conn.execute(sa.select(f.state, sa.func.count()).group_by(f.state)).all())
        waiting = sum(counts.get(s, 0) for s in UNFINISHED)
        if waiting and not partial:
            detail = ", ".join(f"{counts[s]} {s}" for s in UNFINISHED if counts.get(s))
            raise NotFinished(
                f"{waiting} files are not basecalled yet ({detail}). Wait until `ledgerbc status` shows none, "
                "or run `ledgerbc finalize --partial` for products of the done files only."
            )
        unfinished = conn.execute(
            sa.select(f.rel_path).where(f.state.in_(UNFINISHED)).order_by(f.rel_path)).scalars().all()
        recorded = conn.execute(
            sa.select(f.rel_path, o.kind, o.barcode, o.path, o.bytes).join(o, o.file_id == f.id)
            .where(f.state == models.DONE).order_by(f.rel_path, o.kind, o.barcode, o.path)
        ).all()
        unrecorded = conn.execute(
            sa.select(f.rel_path).where(f.state == models.DONE, ~sa.exists().where(o.file_id == f.id))
            .order_by(f.rel_path)
        ).scalars().all()
        return counts, unfinished, recorded, unrecorded

    counts, unfinished, recorded, unrecorded = ledger.transact(txn)
    pieces, seen = [], set()
    for rel, kind, barcode, path, size in recorded:
        if path in seen:
            continue
        seen.add(path)
        sample = barcode or UNBARCODED
        if not _SAMPLE_OK.match(sample):
            raise OutputDamaged(f"the ledger names the sample folder {sample!r}, which cannot be a file name. "
                                "Run `ledgerbc verify`.")
        pieces.append(Piece(rel, sample, kind, output / path, recorded_size=size))
    # Done files the ledger has no `outputs` rows for (published before they were recorded, or a ledger
    # rebuilt from the files): their outputs on disk, by layout (per <barcode> folder in a barcoded study).
    layout = Layout(output)
    barcodes = layout.barcode_dirs() if unrecorded and settings.kit_name else []
    without_summary = 0
    for rel in unrecorded:
        found = layout.outputs_of(rel, emit, barcodes, flat=not settings.kit_name)
        if not found:
            raise _missing(layout.pass_path(rel, emit), rel)
        name = output_relpath(rel, emit)
        for path in found:
            kind = path.relative_to(output).parts[0]
            if kind == models.SUMMARY:
                pieces.append(Piece(rel, UNBARCODED, models.SUMMARY, path))
                continue
            inside = path.relative_to(output / kind)
            pieces.append(Piece(rel, UNBARCODED if inside.as_posix() == name else inside.parts[0], kind, path))
        without_summary += layout.summary_path(rel) not in found
    if unrecorded and recorded:
        pieces.sort(key=lambda p: (p.rel, p.kind, p.sample, str(p.path)))
    return Plan(emit=emit, final=layout.final_dir, counts=counts, unfinished=unfinished, pieces=pieces,
                without_summary=without_summary)


def _missing(path: Path, rel: str) -> OutputDamaged:
    return OutputDamaged(f"{path} (an output of the done input {rel}) is missing. Run `ledgerbc verify`, then "
                         "`ledgerbc recover` to queue its input again.")


def _stat_all(plan: Plan) -> None:
    """Every input must be in place, as published, before anything is written (fail fast, not half-way)."""
    for p in plan.pieces:
        try:
            p.size = os.stat(p.path).st_size
        except FileNotFoundError:
            raise _missing(p.path, p.rel) from None
        if p.recorded_size is not None and p.size != p.recorded_size:
            raise OutputDamaged(f"{p.path} has {p.size} bytes, {p.recorded_size} when it was published: a published "
                                "output never changes. Run `ledgerbc verify`.")


class _Progress:
    def __init__(self, callback, total: int):
        self.callback, self.total, self.done = callback, total, 0

    def __call__(self, n: int) -> None:
        self.done += n
        if self.callback:
            self.callback(self.done, self.total)


def _lock(final: Path) -> int:
    fd = os.open(final / ".finalize.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise LockTimeout(f"another `ledgerbc finalize` is writing {final}. Wait for it to end.") from None
    return fd


def _remove_stale_temps(final: Path) -> None:
    """Temp files of an interrupted finalize (we hold the finalize lock: no other one is writing)."""
    for entry in os.scandir(final):
        if _TEMP.match(entry.name):
            Path(entry.path).unlink(missing_ok=True)


def _rename_into_place(tmp: Path, final_path: Path) -> None:
    os.replace(tmp, final_path)  # the folder is fsynced once, after the last product (`finalize`)


def _drop_cached(fd: int) -> None:
    """Let the kernel drop a written and fsynced product's pages: nobody reads it on this node now, and GBs of
    it in the page cache evict the inputs still to be copied (bench/finalize.py, 3.3 GB of fastq: copies
    2.7-8.4 s with its pages kept, 1.1-1.2 s without; cat 3.0-3.1 s)."""
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def write_product(final_path: Path, fill, progress=None) -> int:
    """Write a product through `fill(copier)` to a temp name beside `final_path`, fsync, rename; its size."""
    tmp = final_path.with_name(f".{final_path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        fill(concat.Copier(fd, progress))
        os.fsync(fd)
        _drop_cached(fd)
        size = os.fstat(fd).st_size
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    _rename_into_place(tmp, final_path)
    return size


def finalize(ledger, partial: bool = False, progress=None) -> FinalizeResult:
    """Write the per-sample products, sequencing_summary.txt and report.html under OUTPUT_DIR/final.

    Refuses (NotFinished, exit 12) while files are pending, claimed or waiting, unless `partial`; then
    the result lists them. `progress(done_bytes, total_bytes)` is called as data is copied.
    """
    p = plan(ledger, partial)
    result = FinalizeResult(missing=list(p.unfinished))
    if p.unfinished:
        shown = "; ".join(p.unfinished[:LIST_LIMIT])
        more = f" and {len(p.unfinished) - LIST_LIMIT} more" if len(p.unfinished) > LIST_LIMIT else ""
        result.warnings.append(
            f"partial products: {len(p.unfinished)} files are not basecalled yet and are missing from them: "
            f"{shown}{more}. Run `ledgerbc finalize` again once `ledgerbc status` shows none pending."
        )
    failed = p.counts.get(models.FAILED, 0)
    if failed:
        result.warnings.append(f"{failed} failed files are not in the products (`ledgerbc status` lists them, "
                               "`ledgerbc retry --all-failed` queues them again).")
    if p.without_summary:
        result.warnings.append(f"{p.without_summary} done files have no summary/ file (published by an older "
                               f"ledgerbc): {SUMMARY_NAME} lacks their reads.")
    _stat_all(p)
    p.final.mkdir(parents=True, exist_ok=True)
    lock = _lock(p.final)
    from .report import render_report

    # The report is CPU work (SQL, matplotlib) and the copies are the kernel's: build it meanwhile, in a
    # thread (copy_file_range releases the GIL). bench/finalize.py: 1.4 s less on a 0.8 GB study.
    builder = ThreadPoolExecutor(1, thread_name_prefix="ledgerbc-report")
    page = builder.submit(render_report, ledger)
    # The copies make a few system calls per input and take the GIL back after each; with the report's
    # thread CPU-bound meanwhile, each take waits up to Python's switch interval (5 ms): the copies of a
    # 0.8 GB study took 2.1-2.9 s instead of 1.0 s (bench/finalize.py). A short interval while both run.
    switch = sys.getswitchinterval()
    sys.setswitchinterval(min(switch, COPY_SWITCH_INTERVAL))
    try:
        _remove_stale_temps(p.final)
        started = time.monotonic()
        moved = _Progress(progress, sum(piece.size for piece in p.pieces))
        for sample, kinds in p.products().items():
            result.products += _write_sample(p, sample, kinds, moved)
        summaries = [piece.path for piece in p.summaries]
        default = ("\t".join(SUMMARY_COLUMNS) + "\n").encode()  # when no input has a summary yet
        path = p.final / SUMMARY_NAME
        size = write_product(path, lambda c: concat.append_summaries(c, summaries, default), moved)
        result.products.append(Product(path, len(summaries), size))
        result.copied_bytes, result.copy_seconds = moved.total, time.monotonic() - started
        sys.setswitchinterval(switch)
        html = page.result().encode("utf-8")
        path = p.final / REPORT_NAME
        result.products.append(Product(path, None, write_product(path, lambda c: c.write(html))))
        fsync_dir(p.final)  # one journal commit for every rename (a crash before it keeps old products)
    finally:
        sys.setswitchinterval(switch)
        builder.shutdown(wait=True, cancel_futures=True)
        os.close(lock)
    return result


def _write_sample(p: Plan, sample: str, kinds: dict[str, list[Piece]], progress) -> list[Product]:
    products = []
    header = bams = None
    if p.emit == "bam":  # one header for both products of the sample (a superset of their read groups)
        header = concat.MergedHeader()
        bams = {}
        for piece in kinds[models.PASS] + kinds[models.FAIL]:
            bams[piece.path] = bam = concat.read_bam_header(piece.path)
            header.add(bam)
    for kind in (models.PASS, models.FAIL):
        pieces = kinds[kind]
        path = p.final / f"{sample}.{kind}.{p.emit}"
        if p.emit == "bam":
            def fill(copier, pieces=pieces):
                concat.write_bam(copier, [bams[piece.path] for piece in pieces], header)
        elif p.emit == "fastq.gz" and not pieces:
            def fill(copier):
                copier.write(concat.EMPTY_GZIP)  # an empty product must still be a gzip file
        else:
            def fill(copier, pieces=pieces):
                concat.append_files(copier, [piece.path for piece in pieces])
        products.append(Product(path, len(pieces), write_product(path, fill, progress)))
    return products
