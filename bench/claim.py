"""Claim throughput: how fast can many workers take batches from one ledger?

N worker processes (8 and 32) share one ledger. Each registers, waits for a common start, then loops:
`claim.claim_batch` -> `claim.publish` at once (every file ok, a no-op install: a basecaller that takes
no time), timing each claim with `time.perf_counter`. After `--seconds` (or when nothing is pending)
it stops. Reported per configuration: assignments (batches handed out) per second, files per second,
p50/p99 claim latency, p50 publish latency, the mean batch size actually handed out, the workers'
CPU time per assignment, the fewest-most claims made by one process (fairness of the lock) and the
load average before and after (the machine may be shared).

Every transaction is the real one (`Ledger.transact`: file lock, fresh connection, rollback journal,
synchronous=FULL, BEGIN IMMEDIATE). The ledger is filled through the scan's write path (no pod5 files).
It holds more pending files than LOOKAHEAD (2048) for the whole run, so 40-file batches are not shrunk
by the end-of-run rule: what is measured is the steady state. A batch size with a `G` (`--batches 1G`) is a
byte target in GiB, ledgerbc's default mode (20 GiB by default): the files are 50 MB each, so `1G` hands out
21 files a batch, and each claim reads the LOOKAHEAD oldest pending rows to size its batch, as a real one does.

Every figure is printed next to the physical ceiling measured in the same run (`bench/ceiling.py`: the
smallest write transaction our rules allow, one UPDATE, same lock, same frame, same number of processes,
same place), as a ratio: assignments/s / ceiling transactions/s. For each place and process count the
ceiling runs right before and right after the claim configurations, and the ratio uses the mean of the two
(both are printed, so drift from other load shows). Also printed: p99 claim latency with 32 processes
against p99 with 8 (fairness under contention) next to the same ratio of the ceiling's own transactions (the
same lock and hand-off: what four times the waiters cost the smallest transaction), and the median lock hold
of a claim against the ceiling's.

Where: a fresh folder under /tmp (local disk) and, when LEDGERBC_TEST_GLUSTER_A and
LEDGERBC_TEST_GLUSTER_B are set (or listed in /run/ledgerbc-ci/env: two mounts of one GlusterFS volume,
ci/cluster-up.sh), on that volume with half the processes reaching the ledger through each mount.

    .venv/bin/python bench/claim.py [--seconds 5] [--procs 8,32] [--batches 1,40,1G] [--where local,gluster]
                                    [--json out.json] [--also-separate] [--also-keep-connection]

`--also-keep-connection` (local disk only) is a what-if, not how ledgerbc runs: each configuration again with
every worker keeping one SQLite connection between transactions (rows `local/keep`), which shows what DESIGN
§4's fresh connection per transaction costs the claim (its schema parsed and its statements compiled anew
each time) against the same ceiling, which opens a fresh connection as the rules say.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import socket
import sqlite3
import sys
import time
from pathlib import Path

import sqlalchemy.pool

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _fill import add_files, machine, new_ledger, pct  # noqa: E402
from _procs import bench_folders, load, places, run_workers  # noqa: E402
from ceiling import run_ceiling  # noqa: E402

from ledgerbc import __version__, claim, db  # noqa: E402
from ledgerbc.claim import FileResult  # noqa: E402

LOOKAHEAD_MARGIN = 2048 + 100  # pending files that always remain, so batches stay full (claim.LOOKAHEAD)
FILE_BYTES = 50_000_000  # every bench file's size


def batch_target(spec: str) -> tuple[int | None, int | None, int]:
    """`--batches` entry -> (batch_files, batch_bytes, files per batch): "40" is 40 files, "1G" a 1 GiB target."""
    if spec.upper().endswith("G"):
        target = int(float(spec[:-1]) * 1024**3)
        return None, target, max(1, target // FILE_BYTES)
    return int(spec), None, int(spec)


class HoldTimedLedger(db.Ledger):
    """A Ledger that records how long each transaction held the lock (acquired -> released)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.holds: list[float] = []

    @contextlib.contextmanager
    def locked(self):
        with super().locked():
            t0 = time.perf_counter()
            try:
                yield
            finally:
                self.holds.append(time.perf_counter() - t0)


def worker(index: int, barrier, ledger_path: str, worker_id: str, seconds: float, separate: bool,
           keep_connection: bool = False) -> dict:
    if keep_connection:
        # The what-if of --also-keep-connection, in this forked process only: db.make_engine's pool keeps its one
        # connection between transactions (schema parsed once, statements compiled once) instead of opening a
        # fresh one per transaction as DESIGN §4 requires. Not how ledgerbc runs; unsafe on a network filesystem.
        db.NullPool = sqlalchemy.pool.StaticPool
    ledger = HoldTimedLedger(ledger_path)
    settings = ledger.read_settings()
    claim.register_worker(ledger, worker_id, socket.gethostname(), os.getpid(), None)
    barrier.wait(300)
    ledger.holds.clear()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    start = time.monotonic()
    claim_ms, publish_ms, files = [], [], 0
    c = None
    while time.monotonic() - start < seconds:
        t0 = time.perf_counter()
        if c is None:  # the first claim (and every claim in --separate mode)
            c = claim.claim_batch(ledger, worker_id, settings)
            if c is None:
                break
            claim_ms.append((time.perf_counter() - t0) * 1000)
        files += len(c.files)
        results = [FileResult(f.rel, ok=True, reads_pass=f.read_count or 0) for f in c.files]
        t1 = time.perf_counter()
        # What `ledgerbc run` does: publish the batch and claim the next one in one transaction;
        # that transaction is the next assignment's claim latency.
        c = claim.publish(ledger, c, results, None, settings.max_attempts, claim_next=None if separate else settings)
        t2 = time.perf_counter()
        publish_ms.append((t2 - t1) * 1000)
        if not separate:
            if c is None:
                break
            claim_ms.append((t2 - t1) * 1000)
    end = time.monotonic()
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    return {"start": start, "end": end, "claim_ms": claim_ms, "publish_ms": publish_ms, "files": files, "cpu_s": cpu,
            "hold_ms": [1000 * h for h in ledger.holds]}


def run_config(where: str, mounts, procs: int, batch: str, n_files: int, seconds: float, separate: bool = False,
               keep_connection: bool = False) -> dict:
    """One configuration on a new ledger (through each mount in turn when there are two)."""
    with bench_folders(mounts, "ledgerbc-claim") as folders:
        ledger_path = folders[0] / "ledgerbc.db"
        batch_files, batch_bytes, _per_batch = batch_target(batch)
        new_ledger(ledger_path, folders[0] / "input", folders[0] / "output", batch_files=batch_files,
                   batch_bytes=batch_bytes)
        add_files(db.Ledger(ledger_path), [FILE_BYTES] * n_files)
        paths = [folders[i % len(folders)] / "ledgerbc.db" for i in range(procs)]
        deadline = time.monotonic() + 30
        while not all(p.exists() for p in paths):
            if time.monotonic() > deadline:
                raise SystemExit(f"{paths[-1]} is not visible through the second mount")
            time.sleep(0.1)
        load_before = load()
        results = run_workers(worker, procs, lambda i: (str(paths[i]), f"bench{i:02d}@{where}", seconds, separate,
                                                        keep_connection), folders[0], seconds + 600)
    claims = [x for r in results for x in r["claim_ms"]]
    publishes = [x for r in results for x in r["publish_ms"]]
    holds = [x for r in results for x in r["hold_ms"]]
    files = sum(r["files"] for r in results)
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    return {
        "where": where + ("/2txn" if separate else "") + ("/keep" if keep_connection else ""), "procs": procs,
        "batch": batch, "ledger_files": n_files,
        "seconds": round(wall, 2), "assignments": len(claims), "files": files,
        "assignments_per_s": round(len(claims) / wall, 1), "files_per_s": round(files / wall, 1),
        "claim_p50_ms": round(pct(claims, 50), 1), "claim_p99_ms": round(pct(claims, 99), 1),
        "publish_p50_ms": round(pct(publishes, 50), 1), "hold_p50_ms": round(pct(holds, 50), 2),
        "mean_batch": round(files / len(claims), 1) if claims else 0.0,
        # fairness: how many assignments the least and the most served process got
        "per_proc_min": min(len(r["claim_ms"]) for r in results),
        "per_proc_max": max(len(r["claim_ms"]) for r in results),
        "claim_max_ms": round(max(claims), 1) if claims else 0.0,
        # CPU the workers spent per assignment (claim + publish + lock wait): less load-dependent than wall
        "cpu_ms_per_assignment": round(1000 * sum(r["cpu_s"] for r in results) / max(1, len(claims)), 1),
        "load_before": load_before, "load_after": load(),
    }


def ledger_files(batch: int, procs: int, seconds: float, expected_rate: float) -> int:
    """Enough pending files that the run ends by the clock, not by an empty (or shrinking) ledger."""
    return LOOKAHEAD_MARGIN + int(batch * expected_rate * seconds * 1.5) + batch * procs


def table(rows: list[dict]) -> str:
    head = (f"{'where':<12}{'procs':>6}{'batch':>6}{'assign':>8}{'assign/s':>10}{'ceiling/s':>16}{'ratio':>7}"
            f"{'claim p50':>11}{'claim p99':>11}{'hold':>8}{'ceil hold':>10}{'cpu/assign':>11}{'per proc':>10}{'load':>11}")
    lines = [head, "-" * len(head)]
    for r in rows:
        ceil = r.get("ceiling")
        ceiling = f"{ceil['before']:.0f}|{ceil['after']:.0f}" if ceil else "-"
        lines.append(
            f"{r['where']:<12}{r['procs']:>6}{r['batch']:>6}{r['assignments']:>8}{r['assignments_per_s']:>10.1f}"
            f"{ceiling:>16}{r.get('ratio', float('nan')):>7.2f}"
            f"{r['claim_p50_ms']:>9.1f}ms{r['claim_p99_ms']:>9.1f}ms{r['hold_p50_ms']:>6.2f}ms"
            f"{(ceil['hold_ms'] if ceil else float('nan')):>8.2f}ms"
            f"{r['cpu_ms_per_assignment']:>9.1f}ms"
            f"{str(r['per_proc_min']) + '-' + str(r['per_proc_max']):>10}"
            f"{r['load_before']:>5.1f}->{r['load_after']:<4.1f}"
        )
    lines.append("ceiling/s: the ceiling's transactions/s just before | just after; ratio = assign/s / their mean. "
                 "hold: median lock hold of one claim (publish + claim next), ceil hold: of one ceiling transaction.")
    return "\n".join(lines)


def tails(rows: list[dict]) -> list[str]:
    """p99 claim latency with the most processes against the fewest, per place and batch size."""
    out = []
    keys = sorted({(r["where"], r["batch"]) for r in rows})
    for where, batch in keys:
        by_procs = {r["procs"]: r for r in rows if (r["where"], r["batch"]) == (where, batch)}
        if len(by_procs) < 2:
            continue
        lo, hi = min(by_procs), max(by_procs)
        a, b = by_procs[lo]["claim_p99_ms"], by_procs[hi]["claim_p99_ms"]
        ca, cb = by_procs[lo]["ceiling"]["p99_ms"], by_procs[hi]["ceiling"]["p99_ms"]
        out.append(f"{where:<12} batch {batch:>3}: p99 {b:.1f} ms with {hi} processes vs {a:.1f} ms with {lo}: "
                   f"{b / a:.2f}x (processes {hi / lo:.0f}x; the ceiling's own: {cb / ca:.2f}x)")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=f"{__doc__.splitlines()[0]} (ledgerbc {__version__})")
    ap.add_argument("--seconds", type=float, default=5.0, help="measured time per configuration")
    ap.add_argument("--ceiling-seconds", type=float, default=3.0, help="measured time per ceiling run")
    ap.add_argument("--procs", default="8,32", help="comma-separated process counts")
    ap.add_argument("--batches", default="1,40", help="comma-separated batch sizes: files, or GiB with a G (1G)")
    ap.add_argument("--where", default="local,gluster", help="local and/or gluster (gluster needs the env vars)")
    ap.add_argument("--ceiling-frame", default="split", choices=("split", "inside"),
                    help="the ceiling's frame (bench/ceiling.py); split is what db.Ledger.transact does")
    ap.add_argument("--also-keep-connection", action="store_true",
                    help="local disk only: also run each configuration with every worker keeping one SQLite "
                         "connection between transactions (a what-if: what DESIGN §4's fresh connection per "
                         "transaction costs; not how ledgerbc runs)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--also-separate", action="store_true",
                    help="also run each configuration with claim and publish as two transactions (how workers "
                         "did it before they were merged into one; see docs/benchmarks.md)")
    args = ap.parse_args(argv)

    print(f"machine: {machine()}; SQLite {sqlite3.sqlite_version}; journal {db.JOURNAL_MODE}")
    rows, ceilings = [], []
    for where, mounts in places(args.where):
        for procs in map(int, args.procs.split(",")):
            before = run_ceiling(where, mounts, procs, args.ceiling_seconds, args.ceiling_frame)
            ceilings.append(before)
            print(f"  {where} procs={procs}: ceiling {before['tx_per_s']} tx/s (p99 {before['p99_ms']} ms)", flush=True)
            group = []
            variants = [(False, False)] + [(True, False)] * args.also_separate  # (separate, keep_connection)
            variants += [(False, True)] * (args.also_keep_connection and where == "local")
            for batch in args.batches.split(","):
                for separate, keep in variants:
                    per_batch = batch_target(batch)[2]
                    rate = 1000 if per_batch == 1 else 300  # generous upper guesses of assignments/s
                    n = ledger_files(per_batch, procs, args.seconds, rate)
                    row = run_config(where, mounts, procs, batch, n, args.seconds, separate, keep)
                    group.append(row)
                    print(f"  {row['where']} procs={procs} batch={batch}: {row['assignments_per_s']} assignments/s, "
                          f"claim p50 {row['claim_p50_ms']} ms, p99 {row['claim_p99_ms']} ms", flush=True)
            after = run_ceiling(where, mounts, procs, args.ceiling_seconds, args.ceiling_frame)
            ceilings.append(after)
            print(f"  {where} procs={procs}: ceiling {after['tx_per_s']} tx/s (p99 {after['p99_ms']} ms)", flush=True)
            mean = (before["tx_per_s"] + after["tx_per_s"]) / 2
            for row in group:
                row["ceiling"] = {"before": before["tx_per_s"], "after": after["tx_per_s"],
                                  "hold_ms": round((before["hold_ms"] + after["hold_ms"]) / 2, 2),
                                  "p99_ms": round((before["p99_ms"] + after["p99_ms"]) / 2, 2)}
                row["ratio"] = round(row["assignments_per_s"] / mean, 2)
            rows += group
    print()
    print(table(rows))
    print()
    for line in tails(rows):
        print(line)
    print()
    from ceiling import table as ceiling_table  # noqa: E402

    print("the ceiling runs:")
    print(ceiling_table(ceilings))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "rows": rows, "ceilings": ceilings}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
