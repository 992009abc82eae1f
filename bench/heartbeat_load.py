"""Heartbeat load: how busy do 1,000 workers heartbeating every 60 s keep the ledger lock?

Each heartbeat is one transaction under the global lock (`claim.heartbeat`: check ownership, refresh
the batch's and the worker's time). With W workers beating every H seconds the lock is busy
W / H x (mean hold time) of the time; above a few tens of percent claims and publications queue.

The ledger holds 5,000 files and 1,000 running batches of 1,000 registered workers (built on local
disk with the real claim path, then copied into place). Two measurements, with real processes doing
real `claim.heartbeat` calls on those batches; the hold time is measured inside `Ledger.locked()`
(from lock acquired to lock released, so it covers connect, pragmas, BEGIN IMMEDIATE, the statements,
COMMIT with its fsyncs, close):

1. serial: one process, 200 heartbeats back to back -> hold time p50/mean/p99, and the busy
   fraction it implies: (1000 / 60 per second) x mean hold;
2. loaded: 4 processes (on Gluster alternating between the two mounts, as two hosts would), together
   issuing 1000/60 heartbeats per second (jittered intervals, random phases) for 20 s -> the measured fraction of wall
   time the lock was held, the heartbeat rate achieved, and heartbeat latency (wait + hold).

Where: local disk (the system temp folder) and, when LEDGERBC_TEST_GLUSTER_A/B are set (read from
/run/ledgerbc-ci/env if present), the GlusterFS volume, in a unique subfolder removed afterwards.
Target: < 10% busy on Gluster.

    .venv/bin/python bench/heartbeat_load.py [--workers 1000] [--interval 60] [--seconds 20] [--procs 4]
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import multiprocessing
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _fill import add_files, gluster_mounts, machine, new_ledger, pct  # noqa: E402

from ledgerbc import claim  # noqa: E402
from ledgerbc.db import Ledger  # noqa: E402

class TimedLedger(Ledger):
    """A Ledger that records, for every transaction, when it got the lock and how long it held it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.holds: list[tuple[float, float]] = []  # (wall time at acquisition, seconds held)

    @contextmanager
    def locked(self):
        with super().locked():
            wall, t0 = time.time(), time.perf_counter()
            try:
                yield
            finally:
                self.holds.append((wall, time.perf_counter() - t0))


def build(path: Path, workers: int) -> list[tuple[int, str]]:
    """A ledger with `workers` registered workers, each owning one running batch; [(batch id, worker)]."""
    settings = new_ledger(path, path.parent / "in", path.parent / "out", batch_files=1, batch_bytes=None)
    ledger = Ledger(path)
    add_files(ledger, [10**9] * 5000)
    owned = []
    for i in range(workers):
        w = f"{1000 + i // 100}_{i}@gpu{i % 50:03d}"
        claim.register_worker(ledger, w, f"gpu{i % 50:03d}", 4000 + i, "cuda:0")
        owned.append((claim.claim_batch(ledger, w, settings).batch_id, w))
    return owned


def serial(path: str, owned, n: int) -> dict:
    ledger = TimedLedger(path)
    claim.heartbeat(ledger, *owned[0])  # first transaction also checks the schema: not counted
    ledger.holds.clear()
    calls = []
    for i in range(n):
        batch_id, worker = owned[i % len(owned)]
        t0 = time.perf_counter()
        claim.heartbeat(ledger, batch_id, worker)
        calls.append(time.perf_counter() - t0)
    return {"holds": [h for _w, h in ledger.holds], "calls": calls}


def loaded_worker(path: str, owned, rate: float, seconds: float, seed: int) -> dict:
    """One process: heartbeats at `rate` per second for `seconds` on its share of the batches, each
    interval jittered uniformly in [0.5, 1.5] x 1/rate (a random phase, like workers started apart)."""
    rng = random.Random(seed)
    ledger = TimedLedger(path)
    claim.heartbeat(ledger, *owned[0])
    ledger.holds.clear()
    latencies = []
    start = time.monotonic()
    due = start + rng.uniform(0, 1 / rate)
    i = 0
    while due < start + seconds:
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        batch_id, worker = owned[i % len(owned)]
        t0 = time.perf_counter()
        claim.heartbeat(ledger, batch_id, worker)
        latencies.append(time.perf_counter() - t0)
        i += 1
        due += rng.uniform(0.5, 1.5) / rate
    return {"holds": ledger.holds, "latencies": latencies, "late": max(0.0, time.monotonic() - start - seconds)}


def loaded(paths: list[str], owned, total_rate: float, seconds: float, procs: int) -> dict:
    shares = [owned[k::procs] for k in range(procs)]
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(procs, mp_context=ctx) as pool:
        # Warm the pool (imports) before the clock starts.
        list(pool.map(time.sleep, [0.5] * procs))
        t0 = time.time()
        futures = [pool.submit(loaded_worker, paths[k % len(paths)], shares[k], total_rate / procs, seconds, k)
                   for k in range(procs)]
        results = [f.result() for f in futures]
        wall_end = time.time()
    holds = [h for r in results for h in r["holds"]]
    first = min(w for w, _h in holds)
    last = max(w + h for w, h in holds)
    wall = max(last - first, seconds)
    return {
        "held_fraction": sum(h for _w, h in holds) / wall,
        "rate": len(holds) / wall,
        "latencies": [x for r in results for x in r["latencies"]],
        "holds": [h for _w, h in holds],
        "wall": wall, "elapsed": wall_end - t0,
    }


def measure(where: str, paths: list[str], owned, args) -> dict:
    rate = args.workers / args.interval
    s = serial(paths[0], owned, args.serial)
    mean_hold = statistics.fmean(s["holds"])
    print(f"\n[{where}] serial, {args.serial} heartbeats: hold p50 {pct(s['holds'], 50) * 1e3:.1f} ms, "
          f"mean {mean_hold * 1e3:.1f} ms, p99 {pct(s['holds'], 99) * 1e3:.1f} ms; call p50 "
          f"{pct(s['calls'], 50) * 1e3:.1f} ms")
    implied = rate * mean_hold
    print(f"[{where}] implied busy fraction: {rate:.2f} heartbeats/s x {mean_hold * 1e3:.1f} ms = {implied:.1%}")
    L = loaded(paths, owned, rate, args.seconds, args.procs)
    print(f"[{where}] loaded, {args.procs} processes at {rate:.2f}/s for {args.seconds:.0f} s: lock held "
          f"{L['held_fraction']:.1%} of {L['wall']:.1f} s; issued {L['rate']:.2f} heartbeats/s; hold p50 "
          f"{pct(L['holds'], 50) * 1e3:.1f} ms p99 {pct(L['holds'], 99) * 1e3:.1f} ms; heartbeat latency p50 "
          f"{pct(L['latencies'], 50) * 1e3:.1f} ms p99 {pct(L['latencies'], 99) * 1e3:.1f} ms")
    return {"implied": implied, "held": L["held_fraction"], "mean_hold": mean_hold}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=1000)
    ap.add_argument("--interval", type=float, default=60.0, help="heartbeat interval, seconds")
    ap.add_argument("--seconds", type=float, default=20.0, help="duration of the loaded run")
    ap.add_argument("--procs", type=int, default=4, help="processes sharing the loaded run")
    ap.add_argument("--serial", type=int, default=200, help="heartbeats of the serial measurement")
    ap.add_argument("--local-only", action="store_true")
    args = ap.parse_args(argv)
    print(f"machine: {machine()}")
    print(f"{args.workers} workers every {args.interval:.0f} s = {args.workers / args.interval:.2f} heartbeats/s")
    results = {}
    with tempfile.TemporaryDirectory(prefix="ledgerbc-heartbeat-") as tmp:
        template = Path(tmp) / "template" / "ledgerbc.db"
        template.parent.mkdir()
        t0 = time.perf_counter()
        owned = build(template, args.workers)
        print(f"built a ledger with {args.workers} running batches in {time.perf_counter() - t0:.0f} s")

        local = Path(tmp) / "local" / "ledgerbc.db"
        local.parent.mkdir()
        shutil.copy(template, local)
        results["local disk"] = measure("local disk", [str(local)], owned, args)

        mounts = None if args.local_only else gluster_mounts()
        if mounts is None:
            print("\nGluster: not measured (LEDGERBC_TEST_GLUSTER_A/B unset or not mounted; bash ci/cluster-up.sh)")
        else:
            sub = f"bench-heartbeat-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            folder_a, folder_b = Path(mounts[0]) / sub, Path(mounts[1]) / sub
            folder_a.mkdir()
            try:
                shutil.copy(template, folder_a / "ledgerbc.db")
                deadline = time.monotonic() + 10  # the other mount sees the copy (entry timeout is 0)
                while not (folder_b / "ledgerbc.db").exists() and time.monotonic() < deadline:
                    time.sleep(0.1)
                results["gluster"] = measure(
                    f"gluster {mounts[0]}+{mounts[1]}",
                    [str(folder_a / "ledgerbc.db"), str(folder_b / "ledgerbc.db")], owned, args)
            finally:
                shutil.rmtree(folder_a, ignore_errors=True)
    print("\nsummary (target < 10% on Gluster):")
    for where, r in results.items():
        verdict = ("MET" if max(r["implied"], r["held"]) < 0.10 else "MISSED") if where == "gluster" else "-"
        print(f"  {where:<11} mean hold {r['mean_hold'] * 1e3:6.1f} ms  implied {r['implied']:6.1%}  "
              f"measured {r['held']:6.1%}  {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
