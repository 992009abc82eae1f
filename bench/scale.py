"""A ledger of 1,000,000 files: insert time, `status` time, claim latency, file size.

File metadata goes in through the scan's own write path (`scan.record`, 500 rows per transaction) with
synthetic `Observation`s carrying a fake `Pod5Info` (no pod5 file is opened: file I/O is faked).
Then the ledger is given a mid-run shape, written directly with SQL as setup (not measured): 60% of
the files done (with read counts, publication times over the last 10 hours, one done batch per 20
files), 0.5% failed with an error, 1,000 duplicates (recorded through `scan.record` like the rest),
64 running workers. Then, measured on that ledger:

- `status.report(ledger)` (what `ledgerbc status` and `status --json` run), median of 5 calls;
- 200 `claim.claim_batch` calls (byte target 20G over ~1 GB files: ~20 files per claim), p50/p99;
- 200 `claim.heartbeat` calls on the claimed batches, p50/p99;
- the ledger file's size.

Targets: status < 1 s; claim p50 < 20 ms. The ledger is on local disk (--dir, default the system
temporary folder). When the GlusterFS mounts of ci/cluster-up.sh are up (LEDGERBC_TEST_GLUSTER_A, or
/run/ledgerbc-ci/env), status and 50 claims are also measured on a copy of the mid-run ledger there.

    .venv/bin/python bench/scale.py [--files 1000000] [--claims 200] [--dir /tmp]
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _fill import gluster_mounts, machine, new_ledger, observations, pct  # noqa: E402

from ledgerbc import claim, models, scan, status  # noqa: E402
from ledgerbc.db import Ledger  # noqa: E402
from ledgerbc.pod5check import Pod5Info  # noqa: E402

NOW = 1_700_000_000.0


def insert(ledger, sizes) -> float:
    obs = list(observations(sizes))
    # 1,000 duplicates: the same pod5 (file_identifier) copied into another folder, as scan sees them.
    step = max(1, len(obs) // 1000)
    dups = [
        scan.Observation(rel=f"copies/{o.rel}", size=o.size, mtime_ns=o.mtime_ns,
                         info=Pod5Info(o.info.read_count, o.info.file_identifier))
        for o in obs[::step][:1000]
    ]
    report = scan.ScanReport()
    t0 = time.perf_counter()
    scan.record(ledger, obs, False, 0.0, NOW - 36_000, report, {})
    elapsed = time.perf_counter() - t0
    scan.record(ledger, dups, False, 0.0, NOW - 36_000, report, {})
    assert report.added == len(obs) and report.duplicates == len(dups), report.summary()
    return elapsed


def shape_mid_run(ledger, n: int, workers: int) -> None:
    """Setup (direct SQL, not a measured path): 60% done in 20-file batches, 0.5% failed, workers."""
    n_done = int(n * 0.6)
    per_batch = 20

    def txn(conn):
        batches = [
            dict(id=b + 1, worker_id=f"job_{b % workers}@gpu{b % workers:03d}", state=models.BATCH_DONE,
                 claimed_at=NOW - 36_000 + b * 36_000 / (n_done / per_batch), heartbeat_at=NOW, finished_at=NOW,
                 n_files=per_batch, n_bytes=per_batch * 10**9)
            for b in range(math.ceil(n_done / per_batch))
        ]
        conn.execute(sa.insert(models.Batch), batches)
        conn.exec_driver_sql(
            "UPDATE pod5_files SET state='done', batch_id=(id - 1) / ? + 1, reads_pass=read_count * 9 / 10, "
            "reads_fail=read_count - read_count * 9 / 10, reads_missing=0, bases=read_count * 8000, "
            "done_at=? + id * ? WHERE id <= ? AND state='pending'",
            (per_batch, NOW - 36_000, 36_000 / n_done, n_done),
        )
        conn.exec_driver_sql(
            "UPDATE pod5_files SET state='failed', attempts=3, last_error='dorado returned no reads' "
            "WHERE id > ? AND id % 200 = 7 AND state='pending'", (n_done,)
        )
        conn.execute(sa.insert(models.Worker), [
            dict(worker_id=f"job_{w}@gpu{w:03d}", host=f"gpu{w:03d}", pid=1000 + w, device="cuda:0",
                 started_at=NOW - 36_000, last_seen=NOW, state="running", batches_done=0)
            for w in range(workers)
        ])

    ledger.transact(txn)


def on_gluster(path: Path, mount: Path, settings, workers: int) -> None:
    """status and claims on a copy of the mid-run ledger on GlusterFS (a unique folder, removed after)."""
    folder = mount / f"bench-scale-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    folder.mkdir()
    try:
        shutil.copy(path, folder / path.name)
        ledger = Ledger(folder / path.name, clock=lambda: NOW)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            status.report(ledger)
            times.append(time.perf_counter() - t0)
        latencies = []
        for i in range(50):
            t0 = time.perf_counter()
            claim.claim_batch(ledger, f"job_{i % workers}@gpu{i % workers:03d}", settings)
            latencies.append(time.perf_counter() - t0)
        print(f"on GlusterFS ({mount}, a copy): status.report median {np.median(times):.2f} s over 3; "
              f"claim_batch p50 {pct(latencies, 50) * 1e3:.1f} ms, p99 {pct(latencies, 99) * 1e3:.1f} ms over 50")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=1_000_000)
    ap.add_argument("--claims", type=int, default=200)
    ap.add_argument("--workers", type=int, default=64)
    ap.add_argument("--dir", default=None, help="folder for the ledger (default: the system temp folder)")
    ap.add_argument("--no-gluster", action="store_true",
                    help="skip the status/claim measurement on a copy on GlusterFS (done when mounted)")
    args = ap.parse_args(argv)
    print(f"machine: {machine()}")
    rng = np.random.default_rng(0)
    sizes = np.clip(rng.lognormal(math.log(1e9), 0.35, args.files), 40e6, 20e9).astype(np.int64)
    with tempfile.TemporaryDirectory(prefix="ledgerbc-scale-", dir=args.dir) as tmp:
        path = Path(tmp) / "ledgerbc.db"
        settings = new_ledger(path, Path(tmp) / "in", Path(tmp) / "out", batch_bytes=20 * 1024**3, batch_files=None)
        clock = [NOW]
        ledger = Ledger(path, clock=lambda: clock[0])

        elapsed = insert(ledger, sizes)
        print(f"insert: {args.files:,} files through scan.record in {elapsed:.1f} s "
              f"({args.files / elapsed:,.0f} files/s, {elapsed / (args.files / scan.CHUNK) * 1e3:.1f} ms "
              f"per {scan.CHUNK}-row transaction)")
        shape_mid_run(ledger, args.files, args.workers)
        print(f"ledger file after setup: {path.stat().st_size / 1e6:,.0f} MB")
        mounts = None if args.no_gluster else gluster_mounts()
        if mounts:
            on_gluster(path, Path(mounts[0]), settings, args.workers)

        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            data = status.report(ledger)
            times.append(time.perf_counter() - t0)
        f = data["files"]
        print(f"status.report: median {np.median(times):.3f} s, max {max(times):.3f} s over 5 "
              f"(files: {f['done']:,} done, {f['pending']:,} pending, {f['failed']:,} failed, "
              f"{f['duplicate']:,} duplicates) — target < 1 s: {'MET' if np.median(times) < 1 else 'MISSED'}")
        t0 = time.perf_counter()
        status.render(data)
        print(f"status.render: {time.perf_counter() - t0:.4f} s")

        claims, latencies = [], []
        for i in range(args.claims):
            clock[0] = NOW + i
            t0 = time.perf_counter()
            c = claim.claim_batch(ledger, f"job_{i % args.workers}@gpu{i % args.workers:03d}", settings)
            latencies.append(time.perf_counter() - t0)
            claims.append(c)
        n_files = [len(c.files) for c in claims]
        p50 = pct(latencies, 50)
        print(f"claim_batch: p50 {p50 * 1e3:.1f} ms, p99 {pct(latencies, 99) * 1e3:.1f} ms, "
              f"max {max(latencies) * 1e3:.1f} ms over {args.claims} claims "
              f"(median {int(np.median(n_files))} files per claim) — target p50 < 20 ms: "
              f"{'MET' if p50 < 0.020 else 'MISSED'}")
        beats = []
        for c in claims:
            t0 = time.perf_counter()
            claim.heartbeat(ledger, c)
            beats.append(time.perf_counter() - t0)
        print(f"heartbeat: p50 {pct(beats, 50) * 1e3:.1f} ms, p99 {pct(beats, 99) * 1e3:.1f} ms")
        pubs = []
        for c in claims[:50]:
            results = [claim.FileResult(f.rel, True, reads_pass=1) for f in c.files]
            t0 = time.perf_counter()
            claim.publish(ledger, c, results, None, settings.max_attempts)
            pubs.append(time.perf_counter() - t0)
        print(f"publish ({int(np.median(n_files))} files): p50 {pct(pubs, 50) * 1e3:.1f} ms, "
              f"p99 {pct(pubs, 99) * 1e3:.1f} ms over {len(pubs)}")
        t0 = time.perf_counter()
        status.report(ledger)
        print(f"status.report after the claims: {time.perf_counter() - t0:.3f} s")
        print(f"ledger file: {path.stat().st_size / 1e6:,.0f} MB ({path.stat().st_size / args.files:.0f} bytes per file)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
