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
by the end-of-run rule: what is measured is the steady state.

Where: a fresh folder under /tmp (local disk) and, when LEDGERBC_TEST_GLUSTER_A and
LEDGERBC_TEST_GLUSTER_B are set (two mounts of one GlusterFS volume, ci/cluster-up.sh), on that volume
with half the processes reaching the ledger through each mount.

Reference, the replaced Flask manager (BC-pipelines `BCManager`), "assignments" = batches handed out:
8 clients, 1-file batches ~240/s (p50 14 ms, p99 40 ms); 32 clients 230-290/s (p99 150-220 ms);
40-file batches 40-47/s.

    .venv/bin/python bench/claim.py [--seconds 5] [--procs 8,32] [--batches 1,40] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import shutil
import socket
import sys
import tempfile
import time
import traceback
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _fill import add_files, machine, new_ledger, pct  # noqa: E402

from ledgerbc import __version__, claim, db  # noqa: E402
from ledgerbc.claim import FileResult  # noqa: E402

LOOKAHEAD_MARGIN = 2048 + 100  # pending files that always remain, so batches stay full (claim.LOOKAHEAD)
FLASK = {  # (clients, batch files) -> (assignments/s, p50 ms, p99 ms) of the replaced Flask manager
    (8, 1): ("~240", "14", "40"),
    (32, 1): ("230-290", "-", "150-220"),
    (8, 40): ("40-47", "-", "-"),
    (32, 40): ("40-47", "-", "-"),
}


def worker(ledger_path: str, worker_id: str, barrier, seconds: float, out_path: str, separate: bool) -> None:
    try:
        ledger = db.Ledger(ledger_path)
        settings = ledger.read_settings()
        claim.register_worker(ledger, worker_id, socket.gethostname(), os.getpid(), None)
        barrier.wait(300)
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
            results = [FileResult(f.id, ok=True, reads_pass=f.read_count or 0) for f in c.files]
            t1 = time.perf_counter()
            # What `ledgerbc run` does: publish the batch and claim the next one in one transaction;
            # that transaction is the next assignment's claim latency.
            c = claim.publish(ledger, c.batch_id, worker_id, results, lambda: None, settings.max_attempts,
                              claim_next=None if separate else settings)
            t2 = time.perf_counter()
            publish_ms.append((t2 - t1) * 1000)
            if not separate:
                if c is None:
                    break
                claim_ms.append((t2 - t1) * 1000)
        end = time.monotonic()
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
        Path(out_path).write_text(json.dumps({"ok": True, "start": start, "end": end, "claim_ms": claim_ms,
                                              "publish_ms": publish_ms, "files": files, "cpu_s": cpu}))
    except BaseException:  # noqa: BLE001 - the parent reports it
        Path(out_path).write_text(json.dumps({"ok": False, "error": traceback.format_exc()}))
        raise


def run_config(where: str, folders: list[Path], procs: int, batch: int, n_files: int, seconds: float,
               separate: bool = False) -> dict:
    """One configuration: a new ledger in folders[0] (folders[1], if any, is the same folder via another mount)."""
    ledger_path = folders[0] / "ledgerbc.db"
    new_ledger(ledger_path, folders[0] / "input", folders[0] / "output", batch_files=batch, batch_bytes=None)
    add_files(db.Ledger(ledger_path), [50_000_000] * n_files)
    paths = [folders[i % len(folders)] / "ledgerbc.db" for i in range(procs)]
    deadline = time.monotonic() + 30
    while not all(p.exists() for p in paths):
        if time.monotonic() > deadline:
            raise SystemExit(f"{paths[-1]} is not visible through the second mount")
        time.sleep(0.1)

    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(procs)
    outs = [folders[0] / f"result-{i}.json" for i in range(procs)]
    ps = [ctx.Process(target=worker, args=(str(paths[i]), f"bench{i:02d}@{where}", barrier, seconds, str(outs[i]), separate))
          for i in range(procs)]
    load_before = os.getloadavg()[0]
    for p in ps:
        p.start()
    for p in ps:
        p.join(seconds + 600)
    for p in ps:  # only our own processes, by handle
        if p.is_alive():
            p.kill()
            p.join()
    missing = [(o.name, p.exitcode) for o, p in zip(outs, ps) if not o.exists()]
    if missing:
        raise SystemExit(f"benchmark processes ended without a result (file, exit code): {missing[:4]}")
    results = [json.loads(o.read_text()) for o in outs]
    bad = [r["error"] for r in results if not r["ok"]]
    if bad:
        raise SystemExit(f"a benchmark process failed:\n{bad[0]}")
    claims = [x for r in results for x in r["claim_ms"]]
    publishes = [x for r in results for x in r["publish_ms"]]
    files = sum(r["files"] for r in results)
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    return {
        "where": where + ("/2txn" if separate else ""), "procs": procs, "batch": batch, "ledger_files": n_files, "seconds": round(wall, 2),
        "assignments": len(claims), "files": files,
        "assignments_per_s": round(len(claims) / wall, 1), "files_per_s": round(files / wall, 1),
        "claim_p50_ms": round(pct(claims, 50), 1), "claim_p99_ms": round(pct(claims, 99), 1),
        "publish_p50_ms": round(pct(publishes, 50), 1),
        "mean_batch": round(files / len(claims), 1) if claims else 0.0,
        # fairness: the file lock is not FIFO, so a process can wait through many others' turns
        "per_proc_min": min(len(r["claim_ms"]) for r in results),
        "per_proc_max": max(len(r["claim_ms"]) for r in results),
        "claim_max_ms": round(max(claims), 1) if claims else 0.0,
        # CPU the workers spent per assignment (claim + publish + lock polling): less load-dependent than wall
        "cpu_ms_per_assignment": round(1000 * sum(r["cpu_s"] for r in results) / max(1, len(claims)), 1),
        "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2),
    }


def ledger_files(batch: int, procs: int, seconds: float, expected_rate: float) -> int:
    """Enough pending files that the run ends by the clock, not by an empty (or shrinking) ledger."""
    return LOOKAHEAD_MARGIN + int(batch * expected_rate * seconds * 1.5) + batch * procs


def table(rows: list[dict]) -> str:
    head = (f"{'where':<8}{'procs':>6}{'batch':>6}{'assign':>8}{'assign/s':>10}{'files/s':>9}"
            f"{'claim p50':>11}{'claim p99':>11}{'publ p50':>10}{'batch':>7}{'cpu/assign':>11}{'per proc':>10}{'load':>11}"
            f"   Flask: assign/s, p50, p99")
    lines = [head, "-" * len(head)]
    for r in rows:
        flask = FLASK.get((r["procs"], r["batch"]), ("-", "-", "-"))
        lines.append(
            f"{r['where']:<8}{r['procs']:>6}{r['batch']:>6}{r['assignments']:>8}{r['assignments_per_s']:>10.1f}"
            f"{r['files_per_s']:>9.1f}{r['claim_p50_ms']:>9.1f}ms{r['claim_p99_ms']:>9.1f}ms"
            f"{r['publish_p50_ms']:>8.1f}ms{r['mean_batch']:>7.1f}{r['cpu_ms_per_assignment']:>9.1f}ms"
            f"{str(r['per_proc_min']) + '-' + str(r['per_proc_max']):>10}"
            f"{r['load_before']:>5.1f}->{r['load_after']:<4.1f}"
            f"   {flask[0]}, {flask[1]} ms, {flask[2]} ms"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=f"{__doc__.splitlines()[0]} (ledgerbc {__version__})")
    ap.add_argument("--seconds", type=float, default=5.0, help="measured time per configuration")
    ap.add_argument("--procs", default="8,32", help="comma-separated process counts")
    ap.add_argument("--batches", default="1,40", help="comma-separated batch sizes (files)")
    ap.add_argument("--where", default="local,gluster", help="local and/or gluster (gluster needs the env vars)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--also-separate", action="store_true",
                    help="also run each configuration with claim and publish as two transactions (how workers "
                         "did it before they were merged into one; see docs/benchmarks.md)")
    args = ap.parse_args(argv)

    places = []
    for where in args.where.split(","):
        if where == "local":
            places.append(("local", [None]))
        elif where == "gluster":
            a, b = os.environ.get("LEDGERBC_TEST_GLUSTER_A"), os.environ.get("LEDGERBC_TEST_GLUSTER_B")
            if a and b:
                places.append(("gluster", [Path(a), Path(b)]))
            else:
                print("gluster: skipped (LEDGERBC_TEST_GLUSTER_A/B not set; ci/cluster-up.sh sets them)")
    print(f"machine: {machine()}; SQLite {__import__('sqlite3').sqlite_version}")
    rows = []
    for where, mounts in places:
        for batch in map(int, args.batches.split(",")):
            for procs in map(int, args.procs.split(",")):
                sub = f"ledgerbc-bench-{uuid.uuid4().hex[:10]}"
                if mounts == [None]:
                    folders = [Path(tempfile.mkdtemp(prefix=sub, dir="/tmp"))]
                else:
                    folders = [m / sub for m in mounts]
                    folders[0].mkdir()
                for separate in ([False, True] if args.also_separate else [False]):
                    try:
                        rate = 1000 if batch == 1 else 300  # generous upper guesses of assignments/s
                        n = ledger_files(batch, procs, args.seconds, rate)
                        row = run_config(where, folders, procs, batch, n, args.seconds, separate)
                    finally:
                        shutil.rmtree(folders[0], ignore_errors=True)
                    folders[0].mkdir()  # the next mode starts from an empty folder
                    rows.append(row)
                    print(f"  {row['where']} procs={procs} batch={batch}: {row['assignments_per_s']} assignments/s, "
                          f"claim p50 {row['claim_p50_ms']} ms, p99 {row['claim_p99_ms']} ms", flush=True)
                shutil.rmtree(folders[0], ignore_errors=True)
    print()
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
