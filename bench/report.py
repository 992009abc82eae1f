"""The run report on a 100,000-file study: its size and the time to build it (target: < 5 MB, < 10 s).

Setup (not measured): a real ledger filled directly with SQL in the shape of a finished barcoded run —
100,000 done files (0.5% failed with an error) over 10 hours, 20-file batches on 64 workers (1% of the
batches reclaimed, 0.5% failed, then redone), 12 barcodes + unclassified, so one `outputs` row per file x
barcode x pass/fail plus one summary row per file (2.7M rows), file chemistry, dorado version and model per
batch. Every `summary/<rel>.tsv` exists: hard links to 8 realistic summaries of 4,000 reads each (the report
reads an evenly spaced sample of them). Then, measured: `report.render_report(ledger)` (what
`ledgerbc report` and `finalize` run), median of --repeat calls, and the page's size.

    .venv/bin/python bench/report.py [--files 100000] [--repeat 3] [--dir /tmp]
"""
from __future__ import annotations

import argparse
import os
import random
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _fill import machine, new_ledger  # noqa: E402

from ledgerbc import report  # noqa: E402
from ledgerbc.db import Ledger  # noqa: E402
from ledgerbc.layout import SUMMARY_COLUMNS  # noqa: E402

NOW = 1_700_000_000.0
SPAN = 10 * 3600.0
BARCODES = [f"barcode{i:02d}" for i in range(1, 13)] + ["unclassified"]
MODEL = "dna_r10.4.1_e8.2_400bps_sup@v5.0.0"


def summary_text(rng: random.Random, rel: str, reads: int = 4000) -> str:
    lines = ["\t".join(SUMMARY_COLUMNS)]
    for k in range(reads):
        length = int(rng.lognormvariate(8.3, 0.9)) + 20
        q = rng.gauss(14, 4)
        lines.append("\t".join(map(str, (
            rel, uuid.UUID(int=rng.getrandbits(128)), "-", "run1", rng.randrange(1, 3000), rng.randrange(1, 5),
            f"{k * 2.5:.3f}", f"{length / 400:.3f}", "TRUE" if q >= 10 else "FALSE", length, f"{q:.2f}",
            length * 12, rng.choice(BARCODES)))))
    return "\n".join(lines) + "\n"


def fill(path: Path, output: Path, n: int, workers: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    per_batch = 20
    con = sqlite3.connect(path)
    con.execute("PRAGMA synchronous=OFF")
    batches, files, outputs = [], [], []
    n_batches = (n + per_batch - 1) // per_batch
    clock = {w: NOW - SPAN for w in range(workers)}
    bid = 0
    for b in range(n_batches):
        w = b % workers
        # a few batches were reclaimed or failed first, then redone by another batch
        if rng.random() < 0.015:
            bid += 1
            state = "reclaimed" if rng.random() < 0.66 else "failed"
            start = clock[w]
            clock[w] += rng.uniform(300, 900)
            batches.append((bid, f"job_{w}@gpu{w:03d}", state, start, clock[w], clock[w], per_batch, per_batch * 10**9,
                            "lease expired" if state == "reclaimed" else "dorado exited with status 1: [error] CUDA error",
                            MODEL, "1.1.1+e72f14925", "FLO-PRO114M|SQK-NBD114-24|5000"))
        bid += 1
        start = clock[w]
        clock[w] += rng.uniform(400, 700)
        batches.append((bid, f"job_{w}@gpu{w:03d}", "done", start, clock[w], clock[w], per_batch, per_batch * 10**9,
                        None, MODEL, "1.1.1+e72f14925", "FLO-PRO114M|SQK-NBD114-24|5000"))
        for i in range(b * per_batch, min(n, (b + 1) * per_batch)):
            rel = f"run{i // 4000:03d}/pod5/PAS00000_pass_{i:07d}.pod5"
            failed = rng.random() < 0.005
            reads = 4000
            files.append((i + 1, rel, 10**9, 0, reads, str(uuid.uuid4()), "failed" if failed else "done",
                          3 if failed else 1, "dorado returned no reads for its 4000 reads" if failed else None,
                          bid, None if failed else 3600, None if failed else 400, 0, None if failed else reads * 9000,
                          NOW - SPAN - 60, None if failed else clock[w], "FLO-PRO114M|SQK-NBD114-24|5000",
                          reads * 40000))
            if failed:
                continue
            stem = rel[: -len(".pod5")]
            for bc in BARCODES:
                outputs.append((i + 1, bid, "pass", bc, f"pass/{bc}/{stem}.bam", 277, 277 * 9000, 2_000_000))
                outputs.append((i + 1, bid, "fail", bc, f"fail/{bc}/{stem}.bam", 31, 31 * 9000, 230_000))
            outputs.append((i + 1, bid, "summary", None, f"summary/{stem}.tsv", reads, reads * 9000, 600_000))
    con.executemany("INSERT INTO batches (id, worker_id, state, claimed_at, heartbeat_at, finished_at, n_files, n_bytes,"
                    " error, model, dorado_version, chemistry) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", batches)
    con.executemany("INSERT INTO pod5_files (id, rel_path, size, mtime_ns, read_count, file_identifier, state, attempts,"
                    " last_error, batch_id, reads_pass, reads_fail, reads_missing, bases, added_at, done_at, chemistry,"
                    " samples) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", files)
    con.executemany("INSERT INTO outputs (file_id, batch_id, kind, barcode, path, reads, bases, bytes)"
                    " VALUES (?,?,?,?,?,?,?,?)", outputs)
    con.executemany("INSERT INTO workers (worker_id, host, pid, device, started_at, last_seen, state, batches_done,"
                    " dorado_version) VALUES (?,?,?,?,?,?,?,?,?)",
                    [(f"job_{w}@gpu{w:03d}", f"gpu{w:03d}", 1000 + w, "cuda:all", NOW - SPAN, clock[w], "exited", 0,
                      "1.1.1+e72f14925") for w in range(workers)])
    con.commit()
    con.close()
    # the summaries: 8 real files, hard-linked under every done input's summary/ path
    templates = []
    for k in range(8):
        t = output / f".template-{k}.tsv"
        t.write_text(summary_text(rng, f"run000/pod5/template_{k}.pod5"))
        templates.append(t)
    for file_id, rel, *_rest in files:
        if _rest[4] == "failed":
            continue
        dest = output / "summary" / (rel[: -len(".pod5")] + ".tsv")
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.link(templates[file_id % len(templates)], dest)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--workers", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where the study goes (default: the system temp folder)")
    args = ap.parse_args(argv)
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory(prefix="ledgerbc-report-", dir=args.dir) as tmp:
        output = Path(tmp) / "out"
        output.mkdir()
        path = output / "ledgerbc.db"
        new_ledger(path, Path(tmp) / "in", output, emit="bam", batch_files=20, batch_bytes=None)
        t0 = time.perf_counter()
        fill(path, output, args.files, args.workers)
        print(f"setup: {args.files:,} files, {args.workers} workers in {time.perf_counter() - t0:.1f} s "
              f"(ledger {path.stat().st_size / 1e6:.0f} MB)")
        ledger = Ledger(path, clock=lambda: NOW)
        times, page = [], ""
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            page = report.render_report(ledger)
            times.append(time.perf_counter() - t0)
        size = len(page.encode("utf-8"))
        print(f"report: {size / 1e6:.2f} MB, built in {statistics.median(times):.2f} s (median of {args.repeat}; "
              f"runs: {', '.join(f'{t:.2f}' for t in times)}); targets < 5 MB, < 10 s")
        out = Path(os.environ.get("LEDGERBC_BENCH_REPORT_HTML", "")) if os.environ.get("LEDGERBC_BENCH_REPORT_HTML") else None
        if out:
            out.write_text(page)
            print(f"page written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
