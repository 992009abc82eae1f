"""Where one ledger stops being enough (DESIGN §6): GPU time lost to coordination as the worker count grows.

A worker loses GPU time to coordination between two batches: from the end of dorado's batch until its
next batch can start, it publishes and claims in one ledger transaction (waiting for the lock, holding
it) and sometimes makes its share of janitor passes (`Janitor.maybe_run` at the top of `run.py`'s loop).
Heartbeats and the janitor passes made while dorado runs cost no GPU time, but they hold the same lock
and make the between-batch transactions wait. Hours of a real run cannot be replayed in real time, so:

1. measure (real, on GlusterFS through both mounts, or local disk): a ledger of `--files` pending files
   and `--running` running batches of as many registered workers, `work/ASSIGNED_*` folders and lease
   files as a run has them; `--procs` processes run a mix of the real transactions back to back for
   `--seconds`: publish + claim next (`claim.publish(..., claim_next=...)`), the ledger heartbeat
   (`claim.heartbeat`), a lease-file beat (`lease.write`, no lock) and janitor passes
   (`Janitor.run_pass`: its two transactions, the listing of work/ and of the lease folder). Recorded per
   transaction: the time before the lock (opening the connection), lock wait, lock hold, time after the
   lock (closing). Also the lock hand-off (release -> the next waiter holds it) and an uncontended
   acquisition, and serially the janitor's costs at `--running` and a quarter of it (cost per running
   batch, for extrapolation).
2. model: a discrete-event simulation of N workers (seeded), driven by those measured samples. Each
   worker: GPU rate uniform in 2-10 MB/s of pod5; batches filled like `choose_batch` with `--batch-size`
   (default 20 GiB, ledgerbc's default) from file sizes of 0.5-20 GB (96% lognormal median 1 GB, 4%
   lognormal median 3 GB, as bench/makespan.py); a batch takes dorado's start-up (uniform 10-20 s) plus
   its bytes at the worker's rate; a heartbeat every 60 s goes to the ledger every half lease (every 8th,
   lease 15 min), the others to lease files; janitor passes as `Janitor.maybe_run` spaces them (about
   `janitor.CREW` per heartbeat across all workers, at the worker's next heartbeat or between batches).
   The lock is one FIFO server (the turnstile queues waiters in order): a transaction that finds it held
   waits for the queue ahead plus a hand-off, one that finds it free pays an uncontended acquisition;
   service = a sampled hold. Array tasks start within `--start-window` seconds of each other (the first
   claims queue up). Lost = between-batch time spent in coordination (connection, wait, hold, close, and
   a janitor pass when it falls there), summed over workers, divided by N x the simulated hours.
3. check the model against reality at small N: N real processes run the same worker loop with real
   ledger transactions (publish + claim, lease.Heartbeat, Janitor.maybe_run, ASSIGNED folders) and
   dorado replaced by a sleep, in compressed time (every duration / `--compress`, with small batches
   so that coordination is a measurable share); the simulation is run with the same parameters and
   the measured costs; both lost fractions are printed side by side.

Then: the lost fraction for N = `--sweep`, and the N where it passes 1% (bisection on the simulation).
`ledgerbc/limits.py` keeps that N (`LEDGER_WORKERS_LIMIT`) for `doctor` and `submit`.

    .venv/bin/python bench/scale_limit.py [--where gluster] [--running 1000] [--files 20000] [--procs 8]
        [--seconds 30] [--validate 4,8,16] [--validate-seconds 90] [--compress 60] [--hours 12] [--seed 1]
"""
from __future__ import annotations

import argparse
import contextlib
import heapq
import json
import math
import os
import random
import shutil
import socket
import sqlite3
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _fill import add_files, machine, new_ledger, pct  # noqa: E402
from _procs import bench_folders, load, places, run_workers  # noqa: E402
from makespan import file_sizes  # noqa: E402

from ledgerbc import claim, db, janitor, lease  # noqa: E402
from ledgerbc.claim import FileResult, OutputRecord  # noqa: E402
from ledgerbc.layout import Layout  # noqa: E402
from ledgerbc.models import PASS, SUMMARY  # noqa: E402
from ledgerbc.publish import Installer, Move  # noqa: E402

GB = 1e9
GIB = 1024**3
LOST_LIMIT = 0.01  # the fraction of GPU time the scale limit is defined by
# transactions under the lock: publish + claim next (the end of a batch), a task's first claim alone, a ledger
# heartbeat, a janitor pass's two
KINDS = ("claim", "first", "beat", "janitor_running", "janitor_cleanup")


# -- the workload ----------------------------------------------------------------------------------------
def pod5_sizes(n: int, seed: int) -> np.ndarray:
    """File sizes of a study: bench/makespan.py's mixture, clipped to 0.5-20 GB."""
    return np.clip(file_sizes(n, seed), 0.5 * GB, 20 * GB).astype(np.int64)


class Workload:
    """What one worker does, in seconds of real (or compressed) time."""

    def __init__(self, batch_bytes: float, compress: float = 1.0, heartbeat: float = 60.0, lease_s: float = 900.0,
                 startup=(10.0, 20.0), rate=(2e6, 10e6)):
        self.batch_bytes = batch_bytes
        self.compress = compress
        self.heartbeat = heartbeat / compress
        self.lease = lease_s / compress
        self.startup = startup
        self.rate = rate
        self.ledger_every = max(1, math.ceil(max(heartbeat, lease_s / 2) / heartbeat))  # lease.ledger_interval

    def batch_seconds(self, n_bytes: float, rate: float, rng: random.Random) -> float:
        return (rng.uniform(*self.startup) + n_bytes / rate) / self.compress


def fill_batch(sizes, pos: int, target: float) -> tuple[int, float]:
    """Files taken from `sizes` at `pos` as choose_batch takes them with a byte target: (next pos, bytes)."""
    total, i = 0.0, pos
    while i < len(sizes):
        s = float(sizes[i])
        if i > pos and total + s > target:
            break
        total += s
        i += 1
        if total >= target:
            break
    return i, total


def staged_publication(ledger, layout: Layout, c: claim.Claim, emit: str = "fastq"):
    """What a worker has ready when dorado is done: per file a small pass/ output and its summary in the
    batch's staging folder (written outside the lock); returns (results, installer) for `claim.publish`,
    whose installer renames them into place under the lock as `publish.Installer` does (pass/, then
    summary/, each folder fsynced) and whose results record them as outputs."""
    staging = layout.staging(c.batch_id, c.token)
    moves = {PASS: [], SUMMARY: []}
    results = []
    for f in c.files:
        outs = []
        for kind, final in ((PASS, layout.pass_path(f.rel, emit)), (SUMMARY, layout.summary_path(f.rel))):
            staged = staging / kind / final.name
            staged.parent.mkdir(parents=True, exist_ok=True)
            staged.write_bytes(b"x" * 64)
            moves[kind].append(Move(staged, final))
            outs.append(OutputRecord(kind, str(final.relative_to(layout.output)), reads=1, bases=1, bytes=64))
        results.append(FileResult(f.rel, ok=True, reads_pass=1, bases=1, outputs=outs))
    return results, Installer([moves[PASS], moves[SUMMARY]], [], ledger.check_lock_trusted)


# -- 1. measuring the costs --------------------------------------------------------------------------------
class TimedLedger(db.Ledger):
    """Records every transaction: (kind, call start, lock requested, acquired, released, call end) in time.time()."""

    kind = "other"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.records: list[tuple] = []
        self._stamp = None

    @contextlib.contextmanager
    def locked(self):
        requested = time.time()
        with super().locked():
            acquired = time.time()
            try:
                yield
            finally:
                self._stamp = (self.kind, requested, acquired, time.time())

    def transact(self, fn, *args, **kwargs):
        start = time.time()
        try:
            return super().transact(fn, *args, **kwargs)
        finally:
            if self._stamp is not None:
                kind, requested, acquired, released = self._stamp
                if kind == "janitor":  # a pass: its first transaction lists the running batches
                    kind = "janitor_running" if fn is janitor._running_batches else "janitor_cleanup"
                self.records.append((kind, start, requested, acquired, released, time.time()))
                self._stamp = None

    @contextlib.contextmanager
    def as_kind(self, kind: str):
        saved, self.kind = self.kind, kind
        try:
            yield
        finally:
            self.kind = saved


def build_study(folder: Path, files: int, running: int, seed: int, lease_s: float = 900.0,
                heartbeat: float = 60.0, batch_bytes: float = 20 * GIB) -> tuple[Path, list[claim.Claim]]:
    """A ledger with `files` pending files and `running` running batches of as many workers, built on local
    disk (fast) then copied into `folder`; ASSIGNED folders and lease files of the running batches in
    `folder`. Returns (ledger path, the claims)."""
    local = Path(f"/tmp/ledgerbc-scale-build-{os.getpid()}")
    shutil.rmtree(local, ignore_errors=True)
    local.mkdir()
    try:
        path = local / "ledgerbc.db"
        new_ledger(path, folder / "input", folder / "output", batch_files=None, batch_bytes=int(batch_bytes),
                   lease=lease_s, heartbeat=heartbeat, clock_skew=60.0)
        ledger = db.Ledger(path)
        add_files(ledger, pod5_sizes(files, seed))
        settings = ledger.read_settings()
        owned = []
        for i in range(running):
            w = f"{9000 + i // 1000}_{i}@gpu{i % 100:03d}"
            claim.register_worker(ledger, w, f"gpu{i % 100:03d}", 1000 + i, "cuda:0")
            owned.append(claim.claim_batch(ledger, w, settings))
        shutil.copy2(path, folder / "ledgerbc.db")
    finally:
        shutil.rmtree(local, ignore_errors=True)
    layout = Layout(folder / "output")
    now = time.time()
    for c in owned:
        layout.assigned(c.batch_id, c.worker_id).mkdir(parents=True)
        lease.write(folder / "ledgerbc.db", c.batch_id, lease.owner(c.worker_id, c.token), now)
    return folder / "ledgerbc.db", owned


def mix_worker(index: int, barrier, path: str, owned, seconds: float, seed: int) -> dict:
    """One process of the contention run: the real transactions of its share of the workers, back to back."""
    rng = random.Random(seed)
    ledger = TimedLedger(path)
    settings = ledger.read_settings()
    jan = janitor.Janitor(ledger, settings)
    slots = list(owned)
    lease_ms = []
    barrier.wait(300)
    ledger.records.clear()
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        r = rng.random()
        k = rng.randrange(len(slots))
        c = slots[k]
        if r < 0.40:  # publish the batch and claim the next, as run.py does at the end of a batch
            results, installer = staged_publication(ledger, jan.layout, c)
            with ledger.as_kind("claim"):
                nxt = claim.publish(ledger, c, results, installer, settings.max_attempts, claim_next=settings)
            if nxt is None:
                break  # the study ran out
            slots[k] = nxt
        elif r < 0.75:
            with ledger.as_kind("beat"):
                claim.heartbeat(ledger, c)
        elif r < 0.85:  # a task that starts: its first claim is a claim alone (this slot's batch given back first)
            claim.release_batch(ledger, c, "benchmark: a new task")
            with ledger.as_kind("first"):
                nxt = claim.claim_batch(ledger, c.worker_id, settings)
            if nxt is None:
                break
            slots[k] = nxt
        elif r < 0.95:
            t0 = time.perf_counter()
            lease.write(ledger.path, c.batch_id, lease.owner(c.worker_id, c.token), time.time())
            lease_ms.append(1000 * (time.perf_counter() - t0))
        else:  # a janitor pass (nothing is silent long enough to be reclaimed here)
            t0 = time.time()
            with ledger.as_kind("janitor"):
                try:
                    jan.run_pass()
                except OSError:  # ESTALE: another pass removed a folder first (Janitor.maybe_run says so too)
                    pass
            ledger.records.append(("janitor_pass", t0, t0, t0, t0, time.time()))
    return {"records": ledger.records, "lease_ms": lease_ms}


def serial_janitor(path: Path, shrink_to: int) -> dict:
    """Janitor costs, one process, no contention: at the running batches the ledger has and at `shrink_to`."""
    ledger = TimedLedger(path)
    settings = ledger.read_settings()
    layout = Layout(Path(settings.output_dir))
    owned = [claim.Claim(b, token, w, []) for b, w, token in ledger.transact(lambda c: c.exec_driver_sql(
        "SELECT id, worker_id, token FROM batches WHERE state = 'running'").all())]
    # As in a run: an ASSIGNED folder and a lease file per running batch, nothing of finished ones.
    janitor.cleanup(ledger, layout, janitor.JanitorReport())
    lease.remove_stale(path, {c.batch_id for c in owned})
    now = time.time()
    for c in owned:
        layout.assigned(c.batch_id, c.worker_id).mkdir(parents=True, exist_ok=True)
        lease.write(path, c.batch_id, lease.owner(c.worker_id, c.token), now)
    out = {}
    ledger.records.clear()
    for _ in range(20):  # an uncontended acquisition of the lock
        ledger.transact(lambda conn: None)
    out["free_acquire"] = [r[3] - r[2] for r in ledger.records]
    for size in (len(owned), shrink_to):
        for c in owned[size:]:
            claim.release_batch(ledger, c, "benchmark")
            shutil.rmtree(layout.assigned(c.batch_id, c.worker_id), ignore_errors=True)
            lease.remove(path, c.batch_id)
        owned = owned[:size]
        runs = []
        for _ in range(5):
            ledger.records.clear()
            t0 = time.time()
            with ledger.as_kind("janitor_running"):
                running = ledger.transact(janitor._running_batches)
            t1 = time.time()
            with ledger.as_kind("janitor_cleanup"):
                janitor.cleanup(ledger, layout, janitor.JanitorReport())  # one process: no ESTALE race here
            t2 = time.time()
            lease.remove_stale(path, {b.id for b in running})
            t3 = time.time()
            recs = {r[0]: r for r in ledger.records}
            runs.append({
                "running_hold": recs["janitor_running"][4] - recs["janitor_running"][3],
                "cleanup_hold": recs["janitor_cleanup"][4] - recs["janitor_cleanup"][3],
                "running_call": t1 - t0, "cleanup_call": t2 - t1, "leases_listing": t3 - t2,
            })
        out[size] = {k: float(np.median([r[k] for r in runs])) for k in runs[0]}
    return out


def measure(where: str, mounts, files: int, running: int, procs: int, seconds: float, seed: int,
            batch_bytes: float = 20 * GIB) -> dict:
    """Phase 1: per-kind costs under contention (real), hand-off, and the janitor's cost per running batch."""
    with bench_folders(mounts, "ledgerbc-scale") as folders:
        path, owned = build_study(folders[0], files, running, seed, batch_bytes=batch_bytes)
        procs = min(procs, running)  # every process works for at least one worker
        paths = [folders[i % len(folders)] / "ledgerbc.db" for i in range(procs)]
        shares = [owned[i::procs] for i in range(procs)]
        load_before = load()
        results = run_workers(mix_worker, procs, lambda i: (str(paths[i]), shares[i], seconds, seed * 100 + i),
                              folders[0], seconds + 900)
        load_after = load()
        jan = serial_janitor(path, max(1, running // 4))
        serial_free = jan.pop("free_acquire")
    records = sorted((tuple(r) for res in results for r in res["records"]), key=lambda r: r[3])
    tx = [r for r in records if r[0] != "janitor_pass"]
    costs = {k: {"pre": [], "hold": [], "post": []} for k in KINDS}
    for kind, start, req, acq, rel, end in tx:
        if kind not in costs:
            continue
        costs[kind]["pre"].append(req - start)
        costs[kind]["hold"].append(rel - acq)
        costs[kind]["post"].append(end - rel)
    handoff, free_acquire = [], []
    for prev, cur in zip(tx, tx[1:]):
        if cur[2] < prev[4]:  # it asked while the previous one held the lock: a hand-off
            handoff.append(cur[3] - prev[4])
        elif cur[2] > prev[4]:
            free_acquire.append(cur[3] - cur[2])
    free_acquire += serial_free
    passes = [r for r in records if r[0] == "janitor_pass"]
    span = tx[-1][4] - tx[0][3] if tx else 1.0
    busy = sum(r[4] - r[3] for r in tx)
    base, per_batch = janitor_fit({str(k): v for k, v in jan.items()})
    return {
        "where": where, "procs": procs, "files": files, "running": running, "seconds": seconds,
        "batch_gib": batch_bytes / GIB,
        "load": [load_before, load_after],
        "costs": {k: {p: [round(x, 6) for x in v] for p, v in c.items()} for k, c in costs.items()},
        "handoff": [round(x, 6) for x in handoff], "free_acquire": [round(x, 6) for x in free_acquire],
        "lease_write_ms": [x for res in results for x in res["lease_ms"]],
        "janitor_serial": {str(k): v for k, v in jan.items()},
        "janitor_per_batch": per_batch, "janitor_base": base,
        "lock_busy": busy / span, "tx_per_s": len(tx) / span, "passes": len(passes),
    }


def janitor_fit(serial: dict) -> tuple[dict, dict]:
    """a + b x running batches through the two measured sizes; a cost that did not grow (noise) is flat."""
    sizes = {int(k): v for k, v in serial.items()}
    small, big = min(sizes), max(sizes)
    per_batch = {k: max(0.0, (sizes[big][k] - sizes[small][k]) / max(1, big - small)) for k in sizes[big]}
    base = {k: max(0.0, sizes[big][k] - per_batch[k] * big) for k in sizes[big]}
    return base, per_batch


def print_costs(m: dict) -> None:
    print(f"\nmeasured on {m['where']}: {m['procs']} processes, {m['seconds']:.0f} s, ledger of {m['files']} files and "
          f"{m['running']} running batches of {m['batch_gib']:g} GiB; load {m['load'][0]} -> {m['load'][1]}; lock busy {100 * m['lock_busy']:.0f}% "
          f"({m['tx_per_s']:.1f} tx/s)")
    print(f"{'kind':<17}{'n':>6}{'before lock p50':>17}{'hold p50':>10}{'hold p99':>10}{'after p50':>11}")
    for k, c in m["costs"].items():
        if c["hold"]:
            print(f"{k:<17}{len(c['hold']):>6}{1000 * pct(c['pre'], 50):>15.1f}ms{1000 * pct(c['hold'], 50):>8.1f}ms"
                  f"{1000 * pct(c['hold'], 99):>8.1f}ms{1000 * pct(c['post'], 50):>9.1f}ms")
    print(f"lock hand-off (release -> next holder) p50 {1000 * pct(m['handoff'], 50):.1f} ms, p99 "
          f"{1000 * pct(m['handoff'], 99):.1f} ms (n={len(m['handoff'])}); uncontended acquisition p50 "
          f"{1000 * pct(m['free_acquire'], 50):.1f} ms (n={len(m['free_acquire'])}); lease-file beat p50 "
          f"{pct(m['lease_write_ms'], 50):.1f} ms")
    jb, jp = janitor_fit(m["janitor_serial"])
    print("janitor (serial, fitted a + b x running batches): " + ", ".join(
        f"{k} {1000 * jb[k]:.1f} ms + {1e6 * jp[k]:.1f} us/batch" for k in jb))


# -- 2. the model ----------------------------------------------------------------------------------------------
class Costs:
    """Samplers over the measured costs (seconds)."""

    def __init__(self, m: dict, rng: random.Random):
        self.rng = rng
        self.m = m
        self.jb, self.jp = janitor_fit(m["janitor_serial"])
        # The janitor's holds under contention, as a ratio to the serial fit at the measured size.
        self.jratio = {}
        for k, key in (("janitor_running", "running_hold"), ("janitor_cleanup", "cleanup_hold")):
            serial = self.jb[key] + self.jp[key] * m["running"]
            held = m["costs"][k]["hold"]
            self.jratio[k] = (float(np.median(held)) / serial) if held and serial > 0 else 1.0

    def pick(self, values):
        return values[self.rng.randrange(len(values))]

    def pre(self, kind):
        return self.pick(self.m["costs"][kind]["pre"])

    def post(self, kind):
        return self.pick(self.m["costs"][kind]["post"])

    def hold(self, kind, running: int = 0):
        if kind == "janitor_running":
            return (self.jb["running_hold"] + self.jp["running_hold"] * running) * self.jratio[kind]
        if kind == "janitor_cleanup":
            return (self.jb["cleanup_hold"] + self.jp["cleanup_hold"] * running) * self.jratio[kind]
        return self.pick(self.m["costs"][kind]["hold"])

    def listing(self, running: int) -> float:
        """A pass's work outside the lock: work/ listed, lease folder listed."""
        return (self.jb["leases_listing"] + self.jp["leases_listing"] * running
                + max(0.0, (self.jb["cleanup_call"] + self.jp["cleanup_call"] * running)
                      - (self.jb["cleanup_hold"] + self.jp["cleanup_hold"] * running)))

    def acquire(self, contended: bool) -> float:
        return self.pick(self.m["handoff"] if contended else self.m["free_acquire"])


def simulate(m: dict, n: int, hours: float, wl: Workload, seed: int, start_window: float = 30.0,
             crew: int = janitor.CREW) -> dict:
    """Phase 2: N workers for `hours` of (compressed) time; returns the lost fraction and lock figures.

    Events, in time order: a lock request ("req") is served FIFO when it is processed, and its
    continuation is scheduled for when the transaction is over (hold + closing)."""
    rng = random.Random(seed)
    costs = Costs(m, rng)
    sizes = pod5_sizes(200_000, seed)
    pos = 0
    horizon = hours * 3600.0
    events = []  # (time, seq, what, worker, data)
    seq = 0
    free_at = 0.0
    busy = 0.0
    lost = [0.0] * n
    first = [0.0] * n  # of which: the wait for the first batch (the array's start-up)
    waiting = [None] * n  # since when a worker is between batches (to count a wait still open at the end)
    beat_waits = []
    rates = [rng.uniform(*wl.rate) for _ in range(n)]
    running = n  # batches running, about one per worker: the janitor's work scales with it
    next_pass = [0.0] * n
    hb = wl.heartbeat

    def push(t, what, w, data=None):
        nonlocal seq
        seq += 1
        heapq.heappush(events, (t, seq, what, w, data))

    def request(t, kind, w, then, data):
        push(t + costs.pre(kind), "req", w, (kind, then, data))

    def pass_interval():
        return hb * max(1.0, running / crew) * rng.uniform(0.5, 1.5)

    def start_batch(w, t):
        nonlocal pos
        waiting[w] = None
        pos2, n_bytes = fill_batch(sizes, pos, wl.batch_bytes)
        pos = pos2 if pos2 < len(sizes) else 0
        end = t + wl.batch_seconds(n_bytes, rates[w], rng)
        push(end, "end", w, end)
        # ledger beats: every ledger_every-th heartbeat, from a random phase (lease-file beats take no lock)
        beat = t + hb * rng.randint(1, wl.ledger_every)
        while beat < end and beat < horizon:
            push(beat, "beat", w)
            beat += hb * wl.ledger_every
        # a janitor pass due during the batch is made at the first heartbeat after it is due
        if next_pass[w] < end:
            tick = t + hb * max(1, math.ceil((next_pass[w] - t) / hb))
            if tick < end:
                push(tick, "pass", w)
                next_pass[w] = math.inf  # re-armed when that pass is over

    for w in range(n):
        t0 = rng.uniform(0, start_window / wl.compress)
        next_pass[w] = t0 + pass_interval() * rng.random()
        push(t0, "start", w, t0)
    while events:
        t, _s, what, w, data = heapq.heappop(events)
        if t > horizon:
            break
        if what == "req":
            kind, then, d = data
            contended = t < free_at
            got = max(t, free_at) + costs.acquire(contended)
            hold = costs.hold(kind, running)
            free_at = got + hold
            busy += hold
            if kind == "beat":
                beat_waits.append(got - t)
            if then is not None:
                push(free_at + costs.post(kind), then, w, d)
        elif what == "end":  # dorado is done: publish + claim next, in one transaction
            waiting[w] = t
            request(t, "claim", w, "claimed", data)
        elif what == "start":  # the task starts: its first claim, alone
            waiting[w] = t
            first[w] = -t  # completed when the first batch starts
            request(t, "first", w, "claimed", data)
        elif what == "claimed":
            if t >= next_pass[w]:  # Janitor.maybe_run at the top of run.py's loop: between batches
                request(t, "janitor_running", w, "listed", (True, data))
            else:
                lost[w] += min(t, horizon) - data
                if first[w] < 0:
                    first[w] += min(t, horizon)
                start_batch(w, t)
        elif what == "pass":  # while dorado runs: no GPU time lost, the lock is held all the same
            request(t, "janitor_running", w, "listed", (False, None))
        elif what == "listed":
            push(t + costs.listing(running), "cleanup", w, data)
        elif what == "cleanup":
            request(t, "janitor_cleanup", w, "passed", data)
        elif what == "passed":
            between, began = data
            next_pass[w] = t + pass_interval()
            if between:
                lost[w] += min(t, horizon) - began
                if first[w] < 0:
                    first[w] += min(t, horizon)
                start_batch(w, t)
        elif what == "beat":
            request(t, "beat", w, None, None)
    for w in range(n):  # still between batches when the simulation ends: that wait counts too
        if waiting[w] is not None and waiting[w] < horizon:
            lost[w] += horizon - waiting[w]
            if first[w] < 0:
                first[w] += horizon
    total = sum(lost)
    firsts = [max(0.0, f) for f in first]
    return {
        "n": n, "hours": hours, "lost_fraction": total / (n * horizon),
        "steady_fraction": (total - sum(firsts)) / (n * horizon),
        "first_wait_mean_s": sum(firsts) / n, "first_wait_max_s": max(firsts),
        "lost_per_worker_s": total / n, "lock_busy": busy / horizon,
        "beat_wait_p99_s": pct(beat_waits, 99) if beat_waits else 0.0,
        "beat_wait_max_s": max(beat_waits) if beat_waits else 0.0,
    }


def limit_n(m: dict, hours: float, wl: Workload, seed: int, start_window: float, key: str = "lost_fraction",
            lo: int = 10, hi: int = 100_000) -> int:
    """The smallest N whose simulated `key` passes LOST_LIMIT (bisection on a log scale)."""
    def over(n):
        return simulate(m, n, hours, wl, seed, start_window)[key] > LOST_LIMIT
    if over(lo):
        return lo
    while not over(hi):
        lo, hi = hi, hi * 2
        if hi > 2_000_000:
            return hi
    while hi / lo > 1.02:
        mid = int(math.sqrt(lo * hi))
        if over(mid):
            hi = mid
        else:
            lo = mid
    return hi


# -- 3. the check at small N, in compressed real time ---------------------------------------------------------
def real_worker(index: int, barrier, path: str, seconds: float, wl_args: dict, seed: int) -> dict:
    """A worker of `run.py`'s loop with dorado replaced by a sleep: real claims, heartbeats, janitor."""
    rng = random.Random(seed)
    wl = Workload(**wl_args)
    ledger = db.Ledger(path)
    settings = ledger.read_settings()
    jan = janitor.Janitor(ledger, settings)
    layout = Layout(Path(settings.output_dir))
    w = f"{7000}_{index}@{socket.gethostname()}"
    claim.register_worker(ledger, w, socket.gethostname(), os.getpid(), None)
    rate = rng.uniform(*wl.rate)
    barrier.wait(300)
    start = time.monotonic()
    deadline = start + seconds
    lost = 0.0
    batches = 0
    t0 = time.monotonic()
    batch = claim.claim_batch(ledger, w, settings)
    jan.maybe_run()
    lost += time.monotonic() - t0
    while batch is not None and time.monotonic() < deadline:
        began = time.monotonic()
        assigned = layout.assigned(batch.batch_id, w)
        assigned.mkdir(parents=True, exist_ok=True)
        end = began + wl.batch_seconds(batch.n_bytes, rate, rng)
        beat = lease.Heartbeat(ledger, settings, batch)
        results, installer = staged_publication(ledger, layout, batch)  # dorado's output, split: in its time
        beat.last_ledger -= rng.uniform(0, beat.every)  # steady state: ledger beats at random phases
        while True:
            nap = min(end, time.monotonic() + wl.heartbeat) - time.monotonic()
            if nap > 0:
                time.sleep(nap)
            if time.monotonic() >= end:
                break
            beat.beat()
            jan.maybe_run()
        if time.monotonic() >= deadline:
            break
        t0 = time.monotonic()
        nxt = claim.publish(ledger, batch, results, installer, settings.max_attempts, claim_next=settings)
        jan.maybe_run()
        lost += time.monotonic() - t0
        lease.remove(ledger.path, batch.batch_id)
        try:
            # (a janitor pass of another worker may be removing them too: ESTALE on GlusterFS)
            shutil.rmtree(assigned, ignore_errors=True)
            shutil.rmtree(layout.staging(batch.batch_id, batch.token), ignore_errors=True)
        except OSError:
            pass
        batches += 1
        batch = nxt
    return {"lost": lost, "span": min(time.monotonic(), deadline) - start, "batches": batches}


def validate(where: str, mounts, ns, seconds: float, m: dict, wl: Workload, seed: int) -> list[dict]:
    out = []
    wl_args = dict(batch_bytes=wl.batch_bytes, compress=wl.compress, heartbeat=wl.heartbeat * wl.compress,
                   lease_s=wl.lease * wl.compress)
    for n in ns:
        with bench_folders(mounts, "ledgerbc-scale-check") as folders:
            path = folders[0] / "ledgerbc.db"
            new_ledger(path, folders[0] / "input", folders[0] / "output", batch_files=None,
                       batch_bytes=int(wl.batch_bytes), lease=wl.lease, heartbeat=wl.heartbeat,
                       clock_skew=wl.heartbeat)
            add_files(db.Ledger(path), pod5_sizes(20_000, seed))
            paths = [folders[i % len(folders)] / "ledgerbc.db" for i in range(n)]
            load_before = load()
            res = run_workers(real_worker, n, lambda i: (str(paths[i]), seconds, wl_args, seed * 1000 + i),
                              folders[0], seconds + 900)
        real = sum(r["lost"] for r in res) / sum(r["span"] for r in res)
        sims = [simulate(m, n, seconds / 3600.0, wl, seed + k, start_window=0.0)["lost_fraction"] for k in range(5)]
        out.append({"n": n, "real": real, "model": float(np.mean(sims)), "model_min": min(sims),
                    "model_max": max(sims), "batches": sum(r["batches"] for r in res),
                    "load": [load_before, load()]})
        print(f"  check N={n}: real {100 * real:.3f}% lost, model {100 * out[-1]['model']:.3f}% "
              f"({100 * min(sims):.3f}-{100 * max(sims):.3f}), {out[-1]['batches']} batches", flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--where", default="gluster", help="gluster (default) or local")
    ap.add_argument("--files", type=int, default=None,
                    help="pending files in the measured ledger (default 25 per running batch + 20,000)")
    ap.add_argument("--running", type=int, default=1000, help="running batches (workers) in the measured ledger")
    ap.add_argument("--procs", type=int, default=8, help="processes of the contention run")
    ap.add_argument("--seconds", type=float, default=30.0, help="length of the contention run")
    ap.add_argument("--batch-size", type=float, default=20.0, help="batch target in GiB (ledgerbc's default 20)")
    ap.add_argument("--hours", type=float, default=8.0, help="simulated hours per N")
    ap.add_argument("--start-window", type=float, default=60.0, help="seconds over which the array tasks start")
    ap.add_argument("--sweep", default="100,300,1000,3000,10000,20000,30000,50000",
                    help="worker counts to simulate")
    ap.add_argument("--validate", default="4,8,16", help="worker counts of the real compressed-time check ('' skips)")
    ap.add_argument("--validate-seconds", type=float, default=90.0)
    ap.add_argument("--compress", type=float, default=60.0, help="time compression of the real check")
    ap.add_argument("--validate-batch", type=float, default=2.0, help="batch target (GiB) of the real check")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--costs", type=Path, default=None, help="reuse the measured costs of an earlier --json")
    ap.add_argument("--json", type=Path, default=None, help="write everything here")
    args = ap.parse_args(argv)

    print(f"machine: {machine()}; SQLite {sqlite3.sqlite_version}; journal {db.JOURNAL_MODE}")
    where = places(args.where)
    if not where:
        return 1
    name, mounts = where[0]
    if args.costs:
        m = json.loads(args.costs.read_text())["measured"]
    else:
        files = args.files or args.running * 25 + 20_000
        m = measure(name, mounts, files, args.running, args.procs, args.seconds, args.seed)
    print_costs(m)
    out = {"machine": machine(), "measured": m}

    if args.validate:
        ns = [int(x) for x in args.validate.split(",")]
        wl = Workload(args.validate_batch * GIB, compress=args.compress)
        print(f"\ncheck of the model: its costs measured the same way for the check's configuration "
              f"({args.validate_batch:g} GiB batches, {max(ns)} running)", flush=True)
        if args.costs:
            mv = json.loads(args.costs.read_text())["measured_check"]
        else:
            mv = measure(name, mounts, 20_000, max(ns), args.procs, args.seconds, args.seed, args.validate_batch * GIB)
        print_costs(mv)
        out["measured_check"] = mv
        print(f"\nreal processes in compressed time (x{args.compress:g}: heartbeat {wl.heartbeat:.2f} s, lease "
              f"{wl.lease:.1f} s, {args.validate_batch:g} GiB batches of "
              f"{wl.batch_seconds(args.validate_batch * GIB, 6e6, random.Random(0)):.1f} s at 6 MB/s):", flush=True)
        out["validation"] = validate(name, mounts, ns, args.validate_seconds, mv, wl, args.seed)

    wl = Workload(args.batch_size * GIB)
    print(f"\nsimulated: {args.hours:g} h, {args.batch_size:g} GiB batches, tasks starting within "
          f"{args.start_window:g} s (seed {args.seed})")
    print(f"{'N':>8}{'GPU time lost':>15}{'steady state':>14}{'first batch wait mean/max':>28}{'lock busy':>11}"
          f"{'ledger beat wait p99':>22}")
    sweep = []
    for n in [int(x) for x in args.sweep.split(",")]:
        r = simulate(m, n, args.hours, wl, args.seed, args.start_window)
        sweep.append(r)
        print(f"{n:>8}{100 * r['lost_fraction']:>14.4f}%{100 * r['steady_fraction']:>13.4f}%"
              f"{r['first_wait_mean_s']:>18.1f} / {r['first_wait_max_s']:<7.1f}s{100 * r['lock_busy']:>10.1f}%"
              f"{r['beat_wait_p99_s']:>20.2f} s", flush=True)
    n_limit = limit_n(m, args.hours, wl, args.seed, args.start_window)
    n_steady = limit_n(m, args.hours, wl, args.seed, args.start_window, key="steady_fraction")
    print(f"\nGPU time lost to coordination passes {100 * LOST_LIMIT:g}% at N = {n_limit} workers over a "
          f"{args.hours:g} h run that starts them within {args.start_window:g} s ({args.batch_size:g} GiB batches); "
          f"in the steady state (first batches not counted) at N = {n_steady}.")
    out.update(sweep=sweep, limit_n=n_limit, limit_n_steady=n_steady, args=vars(args) | {"costs": str(args.costs), "json": str(args.json)})
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
