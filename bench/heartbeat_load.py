"""Heartbeat load: how busy do 1,000 workers heartbeating every 60 s keep the ledger lock?

A working batch heartbeats through `lease.Heartbeat`: every `heartbeat` it rewrites its lease file
(`<ledger>.leases/<batch id>`, no global lock), and every `lease.ledger_interval` (half a lease: 7.5 min
with the default 15 min lease) the beat is a ledger transaction instead (`claim.heartbeat` under the
global lock: check ownership, refresh the batch's and the worker's time). With W workers beating every
H seconds the lock is busy W / H x (share of beats that go to the ledger) x (mean hold) of the time.

The ledger holds 5,000 files and 1,000 running batches of 1,000 registered workers (built on local
disk with the real claim path, then copied into place). Measured with real processes making real calls;
the hold time is measured inside `Ledger.locked()` (lock acquired -> released: connect, pragmas,
BEGIN IMMEDIATE, the statements, COMMIT with its fsyncs, close):

1. serial, one process: 200 ledger heartbeats (`claim.heartbeat`) back to back -> hold time; 200
   lease-file beats -> their time (no lock); one janitor pass (`Janitor.run_pass`) over the 1,000
   running batches -> its lock hold (busy workers make about `janitor.CREW` passes per heartbeat
   interval between them);
2. loaded, in real time: 4 processes (on Gluster alternating between the two mounts, as two hosts would)
   run the 1,000 workers' `Heartbeat.beat()` at their real cadence (each every `--interval` s, random
   phases) for `--seconds` -> the measured fraction of wall time the lock was held, and beat latency by
   kind. A run shorter than half a lease cannot wait for each worker's own ledger beat, so each worker
   starts at a random point of its cycle of beats (its last ledger beat 1..k beats ago, k = half a lease
   / interval): the share of ledger beats is the steady state's, 1 in k.
   `--all-ledger` makes every beat a ledger beat (ledgerbc before lease files).

Where: local disk (the system temp folder) and, when LEDGERBC_TEST_GLUSTER_A/B are set (read from
/run/ledgerbc-ci/env if present), the GlusterFS volume, in a unique subfolder removed afterwards.
Target: < 10% busy on Gluster.

    .venv/bin/python bench/heartbeat_load.py [--workers 1000] [--interval 60] [--lease 900] [--seconds 60] [--procs 4]
"""
from __future__ import annotations

import argparse
import bisect
import dataclasses
import concurrent.futures as cf
import math
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

from ledgerbc import claim, janitor, lease  # noqa: E402
from ledgerbc.db import Ledger  # noqa: E402
from ledgerbc.settings import Settings  # noqa: E402

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
        owned.append(claim.claim_batch(ledger, w, settings))
    return owned


def serial(path: str, owned, n: int) -> dict:
    ledger = TimedLedger(path)
    claim.heartbeat(ledger, owned[0])  # first transaction also checks the schema: not counted
    ledger.holds.clear()
    calls = []
    for i in range(n):
        t0 = time.perf_counter()
        claim.heartbeat(ledger, owned[i % len(owned)])
        calls.append(time.perf_counter() - t0)
    return {"holds": [h for _w, h in ledger.holds], "calls": calls}


def loaded_worker(path: str, owned, settings, seconds: float, seed: int, all_ledger: bool) -> dict:
    """One process: the real `lease.Heartbeat.beat()` of its share of the workers, each every
    `settings.heartbeat` seconds from a random phase, for `seconds`."""
    rng = random.Random(seed)
    ledger = TimedLedger(path)
    claim.heartbeat(ledger, owned[0])  # first transaction also checks the schema: not counted
    ledger.holds.clear()
    interval = settings.heartbeat
    k = max(1, math.ceil(lease.ledger_interval(settings) / interval))  # beats per ledger beat
    start = time.monotonic()
    schedule = []  # (due, worker index)
    beats = []
    for i, c in enumerate(owned):
        hb = lease.Heartbeat(ledger, settings, c)
        due = start + rng.uniform(0, interval)
        # Its last ledger beat was 1..k beats before its first beat here (steady state: 1 beat in k).
        hb.last_ledger = due - interval * rng.randint(1, k) + 1e-3
        if all_ledger:
            hb.every = 0.0
        beats.append(hb)
        schedule.append((due, i))
    schedule.sort()
    latencies = {"ledger": [], "lease file": []}
    late = 0.0
    while schedule:
        due, i = schedule.pop(0)
        if due > start + seconds:
            break
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        late = max(late, -delay)
        hb = beats[i]
        before = len(ledger.holds)
        t0 = time.perf_counter()
        hb.beat()
        latencies["ledger" if len(ledger.holds) > before else "lease file"].append(time.perf_counter() - t0)
        bisect.insort(schedule, (due + interval, i))
    return {"holds": ledger.holds, "latencies": latencies, "late": late}


def loaded(paths: list[str], owned, settings, seconds: float, procs: int, all_ledger: bool) -> dict:
    shares = [owned[k::procs] for k in range(procs)]
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(procs, mp_context=ctx) as pool:
        # Warm the pool (imports) before the clock starts.
        list(pool.map(time.sleep, [0.5] * procs))
        t0 = time.time()
        futures = [pool.submit(loaded_worker, paths[k % len(paths)], shares[k], settings, seconds, k, all_ledger)
                   for k in range(procs)]
        results = [f.result() for f in futures]
        wall_end = time.time()
    holds = [h for r in results for h in r["holds"]]
    wall = seconds
    return {
        "held_fraction": sum(h for _w, h in holds) / wall,
        "ledger_rate": len(holds) / wall,
        "latencies": {kind: [x for r in results for x in r["latencies"][kind]] for kind in ("ledger", "lease file")},
        "holds": [h for _w, h in holds],
        "wall": wall, "elapsed": wall_end - t0, "late": max(r["late"] for r in results),
    }


def janitor_pass(path: str, settings) -> float:
    """Lock hold of one janitor pass over the ledger's running batches (none expired)."""
    ledger = TimedLedger(path)
    own = ledger.read_settings()  # its folders (the pass lists work/); the benchmark's lease and heartbeat
    ledger.holds.clear()
    janitor.Janitor(ledger, dataclasses.replace(own, lease=settings.lease, heartbeat=settings.heartbeat)).run_pass()
    return sum(h for _w, h in ledger.holds)


def measure(where: str, paths: list[str], owned, settings, args) -> dict:
    rate = args.workers / args.interval
    k = max(1, math.ceil(lease.ledger_interval(settings) / args.interval))
    s = serial(paths[0], owned, args.serial)
    mean_hold = statistics.fmean(s["holds"])
    lease_s = lease_beats(paths[0], owned, settings, args.serial)
    print(f"\n[{where}] serial: ledger heartbeat hold p50 {pct(s['holds'], 50) * 1e3:.1f} ms, mean "
          f"{mean_hold * 1e3:.1f} ms, p99 {pct(s['holds'], 99) * 1e3:.1f} ms; lease-file beat p50 "
          f"{pct(lease_s, 50) * 1e3:.1f} ms, p99 {pct(lease_s, 99) * 1e3:.1f} ms (no lock)")
    jan = janitor_pass(paths[0], settings)
    jan_busy = janitor.CREW / args.interval * jan
    print(f"[{where}] janitor pass over {len(owned)} running batches: lock held {jan * 1e3:.0f} ms; "
          f"{janitor.CREW} passes per {args.interval:.0f} s across the crew = {jan_busy:.1%} busy")
    every_beat = rate * mean_hold
    implied = every_beat / (1 if args.all_ledger else k)
    print(f"[{where}] implied busy fraction: {rate:.2f} beats/s x {'1' if args.all_ledger else f'1/{k}'} to the "
          f"ledger x {mean_hold * 1e3:.1f} ms = {implied:.1%} (every beat to the ledger: {every_beat:.1%})")
    L = loaded(paths, owned, settings, args.seconds, args.procs, args.all_ledger)
    led, lf = L["latencies"]["ledger"], L["latencies"]["lease file"]
    print(f"[{where}] loaded, {args.procs} processes, {args.workers} workers every {args.interval:.0f} s for "
          f"{args.seconds:.0f} s: lock held {L['held_fraction']:.1%}; {len(led)} ledger beats "
          f"({L['ledger_rate']:.2f}/s) + {len(lf)} lease-file beats; ledger beat latency p50 "
          f"{pct(led, 50) * 1e3:.1f} ms p99 {pct(led, 99) * 1e3:.1f} ms; lease-file beat p50 "
          f"{pct(lf, 50) * 1e3:.1f} ms p99 {pct(lf, 99) * 1e3:.1f} ms; latest beat {L['late']:.2f} s behind")
    return {"implied": implied, "held": L["held_fraction"], "mean_hold": mean_hold, "janitor": jan_busy,
            "every_beat": every_beat}


def lease_beats(path: str, owned, settings, n: int) -> list[float]:
    ledger = Ledger(path)
    times = []
    for i in range(n):
        c = owned[i % len(owned)]
        t0 = time.perf_counter()
        lease.write(ledger.path, c.batch_id, lease.owner(c.worker_id, c.token), ledger.clock())
        times.append(time.perf_counter() - t0)
    lease.remove_stale(ledger.path, set())
    return times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=1000)
    ap.add_argument("--interval", type=float, default=60.0, help="heartbeat interval, seconds")
    ap.add_argument("--lease", type=float, default=900.0, help="lease, seconds (the ledger gets a beat every half lease)")
    ap.add_argument("--seconds", type=float, default=60.0, help="duration of the loaded run")
    ap.add_argument("--all-ledger", action="store_true", help="every beat a ledger transaction (before lease files)")
    ap.add_argument("--procs", type=int, default=4, help="processes sharing the loaded run")
    ap.add_argument("--serial", type=int, default=200, help="heartbeats of the serial measurement")
    ap.add_argument("--local-only", action="store_true")
    args = ap.parse_args(argv)
    print(f"machine: {machine()}")
    print(f"{args.workers} workers every {args.interval:.0f} s = {args.workers / args.interval:.2f} heartbeats/s")
    settings = Settings(input_dir="in", output_dir="out", heartbeat=args.interval, lease=args.lease)
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
        results["local disk"] = measure("local disk", [str(local)], owned, settings, args)

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
                    [str(folder_a / "ledgerbc.db"), str(folder_b / "ledgerbc.db")], owned, settings, args)
            finally:
                shutil.rmtree(folder_a, ignore_errors=True)
    print("\nsummary (target < 10% on Gluster):")
    for where, r in results.items():
        verdict = ("MET" if max(r["implied"], r["held"]) < 0.10 else "MISSED") if where == "gluster" else "-"
        print(f"  {where:<11} ledger heartbeat hold {r['mean_hold'] * 1e3:6.1f} ms  implied {r['implied']:6.1%}  "
              f"measured {r['held']:6.1%}  {verdict}   (every beat to the ledger: {r['every_beat']:.1%}; "
              f"janitor passes: {r['janitor']:.1%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
