"""A finished study laid out by hand exactly as DESIGN §2 says (tests and benchmarks of `finalize`/`report`).

`FinishedStudy.add_input` writes one input's published outputs — `pass/[<barcode>/]<rel>.<emit>`,
`fail/[<barcode>/]<rel>.<emit>` (only when it has failing reads), `summary/<rel>.tsv` with the DESIGN §5
columns — through ledgerbc's own output writers, and records the done file, its batch and one `outputs`
row per file in the ledger, as a publication would. Records carry dorado's tags (`qs`, `fn`, `RG`, `BC`
when barcoded, `st`, `ch`, `mx`, `ns`, `du`); every input's BAM header has dorado's @HD/@PG/@RG lines with
the @PG `CL` of its own batch, as real per-input outputs do. `expected` keeps, per (sample, kind), the
record ids per input: what the final products must hold (`ids`).
"""
from __future__ import annotations

import random
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import pysam
import sqlalchemy as sa

from .. import db, models
from ..layout import SUMMARY_COLUMNS, output_relpath, summary_relpath
from ..settings import Settings
from ..writers import Background, OutputWriter

KIT = "SQK-NBD114-24"
MIN_QSCORE = 9.0
T0 = 1_700_000_000.0


@dataclass
class FinishedStudy:
    output: Path
    emit: str
    barcodes: tuple | None  # the <barcode> folder names, None: unbarcoded
    ledger: db.Ledger = None
    expected: dict = field(default_factory=dict)  # (sample, kind) -> [(rel, [record ids])], see `ids`
    summary_rows: int = 0
    inputs: list = field(default_factory=list)
    _batch: int = 0

    @classmethod
    def create(cls, root, emit: str = "fastq", barcodes=("barcode01", "barcode02", "unclassified"),
               simulated: bool = True) -> "FinishedStudy":
        root = Path(root)
        (root / "input").mkdir(parents=True, exist_ok=True)
        output = root / "output"
        output.mkdir(parents=True, exist_ok=True)
        settings = Settings(input_dir=str(root / "input"), output_dir=str(output), emit=emit, min_qscore=MIN_QSCORE,
                            batch_files=2, batch_bytes=None, simulated=simulated)
        db.create_ledger_file(output / "ledgerbc.db", settings)
        return cls(output=output, emit=emit, barcodes=tuple(barcodes) if barcodes else None,
                   ledger=db.Ledger(output / "ledgerbc.db"))

    def ids(self, sample: str, kind: str) -> list[str]:
        """The record ids a final product of `sample` and `kind` must hold: its inputs' in input path order."""
        return [i for _rel, ids in sorted(self.expected.get((sample, kind), [])) for i in ids]

    def samples(self) -> list[str]:
        return sorted({sample for sample, _kind in self.expected})

    def sample_of(self, barcode: str | None) -> str:
        return barcode if barcode else "all"

    def add_input(self, rel: str, n_reads: int = 30, seed: int | None = None, worker: str = "1_0@node1",
                  state: str = models.DONE, at: float | None = None) -> None:
        """One input `rel` with `n_reads` records; done with its outputs, or only a ledger row in `state`."""
        index = len(self.inputs)
        self.inputs.append(rel)
        at = T0 + 60 * index if at is None else at
        rng = random.Random(seed if seed is not None else index)
        file_row = dict(rel_path=rel, size=1000 + n_reads * 100, mtime_ns=0, read_count=n_reads,
                        file_identifier=str(uuid.UUID(int=rng.getrandbits(128))), state=state, attempts=0,
                        added_at=T0 - 100, chemistry="FLO-PRO114M|SQK-NBD114-24|5000", samples=n_reads * 4000)
        if state != models.DONE:
            if state == models.FAILED:
                file_row.update(attempts=3, last_error="dorado returned no reads for its 30 reads (simulated)")
            self._insert(file_row, None, [])
            return
        self._batch += 1
        batch_id = self._batch
        run_id = f"run{index % 3}"
        model = "dna_r10.4.1_e8.2_400bps_hac@v5.0.0"
        header = pysam.AlignmentHeader.from_text(
            "@HD\tVN:1.6\tSO:unknown\n"
            f"@PG\tID:basecaller\tPN:dorado\tVN:1.1.1+e72f14925\tCL:dorado basecaller hac "
            f"/data/out/work/ASSIGNED_{batch_id}_{worker}\n"
            + "".join(f"@RG\tID:{r}_{model}\tPU:PAS00000\tPL:ONT\tDS:runid={r} basecall_model={model}\n"
                      for r in sorted({run_id, f"run{(index + 1) % 3}"}))
        )
        records: dict[tuple, list] = {}
        summary = ["\t".join(SUMMARY_COLUMNS)]
        bases = reads_pass = reads_fail = 0
        for k in range(n_reads):
            read_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
            barcode = self.barcodes[rng.randrange(len(self.barcodes))] if self.barcodes else None
            length = rng.randrange(50, 3000)
            q = round(rng.uniform(4, 20), 3)
            kind = models.PASS if q >= MIN_QSCORE else models.FAIL
            record = pysam.AlignedSegment(header)
            record.query_name = read_id
            record.flag = 4
            record.query_sequence = "".join(rng.choices("ACGT", k=length))
            record.query_qualities = pysam.qualitystring_to_array(chr(33 + int(q)) * length)
            tags = [("qs", q, "f"), ("ns", length * 10, "i"), ("du", length / 500, "f"), ("ch", 1 + k % 512, "i"),
                    ("mx", 1 + k % 4, "i"), ("st", "2024-01-01T00:00:00.000000+00:00", "Z"), ("fn", f"{index:05d}_x.pod5", "Z"),
                    ("RG", f"{run_id}_{model}", "Z")]
            if barcode and barcode != "unclassified":
                tags.append(("BC", f"{KIT}_{barcode}", "Z"))
            record.set_tags(tags)
            records.setdefault((barcode, kind), []).append(record)
            bases += length
            reads_pass += kind == models.PASS
            reads_fail += kind == models.FAIL
            summary.append("\t".join(str(v) for v in (
                rel, read_id, read_id, run_id, 1 + k % 512, 1 + k % 4, f"{k * 1.5:.3f}", f"{length / 500:.3f}",
                "TRUE" if kind == models.PASS else "FALSE", length, q, length * 10, barcode or "unclassified")))
        outputs = []
        # pass/ for every barcode with any record (empty when all of them failed), fail/ only with failing reads
        groups = sorted({b for b, _k in records}, key=str) or ([] if self.barcodes else [None])
        for barcode in groups:
            for kind in (models.PASS, models.FAIL):
                recs = records.get((barcode, kind), [])
                if kind == models.FAIL and not recs:
                    continue
                folder = f"{kind}/{barcode}" if barcode else kind
                path = f"{folder}/{output_relpath(rel, self.emit)}"
                self._write(self.output / path, header, recs)
                data = (self.output / path).read_bytes()
                outputs.append(dict(kind=kind, barcode=barcode, path=path, reads=len(recs),
                                    bases=sum(r.query_length for r in recs), bytes=len(data),
                                    checksum=f"crc32:{zlib.crc32(data):08x}"))
                self.expected.setdefault((self.sample_of(barcode), kind), []).append((rel, [r.query_name for r in recs]))
        spath = summary_relpath(rel)
        (self.output / spath).parent.mkdir(parents=True, exist_ok=True)
        (self.output / spath).write_text("\n".join(summary) + "\n")
        data = (self.output / spath).read_bytes()
        outputs.append(dict(kind=models.SUMMARY, barcode=None, path=spath, reads=n_reads, bases=bases, bytes=len(data),
                            checksum=f"crc32:{zlib.crc32(data):08x}"))
        self.summary_rows += n_reads
        file_row.update(reads_pass=reads_pass, reads_fail=reads_fail, reads_missing=0, bases=bases, done_at=at,
                        batch_id=batch_id)
        batch = dict(id=batch_id, worker_id=worker, state=models.BATCH_DONE, claimed_at=at - 50, heartbeat_at=at,
                     finished_at=at, n_files=1, n_bytes=file_row["size"], token=uuid.uuid4().hex,
                     chemistry=file_row["chemistry"], model=model, dorado_version="1.1.1+e72f14925", gpus="0")
        self._insert(file_row, batch, outputs)

    def _write(self, path: Path, header, records) -> None:
        scratch = path.parent / f".template-{uuid.uuid4().hex}.bam"
        path.parent.mkdir(parents=True, exist_ok=True)
        with pysam.AlignmentFile(str(scratch), "wb", header=header):
            pass
        template = pysam.AlignmentFile(str(scratch), "rb", check_sq=False)
        background = Background()
        try:
            writer = OutputWriter(path, self.emit, template, background)
            for r in records:
                writer.write(r)
            writer.close()
            writer.publish()
        finally:
            background.shutdown()
            template.close()
            scratch.unlink()

    def _insert(self, file_row: dict, batch: dict | None, outputs: list) -> None:
        def txn(conn):
            if batch:
                conn.execute(sa.insert(models.Batch), [batch])
                workers = conn.execute(sa.select(models.Worker.worker_id)
                                       .where(models.Worker.worker_id == batch["worker_id"])).first()
                if workers is None:
                    conn.execute(sa.insert(models.Worker), [dict(
                        worker_id=batch["worker_id"], host=batch["worker_id"].split("@")[-1], pid=1, device="cuda:all",
                        started_at=batch["claimed_at"], last_seen=batch["finished_at"], state=models.WORKER_EXITED,
                        batches_done=0, dorado_version=batch["dorado_version"], gpus="0")])
            file_id = conn.execute(sa.insert(models.Pod5File).values(**file_row)).inserted_primary_key[0]
            if outputs:
                conn.execute(sa.insert(models.Output),
                             [dict(o, file_id=file_id, batch_id=batch["id"]) for o in outputs])

        self.ledger.transact(txn)

    def set_state(self, rel: str, state: str) -> None:
        self.ledger.transact(lambda conn: conn.execute(
            sa.update(models.Pod5File).where(models.Pod5File.rel_path == rel).values(state=state)))
