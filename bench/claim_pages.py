"""Which statement of a claim costs what: time, read and write system calls per prepared statement.

One process (no contention) runs `--transactions` publish + claim transactions of `--batch`-file batches, as
`ledgerbc run` does (`claim.publish(..., claim_next=settings)`), on a fresh ledger of `--files` files in
`--where` (a folder: /tmp for local disk, a GlusterFS mount). Around each prepared statement of the hot path
(`ledgerbc/prepared.py`) it reads this process's `syscr`/`syscw` from /proc/self/io: SQLite journals a page
the first time a transaction dirties it (three `pwrite`s), so the writes say which statement dirtied how
many pages. Printed: the calls and lock hold per transaction, then per statement (time, calls per
transaction, reads, writes), slowest first. `--variant "SQL;SQL"` changes the bench ledger's schema first
(e.g. a partial index) to see what a migration would buy before writing one. docs/benchmarks.md has a run.

    .venv/bin/python bench/claim_pages.py [--where /tmp] [--transactions 300] [--batch 1] [--files 3000]
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import os
import shutil
import socket
import sqlite3
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _fill import add_files, new_ledger  # noqa: E402
from claim import FILE_BYTES, HoldTimedLedger  # noqa: E402  (bench/claim.py: a Ledger that times each lock hold)

from ledgerbc import claim, db, prepared  # noqa: E402
from ledgerbc.claim import FileResult  # noqa: E402


def io_calls() -> tuple[int, int]:
    fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return int(fields["syscr"]), int(fields["syscw"])


class _Rows:
    """A fetched cursor: the statement's I/O happens inside the measured call, not in the caller's loop."""

    def __init__(self, cursor):
        self.rows, self.rowcount, self.lastrowid = cursor.fetchall(), cursor.rowcount, cursor.lastrowid

    def __iter__(self):
        return iter(self.rows)

    def fetchone(self):
        return self.rows[0] if self.rows else None

    def fetchall(self):
        return self.rows


def instrument() -> dict:
    """Wrap Prepared.run/run_many; returns {statement: [seconds, calls, reads, writes]}."""
    stats: dict = collections.defaultdict(lambda: [0.0, 0, 0, 0])
    run, run_many = prepared.Prepared.run, prepared.Prepared.run_many

    def measured(self, call):
        r0, w0 = io_calls()
        t0 = time.perf_counter()
        result = call()
        elapsed = time.perf_counter() - t0
        r1, w1 = io_calls()
        s = stats[" ".join(self.sql.split())[:90]]
        s[0] += elapsed
        s[1] += 1
        s[2] += r1 - r0 - 1  # less this function's own read of /proc/self/io
        s[3] += w1 - w0
        return result

    prepared.Prepared.run = lambda self, conn, **params: measured(self, lambda: _Rows(run(self, conn, **params)))
    prepared.Prepared.run_many = lambda self, conn, rows: measured(self, lambda: run_many(self, conn, rows))
    return stats


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--where", type=Path, default=Path("/tmp"), help="folder for the bench ledger")
    ap.add_argument("--transactions", type=int, default=300)
    ap.add_argument("--batch", type=int, default=1, help="files per batch")
    ap.add_argument("--files", type=int, default=3000, help="files in the ledger")
    ap.add_argument("--batch-bytes", type=int, default=None,
                    help="a byte target per batch instead of --batch files (the default mode: each claim reads "
                         "up to claim.LOOKAHEAD pending rows); the files are 50 MB each")
    ap.add_argument("--variant", default="", help="SQL statements (;-separated) run on the bench ledger first")
    args = ap.parse_args(argv)
    per_batch = args.batch if args.batch_bytes is None else max(1, args.batch_bytes // FILE_BYTES)
    if args.files < per_batch * (args.transactions + 1) + (0 if args.batch_bytes is None else claim.LOOKAHEAD):
        raise SystemExit("--files must exceed --batch x (--transactions + 1): the queue must not run dry")

    folder = args.where / f"ledgerbc-claim-pages-{os.getpid()}"
    folder.mkdir()
    try:
        path = folder / "ledgerbc.db"
        new_ledger(path, folder / "input", folder / "output", batch_files=None if args.batch_bytes else args.batch,
                   batch_bytes=args.batch_bytes)
        add_files(db.Ledger(path), [FILE_BYTES] * args.files)
        if args.variant:
            with contextlib.closing(sqlite3.connect(path)) as conn:
                for sql in filter(None, (x.strip() for x in args.variant.split(";"))):
                    conn.execute(sql)
                conn.commit()
        ledger = HoldTimedLedger(path)
        settings = ledger.read_settings()
        claim.register_worker(ledger, "bench@pages", socket.gethostname(), os.getpid(), None)
        c = claim.claim_batch(ledger, "bench@pages", settings)
        stats = instrument()
        ledger.holds.clear()
        n = args.transactions
        r0, w0 = io_calls()
        t0 = time.perf_counter()
        for _ in range(n):
            results = [FileResult(f.rel, ok=True, reads_pass=1) for f in c.files]
            c = claim.publish(ledger, c, results, None, settings.max_attempts, claim_next=settings)
        wall = time.perf_counter() - t0
        r1, w1 = io_calls()
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    own = sum(s[1] for s in stats.values())  # the wrapper's own /proc/self/io reads: two per statement
    size = f"{args.batch}-file" if args.batch_bytes is None else f"{args.batch_bytes:,}-byte"
    print(f"{args.where}: {n} publish + claim transactions of {size} batches, {args.files} files"
          + (f", variant {args.variant!r}" if args.variant else ""))
    print(f"per transaction: {wall / n * 1000:.2f} ms, lock hold median {statistics.median(ledger.holds) * 1000:.2f} ms, "
          f"read calls {(r1 - r0 - 2 * own) / n:.1f}, write calls {(w1 - w0) / n:.1f}")
    print(f"{'ms/txn':>8} {'calls':>6} {'reads':>6} {'writes':>7}  statement")
    for sql, (seconds, calls, reads, writes) in sorted(stats.items(), key=lambda kv: -kv[1][0]):
        print(f"{seconds / n * 1000:8.3f} {calls / n:6.1f} {reads / n:6.1f} {writes / n:7.1f}  {sql}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
