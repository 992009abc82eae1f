"""The physical ceiling: how many write transactions per second can one ledger take under our rules?

N processes (8 and 32) each loop over the smallest write transaction our rules allow, in plain `sqlite3`:
take the ledger lock (`<db>.lock` with filelock's flock, no soft fallback, waiters ordered by the
turnstile: exactly `db.Ledger.locked()`, the lock every ledger transaction takes), open a FRESH
connection, `PRAGMA journal_mode=<rollback mode>`, `PRAGMA synchronous=FULL`, `BEGIN IMMEDIATE`, one
`UPDATE` of one row, `COMMIT`, close, release. Each process updates its own row; at the end every row
must equal that process's count of committed transactions (no lost update, checked).

Two frames (`--frame`):
- `split` (default, what `db.Ledger.transact` does, see db.py): open the connection before taking the lock,
  close it after releasing it; under the lock BEGIN IMMEDIATE, the pragmas (inside the transaction the
  journal mode is a setting of the connection and synchronous is read: FULL), UPDATE, COMMIT.
- `inside`: every step under the lock, pragmas before BEGIN (the frame before issue 16).

Printed per configuration: transactions/s, p50/p99 of a whole transaction (from its first step to its
last, lock wait included), and the median of every step: connect, pragmas, lock wait, BEGIN, UPDATE,
COMMIT, close, and the lock hold (acquired -> released). `bench/claim.py` runs this in the same run as
the claim benchmark and prints each claim figure as a ratio to it.

Where: a fresh folder under /tmp (local disk) and, when LEDGERBC_TEST_GLUSTER_A/B are set (or listed in
/run/ledgerbc-ci/env), on that GlusterFS volume with half the processes going through each mount.

    .venv/bin/python bench/ceiling.py [--seconds 5] [--procs 8,32] [--where local,gluster] [--frame split]
"""
from __future__ import annotations

import argparse
import sqlite3
import sys
import time
from pathlib import Path
from urllib.parse import quote

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _fill import machine, pct  # noqa: E402
from _procs import bench_folders, load, places, run_workers  # noqa: E402

from ledgerbc import db  # noqa: E402

STEPS = ("connect", "wait", "pragma", "begin", "update", "commit", "close", "hold")


def _connect(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{quote(str(path))}?mode=rw", uri=True, isolation_level=None, timeout=30)


def worker(index: int, barrier, path: str, seconds: float, frame: str, journal: str) -> dict:
    path = Path(path)
    ledger = db.Ledger(path)  # only its lock is used: the same lock and hand-off as every ledger transaction
    steps = {s: [] for s in STEPS}
    latency = []
    done = 0
    barrier.wait(300)
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        t = [time.perf_counter()]
        stamp = lambda: t.append(time.perf_counter())  # noqa: E731
        if frame == "split":
            conn = _connect(path)  # reads nothing but the 100-byte header SQLite always probes: no lock needed
            stamp()  # 1
            with ledger.locked():
                stamp()  # 2
                conn.execute("BEGIN IMMEDIATE")
                stamp()  # 3
                # As db.check_pragmas: inside the transaction a rollback mode is a setting of this connection
                # (no I/O, no second round of SQLite locking), and synchronous can only be read: FULL.
                conn.execute(f"PRAGMA journal_mode={journal}")
                if conn.execute("PRAGMA synchronous").fetchone()[0] != 2:
                    raise SystemExit("this libsqlite3 does not default to synchronous=FULL: use --frame inside")
                stamp()  # 4
                conn.execute("UPDATE ceiling SET n = n + 1 WHERE id = ?", (index,))
                stamp()  # 5
                conn.execute("COMMIT")
                stamp()  # 6
            stamp()  # 7
            conn.close()
            stamp()  # 8
            steps["connect"].append(t[1] - t[0])
            steps["wait"].append(t[2] - t[1])
            steps["begin"].append(t[3] - t[2])
            steps["pragma"].append(t[4] - t[3])
            steps["update"].append(t[5] - t[4])
            steps["commit"].append(t[6] - t[5])
            steps["hold"].append(t[7] - t[2])
            steps["close"].append(t[8] - t[7])
        else:
            with ledger.locked():
                stamp()  # 1
                conn = _connect(path)
                stamp()  # 2
                conn.execute(f"PRAGMA journal_mode={journal}")
                conn.execute("PRAGMA synchronous=FULL")
                stamp()  # 3
                conn.execute("BEGIN IMMEDIATE")
                stamp()  # 4
                conn.execute("UPDATE ceiling SET n = n + 1 WHERE id = ?", (index,))
                stamp()  # 5
                conn.execute("COMMIT")
                stamp()  # 6
                conn.close()
                stamp()  # 7
            stamp()  # 8
            steps["wait"].append(t[1] - t[0])
            steps["connect"].append(t[2] - t[1])
            steps["pragma"].append(t[3] - t[2])
            steps["begin"].append(t[4] - t[3])
            steps["update"].append(t[5] - t[4])
            steps["commit"].append(t[6] - t[5])
            steps["close"].append(t[7] - t[6])
            steps["hold"].append(t[8] - t[1])
        done += 1
        latency.append(t[-1] - t[0])
    end = time.monotonic()
    return {"start": start, "end": end, "done": done, "latency": latency, "steps": steps}


def make_db(path: Path, procs: int) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(f"PRAGMA page_size={db.PAGE_SIZE}")  # the ledger's (db.create_ledger_file)
    conn.execute("CREATE TABLE ceiling (id INTEGER PRIMARY KEY, n INTEGER NOT NULL)")
    conn.executemany("INSERT INTO ceiling VALUES (?, 0)", [(i,) for i in range(procs)])
    conn.close()


def run_ceiling(where: str, mounts, procs: int, seconds: float, frame: str = "split", journal: str | None = None) -> dict:
    """One configuration of the ceiling; a row of figures (times in ms)."""
    journal = journal or db.JOURNAL_MODE
    with bench_folders(mounts, "ledgerbc-ceiling") as folders:
        path = folders[0] / "ceiling.db"
        make_db(path, procs)
        paths = [folders[i % len(folders)] / "ceiling.db" for i in range(procs)]
        load_before = load()
        results = run_workers(worker, procs, lambda i: (str(paths[i]), seconds, frame, journal), folders[0],
                              seconds + 600)
        conn = sqlite3.connect(path)
        counts = dict(conn.execute("SELECT id, n FROM ceiling").fetchall())
        conn.close()
    lost = [i for i, r in enumerate(results) if counts.get(i) != r["done"]]
    if lost:
        raise SystemExit(f"ceiling: lost updates in processes {lost} ({where}): the filesystem does not lock")
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    n = sum(r["done"] for r in results)
    lat = [x for r in results for x in r["latency"]]
    row = {
        "where": where, "procs": procs, "frame": frame, "journal": journal, "tx": n, "seconds": round(wall, 2),
        "tx_per_s": round(n / wall, 1), "p50_ms": round(1000 * pct(lat, 50), 2), "p99_ms": round(1000 * pct(lat, 99), 2),
        "load_before": load_before, "load_after": load(),
    }
    for s in STEPS:
        row[f"{s}_ms"] = round(1000 * pct([x for r in results for x in r["steps"][s]], 50), 2)
    return row


def table(rows: list[dict]) -> str:
    head = (f"{'where':<8}{'procs':>6}{'frame':>7}{'journal':>9}{'tx/s':>8}{'p50':>8}{'p99':>8}   "
            + "".join(f"{s:>8}" for s in STEPS) + f"{'load':>12}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['where']:<8}{r['procs']:>6}{r['frame']:>7}{r['journal']:>9}{r['tx_per_s']:>8.1f}"
            f"{r['p50_ms']:>8.2f}{r['p99_ms']:>8.2f}   " + "".join(f"{r[s + '_ms']:>8.2f}" for s in STEPS)
            + f"{r['load_before']:>6.1f}->{r['load_after']:<4.1f}"
        )
    lines.append("(times in ms: p50/p99 of a whole transaction, lock wait included; per step its median)")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="measured time per configuration")
    ap.add_argument("--procs", default="8,32", help="comma-separated process counts")
    ap.add_argument("--where", default="local,gluster", help="local and/or gluster")
    ap.add_argument("--frame", default="split", help="split (connect/pragmas/close outside the lock), inside, or both")
    ap.add_argument("--journal", default=None, help=f"rollback journal mode(s), comma-separated (default {db.JOURNAL_MODE})")
    args = ap.parse_args(argv)
    print(f"machine: {machine()}; SQLite {sqlite3.sqlite_version}")
    rows = []
    frames = ["split", "inside"] if args.frame == "both" else args.frame.split(",")
    journals = (args.journal or db.JOURNAL_MODE).split(",")
    for where, mounts in places(args.where):
        for procs in map(int, args.procs.split(",")):
            for frame in frames:
                for journal in journals:
                    row = run_ceiling(where, mounts, procs, args.seconds, frame, journal)
                    rows.append(row)
                    print(f"  {where} procs={procs} {frame} {journal}: {row['tx_per_s']} tx/s, p50 {row['p50_ms']} ms, "
                          f"p99 {row['p99_ms']} ms", flush=True)
    print()
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
