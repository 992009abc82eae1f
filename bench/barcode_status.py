"""`status` of a barcoded study: yields per barcode from `barcode_yields` (kept by triggers on `outputs`,
migration 0004) against aggregating the `outputs` rows themselves, and what the triggers cost a publication.

A barcoded ledger of --files files (default 100,000), all done, published 20 files per transaction the
way `claim.publish` records them: per file, a pass output for each of 13 folders (12 barcodes and
`unclassified`), a fail output for ~80% of them, and the summary: ~25 `outputs` rows per file (a 1M-file
study has ~25M). Measured, interleaved:

- `status.report(ledger)` (what `ledgerbc status [--json]` runs), median of 5;
- the GROUP BY over `outputs` that `barcode_yields` replaces (`SELECT barcode, kind, count(*), sum(reads),
  sum(bases) FROM outputs GROUP BY barcode, kind`, in a transaction under the lock), median of 3;
- one publication's inserts (20 files, ~500 rows) with the triggers and, on a copy without them, without.

    .venv/bin/python bench/barcode_status.py [--files 100000] [--dir /tmp]
"""
from __future__ import annotations

import argparse
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _fill import add_files, machine, new_ledger  # noqa: E402

from ledgerbc import models, status  # noqa: E402
from ledgerbc.db import Ledger  # noqa: E402

FOLDERS = [f"barcode{n:02d}" for n in range(1, 13)] + ["unclassified"]
FILES_PER_PUBLICATION = 20
INSERT = ("INSERT INTO outputs (file_id, batch_id, kind, barcode, path, reads, bases, bytes, checksum) "
          "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)")
AGGREGATE = sa.text("SELECT barcode, kind, count(*), sum(reads), sum(bases) FROM outputs "
                    "WHERE barcode IS NOT NULL AND kind IN ('pass', 'fail') GROUP BY barcode, kind")


def publication_rows(first_file: int, rng: random.Random) -> list[tuple]:
    rows = []
    for f in range(first_file, first_file + FILES_PER_PUBLICATION):
        batch = f // FILES_PER_PUBLICATION
        for b in FOLDERS:
            rows.append((f, batch, "pass", b, f"pass/{b}/run/x{f:07d}.fastq", 30, 240_000, 500_000, "crc32:01234567"))
            if rng.random() < 0.8:
                rows.append((f, batch, "fail", b, f"fail/{b}/run/x{f:07d}.fastq", 5, 40_000, 80_000, "crc32:01234567"))
        rows.append((f, batch, "summary", None, f"summary/run/x{f:07d}.tsv", 400, 0, 80_000, "crc32:01234567"))
    return rows


def timed_insert(path: Path, rows: list[tuple]) -> float:
    """One publication's rows in one transaction (fresh connection, synchronous=FULL, as the ledger does)."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA synchronous=FULL")
    t0 = time.perf_counter()
    conn.execute("BEGIN IMMEDIATE")
    conn.executemany(INSERT, rows)
    conn.execute("COMMIT")
    elapsed = time.perf_counter() - t0
    conn.close()
    return elapsed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args(argv)
    print(f"machine: {machine()}")
    rng = random.Random(1)
    with tempfile.TemporaryDirectory(prefix="ledgerbc-barcode-status-", dir=args.dir) as tmp:
        root = Path(tmp)
        path = root / "ledgerbc.db"
        new_ledger(path, root / "in", root / "out", kit_name="SQK-NBD114-24")
        ledger = Ledger(path)
        t0 = time.perf_counter()
        add_files(ledger, [10**9] * args.files)
        conn = sqlite3.connect(path)
        with conn:
            conn.execute("UPDATE pod5_files SET state = 'done', reads_pass = 390, reads_fail = 52, bases = 3600000, "
                         "done_at = added_at")
            for first in range(1, args.files + 1, FILES_PER_PUBLICATION):
                conn.executemany(INSERT, publication_rows(first, rng))
        n_rows = conn.execute("SELECT count(*) FROM outputs").fetchone()[0]
        conn.close()
        print(f"ledger: {args.files:,} files done, {n_rows:,} outputs rows, "
              f"{path.stat().st_size / 1e6:.0f} MB (made in {time.perf_counter() - t0:.0f} s)")

        report_times, aggregate_times = [], []
        for rep in range(5):
            t0 = time.perf_counter()
            data = status.report(ledger)
            report_times.append(time.perf_counter() - t0)
            if rep < 3:
                t0 = time.perf_counter()
                summed = ledger.transact(lambda c: c.execute(AGGREGATE).all())
                aggregate_times.append(time.perf_counter() - t0)
        section = data["barcoding"]
        by_folder = {}
        for barcode, kind, _n, reads, _bases in summed:
            by_folder[barcode] = by_folder.get(barcode, 0) + reads
        assert {e["barcode"]: e["reads"]["total"] for e in section["barcodes"]} == by_folder
        print(f"status.report (barcode_yields): median {statistics.median(report_times):.3f} s over 5 "
              f"(max {max(report_times):.3f})")
        print(f"GROUP BY over outputs (what it replaces): median {statistics.median(aggregate_times):.3f} s over 3")

        bare = root / "no-triggers.db"
        shutil.copyfile(path, bare)
        conn = sqlite3.connect(bare)
        for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall():
            conn.execute(f"DROP TRIGGER {name}")
        conn.commit()
        conn.close()
        with_t, without_t = [], []
        first = args.files + 1
        for rep in range(10):
            rows = publication_rows(first, rng)
            for target, times in ((path, with_t), (bare, without_t))[:: 1 if rep % 2 else -1]:
                times.append(timed_insert(target, rows))
            first += FILES_PER_PUBLICATION
        print(f"one publication's {len(rows)} outputs rows: {statistics.median(with_t) * 1e3:.1f} ms with the "
              f"triggers, {statistics.median(without_t) * 1e3:.1f} ms without (median of 10, interleaved)")
        counts = ledger.transact(lambda c: c.execute(sa.select(sa.func.sum(models.BarcodeYield.reads))).scalar())
        assert counts == sum(r[3] for r in ledger.transact(lambda c: c.execute(AGGREGATE).all()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
