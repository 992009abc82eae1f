"""Which statement of a claim costs what: time, read and write system calls per prepared statement.

One process (no contention) runs `--transactions` publish + claim transactions of `--batch`-file batches, as
`ledgerbc run` does (`claim.publish(..., claim_next=settings)`), on a fresh ledger of `--files` files in
`--where` (a folder: /tmp for local disk, a GlusterFS mount). Around each prepared statement of the hot path
(`ledgerbc/prepared.py`) it reads this process's `syscr`/`syscw` from /proc/self/io: SQLite journals a page
the first time a transaction dirties it (three `pwrite`s), so the writes say which statement dirtied how
many pages. Printed: the calls and lock hold per transaction, then per statement (time, calls per
transaction, reads, writes), slowest first. Before that pass, as many transactions again with nothing but
the phases of each lock hold timed (begin: BEGIN IMMEDIATE and the pragmas, where a fresh connection parses
the schema; work; commit; release), and the schema parse of a fresh connection to this ledger against the
ceiling's one-table database. `--variant "SQL;SQL"` changes the bench ledger's schema first
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
from ceiling import make_db  # noqa: E402
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


def time_phases(ledger) -> dict:
    """Time each lock hold's phases from now on: begin (lock taken -> BEGIN IMMEDIATE and the pragmas checked: on a
    fresh connection this is where SQLite parses the schema), work (the statements and the Python between them),
    commit, release (COMMIT done -> lock released). Returns {phase: [seconds]}."""
    phases: dict = collections.defaultdict(list)
    stamp: dict = {}
    held = ledger.locked

    @contextlib.contextmanager
    def locked():
        with held():
            stamp["locked"] = time.perf_counter()
            yield
        phases["release"].append(time.perf_counter() - stamp["committed"])

    check = db.check_pragmas

    def check_pragmas(dbapi_conn):
        check(dbapi_conn)
        stamp["begun"] = time.perf_counter()
        phases["begin"].append(stamp["begun"] - stamp["locked"])

    dialect = ledger._get_engine().dialect
    commit = dialect.do_commit

    def do_commit(dbapi_conn):
        t = time.perf_counter()
        phases["work"].append(t - stamp["begun"])
        commit(dbapi_conn)
        stamp["committed"] = time.perf_counter()
        phases["commit"].append(stamp["committed"] - t)

    ledger.locked, db.check_pragmas, dialect.do_commit = locked, check_pragmas, do_commit
    return phases


def schema_parse_ms(path: Path, times: int = 500) -> float:
    """Median ms of BEGIN IMMEDIATE + `PRAGMA journal_mode` on a fresh connection to `path`: the first statement
    that needs the schema, so SQLite reads and parses all of it (every table, index and trigger)."""
    spent = []
    for _ in range(times):
        with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
            t0 = time.perf_counter()
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(f"PRAGMA journal_mode={db.JOURNAL_MODE}").fetchall()
            spent.append(time.perf_counter() - t0)
            conn.execute("ROLLBACK")
    return statistics.median(spent) * 1000


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
    if args.files < per_batch * (2 * args.transactions + 1) + (0 if args.batch_bytes is None else claim.LOOKAHEAD):
        raise SystemExit("--files must exceed --batch x (2 x --transactions + 1): the queue must not run dry")

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
        n = args.transactions

        def publish_and_claim(c):
            for _ in range(n):
                results = [FileResult(f.rel, ok=True, reads_pass=1) for f in c.files]
                c = claim.publish(ledger, c, results, None, settings.max_attempts, claim_next=settings)
            return c

        # First the phases of the lock hold, with nothing else measured; then the same again statement by statement.
        timed = time_phases(ledger)
        c = publish_and_claim(c)
        phases = {k: list(v) for k, v in timed.items()}  # the timers stay in place: the pass below is not these
        parse = schema_parse_ms(path)
        plain = folder / "ceiling.db"  # what the ceiling's fresh connection parses (bench/ceiling.py)
        make_db(plain, 1)
        parse_plain = schema_parse_ms(plain)
        stats = instrument()
        ledger.holds.clear()
        r0, w0 = io_calls()
        t0 = time.perf_counter()
        c = publish_and_claim(c)
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
    print("lock hold by phase, medians of the first pass (no statement timed): "
          + ", ".join(f"{k} {statistics.median(v) * 1000:.3f} ms" for k, v in phases.items())
          + f"; hold {sum(statistics.median(v) for v in phases.values()) * 1000:.3f} ms")
    print(f"schema parse of a fresh connection (BEGIN IMMEDIATE + journal_mode): this ledger {parse:.3f} ms, "
          f"a one-table database {parse_plain:.3f} ms")
    print(f"{'ms/txn':>8} {'calls':>6} {'reads':>6} {'writes':>7}  statement")
    for sql, (seconds, calls, reads, writes) in sorted(stats.items(), key=lambda kv: -kv[1][0]):
        print(f"{seconds / n * 1000:8.3f} {calls / n:6.1f} {reads / n:6.1f} {writes / n:7.1f}  {sql}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
