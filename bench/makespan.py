"""Makespan of a simulated run: does ledgerbc's batch sizing keep every GPU busy to the end?

A discrete-event simulation in one process: a priority queue of worker events (batch finished,
heartbeat due), a fake clock, no sleeping. Every claim, heartbeat and publication is the REAL
transaction (`claim.claim_batch`, `claim.heartbeat`, `claim.publish`) on a REAL ledger whose clock is
the simulation's (`Ledger(path, clock=sim_clock)`), so what is measured is ledgerbc's batch sizing
policy, not this machine. The ledger lives on /dev/shm to keep the run short; that changes no figure.

Workload (seeded): 5,000 files; 96% from a lognormal with median 1.0 GB and sigma 0.35 (90% of
those between 0.56 and 1.78 GB), 4% from a lognormal with median 3 GB and sigma 0.8 (the long tail),
all clipped to [40 MB, 20 GB], in random order (scan order is unrelated to size). A batch takes
STARTUP seconds (dorado's model load, 15 s) plus its bytes / RATE (10 MB/s of pod5 per GPU, about
dorado hac on an A100-class GPU); 64 workers start together.

Policies:
  adaptive  ledgerbc's default: byte-target batches (--batch-size 20G), shrunk toward the end, largest
            files first once shrunk (choose_batch)
  oldest    the same, but oldest first to the very end (claim.TAIL_LARGEST_FIRST = False; ledgerbc
            before the largest-first change)
  fixed10   the replaced system: 10 files per batch, never shrunk
  count10   ledgerbc's --batch-files 10 (count target, shrunk toward the end)
  static    a static round-robin split of the files over the 64 array tasks, one dorado run each

Scenario `chemistries` (DESIGN §4: a batch never mixes chemistry keys): the same number of files in
three chemistry groups of skewed sizes, 70% / 25% / 5% of the bytes (5 kHz DNA SQK-LSK114, body median
1.5 GB; 5 kHz DNA SQK-NBD114-96, median 1.0 GB; RNA004, median 0.7 GB; each with a 4% long tail of
median 3x its body's, sigma 0.8), clipped to [0.5 GB, 20 GB]. Two admission orders: `mixed` (random, as
one folder holding every run) and `grouped` (run after run, as a scan walks one run folder after another:
the 5% group comes last). Every batch holds one key (the claim's rule), so the tail has three queues.

Lower bound: max(total bytes / RATE / workers + STARTUP, largest file / RATE + STARTUP): every
worker that works pays at least one startup, and the largest file is basecalled by one GPU.

    .venv/bin/python bench/makespan.py [--seeds 5] [--workers 64] [--files 5000] [--scenario all|single|chemistries]
"""
from __future__ import annotations

import argparse
import heapq
import math
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _fill import add_files, machine, new_ledger, observations  # noqa: E402

from ledgerbc import claim  # noqa: E402
from ledgerbc.db import Ledger  # noqa: E402

GB = 1e9
RATE = 10e6  # bytes of pod5 per second per GPU
STARTUP = 15.0  # seconds of dorado start-up (model load) per batch
POLICIES = ("adaptive", "oldest", "fixed10", "count10", "static")
SCENARIOS = ("single", "chemistries")
# (run info key, share of the bytes, body median in GB, body sigma): the `chemistries` scenario.
GROUPS = (
    (("FLO-PRO114M", "SQK-LSK114", 5000), 0.70, 1.5, 0.5),
    (("FLO-PRO114M", "SQK-NBD114-96", 5000), 0.25, 1.0, 0.35),
    (("FLO-PRO004RA", "SQK-RNA004", 4000), 0.05, 0.7, 0.3),
)
TAIL_SHARE, TAIL_SIGMA = 0.04, 0.8


def file_sizes(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    body = rng.lognormal(math.log(1.0 * GB), 0.35, n)
    tail = rng.lognormal(math.log(3.0 * GB), 0.8, n)
    sizes = np.where(rng.random(n) < 0.04, tail, body)
    return np.clip(sizes, 40e6, 20 * GB).astype(np.int64)


def chemistry_workload(n: int, seed: int, order: str) -> tuple[np.ndarray, list]:
    """(sizes, run info key per file) of the `chemistries` scenario: GROUPS, `order` 'mixed' or 'grouped'."""
    rng = np.random.default_rng(seed)
    # Files per group so that the groups' bytes are about their shares (lognormal means, tails included).
    means = [(1 - TAIL_SHARE) * med * math.exp(sig ** 2 / 2) + TAIL_SHARE * 3 * med * math.exp(TAIL_SIGMA ** 2 / 2)
             for _key, _share, med, sig in GROUPS]
    weights = [share / mean for (_key, share, _m, _s), mean in zip(GROUPS, means)]
    counts = [round(n * w / sum(weights)) for w in weights]
    counts[0] += n - sum(counts)
    sizes, keys = [], []
    for (key, _share, med, sig), count in zip(GROUPS, counts):
        body = rng.lognormal(math.log(med * GB), sig, count)
        tail = rng.lognormal(math.log(3 * med * GB), TAIL_SIGMA, count)
        group = np.clip(np.where(rng.random(count) < TAIL_SHARE, tail, body), 0.5 * GB, 20 * GB).astype(np.int64)
        sizes.append(group)
        keys += [key] * count
    sizes = np.concatenate(sizes)
    if order == "mixed":
        perm = rng.permutation(n)
        sizes, keys = sizes[perm], [keys[i] for i in perm]
    return sizes, keys


def lower_bound(sizes, workers: int) -> float:
    return max(sizes.sum() / RATE / workers + STARTUP, sizes.max() / RATE + STARTUP)


def static_makespan(sizes, workers: int) -> float:
    """Round-robin: task i gets files i, i+workers, ...; one dorado run (one startup) per task."""
    return max(STARTUP + sizes[i::workers].sum() / RATE for i in range(workers) if len(sizes[i::workers]))


@contextmanager
def oldest_first_to_the_end():
    """choose_batch without its largest-first tail: oldest first throughout."""
    saved = claim.TAIL_LARGEST_FIRST
    claim.TAIL_LARGEST_FIRST = False
    try:
        yield
    finally:
        claim.TAIL_LARGEST_FIRST = saved


@contextmanager
def never_shrink():
    """The replaced system's fixed batches: choose_batch as if the end of the run were never near."""
    original = claim.choose_batch

    def fixed(pending, batch_files, batch_bytes, live_workers, exhausted):
        return original(pending, batch_files, batch_bytes, live_workers, exhausted=False)

    claim.choose_batch = fixed
    try:
        yield
    finally:
        claim.choose_batch = original


class Simulation:
    """Workers, each: claim -> heartbeat every `settings.heartbeat` s -> publish at the batch's end -> claim."""

    def __init__(self, ledger_path: Path, settings, workers: int):
        self.now = 0.0
        self.ledger = Ledger(ledger_path, clock=lambda: self.now)
        self.settings = settings
        self.workers = [f"sim_{i}@node{i // 4:03d}" for i in range(workers)]
        self.queue: list = []  # (time, seq, kind, worker, claim, batch end)
        self.seq = 0
        self.batches: list[tuple[float, float, int, int]] = []  # (start, end, files, bytes)
        self.key_of: dict[str, str] = {}  # rel -> chemistry key (the `chemistries` scenario)
        self.mixed = 0  # batches whose files have more than one chemistry key (must stay 0)
        self.transactions = 0

    def push(self, t: float, kind: str, worker: str, c, end: float) -> None:
        self.seq += 1  # ties: first scheduled, first served
        heapq.heappush(self.queue, (t, self.seq, kind, worker, c, end))

    def start_batch(self, worker: str) -> None:
        c = claim.claim_batch(self.ledger, worker, self.settings)
        self.transactions += 1
        if c is None:  # nothing pending: the worker exits (no new files arrive in this run)
            claim.worker_exited(self.ledger, worker, "nothing pending")
            return
        end = self.now + STARTUP + c.n_bytes / RATE
        self.batches.append((self.now, end, len(c.files), c.n_bytes))
        self.mixed += len({self.key_of.get(f.rel) for f in c.files}) > 1
        self.push(end, "done", worker, c, end)
        if self.now + self.settings.heartbeat < end:
            self.push(self.now + self.settings.heartbeat, "beat", worker, c, end)

    def run(self) -> float:
        for w in self.workers:
            claim.register_worker(self.ledger, w, w.split("@")[1], 0, "cuda:0")
        for w in self.workers:
            self.start_batch(w)
        makespan = 0.0
        while self.queue:
            t, _seq, kind, worker, c, end = heapq.heappop(self.queue)
            self.now = t
            if kind == "beat":
                claim.heartbeat(self.ledger, c)
                self.transactions += 1
                if t + self.settings.heartbeat < end:
                    self.push(t + self.settings.heartbeat, "beat", worker, c, end)
                continue
            results = [claim.FileResult(f.rel, True, reads_pass=1) for f in c.files]
            claim.publish(self.ledger, c, results, None, self.settings.max_attempts)
            self.transactions += 1
            makespan = max(makespan, t)
            self.start_batch(worker)
        return makespan


def simulate(policy: str, sizes, workers: int, heartbeat: float, folder: Path, keys=None) -> dict:
    if policy == "static":
        return {"makespan": static_makespan(sizes, workers), "batches": workers}
    path = folder / f"{policy}.db"
    if policy in ("adaptive", "oldest"):
        kw = dict(batch_bytes=20 * 1024**3, batch_files=None)
    else:
        kw = dict(batch_files=10, batch_bytes=None)
    settings = new_ledger(path, folder / "in", folder / "out", heartbeat=heartbeat, **kw)
    add_files(Ledger(path), sizes, keys=keys)
    sim = Simulation(path, settings, workers)
    if keys is not None:
        sim.key_of = {o.rel: o.info.run_info.key for o in observations(sizes, keys=keys)}
    variant = {"fixed10": never_shrink, "oldest": oldest_first_to_the_end}.get(policy)
    if variant is not None:
        with variant():
            makespan = sim.run()
    else:
        makespan = sim.run()
    return {
        "makespan": makespan, "batches": len(sim.batches), "transactions": sim.transactions, "mixed": sim.mixed,
        "last_batch": max(sim.batches, key=lambda b: b[1]),
        "startup_share": len(sim.batches) * STARTUP / sum(e - s for s, e, _n, _b in sim.batches),
        "idle_share": 1 - sum(e - s for s, e, _n, _b in sim.batches) / (makespan * workers),
    }


def workloads(scenario: str, files: int, seed: int):
    """(name, sizes, keys or None) of each workload of `scenario` for one seed."""
    if scenario in ("single", "all"):
        yield "single", file_sizes(files, seed), None
    if scenario in ("chemistries", "all"):
        for order in ("mixed", "grouped"):
            sizes, keys = chemistry_workload(files, seed, order)
            yield f"chemistries/{order}", sizes, keys


def describe(sizes, keys) -> str:
    text = (f"total {sizes.sum() / 1e12:.2f} TB, median {np.median(sizes) / GB:.2f} GB, "
            f"p99 {np.percentile(sizes, 99) / GB:.2f} GB, largest {sizes.max() / GB:.2f} GB")
    if keys is not None:
        shares = []
        for key, *_ in GROUPS:
            mine = sizes[[k == key for k in keys]]
            shares.append(f"{key[1]} {len(mine)} files {mine.sum() / sizes.sum():.0%} of bytes")
        text += "; " + ", ".join(shares)
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=5, help="workloads to simulate (seeds 0..N-1)")
    ap.add_argument("--workers", type=int, default=64)
    ap.add_argument("--files", type=int, default=5000)
    # Heartbeats matter to batch sizing only through liveness (a worker counts as live when seen within
    # lease + clock skew = 960 s): any interval below that gives the same batches. 300 s keeps the run
    # short (heartbeats are most of the transactions); --heartbeat 60 gives identical makespans.
    ap.add_argument("--heartbeat", type=float, default=300.0, help="simulated heartbeat interval, seconds")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--scenario", choices=SCENARIOS + ("all",), default="all",
                    help="single: one chemistry; chemistries: three groups of skewed sizes (70/25/5%% of bytes)")
    args = ap.parse_args(argv)
    policies = args.policies.split(",")
    print(f"machine: {machine()}")
    print(f"workload: {args.files} files, {args.workers} workers, RATE {RATE / 1e6:.0f} MB/s/GPU, "
          f"STARTUP {STARTUP:.0f} s/batch, heartbeat {args.heartbeat:.0f} s, seeds 0..{args.seeds - 1}")
    ratios: dict[tuple[str, str], list[float]] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ledgerbc-makespan-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None) as tmp:
        for seed in range(args.seeds):
            for name, sizes, keys in workloads(args.scenario, args.files, seed):
                lb = lower_bound(sizes, args.workers)
                print(f"\nseed {seed}, {name}: {describe(sizes, keys)}; lower bound {lb:,.0f} s")
                for policy in policies:
                    t0 = time.perf_counter()
                    r = simulate(policy, sizes, args.workers, args.heartbeat, Path(tmp), keys)
                    ratio = r["makespan"] / lb
                    ratios.setdefault((name, policy), []).append(ratio)
                    extra = ""
                    if "last_batch" in r:
                        s, e, n, b = r["last_batch"]
                        extra = (f"; GPUs idle {r['idle_share']:.1%}, startups {r['startup_share']:.2%} of busy time; "
                                 f"last to finish: {n} files {b / GB:.1f} GB claimed at {s:,.0f} s; "
                                 f"{r['transactions']} transactions in {time.perf_counter() - t0:.1f} s")
                        if r["mixed"]:
                            extra += f"; {r['mixed']} BATCHES MIXED CHEMISTRIES"
                    print(f"  {policy:<9} makespan {r['makespan']:>9,.0f} s  lower bound {lb:>9,.0f} s  "
                          f"ratio {ratio:.3f}  batches {r['batches']}{extra}")
    print(f"\nmakespan / lower bound over {args.seeds} seeds (median, worst):")
    for (name, policy), values in ratios.items():
        print(f"  {name:<20} {policy:<9} {statistics.median(values):.3f}  {max(values):.3f}")
    met = all(max(v) <= 1.05 for (name, policy), v in ratios.items() if policy == "adaptive")
    print(f"target: adaptive within 5% of the lower bound (ratio <= 1.05) in every scenario; "
          f"{'MET' if met else 'MISSED'} (worst seed); wall time {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
